//! Kernel WireGuard: the link (kind "wireguard") over rtnetlink, its configuration
//! over generic netlink (WG_CMD_SET_DEVICE / WG_CMD_GET_DEVICE, family "wireguard").
//!
//! The kernel holds one private key: `keys[0]`. Peers are changed in place (added,
//! updated, removed one by one; never WGDEVICE_F_REPLACE_PEERS, which would drop
//! every session on each apply). The kernel roams (an authenticated packet from a new
//! source moves a peer's endpoint), so a peer's endpoint is sent only when the
//! configured one changed (or the peer is new to the kernel): re-applying the same
//! configuration leaves a roamed endpoint alone.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use parking_lot::Mutex;
use vrouter_kernel::Kernel;

use crate::{configure_link, kernel_error, DeviceConfig, PeerStats, PublicKey, WgError};

/// How long a generic netlink request may take before it is abandoned.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer for one read of the socket (a dump comes in page-sized messages).
const RECV_BUFFER: usize = 64 * 1024;
/// Upper bound on the messages of one reply (a dump of thousands of peers is far below).
const MAX_REPLY_MESSAGES: usize = 100_000;

pub(crate) struct Device {
    ifindex: u32,
    genl: Mutex<Genl>,
    /// The public half of the key the kernel holds (stats' `session_key`).
    current: Mutex<PublicKey>,
    /// The endpoint last configured for each peer (sent, or kept by the kernel).
    configured: Mutex<BTreeMap<PublicKey, SocketAddrV4>>,
}

impl Device {
    pub(crate) async fn open(kernel: &Kernel, cfg: &DeviceConfig) -> Result<Device, WgError> {
        let existing = kernel.link_by_name(&cfg.name).await.map_err(kernel_error)?;
        let mut genl = Genl::connect()?;
        match existing {
            Some(link) if link.kind.as_deref() == Some("wireguard") => {}
            Some(link) => {
                // The userspace engine's TUN device of an earlier run: replace it only
                // once the kernel is known to have WireGuard.
                genl.resolve_family()?;
                kernel.delete_link(link.index).await.map_err(kernel_error)?;
                kernel
                    .create_wireguard(&cfg.name)
                    .await
                    .map_err(kernel_error)?;
            }
            None => {
                kernel
                    .create_wireguard(&cfg.name)
                    .await
                    .map_err(kernel_error)?;
            }
        }
        if let Err(e) = genl.resolve_family() {
            if let Some(link) = kernel.link_by_name(&cfg.name).await.ok().flatten() {
                let _ = kernel.delete_link(link.index).await;
            }
            return Err(e);
        }
        let ifindex = configure_link(kernel, cfg).await?;
        let device = Device {
            ifindex,
            genl: Mutex::new(genl),
            current: Mutex::new(cfg.keys[0].public_key()),
            configured: Mutex::new(BTreeMap::new()),
        };
        device.set(cfg)?;
        Ok(device)
    }

    pub(crate) async fn apply(&self, kernel: &Kernel, cfg: &DeviceConfig) -> Result<(), WgError> {
        self.set(cfg)?;
        configure_link(kernel, cfg).await.map(|_| ())
    }

    fn set(&self, cfg: &DeviceConfig) -> Result<(), WgError> {
        let mut genl = self.genl.lock();
        let present: BTreeSet<PublicKey> = genl
            .get_device(self.ifindex)?
            .into_iter()
            .map(|p| p.public_key)
            .collect();
        let mut configured = self.configured.lock();
        let message = set_device(self.ifindex, cfg, &present, &configured);
        genl.request(message, NLM_F_REQUEST | NLM_F_ACK)?;
        *configured = cfg
            .peers
            .iter()
            .map(|p| (p.public_key, p.endpoint))
            .collect();
        *self.current.lock() = cfg.keys[0].public_key();
        Ok(())
    }

    pub(crate) fn stats(&self) -> Vec<PeerStats> {
        let current = *self.current.lock();
        let peers = match self.genl.lock().get_device(self.ifindex) {
            Ok(peers) => peers,
            Err(e) => {
                tracing::warn!(error = %e, "reading kernel WireGuard peers failed");
                return Vec::new();
            }
        };
        let now = SystemTime::now();
        peers
            .into_iter()
            .map(|p| {
                let age = p
                    .last_handshake
                    .map(|t| now.duration_since(t).unwrap_or_default());
                PeerStats {
                    public_key: p.public_key,
                    tunnel: p.tunnel.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
                    endpoint: p
                        .endpoint
                        .unwrap_or(SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0)),
                    last_handshake: age,
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    session_key: age.map(|_| current),
                    roams: 0,
                }
            })
            .collect()
    }
}

/// A peer as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelPeer {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddrV4>,
    pub tunnel: Option<std::net::Ipv4Addr>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// WG_CMD_SET_DEVICE for `cfg`: the private key and port, every desired peer (added
/// or updated, its allowed IPs replaced by its tunnel address, its persistent
/// keepalive, 0 for off), and a removal for each peer in `present` that `cfg` no
/// longer has. A peer's endpoint goes in only when it is new to the kernel (not in
/// `present`) or its configured endpoint differs from `configured` (the one last
/// sent): otherwise the kernel keeps the endpoint it roamed to.
pub(crate) fn set_device(
    ifindex: u32,
    cfg: &DeviceConfig,
    present: &BTreeSet<PublicKey>,
    configured: &BTreeMap<PublicKey, SocketAddrV4>,
) -> WireguardMessage {
    let mut peers: Vec<WireguardPeer> = cfg
        .peers
        .iter()
        .map(|p| {
            let mut attrs = vec![
                WireguardPeerAttribute::PublicKey(p.public_key.0),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
            ];
            if !present.contains(&p.public_key)
                || configured.get(&p.public_key) != Some(&p.endpoint)
            {
                attrs.push(WireguardPeerAttribute::Endpoint(SocketAddr::V4(p.endpoint)));
            }
            attrs.extend([
                WireguardPeerAttribute::PersistentKeepalive(p.keepalive.unwrap_or(0)),
                WireguardPeerAttribute::AllowedIps(vec![WireguardAllowedIp(vec![
                    WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
                    WireguardAllowedIpAttr::IpAddr(IpAddr::V4(p.tunnel)),
                    WireguardAllowedIpAttr::Cidr(32),
                ])]),
            ]);
            WireguardPeer(attrs)
        })
        .collect();
    let wanted: BTreeSet<PublicKey> = cfg.peers.iter().map(|p| p.public_key).collect();
    for gone in present.difference(&wanted) {
        peers.push(WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(gone.0),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
        ]));
    }
    WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes: vec![
            WireguardAttribute::IfIndex(ifindex),
            WireguardAttribute::PrivateKey(*cfg.keys[0].bytes()),
            WireguardAttribute::ListenPort(cfg.listen_port),
            WireguardAttribute::Peers(peers),
        ],
    }
}

/// The peers of WG_CMD_GET_DEVICE replies (a dump: a device with many peers comes
/// in several messages, each repeating the device attributes).
pub(crate) fn peers_of(replies: &[WireguardMessage]) -> Vec<KernelPeer> {
    let mut out: Vec<KernelPeer> = Vec::new();
    for reply in replies {
        for attr in &reply.attributes {
            let WireguardAttribute::Peers(peers) = attr else {
                continue;
            };
            for peer in peers {
                let mut p = KernelPeer {
                    public_key: PublicKey([0; 32]),
                    endpoint: None,
                    tunnel: None,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                };
                for a in peer.iter() {
                    match a {
                        WireguardPeerAttribute::PublicKey(k) => p.public_key = PublicKey(*k),
                        WireguardPeerAttribute::Endpoint(SocketAddr::V4(e)) => {
                            p.endpoint = Some(*e)
                        }
                        WireguardPeerAttribute::LastHandshake(t)
                            if t.seconds > 0 || t.nano_seconds > 0 =>
                        {
                            p.last_handshake = Some(
                                UNIX_EPOCH
                                    + Duration::from_secs(t.seconds.max(0) as u64)
                                    + Duration::from_nanos(
                                        t.nano_seconds.clamp(0, 999_999_999) as u64
                                    ),
                            );
                        }
                        WireguardPeerAttribute::RxBytes(n) => p.rx_bytes = *n,
                        WireguardPeerAttribute::TxBytes(n) => p.tx_bytes = *n,
                        WireguardPeerAttribute::AllowedIps(ips) => {
                            for ip in ips {
                                for ia in ip.iter() {
                                    if let WireguardAllowedIpAttr::IpAddr(IpAddr::V4(v4)) = ia {
                                        p.tunnel = Some(*v4);
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
                // A peer split across messages continues under the same key.
                match out.last_mut() {
                    Some(last) if last.public_key == p.public_key => {
                        last.tunnel = last.tunnel.or(p.tunnel);
                    }
                    _ => out.push(p),
                }
            }
        }
    }
    out
}

/// A NETLINK_GENERIC socket, used request by request.
struct Genl {
    fd: OwnedFd,
    family: Option<u16>,
    seq: u32,
}

impl Genl {
    fn connect() -> Result<Genl, WgError> {
        // SAFETY: plain syscall; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(WgError::Kernel(format!(
                "cannot open a generic netlink socket: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let tv = libc::timeval {
            tv_sec: REPLY_TIMEOUT.as_secs() as _,
            tv_usec: 0,
        };
        // SAFETY: a timeval option on a valid socket.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        Ok(Genl {
            fd,
            family: None,
            seq: 0,
        })
    }

    /// The id of the "wireguard" generic netlink family (asking loads the module
    /// where module loading is allowed).
    fn resolve_family(&mut self) -> Result<u16, WgError> {
        if let Some(id) = self.family {
            return Ok(id);
        }
        self.seq = self.seq.wrapping_add(1);
        let request = family_request(self.seq);
        let replies = self.exchange(&request).map_err(|e| match e {
            GenlError::Errno(libc::ENOENT) => WgError::NoKernelWireGuard(
                "no \"wireguard\" generic netlink family (module not loaded)".into(),
            ),
            e => WgError::Kernel(format!("generic netlink family lookup: {e}")),
        })?;
        for reply in replies {
            let Ok(msg) = NetlinkMessage::<GenlMessage<GenlCtrl>>::deserialize(&reply) else {
                continue;
            };
            if let NetlinkPayload::InnerMessage(genl) = msg.payload {
                for nla in genl.payload.nlas {
                    if let GenlCtrlAttrs::FamilyId(id) = nla {
                        self.family = Some(id);
                        return Ok(id);
                    }
                }
            }
        }
        Err(WgError::NoKernelWireGuard(
            "the generic netlink controller did not name the wireguard family".into(),
        ))
    }

    fn get_device(&mut self, ifindex: u32) -> Result<Vec<KernelPeer>, WgError> {
        let message = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfIndex(ifindex)],
        };
        let replies = self.request(message, NLM_F_REQUEST | NLM_F_DUMP)?;
        Ok(peers_of(&replies))
    }

    fn request(
        &mut self,
        message: WireguardMessage,
        flags: u16,
    ) -> Result<Vec<WireguardMessage>, WgError> {
        let family = self.resolve_family()?;
        self.seq = self.seq.wrapping_add(1);
        let bytes = wireguard_request(family, self.seq, flags, message);
        let replies = self
            .exchange(&bytes)
            .map_err(|e| WgError::Kernel(format!("kernel WireGuard request failed: {e}")))?;
        let mut out = Vec::new();
        for reply in replies {
            let msg = NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(&reply)
                .map_err(|e| WgError::Kernel(format!("bad kernel WireGuard reply: {e}")))?;
            if let NetlinkPayload::InnerMessage(genl) = msg.payload {
                out.push(genl.payload);
            }
        }
        Ok(out)
    }

    /// Sends one request and collects the replies of its sequence number until the
    /// ACK, NLMSG_DONE or a lone answer. Each reply is one serialized netlink message.
    fn exchange(&mut self, request: &[u8]) -> Result<Vec<Vec<u8>>, GenlError> {
        let seq = u32::from_ne_bytes(request[8..12].try_into().expect("header"));
        let dump = u16::from_ne_bytes(request[6..8].try_into().expect("header")) & NLM_F_DUMP
            == NLM_F_DUMP;
        let ack = u16::from_ne_bytes(request[6..8].try_into().expect("header")) & NLM_F_ACK != 0;
        // SAFETY: `request` is valid for reads of its length.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(GenlError::Io(io::Error::last_os_error()));
        }
        let mut replies = Vec::new();
        let mut buf = vec![0u8; RECV_BUFFER];
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(GenlError::Io(io::Error::last_os_error()));
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4")) as usize;
                if len < 16 || len > rest.len() {
                    return Err(GenlError::Io(io::Error::other("truncated netlink message")));
                }
                let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2"));
                let reply_seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4"));
                let message = &rest[..len];
                rest = &rest[(len + 3) & !3..];
                if reply_seq != seq {
                    continue;
                }
                match kind as i32 {
                    libc::NLMSG_ERROR => {
                        let code = message
                            .get(16..20)
                            .map(|b| i32::from_ne_bytes(b.try_into().expect("4")))
                            .unwrap_or(-libc::EIO);
                        if code != 0 {
                            return Err(GenlError::Errno(-code));
                        }
                        return Ok(replies);
                    }
                    libc::NLMSG_DONE => return Ok(replies),
                    libc::NLMSG_NOOP => {}
                    _ => {
                        if replies.len() >= MAX_REPLY_MESSAGES {
                            return Err(GenlError::Io(io::Error::other("reply too long")));
                        }
                        replies.push(message.to_vec());
                        if !dump && !ack {
                            return Ok(replies);
                        }
                    }
                }
                if rest.len() < 16 {
                    break;
                }
            }
        }
    }
}

#[derive(Debug)]
enum GenlError {
    Errno(i32),
    Io(io::Error),
}

impl std::fmt::Display for GenlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GenlError::Errno(e) => write!(f, "{}", io::Error::from_raw_os_error(*e)),
            GenlError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// CTRL_CMD_GETFAMILY for "wireguard".
fn family_request(seq: u32) -> Vec<u8> {
    let genl = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName("wireguard".into())],
    });
    serialize(genl, seq, NLM_F_REQUEST)
}

/// A wireguard family request, serialized.
fn wireguard_request(family: u16, seq: u32, flags: u16, message: WireguardMessage) -> Vec<u8> {
    let mut genl = GenlMessage::from_payload(message);
    genl.set_resolved_family_id(family);
    serialize(genl, seq, flags)
}

fn serialize<F>(genl: GenlMessage<F>, seq: u32, flags: u16) -> Vec<u8>
where
    F: netlink_packet_generic::GenlFamily + netlink_packet_core::Emitable + std::fmt::Debug,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(genl));
    message.finalize();
    let mut bytes = vec![0u8; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    //! The expected bytes are written from include/uapi/linux/wireguard.h and
    //! genetlink.h by hand, not produced by the crates under test.
    use super::*;
    use crate::{PeerConfig, PrivateKey};
    use std::net::Ipv4Addr;

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }
    const NESTED: u16 = 1 << 15; // NLA_F_NESTED

    // enum wgdevice_attribute
    const WGDEVICE_A_IFINDEX: u16 = 1;
    const WGDEVICE_A_PRIVATE_KEY: u16 = 3;
    const WGDEVICE_A_LISTEN_PORT: u16 = 6;
    const WGDEVICE_A_PEERS: u16 = 8;
    // enum wgpeer_attribute
    const WGPEER_A_PUBLIC_KEY: u16 = 1;
    const WGPEER_A_FLAGS: u16 = 3;
    const WGPEER_A_ENDPOINT: u16 = 4;
    const WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL: u16 = 5;
    const WGPEER_A_LAST_HANDSHAKE_TIME: u16 = 6;
    const WGPEER_A_RX_BYTES: u16 = 7;
    const WGPEER_A_TX_BYTES: u16 = 8;
    const WGPEER_A_ALLOWEDIPS: u16 = 9;
    // enum wgpeer_flag
    const WGPEER_F_REMOVE_ME: u32 = 1;
    const WGPEER_F_REPLACE_ALLOWEDIPS: u32 = 2;
    // enum wgallowedip_attribute
    const WGALLOWEDIP_A_FAMILY: u16 = 1;
    const WGALLOWEDIP_A_IPADDR: u16 = 2;
    const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;
    // enum wg_cmd
    const WG_CMD_GET_DEVICE: u8 = 0;
    const WG_CMD_SET_DEVICE: u8 = 1;
    const WG_GENL_VERSION: u8 = 1;

    fn message(kind: u16, flags: u16, seq: u32, cmd: u8, version: u8, attrs: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((16 + 4 + attrs.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes()); // pid
        out.extend_from_slice(&[cmd, version, 0, 0]); // genlmsghdr
        out.extend_from_slice(attrs);
        out
    }

    fn sockaddr_in(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        s.extend_from_slice(&port.to_be_bytes());
        s.extend_from_slice(&ip);
        s.extend_from_slice(&[0; 8]);
        s
    }

    fn test_key(byte: u8) -> PrivateKey {
        PrivateKey([byte; 32])
    }

    #[test]
    fn set_device_bytes_match_the_uapi_layout() {
        let peer_key = PublicKey([0xbb; 32]);
        let gone = PublicKey([0xcc; 32]);
        let cfg = DeviceConfig {
            name: "vrouter-wg".into(),
            keys: vec![test_key(0xaa), test_key(0x11)],
            listen_port: 51820,
            address: Ipv4Addr::new(10, 255, 0, 1),
            prefix_len: 16,
            mtu: 1420,
            peers: vec![PeerConfig {
                public_key: peer_key,
                endpoint: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 51820),
                tunnel: Ipv4Addr::new(10, 255, 0, 2),
                keepalive: Some(25),
            }],
        };
        let present: BTreeSet<PublicKey> = [peer_key, gone].into_iter().collect();
        let bytes = wireguard_request(
            0x1d,
            7,
            NLM_F_REQUEST | NLM_F_ACK,
            set_device(9, &cfg, &present, &BTreeMap::new()),
        );

        let allowed = [
            nla(WGALLOWEDIP_A_FAMILY, &(libc::AF_INET as u16).to_ne_bytes()),
            nla(WGALLOWEDIP_A_IPADDR, &[10, 255, 0, 2]),
            nla(WGALLOWEDIP_A_CIDR_MASK, &[32]),
        ]
        .concat();
        let peer = [
            nla(WGPEER_A_PUBLIC_KEY, &[0xbb; 32]),
            nla(WGPEER_A_FLAGS, &WGPEER_F_REPLACE_ALLOWEDIPS.to_ne_bytes()),
            nla(WGPEER_A_ENDPOINT, &sockaddr_in([198, 18, 0, 2], 51820)),
            nla(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, &25u16.to_ne_bytes()),
            nla(WGPEER_A_ALLOWEDIPS | NESTED, &nla(NESTED, &allowed)),
        ]
        .concat();
        let removal = [
            nla(WGPEER_A_PUBLIC_KEY, &[0xcc; 32]),
            nla(WGPEER_A_FLAGS, &WGPEER_F_REMOVE_ME.to_ne_bytes()),
        ]
        .concat();
        let attrs = [
            nla(WGDEVICE_A_IFINDEX, &9u32.to_ne_bytes()),
            // Only keys[0]: the kernel holds one key.
            nla(WGDEVICE_A_PRIVATE_KEY, &[0xaa; 32]),
            nla(WGDEVICE_A_LISTEN_PORT, &51820u16.to_ne_bytes()),
            nla(
                WGDEVICE_A_PEERS | NESTED,
                &[nla(NESTED, &peer), nla(NESTED, &removal)].concat(),
            ),
        ]
        .concat();
        let expected = message(
            0x1d,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            7,
            WG_CMD_SET_DEVICE,
            WG_GENL_VERSION,
            &attrs,
        );
        assert_eq!(bytes, expected);
    }

    #[test]
    fn endpoint_is_sent_only_when_the_configured_one_changes() {
        let peer_key = PublicKey([0xbb; 32]);
        let endpoint = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 51820);
        let mut cfg = DeviceConfig {
            name: "vrouter-wg".into(),
            keys: vec![test_key(0xaa)],
            listen_port: 51820,
            address: Ipv4Addr::new(10, 255, 0, 1),
            prefix_len: 16,
            mtu: 1420,
            peers: vec![PeerConfig {
                public_key: peer_key,
                endpoint,
                tunnel: Ipv4Addr::new(10, 255, 0, 2),
                keepalive: Some(15),
            }],
        };
        let present: BTreeSet<PublicKey> = [peer_key].into_iter().collect();
        let allowed = [
            nla(WGALLOWEDIP_A_FAMILY, &(libc::AF_INET as u16).to_ne_bytes()),
            nla(WGALLOWEDIP_A_IPADDR, &[10, 255, 0, 2]),
            nla(WGALLOWEDIP_A_CIDR_MASK, &[32]),
        ]
        .concat();
        let expected = |endpoint: Option<([u8; 4], u16)>, keepalive: u16| {
            let mut peer = vec![
                nla(WGPEER_A_PUBLIC_KEY, &[0xbb; 32]),
                nla(WGPEER_A_FLAGS, &WGPEER_F_REPLACE_ALLOWEDIPS.to_ne_bytes()),
            ];
            if let Some((ip, port)) = endpoint {
                peer.push(nla(WGPEER_A_ENDPOINT, &sockaddr_in(ip, port)));
            }
            peer.push(nla(
                WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
                &keepalive.to_ne_bytes(),
            ));
            peer.push(nla(WGPEER_A_ALLOWEDIPS | NESTED, &nla(NESTED, &allowed)));
            let attrs = [
                nla(WGDEVICE_A_IFINDEX, &9u32.to_ne_bytes()),
                nla(WGDEVICE_A_PRIVATE_KEY, &[0xaa; 32]),
                nla(WGDEVICE_A_LISTEN_PORT, &51820u16.to_ne_bytes()),
                nla(WGDEVICE_A_PEERS | NESTED, &nla(NESTED, &peer.concat())),
            ]
            .concat();
            message(
                0x1d,
                (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
                7,
                WG_CMD_SET_DEVICE,
                WG_GENL_VERSION,
                &attrs,
            )
        };
        let bytes = |cfg: &DeviceConfig, present: &BTreeSet<PublicKey>, sent: &BTreeMap<_, _>| {
            wireguard_request(
                0x1d,
                7,
                NLM_F_REQUEST | NLM_F_ACK,
                set_device(9, cfg, present, sent),
            )
        };
        let same: BTreeMap<PublicKey, SocketAddrV4> = [(peer_key, endpoint)].into();
        // Configured as last time, peer in the kernel: no endpoint (a roamed one stays),
        // the keepalive still.
        assert_eq!(bytes(&cfg, &present, &same), expected(None, 15));
        // The peer is new to the kernel (it was removed, or the daemon restarted
        // beside a fresh device): the endpoint goes in.
        assert_eq!(
            bytes(&cfg, &BTreeSet::new(), &same),
            expected(Some(([198, 18, 0, 2], 51820)), 15)
        );
        // Nothing sent before (first apply after open): the endpoint goes in.
        assert_eq!(
            bytes(&cfg, &present, &BTreeMap::new()),
            expected(Some(([198, 18, 0, 2], 51820)), 15)
        );
        // The configured endpoint changed: it goes in, overriding a roamed one;
        // keepalive off is 0.
        cfg.peers[0].endpoint = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 5), 40000);
        cfg.peers[0].keepalive = None;
        assert_eq!(
            bytes(&cfg, &present, &same),
            expected(Some(([203, 0, 113, 5], 40000)), 0)
        );
    }

    #[test]
    fn get_device_and_family_request_bytes() {
        let get = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfIndex(4)],
        };
        let bytes = wireguard_request(0x1d, 3, NLM_F_REQUEST | NLM_F_DUMP, get);
        let expected = message(
            0x1d,
            (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            3,
            WG_CMD_GET_DEVICE,
            WG_GENL_VERSION,
            &nla(WGDEVICE_A_IFINDEX, &4u32.to_ne_bytes()),
        );
        assert_eq!(bytes, expected);

        // GENL_ID_CTRL = 16, CTRL_CMD_GETFAMILY = 3, CTRL_ATTR_FAMILY_NAME = 2 ("wireguard\0").
        let expected = message(
            16,
            libc::NLM_F_REQUEST as u16,
            5,
            3,
            2,
            &nla(2, b"wireguard\0"),
        );
        assert_eq!(family_request(5), expected);
    }

    #[test]
    fn get_device_reply_is_parsed() {
        let allowed = [
            nla(WGALLOWEDIP_A_FAMILY, &(libc::AF_INET as u16).to_ne_bytes()),
            nla(WGALLOWEDIP_A_IPADDR, &[10, 255, 0, 3]),
            nla(WGALLOWEDIP_A_CIDR_MASK, &[32]),
        ]
        .concat();
        let mut timespec = Vec::new();
        timespec.extend_from_slice(&1_700_000_000i64.to_ne_bytes());
        timespec.extend_from_slice(&5i64.to_ne_bytes());
        let peer = [
            nla(WGPEER_A_PUBLIC_KEY, &[0xdd; 32]),
            nla(WGPEER_A_ENDPOINT, &sockaddr_in([198, 18, 0, 3], 51821)),
            nla(WGPEER_A_LAST_HANDSHAKE_TIME, &timespec),
            nla(WGPEER_A_RX_BYTES, &1234u64.to_ne_bytes()),
            nla(WGPEER_A_TX_BYTES, &5678u64.to_ne_bytes()),
            nla(WGPEER_A_ALLOWEDIPS | NESTED, &nla(NESTED, &allowed)),
        ]
        .concat();
        let never = [
            nla(WGPEER_A_PUBLIC_KEY, &[0xee; 32]),
            nla(WGPEER_A_LAST_HANDSHAKE_TIME, &[0u8; 16]),
        ]
        .concat();
        let attrs = [
            nla(WGDEVICE_A_IFINDEX, &4u32.to_ne_bytes()),
            nla(
                WGDEVICE_A_PEERS | NESTED,
                &[nla(NESTED, &peer), nla(NESTED, &never)].concat(),
            ),
        ]
        .concat();
        let bytes = message(
            0x1d,
            libc::NLM_F_MULTI as u16,
            3,
            WG_CMD_GET_DEVICE,
            1,
            &attrs,
        );
        let parsed = NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(&bytes).unwrap();
        let NetlinkPayload::InnerMessage(genl) = parsed.payload else {
            panic!("not a wireguard message");
        };
        let peers = peers_of(&[genl.payload]);
        assert_eq!(
            peers,
            vec![
                KernelPeer {
                    public_key: PublicKey([0xdd; 32]),
                    endpoint: Some(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 3), 51821)),
                    tunnel: Some(Ipv4Addr::new(10, 255, 0, 3)),
                    last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
                    rx_bytes: 1234,
                    tx_bytes: 5678,
                },
                KernelPeer {
                    public_key: PublicKey([0xee; 32]),
                    endpoint: None,
                    tunnel: None,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                },
            ]
        );
    }
}
