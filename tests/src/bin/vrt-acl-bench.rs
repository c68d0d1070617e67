//! `make bench`, access-control part (issue 14): what a stack's policy costs, with the
//! real daemons on two simulated hosts (stack a on host 1, stack b on host 2; a's
//! router enforces a's policy, read from `VROUTER_ACL_FILE`; traffic goes b -> a).
//!
//! - **Throughput**: single-stream TCP (iperf3, Mbit/s received) b -> a with a's
//!   router holding no access table at all (`none`: deleted by hand, as before issue
//!   14), the default policy (`allow`: default allow, no rules) and default deny with
//!   100 rules (`deny100`); the conditions interleaved, their order rotated per round,
//!   ratios per round. Established flows never reach the rules.
//! - **New connections per second** b -> a (TCP connect, then reset; 2 client threads)
//!   with default deny and 1 rule, and with 1,000 rules (999 about other sources, as a
//!   policy naming many stacks has), interleaved; ratio per round.
//! - **Applying a change** to a 1,000-rule policy: from the policy file's rename (the
//!   new file differs in one rule) until the kernel's nf_tables notification of the
//!   transaction's end (NEWGEN after the new table, read in a's router namespace by
//!   `vrt-probe nft-newgen`).
//!
//! Writes `target/bench/acl.json` (see `vrouter_tests::bench`) and prints a table.
//! Usage: `vrt-acl-bench [--out PATH] [--rounds N] [--secs S] [--samples N] [--quick]`
//! (root; set `VROUTER_TEST_PREFIX` when other tests run beside it).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::json;
use vrouter_tests::bench::{write_results, Figure, Samples, Target};
use vrouter_tests::datapath::{iperf, Condition, PathDef};
use vrouter_tests::interrupt::{self, check_stop};
use vrouter_tests::mesh::{Mesh, StackDef};
use vrouter_tests::{exec, exec_timeout, prefix, probe_bin, spawn_in, wait_until};

/// The targets.
const THROUGHPUT_TARGET: f64 = 0.95;
const CONNRATE_TARGET: f64 = 0.9;
const APPLY_TARGET_MS: f64 = 100.0;
const TABLE: &str = "vrouter_acl";
/// The ports the bench's allow rule opens to b (iperf3 and the connection test).
const PORTS: (u16, u16) = (5200, 5399);

static SWITCH: AtomicU64 = AtomicU64::new(0);

struct Args {
    out: PathBuf,
    rounds: usize,
    secs: u32,
    samples: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: vrt-acl-bench [--out PATH] [--rounds N (1..=50)] [--secs S (1..=60)] [--samples N (1..=100)] [--quick]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        out: PathBuf::from("target/bench/acl.json"),
        rounds: 5,
        secs: 5,
        samples: 15,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |what: &str| {
            it.next().unwrap_or_else(|| {
                eprintln!("vrt-acl-bench: {what} needs a value");
                usage()
            })
        };
        match arg.as_str() {
            "--out" => a.out = PathBuf::from(val("--out")),
            "--rounds" => a.rounds = val("--rounds").parse().unwrap_or_else(|_| usage()),
            "--secs" => a.secs = val("--secs").parse().unwrap_or_else(|_| usage()),
            "--samples" => a.samples = val("--samples").parse().unwrap_or_else(|_| usage()),
            "--quick" => {
                a.rounds = 1;
                a.secs = 2;
                a.samples = 3;
            }
            "-h" | "--help" => usage(),
            other => {
                eprintln!("vrt-acl-bench: unknown argument {other}");
                usage()
            }
        }
    }
    if !(1..=50).contains(&a.rounds)
        || !(1..=60).contains(&a.secs)
        || !(1..=100).contains(&a.samples)
    {
        usage()
    }
    a
}

fn main() {
    let args = parse_args();
    interrupt::main_as_root("vrt-acl-bench", || run(&args));
}

/// The policy file's directory, removed on drop.
struct PolicyDir(PathBuf);

impl Drop for PolicyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A policy of `rules` rules: default deny, rule "bench" admits b on [`PORTS`], the
/// others are about other sources (a /24 each, allow and deny alternating). `tag`
/// changes one of them (its port), so that two tags give two different policies.
fn deny_policy(rules: usize, tag: u64) -> String {
    let mut s = format!(
        "default = \"deny\"\n\n[[rule]]\nname = \"bench\"\nallow = \"b:tcp/{}-{}\"\n",
        PORTS.0, PORTS.1
    );
    for i in 1..rules {
        let (x, y) = (100 + i / 250, i % 250);
        let port = if i == 1 {
            20_000 + tag % 40_000
        } else {
            1000 + i as u64
        };
        let (verdict, proto) = if i % 2 == 0 {
            ("allow", "tcp")
        } else {
            ("deny", "udp")
        };
        s.push_str(&format!(
            "\n[[rule]]\nname = \"r{i}\"\n{verdict} = \"10.{x}.{y}.0/24:{proto}/{port}\"\n"
        ));
    }
    s
}

/// The default policy: everything enters.
const ALLOW_POLICY: &str = "default = \"allow\"\n";

struct Bench {
    mesh: Mesh,
    file: PathBuf,
    /// b's service to a's service.
    path: PathDef,
    log: PathBuf,
}

impl Bench {
    fn rtr_ns(&self) -> String {
        self.mesh.rtr("a").ns
    }

    fn table(&self) -> Option<String> {
        exec(
            Some(&self.rtr_ns()),
            &["nft", "-s", "list", "table", "ip", TABLE],
        )
        .ok()
        .filter(|o| o.success())
        .map(|o| o.stdout)
    }

    /// Writes the policy file (temp file, rename) and waits until a's router put a new
    /// table in the kernel.
    fn set_policy(&self, text: &str) -> Result<()> {
        let before = self.table();
        vrouter_tests::write_file_atomic(&self.file, text)?;
        let ok = wait_until(Duration::from_secs(20), Duration::from_millis(20), || {
            let now = self.table();
            now.is_some() && now != before
        });
        if !ok {
            self.mesh.dump_logs();
            bail!("router a did not install the new policy");
        }
        Ok(())
    }

    /// The policy `text`, installed even if it is the one the router holds (a
    /// different policy goes in first), so that a table deleted by hand comes back.
    fn install(&self, text: &str) -> Result<()> {
        let n = SWITCH.fetch_add(1, Ordering::SeqCst);
        self.set_policy(&format!(
            "default = \"allow\"\n\n[[rule]]\nname = \"switch {n}\"\nallow = \"192.0.2.0/24:udp/9\"\n"
        ))?;
        self.set_policy(text)
    }

    fn delete_table(&self) -> Result<()> {
        exec(
            Some(&self.rtr_ns()),
            &["nft", "delete", "table", "ip", TABLE],
        )?
        .check()?;
        if self.table().is_some() {
            bail!("the table is still there");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acl {
    None,
    Allow,
    Deny100,
    Rules1,
    Rules1000,
}

impl Acl {
    fn name(self) -> &'static str {
        match self {
            Acl::None => "none",
            Acl::Allow => "allow",
            Acl::Deny100 => "deny100",
            Acl::Rules1 => "rules1",
            Acl::Rules1000 => "rules1000",
        }
    }

    fn set(self, b: &Bench) -> Result<()> {
        match self {
            Acl::None => {
                b.install(ALLOW_POLICY)?;
                b.delete_table()
            }
            Acl::Allow => b.install(ALLOW_POLICY),
            Acl::Deny100 => b.install(&deny_policy(100, 0)),
            Acl::Rules1 => b.install(&deny_policy(1, 0)),
            Acl::Rules1000 => b.install(&deny_policy(1000, 0)),
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let command = std::iter::once("vrt-acl-bench".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let p = prefix();
    let dir = PolicyDir(PathBuf::from(format!("/run/{p}-acl-bench")));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0)?;
    let file = dir.0.join("policy.toml");
    std::fs::write(&file, ALLOW_POLICY)?;

    let t = Instant::now();
    let mut mesh = Mesh::build(
        "bench-acl",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
        ],
    )?;
    mesh.set_router_env("a", "VROUTER_ACL_FILE", &file.display().to_string());
    mesh.set_router_env("a", "RUST_LOG", "warn");
    for h in 1..=2 {
        mesh.write_config(h)?;
        mesh.start_discovery(h)?;
    }
    mesh.start_routers()?;
    mesh.wait_converged(Duration::from_secs(30))?;
    let (sa, sb) = (mesh.svc("a"), mesh.svc("b"));
    let path = PathDef {
        name: "acl",
        label: "b -> a through a's access table",
        from_ns: sb.ns.clone(),
        from_ip: sb.ip,
        to_ns: sa.ns.clone(),
        to_ip: sa.ip,
        condition: Condition::Plain,
    };
    let log = mesh.topo.log_dir().to_path_buf();
    let bench = Bench {
        mesh,
        file,
        path,
        log,
    };
    eprintln!("vrt-acl-bench: mesh up in {:.1?}", t.elapsed());

    let mut figures = Vec::new();
    let mut extra = json!({
        "rounds": args.rounds,
        "secs_per_run": args.secs,
        "apply_samples": args.samples,
        "policies": {
            "none": "a's router's table deleted by hand (no access control, as before issue 14)",
            "allow": "default allow, no rules (every router's default policy)",
            "deny100": "default deny, 100 rules: b on the bench ports, 99 about other /24 sources",
            "rules1": "default deny, 1 rule: b on the bench ports",
            "rules1000": "default deny, 1,000 rules: b on the bench ports, 999 about other /24 sources",
        },
    });

    // Throughput.
    let conds = [Acl::None, Acl::Allow, Acl::Deny100];
    let mut tput: Vec<Samples> = vec![Samples::default(); conds.len()];
    let mut port = PORTS.0;
    for round in 0..args.rounds {
        let mut order: Vec<usize> = (0..conds.len()).collect();
        order.rotate_left(round % conds.len());
        for i in order {
            check_stop()?;
            conds[i].set(&bench)?;
            port += 1;
            let v = iperf(&bench.log, &bench.path, port, args.secs, 1, 1400)
                .with_context(|| format!("iperf3 with {}", conds[i].name()))?;
            if conds[i] == Acl::None && bench.table().is_some() {
                bail!("router a put its table back during the no-ACL run");
            }
            eprintln!(
                "  round {} {:<8} tcp1 {v:>7.0} Mbit/s",
                round + 1,
                conds[i].name()
            );
            tput[i].push(v);
        }
    }
    for (i, c) in conds.iter().enumerate() {
        figures.push(Figure::new(
            &format!("acl.tcp1.{}", c.name()),
            &format!("single-stream TCP b -> a, a's policy {}", c.name()),
            "Mbit/s",
            tput[i].clone(),
        ));
    }
    let ratio =
        |x: &Samples, y: &Samples| Samples(x.0.iter().zip(&y.0).map(|(x, y)| x / y).collect());
    figures.push(
        Figure::new(
            "acl.ratio.deny100_none.tcp1",
            "single-stream TCP, default deny + 100 rules / no access table (per round)",
            "ratio",
            ratio(&tput[2], &tput[0]),
        )
        .with_target(Target::AtLeast(THROUGHPUT_TARGET)),
    );
    figures.push(Figure::new(
        "acl.ratio.deny100_allow.tcp1",
        "single-stream TCP, default deny + 100 rules / default allow (per round)",
        "ratio",
        ratio(&tput[2], &tput[1]),
    ));

    // New connections per second.
    Acl::Rules1.set(&bench)?;
    let denied = connect_once(&bench, PORTS.1 + 1);
    if denied {
        bail!("a port outside the rule accepted a connection: the policy is not enforced");
    }
    let conds = [Acl::Rules1, Acl::Rules1000];
    let mut rate: Vec<Samples> = vec![Samples::default(); 2];
    let mut failures = Vec::new();
    for round in 0..args.rounds {
        let mut order: Vec<usize> = vec![0, 1];
        order.rotate_left(round % 2);
        for i in order {
            check_stop()?;
            conds[i].set(&bench)?;
            port += 1;
            let (r, failed) = connect_rate(&bench, port, args.secs)?;
            eprintln!(
                "  round {} {:<9} {r:>8.0} connections/s ({failed} failed)",
                round + 1,
                conds[i].name()
            );
            rate[i].push(r);
            failures.push(json!({"policy": conds[i].name(), "round": round + 1, "failed": failed}));
        }
    }
    extra["connect_failures"] = json!(failures);
    for (i, c) in conds.iter().enumerate() {
        figures.push(Figure::new(
            &format!("acl.connrate.{}", c.name()),
            &format!(
                "new TCP connections per second b -> a, a's policy {}",
                c.name()
            ),
            "conn/s",
            rate[i].clone(),
        ));
    }
    figures.push(
        Figure::new(
            "acl.ratio.connrate.rules1000_rules1",
            "new connections per second, 1,000 rules / 1 rule (per round)",
            "ratio",
            ratio(&rate[1], &rate[0]),
        )
        .with_target(Target::AtLeast(CONNRATE_TARGET)),
    );

    // Applying a change to a 1,000-rule policy.
    check_stop()?;
    Acl::Rules1000.set(&bench)?;
    let (apply, tx) = apply_times(&bench, args.samples)?;
    extra["apply_transactions"] = json!(tx);
    figures.push(
        Figure::new(
            "acl.apply.rules1000",
            "a change to a 1,000-rule policy: file rename until the kernel's transaction ends",
            "ms",
            apply,
        )
        .with_target(Target::AtMost(APPLY_TARGET_MS)),
    );
    extra["method"] = json!(
        "two simulated hosts, real daemons; iperf3 -c <a> -t <secs> -M 1400 -J from b's service, end.sum_received; vrt-probe tcp-connect-rate (2 threads, connect then RST) against vrt-probe tcp-accept; conditions interleaved with the order rotated per round, ratios per round, median reported; apply: realtime of the router's NEWGEN notification (vrt-probe nft-newgen in a's router namespace) minus realtime just before rename(2) of the policy file"
    );

    print_table(&figures);
    write_results(&args.out, "acl", &command, &figures, extra)?;
    println!("wrote {}", args.out.display());
    drop(bench);
    Ok(())
}

/// One TCP connection attempt b -> a:port (a tcp-accept server listening); true if it
/// connected.
fn connect_once(b: &Bench, port: u16) -> bool {
    let Ok(mut server) = accept_server(b, port, 5) else {
        return false;
    };
    let out = exec_timeout(
        Some(&b.path.from_ns),
        &[
            &probe(),
            "tcp-connect-rate",
            "--to",
            &format!("{}:{port}", b.path.to_ip),
            "--secs",
            "1",
            "--threads",
            "1",
        ],
        Duration::from_secs(10),
    );
    let _ = server.kill(libc::SIGKILL);
    out.map(|o| o.success()).unwrap_or(false)
}

fn probe() -> String {
    probe_bin()
        .expect("vrt-probe binary")
        .to_string_lossy()
        .into_owned()
}

fn accept_server(b: &Bench, port: u16, secs: u32) -> Result<vrouter_tests::Daemon> {
    let ready = b.log.join(format!("accept-{port}.ready"));
    let _ = std::fs::remove_file(&ready);
    let mut d = spawn_in(
        &b.path.to_ns,
        &b.log,
        &probe(),
        &[
            "tcp-accept",
            "--addr",
            &format!("{}:{port}", b.path.to_ip),
            "--ready",
            &ready.to_string_lossy(),
            "--secs",
            &secs.to_string(),
        ],
        &[],
    )?;
    if !wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        ready.exists() || !d.is_running()
    }) || !ready.exists()
    {
        bail!("tcp-accept did not start\n{}", d.logs());
    }
    Ok(d)
}

/// Connections per second b -> a:port for `secs`, and how many attempts failed.
fn connect_rate(b: &Bench, port: u16, secs: u32) -> Result<(f64, u64)> {
    let mut server = accept_server(b, port, secs + 10)?;
    let out = exec_timeout(
        Some(&b.path.from_ns),
        &[
            &probe(),
            "tcp-connect-rate",
            "--to",
            &format!("{}:{port}", b.path.to_ip),
            "--secs",
            &secs.to_string(),
            "--threads",
            "2",
        ],
        Duration::from_secs(u64::from(secs) + 20),
    )?;
    let _ = server.kill(libc::SIGKILL);
    let out = out.check()?;
    let value = |key: &str| {
        out.stdout
            .split_whitespace()
            .find_map(|t| t.strip_prefix(key))
            .and_then(|v| v.parse::<f64>().ok())
    };
    match (value("rate="), value("failed=")) {
        (Some(r), Some(f)) => Ok((r, f as u64)),
        _ => bail!("tcp-connect-rate said {:?}", out.stdout),
    }
}

fn realtime_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// `samples` changes of the 1,000-rule policy (one rule's port each time): ms from the
/// rename to the end of the router's transaction, and the transactions seen.
fn apply_times(b: &Bench, samples: usize) -> Result<(Samples, Vec<serde_json::Value>)> {
    let ready = b.log.join("newgen.ready");
    let _ = std::fs::remove_file(&ready);
    let secs = (samples as u64) * 3 + 30;
    let mut mon = spawn_in(
        &b.rtr_ns(),
        &b.log,
        &probe(),
        &[
            "nft-newgen",
            "--table",
            TABLE,
            "--ready",
            &ready.to_string_lossy(),
            "--secs",
            &secs.to_string(),
        ],
        &[],
    )?;
    if !wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        ready.exists() || !mon.is_running()
    }) || !ready.exists()
    {
        bail!("nft-newgen did not start\n{}", mon.logs());
    }
    let lines = |p: &Path| -> Vec<(u128, u64, u64)> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let v = |k: &str| {
                    l.split_whitespace()
                        .find_map(|t| t.strip_prefix(k))
                        .and_then(|x| x.parse::<u128>().ok())
                };
                Some((
                    v("realtime_ns=")?,
                    v("rules=")? as u64,
                    v("elements=")? as u64,
                ))
            })
            .collect()
    };
    let mut out = Samples::default();
    let mut tx = Vec::new();
    let tmp = b.file.with_extension("next");
    for i in 0..samples {
        check_stop()?;
        std::fs::write(&tmp, deny_policy(1000, 1 + i as u64))?;
        let t0 = realtime_ns();
        std::fs::rename(&tmp, &b.file)?;
        let mut found = None;
        wait_until(Duration::from_secs(10), Duration::from_millis(5), || {
            found = lines(&mon.stdout_path).into_iter().find(|l| l.0 > t0);
            found.is_some()
        });
        let Some((ns, rules, elements)) = found else {
            bail!(
                "no transaction for table {TABLE} within 10 s of the rename\n{}",
                mon.logs()
            );
        };
        if rules < 1000 {
            bail!("the transaction after the rename carried {rules} rules, fewer than the policy's 1,000");
        }
        let ms = (ns - t0) as f64 / 1e6;
        eprintln!(
            "  apply {}: {ms:.1} ms ({rules} rules, {elements} set elements)",
            i + 1
        );
        out.push(ms);
        tx.push(json!({"ms": ms, "rules": rules, "set_elements": elements}));
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = mon.kill(libc::SIGKILL);
    Ok((out, tx))
}

fn print_table(figs: &[Figure]) {
    println!(
        "\n{:<42} {:>10} {:>8} {:>6}  target",
        "access control", "median", "unit", "spread"
    );
    for f in figs {
        let target = f
            .target
            .map(|t| t.verdict(f.samples.median(), &f.unit))
            .unwrap_or_default();
        println!(
            "{:<42} {:>10.3} {:>8} {:>6.2}  {target}",
            f.key,
            f.samples.median(),
            f.unit,
            f.samples.spread()
        );
    }
}
