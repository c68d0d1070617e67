//! Traffic statistics: bytes and packets forwarded to and from each remote stack,
//! counted by nftables in the router's namespace (see `vrouter_kernel::Nft`).
//!
//! The counters live on set elements in table `ip vrouter` (see `vrouter_kernel::Nft`):
//! per direction and prefix length in use, one hash set (`to_24`: from this stack
//! toward the remote prefix, tx; `from_24`: rx) keyed by the prefix's network address,
//! and one rule in chain `traffic` at the forward hook that looks the masked address
//! up in it (`ip daddr & 255.255.255.0 @to_24`); the lookup updates the element's
//! counter. A forwarded packet costs one lookup per rule, and there are two rules per
//! prefix length in use, however many remote prefixes there are (1,000 remote stacks
//! with /24s: 2 rules, 2,000 elements). A packet is counted in every configured prefix
//! that contains its address (one per length). The counters count IP bytes (header and
//! payload) of what the router forwards; its own probes are not forwarded and not
//! counted. They start at zero when an element is created and survive router restarts
//! in the same namespace (the table stays); a new namespace (container restart) starts
//! over.
//!
//! Pure parts: [`desired`] (the counters this stack's routes call for), [`diff`]
//! against a dump (unchanged elements are kept so their counts go on; sets and rules
//! of lengths no longer used, and anything else in the chain, such as the per-prefix
//! rules of earlier versions, are removed) and [`aggregate`]
//! (per remote stack). [`TrafficCounters`] applies them and publishes a
//! [`TrafficReport`] on a watch channel, which the overlay-probe writer puts in
//! `probes/<stack>.json`. Without nf_tables (or the permission) the router goes on
//! routing: the error is logged once and carried in the report.

use crate::desired::DesiredRouter;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::sync::watch;
use vrouter_kernel::{CounterDump, CounterReading, Direction, Nft, PrefixCounter, Slot};
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
                owner: owner_of(stack),
                prefix: *prefix,
                direction,
            });
        }
    }
    out
}

/// The owner text of a remote stack's counters, which the kernel keeps in each
/// element's comment: "stack b" ("vrouter to 10.2.0.0/24 stack b").
pub fn owner_of(stack: &StackName) -> String {
    format!("stack {stack}")
}

/// The remote stack a counter is for; None for an owner that is not a stack's.
pub fn stack_of(counter: &PrefixCounter) -> Option<StackName> {
    let name = counter.owner.strip_prefix("stack ")?;
    StackName::new(name).ok()
}

/// Changes that make the table hold exactly the desired counters, applied in this
/// order: rules, elements, sets are deleted, then sets, rules and elements added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterPlan {
    /// Handles of rules to delete: lookups of slots no longer used or of sets that are
    /// not ours, duplicates, and any other rule in the chain (such as the per-prefix
    /// counter rules of earlier versions).
    pub delete_rules: Vec<u64>,
    /// Elements no longer desired (or not ours) in sets that stay.
    pub delete_elements: Vec<(Slot, Ipv4Addr)>,
    /// Sets named like a slot that is no longer used, or that are not what we create.
    pub delete_sets: Vec<String>,
    /// Slots in use whose set or rule is missing.
    pub add_slots: Vec<Slot>,
    pub add: Vec<PrefixCounter>,
}

impl CounterPlan {
    pub fn is_empty(&self) -> bool {
        self.delete_rules.is_empty()
            && self.delete_elements.is_empty()
            && self.delete_sets.is_empty()
            && self.add_slots.is_empty()
            && self.add.is_empty()
    }
}

/// Pure diff: a desired counter already in its set is kept (its count goes on),
/// missing ones are added, everything else is deleted; a set and its rule stay while
/// their slot is used.
pub fn diff(desired: &BTreeSet<PrefixCounter>, dumped: &CounterDump) -> CounterPlan {
    let used: BTreeSet<Slot> = desired.iter().map(Slot::of).collect();
    let mut plan = CounterPlan::default();
    // Sets: ours and used stay; a slot's name on anything else goes (sets with other
    // names are not ours to touch).
    let mut kept_sets: BTreeSet<Slot> = BTreeSet::new();
    for set in &dumped.sets {
        match set.slot {
            Some(slot) if used.contains(&slot) => {
                kept_sets.insert(slot);
            }
            Some(_) => plan.delete_sets.push(set.name.clone()),
            None if Slot::from_set_name(&set.name).is_some() => {
                plan.delete_sets.push(set.name.clone())
            }
            None => {}
        }
    }
    let mut kept_rules: BTreeSet<Slot> = BTreeSet::new();
    for r in &dumped.rules {
        match r.slot {
            Some(slot) if kept_sets.contains(&slot) && kept_rules.insert(slot) => {}
            _ => plan.delete_rules.push(r.handle),
        }
    }
    let mut kept: BTreeSet<&PrefixCounter> = BTreeSet::new();
    for e in &dumped.elements {
        if !kept_sets.contains(&e.slot) {
            continue; // goes with its set
        }
        match &e.counter {
            Some(c) if desired.contains(c) && kept.insert(c) => {}
            _ => plan.delete_elements.push((e.slot, e.key)),
        }
    }
    plan.add_slots = used
        .iter()
        .filter(|s| !kept_sets.contains(s) || !kept_rules.contains(s))
        .copied()
        .collect();
    plan.add = desired
        .iter()
        .filter(|c| !kept.contains(c))
        .cloned()
        .collect();
    plan
}

/// Sums the counters per remote stack (tx: toward its prefixes, rx: from them).
/// Only counters in `desired` count, when it is known; elements that are not ours
/// never.
pub fn aggregate(
    readings: &[CounterReading],
    desired: Option<&BTreeSet<PrefixCounter>>,
) -> Vec<StackTraffic> {
    let mut per: BTreeMap<StackName, StackTraffic> = BTreeMap::new();
    for r in readings {
        let Some(c) = &r.counter else { continue };
        if desired.is_some_and(|d| !d.contains(c)) {
            continue;
        }
        let Some(stack) = stack_of(c) else { continue };
        let t = per.entry(stack.clone()).or_insert_with(|| StackTraffic {
            stack,
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

/// The kernel side: keeps the counting sets and rules reconciled and publishes the
/// counts.
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

    /// Makes the counting sets match `routes` (after each route reconcile). With no
    /// routes known yet (`None`), the counters in place are left alone, as the routes
    /// are. Never fails: a failure goes into the report, and the next call retries.
    pub fn reconcile(&mut self, routes: Option<&DesiredRouter>) {
        let Some(routes) = routes else { return };
        let wanted = desired(routes);
        let result = self.connected().and_then(|nft| {
            let plan = diff(&wanted, &nft.dump()?);
            if !plan.is_empty() {
                tracing::info!(
                    add = plan.add.len(),
                    delete = plan.delete_elements.len(),
                    add_slots = plan.add_slots.len(),
                    delete_rules = plan.delete_rules.len(),
                    delete_sets = plan.delete_sets.len(),
                    "traffic counters: updating the counting sets"
                );
            }
            nft.delete_rules(&plan.delete_rules)?;
            nft.delete_elements(&plan.delete_elements)?;
            nft.delete_sets(&plan.delete_sets)?;
            if !plan.add.is_empty() || !plan.add_slots.is_empty() {
                nft.add(&plan.add_slots, &plan.add)?;
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
    use vrouter_kernel::{RuleReading, SetReading};
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
            owner: owner_of(&stack(s)),
            prefix: prefix(p),
            direction,
        }
    }

    /// An element of ours with its counts.
    fn reading(c: &PrefixCounter, bytes: u64, packets: u64) -> CounterReading {
        CounterReading {
            slot: Slot::of(c),
            key: c.prefix.addr(),
            counter: Some(c.clone()),
            bytes,
            packets,
        }
    }

    /// An element without our comment (or whose comment disagrees with its key).
    fn foreign(slot: Slot, key: &str, bytes: u64, packets: u64) -> CounterReading {
        CounterReading {
            slot,
            key: ip(key),
            counter: None,
            bytes,
            packets,
        }
    }

    fn slot(direction: Direction, prefix_len: u8) -> Slot {
        Slot {
            direction,
            prefix_len,
        }
    }

    fn set(name: &str, ours: bool) -> SetReading {
        SetReading {
            name: name.to_string(),
            slot: Slot::from_set_name(name).filter(|_| ours),
        }
    }

    fn rule(handle: u64, slot: Option<Slot>) -> RuleReading {
        RuleReading { handle, slot }
    }

    /// What the kernel holds once `desired` is in place (rule handles from 1).
    fn applied(desired: &BTreeSet<PrefixCounter>) -> CounterDump {
        let slots: BTreeSet<Slot> = desired.iter().map(Slot::of).collect();
        CounterDump {
            rules: slots
                .iter()
                .enumerate()
                .map(|(i, s)| rule(i as u64 + 1, Some(*s)))
                .collect(),
            sets: slots.iter().map(|s| set(&s.set_name(), true)).collect(),
            elements: desired.iter().map(|c| reading(c, 0, 0)).collect(),
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
    fn diff_from_nothing_adds_every_slot_and_counter() {
        let want = desired(&routes());
        let plan = diff(&want, &CounterDump::default());
        // Two lengths (/24, /16) in two directions.
        assert_eq!(
            plan.add_slots,
            vec![
                slot(Direction::ToPrefix, 16),
                slot(Direction::ToPrefix, 24),
                slot(Direction::FromPrefix, 16),
                slot(Direction::FromPrefix, 24),
            ]
        );
        assert_eq!(plan.add, want.iter().cloned().collect::<Vec<_>>());
        assert!(plan.delete_rules.is_empty() && plan.delete_elements.is_empty());
        assert!(plan.delete_sets.is_empty());
        // Applied: nothing left to do.
        assert!(diff(&want, &applied(&want)).is_empty());
    }

    #[test]
    fn diff_keeps_adds_and_deletes() {
        let want = desired(&routes());
        let b_to = counter(Direction::ToPrefix, "10.2.0.0/24", "b");
        let gone = counter(Direction::ToPrefix, "10.9.0.0/24", "z");
        let to24 = slot(Direction::ToPrefix, 24);
        let to32 = slot(Direction::ToPrefix, 32);
        let dumped = CounterDump {
            rules: vec![
                rule(1, Some(to24)),
                rule(2, Some(to24)), // duplicate
                rule(3, Some(to32)), // length no longer used
                rule(4, None),       // not ours: an old per-prefix rule
            ],
            sets: vec![
                set("to_24", true),
                set("to_32", true),
                set("from_24", false), // named like ours, but not a counting hash
                set("mine", false),    // someone else's: left alone
            ],
            elements: vec![
                reading(&b_to, 500, 1),
                reading(&gone, 9, 9),            // stack no longer routed
                foreign(to24, "10.3.0.0", 0, 0), // not ours
                foreign(to32, "10.2.0.9", 0, 0), // goes with its set
            ],
        };
        let plan = diff(&want, &dumped);
        assert_eq!(plan.delete_rules, vec![2, 3, 4]);
        assert_eq!(
            plan.delete_elements,
            vec![(to24, ip("10.9.0.0")), (to24, ip("10.3.0.0"))]
        );
        assert_eq!(
            plan.delete_sets,
            vec!["to_32".to_string(), "from_24".into()]
        );
        assert_eq!(
            plan.add_slots,
            vec![
                slot(Direction::ToPrefix, 16),
                slot(Direction::FromPrefix, 16),
                slot(Direction::FromPrefix, 24),
            ],
            "to_24 has its set and rule"
        );
        assert_eq!(plan.add.len(), 5);
        assert!(!plan.add.contains(&b_to), "kept, with its count");

        // A set whose rule is gone gets its rule back, elements untouched.
        let mut no_rule = applied(&want);
        no_rule.rules.retain(|r| r.slot != Some(to24));
        let plan = diff(&want, &no_rule);
        assert_eq!(plan.add_slots, vec![to24]);
        assert!(plan.add.is_empty() && plan.delete_elements.is_empty());

        // Nothing desired: every rule and set goes (elements with their sets).
        let now = applied(&want);
        let plan = diff(&BTreeSet::new(), &now);
        assert_eq!(plan.delete_rules.len(), 4);
        assert_eq!(plan.delete_sets.len(), 4);
        assert!(plan.delete_elements.is_empty() && plan.add_slots.is_empty());
    }

    /// A router upgraded in place finds the per-prefix rules of earlier versions in its
    /// chain: they are all deleted and the sets take over.
    #[test]
    fn diff_replaces_the_old_rule_layout() {
        let want = desired(&routes());
        let old = CounterDump {
            rules: (1..=6).map(|h| rule(h, None)).collect(),
            sets: Vec::new(),
            elements: Vec::new(),
        };
        let plan = diff(&want, &old);
        assert_eq!(plan.delete_rules, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(plan.add_slots.len(), 4);
        assert_eq!(plan.add.len(), 6);
    }

    #[test]
    fn aggregate_sums_per_stack_and_direction() {
        let want = desired(&routes());
        let readings = vec![
            reading(&counter(Direction::ToPrefix, "10.2.0.0/24", "b"), 1000, 2),
            reading(&counter(Direction::ToPrefix, "10.20.0.0/16", "b"), 300, 1),
            reading(&counter(Direction::FromPrefix, "10.2.0.0/24", "b"), 40, 1),
            reading(&counter(Direction::FromPrefix, "10.3.0.0/24", "c"), 7, 1),
            reading(&counter(Direction::ToPrefix, "10.9.0.0/24", "z"), 9, 9),
            foreign(slot(Direction::ToPrefix, 24), "10.8.0.0", 1_000_000, 1000),
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

    #[test]
    fn counters_name_their_stack_in_the_owner() {
        let c = counter(Direction::ToPrefix, "10.2.0.0/24", "stack-c.prod_1");
        assert_eq!(c.comment(), "vrouter to 10.2.0.0/24 stack stack-c.prod_1");
        assert_eq!(stack_of(&c), Some(stack("stack-c.prod_1")));
        // Owners that are not a stack's are not counted for any stack.
        for other in ["stack", "stack ", "stack b extra", "host b", "b"] {
            let c = PrefixCounter {
                owner: other.to_string(),
                ..c.clone()
            };
            assert_eq!(stack_of(&c), None, "{other:?}");
            let r = reading(&c, 5, 1);
            assert!(aggregate(&[r], None).is_empty(), "{other:?}");
        }
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
            // Nothing to change the second time: the rules, sets and elements stay.
            let nft = Nft::connect(TABLE, CHAIN).unwrap();
            let before = nft.dump().unwrap();
            assert_eq!(before.elements.len(), 6);
            assert_eq!(before.rules.len(), 4, "two lengths, two directions");
            assert_eq!(before.sets.len(), 4);
            assert!(diff(&desired(&routes()), &before).is_empty());
            counters.reconcile(Some(&routes()));
            assert_eq!(nft.dump().unwrap(), before);
            // One prefix (and with it the /16 length) no longer routed: its elements,
            // sets and rules go, the rest stays.
            let mut fewer = routes();
            fewer.routes.remove(&prefix("10.20.0.0/16"));
            counters.reconcile(Some(&fewer));
            let after = nft.dump().unwrap();
            assert_eq!(after.rules.len(), 2);
            assert_eq!(after.sets.len(), 2);
            assert_eq!(after.elements.len(), 4);
            for r in &after.rules {
                assert!(before.rules.contains(r), "rule {r:?} kept");
            }
            // Routes gone: counters gone.
            counters.reconcile(Some(&DesiredRouter::default()));
            assert!(nft.counters().unwrap().is_empty());
            assert_eq!(nft.dump().unwrap(), CounterDump::default());
            assert!(rx.borrow().stacks.is_empty());
        })
        .join()
        .unwrap();
    }

    /// Root only: a router upgraded in place finds the per-prefix rules of earlier
    /// versions (`ip daddr <prefix> counter comment "vrouter to ..."`, made here with
    /// the nft CLI where it is installed); the first reconcile removes them all and
    /// counts on set elements instead.
    #[test]
    fn the_old_rule_layout_is_replaced_in_place() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "needs root");
            eprintln!("skipping the_old_rule_layout_is_replaced_in_place: needs root");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut script = String::from(
                "table ip vrouter {\n chain traffic {\n  type filter hook forward priority 0; policy accept;\n",
            );
            for c in desired(&routes()) {
                let field = match c.direction {
                    Direction::ToPrefix => "daddr",
                    Direction::FromPrefix => "saddr",
                };
                script.push_str(&format!(
                    "  ip {field} {} counter comment \"{}\"\n",
                    c.prefix,
                    c.comment()
                ));
            }
            script.push_str(" }\n}\n");
            let loaded = std::process::Command::new("timeout")
                .args(["10", "nft", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut child| {
                    use std::io::Write;
                    child.stdin.take().expect("stdin").write_all(script.as_bytes())?;
                    child.wait()
                });
            if !loaded.is_ok_and(|status| status.success()) {
                assert_ne!(
                    std::env::var("CI").as_deref(),
                    Ok("true"),
                    "nft is needed to build the old layout"
                );
                eprintln!("skipping the_old_rule_layout_is_replaced_in_place: no nft CLI");
                return;
            }
            let nft = Nft::connect(TABLE, CHAIN).unwrap();
            let old = nft.dump().unwrap();
            assert_eq!(old.rules.len(), 6, "{old:?}");
            assert!(old.rules.iter().all(|r| r.slot.is_none()), "not ours");
            assert!(old.sets.is_empty());

            let (mut counters, rx) = TrafficCounters::new();
            counters.reconcile(Some(&routes()));
            assert_eq!(rx.borrow().error, None);
            let now = nft.dump().unwrap();
            assert_eq!(now.rules.len(), 4, "{now:?}");
            assert!(now.rules.iter().all(|r| r.slot.is_some()));
            assert!(old.rules.iter().all(|r| !now.rules.contains(r)));
            assert_eq!(now.elements.len(), 6);
            assert!(diff(&desired(&routes()), &now).is_empty());
            assert_eq!(
                rx.borrow()
                    .stacks
                    .iter()
                    .map(|t| t.stack.clone())
                    .collect::<Vec<_>>(),
                vec![stack("b"), stack("c")]
            );
        })
        .join()
        .unwrap();
    }
}
