//! The messages inside a sealed datagram, and their framing.
//!
//! A datagram's plaintext is `format | tag | body` (postcard varints, then the body to
//! the end). A body is the message's fields followed by whatever a newer format
//! appended, which an older reader skips; a tag it does not know is skipped whole
//! (counted, not rejected), so a rolling upgrade that adds a message or a field never
//! splits the mesh. Tags are never reused.

use crate::record::{decode_front, Format, Member, NodeId};
use serde::Serialize;
use std::net::SocketAddrV4;

/// What travels inside a sealed datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wire {
    /// A foca packet.
    Swim(Vec<u8>),
    /// "Let me in": sent to a bootstrap address, whose node id we do not know yet.
    Join(Member),
    /// The bootstrap node's identity, so the joiner can announce itself to it.
    JoinAck(Member),
    /// Anti-entropy opener: a hash over every (id, version) the sender holds.
    Sync { hash: u64, count: u32 },
    /// The (id, version) pairs the sender holds for ids in `lo..=hi`.
    Digest {
        lo: NodeId,
        hi: NodeId,
        entries: Vec<(NodeId, u64)>,
    },
    /// Records the sender asks for (every part of each).
    Want(Vec<NodeId>),
    /// Encoded record parts ([`crate::record::RecordPart`]) answering anti-entropy.
    Parts(Vec<Vec<u8>>),
    /// Encoded record parts pushed by their origin on a change: the receiver passes
    /// them on as broadcasts, as if they had come through SWIM.
    Push(Vec<Vec<u8>>),
    /// Records the sender pruned (down past the retention time) at these versions: the
    /// receiver drops its copies at or below them, and takes none back.
    Pruned(Vec<(NodeId, u64)>),
    /// A path probe ([`crate::path`]): answered, once it authenticates, with a
    /// [`Wire::ProbeAck`] to the address it came from.
    Probe { token: u64 },
    /// The answer to a probe: `seen` is the source address (ip and port) the probe
    /// came from, as the responder saw it (what reflection is made of).
    ProbeAck { token: u64, seen: SocketAddrV4 },
}

const SWIM: u16 = 1;
const JOIN: u16 = 2;
const JOIN_ACK: u16 = 3;
const SYNC: u16 = 4;
const DIGEST: u16 = 5;
const WANT: u16 = 6;
const PARTS: u16 = 7;
const PUSH: u16 = 8;
const PRUNED: u16 = 9;
const PROBE: u16 = 10;
const PROBE_ACK: u16 = 11;
/// A tag no build knows: what a newer build's new message looks like to this one.
const UNKNOWN_FOR_TESTS: u16 = 0x7fff;

fn frame<T: Serialize>(f: &Format, tag: u16, body: &T) -> Vec<u8> {
    let mut out = postcard::to_allocvec(&(f.version, tag)).expect("encodes");
    out.extend(postcard::to_allocvec(body).expect("encodes"));
    out.extend_from_slice(&f.appended);
    out
}

pub fn encode(w: &Wire, f: &Format) -> Vec<u8> {
    match w {
        Wire::Swim(b) => frame(f, SWIM, b),
        Wire::Join(m) => frame(f, JOIN, m),
        Wire::JoinAck(m) => frame(f, JOIN_ACK, m),
        Wire::Sync { hash, count } => frame(f, SYNC, &(hash, count)),
        Wire::Digest { lo, hi, entries } => frame(f, DIGEST, &(lo, hi, entries)),
        Wire::Want(ids) => frame(f, WANT, ids),
        Wire::Parts(p) => frame(f, PARTS, p),
        Wire::Push(p) => frame(f, PUSH, p),
        Wire::Pruned(p) => frame(f, PRUNED, p),
        Wire::Probe { token } => frame(f, PROBE, token),
        Wire::ProbeAck { token, seen } => frame(f, PROBE_ACK, &(token, seen)),
    }
}

/// A message of a tag no build knows, as a newer build would send one.
pub fn encode_unknown_for_tests(f: &Format) -> Vec<u8> {
    frame(f, UNKNOWN_FOR_TESTS, &b"something new".to_vec())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// A message of a tag this build does not know (a newer format's): skipped.
    Unknown,
    /// A frame or a known message's fields that do not decode.
    Malformed,
}

pub fn decode(bytes: &[u8]) -> Result<Wire, Decoded> {
    let ((_format, tag), body): ((u16, u16), &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|_| Decoded::Malformed)?;
    fn b<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Decoded> {
        decode_front(body).ok_or(Decoded::Malformed)
    }
    Ok(match tag {
        SWIM => Wire::Swim(b(body)?),
        JOIN => Wire::Join(b(body)?),
        JOIN_ACK => Wire::JoinAck(b(body)?),
        SYNC => {
            let (hash, count) = b(body)?;
            Wire::Sync { hash, count }
        }
        DIGEST => {
            let (lo, hi, entries) = b(body)?;
            Wire::Digest { lo, hi, entries }
        }
        WANT => Wire::Want(b(body)?),
        PARTS => Wire::Parts(b(body)?),
        PUSH => Wire::Push(b(body)?),
        PRUNED => Wire::Pruned(b(body)?),
        PROBE => Wire::Probe { token: b(body)? },
        PROBE_ACK => {
            let (token, seen) = b(body)?;
            Wire::ProbeAck { token, seen }
        }
        _ => return Err(Decoded::Unknown),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Wire> {
        let m = Member {
            id: NodeId(3),
            addr: "10.0.0.1:7950".parse().unwrap(),
            bump: 5,
        };
        vec![
            Wire::Swim(vec![1, 2, 3]),
            Wire::Join(m.clone()),
            Wire::JoinAck(m),
            Wire::Sync { hash: 9, count: 2 },
            Wire::Digest {
                lo: NodeId(1),
                hi: NodeId(8),
                entries: vec![(NodeId(2), 7)],
            },
            Wire::Want(vec![NodeId(4)]),
            Wire::Parts(vec![vec![1; 30]]),
            Wire::Push(vec![vec![2; 30]]),
            Wire::Pruned(vec![(NodeId(6), 11)]),
            Wire::Probe { token: u64::MAX },
            Wire::ProbeAck {
                token: 3,
                seen: "203.0.113.5:40000".parse().unwrap(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_in_both_formats() {
        for w in all() {
            assert_eq!(decode(&encode(&w, &Format::default())), Ok(w.clone()));
            // An older reader of a newer writer: the appended field is skipped.
            assert_eq!(decode(&encode(&w, &Format::newer_for_tests())), Ok(w));
        }
    }

    #[test]
    fn probe_tags_are_10_and_11() {
        for (w, tag) in [
            (Wire::Probe { token: 1 }, PROBE),
            (
                Wire::ProbeAck {
                    token: 1,
                    seen: "1.2.3.4:5".parse().unwrap(),
                },
                PROBE_ACK,
            ),
        ] {
            let b = encode(&w, &Format::default());
            let ((_, t), _): ((u16, u16), &[u8]) = postcard::take_from_bytes(&b).unwrap();
            assert_eq!(t, tag);
        }
        assert_eq!((PROBE, PROBE_ACK), (10, 11));
    }

    #[test]
    fn an_unknown_message_is_skipped_not_malformed() {
        let f = Format::newer_for_tests();
        assert_eq!(decode(&encode_unknown_for_tests(&f)), Err(Decoded::Unknown));
        assert_eq!(decode(&[0xff; 3]), Err(Decoded::Malformed));
        let mut cut = encode(&all()[4], &Format::default());
        cut.truncate(cut.len() - 2);
        assert_eq!(decode(&cut), Err(Decoded::Malformed));
    }
}
