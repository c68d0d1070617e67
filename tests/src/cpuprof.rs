//! Where a process spends its CPU, for `vrt-enc-bench`: per-thread CPU time from
//! `/proc/<pid>/task/*/stat`, the machine's busy time from `/proc/stat`, and `perf
//! record -g` samples (read back with `perf script`) sorted into a few categories by
//! their leaf symbol and call chain.
//!
//! The parsers and the classification are pure, so they are unit-tested on text.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::cmd::exec_timeout;

/// Clock ticks per second of `/proc` CPU times (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// (thread name, utime + stime in ticks) from one `/proc/<pid>/task/<tid>/stat` line.
/// The name sits in parentheses and may hold spaces and parentheses itself, so the
/// fields are counted from the last `)`. Pure.
pub fn parse_task_stat(line: &str) -> Option<(String, u64)> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    if close < open {
        return None;
    }
    let comm = line[open + 1..close].to_string();
    // After ")": state (field 3), ... utime is field 14, stime 15 (1-based).
    let rest: Vec<&str> = line[close + 1..].split_whitespace().collect();
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// CPU ticks of every thread of `pid`: tid -> (name, ticks). Threads that end while
/// being read are skipped.
pub fn thread_ticks(pid: u32) -> Threads {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(text) = std::fs::read_to_string(e.path().join("stat")) {
            if let Some(v) = parse_task_stat(&text) {
                out.insert(tid, v);
            }
        }
    }
    out
}

/// (busy, total) ticks of all CPUs from the `cpu ` line of `/proc/stat` (idle and iowait
/// are not busy). Pure.
pub fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest counted in user already).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    Some((total - idle, total))
}

pub fn machine_ticks() -> Option<(u64, u64)> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// CPU used by the threads of some processes and by the machine over a window.
#[derive(Debug, Clone)]
pub struct CpuWindow {
    /// (process label, thread name) -> CPU seconds in the window, threads of the same
    /// name summed.
    pub threads: BTreeMap<(String, String), f64>,
    /// Busy fraction of the whole machine (all CPUs: 1.0 = every CPU busy).
    pub machine_busy: f64,
    pub secs: f64,
}

/// tid -> (thread name, CPU ticks).
type Threads = BTreeMap<u32, (String, u64)>;

/// A snapshot to diff: per process, its threads' ticks; the machine's ticks.
pub struct CpuSnapshot {
    procs: Vec<(String, Threads)>,
    machine: Option<(u64, u64)>,
    at: std::time::Instant,
}

pub fn snapshot(procs: &[(String, u32)]) -> CpuSnapshot {
    CpuSnapshot {
        procs: procs
            .iter()
            .map(|(label, pid)| (label.clone(), thread_ticks(*pid)))
            .collect(),
        machine: machine_ticks(),
        at: std::time::Instant::now(),
    }
}

/// What happened between two snapshots of the same processes.
pub fn window(before: &CpuSnapshot, after: &CpuSnapshot) -> CpuWindow {
    let tck = clk_tck();
    let mut threads = BTreeMap::new();
    for ((label, b), (_, a)) in before.procs.iter().zip(&after.procs) {
        for (tid, (name, ticks)) in a {
            let base = b.get(tid).map(|(_, t)| *t).unwrap_or(0);
            *threads.entry((label.clone(), name.clone())).or_insert(0.0) +=
                ticks.saturating_sub(base) as f64 / tck;
        }
    }
    let machine_busy = match (before.machine, after.machine) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) as f64 / (t1 - t0) as f64,
        _ => f64::NAN,
    };
    CpuWindow {
        threads,
        machine_busy,
        secs: after.at.duration_since(before.at).as_secs_f64(),
    }
}

impl CpuWindow {
    /// `{"secs", "machine_busy", "threads": [{"process", "thread", "cpu_s", "of_one_cpu"}]}`,
    /// busiest first, threads that used less than 1% of a CPU left out.
    pub fn to_json(&self) -> Value {
        let mut rows: Vec<(&(String, String), &f64)> = self.threads.iter().collect();
        rows.sort_by(|a, b| b.1.total_cmp(a.1));
        let threads: Vec<Value> = rows
            .into_iter()
            .filter(|(_, s)| **s / self.secs.max(1e-9) >= 0.01)
            .map(|((p, t), s)| {
                json!({
                    "process": p,
                    "thread": t,
                    "cpu_s": round3(*s),
                    "of_one_cpu": round3(*s / self.secs.max(1e-9)),
                })
            })
            .collect();
        json!({
            "secs": round3(self.secs),
            "machine_busy": round3(self.machine_busy),
            "threads": threads,
        })
    }

    /// CPU seconds of one process's threads, summed.
    pub fn process_cpu(&self, label: &str) -> f64 {
        self.threads
            .iter()
            .filter(|((p, _), _)| p == label)
            .map(|(_, s)| *s)
            .sum()
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// One frame of a `perf script` call chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub sym: String,
    pub dso: String,
}

/// One sample: the thread's name and its call chain, leaf first.
#[derive(Debug, Clone, PartialEq)]
pub struct PerfSample {
    pub comm: String,
    pub frames: Vec<Frame>,
}

/// Samples from `perf script -F comm,tid,ip,sym,dso` text: a header line `comm tid`,
/// then one indented `ip sym (dso)` line per frame, a blank line between samples.
/// Thread names with spaces are kept whole (the tid is the last word). Pure.
pub fn parse_perf_script(text: &str) -> Vec<PerfSample> {
    let mut out = Vec::new();
    let mut cur: Option<PerfSample> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            if let Some(s) = cur.take() {
                out.push(s);
            }
            continue;
        }
        if line.starts_with(|c: char| c.is_whitespace()) {
            let Some(s) = cur.as_mut() else { continue };
            let t = line.trim();
            // "<hex ip> <sym...> (<dso>)"
            let Some((_, rest)) = t.split_once(' ') else {
                continue;
            };
            let (sym, dso) = match (rest.rfind(" ("), rest.ends_with(')')) {
                (Some(i), true) => (&rest[..i], &rest[i + 2..rest.len() - 1]),
                _ => (rest, ""),
            };
            // perf appends "+0x1f" offsets with some options.
            let sym = sym.split("+0x").next().unwrap_or(sym).trim();
            s.frames.push(Frame {
                sym: sym.to_string(),
                dso: dso.to_string(),
            });
        } else {
            if let Some(s) = cur.take() {
                out.push(s);
            }
            let t = line.trim_end();
            let comm = match t.rsplit_once(' ') {
                Some((c, tid)) if tid.parse::<u32>().is_ok() => c.trim().to_string(),
                _ => t.to_string(),
            };
            cur = Some(PerfSample {
                comm,
                frames: Vec::new(),
            });
        }
    }
    if let Some(s) = cur.take() {
        out.push(s);
    }
    out
}

pub const CAT_CRYPTO: &str = "crypto: ChaCha20-Poly1305 and the Noise hashes (ring, boringtun)";
pub const CAT_ENGINE: &str =
    "userspace: engine and boringtun outside the cipher (framing, lookups, locks, copies)";
pub const CAT_LIBC: &str = "userspace: libc (memcpy, syscall wrappers)";
pub const CAT_TUN: &str = "kernel: TUN device read/write";
pub const CAT_UDP: &str = "kernel: UDP socket send/receive (IP output, GSO/GRO, veth transmit)";
pub const CAT_BEYOND: &str =
    "kernel: packet processing run in the engine's context (netif receive: VXLAN, bridge, steering, TCP of the flow)";
pub const CAT_WAIT: &str = "kernel: poll, futex, scheduling";
pub const CAT_KOTHER: &str = "kernel: other (syscall entry/exit, memory)";
pub const CAT_UNKNOWN: &str = "unresolved";

/// The categories in report order.
pub const CATEGORIES: [&str; 9] = [
    CAT_CRYPTO,
    CAT_ENGINE,
    CAT_LIBC,
    CAT_TUN,
    CAT_UDP,
    CAT_BEYOND,
    CAT_WAIT,
    CAT_KOTHER,
    CAT_UNKNOWN,
];

fn is_kernel(f: &Frame) -> bool {
    f.dso.contains("kernel.kallsyms") || f.dso.starts_with("[kernel")
}

fn is_crypto(sym: &str) -> bool {
    let s = sym.to_ascii_lowercase();
    [
        "chacha",
        "poly1305",
        "aead",
        "blake2",
        "x25519",
        "curve25519",
        "gcm",
    ]
    .iter()
    .any(|k| s.contains(k))
}

/// The kernel category of one kernel symbol, if it names one.
fn kernel_category(sym: &str) -> Option<&'static str> {
    const BEYOND: [&str; 8] = [
        "net_rx_action",
        "__do_softirq",
        "do_softirq",
        "handle_softirqs",
        "process_backlog",
        "netif_receive_skb",
        "__netif_receive_skb",
        "napi_",
    ];
    const TUN: [&str; 1] = ["tun_"];
    const UDP: [&str; 9] = [
        "udp_",
        "__udp",
        "udpv4",
        "ip_make_skb",
        "ip_finish_output",
        "ip_output",
        "__ip_append",
        "__dev_queue_xmit",
        "veth_xmit",
    ];
    const WAIT: [&str; 7] = [
        "do_sys_poll",
        "do_poll",
        "__schedule",
        "schedule",
        "futex",
        "pick_next",
        "finish_task_switch",
    ];
    let starts = |list: &[&str]| list.iter().any(|p| sym.starts_with(p));
    if starts(&BEYOND) {
        Some(CAT_BEYOND)
    } else if starts(&TUN) {
        Some(CAT_TUN)
    } else if starts(&UDP) {
        Some(CAT_UDP)
    } else if starts(&WAIT) {
        Some(CAT_WAIT)
    } else {
        None
    }
}

/// The category of one sample: a userspace leaf by its symbol and object; a kernel leaf
/// by the first frame, walking from the leaf towards the caller, that names a category
/// (so a copy inside the TUN write counts as TUN, and a softirq that runs inside a UDP
/// send as the packet processing it does). Pure.
pub fn classify(s: &PerfSample) -> &'static str {
    let Some(leaf) = s.frames.first() else {
        return CAT_UNKNOWN;
    };
    if is_kernel(leaf) {
        for f in s.frames.iter().take_while(|f| is_kernel(f)) {
            if let Some(c) = kernel_category(&f.sym) {
                return c;
            }
        }
        return CAT_KOTHER;
    }
    if is_crypto(&leaf.sym) {
        return CAT_CRYPTO;
    }
    if leaf.dso.contains("libc") || leaf.dso.contains("ld-linux") {
        return CAT_LIBC;
    }
    if leaf.sym == "[unknown]" || leaf.sym.is_empty() {
        return CAT_UNKNOWN;
    }
    CAT_ENGINE
}

/// The samples summed: by category, by thread name, and the leaf symbols most seen.
pub fn breakdown(samples: &[PerfSample], top: usize) -> Value {
    let n = samples.len().max(1) as f64;
    let share = |c: usize| (c as f64 / n * 1000.0).round() / 1000.0;
    let mut cats: BTreeMap<&str, usize> = BTreeMap::new();
    let mut threads: BTreeMap<String, BTreeMap<&str, usize>> = BTreeMap::new();
    let mut syms: BTreeMap<(String, String), usize> = BTreeMap::new();
    for s in samples {
        let c = classify(s);
        *cats.entry(c).or_default() += 1;
        *threads
            .entry(s.comm.clone())
            .or_default()
            .entry(c)
            .or_default() += 1;
        if let Some(leaf) = s.frames.first() {
            let dso = Path::new(&leaf.dso)
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_else(|| leaf.dso.clone());
            *syms.entry((leaf.sym.clone(), dso)).or_default() += 1;
        }
    }
    let by_category: Vec<Value> = CATEGORIES
        .iter()
        .filter_map(|c| {
            cats.get(c)
                .map(|k| json!({"category": c, "samples": k, "share": share(*k)}))
        })
        .collect();
    let mut by_thread: Vec<(String, usize, BTreeMap<&str, usize>)> = threads
        .into_iter()
        .map(|(t, m)| (t, m.values().sum(), m))
        .collect();
    by_thread.sort_by_key(|t| std::cmp::Reverse(t.1));
    let by_thread: Vec<Value> = by_thread
        .into_iter()
        .map(|(t, k, m)| {
            let split: serde_json::Map<String, Value> = CATEGORIES
                .iter()
                .filter_map(|c| m.get(c).map(|v| (c.to_string(), json!(share(*v)))))
                .collect();
            json!({"thread": t, "samples": k, "share": share(k), "categories": split})
        })
        .collect();
    let mut syms: Vec<((String, String), usize)> = syms.into_iter().collect();
    syms.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let top_symbols: Vec<Value> = syms
        .into_iter()
        .take(top)
        .map(|((sym, dso), k)| json!({"symbol": sym, "object": dso, "samples": k, "share": share(k)}))
        .collect();
    json!({
        "samples": samples.len(),
        "by_category": by_category,
        "by_thread": by_thread,
        "top_symbols": top_symbols,
    })
}

/// Whether `perf record` can sample here (the software cpu-clock event: this machine's
/// virtual CPUs may have no hardware counters). Err says why not.
pub fn perf_available() -> Result<()> {
    let out = exec_timeout(
        None,
        &["perf", "stat", "-e", "cpu-clock", "true"],
        Duration::from_secs(10),
    )
    .context("running perf (apt-get install linux-perf)")?;
    if out.code != Some(0) {
        bail!("perf stat -e cpu-clock failed: {}", out.stderr.trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_stat_with_odd_names() {
        let line = "4242 (wg-tun-rx) S 1 2 3 0 -1 4194368 10 0 0 0 750 250 0 0 20 0 5 0 100 0 0";
        assert_eq!(parse_task_stat(line), Some(("wg-tun-rx".into(), 1000)));
        let line = "7 (a (b) c) R 1 2 3 0 -1 0 0 0 0 0 3 4 0 0 20 0 1 0 1 0 0";
        assert_eq!(parse_task_stat(line), Some(("a (b) c".into(), 7)));
        assert_eq!(parse_task_stat("garbage"), None);
        assert_eq!(parse_task_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn proc_stat_busy_and_total() {
        let text = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n";
        assert_eq!(parse_proc_stat(text), Some((150, 1000)));
        assert_eq!(parse_proc_stat("intr 1 2 3"), None);
    }

    const SCRIPT: &str = "\
wg-tun-rx 4243 
\t    7f1234 ring_core_0_17_14__chacha20_poly1305_seal_avx2 (/run/bin/vrouter-discovery)
\t    7f0000 [unknown] ([unknown])

wg-udp-rx 4244 
\tffffffff81234567 copy_user_enhanced_fast_string ([kernel.kallsyms])
\tffffffff81234000 tun_get_user ([kernel.kallsyms])
\tffffffff81230000 tun_chr_write_iter ([kernel.kallsyms])
\t    7f2222 __libc_write (/usr/lib/x86_64-linux-gnu/libc.so.6)

wg-tun-rx 4243 
\tffffffff81000001 tcp_v4_rcv+0x10 ([kernel.kallsyms])
\tffffffff81000002 __netif_receive_skb_core ([kernel.kallsyms])
\tffffffff81000003 net_rx_action ([kernel.kallsyms])
\tffffffff81000004 udp_sendmsg ([kernel.kallsyms])

wg-tun-rx 4243 
\tffffffff81000011 veth_xmit ([kernel.kallsyms])
\tffffffff81000012 __dev_queue_xmit ([kernel.kallsyms])
\tffffffff81000013 udp_send_skb ([kernel.kallsyms])

tokio runtime w 4250 
\t    7f3333 memcpy (/usr/lib/x86_64-linux-gnu/libc.so.6)

wg-tun-rx 4243 
\t    7f4444 boringtun::noise::Tunn::encapsulate (/run/bin/vrouter-discovery)

wg-timers 4245 
\tffffffff81000021 entry_SYSCALL_64 ([kernel.kallsyms])
";

    #[test]
    fn perf_script_is_parsed_and_classified() {
        let s = parse_perf_script(SCRIPT);
        assert_eq!(s.len(), 7);
        assert_eq!(s[0].comm, "wg-tun-rx");
        assert_eq!(s[4].comm, "tokio runtime w");
        assert_eq!(s[2].frames[0].sym, "tcp_v4_rcv");
        assert_eq!(s[1].frames[3].dso, "/usr/lib/x86_64-linux-gnu/libc.so.6");
        let cats: Vec<&str> = s.iter().map(classify).collect();
        assert_eq!(
            cats,
            [CAT_CRYPTO, CAT_TUN, CAT_BEYOND, CAT_UDP, CAT_LIBC, CAT_ENGINE, CAT_KOTHER]
        );
        let b = breakdown(&s, 3);
        assert_eq!(b["samples"], 7);
        assert_eq!(b["top_symbols"].as_array().unwrap().len(), 3);
        assert_eq!(b["by_thread"][0]["thread"], "wg-tun-rx");
        assert_eq!(b["by_thread"][0]["samples"], 4);
        let crypto = b["by_category"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["category"] == CAT_CRYPTO)
            .unwrap();
        assert_eq!(crypto["samples"], 1);
        assert!(
            classify(&PerfSample {
                comm: "x".into(),
                frames: vec![]
            }) == CAT_UNKNOWN
        );
    }
}
