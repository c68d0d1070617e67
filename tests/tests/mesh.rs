//! End-to-end tests of the static mesh: the real vrouter-discovery and vrouter-router
//! binaries on simulated hosts that carry a Docker-28.2-like firewall, each daemon with
//! only CAP_NET_ADMIN and a read-only /proc/sys.

use std::time::{Duration, Instant};
use vrouter_tests::mesh::{Mesh, StackDef};
use vrouter_tests::steering::Steering;
use vrouter_tests::*;

const CONVERGE: Duration = Duration::from_secs(20);

/// Three hosts: A, C, F on host 1; B on host 2; D, G on host 3. Every network keeps
/// Docker's default protection under port steering (the default); with
/// `VROUTER_STEERING=rule` A and C (same host and VNI) use nat-unprotected networks,
/// which that mode needs for same-host traffic.
fn full_mesh(test: &str, mode: Steering) -> Mesh {
    Mesh::start_with_steering(
        test,
        3,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24").same_host_peer(mode),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("c", 1, 1000, "10.3.0.0/24").same_host_peer(mode),
            StackDef::new("d", 3, 2000, "10.4.0.0/24"),
            StackDef::new("f", 1, 2000, "10.6.0.0/24"),
            StackDef::new("g", 3, 2000, "10.7.0.0/24"),
        ],
        mode,
    )
    .expect("mesh starts")
}

fn two_hosts(test: &str) -> Mesh {
    Mesh::start(
        test,
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
        ],
    )
    .expect("mesh starts")
}

/// A TCP connection from one stack's service to another's that exchanges a message every
/// 100 ms for `duration` and fails on any stall longer than `max_stall`; check it with
/// `wait_success` on the returned probe. The server must outlive the probe.
fn hold_connection(
    mesh: &Mesh,
    from: &str,
    to: &str,
    port: u16,
    duration: Duration,
    max_stall: Duration,
) -> (TcpServer, Daemon) {
    let dst = mesh.svc(to);
    let addr = format!("{}:{port}", dst.ip);
    let server =
        TcpServer::start(&dst.ns, &addr, mesh.topo.log_dir(), Duration::from_secs(30)).unwrap();
    let hold = tcp_hold(
        &mesh.svc(from).ns,
        &addr,
        duration,
        max_stall,
        mesh.topo.log_dir(),
    )
    .unwrap();
    server.peer(Duration::from_secs(3)).unwrap();
    (server, hold)
}

fn reachable(mesh: &Mesh, from: &str, to: &str) -> bool {
    ping(
        &mesh.svc(from).ns,
        &mesh.svc(to).ip.to_string(),
        3,
        Duration::from_secs(3),
    )
}

/// Under port steering (the default) every pair on a VNI passes, the protected
/// same-host pair D/G included, and no router reports a same-host block.
#[test]
fn connectivity_isolation_and_protected_same_host() {
    require_root!();
    connectivity_and_isolation("connectivity", Steering::Ports);
}

/// With `VROUTER_STEERING=rule` (the policy-rule path), the protected same-host pair
/// D/G is blocked by Docker's raw drop and reported, the nat-unprotected pair A/C passes.
#[test]
fn connectivity_isolation_and_same_host_block_in_rule_mode() {
    require_root!();
    connectivity_and_isolation("connectivity_rule", Steering::Rule);
}

fn connectivity_and_isolation(test: &str, mode: Steering) {
    let mesh = full_mesh(test, mode);
    let fw_before = mesh.topo.firewall_snapshots().unwrap();
    mesh.wait_converged(CONVERGE).unwrap();

    // Every pair on a VNI, across hosts and on the same host (in rule mode, except the
    // protected pair).
    let mut pairs = vec![("a", "b"), ("a", "c"), ("b", "c"), ("d", "f"), ("f", "g")];
    if mode == Steering::Ports {
        pairs.push(("d", "g"));
    }
    let mut port = 5100;
    for (x, y) in pairs {
        for (from, to) in [(x, y), (y, x)] {
            assert!(reachable(&mesh, from, to), "ping {from} -> {to} failed");
            port += 1;
            mesh.transfer(from, to, port).unwrap();
        }
    }

    // The routers' overlay probes reach the remote routers (not the same-host ones).
    let overlay_ok = |host: usize, stack: &str, peers: &[&str]| {
        let dir = vrouter_state::StateDir::open_readonly(&mesh.state_dir(host)).unwrap();
        let files = dir.read_all_probes();
        let Some(f) = files.iter().find(|f| f.stack.as_str() == stack) else {
            return false;
        };
        let mut seen: Vec<String> = f
            .peers
            .iter()
            .filter(|p| p.reachable)
            .map(|p| p.stack.to_string())
            .collect();
        seen.sort();
        f.peers.len() == peers.len() && seen == peers
    };
    let probed = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
        overlay_ok(1, "a", &["b"])
            && overlay_ok(2, "b", &["a", "c"])
            && overlay_ok(1, "f", &["d", "g"])
    });
    assert!(probed, "overlay probes did not reach the remote routers");

    // VNI isolation: nothing between VNI 1000 and 2000.
    for (from, to) in [("a", "f"), ("a", "d"), ("b", "g"), ("f", "c")] {
        assert!(
            !reachable(&mesh, from, to),
            "{from} reached {to} across VNIs"
        );
    }
    // Not even with a route and neighbour to F forced by hand into router A.
    let rtr_a = mesh.rtr("a");
    let f = mesh.stack("f");
    let f_mac = vrouter_state::Mac::for_router(
        vrouter_state::Vni::new(f.vni).unwrap(),
        f.router_ip().parse().unwrap(),
    );
    let mut crossed = false;
    for _ in 0..3 {
        rtr_a
            .exec_ok(&[
                "ip",
                "neigh",
                "replace",
                &f.router_ip(),
                "lladdr",
                &f_mac.to_string(),
                "dev",
                "ovl1000",
                "nud",
                "permanent",
            ])
            .unwrap();
        rtr_a
            .exec_ok(&[
                "ip",
                "route",
                "replace",
                f.cidr,
                "via",
                &f.router_ip(),
                "dev",
                "ovl1000",
                "onlink",
            ])
            .unwrap();
        crossed |= ping(&rtr_a.ns, &f.service_ip(), 1, Duration::from_secs(1));
    }
    let _ = rtr_a.exec(&["ip", "route", "del", f.cidr]);
    assert!(
        !crossed,
        "router A reached F over VNI 1000 with a forced route"
    );

    match mode {
        Steering::Ports => {
            // Same-host traffic does not cross the host: nothing to block or report.
            for h in [1, 3] {
                assert!(
                    !mesh.events(h).iter().any(|e| e.kind == "same_host_blocked"),
                    "same_host_blocked on host {h} under port steering"
                );
            }
        }
        Steering::Rule => {
            // The protected same-host pair D/G is blocked by Docker's raw rule, as
            // documented, while the unprotected pair A/C passes (checked above).
            assert!(
                !reachable(&mesh, "d", "g"),
                "protected same-host pair passed"
            );
            assert!(
                !reachable(&mesh, "g", "d"),
                "protected same-host pair passed"
            );
            // ... and the routers report it, naming the network and the fix.
            let ok = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
                mesh.events(3).iter().any(|e| {
                    e.kind == "same_host_blocked"
                        && e.message.contains("nat-unprotected")
                        && (e.message.contains("stack d") || e.message.contains("stack g"))
                })
            });
            assert!(ok, "no same_host_blocked event on host 3");
            // The unprotected pair is not reported.
            assert!(!mesh.events(1).iter().any(|e| e.kind == "same_host_blocked"));
        }
    }

    assert_eq!(
        fw_before,
        mesh.topo.firewall_snapshots().unwrap(),
        "firewall changed"
    );
}

#[test]
fn discovery_restart_keeps_connections_and_repairs_drift() {
    require_root!();
    let mut mesh = two_hosts("discovery_restart");
    mesh.wait_converged(CONVERGE).unwrap();
    let h1 = mesh.topo.host(1).ns.clone();
    let vx_before = mesh.ifindex(1, "vxlan1000").unwrap();
    let ovl_before = vrouter_tests::mesh::link_index(&mesh.rtr("a").ns, "ovl1000").unwrap();

    let (_server, mut hold) = hold_connection(
        &mesh,
        "a",
        "b",
        5200,
        Duration::from_secs(8),
        Duration::from_secs(2),
    );

    mesh.stop_discovery(1, libc::SIGTERM).unwrap();
    // Drift while discovery is down: one FDB row and one steering rule disappear.
    let b_mac = vrouter_state::Mac::for_router(
        vrouter_state::Vni::new(1000).unwrap(),
        "10.2.0.254".parse().unwrap(),
    );
    exec_ok(
        Some(&h1),
        &[
            "bridge",
            "fdb",
            "del",
            &b_mac.to_string(),
            "dev",
            "vxlan1000",
            "dst",
            "198.18.0.2",
            "self",
        ],
    )
    .unwrap();
    exec_ok(
        Some(&h1),
        &["ip", "rule", "del", "iif", "br-a", "pref", "1000"],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    mesh.start_discovery(1).unwrap();

    let repaired = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        let fdb = exec_ok(Some(&h1), &["bridge", "fdb", "show", "dev", "vxlan1000"])
            .unwrap()
            .stdout;
        let rules = exec_ok(Some(&h1), &["ip", "rule", "show"]).unwrap().stdout;
        fdb.contains(&b_mac.to_string()) && rules.contains("iif br-a")
    });
    assert!(
        repaired,
        "FDB row and steering rule not repaired after restart"
    );
    hold.wait_success(Duration::from_secs(20))
        .expect("TCP connection survived the discovery restart");

    // No flush and rebuild: the same devices.
    assert_eq!(
        vx_before,
        mesh.ifindex(1, "vxlan1000").unwrap(),
        "vxlan1000 was recreated"
    );
    let ovl_after = vrouter_tests::mesh::link_index(&mesh.rtr("a").ns, "ovl1000").unwrap();
    assert_eq!(
        ovl_before, ovl_after,
        "router A's overlay link was recreated"
    );
    assert!(reachable(&mesh, "a", "b"));
}

#[test]
fn router_restart_in_fresh_namespace_does_not_flap() {
    require_root!();
    let mut mesh = two_hosts("router_restart");
    mesh.wait_converged(CONVERGE).unwrap();
    let (_server, mut hold) = hold_connection(
        &mesh,
        "b",
        "a",
        5300,
        Duration::from_secs(8),
        Duration::from_secs(4),
    );

    let events_before = mesh.events(2).len();
    let started = Instant::now();
    mesh.restart_router_fresh_ns("a").unwrap();
    let restarted = Instant::now();
    let attached = mesh.wait_router_routes("a", &["b"], Duration::from_secs(5));
    let took = restarted.elapsed();
    assert!(attached, "router A not re-attached");
    assert!(
        took <= Duration::from_secs(1),
        "re-attach took {took:?} (restart itself {:?})",
        restarted - started
    );
    eprintln!("router re-attached {took:?} after its new process started");

    hold.wait_success(Duration::from_secs(20))
        .expect("TCP connection survived the router restart");
    let later: Vec<_> = mesh.events(2).into_iter().skip(events_before).collect();
    assert!(
        !later
            .iter()
            .any(|e| e.kind == "route_withdrawn" || e.kind == "stack_withdrawn"),
        "router restart flapped the mesh: {later:?}"
    );
    assert!(!mesh.events(1).iter().any(|e| e.kind == "stack_withdrawn"));
}

#[test]
fn removal_from_configuration_withdraws_within_5s() {
    require_root!();
    let mut mesh = Mesh::start(
        "removal",
        3,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("c", 3, 1000, "10.3.0.0/24"),
        ],
    )
    .unwrap();
    mesh.wait_converged(CONVERGE).unwrap();
    let t = Instant::now();
    mesh.remove_from_config("b").unwrap();
    assert!(
        mesh.wait_router_routes("a", &["c"], Duration::from_secs(5)),
        "A kept B's routes: {:?}",
        mesh.router_routes("a")
    );
    assert!(
        mesh.wait_router_routes("c", &["a"], Duration::from_secs(5)),
        "C kept B's routes"
    );
    eprintln!("removal applied everywhere in {:?}", t.elapsed());
    // A and C are undisturbed.
    assert!(reachable(&mesh, "a", "c"));
    // B's FDB rows are gone from host 1 once router A acknowledged.
    let h1 = mesh.topo.host(1).ns.clone();
    let gone = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        !exec_ok(Some(&h1), &["bridge", "fdb", "show", "dev", "vxlan1000"])
            .unwrap()
            .stdout
            .contains("198.18.0.2")
    });
    assert!(gone, "FDB rows of the removed host remain");
}

#[test]
fn standby_takes_over_without_stopping_traffic() {
    require_root!();
    let mut mesh = Mesh::start(
        "standby",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("c", 2, 1000, "10.3.0.0/24"),
        ],
    )
    .unwrap();
    mesh.wait_converged(CONVERGE).unwrap();
    mesh.start_standby(1).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let (_server, mut hold) = hold_connection(
        &mesh,
        "a",
        "b",
        5400,
        Duration::from_secs(6),
        Duration::from_millis(1000),
    );

    let vx_before = mesh.ifindex(1, "vxlan1000").unwrap();
    let events_before = mesh.events(1).len();
    mesh.stop_discovery(1, libc::SIGKILL).unwrap();
    mesh.standby_is_active(1);
    let took_over = wait_until(Duration::from_secs(1), Duration::from_millis(20), || {
        mesh.events(1)
            .iter()
            .any(|e| e.kind == "started" && e.message.contains("active"))
            && mesh
                .events(1)
                .iter()
                .filter(|e| e.kind == "started")
                .count()
                >= 2
    });
    assert!(took_over, "standby did not take over within 1 s");
    // Without disturbing the kernel state: same device, nothing rebuilt or withdrawn.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vx_before, mesh.ifindex(1, "vxlan1000").unwrap());
    let after: Vec<_> = mesh.events(1).into_iter().skip(events_before).collect();
    assert!(
        !after.iter().any(|e| matches!(
            e.kind.as_str(),
            "device_created"
                | "device_replaced"
                | "route_withdrawn"
                | "stack_withdrawn"
                | "drift_repaired"
        )),
        "takeover disturbed the kernel state: {after:#?}"
    );
    let t = Instant::now();
    mesh.remove_from_config("c").unwrap();
    assert!(
        mesh.wait_router_routes("a", &["b"], Duration::from_secs(1)),
        "config change not applied within 1 s of takeover"
    );
    eprintln!("standby applied a config change in {:?}", t.elapsed());
    hold.wait_success(Duration::from_secs(20))
        .expect("traffic never stopped");
}

#[test]
fn router_leave_and_disappearance() {
    require_root!();
    let mut mesh = Mesh::start(
        "leave",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("c", 2, 1000, "10.3.0.0/24"),
        ],
    )
    .unwrap();
    mesh.wait_converged(CONVERGE).unwrap();
    // A SIGTERM alone is not a departure: within the grace period nothing is withdrawn.
    mesh.stop_router("c", libc::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(mesh
        .routes(2)
        .unwrap()
        .stacks
        .contains_key(&vrouter_state::StackName::new("c").unwrap()));
    // ... but a router that stays away is withdrawn after the grace period.
    let t = Instant::now();
    assert!(
        mesh.wait_router_routes("b", &["a"], Duration::from_secs(6)),
        "C not withdrawn after grace"
    );
    eprintln!(
        "stack C withdrawn {:?} after the grace check began",
        t.elapsed()
    );

    // An explicit leave withdraws at once.
    let bin = vrouter_tests::mesh::bin_dir()
        .unwrap()
        .join("vrouter-router");
    let dir = mesh.state_dir(2).display().to_string();
    let out = exec_ok(
        Some(&mesh.rtr("b").ns),
        &[
            "env",
            "VROUTER_STACK=b",
            &format!("VROUTER_STATE_DIR={dir}"),
            bin.to_str().unwrap(),
            "leave",
        ],
    );
    assert!(out.is_ok(), "leave failed: {out:?}");
    let t = Instant::now();
    let hosts_routes_gone = wait_until(Duration::from_secs(2), Duration::from_millis(50), || {
        !mesh
            .routes(2)
            .unwrap()
            .stacks
            .contains_key(&vrouter_state::StackName::new("b").unwrap())
    });
    assert!(hosts_routes_gone, "leave did not withdraw B at once");
    eprintln!("explicit leave withdrew B in {:?}", t.elapsed());
    assert!(mesh.events(2).iter().any(|e| e.kind == "stack_left"));
}

#[test]
fn lost_overlay_link_is_reattached_without_disturbing_other_stacks() {
    require_root!();
    let mesh = Mesh::start(
        "overlay_loss",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("f", 1, 2000, "10.6.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("d", 2, 2000, "10.4.0.0/24"),
        ],
    )
    .unwrap();
    mesh.wait_converged(CONVERGE).unwrap();
    let f_ovl = vrouter_tests::mesh::link_index(&mesh.rtr("f").ns, "ovl2000").unwrap();
    let vx2000 = mesh.ifindex(1, "vxlan2000").unwrap();

    // The router's overlay link disappears (as when vxlan1000 is replaced on the host).
    exec_ok(Some(&mesh.rtr("a").ns), &["ip", "link", "del", "ovl1000"]).unwrap();
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            exec(Some(&mesh.rtr("a").ns), &["ip", "link", "show", "ovl1000"])
                .map(|o| o.success())
                .unwrap_or(false)
                && mesh.router_routes("a") == vec!["10.2.0.0/24".to_string()]
        }),
        "router A did not get a new overlay link"
    );
    eprintln!(
        "router A re-attached {:?} after losing its link",
        t.elapsed()
    );
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || reachable(&mesh, "a", "b")
    ));

    // The whole VXLAN device goes: discovery recreates it, the router re-attaches.
    exec_ok(
        Some(&mesh.topo.host(1).ns),
        &["ip", "link", "del", "vxlan1000"],
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            reachable(&mesh, "a", "b")
        }),
        "A did not recover after vxlan1000 was deleted"
    );
    // The other stack on the host was never disturbed.
    let f_after = vrouter_tests::mesh::link_index(&mesh.rtr("f").ns, "ovl2000").unwrap();
    assert_eq!(f_ovl, f_after, "stack F's overlay link was recreated");
    assert_eq!(
        vx2000,
        mesh.ifindex(1, "vxlan2000").unwrap(),
        "vxlan2000 was recreated"
    );
    assert!(reachable(&mesh, "f", "d"));
}

#[test]
fn cleanup_removes_what_discovery_made_once_the_stacks_are_gone() {
    require_root!();
    let mut mesh = two_hosts("cleanup");
    mesh.wait_converged(CONVERGE).unwrap();
    let h1 = mesh.topo.host(1).ns.clone();
    let table = vrouter_tests::steering::table_name();
    let cleanup = |mesh: &Mesh| mesh.run_cleanup(1);
    // Refused while a discovery is active.
    let (ok, out) = cleanup(&mesh);
    assert!(!ok && out.contains("stop it"), "{out}");

    // `compose down` of the last stack: router and discovery both get SIGTERM.
    mesh.stop_router("a", libc::SIGTERM).unwrap();
    mesh.stop_discovery(1, libc::SIGTERM).unwrap();
    let (ok, out) = cleanup(&mesh);
    assert!(ok, "{out}");
    assert!(out.contains("removed vxlan1000"), "{out}");
    let links = exec_ok(Some(&h1), &["ip", "-o", "link", "show"])
        .unwrap()
        .stdout;
    assert!(!links.contains("vxlan1000"), "{links}");
    let rules = exec_ok(Some(&h1), &["ip", "rule", "show"]).unwrap().stdout;
    assert!(!rules.contains("proto 118"), "{rules}");
    let routes = exec_ok(
        Some(&h1),
        &["ip", "route", "show", "table", "all", "proto", "118"],
    )
    .unwrap()
    .stdout;
    assert!(routes.trim().is_empty(), "{routes}");
    // No steering table (its chains and elements went with it).
    assert!(
        mesh.steering_table(1).unwrap().is_none(),
        "cleanup left table netdev {table}"
    );
    // The other host is untouched.
    assert!(exec_ok(
        Some(&mesh.topo.host(2).ns),
        &["ip", "link", "show", "vxlan1000"]
    )
    .is_ok());
}
