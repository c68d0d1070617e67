//! vrt-probe: tiny, bounded network probes run inside test namespaces.
//!
//! Subcommands (all exit 0 on success, 1 on failure, 2 on usage error):
//!   tcp-serve <ip:port> <outfile> [idle_timeout_s=30]
//!       Bind, create `<outfile>.ready`, accept ONE connection, write `peer=<addr>` and
//!       `local=<addr>` lines to <outfile> (atomically), echo until EOF. Every read is
//!       bounded by the idle timeout, the whole run by 600 s.
//!   tcp-send <ip:port> <bytes> [timeout_s=10]
//!       Connect, send <bytes> bytes, read the echo back, verify it, print
//!       `ok local=<addr> peer=<addr> bytes=<n>`.
//!   tcp-hold <ip:port> <seconds> [max_stall_ms=2000]
//!       Keep one connection for <seconds>, sending a 16-byte message every 100 ms and
//!       reading its echo; fails on any error or a round trip longer than max_stall_ms.
//!   tcp-sink <ip:port> <outfile> [idle_timeout_s=30]
//!       Like tcp-serve, but discards what it reads (for throughput), and at EOF writes
//!       `bytes=<n>` to <outfile> and closes.
//!   tcp-blast <ip:port> <bytes> [timeout_s=60]
//!       Connect, send <bytes> bytes in 1 MiB writes, wait for the sink to close, print
//!       `ok bytes=<n> secs=<s> mbit_s=<r>`.
//!   tcp-rr <ip:port> <iterations> [timeout_s=10]
//!       One connection (TCP_NODELAY) to an echo server (tcp-serve): after 50 warm-up
//!       exchanges, <iterations> times send 1 byte and wait for its echo; prints
//!       `ok n=<n> mean_us=<m> p50_us=<p> p90_us=<q> min_us=<a> max_us=<b>`.
//!   ping <ipv4> <count> <timeout_ms> [interval_ms=200]
//!       ICMP echo (ping socket if ping_group_range allows, raw socket otherwise); prints
//!       `sent=<n> received=<m> longest_loss_run=<k>` (k: the most consecutive requests
//!       left unanswered), exit 0 if at least one reply arrived. At most 60000 requests.
//!   capture-udp --port <P> --out <file> --timeout-ms <T> [--src <ipv4>]
//!       AF_PACKET socket on every interface of the namespace: saves the UDP payload of
//!       the first IPv4 datagram received (not sent) to port P (from --src only, if
//!       given) to <file>, atomically. Creates `<file>.ready` once listening; prints
//!       `captured bytes=<n> from=<ip:port> to=<ip:port>`; fails after T ms.
//!   send-file --to <ip:port> --file <file> [--from-port <P>]
//!       Sends the file's bytes as one UDP datagram; prints `sent bytes=<n>`.
//!   udp-send --to <ip:port> --count <N> --size <IP bytes> [--gap-us <G>=200]
//!       Sends N datagrams of exactly <IP bytes> each (IPv4 + UDP header + payload),
//!       G microseconds apart; prints `sent count=<n> ip_bytes=<b>`.
//!   udp-send ... --from <ipv4>
//!       Binds the sending socket to that local address (a forged source, if the test
//!       added the address to the namespace).
//!   udp-echo --port <P> --out <file> --count <N> --timeout-ms <T>
//!       Binds 0.0.0.0:P, creates `<file>.ready`, sends every datagram back to its
//!       sender until N were echoed or T ms passed; writes `echoed=<n> peer=<addr>` to
//!       <file>; exit 0 only if N were echoed.
//!   udp-rr --to <ip:port> --count <N> --timeout-ms <T>
//!       N requests from one socket (one UDP flow), each resent up to 5 times 300 ms
//!       apart until its echo comes back; prints `sent=<s> answered=<a>`; exit 0 only
//!       if all N were answered within T ms.
//!   tcp-accept --addr <ip:port> --ready <file> --secs <S>
//!       Listens (backlog 4096), creates <file>, accepts and closes connections at once
//!       for S seconds; prints `accepted=<n>`.
//!   tcp-connect-rate --to <ip:port> --secs <S> [--threads <T>=2]
//!       T threads open connections to a tcp-accept server and reset them (SO_LINGER 0,
//!       so no TIME_WAIT holds the ports), as fast as they can for S seconds; prints
//!       `connections=<n> failed=<f> secs=<s> rate=<per second>`.
//!   nft-newgen --table <name> --ready <file> --secs <S>
//!       Listens to nf_tables notifications (NFNLGRP_NFTABLES) in the namespace; for
//!       every transaction that creates table <name>, prints one line when its
//!       NEWGEN message arrives: `newgen realtime_ns=<ns> rules=<n> elements=<n>`
//!       (CLOCK_REALTIME when read; rules and set-element messages of the transaction).
//!       Runs S seconds; fails if notifications were lost (ENOBUFS).
//!   underlay-capture --dev <if> --out <file> --ms <T> [--max-bytes <B>=64000000]
//!       [--marker <text>] [--vxlan-port <P>=4789] [--wg-port <P>=51820]
//!       [--gossip-port <P>=7950]
//!       AF_PACKET (SOCK_RAW, ETH_P_ALL) bound to <if>: every frame in and out, until T
//!       ms passed, B bytes were seen, or `<file>.stop` exists. Creates `<file>.ready`
//!       once bound; writes one line to <file> (and stdout): `frames= bytes= marker=
//!       ipv4= frags= vxlan= wg= gossip= other_udp= other_ip= vxlan_flows=<s>><d>,...`
//!       (marker: frames holding the text; frags: IPv4 with MF set or an offset;
//!       vxlan: UDP to the VXLAN port; wg/gossip: UDP from or to that port).
//!   vxlan-inject --to <ipv4> --src <ipv4> --vni <N> --dst-mac <mac> --src-mac <mac>
//!       --inner-src <ipv4> --inner-dst <ipv4> --inner-port <P> --payload <text>
//!       [--port <P>=4789] [--count <N>=5]
//!       Sends N plain VXLAN frames (50 ms apart) through a raw socket with a forged
//!       outer source address: inside, an Ethernet frame carrying one UDP datagram.
//!       Prints `injected count=<n> bytes=<outer IP bytes>`.
//!   udp-sink --port <P> --out <file> --count <N> --timeout-ms <T>
//!       Binds 0.0.0.0:P, creates `<file>.ready`, counts datagrams until N arrived or T
//!       ms passed, then writes `received=<n> ip_bytes=<b>` to <file> atomically; exit 0
//!       only if all N arrived.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::exit;
use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!(
        "usage: vrt-probe tcp-serve <ip:port> <outfile> [idle_s] | tcp-send <ip:port> <bytes> [timeout_s] | tcp-hold <ip:port> <seconds> [max_stall_ms] | tcp-rr <ip:port> <iterations> [timeout_s] | ping <ip> <count> <timeout_ms> [interval_ms] | capture-udp --port P --out FILE --timeout-ms T [--src IP] | send-file --to IP:PORT --file FILE [--from-port P] | udp-send --to IP:PORT --count N --size B [--gap-us G] [--from IP] | udp-echo --port P --out FILE --count N --timeout-ms T | udp-rr --to IP:PORT --count N --timeout-ms T | tcp-accept --addr IP:PORT --ready FILE --secs S | tcp-connect-rate --to IP:PORT --secs S [--threads T] | nft-newgen --table NAME --ready FILE --secs S | udp-sink --port P --out FILE --count N --timeout-ms T | underlay-capture --dev IF --out FILE --ms T [--max-bytes B] [--marker TEXT] [--vxlan-port P] [--wg-port P] [--gossip-port P] | vxlan-inject --to IP --src IP --vni N --dst-mac MAC --src-mac MAC --inner-src IP --inner-dst IP --inner-port P --payload TEXT [--port P] [--count N]"
    );
    exit(2)
}

fn fail(msg: String) -> ! {
    eprintln!("vrt-probe: {msg}");
    exit(1)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: Option<T>) -> T {
    match args.get(i) {
        Some(s) => s.parse().unwrap_or_else(|_| usage()),
        None => default.unwrap_or_else(|| usage()),
    }
}

/// Value of `--name <value>` (after the subcommand).
fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: Option<T>) -> T {
    match flag_opt(args, name) {
        Some(v) => v,
        None => default.unwrap_or_else(|| usage()),
    }
}

fn flag_opt<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    let i = args.iter().position(|a| a == name)?;
    let v = args.get(i + 1).unwrap_or_else(|| usage());
    Some(v.parse().unwrap_or_else(|_| usage()))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("tcp-serve") => tcp_serve(
            arg(&args, 1, None),
            arg::<String>(&args, 2, None),
            arg(&args, 3, Some(30u64)),
        ),
        Some("tcp-send") => tcp_send(
            arg(&args, 1, None),
            arg(&args, 2, None),
            arg(&args, 3, Some(10u64)),
        ),
        Some("tcp-hold") => tcp_hold(
            arg(&args, 1, None),
            arg(&args, 2, None),
            arg(&args, 3, Some(2000u64)),
        ),
        Some("tcp-sink") => tcp_sink(
            arg(&args, 1, None),
            arg::<String>(&args, 2, None),
            arg(&args, 3, Some(30u64)),
        ),
        Some("tcp-blast") => tcp_blast(
            arg(&args, 1, None),
            arg(&args, 2, None),
            arg(&args, 3, Some(60u64)),
        ),
        Some("tcp-rr") => tcp_rr(
            arg(&args, 1, None),
            arg(&args, 2, None),
            arg(&args, 3, Some(10u64)),
        ),
        Some("ping") => ping(
            arg(&args, 1, None),
            arg(&args, 2, None),
            arg(&args, 3, None),
            arg(&args, 4, Some(200u64)),
        ),
        Some("capture-udp") => capture_udp(
            flag(&args, "--port", None),
            flag::<String>(&args, "--out", None),
            flag(&args, "--timeout-ms", None),
            flag_opt(&args, "--src"),
        ),
        Some("send-file") => send_file(
            flag(&args, "--to", None),
            flag::<String>(&args, "--file", None),
            flag(&args, "--from-port", Some(0u16)),
        ),
        Some("udp-send") => udp_send(
            flag(&args, "--to", None),
            flag(&args, "--count", None),
            flag(&args, "--size", None),
            flag(&args, "--gap-us", Some(200u64)),
            flag_opt(&args, "--from"),
        ),
        Some("udp-echo") => udp_echo(
            flag(&args, "--port", None),
            flag::<String>(&args, "--out", None),
            flag(&args, "--count", None),
            flag(&args, "--timeout-ms", None),
        ),
        Some("tcp-accept") => tcp_accept(
            flag(&args, "--addr", None),
            flag::<String>(&args, "--ready", None),
            flag(&args, "--secs", None),
        ),
        Some("tcp-connect-rate") => tcp_connect_rate(
            flag(&args, "--to", None),
            flag(&args, "--secs", None),
            flag(&args, "--threads", Some(2usize)),
        ),
        Some("nft-newgen") => nft_newgen(
            flag::<String>(&args, "--table", None),
            flag::<String>(&args, "--ready", None),
            flag(&args, "--secs", None),
        ),
        Some("udp-rr") => udp_rr(
            flag(&args, "--to", None),
            flag(&args, "--count", None),
            flag(&args, "--timeout-ms", None),
        ),
        Some("underlay-capture") => underlay_capture(UnderlayCapture {
            dev: flag(&args, "--dev", None),
            out: flag(&args, "--out", None),
            ms: flag(&args, "--ms", None),
            max_bytes: flag(&args, "--max-bytes", Some(64_000_000u64)),
            marker: flag_opt(&args, "--marker"),
            vxlan_port: flag(&args, "--vxlan-port", Some(4789u16)),
            wg_port: flag(&args, "--wg-port", Some(51820u16)),
            gossip_port: flag(&args, "--gossip-port", Some(7950u16)),
        }),
        Some("vxlan-inject") => vxlan_inject(VxlanInject {
            to: flag(&args, "--to", None),
            src: flag(&args, "--src", None),
            port: flag(&args, "--port", Some(4789u16)),
            vni: flag(&args, "--vni", None),
            dst_mac: flag::<String>(&args, "--dst-mac", None),
            src_mac: flag::<String>(&args, "--src-mac", None),
            inner_src: flag(&args, "--inner-src", None),
            inner_dst: flag(&args, "--inner-dst", None),
            inner_port: flag(&args, "--inner-port", None),
            payload: flag(&args, "--payload", None),
            count: flag(&args, "--count", Some(5u32)),
        }),
        Some("udp-sink") => udp_sink(
            flag(&args, "--port", None),
            flag::<String>(&args, "--out", None),
            flag(&args, "--count", None),
            flag(&args, "--timeout-ms", None),
        ),
        _ => usage(),
    }
}

/// IPv4 header without options plus the UDP header.
const UDP_IP_OVERHEAD: usize = 28;

fn udp_send(to: SocketAddr, count: u64, size: usize, gap_us: u64, from: Option<Ipv4Addr>) {
    if !(UDP_IP_OVERHEAD..=1500).contains(&size) {
        fail(format!("--size {size}: use 28..=1500 IP bytes"));
    }
    let from = from.unwrap_or(Ipv4Addr::UNSPECIFIED);
    let sock =
        std::net::UdpSocket::bind((from, 0)).unwrap_or_else(|e| fail(format!("bind {from}: {e}")));
    let payload = vec![0x5au8; size - UDP_IP_OVERHEAD];
    for i in 0..count {
        let n = sock
            .send_to(&payload, to)
            .unwrap_or_else(|e| fail(format!("datagram {i} to {to}: {e}")));
        if n != payload.len() {
            fail(format!("datagram {i}: sent {n} of {} bytes", payload.len()));
        }
        std::thread::sleep(Duration::from_micros(gap_us));
    }
    println!("sent count={count} ip_bytes={}", count * size as u64);
}

fn udp_sink(port: u16, out: String, count: u64, timeout_ms: u64) {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms.max(1));
    let sock = std::net::UdpSocket::bind(("0.0.0.0", port))
        .unwrap_or_else(|e| fail(format!("bind port {port}: {e}")));
    write_atomic(&format!("{out}.ready"), "ready\n");
    let mut buf = vec![0u8; 65536];
    let (mut received, mut ip_bytes) = (0u64, 0u64);
    while received < count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        sock.set_read_timeout(Some(left.min(Duration::from_millis(500))))
            .unwrap_or_else(|e| fail(format!("timeout: {e}")));
        if let Ok(n) = sock.recv(&mut buf) {
            received += 1;
            ip_bytes += (n + UDP_IP_OVERHEAD) as u64;
        }
    }
    let line = format!("received={received} ip_bytes={ip_bytes}\n");
    write_atomic(&out, &line);
    print!("{line}");
    if received < count {
        fail(format!(
            "{received} of {count} datagrams within {timeout_ms} ms"
        ));
    }
}

fn udp_echo(port: u16, out: String, count: u64, timeout_ms: u64) {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms.max(1));
    let sock = std::net::UdpSocket::bind(("0.0.0.0", port))
        .unwrap_or_else(|e| fail(format!("bind port {port}: {e}")));
    write_atomic(&format!("{out}.ready"), "ready\n");
    let mut buf = vec![0u8; 65536];
    let mut echoed = 0u64;
    let mut peer = None;
    while echoed < count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        sock.set_read_timeout(Some(left.min(Duration::from_millis(500))))
            .unwrap_or_else(|e| fail(format!("timeout: {e}")));
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            peer = Some(from);
            if sock.send_to(&buf[..n], from).is_ok() {
                echoed += 1;
            }
        }
    }
    let peer = peer.map(|p| p.to_string()).unwrap_or_default();
    let line = format!("echoed={echoed} peer={peer}\n");
    write_atomic(&out, &line);
    print!("{line}");
    if echoed < count {
        fail(format!(
            "echoed {echoed} of {count} datagrams within {timeout_ms} ms"
        ));
    }
}

fn udp_rr(to: SocketAddr, count: u64, timeout_ms: u64) {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms.max(1));
    let sock =
        std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap_or_else(|e| fail(format!("bind: {e}")));
    sock.connect(to)
        .unwrap_or_else(|e| fail(format!("connect {to}: {e}")));
    let mut buf = vec![0u8; 2048];
    let (mut sent, mut answered) = (0u64, 0u64);
    'outer: for i in 0..count {
        let msg = format!("vrt-probe udp-rr {i}");
        // Each request is sent until answered (at most 5 times, 300 ms apart): the
        // first one may wait for neighbour resolution on the way.
        for _ in 0..5 {
            if Instant::now() >= deadline {
                break 'outer;
            }
            sent += 1;
            let _ = sock.send(msg.as_bytes());
            let wait_until = Instant::now() + Duration::from_millis(300);
            loop {
                let left = wait_until
                    .min(deadline)
                    .saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                sock.set_read_timeout(Some(left))
                    .unwrap_or_else(|e| fail(format!("timeout: {e}")));
                match sock.recv(&mut buf) {
                    Ok(n) if &buf[..n] == msg.as_bytes() => {
                        answered += 1;
                        continue 'outer;
                    }
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
        break;
    }
    println!("sent={sent} answered={answered}");
    if answered < count {
        fail(format!(
            "{answered} of {count} requests answered within {timeout_ms} ms"
        ));
    }
}

fn tcp_accept(addr: SocketAddr, ready: String, secs: u64) {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + Duration::from_secs(secs.clamp(1, 600));
    let l = TcpListener::bind(addr).unwrap_or_else(|e| fail(format!("bind {addr}: {e}")));
    // std's backlog is 128; a connection-rate test needs more.
    unsafe {
        libc::listen(l.as_raw_fd(), 4096);
    }
    write_atomic(&ready, "ready\n");
    let mut accepted = 0u64;
    while Instant::now() < deadline {
        let mut pfd = libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
            continue;
        }
        if let Ok((s, _)) = l.accept() {
            accepted += 1;
            drop(s);
        }
    }
    println!("accepted={accepted}");
}

fn tcp_connect_rate(to: SocketAddr, secs: u64, threads: usize) {
    let secs = secs.clamp(1, 600);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let workers: Vec<_> = (0..threads.clamp(1, 64))
        .map(|_| {
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < deadline {
                    match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
                        Ok(s) => {
                            // Reset instead of FIN: no TIME_WAIT, so ports are not used up.
                            let lg = libc::linger {
                                l_onoff: 1,
                                l_linger: 0,
                            };
                            unsafe {
                                libc::setsockopt(
                                    std::os::fd::AsRawFd::as_raw_fd(&s),
                                    libc::SOL_SOCKET,
                                    libc::SO_LINGER,
                                    &lg as *const libc::linger as *const libc::c_void,
                                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                                );
                            }
                            ok += 1;
                        }
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0u64, 0u64);
    for w in workers {
        let (o, f) = w.join().unwrap_or((0, 0));
        ok += o;
        failed += f;
    }
    let took = start.elapsed().as_secs_f64();
    println!(
        "connections={ok} failed={failed} secs={took:.3} rate={:.1}",
        ok as f64 / took
    );
    if ok == 0 {
        exit(1);
    }
}

fn nft_newgen(table: String, ready: String, secs: u64) {
    const NETLINK_NETFILTER: libc::c_int = 12;
    const NFNLGRP_NFTABLES: u32 = 7;
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_NEWTABLE: u16 = 0;
    const NFT_MSG_NEWRULE: u16 = 6;
    const NFT_MSG_NEWSETELEM: u16 = 12;
    const NFT_MSG_NEWGEN: u16 = 15;
    const NFTA_TABLE_NAME: u16 = 1;
    let deadline = Instant::now() + Duration::from_secs(secs.clamp(1, 3600));
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, NETLINK_NETFILTER) };
    if fd < 0 {
        fail(format!(
            "netlink socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    let size: libc::c_int = 64 << 20;
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    sa.nl_groups = 1 << (NFNLGRP_NFTABLES - 1);
    let r = unsafe {
        libc::bind(
            fd,
            &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if r < 0 {
        fail(format!("netlink bind: {}", std::io::Error::last_os_error()));
    }
    write_atomic(&ready, "ready\n");
    let mut buf = vec![0u8; 1 << 20];
    let (mut in_table, mut rules, mut elements) = (false, 0u64, 0u64);
    let out = std::io::stdout();
    while Instant::now() < deadline {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
            continue;
        }
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                fail("notifications lost (ENOBUFS)".into());
            }
            continue;
        }
        let mut off = 0usize;
        let n = n as usize;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
            if len < 16 || off + len > n {
                break;
            }
            let msg = &buf[off..off + len];
            if ty >> 8 == NFNL_SUBSYS_NFTABLES {
                match ty & 0xff {
                    NFT_MSG_NEWTABLE => {
                        // nlmsghdr (16) + nfgenmsg (4), then attributes.
                        let mut a = 20usize;
                        while a + 4 <= msg.len() {
                            let alen = u16::from_ne_bytes([msg[a], msg[a + 1]]) as usize;
                            let aty = u16::from_ne_bytes([msg[a + 2], msg[a + 3]]) & 0x3fff;
                            if alen < 4 || a + alen > msg.len() {
                                break;
                            }
                            if aty == NFTA_TABLE_NAME {
                                let v = &msg[a + 4..a + alen];
                                let v = v.split(|b| *b == 0).next().unwrap_or(v);
                                if v == table.as_bytes() {
                                    in_table = true;
                                }
                            }
                            a += (alen + 3) & !3;
                        }
                    }
                    NFT_MSG_NEWRULE => rules += 1,
                    NFT_MSG_NEWSETELEM => elements += 1,
                    NFT_MSG_NEWGEN => {
                        if in_table {
                            let now = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map(|d| d.as_nanos())
                                .unwrap_or(0);
                            let mut o = out.lock();
                            let _ = writeln!(
                                o,
                                "newgen realtime_ns={now} rules={rules} elements={elements}"
                            );
                            let _ = o.flush();
                        }
                        (in_table, rules, elements) = (false, 0, 0);
                    }
                    _ => {}
                }
            }
            off += (len + 3) & !3;
        }
    }
}

fn tcp_sink(addr: SocketAddr, outfile: String, idle_s: u64) {
    let idle = Duration::from_secs(idle_s.max(1));
    let (mut s, peer) = accept_one(addr, &outfile, idle);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) => fail(format!("read after {total} bytes: {e}")),
        }
    }
    write_atomic(&outfile, &format!("peer={peer}\nbytes={total}\n"));
    println!("done bytes={total}");
}

fn tcp_blast(addr: SocketAddr, bytes: usize, timeout_s: u64) {
    let to = Duration::from_secs(timeout_s.max(1));
    let mut s = TcpStream::connect_timeout(&addr, to)
        .unwrap_or_else(|e| fail(format!("connect {addr}: {e}")));
    s.set_write_timeout(Some(to)).expect("timeout");
    s.set_read_timeout(Some(to)).expect("timeout");
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n])
            .unwrap_or_else(|e| fail(format!("write: {e}")));
        left -= n;
    }
    let _ = s.shutdown(Shutdown::Write);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "ok bytes={bytes} secs={secs:.3} mbit_s={:.0}",
        bytes as f64 * 8.0 / secs / 1e6
    );
}

/// Binds, creates `<outfile>.ready`, and accepts one connection within `idle`; the
/// stream comes back blocking, with `idle` as its read timeout.
fn accept_one(addr: SocketAddr, outfile: &str, idle: Duration) -> (TcpStream, SocketAddr) {
    let start = Instant::now();
    let l = TcpListener::bind(addr).unwrap_or_else(|e| fail(format!("bind {addr}: {e}")));
    l.set_nonblocking(true).expect("nonblocking");
    write_atomic(&format!("{outfile}.ready"), "ready\n");
    let (s, peer) = loop {
        match l.accept() {
            Ok(x) => break x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > idle {
                    fail(format!("no connection within {idle:?}"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => fail(format!("accept: {e}")),
        }
    };
    s.set_nonblocking(false).expect("blocking");
    s.set_read_timeout(Some(idle)).expect("timeout");
    (s, peer)
}

fn write_atomic(path: &str, content: &str) {
    write_atomic_bytes(path, content.as_bytes())
}

fn write_atomic_bytes(path: &str, content: &[u8]) {
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, content).unwrap_or_else(|e| fail(format!("write {tmp}: {e}")));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| fail(format!("rename {tmp}: {e}")));
}

fn tcp_serve(addr: SocketAddr, outfile: String, idle_s: u64) {
    let start = Instant::now();
    let life = Duration::from_secs(600);
    let idle = Duration::from_secs(idle_s.max(1));
    let (mut s, peer) = accept_one(addr, &outfile, idle);
    s.set_write_timeout(Some(idle)).expect("timeout");
    // Echo at once (tcp-rr measures round trips).
    s.set_nodelay(true).ok();
    let local = s.local_addr().expect("local addr");
    write_atomic(&outfile, &format!("peer={peer}\nlocal={local}\n"));
    println!("peer={peer} local={local}");
    let mut buf = [0u8; 16384];
    let mut total = 0u64;
    loop {
        if start.elapsed() > life {
            fail("lifetime exceeded".into());
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                s.write_all(&buf[..n])
                    .unwrap_or_else(|e| fail(format!("echo write: {e}")));
            }
            Err(e) => fail(format!("read after {total} bytes: {e}")),
        }
    }
    println!("done bytes={total}");
}

fn tcp_send(addr: SocketAddr, bytes: usize, timeout_s: u64) {
    let to = Duration::from_secs(timeout_s.max(1));
    let s = TcpStream::connect_timeout(&addr, to)
        .unwrap_or_else(|e| fail(format!("connect {addr}: {e}")));
    s.set_read_timeout(Some(to)).expect("timeout");
    s.set_write_timeout(Some(to)).expect("timeout");
    let local = s.local_addr().expect("local");
    let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let mut w = s.try_clone().expect("clone");
    let wdata = data.clone();
    let writer = std::thread::spawn(move || {
        let r = w.write_all(&wdata);
        let _ = w.shutdown(Shutdown::Write);
        r
    });
    let mut got = Vec::with_capacity(bytes);
    let mut r = s;
    if let Err(e) = r.read_to_end(&mut got) {
        fail(format!("read echo after {} bytes: {e}", got.len()));
    }
    if let Err(e) = writer.join().expect("writer thread") {
        fail(format!("write: {e}"));
    }
    if got != data {
        fail(format!(
            "echo mismatch: sent {} got {}",
            data.len(),
            got.len()
        ));
    }
    println!("ok local={local} peer={addr} bytes={bytes}");
}

fn tcp_rr(addr: SocketAddr, iterations: usize, timeout_s: u64) {
    const WARMUP: usize = 50;
    if iterations == 0 || iterations > 10_000_000 {
        fail(format!("iterations must be 1..=10000000, not {iterations}"));
    }
    let to = Duration::from_secs(timeout_s.max(1));
    let mut s = TcpStream::connect_timeout(&addr, to)
        .unwrap_or_else(|e| fail(format!("connect {addr}: {e}")));
    s.set_read_timeout(Some(to)).expect("timeout");
    s.set_write_timeout(Some(to)).expect("timeout");
    s.set_nodelay(true)
        .unwrap_or_else(|e| fail(format!("TCP_NODELAY: {e}")));
    let start = Instant::now();
    let mut rtts = Vec::with_capacity(iterations);
    let mut byte = [0u8; 1];
    for i in 0..WARMUP + iterations {
        if start.elapsed() > to * 10 {
            fail(format!("{i} exchanges took longer than {:?}", to * 10));
        }
        let t = Instant::now();
        s.write_all(&[i as u8])
            .unwrap_or_else(|e| fail(format!("write #{i}: {e}")));
        s.read_exact(&mut byte)
            .unwrap_or_else(|e| fail(format!("read echo #{i}: {e}")));
        if byte[0] != i as u8 {
            fail(format!("echo #{i}: got {} back", byte[0]));
        }
        if i >= WARMUP {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let mean = rtts.iter().sum::<f64>() / rtts.len() as f64;
    rtts.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: usize| rtts[(rtts.len() - 1) * p / 100];
    println!(
        "ok n={} mean_us={mean:.1} p50_us={:.1} p90_us={:.1} min_us={:.1} max_us={:.1}",
        rtts.len(),
        pct(50),
        pct(90),
        rtts[0],
        rtts[rtts.len() - 1]
    );
}

fn tcp_hold(addr: SocketAddr, seconds: u64, max_stall_ms: u64) {
    let stall = Duration::from_millis(max_stall_ms.max(1));
    let mut s = TcpStream::connect_timeout(&addr, stall.max(Duration::from_secs(3)))
        .unwrap_or_else(|e| fail(format!("connect {addr}: {e}")));
    s.set_read_timeout(Some(stall)).expect("timeout");
    s.set_write_timeout(Some(stall)).expect("timeout");
    s.set_nodelay(true).ok();
    let local = s.local_addr().expect("local");
    println!("connected local={local} peer={addr}");
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut seq = 0u64;
    let mut max_rtt = Duration::ZERO;
    while Instant::now() < end {
        let msg = format!("{seq:015}\n");
        let t0 = Instant::now();
        if let Err(e) = s.write_all(msg.as_bytes()) {
            fail(format!("write seq {seq}: {e}"));
        }
        let mut back = [0u8; 16];
        if let Err(e) = s.read_exact(&mut back) {
            fail(format!("read seq {seq} (stall > {stall:?}?): {e}"));
        }
        let rtt = t0.elapsed();
        if back != msg.as_bytes() {
            fail(format!("seq {seq}: echo mismatch"));
        }
        if rtt > stall {
            fail(format!("seq {seq}: round trip {rtt:?} > {stall:?}"));
        }
        max_rtt = max_rtt.max(rtt);
        seq += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = s.shutdown(Shutdown::Write);
    println!("ok rounds={seq} max_rtt_ms={}", max_rtt.as_millis());
}

fn csum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ping(ip: Ipv4Addr, count: u32, timeout_ms: u64, interval_ms: u64) {
    let count = count.clamp(1, 60_000);
    // Prefer an unprivileged ping socket; fall back to a raw socket (needs CAP_NET_RAW).
    let (fd, raw) = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP);
        if fd >= 0 {
            (fd, false)
        } else {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
            if fd < 0 {
                fail(format!("socket: {}", std::io::Error::last_os_error()));
            }
            (fd, true)
        }
    };
    let ident: u16 = (std::process::id() & 0xffff) as u16;
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_addr.s_addr = u32::from(ip).to_be();
    let deadline = Instant::now() + Duration::from_millis(timeout_ms.max(1));
    let interval = Duration::from_millis(interval_ms.max(1));
    let mut replies = vec![false; count as usize];
    let mut sent = 0u32;
    let mut next_send = Instant::now();
    // For a ping socket the kernel rewrites the id; we match on sequence numbers.
    let mut our_id: Option<u16> = if raw { Some(ident) } else { None };
    loop {
        let now = Instant::now();
        if now >= deadline || replies.iter().all(|r| *r) {
            break;
        }
        if sent < count && now >= next_send {
            let mut pkt = vec![8u8, 0, 0, 0];
            pkt.extend_from_slice(&ident.to_be_bytes());
            pkt.extend_from_slice(&(sent as u16).to_be_bytes());
            pkt.extend_from_slice(b"vrt-probe-ping-payload-0123456789");
            let c = csum(&pkt);
            pkt[2..4].copy_from_slice(&c.to_be_bytes());
            let r = unsafe {
                libc::sendto(
                    fd,
                    pkt.as_ptr() as *const libc::c_void,
                    pkt.len(),
                    0,
                    &sa as *const libc::sockaddr_in as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if r < 0 {
                eprintln!("sendto: {}", std::io::Error::last_os_error());
            }
            sent += 1;
            // On a fixed schedule (a late send does not shift the later ones), so that
            // lost requests times the interval is the time without answers, also on a
            // busy machine; after a stall of over a second, start afresh.
            next_send += interval;
            if next_send + Duration::from_secs(1) < now {
                next_send = now + interval;
            }
        }
        let wait_until = if sent < count {
            next_send.min(deadline)
        } else {
            deadline
        };
        let wait_ms = wait_until
            .saturating_duration_since(Instant::now())
            .as_millis()
            .clamp(1, 1000) as i32;
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let pr = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
        if pr <= 0 {
            continue;
        }
        let mut buf = [0u8; 2048];
        let mut from: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut flen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
                &mut from as *mut libc::sockaddr_in as *mut libc::sockaddr,
                &mut flen,
            )
        };
        if n <= 0 {
            continue;
        }
        let n = n as usize;
        if u32::from_be(from.sin_addr.s_addr) != u32::from(ip) {
            continue;
        }
        let icmp = if raw {
            let ihl = ((buf[0] & 0x0f) as usize) * 4;
            if n < ihl + 8 {
                continue;
            }
            &buf[ihl..n]
        } else {
            if n < 8 {
                continue;
            }
            &buf[..n]
        };
        if icmp[0] != 0 {
            continue; // not an echo reply
        }
        let id = u16::from_be_bytes([icmp[4], icmp[5]]);
        let seq = u16::from_be_bytes([icmp[6], icmp[7]]) as usize;
        match our_id {
            Some(o) if o != id => continue,
            None => our_id = Some(id),
            _ => {}
        }
        if seq < replies.len() && (seq as u32) < sent {
            replies[seq] = true;
        }
    }
    unsafe {
        libc::close(fd);
    }
    let received = replies.iter().filter(|r| **r).count();
    let mut longest = 0usize;
    let mut run = 0usize;
    for r in &replies[..sent as usize] {
        run = if *r { 0 } else { run + 1 };
        longest = longest.max(run);
    }
    println!("sent={sent} received={received} longest_loss_run={longest}");
    exit(if received > 0 { 0 } else { 1 })
}

fn capture_udp(port: u16, out: String, timeout_ms: u64, src: Option<Ipv4Addr>) {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms.max(1));
    let proto = (libc::ETH_P_IP as u16).to_be() as libc::c_int;
    // SOCK_DGRAM: the kernel strips the link-layer header, we get the IPv4 packet.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, proto) };
    if fd < 0 {
        fail(format!(
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    write_atomic(&format!("{out}.ready"), "ready\n");
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            fail(format!(
                "no UDP datagram to port {port} within {timeout_ms} ms"
            ));
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, 1000) as i32;
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            continue;
        }
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut slen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
                &mut sll as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                &mut slen,
            )
        };
        if n <= 0 {
            continue;
        }
        if sll.sll_pkttype == libc::PACKET_OUTGOING {
            continue; // sent by this namespace, not received
        }
        let pkt = &buf[..n as usize];
        if pkt.len() < 20 || pkt[0] >> 4 != 4 || pkt[9] != libc::IPPROTO_UDP as u8 {
            continue;
        }
        let ihl = ((pkt[0] & 0x0f) as usize) * 4;
        let frag = u16::from_be_bytes([pkt[6], pkt[7]]);
        if frag & 0x3fff != 0 {
            continue; // a fragment: not a whole datagram
        }
        let total = (u16::from_be_bytes([pkt[2], pkt[3]]) as usize).min(pkt.len());
        if total < ihl + 8 {
            continue;
        }
        let s_ip = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
        let d_ip = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
        if src.is_some_and(|s| s != s_ip) {
            continue;
        }
        let udp = &pkt[ihl..total];
        let sport = u16::from_be_bytes([udp[0], udp[1]]);
        let dport = u16::from_be_bytes([udp[2], udp[3]]);
        if dport != port {
            continue;
        }
        let ulen = (u16::from_be_bytes([udp[4], udp[5]]) as usize).clamp(8, udp.len());
        let payload = &udp[8..ulen];
        write_atomic_bytes(&out, payload);
        unsafe {
            libc::close(fd);
        }
        println!(
            "captured bytes={} from={s_ip}:{sport} to={d_ip}:{dport}",
            payload.len()
        );
        return;
    }
}

fn send_file(to: SocketAddr, file: String, from_port: u16) {
    let data = std::fs::read(&file).unwrap_or_else(|e| fail(format!("read {file}: {e}")));
    let sock = std::net::UdpSocket::bind(("0.0.0.0", from_port))
        .unwrap_or_else(|e| fail(format!("bind port {from_port}: {e}")));
    let n = sock
        .send_to(&data, to)
        .unwrap_or_else(|e| fail(format!("send to {to}: {e}")));
    if n != data.len() {
        fail(format!("sent {n} of {} bytes", data.len()));
    }
    println!("sent bytes={n}");
}

struct UnderlayCapture {
    dev: String,
    out: String,
    ms: u64,
    max_bytes: u64,
    marker: Option<String>,
    vxlan_port: u16,
    wg_port: u16,
    gossip_port: u16,
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn underlay_capture(c: UnderlayCapture) {
    let deadline = Instant::now() + Duration::from_millis(c.ms.max(1));
    let name = std::ffi::CString::new(c.dev.clone()).unwrap_or_else(|_| usage());
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        fail(format!("no interface {}", c.dev));
    }
    let proto = (libc::ETH_P_ALL as u16).to_be();
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as libc::c_int) };
    if fd < 0 {
        fail(format!(
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    let r = unsafe {
        libc::bind(
            fd,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r < 0 {
        fail(format!(
            "bind to {}: {}",
            c.dev,
            std::io::Error::last_os_error()
        ));
    }
    write_atomic(&format!("{}.ready", c.out), "ready\n");
    let stop = std::path::PathBuf::from(format!("{}.stop", c.out));
    let marker = c.marker.clone().unwrap_or_default().into_bytes();
    let (mut frames, mut bytes, mut marked, mut ipv4, mut frags) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut vxlan, mut wg, mut gossip, mut other_udp, mut other_ip) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut flows: std::collections::BTreeSet<String> = Default::default();
    let mut buf = vec![0u8; 262_144];
    while Instant::now() < deadline && bytes < c.max_bytes && !stop.exists() {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        if unsafe { libc::poll(&mut pfd, 1, 20) } <= 0 {
            continue;
        }
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            continue;
        }
        let f = &buf[..n as usize];
        frames += 1;
        bytes += f.len() as u64;
        if contains(f, &marker) {
            marked += 1;
        }
        if f.len() < 14 + 20 || u16::from_be_bytes([f[12], f[13]]) != libc::ETH_P_IP as u16 {
            continue;
        }
        let ip = &f[14..];
        if ip[0] >> 4 != 4 {
            continue;
        }
        ipv4 += 1;
        let frag = u16::from_be_bytes([ip[6], ip[7]]);
        let (more, offset) = (frag & 0x2000 != 0, frag & 0x1fff);
        if more || offset != 0 {
            frags += 1;
        }
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        if ip[9] != libc::IPPROTO_UDP as u8 || offset != 0 || ip.len() < ihl + 8 {
            other_ip += (ip[9] != libc::IPPROTO_UDP as u8) as u64;
            continue;
        }
        let udp = &ip[ihl..];
        let sport = u16::from_be_bytes([udp[0], udp[1]]);
        let dport = u16::from_be_bytes([udp[2], udp[3]]);
        if dport == c.vxlan_port {
            vxlan += 1;
            if flows.len() < 32 {
                flows.insert(format!(
                    "{}>{}",
                    Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
                    Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])
                ));
            }
        } else if sport == c.wg_port || dport == c.wg_port {
            wg += 1;
        } else if sport == c.gossip_port || dport == c.gossip_port {
            gossip += 1;
        } else {
            other_udp += 1;
        }
    }
    unsafe {
        libc::close(fd);
    }
    let flows: Vec<String> = flows.into_iter().collect();
    let line = format!(
        "frames={frames} bytes={bytes} marker={marked} ipv4={ipv4} frags={frags} vxlan={vxlan} wg={wg} gossip={gossip} other_udp={other_udp} other_ip={other_ip} vxlan_flows={}\n",
        flows.join(",")
    );
    write_atomic(&c.out, &line);
    print!("{line}");
}

struct VxlanInject {
    to: Ipv4Addr,
    src: Ipv4Addr,
    port: u16,
    vni: u32,
    dst_mac: String,
    src_mac: String,
    inner_src: Ipv4Addr,
    inner_dst: Ipv4Addr,
    inner_port: u16,
    payload: String,
    count: u32,
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).unwrap_or_else(|_| fail(format!("bad MAC {s}"))))
        .collect();
    v.try_into()
        .unwrap_or_else(|_| fail(format!("bad MAC {s}")))
}

/// An IPv4 header (no options) + UDP header (checksum 0: allowed over IPv4) + payload.
fn ipv4_udp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
    df: bool,
) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&(std::process::id() as u16).to_be_bytes());
    p.extend_from_slice(&(if df { 0x4000u16 } else { 0 }).to_be_bytes());
    p.extend_from_slice(&[64, libc::IPPROTO_UDP as u8, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = csum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

fn vxlan_inject(v: VxlanInject) {
    if v.vni >= 1 << 24 {
        fail(format!("--vni {}: VNIs are 24 bits", v.vni));
    }
    let inner_ip = ipv4_udp(
        v.inner_src,
        v.inner_dst,
        40001,
        v.inner_port,
        v.payload.as_bytes(),
        false,
    );
    let mut vx = vec![0x08, 0, 0, 0];
    vx.extend_from_slice(&(v.vni << 8).to_be_bytes());
    vx.extend_from_slice(&parse_mac(&v.dst_mac));
    vx.extend_from_slice(&parse_mac(&v.src_mac));
    vx.extend_from_slice(&(libc::ETH_P_IP as u16).to_be_bytes());
    vx.extend_from_slice(&inner_ip);
    let outer = ipv4_udp(v.src, v.to, 40000, v.port, &vx, true);
    // IPPROTO_RAW implies IP_HDRINCL: the outer header goes out as built, forged source
    // included (needs CAP_NET_RAW: the harness runs this as root).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        fail(format!("raw socket: {}", std::io::Error::last_os_error()));
    }
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_addr.s_addr = u32::from(v.to).to_be();
    for i in 0..v.count {
        let r = unsafe {
            libc::sendto(
                fd,
                outer.as_ptr() as *const libc::c_void,
                outer.len(),
                0,
                &sa as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if r < 0 {
            fail(format!(
                "frame {i}: sendto: {}",
                std::io::Error::last_os_error()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe {
        libc::close(fd);
    }
    println!("injected count={} bytes={}", v.count, outer.len());
}
