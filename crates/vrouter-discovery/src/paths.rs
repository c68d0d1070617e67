//! Which way this host's overlay traffic takes to each gossip peer: directly, through a
//! relay host, or nowhere better than the direct row (unreachable). Pure: the inputs
//! are the gossip members' records and this host's path probes (`Node::paths`); the
//! controller turns the decision into FDB destinations ([`fdb_destinations`]).
//!
//! Rules (issue 17):
//! - Direct while the probe view is reachable, or not decided yet (no view, or never
//!   acked and probing for less than `dead_after_ms`). A relayed peer goes back to
//!   direct only once its view has been reachable for [`RETURN_HOLD_MS`].
//! - Otherwise through a relay R (not this host, not the peer, alive or suspect, R's
//!   record lists the peer as reached, this host's view of R reachable), chosen by
//!   score = this host's RTT to R + R's RTT to the peer; the current relay is kept
//!   while it stays a candidate unless another scores under half of it and at least
//!   2 ms lower; ties go to the lower node id.
//! - Otherwise unreachable: `nat_port_translated` when either side is behind a
//!   port-translating NAT and the pair is not encrypted, else `no_relay`. The direct
//!   FDB row stays (nothing better exists).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use vrouter_gossip::NodeId;
use vrouter_state::{PeerHost, Vni};

/// How long a relayed peer's direct path must have been reachable before traffic goes
/// back to it.
pub const RETURN_HOLD_MS: u64 = 2000;
/// A new relay must score under this fraction of the current one...
const SWITCH_FACTOR_NUM: u64 = 1;
const SWITCH_FACTOR_DEN: u64 = 2;
/// ...and at least this much lower (µs).
const SWITCH_MIN_GAIN_US: u64 = 2000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Direct,
    Relay { node: NodeId, addr: Ipv4Addr },
    Unreachable { code: &'static str },
}

impl Via {
    pub fn name(&self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Relay { .. } => "relay",
            Via::Unreachable { .. } => "unreachable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPath {
    pub node: NodeId,
    /// The address the peer announces (its record's underlay).
    pub peer_addr: Ipv4Addr,
    /// The address this host sends to for it: the probed candidate in use when
    /// reachable, else the announced one.
    pub addr_in_use: Ipv4Addr,
    pub via: Via,
    /// Direct: the probes' RTT; relayed: this host's RTT to the relay plus the relay's.
    pub rtt_us: Option<u32>,
    /// Monotonic ms when `via` last changed.
    pub since_ms: u64,
}

/// One gossip member as the decision needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub node: NodeId,
    /// Its record's underlay address.
    pub underlay: Ipv4Addr,
    /// Its record's gossip address (its local candidate).
    pub gossip_addr: Option<SocketAddrV4>,
    /// Alive or suspect (down, left or unknown members are neither targets nor relays).
    pub alive: bool,
    /// VNIs of its stacks.
    pub vnis: BTreeSet<Vni>,
    /// Its record's relay offer: the nodes it reaches directly, with its RTT in ms.
    pub relay: Option<Vec<(NodeId, u16)>>,
    /// Its record says it is behind a port-translating NAT.
    pub port_translated: bool,
    /// Traffic between this host and it is encrypted (WireGuard).
    pub encrypted: bool,
}

impl Default for Member {
    fn default() -> Member {
        Member {
            node: NodeId(0),
            underlay: Ipv4Addr::UNSPECIFIED,
            gossip_addr: None,
            alive: false,
            vnis: BTreeSet::new(),
            relay: None,
            port_translated: false,
            encrypted: false,
        }
    }
}

/// This host's probe view of one target (the parts of `vrouter_gossip::PathView` the
/// decision reads).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct View {
    pub reachable: bool,
    pub addr: Option<SocketAddrV4>,
    pub rtt_us: Option<u32>,
    pub since_ms: u64,
    pub acked_ever: bool,
}

/// The nodes to probe: alive or suspect members whose stacks share a VNI with a local
/// stack, members offering to relay, and with `relay_on` every member with stacks.
pub fn targets(
    me: NodeId,
    relay_on: bool,
    local_vnis: &BTreeSet<Vni>,
    members: &[Member],
) -> BTreeSet<NodeId> {
    members
        .iter()
        .filter(|m| m.node != me && m.alive)
        .filter(|m| {
            m.relay.is_some()
                || m.vnis.iter().any(|v| local_vnis.contains(v))
                || (relay_on && !m.vnis.is_empty())
        })
        .map(|m| m.node)
        .collect()
}

pub struct Inputs<'a> {
    pub me: NodeId,
    pub now_ms: u64,
    pub dead_after_ms: u64,
    pub members: &'a [Member],
    pub views: &'a BTreeMap<NodeId, View>,
    /// The previous decision (hysteresis, return hold, `since_ms`).
    pub previous: &'a BTreeMap<NodeId, PeerPath>,
    /// This host's own reflection says it is behind a port-translating NAT.
    pub own_port_translated: bool,
    /// Peers that see this host at its local address (inside its NAT).
    pub inside: &'a BTreeSet<NodeId>,
    /// The probe targets (from [`targets`]): one path each for those with stacks.
    pub targets: &'a BTreeSet<NodeId>,
}

/// The path to each target that has stacks.
pub fn decide(i: &Inputs) -> BTreeMap<NodeId, PeerPath> {
    let by_id: BTreeMap<NodeId, &Member> = i.members.iter().map(|m| (m.node, m)).collect();
    let mut out = BTreeMap::new();
    for id in i.targets {
        let Some(m) = by_id.get(id) else { continue };
        if m.vnis.is_empty() || *id == i.me {
            continue;
        }
        let view = i.views.get(id);
        let prev = i.previous.get(id);
        let reachable = view.is_some_and(|v| v.reachable);
        let undecided = undecided(view, i.now_ms, i.dead_after_ms);
        let addr_in_use = view
            .filter(|v| v.reachable)
            .and_then(|v| v.addr)
            .map(|a| *a.ip())
            .unwrap_or(m.underlay);
        let prev_relay = match prev.map(|p| p.via) {
            Some(Via::Relay { node, .. }) => Some(node),
            _ => None,
        };
        let candidates = relay_candidates(i, &by_id, *id);
        let holding =
            reachable && view.is_some_and(|v| i.now_ms.saturating_sub(v.since_ms) < RETURN_HOLD_MS);
        // Plain VXLAN cannot cross a port-translating NAT: packets go to the announced
        // port, not the mapped one. Probes may still answer (through the mapping the
        // gossip traffic keeps open), so such a pair is unreachable unless it is
        // encrypted (WireGuard keeps its mapping open from inside) or the two are on
        // the same side: the peer reached at its own address, and this host seen at
        // its own address by the peer (its reflection reports) or both behind such a
        // NAT. A relay does not help either (it sends VXLAN to the same NAT).
        let at_own_addr = reachable && addr_in_use == m.underlay;
        let peer_nat = m.port_translated && !at_own_addr;
        let own_nat =
            i.own_port_translated && !i.inside.contains(id) && !(at_own_addr && m.port_translated);
        let nat_blocked = !m.encrypted && (peer_nat || own_nat) && !undecided;
        let (via, rtt_us) = if let (true, Some(p)) = (undecided, prev) {
            // Not decided yet: a restart (the previous run's decision seeds `previous`)
            // keeps the way it had while the probes start.
            (p.via, p.rtt_us)
        } else if nat_blocked {
            (
                Via::Unreachable {
                    code: "nat_port_translated",
                },
                None,
            )
        } else if (reachable || undecided)
            && !(holding && prev_relay.is_some_and(|r| candidates.contains_key(&r)))
        {
            (Via::Direct, view.and_then(|v| v.rtt_us))
        } else if let Some((r, score)) = choose(&candidates, prev_relay) {
            let addr = relay_addr(i, &by_id, r);
            (
                Via::Relay { node: r, addr },
                Some(score.min(u32::MAX as u64) as u32),
            )
        } else if reachable {
            (Via::Direct, view.and_then(|v| v.rtt_us))
        } else {
            let nat = i.own_port_translated || m.port_translated;
            let code = if nat && !m.encrypted {
                "nat_port_translated"
            } else {
                "no_relay"
            };
            (Via::Unreachable { code }, None)
        };
        let since_ms = match prev {
            Some(p) if same_way(&p.via, &via) => p.since_ms,
            _ => i.now_ms,
        };
        out.insert(
            *id,
            PeerPath {
                node: *id,
                peer_addr: m.underlay,
                addr_in_use,
                via,
                rtt_us,
                since_ms,
            },
        );
    }
    out
}

/// When the decision may change with no new input (monotonic ms): an undecided view
/// reaching `dead_after_ms`, or a relayed peer's return hold running out.
pub fn next_due(i: &Inputs, decided: &BTreeMap<NodeId, PeerPath>) -> Option<u64> {
    let mut due: Option<u64> = None;
    for (id, p) in decided {
        let Some(v) = i.views.get(id) else { continue };
        let at = if !v.reachable && !v.acked_ever {
            v.since_ms + i.dead_after_ms
        } else if matches!(p.via, Via::Relay { .. }) && v.reachable {
            v.since_ms + RETURN_HOLD_MS
        } else {
            continue;
        };
        if at > i.now_ms {
            due = Some(due.map_or(at, |d| d.min(at)));
        }
    }
    due
}

/// The previous run's decisions from discovery.json's `paths`, to seed the first
/// decision after a restart (see [`decide`]: an undecided peer keeps its way). Only
/// relayed paths matter (the rest start direct anyway); times restart at 0.
pub fn from_status(paths: &[vrouter_state::PathStatus]) -> BTreeMap<NodeId, PeerPath> {
    paths
        .iter()
        .filter(|p| p.via == "relay")
        .filter_map(|p| {
            let node: NodeId = p.node.parse().ok()?;
            let relay: NodeId = p.relay_node.as_deref()?.parse().ok()?;
            Some((
                node,
                PeerPath {
                    node,
                    peer_addr: p.peer_addr,
                    addr_in_use: p.addr_in_use,
                    via: Via::Relay {
                        node: relay,
                        addr: p.relay_addr?,
                    },
                    rtt_us: p.rtt_ms.map(|ms| (ms * 1000.0) as u32),
                    since_ms: 0,
                },
            ))
        })
        .collect()
}

/// What changed for one peer between two decisions (events are written for these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The address this host sends to for it moved.
    AddressInUse { old: Ipv4Addr },
    /// It goes another way (a peer seen for the first time counts as direct before).
    Way { before: Via },
}

/// The changes from `previous` to `decided`, per peer, in node order (an address
/// change first).
pub fn changes(
    previous: &BTreeMap<NodeId, PeerPath>,
    decided: &BTreeMap<NodeId, PeerPath>,
) -> Vec<(NodeId, Change)> {
    let mut out = Vec::new();
    for (id, p) in decided {
        let prev = previous.get(id);
        if let Some(old) = prev.filter(|o| o.addr_in_use != p.addr_in_use) {
            out.push((
                *id,
                Change::AddressInUse {
                    old: old.addr_in_use,
                },
            ));
        }
        let before = prev.map(|o| o.via).unwrap_or(Via::Direct);
        if !same_way(&before, &p.via) {
            out.push((*id, Change::Way { before }));
        }
    }
    out
}

/// Same kind and, for a relay, the same relay (its address may move).
fn same_way(a: &Via, b: &Via) -> bool {
    match (a, b) {
        (Via::Relay { node: x, .. }, Via::Relay { node: y, .. }) => x == y,
        _ => a == b,
    }
}

/// The address this host sends to for relay `r`: its probed address in use.
fn relay_addr(i: &Inputs, by_id: &BTreeMap<NodeId, &Member>, r: NodeId) -> Ipv4Addr {
    i.views
        .get(&r)
        .filter(|v| v.reachable)
        .and_then(|v| v.addr)
        .map(|a| *a.ip())
        .or_else(|| by_id.get(&r).map(|m| m.underlay))
        .unwrap_or(Ipv4Addr::UNSPECIFIED)
}

/// Relays that can carry traffic to `peer`, with their score in µs.
fn relay_candidates(
    i: &Inputs,
    by_id: &BTreeMap<NodeId, &Member>,
    peer: NodeId,
) -> BTreeMap<NodeId, u64> {
    let mut out = BTreeMap::new();
    for (rid, r) in by_id {
        if *rid == i.me || *rid == peer || !r.alive {
            continue;
        }
        let Some(reach) = &r.relay else { continue };
        let Some((_, rtt_ms)) = reach.iter().find(|(n, _)| *n == peer) else {
            continue;
        };
        let Some(v) = i.views.get(rid).filter(|v| v.reachable) else {
            continue;
        };
        let mine = u64::from(v.rtt_us.unwrap_or(0));
        out.insert(*rid, mine + u64::from(*rtt_ms) * 1000);
    }
    out
}

/// The best candidate (lowest score, then lowest id), keeping `current` while it is a
/// candidate unless the best scores under half of it and at least 2 ms lower.
fn choose(candidates: &BTreeMap<NodeId, u64>, current: Option<NodeId>) -> Option<(NodeId, u64)> {
    let best = candidates
        .iter()
        .min_by_key(|(id, s)| (**s, **id))
        .map(|(id, s)| (*id, *s))?;
    if let Some((cur, cur_score)) = current.and_then(|c| candidates.get(&c).map(|s| (c, *s))) {
        let much_better = best.1 * SWITCH_FACTOR_DEN < cur_score * SWITCH_FACTOR_NUM
            && best.1 + SWITCH_MIN_GAIN_US <= cur_score;
        if !much_better {
            return Some((cur, cur_score));
        }
    }
    Some(best)
}

/// Where VXLAN packets for each peer host's stacks go (keyed by the host's announced
/// address, as `PeerHost::addr`): direct and unreachable peers at their tunnel address
/// (encrypted) or their address in use; relayed peers at the relay's tunnel address or
/// its address in use. Peers without a path (static peers, peers not probed yet) keep
/// their tunnel address or announced address.
pub fn fdb_destinations(
    peers: &[PeerHost],
    paths: &BTreeMap<NodeId, PeerPath>,
    members: &[Member],
    tunnel: &BTreeMap<Ipv4Addr, Ipv4Addr>,
) -> BTreeMap<Ipv4Addr, Ipv4Addr> {
    let underlay: BTreeMap<NodeId, Ipv4Addr> =
        members.iter().map(|m| (m.node, m.underlay)).collect();
    let mut out = BTreeMap::new();
    for p in peers {
        let path = p
            .node
            .as_deref()
            .and_then(|n| n.parse::<NodeId>().ok())
            .and_then(|n| paths.get(&n));
        let dst = match path {
            None => tunnel.get(&p.addr).copied().unwrap_or(p.addr),
            Some(PeerPath {
                via: Via::Relay { node, addr },
                ..
            }) => underlay
                .get(node)
                .and_then(|u| tunnel.get(u))
                .copied()
                .unwrap_or(*addr),
            Some(path) => tunnel.get(&p.addr).copied().unwrap_or(path.addr_in_use),
        };
        out.insert(p.addr, dst);
    }
    out
}

/// Whether `view` has not decided anything yet: none, or never acked and probing for
/// less than `dead_after_ms`.
fn undecided(view: Option<&View>, now_ms: u64, dead_after_ms: u64) -> bool {
    match view {
        None => true,
        Some(v) => {
            !v.reachable && !v.acked_ever && now_ms.saturating_sub(v.since_ms) < dead_after_ms
        }
    }
}

/// The peer hosts (announced addresses) a relay forwards to: alive members its probes
/// reach, or not decided yet (as for the path decision: right after a restart the
/// relay keeps forwarding). Its own FDB rows for them are direct, so a frame is never
/// relayed twice.
pub fn direct_hosts(
    members: &[Member],
    views: &BTreeMap<NodeId, View>,
    now_ms: u64,
    dead_after_ms: u64,
) -> BTreeSet<Ipv4Addr> {
    members
        .iter()
        .filter(|m| {
            let v = views.get(&m.node);
            m.alive && (v.is_some_and(|v| v.reachable) || undecided(v, now_ms, dead_after_ms))
        })
        .map(|m| m.underlay)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vrouter_state::PeerOrigin;

    const ME: NodeId = NodeId(1);
    const A: NodeId = NodeId(0xa);
    const B: NodeId = NodeId(0xb);
    const R1: NodeId = NodeId(0x31);
    const R2: NodeId = NodeId(0x32);
    const DEAD: u64 = 2500;

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, n)
    }

    fn member(node: NodeId, n: u8) -> Member {
        Member {
            node,
            underlay: ip(n),
            alive: true,
            vnis: [Vni::new(1000).unwrap()].into(),
            ..Member::default()
        }
    }

    fn relay(node: NodeId, n: u8, reach: &[(NodeId, u16)]) -> Member {
        Member {
            relay: Some(reach.to_vec()),
            vnis: BTreeSet::new(),
            ..member(node, n)
        }
    }

    fn up(n: u8, rtt_ms: u32, since: u64) -> View {
        View {
            reachable: true,
            addr: Some(SocketAddrV4::new(ip(n), 7946)),
            rtt_us: Some(rtt_ms * 1000),
            since_ms: since,
            acked_ever: true,
        }
    }

    fn down(since: u64) -> View {
        View {
            reachable: false,
            addr: None,
            rtt_us: None,
            since_ms: since,
            acked_ever: true,
        }
    }

    struct World {
        members: Vec<Member>,
        views: BTreeMap<NodeId, View>,
        prev: BTreeMap<NodeId, PeerPath>,
        nat: bool,
        inside: BTreeSet<NodeId>,
    }

    impl World {
        fn new(members: Vec<Member>) -> World {
            World {
                members,
                views: BTreeMap::new(),
                prev: BTreeMap::new(),
                nat: false,
                inside: BTreeSet::new(),
            }
        }
        fn decide(&mut self, now: u64) -> BTreeMap<NodeId, PeerPath> {
            let local: BTreeSet<Vni> = [Vni::new(1000).unwrap()].into();
            let t = targets(ME, false, &local, &self.members);
            let out = decide(&Inputs {
                me: ME,
                now_ms: now,
                dead_after_ms: DEAD,
                members: &self.members,
                views: &self.views,
                previous: &self.prev,
                own_port_translated: self.nat,
                inside: &self.inside,
                targets: &t,
            });
            self.prev = out.clone();
            out
        }
        fn via(&mut self, now: u64, id: NodeId) -> Via {
            self.decide(now)[&id].via
        }
    }

    #[test]
    fn targets_share_a_vni_or_offer_relay() {
        let local: BTreeSet<Vni> = [Vni::new(1000).unwrap()].into();
        let mut other = member(B, 3);
        other.vnis = [Vni::new(2000).unwrap()].into();
        let mut gone = member(NodeId(9), 9);
        gone.alive = false;
        let ms = vec![member(A, 2), other, relay(R1, 4, &[]), gone, member(ME, 1)];
        assert_eq!(targets(ME, false, &local, &ms), [A, R1].into());
        // A relay probes every member with stacks.
        assert_eq!(targets(ME, true, &local, &ms), [A, B, R1].into());
        assert!(targets(ME, false, &BTreeSet::new(), &ms[..1]).is_empty());
    }

    #[test]
    fn reachable_is_direct_at_the_probed_address() {
        let mut w = World::new(vec![member(A, 2)]);
        // Probes reach A at its observed (NAT) address, not its announced one.
        let mut v = up(2, 3, 0);
        v.addr = Some(SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 5), 7946));
        w.views.insert(A, v);
        let p = &w.decide(100)[&A];
        assert_eq!(p.via, Via::Direct);
        assert_eq!(p.peer_addr, ip(2));
        assert_eq!(p.addr_in_use, Ipv4Addr::new(203, 0, 113, 5));
        assert_eq!(p.rtt_us, Some(3000));
    }

    #[test]
    fn undecided_is_direct() {
        let mut w = World::new(vec![member(A, 2), relay(R1, 4, &[(A, 1)])]);
        w.views.insert(R1, up(4, 1, 0));
        // No view yet: direct.
        assert_eq!(w.via(0, A), Via::Direct);
        // Probing, never acked, for less than dead_after: still direct.
        let mut v = down(1000);
        v.acked_ever = false;
        w.views.insert(A, v);
        assert_eq!(w.via(1000 + DEAD - 1, A), Via::Direct);
        // Past dead_after without an answer: relayed.
        assert_eq!(
            w.via(1000 + DEAD, A),
            Via::Relay {
                node: R1,
                addr: ip(4)
            }
        );
        assert_eq!(w.decide(1000 + DEAD)[&A].addr_in_use, ip(2));
    }

    #[test]
    fn relay_is_chosen_by_rtt_then_node_id() {
        let mut w = World::new(vec![
            member(A, 2),
            relay(R1, 4, &[(A, 10)]),
            relay(R2, 5, &[(A, 2)]),
        ]);
        w.views.insert(A, down(0));
        w.views.insert(R1, up(4, 1, 0));
        w.views.insert(R2, up(5, 3, 0));
        // R1: 1 + 10 = 11 ms, R2: 3 + 2 = 5 ms.
        let p = &w.decide(5000)[&A];
        assert_eq!(
            p.via,
            Via::Relay {
                node: R2,
                addr: ip(5)
            }
        );
        assert_eq!(p.rtt_us, Some(5000));
        // Equal scores: the lower node id.
        let mut w = World::new(vec![
            member(A, 2),
            relay(R2, 5, &[(A, 2)]),
            relay(R1, 4, &[(A, 2)]),
        ]);
        w.views.insert(A, down(0));
        w.views.insert(R1, up(4, 1, 0));
        w.views.insert(R2, up(5, 1, 0));
        assert!(matches!(w.via(5000, A), Via::Relay { node: R1, .. }));
        // A relay that does not list the peer, or that this host cannot reach, is none.
        let mut w = World::new(vec![
            member(A, 2),
            relay(R1, 4, &[(B, 1)]),
            relay(R2, 5, &[(A, 1)]),
        ]);
        w.views.insert(A, down(0));
        w.views.insert(R1, up(4, 1, 0));
        w.views.insert(R2, down(0));
        assert_eq!(w.via(5000, A), Via::Unreachable { code: "no_relay" });
    }

    #[test]
    fn hysteresis_keeps_the_relay_until_another_is_much_better() {
        let mut w = World::new(vec![
            member(A, 2),
            relay(R1, 4, &[(A, 10)]),
            relay(R2, 5, &[(A, 10)]),
        ]);
        w.views.insert(A, down(0));
        w.views.insert(R1, up(4, 1, 0));
        w.views.insert(R2, up(5, 2, 0));
        assert!(matches!(w.via(5000, A), Via::Relay { node: R1, .. }));
        let since = w.prev[&A].since_ms;
        // R2 becomes better (11 -> 7 ms) but not under half of R1's 11 ms: kept.
        w.members[2].relay = Some(vec![(A, 5)]);
        assert!(matches!(w.via(6000, A), Via::Relay { node: R1, .. }));
        assert_eq!(w.prev[&A].since_ms, since);
        // Under half but less than 2 ms lower is not enough either (tiny RTTs).
        let mut tiny = World::new(vec![
            member(A, 2),
            relay(R1, 4, &[(A, 1)]),
            relay(R2, 5, &[(A, 1)]),
        ]);
        tiny.views.insert(A, down(0));
        tiny.views.insert(R1, up(4, 2, 0));
        tiny.views.insert(R2, up(5, 2, 0));
        assert!(matches!(tiny.via(5000, A), Via::Relay { node: R1, .. }));
        tiny.views.insert(
            R2,
            View {
                rtt_us: Some(100),
                ..up(5, 0, 0)
            },
        );
        // R1 3 ms, R2 1.1 ms: under half but only 1.9 ms lower: kept.
        assert!(matches!(tiny.via(6000, A), Via::Relay { node: R1, .. }));
        // R2 now 11 -> 3 ms against R1's 11: switch.
        w.members[2].relay = Some(vec![(A, 1)]);
        assert!(matches!(w.via(7000, A), Via::Relay { node: R2, .. }));
        assert_eq!(w.prev[&A].since_ms, 7000);
    }

    #[test]
    fn failover_when_the_relay_dies() {
        let mut w = World::new(vec![
            member(A, 2),
            relay(R1, 4, &[(A, 1)]),
            relay(R2, 5, &[(A, 30)]),
        ]);
        w.views.insert(A, down(0));
        w.views.insert(R1, up(4, 1, 0));
        w.views.insert(R2, up(5, 1, 0));
        assert!(matches!(w.via(5000, A), Via::Relay { node: R1, .. }));
        // This host's probes to R1 die: the next decision fails over at once, however
        // much worse R2 scores.
        w.views.insert(R1, down(6000));
        assert_eq!(
            w.via(8500, A),
            Via::Relay {
                node: R2,
                addr: ip(5)
            }
        );
        // Membership says R1 is gone: it is no candidate either.
        w.views.insert(R1, up(4, 1, 0));
        w.members[1].alive = false;
        assert!(matches!(w.via(9000, A), Via::Relay { node: R2, .. }));
        // R2 stops listing A (it lost its own path): unreachable.
        w.members[2].relay = Some(vec![]);
        assert_eq!(w.via(9500, A), Via::Unreachable { code: "no_relay" });
    }

    #[test]
    fn return_to_direct_only_after_the_hold() {
        let mut w = World::new(vec![member(A, 2), relay(R1, 4, &[(A, 1)])]);
        w.views.insert(A, down(0));
        w.views.insert(R1, up(4, 1, 0));
        assert!(matches!(w.via(5000, A), Via::Relay { node: R1, .. }));
        // The direct path answers again at 10 s.
        w.views.insert(A, up(2, 1, 10_000));
        assert!(matches!(
            w.via(10_000 + RETURN_HOLD_MS - 1, A),
            Via::Relay { node: R1, .. }
        ));
        let p = &w.decide(10_000 + RETURN_HOLD_MS)[&A];
        assert_eq!(p.via, Via::Direct);
        assert_eq!(p.since_ms, 10_000 + RETURN_HOLD_MS);
        // Without a relay to hold on to, a reachable path is direct at once.
        let mut w = World::new(vec![member(A, 2)]);
        w.views.insert(A, down(0));
        assert_eq!(w.via(5000, A), Via::Unreachable { code: "no_relay" });
        w.views.insert(A, up(2, 1, 6000));
        assert_eq!(w.via(6000, A), Via::Direct);
    }

    #[test]
    fn next_due_is_the_dead_time_or_the_hold() {
        let mut w = World::new(vec![member(A, 2), relay(R1, 4, &[(A, 1)])]);
        w.views.insert(R1, up(4, 1, 0));
        let mut v = down(1000);
        v.acked_ever = false;
        w.views.insert(A, v);
        let local: BTreeSet<Vni> = [Vni::new(1000).unwrap()].into();
        let t = targets(ME, false, &local, &w.members);
        let due = |w: &World, now| {
            let i = Inputs {
                me: ME,
                now_ms: now,
                dead_after_ms: DEAD,
                members: &w.members,
                views: &w.views,
                previous: &w.prev,
                own_port_translated: false,
                inside: &BTreeSet::new(),
                targets: &t,
            };
            next_due(&i, &w.prev)
        };
        w.decide(1500);
        assert_eq!(due(&w, 1500), Some(1000 + DEAD));
        w.decide(1000 + DEAD);
        assert_eq!(due(&w, 1000 + DEAD), None);
        w.views.insert(A, up(2, 1, 9000));
        w.decide(9500);
        assert_eq!(due(&w, 9500), Some(9000 + RETURN_HOLD_MS));
    }

    #[test]
    fn changes_are_reported_once() {
        let mut w = World::new(vec![member(A, 2), relay(R1, 4, &[(A, 1)])]);
        w.views.insert(R1, up(4, 1, 0));
        w.views.insert(A, up(2, 1, 0));
        let first = w.decide(100);
        // A first decision that is direct is no change.
        assert!(changes(&BTreeMap::new(), &first).is_empty());
        // The peer behind a NAT answers at another address.
        let mut v = up(2, 1, 0);
        v.addr = Some(SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 5), 7946));
        w.views.insert(A, v);
        let moved = w.decide(200);
        assert_eq!(
            changes(&first, &moved),
            vec![(A, Change::AddressInUse { old: ip(2) })]
        );
        assert!(changes(&moved, &moved).is_empty());
        // Relayed: the way changes (and the address in use falls back to the
        // announced one).
        w.views.insert(A, down(300));
        let relayed = w.decide(5000);
        assert_eq!(
            changes(&moved, &relayed),
            vec![
                (
                    A,
                    Change::AddressInUse {
                        old: Ipv4Addr::new(203, 0, 113, 5)
                    }
                ),
                (
                    A,
                    Change::Way {
                        before: Via::Direct
                    }
                )
            ]
        );
        // The relay's address moving is no new way.
        let mut moved_relay = relayed.clone();
        if let Some(p) = moved_relay.get_mut(&A) {
            p.via = Via::Relay {
                node: R1,
                addr: ip(9),
            };
        }
        assert!(changes(&relayed, &moved_relay).is_empty());
        // A peer seen first as unreachable is a change from direct.
        let mut fresh = World::new(vec![member(A, 2)]);
        fresh.views.insert(A, down(0));
        let d = fresh.decide(5000);
        assert_eq!(
            changes(&BTreeMap::new(), &d),
            vec![(
                A,
                Change::Way {
                    before: Via::Direct
                }
            )]
        );
    }

    #[test]
    fn unreachable_without_relay_is_no_relay() {
        let mut w = World::new(vec![member(A, 2)]);
        w.views.insert(A, down(0));
        let p = &w.decide(5000)[&A];
        assert_eq!(p.via, Via::Unreachable { code: "no_relay" });
        assert_eq!(p.addr_in_use, ip(2));
        assert_eq!(p.rtt_us, None);
    }

    #[test]
    fn port_translating_nat_without_encryption_is_named() {
        // The peer is behind it.
        let mut a = member(A, 2);
        a.port_translated = true;
        let mut w = World::new(vec![a.clone()]);
        w.views.insert(A, down(0));
        assert_eq!(
            w.via(5000, A),
            Via::Unreachable {
                code: "nat_port_translated"
            }
        );
        // This host is behind it.
        let mut w = World::new(vec![member(A, 2)]);
        w.nat = true;
        w.views.insert(A, down(0));
        assert_eq!(
            w.via(5000, A),
            Via::Unreachable {
                code: "nat_port_translated"
            }
        );
    }

    #[test]
    fn port_translating_nat_answering_probes_is_still_unreachable_in_the_clear() {
        // The peer is behind it: its probes answer at the learned (mapped) address.
        let mut a = member(A, 2);
        a.port_translated = true;
        a.gossip_addr = Some(SocketAddrV4::new(ip(2), 7946));
        let mapped = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 5), 40001);
        let mut w = World::new(vec![a.clone(), relay(R1, 4, &[(A, 1)])]);
        w.views.insert(R1, up(4, 1, 0));
        w.views.insert(
            A,
            View {
                addr: Some(mapped),
                ..up(2, 1, 0)
            },
        );
        let p = &w.decide(5000)[&A];
        assert_eq!(
            p.via,
            Via::Unreachable {
                code: "nat_port_translated"
            }
        );
        assert_eq!(p.addr_in_use, *mapped.ip());
        // Inside the same NAT its local address answers: direct.
        w.views.insert(A, up(2, 1, 0));
        assert_eq!(w.via(6000, A), Via::Direct);
        // Encrypted: direct through the mapping its tunnel keeps open.
        w.members[0].encrypted = true;
        w.views.insert(
            A,
            View {
                addr: Some(mapped),
                ..up(2, 1, 0)
            },
        );
        assert_eq!(w.via(7000, A), Via::Direct);
        // This host is behind it: peers outside are unreachable in the clear, peers
        // inside (that see this host at its local address) are direct.
        let mut w = World::new(vec![member(A, 2), member(B, 3)]);
        w.nat = true;
        w.inside.insert(B);
        w.views.insert(A, up(2, 1, 0));
        w.views.insert(B, up(3, 1, 0));
        let d = w.decide(5000);
        assert_eq!(
            d[&A].via,
            Via::Unreachable {
                code: "nat_port_translated"
            }
        );
        assert_eq!(d[&B].via, Via::Direct);
    }

    #[test]
    fn port_translating_nat_without_encryption_is_unreachable_although_probes_answer() {
        // The probes answer at the NAT's address (a translated port, kept open by the
        // peer's own gossip): VXLAN to the fixed port would not get through.
        let nat_view = |since| View {
            addr: Some(SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 1), 40123)),
            ..up(2, 1, since)
        };
        let mut a = member(A, 2);
        a.port_translated = true;
        let mut w = World::new(vec![a.clone(), relay(R1, 4, &[(A, 1)])]);
        w.views.insert(R1, up(4, 1, 0));
        w.views.insert(A, nat_view(0));
        assert_eq!(
            w.via(5000, A),
            Via::Unreachable {
                code: "nat_port_translated"
            }
        );
        // This host behind it, the peer public and answering at its own address.
        let mut w = World::new(vec![member(A, 2)]);
        w.nat = true;
        w.views.insert(A, up(2, 1, 0));
        assert_eq!(
            w.via(5000, A),
            Via::Unreachable {
                code: "nat_port_translated"
            }
        );
        // Both behind the same NAT, reached at its own (private) address: direct.
        let mut w = World::new(vec![a.clone()]);
        w.nat = true;
        w.views.insert(A, up(2, 1, 0));
        assert_eq!(w.via(5000, A), Via::Direct);
        // With encryption the tunnel carries it: direct.
        a.encrypted = true;
        let mut w = World::new(vec![a]);
        w.views.insert(A, nat_view(0));
        assert_eq!(w.via(5000, A), Via::Direct);
    }

    #[test]
    fn port_translating_nat_with_encryption_is_fine() {
        let mut a = member(A, 2);
        a.port_translated = true;
        a.encrypted = true;
        let mut w = World::new(vec![a]);
        w.nat = true;
        // Reachable through the tunnel it keeps open: direct.
        w.views.insert(A, up(2, 1, 0));
        assert_eq!(w.via(5000, A), Via::Direct);
        // Not reachable: only "no relay" is wrong, not the NAT.
        w.views.insert(A, down(6000));
        assert_eq!(w.via(9000, A), Via::Unreachable { code: "no_relay" });
    }

    fn peer(n: u8, node: Option<NodeId>) -> PeerHost {
        PeerHost {
            addr: ip(n),
            stacks: Vec::new(),
            source: if node.is_some() {
                PeerOrigin::Gossip
            } else {
                PeerOrigin::Static
            },
            node: node.map(|n| n.to_string()),
            claims: BTreeMap::new(),
            generations: BTreeMap::new(),
            encryption: None,
        }
    }

    #[test]
    fn fdb_destinations_follow_the_path() {
        let members = vec![
            member(A, 2),
            member(B, 3),
            relay(R1, 4, &[(A, 1)]),
            member(NodeId(0xc), 6),
        ];
        let path = |node, via, in_use| PeerPath {
            node,
            peer_addr: ip(0),
            addr_in_use: in_use,
            via,
            rtt_us: None,
            since_ms: 0,
        };
        let nat = Ipv4Addr::new(203, 0, 113, 5);
        let paths: BTreeMap<NodeId, PeerPath> = [
            (A, path(A, Via::Direct, nat)),
            (
                B,
                path(
                    B,
                    Via::Relay {
                        node: R1,
                        addr: Ipv4Addr::new(203, 0, 113, 9),
                    },
                    ip(3),
                ),
            ),
            (
                NodeId(0xc),
                path(NodeId(0xc), Via::Unreachable { code: "no_relay" }, ip(6)),
            ),
        ]
        .into();
        let peers = vec![
            peer(2, Some(A)),
            peer(3, Some(B)),
            peer(6, Some(NodeId(0xc))),
            peer(7, None),
        ];
        let plain = fdb_destinations(&peers, &paths, &members, &BTreeMap::new());
        assert_eq!(plain[&ip(2)], nat); // direct: the address in use
        assert_eq!(plain[&ip(3)], Ipv4Addr::new(203, 0, 113, 9)); // the relay's
        assert_eq!(plain[&ip(6)], ip(6)); // unreachable keeps the direct row
        assert_eq!(plain[&ip(7)], ip(7)); // static: unchanged
        let tunnel: BTreeMap<Ipv4Addr, Ipv4Addr> = [
            (ip(2), Ipv4Addr::new(10, 255, 0, 2)),
            (ip(4), Ipv4Addr::new(10, 255, 0, 4)),
            (ip(7), Ipv4Addr::new(10, 255, 0, 7)),
        ]
        .into();
        let enc = fdb_destinations(&peers, &paths, &members, &tunnel);
        assert_eq!(enc[&ip(2)], Ipv4Addr::new(10, 255, 0, 2));
        assert_eq!(enc[&ip(3)], Ipv4Addr::new(10, 255, 0, 4)); // the relay's tunnel
        assert_eq!(enc[&ip(7)], Ipv4Addr::new(10, 255, 0, 7));
    }

    #[test]
    fn direct_hosts_are_the_reachable_or_undecided_views() {
        let members = vec![member(A, 2), member(B, 3), member(NodeId(0xc), 6)];
        let mut starting = down(1000);
        starting.acked_ever = false;
        let views: BTreeMap<NodeId, View> =
            [(A, up(2, 1, 0)), (B, down(0)), (NodeId(0xc), starting)].into();
        assert_eq!(
            direct_hosts(&members, &views, 2000, DEAD),
            [ip(2), ip(6)].into()
        );
        assert_eq!(
            direct_hosts(&members, &views, 1000 + DEAD, DEAD),
            [ip(2)].into()
        );
    }

    #[test]
    fn the_previous_runs_relayed_paths_seed_a_restart() {
        let status = |via: &str, relay: Option<(&str, Ipv4Addr)>| vrouter_state::PathStatus {
            node: A.to_string(),
            peer_addr: ip(2),
            addr_in_use: ip(2),
            via: via.into(),
            relay_node: relay.map(|r| r.0.to_string()),
            relay_addr: relay.map(|r| r.1),
            rtt_ms: Some(2.5),
            since_ms: 99,
            code: None,
        };
        let seeded = from_status(&[
            status("relay", Some((&R1.to_string(), ip(4)))),
            status("direct", None),
        ]);
        assert_eq!(seeded.len(), 1);
        let p = &seeded[&A];
        assert_eq!(
            p.via,
            Via::Relay {
                node: R1,
                addr: ip(4)
            }
        );
        assert_eq!((p.rtt_us, p.since_ms), (Some(2500), 0));
        assert!(from_status(&[status("relay", Some(("garbage", ip(4))))]).is_empty());
    }

    #[test]
    fn undecided_keeps_the_previous_way_after_a_restart() {
        let mut w = World::new(vec![member(A, 2), relay(R1, 4, &[(A, 1)])]);
        // The previous run relayed A through R1 (seeded from discovery.json).
        w.prev.insert(
            A,
            PeerPath {
                node: A,
                peer_addr: ip(2),
                addr_in_use: ip(2),
                via: Via::Relay {
                    node: R1,
                    addr: ip(4),
                },
                rtt_us: Some(3000),
                since_ms: 0,
            },
        );
        // No views yet: the relay stays.
        assert!(matches!(w.via(10, A), Via::Relay { node: R1, .. }));
        // Probes to A go unanswered, R1 answers: relayed on.
        let mut v = down(0);
        v.acked_ever = false;
        w.views.insert(A, v);
        w.views.insert(R1, up(4, 1, 0));
        assert!(matches!(w.via(DEAD, A), Via::Relay { node: R1, .. }));
        // A answers directly: back to direct after the hold.
        w.views.insert(A, up(2, 1, DEAD + 100));
        assert!(matches!(w.via(DEAD + 200, A), Via::Relay { .. }));
        assert_eq!(w.via(DEAD + 100 + RETURN_HOLD_MS, A), Via::Direct);
    }
}
