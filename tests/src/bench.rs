//! Shared pieces of the `make bench` binaries: repeated samples with their median and
//! spread, the machine a run happened on, and the raw JSON each binary writes to
//! `target/bench/` for `tests/bench-report.py`.
//!
//! Every figure in docs/benchmarks.md comes from one of these files; nothing is typed by
//! hand. A figure is a [`Figure`]: a name, a unit, the samples, and (where the issue sets
//! one) the target it is judged against.

use serde_json::{json, Value};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Repeated measurements of one quantity, in the order they were taken.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }
    /// The median (mean of the two middle values for an even count). NaN when empty.
    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }
    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }
    /// The spread as (max - min) / median: 0.10 means the samples span 10% of the median.
    pub fn spread(&self) -> f64 {
        (self.max() - self.min()) / self.median()
    }
    pub fn to_json(&self) -> Value {
        json!({
            "samples": self.0,
            "median": self.median(),
            "min": self.min(),
            "max": self.max(),
            "spread": self.spread(),
        })
    }
}

/// A target a figure is judged against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// The median must be at most this.
    AtMost(f64),
    /// The median must be at least this.
    AtLeast(f64),
}

impl Target {
    pub fn met(&self, value: f64) -> bool {
        match *self {
            Target::AtMost(t) => value <= t,
            Target::AtLeast(t) => value >= t,
        }
    }
    /// How `value` fares: "<= 1000 ms: met", ">= 0.9 ratio: NOT met".
    pub fn verdict(&self, value: f64, unit: &str) -> String {
        let (op, t) = match *self {
            Target::AtMost(t) => ("<=", t),
            Target::AtLeast(t) => (">=", t),
        };
        let met = if self.met(value) { "met" } else { "NOT met" };
        format!("{op} {t} {unit}: {met}")
    }
    pub fn to_json(&self) -> Value {
        match *self {
            Target::AtMost(t) => json!({"at_most": t}),
            Target::AtLeast(t) => json!({"at_least": t}),
        }
    }
}

/// One reported figure.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Stable key, e.g. `datapath.overlay.tcp1`.
    pub key: String,
    /// What it measures, for the table.
    pub label: String,
    /// Unit of the samples: `Mbit/s`, `ms`, `us`, `MiB`, `bytes`, `ratio`.
    pub unit: String,
    pub samples: Samples,
    pub target: Option<Target>,
}

impl Figure {
    pub fn new(key: &str, label: &str, unit: &str, samples: Samples) -> Figure {
        Figure {
            key: key.into(),
            label: label.into(),
            unit: unit.into(),
            samples,
            target: None,
        }
    }
    pub fn with_target(mut self, t: Target) -> Figure {
        self.target = Some(t);
        self
    }
    pub fn to_json(&self) -> Value {
        let mut v = self.samples.to_json();
        v["key"] = json!(self.key);
        v["label"] = json!(self.label);
        v["unit"] = json!(self.unit);
        if let Some(t) = self.target {
            v["target"] = t.to_json();
            v["met"] = json!(t.met(self.samples.median()));
        }
        v
    }
}

/// The machine and build a run happened on.
pub fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_model": cpu,
        "mem_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "commit": commit,
        "unix_time": unix,
    })
}

/// Writes one bench binary's results: `{"bench": name, "command": ..., "machine": ...,
/// "figures": [...], "extra": ...}`, atomically (temp file, rename).
pub fn write_results(
    path: &Path,
    bench: &str,
    command: &str,
    figures: &[Figure],
    extra: Value,
) -> anyhow::Result<()> {
    let doc = json!({
        "bench": bench,
        "command": command,
        "machine": machine(),
        "figures": figures.iter().map(Figure::to_json).collect::<Vec<_>>(),
        "extra": extra,
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&doc)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = Samples(vec![3.0, 1.0, 2.0]);
        assert_eq!(s.median(), 2.0);
        assert_eq!(s.spread(), 1.0);
        let s = Samples(vec![4.0, 1.0, 2.0, 3.0]);
        assert_eq!(s.median(), 2.5);
        assert!(Samples::default().median().is_nan());
    }

    #[test]
    fn targets() {
        assert!(Target::AtMost(1000.0).met(832.0));
        assert!(!Target::AtMost(1000.0).met(1001.0));
        assert!(Target::AtLeast(0.9).met(0.9));
        assert!(!Target::AtLeast(0.9).met(0.89));
        let f = Figure::new("k", "l", "ms", Samples(vec![5.0])).with_target(Target::AtMost(4.0));
        assert_eq!(f.to_json()["met"], json!(false));
    }
}
