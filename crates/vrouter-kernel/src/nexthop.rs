//! IPv4 nexthop objects (RTM_NEWNEXTHOP, RTM_DELNEXTHOP, RTM_GETNEXTHOP).
//!
//! netlink-packet-route has no nexthop messages, so they are built here as a small
//! payload type for netlink-proto, which carries them over a NETLINK_ROUTE socket of
//! their own (opened with the routing socket, in the same namespace). Routes refer to
//! nexthops through RTA_NH_ID, which netlink-packet-route does model (`routes.rs`).

use crate::error::{classify, is_gone, Context};
use crate::{Kernel, KernelError, Nexthop, Result};
use futures::StreamExt;
use rtnetlink::packet_core::{
    DecodeError, DefaultNla, Emitable, NetlinkDeserializable, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable, Nla, NlaBuffer, NlasIterator, Parseable, NLM_F_ACK,
    NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST,
};
use rtnetlink::proto::{self, ConnectionHandle};
use rtnetlink::sys::{protocols::NETLINK_ROUTE, SocketAddr};
use std::net::Ipv4Addr;

// include/uapi/linux/rtnetlink.h and nexthop.h
const RTM_NEWNEXTHOP: u16 = 104;
const RTM_DELNEXTHOP: u16 = 105;
const RTM_GETNEXTHOP: u16 = 106;
const NHA_ID: u16 = 1;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const RTNH_F_ONLINK: u32 = 4;
const AF_INET: u8 = libc::AF_INET as u8;

pub(crate) type Handle = ConnectionHandle<NexthopMessage>;

/// Opens the nexthop socket in the calling thread's namespace and spawns its
/// connection task.
pub(crate) fn connect() -> Result<Handle> {
    let (connection, handle, _) =
        proto::new_connection::<NexthopMessage>(NETLINK_ROUTE).map_err(|e| KernelError::Errno {
            op: "open a NETLINK_ROUTE socket for nexthops".into(),
            errno: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        })?;
    tokio::spawn(connection);
    Ok(handle)
}

/// A nexthop message: `struct nhmsg` and its attributes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct NexthopMessage {
    kind: u16,
    family: u8,
    scope: u8,
    protocol: u8,
    flags: u32,
    attributes: Vec<DefaultNla>,
}

const HEADER_LEN: usize = 8;

impl NetlinkSerializable for NexthopMessage {
    fn message_type(&self) -> u16 {
        self.kind
    }
    fn buffer_len(&self) -> usize {
        HEADER_LEN + self.attributes.as_slice().buffer_len()
    }
    fn serialize(&self, buffer: &mut [u8]) {
        buffer[0] = self.family;
        buffer[1] = self.scope;
        buffer[2] = self.protocol;
        buffer[3] = 0;
        buffer[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        self.attributes.as_slice().emit(&mut buffer[HEADER_LEN..]);
    }
}

impl NetlinkDeserializable for NexthopMessage {
    type Error = DecodeError;
    fn deserialize(
        header: &NetlinkHeader,
        payload: &[u8],
    ) -> std::result::Result<Self, Self::Error> {
        if payload.len() < HEADER_LEN {
            return Err(DecodeError::from(
                "nexthop message shorter than struct nhmsg",
            ));
        }
        let mut attributes = Vec::new();
        for nla in NlasIterator::new(&payload[HEADER_LEN..]) {
            let nla: NlaBuffer<&[u8]> = nla?;
            attributes.push(DefaultNla::parse(&nla)?);
        }
        Ok(NexthopMessage {
            kind: header.message_type,
            family: payload[0],
            scope: payload[1],
            protocol: payload[2],
            flags: u32::from_ne_bytes(payload[4..8].try_into().expect("four bytes")),
            attributes,
        })
    }
}

impl Kernel {
    /// IPv4 nexthop objects (`ip nexthop show`). A kernel without nexthop objects
    /// (before 5.3) answers [`KernelError::NoNexthops`].
    pub async fn nexthops(&self) -> Result<Vec<Nexthop>> {
        let request = NexthopMessage {
            kind: RTM_GETNEXTHOP,
            ..NexthopMessage::default()
        };
        let answers = self
            .nexthop_request(request, NLM_F_DUMP)
            .await
            .map_err(|e| {
                classify(
                    "dump nexthops",
                    "the nexthop table".into(),
                    Context::Nexthop { dump: true },
                    e,
                )
            })?;
        Ok(answers.into_iter().filter_map(nexthop_of).collect())
    }

    /// `ip nexthop replace id ID via GATEWAY dev INDEX [onlink] proto P`: idempotent.
    pub async fn replace_nexthop(&self, nexthop: &Nexthop) -> Result<()> {
        self.nexthop_request(nexthop_message(nexthop), NLM_F_CREATE | NLM_F_REPLACE)
            .await
            .map(drop)
            .map_err(|e| {
                classify(
                    "replace nexthop",
                    describe(nexthop),
                    Context::Nexthop { dump: false },
                    e,
                )
            })
    }

    /// `ip nexthop del id ID`. The kernel deletes the routes that use it with it. A
    /// nexthop that is already gone is not an error.
    pub async fn delete_nexthop(&self, id: u32) -> Result<()> {
        let message = NexthopMessage {
            kind: RTM_DELNEXTHOP,
            attributes: vec![DefaultNla::new(NHA_ID, id.to_ne_bytes().to_vec())],
            ..NexthopMessage::default()
        };
        match self.nexthop_request(message, 0).await {
            Ok(_) => Ok(()),
            Err(e) if is_gone(&e) => Ok(()),
            Err(e) => Err(classify(
                "delete nexthop",
                format!("id {id}"),
                Context::Nexthop { dump: false },
                e,
            )),
        }
    }

    /// Sends one request and collects the nexthops in the answer: a dump when `flags`
    /// is NLM_F_DUMP, else an acknowledged request (NLM_F_REPLACE shares a bit with
    /// NLM_F_DUMP, so the two are told apart by equality).
    async fn nexthop_request(
        &self,
        message: NexthopMessage,
        flags: u16,
    ) -> std::result::Result<Vec<NexthopMessage>, rtnetlink::Error> {
        let mut request = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(message),
        );
        request.header.flags =
            NLM_F_REQUEST | flags | if flags != NLM_F_DUMP { NLM_F_ACK } else { 0 };
        request.finalize();
        let mut responses = self
            .nexthops
            .request(request, SocketAddr::new(0, 0))
            .map_err(|_| rtnetlink::Error::RequestFailed)?;
        let mut out = Vec::new();
        while let Some(response) = responses.next().await {
            match response.payload {
                NetlinkPayload::InnerMessage(m) => out.push(m),
                NetlinkPayload::Error(err) if err.code.is_some() => {
                    return Err(rtnetlink::Error::NetlinkError(err));
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

/// "id 167903998 via 10.2.0.254 dev index 5 onlink proto 118", as `ip nexthop` says it.
fn describe(nexthop: &Nexthop) -> String {
    let mut s = format!("id {}", nexthop.id);
    if let Some(gw) = nexthop.gateway {
        s += &format!(" via {gw}");
    }
    if let Some(oif) = nexthop.oif {
        s += &format!(" dev index {oif}");
    }
    if nexthop.onlink {
        s += " onlink";
    }
    s + &format!(" proto {}", nexthop.protocol)
}

fn nexthop_message(nexthop: &Nexthop) -> NexthopMessage {
    let mut attributes = vec![DefaultNla::new(NHA_ID, nexthop.id.to_ne_bytes().to_vec())];
    if let Some(oif) = nexthop.oif {
        attributes.push(DefaultNla::new(NHA_OIF, oif.to_ne_bytes().to_vec()));
    }
    if let Some(gw) = nexthop.gateway {
        attributes.push(DefaultNla::new(NHA_GATEWAY, gw.octets().to_vec()));
    }
    NexthopMessage {
        kind: RTM_NEWNEXTHOP,
        family: AF_INET,
        scope: 0,
        protocol: nexthop.protocol,
        flags: if nexthop.onlink { RTNH_F_ONLINK } else { 0 },
        attributes,
    }
}

/// An IPv4 nexthop from a dump; groups, blackholes and IPv6 nexthops are skipped
/// (nothing of this project's is one).
fn nexthop_of(message: NexthopMessage) -> Option<Nexthop> {
    if message.kind != RTM_NEWNEXTHOP || message.family != AF_INET {
        return None;
    }
    let mut nexthop = Nexthop {
        id: 0,
        gateway: None,
        oif: None,
        onlink: message.flags & RTNH_F_ONLINK != 0,
        protocol: message.protocol,
    };
    for nla in &message.attributes {
        let mut value = vec![0; nla.value_len()];
        nla.emit_value(&mut value);
        match (nla.kind(), value.len()) {
            (NHA_ID, 4) => nexthop.id = u32::from_ne_bytes(value.try_into().ok()?),
            (NHA_OIF, 4) => nexthop.oif = Some(u32::from_ne_bytes(value.try_into().ok()?)),
            (NHA_GATEWAY, 4) => {
                nexthop.gateway = Some(Ipv4Addr::from(<[u8; 4]>::try_from(value).ok()?))
            }
            _ => {}
        }
    }
    (nexthop.id != 0 && nexthop.oif.is_some()).then_some(nexthop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nexthop() -> Nexthop {
        Nexthop {
            id: 0x0a02_00fe,
            gateway: Some(Ipv4Addr::new(10, 2, 0, 254)),
            oif: Some(7),
            onlink: true,
            protocol: vrouter_state::RTPROT_VROUTER,
        }
    }

    /// Serialises as the kernel reads it, and parses back (the kernel answers a dump
    /// in the same layout).
    #[test]
    fn message_round_trips_through_bytes() {
        let mut message = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(nexthop_message(&nexthop())),
        );
        message.header.flags = NLM_F_REQUEST;
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        // nlmsghdr (16), nhmsg (8), NHA_ID, NHA_OIF, NHA_GATEWAY (8 each).
        assert_eq!(bytes.len(), 16 + 8 + 3 * 8);
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), RTM_NEWNEXTHOP);
        assert_eq!(&bytes[16..20], &[AF_INET, 0, 118, 0]);
        assert_eq!(
            u32::from_ne_bytes(bytes[20..24].try_into().unwrap()),
            RTNH_F_ONLINK
        );
        assert_eq!(&bytes[44..48], &[10, 2, 0, 254]);
        let back = NetlinkMessage::<NexthopMessage>::deserialize(&bytes).unwrap();
        let NetlinkPayload::InnerMessage(inner) = back.payload else {
            panic!("{back:?}")
        };
        assert_eq!(nexthop_of(inner), Some(nexthop()));
    }

    #[test]
    fn other_families_and_groups_are_skipped() {
        let mut m = nexthop_message(&nexthop());
        m.family = libc::AF_INET6 as u8;
        assert_eq!(nexthop_of(m), None);
        // A group has an id but no link.
        let mut m = nexthop_message(&nexthop());
        m.attributes.retain(|a| a.kind() == NHA_ID);
        assert_eq!(nexthop_of(m), None);
    }

    #[test]
    fn description_names_the_nexthop() {
        assert_eq!(
            describe(&nexthop()),
            "id 167903486 via 10.2.0.254 dev index 7 onlink proto 118"
        );
    }
}
