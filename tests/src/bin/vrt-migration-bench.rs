//! `make bench-migration` (issue 18, "Migration"): how quickly traffic follows a stack
//! that moves between hosts, on real daemons and simulated hosts with gossip.
//!
//! Three hosts in one gossip mesh, stack `sN` on host N and stack `mv` on host 1
//! (`vrouter_tests::migration`). Each round, on a fresh mesh each time:
//! 1. graceful move: `docker compose down` of `mv` on host 1 (its router stops, the old
//!    copy enters its 3 s grace period, its containers go), its router started on host
//!    2: the time from that start to the first ping answered from host 3's stack
//!    (`migration_graceful_s`, target 1 s; 150 ms pings every 10 ms);
//! 2. crash move: host 1 cut off from the others (mv still running there), mv started
//!    on host 2: the time from the new router's start to the first answer from host 3
//!    (`migration_crash_s`, target: failure detection + 2 s), and from the cut;
//! 3. stale return: host 1 healed with its stale copy running, 10 s of pings from host
//!    3 every 30 ms: the samples where traffic reached the old copy (an nftables
//!    counter in its service) or host 3 routed to it (`migration_flips`, target 0).
//!
//! Writes `target/bench/migration.json` (see `vrouter_tests::bench`) and prints the
//! figures. Usage: `vrt-migration-bench [--out PATH] [--rounds N]` (needs root; set
//! `VROUTER_TEST_PREFIX` when other tests run beside it).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use vrouter_tests::bench::{write_results, Figure, Samples, Target};
use vrouter_tests::interrupt::{self, check_stop};
use vrouter_tests::migration::{crash_move, graceful_move, mesh, watch, EchoCounter, MOVED, OLD};

/// The failure detection target of the default gossip settings (docs/benchmarks.md,
/// `gossip.real.failure_detection_ms`, at most 3 s): the crash target adds 2 s.
const DETECTION_S: f64 = 3.0;
const STALE_WATCH: Duration = Duration::from_secs(10);

struct Args {
    out: PathBuf,
    rounds: usize,
}

fn usage() -> ! {
    eprintln!("usage: vrt-migration-bench [--out PATH] [--rounds N]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        out: PathBuf::from("target/bench/migration.json"),
        rounds: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--out" => a.out = PathBuf::from(val()),
            "--rounds" => a.rounds = val().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    a
}

fn main() {
    let args = parse_args();
    interrupt::main_as_root("vrt-migration-bench", || run(&args));
}

fn run(args: &Args) -> Result<()> {
    let mut graceful = Samples::default();
    let mut crash = Samples::default();
    let mut crash_cut = Samples::default();
    let mut flips = Samples::default();
    let mut lost = Samples::default();
    let mut in_grace = Vec::new();
    for round in 0..args.rounds {
        check_stop()?;
        {
            let mut g = mesh(&format!("migbench_g{round}"))?;
            let (took, grace) = graceful_move(&mut g)?;
            graceful.push(took.as_secs_f64());
            in_grace.push(grace);
            println!(
                "round {round}: graceful move {:.3} s (old copy in grace: {grace})",
                took.as_secs_f64()
            );
        }
        check_stop()?;
        {
            let mut g = mesh(&format!("migbench_c{round}"))?;
            let (from_cut, from_start) = crash_move(&mut g)?;
            crash.push(from_start.as_secs_f64());
            crash_cut.push(from_cut.as_secs_f64());
            let old = EchoCounter::install(&g.svc_on(MOVED, OLD).ns)?;
            let w = watch(&g, &old, STALE_WATCH, || g.heal())?;
            flips.push(w.flips as f64);
            lost.push(w.lost as f64);
            println!(
                "round {round}: crash move {:.3} s after the start ({:.3} s after the cut); stale return: {} probes, {} lost, {} flips, {} echo requests at the old copy",
                from_start.as_secs_f64(),
                from_cut.as_secs_f64(),
                w.probes,
                w.lost,
                w.flips,
                w.old_copy_echoes
            );
        }
    }
    let figures = vec![
        Figure::new(
            "migration_graceful_s",
            "graceful move: new router's start to traffic from a third host",
            "s",
            graceful,
        )
        .with_target(Target::AtMost(1.0)),
        Figure::new(
            "migration_crash_s",
            "crash move (old host cut off): new router's start to traffic from a third host",
            "s",
            crash,
        )
        .with_target(Target::AtMost(DETECTION_S + 2.0)),
        Figure::new(
            "migration_crash_from_cut_s",
            "crash move: old host cut off to traffic from a third host (stack started at the cut)",
            "s",
            crash_cut,
        ),
        Figure::new(
            "migration_flips",
            "stale copy returning: samples with traffic or a route to the old copy (10 s of heal)",
            "count",
            flips,
        )
        .with_target(Target::AtMost(0.0)),
        Figure::new(
            "migration_stale_lost",
            "stale copy returning: pings from the third host lost during the heal",
            "count",
            lost,
        ),
    ];
    for f in &figures {
        let verdict = f
            .target
            .map(|t| t.verdict(f.samples.median(), &f.unit))
            .unwrap_or_default();
        println!(
            "{:<28} median {:>8.3} {:<6} (min {:.3}, max {:.3}) {verdict}",
            f.key,
            f.samples.median(),
            f.unit,
            f.samples.min(),
            f.samples.max()
        );
    }
    let command = format!(
        "target/release/vrt-migration-bench --out {} --rounds {}",
        args.out.display(),
        args.rounds
    );
    let extra = json!({
        "rounds": args.rounds,
        "old_copy_in_grace_at_first_answer": in_grace,
        "grace_ms": 3000,
        "probe_timeout_ms": vrouter_tests::migration::PROBE.as_millis() as u64,
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    });
    write_results(&args.out, "migration", &command, &figures, extra)?;
    println!("wrote {}", args.out.display());
    Ok(())
}
