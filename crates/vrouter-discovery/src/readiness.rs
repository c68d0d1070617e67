//! Readiness (`/readyz`): the datapath is programmed and the state files are current.
//! The loop publishes what it knows after each reconcile ([`Readiness`]); the HTTP
//! task reads it and checks the VXLAN devices itself, so a device deleted between two
//! reconciles makes the host unready at once, not at the next reconcile.

use crate::status::LiveFacts;
use prometheus_client::metrics::histogram::Histogram;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vrouter_state::{StackName, Vni};

/// What the loop knows after a reconcile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readiness {
    /// routes.json holds what this process computes: it wrote it, or found it equal.
    pub routes_current: bool,
    /// Registered local routers whose attach connection is not open (a router restored
    /// from the previous run in its grace period, or one that went away).
    pub unattached: Vec<StackName>,
    /// The last state-directory write or writability check failed.
    pub state_error: Option<String>,
    /// `vxlan<VNI>` devices that should exist (up and in use).
    pub devices: Vec<Vni>,
    /// Devices that could not be made (VXLAN, and the WireGuard device or the encryption
    /// filter), with the operator's message.
    pub device_errors: Vec<String>,
    /// Local stacks refused by a limit (prefix cap, gossip record), with the reason.
    pub refused_local: Vec<String>,
}

impl Readiness {
    /// Why the host is not ready; empty when it is. `device_exists` looks a device up
    /// by name in the host namespace.
    pub fn not_ready(&self, device_exists: impl Fn(&str) -> bool) -> Vec<String> {
        let mut why = Vec::new();
        if !self.routes_current {
            why.push("routes.json has not been written by this discovery yet".to_string());
        }
        if let Some(e) = &self.state_error {
            why.push(format!("state directory not writable: {e}"));
        }
        for s in &self.unattached {
            why.push(format!(
                "router of stack {s} is registered but not attached"
            ));
        }
        for vni in &self.devices {
            let name = vni.vxlan_ifname();
            if !device_exists(&name) {
                why.push(format!(
                    "{name} is missing; the next reconcile recreates it"
                ));
            }
        }
        why.extend(self.device_errors.iter().cloned());
        why.extend(self.refused_local.iter().cloned());
        why
    }
}

#[derive(Debug, Default)]
struct Counts {
    readiness: Readiness,
    reconciles: u64,
    reconcile_errors: u64,
    last_reconcile: Option<Duration>,
    /// When the last reconcile completed.
    completed_at: Option<Instant>,
}

/// A control loop that completes no reconcile for this many intervals is stuck.
pub const STALL_INTERVALS: u32 = 3;

/// Why the control loop counts as stuck at `now`, if it does: no reconcile completed
/// within [`STALL_INTERVALS`] intervals (counted from the loop's start before the
/// first one). Pure.
pub fn stalled(
    completed_at: Option<Instant>,
    started: Instant,
    now: Instant,
    interval: Duration,
) -> Option<String> {
    let since = completed_at.unwrap_or(started);
    let age = now.saturating_duration_since(since);
    let limit = interval * STALL_INTERVALS;
    (age > limit).then(|| {
        format!(
            "the control loop has not completed a reconcile for {:.1} s ({STALL_INTERVALS} intervals of {:.1} s); it is stuck, see the log of its last step",
            age.as_secs_f64(),
            interval.as_secs_f64()
        )
    })
}

/// Shared between the loop (writer) and the HTTP task (reader). The lock is held only
/// to copy values, never across an await.
#[derive(Debug)]
pub struct Live {
    counts: Mutex<Counts>,
    pub reconcile_duration: Histogram,
    /// The loop's reconcile interval (it reconciles at least this often).
    interval: Duration,
    started: Instant,
}

impl Default for Live {
    fn default() -> Live {
        Live::new(Duration::from_secs(2))
    }
}

impl Live {
    pub fn new(interval: Duration) -> Live {
        Live {
            counts: Mutex::new(Counts::default()),
            reconcile_duration: crate::metrics::reconcile_histogram(),
            interval,
            started: Instant::now(),
        }
    }

    /// Why the control loop is stuck at `now`, if it is (see [`stalled`]).
    pub fn stalled(&self, now: Instant) -> Option<String> {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        stalled(c.completed_at, self.started, now, self.interval)
    }

    /// Records one reconcile and the readiness it left.
    pub fn reconciled(&self, took: Duration, ok: bool, readiness: Readiness) {
        self.reconcile_duration.observe(took.as_secs_f64());
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.reconciles += 1;
        if !ok {
            c.reconcile_errors += 1;
        }
        c.last_reconcile = Some(took);
        c.completed_at = Some(Instant::now());
        c.readiness = readiness;
    }

    /// The facts for `/readyz`, `/metrics` and `/v1/status`, checking devices live.
    pub fn facts(&self) -> LiveFacts {
        self.facts_at(Instant::now())
    }

    fn facts_at(&self, now: Instant) -> LiveFacts {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let mut not_ready = c.readiness.not_ready(device_exists);
        not_ready.extend(stalled(c.completed_at, self.started, now, self.interval));
        LiveFacts {
            ready: not_ready.is_empty(),
            not_ready,
            reconciles: c.reconciles,
            reconcile_errors: c.reconcile_errors,
            last_reconcile_ms: c.last_reconcile.map(|d| d.as_secs_f64() * 1000.0),
        }
    }
}

fn device_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(s: &str) -> StackName {
        StackName::new(s).unwrap()
    }

    #[test]
    fn each_cause_is_named_and_ready_needs_none() {
        let vni = Vni::new(1000).unwrap();
        let fine = Readiness {
            routes_current: true,
            devices: vec![vni],
            ..Readiness::default()
        };
        assert!(fine.not_ready(|_| true).is_empty());

        // Start: nothing written yet.
        let start = Readiness::default();
        let why = start.not_ready(|_| true);
        assert_eq!(why.len(), 1);
        assert!(why[0].contains("routes.json"), "{why:?}");

        // A local stack refused by a limit: named, and not ready.
        let mut capped = fine.clone();
        capped.refused_local = vec!["stack s101 would bring this host's prefixes to 516".into()];
        assert_eq!(capped.not_ready(|_| true), capped.refused_local);

        // A device deleted under us.
        let why = fine.not_ready(|n| n != "vxlan1000");
        assert_eq!(
            why,
            vec!["vxlan1000 is missing; the next reconcile recreates it"]
        );

        let mut broken = fine.clone();
        broken.state_error = Some("permission denied".into());
        broken.unattached = vec![stack("a")];
        broken.device_errors = vec!["cannot set up vxlan7".into()];
        let why = broken.not_ready(|_| true);
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(why[0].contains("not writable: permission denied"));
        assert!(why[1].contains("stack a is registered but not attached"));
        assert!(why[2].contains("vxlan7"));
    }

    #[test]
    fn a_loop_without_a_reconcile_for_three_intervals_is_stuck() {
        let t0 = Instant::now();
        let i = Duration::from_secs(2);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Before the first reconcile, counted from the start.
        assert_eq!(stalled(None, t0, at(6_000), i), None);
        let why = stalled(None, t0, at(6_001), i).unwrap();
        assert!(
            why.contains("6.0 s") && why.contains("3 intervals of 2.0 s"),
            "{why}"
        );
        // After one, from its completion.
        assert_eq!(stalled(Some(at(10_000)), t0, at(15_000), i), None);
        assert!(stalled(Some(at(10_000)), t0, at(16_500), i).is_some());
        // A clock reading before the completion is not a stall.
        assert_eq!(stalled(Some(at(10_000)), t0, at(9_000), i), None);
    }

    #[test]
    fn readiness_and_stall_come_from_the_same_facts() {
        let live = Live::new(Duration::from_millis(100));
        let ok = Readiness {
            routes_current: true,
            ..Readiness::default()
        };
        live.reconciled(Duration::from_millis(1), true, ok.clone());
        let now = Instant::now();
        assert!(live.facts_at(now).ready);
        assert!(live.stalled(now).is_none());
        let later = now + Duration::from_millis(400);
        let f = live.facts_at(later);
        assert!(!f.ready);
        assert!(
            f.not_ready[0].contains("has not completed a reconcile"),
            "{f:?}"
        );
        assert!(live.stalled(later).is_some());
        // The next reconcile clears it.
        live.reconciled(Duration::from_millis(1), true, ok);
        assert!(live.facts().ready);
    }

    #[test]
    fn live_counts_reconciles_and_checks_devices_by_name() {
        let live = Live::default();
        assert!(!live.facts().ready, "not ready before the first reconcile");
        live.reconciled(
            Duration::from_millis(3),
            true,
            Readiness {
                routes_current: true,
                ..Readiness::default()
            },
        );
        let f = live.facts();
        assert!(f.ready, "{f:?}");
        assert_eq!((f.reconciles, f.reconcile_errors), (1, 0));
        // A device name that cannot exist here.
        live.reconciled(
            Duration::from_millis(5),
            false,
            Readiness {
                routes_current: true,
                devices: vec![Vni::new(16_777_000).unwrap()],
                ..Readiness::default()
            },
        );
        let f = live.facts();
        assert!(!f.ready);
        assert!(f.not_ready[0].contains("vxlan16777000 is missing"), "{f:?}");
        assert_eq!((f.reconciles, f.reconcile_errors), (2, 1));
        assert_eq!(f.last_reconcile_ms, Some(5.0));
    }
}
