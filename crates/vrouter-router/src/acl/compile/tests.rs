//! The compiled table checked by walking it as the kernel would (an interpreter of
//! [`TableSpec`] below), against `ResolvedPolicy::decide`.

use super::*;
use crate::acl::policy::{PortRange, Protocol, Rule, Source};
use crate::acl::{from_settings, resolve, Policy};
use vrouter_state::StackName;

pub(crate) const TCP: u8 = 6;
pub(crate) const UDP: u8 = 17;
const ICMP: u8 = 1;
const GRE: u8 = 47;
const OVL: &str = "ovl0";
/// The stack's bridge side.
const LAN: &str = "eth0";

pub(crate) fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn prefix(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn stack(s: &str) -> StackName {
    StackName::new(s).unwrap()
}

pub(crate) fn mac_of(n: u8) -> Mac {
    Mac([2, 0, 0, 0, 0, n])
}

pub(crate) fn route(s: &str, p: &str, mac: u8) -> RemoteRoute {
    RemoteRoute {
        prefix: prefix(p),
        stack: stack(s),
        via: Ipv4Addr::new(10, 250, 0, mac),
        mac: mac_of(mac),
        host: ip("192.168.0.2"),
        same_host: false,
    }
}

pub(crate) fn ctx(remote: Vec<RemoteRoute>) -> AclContext {
    AclContext {
        local: vec![prefix("172.16.0.0/24"), prefix("172.16.1.0/24")],
        overlay_ifname: OVL.to_string(),
        remote,
    }
}

pub(crate) fn policy(default: &str, allow: &str, file: Option<&str>) -> Policy {
    let file = file.map(|t| (std::path::Path::new("/acl.toml"), t));
    from_settings(Some(default), Some(allow).filter(|s| !s.is_empty()), file).unwrap()
}

// ---- the interpreter ----

/// One packet as the forward hook sees it, with its conntrack entry.
#[derive(Debug, Clone)]
pub(crate) struct Packet {
    pub(crate) iif: String,
    pub(crate) oif: String,
    pub(crate) saddr: Ipv4Addr,
    pub(crate) daddr: Ipv4Addr,
    pub(crate) src_mac: Mac,
    /// ct state new.
    pub(crate) new: bool,
    /// TCP with flags other than a bare SYN.
    pub(crate) tcp_not_syn: bool,
    pub(crate) ct_mark: u32,
    /// The conntrack entry's original tuple.
    pub(crate) orig_saddr: Ipv4Addr,
    pub(crate) orig_daddr: Ipv4Addr,
    pub(crate) orig_protocol: u8,
    pub(crate) orig_dport: Option<u16>,
    /// Whether conntrack has an entry for it. Without one (conntrack took it for
    /// invalid: it saw only the other half of the connection) every ct expression
    /// breaks the rule, as in the kernel, and `ct mark set` does nothing.
    pub(crate) tracked: bool,
}

impl Packet {
    /// The first packet (a bare SYN for TCP) of a new connection from the overlay.
    pub(crate) fn new_from_overlay(
        src: Ipv4Addr,
        mac: Mac,
        protocol: u8,
        port: Option<u16>,
    ) -> Packet {
        let dst = ip("172.16.0.10");
        Packet {
            iif: OVL.into(),
            oif: LAN.into(),
            saddr: src,
            daddr: dst,
            src_mac: mac,
            new: true,
            tcp_not_syn: false,
            ct_mark: 0,
            orig_saddr: src,
            orig_daddr: dst,
            orig_protocol: protocol,
            orig_dport: port,
            tracked: true,
        }
    }

    /// The same packet, with no conntrack entry.
    pub(crate) fn untracked(&self) -> Packet {
        Packet {
            tracked: false,
            ..self.clone()
        }
    }

    /// A later packet of the same connection, from the stack back to the source.
    pub(crate) fn reply(&self, ct_mark: u32) -> Packet {
        Packet {
            iif: self.oif.clone(),
            oif: self.iif.clone(),
            saddr: self.daddr,
            daddr: self.saddr,
            src_mac: mac_of(0xee),
            new: false,
            tcp_not_syn: self.orig_protocol == TCP,
            ct_mark,
            ..self.clone()
        }
    }

    /// A later packet in the original direction.
    pub(crate) fn again(&self, ct_mark: u32) -> Packet {
        Packet {
            new: false,
            tcp_not_syn: self.orig_protocol == TCP,
            ct_mark,
            ..self.clone()
        }
    }
}

/// What the table does with a packet: the verdict, the ct mark it ends with, and the
/// comment of the rule that gave the verdict (None: the base chain's policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) accept: bool,
    pub(crate) ct_mark: u32,
    /// The deciding rule's chain and comment.
    pub(crate) chain: Option<String>,
    pub(crate) by: Option<String>,
}

fn set<'a>(t: &'a TableSpec, name: &str) -> &'a SetElements {
    &t.sets
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no set {name}"))
        .elements
}

fn in_range(r: &Ipv4Range, a: Ipv4Addr) -> bool {
    r.first <= a && a <= r.last
}

fn addr_in(t: &TableSpec, name: &str, a: Ipv4Addr) -> bool {
    match set(t, name) {
        SetElements::Ipv4Ranges(v) => v.iter().any(|r| in_range(r, a)),
        other => panic!("set {name} is not an address set: {other:?}"),
    }
}

fn matches(t: &TableSpec, m: &Match, p: &Packet) -> bool {
    let ct = match m {
        Match::CtStateNew
        | Match::CtOriginalProtocol(_)
        | Match::CtOriginalDport { .. }
        | Match::CtMarkInSet { .. } => true,
        Match::AddrInSet { field, .. } => {
            matches!(
                field,
                AddrField::CtOriginalSaddr | AddrField::CtOriginalDaddr
            )
        }
        _ => false,
    };
    if ct && !p.tracked {
        return false;
    }
    match m {
        Match::IifName { name, equal } => (p.iif == *name) == *equal,
        Match::OifName { name, equal } => (p.oif == *name) == *equal,
        Match::AddrInSet { field, set, equal } => {
            let a = match field {
                AddrField::IpSaddr => p.saddr,
                AddrField::IpDaddr => p.daddr,
                AddrField::CtOriginalSaddr => p.orig_saddr,
                AddrField::CtOriginalDaddr => p.orig_daddr,
            };
            addr_in(t, set, a) == *equal
        }
        Match::CtStateNew => p.new,
        Match::TcpNotSyn => p.orig_protocol == TCP && p.tcp_not_syn,
        Match::CtOriginalProtocol(n) => p.orig_protocol == *n,
        Match::CtOriginalDport { first, last } => {
            p.orig_dport.is_some_and(|d| (*first..=*last).contains(&d))
        }
        Match::CtMarkInSet { set: name } => match set(t, name) {
            SetElements::CountedMarks(v) => v.iter().any(|(m, _)| *m == p.ct_mark),
            other => panic!("set {name} is not a mark set: {other:?}"),
        },
        Match::SourceMacNotInSet { set: name } => match set(t, name) {
            SetElements::SourceMacs(v) => !v
                .iter()
                .any(|(r, mac)| in_range(r, p.saddr) && *mac == p.src_mac),
            other => panic!("set {name} is not an origins set: {other:?}"),
        },
        other => panic!("match {other:?} is not one the ACL table uses"),
    }
}

enum Flow {
    Verdict(bool, String, String),
    Return,
}

fn run_chain(t: &TableSpec, chain: &ChainSpec, p: &Packet, mark: &mut u32, depth: u32) -> Flow {
    assert!(depth < 4, "jumps nest too deep");
    for rule in &chain.rules {
        if !rule.matches.iter().all(|m| matches(t, m, p)) {
            continue;
        }
        if let Some(m) = rule.set_ct_mark.filter(|_| p.tracked) {
            *mark = m;
        }
        match &rule.verdict {
            RuleVerdict::Accept => {
                return Flow::Verdict(true, chain.name.clone(), rule.comment.clone())
            }
            RuleVerdict::Drop => {
                return Flow::Verdict(false, chain.name.clone(), rule.comment.clone())
            }
            RuleVerdict::Continue => {}
            RuleVerdict::Vmap {
                field: AddrField::CtOriginalSaddr,
                ..
            } if !p.tracked => {}
            RuleVerdict::Vmap {
                field: AddrField::CtOriginalSaddr,
                map,
            } => {
                let SetElements::JumpMap(v) = set(t, map) else {
                    panic!("{map} is not a jump map")
                };
                let hits: Vec<&String> = v
                    .iter()
                    .filter(|(r, _)| in_range(r, p.orig_saddr))
                    .map(|(_, c)| c)
                    .collect();
                assert!(hits.len() <= 1, "{} in two ranges of {map}", p.orig_saddr);
                if let Some(name) = hits.first() {
                    let target = t
                        .chains
                        .iter()
                        .find(|c| &c.name == *name)
                        .unwrap_or_else(|| panic!("jump to missing chain {name}"));
                    assert!(target.hook.is_none(), "jump to a base chain");
                    if let v @ Flow::Verdict(..) = run_chain(t, target, p, mark, depth + 1) {
                        return v;
                    }
                }
            }
            other => panic!("verdict {other:?} is not one the ACL table uses"),
        }
    }
    Flow::Return
}

/// The packet through the base chain, as the kernel would take it.
pub(crate) fn walk(t: &TableSpec, p: &Packet) -> Outcome {
    let base: Vec<&ChainSpec> = t.chains.iter().filter(|c| c.hook.is_some()).collect();
    assert_eq!(base.len(), 1, "one base chain");
    let mut mark = p.ct_mark;
    match run_chain(t, base[0], p, &mut mark, 0) {
        Flow::Verdict(accept, chain, by) => Outcome {
            accept,
            ct_mark: mark,
            chain: Some(chain),
            by: Some(by),
        },
        Flow::Return => Outcome {
            accept: base[0].hook.as_ref().unwrap().policy_accept,
            ct_mark: mark,
            chain: None,
            by: None,
        },
    }
}

/// The MAC of the router that announces `a` (the longest remote prefix holding it).
fn origin_of(c: &AclContext, a: Ipv4Addr) -> Option<Mac> {
    c.remote
        .iter()
        .filter(|r| r.prefix.contains(a))
        .max_by_key(|r| r.prefix.prefix_len())
        .map(|r| r.mac)
}

/// A new connection from `src` into the stack: from the overlay with its announcing
/// router's MAC when a remote route holds it, else through another link (so that the
/// anti-spoofing rule does not hide the classes from the comparison).
fn new_connection(c: &AclContext, src: Ipv4Addr, protocol: u8, port: Option<u16>) -> Packet {
    match origin_of(c, src) {
        Some(mac) => Packet::new_from_overlay(src, mac, protocol, port),
        None => Packet {
            iif: "uplink".into(),
            ..Packet::new_from_overlay(src, mac_of(0xfe), protocol, port)
        },
    }
}

/// What the table decided, as (allow, rule id or None for the default).
fn table_decision(o: &Outcome, generation: u16) -> (bool, Option<u16>) {
    let comment = o.by.as_deref().expect("a rule decided");
    if comment == COMMENT_ENTERING {
        // The stateless table of the default policy: no marks.
        assert_eq!(o.ct_mark, 0, "no ct mark set");
        return (o.accept, None);
    }
    let (id, _) = parse_comment(comment).unwrap_or_else(|| panic!("not a policy rule: {comment}"));
    if o.accept {
        assert_eq!(
            o.ct_mark >> 16,
            u32::from(generation),
            "mark of this generation"
        );
        let mark_id = (o.ct_mark & 0xffff) as u16;
        assert_eq!(Some(mark_id).filter(|&i| i != DEFAULT_ID), id);
    }
    (o.accept, id)
}

fn policy_decision(
    p: &ResolvedPolicy,
    src: Ipv4Addr,
    protocol: u8,
    port: Option<u16>,
) -> (bool, Option<u16>) {
    let d = p.decide(src, protocol, port);
    let id = d.by.map(|(r, _)| {
        let i = p.rules.iter().position(|x| std::ptr::eq(x, r)).unwrap();
        (i + 1) as u16
    });
    (d.verdict == Verdict::Allow, id)
}

// ---- the property test ----

/// splitmix64: deterministic, no crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
}

const RULE_PREFIXES: &[&str] = &[
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.0.0/17",
    "10.1.2.0/24",
    "10.1.2.128/25",
    "10.1.2.5/32",
    "10.1.2.200/32",
    "10.1.3.0/24",
    "10.2.0.0/16",
    "10.2.0.0/24",
    "192.168.7.0/24",
];
const STACK_PREFIXES: &[&str] = &[
    "10.1.2.0/24",
    "10.1.3.0/24",
    "10.1.2.128/25",
    "10.2.0.0/16",
    "10.2.0.0/24",
    "10.3.0.0/16",
    "192.168.7.0/25",
];
const PORT_RANGES: &[(u16, u16)] = &[
    (22, 22),
    (53, 53),
    (80, 80),
    (443, 443),
    (80, 90),
    (8000, 8080),
    (1, 1024),
];
const PORTS: &[u16] = &[
    1, 22, 53, 79, 80, 85, 90, 91, 443, 1024, 1025, 8000, 8080, 8081, 65535,
];

fn random_policy(rng: &mut Rng) -> Policy {
    let n = rng.below(12);
    let stacks = ["s0", "s1", "s2", "s3", "s4", "gone"];
    let rules = (0..n)
        .map(|i| {
            let source = match rng.below(4) {
                0 => Source::Any,
                1 => Source::Stack(stack(rng.pick(&stacks))),
                _ => Source::Prefix(prefix(rng.pick(RULE_PREFIXES))),
            };
            let protocol = rng.pick(&[Protocol::Tcp, Protocol::Udp, Protocol::Icmp]);
            let service = match rng.below(4) {
                0 => Service::All,
                1 => Service::Protocol(protocol),
                _ => {
                    let p = if rng.below(2) == 0 {
                        Protocol::Tcp
                    } else {
                        Protocol::Udp
                    };
                    let mut ranges: Vec<PortRange> = (0..1 + rng.below(3))
                        .map(|_| {
                            let (first, last) = rng.pick(PORT_RANGES);
                            PortRange { first, last }
                        })
                        .collect();
                    ranges.sort();
                    ranges.dedup();
                    Service::Ports(p, ranges)
                }
            };
            Rule {
                name: format!("r{i}"),
                verdict: if rng.below(2) == 0 {
                    Verdict::Allow
                } else {
                    Verdict::Deny
                },
                source,
                service,
            }
        })
        .collect();
    Policy {
        default: if rng.below(2) == 0 {
            Verdict::Allow
        } else {
            Verdict::Deny
        },
        rules,
    }
}

fn random_routes(rng: &mut Rng) -> Vec<RemoteRoute> {
    let mut routes = Vec::new();
    for (n, s) in ["s0", "s1", "s2", "s3", "s4"].iter().enumerate() {
        for _ in 0..rng.below(3) {
            let mut r = route(s, rng.pick(STACK_PREFIXES), n as u8 + 1);
            r.same_host = rng.below(2) == 0;
            routes.push(r);
        }
    }
    routes
}

/// Addresses around every edge of the pools, and some anywhere.
fn probe_addresses(rng: &mut Rng) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for p in RULE_PREFIXES.iter().chain(STACK_PREFIXES) {
        let (first, last) = bounds(&prefix(p));
        for a in [
            first.wrapping_sub(1),
            first,
            first.wrapping_add(1),
            last.wrapping_sub(1),
            last,
            last.wrapping_add(1),
        ] {
            out.push(Ipv4Addr::from(a));
        }
    }
    for _ in 0..10 {
        out.push(Ipv4Addr::from(
            0x0a00_0000 | (rng.next() as u32 & 0x03ff_ffff),
        ));
        out.push(Ipv4Addr::from(rng.next() as u32));
    }
    let local = ctx(vec![]).local;
    out.retain(|a| !local.iter().any(|p| p.contains(*a)));
    out.sort();
    out.dedup();
    out
}

#[test]
fn the_table_decides_as_decide_does() {
    let mut rng = Rng(0x5eed_0014);
    let mut cases = 0u64;
    let mut allowed = 0u64;
    let mut by_rule = 0u64;
    let mut stateless = 0u64;
    for round in 0..250 {
        let pol = random_policy(&mut rng);
        let c = ctx(random_routes(&mut rng));
        let resolved = resolve(&pol, &c.remote);
        let generation = (round * 257 % 65536) as u16;
        let compiled = compile(&resolved, &c, generation).unwrap();
        let t = &compiled.table;
        // Only the default policy leaves conntrack out.
        assert_eq!(tracks_connections(t), !pol.is_default(), "{pol:?}");
        stateless += u64::from(pol.is_default());
        for src in probe_addresses(&mut rng) {
            for protocol in [TCP, UDP, ICMP, GRE] {
                let ports: Vec<Option<u16>> = if protocol == TCP || protocol == UDP {
                    PORTS.iter().map(|&p| Some(p)).collect()
                } else {
                    vec![None]
                };
                for port in ports {
                    let want = policy_decision(&resolved, src, protocol, port);
                    let packet = new_connection(&c, src, protocol, port);
                    let got = table_decision(&walk(t, &packet), generation);
                    assert_eq!(
                        got, want,
                        "round {round}: {src} proto {protocol} port {port:?}\npolicy {pol:#?}\nroutes {:#?}\ntable {t:#?}",
                        c.remote
                    );
                    cases += 1;
                    allowed += u64::from(want.0);
                    by_rule += u64::from(want.1.is_some());
                }
            }
        }
    }
    // The generator reaches both verdicts, rules and the default, in quantity, and
    // the default policy's stateless table.
    assert!(cases > 100_000, "{cases} cases");
    assert!(stateless >= 3, "{stateless} stateless tables");
    assert!(
        allowed > cases / 10 && allowed < cases * 9 / 10,
        "{allowed} of {cases} allowed"
    );
    assert!(
        by_rule > cases / 10 && by_rule < cases * 9 / 10,
        "{by_rule} of {cases} by a rule"
    );
}

#[test]
fn ranges_are_disjoint_cover_everything_and_lie_in_one_stack() {
    let mut rng = Rng(7);
    for _ in 0..200 {
        let pol = random_policy(&mut rng);
        let routes = random_routes(&mut rng);
        let resolved = resolve(&pol, &routes);
        let flat = classes(&resolved, &routes);
        let mut next = 0u64;
        for (i, r) in flat.ranges.iter().enumerate() {
            assert_eq!(u64::from(u32::from(r.first)), next, "{flat:#?}");
            assert!(r.first <= r.last);
            next = u64::from(u32::from(r.last)) + 1;
            if i > 0 {
                assert_ne!(flat.ranges[i - 1].class, r.class, "neighbours merged");
            }
            // The range lies in one stack: its edges, and every route edge inside it,
            // have the range's stack as their longest remote prefix.
            let owner = |a: Ipv4Addr| {
                routes
                    .iter()
                    .filter(|r| r.prefix.contains(a))
                    .max_by_key(|r| (r.prefix.prefix_len(), std::cmp::Reverse(r.stack.clone())))
                    .map(|r| r.stack.clone())
            };
            let mut probes = vec![r.first, r.last];
            for route in &routes {
                let (f, l) = bounds(&route.prefix);
                probes.extend(
                    [f, l]
                        .map(Ipv4Addr::from)
                        .into_iter()
                        .filter(|a| r.first <= *a && *a <= r.last),
                );
            }
            for a in probes {
                assert_eq!(owner(a), flat.classes[r.class].stack, "{a} in {r:?}");
            }
        }
        assert_eq!(next, 1 << 32);
        let distinct: std::collections::HashSet<_> = flat.classes.iter().collect();
        assert_eq!(distinct.len(), flat.classes.len(), "classes are shared");
        for (n, _) in flat.classes.iter().enumerate() {
            assert!(flat.ranges.iter().any(|r| r.class == n), "class {n} unused");
        }
    }
}

// ---- targeted tests ----

fn compile_str(
    default: &str,
    allow: &str,
    routes: Vec<RemoteRoute>,
    generation: u16,
) -> (ResolvedPolicy, AclContext, Compiled) {
    let c = ctx(routes);
    let resolved = resolve(&policy(default, allow, None), &c.remote);
    let compiled = compile(&resolved, &c, generation).unwrap();
    (resolved, c, compiled)
}

fn two_stacks() -> Vec<RemoteRoute> {
    vec![
        route("web", "10.1.0.0/24", 1),
        route("ops", "10.2.0.0/24", 2),
    ]
}

#[test]
fn anti_spoofing_from_the_stack() {
    let (_, _, c) = compile_str("allow", "10.9.0.0/16", two_stacks(), 1);
    // From the stack's bridge to the overlay with a source outside its prefixes.
    let forged = Packet {
        iif: LAN.into(),
        oif: OVL.into(),
        saddr: ip("10.1.0.7"),
        daddr: ip("10.2.0.9"),
        orig_saddr: ip("10.1.0.7"),
        orig_daddr: ip("10.2.0.9"),
        ..Packet::new_from_overlay(ip("10.1.0.7"), mac_of(9), UDP, Some(53))
    };
    let o = walk(&c.table, &forged);
    assert!(!o.accept);
    assert_eq!(o.by.as_deref(), Some(COMMENT_SPOOF_FROM_STACK));
    // The same with its own source leaves (its own outgoing connection, rule 5).
    let honest = Packet {
        saddr: ip("172.16.0.4"),
        orig_saddr: ip("172.16.0.4"),
        ..forged.clone()
    };
    let o = walk(&c.table, &honest);
    assert!(o.accept, "{o:?}");
    assert_eq!(o.by.as_deref(), Some("acl transit or outgoing"));
}

#[test]
fn anti_spoofing_from_the_overlay_checks_the_announcing_router() {
    let (_, _, c) = compile_str("allow", "", two_stacks(), 1);
    let t = &c.table;
    // web's address from web's router: in.
    let o = walk(
        t,
        &Packet::new_from_overlay(ip("10.1.0.7"), mac_of(1), TCP, Some(80)),
    );
    assert!(o.accept);
    // web's address from ops's router: forged.
    let o = walk(
        t,
        &Packet::new_from_overlay(ip("10.1.0.7"), mac_of(2), TCP, Some(80)),
    );
    assert_eq!(
        (o.accept, o.by.as_deref()),
        (false, Some(COMMENT_SPOOF_FROM_OVERLAY))
    );
    // An address nobody announces: forged.
    let o = walk(
        t,
        &Packet::new_from_overlay(ip("10.9.0.7"), mac_of(1), TCP, Some(80)),
    );
    assert_eq!(
        (o.accept, o.by.as_deref()),
        (false, Some(COMMENT_SPOOF_FROM_OVERLAY))
    );
    // Transit (not to this stack) is not this stack's business.
    let transit = Packet {
        daddr: ip("10.2.0.9"),
        orig_daddr: ip("10.2.0.9"),
        oif: OVL.into(),
        ..Packet::new_from_overlay(ip("10.9.0.7"), mac_of(7), TCP, Some(80))
    };
    assert!(walk(t, &transit).accept);
}

#[test]
fn origins_hold_each_route_with_its_routers_mac() {
    let mut same = route("near", "10.5.0.0/24", 5);
    same.same_host = true;
    let routes = vec![
        route("web", "10.1.0.0/24", 1),
        route("web", "10.1.1.0/24", 1),
        route("web", "10.1.0.128/25", 1),
        route("ops", "10.1.0.0/24", 2),
        same,
    ];
    let c = compile(
        &resolve(&Policy::default(), &routes),
        &ctx(routes.clone()),
        1,
    )
    .unwrap();
    let SetElements::SourceMacs(origins) = set(&c.table, SET_ORIGINS) else {
        panic!()
    };
    let r = |a: &str, b: &str| Ipv4Range {
        first: ip(a),
        last: ip(b),
    };
    assert_eq!(
        origins,
        &vec![
            // web's three prefixes joined (one MAC's intervals may not overlap).
            (r("10.1.0.0", "10.1.1.255"), mac_of(1)),
            (r("10.1.0.0", "10.1.0.255"), mac_of(2)),
            (r("10.5.0.0", "10.5.0.255"), mac_of(5)),
        ]
    );
    let SetElements::Ipv4Ranges(local) = set(&c.table, SET_LOCAL) else {
        panic!()
    };
    assert_eq!(local, &vec![r("172.16.0.0", "172.16.1.255")]);
}

#[test]
fn tcp_picked_up_mid_stream_is_checked_from_the_overlay_and_dropped_from_the_stack() {
    // From the overlay, a mid-stream packet conntrack picks up has the right original
    // direction: the policy decides, as for a new connection (so an allowed connection
    // survives a router restarted in a fresh namespace, and a denied one does not).
    let (_, _, c) = compile_str("deny", "web:tcp/80", two_stacks(), 1);
    let mut p = Packet::new_from_overlay(ip("10.1.0.7"), mac_of(1), TCP, Some(80));
    p.tcp_not_syn = true;
    let o = walk(&c.table, &p);
    assert!(o.accept, "{o:?}");
    assert_eq!(o.by.as_deref(), Some("acl 1 web"));
    let mut denied = Packet::new_from_overlay(ip("10.1.0.7"), mac_of(1), TCP, Some(81));
    denied.tcp_not_syn = true;
    let o = walk(&c.table, &denied);
    assert!(!o.accept, "{o:?}");
    assert_eq!(o.by.as_deref(), Some("acl default web"));
    let (_, _, c) = compile_str("allow", "10.9.0.0/16", two_stacks(), 1);
    // Loose pickup the other way round: a mid-stream packet from the stack.
    let mut back = p.reply(0);
    back.new = true;
    back.orig_saddr = back.saddr;
    back.orig_daddr = back.daddr;
    let o = walk(&c.table, &back);
    assert_eq!(
        (o.accept, o.by.as_deref()),
        (false, Some(COMMENT_TCP_NOT_SYN))
    );
}

#[test]
fn replies_and_the_stacks_own_connections_pass_under_default_deny() {
    let (_, _, c) = compile_str("deny", "", two_stacks(), 1);
    let t = &c.table;
    // The stack opens a connection to web: out, and web's answers back in.
    let out = Packet {
        iif: LAN.into(),
        oif: OVL.into(),
        saddr: ip("172.16.0.4"),
        daddr: ip("10.1.0.7"),
        orig_saddr: ip("172.16.0.4"),
        orig_daddr: ip("10.1.0.7"),
        ..Packet::new_from_overlay(ip("10.1.0.7"), mac_of(1), TCP, Some(443))
    };
    assert!(walk(t, &out).accept);
    let mut answer = out.reply(0);
    answer.src_mac = mac_of(1);
    assert!(walk(t, &answer).accept, "{:?}", walk(t, &answer));
    // Between two of its own prefixes.
    let inside = Packet {
        iif: LAN.into(),
        oif: "eth1".into(),
        saddr: ip("172.16.0.4"),
        daddr: ip("172.16.1.4"),
        orig_saddr: ip("172.16.0.4"),
        orig_daddr: ip("172.16.1.4"),
        ..out.clone()
    };
    assert_eq!(walk(t, &inside).by.as_deref(), Some("acl inside"));
    // A new connection from web: the default drops it, counted for web.
    let o = walk(
        t,
        &Packet::new_from_overlay(ip("10.1.0.7"), mac_of(1), TCP, Some(443)),
    );
    assert_eq!(
        (o.accept, o.by.as_deref()),
        (false, Some("acl default web"))
    );
}

#[test]
fn admitted_connections_pass_until_the_generation_changes() {
    let routes = two_stacks();
    let (_, _, g1) = compile_str("deny", "web:tcp/443, ops", routes.clone(), 1);
    let syn = Packet::new_from_overlay(ip("10.1.0.7"), mac_of(1), TCP, Some(443));
    let first = walk(&g1.table, &syn);
    assert!(first.accept);
    assert_eq!(first.ct_mark, mark(1, 1));
    assert_eq!(first.by.as_deref(), Some("acl 1 web"));
    // Later packets, both ways, by the admitted mark.
    for p in [syn.again(first.ct_mark), syn.reply(first.ct_mark)] {
        let o = walk(&g1.table, &p);
        assert_eq!(
            (o.accept, o.by.as_deref()),
            (true, Some("acl admitted")),
            "{p:?}"
        );
    }
    // Generation 2 still allows it: both ways re-checked and marked anew.
    let (_, _, g2) = compile_str("deny", "web:tcp, ops", routes.clone(), 2);
    for p in [syn.again(first.ct_mark), syn.reply(first.ct_mark)] {
        let o = walk(&g2.table, &p);
        assert_eq!(
            (o.accept, o.ct_mark, o.by.as_deref()),
            (true, mark(2, 1), Some("acl 1 web"))
        );
    }
    // Generation 3 denies it: dropped both ways, the server speaking first included.
    let (_, _, g3) = compile_str("deny", "ops", routes, 3);
    for p in [syn.again(mark(2, 1)), syn.reply(mark(2, 1))] {
        let o = walk(&g3.table, &p);
        assert_eq!(
            (o.accept, o.by.as_deref()),
            (false, Some("acl default web")),
            "{p:?}"
        );
    }
}

#[test]
fn admitted_holds_the_allow_rules_and_the_default_when_it_allows() {
    let file = r#"
        [[rule]]
        allow = "web:tcp/443"
        [[rule]]
        name = "no ops"
        deny = "ops"
        [[rule]]
        allow = "10.9.0.0/16:udp/53"
    "#;
    for (default, with_default) in [("deny", false), ("allow", true)] {
        let c = ctx(two_stacks());
        let resolved = resolve(&policy(default, "", Some(file)), &c.remote);
        let compiled = compile(&resolved, &c, 0x1234).unwrap();
        let SetElements::CountedMarks(marks) = set(&compiled.table, SET_ADMITTED) else {
            panic!()
        };
        let mut want = vec![
            (0x1234_0001, "acl 1".to_string()),
            (0x1234_0003, "acl 3".to_string()),
        ];
        if with_default {
            want.push((0x1234_ffff, "acl default".to_string()));
        }
        assert_eq!(marks, &want);
        assert_eq!(
            compiled.rules,
            vec![
                (1, "allow web:tcp/443".to_string(), Verdict::Allow),
                (2, "no ops".to_string(), Verdict::Deny),
                (3, "allow 10.9.0.0/16:udp/53".to_string(), Verdict::Allow),
            ]
        );
    }
}

#[test]
fn same_host_stacks_get_the_same_policy() {
    let mut near = route("web", "10.1.0.0/24", 1);
    near.same_host = true;
    let far = route("web", "10.1.0.0/24", 1);
    let (_, _, a) = compile_str("deny", "web:tcp/443", vec![near], 1);
    let (_, _, b) = compile_str("deny", "web:tcp/443", vec![far], 1);
    assert_eq!(a.table, b.table);
    let o = walk(
        &a.table,
        &Packet::new_from_overlay(ip("10.1.0.7"), mac_of(1), TCP, Some(443)),
    );
    assert!(o.accept);
}

#[test]
fn a_stack_that_moves_or_grows_takes_its_rights_along() {
    let before = vec![route("web", "10.1.0.0/24", 1)];
    // Moved to another host (another router's MAC) and gained a prefix.
    let after = vec![
        route("web", "10.1.0.0/24", 3),
        route("web", "10.7.0.0/24", 3),
    ];
    let (_, _, a) = compile_str("deny", "web:tcp/443", before, 1);
    let (_, _, b) = compile_str("deny", "web:tcp/443", after, 1);
    assert_ne!(a.table, b.table);
    let new_prefix = Packet::new_from_overlay(ip("10.7.0.7"), mac_of(3), TCP, Some(443));
    assert!(!walk(&a.table, &new_prefix).accept);
    assert!(walk(&b.table, &new_prefix).accept);
    // From its old router it is forged now.
    let old_router = Packet::new_from_overlay(ip("10.1.0.7"), mac_of(1), TCP, Some(443));
    assert!(walk(&a.table, &old_router).accept);
    assert_eq!(
        walk(&b.table, &old_router).by.as_deref(),
        Some(COMMENT_SPOOF_FROM_OVERLAY)
    );
    // Gone: the rule covers nothing.
    let (resolved, _, gone) = compile_str("deny", "web:tcp/443", vec![], 1);
    assert_eq!(resolved.unresolved, vec![stack("web")]);
    let SetElements::JumpMap(map) = set(&gone.table, MAP_CLASSES) else {
        panic!()
    };
    assert_eq!(map.len(), 1, "one class for everything: {map:?}");
    assert_eq!(gone.table.chains[1].rules.len(), 1, "just the default");
}

#[test]
fn no_rules_one_chain_per_stack_with_the_default() {
    // "allow" and no rules is the stateless table (below); a rule for a stack that is
    // not there covers nothing and leaves the classes as they are.
    for (default, allow, accept) in [("allow", "gone", true), ("deny", "", false)] {
        let (_, _, c) = compile_str(default, allow, two_stacks(), 9);
        let SetElements::JumpMap(map) = set(&c.table, MAP_CLASSES) else {
            panic!()
        };
        // Nobody, web, nobody, ops, nobody.
        assert_eq!(map.len(), 5, "{map:?}");
        assert_eq!(c.table.chains.len(), 1 + 3);
        for chain in &c.table.chains[1..] {
            assert_eq!(chain.rules.len(), 1);
            let r = &chain.rules[0];
            assert!(r.matches.is_empty() && r.counter);
            assert_eq!(r.verdict == RuleVerdict::Accept, accept);
            assert_eq!(r.set_ct_mark, accept.then_some(mark(9, DEFAULT_ID)));
            assert!(r.comment.starts_with("acl default "));
        }
        let comments: Vec<&str> = c.table.chains[1..]
            .iter()
            .map(|c| c.rules[0].comment.as_str())
            .collect();
        assert_eq!(
            comments,
            ["acl default -", "acl default web", "acl default ops"]
        );
    }
}

/// The default policy, "allow, no rules": anti-spoofing and a count of what enters
/// the stack, no conntrack; so a flow of which the router sees one direction only (a
/// SYN-ACK that conntrack would call invalid) passes, where a stateful table drops it.
#[test]
fn the_default_policy_is_stateless() {
    let (_, _, c) = compile_str("allow", "", two_stacks(), 1);
    let t = &c.table;
    assert_eq!(*t, stateless(&ctx(two_stacks())));
    assert!(c.rules.is_empty());
    assert!(!tracks_connections(t));
    assert_eq!(t.name, TABLE);
    assert_eq!(t.chains.len(), 1);
    assert_eq!(
        t.chains[0].hook,
        Some(BaseHook {
            hook: Hook::Forward,
            priority: -10,
            policy_accept: true
        })
    );
    let comments: Vec<&str> = t.chains[0]
        .rules
        .iter()
        .map(|r| r.comment.as_str())
        .collect();
    assert_eq!(
        comments,
        [
            COMMENT_SPOOF_FROM_STACK,
            COMMENT_SPOOF_FROM_OVERLAY,
            COMMENT_ENTERING
        ]
    );
    let names: Vec<&str> = t.sets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, [SET_LOCAL, SET_ORIGINS]);
    // Every other table tracks connections, the closed one included.
    for (default, allow) in [("deny", ""), ("allow", "gone"), ("allow", "web:tcp/80")] {
        let (_, _, c) = compile_str(default, allow, two_stacks(), 1);
        assert!(tracks_connections(&c.table), "{default} {allow}");
    }
    assert!(tracks_connections(&closed(&ctx(two_stacks()))));

    // The remote server's SYN-ACK to the stack's client, whose SYN went straight into
    // the tunnel: the first packet of the connection the router sees.
    let out = Packet {
        iif: LAN.into(),
        oif: OVL.into(),
        saddr: ip("172.16.0.4"),
        daddr: ip("10.1.0.7"),
        orig_saddr: ip("172.16.0.4"),
        orig_daddr: ip("10.1.0.7"),
        ..Packet::new_from_overlay(ip("10.1.0.7"), mac_of(1), TCP, Some(443))
    };
    let mut syn_ack = out.reply(0).untracked();
    syn_ack.src_mac = mac_of(1);
    let o = walk(t, &syn_ack);
    assert_eq!(
        (o.accept, o.by.as_deref(), o.ct_mark),
        (true, Some(COMMENT_ENTERING), 0)
    );
    let (_, _, stateful) = compile_str("deny", "web", two_stacks(), 1);
    let o = walk(&stateful.table, &syn_ack);
    assert_eq!((o.accept, o.by.as_deref()), (false, Some(COMMENT_FALLBACK)));
    // A new connection from the overlay, and one from a same-host stack whose frames
    // come to the router's stack side: in, and counted.
    let from_web = Packet::new_from_overlay(ip("10.1.0.7"), mac_of(1), UDP, Some(53));
    let same_host = Packet {
        iif: LAN.into(),
        ..from_web.clone()
    };
    for p in [&from_web, &same_host] {
        let o = walk(t, &p.untracked());
        assert_eq!((o.accept, o.by.as_deref()), (true, Some(COMMENT_ENTERING)));
    }
    // The stack's own traffic out and transit: the policy, uncounted.
    assert_eq!(walk(t, &out.untracked()), walk(t, &out));
    let o = walk(t, &out.untracked());
    assert_eq!((o.accept, o.by), (true, None));
    // Forgeries are still dropped, both ways.
    let forged = Packet {
        saddr: ip("10.2.0.7"),
        ..out.clone()
    };
    assert_eq!(
        walk(t, &forged.untracked()).by.as_deref(),
        Some(COMMENT_SPOOF_FROM_STACK)
    );
    let mut wrong_router = from_web.untracked();
    wrong_router.src_mac = mac_of(2);
    let o = walk(t, &wrong_router);
    assert_eq!(
        (o.accept, o.by.as_deref()),
        (false, Some(COMMENT_SPOOF_FROM_OVERLAY))
    );
}

#[test]
fn the_base_chain_is_as_the_contract_orders_it() {
    let (_, _, c) = compile_str("deny", "web", two_stacks(), 1);
    let base = &c.table.chains[0];
    assert_eq!(base.name, CHAIN);
    assert_eq!(
        base.hook,
        Some(BaseHook {
            hook: Hook::Forward,
            priority: -10,
            policy_accept: true
        })
    );
    let comments: Vec<&str> = base.rules.iter().map(|r| r.comment.as_str()).collect();
    assert_eq!(
        comments,
        [
            COMMENT_SPOOF_FROM_STACK,
            COMMENT_SPOOF_FROM_OVERLAY,
            COMMENT_TCP_NOT_SYN,
            "acl transit or outgoing",
            "acl inside",
            "acl admitted",
            "acl classes",
            COMMENT_FALLBACK,
        ]
    );
    assert_eq!(c.table.name, TABLE);
    // Ports become one kernel rule each, in one chain with the stack named.
    let (_, _, c) = compile_str("deny", "web:tcp/{22,80-90}", two_stacks(), 1);
    let web = c
        .table
        .chains
        .iter()
        .find(|ch| ch.rules.iter().any(|r| r.comment == "acl 1 web"))
        .unwrap();
    assert_eq!(
        web.rules
            .iter()
            .map(|r| r.matches.clone())
            .collect::<Vec<_>>(),
        vec![
            vec![
                Match::CtOriginalProtocol(TCP),
                Match::CtOriginalDport {
                    first: 22,
                    last: 22
                }
            ],
            vec![
                Match::CtOriginalProtocol(TCP),
                Match::CtOriginalDport {
                    first: 80,
                    last: 90
                }
            ],
            vec![],
        ]
    );
}

#[test]
fn closed_admits_nothing_new_from_the_overlay() {
    let c = ctx(two_stacks());
    let t = closed(&c);
    assert_eq!(t.chains.len(), 1);
    assert_eq!(t.chains[0].rules.last().unwrap().comment, COMMENT_CLOSED);
    let o = walk(
        &t,
        &Packet::new_from_overlay(ip("10.1.0.7"), mac_of(1), TCP, Some(443)),
    );
    assert_eq!((o.accept, o.by.as_deref()), (false, Some(COMMENT_CLOSED)));
    // Even one admitted before (any mark).
    let p =
        Packet::new_from_overlay(ip("10.1.0.7"), mac_of(1), UDP, Some(53)).again(mark(1, 0xffff));
    assert!(!walk(&t, &p).accept);
    // Transit and the stack's own connections go on.
    let out = Packet {
        iif: LAN.into(),
        oif: OVL.into(),
        saddr: ip("172.16.0.4"),
        daddr: ip("10.1.0.7"),
        orig_saddr: ip("172.16.0.4"),
        orig_daddr: ip("10.1.0.7"),
        ..Packet::new_from_overlay(ip("10.1.0.7"), mac_of(1), TCP, Some(443))
    };
    assert!(walk(&t, &out).accept);
    let mut answer = out.reply(0);
    answer.src_mac = mac_of(1);
    assert!(walk(&t, &answer).accept);
    // Forgeries are still dropped as such.
    let o = walk(
        &t,
        &Packet::new_from_overlay(ip("10.1.0.7"), mac_of(2), TCP, Some(443)),
    );
    assert_eq!(o.by.as_deref(), Some(COMMENT_SPOOF_FROM_OVERLAY));
}

#[test]
fn too_many_rules_are_refused_in_one_line() {
    let rules: Vec<String> = (0..=MAX_RULES)
        .map(|i| format!("10.{}.{}.0/24", i / 256 % 256, i % 256))
        .collect();
    let mut p = Policy::default();
    for (i, r) in rules.iter().enumerate() {
        let mut rule = crate::acl::parse_rule(r, Verdict::Allow, None).unwrap();
        rule.name = format!("r{i}");
        p.rules.push(rule);
    }
    let c = ctx(vec![]);
    let err = compile(&resolve(&p, &[]), &c, 1).unwrap_err();
    assert!(err.contains("65535 rules") && !err.contains('\n'), "{err}");
    p.rules.pop();
    let ok = compile(&resolve(&p, &[]), &c, 1).unwrap();
    assert_eq!(ok.rules.last().unwrap().0, 0xfffe);
}

#[test]
fn comments_parse_back() {
    assert_eq!(
        parse_comment(&rule_comment(Some(7), Some("web"))),
        Some((Some(7), Some("web")))
    );
    assert_eq!(parse_comment(&rule_comment(None, None)), Some((None, None)));
    assert_eq!(parse_comment("acl 12"), Some((Some(12), None)));
    assert_eq!(parse_comment("acl default"), Some((None, None)));
    for other in [
        COMMENT_FALLBACK,
        COMMENT_TCP_NOT_SYN,
        "acl 0 web",
        "acl 70000 web",
        "vrouter count to_24",
        "acl 1 web x",
    ] {
        assert_eq!(parse_comment(other), None, "{other}");
    }
}
