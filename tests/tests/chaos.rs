//! Crash at any point (issue 18), CI version: on the chaos mesh of tests/src/chaos.rs
//! (3 hosts, gossip, userspace WireGuard `require`, port steering, an access policy),
//! a few random SIGKILLs of discovery and of routers while stacks come and go, and a
//! crash at every crash point once. After each: every state file parses, temp files
//! do not pile up, traffic flows between every live pair, and the kernel equals the
//! independent oracle (tests/src/oracle.rs): nothing missing, nothing left over.

use std::time::Instant;
use vrouter_tests::chaos::*;
use vrouter_tests::*;

/// Random kills of each daemon (`VROUTER_CHAOS_KILLS` overrides, for a quicker look).
fn kills() -> usize {
    std::env::var("VROUTER_CHAOS_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
}

fn seed() -> u64 {
    std::env::var("VROUTER_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

#[test]
fn kills_and_crash_points_leave_nothing_behind() {
    require_root!();
    let seed = seed();
    eprintln!("chaos seed {seed} (VROUTER_CHAOS_SEED to repeat)");
    let started = Instant::now();
    let mut c = Chaos::start("chaos", seed).unwrap_or_else(|e| panic!("{e:#}"));
    for i in 0..kills() {
        let o = c
            .discovery_kill_round()
            .unwrap_or_else(|e| panic!("discovery kill {i} (seed {seed}): {e:#}"));
        eprintln!("discovery kill {i}: converged in {:?}", o.converge);
    }
    for i in 0..kills() {
        let o = c
            .router_kill_round()
            .unwrap_or_else(|e| panic!("router kill {i} (seed {seed}): {e:#}"));
        eprintln!("router kill {i}: converged in {:?}", o.converge);
    }
    // VROUTER_CHAOS_ONLY=<part>[,<part>]: only the points whose names contain one.
    let only = std::env::var("VROUTER_CHAOS_ONLY").ok();
    let runs = c
        .every_point(only.as_deref())
        .unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
    for r in &runs {
        eprintln!(
            "{}: fired {}, converged in {:?}",
            r.point, r.fired, r.outcome.converge
        );
    }
    let missed: Vec<&str> = runs
        .iter()
        .filter(|r| !r.fired)
        .map(|r| r.point.as_str())
        .collect();
    assert!(missed.is_empty(), "crash points never reached: {missed:?}");
    eprintln!("chaos done in {:?}", started.elapsed());
}
