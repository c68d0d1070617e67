//! Other network namespaces seen from this one, without entering them (entering takes
//! CAP_SYS_ADMIN; all of this works with CAP_NET_ADMIN alone):
//!
//! - the id this namespace knows another by (RTM_GETNSID on a namespace descriptor);
//!   the kernel assigns one to a veth peer's namespace when it reports the veth's
//!   IFLA_LINK_NETNSID, so a namespace behind a veth port of this one has one after a
//!   link dump;
//! - the veth ports of this namespace whose peer lives in another (IFLA_MASTER,
//!   IFLA_LINK = the peer's index there, IFLA_LINK_NETNSID);
//! - the IPv4 addresses of another namespace by its id (RTM_GETADDR dump with
//!   IFA_TARGET_NETNSID). The kernel honours IFA_TARGET_NETNSID in address dumps only
//!   with NETLINK_GET_STRICT_CHK on the socket (and silently dumps this namespace
//!   without it), so that dump goes over a socket of its own in strict mode.

use crate::error::{classify, Context};
use crate::{get_on, Address, Kernel, KernelError, Result};
use futures::StreamExt;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::nsid::{NsidAttribute, NsidMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::AsyncSocket;
use std::os::fd::{AsRawFd, BorrowedFd};

/// A veth end in this namespace whose peer lives in another namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethPort {
    pub index: u32,
    pub name: String,
    /// IFLA_MASTER: the bridge this end is a port of.
    pub master: Option<u32>,
    /// IFLA_LINK: the peer's index in its own namespace.
    pub peer_index: u32,
    /// IFLA_LINK_NETNSID: the id this namespace knows the peer's namespace by.
    pub peer_netnsid: i32,
}

/// Opens the strict routing socket in the calling thread's namespace.
pub(crate) fn connect_strict() -> Result<rtnetlink::Handle> {
    let (mut connection, handle, _) =
        rtnetlink::new_connection().map_err(|errno| KernelError::Errno {
            op: "open a NETLINK_ROUTE socket".into(),
            errno: nix::errno::Errno::from_raw(errno.raw_os_error().unwrap_or(0)),
        })?;
    connection
        .socket_mut()
        .socket_mut()
        .set_netlink_get_strict_chk(true)
        .map_err(|errno| KernelError::Errno {
            op: "set NETLINK_GET_STRICT_CHK".into(),
            errno: nix::errno::Errno::from_raw(errno.raw_os_error().unwrap_or(0)),
        })?;
    tokio::spawn(connection);
    Ok(handle)
}

impl Kernel {
    /// The id this namespace knows the namespace `ns` by; `None` when it has none
    /// (nothing in this namespace refers to it).
    pub async fn netns_id(&self, ns: BorrowedFd<'_>) -> Result<Option<i32>> {
        let mut message = NsidMessage::default();
        message
            .attributes
            .push(NsidAttribute::Fd(ns.as_raw_fd() as u32));
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(message));
        request.header.flags = NLM_F_REQUEST;
        let fail = |e| {
            classify(
                "get netnsid",
                "a namespace descriptor".into(),
                Context::Plain,
                e,
            )
        };
        let mut responses = self.handle.clone().request(request).map_err(fail)?;
        let mut id = None;
        while let Some(response) = responses.next().await {
            match response.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => {
                    for a in m.attributes {
                        if let NsidAttribute::Id(i) = a {
                            // NETNSA_NSID_NOT_ASSIGNED is -1.
                            id = (i >= 0).then_some(i);
                        }
                    }
                }
                NetlinkPayload::Error(err) if err.code.is_some() => {
                    return Err(fail(rtnetlink::Error::NetlinkError(err)));
                }
                _ => {}
            }
        }
        Ok(id)
    }

    /// The veth ports of this namespace whose peer lives in another namespace. The
    /// dump also makes the kernel assign an id to each peer's namespace.
    pub async fn foreign_veths(&self) -> Result<Vec<VethPort>> {
        let answers = self
            .get(RouteNetlinkMessage::GetLink(LinkMessage::default()), true)
            .await
            .map_err(|e| classify("dump links", "this namespace".into(), Context::Plain, e))?;
        Ok(answers.into_iter().filter_map(veth_port_of).collect())
    }

    /// The IPv4 addresses of the namespace this one knows as `nsid`.
    pub async fn addresses_in(&self, nsid: i32) -> Result<Vec<Address>> {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message
            .attributes
            .push(AddressAttribute::TargetNetNsId(nsid));
        let answers = get_on(&self.strict, RouteNetlinkMessage::GetAddress(message), true)
            .await
            .map_err(|e| {
                classify(
                    "dump addresses",
                    format!("namespace with netnsid {nsid}"),
                    Context::Plain,
                    e,
                )
            })?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewAddress(m) => crate::links::address_of(m),
                _ => None,
            })
            .collect())
    }
}

fn veth_port_of(answer: RouteNetlinkMessage) -> Option<VethPort> {
    let RouteNetlinkMessage::NewLink(message) = answer else {
        return None;
    };
    let (mut name, mut master, mut peer, mut netnsid, mut veth) = (None, None, None, None, false);
    for attribute in message.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name = Some(n),
            LinkAttribute::Controller(m) => master = Some(m),
            LinkAttribute::Link(p) => peer = Some(p),
            LinkAttribute::LinkNetNsId(id) => netnsid = Some(id),
            LinkAttribute::LinkInfo(infos) => {
                veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            _ => {}
        }
    }
    if !veth {
        return None;
    }
    Some(VethPort {
        index: message.header.index,
        name: name?,
        master,
        peer_index: peer?,
        peer_netnsid: netnsid.filter(|id| *id >= 0)?,
    })
}
