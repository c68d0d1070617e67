//! Tunnel addresses: each host's address on the WireGuard interface, derived from its
//! underlay address so that no one configures them. Pure.
//!
//! offset = u32(underlay) mod (range size), skipping the range's network and broadcast
//! offsets (probing upward, wrapping): 198.18.0.2 is 10.255.0.2 in 10.255.0.0/16. Two
//! hosts that derive the same address collide; the one with the lower underlay address
//! keeps it and the other takes the next free offset. Every host applies the rule to
//! the same set of underlay addresses and so reaches the same assignment.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use vrouter_state::Prefix;

/// Number of addresses in `range` (ranges are /30 or larger, settings refuse smaller).
fn size(range: Prefix) -> u64 {
    1u64 << (32 - u32::from(range.prefix_len()))
}

fn at(range: Prefix, offset: u64) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(range.addr()).wrapping_add(offset as u32))
}

/// The next offset after `offset` that is neither the network nor the broadcast one.
fn next_usable(range: Prefix, offset: u64) -> u64 {
    let n = size(range);
    let mut o = (offset + 1) % n;
    if o == 0 || o == n - 1 {
        o = 1;
    }
    o
}

/// The offset `underlay` derives in `range`, before any collision.
fn derived_offset(range: Prefix, underlay: Ipv4Addr) -> u64 {
    let n = size(range);
    let o = u64::from(u32::from(underlay)) % n;
    if o == 0 || o == n - 1 {
        next_usable(range, o)
    } else {
        o
    }
}

/// The address `underlay` derives in `range`, before any collision.
pub fn derive(range: Prefix, underlay: Ipv4Addr) -> Ipv4Addr {
    at(range, derived_offset(range, underlay))
}

/// Two or more hosts that derive the same address: the first keeps it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Collision {
    pub address: Ipv4Addr,
    /// Underlay addresses, the keeper first.
    pub hosts: Vec<Ipv4Addr>,
}

/// Every host's tunnel address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    pub addresses: BTreeMap<Ipv4Addr, Ipv4Addr>,
    pub collisions: Vec<Collision>,
    /// Hosts left without an address: the range is full.
    pub unassigned: Vec<Ipv4Addr>,
}

/// Assigns addresses to `hosts` (underlay addresses): in ascending order, each takes
/// its derived address, or the next free one if a lower host holds it.
pub fn assign(range: Prefix, hosts: &BTreeSet<Ipv4Addr>) -> Assignment {
    let usable = size(range) - 2;
    let mut taken: BTreeMap<u64, Ipv4Addr> = BTreeMap::new();
    let mut out = Assignment::default();
    let mut collided: BTreeMap<Ipv4Addr, Vec<Ipv4Addr>> = BTreeMap::new();
    for &host in hosts {
        if taken.len() as u64 >= usable {
            out.unassigned.push(host);
            continue;
        }
        let first = derived_offset(range, host);
        let mut o = first;
        if let Some(keeper) = taken.get(&first) {
            collided
                .entry(at(range, first))
                .or_insert_with(|| vec![*keeper])
                .push(host);
        }
        // Bounded: fewer than `usable` offsets are taken, so a free one is found
        // within `usable` steps.
        while taken.contains_key(&o) {
            o = next_usable(range, o);
        }
        taken.insert(o, host);
        out.addresses.insert(host, at(range, o));
    }
    out.collisions = collided
        .into_iter()
        .map(|(address, hosts)| Collision { address, hosts })
        .collect();
    out
}

/// What the tunnel range must stay clear of.
#[derive(Debug, Clone, Default)]
pub struct Neighbourhood<'a> {
    pub underlay: Option<Prefix>,
    /// The host's interface networks (the WireGuard device's own excluded).
    pub host_networks: &'a [Prefix],
    /// Stack prefixes known at start (local and static).
    pub stacks: &'a [(String, Prefix)],
}

/// Refuses a tunnel range that overlaps the underlay network, a host network or a
/// stack's prefix: packets for those would go into the tunnel, or tunnel packets to
/// them.
pub fn check_range(range: Prefix, n: &Neighbourhood) -> Result<(), String> {
    let fix = "choose another VROUTER_TUNNEL_RANGE on every host (it must not overlap the underlay, a host network or a stack prefix)";
    if let Some(u) = n.underlay.filter(|u| u.overlaps(&range)) {
        return Err(format!(
            "the tunnel range {range} (VROUTER_TUNNEL_RANGE) overlaps the underlay network {u}; {fix}"
        ));
    }
    if let Some(h) = n.host_networks.iter().find(|h| h.overlaps(&range)) {
        return Err(format!(
            "the tunnel range {range} (VROUTER_TUNNEL_RANGE) overlaps the host network {h}; {fix}"
        ));
    }
    if let Some((name, p)) = n.stacks.iter().find(|(_, p)| p.overlaps(&range)) {
        return Err(format!(
            "the tunnel range {range} (VROUTER_TUNNEL_RANGE) overlaps prefix {p} of stack {name}; {fix}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn range(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn hosts(list: &[&str]) -> BTreeSet<Ipv4Addr> {
        list.iter().map(|s| ip(s)).collect()
    }

    #[test]
    fn the_underlay_address_maps_into_the_range() {
        let r = range("10.255.0.0/16");
        assert_eq!(derive(r, ip("198.18.0.2")), ip("10.255.0.2"));
        assert_eq!(derive(r, ip("192.168.7.9")), ip("10.255.7.9"));
        // The network and broadcast offsets are skipped (upward, wrapping).
        assert_eq!(derive(r, ip("198.18.0.0")), ip("10.255.0.1"));
        assert_eq!(derive(r, ip("198.18.255.255")), ip("10.255.0.1"));
        let small = range("10.9.9.0/30");
        assert_eq!(derive(small, ip("1.2.3.5")), ip("10.9.9.1"));
        assert_eq!(derive(small, ip("1.2.3.6")), ip("10.9.9.2"));
        assert_eq!(derive(small, ip("1.2.3.7")), ip("10.9.9.1"));
    }

    #[test]
    fn without_collisions_every_host_keeps_its_derived_address() {
        let r = range("10.255.0.0/16");
        let a = assign(r, &hosts(&["198.18.0.1", "198.18.0.2", "198.18.0.3"]));
        assert_eq!(a.addresses[&ip("198.18.0.3")], ip("10.255.0.3"));
        assert_eq!(a.addresses.len(), 3);
        assert!(a.collisions.is_empty() && a.unassigned.is_empty());
    }

    #[test]
    fn the_lower_underlay_keeps_a_colliding_address_the_other_takes_the_next_free() {
        let r = range("10.255.0.0/16");
        // 198.18.0.2, 198.19.0.2 and 172.16.0.2 all derive 10.255.0.2; 198.18.0.3
        // derives 10.255.0.3, so the third of them probes on to .4.
        let a = assign(
            r,
            &hosts(&["198.19.0.2", "198.18.0.2", "198.18.0.3", "172.16.0.2"]),
        );
        assert_eq!(a.addresses[&ip("172.16.0.2")], ip("10.255.0.2"));
        assert_eq!(a.addresses[&ip("198.18.0.2")], ip("10.255.0.3"));
        assert_eq!(a.addresses[&ip("198.18.0.3")], ip("10.255.0.4"));
        assert_eq!(a.addresses[&ip("198.19.0.2")], ip("10.255.0.5"));
        assert_eq!(
            a.collisions,
            vec![
                Collision {
                    address: ip("10.255.0.2"),
                    hosts: vec![ip("172.16.0.2"), ip("198.18.0.2"), ip("198.19.0.2")],
                },
                Collision {
                    address: ip("10.255.0.3"),
                    hosts: vec![ip("198.18.0.2"), ip("198.18.0.3")],
                },
            ]
        );
        // Every host reaches the same answer whatever order it learnt the hosts in.
        let again = assign(
            r,
            &hosts(&["172.16.0.2", "198.18.0.3", "198.19.0.2", "198.18.0.2"]),
        );
        assert_eq!(again, a);
        let distinct: BTreeSet<_> = a.addresses.values().collect();
        assert_eq!(distinct.len(), a.addresses.len());
    }

    #[test]
    fn probing_wraps_past_the_broadcast_and_a_full_range_leaves_hosts_out() {
        let r = range("10.9.9.0/30");
        // Both derive .2; the second wraps past .3 (broadcast) and .0 (network) to .1.
        let a = assign(r, &hosts(&["1.0.0.2", "2.0.0.2", "3.0.0.2"]));
        assert_eq!(a.addresses[&ip("1.0.0.2")], ip("10.9.9.2"));
        assert_eq!(a.addresses[&ip("2.0.0.2")], ip("10.9.9.1"));
        assert_eq!(a.unassigned, vec![ip("3.0.0.2")]);
    }

    #[test]
    fn a_range_overlapping_the_underlay_a_host_network_or_a_stack_is_refused() {
        let r = range("10.255.0.0/16");
        let none = Neighbourhood::default();
        assert!(check_range(r, &none).is_ok());
        let e = check_range(
            r,
            &Neighbourhood {
                underlay: Some(range("10.0.0.0/8")),
                ..Neighbourhood::default()
            },
        )
        .unwrap_err();
        assert!(
            e.contains("underlay network 10.0.0.0/8") && e.contains("VROUTER_TUNNEL_RANGE"),
            "{e}"
        );
        let nets = [range("172.17.0.0/16"), range("10.255.3.0/24")];
        let e = check_range(
            r,
            &Neighbourhood {
                host_networks: &nets,
                ..Neighbourhood::default()
            },
        )
        .unwrap_err();
        assert!(e.contains("host network 10.255.3.0/24"), "{e}");
        let stacks = [
            ("a".to_string(), range("10.1.0.0/24")),
            ("b".to_string(), range("10.255.9.0/24")),
        ];
        let e = check_range(
            r,
            &Neighbourhood {
                stacks: &stacks,
                ..Neighbourhood::default()
            },
        )
        .unwrap_err();
        assert!(e.contains("stack b"), "{e}");
    }
}
