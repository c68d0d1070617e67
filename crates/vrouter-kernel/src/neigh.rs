//! IPv4 neighbour (ARP) entries.

use crate::error::{classify, is_gone, Context};
use crate::{Kernel, Neighbour, Result};
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::RouteType;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use std::net::Ipv4Addr;
use vrouter_state::Mac;

impl Kernel {
    /// IPv4 neighbours on link `index`.
    pub async fn neighbours(&self, index: u32) -> Result<Vec<Neighbour>> {
        let all = self
            .dump_neighbours(AddressFamily::Inet, "dump neighbours", index, neighbour_of)
            .await?;
        Ok(all.into_iter().filter(|n| n.index == index).collect())
    }

    /// Dumps the neighbour table of one family (IPv4 ARP, or AF_BRIDGE for FDB rows),
    /// converting each entry with `convert`; entries it cannot read are skipped.
    pub(crate) async fn dump_neighbours<T>(
        &self,
        family: AddressFamily,
        op: &'static str,
        index: u32,
        convert: impl Fn(NeighbourMessage) -> Option<T>,
    ) -> Result<Vec<T>> {
        let mut message = NeighbourMessage::default();
        message.header.family = family;
        let answers = self
            .get(RouteNetlinkMessage::GetNeighbour(message), true)
            .await
            .map_err(|e| classify(op, format!("link index {index}"), Context::Plain, e))?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewNeighbour(m) => convert(m),
                _ => None,
            })
            .collect())
    }

    /// `ip neigh replace IP lladdr MAC dev INDEX nud permanent`: idempotent.
    pub async fn replace_neighbour(&self, index: u32, ip: Ipv4Addr, mac: Mac) -> Result<()> {
        let mut message = neighbour_message(index, ip);
        message.header.state = NeighbourState::Permanent;
        message
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        match self
            .ack(
                RouteNetlinkMessage::NewNeighbour(message),
                NLM_F_CREATE | NLM_F_REPLACE,
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => {
                let label = self.link_label(index).await;
                let what = format!("{ip} lladdr {mac} dev {label}");
                Err(classify("replace neighbour", what, Context::Link(label), e))
            }
        }
    }

    /// `ip neigh del IP dev INDEX`. A neighbour (or link) that is already gone is not an
    /// error (ENOENT or ENODEV => Ok).
    pub async fn delete_neighbour(&self, index: u32, ip: Ipv4Addr) -> Result<()> {
        let message = neighbour_message(index, ip);
        match self
            .ack(RouteNetlinkMessage::DelNeighbour(message), 0)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_gone(&e) => Ok(()),
            Err(e) => {
                let label = self.link_label(index).await;
                let what = format!("{ip} dev {label}");
                Err(classify("delete neighbour", what, Context::Link(label), e))
            }
        }
    }
}

fn neighbour_message(index: u32, ip: Ipv4Addr) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.ifindex = index;
    message.header.kind = RouteType::Unspec;
    message
        .attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    message
}

fn neighbour_of(message: NeighbourMessage) -> Option<Neighbour> {
    if message.header.family != AddressFamily::Inet {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for attribute in message.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(a),
            NeighbourAttribute::LinkLayerAddress(bytes) => {
                mac = <[u8; 6]>::try_from(bytes).ok().map(Mac)
            }
            _ => {}
        }
    }
    Some(Neighbour {
        index: message.header.ifindex,
        ip: ip?,
        mac,
        permanent: message.header.state == NeighbourState::Permanent,
    })
}
