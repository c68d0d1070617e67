//! What port steering observes of a Linux bridge: its ports (links whose IFLA_MASTER
//! is the bridge), its forwarding database (which MAC was learned on which port), and
//! a watcher that reports link and bridge-FDB changes as they happen.
//!
//! The watcher only says "something changed": it carries no state. The caller
//! debounces the notices and dumps again (ports and FDB are small), so a notice that
//! was lost (a full socket buffer) or coalesced costs nothing but latency; the
//! caller's timer reconcile repairs what a lost notice would leave stale.

use crate::error::{classify, Context};
use crate::links::link_of;
use crate::{Kernel, KernelError, Link, Result};
use futures::channel::mpsc::UnboundedReceiver;
use futures::StreamExt;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAttribute, NeighbourMessage, NeighbourState};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::MulticastGroup;
use std::collections::BTreeMap;
use vrouter_state::Mac;

/// A row of a bridge's forwarding database (`bridge fdb show br BR`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BridgeFdbEntry {
    pub mac: Mac,
    /// The port the MAC is behind (the bridge's own index for the bridge's rows).
    pub port: u32,
    /// Learned from traffic (a dynamic row); false for the ports' own addresses
    /// (`permanent`, "local") and rows added by hand (`static`).
    pub learned: bool,
}

impl Kernel {
    /// The links whose master is the bridge `bridge` (its ports), in index order.
    pub async fn bridge_ports(&self, bridge: u32) -> Result<Vec<Link>> {
        let mut all = self.ports_of_bridges(&[bridge]).await?;
        Ok(all.remove(&bridge).unwrap_or_default())
    }

    /// The ports of each of `bridges`, from one link dump (a bridge without ports
    /// has an empty list).
    pub async fn ports_of_bridges(&self, bridges: &[u32]) -> Result<BTreeMap<u32, Vec<Link>>> {
        let answers = self
            .get(RouteNetlinkMessage::GetLink(LinkMessage::default()), true)
            .await
            .map_err(|e| {
                classify(
                    "dump links",
                    "for the ports of bridges".into(),
                    Context::Plain,
                    e,
                )
            })?;
        let mut out: BTreeMap<u32, Vec<Link>> = bridges.iter().map(|b| (*b, Vec::new())).collect();
        for answer in answers {
            let Some(ports) = master_of(&answer).and_then(|m| out.get_mut(&m)) else {
                continue;
            };
            ports.extend(link_of(answer));
        }
        for ports in out.values_mut() {
            ports.sort_by_key(|l| l.index);
        }
        Ok(out)
    }

    /// The forwarding database of the bridge `bridge`: one row per (MAC, port), the
    /// bridge's own rows included (their `port` is the bridge). VLAN-tagged copies of
    /// a row show once.
    pub async fn bridge_fdb(&self, bridge: u32) -> Result<Vec<BridgeFdbEntry>> {
        let mut all = self.fdb_of_bridges(&[bridge]).await?;
        Ok(all.remove(&bridge).unwrap_or_default())
    }

    /// The forwarding databases of `bridges`, from one AF_BRIDGE neighbour dump.
    pub async fn fdb_of_bridges(
        &self,
        bridges: &[u32],
    ) -> Result<BTreeMap<u32, Vec<BridgeFdbEntry>>> {
        let rows = self
            .dump_neighbours(
                AddressFamily::Bridge,
                "dump bridge fdb",
                bridges.first().copied().unwrap_or(0),
                |m| bridge_row_of(m, bridges),
            )
            .await?;
        let mut out: BTreeMap<u32, Vec<BridgeFdbEntry>> =
            bridges.iter().map(|b| (*b, Vec::new())).collect();
        for (bridge, row) in rows {
            out.entry(bridge).or_default().push(row);
        }
        for rows in out.values_mut() {
            rows.sort();
            rows.dedup();
        }
        Ok(out)
    }

    /// Subscribes to link events (RTNLGRP_LINK) and neighbour events (RTNLGRP_NEIGH)
    /// of this namespace; [`BridgeWatcher::changed`] reports those that can change a
    /// bridge's ports or its FDB. The socket is made on the calling thread, so it
    /// watches that thread's namespace.
    pub fn watch_bridges() -> Result<BridgeWatcher> {
        let (connection, _handle, messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link, MulticastGroup::Neigh])
                .map_err(|errno| KernelError::Errno {
                    op: "open a NETLINK_ROUTE socket for link and neighbour events".into(),
                    errno: nix::errno::Errno::from_raw(errno.raw_os_error().unwrap_or(0)),
                })?;
        tokio::spawn(connection);
        Ok(BridgeWatcher { messages })
    }
}

/// Link and bridge-FDB change notices of one namespace (see [`Kernel::watch_bridges`]).
pub struct BridgeWatcher {
    messages: UnboundedReceiver<(
        NetlinkMessage<RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
}

impl BridgeWatcher {
    /// Waits for the next event that concerns a bridge's ports or FDB. `None` when
    /// the socket's connection ended (the caller may watch again).
    pub async fn changed(&mut self) -> Option<()> {
        while let Some((message, _)) = self.messages.next().await {
            if let NetlinkPayload::InnerMessage(inner) = &message.payload {
                if is_bridge_change(inner) {
                    return Some(());
                }
            }
        }
        None
    }
}

/// Whether an rtnetlink event can change a bridge's ports or its FDB: any link event
/// (a port added, removed, renamed, moved to another master, its MAC changed), and
/// AF_BRIDGE neighbour events (FDB rows). IPv4 and IPv6 neighbour events (ARP) do not.
pub fn is_bridge_change(message: &RouteNetlinkMessage) -> bool {
    match message {
        RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_) => true,
        RouteNetlinkMessage::NewNeighbour(m) | RouteNetlinkMessage::DelNeighbour(m) => {
            m.header.family == AddressFamily::Bridge
        }
        _ => false,
    }
}

/// IFLA_MASTER of a link message.
fn master_of(answer: &RouteNetlinkMessage) -> Option<u32> {
    let RouteNetlinkMessage::NewLink(message) = answer else {
        return None;
    };
    message.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(m) => Some(*m),
        _ => None,
    })
}

/// A row of one of `bridges`' FDBs, with that bridge: the kernel marks the rows of a
/// port with NDA_MASTER (the bridge); the bridge's own rows are on the bridge itself.
fn bridge_row_of(message: NeighbourMessage, bridges: &[u32]) -> Option<(u32, BridgeFdbEntry)> {
    let (master, row) = fdb_row_of(message)?;
    let bridge = master
        .filter(|b| bridges.contains(b))
        .or_else(|| bridges.contains(&row.port).then_some(row.port))?;
    Some((bridge, row))
}

/// An AF_BRIDGE neighbour as a bridge FDB row, with its NDA_MASTER.
fn fdb_row_of(message: NeighbourMessage) -> Option<(Option<u32>, BridgeFdbEntry)> {
    if message.header.family != AddressFamily::Bridge {
        return None;
    }
    let mut mac = None;
    let mut master = None;
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::LinkLayerAddress(bytes) => {
                mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(Mac)
            }
            NeighbourAttribute::Controller(m) => master = Some(*m),
            _ => {}
        }
    }
    let learned = !matches!(
        message.header.state,
        NeighbourState::Permanent | NeighbourState::Noarp
    );
    Some((
        master,
        BridgeFdbEntry {
            mac: mac?,
            port: message.header.ifindex,
            learned,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::neighbour::NeighbourFlags;

    /// The row as bridge 3's FDB sees it.
    fn row_of(m: NeighbourMessage) -> Option<BridgeFdbEntry> {
        bridge_row_of(m, &[3]).map(|(bridge, r)| {
            assert_eq!(bridge, 3);
            r
        })
    }

    #[test]
    fn rows_are_grouped_by_bridge() {
        let bridges = [3, 4];
        assert_eq!(
            bridge_row_of(row(7, Some(4), NeighbourState::Reachable), &bridges).map(|r| r.0),
            Some(4)
        );
        assert_eq!(
            bridge_row_of(row(4, None, NeighbourState::Permanent), &bridges).map(|r| r.0),
            Some(4)
        );
        assert_eq!(
            bridge_row_of(row(7, Some(5), NeighbourState::Reachable), &bridges),
            None
        );
    }

    fn row(port: u32, master: Option<u32>, state: NeighbourState) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = port;
        m.header.flags = NeighbourFlags::Controller;
        m.header.state = state;
        m.attributes.push(NeighbourAttribute::LinkLayerAddress(vec![
            2, 0x42, 10, 1, 0, 0xfe,
        ]));
        if let Some(b) = master {
            m.attributes.push(NeighbourAttribute::Controller(b));
        }
        m
    }

    #[test]
    fn learned_and_permanent_rows_of_this_bridge() {
        let mac = Mac([2, 0x42, 10, 1, 0, 0xfe]);
        assert_eq!(
            row_of(row(7, Some(3), NeighbourState::Reachable)),
            Some(BridgeFdbEntry {
                mac,
                port: 7,
                learned: true
            })
        );
        assert_eq!(
            row_of(row(7, Some(3), NeighbourState::Stale)).map(|r| r.learned),
            Some(true)
        );
        assert_eq!(
            row_of(row(7, Some(3), NeighbourState::Permanent)).map(|r| r.learned),
            Some(false)
        );
        assert_eq!(
            row_of(row(7, Some(3), NeighbourState::Noarp)).map(|r| r.learned),
            Some(false)
        );
        // The bridge's own row carries no master.
        assert_eq!(
            row_of(row(3, None, NeighbourState::Permanent)).map(|r| r.port),
            Some(3)
        );
    }

    #[test]
    fn rows_of_other_bridges_and_devices_are_skipped() {
        assert!(row_of(row(7, Some(4), NeighbourState::Reachable)).is_none());
        // A VXLAN device's own rows (NTF_SELF, no master).
        assert!(row_of(row(9, None, NeighbourState::Permanent)).is_none());
        let mut arp = row(7, Some(3), NeighbourState::Reachable);
        arp.header.family = AddressFamily::Inet;
        assert!(row_of(arp).is_none());
    }

    #[test]
    fn link_and_bridge_neighbour_events_count_arp_does_not() {
        assert!(is_bridge_change(&RouteNetlinkMessage::NewLink(
            LinkMessage::default()
        )));
        assert!(is_bridge_change(&RouteNetlinkMessage::DelLink(
            LinkMessage::default()
        )));
        let fdb = row(7, Some(3), NeighbourState::Reachable);
        assert!(is_bridge_change(&RouteNetlinkMessage::NewNeighbour(
            fdb.clone()
        )));
        assert!(is_bridge_change(&RouteNetlinkMessage::DelNeighbour(fdb)));
        let mut arp = NeighbourMessage::default();
        arp.header.family = AddressFamily::Inet;
        assert!(!is_bridge_change(&RouteNetlinkMessage::NewNeighbour(arp)));
    }

    #[test]
    fn master_of_a_port() {
        let mut m = LinkMessage::default();
        assert_eq!(master_of(&RouteNetlinkMessage::NewLink(m.clone())), None);
        m.attributes.push(LinkAttribute::Controller(3));
        assert_eq!(master_of(&RouteNetlinkMessage::NewLink(m)), Some(3));
    }
}
