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
//!   every installed route on another host) and matches the replies by sequence;
//! - it writes `probes/<stack>.json` ([`ProbesFile`]) when a peer's reachability
//!   changes or the set of peers does, and otherwise at most once per second.
//!
//! Wire format (17 bytes, big-endian): kind (1 = request, 2 = reply), sequence (u64),
//! the requester's timestamp (u64, echoed unchanged). A reply is the request with the
//! kind swapped. Anything else is ignored.
//!
//! [`ProbeTable`] is the pure part (a clock in microseconds is passed in); [`run`] owns
//! the socket and the writes.

use crate::desired::RemoteRouter;
use crate::traffic::TrafficReport;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vrouter_state::{
    now_ms, PeerProbe, ProbesFile, StackName, StateDir, OVERLAY_PROBE_PORT, SCHEMA_VERSION,
};

/// Time between requests to each peer.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// A peer is reachable while its last answer is younger than this many intervals.
pub const REACH_INTERVALS: u64 = 3;
/// Without a reachability change, the file is rewritten at most this often (and at
/// least this often while there are peers: discovery ignores a stale file).
pub const WRITE_EVERY: Duration = Duration::from_secs(1);
/// Requests remembered per peer awaiting a reply; older ones are forgotten and their
/// late replies ignored.
pub const OUTSTANDING: usize = 16;

/// Size of every probe datagram.
pub const PACKET_LEN: usize = 17;
const KIND_REQUEST: u8 = 1;
const KIND_REPLY: u8 = 2;

/// A request or a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    Reply,
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
        };
        b[1..9].copy_from_slice(&self.seq.to_be_bytes());
        b[9..17].copy_from_slice(&self.sent_us.to_be_bytes());
        b
    }

    /// None for anything but a well-formed 17-byte request or reply.
    pub fn decode(b: &[u8]) -> Option<Packet> {
        let b: &[u8; PACKET_LEN] = b.try_into().ok()?;
        let kind = match b[0] {
            KIND_REQUEST => Kind::Request,
            KIND_REPLY => Kind::Reply,
            _ => return None,
        };
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(x)
        };
        Some(Packet {
            kind,
            seq: u64_at(1),
            sent_us: u64_at(9),
        })
    }

    /// The answer to a request; None for a reply (replies are never answered).
    pub fn answer(&self) -> Option<Packet> {
        (self.kind == Kind::Request).then_some(Packet {
            kind: Kind::Reply,
            ..*self
        })
    }
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
    sent: u64,
    received: u64,
    /// As of the last [`ProbeTable::refresh`].
    reachable: bool,
}

/// Per-peer probe bookkeeping. Pure: every method takes the time, in microseconds
/// on a monotonic clock with any origin.
#[derive(Debug, Clone)]
pub struct ProbeTable {
    interval_us: u64,
    reach_window_us: u64,
    next_seq: u64,
    peers: BTreeMap<Ipv4Addr, PeerState>,
}

impl ProbeTable {
    /// `first_seq` should differ between runs (the wall clock will do), so replies to
    /// a previous process's requests do not match.
    pub fn new(interval: Duration, first_seq: u64) -> ProbeTable {
        let interval_us = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
        ProbeTable {
            interval_us,
            reach_window_us: interval_us.saturating_mul(REACH_INTERVALS),
            next_seq: first_seq,
            peers: BTreeMap::new(),
        }
    }

    pub fn interval(&self) -> Duration {
        Duration::from_micros(self.interval_us)
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
                    sent: 0,
                    received: 0,
                    reachable: false,
                }
            });
        }
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
        p.rtt_us = Some(now_us.saturating_sub(sent_us));
        p.last_ok_us = Some(p.last_ok_us.map_or(now_us, |t| t.max(now_us)));
        p.received += 1;
        true
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
        self.peers
            .iter()
            .map(|(ip, p)| PeerProbe {
                router_ip: *ip,
                stack: p.stack.clone(),
                host: p.host,
                last_ok_ms: p
                    .last_ok_us
                    .map(|t| wall_ms.saturating_sub(now_us.saturating_sub(t) / 1000)),
                rtt_us: p.rtt_us,
                sent: p.sent,
                received: p.received,
                reachable: p.reachable,
                srtt_us: None,
                recent_sent: 0,
                recent_lost: 0,
                mtu: None,
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

/// When to write the probes file. Pure.
#[derive(Debug, Clone, Default)]
pub struct WritePolicy {
    last_write_us: Option<u64>,
    /// Something changed that must be written without waiting for the period.
    urgent: bool,
    /// The last write had no peers (then nothing is rewritten until peers appear).
    wrote_empty: bool,
}

impl WritePolicy {
    /// A reachability or peer-set change: write at the next chance.
    pub fn mark_urgent(&mut self) {
        self.urgent = true;
    }

    pub fn due(&self, now_us: u64, has_peers: bool, period_us: u64) -> bool {
        match self.last_write_us {
            None => true,
            Some(_) if self.urgent => true,
            Some(_) if !has_peers && self.wrote_empty => false,
            Some(t) => now_us.saturating_sub(t) >= period_us,
        }
    }

    pub fn written(&mut self, now_us: u64, had_peers: bool) {
        self.last_write_us = Some(now_us);
        self.urgent = false;
        self.wrote_empty = !had_peers;
    }
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
}

/// The probe task: answers probes, probes the remote routers in `peers`, and writes
/// the results. Ends when `peers`' sender is dropped.
pub async fn run(config: ProbeConfig, mut peers: watch::Receiver<BTreeSet<RemoteRouter>>) {
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
        state,
        config,
    };
    task.table.set_peers(peers.borrow_and_update().iter());

    let mut interval = tokio::time::interval(task.config.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = [0u8; 64];
    loop {
        let socket = task.socket.clone();
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
            received = recv(socket.as_deref(), &mut buf) => {
                task.on_datagram(received, &buf, clock())
            }
        }
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
}

impl ProbeTask {
    fn bind(&mut self) {
        let addr = SocketAddrV4::new(self.config.router_ip, OVERLAY_PROBE_PORT);
        let bound = std::net::UdpSocket::bind(addr).and_then(|s| {
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

    fn tick(&mut self, now_us: u64) {
        if self.socket.is_none() {
            self.bind();
        }
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
        self.maybe_write(now_us);
        let Some(socket) = self.socket.clone() else {
            return;
        };
        for peer in self.table.peer_ips() {
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
            Kind::Request => {
                let Some(socket) = &self.socket else { return };
                let answer = packet.answer().expect("a request has an answer");
                if let Err(e) = socket.try_send_to(&answer.encode(), SocketAddr::V4(from)) {
                    tracing::debug!(%from, error = %e, "overlay probe answer not sent");
                }
            }
            Kind::Reply => {
                if from.port() == OVERLAY_PROBE_PORT
                    && self.table.record_reply(*from.ip(), packet.seq, now_us)
                    && self.table.is_reachable(*from.ip()) == Some(false)
                {
                    // Report recovery at once rather than at the next tick.
                    self.tick_refresh(now_us);
                }
            }
        }
    }

    /// Refreshes reachability outside the tick (a first answer) and writes if due.
    fn tick_refresh(&mut self, now_us: u64) {
        for (peer, reachable) in self.table.refresh(now_us) {
            if reachable {
                tracing::info!("overlay probes: {} answers", self.table.describe(peer));
            }
            self.policy.mark_urgent();
        }
        self.maybe_write(now_us);
    }

    /// Writes the probes file if the policy says so and no write is in flight (then
    /// the next chance writes).
    fn maybe_write(&mut self, now_us: u64) {
        if self.writer.as_ref().is_some_and(|w| !w.is_finished()) {
            return;
        }
        let traffic = self
            .config
            .traffic
            .as_ref()
            .map(|t| t.borrow().stacks.clone())
            .unwrap_or_default();
        // Counted traffic keeps the file fresh even without overlay peers (same-host
        // stacks only).
        let has_peers = !self.table.is_empty() || !traffic.is_empty();
        let period_us = u64::try_from(WRITE_EVERY.as_micros()).unwrap_or(u64::MAX);
        if !self.policy.due(now_us, has_peers, period_us) {
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
            health: None,
            traffic,
        };
        self.policy.written(now_us, has_peers);
        let state = Arc::clone(&self.state);
        self.writer = Some(tokio::task::spawn_blocking(move || {
            if let Err(e) = state.write_probes(&file) {
                tracing::warn!(error = %e, "overlay probes: cannot write the results");
            }
        }));
    }
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
        for kind in [0u8, 3, 0xff] {
            bad[0] = kind;
            assert_eq!(Packet::decode(&bad), None);
        }
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
                srtt_us: None,
                recent_sent: 0,
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
        };
        let (a_tx, a_rx) = watch::channel(BTreeSet::from([
            router("127.77.0.2", "b", "192.168.0.2"),
            router("127.77.0.3", "dead", "192.168.0.3"),
        ]));
        let (b_tx, b_rx) = watch::channel(BTreeSet::new());
        let a = tokio::spawn(run(config("a", a_ip), a_rx));
        let b = tokio::spawn(run(config("b", b_ip), b_rx));
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
            if reachable("a", b_ip) && reachable("b", a_ip) && dead_probed {
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
        let pd = fa.peers.iter().find(|p| p.router_ip == dead_ip).unwrap();
        assert!(!pd.reachable && pd.received == 0 && pd.last_ok_ms.is_none());

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
        drop((a_tx, b_tx));
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
        let report = |bytes| TrafficReport {
            stacks: vec![vrouter_state::StackTraffic {
                stack: StackName::new("c").unwrap(),
                tx_bytes: bytes,
                tx_packets: 1,
                rx_bytes: 0,
                rx_packets: 0,
            }],
            error: None,
        };
        let (traffic_tx, traffic_rx) = watch::channel(report(100));
        let (peers_tx, peers_rx) = watch::channel(BTreeSet::new());
        let config = ProbeConfig {
            stack: StackName::new("a").unwrap(),
            router_ip: ip("127.77.1.1"),
            state_dir: dir.clone(),
            interval: Duration::from_millis(50),
            traffic: Some(traffic_rx),
        };
        let task = tokio::spawn(run(config, peers_rx));
        let state = StateDir::open_readonly(&dir).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for bytes in [100, 5000] {
            traffic_tx.send_replace(report(bytes));
            loop {
                let file = state.read_all_probes().into_iter().next();
                if file
                    .as_ref()
                    .is_some_and(|f| f.traffic == report(bytes).stacks)
                {
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
        assert!(w.due(0, false, period), "first write");
        w.written(0, true);
        assert!(!w.due(500 * MS, true, period));
        assert!(w.due(1_000 * MS, true, period), "counters, once per period");
        w.mark_urgent();
        assert!(w.due(500 * MS, true, period), "a change is written at once");
        w.written(500 * MS, false);
        // Without peers the empty file is written once, then left alone.
        assert!(!w.due(10_000 * MS, false, period));
        assert!(w.due(10_000 * MS, true, period));
        w.mark_urgent();
        assert!(w.due(10_000 * MS, false, period));
    }
}
