//! Path probes between hosts, and the address this host's peers see (reflection).
//!
//! A node probes each target (a member the caller names) every `probe_every_ms` at
//! each of its candidate addresses: the record's gossip address (local), the
//! record's observed address with the gossip port (behind NAT), and the source its
//! last authenticated packet came from (learned). The target answers a sealed
//! [`crate::wire::Wire::Probe`] with a [`crate::wire::Wire::ProbeAck`] naming the
//! source it saw the probe come from; an ack counts only when its sealed sender is the
//! probed node and its token is outstanding. From the acks: per target whether it is
//! reachable, at which candidate, with which round-trip time; and from the `seen`
//! addresses, by majority, the address this host is observed at ([`reflect`]).
//!
//! Everything here is pure (time is passed in): [`PathTable`] is driven by the node.

use crate::record::NodeId;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};

/// Most targets probed at once (more are ignored, lowest ids kept).
pub const MAX_PATH_TARGETS: usize = 256;
/// Most probes awaiting their ack at once (the oldest is forgotten beyond this).
const MAX_OUTSTANDING: usize = 4 * 3 * MAX_PATH_TARGETS;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PathParams {
    /// How often each candidate of each target is probed.
    pub probe_every_ms: u64,
    /// A candidate not acked for this long is dead; a target with no live candidate is
    /// unreachable.
    pub dead_after_ms: u64,
    /// How long a learned source address, and a peer's report of our address, stay in
    /// use without a newer packet.
    pub learned_ttl_ms: u64,
}

impl Default for PathParams {
    fn default() -> PathParams {
        PathParams {
            probe_every_ms: 1000,
            dead_after_ms: 2500,
            learned_ttl_ms: 30_000,
        }
    }
}

/// One target's path, as this node sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PathView {
    pub id: NodeId,
    /// Some candidate acked within `dead_after_ms`.
    pub reachable: bool,
    /// The candidate in use: the first acked within `dead_after_ms` in the preference
    /// order local, observed, learned.
    pub addr: Option<SocketAddrV4>,
    /// EWMA (weight 1/4) of the in-use candidate's round-trip times, microseconds.
    pub rtt_us: Option<u32>,
    /// Monotonic ms when `reachable` last changed (the time probing started if the
    /// target never acked).
    pub since_ms: u64,
    pub acked_ever: bool,
    /// Source of the target's last authenticated packet, while fresh.
    pub learned: Option<SocketAddrV4>,
}

/// The address this host is observed at, by majority of its peers' reports.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Reflection {
    /// The ip a strict majority of the outside reports agree on.
    pub observed: Option<Ipv4Addr>,
    /// Some report with the observed ip has a port other than the local one.
    pub port_translated: bool,
    /// The fresh reports it was made from (one per peer: its latest ack's `seen`).
    pub reports: Vec<(NodeId, SocketAddrV4)>,
}

/// The majority rule. `reports`: one per reporter (the caller keeps only the fresh,
/// latest one). A report with the local ip comes from inside the same NAT (or no NAT)
/// and neither adds nor contradicts; among the others, `observed` is the ip a strict
/// majority holds (none on a tie or with no report), so a single peer cannot add an
/// address another contradicts. `port_translated` when some report of the observed ip
/// carries a port other than the local port.
pub fn reflect(local: SocketAddrV4, reports: &[(NodeId, SocketAddrV4)]) -> Reflection {
    // One per reporter, the last given wins.
    let mut by: BTreeMap<NodeId, SocketAddrV4> = BTreeMap::new();
    for (id, a) in reports {
        by.insert(*id, *a);
    }
    let outside: Vec<SocketAddrV4> = by
        .values()
        .filter(|a| a.ip() != local.ip())
        .copied()
        .collect();
    let mut counts: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for a in &outside {
        *counts.entry(*a.ip()).or_default() += 1;
    }
    let observed = counts
        .iter()
        .find(|(_, n)| 2 * **n > outside.len())
        .map(|(ip, _)| *ip);
    let port_translated = observed.is_some_and(|ip| {
        outside
            .iter()
            .any(|a| *a.ip() == ip && a.port() != local.port())
    });
    Reflection {
        observed,
        port_translated,
        reports: by.into_iter().collect(),
    }
}

/// One candidate address of one target.
#[derive(Debug, Clone, Default)]
struct Candidate {
    last_ack_ms: Option<u64>,
    rtt_us: Option<u32>,
}

#[derive(Debug, Clone)]
struct Target {
    /// The candidates of the last probe round, in preference order.
    order: Vec<SocketAddrV4>,
    candidates: HashMap<SocketAddrV4, Candidate>,
    reachable: bool,
    since_ms: u64,
    acked_ever: bool,
    next_probe_ms: u64,
}

/// A probe awaiting its ack.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    id: NodeId,
    addr: SocketAddrV4,
    sent_ms: u64,
    /// Microseconds within `sent_ms` are not known: the clock is in ms, so the caller
    /// passes the send time in microseconds when it has them.
    sent_us: u64,
}

/// The per-target path state of one node.
#[derive(Debug, Clone, Default)]
pub struct PathTable {
    params: PathParams,
    targets: BTreeMap<NodeId, Target>,
    outstanding: BTreeMap<u64, Outstanding>,
    /// Source of the last authenticated packet per sender, with its time (every
    /// sender, not only targets: sends to members use it).
    learned: HashMap<NodeId, (SocketAddrV4, u64)>,
    /// Latest ack `seen` per reporter, with its time.
    reports: BTreeMap<NodeId, (SocketAddrV4, u64)>,
    /// Bound on `learned`.
    max_learned: usize,
}

impl PathTable {
    pub fn new(params: PathParams, max_learned: usize) -> PathTable {
        PathTable {
            params,
            max_learned: max_learned.max(16),
            ..PathTable::default()
        }
    }

    pub fn params(&self) -> PathParams {
        self.params
    }

    pub fn set_params(&mut self, p: PathParams) {
        self.params = PathParams {
            probe_every_ms: p.probe_every_ms.max(1),
            dead_after_ms: p.dead_after_ms.max(1),
            learned_ttl_ms: p.learned_ttl_ms.max(1),
        };
    }

    pub fn has_targets(&self) -> bool {
        !self.targets.is_empty()
    }

    pub fn target_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.targets.keys().copied()
    }

    /// Replaces the targets (at most [`MAX_PATH_TARGETS`], lowest ids first); a new
    /// target is probed at once, a kept one keeps its state.
    pub fn set_targets(&mut self, ids: BTreeSet<NodeId>, now: u64) {
        let ids: BTreeSet<NodeId> = ids.into_iter().take(MAX_PATH_TARGETS).collect();
        self.targets.retain(|id, _| ids.contains(id));
        for id in ids {
            self.targets.entry(id).or_insert_with(|| Target {
                order: Vec::new(),
                candidates: HashMap::new(),
                reachable: false,
                since_ms: now,
                acked_ever: false,
                next_probe_ms: now,
            });
        }
        self.outstanding
            .retain(|_, o| self.targets.contains_key(&o.id));
    }

    /// When the next probe round is due (u64::MAX with no target).
    pub fn next_due(&self) -> u64 {
        self.targets
            .values()
            .map(|t| t.next_probe_ms)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Targets whose probe round is due, marking the round done.
    pub fn due(&mut self, now: u64) -> Vec<NodeId> {
        let every = self.params.probe_every_ms;
        let mut out = Vec::new();
        for (id, t) in self.targets.iter_mut() {
            if t.next_probe_ms <= now {
                // Fixed cadence from the first probe, never a burst to catch up.
                t.next_probe_ms = (t.next_probe_ms + every).max(now + 1);
                out.push(*id);
            }
        }
        out
    }

    /// The candidates of `id` given its record's addresses: local, observed, learned,
    /// deduplicated, in preference order. Remembered as the target's current order.
    pub fn candidates(
        &mut self,
        id: NodeId,
        local: Option<SocketAddrV4>,
        observed: Option<SocketAddrV4>,
        now: u64,
    ) -> Vec<SocketAddrV4> {
        let learned = self.learned(id, now);
        let mut order: Vec<SocketAddrV4> = Vec::new();
        for a in [local, observed, learned].into_iter().flatten() {
            if !order.contains(&a) && a.port() != 0 {
                order.push(a);
            }
        }
        if let Some(t) = self.targets.get_mut(&id) {
            t.order = order.clone();
            t.candidates.retain(|a, _| order.contains(a));
        }
        order
    }

    /// Records a probe sent with `token` to `id` at `addr`.
    pub fn sent(&mut self, token: u64, id: NodeId, addr: SocketAddrV4, now: u64, now_us: u64) {
        if self.outstanding.len() >= MAX_OUTSTANDING {
            let oldest = self
                .outstanding
                .iter()
                .min_by_key(|(_, o)| o.sent_ms)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.outstanding.remove(&k);
            }
        }
        self.outstanding.insert(
            token,
            Outstanding {
                id,
                addr,
                sent_ms: now,
                sent_us: now_us,
            },
        );
    }

    /// An ack from sealed sender `from` for `token`, which saw our probe come from
    /// `seen`. Counts only if the token is outstanding and `from` is the probed id.
    /// Returns whether it counted.
    pub fn ack(
        &mut self,
        from: NodeId,
        token: u64,
        seen: SocketAddrV4,
        now: u64,
        now_us: u64,
    ) -> bool {
        let Some(o) = self.outstanding.get(&token).copied() else {
            return false;
        };
        if o.id != from {
            return false;
        }
        self.outstanding.remove(&token);
        if now.saturating_sub(o.sent_ms) > self.params.dead_after_ms {
            return false;
        }
        let Some(t) = self.targets.get_mut(&from) else {
            return false;
        };
        let rtt = now_us.saturating_sub(o.sent_us).min(u32::MAX as u64) as u32;
        let c = t.candidates.entry(o.addr).or_default();
        c.last_ack_ms = Some(now);
        c.rtt_us = Some(match c.rtt_us {
            None => rtt,
            Some(old) => ((3 * old as u64 + rtt as u64) / 4) as u32,
        });
        t.acked_ever = true;
        // Reflection only ever names an address a record may carry.
        if crate::validate::usable_unicast(*seen.ip()) {
            self.reports.insert(from, (seen, now));
        }
        self.refresh(now);
        true
    }

    /// Notes the source of an authenticated packet from `id`.
    pub fn heard(&mut self, id: NodeId, from: SocketAddrV4, now: u64) {
        if self.learned.len() >= self.max_learned && !self.learned.contains_key(&id) {
            let ttl = self.params.learned_ttl_ms;
            self.learned
                .retain(|_, (_, at)| now.saturating_sub(*at) <= ttl);
            if self.learned.len() >= self.max_learned {
                let oldest = self
                    .learned
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| *k);
                if let Some(k) = oldest {
                    self.learned.remove(&k);
                }
            }
        }
        self.learned.insert(id, (from, now));
    }

    /// The fresh learned source of `id`.
    pub fn learned(&self, id: NodeId, now: u64) -> Option<SocketAddrV4> {
        self.learned
            .get(&id)
            .filter(|(_, at)| now.saturating_sub(*at) <= self.params.learned_ttl_ms)
            .map(|(a, _)| *a)
    }

    fn live(&self, c: &Candidate, now: u64) -> bool {
        c.last_ack_ms
            .is_some_and(|t| now.saturating_sub(t) <= self.params.dead_after_ms)
    }

    /// The candidate in use for `id` and its rtt, if reachable.
    fn in_use(&self, t: &Target, now: u64) -> Option<(SocketAddrV4, Option<u32>)> {
        t.order.iter().find_map(|a| {
            t.candidates
                .get(a)
                .filter(|c| self.live(c, now))
                .map(|c| (*a, c.rtt_us))
        })
    }

    /// Recomputes reachability (time passing makes candidates dead); returns whether
    /// any target's `reachable` changed. Expired probes are forgotten.
    pub fn refresh(&mut self, now: u64) -> bool {
        let dead = self.params.dead_after_ms;
        self.outstanding
            .retain(|_, o| now.saturating_sub(o.sent_ms) <= dead);
        let mut changed = false;
        let ids: Vec<NodeId> = self.targets.keys().copied().collect();
        for id in ids {
            let reach = self.in_use(&self.targets[&id], now).is_some();
            let t = self.targets.get_mut(&id).expect("listed");
            if t.reachable != reach {
                t.reachable = reach;
                t.since_ms = now;
                changed = true;
            }
        }
        changed
    }

    /// The next time a live candidate goes dead (u64::MAX if none will): when
    /// reachability must be looked at again.
    pub fn next_change(&self, now: u64) -> u64 {
        let dead = self.params.dead_after_ms;
        self.targets
            .values()
            .flat_map(|t| t.candidates.values())
            .filter_map(|c| c.last_ack_ms)
            .map(|t| t.saturating_add(dead).saturating_add(1))
            .filter(|t| *t > now)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Where to send to `id` if probes found a path: its in-use candidate.
    pub fn path_addr(&self, id: NodeId, now: u64) -> Option<SocketAddrV4> {
        let t = self.targets.get(&id)?;
        self.in_use(t, now).map(|(a, _)| a)
    }

    pub fn views(&self, now: u64) -> Vec<PathView> {
        self.targets
            .iter()
            .map(|(id, t)| {
                let used = self.in_use(t, now);
                PathView {
                    id: *id,
                    reachable: used.is_some(),
                    addr: used.map(|(a, _)| a),
                    rtt_us: used.and_then(|(_, r)| r),
                    since_ms: t.since_ms,
                    acked_ever: t.acked_ever,
                    learned: self.learned(*id, now),
                }
            })
            .collect()
    }

    /// Fresh reports of our address, one per peer.
    pub fn reports(&self, now: u64) -> Vec<(NodeId, SocketAddrV4)> {
        self.reports
            .iter()
            .filter(|(_, (_, at))| now.saturating_sub(*at) <= self.params.learned_ttl_ms)
            .map(|(id, (a, _))| (*id, *a))
            .collect()
    }

    /// Drops stale reports (and those of peers no longer targets).
    pub fn expire_reports(&mut self, now: u64) {
        let ttl = self.params.learned_ttl_ms;
        let targets = &self.targets;
        self.reports
            .retain(|id, (_, at)| targets.contains_key(id) && now.saturating_sub(*at) <= ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    const LOCAL: &str = "192.168.1.5:7950";

    #[test]
    fn inside_reports_neither_add_nor_contradict() {
        let r = reflect(
            a(LOCAL),
            &[
                (NodeId(1), a("192.168.1.5:7950")),
                (NodeId(2), a("192.168.1.5:7950")),
                (NodeId(3), a("203.0.113.5:7950")),
            ],
        );
        assert_eq!(r.observed, Some("203.0.113.5".parse().unwrap()));
        assert!(!r.port_translated);
        assert_eq!(r.reports.len(), 3);
        // Only inside reports: nothing observed.
        let r = reflect(a(LOCAL), &[(NodeId(1), a("192.168.1.5:7950"))]);
        assert_eq!(r.observed, None);
    }

    #[test]
    fn a_strict_majority_decides() {
        let r = reflect(
            a(LOCAL),
            &[
                (NodeId(1), a("203.0.113.5:7950")),
                (NodeId(2), a("203.0.113.5:7950")),
                (NodeId(3), a("198.51.100.9:7950")),
            ],
        );
        assert_eq!(r.observed, Some("203.0.113.5".parse().unwrap()));
        // Two of four is not a strict majority.
        let r = reflect(
            a(LOCAL),
            &[
                (NodeId(1), a("203.0.113.5:7950")),
                (NodeId(2), a("203.0.113.5:7950")),
                (NodeId(3), a("198.51.100.9:7950")),
                (NodeId(4), a("198.51.100.10:7950")),
            ],
        );
        assert_eq!(r.observed, None);
    }

    #[test]
    fn ties_and_no_reports_give_none() {
        assert_eq!(reflect(a(LOCAL), &[]), Reflection::default());
        let r = reflect(
            a(LOCAL),
            &[
                (NodeId(1), a("203.0.113.5:7950")),
                (NodeId(2), a("198.51.100.9:7950")),
            ],
        );
        assert_eq!(r.observed, None);
        assert!(!r.port_translated);
    }

    #[test]
    fn a_single_contradicting_peer_cannot_add_an_address() {
        // One peer alone may report (nobody contradicts it)...
        let r = reflect(a(LOCAL), &[(NodeId(1), a("203.0.113.5:7950"))]);
        assert_eq!(r.observed, Some("203.0.113.5".parse().unwrap()));
        // ...but a liar beside an honest peer adds nothing, and two reports from the
        // same peer count once (its latest).
        let r = reflect(
            a(LOCAL),
            &[
                (NodeId(1), a("203.0.113.5:7950")),
                (NodeId(2), a("6.6.6.6:7950")),
                (NodeId(2), a("6.6.6.6:7950")),
            ],
        );
        assert_eq!(r.observed, None);
        let r = reflect(
            a(LOCAL),
            &[
                (NodeId(2), a("6.6.6.6:7950")),
                (NodeId(1), a("203.0.113.5:7950")),
                (NodeId(3), a("203.0.113.5:7950")),
            ],
        );
        assert_eq!(r.observed, Some("203.0.113.5".parse().unwrap()));
    }

    #[test]
    fn port_translated_when_the_observed_ip_comes_with_another_port() {
        let r = reflect(
            a(LOCAL),
            &[
                (NodeId(1), a("203.0.113.5:40001")),
                (NodeId(2), a("203.0.113.5:7950")),
            ],
        );
        assert_eq!(r.observed, Some("203.0.113.5".parse().unwrap()));
        assert!(r.port_translated);
        // A translated port of an address not observed does not count.
        let r = reflect(
            a(LOCAL),
            &[
                (NodeId(1), a("203.0.113.5:7950")),
                (NodeId(2), a("203.0.113.5:7950")),
                (NodeId(3), a("198.51.100.9:1234")),
            ],
        );
        assert!(!r.port_translated);
    }

    fn table() -> PathTable {
        let mut t = PathTable::new(PathParams::default(), 100);
        t.set_targets([NodeId(1), NodeId(2)].into_iter().collect(), 0);
        t
    }

    #[test]
    fn stale_reports_are_dropped() {
        let mut t = table();
        let c = t.candidates(NodeId(1), Some(a("10.0.0.1:7950")), None, 0);
        t.sent(7, NodeId(1), c[0], 0, 0);
        assert!(t.ack(NodeId(1), 7, a("203.0.113.5:7950"), 1, 1000));
        assert_eq!(t.reports(1).len(), 1);
        assert_eq!(t.reports(1 + 30_000).len(), 1);
        assert!(t.reports(2 + 30_000).is_empty());
        t.expire_reports(2 + 30_000);
        assert!(t.reports.is_empty());
    }

    #[test]
    fn an_ack_counts_only_from_the_probed_id_with_an_outstanding_token() {
        let mut t = table();
        let c = t.candidates(NodeId(1), Some(a("10.0.0.1:7950")), None, 0);
        t.sent(7, NodeId(1), c[0], 0, 0);
        // Another sender, an unknown token: not counted.
        assert!(!t.ack(NodeId(2), 7, a("1.2.3.4:1"), 1, 1000));
        assert!(!t.ack(NodeId(1), 8, a("1.2.3.4:1"), 1, 1000));
        assert!(t.reports(1).is_empty());
        assert!(!t.views(1)[0].reachable);
        assert!(t.ack(NodeId(1), 7, a("1.2.3.4:1"), 1, 1000));
        // Once only.
        assert!(!t.ack(NodeId(1), 7, a("1.2.3.4:1"), 1, 1000));
        let v = &t.views(1)[0];
        assert!(v.reachable && v.acked_ever);
        assert_eq!(v.addr, Some(a("10.0.0.1:7950")));
        assert_eq!(v.rtt_us, Some(1000));
    }

    #[test]
    fn reachability_follows_acks_with_the_preferred_candidate_in_use() {
        let mut t = table();
        let local = a("10.0.0.1:7950");
        let observed = a("203.0.113.1:7950");
        let learned = a("203.0.113.1:40000");
        t.heard(NodeId(1), learned, 0);
        let c = t.candidates(NodeId(1), Some(local), Some(observed), 0);
        assert_eq!(c, vec![local, observed, learned]);
        // Only the learned one answers.
        t.sent(1, NodeId(1), learned, 0, 0);
        t.sent(2, NodeId(1), local, 0, 0);
        assert!(t.ack(NodeId(1), 1, learned, 2, 2000));
        assert_eq!(t.path_addr(NodeId(1), 2), Some(learned));
        // Then the observed one too: preferred over learned.
        t.sent(3, NodeId(1), observed, 1000, 1_000_000);
        assert!(t.ack(NodeId(1), 3, observed, 1001, 1_001_000));
        assert_eq!(t.path_addr(NodeId(1), 1001), Some(observed));
        let v = &t.views(1001)[0];
        assert_eq!((v.rtt_us, v.since_ms), (Some(1000), 2));
        // RTT EWMA of 1/4.
        t.sent(4, NodeId(1), observed, 2000, 2_000_000);
        assert!(t.ack(NodeId(1), 4, observed, 2005, 2_005_000));
        assert_eq!(t.views(2005)[0].rtt_us, Some((3 * 1000 + 5000) / 4));
        // Nothing for dead_after: unreachable, since then.
        assert!(!t.refresh(2005 + 2500));
        assert!(t.refresh(2005 + 2501));
        let v = &t.views(2005 + 2501)[0];
        assert!(!v.reachable && v.acked_ever && v.addr.is_none());
        assert_eq!(v.since_ms, 2005 + 2501);
        // The never-acked target: since = when probing started.
        let v = &t.views(5000)[1];
        assert!(!v.reachable && !v.acked_ever);
        assert_eq!(v.since_ms, 0);
    }

    #[test]
    fn an_unusable_seen_address_counts_for_the_path_not_for_reflection() {
        let mut t = table();
        t.candidates(NodeId(1), Some(a("127.0.0.1:7950")), None, 0);
        t.sent(1, NodeId(1), a("127.0.0.1:7950"), 0, 0);
        assert!(t.ack(NodeId(1), 1, a("127.0.0.1:7951"), 1, 1000));
        assert!(t.views(1)[0].reachable);
        assert!(t.reports(1).is_empty());
    }

    #[test]
    fn a_late_ack_does_not_count() {
        let mut t = table();
        t.candidates(NodeId(1), Some(a("10.0.0.1:7950")), None, 0);
        t.sent(1, NodeId(1), a("10.0.0.1:7950"), 0, 0);
        assert!(!t.ack(NodeId(1), 1, a("1.1.1.1:1"), 2501, 2_501_000));
        assert!(!t.views(2501)[0].reachable);
    }

    #[test]
    fn targets_are_capped_and_probed_at_a_fixed_cadence() {
        let mut t = PathTable::new(PathParams::default(), 100);
        t.set_targets((0..1000).map(NodeId).collect(), 0);
        assert_eq!(t.targets.len(), MAX_PATH_TARGETS);
        assert_eq!(t.due(0).len(), MAX_PATH_TARGETS);
        assert!(t.due(999).is_empty());
        assert_eq!(t.due(1000).len(), MAX_PATH_TARGETS);
        assert_eq!(t.next_due(), 2000);
        t.set_targets(BTreeSet::new(), 1000);
        assert_eq!(t.next_due(), u64::MAX);
    }
}
