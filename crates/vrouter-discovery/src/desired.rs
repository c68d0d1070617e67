//! The host's desired state as a plain value, computed from what discovery knows:
//! the local routers, the peers and the host's own networks. Pure; no kernel here.

use crate::{placement, safety};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use vrouter_kernel::{Route, Rule};
use vrouter_state::{
    Mac, PeerHost, Prefix, Refusal, RemoteRoute, StackName, StackRoutes, StackSpec, Vni,
    RTPROT_VROUTER,
};

/// What the host looks like, as far as the decision needs it.
#[derive(Debug, Clone, Default)]
pub struct HostView {
    /// The address peers reach this host at (put in same-host routes for reference).
    pub advertise_addr: Option<Ipv4Addr>,
    /// Subnets of the host's own interfaces that are not stack bridges (underlay,
    /// docker0, ...): remote prefixes must not cover them.
    pub host_networks: Vec<Prefix>,
    /// Gossip: this host's node id and when each local stack was first claimed.
    /// Unset (static mode), every claim ranks as 0 and ties go by stack name.
    pub node_id: Option<String>,
    pub local_claims: BTreeMap<StackName, u64>,
    /// Gossip: each local stack's placement generation (absent: 0, as in static mode).
    pub local_generations: BTreeMap<StackName, u64>,
    /// Local stacks that another host's copy outranks among every peer gossip knows
    /// (see [`crate::placement::superseded`]), with the winner: withdrawn here even
    /// when that peer is not routed from this host.
    pub superseded: BTreeMap<StackName, crate::placement::Copy>,
    /// Most prefixes one host may announce, this one included; the rest are refused
    /// (0: no cap).
    pub max_prefixes_per_host: usize,
    /// The underlay's network: no stack's prefix may cover it.
    pub underlay_network: Option<Prefix>,
    /// Subnets on local stacks' bridges, by bridge ifindex: a local stack's prefixes
    /// must not cover another stack's bridge (see [`crate::safety`]).
    pub bridge_networks: Vec<(u32, Prefix)>,
    /// The FDB destination of each peer host's stacks, by the host's announced
    /// address (see `paths::fdb_destinations`): its tunnel address when encrypted
    /// (VXLAN then travels through WireGuard), else the address in use, or a relay's.
    /// A host missing here gets its announced address.
    pub destinations: BTreeMap<Ipv4Addr, Ipv4Addr>,
}

/// A router attached on this host, with the bridge its stack's containers use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRouter {
    pub spec: StackSpec,
    /// (bridge name, bridge ifindex), once the bridge holding router_ip is found.
    pub bridge: Option<(String, u32)>,
}

/// One forwarding-database row on `vxlan<vni>`: all-zeros (flood) or a router's MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbRow {
    pub vni: Vni,
    pub mac: Mac,
    pub dst: Ipv4Addr,
}

impl FdbRow {
    pub fn is_flood(&self) -> bool {
        self.mac == Mac::ZERO
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// VNIs that need a `vxlan<VNI>` device on this host.
    pub vnis: BTreeSet<Vni>,
    pub fdb: BTreeSet<FdbRow>,
    /// For each local stack, every route it should get once its FDB row exists.
    pub candidates: BTreeMap<StackName, Vec<RemoteRoute>>,
    pub refusals: Vec<Refusal>,
    /// The FDB destination of each peer host (see [`HostView::destinations`]).
    pub destinations: BTreeMap<Ipv4Addr, Ipv4Addr>,
}

impl Desired {
    /// Where VXLAN packets for a stack on `host` (underlay address) go.
    pub fn fdb_dst(&self, host: Ipv4Addr) -> Ipv4Addr {
        fdb_dst(&self.destinations, host)
    }
}

/// Where VXLAN packets for a stack on `host` go: its entry in `destinations`, else
/// the host's address.
pub fn fdb_dst(destinations: &BTreeMap<Ipv4Addr, Ipv4Addr>, host: Ipv4Addr) -> Ipv4Addr {
    destinations.get(&host).copied().unwrap_or(host)
}

/// An accepted stack, wherever it lives.
struct Placed<'a> {
    spec: &'a StackSpec,
    /// None for a local stack.
    host: Option<Ipv4Addr>,
    prefixes: Vec<Prefix>,
}

/// Which local stacks this host announces and routes: oldest claim first (then name),
/// while the host's prefixes stay within `max_prefixes_per_host` and the stacks' bytes
/// (`cost` of each) within `budget` (the gossip record's limit). The rest are refused,
/// so reaching a limit refuses the newest stacks and never freezes the others. Returns
/// the refused names and why.
pub fn admit_local(
    host: &HostView,
    local: &[LocalRouter],
    cost: impl Fn(&StackSpec) -> usize,
    budget: usize,
) -> (BTreeSet<StackName>, Vec<Refusal>) {
    let mut order: Vec<&LocalRouter> = local.iter().collect();
    let claim = |l: &LocalRouter| host.local_claims.get(&l.spec.name).copied().unwrap_or(0);
    order.sort_by(|a, b| (claim(a), &a.spec.name).cmp(&(claim(b), &b.spec.name)));
    let cap = if host.max_prefixes_per_host == 0 {
        usize::MAX
    } else {
        host.max_prefixes_per_host
    };
    let mut used = 0usize;
    let mut bytes = 0usize;
    let mut refused = BTreeSet::new();
    let mut refusals = Vec::new();
    for l in order {
        let n = l.spec.prefixes.len();
        let (code, reason) = if used + n > cap {
            (
                "prefix_cap",
                format!(
                    "stack {} would bring this host's prefixes to {}, over VROUTER_MAX_PREFIXES_PER_HOST={}; it is refused, the older stacks stay (raise the cap on every host, or remove a stack)",
                    l.spec.name,
                    used + n,
                    host.max_prefixes_per_host
                ),
            )
        } else {
            let b = cost(&l.spec);
            if bytes.saturating_add(b) <= budget {
                used += n;
                bytes += b;
                continue;
            }
            (
                "record_limit",
                format!(
                    "stack {} does not fit this host's gossip record (limit {} bytes); it is refused, the older stacks stay announced (shorter names, fewer prefixes or fewer stacks)",
                    l.spec.name,
                    vrouter_gossip::MAX_RECORD_BYTES
                ),
            )
        };
        refused.insert(l.spec.name.clone());
        refusals.push(Refusal {
            stack: l.spec.name.clone(),
            prefix: None,
            reason,
            code: code.into(),
        });
    }
    (refused, refusals)
}

/// Computes the desired state. Conflicts are settled deterministically. Copies of one
/// stack (one name announced by several hosts, this one included) go by the placement
/// rule ([`crate::placement`]): the higher generation, then the earlier claim, then the
/// lower node id; a losing local copy is `superseded` (no routes, not announced), a
/// losing remote one a `duplicate_stack`. For two stacks with overlapping prefixes,
/// the earlier claim keeps the prefix (gossip stamps each stack with the time its host
/// first announced it), then the lower node id, then the stack name; static peers and
/// local stacks in static mode rank as claim 0 and generation 0. Every host that sees
/// the same stacks decides the same way, and a newcomer cannot take a prefix someone
/// already holds by choosing its node id.
pub fn compute(host: &HostView, local: &[LocalRouter], peers: &[PeerHost]) -> Desired {
    let mut refusals = Vec::new();
    let own_node = host.node_id.clone().unwrap_or_default();

    // Everything that announces prefixes, in deterministic order.
    type Rank = (u64, String);
    let mut all: Vec<(&StackSpec, Option<Ipv4Addr>, Rank, placement::Copy)> = local
        .iter()
        .map(|l| {
            let claim = host.local_claims.get(&l.spec.name).copied().unwrap_or(0);
            let copy = placement::Copy {
                host: None,
                node: own_node.clone(),
                claimed_ms: claim,
                generation: host
                    .local_generations
                    .get(&l.spec.name)
                    .copied()
                    .unwrap_or(0),
            };
            (&l.spec, None, (claim, own_node.clone()), copy)
        })
        .collect();
    for p in peers {
        let mut budget = if host.max_prefixes_per_host == 0 {
            usize::MAX
        } else {
            host.max_prefixes_per_host
        };
        let announced: usize = p.stacks.iter().map(|s| s.prefixes.len()).sum();
        for s in &p.stacks {
            if s.prefixes.len() > budget {
                refusals.push(Refusal {
                    stack: s.name.clone(),
                    prefix: None,
                    reason: format!(
                        "host {} announces {announced} prefixes, more than this host's cap of {} (VROUTER_MAX_PREFIXES_PER_HOST); stack {} is refused (raise the cap on this host to at least {announced}, or announce fewer)",
                        p.addr, host.max_prefixes_per_host, s.name
                    ),
                    code: "prefix_cap".into(),
                });
                continue;
            }
            budget -= s.prefixes.len();
            if Some(p.addr) == host.advertise_addr {
                refusals.push(Refusal {
                    stack: s.name.clone(),
                    prefix: None,
                    reason: format!(
                        "stack {} is configured on host {}, which is this host's own address; remove it from the peer configuration",
                        s.name, p.addr
                    ),
                    code: "own_address".into(),
                });
                continue;
            }
            let claim = p.claims.get(&s.name).copied().unwrap_or(0);
            let node = p.node.clone().unwrap_or_default();
            all.push((
                s,
                Some(p.addr),
                (claim, node),
                placement::peer_copy(p, &s.name),
            ));
        }
    }
    // Stacks refused whole: a local one gets no routes either.
    let mut refused_stacks: BTreeSet<&StackName> = BTreeSet::new();
    // Copies of one stack on several hosts: the placement rule keeps one.
    let mut best: BTreeMap<&StackName, placement::Copy> = BTreeMap::new();
    for (spec, _, _, copy) in &all {
        if copy.host.is_none() && host.superseded.contains_key(&spec.name) {
            continue;
        }
        let e = best.entry(&spec.name).or_insert_with(|| copy.clone());
        if copy.rank() < e.rank() {
            *e = copy.clone();
        }
    }
    let here = host
        .advertise_addr
        .map(|a| a.to_string())
        .unwrap_or_else(|| "this host".into());
    let mut kept_all = Vec::new();
    for entry in all {
        let (spec, at, _, copy) = &entry;
        let winner = best
            .get(&spec.name)
            .or_else(|| host.superseded.get(&spec.name));
        let Some(w) = winner.filter(|w| *w != copy) else {
            kept_all.push(entry);
            continue;
        };
        let w_host = w
            .host
            .map(|h| h.to_string())
            .unwrap_or_else(|| here.clone());
        if at.is_none() {
            refused_stacks.insert(&spec.name);
            refusals.push(Refusal {
                stack: spec.name.clone(),
                prefix: None,
                reason: format!(
                    "stack {} also runs on host {w_host} with a newer placement (generation {} against this copy's {}); this copy is withdrawn and gets no routes: stop it (docker compose down) on this host",
                    spec.name, w.generation, copy.generation
                ),
                code: "superseded".into(),
            });
        } else {
            refusals.push(Refusal {
                stack: spec.name.clone(),
                prefix: None,
                reason: format!(
                    "stack {} is announced by more than one host; the copy on host {w_host} is used (placement generation {}), not the one on host {} (generation {})",
                    spec.name,
                    w.generation,
                    at.map(|h| h.to_string()).unwrap_or_default(),
                    copy.generation
                ),
                code: "duplicate_stack".into(),
            });
        }
    }
    let mut all = kept_all;
    all.sort_by(|a, b| {
        a.2.cmp(&b.2)
            .then(a.0.name.cmp(&b.0.name))
            .then(a.1.cmp(&b.1))
    });

    let mut placed: Vec<Placed> = Vec::new();
    let mut seen_names: BTreeSet<&StackName> = BTreeSet::new();
    for (spec, at, _, _) in all {
        if !seen_names.insert(&spec.name) {
            // One host announcing a name twice: the first copy is used.
            refusals.push(Refusal {
                stack: spec.name.clone(),
                prefix: None,
                reason: format!(
                    "stack {} is announced twice by host {}; only one copy is used",
                    spec.name,
                    at.map(|h| h.to_string()).unwrap_or_else(|| here.clone())
                ),
                code: "duplicate_stack".into(),
            });
            continue;
        }
        if let Some(r) = safety::check_stack(spec) {
            refused_stacks.insert(&spec.name);
            refusals.push(r);
            continue;
        }
        if let Some(owner) = placed
            .iter()
            .find(|p| p.spec.vni == spec.vni && p.spec.router_ip == spec.router_ip)
        {
            refused_stacks.insert(&spec.name);
            refusals.push(safety::router_clash(spec, owner.spec));
            continue;
        }
        // A local stack's own bridge is its network; other stacks' bridges are not.
        let own_bridge = local
            .iter()
            .find(|l| at.is_none() && l.spec.name == spec.name)
            .and_then(|l| l.bridge.as_ref().map(|b| b.1));
        let mut others = host.host_networks.clone();
        if at.is_none() {
            others.extend(
                host.bridge_networks
                    .iter()
                    .filter(|(i, _)| Some(*i) != own_bridge)
                    .map(|(_, n)| *n),
            );
        }
        let networks = safety::HostNetworks {
            underlay: host.underlay_network,
            others: &others,
        };
        let mut kept = Vec::new();
        for prefix in &spec.prefixes {
            let refuse = |code: &str, reason: String| Refusal {
                stack: spec.name.clone(),
                prefix: Some(*prefix),
                reason,
                code: code.into(),
            };
            if let Some(r) = safety::check_prefix(spec, *prefix, networks) {
                refusals.push(r);
                continue;
            }
            if let Some(owner) = placed
                .iter()
                .find(|p| p.prefixes.iter().any(|q| q.overlaps(prefix)))
            {
                refusals.push(refuse("overlap", format!(
                    "prefix {prefix} of stack {} overlaps a prefix of stack {}, which keeps it; give each stack its own subnet",
                    spec.name, owner.spec.name
                )));
                continue;
            }
            kept.push(*prefix);
        }
        placed.push(Placed {
            spec,
            host: at,
            prefixes: kept,
        });
    }

    let mut d = Desired {
        refusals,
        destinations: host.destinations.clone(),
        ..Desired::default()
    };
    for l in local {
        d.vnis.insert(l.spec.vni);
    }
    for p in placed
        .iter()
        .filter(|p| p.host.is_some() && !p.prefixes.is_empty())
    {
        let dst = d.fdb_dst(p.host.expect("remote"));
        if d.vnis.contains(&p.spec.vni) {
            d.fdb.insert(FdbRow {
                vni: p.spec.vni,
                mac: Mac::ZERO,
                dst,
            });
            d.fdb.insert(FdbRow {
                vni: p.spec.vni,
                mac: p.spec.router_mac(),
                dst,
            });
        }
    }
    for l in local {
        let mut routes = Vec::new();
        if refused_stacks.contains(&l.spec.name) {
            d.candidates.insert(l.spec.name.clone(), routes);
            continue;
        }
        for p in placed
            .iter()
            .filter(|p| p.spec.vni == l.spec.vni && p.spec.name != l.spec.name)
        {
            for prefix in &p.prefixes {
                routes.push(RemoteRoute {
                    prefix: *prefix,
                    stack: p.spec.name.clone(),
                    via: p.spec.router_ip,
                    mac: p.spec.router_mac(),
                    host: p
                        .host
                        .or(host.advertise_addr)
                        .unwrap_or(Ipv4Addr::UNSPECIFIED),
                    same_host: p.host.is_none(),
                });
            }
        }
        routes.sort();
        d.candidates.insert(l.spec.name.clone(), routes);
    }
    d
}

/// The routes to publish: a remote route only once its router's FDB row is present
/// in the kernel (pointing at the host's entry in `destinations`), so a
/// router never gets a route the host cannot yet carry.
pub fn publish(
    local: &[LocalRouter],
    candidates: &BTreeMap<StackName, Vec<RemoteRoute>>,
    present: &BTreeSet<FdbRow>,
    destinations: &BTreeMap<Ipv4Addr, Ipv4Addr>,
) -> BTreeMap<StackName, StackRoutes> {
    let mut out = BTreeMap::new();
    for l in local {
        let routes = candidates
            .get(&l.spec.name)
            .map(|rs| {
                rs.iter()
                    .filter(|r| {
                        r.same_host
                            || present.contains(&FdbRow {
                                vni: l.spec.vni,
                                mac: r.mac,
                                dst: fdb_dst(destinations, r.host),
                            })
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        out.insert(
            l.spec.name.clone(),
            StackRoutes {
                vni: Some(l.spec.vni),
                routes,
            },
        );
    }
    out
}

/// The routing table that steers a stack's traffic: numbered after its router's
/// address, so it is stable across restarts and unique on the host.
pub fn steering_table(router_ip: Ipv4Addr) -> u32 {
    u32::from(router_ip)
}

/// Host steering for the published routes: per local stack with a known bridge, a rule
/// `iif <bridge> lookup <table>` and, in that table, each remote prefix via the router.
pub fn steering(
    local: &[LocalRouter],
    published: &BTreeMap<StackName, StackRoutes>,
    priority: u32,
) -> (BTreeSet<Rule>, BTreeSet<Route>) {
    let mut rules = BTreeSet::new();
    let mut routes = BTreeSet::new();
    for l in local {
        let Some((bridge, index)) = &l.bridge else {
            continue;
        };
        let table = steering_table(l.spec.router_ip);
        rules.insert(Rule {
            priority,
            iif: Some(bridge.clone()),
            fwmark: None,
            table,
            protocol: RTPROT_VROUTER,
        });
        for r in published
            .get(&l.spec.name)
            .map(|s| s.routes.as_slice())
            .unwrap_or_default()
        {
            routes.insert(Route {
                table,
                dst: r.prefix,
                gateway: Some(l.spec.router_ip),
                oif: Some(*index),
                onlink: false,
                protocol: RTPROT_VROUTER,
                nexthop: None,
            });
        }
    }
    (rules, routes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, vni: u32, prefix: &str, router: &str) -> StackSpec {
        StackSpec {
            name: StackName::new(name).unwrap(),
            vni: Vni::new(vni).unwrap(),
            prefixes: vec![prefix.parse().unwrap()],
            router_ip: router.parse().unwrap(),
        }
    }

    fn local(name: &str, vni: u32, prefix: &str, router: &str, br: &str, idx: u32) -> LocalRouter {
        LocalRouter {
            spec: spec(name, vni, prefix, router),
            bridge: Some((br.into(), idx)),
        }
    }

    fn peer(addr: &str, stacks: Vec<StackSpec>) -> PeerHost {
        PeerHost {
            addr: addr.parse().unwrap(),
            stacks,
            source: vrouter_state::PeerOrigin::Static,
            node: None,
            claims: Default::default(),
            generations: Default::default(),
            encryption: None,
        }
    }

    fn host() -> HostView {
        HostView {
            advertise_addr: Some("198.18.0.1".parse().unwrap()),
            host_networks: vec!["198.18.0.0/24".parse().unwrap()],
            ..HostView::default()
        }
    }

    fn gossip_peer(addr: &str, node: &str, stacks: Vec<(StackSpec, u64)>) -> PeerHost {
        PeerHost {
            addr: addr.parse().unwrap(),
            claims: stacks.iter().map(|(s, c)| (s.name.clone(), *c)).collect(),
            generations: Default::default(),
            stacks: stacks.into_iter().map(|(s, _)| s).collect(),
            encryption: None,
            source: vrouter_state::PeerOrigin::Gossip,
            node: Some(node.into()),
        }
    }

    #[test]
    fn earlier_claim_wins_whatever_the_name_or_node_id() {
        let vni = 100;
        // "aaa" sorts first by name and its node id is lower, but claimed later.
        let holder = gossip_peer(
            "198.18.0.2",
            "ffffffffffffffff",
            vec![(spec("zzz", vni, "10.9.0.0/24", "10.9.0.254"), 1_000)],
        );
        let hijack = gossip_peer(
            "198.18.0.3",
            "0000000000000001",
            vec![(spec("aaa", vni, "10.9.0.0/16", "10.9.1.254"), 2_000)],
        );
        let l = local("mine", vni, "10.1.0.0/24", "10.1.0.254", "br1", 7);
        let mut h = host();
        h.local_claims.insert(l.spec.name.clone(), 500);
        let d = compute(&h, &[l], &[hijack.clone(), holder.clone()]);
        let routes = &d.candidates[&StackName::new("mine").unwrap()];
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].stack.as_str(), "zzz");
        assert!(d.refusals.iter().any(|r| r.stack.as_str() == "aaa"));
        // Equal claims: the lower node id wins.
        let tie = gossip_peer(
            "198.18.0.3",
            "0000000000000001",
            vec![(spec("aaa", vni, "10.9.0.0/16", "10.9.1.254"), 1_000)],
        );
        let d = compute(&host(), &[], &[tie, holder]);
        assert!(d.refusals.iter().any(|r| r.stack.as_str() == "zzz"));
    }

    /// A gossip peer whose stacks carry (claim, generation).
    fn placed_peer(addr: &str, node: &str, stacks: Vec<(StackSpec, u64, u64)>) -> PeerHost {
        PeerHost {
            generations: stacks
                .iter()
                .map(|(s, _, g)| (s.name.clone(), *g))
                .collect(),
            ..gossip_peer(
                addr,
                node,
                stacks.into_iter().map(|(s, c, _)| (s, c)).collect(),
            )
        }
    }

    #[test]
    fn a_moved_stack_s_new_copy_wins_at_once_on_a_third_host() {
        let l = local("mine", 100, "10.1.0.0/24", "10.1.0.254", "br1", 7);
        let moved = spec("s", 100, "10.9.0.0/24", "10.9.0.254");
        // The old copy (in its grace period, claimed long ago) and the new one.
        let old = placed_peer(
            "198.18.0.2",
            "0000000000000001",
            vec![(moved.clone(), 1_000, 1)],
        );
        let new = placed_peer(
            "198.18.0.3",
            "00000000000000ff",
            vec![(moved.clone(), 9_000, 2)],
        );
        let mut h = host();
        h.node_id = Some("0000000000000000".into());
        for peers in [
            vec![old.clone(), new.clone()],
            vec![new.clone(), old.clone()],
        ] {
            let d = compute(&h, std::slice::from_ref(&l), &peers);
            let r = &d.candidates[&StackName::new("mine").unwrap()];
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].host, ip("198.18.0.3"), "the new placement is used");
            let mac = moved.router_mac();
            let rows: Vec<_> = d.fdb.iter().filter(|f| f.mac == mac).collect();
            assert_eq!(rows.len(), 1, "{rows:?}");
            assert_eq!(rows[0].dst, ip("198.18.0.3"));
            let dup: Vec<_> = d
                .refusals
                .iter()
                .filter(|r| r.code == "duplicate_stack")
                .collect();
            assert_eq!(dup.len(), 1);
            assert!(
                dup[0]
                    .reason
                    .contains("the copy on host 198.18.0.3 is used")
                    && dup[0].reason.contains("198.18.0.2 (generation 1)"),
                "{}",
                dup[0].reason
            );
        }
    }

    #[test]
    fn an_outranked_local_copy_is_superseded_and_routes_nothing() {
        let mut s_local = local("s", 100, "10.9.0.0/24", "10.9.0.254", "br9", 9);
        s_local.spec.router_ip = "10.9.0.254".parse().unwrap();
        let other = local("mine", 100, "10.1.0.0/24", "10.1.0.254", "br1", 7);
        let newer = placed_peer(
            "198.18.0.3",
            "00000000000000ff",
            vec![(spec("s", 100, "10.9.0.0/24", "10.9.0.254"), 9_000, 2)],
        );
        let mut h = host();
        h.node_id = Some("0000000000000000".into());
        h.local_claims = [(s_local.spec.name.clone(), 1_000)].into();
        h.local_generations = [(s_local.spec.name.clone(), 1)].into();
        let d = compute(
            &h,
            &[s_local.clone(), other.clone()],
            std::slice::from_ref(&newer),
        );
        let sup: Vec<_> = d
            .refusals
            .iter()
            .filter(|r| r.code == "superseded")
            .collect();
        assert_eq!(sup.len(), 1, "{:?}", d.refusals);
        assert!(
            sup[0].reason.contains("host 198.18.0.3")
                && sup[0].reason.contains("docker compose down")
        );
        assert!(d.candidates[&s_local.spec.name].is_empty());
        // The other local stack reaches s on the winning host, not the local copy.
        let r = &d.candidates[&other.spec.name];
        assert_eq!(r.len(), 1);
        assert!(!r[0].same_host && r[0].host == ip("198.18.0.3"), "{r:?}");
        // A higher local generation wins instead, and the remote copy is refused.
        h.local_generations = [(s_local.spec.name.clone(), 3)].into();
        let d = compute(
            &h,
            &[s_local.clone(), other.clone()],
            std::slice::from_ref(&newer),
        );
        assert!(d.refusals.iter().all(|r| r.code != "superseded"));
        assert!(d.refusals.iter().any(|r| r.code == "duplicate_stack"));
        assert!(d.candidates[&other.spec.name][0].same_host);
        // Superseded by a host that is not routed from here (decided on every peer
        // gossip knows): still withdrawn.
        h.local_generations = [(s_local.spec.name.clone(), 1)].into();
        h.superseded = crate::placement::superseded(
            &[(
                s_local.spec.name.clone(),
                crate::placement::Claim {
                    claimed_ms: 1_000,
                    generation: 1,
                },
            )]
            .into(),
            "0000000000000000",
            std::slice::from_ref(&newer),
        );
        let d = compute(&h, &[s_local.clone(), other], &[]);
        assert!(d.refusals.iter().any(|r| r.code == "superseded"));
        assert!(d.candidates[&s_local.spec.name].is_empty());
    }

    #[test]
    fn per_host_prefix_cap() {
        let mut h = host();
        h.max_prefixes_per_host = 2;
        let mut s1 = spec("one", 100, "10.5.0.0/24", "10.5.0.254");
        s1.prefixes.push("10.6.0.0/24".parse().unwrap());
        let s2 = spec("two", 100, "10.7.0.0/24", "10.7.0.254");
        let p = gossip_peer("198.18.0.2", "0000000000000002", vec![(s1, 1), (s2, 1)]);
        let l = local("mine", 100, "10.1.0.0/24", "10.1.0.254", "br1", 7);
        let d = compute(&h, &[l], &[p]);
        let routes = &d.candidates[&StackName::new("mine").unwrap()];
        assert_eq!(routes.len(), 2, "{routes:?}");
        let r = d
            .refusals
            .iter()
            .find(|r| r.stack.as_str() == "two")
            .unwrap();
        assert!(
            r.reason
                .contains("announces 3 prefixes, more than this host's cap of 2"),
            "{}",
            r.reason
        );
    }

    #[test]
    fn local_stacks_count_against_the_cap_and_the_newest_is_refused() {
        let mut h = host();
        h.max_prefixes_per_host = 3;
        let mut a = local("old", 100, "10.1.0.0/24", "10.1.0.254", "br1", 7);
        a.spec.prefixes.push("10.2.0.0/24".parse().unwrap());
        let b = local("newer", 100, "10.3.0.0/24", "10.3.0.254", "br2", 8);
        let c = local("newest", 100, "10.4.0.0/24", "10.4.0.254", "br3", 9);
        h.local_claims.insert(a.spec.name.clone(), 1);
        h.local_claims.insert(b.spec.name.clone(), 2);
        h.local_claims.insert(c.spec.name.clone(), 3);
        let (refused, why) = admit_local(&h, &[c.clone(), a.clone(), b.clone()], |_| 1, usize::MAX);
        assert_eq!(
            refused.into_iter().collect::<Vec<_>>(),
            vec![c.spec.name.clone()]
        );
        assert_eq!(why[0].code, "prefix_cap");
        assert!(
            why[0]
                .reason
                .contains("to 4, over VROUTER_MAX_PREFIXES_PER_HOST=3"),
            "{}",
            why[0].reason
        );
        // The record limit refuses the newest too, and the ones after it still get in
        // if they fit.
        h.max_prefixes_per_host = 0;
        let (refused, why) = admit_local(&h, &[a, b.clone(), c], |_| 10, 10);
        assert_eq!(refused.len(), 2);
        assert!(refused.contains(&b.spec.name));
        assert_eq!(why[0].code, "record_limit");
    }

    #[test]
    fn the_default_cap_admits_a_hundred_stacks_of_four_prefixes() {
        use clap::Parser;
        let s = crate::settings::Cli::try_parse_from(["vrouter-discovery"])
            .unwrap()
            .settings;
        assert!(
            s.max_prefixes_per_host >= 400,
            "{}",
            s.max_prefixes_per_host
        );
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn topology() -> (Vec<LocalRouter>, Vec<PeerHost>) {
        let local = vec![
            local("a", 1000, "10.1.0.0/24", "10.1.0.254", "br-a", 10),
            local("c", 1000, "10.3.0.0/24", "10.3.0.254", "br-c", 11),
            local("f", 2000, "10.6.0.0/24", "10.6.0.254", "br-f", 12),
        ];
        let peers = vec![
            peer(
                "198.18.0.2",
                vec![spec("b", 1000, "10.2.0.0/24", "10.2.0.254")],
            ),
            peer(
                "198.18.0.3",
                vec![
                    spec("d", 2000, "10.4.0.0/24", "10.4.0.254"),
                    spec("g", 2000, "10.7.0.0/24", "10.7.0.254"),
                ],
            ),
        ];
        (local, peers)
    }

    #[test]
    fn routes_stay_within_a_vni() {
        let (local, peers) = topology();
        let d = compute(&host(), &local, &peers);
        assert!(d.refusals.is_empty(), "{:?}", d.refusals);
        let a: Vec<_> = d.candidates[&StackName::new("a").unwrap()]
            .iter()
            .map(|r| (r.stack.to_string(), r.same_host))
            .collect();
        assert_eq!(a, vec![("b".to_string(), false), ("c".to_string(), true)]);
        let f: Vec<_> = d.candidates[&StackName::new("f").unwrap()]
            .iter()
            .map(|r| r.stack.to_string())
            .collect();
        assert_eq!(f, vec!["d", "g"]);
        assert_eq!(d.vnis.len(), 2);
    }

    #[test]
    fn fdb_has_flood_and_router_rows_per_remote_host() {
        let (local, peers) = topology();
        let d = compute(&host(), &local, &peers);
        let v1000 = Vni::new(1000).unwrap();
        let v2000 = Vni::new(2000).unwrap();
        let expect: BTreeSet<FdbRow> = [
            FdbRow {
                vni: v1000,
                mac: Mac::ZERO,
                dst: ip("198.18.0.2"),
            },
            FdbRow {
                vni: v1000,
                mac: Mac::for_router(v1000, ip("10.2.0.254")),
                dst: ip("198.18.0.2"),
            },
            FdbRow {
                vni: v2000,
                mac: Mac::ZERO,
                dst: ip("198.18.0.3"),
            },
            FdbRow {
                vni: v2000,
                mac: Mac::for_router(v2000, ip("10.4.0.254")),
                dst: ip("198.18.0.3"),
            },
            FdbRow {
                vni: v2000,
                mac: Mac::for_router(v2000, ip("10.7.0.254")),
                dst: ip("198.18.0.3"),
            },
        ]
        .into_iter()
        .collect();
        assert_eq!(d.fdb, expect);
    }

    #[test]
    fn an_encrypted_peer_s_rows_point_at_its_tunnel_address_and_publish_follows() {
        let (local, peers) = topology();
        let mut h = host();
        h.destinations.insert(ip("198.18.0.2"), ip("10.255.0.2"));
        let d = compute(&h, &local, &peers);
        let v1000 = Vni::new(1000).unwrap();
        let b = Mac::for_router(v1000, ip("10.2.0.254"));
        assert!(d.fdb.contains(&FdbRow {
            vni: v1000,
            mac: b,
            dst: ip("10.255.0.2")
        }));
        assert!(d.fdb.iter().all(|r| r.dst != ip("198.18.0.2")));
        // The plain peer keeps its underlay address.
        assert!(d.fdb.iter().any(|r| r.dst == ip("198.18.0.3")));
        // The route keeps the underlay host (probes and membership go by it) and is
        // published once the tunnel row is in.
        let a = StackName::new("a").unwrap();
        let published = publish(&local, &d.candidates, &d.fdb, &d.destinations);
        let to_b = published[&a]
            .routes
            .iter()
            .find(|r| r.stack.as_str() == "b")
            .unwrap();
        assert_eq!(to_b.host, ip("198.18.0.2"));
        let underlay_rows: BTreeSet<FdbRow> = d
            .fdb
            .iter()
            .map(|r| FdbRow {
                dst: if r.dst == ip("10.255.0.2") {
                    ip("198.18.0.2")
                } else {
                    r.dst
                },
                ..*r
            })
            .collect();
        let stale = publish(&local, &d.candidates, &underlay_rows, &d.destinations);
        assert!(stale[&a].routes.iter().all(|r| r.stack.as_str() != "b"));
    }

    #[test]
    fn no_device_or_fdb_for_a_vni_without_local_stacks() {
        let (mut local, peers) = topology();
        local.retain(|l| l.spec.vni.get() == 1000);
        let d = compute(&host(), &local, &peers);
        assert!(d.fdb.iter().all(|r| r.vni.get() == 1000));
        assert_eq!(d.vnis.len(), 1);
    }

    #[test]
    fn publish_waits_for_fdb_rows() {
        let (local, peers) = topology();
        let d = compute(&host(), &local, &peers);
        let none = publish(&local, &d.candidates, &BTreeSet::new(), &d.destinations);
        let a = &none[&StackName::new("a").unwrap()];
        assert_eq!(a.routes.len(), 1, "only the same-host route: {a:?}");
        assert!(a.routes[0].same_host);
        let all = publish(&local, &d.candidates, &d.fdb, &d.destinations);
        assert_eq!(all[&StackName::new("a").unwrap()].routes.len(), 2);
        assert_eq!(all[&StackName::new("f").unwrap()].routes.len(), 2);
    }

    #[test]
    fn overlaps_are_refused_deterministically() {
        let (local, mut peers) = topology();
        peers[0]
            .stacks
            .push(spec("aa", 1000, "10.1.0.0/16", "10.1.9.254"));
        peers[0]
            .stacks
            .push(spec("z", 1000, "10.2.0.128/25", "10.2.0.129"));
        let d = compute(&host(), &local, &peers);
        let refused: Vec<_> = d
            .refusals
            .iter()
            .map(|r| (r.stack.to_string(), r.prefix.map(|p| p.to_string())))
            .collect();
        assert_eq!(
            refused,
            vec![
                ("aa".to_string(), Some("10.1.0.0/16".to_string())),
                ("z".to_string(), Some("10.2.0.128/25".to_string())),
            ]
        );
        assert!(d.refusals[0]
            .reason
            .contains("overlaps a prefix of stack a"));
        // Same inputs in another order give the same answer.
        peers.reverse();
        let d2 = compute(&host(), &local, &peers);
        assert_eq!(d.refusals, d2.refusals);
        assert_eq!(d.candidates, d2.candidates);
    }

    #[test]
    fn default_route_host_networks_and_name_clashes_are_refused() {
        let (local, mut peers) = topology();
        peers[0]
            .stacks
            .push(spec("x", 1000, "0.0.0.0/0", "0.0.0.1"));
        peers[0]
            .stacks
            .push(spec("y", 1000, "198.18.0.0/16", "198.18.1.1"));
        peers[0]
            .stacks
            .push(spec("a", 1000, "10.99.0.0/24", "10.99.0.254"));
        peers.push(peer(
            "198.18.0.1",
            vec![spec("self", 1000, "10.98.0.0/24", "10.98.0.254")],
        ));
        let d = compute(&host(), &local, &peers);
        let reasons: Vec<&str> = d.refusals.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert!(reasons.iter().any(|r| r.contains("default route")));
        assert!(reasons
            .iter()
            .any(|r| r.contains("overlaps this host's network 198.18.0.0/24")));
        // A remote copy of local stack a (static: generation 0, claim 0): the local
        // copy ranks first and the remote one is the duplicate.
        assert!(reasons
            .iter()
            .any(|r| r.contains("the copy on host 198.18.0.1 is used")));
        assert!(reasons
            .iter()
            .any(|r| r.contains("this host's own address")));
        assert_eq!(d.candidates[&StackName::new("a").unwrap()].len(), 2);
    }

    fn codes(d: &Desired) -> Vec<(String, Option<String>, String)> {
        d.refusals
            .iter()
            .map(|r| {
                (
                    r.stack.to_string(),
                    r.prefix.map(|p| p.to_string()),
                    r.code.clone(),
                )
            })
            .collect()
    }

    fn routed(d: &Desired, stack: &str) -> Vec<String> {
        d.candidates[&StackName::new(stack).unwrap()]
            .iter()
            .map(|r| format!("{} {}", r.stack, r.prefix))
            .collect()
    }

    fn safety_host() -> HostView {
        HostView {
            underlay_network: Some("198.18.0.0/24".parse().unwrap()),
            bridge_networks: vec![
                (10, "10.1.0.0/24".parse().unwrap()),
                (11, "10.3.0.0/24".parse().unwrap()),
                (12, "10.6.0.0/24".parse().unwrap()),
            ],
            host_networks: vec!["172.17.0.0/16".parse().unwrap()],
            ..host()
        }
    }

    #[test]
    fn unsafe_prefixes_are_refused_for_local_and_remote_stacks_alike() {
        let (mut local, mut peers) = topology();
        // Local stack a also announces loopback and the metadata range, and c covers
        // docker0 and stack a's bridge; its own bridge is fine.
        local[0].spec.prefixes.push("127.0.0.0/8".parse().unwrap());
        local[0]
            .spec
            .prefixes
            .push("169.254.169.254/32".parse().unwrap());
        local[1].spec.prefixes = vec![
            "10.3.0.0/24".parse().unwrap(),
            "172.17.0.0/16".parse().unwrap(),
            "10.1.0.128/25".parse().unwrap(),
        ];
        // Remote stack b announces multicast, 240/4 and the underlay network.
        peers[0].stacks[0].prefixes.extend([
            "224.0.0.0/4".parse::<Prefix>().unwrap(),
            "240.0.0.0/4".parse().unwrap(),
            "198.18.0.0/23".parse().unwrap(),
            "0.0.0.0/8".parse().unwrap(),
        ]);
        let d = compute(&safety_host(), &local, &peers);
        let mut got = codes(&d);
        got.sort();
        let s = |x: &str| x.to_string();
        let mut want = vec![
            (s("a"), Some(s("127.0.0.0/8")), s("reserved_prefix")),
            (s("a"), Some(s("169.254.169.254/32")), s("reserved_prefix")),
            (s("c"), Some(s("172.17.0.0/16")), s("host_network")),
            (s("c"), Some(s("10.1.0.128/25")), s("host_network")),
            (s("b"), Some(s("224.0.0.0/4")), s("reserved_prefix")),
            (s("b"), Some(s("240.0.0.0/4")), s("reserved_prefix")),
            (s("b"), Some(s("198.18.0.0/23")), s("underlay_network")),
            (s("b"), Some(s("0.0.0.0/8")), s("reserved_prefix")),
        ];
        want.sort();
        assert_eq!(got, want);
        // Only the safe prefixes are routed, on every local stack of the VNI.
        assert_eq!(routed(&d, "a"), vec!["b 10.2.0.0/24", "c 10.3.0.0/24"]);
        assert_eq!(routed(&d, "c"), vec!["a 10.1.0.0/24", "b 10.2.0.0/24"]);
    }

    #[test]
    fn a_router_outside_its_prefixes_is_refused_with_no_fdb_row_or_route() {
        let (local, mut peers) = topology();
        // x claims stack a's router address (and so its MAC) for another network.
        peers[0]
            .stacks
            .push(spec("x", 1000, "10.9.0.0/24", "10.1.0.254"));
        let d = compute(&safety_host(), &local, &peers);
        assert_eq!(
            codes(&d),
            vec![("x".to_string(), None, "router_outside_prefixes".to_string())]
        );
        let a_mac = Mac::for_router(Vni::new(1000).unwrap(), "10.1.0.254".parse().unwrap());
        assert!(d.fdb.iter().all(|r| r.mac != a_mac), "{:?}", d.fdb);
        assert_eq!(routed(&d, "a"), vec!["b 10.2.0.0/24", "c 10.3.0.0/24"]);
    }

    #[test]
    fn a_router_address_used_twice_on_a_vni_keeps_one_owner() {
        let (local, mut peers) = topology();
        // y on another host uses b's router address on the same VNI: one MAC, two
        // hosts. The earlier claim (static: by name) keeps it; y is refused whole.
        peers.push(peer(
            "198.18.0.4",
            vec![StackSpec {
                prefixes: vec![
                    "10.2.0.254/32".parse().unwrap(),
                    "10.8.0.0/24".parse().unwrap(),
                ],
                ..spec("y", 1000, "10.2.0.0/24", "10.2.0.254")
            }],
        ));
        // z uses the same address on another VNI: a different MAC, no clash.
        peers.push(peer(
            "198.18.0.5",
            vec![StackSpec {
                prefixes: vec!["10.2.0.254/32".parse().unwrap()],
                ..spec("z", 2000, "10.2.0.0/24", "10.2.0.254")
            }],
        ));
        let d = compute(&safety_host(), &local, &peers);
        let got = codes(&d);
        assert!(
            got.contains(&("y".to_string(), None, "router_ip_clash".to_string())),
            "{got:?}"
        );
        assert!(!got
            .iter()
            .any(|(s, _, c)| s == "z" && c == "router_ip_clash"));
        let b_mac = Mac::for_router(Vni::new(1000).unwrap(), "10.2.0.254".parse().unwrap());
        let rows: Vec<_> = d.fdb.iter().filter(|r| r.mac == b_mac).collect();
        assert_eq!(rows.len(), 1, "one FDB row per MAC: {rows:?}");
        assert_eq!(rows[0].dst, "198.18.0.2".parse::<Ipv4Addr>().unwrap());
        assert!(!routed(&d, "a").iter().any(|r| r.starts_with("y ")));
        let r = d
            .refusals
            .iter()
            .find(|r| r.code == "router_ip_clash")
            .unwrap();
        assert!(
            r.reason.contains("stack b") && r.reason.contains("10.2.0.254"),
            "{}",
            r.reason
        );
    }

    #[test]
    fn a_local_stack_whose_router_address_is_taken_gets_no_routes() {
        let (local, mut peers) = topology();
        // Remote w claimed a's router address first (gossip claim 1 against a's 5).
        peers.push(gossip_peer(
            "198.18.0.4",
            "n4",
            vec![(spec("w", 1000, "10.1.0.254/32", "10.1.0.254"), 1)],
        ));
        let mut host = safety_host();
        host.node_id = Some("n1".into());
        host.local_claims = [(StackName::new("a").unwrap(), 5)].into();
        let d = compute(&host, &local, &peers);
        assert!(codes(&d).contains(&("a".to_string(), None, "router_ip_clash".to_string())));
        assert!(routed(&d, "a").is_empty());
        assert!(!routed(&d, "c").iter().any(|r| r.starts_with("a ")));
    }

    #[test]
    fn a_stack_seen_on_two_hosts_is_not_a_router_clash() {
        // Migration: the same stack (same name, same router) announced by its old and
        // its new host is the duplicate rule's business, never a router clash.
        let (local, mut peers) = topology();
        peers.push(peer(
            "198.18.0.4",
            vec![spec("b", 1000, "10.2.0.0/24", "10.2.0.254")],
        ));
        let d = compute(&safety_host(), &local, &peers);
        assert!(
            !d.refusals.iter().any(|r| r.code == "router_ip_clash"),
            "{:?}",
            d.refusals
        );
        assert_eq!(routed(&d, "a"), vec!["b 10.2.0.0/24", "c 10.3.0.0/24"]);
    }

    #[test]
    fn steering_rule_per_bridge_and_route_per_published_prefix() {
        let (mut local, peers) = topology();
        local[1].bridge = None; // c's bridge not found yet
        let d = compute(&host(), &local, &peers);
        let published = publish(&local, &d.candidates, &d.fdb, &d.destinations);
        let (rules, routes) = steering(&local, &published, 1000);
        let iifs: Vec<_> = rules.iter().map(|r| r.iif.clone().unwrap()).collect();
        assert_eq!(iifs, vec!["br-a", "br-f"]);
        let t = steering_table(ip("10.1.0.254"));
        let a_routes: Vec<_> = routes.iter().filter(|r| r.table == t).collect();
        assert_eq!(a_routes.len(), 2);
        assert!(a_routes.iter().all(|r| r.gateway == Some(ip("10.1.0.254"))
            && r.oif == Some(10)
            && r.protocol == RTPROT_VROUTER));
    }
}
