//! The operations side of discovery, end to end: the HTTP endpoint (/healthz, /readyz,
//! /metrics, /v1/status) and the status CLI on real daemons on simulated hosts,
//! compared with kernel dumps and with injected faults and conflicts; events.log
//! rotation at the configured cap; JSON logs.

use std::time::Duration;
use vrouter_tests::mesh::{bin_dir, Mesh, StackDef};
use vrouter_tests::*;

const CONVERGE: Duration = Duration::from_secs(20);
const HTTP: &str = "127.0.0.1:9474";

fn get(mesh: &Mesh, host: usize, path: &str) -> HttpReply {
    http_get(&mesh.topo.host(host).ns, HTTP, path)
        .unwrap_or_else(|e| panic!("GET {path} on host {host}: {e:#}"))
}

/// Waits until /readyz answers `status` (and, for 503, names `why`).
fn wait_ready(mesh: &Mesh, status: u16, why: &str, timeout: Duration) -> HttpReply {
    let mut last = None;
    let ok = wait_until(timeout, Duration::from_millis(50), || {
        let r = get(mesh, 1, "/readyz");
        let hit = r.status == status && r.body.contains(why);
        last = Some(r);
        hit
    });
    let last = last.unwrap();
    assert!(
        ok,
        "/readyz did not become {status} ({why:?}) within {timeout:?}; last: {} {}",
        last.status, last.body
    );
    last
}

fn status_json(mesh: &Mesh) -> serde_json::Value {
    let r = get(mesh, 1, "/v1/status");
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
}

fn metrics(mesh: &Mesh) -> String {
    let r = get(mesh, 1, "/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

/// Lines of `bridge fdb show dev <dev>` in host 1: (flood rows, router rows).
fn fdb_rows(mesh: &Mesh, dev: &str) -> (usize, usize) {
    let out = exec_ok(
        Some(&mesh.topo.host(1).ns),
        &["bridge", "fdb", "show", "dev", dev],
    )
    .unwrap()
    .stdout;
    let with_dst: Vec<&str> = out.lines().filter(|l| l.contains(" dst ")).collect();
    let flood = with_dst
        .iter()
        .filter(|l| l.starts_with("00:00:00:00:00:00"))
        .count();
    let routers = with_dst
        .iter()
        .filter(|l| !l.starts_with("00:00:00:00:00:00") && l.contains("permanent"))
        .count();
    (flood, routers)
}

/// Host 1 carries a (VNI 1000); host 2 carries b and c on the same VNI.
#[test]
fn http_endpoints_match_the_kernel_and_readiness_follows_faults() {
    require_root!();
    let mut mesh = Mesh::build(
        "operations",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("c", 2, 1000, "10.3.0.0/24"),
        ],
    )
    .unwrap();
    mesh.set_discovery_env(1, "VROUTER_EVENTS_MAX_BYTES", "2048");
    mesh.set_discovery_env(1, "VROUTER_LOG_FORMAT", "json");
    // routes.json cannot be written while a directory holds its name.
    let state = mesh.state_dir(1);
    let blocker = state.join("routes.json");
    std::fs::create_dir(&blocker).unwrap();
    for h in 1..=2 {
        mesh.write_config(h).unwrap();
        mesh.start_discovery(h).unwrap();
    }

    // Alive at once; not ready before routes.json is written.
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            http_get(&mesh.topo.host(1).ns, HTTP, "/healthz").is_ok_and(|r| r.status == 200)
        }),
        "/healthz never answered"
    );
    let r = wait_ready(&mesh, 503, "routes.json has not been written", CONVERGE);
    assert!(r.body.starts_with("not ready: "), "{}", r.body);
    // /metrics answers once discovery.json exists, which the first reconcile writes
    // whatever routes.json's fate: on a loaded machine /readyz can answer first.
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            get(&mesh, 1, "/metrics").status == 200
        }),
        "/metrics never answered 200"
    );
    assert_eq!(metric(&metrics(&mesh), "vrouter_ready"), Some(0.0));
    std::fs::remove_dir(&blocker).unwrap();
    wait_ready(&mesh, 200, "ready", Duration::from_secs(5));

    mesh.start_routers().unwrap();
    mesh.wait_converged(CONVERGE).unwrap();
    wait_ready(&mesh, 200, "ready", Duration::from_secs(5));

    // Unknown paths, other methods.
    assert_eq!(get(&mesh, 1, "/nope").status, 404);
    let post = http_request(&mesh.topo.host(1).ns, HTTP, "POST", "/readyz").unwrap();
    assert_eq!(post.status, 405);

    // The figures against the kernel of host 1.
    let (flood, routers) = fdb_rows(&mesh, "vxlan1000");
    let kernel_routes = mesh.router_routes("a");
    let steering = exec_ok(
        Some(&mesh.topo.host(1).ns),
        &["ip", "-4", "route", "show", "table", "all", "proto", "118"],
    )
    .unwrap()
    .stdout
    .lines()
    .count();
    assert_eq!(
        (flood, routers, kernel_routes.len(), steering),
        (1, 2, 2, 2)
    );
    let m = metrics(&mesh);
    assert_eq!(metric(&m, "vrouter_tunnels"), Some(flood as f64), "{m}");
    assert_eq!(
        metric(&m, r#"vrouter_routes_desired{stack="a"}"#),
        Some(kernel_routes.len() as f64),
        "{m}"
    );
    // Routers that report their installed routes must agree with the kernel.
    if let Some(installed) = metric(&m, r#"vrouter_routes_installed{stack="a"}"#) {
        assert_eq!(installed, kernel_routes.len() as f64, "{m}");
    }
    assert_eq!(metric(&m, r#"vrouter_peers{state="static"}"#), Some(1.0));
    assert_eq!(metric(&m, "vrouter_refused_prefixes"), Some(0.0));
    assert_eq!(metric(&m, "vrouter_ready"), Some(1.0));
    assert!(
        metric(&m, "vrouter_reconcile_duration_seconds_count").unwrap_or(0.0) >= 2.0,
        "{m}"
    );
    // The routers' overlay probes reach b and c over the overlay.
    let probed = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
        let m = metrics(&mesh);
        ["b", "c"].iter().all(|r| {
            metric(
                &m,
                &format!(r#"vrouter_peer_reachable{{local_stack="a",remote_stack="{r}"}}"#),
            ) == Some(1.0)
        })
    });
    assert!(probed, "{}", metrics(&mesh));

    let s = status_json(&mesh);
    assert_eq!(s["tunnels"], flood);
    assert_eq!(s["live"]["ready"], true);
    assert_eq!(s["devices"], serde_json::json!(["vxlan1000"]));
    let h2 = mesh.topo.host(2).underlay_ip.to_string();
    assert_eq!(s["hosts"][0]["addr"], h2.as_str());
    assert_eq!(s["hosts"][0]["state"], "static");
    assert_eq!(s["hosts"][0]["datapath_reachable"], true);
    let stacks: Vec<(String, serde_json::Value)> = s["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap().to_string(), r["host"].clone()))
        .collect();
    assert_eq!(
        stacks,
        vec![
            ("a".to_string(), serde_json::Value::Null),
            ("b".to_string(), h2.as_str().into()),
            ("c".to_string(), h2.as_str().into()),
        ]
    );
    assert_eq!(s["routes"][0]["stack"], "a");
    assert_eq!(s["routes"][0]["desired"], kernel_routes.len());
    let traffic: Vec<&str> = s["traffic"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["remote_stack"].as_str().unwrap())
        .collect();
    assert_eq!(traffic, vec!["b", "c"]);

    // The CLI reads the same files and says the same.
    let cli = exec_ok(
        None,
        &[
            bin_dir()
                .unwrap()
                .join("vrouter-discovery")
                .to_str()
                .unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "status",
            "--json",
        ],
    )
    .unwrap()
    .stdout;
    let c: serde_json::Value = serde_json::from_str(&cli).unwrap();
    for key in ["tunnels", "devices", "stacks", "refused", "host"] {
        assert_eq!(c[key], s[key], "{key}: CLI and /v1/status differ");
    }
    assert!(c.get("live").is_none(), "the CLI has no live facts");

    // An overlapping stack on host 2 (x announces a's 10.1.0.0/24 in part): refused.
    mesh.add_stack_containers(
        StackDef::new("x", 2, 1000, "10.1.0.0/25").addresses("10.1.0.126", "10.1.0.5"),
    )
    .unwrap();
    mesh.write_config(1).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            metric(&metrics(&mesh), "vrouter_refused_prefixes") == Some(1.0)
        }),
        "the overlap was not refused: {}",
        metrics(&mesh)
    );
    let s = status_json(&mesh);
    assert_eq!(s["refused"][0]["stack"], "x");
    assert_eq!(s["refused"][0]["prefix"], "10.1.0.0/25");
    assert_eq!(s["refused"][0]["code"], "overlap");
    assert!(mesh.events(1).iter().any(|e| e.kind == "conflict_refused"
        && e.reason == "overlap"
        && e.stack.as_ref().map(|s| s.as_str()) == Some("x")));
    assert_eq!(mesh.router_routes("a"), kernel_routes, "a's routes changed");
    let text = exec_ok(
        None,
        &[
            bin_dir()
                .unwrap()
                .join("vrouter-discovery")
                .to_str()
                .unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "status",
        ],
    )
    .unwrap()
    .stdout;
    assert!(
        text.contains("x 10.1.0.0/25: prefix 10.1.0.0/25 of stack x overlaps"),
        "{text}"
    );

    // An unwritable state directory: 503 until repaired. The daemon has only
    // CAP_NET_ADMIN, so mode 0555 binds it even as uid 0.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o555)).unwrap();
    let r = wait_ready(
        &mesh,
        503,
        "state directory not writable",
        Duration::from_secs(5),
    );
    let restore = std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755));
    restore.unwrap();
    assert!(r.body.contains(state.to_str().unwrap()), "{}", r.body);
    wait_ready(&mesh, 200, "ready", Duration::from_secs(5));

    // A VXLAN device deleted: 503 at once, 200 once drift repair recreates it. Router a
    // is frozen meanwhile, or it would ask for a new link (and so a new device) at once.
    let drift_before = metric(
        &metrics(&mesh),
        r#"vrouter_drift_repairs_total{component="discovery"}"#,
    )
    .unwrap();
    mesh.router("a").kill(libc::SIGSTOP).unwrap();
    exec_ok(
        Some(&mesh.topo.host(1).ns),
        &["ip", "link", "del", "vxlan1000"],
    )
    .unwrap();
    let r = wait_ready(&mesh, 503, "vxlan1000 is missing", Duration::from_secs(1));
    assert!(r.body.contains("next reconcile recreates it"), "{}", r.body);
    wait_ready(&mesh, 200, "ready", Duration::from_secs(5));
    assert!(exec(
        Some(&mesh.topo.host(1).ns),
        &["ip", "link", "show", "vxlan1000"]
    )
    .unwrap()
    .success());
    // The repair is counted (discovery.json carries it from the next reconcile on).
    let counted = wait_until(Duration::from_secs(6), Duration::from_millis(200), || {
        metric(
            &metrics(&mesh),
            r#"vrouter_drift_repairs_total{component="discovery"}"#,
        )
        .is_some_and(|n| n > drift_before)
    });
    assert!(counted, "drift repair not counted: {}", metrics(&mesh));
    assert!(mesh.events(1).iter().any(|e| e.kind == "drift_repaired"));
    mesh.router("a").kill(libc::SIGCONT).unwrap();
    assert!(mesh.wait_router_routes("a", &["b", "c"], CONVERGE));
    assert!(
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(100),
            || fdb_rows(&mesh, "vxlan1000") == (1, 2)
        ),
        "FDB not restored: {:?}",
        fdb_rows(&mesh, "vxlan1000")
    );
    wait_ready(&mesh, 200, "ready", Duration::from_secs(5));

    // A registered router that is gone (a restart, before its grace ends): 503.
    mesh.stop_router("a", libc::SIGTERM).unwrap();
    wait_ready(
        &mesh,
        503,
        "router of stack a is registered but not attached",
        Duration::from_secs(2),
    );
    mesh.start_router("a").unwrap();
    wait_ready(&mesh, 200, "ready", Duration::from_secs(10));

    // events.log rotated at the configured 2 KiB; every line has a reason.
    let log = std::fs::metadata(state.join("events.log")).unwrap().len();
    assert!(log <= 2048, "events.log is {log} bytes");
    assert!(
        state.join("events.log.1").is_file(),
        "events.log never rotated"
    );
    let events = mesh.events(1);
    assert!(!events.is_empty());
    for e in &events {
        assert!(e.ts_ms > 0 && !e.reason.is_empty(), "{e:?}");
    }
    // JSON logs (VROUTER_LOG_FORMAT=json): every stderr line is one JSON object.
    let logs = mesh.discovery(1).stderr();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
    }

    // The CLI still works with discovery down (the datapath is headless).
    mesh.stop_discovery(1, libc::SIGTERM).unwrap();
    let text = exec_ok(
        None,
        &[
            bin_dir()
                .unwrap()
                .join("vrouter-discovery")
                .to_str()
                .unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "status",
        ],
    )
    .unwrap()
    .stdout;
    for section in ["HOSTS", "STACKS", "ROUTES", "CONFLICTS", "TRAFFIC"] {
        assert!(text.contains(section), "{section} missing:\n{text}");
    }
}

/// The status CLI on a missing, empty or corrupt state directory: an error that says
/// what is wrong, and a failing exit code. No root needed.
#[test]
fn status_cli_reports_unusable_state_directories() {
    let Ok(bins) = bin_dir() else {
        eprintln!("SKIP: binaries not built");
        return;
    };
    let bin = bins.join("vrouter-discovery");
    let dir = std::env::temp_dir().join(format!("{}-status-cli-{}", prefix(), std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = |d: &std::path::Path| {
        exec(
            None,
            &[
                bin.to_str().unwrap(),
                "--state-dir",
                d.to_str().unwrap(),
                "status",
            ],
        )
        .unwrap()
    };
    let r = run(&dir);
    assert!(!r.success());
    assert!(r.stderr.contains("does not exist"), "{}", r.stderr);

    std::fs::create_dir_all(&dir).unwrap();
    let r = run(&dir);
    assert!(!r.success());
    assert!(
        r.stderr.contains("discovery.json does not exist yet"),
        "{}",
        r.stderr
    );

    std::fs::write(dir.join("discovery.json"), b"{\"schema\":1,").unwrap();
    let r = run(&dir);
    assert!(!r.success());
    assert!(
        r.stderr.contains("discovery.json is not valid"),
        "{}",
        r.stderr
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A control loop that stops completing reconciles (held by the debug-build test hook,
/// as a wedged kernel call or file read would hold it) turns discovery's /readyz and
/// /healthz to 503 and its `health` command red, and the router's healthcheck red,
/// while their other tasks go on answering; both recover when the loop moves again.
#[test]
fn a_stuck_control_loop_is_not_healthy() {
    require_root!();
    let mut mesh =
        Mesh::build("stuck", 1, vec![StackDef::new("a", 1, 1000, "10.1.0.0/24")]).unwrap();
    let stall_d = std::path::PathBuf::from(format!("/run/{}-stall-discovery", prefix()));
    let stall_r = std::path::PathBuf::from(format!("/run/{}-stall-router", prefix()));
    let _ = std::fs::remove_file(&stall_d);
    let _ = std::fs::remove_file(&stall_r);
    mesh.set_discovery_env(1, "VROUTER_TEST_STALL_FILE", stall_d.to_str().unwrap());
    mesh.set_discovery_env(1, "VROUTER_RECONCILE_MS", "300");
    mesh.set_router_env("a", "VROUTER_TEST_STALL_FILE", stall_r.to_str().unwrap());
    mesh.set_router_env("a", "VROUTER_RECONCILE_INTERVAL_MS", "300");
    mesh.write_config(1).unwrap();
    mesh.start_discovery(1).unwrap();
    mesh.start_routers().unwrap();
    let ns = mesh.topo.host(1).ns.clone();
    assert!(wait_until(CONVERGE, Duration::from_millis(100), || {
        http_get(&ns, HTTP, "/healthz").is_ok()
    }));
    wait_ready(&mesh, 200, "ready", CONVERGE);

    let state = mesh.state_dir(1).display().to_string();
    let discovery = mesh.bin("vrouter-discovery").display().to_string();
    let health = || {
        exec(
            Some(&ns),
            &[
                "env",
                &format!("VROUTER_STATE_DIR={state}"),
                &discovery,
                "health",
            ],
        )
        .unwrap()
    };
    let h = health();
    assert!(
        h.success(),
        "health before the stall: {}{}",
        h.stdout,
        h.stderr
    );

    std::fs::write(&stall_d, "").unwrap();
    let r = wait_ready(
        &mesh,
        503,
        "has not completed a reconcile",
        Duration::from_secs(10),
    );
    assert!(r.body.contains("3 intervals of 0.3 s"), "{}", r.body);
    let hz = get(&mesh, 1, "/healthz");
    assert_eq!(hz.status, 503, "{}", hz.body);
    let h = health();
    assert!(
        !h.success() && h.stderr.contains("has not completed a reconcile"),
        "health during the stall: {}{}",
        h.stdout,
        h.stderr
    );
    std::fs::remove_file(&stall_d).unwrap();
    wait_ready(&mesh, 200, "ready", Duration::from_secs(10));
    assert_eq!(get(&mesh, 1, "/healthz").status, 200);
    assert!(health().success());

    // The router: its healthcheck reads the kernel and its probes file.
    let rtr = mesh.rtr("a");
    let router = mesh.bin("vrouter-router").display().to_string();
    let healthcheck = || {
        exec(
            Some(&rtr.ns),
            &[
                "env",
                "VROUTER_STACK=a",
                &format!("VROUTER_STATE_DIR={state}"),
                "VROUTER_RECONCILE_INTERVAL_MS=300",
                &router,
                "healthcheck",
            ],
        )
        .unwrap()
    };
    let ok = wait_until(CONVERGE, Duration::from_millis(100), || {
        healthcheck().success()
    });
    let h = healthcheck();
    assert!(
        ok,
        "router healthcheck before the stall: {}{}",
        h.stdout, h.stderr
    );
    std::fs::write(&stall_r, "").unwrap();
    let stuck = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let h = healthcheck();
        !h.success()
            && format!("{}{}", h.stdout, h.stderr).contains("has not completed a reconcile")
    });
    let h = healthcheck();
    let _ = std::fs::remove_file(&stall_r);
    assert!(
        stuck,
        "router healthcheck during the stall: {}{}",
        h.stdout, h.stderr
    );
    let ok = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        healthcheck().success()
    });
    assert!(ok, "router healthcheck after the stall");
}
