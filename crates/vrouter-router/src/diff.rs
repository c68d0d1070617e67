//! The plan that turns the observed routing state into the desired one. Pure.
//!
//! Order matters for traffic in flight (Flannel's order, made reconciling): a route
//! is only installed once its gateway's neighbour and nexthop object are, and a
//! nexthop or neighbour is only removed once no route uses it (the kernel deletes the
//! routes of a deleted nexthop); a rule is added after the table it points to is
//! filled, and removed before it is emptied. A route whose gateway changed is replaced
//! in place, never deleted and re-added, so it does not blink.
//!
//! A route is compared by where it forwards: one with its gateway in itself (put there
//! by hand, or by a router that ran without nexthop objects) agrees with the desired
//! route through a nexthop object to the same gateway, link and onlink flag, and is
//! left alone.

use crate::desired::RoutingState;
use std::net::Ipv4Addr;
use vrouter_kernel::{Nexthop, Route, Rule};
use vrouter_state::Mac;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    DeleteRule(Rule),
    DeleteRoute(Route),
    ReplaceNeighbour { index: u32, ip: Ipv4Addr, mac: Mac },
    ReplaceNexthop(Nexthop),
    ReplaceRoute(Route),
    AddRule(Rule),
    DeleteNexthop(u32),
    DeleteNeighbour { index: u32, ip: Ipv4Addr },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::DeleteRule(r) => write!(f, "delete rule {}", show_rule(r)),
            Change::DeleteRoute(r) => write!(f, "delete route {}", show_route(r)),
            Change::ReplaceNeighbour { index, ip, mac } => {
                write!(f, "replace neighbour {ip} lladdr {mac} dev #{index}")
            }
            Change::ReplaceNexthop(n) => {
                write!(f, "replace nexthop id {}", n.id)?;
                if let Some(gw) = n.gateway {
                    write!(f, " via {gw}")?;
                }
                if let Some(oif) = n.oif {
                    write!(f, " dev #{oif}")?;
                }
                if n.onlink {
                    write!(f, " onlink")?;
                }
                Ok(())
            }
            Change::ReplaceRoute(r) => write!(f, "replace route {}", show_route(r)),
            Change::AddRule(r) => write!(f, "add rule {}", show_rule(r)),
            Change::DeleteNexthop(id) => write!(f, "delete nexthop id {id}"),
            Change::DeleteNeighbour { index, ip } => {
                write!(f, "delete neighbour {ip} dev #{index}")
            }
        }
    }
}

fn show_route(r: &Route) -> String {
    let mut s = format!("{} table {}", r.dst, r.table);
    if let Some(gw) = r.gateway {
        s += &format!(" via {gw}");
    }
    if let Some(oif) = r.oif {
        s += &format!(" dev #{oif}");
    }
    if let Some(id) = r.nexthop {
        s += &format!(" nhid {id}");
    }
    if r.onlink {
        s += " onlink";
    }
    s
}

/// Whether the observed route `seen` does what the desired `want` asks: the same, or
/// one with its gateway in itself forwarding the same way (see the module's doc).
fn agrees(desired: &RoutingState, want: &Route, observed: &RoutingState, seen: &Route) -> bool {
    seen == want
        || (seen.nexthop.is_none()
            && (seen.table, seen.dst, seen.protocol) == (want.table, want.dst, want.protocol)
            && desired.forwarding(want) == observed.forwarding(seen))
}

fn show_rule(r: &Rule) -> String {
    let mut s = format!("pref {}", r.priority);
    if let Some(iif) = &r.iif {
        s += &format!(" iif {iif}");
    }
    if let Some(mark) = r.fwmark {
        s += &format!(" fwmark {mark:#x}");
    }
    s + &format!(" lookup {}", r.table)
}

/// The ordered changes that make `observed` equal to `desired`. Empty when they
/// already agree.
pub fn diff(desired: &RoutingState, observed: &RoutingState) -> Vec<Change> {
    let mut plan = Vec::new();

    // Rules are compared whole: the kernel has no "replace" for them.
    for rule in observed.rules.difference(&desired.rules) {
        plan.push(Change::DeleteRule(rule.clone()));
    }
    for (key, route) in &observed.routes {
        if !desired.routes.contains_key(key) {
            plan.push(Change::DeleteRoute(route.clone()));
        }
    }
    for (&(index, ip), &mac) in &desired.neighbours {
        if observed.neighbours.get(&(index, ip)) != Some(&mac) {
            plan.push(Change::ReplaceNeighbour { index, ip, mac });
        }
    }
    for (id, nexthop) in &desired.nexthops {
        if observed.nexthops.get(id) != Some(nexthop) {
            plan.push(Change::ReplaceNexthop(nexthop.clone()));
        }
    }
    for (key, route) in &desired.routes {
        let in_sync = observed
            .routes
            .get(key)
            .is_some_and(|seen| agrees(desired, route, observed, seen));
        if !in_sync {
            plan.push(Change::ReplaceRoute(route.clone()));
        }
    }
    for rule in desired.rules.difference(&observed.rules) {
        plan.push(Change::AddRule(rule.clone()));
    }
    for &id in observed.nexthops.keys() {
        if !desired.nexthops.contains_key(&id) {
            plan.push(Change::DeleteNexthop(id));
        }
    }
    for &(index, ip) in observed.neighbours.keys() {
        if !desired.neighbours.contains_key(&(index, ip)) {
            plan.push(Change::DeleteNeighbour { index, ip });
        }
    }
    plan
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::desired::{compute, Computed, DesiredRouter, ProbePath, RouteStyle, MAIN_TABLE};
    use vrouter_state::{
        Prefix, RemoteRoute, RoutesFile, StackName, StackRoutes, StackSpec, Vni, RTPROT_VROUTER,
    };

    /// The kernel's semantics for each change, as a model: what `apply` does to a
    /// real kernel, minus the kernel.
    pub(crate) fn model_apply(state: &mut RoutingState, change: &Change) {
        match change {
            Change::DeleteRule(r) => {
                state.rules.remove(r);
            }
            Change::DeleteRoute(r) => {
                state.routes.remove(&(r.table, r.dst));
            }
            Change::ReplaceNeighbour { index, ip, mac } => {
                state.neighbours.insert((*index, *ip), *mac);
            }
            Change::ReplaceRoute(r) => {
                state.routes.insert((r.table, r.dst), r.clone());
            }
            Change::AddRule(r) => {
                state.rules.insert(r.clone());
            }
            Change::ReplaceNexthop(n) => {
                state.nexthops.insert(n.id, n.clone());
            }
            Change::DeleteNexthop(id) => {
                // The kernel deletes the routes through it too.
                state.nexthops.remove(id);
                state.routes.retain(|_, r| r.nexthop != Some(*id));
            }
            Change::DeleteNeighbour { index, ip } => {
                state.neighbours.remove(&(*index, *ip));
            }
        }
    }

    fn spec() -> StackSpec {
        StackSpec {
            name: StackName::new("a").unwrap(),
            vni: Vni::new(1000).unwrap(),
            prefixes: vec!["10.1.0.0/24".parse().unwrap()],
            router_ip: "10.1.0.254".parse().unwrap(),
        }
    }

    fn desired(routes: &[(&str, &str, bool)]) -> DesiredRouter {
        let mut f = RoutesFile {
            schema: vrouter_state::SCHEMA_VERSION,
            generation: 1,
            ..RoutesFile::default()
        };
        let routes = routes
            .iter()
            .map(|(p, via, same_host)| {
                let via: Ipv4Addr = via.parse().unwrap();
                RemoteRoute {
                    prefix: p.parse().unwrap(),
                    stack: StackName::new("b").unwrap(),
                    via,
                    mac: Mac::for_router(Vni::new(1000).unwrap(), via),
                    host: "198.18.0.2".parse().unwrap(),
                    same_host: *same_host,
                }
            })
            .collect();
        f.stacks.insert(
            StackName::new("a").unwrap(),
            StackRoutes { vni: None, routes },
        );
        match compute(&spec(), &f) {
            Computed::Listed { desired, .. } => desired,
            Computed::NotListed => unreachable!(),
        }
    }

    const OVL: u32 = 9;
    const PROBE: ProbePath = ProbePath {
        gateway: Ipv4Addr::new(10, 1, 0, 1),
        oif: 2,
    };

    fn converge(desired: &RoutingState, observed: &mut RoutingState) -> Vec<Change> {
        let plan = diff(desired, observed);
        for c in &plan {
            model_apply(observed, c);
        }
        plan
    }

    fn position(plan: &[Change], f: impl Fn(&Change) -> bool) -> usize {
        plan.iter().position(f).expect("change present")
    }

    #[test]
    fn from_empty_neighbours_before_routes() {
        let d = desired(&[("10.2.0.0/24", "10.2.0.254", false)])
            .routing_state(Some(OVL), RouteStyle::Nexthop);
        let plan = diff(&d, &RoutingState::default());
        assert_eq!(plan.len(), 3, "{plan:?}");
        let neigh = position(&plan, |c| matches!(c, Change::ReplaceNeighbour { .. }));
        let nexthop = position(&plan, |c| matches!(c, Change::ReplaceNexthop(_)));
        let route = position(
            &plan,
            |c| matches!(c, Change::ReplaceRoute(r) if r.table == MAIN_TABLE),
        );
        assert!(neigh < nexthop && nexthop < route, "{plan:?}");
    }

    /// The probe rule and table an older router left in the namespace: rule first
    /// (else marked packets would look up an empty table), then its route.
    #[test]
    fn legacy_probe_rule_and_table_removed_rule_first() {
        use crate::desired::LEGACY_PROBE_TABLE;
        let d = desired(&[("10.2.0.0/24", "10.2.0.254", false)])
            .routing_state(Some(OVL), RouteStyle::Nexthop);
        let mut observed = d.clone();
        observed.rules.insert(vrouter_kernel::Rule {
            priority: 100,
            iif: None,
            fwmark: Some(0x7672),
            table: LEGACY_PROBE_TABLE,
            protocol: 118,
        });
        let dst: Prefix = "0.0.0.0/0".parse().unwrap();
        observed.routes.insert(
            (LEGACY_PROBE_TABLE, dst),
            Route {
                table: LEGACY_PROBE_TABLE,
                dst,
                gateway: Some(PROBE.gateway),
                oif: Some(PROBE.oif),
                onlink: false,
                protocol: 118,
                nexthop: None,
            },
        );
        let plan = converge(&d, &mut observed);
        assert_eq!(observed, d);
        assert_eq!(plan.len(), 2, "{plan:?}");
        let rule = position(&plan, |c| matches!(c, Change::DeleteRule(_)));
        let table = position(
            &plan,
            |c| matches!(c, Change::DeleteRoute(r) if r.table == LEGACY_PROBE_TABLE),
        );
        assert!(rule < table);
    }

    #[test]
    fn idempotent() {
        let d = desired(&[
            ("10.2.0.0/24", "10.2.0.254", false),
            ("10.3.0.0/24", "10.3.0.254", true),
        ])
        .routing_state(Some(OVL), RouteStyle::Nexthop);
        let mut observed = RoutingState::default();
        assert!(!converge(&d, &mut observed).is_empty());
        assert_eq!(observed, d);
        assert!(diff(&d, &observed).is_empty());
    }

    #[test]
    fn stale_entries_removed_routes_before_neighbours() {
        let old = desired(&[
            ("10.2.0.0/24", "10.2.0.254", false),
            ("10.3.0.0/24", "10.3.0.254", false),
        ])
        .routing_state(Some(OVL), RouteStyle::Nexthop);
        let new = desired(&[("10.2.0.0/24", "10.2.0.254", false)])
            .routing_state(Some(OVL), RouteStyle::Nexthop);
        let mut observed = old.clone();
        let plan = converge(&new, &mut observed);
        assert_eq!(observed, new);
        let route = position(
            &plan,
            |c| matches!(c, Change::DeleteRoute(r) if r.dst == "10.3.0.0/24".parse::<Prefix>().unwrap()),
        );
        let neigh = position(
            &plan,
            |c| matches!(c, Change::DeleteNeighbour { ip, .. } if *ip == Ipv4Addr::new(10, 3, 0, 254)),
        );
        let nexthop = position(
            &plan,
            |c| matches!(c, Change::DeleteNexthop(id) if *id == u32::from(Ipv4Addr::new(10, 3, 0, 254))),
        );
        assert!(route < nexthop && nexthop < neigh, "{plan:?}");
        // The kept route is not touched.
        assert!(!plan.iter().any(|c| matches!(c,
            Change::ReplaceRoute(r) | Change::DeleteRoute(r) if r.dst == "10.2.0.0/24".parse::<Prefix>().unwrap())));
    }

    #[test]
    fn gateway_change_replaces_in_place() {
        let old = desired(&[("10.2.0.0/24", "10.2.0.254", false)])
            .routing_state(Some(OVL), RouteStyle::Nexthop);
        let new = desired(&[("10.2.0.0/24", "10.2.0.253", false)])
            .routing_state(Some(OVL), RouteStyle::Nexthop);
        let mut observed = old;
        let plan = converge(&new, &mut observed);
        assert_eq!(observed, new);
        assert!(
            !plan.iter().any(|c| matches!(c, Change::DeleteRoute(_))),
            "{plan:?}"
        );
        let add_neigh = position(&plan, |c| matches!(c, Change::ReplaceNeighbour { .. }));
        let add_nexthop = position(&plan, |c| matches!(c, Change::ReplaceNexthop(_)));
        let replace = position(&plan, |c| matches!(c, Change::ReplaceRoute(_)));
        let del_nexthop = position(&plan, |c| matches!(c, Change::DeleteNexthop(_)));
        let del_neigh = position(&plan, |c| matches!(c, Change::DeleteNeighbour { .. }));
        assert!(
            add_neigh < add_nexthop
                && add_nexthop < replace
                && replace < del_nexthop
                && del_nexthop < del_neigh,
            "{plan:?}"
        );
    }

    #[test]
    fn drifted_attributes_are_repaired() {
        for style in [RouteStyle::Nexthop, RouteStyle::Plain] {
            let d =
                desired(&[("10.2.0.0/24", "10.2.0.254", false)]).routing_state(Some(OVL), style);
            let mut observed = d.clone();
            // Someone dropped onlink and changed the neighbour's MAC.
            observed.routes.values_mut().for_each(|r| r.onlink = false);
            observed
                .nexthops
                .values_mut()
                .for_each(|n| n.onlink = false);
            observed
                .neighbours
                .values_mut()
                .for_each(|m| *m = Mac::ZERO);
            let plan = converge(&d, &mut observed);
            assert_eq!(plan.len(), 2, "{style:?}: {plan:?}");
            assert_eq!(observed, d);
        }
    }

    #[test]
    fn plain_route_to_the_same_gateway_is_left_alone() {
        let d = desired(&[
            ("10.2.0.0/24", "10.2.0.254", false),
            ("10.3.0.0/24", "10.3.0.254", false),
        ]);
        let nexthops = d.routing_state(Some(OVL), RouteStyle::Nexthop);
        let plain = d.routing_state(Some(OVL), RouteStyle::Plain);
        // Routes from a router that ran without nexthop objects, or put back by hand:
        // only the nexthop objects are added.
        let mut observed = plain.clone();
        let plan = converge(&nexthops, &mut observed);
        assert!(
            plan.iter().all(|c| matches!(c, Change::ReplaceNexthop(_))),
            "{plan:?}"
        );
        assert_eq!(plan.len(), 2);
        assert!(diff(&nexthops, &observed).is_empty());
        // One pointing elsewhere is replaced.
        let b = (MAIN_TABLE, "10.2.0.0/24".parse::<Prefix>().unwrap());
        observed.routes.get_mut(&b).unwrap().gateway = Some(Ipv4Addr::new(10, 3, 0, 254));
        let plan = converge(&nexthops, &mut observed);
        assert_eq!(
            plan,
            vec![Change::ReplaceRoute(nexthops.routes[&b].clone())]
        );
        // Going back to plain routes replaces the routes before their nexthops go
        // (which would take the routes with them).
        let mut observed = nexthops.clone();
        let plan = converge(&plain, &mut observed);
        assert_eq!(observed, plain, "{plan:?}");
        let last_route = plan
            .iter()
            .rposition(|c| matches!(c, Change::ReplaceRoute(_)))
            .unwrap();
        let first_delete = position(&plan, |c| matches!(c, Change::DeleteNexthop(_)));
        assert!(last_route < first_delete, "{plan:?}");
    }

    #[test]
    fn changed_rule_is_deleted_then_added() {
        // The diff handles rules in general (none are desired today).
        let rule = Rule {
            priority: 100,
            iif: None,
            fwmark: Some(7),
            table: 7,
            protocol: RTPROT_VROUTER,
        };
        let mut d = DesiredRouter::default().routing_state(None, RouteStyle::Nexthop);
        d.rules.insert(rule.clone());
        let mut observed = d.clone();
        observed.rules.clear();
        observed.rules.insert(Rule {
            priority: 200,
            ..rule
        });
        let plan = converge(&d, &mut observed);
        assert!(matches!(plan.first(), Some(Change::DeleteRule(_))));
        assert!(matches!(plan.last(), Some(Change::AddRule(_))));
        assert_eq!(observed, d);
    }

    #[test]
    fn new_overlay_link_moves_everything() {
        let d = desired(&[("10.2.0.0/24", "10.2.0.254", false)]);
        let mut observed = d.routing_state(Some(OVL), RouteStyle::Nexthop);
        let target = d.routing_state(Some(OVL + 1), RouteStyle::Nexthop);
        converge(&target, &mut observed);
        assert_eq!(observed, target);
    }
}
