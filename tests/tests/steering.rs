//! Port steering (issue 15) with the real daemons on simulated hosts that carry the
//! Docker-28.2-like firewall with **protected** networks only (no nat-unprotected
//! anywhere), every daemon with only CAP_NET_ADMIN.
//!
//! Discovery programs `table netdev <prefix>vrouter` in each host namespace: a service's
//! frame for a remote stack goes from its port straight into `vxlan<VNI>` (or, on the
//! same host, to the destination router's port), and a router's frame for one of its
//! services straight to that service's port, so the host's IP stack, bridge netfilter
//! and Docker's raw drop never see overlay traffic. The tests prove it with the hosts'
//! own counters (Docker's raw drops, firewalld's `ct state invalid` drops, `Ip:
//! ForwDatagrams`) beside reachability, and read the table as an operator would
//! (`nft list table netdev ...`, discovery.json's `steering` section).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use vrouter_state::{StackName, SteeringMode};
use vrouter_tests::mesh::{link_index, Mesh, StackDef};
use vrouter_tests::steering::{Count, NetdevTable, Steering};
use vrouter_tests::topology::UNDERLAY_GW;
use vrouter_tests::*;

const CONVERGE: Duration = Duration::from_secs(20);
/// How long discovery may take to steer the ports of a mesh that just started.
const STEER: Duration = Duration::from_secs(10);
/// What the issue allows for reflecting a port change in the chains.
const FOLLOW: Duration = Duration::from_secs(1);
/// Packets the host's IP stack may forward while overlay traffic runs: none of the
/// overlay's, a few of the daemons' own.
const FORWARD_OVERHEAD: u64 = 20;
/// Bytes each TCP transfer sends (and gets echoed back).
const TRANSFER: usize = 256 * 1024;

// ---------------------------------------------------------------------------------
// Helpers

fn stack_name(s: &str) -> StackName {
    StackName::new(s).unwrap()
}

/// Host-side veth of a container.
fn port(mesh: &Mesh, stack: &str, name: &str) -> String {
    mesh.container(stack, name).host_veth
}

/// The MAC of a container's eth0, as the bridge learns it (from netlink: /sys shows the
/// caller's namespace, not the container's).
fn mac_of(c: &Container) -> String {
    c.exec_ok(&["ip", "-o", "link", "show", "dev", "eth0"])
        .map(|o| o.stdout)
        .unwrap_or_default()
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default()
        .to_lowercase()
}

/// Pings `ip` from namespace `ns` on a thread of its own (as a service's entrypoint
/// would talk at once), so the caller can time the steering meanwhile.
fn ping_in_background(ns: &str, ip: &str) -> std::thread::JoinHandle<bool> {
    let (ns, ip) = (ns.to_string(), ip.to_string());
    std::thread::spawn(move || ping(&ns, &ip, 2, Duration::from_secs(2)))
}

/// `nft list table netdev <prefix>vrouter` in `host`'s namespace (empty: no table).
fn table_text(mesh: &Mesh, host: usize) -> String {
    mesh.topo
        .host(host)
        .exec(&["nft", "list", "table", "netdev", &steering::table_name()])
        .ok()
        .filter(|o| o.success())
        .map(|o| o.stdout)
        .unwrap_or_default()
}

fn table(mesh: &Mesh, host: usize) -> NetdevTable {
    mesh.steering_table(host).unwrap().unwrap_or_default()
}

/// Whether `dev` (ifindex `ifindex`) has its ingress chain, bound to that very device:
/// CONTRACT.md names the chain after the ifindex (`p_<ifindex>`, `r_<ifindex>`).
fn hooked(t: &NetdevTable, dev: &str, ifindex: u32) -> bool {
    t.chain_on(dev)
        .is_some_and(|c| c.name.ends_with(&format!("_{ifindex}")))
}

fn wait_steered(mesh: &Mesh) {
    if let Err(e) = mesh.wait_ports_steered(STEER) {
        panic!("{e:#}");
    }
}

fn reachable(mesh: &Mesh, from: &str, to: &str) -> bool {
    ping(
        &mesh.svc(from).ns,
        &mesh.svc(to).ip.to_string(),
        3,
        Duration::from_secs(3),
    )
}

/// A TCP transfer from `from` to `to` (a container each), echoed back: both directions
/// carry full segments. The receiver must see the sender's own address.
fn transfer_between(
    mesh: &Mesh,
    from: &Container,
    to: &Container,
    port: u16,
) -> Result<(), String> {
    let addr = format!("{}:{port}", to.ip);
    let server = TcpServer::start(&to.ns, &addr, mesh.topo.log_dir(), Duration::from_secs(10))
        .map_err(|e| format!("{e:#}"))?;
    tcp_send(&from.ns, &addr, TRANSFER, Duration::from_secs(10))
        .map_err(|e| format!("{} -> {addr}: {e:#}", from.ns))?;
    let peer = server
        .peer(Duration::from_secs(2))
        .map_err(|e| format!("{e:#}"))?;
    if peer.ip().to_string() != from.ip.to_string() {
        return Err(format!(
            "{} -> {addr}: receiver saw {peer}, sender is {} (NAT!)",
            from.ns, from.ip
        ));
    }
    Ok(())
}

fn transfer(mesh: &Mesh, from: &str, to: &str, port: u16) -> Result<(), String> {
    transfer_between(mesh, &mesh.svc(from), &mesh.svc(to), port)
}

/// Per host: Docker's raw drops, firewalld's invalid drops, and ForwDatagrams.
fn host_counters(mesh: &Mesh) -> Vec<(u64, u64, u64)> {
    mesh.topo
        .hosts()
        .iter()
        .map(|h| {
            let (raw, invalid) = h.firewall_drops().unwrap();
            (raw, invalid, h.forw_datagrams().unwrap())
        })
        .collect()
}

/// The hosts' counters grew by no raw drop, no invalid drop and at most the fixed
/// overhead of forwarded packets (the overlay traffic itself is not forwarded by them).
fn assert_host_stayed_out(before: &[(u64, u64, u64)], after: &[(u64, u64, u64)], what: &str) {
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        let h = i + 1;
        assert_eq!(
            a.0 - b.0,
            0,
            "{what}: host {h}: Docker's raw drop counted packets"
        );
        assert_eq!(
            a.1 - b.1,
            0,
            "{what}: host {h}: `ct state invalid drop` counted packets (the host saw half a connection)"
        );
        let fwd = a.2 - b.2;
        eprintln!("{what}: host {h} forwarded {fwd} packets during the overlay traffic");
        assert!(
            fwd <= FORWARD_OVERHEAD,
            "{what}: host {h} forwarded {fwd} packets (more than the overhead of {FORWARD_OVERHEAD}): overlay traffic crossed its IP stack"
        );
    }
}

/// Sum of the steering counters of `host` whose comment starts with `prefix`.
fn steer_count(mesh: &Mesh, host: usize, prefix: &str) -> Count {
    table(mesh, host)
        .rules
        .iter()
        .filter(|r| r.comment.as_deref().is_some_and(|c| c.starts_with(prefix)))
        .fold(Count::default(), |a, r| Count {
            packets: a.packets + r.packets,
            bytes: a.bytes + r.bytes,
        })
}

/// Sum of the counters of router `stack`'s ACL rules with comment `comment`.
fn acl_counter(mesh: &Mesh, stack: &str, comment: &str) -> u64 {
    let out = mesh
        .rtr(stack)
        .exec_ok(&["nft", "-j", "list", "table", "ip", "vrouter_acl"])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let mut n = 0;
    for item in v["nftables"].as_array().into_iter().flatten() {
        let rule = &item["rule"];
        if rule["comment"].as_str() != Some(comment) {
            continue;
        }
        for e in rule["expr"].as_array().into_iter().flatten() {
            n += e["counter"]["packets"].as_u64().unwrap_or(0);
        }
    }
    n
}

/// `count` UDP datagrams of `size` IP bytes from namespace `src` (bound to `bind`) to
/// `dst`'s `port`: how many arrived.
#[allow(clippy::too_many_arguments)]
fn udp_delivered(
    mesh: &Mesh,
    src: &str,
    bind: Option<Ipv4Addr>,
    dst: &Container,
    port: u16,
    count: u64,
    size: u64,
) -> u64 {
    let log = mesh.topo.log_dir().to_path_buf();
    let out = log.join(format!("sink-{}-{port}.out", dst.ns));
    let mut sink =
        UdpSink::start(&dst.ns, port, count, &out, Duration::from_secs(5), &log).unwrap();
    let mut sender = udp_burst_opts(
        src,
        &format!("{}:{port}", dst.ip),
        count,
        size,
        bind,
        None,
        &log,
    )
    .unwrap();
    sender.wait_success(Duration::from_secs(10)).unwrap();
    sink.received(Duration::from_secs(10)).unwrap().0
}

/// The MSS of the established TCP connections of namespace `ns` to or from `peer`
/// (`ss -tin`).
fn tcp_mss(ns: &str, peer: &str) -> Vec<u32> {
    let out = exec_ok(Some(ns), &["ss", "-tinH", "state", "established"])
        .map(|o| o.stdout)
        .unwrap_or_default();
    let mut v = Vec::new();
    let mut relevant = false;
    for line in out.lines() {
        if !line.starts_with(char::is_whitespace) {
            relevant = line.contains(peer);
            continue;
        }
        if !relevant {
            continue;
        }
        for tok in line.split_whitespace() {
            if let Some(m) = tok.strip_prefix("mss:") {
                if let Ok(m) = m.parse() {
                    v.push(m);
                }
            }
        }
    }
    v
}

// ---------------------------------------------------------------------------------
// Reachability with the host out of the path

/// Host 1: a and c (VNI 1000), f (VNI 2000); host 2: b (VNI 1000), d (VNI 2000); every
/// network protected.
fn protected_mesh(test: &str, ct_invalid_drop: bool) -> Mesh {
    let mut mesh = Mesh::build(
        test,
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("c", 1, 1000, "10.3.0.0/24"),
            StackDef::new("d", 2, 2000, "10.4.0.0/24"),
            StackDef::new("f", 1, 2000, "10.6.0.0/24"),
        ],
    )
    .expect("mesh builds");
    for h in 1..=2 {
        mesh.topo
            .host_mut(h)
            .set_ct_invalid_drop(ct_invalid_drop)
            .unwrap();
    }
    mesh.set_steering(Steering::Ports);
    mesh.start_all().expect("mesh starts");
    mesh
}

/// Same-host stacks on one VNI reach each other both ways with their addresses kept,
/// cross-host works, another VNI stays out; meanwhile Docker's raw drop and the hosts'
/// IP forwarding see none of it, and discovery reports port steering with counters.
fn same_host_and_cross_host_with_the_host_out_of_the_path(test: &str, ct_invalid_drop: bool) {
    let mesh = protected_mesh(test, ct_invalid_drop);
    let fw_before = mesh.topo.firewall_snapshots().unwrap();
    mesh.wait_converged(CONVERGE).unwrap();
    wait_steered(&mesh);
    for (h, stack) in [(1, "a"), (1, "c"), (1, "f"), (2, "b"), (2, "d")] {
        let st = mesh.discovery_file(h).unwrap().steering.unwrap();
        assert_eq!(st.mode, SteeringMode::Ports, "host {h}");
        assert_eq!(st.table, steering::table_name(), "host {h}");
        let s = &st.stacks[&stack_name(stack)];
        assert!(s.reason.is_none(), "stack {stack}: {:?}", s.reason);
        assert!(
            s.ports.contains(&port(&mesh, stack, "svc")),
            "stack {stack}'s service port not listed: {:?}",
            s.ports
        );
    }

    let pairs = [("a", "c"), ("a", "b"), ("c", "b"), ("f", "d")];
    // Warm-up (neighbours, learned MACs), outside the measurement.
    for (x, y) in pairs {
        for (from, to) in [(x, y), (y, x)] {
            let ok = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
                reachable(&mesh, from, to)
            });
            assert!(
                ok,
                "ping {from} -> {to} failed (protected networks, port steering)"
            );
        }
    }
    let port_a = format!("port {} a", port(&mesh, "a", "svc"));
    let steered_a = table(&mesh, 1).counter(&port_a);
    let before = host_counters(&mesh);

    let mut tcp_port = 5100;
    for (x, y) in pairs {
        for (from, to) in [(x, y), (y, x)] {
            assert!(reachable(&mesh, from, to), "ping {from} -> {to} failed");
            tcp_port += 1;
            if let Err(e) = transfer(&mesh, from, to, tcp_port) {
                mesh.dump_logs();
                panic!("{e}");
            }
        }
    }
    // A connection that stays open both ways for a while.
    let b = mesh.svc("b");
    let addr = format!("{}:5199", mesh.svc("c").ip);
    let _server = TcpServer::start(
        &mesh.svc("c").ns,
        &addr,
        mesh.topo.log_dir(),
        Duration::from_secs(30),
    )
    .unwrap();
    let mut hold = tcp_hold(
        &b.ns,
        &addr,
        Duration::from_secs(3),
        Duration::from_millis(1000),
        mesh.topo.log_dir(),
    )
    .unwrap();
    hold.wait_success(Duration::from_secs(15))
        .expect("a held TCP connection b <-> c saw no stall");

    let after = host_counters(&mesh);
    let what = if ct_invalid_drop {
        "with ct state invalid drop"
    } else {
        "Docker-28.2 firewall"
    };
    assert_host_stayed_out(&before, &after, what);
    // The traffic went through the chains: a's service port counted at least what a
    // sent (two transfers from a and two echoes from it, TRANSFER bytes each; packets
    // may be GSO super-packets, so bytes are the measure).
    let steered = table(&mesh, 1).counter(&port_a) - steered_a;
    assert!(
        steered.bytes >= 4 * TRANSFER as u64,
        "rule `{port_a}` counted {steered:?}, want at least {} bytes",
        4 * TRANSFER
    );

    // VNI isolation (after the counters: these pings reach the host, which drops them).
    for (from, to) in [
        ("a", "f"),
        ("c", "f"),
        ("f", "a"),
        ("b", "d"),
        ("a", "d"),
        ("d", "c"),
    ] {
        assert!(
            !reachable(&mesh, from, to),
            "{from} reached {to} across VNIs"
        );
    }
    // The routers do not probe for the same-host block in ports mode.
    assert!(
        !mesh.events(1).iter().any(|e| e.kind == "same_host_blocked"),
        "same_host_blocked reported under port steering"
    );
    // Docker's rules were never touched.
    assert_eq!(
        fw_before,
        mesh.topo.firewall_snapshots().unwrap(),
        "firewall changed"
    );
}

#[test]
fn protected_stacks_reach_each_other_and_the_host_stays_out() {
    require_root!();
    same_host_and_cross_host_with_the_host_out_of_the_path("steer_protected", false);
}

/// The same under firewalld's `ct state invalid drop` in the hosts' forward chain:
/// a host that saw only one direction of a TCP connection would drop the other.
#[test]
fn ct_state_invalid_drop_sees_no_half_connections() {
    require_root!();
    same_host_and_cross_host_with_the_host_out_of_the_path("steer_ct_invalid", true);
}

// ---------------------------------------------------------------------------------
// Following the ports

/// Every ingress chain of `host`'s table sits on a port of a running container, and
/// every such port of the host's stacks has one: nothing is left behind.
fn assert_chains_match_ports(mesh: &Mesh, host: usize) {
    let want: BTreeSet<String> = mesh
        .topo
        .host(host)
        .networks()
        .iter()
        .flat_map(|n| n.containers.iter().map(|c| c.host_veth.clone()))
        .collect();
    let t = table(mesh, host);
    let have: BTreeSet<String> = t.hooked_devices().into_iter().collect();
    assert_eq!(
        have,
        want,
        "host {host}: ingress chains {have:?}, ports {want:?}\n{}",
        table_text(mesh, host)
    );
    for c in &t.chains {
        if c.hook.is_some() {
            let dev = c.dev.as_deref().unwrap_or_default();
            match mesh.ifindex(host, dev) {
                Ok(idx) => assert!(
                    c.name.ends_with(&format!("_{idx}")),
                    "chain {} on {dev} (ifindex {idx}) is a stale one",
                    c.name
                ),
                Err(e) => panic!("chain {} on {dev}, which is gone: {e:#}", c.name),
            }
        }
    }
}

/// Waits (at most [`FOLLOW`]) until `dev` is steered with its current ifindex and, when
/// given, `mac` is in the table (the delivery map); returns how long it took.
fn wait_follow(mesh: &Mesh, host: usize, dev: &str, mac: Option<&str>, t0: Instant) -> Duration {
    let idx = mesh.ifindex(host, dev).unwrap();
    let ok = wait_until(FOLLOW * 3, Duration::from_millis(20), || {
        hooked(&table(mesh, host), dev, idx)
            && mac.is_none_or(|m| table_text(mesh, host).contains(m))
    });
    let took = t0.elapsed();
    if !ok {
        mesh.dump_logs();
        panic!(
            "{dev} (ifindex {idx}, MAC {mac:?}) not steered {took:?} after the change:\n{}",
            table_text(mesh, host)
        );
    }
    took
}

/// A service recreated (new veth, new MAC, same address), a service added and one
/// removed, and a router restarted in a fresh namespace: each is steered again within
/// 1 s, works at once, and leaves no chain or element behind.
#[test]
fn chains_follow_services_and_routers_within_a_second() {
    require_root!();
    let mut mesh = Mesh::start_with_steering(
        "steer_follow",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("c", 1, 1000, "10.3.0.0/24"),
        ],
        Steering::Ports,
    )
    .expect("mesh starts");
    mesh.wait_converged(CONVERGE).unwrap();
    wait_steered(&mesh);
    let b_ip = mesh.svc("b").ip.to_string();
    assert!(reachable(&mesh, "a", "b") && reachable(&mesh, "a", "c"));
    assert_chains_match_ports(&mesh, 1);

    // Recreated: same veth name and address, new ifindex and MAC. The service talks at
    // once, as an entrypoint would.
    let svc_port = port(&mesh, "a", "svc");
    let old_idx = mesh.ifindex(1, &svc_port).unwrap();
    let old_mac = mac_of(&mesh.svc("a"));
    let svc = mesh.recreate_service("a").unwrap();
    let t0 = Instant::now();
    let first = ping_in_background(&svc.ns, &b_ip);
    let new_mac = mac_of(&svc);
    assert_ne!(old_mac, new_mac);
    let took = wait_follow(&mesh, 1, &svc_port, Some(&new_mac), t0);
    let first = first.join().unwrap();
    if !first {
        // What the new service's neighbours hold for it (a stale MAC?).
        for c in [mesh.rtr("a"), svc.clone()] {
            eprintln!("{}: {:?}", c.ns, c.exec(&["ip", "neigh"]).map(|o| o.stdout));
        }
        eprintln!("new MAC {new_mac}, old {old_mac}\n{}", table_text(&mesh, 1));
    }
    eprintln!("recreated service steered after {took:?} (its first pings answered: {first})");
    assert!(
        first,
        "the recreated service's first pings to b got no answer"
    );
    assert!(took <= FOLLOW, "recreated service steered after {took:?}");
    assert_ne!(old_idx, mesh.ifindex(1, &svc_port).unwrap());
    let gone = wait_until(FOLLOW, Duration::from_millis(50), || {
        !table_text(&mesh, 1).contains(&old_mac)
    });
    assert!(gone, "old MAC {old_mac} still in the table");
    assert_chains_match_ports(&mesh, 1);
    // Works both ways, steered.
    let before = table(&mesh, 1).counter(&format!("port {svc_port} a"));
    transfer(&mesh, "a", "b", 5301).unwrap();
    transfer(&mesh, "c", "a", 5302).unwrap();
    let after = table(&mesh, 1).counter(&format!("port {svc_port} a"));
    assert!(
        after.packets > before.packets,
        "the recreated service's traffic is not steered ({before:?} -> {after:?})"
    );

    // Added: a second service on a's network.
    let svc2 = mesh.add_service("a", "svc2", "10.1.0.6").unwrap();
    let t0 = Instant::now();
    let first = ping_in_background(&svc2.ns, &b_ip);
    let svc2_mac = mac_of(&svc2);
    let took = wait_follow(&mesh, 1, &svc2.host_veth, Some(&svc2_mac), t0);
    let first = first.join().unwrap();
    eprintln!("added service steered after {took:?} (its first pings answered: {first})");
    assert!(first, "the added service's first pings to b got no answer");
    assert!(took <= FOLLOW, "added service steered after {took:?}");
    assert_chains_match_ports(&mesh, 1);
    transfer_between(&mesh, &svc2, &mesh.svc("b"), 5303).unwrap();
    transfer_between(&mesh, &mesh.svc("b"), &svc2, 5304).unwrap();
    assert!(
        table(&mesh, 1)
            .counter(&format!("port {} a", svc2.host_veth))
            .packets
            > 0
    );

    // Removed: its chain and MAC go.
    let t0 = Instant::now();
    mesh.remove_service("a", "svc2").unwrap();
    let ok = wait_until(FOLLOW * 3, Duration::from_millis(20), || {
        let t = table(&mesh, 1);
        t.chain_on(&svc2.host_veth).is_none() && !table_text(&mesh, 1).contains(&svc2_mac)
    });
    let took = t0.elapsed();
    assert!(
        ok,
        "removed service's chain or MAC left behind:\n{}",
        table_text(&mesh, 1)
    );
    eprintln!("removed service unsteered after {took:?}");
    assert!(took <= FOLLOW, "removed service unsteered after {took:?}");
    assert_chains_match_ports(&mesh, 1);

    // Router restarted in a fresh namespace: a new veth, the same (pinned) MAC.
    let rtr_port = port(&mesh, "a", "rtr");
    let old_rtr = mesh.ifindex(1, &rtr_port).unwrap();
    mesh.stop_router("a", libc::SIGTERM).unwrap();
    {
        let s = mesh.stack("a").clone();
        let h = mesh.topo.host_mut(1);
        h.remove_container(s.name, "rtr").unwrap();
        h.add_container(s.name, "rtr", &s.router_ip(), Role::Router)
            .unwrap();
    }
    let t0 = Instant::now();
    mesh.start_router("a").unwrap();
    let took = wait_follow(&mesh, 1, &rtr_port, None, t0);
    eprintln!("restarted router's port steered {took:?} after its process started");
    assert!(
        took <= FOLLOW,
        "restarted router's port steered after {took:?}"
    );
    assert_ne!(old_rtr, mesh.ifindex(1, &rtr_port).unwrap());
    assert!(mesh.wait_router_routes("a", &["b", "c"], Duration::from_secs(5)));
    assert_chains_match_ports(&mesh, 1);
    let deliver = table(&mesh, 1).counter("deliver a");
    let ok = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        reachable(&mesh, "b", "a") && reachable(&mesh, "c", "a")
    });
    assert!(ok, "a not reachable after its router restarted");
    transfer(&mesh, "b", "a", 5305).unwrap();
    assert!(
        table(&mesh, 1).counter("deliver a").packets > deliver.packets,
        "the new router's deliveries are not steered"
    );
}

// ---------------------------------------------------------------------------------
// What is not steered

/// Services whose MTU (1500) is above the overlay's (1450): an oversized datagram gets
/// ICMP "fragmentation needed" back (the service learns the path MTU and the rest
/// arrives), and TCP settles on the overlay's MSS (1410, which `ss` shows as 1398 with
/// timestamps) from the handshake on, so full segments cross, both ways, cross-host and
/// on the same host. Without the clamp the sockets would show 1448 until a loss.
#[test]
fn oversized_frames_get_icmp_and_tcp_gets_the_overlay_mss() {
    require_root!();
    let mesh = Mesh::start_with_steering(
        "steer_mtu",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("c", 1, 1000, "10.3.0.0/24"),
        ],
        Steering::Ports,
    )
    .expect("mesh starts");
    mesh.wait_converged(CONVERGE).unwrap();
    wait_steered(&mesh);
    let a = mesh.svc("a");
    let link = a
        .exec_ok(&["ip", "-o", "link", "show", "dev", "eth0"])
        .unwrap()
        .stdout;
    assert!(link.contains("mtu 1500"), "service MTU is not 1500: {link}");
    let ovl = mesh
        .rtr("a")
        .exec_ok(&["ip", "-o", "link", "show", "dev", "ovl1000"])
        .unwrap()
        .stdout;
    assert!(ovl.contains("mtu 1450"), "overlay MTU is not 1450: {ovl}");
    assert!(reachable(&mesh, "a", "b") && reachable(&mesh, "a", "c"));

    for (to, port) in [("b", 7401u16), ("c", 7402)] {
        let dst = mesh.svc(to);
        let dst_ip = dst.ip.to_string();
        // Full-size datagrams (DF, as Linux sends UDP): the first one is answered with
        // ICMP, the service caches the path MTU and fragments the rest.
        let got = udp_delivered(&mesh, &a.ns, None, &dst, port, 20, 1500);
        let route = a
            .exec_ok(&["ip", "-4", "route", "get", &dst_ip])
            .unwrap()
            .stdout;
        eprintln!("a -> {to}: {got} of 20 full-size datagrams arrived; route: {route}");
        assert!(
            route.contains("mtu 1450"),
            "a -> {to}: no ICMP fragmentation-needed came back (route cache: {route})"
        );
        assert!(got >= 18, "a -> {to}: only {got} of 20 datagrams arrived");
    }

    // TCP: the handshake's MSS is clamped at the ports, both ways.
    for (from, to, port) in [("a", "b", 7411u16), ("b", "a", 7412), ("a", "c", 7413)] {
        let (src, dst) = (mesh.svc(from), mesh.svc(to));
        let addr = format!("{}:{port}", dst.ip);
        let _server =
            TcpServer::start(&dst.ns, &addr, mesh.topo.log_dir(), Duration::from_secs(30)).unwrap();
        let mut hold = tcp_hold(
            &src.ns,
            &addr,
            Duration::from_secs(3),
            Duration::from_millis(1000),
            mesh.topo.log_dir(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let (ms, md) = (
            tcp_mss(&src.ns, &dst.ip.to_string()),
            tcp_mss(&dst.ns, &src.ip.to_string()),
        );
        eprintln!("{from} -> {to}: MSS sender {ms:?}, receiver {md:?}");
        assert!(
            !ms.is_empty() && !md.is_empty(),
            "{from} -> {to}: no established connection seen by ss"
        );
        assert!(
            ms.iter().chain(&md).all(|m| *m <= 1410),
            "{from} -> {to}: MSS above the overlay's 1410 (sender {ms:?}, receiver {md:?})"
        );
        hold.wait_success(Duration::from_secs(15)).unwrap();
        // Full segments both ways.
        transfer(&mesh, from, to, port + 100).unwrap();
    }
}

/// A service that sends from an address outside its stack's prefixes: the frame is not
/// steered but goes to its own router, whose anti-spoof rule drops it, cross-host and
/// on the same host.
#[test]
fn forged_source_goes_to_the_router_and_is_dropped() {
    require_root!();
    let mesh = Mesh::start_with_steering(
        "steer_spoof",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("c", 1, 1000, "10.3.0.0/24"),
        ],
        Steering::Ports,
    )
    .expect("mesh starts");
    mesh.wait_converged(CONVERGE).unwrap();
    wait_steered(&mesh);
    let a = mesh.svc("a");
    assert!(reachable(&mesh, "a", "b") && reachable(&mesh, "a", "c"));
    // Genuine traffic arrives.
    for (to, port) in [("b", 7501u16), ("c", 7502)] {
        assert_eq!(
            udp_delivered(&mesh, &a.ns, None, &mesh.svc(to), port, 20, 200),
            20
        );
    }
    // An address of b's, on a's service.
    a.exec_ok(&["ip", "addr", "add", "10.2.0.77/32", "dev", "lo"])
        .unwrap();
    let forged: Ipv4Addr = "10.2.0.77".parse().unwrap();
    let n = 30;
    for (to, port) in [("b", 7503u16), ("c", 7504)] {
        let dropped = acl_counter(&mesh, "a", "acl spoof-from-stack");
        let own = table(&mesh, 1).counter("own a");
        let got = udp_delivered(&mesh, &a.ns, Some(forged), &mesh.svc(to), port, n, 200);
        assert_eq!(got, 0, "{to} received datagrams forged by a's service");
        let dropped = acl_counter(&mesh, "a", "acl spoof-from-stack") - dropped;
        let own = table(&mesh, 1).counter("own a") - own;
        assert_eq!(dropped, n, "router a's spoof-from-stack counter (to {to})");
        assert!(
            own.packets >= n,
            "the forged frames to {to} did not go to a's router: `own a` counted {own:?}"
        );
    }
}

/// A stack whose router runs a restricting policy (conntrack): its frames go through
/// its own router, so the router sees both directions and its connections work both
/// ways, cross-host and on the same host, with the hosts' `ct state invalid drop` on;
/// a stack with the default policy goes straight past its router.
#[test]
fn restricting_policy_keeps_both_directions_through_its_router() {
    require_root!();
    let mut mesh = Mesh::build(
        "steer_conntrack",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("c", 1, 1000, "10.3.0.0/24"),
        ],
    )
    .expect("mesh builds");
    for h in 1..=2 {
        mesh.topo.host_mut(h).set_ct_invalid_drop(true).unwrap();
    }
    mesh.set_router_env("a", "VROUTER_DEFAULT_POLICY", "deny");
    mesh.set_router_env(
        "a",
        "VROUTER_ALLOW",
        "b:tcp/7601, c:tcp/7601, b:icmp, c:icmp",
    );
    mesh.set_steering(Steering::Ports);
    mesh.start_all().expect("mesh starts");
    mesh.wait_converged(CONVERGE).unwrap();
    wait_steered(&mesh);
    for (from, to) in [("b", "a"), ("c", "a"), ("a", "b"), ("a", "c")] {
        let ok = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
            reachable(&mesh, from, to)
        });
        assert!(ok, "ping {from} -> {to} (allowed by a's policy) failed");
    }
    let before = host_counters(&mesh);
    let own = table(&mesh, 1).counter("own a");
    let direct_c = steer_count(&mesh, 1, "steer c ");
    // Into a, allowed; out of a, replies admitted as established.
    transfer(&mesh, "b", "a", 7601).unwrap();
    transfer(&mesh, "c", "a", 7601).unwrap();
    transfer(&mesh, "a", "b", 7602).unwrap();
    transfer(&mesh, "a", "c", 7603).unwrap();
    // The policy holds: a port it does not allow stays closed.
    let dst = mesh.svc("a");
    let addr = format!("{}:7604", dst.ip);
    let _server =
        TcpServer::start(&dst.ns, &addr, mesh.topo.log_dir(), Duration::from_secs(5)).unwrap();
    assert!(
        tcp_send(&mesh.svc("b").ns, &addr, 1024, Duration::from_secs(2)).is_err(),
        "b reached a's TCP 7604, which a's policy does not allow"
    );
    let after = host_counters(&mesh);
    assert_host_stayed_out(&before, &after, "restricting policy");
    let own = table(&mesh, 1).counter("own a") - own;
    assert!(
        own.bytes >= 2 * TRANSFER as u64,
        "a's frames did not go through its router: `own a` counted {own:?}"
    );
    let direct_c = steer_count(&mesh, 1, "steer c ") - direct_c;
    assert!(
        direct_c.bytes >= TRANSFER as u64,
        "c's (default policy) frames were not steered past its router: {direct_c:?}"
    );
}

// ---------------------------------------------------------------------------------
// Modes and cleanup

/// `VROUTER_STEERING=rule`: discovery deletes its table and reports `rule`; the
/// policy-rule path carries cross-host traffic, and Docker's raw drop blocks the
/// protected same-host pair again (as documented for that mode).
#[test]
fn rule_mode_removes_the_table_and_uses_the_policy_rule_path() {
    require_root!();
    let mut mesh = Mesh::start_with_steering(
        "steer_rule",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("c", 1, 1000, "10.3.0.0/24"),
        ],
        Steering::Ports,
    )
    .expect("mesh starts");
    mesh.wait_converged(CONVERGE).unwrap();
    wait_steered(&mesh);
    assert!(
        reachable(&mesh, "a", "c"),
        "same-host pair under port steering"
    );

    mesh.stop_discovery(1, libc::SIGTERM).unwrap();
    // The datapath is headless: steering stays while discovery is down.
    assert!(mesh.steering_table(1).unwrap().is_some());
    assert!(reachable(&mesh, "a", "b"), "a -> b with discovery stopped");
    mesh.set_discovery_env(1, "VROUTER_STEERING", "rule");
    mesh.start_discovery(1).unwrap();
    let ok = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        mesh.steering_table(1).unwrap().is_none()
            && mesh
                .discovery_file(1)
                .and_then(|d| d.steering)
                .is_some_and(|s| {
                    s.mode == SteeringMode::Rule
                        && s.stacks.values().all(|st| st.mode == SteeringMode::Rule)
                })
    });
    if !ok {
        mesh.dump_logs();
        panic!(
            "rule mode: table still there or status not `rule`: {:?}\n{}",
            mesh.discovery_file(1).and_then(|d| d.steering),
            table_text(&mesh, 1)
        );
    }
    let before = host_counters(&mesh);
    assert!(reachable(&mesh, "a", "b"), "a -> b in rule mode");
    transfer(&mesh, "a", "b", 5401).unwrap();
    let after = host_counters(&mesh);
    assert!(
        after[0].2 - before[0].2 > FORWARD_OVERHEAD,
        "rule mode: host 1 forwarded only {} packets; the policy-rule path forwards every one",
        after[0].2 - before[0].2
    );
    // Protected same-host pair: blocked by the raw drop, which counts it.
    assert!(
        !reachable(&mesh, "a", "c"),
        "protected same-host pair passed in rule mode"
    );
    assert!(
        host_counters(&mesh)[0].0 > after[0].0,
        "rule mode: the raw drop did not count the same-host packets"
    );
}

/// `vrouter-discovery cleanup`, once the stacks and discovery are gone, leaves no
/// steering table behind (with no chain or element).
#[test]
fn cleanup_leaves_no_steering_table() {
    require_root!();
    let mut mesh = Mesh::start_with_steering(
        "steer_cleanup",
        1,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("c", 1, 1000, "10.3.0.0/24"),
        ],
        Steering::Ports,
    )
    .expect("mesh starts");
    mesh.wait_converged(CONVERGE).unwrap();
    wait_steered(&mesh);
    assert!(reachable(&mesh, "a", "c"));
    for s in ["a", "c"] {
        mesh.stop_router(s, libc::SIGTERM).unwrap();
    }
    mesh.stop_discovery(1, libc::SIGTERM).unwrap();
    // `compose down`: the containers and their ports go.
    for s in ["a", "c"] {
        for c in ["svc", "rtr"] {
            mesh.topo.host_mut(1).remove_container(s, c).unwrap();
        }
    }
    let (ok, out) = mesh.run_cleanup(1);
    assert!(ok, "{out}");
    assert!(
        mesh.steering_table(1).unwrap().is_none(),
        "cleanup left the steering table:\n{}\n{out}",
        table_text(&mesh, 1)
    );
    let all = mesh
        .topo
        .host(1)
        .exec_ok(&["nft", "list", "tables"])
        .unwrap()
        .stdout;
    assert!(!all.contains("netdev"), "a netdev table is left: {all}");
}

/// The harness's counters count what they claim, without any daemon: a packet from one
/// protected network to another's container hits Docker's raw drop; a packet from a
/// container to the underlay is forwarded by the host; a TCP segment conntrack cannot
/// place (a lone SYN-ACK with a bad checksum) hits firewalld's `ct state invalid drop`,
/// and only when that option is on.
#[test]
fn harness_counts_raw_drops_forwarding_and_invalid_packets() {
    require_root!();
    let mut topo = Topology::builder("steer_harness").hosts(1).build().unwrap();
    let h = topo.host_mut(1);
    h.add_network("a", "10.1.0.0/24", Protection::Protected)
        .unwrap();
    h.add_network("c", "10.3.0.0/24", Protection::Protected)
        .unwrap();
    let a = h
        .add_container("a", "svc", "10.1.0.5", Role::Service)
        .unwrap();
    let c = h
        .add_container("c", "svc", "10.3.0.5", Role::Service)
        .unwrap();
    assert!(link_index(&h.ns, &a.host_veth).unwrap() > 0);
    // No steering table on a host without discovery.
    assert!(steering::read_table(Some(&h.ns), &steering::table_name())
        .unwrap()
        .is_none());
    assert_eq!(h.firewall_drops().unwrap(), (0, 0));

    // c -> a through the host: Docker's raw drop.
    assert!(!ping(&c.ns, "10.1.0.5", 2, Duration::from_millis(1500)));
    let (raw, _) = h.firewall_drops().unwrap();
    assert!(raw >= 2, "raw drops counted {raw}");

    // a -> the underlay gateway: forwarded (and masqueraded) by the host.
    let fwd = h.forw_datagrams().unwrap();
    assert!(ping(
        &a.ns,
        &UNDERLAY_GW.to_string(),
        3,
        Duration::from_secs(3)
    ));
    let grown = h.forw_datagrams().unwrap() - fwd;
    assert!(grown >= 3, "ForwDatagrams grew by {grown}");

    // A lone SYN-ACK toward the underlay, without and with `ct state invalid drop`.
    let syn_ack = |c: &Container| {
        let script = "import socket,struct\n\
            s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_TCP)\n\
            h=struct.pack('!HHIIBBHHH',40000,9,1,1,5<<4,0x12,1024,0xdead,0)\n\
            [s.sendto(h,('198.18.0.254',0)) for _ in range(3)]\n";
        c.exec_ok(&["/usr/bin/python3", "-c", script]).unwrap();
    };
    syn_ack(&a);
    assert_eq!(h.firewall_drops().unwrap().1, 0, "no firewalld table yet");
    h.set_ct_invalid_drop(true).unwrap();
    assert!(h
        .firewall_snapshot()
        .unwrap()
        .contains("ct state invalid counter drop"));
    syn_ack(&a);
    let (_, invalid) = h.firewall_drops().unwrap();
    assert!(invalid >= 3, "ct state invalid drop counted {invalid}");
    h.set_ct_invalid_drop(false).unwrap();
    assert!(!h.firewall_snapshot().unwrap().contains("filter_FORWARD"));
}
