//! One gossip node, sans-IO: SWIM membership through foca, versioned records spread by
//! broadcast (piggybacked on SWIM and pushed at once on change) and by anti-entropy
//! (a state hash with a random member every `anti_entropy`; on a mismatch, digests and
//! the missing records both ways; the same with every new member), and every packet
//! sealed. The caller feeds it packets and the time, and sends what it hands back.
//!
//! Time is milliseconds on a monotonic clock the caller chooses (the simulator's or the
//! process's); the wall clock is only used to version records and stamp claims, as
//! `wall_base_ms + now`.

use crate::path::{self, PathParams, PathTable, PathView, Reflection};
use crate::record::{
    self, Assembly, ClaimedStack, Format, Member, NatInfo, NodeId, NodeRecord, RelayOffer,
    RelayReach,
};
use crate::seal::{Keyring, Reject, ReplayState, Sealer, OVERHEAD};
use crate::validate;
use crate::wire::{self, Decoded, Wire};
use foca::{BroadcastHandler, Foca, Invalidates, Notification, Runtime, Timer};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest UDP payload a node sends (sealed), chosen to fit a 1500-byte path with room
/// for tunnels on the way.
pub const MAX_DATAGRAM: usize = 1400;
/// Largest plaintext inside one sealed datagram.
const MAX_PLAIN: usize = MAX_DATAGRAM - OVERHEAD;
/// Room left for the envelope around a foca packet.
const ENVELOPE: usize = 8;
/// Digest entries per packet.
const DIGEST_PAGE: usize = 60;
/// Record versions being assembled from parts at once; the least recently fed is
/// dropped beyond this (anti-entropy brings it again).
const MAX_PENDING: usize = 256;

/// The one parameter set used everywhere: in the daemon, the tests and the simulations.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Params {
    pub probe_period_ms: u64,
    pub probe_rtt_ms: u64,
    pub indirect_probes: usize,
    pub suspect_to_down_ms: u64,
    pub max_transmissions: u8,
    pub gossip_every_ms: u64,
    pub gossip_fanout: usize,
    pub announce_to_down_every_ms: u64,
    pub anti_entropy_ms: u64,
    pub join_retry_ms: u64,
    /// A record whose node has been down (or left, or never seen alive) this long is
    /// pruned, and stale copies of it are not taken back.
    pub retention_ms: u64,
    /// Most other nodes whose records (and memberships) are kept: memory stays bounded
    /// whatever members send. Above the 10,000-node simulation.
    pub max_members: usize,
}

impl Default for Params {
    fn default() -> Params {
        // Tuned on the simulator (N=10, 20 crashes, then 10 minutes at 5 % loss):
        // 1000/300/1500 ms detected in p50 3.9 s, max 5.8 s; 500/200/1000 in p50 2.2 s,
        // max 3.4 s; neither declared anyone down at 5 % loss.
        Params {
            probe_period_ms: 500,
            probe_rtt_ms: 200,
            indirect_probes: 3,
            suspect_to_down_ms: 1000,
            max_transmissions: 10,
            gossip_every_ms: 200,
            gossip_fanout: 3,
            announce_to_down_every_ms: 3000,
            anti_entropy_ms: 1000,
            join_retry_ms: 1000,
            retention_ms: 24 * 3600 * 1000,
            max_members: 16_384,
        }
    }
}

impl Params {
    fn foca(&self) -> foca::Config {
        let mut c = foca::Config::simple();
        c.probe_period = Duration::from_millis(self.probe_period_ms);
        c.probe_rtt = Duration::from_millis(self.probe_rtt_ms);
        c.num_indirect_probes = NonZeroUsize::new(self.indirect_probes.max(1)).expect("max(1)");
        c.suspect_to_down_after = Duration::from_millis(self.suspect_to_down_ms);
        c.max_transmissions = NonZeroU8::new(self.max_transmissions.max(1)).expect("max(1)");
        c.max_packet_size = NonZeroUsize::new(MAX_PLAIN - ENVELOPE).expect("positive");
        c.notify_down_members = true;
        // After the record is pruned: a member foca forgets while its record is still
        // held would be taken for a new one and come back alive.
        c.remove_down_after = Some(Duration::from_millis(self.retention_ms + 60_000));
        c.periodic_announce = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(30),
            num_members: NonZeroUsize::new(1).expect("1"),
        });
        c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_millis(self.announce_to_down_every_ms),
            num_members: NonZeroUsize::new(2).expect("2"),
        });
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: Duration::from_millis(self.gossip_every_ms),
            num_members: NonZeroUsize::new(self.gossip_fanout.max(1)).expect("max(1)"),
        });
        c
    }
}

/// A member's standing, as the routing decision needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    Alive,
    Suspect,
    /// Membership failed (no answer to SWIM probes, direct or indirect).
    Down,
    /// Left on purpose.
    Left,
    /// A record with no membership information yet (learned through anti-entropy).
    Unknown,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Down => "down",
            MemberState::Left => "left",
            MemberState::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone)]
pub struct MemberView {
    pub record: NodeRecord,
    pub state: MemberState,
    /// Monotonic ms of the last state change seen.
    pub since: u64,
}

/// Something the caller should log or put in events.log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GossipEvent {
    MemberJoined(NodeId, SocketAddrV4),
    MemberFailed(NodeId),
    MemberLeft(NodeId),
    /// Same id, new underlay or gossip address.
    MemberMigrated {
        id: NodeId,
        from: Ipv4Addr,
        to: Ipv4Addr,
    },
    /// This node was declared down by the others and rejoined with a new incarnation.
    Rejoined,
    /// Packets dropped since the last report, by reason (reported at most every 10 s).
    Rejected(Vec<(Reject, u64)>),
    /// The address this host's peers see it at changed ([`Node::reflection`]).
    Reflected {
        observed: Option<Ipv4Addr>,
        port_translated: bool,
    },
}

/// A relay offer's rtt moves only by more than this fraction and this many ms...
const RELAY_RTT_MOVE: (f64, u16) = (0.5, 2);
/// ...and is republished for that at most this often.
const RELAY_RTT_EVERY_MS: u64 = 5_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub rejected_bad_key: u64,
    pub rejected_malformed: u64,
    pub rejected_replayed: u64,
    pub anti_entropy_rounds: u64,
    pub records_pulled: u64,
    /// Messages of a newer format's kind, skipped.
    pub skipped_unknown: u64,
    /// Records dropped after their node was down past the retention time.
    pub records_pruned: u64,
    /// Records of new nodes not taken because `max_members` are held.
    pub refused_full: u64,
    /// Path probes sent and answered ([`crate::path`]).
    #[serde(default)]
    pub probes_sent: u64,
    #[serde(default)]
    pub probe_acks_sent: u64,
    /// Acks that counted (sender and token matched).
    #[serde(default)]
    pub probe_acks_accepted: u64,
}

/// Test-only faults (the daemon sets them from a file named by an environment variable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Neither send nor accept record broadcasts: only anti-entropy moves records.
    pub drop_broadcasts: bool,
}

/// A complete record version, with its parts as received: they are what this node
/// relays, byte for byte, so fields of a newer format survive an older relay.
struct Held {
    record: NodeRecord,
    parts: Vec<Vec<u8>>,
}

/// What became of an offered part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offer {
    /// Not seen before: pass it on.
    New,
    /// Known, older than what is held, or our own.
    Old,
    /// Undecodable or out of range.
    Bad,
    /// A new node while `max_members` are held.
    Full,
}

/// Records every node knows, shared with foca's broadcast handler.
#[derive(Default)]
struct Store {
    own: Option<NodeId>,
    records: BTreeMap<NodeId, Held>,
    /// Newer versions being assembled; the held version stays in use meanwhile.
    pending: BTreeMap<NodeId, Assembly>,
    /// Pruned records: (id, version pruned). Copies at or below it are not taken back.
    pruned: BTreeMap<NodeId, u64>,
    max_members: usize,
    /// Orders assemblies by last use.
    clock: u64,
    /// A record about ourselves newer than ours (a previous life's): raise above it.
    own_seen: u64,
    /// The newest version or bump accepted ([`validate::horizon`] of the wall clock),
    /// shared with the SWIM codec.
    horizon: Arc<AtomicU64>,
    /// Records refused by [`validate::record`] since the last drain.
    invalid: u64,
    drop_broadcasts: bool,
    changed: bool,
    bad_parts: u64,
    refused_full: u64,
    /// Record versions completed (for `records_pulled`).
    completed: u64,
    /// Records completed from broadcasts or pushes since the last drain: this node
    /// pushes each to a few members in turn.
    forward: Vec<NodeId>,
    /// A new multi-part version was started by the last offer.
    started: bool,
    /// (record, member) to ask for a whole version whose first part came by broadcast:
    /// one round trip instead of waiting for every part to come round by piggyback.
    pulls: Vec<(NodeId, NodeId, SocketAddrV4)>,
    /// (id, old underlay, new underlay) seen since the last drain.
    migrations: Vec<(NodeId, Ipv4Addr, Ipv4Addr)>,
}

impl Store {
    /// Takes an encoded record part; a version is swapped in once all its parts are.
    /// `spread`: it came by broadcast or push, so a completed version is passed on.
    fn offer_part(&mut self, raw: &[u8], spread: bool) -> Offer {
        let Ok(p) = record::decode_part(raw) else {
            self.bad_parts += 1;
            return Offer::Bad;
        };
        // The header's version is bounded before anything keeps it (own_seen, a new
        // assembly): a forged far-future version must not pin a record.
        if validate::part_version(p.version, self.horizon.load(Ordering::Relaxed)).is_err() {
            self.invalid += 1;
            return Offer::Bad;
        }
        if Some(p.id) == self.own {
            self.own_seen = self.own_seen.max(p.version);
            return Offer::Old;
        }
        if self.pruned.get(&p.id).is_some_and(|v| *v >= p.version)
            || self
                .records
                .get(&p.id)
                .is_some_and(|h| h.record.version >= p.version)
        {
            return Offer::Old;
        }
        let known = self.records.contains_key(&p.id) || self.pending.contains_key(&p.id);
        if !known && self.records.len() >= self.max_members {
            self.refused_full += 1;
            return Offer::Full;
        }
        self.clock += 1;
        let (id, version, count, index) = (p.id, p.version, p.count, p.index);
        let asm = match self.pending.get_mut(&id) {
            Some(a) if a.version > version => return Offer::Old,
            Some(a) if a.version == version => {
                if a.count() != count as usize {
                    self.bad_parts += 1;
                    return Offer::Bad;
                }
                if a.has(index) {
                    return Offer::Old;
                }
                a
            }
            _ => {
                if !self.pending.contains_key(&id) && self.pending.len() >= MAX_PENDING {
                    let oldest = self
                        .pending
                        .iter()
                        .min_by_key(|(_, a)| a.touched)
                        .map(|(k, _)| *k);
                    if let Some(k) = oldest {
                        self.pending.remove(&k);
                    }
                }
                self.pending
                    .insert(id, Assembly::new(version, count, self.clock));
                self.started = true;
                self.pending.get_mut(&id).expect("just inserted")
            }
        };
        asm.touched = self.clock;
        match asm.add(p, raw) {
            None => Offer::New,
            Some(done) => {
                self.pending.remove(&id);
                match done {
                    Ok((r, _))
                        if validate::record(&r, self.horizon.load(Ordering::Relaxed)).is_err() =>
                    {
                        self.invalid += 1;
                        Offer::Bad
                    }
                    Ok((r, parts)) => {
                        if spread {
                            self.forward.push(r.id);
                        }
                        self.insert(r, parts);
                        Offer::New
                    }
                    Err(_) => {
                        self.bad_parts += 1;
                        Offer::Bad
                    }
                }
            }
        }
    }

    fn insert(&mut self, r: NodeRecord, parts: Vec<Vec<u8>>) {
        if let Some(old) = self.records.get(&r.id) {
            if old.record.underlay != r.underlay {
                self.migrations
                    .push((r.id, old.record.underlay, r.underlay));
            }
        }
        self.pruned.remove(&r.id);
        self.records.insert(r.id, Held { record: r, parts });
        self.changed = true;
        self.completed += 1;
    }

    /// Drops the record of `id` at or below `version` and keeps a tombstone. Returns
    /// whether a record was dropped.
    fn prune(&mut self, id: NodeId, version: u64) -> bool {
        if Some(id) == self.own {
            // A peer pruned us: come back above it.
            self.own_seen = self.own_seen.max(version);
            return false;
        }
        if self
            .records
            .get(&id)
            .is_some_and(|h| h.record.version > version)
        {
            return false;
        }
        if self.pending.get(&id).is_some_and(|a| a.version <= version) {
            self.pending.remove(&id);
        }
        let tomb = self.pruned.entry(id).or_insert(version);
        *tomb = (*tomb).max(version);
        if self.pruned.len() > self.max_members {
            // Bounded: the oldest tombstone goes first.
            if let Some(k) = self.pruned.iter().min_by_key(|(_, v)| **v).map(|(k, _)| *k) {
                self.pruned.remove(&k);
            }
        }
        let dropped = self.records.remove(&id).is_some();
        self.changed |= dropped;
        dropped
    }

    /// A hash over every (id, version) held, `own` included: two converged nodes agree.
    /// Tombstones are left out, so a node still holding a record another pruned differs.
    fn hash(&self, own: &NodeRecord) -> u64 {
        self.records
            .values()
            .map(|h| &h.record)
            .chain(std::iter::once(own))
            .fold(0u64, |acc, r| {
                acc.wrapping_add(mix(r.id.0 ^ mix(r.version)))
            })
    }
}

fn mix(mut z: u64) -> u64 {
    // splitmix64's finaliser.
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A broadcast item is one part of one record version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RecordKey {
    id: NodeId,
    version: u64,
    index: u16,
}

impl Invalidates for RecordKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.id == other.id
            && (self.version > other.version
                || (self.version == other.version && self.index == other.index))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("undecodable record broadcast")]
struct BadBroadcast;

struct Handler(Arc<Mutex<Store>>);

impl BroadcastHandler<Member> for Handler {
    type Key = RecordKey;
    type Error = BadBroadcast;

    /// Never an error for an item it cannot read: foca would drop the rest of the
    /// packet, and an item of a newer format must not cost the ones beside it.
    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&Member>,
    ) -> Result<Option<RecordKey>, BadBroadcast> {
        let mut store = self.0.lock().expect("store lock");
        let Ok(p) = record::decode_part(data) else {
            store.bad_parts += 1;
            return Ok(None);
        };
        let key = RecordKey {
            id: p.id,
            version: p.version,
            index: p.index,
        };
        if sender.is_none() {
            // Added by this node: its own parts, or parts pushed to it.
            return Ok(Some(key));
        }
        if store.drop_broadcasts {
            return Ok(None);
        }
        store.started = false;
        let offer = store.offer_part(data, true);
        if std::mem::take(&mut store.started) {
            if let Some(from) = sender {
                store.pulls.push((p.id, from.id, from.addr));
            }
        }
        Ok((offer == Offer::New).then_some(key))
    }
}

/// Collects what foca asks for during one call.
#[derive(Default)]
struct Collect {
    sends: Vec<(Member, Vec<u8>)>,
    timers: Vec<(Duration, Timer<Member>)>,
    notes: Vec<foca::OwnedNotification<Member>>,
}

impl Runtime<Member> for Collect {
    fn notify(&mut self, n: Notification<'_, Member>) {
        self.notes.push(n.to_owned());
    }
    fn send_to(&mut self, to: Member, data: &[u8]) {
        self.sends.push((to, data.to_vec()));
    }
    fn submit_after(&mut self, event: Timer<Member>, after: Duration) {
        self.timers.push((after, event));
    }
}

type Swim = Foca<Member, validate::BoundedCodec, StdRng, Handler>;

pub struct Node {
    params: Params,
    swim: Swim,
    store: Arc<Mutex<Store>>,
    sealer: Sealer,
    rng: StdRng,
    me: Member,
    record: NodeRecord,
    /// `record` split into encoded parts, as broadcast and served.
    own_parts: Vec<Vec<u8>>,
    /// What this node writes (a newer format only in tests).
    format: Format,
    wall_base_ms: u64,
    now: u64,
    timers: BinaryHeap<Reverse<(u64, u64, TimerBox)>>,
    timer_seq: u64,
    outbox: Vec<(SocketAddrV4, Vec<u8>)>,
    events: Vec<GossipEvent>,
    join: Vec<SocketAddrV4>,
    next_join: u64,
    next_ae: u64,
    counters: Counters,
    unreported: BTreeMap<Reject, u64>,
    next_reject_report: u64,
    /// Membership state per id, with the time it last changed.
    states: HashMap<NodeId, (MemberState, u64)>,
    left: bool,
    /// Our SWIM identity changed (rejoin): the record must carry the new bump.
    identity_changed: bool,
    /// Path probes, learned sources and reports of our address.
    paths: PathTable,
    /// Publish `record.nat` from the reflection (off when the address is pinned).
    reflect_on: bool,
    /// Publish `record.relay` from the paths.
    relay_on: bool,
    reflection: Reflection,
    /// When `record.relay` was last published.
    relay_published_ms: u64,
    /// The caller's clock in microseconds ([`Node::set_clock_us`]), for round-trip
    /// times finer than the millisecond clock.
    clock_us: Option<u64>,
}

/// Timers in a heap need an order; foca's Timer has one, but the tuple needs it boxed
/// with the sequence number first so equal deadlines keep submission order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TimerBox(Timer<Member>);

impl PartialOrd for TimerBox {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TimerBox {
    fn cmp(&self, _other: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl Node {
    /// A node that publishes `record` (its version is set here). `now` is the
    /// monotonic clock, `wall_ms` the wall clock at the same instant, `seed` feeds the
    /// random choices (use the OS's in production, a fixed one in simulations).
    pub fn new(
        params: Params,
        mut record: NodeRecord,
        keyring: Keyring,
        now: u64,
        wall_ms: u64,
        seed: u64,
    ) -> Node {
        let me = Member {
            id: record.id,
            addr: record.gossip_addr,
            bump: wall_ms,
        };
        record.version = wall_ms.max(1);
        record.bump = me.bump;
        // The caller fits the record (discovery refuses the newest stacks with an
        // event); this only keeps an unfitted one from going out at all.
        record::fit(&mut record);
        let horizon = Arc::new(AtomicU64::new(validate::horizon(wall_ms)));
        let store = Arc::new(Mutex::new(Store {
            own: Some(record.id),
            max_members: params.max_members,
            horizon: horizon.clone(),
            ..Store::default()
        }));
        let swim = Foca::with_custom_broadcast(
            me.clone(),
            params.foca(),
            StdRng::seed_from_u64(seed),
            validate::BoundedCodec::new(horizon),
            Handler(store.clone()),
        );
        let sealer = Sealer::new(keyring, record.id.0, wall_ms.saturating_mul(1000));
        let params_max_learned = params.max_members.saturating_add(64);
        let mut n = Node {
            next_ae: now + params.anti_entropy_ms,
            params,
            swim,
            store,
            sealer,
            rng: StdRng::seed_from_u64(seed ^ 0x5EED),
            me,
            own_parts: Vec::new(),
            record,
            format: Format::default(),
            wall_base_ms: wall_ms.saturating_sub(now),
            now,
            timers: BinaryHeap::new(),
            timer_seq: 0,
            outbox: Vec::new(),
            events: Vec::new(),
            join: Vec::new(),
            next_join: now,
            counters: Counters::default(),
            unreported: BTreeMap::new(),
            next_reject_report: now,
            states: HashMap::new(),
            left: false,
            identity_changed: false,
            paths: PathTable::new(PathParams::default(), params_max_learned),
            reflect_on: true,
            relay_on: false,
            reflection: Reflection::default(),
            relay_published_ms: 0,
            clock_us: None,
        };
        n.advance(now);
        n.queue_own_broadcast();
        n
    }

    pub fn id(&self) -> NodeId {
        self.me.id
    }

    pub fn record(&self) -> &NodeRecord {
        &self.record
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn keyring(&self) -> &Keyring {
        self.sealer.keyring()
    }

    pub fn set_keyring(&mut self, k: Keyring) {
        self.sealer.set_keyring(k);
    }

    /// Replay protection's state, for the caller to store across restarts
    /// ([`ReplayState`]); call [`Node::replay_stored`] once it is stored.
    pub fn export_replay(&self) -> ReplayState {
        self.sealer.export_replay()
    }

    pub fn replay_stored(&mut self, seq_reserved: u64) {
        self.sealer.replay_stored(seq_reserved);
    }

    /// Whether the replay state must be stored now (half the reserved sequence
    /// numbers used).
    pub fn replay_due(&self) -> bool {
        self.sealer.replay_due()
    }

    /// Restores the replay state stored by a previous run; call it before any packet.
    pub fn import_replay(&mut self, state: &ReplayState) {
        self.sealer.import_replay(state);
    }

    /// Writes records and messages in format `f` from now on (tests emulate a newer
    /// build with it).
    pub fn set_format(&mut self, f: Format) {
        self.format = f;
        self.queue_own_broadcast();
    }

    pub fn set_faults(&mut self, f: Faults) {
        self.store.lock().expect("store lock").drop_broadcasts = f.drop_broadcasts;
    }

    /// The bootstrap addresses (resolved by the caller, again whenever it likes). While
    /// the node has no live member it sends them a join every `join_retry_ms`.
    pub fn set_join(&mut self, addrs: Vec<SocketAddrV4>) {
        self.join = addrs
            .into_iter()
            .filter(|a| *a != self.record.gossip_addr)
            .collect();
    }

    /// The members to probe ([`crate::path`]): at most [`path::MAX_PATH_TARGETS`]
    /// (lowest ids), this node never. No target, no probe traffic at all.
    pub fn set_path_targets(&mut self, mut ids: BTreeSet<NodeId>) {
        ids.remove(&self.me.id);
        self.paths.set_targets(ids, self.now);
        self.path_housekeeping();
    }

    pub fn set_path_params(&mut self, p: PathParams) {
        self.paths.set_params(p);
    }

    /// The same monotonic clock as `now`, in microseconds, given just before a call
    /// (`handle_packet`, `tick`): path round-trip times are then measured in
    /// microseconds instead of whole milliseconds. Optional; ignored when it does not
    /// agree with `now` (within 1 ms).
    pub fn set_clock_us(&mut self, now_us: u64) {
        self.clock_us = Some(now_us);
    }

    /// The path clock in microseconds: the caller's, when it agrees with `now`.
    fn now_us(&self) -> u64 {
        match self.clock_us {
            Some(us) if (us / 1000).abs_diff(self.now) <= 1 => us,
            _ => self.now.saturating_mul(1000),
        }
    }

    /// One view per target, at the node's current time.
    pub fn paths(&self) -> Vec<PathView> {
        self.paths.views(self.now)
    }

    /// The address this host's peers see it at, by majority of their fresh reports.
    pub fn reflection(&self) -> Reflection {
        self.reflection.clone()
    }

    /// Whether `record.nat` is published from the reflection (false when
    /// `VROUTER_ADVERTISE_ADDR` pins the address: then `record.nat` is None).
    pub fn set_reflect(&mut self, on: bool) {
        self.reflect_on = on;
        self.publish_paths();
    }

    /// Whether this node offers to relay: `record.relay` lists the targets it reaches,
    /// with round-trip times.
    pub fn set_relay(&mut self, on: bool) {
        self.relay_on = on;
        self.publish_paths();
    }

    /// Where a datagram to member `id` (announced at `addr`) goes: its path address if
    /// probes reach it, else where its last authenticated packet came from (fresh),
    /// else its observed address with its gossip port, else `addr`.
    fn addr_of(&self, id: NodeId, addr: SocketAddrV4) -> SocketAddrV4 {
        if let Some(a) = self.paths.path_addr(id, self.now) {
            return a;
        }
        if let Some(a) = self.paths.learned(id, self.now) {
            return a;
        }
        let store = self.store.lock().expect("store lock");
        match store.records.get(&id).map(|h| &h.record) {
            Some(NodeRecord {
                nat: Some(n),
                gossip_addr,
                ..
            }) => SocketAddrV4::new(n.observed, gossip_addr.port()),
            _ => addr,
        }
    }

    /// Probes every due target at each of its candidates.
    fn probe_round(&mut self) {
        if !self.paths.has_targets() {
            return;
        }
        let due = self.paths.due(self.now);
        for id in due {
            let (local, observed) = {
                let store = self.store.lock().expect("store lock");
                match store.records.get(&id).map(|h| &h.record) {
                    Some(r) => (
                        Some(r.gossip_addr),
                        r.nat
                            .as_ref()
                            .map(|n| SocketAddrV4::new(n.observed, r.gossip_addr.port())),
                    ),
                    None => (None, None),
                }
            };
            let local = local.or_else(|| {
                self.swim
                    .iter_membership_state()
                    .find(|m| m.id().id == id)
                    .map(|m| m.id().addr)
            });
            for a in self.paths.candidates(id, local, observed, self.now) {
                let token: u64 = self.rng.random();
                self.paths.sent(token, id, a, self.now, self.now_us());
                self.counters.probes_sent += 1;
                self.send_wire(a, &Wire::Probe { token });
            }
        }
        self.path_housekeeping();
    }

    /// After anything that moves paths or reports: reachability, the reflection (an
    /// event on change), and what the record publishes.
    fn path_housekeeping(&mut self) {
        self.paths.refresh(self.now);
        self.paths.expire_reports(self.now);
        let r = path::reflect(self.record.gossip_addr, &self.paths.reports(self.now));
        if (r.observed, r.port_translated)
            != (self.reflection.observed, self.reflection.port_translated)
        {
            self.events.push(GossipEvent::Reflected {
                observed: r.observed,
                port_translated: r.port_translated,
            });
        }
        self.reflection = r;
        self.publish_paths();
    }

    /// The relay offer the paths make: reachable targets with their rtt.
    fn relay_offer(&self) -> RelayOffer {
        let mut reach: Vec<RelayReach> = self
            .paths
            .views(self.now)
            .into_iter()
            .filter(|v| v.reachable && v.id != self.me.id)
            .map(|v| RelayReach {
                id: v.id,
                rtt_ms: v
                    .rtt_us
                    .map(|us| us.div_ceil(1000).clamp(1, u16::MAX as u32) as u16)
                    .unwrap_or(1),
            })
            .collect();
        reach.truncate(record::MAX_RELAY_REACH);
        RelayOffer { reach }
    }

    /// Publishes `record.nat` (at once on a change) and `record.relay` (at once when
    /// the reachable set changes; an rtt moved by more than half and 2 ms at most
    /// every 5 s).
    fn publish_paths(&mut self) {
        if self.left {
            return;
        }
        let nat = if self.reflect_on {
            self.reflection.observed.map(|observed| NatInfo {
                observed,
                port_translated: self.reflection.port_translated,
            })
        } else {
            None
        };
        let relay = self.relay_on.then(|| self.relay_offer());
        let relay_due = match (&self.record.relay, &relay) {
            (None, None) => false,
            (Some(old), Some(new)) => {
                let ids = |o: &RelayOffer| o.reach.iter().map(|x| x.id).collect::<Vec<_>>();
                if ids(old) != ids(new) {
                    true
                } else {
                    let moved = old.reach.iter().zip(&new.reach).any(|(a, b)| {
                        let d = a.rtt_ms.abs_diff(b.rtt_ms);
                        d > RELAY_RTT_MOVE.1 && d as f64 > RELAY_RTT_MOVE.0 * a.rtt_ms as f64
                    });
                    moved && self.now >= self.relay_published_ms + RELAY_RTT_EVERY_MS
                }
            }
            _ => true,
        };
        let nat_due = nat != self.record.nat;
        if !nat_due && !relay_due {
            return;
        }
        let mut next = self.record.clone();
        next.nat = nat;
        if relay_due {
            next.relay = relay;
            self.relay_published_ms = self.now;
        }
        // Stacks were fitted leaving room for a full offer; never go over the limit.
        while record::encoded_len(&next) > record::MAX_RECORD_BYTES {
            match next.relay.as_mut().and_then(|o| {
                o.reach.sort_by_key(|x| x.rtt_ms);
                o.reach.pop()
            }) {
                Some(_) => {}
                None => break,
            }
        }
        next.version = self.next_version();
        self.record = next;
        self.queue_own_broadcast();
    }

    fn wall(&self) -> u64 {
        self.wall_base_ms.saturating_add(self.now)
    }

    /// Moves the clock (never back) and with it the newest version accepted.
    fn advance(&mut self, now: u64) {
        self.now = self.now.max(now);
        let h = validate::horizon(self.wall());
        self.store
            .lock()
            .expect("store lock")
            .horizon
            .store(h, Ordering::Relaxed);
    }

    /// Publishes a new record content (stacks, addresses). Returns whether it changed.
    pub fn update(
        &mut self,
        now: u64,
        gossip_addr: SocketAddrV4,
        underlay: Ipv4Addr,
        vxlan_port: u16,
        stacks: Vec<ClaimedStack>,
        encryption: Option<record::Encryption>,
    ) -> Result<bool, String> {
        self.advance(now);
        if self.left {
            return Ok(false);
        }
        let mut next = self.record.clone();
        next.gossip_addr = gossip_addr;
        next.underlay = underlay;
        next.vxlan_port = vxlan_port;
        next.stacks = stacks;
        next.encryption = encryption;
        if next == self.record {
            return Ok(false);
        }
        let size = record::encoded_len(&next);
        if size > record::MAX_RECORD_BYTES {
            return Err(record::FormatError::TooBig(size).to_string());
        }
        next.version = self.next_version();
        let moved = gossip_addr != self.me.addr;
        self.record = next;
        if moved {
            let new = Member {
                addr: gossip_addr,
                bump: self.me.bump.wrapping_add(1).max(self.wall()),
                id: self.me.id,
            };
            let mut rt = Collect::default();
            if self.swim.change_identity(new.clone(), &mut rt).is_ok() {
                self.me = new;
                self.record.bump = self.me.bump;
            }
            self.drain(rt);
        }
        self.queue_own_broadcast();
        Ok(true)
    }

    /// The version of our next record: the wall clock, or one above the current.
    fn next_version(&self) -> u64 {
        self.wall().max(self.record.version.saturating_add(1))
    }

    /// Splits the record into parts (they replace the previous version's).
    fn split_own(&mut self) {
        // `update` and `new` keep the record within the limit.
        self.own_parts = record::split(&self.record, &self.format).unwrap_or_default();
    }

    /// A new own version: its parts become broadcasts (piggybacked on SWIM, re-gossiped
    /// by every node that learns them) and go at once, every part, to `gossip_fanout`
    /// random members, so a change moves as fast whatever the record's size.
    fn queue_own_broadcast(&mut self) {
        self.split_own();
        if self.store.lock().expect("store lock").drop_broadcasts {
            return;
        }
        for p in self.own_parts.clone() {
            let _ = self.swim.add_broadcast(&p);
        }
        self.push_to_some(self.own_parts.clone());
    }

    /// Every part of one version to `gossip_fanout` random live members. Each node
    /// that completes a version from a broadcast or push does it once, so a change
    /// reaches the mesh in a few round trips whatever the record's size, while SWIM's
    /// piggybacking and anti-entropy catch what a lost datagram missed.
    fn push_to_some(&mut self, parts: Vec<Vec<u8>>) {
        let mut members: Vec<(NodeId, SocketAddrV4)> = self
            .swim
            .iter_members()
            .map(|m| (m.id().id, m.id().addr))
            .collect();
        for k in 0..members.len().min(self.params.gossip_fanout) {
            let j = self.rng.random_range(k..members.len());
            members.swap(k, j);
            let to = self.addr_of(members[k].0, members[k].1);
            self.send_parts(to, parts.clone(), true);
        }
    }

    /// Leaves on purpose: a tombstone record (no stacks, `left`) goes out by broadcast
    /// and directly to a few members, then SWIM declares this node down.
    pub fn leave(&mut self, now: u64) {
        self.advance(now);
        self.record.left = true;
        self.record.stacks.clear();
        self.record.version = self.next_version();
        self.left = true;
        self.queue_own_broadcast();
        let members: Vec<Member> = self.swim.iter_members().map(|m| m.id().clone()).collect();
        for m in members.iter().take(5) {
            let to = self.addr_of(m.id, m.addr);
            self.send_parts(to, self.own_parts.clone(), true);
        }
        let mut rt = Collect::default();
        let _ = self.swim.leave_cluster(&mut rt);
        self.drain(rt);
    }

    /// Hands a received datagram to the node.
    pub fn handle_packet(&mut self, now: u64, from: SocketAddrV4, data: &[u8]) {
        self.advance(now);
        self.counters.packets_in += 1;
        self.counters.bytes_in += data.len() as u64;
        if validate::datagram(data.len()).is_err() {
            return self.reject(Reject::Malformed);
        }
        let (sender, plain) = match self.sealer.open(data) {
            Ok(x) => x,
            Err(r) => return self.reject(r),
        };
        if sender == self.me.id.0 {
            return;
        }
        // Authenticated: where this sender's packets come from now.
        let src = from;
        self.paths.heard(NodeId(sender), src, self.now);
        let from = self.addr_of(NodeId(sender), src);
        let wire = match wire::decode(&plain) {
            Ok(w) => w,
            Err(Decoded::Unknown) => {
                self.counters.skipped_unknown += 1;
                return;
            }
            Err(Decoded::Malformed) => return self.reject(Reject::Malformed),
        };
        let horizon = validate::horizon(self.wall());
        if validate::wire(&wire, horizon).is_err() {
            return self.reject(Reject::Malformed);
        }
        if self.left {
            return;
        }
        match wire {
            Wire::Swim(bytes) => {
                let mut rt = Collect::default();
                let _ = self.swim.handle_data(&bytes, &mut rt);
                self.drain(rt);
            }
            Wire::Join(m) => {
                if m.id == self.me.id {
                    return;
                }
                let known = self.swim.iter_membership_state().any(|x| x.id().id == m.id);
                if !known && self.swim.iter_membership_state().count() >= self.params.max_members {
                    self.counters.refused_full += 1;
                    return;
                }
                let mut rt = Collect::default();
                let _ =
                    self.swim
                        .apply_many(std::iter::once(foca::Member::alive(m)), true, &mut rt);
                self.drain(rt);
                self.send_wire(from, &Wire::JoinAck(self.me.clone()));
            }
            Wire::JoinAck(m) => {
                if m.id == self.me.id {
                    return;
                }
                let mut rt = Collect::default();
                let _ = self.swim.announce(m, &mut rt);
                self.drain(rt);
                self.start_sync(from);
            }
            Wire::Sync { hash, .. } => {
                let store = self.store.lock().expect("store lock");
                let mine = store.hash(&self.record);
                let pages = if mine != hash {
                    digest_pages(&store.records, &self.record)
                } else {
                    Vec::new()
                };
                drop(store);
                for p in pages {
                    self.send_wire(from, &p);
                }
            }
            Wire::Digest { lo, hi, entries } => {
                let theirs: HashMap<NodeId, u64> = entries.into_iter().collect();
                let store = self.store.lock().expect("store lock");
                let mut want = Vec::new();
                let mut pruned = Vec::new();
                for (id, v) in &theirs {
                    if Some(*id) == store.own {
                        continue;
                    }
                    if let Some(tomb) = store.pruned.get(id).filter(|t| **t >= *v) {
                        pruned.push((*id, *tomb));
                        continue;
                    }
                    if *v <= horizon && store.records.get(id).is_none_or(|h| h.record.version < *v)
                    {
                        want.push(*id);
                    }
                }
                let mut push: Vec<Vec<u8>> = store
                    .records
                    .range(lo..=hi)
                    .filter(|(id, h)| theirs.get(id).is_none_or(|v| *v < h.record.version))
                    .flat_map(|(_, h)| h.parts.iter().cloned())
                    .collect();
                drop(store);
                // Our own record: the digest may miss it (or hold an older version).
                if self.me.id >= lo
                    && self.me.id <= hi
                    && theirs
                        .get(&self.me.id)
                        .is_none_or(|v| *v < self.record.version)
                {
                    push.extend(self.own_parts.iter().cloned());
                }
                for chunk in want.chunks(DIGEST_PAGE) {
                    self.send_wire(from, &Wire::Want(chunk.to_vec()));
                }
                for chunk in pruned.chunks(DIGEST_PAGE) {
                    self.send_wire(from, &Wire::Pruned(chunk.to_vec()));
                }
                self.send_parts(from, push, false);
            }
            Wire::Want(mut ids) => {
                ids.sort_unstable();
                ids.dedup();
                let store = self.store.lock().expect("store lock");
                // The complete version held, and the parts of a newer one being
                // assembled (the asker may lack exactly those).
                let mut parts: Vec<Vec<u8>> = ids
                    .iter()
                    .filter_map(|id| store.records.get(id))
                    .flat_map(|h| h.parts.iter().cloned())
                    .collect();
                parts.extend(
                    ids.iter()
                        .filter_map(|id| store.pending.get(id))
                        .flat_map(|a| a.raw_parts()),
                );
                drop(store);
                if ids.contains(&self.me.id) {
                    parts.extend(self.own_parts.iter().cloned());
                }
                self.send_parts(from, parts, false);
            }
            Wire::Parts(parts) => {
                let mut store = self.store.lock().expect("store lock");
                let before = store.completed;
                for raw in parts {
                    store.offer_part(&raw, false);
                }
                self.counters.records_pulled += store.completed - before;
            }
            Wire::Push(parts) => {
                let drop_broadcasts = self.store.lock().expect("store lock").drop_broadcasts;
                if !drop_broadcasts {
                    for raw in parts {
                        let new = self
                            .store
                            .lock()
                            .expect("store lock")
                            .offer_part(&raw, true);
                        if new == Offer::New {
                            // On to others, as if it had come through SWIM.
                            let _ = self.swim.add_broadcast(&raw);
                        }
                    }
                }
            }
            Wire::Pruned(list) => {
                let mut store = self.store.lock().expect("store lock");
                for (id, v) in list {
                    if store.prune(id, v) {
                        self.counters.records_pruned += 1;
                        self.states.remove(&id);
                    }
                }
            }
            Wire::Probe { token } => {
                // Straight back where it came from: that is the path being tested.
                self.counters.probe_acks_sent += 1;
                self.send_wire(src, &Wire::ProbeAck { token, seen: src });
            }
            Wire::ProbeAck { token, seen } => {
                let now_us = self.now_us();
                if self
                    .paths
                    .ack(NodeId(sender), token, seen, self.now, now_us)
                {
                    self.counters.probe_acks_accepted += 1;
                    self.path_housekeeping();
                }
            }
        }
        self.after_input();
    }

    fn reject(&mut self, r: Reject) {
        self.reject_n(r, 1);
    }

    fn reject_n(&mut self, r: Reject, n: u64) {
        match r {
            Reject::BadKey => self.counters.rejected_bad_key += n,
            Reject::Malformed => self.counters.rejected_malformed += n,
            Reject::Replayed => self.counters.rejected_replayed += n,
        }
        *self.unreported.entry(r).or_default() += n;
        if self.now >= self.next_reject_report {
            self.next_reject_report = self.now + 10_000;
            let list = std::mem::take(&mut self.unreported).into_iter().collect();
            self.events.push(GossipEvent::Rejected(list));
        }
    }

    /// Runs due timers, anti-entropy and join retries.
    pub fn tick(&mut self, now: u64) {
        self.advance(now);
        while let Some(Reverse((at, _, _))) = self.timers.peek() {
            if *at > self.now {
                break;
            }
            let Reverse((_, _, TimerBox(t))) = self.timers.pop().expect("peeked");
            let mut rt = Collect::default();
            let _ = self.swim.handle_timer(t, &mut rt);
            self.drain(rt);
        }
        if self.left {
            return;
        }
        self.clear_stale_suspicions();
        self.prune_expired();
        if self.paths.has_targets() {
            self.probe_round();
            self.path_housekeeping();
        }
        if self.now >= self.next_join {
            self.next_join = self.now + self.params.join_retry_ms;
            if self.swim.num_members() == 0 {
                for a in self.join.clone() {
                    self.send_wire(a, &Wire::Join(self.me.clone()));
                }
            }
        }
        if self.now >= self.next_ae {
            self.next_ae = self.now + self.params.anti_entropy_ms;
            let members: Vec<(NodeId, SocketAddrV4)> = self
                .swim
                .iter_members()
                .map(|m| (m.id().id, m.id().addr))
                .collect();
            if !members.is_empty() {
                let (id, addr) = members[self.rng.random_range(0..members.len())];
                self.counters.anti_entropy_rounds += 1;
                self.start_sync(self.addr_of(id, addr));
            }
        }
        if !self.unreported.is_empty() && self.now >= self.next_reject_report {
            self.next_reject_report = self.now + 10_000;
            let list = std::mem::take(&mut self.unreported).into_iter().collect();
            self.events.push(GossipEvent::Rejected(list));
        }
        self.after_input();
    }

    /// A suspicion only ends by the prober's timer (down) or the member's refutation.
    /// When this node changes identity (a rejoin after being cut off), foca drops its
    /// pending timers, and a member it suspected while cut off, which never heard of the
    /// suspicion, stays suspect for good. Past twice the suspicion timeout plus a probe
    /// period, such a member is taken as alive again (locally, with a higher
    /// incarnation, not gossiped); if it really is gone, this node's own probes find out.
    fn clear_stale_suspicions(&mut self) {
        let limit = 2 * self.params.suspect_to_down_ms + self.params.probe_period_ms;
        let stale: Vec<foca::Member<Member>> = self
            .swim
            .iter_membership_state()
            .filter(|m| m.state() == foca::State::Suspect)
            .filter(|m| {
                self.states.get(&m.id().id).is_some_and(|(st, since)| {
                    *st == MemberState::Suspect && self.now > since + limit
                })
            })
            .map(|m| {
                foca::Member::new(
                    m.id().clone(),
                    m.incarnation().saturating_add(1),
                    foca::State::Alive,
                )
            })
            .collect();
        if stale.is_empty() {
            return;
        }
        let mut rt = Collect::default();
        let _ = self.swim.apply_many(stale.into_iter(), false, &mut rt);
        self.drain(rt);
    }

    /// Drops the records of nodes down, left or never seen alive for longer than the
    /// retention time; a tombstone keeps stale copies out, and tells peers that still
    /// hold one (anti-entropy). The node itself comes back with a newer version.
    fn prune_expired(&mut self) {
        let retention = self.params.retention_ms;
        let expired: Vec<NodeId> = self
            .states
            .iter()
            .filter(|(_, (st, since))| {
                matches!(
                    st,
                    MemberState::Down | MemberState::Left | MemberState::Unknown
                ) && self.now.saturating_sub(*since) >= retention
            })
            .map(|(id, _)| *id)
            .collect();
        if expired.is_empty() {
            return;
        }
        let mut store = self.store.lock().expect("store lock");
        for id in expired {
            self.states.remove(&id);
            if let Some(v) = store.records.get(&id).map(|h| h.record.version) {
                if store.prune(id, v) {
                    self.counters.records_pruned += 1;
                }
            }
        }
    }

    /// When `tick` should next run.
    pub fn next_deadline(&self) -> u64 {
        let t = self
            .timers
            .peek()
            .map(|Reverse((at, _, _))| *at)
            .unwrap_or(u64::MAX);
        t.min(self.next_ae)
            .min(self.next_join)
            .min(self.paths.next_due())
            .min(self.paths.next_change(self.now))
    }

    fn start_sync(&mut self, to: SocketAddrV4) {
        let store = self.store.lock().expect("store lock");
        let hash = store.hash(&self.record);
        let count = store.records.len() as u32 + 1;
        drop(store);
        self.send_wire(to, &Wire::Sync { hash, count });
    }

    /// Sends encoded parts, as many to a datagram as fit. `push`: the origin's own
    /// change (the receiver passes it on), else an anti-entropy answer.
    fn send_parts(&mut self, to: SocketAddrV4, parts: Vec<Vec<u8>>, push: bool) {
        let wrap = |b: Vec<Vec<u8>>| if push { Wire::Push(b) } else { Wire::Parts(b) };
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let mut size = 16 + self.format.appended.len();
        for p in parts {
            let len = p.len() + 3;
            if !batch.is_empty() && size + len > MAX_PLAIN {
                self.send_wire(to, &wrap(std::mem::take(&mut batch)));
                size = 16 + self.format.appended.len();
            }
            size += len;
            batch.push(p);
        }
        if !batch.is_empty() {
            self.send_wire(to, &wrap(batch));
        }
    }

    fn send_wire(&mut self, to: SocketAddrV4, w: &Wire) {
        let plain = wire::encode(w, &self.format);
        let sealed = self.sealer.seal(&plain);
        self.counters.packets_out += 1;
        self.counters.bytes_out += sealed.len() as u64;
        self.outbox.push((to, sealed));
        if self.format.version > record::FORMAT && matches!(w, Wire::Sync { .. }) {
            // A newer build's new kind of message, beside a known one.
            let sealed = self
                .sealer
                .seal(&wire::encode_unknown_for_tests(&self.format));
            self.outbox.push((to, sealed));
        }
    }

    fn drain(&mut self, rt: Collect) {
        for (to, data) in rt.sends {
            let addr = self.addr_of(to.id, to.addr);
            self.send_wire(addr, &Wire::Swim(data));
        }
        for (after, t) in rt.timers {
            self.timer_seq += 1;
            let at = self.now + after.as_millis() as u64;
            self.timers.push(Reverse((at, self.timer_seq, TimerBox(t))));
        }
        for n in rt.notes {
            match n {
                foca::OwnedNotification::MemberUp(m) => {
                    self.events.push(GossipEvent::MemberJoined(m.id, m.addr));
                    // A full exchange with the new member; in a big mesh only a few
                    // members do it (about 3 expected), or a join wave costs N².
                    let active = self.swim.num_members();
                    if active <= 8 || self.rng.random_range(0..active) < 3 {
                        self.start_sync(self.addr_of(m.id, m.addr));
                    }
                }
                foca::OwnedNotification::MemberDown(m) => {
                    let left = self
                        .store
                        .lock()
                        .expect("store lock")
                        .records
                        .get(&m.id)
                        .is_some_and(|h| h.record.left);
                    self.events.push(if left {
                        GossipEvent::MemberLeft(m.id)
                    } else {
                        GossipEvent::MemberFailed(m.id)
                    });
                }
                foca::OwnedNotification::Rejoin(m) => {
                    self.me = m;
                    self.identity_changed = true;
                    self.events.push(GossipEvent::Rejoined);
                    // Everyone may have dropped our record's freshness: push it again.
                    self.queue_own_broadcast_later();
                }
                foca::OwnedNotification::Defunct => {
                    let mut rt = Collect::default();
                    if let Some(m) = foca::Identity::renew(&self.me) {
                        if self.swim.change_identity(m.clone(), &mut rt).is_ok() {
                            self.me = m;
                            self.identity_changed = true;
                        }
                    }
                    self.drain(rt);
                }
                _ => {}
            }
        }
    }

    fn queue_own_broadcast_later(&mut self) {
        self.split_own();
        for p in self.own_parts.clone() {
            let _ = self.swim.add_broadcast(&p);
        }
    }

    /// Bookkeeping after any input: raise our version above a previous life's, note
    /// state changes and migrations.
    fn after_input(&mut self) {
        let forward: Vec<Vec<u8>> = {
            let mut s = self.store.lock().expect("store lock");
            let ids = std::mem::take(&mut s.forward);
            ids.iter()
                .filter_map(|id| s.records.get(id))
                .flat_map(|h| h.parts.iter().cloned())
                .collect()
        };
        if !forward.is_empty() {
            self.push_to_some(forward);
        }
        let pulls = std::mem::take(&mut self.store.lock().expect("store lock").pulls);
        for (id, member, addr) in pulls {
            let to = self.addr_of(member, addr);
            self.send_wire(to, &Wire::Want(vec![id]));
        }
        let (own_seen, invalid) = {
            let mut s = self.store.lock().expect("store lock");
            self.counters.rejected_malformed += std::mem::take(&mut s.bad_parts);
            self.counters.refused_full += std::mem::take(&mut s.refused_full);
            (
                std::mem::take(&mut s.own_seen),
                std::mem::take(&mut s.invalid),
            )
        };
        if invalid > 0 {
            self.reject_n(Reject::Malformed, invalid);
        }
        // Strictly newer only: our current record comes back to us all the time
        // (broadcasts reach their origin too). `own_seen` passed validate::record, so
        // it is within a day of the wall clock and one more stays within every
        // peer's bound (give or take clock skew): no forged version pins our record.
        if own_seen > self.record.version && !self.left {
            self.record.version = own_seen.saturating_add(1);
            self.queue_own_broadcast();
        }
        if std::mem::take(&mut self.identity_changed) && !self.left {
            self.record.bump = self.me.bump;
            self.record.version = self.next_version();
            self.queue_own_broadcast();
        }
        // Membership states.
        let mut now_states: HashMap<NodeId, MemberState> = HashMap::new();
        for m in self.swim.iter_membership_state() {
            let st = match m.state() {
                foca::State::Alive => MemberState::Alive,
                foca::State::Suspect => MemberState::Suspect,
                foca::State::Down => MemberState::Down,
            };
            now_states.insert(m.id().id, st);
        }
        // A record of a node SWIM has never heard of: add it as a member (SWIM learns
        // members only from piggybacked updates and announces, which a big join wave
        // outruns). If the node is gone, SWIM's own probes declare it down.
        let unknown: Vec<foca::Member<Member>> = {
            let store = self.store.lock().expect("store lock");
            store
                .records
                .values()
                .map(|h| &h.record)
                .filter(|r| !r.left && r.bump != 0 && !now_states.contains_key(&r.id))
                .map(|r| {
                    foca::Member::alive(Member {
                        id: r.id,
                        addr: r.gossip_addr,
                        bump: r.bump,
                    })
                })
                .collect()
        };
        if !unknown.is_empty() {
            let mut rt = Collect::default();
            let _ = self.swim.apply_many(unknown.into_iter(), false, &mut rt);
            self.drain(rt);
            for m in self.swim.iter_membership_state() {
                let st = match m.state() {
                    foca::State::Alive => MemberState::Alive,
                    foca::State::Suspect => MemberState::Suspect,
                    foca::State::Down => MemberState::Down,
                };
                now_states.insert(m.id().id, st);
            }
        }
        let mut store = self.store.lock().expect("store lock");
        for (id, from, to) in std::mem::take(&mut store.migrations) {
            self.events
                .push(GossipEvent::MemberMigrated { id, from, to });
        }
        for (id, h) in &store.records {
            let st = if h.record.left {
                MemberState::Left
            } else {
                now_states.get(id).copied().unwrap_or(MemberState::Unknown)
            };
            match self.states.get(id) {
                Some((old, _)) if *old == st => {}
                _ => {
                    self.states.insert(*id, (st, self.now));
                }
            }
        }
    }

    /// Takes what the node wants sent.
    pub fn take_outbox(&mut self) -> Vec<(SocketAddrV4, Vec<u8>)> {
        std::mem::take(&mut self.outbox)
    }

    pub fn take_events(&mut self) -> Vec<GossipEvent> {
        std::mem::take(&mut self.events)
    }

    /// Whether records changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.store.lock().expect("store lock").changed)
    }

    /// Every other node known, with its record and standing.
    pub fn members(&self) -> Vec<MemberView> {
        let store = self.store.lock().expect("store lock");
        store
            .records
            .values()
            .map(|h| &h.record)
            .map(|r| {
                let (state, since) = self
                    .states
                    .get(&r.id)
                    .copied()
                    .unwrap_or((MemberState::Unknown, self.now));
                MemberView {
                    record: r.clone(),
                    state,
                    since,
                }
            })
            .collect()
    }

    /// Cheap view of one member for large simulations (no record clone): its held
    /// record version, its stack count and its standing.
    pub fn member_brief(&self, id: NodeId) -> Option<(u64, usize, MemberState)> {
        let store = self.store.lock().expect("store lock");
        let r = &store.records.get(&id)?.record;
        let state = self
            .states
            .get(&id)
            .map(|s| s.0)
            .unwrap_or(MemberState::Unknown);
        Some((r.version, r.stacks.len(), state))
    }

    /// Records held of other nodes, and how many of them are alive with at least one
    /// stack (a cheap convergence check for large simulations).
    pub fn held_brief(&self) -> (usize, usize) {
        let store = self.store.lock().expect("store lock");
        let alive = store
            .records
            .values()
            .filter(|h| {
                !h.record.stacks.is_empty()
                    && self.states.get(&h.record.id).map(|s| s.0) == Some(MemberState::Alive)
            })
            .count();
        (store.records.len(), alive)
    }

    /// The encoded parts held for `id`'s record, as they will be relayed.
    #[cfg(test)]
    pub(crate) fn held_parts(&self, id: NodeId) -> Option<Vec<Vec<u8>>> {
        if id == self.me.id {
            return Some(self.own_parts.clone());
        }
        let store = self.store.lock().expect("store lock");
        store.records.get(&id).map(|h| h.parts.clone())
    }

    /// Tombstones held (records pruned, kept out).
    pub fn pruned_count(&self) -> usize {
        self.store.lock().expect("store lock").pruned.len()
    }

    /// Number of members SWIM considers active.
    pub fn active_members(&self) -> usize {
        self.swim.num_members()
    }
}

fn digest_pages(records: &BTreeMap<NodeId, Held>, own: &NodeRecord) -> Vec<Wire> {
    let mut all: Vec<(NodeId, u64)> = records
        .values()
        .map(|h| (h.record.id, h.record.version))
        .collect();
    all.push((own.id, own.version));
    all.sort();
    if all.is_empty() {
        return vec![Wire::Digest {
            lo: NodeId(0),
            hi: NodeId(u64::MAX),
            entries: Vec::new(),
        }];
    }
    let n = all.len().div_ceil(DIGEST_PAGE);
    let mut out = Vec::with_capacity(n);
    for (i, chunk) in all.chunks(DIGEST_PAGE).enumerate() {
        let lo = if i == 0 { NodeId(0) } else { chunk[0].0 };
        let hi = if i + 1 == n {
            NodeId(u64::MAX)
        } else {
            NodeId(all[(i + 1) * DIGEST_PAGE].0 .0 - 1)
        };
        out.push(Wire::Digest {
            lo,
            hi,
            entries: chunk.to_vec(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::tests::stack;
    use crate::sim::{sim_addr, Sim};

    /// `n` nodes joining through node 0; `before` runs before any starts (a NAT).
    fn mesh(n: usize, seed: u64, before: impl FnOnce(&mut Sim)) -> Sim {
        let mut s = Sim::new(n, Params::default(), seed);
        before(&mut s);
        s.start(0, stack(0), &[]);
        for i in 1..n {
            s.start(i, stack(i), &[0]);
        }
        s.run_until_true(10_000, 10, all_alive)
            .expect("the mesh converges");
        s
    }

    fn all_alive(s: &Sim) -> bool {
        (0..s.len()).all(|i| s.node(i).is_none() || s.all_see(i, |m| m.state == MemberState::Alive))
    }

    fn id(i: usize) -> NodeId {
        Sim::node_id(i)
    }

    fn targets(s: &mut Sim, i: usize, of: &[usize]) {
        s.with_node(i, |n| {
            n.set_path_targets(of.iter().map(|j| id(*j)).collect())
        });
    }

    fn view(s: &Sim, i: usize, of: usize) -> PathView {
        s.node(i)
            .unwrap()
            .paths()
            .into_iter()
            .find(|v| v.id == id(of))
            .expect("a target's view")
    }

    fn reflected(s: &mut Sim, i: usize) -> Vec<(Option<Ipv4Addr>, bool)> {
        s.node_mut(i)
            .unwrap()
            .take_events()
            .into_iter()
            .filter_map(|e| match e {
                GossipEvent::Reflected {
                    observed,
                    port_translated,
                } => Some((observed, port_translated)),
                _ => None,
            })
            .collect()
    }

    /// Node 3 behind a NAT (outside address `outside`), node 2 inside the same NAT;
    /// node 3 probes 0, 1 and 2.
    fn reflection_through(outside: &str) -> (Sim, NatInfo) {
        let outside: SocketAddrV4 = outside.parse().unwrap();
        let mut s = mesh(4, 11, |s| {
            s.set_nat(3, outside, &[2]);
            s.set_nat(2, "198.51.100.99:7950".parse().unwrap(), &[3]);
        });
        s.node_mut(3).unwrap().take_events();
        targets(&mut s, 3, &[0, 1, 2]);
        let want = NatInfo {
            observed: *outside.ip(),
            port_translated: outside.port() != sim_addr(3).port(),
        };
        let t0 = s.now();
        let w = want.clone();
        let t = s
            .run_until_true(t0 + 5_000, 10, |s| {
                s.all_see(3, |m| m.record.nat.as_ref() == Some(&w))
            })
            .expect("the observed address reaches every peer");
        assert!(t - t0 < 2_000, "took {} ms", t - t0);
        (s, want)
    }

    #[test]
    fn reflection_through_a_port_translating_nat() {
        let (mut s, want) = reflection_through("198.51.100.7:40001");
        let r = s.node(3).unwrap().reflection();
        assert_eq!(r.observed, Some(want.observed));
        assert!(r.port_translated);
        // The inside peer reports the local address: it neither adds nor contradicts.
        assert!(r.reports.contains(&(id(2), sim_addr(3))));
        assert_eq!(r.reports.len(), 3);
        assert_eq!(s.node(3).unwrap().record().nat, Some(want.clone()));
        // One event, for the one change.
        assert_eq!(reflected(&mut s, 3), vec![(Some(want.observed), true)]);
        // Nodes not behind NAT observe nothing and publish nothing.
        targets(&mut s, 0, &[1, 3]);
        s.run_until(s.now() + 3_000);
        assert_eq!(s.node(0).unwrap().reflection().observed, None);
        assert_eq!(s.node(0).unwrap().record().nat, None);
        assert!(reflected(&mut s, 0).is_empty());
    }

    #[test]
    fn reflection_through_a_one_to_one_nat_and_pinned() {
        let (mut s, want) = reflection_through("198.51.100.7:7950");
        assert!(!want.port_translated);
        assert!(!s.node(3).unwrap().reflection().port_translated);
        // Pinned (VROUTER_ADVERTISE_ADDR): the record carries no observed address.
        s.with_node(3, |n| n.set_reflect(false));
        let t0 = s.now();
        s.run_until_true(t0 + 5_000, 10, |s| s.all_see(3, |m| m.record.nat.is_none()))
            .expect("the unpinned address is withdrawn");
        assert_eq!(
            s.node(3).unwrap().reflection().observed,
            Some(want.observed)
        );
        // No targets: the reports go, and the observed address with them.
        s.with_node(3, |n| n.set_reflect(true));
        s.with_node(3, |n| n.set_path_targets(BTreeSet::new()));
        s.run_until(s.now() + 100);
        assert_eq!(s.node(3).unwrap().reflection(), Reflection::default());
        assert_eq!(s.node(3).unwrap().record().nat, None);
    }

    #[test]
    fn a_blocked_pair_becomes_unreachable_within_dead_after_and_comes_back() {
        let mut s = mesh(3, 12, |_| {});
        targets(&mut s, 0, &[1, 2]);
        let t0 = s.now();
        s.run_until_true(t0 + 3_000, 10, |s| {
            view(s, 0, 1).reachable && view(s, 0, 2).reachable
        })
        .expect("both reachable");
        let v = view(&s, 0, 1);
        assert_eq!(v.addr, Some(sim_addr(1)));
        assert!(v.acked_ever);
        // Two 1 ms hops.
        assert_eq!(v.rtt_us, Some(2_000));
        s.run_until(s.now() + 500);
        let blocked_at = s.now();
        s.partition(&[0], &[1]);
        let dead = PathParams::default().dead_after_ms;
        let t = s
            .run_until_true(blocked_at + 10_000, 1, |s| !view(s, 0, 1).reachable)
            .expect("declared unreachable");
        assert!(t - blocked_at <= dead + 1, "took {} ms", t - blocked_at);
        let v = view(&s, 0, 1);
        assert_eq!((v.addr, v.rtt_us, v.since_ms), (None, None, t));
        assert!(view(&s, 0, 2).reachable, "the other path is untouched");
        // SWIM keeps both in the mesh through the third node meanwhile.
        s.run_until(s.now() + 5_000);
        assert!(all_alive(&s));
        s.heal();
        let healed = s.now();
        let t = s
            .run_until_true(healed + 5_000, 1, |s| view(s, 0, 1).reachable)
            .expect("reachable again");
        assert!(
            t - healed <= PathParams::default().probe_every_ms + 10,
            "took {} ms",
            t - healed
        );
        assert_eq!(view(&s, 0, 1).since_ms, t);
    }

    fn offer(s: &Sim, i: usize) -> Option<Vec<NodeId>> {
        s.node(i)
            .unwrap()
            .record()
            .relay
            .as_ref()
            .map(|o| o.reach.iter().map(|r| r.id).collect())
    }

    #[test]
    fn a_relay_offer_is_published_and_follows_the_paths() {
        let mut s = mesh(3, 13, |_| {});
        targets(&mut s, 0, &[1, 2]);
        assert_eq!(offer(&s, 0), None, "not a relay yet");
        s.with_node(0, |n| n.set_relay(true));
        let full = vec![id(1), id(2)].into_iter().collect::<BTreeSet<_>>();
        let t0 = s.now();
        s.run_until_true(t0 + 5_000, 10, |s| {
            s.all_see(0, |m| {
                m.record.relay.as_ref().is_some_and(|o| {
                    o.reach.iter().map(|r| r.id).collect::<BTreeSet<_>>() == full
                        && o.reach.iter().all(|r| r.rtt_ms == 2)
                })
            })
        })
        .expect("the offer reaches every peer");
        // A dead path leaves the offer at once (well, within dead_after).
        s.partition(&[0], &[2]);
        let t1 = s.now();
        let t = s
            .run_until_true(t1 + 10_000, 10, |s| {
                s.all_see(0, |m| {
                    m.record.relay.as_ref().is_some_and(|o| {
                        o.reach.iter().map(|r| r.id).collect::<Vec<_>>() == [id(1)]
                    })
                })
            })
            .expect("the offer loses the blocked host");
        assert!(t - t1 < 4_000, "took {} ms", t - t1);
        s.heal();
        s.run_until_true(s.now() + 5_000, 10, |s| {
            offer(s, 0).is_some_and(|o| o.len() == 2)
        })
        .expect("back in the offer");
        // An rtt change is published, but at most every 5 s.
        let mut versions = vec![s.node(0).unwrap().record().version];
        s.latency = (15, 15);
        let t2 = s.now();
        let mut moved_at = None;
        while s.now() < t2 + 12_000 {
            s.run_until(s.now() + 10);
            let r = s.node(0).unwrap().record();
            if versions.last() != Some(&r.version) {
                versions.push(r.version);
            }
            let rtt = r
                .relay
                .as_ref()
                .unwrap()
                .reach
                .iter()
                .map(|x| x.rtt_ms)
                .min();
            if moved_at.is_none() && rtt.is_some_and(|r| r >= 20) {
                moved_at = Some(s.now());
            }
        }
        assert!(moved_at.is_some(), "the new rtt was never published");
        // Each version after the first is at least 5 s after the one before.
        assert!(versions.len() >= 2 && versions.len() <= 4, "{versions:?}");
        for w in versions[1..].windows(2) {
            assert!(w[1] - w[0] >= RELAY_RTT_EVERY_MS, "{versions:?}");
        }
        s.with_node(0, |n| n.set_relay(false));
        s.run_until_true(s.now() + 5_000, 10, |s| {
            s.all_see(0, |m| m.record.relay.is_none())
        })
        .expect("the offer is withdrawn");
    }

    #[test]
    fn with_no_target_no_probe_is_ever_sent() {
        let mut s = mesh(5, 14, |_| {});
        s.with_node(1, |n| n.set_relay(false));
        s.with_node(2, |n| n.set_reflect(true));
        s.run_until(s.now() + 20_000);
        for i in 0..5 {
            let n = s.node(i).unwrap();
            assert_eq!(n.counters().probes_sent, 0);
            assert_eq!(n.counters().probe_acks_sent, 0);
            assert!(n.paths().is_empty());
            assert_eq!(
                (n.record().nat.clone(), n.record().relay.clone()),
                (None, None)
            );
        }
        // The encoded record is a format-2 record's size (the simulator's figures do
        // not move): no NAT or relay unit.
        let r = s.node(0).unwrap().record().clone();
        let mut with = r.clone();
        with.relay = Some(RelayOffer::default());
        assert!(record::encoded_len(&with) > record::encoded_len(&r));
        // Targets set, then cleared: probes while set, none after.
        targets(&mut s, 0, &[1]);
        s.run_until(s.now() + 2_500);
        let sent = s.node(0).unwrap().counters().probes_sent;
        assert!(sent >= 2, "{sent}");
        assert!(s.node(1).unwrap().counters().probe_acks_sent >= 2);
        targets(&mut s, 0, &[]);
        s.run_until(s.now() + 5_000);
        assert_eq!(s.node(0).unwrap().counters().probes_sent, sent);
    }

    #[test]
    fn a_member_behind_nat_is_gossiped_with_at_the_address_its_packets_come_from() {
        // Node 3 announces 10.0.0.4, which nobody outside reaches; its packets come
        // from 198.51.100.7:40001. No path targets anywhere: learned sources alone.
        let mut s = mesh(4, 15, |s| {
            s.set_nat(3, "198.51.100.7:40001".parse().unwrap(), &[])
        });
        let t0 = s.now();
        for _ in 0..20 {
            s.run_until(s.now() + 1_000);
            assert!(all_alive(&s), "a flap at {} ms", s.now() - t0);
        }
        let mut st = stack(3);
        st.extend(stack(9));
        s.set_stacks(3, st).unwrap();
        let mut st = stack(0);
        st.extend(stack(8));
        s.set_stacks(0, st).unwrap();
        let t1 = s.now();
        s.run_until_true(t1 + 5_000, 10, |s| {
            s.all_see(3, |m| m.record.stacks.len() == 2)
                && s.all_see(0, |m| m.record.stacks.len() == 2)
        })
        .expect("changes both ways");
        // With paths on, the learned candidate is probed and used.
        targets(&mut s, 0, &[3]);
        s.run_until_true(s.now() + 3_000, 10, |s| view(s, 0, 3).reachable)
            .expect("reachable at the learned address");
        let v = view(&s, 0, 3);
        assert_eq!(v.addr, Some("198.51.100.7:40001".parse().unwrap()));
        assert_eq!(v.learned, v.addr);
    }

    #[test]
    fn rtt_in_microseconds_with_the_callers_clock() {
        let mut s = mesh(2, 16, |_| {});
        targets(&mut s, 0, &[1]);
        s.run_until_true(s.now() + 3_000, 10, |s| view(s, 0, 1).reachable)
            .expect("reachable");
        // Driven by hand: a probe at 100.250 ms, its ack at 100.650 ms.
        let t = s.now() + 2_000;
        let n0 = s.node_mut(0).unwrap();
        n0.set_clock_us(t * 1000 + 250);
        n0.tick(t);
        let probes = n0.take_outbox();
        let n1 = s.node_mut(1).unwrap();
        let mut acks = Vec::new();
        for (_, data) in probes.iter().filter(|(to, _)| *to == sim_addr(1)) {
            n1.handle_packet(t, sim_addr(0), data);
            acks.extend(
                n1.take_outbox()
                    .into_iter()
                    .filter(|(a, _)| a == &sim_addr(0)),
            );
        }
        assert!(!acks.is_empty());
        let before = view(&s, 0, 1).rtt_us.unwrap();
        let n0 = s.node_mut(0).unwrap();
        n0.set_clock_us(t * 1000 + 650);
        for (_, data) in &acks {
            n0.handle_packet(t, sim_addr(1), data);
        }
        let after = n0.paths()[0].rtt_us.unwrap();
        // One more sample of 400 us in the 1/4 EWMA (other acks may not match).
        assert_eq!(after, (3 * before + 400) / 4);
    }

    #[test]
    fn without_translation_a_member_behind_nat_is_lost() {
        // The control for the test above: the same NAT, but node 3's packets arrive
        // with nothing to learn from (learned addresses expire at once).
        let mut s = Sim::new(4, Params::default(), 15);
        s.set_nat(3, "198.51.100.7:40001".parse().unwrap(), &[]);
        s.start(0, stack(0), &[]);
        for i in 1..4 {
            s.start(i, stack(i), &[0]);
        }
        for i in 0..4 {
            s.with_node(i, |n| {
                n.set_path_params(PathParams {
                    learned_ttl_ms: 1,
                    ..PathParams::default()
                })
            });
        }
        s.run_until(20_000);
        assert!(
            !all_alive(&s),
            "node 3 should not stay alive without translation"
        );
    }
}
