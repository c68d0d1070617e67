//! gossip-sim: benchmarks of the gossip layer on the simulator (real `Node`s, real
//! sealing, simulated clock and network). Prints one JSON object.
//!
//! ```text
//! cargo run --release -p vrouter-gossip --bin gossip-sim [-- --quick] [-- --out FILE]
//! ```
//!
//! See docs/gossip-sim.md for what is measured and what is not modelled. With `--out
//! FILE` the figures are also written as `gossip.sim.*` in the schema every `make bench`
//! result uses (tests/src/bench.rs, shared by path: this crate cannot depend on the test
//! crate), the printed object under `extra`, for tests/bench-report.py.

// Only part of the shared bench module is used here, and its `pub` items are private
// in a binary (which is what makes clippy read `Target::to_json(&self)` as a lint).
#[allow(dead_code, clippy::wrong_self_convention)]
#[path = "../../../../tests/src/bench.rs"]
mod bench;

use bench::{write_results, Figure, Samples, Target};
use serde_json::{json, Value};
use std::time::Instant;
use vrouter_gossip::sim::{Sim, IP_UDP_HEADERS};
use vrouter_gossip::{ClaimedStack, GossipEvent, MemberState, Params};
use vrouter_state::{StackName, StackSpec, Vni};

/// Base seed: every run's seed is derived from it and printed.
const SEED: u64 = 0x5EED_2024;

struct Opts {
    quick: bool,
    n1000: bool,
    out: Option<String>,
    /// `--scale N1xK1,N2xK2,...`: large meshes of N nodes with K stacks each.
    scale: Vec<(usize, usize)>,
    updates: usize,
    crashes: usize,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        quick: false,
        n1000: false,
        out: None,
        scale: Vec::new(),
        updates: 5,
        crashes: 5,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--n1000" => o.n1000 = true,
            "--out" => o.out = Some(args.next().unwrap_or_else(|| usage("--out needs a FILE"))),
            "--scale" => {
                let v = args
                    .next()
                    .unwrap_or_else(|| usage("--scale needs NxK,..."));
                for item in v.split(',') {
                    let (n, k) = item.split_once('x').unwrap_or((item, "100"));
                    match (n.parse::<usize>(), k.parse::<usize>()) {
                        (Ok(n), Ok(k)) if n >= 2 => o.scale.push((n, k)),
                        _ => usage(&format!("bad --scale item {item:?}")),
                    }
                }
            }
            "--updates" => {
                o.updates = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage("--updates needs a number"))
            }
            "--crashes" => {
                o.crashes = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage("--crashes needs a number"))
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    o
}

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("gossip-sim: {msg}");
    }
    eprintln!("usage: gossip-sim [--quick] [--n1000] [--out FILE]");
    eprintln!("       gossip-sim --scale N1xK1,N2xK2,... [--updates U] [--crashes C] [--out FILE]");
    std::process::exit(if msg.is_empty() { 0 } else { 2 })
}

/// One stack for node `i` (`variant` changes its content, for a record update).
fn stack(i: usize, variant: u8) -> ClaimedStack {
    let (a, b) = ((i >> 8) & 0xff, i & 0xff);
    let net = if variant == 0 { 10 } else { 100 + variant };
    ClaimedStack {
        spec: StackSpec {
            name: StackName::new(&format!("s{i}-{variant}")).expect("valid name"),
            vni: Vni::new(100).expect("valid vni"),
            prefixes: vec![format!("{net}.{a}.{b}.0/24").parse().expect("valid prefix")],
            router_ip: format!("{net}.{a}.{b}.254").parse().expect("valid ip"),
        },
        claimed_ms: 1,
        generation: 1,
    }
}

fn mesh_all_at_once(n: usize, seed: u64) -> Sim {
    let mut s = Sim::new(n, Params::default(), seed);
    s.start(0, vec![stack(0, 0)], &[]);
    for i in 1..n {
        s.start(i, vec![stack(i, 0)], &[0]);
    }
    s
}

fn running(s: &Sim) -> Vec<usize> {
    (0..s.len()).filter(|i| s.node(*i).is_some()).collect()
}

/// Every running node sees every other running node alive, with a record carrying at
/// least one stack. A cheap check (SWIM's active count) first, then the full one.
fn converged(s: &Sim) -> bool {
    let run = running(s);
    let want = run.len() - 1;
    if run
        .iter()
        .any(|i| s.node(*i).expect("running").active_members() != want)
    {
        return false;
    }
    let ids: std::collections::HashSet<_> = run.iter().map(|i| Sim::node_id(*i)).collect();
    run.iter().all(|i| {
        let ms = s.node(*i).expect("running").members();
        ms.iter()
            .filter(|m| {
                ids.contains(&m.record.id)
                    && m.state == MemberState::Alive
                    && !m.record.stacks.is_empty()
            })
            .count()
            == want
    })
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// Nearest-rank percentile.
fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

fn max(v: &[f64]) -> f64 {
    v.iter().cloned().fold(f64::NAN, f64::max)
}

fn summary(v: &[f64]) -> Value {
    json!({
        "runs": v.len(),
        "median": median(v),
        "p99": percentile(v, 99.0),
        "max": max(v),
        "min": v.iter().cloned().fold(f64::NAN, f64::min),
        "values": v,
    })
}

fn run_seed(item: u64, run: u64) -> u64 {
    SEED ^ item.wrapping_mul(0x1000_0000) ^ run.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// 1. Idle wire traffic per node after convergence.
fn idle_traffic(n: usize, runs: u64, settle_ms: u64, window_ms: u64) -> Value {
    let t0 = Instant::now();
    let mut means = Vec::new();
    let mut maxes = Vec::new();
    let mut seeds = Vec::new();
    let mut conv = Vec::new();
    for r in 0..runs {
        let seed = run_seed(1 + n as u64, r);
        seeds.push(seed);
        let mut s = mesh_all_at_once(n, seed);
        let tc = s
            .run_until_true(120_000, 10, converged)
            .expect("idle mesh converges");
        conv.push(tc as f64);
        let t = s.now() + settle_ms;
        s.run_until(t);
        let before = s.wire_bytes.clone();
        let pk_before = s.wire_packets.clone();
        s.run_until(t + window_ms);
        let kbps: Vec<f64> = (0..n)
            .map(|i| (s.wire_bytes[i] - before[i]) as f64 * 8.0 / window_ms as f64)
            .collect();
        let pps: f64 = (0..n)
            .map(|i| (s.wire_packets[i] - pk_before[i]) as f64)
            .sum::<f64>()
            / n as f64
            / (window_ms as f64 / 1000.0);
        let mean = kbps.iter().sum::<f64>() / n as f64;
        eprintln!(
            "idle n={n} run {r}: mean {mean:.2} kbit/s, max {:.2} kbit/s, {pps:.1} pkt/s/node",
            max(&kbps)
        );
        means.push(mean);
        maxes.push(max(&kbps));
    }
    json!({
        "what": "bytes sent per node (sealed datagram + 28-byte IP/UDP header), kbit/s, after convergence and a settle period, all nodes alive and idle",
        "nodes": n,
        "seeds": seeds,
        "converged_after_ms": summary(&conv),
        "settle_ms": settle_ms,
        "window_ms": window_ms,
        "sent_kbit_s_per_node_mean": summary(&means),
        "sent_kbit_s_per_node_max": summary(&maxes),
        "target_kbit_s_per_node": 10.0,
        "wall_ms": t0.elapsed().as_millis() as u64,
    })
}

/// 2. N nodes joining node 0 (10 per 100 ms), then record updates from several nodes.
fn convergence_large(
    n: usize,
    updates: usize,
    latency: (u64, u64),
    seed: u64,
    settle_cap_ms: u64,
) -> Value {
    let wall = Instant::now();
    let mut s = Sim::new(n, Params::default(), seed);
    s.latency = latency;
    s.start(0, vec![stack(0, 0)], &[]);
    let mut next = 1;
    while next < n {
        let t = s.now() + 100;
        s.run_until(t);
        for i in next..(next + 10).min(n) {
            s.start(i, vec![stack(i, 0)], &[0]);
        }
        next += 10;
    }
    let all_started = s.now();
    eprintln!(
        "n={n}: all started at {all_started} ms sim, wall {:.1} s",
        wall.elapsed().as_secs_f64()
    );
    let join_wall = Instant::now();
    // Check cheaply (and progress-print) every 500 ms.
    let mut last_print = Instant::now();
    let deadline = all_started + settle_cap_ms;
    let mut joined_at = None;
    while s.now() < deadline {
        if converged(&s) {
            joined_at = Some(s.now());
            break;
        }
        let t = s.now() + 500;
        s.run_until(t);
        if last_print.elapsed().as_secs_f64() > 5.0 {
            last_print = Instant::now();
            let run = running(&s);
            let act: Vec<usize> = run
                .iter()
                .map(|i| s.node(*i).expect("running").active_members())
                .collect();
            let full = act.iter().filter(|a| **a == n - 1).count();
            eprintln!(
                "  t={} ms sim, wall {:.1} s: {full}/{n} nodes see {} active members, min {}",
                s.now(),
                wall.elapsed().as_secs_f64(),
                n - 1,
                act.iter().min().copied().unwrap_or(0)
            );
        }
    }
    let join_wall_s = join_wall.elapsed().as_secs_f64();
    let sim_until_conv = s.now() - all_started;
    eprintln!(
        "n={n}: join converged {:?} (sim {} ms after last start), wall {:.1} s",
        joined_at, sim_until_conv, join_wall_s
    );
    let mut result = json!({
        "nodes": n,
        "seed": seed,
        "latency_ms": [latency.0, latency.1],
        "join": {
            "what": "nodes 1..N start 10 per 100 ms simulated, each joining through node 0; time until every node sees every other alive with its record",
            "all_started_at_ms": all_started,
            "converged_at_ms": joined_at,
            "converged_ms_after_last_start": joined_at.map(|t| t - all_started),
            "checked_every_ms": 500,
            "wall_s": join_wall_s,
            "sim_s_per_wall_s": (s.now() - all_started) as f64 / 1000.0 / join_wall_s,
        },
    });
    if joined_at.is_none() {
        let short: Vec<usize> = running(&s)
            .into_iter()
            .filter(|i| s.node(*i).expect("running").active_members() != n - 1)
            .collect();
        let records_complete = running(&s)
            .iter()
            .filter(|i| s.node(**i).expect("running").members().len() == n - 1)
            .count();
        result["join"]["nodes_missing_swim_members_at_end"] = json!(short.len());
        result["join"]["nodes_holding_all_records_at_end"] = json!(records_complete);
        result["join"]["note"] = json!(format!(
            "did not converge within {settle_cap_ms} ms simulated after the last start"
        ));
    }
    // Let the join's broadcasts die out, and measure idle traffic at this size meanwhile.
    let t = s.now() + 10_000;
    s.run_until(t);
    let before = s.wire_bytes.clone();
    let ws = Instant::now();
    let t = s.now() + 10_000;
    s.run_until(t);
    let idle: Vec<f64> = (0..n)
        .map(|i| (s.wire_bytes[i] - before[i]) as f64 * 8.0 / 10_000.0)
        .collect();
    result["idle_after_join_kbit_s_per_node"] = json!({
        "window_ms": 10_000,
        "mean": idle.iter().sum::<f64>() / n as f64,
        "max": max(&idle),
        "wall_s": ws.elapsed().as_secs_f64(),
    });
    // Record updates.
    let mut times = Vec::new();
    let mut who = Vec::new();
    let mut pick = seed;
    for u in 0..updates {
        pick = pick
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let k = 1 + (pick >> 33) as usize % (n - 1);
        who.push(k);
        let uw = Instant::now();
        // Clear the change flags first so that only the update sets them.
        for j in running(&s) {
            s.node_mut(j).expect("running").take_changed();
        }
        s.set_stacks(k, vec![stack(k, 0), stack(k, 1 + u as u8)])
            .expect("set_stacks");
        let version = s.node(k).expect("running").record().version;
        let id = Sim::node_id(k);
        let t0 = s.now();
        let mut pending: Vec<usize> = running(&s).into_iter().filter(|j| *j != k).collect();
        let mut done_at = None;
        while s.now() < t0 + 60_000 {
            pending.retain(|j| {
                let node = s.node_mut(*j).expect("running");
                if !node.take_changed() {
                    return true;
                }
                !node
                    .members()
                    .iter()
                    .any(|m| m.record.id == id && m.record.version >= version)
            });
            if pending.is_empty() {
                done_at = Some(s.now());
                break;
            }
            let t = s.now() + 10;
            s.run_until(t);
        }
        let dt = done_at.map(|t| (t - t0) as f64);
        eprintln!(
            "n={n} update {u} from node {k}: {dt:?} ms (pending {}), wall {:.1} s",
            pending.len(),
            uw.elapsed().as_secs_f64()
        );
        times.push(dt.unwrap_or(f64::INFINITY));
        let t = s.now() + 5_000;
        s.run_until(t);
    }
    result["record_update"] = json!({
        "what": "one node changes its stacks (Sim::set_stacks); simulated time until every other node holds the new record version (checked every 10 ms)",
        "updating_nodes": who,
        "ms": summary(&times),
        "target_ms": 3000,
    });
    result["wall_s"] = json!(wall.elapsed().as_secs_f64());
    result
}

/// 3. Crash one node; time until every other node sees it Down (membership only).
fn failure_detection(n: usize, runs: u64) -> Value {
    let wall = Instant::now();
    let mut times = Vec::new();
    let mut seeds = Vec::new();
    for r in 0..runs {
        let seed = run_seed(3, r);
        seeds.push(seed);
        let mut s = mesh_all_at_once(n, seed);
        s.run_until_true(60_000, 10, converged)
            .expect("mesh converges");
        // Settle, plus a per-run offset so the crash falls at varied probe phases.
        let t = s.now() + 5_000 + (seed >> 20) % 1000;
        s.run_until(t);
        let victim = 1 + (r as usize % (n - 1));
        s.crash(victim);
        let t0 = s.now();
        let t = s
            .run_until_true(t0 + 30_000, 1, |s| {
                s.all_see(victim, |m| m.state == MemberState::Down)
            })
            .map(|t| (t - t0) as f64)
            .unwrap_or(f64::INFINITY);
        times.push(t);
    }
    eprintln!("failure detection n={n}: {times:?}");
    json!({
        "what": "membership part only: one node crashes, simulated time until every other node's SWIM state for it is Down (checked every 1 ms); route withdrawal by discovery/router comes on top",
        "nodes": n,
        "seeds": seeds,
        "ms": summary(&times),
        "target_ms": {"p50": 3000, "p99": 5000},
        "wall_s": wall.elapsed().as_secs_f64(),
    })
}

/// 4. Long run at 5% loss: Down states sampled every 500 ms, MemberFailed events.
fn false_failures(n: usize, runs: u64, duration_ms: u64, loss: f64) -> Value {
    let wall = Instant::now();
    let mut per_run = Vec::new();
    let (mut tot_down, mut tot_failed, mut tot_suspect) = (0u64, 0u64, 0u64);
    for r in 0..runs {
        let seed = run_seed(4, r);
        let mut s = mesh_all_at_once(n, seed);
        s.run_until_true(60_000, 10, converged)
            .expect("mesh converges");
        let t = s.now() + 5_000;
        s.run_until(t);
        for i in 0..n {
            s.node_mut(i).expect("running").take_events();
        }
        s.loss = loss;
        let t0 = s.now();
        let (mut down, mut suspect, mut failed, mut rejoined) = (0u64, 0u64, 0u64, 0u64);
        let mut at = t0;
        while at < t0 + duration_ms {
            at += 500;
            s.run_until(at);
            for i in 0..n {
                let node = s.node_mut(i).expect("running");
                for m in node.members() {
                    match m.state {
                        MemberState::Down => down += 1,
                        MemberState::Suspect => suspect += 1,
                        _ => {}
                    }
                }
                for e in node.take_events() {
                    match e {
                        GossipEvent::MemberFailed(_) => failed += 1,
                        GossipEvent::Rejoined => rejoined += 1,
                        _ => {}
                    }
                }
            }
        }
        eprintln!(
            "false failures run {r}: down samples {down}, failed events {failed}, suspect samples {suspect}, rejoined {rejoined}"
        );
        tot_down += down;
        tot_failed += failed;
        tot_suspect += suspect;
        per_run.push(json!({
            "seed": seed,
            "down_samples": down,
            "member_failed_events": failed,
            "suspect_samples": suspect,
            "rejoined_events": rejoined,
        }));
    }
    json!({
        "what": "N nodes converged, then `duration_ms` simulated at `loss` datagram loss; every 500 ms every node's members() is sampled (node x member pairs in Down / Suspect), and MemberFailed events are drained with Node::take_events",
        "nodes": n,
        "loss": loss,
        "duration_ms": duration_ms,
        "sample_every_ms": 500,
        "down_samples": tot_down,
        "member_failed_events": tot_failed,
        "suspect_samples": tot_suspect,
        "runs": per_run,
        "target": 0,
        "wall_s": wall.elapsed().as_secs_f64(),
    })
}

/// 5. A new node joins a converged mesh of n-1 nodes.
fn join_convergence(n: usize, runs: u64) -> Value {
    let wall = Instant::now();
    let mut seen = Vec::new();
    let mut sees = Vec::new();
    let mut seeds = Vec::new();
    for r in 0..runs {
        let seed = run_seed(5, r);
        seeds.push(seed);
        let mut s = Sim::new(n, Params::default(), seed);
        s.start(0, vec![stack(0, 0)], &[]);
        for i in 1..n - 1 {
            s.start(i, vec![stack(i, 0)], &[0]);
        }
        s.run_until_true(60_000, 10, converged)
            .expect("mesh converges");
        let t = s.now() + 5_000 + (seed >> 20) % 1000;
        s.run_until(t);
        let new = n - 1;
        s.start(new, vec![stack(new, 0)], &[0]);
        let t0 = s.now();
        let mut all_see_it = None;
        let mut it_sees_all = None;
        while s.now() < t0 + 30_000 && (all_see_it.is_none() || it_sees_all.is_none()) {
            if all_see_it.is_none()
                && s.all_see(new, |m| {
                    m.state == MemberState::Alive && m.record.stacks.len() == 1
                })
            {
                all_see_it = Some(s.now() - t0);
            }
            if it_sees_all.is_none() {
                let ms = s.node(new).expect("running").members();
                if ms
                    .iter()
                    .filter(|m| m.state == MemberState::Alive && m.record.stacks.len() == 1)
                    .count()
                    == n - 1
                {
                    it_sees_all = Some(s.now() - t0);
                }
            }
            let t = s.now() + 1;
            s.run_until(t);
        }
        seen.push(all_see_it.map(|t| t as f64).unwrap_or(f64::INFINITY));
        sees.push(it_sees_all.map(|t| t as f64).unwrap_or(f64::INFINITY));
    }
    eprintln!("join n={n}: all see it {seen:?}; it sees all {sees:?}");
    json!({
        "what": "a new node (one stack) joins a converged mesh of N-1 nodes through node 0; simulated time until every other node sees it alive with its record (checked every 1 ms)",
        "nodes": n,
        "seeds": seeds,
        "all_see_new_node_ms": summary(&seen),
        "new_node_sees_all_ms": summary(&sees),
        "wall_s": wall.elapsed().as_secs_f64(),
    })
}

fn main() {
    let o = parse_args();
    let wall = Instant::now();
    if !o.scale.is_empty() {
        let mut out = scale_main(&o.scale, o.updates, o.crashes);
        out["tool"] = json!("gossip-sim --scale");
        out["params"] = json!(Params::default());
        out["base_seed"] = json!(SEED);
        out["network"] =
            json!({"latency_ms": [1, 1], "loss": 0.0, "ip_udp_header_bytes": IP_UDP_HEADERS});
        out["total_wall_s"] = json!(wall.elapsed().as_secs_f64());
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        if let Some(path) = o.out {
            let figures = scale_figures(&out);
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            if let Err(e) = write_results(
                std::path::Path::new(&path),
                "gossip-scale",
                &command,
                &figures,
                out,
            ) {
                eprintln!("gossip-sim: cannot write {path}: {e:#}");
                std::process::exit(1);
            }
        }
        return;
    }
    let q = o.quick;
    let mut out = json!({
        "tool": "gossip-sim",
        "mode": if q { "quick" } else { "full" },
        "params": Params::default(),
        "base_seed": SEED,
        "network": {
            "latency_ms": [1, 1],
            "loss": 0.0,
            "ip_udp_header_bytes": IP_UDP_HEADERS,
        },
    });
    out["idle_traffic_n10"] = idle_traffic(10, if q { 1 } else { 3 }, 10_000, 60_000);
    out["idle_traffic_n100"] = idle_traffic(100, if q { 1 } else { 3 }, 10_000, 60_000);
    out["failure_detection_n10"] = failure_detection(10, if q { 5 } else { 20 });
    out["false_failures_loss5_n10"] = false_failures(
        10,
        if q { 1 } else { 3 },
        if q { 120_000 } else { 600_000 },
        0.05,
    );
    out["join_convergence_n10"] = join_convergence(10, if q { 5 } else { 20 });
    // The large-mesh figures are taken at N=200 by default (seconds of wall time) and
    // at N=1,000 with --n1000 (about 8 minutes of wall time on 2 cores).
    let big = if o.n1000 { 1000 } else { 200 };
    let key = format!("convergence_n{big}");
    out[key.as_str()] = convergence_large(big, if q { 2 } else { 5 }, (1, 1), SEED ^ 2, 60_000);
    out[format!("{key}_latency_1_5ms").as_str()] =
        convergence_large(big, if q { 1 } else { 5 }, (1, 5), SEED ^ 0x25, 60_000);
    if !o.n1000 {
        out["convergence_n1000"] = json!({
            "measured": false,
            "reason": "not asked for: run with --n1000 (about 8 minutes of wall time); make bench does",
        });
    }
    out["total_wall_s"] = json!(wall.elapsed().as_secs_f64());
    let text = serde_json::to_string_pretty(&out).expect("json");
    println!("{text}");
    if let Some(path) = o.out {
        let figures = figures(&out, big);
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        let p = std::path::Path::new(&path);
        if let Err(e) = write_results(p, "gossip-sim", &command, &figures, out) {
            eprintln!("gossip-sim: cannot write {path}: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Samples from a JSON array of numbers; null (what an infinity, a run that never
/// finished, became in JSON) is an infinity again.
fn samples(v: &Value) -> Samples {
    Samples(
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.as_f64().unwrap_or(f64::INFINITY))
                    .collect()
            })
            .unwrap_or_default(),
    )
}

/// One sample: a number, or an infinity for null or absent.
fn one(v: &Value) -> Samples {
    Samples(vec![v.as_f64().unwrap_or(f64::INFINITY)])
}

/// The report's figures, taken from the measurements in `out` (nothing measured again).
fn figures(out: &Value, big: usize) -> Vec<Figure> {
    let mut f = Vec::new();
    for n in [10, 100] {
        let v = &out[format!("idle_traffic_n{n}").as_str()];
        let target = Target::AtMost(v["target_kbit_s_per_node"].as_f64().unwrap_or(10.0));
        let what = format!(
            "{} s after convergence + {} s settle",
            v["window_ms"].as_u64().unwrap_or(0) / 1000,
            v["settle_ms"].as_u64().unwrap_or(0) / 1000
        );
        f.push(Figure::new(
            &format!("gossip.sim.idle_n{n}.mean_kbit"),
            &format!("Gossip traffic sent per node, idle, N={n}: mean over nodes, one sample per run ({what})"),
            "kbit/s",
            samples(&v["sent_kbit_s_per_node_mean"]["values"]),
        ));
        f.push(
            Figure::new(
                &format!("gossip.sim.idle_n{n}.max_kbit"),
                &format!(
                    "Gossip traffic sent per node, idle, N={n}: busiest node, one sample per run"
                ),
                "kbit/s",
                samples(&v["sent_kbit_s_per_node_max"]["values"]),
            )
            .with_target(target),
        );
    }
    let fd = &out["failure_detection_n10"];
    let runs = fd["ms"]["runs"].as_u64().unwrap_or(0);
    f.push(
        Figure::new(
            "gossip.sim.failure_detection_n10_ms",
            &format!("Failure detection, membership only, N=10: a node crashes → all others see it Down ({runs} crashes)"),
            "ms",
            samples(&fd["ms"]["values"]),
        )
        .with_target(Target::AtMost(3000.0)),
    );
    f.push(
        Figure::new(
            "gossip.sim.failure_detection_n10_p99_ms",
            &format!("Failure detection, N=10: p99 (nearest rank) of the {runs} crashes"),
            "ms",
            one(&fd["ms"]["p99"]),
        )
        .with_target(Target::AtMost(5000.0)),
    );
    let ff = &out["false_failures_loss5_n10"];
    let per_run = |k: &str| {
        Samples(
            ff["runs"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|r| r[k].as_f64().unwrap_or(f64::INFINITY))
                        .collect()
                })
                .unwrap_or_default(),
        )
    };
    let minutes = ff["duration_ms"].as_u64().unwrap_or(0) / 60_000;
    f.push(
        Figure::new(
            "gossip.sim.loss5_n10.down_samples",
            &format!("False Down at 5 % loss, N=10: node × member pairs seen Down (sampled every 500 ms), one sample per run of {minutes} simulated minutes"),
            "samples",
            per_run("down_samples"),
        )
        .with_target(Target::AtMost(0.0)),
    );
    f.push(
        Figure::new(
            "gossip.sim.loss5_n10.member_failed",
            &format!("False failures at 5 % loss, N=10: `MemberFailed` events, one sample per run of {minutes} simulated minutes"),
            "events",
            per_run("member_failed_events"),
        )
        .with_target(Target::AtMost(0.0)),
    );
    let jc = &out["join_convergence_n10"];
    f.push(
        Figure::new(
            "gossip.sim.join_n10.all_see_new_ms",
            "Join, N=10: a new node joins through node 0 → all 9 others see it alive with its record",
            "ms",
            samples(&jc["all_see_new_node_ms"]["values"]),
        )
        .with_target(Target::AtMost(1000.0)),
    );
    f.push(Figure::new(
        "gossip.sim.join_n10.new_sees_all_ms",
        "Join, N=10: the new node sees all 9 others alive with their records",
        "ms",
        samples(&jc["new_node_sees_all_ms"]["values"]),
    ));
    for (suffix, what) in [("", "latency 1 ms"), ("_latency_1_5ms", "latency 1–5 ms")] {
        let key = format!("n{big}{}", suffix.replace("_latency_", "_lat"));
        let v = &out[format!("convergence_n{big}{suffix}").as_str()];
        let others = big - 1;
        f.push(
            Figure::new(
                &format!("gossip.sim.{key}.record_update_ms"),
                &format!(
                    "Convergence at N={big} ({what}): a record update reaching all {others} others"
                ),
                "ms",
                samples(&v["record_update"]["ms"]["values"]),
            )
            .with_target(Target::AtMost(3000.0)),
        );
        f.push(
            Figure::new(
                &format!("gossip.sim.{key}.join_after_last_start_ms"),
                &format!("Convergence at N={big} ({what}): {big} nodes joining 10 per 100 ms through one address, until all see all, after the last start (checked every 500 ms)"),
                "ms",
                one(&v["join"]["converged_ms_after_last_start"]),
            )
            .with_target(Target::AtMost(3000.0)),
        );
        let idle = &v["idle_after_join_kbit_s_per_node"];
        f.push(Figure::new(
            &format!("gossip.sim.{key}.idle_after_join_mean_kbit"),
            &format!("Gossip traffic per node at N={big} ({what}) right after the join, mean over nodes (10 s window)"),
            "kbit/s",
            one(&idle["mean"]),
        ));
        f.push(Figure::new(
            &format!("gossip.sim.{key}.idle_after_join_max_kbit"),
            &format!(
                "Gossip traffic per node at N={big} ({what}) right after the join, busiest node"
            ),
            "kbit/s",
            one(&idle["max"]),
        ));
    }
    f
}

// ---------------------------------------------------------------------------------------
// --scale: large meshes whose records are the size of 100-stack hosts (gossip-scale.json)
// ---------------------------------------------------------------------------------------

/// Peak and current resident memory of this process, in MiB (VmHWM, VmRSS).
fn rss_mib() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    };
    (get("VmHWM:"), get("VmRSS:"))
}

/// Node `i`'s stacks in a scale run: `k` stacks with 64-character names and 4 prefixes
/// each (the record of a host with `k` long-named stacks; 100 of them take ~14 kB).
fn scale_stacks(i: usize, k: usize, variant: u64) -> Vec<ClaimedStack> {
    if k <= 1 {
        return vec![stack(i, variant as u8)];
    }
    let mut v = vrouter_gossip::sim::long_stacks(i as u64 * 1_000 + 7, k, 4);
    if variant > 0 {
        // One stack replaced by another: the update a host makes when a stack moves.
        v.pop();
        let mut extra = vrouter_gossip::sim::long_stacks(i as u64 * 1_000 + 7 + variant, 1, 4);
        extra[0].claimed_ms += 10_000 + variant;
        v.extend(extra);
    }
    v
}

/// Every running node holds every other's record, alive, and SWIM counts all as active.
fn scale_converged(s: &Sim, want: usize) -> bool {
    let run = running(s);
    run.iter().all(|i| {
        let n = s.node(*i).expect("running");
        n.active_members() == want && n.held_brief().1 == want
    })
}

fn scale_run(n: usize, k: usize, updates: usize, crashes: usize, seed: u64, cap_ms: u64) -> Value {
    let wall = Instant::now();
    let mut s = Sim::new(n, Params::default(), seed);
    let record_bytes = {
        let st = scale_stacks(0, k, 0);
        let r = vrouter_gossip::NodeRecord {
            id: Sim::node_id(0),
            version: 1,
            gossip_addr: vrouter_gossip::sim::sim_addr(0),
            underlay: *vrouter_gossip::sim::sim_addr(0).ip(),
            vxlan_port: 4789,
            stacks: st,
            left: false,
            bump: 0,
            encryption: None,
            nat: None,
            relay: None,
        };
        vrouter_gossip::record::encoded_len(&r)
    };
    s.start(0, scale_stacks(0, k, 0), &[]);
    let mut next = 1;
    while next < n {
        let t = s.now() + 100;
        s.run_until(t);
        for i in next..(next + 10).min(n) {
            s.start(i, scale_stacks(i, k, 0), &[0]);
        }
        next += 10;
    }
    let all_started = s.now();
    eprintln!(
        "scale n={n} k={k}: all started at {all_started} ms sim, wall {:.1} s, record {record_bytes} B",
        wall.elapsed().as_secs_f64()
    );
    let jw = Instant::now();
    let mut joined_at = None;
    let mut last_print = Instant::now();
    while s.now() < all_started + cap_ms {
        if scale_converged(&s, n - 1) {
            joined_at = Some(s.now());
            break;
        }
        let t = s.now() + 500;
        s.run_until(t);
        if last_print.elapsed().as_secs_f64() > 20.0 {
            last_print = Instant::now();
            let full = running(&s)
                .iter()
                .filter(|i| s.node(**i).expect("running").held_brief().1 == n - 1)
                .count();
            eprintln!(
                "  n={n}: t={} ms sim, wall {:.0} s, {full}/{n} nodes hold all alive; rss {:?}",
                s.now(),
                wall.elapsed().as_secs_f64(),
                rss_mib()
            );
        }
    }
    let join_wall_s = jw.elapsed().as_secs_f64();
    eprintln!(
        "scale n={n}: join {:?} ms after last start, wall {join_wall_s:.1} s",
        joined_at.map(|t| t - all_started)
    );
    // Idle traffic: let the join's broadcasts die out, then a 20 s window.
    let t = s.now() + 10_000;
    s.run_until(t);
    let before = s.wire_bytes.clone();
    let pk_before = s.wire_packets.clone();
    let window = 20_000;
    let t = s.now() + window;
    s.run_until(t);
    let idle: Vec<f64> = (0..n)
        .map(|i| (s.wire_bytes[i] - before[i]) as f64 * 8.0 / window as f64)
        .collect();
    let pps = (0..n)
        .map(|i| (s.wire_packets[i] - pk_before[i]) as f64)
        .sum::<f64>()
        / n as f64
        / (window as f64 / 1000.0);
    let idle_mean = idle.iter().sum::<f64>() / n as f64;
    eprintln!(
        "scale n={n}: idle mean {idle_mean:.2} kbit/s, max {:.2}, {pps:.1} pkt/s/node",
        max(&idle)
    );
    // Record updates: one stack of a node's 100 replaced.
    let mut times = Vec::new();
    let mut upd_bytes = Vec::new();
    let mut pick = seed;
    for u in 0..updates {
        pick = pick
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let who = 1 + (pick >> 33) as usize % (n - 1);
        let b0: u64 = s.wire_bytes.iter().sum();
        s.set_stacks(who, scale_stacks(who, k, 1 + u as u64))
            .expect("set_stacks");
        let version = s.node(who).expect("running").record().version;
        let id = Sim::node_id(who);
        let t0 = s.now();
        let mut pending: Vec<usize> = running(&s).into_iter().filter(|j| *j != who).collect();
        let mut done = None;
        while s.now() < t0 + 60_000 {
            pending.retain(|j| {
                s.node(*j)
                    .expect("running")
                    .member_brief(id)
                    .is_none_or(|(v, _, _)| v < version)
            });
            if pending.is_empty() {
                done = Some(s.now() - t0);
                break;
            }
            let t = s.now() + 10;
            s.run_until(t);
        }
        let b1: u64 = s.wire_bytes.iter().sum();
        upd_bytes.push((b1 - b0) as f64);
        eprintln!(
            "scale n={n}: update {u} from {who}: {done:?} ms (pending {})",
            pending.len()
        );
        times.push(done.map(|t| t as f64).unwrap_or(f64::INFINITY));
        let t = s.now() + 5_000;
        s.run_until(t);
    }
    // Failure detection: crash one node at a time, until all others see it Down.
    let mut fd = Vec::new();
    let mut crashed = Vec::new();
    for c in 0..crashes {
        let victim = 1 + (c * 7919 + 13) % (n - 1);
        if crashed.contains(&victim) {
            continue;
        }
        let t = s.now() + 2_000 + (seed >> (c % 40)) % 500;
        s.run_until(t);
        crashed.push(victim);
        s.crash(victim);
        let id = Sim::node_id(victim);
        let t0 = s.now();
        let mut pending: Vec<usize> = running(&s);
        let mut done = None;
        while s.now() < t0 + 30_000 {
            pending.retain(|j| {
                s.node(*j)
                    .expect("running")
                    .member_brief(id)
                    .is_none_or(|(_, _, st)| st != MemberState::Down)
            });
            if pending.is_empty() {
                done = Some(s.now() - t0);
                break;
            }
            let t = s.now() + 10;
            s.run_until(t);
        }
        eprintln!("scale n={n}: crash of {victim} seen Down by all after {done:?} ms");
        fd.push(done.map(|t| t as f64).unwrap_or(f64::INFINITY));
    }
    let (hwm, rss) = rss_mib();
    json!({
        "nodes": n,
        "stacks_per_node": k,
        "record_bytes": record_bytes,
        "seed": seed,
        "join": {
            "what": "nodes 1..N start 10 per 100 ms simulated, each joining through node 0; time after the last start until every node holds every other's record alive and SWIM counts all (checked every 500 ms)",
            "converged_ms_after_last_start": joined_at.map(|t| t - all_started),
            "cap_ms": cap_ms,
            "wall_s": join_wall_s,
        },
        "idle": {
            "what": "bytes sent per node incl. 28-byte IP/UDP headers, 10 s after the join converged, over 20 s",
            "window_ms": window,
            "kbit_s_mean": idle_mean,
            "kbit_s_max": max(&idle),
            "packets_s_per_node": pps,
            "target_kbit_s": 10.0,
        },
        "record_update": {
            "what": "one node replaces one of its stacks (a new record version); simulated time until every other node holds it (checked every 10 ms)",
            "ms": summary(&times),
            "mesh_bytes_per_update": summary(&upd_bytes),
            "target_ms": 3000,
        },
        "failure_detection": {
            "what": "one node crashes; simulated time until every other node sees it Down (checked every 10 ms); crashes one after another",
            "ms": summary(&fd),
            "target_ms": {"p50": 3000, "p99": 5000},
        },
        "process_rss_mib": {"peak": hwm, "end": rss},
        "held_bytes_per_node_est": (n - 1) * record_bytes * 2,
        "wall_s": wall.elapsed().as_secs_f64(),
    })
}

/// Least-squares fit y = a + b*x.
fn fit(xs: &[f64], ys: &[f64]) -> Option<(f64, f64)> {
    let n = xs.len() as f64;
    if xs.len() < 2 {
        return None;
    }
    let (sx, sy) = (xs.iter().sum::<f64>(), ys.iter().sum::<f64>());
    let sxx = xs.iter().map(|x| x * x).sum::<f64>();
    let sxy = xs.iter().zip(ys).map(|(x, y)| x * y).sum::<f64>();
    let d = n * sxx - sx * sx;
    if d.abs() < 1e-12 {
        return None;
    }
    let b = (n * sxy - sx * sy) / d;
    Some(((sy - b * sx) / n, b))
}

/// Runs every (N, stacks) of `--scale`, and extrapolates to N = 10,000.
fn scale_main(list: &[(usize, usize)], updates: usize, crashes: usize) -> Value {
    let mut runs = Vec::new();
    for (n, k) in list {
        let v = scale_run(
            *n,
            *k,
            updates,
            crashes,
            SEED ^ (*n as u64) ^ ((*k as u64) << 20),
            120_000,
        );
        eprintln!("{}", serde_json::to_string(&v).unwrap_or_default());
        runs.push(v);
    }
    // Trend over the runs with the largest record size: update time and failure
    // detection against log2(N) (epidemic dissemination), idle traffic against N.
    let kmax = list.iter().map(|x| x.1).max().unwrap_or(1);
    let big: Vec<&Value> = runs
        .iter()
        .filter(|r| r["stacks_per_node"].as_u64() == Some(kmax as u64))
        .collect();
    let xs_log: Vec<f64> = big
        .iter()
        .map(|r| (r["nodes"].as_f64().unwrap_or(1.0)).log2())
        .collect();
    let xs: Vec<f64> = big
        .iter()
        .map(|r| r["nodes"].as_f64().unwrap_or(1.0))
        .collect();
    let col = |p: &[&str]| -> Vec<f64> {
        big.iter()
            .map(|r| {
                let mut v = *r;
                for k in p {
                    v = &v[*k];
                }
                v.as_f64().unwrap_or(f64::NAN)
            })
            .collect()
    };
    let at = 10_000f64;
    let mut trend = json!({"at_nodes": 10_000, "stacks_per_node": kmax});
    let put = |trend: &mut Value, key: &str, model: &str, xs: &[f64], ys: Vec<f64>, x: f64| {
        if let Some((a, b)) = fit(xs, &ys) {
            trend[key] = json!({"model": model, "a": a, "b": b, "value": a + b * x, "from": ys});
        }
    };
    put(
        &mut trend,
        "record_update_median_ms",
        "a + b*log2(N)",
        &xs_log,
        col(&["record_update", "ms", "median"]),
        at.log2(),
    );
    put(
        &mut trend,
        "record_update_max_ms",
        "a + b*log2(N)",
        &xs_log,
        col(&["record_update", "ms", "max"]),
        at.log2(),
    );
    put(
        &mut trend,
        "failure_detection_median_ms",
        "a + b*log2(N)",
        &xs_log,
        col(&["failure_detection", "ms", "median"]),
        at.log2(),
    );
    put(
        &mut trend,
        "idle_kbit_s_mean",
        "a + b*log2(N)",
        &xs_log,
        col(&["idle", "kbit_s_mean"]),
        at.log2(),
    );
    put(
        &mut trend,
        "idle_kbit_s_max",
        "a + b*log2(N)",
        &xs_log,
        col(&["idle", "kbit_s_max"]),
        at.log2(),
    );
    put(
        &mut trend,
        "sim_peak_rss_mib",
        "a + b*N (per N: the sim holds N^2 records)",
        &xs.iter().map(|x| x * x).collect::<Vec<_>>(),
        col(&["process_rss_mib", "peak"]),
        at * at,
    );
    let rb = big
        .first()
        .and_then(|r| r["record_bytes"].as_f64())
        .unwrap_or(0.0);
    let per_record = trend["sim_peak_rss_mib"]["b"].as_f64().unwrap_or(f64::NAN);
    trend["records_held_per_host_mib"] = json!({
        "what": "memory one host spends on the other N-1 records at N=10,000: the simulator's peak RSS per record held (the N^2 slope) times 9,999",
        "record_bytes": rb,
        "mib_per_record_held": per_record,
        "value": per_record * (at - 1.0),
    });
    json!({
        "what": "gossip meshes whose records are those of hosts with many long-named stacks, at several N; trend to N=10,000",
        "runs": runs,
        "trend": trend,
    })
}

/// Figures of a `--scale` run: per N, and the trend to N=10,000.
fn scale_figures(out: &Value) -> Vec<Figure> {
    let mut f = Vec::new();
    for r in out["runs"].as_array().cloned().unwrap_or_default() {
        let n = r["nodes"].as_u64().unwrap_or(0);
        let k = r["stacks_per_node"].as_u64().unwrap_or(0);
        let key = format!("gossip.scale.n{n}_k{k}");
        let rb = r["record_bytes"].as_u64().unwrap_or(0);
        let what = format!("N={n} nodes, {k} stacks each ({rb}-byte records)");
        f.push(
            Figure::new(
                &format!("{key}.record_update_ms"),
                &format!("Gossip sim, {what}: a record update reaching all others"),
                "ms",
                samples(&r["record_update"]["ms"]["values"]),
            )
            .with_target(Target::AtMost(3000.0)),
        );
        f.push(
            Figure::new(
                &format!("{key}.idle_kbit"),
                &format!("Gossip sim, {what}: idle traffic sent per node, busiest node"),
                "kbit/s",
                one(&r["idle"]["kbit_s_max"]),
            )
            .with_target(Target::AtMost(10.0)),
        );
        f.push(Figure::new(
            &format!("{key}.idle_mean_kbit"),
            &format!("Gossip sim, {what}: idle traffic sent per node, mean"),
            "kbit/s",
            one(&r["idle"]["kbit_s_mean"]),
        ));
        f.push(
            Figure::new(
                &format!("{key}.failure_detection_ms"),
                &format!("Gossip sim, {what}: a crashed node seen Down by all others"),
                "ms",
                samples(&r["failure_detection"]["ms"]["values"]),
            )
            .with_target(Target::AtMost(3000.0)),
        );
        f.push(Figure::new(
            &format!("{key}.join_ms"),
            &format!("Gossip sim, {what}: join (10 per 100 ms through one node) converged after the last start"),
            "ms",
            one(&r["join"]["converged_ms_after_last_start"]),
        ));
    }
    let t = &out["trend"];
    for (k, label, unit) in [
        (
            "record_update_median_ms",
            "record update reaching all (median), extrapolated",
            "ms",
        ),
        (
            "failure_detection_median_ms",
            "failure detection (median), extrapolated",
            "ms",
        ),
        (
            "idle_kbit_s_max",
            "idle traffic, busiest node, extrapolated",
            "kbit/s",
        ),
    ] {
        if t[k]["value"].is_number() {
            f.push(Figure::new(
                &format!("gossip.scale.n10000_trend.{k}"),
                &format!(
                    "Gossip at N=10,000 ({} stacks per node): {label} from the runs ({})",
                    t["stacks_per_node"],
                    t[k]["model"].as_str().unwrap_or("")
                ),
                unit,
                one(&t[k]["value"]),
            ));
        }
    }
    f
}
