//! Root tests of the userspace WireGuard engine: two simulated hosts (namespaces on
//! the harness's underlay), one engine in each, real traffic through the tunnel.
//! Needs root and the `vrt-probe` binary (`cargo build -p vrouter-tests --bins`).
//! Names come from VROUTER_TEST_PREFIX; the topology removes its namespaces (and the
//! TUN devices in them) on drop, even when a test panics.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use vrouter_tests::{ping_burst, require_root, Topology};
use vrouter_wg::{BackendChoice, BackendKind, DeviceConfig, PeerConfig, PrivateKey, Wg, WgError};

const PORT: u16 = 51820;
const DEVICE: &str = "vrouter-wg";

/// A tokio runtime whose every thread (workers and blocking pool) lives in one
/// network namespace, so sockets, the TUN device and netlink handles opened on it
/// belong there.
struct NsRuntime {
    ns: String,
    rt: tokio::runtime::Runtime,
}

impl NsRuntime {
    fn new(ns: &str) -> NsRuntime {
        let path = format!("/run/netns/{ns}");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .on_thread_start(move || {
                let f = std::fs::File::open(&path).expect("netns file");
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            })
            .build()
            .expect("runtime");
        NsRuntime {
            ns: ns.to_string(),
            rt,
        }
    }

    /// Runs `f` on the namespace's worker thread and waits for it.
    fn run<F>(&self, f: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt.block_on(self.rt.spawn(f)).expect("task panicked")
    }

    /// Runs blocking `f` on a thread of the namespace.
    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.rt.spawn_blocking(f)
    }

    fn open(&self, cfg: &DeviceConfig) -> Result<Wg, WgError> {
        let cfg = cfg.clone();
        self.run(async move { Wg::open(&cfg, BackendChoice::Userspace).await })
    }

    fn apply(&self, wg: Wg, cfg: &DeviceConfig) -> Wg {
        let cfg = cfg.clone();
        self.run(async move {
            wg.apply(&cfg).await.expect("apply");
            wg
        })
    }

    fn close(&self, wg: Wg) {
        self.run(wg.close());
    }

    fn link_index(&self) -> Option<u32> {
        self.run(async {
            let k = vrouter_kernel::Kernel::connect().await.unwrap();
            k.link_by_name(DEVICE).await.unwrap().map(|l| l.index)
        })
    }
}

struct Side {
    host: Ipv4Addr,
    tunnel: Ipv4Addr,
    key: PrivateKey,
}

fn tunnel_of(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 255, 0, i)
}

fn side(topo: &Topology, i: usize) -> Side {
    Side {
        host: topo.host(i).underlay_ip,
        tunnel: tunnel_of(i as u8),
        key: PrivateKey::generate(),
    }
}

fn peer_of(s: &Side) -> PeerConfig {
    PeerConfig {
        public_key: s.key.public_key(),
        endpoint: SocketAddrV4::new(s.host, PORT),
        tunnel: s.tunnel,
        keepalive: Some(25),
    }
}

fn config(me: &Side, keys: Vec<PrivateKey>, peers: Vec<PeerConfig>) -> DeviceConfig {
    DeviceConfig {
        name: DEVICE.into(),
        keys,
        listen_port: PORT,
        address: me.tunnel,
        prefix_len: 16,
        mtu: 1420,
        peers,
    }
}

/// Pings every 10 ms for `count` pings; returns (sent, received).
fn pings(ns: &str, to: Ipv4Addr, count: u32) -> (u32, u32) {
    let timeout = Duration::from_millis(10 * count as u64 + 2000);
    ping_burst(
        ns,
        &to.to_string(),
        count,
        Duration::from_millis(10),
        timeout,
    )
    .expect("ping")
}

fn wait_for_ping(ns: &str, to: Ipv4Addr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, got) = pings(ns, to, 5);
        if got > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no ping {ns} -> {to} within 10 s"
        );
    }
}

/// Sends `bytes` over TCP from `from` to `to:port` (a listener in `to_rt`); returns
/// the bytes received and the time it took.
fn tcp_transfer(
    from_rt: &NsRuntime,
    to_rt: &NsRuntime,
    to: Ipv4Addr,
    port: u16,
    bytes: usize,
) -> (usize, Duration) {
    let listener = to_rt.blocking(move || TcpListener::bind((to, port)).expect("bind"));
    let listener = to_rt.rt.block_on(listener).unwrap();
    let server = to_rt.blocking(move || {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("accept: {e}"),
            }
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    let client = from_rt.blocking(move || {
        let start = Instant::now();
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_secs(5))
                .expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let chunk = vec![0x5au8; 1 << 16];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n]).expect("write");
            left -= n;
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut end = [0u8; 1];
        let _ = s.read(&mut end);
        start.elapsed()
    });
    let received = to_rt.rt.block_on(server).unwrap();
    let took = from_rt.rt.block_on(client).unwrap();
    (received, took)
}

/// Two hosts with an engine each, peered; waits until the tunnel carries pings.
struct Pair {
    _topo: Topology,
    a: Side,
    b: Side,
    rt_a: NsRuntime,
    rt_b: NsRuntime,
    wg_a: Option<Wg>,
    wg_b: Option<Wg>,
}

impl Pair {
    fn new(test: &str) -> Pair {
        let topo = Topology::builder(test).hosts(2).build().expect("topology");
        let (a, b) = (side(&topo, 1), side(&topo, 2));
        let rt_a = NsRuntime::new(&topo.host(1).ns);
        let rt_b = NsRuntime::new(&topo.host(2).ns);
        let wg_a = rt_a
            .open(&config(&a, vec![a.key.clone()], vec![peer_of(&b)]))
            .expect("open a");
        let wg_b = rt_b
            .open(&config(&b, vec![b.key.clone()], vec![peer_of(&a)]))
            .expect("open b");
        assert_eq!(wg_a.kind(), BackendKind::Userspace);
        wait_for_ping(&rt_b.ns, a.tunnel);
        Pair {
            _topo: topo,
            a,
            b,
            rt_a,
            rt_b,
            wg_a: Some(wg_a),
            wg_b: Some(wg_b),
        }
    }
    fn wg_a(&self) -> &Wg {
        self.wg_a.as_ref().unwrap()
    }
    fn wg_b(&self) -> &Wg {
        self.wg_b.as_ref().unwrap()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Stop the threads before the namespaces go (the topology drops after this).
        if let Some(wg) = self.wg_a.take() {
            self.rt_a.close(wg);
        }
        if let Some(wg) = self.wg_b.take() {
            self.rt_b.close(wg);
        }
    }
}

#[test]
fn tunnel_carries_ping_and_tcp() {
    if !require_root() {
        return;
    }
    let p = Pair::new("wg_tunnel");
    let (sent, got) = pings(&p.rt_a.ns, p.b.tunnel, 20);
    assert_eq!((sent, got), (20, 20), "pings a -> b over the tunnel");
    let (received, took) = tcp_transfer(&p.rt_a, &p.rt_b, p.b.tunnel, 5001, 4 << 20);
    assert_eq!(received, 4 << 20);
    eprintln!("4 MiB over the tunnel in {took:?}");
    let stats = p.wg_a().stats();
    assert_eq!(stats.len(), 1);
    let s = &stats[0];
    assert_eq!(s.public_key, p.b.key.public_key());
    assert!(s.tx_bytes >= 4 << 20, "{s:?}");
    assert!(s.rx_bytes > 0, "{s:?}");
    assert!(
        s.last_handshake
            .is_some_and(|age| age < Duration::from_secs(30)),
        "{s:?}"
    );
    assert_eq!(s.session_key, Some(p.a.key.public_key()), "{s:?}");
    // The underlay carries WireGuard only: the peer's stats agree.
    let sb = &p.wg_b().stats()[0];
    assert!(sb.rx_bytes >= 4 << 20, "{sb:?}");
}

#[test]
fn cryptokey_routing_drops_non_peers_and_spoofed_sources() {
    if !require_root() {
        return;
    }
    let p = Pair::new("wg_cryptokey");
    // A destination in the tunnel range that no peer has: dropped, counted.
    let before = p.wg_a().drops();
    let (_, got) = pings(&p.rt_a.ns, tunnel_of(9), 5);
    assert_eq!(got, 0);
    assert!(
        p.wg_a().drops().no_peer >= before.no_peer + 5,
        "{:?}",
        p.wg_a().drops()
    );

    // B sends from a second address that is not its tunnel address: A drops it after
    // decrypting; from its tunnel address the same datagram arrives.
    let spoofed = Ipv4Addr::new(10, 255, 0, 77);
    p.rt_b.run(async move {
        let k = vrouter_kernel::Kernel::connect().await.unwrap();
        let link = k.link_by_name(DEVICE).await.unwrap().unwrap();
        k.replace_address(link.index, spoofed, 32).await.unwrap();
    });
    let a_tunnel = p.a.tunnel;
    let sink = p
        .rt_a
        .rt
        .block_on(p.rt_a.blocking(move || {
            let s = UdpSocket::bind((a_tunnel, 6000)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            s
        }))
        .unwrap();
    let send_from = |src: Ipv4Addr| {
        p.rt_b
            .rt
            .block_on(p.rt_b.blocking(move || {
                let s = UdpSocket::bind((src, 0)).unwrap();
                for _ in 0..3 {
                    s.send_to(src.to_string().as_bytes(), (a_tunnel, 6000))
                        .unwrap();
                }
            }))
            .unwrap()
    };
    let bad_before = p.wg_a().drops().bad_source;
    send_from(spoofed);
    let mut buf = [0u8; 64];
    let got = sink.recv_from(&mut buf);
    assert!(
        got.is_err(),
        "a spoofed inner source was delivered: {got:?}"
    );
    assert_eq!(p.wg_a().drops().bad_source, bad_before + 3);
    send_from(p.b.tunnel);
    let (n, from) = sink
        .recv_from(&mut buf)
        .expect("the real source is delivered");
    assert_eq!(&buf[..n], p.b.tunnel.to_string().as_bytes());
    assert_eq!(from.ip(), p.b.tunnel);
}

#[test]
fn hostile_datagrams_are_dropped_and_the_tunnel_survives() {
    if !require_root() {
        return;
    }
    let p = Pair::new("wg_hostile");
    let target = SocketAddr::from((p.a.host, PORT));
    let invalid_before = p.wg_a().drops().invalid;
    let sent = p
        .rt_b
        .rt
        .block_on(p.rt_b.blocking(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            let mut state = 0x1234_5678_9abc_def0u64;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let mut sent = 0u64;
            // Every message type at its exact and nearby lengths, random bodies; data
            // messages naming random receiver indices; empty and huge datagrams.
            for kind in 0u8..6 {
                for len in [
                    0usize, 1, 3, 4, 16, 31, 32, 33, 63, 64, 65, 91, 92, 93, 147, 148, 149, 1500,
                    9000,
                ] {
                    let mut d: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                    if len >= 4 {
                        d[..4].copy_from_slice(&u32::from(kind).to_le_bytes());
                    }
                    if s.send_to(&d, target).is_ok() {
                        sent += 1;
                    }
                }
            }
            sent
        }))
        .unwrap();
    assert!(sent > 100);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        p.wg_a().drops().invalid >= invalid_before + sent - 5,
        "{:?}",
        p.wg_a().drops()
    );
    let (_, got) = pings(&p.rt_b.ns, p.a.tunnel, 10);
    assert_eq!(got, 10, "the tunnel still works");
}

#[test]
fn key_rotation_keeps_traffic_flowing() {
    if !require_root() {
        return;
    }
    let mut p = Pair::new("wg_rotation");
    let next = PrivateKey::generate();
    let ns_b = p.rt_b.ns.clone();
    let a_tunnel = p.a.tunnel;
    // 10 ms pings from B to A for 4 s while A rotates its key.
    let pinger = std::thread::spawn(move || pings(&ns_b, a_tunnel, 400));
    std::thread::sleep(Duration::from_millis(800));
    // A announces the next key: its engine accepts both.
    let during = config(
        &p.a,
        vec![p.a.key.clone(), next.clone()],
        vec![peer_of(&p.b)],
    );
    let wg_a = p.rt_a.apply(p.wg_a.take().unwrap(), &during);
    p.wg_a = Some(wg_a);
    std::thread::sleep(Duration::from_millis(500));
    // B switches its peer entry to A's next key (and dials it at once).
    let mut a_next = peer_of(&p.a);
    a_next.public_key = next.public_key();
    let b_cfg = config(&p.b, vec![p.b.key.clone()], vec![a_next]);
    let wg_b = p.rt_b.apply(p.wg_b.take().unwrap(), &b_cfg);
    p.wg_b = Some(wg_b);
    let (sent, got) = pinger.join().unwrap();
    let lost_ms = (sent - got) * 10;
    eprintln!("key rotation: {sent} pings every 10 ms, {got} answered, about {lost_ms} ms lost");
    assert!(lost_ms <= 1000, "rotation lost {lost_ms} ms of pings");
    // A's session with B now uses the next key: rotation can complete.
    let s = &p.wg_a().stats()[0];
    assert_eq!(s.session_key, Some(next.public_key()), "{s:?}");
    // Promotion: A drops the old key; traffic goes on.
    let after = config(&p.a, vec![next.clone()], vec![peer_of(&p.b)]);
    let wg_a = p.rt_a.apply(p.wg_a.take().unwrap(), &after);
    p.wg_a = Some(wg_a);
    let (sent, got) = pings(&p.rt_b.ns, p.a.tunnel, 100);
    eprintln!("after promotion: {got}/{sent}");
    assert!(sent - got <= 2, "after promotion {got}/{sent}");
}

#[test]
fn restart_adopts_the_persistent_tun_and_resumes() {
    if !require_root() {
        return;
    }
    let mut p = Pair::new("wg_restart");
    let index = p.rt_a.link_index().expect("device");
    let ns_b = p.rt_b.ns.clone();
    let a_tunnel = p.a.tunnel;
    let pinger = std::thread::spawn(move || pings(&ns_b, a_tunnel, 300));
    std::thread::sleep(Duration::from_millis(800));
    let cfg_a = config(&p.a, vec![p.a.key.clone()], vec![peer_of(&p.b)]);
    let t0 = Instant::now();
    p.rt_a.close(p.wg_a.take().unwrap());
    // The device outlives the engine.
    assert_eq!(p.rt_a.link_index(), Some(index));
    p.wg_a = Some(p.rt_a.open(&cfg_a).expect("reopen"));
    let reopen = t0.elapsed();
    assert_eq!(
        p.rt_a.link_index(),
        Some(index),
        "the same TUN device is adopted"
    );
    let (sent, got) = pinger.join().unwrap();
    let lost_ms = (sent - got) * 10;
    eprintln!(
        "engine restart: close+open took {reopen:?}; {sent} pings every 10 ms, {got} answered, about {lost_ms} ms lost"
    );
    assert!(lost_ms <= 1000, "restart paused traffic for {lost_ms} ms");
}

#[test]
fn auto_falls_back_to_userspace_and_destroy_removes_the_device() {
    if !require_root() {
        return;
    }
    let topo = Topology::builder("wg_auto")
        .hosts(1)
        .build()
        .expect("topology");
    let me = side(&topo, 1);
    let rt = NsRuntime::new(&topo.host(1).ns);
    let cfg = config(&me, vec![me.key.clone()], vec![]);
    let kernel_only = {
        let cfg = cfg.clone();
        rt.run(async move {
            Wg::open(&cfg, BackendChoice::Kernel)
                .await
                .map(|w| w.kind())
        })
    };
    let kernel_has_wg = std::path::Path::new("/sys/module/wireguard").exists();
    if kernel_has_wg {
        eprintln!("this kernel has WireGuard: Auto picks it");
    } else {
        assert!(
            matches!(kernel_only, Err(WgError::NoKernelWireGuard(_))),
            "{kernel_only:?}"
        );
    }
    let wg = {
        let cfg = cfg.clone();
        rt.run(async move { Wg::open(&cfg, BackendChoice::Auto).await })
            .expect("auto")
    };
    if !kernel_has_wg {
        assert_eq!(wg.kind(), BackendKind::Userspace);
    }
    let link = rt.run(async {
        let k = vrouter_kernel::Kernel::connect().await.unwrap();
        let l = k.link_by_name(DEVICE).await.unwrap().expect("device");
        let addrs = k.addresses().await.unwrap();
        (l, addrs)
    });
    assert!(link.0.up);
    assert_eq!(link.0.mtu, 1420);
    assert!(link
        .1
        .iter()
        .any(|a| a.index == link.0.index && a.addr == me.tunnel && a.prefix_len == 16));
    // A second engine on the same device (another discovery still running) is refused.
    let second = {
        let cfg = cfg.clone();
        rt.run(async move {
            Wg::open(&cfg, BackendChoice::Userspace)
                .await
                .map(|w| w.kind())
        })
    };
    let err = second
        .expect_err("a second engine on a busy TUN")
        .to_string();
    assert!(err.contains("in use by another process"), "{err}");
    // A new address and MTU replace the old ones in place.
    let mut moved = cfg.clone();
    moved.address = Ipv4Addr::new(10, 254, 0, 50);
    moved.prefix_len = 24;
    moved.mtu = 1400;
    let wg = rt.apply(wg, &moved);
    let (l, addrs) = rt.run(async {
        let k = vrouter_kernel::Kernel::connect().await.unwrap();
        let l = k.link_by_name(DEVICE).await.unwrap().expect("device");
        let addrs = k.addresses().await.unwrap();
        (l, addrs)
    });
    assert_eq!(l.mtu, 1400);
    let on_link: Vec<_> = addrs
        .iter()
        .filter(|a| a.index == l.index)
        .map(|a| (a.addr, a.prefix_len))
        .collect();
    assert_eq!(on_link, vec![(Ipv4Addr::new(10, 254, 0, 50), 24)]);
    rt.close(wg);
    rt.run(async { vrouter_wg::destroy(DEVICE).await })
        .expect("destroy");
    assert_eq!(rt.link_index(), None);
    rt.run(async { vrouter_wg::destroy(DEVICE).await })
        .expect("destroy is idempotent");
}

/// Sends as fast as it can for `duration` over TCP from `from_rt` to `to:port`;
/// returns Mbit/s as the receiver counted it.
fn tcp_blast(
    from_rt: &NsRuntime,
    to_rt: &NsRuntime,
    to: Ipv4Addr,
    port: u16,
    duration: Duration,
) -> f64 {
    let listener = to_rt
        .rt
        .block_on(to_rt.blocking(move || TcpListener::bind((to, port)).expect("bind")))
        .unwrap();
    let server = to_rt.blocking(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = vec![0u8; 1 << 18];
        let mut total = 0u64;
        let start = Instant::now();
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e6
    });
    let client = from_rt.blocking(move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_secs(5))
                .expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let chunk = vec![0x5au8; 1 << 18];
        let start = Instant::now();
        while start.elapsed() < duration {
            s.write_all(&chunk).expect("write");
        }
    });
    from_rt.rt.block_on(client).unwrap();
    to_rt.rt.block_on(server).unwrap()
}

/// Single-stream TCP throughput, plain underlay and through the engine, same run.
/// `cargo test --release -p vrouter-wg --test engine_root throughput -- --ignored --nocapture`
#[test]
#[ignore = "benchmark: run on an idle machine, in release"]
fn throughput() {
    if !require_root() {
        return;
    }
    let p = Pair::new("wg_throughput");
    let secs = std::env::var("WG_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5u64);
    let d = Duration::from_secs(secs);
    let plain = tcp_blast(&p.rt_a, &p.rt_b, p.b.host, 5101, d);
    let cpu_before = engine_cpu();
    let tx_before = p.wg_a().stats()[0].tx_bytes;
    let tunnel = tcp_blast(&p.rt_a, &p.rt_b, p.b.tunnel, 5102, d);
    let cpu = engine_cpu() - cpu_before;
    let gb = (p.wg_a().stats()[0].tx_bytes - tx_before) as f64 / 1e9;
    eprintln!(
        "tcp single stream, {secs} s: underlay {plain:.0} Mbit/s, wireguard engine {tunnel:.0} Mbit/s ({:.2} of underlay); \
         engine threads (both ends, kernel time included) {:.2} CPU s per GB",
        tunnel / plain,
        cpu / gb
    );
    assert!(tunnel > 0.0);
}

/// CPU seconds (user + system) of this process's engine threads (`wg-*`) so far.
fn engine_cpu() -> f64 {
    let ticks = 100.0; // USER_HZ
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        if !head.contains("(wg-") {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After "pid (comm) ": state is field 0, utime 11, stime 12.
        let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
        let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        total += utime + stime;
    }
    total as f64 / ticks
}

/// A host behind a NAT router: namespaces `<prefix>-nat` (on the underlay bridge at
/// `NAT_OUTSIDE`, `masquerade random` out of it) and `<prefix>-in` (10.77.0.2 behind
/// it). The outside cannot reach the inside except through mappings the inside's
/// packets open. Both namespaces go on drop.
struct NatSite {
    nat: String,
    inside: String,
}

const NAT_OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const INSIDE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

impl NatSite {
    fn new(topo: &Topology) -> NatSite {
        let p = vrouter_tests::prefix();
        let site = NatSite {
            nat: format!("{p}-nat"),
            inside: format!("{p}-in"),
        };
        let run = |ns: Option<&str>, args: &[&str]| {
            vrouter_tests::exec_ok(ns, args).unwrap_or_else(|e| panic!("{args:?}: {e:#}"));
        };
        for ns in [&site.nat, &site.inside] {
            run(None, &["ip", "netns", "add", ns]);
            run(Some(ns), &["ip", "link", "set", "lo", "up"]);
        }
        let (nat, inside) = (Some(site.nat.as_str()), Some(site.inside.as_str()));
        // The NAT's outside leg on the underlay bridge.
        let ul_leg = format!("{p}nat");
        run(
            None,
            &[
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                &site.nat,
                "type",
                "veth",
                "peer",
                "name",
                &ul_leg,
                "netns",
                &topo.underlay_ns,
            ],
        );
        run(
            Some(&topo.underlay_ns),
            &["ip", "link", "set", &ul_leg, "master", "br0", "up"],
        );
        run(
            nat,
            &[
                "ip",
                "addr",
                "add",
                &format!("{NAT_OUTSIDE}/24"),
                "dev",
                "eth0",
            ],
        );
        run(nat, &["ip", "link", "set", "eth0", "up"]);
        // The inside leg.
        run(
            None,
            &[
                "ip",
                "link",
                "add",
                "in0",
                "netns",
                &site.nat,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &site.inside,
            ],
        );
        run(nat, &["ip", "addr", "add", "10.77.0.1/24", "dev", "in0"]);
        run(nat, &["ip", "link", "set", "in0", "up"]);
        run(
            inside,
            &["ip", "addr", "add", &format!("{INSIDE}/24"), "dev", "eth0"],
        );
        run(inside, &["ip", "link", "set", "eth0", "up"]);
        run(
            inside,
            &["ip", "route", "add", "default", "via", "10.77.0.1"],
        );
        run(nat, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        // Short UDP mappings: only keepalives keep the inside reachable.
        for key in [
            "nf_conntrack_udp_timeout",
            "nf_conntrack_udp_timeout_stream",
        ] {
            run(
                nat,
                &["sysctl", "-q", "-w", &format!("net.netfilter.{key}=3")],
            );
        }
        let table = format!("{p}nat");
        run(nat, &["nft", "add", "table", "ip", &table]);
        run(
            nat,
            &[
                "nft",
                "add",
                "chain",
                "ip",
                &table,
                "post",
                "{ type nat hook postrouting priority 100; }",
            ],
        );
        run(
            nat,
            &[
                "nft",
                "add",
                "rule",
                "ip",
                &table,
                "post",
                "oifname",
                "eth0",
                "masquerade",
                "random",
            ],
        );
        site
    }
}

impl Drop for NatSite {
    fn drop(&mut self) {
        for ns in [&self.inside, &self.nat] {
            let _ = vrouter_tests::exec(None, &["ip", "netns", "del", ns]);
        }
    }
}

#[test]
fn a_peer_behind_a_port_randomising_nat_is_answered_where_its_packets_come_from() {
    if !require_root() {
        return;
    }
    let topo = Topology::builder("wg_nat")
        .hosts(1)
        .build()
        .expect("topology");
    let site = NatSite::new(&topo);
    let out = side(&topo, 1);
    let inn = Side {
        host: INSIDE,
        tunnel: tunnel_of(2),
        key: PrivateKey::generate(),
    };
    // The outside knows the inside only by the NAT's address and the WireGuard port
    // (what discovery configures from the observed address): the real port is hidden.
    let configured = SocketAddrV4::new(NAT_OUTSIDE, PORT);
    let inside_peer = |endpoint: SocketAddrV4| PeerConfig {
        public_key: inn.key.public_key(),
        endpoint,
        tunnel: inn.tunnel,
        keepalive: None,
    };
    let outside_peer = PeerConfig {
        public_key: out.key.public_key(),
        endpoint: SocketAddrV4::new(out.host, PORT),
        tunnel: out.tunnel,
        // The inside keeps its mapping open.
        keepalive: Some(1),
    };
    let rt_out = NsRuntime::new(&topo.host(1).ns);
    let rt_in = NsRuntime::new(&site.inside);
    let cfg_out = config(&out, vec![out.key.clone()], vec![inside_peer(configured)]);
    let mut wg_out = Some(rt_out.open(&cfg_out).expect("open outside"));
    let t0 = Instant::now();
    let mut wg_in = Some(
        rt_in
            .open(&config(&inn, vec![inn.key.clone()], vec![outside_peer]))
            .expect("open inside"),
    );
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // The outside learns the mapped endpoint from the inside's handshake and
        // answers there: its pings reach the inside.
        let learned =
            vrouter_tests::wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
                wg_out.as_ref().unwrap().stats()[0].roams > 0
            });
        assert!(
            learned,
            "the outside never roamed: {:?}",
            wg_out.as_ref().unwrap().stats()
        );
        eprintln!(
            "endpoint learned {:?} after the inside opened",
            t0.elapsed()
        );
        let s = wg_out.as_ref().unwrap().stats()[0].clone();
        assert_eq!(*s.endpoint.ip(), NAT_OUTSIDE, "{s:?}");
        eprintln!("configured {configured}, learned {}", s.endpoint);
        let (sent, got) = pings(&topo.host(1).ns, inn.tunnel, 20);
        assert_eq!((sent, got), (20, 20), "outside -> inside over the tunnel");
        let (sent, got) = pings(&site.inside, out.tunnel, 20);
        assert_eq!((sent, got), (20, 20), "inside -> outside over the tunnel");

        // Quiet for longer than the NAT's UDP timeout (3 s): the keepalives hold the
        // mapping, so the outside still reaches the inside.
        std::thread::sleep(Duration::from_secs(5));
        let (sent, got) = pings(&topo.host(1).ns, inn.tunnel, 10);
        assert_eq!(
            (sent, got),
            (10, 10),
            "the keepalives kept the mapping open"
        );

        // Re-applying the same configured endpoint keeps the learned one.
        let learned = wg_out.as_ref().unwrap().stats()[0].endpoint;
        let wg = rt_out.apply(wg_out.take().unwrap(), &cfg_out);
        wg_out = Some(wg);
        let s = wg_out.as_ref().unwrap().stats()[0].clone();
        assert_eq!(
            s.endpoint, learned,
            "same configuration, roamed endpoint kept"
        );
        let (sent, got) = pings(&topo.host(1).ns, inn.tunnel, 10);
        assert_eq!((sent, got), (10, 10));

        // A changed configured endpoint overrides the roamed one; the inside's next
        // keepalive moves it back to the mapping.
        let moved = SocketAddrV4::new(NAT_OUTSIDE, PORT + 1);
        let roams = s.roams;
        let cfg_moved = config(&out, vec![out.key.clone()], vec![inside_peer(moved)]);
        let wg = rt_out.apply(wg_out.take().unwrap(), &cfg_moved);
        wg_out = Some(wg);
        let back =
            vrouter_tests::wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
                let s = &wg_out.as_ref().unwrap().stats()[0];
                s.roams > roams && s.endpoint == learned
            });
        assert!(back, "{:?}", wg_out.as_ref().unwrap().stats());
        let (sent, got) = pings(&topo.host(1).ns, inn.tunnel, 10);
        assert_eq!((sent, got), (10, 10));
    }));
    if let Some(wg) = wg_out.take() {
        rt_out.close(wg);
    }
    if let Some(wg) = wg_in.take() {
        rt_in.close(wg);
    }
    drop(site);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
