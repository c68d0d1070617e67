//! Encryption decided, per peer host: encrypted (VXLAN to its tunnel address, through
//! WireGuard), plain (VXLAN to its underlay address) or refused (not routed at all, as
//! if absent), from this host's `VROUTER_ENCRYPTION`, the peer's announced mode and
//! its key. Pure; the controller turns the plan into FDB destinations, the WireGuard
//! device's peers, events and status.
//!
//! | local   | peer requires | peer has a key | peer has none   |
//! |---------|---------------|----------------|-----------------|
//! | off     | refused       | plain          | plain           |
//! | prefer  | encrypted     | encrypted      | plain (flagged) |
//! | require | encrypted     | encrypted      | refused         |

use crate::tunnel;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use vrouter_state::{EncryptionMode, PeerEncryption, PeerHost, PeerOrigin, Prefix};
use vrouter_wg::{PeerConfig, PublicKey};

/// Persistent keepalive of every WireGuard peer, in seconds: keeps NAT and stateful
/// firewalls open and makes a handshake age mean something.
pub const KEEPALIVE_SECS: u16 = 25;

/// WireGuard's overhead on IPv4 (20 IP + 8 UDP + 32 WireGuard + 16 tag, rounded as
/// `wg-quick` does).
pub const WG_OVERHEAD: u32 = 80;
/// VXLAN's overhead on IPv4 (20 IP + 8 UDP + 8 VXLAN + 14 Ethernet).
pub const VXLAN_OVERHEAD: u32 = 50;

/// MTU of the VXLAN devices (the overlay MTU routers and services see).
pub fn overlay_mtu(underlay_mtu: u32, mode: &EncryptionMode) -> u32 {
    let wg = if *mode == EncryptionMode::Off {
        0
    } else {
        WG_OVERHEAD
    };
    underlay_mtu.saturating_sub(VXLAN_OVERHEAD + wg)
}

/// MTU of the WireGuard interface.
pub fn wg_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(WG_OVERHEAD)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PeerState {
    Encrypted,
    Plain,
    Refused,
}

impl PeerState {
    pub fn as_str(&self) -> &'static str {
        match self {
            PeerState::Encrypted => "encrypted",
            PeerState::Plain => "plain",
            PeerState::Refused => "refused",
        }
    }
}

/// One peer host decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerDecision {
    pub host: Ipv4Addr,
    pub state: PeerState,
    /// The peer's announced mode (`off` for a host that announces nothing).
    pub peer_mode: EncryptionMode,
    /// Machine-readable cause of a plain (in `prefer`) or refused state.
    pub code: Option<&'static str>,
    /// For the operator: why, and the fix.
    pub reason: Option<String>,
    /// The key WireGuard expects from it (its next key during its rotation) and its
    /// tunnel address, when it has both.
    pub key: Option<PublicKey>,
    pub tunnel: Option<Ipv4Addr>,
    pub wg_port: u16,
}

/// The key a peer's WireGuard proves now: its next key as soon as it announces one
/// (make before break: the rotating host already answers with both), else its key.
pub fn peer_key(e: &PeerEncryption) -> Option<PublicKey> {
    let text = e.next_public_key.as_ref().or(e.public_key.as_ref())?;
    text.parse().ok()
}

/// Decides one peer. `host` is its underlay address.
pub fn decide(
    local: &EncryptionMode,
    host: Ipv4Addr,
    peer: Option<&PeerEncryption>,
) -> PeerDecision {
    let peer_mode = peer.map(|e| e.mode.clone()).unwrap_or_default();
    let usable = peer.filter(|e| e.mode != EncryptionMode::Off);
    let key = usable.and_then(peer_key);
    let tunnel = usable.and_then(|e| e.tunnel);
    let wg_port = peer.map(|e| e.wg_port).unwrap_or(0);
    let capable = key.is_some() && tunnel.is_some() && wg_port != 0;
    let mut d = PeerDecision {
        host,
        state: PeerState::Plain,
        peer_mode: peer_mode.clone(),
        code: None,
        reason: None,
        key,
        tunnel,
        wg_port,
    };
    let no_key = || {
        if peer_mode == EncryptionMode::Off {
            format!("host {host} runs without encryption (VROUTER_ENCRYPTION=off there, or a version without it) and has no WireGuard key")
        } else {
            format!("host {host} announces no usable WireGuard key and tunnel address")
        }
    };
    match local {
        EncryptionMode::Off | EncryptionMode::Other(_) => {
            if peer_mode == EncryptionMode::Require {
                d.state = PeerState::Refused;
                d.code = Some("peer_requires_encryption");
                d.reason = Some(format!(
                    "host {host} requires encryption (VROUTER_ENCRYPTION=require there) and this host runs with VROUTER_ENCRYPTION=off; set VROUTER_ENCRYPTION=prefer or require here"
                ));
            }
        }
        EncryptionMode::Prefer => {
            if capable {
                d.state = PeerState::Encrypted;
            } else {
                d.code = Some("peer_has_no_key");
                d.reason = Some(format!(
                    "{}; traffic to it crosses the underlay in the clear (VROUTER_ENCRYPTION=prefer here); set VROUTER_ENCRYPTION=prefer or require on {host}",
                    no_key()
                ));
            }
        }
        EncryptionMode::Require => {
            if capable {
                d.state = PeerState::Encrypted;
            } else {
                d.state = PeerState::Refused;
                d.code = Some("peer_has_no_key");
                d.reason = Some(format!(
                    "{}, and this host runs with VROUTER_ENCRYPTION=require: its stacks are not routed; set VROUTER_ENCRYPTION=prefer or require on {host}",
                    no_key()
                ));
            }
        }
    }
    d
}

/// The decisions for every peer, and what follows from them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Per peer host (underlay address).
    pub peers: BTreeMap<Ipv4Addr, PeerDecision>,
    /// FDB destination of each encrypted peer: its tunnel address.
    pub tunnel_dst: BTreeMap<Ipv4Addr, Ipv4Addr>,
    /// The WireGuard device's peers (encrypted ones), by underlay address.
    pub wg_peers: Vec<PeerConfig>,
}

impl Plan {
    /// The plan when this host's WireGuard device is not up: the peers that would be
    /// encrypted are refused instead (their VXLAN would otherwise follow the default
    /// route to the tunnel addresses, in the clear), with `why` in the reason.
    pub fn without_tunnel(mut self, why: &str) -> Plan {
        for d in self.peers.values_mut() {
            if d.state == PeerState::Encrypted {
                d.state = PeerState::Refused;
                d.code = Some("local_wireguard_down");
                d.reason = Some(format!(
                    "host {} is reached only through WireGuard, and this host's WireGuard device is not up: {why}",
                    d.host
                ));
            }
        }
        self.tunnel_dst.clear();
        self.wg_peers.clear();
        self
    }

    /// The peers to route: the refused ones are left out, as if absent.
    pub fn routed(&self, peers: &[PeerHost]) -> Vec<PeerHost> {
        peers
            .iter()
            .filter(|p| {
                self.peers
                    .get(&p.addr)
                    .is_none_or(|d| d.state != PeerState::Refused)
            })
            .cloned()
            .collect()
    }
}

/// Whether `tunnel` is a host address of `range`.
fn in_range(range: Prefix, tunnel: Ipv4Addr) -> bool {
    let size = 1u64 << (32 - u32::from(range.prefix_len()));
    let offset = u64::from(u32::from(tunnel).wrapping_sub(u32::from(range.addr())));
    range.contains(tunnel) && offset != 0 && offset != size - 1
}

/// Decides every peer. A host listed twice (static and gossip) is decided once, from
/// the first entry that carries encryption. A peer whose tunnel address is outside
/// `range`, or is this host's (`own`) or an earlier peer's, is not encrypted (its
/// WireGuard peer would claim another's address): plain in `prefer`, refused in
/// `require`.
pub fn plan(
    local: &EncryptionMode,
    peers: &[PeerHost],
    range: Prefix,
    own: Option<Ipv4Addr>,
) -> Plan {
    let mut out = Plan::default();
    let mut seen: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut taken: BTreeSet<Ipv4Addr> = own.into_iter().collect();
    let mut order: Vec<&PeerHost> = peers.iter().collect();
    // Entries with encryption first, so a host known both ways uses what it announced.
    order.sort_by_key(|p| {
        (
            p.addr,
            p.encryption.is_none(),
            p.source != PeerOrigin::Gossip,
        )
    });
    for p in order {
        if !seen.insert(p.addr) {
            continue;
        }
        let mut d = decide(local, p.addr, p.encryption.as_ref());
        if let (PeerState::Encrypted, Some(t)) = (d.state, d.tunnel) {
            if !in_range(range, t) || !taken.insert(t) {
                d.state = if *local == EncryptionMode::Require {
                    PeerState::Refused
                } else {
                    PeerState::Plain
                };
                d.code = Some("tunnel_address_unusable");
                d.reason = Some(format!(
                    "host {} announces tunnel address {t}, outside this host's VROUTER_TUNNEL_RANGE {range} or already another host's; give every host the same VROUTER_TUNNEL_RANGE",
                    p.addr
                ));
            }
        }
        if d.state == PeerState::Encrypted {
            if let (Some(key), Some(tunnel)) = (d.key, d.tunnel) {
                out.tunnel_dst.insert(p.addr, tunnel);
                out.wg_peers.push(PeerConfig {
                    public_key: key,
                    endpoint: SocketAddrV4::new(p.addr, d.wg_port),
                    tunnel,
                    keepalive: Some(KEEPALIVE_SECS),
                });
            }
        }
        out.peers.insert(p.addr, d);
    }
    out
}

/// Static peers' tunnel addresses: the tunnel rule over the static hosts plus this host
/// (gossip peers announce theirs).
pub fn fill_static_tunnels(range: Prefix, own: Ipv4Addr, peers: &mut [PeerHost]) {
    let mut hosts: BTreeSet<Ipv4Addr> = peers
        .iter()
        .filter(|p| p.source == PeerOrigin::Static)
        .map(|p| p.addr)
        .collect();
    hosts.insert(own);
    let a = tunnel::assign(range, &hosts);
    for p in peers.iter_mut().filter(|p| p.source == PeerOrigin::Static) {
        if let Some(e) = p.encryption.as_mut() {
            e.tunnel = a.addresses.get(&p.addr).copied();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use EncryptionMode::{Off, Prefer, Require};

    const KEY: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
    const NEXT: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const RANGE: &str = "10.255.0.0/16";

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn enc(mode: EncryptionMode, key: bool) -> PeerEncryption {
        let on = mode != Off && key;
        PeerEncryption {
            mode,
            public_key: on.then(|| KEY.to_string()),
            next_public_key: None,
            tunnel: on.then(|| ip("10.255.0.2")),
            wg_port: 51820,
        }
    }

    fn host(addr: &str, e: Option<PeerEncryption>) -> PeerHost {
        PeerHost {
            addr: ip(addr),
            stacks: Vec::new(),
            source: PeerOrigin::Gossip,
            node: Some("0000000000000001".into()),
            claims: BTreeMap::new(),
            generations: BTreeMap::new(),
            encryption: e,
        }
    }

    #[test]
    fn every_row_of_the_table() {
        let h = ip("198.18.0.2");
        let off = enc(Off, false);
        let req = enc(Require, true);
        let pre = enc(Prefer, true);
        // (local, peer, expected state, expected code)
        let rows: Vec<(
            EncryptionMode,
            Option<&PeerEncryption>,
            PeerState,
            Option<&str>,
        )> = vec![
            (Off, None, PeerState::Plain, None),
            (Off, Some(&off), PeerState::Plain, None),
            (Off, Some(&pre), PeerState::Plain, None),
            (
                Off,
                Some(&req),
                PeerState::Refused,
                Some("peer_requires_encryption"),
            ),
            (Prefer, None, PeerState::Plain, Some("peer_has_no_key")),
            (
                Prefer,
                Some(&off),
                PeerState::Plain,
                Some("peer_has_no_key"),
            ),
            (Prefer, Some(&pre), PeerState::Encrypted, None),
            (Prefer, Some(&req), PeerState::Encrypted, None),
            (Require, None, PeerState::Refused, Some("peer_has_no_key")),
            (
                Require,
                Some(&off),
                PeerState::Refused,
                Some("peer_has_no_key"),
            ),
            (Require, Some(&pre), PeerState::Encrypted, None),
            (Require, Some(&req), PeerState::Encrypted, None),
        ];
        for (local, peer, state, code) in rows {
            let d = decide(&local, h, peer);
            assert_eq!((d.state, d.code), (state, code), "{local} vs {peer:?}");
            if state != PeerState::Encrypted && code.is_some() {
                let r = d.reason.unwrap();
                assert!(
                    r.contains("198.18.0.2") && r.contains("VROUTER_ENCRYPTION"),
                    "{r}"
                );
            }
        }
    }

    #[test]
    fn a_key_without_a_tunnel_address_or_that_does_not_parse_is_no_key() {
        let h = ip("198.18.0.2");
        let mut e = enc(Require, true);
        e.tunnel = None;
        assert_eq!(decide(&Require, h, Some(&e)).state, PeerState::Refused);
        let mut e = enc(Prefer, true);
        e.public_key = Some("not a key".into());
        assert_eq!(decide(&Prefer, h, Some(&e)).state, PeerState::Plain);
        let mut e = enc(Prefer, true);
        e.wg_port = 0;
        assert_eq!(decide(&Require, h, Some(&e)).state, PeerState::Refused);
    }

    #[test]
    fn a_rotating_peer_is_expected_with_its_next_key() {
        let mut e = enc(Require, true);
        e.next_public_key = Some(NEXT.into());
        let d = decide(&Require, ip("198.18.0.2"), Some(&e));
        assert_eq!(d.key, Some(NEXT.parse().unwrap()));
    }

    #[test]
    fn the_plan_routes_encrypted_peers_through_their_tunnel_and_drops_refused_ones() {
        let peers = vec![
            host("198.18.0.2", Some(enc(Require, true))),
            host("198.18.0.3", None),
            host("198.18.0.4", Some(enc(Off, false))),
        ];
        let p = plan(&Require, &peers, RANGE.parse().unwrap(), None);
        assert_eq!(
            p.tunnel_dst,
            BTreeMap::from([(ip("198.18.0.2"), ip("10.255.0.2"))])
        );
        assert_eq!(
            p.wg_peers,
            vec![PeerConfig {
                public_key: KEY.parse().unwrap(),
                endpoint: "198.18.0.2:51820".parse().unwrap(),
                tunnel: ip("10.255.0.2"),
                keepalive: Some(25),
            }]
        );
        let routed: Vec<Ipv4Addr> = p.routed(&peers).iter().map(|h| h.addr).collect();
        assert_eq!(routed, vec![ip("198.18.0.2")]);
        // prefer: everyone routed, only the keyed one through the tunnel.
        let p = plan(&Prefer, &peers, RANGE.parse().unwrap(), None);
        assert_eq!(p.routed(&peers).len(), 3);
        assert_eq!(p.tunnel_dst.len(), 1);
        assert_eq!(p.peers[&ip("198.18.0.3")].state, PeerState::Plain);
        // off: nothing through the tunnel, the host that requires it is refused.
        let p = plan(&Off, &peers, RANGE.parse().unwrap(), None);
        assert!(p.tunnel_dst.is_empty() && p.wg_peers.is_empty());
        assert_eq!(p.routed(&peers).len(), 2);
    }

    #[test]
    fn a_tunnel_address_outside_the_range_or_taken_is_not_encrypted() {
        let r: Prefix = "10.255.0.0/16".parse().unwrap();
        let mut outside = enc(Require, true);
        outside.tunnel = Some(ip("198.18.0.9"));
        let mut broadcast = enc(Require, true);
        broadcast.tunnel = Some(ip("10.255.255.255"));
        let peers = vec![
            host("198.18.0.2", Some(enc(Require, true))),
            host("198.18.0.3", Some(enc(Require, true))),
            host("198.18.0.4", Some(outside)),
            host("198.18.0.5", Some(broadcast)),
        ];
        let p = plan(&Require, &peers, r, Some(ip("10.255.0.1")));
        let states: Vec<(PeerState, Option<&str>)> =
            p.peers.values().map(|d| (d.state, d.code)).collect();
        assert_eq!(
            states,
            vec![
                (PeerState::Encrypted, None),
                (PeerState::Refused, Some("tunnel_address_unusable")),
                (PeerState::Refused, Some("tunnel_address_unusable")),
                (PeerState::Refused, Some("tunnel_address_unusable")),
            ]
        );
        assert_eq!(p.wg_peers.len(), 1);
        // This host's own address is never a peer's.
        let p = plan(&Prefer, &peers[..1], r, Some(ip("10.255.0.2")));
        assert_eq!(p.peers[&ip("198.18.0.2")].state, PeerState::Plain);
    }

    #[test]
    fn without_the_local_device_encrypted_peers_are_refused_not_sent_in_the_clear() {
        let peers = vec![
            host("198.18.0.2", Some(enc(Require, true))),
            host("198.18.0.3", None),
        ];
        let p = plan(&Prefer, &peers, RANGE.parse().unwrap(), None).without_tunnel("no TUN");
        assert!(p.tunnel_dst.is_empty() && p.wg_peers.is_empty());
        let d = &p.peers[&ip("198.18.0.2")];
        assert_eq!(
            (d.state, d.code),
            (PeerState::Refused, Some("local_wireguard_down"))
        );
        assert!(d.reason.as_ref().unwrap().contains("no TUN"));
        assert_eq!(p.peers[&ip("198.18.0.3")].state, PeerState::Plain);
        assert_eq!(p.routed(&peers).len(), 1);
    }

    #[test]
    fn static_peers_get_their_tunnel_address_by_the_same_rule() {
        let mut peers = vec![
            PeerHost {
                source: PeerOrigin::Static,
                node: None,
                ..host("198.19.0.1", Some(enc(Prefer, true)))
            },
            PeerHost {
                source: PeerOrigin::Static,
                node: None,
                ..host("198.18.0.7", None)
            },
        ];
        // This host (198.18.0.1) keeps 10.255.0.1: the lower underlay address wins.
        fill_static_tunnels(
            "10.255.0.0/16".parse().unwrap(),
            ip("198.18.0.1"),
            &mut peers,
        );
        assert_eq!(
            peers[0].encryption.as_ref().unwrap().tunnel,
            Some(ip("10.255.0.2"))
        );
        assert!(peers[1].encryption.is_none());
    }

    #[test]
    fn mtus() {
        assert_eq!(overlay_mtu(1500, &Off), 1450);
        assert_eq!(overlay_mtu(1500, &Require), 1370);
        assert_eq!(overlay_mtu(1500, &Prefer), 1370);
        assert_eq!(wg_mtu(1500), 1420);
    }
}
