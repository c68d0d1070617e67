//! Smoke tests of the discovery side of encryption (issue 16) on two simulated hosts
//! with gossip (the full matrix is tests/tests/encryption.rs): with
//! `VROUTER_ENCRYPTION=require` the stacks reach each other through the WireGuard
//! device, the VXLAN rows point at tunnel addresses, and discovery.json reports it;
//! a plain VXLAN frame from the underlay is dropped by the input filter. Every wait is
//! bounded.

use std::time::Duration;
use vrouter_tests::gossip::OLD_SECRET;
use vrouter_tests::mesh::{Mesh, StackDef};
use vrouter_tests::*;

const CONVERGE: Duration = Duration::from_secs(30);

fn two_encrypted(test: &str, mode: [&str; 2]) -> Mesh {
    let mut mesh = Mesh::build(
        test,
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
        ],
    )
    .expect("mesh builds");
    mesh.set_static_peers(false);
    let join = mesh.topo.host(1).underlay_ip.to_string();
    for h in 1..=2 {
        mesh.set_discovery_env(h, "VROUTER_SECRET", OLD_SECRET);
        mesh.set_discovery_env(h, "VROUTER_ENCRYPTION", mode[h - 1]);
        mesh.set_discovery_env(h, "VROUTER_WG_BACKEND", "userspace");
        mesh.set_discovery_env(h, "VROUTER_WG_ROTATION_SECS", "20");
        if h != 1 {
            mesh.set_discovery_env(h, "VROUTER_JOIN", &join);
        }
    }
    mesh.start_all().expect("mesh starts");
    mesh
}

/// discovery.json of `host`; null until discovery wrote it.
fn discovery_json(mesh: &Mesh, host: usize) -> serde_json::Value {
    std::fs::read_to_string(mesh.state_dir(host).join("discovery.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

#[test]
fn two_hosts_with_require_ping_through_wireguard() {
    if !require_root() {
        return;
    }
    let mesh = two_encrypted("enc_smoke_require", ["require", "require"]);
    if let Err(e) = mesh.wait_converged(CONVERGE) {
        mesh.dump_logs();
        panic!("{e:#}");
    }
    let b = mesh.svc("b").ip.to_string();
    let ok = wait_until(CONVERGE, Duration::from_millis(200), || {
        ping(&mesh.svc("a").ns, &b, 1, Duration::from_secs(1))
    });
    if !ok {
        mesh.dump_logs();
    }
    assert!(ok, "a cannot ping b through the encrypted overlay");
    let mut d = serde_json::Value::Null;
    let reported = wait_until(CONVERGE, Duration::from_millis(100), || {
        d = discovery_json(&mesh, 1);
        d["encryption"]["peers"][0]["state"] == "encrypted"
    });
    assert!(reported, "{d}");
    let e = &d["encryption"];
    assert_eq!(e["mode"], "require", "{e}");
    assert_eq!(e["backend"], "userspace", "{e}");
    let mtu = e["overlay_mtu"].as_u64().unwrap();
    assert_eq!(
        mtu,
        d["host"]["underlay_mtu"].as_u64().unwrap() - 130,
        "{e}"
    );
    assert_eq!(d["host"]["overlay_mtu"].as_u64(), Some(mtu));
    let peer = &e["peers"][0];
    assert_eq!(peer["state"], "encrypted", "{e}");
    let tunnel = peer["tunnel_address"].as_str().unwrap().to_string();
    assert!(tunnel.starts_with("10.255."), "{e}");
    // The FDB points at the peer's tunnel address, and the VXLAN device has no local.
    let h1 = mesh.topo.host(1).ns.clone();
    let fdb = exec_ok(Some(&h1), &["bridge", "fdb", "show", "dev", "vxlan1000"])
        .unwrap()
        .stdout;
    assert!(fdb.contains(&format!("dst {tunnel}")), "{fdb}");
    let link = exec_ok(Some(&h1), &["ip", "-d", "link", "show", "vxlan1000"])
        .unwrap()
        .stdout;
    assert!(!link.contains(" local "), "{link}");
    assert!(link.contains(&format!("mtu {mtu}")), "{link}");
    // The input filter is in place and counts what it drops.
    let table = exec_ok(Some(&h1), &["nft", "list", "ruleset"])
        .unwrap()
        .stdout;
    assert!(
        table.contains("vxlan_in") && table.contains("udp dport 4789"),
        "{table}"
    );
    // Status text lists the section.
    let status = exec_ok(
        Some(&h1),
        &[
            mesh.bin("vrouter-discovery").to_str().unwrap(),
            "--state-dir",
            mesh.state_dir(1).to_str().unwrap(),
            "status",
        ],
    )
    .unwrap()
    .stdout;
    assert!(status.contains("ENCRYPTION"), "{status}");
}

#[test]
fn an_off_host_next_to_a_require_host_is_refused_and_not_routed() {
    if !require_root() {
        return;
    }
    let mesh = two_encrypted("enc_smoke_off", ["require", "off"]);
    let mut last = serde_json::Value::Null;
    let refused = wait_until(CONVERGE, Duration::from_millis(200), || {
        last = discovery_json(&mesh, 1);
        last["encryption"]["peers"][0]["state"] == "refused"
            && discovery_json(&mesh, 2)["encryption"]["peers"][0]["state"] == "refused"
    });
    if !refused {
        mesh.dump_logs();
    }
    assert!(refused, "{last}");
    let events = std::fs::read_to_string(mesh.state_dir(1).join("events.log")).unwrap();
    assert!(
        events.contains("encryption_peer_refused") && events.contains("VROUTER_ENCRYPTION"),
        "{events}"
    );
    let routes = std::fs::read_to_string(mesh.state_dir(1).join("routes.json")).unwrap();
    assert!(!routes.contains("10.2.0.0/24"), "{routes}");
}

#[test]
fn rotate_key_switches_both_hosts_to_the_new_key_make_before_break() {
    if !require_root() {
        return;
    }
    let mesh = two_encrypted("enc_smoke_rotate", ["require", "require"]);
    if let Err(e) = mesh.wait_converged(CONVERGE) {
        mesh.dump_logs();
        panic!("{e:#}");
    }
    let b = mesh.svc("b").ip.to_string();
    let a_ns = mesh.svc("a").ns.clone();
    assert!(wait_until(CONVERGE, Duration::from_millis(200), || ping(
        &a_ns,
        &b,
        1,
        Duration::from_secs(1)
    )));
    let old = discovery_json(&mesh, 1)["encryption"]["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    let key_file = mesh.private_dir(1).join("wg.key");
    let old_file = std::fs::read_to_string(&key_file).unwrap();
    // Pings every 10 ms across the rotation: at most 1 s (100) lost.
    let probe = vrouter_tests::probe::probe_bin()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let pinger = {
        let (ns, b, probe) = (a_ns.clone(), b.clone(), probe.clone());
        std::thread::spawn(move || {
            exec_timeout(
                Some(&ns),
                &[&probe, "ping", &b, "600", "8000", "10"],
                Duration::from_secs(20),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let h1 = mesh.topo.host(1).ns.clone();
    let out = exec_ok(
        Some(&h1),
        &[
            mesh.bin("vrouter-discovery").to_str().unwrap(),
            "--state-dir",
            mesh.state_dir(1).to_str().unwrap(),
            "--private-dir",
            mesh.private_dir(1).to_str().unwrap(),
            "rotate-key",
        ],
    )
    .unwrap()
    .stdout;
    assert!(out.contains("key rotation started"), "{out}");
    let pings = pinger.join().unwrap().unwrap().stdout;
    let field = |k: &str| -> u32 {
        pings
            .split_whitespace()
            .find_map(|t| t.strip_prefix(k).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    };
    let (sent, received) = (field("sent="), field("received="));
    let mut last = serde_json::Value::Null;
    let done = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        last = discovery_json(&mesh, 1);
        let e = &last["encryption"];
        e["next_public_key"].is_null() && e["public_key"].as_str() != Some(old.as_str())
    });
    if !done {
        mesh.dump_logs();
    }
    assert!(done, "{last}");
    let new = last["encryption"]["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    // Host 2 expects the new key, the key file holds it, the .next file is gone.
    let peer_view = discovery_json(&mesh, 2)["encryption"]["peers"][0]["public_key"].clone();
    assert_eq!(peer_view.as_str(), Some(new.as_str()));
    assert_ne!(std::fs::read_to_string(&key_file).unwrap(), old_file);
    assert!(!mesh.private_dir(1).join("wg.key.next").exists());
    let events = std::fs::read_to_string(mesh.state_dir(1).join("events.log")).unwrap();
    assert!(events.contains("key_rotation_started"), "{events}");
    assert!(events.contains("key_rotation_completed"), "{events}");
    eprintln!("rotation: {received}/{sent} pings answered (10 ms apart)");
    assert!(sent > 0 && sent - received <= 100, "{received}/{sent}");
    assert!(ping(&a_ns, &b, 1, Duration::from_secs(2)));
}

/// The `packets N` of the require filter's rule in `host`'s ruleset.
fn filter_drops(mesh: &Mesh, host: usize) -> Option<u64> {
    let ns = mesh.topo.host(host).ns.clone();
    let out = exec_ok(Some(&ns), &["nft", "list", "ruleset"]).ok()?.stdout;
    let line = out
        .lines()
        .find(|l| l.contains("udp dport 4789") && l.contains("drop"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "packets")?;
    words.next()?.parse().ok()
}

#[test]
fn require_drops_plain_vxlan_from_the_underlay_prefer_routes_a_keyless_host_in_the_clear() {
    if !require_root() {
        return;
    }
    let mesh = two_encrypted("enc_smoke_prefer", ["prefer", "off"]);
    if let Err(e) = mesh.wait_converged(CONVERGE) {
        mesh.dump_logs();
        panic!("{e:#}");
    }
    let b = mesh.svc("b").ip.to_string();
    assert!(wait_until(CONVERGE, Duration::from_millis(200), || ping(
        &mesh.svc("a").ns,
        &b,
        1,
        Duration::from_secs(1)
    )));
    // discovery.json is written at the end of the reconcile that published the route.
    let mut d = serde_json::Value::Null;
    let plain = wait_until(CONVERGE, Duration::from_millis(100), || {
        d = discovery_json(&mesh, 1);
        d["encryption"]["peers"][0]["state"] == "plain"
    });
    assert!(plain, "{d}");
    let peer = &d["encryption"]["peers"][0];
    assert!(
        peer["reason"]
            .as_str()
            .unwrap()
            .contains("VROUTER_ENCRYPTION"),
        "{peer}"
    );
    let events = std::fs::read_to_string(mesh.state_dir(1).join("events.log")).unwrap();
    assert_eq!(
        events.matches("encryption_peer_plain").count(),
        1,
        "{events}"
    );
    // prefer has no filter (plain peers must get in).
    assert_eq!(filter_drops(&mesh, 1), None);
    drop(mesh);

    let mesh = two_encrypted("enc_smoke_inject", ["require", "prefer"]);
    if let Err(e) = mesh.wait_converged(CONVERGE) {
        mesh.dump_logs();
        panic!("{e:#}");
    }
    let mut d = serde_json::Value::Null;
    let encrypted = wait_until(CONVERGE, Duration::from_millis(100), || {
        d = discovery_json(&mesh, 2);
        d["encryption"]["peers"][0]["state"] == "encrypted"
    });
    assert!(encrypted, "{d}");
    // Plain VXLAN from host 2's underlay address to host 1's VXLAN port: dropped at
    // host 1's input hook, counted.
    let before = filter_drops(&mesh, 1).expect("the require filter is in place");
    let to = format!("{}:4789", mesh.topo.host(1).underlay_ip);
    let probe = vrouter_tests::probe::probe_bin()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let h2 = mesh.topo.host(2).ns.clone();
    exec_ok(
        Some(&h2),
        &[
            &probe, "udp-send", "--to", &to, "--count", "5", "--size", "100",
        ],
    )
    .unwrap();
    let after = filter_drops(&mesh, 1).unwrap();
    assert!(after >= before + 5, "dropped {before} -> {after}");
}

/// Pings every 10 ms from `stack_from`'s service to `stack_to`'s for `count` pings, in a
/// thread; returns (sent, received) when joined.
fn ping_run(mesh: &Mesh, from: &str, to: &str, count: u32) -> std::thread::JoinHandle<(u32, u32)> {
    let probe = vrouter_tests::probe::probe_bin()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let (ns, dst) = (mesh.svc(from).ns.clone(), mesh.svc(to).ip.to_string());
    std::thread::spawn(move || {
        let out = exec_timeout(
            Some(&ns),
            &[&probe, "ping", &dst, &count.to_string(), "5000", "10"],
            Duration::from_secs(u64::from(count) / 50 + 20),
        )
        .map(|o| o.stdout)
        .unwrap_or_default();
        let field = |k: &str| -> u32 {
            out.split_whitespace()
                .find_map(|t| t.strip_prefix(k).and_then(|v| v.parse().ok()))
                .unwrap_or(0)
        };
        (field("sent="), field("received="))
    })
}

/// Whether `stack`'s router link `ovl1000` reaches `mtu` within 10 s.
fn router_mtu(mesh: &Mesh, stack: &str, mtu: u32) -> bool {
    let ns = mesh.rtr(stack).ns.clone();
    wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
        exec_ok(Some(&ns), &["ip", "-o", "link", "show", "ovl1000"])
            .is_ok_and(|o| o.stdout.contains(&format!("mtu {mtu} ")))
    })
}

fn vxlan_device(mesh: &Mesh, host: usize) -> (u32, String) {
    let ns = mesh.topo.host(host).ns.clone();
    let link = exec_ok(Some(&ns), &["ip", "-d", "link", "show", "vxlan1000"])
        .unwrap()
        .stdout;
    (mesh.ifindex(host, "vxlan1000").unwrap(), link)
}

#[test]
fn modes_switch_in_place_and_a_userspace_restart_pauses_briefly() {
    if !require_root() {
        return;
    }
    let mut mesh = two_encrypted("enc_smoke_switch", ["off", "off"]);
    if let Err(e) = mesh.wait_converged(CONVERGE) {
        mesh.dump_logs();
        panic!("{e:#}");
    }
    let b = mesh.svc("b").ip.to_string();
    let reach = |mesh: &Mesh| {
        wait_until(CONVERGE, Duration::from_millis(200), || {
            ping(&mesh.svc("a").ns, &b, 1, Duration::from_secs(1))
        })
    };
    assert!(reach(&mesh));
    let (index, link) = vxlan_device(&mesh, 1);
    assert!(
        link.contains(" local 198.18.0.1") && link.contains("mtu 1450"),
        "{link}"
    );

    // off -> require on both hosts: the device keeps its index (routers keep their
    // links), loses its local address, and its MTU drops to 1370.
    for h in 1..=2 {
        mesh.stop_discovery(h, libc::SIGTERM).unwrap();
        mesh.set_discovery_env(h, "VROUTER_ENCRYPTION", "require");
        mesh.start_discovery(h).unwrap();
    }
    let mut d = serde_json::Value::Null;
    let encrypted = wait_until(CONVERGE, Duration::from_millis(100), || {
        d = discovery_json(&mesh, 1);
        d["encryption"]["peers"][0]["state"] == "encrypted"
    });
    assert!(encrypted, "{d}");
    assert!(reach(&mesh), "no traffic after switching to require");
    let (after, link) = vxlan_device(&mesh, 1);
    assert_eq!(after, index, "the VXLAN device was adjusted in place");
    assert!(
        !link.contains(" local ") && link.contains("mtu 1370"),
        "{link}"
    );

    // A userspace restart under 10 ms pings: the persistent TUN keeps address and
    // routes; the pause lasts until the new discovery's first reconcile.
    let pings = ping_run(&mesh, "a", "b", 300);
    std::thread::sleep(Duration::from_millis(500));
    mesh.stop_discovery(1, libc::SIGTERM).unwrap();
    mesh.start_discovery(1).unwrap();
    let (sent, received) = pings.join().unwrap();
    eprintln!(
        "userspace discovery restart: {received}/{sent} pings answered 10 ms apart ({} ms lost)",
        (sent - received) * 10
    );
    assert!(sent > 0 && sent - received <= 100, "{received}/{sent}");

    // require -> off: local address and MTU back in place, the WireGuard device and the
    // filter gone.
    for h in 1..=2 {
        mesh.stop_discovery(h, libc::SIGTERM).unwrap();
        mesh.set_discovery_env(h, "VROUTER_ENCRYPTION", "off");
        mesh.start_discovery(h).unwrap();
    }
    let h1 = mesh.topo.host(1).ns.clone();
    let back = wait_until(CONVERGE, Duration::from_millis(200), || {
        let (_, link) = vxlan_device(&mesh, 1);
        link.contains(" local 198.18.0.1") && link.contains("mtu 1450")
    });
    assert!(back, "{}", vxlan_device(&mesh, 1).1);
    assert_eq!(vxlan_device(&mesh, 1).0, index);
    assert!(reach(&mesh), "no traffic after switching back to off");
    assert!(
        router_mtu(&mesh, "a", 1450),
        "the router raises its link to discovery's overlay MTU"
    );
    let links = exec_ok(Some(&h1), &["ip", "-o", "link"]).unwrap().stdout;
    assert!(!links.contains("vrouter-wg"), "{links}");
    assert_eq!(filter_drops(&mesh, 1), None);
}

#[test]
fn leave_mesh_and_cleanup_remove_the_wireguard_device_and_the_filter() {
    if !require_root() {
        return;
    }
    let mut mesh = two_encrypted("enc_smoke_cleanup", ["require", "require"]);
    if let Err(e) = mesh.wait_converged(CONVERGE) {
        mesh.dump_logs();
        panic!("{e:#}");
    }
    let has_device = |mesh: &Mesh, h: usize| {
        let ns = mesh.topo.host(h).ns.clone();
        exec_ok(Some(&ns), &["ip", "-o", "link"])
            .unwrap()
            .stdout
            .contains("vrouter-wg")
    };
    assert!(has_device(&mesh, 1) && has_device(&mesh, 2));
    assert!(filter_drops(&mesh, 1).is_some() && filter_drops(&mesh, 2).is_some());

    // leave-mesh on host 1: its device and filter go at once.
    let h1 = mesh.topo.host(1).ns.clone();
    let out = exec_ok(
        Some(&h1),
        &[
            mesh.bin("vrouter-discovery").to_str().unwrap(),
            "--state-dir",
            mesh.state_dir(1).to_str().unwrap(),
            "leave-mesh",
        ],
    )
    .unwrap()
    .stdout;
    assert!(out.contains("left the mesh"), "{out}");
    assert!(!has_device(&mesh, 1));
    assert_eq!(filter_drops(&mesh, 1), None);

    // A plain stop leaves host 2's device in place; cleanup removes it and the filter.
    mesh.stop_discovery(2, libc::SIGTERM).unwrap();
    assert!(
        has_device(&mesh, 2),
        "a stop keeps the device (headless datapath)"
    );
    for r in ["a", "b"] {
        mesh.stop_router(r, libc::SIGTERM).unwrap();
    }
    let (ok, out) = mesh.run_cleanup(2);
    assert!(ok, "{out}");
    assert!(
        out.contains("removed WireGuard device vrouter-wg") && out.contains("nftables table ip"),
        "{out}"
    );
    assert!(!has_device(&mesh, 2));
    assert_eq!(filter_drops(&mesh, 2), None);
    assert!(
        mesh.private_dir(2).join("wg.key").exists(),
        "the key is the host's identity: cleanup keeps it"
    );
}

#[test]
fn static_peers_with_public_keys_are_encrypted() {
    if !require_root() {
        return;
    }
    let mut mesh = Mesh::build(
        "enc_smoke_static",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
        ],
    )
    .expect("mesh builds");
    for h in 1..=2 {
        mesh.set_discovery_env(h, "VROUTER_ENCRYPTION", "require");
        mesh.set_discovery_env(h, "VROUTER_WG_BACKEND", "userspace");
    }
    mesh.start_all().expect("mesh starts");
    // Without keys in the peer files each host refuses the other.
    let mut keys = Vec::new();
    for h in 1..=2 {
        let mut d = serde_json::Value::Null;
        let refused = wait_until(CONVERGE, Duration::from_millis(100), || {
            d = discovery_json(&mesh, h);
            d["encryption"]["peers"][0]["state"] == "refused"
        });
        assert!(refused, "{d}");
        keys.push(d["encryption"]["public_key"].as_str().unwrap().to_string());
    }
    // The operator adds each host's key to the others' peer files (reloaded on change).
    for (h, other) in [(1usize, 2usize), (2, 1)] {
        let path = mesh.config_path(h);
        let text = std::fs::read_to_string(&path).unwrap();
        let address = format!("address = \"{}\"", mesh.topo.host(other).underlay_ip);
        let with_key = text.replace(
            &address,
            &format!("{address}\npublic_key = \"{}\"", keys[other - 1]),
        );
        assert_ne!(with_key, text);
        write_file_atomic(&path, with_key).unwrap();
    }
    if let Err(e) = mesh.wait_converged(CONVERGE) {
        mesh.dump_logs();
        panic!("{e:#}");
    }
    let b = mesh.svc("b").ip.to_string();
    let ok = wait_until(CONVERGE, Duration::from_millis(200), || {
        ping(&mesh.svc("a").ns, &b, 1, Duration::from_secs(1))
    });
    if !ok {
        mesh.dump_logs();
    }
    assert!(ok, "no traffic between static peers with keys");
    let d = discovery_json(&mesh, 1);
    let peer = &d["encryption"]["peers"][0];
    assert_eq!(peer["state"], "encrypted", "{d}");
    // Static tunnel addresses follow the same rule: 198.18.0.2 -> 10.255.0.2.
    assert_eq!(peer["tunnel_address"], "10.255.0.2", "{d}");
    assert_eq!(d["encryption"]["tunnel_address"], "10.255.0.1", "{d}");
}
