//! From a resolved policy and what the router knows of its overlay to the nftables
//! table that enforces it (`ip vrouter_acl`, replaced whole in one transaction). Pure:
//! the table is a value ([`TableSpec`]); `enforce.rs` puts it in the kernel.
//!
//! The table (see ACL-CONTRACT.md and docs/ARCHITECTURE.md):
//!
//! ```text
//! set local    { ipv4_addr; interval }                 this stack's prefixes
//! set origins  { ipv4_addr . ether_addr; interval }    remote prefix . its router's MAC
//! set admitted { mark; counter per element }           gen<<16|id of every allow rule
//! map classes  { ipv4_addr : verdict; interval }       source range -> jump c<N>
//! chain forward (filter, hook forward, priority -10, policy accept)
//!  1 iifname != OVL oifname OVL ip saddr != @local counter drop       "acl spoof-from-stack"
//!  2 iifname OVL ip daddr @local ip saddr . ether saddr != @origins
//!                                                   counter drop      "acl spoof-from-overlay"
//!  3 ct state new, tcp not a bare SYN, ip saddr @local counter drop   "acl tcp-not-syn"
//!  4 ct original ip daddr != @local accept          transit, and the stack's own connections
//!  5 ct original ip saddr @local accept             inside the stack
//!  6 ct mark @admitted accept                       admitted under the policy in force
//!  7 ct original ip saddr vmap @classes
//!  8 counter drop                                                     "acl fallback"
//! chain c<N>: per covering rule in precedence order, per port range:
//!    ct original protocol P [ct original proto-dst A-B] counter (ct mark set M accept | drop)
//!                                                                     "acl <id> <stack|->"
//!  then the default: counter (ct mark set gen<<16|0xffff accept | drop)  "acl default <stack|->"
//! ```
//!
//! A rule's id is its index in the policy plus one; the ct mark of a connection a rule
//! admitted is `generation << 16 | id` (`0xffff`: the default). Only marks of the
//! generation in force are in `admitted`, so after a generation change every open
//! connection goes through the class chains again on its next packet.
//!
//! The default policy ("allow, no rules") restricts nothing, and compiles to a
//! **stateless** table instead ([`stateless`], issue 15): the same sets `local` and
//! `origins`, and a base chain of rules 1 and 2 and
//!
//! ```text
//!  3 ip saddr != @local ip daddr @local counter accept              "acl entering"
//! ```
//!
//! (the policy accepts the rest). No expression touches conntrack, so the router's
//! namespace does not load it (nftables registers conntrack in a namespace only for a
//! table that uses it), and the router forwards a flow of which it sees one direction
//! only: with port steering (discovery, `Registration.conntrack` false), a stack of the
//! default policy sends its frames straight into the tunnel, and its router sees only
//! what enters the stack. Rule 3 counts that traffic for the default verdict.
//!
//! Rule 3 of the stateful table is what keeps conntrack's loose pickup honest. A TCP connection conntrack
//! first sees mid-stream from the stack's side (its entry expired or was never made:
//! a router restarted in a fresh namespace) would be taken for the stack's own
//! outgoing connection, with its original direction the wrong way round, and rule 4
//! would pass it: so such packets are dropped. Seen first from the overlay side, a
//! mid-stream packet gets the right original direction and goes through the policy
//! like a new connection, so an allowed connection survives a router restarted in a
//! fresh namespace (its first packet from the client is checked and admitted), and a
//! denied one stays denied.

use super::policy::{Service, Verdict};
use super::ranges::{bounds, classes};
use super::resolve::ResolvedPolicy;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use vrouter_kernel::{
    AddrField, BaseHook, ChainSpec, Family, Hook, Ipv4Range, Match, RuleSpec, RuleVerdict,
    SetElements, SetSpec, TableSpec,
};
use vrouter_state::{Mac, Prefix, RemoteRoute};

/// The table's name (family ip).
pub const TABLE: &str = "vrouter_acl";
/// The base chain's name.
pub const CHAIN: &str = "forward";
/// Before the traffic counters' chain (priority 0), so dropped packets are not counted
/// as forwarded.
pub const PRIORITY: i32 = -10;
/// The most rules a policy may have: ids 1..=0xfffe, 0xffff is the default.
pub const MAX_RULES: usize = 0xfffe;
/// The id of the default verdict in marks.
pub const DEFAULT_ID: u16 = 0xffff;

pub const SET_LOCAL: &str = "local";
pub const SET_ORIGINS: &str = "origins";
pub const SET_ADMITTED: &str = "admitted";
pub const MAP_CLASSES: &str = "classes";

/// The comments of the rules that are not policy rules but count drops.
pub const COMMENT_SPOOF_FROM_STACK: &str = "acl spoof-from-stack";
pub const COMMENT_SPOOF_FROM_OVERLAY: &str = "acl spoof-from-overlay";
pub const COMMENT_TCP_NOT_SYN: &str = "acl tcp-not-syn";
pub const COMMENT_FALLBACK: &str = "acl fallback";
pub const COMMENT_CLOSED: &str = "acl closed";
/// The stateless table's rule that counts what enters the stack (for the default).
pub const COMMENT_ENTERING: &str = "acl entering";

/// What the router knows of its overlay when it compiles.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AclContext {
    /// This stack's own prefixes.
    pub local: Vec<Prefix>,
    /// The router's overlay link (macvlan on the VXLAN bridge).
    pub overlay_ifname: String,
    /// This stack's remote routes from routes.json (same host included).
    pub remote: Vec<RemoteRoute>,
}

/// A policy as a table, and what its ids mean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    pub table: TableSpec,
    /// (id, rule name, verdict) for every rule of the policy, in policy order.
    pub rules: Vec<(u16, String, Verdict)>,
}

/// Whether `table` uses conntrack anywhere (a ct match, a ct mark set, a ct vmap, a
/// set of ct marks): then the router must see both directions of every connection
/// it forwards, else it takes the half it sees for invalid and drops it.
pub fn tracks_connections(table: &TableSpec) -> bool {
    let ct_field =
        |f: &AddrField| matches!(f, AddrField::CtOriginalSaddr | AddrField::CtOriginalDaddr);
    let ct_match = |m: &Match| match m {
        Match::CtStateNew
        | Match::CtOriginalProtocol(_)
        | Match::CtOriginalDport { .. }
        | Match::CtMarkInSet { .. } => true,
        Match::AddrInSet { field, .. } => ct_field(field),
        _ => false,
    };
    let ct_rule = |r: &RuleSpec| {
        r.set_ct_mark.is_some()
            || matches!(&r.verdict, RuleVerdict::Vmap { field, .. } if ct_field(field))
            || r.matches.iter().any(ct_match)
    };
    table
        .sets
        .iter()
        .any(|s| matches!(s.elements, SetElements::CountedMarks(_)))
        || table.chains.iter().flat_map(|c| &c.rules).any(ct_rule)
}

/// The ct mark of a connection that rule `id` admitted under `generation`.
pub fn mark(generation: u16, id: u16) -> u32 {
    u32::from(generation) << 16 | u32::from(id)
}

/// The comment of a class-chain rule: `acl <id> <stack>`, or `acl default <stack>`;
/// `-` for sources in no remote stack.
pub fn rule_comment(id: Option<u16>, stack: Option<&str>) -> String {
    let stack = stack.unwrap_or("-");
    match id {
        Some(id) => format!("acl {id} {stack}"),
        None => format!("acl default {stack}"),
    }
}

/// What a class-chain or admitted-element comment says: the rule id (None: the
/// default) and the source stack (None: `-` or not given). None for other comments.
pub fn parse_comment(comment: &str) -> Option<(Option<u16>, Option<&str>)> {
    let mut words = comment.split(' ');
    if words.next()? != "acl" {
        return None;
    }
    let id = match words.next()? {
        "default" => None,
        w => Some(w.parse::<u16>().ok().filter(|&id| id != 0)?),
    };
    let stack = match words.next() {
        None | Some("-") => None,
        Some(s) => Some(s),
    };
    if words.next().is_some() {
        return None;
    }
    Some((id, stack))
}

/// The table that enforces `policy` for this stack with marks of `generation`.
/// Refuses a policy with more than [`MAX_RULES`] rules (one line, for the event).
pub fn compile(
    policy: &ResolvedPolicy,
    ctx: &AclContext,
    generation: u16,
) -> Result<Compiled, String> {
    if policy.rules.len() > MAX_RULES {
        return Err(format!(
            "the policy has {} rules, more than the {MAX_RULES} one router can enforce; merge rules (one rule takes a list of ports) or use prefixes that cover several sources",
            policy.rules.len()
        ));
    }
    if policy.is_default() {
        return Ok(Compiled {
            table: stateless(ctx),
            rules: Vec::new(),
        });
    }
    let id = |i: usize| (i + 1) as u16;
    let flat = classes(policy, &ctx.remote);
    let mut chains = vec![base_chain(&ctx.overlay_ifname, false)];
    for (n, class) in flat.classes.iter().enumerate() {
        let stack = class.stack.as_ref().map(|s| s.as_str());
        let mut rules = Vec::new();
        for &i in &class.rules {
            let rule = &policy.rules[i].rule;
            let comment = rule_comment(Some(id(i)), stack);
            let protocol = |p: &super::policy::Protocol| Match::CtOriginalProtocol(p.number());
            let matches: Vec<Vec<Match>> = match &rule.service {
                Service::All => vec![vec![]],
                Service::Protocol(p) => vec![vec![protocol(p)]],
                Service::Ports(p, ranges) => ranges
                    .iter()
                    .map(|r| {
                        vec![
                            protocol(p),
                            Match::CtOriginalDport {
                                first: r.first,
                                last: r.last,
                            },
                        ]
                    })
                    .collect(),
            };
            for matches in matches {
                rules.push(verdict_rule(
                    matches,
                    rule.verdict,
                    generation,
                    id(i),
                    comment.clone(),
                ));
            }
        }
        rules.push(verdict_rule(
            vec![],
            policy.default,
            generation,
            DEFAULT_ID,
            rule_comment(None, stack),
        ));
        chains.push(ChainSpec {
            name: class_chain(n),
            hook: None,
            rules,
        });
    }
    let mut admitted: Vec<(u32, String)> = policy
        .rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.rule.verdict == Verdict::Allow)
        .map(|(i, _)| (mark(generation, id(i)), format!("acl {}", id(i))))
        .collect();
    if policy.default == Verdict::Allow {
        admitted.push((mark(generation, DEFAULT_ID), "acl default".to_string()));
    }
    let mut sets = context_sets(ctx);
    sets.push(SetSpec {
        name: SET_ADMITTED.to_string(),
        elements: SetElements::CountedMarks(admitted),
    });
    sets.push(SetSpec {
        name: MAP_CLASSES.to_string(),
        elements: SetElements::JumpMap(
            flat.ranges
                .iter()
                .map(|r| {
                    (
                        Ipv4Range {
                            first: r.first,
                            last: r.last,
                        },
                        class_chain(r.class),
                    )
                })
                .collect(),
        ),
    });
    Ok(Compiled {
        table: TableSpec {
            family: Family::Ip,
            name: TABLE.to_string(),
            sets,
            chains,
        },
        rules: policy
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| (id(i), r.rule.name.clone(), r.rule.verdict))
            .collect(),
    })
}

/// The table that admits nothing from the overlay into the stack, for when a policy
/// cannot be installed: the anti-spoofing and bare-SYN rules, transit and the stack's
/// own connections as usual, then `counter drop` ("acl closed").
pub fn closed(ctx: &AclContext) -> TableSpec {
    TableSpec {
        family: Family::Ip,
        name: TABLE.to_string(),
        sets: context_sets(ctx),
        chains: vec![base_chain(&ctx.overlay_ifname, true)],
    }
}

/// The table of the default policy, "allow, no rules": the anti-spoofing rules, and
/// the count of what enters the stack; no conntrack (see the module's documentation).
pub fn stateless(ctx: &AclContext) -> TableSpec {
    let mut rules = anti_spoofing(&ctx.overlay_ifname);
    rules.push(rule(
        vec![
            local(AddrField::IpSaddr, false),
            local(AddrField::IpDaddr, true),
        ],
        true,
        RuleVerdict::Accept,
        COMMENT_ENTERING,
    ));
    TableSpec {
        family: Family::Ip,
        name: TABLE.to_string(),
        sets: context_sets(ctx),
        chains: vec![forward_chain(rules)],
    }
}

/// The name of the chain of class `n`.
pub fn class_chain(n: usize) -> String {
    format!("c{n}")
}

fn verdict_rule(
    matches: Vec<Match>,
    verdict: Verdict,
    generation: u16,
    id: u16,
    comment: String,
) -> RuleSpec {
    let (set_ct_mark, verdict) = match verdict {
        Verdict::Allow => (Some(mark(generation, id)), RuleVerdict::Accept),
        Verdict::Deny => (None, RuleVerdict::Drop),
    };
    RuleSpec {
        matches,
        counter: true,
        counter_start: (0, 0),
        set_ct_mark,
        statements: Vec::new(),
        verdict,
        comment,
    }
}

/// `local` and `origins`.
fn context_sets(ctx: &AclContext) -> Vec<SetSpec> {
    let local = merge(ctx.local.iter().map(bounds).collect())
        .into_iter()
        .map(range)
        .collect();
    // Per MAC, its prefixes merged: interval elements of one key may not overlap.
    let mut by_mac: BTreeMap<Mac, Vec<(u32, u32)>> = BTreeMap::new();
    for r in &ctx.remote {
        by_mac.entry(r.mac).or_default().push(bounds(&r.prefix));
    }
    let mut origins: Vec<(Ipv4Range, Mac)> = by_mac
        .into_iter()
        .flat_map(|(mac, spans)| merge(spans).into_iter().map(move |s| (range(s), mac)))
        .collect();
    origins.sort_by_key(|(r, mac)| (r.first, *mac));
    vec![
        SetSpec {
            name: SET_LOCAL.to_string(),
            elements: SetElements::Ipv4Ranges(local),
        },
        SetSpec {
            name: SET_ORIGINS.to_string(),
            elements: SetElements::SourceMacs(origins),
        },
    ]
}

fn range((first, last): (u32, u32)) -> Ipv4Range {
    Ipv4Range {
        first: Ipv4Addr::from(first),
        last: Ipv4Addr::from(last),
    }
}

/// Sorted, with overlapping and adjacent spans joined.
fn merge(mut spans: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    spans.sort();
    let mut out: Vec<(u32, u32)> = Vec::new();
    for (first, last) in spans {
        match out.last_mut() {
            Some(prev) if u64::from(first) <= u64::from(prev.1) + 1 => prev.1 = prev.1.max(last),
            _ => out.push((first, last)),
        }
    }
    out
}

/// `rule` with the given parts, no ct mark.
fn rule(matches: Vec<Match>, counter: bool, verdict: RuleVerdict, comment: &str) -> RuleSpec {
    RuleSpec {
        matches,
        counter,
        counter_start: (0, 0),
        set_ct_mark: None,
        statements: Vec::new(),
        verdict,
        comment: comment.to_string(),
    }
}

fn local(field: AddrField, equal: bool) -> Match {
    Match::AddrInSet {
        field,
        set: SET_LOCAL.to_string(),
        equal,
    }
}

/// Rules 1 and 2, shared by every table: forged sources from the stack and from the
/// overlay.
fn anti_spoofing(ovl: &str) -> Vec<RuleSpec> {
    let iif = |equal| Match::IifName {
        name: ovl.to_string(),
        equal,
    };
    vec![
        rule(
            vec![
                iif(false),
                Match::OifName {
                    name: ovl.to_string(),
                    equal: true,
                },
                local(AddrField::IpSaddr, false),
            ],
            true,
            RuleVerdict::Drop,
            COMMENT_SPOOF_FROM_STACK,
        ),
        rule(
            vec![
                iif(true),
                local(AddrField::IpDaddr, true),
                Match::SourceMacNotInSet {
                    set: SET_ORIGINS.to_string(),
                },
            ],
            true,
            RuleVerdict::Drop,
            COMMENT_SPOOF_FROM_OVERLAY,
        ),
    ]
}

/// The forward hook's chain with `rules`.
fn forward_chain(rules: Vec<RuleSpec>) -> ChainSpec {
    ChainSpec {
        name: CHAIN.to_string(),
        hook: Some(BaseHook {
            hook: Hook::Forward,
            priority: PRIORITY,
            policy_accept: true,
        }),
        rules,
    }
}

/// The stateful base chain: rules 1-8, or 1-5 and "acl closed".
fn base_chain(ovl: &str, closed: bool) -> ChainSpec {
    let mut rules = anti_spoofing(ovl);
    rules.extend([
        rule(
            vec![
                Match::CtStateNew,
                Match::TcpNotSyn,
                local(AddrField::IpSaddr, true),
            ],
            true,
            RuleVerdict::Drop,
            COMMENT_TCP_NOT_SYN,
        ),
        rule(
            vec![local(AddrField::CtOriginalDaddr, false)],
            false,
            RuleVerdict::Accept,
            "acl transit or outgoing",
        ),
        rule(
            vec![local(AddrField::CtOriginalSaddr, true)],
            false,
            RuleVerdict::Accept,
            "acl inside",
        ),
    ]);
    if closed {
        rules.push(rule(vec![], true, RuleVerdict::Drop, COMMENT_CLOSED));
    } else {
        rules.push(rule(
            vec![Match::CtMarkInSet {
                set: SET_ADMITTED.to_string(),
            }],
            false,
            RuleVerdict::Accept,
            "acl admitted",
        ));
        rules.push(rule(
            vec![],
            false,
            RuleVerdict::Vmap {
                field: AddrField::CtOriginalSaddr,
                map: MAP_CLASSES.to_string(),
            },
            "acl classes",
        ));
        rules.push(rule(vec![], true, RuleVerdict::Drop, COMMENT_FALLBACK));
    }
    forward_chain(rules)
}

#[cfg(test)]
pub(crate) mod tests;
