//! Forwarding-database rows on VXLAN devices: AF_BRIDGE neighbours with NTF_SELF, as
//! `bridge fdb ... self` writes them.

use crate::error::{classify, is_gone, Context};
use crate::{FdbEntry, Kernel, Result};
use rtnetlink::packet_core::{NLM_F_APPEND, NLM_F_CREATE, NLM_F_REPLACE};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use std::net::Ipv4Addr;
use vrouter_state::Mac;

impl Kernel {
    /// The VXLAN device's own FDB rows (NTF_SELF), one per (MAC, destination): the
    /// all-zeros flood list shows as one row per remote.
    pub async fn fdb(&self, index: u32) -> Result<Vec<FdbEntry>> {
        let all = self
            .dump_neighbours(AddressFamily::Bridge, "dump fdb", index, fdb_entry_of)
            .await?;
        Ok(all.into_iter().filter(|e| e.index == index).collect())
    }

    /// `bridge fdb append MAC dev INDEX dst DST self permanent` (several dsts per MAC:
    /// the all-zeros flood list). Appending a destination already listed is a no-op.
    pub async fn append_fdb(&self, index: u32, mac: Mac, dst: Ipv4Addr) -> Result<()> {
        self.write_fdb(
            "append fdb entry",
            index,
            mac,
            dst,
            NLM_F_CREATE | NLM_F_APPEND,
        )
        .await
    }

    /// `bridge fdb replace MAC dev INDEX dst DST self permanent`. The kernel refuses
    /// this for the all-zeros and multicast MACs (EOPNOTSUPP): use `append_fdb` there.
    pub async fn replace_fdb(&self, index: u32, mac: Mac, dst: Ipv4Addr) -> Result<()> {
        self.write_fdb(
            "replace fdb entry",
            index,
            mac,
            dst,
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
    }

    async fn write_fdb(
        &self,
        op: &'static str,
        index: u32,
        mac: Mac,
        dst: Ipv4Addr,
        flags: u16,
    ) -> Result<()> {
        let mut message = fdb_message(index, mac, Some(dst));
        message.header.state = NeighbourState::Permanent;
        match self
            .ack(RouteNetlinkMessage::NewNeighbour(message), flags)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => {
                let label = self.link_label(index).await;
                let what = format!("{mac} dst {dst} dev {label}");
                Err(classify(op, what, Context::Link(label), e))
            }
        }
    }

    /// `bridge fdb del MAC dev INDEX [dst DST] self`. With `dst`, only that destination
    /// goes (one remote of the flood list); without, the whole row. A row (or link)
    /// that is already gone is not an error (ENOENT or ENODEV => Ok).
    pub async fn delete_fdb(&self, index: u32, mac: Mac, dst: Option<Ipv4Addr>) -> Result<()> {
        let message = fdb_message(index, mac, dst);
        match self
            .ack(RouteNetlinkMessage::DelNeighbour(message), 0)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_gone(&e) => Ok(()),
            Err(e) => {
                let label = self.link_label(index).await;
                let what = match dst {
                    Some(dst) => format!("{mac} dst {dst} dev {label}"),
                    None => format!("{mac} dev {label}"),
                };
                Err(classify("delete fdb entry", what, Context::Link(label), e))
            }
        }
    }
}

fn fdb_message(index: u32, mac: Mac, dst: Option<Ipv4Addr>) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Bridge;
    message.header.ifindex = index;
    message.header.flags = NeighbourFlags::Own;
    message
        .attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    if let Some(dst) = dst {
        message
            .attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
    }
    message
}

fn fdb_entry_of(message: NeighbourMessage) -> Option<FdbEntry> {
    // The device's own table only: rows of a bridge master (NTF_MASTER) are another
    // device's.
    if message.header.family != AddressFamily::Bridge
        || !message.header.flags.contains(NeighbourFlags::Own)
    {
        return None;
    }
    let mut mac = None;
    let mut dst = None;
    for attribute in message.attributes {
        match attribute {
            NeighbourAttribute::LinkLayerAddress(bytes) => {
                mac = <[u8; 6]>::try_from(bytes).ok().map(Mac)
            }
            // In AF_BRIDGE messages netlink-packet-route cannot tell the address
            // family of NDA_DST and hands over raw bytes.
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => dst = Some(a),
            NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => {
                dst = <[u8; 4]>::try_from(bytes).ok().map(Ipv4Addr::from)
            }
            _ => {}
        }
    }
    Some(FdbEntry {
        index: message.header.ifindex,
        mac: mac?,
        dst,
        permanent: message.header.state == NeighbourState::Permanent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trips() {
        let mac = Mac([2, 0xe8, 10, 2, 0, 0xfe]);
        let dst = Ipv4Addr::new(198, 18, 0, 2);
        let mut m = fdb_message(5, mac, Some(dst));
        m.header.state = NeighbourState::Permanent;
        let entry = fdb_entry_of(m).unwrap();
        assert_eq!(
            entry,
            FdbEntry {
                index: 5,
                mac,
                dst: Some(dst),
                permanent: true
            }
        );
    }

    #[test]
    fn destination_as_parsed_from_a_bridge_dump() {
        let mut m = fdb_message(5, Mac::ZERO, None);
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Other(
                vec![198, 18, 0, 2],
            )));
        assert_eq!(
            fdb_entry_of(m).unwrap().dst,
            Some(Ipv4Addr::new(198, 18, 0, 2))
        );
    }

    #[test]
    fn bridge_master_rows_are_not_the_devices() {
        let mut m = fdb_message(5, Mac::ZERO, None);
        m.header.flags = NeighbourFlags::Controller;
        assert!(fdb_entry_of(m).is_none());
    }
}
