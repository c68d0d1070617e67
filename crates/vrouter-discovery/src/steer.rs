//! Port steering, decided: from what the host shows (each local stack's bridge, its
//! ports and FDB, the VXLAN device of its VNI, the routes published for it) to the
//! `netdev` table whose ingress chains steer the stacks' frames at the host-side veth
//! ports, and to each stack's steering status. Pure; the controller observes and
//! applies.
//!
//! The table (one per host, `VROUTER_STEERING_TABLE`):
//!
//! ```text
//! set  src_<S>   S's prefixes                 set dst_<S>  remote prefixes S routes to
//! map  to_<S>    remote prefix -> jump t_<S>_<R>   (conntrack S: -> jump own_<S>)
//! map  macs_<S>  learned service MAC -> its port
//! chain out_<S>:   clamp the MSS of SYNs to MTU-40; a source outside S's prefixes ->
//!                  own_<S>; TCP -> vmap to_<S>; other frames longer than the MTU ->
//!                  own_<S>; the rest -> vmap to_<S>
//! chain own_<S>:   to S's own router (its stack MAC, its port)        "own <S>"
//! chain t_<S>_<R>: S's overlay MAC as source, R's MAC as destination, into
//!                  vxlan<VNI> (R on another host) or R's router port   "steer <S> <R>"
//! chain p_<ifindex> (ingress of a service port): IPv4 to dst_<S> -> out_<S>
//!                                                                     "port <ifname> <S>"
//! chain r_<ifindex> (ingress of S's router port): fwd to ether daddr map @macs_<S>
//!                                                                     "deliver <S>"
//! ```
//!
//! A stack whose router tracks connections (`Registration.conntrack`) sends every
//! steered frame to its own router, which must see both directions; a stateless one
//! sends straight into the tunnel (or to the same-host destination router), and its
//! router sees only what enters its stack. TCP segments fit the overlay once the SYN's
//! MSS is clamped (GSO super-packets of TCP may then go into the tunnel); other frames
//! longer than the overlay MTU, and forged sources, take the router path, which
//! answers "fragmentation needed" or drops them.
//!
//! Set and chain names come from the router's IPv4 address in hex (stack names may be
//! up to 64 characters of any case); rule comments carry the stack names, and the
//! counters are read back by comment (see [`steer_comment`]). A stack the table cannot
//! steer yet (no bridge, no VXLAN device, its router's port not learned, a bridge
//! shared by several stacks) is left out with a reason and keeps the policy-rule path,
//! which stays installed as the fallback.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use vrouter_kernel::nft::{
    AddrField, BaseHook, ChainSpec, Family, Hook, Ipv4Range, Match, RuleSpec, RuleVerdict,
    SetElements, SetSpec, Statement, TableSpec,
};
use vrouter_kernel::BridgeFdbEntry;
use vrouter_state::{
    Mac, RemoteRoute, StackName, StackSpec, StackSteering, SteeringMode, SteeringStatus,
};

/// IPv4 + TCP headers without options: the MSS of a segment that fills the MTU.
const TCP_IP_HEADERS: u32 = 40;
const IPPROTO_TCP: u8 = 6;
/// The longest rule comment the kernel layer accepts.
const MAX_COMMENT: usize = 128;

/// What the steering pass knows of the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The netdev table's name.
    pub table: String,
    pub stacks: Vec<StackFacts>,
    /// The counters of the table now in the kernel, by rule comment: carried into the
    /// new table so a replacement does not reset them.
    pub counters: BTreeMap<String, (u64, u64)>,
}

/// One local stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackFacts {
    pub spec: StackSpec,
    /// Its router's policy tracks connections (from its registration).
    pub conntrack: bool,
    /// The host bridge of the stack's network, once found.
    pub bridge: Option<Bridge>,
    /// `vxlan<VNI>` of the stack's VNI, once it is up.
    pub overlay: Option<Overlay>,
    /// The remote prefixes published for the stack (routes.json).
    pub routes: Vec<RemoteRoute>,
}

/// A bridge, its ports and its forwarding database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    pub name: String,
    pub index: u32,
    pub ports: Vec<Port>,
    pub fdb: Vec<BridgeFdbEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Port {
    pub index: u32,
    pub name: String,
}

/// The VXLAN device of a VNI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlay {
    pub index: u32,
    /// Its MTU: the largest frame the overlay carries without fragmentation.
    pub mtu: u32,
}

/// The decision: the table to install (`None`: no stack can be steered, so the table
/// goes) and every local stack's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub table: Option<TableSpec>,
    pub stacks: BTreeMap<StackName, StackSteering>,
}

impl Plan {
    /// The status for discovery.json.
    pub fn status(&self, mode: SteeringMode, table: &str) -> SteeringStatus {
        SteeringStatus {
            mode,
            table: table.to_string(),
            stacks: self.stacks.clone(),
        }
    }
}

/// Every stack in the `rule` mode, as configured (`VROUTER_STEERING=rule`).
pub fn rule_mode(stacks: &[StackFacts]) -> BTreeMap<StackName, StackSteering> {
    stacks
        .iter()
        .map(|s| {
            (
                s.spec.name.clone(),
                StackSteering {
                    mode: SteeringMode::Rule,
                    reason: None,
                    ports: Vec::new(),
                },
            )
        })
        .collect()
}

/// The MAC a router's stack interface has (02:42 and its IPv4 address, as
/// `vrouter_router::link::stable_stack_mac` sets it): how its port is recognised in
/// the bridge's FDB, and the destination of frames steered to it.
pub fn stack_mac(router_ip: Ipv4Addr) -> Mac {
    let o = router_ip.octets();
    Mac([0x02, 0x42, o[0], o[1], o[2], o[3]])
}

/// The short id names of sets and chains are built from: the router's IPv4 in hex.
fn id(router_ip: Ipv4Addr) -> String {
    format!("{:08x}", u32::from(router_ip))
}

/// The comment of the rule counting `local`'s frames steered to `remote` (whose
/// router is `via`): "steer <local> <remote>", or with the routers' addresses when
/// the names do not fit a comment.
pub fn steer_comment(local: &StackSpec, remote: &StackName, via: Ipv4Addr) -> String {
    let c = format!("steer {} {remote}", local.name);
    if c.len() <= MAX_COMMENT {
        c
    } else {
        format!("steer {} {via}", local.router_ip)
    }
}

/// The comment of a service port's rule: "port <ifname> <stack>".
pub fn port_comment(port: &str, stack: &StackName) -> String {
    format!("port {port} {stack}")
}

pub fn own_comment(stack: &StackName) -> String {
    format!("own {stack}")
}

pub fn deliver_comment(stack: &StackName) -> String {
    format!("deliver {stack}")
}

/// A stack that can be steered: its router's port and its service ports.
struct Ready<'a> {
    facts: &'a StackFacts,
    overlay: Overlay,
    router_port: &'a Port,
    services: Vec<&'a Port>,
    /// Learned service MAC -> its port.
    macs: Vec<(Mac, u32)>,
}

/// Why `s` cannot be steered at its ports now, or what its ports are.
fn readiness<'a>(
    s: &'a StackFacts,
    sharing: &BTreeMap<u32, Vec<&StackName>>,
) -> Result<Ready<'a>, String> {
    let name = &s.spec.name;
    let bridge = s.bridge.as_ref().ok_or_else(|| {
        format!(
            "the host bridge of stack {name}'s network (the one holding {}) was not found",
            s.spec.router_ip
        )
    })?;
    if let Some(names) = sharing.get(&bridge.index).filter(|n| n.len() > 1) {
        let list: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
        return Err(format!(
            "bridge {} carries several stacks ({}): their services' ports cannot be told apart",
            bridge.name,
            list.join(", ")
        ));
    }
    let overlay = s
        .overlay
        .ok_or_else(|| format!("{} is not up", s.spec.vni.vxlan_ifname()))?;
    let mac = stack_mac(s.spec.router_ip);
    let router_index = bridge
        .fdb
        .iter()
        .find(|r| r.mac == mac && r.learned && r.port != bridge.index)
        .map(|r| r.port)
        .ok_or_else(|| {
            format!(
                "the router's port is not known yet: its MAC {mac} is not learned on bridge {}",
                bridge.name
            )
        })?;
    let router_port = bridge
        .ports
        .iter()
        .find(|p| p.index == router_index)
        .ok_or_else(|| {
            format!(
                "the router's MAC {mac} is learned on index {router_index}, which is not a port of bridge {}",
                bridge.name
            )
        })?;
    let services: Vec<&Port> = bridge
        .ports
        .iter()
        .filter(|p| p.index != router_index)
        .collect();
    let mut macs: BTreeMap<Mac, u32> = BTreeMap::new();
    for r in &bridge.fdb {
        if r.learned && services.iter().any(|p| p.index == r.port) {
            macs.entry(r.mac).or_insert(r.port);
        }
    }
    Ok(Ready {
        facts: s,
        overlay,
        router_port,
        services,
        macs: macs.into_iter().collect(),
    })
}

/// The steering table and every stack's status, in `ports` mode.
pub fn plan(facts: &Facts) -> Plan {
    let mut sharing: BTreeMap<u32, Vec<&StackName>> = BTreeMap::new();
    for s in &facts.stacks {
        if let Some(b) = &s.bridge {
            sharing.entry(b.index).or_default().push(&s.spec.name);
        }
    }
    let mut ready = Vec::new();
    let mut stacks = BTreeMap::new();
    for s in &facts.stacks {
        match readiness(s, &sharing) {
            Ok(r) => ready.push(r),
            Err(reason) => {
                stacks.insert(
                    s.spec.name.clone(),
                    StackSteering {
                        mode: SteeringMode::Rule,
                        reason: Some(reason),
                        ports: Vec::new(),
                    },
                );
            }
        }
    }
    // Same-host destinations: a ready stack's router port, by stack name.
    let router_ports: BTreeMap<&StackName, u32> = ready
        .iter()
        .map(|r| (&r.facts.spec.name, r.router_port.index))
        .collect();
    let counter = |comment: &str| facts.counters.get(comment).copied().unwrap_or((0, 0));
    let mut table = TableSpec {
        family: Family::Netdev,
        name: facts.table.clone(),
        sets: Vec::new(),
        chains: Vec::new(),
    };
    for r in &ready {
        let (sets, chains) = stack_table(r, &router_ports, &counter);
        table.sets.extend(sets);
        table.chains.extend(chains);
        let mut ports: Vec<String> = r.services.iter().map(|p| p.name.clone()).collect();
        ports.push(r.router_port.name.clone());
        stacks.insert(
            r.facts.spec.name.clone(),
            StackSteering {
                mode: SteeringMode::Ports,
                reason: None,
                ports,
            },
        );
    }
    Plan {
        table: (!ready.is_empty()).then_some(table),
        stacks,
    }
}

fn rule(matches: Vec<Match>, statements: Vec<Statement>, verdict: RuleVerdict) -> RuleSpec {
    RuleSpec {
        matches,
        counter: false,
        counter_start: (0, 0),
        set_ct_mark: None,
        statements,
        verdict,
        comment: String::new(),
    }
}

fn counted(mut r: RuleSpec, comment: String, start: (u64, u64)) -> RuleSpec {
    r.counter = true;
    r.counter_start = start;
    r.comment = comment;
    r
}

/// Distinct, sorted ranges (routes of one stack never overlap: discovery refuses
/// overlapping prefixes before it publishes them).
fn ranges<I: IntoIterator<Item = vrouter_state::Prefix>>(prefixes: I) -> Vec<Ipv4Range> {
    let set: BTreeSet<Ipv4Range> = prefixes.into_iter().map(Ipv4Range::from).collect();
    set.into_iter().collect()
}

fn stack_table(
    r: &Ready,
    router_ports: &BTreeMap<&StackName, u32>,
    counter: &dyn Fn(&str) -> (u64, u64),
) -> (Vec<SetSpec>, Vec<ChainSpec>) {
    let spec = &r.facts.spec;
    let s = id(spec.router_ip);
    let (src, dst, to, macs) = (
        format!("src_{s}"),
        format!("dst_{s}"),
        format!("to_{s}"),
        format!("macs_{s}"),
    );
    let own = format!("own_{s}");
    let out = format!("out_{s}");
    let mtu = r.overlay.mtu;
    let mss = u16::try_from(mtu.saturating_sub(TCP_IP_HEADERS)).unwrap_or(u16::MAX);

    // Per destination stack: its chain (stateless S) and its prefixes.
    let mut chains = Vec::new();
    let mut jumps: Vec<(Ipv4Range, String)> = Vec::new();
    let mut by_remote: BTreeMap<&StackName, Vec<&RemoteRoute>> = BTreeMap::new();
    for route in &r.facts.routes {
        by_remote.entry(&route.stack).or_default().push(route);
    }
    for (remote, routes) in &by_remote {
        let first = routes[0];
        let target = if r.facts.conntrack {
            None
        } else if first.same_host {
            // A same-host router whose port is not known: through S's own router.
            router_ports
                .get(remote)
                .map(|port| (stack_mac(first.via), *port))
        } else {
            Some((first.mac, r.overlay.index))
        };
        let chain = match target {
            None => own.clone(),
            Some((mac, device)) => {
                let name = format!("t_{s}_{}", id(first.via));
                let comment = steer_comment(spec, remote, first.via);
                let start = counter(&comment);
                chains.push(ChainSpec {
                    name: name.clone(),
                    hook: None,
                    rules: vec![counted(
                        rule(
                            Vec::new(),
                            vec![
                                Statement::SetEtherSaddr(spec.router_mac()),
                                Statement::SetEtherDaddr(mac),
                            ],
                            RuleVerdict::FwdToIndex(device),
                        ),
                        comment,
                        start,
                    )],
                });
                name
            }
        };
        for range in ranges(routes.iter().map(|r| r.prefix)) {
            jumps.push((range, chain.clone()));
        }
    }
    jumps.sort();
    jumps.dedup_by(|a, b| a.0 == b.0);

    let sets = vec![
        SetSpec {
            name: src.clone(),
            elements: SetElements::Ipv4Ranges(ranges(spec.prefixes.iter().copied())),
        },
        SetSpec {
            name: dst.clone(),
            elements: SetElements::Ipv4Ranges(jumps.iter().map(|(r, _)| *r).collect()),
        },
        SetSpec {
            name: to.clone(),
            elements: SetElements::JumpMap(jumps),
        },
        SetSpec {
            name: macs.clone(),
            elements: SetElements::MacToIndex(r.macs.clone()),
        },
    ];

    let vmap = || RuleVerdict::Vmap {
        field: AddrField::IpDaddr,
        map: to.clone(),
    };
    let mut all = vec![
        ChainSpec {
            name: out.clone(),
            hook: None,
            rules: vec![
                rule(
                    vec![Match::TcpSynMssAbove(mss)],
                    vec![Statement::SetTcpMss(mss)],
                    RuleVerdict::Continue,
                ),
                rule(
                    vec![Match::AddrInSet {
                        field: AddrField::IpSaddr,
                        set: src,
                        equal: false,
                    }],
                    Vec::new(),
                    RuleVerdict::Jump(own.clone()),
                ),
                // TCP fits once its MSS is clamped (GSO super-packets included).
                rule(vec![Match::MetaL4Proto(IPPROTO_TCP)], Vec::new(), vmap()),
                rule(
                    vec![Match::MetaLengthGt(mtu)],
                    Vec::new(),
                    RuleVerdict::Jump(own.clone()),
                ),
                rule(Vec::new(), Vec::new(), vmap()),
            ],
        },
        ChainSpec {
            name: own.clone(),
            hook: None,
            rules: vec![{
                let comment = own_comment(&spec.name);
                let start = counter(&comment);
                counted(
                    rule(
                        Vec::new(),
                        vec![Statement::SetEtherDaddr(stack_mac(spec.router_ip))],
                        RuleVerdict::FwdToIndex(r.router_port.index),
                    ),
                    comment,
                    start,
                )
            }],
        },
    ];
    all.extend(chains);
    for port in &r.services {
        let comment = port_comment(&port.name, &spec.name);
        let start = counter(&comment);
        all.push(ChainSpec {
            name: format!("p_{}", port.index),
            hook: Some(ingress(&port.name)),
            rules: vec![counted(
                rule(
                    vec![
                        Match::MetaProtocolIpv4,
                        Match::AddrInSet {
                            field: AddrField::IpDaddr,
                            set: dst.clone(),
                            equal: true,
                        },
                    ],
                    Vec::new(),
                    RuleVerdict::Jump(out.clone()),
                ),
                comment,
                start,
            )],
        });
    }
    let comment = deliver_comment(&spec.name);
    let start = counter(&comment);
    all.push(ChainSpec {
        name: format!("r_{}", r.router_port.index),
        hook: Some(ingress(&r.router_port.name)),
        rules: vec![counted(
            rule(
                Vec::new(),
                Vec::new(),
                RuleVerdict::FwdByEtherDaddrMap(macs),
            ),
            comment,
            start,
        )],
    });
    (sets, all)
}

fn ingress(device: &str) -> BaseHook {
    BaseHook {
        hook: Hook::Ingress {
            device: device.to_string(),
        },
        priority: 0,
        policy_accept: true,
    }
}

/// Whether two tables have the same layout and elements: equal but for the counters'
/// start values (which change with every reading).
pub fn same_layout(a: &TableSpec, b: &TableSpec) -> bool {
    let strip = |t: &TableSpec| {
        let mut t = t.clone();
        for c in &mut t.chains {
            for r in &mut c.rules {
                r.counter_start = (0, 0);
            }
        }
        t
    };
    strip(a) == strip(b)
}

/// The comments of a table's counted rules: what a dump of the kernel's copy must
/// show for the copy to be this table.
pub fn comments(t: &TableSpec) -> BTreeSet<String> {
    t.chains
        .iter()
        .flat_map(|c| c.rules.iter())
        .filter(|r| r.counter)
        .map(|r| r.comment.clone())
        .collect()
}

/// Steered packets and bytes from `local` toward `remote`, from the rule counters by
/// comment: what the traffic rows add to the router's tx.
pub fn steered(
    counters: &BTreeMap<String, (u64, u64)>,
    local: &StackSpec,
    remote: &StackName,
    via: Ipv4Addr,
) -> Option<(u64, u64)> {
    counters.get(&steer_comment(local, remote, via)).copied()
}

/// What to do with the kernel's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// The kernel has it already.
    Keep,
    /// Put the planned table in (replacing the kernel's).
    Replace,
    /// No stack to steer: the table goes.
    Delete,
}

/// Whether the planned table must go in: when it differs from the one last applied
/// (counters aside), or the kernel's copy is missing or lacks a counted rule (a kernel
/// that dropped a chain with its device), or the kernel's copy could not be read
/// (`in_kernel` None). No planned table: delete what is there or was applied.
pub fn apply_action(
    planned: Option<&TableSpec>,
    applied: Option<&TableSpec>,
    in_kernel: Option<&BTreeSet<String>>,
) -> Apply {
    match planned {
        Some(t) => {
            let current =
                applied.is_some_and(|a| same_layout(a, t)) && in_kernel == Some(&comments(t));
            if current {
                Apply::Keep
            } else {
                Apply::Replace
            }
        }
        None if applied.is_some() || in_kernel.is_none_or(|c| !c.is_empty()) => Apply::Delete,
        None => Apply::Keep,
    }
}

/// The most learned MACs a port may have and still be delivered to by MAC (see
/// [`remember`]): a container has one, a few with macvlan or bridges of its own.
pub const MAX_MACS_PER_PORT: usize = 16;

/// The FDB rows to steer by: the bridge's learned rows, plus rows learned before
/// that aged out while their port is still on the bridge. Steered frames bypass the
/// bridge, so it stops seeing the router's and the services' frames and forgets their
/// MACs after its ageing time; without this memory a quiet stack would fall back to
/// the rule path every few minutes and return at its next broadcast. A MAC the
/// bridge now learns elsewhere moves; a port that left the bridge takes its rows. A
/// port with more than [`MAX_MACS_PER_PORT`] learned MACs keeps none.
pub fn remember(
    memory: &BTreeMap<Mac, u32>,
    fdb: &[BridgeFdbEntry],
    ports: &[Port],
) -> (Vec<BridgeFdbEntry>, BTreeMap<Mac, u32>) {
    let on_bridge = |port: u32| ports.iter().any(|p| p.index == port);
    let mut learned: BTreeMap<Mac, u32> = memory
        .iter()
        .filter(|(_, port)| on_bridge(**port))
        .map(|(m, p)| (*m, *p))
        .collect();
    for r in fdb.iter().filter(|r| r.learned && on_bridge(r.port)) {
        learned.insert(r.mac, r.port);
    }
    // A container that sends from made-up source MACs fills the bridge's FDB (no
    // limit by default): its port loses every learned row, so its frames take the
    // bridge like any unsteered frame, and it can neither grow the table and this
    // memory nor make every FDB change a table replacement.
    let mut per_port: BTreeMap<u32, usize> = BTreeMap::new();
    for port in learned.values() {
        *per_port.entry(*port).or_default() += 1;
    }
    learned.retain(|_, port| per_port[port] <= MAX_MACS_PER_PORT);
    let mut rows: Vec<BridgeFdbEntry> = fdb.iter().filter(|r| !r.learned).cloned().collect();
    rows.extend(learned.iter().map(|(mac, port)| BridgeFdbEntry {
        mac: *mac,
        port: *port,
        learned: true,
    }));
    (rows, learned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vrouter_state::{Prefix, Vni};

    const VXLAN: u32 = 50;
    const MTU: u32 = 1450;

    fn name(s: &str) -> StackName {
        StackName::new(s).unwrap()
    }

    fn spec(n: &str, third: u8) -> StackSpec {
        StackSpec {
            name: name(n),
            vni: Vni::new(1000).unwrap(),
            prefixes: vec![Prefix::new(Ipv4Addr::new(10, third, 0, 0), 24).unwrap()],
            router_ip: Ipv4Addr::new(10, third, 0, 254),
        }
    }

    fn route(n: &str, third: u8, same_host: bool) -> RemoteRoute {
        let s = spec(n, third);
        RemoteRoute {
            prefix: s.prefixes[0],
            stack: s.name.clone(),
            via: s.router_ip,
            mac: s.router_mac(),
            host: Ipv4Addr::new(198, 18, 0, if same_host { 1 } else { 2 }),
            same_host,
        }
    }

    fn service_mac(third: u8, n: u8) -> Mac {
        Mac([2, 0x42, 10, third, 0, n])
    }

    /// Stack `n` on 10.<third>.0.0/24 with bridge index `third * 10`, its router on
    /// port `third * 10 + 1` and `services` service ports after it, each with one
    /// learned MAC; every port has a permanent row of its own.
    fn stack(n: &str, third: u8, services: u8, routes: Vec<RemoteRoute>) -> StackFacts {
        let s = spec(n, third);
        let br = u32::from(third) * 10;
        let mut ports = vec![Port {
            index: br + 1,
            name: format!("vethr{third}"),
        }];
        let mut fdb = vec![
            BridgeFdbEntry {
                mac: stack_mac(s.router_ip),
                port: br + 1,
                learned: true,
            },
            BridgeFdbEntry {
                mac: Mac([0xaa, 0, 0, 0, third, 0]),
                port: br,
                learned: false,
            },
        ];
        for i in 1..=services {
            let index = br + 1 + u32::from(i);
            ports.push(Port {
                index,
                name: format!("veth{third}s{i}"),
            });
            fdb.push(BridgeFdbEntry {
                mac: service_mac(third, i),
                port: index,
                learned: true,
            });
            fdb.push(BridgeFdbEntry {
                mac: Mac([0xaa, 0, 0, 0, third, i]),
                port: index,
                learned: false,
            });
        }
        StackFacts {
            spec: s,
            conntrack: false,
            bridge: Some(Bridge {
                name: format!("br-{n}"),
                index: br,
                ports,
                fdb,
            }),
            overlay: Some(Overlay {
                index: VXLAN,
                mtu: MTU,
            }),
            routes,
        }
    }

    fn facts(stacks: Vec<StackFacts>) -> Facts {
        Facts {
            table: "vd2vrouter".into(),
            stacks,
            counters: BTreeMap::new(),
        }
    }

    fn chain<'a>(t: &'a TableSpec, n: &str) -> &'a ChainSpec {
        t.chains
            .iter()
            .find(|c| c.name == n)
            .unwrap_or_else(|| panic!("no chain {n} in {:?}", names(t)))
    }

    fn names(t: &TableSpec) -> Vec<&str> {
        t.chains.iter().map(|c| c.name.as_str()).collect()
    }

    fn set<'a>(t: &'a TableSpec, n: &str) -> &'a SetElements {
        &t.sets.iter().find(|s| s.name == n).unwrap().elements
    }

    fn range(third: u8) -> Ipv4Range {
        Ipv4Range::from(Prefix::new(Ipv4Addr::new(10, third, 0, 0), 24).unwrap())
    }

    #[test]
    fn stateless_stack_to_a_remote_host_goes_into_the_tunnel() {
        let a = stack("a", 1, 2, vec![route("b", 2, false)]);
        let plan = plan(&facts(vec![a]));
        let t = plan.table.expect("a table");
        assert_eq!((t.family, t.name.as_str()), (Family::Netdev, "vd2vrouter"));
        let (s, r) = ("0a0100fe", "0a0200fe");
        let steer = chain(&t, &format!("t_{s}_{r}"));
        assert_eq!(
            steer.rules,
            vec![RuleSpec {
                matches: vec![],
                counter: true,
                counter_start: (0, 0),
                set_ct_mark: None,
                statements: vec![
                    Statement::SetEtherSaddr(spec("a", 1).router_mac()),
                    Statement::SetEtherDaddr(spec("b", 2).router_mac()),
                ],
                verdict: RuleVerdict::FwdToIndex(VXLAN),
                comment: "steer a b".into(),
            }]
        );
        assert_eq!(
            set(&t, &format!("to_{s}")),
            &SetElements::JumpMap(vec![(range(2), format!("t_{s}_{r}"))])
        );
        assert_eq!(
            set(&t, &format!("dst_{s}")),
            &SetElements::Ipv4Ranges(vec![range(2)])
        );
        assert_eq!(
            set(&t, &format!("src_{s}")),
            &SetElements::Ipv4Ranges(vec![range(1)])
        );
        // Service ports: an ingress chain each, into out_<S>.
        for (index, port) in [(12, "veth1s1"), (13, "veth1s2")] {
            let c = chain(&t, &format!("p_{index}"));
            assert_eq!(
                c.hook,
                Some(BaseHook {
                    hook: Hook::Ingress {
                        device: port.into()
                    },
                    priority: 0,
                    policy_accept: true
                })
            );
            assert_eq!(c.rules[0].verdict, RuleVerdict::Jump(format!("out_{s}")));
            assert_eq!(c.rules[0].comment, format!("port {port} a"));
            assert!(c.rules[0].counter);
            assert_eq!(
                c.rules[0].matches,
                vec![
                    Match::MetaProtocolIpv4,
                    Match::AddrInSet {
                        field: AddrField::IpDaddr,
                        set: format!("dst_{s}"),
                        equal: true
                    }
                ]
            );
        }
        // The router's port: delivery to the learned service MACs only.
        let r11 = chain(&t, "r_11");
        assert_eq!(
            r11.hook.as_ref().map(|h| &h.hook),
            Some(&Hook::Ingress {
                device: "vethr1".into()
            })
        );
        assert_eq!(
            r11.rules[0].verdict,
            RuleVerdict::FwdByEtherDaddrMap(format!("macs_{s}"))
        );
        assert_eq!(r11.rules[0].comment, "deliver a");
        assert_eq!(
            set(&t, &format!("macs_{s}")),
            &SetElements::MacToIndex(vec![(service_mac(1, 1), 12), (service_mac(1, 2), 13)])
        );
        // own_<S>: the stack MAC, the router's port.
        let own = &chain(&t, &format!("own_{s}")).rules[0];
        assert_eq!(
            (
                own.statements.as_slice(),
                &own.verdict,
                own.comment.as_str()
            ),
            (
                &[Statement::SetEtherDaddr(stack_mac(Ipv4Addr::new(
                    10, 1, 0, 254
                )))][..],
                &RuleVerdict::FwdToIndex(11),
                "own a"
            )
        );
        let status = &plan.stacks[&name("a")];
        assert_eq!(status.mode, SteeringMode::Ports);
        assert_eq!(status.reason, None);
        assert_eq!(status.ports, ["veth1s1", "veth1s2", "vethr1"]);
    }

    #[test]
    fn out_chain_clamps_mss_and_sends_forgeries_and_big_frames_to_the_router() {
        let t = plan(&facts(vec![stack("a", 1, 1, vec![route("b", 2, false)])]))
            .table
            .unwrap();
        let (own, to) = ("own_0a0100fe".to_string(), "to_0a0100fe".to_string());
        let vmap = RuleVerdict::Vmap {
            field: AddrField::IpDaddr,
            map: to,
        };
        let rules: Vec<(Vec<Match>, Vec<Statement>, RuleVerdict)> = chain(&t, "out_0a0100fe")
            .rules
            .iter()
            .map(|r| (r.matches.clone(), r.statements.clone(), r.verdict.clone()))
            .collect();
        assert_eq!(
            rules,
            vec![
                (
                    vec![Match::TcpSynMssAbove(1410)],
                    vec![Statement::SetTcpMss(1410)],
                    RuleVerdict::Continue
                ),
                (
                    vec![Match::AddrInSet {
                        field: AddrField::IpSaddr,
                        set: "src_0a0100fe".into(),
                        equal: false
                    }],
                    vec![],
                    RuleVerdict::Jump(own.clone())
                ),
                (vec![Match::MetaL4Proto(6)], vec![], vmap.clone()),
                (
                    vec![Match::MetaLengthGt(MTU)],
                    vec![],
                    RuleVerdict::Jump(own)
                ),
                (vec![], vec![], vmap),
            ]
        );
    }

    #[test]
    fn conntrack_stack_sends_everything_to_its_own_router() {
        let mut a = stack("a", 1, 1, vec![route("b", 2, false), route("c", 3, true)]);
        a.conntrack = true;
        let c = stack("c", 3, 1, vec![route("a", 1, true)]);
        let t = plan(&facts(vec![a, c])).table.unwrap();
        assert!(
            !names(&t).iter().any(|n| n.starts_with("t_0a0100fe")),
            "{:?}",
            names(&t)
        );
        assert_eq!(
            set(&t, "to_0a0100fe"),
            &SetElements::JumpMap(vec![
                (range(2), "own_0a0100fe".into()),
                (range(3), "own_0a0100fe".into())
            ])
        );
        // The stateless one beside it still goes straight to a's router port.
        let steer = &chain(&t, "t_0a0300fe_0a0100fe").rules[0];
        assert_eq!(steer.verdict, RuleVerdict::FwdToIndex(11));
    }

    #[test]
    fn same_host_destination_gets_its_stack_mac_and_router_port() {
        let a = stack("a", 1, 1, vec![route("c", 3, true)]);
        let c = stack("c", 3, 1, vec![route("a", 1, true)]);
        let plan = plan(&facts(vec![a, c]));
        let t = plan.table.unwrap();
        let steer = &chain(&t, "t_0a0100fe_0a0300fe").rules[0];
        assert_eq!(
            steer.statements,
            vec![
                Statement::SetEtherSaddr(spec("a", 1).router_mac()),
                Statement::SetEtherDaddr(stack_mac(Ipv4Addr::new(10, 3, 0, 254))),
            ]
        );
        assert_eq!(steer.verdict, RuleVerdict::FwdToIndex(31));
        assert_eq!(steer.comment, "steer a c");
        assert_eq!(plan.stacks[&name("c")].mode, SteeringMode::Ports);
    }

    #[test]
    fn same_host_destination_without_a_known_port_goes_through_the_own_router() {
        let a = stack("a", 1, 1, vec![route("c", 3, true)]);
        let mut c = stack("c", 3, 1, vec![route("a", 1, true)]);
        c.bridge.as_mut().unwrap().fdb.retain(|r| r.port != 31);
        let plan = plan(&facts(vec![a, c]));
        let t = plan.table.unwrap();
        assert_eq!(
            set(&t, "to_0a0100fe"),
            &SetElements::JumpMap(vec![(range(3), "own_0a0100fe".into())])
        );
        assert!(!names(&t).iter().any(|n| n.contains("0a0300fe")));
        let c = &plan.stacks[&name("c")];
        assert_eq!(c.mode, SteeringMode::Rule);
        assert!(
            c.reason.as_ref().unwrap().contains("02:42:0a:03:00:fe"),
            "{c:?}"
        );
    }

    #[test]
    fn missing_router_port_leaves_the_stack_on_the_rule_path_with_a_reason() {
        let mut a = stack("a", 1, 2, vec![route("b", 2, false)]);
        // The router's MAC is only a permanent row: not learned.
        for r in &mut a.bridge.as_mut().unwrap().fdb {
            if r.port == 11 {
                r.learned = false;
            }
        }
        let plan = plan(&facts(vec![a]));
        assert_eq!(plan.table, None, "no stack to steer: no table");
        let s = &plan.stacks[&name("a")];
        assert_eq!(s.mode, SteeringMode::Rule);
        assert!(
            s.reason
                .as_ref()
                .unwrap()
                .contains("not learned on bridge br-a"),
            "{s:?}"
        );
        assert!(s.ports.is_empty());
    }

    #[test]
    fn no_bridge_or_no_device_is_a_reason() {
        let mut a = stack("a", 1, 1, vec![]);
        a.bridge = None;
        let mut b = stack("b", 2, 1, vec![]);
        b.overlay = None;
        let plan = plan(&facts(vec![a, b]));
        let reason = |n: &str| plan.stacks[&name(n)].reason.clone().unwrap();
        assert!(reason("a").contains("bridge"), "{}", reason("a"));
        assert!(
            reason("b").contains("vxlan1000 is not up"),
            "{}",
            reason("b")
        );
    }

    #[test]
    fn several_stacks_on_one_bridge_stay_on_the_rule_path() {
        let a = stack("a", 1, 1, vec![]);
        let mut b = stack("b", 2, 1, vec![]);
        b.bridge.as_mut().unwrap().index = 10;
        let other = stack("c", 3, 1, vec![]);
        let plan = plan(&facts(vec![a, b, other]));
        for n in ["a", "b"] {
            let s = &plan.stacks[&name(n)];
            assert_eq!(s.mode, SteeringMode::Rule);
            assert!(
                s.reason.as_ref().unwrap().contains("several stacks (a, b)"),
                "{s:?}"
            );
        }
        assert_eq!(plan.stacks[&name("c")].mode, SteeringMode::Ports);
    }

    #[test]
    fn several_stacks_on_one_vni_each_get_their_own_names() {
        let a = stack("a", 1, 1, vec![route("b", 2, false), route("x", 9, false)]);
        let c = stack("c", 3, 1, vec![route("b", 2, false)]);
        let t = plan(&facts(vec![a, c])).table.unwrap();
        for n in [
            "out_0a0100fe",
            "own_0a0100fe",
            "t_0a0100fe_0a0200fe",
            "t_0a0100fe_0a0900fe",
            "out_0a0300fe",
            "t_0a0300fe_0a0200fe",
            "p_12",
            "p_32",
            "r_11",
            "r_31",
        ] {
            chain(&t, n);
        }
        let mut all: Vec<&str> = names(&t);
        all.sort();
        let len = all.len();
        all.dedup();
        assert_eq!(all.len(), len, "chain names are distinct");
        assert_eq!(
            chain(&t, "t_0a0300fe_0a0200fe").rules[0].comment,
            "steer c b"
        );
    }

    #[test]
    fn several_prefixes_of_one_remote_share_its_chain() {
        let mut r2 = route("b", 2, false);
        r2.prefix = Prefix::new(Ipv4Addr::new(10, 20, 0, 0), 16).unwrap();
        let a = stack("a", 1, 1, vec![route("b", 2, false), r2]);
        let t = plan(&facts(vec![a])).table.unwrap();
        let t_chains = names(&t).iter().filter(|n| n.starts_with("t_")).count();
        assert_eq!(t_chains, 1);
        let SetElements::JumpMap(jumps) = set(&t, "to_0a0100fe") else {
            panic!()
        };
        assert_eq!(jumps.len(), 2);
    }

    #[test]
    fn long_names_fall_back_to_addresses_in_comments() {
        let long = "s".repeat(64);
        let mut a = stack("a", 1, 1, vec![]);
        a.spec.name = name(&long);
        let r = route("b", 2, false);
        let mut r_long = r.clone();
        r_long.stack = name(&"t".repeat(64));
        a.routes = vec![r_long.clone()];
        let t = plan(&facts(vec![a.clone()])).table.unwrap();
        let steer = &chain(&t, "t_0a0100fe_0a0200fe").rules[0];
        assert_eq!(steer.comment, "steer 10.1.0.254 10.2.0.254");
        assert_eq!(
            steer_comment(&a.spec, &r_long.stack, r.via),
            "steer 10.1.0.254 10.2.0.254"
        );
        for c in &t.chains {
            for r in &c.rules {
                assert!(r.comment.len() <= MAX_COMMENT, "{}", r.comment);
            }
            assert!(c.name.len() <= 32, "{}", c.name);
        }
    }

    #[test]
    fn counters_are_carried_by_comment() {
        let mut f = facts(vec![stack("a", 1, 1, vec![route("b", 2, false)])]);
        let fresh = plan(&f).table.unwrap();
        f.counters.insert("steer a b".into(), (5, 500));
        f.counters.insert("port veth1s1 a".into(), (7, 700));
        f.counters.insert("deliver a".into(), (9, 900));
        let carried = plan(&f).table.unwrap();
        assert_eq!(
            chain(&carried, "t_0a0100fe_0a0200fe").rules[0].counter_start,
            (5, 500)
        );
        assert_eq!(chain(&carried, "p_12").rules[0].counter_start, (7, 700));
        assert_eq!(chain(&carried, "r_11").rules[0].counter_start, (9, 900));
        assert_ne!(fresh, carried);
        assert!(same_layout(&fresh, &carried), "only the counters differ");
        let mut moved = stack("a", 1, 2, vec![route("b", 2, false)]);
        moved.conntrack = true;
        f.stacks = vec![moved];
        assert!(!same_layout(&fresh, &plan(&f).table.unwrap()));
        assert_eq!(
            steered(
                &f.counters,
                &spec("a", 1),
                &name("b"),
                Ipv4Addr::new(10, 2, 0, 254)
            ),
            Some((5, 500))
        );
        assert_eq!(
            comments(&fresh),
            ["deliver a", "own a", "port veth1s1 a", "steer a b"]
                .into_iter()
                .map(String::from)
                .collect()
        );
    }

    #[test]
    fn a_port_with_made_up_macs_keeps_none() {
        let ports = vec![
            Port {
                index: 11,
                name: "r".into(),
            },
            Port {
                index: 12,
                name: "s".into(),
            },
        ];
        let router = stack_mac(Ipv4Addr::new(10, 1, 0, 254));
        let mut fdb = vec![BridgeFdbEntry {
            mac: router,
            port: 11,
            learned: true,
        }];
        let flood = |n: usize| -> Vec<BridgeFdbEntry> {
            (0..n)
                .map(|i| BridgeFdbEntry {
                    mac: Mac([0x02, 0xee, 0, 0, (i >> 8) as u8, i as u8]),
                    port: 12,
                    learned: true,
                })
                .collect()
        };
        fdb.extend(flood(MAX_MACS_PER_PORT));
        let (rows, memory) = remember(&BTreeMap::new(), &fdb, &ports);
        assert_eq!(memory.len(), MAX_MACS_PER_PORT + 1, "at the cap: all kept");
        assert_eq!(rows.len(), MAX_MACS_PER_PORT + 1);
        // One more (now or remembered from before): port 12 keeps none, the router's
        // port is untouched, and the memory does not grow with the flood.
        fdb.extend(flood(1000).into_iter().skip(MAX_MACS_PER_PORT));
        let (rows, memory) = remember(&memory, &fdb, &ports);
        assert_eq!(memory.len(), 1);
        assert_eq!(
            rows,
            vec![BridgeFdbEntry {
                mac: router,
                port: 11,
                learned: true,
            }]
        );
    }

    #[test]
    fn aged_out_macs_are_remembered_while_their_port_stays() {
        let ports = vec![
            Port {
                index: 11,
                name: "r".into(),
            },
            Port {
                index: 12,
                name: "s".into(),
            },
        ];
        let router = stack_mac(Ipv4Addr::new(10, 1, 0, 254));
        let own = BridgeFdbEntry {
            mac: Mac([0xaa, 0, 0, 0, 0, 1]),
            port: 12,
            learned: false,
        };
        let fdb = vec![
            BridgeFdbEntry {
                mac: router,
                port: 11,
                learned: true,
            },
            BridgeFdbEntry {
                mac: service_mac(1, 1),
                port: 12,
                learned: true,
            },
            own.clone(),
        ];
        let (rows, memory) = remember(&BTreeMap::new(), &fdb, &ports);
        assert_eq!(memory.len(), 2);
        assert_eq!(rows.len(), 3);
        // Both learned rows aged out: still there.
        let (rows, memory) = remember(&memory, std::slice::from_ref(&own), &ports);
        assert!(rows
            .iter()
            .any(|r| r.mac == router && r.port == 11 && r.learned));
        assert!(rows.contains(&own), "permanent rows pass through");
        // The service MAC moves to a new port; the router's port leaves the bridge.
        let ports = vec![
            Port {
                index: 12,
                name: "s".into(),
            },
            Port {
                index: 13,
                name: "s2".into(),
            },
        ];
        let moved = BridgeFdbEntry {
            mac: service_mac(1, 1),
            port: 13,
            learned: true,
        };
        let (rows, memory) = remember(&memory, std::slice::from_ref(&moved), &ports);
        assert_eq!(rows, vec![moved]);
        assert_eq!(
            memory.into_iter().collect::<Vec<_>>(),
            vec![(service_mac(1, 1), 13)]
        );
    }

    #[test]
    fn the_table_goes_in_only_when_something_differs() {
        let mut f = facts(vec![stack("a", 1, 1, vec![route("b", 2, false)])]);
        let t = plan(&f).table.unwrap();
        let all = comments(&t);
        assert_eq!(
            apply_action(Some(&t), None, Some(&BTreeSet::new())),
            Apply::Replace
        );
        assert_eq!(apply_action(Some(&t), Some(&t), Some(&all)), Apply::Keep);
        // Counters read since: still the same table.
        f.counters.insert("steer a b".into(), (1, 1));
        let again = plan(&f).table.unwrap();
        assert_eq!(
            apply_action(Some(&again), Some(&t), Some(&all)),
            Apply::Keep
        );
        // The kernel lost a chain (its device went), or cannot be read.
        let mut partial = all.clone();
        partial.remove("port veth1s1 a");
        assert_eq!(
            apply_action(Some(&t), Some(&t), Some(&partial)),
            Apply::Replace
        );
        assert_eq!(apply_action(Some(&t), Some(&t), None), Apply::Replace);
        // A new service port.
        let more = plan(&facts(vec![stack("a", 1, 2, vec![route("b", 2, false)])]))
            .table
            .unwrap();
        assert_eq!(
            apply_action(Some(&more), Some(&t), Some(&all)),
            Apply::Replace
        );
        // Nothing to steer: delete what is there, keep quiet when nothing is.
        assert_eq!(apply_action(None, Some(&t), Some(&all)), Apply::Delete);
        assert_eq!(apply_action(None, None, Some(&all)), Apply::Delete);
        assert_eq!(apply_action(None, None, None), Apply::Delete);
        assert_eq!(
            apply_action(None, None, Some(&BTreeSet::new())),
            Apply::Keep
        );
    }

    #[test]
    fn rule_mode_has_no_reason() {
        let stacks = vec![stack("a", 1, 1, vec![])];
        let m = rule_mode(&stacks);
        assert_eq!(
            m[&name("a")],
            StackSteering {
                mode: SteeringMode::Rule,
                reason: None,
                ports: vec![]
            }
        );
    }
}
