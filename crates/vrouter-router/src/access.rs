//! The daemon's side of access control (issue 14): keeps the policy the settings give
//! in the kernel through an [`Enforcer`] (the nftables table of [`crate::acl`]),
//! follows routes.json (a rule naming a stack follows its prefixes), reloads the
//! policy file, and turns what happens into events, health and counters.
//!
//! [`Access`] makes every decision and returns the events to write; the caller (the
//! event loop in [`crate::run`]) writes them and touches the overlay link. With a fake
//! enforcer it is tested without root. [`DropSummaries`] rate-limits the drop events:
//! at most one per rule per [`DROP_SUMMARY_EVERY`] while the rule drops.
//!
//! Fail closed: when a policy cannot be installed the enforcer leaves its closed table
//! in force (nothing enters the stack from the overlay) and the health fails; when
//! even that is impossible there is no enforcer, [`Access::link_blocked`] says why,
//! and the caller holds the overlay link down until an enforcer starts.

use crate::acl::compile::AclContext;
use crate::acl::enforce::{Acl, AclCounters, AclKernel, AclState, Counted, RuleCount};
use crate::acl::{Policy, PolicyError};
use std::collections::BTreeMap;
use std::time::Duration;
use vrouter_state::{AclHealth, AclRuleCounters, EventKind, Prefix, RemoteRoute, StackName};

/// At most one drop summary per rule this often.
pub const DROP_SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// What the policy is enforced against: this stack, its overlay link and the remote
/// routes routes.json gives it (those the router accepted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Surround {
    pub local: Vec<Prefix>,
    pub overlay_ifname: String,
    pub remote: Vec<RemoteRoute>,
}

/// The state of the table in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforced {
    /// The policy is in force.
    Installed { generation: u32 },
    /// The closed table is in force: nothing enters from the overlay.
    Closed { reason: String },
}

/// One reading of the kernel's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AclReading {
    /// Per rule, in policy order, the default last; totals since start.
    pub rules: Vec<AclRuleCounters>,
    /// Packets dropped per (rule, source stack; None: no stack, such as forged sources),
    /// totals since start.
    pub drops: Vec<(String, Option<StackName>, u64)>,
}

/// The kernel side: the nftables table of the policy.
pub trait Enforcer {
    /// Where the table stands now.
    fn enforced(&self) -> Enforced;
    /// routes.json changed: resolve the policy again and replace the table if it
    /// differs. Err: the new table was refused (see [`Enforcer::enforced`]).
    fn set_context(&mut self, surround: &Surround) -> Result<(), String>;
    /// A new policy; on Err the previous one stays in force.
    fn reload(&mut self, policy: &Policy) -> Result<(), String>;
    /// The counters.
    fn read(&mut self) -> Result<AclReading, String>;
    /// Whether the table in force uses conntrack (see [`Acl::tracks_connections`]).
    fn tracks_connections(&self) -> bool;
}

impl<E: Enforcer + ?Sized> Enforcer for Box<E> {
    fn enforced(&self) -> Enforced {
        (**self).enforced()
    }
    fn set_context(&mut self, surround: &Surround) -> Result<(), String> {
        (**self).set_context(surround)
    }
    fn reload(&mut self, policy: &Policy) -> Result<(), String> {
        (**self).reload(policy)
    }
    fn read(&mut self) -> Result<AclReading, String> {
        (**self).read()
    }
    fn tracks_connections(&self) -> bool {
        (**self).tracks_connections()
    }
}

/// Starts the kernel's enforcer ([`Acl`]): the policy's table in the router's
/// namespace, or the closed table if the policy's is refused. Err when not even that
/// is in place.
pub fn start_enforcer(policy: &Policy, surround: &Surround) -> Result<Box<dyn Enforcer>, String> {
    let acl = Acl::start(policy.clone(), context(surround))?;
    // The access table (or the closed one) is in the kernel.
    vrouter_state::crash::point("router.after_acl");
    Ok(Box::new(acl))
}

fn context(s: &Surround) -> AclContext {
    AclContext {
        local: s.local.clone(),
        overlay_ifname: s.overlay_ifname.clone(),
        remote: s.remote.clone(),
    }
}

impl<K: AclKernel> Enforcer for Acl<K> {
    fn enforced(&self) -> Enforced {
        match self.state() {
            AclState::Installed => Enforced::Installed {
                generation: u32::from(self.generation()),
            },
            AclState::Closed { reason } => Enforced::Closed {
                reason: reason.clone(),
            },
        }
    }

    fn set_context(&mut self, surround: &Surround) -> Result<(), String> {
        Acl::set_context(self, context(surround))?;
        // The access table for the new routes replaced.
        vrouter_state::crash::point("router.after_acl_update");
        match self.state() {
            AclState::Installed => Ok(()),
            AclState::Closed { reason } => Err(reason.clone()),
        }
    }

    fn reload(&mut self, policy: &Policy) -> Result<(), String> {
        Acl::reload(self, policy.clone())
    }

    fn read(&mut self) -> Result<AclReading, String> {
        let counters = Acl::read(self)?;
        Ok(reading(self.policy(), &counters))
    }

    fn tracks_connections(&self) -> bool {
        Acl::tracks_connections(self)
    }
}

/// The kernel's totals as the probes file lists them: the policy's rules in its
/// order, the default, then what else counted (pseudo rules, in parentheses, and
/// rules of earlier policies, verdict `-`). Pure.
pub fn reading(policy: &Policy, counters: &AclCounters) -> AclReading {
    let row = |counted: &Counted, verdict: &str, c: &RuleCount| AclRuleCounters {
        rule: counted.label(),
        verdict: verdict.to_string(),
        accepted_packets: c.accepted.packets,
        accepted_bytes: c.accepted.bytes,
        dropped_packets: c.dropped.packets,
        dropped_bytes: c.dropped.bytes,
    };
    let zero = RuleCount::default();
    let mut rules: Vec<AclRuleCounters> = Vec::new();
    let mut listed: Vec<Counted> = Vec::new();
    for r in &policy.rules {
        let counted = Counted::Rule(r.name.clone());
        let c = counters.rules.get(&counted).unwrap_or(&zero);
        rules.push(row(&counted, r.verdict.as_str(), c));
        listed.push(counted);
    }
    let c = counters.rules.get(&Counted::Default).unwrap_or(&zero);
    rules.push(row(&Counted::Default, policy.default.as_str(), c));
    listed.push(Counted::Default);
    for (counted, c) in &counters.rules {
        if listed.contains(counted) {
            continue;
        }
        let verdict = match counted {
            Counted::Rule(_) => "-",
            _ => "deny",
        };
        rules.push(row(counted, verdict, c));
    }
    // Drops by source stack come from the class chains; the checks before them
    // (forged sources, TCP without SYN, closed) have no stack to name.
    let mut drops: Vec<(String, Option<StackName>, u64)> = counters
        .dropped_from
        .iter()
        .map(|((counted, stack), c)| (counted.label(), stack.clone(), c.packets))
        .collect();
    for (counted, c) in &counters.rules {
        if !matches!(counted, Counted::Rule(_) | Counted::Default) {
            drops.push((counted.label(), None, c.dropped.packets));
        }
    }
    AclReading { rules, drops }
}

/// The policy, its enforcement and what has been reported about them.
pub struct Access<E> {
    policy: Policy,
    surround: Surround,
    enforcer: Option<E>,
    /// Why there is no enforcer (not even the closed table could be installed).
    blocked: Option<String>,
    /// The last policy refused, until a good one comes.
    refused: Option<String>,
    /// The state last reported in an event.
    reported: Option<Enforced>,
    counters: Vec<AclRuleCounters>,
    counters_error: Option<String>,
    summaries: DropSummaries,
}

/// Events to write: (kind, one-line message).
pub type Events = Vec<(EventKind, String)>;

impl<E: Enforcer> Access<E> {
    /// Starts enforcing `policy`: `start` installs it (or the closed table) and
    /// returns the enforcer, or Err when not even the closed table is in place.
    pub fn start(
        policy: Policy,
        surround: Surround,
        start: impl FnOnce(&Policy, &Surround) -> Result<E, String>,
    ) -> (Access<E>, Events) {
        let mut access = Access {
            policy,
            surround,
            enforcer: None,
            blocked: None,
            refused: None,
            reported: None,
            counters: Vec::new(),
            counters_error: None,
            summaries: DropSummaries::default(),
        };
        let events = access.try_start(start);
        (access, events)
    }

    /// The caller's timer: without an enforcer, tries to start one again; with the
    /// closed table in force, tries to install the policy again.
    pub fn retry(&mut self, start: impl FnOnce(&Policy, &Surround) -> Result<E, String>) -> Events {
        let Some(enforcer) = self.enforcer.as_mut() else {
            return self.try_start(start);
        };
        if matches!(enforcer.enforced(), Enforced::Closed { .. }) {
            if let Err(e) = enforcer.set_context(&self.surround) {
                tracing::debug!(error = %e, "the access policy is still refused");
            }
            return self.report();
        }
        Vec::new()
    }

    fn try_start(&mut self, start: impl FnOnce(&Policy, &Surround) -> Result<E, String>) -> Events {
        match start(&self.policy, &self.surround) {
            Ok(e) => {
                self.enforcer = Some(e);
                self.blocked = None;
                self.report()
            }
            Err(e) => {
                let reason = format!(
                    "neither the access policy nor the closed table could be installed ({e}); the overlay link is held down"
                );
                let new = self.blocked.as_deref() != Some(reason.as_str());
                self.blocked = Some(reason.clone());
                if new {
                    vec![(EventKind::AclClosed, reason)]
                } else {
                    Vec::new()
                }
            }
        }
    }

    /// Why the overlay link must stay down, if it must.
    pub fn link_blocked(&self) -> Option<&str> {
        self.blocked.as_deref()
    }

    /// Whether the router must see both directions of its stack's traffic: the table
    /// in force uses conntrack (every policy but the default "allow, no rules", and
    /// the closed table), or there is no table at all (the safe answer). The router
    /// registers with it (`Registration.conntrack`), so discovery's port steering
    /// sends the stack's outgoing frames through the router or straight on.
    pub fn tracks_connections(&self) -> bool {
        self.enforcer.as_ref().is_none_or(E::tracks_connections)
    }

    /// The policy in force (or wanted, while closed).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// routes.json changed: the rules follow the stacks' prefixes.
    pub fn set_remote(&mut self, remote: Vec<RemoteRoute>) -> Events {
        if self.surround.remote == remote {
            return Vec::new();
        }
        self.surround.remote = remote;
        let Some(enforcer) = self.enforcer.as_mut() else {
            return Vec::new();
        };
        if let Err(e) = enforcer.set_context(&self.surround) {
            tracing::warn!(error = %e, "the access table for the new routes was refused");
        }
        self.report()
    }

    /// A new policy from the settings (the file changed, or SIGHUP). A bad one, or
    /// one the kernel refuses, is reported and the previous one stays.
    pub fn reload(&mut self, policy: Result<Policy, PolicyError>) -> Events {
        let policy = match policy {
            Ok(p) => p,
            Err(e) => return self.refuse(e.0),
        };
        let closed = self
            .enforcer
            .as_ref()
            .is_some_and(|e| matches!(e.enforced(), Enforced::Closed { .. }));
        if policy == self.policy && self.refused.is_none() && !closed {
            tracing::info!("access policy unchanged");
            return Vec::new();
        }
        let Some(enforcer) = self.enforcer.as_mut() else {
            // Installed by the next start.
            self.policy = policy;
            self.refused = None;
            return Vec::new();
        };
        if policy == self.policy && !closed {
            // The file is good again, and the policy in force is that one.
            self.refused = None;
            return vec![(
                EventKind::AclInstalled,
                format!(
                    "access policy file is good again; the policy in force is unchanged ({})",
                    describe(&self.policy)
                ),
            )];
        }
        match enforcer.reload(&policy) {
            Ok(()) => {
                self.policy = policy;
                self.refused = None;
                self.reported = None;
                self.report()
            }
            Err(e) => {
                let mut events =
                    self.refuse(format!("the kernel refused the new access policy ({e})"));
                events.extend(self.report());
                events
            }
        }
    }

    fn refuse(&mut self, why: String) -> Events {
        let message = format!("{why}; the previous access policy stays in force");
        self.refused = Some(message.clone());
        vec![(EventKind::AclRefused, message)]
    }

    /// An event when the enforcement changed since the last one reported.
    fn report(&mut self) -> Events {
        let Some(enforcer) = self.enforcer.as_ref() else {
            return Vec::new();
        };
        let now = enforcer.enforced();
        if self.reported.as_ref() == Some(&now) {
            return Vec::new();
        }
        let event = match &now {
            Enforced::Installed { generation } => (
                EventKind::AclInstalled,
                format!(
                    "access policy installed: {} (generation {generation})",
                    describe(&self.policy)
                ),
            ),
            Enforced::Closed { reason } => (
                EventKind::AclClosed,
                format!("access policy not installed, nothing enters from the overlay: {reason}"),
            ),
        };
        // A new generation after a routes change is not news; a state change is.
        let same_kind = matches!(
            (&self.reported, &now),
            (Some(Enforced::Installed { .. }), Enforced::Installed { .. })
        );
        self.reported = Some(now);
        if same_kind {
            Vec::new()
        } else {
            vec![event]
        }
    }

    /// Reads the counters (the caller's 1 s timer); returns the drop summaries due.
    pub fn read(&mut self, now_ms: u64) -> Events {
        let Some(enforcer) = self.enforcer.as_mut() else {
            return Vec::new();
        };
        match enforcer.read() {
            Ok(reading) => {
                self.counters = reading.rules;
                self.counters_error = None;
                self.summaries
                    .observe(&reading.drops, now_ms)
                    .into_iter()
                    .map(|m| (EventKind::AclDrops, m))
                    .collect()
            }
            Err(e) => {
                if self.counters_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(error = %e, "cannot read the access counters");
                }
                self.counters_error = Some(e);
                Vec::new()
            }
        }
    }

    /// Per rule counters for the probes file.
    pub fn counters(&self) -> &[AclRuleCounters] {
        &self.counters
    }

    /// For the router's health: the healthcheck fails while `closed` is set.
    pub fn health(&self) -> AclHealth {
        let resolved = crate::acl::resolve(&self.policy, &self.surround.remote);
        let (generation, closed) = match (&self.blocked, self.enforcer.as_ref().map(E::enforced)) {
            (Some(b), _) => (0, Some(b.clone())),
            (None, Some(Enforced::Installed { generation })) => (generation, None),
            (None, Some(Enforced::Closed { reason })) => (0, Some(reason)),
            (None, None) => (0, Some("the access policy is not installed yet".into())),
        };
        AclHealth {
            default: self.policy.default.to_string(),
            rules: u32::try_from(self.policy.rules.len()).unwrap_or(u32::MAX),
            generation,
            closed,
            refused: self.refused.clone(),
            unresolved: resolved.unresolved,
        }
    }
}

/// "default deny, 3 rules".
fn describe(policy: &Policy) -> String {
    format!("default {}, {} rule(s)", policy.default, policy.rules.len())
}

/// Turns running drop totals per (rule, source stack) into at most one summary per
/// rule per [`DROP_SUMMARY_EVERY`], while the rule drops. Pure.
#[derive(Debug, Default)]
pub struct DropSummaries {
    /// The totals at the last reading.
    seen: BTreeMap<(String, Option<StackName>), u64>,
    /// Per rule: drops not yet reported, per source, and since when.
    pending: BTreeMap<String, (u64, BTreeMap<Option<StackName>, u64>)>,
    /// Per rule: when its last summary went out.
    last: BTreeMap<String, u64>,
    /// The first reading was taken: it is the baseline (totals carried from before
    /// this process, such as a previous router's table, are not news).
    primed: bool,
}

impl DropSummaries {
    /// Takes in one reading of totals at `now_ms`; returns the summaries due. The
    /// first reading is the baseline; a total that went down (the counters started
    /// over) counts from zero.
    pub fn observe(
        &mut self,
        drops: &[(String, Option<StackName>, u64)],
        now_ms: u64,
    ) -> Vec<String> {
        let baseline = !std::mem::replace(&mut self.primed, true);
        for (rule, stack, total) in drops {
            let key = (rule.clone(), stack.clone());
            let before = self.seen.insert(key, *total).unwrap_or(0);
            let delta = if *total >= before {
                total - before
            } else {
                *total
            };
            if delta == 0 || baseline {
                continue;
            }
            let (_, per) = self
                .pending
                .entry(rule.clone())
                .or_insert_with(|| (now_ms, BTreeMap::new()));
            *per.entry(stack.clone()).or_default() += delta;
        }
        let every = u64::try_from(DROP_SUMMARY_EVERY.as_millis()).unwrap_or(u64::MAX);
        let due: Vec<String> = self
            .pending
            .keys()
            .filter(|rule| {
                self.last
                    .get(*rule)
                    .is_none_or(|t| now_ms.saturating_sub(*t) >= every)
            })
            .cloned()
            .collect();
        let mut out = Vec::new();
        for rule in due {
            let (since, per) = self.pending.remove(&rule).expect("listed above");
            // The drops pending began after the previous summary.
            let from = since;
            self.last.insert(rule.clone(), now_ms);
            let total: u64 = per.values().sum();
            let mut sources: Vec<(Option<StackName>, u64)> = per.into_iter().collect();
            sources.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let list: Vec<String> = sources
                .iter()
                .map(|(s, n)| match s {
                    Some(s) => format!("stack {s} {n}"),
                    None => format!("sources of no stack {n}"),
                })
                .collect();
            let secs = now_ms.saturating_sub(from) as f64 / 1000.0;
            out.push(format!(
                "rule {rule:?} dropped {total} packet(s) in the last {secs:.0} s, from: {}",
                list.join(", ")
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::enforce::Count;
    use crate::acl::from_settings;
    use std::cell::RefCell;
    use std::rc::Rc;

    fn stack(s: &str) -> Option<StackName> {
        Some(StackName::new(s).unwrap())
    }

    #[test]
    fn readings_list_the_policy_in_order_then_the_default_then_the_rest() {
        let p = from_settings(
            Some("deny"),
            Some("web:tcp/443"),
            Some((
                std::path::Path::new("/acl.toml"),
                "[[rule]]\nname = \"a lab\"\ndeny = \"10.9.0.0/16\"\n",
            )),
        )
        .unwrap();
        let count = |packets, bytes| Count { packets, bytes };
        let mut c = AclCounters::default();
        c.rules.insert(
            Counted::Rule("allow web:tcp/443".into()),
            RuleCount {
                accepted: count(10, 1000),
                dropped: count(0, 0),
            },
        );
        c.rules.insert(
            Counted::Rule("gone".into()),
            RuleCount {
                accepted: count(1, 60),
                dropped: count(0, 0),
            },
        );
        c.rules.insert(
            Counted::SpoofFromOverlay,
            RuleCount {
                accepted: count(0, 0),
                dropped: count(3, 180),
            },
        );
        c.dropped_from
            .insert((Counted::Default, stack("ops")), count(4, 240));
        let r = reading(&p, &c);
        let rows: Vec<(&str, &str, u64, u64)> = r
            .rules
            .iter()
            .map(|r| {
                (
                    r.rule.as_str(),
                    r.verdict.as_str(),
                    r.accepted_packets,
                    r.dropped_packets,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("allow web:tcp/443", "allow", 10, 0),
                ("a lab", "deny", 0, 0),
                ("(default)", "deny", 0, 0),
                ("gone", "-", 1, 0),
                ("(spoof from overlay)", "deny", 0, 3),
            ]
        );
        assert_eq!(r.rules[0].accepted_bytes, 1000);
        assert_eq!(
            r.drops,
            [
                ("(default)".to_string(), stack("ops"), 4),
                ("(spoof from overlay)".to_string(), None, 3)
            ]
        );
    }

    #[test]
    fn drop_summaries_at_most_one_per_rule_per_ten_seconds() {
        let mut d = DropSummaries::default();
        let t0 = 1_000_000;
        let r = |rule: &str, s: Option<StackName>, n: u64| (rule.to_string(), s, n);
        // The first reading is the baseline (a previous router's totals); then
        // nothing dropped: nothing to say.
        assert!(d
            .observe(&[r("default", stack("web"), 40)], t0 - 1)
            .is_empty());
        assert!(d.observe(&[r("default", stack("web"), 0)], t0).is_empty());
        // The first drops are reported at once, largest source first.
        let out = d.observe(
            &[
                r("default", stack("web"), 3),
                r("default", None, 1),
                r("default", stack("ops"), 5),
                r("no db", stack("web"), 0),
            ],
            t0 + 1_000,
        );
        assert_eq!(
            out,
            ["rule \"default\" dropped 9 packet(s) in the last 0 s, from: stack ops 5, stack web 3, sources of no stack 1"]
        );
        // More drops within 10 s wait; another rule has its own clock.
        assert!(d
            .observe(&[r("default", stack("web"), 10)], t0 + 2_000)
            .is_empty());
        let out = d.observe(
            &[r("default", stack("web"), 12), r("no db", stack("web"), 4)],
            t0 + 5_000,
        );
        assert_eq!(
            out,
            ["rule \"no db\" dropped 4 packet(s) in the last 0 s, from: stack web 4"]
        );
        // 10 s after the last summary: everything since, summed.
        assert!(d
            .observe(&[r("default", stack("web"), 12)], t0 + 10_999)
            .is_empty());
        let out = d.observe(&[r("default", stack("web"), 13)], t0 + 11_000);
        assert_eq!(
            out,
            ["rule \"default\" dropped 10 packet(s) in the last 9 s, from: stack web 10"]
        );
        // No new drops: silence, however long.
        assert!(d
            .observe(&[r("default", stack("web"), 13)], t0 + 60_000)
            .is_empty());
        // Counters that started over count from zero.
        let out = d.observe(&[r("default", stack("web"), 2)], t0 + 61_000);
        assert_eq!(
            out,
            ["rule \"default\" dropped 2 packet(s) in the last 0 s, from: stack web 2"]
        );
    }

    /// A fake kernel: records what it was asked, refuses on demand.
    #[derive(Default)]
    struct Kernel {
        refuse_reload: Option<String>,
        refuse_context: Option<String>,
        generation: u32,
        closed: Option<String>,
        contexts: Vec<Surround>,
        policies: Vec<Policy>,
        reading: AclReading,
        stateless: bool,
    }

    #[derive(Clone)]
    struct Fake(Rc<RefCell<Kernel>>);

    impl Enforcer for Fake {
        fn enforced(&self) -> Enforced {
            let k = self.0.borrow();
            match &k.closed {
                Some(reason) => Enforced::Closed {
                    reason: reason.clone(),
                },
                None => Enforced::Installed {
                    generation: k.generation,
                },
            }
        }
        fn set_context(&mut self, s: &Surround) -> Result<(), String> {
            let mut k = self.0.borrow_mut();
            k.contexts.push(s.clone());
            if let Some(e) = k.refuse_context.clone() {
                k.closed = Some(e.clone());
                return Err(e);
            }
            k.closed = None;
            k.generation += 1;
            Ok(())
        }
        fn reload(&mut self, p: &Policy) -> Result<(), String> {
            let mut k = self.0.borrow_mut();
            if let Some(e) = k.refuse_reload.clone() {
                return Err(e);
            }
            k.policies.push(p.clone());
            k.generation += 1;
            Ok(())
        }
        fn read(&mut self) -> Result<AclReading, String> {
            Ok(self.0.borrow().reading.clone())
        }
        fn tracks_connections(&self) -> bool {
            !self.0.borrow().stateless
        }
    }

    fn policy(allow: &str) -> Policy {
        from_settings(Some("deny"), Some(allow), None).unwrap()
    }

    fn route(prefix: &str, s: &str) -> RemoteRoute {
        RemoteRoute {
            prefix: prefix.parse().unwrap(),
            stack: StackName::new(s).unwrap(),
            via: "10.2.0.254".parse().unwrap(),
            mac: "02:00:00:00:00:01".parse().unwrap(),
            host: "198.18.0.2".parse().unwrap(),
            same_host: false,
        }
    }

    fn started(k: &Rc<RefCell<Kernel>>) -> (Access<Fake>, Events) {
        let fake = Fake(k.clone());
        Access::start(policy("web:tcp/443"), Surround::default(), move |_, _| {
            Ok(fake)
        })
    }

    fn kinds(events: &Events) -> Vec<EventKind> {
        events.iter().map(|(k, _)| k.clone()).collect()
    }

    #[test]
    fn start_reports_installed_and_health_follows() {
        let k = Rc::new(RefCell::new(Kernel {
            generation: 1,
            ..Kernel::default()
        }));
        let (a, events) = started(&k);
        assert_eq!(kinds(&events), [EventKind::AclInstalled]);
        assert!(
            events[0]
                .1
                .contains("default deny, 1 rule(s) (generation 1)"),
            "{events:?}"
        );
        let h = a.health();
        assert_eq!(
            (h.default.as_str(), h.rules, h.generation, h.closed),
            ("deny", 1, 1, None)
        );
        assert_eq!(h.unresolved, vec![StackName::new("web").unwrap()]);
        assert_eq!(a.link_blocked(), None);
    }

    #[test]
    fn closed_fails_health_and_says_why_and_recovery_is_reported() {
        let k = Rc::new(RefCell::new(Kernel {
            closed: Some("the kernel refused the table (EINVAL)".into()),
            ..Kernel::default()
        }));
        let (mut a, events) = started(&k);
        assert_eq!(kinds(&events), [EventKind::AclClosed]);
        assert!(events[0]
            .1
            .contains("nothing enters from the overlay: the kernel refused the table (EINVAL)"));
        assert_eq!(
            a.health().closed.as_deref(),
            Some("the kernel refused the table (EINVAL)")
        );
        // The next routes change installs it: reported once.
        let events = a.set_remote(vec![route("10.2.0.0/24", "web")]);
        assert_eq!(kinds(&events), [EventKind::AclInstalled]);
        assert_eq!(a.health().closed, None);
        assert!(a.health().unresolved.is_empty(), "web resolves now");
        // Another change with the same outcome: no event, the context went down.
        let events = a.set_remote(vec![route("10.2.0.0/23", "web")]);
        assert!(events.is_empty());
        assert_eq!(
            k.borrow().contexts.last().unwrap().remote[0]
                .prefix
                .to_string(),
            "10.2.0.0/23"
        );
        // Closed again; the timer's retry installs it when the kernel takes it.
        k.borrow_mut().refuse_context = Some("ENOMEM".into());
        let events = a.set_remote(vec![route("10.2.0.0/22", "web")]);
        assert_eq!(kinds(&events), [EventKind::AclClosed]);
        let fails = |_: &Policy, _: &Surround| -> Result<Fake, String> { unreachable!("has one") };
        assert!(a.retry(fails).is_empty(), "still refused: no second event");
        k.borrow_mut().refuse_context = None;
        assert_eq!(kinds(&a.retry(fails)), [EventKind::AclInstalled]);
        assert!(a.retry(fails).is_empty(), "installed: nothing to retry");
        // Unchanged routes: the kernel is not asked.
        let n = k.borrow().contexts.len();
        assert!(a.set_remote(vec![route("10.2.0.0/22", "web")]).is_empty());
        assert_eq!(k.borrow().contexts.len(), n);
    }

    #[test]
    fn no_enforcer_at_all_holds_the_link_down_until_one_starts() {
        let (mut a, events) = Access::<Fake>::start(policy("ops"), Surround::default(), |_, _| {
            Err("nf_tables: Operation not supported".to_string())
        });
        assert_eq!(kinds(&events), [EventKind::AclClosed]);
        let why = a.link_blocked().unwrap().to_string();
        assert!(
            why.contains("nf_tables: Operation not supported") && why.contains("held down"),
            "{why}"
        );
        assert_eq!(a.health().closed.as_deref(), Some(why.as_str()));
        // The same failure again: no second event.
        assert!(a
            .retry(|_, _| Err("nf_tables: Operation not supported".into()))
            .is_empty());
        // No table: the router says it tracks connections (the safe answer).
        assert!(a.tracks_connections());
        let k = Rc::new(RefCell::new(Kernel {
            stateless: true,
            ..Kernel::default()
        }));
        let fake = Fake(k.clone());
        let events = a.retry(move |_, _| Ok(fake));
        assert_eq!(kinds(&events), [EventKind::AclInstalled]);
        assert_eq!(a.link_blocked(), None);
        // Then what the table in force says.
        assert!(!a.tracks_connections());
        k.borrow_mut().stateless = false;
        assert!(a.tracks_connections());
    }

    #[test]
    fn a_bad_or_refused_policy_keeps_the_old_one() {
        let k = Rc::new(RefCell::new(Kernel::default()));
        let (mut a, _) = started(&k);
        let old = a.policy().clone();
        let events = a.reload(Err(PolicyError(
            "VROUTER_ACL_FILE /acl.toml: rule 2: port 0".into(),
        )));
        assert_eq!(kinds(&events), [EventKind::AclRefused]);
        assert_eq!(
            events[0].1,
            "VROUTER_ACL_FILE /acl.toml: rule 2: port 0; the previous access policy stays in force"
        );
        assert_eq!(a.policy(), &old);
        assert!(a.health().refused.is_some());
        assert!(k.borrow().policies.is_empty(), "the kernel was not asked");

        k.borrow_mut().refuse_reload = Some("EPERM".into());
        let events = a.reload(Ok(policy("ops")));
        assert_eq!(kinds(&events), [EventKind::AclRefused]);
        assert!(events[0]
            .1
            .starts_with("the kernel refused the new access policy (EPERM)"));
        assert_eq!(a.policy(), &old);

        k.borrow_mut().refuse_reload = None;
        let events = a.reload(Ok(policy("ops, web")));
        assert_eq!(kinds(&events), [EventKind::AclInstalled]);
        assert!(events[0].1.contains("2 rule(s)"), "{events:?}");
        assert_eq!(a.policy(), &policy("ops, web"));
        assert_eq!(a.health().refused, None);
        // The same policy again (SIGHUP, an editor's second write): nothing.
        assert!(a.reload(Ok(policy("ops, web"))).is_empty());
        assert_eq!(k.borrow().policies.len(), 1);
    }

    #[test]
    fn counters_and_drop_events_come_from_the_reading() {
        let k = Rc::new(RefCell::new(Kernel::default()));
        let (mut a, _) = started(&k);
        let rule = |rule: &str, dropped: u64| AclRuleCounters {
            rule: rule.into(),
            verdict: "deny".into(),
            accepted_packets: 0,
            accepted_bytes: 0,
            dropped_packets: dropped,
            dropped_bytes: dropped * 100,
        };
        assert!(a.read(4_000).is_empty(), "the baseline");
        k.borrow_mut().reading = AclReading {
            rules: vec![rule("default", 7)],
            drops: vec![("default".into(), stack("web"), 7)],
        };
        let events = a.read(5_000);
        assert_eq!(kinds(&events), [EventKind::AclDrops]);
        assert!(events[0].1.contains("dropped 7 packet(s)") && events[0].1.contains("stack web 7"));
        assert_eq!(a.counters(), &[rule("default", 7)]);
        assert!(a.read(6_000).is_empty(), "no new drops");
    }
}
