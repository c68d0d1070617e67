//! A fuzzer for everything a peer can send, on stable Rust: the wire messages, the
//! record, the seal layer, and [`Node::handle_packet`] fed packets sealed with the
//! right key and fresh sequence numbers (so they pass authentication and the replay
//! check and reach the decoders behind them).
//!
//! Inputs come from three sources, mixed: messages generated field by field with
//! edge values (0, `u64::MAX`, the version bound, ranges either way round, counts
//! past the caps, part indices past their count, parts of one version with different
//! counts), so invalid combinations of valid fields are common, framed in this
//! build's format, the next one's (an appended field) or a random one, plus message
//! tags no build knows; real packets captured from two nodes gossiping (SWIM, joins,
//! anti-entropy, record parts), mutated as bytes (bit flips, boundary bytes, long
//! varints, cuts, splices); and random bytes.
//! Generation goes through the serde types and mutation is generic over bytes, so a
//! change of the wire format needs only [`kind`] and [`generate`] updated (the
//! compiler points at `kind`).
//!
//! Panics are caught (`catch_unwind`) and reported with the input that caused them;
//! build with `panic = "unwind"` (the `fuzz` profile) and overflow checks on, so an
//! overflow on a received value is a crash too.

use crate::node::{Node, Params};
use crate::record::{self as rec, ClaimedStack, Format, Member, NodeId, NodeRecord, RecordPart};
use crate::seal::{Keyring, Reject, Sealer};
use crate::sim::sim_addr;
use crate::validate;
use crate::wire::{self, Decoded, Wire};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};
use vrouter_state::{Prefix, StackName, StackSpec, Vni};

/// Every message type, in the order reports list them. [`kind`] maps a message to its
/// name and [`generate`] makes one of each: the only places that know the variants.
/// Messages of a tag this build does not know are counted as `node.unknown`.
pub const KINDS: &[&str] = &[
    "swim",
    "join",
    "join_ack",
    "sync",
    "digest",
    "want",
    "parts",
    "push",
    "pruned",
    "probe",
    "probe_ack",
];

fn kind(w: &Wire) -> &'static str {
    match w {
        Wire::Swim(_) => "swim",
        Wire::Join(_) => "join",
        Wire::JoinAck(_) => "join_ack",
        Wire::Sync { .. } => "sync",
        Wire::Digest { .. } => "digest",
        Wire::Want(_) => "want",
        Wire::Parts(_) => "parts",
        Wire::Push(_) => "push",
        Wire::Pruned(_) => "pruned",
        Wire::Probe { .. } => "probe",
        Wire::ProbeAck { .. } => "probe_ack",
    }
}

/// One message of type `KINDS[k]`, fields drawn with edge values.
fn generate(g: &mut Gen, k: usize) -> Wire {
    match KINDS[k] {
        "swim" if g.rng.random_bool(0.5) => Wire::Swim(g.swim_packet()),
        "swim" => Wire::Swim(g.corpus_swim()),
        "join" => Wire::Join(g.member()),
        "join_ack" => Wire::JoinAck(g.member()),
        "sync" => Wire::Sync {
            hash: g.num(),
            count: g.num() as u32,
        },
        "digest" => {
            // Either way round: lo above hi is exactly what must not crash.
            let (lo, hi) = (g.id(), g.id());
            let n = g.count(validate::MAX_DIGEST_ENTRIES);
            let entries = (0..n).map(|_| (g.id(), g.num())).collect();
            Wire::Digest { lo, hi, entries }
        }
        "want" => {
            let n = g.count(validate::MAX_WANT);
            Wire::Want((0..n).map(|_| g.id()).collect())
        }
        "parts" => Wire::Parts(g.parts()),
        "push" => Wire::Push(g.parts()),
        "pruned" => {
            let n = g.count(validate::MAX_PRUNED);
            Wire::Pruned((0..n).map(|_| (g.id(), g.num())).collect())
        }
        "probe" => Wire::Probe { token: g.num() },
        // Tokens of probes the target really sent now and then (outstanding ones),
        // so acks reach the path table, the reflection and the record.
        "probe_ack" => Wire::ProbeAck {
            token: if !g.tokens.is_empty() && g.rng.random_bool(0.7) {
                let t = g.tokens.clone();
                *g.pick(&t)
            } else {
                g.num()
            },
            seen: g.addr(),
        },
        other => unreachable!("KINDS lists {other} but generate does not make it"),
    }
}

/// What one run found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub seconds: f64,
    pub seed: u64,
    pub executions: u64,
    pub crashes: u64,
    /// The first input of each distinct panic (at most 20).
    pub crash_inputs: Vec<Crash>,
    /// Inputs that reached each stage: `node.<kind>` decoded as that message and were
    /// handed to the node (`.refused` when validation dropped them), `node.undecodable`,
    /// `seal.<outcome>`, `wire.decoded`, `record.decoded`, ...
    pub reached: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Crash {
    /// `node`, `seal`, `wire` or `record`.
    pub target: &'static str,
    /// For `node`: the plaintext sealed and handed to `handle_packet`; otherwise the
    /// bytes given to the decoder. Hex.
    pub input_hex: String,
    pub message: String,
}

const MAX_KEPT_CRASHES: usize = 20;
const SECRET: &str = "fuzzing-cluster-secret-000001";
/// Wall clock at fuzz time zero.
const WALL0: u64 = 1_800_000_000_000;
/// The target node is rebuilt this often, so that state builds up and is thrown away.
const NODE_LIFE: u64 = 3_000;

/// Runs for `seconds` (or `max_execs` inputs, whichever comes first).
pub fn run(seconds: f64, max_execs: u64, seed: u64) -> Report {
    install_panic_hook();
    let started = Instant::now();
    let budget = Duration::from_secs_f64(seconds.max(0.0));
    let mut f = Fuzzer::new(seed);
    let mut report = Report {
        seed,
        ..Report::default()
    };
    while report.executions < max_execs && started.elapsed() < budget {
        for _ in 0..64 {
            f.one(&mut report);
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

/// Hands one crash input of the `node` target (a plaintext, hex as reported) to a new
/// node that first heard the captured traffic (so it holds records and members),
/// sealed with a fresh sequence number; returns the panic message if it panics.
pub fn replay_node_input(hex_plain: &str) -> Result<(), String> {
    install_panic_hook();
    let plain = unhex(hex_plain).ok_or("the input is not hex")?;
    let keys = Keyring::from_secrets(&[SECRET]).expect("valid secret");
    let mut node = target_node(&keys, 60_000, 1);
    let mut sealer = Sealer::new(keys.clone(), 0x1111, 1);
    for p in capture(&keys).0 {
        node.handle_packet(60_000, sim_addr(0), &sealer.seal(&p));
    }
    let packet = sealer.seal(&plain);
    guarded(|| {
        node.handle_packet(60_001, sim_addr(0), &packet);
        node.tick(60_002);
    })
}

struct Fuzzer {
    g: Gen,
    keys: Keyring,
    node: Node,
    node_execs: u64,
    /// Key holders: sealers with fresh sequence numbers, one per sender id.
    senders: HashMap<u64, Sealer>,
    /// Real sealed packets, for the seal target.
    sealed: Vec<Vec<u8>>,
    opener: Sealer,
}

impl Fuzzer {
    fn new(seed: u64) -> Fuzzer {
        let keys = Keyring::from_secrets(&[SECRET]).expect("valid secret");
        let (plains, sealed) = capture(&keys);
        let mut g = Gen {
            rng: StdRng::seed_from_u64(seed),
            now: 60_000,
            ids: vec![NodeId(0), NodeId(u64::MAX), target_id()],
            target: Member {
                id: target_id(),
                addr: sim_addr(9),
                bump: 0,
            },
            corpus: plains,
            tokens: Vec::new(),
        };
        // The captured nodes' ids, so records and digests collide with real ones.
        for p in &g.corpus {
            if let Ok(Wire::Parts(ps) | Wire::Push(ps)) = wire::decode(p) {
                g.ids.extend(
                    ps.iter()
                        .filter_map(|b| rec::decode_part(b).ok())
                        .map(|p| p.id),
                );
            }
        }
        g.ids.sort();
        g.ids.dedup();
        let node = target_node(&keys, g.now, seed);
        g.target.bump = node.record().bump;
        Fuzzer {
            opener: Sealer::new(keys.clone(), 0xF0F0, 1),
            node,
            node_execs: 0,
            senders: HashMap::new(),
            sealed,
            keys,
            g,
        }
    }

    fn one(&mut self, report: &mut Report) {
        report.executions += 1;
        match self.g.rng.random_range(0..10) {
            0..=5 => self.node_target(report),
            6 => self.seal_target(report),
            7 | 8 => self.wire_target(report),
            _ => self.record_target(report),
        }
    }

    /// A plaintext: generated, a mutated generated or captured one, or random bytes.
    fn plaintext(&mut self) -> Vec<u8> {
        let g = &mut self.g;
        match g.rng.random_range(0..10) {
            0..=3 => g.framed(),
            4 | 5 => {
                let mut b = g.framed();
                g.mutate(&mut b);
                b
            }
            6..=8 => {
                let mut b = g.pick_corpus();
                g.mutate(&mut b);
                b
            }
            _ => g.random_bytes(64),
        }
    }

    fn node_target(&mut self, report: &mut Report) {
        if self.node_execs >= NODE_LIFE {
            self.node = target_node(&self.keys, self.g.now, self.g.rng.random());
            self.g.target.bump = self.node.record().bump;
            self.node_execs = 0;
        }
        self.node_execs += 1;
        let plain = self.plaintext();
        let stage = match wire::decode(&plain) {
            Ok(w) if validate::wire(&w, validate::horizon(WALL0 + self.g.now)).is_ok() => {
                format!("node.{}", kind(&w))
            }
            Ok(w) => format!("node.{}.refused", kind(&w)),
            Err(Decoded::Unknown) => "node.unknown".to_string(),
            Err(Decoded::Malformed) => "node.undecodable".to_string(),
        };
        *report.reached.entry(stage).or_default() += 1;
        let g = &mut self.g;
        let sender = *g.pick(&g.ids.clone());
        let sealer = self
            .senders
            .entry(sender.0)
            .or_insert_with(|| Sealer::new(self.keys.clone(), sender.0, 1));
        let packet = sealer.seal(&plain);
        g.now += g.rng.random_range(0..500);
        let now = g.now;
        let from = sim_addr(g.rng.random_range(0..4));
        let tick = g.rng.random_range(0..8) == 0;
        let node = &mut self.node;
        let r = guarded(|| {
            node.handle_packet(now, from, &packet);
            if tick {
                node.tick(now);
            }
            let out = node.take_outbox();
            let _ = node.take_events();
            let _ = node.members();
            let _ = node.paths();
            out
        });
        if let Ok(out) = &r {
            // The probes it sent: their tokens make acks that count.
            // (Probes are small and only sent by a tick: the rest is not opened.)
            for (_, data) in out.iter().filter(|(_, d)| tick && d.len() < 96) {
                if let Ok((_, p)) = self.opener.open(data) {
                    if let Ok(Wire::Probe { token }) = wire::decode(&p) {
                        self.g.tokens.push(token);
                    }
                }
            }
            let n = self.g.tokens.len();
            if n > 64 {
                self.g.tokens.drain(..n - 64);
            }
        }
        if let Err(message) = r {
            self.crash(report, "node", &plain, message);
            // Its locks may be poisoned: start again.
            self.node = target_node(&self.keys, self.g.now, self.g.rng.random());
            self.g.target.bump = self.node.record().bump;
            self.node_execs = 0;
        }
    }

    fn seal_target(&mut self, report: &mut Report) {
        let g = &mut self.g;
        let mut packet = match g.rng.random_range(0..8) {
            0 => g.random_bytes(1500),
            // Authentic, from a few senders with edge-value sequence numbers (0,
            // u64::MAX, big jumps): the replay window's arithmetic.
            1..=3 => {
                let sender = g.rng.random_range(0..4u64);
                let mut s = Sealer::new(self.keys.clone(), sender, g.num());
                s.seal(&g.random_bytes(32))
            }
            _ if self.sealed.is_empty() => g.random_bytes(1500),
            _ => g.pick(&self.sealed).clone(),
        };
        if g.rng.random_range(0..4) == 0 {
            g.mutate(&mut packet);
        }
        let opener = &mut self.opener;
        let r = guarded(|| opener.open(&packet));
        match r {
            Ok(Ok(_)) => *report.reached.entry("seal.opened".into()).or_default() += 1,
            Ok(Err(e)) => {
                let k = format!("seal.{}", reject_name(e));
                *report.reached.entry(k).or_default() += 1;
            }
            Err(message) => self.crash(report, "seal", &packet, message),
        }
    }

    fn wire_target(&mut self, report: &mut Report) {
        let bytes = self.plaintext();
        let horizon = validate::horizon(WALL0 + self.g.now);
        let r = guarded(|| {
            wire::decode(&bytes).ok().map(|w| {
                let parts = match &w {
                    Wire::Parts(p) | Wire::Push(p) => p.as_slice(),
                    _ => &[],
                };
                for p in parts {
                    let _ = rec::decode_part(p);
                }
                validate::wire(&w, horizon).is_ok()
            })
        });
        match r {
            Ok(Some(_)) => *report.reached.entry("wire.decoded".into()).or_default() += 1,
            Ok(None) => *report.reached.entry("wire.undecodable".into()).or_default() += 1,
            Err(message) => self.crash(report, "wire", &bytes, message),
        }
    }

    /// The record decoder, and a part's decoder and assembly: a record's parts, one
    /// of them mutated, assembled in a random order.
    fn record_target(&mut self, report: &mut Report) {
        let g = &mut self.g;
        let f = g.format();
        let r = g.record();
        let whole = g.rng.random_bool(0.5);
        let mut parts = if whole {
            vec![rec::encode(&r, &f)]
        } else {
            rec::split(&r, &f).unwrap_or_default()
        };
        if !parts.is_empty() && g.rng.random_range(0..4) != 0 {
            let i = g.rng.random_range(0..parts.len());
            g.mutate(&mut parts[i]);
        }
        let order: Vec<usize> = {
            let mut o: Vec<usize> = (0..parts.len()).collect();
            for i in (1..o.len()).rev() {
                o.swap(i, g.rng.random_range(0..=i));
            }
            o
        };
        let horizon = validate::horizon(WALL0 + g.now);
        let bytes = parts.concat();
        let r = guarded(|| {
            if whole {
                return rec::decode(&parts[0])
                    .ok()
                    .map(|r| (validate::record(&r, horizon).is_ok(), r.prefix_count()));
            }
            let mut asm: Option<rec::Assembly> = None;
            for i in order {
                let Ok(p) = rec::decode_part(&parts[i]) else {
                    continue;
                };
                let a = asm.get_or_insert_with(|| rec::Assembly::new(p.version, p.count, 0));
                if a.version != p.version || a.count() != p.count as usize {
                    continue;
                }
                if let Some(Ok((r, _))) = a.add(p, &parts[i]) {
                    return Some((validate::record(&r, horizon).is_ok(), r.prefix_count()));
                }
            }
            None
        });
        match r {
            Ok(Some(_)) => *report.reached.entry("record.decoded".into()).or_default() += 1,
            Ok(None) => {
                *report
                    .reached
                    .entry("record.undecodable".into())
                    .or_default() += 1
            }
            Err(message) => self.crash(report, "record", &bytes, message),
        }
    }

    fn crash(&mut self, report: &mut Report, target: &'static str, input: &[u8], message: String) {
        report.crashes += 1;
        // The first input of each distinct panic.
        let seen = report.crash_inputs.iter().any(|c| c.message == message);
        if !seen && report.crash_inputs.len() < MAX_KEPT_CRASHES {
            report.crash_inputs.push(Crash {
                target,
                input_hex: hex(input),
                message,
            });
        }
    }
}

fn reject_name(r: Reject) -> &'static str {
    r.as_str()
}

fn target_id() -> NodeId {
    NodeId(0x7A59_E700_0000_0001)
}

fn target_node(keys: &Keyring, now: u64, seed: u64) -> Node {
    let r = NodeRecord {
        id: target_id(),
        version: 0,
        gossip_addr: sim_addr(9),
        underlay: *sim_addr(9).ip(),
        vxlan_port: 4789,
        stacks: Vec::new(),
        left: false,
        bump: 0,
        encryption: None,
        nat: None,
        relay: None,
    };
    let mut n = Node::new(Params::default(), r, keys.clone(), now, WALL0 + now, seed);
    // Probes to the captured nodes' ids (and edge ids), relaying: path acks and
    // reports reach the path table and the published record.
    n.set_path_targets([NodeId(0x1111), NodeId(0x2222), NodeId(0), NodeId(u64::MAX)].into());
    n.set_relay(seed.is_multiple_of(2));
    n
}

/// Real traffic: two nodes join, exchange records and anti-entropy, change stacks and
/// one leaves. Returns the plaintexts and the sealed packets.
fn capture(keys: &Keyring) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mk = |i: usize, id: u64| {
        let r = NodeRecord {
            id: NodeId(id),
            version: 0,
            gossip_addr: sim_addr(i),
            underlay: *sim_addr(i).ip(),
            vxlan_port: 4789,
            stacks: vec![sample_stack(i)],
            left: false,
            bump: 0,
            encryption: Some(crate::record::Encryption {
                mode: vrouter_state::EncryptionMode::Require,
                public_key: Some([i as u8; 32]),
                next_public_key: None,
                tunnel: Some(Ipv4Addr::new(10, 255, 0, i as u8 + 1)),
                wg_port: 51820,
            }),
            nat: (i == 1).then_some(crate::record::NatInfo {
                observed: Ipv4Addr::new(203, 0, 113, 7),
                port_translated: true,
            }),
            relay: None,
        };
        let mut n = Node::new(Params::default(), r, keys.clone(), 0, WALL0, id);
        // Probes between the two, one relaying: probes and acks in the corpus.
        n.set_path_targets([NodeId(0x1111), NodeId(0x2222)].into());
        n.set_relay(i == 0);
        n
    };
    let mut nodes = [mk(0, 0x1111), mk(1, 0x2222)];
    nodes[1].set_join(vec![sim_addr(0)]);
    let mut opener = Sealer::new(keys.clone(), 0xC0C0, 1);
    let (mut plains, mut sealed) = (Vec::new(), Vec::new());
    for step in 0..200u64 {
        let now = step * 50;
        if step == 100 {
            let r = nodes[0].record().clone();
            let stacks = vec![sample_stack(0), sample_stack(5)];
            let _ = nodes[0].update(
                now,
                r.gossip_addr,
                r.underlay,
                r.vxlan_port,
                stacks,
                r.encryption.clone(),
            );
        }
        if step == 190 {
            nodes[1].leave(now);
        }
        for i in 0..2 {
            nodes[i].tick(now);
            for (to, data) in nodes[i].take_outbox() {
                if let Ok((_, p)) = opener.open(&data) {
                    plains.push(p);
                }
                sealed.push(data.clone());
                if let Some(j) = (0..2).find(|j| sim_addr(*j) == to) {
                    nodes[j].handle_packet(now, sim_addr(i), &data);
                }
            }
        }
    }
    (plains, sealed)
}

fn sample_stack(i: usize) -> ClaimedStack {
    ClaimedStack {
        spec: StackSpec {
            name: StackName::new(&format!("stack-{i}")).expect("valid"),
            vni: Vni::new(100 + i as u32).expect("valid"),
            prefixes: vec![Prefix::containing(Ipv4Addr::new(10, i as u8, 0, 0), 24)],
            router_ip: Ipv4Addr::new(10, i as u8, 0, 254),
        },
        claimed_ms: WALL0,
        generation: 1,
    }
}

/// Values and inputs, biased towards the edges.
struct Gen {
    rng: StdRng,
    now: u64,
    /// The target node's SWIM identity (packets addressed elsewhere stop early).
    target: Member,
    ids: Vec<NodeId>,
    corpus: Vec<Vec<u8>>,
    /// Tokens of probes the target node sent (acks with them count).
    tokens: Vec<u64>,
}

impl Gen {
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.rng.random_range(0..v.len())]
    }

    fn num(&mut self) -> u64 {
        let wall = WALL0 + self.now;
        match self.rng.random_range(0..10) {
            0 => 0,
            1 => 1,
            2 => u64::MAX,
            3 => u64::MAX - 1,
            4 => wall,
            5 => validate::horizon(wall),
            6 => validate::horizon(wall) + 1,
            7 => self.rng.random(),
            _ => wall.wrapping_add(self.rng.random_range(0..100_000)),
        }
    }

    fn id(&mut self) -> NodeId {
        if self.rng.random_bool(0.7) {
            let ids = self.ids.clone();
            *self.pick(&ids)
        } else {
            NodeId(self.num())
        }
    }

    /// A count: usually small, sometimes at or just past `cap`.
    fn count(&mut self, cap: usize) -> usize {
        match self.rng.random_range(0..10) {
            0 => cap,
            1 => cap + 1,
            _ => self.rng.random_range(0..6),
        }
    }

    fn addr(&mut self) -> SocketAddrV4 {
        let port = match self.rng.random_range(0..4) {
            0 => 0,
            _ => self.rng.random(),
        };
        SocketAddrV4::new(Ipv4Addr::from(self.rng.random::<u32>()), port)
    }

    fn member(&mut self) -> Member {
        Member {
            id: self.id(),
            addr: self.addr(),
            bump: self.num(),
        }
    }

    fn stack(&mut self) -> ClaimedStack {
        const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789_-.";
        let len = if self.rng.random_bool(0.2) {
            64
        } else {
            self.rng.random_range(1..12)
        };
        // A valid name: no leading '.' (a hidden probes file); invalid names are made
        // by the byte-level mutations.
        let name: String = (0..len)
            .map(|i| {
                *self.pick(if i == 0 {
                    &CHARS[..CHARS.len() - 1]
                } else {
                    CHARS
                }) as char
            })
            .collect();
        let prefixes = (0..self.count(4))
            .map(|_| {
                let len = self.rng.random_range(0..=32);
                Prefix::containing(Ipv4Addr::from(self.rng.random::<u32>()), len)
            })
            .collect();
        ClaimedStack {
            spec: StackSpec {
                name: StackName::new(&name).expect("charset and length are valid"),
                vni: Vni::new(self.rng.random_range(1..16_777_216)).expect("in range"),
                prefixes,
                router_ip: Ipv4Addr::from(self.rng.random::<u32>()),
            },
            claimed_ms: self.num(),
            generation: self.num(),
        }
    }

    fn record(&mut self) -> NodeRecord {
        let n = self.count(validate::MAX_STACKS_PER_RECORD).min(6);
        let mut stacks: Vec<ClaimedStack> = (0..n).map(|_| self.stack()).collect();
        if !stacks.is_empty() && self.rng.random_range(0..8) == 0 {
            stacks.push(stacks[0].clone());
        }
        NodeRecord {
            id: self.id(),
            version: self.num(),
            gossip_addr: self.addr(),
            underlay: Ipv4Addr::from(self.rng.random::<u32>()),
            vxlan_port: self.num() as u16,
            stacks,
            left: self.rng.random_bool(0.2),
            bump: self.num(),
            encryption: self.encryption(),
            nat: self.nat(),
            relay: self.relay(),
        }
    }

    /// Absent, or any address (unusable ones included).
    fn nat(&mut self) -> Option<crate::record::NatInfo> {
        self.rng.random_bool(0.5).then(|| crate::record::NatInfo {
            observed: *self.addr().ip(),
            port_translated: self.rng.random(),
        })
    }

    /// Absent, or an offer with edge values: empty, at or past the cap, repeated
    /// ids, rtt 0 or u16::MAX.
    fn relay(&mut self) -> Option<crate::record::RelayOffer> {
        if self.rng.random_bool(0.5) {
            return None;
        }
        let n = self.count(crate::record::MAX_RELAY_REACH);
        let reach = (0..n)
            .map(|_| crate::record::RelayReach {
                id: self.id(),
                rtt_ms: match self.rng.random_range(0..4) {
                    0 => 0,
                    1 => u16::MAX,
                    _ => self.rng.random_range(1..200),
                },
            })
            .collect();
        Some(crate::record::RelayOffer { reach })
    }

    /// Absent, or with edge values: unknown modes, a key with no mode, port 0, a
    /// tunnel address anywhere.
    fn encryption(&mut self) -> Option<crate::record::Encryption> {
        if self.rng.random_bool(0.3) {
            return None;
        }
        let key = |g: &mut Gen| g.rng.random_bool(0.7).then(|| g.rng.random::<[u8; 32]>());
        let mode = match self.rng.random_range(0..5) {
            0 => vrouter_state::EncryptionMode::Off,
            1 => vrouter_state::EncryptionMode::Require,
            2 => vrouter_state::EncryptionMode::Prefer,
            _ => vrouter_state::EncryptionMode::Other(format!(
                "mode {}",
                self.rng.random::<u8>() | 3
            )),
        };
        Some(crate::record::Encryption {
            mode,
            public_key: key(self),
            next_public_key: key(self),
            tunnel: self
                .rng
                .random_bool(0.8)
                .then(|| Ipv4Addr::from(self.rng.random::<u32>())),
            wg_port: self.num() as u16,
        })
    }

    /// A SWIM packet built field by field: a header (from anyone, to the target or
    /// anyone), a count and member updates, then record broadcasts.
    fn swim_packet(&mut self) -> Vec<u8> {
        let member = |g: &mut Gen| {
            if g.rng.random_bool(0.3) {
                g.target.clone()
            } else {
                g.member()
            }
        };
        let src = member(self);
        let dst = if self.rng.random_bool(0.8) {
            self.target.clone()
        } else {
            member(self)
        };
        let pn = self.rng.random();
        let other = member(self);
        let message = match self.rng.random_range(0..11) {
            0 => foca::Message::Ping(pn),
            1 => foca::Message::Ack(pn),
            2 => foca::Message::PingReq {
                target: other,
                probe_number: pn,
            },
            3 => foca::Message::IndirectPing {
                origin: other,
                probe_number: pn,
            },
            4 => foca::Message::IndirectAck {
                target: other,
                probe_number: pn,
            },
            5 => foca::Message::ForwardedAck {
                origin: other,
                probe_number: pn,
            },
            6 => foca::Message::Announce,
            7 => foca::Message::Feed,
            8 => foca::Message::Gossip,
            9 => foca::Message::Broadcast,
            _ => foca::Message::TurnUndead,
        };
        let header = foca::Header {
            src,
            src_incarnation: self.rng.random(),
            dst,
            message,
        };
        let mut out = Vec::new();
        let _ = foca::Codec::encode_header(&mut foca::PostcardCodec, &header, &mut out);
        let n = self.count(4) as u16;
        out.extend_from_slice(&n.to_be_bytes());
        for _ in 0..n {
            let state = *self.pick(&[foca::State::Alive, foca::State::Suspect, foca::State::Down]);
            let m = foca::Member::new(member(self), self.rng.random(), state);
            let _ = foca::Codec::encode_member(&mut foca::PostcardCodec, &m, &mut out);
        }
        for _ in 0..self.rng.random_range(0..3) {
            let r = self.record();
            let f = self.format();
            if let Some(b) = rec::split(&r, &f).ok().and_then(|p| p.into_iter().next()) {
                out.extend_from_slice(&b);
            }
        }
        out
    }

    /// The format a message or record is written in: this build's, the next one's (an
    /// appended field), or any number with random appended bytes.
    fn format(&mut self) -> Format {
        match self.rng.random_range(0..4) {
            0 | 1 => Format::default(),
            2 => Format::newer_for_tests(),
            _ => Format {
                version: self.rng.random(),
                appended: self.random_bytes(8),
            },
        }
    }

    /// A framed message: mostly a generated one of each kind, sometimes a tag no
    /// build knows (which the node must skip, not refuse).
    fn framed(&mut self) -> Vec<u8> {
        let f = self.format();
        if self.rng.random_range(0..12) == 0 {
            return wire::encode_unknown_for_tests(&f);
        }
        let k = self.rng.random_range(0..KINDS.len());
        let w = generate(self, k);
        wire::encode(&w, &f)
    }

    /// Encoded record parts: every part of a generated record (small or past one
    /// part; in order or not, some dropped), or parts built field by field with edge
    /// values (index past count, count 0 or past the cap, a version at the bound,
    /// counts that disagree within one version).
    fn parts(&mut self) -> Vec<Vec<u8>> {
        let f = self.format();
        if self.rng.random_bool(0.5) {
            let mut r = self.record();
            if self.rng.random_range(0..4) == 0 {
                // Past one part: a few long-named stacks.
                for _ in 0..self.rng.random_range(5..20) {
                    let mut s = self.stack();
                    s.spec.name = StackName::new(&format!("{:064}", self.rng.random::<u64>()))
                        .expect("64 digits");
                    r.stacks.push(s);
                }
            }
            let mut parts = rec::split(&r, &f).unwrap_or_default();
            if self.rng.random_range(0..4) == 0 {
                parts.reverse();
            }
            if parts.len() > 1 && self.rng.random_range(0..4) == 0 {
                let i = self.rng.random_range(0..parts.len());
                parts.remove(i);
            }
            return parts;
        }
        let n = self.count(validate::MAX_PARTS_PER_MESSAGE).min(8);
        let (id, version) = (self.id(), self.num());
        (0..n)
            .map(|_| {
                let count = match self.rng.random_range(0..6) {
                    0 => 0,
                    1 => rec::MAX_PARTS as u16,
                    2 => rec::MAX_PARTS as u16 + 1,
                    3 => u16::MAX,
                    _ => self.rng.random_range(1..4),
                };
                let index = match self.rng.random_range(0..4) {
                    0 => count,
                    1 => u16::MAX,
                    _ => self.rng.random_range(0..count.max(1)),
                };
                let max = if self.rng.random_bool(0.1) { 1500 } else { 64 };
                let p = RecordPart {
                    id,
                    version,
                    index,
                    count,
                    bytes: self.random_bytes(max),
                };
                let mut b = postcard::to_allocvec(&p).unwrap_or_default();
                b.extend_from_slice(&f.appended);
                b
            })
            .collect()
    }

    fn pick_corpus(&mut self) -> Vec<u8> {
        if self.corpus.is_empty() {
            return self.random_bytes(64);
        }
        let i = self.rng.random_range(0..self.corpus.len());
        self.corpus[i].clone()
    }

    /// A SWIM payload: a captured one's, or random bytes.
    fn corpus_swim(&mut self) -> Vec<u8> {
        for _ in 0..4 {
            if let Ok(Wire::Swim(b)) = wire::decode(&self.pick_corpus()) {
                let mut b = b;
                if self.rng.random_bool(0.5) {
                    self.mutate(&mut b);
                }
                return b;
            }
        }
        self.random_bytes(200)
    }

    fn random_bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.rng.random_range(0..=max);
        (0..n).map(|_| self.rng.random()).collect()
    }

    /// One to four byte-level mutations.
    fn mutate(&mut self, b: &mut Vec<u8>) {
        for _ in 0..self.rng.random_range(1..=4) {
            let len = b.len();
            let at = if len == 0 {
                0
            } else {
                self.rng.random_range(0..len)
            };
            match self.rng.random_range(0..9) {
                0 if len > 0 => b[at] ^= 1 << self.rng.random_range(0..8),
                1 if len > 0 => {
                    b[at] = *self.pick(&[0u8, 1, 0x7f, 0x80, 0xfe, 0xff]);
                }
                2 if len > 0 => b[at] = self.rng.random(),
                // A varint as long as it gets (u64::MAX), or one past it.
                3 => {
                    let v: &[u8] = if self.rng.random_bool(0.5) {
                        &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
                    } else {
                        &[
                            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
                        ]
                    };
                    b.splice(at..at, v.iter().copied());
                }
                4 => {
                    let n = self.rng.random_range(1..=8);
                    let ins: Vec<u8> = (0..n).map(|_| self.rng.random()).collect();
                    b.splice(at..at, ins);
                }
                5 if len > 0 => {
                    let end = (at + self.rng.random_range(1..=16)).min(len);
                    b.drain(at..end);
                }
                6 => b.truncate(at),
                // Duplicate a slice (repeated entries, records, stacks).
                7 if len > 0 => {
                    let end = (at + self.rng.random_range(1..=64)).min(len);
                    let copy = b[at..end].to_vec();
                    let to = self.rng.random_range(0..=len);
                    b.splice(to..to, copy);
                }
                // Splice in part of a captured message.
                _ => {
                    let other = self.pick_corpus();
                    if !other.is_empty() {
                        let s = self.rng.random_range(0..other.len());
                        let e = (s + self.rng.random_range(1..=32)).min(other.len());
                        b.splice(at..at, other[s..e].iter().copied());
                    }
                }
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

thread_local! {
    /// Set while a fuzz input runs on this thread: its panic message goes here instead
    /// of stderr (other threads' panics, e.g. other tests', print as usual).
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let mine = CAUGHT.with(|c| {
                let mut c = c.borrow_mut();
                if c.is_some() {
                    *c = Some(info.to_string());
                    true
                } else {
                    false
                }
            });
            if !mine {
                previous(info);
            }
        }));
    });
}

/// Whether this build checks arithmetic overflow (then an overflow is a crash).
pub fn overflow_checks() -> bool {
    install_panic_hook();
    guarded(|| std::hint::black_box(u8::MAX) + std::hint::black_box(1u8)).is_err()
}

/// Runs `f`, turning a panic into its message.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    CAUGHT.with(|c| *c.borrow_mut() = Some(String::new()));
    let r = catch_unwind(AssertUnwindSafe(f));
    let msg = CAUGHT.with(|c| c.borrow_mut().take()).unwrap_or_default();
    r.map_err(|_| if msg.is_empty() { "panic".into() } else { msg })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CI smoke: VROUTER_FUZZ_SECONDS (default 30) of fuzzing finds no crash and
    /// reaches every message type in the node.
    #[test]
    fn fuzz_smoke_finds_no_crash() {
        let secs: f64 = std::env::var("VROUTER_FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30.0);
        let r = run(secs, u64::MAX, 0x5EED);
        eprintln!(
            "fuzz smoke: {} executions in {:.1} s, {} crashes",
            r.executions, r.seconds, r.crashes
        );
        assert!(r.crashes == 0, "crashes: {:#?}", r.crash_inputs);
        for k in KINDS.iter().chain(&["unknown"]) {
            assert!(
                r.reached.get(&format!("node.{k}")).copied().unwrap_or(0) > 0,
                "no valid {k} reached the node: {:?}",
                r.reached
            );
        }
    }

    #[test]
    fn a_reported_input_can_be_replayed() {
        let w = Wire::Digest {
            lo: NodeId(9),
            hi: NodeId(1),
            entries: vec![],
        };
        let plain = wire::encode(&w, &Format::default());
        let h = hex(&plain);
        assert_eq!(unhex(&h).unwrap(), plain);
        // Refused by validation, so no panic (the code before validate.rs panicked).
        assert_eq!(replay_node_input(&h), Ok(()));
        assert!(replay_node_input("0g").is_err());
    }

    #[test]
    fn a_caught_panic_is_reported_with_its_message() {
        install_panic_hook();
        let r: Result<(), String> = guarded(|| panic!("boom {}", 42));
        assert!(r.unwrap_err().contains("boom 42"));
        assert_eq!(guarded(|| 7).unwrap(), 7);
    }
}
