//! Links (VXLAN devices, macvlans, veth pairs, bridge ports) and IPv4 addresses.

use crate::error::{classify, errno_of, is_gone, Context};
use crate::{Address, Kernel, KernelError, Link, Result, VxlanInfo, VxlanSpec};
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
    MacVlanMode,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{
    AddressMessageBuilder, LinkMacVlan, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan,
    LinkWireguard,
};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, BorrowedFd};
use vrouter_state::{Mac, Vni};

impl Kernel {
    /// Every link of this namespace.
    pub async fn links(&self) -> Result<Vec<Link>> {
        let answers = self
            .get(RouteNetlinkMessage::GetLink(LinkMessage::default()), true)
            .await
            .map_err(|e| classify("dump links", "this namespace".into(), Context::Plain, e))?;
        Ok(answers.into_iter().filter_map(link_of).collect())
    }

    /// The link called `name`; `None` when there is none.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        let mut message = LinkMessage::default();
        message.attributes.push(LinkAttribute::IfName(name.into()));
        self.one_link(message, format!("link {name}")).await
    }

    /// The link with index `index`; `None` when there is none.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        self.one_link(message, format!("link index {index}")).await
    }

    async fn one_link(&self, message: LinkMessage, what: String) -> Result<Option<Link>> {
        match self.get(RouteNetlinkMessage::GetLink(message), false).await {
            Ok(answers) => Ok(answers.into_iter().find_map(link_of)),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(classify("get link", what, Context::Plain, e)),
        }
    }

    /// Creates a VXLAN device (down). A duplicate VNI on the same port fails here with
    /// `KernelError::VniInUse`; a kernel without vxlan with `KernelError::NoVxlan`.
    /// Returns the new device's index.
    pub async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<u32> {
        let mut builder = LinkVxlan::new(&spec.name, spec.vni.get());
        if let Some(local) = spec.local {
            builder = builder.local(local);
        }
        let message = builder
            .dev(spec.underlay)
            .port(spec.port)
            .learning(spec.learning)
            .mtu(spec.mtu)
            .build();
        let sent = self.create_link(message).await;
        if let Err(source) = sent {
            // The kernel answers EEXIST both for a taken name and for a VNI already
            // bound on the port by another device; only a dump tells them apart.
            let vni_taken = errno_of(&source) == Some(libc::EEXIST)
                && self.links().await.is_ok_and(|links| {
                    links.iter().any(|l| {
                        l.name != spec.name
                            && l.vxlan
                                .as_ref()
                                .is_some_and(|v| v.vni == spec.vni && v.port == spec.port)
                    })
                });
            let context = Context::CreateVxlan {
                vni: spec.vni.get(),
                port: spec.port,
                underlay: self.link_label(spec.underlay).await,
                vni_taken,
            };
            let what = format!("{} (VNI {}, port {})", spec.name, spec.vni, spec.port);
            return Err(classify("create vxlan device", what, context, source));
        }
        self.created_index(&spec.name).await
    }

    /// Creates a kernel WireGuard device (down, unconfigured). A kernel without the
    /// wireguard module fails here with `KernelError::NoWireGuard`. Returns its index.
    pub async fn create_wireguard(&self, name: &str) -> Result<u32> {
        let message = LinkWireguard::new(name).build();
        if let Err(source) = self.create_link(message).await {
            let context = Context::CreateWireguard {
                names: format!("{name} in this namespace"),
            };
            return Err(classify(
                "create wireguard device",
                name.into(),
                context,
                source,
            ));
        }
        self.created_index(name).await
    }

    /// Changes a VXLAN device's local address in place (the port cannot change): a
    /// changelink, RTM_NEWLINK on the existing index with kind vxlan and only
    /// IFLA_VXLAN_LOCAL, so the device keeps its index, FDB and macvlans. 0.0.0.0
    /// removes it (the kernel then picks the source address by route).
    pub async fn set_vxlan_local(&self, index: u32, local: Ipv4Addr) -> Result<()> {
        let message = LinkMessageBuilder::<LinkVxlan>::new_with_info_kind(InfoKind::Vxlan)
            .index(index)
            .local(local)
            .build();
        match self.ack(RouteNetlinkMessage::NewLink(message), 0).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.link_failure("set vxlan local address", index, e).await),
        }
    }

    /// Brings a link up. For VXLAN, a port held by a non-VXLAN socket or a VXLAN
    /// device with mismatched flags fails here with `KernelError::PortInUse`.
    pub async fn set_up(&self, index: u32) -> Result<()> {
        let message = LinkUnspec::new_with_index(index).up().build();
        let Err(source) = self.set_link(message).await else {
            return Ok(());
        };
        let link = self.link_by_index(index).await.ok().flatten();
        let label = match &link {
            Some(link) => format!("{} (index {index})", link.name),
            None => format!("index {index}"),
        };
        let vxlan_port = link.and_then(|l| l.vxlan).map(|v| v.port);
        let context = Context::LinkUp {
            link: label.clone(),
            vxlan_port,
        };
        Err(classify(
            "set link up",
            format!("link {label}"),
            context,
            source,
        ))
    }

    /// Takes a link down (the router holds its overlay link down when it cannot
    /// install even its closed access table).
    pub async fn set_down(&self, index: u32) -> Result<()> {
        let message = LinkUnspec::new_with_index(index).down().build();
        match self.set_link(message).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.link_failure("set link down", index, e).await),
        }
    }

    /// Sets a link's alias (IFLA_IFALIAS, at most 255 bytes).
    pub async fn set_alias(&self, index: u32, alias: &str) -> Result<()> {
        let message = LinkUnspec::new_with_index(index)
            .append_extra_attribute(LinkAttribute::IfAlias(alias.to_string()))
            .build();
        match self.set_link(message).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.link_failure("set link alias", index, e).await),
        }
    }

    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        let message = LinkUnspec::new_with_index(index).mtu(mtu).build();
        match self.set_link(message).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.link_failure("set link mtu", index, e).await),
        }
    }

    pub async fn set_mac(&self, index: u32, mac: Mac) -> Result<()> {
        let message = LinkUnspec::new_with_index(index)
            .address(mac.0.to_vec())
            .build();
        match self.set_link(message).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.link_failure("set link address", index, e).await),
        }
    }

    pub async fn rename(&self, index: u32, name: &str) -> Result<()> {
        let message = LinkUnspec::new_with_index(index).name(name).build();
        match self.set_link(message).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.link_failure("rename link", index, e).await),
        }
    }

    /// Deletes a link. A link that is already gone is not an error (ENODEV => Ok), so
    /// teardown can be repeated.
    pub async fn delete_link(&self, index: u32) -> Result<()> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        match self.ack(RouteNetlinkMessage::DelLink(message), 0).await {
            Ok(()) => Ok(()),
            Err(e) if is_gone(&e) => Ok(()),
            Err(e) => Err(self.link_failure("delete link", index, e).await),
        }
    }

    /// Creates a macvlan (mode bridge) on `parent`, with the given MAC and MTU, down.
    /// Returns the new link's index.
    pub async fn create_macvlan(&self, name: &str, parent: u32, mac: Mac, mtu: u32) -> Result<u32> {
        let message = LinkMacVlan::new(name, parent, MacVlanMode::Bridge)
            .address(mac.0.to_vec())
            .mtu(mtu)
            .build();
        let sent = self.create_link(message).await;
        if let Err(source) = sent {
            let parent = self.link_label(parent).await;
            let what = format!("{name} on {parent}");
            return Err(classify(
                "create macvlan",
                what,
                Context::CreateMacvlan { parent },
                source,
            ));
        }
        self.created_index(name).await
    }

    /// Moves a link into the namespace behind `netns` (IFLA_NET_NS_FD); needs only
    /// CAP_NET_ADMIN, no setns. The link keeps its name.
    pub async fn move_to_netns(&self, index: u32, netns: BorrowedFd<'_>) -> Result<()> {
        let message = LinkUnspec::new_with_index(index)
            .setns_by_fd(netns.as_raw_fd())
            .build();
        match self.set_link(message).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.link_failure("move link to namespace", index, e).await),
        }
    }

    /// Like `move_to_netns`, but the link arrives in the target namespace as `name`
    /// (IFLA_IFNAME beside IFLA_NET_NS_FD renames during the move), so a name taken in
    /// either namespace never collides.
    pub async fn move_to_netns_as(
        &self,
        index: u32,
        netns: BorrowedFd<'_>,
        name: &str,
    ) -> Result<()> {
        let message = LinkUnspec::new_with_index(index)
            .setns_by_fd(netns.as_raw_fd())
            .name(name)
            .build();
        match self.set_link(message).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.link_failure("move link to namespace", index, e).await),
        }
    }

    /// Creates a veth pair: `name` here (down) and its peer `peer` directly in the
    /// namespace behind `peer_netns` (down), both with `mtu`. The peer's name only has
    /// to be free over there. A name taken on either side fails with
    /// `KernelError::LinkExists`. Returns the index of `name`.
    pub async fn create_veth_into(
        &self,
        name: &str,
        mtu: u32,
        peer_netns: BorrowedFd<'_>,
        peer: &str,
    ) -> Result<u32> {
        let peer_message = LinkUnspec::new_with_name(peer)
            .mtu(mtu)
            .setns_by_fd(peer_netns.as_raw_fd())
            .build();
        let message = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(name)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_message)))
            .build();
        let sent = self.create_link(message).await;
        if let Err(source) = sent {
            let what = format!("{name} (peer {peer} in another namespace)");
            let context = Context::Create {
                names: format!("{name} here or {peer} in the peer's namespace"),
            };
            return Err(classify("create veth pair", what, context, source));
        }
        self.created_index(name).await
    }

    /// Makes `index` a port of the bridge `master` (`ip link set DEV master BR`). A
    /// master that is no bridge fails with `KernelError::NotABridge`, a missing one with
    /// `KernelError::NoSuchLink`; either way the kernel has already taken the link off
    /// its previous master.
    pub async fn set_master(&self, index: u32, master: u32) -> Result<()> {
        let message = LinkUnspec::new_with_index(index).controller(master).build();
        let Err(source) = self.set_link(message).await else {
            return Ok(());
        };
        let link = self.link_label(index).await;
        let master_link = self.link_by_index(master).await.ok().flatten();
        let context = Context::SetMaster {
            link: link.clone(),
            master: match &master_link {
                Some(m) => format!("{} (index {master})", m.name),
                None => format!("index {master}"),
            },
            master_exists: master_link.is_some(),
        };
        Err(classify(
            "set link master",
            format!("link {link}"),
            context,
            source,
        ))
    }

    /// `ip address replace ADDR/LEN dev LINK` (NLM_F_CREATE | NLM_F_REPLACE):
    /// idempotent.
    pub async fn replace_address(&self, index: u32, addr: Ipv4Addr, prefix_len: u8) -> Result<()> {
        let message = AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(addr, prefix_len)
            .build();
        let sent = self
            .ack(
                RouteNetlinkMessage::NewAddress(message),
                NLM_F_CREATE | NLM_F_REPLACE,
            )
            .await;
        match sent {
            Ok(()) => Ok(()),
            Err(e) => {
                let label = self.link_label(index).await;
                let what = format!("{addr}/{prefix_len} on link {label}");
                Err(classify("replace address", what, Context::Link(label), e))
            }
        }
    }

    /// `ip address del ADDR/LEN dev LINK`; an address already gone is not an error.
    pub async fn delete_address(&self, index: u32, addr: Ipv4Addr, prefix_len: u8) -> Result<()> {
        let message = AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(addr, prefix_len)
            .build();
        match self.ack(RouteNetlinkMessage::DelAddress(message), 0).await {
            Ok(()) => Ok(()),
            Err(e) if is_gone(&e) || errno_of(&e) == Some(libc::EADDRNOTAVAIL) => Ok(()),
            Err(e) => {
                let label = self.link_label(index).await;
                let what = format!("{addr}/{prefix_len} on link {label}");
                Err(classify("delete address", what, Context::Link(label), e))
            }
        }
    }

    async fn set_link(&self, message: LinkMessage) -> std::result::Result<(), rtnetlink::Error> {
        self.ack(RouteNetlinkMessage::SetLink(message), 0).await
    }

    /// RTM_NEWLINK that fails rather than touch an existing link of the same name.
    async fn create_link(&self, message: LinkMessage) -> std::result::Result<(), rtnetlink::Error> {
        self.ack(
            RouteNetlinkMessage::NewLink(message),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .await
    }

    async fn created_index(&self, name: &str) -> Result<u32> {
        self.link_by_name(name)
            .await?
            .map(|l| l.index)
            .ok_or_else(|| KernelError::NoSuchLink(format!("{name} (just created, then gone)")))
    }

    /// Every IPv4 address of this namespace.
    pub async fn addresses(&self) -> Result<Vec<Address>> {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        let answers = self
            .get(RouteNetlinkMessage::GetAddress(message), true)
            .await
            .map_err(|e| classify("dump addresses", "this namespace".into(), Context::Plain, e))?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewAddress(m) => address_of(m),
                _ => None,
            })
            .collect())
    }
}

pub(crate) fn link_of(answer: RouteNetlinkMessage) -> Option<Link> {
    let RouteNetlinkMessage::NewLink(message) = answer else {
        return None;
    };
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        kind: None,
        mac: None,
        mtu: 0,
        up: message.header.flags.contains(LinkFlags::Up),
        parent: None,
        vxlan: None,
        alias: None,
    };
    for attribute in message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name,
            LinkAttribute::IfAlias(alias) if !alias.is_empty() => link.alias = Some(alias),
            LinkAttribute::Mtu(mtu) => link.mtu = mtu,
            LinkAttribute::Link(parent) => link.parent = Some(parent),
            LinkAttribute::Address(bytes) => link.mac = <[u8; 6]>::try_from(bytes).ok().map(Mac),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(kind) => link.kind = Some(kind.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(data)) => link.vxlan = vxlan_of(&data),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(link)
}

/// The reuse-or-replace attributes of a VXLAN device; `None` for VNI 0, which the
/// project never creates.
pub(crate) fn vxlan_of(data: &[InfoVxlan]) -> Option<VxlanInfo> {
    let mut vni = None;
    let mut info = VxlanInfo {
        vni: Vni::new(1).ok()?,
        local: None,
        underlay: None,
        port: 0,
        learning: false,
    };
    for item in data {
        match item {
            InfoVxlan::Id(id) => vni = Vni::new(*id).ok(),
            InfoVxlan::Local(addr) => info.local = Some(*addr),
            InfoVxlan::Link(index) => info.underlay = Some(*index),
            InfoVxlan::Port(port) => info.port = *port,
            InfoVxlan::Learning(on) => info.learning = *on,
            _ => {}
        }
    }
    info.vni = vni?;
    Some(info)
}

pub(crate) fn address_of(message: AddressMessage) -> Option<Address> {
    let mut local = None;
    let mut address = None;
    for attribute in message.attributes {
        match attribute {
            AddressAttribute::Local(IpAddr::V4(a)) => local = Some(a),
            AddressAttribute::Address(IpAddr::V4(a)) => address = Some(a),
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on
    // point-to-point links and equals IFA_LOCAL elsewhere.
    Some(Address {
        index: message.header.index,
        addr: local.or(address)?,
        prefix_len: message.header.prefix_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vxlan_info_from_attributes() {
        let data = [
            InfoVxlan::Id(1000),
            InfoVxlan::Local(Ipv4Addr::new(198, 18, 0, 1)),
            InfoVxlan::Link(2),
            InfoVxlan::Port(4789),
            InfoVxlan::Learning(false),
            InfoVxlan::Ttl(0),
        ];
        let info = vxlan_of(&data).unwrap();
        assert_eq!(info.vni.get(), 1000);
        assert_eq!(info.local, Some(Ipv4Addr::new(198, 18, 0, 1)));
        assert_eq!(info.underlay, Some(2));
        assert_eq!(info.port, 4789);
        assert!(!info.learning);
        assert!(vxlan_of(&[InfoVxlan::Id(0), InfoVxlan::Port(4789)]).is_none());
        assert!(vxlan_of(&[InfoVxlan::Port(4789)]).is_none());
    }
}
