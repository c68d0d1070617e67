//! The desired device as a plain value: its checks, and the pure plan of what an
//! `apply` keeps, creates and drops, so a change touches only the peers it names.

use std::collections::{BTreeMap, BTreeSet};

use crate::{DeviceConfig, PublicKey, WgError};

/// Refuses a configuration no backend could apply, naming the setting at fault.
pub(crate) fn validate(cfg: &DeviceConfig) -> Result<(), WgError> {
    crate::tun::check_name(&cfg.name)?;
    if cfg.keys.is_empty() {
        return Err(WgError::BadKey("no private key configured".into()));
    }
    let locals: BTreeSet<PublicKey> = cfg.keys.iter().map(|k| k.public_key()).collect();
    if locals.len() != cfg.keys.len() {
        return Err(WgError::BadKey(
            "the same private key is listed twice (current and next key must differ)".into(),
        ));
    }
    if cfg.prefix_len == 0 || cfg.prefix_len > 32 {
        return Err(WgError::Kernel(format!(
            "bad tunnel prefix length /{} (VROUTER_TUNNEL_RANGE): 1 to 32",
            cfg.prefix_len
        )));
    }
    if !(576..=65_535).contains(&cfg.mtu) {
        return Err(WgError::Kernel(format!(
            "WireGuard MTU {} is out of range (576 to 65535): check the underlay MTU",
            cfg.mtu
        )));
    }
    if cfg.listen_port == 0 {
        return Err(WgError::Kernel(
            "WireGuard port 0 (VROUTER_WG_PORT): pick a fixed port, peers dial it".into(),
        ));
    }
    let mut keys = BTreeSet::new();
    let mut tunnels = BTreeSet::new();
    for peer in &cfg.peers {
        if !keys.insert(peer.public_key) {
            return Err(WgError::BadKey(format!(
                "two peers share public key {}",
                peer.public_key
            )));
        }
        if !tunnels.insert(peer.tunnel) {
            return Err(WgError::Kernel(format!(
                "two peers share tunnel address {}",
                peer.tunnel
            )));
        }
        if peer.tunnel == cfg.address {
            return Err(WgError::Kernel(format!(
                "peer {} has this host's own tunnel address {}",
                peer.public_key, cfg.address
            )));
        }
    }
    Ok(())
}

/// One tunnel of the userspace engine: a peer's key and the local key it talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct TunnelKey {
    pub peer: PublicKey,
    pub local: PublicKey,
}

/// What a running tunnel was made with (a change of these needs a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TunnelParams {
    pub keepalive: Option<u16>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Tunnels that stay as they are (their sessions and queues too).
    pub keep: Vec<TunnelKey>,
    /// Tunnels to make; `initiate`: start a handshake at once (new tunnels of the
    /// current key: a new peer, a peer's new key, or our new current key).
    pub create: Vec<(TunnelKey, TunnelParams, bool)>,
    /// Tunnels to drop (peer or local key gone, or parameters changed).
    pub drop: Vec<TunnelKey>,
}

/// Compares the running tunnels with `cfg`: one tunnel per (peer, local key).
pub(crate) fn plan(running: &BTreeMap<TunnelKey, TunnelParams>, cfg: &DeviceConfig) -> Plan {
    let locals: Vec<PublicKey> = cfg.keys.iter().map(|k| k.public_key()).collect();
    let current = locals.first().copied();
    let mut desired = BTreeMap::new();
    for peer in &cfg.peers {
        for local in &locals {
            let key = TunnelKey {
                peer: peer.public_key,
                local: *local,
            };
            desired.insert(
                key,
                TunnelParams {
                    keepalive: peer.keepalive,
                },
            );
        }
    }
    let mut plan = Plan::default();
    for (key, params) in &desired {
        match running.get(key) {
            Some(old) if old == params => plan.keep.push(*key),
            Some(_) => {
                plan.drop.push(*key);
                plan.create
                    .push((*key, *params, Some(key.local) == current));
            }
            None => plan
                .create
                .push((*key, *params, Some(key.local) == current)),
        }
    }
    for key in running.keys() {
        if !desired.contains_key(key) {
            plan.drop.push(*key);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PeerConfig, PrivateKey};
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn peer(key: &PrivateKey, n: u8) -> PeerConfig {
        PeerConfig {
            public_key: key.public_key(),
            endpoint: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, n), 51820),
            tunnel: Ipv4Addr::new(10, 255, 0, n),
            keepalive: Some(25),
        }
    }

    fn cfg(keys: Vec<PrivateKey>, peers: Vec<PeerConfig>) -> DeviceConfig {
        DeviceConfig {
            name: "vrouter-wg".into(),
            keys,
            listen_port: 51820,
            address: Ipv4Addr::new(10, 255, 0, 1),
            prefix_len: 16,
            mtu: 1420,
            peers,
        }
    }

    fn running(plan: &Plan) -> BTreeMap<TunnelKey, TunnelParams> {
        plan.keep
            .iter()
            .map(|k| {
                (
                    *k,
                    TunnelParams {
                        keepalive: Some(25),
                    },
                )
            })
            .chain(plan.create.iter().map(|(k, p, _)| (*k, *p)))
            .collect()
    }

    #[test]
    fn open_creates_and_initiates_with_the_current_key_only() {
        let (k, k2, a, b) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let c = cfg(vec![k.clone(), k2.clone()], vec![peer(&a, 2), peer(&b, 3)]);
        let p = plan(&BTreeMap::new(), &c);
        assert_eq!(p.create.len(), 4);
        assert!(p.keep.is_empty() && p.drop.is_empty());
        for (key, _, initiate) in &p.create {
            assert_eq!(*initiate, key.local == k.public_key(), "{key:?}");
        }
    }

    #[test]
    fn same_config_twice_changes_nothing() {
        let (k, a) = (PrivateKey::generate(), PrivateKey::generate());
        let c = cfg(vec![k], vec![peer(&a, 2)]);
        let first = plan(&BTreeMap::new(), &c);
        let again = plan(&running(&first), &c);
        assert_eq!(again.keep.len(), 1);
        assert!(again.create.is_empty() && again.drop.is_empty());
    }

    #[test]
    fn peer_key_change_replaces_only_that_peer_and_initiates() {
        let (k, a, a2, b) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let before = cfg(vec![k.clone()], vec![peer(&a, 2), peer(&b, 3)]);
        let run = running(&plan(&BTreeMap::new(), &before));
        let mut rotated = peer(&a2, 2);
        rotated.tunnel = Ipv4Addr::new(10, 255, 0, 2);
        let after = cfg(vec![k.clone()], vec![rotated, peer(&b, 3)]);
        let p = plan(&run, &after);
        assert_eq!(
            p.keep,
            vec![TunnelKey {
                peer: b.public_key(),
                local: k.public_key()
            }]
        );
        assert_eq!(p.create.len(), 1);
        assert_eq!(p.create[0].0.peer, a2.public_key());
        assert!(p.create[0].2, "a peer's new key is dialled at once");
        assert_eq!(
            p.drop,
            vec![TunnelKey {
                peer: a.public_key(),
                local: k.public_key()
            }]
        );
    }

    #[test]
    fn rotation_promotion_keeps_the_next_keys_tunnels() {
        let (k, k2, a) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let during = cfg(vec![k.clone(), k2.clone()], vec![peer(&a, 2)]);
        let run = running(&plan(&BTreeMap::new(), &during));
        let after = cfg(vec![k2.clone()], vec![peer(&a, 2)]);
        let p = plan(&run, &after);
        assert_eq!(
            p.keep,
            vec![TunnelKey {
                peer: a.public_key(),
                local: k2.public_key()
            }]
        );
        assert!(p.create.is_empty());
        assert_eq!(p.drop.len(), 1);
        assert_eq!(p.drop[0].local, k.public_key());
    }

    #[test]
    fn keepalive_change_recreates_the_tunnel() {
        let (k, a) = (PrivateKey::generate(), PrivateKey::generate());
        let c = cfg(vec![k.clone()], vec![peer(&a, 2)]);
        let run = running(&plan(&BTreeMap::new(), &c));
        let mut p2 = peer(&a, 2);
        p2.keepalive = None;
        let p = plan(&run, &cfg(vec![k], vec![p2]));
        assert_eq!(p.drop.len(), 1);
        assert_eq!(p.create.len(), 1);
        assert_eq!(p.create[0].1.keepalive, None);
    }

    #[test]
    fn validate_refuses_bad_configs() {
        let (k, a) = (PrivateKey::generate(), PrivateKey::generate());
        let good = cfg(vec![k.clone()], vec![peer(&a, 2)]);
        validate(&good).unwrap();
        let mut c = good.clone();
        c.keys.clear();
        assert!(validate(&c).is_err());
        let mut c = good.clone();
        c.keys.push(k.clone());
        assert!(validate(&c).unwrap_err().to_string().contains("twice"));
        let mut c = good.clone();
        c.peers.push(peer(&a, 3));
        assert!(validate(&c)
            .unwrap_err()
            .to_string()
            .contains("share public key"));
        let mut c = good.clone();
        c.peers.push(peer(&PrivateKey::generate(), 2));
        assert!(validate(&c)
            .unwrap_err()
            .to_string()
            .contains("share tunnel"));
        let mut c = good.clone();
        c.peers[0].tunnel = c.address;
        assert!(validate(&c).is_err());
        let mut c = good.clone();
        c.mtu = 100;
        assert!(validate(&c).is_err());
        let mut c = good.clone();
        c.prefix_len = 33;
        assert!(validate(&c).is_err());
        let mut c = good.clone();
        c.name = "this-name-is-too-long".into();
        assert!(validate(&c).is_err());
        let mut c = good;
        c.listen_port = 0;
        assert!(validate(&c).is_err());
    }
}
