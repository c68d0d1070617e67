//! The router's links: finding its place on the stack network at start, checking its
//! overlay link, and adopting the link discovery moves into its namespace.

use crate::desired::ProbePath;
use crate::settings::{self, Settings, StackAttachment};
use anyhow::Context;
use std::net::{Ipv4Addr, SocketAddrV4};
use vrouter_kernel::{Kernel, KernelError, Link};
use vrouter_state::{Mac, Prefix};

/// Where the router sits, learned from its namespace at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Surroundings {
    pub attachment: StackAttachment,
    /// Name of the stack network's interface (holding the router's address).
    pub stack_ifname: String,
    pub prefixes: Vec<Prefix>,
    /// Path for same-host probes (None without a default route with a gateway).
    pub probe_path: Option<ProbePath>,
}

/// Resolves the settings that default to facts of the namespace.
pub async fn surroundings(kernel: &Kernel, settings: &Settings) -> anyhow::Result<Surroundings> {
    let links = kernel.links().await.context("listing links")?;
    let addrs = kernel.addresses().await.context("listing addresses")?;
    let default = kernel
        .default_route()
        .await
        .context("reading the default route")?;
    let attachment = settings::resolve_router_ip(
        settings.router_ip,
        &links,
        &addrs,
        default.map(|(oif, _)| oif),
    )?;
    let prefixes = match &settings.prefixes {
        Some(p) => p.clone(),
        None => {
            let p = settings::connected_prefixes(&links, &addrs);
            if p.is_empty() {
                anyhow::bail!("VROUTER_PREFIXES is not set and the router has no connected subnet outside lo and ovl*; set VROUTER_PREFIXES to the stack's subnets");
            }
            p
        }
    };
    if !prefixes.iter().any(|p| p.contains(attachment.router_ip)) {
        anyhow::bail!(
            "VROUTER_PREFIXES={:?} does not contain the router's address {}; the router must sit in its stack's subnet",
            prefixes.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","),
            attachment.router_ip
        );
    }
    let probe_path = match default {
        Some((oif, Some(gateway))) => Some(ProbePath { gateway, oif }),
        _ => None,
    };
    let stack_ifname = links
        .iter()
        .find(|l| l.index == attachment.index)
        .map(|l| l.name.clone())
        .unwrap_or_default();
    Ok(Surroundings {
        attachment,
        stack_ifname,
        prefixes,
        probe_path,
    })
}

/// The MAC the router gives its stack interface: Docker's historic derivation,
/// 02:42 then the IPv4 address. A restarted router container gets a new namespace and,
/// on recent Docker, a new random MAC, while the host's neighbour entry for the router
/// (host steering) and the services' (after ICMP redirects) keep the old one for
/// seconds; a MAC that only depends on the address makes them right at once. On Docker
/// versions that derive it this way already, setting it changes nothing.
pub fn stable_stack_mac(router_ip: Ipv4Addr) -> Mac {
    let o = router_ip.octets();
    Mac([0x02, 0x42, o[0], o[1], o[2], o[3]])
}

/// Gives the stack interface its [`stable_stack_mac`] (live: veth allows it while
/// up), then sends one datagram to the gateway so that the router ARPs for it and the
/// host refreshes its neighbour entry for the router from that request. Err is the
/// line for the log and the event when the MAC cannot be set; the router goes on.
pub async fn set_stable_stack_mac(
    kernel: &Kernel,
    index: u32,
    ifname: &str,
    router_ip: Ipv4Addr,
    gateway: Option<Ipv4Addr>,
) -> Result<(), String> {
    let mac = stable_stack_mac(router_ip);
    let current = kernel
        .link_by_index(index)
        .await
        .map_err(|e| format!("cannot read the stack interface {ifname}: {e}"))?
        .and_then(|l| l.mac);
    let result = if current == Some(mac) {
        Ok(())
    } else {
        match kernel.set_mac(index, mac).await {
            Ok(()) => {
                tracing::info!(link = ifname, %mac, previous = ?current.map(|m| m.to_string()), "stack interface MAC set");
                Ok(())
            }
            Err(e) => Err(format!(
                "cannot set the stack interface {ifname}'s MAC to {mac} ({e}); after a restart of this router the host and the services reach it only once their neighbour entries expire (a few seconds)"
            )),
        }
    };
    if let Some(gateway) = gateway {
        // Port 9 (discard); the answer, if any, does not matter, the ARP request does.
        let sent = std::net::UdpSocket::bind(SocketAddrV4::new(router_ip, 0))
            .and_then(|s| s.send_to(b"vrouter", SocketAddrV4::new(gateway, 9)));
        if let Err(e) = sent {
            tracing::debug!(%gateway, error = %e, "gateway nudge not sent");
        }
    }
    result
}

/// The overlay link as the router finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlayLink {
    Working {
        index: u32,
        /// Its MTU: the size of the path MTU probes.
        mtu: u32,
    },
    /// Present but unusable; the reason is for the log.
    Broken {
        index: u32,
        reason: String,
    },
    Absent,
}

impl OverlayLink {
    pub fn index(&self) -> Option<u32> {
        match self {
            OverlayLink::Working { index, .. } => Some(*index),
            _ => None,
        }
    }

    /// The working link's MTU.
    pub fn mtu(&self) -> Option<u32> {
        match self {
            OverlayLink::Working { mtu, .. } => Some(*mtu),
            _ => None,
        }
    }
}

/// Judges a link against what the router's overlay link must be. Pure.
pub fn judge(link: Option<&Link>, mac: Mac) -> OverlayLink {
    let Some(link) = link else {
        return OverlayLink::Absent;
    };
    let broken = |reason: String| OverlayLink::Broken {
        index: link.index,
        reason,
    };
    if link.kind.as_deref() != Some("macvlan") {
        return broken(format!(
            "{} is a {} link, not a macvlan",
            link.name,
            link.kind.as_deref().unwrap_or("plain")
        ));
    }
    if link.mac != Some(mac) {
        return broken(format!(
            "{} has MAC {}, expected {mac}",
            link.name,
            link.mac.map(|m| m.to_string()).unwrap_or_default()
        ));
    }
    if !link.up {
        return broken(format!("{} is down", link.name));
    }
    OverlayLink::Working {
        index: link.index,
        mtu: link.mtu,
    }
}

/// The MTU the overlay link should take when it differs from discovery's overlay MTU
/// (discovery.json `host.overlay_mtu`: underlay - 50, or - 130 with encryption). A
/// macvlan follows its VXLAN device's MTU down by itself but never up, so after
/// encryption is turned off (or the underlay MTU raised) the router raises it. Pure.
pub fn mtu_to_follow(link: &OverlayLink, overlay_mtu: Option<u32>) -> Option<u32> {
    match (link, overlay_mtu) {
        (OverlayLink::Working { mtu, .. }, Some(want)) if want >= 576 && *mtu != want => Some(want),
        _ => None,
    }
}

pub async fn overlay_link(
    kernel: &Kernel,
    name: &str,
    mac: Mac,
) -> Result<OverlayLink, KernelError> {
    Ok(judge(kernel.link_by_name(name).await?.as_ref(), mac))
}

/// Takes over the link discovery just moved into this namespace under `ifname`:
/// removes a stale overlay link, renames the new one, sets its MAC and MTU, and
/// brings it up unless `up` is false (no access table could be installed: the link
/// stays down until one is). Returns its index.
pub async fn adopt(
    kernel: &Kernel,
    ifname: &str,
    name: &str,
    mac: Mac,
    mtu: u32,
    up: bool,
) -> anyhow::Result<u32> {
    let link = kernel
        .link_by_name(ifname)
        .await?
        .with_context(|| format!("discovery reported moving {ifname} into the router's namespace, but no such link is here"))?;
    if ifname != name {
        if let Some(stale) = kernel.link_by_name(name).await? {
            tracing::info!(
                link = name,
                index = stale.index,
                "removing the stale overlay link"
            );
            kernel
                .delete_link(stale.index)
                .await
                .with_context(|| format!("removing the stale {name}"))?;
        }
        kernel
            .rename(link.index, name)
            .await
            .with_context(|| format!("renaming {ifname} to {name}"))?;
    }
    if link.mac != Some(mac) {
        kernel
            .set_mac(link.index, mac)
            .await
            .with_context(|| format!("setting {name}'s MAC to {mac}"))?;
    }
    if link.mtu != mtu && mtu > 0 {
        kernel
            .set_mtu(link.index, mtu)
            .await
            .with_context(|| format!("setting {name}'s MTU to {mtu}"))?;
    }
    if up {
        kernel
            .set_up(link.index)
            .await
            .with_context(|| format!("bringing {name} up"))?;
    }
    Ok(link.index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_follows_discovery_s_overlay_mtu() {
        let working = |mtu| OverlayLink::Working { index: 3, mtu };
        assert_eq!(mtu_to_follow(&working(1370), Some(1450)), Some(1450));
        assert_eq!(mtu_to_follow(&working(1450), Some(1370)), Some(1370));
        assert_eq!(mtu_to_follow(&working(1450), Some(1450)), None);
        assert_eq!(
            mtu_to_follow(&working(1450), None),
            None,
            "an older discovery"
        );
        assert_eq!(mtu_to_follow(&working(1450), Some(100)), None, "nonsense");
        assert_eq!(mtu_to_follow(&OverlayLink::Absent, Some(1370)), None);
    }

    fn link(kind: Option<&str>, mac: Mac, up: bool) -> Link {
        Link {
            index: 5,
            name: "ovl1000".into(),
            kind: kind.map(str::to_string),
            mac: Some(mac),
            mtu: 1450,
            up,
            parent: None,
            vxlan: None,
            alias: None,
        }
    }

    #[test]
    fn judging_the_overlay_link() {
        let mac: Mac = "02:e8:0a:01:00:fe".parse().unwrap();
        assert_eq!(judge(None, mac), OverlayLink::Absent);
        assert_eq!(
            judge(Some(&link(Some("macvlan"), mac, true)), mac),
            OverlayLink::Working {
                index: 5,
                mtu: 1450
            }
        );
        for l in [
            link(Some("macvlan"), mac, false),
            link(Some("macvlan"), Mac::ZERO, true),
            link(Some("dummy"), mac, true),
            link(None, mac, true),
        ] {
            let j = judge(Some(&l), mac);
            assert!(matches!(j, OverlayLink::Broken { index: 5, .. }), "{j:?}");
            assert_eq!(j.index(), None);
        }
    }
}
