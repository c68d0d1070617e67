//! What a node tells the mesh about itself: a versioned record, and the identity it
//! uses in SWIM membership.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use vrouter_state::{EncryptionMode, StackSpec};

/// A node's stable id, kept in the state directory across restarts.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for NodeId {
    type Err = String;
    fn from_str(s: &str) -> Result<NodeId, String> {
        let s = s.trim();
        if s.len() != 16 {
            return Err(format!("node id {s:?} is not 16 hex digits"));
        }
        u64::from_str_radix(s, 16)
            .map(NodeId)
            .map_err(|_| format!("node id {s:?} is not 16 hex digits"))
    }
}

/// A stack as announced, with the time its node first claimed it and its placement
/// generation. Between two overlapping claims of different stacks the earlier one
/// wins, so a newcomer cannot take a prefix someone already holds whatever its node
/// id. Between copies of one stack (one name on several hosts) the higher generation
/// wins, then the earlier claim, then the lower node id: a stack that moves gets the
/// old placement's generation plus one, so its move is a migration, not a hijack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedStack {
    pub spec: StackSpec,
    /// Milliseconds since the Unix epoch when this node first announced the stack.
    pub claimed_ms: u64,
    /// The placement generation (format 4; 0 from an older build, and in static mode).
    pub generation: u64,
}

/// Everything a node publishes. The owner raises `version` on every change; every other
/// node keeps the highest version it has seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub version: u64,
    /// Where the node's gossip is reached (advertised, may differ from its bind address).
    pub gossip_addr: SocketAddrV4,
    /// Where VXLAN packets for its stacks go.
    pub underlay: Ipv4Addr,
    pub vxlan_port: u16,
    pub stacks: Vec<ClaimedStack>,
    /// Set by an explicit leave: the node's stacks are withdrawn at once everywhere.
    pub left: bool,
    /// The bump of the node's SWIM identity (see [`Member`]) when this version was made:
    /// a node that learns a record before it learns the member can add the member to
    /// its membership directly.
    pub bump: u64,
    /// The node's overlay encryption (format 2; None from a format-1 node, which has
    /// none).
    pub encryption: Option<Encryption>,
    /// The address the node's peers see it at (format 3): None when not behind NAT,
    /// with reflection off (`VROUTER_ADVERTISE_ADDR` pins the address), or from an
    /// older build.
    pub nat: Option<NatInfo>,
    /// The node relays for others (format 3; `VROUTER_RELAY=true`): the hosts it
    /// reaches directly, with round-trip times. None: not a relay.
    pub relay: Option<RelayOffer>,
}

/// Most hosts one relay offer lists.
pub const MAX_RELAY_REACH: usize = 256;

/// The address a host's peers see its gossip come from, by majority
/// ([`crate::path::reflect`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatInfo {
    pub observed: Ipv4Addr,
    /// Peers see another source port than the host's own: inbound packets to its
    /// announced port do not reach it.
    pub port_translated: bool,
}

/// What a relay offers: the hosts it reaches directly.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RelayOffer {
    /// At most [`MAX_RELAY_REACH`], one per id, never the relay itself.
    pub reach: Vec<RelayReach>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayReach {
    pub id: NodeId,
    /// The relay's round-trip time to `id`, rounded up, at least 1.
    pub rtt_ms: u16,
}

/// What a node announces about its WireGuard: the gossip secret authenticates it, so
/// any holder of the secret could announce another key for a host (encryption
/// protects against observers of the underlay, not against members).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// Its `VROUTER_ENCRYPTION`.
    pub mode: EncryptionMode,
    /// Its WireGuard public key; None when the mode is off.
    pub public_key: Option<[u8; 32]>,
    /// During a key rotation, the key it moves to: peers switch to it at once.
    pub next_public_key: Option<[u8; 32]>,
    /// Its tunnel address (in the tunnel range; None when off).
    pub tunnel: Option<Ipv4Addr>,
    pub wg_port: u16,
}

/// [`Encryption`] on the wire: the mode as a number (0 off, 1 require, 2 prefer), so
/// an unknown mode of a newer build decodes (and is refused by validation) instead
/// of failing the decoder.
#[derive(Serialize, Deserialize)]
struct EncryptionWire {
    mode: u8,
    public_key: Option<[u8; 32]>,
    next_public_key: Option<[u8; 32]>,
    tunnel: Option<Ipv4Addr>,
    wg_port: u16,
}

fn mode_number(m: &EncryptionMode) -> u8 {
    match m {
        EncryptionMode::Off => 0,
        EncryptionMode::Require => 1,
        EncryptionMode::Prefer => 2,
        EncryptionMode::Other(_) => u8::MAX,
    }
}

fn mode_of(n: u8) -> EncryptionMode {
    match n {
        0 => EncryptionMode::Off,
        1 => EncryptionMode::Require,
        2 => EncryptionMode::Prefer,
        n => EncryptionMode::Other(format!("mode {n}")),
    }
}

impl NodeRecord {
    pub fn prefix_count(&self) -> usize {
        self.stacks.iter().map(|s| s.spec.prefixes.len()).sum()
    }
}

/// The SWIM identity: the stable id plus where to reach it and a bump that makes every
/// start (and every rejoin after being declared down) a new incarnation that wins over
/// the old one. Foca keys members by `id`, so a new address is a rename, not a new member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub addr: SocketAddrV4,
    pub bump: u64,
}

impl foca::Identity for Member {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        Some(Member {
            bump: self.bump.saturating_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> NodeId {
        self.id
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

// ---------------------------------------------------------------------------------
// The record on the wire: a format that only ever grows by appending, split into
// datagram-sized parts.
// ---------------------------------------------------------------------------------

/// The record and message format this build writes. Fields are only ever appended,
/// at the end of a length-delimited unit (a message body, the record head, a stack, a
/// part): an older reader decodes the fields it knows and skips the rest, so nodes of
/// two formats live side by side in one mesh during a rolling upgrade.
/// Format 2 appends the encryption unit to the head (`Option<bytes>`); format 3
/// appends the NAT unit and the relay unit after it (each `Option<bytes>`), written
/// only when one of them is set (or fields of a newer format follow), so a record
/// without them has a format-2 record's size and layout. Format 4 appends the
/// placement generation (a varint) to each stack unit, after `claimed_ms`, written
/// only when it is not 0 (or fields of a newer format follow): a stack unit without
/// it reads as generation 0.
pub const FORMAT: u16 = 4;
/// Record bytes carried by one part: a part and its framing stay well inside one
/// datagram, even piggybacked on a SWIM packet with membership updates.
pub const PART_BYTES: usize = 900;
/// Most parts of one record version.
pub const MAX_PARTS: usize = 40;
/// Largest encoded record (36,000 bytes: 100 stacks with 64-character names and 4
/// prefixes take about 14,000).
pub const MAX_RECORD_BYTES: usize = PART_BYTES * MAX_PARTS;
/// Largest part payload accepted from the wire (a newer format may cut larger parts).
const MAX_PART_PAYLOAD: usize = 1400;

/// What a node writes: the format number and, in tests that emulate a newer build,
/// opaque bytes appended wherever a newer format would append fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    pub version: u16,
    pub appended: Vec<u8>,
}

impl Default for Format {
    fn default() -> Format {
        Format {
            version: FORMAT,
            appended: Vec::new(),
        }
    }
}

impl Format {
    /// A stand-in for the next format: a higher number and an extra field everywhere.
    pub fn newer_for_tests() -> Format {
        Format {
            version: FORMAT + 1,
            appended: b"\x07a field from the future".to_vec(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("undecodable record or part")]
    Undecodable,
    #[error("record part fields out of range")]
    OutOfRange,
    #[error("this host's record would be {0} bytes, over the {MAX_RECORD_BYTES}-byte limit ({MAX_PARTS} parts of {PART_BYTES} bytes)")]
    TooBig(usize),
}

/// The record's fixed fields (everything but the stacks).
#[derive(Serialize, Deserialize)]
struct Head {
    format: u16,
    id: NodeId,
    version: u64,
    gossip_addr: SocketAddrV4,
    underlay: Ipv4Addr,
    vxlan_port: u16,
    left: bool,
    bump: u64,
}

fn with_appended<T: Serialize>(v: &T, f: &Format) -> Vec<u8> {
    let mut out = postcard::to_allocvec(v).expect("records and messages always encode");
    out.extend_from_slice(&f.appended);
    out
}

/// Decodes a `T` from the front of `bytes`; whatever follows (fields of a newer
/// format) is skipped.
pub(crate) fn decode_front<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    postcard::take_from_bytes::<T>(bytes).ok().map(|(v, _)| v)
}

/// The whole record: (head, stacks), each a length-delimited unit, then room for more.
/// The head is the format-1 fields, then (format 2) the encryption as an optional
/// length-delimited unit of its own, then room for more.
pub fn encode(r: &NodeRecord, f: &Format) -> Vec<u8> {
    let head = Head {
        format: f.version,
        id: r.id,
        version: r.version,
        gossip_addr: r.gossip_addr,
        underlay: r.underlay,
        vxlan_port: r.vxlan_port,
        left: r.left,
        bump: r.bump,
    };
    let encryption: Option<Vec<u8>> = r.encryption.as_ref().map(|e| {
        let wire = EncryptionWire {
            mode: mode_number(&e.mode),
            public_key: e.public_key,
            next_public_key: e.next_public_key,
            tunnel: e.tunnel,
            wg_port: e.wg_port,
        };
        with_appended(&wire, f)
    });
    let head = if r.nat.is_some() || r.relay.is_some() || !f.appended.is_empty() {
        let nat: Option<Vec<u8>> = r
            .nat
            .as_ref()
            .map(|n| with_appended(&(n.observed, n.port_translated), f));
        let relay: Option<Vec<u8>> = r.relay.as_ref().map(|o| {
            let reach: Vec<(NodeId, u16)> = o.reach.iter().map(|x| (x.id, x.rtt_ms)).collect();
            with_appended(&reach, f)
        });
        with_appended(&(head, encryption, nat, relay), f)
    } else {
        with_appended(&(head, encryption), f)
    };
    let stacks: Vec<Vec<u8>> = r.stacks.iter().map(|s| stack_unit(s, f)).collect();
    with_appended(&(head, stacks), f)
}

/// A stack's unit: the format-1 fields (spec, claimed_ms), then (format 4) the
/// generation when it is not 0 or newer fields follow.
fn stack_unit(s: &ClaimedStack, f: &Format) -> Vec<u8> {
    if s.generation == 0 && f.appended.is_empty() {
        with_appended(&(&s.spec, s.claimed_ms), f)
    } else {
        with_appended(&(&s.spec, s.claimed_ms, s.generation), f)
    }
}

/// A stack unit: the format-1 fields from its front, then the generation if present
/// (format 4; absent: 0); whatever follows is skipped.
fn decode_stack(unit: &[u8]) -> Result<ClaimedStack, FormatError> {
    let ((spec, claimed_ms), rest) = postcard::take_from_bytes::<(StackSpec, u64)>(unit)
        .map_err(|_| FormatError::Undecodable)?;
    let generation = if rest.is_empty() {
        0
    } else {
        decode_front::<u64>(rest).ok_or(FormatError::Undecodable)?
    };
    Ok(ClaimedStack {
        spec,
        claimed_ms,
        generation,
    })
}

/// The head's units after the format-1 fields: encryption (format 2), NAT and relay
/// (format 3); each absent in an older head.
type HeadUnits = (Option<Encryption>, Option<NatInfo>, Option<RelayOffer>);

fn decode_units(rest: &[u8]) -> Result<HeadUnits, FormatError> {
    let (encryption, rest) = take_unit(rest)?;
    let encryption = encryption.map(|u| decode_encryption(&u)).transpose()?;
    let (nat, rest) = take_unit(rest)?;
    let nat = nat
        .map(|u| {
            decode_front::<(Ipv4Addr, bool)>(&u)
                .map(|(observed, port_translated)| NatInfo {
                    observed,
                    port_translated,
                })
                .ok_or(FormatError::Undecodable)
        })
        .transpose()?;
    let (relay, _rest) = take_unit(rest)?;
    let relay = relay
        .map(|u| {
            decode_front::<Vec<(NodeId, u16)>>(&u)
                .map(|reach| RelayOffer {
                    reach: reach
                        .into_iter()
                        .map(|(id, rtt_ms)| RelayReach { id, rtt_ms })
                        .collect(),
                })
                .ok_or(FormatError::Undecodable)
        })
        .transpose()?;
    Ok((encryption, nat, relay))
}

/// An optional length-delimited unit from the front of `rest`: None (and nothing
/// consumed) at the end of the head, as an older build wrote it.
fn take_unit(rest: &[u8]) -> Result<(Option<Vec<u8>>, &[u8]), FormatError> {
    if rest.is_empty() {
        return Ok((None, rest));
    }
    postcard::take_from_bytes::<Option<Vec<u8>>>(rest).map_err(|_| FormatError::Undecodable)
}

/// The encryption unit's content.
fn decode_encryption(unit: &[u8]) -> Result<Encryption, FormatError> {
    let w: EncryptionWire = decode_front(unit).ok_or(FormatError::Undecodable)?;
    Ok(Encryption {
        mode: mode_of(w.mode),
        public_key: w.public_key,
        next_public_key: w.next_public_key,
        tunnel: w.tunnel,
        wg_port: w.wg_port,
    })
}

pub fn decode(bytes: &[u8]) -> Result<NodeRecord, FormatError> {
    let (head, stacks): (Vec<u8>, Vec<Vec<u8>>) =
        decode_front(bytes).ok_or(FormatError::Undecodable)?;
    let (head, rest) =
        postcard::take_from_bytes::<Head>(&head).map_err(|_| FormatError::Undecodable)?;
    let (encryption, nat, relay) = decode_units(rest)?;
    let stacks = stacks
        .iter()
        .map(|s| decode_stack(s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NodeRecord {
        id: head.id,
        version: head.version,
        gossip_addr: head.gossip_addr,
        underlay: head.underlay,
        vxlan_port: head.vxlan_port,
        stacks,
        left: head.left,
        bump: head.bump,
        encryption,
        nat,
        relay,
    })
}

/// Bytes of `r` encoded in this build's format: what [`MAX_RECORD_BYTES`] limits.
pub fn encoded_len(r: &NodeRecord) -> usize {
    encode(r, &Format::default()).len()
}

/// One piece of one record version: a broadcast item, and what anti-entropy sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordPart {
    pub id: NodeId,
    pub version: u64,
    pub index: u16,
    pub count: u16,
    pub bytes: Vec<u8>,
}

/// Splits `r` into encoded parts, each well inside one datagram.
pub fn split(r: &NodeRecord, f: &Format) -> Result<Vec<Vec<u8>>, FormatError> {
    let blob = encode(r, f);
    if blob.len() > MAX_RECORD_BYTES {
        return Err(FormatError::TooBig(blob.len()));
    }
    let chunks: Vec<&[u8]> = blob.chunks(PART_BYTES).collect();
    let count = chunks.len().max(1) as u16;
    Ok((0..count)
        .map(|i| {
            let part = RecordPart {
                id: r.id,
                version: r.version,
                index: i,
                count,
                bytes: chunks
                    .get(i as usize)
                    .map(|c| c.to_vec())
                    .unwrap_or_default(),
            };
            with_appended(&part, f)
        })
        .collect())
}

/// Decodes an encoded part and checks its fields (index within count, count and size
/// within the limits).
pub fn decode_part(bytes: &[u8]) -> Result<RecordPart, FormatError> {
    let p: RecordPart = decode_front(bytes).ok_or(FormatError::Undecodable)?;
    if p.count == 0
        || p.count as usize > MAX_PARTS
        || p.index >= p.count
        || p.bytes.len() > MAX_PART_PAYLOAD
    {
        return Err(FormatError::OutOfRange);
    }
    Ok(p)
}

/// Encoded bytes of the NAT and relay units at most: the NAT unit (an address and a
/// flag) and a full relay offer (an id of up to 10 bytes and an rtt of up to 3 per
/// entry), with their length prefixes.
pub const NAT_RELAY_BYTES: usize = 8 + 8 + MAX_RELAY_REACH * 13;

/// Encoded bytes of a record besides its stacks, at most (head fields at their
/// largest, the encryption unit with both keys, the NAT unit, a full relay offer, the
/// units' length prefixes).
pub const RECORD_OVERHEAD: usize = 64 + 80 + NAT_RELAY_BYTES;

/// Bytes one stack adds to the encoded record, at most: its unit and length prefix.
/// Summed over the stacks, with [`RECORD_OVERHEAD`], it bounds the record's size, so
/// the caller can decide what fits in one pass.
pub fn stack_cost(spec: &StackSpec) -> usize {
    postcard::to_allocvec(&(spec, u64::MAX, u64::MAX))
        .map(|v| v.len())
        .unwrap_or(usize::MAX / 2)
        + 3
}

/// Whether a record announcing `stacks` fits [`MAX_RECORD_BYTES`].
pub fn stacks_fit<'a>(stacks: impl Iterator<Item = &'a StackSpec>) -> bool {
    stacks.map(stack_cost).sum::<usize>() + RECORD_OVERHEAD <= MAX_RECORD_BYTES
}

/// Drops the newest stacks (latest claim, then name) until the record fits; returns
/// the dropped ones, newest first. The oldest stacks are never the ones refused.
pub fn fit(r: &mut NodeRecord) -> Vec<ClaimedStack> {
    let mut dropped = Vec::new();
    r.stacks
        .sort_by(|a, b| (a.claimed_ms, &a.spec.name).cmp(&(b.claimed_ms, &b.spec.name)));
    while encoded_len(r) > MAX_RECORD_BYTES {
        match r.stacks.pop() {
            Some(s) => dropped.push(s),
            None => break,
        }
    }
    dropped
}

/// A record assembled from its parts, with the parts as received.
pub type Assembled = (NodeRecord, Vec<Vec<u8>>);

/// The parts of one record version received so far. The receiver keeps serving the
/// previous complete version until every part of this one is in.
#[derive(Debug, Clone)]
pub struct Assembly {
    pub version: u64,
    /// Encoded parts as received (relayed verbatim, so fields of a newer format
    /// survive an older relay).
    parts: Vec<Option<Vec<u8>>>,
    payloads: Vec<Option<Vec<u8>>>,
    have: usize,
    /// When the last part arrived (the store's counter), for eviction.
    pub touched: u64,
}

impl Assembly {
    pub fn new(version: u64, count: u16, touched: u64) -> Assembly {
        Assembly {
            version,
            parts: vec![None; count as usize],
            payloads: vec![None; count as usize],
            have: 0,
            touched,
        }
    }

    pub fn count(&self) -> usize {
        self.parts.len()
    }

    /// The encoded parts in so far.
    pub fn raw_parts(&self) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.parts.iter().flatten().cloned()
    }

    pub fn has(&self, index: u16) -> bool {
        self.parts.get(index as usize).is_some_and(|p| p.is_some())
    }

    /// Adds a part (checked by [`decode_part`] to belong here). Once every part is in,
    /// returns the record and its encoded parts.
    pub fn add(&mut self, p: RecordPart, raw: &[u8]) -> Option<Result<Assembled, FormatError>> {
        let i = p.index as usize;
        if i >= self.parts.len() || self.parts[i].is_some() {
            return None;
        }
        self.parts[i] = Some(raw.to_vec());
        self.payloads[i] = Some(p.bytes);
        self.have += 1;
        if self.have < self.parts.len() {
            return None;
        }
        let blob: Vec<u8> = self.payloads.iter().flatten().flatten().copied().collect();
        let parts: Vec<Vec<u8>> = self.parts.iter_mut().filter_map(Option::take).collect();
        Some(decode(&blob).and_then(|r| {
            if r.id == p.id && r.version == p.version {
                Ok((r, parts))
            } else {
                Err(FormatError::OutOfRange)
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn big_record(seed: u64) -> NodeRecord {
        NodeRecord {
            id: NodeId(7),
            version: 1_800_000_000_000,
            gossip_addr: "198.18.0.1:7950".parse().unwrap(),
            underlay: "198.18.0.1".parse().unwrap(),
            vxlan_port: 4789,
            stacks: crate::sim::long_stacks(seed, 100, 4),
            left: false,
            bump: 9,
            encryption: Some(Encryption {
                mode: EncryptionMode::Require,
                public_key: Some([7; 32]),
                next_public_key: None,
                tunnel: Some("10.255.0.1".parse().unwrap()),
                wg_port: 51820,
            }),
            nat: Some(NatInfo {
                observed: "203.0.113.5".parse().unwrap(),
                port_translated: true,
            }),
            relay: Some(RelayOffer {
                reach: vec![
                    RelayReach {
                        id: NodeId(8),
                        rtt_ms: 3,
                    },
                    RelayReach {
                        id: NodeId(u64::MAX),
                        rtt_ms: u16::MAX,
                    },
                ],
            }),
        }
    }

    /// The head of a format-1 build, as it wrote it and as it reads a newer one.
    #[derive(Serialize, Deserialize)]
    struct HeadV1 {
        format: u16,
        id: NodeId,
        version: u64,
        gossip_addr: SocketAddrV4,
        underlay: Ipv4Addr,
        vxlan_port: u16,
        left: bool,
        bump: u64,
    }

    /// A stack unit as formats 1 to 3 wrote and read it.
    type StackV1 = (StackSpec, u64);

    fn v1_stacks(r: &NodeRecord) -> Vec<Vec<u8>> {
        r.stacks
            .iter()
            .map(|s| postcard::to_allocvec(&(&s.spec, s.claimed_ms)).unwrap())
            .collect()
    }

    fn without_generations(r: &mut NodeRecord) {
        for s in &mut r.stacks {
            s.generation = 0;
        }
    }

    fn v1_head(r: &NodeRecord) -> HeadV1 {
        HeadV1 {
            format: 1,
            id: r.id,
            version: r.version,
            gossip_addr: r.gossip_addr,
            underlay: r.underlay,
            vxlan_port: r.vxlan_port,
            left: r.left,
            bump: r.bump,
        }
    }

    #[test]
    fn a_format_1_record_decodes_without_encryption() {
        let mut r = big_record(5);
        let head = postcard::to_allocvec(&v1_head(&r)).unwrap();
        let stacks = v1_stacks(&r);
        let v1 = postcard::to_allocvec(&(head, stacks)).unwrap();
        r.encryption = None;
        r.nat = None;
        r.relay = None;
        without_generations(&mut r);
        assert_eq!(decode(&v1).unwrap(), r);
    }

    #[test]
    fn a_format_1_reader_decodes_a_record_with_encryption() {
        let r = big_record(6);
        assert!(r.encryption.is_some());
        let blob = encode(&r, &Format::default());
        // What a format-1 build does: the head's known fields from the front of the
        // head unit, the stacks; the encryption unit is skipped.
        let (head, stacks): (Vec<u8>, Vec<Vec<u8>>) = decode_front(&blob).unwrap();
        let old: HeadV1 = decode_front(&head).unwrap();
        assert_eq!(
            (old.id, old.version, old.underlay),
            (r.id, r.version, r.underlay)
        );
        assert_eq!(
            (old.vxlan_port, old.bump, old.left),
            (r.vxlan_port, r.bump, r.left)
        );
        let back: Vec<StackV1> = stacks.iter().map(|s| decode_front(s).unwrap()).collect();
        let want: Vec<StackV1> = r
            .stacks
            .iter()
            .map(|s| (s.spec.clone(), s.claimed_ms))
            .collect();
        assert_eq!(back, want);
        // And this build reads it whole, off and unknown modes included.
        assert_eq!(decode(&blob).unwrap(), r);
        let mut off = r.clone();
        off.encryption = Some(Encryption {
            mode: EncryptionMode::Off,
            public_key: None,
            next_public_key: None,
            tunnel: None,
            wg_port: 51820,
        });
        assert_eq!(decode(&encode(&off, &Format::default())).unwrap(), off);
        let mut unknown = r.clone();
        unknown.encryption.as_mut().unwrap().mode = EncryptionMode::Other("mode 255".into());
        assert_eq!(
            decode(&encode(&unknown, &Format::default())).unwrap(),
            unknown
        );
    }

    /// What a format-2 build wrote: the format-1 head, then the encryption unit.
    fn v2_blob(r: &NodeRecord) -> Vec<u8> {
        let enc: Option<Vec<u8>> = r.encryption.as_ref().map(|e| {
            postcard::to_allocvec(&EncryptionWire {
                mode: mode_number(&e.mode),
                public_key: e.public_key,
                next_public_key: e.next_public_key,
                tunnel: e.tunnel,
                wg_port: e.wg_port,
            })
            .unwrap()
        });
        let mut h = v1_head(r);
        h.format = 2;
        let head = postcard::to_allocvec(&(h, enc)).unwrap();
        postcard::to_allocvec(&(head, v1_stacks(r))).unwrap()
    }

    #[test]
    fn a_format_2_record_decodes_without_nat_or_relay() {
        let mut r = big_record(8);
        let v2 = v2_blob(&r);
        r.nat = None;
        r.relay = None;
        without_generations(&mut r);
        assert_eq!(decode(&v2).unwrap(), r);
        // Without NAT and relay this build writes a format-2 record's layout.
        assert_eq!(encode(&r, &Format::default()).len(), v2.len());
    }

    #[test]
    fn a_format_2_reader_decodes_a_record_with_nat_and_relay() {
        let r = big_record(9);
        assert!(r.nat.is_some() && r.relay.is_some());
        for f in [Format::default(), Format::newer_for_tests()] {
            let blob = encode(&r, &f);
            // What a format-2 build does: the head, the encryption unit from the rest
            // (what follows is skipped), the stacks.
            let (head, stacks): (Vec<u8>, Vec<Vec<u8>>) = decode_front(&blob).unwrap();
            let (old, rest) = postcard::take_from_bytes::<HeadV1>(&head).unwrap();
            assert_eq!((old.id, old.version, old.bump), (r.id, r.version, r.bump));
            let unit: Option<Vec<u8>> = decode_front(rest).unwrap();
            assert_eq!(
                decode_encryption(&unit.unwrap()).unwrap(),
                r.encryption.clone().unwrap()
            );
            let back: Vec<StackV1> = stacks.iter().map(|s| decode_front(s).unwrap()).collect();
            let want: Vec<StackV1> = r
                .stacks
                .iter()
                .map(|s| (s.spec.clone(), s.claimed_ms))
                .collect();
            assert_eq!(back, want);
            // This build reads it whole.
            assert_eq!(decode(&blob).unwrap(), r);
        }
        // Each unit alone, and an empty offer.
        let mut only_relay = r.clone();
        only_relay.nat = None;
        only_relay.relay = Some(RelayOffer::default());
        assert_eq!(
            decode(&encode(&only_relay, &Format::default())).unwrap(),
            only_relay
        );
        let mut only_nat = r.clone();
        only_nat.relay = None;
        only_nat.encryption = None;
        assert_eq!(
            decode(&encode(&only_nat, &Format::default())).unwrap(),
            only_nat
        );
    }

    #[test]
    fn generations_travel_and_an_older_stack_unit_reads_as_generation_0() {
        let mut r = big_record(11);
        for (i, s) in r.stacks.iter_mut().enumerate() {
            s.generation = [0, 1, 2, u64::MAX][i % 4];
        }
        for f in [Format::default(), Format::newer_for_tests()] {
            let blob = encode(&r, &f);
            assert_eq!(decode(&blob).unwrap(), r);
            // A format-3 reader takes (spec, claimed_ms) from each unit's front.
            let (_, stacks): (Vec<u8>, Vec<Vec<u8>>) = decode_front(&blob).unwrap();
            for (unit, s) in stacks.iter().zip(&r.stacks) {
                let old: StackV1 = decode_front(unit).unwrap();
                assert_eq!(old, (s.spec.clone(), s.claimed_ms));
            }
        }
        // Generation 0 is not written: a format-3 stack unit, byte for byte.
        let mut zero = r.clone();
        without_generations(&mut zero);
        let (_, units): (Vec<u8>, Vec<Vec<u8>>) =
            decode_front(&encode(&zero, &Format::default())).unwrap();
        assert_eq!(units, v1_stacks(&zero));
        // A garbled generation is undecodable.
        let mut unit = postcard::to_allocvec(&(&r.stacks[0].spec, 5u64)).unwrap();
        unit.extend_from_slice(&[0xff; 11]);
        assert_eq!(decode_stack(&unit), Err(FormatError::Undecodable));
    }

    #[test]
    fn a_garbled_nat_or_relay_unit_is_undecodable() {
        let r = big_record(10);
        let mut h = v1_head(&r);
        h.format = 3;
        for tail in [&[0u8, 1, 3, 9][..], &[0, 0, 1, 4, 1, 2], &[0, 7]] {
            let mut head = postcard::to_allocvec(&h).unwrap();
            head.extend_from_slice(tail);
            let v = postcard::to_allocvec(&(head, Vec::<Vec<u8>>::new())).unwrap();
            assert_eq!(decode(&v), Err(FormatError::Undecodable), "{tail:?}");
        }
    }

    #[test]
    fn a_garbled_encryption_unit_is_undecodable() {
        let r = big_record(7);
        let head = postcard::to_allocvec(&v1_head(&r)).unwrap();
        let mut head = head;
        head.extend_from_slice(&[1, 3, 9]); // Some, 3 bytes, but only one there
        let v = postcard::to_allocvec(&(head, Vec::<Vec<u8>>::new())).unwrap();
        assert_eq!(decode(&v), Err(FormatError::Undecodable));
    }

    #[test]
    fn a_hundred_stacks_split_into_datagram_sized_parts_and_back() {
        let r = big_record(1);
        let len = encoded_len(&r);
        assert!(len > 10_000 && len < MAX_RECORD_BYTES, "{len} bytes");
        let parts = split(&r, &Format::default()).unwrap();
        assert!(parts.len() > 10, "{} parts", parts.len());
        assert!(parts.iter().all(|p| p.len() <= PART_BYTES + 32));
        // Any arrival order.
        let mut a = Assembly::new(r.version, parts.len() as u16, 0);
        let mut done = None;
        for raw in parts.iter().rev() {
            let p = decode_part(raw).unwrap();
            if let Some(x) = a.add(p, raw) {
                done = Some(x.unwrap());
            }
        }
        let (back, relayed) = done.expect("complete");
        assert_eq!(back, r);
        assert_eq!(relayed, parts);
    }

    #[test]
    fn an_older_reader_skips_fields_it_does_not_know() {
        let r = big_record(2);
        let newer = Format::newer_for_tests();
        assert_eq!(decode(&encode(&r, &newer)).unwrap(), r);
        let parts = split(&r, &newer).unwrap();
        let mut a = Assembly::new(r.version, parts.len() as u16, 0);
        let mut done = None;
        for raw in &parts {
            if let Some(x) = a.add(decode_part(raw).unwrap(), raw) {
                done = Some(x.unwrap());
            }
        }
        let (back, relayed) = done.unwrap();
        assert_eq!(back, r);
        // Relayed verbatim: the newer fields reach newer readers through older relays.
        assert_eq!(relayed, parts);
    }

    #[test]
    fn stack_costs_bound_the_record_size() {
        let mut r = big_record(4);
        r.id = NodeId(u64::MAX);
        r.version = u64::MAX;
        r.bump = u64::MAX;
        for s in &mut r.stacks {
            s.generation = u64::MAX;
        }
        // The largest NAT and relay units.
        r.nat = Some(NatInfo {
            observed: Ipv4Addr::BROADCAST,
            port_translated: true,
        });
        r.relay = Some(RelayOffer {
            reach: (0..MAX_RELAY_REACH as u64)
                .map(|i| RelayReach {
                    id: NodeId(u64::MAX - i),
                    rtt_ms: u16::MAX,
                })
                .collect(),
        });
        let bound: usize =
            r.stacks.iter().map(|s| stack_cost(&s.spec)).sum::<usize>() + RECORD_OVERHEAD;
        let len = encode(&r, &Format::default()).len();
        assert!(
            len <= bound && bound - len < 8 * r.stacks.len(),
            "{len} vs {bound}"
        );
        assert!(stacks_fit(r.stacks.iter().map(|s| &s.spec)));
    }

    #[test]
    fn parts_out_of_range_are_refused() {
        let bad = |index, count| RecordPart {
            id: NodeId(1),
            version: 1,
            index,
            count,
            bytes: vec![1],
        };
        for (i, c) in [(0, 0), (1, 1), (0, MAX_PARTS as u16 + 1), (5, 3)] {
            let raw = postcard::to_allocvec(&bad(i, c)).unwrap();
            assert_eq!(decode_part(&raw), Err(FormatError::OutOfRange), "{i}/{c}");
        }
        assert_eq!(decode_part(b"\xff"), Err(FormatError::Undecodable));
    }

    #[test]
    fn fit_refuses_the_newest_stacks() {
        let mut r = big_record(3);
        let many: Vec<ClaimedStack> = (0..4).flat_map(|_| r.stacks.clone()).collect();
        r.stacks = many
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                s.claimed_ms = i as u64;
                s
            })
            .collect();
        let dropped = fit(&mut r);
        assert!(!dropped.is_empty());
        assert!(encoded_len(&r) <= MAX_RECORD_BYTES);
        let newest_kept = r.stacks.iter().map(|s| s.claimed_ms).max().unwrap();
        assert!(dropped.iter().all(|d| d.claimed_ms > newest_kept));
    }
}
