//! Traffic statistics: bytes and packets forwarded to and from each remote stack,
//! counted by nftables in the router's namespace (see `vrouter_kernel::Nft`).
//!
//! Per remote prefix there are two rules in chain `traffic` of table `ip vrouter` at
//! the forward hook: `ip daddr <prefix> counter` (tx: from this stack toward the remote
//! stack) and `ip saddr <prefix> counter` (rx). The counters count IP bytes (header and
//! payload) of what the router forwards; its own probes are not forwarded and not
//! counted. They start at zero when a rule is created and survive router restarts in
//! the same namespace (the table stays); a new namespace (container restart) starts
//! over.
//!
//! Pure parts: [`desired`] (the counters this stack's routes call for), [`diff`]
//! against a dump (unchanged rules are kept so their counts go on) and [`aggregate`]
//! (per remote stack). [`TrafficCounters`] applies them and publishes a
//! [`TrafficReport`] on a watch channel, which the overlay-probe writer puts in
//! `probes/<stack>.json`. Without nf_tables (or the permission) the router goes on
//! routing: the error is logged once and carried in the report.

use crate::desired::DesiredRouter;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::sync::watch;
use vrouter_kernel::{CounterReading, Direction, Nft, PrefixCounter};
use vrouter_state::{StackName, StackTraffic};

/// The router's nftables table (family ip) and its counting chain.
pub const TABLE: &str = "vrouter";
pub const CHAIN: &str = "traffic";
/// How often the counters are read and published.
pub const READ_EVERY: Duration = Duration::from_secs(1);

/// What the router knows about its traffic, as published to the probe writer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrafficReport {
    /// Per remote stack, sorted by name. Empty while counting is impossible.
    pub stacks: Vec<StackTraffic>,
    /// Why the counters are missing or stale, if they are (for
    /// `RouterHealth::traffic_error`).
    pub error: Option<String>,
}

/// The counters this stack's routes call for: both directions of every routed remote
/// prefix, tagged with the stack that owns it.
pub fn desired(routes: &DesiredRouter) -> BTreeSet<PrefixCounter> {
    // Every route's gateway is a remote router, listed with its stack either as a
    // same-host peer or as an overlay-probe target.
    let mut owner: BTreeMap<Ipv4Addr, &StackName> = BTreeMap::new();
    for p in &routes.same_host {
        owner.entry(p.via).or_insert(&p.stack);
    }
    for r in &routes.remote_routers {
        owner.entry(r.via).or_insert(&r.stack);
    }
    let mut out = BTreeSet::new();
    for (prefix, via) in &routes.routes {
        let Some(stack) = owner.get(via) else {
            continue;
        };
        for direction in [Direction::ToPrefix, Direction::FromPrefix] {
            out.insert(PrefixCounter {
                stack: (*stack).clone(),
                prefix: *prefix,
                direction,
            });
        }
    }
    out
}

/// Changes that make the chain hold exactly the desired counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterPlan {
    pub add: Vec<PrefixCounter>,
    /// Handles of rules to delete: counters no longer desired, duplicates, and rules
    /// that are not ours.
    pub delete: Vec<u64>,
}

impl CounterPlan {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.delete.is_empty()
    }
}

/// Pure diff: a desired counter already in the chain is kept (its count goes on),
/// missing ones are added, everything else is deleted.
pub fn diff(desired: &BTreeSet<PrefixCounter>, dumped: &[CounterReading]) -> CounterPlan {
    let mut kept: BTreeSet<&PrefixCounter> = BTreeSet::new();
    let mut plan = CounterPlan::default();
    for r in dumped {
        match &r.counter {
            Some(c) if desired.contains(c) && kept.insert(c) => {}
            _ => plan.delete.push(r.handle),
        }
    }
    plan.add = desired
        .iter()
        .filter(|c| !kept.contains(c))
        .cloned()
        .collect();
    plan
}

/// Sums the counters per remote stack (tx: toward its prefixes, rx: from them).
/// Only counters in `desired` count, when it is known; rules that are not ours never.
pub fn aggregate(
    readings: &[CounterReading],
    desired: Option<&BTreeSet<PrefixCounter>>,
) -> Vec<StackTraffic> {
    let mut per: BTreeMap<&StackName, StackTraffic> = BTreeMap::new();
    for r in readings {
        let Some(c) = &r.counter else { continue };
        if desired.is_some_and(|d| !d.contains(c)) {
            continue;
        }
        let t = per.entry(&c.stack).or_insert_with(|| StackTraffic {
            stack: c.stack.clone(),
            tx_bytes: 0,
            tx_packets: 0,
            rx_bytes: 0,
            rx_packets: 0,
        });
        match c.direction {
            Direction::ToPrefix => {
                t.tx_bytes = t.tx_bytes.saturating_add(r.bytes);
                t.tx_packets = t.tx_packets.saturating_add(r.packets);
            }
            Direction::FromPrefix => {
                t.rx_bytes = t.rx_bytes.saturating_add(r.bytes);
                t.rx_packets = t.rx_packets.saturating_add(r.packets);
            }
        }
    }
    per.into_values().collect()
}

/// The kernel side: keeps the counting rules reconciled and publishes the counts.
pub struct TrafficCounters {
    nft: Option<Nft>,
    /// The counters last reconciled toward; None until routes.json was read.
    desired: Option<BTreeSet<PrefixCounter>>,
    report: watch::Sender<TrafficReport>,
}

impl TrafficCounters {
    /// The counters and the receiver of their reports (for the probe writer).
    pub fn new() -> (TrafficCounters, watch::Receiver<TrafficReport>) {
        let (report, rx) = watch::channel(TrafficReport::default());
        (
            TrafficCounters {
                nft: None,
                desired: None,
                report,
            },
            rx,
        )
    }

    /// Makes the counting rules match `routes` (after each route reconcile). With no
    /// routes known yet (`None`), the rules in place are left alone, as the routes
    /// are. Never fails: a failure goes into the report, and the next call retries.
    pub fn reconcile(&mut self, routes: Option<&DesiredRouter>) {
        let Some(routes) = routes else { return };
        let wanted = desired(routes);
        let result = self.connected().and_then(|nft| {
            let plan = diff(&wanted, &nft.counters()?);
            if !plan.is_empty() {
                tracing::info!(
                    add = plan.add.len(),
                    delete = plan.delete.len(),
                    "traffic counters: updating the counting rules"
                );
            }
            nft.delete_rules(&plan.delete)?;
            if !plan.add.is_empty() {
                nft.add_counters(&plan.add)?;
            }
            Ok(())
        });
        self.desired = Some(wanted);
        match result {
            Ok(()) => self.read(),
            Err(e) => self.failed(e),
        }
    }

    /// Reads the counters and publishes them (about once a second).
    pub fn read(&mut self) {
        let Some(nft) = &self.nft else { return };
        match nft.counters() {
            Ok(readings) => {
                let stacks = aggregate(&readings, self.desired.as_ref());
                let report = TrafficReport {
                    stacks,
                    error: None,
                };
                self.publish(report);
            }
            Err(e) => self.failed(e),
        }
    }

    fn connected(&mut self) -> vrouter_kernel::Result<&Nft> {
        if self.nft.is_none() {
            self.nft = Some(Nft::connect(TABLE, CHAIN)?);
        }
        Ok(self.nft.as_ref().expect("just connected"))
    }

    fn failed(&mut self, e: vrouter_kernel::KernelError) {
        let error = format!("traffic counters are off: {e}");
        // A fresh socket next time, in case this one is what broke.
        self.nft = None;
        self.publish(TrafficReport {
            stacks: Vec::new(),
            error: Some(error),
        });
    }

    /// Publishes a report, logging each change of the error once.
    fn publish(&self, report: TrafficReport) {
        let before = self.report.borrow().error.clone();
        if before != report.error {
            match &report.error {
                Some(error) => tracing::warn!("{error}; routing goes on"),
                None if before.is_some() => tracing::info!("traffic counters are working"),
                None => {}
            }
        }
        self.report.send_if_modified(|current| {
            if *current != report {
                *current = report;
                true
            } else {
                false
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{RemoteRouter, SameHostPeer};
    use vrouter_state::Prefix;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn prefix(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn stack(s: &str) -> StackName {
        StackName::new(s).unwrap()
    }

    fn counter(direction: Direction, p: &str, s: &str) -> PrefixCounter {
        PrefixCounter {
            stack: stack(s),
            prefix: prefix(p),
            direction,
        }
    }

    fn reading(handle: u64, c: Option<PrefixCounter>, bytes: u64, packets: u64) -> CounterReading {
        CounterReading {
            handle,
            counter: c,
            bytes,
            packets,
        }
    }

    /// Stack b (two prefixes) on another host, stack c on this host.
    fn routes() -> DesiredRouter {
        let mut d = DesiredRouter::default();
        d.routes.insert(prefix("10.2.0.0/24"), ip("10.2.0.254"));
        d.routes.insert(prefix("10.20.0.0/16"), ip("10.2.0.254"));
        d.routes.insert(prefix("10.3.0.0/24"), ip("10.3.0.254"));
        d.remote_routers.insert(RemoteRouter {
            via: ip("10.2.0.254"),
            stack: stack("b"),
            host: ip("192.168.0.2"),
        });
        d.same_host.insert(SameHostPeer {
            stack: stack("c"),
            via: ip("10.3.0.254"),
        });
        d
    }

    #[test]
    fn both_directions_of_every_routed_prefix() {
        let want: BTreeSet<PrefixCounter> = [
            counter(Direction::ToPrefix, "10.2.0.0/24", "b"),
            counter(Direction::FromPrefix, "10.2.0.0/24", "b"),
            counter(Direction::ToPrefix, "10.20.0.0/16", "b"),
            counter(Direction::FromPrefix, "10.20.0.0/16", "b"),
            counter(Direction::ToPrefix, "10.3.0.0/24", "c"),
            counter(Direction::FromPrefix, "10.3.0.0/24", "c"),
        ]
        .into();
        assert_eq!(desired(&routes()), want);
        assert!(desired(&DesiredRouter::default()).is_empty());
    }

    #[test]
    fn diff_keeps_adds_and_deletes() {
        let want = desired(&routes());
        let b_to = counter(Direction::ToPrefix, "10.2.0.0/24", "b");
        let gone = counter(Direction::ToPrefix, "10.9.0.0/24", "z");
        let dumped = vec![
            reading(1, Some(b_to.clone()), 500, 1),
            reading(2, Some(b_to.clone()), 0, 0), // duplicate
            reading(3, Some(gone), 9, 9),         // stack no longer routed
            reading(4, None, 0, 0),               // not ours
        ];
        let plan = diff(&want, &dumped);
        assert_eq!(plan.delete, vec![2, 3, 4]);
        assert_eq!(plan.add.len(), 5);
        assert!(!plan.add.contains(&b_to), "kept, with its count");

        // Applied: nothing left to do.
        let mut now = vec![reading(1, Some(b_to), 500, 1)];
        now.extend(
            plan.add
                .iter()
                .enumerate()
                .map(|(i, c)| reading(10 + i as u64, Some(c.clone()), 0, 0)),
        );
        assert!(diff(&want, &now).is_empty());
        // Nothing desired: everything goes.
        assert_eq!(diff(&BTreeSet::new(), &now).delete.len(), 6);
    }

    #[test]
    fn aggregate_sums_per_stack_and_direction() {
        let want = desired(&routes());
        let readings = vec![
            reading(
                1,
                Some(counter(Direction::ToPrefix, "10.2.0.0/24", "b")),
                1000,
                2,
            ),
            reading(
                2,
                Some(counter(Direction::ToPrefix, "10.20.0.0/16", "b")),
                300,
                1,
            ),
            reading(
                3,
                Some(counter(Direction::FromPrefix, "10.2.0.0/24", "b")),
                40,
                1,
            ),
            reading(
                4,
                Some(counter(Direction::FromPrefix, "10.3.0.0/24", "c")),
                7,
                1,
            ),
            reading(
                5,
                Some(counter(Direction::ToPrefix, "10.9.0.0/24", "z")),
                9,
                9,
            ),
            reading(6, None, 1_000_000, 1000),
        ];
        let b = StackTraffic {
            stack: stack("b"),
            tx_bytes: 1300,
            tx_packets: 3,
            rx_bytes: 40,
            rx_packets: 1,
        };
        let c = StackTraffic {
            stack: stack("c"),
            tx_bytes: 0,
            tx_packets: 0,
            rx_bytes: 7,
            rx_packets: 1,
        };
        assert_eq!(
            aggregate(&readings, Some(&want)),
            vec![b.clone(), c.clone()]
        );
        // Without a desired set, every counter of ours counts, sorted by stack.
        let all = aggregate(&readings, None);
        assert_eq!(all.len(), 3);
        assert_eq!((&all[0], &all[1]), (&b, &c));
        assert_eq!(all[2].stack, stack("z"));
    }

    /// Root only (a throwaway namespace): without CAP_NET_ADMIN the report carries the
    /// reason and no counts; with it back, the next reconcile counts every routed
    /// remote stack.
    #[test]
    fn counting_impossible_is_reported_then_recovers() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "needs root");
            eprintln!("skipping counting_impossible_is_reported_then_recovers: needs root");
            return;
        }
        std::thread::spawn(|| {
            use caps::{CapSet, Capability};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            caps::drop(None, CapSet::Effective, Capability::CAP_NET_ADMIN).unwrap();
            let (mut counters, rx) = TrafficCounters::new();
            counters.reconcile(Some(&routes()));
            let report = rx.borrow().clone();
            assert!(report.stacks.is_empty(), "{report:?}");
            let error = report.error.expect("a reason");
            assert!(error.contains("CAP_NET_ADMIN"), "{error}");

            caps::raise(None, CapSet::Effective, Capability::CAP_NET_ADMIN).unwrap();
            counters.reconcile(Some(&routes()));
            let report = rx.borrow().clone();
            assert_eq!(report.error, None);
            let zero = |s: &str| StackTraffic {
                stack: stack(s),
                tx_bytes: 0,
                tx_packets: 0,
                rx_bytes: 0,
                rx_packets: 0,
            };
            assert_eq!(report.stacks, vec![zero("b"), zero("c")]);
            // Nothing to change the second time: the rules (and counts) stay.
            let nft = Nft::connect(TABLE, CHAIN).unwrap();
            let handles: Vec<u64> = nft.counters().unwrap().iter().map(|r| r.handle).collect();
            assert_eq!(handles.len(), 6);
            counters.reconcile(Some(&routes()));
            let again: Vec<u64> = nft.counters().unwrap().iter().map(|r| r.handle).collect();
            assert_eq!(again, handles);
            // Routes gone: counters gone.
            counters.reconcile(Some(&DesiredRouter::default()));
            assert!(nft.counters().unwrap().is_empty());
            assert!(rx.borrow().stacks.is_empty());
        })
        .join()
        .unwrap();
    }
}
