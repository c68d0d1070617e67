//! End-to-end tests of gossip discovery: five simulated hosts (one stack each, VNI
//! 1000, stack `sN` = 10.N.0.0/24 on host N), every discovery with a secret file and no
//! static peers, hosts 2..5 bootstrapping from host 1's address. Underlay faults come
//! from the harness (link down, new address, partition, loss; tests/src/underlay.rs).
//! Every wait is bounded; measured times are printed (`--nocapture`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use vrouter_tests::attach::connect_from;
use vrouter_tests::gossip::{
    now_ms, GossipMesh, GOSSIP_PORT, NEW_SECRET, OLD_SECRET, WITHDRAWAL_KINDS, WRONG_SECRET,
};
use vrouter_tests::mesh::StackDef;
use vrouter_tests::*;

const HOSTS: usize = 5;
const CONVERGE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);
const PING: Duration = Duration::from_secs(2);

fn five(test: &str) -> GossipMesh {
    let g = GossipMesh::start_one_stack_per_host(test, HOSTS).expect("gossip mesh starts");
    match g.wait_full_mesh(CONVERGE) {
        Ok(t) => eprintln!("{test}: full mesh after {t:?}"),
        Err(e) => panic!("{test}: {e:#}\n{}", g.summary()),
    }
    g
}

/// Pings around the ring of hosts until every pair answers (routers install what
/// routes.json says shortly after it says it).
fn assert_ring(g: &GossipMesh, within: Duration, ctx: &str) {
    let mut last = Vec::new();
    let ok = wait_until(within, POLL, || {
        last = g.ring_failures(PING);
        last.is_empty()
    });
    assert!(ok, "{ctx}: no traffic between {last:?}\n{}", g.summary());
}

/// A TCP transfer from one stack's service to another's; the receiver must see the
/// sender's own address (no NAT).
fn transfer(g: &GossipMesh, from: &str, to: &str, port: u16) -> Result<(), String> {
    let dst = g.svc(to);
    let src = g.svc(from);
    let addr = format!("{}:{port}", dst.ip);
    let server = TcpServer::start(&dst.ns, &addr, g.topo.log_dir(), Duration::from_secs(5))
        .map_err(|e| format!("{e:#}"))?;
    tcp_send(&src.ns, &addr, 128 * 1024, Duration::from_secs(5))
        .map_err(|e| format!("{from}->{to}: {e:#}"))?;
    let peer = server
        .peer(Duration::from_secs(2))
        .map_err(|e| format!("{e:#}"))?;
    if peer.ip().to_string() != src.ip.to_string() {
        return Err(format!(
            "{from}->{to}: receiver saw {peer}, sender is {}",
            src.ip
        ));
    }
    Ok(())
}

/// A TCP connection exchanging a message every 100 ms for `duration`, failing on any
/// stall longer than `max_stall`; check with `wait_success`. Keep the server alive.
fn hold_connection(
    g: &GossipMesh,
    from: &str,
    to: &str,
    port: u16,
    duration: Duration,
    max_stall: Duration,
) -> (TcpServer, Daemon) {
    let dst = g.svc(to);
    let addr = format!("{}:{port}", dst.ip);
    let server =
        TcpServer::start(&dst.ns, &addr, g.topo.log_dir(), Duration::from_secs(60)).unwrap();
    let hold = tcp_hold(
        &g.svc(from).ns,
        &addr,
        duration,
        max_stall,
        g.topo.log_dir(),
    )
    .unwrap();
    server.peer(Duration::from_secs(3)).unwrap();
    (server, hold)
}

fn no_events(g: &GossipMesh, kinds: &[&str], since: u64, ctx: &str) {
    let bad = g.events_of_kinds_since(kinds, since);
    assert!(
        bad.is_empty(),
        "{ctx}: unexpected events:\n{}",
        bad.iter()
            .map(|(h, e)| format!("host {h}: {} {}: {}", e.source, e.kind, e.message))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// (a) Hosts 2..5 know only host 1's address; all learn every stack and traffic flows.
#[test]
fn join_with_one_bootstrap_address() {
    require_root!();
    let g = five("gossip_join");
    for h in 1..=HOSTS {
        let peers = g.peers(h);
        assert_eq!(peers.len(), HOSTS - 1, "host {h} peers: {peers:?}");
        assert!(
            peers.iter().all(|p| p.source == "gossip"),
            "host {h}: peers not learned by gossip: {peers:?}"
        );
        assert!(
            g.node_id(h).is_some_and(|n| n.len() == 16),
            "host {h} node_id"
        );
    }
    let ids: std::collections::BTreeSet<_> = (1..=HOSTS).filter_map(|h| g.node_id(h)).collect();
    assert_eq!(ids.len(), HOSTS, "node ids not distinct: {ids:?}");
    assert_ring(&g, Duration::from_secs(10), "after join");
    for h in 1..=HOSTS {
        let next = h % HOSTS + 1;
        transfer(&g, g.stack_on(h), g.stack_on(next), 5500 + h as u16).unwrap();
    }
}

/// (b) SIGKILL of host 3's discovery: routes to s3 stay everywhere and traffic goes on
/// for 10 s; restarted, it rejoins without any route withdrawal.
#[test]
fn killed_discovery_keeps_routes_and_rejoins() {
    require_root!();
    let mut g = five("gossip_kill");
    assert_ring(&g, Duration::from_secs(10), "before kill");
    let since = now_ms();
    let (_s1, mut hold1) = hold_connection(
        &g,
        "s1",
        "s3",
        5601,
        Duration::from_secs(11),
        Duration::from_secs(2),
    );
    let (_s2, mut hold2) = hold_connection(
        &g,
        "s3",
        "s4",
        5602,
        Duration::from_secs(11),
        Duration::from_secs(2),
    );
    g.stop_discovery(3, libc::SIGKILL).unwrap();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        for h in [1, 2, 4, 5] {
            assert!(
                g.routed_stacks(h).contains("s3"),
                "host {h} dropped s3 {:?} after host 3's discovery was killed\n{}",
                t.elapsed(),
                g.summary()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(g.reachable("s2", "s3", PING), "s2 -> s3 after 10 s");
    hold1
        .wait_success(Duration::from_secs(10))
        .expect("s1 -> s3 connection held");
    hold2
        .wait_success(Duration::from_secs(10))
        .expect("s3 -> s4 connection held");
    let states: Vec<_> = [1, 2, 4, 5].iter().map(|h| g.member_state(*h, 3)).collect();
    eprintln!("host 3 as seen by 1,2,4,5 after 10 s without discovery: {states:?}");

    g.start_discovery(3).unwrap();
    let t = Instant::now();
    match g.wait_full_mesh(Duration::from_secs(20)) {
        Ok(d) => eprintln!("host 3 rejoined (alive everywhere) {d:?} after restart"),
        Err(e) => panic!("{e:#}"),
    }
    let _ = t;
    // Settle a moment so a late withdrawal would show.
    std::thread::sleep(Duration::from_secs(1));
    no_events(
        &g,
        &WITHDRAWAL_KINDS,
        since,
        "kill -9 and restart of a discovery",
    );
    assert_ring(&g, Duration::from_secs(5), "after rejoin");
}

/// (c) Host 4's underlay link down: its routes leave every other host within 5 s; link
/// back: they return within 10 s.
#[test]
fn cut_host_is_withdrawn_and_returns() {
    require_root!();
    let g = five("gossip_cut");
    let others = [1, 2, 3, 5];
    g.set_underlay_link(4, false).unwrap();
    let t = Instant::now();
    let mut gone_at: BTreeMap<usize, Duration> = BTreeMap::new();
    wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
        for h in others {
            if !gone_at.contains_key(&h) && !g.routed_stacks(h).contains("s4") {
                gone_at.insert(h, t.elapsed());
            }
        }
        gone_at.len() == others.len()
    });
    eprintln!("MEASURED: routes to s4 withdrawn per host after link down: {gone_at:?}");
    assert_eq!(
        gone_at.len(),
        others.len(),
        "s4 not withdrawn everywhere within 15 s: {gone_at:?}\n{}",
        g.summary()
    );
    let worst = *gone_at.values().max().unwrap();
    eprintln!("MEASURED: s4 withdrawn everywhere {worst:?} after the link went down");
    assert!(
        worst <= Duration::from_secs(5),
        "withdrawal took {worst:?} (> 5 s)"
    );
    assert!(!g.reachable("s1", "s4", Duration::from_millis(600)));

    g.set_underlay_link(4, true).unwrap();
    let t = Instant::now();
    match g.wait_all_routes(Duration::from_secs(10)) {
        Ok(d) => eprintln!("MEASURED: every host routes every stack again {d:?} after link up"),
        Err(e) => panic!("after link up: {e:#}"),
    }
    match g.wait_full_mesh(Duration::from_secs(10)) {
        Ok(_) => eprintln!(
            "MEASURED: membership all alive {:?} after link up",
            t.elapsed()
        ),
        Err(e) => panic!("routes are back, but membership after link up: {e:#}"),
    }
    assert_ring(&g, Duration::from_secs(5), "after link up");
}

/// (d) Host 5 gets a new underlay address while s5 keeps running: traffic from host 1
/// to s5 resumes within 10 s.
#[test]
fn underlay_address_change_is_followed() {
    require_root!();
    let mut g = five("gossip_readdress");
    assert!(g.reachable("s1", "s5", PING), "s1 -> s5 before");
    let new_ip: Ipv4Addr = "198.18.0.105".parse().unwrap();
    g.change_underlay_ip(5, new_ip).unwrap();
    let t = Instant::now();
    let took = g.wait_reachable("s1", "s5", Duration::from_secs(10));
    eprintln!("MEASURED: s1 -> s5 after host 5's address change: {took:?}");
    assert!(
        took.is_some(),
        "s1 -> s5 not back within 10 s\n{}",
        g.summary()
    );
    let host_of_s5 = |h: usize| -> Vec<String> {
        g.route_lines(h, &[])
            .into_iter()
            .filter(|l| l.contains(" s5 via "))
            .collect()
    };
    let follows = wait_until(
        Duration::from_secs(10).saturating_sub(t.elapsed()),
        POLL,
        || {
            [1, 2, 3, 4].iter().all(|h| {
                host_of_s5(*h)
                    .iter()
                    .all(|l| l.ends_with(&format!("host {new_ip}")))
            })
        },
    );
    assert!(
        follows,
        "routes to s5 still point elsewhere: {:?}",
        [1, 2, 3, 4].map(host_of_s5)
    );
    if let Err(e) = g.wait_full_mesh(Duration::from_secs(10)) {
        panic!("membership after the address change: {e:#}");
    }
    assert_ring(&g, Duration::from_secs(5), "after the address change");
}

/// (e) Partition {1,2} | {3,4,5}: each side marks the other down and withdraws it;
/// healed, the full mesh is back within 15 s.
#[test]
fn partition_withdraws_and_heals() {
    require_root!();
    let g = five("gossip_partition");
    let (left, right) = ([1usize, 2], [3usize, 4, 5]);
    g.partition(&left, &right).unwrap();
    let t = Instant::now();
    let cut_off = |h: usize, o: usize| {
        g.member_state(h, o).as_deref() == Some("down")
            && !g.routed_stacks(h).contains(g.stack_on(o))
            && g.probe_reachable(h, g.stack_on(h), g.stack_on(o)) != Some(true)
    };
    let split = wait_until(Duration::from_secs(30), POLL, || {
        left.iter().all(|&h| right.iter().all(|&o| cut_off(h, o)))
            && right.iter().all(|&h| left.iter().all(|&o| cut_off(h, o)))
    });
    assert!(
        split,
        "sides did not withdraw each other within 30 s\n{}",
        g.summary()
    );
    eprintln!(
        "MEASURED: both sides withdrew each other {:?} after the partition",
        t.elapsed()
    );
    // Each side still works internally.
    assert!(
        g.reachable("s1", "s2", PING),
        "s1 -> s2 inside the left side"
    );
    assert!(
        g.reachable("s3", "s5", PING),
        "s3 -> s5 inside the right side"
    );

    g.heal().unwrap();
    match g.wait_full_mesh(Duration::from_secs(15)) {
        Ok(d) => eprintln!("MEASURED: full mesh {d:?} after heal"),
        Err(e) => panic!("after heal: {e:#}"),
    }
    assert_ring(&g, Duration::from_secs(5), "after heal");
}

/// (f) A sixth host with a wrong secret joins host 1: nobody admits it, host 1 counts
/// its packets as bad keys, and nothing changes on hosts 1-5.
#[test]
fn wrong_secret_is_rejected() {
    require_root!();
    let mut g = five("gossip_wrong_secret");
    let before: Vec<Vec<String>> = (1..=HOSTS).map(|h| g.route_lines(h, &[])).collect();
    let bad0 = g.counter(1, "rejected_bad_key");
    let h6 = g.add_host(&[WRONG_SECRET], false).unwrap();
    g.add_stack(StackDef::new("s6", h6, 1000, "10.6.0.0/24"))
        .unwrap();
    g.excluded_stacks.push("s6".into());
    let ip6 = g.topo.host(h6).underlay_ip;
    let t = Instant::now();
    let rose = wait_until(Duration::from_secs(10), POLL, || {
        g.counter(1, "rejected_bad_key") > bad0
    });
    assert!(rose, "host 1's rejected_bad_key stayed at {bad0}");
    eprintln!(
        "host 1 rejected_bad_key {bad0} -> {} after {:?}",
        g.counter(1, "rejected_bad_key"),
        t.elapsed()
    );
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        for h in 1..=HOSTS {
            assert!(
                !g.knows_address(h, ip6),
                "host {h} admitted the host with the wrong secret\n{}",
                g.summary()
            );
            assert!(!g.routed_stacks(h).contains("s6"), "host {h} routes to s6");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for h in 1..=HOSTS {
        assert_eq!(
            g.route_lines(h, &[]),
            before[h - 1],
            "host {h}'s routes changed"
        );
    }
    assert!(g.full_mesh_gap().is_none(), "{:?}", g.full_mesh_gap());
}

/// (g) One gossip packet from host 1 to host 2, captured and replayed 3 s later from
/// host 1: host 2 counts a replay and nothing else changes.
#[test]
fn replayed_packet_is_rejected() {
    require_root!();
    let g = five("gossip_replay");
    let h2ns = g.topo.host(2).ns.clone();
    let dir = g.topo.log_dir().to_path_buf();
    let file = dir.join("gossip-capture.bin");
    let mut cap = UdpCapture::start(
        &h2ns,
        GOSSIP_PORT,
        Some(g.topo.host(1).underlay_ip),
        &file,
        Duration::from_secs(15),
        &dir,
    )
    .unwrap();
    let payload = cap
        .wait(Duration::from_secs(20))
        .expect("a gossip packet from host 1");
    let captured = Instant::now();
    eprintln!("captured: {}", cap.daemon.stdout().trim());
    assert!(!payload.is_empty());

    std::thread::sleep(Duration::from_millis(2500));
    let counters = |h: usize| {
        [
            "rejected_bad_key",
            "rejected_malformed",
            "rejected_replayed",
        ]
        .map(|c| g.counter(h, c))
    };
    let states = |h: usize| {
        let mut v: Vec<String> = g
            .members(h)
            .iter()
            .map(|m| format!("{:?} {} {}", m.addr, m.node_id, m.state))
            .collect();
        v.sort();
        v
    };
    let c0 = counters(2);
    let routes0 = g.route_lines(2, &[]);
    let members0 = states(2);
    let since = now_ms();
    std::thread::sleep(Duration::from_secs(3).saturating_sub(captured.elapsed()));
    send_udp_file(
        &g.topo.host(1).ns,
        &format!("{}:{GOSSIP_PORT}", g.topo.host(2).underlay_ip),
        &file,
    )
    .unwrap();
    let rose = wait_until(Duration::from_secs(5), POLL, || {
        g.counter(2, "rejected_replayed") > c0[2]
    });
    assert!(
        rose,
        "host 2's rejected_replayed stayed at {} (counters now {:?})",
        c0[2],
        counters(2)
    );
    std::thread::sleep(Duration::from_millis(500));
    let c1 = counters(2);
    assert_eq!(
        (c1[0], c1[1]),
        (c0[0], c0[1]),
        "bad_key/malformed counters moved: {c0:?} -> {c1:?}"
    );
    assert_eq!(g.route_lines(2, &[]), routes0, "host 2's routes changed");
    assert_eq!(states(2), members0, "host 2's membership changed");
    no_events(
        &g,
        &[
            "member_failed",
            "member_left",
            "member_joined",
            "route_withdrawn",
            "stack_withdrawn",
        ],
        since,
        "replay",
    );
}

/// (h) Key rotation on the live mesh: [old] -> [old,new] -> [new,old] -> [new], 3 s
/// apart; no member fails and traffic flows throughout. Then a host left on [old] alone
/// is rejected.
#[test]
fn key_rotation_keeps_the_mesh() {
    require_root!();
    let g = five("gossip_rotation");
    let since = now_ms();
    let (_srv, mut hold) = hold_connection(
        &g,
        "s1",
        "s3",
        5701,
        Duration::from_secs(11),
        Duration::from_secs(2),
    );
    let bad_before: Vec<u64> = (1..=HOSTS)
        .map(|h| g.counter(h, "rejected_bad_key"))
        .collect();
    for (step, lines) in [
        &[OLD_SECRET, NEW_SECRET][..],
        &[NEW_SECRET, OLD_SECRET][..],
        &[NEW_SECRET][..],
    ]
    .iter()
    .enumerate()
    {
        for h in 1..=HOSTS {
            g.write_secret(h, lines).unwrap();
        }
        std::thread::sleep(Duration::from_secs(3));
        no_events(
            &g,
            &["member_failed"],
            since,
            &format!("rotation step {}", step + 1),
        );
        let failed = g.ring_failures(PING);
        assert!(
            failed.is_empty(),
            "rotation step {}: no traffic {failed:?}",
            step + 1
        );
        eprintln!("rotation step {} done: {:?}", step + 1, lines);
    }
    hold.wait_success(Duration::from_secs(10))
        .expect("connection held through the rotation");
    assert!(g.full_mesh_gap().is_none(), "{:?}", g.full_mesh_gap());
    no_events(&g, &WITHDRAWAL_KINDS, since, "rotation");
    let bad_after: Vec<u64> = (1..=HOSTS)
        .map(|h| g.counter(h, "rejected_bad_key"))
        .collect();
    eprintln!("rejected_bad_key during rotation: {bad_before:?} -> {bad_after:?}");

    // Optional part: host 5 goes back to the old key only; the others reject it.
    let sum = |g: &GossipMesh| {
        (1..=4)
            .map(|h| g.counter(h, "rejected_bad_key"))
            .sum::<u64>()
    };
    let s0 = sum(&g);
    g.write_secret(5, &[OLD_SECRET]).unwrap();
    let rose = wait_until(Duration::from_secs(10), POLL, || sum(&g) > s0);
    assert!(
        rose,
        "packets sealed with the retired key were not rejected"
    );
}

/// (i) With record broadcasts off everywhere, a new stack on host 2 still reaches every
/// host's routes.json within 30 s (anti-entropy alone).
#[test]
fn anti_entropy_alone_spreads_a_new_stack() {
    require_root!();
    let mut g = five("gossip_anti_entropy");
    for h in 1..=HOSTS {
        g.set_fault(h, "drop-broadcasts", true).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1200)); // the switch is polled every 500 ms
    g.add_stack(StackDef::new("s2b", 2, 1000, "10.22.0.0/24"))
        .unwrap();
    let t = Instant::now();
    let mut seen_at: BTreeMap<usize, Duration> = BTreeMap::new();
    wait_until(Duration::from_secs(30), POLL, || {
        for h in 1..=HOSTS {
            if !seen_at.contains_key(&h) && g.routed_stacks(h).contains("s2b") {
                seen_at.insert(h, t.elapsed());
            }
        }
        seen_at.len() == HOSTS
    });
    eprintln!("MEASURED: s2b known per host (anti-entropy only): {seen_at:?}");
    for h in 1..=HOSTS {
        g.set_fault(h, "drop-broadcasts", false).unwrap();
    }
    assert_eq!(
        seen_at.len(),
        HOSTS,
        "s2b did not reach every host within 30 s: {seen_at:?}\n{}",
        g.summary()
    );
    assert!(
        g.wait_reachable("s1", "s2b", Duration::from_secs(10))
            .is_some(),
        "s1 -> s2b"
    );
}

/// (j) A stack on host 3 whose subnet 10.1.0.0/16 overlaps s1's 10.1.0.0/24 is refused
/// on the other hosts; s1's routes stay as they were everywhere.
#[test]
fn overlapping_prefix_is_refused() {
    require_root!();
    let mut g = five("gossip_overlap");
    let before: Vec<Vec<String>> = (1..=HOSTS).map(|h| g.route_lines(h, &["x3"])).collect();
    // Router and service away from s1's .254/.5 (a router's MAC follows its address).
    g.add_stack(
        StackDef::new("x3", 3, 1000, "10.1.0.0/16").addresses("10.1.200.254", "10.1.200.5"),
    )
    .unwrap();
    g.excluded_stacks.push("x3".into());
    let refused_on = |h: usize| {
        g.refused(h).iter().any(|r| r.starts_with("x3 "))
            || g.events(h)
                .iter()
                .any(|e| e.kind == "conflict_refused" && e.message.contains("x3"))
    };
    let ok = wait_until(Duration::from_secs(15), POLL, || {
        [1, 2, 4, 5].iter().all(|h| refused_on(*h))
    });
    assert!(
        ok,
        "x3 not refused on every other host: {:?}",
        [1, 2, 4, 5].map(|h| (h, g.refused(h)))
    );
    eprintln!("host 3 itself: refused {:?}", g.refused(3));
    std::thread::sleep(Duration::from_secs(2));
    for h in 1..=HOSTS {
        let now = g.route_lines(h, &["x3"]);
        assert_eq!(now, before[h - 1], "host {h}'s routes changed");
        assert!(
            !now.iter().any(|l| l.contains("10.1.0.0/16")),
            "host {h} routes the refused prefix: {now:?}"
        );
        assert!(
            !g.routed_stacks(h).contains("x3") || h == 3,
            "host {h} routes to x3"
        );
    }
    assert!(g.reachable("s2", "s1", PING), "s2 -> s1 after the refusal");
}

/// (k) Two minutes at 5% underlay loss: no member fails and nothing is withdrawn.
#[test]
fn five_percent_loss_for_two_minutes() {
    require_root!();
    let g = five("gossip_loss");
    let since = now_ms();
    g.underlay_loss(5).unwrap();
    let kinds = ["member_failed", "route_withdrawn", "stack_withdrawn"];
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_secs(5));
        no_events(
            &g,
            &kinds,
            since,
            &format!("{:?} into 5% loss", t.elapsed()),
        );
        let want = g.expected_stacks();
        for h in 1..=HOSTS {
            let missing = g.missing_stacks(h, &want);
            assert!(
                missing.is_empty(),
                "host {h} lost {missing:?} at {:?}",
                t.elapsed()
            );
        }
    }
    g.clear_underlay_loss().unwrap();
    no_events(&g, &kinds, since, "after 2 minutes of 5% loss");
    assert!(g.full_mesh_gap().is_none(), "{:?}", g.full_mesh_gap());
    assert_ring(&g, Duration::from_secs(5), "after the loss");
}

/// (l) `vrouter-discovery leave-mesh` on host 2: every other host withdraws s2 at once
/// (well under the failure-detection time), and the others stay a full mesh. A SIGTERM
/// restart of host 5's discovery, by contrast, withdraws nothing.
#[test]
fn explicit_leave_withdraws_at_once_and_a_restart_does_not() {
    require_root!();
    let mut g = five("gossip_leave");
    let since = now_ms();
    g.stop_discovery(5, libc::SIGTERM).unwrap();
    g.start_discovery(5).unwrap();
    g.wait_full_mesh(CONVERGE)
        .unwrap_or_else(|e| panic!("after a SIGTERM restart: {e:#}\n{}", g.summary()));
    std::thread::sleep(Duration::from_secs(1));
    no_events(
        &g,
        &WITHDRAWAL_KINDS,
        since,
        "SIGTERM restart of host 5's discovery",
    );

    let others = [1, 3, 4, 5];
    let t = Instant::now();
    g.leave_mesh(2).unwrap();
    let gone = wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        others.iter().all(|h| !g.routed_stacks(*h).contains("s2"))
    });
    let took = t.elapsed();
    assert!(
        gone,
        "s2 still routed 5 s after leave-mesh\n{}",
        g.summary()
    );
    eprintln!("gossip_leave: s2 withdrawn everywhere {took:?} after leave-mesh");
    assert!(
        took < Duration::from_millis(1500),
        "leave took {took:?}, as slow as failure detection"
    );
    // discovery.json is written at the end of the reconcile that wrote routes.json.
    let left = wait_until(Duration::from_secs(2), POLL, || {
        others
            .iter()
            .all(|h| g.member_state(*h, 2).as_deref() == Some("left"))
    });
    assert!(left, "host 2 not `left` everywhere\n{}", g.summary());
    g.mesh_hosts.retain(|h| *h != 2);
    g.excluded_stacks.push("s2".into());
    g.wait_full_mesh(Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the rest after the leave: {e:#}\n{}", g.summary()));
}

/// A random, incompressible 64-character stack name (letters and digits from the
/// kernel's random source).
fn random_stack_name() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_-";
    let mut bytes = [0u8; 64];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("random bytes");
    let mut name: String = bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    name.replace_range(0..1, "r");
    name
}

/// (k) One host announces 100 stacks with random 64-character names and 4 prefixes
/// each (beyond one datagram many times over): the other host routes every one of
/// them, and a stack that leaves is withdrawn there. Prints how long each took.
#[test]
fn a_hundred_long_named_stacks_reach_the_other_host() {
    require_root!();
    use vrouter_state::attach::{AttachSocket, RouterMessage};
    use vrouter_state::{StackName, StackSpec, Vni};
    let mut g = GossipMesh::start_one_stack_per_host("gossip_hundred", 2).expect("mesh starts");
    if let Err(e) = g.wait_full_mesh(CONVERGE) {
        panic!("{e:#}\n{}", g.summary());
    }
    let specs: Vec<StackSpec> = (0..100u32)
        .map(|k| {
            let net = |j: u32| {
                let n = k * 4 + j;
                format!("10.{}.{}.0/24", 100 + n / 256, n % 256)
            };
            let first: vrouter_state::Prefix = net(0).parse().unwrap();
            StackSpec {
                name: StackName::new(&random_stack_name()).unwrap(),
                vni: Vni::new(1000).unwrap(),
                prefixes: (0..4).map(|j| net(j).parse().unwrap()).collect(),
                router_ip: {
                    let o = first.addr().octets();
                    Ipv4Addr::new(o[0], o[1], o[2], 254)
                },
            }
        })
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // One connection per stack, as routers hold them; closing one starts its grace.
    let nets: Vec<String> = (0..specs.len()).map(|k| format!("k{k}")).collect();
    let t_ns = Instant::now();
    let namespaces: Vec<String> = specs
        .iter()
        .zip(&nets)
        .map(|(s, net)| router_ns(&mut g, 1, net, s))
        .collect();
    eprintln!("100 router namespaces made in {:?}", t_ns.elapsed());
    let conns: Vec<AttachSocket> = specs
        .iter()
        .zip(&namespaces)
        .map(|(s, ns)| register_from(&rt, &g, 1, ns, s))
        .collect();
    let t0 = Instant::now();
    let names: BTreeSet<String> = specs.iter().map(|s| s.name.to_string()).collect();
    let sees_all = |want: &BTreeSet<String>| {
        let routed = g.routed_stacks(2);
        want.iter().all(|n| routed.contains(n))
    };
    let ok = wait_until(Duration::from_secs(30), POLL, || sees_all(&names));
    assert!(
        ok,
        "host 2 routes {} of 100 stacks\n{}",
        names.intersection(&g.routed_stacks(2)).count(),
        g.summary()
    );
    eprintln!(
        "host 2 routes all 100 stacks {:?} after the last registration",
        t0.elapsed()
    );
    let ok = wait_until(Duration::from_secs(5), POLL, || {
        g.members(2)
            .iter()
            .map(|m| m.stacks.len())
            .collect::<Vec<_>>()
            == vec![101]
    });
    let held: Vec<Vec<String>> = g.members(2).into_iter().map(|m| m.stacks).collect();
    assert!(
        ok,
        "host 1 as host 2 holds it: {:?} stacks, s1 in: {:?}, refused on 1: {:?}",
        held.iter().map(|s| s.len()).collect::<Vec<_>>(),
        held.iter()
            .map(|s| s.contains(&"s1".to_string()))
            .collect::<Vec<_>>(),
        g.refused(1)
    );
    assert!(
        g.refused(1).is_empty(),
        "host 1 refused: {:?}",
        g.refused(1)
    );

    // Host 1's own stacks share VNI 1000, so each one added or removed changes about
    // 400 routes of the others there, one event each: let that settle first, so the
    // times below measure the change's way to host 2, not host 1's backlog.
    let settled = |g: &GossipMesh| {
        let mut last = usize::MAX;
        wait_until(Duration::from_secs(60), Duration::from_millis(1000), || {
            let n = g.events_since(1, 0).len();
            std::mem::replace(&mut last, n) == n
        })
    };
    assert!(settled(&g), "host 1 keeps writing events");

    // One stack leaves: withdrawn on host 2, the other 99 stay.
    let gone = specs[42].name.clone();
    let t1 = Instant::now();
    let reply = rt.block_on(async {
        use vrouter_state::attach::DiscoveryMessage;
        conns[42]
            .send(
                &RouterMessage::Leave {
                    stack: gone.clone(),
                },
                None,
            )
            .await
            .expect("leave");
        tokio::time::timeout(
            Duration::from_secs(60),
            conns[42].recv::<DiscoveryMessage>(),
        )
        .await
        .map(|r| r.ok().flatten().map(|(m, _)| m))
    });
    assert_eq!(
        reply,
        Ok(Some(vrouter_state::attach::DiscoveryMessage::Left)),
        "the leave of {gone}"
    );
    // Host 1's control loop (100 bridges to observe here) answers in its own time;
    // what is measured is the way to host 2 from then on.
    eprintln!("host 1 answered the leave in {:?}", t1.elapsed());
    let t1 = Instant::now();
    let rest: BTreeSet<String> = names
        .iter()
        .filter(|n| **n != gone.as_str())
        .cloned()
        .collect();
    let ok = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        !g.routed_stacks(2).contains(gone.as_str())
    });
    assert!(ok, "host 2 still routes {gone}\n{}", g.summary());
    eprintln!("one stack's removal reached host 2 in {:?}", t1.elapsed());
    let routed = g.routed_stacks(2);
    let missing: Vec<&String> = rest.iter().filter(|n| !routed.contains(*n)).collect();
    let recent: Vec<String> = g
        .events_since(2, now_ms() - 10_000)
        .into_iter()
        .filter(|e| !e.kind.as_str().starts_with("route_"))
        .map(|e| format!("{} {}", e.kind, e.message))
        .collect();
    assert!(
        missing.is_empty(),
        "the other 99 stacks stay routed on host 2; missing {} (routed {}): {recent:?}",
        missing.len(),
        routed.len()
    );
    assert!(settled(&g), "host 1 keeps writing events");
    // One more comes (the 100th again, under a new name): routed as fast.
    let mut extra = specs[42].clone();
    extra.name = StackName::new(&random_stack_name()).unwrap();
    // From the namespace stack 42 left (it holds the same router address).
    let ns42 = g.topo.host(1).container(&nets[42], "r").unwrap().ns.clone();
    let t2 = Instant::now();
    let _extra_conn = register_from(&rt, &g, 1, &ns42, &extra);
    eprintln!("host 1 answered the registration in {:?}", t2.elapsed());
    let t2 = Instant::now();
    let ok = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        g.routed_stacks(2).contains(extra.name.as_str())
    });
    assert!(ok, "host 2 does not route {}\n{}", extra.name, g.summary());
    eprintln!("one new stack reached host 2 in {:?}", t2.elapsed());
    drop(conns);
    let counters = ["rejected_malformed", "refused_full"];
    for c in counters {
        assert_eq!(g.counter(2, c), 0, "host 2 {c}");
    }
}

/// Registers `spec` on `host`'s discovery as a router would (without an overlay link),
/// from a router namespace of its own on a new network `net` (the first prefix, with the
/// router at `router_ip`, since discovery accepts a registration only from the namespace
/// holding that address on the stack's bridge), and returns the open connection:
/// closing it starts the stack's grace period.
fn register_bare(
    rt: &tokio::runtime::Runtime,
    g: &mut GossipMesh,
    host: usize,
    net: &str,
    spec: &vrouter_state::StackSpec,
) -> vrouter_state::attach::AttachSocket {
    let ns = router_ns(g, host, net, spec);
    register_from(rt, g, host, &ns, spec)
}

/// A router namespace for `spec` on `host`: network `net` on its first prefix, with the
/// router at its `router_ip`. Returns the namespace's name.
fn router_ns(
    g: &mut GossipMesh,
    host: usize,
    net: &str,
    spec: &vrouter_state::StackSpec,
) -> String {
    let h = g.topo.host_mut(host);
    h.add_network(net, &spec.prefixes[0].to_string(), Protection::Protected)
        .expect("network");
    h.add_container(net, "r", &spec.router_ip.to_string(), Role::Router)
        .expect("router namespace")
        .ns
}

/// Registers `spec` from namespace `ns` on `host` and returns the open connection.
fn register_from(
    rt: &tokio::runtime::Runtime,
    g: &GossipMesh,
    host: usize,
    ns: &str,
    spec: &vrouter_state::StackSpec,
) -> vrouter_state::attach::AttachSocket {
    use vrouter_state::attach::{DiscoveryMessage, Registration, RouterMessage};
    let path = g.state_dir(host).join(vrouter_state::ATTACH_SOCKET);
    let c = connect_from(ns, rt, &path).expect("connect");
    rt.block_on(async {
        let reg = RouterMessage::Register(Registration {
            spec: spec.clone(),
            needs_link: false,
            conntrack: true,
        });
        c.send(&reg, None).await.expect("register");
        // Host 1's control loop answers in its own time with 100 bridges to observe.
        let reply = tokio::time::timeout(Duration::from_secs(60), c.recv::<DiscoveryMessage>())
            .await
            .unwrap_or_else(|_| panic!("no answer to the registration of {}", spec.name))
            .expect("recv")
            .map(|(m, _)| m);
        assert_eq!(reply, Some(DiscoveryMessage::Registered), "{}", spec.name);
        c
    })
}

/// (l) A limit refuses the newest stack and freezes nothing: host 1 (cap 9 prefixes)
/// holds s1 (1 prefix) and registers stacks a, b, c of 4 prefixes each, in that order.
/// c is refused (event, status, /readyz 503 naming it) while a and b reach host 2; host
/// 2, whose cap (5) is below the 9 host 1 announces, refuses b and says so in its
/// status and an event. Once a leaves, c fits and is announced.
#[test]
fn a_prefix_cap_refuses_the_newest_stack_only() {
    require_root!();
    use vrouter_state::attach::RouterMessage;
    use vrouter_state::{StackName, StackSpec, Vni};
    let mut g = GossipMesh::start_one_stack_per_host("gossip_cap", 2).expect("mesh starts");
    for (h, cap) in [(1, "9"), (2, "5")] {
        g.stop_discovery(h, libc::SIGTERM).unwrap();
        g.set_discovery_env(h, "VROUTER_MAX_PREFIXES_PER_HOST", cap);
        g.start_discovery(h).unwrap();
    }
    if let Err(e) = g.wait_full_mesh(CONVERGE) {
        panic!("{e:#}\n{}", g.summary());
    }
    let spec = |name: &str, k: u32| StackSpec {
        name: StackName::new(name).unwrap(),
        vni: Vni::new(1000).unwrap(),
        prefixes: (0..4)
            .map(|j| format!("10.{}.{}.0/24", 100 + k, j).parse().unwrap())
            .collect(),
        router_ip: Ipv4Addr::new(10, 100 + k as u8, 0, 254),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let since = now_ms();
    let a = register_bare(&rt, &mut g, 1, "a", &spec("a", 1));
    std::thread::sleep(Duration::from_millis(20));
    let _b = register_bare(&rt, &mut g, 1, "b", &spec("b", 2));
    std::thread::sleep(Duration::from_millis(20));
    let _c = register_bare(&rt, &mut g, 1, "c", &spec("c", 3));

    let http = "127.0.0.1:9474";
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(10), POLL, || {
        let r = http_get(&g.topo.host(1).ns, http, "/readyz").unwrap();
        last = format!("{} {}", r.status, r.body);
        r.status == 503 && r.body.contains("stack c would bring")
    });
    assert!(ok, "host 1 /readyz: {last}");
    eprintln!("host 1 /readyz: {last}");
    let announced = |g: &GossipMesh| -> Vec<Vec<String>> {
        g.members(2)
            .into_iter()
            .map(|m| {
                let mut s = m.stacks;
                s.sort();
                s
            })
            .collect()
    };
    let ok = wait_until(Duration::from_secs(10), POLL, || {
        announced(&g) == vec![vec!["a".to_string(), "b".into(), "s1".into()]]
    });
    assert!(ok, "host 2 holds {:?} for host 1", announced(&g));
    let refused_here = |h: usize, stack: &str| {
        g.events_since(h, since).into_iter().find(|e| {
            e.kind == "conflict_refused"
                && e.reason == "prefix_cap"
                && e.stack.as_ref().is_some_and(|s| s.as_str() == stack)
        })
    };
    assert!(refused_here(1, "c").is_some(), "no event on host 1 for c");
    assert!(
        g.refused(1).iter().any(|r| r.starts_with("c ")),
        "{:?}",
        g.refused(1)
    );
    // Host 2's cap is below what host 1 announces: it says so.
    let ok = wait_until(Duration::from_secs(10), POLL, || {
        refused_here(2, "b").is_some()
    });
    assert!(ok, "no event on host 2 for b");
    let e = refused_here(2, "b").unwrap();
    assert!(
        e.message
            .contains("announces 9 prefixes, more than this host's cap of 5"),
        "{}",
        e.message
    );
    let status = http_get(&g.topo.host(2).ns, http, "/v1/status").unwrap();
    assert!(
        status.body.contains("announces 9 prefixes"),
        "{}",
        status.body
    );
    let routed = g.routed_stacks(2);
    assert!(
        routed.contains("a") && routed.contains("s1") && !routed.contains("b"),
        "{routed:?}"
    );

    // a leaves: c fits now, is announced, and host 1 is ready again.
    rt.block_on(async {
        a.send(
            &RouterMessage::Leave {
                stack: StackName::new("a").unwrap(),
            },
            None,
        )
        .await
        .unwrap()
    });
    let ok = wait_until(Duration::from_secs(10), POLL, || {
        announced(&g) == vec![vec!["b".to_string(), "c".into(), "s1".into()]]
    });
    assert!(ok, "host 2 holds {:?} for host 1", announced(&g));
    let ok = wait_until(Duration::from_secs(10), POLL, || {
        http_get(&g.topo.host(1).ns, http, "/readyz").is_ok_and(|r| r.status == 200)
    });
    assert!(ok, "host 1 not ready again");
}
