//! A thin, typed kernel layer over rtnetlink: the only code in the project that talks
//! to the kernel's routing subsystem. Every mutation has replace/idempotent semantics
//! where the kernel offers them; dumps return plain values for diffing.
//!
//! A `Kernel` is bound to the network namespace of the thread that called `connect`.

mod error;
pub use error::KernelError;

use std::net::Ipv4Addr;
use std::os::fd::BorrowedFd;
use vrouter_state::{Mac, Prefix, Vni};

pub type Result<T> = std::result::Result<T, KernelError>;

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// IFLA_INFO_KIND: "vxlan", "macvlan", "bridge", "veth", ... (None for plain devices).
    pub kind: Option<String>,
    pub mac: Option<Mac>,
    pub mtu: u32,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// IFLA_LINK: the lower device (for macvlan, vxlan's underlay is in `vxlan.underlay`).
    pub parent: Option<u32>,
    pub vxlan: Option<VxlanInfo>,
}

/// The attributes of a VXLAN device that matter for reuse-or-replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanInfo {
    pub vni: Vni,
    pub local: Option<Ipv4Addr>,
    /// Underlay device index (IFLA_VXLAN_LINK).
    pub underlay: Option<u32>,
    pub port: u16,
    pub learning: bool,
}

/// What to create for a VNI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: Vni,
    pub local: Ipv4Addr,
    pub underlay: u32,
    pub port: u16,
    pub mtu: u32,
    pub learning: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

/// An IPv4 unicast route.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub table: u32,
    pub dst: Prefix,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub onlink: bool,
    /// RTPROT_*; routes this project owns carry `vrouter_state::RTPROT_VROUTER`.
    pub protocol: u8,
}

/// An IPv4 neighbour (ARP) entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neighbour {
    pub index: u32,
    pub ip: Ipv4Addr,
    pub mac: Option<Mac>,
    pub permanent: bool,
}

/// A forwarding-database entry on a VXLAN device (AF_BRIDGE neighbour, NTF_SELF).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbEntry {
    pub index: u32,
    pub mac: Mac,
    pub dst: Option<Ipv4Addr>,
    pub permanent: bool,
}

/// An IPv4 policy-routing rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub priority: u32,
    pub iif: Option<String>,
    pub fwmark: Option<u32>,
    pub table: u32,
    pub protocol: u8,
}

/// Handle on the routing netlink socket of one network namespace.
pub struct Kernel {
    #[allow(dead_code)]
    handle: rtnetlink::Handle,
}

impl Kernel {
    /// Opens a netlink socket in the calling thread's network namespace and spawns its
    /// connection task on the current tokio runtime.
    pub async fn connect() -> Result<Kernel> {
        unimplemented!()
    }

    // ---- links ----
    pub async fn links(&self) -> Result<Vec<Link>> {
        unimplemented!()
    }
    pub async fn link_by_name(&self, _name: &str) -> Result<Option<Link>> {
        unimplemented!()
    }
    pub async fn link_by_index(&self, _index: u32) -> Result<Option<Link>> {
        unimplemented!()
    }
    /// Creates a VXLAN device (down). A duplicate VNI on the same port fails here with
    /// `KernelError::VniInUse`; a kernel without vxlan with `KernelError::NoVxlan`.
    pub async fn create_vxlan(&self, _spec: &VxlanSpec) -> Result<u32> {
        unimplemented!()
    }
    /// Changes a VXLAN device's local address in place (the port cannot change).
    pub async fn set_vxlan_local(&self, _index: u32, _local: Ipv4Addr) -> Result<()> {
        unimplemented!()
    }
    /// Brings a link up. For VXLAN, a port held by a non-VXLAN socket or a VXLAN
    /// device with mismatched flags fails here with `KernelError::PortInUse`.
    pub async fn set_up(&self, _index: u32) -> Result<()> {
        unimplemented!()
    }
    pub async fn set_mtu(&self, _index: u32, _mtu: u32) -> Result<()> {
        unimplemented!()
    }
    pub async fn set_mac(&self, _index: u32, _mac: Mac) -> Result<()> {
        unimplemented!()
    }
    pub async fn rename(&self, _index: u32, _name: &str) -> Result<()> {
        unimplemented!()
    }
    pub async fn delete_link(&self, _index: u32) -> Result<()> {
        unimplemented!()
    }
    /// Creates a macvlan (mode bridge) on `parent`, with the given MAC and MTU, down.
    pub async fn create_macvlan(&self, _name: &str, _parent: u32, _mac: Mac, _mtu: u32) -> Result<u32> {
        unimplemented!()
    }
    /// Moves a link into the namespace behind `netns` (IFLA_NET_NS_FD); needs only
    /// CAP_NET_ADMIN, no setns.
    pub async fn move_to_netns(&self, _index: u32, _netns: BorrowedFd<'_>) -> Result<()> {
        unimplemented!()
    }

    // ---- addresses ----
    pub async fn addresses(&self) -> Result<Vec<Address>> {
        unimplemented!()
    }

    // ---- routes ----
    /// IPv4 unicast routes of one table (254 = main).
    pub async fn routes(&self, _table: u32) -> Result<Vec<Route>> {
        unimplemented!()
    }
    /// The main table's default route: (output link, gateway).
    pub async fn default_route(&self) -> Result<Option<(u32, Option<Ipv4Addr>)>> {
        unimplemented!()
    }
    pub async fn replace_route(&self, _route: &Route) -> Result<()> {
        unimplemented!()
    }
    pub async fn delete_route(&self, _route: &Route) -> Result<()> {
        unimplemented!()
    }

    // ---- neighbours ----
    pub async fn neighbours(&self, _index: u32) -> Result<Vec<Neighbour>> {
        unimplemented!()
    }
    /// `ip neigh replace IP lladdr MAC dev INDEX nud permanent`.
    pub async fn replace_neighbour(&self, _index: u32, _ip: Ipv4Addr, _mac: Mac) -> Result<()> {
        unimplemented!()
    }
    pub async fn delete_neighbour(&self, _index: u32, _ip: Ipv4Addr) -> Result<()> {
        unimplemented!()
    }

    // ---- FDB on VXLAN devices ----
    pub async fn fdb(&self, _index: u32) -> Result<Vec<FdbEntry>> {
        unimplemented!()
    }
    /// `bridge fdb append MAC dev INDEX dst DST self permanent` (several dsts per MAC:
    /// the all-zeros flood list).
    pub async fn append_fdb(&self, _index: u32, _mac: Mac, _dst: Ipv4Addr) -> Result<()> {
        unimplemented!()
    }
    /// `bridge fdb replace MAC dev INDEX dst DST self permanent`.
    pub async fn replace_fdb(&self, _index: u32, _mac: Mac, _dst: Ipv4Addr) -> Result<()> {
        unimplemented!()
    }
    pub async fn delete_fdb(&self, _index: u32, _mac: Mac, _dst: Option<Ipv4Addr>) -> Result<()> {
        unimplemented!()
    }

    // ---- policy rules ----
    pub async fn rules(&self) -> Result<Vec<Rule>> {
        unimplemented!()
    }
    pub async fn add_rule(&self, _rule: &Rule) -> Result<()> {
        unimplemented!()
    }
    pub async fn delete_rule(&self, _rule: &Rule) -> Result<()> {
        unimplemented!()
    }
}
