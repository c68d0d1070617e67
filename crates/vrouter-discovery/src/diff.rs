//! Pure differences between the desired host state and a dump of the kernel, as an
//! ordered list of changes. Applying the list is the only kernel-touching step.

use crate::desired::{Desired, FdbRow};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use vrouter_kernel::{Link, Route, Rule};
use vrouter_state::{Prefix, StackName, StackRoutes, Vni};

/// What the VXLAN device of a VNI should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub vni: Vni,
    /// The source address of its packets: the underlay address, or None with
    /// encryption on (the kernel picks the tunnel address for packets that go through
    /// WireGuard and the underlay address for the others, by route).
    pub local: Option<Ipv4Addr>,
    pub underlay: u32,
    pub port: u16,
    pub mtu: u32,
    pub learning: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceAction {
    Create,
    Keep,
    /// Fix in place: these keep the device (and every router's macvlan on it).
    /// `local`: the new local address, 0.0.0.0 to remove it.
    Adjust {
        local: Option<Ipv4Addr>,
        mtu: Option<u32>,
        up: bool,
    },
    /// Must be deleted and created again; `why` goes into the event.
    Replace {
        why: String,
    },
}

/// Reuse a matching device, adjust what can change in place, replace only what cannot
/// (port, VNI, underlay device, learning, or a non-VXLAN link holding the name).
pub fn device_action(want: &DeviceSpec, have: Option<&Link>) -> DeviceAction {
    let Some(link) = have else {
        return DeviceAction::Create;
    };
    let Some(vx) = link
        .vxlan
        .as_ref()
        .filter(|_| link.kind.as_deref() == Some("vxlan"))
    else {
        return DeviceAction::Replace {
            why: format!(
                "link {} is a {} device, not VXLAN",
                link.name,
                link.kind.as_deref().unwrap_or("plain")
            ),
        };
    };
    let mut why = Vec::new();
    if vx.vni != want.vni {
        why.push(format!("VNI {} instead of {}", vx.vni, want.vni));
    }
    if vx.port != want.port {
        why.push(format!("UDP port {} instead of {}", vx.port, want.port));
    }
    if vx.underlay != Some(want.underlay) {
        why.push("another underlay device".to_string());
    }
    if vx.learning != want.learning {
        why.push(format!(
            "learning {} instead of {}",
            vx.learning, want.learning
        ));
    }
    if !why.is_empty() {
        return DeviceAction::Replace {
            why: format!("{} has {}", link.name, why.join(", ")),
        };
    }
    let local = (vx.local != want.local).then_some(want.local.unwrap_or(Ipv4Addr::UNSPECIFIED));
    let mtu = (link.mtu != want.mtu).then_some(want.mtu);
    if local.is_none() && mtu.is_none() && link.up {
        DeviceAction::Keep
    } else {
        DeviceAction::Adjust {
            local,
            mtu,
            up: !link.up,
        }
    }
}

/// A change to the host's FDB or steering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Append a flood-list destination (all-zeros MAC).
    AppendFlood(FdbRow),
    /// Replace a router's permanent row (MAC -> host).
    ReplaceRouterRow(FdbRow),
    DeleteFdb(FdbRow),
    ReplaceRoute(Route),
    DeleteRoute(Route),
    AddRule(Rule),
    DeleteRule(Rule),
}

/// FDB changes. Router rows are keyed by (VNI, MAC): a moved router is one replace.
pub fn diff_fdb(desired: &BTreeSet<FdbRow>, observed: &BTreeSet<FdbRow>) -> Vec<Change> {
    let mut out = Vec::new();
    let want_router: BTreeMap<(Vni, vrouter_state::Mac), Ipv4Addr> = desired
        .iter()
        .filter(|r| !r.is_flood())
        .map(|r| ((r.vni, r.mac), r.dst))
        .collect();
    for row in desired {
        if observed.contains(row) {
            continue;
        }
        out.push(if row.is_flood() {
            Change::AppendFlood(*row)
        } else {
            Change::ReplaceRouterRow(*row)
        });
    }
    for row in observed {
        if desired.contains(row) {
            continue;
        }
        // A router row whose MAC is still wanted elsewhere is overwritten by the
        // replace above; deleting it too would race with that replace.
        if !row.is_flood() && want_router.contains_key(&(row.vni, row.mac)) {
            continue;
        }
        out.push(Change::DeleteFdb(*row));
    }
    out
}

/// Steering changes, ordered so that no packet meets a rule without its routes: routes
/// are installed before rules, and rules removed before routes.
pub fn diff_steering(
    want_rules: &BTreeSet<Rule>,
    want_routes: &BTreeSet<Route>,
    have_rules: &BTreeSet<Rule>,
    have_routes: &BTreeSet<Route>,
) -> Vec<Change> {
    let mut out = Vec::new();
    let want_keys: BTreeSet<(u32, Prefix)> = want_routes.iter().map(|r| (r.table, r.dst)).collect();
    for r in want_routes.difference(have_routes) {
        out.push(Change::ReplaceRoute(r.clone()));
    }
    for r in want_rules.difference(have_rules) {
        out.push(Change::AddRule(r.clone()));
    }
    for r in have_rules.difference(want_rules) {
        out.push(Change::DeleteRule(r.clone()));
    }
    for r in have_routes.difference(want_routes) {
        if !want_keys.contains(&(r.table, r.dst)) {
            out.push(Change::DeleteRoute(r.clone()));
        }
    }
    out
}

/// A route routes.json gained or lost for a local stack, with its cause (the event's
/// `reason`): `announced`; or withdrawn because the local stack is gone
/// (`local_stack_gone`), the remote stack or prefix was refused (`conflict_refused`),
/// its FDB row is not in the kernel (`fdb_row_missing`), or it is no longer announced
/// (`stack_gone`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteChange {
    /// The local stack whose routes changed.
    pub stack: StackName,
    pub prefix: Prefix,
    /// The stack that owns the prefix.
    pub from: StackName,
    pub added: bool,
    pub reason: &'static str,
}

/// Compares two generations of routes.json's stacks. Pure.
pub fn route_changes(
    old: &BTreeMap<StackName, StackRoutes>,
    new: &BTreeMap<StackName, StackRoutes>,
    want: &Desired,
) -> Vec<RouteChange> {
    let key = |r: &vrouter_state::RemoteRoute| (r.prefix, r.stack.clone());
    let routes = |m: &BTreeMap<StackName, StackRoutes>, s: &StackName| -> BTreeSet<_> {
        m.get(s)
            .map(|s| s.routes.iter().map(key).collect())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    let stacks: BTreeSet<&StackName> = new.keys().chain(old.keys()).collect();
    for stack in stacks {
        let (was, now) = (routes(old, stack), routes(new, stack));
        for (prefix, from) in now.difference(&was) {
            out.push(RouteChange {
                stack: stack.clone(),
                prefix: *prefix,
                from: from.clone(),
                added: true,
                reason: "announced",
            });
        }
        for (prefix, from) in was.difference(&now) {
            let reason = if !new.contains_key(stack) {
                "local_stack_gone"
            } else if want
                .refusals
                .iter()
                .any(|r| &r.stack == from && r.prefix.is_none_or(|q| q == *prefix))
            {
                "conflict_refused"
            } else if want
                .candidates
                .get(stack)
                .is_some_and(|c| c.iter().any(|r| r.prefix == *prefix && &r.stack == from))
            {
                "fdb_row_missing"
            } else {
                "stack_gone"
            };
            out.push(RouteChange {
                stack: stack.clone(),
                prefix: *prefix,
                from: from.clone(),
                added: false,
                reason,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vrouter_kernel::VxlanInfo;
    use vrouter_state::{Mac, RTPROT_VROUTER};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn vni(v: u32) -> Vni {
        Vni::new(v).unwrap()
    }

    fn want() -> DeviceSpec {
        DeviceSpec {
            vni: vni(1000),
            local: Some(ip("198.18.0.1")),
            underlay: 2,
            port: 4789,
            mtu: 1450,
            learning: false,
        }
    }

    fn link(info: VxlanInfo, mtu: u32, up: bool) -> Link {
        Link {
            index: 7,
            name: "vxlan1000".into(),
            kind: Some("vxlan".into()),
            mac: None,
            mtu,
            up,
            parent: None,
            vxlan: Some(info),
            alias: None,
        }
    }

    fn info() -> VxlanInfo {
        VxlanInfo {
            vni: vni(1000),
            local: Some(ip("198.18.0.1")),
            underlay: Some(2),
            port: 4789,
            learning: false,
        }
    }

    #[test]
    fn device_reuse_adjust_replace() {
        assert_eq!(device_action(&want(), None), DeviceAction::Create);
        assert_eq!(
            device_action(&want(), Some(&link(info(), 1450, true))),
            DeviceAction::Keep
        );
        let moved = VxlanInfo {
            local: Some(ip("198.18.0.9")),
            ..info()
        };
        assert_eq!(
            device_action(&want(), Some(&link(moved, 1400, false))),
            DeviceAction::Adjust {
                local: Some(ip("198.18.0.1")),
                mtu: Some(1450),
                up: true
            }
        );
        let port = VxlanInfo {
            port: 8472,
            ..info()
        };
        match device_action(&want(), Some(&link(port, 1450, true))) {
            DeviceAction::Replace { why } => assert!(why.contains("UDP port 8472"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Encryption turned on: the local address is removed in place and the MTU
        // lowered; turned off again, both come back. The device and its FDB stay.
        let unbound = DeviceSpec {
            local: None,
            mtu: 1370,
            ..want()
        };
        assert_eq!(
            device_action(&unbound, Some(&link(info(), 1450, true))),
            DeviceAction::Adjust {
                local: Some(Ipv4Addr::UNSPECIFIED),
                mtu: Some(1370),
                up: false
            }
        );
        let none = VxlanInfo {
            local: None,
            ..info()
        };
        assert_eq!(
            device_action(&unbound, Some(&link(none.clone(), 1370, true))),
            DeviceAction::Keep
        );
        assert_eq!(
            device_action(&want(), Some(&link(none, 1370, true))),
            DeviceAction::Adjust {
                local: Some(ip("198.18.0.1")),
                mtu: Some(1450),
                up: false
            }
        );
        let mut dummy = link(info(), 1450, true);
        dummy.kind = Some("dummy".into());
        dummy.vxlan = None;
        assert!(matches!(
            device_action(&want(), Some(&dummy)),
            DeviceAction::Replace { .. }
        ));
    }

    fn row(mac: Mac, dst: &str) -> FdbRow {
        FdbRow {
            vni: vni(1000),
            mac,
            dst: ip(dst),
        }
    }

    #[test]
    fn fdb_diff_adds_removes_and_moves() {
        let m = Mac::for_router(vni(1000), ip("10.2.0.254"));
        let desired: BTreeSet<_> = [row(Mac::ZERO, "198.18.0.2"), row(m, "198.18.0.3")].into();
        let observed: BTreeSet<_> = [row(Mac::ZERO, "198.18.0.4"), row(m, "198.18.0.2")].into();
        let c = diff_fdb(&desired, &observed);
        assert_eq!(
            c,
            vec![
                Change::AppendFlood(row(Mac::ZERO, "198.18.0.2")),
                Change::ReplaceRouterRow(row(m, "198.18.0.3")),
                Change::DeleteFdb(row(Mac::ZERO, "198.18.0.4")),
            ]
        );
        assert!(diff_fdb(&desired, &desired).is_empty());
    }

    fn route(table: u32, dst: &str, gw: &str) -> Route {
        Route {
            table,
            dst: dst.parse().unwrap(),
            gateway: Some(ip(gw)),
            oif: Some(10),
            onlink: false,
            protocol: RTPROT_VROUTER,
            nexthop: None,
        }
    }

    fn rule(iif: &str, table: u32) -> Rule {
        Rule {
            priority: 1000,
            iif: Some(iif.into()),
            fwmark: None,
            table,
            protocol: RTPROT_VROUTER,
        }
    }

    #[test]
    fn steering_order_and_replace() {
        let want_routes: BTreeSet<_> = [route(5, "10.2.0.0/24", "10.1.0.254")].into();
        let want_rules: BTreeSet<_> = [rule("br-a", 5)].into();
        let c = diff_steering(
            &want_rules,
            &want_routes,
            &BTreeSet::new(),
            &BTreeSet::new(),
        );
        assert!(matches!(c[0], Change::ReplaceRoute(_)) && matches!(c[1], Change::AddRule(_)));

        // gateway changed: one replace, no delete of the same (table, dst)
        let have_routes: BTreeSet<_> = [
            route(5, "10.2.0.0/24", "10.1.0.253"),
            route(6, "10.9.0.0/24", "10.1.0.254"),
        ]
        .into();
        let have_rules: BTreeSet<_> = [rule("br-a", 5), rule("br-old", 6)].into();
        let c = diff_steering(&want_rules, &want_routes, &have_rules, &have_routes);
        assert_eq!(
            c,
            vec![
                Change::ReplaceRoute(route(5, "10.2.0.0/24", "10.1.0.254")),
                Change::DeleteRule(rule("br-old", 6)),
                Change::DeleteRoute(route(6, "10.9.0.0/24", "10.1.0.254")),
            ]
        );
        assert!(diff_steering(&want_rules, &want_routes, &want_rules, &want_routes).is_empty());
    }

    #[test]
    fn route_changes_name_their_cause() {
        let name = |s: &str| StackName::new(s).unwrap();
        let route = |prefix: &str, from: &str| vrouter_state::RemoteRoute {
            prefix: prefix.parse().unwrap(),
            stack: name(from),
            via: ip("10.9.9.254"),
            mac: Mac::ZERO,
            host: ip("198.18.0.2"),
            same_host: false,
        };
        let file = |stacks: Vec<(&str, Vec<vrouter_state::RemoteRoute>)>| {
            stacks
                .into_iter()
                .map(|(s, routes)| (name(s), StackRoutes { vni: None, routes }))
                .collect::<BTreeMap<_, _>>()
        };
        let old = file(vec![
            (
                "a",
                vec![
                    route("10.2.0.0/24", "b"),
                    route("10.3.0.0/24", "c"),
                    route("10.4.0.0/24", "d"),
                    route("10.5.0.0/24", "e"),
                ],
            ),
            ("gone", vec![route("10.2.0.0/24", "b")]),
        ]);
        let new = file(vec![(
            "a",
            vec![route("10.2.0.0/24", "b"), route("10.6.0.0/24", "f")],
        )]);
        let want = Desired {
            refusals: vec![vrouter_state::Refusal {
                stack: name("c"),
                prefix: None,
                reason: String::new(),
                code: "router_ip_clash".into(),
            }],
            candidates: [(name("a"), vec![route("10.4.0.0/24", "d")])].into(),
            ..Desired::default()
        };
        let got: Vec<(String, String, bool, &str)> = route_changes(&old, &new, &want)
            .into_iter()
            .map(|c| {
                (
                    c.stack.to_string(),
                    format!("{} {}", c.from, c.prefix),
                    c.added,
                    c.reason,
                )
            })
            .collect();
        let s = |x: &str| x.to_string();
        assert_eq!(
            got,
            vec![
                (s("a"), s("f 10.6.0.0/24"), true, "announced"),
                (s("a"), s("c 10.3.0.0/24"), false, "conflict_refused"),
                (s("a"), s("d 10.4.0.0/24"), false, "fdb_row_missing"),
                (s("a"), s("e 10.5.0.0/24"), false, "stack_gone"),
                (s("gone"), s("b 10.2.0.0/24"), false, "local_stack_gone"),
            ]
        );
    }
}
