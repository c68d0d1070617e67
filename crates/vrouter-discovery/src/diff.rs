//! Pure differences between the desired host state and a dump of the kernel, as an
//! ordered list of changes. Applying the list is the only kernel-touching step.

use crate::desired::FdbRow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use vrouter_kernel::{Link, Route, Rule};
use vrouter_state::{Prefix, Vni};

/// What the VXLAN device of a VNI should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub vni: Vni,
    pub local: Ipv4Addr,
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
    let local = (vx.local != Some(want.local)).then_some(want.local);
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
            local: ip("198.18.0.1"),
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
}
