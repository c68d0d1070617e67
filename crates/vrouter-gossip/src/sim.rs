//! A simulated network and clock that drive real [`Node`]s: the production code, with
//! sealed datagrams counted on the wire. Used by the unit tests and by the N=100 and
//! N=1,000 benchmarks. Event driven: time jumps to the next delivery or timer.

use crate::node::{Node, Params};
use crate::record::{ClaimedStack, NodeId, NodeRecord};
use crate::seal::Keyring;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use vrouter_state::{StackName, StackSpec, Vni};

pub const SIM_PORT: u16 = 7950;

/// UDP and IPv4 headers, counted with every datagram's bytes.
pub const IP_UDP_HEADERS: u64 = 28;

/// A datagram in flight: (delivery time, sequence, destination index, source, bytes).
type InFlight = (u64, u64, usize, SocketAddrV4, Vec<u8>);

pub struct Sim {
    nodes: Vec<Option<Node>>,
    addrs: Vec<SocketAddrV4>,
    by_addr: HashMap<SocketAddrV4, usize>,
    queue: BinaryHeap<Reverse<InFlight>>,
    deadlines: BinaryHeap<Reverse<(u64, usize)>>,
    seq: u64,
    now: u64,
    rng: StdRng,
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// One-way delay, in ms, drawn from `latency.0..=latency.1`.
    pub latency: (u64, u64),
    blocked: HashSet<(usize, usize)>,
    /// Nodes behind a NAT (see [`Sim::set_nat`]).
    nat: HashMap<usize, Nat>,
    /// Bytes sent per node, with IP and UDP headers.
    pub wire_bytes: Vec<u64>,
    pub wire_packets: Vec<u64>,
    /// Largest datagram sent (sealed, without IP and UDP headers).
    pub max_datagram: usize,
    secret: String,
    params: Params,
    seed: u64,
    /// Wall clock at simulated time zero.
    wall0: u64,
}

/// A node behind a NAT: its packets to nodes outside come from `outside`; packets to
/// `outside` reach it; packets from outside to its own address are dropped (a private
/// address is not routed from outside).
#[derive(Debug, Clone)]
struct Nat {
    outside: SocketAddrV4,
    inside: HashSet<usize>,
}

/// `n` stacks with random, incompressible 64-character names, `prefixes` prefixes each
/// (distinct for distinct seeds below 64), claimed in order.
pub fn long_stacks(seed: u64, n: usize, prefixes: usize) -> Vec<ClaimedStack> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-";
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|k| {
            let name: String = std::iter::once('s')
                .chain((1..64).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len() - 1)] as char))
                .collect();
            let base = ((seed as usize % 64) << 10) | (k * prefixes.max(1));
            let net = |j: usize| {
                let x = base + j;
                Ipv4Addr::new(10, (x >> 8) as u8, x as u8, 0)
            };
            ClaimedStack {
                spec: StackSpec {
                    name: StackName::new(&name).expect("valid name"),
                    vni: Vni::new(100).expect("valid vni"),
                    prefixes: (0..prefixes)
                        .map(|j| format!("{}/24", net(j)).parse().expect("valid prefix"))
                        .collect(),
                    router_ip: {
                        let o = net(0).octets();
                        Ipv4Addr::new(o[0], o[1], o[2], 254)
                    },
                },
                claimed_ms: 1_800_000_000_000 + k as u64,
                generation: 1,
            }
        })
        .collect()
}

pub fn sim_addr(i: usize) -> SocketAddrV4 {
    let i = i as u32 + 1;
    SocketAddrV4::new(Ipv4Addr::from(0x0a00_0000 | i), SIM_PORT)
}

impl Sim {
    /// `n` nodes, none started yet.
    pub fn new(n: usize, params: Params, seed: u64) -> Sim {
        let addrs: Vec<SocketAddrV4> = (0..n).map(sim_addr).collect();
        Sim {
            nodes: (0..n).map(|_| None).collect(),
            by_addr: addrs.iter().enumerate().map(|(i, a)| (*a, i)).collect(),
            addrs,
            queue: BinaryHeap::new(),
            deadlines: BinaryHeap::new(),
            seq: 0,
            now: 0,
            rng: StdRng::seed_from_u64(seed),
            loss: 0.0,
            latency: (1, 1),
            blocked: HashSet::new(),
            nat: HashMap::new(),
            wire_bytes: vec![0; n],
            wire_packets: vec![0; n],
            max_datagram: 0,
            secret: "simulated-cluster-secret-0001".into(),
            params,
            seed,
            wall0: 1_800_000_000_000,
        }
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node_id(i: usize) -> NodeId {
        NodeId(0x1000_0000_0000_0000 | (i as u64).wrapping_mul(0x9E37_79B9))
    }

    /// Starts node `i` (again, after a crash: same id, new incarnation), joining
    /// through `join` (node indices).
    pub fn start(&mut self, i: usize, stacks: Vec<ClaimedStack>, join: &[usize]) {
        let record = NodeRecord {
            id: Sim::node_id(i),
            version: 0,
            gossip_addr: self.addrs[i],
            underlay: *self.addrs[i].ip(),
            vxlan_port: 4789,
            stacks,
            left: false,
            bump: 0,
            encryption: None,
            nat: None,
            relay: None,
        };
        let keys = Keyring::from_secrets(&[self.secret.as_str()]).expect("valid secret");
        let mut node = Node::new(
            self.params.clone(),
            record,
            keys,
            self.now,
            self.wall0 + self.now,
            self.seed ^ (i as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D) ^ self.now,
        );
        node.set_join(join.iter().map(|j| self.addrs[*j]).collect());
        self.nodes[i] = Some(node);
        self.service(i);
    }

    /// Stops node `i` abruptly (its packets in flight are still delivered to others).
    pub fn crash(&mut self, i: usize) {
        self.nodes[i] = None;
    }

    pub fn node(&self, i: usize) -> Option<&Node> {
        self.nodes[i].as_ref()
    }

    pub fn node_mut(&mut self, i: usize) -> Option<&mut Node> {
        self.nodes[i].as_mut()
    }

    /// Replaces node `i`'s stacks.
    pub fn set_stacks(&mut self, i: usize, stacks: Vec<ClaimedStack>) -> Result<bool, String> {
        let now = self.now;
        let n = self.nodes[i].as_mut().ok_or("node is not running")?;
        let r = n.record().clone();
        let changed = n.update(
            now,
            r.gossip_addr,
            r.underlay,
            r.vxlan_port,
            stacks,
            r.encryption.clone(),
        )?;
        self.service(i);
        Ok(changed)
    }

    /// Blocks traffic both ways between every node of `a` and every node of `b`.
    pub fn partition(&mut self, a: &[usize], b: &[usize]) {
        for x in a {
            for y in b {
                self.blocked.insert((*x, *y));
                self.blocked.insert((*y, *x));
            }
        }
    }

    /// Puts node `i` behind a NAT whose outside address is `outside` (a port other
    /// than its own: a port-translating NAT); `inside` are the nodes behind the same
    /// NAT, which reach it at its own address and see its own address.
    pub fn set_nat(&mut self, i: usize, outside: SocketAddrV4, inside: &[usize]) {
        self.by_addr.insert(outside, i);
        self.nat.insert(
            i,
            Nat {
                outside,
                inside: inside.iter().copied().collect(),
            },
        );
    }

    /// Runs `f` on node `i` (if running) and sends what it wants sent.
    pub fn with_node<T>(&mut self, i: usize, f: impl FnOnce(&mut Node) -> T) -> Option<T> {
        let r = self.nodes[i].as_mut().map(f);
        self.service(i);
        r
    }

    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    /// Moves packets out of node `i` onto the wire and records its next deadline.
    fn service(&mut self, i: usize) {
        let Some(node) = self.nodes[i].as_mut() else {
            return;
        };
        let out = node.take_outbox();
        let deadline = node.next_deadline();
        for (to, data) in out {
            self.wire_bytes[i] += data.len() as u64 + IP_UDP_HEADERS;
            self.wire_packets[i] += 1;
            self.max_datagram = self.max_datagram.max(data.len());
            let Some(&dst) = self.by_addr.get(&to) else {
                continue;
            };
            if self.blocked.contains(&(i, dst)) {
                continue;
            }
            let inside = |a: usize, b: usize| {
                a == b || self.nat.get(&a).is_none_or(|n| n.inside.contains(&b))
            };
            if to == self.addrs[dst] && !inside(dst, i) {
                continue;
            }
            let from = match self.nat.get(&i) {
                Some(n) if !inside(i, dst) => n.outside,
                _ => self.addrs[i],
            };
            if self.loss > 0.0 && self.rng.random::<f64>() < self.loss {
                continue;
            }
            let delay = if self.latency.1 > self.latency.0 {
                self.rng.random_range(self.latency.0..=self.latency.1)
            } else {
                self.latency.0
            };
            self.seq += 1;
            self.queue
                .push(Reverse((self.now + delay, self.seq, dst, from, data)));
        }
        if deadline != u64::MAX {
            self.deadlines.push(Reverse((deadline.max(self.now), i)));
        }
    }

    /// Runs the simulation up to time `until` (ms).
    pub fn run_until(&mut self, until: u64) {
        loop {
            let next_pkt = self
                .queue
                .peek()
                .map(|Reverse((t, ..))| *t)
                .unwrap_or(u64::MAX);
            let next_timer = self
                .deadlines
                .peek()
                .map(|Reverse((t, _))| *t)
                .unwrap_or(u64::MAX);
            let next = next_pkt.min(next_timer);
            if next > until {
                self.now = until;
                return;
            }
            self.now = next;
            if next_pkt <= next_timer {
                let Reverse((_, _, dst, from, data)) = self.queue.pop().expect("peeked");
                if let Some(n) = self.nodes[dst].as_mut() {
                    n.handle_packet(self.now, from, &data);
                    self.service(dst);
                }
            } else {
                let Reverse((t, i)) = self.deadlines.pop().expect("peeked");
                if let Some(n) = self.nodes[i].as_mut() {
                    if n.next_deadline() <= t {
                        n.tick(self.now);
                        self.service(i);
                    }
                }
            }
        }
    }

    /// Runs in steps of `step` ms until `cond` holds or `deadline`; returns the time it
    /// first held.
    pub fn run_until_true(
        &mut self,
        deadline: u64,
        step: u64,
        mut cond: impl FnMut(&Sim) -> bool,
    ) -> Option<u64> {
        while self.now < deadline {
            if cond(self) {
                return Some(self.now);
            }
            let t = (self.now + step).min(deadline);
            self.run_until(t);
        }
        cond(self).then_some(self.now)
    }

    /// Whether every running node holds a record of node `i` at least at `version` with
    /// the given state predicate.
    pub fn all_see(&self, i: usize, pred: impl Fn(&crate::node::MemberView) -> bool) -> bool {
        let id = Sim::node_id(i);
        self.nodes
            .iter()
            .enumerate()
            .filter(|(j, n)| *j != i && n.is_some())
            .all(|(_, n)| {
                n.as_ref()
                    .expect("filtered")
                    .members()
                    .iter()
                    .any(|m| m.record.id == id && pred(m))
            })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::node::MemberState;

    /// One stack `s<i>` on 10.<i+1>.0.0/24 (also used by node.rs's tests).
    pub(crate) fn stack(i: usize) -> Vec<ClaimedStack> {
        vec![ClaimedStack {
            spec: StackSpec {
                name: StackName::new(&format!("s{i}")).unwrap(),
                vni: Vni::new(100).unwrap(),
                prefixes: vec![format!("10.{}.0.0/24", i + 1).parse().unwrap()],
                router_ip: format!("10.{}.0.254", i + 1).parse().unwrap(),
            },
            claimed_ms: 1,
            generation: 1,
        }]
    }

    fn mesh(n: usize, seed: u64) -> Sim {
        let mut s = Sim::new(n, Params::default(), seed);
        s.start(0, stack(0), &[]);
        for i in 1..n {
            s.start(i, stack(i), &[0]);
        }
        s
    }

    fn converged(s: &Sim) -> bool {
        (0..s.len()).all(|i| s.node(i).is_none() || s.all_see(i, |m| m.state == MemberState::Alive))
    }

    #[test]
    fn five_nodes_join_through_one_address() {
        let mut s = mesh(5, 1);
        let t = s.run_until_true(5_000, 10, converged).expect("converges");
        assert!(t < 2_000, "took {t} ms");
        for i in 0..5 {
            let n = s.node(i).unwrap();
            assert_eq!(n.members().len(), 4);
            assert!(n.members().iter().all(|m| m.record.stacks.len() == 1));
        }
    }

    #[test]
    fn a_crashed_node_is_declared_down_and_a_restart_rejoins() {
        let mut s = mesh(5, 2);
        s.run_until_true(5_000, 10, converged).expect("converges");
        let t0 = s.now();
        s.crash(3);
        let t = s
            .run_until_true(t0 + 10_000, 10, |s| {
                s.all_see(3, |m| m.state == MemberState::Down)
            })
            .expect("declared down");
        assert!(t - t0 <= 5_000, "detection took {} ms", t - t0);
        // The record survives (routes stay if the datapath still answers).
        assert!(s.all_see(3, |m| m.record.stacks.len() == 1));
        s.start(3, stack(3), &[0]);
        let t1 = s.now();
        s.run_until_true(t1 + 10_000, 10, |s| {
            s.all_see(3, |m| m.state == MemberState::Alive)
        })
        .expect("rejoined");
    }

    #[test]
    fn anti_entropy_alone_carries_a_new_stack() {
        let mut s = mesh(5, 3);
        s.run_until_true(5_000, 10, converged).expect("converges");
        for i in 0..5 {
            s.node_mut(i).unwrap().set_faults(crate::node::Faults {
                drop_broadcasts: true,
            });
        }
        let mut st = stack(1);
        st.extend(stack(7));
        s.set_stacks(1, st).unwrap();
        let t0 = s.now();
        let t = s
            .run_until_true(t0 + 30_000, 10, |s| {
                s.all_see(1, |m| m.record.stacks.len() == 2)
            })
            .expect("anti-entropy delivers");
        assert!(t - t0 < 15_000, "took {} ms", t - t0);
    }

    #[test]
    fn a_wrong_key_never_gets_in() {
        let mut s = mesh(4, 4);
        s.run_until_true(5_000, 10, |s| {
            (0..3).all(|i| s.all_see(i, |m| m.state == MemberState::Alive))
        })
        .expect("converges");
        // Node 3 is re-keyed to another secret and restarted.
        s.crash(3);
        let t = s.now();
        s.run_until(t + 8_000);
        s.secret = "a-completely-different-secret".into();
        s.start(3, stack(3), &[0]);
        let before = s.node(0).unwrap().counters().rejected_bad_key;
        let t = s.now();
        s.run_until(t + 5_000);
        assert!(s.node(0).unwrap().counters().rejected_bad_key > before);
        assert_eq!(s.node(3).unwrap().members().len(), 0, "learned nothing");
        assert!(s.all_see(3, |m| m.state == MemberState::Down));
    }

    #[test]
    fn partition_heals_to_the_full_mesh() {
        let mut s = mesh(5, 5);
        s.run_until_true(5_000, 10, converged).expect("converges");
        s.partition(&[0, 1], &[2, 3, 4]);
        let t = s.now();
        s.run_until_true(t + 15_000, 50, |s| {
            s.node(0)
                .unwrap()
                .members()
                .iter()
                .filter(|m| m.state == MemberState::Down)
                .count()
                == 3
                && s.node(4)
                    .unwrap()
                    .members()
                    .iter()
                    .filter(|m| m.state == MemberState::Down)
                    .count()
                    == 2
        })
        .expect("each side sees the other down");
        s.heal();
        let t = s.now();
        let done = s.run_until_true(t + 20_000, 50, converged).expect("heals");
        eprintln!("healed in {} ms", done - t);
    }

    #[test]
    fn a_host_cut_off_and_back_sees_everyone_alive() {
        for seed in 10..16 {
            let mut s = mesh(5, seed);
            s.run_until_true(5_000, 10, converged).expect("converges");
            s.partition(&[3], &[0, 1, 2, 4]);
            let t = s.now();
            s.run_until_true(t + 15_000, 50, |s| {
                s.all_see(3, |m| m.state == MemberState::Down)
            })
            .expect("cut off");
            s.run_until(s.now() + 2_000);
            s.heal();
            let t = s.now();
            let done = s.run_until_true(t + 10_000, 50, converged);
            let stuck: Vec<String> = (0..5)
                .flat_map(|i| {
                    s.node(i)
                        .unwrap()
                        .members()
                        .into_iter()
                        .filter(|m| m.state != MemberState::Alive)
                        .map(move |m| format!("{i} sees {} {:?}", m.record.id, m.state))
                })
                .collect();
            assert!(
                done.is_some(),
                "seed {seed}: not converged 10 s after heal: {stuck:?}"
            );
        }
    }

    #[test]
    fn an_idle_mesh_is_quiet_and_versions_hold() {
        let mut s = mesh(10, 8);
        s.run_until_true(5_000, 10, converged).expect("converges");
        s.run_until(s.now() + 5_000);
        // A change is broadcast, and the broadcast comes back to its origin: that must
        // not count as a newer record of itself (it did, and versions climbed forever).
        let mut st = stack(4);
        st.extend(stack(9));
        s.set_stacks(4, st).unwrap();
        s.run_until(s.now() + 3_000);
        let versions: Vec<u64> = (0..10)
            .map(|i| s.node(i).unwrap().record().version)
            .collect();
        let bytes0: u64 = s.wire_bytes.iter().sum();
        let t = s.now();
        s.run_until(t + 30_000);
        let after: Vec<u64> = (0..10)
            .map(|i| s.node(i).unwrap().record().version)
            .collect();
        assert_eq!(versions, after, "records changed while idle");
        let kbit = (s.wire_bytes.iter().sum::<u64>() - bytes0) as f64 * 8.0 / 1000.0 / 30.0 / 10.0;
        assert!(kbit < 10.0, "idle traffic {kbit:.1} kbit/s per node");
    }

    #[test]
    fn leave_is_seen_as_left() {
        let mut s = mesh(5, 6);
        s.run_until_true(5_000, 10, converged).expect("converges");
        let now = s.now();
        s.node_mut(2).unwrap().leave(now);
        s.service(2);
        let t = s
            .run_until_true(now + 3_000, 10, |s| {
                s.all_see(2, |m| {
                    m.state == MemberState::Left && m.record.stacks.is_empty()
                })
            })
            .expect("left everywhere");
        assert!(t - now < 1_000, "took {} ms", t - now);
    }

    #[test]
    fn loss_of_five_percent_causes_no_false_down() {
        let mut s = mesh(10, 7);
        s.run_until_true(5_000, 10, converged).expect("converges");
        s.loss = 0.05;
        let t = s.now();
        let mut downs = 0;
        let mut at = t;
        while at < t + 120_000 {
            at += 500;
            s.run_until(at);
            for i in 0..10 {
                downs += s
                    .node(i)
                    .unwrap()
                    .members()
                    .iter()
                    .filter(|m| m.state == MemberState::Down)
                    .count();
            }
        }
        assert_eq!(downs, 0);
    }

    /// Node 1 holds 100 stacks with random 64-character names and 4 prefixes each.
    fn big_mesh(n: usize, seed: u64, params: Params) -> Sim {
        let mut s = Sim::new(n, params, seed);
        s.start(0, stack(0), &[]);
        for i in 1..n {
            let st = if i == 1 {
                long_stacks(seed, 100, 4)
            } else {
                stack(i)
            };
            s.start(i, st, &[0]);
        }
        s
    }

    fn holds(s: &Sim, i: usize, names: &[StackName]) -> bool {
        s.all_see(i, |m| {
            m.record.stacks.len() == names.len()
                && m.record.stacks.iter().all(|c| names.contains(&c.spec.name))
        })
    }

    #[test]
    fn a_hundred_long_named_stacks_reach_everyone_and_a_removal_is_withdrawn() {
        let mut s = big_mesh(6, 21, Params::default());
        let all: Vec<StackName> = long_stacks(21, 100, 4)
            .into_iter()
            .map(|c| c.spec.name)
            .collect();
        s.run_until_true(10_000, 10, |s| converged(s) && holds(s, 1, &all))
            .expect("every node holds all 100 stacks");
        let mut fewer = long_stacks(21, 100, 4);
        fewer.remove(37);
        let names: Vec<StackName> = fewer.iter().map(|c| c.spec.name.clone()).collect();
        s.set_stacks(1, fewer).unwrap();
        let t0 = s.now();
        let t = s
            .run_until_true(t0 + 10_000, 1, |s| holds(s, 1, &names))
            .expect("the removal reaches everyone");
        assert!(t - t0 < 1_000, "took {} ms", t - t0);
        assert!(
            s.max_datagram <= crate::node::MAX_DATAGRAM,
            "{}",
            s.max_datagram
        );
        for i in 0..6 {
            assert_eq!(s.node(i).unwrap().counters().rejected_malformed, 0);
        }
    }

    #[test]
    fn anti_entropy_alone_carries_a_hundred_stacks() {
        let mut s = mesh(4, 22);
        s.run_until_true(5_000, 10, converged).expect("converges");
        for i in 0..4 {
            s.node_mut(i).unwrap().set_faults(crate::node::Faults {
                drop_broadcasts: true,
            });
        }
        let big = long_stacks(22, 100, 4);
        let names: Vec<StackName> = big.iter().map(|c| c.spec.name.clone()).collect();
        s.set_stacks(2, big).unwrap();
        let t0 = s.now();
        s.run_until_true(t0 + 20_000, 10, |s| holds(s, 2, &names))
            .expect("anti-entropy delivers every part");
        assert!(
            s.max_datagram <= crate::node::MAX_DATAGRAM,
            "{}",
            s.max_datagram
        );
    }

    #[test]
    fn two_formats_side_by_side_converge() {
        let mut s = Sim::new(6, Params::default(), 23);
        for i in 0..6 {
            let st = if i == 1 || i == 2 {
                long_stacks(23 + i as u64, 30, 4)
            } else {
                stack(i)
            };
            s.start(i, st, if i == 0 { &[] } else { &[0] });
            if i % 2 == 0 {
                s.node_mut(i)
                    .unwrap()
                    .set_format(crate::record::Format::newer_for_tests());
            }
        }
        s.run_until_true(10_000, 10, |s| {
            converged(s)
                && s.all_see(1, |m| m.record.stacks.len() == 30)
                && s.all_see(2, |m| m.record.stacks.len() == 30)
        })
        .expect("a mesh of two formats converges");
        // A change on a newer node reaches the older ones, and the other way round.
        s.set_stacks(2, stack(12)).unwrap();
        s.set_stacks(3, stack(13)).unwrap();
        let t0 = s.now();
        s.run_until_true(t0 + 5_000, 10, |s| {
            s.all_see(2, |m| m.record.stacks == stack(12))
                && s.all_see(3, |m| m.record.stacks == stack(13))
        })
        .expect("changes cross formats");
        for i in 0..6 {
            let c = s.node(i).unwrap().counters();
            assert_eq!(
                c.rejected_malformed, 0,
                "node {i} dropped packets as malformed"
            );
            assert!(c.skipped_unknown > 0, "node {i} saw no newer message kind");
        }
        // An older node relays a newer node's record byte for byte: its new field lives.
        let newer = s.node(2).unwrap().held_parts(Sim::node_id(2)).unwrap();
        assert_eq!(
            s.node(1).unwrap().held_parts(Sim::node_id(2)).unwrap(),
            newer
        );
        assert!(newer[0].ends_with(&crate::record::Format::newer_for_tests().appended));
    }

    #[test]
    fn a_record_down_past_retention_is_pruned_and_not_brought_back() {
        let params = Params {
            retention_ms: 20_000,
            ..Params::default()
        };
        let mut s = Sim::new(5, params, 24);
        s.start(0, stack(0), &[]);
        for i in 1..5 {
            s.start(i, stack(i), &[0]);
        }
        s.run_until_true(5_000, 10, converged).expect("converges");
        s.crash(3);
        let id = Sim::node_id(3);
        let gone = |s: &Sim| {
            (0..5).filter(|i| *i != 3).all(|i| {
                s.node(i)
                    .is_none_or(|n| n.members().iter().all(|m| m.record.id != id))
            })
        };
        let t0 = s.now();
        let t = s
            .run_until_true(t0 + 40_000, 100, gone)
            .expect("pruned everywhere");
        assert!(t - t0 >= 20_000, "pruned before the retention time");
        // An observer restarts: the record must not come back from anyone, and no node
        // may see node 3 alive again, also past foca's own removal of down members.
        s.crash(0);
        s.run_until(s.now() + 1_000);
        s.start(0, stack(0), &[1]);
        let end = s.now() + 90_000;
        while s.now() < end {
            let t = s.now() + 500;
            s.run_until(t);
            assert!(
                !(0..5).any(|i| i != 3
                    && s.node(i).is_some_and(|n| n
                        .members()
                        .iter()
                        .any(|m| m.record.id == id && m.state == MemberState::Alive))),
                "node 3 came back as alive at {t}"
            );
        }
        assert!(gone(&s), "a stale copy brought the record back");
        // The node itself rejoins with a newer version.
        s.start(3, stack(3), &[0]);
        let t0 = s.now();
        s.run_until_true(t0 + 10_000, 10, |s| {
            s.all_see(3, |m| {
                m.state == MemberState::Alive && m.record.stacks == stack(3)
            })
        })
        .expect("the node itself rejoins");
    }

    #[test]
    fn a_prune_reaches_a_node_that_learned_the_record_late() {
        let params = Params {
            retention_ms: 20_000,
            ..Params::default()
        };
        let mut s = Sim::new(5, params, 26);
        s.start(0, stack(0), &[]);
        for i in 1..5 {
            s.start(i, stack(i), &[0]);
        }
        s.run_until_true(5_000, 10, converged).expect("converges");
        s.crash(3);
        let t0 = s.now();
        // Node 0 restarts 15 s later and learns node 3's record again from the others;
        // its own retention clock for it starts only then.
        s.run_until(t0 + 15_000);
        s.crash(0);
        s.start(0, stack(0), &[1]);
        let id = Sim::node_id(3);
        let t = s
            .run_until_true(t0 + 60_000, 100, |s| {
                (0..5).filter(|i| *i != 3).all(|i| {
                    s.node(i)
                        .unwrap()
                        .members()
                        .iter()
                        .all(|m| m.record.id != id)
                })
            })
            .expect("pruned everywhere");
        // The others' tombstones reach node 0 within a few anti-entropy rounds, well
        // before its own retention time for the record (15 + 20 s) runs out.
        assert!(t - t0 < 28_000, "took {} ms", t - t0);
        assert!(s.node(0).unwrap().pruned_count() >= 1);
    }

    #[test]
    fn records_and_members_are_capped() {
        let params = Params {
            max_members: 3,
            ..Params::default()
        };
        let mut s = Sim::new(8, Params::default(), 25);
        s.start(0, stack(0), &[]);
        for i in 1..8 {
            s.start(i, stack(i), &[0]);
        }
        s.params = params;
        s.crash(7);
        s.start(7, stack(7), &[0]);
        s.params = Params::default();
        s.run_until(s.now() + 10_000);
        let capped = s.node(7).unwrap();
        assert!(capped.members().len() <= 3, "{}", capped.members().len());
        assert!(capped.counters().refused_full > 0);
        // The others are not held back by it.
        s.run_until_true(s.now() + 5_000, 10, |s| {
            (0..7).all(|i| s.all_see(i, |m| m.state == MemberState::Alive) || i == 7)
        });
        for i in 0..7 {
            assert_eq!(s.node(i).unwrap().members().len(), 7);
        }
    }
}
