//! WireGuard under docker-vrouter's VXLAN: one interface in the host namespace that
//! discovery owns, configured as a plain value ([`DeviceConfig`]) and applied by
//! whichever backend this host has: kernel WireGuard (generic netlink) when the module
//! answers, else the userspace engine (boringtun on a persistent TUN device).
//!
//! CONTRACT STUB (issue 16): the types and signatures below are fixed; the bodies are
//! filled in on the engine branch.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

mod key;

pub use key::{load_or_create_key, write_key_file, PrivateKey, PublicKey};

/// Which implementation carries the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Kernel,
    Userspace,
}

/// Which backend to use: `auto` tries kernel WireGuard first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    #[default]
    Auto,
    Kernel,
    Userspace,
}

/// The whole interface, as desired. Applying the same value twice changes nothing.
#[derive(Clone)]
pub struct DeviceConfig {
    /// Interface name (at most 15 bytes).
    pub name: String,
    /// This host's private keys, current first. The current key initiates handshakes;
    /// the userspace engine also answers handshakes addressed to the others (key
    /// rotation: the next key is accepted before it is the current one). The kernel
    /// backend holds one key: `keys[0]`.
    pub keys: Vec<PrivateKey>,
    /// UDP port WireGuard listens on, on every address of the host.
    pub listen_port: u16,
    /// This host's tunnel address, and the prefix length of the tunnel range: the
    /// interface gets `address/prefix_len`, so the whole range routes into it.
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    /// Interface MTU (underlay MTU - 80).
    pub mtu: u32,
    pub peers: Vec<PeerConfig>,
}

/// One peer host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The key the peer's handshakes must prove, and that ours are addressed to.
    pub public_key: PublicKey,
    /// Where its WireGuard listens (its underlay address and WireGuard port).
    pub endpoint: SocketAddrV4,
    /// Its tunnel address: the only inner source accepted from it (allowed IP /32),
    /// and the only destination sent to it.
    pub tunnel: Ipv4Addr,
    /// Persistent keepalive, seconds (None: off).
    pub keepalive: Option<u16>,
}

/// What the backend reports per peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    pub public_key: PublicKey,
    pub tunnel: Ipv4Addr,
    pub endpoint: SocketAddrV4,
    /// Age of the latest completed handshake (None: never).
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Which of this host's public keys the peer's newest session was made with
    /// (None: no session). Key rotation promotes the next key once every routed peer
    /// shows it here.
    pub session_key: Option<PublicKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("kernel WireGuard is not available: {0}")]
    NoKernelWireGuard(String),
    #[error("cannot open /dev/net/tun: {0}; the userspace WireGuard needs the TUN device (compose `devices: [/dev/net/tun]`)")]
    NoTun(String),
    #[error("bad key: {0}")]
    BadKey(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Kernel(String),
}

/// A running tunnel: the interface plus (userspace) the engine's threads.
pub struct Wg {
    _private: (),
}

impl Wg {
    /// Creates or adopts the interface `cfg.name` and applies `cfg`. With
    /// [`BackendChoice::Auto`]: kernel WireGuard when the module answers, else the
    /// userspace engine on a persistent TUN device (adopted if a previous discovery
    /// left it, so routes and addresses survive a restart).
    pub async fn open(_cfg: &DeviceConfig, _choice: BackendChoice) -> Result<Wg, WgError> {
        Err(WgError::Kernel("vrouter-wg: not built yet".into()))
    }

    pub fn kind(&self) -> BackendKind {
        BackendKind::Userspace
    }

    /// Applies a new desired configuration (peers, keys, address, MTU) in place.
    pub async fn apply(&self, _cfg: &DeviceConfig) -> Result<(), WgError> {
        Ok(())
    }

    pub fn stats(&self) -> Vec<PeerStats> {
        Vec::new()
    }

    /// Stops the engine and leaves the interface in place (a restart adopts it).
    pub async fn close(self) {}
}

/// Deletes the interface (cleanup, leave-mesh, encryption turned off).
pub async fn destroy(_name: &str) -> Result<(), WgError> {
    Ok(())
}
