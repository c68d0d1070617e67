//! `make bench`: side-by-side measurements in one run on simulated hosts, reported as
//! ratios because these machines are noisy. Each path is measured `ROUNDS` times,
//! interleaved, and the median is reported.
//!
//! - Single-stream TCP throughput: underlay host to host (no VXLAN, no firewall in the path's
//!   forward chain) vs service to service across hosts through docker-vrouter, vs two
//!   stacks on one host through sibling macvlans.
//! - Control plane: time for a fresh two-host mesh to converge, and for a router restarted
//!   in a fresh namespace to get its routes back.

use std::time::{Duration, Instant};
use vrouter_tests::mesh::{Mesh, StackDef};
use vrouter_tests::{exec_timeout, probe_bin, spawn_in, wait_until};

const ROUNDS: usize = 5;
const BYTES: usize = 1024 * 1024 * 1024;

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("vrt-bench: needs root (network namespaces)");
        std::process::exit(1);
    }
    if let Err(e) = bench() {
        eprintln!("vrt-bench: {e:#}");
        std::process::exit(1);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One single-stream TCP transfer into a sink; returns Mbit/s.
fn transfer(
    mesh: &Mesh,
    from_ns: &str,
    to_ns: &str,
    to_ip: &str,
    port: u16,
) -> anyhow::Result<f64> {
    let addr = format!("{to_ip}:{port}");
    let dir = mesh.topo.log_dir();
    let out = dir.join(format!("sink-{port}"));
    let ready = dir.join(format!("sink-{port}.ready"));
    let probe = probe_bin()?.display().to_string();
    let mut sink = spawn_in(
        to_ns,
        dir,
        &probe,
        &["tcp-sink", &addr, out.to_str().unwrap(), "60"],
        &[],
    )?;
    if !wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        ready.exists()
    }) {
        anyhow::bail!("tcp-sink did not start\n{}", sink.logs());
    }
    let line = exec_timeout(
        Some(from_ns),
        &[&probe, "tcp-blast", &addr, &BYTES.to_string(), "120"],
        Duration::from_secs(150),
    )?
    .check()?
    .stdout;
    sink.wait_success(Duration::from_secs(10))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("mbit_s="))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("unexpected tcp-blast output: {line}"))
}

fn bench() -> anyhow::Result<()> {
    let t = Instant::now();
    let mut mesh = Mesh::start(
        "bench",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24").unprotected(),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("c", 1, 1000, "10.3.0.0/24").unprotected(),
        ],
    )?;
    mesh.wait_converged(Duration::from_secs(30))?;
    let converge = t.elapsed();

    let h1 = mesh.topo.host(1).ns.clone();
    let h2 = mesh.topo.host(2).ns.clone();
    let (a, b, c) = (mesh.svc("a"), mesh.svc("b"), mesh.svc("c"));
    let mut underlay = Vec::new();
    let mut overlay = Vec::new();
    let mut same_host = Vec::new();
    let mut port = 6000;
    for _ in 0..ROUNDS {
        port += 3;
        underlay.push(transfer(&mesh, &h1, &h2, "198.18.0.2", port)?);
        overlay.push(transfer(&mesh, &a.ns, &b.ns, &b.ip.to_string(), port + 1)?);
        same_host.push(transfer(&mesh, &a.ns, &c.ns, &c.ip.to_string(), port + 2)?);
    }
    let (u, o, s) = (
        median(underlay.clone()),
        median(overlay.clone()),
        median(same_host.clone()),
    );

    let t = Instant::now();
    mesh.restart_router_fresh_ns("a")?;
    let restarted = Instant::now();
    if !mesh.wait_router_routes("a", &["b", "c"], Duration::from_secs(10)) {
        anyhow::bail!("router a did not get its routes back");
    }
    let reattach = restarted.elapsed();
    let restart_total = t.elapsed();

    println!(
        "docker-vrouter benchmark ({ROUNDS} interleaved rounds, median; one TCP stream of {} MiB into a sink)",
        BYTES >> 20
    );
    println!("machine: {} cores, kernel {}", num_cpus(), kernel());
    println!("{:<44} {:>10} {:>8}", "path", "Mbit/s", "ratio");
    println!(
        "{:<44} {:>10.0} {:>8.2}",
        "underlay, host to host (baseline)", u, 1.0
    );
    println!(
        "{:<44} {:>10.0} {:>8.2}",
        "service to service across hosts (VXLAN)",
        o,
        o / u
    );
    println!(
        "{:<44} {:>10.0} {:>8.2}",
        "service to service on one host (macvlan)",
        s,
        s / u
    );
    println!("rounds: underlay {underlay:.0?}, overlay {overlay:.0?}, same-host {same_host:.0?}");
    println!("two-host mesh start to converged: {converge:.2?}");
    println!("router restart in a fresh namespace: routes back {reattach:.2?} after the new process started ({restart_total:.2?} including the namespace rebuild)");
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}
