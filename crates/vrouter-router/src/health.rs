//! The router's health: do the kernel's routes and neighbours on the overlay link match
//! what routes.json asks of this stack, and is the overlay link there and up?
//!
//! [`check_routes`] is pure (a desired state and a kernel dump in, counts and problems
//! out). The daemon runs it after every reconcile and publishes the counts in
//! `probes/<stack>.json`; `vrouter-router healthcheck` ([`healthcheck`]) runs it on its
//! own dump and its own read of routes.json, so a wedged daemon cannot look healthy
//! by leaving a good file behind.

use crate::apply;
use crate::desired::{compute, Computed, DesiredRouter, RouteStyle, RoutingState, MAIN_TABLE};
use crate::link::{self, OverlayLink};
use crate::settings::Settings;
use anyhow::Context;
use vrouter_kernel::Kernel;
use vrouter_state::{StackSpec, StateDir};

/// How the kernel compares with the desired routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteCheck {
    /// Routes the router accepted from routes.json (skipped ones excluded: they are
    /// refused on purpose and reported as events).
    pub desired: u32,
    /// Of those, the ones in the kernel as desired, with their gateway's permanent
    /// neighbour.
    pub installed: u32,
    /// One line per difference: missing or wrong routes and neighbours, and routes of
    /// ours (proto 118, main table) that routes.json no longer asks for.
    pub problems: Vec<String>,
}

impl RouteCheck {
    pub fn in_sync(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Compares the remote routes of `desired` with the kernel dump `observed` (see
/// [`apply::observe`]); `overlay` is the working overlay link's index (without one,
/// nothing can be installed). Routes are judged by where they forward: through a
/// nexthop object (looked up in `observed`) or with the gateway in the route, as the
/// router installs them on kernels without nexthop objects. Pure.
pub fn check_routes(
    desired: &DesiredRouter,
    overlay: Option<u32>,
    observed: &RoutingState,
) -> RouteCheck {
    let mut check = RouteCheck {
        desired: u32::try_from(desired.routes.len()).unwrap_or(u32::MAX),
        ..RouteCheck::default()
    };
    let Some(ovl) = overlay else {
        if !desired.routes.is_empty() {
            check.problems.push(format!(
                "{} route(s) cannot be installed without the overlay link",
                desired.routes.len()
            ));
        }
        return check;
    };
    let want = desired.routing_state(Some(ovl), RouteStyle::Plain);
    for ((table, dst), route) in &want.routes {
        let via = route.gateway.expect("plain remote routes have a gateway");
        let route_ok = match observed.routes.get(&(*table, *dst)) {
            Some(r) => match observed.forwarding(r) {
                Some(f) if f == (route.gateway, route.oif, route.onlink) => true,
                Some((gateway, oif, onlink)) => {
                    check.problems.push(format!(
                        "route to {dst} goes via {} dev #{}{}, routes.json says via {via} dev #{ovl} onlink",
                        gateway
                            .map(|g| g.to_string())
                            .unwrap_or_else(|| "-".into()),
                        oif.unwrap_or(0),
                        if onlink { " onlink" } else { "" }
                    ));
                    false
                }
                None => {
                    check.problems.push(format!(
                        "route to {dst} uses nexthop id {}, which is missing",
                        r.nexthop.unwrap_or(0)
                    ));
                    false
                }
            },
            None => {
                check
                    .problems
                    .push(format!("route to {dst} via {via} is missing"));
                false
            }
        };
        let mac = want.neighbours[&(ovl, via)];
        let neighbour_ok = match observed.neighbours.get(&(ovl, via)) {
            Some(m) if *m == mac => true,
            Some(m) => {
                check.problems.push(format!(
                    "neighbour {via} has MAC {m}, routes.json says {mac}"
                ));
                false
            }
            None => {
                check
                    .problems
                    .push(format!("permanent neighbour {via} ({mac}) is missing"));
                false
            }
        };
        if route_ok && neighbour_ok {
            check.installed += 1;
        }
    }
    for (table, dst) in observed.routes.keys() {
        if *table == MAIN_TABLE && !want.routes.contains_key(&(*table, *dst)) {
            check
                .problems
                .push(format!("route to {dst} is not in routes.json (stale)"));
        }
    }
    // A neighbour problem shows once per route using it.
    check.problems.dedup();
    check
}

/// The verdict of `vrouter-router healthcheck` from what it read. Pure. `Ok` carries a
/// one-line summary, `Err` the one-line reason.
pub fn verdict(
    own: &StackSpec,
    routes: Result<vrouter_state::RoutesFile, vrouter_state::ReadError>,
    overlay: &OverlayLink,
    ifname: &str,
    observed: &RoutingState,
) -> Result<String, String> {
    let index = match overlay {
        OverlayLink::Working { index, .. } => *index,
        OverlayLink::Absent => {
            return Err(format!(
                "overlay link {ifname} is gone (not attached by discovery, or deleted)"
            ))
        }
        OverlayLink::Broken { reason, .. } => {
            return Err(format!("overlay link {ifname} is not usable: {reason}"))
        }
    };
    let file = routes.map_err(|e| format!("cannot check the routes: {e}"))?;
    let desired = match compute(own, &file) {
        Computed::Listed { desired, .. } => desired,
        Computed::NotListed => {
            return Err(format!(
            "routes.json (generation {}) does not list stack {}: discovery has not registered it",
            file.generation, own.name
        ))
        }
    };
    let check = check_routes(&desired, Some(index), observed);
    if !check.in_sync() {
        return Err(format!(
            "routes diverge from routes.json generation {} ({} of {} installed): {}",
            file.generation,
            check.installed,
            check.desired,
            check.problems.join("; ")
        ));
    }
    Ok(format!(
        "ok: {ifname} up, {} route(s) as routes.json generation {} asks",
        check.installed, file.generation
    ))
}

/// A control loop that completes no reconcile for this many intervals is stuck.
pub const STALL_INTERVALS: u32 = 3;

/// Whether the router daemon's own loop is alive, from its probes file (`own`): the
/// file is rewritten every second by the daemon's probe task, and carries when the
/// loop last completed a reconcile. The kernel may still match routes.json while the
/// loop is stuck, so the routes alone cannot tell. No file (probes not written yet, or
/// an older router) says nothing. Pure.
pub fn loop_verdict(
    own: Option<&vrouter_state::ProbesFile>,
    now_ms: u64,
    interval: std::time::Duration,
) -> Result<(), String> {
    let Some(file) = own else {
        return Ok(());
    };
    let limit = u64::try_from((interval * STALL_INTERVALS).as_millis()).unwrap_or(u64::MAX);
    // The probe task writes at least every second.
    let file_age = now_ms.saturating_sub(file.updated_ms);
    if file_age > limit.max(3_000) + 1_000 {
        return Err(format!(
            "the router daemon has not rewritten probes/{}.json for {:.1} s: it is stuck or gone",
            file.stack,
            file_age as f64 / 1000.0
        ));
    }
    match file.health.as_ref().and_then(|h| h.reconciled_ms) {
        Some(at) if now_ms.saturating_sub(at) > limit => Err(format!(
            "the router's control loop has not completed a reconcile for {:.1} s ({STALL_INTERVALS} intervals of {:.1} s); it is stuck, see the router's log",
            now_ms.saturating_sub(at) as f64 / 1000.0,
            interval.as_secs_f64()
        )),
        _ => Ok(()),
    }
}

/// Whether the access policy is in force, from the router's probes file: while it
/// is closed (the policy could not be installed, nothing enters from the overlay)
/// the router is unhealthy. No file, or a router without a policy report, says
/// nothing. Pure.
pub fn acl_verdict(own: Option<&vrouter_state::ProbesFile>) -> Result<(), String> {
    let Some(acl) = own
        .and_then(|f| f.health.as_ref())
        .and_then(|h| h.acl.as_ref())
    else {
        return Ok(());
    };
    match &acl.closed {
        Some(reason) => Err(format!(
            "access policy not in force, nothing enters the stack from the overlay: {reason}"
        )),
        None => Ok(()),
    }
}

/// Whether the kernel holds the access policy: the rules of table `ip vrouter_acl`
/// as dumped (`vrouter_kernel::Nft::rule_counters`; none when the table is missing).
/// Pure.
pub fn acl_table_verdict(rules: &[vrouter_kernel::RuleCounterReading]) -> Result<(), String> {
    use crate::acl::compile::{COMMENT_CLOSED, TABLE};
    if rules.is_empty() {
        return Err(format!(
            "no access table (ip {TABLE}) in the router's namespace: the access policy is not enforced (the router is not running, or cannot install it; see its log)"
        ));
    }
    if rules.iter().any(|r| r.comment == COMMENT_CLOSED) {
        return Err(format!(
            "the closed access table is in force (ip {TABLE}): the policy could not be installed, nothing enters the stack from the overlay; see the acl_closed event"
        ));
    }
    Ok(())
}

/// `vrouter-router healthcheck`, run in the router's namespace (the image's
/// HEALTHCHECK): reads routes.json and the kernel itself, never the daemon's files.
pub async fn healthcheck(settings: &Settings) -> Result<String, String> {
    let run = async {
        let kernel = Kernel::connect().await.context("opening netlink")?;
        let s = link::surroundings(&kernel, settings).await?;
        let own = StackSpec {
            name: settings.stack.clone(),
            vni: settings.vni,
            prefixes: s.prefixes,
            router_ip: s.attachment.router_ip,
        };
        let ifname = settings.overlay_ifname();
        let overlay = link::overlay_link(&kernel, &ifname, own.router_mac())
            .await
            .with_context(|| format!("reading {ifname}"))?;
        let observed = apply::observe(&kernel, overlay.index())
            .await
            .context("dumping routes and neighbours")?;
        let acl_rules =
            vrouter_kernel::Nft::connect(crate::acl::compile::TABLE, crate::acl::compile::CHAIN)
                .and_then(|nft| nft.rule_counters())
                .map_err(|e| format!("cannot read the access table: {e}"));
        let dir = StateDir::open_readonly(&settings.state_dir)?;
        let routes = dir.read_routes();
        let probes = dir
            .read_all_probes()
            .into_iter()
            .find(|f| f.stack == own.name);
        anyhow::Ok(
            loop_verdict(
                probes.as_ref(),
                vrouter_state::now_ms(),
                settings.reconcile_interval,
            )
            .and_then(|()| acl_verdict(probes.as_ref()))
            .and_then(|()| acl_rules.and_then(|rules| acl_table_verdict(&rules)))
            .and_then(|()| verdict(&own, routes, &overlay, &ifname, &observed)),
        )
    };
    run.await.unwrap_or_else(|e| Err(format!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vrouter_state::{Mac, RemoteRoute, RoutesFile, StackName, StackRoutes, Vni};

    fn own() -> StackSpec {
        StackSpec {
            name: StackName::new("a").unwrap(),
            vni: Vni::new(1000).unwrap(),
            prefixes: vec!["10.1.0.0/24".parse().unwrap()],
            router_ip: "10.1.0.254".parse().unwrap(),
        }
    }

    fn route(prefix: &str, stack: &str, via: &str) -> RemoteRoute {
        let via: std::net::Ipv4Addr = via.parse().unwrap();
        RemoteRoute {
            prefix: prefix.parse().unwrap(),
            stack: StackName::new(stack).unwrap(),
            via,
            mac: Mac::for_router(Vni::new(1000).unwrap(), via),
            host: "198.18.0.2".parse().unwrap(),
            same_host: false,
        }
    }

    fn file(routes: Vec<RemoteRoute>) -> RoutesFile {
        let mut f = RoutesFile {
            schema: vrouter_state::SCHEMA_VERSION,
            generation: 4,
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

    fn desired(f: &RoutesFile) -> DesiredRouter {
        match compute(&own(), f) {
            Computed::Listed { desired, .. } => desired,
            Computed::NotListed => panic!("not listed"),
        }
    }

    const OVL: u32 = 7;

    fn two() -> RoutesFile {
        file(vec![
            route("10.2.0.0/24", "b", "10.2.0.254"),
            route("10.3.0.0/24", "c", "10.3.0.254"),
        ])
    }

    /// The kernel as the router leaves it.
    fn installed(d: &DesiredRouter) -> RoutingState {
        installed_as(d, RouteStyle::Nexthop)
    }

    fn installed_as(d: &DesiredRouter, style: RouteStyle) -> RoutingState {
        d.routing_state(Some(OVL), style)
    }

    #[test]
    fn in_sync_counts_every_route() {
        let d = desired(&two());
        // Through nexthop objects, or with gateways in the routes (a kernel without
        // nexthop objects, or a route put back by hand): the same forwarding.
        for style in [RouteStyle::Nexthop, RouteStyle::Plain] {
            let c = check_routes(&d, Some(OVL), &installed_as(&d, style));
            assert_eq!((c.desired, c.installed), (2, 2), "{style:?}");
            assert!(c.in_sync(), "{style:?}: {:?}", c.problems);
        }
        // Nothing desired, nothing installed: in sync.
        let empty = desired(&file(vec![]));
        let c = check_routes(&empty, Some(OVL), &RoutingState::default());
        assert_eq!((c.desired, c.installed, c.in_sync()), (0, 0, true));
    }

    #[test]
    fn missing_wrong_and_stale_objects_diverge() {
        let d = desired(&two());
        let b: vrouter_state::Prefix = "10.2.0.0/24".parse().unwrap();

        let mut k = installed(&d);
        k.routes.remove(&(MAIN_TABLE, b));
        let c = check_routes(&d, Some(OVL), &k);
        assert_eq!((c.desired, c.installed), (2, 1));
        assert_eq!(
            c.problems,
            vec!["route to 10.2.0.0/24 via 10.2.0.254 is missing"]
        );

        let mut k = installed_as(&d, RouteStyle::Plain);
        k.routes.get_mut(&(MAIN_TABLE, b)).unwrap().gateway = Some("10.2.0.9".parse().unwrap());
        let c = check_routes(&d, Some(OVL), &k);
        assert_eq!(c.installed, 1);
        assert!(
            c.problems[0].contains("goes via 10.2.0.9"),
            "{:?}",
            c.problems
        );

        // A nexthop object pointing elsewhere, or gone.
        let id = crate::desired::nexthop_id("10.2.0.254".parse().unwrap()).unwrap();
        let mut k = installed(&d);
        k.nexthops.get_mut(&id).unwrap().onlink = false;
        let c = check_routes(&d, Some(OVL), &k);
        assert_eq!(c.installed, 1);
        assert_eq!(
            c.problems,
            vec!["route to 10.2.0.0/24 goes via 10.2.0.254 dev #7, routes.json says via 10.2.0.254 dev #7 onlink"]
        );
        k.nexthops.remove(&id);
        let c = check_routes(&d, Some(OVL), &k);
        assert_eq!(
            c.problems,
            vec![format!(
                "route to 10.2.0.0/24 uses nexthop id {id}, which is missing"
            )]
        );

        let mut k = installed(&d);
        k.neighbours.remove(&(OVL, "10.3.0.254".parse().unwrap()));
        let c = check_routes(&d, Some(OVL), &k);
        assert_eq!(c.installed, 1);
        assert!(
            c.problems[0].contains("neighbour 10.3.0.254"),
            "{:?}",
            c.problems
        );

        let mut k = installed(&d);
        k.neighbours
            .insert((OVL, "10.3.0.254".parse().unwrap()), Mac::ZERO);
        assert!(check_routes(&d, Some(OVL), &k).problems[0].contains("has MAC"));

        // A route routes.json no longer lists: everything desired is there, but the
        // kernel diverges.
        let one = desired(&file(vec![route("10.2.0.0/24", "b", "10.2.0.254")]));
        let c = check_routes(&one, Some(OVL), &installed(&d));
        assert_eq!((c.desired, c.installed), (1, 1));
        assert_eq!(
            c.problems,
            vec!["route to 10.3.0.0/24 is not in routes.json (stale)"]
        );

        // No overlay link: nothing is installed.
        let c = check_routes(&d, None, &installed(&d));
        assert_eq!((c.desired, c.installed, c.in_sync()), (2, 0, false));
    }

    #[test]
    fn verdicts() {
        let d = desired(&two());
        let up = OverlayLink::Working {
            index: OVL,
            mtu: 1450,
        };
        let ok = verdict(&own(), Ok(two()), &up, "ovl1000", &installed(&d)).unwrap();
        assert_eq!(
            ok,
            "ok: ovl1000 up, 2 route(s) as routes.json generation 4 asks"
        );

        let e = verdict(
            &own(),
            Ok(two()),
            &OverlayLink::Absent,
            "ovl1000",
            &installed(&d),
        )
        .unwrap_err();
        assert!(e.contains("ovl1000 is gone"), "{e}");
        let broken = OverlayLink::Broken {
            index: OVL,
            reason: "ovl1000 is down".into(),
        };
        let e = verdict(&own(), Ok(two()), &broken, "ovl1000", &installed(&d)).unwrap_err();
        assert!(e.contains("not usable: ovl1000 is down"), "{e}");

        let mut k = installed(&d);
        k.routes
            .remove(&(MAIN_TABLE, "10.3.0.0/24".parse().unwrap()));
        let e = verdict(&own(), Ok(two()), &up, "ovl1000", &k).unwrap_err();
        assert!(
            e.starts_with("routes diverge from routes.json generation 4 (1 of 2 installed)")
                && e.contains("10.3.0.0/24"),
            "{e}"
        );
        assert!(!e.contains('\n'));

        let missing = Err(vrouter_state::ReadError::Missing {
            path: "/s/routes.json".into(),
        });
        let e = verdict(&own(), missing, &up, "ovl1000", &installed(&d)).unwrap_err();
        assert!(e.contains("routes.json"), "{e}");

        let mut other = two();
        other.stacks.clear();
        let e = verdict(&own(), Ok(other), &up, "ovl1000", &installed(&d)).unwrap_err();
        assert!(e.contains("does not list stack a"), "{e}");
    }

    #[test]
    fn a_closed_access_policy_fails_the_healthcheck() {
        let mut file: vrouter_state::ProbesFile = serde_json::from_str(
            r#"{"schema":1,"generation":1,"stack":"a","updated_ms":1,"interval_ms":1000,"peers":[],
                "health":{"routes_desired":0,"routes_installed":0,"drift_repaired":0,"overlay_link_up":true}}"#,
        )
        .unwrap();
        assert_eq!(acl_verdict(None), Ok(()));
        assert_eq!(acl_verdict(Some(&file)), Ok(()), "no policy report");
        let acl = vrouter_state::AclHealth {
            default: "deny".into(),
            rules: 2,
            generation: 4,
            ..Default::default()
        };
        file.health.as_mut().unwrap().acl = Some(acl.clone());
        assert_eq!(acl_verdict(Some(&file)), Ok(()));
        file.health.as_mut().unwrap().acl = Some(vrouter_state::AclHealth {
            closed: Some("the kernel refused the table (EINVAL)".into()),
            ..acl
        });
        let e = acl_verdict(Some(&file)).unwrap_err();
        assert_eq!(
            e,
            "access policy not in force, nothing enters the stack from the overlay: the kernel refused the table (EINVAL)"
        );
    }

    #[test]
    fn the_kernel_must_hold_the_policy_table_not_the_closed_one() {
        let rule = |comment: &str| vrouter_kernel::RuleCounterReading {
            chain: "forward".into(),
            handle: 4,
            comment: comment.into(),
            packets: 0,
            bytes: 0,
        };
        let e = acl_table_verdict(&[]).unwrap_err();
        assert!(e.starts_with("no access table (ip vrouter_acl)"), "{e}");
        let policy = [
            rule("acl spoof-from-stack"),
            rule("acl admitted"),
            rule("acl fallback"),
        ];
        assert_eq!(acl_table_verdict(&policy), Ok(()));
        // The default policy's stateless table holds the policy too.
        let stateless: Vec<_> = crate::acl::compile::stateless(&Default::default()).chains[0]
            .rules
            .iter()
            .map(|r| rule(&r.comment))
            .collect();
        assert_eq!(stateless.len(), 3);
        assert_eq!(acl_table_verdict(&stateless), Ok(()));
        let closed = [rule("acl spoof-from-stack"), rule("acl closed")];
        let e = acl_table_verdict(&closed).unwrap_err();
        assert!(e.contains("closed access table is in force"), "{e}");
    }

    #[test]
    fn a_stuck_loop_or_a_silent_daemon_fails_the_healthcheck() {
        let interval = std::time::Duration::from_secs(2);
        let now = 1_700_000_100_000u64;
        let file = |updated_ms: u64, reconciled_ms: Option<u64>| vrouter_state::ProbesFile {
            schema: 1,
            generation: 1,
            stack: StackName::new("a").unwrap(),
            updated_ms,
            interval_ms: 1000,
            peers: Vec::new(),
            health: Some(vrouter_state::RouterHealth {
                routes_desired: 0,
                routes_installed: 0,
                drift_repaired: 0,
                overlay_link_up: true,
                last_error: None,
                traffic_error: None,
                reconciled_ms,
                acl: None,
            }),
            traffic: Vec::new(),
            events: None,
            acl: Vec::new(),
        };
        assert_eq!(loop_verdict(None, now, interval), Ok(()));
        assert_eq!(
            loop_verdict(Some(&file(now, Some(now - 6_000))), now, interval),
            Ok(())
        );
        assert_eq!(loop_verdict(Some(&file(now, None)), now, interval), Ok(()));
        let e = loop_verdict(Some(&file(now - 500, Some(now - 6_001))), now, interval).unwrap_err();
        assert!(e.contains("has not completed a reconcile for 6.0 s"), "{e}");
        let e =
            loop_verdict(Some(&file(now - 8_000, Some(now - 1_000))), now, interval).unwrap_err();
        assert!(e.contains("has not rewritten probes/a.json"), "{e}");
    }
}
