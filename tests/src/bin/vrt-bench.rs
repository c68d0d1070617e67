//! `make bench`, datapath part: TCP throughput and latency over eight paths built in
//! one run on four simulated hosts (see `vrouter_tests::datapath` for the topology and
//! what the baselines share with the overlay):
//!
//! - `overlay`: service to service across hosts through docker-vrouter with port
//!   steering (the default): straight into the tunnel, router, service;
//! - `overlay_rule`: the same with policy-rule steering (`VROUTER_STEERING=rule`:
//!   host, router, VXLAN, router, bridge), so the gain is measured;
//! - `flannel`: the same kind of services over a Flannel-style VXLAN device in the host
//!   namespaces, no router;
//! - `routed`: the same kind of services routed host to host without VXLAN;
//! - `underlay`: host namespace to host namespace over the underlay;
//! - `same_host`: two stacks on one host, port steering;
//! - `bridged`: two networks on one host, routed by the host, no firewall;
//! - `overlay_fw`: the overlay again with the Docker-like firewall loaded.
//!
//! Per path and round: single-stream and 4-stream TCP (iperf3, Mbit/s received), ping
//! RTT (average of 20, ms) and TCP request/response round trip (median of 2,000 1-byte
//! exchanges, µs). Rounds are interleaved (round 1 measures every path, then round 2,
//! ...; the path order rotates each round) and each figure is the median over rounds.
//! Ratios are taken per round (overlay in round i / Flannel in round i) and their median
//! reported; the targets: overlay / Flannel-style throughput at least 1.0 (1 and
//! 4 streams), its ping and tcp_rr RTT at most 1.1. Writes `target/bench/datapath.json`
//! (see `vrouter_tests::bench`) and prints a table.
//!
//! Usage: `vrt-bench [--out PATH] [--rounds N] [--secs S] [--quick] [--hold]` (needs
//! root; set `VROUTER_TEST_PREFIX` when other tests run beside it). `--hold` builds the
//! topology, prints the paths and waits for Ctrl-C instead of measuring (for profiling
//! by hand); the namespaces go when it ends.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde_json::json;
use vrouter_tests::bench::{write_results, Figure, Samples, Target};
use vrouter_tests::datapath::{
    measure_round, print_ratios, Condition, Datapath, PathDef, PathSamples, RoundSpec,
};
use vrouter_tests::interrupt::{self, check_stop};

/// Pings per RTT sample, 50 ms apart.
const PINGS: u32 = 20;
/// 1-byte exchanges per TCP request/response sample.
const RR_ITERATIONS: u32 = 2000;
/// Target of overlay / Flannel-style throughput (issue 15).
const FLANNEL_TARGET: f64 = 1.0;
/// Target of overlay / Flannel-style RTT, ping and tcp_rr (issue 15).
const RTT_TARGET: f64 = 1.1;

struct Args {
    out: PathBuf,
    rounds: usize,
    secs: u32,
    hold: bool,
}

fn usage() -> ! {
    eprintln!("usage: vrt-bench [--out PATH] [--rounds N (1..=50)] [--secs S (1..=60)] [--quick] [--hold]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        out: PathBuf::from("target/bench/datapath.json"),
        rounds: 7,
        secs: 5,
        hold: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |what: &str| {
            it.next().unwrap_or_else(|| {
                eprintln!("vrt-bench: {what} needs a value");
                usage()
            })
        };
        match arg.as_str() {
            "--out" => a.out = PathBuf::from(val("--out")),
            "--rounds" => {
                a.rounds = val("--rounds").parse().unwrap_or_else(|_| usage());
            }
            "--secs" => a.secs = val("--secs").parse().unwrap_or_else(|_| usage()),
            "--quick" => {
                a.rounds = 1;
                a.secs = 2;
            }
            "--hold" => a.hold = true,
            "-h" | "--help" => usage(),
            other => {
                eprintln!("vrt-bench: unknown argument {other}");
                usage()
            }
        }
    }
    if !(1..=50).contains(&a.rounds) || !(1..=60).contains(&a.secs) {
        usage()
    }
    a
}

fn main() {
    let args = parse_args();
    interrupt::main_as_root("vrt-bench", || run(&args));
}

fn run(args: &Args) -> Result<()> {
    let command = std::iter::once("vrt-bench".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let t = Instant::now();
    let mut dp = Datapath::build("bench-datapath")?;
    eprintln!(
        "vrt-bench: topology up in {:.1?} (vxlan MTU {}, TCP MSS {}); {} rounds of {} s runs",
        t.elapsed(),
        dp.vxlan_mtu,
        dp.mss,
        args.rounds,
        args.secs
    );

    let paths = dp.paths.clone();
    if args.hold {
        for p in &paths {
            eprintln!(
                "  {:<16} {} ({}) -> {} ({}){}",
                p.name,
                p.from_ns,
                p.from_ip,
                p.to_ns,
                p.to_ip,
                match p.condition {
                    Condition::Plain => String::new(),
                    c => format!(" [{}]", c.name()),
                }
            );
        }
        eprintln!("vrt-bench: holding the topology; Ctrl-C or SIGTERM ends it");
        while !interrupt::stopped() {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        return Ok(());
    }
    let mut samples: BTreeMap<&'static str, PathSamples> = BTreeMap::new();
    let mut order_log = Vec::new();
    let mut port: u16 = 5200;
    for round in 0..args.rounds {
        eprintln!("round {}/{}", round + 1, args.rounds);
        let mut measured = Vec::new();
        // Per condition, its paths in an order rotated each round; the hosts go back to
        // the plain condition afterwards, and on any error.
        for c in Condition::ALL {
            let mut order: Vec<&PathDef> = paths.iter().filter(|p| p.condition == c).collect();
            if order.is_empty() {
                continue;
            }
            let n = order.len();
            order.rotate_left(round % n);
            dp.set_condition(c)?;
            for p in &order {
                let r = measure_round(
                    dp.log_dir(),
                    p,
                    RoundSpec {
                        secs: args.secs,
                        mss: dp.mss,
                        pings: PINGS,
                        rr_iterations: RR_ITERATIONS,
                    },
                    &mut port,
                    samples.entry(p.name).or_default(),
                    &check_stop,
                );
                if r.is_err() {
                    let _ = dp.set_condition(Condition::Plain);
                }
                r?;
                measured.push(p.name);
            }
        }
        dp.set_condition(Condition::Plain)?;
        order_log.push(measured);
    }
    let flannel_fw = dp.flannel_under_firewall()?;

    // After the runs: the sender's route then shows whether the host's ICMP redirect
    // took effect.
    let topology = dp.describe();
    let figures = figures(&paths, &samples);
    print_table(args, &dp, &figures);
    let extra = json!({
        "topology": topology,
        "rounds": args.rounds,
        "secs_per_iperf_run": args.secs,
        "pings_per_sample": PINGS,
        "tcp_rr_iterations": RR_ITERATIONS,
        "round_order": order_log,
        "flannel_under_firewall_answers_ping": flannel_fw,
        "tcp_rr_mean_us": paths.iter().map(|p| (p.name, samples.get(p.name).and_then(|s| s.get("tcp_rr_mean")).map(|s| s.to_json()))).collect::<BTreeMap<_, _>>(),
        "method": "iperf3 -c <to_ip> -t <secs> -P <1|4> -M <mss> -J from the sender namespace against iperf3 -s -1 in the receiver namespace, end.sum_received.bits_per_second; ping -c 20 -i 0.05 average; vrt-probe tcp-rr median of 2000 1-byte exchanges (TCP_NODELAY both ends) after 50 warm-up; rounds interleaved, path order rotated per round; ratios per round, median reported",
    });
    write_results(&args.out, "datapath", &command, &figures, extra)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

fn figures(paths: &[PathDef], samples: &BTreeMap<&'static str, PathSamples>) -> Vec<Figure> {
    let get = |p: &str, k: &str| {
        samples
            .get(p)
            .and_then(|s| s.get(k))
            .cloned()
            .unwrap_or_default()
    };
    let mut figs = Vec::new();
    for p in paths {
        for (k, what, unit) in [
            ("tcp1", "single-stream TCP", "Mbit/s"),
            ("tcp4", "4-stream TCP", "Mbit/s"),
            ("ping", "ping RTT", "ms"),
            ("tcp_rr", "TCP request/response RTT", "us"),
        ] {
            figs.push(Figure::new(
                &format!("datapath.{}.{k}", p.name),
                &format!("{what}, {}", p.label),
                unit,
                get(p.name, k),
            ));
        }
    }
    let ratio = |a: &str, b: &str, k: &str| {
        let (x, y) = (get(a, k), get(b, k));
        Samples(x.0.iter().zip(&y.0).map(|(x, y)| x / y).collect())
    };
    for r in ratio_defs(paths) {
        let f = Figure::new(
            &format!("datapath.ratio.{}_{}.{}", r.of, r.to, r.metric),
            &format!("{}, {} / {} (per round)", r.what, r.of, r.to),
            "ratio",
            ratio(r.of, r.to, r.metric),
        );
        figs.push(match r.target {
            Some(t) => f.with_target(t),
            None => f,
        });
    }
    figs
}

/// One ratio figure: `of` / `to` on `metric`, per round.
#[derive(Debug, Clone, PartialEq)]
struct RatioDef {
    of: &'static str,
    to: &'static str,
    metric: &'static str,
    what: &'static str,
    target: Option<Target>,
}

/// The ratios reported, for the paths that exist: throughput (1 and 4 streams) of the
/// overlay against the Flannel-style path (the target), the policy-rule path
/// against both (the gain of port steering), the other baselines; RTT (ping, tcp_rr)
/// of the overlay against the Flannel-style path (the target) and of the
/// same-host stacks against the host's bridge to bridge routing.
fn ratio_defs(paths: &[PathDef]) -> Vec<RatioDef> {
    let throughput: Vec<(&'static str, &'static str, Option<Target>)> = vec![
        ("overlay", "flannel", Some(Target::AtLeast(FLANNEL_TARGET))),
        ("overlay_rule", "flannel", None),
        ("overlay", "overlay_rule", None),
        ("overlay", "routed", None),
        ("same_host", "bridged", None),
        ("overlay_fw", "overlay", None),
        ("overlay", "underlay", None),
        ("flannel", "underlay", None),
    ];
    let rtt: Vec<(&'static str, &'static str, Option<Target>)> = vec![
        ("overlay", "flannel", Some(Target::AtMost(RTT_TARGET))),
        ("overlay_rule", "flannel", None),
        ("same_host", "bridged", None),
    ];
    let exists = |p: &str| paths.iter().any(|d| d.name == p);
    let mut out = Vec::new();
    for (list, metrics) in [
        (
            &throughput,
            [("tcp1", "single-stream TCP"), ("tcp4", "4-stream TCP")],
        ),
        (
            &rtt,
            [("ping", "ping RTT"), ("tcp_rr", "TCP request/response RTT")],
        ),
    ] {
        for &(of, to, target) in list {
            if !exists(of) || !exists(to) {
                continue;
            }
            for (metric, what) in metrics {
                out.push(RatioDef {
                    of,
                    to,
                    metric,
                    what,
                    target,
                });
            }
        }
    }
    out
}

fn print_table(args: &Args, dp: &Datapath, figs: &[Figure]) {
    let fig = |k: &str| figs.iter().find(|f| f.key == k);
    let med = |k: &str| fig(k).map(|f| f.samples.median()).unwrap_or(f64::NAN);
    let spr = |k: &str| fig(k).map(|f| f.samples.spread()).unwrap_or(f64::NAN);
    println!(
        "\ndocker-vrouter datapath ({} interleaved rounds, median; iperf3 {} s runs, MSS {}; spread = (max-min)/median)",
        args.rounds, args.secs, dp.mss
    );
    println!(
        "{:<16} {:>10} {:>6} {:>10} {:>6} {:>9} {:>10}",
        "path", "tcp1 Mb/s", "spr", "tcp4 Mb/s", "spr", "ping ms", "tcp_rr us"
    );
    for p in &dp.paths {
        let k = |m: &str| format!("datapath.{}.{m}", p.name);
        println!(
            "{:<16} {:>10.0} {:>6.2} {:>10.0} {:>6.2} {:>9.3} {:>10.1}",
            p.name,
            med(&k("tcp1")),
            spr(&k("tcp1")),
            med(&k("tcp4")),
            spr(&k("tcp4")),
            med(&k("ping")),
            med(&k("tcp_rr"))
        );
    }
    print_ratios(figs, "datapath.ratio.", 44);
}

#[cfg(test)]
mod tests {
    use super::*;
    use vrouter_tests::datapath::Condition;

    fn path(name: &'static str) -> PathDef {
        PathDef {
            name,
            label: "",
            from_ns: String::new(),
            from_ip: std::net::Ipv4Addr::UNSPECIFIED,
            to_ns: String::new(),
            to_ip: std::net::Ipv4Addr::UNSPECIFIED,
            condition: Condition::Plain,
        }
    }

    fn samples(s: &mut PathSamples, k: &'static str, v: &[f64]) {
        s.insert(k, Samples(v.to_vec()));
    }

    /// The targets sit on the right ratios, and ratios are per round.
    #[test]
    fn targets_and_per_round_ratios() {
        let names = [
            "overlay",
            "overlay_rule",
            "flannel",
            "routed",
            "underlay",
            "same_host",
            "bridged",
            "overlay_fw",
        ];
        let paths: Vec<PathDef> = names.iter().map(|n| path(n)).collect();
        let mut all: BTreeMap<&'static str, PathSamples> = BTreeMap::new();
        for (n, tcp, rtt) in [
            ("overlay", [1000.0, 1200.0], [0.10, 0.12]),
            ("overlay_rule", [900.0, 1000.0], [0.12, 0.15]),
            ("flannel", [1000.0, 1000.0], [0.10, 0.10]),
        ] {
            let s = all.entry(n).or_default();
            for k in ["tcp1", "tcp4"] {
                samples(s, k, &tcp);
            }
            for k in ["ping", "tcp_rr"] {
                samples(s, k, &rtt);
            }
        }
        let figs = figures(&paths, &all);
        let fig = |k: &str| {
            figs.iter()
                .find(|f| f.key == k)
                .unwrap_or_else(|| panic!("no figure {k}"))
        };
        for m in ["tcp1", "tcp4"] {
            let f = fig(&format!("datapath.ratio.overlay_flannel.{m}"));
            assert_eq!(f.target, Some(Target::AtLeast(1.0)));
            assert_eq!(f.samples, Samples(vec![1.0, 1.2]));
            assert_eq!(
                fig(&format!("datapath.ratio.overlay_overlay_rule.{m}")).target,
                None
            );
            assert_eq!(
                fig(&format!("datapath.ratio.overlay_rule_flannel.{m}")).samples,
                Samples(vec![0.9, 1.0])
            );
        }
        for m in ["ping", "tcp_rr"] {
            let f = fig(&format!("datapath.ratio.overlay_flannel.{m}"));
            assert_eq!(f.target, Some(Target::AtMost(1.1)));
            assert!((f.samples.0[1] - 1.2).abs() < 1e-9);
            assert!(f.label.contains("overlay / flannel"), "{}", f.label);
            assert_eq!(
                fig(&format!("datapath.ratio.same_host_bridged.{m}")).target,
                None
            );
        }
        assert_eq!(fig("datapath.ratio.same_host_bridged.tcp1").target, None);
        // Exactly three figures carry a target per metric pair: tcp1, tcp4, ping, tcp_rr.
        let targeted: Vec<&str> = figs
            .iter()
            .filter(|f| f.target.is_some())
            .map(|f| f.key.as_str())
            .collect();
        assert_eq!(
            targeted,
            [
                "datapath.ratio.overlay_flannel.tcp1",
                "datapath.ratio.overlay_flannel.tcp4",
                "datapath.ratio.overlay_flannel.ping",
                "datapath.ratio.overlay_flannel.tcp_rr",
            ]
        );
        // A path that does not exist gives no ratio.
        let few = [path("overlay"), path("flannel")];
        let defs = ratio_defs(&few);
        assert!(defs.iter().all(|d| d.of == "overlay" && d.to == "flannel"));
        assert_eq!(defs.len(), 4);
    }
}
