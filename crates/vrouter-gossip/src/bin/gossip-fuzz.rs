//! gossip-fuzz: fuzzes everything a gossip peer can send (vrouter_gossip::fuzz) for a
//! while and prints what it found as JSON. Exits 1 if anything crashed.
//!
//! ```text
//! cargo build --profile fuzz -p vrouter-gossip --bin gossip-fuzz
//! target/fuzz/gossip-fuzz [--seconds N] [--seed S] [--out FILE]
//! target/fuzz/gossip-fuzz --replay HEX     # one reported `node` crash input again
//! ```
//!
//! `make fuzz` runs it for 10 minutes. The `fuzz` profile is the release build with
//! `panic = "unwind"` (to catch panics) and overflow checks on (so an overflow on a
//! received value is a crash, not a silent wrap). With `--out FILE` the figures are
//! written in the schema of every `make bench` result (tests/src/bench.rs, shared by
//! path) for tests/bench-report.py, the report under `extra`.

#[allow(dead_code, clippy::wrong_self_convention)]
#[path = "../../../../tests/src/bench.rs"]
mod bench;

use bench::{write_results, Figure, Samples, Target};
use serde_json::json;

fn main() {
    let mut seconds = 10.0f64;
    let mut seed: u64 = vrouter_state::now_ms();
    let mut out: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next().unwrap_or_else(|| {
                eprintln!("gossip-fuzz: {name} needs a value");
                std::process::exit(2);
            })
        };
        match a.as_str() {
            "--seconds" => seconds = parse(&value("--seconds"), "--seconds"),
            "--seed" => seed = parse(&value("--seed"), "--seed"),
            "--out" => out = Some(value("--out")),
            "--replay" => {
                let input = value("--replay");
                match vrouter_gossip::fuzz::replay_node_input(&input) {
                    Ok(()) => {
                        eprintln!("gossip-fuzz: no crash");
                        std::process::exit(0);
                    }
                    Err(e) => {
                        eprintln!("gossip-fuzz: {e}");
                        std::process::exit(1);
                    }
                }
            }
            other => {
                eprintln!("gossip-fuzz: unknown argument {other:?}; use --seconds N, --seed S, --out FILE, --replay HEX");
                std::process::exit(2);
            }
        }
    }
    if cfg!(panic = "abort") {
        eprintln!("gossip-fuzz: built with panic = \"abort\", so a crash cannot be caught; build with --profile fuzz (make fuzz)");
        std::process::exit(2);
    }
    let r = vrouter_gossip::fuzz::run(seconds, u64::MAX, seed);
    let report = serde_json::to_value(&r).expect("json");
    let extra = json!({
        "report": report,
        "kinds": vrouter_gossip::fuzz::KINDS,
        "overflow_checks": vrouter_gossip::fuzz::overflow_checks(),
    });
    println!("{}", serde_json::to_string_pretty(&extra).expect("json"));
    for c in &r.crash_inputs {
        eprintln!(
            "CRASH in {}: {}\n  input (hex): {}",
            c.target, c.message, c.input_hex
        );
    }
    eprintln!(
        "gossip-fuzz: {} executions in {:.0} s ({:.0}/s), {} crashes, seed {}",
        r.executions,
        r.seconds,
        r.executions as f64 / r.seconds.max(1e-9),
        r.crashes,
        r.seed
    );
    if let Some(path) = out {
        let figures = vec![
            Figure::new(
                "fuzz.executions",
                "Inputs executed",
                "count",
                Samples(vec![r.executions as f64]),
            ),
            Figure::new(
                "fuzz.exec_per_s",
                "Inputs per second",
                "1/s",
                Samples(vec![r.executions as f64 / r.seconds.max(1e-9)]),
            ),
            Figure::new(
                "fuzz.crashes",
                "Crashes (panics caught)",
                "count",
                Samples(vec![r.crashes as f64]),
            )
            .with_target(Target::AtMost(0.0)),
        ];
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        if let Err(e) = write_results(
            std::path::Path::new(&path),
            "gossip-fuzz",
            &command,
            &figures,
            extra,
        ) {
            eprintln!("gossip-fuzz: cannot write {path}: {e:#}");
            std::process::exit(1);
        }
    }
    if r.crashes > 0 {
        std::process::exit(1);
    }
}

fn parse<T: std::str::FromStr>(v: &str, name: &str) -> T {
    v.parse().unwrap_or_else(|_| {
        eprintln!("gossip-fuzz: {name} {v:?} is not a number");
        std::process::exit(2);
    })
}
