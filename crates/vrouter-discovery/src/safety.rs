//! Prefix safety: what no stack may announce, local or remote alike, and the router
//! address every stack must have. Pure; [`crate::desired::compute`] applies it to
//! every stack, so a refused prefix or stack is never routed, never gets an FDB row and
//! is reported once as a `conflict_refused` event with the code below.

use std::net::Ipv4Addr;
use vrouter_state::{Prefix, Refusal, StackSpec};

/// Ranges that are never a stack's network, with what they are.
pub const RESERVED: &[(Ipv4Addr, u8, &str)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8, "\"this network\" (0.0.0.0/8)"),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback (127.0.0.0/8)"),
    (
        Ipv4Addr::new(169, 254, 0, 0),
        16,
        "link-local (169.254.0.0/16, which holds cloud metadata services)",
    ),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast (224.0.0.0/4)"),
    (
        Ipv4Addr::new(240, 0, 0, 0),
        4,
        "reserved and broadcast (240.0.0.0/4)",
    ),
];

/// The host's networks a stack's prefix must not cover.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostNetworks<'a> {
    /// The underlay's network (VXLAN and gossip packets travel on it).
    pub underlay: Option<Prefix>,
    /// The host's other networks: every interface's subnet except the stack's own
    /// bridge (for a remote stack: except every local stack's bridge, whose prefixes
    /// the overlap rule settles mesh-wide).
    pub others: &'a [Prefix],
}

fn refusal(spec: &StackSpec, prefix: Option<Prefix>, code: &str, reason: String) -> Refusal {
    Refusal {
        stack: spec.name.clone(),
        prefix,
        reason,
        code: code.into(),
    }
}

/// Whole-stack checks that need no other stack: the router address must lie in one of
/// the stack's prefixes (its MAC and FDB row are derived from it; outside them it would
/// claim another network's address).
pub fn check_stack(spec: &StackSpec) -> Option<Refusal> {
    if spec.prefixes.iter().any(|p| p.contains(spec.router_ip)) {
        return None;
    }
    Some(refusal(
        spec,
        None,
        "router_outside_prefixes",
        format!(
            "stack {} has router address {}, outside its prefixes {}; the router must sit in its own stack network (set VROUTER_PREFIXES or router_ip to match)",
            spec.name,
            spec.router_ip,
            spec.prefixes
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// One prefix of `spec`: the default route, reserved ranges and the host's networks are
/// refused.
pub fn check_prefix(spec: &StackSpec, prefix: Prefix, host: HostNetworks) -> Option<Refusal> {
    let name = &spec.name;
    if prefix.is_default() {
        return Some(refusal(spec, Some(prefix), "default_route", format!(
            "stack {name} announces the default route {prefix}; announce the stack's own subnets only"
        )));
    }
    for (addr, len, what) in RESERVED {
        let range = Prefix::containing(*addr, *len);
        if range.overlaps(&prefix) {
            return Some(refusal(spec, Some(prefix), "reserved_prefix", format!(
                "prefix {prefix} of stack {name} covers {what}, which is never routed to a stack; announce the stack's own subnet"
            )));
        }
    }
    if let Some(u) = host.underlay.filter(|u| u.overlaps(&prefix)) {
        return Some(refusal(spec, Some(prefix), "underlay_network", format!(
            "prefix {prefix} of stack {name} overlaps this host's underlay network {u}; routing it would capture the tunnel's own packets, renumber the stack"
        )));
    }
    if let Some(n) = host.others.iter().find(|n| n.overlaps(&prefix)) {
        return Some(refusal(
            spec,
            Some(prefix),
            "host_network",
            format!(
                "prefix {prefix} of stack {name} overlaps this host's network {n}; renumber one of them"
            ),
        ));
    }
    None
}

/// A stack whose router address (and so its MAC) another stack on the same VNI
/// already uses: two FDB rows for one MAC would flap on every reconcile. `owner` is
/// the stack that keeps the address.
pub fn router_clash(spec: &StackSpec, owner: &StackSpec) -> Refusal {
    refusal(
        spec,
        None,
        "router_ip_clash",
        format!(
            "stack {} uses router address {} on VNI {}, which stack {} already uses; give every router its own address",
            spec.name, spec.router_ip, spec.vni, owner.name
        ),
    )
}

/// A router registering on this host with the address another local stack's router
/// already has on the VNI: both would get the same MAC and the same macvlan name, and
/// attaching the second would delete the first's link. Refused at registration.
pub fn registration_clash<'a>(
    spec: &StackSpec,
    registered: impl IntoIterator<Item = &'a StackSpec>,
) -> Option<Refusal> {
    registered
        .into_iter()
        .find(|o| o.name != spec.name && o.vni == spec.vni && o.router_ip == spec.router_ip)
        .map(|owner| router_clash(spec, owner))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vrouter_state::{StackName, Vni};

    fn spec(prefixes: &[&str], router: &str) -> StackSpec {
        StackSpec {
            name: StackName::new("s").unwrap(),
            vni: Vni::new(1000).unwrap(),
            prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
            router_ip: router.parse().unwrap(),
        }
    }

    fn code(spec: &StackSpec, prefix: &str, host: HostNetworks) -> Option<String> {
        check_prefix(spec, prefix.parse().unwrap(), host).map(|r| r.code)
    }

    #[test]
    fn reserved_ranges_and_anything_covering_them_are_refused() {
        let s = spec(&["10.1.0.0/24"], "10.1.0.254");
        let none = HostNetworks::default();
        for (p, want) in [
            ("0.0.0.0/0", Some("default_route")),
            ("0.0.0.0/8", Some("reserved_prefix")),
            ("0.0.0.0/1", Some("reserved_prefix")),
            ("127.0.0.0/8", Some("reserved_prefix")),
            ("127.0.0.1/32", Some("reserved_prefix")),
            ("169.254.169.254/32", Some("reserved_prefix")),
            ("169.254.0.0/16", Some("reserved_prefix")),
            ("224.0.0.0/4", Some("reserved_prefix")),
            ("239.1.2.0/24", Some("reserved_prefix")),
            ("240.0.0.0/4", Some("reserved_prefix")),
            ("255.255.255.255/32", Some("reserved_prefix")),
            ("128.0.0.0/1", Some("reserved_prefix")),
            ("10.1.0.0/24", None),
            ("1.0.0.0/8", None),
            ("126.0.0.0/8", None),
            ("169.253.0.0/16", None),
            ("223.255.255.0/24", None),
        ] {
            assert_eq!(code(&s, p, none).as_deref(), want, "{p}");
        }
        let r = check_prefix(&s, "169.254.0.0/16".parse().unwrap(), none).unwrap();
        assert!(
            r.reason.contains("cloud metadata") && r.reason.contains("stack s"),
            "{}",
            r.reason
        );
    }

    #[test]
    fn the_underlay_and_the_hosts_other_networks_are_refused() {
        let s = spec(&["10.1.0.0/24"], "10.1.0.254");
        let others = ["172.17.0.0/16".parse().unwrap()];
        let host = HostNetworks {
            underlay: Some("198.18.0.0/24".parse().unwrap()),
            others: &others,
        };
        assert_eq!(
            code(&s, "198.18.0.0/16", host).as_deref(),
            Some("underlay_network")
        );
        assert_eq!(
            code(&s, "198.18.0.7/32", host).as_deref(),
            Some("underlay_network")
        );
        assert_eq!(
            code(&s, "172.16.0.0/12", host).as_deref(),
            Some("host_network")
        );
        assert_eq!(code(&s, "10.1.0.0/24", host), None);
    }

    #[test]
    fn the_router_must_sit_in_the_stacks_prefixes() {
        assert!(check_stack(&spec(&["10.1.0.0/24"], "10.1.0.254")).is_none());
        assert!(check_stack(&spec(&["10.9.0.0/24", "10.1.0.0/24"], "10.1.0.254")).is_none());
        let r = check_stack(&spec(&["10.9.0.0/24"], "10.1.0.254")).unwrap();
        assert_eq!(
            (r.code.as_str(), r.prefix),
            ("router_outside_prefixes", None)
        );
        assert!(
            r.reason.contains("10.1.0.254") && r.reason.contains("10.9.0.0/24"),
            "{}",
            r.reason
        );
    }

    #[test]
    fn a_second_local_router_with_a_taken_address_is_refused() {
        let named = |name: &str, vni: u32, router: &str| StackSpec {
            name: StackName::new(name).unwrap(),
            vni: Vni::new(vni).unwrap(),
            ..spec(&["10.1.0.0/24"], router)
        };
        let a = named("a", 1000, "10.1.0.254");
        let registered = [a.clone(), named("c", 2000, "10.1.0.253")];
        // The same stack again (a router restart) is not a clash, nor another VNI.
        assert!(registration_clash(&a, &registered).is_none());
        assert!(registration_clash(&named("x", 2000, "10.1.0.254"), &registered).is_none());
        let r = registration_clash(&named("x", 1000, "10.1.0.254"), &registered).unwrap();
        assert_eq!(r.code, "router_ip_clash");
        assert!(r.reason.contains("stack a already uses"), "{}", r.reason);
    }
}
