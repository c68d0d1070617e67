//! Bad input: every bad setting gets one clear line naming the setting, the value and
//! the fix, and no half-built kernel state is left behind.

use std::time::Duration;
use vrouter_tests::mesh::{bin_dir, Mesh, StackDef};
use vrouter_tests::*;

fn discovery() -> String {
    bin_dir()
        .unwrap()
        .join("vrouter-discovery")
        .display()
        .to_string()
}

fn router() -> String {
    bin_dir()
        .unwrap()
        .join("vrouter-router")
        .display()
        .to_string()
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("{}-bad-{name}-{}", prefix(), std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs a command to completion; returns (success, stderr).
fn run(argv: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut c = std::process::Command::new(argv[0]);
    c.args(&argv[1..])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = vrouter_tests::cmd::run_cmd(&mut c, None, Duration::from_secs(10)).unwrap();
    (out.success(), out.stderr)
}

fn one_error_line(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("vrouter-")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{stderr}");
    lines[0].to_string()
}

#[test]
fn discovery_rejects_bad_settings_with_one_clear_line() {
    let dir = tmpdir("disc");
    let d = dir.display().to_string();
    let bin = discovery();

    let (ok, err) = run(&[&bin, "--state-dir", "/nonexistent/vrouter"], &[]);
    assert!(!ok);
    let line = one_error_line(&err);
    assert!(
        line.contains("/nonexistent/vrouter")
            && line.contains("VROUTER_STATE_DIR")
            && line.contains("create it"),
        "{line}"
    );

    let (ok, err) = run(
        &[&bin, "--state-dir", &d],
        &[("VROUTER_VXLAN_PORT", "70000")],
    );
    assert!(!ok);
    assert!(
        err.contains("VROUTER_VXLAN_PORT") && err.contains("70000"),
        "{err}"
    );

    for (bad, needle) in [
        ("prefixes = [\"10.2.0.0/33\"]", "10.2.0.0/33"),
        ("prefixes = [\"10.2.0.1/24\"]", "did you mean 10.2.0.0/24"),
        ("vni = 0\nprefixes = [\"10.2.0.0/24\"]", "vni = 0"),
        (
            "vni = 16777216\nprefixes = [\"10.2.0.0/24\"]",
            "1..16777215",
        ),
    ] {
        let cfg = dir.join("peers.toml");
        std::fs::write(
            &cfg,
            format!("[[host]]\naddress = \"192.0.2.99\"\n[[host.stack]]\nname = \"b\"\n{bad}\nrouter_ip = \"10.2.0.254\"\n"),
        )
        .unwrap();
        let (ok, err) = run(
            &[
                &bin,
                "--state-dir",
                &d,
                "--config",
                cfg.to_str().unwrap(),
                "check-config",
            ],
            &[],
        );
        assert!(!ok, "{bad} accepted");
        let line = one_error_line(&err);
        assert!(
            line.contains("peers.toml") && line.contains("stack \"b\"") && line.contains(needle),
            "{line}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(private_dir(&dir)).ok();
}

#[test]
fn router_rejects_bad_settings_with_one_clear_line() {
    let dir = tmpdir("rtr");
    let d = dir.display().to_string();
    let bin = router();
    // (environment, what the one error line must mention)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (&[("VROUTER_STATE_DIR", &d)], &["VROUTER_STACK"]),
        (
            &[
                ("VROUTER_STACK", "a"),
                ("VROUTER_VNI", "0"),
                ("VROUTER_STATE_DIR", &d),
            ],
            &["VROUTER_VNI", "1..16777215"],
        ),
        (
            &[
                ("VROUTER_STACK", "a"),
                ("VROUTER_VNI", "16777216"),
                ("VROUTER_STATE_DIR", &d),
            ],
            &["VROUTER_VNI", "16777216"],
        ),
        (
            &[
                ("VROUTER_STACK", "a"),
                ("VROUTER_PREFIXES", "10.1.0.0/33"),
                ("VROUTER_STATE_DIR", &d),
            ],
            &["VROUTER_PREFIXES", "10.1.0.0/33"],
        ),
        (
            &[("VROUTER_STACK", "a b"), ("VROUTER_STATE_DIR", &d)],
            &["VROUTER_STACK", "a b"],
        ),
        (
            &[
                ("VROUTER_STACK", "a"),
                ("VROUTER_STATE_DIR", "/nonexistent/vrouter"),
            ],
            &["/nonexistent/vrouter", "VROUTER_STATE_DIR"],
        ),
    ];
    for (env, needles) in cases {
        let mut env = env.to_vec();
        env.push(("VROUTER_ALLOW_EXTRA_CAPS", "1"));
        let (ok, err) = run(&[&bin], &env);
        assert!(!ok, "{env:?} accepted");
        let line = one_error_line(&err);
        for n in *needles {
            assert!(line.contains(n), "{env:?}: {line}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(private_dir(&dir)).ok();
}

#[test]
fn router_refuses_extra_capabilities() {
    require_root!();
    let dir = tmpdir("caps");
    // As root with a full bounding set and no VROUTER_ALLOW_EXTRA_CAPS.
    let (ok, err) = run(
        &[&router()],
        &[
            ("VROUTER_STACK", "a"),
            ("VROUTER_STATE_DIR", dir.to_str().unwrap()),
        ],
    );
    assert!(!ok);
    let line = one_error_line(&err);
    assert!(
        line.contains("cap_drop") && line.contains("VROUTER_ALLOW_EXTRA_CAPS"),
        "{line}"
    );
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(private_dir(&dir)).ok();
}

/// One simulated host with stack a's router, prepared by `prepare` (which runs before
/// the daemons start), then discovery and the router under Docker's privileges.
struct OneHost {
    _daemons: Vec<Daemon>,
    topo: Topology,
    rtr: Container,
    state: std::path::PathBuf,
}

impl OneHost {
    fn start(test: &str, prepare: impl FnOnce(&mut Host)) -> OneHost {
        let mut topo = Topology::builder(test).hosts(1).build().unwrap();
        let h = topo.host_mut(1);
        h.add_network("a", "10.1.0.0/24", Protection::Protected)
            .unwrap();
        let rtr = h
            .add_container("a", "rtr", "10.1.0.254", Role::Router)
            .unwrap();
        prepare(h);
        let state = std::path::PathBuf::from(format!("/run/{}-state-{test}", prefix()));
        let _ = std::fs::remove_dir_all(&state);
        let _ = std::fs::remove_dir_all(private_dir(&state));
        std::fs::create_dir_all(&state).unwrap();
        let s = state.display().to_string();
        let disc = h
            .spawn_privileged(&discovery(), &["--state-dir", &s], &[])
            .unwrap();
        let r = rtr
            .spawn_privileged(
                &router(),
                &[],
                &[("VROUTER_STACK", "a"), ("VROUTER_STATE_DIR", &s)],
            )
            .unwrap();
        OneHost {
            _daemons: vec![disc, r],
            topo,
            rtr,
            state,
        }
    }

    fn events(&self) -> Vec<vrouter_state::Event> {
        vrouter_state::StateDir::open(&self.state)
            .ok()
            .and_then(|d| d.read_events().ok())
            .unwrap_or_default()
    }

    fn wait_event(&self, what: impl Fn(&str) -> bool) -> bool {
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            self.events().iter().any(|e| what(&e.message))
        })
    }

    fn host_links(&self) -> String {
        exec_ok(Some(&self.topo.host(1).ns), &["ip", "-o", "link", "show"])
            .unwrap()
            .stdout
    }
}

impl Drop for OneHost {
    fn drop(&mut self) {
        // The daemons first, or they may recreate what is being removed.
        self._daemons.clear();
        let _ = std::fs::remove_dir_all(&self.state);
        let _ = std::fs::remove_dir_all(private_dir(&self.state));
    }
}

/// Discovery's private directory for a state directory (its default).
fn private_dir(state: &std::path::Path) -> std::path::PathBuf {
    let mut s = state.as_os_str().to_owned();
    s.push("-private");
    s.into()
}

#[test]
fn udp_port_in_use_is_reported_and_nothing_is_left_behind() {
    require_root!();
    let mut holder = None;
    let t = OneHost::start("port", |h| {
        // A plain UDP socket holds the VXLAN port.
        let d = h
            .spawn(
                "python3",
                &["-c", "import socket,time; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 4789)); print('bound', flush=True); time.sleep(60)"],
                &[],
            )
            .unwrap();
        assert!(d.wait_for_output("bound", Duration::from_secs(5)));
        holder = Some(d);
    });
    assert!(
        t.wait_event(|m| m.contains("UDP port 4789 is in use") && m.contains("VROUTER_VXLAN_PORT")),
        "no clear event for the port in use: {:#?}",
        t.events()
    );
    let links = t.host_links();
    assert!(
        !links.contains("vxlan1000") && !links.contains("vrm"),
        "half-built state:\n{links}"
    );
    // Once the port is free, the router gets attached without a restart.
    holder.unwrap().kill(libc::SIGKILL).unwrap();
    let attached = wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
        exec(Some(&t.rtr.ns), &["ip", "link", "show", "ovl1000"])
            .map(|o| o.success())
            .unwrap_or(false)
    });
    assert!(
        attached,
        "router not attached after the port was freed: {:#?}",
        t.events()
    );
}

#[test]
fn duplicate_vni_is_reported_and_nothing_is_left_behind() {
    require_root!();
    let t = OneHost::start("dupvni", |h| {
        // Someone else's VXLAN device already uses VNI 1000 on port 4789.
        h.exec_ok(&[
            "ip", "link", "add", "foreign0", "type", "vxlan", "id", "1000", "dstport", "4789",
            "dev", "eth0",
        ])
        .unwrap();
    });
    assert!(
        t.wait_event(|m| m.contains("VNI 1000 is already used by another VXLAN device")),
        "no clear event for the duplicate VNI: {:#?}",
        t.events()
    );
    let links = t.host_links();
    assert!(
        !links.contains("vxlan1000") && !links.contains("vrm"),
        "half-built state:\n{links}"
    );
    assert!(links.contains("foreign0"), "the foreign device was touched");
}

#[test]
fn overlapping_prefixes_are_refused_with_an_event_on_every_host() {
    require_root!();
    let mesh = Mesh::start(
        "overlap",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.0.0.0/8"),
        ],
    )
    .unwrap();
    for h in [1, 2] {
        let ok = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            mesh.events(h).iter().any(|e| {
                e.kind == "conflict_refused"
                    && e.message.contains("10.0.0.0/8")
                    && e.message.contains("stack b")
                    && e.message.contains("stack a")
            })
        });
        assert!(
            ok,
            "host {h}: no conflict_refused event: {:#?}",
            mesh.events(h)
        );
    }
    // The decision is the same on every host: a keeps its prefix, b's is refused and
    // published nowhere. Discovery logs the event before it programs the kernel and
    // publishes discovery.json, so the file may lag the event by a reconcile: wait for
    // it (a host that refused a before b's router registered corrects itself then).
    let expected = vec!["b 10.0.0.0/8".to_string()];
    for h in [1, 2] {
        let refused = || -> Vec<String> {
            vrouter_state::StateDir::open(&mesh.state_dir(h))
                .unwrap()
                .read_discovery()
                .unwrap()
                .refused
                .iter()
                .map(|r| {
                    format!(
                        "{} {}",
                        r.stack,
                        r.prefix.map(|p| p.to_string()).unwrap_or_default()
                    )
                })
                .collect()
        };
        wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            refused() == expected
        });
        assert_eq!(refused(), expected, "host {h}");
    }
    assert!(mesh.wait_router_routes("a", &[], Duration::from_secs(10)));
}

/// Host 1's peer file names, beside stack b on host 2, stacks that must never be
/// routed: `evil` on host 2 uses stack a's router address (its FDB row would send a's
/// own MAC to host 2), `twin` reuses b's router address from another host (two FDB
/// rows for one MAC, flapping), `meta` announces the cloud metadata range beside a
/// good prefix, and local stack b announces it too (host 2 refuses that). Each is
/// refused with an event naming it; nothing of them reaches routes.json, the FDB or
/// router a's routing table, while b and meta's good prefixes are routed.
#[test]
fn unsafe_stacks_and_prefixes_are_refused_with_an_event_and_never_routed() {
    require_root!();
    let mut mesh = Mesh::build(
        "unsafe",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            // A local stack is held to the same rules: host 2 refuses b's metadata range.
            StackDef::new("b", 2, 1000, "10.2.0.0/24").announce("10.2.0.0/24,169.254.0.0/16"),
        ],
    )
    .unwrap();
    let h2 = mesh.topo.host(2).underlay_ip;
    let o = h2.octets();
    let elsewhere = std::net::Ipv4Addr::new(o[0], o[1], o[2], 250);
    let stack = |name: &str, prefixes: &str, router: &str| {
        format!(
            "[[host.stack]]\nname = \"{name}\"\nvni = 1000\nprefixes = [{prefixes}]\nrouter_ip = \"{router}\"\n"
        )
    };
    let config = format!(
        "[[host]]\naddress = \"{h2}\"\n{}{}{}\n[[host]]\naddress = \"{elsewhere}\"\n{}",
        stack("b", "\"10.2.0.0/24\"", "10.2.0.254"),
        stack("evil", "\"10.1.0.254/32\", \"10.9.0.0/24\"", "10.1.0.254"),
        stack("meta", "\"10.7.0.0/24\", \"169.254.0.0/16\"", "10.7.0.254"),
        stack("twin", "\"10.2.0.254/32\", \"10.8.0.0/24\"", "10.2.0.254"),
    );
    write_file_atomic(&mesh.config_path(1), config).unwrap();
    mesh.write_config(2).unwrap();
    mesh.start_discovery(1).unwrap();
    mesh.start_discovery(2).unwrap();
    mesh.start_routers().unwrap();

    for (stack, reason) in [
        ("evil", "router_ip_clash"),
        ("twin", "router_ip_clash"),
        ("meta", "reserved_prefix"),
    ] {
        let seen = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
            mesh.events(1).iter().any(|e| {
                e.kind == "conflict_refused"
                    && e.reason == reason
                    && e.stack.as_ref().is_some_and(|s| s.as_str() == stack)
            })
        });
        assert!(seen, "no {reason} event for {stack}: {:#?}", mesh.events(1));
    }
    let local = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        mesh.events(2).iter().any(|e| {
            e.kind == "conflict_refused"
                && e.reason == "reserved_prefix"
                && e.message.contains("169.254.0.0/16")
                && e.stack.as_ref().is_some_and(|s| s.as_str() == "b")
        })
    });
    assert!(
        local,
        "host 2 did not refuse its own stack's 169.254.0.0/16: {:#?}",
        mesh.events(2)
    );
    let routes = || -> Vec<String> {
        let mut v: Vec<String> = mesh
            .routes(1)
            .map(|r| {
                r.stacks
                    .get(&vrouter_state::StackName::new("a").unwrap())
                    .map(|s| {
                        s.routes
                            .iter()
                            .map(|r| format!("{} {}", r.stack, r.prefix))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let want = vec!["b 10.2.0.0/24".to_string(), "meta 10.7.0.0/24".to_string()];
    wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        routes() == want
    });
    assert_eq!(routes(), want);
    let installed = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        mesh.router_routes("a") == ["10.2.0.0/24", "10.7.0.0/24"]
    });
    assert!(installed, "router a: {:?}", mesh.router_routes("a"));

    // One FDB row per router MAC, and none for a's own MAC.
    let fdb = exec_ok(
        Some(&mesh.topo.host(1).ns),
        &["bridge", "fdb", "show", "dev", "vxlan1000"],
    )
    .unwrap()
    .stdout;
    let rows = |mac: &str| {
        fdb.lines()
            .filter(|l| l.starts_with(mac) && l.contains(" dst "))
            .count()
    };
    assert_eq!(
        rows("02:e8:0a:01:00:fe"),
        0,
        "a's MAC sent elsewhere:\n{fdb}"
    );
    assert_eq!(rows("02:e8:0a:02:00:fe"), 1, "b's MAC:\n{fdb}");
    assert!(
        !fdb.contains(&elsewhere.to_string()),
        "twin's host has rows:\n{fdb}"
    );
    let refused: Vec<String> = vrouter_state::StateDir::open(&mesh.state_dir(1))
        .unwrap()
        .read_discovery()
        .unwrap()
        .refused
        .iter()
        .map(|r| format!("{} {}", r.stack, r.code))
        .collect();
    for want in [
        "evil router_ip_clash",
        "twin router_ip_clash",
        "meta reserved_prefix",
    ] {
        assert!(
            refused.iter().any(|r| r == want),
            "{want} not in {refused:?}"
        );
    }
}
