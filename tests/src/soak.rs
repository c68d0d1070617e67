//! `make soak`: an hour (or `--seconds N`) of churn on simulated gossip hosts, with
//! traffic checked continuously and the daemons' and kernel's footprint sampled.
//!
//! The pure parts (tested without root): [`Rng`] (seeded, so a run can be repeated),
//! the explanation windows ([`Window`], [`classify`], [`outages`]) and the leak
//! arithmetic ([`slope`], [`growth_per_hour`], [`fd_growth`], [`per_live_growth`]).
//! The run itself ([`run`]) needs root: it builds the mesh with
//! [`crate::gossip::GossipMesh`] and drives it.
//!
//! A failed check is *explained* when its time overlaps a churn window that touches
//! one of its two ends (a stack down or restarting, a host cut off or its discovery
//! restarting), extended by that window's settle time after it closes. Anything else
//! is *unexplained*; the verdict wants none.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};

use crate::bench::{write_results, Figure, Samples, Target};
use crate::gossip::GossipMesh;
use crate::interrupt;
use crate::mesh::StackDef;
use crate::probe::ping;

/// Failure detection target (docs/benchmarks.md: a cut host withdrawn everywhere
/// within 5 s, tests/tests/gossip.rs).
pub const FAILURE_DETECTION_S: f64 = 5.0;
/// Settle time after a restart or a stack's return: failure detection + 2 s.
pub const SETTLE_S: f64 = FAILURE_DETECTION_S + 2.0;
/// Settle time after a cut host is healed: membership and routes back (the gossip
/// tests' bound after a heal is 15 s).
pub const HEAL_SETTLE_S: f64 = 15.0;
/// RSS growth allowed per daemon after warm-up.
pub const RSS_MIB_PER_HOUR_MAX: f64 = 1.0;
/// Open descriptors: the median of the last quarter may exceed that of the second
/// quarter by at most this ([`fd_growth`]).
pub const FD_GROWTH_MAX: f64 = 1.0;
/// Daemons judged for leaks must have one instance living at least this share of the
/// run (churned ones live shorter: their slope says more about start-up than leaks).
pub const JUDGED_SHARE: f64 = 0.4;
/// Routers never restarted (with the discoveries of hosts 1 and 2): the leak sentinels.
pub const SENTINEL_ROUTERS: [&str; 2] = ["c1", "c2"];
/// Kernel objects and files: the second half's peak over the first half's, divided by
/// the same for what is live ([`per_live_growth`]), at most this.
pub const PER_LIVE_GROWTH_MAX: f64 = 1.25;

// ------------------------------------------------------------------------------------
// Pure parts

/// xorshift64* — seeded, no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    /// Uniform in `[a, b)`.
    pub fn range(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn chance(&mut self, p: f64) -> bool {
        self.range(0.0, 1.0) < p
    }
}

/// What a churn window touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every stack on this host.
    Host(usize),
    /// One stack.
    Stack(String),
}

/// A stretch of time in which the churn itself may break traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// `stack_down`, `router_restart`, `discovery_restart`, `host_cut`, `partition`.
    pub kind: String,
    pub scope: Scope,
    /// Seconds since the churn started.
    pub start: f64,
    /// When the cause ended (`None`: still open).
    pub end: Option<f64>,
    /// How long after `end` failures still count as explained.
    pub settle: f64,
}

impl Window {
    /// Whether the window touches a check between these two stacks.
    pub fn touches(&self, c: &Check) -> bool {
        match &self.scope {
            Scope::Host(h) => c.from_host == *h || c.to_host == *h,
            Scope::Stack(s) => c.from == *s || c.to == *s,
        }
    }
    /// Whether it explains check `c` (touches it and overlaps it in time).
    pub fn explains(&self, c: &Check) -> bool {
        let until = self.end.map_or(f64::INFINITY, |e| e + self.settle);
        self.touches(c) && c.t1 >= self.start && c.t0 <= until
    }
}

/// One traffic check from one stack's service to another's.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// Start and end, seconds since the churn started.
    pub t0: f64,
    pub t1: f64,
    pub from: String,
    pub to: String,
    pub from_host: usize,
    pub to_host: usize,
    pub ok: bool,
}

impl Check {
    /// The unordered pair, as `a|b`.
    pub fn pair(&self) -> String {
        if self.from <= self.to {
            format!("{}|{}", self.from, self.to)
        } else {
            format!("{}|{}", self.to, self.from)
        }
    }
}

/// Per check: `None` if it passed, `Some(kind)` of the first window explaining a
/// failure, `Some("unexplained")` otherwise.
pub fn classify(checks: &[Check], windows: &[Window]) -> Vec<Option<String>> {
    checks
        .iter()
        .map(|c| {
            if c.ok {
                return None;
            }
            Some(
                windows
                    .iter()
                    .find(|w| w.explains(c))
                    .map_or_else(|| "unexplained".to_string(), |w| w.kind.clone()),
            )
        })
        .collect()
}

/// A run of failed checks of one pair: from the first failure's start to the start of
/// the next passing check (or the last failure's end).
#[derive(Debug, Clone, PartialEq)]
pub struct Outage {
    pub pair: String,
    pub start: f64,
    pub end: f64,
    pub failed: usize,
    /// Failed checks in it that no window explains.
    pub unexplained: usize,
    /// Kinds of the windows that explain its failures.
    pub kinds: BTreeSet<String>,
    /// How long it lasted after the last explaining cause ended (0 if it ended while
    /// a cause was still on).
    pub recovery: f64,
}

impl Outage {
    pub fn duration(&self) -> f64 {
        self.end - self.start
    }
}

/// A pair not checked for this long (one of its stacks was down) ends its outage at
/// the last failure: the time in between says nothing about the pair.
pub const OUTAGE_GAP_S: f64 = 15.0;

/// Groups failed checks into outages per pair (checks in time order per pair). An
/// outage ends at the next passing check, or at its last failure when the next check
/// of the pair comes more than [`OUTAGE_GAP_S`] later.
pub fn outages(checks: &[Check], windows: &[Window]) -> Vec<Outage> {
    let mut by_pair: BTreeMap<String, Vec<&Check>> = BTreeMap::new();
    for c in checks {
        by_pair.entry(c.pair()).or_default().push(c);
    }
    let mut out = Vec::new();
    for (pair, mut cs) in by_pair {
        cs.sort_by(|a, b| a.t0.total_cmp(&b.t0));
        let mut cur: Option<(Outage, f64)> = None; // (outage, latest cause end)
        for c in cs {
            if let Some((o, _)) = &cur {
                if c.t0 > o.end + OUTAGE_GAP_S {
                    let (mut o, cause_end) = cur.take().unwrap();
                    o.recovery = (o.end - cause_end).max(0.0);
                    out.push(o);
                }
            }
            if c.ok {
                if let Some((mut o, cause_end)) = cur.take() {
                    o.end = c.t0;
                    o.recovery = (o.end - cause_end).max(0.0);
                    out.push(o);
                }
                continue;
            }
            let ws: Vec<&Window> = windows.iter().filter(|w| w.explains(c)).collect();
            let cause_end = ws
                .iter()
                .map(|w| w.end.unwrap_or(f64::INFINITY))
                .fold(f64::NEG_INFINITY, f64::max);
            let o = cur.get_or_insert_with(|| {
                (
                    Outage {
                        pair: pair.clone(),
                        start: c.t0,
                        end: c.t1,
                        failed: 0,
                        unexplained: 0,
                        kinds: BTreeSet::new(),
                        recovery: 0.0,
                    },
                    f64::NEG_INFINITY,
                )
            });
            o.0.failed += 1;
            o.0.end = c.t1;
            if ws.is_empty() {
                o.0.unexplained += 1;
            }
            o.0.kinds.extend(ws.iter().map(|w| w.kind.clone()));
            o.1 = o.1.max(cause_end);
        }
        if let Some((mut o, cause_end)) = cur {
            o.recovery = if cause_end.is_finite() {
                (o.end - cause_end).max(0.0)
            } else {
                0.0
            };
            out.push(o);
        }
    }
    for o in &mut out {
        if !o.recovery.is_finite() {
            o.recovery = 0.0;
        }
    }
    out
}

/// Least-squares slope of `y` over `x`; 0 with fewer than 2 distinct x.
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 {
        return 0.0;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    sxy / sxx
}

/// Growth per hour of `(seconds, value)` samples after warm-up: the slope of a linear
/// fit over the second half (by time), times 3600.
pub fn growth_per_hour(points: &[(f64, f64)]) -> f64 {
    let Some(first) = points.first() else {
        return 0.0;
    };
    let last = points.last().unwrap_or(first);
    let mid = first.0 + (last.0 - first.0) / 2.0;
    let half: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.0 >= mid).collect();
    slope(&half) * 3600.0
}

fn quarter_median(points: &[(f64, f64)], q: usize) -> Option<f64> {
    let (a, b) = (points.first()?.0, points.last()?.0);
    let len = (b - a) / 4.0;
    let (lo, hi) = (a + len * q as f64, a + len * (q + 1) as f64);
    let v: Vec<f64> = points
        .iter()
        .filter(|p| p.0 >= lo && p.0 <= hi)
        .map(|p| p.1)
        .collect();
    (!v.is_empty()).then(|| Samples(v).median())
}

/// Descriptor growth: the median count of the last quarter minus the median of the
/// second quarter (the first quarter is warm-up). Medians, because descriptors open for
/// a moment (a probe, a reconnect) are not a leak; a leak raises the baseline.
pub fn fd_growth(points: &[(f64, f64)]) -> f64 {
    match (quarter_median(points, 1), quarter_median(points, 3)) {
        (Some(a), Some(b)) => b - a,
        _ => 0.0,
    }
}

/// For `(seconds, count, live)` samples: how much the count's peak grew from the
/// first half to the second, over how much the peak of what is live grew (1.0: the
/// count follows what is live; 1.0 when nothing is measured). Peaks, not per-sample
/// ratios: kernel objects lag a stack's going by its grace period and withdrawal.
pub fn per_live_growth(points: &[(f64, f64, f64)]) -> f64 {
    let (Some(a), Some(b)) = (points.first(), points.last()) else {
        return 1.0;
    };
    let mid = a.0 + (b.0 - a.0) / 2.0;
    let peak = |second: bool, f: fn(&(f64, f64, f64)) -> f64| {
        points
            .iter()
            .filter(|p| (p.0 >= mid) == second)
            .map(f)
            .fold(0.0, f64::max)
    };
    let (c1, c2) = (peak(false, |p| p.1), peak(true, |p| p.1));
    let (l1, l2) = (peak(false, |p| p.2), peak(true, |p| p.2));
    if c1 == 0.0 {
        return if c2 == 0.0 { 1.0 } else { f64::INFINITY };
    }
    let live = if l1 > 0.0 && l2 > 0.0 { l2 / l1 } else { 1.0 };
    (c2 / c1) / live
}

// ------------------------------------------------------------------------------------
// The run

/// Options of `vrt-soak`.
#[derive(Debug, Clone)]
pub struct Options {
    pub seconds: f64,
    pub seed: u64,
    pub hosts: usize,
    pub encryption: bool,
    pub acl: bool,
    pub out: Option<PathBuf>,
    pub series: Option<PathBuf>,
    pub command: String,
}

#[derive(Debug, Clone)]
struct Target2 {
    name: String,
    host: usize,
    ns: String,
    ip: String,
}

struct Shared {
    live: BTreeSet<String>,
    checks: Vec<Check>,
}

/// The mesh's stacks: `cN` (core, always up but for router restarts) at 10.N.0.0/24
/// and `xN` (comes and goes) at 10.(100+N).0.0/24 on host N.
fn stacks(hosts: usize) -> Vec<StackDef> {
    let mut v = Vec::new();
    for h in 1..=hosts {
        for (p, o) in [("c", 0), ("x", 100)] {
            let name: &'static str = Box::leak(format!("{p}{h}").into_boxed_str());
            let cidr: &'static str = Box::leak(format!("10.{}.0.0/24", h + o).into_boxed_str());
            v.push(StackDef::new(name, h, 1000, cidr));
        }
    }
    v
}

fn proc_status(pid: u32) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss / 1024.0, fds as f64))
}

/// Kernel object counts of one namespace.
fn kernel_counts(ns: &str, host_ns: bool) -> BTreeMap<&'static str, f64> {
    let script = format!(
        "echo N=$(ip -o neigh show | wc -l); echo H=$(ip -o nexthop show 2>/dev/null | wc -l); \
         echo R=$(ip -o route show table all | wc -l); \
         echo C=$(cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null || echo 0); {} \
         echo J=$(nft -j list ruleset 2>/dev/null)",
        if host_ns {
            "echo F=$(bridge fdb show 2>/dev/null | grep -c ' dst ');"
        } else {
            ""
        }
    );
    let mut m = BTreeMap::new();
    let Ok(out) = crate::cmd::sh(Some(ns), &script) else {
        return m;
    };
    for line in out.stdout.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let key = match k {
            "N" => "neighbours",
            "H" => "nexthops",
            "R" => "routes",
            "C" => "conntrack",
            "F" => "fdb_rows",
            "J" => {
                let n = serde_json::from_str::<Value>(v)
                    .ok()
                    .and_then(|j| j["nftables"].as_array().cloned())
                    .map(|a| {
                        a.iter()
                            .filter_map(|o| o["set"]["elem"].as_array().map(|e| e.len()))
                            .sum::<usize>()
                            + a.iter()
                                .filter_map(|o| o["map"]["elem"].as_array().map(|e| e.len()))
                                .sum::<usize>()
                    })
                    .unwrap_or(0);
                m.insert("nft_elements", n as f64);
                continue;
            }
            _ => continue,
        };
        m.insert(key, v.trim().parse().unwrap_or(0.0));
    }
    m
}

struct Churn {
    windows: Vec<Window>,
    /// Index in `windows` of each open window, by a key (`stack:x1`, `host:3`).
    open: BTreeMap<String, usize>,
    counts: BTreeMap<String, u64>,
}

impl Churn {
    fn open(&mut self, key: &str, kind: &str, scope: Scope, t: f64, settle: f64) {
        self.windows.push(Window {
            kind: kind.into(),
            scope,
            start: t,
            end: None,
            settle,
        });
        self.open.insert(key.into(), self.windows.len() - 1);
        *self.counts.entry(kind.into()).or_default() += 1;
    }
    fn close(&mut self, key: &str, t: f64) {
        if let Some(i) = self.open.remove(key) {
            self.windows[i].end = Some(t);
        }
    }
}

/// Runs the soak and writes its results; see the module documentation.
pub fn run(opt: &Options) -> Result<()> {
    let hosts = opt.hosts.max(5);
    eprintln!(
        "vrt-soak: {hosts} hosts, {} s, seed {}, encryption {}, acl {}",
        opt.seconds, opt.seed, opt.encryption, opt.acl
    );
    let mut rng = Rng::new(opt.seed);
    let mut g = GossipMesh::build("soak", hosts, stacks(hosts))?;
    if opt.encryption {
        for h in 1..=hosts {
            g.mesh.set_discovery_env(h, "VROUTER_ENCRYPTION", "require");
            g.mesh
                .set_discovery_env(h, "VROUTER_WG_BACKEND", "userspace");
        }
    }
    if opt.acl {
        // A deny-by-default policy that still lets the checks' pings in.
        g.mesh
            .set_router_env("c1", "VROUTER_DEFAULT_POLICY", "deny");
        g.mesh.set_router_env("c1", "VROUTER_ALLOW", "any:icmp");
    }
    g.start_all()?;
    let took = g.wait_full_mesh(Duration::from_secs(120))?;
    eprintln!(
        "vrt-soak: full mesh after {took:?} (steering {:?})",
        g.steering().as_str()
    );

    let targets: Vec<Target2> = g
        .stacks
        .iter()
        .map(|s| {
            let svc = g.svc(s.name);
            Target2 {
                name: s.name.to_string(),
                host: s.host,
                ns: svc.ns.clone(),
                ip: svc.ip.to_string(),
            }
        })
        .collect();
    let core: Vec<String> = (1..=hosts).map(|h| format!("c{h}")).collect();
    let churners: Vec<String> = (1..=hosts).map(|h| format!("x{h}")).collect();
    let shared = Arc::new(Mutex::new(Shared {
        live: targets.iter().map(|t| t.name.clone()).collect(),
        checks: Vec::new(),
    }));
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let checker = {
        let (shared, stop, targets) = (shared.clone(), stop.clone(), targets.clone());
        std::thread::spawn(move || check_loop(&shared, &stop, &targets, t0))
    };

    let mut churn = Churn {
        windows: Vec::new(),
        open: BTreeMap::new(),
        counts: BTreeMap::new(),
    };
    let short = opt.seconds < 900.0;
    let now = || t0.elapsed().as_secs_f64();
    let mut next_stack = rng.range(3.0, 8.0);
    let mut next_cut = if short {
        rng.range(30.0, 60.0)
    } else {
        rng.range(90.0, 180.0)
    };
    let mut cut: Option<(usize, bool, f64)> = None; // host, partition?, heal at
    let mut next_discovery = rng.range(40.0, 90.0);
    let mut next_router = rng.range(20.0, 45.0);
    let mut next_sample = 0.0;
    let mut next_progress = 60.0;
    let mut samples: Vec<Value> = Vec::new();
    let mut daemons: BTreeMap<String, Vec<(u32, f64, f64, f64)>> = BTreeMap::new(); // key -> (pid, t, rss, fds)
    let mut kernel: BTreeMap<String, Vec<(f64, f64, f64)>> = BTreeMap::new(); // kind -> (t, count, live)
    let mut routers_up: BTreeSet<String> = targets.iter().map(|t| t.name.clone()).collect();
    let host_of = |s: &str| targets.iter().find(|t| t.name == s).map_or(0, |t| t.host);
    let set_live = |s: &str, on: bool| {
        let mut sh = shared.lock().unwrap();
        if on {
            sh.live.insert(s.to_string());
        } else {
            sh.live.remove(s);
        }
    };

    let result: Result<()> = (|| {
        while now() < opt.seconds && !interrupt::stopped() {
            let t = now();
            if t >= next_sample {
                next_sample = t + 10.0;
                let s = sample(
                    &mut g,
                    t,
                    &routers_up,
                    cut.map(|c| c.0),
                    &mut daemons,
                    &mut kernel,
                    &shared,
                );
                samples.push(s);
            }
            if t >= next_progress {
                next_progress += 60.0;
                let sh = shared.lock().unwrap();
                let failed = sh.checks.iter().filter(|c| !c.ok).count();
                eprintln!(
                    "vrt-soak: {t:.0} s: {} checks, {failed} failed, churn {:?}",
                    sh.checks.len(),
                    churn.counts
                );
            }
            // A churn stack comes or goes.
            if t >= next_stack {
                next_stack = t + rng.range(3.0, 8.0);
                let s = churners[rng.below(churners.len())].clone();
                let key = format!("stack:{s}");
                if routers_up.contains(&s) {
                    set_live(&s, false);
                    churn.open(&key, "stack_down", Scope::Stack(s.clone()), now(), SETTLE_S);
                    let sig = if rng.chance(0.2) {
                        libc::SIGKILL
                    } else {
                        libc::SIGTERM
                    };
                    g.mesh.stop_router(&s, sig)?;
                    routers_up.remove(&s);
                } else {
                    g.mesh.start_router(&s)?;
                    routers_up.insert(s.clone());
                    churn.close(&key, now());
                    set_live(&s, true);
                }
            }
            // A host is cut off, later healed.
            if let Some((h, partition, heal_at)) = cut {
                if t >= heal_at {
                    if partition {
                        g.heal()?;
                    } else {
                        g.set_underlay_link(h, true)?;
                    }
                    churn.close(&format!("host:{h}"), now());
                    cut = None;
                    next_cut = now()
                        + if short {
                            rng.range(40.0, 70.0)
                        } else {
                            rng.range(120.0, 240.0)
                        };
                }
            } else if t >= next_cut {
                let h = 2 + rng.below(hosts - 1);
                // Link down and partition by turns.
                let partition = churn.counts.get("host_cut").copied().unwrap_or(0)
                    > churn.counts.get("partition").copied().unwrap_or(0);
                let kind = if partition { "partition" } else { "host_cut" };
                churn.open(
                    &format!("host:{h}"),
                    kind,
                    Scope::Host(h),
                    now(),
                    HEAL_SETTLE_S,
                );
                if partition {
                    let others: Vec<usize> = (1..=hosts).filter(|o| *o != h).collect();
                    g.partition(&[h], &others)?;
                } else {
                    g.set_underlay_link(h, false)?;
                }
                cut = Some((h, partition, now() + rng.range(15.0, 30.0)));
            }
            // Discovery restarts (SIGTERM or kill -9), down for a moment.
            if t >= next_discovery {
                next_discovery = t + rng.range(40.0, 90.0);
                // Hosts 1 and 2 keep their discovery for the whole run (leak sentinels).
                let h = 3 + rng.below(hosts - 2);
                let sig = if rng.chance(0.5) {
                    libc::SIGKILL
                } else {
                    libc::SIGTERM
                };
                let key = format!("discovery:{h}");
                churn.open(&key, "discovery_restart", Scope::Host(h), now(), SETTLE_S);
                g.mesh.stop_discovery(h, sig)?;
                std::thread::sleep(Duration::from_secs_f64(rng.range(0.2, 3.0)));
                g.mesh.start_discovery(h)?;
                churn.close(&key, now());
            }
            // A router restarts (a core or a live churn stack).
            if t >= next_router {
                next_router = t + rng.range(20.0, 45.0);
                // c1 and c2 keep their router for the whole run (leak sentinels).
                let pool: Vec<&String> = core
                    .iter()
                    .chain(churners.iter())
                    .filter(|s| routers_up.contains(*s) && !SENTINEL_ROUTERS.contains(&s.as_str()))
                    .collect();
                let s = pool[rng.below(pool.len())].clone();
                let sig = if rng.chance(0.5) {
                    libc::SIGKILL
                } else {
                    libc::SIGTERM
                };
                let key = format!("router:{s}");
                // 1 in 4 the way `docker restart` does it: SIGTERM, a fresh network
                // namespace with the same address, a new process.
                let fresh = rng.chance(0.25);
                let kind = if fresh {
                    "router_recreate"
                } else {
                    "router_restart"
                };
                churn.open(&key, kind, Scope::Stack(s.clone()), now(), SETTLE_S);
                if fresh {
                    g.mesh.restart_router_fresh_ns(&s)?;
                } else {
                    g.mesh.stop_router(&s, sig)?;
                    g.mesh.start_router(&s)?;
                }
                churn.close(&key, now());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })();
    if let Err(e) = &result {
        eprintln!("vrt-soak: churn stopped early: {e:#}");
    }
    let end = now();
    stop.store(true, Ordering::SeqCst);
    let _ = checker.join();
    // Close what is still open at the end (a check after the end cannot fall in it).
    let open: Vec<String> = churn.open.keys().cloned().collect();
    for k in open {
        churn.close(&k, end);
    }
    // One example (the first) of every event kind per host, to read what happened.
    let mut examples = serde_json::Map::new();
    for h in 1..=hosts {
        for e in g.events(h) {
            let k = e.kind.as_str().to_string();
            examples
                .entry(k)
                .or_insert_with(|| json!({"host": h, "source": e.source, "message": e.message}));
        }
    }
    let checks = std::mem::take(&mut shared.lock().unwrap().checks);
    let _ = host_of;
    let report = summarise(opt, end, &checks, &churn, &samples, &daemons, &kernel);
    if let Some(p) = &opt.out {
        write_results(p, "vrt-soak", &opt.command, &report.0, report.1.clone())?;
        eprintln!("vrt-soak: wrote {}", p.display());
    }
    if let Some(p) = &opt.series {
        let doc = json!({
            "bench": "vrt-soak-series",
            "seconds": end,
            "seed": opt.seed,
            "samples": samples,
            "windows": churn.windows.iter().map(|w| json!({
                "kind": w.kind,
                "scope": match &w.scope { Scope::Host(h) => format!("host {h}"), Scope::Stack(s) => format!("stack {s}") },
                "start": w.start, "end": w.end, "settle": w.settle,
            })).collect::<Vec<_>>(),
            "failed_checks": report.2,
            "event_examples": examples,
        });
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        crate::write_file_atomic(p, serde_json::to_vec(&doc)?)?;
        eprintln!("vrt-soak: wrote {}", p.display());
    }
    println!("{}", serde_json::to_string_pretty(&report.1["verdict"])?);
    result?;
    if report.1["verdict"]["ok"] != json!(true) {
        anyhow::bail!("verdict failed (see the verdict above and {:?})", opt.out);
    }
    Ok(())
}

/// The checker thread: rounds over the unordered pairs of live stacks (one direction,
/// alternating per round), four pings at a time; each check is 3 echo requests within
/// 2 s, ok if one is answered.
fn check_loop(shared: &Mutex<Shared>, stop: &AtomicBool, targets: &[Target2], t0: Instant) {
    let mut round = 0u64;
    while !stop.load(Ordering::SeqCst) && !interrupt::stopped() {
        round += 1;
        let live = shared.lock().unwrap().live.clone();
        let live: Vec<&Target2> = targets.iter().filter(|t| live.contains(&t.name)).collect();
        let mut pairs = Vec::new();
        for (i, a) in live.iter().enumerate() {
            for b in &live[i + 1..] {
                pairs.push(if round.is_multiple_of(2) {
                    (*a, *b)
                } else {
                    (*b, *a)
                });
            }
        }
        for chunk in pairs.chunks(4) {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let results: Vec<Check> = std::thread::scope(|s| {
                let hs: Vec<_> = chunk
                    .iter()
                    .map(|(a, b)| {
                        s.spawn(move || {
                            let c0 = t0.elapsed().as_secs_f64();
                            let ok = ping(&a.ns, &b.ip, 3, Duration::from_secs(2));
                            Check {
                                t0: c0,
                                t1: t0.elapsed().as_secs_f64(),
                                from: a.name.clone(),
                                to: b.name.clone(),
                                from_host: a.host,
                                to_host: b.host,
                                ok,
                            }
                        })
                    })
                    .collect();
                hs.into_iter().filter_map(|h| h.join().ok()).collect()
            });
            shared.lock().unwrap().checks.extend(results);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One sample: daemons' RSS and descriptors, events per kind, kernel counts with what
/// is live, gossip members, failed checks so far.
fn sample(
    g: &mut GossipMesh,
    t: f64,
    routers_up: &BTreeSet<String>,
    cut_host: Option<usize>,
    daemons: &mut BTreeMap<String, Vec<(u32, f64, f64, f64)>>,
    kernel: &mut BTreeMap<String, Vec<(f64, f64, f64)>>,
    shared: &Mutex<Shared>,
) -> Value {
    let hosts = g.topo.hosts().len();
    let mut procs = serde_json::Map::new();
    let mut pids: Vec<(String, u32)> = Vec::new();
    for h in 1..=hosts {
        pids.push((format!("h{h}/discovery"), g.mesh.discovery(h).pid()));
    }
    for s in routers_up {
        pids.push((format!("{s}/router"), g.mesh.router(s).pid()));
    }
    for (key, pid) in pids {
        if let Some((rss, fds)) = proc_status(pid) {
            daemons
                .entry(key.clone())
                .or_default()
                .push((pid, t, rss, fds));
            procs.insert(key, json!({"pid": pid, "rss_mib": rss, "fds": fds}));
        }
    }
    // Events per kind (cumulative, all hosts), events.log sizes, probes files, members.
    let mut events: BTreeMap<String, u64> = BTreeMap::new();
    let (mut log_bytes, mut probe_files, mut members, mut member_stacks) = (0u64, 0u64, 0u64, 0u64);
    for h in 1..=hosts {
        for e in g.events(h) {
            *events.entry(e.kind.as_str().to_string()).or_default() += 1;
        }
        let dir = g.state_dir(h);
        log_bytes += std::fs::metadata(dir.join("events.log")).map_or(0, |m| m.len());
        // Probe files proper (`<stack>.json`), not a write's temporary file.
        probe_files += std::fs::read_dir(dir.join("probes"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                    .count() as u64
            })
            .unwrap_or(0);
        let ms = g.members(h);
        members += ms.len() as u64;
        member_stacks += ms.iter().map(|m| m.stacks.len() as u64).sum::<u64>();
    }
    let live_stacks = routers_up.len() as f64;
    let live_hosts = hosts as f64 - cut_host.map_or(0.0, |_| 1.0);
    // Kernel objects: host namespaces and router namespaces.
    let mut k: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut spaces: Vec<(String, bool)> = g
        .topo
        .hosts()
        .iter()
        .map(|h| (h.ns.clone(), true))
        .collect();
    for s in g.stacks.clone() {
        spaces.push((g.rtr(s.name).ns.clone(), false));
    }
    for (ns, is_host) in spaces {
        for (key, v) in kernel_counts(&ns, is_host) {
            *k.entry(key).or_default() += v;
        }
    }
    // What each count is paired with: live stacks seen from every host (remote rows,
    // neighbours, routes scale with hosts x stacks), or live stacks.
    let pairs_live = live_stacks * live_hosts;
    let mut kern = serde_json::Map::new();
    for (key, v) in &k {
        kernel
            .entry(key.to_string())
            .or_default()
            .push((t, *v, pairs_live));
        kern.insert(key.to_string(), json!(v));
    }
    for (key, v, live) in [
        ("probes_files", probe_files as f64, live_stacks),
        ("events_log_bytes", log_bytes as f64, 1.0),
        ("gossip_members", members as f64, live_hosts * hosts as f64),
        ("gossip_member_stacks", member_stacks as f64, pairs_live),
    ] {
        if key != "events_log_bytes" {
            kernel.entry(key.into()).or_default().push((t, v, live));
        }
        kern.insert(key.into(), json!(v));
    }
    let (checks, failed) = {
        let sh = shared.lock().unwrap();
        (sh.checks.len(), sh.checks.iter().filter(|c| !c.ok).count())
    };
    json!({
        "t": t,
        "daemons": procs,
        "events": events,
        "drift_repairs": events.get("drift_repaired").copied().unwrap_or(0),
        "counts": kern,
        "live": {"stacks": live_stacks, "hosts": live_hosts, "stacks_x_hosts": pairs_live},
        "checks": checks,
        "failed_checks": failed,
    })
}

type Summary = (Vec<Figure>, Value, Vec<Value>);

fn summarise(
    opt: &Options,
    end: f64,
    checks: &[Check],
    churn: &Churn,
    samples: &[Value],
    daemons: &BTreeMap<String, Vec<(u32, f64, f64, f64)>>,
    kernel: &BTreeMap<String, Vec<(f64, f64, f64)>>,
) -> Summary {
    let classes = classify(checks, &churn.windows);
    let failed: Vec<(&Check, &String)> = checks
        .iter()
        .zip(&classes)
        .filter_map(|(c, k)| k.as_ref().map(|k| (c, k)))
        .collect();
    let unexplained = failed.iter().filter(|(_, k)| *k == "unexplained").count();
    let outs = outages(checks, &churn.windows);
    let longest = outs.iter().map(Outage::duration).fold(0.0, f64::max);
    let longest_unexplained = outs
        .iter()
        .filter(|o| o.unexplained > 0)
        .map(Outage::duration)
        .fold(0.0, f64::max);
    let mut recovery: BTreeMap<String, Samples> = BTreeMap::new();
    for o in outs.iter().filter(|o| o.unexplained == 0) {
        for k in &o.kinds {
            recovery.entry(k.clone()).or_default().push(o.recovery);
        }
    }
    // Leaks: per daemon series (host/role), the longest-lived instance.
    let mut rss_growth = serde_json::Map::new();
    let mut fd_growths = serde_json::Map::new();
    let (mut rss_max, mut fd_max) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for (key, pts) in daemons {
        let mut by_pid: BTreeMap<u32, Vec<(f64, f64, f64)>> = BTreeMap::new();
        for (pid, t, rss, fds) in pts {
            by_pid.entry(*pid).or_default().push((*t, *rss, *fds));
        }
        let Some(best) = by_pid.values().max_by(|a, b| {
            let span = |v: &Vec<(f64, f64, f64)>| v.last().unwrap().0 - v[0].0;
            span(a).total_cmp(&span(b))
        }) else {
            continue;
        };
        if best.len() < 4 {
            continue;
        }
        let rss: Vec<(f64, f64)> = best.iter().map(|p| (p.0, p.1)).collect();
        let fds: Vec<(f64, f64)> = best.iter().map(|p| (p.0, p.2)).collect();
        let (r, f) = (growth_per_hour(&rss), fd_growth(&fds));
        let span = best.last().unwrap().0 - best[0].0;
        let judged = span >= JUDGED_SHARE * end;
        if judged {
            rss_max = rss_max.max(r);
            fd_max = fd_max.max(f);
        }
        rss_growth.insert(
            key.clone(),
            json!({"mib_per_h": r, "instance_s": span, "instances": by_pid.len(), "judged": judged}),
        );
        fd_growths.insert(key.clone(), json!(f));
    }
    let mut bounded = serde_json::Map::new();
    let mut per_live_max = 1.0f64;
    for (key, pts) in kernel {
        let g = per_live_growth(pts);
        per_live_max = per_live_max.max(g);
        bounded.insert(key.clone(), json!(g));
    }
    let n = |v: f64| if v.is_finite() { v } else { 0.0 };
    let mut figures = vec![
        Figure::new(
            "soak.failed_checks_unexplained",
            "failed traffic checks no churn window explains",
            "count",
            Samples(vec![unexplained as f64]),
        )
        .with_target(Target::AtMost(0.0)),
        Figure::new(
            "soak.checks",
            "traffic checks (ping between every pair of live stacks)",
            "count",
            Samples(vec![checks.len() as f64]),
        ),
        Figure::new(
            "soak.failed_checks",
            "failed checks (explained and not)",
            "count",
            Samples(vec![failed.len() as f64]),
        ),
        Figure::new(
            "soak.longest_window_s",
            "longest outage of one pair (explained)",
            "s",
            Samples(vec![longest]),
        ),
        Figure::new(
            "soak.longest_unexplained_window_s",
            "longest outage with an unexplained failure",
            "s",
            Samples(vec![longest_unexplained]),
        )
        .with_target(Target::AtMost(0.0)),
        Figure::new(
            "soak.rss_growth_mib_per_h_max",
            "RSS growth after warm-up, worst daemon judged (fit over the second half of its longest-lived instance)",
            "MiB/h",
            Samples(vec![n(rss_max)]),
        )
        .with_target(Target::AtMost(RSS_MIB_PER_HOUR_MAX)),
        Figure::new(
            "soak.fd_growth_max",
            "open descriptors, last quarter's median minus second quarter's, worst daemon judged",
            "count",
            Samples(vec![n(fd_max)]),
        )
        .with_target(Target::AtMost(FD_GROWTH_MAX)),
        Figure::new(
            "soak.per_live_growth_max",
            "kernel objects, gossip records, probes files: peak growth from the first half to the second over that of what is live, worst",
            "ratio",
            Samples(vec![n(per_live_max)]),
        )
        .with_target(Target::AtMost(PER_LIVE_GROWTH_MAX)),
    ];
    for (kind, s) in &recovery {
        let settle = if kind == "host_cut" || kind == "partition" {
            HEAL_SETTLE_S
        } else {
            SETTLE_S
        };
        figures.push(
            Figure::new(
                &format!("soak.recovery_s.{kind}"),
                &format!(
                    "traffic back after the cause ended ({kind}; first passing check, per outage)"
                ),
                "s",
                s.clone(),
            )
            .with_target(Target::AtMost(settle)),
        );
    }
    let ok = unexplained == 0
        && n(rss_max) <= RSS_MIB_PER_HOUR_MAX
        && n(fd_max) <= FD_GROWTH_MAX
        && n(per_live_max) <= PER_LIVE_GROWTH_MAX;
    let failed_json: Vec<Value> = failed
        .iter()
        .map(
            |(c, k)| json!({"t0": c.t0, "t1": c.t1, "from": c.from, "to": c.to, "explained_by": k}),
        )
        .collect();
    let extra = json!({
        "seconds": end,
        "seed": opt.seed,
        "hosts": opt.hosts.max(5),
        "encryption": opt.encryption,
        "acl": opt.acl,
        "samples": samples.len(),
        "churn": churn.counts,
        "settle_s": SETTLE_S,
        "heal_settle_s": HEAL_SETTLE_S,
        "rss_growth": rss_growth,
        "fd_growth": fd_growths,
        "per_live_growth": bounded,
        "outages": outs.iter().map(|o| json!({
            "pair": o.pair, "start": o.start, "duration": o.duration(), "failed": o.failed,
            "unexplained": o.unexplained, "kinds": o.kinds, "recovery": o.recovery,
        })).collect::<Vec<_>>(),
        "verdict": {
            "ok": ok,
            "interrupted": interrupt::stopped(),
            "seconds": end,
            "checks": checks.len(),
            "failed_checks": failed.len(),
            "failed_checks_unexplained": unexplained,
            "longest_window_s": longest,
            "rss_growth_mib_per_h_max": n(rss_max),
            "fd_growth_max": n(fd_max),
            "per_live_growth_max": n(per_live_max),
            "churn": churn.counts,
        },
    });
    (figures, extra, failed_json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(t0: f64, from: &str, to: &str, ok: bool) -> Check {
        let host = |s: &str| s[1..].parse().unwrap();
        Check {
            t0,
            t1: t0 + 0.5,
            from: from.into(),
            to: to.into(),
            from_host: host(from),
            to_host: host(to),
            ok,
        }
    }

    fn window(kind: &str, scope: Scope, start: f64, end: Option<f64>, settle: f64) -> Window {
        Window {
            kind: kind.into(),
            scope,
            start,
            end,
            settle,
        }
    }

    #[test]
    fn windows_explain_only_their_scope_and_time() {
        let ws = vec![
            window(
                "stack_down",
                Scope::Stack("x2".into()),
                10.0,
                Some(20.0),
                7.0,
            ),
            window("host_cut", Scope::Host(3), 50.0, Some(60.0), 15.0),
            window("router_restart", Scope::Stack("c4".into()), 90.0, None, 7.0),
        ];
        let checks = vec![
            check(9.0, "c1", "x2", false),   // before the window: unexplained
            check(9.6, "c1", "x2", false),   // ends at 10.1: overlaps its start
            check(15.0, "x2", "c1", false),  // inside
            check(26.9, "c1", "x2", false),  // within the settle
            check(27.1, "c1", "x2", false),  // after the settle
            check(15.0, "c1", "c5", false),  // other stacks
            check(55.0, "c1", "x3", false),  // any stack on host 3
            check(74.9, "c3", "c1", false),  // heal settle
            check(76.0, "c3", "c1", false),  // after it
            check(500.0, "c4", "c1", false), // still open
            check(15.0, "c1", "x2", true),   // passed
        ];
        let c = classify(&checks, &ws);
        let k = |i: usize| c[i].as_deref();
        assert_eq!(k(0), Some("unexplained"));
        assert_eq!(k(1), Some("stack_down"));
        assert_eq!(k(2), Some("stack_down"));
        assert_eq!(k(3), Some("stack_down"));
        assert_eq!(k(4), Some("unexplained"));
        assert_eq!(k(5), Some("unexplained"));
        assert_eq!(k(6), Some("host_cut"));
        assert_eq!(k(7), Some("host_cut"));
        assert_eq!(k(8), Some("unexplained"));
        assert_eq!(k(9), Some("router_restart"));
        assert_eq!(k(10), None);
    }

    #[test]
    fn outages_group_failures_per_pair_with_recovery() {
        let ws = vec![window(
            "router_restart",
            Scope::Stack("c2".into()),
            10.0,
            Some(11.0),
            7.0,
        )];
        let checks = vec![
            check(8.0, "c1", "c2", true),
            check(10.0, "c1", "c2", false),
            check(12.0, "c2", "c1", false), // other direction, same pair
            check(14.0, "c1", "c2", true),
            check(20.0, "c1", "c3", false), // unexplained, never recovers
            check(30.0, "c1", "c2", false), // c2 then down (not checked) for a long time
            check(90.0, "c1", "c2", true),
        ];
        let o = outages(&checks, &ws);
        assert_eq!(o.len(), 3);
        assert_eq!(o[0].pair, "c1|c2");
        // The gap ends the second outage of c1|c2 at its failure.
        assert_eq!(o[1].pair, "c1|c2");
        assert_eq!((o[1].start, o[1].end, o[1].unexplained), (30.0, 30.5, 1));
        let o = [o[0].clone(), o[2].clone()];
        assert_eq!(o[0].failed, 2);
        assert_eq!(o[0].unexplained, 0);
        assert!((o[0].duration() - 4.0).abs() < 1e-9);
        assert!((o[0].recovery - 3.0).abs() < 1e-9);
        assert!(o[0].kinds.contains("router_restart"));
        assert_eq!(o[1].pair, "c1|c3");
        assert_eq!(o[1].unexplained, 1);
        assert_eq!(o[1].recovery, 0.0);
    }

    #[test]
    fn slope_and_growth() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 2.0 * i as f64 + 1.0)).collect();
        assert!((slope(&line) - 2.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 5.0), (1.0, 6.0)]), 0.0);
        // Warm-up (a jump in the first half) does not count: flat afterwards.
        let mut pts: Vec<(f64, f64)> = (0..100).map(|i| (i as f64 * 36.0, 30.0)).collect();
        for p in pts.iter_mut().take(20) {
            p.1 = 10.0 + p.0 / 36.0;
        }
        assert!(growth_per_hour(&pts).abs() < 1e-9);
        // A steady leak of 2 MiB/h over an hour is seen.
        let leak: Vec<(f64, f64)> = (0..361)
            .map(|i| (i as f64 * 10.0, 20.0 + 2.0 * i as f64 * 10.0 / 3600.0))
            .collect();
        assert!((growth_per_hour(&leak) - 2.0).abs() < 1e-6);
        assert!(growth_per_hour(&leak) > RSS_MIB_PER_HOUR_MAX);
    }

    #[test]
    fn fd_growth_and_per_live() {
        // A steady count with descriptors open for a moment now and then: flat.
        let flat: Vec<(f64, f64)> = (0..100)
            .map(|i| (i as f64, if i % 7 == 3 { 24.0 } else { 21.0 }))
            .collect();
        assert_eq!(fd_growth(&flat), 0.0);
        // One descriptor more every 10 samples: grows.
        let leak: Vec<(f64, f64)> = (0..100)
            .map(|i| (i as f64, 10.0 + (i / 10) as f64))
            .collect();
        assert!(fd_growth(&leak) > FD_GROWTH_MAX);
        // Counts proportional to live: bounded.
        let prop: Vec<(f64, f64, f64)> = (0..100)
            .map(|i| {
                let live = 5.0 + (i % 5) as f64;
                (i as f64, 3.0 * live, live)
            })
            .collect();
        assert!((per_live_growth(&prop) - 1.0).abs() < 1e-9);
        // Lagging what is live (objects of a stack gone stay a moment): bounded too.
        let lag: Vec<(f64, f64, f64)> = (0..100)
            .map(|i| (i as f64, 30.0, 5.0 + ((i + 1) % 6) as f64))
            .collect();
        assert!((per_live_growth(&lag) - 1.0).abs() < 1e-9);
        // Counts piling up while live stays put: unbounded.
        let pile: Vec<(f64, f64, f64)> = (0..100).map(|i| (i as f64, i as f64, 5.0)).collect();
        assert!(per_live_growth(&pile) > PER_LIVE_GROWTH_MAX);
        assert_eq!(per_live_growth(&[]), 1.0);
    }

    #[test]
    fn rng_is_seeded_and_bounded() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(Rng::new(8).next_u64(), xs[0]);
        let mut r = Rng::new(1);
        for _ in 0..1000 {
            assert!(r.below(5) < 5);
            let v = r.range(3.0, 8.0);
            assert!((3.0..8.0).contains(&v));
        }
    }

    #[test]
    fn stacks_are_core_and_churn_per_host() {
        let s = stacks(5);
        assert_eq!(s.len(), 10);
        assert!(s
            .iter()
            .any(|d| d.name == "c3" && d.host == 3 && d.cidr == "10.3.0.0/24"));
        assert!(s
            .iter()
            .any(|d| d.name == "x5" && d.host == 5 && d.cidr == "10.105.0.0/24"));
    }
}
