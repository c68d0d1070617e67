//! Who may act for a stack: the network namespace that really holds the stack's router
//! address on the stack's bridge. Anyone can reach the attach socket; only that
//! namespace receives the stack's traffic, so only it may register (or withdraw) the
//! stack.
//!
//! Seen from the host namespace, without entering the other (which would take
//! CAP_SYS_ADMIN): the stack's bridge is the host link whose subnet holds the router
//! address; the namespace must sit behind one of that bridge's veth ports (the
//! port's IFLA_LINK_NETNSID is the id the host knows the namespace by), and hold the
//! router address on that veth's peer (an address dump of the namespace by that id).
//! `observe` gathers this through `vrouter_kernel`; `verify` decides, purely.

use std::net::Ipv4Addr;
use std::os::fd::BorrowedFd;
use vrouter_kernel::{Address, Kernel, Link, VethPort};
use vrouter_state::Prefix;

/// What the host's kernel says about the namespace that asks.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub links: Vec<Link>,
    /// The host namespace's addresses.
    pub addrs: Vec<Address>,
    pub ports: Vec<VethPort>,
    /// The id the host knows the asking namespace by, if any.
    pub nsid: Option<i32>,
    /// The asking namespace's addresses (empty without an id).
    pub ns_addrs: Vec<Address>,
}

/// Reads what `verify` needs about the namespace `ns`. The veth dump comes first: it
/// makes the kernel assign ids to the namespaces behind the host's veth ports.
pub async fn observe(kernel: &Kernel, ns: BorrowedFd<'_>) -> Result<Observed, String> {
    let fail = |e: vrouter_kernel::KernelError| {
        format!("cannot check the router's network namespace: {e}")
    };
    let ports = kernel.foreign_veths().await.map_err(fail)?;
    let links = kernel.links().await.map_err(fail)?;
    let addrs = kernel.addresses().await.map_err(fail)?;
    let nsid = kernel.netns_id(ns).await.map_err(fail)?;
    let ns_addrs = match nsid {
        Some(id) => kernel.addresses_in(id).await.map_err(fail)?,
        None => Vec::new(),
    };
    Ok(Observed {
        links,
        addrs,
        ports,
        nsid,
        ns_addrs,
    })
}

/// Ok when the observed namespace holds `router_ip` on its port of the bridge whose
/// subnet holds `router_ip`; else the reason, for the router and events.log.
pub fn verify(router_ip: Ipv4Addr, o: &Observed) -> Result<(), String> {
    let bridges: Vec<&Link> = o
        .addrs
        .iter()
        .filter(|a| Prefix::containing(a.addr, a.prefix_len).contains(router_ip))
        .filter_map(|a| o.links.iter().find(|l| l.index == a.index))
        .filter(|l| l.kind.as_deref() == Some("bridge"))
        .collect();
    if bridges.is_empty() {
        return Err(format!(
            "no bridge on this host has a subnet holding router address {router_ip}; the router must sit on its stack's network on this host"
        ));
    }
    let names = bridges
        .iter()
        .map(|b| b.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let Some(nsid) = o.nsid else {
        return Err(format!(
            "the connecting network namespace has no port on {names} (nor on any bridge here); only the router on the stack's network may register it"
        ));
    };
    let ports: Vec<&VethPort> = o
        .ports
        .iter()
        .filter(|p| p.peer_netnsid == nsid)
        .filter(|p| {
            p.master
                .is_some_and(|m| bridges.iter().any(|b| b.index == m))
        })
        .collect();
    if ports.is_empty() {
        return Err(format!(
            "the connecting network namespace has no port on {names}, the network of router address {router_ip}; only the router on the stack's network may register it"
        ));
    }
    let holds = o
        .ns_addrs
        .iter()
        .any(|a| a.addr == router_ip && ports.iter().any(|p| p.peer_index == a.index));
    if !holds {
        return Err(format!(
            "the connecting network namespace does not hold router address {router_ip} on its interface on {names}; only the router that holds the stack's address may register or withdraw it"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: &str) -> Link {
        Link {
            index,
            name: name.into(),
            kind: Some(kind.into()),
            ..Link::default()
        }
    }

    fn addr(index: u32, a: &str, len: u8) -> Address {
        Address {
            index,
            addr: a.parse().unwrap(),
            prefix_len: len,
        }
    }

    fn port(index: u32, master: u32, peer_index: u32, nsid: i32) -> VethPort {
        VethPort {
            index,
            name: format!("veth{index}"),
            master: Some(master),
            peer_index,
            peer_netnsid: nsid,
        }
    }

    /// Host: br-a (10.1.0.1/24, index 3) with the router's port (nsid 0) and a
    /// service's port (nsid 1); br-b (10.2.0.1/24, index 4) with its router (nsid 2).
    fn host() -> Observed {
        Observed {
            links: vec![
                link(2, "eth0", "veth"),
                link(3, "br-a", "bridge"),
                link(4, "br-b", "bridge"),
            ],
            addrs: vec![
                addr(2, "198.18.0.1", 24),
                addr(3, "10.1.0.1", 24),
                addr(4, "10.2.0.1", 24),
            ],
            ports: vec![port(10, 3, 2, 0), port(11, 3, 2, 1), port(12, 4, 2, 2)],
            ..Observed::default()
        }
    }

    fn from(nsid: i32, addrs: Vec<Address>) -> Observed {
        Observed {
            nsid: Some(nsid),
            ns_addrs: addrs,
            ..host()
        }
    }

    const A: &str = "10.1.0.254";

    #[test]
    fn the_router_namespace_holding_the_address_is_accepted() {
        let o = from(0, vec![addr(1, "127.0.0.1", 8), addr(2, A, 24)]);
        assert_eq!(verify(A.parse().unwrap(), &o), Ok(()));
    }

    #[test]
    fn another_namespace_is_refused() {
        // A service on the same bridge that does not hold the address.
        let e = verify(A.parse().unwrap(), &from(1, vec![addr(2, "10.1.0.5", 24)])).unwrap_err();
        assert!(e.contains("does not hold router address 10.1.0.254"), "{e}");
        // Stack B's router: it holds its own address, on another bridge.
        let e = verify(A.parse().unwrap(), &from(2, vec![addr(2, A, 24)])).unwrap_err();
        assert!(e.contains("has no port on br-a"), "{e}");
        // The address on an interface that is not the bridge port (a dummy, a tunnel).
        let e = verify(A.parse().unwrap(), &from(1, vec![addr(7, A, 32)])).unwrap_err();
        assert!(e.contains("does not hold"), "{e}");
        // A namespace the host knows nothing of (not behind any veth here).
        let o = Observed {
            nsid: None,
            ..host()
        };
        let e = verify(A.parse().unwrap(), &o).unwrap_err();
        assert!(e.contains("no port on br-a"), "{e}");
        // An address no bridge here serves.
        let e = verify(
            "10.9.0.254".parse().unwrap(),
            &from(0, vec![addr(2, "10.9.0.254", 24)]),
        )
        .unwrap_err();
        assert!(e.contains("no bridge on this host"), "{e}");
    }
}
