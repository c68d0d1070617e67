//! Checks on everything a peer sends, in one place: what decodes is not yet trusted.
//! A packet or record that fails is dropped and counted as malformed; nothing a peer
//! sends may panic, overflow, allocate without bound, or pin a value for good.
//!
//! Versions and bumps: every node keeps the highest version it has seen of a record,
//! and the owner must always be able to go above it. So a receiver refuses a version
//! (or a SWIM bump) further ahead of its own wall clock than [`MAX_FUTURE_MS`]; the
//! owner, which raises its version above any copy of its own record it is shown, then
//! only ever raises within that bound, and no forged `u64::MAX` spreads.

use crate::node::MAX_DATAGRAM;
use crate::record::{Encryption, Member, NodeId, NodeRecord, RelayOffer, MAX_RELAY_REACH};
use crate::seal::OVERHEAD;
use crate::wire::Wire;
use bytes::{Buf, BufMut};
use foca::{Codec, Header, PostcardCodec};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vrouter_state::EncryptionMode;

/// How far ahead of the receiver's wall clock a record version or a SWIM bump may be
/// (clock skew between hosts must stay below this).
pub const MAX_FUTURE_MS: u64 = 24 * 3600 * 1000;

/// Largest plaintext of one datagram.
const PLAIN: usize = MAX_DATAGRAM - OVERHEAD;
/// Entries a datagram can hold: a digest or pruned entry takes at least 2 bytes (two
/// varints), a wanted id at least 1, an encoded record part at least 6 (its length
/// and five fields).
pub const MAX_DIGEST_ENTRIES: usize = PLAIN / 2;
pub const MAX_WANT: usize = PLAIN;
pub const MAX_PARTS_PER_MESSAGE: usize = PLAIN / 6;
pub const MAX_PRUNED: usize = PLAIN / 2;
/// What one host may announce in one record (the record's size limit binds first today).
pub const MAX_STACKS_PER_RECORD: usize = 256;
pub const MAX_PREFIXES_PER_RECORD: usize = 4096;

/// The newest version or bump accepted at wall clock `wall_ms`.
pub fn horizon(wall_ms: u64) -> u64 {
    wall_ms.saturating_add(MAX_FUTURE_MS)
}

/// A datagram's size before it is opened: a sealed packet never exceeds MAX_DATAGRAM.
pub fn datagram(len: usize) -> Result<(), &'static str> {
    if len > MAX_DATAGRAM {
        return Err("datagram over the size any node sends");
    }
    Ok(())
}

/// A SWIM identity from the wire (join, join ack, or inside a SWIM packet).
pub fn member(m: &Member, horizon: u64) -> Result<(), &'static str> {
    if m.bump > horizon {
        return Err("member bump too far in the future");
    }
    if m.addr.port() == 0 {
        return Err("member address with port 0");
    }
    Ok(())
}

/// A record version from the wire (a part's header, a pruned entry): never 0, never
/// past the horizon.
pub fn part_version(version: u64, horizon: u64) -> Result<(), &'static str> {
    if version == 0 || version > horizon {
        return Err("record version 0 or too far in the future");
    }
    Ok(())
}

/// A record from the wire, once all its parts are in (broadcast or anti-entropy).
pub fn record(r: &NodeRecord, horizon: u64) -> Result<(), &'static str> {
    part_version(r.version, horizon)?;
    if r.bump > horizon {
        return Err("record bump too far in the future");
    }
    if r.gossip_addr.port() == 0 || r.vxlan_port == 0 {
        return Err("record with port 0");
    }
    if r.stacks.len() > MAX_STACKS_PER_RECORD {
        return Err("record with too many stacks");
    }
    if r.prefix_count() > MAX_PREFIXES_PER_RECORD {
        return Err("record with too many prefixes");
    }
    if r.left && !r.stacks.is_empty() {
        return Err("left record with stacks");
    }
    if let Some(e) = &r.encryption {
        encryption(e)?;
    }
    if let Some(n) = &r.nat {
        if !usable_unicast(n.observed) {
            return Err("record with an unusable observed address");
        }
    }
    if let Some(o) = &r.relay {
        relay(o, r.id)?;
    }
    let mut names: Vec<&str> = r.stacks.iter().map(|s| s.spec.name.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return Err("record names a stack twice");
    }
    Ok(())
}

/// A record's encryption: a known mode; off announces no key, no tunnel address;
/// require and prefer announce a key, a tunnel address that is a usable unicast
/// address, and a port; a next key differs from the key.
pub fn encryption(e: &Encryption) -> Result<(), &'static str> {
    match e.mode {
        EncryptionMode::Off => {
            if e.public_key.is_some() || e.next_public_key.is_some() || e.tunnel.is_some() {
                return Err("encryption off with a key or tunnel address");
            }
            return Ok(());
        }
        EncryptionMode::Require | EncryptionMode::Prefer => {}
        EncryptionMode::Other(_) => return Err("unknown encryption mode"),
    }
    let (Some(key), Some(tunnel)) = (e.public_key, e.tunnel) else {
        return Err("encryption on without a key or tunnel address");
    };
    if e.wg_port == 0 {
        return Err("encryption with WireGuard port 0");
    }
    if key == [0; 32] || e.next_public_key == Some([0; 32]) || e.next_public_key == Some(key) {
        return Err("encryption with an all-zero or repeated key");
    }
    if !usable_unicast(tunnel) {
        return Err("encryption with an unusable tunnel address");
    }
    Ok(())
}

/// An address a host can be reached at: not unspecified, loopback, multicast,
/// broadcast or in 0.0.0.0/8.
pub fn usable_unicast(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.octets()[0] == 0)
}

/// A relay offer: at most [`MAX_RELAY_REACH`] hosts, each once, never the relay
/// itself, each with an rtt of at least 1 ms.
pub fn relay(o: &RelayOffer, own: NodeId) -> Result<(), &'static str> {
    if o.reach.len() > MAX_RELAY_REACH {
        return Err("relay offer with too many hosts");
    }
    if o.reach.iter().any(|x| x.id == own) {
        return Err("relay offer naming the relay itself");
    }
    if o.reach.iter().any(|x| x.rtt_ms == 0) {
        return Err("relay offer with an rtt of 0");
    }
    let mut ids: Vec<NodeId> = o.reach.iter().map(|x| x.id).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return Err("relay offer naming a host twice");
    }
    Ok(())
}

/// foca's postcard codec, refusing SWIM identities that fail [`member`] (a bump past
/// the horizon would win every address conflict for good) before foca applies them.
pub(crate) struct BoundedCodec {
    horizon: Arc<AtomicU64>,
}

impl BoundedCodec {
    pub(crate) fn new(horizon: Arc<AtomicU64>) -> BoundedCodec {
        BoundedCodec { horizon }
    }

    fn check(&self, m: &Member) -> Result<(), SwimRefused> {
        member(m, self.horizon.load(Ordering::Relaxed)).map_err(SwimRefused::Identity)
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SwimRefused {
    #[error(transparent)]
    Decode(#[from] postcard::Error),
    #[error("SWIM identity refused: {0}")]
    Identity(&'static str),
}

impl Codec<Member> for BoundedCodec {
    type Error = SwimRefused;

    fn encode_header(&mut self, h: &Header<Member>, buf: impl BufMut) -> Result<(), SwimRefused> {
        Ok(PostcardCodec.encode_header(h, buf)?)
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<Member>, SwimRefused> {
        let h: Header<Member> = PostcardCodec.decode_header(buf)?;
        self.check(&h.src)?;
        self.check(&h.dst)?;
        Ok(h)
    }

    fn encode_member(
        &mut self,
        m: &foca::Member<Member>,
        buf: impl BufMut,
    ) -> Result<(), SwimRefused> {
        Ok(PostcardCodec.encode_member(m, buf)?)
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<foca::Member<Member>, SwimRefused> {
        let m: foca::Member<Member> = PostcardCodec.decode_member(buf)?;
        self.check(m.id())?;
        Ok(m)
    }
}

/// A decoded message's shape. Record parts inside `Parts` and `Push` are checked one by
/// one when offered (an invalid one is skipped, the others kept: header fields by
/// [`crate::record::decode_part`] and [`part_version`], the assembled record by
/// [`record`]), so only their count is here.
pub(crate) fn wire(w: &Wire, horizon: u64) -> Result<(), &'static str> {
    match w {
        Wire::Swim(_) | Wire::Sync { .. } | Wire::Probe { .. } => Ok(()),
        Wire::ProbeAck { seen, .. } => {
            // No packet comes from these. (A loopback source is real, in tests on one
            // machine: the path counts, but reflection skips it.)
            let ip = seen.ip();
            if seen.port() == 0 || ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
                return Err("probe ack with an impossible seen address");
            }
            Ok(())
        }
        Wire::Join(m) | Wire::JoinAck(m) => member(m, horizon),
        Wire::Digest { lo, hi, entries } => {
            if lo > hi {
                return Err("digest range with lo above hi");
            }
            if entries.len() > MAX_DIGEST_ENTRIES {
                return Err("digest with too many entries");
            }
            if entries.iter().any(|(id, _)| id < lo || id > hi) {
                return Err("digest entry outside its range");
            }
            Ok(())
        }
        Wire::Want(ids) => {
            if ids.len() > MAX_WANT {
                return Err("want with too many ids");
            }
            Ok(())
        }
        Wire::Parts(parts) | Wire::Push(parts) => {
            if parts.len() > MAX_PARTS_PER_MESSAGE {
                return Err("parts message with too many parts");
            }
            Ok(())
        }
        Wire::Pruned(list) => {
            if list.len() > MAX_PRUNED {
                return Err("pruned message with too many entries");
            }
            // A tombstone far ahead would keep the record out for good.
            list.iter().try_for_each(|(_, v)| part_version(*v, horizon))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::Params;
    use crate::record::{self as rec, ClaimedStack, Format, NodeId};
    use crate::seal::Sealer;
    use crate::sim::{sim_addr, Sim};
    use vrouter_state::{StackName, StackSpec, Vni};

    fn stack(name: &str, third: u8) -> ClaimedStack {
        ClaimedStack {
            spec: StackSpec {
                name: StackName::new(name).unwrap(),
                vni: Vni::new(100).unwrap(),
                prefixes: vec![format!("10.{third}.0.0/24").parse().unwrap()],
                router_ip: format!("10.{third}.0.254").parse().unwrap(),
            },
            claimed_ms: 1,
            generation: 1,
        }
    }

    fn mesh(n: usize) -> Sim {
        let mut s = Sim::new(n, Params::default(), 77);
        for i in 0..n {
            let join: &[usize] = if i == 0 { &[] } else { &[0] };
            s.start(i, vec![stack(&format!("s{i}"), i as u8 + 1)], join);
        }
        let n = s.len();
        s.run_until_true(10_000, 10, |s| {
            (0..n).all(|i| s.all_see(i, |m| m.state == crate::MemberState::Alive))
        })
        .expect("mesh converges");
        s
    }

    /// Seals `w` as a key holder would (a fresh sender id and sequence) and hands it
    /// to node `to`, as if from the address of node `from`.
    fn forge(s: &mut Sim, to: usize, from: usize, w: &Wire) {
        let keys = s.node(to).unwrap().keyring().clone();
        // A fresh sequence number every time, as a key holder would use.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut sealer = Sealer::new(keys, 0xBAD0_0000 + from as u64, seq);
        let packet = sealer.seal(&crate::wire::encode(w, &Format::default()));
        let now = s.now();
        s.node_mut(to)
            .unwrap()
            .handle_packet(now, sim_addr(from), &packet);
    }

    #[test]
    fn a_digest_with_lo_above_hi_is_malformed_not_a_panic() {
        let mut s = mesh(2);
        let before = s.node(0).unwrap().counters().rejected_malformed;
        let w = Wire::Digest {
            lo: NodeId(u64::MAX),
            hi: NodeId(1),
            entries: vec![],
        };
        forge(&mut s, 0, 1, &w);
        assert_eq!(s.node(0).unwrap().counters().rejected_malformed, before + 1);
        // An entry outside the range, and too many entries, are refused too.
        let w = Wire::Digest {
            lo: NodeId(10),
            hi: NodeId(20),
            entries: vec![(NodeId(30), 1)],
        };
        forge(&mut s, 0, 1, &w);
        let w = Wire::Want(vec![NodeId(1); MAX_WANT + 1]);
        forge(&mut s, 0, 1, &w);
        assert_eq!(s.node(0).unwrap().counters().rejected_malformed, before + 3);
    }

    /// A forged record of `victim` at `version`, sent to every node.
    fn forge_everywhere(s: &mut Sim, victim: usize, version: u64) {
        let mut r = s.node(victim).unwrap().record().clone();
        r.version = version;
        r.stacks.clear();
        for to in 0..s.len() {
            let from = (to + 1) % s.len();
            let parts = rec::split(&r, &Format::default()).unwrap();
            forge(s, to, from, &Wire::Parts(parts));
        }
    }

    fn change_reaches_everyone(s: &mut Sim, victim: usize, name: &str) {
        let mut stacks = s.node(victim).unwrap().record().stacks.clone();
        stacks.push(stack(name, 200));
        assert!(s.set_stacks(victim, stacks).unwrap());
        let t0 = s.now();
        s.run_until_true(t0 + 15_000, 10, |s| {
            s.all_see(victim, |m| {
                m.record.stacks.iter().any(|c| c.spec.name.as_str() == name)
            })
        })
        .unwrap_or_else(|| panic!("the change to {name} never reached every peer"));
    }

    #[test]
    fn own_record_at_u64_max_does_not_pin_it() {
        let mut s = mesh(4);
        forge_everywhere(&mut s, 0, u64::MAX);
        s.run_until(s.now() + 2_000);
        assert!(s.node(0).unwrap().record().version < u64::MAX);
        change_reaches_everyone(&mut s, 0, "after-max");
    }

    #[test]
    fn far_future_parts_tombstones_and_bad_records_are_refused() {
        let mut s = mesh(3);
        let malformed = |s: &Sim| s.node(1).unwrap().counters().rejected_malformed;
        let before = malformed(&s);
        let good = s.node(0).unwrap().record().clone();
        // A part header past the bound: refused before it starts an assembly.
        let mut r = good.clone();
        r.version = u64::MAX;
        forge(
            &mut s,
            1,
            2,
            &Wire::Parts(rec::split(&r, &Format::default()).unwrap()),
        );
        assert_eq!(malformed(&s), before + 1);
        // A tombstone past the bound would keep the record out for good.
        forge(&mut s, 1, 2, &Wire::Pruned(vec![(good.id, u64::MAX)]));
        assert_eq!(malformed(&s), before + 2);
        // A complete, newer version whose contents are impossible (a stack twice).
        let mut r = good.clone();
        r.version += 1;
        r.stacks.push(r.stacks[0].clone());
        forge(
            &mut s,
            1,
            2,
            &Wire::Push(rec::split(&r, &Format::default()).unwrap()),
        );
        assert_eq!(malformed(&s), before + 3);
        assert!(s.all_see(0, |m| m.record.version == good.version));
        change_reaches_everyone(&mut s, 0, "after-forgeries");
    }

    #[test]
    fn own_record_from_the_near_future_is_overtaken() {
        // Within the bound: peers keep it, and the owner raises above it.
        let mut s = mesh(4);
        let ahead = s.node(0).unwrap().record().version + MAX_FUTURE_MS / 2;
        forge_everywhere(&mut s, 0, ahead);
        s.run_until(s.now() + 2_000);
        assert!(s.node(0).unwrap().record().version > ahead);
        change_reaches_everyone(&mut s, 0, "after-ahead");
        // Beyond the bound: nobody keeps it.
        let far = s.node(1).unwrap().record().version + MAX_FUTURE_MS * 2;
        forge_everywhere(&mut s, 1, far);
        s.run_until(s.now() + 2_000);
        assert!(s.node(1).unwrap().record().version < far);
        assert!(s.all_see(1, |m| m.record.version < far));
    }

    /// A SWIM ping from a new member `id` with `bump`, to node `to`.
    fn swim_ping(s: &Sim, to: usize, id: u64, bump: u64) -> Wire {
        let me = s.node(to).unwrap().record().clone();
        let header = Header {
            src: Member {
                id: NodeId(id),
                addr: sim_addr(40),
                bump,
            },
            src_incarnation: 0,
            dst: Member {
                id: me.id,
                addr: me.gossip_addr,
                bump: me.bump,
            },
            message: foca::Message::Ping(1),
        };
        let mut bytes = Vec::new();
        PostcardCodec.encode_header(&header, &mut bytes).unwrap();
        Wire::Swim(bytes)
    }

    #[test]
    fn a_swim_identity_from_the_far_future_is_refused() {
        let mut s = mesh(2);
        let before = s.node(0).unwrap().active_members();
        let w = swim_ping(&s, 0, 0xF00D, u64::MAX);
        forge(&mut s, 0, 1, &w);
        assert_eq!(s.node(0).unwrap().active_members(), before);
        // The same from a sane identity is a new member (the check is not vacuous).
        let bump = s.node(0).unwrap().record().version;
        let w = swim_ping(&s, 0, 0xF00D, bump);
        forge(&mut s, 0, 1, &w);
        assert_eq!(s.node(0).unwrap().active_members(), before + 1);
    }

    #[test]
    fn records_with_impossible_contents_are_refused() {
        let s = mesh(1);
        let good = s.node(0).unwrap().record().clone();
        let h = horizon(good.version);
        assert!(record(&good, h).is_ok());
        let mut r = good.clone();
        r.version = 0;
        assert!(record(&r, h).is_err());
        let mut r = good.clone();
        r.bump = u64::MAX;
        assert!(record(&r, h).is_err());
        let mut r = good.clone();
        r.stacks.push(r.stacks[0].clone());
        assert!(record(&r, h).is_err());
        let mut r = good.clone();
        r.vxlan_port = 0;
        assert!(record(&r, h).is_err());
        let mut r = good.clone();
        r.left = true;
        assert!(record(&r, h).is_err());
        let on = Encryption {
            mode: EncryptionMode::Require,
            public_key: Some([1; 32]),
            next_public_key: Some([2; 32]),
            tunnel: Some("10.255.0.2".parse().unwrap()),
            wg_port: 51820,
        };
        let mut r = good.clone();
        r.encryption = Some(on.clone());
        assert!(record(&r, h).is_ok());
        let off = Encryption {
            mode: EncryptionMode::Off,
            public_key: None,
            next_public_key: None,
            tunnel: None,
            wg_port: 51820,
        };
        assert!(encryption(&off).is_ok());
        let bad: [fn(&mut Encryption); 8] = [
            |e| e.mode = EncryptionMode::Other("mode 9".into()),
            |e| e.public_key = None,
            |e| e.tunnel = None,
            |e| e.wg_port = 0,
            |e| e.public_key = Some([0; 32]),
            |e| e.next_public_key = e.public_key,
            |e| e.tunnel = Some("224.0.0.1".parse().unwrap()),
            |e| e.mode = EncryptionMode::Off,
        ];
        for (i, f) in bad.iter().enumerate() {
            let mut e = on.clone();
            f(&mut e);
            let mut r = good.clone();
            r.encryption = Some(e);
            assert!(record(&r, h).is_err(), "case {i}");
        }
        let m = Member {
            id: good.id,
            addr: good.gossip_addr,
            bump: u64::MAX,
        };
        assert!(member(&m, h).is_err());
        // NAT and relay.
        use crate::record::{NatInfo, RelayReach};
        let reach = |id: u64, rtt_ms: u16| RelayReach {
            id: NodeId(id),
            rtt_ms,
        };
        let mut r = good.clone();
        r.nat = Some(NatInfo {
            observed: "203.0.113.5".parse().unwrap(),
            port_translated: true,
        });
        r.relay = Some(RelayOffer {
            reach: vec![reach(1, 1), reach(2, u16::MAX)],
        });
        assert!(record(&r, h).is_ok());
        for bad in ["0.0.0.0", "127.0.0.1", "224.0.0.5", "255.255.255.255"] {
            let mut x = r.clone();
            x.nat.as_mut().unwrap().observed = bad.parse().unwrap();
            assert!(record(&x, h).is_err(), "{bad}");
        }
        let offers = [
            vec![reach(1, 0)],
            vec![reach(1, 3), reach(1, 4)],
            vec![reach(good.id.0, 3)],
            (0..=MAX_RELAY_REACH as u64)
                .map(|i| reach(i + 1, 1))
                .collect(),
        ];
        for (i, o) in offers.into_iter().enumerate() {
            let mut x = r.clone();
            x.relay = Some(RelayOffer { reach: o });
            assert!(record(&x, h).is_err(), "offer {i}");
        }
        let mut x = r.clone();
        x.relay = Some(RelayOffer {
            reach: (0..MAX_RELAY_REACH as u64)
                .map(|i| reach(i + 1, 1))
                .collect(),
        });
        assert!(record(&x, h).is_ok());
        // A probe ack naming an address nobody could reach is malformed.
        let ack = |seen: &str| Wire::ProbeAck {
            token: 1,
            seen: seen.parse().unwrap(),
        };
        assert!(wire(&ack("203.0.113.5:40000"), h).is_ok());
        assert!(wire(&ack("127.0.0.1:7950"), h).is_ok());
        for bad in [
            "203.0.113.5:0",
            "0.0.0.0:1",
            "255.255.255.255:1",
            "239.1.1.1:1",
        ] {
            assert!(wire(&ack(bad), h).is_err(), "{bad}");
        }
    }
}
