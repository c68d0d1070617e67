//! `make bench`, control plane: the project's release binaries (`vrouter-discovery`,
//! `vrouter-router`, found like the tests find them: `$VROUTER_BIN_DIR` or next to this
//! binary), each run as Docker would run it (CAP_NET_ADMIN only, read-only /proc/sys and
//! /sys, the state directory shared), on two simulated hosts (network namespaces on a
//! veth underlay, the Docker-28.2-like firewall). Writes `target/bench/control.json`
//! (schema of `vrouter_tests::bench`) and prints a summary.
//!
//! ```text
//! VROUTER_TEST_PREFIX=cb target/release/vrt-ctl-bench [--out PATH] [--rounds N] [--quick]
//! ```
//! `--rounds` (default 5) is the number of samples of every figure; `--quick` is a
//! smoke run (1 round unless `--rounds` says otherwise; same figures).
//!
//! Figures (stable keys; samples are one per round, the median is reported):
//!
//! - `control.ready.discovery` (ms, target <= 200): on host 2 (no local stack, one static
//!   peer), with an emptied state directory, from spawning discovery's launch command
//!   (`ip netns exec`, `unshare`, read-only remounts, `setpriv`, then the daemon; the
//!   launch chain's own cost is `extra.wrapper_ms`) until `GET /readyz` on
//!   127.0.0.1:9474 in the host namespace answers 200 (polled every 2 ms). Discovery is
//!   ready once it wrote routes.json, its state directory is writable, every registered
//!   router is attached and its VXLAN devices exist (crates/vrouter-discovery/src/readiness.rs).
//! - `control.ready.router` (ms, target <= 200): a router restarted as `docker restart`
//!   does (SIGTERM, a fresh network namespace, a new process) while discovery runs and
//!   routes.json lists 10 remote stacks for it: from spawning its launch command until,
//!   in its namespace, its overlay link `ovl1000` is up and all 10 routes are installed
//!   (netlink dumps every 2 ms) — what `vrouter-router healthcheck` (the image's
//!   HEALTHCHECK) checks; the bench runs that healthcheck after each sample and
//!   records in `extra` how long after "ready" it first passed. The same with 1,000
//!   remote stacks is `extra.ready_router_1000_ms`.
//! - `control.rss.discovery.{10,1000}` and `control.rss.router.{10,1000}` (MiB, target
//!   <= 30): peak RSS (VmHWM of /proc/PID/status; the PID is checked to be the daemon,
//!   not its launcher, by /proc/PID/comm) with N remote stacks, each alone on a remote
//!   host in 198.19.0.0/16, given to discovery as static peers (`--config`). Discovery
//!   programs an FDB row per remote host and publishes N routes for the local stack;
//!   the router installs N routes and permanent neighbours. Read 2 s after the router
//!   was ready and both daemons had gone quiet. Discovery: round 1 is the process that
//!   first programmed the N peers, later rounds a restarted discovery that reconciled
//!   them (and re-attached the router); router: a new process in a fresh namespace
//!   each round.
//! - `control.reconcile.{1k,10k}` (ms, target for 10k <= 1000) and
//!   `control.withdraw.{1k,10k}` (ms): the time a running router takes to install N
//!   remote /24s behind N distinct gateways (one remote router each, `10.64.0.0/10`),
//!   and to remove them again, from the rename of a new routes.json generation until a
//!   netlink dump of the router's namespace (polled every 2 ms) holds all N routes
//!   (none, for the withdrawal). A route counts when it is protocol 118 in the main
//!   table with that destination and a gateway or a nexthop object (RTA_NH_ID).
//!   Setup: discovery attaches the router's overlay link on host 1 and is then stopped
//!   (SIGTERM; kernel state stays, as in any control-plane outage), so the bench alone
//!   writes routes.json — as discovery does (vrouter-state's store: complete fsynced
//!   temp file, rename, directory fsync); the timer starts just
//!   before the rename. Discovery's own time to compute routes is not in these figures.
//!   The bench also gives `vxlan1000` on host 1 the forwarding rows discovery keeps for
//!   these remote stacks (a flood row per remote host, a row per remote router MAC;
//!   `extra.fdb_rows`), so the router's overlay probes to the remote routers are
//!   encapsulated once each, as in a real mesh, instead of flooded to every host.
//!   Before each install and withdrawal the bench waits until the router uses under
//!   25 % of a CPU, at most 5 s (`extra.router_not_quiet_before_round` counts the waits
//!   that ran out: with thousands of remote routers the probes keep it busy). A round
//!   that takes over 180 s ends that size's rounds and is listed in
//!   `extra.reconcile_failures`. `extra.last_install_10k` says whether the installed
//!   routes carried a gateway or a nexthop object.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use vrouter_state::{StackName, Vni};
use vrouter_tests::bench::{write_results, Figure, Samples, Target};
use vrouter_tests::cmd::run_cmd;
use vrouter_tests::ctlbench::{
    fdb_batch, peak_rss_mib, prefix_keys, publish_routes, remote_routes, routes_file,
    static_peers_toml, wait_http_200, wait_quiet, Netlink, IFF_UP,
};
use vrouter_tests::mesh::{Mesh, StackDef};
use vrouter_tests::{exec, exec_ok, spawn_privileged_in, wait_until, write_file_atomic, Role};

const VNI: u32 = 1000;
const STACK: &str = "a";
const STACK_CIDR: &str = "10.1.0.0/24";
const ROUTER_IP: &str = "10.1.0.254";
const READYZ: &str = "127.0.0.1:9474";
const POLL: Duration = Duration::from_millis(2);
/// Longest wait for one install or withdrawal; a round that takes longer is recorded in
/// `extra.reconcile_failures` and ends that size's rounds.
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(180);

struct Args {
    out: PathBuf,
    rounds: usize,
    quick: bool,
    command: String,
}

fn usage() -> ! {
    eprintln!("usage: vrt-ctl-bench [--out PATH] [--rounds N] [--quick]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let mut out = PathBuf::from("target/bench/control.json");
    let mut rounds: Option<usize> = None;
    let mut quick = false;
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = it.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            "--rounds" => {
                let v = it.next().unwrap_or_else(|| usage());
                match v.parse::<usize>() {
                    Ok(n) if (1..=100).contains(&n) => rounds = Some(n),
                    _ => {
                        eprintln!("vrt-ctl-bench: --rounds {v:?}: give a number from 1 to 100");
                        std::process::exit(2)
                    }
                }
            }
            "--quick" => quick = true,
            "-h" | "--help" => usage(),
            other => {
                eprintln!("vrt-ctl-bench: unknown argument {other:?}");
                usage()
            }
        }
    }
    Args {
        out,
        rounds: rounds.unwrap_or(if quick { 1 } else { 5 }),
        quick,
        command: argv.join(" "),
    }
}

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("vrt-ctl-bench: needs root (network namespaces)");
        std::process::exit(1);
    }
    let args = parse_args();
    let (figures, extra) = match bench(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vrt-ctl-bench: {e:#}");
            std::process::exit(1);
        }
    };
    println!("\ncontrol plane ({} round(s) each):", args.rounds);
    for f in &figures {
        let s = &f.samples;
        let target = f
            .target
            .map(|t| format!("  target {}", t.verdict(s.median(), &f.unit)))
            .unwrap_or_default();
        println!(
            "  {:<28} {:>9.1} {:<4} (min {:.1}, max {:.1}){target}",
            f.key,
            s.median(),
            f.unit,
            s.min(),
            s.max()
        );
    }
    if let Err(e) = write_results(&args.out, "control", &args.command, &figures, extra) {
        eprintln!("vrt-ctl-bench: writing {}: {e:#}", args.out.display());
        std::process::exit(1);
    }
    println!("wrote {}", args.out.display());
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Gives the stack's router a fresh namespace (as `docker restart` does); the old
/// router must be stopped.
fn fresh_router_ns(mesh: &mut Mesh) -> Result<String> {
    let h = mesh.topo.host_mut(1);
    h.remove_container(STACK, "rtr")?;
    h.add_container(STACK, "rtr", ROUTER_IP, Role::Router)?;
    Ok(mesh.rtr(STACK).ns)
}

/// Starts the router and waits until its overlay link is up and `n` of `wanted` are
/// installed; returns the time from spawn to that dump.
fn start_router_until_ready(
    mesh: &mut Mesh,
    nl: &mut Netlink,
    wanted: &HashSet<(Ipv4Addr, u8)>,
    timeout: Duration,
) -> Result<Duration> {
    let ovl = Vni::new(VNI)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .overlay_ifname();
    let t0 = Instant::now();
    mesh.start_router(STACK)?;
    let deadline = t0 + timeout;
    loop {
        let at = Instant::now();
        let up = nl
            .links()?
            .iter()
            .any(|l| l.name == ovl && l.flags & IFF_UP != 0);
        if up && nl.installed(wanted)? == wanted.len() {
            return Ok(at - t0);
        }
        if Instant::now() >= deadline {
            mesh.router(STACK).dump_logs();
            bail!(
                "router not ready within {timeout:?}: overlay link up {up}, {} of {} routes",
                nl.installed(wanted)?,
                wanted.len()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// `vrouter-router healthcheck` in the router's namespace, retried until it passes
/// (at most 10 s); returns how long that took.
fn healthcheck(mesh: &Mesh) -> Result<Duration> {
    let ns = mesh.rtr(STACK).ns;
    let bin = mesh.bin("vrouter-router").display().to_string();
    let dir = format!("VROUTER_STATE_DIR={}", mesh.state_dir(1).display());
    let stack = format!("VROUTER_STACK={STACK}");
    let vni = format!("VROUTER_VNI={VNI}");
    let argv = ["env", &stack, &vni, &dir, &bin, "healthcheck"];
    let t0 = Instant::now();
    let mut last = String::new();
    let ok = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || match exec(Some(&ns), &argv) {
            Ok(o) if o.success() => true,
            Ok(o) => {
                last = format!("{}{}", o.stdout.trim(), o.stderr.trim());
                false
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        },
    );
    if !ok {
        bail!("vrouter-router healthcheck did not pass within 10 s: {last}");
    }
    Ok(t0.elapsed())
}

/// Routes of the stack in routes.json (0 when not listed or unreadable).
fn published(mesh: &Mesh) -> usize {
    let a = StackName::new(STACK).expect("valid");
    mesh.routes(1)
        .ok()
        .and_then(|f| f.stacks.get(&a).map(|s| s.routes.len()))
        .unwrap_or(0)
}

fn bench(args: &Args) -> Result<(Vec<Figure>, Value)> {
    let rounds = args.rounds;
    let vni = Vni::new(VNI).map_err(|e| anyhow::anyhow!("{e}"))?;
    let stack = StackName::new(STACK).map_err(|e| anyhow::anyhow!("{e}"))?;
    let readyz: SocketAddr = READYZ.parse()?;
    let started = Instant::now();
    let mut mesh = Mesh::build(
        "ctlbench",
        2,
        vec![StackDef::new(STACK, 1, VNI, STACK_CIDR).addresses(ROUTER_IP, "10.1.0.5")],
    )?;
    eprintln!(
        "ctl-bench: two simulated hosts built in {:.1} s; binaries from {}",
        started.elapsed().as_secs_f64(),
        mesh.bin("").display()
    );
    let mut figures = Vec::new();
    let mut extra = serde_json::Map::new();
    extra.insert("rounds".into(), json!(rounds));
    extra.insert("quick".into(), json!(args.quick));

    // The launch chain alone (ip netns exec, unshare, remounts, setpriv) around /bin/true.
    let h2 = mesh.topo.host(2).ns.clone();
    let mut wrapper = Samples::default();
    for _ in 0..rounds {
        let t0 = Instant::now();
        let mut d = spawn_privileged_in(&h2, mesh.topo.log_dir(), "/bin/true", &[], &[])?;
        d.wait_success(Duration::from_secs(10))?;
        wrapper.push(ms(t0.elapsed()));
    }
    extra.insert("wrapper_ms".into(), wrapper.to_json());

    // 1. Discovery: spawn to /readyz 200, on host 2 with an emptied state directory.
    mesh.write_config(2)?;
    let mut ready_disc = Samples::default();
    for r in 0..rounds {
        let dir = mesh.state_dir(2);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let t0 = Instant::now();
        mesh.start_discovery(2)?;
        let t1 = wait_http_200(&h2, readyz, "/readyz", Duration::from_secs(30), POLL)
            .inspect_err(|_| mesh.discovery(2).dump_logs())?;
        ready_disc.push(ms(t1 - t0));
        eprintln!(
            "ctl-bench: discovery ready round {}: {:.1} ms",
            r + 1,
            ms(t1 - t0)
        );
        mesh.stop_discovery(2, libc::SIGTERM)?;
    }
    figures.push(
        Figure::new(
            "control.ready.discovery",
            "discovery: spawn to /readyz 200",
            "ms",
            ready_disc,
        )
        .with_target(Target::AtMost(200.0)),
    );

    // 2. Peak RSS at 10 and 1,000 remote stacks; router readiness on the way.
    let mut router_started = false;
    let mut health_after = Vec::new();
    for n in [10usize, 1000] {
        // Fresh daemons for this size; the peers change while discovery is stopped, so
        // the next one programs them.
        if router_started {
            mesh.stop_router(STACK, libc::SIGTERM)?;
            fresh_router_ns(&mut mesh)?;
        }
        mesh.stop_discovery(1, libc::SIGTERM)?;
        write_file_atomic(&mesh.config_path(1), static_peers_toml(n, vni)?)?;
        let wanted = prefix_keys(&remote_routes(n, vni)?);
        mesh.start_discovery(1)?;
        let mut nl = Netlink::in_netns(&mesh.rtr(STACK).ns)?;
        let first =
            start_router_until_ready(&mut mesh, &mut nl, &wanted, Duration::from_secs(120))?;
        // The socket holds its namespace: let it go before the namespace is replaced
        // (the old overlay link, with the same MAC, lives until the namespace does).
        drop(nl);
        router_started = true;
        eprintln!(
            "ctl-bench: {n} remote stacks: first start (discovery and router together) ready after {:.1} ms",
            ms(first)
        );
        extra.insert(format!("first_start_{n}_ms"), json!(ms(first)));
        if !wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
            published(&mesh) == n
        }) {
            bail!(
                "routes.json lists {} routes for {STACK}, want {n}",
                published(&mesh)
            );
        }
        let (mut rss_d, mut rss_r, mut ready_r) =
            (Samples::default(), Samples::default(), Samples::default());
        for r in 0..rounds {
            if r > 0 {
                mesh.stop_discovery(1, libc::SIGTERM)?;
                mesh.start_discovery(1)?;
                let h1 = mesh.topo.host(1).ns.clone();
                wait_http_200(&h1, readyz, "/readyz", Duration::from_secs(60), POLL)
                    .inspect_err(|_| mesh.discovery(1).dump_logs())?;
            }
            mesh.stop_router(STACK, libc::SIGTERM)?;
            let ns = fresh_router_ns(&mut mesh)?;
            let mut nl = Netlink::in_netns(&ns)?;
            let ready =
                start_router_until_ready(&mut mesh, &mut nl, &wanted, Duration::from_secs(120))?;
            drop(nl);
            ready_r.push(ms(ready));
            let hc = healthcheck(&mesh)?;
            health_after.push(json!({"remote": n, "round": r + 1, "ms_after_ready": ms(hc)}));
            let rpid = mesh.router(STACK).pid();
            let dpid = mesh.discovery(1).pid();
            wait_quiet(
                rpid,
                0.25,
                Duration::from_millis(250),
                Duration::from_secs(20),
            )?;
            wait_quiet(
                dpid,
                0.25,
                Duration::from_millis(250),
                Duration::from_secs(20),
            )?;
            std::thread::sleep(Duration::from_secs(2));
            let (d, rt) = (
                peak_rss_mib(dpid, "vrouter-discovery")?,
                peak_rss_mib(rpid, "vrouter-router")?,
            );
            rss_d.push((d * 10.0).round() / 10.0);
            rss_r.push((rt * 10.0).round() / 10.0);
            eprintln!(
                "ctl-bench: {n} remote stacks, round {}: router ready {:.1} ms (healthcheck passed {:.0} ms later); VmHWM discovery {d:.1} MiB, router {rt:.1} MiB",
                r + 1,
                ms(ready),
                ms(hc)
            );
        }
        figures.push(
            Figure::new(
                &format!("control.rss.discovery.{n}"),
                &format!("discovery peak RSS, {n} remote stacks"),
                "MiB",
                rss_d,
            )
            .with_target(Target::AtMost(30.0)),
        );
        figures.push(
            Figure::new(
                &format!("control.rss.router.{n}"),
                &format!("router peak RSS, {n} remote stacks"),
                "MiB",
                rss_r,
            )
            .with_target(Target::AtMost(30.0)),
        );
        if n == 10 {
            figures.push(
                Figure::new(
                    "control.ready.router",
                    "router: spawn (fresh netns) to overlay link up and 10 routes installed",
                    "ms",
                    ready_r,
                )
                .with_target(Target::AtMost(200.0)),
            );
        } else {
            extra.insert(format!("ready_router_{n}_ms"), ready_r.to_json());
        }
    }
    extra.insert("healthcheck_after_ready".into(), json!(health_after));

    // 3. Reconcile: discovery away, the bench writes routes.json.
    mesh.stop_discovery(1, libc::SIGTERM)?;
    let dir = mesh.state_dir(1);
    let mut generation = mesh.routes(1)?.generation;
    let rns = mesh.rtr(STACK).ns;
    let rpid = mesh.router(STACK).pid();
    let mut nl = Netlink::in_netns(&rns)?;
    let all_routes = remote_routes(10_000, vni)?;
    let all = prefix_keys(&all_routes);
    // The VXLAN forwarding rows discovery would keep for these remote stacks (it
    // programmed those of the first 1,000 already): without them the router's overlay
    // probes to unknown MACs would be flooded to every remote host.
    let h1 = mesh.topo.host(1).ns.clone();
    let fdb = run_cmd(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{h1}"))
            .args(["--", "bridge", "-force", "-batch", "-"]),
        Some(fdb_batch(vni, &all_routes).as_bytes()),
        Duration::from_secs(300),
    )?;
    let rows = exec_ok(
        Some(&h1),
        &["bridge", "fdb", "show", "dev", &vni.vxlan_ifname()],
    )?
    .stdout
    .lines()
    .filter(|l| l.contains(" dst 198.19."))
    .count();
    if rows < 2 * all_routes.len() {
        bail!(
            "vxlan{VNI} has {rows} forwarding rows to the remote hosts, want {}: {}",
            2 * all_routes.len(),
            fdb.stderr.lines().take(5).collect::<Vec<_>>().join("; ")
        );
    }
    extra.insert("fdb_rows".into(), json!(rows));
    generation += 1;
    publish_routes(&dir, &routes_file(&stack, vni, Vec::new(), generation))?;
    nl.wait_installed(&all, 0, Duration::from_secs(60), POLL)
        .context("emptying the router before the reconcile rounds")?;
    let mut quiet_misses = 0u32;
    let mut nexthops = json!(null);
    let mut failures: Vec<String> = Vec::new();
    let quiet = |misses: &mut u32| -> Result<()> {
        if !wait_quiet(
            rpid,
            0.25,
            Duration::from_millis(250),
            Duration::from_secs(5),
        )? {
            *misses += 1;
        }
        Ok(())
    };
    for (n, key) in [(1000usize, "1k"), (10_000, "10k")] {
        let routes = remote_routes(n, vni)?;
        let wanted = prefix_keys(&routes);
        let (mut add, mut del) = (Samples::default(), Samples::default());
        for r in 0..rounds {
            quiet(&mut quiet_misses)?;
            generation += 1;
            let t0 = publish_routes(&dir, &routes_file(&stack, vni, routes.clone(), generation))?;
            match nl.wait_installed(&wanted, n, RECONCILE_TIMEOUT, POLL) {
                Ok(t1) => add.push(ms(t1 - t0)),
                Err(e) => {
                    failures.push(format!("install {n}, round {}: {e:#}", r + 1));
                    eprintln!("ctl-bench: install {n}, round {}: {e:#}", r + 1);
                    break;
                }
            }
            let dump = nl.routes()?;
            let ours: Vec<_> = dump
                .iter()
                .filter(|r| wanted.contains(&(r.dst, r.dst_len)) && r.protocol == 118)
                .collect();
            nexthops = json!({
                "routes": ours.len(),
                "with_gateway": ours.iter().filter(|r| r.gateway.is_some()).count(),
                "with_nexthop_object": ours.iter().filter(|r| r.nh_id.is_some()).count(),
            });
            quiet(&mut quiet_misses)?;
            generation += 1;
            let t0 = publish_routes(&dir, &routes_file(&stack, vni, Vec::new(), generation))?;
            match nl.wait_installed(&wanted, 0, RECONCILE_TIMEOUT, POLL) {
                Ok(t1) => del.push(ms(t1 - t0)),
                Err(e) => {
                    failures.push(format!("withdraw {n}, round {}: {e:#}", r + 1));
                    eprintln!("ctl-bench: withdraw {n}, round {}: {e:#}", r + 1);
                    break;
                }
            }
            eprintln!(
                "ctl-bench: reconcile {n} round {}: install {:.1} ms, withdraw {:.1} ms",
                r + 1,
                add.0.last().unwrap(),
                del.0.last().unwrap()
            );
        }
        let mut f = Figure::new(
            &format!("control.reconcile.{key}"),
            &format!("router: install {n} remote prefixes (distinct gateways), routes.json rename to kernel"),
            "ms",
            add,
        );
        if n == 10_000 {
            f = f.with_target(Target::AtMost(1000.0));
        }
        figures.push(f);
        figures.push(Figure::new(
            &format!("control.withdraw.{key}"),
            &format!("router: withdraw {n} remote prefixes, routes.json rename to kernel"),
            "ms",
            del,
        ));
    }
    extra.insert("last_install_10k".into(), nexthops);
    extra.insert("router_not_quiet_before_round".into(), json!(quiet_misses));
    extra.insert("reconcile_failures".into(), json!(failures));
    extra.insert(
        "duration_s".into(),
        json!((started.elapsed().as_secs_f64() * 10.0).round() / 10.0),
    );
    drop(nl);
    Ok((figures, Value::Object(extra)))
}
