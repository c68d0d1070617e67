//! What a node tells the mesh about itself: a versioned record, and the identity it
//! uses in SWIM membership.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use vrouter_state::StackSpec;

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

/// A stack as announced, with the time its node first claimed it. Between two
/// overlapping claims the earlier one wins, so a newcomer cannot take a prefix someone
/// already holds whatever its node id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedStack {
    pub spec: StackSpec,
    /// Milliseconds since the Unix epoch when this node first announced the stack.
    pub claimed_ms: u64,
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
pub const FORMAT: u16 = 1;
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
    let stacks: Vec<Vec<u8>> = r.stacks.iter().map(|s| with_appended(s, f)).collect();
    with_appended(&(with_appended(&head, f), stacks), f)
}

pub fn decode(bytes: &[u8]) -> Result<NodeRecord, FormatError> {
    let (head, stacks): (Vec<u8>, Vec<Vec<u8>>) =
        decode_front(bytes).ok_or(FormatError::Undecodable)?;
    let head: Head = decode_front(&head).ok_or(FormatError::Undecodable)?;
    let stacks = stacks
        .iter()
        .map(|s| decode_front::<ClaimedStack>(s).ok_or(FormatError::Undecodable))
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

/// Encoded bytes of a record besides its stacks, at most (head fields at their
/// largest, the units' length prefixes).
pub const RECORD_OVERHEAD: usize = 64;

/// Bytes one stack adds to the encoded record, at most: its unit and length prefix.
/// Summed over the stacks, with [`RECORD_OVERHEAD`], it bounds the record's size, so
/// the caller can decide what fits in one pass.
pub fn stack_cost(spec: &StackSpec) -> usize {
    let s = ClaimedStack {
        spec: spec.clone(),
        claimed_ms: u64::MAX,
    };
    postcard::to_allocvec(&s)
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
        }
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
