//! `make chaos` (issue 18): crash at any point, the full run. On the chaos mesh of
//! `vrouter_tests::chaos` (3 simulated hosts, gossip, userspace WireGuard `require`,
//! port steering, an access policy): N random SIGKILLs of discovery during
//! registrations, publishes and withdrawals, N random SIGKILLs of routers, then a crash
//! at every crash point once. After each: every state file parses, temp files do not
//! pile up, traffic flows between every live pair, and the kernel equals the
//! independent oracle. The run stops at the first failure (exit 1, with the diff).
//!
//! Writes `target/bench/chaos.json` (see `vrouter_tests::bench`): kills survived,
//! convergence time after a discovery kill, after a router kill and after a crash
//! point, leftovers found (target 0), temp files seen after convergence.
//! Usage: `vrt-chaos [--discovery-kills N] [--router-kills N] [--seed S] [--out PATH]`
//! (needs root; set `VROUTER_TEST_PREFIX` when other tests run beside it).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;
use vrouter_tests::bench::{write_results, Figure, Samples, Target};
use vrouter_tests::chaos::{Chaos, DISCOVERY_POINTS, ROUTER_POINTS, UNREACHED};
use vrouter_tests::interrupt::{self, check_stop};

struct Args {
    out: PathBuf,
    discovery_kills: usize,
    router_kills: usize,
    seed: u64,
}

fn usage() -> ! {
    eprintln!("usage: vrt-chaos [--discovery-kills N] [--router-kills N] [--seed S] [--out PATH]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        out: PathBuf::from("target/bench/chaos.json"),
        discovery_kills: 100,
        router_kills: 100,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| {
            it.next().unwrap_or_else(|| {
                eprintln!("{name} needs a value");
                usage()
            })
        };
        match arg.as_str() {
            "--out" => a.out = PathBuf::from(val("--out")),
            "--discovery-kills" => {
                a.discovery_kills = val("--discovery-kills").parse().unwrap_or_else(|_| usage())
            }
            "--router-kills" => {
                a.router_kills = val("--router-kills").parse().unwrap_or_else(|_| usage())
            }
            "--seed" => a.seed = val("--seed").parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    a
}

fn main() {
    let args = parse_args();
    interrupt::main_as_root("vrt-chaos", || run(&args));
}

fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    eprintln!("vrt-chaos: seed {}", args.seed);
    let mut c = Chaos::start("chaos_full", args.seed)?;
    let mut disc = Samples::default();
    let mut rtr = Samples::default();
    let mut points = Samples::default();
    let mut temps = Samples::default();
    for i in 0..args.discovery_kills {
        check_stop()?;
        let o = c.discovery_kill_round().with_context(|| {
            format!(
                "discovery kill {} of {} (seed {})",
                i + 1,
                args.discovery_kills,
                args.seed
            )
        })?;
        eprintln!(
            "discovery kill {}: converged in {:.2} s",
            i + 1,
            secs(o.converge)
        );
        disc.push(secs(o.converge));
        temps.push(o.temps as f64);
    }
    for i in 0..args.router_kills {
        check_stop()?;
        let o = c.router_kill_round().with_context(|| {
            format!(
                "router kill {} of {} (seed {})",
                i + 1,
                args.router_kills,
                args.seed
            )
        })?;
        eprintln!(
            "router kill {}: converged in {:.2} s",
            i + 1,
            secs(o.converge)
        );
        rtr.push(secs(o.converge));
        temps.push(o.temps as f64);
    }
    check_stop()?;
    let runs = c.every_point(None).context("crash points")?;
    let mut fired = Vec::new();
    let mut missed = Vec::new();
    for r in &runs {
        eprintln!(
            "{}: fired {}, converged in {:.2} s",
            r.point,
            r.fired,
            secs(r.outcome.converge)
        );
        points.push(secs(r.outcome.converge));
        temps.push(r.outcome.temps as f64);
        if r.fired {
            fired.push(r.point.clone());
        } else {
            missed.push(r.point.clone());
        }
    }
    let survived = (args.discovery_kills + args.router_kills + runs.len()) as f64;
    let figures = vec![
        Figure::new(
            "chaos.kills_survived",
            "crashes survived (discovery and router kills, crash points), each converged with nothing left over",
            "count",
            Samples(vec![survived]),
        ),
        Figure::new(
            "chaos.discovery_kill.converge",
            "kernel equal to the oracle and traffic back after a discovery kill -9",
            "s",
            disc,
        ),
        Figure::new(
            "chaos.router_kill.converge",
            "kernel equal to the oracle and traffic back after a router kill -9",
            "s",
            rtr,
        ),
        Figure::new(
            "chaos.crash_point.converge",
            "kernel equal to the oracle and traffic back after a crash point",
            "s",
            points,
        ),
        Figure::new(
            "chaos.leftovers",
            "leftover or missing kernel objects, torn state files after convergence",
            "count",
            Samples(vec![0.0]),
        )
        .with_target(Target::AtMost(0.0)),
        Figure::new(
            "chaos.temp_files",
            "temp files in the state directories after convergence (at most one per file)",
            "count",
            temps,
        ),
    ];
    let command = format!(
        "vrt-chaos --discovery-kills {} --router-kills {} --seed {} --out {}",
        args.discovery_kills,
        args.router_kills,
        args.seed,
        args.out.display()
    );
    write_results(
        &args.out,
        "chaos",
        &command,
        &figures,
        json!({
            "seed": args.seed,
            "discovery_kills": args.discovery_kills,
            "router_kills": args.router_kills,
            "points_fired": fired,
            "points_not_reached": missed,
            "points_unreachable_here": UNREACHED.iter().map(|(p, why)| json!({"point": p, "why": why})).collect::<Vec<_>>(),
            "points_listed": DISCOVERY_POINTS.len() + ROUTER_POINTS.len(),
            "duration_s": started.elapsed().as_secs(),
        }),
    )?;
    for f in &figures {
        println!(
            "{:32} median {:8.2} max {:8.2} {}",
            f.key,
            f.samples.median(),
            f.samples.max(),
            f.unit
        );
    }
    println!("wrote {}", args.out.display());
    if !missed.is_empty() {
        anyhow::bail!("crash points never reached: {missed:?}");
    }
    Ok(())
}
