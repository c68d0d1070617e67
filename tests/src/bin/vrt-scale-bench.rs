//! `make bench-scale`: the real daemons at size, on simulated hosts (network namespaces
//! on a veth underlay, the Docker-28.2-like firewall, CAP_NET_ADMIN only).
//!
//! - part `one-host` (`--stacks N`, default 100): N stacks on host 1 and `--remote R`
//!   (default 3) on host 2, all on VNI 1000, joined by gossip. Measured: the time from
//!   the last router's start until every router's namespace holds a route to every other
//!   stack's prefix (netlink dumps), every pair of stacks across the hosts answering a
//!   ping, discovery's reconcile time (its `vrouter_reconcile_duration_seconds`
//!   histogram and `last_reconcile_ms` of /v1/status) and RSS, the kernel entries and
//!   state file sizes at that size, and the way of one more stack (its router started
//!   until every router routes to it).
//! - part `hosts` (`--hosts H --per-host K`, default 20 x 5): H hosts with K stacks
//!   each, gossip through host 1: the whole mesh's convergence, a new stack's join (its
//!   router started until a service on another host answers a ping from it), failure
//!   detection (a host's underlay link cut until its stacks are gone from every other
//!   host's routes.json), idle gossip traffic per node.
//!
//! ```text
//! VROUTER_TEST_PREFIX=vrtx target/release/vrt-scale-bench [--part one-host|hosts|all]
//!     [--stacks N] [--remote R] [--hosts H] [--per-host K] [--rounds N] [--out FILE]
//!     [--perf SECONDS]
//! ```
//! With `--out FILE` the figures are written as `scale.*` in the schema of
//! tests/src/bench.rs (for tests/bench-report.py), the printed object under `extra`.
//! `--perf S` records discovery on host 1 with `perf` for S seconds while one more stack
//! registers (the profile's breakdown goes under `extra.one_host.profile`).

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use vrouter_tests::bench::{write_results, Figure, Samples, Target};
use vrouter_tests::ctlbench::{cpu_time, status_kib, Netlink};
use vrouter_tests::gossip::{now_ms, GossipMesh};
use vrouter_tests::http::{http_get, metric};
use vrouter_tests::mesh::StackDef;
use vrouter_tests::probe::ping;
use vrouter_tests::wait_until;

const HTTP: &str = "127.0.0.1:9474";
const VNI: u32 = 1000;

struct Opts {
    part: String,
    stacks: usize,
    remote: usize,
    hosts: usize,
    per_host: usize,
    rounds: usize,
    out: Option<String>,
    perf: u64,
}

fn parse() -> Opts {
    let mut o = Opts {
        part: "all".into(),
        stacks: 100,
        remote: 3,
        hosts: 20,
        per_host: 5,
        rounds: 5,
        out: None,
        perf: 0,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let num = |i: usize| -> usize {
        args.get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| die(&format!("{} needs a number", args[i])))
    };
    while i < args.len() {
        match args[i].as_str() {
            "--part" => o.part = args.get(i + 1).cloned().unwrap_or_default(),
            "--stacks" => o.stacks = num(i),
            "--remote" => o.remote = num(i),
            "--hosts" => o.hosts = num(i),
            "--per-host" => o.per_host = num(i),
            "--rounds" => o.rounds = num(i),
            "--perf" => o.perf = num(i) as u64,
            "--out" => o.out = args.get(i + 1).cloned(),
            other => die(&format!("unknown argument {other:?}")),
        }
        i += 2;
    }
    if !["all", "one-host", "hosts"].contains(&o.part.as_str()) {
        die("--part is one-host, hosts or all");
    }
    o
}

fn die(msg: &str) -> ! {
    eprintln!("vrt-scale-bench: {msg}");
    std::process::exit(2)
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Stack `k` (0-based) of host `h`: its own /24 in 10.<100+h>.0.0/16 (h <= 150, k < 256).
fn stack_def(h: usize, k: usize, prefix: &str) -> StackDef {
    StackDef::new(
        leak(format!("{prefix}{h}x{k:03}")),
        h,
        VNI,
        leak(format!("10.{}.{}.0/24", 100 + h, k)),
    )
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    if s.is_empty() {
        return f64::NAN;
    }
    s[(s.len() - 1) / 2]
}

fn pctl(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

/// (VmRSS, VmHWM) of `pid` in MiB.
fn rss(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let f = |k| {
        status_kib(&s, k)
            .map(|v| v as f64 / 1024.0)
            .unwrap_or(f64::NAN)
    };
    (f("VmRSS"), f("VmHWM"))
}

/// The prefix of each stack's network, as a (network, length) key of the dumps.
fn key_of(s: &StackDef) -> (Ipv4Addr, u8) {
    let (a, l) = s.cidr.split_once('/').expect("cidr");
    (a.parse().expect("ip"), l.parse().expect("len"))
}

/// Routes of protocol 118 in a router namespace's dump that lead to one of `wanted`.
fn installed(nl: &mut Netlink, wanted: &HashSet<(Ipv4Addr, u8)>) -> Result<usize> {
    nl.installed(wanted)
}

/// Discovery's reconcile figures from host `h`'s /metrics and /v1/status.
fn reconcile_stats(g: &GossipMesh, h: usize) -> Value {
    let ns = g.topo.host(h).ns.clone();
    let m = http_get(&ns, HTTP, "/metrics")
        .map(|r| r.body)
        .unwrap_or_default();
    let st: Value = http_get(&ns, HTTP, "/v1/status")
        .ok()
        .and_then(|r| serde_json::from_str(&r.body).ok())
        .unwrap_or(Value::Null);
    json!({
        "count": metric(&m, "vrouter_reconcile_duration_seconds_count"),
        "sum_s": metric(&m, "vrouter_reconcile_duration_seconds_sum"),
        "last_reconcile_ms": find_key(&st, "last_reconcile_ms"),
        "reconciles": find_key(&st, "reconciles"),
    })
}

fn find_key(v: &Value, k: &str) -> Value {
    match v {
        Value::Object(m) => {
            if let Some(x) = m.get(k) {
                return x.clone();
            }
            m.values()
                .map(|x| find_key(x, k))
                .find(|x| !x.is_null())
                .unwrap_or(Value::Null)
        }
        _ => Value::Null,
    }
}

/// Mean reconcile time (ms) between two snapshots of [`reconcile_stats`].
fn mean_between(a: &Value, b: &Value) -> Option<f64> {
    let dc = b["count"].as_f64()? - a["count"].as_f64()?;
    let ds = b["sum_s"].as_f64()? - a["sum_s"].as_f64()?;
    (dc > 0.0).then(|| ds * 1000.0 / dc)
}

fn count_lines(g: &GossipMesh, h: usize, argv: &[&str], pred: impl Fn(&str) -> bool) -> usize {
    g.topo
        .host(h)
        .exec(argv)
        .map(|o| o.stdout.lines().filter(|l| pred(l)).count())
        .unwrap_or(0)
}

/// The 1-minute load average.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn file_size(p: std::path::PathBuf) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Kernel entries and state files on host `h`.
fn host_inventory(g: &GossipMesh, h: usize) -> Value {
    let routes118 = count_lines(
        g,
        h,
        &["ip", "-4", "route", "show", "table", "all", "proto", "118"],
        |_| true,
    );
    let rules = count_lines(g, h, &["ip", "-4", "rule", "show"], |l| {
        l.contains("iif") && !l.contains("fwmark")
    });
    let fdb = count_lines(
        g,
        h,
        &["bridge", "fdb", "show", "dev", &format!("vxlan{VNI}")],
        |l| l.contains(" dst "),
    );
    let nft = count_lines(g, h, &["nft", "list", "ruleset"], |_| true);
    let dir = g.state_dir(h);
    let mut files = BTreeMap::new();
    let mut total = 0u64;
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            total += len;
            let name = e.file_name().to_string_lossy().to_string();
            if !name.starts_with("probes") {
                files.insert(name, len);
            }
        }
    }
    let rows: usize = std::fs::read_to_string(dir.join("routes.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| {
            v["stacks"].as_object().map(|m| {
                m.values()
                    .map(|s| s["routes"].as_array().map_or(0, |a| a.len()))
                    .sum()
            })
        })
        .unwrap_or(0);
    json!({
        "routes_json_rows": rows,
        "host_routes_proto118": routes118,
        "host_rules_iif": rules,
        "fdb_rows_with_dst": fdb,
        "nft_ruleset_lines": nft,
        "discovery_json_bytes": file_size(dir.join("discovery.json")),
        "routes_json_bytes": file_size(dir.join("routes.json")),
        "state_dir_bytes": total,
        "state_files": files,
    })
}

/// Router-side kernel entries: proto-118 routes and neighbours of a router namespace.
fn router_inventory(ns: &str) -> (usize, usize) {
    let routes = vrouter_tests::exec(Some(ns), &["ip", "-4", "route", "show", "proto", "118"])
        .map(|o| o.stdout.lines().count())
        .unwrap_or(0);
    let neigh = vrouter_tests::exec(Some(ns), &["ip", "-4", "neigh", "show", "nud", "permanent"])
        .map(|o| o.stdout.lines().count())
        .unwrap_or(0);
    (routes, neigh)
}

/// A router's namespace, a netlink socket in it and the prefixes it still lacks.
type RouterWatch = (String, Netlink, HashSet<(Ipv4Addr, u8)>);

/// Waits until every router in `stacks` has a route to every other stack's prefix;
/// returns per-router completion times (ms after `t0`), or the gap after `timeout`.
fn wait_all_installed(
    g: &GossipMesh,
    stacks: &[StackDef],
    t0: Instant,
    timeout: Duration,
) -> Result<Vec<f64>> {
    let mut socks: Vec<RouterWatch> = Vec::new();
    for s in stacks {
        let ns = g.rtr(s.name).ns.clone();
        let want: HashSet<_> = stacks
            .iter()
            .filter(|o| o.name != s.name)
            .map(key_of)
            .collect();
        socks.push((
            s.name.to_string(),
            Netlink::in_netns(&ns).with_context(|| format!("netlink in {ns}"))?,
            want,
        ));
    }
    let mut done: Vec<Option<f64>> = vec![None; socks.len()];
    let deadline = Instant::now() + timeout;
    loop {
        for (i, (_, nl, want)) in socks.iter_mut().enumerate() {
            if done[i].is_none() && installed(nl, want)? == want.len() {
                done[i] = Some(t0.elapsed().as_secs_f64() * 1000.0);
            }
        }
        if done.iter().all(|d| d.is_some()) {
            break;
        }
        if Instant::now() > deadline {
            let mut gaps = Vec::new();
            for (i, (name, nl, want)) in socks.iter_mut().enumerate() {
                if done[i].is_none() {
                    gaps.push(format!("{name}: {}/{}", installed(nl, want)?, want.len()));
                }
            }
            bail!(
                "after {timeout:?} {} routers lack routes: {}",
                gaps.len(),
                gaps.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // All at once, at the end: none lost a route meanwhile.
    for (name, nl, want) in socks.iter_mut() {
        let n = installed(nl, want)?;
        if n != want.len() {
            bail!("{name} lost routes: {n}/{}", want.len());
        }
    }
    Ok(done.into_iter().map(|d| d.expect("all done")).collect())
}

/// perf record of `pid` for `secs` seconds (call graph); the top of the report.
fn perf_profile(pid: u32, secs: u64, tag: &str) -> Value {
    let data = format!("/tmp/{}-scale-{tag}.perf", vrouter_tests::prefix());
    let rec = std::process::Command::new("perf")
        .args([
            "record",
            "-F",
            "499",
            "-g",
            "-o",
            &data,
            "-p",
            &pid.to_string(),
        ])
        .args(["--", "sleep", &secs.to_string()])
        .output();
    if !matches!(&rec, Ok(o) if o.status.success()) {
        return json!({"error": format!("perf record failed: {:?}", rec.map(|o| String::from_utf8_lossy(&o.stderr).to_string()))});
    }
    let rep = std::process::Command::new("perf")
        .args([
            "report",
            "-i",
            &data,
            "--stdio",
            "--no-children",
            "--sort",
            "symbol",
        ])
        .args(["--percent-limit", "1.5", "-g", "none"])
        .output();
    let text = rep
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let top: Vec<String> = text
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .take(25)
        .map(|l| l.trim().to_string())
        .collect();
    json!({"perf_data": data, "seconds": secs, "top_symbols": top})
}

/// Part 1: `n` stacks on host 1, `r` on host 2.
fn one_host(o: &Opts) -> Result<(Vec<Figure>, Value)> {
    let (n, r) = (o.stacks, o.remote);
    let wall = Instant::now();
    let mut stacks: Vec<StackDef> = (0..n).map(|k| stack_def(1, k, "a")).collect();
    stacks.extend((0..r).map(|k| stack_def(2, k, "b")));
    let tb = Instant::now();
    let mut g = GossipMesh::build("scale1", 2, stacks.clone())?;
    let build_s = tb.elapsed().as_secs_f64();
    eprintln!("scale: {n}+{r} stacks' namespaces built in {build_s:.1} s");
    for h in 1..=2 {
        g.mesh.start_discovery(h)?;
    }
    let ts = Instant::now();
    g.mesh.start_routers()?;
    let t_last = Instant::now();
    let spawn_s = ts.elapsed().as_secs_f64();
    eprintln!("scale: {} routers started in {spawn_s:.1} s", n + r);
    let done = wait_all_installed(&g, &stacks, t_last, Duration::from_secs(600))?;
    let all_ms = done.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "scale: every router routes every other stack {all_ms:.0} ms after the last router's start"
    );
    let mesh_gap = g.routes_gap();
    // Every pair across the hosts: ping from each host-1 service to each host-2 one.
    let tp = Instant::now();
    let mut failed = Vec::new();
    let mut pairs = 0;
    for a in stacks.iter().filter(|s| s.host == 1) {
        for b in stacks.iter().filter(|s| s.host == 2) {
            pairs += 1;
            let ok = ping(
                &g.svc(a.name).ns,
                &g.svc(b.name).ip.to_string(),
                1,
                Duration::from_millis(1000),
            ) || ping(
                &g.svc(a.name).ns,
                &g.svc(b.name).ip.to_string(),
                2,
                Duration::from_millis(2000),
            );
            if !ok {
                failed.push(format!("{}->{}", a.name, b.name));
            }
        }
    }
    // Same-host sample: each host-1 stack to the next one.
    let mut same_failed = Vec::new();
    let local: Vec<&StackDef> = stacks.iter().filter(|s| s.host == 1).collect();
    let same_pairs = local.len().min(20);
    for i in 0..same_pairs {
        let (a, b) = (local[i], local[(i + 1) % local.len()]);
        if !ping(
            &g.svc(a.name).ns,
            &g.svc(b.name).ip.to_string(),
            2,
            Duration::from_millis(2000),
        ) {
            same_failed.push(format!("{}->{}", a.name, b.name));
        }
    }
    eprintln!(
        "scale: {pairs} cross-host pairs pinged in {:.1} s, {} failed; {same_pairs} same-host pairs, {} failed",
        tp.elapsed().as_secs_f64(),
        failed.len(),
        same_failed.len()
    );
    // Quiet state: reconcile time over a window, RSS.
    std::thread::sleep(Duration::from_secs(5));
    let r0 = reconcile_stats(&g, 1);
    let window = Duration::from_secs(30);
    let pids: Vec<(String, u32, usize)> = stacks
        .iter()
        .map(|s| (s.name.to_string(), g.mesh.router(s.name).pid(), s.host))
        .collect();
    let dpids = [g.mesh.discovery(1).pid(), g.mesh.discovery(2).pid()];
    let cpu0: Vec<f64> = pids
        .iter()
        .map(|p| cpu_time(p.1).map(|d| d.as_secs_f64()).unwrap_or(f64::NAN))
        .collect();
    let dcpu0: Vec<f64> = dpids
        .iter()
        .map(|p| cpu_time(*p).map(|d| d.as_secs_f64()).unwrap_or(f64::NAN))
        .collect();
    std::thread::sleep(window);
    let cpu1: Vec<f64> = pids
        .iter()
        .map(|p| cpu_time(p.1).map(|d| d.as_secs_f64()).unwrap_or(f64::NAN))
        .collect();
    let dcpu1: Vec<f64> = dpids
        .iter()
        .map(|p| cpu_time(*p).map(|d| d.as_secs_f64()).unwrap_or(f64::NAN))
        .collect();
    let r1 = reconcile_stats(&g, 1);
    let w = window.as_secs_f64();
    let share = |h: usize| -> f64 {
        pids.iter()
            .zip(cpu0.iter().zip(&cpu1))
            .filter(|(p, _)| p.2 == h)
            .map(|(_, (a, b))| (b - a) / w)
            .sum()
    };
    // Probe requests each router sends per second (overlay_probe.rs: 4 per remote router,
    // at most 1,000): host-1 routers have r remote routers, host-2 routers n.
    let probe_rate = |remote: usize| ((remote as f64) * 4.0).min(1000.0);
    let probes_h1 = n as f64 * probe_rate(r);
    let probes_h2 = r as f64 * probe_rate(n);
    let idle_cpu = json!({
        "window_s": w,
        "routers_host1_cpu_share": share(1),
        "routers_host2_cpu_share": share(2),
        "discovery_host1_cpu_share": (dcpu1[0] - dcpu0[0]) / w,
        "discovery_host2_cpu_share": (dcpu1[1] - dcpu0[1]) / w,
        "probe_requests_per_s_host1_routers": probes_h1,
        "probe_requests_per_s_host2_routers": probes_h2,
        "what": "CPU seconds per second (1.0 = one core) of all routers of a host over the idle window; probe rates from overlay_probe.rs (4 per second per remote router, at most 1,000 per router); each request is answered by the remote router",
    });
    eprintln!("scale: idle CPU {idle_cpu}");
    let idle_mean = mean_between(&r0, &r1);
    eprintln!("scale: host 1 discovery idle reconcile mean {idle_mean:?} ms ({r0} -> {r1})");
    // One more stack on host 1: started until every router routes to it.
    let extra = stack_def(1, n, "a");
    g.mesh.add_stack_containers(extra.clone())?;
    let dpid = g.mesh.discovery(1).pid();
    let prof = if o.perf > 0 {
        Some(std::thread::spawn({
            let secs = o.perf;
            move || perf_profile(dpid, secs, "register")
        }))
    } else {
        None
    };
    let r2 = reconcile_stats(&g, 1);
    let te = Instant::now();
    g.mesh.start_router(extra.name)?;
    let mut all = stacks.clone();
    all.push(extra.clone());
    let done_extra = wait_all_installed(&g, &all, te, Duration::from_secs(600))?;
    let extra_ms = done_extra.iter().cloned().fold(0.0, f64::max);
    let extra_own_ms = *done_extra.last().expect("extra");
    let r3 = reconcile_stats(&g, 1);
    let busy_mean = mean_between(&r2, &r3);
    eprintln!("scale: stack {} routed everywhere after {extra_ms:.0} ms (its own router complete after {extra_own_ms:.0} ms); reconcile mean meanwhile {busy_mean:?} ms", extra.name);
    let profile = prof.map(|h| h.join().unwrap_or(Value::Null));
    // Inventory.
    let inv1 = host_inventory(&g, 1);
    let inv2 = host_inventory(&g, 2);
    let mut r_routes = Vec::new();
    let mut r_neigh = Vec::new();
    for s in &all {
        let (a, b) = router_inventory(&g.rtr(s.name).ns);
        r_routes.push(a as f64);
        r_neigh.push(b as f64);
    }
    let d1 = rss(g.mesh.discovery(1).pid());
    let d2 = rss(g.mesh.discovery(2).pid());
    let mut router_rss = Vec::new();
    for s in &all {
        router_rss.push(rss(g.mesh.router(s.name).pid()).0);
    }
    let router_rss_sum: f64 = router_rss.iter().sum();
    let out = json!({
        "stacks_host1": n,
        "stacks_host2": r,
        "vni": VNI,
        "namespaces_built_s": build_s,
        "routers_spawned_s": spawn_s,
        "all_routes_installed_ms_after_last_start": all_ms,
        "per_router_complete_ms": {"median": median(&done), "max": all_ms},
        "routes_json_gap": mesh_gap,
        "cross_host_pairs": pairs,
        "cross_host_failed": failed,
        "same_host_pairs_sampled": same_pairs,
        "same_host_failed": same_failed,
        "discovery_host1": {
            "reconcile_idle_mean_ms": idle_mean,
            "reconcile_during_extra_stack_mean_ms": busy_mean,
            "window_s": window.as_secs(),
            "stats_before": r0, "stats_after": r1, "stats_extra_before": r2, "stats_extra_after": r3,
            "rss_mib": d1.0, "peak_rss_mib": d1.1,
        },
        "discovery_host2": {"rss_mib": d2.0, "peak_rss_mib": d2.1, "reconcile": reconcile_stats(&g, 2)},
        "extra_stack": {
            "name": extra.name,
            "routed_by_all_ms": extra_ms,
            "own_router_complete_ms": extra_own_ms,
        },
        "routers": {
            "count": all.len(),
            "rss_mib_median": median(&router_rss),
            "rss_mib_max": router_rss.iter().cloned().fold(0.0, f64::max),
            "rss_mib_sum": router_rss_sum,
            "routes_proto118_median": median(&r_routes),
            "permanent_neighbours_median": median(&r_neigh),
        },
        "host1": inv1,
        "host2": inv2,
        "idle_cpu": idle_cpu,
        "profile": profile,
        "wall_s": wall.elapsed().as_secs_f64(),
    });
    let tot = n + r;
    let mut f = vec![
        Figure::new(
            "scale.one_host.all_routes_ms",
            &format!("{n} stacks on one host + {r} on another (gossip, one VNI): last router started → every router routes every other stack"),
            "ms",
            Samples(vec![all_ms]),
        ),
        Figure::new(
            "scale.one_host.cross_pairs_failed",
            &format!("{n} × {r} stack pairs across the hosts not answering a ping"),
            "pairs",
            Samples(vec![failed.len() as f64]),
        )
        .with_target(Target::AtMost(0.0)),
        Figure::new(
            "scale.one_host.extra_stack_ms",
            &format!("One more stack on the {n}-stack host: its router started → every router ({}) routes to it, and it to all", tot + 1),
            "ms",
            Samples(vec![extra_ms]),
        ),
        Figure::new(
            "scale.one_host.discovery_rss_mib",
            &format!("Discovery RSS on the host with {} stacks", n + 1),
            "MiB",
            Samples(vec![d1.0]),
        )
        .with_target(Target::AtMost(30.0)),
        Figure::new(
            "scale.one_host.router_rss_mib",
            &format!("Router RSS, median of {} routers", all.len()),
            "MiB",
            Samples(vec![median(&router_rss)]),
        ),
    ];
    if let Some(m) = idle_mean {
        f.push(Figure::new(
            "scale.one_host.reconcile_idle_ms",
            &format!(
                "Discovery reconcile time with {n} local stacks, idle (mean over {} s)",
                window.as_secs()
            ),
            "ms",
            Samples(vec![m]),
        ));
    }
    if let Some(m) = busy_mean {
        f.push(Figure::new(
            "scale.one_host.reconcile_busy_ms",
            &format!(
                "Discovery reconcile time with {} local stacks while one registers (mean)",
                n + 1
            ),
            "ms",
            Samples(vec![m]),
        ));
    }
    Ok((f, out))
}

/// Part 2: `hosts` hosts with `k` stacks each.
fn many_hosts(o: &Opts) -> Result<(Vec<Figure>, Value)> {
    let (hn, k) = (o.hosts, o.per_host);
    let wall = Instant::now();
    let stacks: Vec<StackDef> = (1..=hn)
        .flat_map(|h| (0..k).map(move |i| stack_def(h, i, "m")))
        .collect();
    let tb = Instant::now();
    let mut g = GossipMesh::build("scale2", hn, stacks.clone())?;
    let build_s = tb.elapsed().as_secs_f64();
    eprintln!("scale: {hn} hosts x {k} stacks built in {build_s:.1} s");
    g.start_all()?;
    let t0 = Instant::now();
    let conv = g.wait_full_mesh(Duration::from_secs(600));
    let mesh_ms = match &conv {
        Ok(_) => t0.elapsed().as_secs_f64() * 1000.0,
        Err(e) => bail!("{hn}-host mesh did not converge: {e:#}"),
    };
    let done = wait_all_installed(&g, &stacks, t0, Duration::from_secs(300))?;
    let kernel_ms = done.iter().cloned().fold(0.0, f64::max);
    eprintln!("scale: {hn}-host mesh: routes.json full {mesh_ms:.0} ms, every router's kernel {kernel_ms:.0} ms after the routers' start");
    // Idle gossip traffic.
    std::thread::sleep(Duration::from_secs(5));
    let window = Duration::from_secs(30);
    let before: Vec<(u64, u64)> = (1..=hn)
        .map(|h| (g.counter(h, "bytes_out"), g.counter(h, "packets_out")))
        .collect();
    let router_pids: Vec<u32> = stacks.iter().map(|s| g.mesh.router(s.name).pid()).collect();
    let cpu_sum = |pids: &[u32]| -> f64 {
        pids.iter()
            .map(|p| cpu_time(*p).map(|d| d.as_secs_f64()).unwrap_or(0.0))
            .sum()
    };
    let rcpu0 = cpu_sum(&router_pids);
    std::thread::sleep(window);
    let routers_cpu = (cpu_sum(&router_pids) - rcpu0) / window.as_secs_f64();
    let load = loadavg();
    eprintln!("scale: {hn}-host idle: routers use {routers_cpu:.2} cores, load average {load:.1}");
    let idle: Vec<f64> = (1..=hn)
        .map(|h| {
            let (b0, p0) = before[h - 1];
            let bytes = g.counter(h, "bytes_out") - b0 + 28 * (g.counter(h, "packets_out") - p0);
            bytes as f64 * 8.0 / 1000.0 / window.as_secs_f64()
        })
        .collect();
    eprintln!(
        "scale: idle gossip kbit/s per node: median {:.2}, max {:.2}",
        median(&idle),
        pctl(&idle, 100.0)
    );
    // Joins (a join that takes longer than JOIN_WAIT is recorded, and the run goes on).
    const JOIN_WAIT: Duration = Duration::from_secs(120);
    let mut join_ms = Vec::new();
    let mut join_failed = Vec::new();
    for i in 0..o.rounds {
        let host = 1 + (i * 7) % hn;
        let from_host = 1 + (host % hn);
        let s = stack_def(host, k + i, "j");
        g.mesh.add_stack_containers(s.clone())?;
        let from = g.stack_on(from_host);
        let (src_ns, dst_ip) = (g.svc(from).ns.clone(), g.svc(s.name).ip.to_string());
        let t = Instant::now();
        g.mesh.start_router(s.name)?;
        let ok = wait_until(JOIN_WAIT, Duration::from_millis(10), || {
            ping(&src_ns, &dst_ip, 1, Duration::from_millis(150))
        });
        if !ok {
            eprintln!(
                "scale: join {} on host {host}: no answer from host {from_host} within {JOIN_WAIT:?} (load average {:.1})",
                s.name,
                loadavg()
            );
            join_failed.push(format!("{} on host {host}, from host {from_host}", s.name));
            continue;
        }
        join_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        eprintln!(
            "scale: join {} on host {host}: answered from host {from_host} after {:?}",
            s.name,
            t.elapsed()
        );
    }
    // Failure detection.
    let mut detect_ms = Vec::new();
    let mut detect_failed = Vec::new();
    for i in 0..o.rounds {
        let victim = 2 + (i * 5) % (hn - 1);
        let gone: Vec<&'static str> = g
            .stacks
            .iter()
            .filter(|s| s.host == victim)
            .map(|s| s.name)
            .collect();
        let others: Vec<usize> = (1..=hn).filter(|h| *h != victim).collect();
        let t = Instant::now();
        g.set_underlay_link(victim, false)?;
        let ok = wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
            others.iter().all(|h| {
                let r = g.routed_stacks(*h);
                gone.iter().all(|s| !r.contains(*s))
            })
        });
        let took = t.elapsed();
        g.set_underlay_link(victim, true)?;
        if ok {
            detect_ms.push(took.as_secs_f64() * 1000.0);
            eprintln!(
                "scale: host {victim} cut off: withdrawn on all {} others after {took:?}",
                hn - 1
            );
        } else {
            eprintln!("scale: host {victim} cut off: not withdrawn everywhere within 60 s");
            detect_failed.push(format!("host {victim}"));
        }
        if let Err(e) = g.wait_full_mesh(Duration::from_secs(120)) {
            eprintln!("scale: mesh not whole again after healing host {victim}: {e:#}");
            detect_failed.push(format!("host {victim} not back within 120 s of the heal"));
            break;
        }
    }
    let events_failed = g
        .events_of_kinds_since(&["member_failed"], now_ms() - 3_600_000)
        .len();
    let mut drss = Vec::new();
    for h in 1..=hn {
        drss.push(rss(g.mesh.discovery(h).pid()).0);
    }
    let out = json!({
        "hosts": hn,
        "stacks_per_host": k,
        "namespaces_built_s": build_s,
        "mesh_converged_ms": mesh_ms,
        "kernel_routes_complete_ms": kernel_ms,
        "idle_kbit_s_per_node": {"median": median(&idle), "max": pctl(&idle, 100.0), "window_s": window.as_secs(), "values": idle},
        "routers_idle_cpu_cores": routers_cpu,
        "load_average_idle": load,
        "probe_requests_per_s_all_routers": (hn * k) as f64 * ((((hn - 1) * k) as f64) * 4.0).min(1000.0),
        "join_ms": {"values": join_ms, "median": median(&join_ms), "max": pctl(&join_ms, 100.0), "failed": join_failed, "wait_s": JOIN_WAIT.as_secs()},
        "failure_detection_ms": {"values": detect_ms, "median": median(&detect_ms), "max": pctl(&detect_ms, 100.0), "failed": detect_failed},
        "member_failed_events_total": events_failed,
        "discovery_rss_mib": {"median": median(&drss), "max": pctl(&drss, 100.0)},
        "wall_s": wall.elapsed().as_secs_f64(),
    });
    let f = vec![
        Figure::new(
            "scale.hosts.mesh_converged_ms",
            &format!("{hn} hosts × {k} stacks, gossip: routers started → every host's routes.json lists every stack"),
            "ms",
            Samples(vec![mesh_ms]),
        ),
        Figure::new(
            "scale.hosts.kernel_complete_ms",
            &format!("{hn} hosts × {k} stacks: routers started → every router's kernel routes every other stack ({} routers)", hn * k),
            "ms",
            Samples(vec![kernel_ms]),
        ),
        Figure::new(
            "scale.hosts.join_ms",
            &format!("{hn} hosts: a new stack's router started → first ping answered from another host"),
            "ms",
            Samples(out["join_ms"]["values"].as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default()),
        )
        .with_target(Target::AtMost(1000.0)),
        Figure::new(
            "scale.hosts.failure_detection_ms",
            &format!("{hn} hosts: a host's underlay cut → its {k} stacks withdrawn on all {} others", hn - 1),
            "ms",
            Samples(out["failure_detection_ms"]["values"].as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default()),
        )
        .with_target(Target::AtMost(3000.0)),
        Figure::new(
            "scale.hosts.idle_kbit",
            &format!("{hn} hosts: idle gossip traffic per node (30 s, one sample per node)"),
            "kbit/s",
            Samples(out["idle_kbit_s_per_node"]["values"].as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default()),
        )
        .with_target(Target::AtMost(10.0)),
    ];
    Ok((f, out))
}

/// What a gossip record holds per stack (record.rs's `stack_cost`), for stacks of a
/// given name length and prefix count, and how many fit in one host's record.
fn record_limits() -> Value {
    use vrouter_gossip::record::{stack_cost, MAX_RECORD_BYTES, RECORD_OVERHEAD};
    use vrouter_state::{StackName, StackSpec, Vni};
    let shapes = [(64usize, 4usize), (64, 1), (16, 1)];
    let rows: Vec<Value> = shapes
        .iter()
        .map(|(len, prefixes)| {
            let name: String = std::iter::once('s').chain((1..*len).map(|_| 'x')).collect();
            let spec = StackSpec {
                name: StackName::new(&name).expect("valid name"),
                vni: Vni::new(16_000_000).expect("vni"),
                prefixes: (0..*prefixes)
                    .map(|j| {
                        format!("10.{}.{}.0/24", 200 + j, 255)
                            .parse()
                            .expect("prefix")
                    })
                    .collect(),
                router_ip: "10.200.255.254".parse().expect("ip"),
            };
            let cost = stack_cost(&spec);
            json!({
                "name_chars": len,
                "prefixes": prefixes,
                "bytes_per_stack": cost,
                "max_stacks_per_host": (MAX_RECORD_BYTES - RECORD_OVERHEAD) / cost,
            })
        })
        .collect();
    json!({
        "max_record_bytes": MAX_RECORD_BYTES,
        "record_overhead_bytes": RECORD_OVERHEAD,
        "shapes": rows,
        // Readers refuse a state file larger than this (routes.json included).
        "max_state_file_bytes": vrouter_state::store::MAX_STATE_FILE_BYTES,
    })
}

/// Projections from the one-host measurement to a mesh of `total` stacks with
/// `per_host` on each host, all on one VNI (every stack routes every other).
fn project(one: &Value, per_host: f64, total: f64) -> Value {
    let h1 = &one["host1"];
    let l = one["stacks_host1"].as_f64().unwrap_or(0.0) + 1.0; // + the extra stack
    let s = l + one["stacks_host2"].as_f64().unwrap_or(0.0);
    let rows = h1["routes_json_rows"].as_f64().unwrap_or(f64::NAN);
    let bytes_per_row = h1["routes_json_bytes"].as_f64().unwrap_or(f64::NAN) / rows.max(1.0);
    let host_routes_per_pair =
        h1["host_routes_proto118"].as_f64().unwrap_or(f64::NAN) / (l * (s - 1.0)).max(1.0);
    let disc_per_stack = h1["discovery_json_bytes"].as_f64().unwrap_or(f64::NAN) / s;
    let remote = total - per_host;
    let hosts = (total / per_host).ceil();
    json!({
        "stacks_total": total,
        "stacks_per_host": per_host,
        "hosts": hosts,
        "routes_json_rows": per_host * (total - 1.0),
        "routes_json_mib": per_host * (total - 1.0) * bytes_per_row / 1048576.0,
        "discovery_json_mib": disc_per_stack * total / 1048576.0,
        "host_routes": per_host * (total - 1.0) * host_routes_per_pair,
        "router_routes_each": total - 1.0,
        "router_neighbours_each": total - 1.0,
        "fdb_rows": remote + hosts - 1.0,
        "probe_requests_per_s_per_host": per_host * (remote * 4.0).min(1000.0),
        "probe_interval_s_per_peer": (remote / 1000.0).max(0.25),
        "basis": {
            "routes_json_bytes_per_row": bytes_per_row,
            "host_routes_per_local_remote_pair": host_routes_per_pair,
            "discovery_json_bytes_per_stack": disc_per_stack,
        },
    })
}

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        die("needs root (network namespaces)");
    }
    let o = parse();
    let mut figures = Vec::new();
    let mut extra = json!({"tool": "vrt-scale-bench"});
    let mut failed = false;
    if o.part == "all" || o.part == "one-host" {
        match one_host(&o) {
            Ok((f, v)) => {
                figures.extend(f);
                extra["one_host"] = v;
            }
            Err(e) => {
                eprintln!("vrt-scale-bench: one-host: {e:#}");
                extra["one_host"] = json!({"error": format!("{e:#}")});
                failed = true;
            }
        }
    }
    if o.part == "all" || o.part == "hosts" {
        match many_hosts(&o) {
            Ok((f, v)) => {
                figures.extend(f);
                extra["hosts"] = v;
            }
            Err(e) => {
                eprintln!("vrt-scale-bench: hosts: {e:#}");
                extra["hosts"] = json!({"error": format!("{e:#}")});
                failed = true;
            }
        }
    }
    extra["record_limits"] = record_limits();
    if extra["one_host"]["host1"].is_object() {
        let one = extra["one_host"].clone();
        extra["projections"] = json!([
            project(&one, 100.0, 1_000.0),
            project(&one, 100.0, 10_000.0),
            project(&one, 10.0, 10_000.0),
        ]);
    }
    println!("{}", serde_json::to_string_pretty(&extra).expect("json"));
    if let Some(p) = &o.out {
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        if let Err(e) = write_results(
            std::path::Path::new(p),
            "vrt-scale-bench",
            &command,
            &figures,
            extra,
        ) {
            eprintln!("vrt-scale-bench: cannot write {p}: {e:#}");
            std::process::exit(1);
        }
    }
    if failed {
        std::process::exit(1);
    }
}
