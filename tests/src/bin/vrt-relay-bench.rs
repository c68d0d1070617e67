//! `make bench`, relay part (issue 17): relayed traffic against direct traffic in the
//! same run, relay failover and the return to the direct path, on real daemons and
//! simulated hosts.
//!
//! Four hosts in one gossip mesh (hosts 2..4 join host 1), plain overlay: stack a on
//! host 1 and stack b on host 2 (VNI 1000, port steering, the default policy); hosts 3
//! and 4 run discovery with `VROUTER_RELAY=true` and no stack. UDP between two hosts
//! is blocked by nftables rules on the underlay bridge (`vrouter_tests::relaybench`),
//! so gossip, path probes and VXLAN between them stop.
//!
//! Each round, from the direct path:
//! 1. `direct`: single-stream TCP (iperf3, Mbit/s received, MSS 1410) and ping RTT
//!    (average of 20, ms) from service a to service b (in odd rounds at the end, step 6,
//!    so the two paths are measured in alternating order);
//! 2. UDP 1<->2 blocked under 10 ms pings a -> b: the outage until the relay carries
//!    the traffic (`switch_to_relay`), then both hosts must report `via: relay`;
//! 3. `relayed`: the same two measurements through the relay (its forwarded counter must
//!    rise meanwhile);
//! 4. failover: UDP between the relay host 1 uses and hosts 1 and 2 blocked under 10 ms
//!    pings: the outage until the other relay carries the traffic (`failover`); then
//!    that relay is let through again;
//! 5. return: UDP 1<->2 let through again under 10 ms pings: the time until both hosts
//!    report `via: direct` in discovery.json and the relays' forwarded-packet counters
//!    (nftables, read every 50 ms) stop rising (`return_direct`), and the pings lost
//!    meanwhile;
//! 6. in odd rounds, `direct` as in step 1.
//!
//! An outage is the longest run of unanswered pings times the 10 ms interval
//! (`vrt-probe ping` sends on a fixed schedule). Ratios relayed / direct are taken per
//! round and their median reported.
//!
//! Writes `target/bench/relay.json` (see `vrouter_tests::bench`) and prints a table.
//! Usage: `vrt-relay-bench [--out PATH] [--rounds N] [--secs S]` (needs root; set
//! `VROUTER_TEST_PREFIX` when other tests run beside it).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use vrouter_tests::bench::{write_results, Figure, Samples, Target};
use vrouter_tests::datapath::{iperf, ping_rtt, print_ratios, Condition, PathDef};
use vrouter_tests::encryption::{ping_result, ping_run};
use vrouter_tests::gossip::GossipMesh;
use vrouter_tests::interrupt::{self, check_stop};
use vrouter_tests::mesh::StackDef;
use vrouter_tests::relaybench::{path_to, relay_forwarded, PathState, ReturnWatch, UdpBlocks};
use vrouter_tests::wait_until;

/// Pings per RTT sample, 50 ms apart.
const PINGS: u32 = 20;
/// Interval of the pings that time an outage.
const OUTAGE_PING_MS: u64 = 10;
/// Pings per outage run (10 s at 10 ms): the longest outage a run can time.
const OUTAGE_PINGS: u32 = 1000;
/// How long a run waits before it blocks or unblocks.
const LEAD_MS: u64 = 1000;
/// TCP MSS: the plain overlay MTU (1450 on the 1500-byte underlay) - 40.
const MSS: u32 = 1410;
/// Discovery's path settings (its defaults; recorded in the JSON).
const PATH_PROBE_MS: u64 = 1000;
const PATH_DEAD_MS: u64 = 2500;
/// The bound on failover: failure detection (a path is dead after
/// `PATH_DEAD_MS` without an acknowledged probe) plus 2 s.
const FAILOVER_TARGET_MS: f64 = (PATH_DEAD_MS + 2000) as f64;
/// Counter quiet time after which no more traffic is relayed (10 ms pings run).
const QUIET_MS: u64 = 500;
/// Hosts: 1 and 2 carry the stacks, 3 and 4 offer to relay.
const A: usize = 1;
const B: usize = 2;
const RELAYS: [usize; 2] = [3, 4];

struct Args {
    out: PathBuf,
    rounds: usize,
    secs: u32,
}

fn usage() -> ! {
    eprintln!("usage: vrt-relay-bench [--out PATH] [--rounds N (1..=50)] [--secs S (1..=60)]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        out: PathBuf::from("target/bench/relay.json"),
        rounds: 5,
        secs: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |what: &str| {
            it.next().unwrap_or_else(|| {
                eprintln!("vrt-relay-bench: {what} needs a value");
                usage()
            })
        };
        match arg.as_str() {
            "--out" => a.out = PathBuf::from(val("--out")),
            "--rounds" => a.rounds = val("--rounds").parse().unwrap_or_else(|_| usage()),
            "--secs" => a.secs = val("--secs").parse().unwrap_or_else(|_| usage()),
            "-h" | "--help" => usage(),
            other => {
                eprintln!("vrt-relay-bench: unknown argument {other}");
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
    interrupt::main_as_root("vrt-relay-bench", || run(&args));
}

struct World {
    g: GossipMesh,
    blocks: UdpBlocks,
    path: PathDef,
    relay_table: String,
}

impl World {
    fn ip(&self, host: usize) -> Ipv4Addr {
        self.g.topo.host(host).underlay_ip
    }

    fn host_of(&self, ip: Ipv4Addr) -> Option<usize> {
        (1..=self.g.topo.hosts().len()).find(|&h| self.ip(h) == ip)
    }

    /// Host `from`'s path to host `to`, from its discovery.json.
    fn path(&self, from: usize, to: usize) -> Option<PathState> {
        let doc = self.g.discovery_json(from).ok()?;
        path_to(&doc, self.ip(to))
    }

    /// Both hosts' paths to each other.
    fn paths(&self) -> (Option<PathState>, Option<PathState>) {
        (self.path(A, B), self.path(B, A))
    }

    /// Packets the relay hosts' relay tables have forwarded, summed.
    fn forwarded(&self) -> u64 {
        RELAYS
            .iter()
            .map(|&r| relay_forwarded(&self.g.topo.host(r).ns, &self.relay_table))
            .sum()
    }

    fn ping_ok(&self) -> bool {
        vrouter_tests::ping(
            &self.path.from_ns,
            &self.path.to_ip.to_string(),
            1,
            Duration::from_secs(1),
        )
    }

    /// Waits until `cond` holds for both hosts' paths and a ping answers; the error says
    /// what the hosts reported.
    fn wait_paths(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&PathState, &PathState) -> bool,
    ) -> Result<Duration> {
        let t = Instant::now();
        let ok = wait_until(timeout, Duration::from_millis(50), || {
            interrupt::stopped() || matches!(self.paths(), (Some(x), Some(y)) if cond(&x, &y))
        });
        check_stop()?;
        let took = t.elapsed();
        if !ok
            || !wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
                self.ping_ok()
            })
        {
            self.g.dump_logs();
            bail!(
                "{what}: not reached within {timeout:?}: host {A} -> {B}: {:?}, host {B} -> {A}: {:?}\n{}",
                self.path(A, B),
                self.path(B, A),
                self.blocks.listing()
            );
        }
        Ok(took)
    }
}

fn build() -> Result<World> {
    let stacks = vec![
        StackDef::new("a", A, 1000, "10.1.0.0/24"),
        StackDef::new("b", B, 1000, "10.2.0.0/24"),
    ];
    let mut g = GossipMesh::build("bench-relay", 4, stacks)?;
    for r in RELAYS {
        g.set_discovery_env(r, "VROUTER_RELAY", "true");
    }
    g.start_all()?;
    g.wait_converged(Duration::from_secs(60))?;
    let (a, b) = (g.svc("a"), g.svc("b"));
    let path = PathDef {
        name: "direct",
        label: "service a (host 1) to service b (host 2)",
        from_ns: a.ns.clone(),
        from_ip: a.ip,
        to_ns: b.ns.clone(),
        to_ip: b.ip,
        condition: Condition::Plain,
    };
    let blocks = UdpBlocks::new(&g.topo);
    let relay_table = format!("{}_relay", vrouter_tests::steering::table_name());
    let w = World {
        g,
        blocks,
        path,
        relay_table,
    };
    // Every relay must offer before the first block.
    let offered = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        RELAYS.iter().all(|&r| {
            w.g.discovery_json(r)
                .map(|d| d["relay"]["offered"] == json!(true))
                .unwrap_or(false)
        })
    });
    if !offered {
        w.g.dump_logs();
        bail!("hosts {RELAYS:?} do not report relay.offered = true in discovery.json");
    }
    w.wait_paths("direct path at start", Duration::from_secs(30), |x, y| {
        x.is_direct() && y.is_direct()
    })?;
    Ok(w)
}

/// One `direct` or `relayed` measurement: single-stream TCP, then ping RTT.
fn measure(
    w: &World,
    name: &'static str,
    secs: u32,
    port: &mut u16,
    samples: &mut BTreeMap<&'static str, Samples>,
) -> Result<()> {
    check_stop()?;
    let mut p = w.path.clone();
    p.name = name;
    *port += 1;
    let tcp1 = iperf(w.g.topo.log_dir(), &p, *port, secs, 1, MSS)
        .with_context(|| format!("tcp1 on {name}"))?;
    check_stop()?;
    let ping = ping_rtt(&p, PINGS)?;
    samples.entry(tcp_key(name)).or_default().push(tcp1);
    samples.entry(ping_key(name)).or_default().push(ping);
    eprintln!("  {name:<8} tcp1 {tcp1:>7.0} Mbit/s  ping {ping:.3} ms");
    Ok(())
}

fn tcp_key(name: &str) -> &'static str {
    if name == "direct" {
        "direct.tcp1"
    } else {
        "relayed.tcp1"
    }
}

fn ping_key(name: &str) -> &'static str {
    if name == "direct" {
        "direct.ping"
    } else {
        "relayed.ping"
    }
}

/// Runs 10 ms pings a -> b, does `change` after `LEAD_MS`, then `settle` (waits for the
/// new state); returns the outage in ms and the pings' (sent, received).
fn timed_outage(
    w: &World,
    change: impl FnOnce() -> Result<()>,
    settle: impl FnOnce() -> Result<()>,
) -> Result<(f64, u32, u32)> {
    let dir = w.g.topo.log_dir().to_path_buf();
    let mut d = ping_run(
        &w.path.from_ns,
        &w.path.to_ip.to_string(),
        OUTAGE_PINGS,
        Duration::from_millis(OUTAGE_PING_MS),
        &dir,
    )?;
    std::thread::sleep(Duration::from_millis(LEAD_MS));
    change()?;
    settle()?;
    let r = ping_result(
        &mut d,
        Duration::from_millis(OUTAGE_PING_MS * u64::from(OUTAGE_PINGS) + 10_000),
    )?;
    Ok((
        f64::from(r.longest_loss_run) * OUTAGE_PING_MS as f64,
        r.sent,
        r.received,
    ))
}

fn run(args: &Args) -> Result<()> {
    let command = std::iter::once("vrt-relay-bench".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let load_before = loadavg();
    let t = Instant::now();
    let w = build()?;
    eprintln!(
        "vrt-relay-bench: topology up in {:.1?}; {} rounds of {} s runs",
        t.elapsed(),
        args.rounds,
        args.secs
    );
    let mut s: BTreeMap<&'static str, Samples> = BTreeMap::new();
    let mut log = Vec::new();
    let mut port: u16 = 5400;
    for round in 0..args.rounds {
        check_stop()?;
        eprintln!("round {}/{}", round + 1, args.rounds);
        let direct_first = round % 2 == 0;
        if direct_first {
            measure(&w, "direct", args.secs, &mut port, &mut s)?;
        }

        // Direct path cut: traffic moves to a relay.
        let (switch_ms, _, _) = {
            let w_ref = &w;
            timed_outage(
                w_ref,
                || w_ref.blocks.block(&w_ref.g.topo, A, &[B]),
                || {
                    w_ref
                        .wait_paths(
                            "relayed after UDP 1<->2 blocked",
                            Duration::from_secs(20),
                            |x, y| x.is_relayed(None) && y.is_relayed(None),
                        )
                        .map(|_| ())
                },
            )?
        };
        s.entry("switch_to_relay").or_default().push(switch_ms);
        let (pa, pb) = w.paths();
        let relay_ab = pa.and_then(|p| p.relay_addr).context("no relay address")?;
        let relay_ba = pb.and_then(|p| p.relay_addr).context("no relay address")?;
        eprintln!(
            "  switch to relay: {switch_ms:.0} ms (1->2 via host {:?}, 2->1 via host {:?})",
            w.host_of(relay_ab),
            w.host_of(relay_ba)
        );

        // Relayed measurement, with the relay's counter rising.
        let before = w.forwarded();
        measure(&w, "relayed", args.secs, &mut port, &mut s)?;
        let forwarded = w.forwarded().saturating_sub(before);
        if forwarded == 0 {
            bail!("the relays' forwarded counters did not rise during the relayed measurement");
        }

        // Failover: the relay host 1 uses now (hysteresis may have moved it during the
        // measurement) is cut off from hosts 1 and 2.
        let first = w
            .path(A, B)
            .filter(|p| p.is_relayed(None))
            .and_then(|p| p.relay_addr)
            .and_then(|a| w.host_of(a))
            .context("host 1 no longer reports a relayed path before the failover")?;
        let other = *RELAYS.iter().find(|&&r| r != first).context("relay")?;
        let other_ip = w.ip(other);
        let (failover_ms, _, _) = {
            let w_ref = &w;
            timed_outage(
                w_ref,
                || w_ref.blocks.block(&w_ref.g.topo, first, &[A, B]),
                || {
                    w_ref
                        .wait_paths(
                            "failover to the other relay",
                            Duration::from_secs(20),
                            |x, y| x.is_relayed(Some(other_ip)) && y.is_relayed(Some(other_ip)),
                        )
                        .map(|_| ())
                },
            )?
        };
        s.entry("failover").or_default().push(failover_ms);
        eprintln!("  failover host {first} -> host {other}: {failover_ms:.0} ms");
        w.blocks.unblock(&w.g.topo, first, &[A, B])?;

        // Return: the direct path is let through again.
        let mut watch = ReturnWatch::default();
        let (return_loss_ms, sent, received) = {
            let w_ref = &w;
            let watch = &mut watch;
            timed_outage(
                w_ref,
                || w_ref.blocks.unblock(&w_ref.g.topo, A, &[B]),
                || {
                    let t0 = Instant::now();
                    let deadline = t0 + Duration::from_secs(20);
                    while !watch.done(QUIET_MS) {
                        check_stop()?;
                        if Instant::now() > deadline {
                            bail!(
                                "traffic not back on the direct path within 20 s: {:?} / {:?}, relays forwarded {}",
                                w_ref.path(A, B),
                                w_ref.path(B, A),
                                w_ref.forwarded()
                            );
                        }
                        let (x, y) = w_ref.paths();
                        let both =
                            x.is_some_and(|p| p.is_direct()) && y.is_some_and(|p| p.is_direct());
                        let c = w_ref.forwarded();
                        watch.poll(t0.elapsed().as_millis() as u64, both, c);
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Ok(())
                },
            )?
        };
        let back = watch.returned_ms().context("return time")? as f64;
        s.entry("return_direct").or_default().push(back);
        s.entry("return_loss").or_default().push(return_loss_ms);
        eprintln!(
            "  back on the direct path: {back:.0} ms (pings {received}/{sent}, longest gap {return_loss_ms:.0} ms)"
        );
        if !direct_first {
            measure(&w, "direct", args.secs, &mut port, &mut s)?;
        }
        log.push(json!({
            "round": round + 1,
            "order": if direct_first { ["direct", "relayed"] } else { ["relayed", "direct"] },
            "relay_1_to_2": relay_ab.to_string(),
            "relay_2_to_1": relay_ba.to_string(),
            "failover_from_host": first,
            "failover_to_host": other,
            "relayed_packets_during_measurement": forwarded,
        }));
    }

    let figures = figures(&s);
    print_table(args, &figures);
    let relay_status: Vec<Value> = RELAYS
        .iter()
        .map(|&r| {
            w.g.discovery_json(r)
                .map(|d| d["relay"].clone())
                .unwrap_or(Value::Null)
        })
        .collect();
    let extra = json!({
        "rounds": args.rounds,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "daemons": vrouter_tests::mesh::bin_dir().map(|d| d.display().to_string()).unwrap_or_default(),
        "secs_per_iperf_run": args.secs,
        "pings_per_sample": PINGS,
        "outage_ping_interval_ms": OUTAGE_PING_MS,
        "tcp_mss": MSS,
        "path_probe_ms": PATH_PROBE_MS,
        "path_dead_ms": PATH_DEAD_MS,
        "hosts": {
            "stacks": {"a": A, "b": B},
            "relays": RELAYS,
            "underlay": (1..=4).map(|h| w.ip(h).to_string()).collect::<Vec<_>>(),
        },
        "round_log": log,
        "machine_notes": {
            "load_before": load_before,
            "load_after": loadavg(),
            "note": "1, 5 and 15-minute load averages from /proc/loadavg when the run started and ended; the machine is shared, so a load above the CPU count means other work ran beside the bench",
        },
        "relay_status_at_end": relay_status,
        "method": "iperf3 -c <b> -t <secs> -P 1 -M 1410 -J from service a against iperf3 -s -1 in service b, end.sum_received.bits_per_second; ping -c 20 -i 0.05 average; direct and relayed in alternating order per round; ratios per round, median reported. UDP between hosts blocked by nftables rules on the underlay bridge (ICMP and TCP pass). Outages: vrt-probe ping every 10 ms on a fixed schedule from service a to service b, the longest run of unanswered requests times 10 ms. Return: from the unblock until both hosts' discovery.json paths say via=direct and the relays' nftables forward counters (read every 50 ms) have not risen for 500 ms, the later of the two",
    });
    write_results(&args.out, "relay", &command, &figures, extra)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn figures(s: &BTreeMap<&'static str, Samples>) -> Vec<Figure> {
    let get = |k: &str| s.get(k).cloned().unwrap_or_default();
    let mut figs = Vec::new();
    for (key, label, unit) in [
        (
            "direct.tcp1",
            "single-stream TCP, direct path (service a -> service b)",
            "Mbit/s",
        ),
        (
            "relayed.tcp1",
            "single-stream TCP, relayed (UDP 1<->2 blocked, through a relay host)",
            "Mbit/s",
        ),
        ("direct.ping", "ping RTT, direct path", "ms"),
        ("relayed.ping", "ping RTT, relayed", "ms"),
    ] {
        figs.push(Figure::new(&format!("relay.{key}"), label, unit, get(key)));
    }
    figs.extend(ratio_figures(s));
    figs.push(Figure::new(
        "relay.switch_to_relay",
        "outage when the direct path is cut until a relay carries the traffic",
        "ms",
        get("switch_to_relay"),
    ));
    figs.push(
        Figure::new(
            "relay.failover",
            "outage when the relay in use is cut off until the other relay carries the traffic",
            "ms",
            get("failover"),
        )
        .with_target(Target::AtMost(FAILOVER_TARGET_MS)),
    );
    figs.push(Figure::new(
        "relay.return_direct",
        "from the direct path's return until traffic is back on it (both hosts direct, relays' counters still)",
        "ms",
        get("return_direct"),
    ));
    figs.push(Figure::new(
        "relay.return_loss",
        "longest gap in 10 ms pings while traffic moves back to the direct path",
        "ms",
        get("return_loss"),
    ));
    figs
}

/// relayed / direct per round, for throughput and ping RTT.
fn ratio_figures(s: &BTreeMap<&'static str, Samples>) -> Vec<Figure> {
    let mut figs = Vec::new();
    for (metric, what) in [("tcp1", "single-stream TCP"), ("ping", "ping RTT")] {
        let (Some(x), Some(y)) = (
            s.get(format!("relayed.{metric}").as_str()),
            s.get(format!("direct.{metric}").as_str()),
        ) else {
            continue;
        };
        figs.push(Figure::new(
            &format!("relay.ratio.relayed_direct.{metric}"),
            &format!("{what}, relayed / direct (per round)"),
            "ratio",
            Samples(x.0.iter().zip(&y.0).map(|(x, y)| x / y).collect()),
        ));
    }
    figs
}

fn print_table(args: &Args, figs: &[Figure]) {
    println!(
        "\ndocker-vrouter relays ({} rounds, median; iperf3 {} s runs)",
        args.rounds, args.secs
    );
    println!("{:<28} {:>10} {:>8}  unit", "figure", "median", "spread");
    for f in figs.iter().filter(|f| f.unit != "ratio") {
        let target = f
            .target
            .map(|t| format!("  {}", t.verdict(f.samples.median(), &f.unit)))
            .unwrap_or_default();
        println!(
            "{:<28} {:>10.3} {:>8.2}  {}{target}",
            f.key.trim_start_matches("relay."),
            f.samples.median(),
            f.samples.spread(),
            f.unit
        );
    }
    print_ratios(figs, "relay.ratio.", 28);
}
