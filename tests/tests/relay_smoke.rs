//! Discovery's relay smoke (issue 17): four gossip hosts (stack sN on host N, VNI
//! 1000), hosts 3 and 4 relays, short path probes. UDP between hosts 1 and 2 blocked:
//! s1 reaches s2 through a relay, discovery.json says so; the relay in use blocked
//! too: they fail over to the other; unblocked: they go direct again. The full
//! scenarios (NAT, encryption) are in nat_relay.rs; times are printed.

use std::time::{Duration, Instant};

use serde_json::Value;
use vrouter_tests::gossip::GossipMesh;
use vrouter_tests::*;

const CONVERGE: Duration = Duration::from_secs(30);

/// Host `host`'s path to the host at `peer_ip`, as discovery.json says.
fn path(g: &GossipMesh, host: usize, peer_ip: &str) -> Option<Value> {
    let d = g.discovery_json(host).ok()?;
    d["paths"]
        .as_array()?
        .iter()
        .find(|p| p["peer_addr"] == peer_ip)
        .cloned()
}

fn wait_path(g: &GossipMesh, host: usize, peer: usize, ok: impl Fn(&Value) -> bool) -> Value {
    let ip = g.topo.host(peer).underlay_ip.to_string();
    let mut last = None;
    let done = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        last = path(g, host, &ip);
        last.as_ref().is_some_and(&ok)
    });
    assert!(
        done,
        "host {host} -> host {peer}: path {last:?}\n{}",
        g.summary()
    );
    last.unwrap()
}

#[test]
fn relay_failover_and_return() {
    require_root!();
    let mut g = GossipMesh::build(
        "relay-smoke",
        4,
        vrouter_tests::gossip::one_stack_per_host(4),
    )
    .expect("mesh");
    for h in 1..=4 {
        g.set_discovery_env(h, "VROUTER_PATH_PROBE_MS", "200");
        g.set_discovery_env(h, "VROUTER_PATH_DEAD_MS", "700");
    }
    g.set_discovery_env(3, "VROUTER_RELAY", "true");
    g.set_discovery_env(4, "VROUTER_RELAY", "true");
    g.start_all().expect("start");
    g.wait_full_mesh(CONVERGE).expect("full mesh");
    let ips: Vec<String> = (0..=4)
        .map(|h| {
            if h == 0 {
                String::new()
            } else {
                g.topo.host(h).underlay_ip.to_string()
            }
        })
        .collect();
    let ip = |h: usize| ips[h].clone();
    let p = wait_path(&g, 1, 2, |p| p["via"] == "direct");
    eprintln!("direct: {p}");
    let d = g.discovery_json(1).unwrap();
    assert_eq!(d["addresses"]["local"], ip(1));
    assert_eq!(d["addresses"]["observed"], Value::Null);
    assert_eq!(d["relay"]["offered"], false);
    assert_eq!(g.discovery_json(3).unwrap()["relay"]["offered"], true);
    assert!(g.wait_reachable("s1", "s2", CONVERGE).is_some());

    // Block 1 <-> 2: relayed through 3 or 4.
    let t = Instant::now();
    g.partition(&[1], &[2]).unwrap();
    let p = wait_path(&g, 1, 2, |p| p["via"] == "relay");
    let relay = p["relay_addr"].as_str().unwrap().to_string();
    let took = g.wait_reachable("s1", "s2", Duration::from_secs(20));
    eprintln!(
        "relayed via {relay} after {:?}, traffic after {took:?}",
        t.elapsed()
    );
    assert!(took.is_some(), "s1 -> s2 through {relay}\n{}", g.summary());
    assert!(g
        .wait_reachable("s2", "s1", Duration::from_secs(5))
        .is_some());
    let r = if relay == ip(3) { 3 } else { 4 };
    let other = 7 - r;
    let d = g.discovery_json(r).unwrap();
    assert!(
        d["relay"]["vnis"]
            .as_array()
            .unwrap()
            .contains(&1000.into()),
        "{}",
        d["relay"]
    );
    // The relay counts what it forwards (read at its reconciles).
    let mut forwarded = 0;
    let counted = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        let _ = g.reachable("s1", "s2", Duration::from_secs(1));
        forwarded = g.discovery_json(r).unwrap()["relay"]["forwarded_packets"]
            .as_u64()
            .unwrap_or(0);
        forwarded > 0
    });
    assert!(counted, "relay host {r} counted nothing\n{}", g.summary());
    eprintln!("relay host {r} forwarded {forwarded} packets");

    // Restarting host 1's discovery and the relay's keeps the relayed path: the
    // previous decision stands while the probes start.
    for h in [1, r] {
        g.stop_discovery(h, libc::SIGTERM).unwrap();
        g.start_discovery(h).unwrap();
        let mut lost = Vec::new();
        for i in 0..15 {
            if !ping(
                &g.svc("s1").ns,
                &g.svc("s2").ip.to_string(),
                1,
                Duration::from_millis(300),
            ) {
                lost.push(i);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("restart of host {h}: pings lost {lost:?} of 15");
        for x in [1, h] {
            for e in g
                .events(x)
                .iter()
                .filter(|e| e.kind.to_string().starts_with("path_"))
            {
                eprintln!("  host {x} {} {}: {}", e.ts_ms, e.kind, e.message);
            }
        }
        assert!(
            lost.len() <= 1,
            "{lost:?} lost over host {h}'s restart\n{}",
            g.summary()
        );
    }
    wait_path(&g, 1, 2, |p| p["via"] == "relay");

    // Block the relay in use from both: fail over to the other.
    let t = Instant::now();
    g.partition(&[1, 2], &[r]).unwrap();
    let p = wait_path(&g, 1, 2, |p| p["relay_addr"] == ip(other).as_str());
    let took = g.wait_reachable("s1", "s2", Duration::from_secs(20));
    eprintln!(
        "failed over to host {other} after {:?}, traffic after {took:?}: {p}",
        t.elapsed()
    );
    assert!(
        took.is_some(),
        "s1 -> s2 through host {other}\n{}",
        g.summary()
    );

    // Unblock everything: direct again.
    let t = Instant::now();
    g.heal().unwrap();
    wait_path(&g, 1, 2, |p| p["via"] == "direct");
    eprintln!("direct again after {:?}", t.elapsed());
    assert!(g
        .wait_reachable("s1", "s2", Duration::from_secs(10))
        .is_some());
    let kinds: Vec<String> = g.events(1).iter().map(|e| e.kind.to_string()).collect();
    for k in ["path_relayed", "path_direct"] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing: {kinds:?}");
    }

    // No relay reaches both: unreachable, named, and the direct row stays.
    g.partition(&[1], &[2]).unwrap();
    g.partition(&[1, 2], &[3, 4]).unwrap();
    let p = wait_path(&g, 1, 2, |p| p["via"] == "unreachable");
    assert_eq!(p["code"], "no_relay", "{p}");
    let unreachable = g
        .events(1)
        .into_iter()
        .find(|e| e.kind == *"path_unreachable")
        .expect("path_unreachable event");
    assert!(
        unreachable.message.contains("VROUTER_RELAY=true"),
        "{}",
        unreachable.message
    );
    g.heal().unwrap();
    wait_path(&g, 1, 2, |p| p["via"] == "direct");
}
