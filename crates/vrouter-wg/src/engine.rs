//! The userspace WireGuard engine: boringtun's Noise state machines (`Tunn`) between a
//! persistent TUN device and one UDP socket, driven by blocking OS threads.
//!
//! Threads: one reads the TUN device and encrypts (TUN -> UDP), one receives from the
//! socket and decrypts (UDP -> TUN), one ticks the protocol timers every 100 ms.
//! Each (peer, local key) pair has its own `Tunn` behind a mutex; the routing table
//! (`Table`) is an immutable value swapped whole by `apply`, so the data path takes a
//! read lock only to clone an `Arc`, and unchanged tunnels keep their sessions.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use parking_lot::{Mutex, RwLock};

use crate::config::{plan, TunnelKey, TunnelParams};
use crate::tun::{self, Tun};
use crate::udp::{Udp, MAX_GSO_BYTES, MAX_SEGMENTS};
use crate::{DeviceConfig, PeerConfig, PeerStats, PrivateKey, PublicKey, WgError};

/// Largest IP packet the TUN device can hand over (IPv4 total length is 16 bits).
const MAX_PACKET: usize = 65_535;
/// Room for WireGuard's framing around a packet (header 16, tag 16, padding 15), and
/// never less than a handshake initiation.
const MAX_DATAGRAM: usize = MAX_PACKET + 64;
/// How long a data thread sleeps in poll(2) at most (stop wakes it at once).
const POLL_MS: i32 = 1000;
/// The protocol timer period (retransmits, rekeys, keepalives).
const TICK: Duration = Duration::from_millis(100);
/// Handshake initiations per second, per local key, before cookies are demanded.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Socket buffers: room for a burst at line rate while a thread is descheduled.
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// Counters of packets the engine dropped, by reason.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drops {
    /// Decrypted packets whose inner source was not the sending peer's tunnel address
    /// (cryptokey routing).
    pub bad_source: u64,
    /// Packets from the TUN device to an address no peer has.
    pub no_peer: u64,
    /// Datagrams that were not WireGuard, failed authentication, or named no session.
    pub invalid: u64,
}

#[derive(Default)]
struct DropCounters {
    bad_source: AtomicU64,
    no_peer: AtomicU64,
    invalid: AtomicU64,
}

/// One of this host's keys.
struct Local {
    public: PublicKey,
    x_public: x25519::PublicKey,
    secret: x25519::StaticSecret,
    /// Checks mac1 of initiations addressed to this key (which key an initiation is
    /// for, without a Diffie-Hellman) and demands cookies under load.
    limiter: Arc<RateLimiter>,
}

/// One Noise state machine: a peer and one of our keys.
struct Tunnel {
    key: TunnelKey,
    params: TunnelParams,
    /// The 24-bit index boringtun puts in the top of its session indices.
    index: u32,
    tunn: Mutex<Tunn>,
}

/// What outlives a change of a peer's key: its counters.
#[derive(Default)]
struct PeerCounters {
    /// Bytes of tunnels already dropped (a live tunnel's own counters come on top).
    rx_retired: AtomicU64,
    tx_retired: AtomicU64,
    /// Times an authenticated packet from a new source address moved the endpoint.
    roams: AtomicU64,
}

/// Where a peer's datagrams go: the configured endpoint, until an authenticated
/// handshake or data packet of the peer arrives from another source address, which
/// becomes the endpoint (roaming: a peer behind a NAT is answered at its mapped
/// address). A roamed endpoint outlives `apply` calls that configure the same
/// endpoint; only a change of the configured value itself overrides it.
struct Endpoint {
    /// The address in use, packed by [`pack`].
    current: AtomicU64,
    /// The configured endpoint it started from.
    configured: SocketAddrV4,
}

fn pack(a: SocketAddrV4) -> u64 {
    (u64::from(u32::from(*a.ip())) << 16) | u64::from(a.port())
}

fn unpack(v: u64) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from((v >> 16) as u32), v as u16)
}

impl Endpoint {
    fn new(configured: SocketAddrV4) -> Endpoint {
        Endpoint {
            current: AtomicU64::new(pack(configured)),
            configured,
        }
    }

    fn get(&self) -> SocketAddrV4 {
        unpack(self.current.load(Ordering::Relaxed))
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::V4(self.get())
    }

    /// Makes `from` the endpoint; true when it changed.
    fn roam(&self, from: SocketAddrV4) -> bool {
        self.current.swap(pack(from), Ordering::Relaxed) != pack(from)
    }
}

struct Peer {
    cfg: PeerConfig,
    endpoint: Arc<Endpoint>,
    /// One per local key, in the order of `DeviceConfig::keys` (current first).
    tunnels: Vec<Arc<Tunnel>>,
    counters: Arc<PeerCounters>,
}

/// The routing state of the engine: immutable once built.
#[derive(Default)]
struct Table {
    locals: Vec<Local>,
    peers: Vec<Peer>,
    /// Inner destination (a peer's tunnel address) -> peer.
    by_tunnel: HashMap<Ipv4Addr, usize>,
    /// boringtun index (receiver index >> 8) -> (peer, tunnel).
    by_index: HashMap<u32, (usize, usize)>,
    /// (peer key, local key number) -> (peer, tunnel), for initiations.
    by_key: HashMap<(PublicKey, usize), (usize, usize)>,
}

struct Shared {
    stop: AtomicBool,
    table: RwLock<Arc<Table>>,
    udp: Udp,
    tun: Tun,
    /// Readable once `stop` is set: wakes the data threads out of poll(2).
    wake: tun::Wake,
    drops: DropCounters,
}

pub(crate) struct Engine {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Serialises `apply` calls (the table swap is a read-modify-write).
    apply_lock: Mutex<()>,
}

impl Engine {
    /// Opens the TUN device and the socket in the calling thread's namespace and
    /// starts the threads. The caller configures the link (address, MTU, up).
    pub(crate) fn start(cfg: &DeviceConfig) -> Result<Engine, WgError> {
        let tun = tun::open(&cfg.name)?;
        let udp = bind(cfg.listen_port)?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            table: RwLock::new(Arc::new(Table::default())),
            udp: Udp::new(udp),
            tun,
            wake: tun::Wake::new()?,
            drops: DropCounters::default(),
        });
        let mut engine = Engine {
            shared,
            threads: Vec::new(),
            apply_lock: Mutex::new(()),
        };
        engine.apply(cfg);
        for (name, body) in [
            ("wg-tun-rx", tun_to_udp as fn(Arc<Shared>)),
            ("wg-udp-rx", udp_to_tun),
            ("wg-timers", timers),
        ] {
            let shared = engine.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || body(shared));
            match spawned {
                Ok(handle) => engine.threads.push(handle),
                Err(e) => {
                    engine.stop();
                    return Err(WgError::Io(e));
                }
            }
        }
        Ok(engine)
    }

    /// Applies the peers and keys of `cfg` in place: unchanged tunnels keep their
    /// sessions; new tunnels of the current key initiate a handshake at once.
    pub(crate) fn apply(&self, cfg: &DeviceConfig) {
        let _serial = self.apply_lock.lock();
        let old = self.shared.table.read().clone();
        let mut running = BTreeMap::new();
        let mut old_tunnels = HashMap::new();
        let mut old_counters: HashMap<PublicKey, Arc<PeerCounters>> = HashMap::new();
        let mut counters_by_tunnel: HashMap<Ipv4Addr, Arc<PeerCounters>> = HashMap::new();
        let mut old_endpoints: HashMap<PublicKey, Arc<Endpoint>> = HashMap::new();
        let mut endpoints_by_tunnel: HashMap<Ipv4Addr, Arc<Endpoint>> = HashMap::new();
        for peer in &old.peers {
            old_counters.insert(peer.cfg.public_key, peer.counters.clone());
            counters_by_tunnel.insert(peer.cfg.tunnel, peer.counters.clone());
            old_endpoints.insert(peer.cfg.public_key, peer.endpoint.clone());
            endpoints_by_tunnel.insert(peer.cfg.tunnel, peer.endpoint.clone());
            for t in &peer.tunnels {
                running.insert(t.key, t.params);
                old_tunnels.insert(t.key, (t.clone(), peer.counters.clone()));
            }
        }
        let plan = plan(&running, cfg);
        let initiate: Vec<TunnelKey> = plan
            .create
            .iter()
            .filter(|(_, _, initiate)| *initiate)
            .map(|(key, _, _)| *key)
            .collect();
        // Tunnels dropped: their bytes stay in the peer's totals.
        for key in &plan.drop {
            if let Some((t, counters)) = old_tunnels.get(key) {
                let (_, tx, rx, _, _) = t.tunn.lock().stats();
                counters.tx_retired.fetch_add(tx as u64, Ordering::Relaxed);
                counters.rx_retired.fetch_add(rx as u64, Ordering::Relaxed);
            }
        }
        let mut used_indices: std::collections::HashSet<u32> = plan
            .keep
            .iter()
            .filter_map(|k| old_tunnels.get(k).map(|(t, _)| t.index))
            .collect();
        let keep: std::collections::HashSet<TunnelKey> = plan.keep.iter().copied().collect();
        let locals: Vec<Local> = cfg.keys.iter().map(local_of).collect();
        let mut table = Table {
            locals,
            ..Table::default()
        };
        for peer_cfg in &cfg.peers {
            let peer_index = table.peers.len();
            let counters = old_counters
                .get(&peer_cfg.public_key)
                .or_else(|| counters_by_tunnel.get(&peer_cfg.tunnel))
                .cloned()
                .unwrap_or_default();
            // The same configured endpoint keeps what roaming learned.
            let endpoint = old_endpoints
                .get(&peer_cfg.public_key)
                .or_else(|| endpoints_by_tunnel.get(&peer_cfg.tunnel))
                .filter(|e| e.configured == peer_cfg.endpoint)
                .cloned()
                .unwrap_or_else(|| Arc::new(Endpoint::new(peer_cfg.endpoint)));
            let mut tunnels = Vec::with_capacity(cfg.keys.len());
            for (local_index, (key, local)) in cfg.keys.iter().zip(&table.locals).enumerate() {
                let tkey = TunnelKey {
                    peer: peer_cfg.public_key,
                    local: local.public,
                };
                let tunnel = match old_tunnels.get(&tkey) {
                    Some((t, _)) if keep.contains(&tkey) => t.clone(),
                    _ => {
                        let index = fresh_index(&mut used_indices);
                        let params = TunnelParams {
                            keepalive: peer_cfg.keepalive,
                        };
                        Arc::new(Tunnel {
                            key: tkey,
                            params,
                            index,
                            tunn: Mutex::new(Tunn::new(
                                key.secret(),
                                x25519::PublicKey::from(peer_cfg.public_key.0),
                                None,
                                peer_cfg.keepalive,
                                index,
                                None,
                            )),
                        })
                    }
                };
                table
                    .by_index
                    .insert(tunnel.index, (peer_index, tunnels.len()));
                table.by_key.insert(
                    (peer_cfg.public_key, local_index),
                    (peer_index, tunnels.len()),
                );
                tunnels.push(tunnel);
            }
            table.by_tunnel.insert(peer_cfg.tunnel, peer_index);
            table.peers.push(Peer {
                cfg: peer_cfg.clone(),
                endpoint,
                tunnels,
                counters,
            });
        }
        let table = Arc::new(table);
        *self.shared.table.write() = table.clone();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        for peer in &table.peers {
            for t in &peer.tunnels {
                if initiate.contains(&t.key) {
                    let mut tunn = t.tunn.lock();
                    if let TunnResult::WriteToNetwork(p) =
                        tunn.format_handshake_initiation(&mut buf, false)
                    {
                        self.shared.udp.send(p, peer.endpoint.addr());
                    }
                }
            }
        }
    }

    pub(crate) fn stats(&self) -> Vec<PeerStats> {
        let table = self.shared.table.read().clone();
        table
            .peers
            .iter()
            .map(|peer| {
                let mut rx = peer.counters.rx_retired.load(Ordering::Relaxed);
                let mut tx = peer.counters.tx_retired.load(Ordering::Relaxed);
                let mut newest: Option<(Duration, PublicKey)> = None;
                for t in &peer.tunnels {
                    let (age, t_tx, t_rx, _, _) = t.tunn.lock().stats();
                    rx += t_rx as u64;
                    tx += t_tx as u64;
                    if let Some(age) = age {
                        if newest.is_none_or(|(best, _)| age < best) {
                            newest = Some((age, t.key.local));
                        }
                    }
                }
                PeerStats {
                    public_key: peer.cfg.public_key,
                    tunnel: peer.cfg.tunnel,
                    endpoint: peer.endpoint.get(),
                    last_handshake: newest.map(|(age, _)| age),
                    rx_bytes: rx,
                    tx_bytes: tx,
                    session_key: newest.map(|(_, key)| key),
                    roams: peer.counters.roams.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    pub(crate) fn drops(&self) -> Drops {
        let d = &self.shared.drops;
        Drops {
            bad_source: d.bad_source.load(Ordering::Relaxed),
            no_peer: d.no_peer.load(Ordering::Relaxed),
            invalid: d.invalid.load(Ordering::Relaxed),
        }
    }

    /// Stops the threads and waits for them (at most one poll period).
    pub(crate) fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.wake();
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Threads not joined by `close` see the flag and exit on their own.
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.wake();
    }
}

fn local_of(key: &PrivateKey) -> Local {
    let secret = key.secret();
    let x_public = x25519::PublicKey::from(&secret);
    Local {
        public: PublicKey(x_public.to_bytes()),
        limiter: Arc::new(RateLimiter::new(&x_public, HANDSHAKE_RATE_LIMIT)),
        x_public,
        secret,
    }
}

/// A random 24-bit index no live tunnel uses.
fn fresh_index(used: &mut std::collections::HashSet<u32>) -> u32 {
    loop {
        let mut b = [0u8; 4];
        crate::key::fill_random(&mut b);
        let index = u32::from_ne_bytes(b) & 0x00ff_ffff;
        if used.insert(index) {
            return index;
        }
    }
}

fn bind(port: u16) -> Result<UdpSocket, WgError> {
    let udp = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).map_err(|e| {
        WgError::Io(io::Error::new(
            e.kind(),
            format!("cannot bind the WireGuard UDP port {port} (VROUTER_WG_PORT): {e}"),
        ))
    })?;
    udp.set_nonblocking(true)?;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // Best effort: the kernel caps it at net.core.[rw]mem_max.
        // SAFETY: a valid int option on a valid socket.
        unsafe {
            libc::setsockopt(
                udp.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&SOCKET_BUFFER as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    Ok(udp)
}

impl Table {
    /// The tunnel to send on: the one with the newest usable session, else the
    /// current key's.
    fn sending_tunnel<'a>(&self, peer: &'a Peer) -> &'a Tunnel {
        if peer.tunnels.len() > 1 {
            let mut best: Option<(Duration, &Tunnel)> = None;
            for t in &peer.tunnels {
                if let Some(age) = t.tunn.lock().time_since_last_handshake() {
                    if best.is_none_or(|(b, _)| age < b) {
                        best = Some((age, t));
                    }
                }
            }
            if let Some((_, t)) = best {
                return t;
            }
        }
        &peer.tunnels[0]
    }
}

/// Encrypted datagrams waiting to leave in one send: all to one peer, all of one
/// size but the last (the shape UDP segmentation offload takes).
struct Batch {
    buf: Vec<u8>,
    len: usize,
    segment: usize,
    count: usize,
    to: SocketAddr,
    /// A shorter datagram ended the run.
    closed: bool,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            buf: vec![0u8; MAX_GSO_BYTES + MAX_DATAGRAM],
            len: 0,
            segment: 0,
            count: 0,
            to: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
            closed: false,
        }
    }

    fn flush(&mut self, udp: &Udp) {
        if self.count > 0 {
            udp.send_segments(&self.buf[..self.len], self.segment, self.to);
        }
        self.len = 0;
        self.count = 0;
        self.closed = false;
    }

    /// Takes the datagram just written at `buf[len..len + n]` into the run, sending
    /// the run first if it does not fit.
    fn commit(&mut self, udp: &Udp, n: usize, to: SocketAddr) {
        let fits = self.count == 0
            || (self.to == to
                && !self.closed
                && n <= self.segment
                && self.count < MAX_SEGMENTS
                && self.len + n <= MAX_GSO_BYTES);
        if !fits {
            udp.send_segments(&self.buf[..self.len], self.segment, self.to);
            self.buf.copy_within(self.len..self.len + n, 0);
            self.len = 0;
            self.count = 0;
            self.closed = false;
        }
        if self.count == 0 {
            self.segment = n;
            self.to = to;
        }
        self.len += n;
        self.count += 1;
        if n < self.segment {
            self.closed = true;
        }
        if self.len >= MAX_GSO_BYTES || self.count >= MAX_SEGMENTS {
            self.flush(udp);
        }
    }
}

/// TUN -> encrypt -> UDP. Packets read back to back leave as one batch when the TUN
/// queue runs dry (or the batch is full), so a busy tunnel pays one send per batch.
fn tun_to_udp(shared: Arc<Shared>) {
    let mut packet = vec![0u8; MAX_PACKET];
    let mut batch = Batch::new();
    let mut table = shared.table.read().clone();
    while !shared.stop.load(Ordering::Relaxed) {
        let n = match shared.tun.recv(&mut packet) {
            Ok(Some(n)) => n,
            Ok(None) => {
                batch.flush(&shared.udp);
                tun::wait_readable(shared.tun.raw_fd(), &shared.wake, POLL_MS);
                table = shared.table.read().clone();
                continue;
            }
            Err(e) => {
                batch.flush(&shared.udp);
                tracing::warn!(error = %e, "wireguard: reading the TUN device failed");
                std::thread::sleep(Duration::from_millis(POLL_MS as u64));
                continue;
            }
        };
        // Pick up a new table without a lock round-trip per packet when none changed.
        if let Some(current) = shared.table.try_read() {
            if !Arc::ptr_eq(&current, &table) {
                table = current.clone();
            }
        }
        let packet = &packet[..n];
        let Some(dst) = ipv4_destination(packet) else {
            shared.drops.no_peer.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Some(&peer_index) = table.by_tunnel.get(&dst) else {
            shared.drops.no_peer.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let peer = &table.peers[peer_index];
        let tunnel = table.sending_tunnel(peer);
        let mut tunn = tunnel.tunn.lock();
        let start = batch.len;
        let written = match tunn.encapsulate(packet, &mut batch.buf[start..]) {
            TunnResult::WriteToNetwork(datagram) => Some((datagram.len(), datagram[0] == 4)),
            TunnResult::Err(e) => {
                tracing::debug!(error = ?e, "wireguard: encapsulate failed");
                None
            }
            _ => None,
        };
        drop(tunn);
        match written {
            Some((len, true)) => batch.commit(&shared.udp, len, peer.endpoint.addr()),
            // A handshake initiation (no session yet): at once, outside the run.
            Some((len, false)) => shared
                .udp
                .send(&batch.buf[start..start + len], peer.endpoint.addr()),
            None => {}
        }
    }
    batch.flush(&shared.udp);
}

/// UDP -> decrypt -> TUN. With UDP GRO one receive may carry a run of datagrams.
fn udp_to_tun(shared: Arc<Shared>) {
    let mut datagram = vec![0u8; MAX_DATAGRAM];
    let mut out = vec![0u8; MAX_DATAGRAM];
    let mut table = shared.table.read().clone();
    while !shared.stop.load(Ordering::Relaxed) {
        let got = match shared.udp.recv(&mut datagram) {
            Ok(got) => got,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                tun::wait_readable(shared.udp.sock.as_raw_fd(), &shared.wake, POLL_MS);
                table = shared.table.read().clone();
                continue;
            }
            Err(e) => {
                // ICMP errors of earlier sends surface here (ECONNREFUSED): not fatal.
                tracing::trace!(error = %e, "wireguard: udp receive");
                continue;
            }
        };
        if let Some(current) = shared.table.try_read() {
            if !Arc::ptr_eq(&current, &table) {
                table = current.clone();
            }
        }
        if got.len == 0 {
            shared.drops.invalid.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let segment = got.segment.max(1);
        for one in datagram[..got.len].chunks(segment) {
            receive(&shared, &table, one, got.from, &mut out);
        }
    }
}

/// Handles one datagram from the network. Anything it cannot authenticate is
/// dropped; nothing here allocates per datagram or trusts a length it did not check.
fn receive(shared: &Shared, table: &Table, datagram: &[u8], from: SocketAddr, out: &mut [u8]) {
    let invalid = || {
        shared.drops.invalid.fetch_add(1, Ordering::Relaxed);
    };
    let Ok(packet) = Tunn::parse_incoming_packet(datagram) else {
        return invalid();
    };
    let found = match packet {
        Packet::HandshakeInit(ref init) => {
            let mut found = None;
            for (local_index, local) in table.locals.iter().enumerate() {
                match local.limiter.verify_packet(Some(from.ip()), datagram, out) {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        shared.udp.send(cookie, from);
                        return;
                    }
                    // mac1 is for another of our keys (or for none).
                    Err(_) => continue,
                }
                found = parse_handshake_anon(&local.secret, &local.x_public, init)
                    .ok()
                    .and_then(|half| {
                        table
                            .by_key
                            .get(&(PublicKey(half.peer_static_public), local_index))
                            .copied()
                    });
                break;
            }
            found
        }
        Packet::HandshakeResponse(ref p) => table.by_index.get(&(p.receiver_idx >> 8)).copied(),
        Packet::PacketCookieReply(ref p) => table.by_index.get(&(p.receiver_idx >> 8)).copied(),
        Packet::PacketData(ref p) => table.by_index.get(&(p.receiver_idx >> 8)).copied(),
    };
    let Some((peer_index, tunnel_index)) = found else {
        return invalid();
    };
    // Handshake messages and data roam; cookie replies do not (WireGuard's rule).
    let may_roam = !matches!(packet, Packet::PacketCookieReply(_));
    let peer = &table.peers[peer_index];
    let tunnel = &peer.tunnels[tunnel_index];
    let mut tunn = tunnel.tunn.lock();
    let mut result = tunn.decapsulate(Some(from.ip()), datagram, out);
    if may_roam && authenticated(&result) {
        if let SocketAddr::V4(from) = from {
            if peer.endpoint.roam(from) {
                peer.counters.roams.fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = %peer.cfg.public_key, endpoint = %from, "wireguard: peer roamed to a new endpoint");
            }
        }
    }
    // A handshake answer may be followed by queued packets: repeat with an empty
    // datagram until boringtun says Done (bounded by its 256-packet queue).
    loop {
        match result {
            TunnResult::WriteToNetwork(reply) => {
                shared.udp.send(reply, peer.endpoint.addr());
                result = tunn.decapsulate(None, &[], out);
            }
            TunnResult::WriteToTunnelV4(inner, source) => {
                // The TUN write runs the receiving stack inline: not under the lock
                // the sending thread needs for this peer.
                drop(tunn);
                if source == peer.cfg.tunnel {
                    if let Err(e) = shared.tun.send(inner) {
                        tracing::debug!(error = %e, "wireguard: writing the TUN device failed");
                    }
                } else {
                    shared.drops.bad_source.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            TunnResult::WriteToTunnelV6(..) => {
                shared.drops.bad_source.fetch_add(1, Ordering::Relaxed);
                return;
            }
            TunnResult::Err(e) => {
                tracing::trace!(error = ?e, "wireguard: datagram dropped");
                return invalid();
            }
            TunnResult::Done => return,
        }
    }
}

/// Protocol timers: handshake retries, rekeys, keepalives.
fn timers(shared: Arc<Shared>) {
    let mut out = vec![0u8; MAX_DATAGRAM];
    let mut next = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        next += TICK;
        let now = Instant::now();
        if next > now {
            // A negative descriptor is ignored by poll(2): this waits for stop only.
            let ms = (next - now).as_millis().min(1000) as i32;
            tun::wait_readable(-1, &shared.wake, ms);
        } else {
            next = now;
        }
        let table = shared.table.read().clone();
        for local in &table.locals {
            local.limiter.reset_count();
        }
        for peer in &table.peers {
            for t in &peer.tunnels {
                let mut tunn = t.tunn.lock();
                if let TunnResult::WriteToNetwork(p) = tunn.update_timers(&mut out) {
                    shared.udp.send(p, peer.endpoint.addr());
                }
            }
        }
    }
}

/// Whether `decapsulate`'s first result shows the datagram authenticated as the
/// peer's: decrypted data (a keepalive is `Done`), or a handshake answered with a
/// response or a keepalive. A cookie reply (message type 3: boringtun's own rate
/// limiter under load) and errors prove nothing.
fn authenticated(result: &TunnResult<'_>) -> bool {
    match result {
        TunnResult::WriteToNetwork(p) => p.first().is_some_and(|t| *t != 3),
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) | TunnResult::Done => {
            true
        }
        TunnResult::Err(_) => false,
    }
}

fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[16], packet[17], packet[18], packet[19],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receiver() -> (UdpSocket, SocketAddr) {
        let r = UdpSocket::bind("127.0.0.1:0").unwrap();
        r.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let addr = r.local_addr().unwrap();
        (r, addr)
    }

    fn datagrams(r: &UdpSocket) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65_536];
        r.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        while let Ok(n) = r.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    /// Writes a datagram of `len` bytes of `fill` where `encapsulate` would, and commits it.
    fn push(batch: &mut Batch, udp: &Udp, len: usize, fill: u8, to: SocketAddr) {
        let start = batch.len;
        batch.buf[start..start + len].fill(fill);
        batch.commit(udp, len, to);
    }

    #[test]
    fn batches_leave_as_the_same_datagrams_in_order() {
        let udp = Udp::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let (r1, a1) = receiver();
        let (r2, a2) = receiver();
        let mut batch = Batch::new();
        // A run of equal sizes, a shorter one that ends it, then a new run.
        for i in 0..5 {
            push(&mut batch, &udp, 1000, i, a1);
        }
        push(&mut batch, &udp, 300, 5, a1);
        push(&mut batch, &udp, 1000, 6, a1);
        // Another peer: the run to the first is sent first.
        push(&mut batch, &udp, 800, 7, a2);
        // A larger datagram than the run's size starts a new run.
        push(&mut batch, &udp, 900, 8, a2);
        batch.flush(&udp);
        let got1 = datagrams(&r1);
        let want1: Vec<Vec<u8>> = (0..5)
            .map(|i| vec![i; 1000])
            .chain([vec![5; 300], vec![6; 1000]])
            .collect();
        assert_eq!(got1, want1);
        assert_eq!(datagrams(&r2), vec![vec![7; 800], vec![8; 900]]);
    }

    #[test]
    fn a_full_batch_is_sent_without_waiting() {
        let udp = Udp::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let (r, a) = receiver();
        let mut batch = Batch::new();
        for i in 0..MAX_SEGMENTS {
            push(&mut batch, &udp, 100, i as u8, a);
        }
        // Sent on the 64th datagram, before any flush.
        assert_eq!(batch.count, 0);
        let got = datagrams(&r);
        assert_eq!(got.len(), MAX_SEGMENTS);
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, d)| d == &vec![i as u8; 100]));
    }

    #[test]
    fn gro_runs_are_split_back_into_datagrams() {
        // A GSO send to a GRO socket on loopback arrives as one run.
        let tx = Udp::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let rx = Udp::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        rx.sock
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let to = rx.sock.local_addr().unwrap();
        let mut run: Vec<u8> = (0..10u8).flat_map(|i| [i; 1200]).collect();
        run.extend_from_slice(&[99; 10]);
        tx.send_segments(&run, 1200, to);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut seen = Vec::new();
        let mut runs = 0;
        while seen.len() < 11 {
            let got = rx.recv(&mut buf).expect("receive");
            if got.segment < got.len {
                runs += 1;
            }
            for one in buf[..got.len].chunks(got.segment.max(1)) {
                seen.push(one.to_vec());
            }
        }
        let want: Vec<Vec<u8>> = (0..10u8)
            .map(|i| vec![i; 1200])
            .chain([vec![99; 10]])
            .collect();
        assert_eq!(seen, want);
        assert!(runs > 0, "no run of datagrams arrived in one receive");
    }

    #[test]
    fn endpoints_pack_and_roam() {
        let a = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 51820);
        let b = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 255), 65535);
        assert_eq!(unpack(pack(a)), a);
        assert_eq!(unpack(pack(b)), b);
        let e = Endpoint::new(a);
        assert_eq!(e.get(), a);
        assert!(!e.roam(a), "the same source is no roam");
        assert!(e.roam(b));
        assert_eq!(e.get(), b);
        assert_eq!(e.configured, a);
    }

    #[test]
    fn only_answers_and_decrypted_data_authenticate() {
        let mut response = [2u8, 0, 0, 0];
        let mut cookie = [3u8, 0, 0, 0];
        let mut inner = [0x45u8; 20];
        assert!(authenticated(&TunnResult::WriteToNetwork(&mut response)));
        assert!(!authenticated(&TunnResult::WriteToNetwork(&mut cookie)));
        assert!(!authenticated(&TunnResult::WriteToNetwork(&mut [])));
        assert!(authenticated(&TunnResult::Done));
        assert!(authenticated(&TunnResult::WriteToTunnelV4(
            &mut inner,
            Ipv4Addr::new(10, 255, 0, 2)
        )));
        assert!(!authenticated(&TunnResult::Err(
            boringtun::noise::errors::WireGuardError::InvalidMac
        )));
    }

    #[test]
    fn ipv4_destination_needs_a_whole_header() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&[10, 255, 0, 2]);
        assert_eq!(ipv4_destination(&p), Some(Ipv4Addr::new(10, 255, 0, 2)));
        assert_eq!(ipv4_destination(&p[..19]), None);
        p[0] = 0x60;
        assert_eq!(ipv4_destination(&p), None);
        assert_eq!(ipv4_destination(&[]), None);
    }
}
