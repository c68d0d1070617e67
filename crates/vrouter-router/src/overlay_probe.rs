//! Overlay liveness probes: the datapath's own view of whether remote routers answer.
//!
//! Discovery withdraws a remote host's stacks only when its gossip membership failed
//! **and** no local router reaches that host's routers over the overlay, so a host
//! whose discovery is down but whose datapath works keeps its routes. This module is
//! the router's half:
//! - every router answers UDP probes on `router_ip:`[`OVERLAY_PROBE_PORT`] in its
//!   namespace. The router IP sits on the stack interface and the overlay link carries
//!   onlink routes to the remote prefixes, so a datagram to a remote router IP leaves
//!   over the overlay with the router IP as source, and the answer comes back the same
//!   way;
//! - every [`PROBE_INTERVAL`] it sends one request to each remote router (the `via` of
//!   every installed route on another host) and matches the replies by sequence; with
//!   more than 250 remote routers the requests are spread over several ticks so a
//!   router never sends more than [`MAX_PROBES_PER_SEC`] (each peer's interval and
//!   reach window grow instead);
//! - it writes `probes/<stack>.json` ([`ProbesFile`]) when a peer's reachability
//!   changes or the set of peers does, and otherwise at most once per second.
//!
//! Besides reachability, the table keeps per peer a smoothed round-trip time (RFC 6298's
//! SRTT, gain 1/8) and the loss over the last [`LOSS_WINDOW`]: a request counts as lost
//! once its reach deadline ([`REACH_INTERVALS`] intervals) passed without an answer.
//!
//! Path MTU check: every [`MTU_CHECK_EVERY`] (and as soon as a new peer answers), the
//! router sends a request whose IP packet is exactly the overlay link's MTU, with DF set
//! (the socket has IP_PMTUDISC_DO), up to [`MTU_TRIES`] times an interval apart; the
//! peer answers with a reply of the same size. No answer while the small probes are
//! answered means full-size packets die on the way (an MTU black hole, e.g. an underlay
//! hop with a smaller MTU that drops instead of fragmenting), so the check fails
//! instead of connections hanging unexplained. A local EMSGSIZE (the router's own route
//! is smaller) fails it at once. A change is logged and written to events.log
//! (`mtu_check_failed`, `mtu_check_ok`).
//!
//! The router's own health ([`HealthReport`], from the event loop through a watch
//! channel) rides in the same file, which is written at least once a second.
//!
//! Wire format (big-endian): kind (1 = request, 2 = reply, 3 = full-size request,
//! 4 = full-size reply), sequence (u64), the requester's timestamp (u64, echoed
//! unchanged). Kinds 1 and 2 are exactly 17 bytes; kinds 3 and 4 are padded with zeros
//! to the probed size. A reply is the request with the kind swapped. Anything else is
//! ignored.
//!
//! [`ProbeTable`] is the pure part (a clock in microseconds is passed in); [`run`] owns
//! the socket and the writes.

use crate::desired::RemoteRouter;
use crate::traffic::TrafficReport;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vrouter_state::EventKind;
use vrouter_state::{
    now_ms, Event, MtuCheck, PeerProbe, ProbesFile, RouterHealth, StackName, StateDir,
    OVERLAY_PROBE_PORT, SCHEMA_VERSION,
};

/// Time between requests to each peer (and between the probe task's ticks), while the
/// peers are few enough for [`MAX_PROBES_PER_SEC`].
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// The most small requests a router sends per second, whatever the number of peers.
/// Up to 250 peers each is probed every [`PROBE_INTERVAL`]; beyond that the per-peer
/// interval (and with it the reach window) grows so the total stays at this rate: at
/// 1,000 peers each is probed every second, at 10,000 every 10 s. Without the cap a
/// router with 10,000 remote routers sent 40,000 requests a second in bursts that
/// starved its own event loop (measured by `vrt-ctl-bench`).
pub const MAX_PROBES_PER_SEC: u64 = 1000;
/// The most full-size (MTU) checks started per tick; further due checks wait for
/// the next ticks.
pub const MTU_STARTS_PER_TICK: usize = 32;
/// A peer is reachable while its last answer is younger than this many intervals.
pub const REACH_INTERVALS: u64 = 3;
/// Without a reachability change, the file is rewritten at most this often (and at
/// least this often while there are peers: discovery ignores a stale file).
pub const WRITE_EVERY: Duration = Duration::from_secs(1);
/// Requests remembered per peer awaiting a reply; older ones are forgotten and their
/// late replies ignored.
pub const OUTSTANDING: usize = 16;
/// Requests sent this long ago or less make up the loss figures.
pub const LOSS_WINDOW: Duration = Duration::from_secs(10);
/// Time between a peer's MTU checks (the first runs as soon as the peer answers).
pub const MTU_CHECK_EVERY: Duration = Duration::from_secs(5);
/// Full-size requests per check, one interval apart; one answer passes the check.
pub const MTU_TRIES: usize = 3;
/// IPv4 and UDP headers: a probe's IP size is its payload plus this.
pub const IP_UDP_HEADERS: usize = 28;

/// Size of a small probe datagram (and the least of a full-size one).
pub const PACKET_LEN: usize = 17;
const KIND_REQUEST: u8 = 1;
const KIND_REPLY: u8 = 2;
const KIND_MTU_REQUEST: u8 = 3;
const KIND_MTU_REPLY: u8 = 4;

/// A request or a reply, small or full-size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    Reply,
    /// A request padded to the probed size (the path MTU check).
    MtuRequest,
    MtuReply,
}

/// One probe datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub kind: Kind,
    pub seq: u64,
    /// The requester's clock when it sent the request (echoed in the reply).
    pub sent_us: u64,
}

impl Packet {
    pub fn encode(&self) -> [u8; PACKET_LEN] {
        let mut b = [0u8; PACKET_LEN];
        b[0] = match self.kind {
            Kind::Request => KIND_REQUEST,
            Kind::Reply => KIND_REPLY,
            Kind::MtuRequest => KIND_MTU_REQUEST,
            Kind::MtuReply => KIND_MTU_REPLY,
        };
        b[1..9].copy_from_slice(&self.seq.to_be_bytes());
        b[9..17].copy_from_slice(&self.sent_us.to_be_bytes());
        b
    }

    /// The packet padded with zeros to `len` bytes (at least [`PACKET_LEN`]): the
    /// datagram of a full-size probe.
    pub fn encode_padded(&self, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len.max(PACKET_LEN)];
        b[..PACKET_LEN].copy_from_slice(&self.encode());
        b
    }

    /// None for anything but a well-formed datagram: a small request or reply of
    /// exactly 17 bytes, or a full-size one of at least 17.
    pub fn decode(b: &[u8]) -> Option<Packet> {
        let head: &[u8; PACKET_LEN] = b.get(..PACKET_LEN)?.try_into().ok()?;
        let kind = match head[0] {
            KIND_REQUEST if b.len() == PACKET_LEN => Kind::Request,
            KIND_REPLY if b.len() == PACKET_LEN => Kind::Reply,
            KIND_MTU_REQUEST => Kind::MtuRequest,
            KIND_MTU_REPLY => Kind::MtuReply,
            _ => return None,
        };
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&head[i..i + 8]);
            u64::from_be_bytes(x)
        };
        Some(Packet {
            kind,
            seq: u64_at(1),
            sent_us: u64_at(9),
        })
    }

    /// The answer to a request (sent at the request's size); None for a reply
    /// (replies are never answered).
    pub fn answer(&self) -> Option<Packet> {
        let kind = match self.kind {
            Kind::Request => Kind::Reply,
            Kind::MtuRequest => Kind::MtuReply,
            Kind::Reply | Kind::MtuReply => return None,
        };
        Some(Packet { kind, ..*self })
    }
}

/// One request in the loss window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SentProbe {
    seq: u64,
    sent_us: u64,
    answered_us: Option<u64>,
}

/// A finished MTU check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MtuResult {
    size: u32,
    ok: bool,
    at_us: u64,
}

/// An MTU check in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MtuRun {
    size: u32,
    /// Sequences of the tries sent so far.
    seqs: Vec<u64>,
    last_try_us: u64,
}

/// A peer's MTU checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct MtuState {
    last: Option<MtuResult>,
    running: Option<MtuRun>,
    /// No new check starts before this.
    next_us: u64,
}

/// A peer's MTU check finished with a result different from the one before (or its
/// first result).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MtuChange {
    pub peer: Ipv4Addr,
    /// IP bytes probed.
    pub size: u32,
    pub ok: bool,
    /// The previous result; None for the first check of this peer.
    pub was: Option<bool>,
    /// The probe could not even leave: the local route's MTU is smaller (EMSGSIZE).
    pub local: bool,
}

/// What the table knows of one remote router.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerState {
    stack: StackName,
    host: Ipv4Addr,
    /// (sequence, send time) of requests awaiting a reply, oldest first.
    outstanding: VecDeque<(u64, u64)>,
    last_ok_us: Option<u64>,
    rtt_us: Option<u64>,
    /// Smoothed RTT (RFC 6298: the first sample, then 7/8 old + 1/8 new).
    srtt_us: Option<u64>,
    sent: u64,
    received: u64,
    /// As of the last [`ProbeTable::refresh`].
    reachable: bool,
    /// Requests of the loss window, oldest first.
    history: VecDeque<SentProbe>,
    mtu: MtuState,
}

/// Per-peer probe bookkeeping. Pure: every method takes the time, in microseconds
/// on a monotonic clock with any origin.
#[derive(Debug, Clone)]
pub struct ProbeTable {
    /// The tick: the per-peer interval while the peers are few.
    base_interval_us: u64,
    /// The per-peer interval: the tick, or longer with many peers.
    interval_us: u64,
    reach_window_us: u64,
    next_seq: u64,
    peers: BTreeMap<Ipv4Addr, PeerState>,
    /// The last peer probed: the next tick goes on after it.
    cursor: Option<Ipv4Addr>,
}

impl ProbeTable {
    /// `first_seq` should differ between runs (the wall clock will do), so replies to
    /// a previous process's requests do not match.
    pub fn new(interval: Duration, first_seq: u64) -> ProbeTable {
        let interval_us = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
        ProbeTable {
            base_interval_us: interval_us.max(1),
            interval_us,
            reach_window_us: interval_us.saturating_mul(REACH_INTERVALS),
            next_seq: first_seq,
            peers: BTreeMap::new(),
            cursor: None,
        }
    }

    /// Time between requests to each peer: the tick, or longer when more peers than
    /// [`MAX_PROBES_PER_SEC`] allows share it.
    pub fn interval(&self) -> Duration {
        Duration::from_micros(self.interval_us)
    }

    /// Recomputes the per-peer interval and the reach window for the peer count.
    fn rescale(&mut self) {
        let n = u64::try_from(self.peers.len()).unwrap_or(u64::MAX);
        let spread_us = n.saturating_mul(1_000_000) / MAX_PROBES_PER_SEC;
        self.interval_us = self.base_interval_us.max(spread_us);
        self.reach_window_us = self.interval_us.saturating_mul(REACH_INTERVALS);
    }

    /// The peers to send a small request to at this tick: all of them while they are
    /// few; with many, the next share in address order after the last tick's, so each
    /// peer gets one request per [`ProbeTable::interval`].
    pub fn probe_round(&mut self) -> Vec<Ipv4Addr> {
        let n = self.peers.len();
        if n == 0 {
            return Vec::new();
        }
        let ticks = usize::try_from(self.interval_us.div_ceil(self.base_interval_us))
            .unwrap_or(usize::MAX)
            .max(1);
        let per_tick = n.div_ceil(ticks);
        let mut out: Vec<Ipv4Addr> = match self.cursor {
            Some(c) => self
                .peers
                .range((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded))
                .map(|(ip, _)| *ip)
                .take(per_tick)
                .collect(),
            None => Vec::new(),
        };
        // Wrap around: the peers up to the cursor, which the first part did not take.
        let more = per_tick - out.len();
        out.extend(self.peers.keys().copied().take(more));
        self.cursor = out.last().copied();
        out
    }

    /// A peer is reachable while its last answer is younger than this.
    pub fn reach_window(&self) -> Duration {
        Duration::from_micros(self.reach_window_us)
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The peers' router addresses.
    pub fn peer_ips(&self) -> Vec<Ipv4Addr> {
        self.peers.keys().copied().collect()
    }

    /// Makes the tracked peers the given routers: new ones start unreachable with no
    /// history, gone ones are dropped, and a peer whose stack or host changed starts
    /// over. Of two entries for one address the first wins. Returns whether anything
    /// changed.
    pub fn set_peers<'a>(&mut self, routers: impl IntoIterator<Item = &'a RemoteRouter>) -> bool {
        let mut wanted: BTreeMap<Ipv4Addr, &RemoteRouter> = BTreeMap::new();
        for r in routers {
            wanted.entry(r.via).or_insert(r);
        }
        let before = self.peers.len();
        self.peers.retain(|ip, p| {
            wanted
                .get(ip)
                .is_some_and(|r| r.stack == p.stack && r.host == p.host)
        });
        let mut changed = self.peers.len() != before;
        for (ip, r) in wanted {
            self.peers.entry(ip).or_insert_with(|| {
                changed = true;
                PeerState {
                    stack: r.stack.clone(),
                    host: r.host,
                    outstanding: VecDeque::new(),
                    last_ok_us: None,
                    rtt_us: None,
                    srtt_us: None,
                    sent: 0,
                    received: 0,
                    reachable: false,
                    history: VecDeque::new(),
                    mtu: MtuState::default(),
                }
            });
        }
        self.rescale();
        changed
    }

    /// A fresh sequence number for a request.
    pub fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        seq
    }

    /// Records a request sent to `peer`; unknown peers are ignored.
    pub fn record_sent(&mut self, peer: Ipv4Addr, seq: u64, now_us: u64) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.outstanding.len() >= OUTSTANDING {
            p.outstanding.pop_front();
        }
        p.outstanding.push_back((seq, now_us));
        p.sent += 1;
        // Kept until the oldest can no longer fall in the window.
        let keep_us = duration_us(LOSS_WINDOW);
        while p
            .history
            .front()
            .is_some_and(|h| now_us.saturating_sub(h.sent_us) > keep_us)
        {
            p.history.pop_front();
        }
        p.history.push_back(SentProbe {
            seq,
            sent_us: now_us,
            answered_us: None,
        });
    }

    /// Takes in a reply from `from`; returns whether it answered one of our
    /// outstanding requests to that peer (each request counts once).
    pub fn record_reply(&mut self, from: Ipv4Addr, seq: u64, now_us: u64) -> bool {
        let Some(p) = self.peers.get_mut(&from) else {
            return false;
        };
        let Some(i) = p.outstanding.iter().position(|&(s, _)| s == seq) else {
            return false;
        };
        let (_, sent_us) = p.outstanding.remove(i).expect("position is in range");
        // Requests sent before this one that are still unanswered are not lost for
        // sure (reordering), so they stay until pushed out.
        let rtt = now_us.saturating_sub(sent_us);
        p.rtt_us = Some(rtt);
        p.srtt_us = Some(p.srtt_us.map_or(rtt, |s| (7 * s + rtt) / 8));
        p.last_ok_us = Some(p.last_ok_us.map_or(now_us, |t| t.max(now_us)));
        p.received += 1;
        if let Some(h) = p.history.iter_mut().find(|h| h.seq == seq) {
            h.answered_us.get_or_insert(now_us);
        }
        true
    }

    /// (decided, lost) requests of `p` sent within the loss window before `now_us`: a
    /// request is decided once answered in time or once its reach deadline passed, and
    /// lost if that deadline passed without an answer.
    fn recent_loss(&self, p: &PeerState, now_us: u64) -> (u32, u32) {
        let window_us = duration_us(LOSS_WINDOW);
        let (mut decided, mut lost) = (0u32, 0u32);
        for h in &p.history {
            if now_us.saturating_sub(h.sent_us) > window_us {
                continue;
            }
            let deadline = h.sent_us.saturating_add(self.reach_window_us);
            if h.answered_us.is_some_and(|a| a <= deadline) {
                decided += 1;
            } else if now_us >= deadline {
                decided += 1;
                lost += 1;
            }
        }
        (decided, lost)
    }

    /// When the earliest reachable peer turns unreachable if no answer comes first
    /// (its last answer plus the reach window); None when no peer is reachable. The
    /// caller refreshes then, so a silent peer is reported within the window itself,
    /// not up to an interval later at the next tick.
    pub fn next_expiry_us(&self) -> Option<u64> {
        self.peers
            .values()
            .filter(|p| p.reachable)
            .filter_map(|p| p.last_ok_us)
            .map(|t| t.saturating_add(self.reach_window_us))
            .min()
    }

    /// The full-size probes to send now for checks of `size` IP bytes: the first try
    /// of a check for each reachable peer whose next check is due (or whose last one
    /// probed another size), and the next try of checks under way, an interval after
    /// the previous one. Each returned (peer, sequence) counts as sent; report a local
    /// failure to send with [`ProbeTable::mtu_send_failed`].
    /// At most [`MTU_STARTS_PER_TICK`] checks start per call; the other due ones start
    /// at later calls.
    pub fn mtu_due(&mut self, size: u32, now_us: u64) -> Vec<(Ipv4Addr, u64)> {
        let mut out = Vec::new();
        let mut started = 0;
        for (ip, p) in &mut self.peers {
            let m = &mut p.mtu;
            if m.running.as_ref().is_some_and(|r| r.size != size) {
                m.running = None;
                m.next_us = now_us;
            }
            match &mut m.running {
                Some(run) => {
                    if run.seqs.len() < MTU_TRIES
                        && now_us.saturating_sub(run.last_try_us) >= self.interval_us
                    {
                        let seq = self.next_seq;
                        self.next_seq = self.next_seq.wrapping_add(1);
                        run.seqs.push(seq);
                        run.last_try_us = now_us;
                        out.push((*ip, seq));
                    }
                }
                None => {
                    let due = now_us >= m.next_us || m.last.is_some_and(|l| l.size != size);
                    if p.reachable && due && started < MTU_STARTS_PER_TICK {
                        started += 1;
                        let seq = self.next_seq;
                        self.next_seq = self.next_seq.wrapping_add(1);
                        m.running = Some(MtuRun {
                            size,
                            seqs: vec![seq],
                            last_try_us: now_us,
                        });
                        out.push((*ip, seq));
                    }
                }
            }
        }
        out
    }

    /// Ends `peer`'s check: `ok`, or failed.
    fn mtu_finish(
        &mut self,
        peer: Ipv4Addr,
        ok: bool,
        local: bool,
        now_us: u64,
    ) -> Option<MtuChange> {
        let every_us = duration_us(MTU_CHECK_EVERY);
        let p = self.peers.get_mut(&peer)?;
        let run = p.mtu.running.take()?;
        let was = p.mtu.last.map(|l| l.ok);
        p.mtu.last = Some(MtuResult {
            size: run.size,
            ok,
            at_us: now_us,
        });
        p.mtu.next_us = now_us.saturating_add(every_us);
        (was != Some(ok)).then_some(MtuChange {
            peer,
            size: run.size,
            ok,
            was,
            local,
        })
    }

    /// Takes in a full-size reply of `size` IP bytes: it passes the peer's check if it
    /// answers one of the check's tries at the probed size.
    pub fn record_mtu_reply(
        &mut self,
        from: Ipv4Addr,
        seq: u64,
        size: u32,
        now_us: u64,
    ) -> Option<MtuChange> {
        let run = self.peers.get(&from)?.mtu.running.as_ref()?;
        if run.size != size || !run.seqs.contains(&seq) {
            return None;
        }
        self.mtu_finish(from, true, false, now_us)
    }

    /// A full-size probe to `peer` could not leave because it is larger than the local
    /// route allows (EMSGSIZE): the check fails at once.
    pub fn mtu_send_failed(&mut self, peer: Ipv4Addr, now_us: u64) -> Option<MtuChange> {
        self.mtu_finish(peer, false, true, now_us)
    }

    /// Ends the checks whose last try went unanswered for the reach window: failed if
    /// the peer still answers small probes, else inconclusive (nothing changes; a new
    /// check starts once the peer answers again).
    pub fn mtu_expire(&mut self, now_us: u64) -> Vec<MtuChange> {
        let window = self.reach_window_us;
        let mut expired = Vec::new();
        for (ip, p) in &mut self.peers {
            let Some(run) = &p.mtu.running else { continue };
            if run.seqs.len() < MTU_TRIES || now_us.saturating_sub(run.last_try_us) < window {
                continue;
            }
            if p.reachable {
                expired.push(*ip);
            } else {
                p.mtu.running = None;
                p.mtu.next_us = now_us;
            }
        }
        expired
            .into_iter()
            .filter_map(|ip| self.mtu_finish(ip, false, false, now_us))
            .collect()
    }

    fn reachable_at(&self, p: &PeerState, now_us: u64) -> bool {
        p.last_ok_us
            .is_some_and(|t| now_us.saturating_sub(t) < self.reach_window_us)
    }

    /// Recomputes every peer's reachability; returns the peers whose reachability
    /// changed, with the new value.
    pub fn refresh(&mut self, now_us: u64) -> Vec<(Ipv4Addr, bool)> {
        let now: BTreeMap<Ipv4Addr, bool> = self
            .peers
            .iter()
            .map(|(ip, p)| (*ip, self.reachable_at(p, now_us)))
            .collect();
        let mut changed = Vec::new();
        for (ip, p) in &mut self.peers {
            let r = now[ip];
            if p.reachable != r {
                p.reachable = r;
                changed.push((*ip, r));
            }
        }
        changed
    }

    /// Whether `peer` was reachable at the last [`ProbeTable::refresh`].
    pub fn is_reachable(&self, peer: Ipv4Addr) -> Option<bool> {
        self.peers.get(&peer).map(|p| p.reachable)
    }

    /// The peers as the probes file shows them. `now_us` is the table's clock and
    /// `wall_ms` the wall clock at the same moment, to date the last answers.
    pub fn snapshot(&self, now_us: u64, wall_ms: u64) -> Vec<PeerProbe> {
        let wall = |t: u64| wall_ms.saturating_sub(now_us.saturating_sub(t) / 1000);
        self.peers
            .iter()
            .map(|(ip, p)| {
                let (recent_sent, recent_lost) = self.recent_loss(p, now_us);
                PeerProbe {
                    router_ip: *ip,
                    stack: p.stack.clone(),
                    host: p.host,
                    last_ok_ms: p.last_ok_us.map(wall),
                    rtt_us: p.rtt_us,
                    sent: p.sent,
                    received: p.received,
                    reachable: p.reachable,
                    srtt_us: p.srtt_us,
                    recent_sent,
                    recent_lost,
                    mtu: p.mtu.last.map(|m| MtuCheck {
                        size: m.size,
                        ok: m.ok,
                        checked_ms: wall(m.at_us),
                    }),
                }
            })
            .collect()
    }

    /// Describes a peer for a log line.
    fn describe(&self, peer: Ipv4Addr) -> String {
        match self.peers.get(&peer) {
            Some(p) => format!("router {peer} (stack {}, host {})", p.stack, p.host),
            None => format!("router {peer}"),
        }
    }
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// When to write the probes file: at once after a change that matters (reachability,
/// the peer set, an MTU result, the router's health), else once per period, peers or
/// not (the file carries the router's health, and its age tells readers the router
/// is alive). Pure.
#[derive(Debug, Clone, Default)]
pub struct WritePolicy {
    last_write_us: Option<u64>,
    /// Something changed that must be written without waiting for the period.
    urgent: bool,
}

impl WritePolicy {
    /// A change to report: write at the next chance.
    pub fn mark_urgent(&mut self) {
        self.urgent = true;
    }

    /// A change waits to be written.
    pub fn is_urgent(&self) -> bool {
        self.urgent
    }

    pub fn due(&self, now_us: u64, period_us: u64) -> bool {
        match self.last_write_us {
            None => true,
            Some(_) if self.urgent => true,
            Some(t) => now_us.saturating_sub(t) >= period_us,
        }
    }

    pub fn written(&mut self, now_us: u64) {
        self.last_write_us = Some(now_us);
        self.urgent = false;
    }
}

/// What the router's event loop reports to the probe task after each check of its
/// kernel state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    pub health: RouterHealth,
    /// The overlay link's MTU, the size of the full-size probes; None without a link.
    pub overlay_mtu: Option<u32>,
}

/// What the probe task needs to know about its router.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub stack: StackName,
    pub router_ip: Ipv4Addr,
    pub state_dir: PathBuf,
    pub interval: Duration,
    /// The traffic counters to put in the file (`ProbesFile::traffic`), if counted.
    pub traffic: Option<watch::Receiver<TrafficReport>>,
    /// When the router's loop last completed a reconcile (ms since the epoch, 0 before
    /// the first), written as `RouterHealth::reconciled_ms`.
    pub loop_heartbeat: Option<Arc<AtomicU64>>,
    /// The access rules' counters to put in the file (`ProbesFile::acl`).
    pub acl: Option<watch::Receiver<Vec<vrouter_state::AclRuleCounters>>>,
}

/// The probe task: answers probes, probes the remote routers in `peers`, checks their
/// path MTU at the overlay link's MTU from `health`, and writes the results with the
/// router's health. Ends when `peers`' sender is dropped.
pub async fn run(
    config: ProbeConfig,
    mut peers: watch::Receiver<BTreeSet<RemoteRouter>>,
    mut health: watch::Receiver<Option<HealthReport>>,
) {
    let state = match StateDir::open(&config.state_dir) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!(error = %e, "overlay probes are off: cannot open the state directory");
            return;
        }
    };
    let generation = state
        .read_all_probes()
        .into_iter()
        .find(|f| f.stack == config.stack)
        .map_or(0, |f| f.generation);
    let origin = tokio::time::Instant::now();
    let clock = move || u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX);
    let mut task = ProbeTask {
        table: ProbeTable::new(config.interval, now_ms().saturating_mul(1000)),
        policy: WritePolicy::default(),
        writer: None,
        generation,
        socket: None,
        bind_failed: false,
        health: None,
        state,
        config,
    };
    task.table.set_peers(peers.borrow_and_update().iter());
    task.health = health.borrow_and_update().clone();
    let mut health_open = true;

    let mut interval = tokio::time::interval(task.config.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Full-size probes can be as large as any MTU.
    let mut buf = vec![0u8; 65536];
    loop {
        let socket = task.socket.clone();
        let expiry = task
            .table
            .next_expiry_us()
            .map(|us| origin + Duration::from_micros(us));
        tokio::select! {
            _ = interval.tick() => task.tick(clock()),
            changed = peers.changed() => {
                if changed.is_err() {
                    return;
                }
                if task.table.set_peers(peers.borrow_and_update().iter()) {
                    task.table.refresh(clock());
                    task.policy.mark_urgent();
                }
            }
            changed = health.changed(), if health_open => {
                match changed {
                    Ok(()) => {
                        task.health = health.borrow_and_update().clone();
                        task.policy.mark_urgent();
                        task.maybe_write(clock());
                    }
                    Err(_) => health_open = false,
                }
            }
            _ = sleep_until(expiry) => task.refresh(clock()),
            // A change came while the previous write was in flight: write it as soon
            // as that one is done, not at the next tick.
            _ = finished(&mut task.writer), if task.policy.is_urgent() => {
                task.writer = None;
                task.maybe_write(clock());
            }
            received = recv(socket.as_deref(), &mut buf) => {
                task.on_datagram(received, &buf, clock())
            }
        }
    }
}

/// Waits for the write in flight; never returns without one.
async fn finished(writer: &mut Option<JoinHandle<()>>) {
    match writer {
        Some(w) => {
            let _ = w.await;
        }
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`; never returns without a time.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Waits for a datagram; never returns without a socket.
async fn recv(socket: Option<&UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match socket {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

struct ProbeTask {
    config: ProbeConfig,
    table: ProbeTable,
    policy: WritePolicy,
    state: Arc<StateDir>,
    /// The write in flight (file writes block: they run off the event loop).
    writer: Option<JoinHandle<()>>,
    generation: u64,
    socket: Option<Arc<UdpSocket>>,
    /// A bind failure was logged (logged once until a bind succeeds).
    bind_failed: bool,
    /// The router's latest report.
    health: Option<HealthReport>,
}

impl ProbeTask {
    fn bind(&mut self) {
        let addr = SocketAddrV4::new(self.config.router_ip, OVERLAY_PROBE_PORT);
        let bound = std::net::UdpSocket::bind(addr).and_then(|s| {
            set_dont_fragment(&s)?;
            s.set_nonblocking(true)?;
            UdpSocket::from_std(s)
        });
        match bound {
            Ok(s) => {
                tracing::info!(%addr, "overlay probes: answering and probing remote routers");
                self.socket = Some(Arc::new(s));
                self.bind_failed = false;
            }
            Err(e) => {
                if !self.bind_failed {
                    tracing::warn!(%addr, error = %e, "overlay probes: cannot bind the probe socket yet; retrying every interval");
                    self.bind_failed = true;
                }
            }
        }
    }

    /// Recomputes reachability, reports changes, and writes if due.
    fn refresh(&mut self, now_us: u64) {
        for (peer, reachable) in self.table.refresh(now_us) {
            let who = self.table.describe(peer);
            if reachable {
                tracing::info!("overlay probes: {who} answers");
            } else {
                tracing::warn!(
                    "overlay probes: {who} stopped answering (nothing for {} ms)",
                    self.table.reach_window().as_millis()
                );
            }
            self.policy.mark_urgent();
        }
        for change in self.table.mtu_expire(now_us) {
            self.report_mtu(change);
        }
        self.maybe_write(now_us);
    }

    /// Logs an MTU check result that changed, and writes it to events.log unless it is
    /// a first success (the normal case needs no event).
    fn report_mtu(&mut self, c: MtuChange) {
        self.policy.mark_urgent();
        let who = self.table.describe(c.peer);
        if c.ok {
            tracing::info!(
                "overlay probes: {who} answers {}-byte probes with DF (the overlay MTU)",
                c.size
            );
            if c.was == Some(false) {
                self.event(
                    EventKind::MtuCheckOk,
                    format!("{who} answers {}-byte probes with DF again: full-size packets pass the path", c.size),
                );
            }
            return;
        }
        let message = if c.local {
            format!(
                "{who}: a {}-byte probe with DF cannot leave this router (EMSGSIZE: its route to the peer has a smaller MTU than the overlay link); full-size packets to that stack fail",
                c.size
            )
        } else {
            format!(
                "{who} answers small probes but not {}-byte probes with DF (the overlay MTU): full-size packets are dropped on the path (an MTU black hole); every underlay hop between the hosts must carry {} bytes (the overlay MTU + 50 of VXLAN), or the underlay interface's MTU must be lowered to the smallest hop's so the overlay MTU follows",
                c.size,
                c.size + 50
            )
        };
        tracing::warn!("overlay probes: {message}");
        self.event(EventKind::MtuCheckFailed, message);
    }

    fn event(&self, kind: EventKind, message: String) {
        let event = Event::new(format!("router/{}", self.config.stack), kind, message)
            .for_stack(&self.config.stack);
        if let Err(e) = self.state.append_event(&event) {
            tracing::warn!(error = %e, kind = %event.kind, "cannot write an event");
        }
    }

    fn tick(&mut self, now_us: u64) {
        if self.socket.is_none() {
            self.bind();
        }
        self.refresh(now_us);
        let Some(socket) = self.socket.clone() else {
            return;
        };
        for peer in self.table.probe_round() {
            let seq = self.table.next_seq();
            let packet = Packet {
                kind: Kind::Request,
                seq,
                sent_us: now_us,
            };
            match socket.try_send_to(
                &packet.encode(),
                SocketAddr::V4(SocketAddrV4::new(peer, OVERLAY_PROBE_PORT)),
            ) {
                Ok(_) => self.table.record_sent(peer, seq, now_us),
                // No route yet, a full buffer: this round's request is lost, which
                // is what the reachability says.
                Err(e) => tracing::debug!(%peer, error = %e, "overlay probe not sent"),
            }
        }
        let Some(size) = self.health.as_ref().and_then(|h| h.overlay_mtu) else {
            return;
        };
        let payload = (size as usize).saturating_sub(IP_UDP_HEADERS);
        for (peer, seq) in self.table.mtu_due(size, now_us) {
            let packet = Packet {
                kind: Kind::MtuRequest,
                seq,
                sent_us: now_us,
            };
            let to = SocketAddr::V4(SocketAddrV4::new(peer, OVERLAY_PROBE_PORT));
            match socket.try_send_to(&packet.encode_padded(payload), to) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                    if let Some(change) = self.table.mtu_send_failed(peer, now_us) {
                        self.report_mtu(change);
                    }
                }
                // Counts as an unanswered try.
                Err(e) => tracing::debug!(%peer, error = %e, "full-size probe not sent"),
            }
        }
    }

    fn on_datagram(
        &mut self,
        received: std::io::Result<(usize, SocketAddr)>,
        buf: &[u8],
        now_us: u64,
    ) {
        let (len, from) = match received {
            Ok(r) => r,
            Err(e) => {
                match e.kind() {
                    std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::WouldBlock => {}
                    _ => {
                        // Start over with a fresh socket on the next tick rather
                        // than spin on a broken one.
                        tracing::warn!(error = %e, "overlay probes: receive failed; rebinding");
                        self.socket = None;
                    }
                }
                return;
            }
        };
        let SocketAddr::V4(from) = from else {
            return;
        };
        let Some(packet) = buf.get(..len).and_then(Packet::decode) else {
            return;
        };
        match packet.kind {
            Kind::Request | Kind::MtuRequest => {
                let Some(socket) = &self.socket else { return };
                let answer = packet.answer().expect("a request has an answer");
                // The same size as the request: a full-size request is answered in full.
                if let Err(e) = socket.try_send_to(&answer.encode_padded(len), SocketAddr::V4(from))
                {
                    tracing::debug!(%from, error = %e, "overlay probe answer not sent");
                }
            }
            Kind::MtuReply => {
                let size = u32::try_from(len + IP_UDP_HEADERS).unwrap_or(u32::MAX);
                if from.port() == OVERLAY_PROBE_PORT {
                    if let Some(change) =
                        self.table
                            .record_mtu_reply(*from.ip(), packet.seq, size, now_us)
                    {
                        self.report_mtu(change);
                        self.maybe_write(now_us);
                    }
                }
            }
            Kind::Reply => {
                if from.port() == OVERLAY_PROBE_PORT
                    && self.table.record_reply(*from.ip(), packet.seq, now_us)
                    && self.table.is_reachable(*from.ip()) == Some(false)
                {
                    // Report recovery at once rather than at the next tick.
                    self.refresh(now_us);
                }
            }
        }
    }

    /// Writes the probes file if the policy says so and no write is in flight (then
    /// the next chance writes).
    fn maybe_write(&mut self, now_us: u64) {
        if self.writer.as_ref().is_some_and(|w| !w.is_finished()) {
            return;
        }
        let traffic = self.config.traffic.as_ref().map(|t| t.borrow().clone());
        if !self.policy.due(now_us, duration_us(WRITE_EVERY)) {
            return;
        }
        self.generation += 1;
        let wall_ms = now_ms();
        let file = ProbesFile {
            schema: SCHEMA_VERSION,
            generation: self.generation,
            stack: self.config.stack.clone(),
            updated_ms: wall_ms,
            interval_ms: u64::try_from(self.config.interval.as_millis()).unwrap_or(u64::MAX),
            peers: self.table.snapshot(now_us, wall_ms),
            health: self.health.as_ref().map(|h| {
                let mut health = h.health.clone();
                health.traffic_error = traffic.as_ref().and_then(|t| t.error.clone());
                health.reconciled_ms = self
                    .config
                    .loop_heartbeat
                    .as_ref()
                    .map(|b| b.load(Ordering::Relaxed))
                    .filter(|ms| *ms > 0);
                health
            }),
            traffic: traffic.map(|t| t.stacks).unwrap_or_default(),
            // Filled in by StateDir::write_probes from the router's events.
            events: None,
            acl: self
                .config
                .acl
                .as_ref()
                .map(|a| a.borrow().clone())
                .unwrap_or_default(),
        };
        self.policy.written(now_us);
        let state = Arc::clone(&self.state);
        self.writer = Some(tokio::task::spawn_blocking(move || {
            if let Err(e) = state.write_probes(&file) {
                tracing::warn!(error = %e, "overlay probes: cannot write the results");
            }
            vrouter_state::crash::point("router.after_probes");
        }));
    }
}

/// Sets IP_MTU_DISCOVER to IP_PMTUDISC_DO: every datagram leaves with DF, and one
/// larger than the route's MTU fails with EMSGSIZE instead of being fragmented, so a
/// full-size probe tests the path at exactly its size.
fn set_dont_fragment(socket: &std::net::UdpSocket) -> std::io::Result<()> {
    crate::probe::set_ipv4_option(socket, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;

    fn router(via: &str, stack: &str, host: &str) -> RemoteRouter {
        RemoteRouter {
            via: via.parse().unwrap(),
            stack: StackName::new(stack).unwrap(),
            host: host.parse().unwrap(),
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn table(routers: &[RemoteRouter]) -> ProbeTable {
        let mut t = ProbeTable::new(PROBE_INTERVAL, 100);
        assert!(t.set_peers(routers));
        t
    }

    /// Sends one request to every peer at `now_us`; returns (peer, seq).
    fn round(t: &mut ProbeTable, now_us: u64) -> Vec<(Ipv4Addr, u64)> {
        t.peer_ips()
            .into_iter()
            .map(|p| {
                let seq = t.next_seq();
                t.record_sent(p, seq, now_us);
                (p, seq)
            })
            .collect()
    }

    #[test]
    fn packets_round_trip_and_junk_is_ignored() {
        let p = Packet {
            kind: Kind::Request,
            seq: 0x0102_0304_0506_0708,
            sent_us: u64::MAX,
        };
        let b = p.encode();
        assert_eq!(b.len(), PACKET_LEN);
        assert_eq!(b[0], 1);
        assert_eq!(Packet::decode(&b), Some(p));
        let a = p.answer().unwrap();
        assert_eq!(
            a,
            Packet {
                kind: Kind::Reply,
                ..p
            }
        );
        assert_eq!(a.encode()[0], 2);
        assert_eq!(a.answer(), None, "replies are never answered");

        assert_eq!(Packet::decode(&[]), None);
        assert_eq!(Packet::decode(&b[..16]), None);
        let mut long = b.to_vec();
        long.push(0);
        assert_eq!(Packet::decode(&long), None);
        let mut bad = b;
        for kind in [0u8, 5, 0xff] {
            bad[0] = kind;
            assert_eq!(Packet::decode(&bad), None);
        }
    }

    #[test]
    fn full_size_packets_are_answered_at_their_size() {
        let p = Packet {
            kind: Kind::MtuRequest,
            seq: 7,
            sent_us: 9,
        };
        let wire = p.encode_padded(1450 - IP_UDP_HEADERS);
        assert_eq!(wire.len(), 1422);
        assert_eq!(wire[0], 3);
        assert!(wire[PACKET_LEN..].iter().all(|&b| b == 0));
        assert_eq!(Packet::decode(&wire), Some(p));
        // Any length from the header up is a full-size packet.
        assert_eq!(Packet::decode(&wire[..PACKET_LEN]), Some(p));
        assert_eq!(Packet::decode(&wire[..PACKET_LEN - 1]), None);
        let a = p.answer().unwrap();
        assert_eq!(a.kind, Kind::MtuReply);
        assert_eq!((a.seq, a.sent_us), (7, 9));
        let reply = a.encode_padded(wire.len());
        assert_eq!(
            reply.len(),
            wire.len(),
            "the reply is as large as the request"
        );
        assert_eq!(reply[0], 4);
        assert_eq!(Packet::decode(&reply).unwrap().answer(), None);
        // Small kinds must be exactly 17 bytes: a padded small request is junk.
        let small = Packet {
            kind: Kind::Request,
            ..p
        };
        assert_eq!(Packet::decode(&small.encode_padded(100)), None);
    }

    #[test]
    fn smoothed_rtt_follows_rfc_6298() {
        let mut t = table(&[router("10.2.0.254", "b", "192.168.0.2")]);
        let b = ip("10.2.0.254");
        let mut now = 0;
        let mut expect = None::<u64>;
        for rtt in [800u64, 400, 400, 1600, 400] {
            let seq = round(&mut t, now)[0].1;
            assert!(t.record_reply(b, seq, now + rtt));
            // First sample as is, then 7/8 of the old plus 1/8 of the new.
            expect = Some(expect.map_or(rtt, |s| (7 * s + rtt) / 8));
            let p = &t.snapshot(now + rtt, 0)[0];
            assert_eq!(p.rtt_us, Some(rtt));
            assert_eq!(p.srtt_us, expect);
            now += 250 * MS;
        }
        assert_eq!(expect, Some(764));
    }

    #[test]
    fn loss_counts_requests_past_their_deadline_in_the_last_10s() {
        let mut t = table(&[router("10.2.0.254", "b", "192.168.0.2")]);
        let b = ip("10.2.0.254");
        let loss = |t: &ProbeTable, now| {
            let p = &t.snapshot(now, 0)[0];
            (p.recent_sent, p.recent_lost)
        };
        // 40 requests over 10 s; every 4th unanswered, one answered too late.
        let mut now = 0;
        let mut late = None;
        for i in 0..40u64 {
            let seq = round(&mut t, now)[0].1;
            match i % 4 {
                0 => {}
                1 if i == 5 => late = Some((seq, now)),
                _ => assert!(t.record_reply(b, seq, now + 500)),
            }
            now += 250 * MS;
        }
        let (seq, sent) = late.unwrap();
        // After its 750 ms deadline: lost even though it is answered (and the answer
        // still counts for reachability).
        assert!(t.record_reply(b, seq, sent + 800 * MS));
        // One more, just sent: undecided, so not counted yet.
        round(&mut t, now);
        assert_eq!(loss(&t, now), (40, 10 + 1));
        // 2 s later the window has slid past the first 8 (two dropped, the late one)
        // and the last one's deadline passed.
        assert_eq!(loss(&t, now + 2_000 * MS), (32 + 1, 8 + 1));
        // A silent peer: everything lost.
        for _ in 0..8 {
            round(&mut t, now);
            now += 250 * MS;
        }
        let (s, l) = loss(&t, now + 750 * MS);
        assert!(s >= 8 && l >= 8, "{s} {l}");
        // The history stays bounded.
        for _ in 0..1000 {
            round(&mut t, now);
            now += 250 * MS;
        }
        assert!(
            t.peers[&b].history.len() <= 41,
            "{}",
            t.peers[&b].history.len()
        );
    }

    #[test]
    fn expiry_is_the_earliest_reachable_peers_deadline() {
        let mut t = table(&[
            router("10.2.0.254", "b", "192.168.0.2"),
            router("10.3.0.254", "c", "192.168.0.3"),
        ]);
        let (b, c) = (ip("10.2.0.254"), ip("10.3.0.254"));
        assert_eq!(t.next_expiry_us(), None, "nobody reachable");
        let sent = round(&mut t, 0);
        t.record_reply(b, sent[0].1, 1_000);
        t.record_reply(c, sent[1].1, 2_000);
        assert_eq!(t.next_expiry_us(), None, "not reachable before a refresh");
        t.refresh(2_000);
        assert_eq!(t.next_expiry_us(), Some(1_000 + 750 * MS));
        // Exactly at the deadline b is no longer reachable; c's deadline is next.
        assert_eq!(t.refresh(1_000 + 750 * MS), vec![(b, false)]);
        assert_eq!(t.next_expiry_us(), Some(2_000 + 750 * MS));
        // Just before it, c still is.
        assert_eq!(t.refresh(2_000 + 750 * MS - 1), vec![]);
        assert_eq!(t.refresh(2_000 + 750 * MS), vec![(c, false)]);
        assert_eq!(t.next_expiry_us(), None);
    }

    /// Runs the MTU state machine for one reachable peer `b`, answering small probes
    /// every interval, and full-size ones when `answer` says so.
    fn mtu_run(
        t: &mut ProbeTable,
        from: u64,
        until: u64,
        answer: impl Fn(u64) -> bool,
    ) -> (Vec<(u64, MtuChange)>, usize) {
        let b = ip("10.2.0.254");
        let mut changes = Vec::new();
        let mut full = 0;
        let mut now = from;
        while now < until {
            for (p, seq) in round(t, now) {
                t.record_reply(p, seq, now + 1);
            }
            t.refresh(now + 1);
            changes.extend(t.mtu_expire(now).into_iter().map(|c| (now, c)));
            for (p, seq) in t.mtu_due(1450, now) {
                assert_eq!(p, b);
                full += 1;
                if answer(now) {
                    if let Some(c) = t.record_mtu_reply(p, seq, 1450, now + 2) {
                        changes.push((now, c));
                    }
                }
            }
            now += 250 * MS;
        }
        (changes, full)
    }

    #[test]
    fn mtu_check_passes_fails_and_recovers() {
        let mut t = table(&[router("10.2.0.254", "b", "192.168.0.2")]);
        let b = ip("10.2.0.254");
        // Not reachable yet: no check.
        assert!(t.mtu_due(1450, 0).is_empty());

        // The first check runs as soon as b answers, and passes at the first try.
        let (changes, full) = mtu_run(&mut t, 0, 4_000 * MS, |_| true);
        assert_eq!(full, 1, "one check, one try");
        assert_eq!(changes.len(), 1);
        assert_eq!(
            changes[0].1,
            MtuChange {
                peer: b,
                size: 1450,
                ok: true,
                was: None,
                local: false
            }
        );
        let m = t.snapshot(4_000 * MS, 10_000).remove(0).mtu.unwrap();
        assert_eq!((m.size, m.ok), (1450, true));
        // Passed 2 µs after the start, 3,999.998 ms before wall time 10,000 ms.
        assert_eq!(m.checked_ms, 6_001);

        // From 4 s the full-size probes die; the next check is due 5 s after the
        // first: three tries an interval apart, then the reach window, then failed.
        let (changes, full) = mtu_run(&mut t, 4_000 * MS, 11_000 * MS, |_| false);
        assert_eq!(full, MTU_TRIES, "one failed check");
        assert_eq!(changes.len(), 1, "{changes:?}");
        let (at, c) = changes[0];
        assert_eq!((c.ok, c.was, c.local), (false, Some(true), false));
        // Due 5 s after the first passed (at 2 µs), so the tick at 5.25 s starts it;
        // tries at 5.25/5.5/5.75 s; failed 750 ms after the last try.
        assert_eq!(at, 6_500 * MS);
        assert!(!t.snapshot(at, 0)[0].mtu.as_ref().unwrap().ok);
        assert!(t.is_reachable(b) == Some(true), "small probes still pass");

        // Fixed: the next check (5 s after the failure) passes again.
        let (changes, _) = mtu_run(&mut t, 11_000 * MS, 20_000 * MS, |_| true);
        assert_eq!(changes.len(), 1);
        assert_eq!((changes[0].1.ok, changes[0].1.was), (true, Some(false)));
        assert_eq!(changes[0].0, 11_500 * MS);
    }

    #[test]
    fn mtu_check_details() {
        let mut t = table(&[router("10.2.0.254", "b", "192.168.0.2")]);
        let b = ip("10.2.0.254");
        let seq = round(&mut t, 0)[0].1;
        t.record_reply(b, seq, 1);
        t.refresh(1);
        let tries = t.mtu_due(1450, 0);
        assert_eq!(tries.len(), 1);
        // Nothing more until an interval passed.
        assert!(t.mtu_due(1450, 100 * MS).is_empty());
        // A reply of another size or sequence does not pass it.
        assert_eq!(t.record_mtu_reply(b, tries[0].1, 1400, 10), None);
        assert_eq!(t.record_mtu_reply(b, tries[0].1 + 99, 1450, 10), None);
        assert_eq!(
            t.record_mtu_reply(ip("10.9.9.9"), tries[0].1, 1450, 10),
            None
        );
        // A local EMSGSIZE fails it at once.
        let c = t.mtu_send_failed(b, 20).unwrap();
        assert_eq!((c.ok, c.local, c.was), (false, true, None));
        assert_eq!(t.mtu_send_failed(b, 21), None, "no check under way");
        assert!(t.mtu_due(1450, 1_000 * MS).is_empty(), "next one in 5 s");
        // The overlay MTU changed: a check at the new size starts at once.
        let again = t.mtu_due(1400, 1_000 * MS);
        assert_eq!(again.len(), 1);
        // ... and passes; a late reply to the old check is ignored.
        assert_eq!(t.record_mtu_reply(b, tries[0].1, 1450, 1_000 * MS), None);
        let c = t
            .record_mtu_reply(b, again[0].1, 1400, 1_000 * MS + 5)
            .unwrap();
        assert_eq!((c.ok, c.size, c.was), (true, 1400, Some(false)));

        // A check that ends while small probes fail too says nothing.
        let mut now = 7_000 * MS;
        let seq = round(&mut t, now)[0].1;
        t.record_reply(b, seq, now + 1);
        t.refresh(now + 1);
        assert_eq!(t.mtu_due(1400, now).len(), 1);
        for _ in 0..8 {
            now += 250 * MS;
            round(&mut t, now);
            t.refresh(now);
            t.mtu_due(1400, now);
            assert_eq!(t.mtu_expire(now), vec![]);
        }
        assert_eq!(t.is_reachable(b), Some(false));
        let m = t.snapshot(now, 0)[0].mtu.clone().unwrap();
        assert!(m.ok, "still the last conclusive result");
        assert!(t.peers[&b].mtu.running.is_none(), "abandoned");
        assert!(t.mtu_due(1400, now).is_empty(), "not while unreachable");
    }

    #[test]
    fn replies_match_by_sequence_and_give_rtt() {
        let mut t = table(&[router("10.2.0.254", "b", "192.168.0.2")]);
        assert_eq!(t.reach_window(), Duration::from_millis(750));
        let b = ip("10.2.0.254");
        let sent = round(&mut t, 1_000 * MS);
        let seq = sent[0].1;
        assert_eq!(seq, 100);

        // Unknown sequence, unknown sender: nothing.
        assert!(!t.record_reply(b, seq + 1, 1_001 * MS));
        assert!(!t.record_reply(ip("10.9.9.9"), seq, 1_001 * MS));
        assert_eq!(t.refresh(1_001 * MS), vec![]);

        assert!(t.record_reply(b, seq, 1_000 * MS + 420));
        // A duplicate counts once.
        assert!(!t.record_reply(b, seq, 1_000 * MS + 500));
        assert_eq!(t.refresh(1_001 * MS), vec![(b, true)]);
        assert_eq!(t.refresh(1_001 * MS), vec![], "changes are reported once");

        // The answer is 1.58 ms old at wall time 50,000 ms.
        let s = t.snapshot(1_002 * MS, 50_000);
        assert_eq!(
            s,
            vec![PeerProbe {
                router_ip: b,
                stack: StackName::new("b").unwrap(),
                host: ip("192.168.0.2"),
                last_ok_ms: Some(49_999),
                rtt_us: Some(420),
                sent: 1,
                received: 1,
                reachable: true,
                srtt_us: Some(420),
                recent_sent: 1,
                recent_lost: 0,
                mtu: None,
            }]
        );
    }

    #[test]
    fn reachability_follows_the_window() {
        let mut t = table(&[
            router("10.2.0.254", "b", "192.168.0.2"),
            router("10.3.0.254", "c", "192.168.0.3"),
        ]);
        let (b, c) = (ip("10.2.0.254"), ip("10.3.0.254"));
        let mut now = 0;
        // Both answer for a while.
        for _ in 0..4 {
            for (p, seq) in round(&mut t, now) {
                assert!(t.record_reply(p, seq, now + 300));
            }
            now += 250 * MS;
        }
        let changed = t.refresh(now);
        assert_eq!(changed, vec![(b, true), (c, true)]);

        // c goes silent: still reachable within 750 ms of its last answer, then not.
        let last_ok = now - 250 * MS + 300;
        for _ in 0..3 {
            for (p, seq) in round(&mut t, now) {
                if p == b {
                    assert!(t.record_reply(p, seq, now + 300));
                }
            }
            now += 250 * MS;
            if now - last_ok < 750 * MS {
                assert_eq!(t.refresh(now), vec![]);
            }
        }
        assert!(now - last_ok >= 750 * MS);
        assert_eq!(t.refresh(now), vec![(c, false)]);
        assert_eq!(t.is_reachable(b), Some(true));
        assert_eq!(t.is_reachable(c), Some(false));

        let s = t.snapshot(now, 10_000_000);
        let sc = s.iter().find(|p| p.router_ip == c).unwrap();
        assert_eq!((sc.sent, sc.received), (7, 4));
        assert!(!sc.reachable);
        assert_eq!(sc.last_ok_ms, Some(10_000_000 - (now - last_ok) / 1000));

        // A late reply to a still-remembered request brings it back.
        let late = t.peers[&c].outstanding.back().unwrap().0;
        assert!(t.record_reply(c, late, now + 1));
        assert_eq!(t.refresh(now + 1), vec![(c, true)]);
    }

    fn many(n: usize) -> Vec<RemoteRouter> {
        (0..n)
            .map(|i| {
                let via = Ipv4Addr::from(0x0a00_0000u32 + ((i as u32) << 8) + 254);
                RemoteRouter {
                    via,
                    stack: StackName::new(&format!("s{i}")).unwrap(),
                    host: "198.18.0.2".parse().unwrap(),
                }
            })
            .collect()
    }

    #[test]
    fn few_peers_are_all_probed_every_tick() {
        let mut t = ProbeTable::new(PROBE_INTERVAL, 1);
        t.set_peers(many(250).iter());
        assert_eq!(t.interval(), PROBE_INTERVAL);
        assert_eq!(t.reach_window(), PROBE_INTERVAL * 3);
        for _ in 0..3 {
            assert_eq!(t.probe_round().len(), 250);
        }
    }

    #[test]
    fn many_peers_share_the_probe_budget_round_robin() {
        let mut t = ProbeTable::new(PROBE_INTERVAL, 1);
        let routers = many(10_000);
        t.set_peers(routers.iter());
        // 10,000 peers at 1,000 requests/s: each every 10 s, reachable for 30 s.
        assert_eq!(t.interval(), Duration::from_secs(10));
        assert_eq!(t.reach_window(), Duration::from_secs(30));
        let ticks = 40; // 10 s of 250 ms ticks
        let mut seen = BTreeMap::<Ipv4Addr, usize>::new();
        for _ in 0..ticks {
            let round = t.probe_round();
            // 1,000/s over 4 ticks a second.
            assert_eq!(round.len(), 250);
            for ip in round {
                *seen.entry(ip).or_default() += 1;
            }
        }
        assert_eq!(seen.len(), 10_000, "every peer is probed once per interval");
        assert!(seen.values().all(|&c| c == 1));
        // Fewer peers again: back to every tick.
        t.set_peers(routers[..10].iter());
        assert_eq!(t.interval(), PROBE_INTERVAL);
        assert_eq!(t.probe_round().len(), 10);
        assert_eq!(t.probe_round().len(), 10);
    }

    #[test]
    fn mtu_checks_start_within_the_budget() {
        let mut t = ProbeTable::new(PROBE_INTERVAL, 1);
        t.set_peers(many(100).iter());
        let now = 10 * MS;
        for ip in t.peer_ips() {
            let seq = t.next_seq();
            t.record_sent(ip, seq, now);
            t.record_reply(ip, seq, now + 1);
        }
        t.refresh(now + 1);
        let first = t.mtu_due(1450, now + 2);
        assert_eq!(first.len(), MTU_STARTS_PER_TICK);
        let second = t.mtu_due(1450, now + 3);
        // The next batch starts; the first batch's retries are not due yet.
        assert_eq!(second.len(), MTU_STARTS_PER_TICK);
        assert!(second
            .iter()
            .all(|(ip, _)| !first.iter().any(|(f, _)| f == ip)));
    }

    #[test]
    fn outstanding_requests_are_bounded() {
        let mut t = table(&[router("10.2.0.254", "b", "192.168.0.2")]);
        let b = ip("10.2.0.254");
        let first = round(&mut t, 0)[0].1;
        for i in 1..(OUTSTANDING as u64 + 10) {
            round(&mut t, i * 250 * MS);
        }
        assert_eq!(t.peers[&b].outstanding.len(), OUTSTANDING);
        assert!(!t.record_reply(b, first, 100 * 250 * MS), "forgotten");
        assert_eq!(t.peers[&b].sent, OUTSTANDING as u64 + 10);
    }

    #[test]
    fn peers_follow_the_routes() {
        let b = router("10.2.0.254", "b", "192.168.0.2");
        let c = router("10.3.0.254", "c", "192.168.0.3");
        let mut t = table(&[b.clone(), c.clone()]);
        let now = 0;
        for (p, seq) in round(&mut t, now) {
            t.record_reply(p, seq, now + 10);
        }
        t.refresh(now + 10);
        assert!(!t.set_peers(&[b.clone(), c.clone()]), "same set");
        // Duplicates for one address: the first wins.
        assert!(!t.set_peers(&[b.clone(), router("10.2.0.254", "x", "1.1.1.1"), c.clone()]));

        // c goes away: dropped. b moves to another host: starts over.
        let b2 = router("10.2.0.254", "b", "192.168.0.9");
        assert!(t.set_peers(&[b2]));
        let s = t.snapshot(now + 10, 1_000);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].host, ip("192.168.0.9"));
        assert_eq!((s[0].sent, s[0].received, s[0].reachable), (0, 0, false));
        assert_eq!(s[0].last_ok_ms, None);

        // A reply to a request made before the peer was replaced is ignored.
        assert!(!t.record_reply(ip("10.2.0.254"), 100, now + 20));
        assert!(t.set_peers(&[]));
        assert!(t.is_empty());
    }

    /// The IO part on loopback (no root needed): two routers answer each other, a
    /// third address answers nothing, and the files say so.
    #[tokio::test]
    async fn two_routers_on_loopback_see_each_other() {
        let dir = std::env::temp_dir().join(format!(
            "vrouter-router-overlay-probe-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (a_ip, b_ip, dead_ip) = (ip("127.77.0.1"), ip("127.77.0.2"), ip("127.77.0.3"));
        let config = |stack: &str, router_ip| ProbeConfig {
            stack: StackName::new(stack).unwrap(),
            router_ip,
            state_dir: dir.clone(),
            interval: Duration::from_millis(50),
            traffic: None,
            loop_heartbeat: None,
            acl: None,
        };
        let (a_tx, a_rx) = watch::channel(BTreeSet::from([
            router("127.77.0.2", "b", "192.168.0.2"),
            router("127.77.0.3", "dead", "192.168.0.3"),
        ]));
        let (b_tx, b_rx) = watch::channel(BTreeSet::new());
        // Loopback's MTU is 65536: probe at 1400, an overlay MTU.
        let report = |installed| {
            Some(HealthReport {
                health: RouterHealth {
                    routes_desired: 2,
                    routes_installed: installed,
                    drift_repaired: 0,
                    overlay_link_up: true,
                    last_error: None,
                    traffic_error: None,
                    reconciled_ms: None,
                    acl: None,
                },
                overlay_mtu: Some(1400),
            })
        };
        let (a_health, a_health_rx) = watch::channel(report(2));
        let (_b_health, b_health_rx) = watch::channel(None);
        let a = tokio::spawn(run(config("a", a_ip), a_rx, a_health_rx));
        let b = tokio::spawn(run(config("b", b_ip), b_rx, b_health_rx));
        // b learns of a later, as after a routes.json change.
        b_tx.send_replace(BTreeSet::from([router("127.77.0.1", "a", "192.168.0.1")]));

        let state = StateDir::open_readonly(&dir).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let files = loop {
            let files = state.read_all_probes();
            let reachable = |stack: &str, peer: Ipv4Addr| {
                files.iter().any(|f| {
                    f.stack.as_str() == stack
                        && f.peers.iter().any(|p| p.router_ip == peer && p.reachable)
                })
            };
            let dead_probed = files.iter().any(|f| {
                f.stack.as_str() == "a"
                    && f.peers
                        .iter()
                        .any(|p| p.router_ip == dead_ip && p.sent >= 5)
            });
            // b answers the full-size probes at the full size.
            let mtu_ok = files.iter().any(|f| {
                f.stack.as_str() == "a"
                    && f.peers.iter().any(|p| {
                        p.router_ip == b_ip
                            && p.mtu.as_ref().is_some_and(|m| m.ok && m.size == 1400)
                    })
            });
            if reachable("a", b_ip) && reachable("b", a_ip) && dead_probed && mtu_ok {
                break files;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no convergence: {files:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let fa = files.iter().find(|f| f.stack.as_str() == "a").unwrap();
        assert_eq!(fa.interval_ms, 50);
        let pb = fa.peers.iter().find(|p| p.router_ip == b_ip).unwrap();
        assert_eq!(pb.host, ip("192.168.0.2"));
        assert!(pb.received > 0 && pb.rtt_us.is_some() && pb.last_ok_ms.is_some());
        assert!(pb.srtt_us.is_some() && pb.recent_sent > 0);
        let pd = fa.peers.iter().find(|p| p.router_ip == dead_ip).unwrap();
        assert!(!pd.reachable && pd.received == 0 && pd.last_ok_ms.is_none());
        assert!(pd.recent_lost > 0 && pd.recent_lost == pd.recent_sent);
        assert_eq!(pd.mtu, None, "no MTU check without small answers");
        // The router's health is in the file; b, with none reported, writes none.
        assert_eq!(fa.health, report(2).map(|r| r.health));
        let fb = files.iter().find(|f| f.stack.as_str() == "b").unwrap();
        assert_eq!(fb.health, None);

        // A health change is written at once.
        a_health.send_replace(report(1));
        loop {
            let fa = state
                .read_all_probes()
                .into_iter()
                .find(|f| f.stack.as_str() == "a")
                .unwrap();
            if fa.health.as_ref().is_some_and(|h| h.routes_installed == 1) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{fa:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // A peer leaves the routes: it leaves the file.
        a_tx.send_replace(BTreeSet::from([router("127.77.0.2", "b", "192.168.0.2")]));
        loop {
            let fa = state
                .read_all_probes()
                .into_iter()
                .find(|f| f.stack.as_str() == "a")
                .unwrap();
            if fa.peers.len() == 1 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{fa:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // The tasks end with their senders.
        drop((a_tx, b_tx, a_health));
        a.await.unwrap();
        b.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The traffic counters go into the file, and keep it fresh without any overlay
    /// peer (a stack whose remote stacks are all on the same host).
    #[tokio::test]
    async fn traffic_is_written_without_peers() {
        let dir = std::env::temp_dir().join(format!(
            "vrouter-router-overlay-traffic-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let report = |bytes, error: Option<&str>| TrafficReport {
            stacks: vec![vrouter_state::StackTraffic {
                stack: StackName::new("c").unwrap(),
                tx_bytes: bytes,
                tx_packets: 1,
                rx_bytes: 0,
                rx_packets: 0,
            }],
            error: error.map(str::to_string),
        };
        let (traffic_tx, traffic_rx) = watch::channel(report(100, None));
        let (peers_tx, peers_rx) = watch::channel(BTreeSet::new());
        let (_health_tx, health_rx) = watch::channel(Some(HealthReport {
            health: RouterHealth {
                routes_desired: 0,
                routes_installed: 0,
                drift_repaired: 0,
                overlay_link_up: true,
                last_error: None,
                traffic_error: None,
                reconciled_ms: None,
                acl: None,
            },
            overlay_mtu: Some(1400),
        }));
        let config = ProbeConfig {
            stack: StackName::new("a").unwrap(),
            router_ip: ip("127.77.1.1"),
            state_dir: dir.clone(),
            interval: Duration::from_millis(50),
            traffic: Some(traffic_rx),
            loop_heartbeat: None,
            acl: None,
        };
        let task = tokio::spawn(run(config, peers_rx, health_rx));
        let state = StateDir::open_readonly(&dir).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        // The counters go into the file, and the counting error into its health.
        for (bytes, error) in [(100, None), (5000, Some("no nf_tables"))] {
            traffic_tx.send_replace(report(bytes, error));
            loop {
                let file = state.read_all_probes().into_iter().next();
                if file.as_ref().is_some_and(|f| {
                    f.traffic == report(bytes, error).stacks
                        && f.health.as_ref().map(|h| h.traffic_error.as_deref()) == Some(error)
                }) {
                    break;
                }
                assert!(tokio::time::Instant::now() < deadline, "{file:#?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        drop(peers_tx);
        task.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn write_policy() {
        let period = 1_000 * MS;
        let mut w = WritePolicy::default();
        assert!(w.due(0, period), "first write");
        w.written(0);
        assert!(!w.due(500 * MS, period));
        assert!(
            w.due(1_000 * MS, period),
            "counters and health, once per period"
        );
        w.mark_urgent();
        assert!(w.due(500 * MS, period), "a change is written at once");
        w.written(500 * MS);
        assert!(!w.due(1_400 * MS, period));
        // Peers or not: the file carries the router's health and shows it is alive.
        assert!(w.due(1_500 * MS, period));
    }
}
