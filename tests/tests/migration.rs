//! A stack that moves between hosts is a migration, not a hijack (issue 18,
//! "Migration"; docs/ARCHITECTURE.md "Placement generations"). Three simulated hosts
//! with gossip, real discovery and router processes; stack `mv` starts on host 1 and
//! moves to host 2, host 3's stack `s3` sends the traffic (tests/src/migration.rs).
//! Every wait is bounded; measured times are printed (`--nocapture`).

use std::time::Duration;

use vrouter_tests::gossip::now_ms;
use vrouter_tests::migration::*;
use vrouter_tests::*;

/// Events of `kind` on `host` since `since`.
fn events(g: &gossip::GossipMesh, host: usize, kind: &str, since: u64) -> Vec<String> {
    g.events_since(host, since)
        .into_iter()
        .filter(|e| e.kind.as_str() == kind)
        .map(|e| e.message)
        .collect()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default()
}

/// The 1-minute load average is above the number of CPUs.
fn overloaded() -> bool {
    let load: f64 = loadavg()
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    load > cpus as f64
}

/// Compose down on host 1, up on host 2: host 3's traffic reaches the new copy within
/// 1 s of its router's start, while the old copy is still in its grace period (it
/// kept winning until its grace ran out before placement generations).
#[test]
fn graceful_move_reaches_the_new_host_within_a_second() {
    require_root!();
    let mut g = mesh("mig_graceful").expect("mesh");
    let since = now_ms();
    let (took, in_grace) = graceful_move(&mut g).expect("graceful move");
    eprintln!("MEASURED: graceful move: first answer from host {THIRD} {took:?} after the new router's start (old copy in grace: {in_grace})");
    assert!(in_grace, "the old copy had left its grace period already");
    // The target is 1 s. A machine loaded past its CPU count (debug builds, other
    // tests beside this one) gets 2 s, still below the 3 s grace period the move
    // waited for before placement generations.
    let bound = if overloaded() {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(1)
    };
    eprintln!("bound {bound:?} (load average {})", loadavg());
    assert!(
        took <= bound,
        "graceful move took {took:?} (> {bound:?})\n{}",
        g.summary()
    );
    let new_ip = g.topo.host(NEW).underlay_ip;
    assert_eq!(route_host(&g, THIRD, MOVED), Some(new_ip));
    // Every host reports the move once, with the generations.
    let moved = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        [OLD, NEW, THIRD]
            .iter()
            .all(|h| !events(&g, *h, "stack_moved", since).is_empty())
    });
    assert!(moved, "stack_moved missing somewhere\n{}", g.summary());
    let ev = events(&g, THIRD, "stack_moved", since);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(
        ev[0].contains(&format!("to host {new_ip}")) && ev[0].contains("(placement 1 -> 2)"),
        "{}",
        ev[0]
    );
    // The old copy was in grace (its router stopped): it is not told it lost.
    assert!(events(&g, OLD, "stack_superseded", since).is_empty());
}

/// Host 1 is cut off with the stack still running there and the stack is started on
/// host 2: traffic follows within failure detection + 2 s (the new placement does not
/// even wait for the failure detection).
#[test]
fn crash_move_follows_within_detection() {
    require_root!();
    let mut g = mesh("mig_crash").expect("mesh");
    let (from_cut, from_start) = crash_move(&mut g).expect("crash move");
    eprintln!("MEASURED: crash move: first answer from host {THIRD} {from_cut:?} after the cut, {from_start:?} after the new router's start");
    // The bound: failure detection (its target, 3 s: docs/benchmarks.md
    // `gossip.real.failure_detection_ms`) + 2 s, from the cut; the stack starts at it.
    assert!(
        from_cut <= Duration::from_secs(5),
        "crash move took {from_cut:?} after the cut (> 3 s + 2 s)\n{}",
        g.summary()
    );
    assert_eq!(
        route_host(&g, THIRD, MOVED),
        Some(g.topo.host(NEW).underlay_ip)
    );
}

/// After a crash move the old host comes back with its stale copy running: the newer
/// placement stays, the old host withdraws its copy with `stack_superseded`, and
/// traffic never goes back to it (probed continuously through the heal, with a
/// counter in the old copy's service).
#[test]
fn stale_copy_returning_is_withdrawn_and_traffic_never_flips_back() {
    require_root!();
    let mut g = mesh("mig_stale").expect("mesh");
    crash_move(&mut g).expect("crash move");
    let old = EchoCounter::install(&g.svc_on(MOVED, OLD).ns).expect("counter");
    let since = now_ms();
    let w = watch(&g, &old, Duration::from_secs(12), || g.heal()).expect("watch");
    eprintln!("MEASURED: stale return: {} probes from host {THIRD} over 12 s of heal, {} lost, {} flips, {} echo requests at the old copy", w.probes, w.lost, w.flips, w.old_copy_echoes);
    // The old host saw the newer placement and withdrew its copy.
    let withdrawn = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        !events(&g, OLD, "stack_superseded", since).is_empty()
            && g.peers(THIRD)
                .iter()
                .filter(|p| p.addr == g.topo.host(OLD).underlay_ip.to_string())
                .all(|p| !p.stacks.iter().any(|s| s == MOVED))
    });
    assert!(
        withdrawn,
        "host {OLD} did not withdraw its stale copy\n{}",
        g.summary()
    );
    let sup = events(&g, OLD, "stack_superseded", since);
    assert_eq!(sup.len(), 1, "{sup:?}");
    assert!(
        sup[0].contains(&g.topo.host(NEW).underlay_ip.to_string())
            && sup[0].contains("generation 2 against this copy's 1")
            && sup[0].contains("docker compose down"),
        "{}",
        sup[0]
    );
    let refused = g.discovery_file(OLD).map(|d| d.refused).unwrap_or_default();
    assert!(
        refused
            .iter()
            .any(|r| r.stack.as_str() == MOVED && r.code == "superseded"),
        "{refused:?}"
    );
    assert_eq!(
        w.flips, 0,
        "traffic or routes went back to the old copy: {w:?}"
    );
    assert_eq!(w.old_copy_echoes, 0, "{w:?}");
    assert!(w.lost <= 2, "traffic to the new copy interrupted: {w:?}");
    // And the stale copy's router gets no routes.
    assert!(g
        .routes(OLD)
        .unwrap()
        .stacks
        .get(&vrouter_state::StackName::new(MOVED).unwrap())
        .is_none_or(|s| s.routes.is_empty()));
}

/// The same stack started on two hosts by mistake: the later copy wins, the other is
/// told once, and router restarts on either host (kill -9 and start, within the grace
/// period: 10 s here, so a slow start on a loaded machine stays within it) never make
/// traffic flip.
#[test]
fn duplicate_copy_stays_put_across_router_restarts() {
    require_root!();
    let mut g = mesh_with("mig_duplicate", &[("VROUTER_GRACE_MS", "10000")]).expect("mesh");
    let since = now_ms();
    g.move_stack(MOVED, NEW).unwrap();
    g.start_router(MOVED).unwrap();
    let new_ip = g.topo.host(NEW).underlay_ip;
    let settled = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        route_host(&g, THIRD, MOVED) == Some(new_ip)
            && !events(&g, OLD, "stack_superseded", since).is_empty()
    });
    assert!(settled, "the second copy did not win\n{}", g.summary());
    assert!(wait_reply(&g, FROM, MOVED, Duration::from_secs(10)).is_some());
    let old = EchoCounter::install(&g.svc_on(MOVED, OLD).ns).expect("counter");
    let mut total = Watched::default();
    let old_router = old_router();
    for round in 0..2 {
        for (name, host) in [(old_router.as_str(), OLD), (MOVED, NEW)] {
            // Down for 2 s (within the 3 s grace), then up again.
            g.stop_router(name, libc::SIGKILL).unwrap();
            let w = watch(&g, &old, Duration::from_secs(2), || Ok(())).unwrap();
            g.start_router_on(MOVED, host).unwrap();
            let w2 = watch(&g, &old, Duration::from_secs(4), || Ok(())).unwrap();
            eprintln!("round {round}: restart of {name} on host {host}: {w:?} then {w2:?}");
            for x in [w, w2] {
                total.probes += x.probes;
                total.lost += x.lost;
                total.flips += x.flips;
                total.old_copy_echoes += x.old_copy_echoes;
            }
        }
    }
    eprintln!("MEASURED: duplicate copies, 4 router restarts: {total:?}");
    assert_eq!(total.flips, 0, "{total:?}\n{}", g.summary());
    assert_eq!(total.old_copy_echoes, 0, "{total:?}");
    assert_eq!(route_host(&g, THIRD, MOVED), Some(new_ip));
    let sup = events(&g, OLD, "stack_superseded", since);
    assert_eq!(sup.len(), 1, "told once: {sup:?}");
}
