//! Encryption at runtime: this host's WireGuard keys (and a key rotation in progress),
//! the WireGuard device, the `require` input filter, the stale-handshake watch and the
//! status. [`Tunnel`] holds the state and is the only code here that touches the
//! kernel (through vrouter-wg and the `ip` nftables table); what it does is decided by
//! the pure functions below it ([`vxlan_filter`], [`rotation_done`], [`stale_peers`],
//! [`device_config`]) and by [`crate::encryption`].

use crate::encryption::{PeerState, Plan};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vrouter_kernel::nft::{
    BaseHook, ChainSpec, Family, Hook, Match, Nft, RuleSpec, RuleVerdict, TableSpec,
};
use vrouter_kernel::KernelError;
use vrouter_state::{EncryptionMode, EncryptionPeer, EncryptionStatus, Prefix};
use vrouter_wg::{
    BackendChoice, BackendKind, DeviceConfig, PeerConfig, PeerStats, PrivateKey, PublicKey, Wg,
};

/// Comment of the `require` filter's rule (`nft list table ip <table>` shows it).
pub const FILTER_COMMENT: &str = "vrouter: VXLAN only through WireGuard";
/// The `require` filter's chain.
pub const FILTER_CHAIN: &str = "vxlan_in";

/// The `require` input filter: `table ip <table>`, a chain at the input hook (before
/// any socket, the VXLAN socket included) that drops UDP to the VXLAN port unless it
/// came out of the WireGuard device. Counted, so a test (or an operator) sees what it
/// dropped.
pub fn vxlan_filter(table: &str, vxlan_port: u16, wg_device: &str) -> TableSpec {
    TableSpec {
        family: Family::Ip,
        name: table.to_string(),
        sets: Vec::new(),
        chains: vec![ChainSpec {
            name: FILTER_CHAIN.into(),
            hook: Some(BaseHook {
                hook: Hook::Input,
                priority: -200,
                policy_accept: true,
            }),
            rules: vec![RuleSpec {
                matches: vec![
                    Match::UdpDport(vxlan_port),
                    Match::IifName {
                        name: wg_device.to_string(),
                        equal: false,
                    },
                ],
                counter: true,
                counter_start: (0, 0),
                set_ct_mark: None,
                statements: Vec::new(),
                verdict: RuleVerdict::Drop,
                comment: FILTER_COMMENT.into(),
            }],
        }],
    }
}

/// `<key file>.next`: the next key of a rotation, written (0600) before it is announced.
pub fn next_key_path(key_file: &Path) -> PathBuf {
    let mut s = key_file.as_os_str().to_owned();
    s.push(".next");
    PathBuf::from(s)
}

/// The device as desired: `keys` current first, except during a rotation, when the
/// next key goes first (new handshakes are made with it, since peers switch to it at
/// once) and the current one stays accepted.
pub fn device_config(
    name: &str,
    keys: Vec<PrivateKey>,
    listen_port: u16,
    address: Ipv4Addr,
    range: Prefix,
    underlay_mtu: u32,
    peers: Vec<PeerConfig>,
) -> DeviceConfig {
    DeviceConfig {
        name: name.to_string(),
        keys,
        listen_port,
        address,
        prefix_len: range.prefix_len(),
        mtu: crate::encryption::wg_mtu(underlay_mtu),
        peers,
    }
}

/// Persistent keepalive toward every peer while this host is behind a NAT (its
/// reflection has an observed address): shorter than common UDP NAT timeouts (30 s),
/// so the mappings of its tunnels stay open from the inside.
pub const NAT_KEEPALIVE_SECS: u16 = 15;

/// Where this host's WireGuard reaches one peer host, as the caller decided it (the
/// peer's address in use and this host's NAT state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerEndpoint {
    /// The address to send to; the port is the peer's announced WireGuard port.
    pub addr: Ipv4Addr,
    /// Persistent keepalive, seconds (None: off).
    pub keepalive_secs: Option<u16>,
}

/// One WireGuard peer of the device with the peer host (underlay address) it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPeer {
    pub host: Ipv4Addr,
    pub config: PeerConfig,
}

/// The device's peers: `plan`'s, each with the endpoint address and keepalive the
/// caller gives for its host (`endpoints`, by underlay address); a host without an
/// entry keeps the plan's (its underlay address, [`crate::encryption::KEEPALIVE_SECS`]).
/// The port is always the peer's announced WireGuard port. A peer that roams (its
/// packets authenticate from another source) is answered there by the backend until
/// the address given here changes.
pub fn wg_peers(plan: &Plan, endpoints: &BTreeMap<Ipv4Addr, PeerEndpoint>) -> Vec<HostPeer> {
    plan.wg_peers
        .iter()
        .map(|p| {
            // The plan's endpoint is the peer's underlay address.
            let host = *p.endpoint.ip();
            let mut config = p.clone();
            if let Some(e) = endpoints.get(&host) {
                config.endpoint.set_ip(e.addr);
                config.keepalive = e.keepalive_secs;
            }
            HostPeer { host, config }
        })
        .collect()
}

/// Whether a rotation to `next` may complete: every routed encrypted peer's newest
/// session was made with `next` (the laggards list is then empty), or `wait` has passed
/// (the laggards are named). None: keep waiting.
pub fn rotation_done(
    next: &PublicKey,
    peers: &[HostPeer],
    stats: &[PeerStats],
    elapsed: Duration,
    wait: Duration,
) -> Option<Vec<Ipv4Addr>> {
    let laggards: Vec<Ipv4Addr> = peers
        .iter()
        .filter(|p| {
            !stats
                .iter()
                .any(|s| s.tunnel == p.config.tunnel && s.session_key.as_ref() == Some(next))
        })
        .map(|p| p.host)
        .collect();
    (laggards.is_empty() || elapsed >= wait).then_some(laggards)
}

/// Encrypted peers whose latest handshake is older than `stale` (or who never had one
/// `stale` after they became peers), with the age: `since` is when each became a peer.
pub fn stale_peers(
    peers: &[HostPeer],
    stats: &[PeerStats],
    since: &BTreeMap<Ipv4Addr, Instant>,
    now: Instant,
    stale: Duration,
) -> BTreeMap<Ipv4Addr, Duration> {
    let mut out = BTreeMap::new();
    for p in peers {
        let host = p.host;
        let age = match stats
            .iter()
            .find(|s| s.tunnel == p.config.tunnel)
            .and_then(|s| s.last_handshake)
        {
            Some(age) => age,
            None => since
                .get(&host)
                .map(|t| now.saturating_duration_since(*t))
                .unwrap_or_default(),
        };
        if age > stale {
            out.insert(host, age);
        }
    }
    out
}

/// What happened in a pass, for the controller's events.log.
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    Started {
        backend: BackendKind,
        public_key: PublicKey,
        tunnel: Ipv4Addr,
    },
    Stale {
        host: Ipv4Addr,
        age: Duration,
    },
    RotationCompleted {
        new: PublicKey,
        waited: Duration,
        laggards: Vec<Ipv4Addr>,
    },
    Failed(String),
}

/// This host's keys: the current one and, during a rotation, the next.
pub struct Keys {
    pub current: PrivateKey,
    pub next: Option<PrivateKey>,
    /// When the rotation started (this process's clock; a resumed rotation starts
    /// again at its resumption).
    pub rotating_since: Option<Instant>,
}

/// Reads (or creates) the key file, and the next key of a rotation a previous run did
/// not finish: it resumes.
pub fn load_keys(key_file: &Path) -> Result<Keys, String> {
    let current = vrouter_wg::load_or_create_key(key_file, true).map_err(|e| {
        format!(
            "cannot load the WireGuard private key {} (VROUTER_WG_PRIVATE_KEY_FILE): {e}",
            key_file.display()
        )
    })?;
    let next_path = next_key_path(key_file);
    let next = match std::fs::symlink_metadata(&next_path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        _ => Some(vrouter_wg::load_or_create_key(&next_path, false).map_err(|e| {
            format!(
                "cannot load the next WireGuard key {} of an unfinished key rotation: {e}; remove it to drop that rotation",
                next_path.display()
            )
        })?),
    };
    // A next key equal to the current one: the rename happened, the old file did not go.
    let next = next.filter(|n| n.public_key() != current.public_key());
    let rotating_since = next.as_ref().map(|_| Instant::now());
    Ok(Keys {
        current,
        next,
        rotating_since,
    })
}

/// The encryption runtime.
pub struct Tunnel {
    pub mode: EncryptionMode,
    device: String,
    backend_choice: BackendChoice,
    key_file: PathBuf,
    listen_port: u16,
    range: Prefix,
    filter_table: String,
    vxlan_port: u16,
    stale_after: Duration,
    rotation_wait: Duration,
    pub keys: Keys,
    wg: Option<Wg>,
    /// This host's tunnel address as last applied.
    pub address: Option<Ipv4Addr>,
    /// The device's peers as last applied.
    peers: Vec<HostPeer>,
    /// Endpoint address and keepalive per peer host, from the caller (see
    /// [`Tunnel::set_endpoints`]).
    endpoints: BTreeMap<Ipv4Addr, PeerEndpoint>,
    /// When each encrypted peer became one (for the stale watch of peers that never
    /// completed a handshake).
    peer_since: BTreeMap<Ipv4Addr, Instant>,
    stale: BTreeSet<Ipv4Addr>,
    filter_applied: Option<TableSpec>,
    /// Whether a filter a previous run left (in `require`) was looked for: a host
    /// restarted from `require` into `prefer` must not keep dropping plain VXLAN.
    filter_leftover_cleared: bool,
    /// The last failure of the device and of the filter (events on change).
    device_error: Option<String>,
    filter_error: Option<String>,
    stopped: bool,
}

impl Tunnel {
    pub fn new(s: &crate::settings::Settings, keys: Keys) -> Tunnel {
        Tunnel {
            mode: s.encryption.clone(),
            device: s.wg_device.clone(),
            backend_choice: s.wg_backend,
            key_file: s.wg_key_file(),
            listen_port: s.wg_port,
            range: s.tunnel_range,
            filter_table: s.steering_table.clone(),
            vxlan_port: s.vxlan_port,
            stale_after: Duration::from_secs(s.wg_stale_secs.max(1)),
            rotation_wait: Duration::from_secs(s.wg_rotation_secs),
            keys,
            wg: None,
            address: None,
            peers: Vec::new(),
            endpoints: BTreeMap::new(),
            peer_since: BTreeMap::new(),
            stale: BTreeSet::new(),
            filter_applied: None,
            filter_leftover_cleared: false,
            device_error: None,
            filter_error: None,
            stopped: false,
        }
    }

    pub fn public_key(&self) -> PublicKey {
        self.keys.current.public_key()
    }

    pub fn next_public_key(&self) -> Option<PublicKey> {
        self.keys.next.as_ref().map(|k| k.public_key())
    }

    pub fn backend(&self) -> Option<BackendKind> {
        self.wg.as_ref().map(|w| w.kind())
    }

    pub fn is_open(&self) -> bool {
        self.wg.is_some()
    }

    /// After leave-mesh: the device is gone for good.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Why the device or the filter is not as desired, if so (for /readyz).
    pub fn error(&self) -> Option<String> {
        self.device_error
            .clone()
            .or_else(|| self.filter_error.clone())
    }

    /// What this host announces in its gossip record, with its tunnel address (None
    /// when the range has no address left for it: then nothing, as a host without
    /// encryption, since a key without an address is of no use to peers).
    pub fn announcement(
        &self,
        tunnel: Option<Ipv4Addr>,
    ) -> Option<vrouter_gossip::record::Encryption> {
        Some(vrouter_gossip::record::Encryption {
            mode: self.mode.clone(),
            public_key: Some(self.public_key().0),
            next_public_key: self.next_public_key().map(|k| k.0),
            tunnel: Some(tunnel?),
            wg_port: self.listen_port,
        })
    }

    /// The endpoint address and keepalive of each peer host (by underlay address) for
    /// the next [`Tunnel::apply`]; hosts left out get their underlay address and
    /// [`crate::encryption::KEEPALIVE_SECS`].
    pub fn set_endpoints(&mut self, endpoints: BTreeMap<Ipv4Addr, PeerEndpoint>) {
        self.endpoints = endpoints;
    }

    /// The device's peers as last applied, with their hosts.
    pub fn peers(&self) -> &[HostPeer] {
        &self.peers
    }

    fn key_list(&self) -> Vec<PrivateKey> {
        match &self.keys.next {
            Some(n) => vec![n.clone(), self.keys.current.clone()],
            None => vec![self.keys.current.clone()],
        }
    }

    /// Brings the device to `address` with `plan`'s peers (opening it on the first
    /// call), then the input filter. Returns what to report.
    pub async fn apply(&mut self, address: Ipv4Addr, underlay_mtu: u32, plan: &Plan) -> Vec<Note> {
        if self.stopped {
            return Vec::new();
        }
        let mut notes = Vec::new();
        let peers = wg_peers(plan, &self.endpoints);
        let cfg = device_config(
            &self.device,
            self.key_list(),
            self.listen_port,
            address,
            self.range,
            underlay_mtu,
            peers.iter().map(|p| p.config.clone()).collect(),
        );
        let result = match &self.wg {
            Some(wg) => wg.apply(&cfg).await.map(|_| None),
            None => Wg::open(&cfg, self.backend_choice).await.map(Some),
        };
        match result {
            Ok(opened) => {
                if let Some(wg) = opened {
                    notes.push(Note::Started {
                        backend: wg.kind(),
                        public_key: self.public_key(),
                        tunnel: address,
                    });
                    self.wg = Some(wg);
                }
                self.address = Some(address);
                self.peers = peers;
                self.device_error = None;
            }
            Err(e) => {
                let msg = format!(
                    "cannot set up the WireGuard device {} ({} backend, VROUTER_WG_BACKEND): {e}",
                    self.device,
                    crate::settings::backend_name(self.backend_choice)
                );
                if self.device_error.as_ref() != Some(&msg) {
                    notes.push(Note::Failed(msg.clone()));
                }
                self.device_error = Some(msg);
            }
        }
        let now = Instant::now();
        let hosts: BTreeSet<Ipv4Addr> = self.peers.iter().map(|p| p.host).collect();
        self.peer_since.retain(|h, _| hosts.contains(h));
        for h in hosts {
            self.peer_since.entry(h).or_insert(now);
        }
        match self.apply_filter() {
            Ok(()) => self.filter_error = None,
            Err(e) => {
                let msg = format!(
                    "cannot bring the VXLAN input filter (nftables table ip {}) to match VROUTER_ENCRYPTION: {e}",
                    self.filter_table
                );
                if self.filter_error.as_ref() != Some(&msg) {
                    notes.push(Note::Failed(msg.clone()));
                }
                self.filter_error = Some(msg);
            }
        }
        notes.extend(self.watch(now));
        notes
    }

    /// `require`: the input filter, put in once (and again whenever the kernel's copy
    /// is gone); other modes: removed.
    fn apply_filter(&mut self) -> Result<(), KernelError> {
        let nft = Nft::connect_table(Family::Ip, &self.filter_table)?;
        if self.mode != EncryptionMode::Require {
            if self.filter_applied.is_some() || !self.filter_leftover_cleared {
                nft.delete_table()?;
                self.filter_applied = None;
                self.filter_leftover_cleared = true;
            }
            return Ok(());
        }
        let want = vxlan_filter(&self.filter_table, self.vxlan_port, &self.device);
        let present = nft
            .rule_counters()?
            .iter()
            .any(|r| r.chain == FILTER_CHAIN && r.comment == FILTER_COMMENT);
        if self.filter_applied.as_ref() != Some(&want) || !present {
            nft.replace_table(&want)?;
            self.filter_applied = Some(want);
        }
        Ok(())
    }

    /// The stale-handshake watch and the rotation's progress.
    fn watch(&mut self, now: Instant) -> Vec<Note> {
        let mut notes = Vec::new();
        let stats = self.stats();
        let stale = stale_peers(&self.peers, &stats, &self.peer_since, now, self.stale_after);
        for (host, age) in &stale {
            if self.stale.insert(*host) {
                notes.push(Note::Stale {
                    host: *host,
                    age: *age,
                });
            }
        }
        self.stale.retain(|h| stale.contains_key(h));
        if let (Some(next), Some(since)) = (self.next_public_key(), self.keys.rotating_since) {
            let elapsed = now.saturating_duration_since(since);
            // Kernel WireGuard holds one key: the switch is immediate.
            let wait = if self.backend() == Some(BackendKind::Kernel) {
                Duration::ZERO
            } else {
                self.rotation_wait
            };
            if let Some(laggards) = rotation_done(&next, &self.peers, &stats, elapsed, wait) {
                match self.complete_rotation() {
                    Ok(()) => notes.push(Note::RotationCompleted {
                        new: next,
                        waited: elapsed,
                        laggards,
                    }),
                    Err(e) => notes.push(Note::Failed(e)),
                }
            }
        }
        notes
    }

    pub fn stats(&self) -> Vec<PeerStats> {
        self.wg.as_ref().map(|w| w.stats()).unwrap_or_default()
    }

    /// `rotate-key`: writes the next key (0600) before anything announces it, so a
    /// crash leaves a rotation the next start resumes. Returns (old, new).
    pub fn start_rotation(&mut self) -> Result<(PublicKey, PublicKey), String> {
        if self.stopped {
            return Err("this host left the mesh; encryption is stopped".into());
        }
        if let Some(n) = self.next_public_key() {
            return Err(format!(
                "a key rotation to {n} is already in progress; it completes once every peer uses the new key (at most {} s)",
                self.rotation_wait.as_secs()
            ));
        }
        let next = PrivateKey::generate();
        let path = next_key_path(&self.key_file);
        vrouter_wg::write_key_file(&path, &next, false).map_err(|e| {
            format!(
                "cannot write the next WireGuard key {}: {e}; check that the key file's directory is writable (a leftover .next file of another rotation must be removed)",
                path.display()
            )
        })?;
        let new = next.public_key();
        self.keys.next = Some(next);
        self.keys.rotating_since = Some(Instant::now());
        Ok((self.public_key(), new))
    }

    /// The next key becomes the key: an atomic rename over the key file.
    fn complete_rotation(&mut self) -> Result<(), String> {
        let path = next_key_path(&self.key_file);
        std::fs::rename(&path, &self.key_file).map_err(|e| {
            format!(
                "cannot move the next WireGuard key {} over {}: {e}; the rotation stays in progress",
                path.display(),
                self.key_file.display()
            )
        })?;
        if let Some(next) = self.keys.next.take() {
            self.keys.current = next;
        }
        self.keys.rotating_since = None;
        Ok(())
    }

    /// Leaving the mesh: the device and the filter go, and stay gone.
    pub async fn remove(&mut self) -> Vec<String> {
        self.stopped = true;
        if let Some(wg) = self.wg.take() {
            wg.close().await;
        }
        let mut errors = Vec::new();
        if let Err(e) = vrouter_wg::destroy(&self.device).await {
            errors.push(format!(
                "cannot delete the WireGuard device {}: {e}",
                self.device
            ));
        }
        if let Err(e) = delete_filter(&self.filter_table) {
            errors.push(format!(
                "cannot delete nftables table ip {}: {e}",
                self.filter_table
            ));
        }
        self.filter_applied = None;
        self.address = None;
        errors
    }

    /// Shutdown: the engine stops, the device stays (a restart adopts it).
    pub async fn close(&mut self) {
        if let Some(wg) = self.wg.take() {
            wg.close().await;
        }
    }

    /// discovery.json's `encryption`.
    pub fn status(&self, plan: &Plan, overlay_mtu: u32) -> EncryptionStatus {
        let stats = self.stats();
        status(
            &self.mode,
            self.backend(),
            &self.device,
            Some(self.public_key()),
            self.next_public_key(),
            self.address,
            Some(self.listen_port),
            overlay_mtu,
            plan,
            &stats,
        )
    }
}

/// Deletes `ip <table>` (the `require` filter); a missing table, or a kernel without
/// nftables, has none to delete.
pub fn delete_filter(table: &str) -> Result<(), KernelError> {
    match Nft::connect_table(Family::Ip, table) {
        Ok(nft) => match nft.delete_table() {
            Err(KernelError::NoNfTables) => Ok(()),
            r => r,
        },
        Err(KernelError::NoNfTables) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The status value. Pure.
#[allow(clippy::too_many_arguments)]
pub fn status(
    mode: &EncryptionMode,
    backend: Option<BackendKind>,
    device: &str,
    public_key: Option<PublicKey>,
    next_public_key: Option<PublicKey>,
    tunnel: Option<Ipv4Addr>,
    listen_port: Option<u16>,
    overlay_mtu: u32,
    plan: &Plan,
    stats: &[PeerStats],
) -> EncryptionStatus {
    let peers = plan
        .peers
        .values()
        .map(|d| {
            let s = (d.state == PeerState::Encrypted)
                .then(|| d.tunnel.and_then(|t| stats.iter().find(|s| s.tunnel == t)))
                .flatten();
            EncryptionPeer {
                host: d.host,
                state: d.state.as_str().to_string(),
                reason: d.reason.clone(),
                public_key: d.key.map(|k| k.to_string()),
                tunnel_address: d.tunnel,
                last_handshake_age_s: s
                    .and_then(|s| s.last_handshake)
                    .map(|a| (a.as_secs_f64() * 10.0).round() / 10.0),
                rx_bytes: s.map(|s| s.rx_bytes).unwrap_or(0),
                tx_bytes: s.map(|s| s.tx_bytes).unwrap_or(0),
            }
        })
        .collect();
    EncryptionStatus {
        mode: mode.clone(),
        backend: backend.map(|b| match b {
            BackendKind::Kernel => "kernel".to_string(),
            BackendKind::Userspace => "userspace".to_string(),
        }),
        device: device.to_string(),
        public_key: public_key.map(|k| k.to_string()),
        next_public_key: next_public_key.map(|k| k.to_string()),
        tunnel_address: tunnel,
        listen_port,
        overlay_mtu,
        peers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encryption::{plan, KEEPALIVE_SECS};
    use std::net::SocketAddrV4;
    use vrouter_state::{PeerEncryption, PeerHost, PeerOrigin};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn key(n: u8) -> PublicKey {
        PrivateKey::from_base64(&vrouter_wg::PublicKey([n; 32]).to_string())
            .unwrap()
            .public_key()
    }

    fn peer(host: &str, tunnel: &str, k: PublicKey) -> PeerConfig {
        PeerConfig {
            public_key: k,
            endpoint: SocketAddrV4::new(ip(host), 51820),
            tunnel: ip(tunnel),
            keepalive: Some(KEEPALIVE_SECS),
        }
    }

    fn hp(p: &PeerConfig) -> HostPeer {
        HostPeer {
            host: *p.endpoint.ip(),
            config: p.clone(),
        }
    }

    fn stat(p: &PeerConfig, handshake: Option<u64>, session: Option<PublicKey>) -> PeerStats {
        PeerStats {
            public_key: p.public_key,
            tunnel: p.tunnel,
            endpoint: p.endpoint,
            last_handshake: handshake.map(Duration::from_secs),
            rx_bytes: 10,
            tx_bytes: 20,
            session_key: session,
            roams: 0,
        }
    }

    #[test]
    fn the_filter_drops_vxlan_that_did_not_come_through_the_tunnel() {
        let t = vxlan_filter("vrouter", 4789, "vrouter-wg");
        assert_eq!(t.family, Family::Ip);
        let c = &t.chains[0];
        assert_eq!(c.hook.as_ref().unwrap().hook, Hook::Input);
        assert!(
            c.hook.as_ref().unwrap().policy_accept,
            "only VXLAN is dropped"
        );
        let r = &c.rules[0];
        assert_eq!(r.verdict, RuleVerdict::Drop);
        assert_eq!(
            r.matches,
            vec![
                Match::UdpDport(4789),
                Match::IifName {
                    name: "vrouter-wg".into(),
                    equal: false
                }
            ]
        );
    }

    #[test]
    fn a_rotation_completes_when_every_peer_uses_the_next_key_or_the_wait_ran_out() {
        let (old, next) = (key(1), key(2));
        let a = peer("198.18.0.2", "10.255.0.2", key(3));
        let b = peer("198.18.0.3", "10.255.0.3", key(4));
        let peers = vec![hp(&a), hp(&b)];
        let wait = Duration::from_secs(120);
        let half = vec![stat(&a, Some(1), Some(next)), stat(&b, Some(1), Some(old))];
        assert_eq!(
            rotation_done(&next, &peers, &half, Duration::from_secs(5), wait),
            None
        );
        assert_eq!(
            rotation_done(&next, &peers, &half, wait, wait),
            Some(vec![ip("198.18.0.3")])
        );
        let all = vec![stat(&a, Some(1), Some(next)), stat(&b, Some(0), Some(next))];
        assert_eq!(
            rotation_done(&next, &peers, &all, Duration::from_secs(1), wait),
            Some(vec![])
        );
        // No peers: nothing to wait for.
        assert_eq!(
            rotation_done(&next, &[], &[], Duration::ZERO, wait),
            Some(vec![])
        );
    }

    #[test]
    fn a_peer_is_stale_after_the_limit_with_or_without_a_handshake() {
        let a = peer("198.18.0.2", "10.255.0.2", key(3));
        let b = peer("198.18.0.3", "10.255.0.3", key(4));
        let c = peer("198.18.0.4", "10.255.0.4", key(5));
        let now = Instant::now() + Duration::from_secs(1000);
        let since: BTreeMap<Ipv4Addr, Instant> = [
            (ip("198.18.0.2"), now - Duration::from_secs(500)),
            (ip("198.18.0.3"), now - Duration::from_secs(500)),
            (ip("198.18.0.4"), now - Duration::from_secs(10)),
        ]
        .into();
        let stats = vec![stat(&a, Some(200), None), stat(&b, Some(30), None)];
        let stale = stale_peers(
            &[hp(&a), hp(&b), hp(&c)],
            &stats,
            &since,
            now,
            Duration::from_secs(180),
        );
        assert_eq!(
            stale.keys().copied().collect::<Vec<_>>(),
            vec![ip("198.18.0.2")]
        );
        assert_eq!(stale[&ip("198.18.0.2")], Duration::from_secs(200));
        let never = peer("198.18.0.5", "10.255.0.5", key(6));
        let since = [(ip("198.18.0.5"), now - Duration::from_secs(181))].into();
        assert!(
            stale_peers(&[hp(&never)], &[], &since, now, Duration::from_secs(180))
                .contains_key(&ip("198.18.0.5"))
        );
        // A peer reached at another address (its observed one) is still named by its
        // host address.
        let mut far = hp(&peer("198.18.0.6", "10.255.0.6", key(7)));
        far.config.endpoint = SocketAddrV4::new(ip("203.0.113.5"), 51820);
        let since = [(ip("198.18.0.6"), now - Duration::from_secs(181))].into();
        let stale = stale_peers(&[far.clone()], &[], &since, now, Duration::from_secs(180));
        assert_eq!(
            stale.keys().copied().collect::<Vec<_>>(),
            [ip("198.18.0.6")]
        );
        assert_eq!(
            rotation_done(
                &key(2),
                &[far],
                &[],
                Duration::from_secs(200),
                Duration::ZERO
            ),
            Some(vec![ip("198.18.0.6")])
        );
    }

    fn encrypted(addr: &str, tunnel: &str, k: PublicKey, wg_port: u16) -> PeerHost {
        PeerHost {
            addr: ip(addr),
            stacks: Vec::new(),
            source: PeerOrigin::Gossip,
            node: None,
            claims: BTreeMap::new(),
            generations: BTreeMap::new(),
            encryption: Some(PeerEncryption {
                mode: EncryptionMode::Prefer,
                public_key: Some(k.to_string()),
                next_public_key: None,
                tunnel: Some(ip(tunnel)),
                wg_port,
            }),
        }
    }

    #[test]
    fn the_caller_sets_each_peers_endpoint_address_and_keepalive() {
        let hosts = vec![
            encrypted("198.18.0.2", "10.255.0.2", key(3), 51820),
            encrypted("198.18.0.3", "10.255.0.3", key(4), 51999),
            encrypted("198.18.0.4", "10.255.0.4", key(5), 51820),
        ];
        let p = plan(
            &EncryptionMode::Prefer,
            &hosts,
            "10.255.0.0/16".parse().unwrap(),
            Some(ip("10.255.0.1")),
        );
        // Nothing given: the underlay address and the default keepalive.
        let plain = wg_peers(&p, &BTreeMap::new());
        assert_eq!(plain.len(), 3);
        for (hp, host) in plain.iter().zip(&hosts) {
            assert_eq!(hp.host, host.addr);
            assert_eq!(*hp.config.endpoint.ip(), host.addr);
            assert_eq!(hp.config.keepalive, Some(KEEPALIVE_SECS));
        }
        let endpoints: BTreeMap<Ipv4Addr, PeerEndpoint> = [
            // Reached at its observed address, keepalive for this host's NAT.
            (
                ip("198.18.0.3"),
                PeerEndpoint {
                    addr: ip("203.0.113.5"),
                    keepalive_secs: Some(NAT_KEEPALIVE_SECS),
                },
            ),
            // Keepalive off.
            (
                ip("198.18.0.4"),
                PeerEndpoint {
                    addr: ip("198.18.0.4"),
                    keepalive_secs: None,
                },
            ),
            // Not a WireGuard peer: ignored.
            (
                ip("198.18.0.9"),
                PeerEndpoint {
                    addr: ip("198.18.0.9"),
                    keepalive_secs: None,
                },
            ),
        ]
        .into();
        let set = wg_peers(&p, &endpoints);
        assert_eq!(set.len(), 3);
        assert_eq!(set[0], plain[0]);
        assert_eq!(set[1].host, ip("198.18.0.3"));
        assert_eq!(
            set[1].config.endpoint,
            SocketAddrV4::new(ip("203.0.113.5"), 51999),
            "the peer's own WireGuard port"
        );
        assert_eq!(set[1].config.keepalive, Some(15));
        assert_eq!(set[1].config.tunnel, ip("10.255.0.3"));
        assert_eq!(set[1].config.public_key, plain[1].config.public_key);
        assert_eq!(set[2].config.endpoint, plain[2].config.endpoint);
        assert_eq!(set[2].config.keepalive, None);
    }

    #[test]
    fn the_status_lists_every_peer_with_its_state_and_counters() {
        let k = key(3);
        let peers = vec![
            PeerHost {
                addr: ip("198.18.0.2"),
                stacks: Vec::new(),
                source: PeerOrigin::Gossip,
                node: None,
                claims: BTreeMap::new(),
                generations: BTreeMap::new(),
                encryption: Some(PeerEncryption {
                    mode: EncryptionMode::Require,
                    public_key: Some(k.to_string()),
                    next_public_key: None,
                    tunnel: Some(ip("10.255.0.2")),
                    wg_port: 51820,
                }),
            },
            PeerHost {
                addr: ip("198.18.0.3"),
                stacks: Vec::new(),
                source: PeerOrigin::Gossip,
                node: None,
                claims: BTreeMap::new(),
                generations: BTreeMap::new(),
                encryption: None,
            },
        ];
        let p = plan(
            &EncryptionMode::Prefer,
            &peers,
            "10.255.0.0/16".parse().unwrap(),
            None,
        );
        let stats = vec![stat(&p.wg_peers[0], Some(3), Some(key(1)))];
        let s = status(
            &EncryptionMode::Prefer,
            Some(BackendKind::Userspace),
            "vrouter-wg",
            Some(key(1)),
            None,
            Some(ip("10.255.0.1")),
            Some(51820),
            1370,
            &p,
            &stats,
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["backend"], "userspace");
        assert_eq!(json["overlay_mtu"], 1370);
        assert_eq!(json["peers"][0]["state"], "encrypted");
        assert_eq!(json["peers"][0]["last_handshake_age_s"], 3.0);
        assert_eq!(json["peers"][0]["rx_bytes"], 10);
        assert_eq!(json["peers"][1]["state"], "plain");
        assert!(json["peers"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("198.18.0.3"));
        assert!(json["peers"][1]["last_handshake_age_s"].is_null());
        assert!(json["next_public_key"].is_null());
    }

    #[test]
    fn a_rotation_survives_a_restart_and_completes_by_rename() {
        use clap::Parser;
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("vrt-wgkeys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key_file = dir.join("wg.key");
        let settings = crate::settings::Cli::try_parse_from([
            "vrouter-discovery",
            "--encryption",
            "require",
            "--wg-private-key-file",
            key_file.to_str().unwrap(),
        ])
        .unwrap()
        .settings;
        let first = load_keys(&key_file).unwrap();
        assert!(first.next.is_none() && first.rotating_since.is_none());
        let old = first.current.public_key();
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let mut t = Tunnel::new(&settings, first);
        let (was, new) = t.start_rotation().unwrap();
        assert_eq!(was, old);
        assert_ne!(new, old);
        let next_file = next_key_path(&key_file);
        let mode = std::fs::metadata(&next_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the next key is written 0600 first");
        assert!(t
            .start_rotation()
            .unwrap_err()
            .contains("already in progress"));
        let announced = t.announcement(Some("10.255.0.1".parse().unwrap())).unwrap();
        assert_eq!(announced.public_key, Some(old.0));
        assert_eq!(announced.next_public_key, Some(new.0));
        // The device makes new handshakes with the next key and still answers the old.
        let keys: Vec<PublicKey> = t.key_list().iter().map(|k| k.public_key()).collect();
        assert_eq!(keys, vec![new, old]);

        // A crash here: the next start resumes the rotation.
        drop(t);
        let resumed = load_keys(&key_file).unwrap();
        assert_eq!(resumed.current.public_key(), old);
        assert_eq!(resumed.next.as_ref().map(|k| k.public_key()), Some(new));
        assert!(resumed.rotating_since.is_some());

        // No routed encrypted peer to wait for: it completes at the next pass.
        let mut t = Tunnel::new(&settings, resumed);
        let notes = t.watch(Instant::now());
        assert!(
            matches!(&notes[..], [Note::RotationCompleted { new: n, laggards, .. }] if *n == new && laggards.is_empty()),
            "{notes:?}"
        );
        assert!(!next_file.exists());
        assert_eq!(load_keys(&key_file).unwrap().current.public_key(), new);
        assert_eq!(t.public_key(), new);
        assert!(t.next_public_key().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_next_key_sits_beside_the_key_file() {
        assert_eq!(
            next_key_path(Path::new("/p/wg.key")),
            PathBuf::from("/p/wg.key.next")
        );
    }
}
