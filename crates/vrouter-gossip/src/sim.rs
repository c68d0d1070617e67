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
    /// Bytes sent per node, with IP and UDP headers.
    pub wire_bytes: Vec<u64>,
    pub wire_packets: Vec<u64>,
    secret: String,
    params: Params,
    seed: u64,
    /// Wall clock at simulated time zero.
    wall0: u64,
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
            wire_bytes: vec![0; n],
            wire_packets: vec![0; n],
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
        let changed = n.update(now, r.gossip_addr, r.underlay, r.vxlan_port, stacks)?;
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
            let Some(&dst) = self.by_addr.get(&to) else {
                continue;
            };
            if self.blocked.contains(&(i, dst)) {
                continue;
            }
            if self.loss > 0.0 && self.rng.random::<f64>() < self.loss {
                continue;
            }
            let delay = if self.latency.1 > self.latency.0 {
                self.rng.random_range(self.latency.0..=self.latency.1)
            } else {
                self.latency.0
            };
            self.seq += 1;
            self.queue.push(Reverse((
                self.now + delay,
                self.seq,
                dst,
                self.addrs[i],
                data,
            )));
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
mod tests {
    use super::*;
    use crate::node::MemberState;
    use vrouter_state::{StackName, StackSpec, Vni};

    fn stack(i: usize) -> Vec<ClaimedStack> {
        vec![ClaimedStack {
            spec: StackSpec {
                name: StackName::new(&format!("s{i}")).unwrap(),
                vni: Vni::new(100).unwrap(),
                prefixes: vec![format!("10.{}.0.0/24", i + 1).parse().unwrap()],
                router_ip: format!("10.{}.0.254", i + 1).parse().unwrap(),
            },
            claimed_ms: 1,
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
}
