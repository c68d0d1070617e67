//! Finding the underlay: the interface and IPv4 address VXLAN packets leave through.

use std::net::Ipv4Addr;
use vrouter_kernel::{Address, Kernel, Link};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub ifname: String,
    pub index: u32,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub mtu: u32,
}

/// Picks the underlay from dumps: the configured interface, or the default route's.
pub fn choose(
    configured: Option<&str>,
    default_oif: Option<u32>,
    links: &[Link],
    addrs: &[Address],
) -> Result<Underlay, String> {
    let link = match configured {
        Some(name) => links.iter().find(|l| l.name == name).ok_or_else(|| {
            format!("underlay interface {name:?} (--underlay-interface / VROUTER_UNDERLAY_INTERFACE) does not exist on this host; name an existing interface")
        })?,
        None => {
            let oif = default_oif.ok_or_else(|| {
                "no IPv4 default route to detect the underlay from; set --underlay-interface / VROUTER_UNDERLAY_INTERFACE".to_string()
            })?;
            links.iter().find(|l| l.index == oif).ok_or_else(|| {
                format!("the default route's interface (index {oif}) vanished; set --underlay-interface / VROUTER_UNDERLAY_INTERFACE")
            })?
        }
    };
    let a = addrs.iter().find(|a| a.index == link.index).ok_or_else(|| {
        format!(
            "underlay interface {} has no IPv4 address; give it one or set --underlay-interface / VROUTER_UNDERLAY_INTERFACE to another",
            link.name
        )
    })?;
    Ok(Underlay {
        ifname: link.name.clone(),
        index: link.index,
        addr: a.addr,
        prefix_len: a.prefix_len,
        mtu: link.mtu,
    })
}

pub async fn detect(kernel: &Kernel, configured: Option<&str>) -> Result<Underlay, String> {
    let links = kernel.links().await.map_err(|e| e.to_string())?;
    let addrs = kernel.addresses().await.map_err(|e| e.to_string())?;
    let default = kernel.default_route().await.map_err(|e| e.to_string())?;
    choose(configured, default.map(|d| d.0), &links, &addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str) -> Link {
        Link {
            index,
            name: name.into(),
            kind: None,
            mac: None,
            mtu: 1500,
            up: true,
            parent: None,
            vxlan: None,
            alias: None,
        }
    }

    #[test]
    fn default_route_or_configured() {
        let links = vec![link(1, "lo"), link(2, "eth0"), link(3, "eth1")];
        let addrs = vec![
            Address {
                index: 2,
                addr: "198.18.0.1".parse().unwrap(),
                prefix_len: 24,
            },
            Address {
                index: 3,
                addr: "192.0.2.1".parse().unwrap(),
                prefix_len: 24,
            },
        ];
        let u = choose(None, Some(2), &links, &addrs).unwrap();
        assert_eq!(
            (u.ifname.as_str(), u.addr.to_string()),
            ("eth0", "198.18.0.1".into())
        );
        let u = choose(Some("eth1"), Some(2), &links, &addrs).unwrap();
        assert_eq!(u.ifname, "eth1");
        let e = choose(None, None, &links, &addrs).unwrap_err();
        assert!(e.contains("VROUTER_UNDERLAY_INTERFACE"), "{e}");
        let e = choose(Some("nope"), None, &links, &addrs).unwrap_err();
        assert!(e.contains("\"nope\""), "{e}");
        let e = choose(Some("lo"), None, &links, &addrs).unwrap_err();
        assert!(e.contains("no IPv4 address"), "{e}");
    }
}
