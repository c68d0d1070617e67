//! `make soak`: churn on simulated gossip hosts for `--seconds N` (default 3600) with
//! traffic checked between every pair of live stacks and the daemons' and kernel's
//! footprint sampled every 10 s. Logic and documentation: tests/src/soak.rs.
//!
//! ```sh
//! vrt-soak --seconds 3600 --seed 1 --out target/bench/soak.json \
//!          --series target/bench/soak-series.json [--hosts 5] [--no-encryption] [--no-acl]
//! ```
//!
//! Ctrl-C or SIGTERM ends the churn early; the results collected so far are written.
//! Exits 1 when the verdict fails (unexplained failed checks, a leak).

use std::path::PathBuf;

use vrouter_tests::interrupt::main_as_root;
use vrouter_tests::soak::{run, Options};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let flag = |name: &str| args.iter().any(|a| a == name);
    let seed = value("--seed")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1)
        });
    let opt = Options {
        seconds: value("--seconds")
            .and_then(|s| s.parse().ok())
            .unwrap_or(3600.0),
        seed,
        hosts: value("--hosts").and_then(|s| s.parse().ok()).unwrap_or(5),
        encryption: !flag("--no-encryption"),
        acl: !flag("--no-acl"),
        out: value("--out").map(PathBuf::from),
        series: value("--series").map(PathBuf::from),
        command: {
            let mut a = args.clone();
            a[0] = "target/release/vrt-soak".into();
            if !a.iter().any(|x| x == "--seed") {
                a.push("--seed".into());
                a.push(seed.to_string());
            }
            a.join(" ")
        },
    };
    main_as_root("vrt-soak", || run(&opt));
}
