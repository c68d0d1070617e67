//! The source side of a resolved policy, made flat for the kernel: disjoint address
//! ranges that cover all of 0.0.0.0/0, each with the rules that cover it in the order
//! [`ResolvedPolicy::decide`] weighs them and the remote stack it lies in. Pure.
//!
//! The range boundaries are the edges of every rule prefix and of every remote
//! stack's prefix, so inside one range every rule either covers every address or
//! none, the longest prefix of a rule that holds the range is the same for every
//! address of it, and the range lies in at most one remote stack's prefix (the
//! longest, if routes.json ever listed overlapping ones). Ranges with the same rules
//! in the same order and the same stack form a [`Class`]: the compiler makes one
//! chain per class, so a drop counted in it names the source stack. Adjacent ranges
//! of one class are merged.

use super::policy::Verdict;
use super::resolve::ResolvedPolicy;
use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use vrouter_state::{Prefix, RemoteRoute, StackName};

/// Addresses `first..=last` whose new connections one [`Class`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceRange {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
    /// Index into [`Classes::classes`].
    pub class: usize,
}

/// The rules that cover some source ranges, and the stack those ranges belong to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Class {
    /// Indices into `ResolvedPolicy::rules`, in precedence order: the longest source
    /// prefix that holds the range first, then the narrower service, then deny before
    /// allow, then the order written. The first rule whose service covers a new
    /// connection decides it, as `decide` would; none: the default.
    pub rules: Vec<usize>,
    /// The remote stack whose prefix holds the ranges; None for addresses no remote
    /// route covers.
    pub stack: Option<StackName>,
}

/// The flat form of a policy's sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classes {
    /// Sorted, disjoint, covering 0.0.0.0..=255.255.255.255; neighbours differ in class.
    pub ranges: Vec<SourceRange>,
    /// Each used by at least one range; distinct.
    pub classes: Vec<Class>,
}

/// The disjoint source ranges of `policy` and `remote` (this stack's remote routes).
/// The cost is linear in the number of rule and route prefixes (33 hash lookups per
/// range), plus the rules covering each range.
pub fn classes(policy: &ResolvedPolicy, remote: &[RemoteRoute]) -> Classes {
    let mut rules_at: HashMap<Prefix, Vec<usize>> = HashMap::new();
    let mut rule_lens: BTreeSet<u8> = BTreeSet::new();
    let mut edges: BTreeSet<u64> = BTreeSet::from([0]);
    let add_edges = |p: &Prefix, edges: &mut BTreeSet<u64>| {
        let (first, last) = bounds(p);
        edges.insert(u64::from(first));
        edges.insert(u64::from(last) + 1);
    };
    for (i, r) in policy.rules.iter().enumerate() {
        for p in &r.prefixes {
            rules_at.entry(*p).or_default().push(i);
            rule_lens.insert(p.prefix_len());
            add_edges(p, &mut edges);
        }
    }
    let mut stack_at: HashMap<Prefix, &StackName> = HashMap::new();
    let mut stack_lens: BTreeSet<u8> = BTreeSet::new();
    for r in remote {
        // Two stacks on one prefix (routes.json refuses overlaps; never expected): the
        // first name in order, so the result does not depend on the routes' order.
        let e = stack_at.entry(r.prefix).or_insert(&r.stack);
        if r.stack < **e {
            *e = &r.stack;
        }
        stack_lens.insert(r.prefix.prefix_len());
        add_edges(&r.prefix, &mut edges);
    }
    edges.remove(&(1u64 << 32));

    let mut index: HashMap<Class, usize> = HashMap::new();
    let mut out = Classes {
        ranges: Vec::new(),
        classes: Vec::new(),
    };
    let edges: Vec<u64> = edges.into_iter().collect();
    for (i, &start) in edges.iter().enumerate() {
        let first = Ipv4Addr::from(start as u32);
        let last = match edges.get(i + 1) {
            Some(&next) => Ipv4Addr::from((next - 1) as u32),
            None => Ipv4Addr::from(u32::MAX),
        };
        let class = Class {
            rules: covering(policy, &rules_at, &rule_lens, first),
            stack: stack_lens
                .iter()
                .rev()
                .find_map(|&len| stack_at.get(&Prefix::containing(first, len)))
                .map(|s| (*s).clone()),
        };
        let next = out.classes.len();
        let class = *index.entry(class.clone()).or_insert_with(|| {
            out.classes.push(class);
            next
        });
        match out.ranges.last_mut() {
            Some(prev) if prev.class == class => prev.last = last,
            _ => out.ranges.push(SourceRange { first, last, class }),
        }
    }
    out
}

/// The rules with a prefix that holds `addr`, in precedence order.
fn covering(
    policy: &ResolvedPolicy,
    rules_at: &HashMap<Prefix, Vec<usize>>,
    lens: &BTreeSet<u8>,
    addr: Ipv4Addr,
) -> Vec<usize> {
    let mut seen = BTreeSet::new();
    let mut keyed = Vec::new();
    // Longest prefix first: a rule counts with the longest of its prefixes that holds
    // the address, as in decide().
    for &len in lens.iter().rev() {
        let Some(rules) = rules_at.get(&Prefix::containing(addr, len)) else {
            continue;
        };
        for &i in rules {
            if seen.insert(i) {
                let rule = &policy.rules[i].rule;
                let key = (
                    len,
                    rule.service.specificity(),
                    rule.verdict == Verdict::Deny,
                );
                keyed.push((key, i));
            }
        }
    }
    // Greater key first; among equal keys the order written.
    keyed.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// The first and last address of a prefix.
pub fn bounds(p: &Prefix) -> (u32, u32) {
    let first = u32::from(p.addr());
    let size_minus_one = if p.prefix_len() == 0 {
        u32::MAX
    } else {
        (1u32 << (32 - p.prefix_len())) - 1
    };
    (first, first | size_minus_one)
}
