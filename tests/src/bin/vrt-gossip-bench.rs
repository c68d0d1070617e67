//! `make bench`, gossip part: the real daemons on N=10 simulated hosts (network
//! namespaces on a veth underlay, the Docker-28.2-like firewall, CAP_NET_ADMIN only),
//! joined by gossip through one bootstrap address.
//!
//! - join convergence: from a new stack's router starting (it registers at once) to the
//!   first ping answered from that stack's service by a service on another host;
//! - failure detection: from cutting a host's underlay link to its stack gone from every
//!   other host's routes.json;
//! - idle gossip traffic per node (sealed bytes sent, plus 28 bytes of IP and UDP
//!   headers per datagram, from discovery.json's counters);
//! - false failures at 5 % underlay loss (nftables `numgen random`): `member_failed` and
//!   `peer_withdrawn` events over the run.
//!
//! Prints the measurements as one JSON object; with `--out FILE` also writes them as
//! `gossip.real.*` figures in the schema of tests/src/bench.rs (for
//! tests/bench-report.py), the object above under `extra`. `--quick` runs fewer rounds
//! and one minute of loss instead of ten.

use serde_json::json;
use std::time::{Duration, Instant};
use vrouter_tests::bench::{write_results, Figure, Samples, Target};
use vrouter_tests::gossip::{now_ms, GossipMesh};
use vrouter_tests::mesh::StackDef;
use vrouter_tests::probe::ping;
use vrouter_tests::wait_until;

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("vrt-gossip-bench: needs root (network namespaces)");
        std::process::exit(1);
    }
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1).cloned());
    match bench(quick) {
        Ok((figures, v)) => {
            let text = serde_json::to_string_pretty(&v).expect("json");
            println!("{text}");
            if let Some(p) = out {
                let command = args.join(" ");
                let path = std::path::Path::new(&p);
                if let Err(e) = write_results(path, "vrt-gossip-bench", &command, &figures, v) {
                    eprintln!("vrt-gossip-bench: cannot write {p}: {e:#}");
                    std::process::exit(1);
                }
            }
        }
        Err(e) => {
            eprintln!("vrt-gossip-bench: {e:#}");
            std::process::exit(1);
        }
    }
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn bench(quick: bool) -> anyhow::Result<(Vec<Figure>, serde_json::Value)> {
    const N: usize = 10;
    let started = Instant::now();
    let mut g = GossipMesh::start_one_stack_per_host("gbench", N)?;
    let mesh_time = g.wait_full_mesh(Duration::from_secs(60))?;
    eprintln!("gossip-bench: {N}-host mesh converged {mesh_time:?} after the routers started");

    // Idle traffic: counters over a quiet window.
    let window = Duration::from_secs(if quick { 10 } else { 30 });
    let before: Vec<(u64, u64)> = (1..=N)
        .map(|h| (g.counter(h, "bytes_out"), g.counter(h, "packets_out")))
        .collect();
    std::thread::sleep(window);
    let mut idle_kbit = Vec::new();
    for h in 1..=N {
        let (b0, p0) = before[h - 1];
        let bytes = g.counter(h, "bytes_out") - b0 + 28 * (g.counter(h, "packets_out") - p0);
        idle_kbit.push(bytes as f64 * 8.0 / 1000.0 / window.as_secs_f64());
    }
    let idle_mean = idle_kbit.iter().sum::<f64>() / idle_kbit.len() as f64;
    let idle_max = idle_kbit.iter().cloned().fold(0.0, f64::max);
    eprintln!("gossip-bench: idle traffic per node mean {idle_mean:.2} kbit/s, max {idle_max:.2}");

    // Join convergence: a new stack on host k, pinged from a service on another host.
    let joins = if quick { 3 } else { 10 };
    let mut join_ms = Vec::new();
    for i in 0..joins {
        let host = 1 + (i * 3) % N;
        let from_host = 1 + (host % N);
        let name: &'static str = Box::leak(format!("j{i}").into_boxed_str());
        let cidr: &'static str = Box::leak(format!("10.{}.0.0/24", 100 + i).into_boxed_str());
        g.mesh
            .add_stack_containers(StackDef::new(name, host, 1000, cidr))?;
        let from = g.stack_on(from_host);
        let (src_ns, dst_ip) = (g.svc(from).ns.clone(), g.svc(name).ip.to_string());
        let t = Instant::now();
        g.mesh.start_router(name)?;
        // Short pings, so a ping sent before the routes exist does not hide the moment
        // they do.
        let answered = wait_until(Duration::from_secs(20), Duration::from_millis(10), || {
            ping(&src_ns, &dst_ip, 1, Duration::from_millis(150))
        });
        let took = t.elapsed();
        if !answered {
            anyhow::bail!("stack {name} on host {host} never answered");
        }
        join_ms.push(took.as_secs_f64() * 1000.0);
        eprintln!("gossip-bench: join {name} on host {host}: first answer from host {from_host} after {took:?}");
    }

    // Failure detection: cut a host off, wait until every other host withdrew it.
    let rounds = if quick { 4 } else { 20 };
    let mut detect_ms = Vec::new();
    for i in 0..rounds {
        let victim = 2 + i % (N - 1);
        let stack = g.stack_on(victim);
        let others: Vec<usize> = (1..=N).filter(|h| *h != victim).collect();
        let t = Instant::now();
        g.set_underlay_link(victim, false)?;
        let ok = wait_until(Duration::from_secs(20), Duration::from_millis(20), || {
            others.iter().all(|h| !g.routed_stacks(*h).contains(stack))
        });
        let took = t.elapsed();
        g.set_underlay_link(victim, true)?;
        if !ok {
            anyhow::bail!("host {victim} not withdrawn everywhere within 20 s");
        }
        detect_ms.push(took.as_secs_f64() * 1000.0);
        eprintln!("gossip-bench: host {victim} cut off: withdrawn everywhere after {took:?}");
        g.wait_full_mesh(Duration::from_secs(30))?;
    }

    // False failures at 5 % loss.
    let loss_for = Duration::from_secs(if quick { 60 } else { 600 });
    let since = now_ms();
    g.underlay_loss(5)?;
    std::thread::sleep(loss_for);
    g.clear_underlay_loss()?;
    let failed = g.events_of_kinds_since(&["member_failed"], since).len();
    let withdrawn = g
        .events_of_kinds_since(&["peer_withdrawn", "route_withdrawn"], since)
        .len();
    eprintln!(
        "gossip-bench: {loss_for:?} at 5% loss: {failed} member_failed, {withdrawn} withdrawals"
    );

    let figures = vec![
        Figure::new(
            "gossip.real.join_ms",
            &format!("Join convergence: a new stack's router started on one host → first ping answered from a service on another host ({N} hosts)"),
            "ms",
            Samples(join_ms.clone()),
        )
        .with_target(Target::AtMost(1000.0)),
        Figure::new(
            "gossip.real.failure_detection_ms",
            &format!("Failure detection: a host's underlay link taken down → its stack withdrawn on all {} others", N - 1),
            "ms",
            Samples(detect_ms.clone()),
        )
        .with_target(Target::AtMost(3000.0)),
        Figure::new(
            "gossip.real.failure_detection_p99_ms",
            &format!("Failure detection, p99 (nearest rank) of the {} cuts", detect_ms.len()),
            "ms",
            Samples(vec![percentile(detect_ms.clone(), 0.99)]),
        )
        .with_target(Target::AtMost(5000.0)),
        Figure::new(
            "gossip.real.loss5.member_failed",
            &format!("False failures: `member_failed` events in {} s at 5 % loss on every underlay", loss_for.as_secs()),
            "events",
            Samples(vec![failed as f64]),
        )
        .with_target(Target::AtMost(0.0)),
        Figure::new(
            "gossip.real.loss5.withdrawals",
            &format!("False failures: stack or route withdrawals in {} s at 5 % loss", loss_for.as_secs()),
            "events",
            Samples(vec![withdrawn as f64]),
        )
        .with_target(Target::AtMost(0.0)),
        Figure::new(
            "gossip.real.idle_kbit_per_node",
            &format!("Gossip traffic sent per node, idle ({} s window, UDP payload + 28 bytes IP/UDP per datagram; one sample per node)", window.as_secs()),
            "kbit/s",
            Samples(idle_kbit.clone()),
        ),
        Figure::new(
            "gossip.real.mesh_converged_ms",
            "Whole mesh from the routers' start to every host routing every stack",
            "ms",
            Samples(vec![mesh_time.as_secs_f64() * 1000.0]),
        ),
    ];
    Ok((
        figures,
        json!({
            "hosts": N,
            "quick": quick,
            "params": "vrouter_gossip::Params::default()",
            "mesh_converged_ms": mesh_time.as_millis() as u64,
            "idle_traffic_kbit_s_per_node": { "mean": idle_mean, "max": idle_max, "window_s": window.as_secs() },
            "join_convergence_ms": { "samples": join_ms.clone(), "p50": percentile(join_ms.clone(), 0.5), "max": percentile(join_ms, 1.0) },
            "failure_detection_ms": { "samples": detect_ms.clone(), "p50": percentile(detect_ms.clone(), 0.5), "p99": percentile(detect_ms, 0.99) },
            "loss5": { "seconds": loss_for.as_secs(), "member_failed": failed, "withdrawals": withdrawn },
            "wall_s": started.elapsed().as_secs(),
        }),
    ))
}
