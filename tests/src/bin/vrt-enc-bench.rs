//! `make bench`, encryption part (issue 16): the plain overlay and the encrypted overlay
//! (`VROUTER_ENCRYPTION=require`, userspace WireGuard inside discovery) side by side in
//! one run, on real daemons and simulated hosts, and where the userspace path spends
//! its CPU.
//!
//! Six hosts in three gossip meshes of two (each host's second joins its first; the
//! meshes never meet), one stack per host, port steering (the default):
//! - `plain`: stack a (host 1) -> stack b (host 2), VNI 1000, `VROUTER_ENCRYPTION=off`;
//! - `wg`: stack c (host 3) -> stack d (host 4), VNI 1001, `require` with the userspace
//!   backend (this kernel has no WireGuard), UDP GSO/GRO on (the default);
//! - `wg_nooffload`: stack e (host 5) -> stack f (host 6), VNI 1002, the same with the
//!   engine's benchmark knob `VROUTER_WG_UDP_OFFLOAD=off` (one send/receive per
//!   datagram), so what the offload changes is measured.
//!
//! Every path carries the MSS its overlay gives TCP (port steering clamps SYNs to the
//! overlay MTU - 40: 1410 plain, 1330 encrypted on a 1500-byte underlay), so the
//! encrypted figures include the smaller segments, as users get them.
//!
//! Per path and round: single-stream and 4-stream TCP (iperf3, Mbit/s received), ping
//! RTT (average of 20, ms) and TCP request/response round trip (median of 2,000 1-byte
//! exchanges, µs). Rounds are interleaved, the path order rotated per round; ratios are
//! taken per round and their median reported. The goal for the userspace path:
//! `wg` / `plain` single-stream throughput at least 0.3.
//!
//! Then the CPU: one single-stream transfer per path with the CPU time of each
//! discovery thread (sender and receiver host) and of the machine read from /proc
//! over the middle of the transfer; and one on `wg` under `perf record -g` (software
//! cpu-clock event) on both discoveries, its samples sorted into crypto, engine,
//! libc, TUN, UDP, in-context packet processing and waiting (`vrouter_tests::cpuprof`).
//! For symbols, run it with a discovery that keeps its symbol table
//! (`--discovery-bin target/release-sym/vrouter-discovery`: the release profile
//! without `strip`, the same code).
//!
//! Writes `target/bench/encryption.json` (see `vrouter_tests::bench`) and prints a
//! table. Usage: `vrt-enc-bench [--out PATH] [--rounds N] [--secs S] [--cpu-secs S]
//! [--quick] [--no-perf] [--discovery-bin PATH]` (needs root; set
//! `VROUTER_TEST_PREFIX` when other tests run beside it).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use vrouter_tests::bench::{write_results, Figure, Samples, Target};
use vrouter_tests::cpuprof;
use vrouter_tests::datapath::{
    iperf, measure_round, print_ratios, Condition, PathDef, PathSamples, RoundSpec,
};
use vrouter_tests::gossip::OLD_SECRET;
use vrouter_tests::interrupt::{self, check_stop};
use vrouter_tests::mesh::{Mesh, StackDef};
use vrouter_tests::{exec_timeout, wait_until};

/// Pings per RTT sample, 50 ms apart.
const PINGS: u32 = 20;
/// 1-byte exchanges per TCP request/response sample.
const RR_ITERATIONS: u32 = 2000;
/// The goal: encrypted (userspace) / plain single-stream throughput.
const USERSPACE_TARGET: f64 = 0.3;
/// IPv4 + TCP headers: MSS = MTU - 40.
const TCP_IP_HEADERS: u32 = 40;
/// perf's sampling frequency (Hz) on each discovery.
const PERF_HZ: u32 = 999;
/// Leaf symbols listed in the breakdown.
const TOP_SYMBOLS: usize = 20;

/// One measured path and the hosts under it.
struct Group {
    name: &'static str,
    label: &'static str,
    sender: (usize, &'static str, &'static str),
    receiver: (usize, &'static str, &'static str),
    vni: u32,
    mode: &'static str,
    /// `VROUTER_WG_UDP_OFFLOAD` of both discoveries, when set.
    offload: Option<&'static str>,
}

const GROUPS: [Group; 3] = [
    Group {
        name: "plain",
        label: "service to service over the plain overlay (VROUTER_ENCRYPTION=off)",
        sender: (1, "a", "10.1.0.0/24"),
        receiver: (2, "b", "10.2.0.0/24"),
        vni: 1000,
        mode: "off",
        offload: None,
    },
    Group {
        name: "wg",
        label: "service to service over the encrypted overlay (require, userspace WireGuard, UDP GSO/GRO on)",
        sender: (3, "c", "10.3.0.0/24"),
        receiver: (4, "d", "10.4.0.0/24"),
        vni: 1001,
        mode: "require",
        offload: None,
    },
    Group {
        name: "wg_nooffload",
        label: "service to service over the encrypted overlay (require, userspace WireGuard, VROUTER_WG_UDP_OFFLOAD=off)",
        sender: (5, "e", "10.5.0.0/24"),
        receiver: (6, "f", "10.6.0.0/24"),
        vni: 1002,
        mode: "require",
        offload: Some("off"),
    },
];

struct Args {
    out: PathBuf,
    rounds: usize,
    secs: u32,
    cpu_secs: u32,
    perf: bool,
    discovery_bin: Option<PathBuf>,
}

fn usage() -> ! {
    eprintln!(
        "usage: vrt-enc-bench [--out PATH] [--rounds N (1..=50)] [--secs S (1..=60)] [--cpu-secs S (4..=60)] [--quick] [--no-perf] [--discovery-bin PATH]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        out: PathBuf::from("target/bench/encryption.json"),
        rounds: 7,
        secs: 5,
        cpu_secs: 10,
        perf: true,
        discovery_bin: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |what: &str| {
            it.next().unwrap_or_else(|| {
                eprintln!("vrt-enc-bench: {what} needs a value");
                usage()
            })
        };
        match arg.as_str() {
            "--out" => a.out = PathBuf::from(val("--out")),
            "--rounds" => a.rounds = val("--rounds").parse().unwrap_or_else(|_| usage()),
            "--secs" => a.secs = val("--secs").parse().unwrap_or_else(|_| usage()),
            "--cpu-secs" => a.cpu_secs = val("--cpu-secs").parse().unwrap_or_else(|_| usage()),
            "--quick" => {
                a.rounds = 1;
                a.secs = 2;
                a.cpu_secs = 5;
            }
            "--no-perf" => a.perf = false,
            "--discovery-bin" => a.discovery_bin = Some(PathBuf::from(val("--discovery-bin"))),
            "-h" | "--help" => usage(),
            other => {
                eprintln!("vrt-enc-bench: unknown argument {other}");
                usage()
            }
        }
    }
    if !(1..=50).contains(&a.rounds)
        || !(1..=60).contains(&a.secs)
        || !(4..=60).contains(&a.cpu_secs)
    {
        usage()
    }
    a
}

fn main() {
    let args = parse_args();
    interrupt::main_as_root("vrt-enc-bench", || run(&args));
}

/// The bench's world: the mesh and, per group, its path and MSS.
struct World {
    mesh: Mesh,
    paths: Vec<(PathDef, u32)>,
    /// Per group: discovery.json's `encryption` section of the sender host.
    encryption: BTreeMap<&'static str, Value>,
    /// Per group: the overlay MTU discovery reports.
    mtu: BTreeMap<&'static str, u32>,
}

fn discovery_json(mesh: &Mesh, host: usize) -> Value {
    std::fs::read(mesh.state_dir(host).join("discovery.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// A directory whose `vrouter-discovery` is `bin` and whose other daemons are the
/// usual ones; the mesh runs its binaries from there.
fn bin_dir_with_discovery(bin: &std::path::Path) -> Result<PathBuf> {
    let bin = std::fs::canonicalize(bin).with_context(|| format!("{}", bin.display()))?;
    let usual = vrouter_tests::mesh::bin_dir()?;
    let dir = PathBuf::from(format!("/run/{}-enc-bench-bin", vrouter_tests::prefix()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::os::unix::fs::symlink(&bin, dir.join("vrouter-discovery"))?;
    let router = std::fs::canonicalize(usual.join("vrouter-router"))?;
    std::os::unix::fs::symlink(router, dir.join("vrouter-router"))?;
    Ok(dir)
}

/// Removes its directory when dropped (the symlinks of `--discovery-bin`).
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn build() -> Result<World> {
    let mut stacks = Vec::new();
    for g in &GROUPS {
        for (host, name, cidr) in [g.sender, g.receiver] {
            stacks.push(StackDef::new(name, host, g.vni, cidr));
        }
    }
    let mut mesh = Mesh::build("bench-encryption", GROUPS.len() * 2, stacks)?;
    mesh.set_static_peers(false);
    for g in &GROUPS {
        let join = mesh.topo.host(g.sender.0).underlay_ip.to_string();
        for host in [g.sender.0, g.receiver.0] {
            mesh.set_discovery_env(host, "VROUTER_SECRET", OLD_SECRET);
            mesh.set_discovery_env(host, "VROUTER_ENCRYPTION", g.mode);
            if g.mode != "off" {
                mesh.set_discovery_env(host, "VROUTER_WG_BACKEND", "userspace");
            }
            if let Some(o) = g.offload {
                mesh.set_discovery_env(host, "VROUTER_WG_UDP_OFFLOAD", o);
            }
            if host == g.receiver.0 {
                mesh.set_discovery_env(host, "VROUTER_JOIN", &join);
            }
        }
    }
    mesh.start_all()?;
    mesh.wait_converged(Duration::from_secs(60))?;

    let mut paths = Vec::new();
    let mut encryption = BTreeMap::new();
    let mut mtu = BTreeMap::new();
    for g in &GROUPS {
        // Each encrypted group's peer must be encrypted, through the userspace engine.
        let mut doc = Value::Null;
        let ok = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
            doc = discovery_json(&mesh, g.sender.0);
            let e = &doc["encryption"];
            let peer_state = e["peers"][0]["state"].as_str().unwrap_or("");
            doc["host"]["overlay_mtu"].as_u64().is_some()
                && if g.mode == "off" {
                    e.is_null() || e["mode"] == "off"
                } else {
                    e["backend"] == "userspace" && peer_state == "encrypted"
                }
        });
        if !ok {
            mesh.dump_logs();
            bail!(
                "path {}: host {} does not report the expected encryption state: {}",
                g.name,
                g.sender.0,
                doc["encryption"]
            );
        }
        let m = doc["host"]["overlay_mtu"].as_u64().unwrap_or(0) as u32;
        if m <= TCP_IP_HEADERS + 500 {
            bail!("path {}: overlay MTU {m} is too small to benchmark", g.name);
        }
        mtu.insert(g.name, m);
        encryption.insert(g.name, doc["encryption"].clone());
        let (from, to) = (mesh.svc(g.sender.1), mesh.svc(g.receiver.1));
        let def = PathDef {
            name: g.name,
            label: g.label,
            from_ns: from.ns.clone(),
            from_ip: from.ip,
            to_ns: to.ns.clone(),
            to_ip: to.ip,
            condition: Condition::Plain,
        };
        let ok = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
            vrouter_tests::ping(
                &def.from_ns,
                &def.to_ip.to_string(),
                1,
                Duration::from_secs(1),
            )
        });
        if !ok {
            mesh.dump_logs();
            bail!(
                "path {} ({} -> {}) does not answer a ping",
                g.name,
                def.from_ns,
                def.to_ip
            );
        }
        paths.push((def, m - TCP_IP_HEADERS));
    }
    Ok(World {
        mesh,
        paths,
        encryption,
        mtu,
    })
}

/// The two discoveries under a group: (label, pid).
fn discoveries(w: &mut World, g: &Group) -> Vec<(String, u32)> {
    vec![
        ("sender".to_string(), w.mesh.discovery(g.sender.0).pid()),
        ("receiver".to_string(), w.mesh.discovery(g.receiver.0).pid()),
    ]
}

/// One single-stream transfer of `secs` on group `g`'s path while `during` runs on
/// another thread (it starts 1 s into the transfer and should end 1 s before it).
fn transfer_with<T: Send + 'static>(
    w: &World,
    p: &PathDef,
    mss: u32,
    secs: u32,
    port: u16,
    during: impl FnOnce() -> T + Send + 'static,
) -> Result<(f64, T)> {
    let side = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        during()
    });
    let dir = w.mesh.topo.log_dir().to_path_buf();
    let mbit = iperf(&dir, p, port, secs, 1, mss);
    let t = side
        .join()
        .map_err(|_| anyhow::anyhow!("measuring thread panicked"))?;
    Ok((mbit?, t))
}

/// CPU of both discoveries' threads and of the machine over the middle of a
/// single-stream transfer, per path.
fn cpu_accounting(w: &mut World, secs: u32, port: &mut u16) -> Result<Value> {
    let mut out = Vec::new();
    for g in &GROUPS {
        check_stop()?;
        let procs = discoveries(w, g);
        let (p, mss) = w
            .paths
            .iter()
            .find(|(p, _)| p.name == g.name)
            .cloned()
            .context("path")?;
        *port += 1;
        let window_secs = u64::from(secs.saturating_sub(2).max(1));
        let (mbit, win) = transfer_with(w, &p, mss, secs, *port, move || {
            let a = cpuprof::snapshot(&procs);
            std::thread::sleep(Duration::from_secs(window_secs));
            let b = cpuprof::snapshot(&procs);
            cpuprof::window(&a, &b)
        })?;
        let disc_cpu = win.process_cpu("sender") + win.process_cpu("receiver");
        // Gbit carried in the window at the transfer's rate.
        let gbit = mbit / 1000.0 * win.secs;
        eprintln!(
            "  cpu {:<13} tcp1 {:>6.0} Mbit/s  discoveries {:.2} CPU  machine busy {:.0}%",
            g.name,
            mbit,
            disc_cpu / win.secs,
            win.machine_busy * 100.0
        );
        let mut v = win.to_json();
        v["path"] = json!(g.name);
        v["tcp1_mbit"] = json!((mbit * 10.0).round() / 10.0);
        v["discovery_cpu_of_one_cpu"] = json!(((disc_cpu / win.secs) * 1000.0).round() / 1000.0);
        v["discovery_cpu_s_per_gbit"] = json!(if gbit > 0.0 {
            ((disc_cpu / gbit) * 1000.0).round() / 1000.0
        } else {
            f64::NAN
        });
        out.push(v);
    }
    Ok(Value::Array(out))
}

/// `perf record -g` on both discoveries of the `wg` path during a single-stream
/// transfer; the samples sorted by category, thread and leaf symbol.
fn perf_profile(w: &mut World, secs: u32, port: &mut u16) -> Result<Value> {
    cpuprof::perf_available()?;
    let g = &GROUPS[1];
    let procs = discoveries(w, g);
    let (p, mss) = w
        .paths
        .iter()
        .find(|(p, _)| p.name == g.name)
        .cloned()
        .context("path")?;
    let dir = w.mesh.topo.log_dir().to_path_buf();
    let files: Vec<(String, u32, PathBuf)> = procs
        .iter()
        .map(|(l, pid)| (l.clone(), *pid, dir.join(format!("perf-{l}.data"))))
        .collect();
    let record_secs = secs.saturating_sub(2).max(1);
    let files2 = files.clone();
    *port += 1;
    let (mbit, results) = transfer_with(w, &p, mss, secs, *port, move || {
        let runs: Vec<_> = files2
            .iter()
            .map(|(_, pid, file)| {
                let (pid, file) = (pid.to_string(), file.display().to_string());
                let hz = PERF_HZ.to_string();
                let s = record_secs.to_string();
                std::thread::spawn(move || {
                    exec_timeout(
                        None,
                        &[
                            "perf",
                            "record",
                            "-q",
                            "-e",
                            "cpu-clock",
                            "-F",
                            &hz,
                            "-g",
                            "-p",
                            &pid,
                            "-o",
                            &file,
                            "--",
                            "sleep",
                            &s,
                        ],
                        Duration::from_secs(u64::from(record_secs) + 30),
                    )
                })
            })
            .collect();
        runs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("perf thread panicked"))
                    .and_then(|r| r)
            })
            .collect::<Vec<_>>()
    })?;
    for r in &results {
        match r {
            Ok(o) if o.code == Some(0) => {}
            Ok(o) => bail!("perf record failed: {}", o.stderr.trim()),
            Err(e) => bail!("perf record: {e:#}"),
        }
    }
    let mut all = Vec::new();
    let mut per_process = serde_json::Map::new();
    for (label, _, file) in &files {
        let out = exec_timeout(
            None,
            &[
                "perf",
                "script",
                "-i",
                &file.display().to_string(),
                "-F",
                "comm,tid,ip,sym,dso",
            ],
            Duration::from_secs(120),
        )?;
        if out.code != Some(0) {
            bail!("perf script failed: {}", out.stderr.trim());
        }
        let samples = cpuprof::parse_perf_script(&out.stdout);
        per_process.insert(label.clone(), cpuprof::breakdown(&samples, TOP_SYMBOLS));
        all.extend(samples);
        let _ = std::fs::remove_file(file);
    }
    let both = cpuprof::breakdown(&all, TOP_SYMBOLS);
    eprintln!("  perf on wg: tcp1 {mbit:.0} Mbit/s, {} samples", all.len());
    for c in both["by_category"].as_array().into_iter().flatten() {
        eprintln!(
            "    {:>5.1}%  {}",
            c["share"].as_f64().unwrap_or(0.0) * 100.0,
            c["category"].as_str().unwrap_or("")
        );
    }
    Ok(json!({
        "path": g.name,
        "tcp1_mbit_during_perf": (mbit * 10.0).round() / 10.0,
        "method": format!("perf record -e cpu-clock -F {PERF_HZ} -g -p <discovery pid> for {record_secs} s on each of the two discoveries (sender host, receiver host) during a {secs} s single-stream iperf3 on the wg path; perf script -F comm,tid,ip,sym,dso; a sample's category: a userspace leaf by its symbol and object, a kernel leaf by the first frame from the leaf up that names one (tests/src/cpuprof.rs). This VM has no hardware counters, so perf samples on the cpu-clock timer: time spent with interrupts off is charged where they are turned back on (finish_task_switch, _raw_spin_unlock_irqrestore), which inflates the poll/scheduling and kernel-other shares"),
        "both": both,
        "per_process": per_process,
    }))
}

/// Whether this kernel can make a WireGuard link (in host 1's namespace, removed again).
fn kernel_wireguard(w: &World) -> Value {
    let ns = w.mesh.topo.host(1).ns.clone();
    let name = "wgkprobe0";
    let out = exec_timeout(
        Some(&ns),
        &["ip", "link", "add", name, "type", "wireguard"],
        Duration::from_secs(10),
    );
    match out {
        Ok(o) if o.code == Some(0) => {
            let _ = exec_timeout(
                Some(&ns),
                &["ip", "link", "del", name],
                Duration::from_secs(10),
            );
            json!({"available": true, "detail": "ip link add type wireguard works on this kernel"})
        }
        Ok(o) => {
            json!({"available": false, "detail": format!("ip link add type wireguard: {}", o.stderr.trim())})
        }
        Err(e) => json!({"available": false, "detail": format!("{e:#}")}),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn run(args: &Args) -> Result<()> {
    let command = std::iter::once("vrt-enc-bench".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let load_before = loadavg();
    let mut _bin_dir_guard = None;
    let discovery_bin = match &args.discovery_bin {
        Some(b) => {
            let dir = bin_dir_with_discovery(b)?;
            std::env::set_var("VROUTER_BIN_DIR", &dir);
            _bin_dir_guard = Some(RemoveDir(dir));
            b.display().to_string()
        }
        None => vrouter_tests::mesh::bin_dir()?
            .join("vrouter-discovery")
            .display()
            .to_string(),
    };
    let t = Instant::now();
    let mut w = build()?;
    eprintln!(
        "vrt-enc-bench: topology up in {:.1?} (overlay MTU plain {}, encrypted {}); {} rounds of {} s runs; load {load_before}",
        t.elapsed(),
        w.mtu["plain"],
        w.mtu["wg"],
        args.rounds,
        args.secs
    );
    let mut samples: BTreeMap<&'static str, PathSamples> = BTreeMap::new();
    let mut order_log = Vec::new();
    let mut port: u16 = 5300;
    for round in 0..args.rounds {
        eprintln!("round {}/{}", round + 1, args.rounds);
        let mut order = w.paths.clone();
        let n = order.len();
        order.rotate_left(round % n);
        let mut measured = Vec::new();
        for (p, mss) in &order {
            measure_round(
                w.mesh.topo.log_dir(),
                p,
                RoundSpec {
                    secs: args.secs,
                    mss: *mss,
                    pings: PINGS,
                    rr_iterations: RR_ITERATIONS,
                },
                &mut port,
                samples.entry(p.name).or_default(),
                &check_stop,
            )?;
            measured.push(p.name);
        }
        order_log.push(measured);
    }
    eprintln!("cpu accounting ({} s transfers)", args.cpu_secs);
    let cpu = cpu_accounting(&mut w, args.cpu_secs, &mut port)?;
    let perf = if args.perf {
        match perf_profile(&mut w, args.cpu_secs, &mut port) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("vrt-enc-bench: no perf profile: {e:#}");
                json!({"error": format!("{e:#}")})
            }
        }
    } else {
        json!({"error": "not run (--no-perf)"})
    };
    let kernel = kernel_wireguard(&w);
    let load_after = loadavg();

    let figures = figures(&w, &samples);
    print_table(args, &w, &figures);
    let has_symbols = perf["both"]["by_category"]
        .as_array()
        .map(|cats| {
            cats.iter().any(|c| {
                c["category"] == cpuprof::CAT_CRYPTO || c["category"] == cpuprof::CAT_ENGINE
            })
        })
        .unwrap_or(false);
    let extra = json!({
        "rounds": args.rounds,
        "secs_per_iperf_run": args.secs,
        "pings_per_sample": PINGS,
        "tcp_rr_iterations": RR_ITERATIONS,
        "round_order": order_log,
        "paths": w.paths.iter().map(|(p, mss)| json!({
            "name": p.name,
            "label": p.label,
            "from_ns": p.from_ns,
            "from_ip": p.from_ip.to_string(),
            "to_ns": p.to_ns,
            "to_ip": p.to_ip.to_string(),
            "overlay_mtu": w.mtu.get(p.name),
            "tcp_mss": mss,
            "encryption": w.encryption.get(p.name),
        })).collect::<Vec<_>>(),
        "target": {
            "key": "encryption.ratio.wg_plain.tcp1",
            "at_least": USERSPACE_TARGET,
            "what": "issue 16: the userspace path's single-stream throughput at least 0.3 of the plain overlay's on this 2-vCPU machine",
        },
        "kernel_wireguard": {
            "measured": false,
            "this_kernel": kernel,
            "expected": "Not measured: this kernel has no WireGuard module, so discovery falls back to the userspace engine. Kernel WireGuard encrypts in the kernel (no TUN copies, no system call per packet batch, encryption spread over all CPUs), so it is expected to be faster than the userspace path here; we have no figure for this veth setup and give none.",
            "sources": [
                {"url": "https://www.wireguard.com/performance/", "says": "kernel WireGuard (Linux 4.6.1, i7 laptops, gigabit Ethernet, iperf3) at gigabit line rate, ahead of IPsec and far ahead of OpenVPN; the page itself calls these benchmarks old and not well conducted"},
                {"url": "https://tailscale.com/blog/more-throughput", "says": "a userspace WireGuard (wireguard-go) with TUN offloads plus UDP GSO/GRO passed kernel WireGuard on their bare-metal hardware (over 10 Gbit/s): batching, not the kernel, decides most of the gap"},
            ],
        },
        "knobs": {
            "VROUTER_WG_UDP_OFFLOAD": "hidden engine setting for this bench: off = one sendmsg/recvmsg per datagram (no UDP_SEGMENT, no UDP_GRO); measured as the wg_nooffload path",
            "threads": "not a setting: the engine runs one thread per direction (wg-tun-rx: TUN read, encrypt, UDP send; wg-udp-rx: UDP receive, decrypt, TUN write) and a timer thread; docs/ARCHITECTURE.md (vrouter-wg) records that two threads per direction changed nothing measurable (one Tunn per peer serialises a peer's packets); the per-thread CPU below shows how close each thread is to a full CPU",
            "tun_offload": "not implemented, so not measured: what crosses the TUN device is VXLAN-in-UDP, whose GSO type a TUN accepts only with the virtio UDP-tunnel offload (Linux 6.17+), see docs/ARCHITECTURE.md (vrouter-wg). So every packet crosses the TUN device at the overlay MTU, one read or write each, and the receiving kernel runs VXLAN, bridge and TCP once per 1370-byte packet, where the plain overlay on this veth underlay carries GSO super-packets end to end",
        },
        "cpu": cpu,
        "breakdown": perf,
        "discovery_binary": discovery_bin,
        "discovery_binary_has_symbols": has_symbols,
        "machine_notes": {
            "load_before": load_before,
            "load_after": load_after,
            "note": "1, 5 and 15-minute load averages from /proc/loadavg when the run started and ended; the machine is shared, so a load above ~1 means other work ran beside the bench",
        },
        "method": "iperf3 -c <to_ip> -t <secs> -P <1|4> -M <overlay MTU - 40> -J from the sender service namespace against iperf3 -s -1 in the receiver's, end.sum_received.bits_per_second; ping -c 20 -i 0.05 average; vrt-probe tcp-rr median of 2000 1-byte exchanges; rounds interleaved, path order rotated per round; ratios per round, median reported. CPU: utime+stime of every discovery thread from /proc/<pid>/task/*/stat and the machine's busy share from /proc/stat over the middle (secs - 2) of a single-stream transfer per path",
    });
    write_results(&args.out, "encryption", &command, &figures, extra)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

fn figures(w: &World, samples: &BTreeMap<&'static str, PathSamples>) -> Vec<Figure> {
    let get = |p: &str, k: &str| {
        samples
            .get(p)
            .and_then(|s| s.get(k))
            .cloned()
            .unwrap_or_default()
    };
    let mut figs = Vec::new();
    for (p, _) in &w.paths {
        for (k, what, unit) in [
            ("tcp1", "single-stream TCP", "Mbit/s"),
            ("tcp4", "4-stream TCP", "Mbit/s"),
            ("ping", "ping RTT", "ms"),
            ("tcp_rr", "TCP request/response RTT", "us"),
        ] {
            figs.push(Figure::new(
                &format!("encryption.{}.{k}", p.name),
                &format!("{what}, {}", p.label),
                unit,
                get(p.name, k),
            ));
        }
    }
    figs.extend(ratio_figures(samples));
    figs
}

/// `of` / `to` on `metric`, per round; the goal on wg / plain single-stream.
fn ratio_figures(samples: &BTreeMap<&'static str, PathSamples>) -> Vec<Figure> {
    let get = |p: &str, k: &str| {
        samples
            .get(p)
            .and_then(|s| s.get(k))
            .cloned()
            .unwrap_or_default()
    };
    let mut figs = Vec::new();
    for (of, to) in [
        ("wg", "plain"),
        ("wg_nooffload", "plain"),
        ("wg", "wg_nooffload"),
    ] {
        if !samples.contains_key(of) || !samples.contains_key(to) {
            continue;
        }
        for (metric, what) in [
            ("tcp1", "single-stream TCP"),
            ("tcp4", "4-stream TCP"),
            ("ping", "ping RTT"),
            ("tcp_rr", "TCP request/response RTT"),
        ] {
            let (x, y) = (get(of, metric), get(to, metric));
            let f = Figure::new(
                &format!("encryption.ratio.{of}_{to}.{metric}"),
                &format!("{what}, {of} / {to} (per round)"),
                "ratio",
                Samples(x.0.iter().zip(&y.0).map(|(x, y)| x / y).collect()),
            );
            figs.push(if (of, to, metric) == ("wg", "plain", "tcp1") {
                f.with_target(Target::AtLeast(USERSPACE_TARGET))
            } else {
                f
            });
        }
    }
    figs
}

fn print_table(args: &Args, w: &World, figs: &[Figure]) {
    let med = |k: &str| {
        figs.iter()
            .find(|f| f.key == k)
            .map(|f| f.samples.median())
            .unwrap_or(f64::NAN)
    };
    println!(
        "\ndocker-vrouter encrypted overlay ({} interleaved rounds, median; iperf3 {} s runs)",
        args.rounds, args.secs
    );
    println!(
        "{:<13} {:>5} {:>10} {:>10} {:>9} {:>10}",
        "path", "MSS", "tcp1 Mb/s", "tcp4 Mb/s", "ping ms", "tcp_rr us"
    );
    for (p, mss) in &w.paths {
        let k = |m: &str| format!("encryption.{}.{m}", p.name);
        println!(
            "{:<13} {:>5} {:>10.0} {:>10.0} {:>9.3} {:>10.1}",
            p.name,
            mss,
            med(&k("tcp1")),
            med(&k("tcp4")),
            med(&k("ping")),
            med(&k("tcp_rr"))
        );
    }
    print_ratios(figs, "encryption.ratio.", 40);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The goal sits on wg / plain single-stream only, and ratios are per round.
    #[test]
    fn target_on_the_single_stream_ratio_per_round() {
        let mut all: BTreeMap<&'static str, PathSamples> = BTreeMap::new();
        for (p, v) in [
            ("plain", [1000.0, 2000.0]),
            ("wg", [300.0, 500.0]),
            ("wg_nooffload", [150.0, 250.0]),
        ] {
            let s = all.entry(p).or_default();
            for k in ["tcp1", "tcp4", "ping", "tcp_rr"] {
                s.insert(k, Samples(v.to_vec()));
            }
        }
        let figs = ratio_figures(&all);
        assert_eq!(figs.len(), 12);
        let targeted: Vec<&Figure> = figs.iter().filter(|f| f.target.is_some()).collect();
        assert_eq!(targeted.len(), 1);
        assert_eq!(targeted[0].key, "encryption.ratio.wg_plain.tcp1");
        assert_eq!(targeted[0].target, Some(Target::AtLeast(0.3)));
        assert_eq!(targeted[0].samples, Samples(vec![0.3, 0.25]));
        assert!(targeted[0].label.contains("wg / plain"));
        let off = figs
            .iter()
            .find(|f| f.key == "encryption.ratio.wg_wg_nooffload.tcp1")
            .unwrap();
        assert_eq!(off.samples, Samples(vec![2.0, 2.0]));
        // A path missing: no ratio against it.
        all.remove("wg_nooffload");
        assert_eq!(ratio_figures(&all).len(), 4);
    }
}
