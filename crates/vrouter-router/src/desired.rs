//! What the router's tables should hold, computed from routes.json and the router's
//! own stack. Pure: no I/O, so every rule here is tested without root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use vrouter_kernel::{Nexthop, Route, Rule};
use vrouter_state::EventKind;
use vrouter_state::{
    Mac, Prefix, ReadError, RemoteRoute, RoutesFile, StackName, StackSpec, RTPROT_VROUTER,
};

/// The main routing table.
pub const MAIN_TABLE: u32 = 254;
/// The table that routers up to 0.1 (stop 10) filled for same-host probes, behind a
/// policy rule on their firewall mark. Probes now pick the stack interface with
/// IP_UNICAST_IF instead ([`crate::probe`]): any policy rule turns off the kernel's
/// merged-table fast path for every forwarded packet. Still dumped, so that a router
/// upgraded in place removes the old rule and table (they have protocol
/// RTPROT_VROUTER and are not desired).
pub const LEGACY_PROBE_TABLE: u32 = 0x7672;

/// A remote stack whose router lives on this host (reached through a sibling
/// macvlan): the one path Docker 28.2+'s firewall may block, so it is probed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SameHostPeer {
    pub stack: StackName,
    pub via: Ipv4Addr,
}

/// A remote stack's router on another host, reached over the overlay: the overlay
/// probes check it answers (see [`crate::overlay_probe`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteRouter {
    /// The router's overlay address (the routes' gateway).
    pub via: Ipv4Addr,
    pub stack: StackName,
    /// Underlay address of the host carrying it.
    pub host: Ipv4Addr,
}

/// The remote part of the router's desired state, as routes.json gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredRouter {
    /// routes.json generation this was computed from.
    pub generation: u64,
    /// Remote router address -> its MAC (permanent neighbours on the overlay link).
    pub neighbours: BTreeMap<Ipv4Addr, Mac>,
    /// Remote prefix -> remote router address (routes onlink via the overlay link).
    pub routes: BTreeMap<Prefix, Ipv4Addr>,
    pub same_host: BTreeSet<SameHostPeer>,
    /// Routers of installed routes on other hosts (overlay probe targets).
    pub remote_routers: BTreeSet<RemoteRouter>,
}

/// A route from routes.json the router will not install, and why (one line for an
/// operator; becomes an event).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Skipped {
    pub prefix: Prefix,
    pub stack: StackName,
    pub reason: String,
}

/// The outcome of reading our stack's entry in routes.json.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Computed {
    /// routes.json lists our stack: this is the desired state.
    Listed {
        desired: DesiredRouter,
        skipped: Vec<Skipped>,
    },
    /// routes.json does not list our stack (discovery has not registered it yet, e.g.
    /// right after it restarted): the caller keeps what it has, since flushing would
    /// cut traffic that is still valid.
    NotListed,
}

/// Computes the desired state of `own`'s router from routes.json.
pub fn compute(own: &StackSpec, file: &RoutesFile) -> Computed {
    let Some(entry) = file.stacks.get(&own.name) else {
        return Computed::NotListed;
    };
    let mut desired = DesiredRouter {
        generation: file.generation,
        ..DesiredRouter::default()
    };
    let mut skipped = Vec::new();
    let mut skip = |r: &RemoteRoute, reason: String| {
        skipped.push(Skipped {
            prefix: r.prefix,
            stack: r.stack.clone(),
            reason,
        })
    };
    if let Some(vni) = entry.vni {
        if vni != own.vni {
            for r in &entry.routes {
                skip(
                    r,
                    format!(
                        "routes.json gives stack {} VNI {vni} but this router runs VNI {}; set VROUTER_VNI to match the stack's registration",
                        own.name, own.vni
                    ),
                );
            }
            return Computed::Listed { desired, skipped };
        }
    }
    // Sorted, so the first of two conflicting routes wins the same way every time.
    let mut routes: Vec<&RemoteRoute> = entry.routes.iter().collect();
    routes.sort();
    for r in routes {
        if let Some(mine) = own.prefixes.iter().find(|p| p.overlaps(&r.prefix)) {
            skip(
                r,
                format!(
                    "route to {} (stack {}) overlaps this stack's own prefix {mine}; give the stacks disjoint subnets",
                    r.prefix, r.stack
                ),
            );
            continue;
        }
        if r.via == own.router_ip || own.prefixes.iter().any(|p| p.contains(r.via)) {
            skip(
                r,
                format!(
                    "route to {} (stack {}) goes via {}, an address of this stack; the remote stack's router IP must be in its own subnet",
                    r.prefix, r.stack, r.via
                ),
            );
            continue;
        }
        if let Some(&other) = desired.routes.get(&r.prefix) {
            if other != r.via {
                skip(
                    r,
                    format!(
                        "route to {} via {} (stack {}) conflicts with the route to it via {other}; keeping the latter",
                        r.prefix, r.via, r.stack
                    ),
                );
            }
            continue;
        }
        if let Some(&mac) = desired.neighbours.get(&r.via) {
            if mac != r.mac {
                skip(
                    r,
                    format!(
                        "router {} (stack {}) is listed with MAC {} and {mac}; keeping the latter",
                        r.via, r.stack, r.mac
                    ),
                );
                continue;
            }
        }
        if let Some(clash) = desired.routes.keys().find(|p| p.overlaps(&r.prefix)) {
            // Overlapping remote prefixes would route by longest match, silently
            // splitting one stack's traffic; discovery refuses these, so this only
            // guards against a stale or hand-made file.
            skip(
                r,
                format!(
                    "route to {} (stack {}) overlaps the route to {clash}; give the stacks disjoint subnets",
                    r.prefix, r.stack
                ),
            );
            continue;
        }
        desired.neighbours.insert(r.via, r.mac);
        desired.routes.insert(r.prefix, r.via);
        if r.same_host {
            desired.same_host.insert(SameHostPeer {
                stack: r.stack.clone(),
                via: r.via,
            });
        } else {
            desired.remote_routers.insert(RemoteRouter {
                via: r.via,
                stack: r.stack.clone(),
                host: r.host,
            });
        }
    }
    Computed::Listed { desired, skipped }
}

/// routes.json as the router last understood it. A file that is missing, partial,
/// corrupt or of an unknown schema changes nothing here but the reported error: the
/// last good desired state stays in force, so the routes are never flushed because a
/// file could not be read.
#[derive(Debug, Default)]
pub struct Intent {
    /// The last good desired state; None until routes.json was read and listed us.
    pub last_good: Option<DesiredRouter>,
    /// The file as last read lists our stack, so its generation may be acknowledged.
    pub listed: bool,
    /// Kind of the current read error (see [`read_error_kind`]), reported once.
    read_error: Option<String>,
    /// Skipped-route reasons already reported.
    skipped: BTreeSet<String>,
}

impl Intent {
    /// Takes in one read of routes.json; returns the events to write (kind, message),
    /// only for problems that are new.
    pub fn absorb(
        &mut self,
        own: &StackSpec,
        read: Result<RoutesFile, ReadError>,
    ) -> Vec<(EventKind, String)> {
        let mut events = Vec::new();
        match read {
            Ok(file) => {
                if let Some(was) = self.read_error.take() {
                    tracing::info!(%was, "routes.json is readable again");
                }
                match compute(own, &file) {
                    Computed::Listed { desired, skipped } => {
                        let now: BTreeSet<String> = skipped.into_iter().map(|s| s.reason).collect();
                        for reason in now.difference(&self.skipped) {
                            events.push((EventKind::RouteSkipped, reason.clone()));
                        }
                        self.skipped = now;
                        self.last_good = Some(desired);
                        self.listed = true;
                    }
                    Computed::NotListed => {
                        tracing::debug!(
                            generation = file.generation,
                            "routes.json does not list this stack yet; keeping current routes"
                        );
                        self.listed = false;
                    }
                }
            }
            Err(e) => {
                self.listed = false;
                let kind = read_error_kind(&e);
                if self.read_error.as_deref() != Some(kind.as_str()) {
                    events.push((EventKind::StateUnreadable, e.to_string()));
                    self.read_error = Some(kind);
                }
            }
        }
        events
    }
}

/// The kind of a read error, so one problem is reported once however its details
/// vary between reads (a file rewritten by hand, say).
pub fn read_error_kind(e: &ReadError) -> String {
    match e {
        ReadError::Missing { .. } => "missing".into(),
        ReadError::Corrupt { .. } => "corrupt".into(),
        ReadError::UnknownSchema { found, .. } => format!("schema {found}"),
        ReadError::Unreadable { .. } => "unreadable".into(),
    }
}

/// Where the router's same-host probes leave: the stack network's gateway (the host's
/// bridge address) on the stack interface, the default route's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbePath {
    pub gateway: Ipv4Addr,
    pub oif: u32,
}

/// How remote routes name their gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteStyle {
    /// Through a nexthop object per remote router (RTA_NH_ID): the kernel installs
    /// these in linear time, where routes with distinct gateways take quadratic time
    /// (10,000 in 2.2 s measured).
    Nexthop,
    /// With the gateway in the route itself: for kernels without nexthop objects
    /// (before 5.3), found out by the first refused nexthop.
    Plain,
}

/// The id of the nexthop object for the remote router at `via`: the address read as a
/// number. All of them sit on the overlay link, so the gateway alone names one; a new
/// overlay link moves each in place (replace). Ids below 2^24 (0.0.0.0/8, never a
/// router's address) are not used, which keeps clear of hand-numbered nexthops
/// (`ip nexthop add id 1`); such a gateway gets a plain route.
pub fn nexthop_id(via: Ipv4Addr) -> Option<u32> {
    let id = u32::from(via);
    (id >= 1 << 24).then_some(id)
}

/// Kernel objects this project owns in the router's namespace, keyed the way the
/// kernel identifies them. Both the desired and the observed state take this shape,
/// so diffing is a comparison of two values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingState {
    /// (link index, address) -> MAC: permanent neighbours on the overlay link.
    pub neighbours: BTreeMap<(u32, Ipv4Addr), Mac>,
    /// id -> nexthop object, protocol RTPROT_VROUTER only: one per remote router.
    pub nexthops: BTreeMap<u32, Nexthop>,
    /// (table, destination) -> route, protocol RTPROT_VROUTER only.
    pub routes: BTreeMap<(u32, Prefix), Route>,
    /// Policy rules with protocol RTPROT_VROUTER.
    pub rules: BTreeSet<Rule>,
}

impl RoutingState {
    /// Where `route` sends packets: (gateway, output link, onlink), looked up in this
    /// state's nexthops for a route through one; None for a nexthop not in it.
    pub fn forwarding(&self, route: &Route) -> Option<(Option<Ipv4Addr>, Option<u32>, bool)> {
        match route.nexthop {
            None => Some((route.gateway, route.oif, route.onlink)),
            Some(id) => self
                .nexthops
                .get(&id)
                .map(|nh| (nh.gateway, nh.oif, nh.onlink)),
        }
    }
}

impl DesiredRouter {
    /// The kernel objects for this desired state. Without an overlay link there is
    /// nothing to hang remote routes on (they died with the link). In
    /// [`RouteStyle::Nexthop`], each remote router gets a nexthop object (onlink on the
    /// overlay link) and its routes refer to it. No policy rules: the router's
    /// namespace keeps the kernel's single-lookup path (see [`LEGACY_PROBE_TABLE`]).
    pub fn routing_state(&self, overlay: Option<u32>, style: RouteStyle) -> RoutingState {
        let mut state = RoutingState::default();
        if let Some(ovl) = overlay {
            for (&ip, &mac) in &self.neighbours {
                state.neighbours.insert((ovl, ip), mac);
            }
            for (&dst, &via) in &self.routes {
                let plain = Route {
                    table: MAIN_TABLE,
                    dst,
                    gateway: Some(via),
                    oif: Some(ovl),
                    onlink: true,
                    protocol: RTPROT_VROUTER,
                    nexthop: None,
                };
                let route = match (style, nexthop_id(via)) {
                    (RouteStyle::Nexthop, Some(id)) => {
                        state.nexthops.insert(
                            id,
                            Nexthop {
                                id,
                                gateway: Some(via),
                                oif: Some(ovl),
                                onlink: true,
                                protocol: RTPROT_VROUTER,
                            },
                        );
                        Route {
                            gateway: None,
                            oif: None,
                            onlink: false,
                            nexthop: Some(id),
                            ..plain
                        }
                    }
                    _ => plain,
                };
                state.routes.insert((MAIN_TABLE, dst), route);
            }
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vrouter_state::{StackRoutes, Vni};

    pub(crate) fn own() -> StackSpec {
        StackSpec {
            name: StackName::new("a").unwrap(),
            vni: Vni::new(1000).unwrap(),
            prefixes: vec!["10.1.0.0/24".parse().unwrap()],
            router_ip: "10.1.0.254".parse().unwrap(),
        }
    }

    fn route(prefix: &str, stack: &str, via: &str, same_host: bool) -> RemoteRoute {
        let via: Ipv4Addr = via.parse().unwrap();
        RemoteRoute {
            prefix: prefix.parse().unwrap(),
            stack: StackName::new(stack).unwrap(),
            via,
            mac: Mac::for_router(Vni::new(1000).unwrap(), via),
            host: "198.18.0.2".parse().unwrap(),
            same_host,
        }
    }

    fn file(generation: u64, routes: Vec<RemoteRoute>) -> RoutesFile {
        let mut f = RoutesFile {
            schema: vrouter_state::SCHEMA_VERSION,
            generation,
            ..RoutesFile::default()
        };
        f.stacks.insert(
            StackName::new("a").unwrap(),
            StackRoutes {
                vni: Some(Vni::new(1000).unwrap()),
                routes,
            },
        );
        f
    }

    fn listed(c: Computed) -> (DesiredRouter, Vec<Skipped>) {
        match c {
            Computed::Listed { desired, skipped } => (desired, skipped),
            Computed::NotListed => panic!("not listed"),
        }
    }

    #[test]
    fn routes_become_neighbours_and_routes() {
        let f = file(
            7,
            vec![
                route("10.2.0.0/24", "b", "10.2.0.254", false),
                route("10.2.1.0/24", "b", "10.2.0.254", false),
                route("10.3.0.0/24", "c", "10.3.0.254", true),
            ],
        );
        let (d, skipped) = listed(compute(&own(), &f));
        assert!(skipped.is_empty());
        assert_eq!(d.generation, 7);
        assert_eq!(d.neighbours.len(), 2);
        assert_eq!(
            d.neighbours[&"10.2.0.254".parse().unwrap()].to_string(),
            "02:e8:0a:02:00:fe"
        );
        assert_eq!(d.routes.len(), 3);
        assert_eq!(
            d.same_host.iter().cloned().collect::<Vec<_>>(),
            vec![SameHostPeer {
                stack: StackName::new("c").unwrap(),
                via: "10.3.0.254".parse().unwrap()
            }]
        );
        // One remote router for its two routes; the same-host one is not probed
        // over the overlay.
        assert_eq!(
            d.remote_routers.iter().cloned().collect::<Vec<_>>(),
            vec![RemoteRouter {
                via: "10.2.0.254".parse().unwrap(),
                stack: StackName::new("b").unwrap(),
                host: "198.18.0.2".parse().unwrap(),
            }]
        );
    }

    #[test]
    fn unlisted_stack_is_not_an_empty_table() {
        let mut f = file(3, vec![]);
        f.stacks.clear();
        assert_eq!(compute(&own(), &f), Computed::NotListed);
        // Listed with no routes is: everything goes.
        let (d, _) = listed(compute(&own(), &file(4, vec![])));
        assert!(d.routes.is_empty() && d.neighbours.is_empty());
    }

    #[test]
    fn overlap_with_own_prefix_is_skipped() {
        let f = file(
            1,
            vec![
                route("10.1.0.0/16", "evil", "10.9.0.254", false),
                route("0.0.0.0/0", "evil", "10.9.0.254", false),
                route("10.2.0.0/24", "b", "10.2.0.254", false),
            ],
        );
        let (d, skipped) = listed(compute(&own(), &f));
        assert_eq!(d.routes.len(), 1);
        assert_eq!(skipped.len(), 2);
        assert!(skipped.iter().all(|s| s
            .reason
            .contains("overlaps this stack's own prefix 10.1.0.0/24")));
        // The neighbour of a skipped route is not installed either.
        assert!(!d.neighbours.contains_key(&"10.9.0.254".parse().unwrap()));
        // Nor is its router probed.
        assert!(d
            .remote_routers
            .iter()
            .all(|r| r.via != "10.9.0.254".parse::<Ipv4Addr>().unwrap()));
    }

    #[test]
    fn conflicting_entries_keep_one_deterministically() {
        let mut r2 = route("10.2.0.0/24", "b", "10.2.0.254", false);
        r2.mac = "02:00:00:00:00:01".parse().unwrap();
        let f1 = file(
            1,
            vec![
                route("10.2.0.0/24", "b", "10.2.0.254", false),
                route("10.2.0.0/24", "b2", "10.2.0.253", false),
                route("10.2.0.0/25", "b3", "10.2.0.1", false),
            ],
        );
        let mut f2 = f1.clone();
        f2.stacks.values_mut().next().unwrap().routes.reverse();
        let (d1, s1) = listed(compute(&own(), &f1));
        let (d2, s2) = listed(compute(&own(), &f2));
        assert_eq!(d1, d2);
        assert_eq!(s1, s2);
        assert_eq!(d1.routes.len(), 1);
        assert_eq!(s1.len(), 2);
    }

    #[test]
    fn wrong_vni_installs_nothing() {
        let mut f = file(1, vec![route("10.2.0.0/24", "b", "10.2.0.254", false)]);
        f.stacks.values_mut().next().unwrap().vni = Some(Vni::new(2000).unwrap());
        let (d, skipped) = listed(compute(&own(), &f));
        assert!(d.routes.is_empty());
        assert!(skipped[0].reason.contains("VROUTER_VNI"), "{:?}", skipped);
    }

    #[test]
    fn routing_state_shapes() {
        let f = file(1, vec![route("10.2.0.0/24", "b", "10.2.0.254", false)]);
        let (d, _) = listed(compute(&own(), &f));
        let s = d.routing_state(Some(7), RouteStyle::Plain);
        let r = &s.routes[&(MAIN_TABLE, "10.2.0.0/24".parse().unwrap())];
        assert_eq!(r.gateway, Some("10.2.0.254".parse().unwrap()));
        assert_eq!(r.oif, Some(7));
        assert!(r.onlink);
        assert_eq!(r.protocol, 118);
        assert_eq!(r.nexthop, None);
        assert!(s.nexthops.is_empty());
        // Through a nexthop object: the route names it, the object holds the rest,
        // and both forward the same way.
        let n = d.routing_state(Some(7), RouteStyle::Nexthop);
        let via: Ipv4Addr = "10.2.0.254".parse().unwrap();
        let id = nexthop_id(via).unwrap();
        assert_eq!(id, 0x0a02_00fe);
        let nr = &n.routes[&(MAIN_TABLE, "10.2.0.0/24".parse().unwrap())];
        assert_eq!(
            (nr.nexthop, nr.gateway, nr.oif, nr.onlink),
            (Some(id), None, None, false)
        );
        assert_eq!(
            n.nexthops[&id],
            Nexthop {
                id,
                gateway: Some(via),
                oif: Some(7),
                onlink: true,
                protocol: 118
            }
        );
        assert_eq!(n.forwarding(nr), s.forwarding(r));
        assert_eq!(n.neighbours, s.neighbours);
        assert_eq!(RoutingState::default().forwarding(nr), None);
        assert!(s
            .neighbours
            .contains_key(&(7, "10.2.0.254".parse().unwrap())));
        // Only the main table, and no policy rule (it would cost every forwarded
        // packet a rule walk).
        assert!(s.rules.is_empty() && n.rules.is_empty());
        assert!(s.routes.keys().all(|(t, _)| *t == MAIN_TABLE));
        // No overlay link: nothing.
        assert!(d.routing_state(None, RouteStyle::Nexthop) == RoutingState::default());
    }

    #[test]
    fn nexthop_ids_stay_out_of_the_low_range() {
        assert_eq!(nexthop_id("10.2.0.254".parse().unwrap()), Some(0x0a02_00fe));
        assert_eq!(nexthop_id("1.0.0.0".parse().unwrap()), Some(1 << 24));
        assert_eq!(nexthop_id("0.0.0.7".parse().unwrap()), None);
        // Such a gateway gets a plain route.
        let mut d = DesiredRouter::default();
        let via: Ipv4Addr = "0.0.0.7".parse().unwrap();
        d.routes.insert("10.2.0.0/24".parse().unwrap(), via);
        let s = d.routing_state(Some(7), RouteStyle::Nexthop);
        assert!(s.nexthops.is_empty());
        assert_eq!(s.routes.values().next().unwrap().gateway, Some(via));
    }

    fn corrupt() -> ReadError {
        ReadError::Corrupt {
            path: "/s/routes.json".into(),
            detail: "EOF while parsing".into(),
        }
    }

    #[test]
    fn unreadable_file_keeps_last_good_and_reports_once() {
        let mut intent = Intent::default();
        let good = file(5, vec![route("10.2.0.0/24", "b", "10.2.0.254", false)]);
        assert!(intent.absorb(&own(), Ok(good)).is_empty());
        let kept = intent.last_good.clone().unwrap();
        assert!(intent.listed);

        let ev = intent.absorb(&own(), Err(corrupt()));
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].0, "state_unreadable");
        assert!(ev[0].1.contains("routes.json"), "{}", ev[0].1);
        assert_eq!(intent.last_good.as_ref(), Some(&kept));
        assert!(
            !intent.listed,
            "an unreadable generation is not acknowledged"
        );
        // Same problem, different details: no new event.
        let again = ReadError::Corrupt {
            path: "/s/routes.json".into(),
            detail: "trailing characters".into(),
        };
        assert!(intent.absorb(&own(), Err(again)).is_empty());
        // A different problem is reported.
        let ev = intent.absorb(
            &own(),
            Err(ReadError::UnknownSchema {
                path: "/s/routes.json".into(),
                found: 9,
                expected: 1,
            }),
        );
        assert_eq!(ev.len(), 1);
        assert!(ev[0].1.contains("schema version 9"), "{}", ev[0].1);
        let ev = intent.absorb(
            &own(),
            Err(ReadError::Missing {
                path: "/s/routes.json".into(),
            }),
        );
        assert_eq!(ev.len(), 1);
        assert_eq!(intent.last_good.as_ref(), Some(&kept));

        // Recovery, then the same error again is news again.
        assert!(intent.absorb(&own(), Ok(file(6, vec![]))).is_empty());
        assert_eq!(intent.last_good.as_ref().unwrap().generation, 6);
        assert_eq!(intent.absorb(&own(), Err(corrupt())).len(), 1);
    }

    #[test]
    fn unlisted_keeps_last_good() {
        let mut intent = Intent::default();
        intent.absorb(
            &own(),
            Ok(file(
                5,
                vec![route("10.2.0.0/24", "b", "10.2.0.254", false)],
            )),
        );
        let mut f = file(6, vec![]);
        f.stacks.clear();
        assert!(intent.absorb(&own(), Ok(f)).is_empty());
        assert_eq!(intent.last_good.as_ref().unwrap().generation, 5);
        assert!(!intent.listed);
    }

    #[test]
    fn skipped_routes_reported_once() {
        let mut intent = Intent::default();
        let f = file(1, vec![route("10.1.0.0/16", "evil", "10.9.0.254", false)]);
        let ev = intent.absorb(&own(), Ok(f.clone()));
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].0, "route_skipped");
        assert!(intent.absorb(&own(), Ok(f)).is_empty());
    }
}
