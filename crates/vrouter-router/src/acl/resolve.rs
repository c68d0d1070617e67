//! From a policy and the remote stacks routes.json gives to a rule set over prefixes,
//! and the decision that rule set makes for one new connection. Pure.

use super::policy::{Policy, Rule, Service, Source, Verdict};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use vrouter_state::{Prefix, RemoteRoute, StackName};

/// A rule with its source as the prefixes it stands for now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedRule {
    pub rule: Rule,
    /// Sorted; empty for a stack that is not (or no longer) on the overlay.
    pub prefixes: Vec<Prefix>,
}

/// The policy as the kernel would enforce it at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedPolicy {
    pub default: Verdict,
    pub rules: Vec<ResolvedRule>,
    /// Stacks that rules name but routes.json does not list (yet, or any more): their
    /// rules cover nothing until they come.
    pub unresolved: Vec<StackName>,
}

impl ResolvedPolicy {
    /// "Allow, no rules" (see [`Policy::is_default`]).
    pub fn is_default(&self) -> bool {
        self.default == Verdict::Allow && self.rules.is_empty()
    }
}

/// Resolves every rule's source against `remote`, this stack's remote routes from
/// routes.json (same-host and other hosts alike). Called again on every routes.json
/// change, so a rule naming a stack follows it when it moves or gains a prefix, and
/// covers nothing once it has left.
pub fn resolve(policy: &Policy, remote: &[RemoteRoute]) -> ResolvedPolicy {
    let mut of_stack: BTreeMap<&StackName, BTreeSet<Prefix>> = BTreeMap::new();
    for r in remote {
        of_stack.entry(&r.stack).or_default().insert(r.prefix);
    }
    let mut unresolved = BTreeSet::new();
    let rules = policy
        .rules
        .iter()
        .map(|rule| {
            let prefixes = match &rule.source {
                Source::Any => vec![Prefix::containing(Ipv4Addr::UNSPECIFIED, 0)],
                Source::Prefix(p) => vec![*p],
                Source::Stack(s) => match of_stack.get(s) {
                    Some(set) => set.iter().copied().collect(),
                    None => {
                        unresolved.insert(s.clone());
                        Vec::new()
                    }
                },
            };
            ResolvedRule {
                rule: rule.clone(),
                prefixes,
            }
        })
        .collect();
    ResolvedPolicy {
        default: policy.default,
        rules,
        unresolved: unresolved.into_iter().collect(),
    }
}

/// What decides a new connection, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'a> {
    pub verdict: Verdict,
    /// The deciding rule and the prefix of its source that holds the address; None
    /// when the default decides.
    pub by: Option<(&'a ResolvedRule, Prefix)>,
}

impl fmt::Display for Decision<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.by {
            None => write!(f, "{} by default: no rule covers it", self.verdict),
            Some((r, p)) => write!(
                f,
                "{} by rule {:?}: the source is in {p}{}, the most specific rule that covers it",
                self.verdict,
                r.rule.name,
                match &r.rule.source {
                    Source::Stack(s) => format!(" (stack {s})"),
                    _ => String::new(),
                }
            ),
        }
    }
}

impl ResolvedPolicy {
    /// The verdict on a new connection from `source` with IP protocol `protocol`
    /// (6 tcp, 17 udp, 1 icmp) to destination `port` (tcp and udp). See the
    /// precedence in the module's documentation: the longest source prefix first,
    /// then the narrowest service, then deny over allow; the default when no rule
    /// covers the connection.
    pub fn decide(&self, source: Ipv4Addr, protocol: u8, port: Option<u16>) -> Decision<'_> {
        let mut best: Option<((u8, u8, bool), &ResolvedRule, Prefix)> = None;
        for r in &self.rules {
            if !r.rule.service.covers(protocol, port) {
                continue;
            }
            // The longest of its prefixes that holds the address.
            let Some(p) = r
                .prefixes
                .iter()
                .filter(|p| p.contains(source))
                .max_by_key(|p| p.prefix_len())
            else {
                continue;
            };
            let key = precedence(p, &r.rule.service, r.rule.verdict);
            // Strictly greater: among equals the first rule written names the decision
            // (they agree on the verdict, which is part of the key).
            if best.as_ref().is_none_or(|(k, _, _)| key > *k) {
                best = Some((key, r, *p));
            }
        }
        match best {
            Some((_, r, p)) => Decision {
                verdict: r.rule.verdict,
                by: Some((r, p)),
            },
            None => Decision {
                verdict: self.default,
                by: None,
            },
        }
    }
}

/// Larger wins: source prefix length, then service specificity, then deny.
fn precedence(source: &Prefix, service: &Service, verdict: Verdict) -> (u8, u8, bool) {
    (
        source.prefix_len(),
        service.specificity(),
        verdict == Verdict::Deny,
    )
}
