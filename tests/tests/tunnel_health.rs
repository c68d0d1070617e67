//! Tunnel and router health with the real daemons on simulated hosts: a stopped remote
//! router shows as down within three probe intervals, an MTU black hole on the underlay
//! fails the full-size probe while the small ones still pass, and the router's
//! healthcheck follows its routes and its overlay link.

use std::time::{Duration, Instant};
use vrouter_state::{PeerProbe, ProbesFile, StateDir};
use vrouter_tests::mesh::{Mesh, StackDef};
use vrouter_tests::*;

const CONVERGE: Duration = Duration::from_secs(20);

fn two_hosts(test: &str) -> Mesh {
    let mesh = Mesh::start(
        test,
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
        ],
    )
    .expect("mesh starts");
    mesh.wait_converged(CONVERGE).unwrap();
    mesh
}

/// `stack`'s probes file (its router runs on `host`).
fn probes(mesh: &Mesh, host: usize, stack: &str) -> Option<ProbesFile> {
    StateDir::open_readonly(&mesh.state_dir(host))
        .ok()?
        .read_all_probes()
        .into_iter()
        .find(|f| f.stack.as_str() == stack)
}

/// What `stack`'s router (on `host`) reports about `peer`'s router.
fn peer(mesh: &Mesh, host: usize, stack: &str, peer: &str) -> Option<PeerProbe> {
    probes(mesh, host, stack)?
        .peers
        .into_iter()
        .find(|p| p.stack.as_str() == peer)
}

/// Runs `vrouter-router <args>` in `stack`'s router namespace with the router's
/// settings, as `docker exec` would.
fn router_cmd(mesh: &Mesh, stack: &str, args: &[&str]) -> CmdOutput {
    let s = mesh.stack(stack);
    let bin = mesh.bin("vrouter-router");
    let env = [
        format!("VROUTER_STACK={}", s.name),
        format!("VROUTER_VNI={}", s.vni),
        format!("VROUTER_STATE_DIR={}", mesh.state_dir(s.host).display()),
        "RUST_LOG=warn".to_string(),
    ];
    let mut argv: Vec<&str> = vec!["env"];
    argv.extend(env.iter().map(String::as_str));
    argv.push(bin.to_str().unwrap());
    argv.extend_from_slice(args);
    mesh.rtr(stack).exec(&argv).unwrap()
}

fn status_json(mesh: &Mesh, stack: &str) -> serde_json::Value {
    let out = router_cmd(mesh, stack, &["status", "--json"]);
    assert!(out.success(), "status failed: {}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

/// The tunnel a -> b goes down in a's probes file within three probe intervals of b's
/// router being killed (plus the time to write the file), three times over, and `status`
/// says so.
#[test]
fn killed_remote_router_is_down_within_three_intervals() {
    require_root!();
    let mut mesh = two_hosts("th_down");
    let mut figures = Vec::new();
    for round in 0..3u64 {
        let up = wait_until(Duration::from_secs(15), Duration::from_millis(20), || {
            peer(&mesh, 1, "a", "b").is_some_and(|p| p.reachable)
        });
        assert!(up, "round {round}: a never saw b's router answer");
        let interval_ms = probes(&mesh, 1, "a").unwrap().interval_ms;
        assert!(
            (1..=1000).contains(&interval_ms),
            "probe interval {interval_ms} ms"
        );
        if round == 0 {
            let s = status_json(&mesh, "a");
            assert_eq!(s["peers"][0]["stack"], "b");
            assert_eq!(s["peers"][0]["reachable"], true);
            assert!(s["peers"][0]["srtt_us"].is_u64(), "{s}");
            assert_eq!(s["health"]["overlay_link_up"], true);
            let table = router_cmd(&mesh, "a", &["status"]);
            assert!(table.success(), "{}", table.stderr);
            eprintln!("`vrouter-router status` in router a:\n{}", table.stdout);
            let row = table.stdout.lines().find(|l| l.starts_with("b ")).unwrap();
            assert!(row.contains("10.2.0.254") && row.contains(" up "), "{row}");
        }

        // Vary where the kill falls between two probes: 0, 1/3 and 2/3 of an interval
        // after the file showed the peer up.
        std::thread::sleep(Duration::from_millis(round * interval_ms / 3));
        let killed = Instant::now();
        mesh.stop_router("b", libc::SIGKILL).unwrap();
        let down = wait_until(Duration::from_secs(5), Duration::from_millis(5), || {
            peer(&mesh, 1, "a", "b").is_some_and(|p| !p.reachable)
        });
        let took = killed.elapsed();
        assert!(
            down,
            "round {round}: b's router still reachable 5 s after it died"
        );
        eprintln!(
            "FIGURE tunnel down after kill: round {round}: {} ms (interval {interval_ms} ms)",
            took.as_millis()
        );
        figures.push(took);
        // Three intervals, plus a file write and this test's 5 ms polling.
        let bound = Duration::from_millis(3 * interval_ms + 100);
        assert!(
            took <= bound,
            "round {round}: down after {took:?}, more than 3 intervals ({bound:?} with the write)"
        );

        let s = status_json(&mesh, "a");
        assert_eq!(s["peers"][0]["reachable"], false, "{s}");
        let table = router_cmd(&mesh, "a", &["status"]);
        let row = table.stdout.lines().find(|l| l.starts_with("b ")).unwrap();
        assert!(row.contains("DOWN"), "{row}");

        mesh.start_router("b").unwrap();
    }
    eprintln!("FIGURE tunnel down after kill: {figures:?}");
}

/// An underlay hop whose MTU is too small for full-size VXLAN frames drops them without
/// a word (a bridge does not fragment or answer). The routers' small probes still pass,
/// the full-size probe with DF does not, and the check fails; when the MTU is restored
/// it passes again.
#[test]
fn mtu_black_hole_fails_the_check_while_the_tunnel_stays_up() {
    require_root!();
    let mesh = two_hosts("th_mtu");
    // From netlink: under nsenter, /sys shows the caller's namespace.
    let ovl_mtu: u32 = {
        let o = mesh
            .rtr("a")
            .exec_ok(&["ip", "-o", "link", "show", "dev", "ovl1000"])
            .unwrap()
            .stdout;
        let at = o.find(" mtu ").expect("mtu in ip link output") + 5;
        o[at..].split_whitespace().next().unwrap().parse().unwrap()
    };
    assert_eq!(
        ovl_mtu, 1450,
        "the overlay MTU is the underlay's (1500) - 50"
    );
    let mtu_ok = |stack: &str, host: usize, other: &str| {
        peer(&mesh, host, stack, other)
            .and_then(|p| p.mtu)
            .map(|m| (m.size, m.ok))
    };
    let passed = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        mtu_ok("a", 1, "b") == Some((ovl_mtu, true)) && mtu_ok("b", 2, "a") == Some((ovl_mtu, true))
    });
    assert!(
        passed,
        "full-size probes did not pass on a clean path: a sees {:?}, b sees {:?}",
        peer(&mesh, 1, "a", "b"),
        peer(&mesh, 2, "b", "a")
    );

    // Host 2's port on the underlay bridge: the bridge drops frames longer than the
    // port's MTU (+ 18 bytes of Ethernet and VLAN header it allows), so at 1495 a
    // 1500-byte outer packet (a 1450-byte inner one) dies and a 1499-byte one passes.
    let port = mesh.topo.underlay_port(2);
    let set_port_mtu = |mtu: u32| {
        exec_ok(
            Some(&mesh.topo.underlay_ns),
            &["ip", "link", "set", &port, "mtu", &mtu.to_string()],
        )
        .unwrap();
    };
    let df_ping = |ip_bytes: u32| {
        // ICMP payload = IP size - 20 (IP) - 8 (ICMP).
        let size = (ip_bytes - 28).to_string();
        mesh.rtr("a")
            .exec(&[
                "ping",
                "-n",
                "-q",
                "-c",
                "2",
                "-i",
                "0.2",
                "-W",
                "1",
                "-M",
                "do",
                "-s",
                &size,
                "10.2.0.254",
            ])
            .map(|o| o.success())
            .unwrap_or(false)
    };
    assert!(df_ping(ovl_mtu), "a full-size ping fails on a clean path");
    let lowered = Instant::now();
    set_port_mtu(1495);
    assert!(
        df_ping(ovl_mtu - 1),
        "one byte under the overlay MTU must still pass (the hole is exactly at the MTU)"
    );
    assert!(
        !df_ping(ovl_mtu),
        "the black hole lets full-size packets through"
    );

    // The check fails, and the small probes keep the tunnel up the whole time.
    let mut always_up = true;
    let failed = wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
        let p = peer(&mesh, 1, "a", "b");
        always_up &= p.as_ref().is_some_and(|p| p.reachable);
        p.and_then(|p| p.mtu)
            .is_some_and(|m| !m.ok && m.size == ovl_mtu)
    });
    let took = lowered.elapsed();
    assert!(
        failed,
        "the MTU check still passes through the black hole: {:?}",
        peer(&mesh, 1, "a", "b")
    );
    assert!(
        always_up,
        "the tunnel went down; only full-size packets are dropped"
    );
    eprintln!(
        "FIGURE MTU check failed {} ms after the underlay MTU was lowered",
        took.as_millis()
    );
    // Router events reach events.log through discovery (from the probes file).
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || mesh
            .events(1)
            .iter()
            .any(|e| e.kind == "mtu_check_failed" && e.message.contains("10.2.0.254"))
    ));
    let s = status_json(&mesh, "a");
    assert_eq!(s["peers"][0]["mtu"]["ok"], false, "{s}");
    assert_eq!(s["peers"][0]["reachable"], true, "{s}");
    let table = router_cmd(&mesh, "a", &["status"]);
    assert!(
        table.stdout.contains(&format!("{ovl_mtu} FAIL")),
        "{}",
        table.stdout
    );

    // Restored: the next check passes.
    let restored = Instant::now();
    set_port_mtu(1500);
    let passed = wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
        mtu_ok("a", 1, "b") == Some((ovl_mtu, true))
    });
    assert!(
        passed,
        "the MTU check did not pass again: {:?}",
        peer(&mesh, 1, "a", "b")
    );
    eprintln!(
        "FIGURE MTU check passed {} ms after the MTU was restored",
        restored.elapsed().as_millis()
    );
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || mesh.events(1).iter().any(|e| e.kind == "mtu_check_ok")
    ));

    // A local route with a smaller MTU: the full-size probe cannot even leave
    // (EMSGSIZE with DF), and the check fails at once, saying so. The daemon does not
    // manage route metrics, so the route stays until put back.
    let route = |extra: &[&str]| {
        let mut argv = vec![
            "ip",
            "route",
            "replace",
            "10.2.0.0/24",
            "via",
            "10.2.0.254",
            "dev",
            "ovl1000",
            "onlink",
            "proto",
            "118",
        ];
        argv.extend_from_slice(extra);
        mesh.rtr("a").exec_ok(&argv).unwrap();
    };
    route(&["mtu", "lock", "1400"]);
    let failed = wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
        peer(&mesh, 1, "a", "b")
            .and_then(|p| p.mtu)
            .is_some_and(|m| !m.ok)
    });
    assert!(
        failed,
        "EMSGSIZE did not fail the check: {:?}",
        peer(&mesh, 1, "a", "b")
    );
    // Router events reach events.log through discovery (from the probes file).
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || mesh
            .events(1)
            .iter()
            .any(|e| e.kind == "mtu_check_failed" && e.message.contains("EMSGSIZE"))
    ));
    assert!(peer(&mesh, 1, "a", "b").unwrap().reachable);
    route(&[]);
    let passed = wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
        mtu_ok("a", 1, "b") == Some((ovl_mtu, true))
    });
    assert!(passed, "{:?}", peer(&mesh, 1, "a", "b"));
}

/// `vrouter-router healthcheck` passes on a good router and fails, with the reason, when
/// a route is missing, the overlay link is down or gone, even with the daemon dead; the
/// running daemon repairs a deleted route and counts it in its published health.
#[test]
fn healthcheck_follows_routes_and_overlay_link() {
    require_root!();
    let mut mesh = two_hosts("th_health");
    let health = |mesh: &Mesh| probes(mesh, 1, "a").and_then(|f| f.health);
    let ok = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        health(&mesh)
            .is_some_and(|h| h.routes_desired == 1 && h.routes_installed == 1 && h.overlay_link_up)
    });
    assert!(ok, "a's published health: {:?}", health(&mesh));
    let hc = router_cmd(&mesh, "a", &["healthcheck"]);
    assert!(hc.success(), "healthy router fails: {}", hc.stderr);
    assert!(
        hc.stdout.contains("ok: ovl1000 up, 1 route(s)"),
        "{}",
        hc.stdout
    );

    // While the daemon runs, a deleted route comes back and counts as drift repaired.
    let rtr = mesh.rtr("a");
    rtr.exec_ok(&["ip", "route", "del", "10.2.0.0/24"]).unwrap();
    let repaired = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        health(&mesh).is_some_and(|h| h.drift_repaired >= 1 && h.routes_installed == 1)
    });
    assert!(repaired, "a's published health: {:?}", health(&mesh));
    assert_eq!(mesh.router_routes("a"), vec!["10.2.0.0/24".to_string()]);

    // A dead daemon leaves its last file behind; the healthcheck does not read it.
    mesh.stop_router("a", libc::SIGKILL).unwrap();
    let hc = router_cmd(&mesh, "a", &["healthcheck"]);
    assert!(hc.success(), "kernel state is intact: {}", hc.stderr);

    rtr.exec_ok(&["ip", "route", "del", "10.2.0.0/24"]).unwrap();
    let hc = router_cmd(&mesh, "a", &["healthcheck"]);
    assert!(!hc.success(), "a missing route passed: {}", hc.stdout);
    assert!(
        hc.stderr.contains("routes diverge from routes.json")
            && hc.stderr.contains("10.2.0.0/24 via 10.2.0.254 is missing"),
        "{}",
        hc.stderr
    );
    assert_eq!(
        hc.stderr.trim().lines().count(),
        1,
        "one line: {}",
        hc.stderr
    );

    rtr.exec_ok(&[
        "ip",
        "route",
        "replace",
        "10.2.0.0/24",
        "via",
        "10.2.0.254",
        "dev",
        "ovl1000",
        "onlink",
        "proto",
        "118",
    ])
    .unwrap();
    let hc = router_cmd(&mesh, "a", &["healthcheck"]);
    assert!(hc.success(), "route restored by hand: {}", hc.stderr);

    rtr.exec_ok(&["ip", "link", "set", "ovl1000", "down"])
        .unwrap();
    let hc = router_cmd(&mesh, "a", &["healthcheck"]);
    assert!(!hc.success());
    assert!(hc.stderr.contains("ovl1000 is down"), "{}", hc.stderr);

    rtr.exec_ok(&["ip", "link", "del", "ovl1000"]).unwrap();
    let hc = router_cmd(&mesh, "a", &["healthcheck"]);
    assert!(!hc.success());
    assert!(
        hc.stderr.contains("overlay link ovl1000 is gone"),
        "{}",
        hc.stderr
    );

    // The router comes back, is re-attached by discovery, and is healthy again.
    mesh.start_router("a").unwrap();
    let healthy = wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
        router_cmd(&mesh, "a", &["healthcheck"]).success()
    });
    assert!(
        healthy,
        "{}",
        router_cmd(&mesh, "a", &["healthcheck"]).stderr
    );
}
