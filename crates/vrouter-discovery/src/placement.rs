//! Placement generations: which copy of a stack is used when several hosts announce
//! the same stack name, and how a host numbers its own copies. Pure; the controller
//! keeps the state (claims, remembered generations) and writes the files.
//!
//! The rule (docs/ARCHITECTURE.md "Placement generations"): copies rank by higher
//! generation first, then earlier claim, then lower node id (then the lower host
//! address, for static peers that have neither). A host that claims a stack fresh
//! gives it 1 + the highest generation of that name it knows, so a stack that moves
//! outranks its old copy at once (a migration, not a hijack), whatever the clocks say;
//! while its claim is young it re-bumps above copies claimed before it that it learns
//! of late, never above copies claimed after it (no ping-pong). A router restart keeps
//! the claim, so a copy started twice by mistake does not flip on restarts.

use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use vrouter_state::{PeerHost, StackName};

/// How long a fresh claim re-bumps above earlier-claimed copies it learns of.
pub const YOUNG_MS: u64 = 10_000;
/// Most names `generations.json` remembers; the ones seen longest ago go first.
pub const MAX_REMEMBERED: usize = 4096;

/// A local stack's claim: when this host first announced it, and its generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub claimed_ms: u64,
    pub generation: u64,
}

/// claims.json's entries: the current object, or the bare claim time an older
/// version wrote (generation 0).
#[derive(Deserialize)]
#[serde(untagged)]
enum ClaimEntry {
    Current(Claim),
    Bare(u64),
}

/// Parses claims.json, either format.
pub fn parse_claims(bytes: &[u8]) -> Option<BTreeMap<StackName, Claim>> {
    let m: BTreeMap<StackName, ClaimEntry> = serde_json::from_slice(bytes).ok()?;
    Some(
        m.into_iter()
            .map(|(n, e)| {
                let c = match e {
                    ClaimEntry::Current(c) => c,
                    ClaimEntry::Bare(claimed_ms) => Claim {
                        claimed_ms,
                        generation: 0,
                    },
                };
                (n, c)
            })
            .collect(),
    )
}

/// One copy of a stack as the rule sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// The announcing host's address; None: this host.
    pub host: Option<Ipv4Addr>,
    /// Its gossip node id ("" for static peers and in static mode).
    pub node: String,
    pub claimed_ms: u64,
    pub generation: u64,
}

impl Copy {
    /// Smaller ranks first (wins).
    pub fn rank(&self) -> (Reverse<u64>, u64, &str, Option<Ipv4Addr>) {
        (
            Reverse(self.generation),
            self.claimed_ms,
            &self.node,
            self.host,
        )
    }
}

/// The copies of every stack name: this host's (`local`: admitted local stacks with
/// their claims, ranked as node `own_node`) and the peers'.
pub fn copies(
    local: &BTreeMap<StackName, Claim>,
    own_node: &str,
    peers: &[PeerHost],
) -> BTreeMap<StackName, Vec<Copy>> {
    let mut out: BTreeMap<StackName, Vec<Copy>> = BTreeMap::new();
    for (n, c) in local {
        out.entry(n.clone()).or_default().push(Copy {
            host: None,
            node: own_node.to_string(),
            claimed_ms: c.claimed_ms,
            generation: c.generation,
        });
    }
    for p in peers {
        for s in &p.stacks {
            out.entry(s.name.clone())
                .or_default()
                .push(peer_copy(p, &s.name));
        }
    }
    out
}

/// A peer's copy of stack `name`.
pub fn peer_copy(p: &PeerHost, name: &StackName) -> Copy {
    Copy {
        host: Some(p.addr),
        node: p.node.clone().unwrap_or_default(),
        claimed_ms: p.claims.get(name).copied().unwrap_or(0),
        generation: p.generations.get(name).copied().unwrap_or(0),
    }
}

/// The winning copy of each name.
pub fn winners(copies: &BTreeMap<StackName, Vec<Copy>>) -> BTreeMap<StackName, Copy> {
    copies
        .iter()
        .filter_map(|(n, v)| {
            v.iter()
                .min_by(|a, b| a.rank().cmp(&b.rank()))
                .map(|w| (n.clone(), w.clone()))
        })
        .collect()
}

/// Local stacks that lose to another host's copy, with the winner.
pub fn superseded(
    local: &BTreeMap<StackName, Claim>,
    own_node: &str,
    peers: &[PeerHost],
) -> BTreeMap<StackName, Copy> {
    winners(&copies(local, own_node, peers))
        .into_iter()
        .filter(|(n, w)| w.host.is_some() && local.contains_key(n))
        .collect()
}

/// Brings the claims up to date with the registered stacks at `now_ms`: claims of
/// stacks no longer registered go; a stack registered without a claim gets one with
/// 1 + the highest generation `known` gives for its name; a young claim re-bumps
/// above a copy in `remote` claimed before it with a generation as high. Returns
/// whether anything changed.
///
/// `yielded`: the copies this host's running copies lost to (a duplicate told with
/// `stack_superseded`). While such a winner is still in `remote`, a fresh claim of
/// that name (the losing copy restarted after its grace period) stays one below it
/// and never re-bumps over it: restarting the duplicate does not take the stack
/// over.
pub fn update_claims(
    claims: &mut BTreeMap<StackName, Claim>,
    registered: &BTreeSet<StackName>,
    known: impl Fn(&StackName) -> u64,
    remote: &BTreeMap<StackName, Vec<Copy>>,
    yielded: &BTreeMap<StackName, Copy>,
    now_ms: u64,
) -> bool {
    let before = claims.clone();
    claims.retain(|n, _| registered.contains(n));
    let live_winner = |n: &StackName| -> Option<&Copy> {
        let w = yielded.get(n)?;
        remote
            .get(n)?
            .iter()
            .any(|r| r.host.is_some() && r.node == w.node && r.generation >= w.generation)
            .then_some(w)
    };
    for n in registered {
        if claims.contains_key(n) {
            continue;
        }
        let generation = match live_winner(n) {
            Some(w) => w.generation.saturating_sub(1),
            None => known(n).saturating_add(1),
        };
        claims.insert(
            n.clone(),
            Claim {
                claimed_ms: now_ms,
                generation,
            },
        );
    }
    for (n, c) in claims.iter_mut() {
        if now_ms.saturating_sub(c.claimed_ms) >= YOUNG_MS {
            continue;
        }
        let winner = yielded.get(n).map(|w| w.node.as_str());
        let above = remote
            .get(n)
            .into_iter()
            .flatten()
            .filter(|r| r.host.is_some() && r.claimed_ms < c.claimed_ms)
            .filter(|r| Some(r.node.as_str()) != winner)
            .map(|r| r.generation)
            .max();
        if let Some(g) = above.filter(|g| *g >= c.generation) {
            c.generation = g.saturating_add(1);
        }
    }
    *claims != before
}

/// The highest generation seen of each name (generations.json), bounded: at most
/// [`MAX_REMEMBERED`] names, the ones seen longest ago dropped first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    /// Name -> (highest generation, when last seen in ms).
    #[serde(flatten)]
    pub names: BTreeMap<StackName, Seen>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub generation: u64,
    pub seen_ms: u64,
}

impl Remembered {
    pub fn get(&self, name: &StackName) -> u64 {
        self.names.get(name).map_or(0, |s| s.generation)
    }

    /// Notes generation `g` of `name` seen at `now_ms`. Returns whether the highest
    /// generation changed (the file is written then, not on every sighting).
    pub fn note(&mut self, name: &StackName, g: u64, now_ms: u64) -> bool {
        let e = self.names.entry(name.clone()).or_insert(Seen {
            generation: 0,
            seen_ms: now_ms,
        });
        e.seen_ms = e.seen_ms.max(now_ms);
        let raised = g > e.generation;
        if raised {
            e.generation = g;
        }
        self.bound();
        raised
    }

    fn bound(&mut self) {
        while self.names.len() > MAX_REMEMBERED {
            let oldest = self
                .names
                .iter()
                .min_by_key(|(n, s)| (s.seen_ms, (*n).clone()))
                .map(|(n, _)| n.clone());
            match oldest {
                Some(n) => {
                    self.names.remove(&n);
                }
                None => break,
            }
        }
    }

    pub fn parse(bytes: &[u8]) -> Remembered {
        let mut r: Remembered = serde_json::from_slice(bytes).unwrap_or_default();
        r.bound();
        r
    }
}

/// What changed in the placement since the last reconcile, for the events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// The copy in use moved from one host to another.
    Moved {
        stack: StackName,
        from: Ipv4Addr,
        to: Ipv4Addr,
        from_generation: u64,
        to_generation: u64,
    },
    /// A local copy (its router connected) loses to `winner`.
    Superseded {
        stack: StackName,
        winner: Copy,
        own_generation: u64,
    },
}

/// Remembers the last winner of each name (also after it disappeared, so a crash
/// move is reported as a move) and the superseded copies already reported.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    /// Name -> (winning host, its generation, a counter for bounding).
    last: BTreeMap<StackName, (Ipv4Addr, u64, u64)>,
    reported: BTreeSet<(StackName, Ipv4Addr, u64)>,
    tick: u64,
}

impl Tracker {
    /// Compares `winners` (hosts resolved: `own` for this host) with the last ones.
    /// `connected` says whether a local stack's router is connected now: a copy in its
    /// grace period (a router stopped for a move) is not told it lost.
    pub fn observe(
        &mut self,
        winners: &BTreeMap<StackName, Copy>,
        own: Ipv4Addr,
        local: &BTreeMap<StackName, Claim>,
        connected: impl Fn(&StackName) -> bool,
    ) -> Vec<Note> {
        self.tick += 1;
        let mut notes = Vec::new();
        for (n, w) in winners {
            let host = w.host.unwrap_or(own);
            if let Some((from, g, _)) = self.last.get(n) {
                if *from != host {
                    notes.push(Note::Moved {
                        stack: n.clone(),
                        from: *from,
                        to: host,
                        from_generation: *g,
                        to_generation: w.generation,
                    });
                }
            }
            self.last.insert(n.clone(), (host, w.generation, self.tick));
        }
        let mut reported = BTreeSet::new();
        for (n, w) in winners {
            let (Some(h), Some(c)) = (w.host, local.get(n)) else {
                continue;
            };
            let key = (n.clone(), h, w.generation);
            if connected(n) {
                if !self.reported.contains(&key) {
                    notes.push(Note::Superseded {
                        stack: n.clone(),
                        winner: w.clone(),
                        own_generation: c.generation,
                    });
                }
                reported.insert(key);
            } else if self.reported.contains(&key) {
                reported.insert(key);
            }
        }
        self.reported = reported;
        while self.last.len() > MAX_REMEMBERED {
            let oldest = self
                .last
                .iter()
                .filter(|(n, _)| !winners.contains_key(*n))
                .min_by_key(|(_, (_, _, t))| *t)
                .map(|(n, _)| n.clone());
            match oldest {
                Some(n) => {
                    self.last.remove(&n);
                }
                None => break,
            }
        }
        notes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vrouter_state::{PeerOrigin, StackSpec, Vni};

    fn name(s: &str) -> StackName {
        StackName::new(s).unwrap()
    }

    fn spec(n: &str) -> StackSpec {
        StackSpec {
            name: name(n),
            vni: Vni::new(1000).unwrap(),
            prefixes: vec!["10.9.0.0/24".parse().unwrap()],
            router_ip: "10.9.0.254".parse().unwrap(),
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// A gossip peer announcing `stacks` as (name, claimed_ms, generation).
    fn peer(addr: &str, node: &str, stacks: &[(&str, u64, u64)]) -> PeerHost {
        PeerHost {
            addr: ip(addr),
            stacks: stacks.iter().map(|s| spec(s.0)).collect(),
            source: PeerOrigin::Gossip,
            node: Some(node.into()),
            claims: stacks.iter().map(|s| (name(s.0), s.1)).collect(),
            generations: stacks.iter().map(|s| (name(s.0), s.2)).collect(),
            encryption: None,
        }
    }

    fn claims(v: &[(&str, u64, u64)]) -> BTreeMap<StackName, Claim> {
        v.iter()
            .map(|(n, c, g)| {
                (
                    name(n),
                    Claim {
                        claimed_ms: *c,
                        generation: *g,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn rank_is_generation_then_claim_then_node() {
        let peers = vec![
            peer("198.18.0.2", "0000000000000002", &[("s", 100, 1)]),
            peer("198.18.0.3", "0000000000000003", &[("s", 900, 2)]),
            peer("198.18.0.4", "0000000000000001", &[("s", 900, 2)]),
        ];
        let w = winners(&copies(&BTreeMap::new(), "", &peers));
        // Generation 2 beats the earlier claim of generation 1; equal generation and
        // claim: the lower node id.
        assert_eq!(w[&name("s")].host, Some(ip("198.18.0.4")));
        // An earlier claim wins at equal generation.
        let peers = vec![
            peer("198.18.0.2", "000000000000000f", &[("s", 100, 2)]),
            peer("198.18.0.3", "0000000000000001", &[("s", 900, 2)]),
        ];
        let w = winners(&copies(&BTreeMap::new(), "", &peers));
        assert_eq!(w[&name("s")].host, Some(ip("198.18.0.2")));
        // The same answer in any order, on any host.
        let mut rev = peers.clone();
        rev.reverse();
        assert_eq!(winners(&copies(&BTreeMap::new(), "", &rev)), w);
    }

    #[test]
    fn a_local_copy_loses_to_a_higher_generation_and_wins_against_a_lower_one() {
        let local = claims(&[("s", 100, 1), ("t", 100, 3)]);
        let peers = vec![peer(
            "198.18.0.2",
            "0000000000000002",
            &[("s", 5_000, 2), ("t", 50, 2)],
        )];
        let sup = superseded(&local, "0000000000000001", &peers);
        assert_eq!(sup.keys().cloned().collect::<Vec<_>>(), vec![name("s")]);
        assert_eq!(sup[&name("s")].generation, 2);
        // Static mode: generation 0 and claim 0 everywhere; the local copy ranks
        // first (no node, no host), as before.
        let stat = peer("198.18.0.2", "", &[("s", 0, 0)]);
        let stat = PeerHost {
            node: None,
            claims: BTreeMap::new(),
            generations: BTreeMap::new(),
            source: PeerOrigin::Static,
            ..stat
        };
        assert!(superseded(&claims(&[("s", 0, 0)]), "", &[stat]).is_empty());
    }

    #[test]
    fn a_fresh_claim_is_one_above_the_highest_known_and_a_restart_keeps_it() {
        let mut c = BTreeMap::new();
        let reg: BTreeSet<StackName> = [name("s")].into();
        let known = |n: &StackName| if n.as_str() == "s" { 4 } else { 0 };
        assert!(update_claims(
            &mut c,
            &reg,
            known,
            &BTreeMap::new(),
            &BTreeMap::new(),
            1_000
        ));
        assert_eq!(
            c[&name("s")],
            Claim {
                claimed_ms: 1_000,
                generation: 5
            }
        );
        // Still registered (a router restart within grace, a discovery restart with
        // claims.json): nothing changes, whatever is known now.
        assert!(!update_claims(
            &mut c,
            &reg,
            |_| 40,
            &BTreeMap::new(),
            &BTreeMap::new(),
            900_000
        ));
        assert_eq!(c[&name("s")].generation, 5);
        // Gone, then back: a new placement.
        assert!(update_claims(
            &mut c,
            &BTreeSet::new(),
            known,
            &BTreeMap::new(),
            &BTreeMap::new(),
            1_000_000
        ));
        assert!(c.is_empty());
        update_claims(
            &mut c,
            &reg,
            |_| 5,
            &BTreeMap::new(),
            &BTreeMap::new(),
            1_000_001,
        );
        assert_eq!(c[&name("s")].generation, 6);
        // Saturates instead of overflowing on a hostile generation.
        let mut c = BTreeMap::new();
        update_claims(
            &mut c,
            &reg,
            |_| u64::MAX,
            &BTreeMap::new(),
            &BTreeMap::new(),
            1,
        );
        assert_eq!(c[&name("s")].generation, u64::MAX);
    }

    #[test]
    fn a_young_claim_rebumps_only_over_earlier_claimed_copies() {
        let reg: BTreeSet<StackName> = [name("s")].into();
        let mut c = claims(&[("s", 10_000, 1)]);
        // A copy claimed earlier with the same generation (its host had not synced).
        let earlier = vec![peer("198.18.0.2", "0000000000000002", &[("s", 9_000, 1)])];
        let remote = copies(&BTreeMap::new(), "", &earlier);
        assert!(update_claims(
            &mut c,
            &reg,
            |_| 0,
            &remote,
            &BTreeMap::new(),
            12_000
        ));
        assert_eq!(c[&name("s")].generation, 2);
        assert!(superseded(&c, "0000000000000001", &earlier).is_empty());
        // A copy claimed after it: never (no ping-pong).
        let later = vec![peer("198.18.0.2", "0000000000000002", &[("s", 11_000, 7)])];
        let remote = copies(&BTreeMap::new(), "", &later);
        assert!(!update_claims(
            &mut c,
            &reg,
            |_| 0,
            &remote,
            &BTreeMap::new(),
            12_000
        ));
        assert_eq!(c[&name("s")].generation, 2);
        // Once old, not even above earlier copies.
        let high = vec![peer("198.18.0.2", "0000000000000002", &[("s", 9_000, 5)])];
        let remote = copies(&BTreeMap::new(), "", &high);
        assert!(!update_claims(
            &mut c,
            &reg,
            |_| 0,
            &remote,
            &BTreeMap::new(),
            10_000 + YOUNG_MS
        ));
        assert_eq!(c[&name("s")].generation, 2);
        // Both hosts apply it: the earlier claim does not bump over the later one,
        // the later one bumps once, and both then agree on the later copy.
        let mut a = claims(&[("s", 9_000, 1)]);
        let b_peer = vec![peer("198.18.0.3", "0000000000000003", &[("s", 10_000, 2)])];
        let remote = copies(&BTreeMap::new(), "", &b_peer);
        assert!(!update_claims(
            &mut a,
            &reg,
            |_| 0,
            &remote,
            &BTreeMap::new(),
            12_000
        ));
        assert_eq!(
            superseded(&a, "0000000000000001", &b_peer)[&name("s")].host,
            Some(ip("198.18.0.3"))
        );
    }

    #[test]
    fn a_duplicate_restarted_after_its_grace_stays_below_the_copy_it_lost_to() {
        let reg: BTreeSet<StackName> = [name("s")].into();
        let winner = vec![peer("198.18.0.2", "02", &[("s", 5_000, 2)])];
        let remote = copies(&BTreeMap::new(), "", &winner);
        let w = winners(&remote)[&name("s")].clone();
        let yielded: BTreeMap<StackName, Copy> = [(name("s"), w)].into();
        // The duplicate's claim expired with its grace; it registers again.
        let mut c = BTreeMap::new();
        update_claims(&mut c, &reg, |_| 2, &remote, &yielded, 20_000);
        assert_eq!(c[&name("s")].generation, 1);
        // Young, but no re-bump over the copy it yielded to.
        assert!(!update_claims(
            &mut c,
            &reg,
            |_| 2,
            &remote,
            &yielded,
            21_000
        ));
        assert_eq!(superseded(&c, "01", &winner).len(), 1, "still the loser");
        // Once that copy is gone, a fresh claim is a new placement again.
        let mut c = BTreeMap::new();
        update_claims(&mut c, &reg, |_| 2, &BTreeMap::new(), &yielded, 30_000);
        assert_eq!(c[&name("s")].generation, 3);
    }

    #[test]
    fn the_local_copy_is_announced_again_when_the_winner_vanishes() {
        let local = claims(&[("s", 100, 1)]);
        let winner = vec![peer("198.18.0.2", "0000000000000002", &[("s", 500, 2)])];
        assert_eq!(superseded(&local, "01", &winner).len(), 1);
        assert!(superseded(&local, "01", &[]).is_empty());
        // With its own generation unchanged.
        assert_eq!(local[&name("s")].generation, 1);
    }

    #[test]
    fn the_older_claims_format_reads_as_generation_0() {
        let old = br#"{"s": 1700000000000, "t": 5}"#;
        let c = parse_claims(old).unwrap();
        assert_eq!(
            c[&name("s")],
            Claim {
                claimed_ms: 1_700_000_000_000,
                generation: 0
            }
        );
        let new = serde_json::to_vec(&claims(&[("s", 7, 3)])).unwrap();
        assert_eq!(parse_claims(&new).unwrap(), claims(&[("s", 7, 3)]));
        let mixed = br#"{"s": 9, "t": {"claimed_ms": 7, "generation": 3}}"#;
        assert_eq!(
            parse_claims(mixed).unwrap(),
            claims(&[("s", 9, 0), ("t", 7, 3)])
        );
        assert!(parse_claims(b"[1,2]").is_none());
    }

    #[test]
    fn remembered_generations_are_bounded_and_drop_the_oldest_seen() {
        let mut r = Remembered::default();
        assert!(r.note(&name("first"), 3, 1));
        assert!(!r.note(&name("first"), 2, 2));
        assert_eq!(r.get(&name("first")), 3);
        for i in 0..MAX_REMEMBERED {
            r.note(&name(&format!("n{i}")), 1, 10 + i as u64);
        }
        assert_eq!(r.names.len(), MAX_REMEMBERED);
        assert_eq!(r.get(&name("first")), 0, "the oldest seen went");
        // Seen again: kept over others.
        r.note(&name("n0"), 1, 1_000_000);
        r.note(&name("late"), 1, 1_000_001);
        assert_eq!(r.get(&name("n0")), 1);
        assert_eq!(r.get(&name("n1")), 0);
        let back = Remembered::parse(&serde_json::to_vec(&r).unwrap());
        assert_eq!(back, r);
        assert_eq!(Remembered::parse(b"garbage"), Remembered::default());
    }

    #[test]
    fn moves_and_supersessions_are_noted_once_per_change() {
        let own = ip("198.18.0.1");
        let mut t = Tracker::default();
        let local = claims(&[("s", 100, 1)]);
        let a = copies(&local, "01", &[]);
        assert!(t.observe(&winners(&a), own, &local, |_| true).is_empty());
        // Another host's generation 2 arrives: moved, and this copy (connected) told.
        let b = vec![peer("198.18.0.2", "02", &[("s", 500, 2)])];
        let w = winners(&copies(&local, "01", &b));
        let notes = t.observe(&w, own, &local, |_| true);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(
            matches!(&notes[0], Note::Moved { from, to, from_generation: 1, to_generation: 2, .. } if *from == own && *to == ip("198.18.0.2"))
        );
        assert!(
            matches!(&notes[1], Note::Superseded { own_generation: 1, winner, .. } if winner.generation == 2)
        );
        // Nothing new on the next reconciles.
        assert!(t.observe(&w, own, &local, |_| true).is_empty());
        // A copy in grace is not told; a crash move (the winner vanished, then came
        // back elsewhere) is a move.
        let mut t = Tracker::default();
        let c = vec![peer("198.18.0.3", "03", &[("s", 100, 1)])];
        t.observe(
            &winners(&copies(&BTreeMap::new(), "", &c)),
            own,
            &BTreeMap::new(),
            |_| true,
        );
        assert!(t
            .observe(&BTreeMap::new(), own, &BTreeMap::new(), |_| true)
            .is_empty());
        let notes = t.observe(&w, own, &local, |_| false);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(matches!(&notes[0], Note::Moved { from, .. } if *from == ip("198.18.0.3")));
    }
}
