//! WireGuard under docker-vrouter's VXLAN: one interface in the host namespace that
//! discovery owns, configured as a plain value ([`DeviceConfig`]) and applied by
//! whichever backend this host has: kernel WireGuard (generic netlink) when the module
//! answers, else the userspace engine (boringtun on a persistent TUN device).
//!
//! Modules: `key` (keys and the key file), `config` (checks and the pure apply plan),
//! `engine` (the userspace data path), `tun` (the TUN device), `kernel` (kernel
//! WireGuard over generic netlink).
//!
//! Namespaces: `open` creates its sockets, the TUN device and the netlink handle in the
//! network namespace of the thread that polls it; run it on a runtime whose threads
//! are all in the namespace meant (discovery: the host's).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

mod config;
mod engine;
mod kernel;
mod key;
mod tun;
mod udp;

pub use engine::Drops;
pub use key::{load_or_create_key, write_key_file, PrivateKey, PublicKey};
use vrouter_kernel::{Kernel, KernelError};

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
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Where its WireGuard listens (its underlay address and WireGuard port). Both
    /// backends roam: an authenticated packet from another source address moves the
    /// endpoint in use there; applying the same configured endpoint again keeps the
    /// roamed one, a different configured value replaces it.
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
    /// Times the userspace engine moved the peer's endpoint to the source of an
    /// authenticated packet (roaming; `endpoint` is the address in use). The kernel
    /// backend roams too but counts nothing: 0.
    pub roams: u64,
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
    name: String,
    listen_port: u16,
    kernel: Kernel,
    backend: Backend,
}

enum Backend {
    Kernel(kernel::Device),
    Userspace(engine::Engine),
}

impl Wg {
    /// Creates or adopts the interface `cfg.name` and applies `cfg`. With
    /// [`BackendChoice::Auto`]: kernel WireGuard when the module answers, else the
    /// userspace engine on a persistent TUN device (adopted if a previous discovery
    /// left it, so routes and addresses survive a restart).
    pub async fn open(cfg: &DeviceConfig, choice: BackendChoice) -> Result<Wg, WgError> {
        config::validate(cfg)?;
        let kernel = Kernel::connect().await.map_err(kernel_error)?;
        let backend = match choice {
            BackendChoice::Kernel => Backend::Kernel(kernel::Device::open(&kernel, cfg).await?),
            BackendChoice::Userspace => Backend::Userspace(open_userspace(&kernel, cfg).await?),
            BackendChoice::Auto => match kernel::Device::open(&kernel, cfg).await {
                Ok(device) => Backend::Kernel(device),
                Err(WgError::NoKernelWireGuard(why)) => {
                    tracing::info!(%why, "kernel WireGuard unavailable; using the userspace engine");
                    Backend::Userspace(open_userspace(&kernel, cfg).await?)
                }
                Err(e) => return Err(e),
            },
        };
        Ok(Wg {
            name: cfg.name.clone(),
            listen_port: cfg.listen_port,
            kernel,
            backend,
        })
    }

    pub fn kind(&self) -> BackendKind {
        match self.backend {
            Backend::Kernel(_) => BackendKind::Kernel,
            Backend::Userspace(_) => BackendKind::Userspace,
        }
    }

    /// Applies a new desired configuration (peers, keys, address, MTU) in place.
    /// The interface name and the listen port are fixed for the life of a `Wg`.
    pub async fn apply(&self, cfg: &DeviceConfig) -> Result<(), WgError> {
        config::validate(cfg)?;
        if cfg.name != self.name || cfg.listen_port != self.listen_port {
            return Err(WgError::Kernel(format!(
                "the WireGuard device name and port cannot change in place ({} port {} -> {} port {}); \
                 close and open again",
                self.name, self.listen_port, cfg.name, cfg.listen_port
            )));
        }
        match &self.backend {
            Backend::Kernel(device) => device.apply(&self.kernel, cfg).await,
            Backend::Userspace(engine) => {
                engine.apply(cfg);
                configure_link(&self.kernel, cfg).await.map(|_| ())
            }
        }
    }

    pub fn stats(&self) -> Vec<PeerStats> {
        match &self.backend {
            Backend::Kernel(device) => device.stats(),
            Backend::Userspace(engine) => engine.stats(),
        }
    }

    /// Packets the userspace engine dropped, by reason (zero for the kernel backend).
    pub fn drops(&self) -> Drops {
        match &self.backend {
            Backend::Kernel(_) => Drops::default(),
            Backend::Userspace(engine) => engine.drops(),
        }
    }

    /// Stops the engine and leaves the interface in place (a restart adopts it).
    pub async fn close(self) {
        match self.backend {
            Backend::Kernel(_) => {}
            Backend::Userspace(mut engine) => {
                // Joining waits up to one poll period: off the async threads.
                let joined = tokio::task::spawn_blocking(move || engine.stop()).await;
                if let Err(e) = joined {
                    tracing::warn!(error = %e, "wireguard engine threads did not stop cleanly");
                }
            }
        }
    }
}

async fn open_userspace(kernel: &Kernel, cfg: &DeviceConfig) -> Result<engine::Engine, WgError> {
    // A kernel WireGuard link of the same name (backend switched) cannot become a TUN.
    if let Some(link) = kernel.link_by_name(&cfg.name).await.map_err(kernel_error)? {
        if link.kind.as_deref() == Some("wireguard") {
            kernel.delete_link(link.index).await.map_err(kernel_error)?;
        }
    }
    let engine = engine::Engine::start(cfg)?;
    configure_link(kernel, cfg).await?;
    Ok(engine)
}

/// Gives the link `cfg.name` exactly the address `address/prefix_len`, the MTU, and
/// brings it up. Returns its index.
pub(crate) async fn configure_link(kernel: &Kernel, cfg: &DeviceConfig) -> Result<u32, WgError> {
    let link = kernel
        .link_by_name(&cfg.name)
        .await
        .map_err(kernel_error)?
        .ok_or_else(|| WgError::Kernel(format!("link {} vanished", cfg.name)))?;
    for stale in kernel.addresses().await.map_err(kernel_error)? {
        if stale.index == link.index
            && (stale.addr != cfg.address || stale.prefix_len != cfg.prefix_len)
        {
            kernel
                .delete_address(link.index, stale.addr, stale.prefix_len)
                .await
                .map_err(kernel_error)?;
        }
    }
    kernel
        .replace_address(link.index, cfg.address, cfg.prefix_len)
        .await
        .map_err(kernel_error)?;
    if link.mtu != cfg.mtu {
        kernel
            .set_mtu(link.index, cfg.mtu)
            .await
            .map_err(kernel_error)?;
    }
    if !link.up {
        kernel.set_up(link.index).await.map_err(kernel_error)?;
    }
    Ok(link.index)
}

pub(crate) fn kernel_error(e: KernelError) -> WgError {
    match e {
        KernelError::NoWireGuard => WgError::NoKernelWireGuard(e.to_string()),
        e => WgError::Kernel(e.to_string()),
    }
}

/// Deletes the interface (cleanup, leave-mesh, encryption turned off). A missing
/// interface is not an error.
pub async fn destroy(name: &str) -> Result<(), WgError> {
    tun::check_name(name)?;
    let kernel = Kernel::connect().await.map_err(kernel_error)?;
    let Some(link) = kernel.link_by_name(name).await.map_err(kernel_error)? else {
        return Ok(());
    };
    match kernel.delete_link(link.index).await {
        Ok(()) => Ok(()),
        // Kernels whose tun driver has no netlink delete: drop the persistent flag.
        Err(e) if link.kind.as_deref() == Some("tun") || link.kind.is_none() => {
            tracing::debug!(error = %e, "deleting the TUN link over netlink failed; unpersisting it");
            tun::unpersist(name)
        }
        Err(e) => Err(kernel_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wg_can_be_shared_across_tasks() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<Wg>();
        shareable::<PrivateKey>();
        shareable::<DeviceConfig>();
    }

    #[test]
    fn only_the_module_missing_means_no_kernel_wireguard() {
        assert!(matches!(
            kernel_error(KernelError::NoWireGuard),
            WgError::NoKernelWireGuard(_)
        ));
        assert!(matches!(
            kernel_error(KernelError::NotPermitted { op: "x".into() }),
            WgError::Kernel(_)
        ));
    }
}
