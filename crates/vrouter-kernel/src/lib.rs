//! A thin, typed kernel layer over rtnetlink: the only code in the project that talks
//! to the kernel's routing subsystem. Every mutation has replace/idempotent semantics
//! where the kernel offers them; dumps return plain values for diffing.
//!
//! A `Kernel` is bound to the network namespace of the thread that called `connect`.
//!
//! - Writes are idempotent: routes, addresses, neighbours and FDB rows use
//!   NLM_F_REPLACE (or NLM_F_APPEND for the flood list), `add_rule` treats an existing
//!   rule as done, and every delete of something already gone (ENOENT, ESRCH or
//!   ENODEV) returns `Ok`.
//! - Errors say what failed on what (link name and index, prefix, rule); the errno
//!   cases an operator can act on are classified (`KernelError::VniInUse`,
//!   `PortInUse`, `NoVxlan`, `NoMacvlan`, `NotPermitted`, `NoSuchLink`, `LinkExists`,
//!   `NotABridge`).
//! - Dumps are not filtered by the kernel: `routes`, `neighbours` and `fdb` dump the
//!   family and keep what was asked for.
//!
//! The methods live by object: `links.rs` (links, addresses), `routes.rs`, `neigh.rs`,
//! `fdb.rs`, `bridge.rs` (a bridge's ports and FDB, and a watcher of their changes,
//! for port steering), `rules.rs`, `nexthop.rs` (nexthop objects, which the rtnetlink crates do
//! not model: their messages go over a second NETLINK_ROUTE socket of their own),
//! `netns.rs` (other namespaces seen from this one: netnsids, veth peers, and their
//! addresses over a third socket with strict checking, which targeted dumps need).
//! `nft/` is the one part on another netlink family: per-prefix traffic counters in
//! nftables over NETLINK_NETFILTER ([`Nft`]).
//!
//! Requests may be pipelined: each method sends its request when first polled, so
//! callers that poll many at once (`futures::StreamExt::buffered`) keep them in flight
//! together. The kernel handles one socket's requests in the order they were sent.

mod bridge;
mod error;
mod fdb;
mod links;
mod neigh;
mod netns;
mod nexthop;
pub mod nft;
mod routes;
mod rules;

pub use bridge::{is_bridge_change, BridgeFdbEntry, BridgeWatcher};
pub use error::KernelError;
pub use netns::VethPort;
pub use nft::{
    AddrField, BaseHook, ChainSpec, CounterDump, CounterReading, Direction, Family, Hook,
    Ipv4Range, MarkCounterReading, Match, Nft, PrefixCounter, RuleCounterReading, RuleReading,
    RuleSpec, RuleVerdict, SetElements, SetReading, SetSpec, Slot, Statement, TableSpec,
    MAX_COMMENT_LEN, MAX_OWNER_LEN,
};

use error::{classify, Context};
use futures::StreamExt;
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use std::net::Ipv4Addr;
use vrouter_state::{Mac, Prefix, Vni};

pub type Result<T> = std::result::Result<T, KernelError>;

/// A link as the kernel reports it. `Default` is for building values in tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// IFLA_INFO_KIND: "vxlan", "macvlan", "bridge", "veth", ... (None for plain devices).
    pub kind: Option<String>,
    pub mac: Option<Mac>,
    pub mtu: u32,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// IFLA_LINK: the lower device (for macvlan, vxlan's underlay is in `vxlan.underlay`;
    /// for veth, the peer). After a move to another namespace it is an index in the
    /// namespace the link came from.
    pub parent: Option<u32>,
    pub vxlan: Option<VxlanInfo>,
    /// IFLA_IFALIAS (`ip link set ... alias`): discovery marks the devices it makes
    /// with it, so it never deletes or changes a device it did not make.
    pub alias: Option<String>,
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
    /// Source address of the encapsulated packets; None: none set, the kernel picks
    /// it by route for each destination (needed when some go through a tunnel
    /// interface with an address of its own).
    pub local: Option<Ipv4Addr>,
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
    /// RTA_NH_ID: the route forwards through this nexthop object, which holds the
    /// gateway and link; `gateway`, `oif` and `onlink` are then unset (the copies the
    /// kernel adds to dumps are dropped).
    pub nexthop: Option<u32>,
}

/// An IPv4 nexthop object (`ip nexthop`): a gateway on a link that routes refer to
/// by id. The kernel installs routes through nexthop objects in linear time, while
/// routes with a distinct gateway each take quadratic time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nexthop {
    pub id: u32,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub onlink: bool,
    /// Nexthops this project owns carry `vrouter_state::RTPROT_VROUTER`.
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
///
/// Cloning is cheap and shares the socket.
#[derive(Clone)]
pub struct Kernel {
    handle: rtnetlink::Handle,
    /// The socket for nexthop objects (see `nexthop.rs`).
    nexthops: nexthop::Handle,
    /// A routing socket with NETLINK_GET_STRICT_CHK: the kernel honours a dump's
    /// IFA_TARGET_NETNSID only in strict mode (see `netns.rs`).
    strict: rtnetlink::Handle,
}

impl Kernel {
    /// Opens a netlink socket in the calling thread's network namespace and spawns its
    /// connection task on the current tokio runtime.
    ///
    /// The socket is created here, on this thread, so it stays in this namespace even
    /// when the connection task later runs on another worker thread.
    pub async fn connect() -> Result<Kernel> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|errno| KernelError::Errno {
                op: "open a NETLINK_ROUTE socket".into(),
                errno: nix::errno::Errno::from_raw(errno.raw_os_error().unwrap_or(0)),
            })?;
        tokio::spawn(connection);
        let nexthops = nexthop::connect()?;
        let strict = netns::connect_strict()?;
        Ok(Kernel {
            handle,
            nexthops,
            strict,
        })
    }

    /// Sends one request and waits for its ACK. `flags` come on top of
    /// NLM_F_REQUEST | NLM_F_ACK.
    async fn ack(
        &self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> std::result::Result<(), rtnetlink::Error> {
        let mut request = NetlinkMessage::from(message);
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut responses = self.handle.clone().request(request)?;
        while let Some(response) = responses.next().await {
            if let NetlinkPayload::Error(err) = response.payload {
                if err.code.is_some() {
                    return Err(rtnetlink::Error::NetlinkError(err));
                }
            }
        }
        Ok(())
    }

    /// Sends a get request (a dump when `dump` is set) and collects the answers.
    async fn get(
        &self,
        message: RouteNetlinkMessage,
        dump: bool,
    ) -> std::result::Result<Vec<RouteNetlinkMessage>, rtnetlink::Error> {
        get_on(&self.handle, message, dump).await
    }
}

/// Sends a get request on `handle`'s socket and collects the answers.
async fn get_on(
    handle: &rtnetlink::Handle,
    message: RouteNetlinkMessage,
    dump: bool,
) -> std::result::Result<Vec<RouteNetlinkMessage>, rtnetlink::Error> {
    let mut request = NetlinkMessage::from(message);
    request.header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
    let mut responses = handle.clone().request(request)?;
    let mut out = Vec::new();
    while let Some(response) = responses.next().await {
        match response.payload {
            NetlinkPayload::InnerMessage(inner) => out.push(inner),
            NetlinkPayload::Error(err) if err.code.is_some() => {
                return Err(rtnetlink::Error::NetlinkError(err));
            }
            _ => {}
        }
    }
    Ok(out)
}

impl Kernel {
    /// "vxlan1000 (index 5)" when the link can still be found, else "index 5": for
    /// error messages only.
    async fn link_label(&self, index: u32) -> String {
        match self.link_by_index(index).await {
            Ok(Some(link)) => format!("{} (index {index})", link.name),
            _ => format!("index {index}"),
        }
    }

    /// Classifies a failure of a request on one link, naming the link in the error.
    async fn link_failure(
        &self,
        op: &'static str,
        index: u32,
        source: rtnetlink::Error,
    ) -> KernelError {
        let label = self.link_label(index).await;
        classify(op, format!("link {label}"), Context::Link(label), source)
    }
}
