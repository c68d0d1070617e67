//! IPv4 unicast routes.

use crate::error::{classify, is_gone, Context};
use crate::{Kernel, Result, Route};
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::RouteMessageBuilder;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use vrouter_state::Prefix;

/// The main routing table.
const RT_TABLE_MAIN: u32 = RouteHeader::RT_TABLE_MAIN as u32;

impl Kernel {
    /// IPv4 unicast routes of one table (254 = main). Multipath routes are listed with
    /// no gateway and no output link.
    pub async fn routes(&self, table: u32) -> Result<Vec<Route>> {
        self.routes_of_tables(&BTreeSet::from([table])).await
    }

    /// IPv4 unicast routes of every table in `tables`, from one dump. The kernel dumps
    /// every table whatever the request says (no strict checking on this socket), so
    /// one dump for many tables costs what one dump for one table does: a caller with a
    /// table per stack must not dump once per table (100 stacks made that 100 dumps of
    /// ~10,000 routes each per reconcile).
    pub async fn routes_of_tables(&self, tables: &BTreeSet<u32>) -> Result<Vec<Route>> {
        if tables.is_empty() {
            return Ok(Vec::new());
        }
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet;
        let what = match (tables.len(), tables.first()) {
            (1, Some(t)) => format!("table {t}"),
            (n, _) => format!("{n} tables"),
        };
        let answers = self
            .get(RouteNetlinkMessage::GetRoute(message), true)
            .await
            .map_err(|e| classify("dump routes", what, Context::Plain, e))?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewRoute(m) => route_of(m),
                _ => None,
            })
            .filter(|route| tables.contains(&route.table))
            .collect())
    }

    /// The main table's default route: (output link, gateway). With several, the one
    /// the kernel lists first (lowest metric).
    pub async fn default_route(&self) -> Result<Option<(u32, Option<Ipv4Addr>)>> {
        Ok(self.routes(RT_TABLE_MAIN).await?.into_iter().find_map(|r| {
            match (r.dst.is_default(), r.oif) {
                (true, Some(oif)) => Some((oif, r.gateway)),
                _ => None,
            }
        }))
    }

    /// `ip route replace` (NLM_F_CREATE | NLM_F_REPLACE): idempotent.
    pub async fn replace_route(&self, route: &Route) -> Result<()> {
        let message = route_message(route, false);
        self.ack(
            RouteNetlinkMessage::NewRoute(message),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
        .map_err(|e| self.route_failure("replace route", route, e))
    }

    /// Deletes exactly this route (destination, table, gateway, output link and
    /// protocol must match). A route that is already gone is not an error (ESRCH,
    /// ENOENT or ENODEV => Ok).
    pub async fn delete_route(&self, route: &Route) -> Result<()> {
        let message = route_message(route, true);
        match self.ack(RouteNetlinkMessage::DelRoute(message), 0).await {
            Ok(()) => Ok(()),
            Err(e) if is_gone(&e) => Ok(()),
            Err(e) => Err(self.route_failure("delete route", route, e)),
        }
    }

    fn route_failure(
        &self,
        op: &'static str,
        route: &Route,
        source: rtnetlink::Error,
    ) -> crate::KernelError {
        let context = match route.oif {
            Some(oif) => Context::Link(format!("index {oif}")),
            None => Context::Plain,
        };
        classify(op, describe(route), context, source)
    }
}

/// "10.2.0.0/24 via 10.2.0.254 dev 5 onlink table 101 proto 118", as `ip route` says it.
fn describe(route: &Route) -> String {
    let mut s = route.dst.to_string();
    if let Some(gw) = route.gateway {
        s += &format!(" via {gw}");
    }
    if let Some(oif) = route.oif {
        s += &format!(" dev index {oif}");
    }
    if let Some(id) = route.nexthop {
        s += &format!(" nhid {id}");
    }
    if route.onlink {
        s += " onlink";
    }
    s + &format!(" table {} proto {}", route.table, route.protocol)
}

fn route_message(route: &Route, delete: bool) -> RouteMessage {
    let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.dst.addr(), route.dst.prefix_len())
        .protocol(RouteProtocol::from(route.protocol))
        .kind(RouteType::Unicast);
    if let Some(gw) = route.gateway {
        builder = builder.gateway(gw);
    }
    if let Some(oif) = route.oif {
        builder = builder.output_interface(oif);
    }
    if route.onlink {
        builder = builder.onlink();
    }
    // As iproute2 does: a route without gateway or nexthop object is on-link (scope
    // link); a delete matches any scope (RT_SCOPE_NOWHERE).
    builder = builder.scope(match (delete, route.gateway, route.nexthop) {
        (true, _, _) => RouteScope::NoWhere,
        (false, None, None) => RouteScope::Link,
        (false, _, _) => RouteScope::Universe,
    });
    let mut message = builder.build();
    if let Some(id) = route.nexthop {
        message.attributes.push(RouteAttribute::NhId(id));
    }
    // RTA_TABLE always: it is the only way to name tables above 255, and the kernel
    // prefers it over the header byte.
    message.header.table = u8::try_from(route.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    message.attributes.push(RouteAttribute::Table(route.table));
    message
}

fn route_of(message: RouteMessage) -> Option<Route> {
    let header = &message.header;
    if header.address_family != AddressFamily::Inet || header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(header.table);
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut oif = None;
    let mut nexthop = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::NhId(id) => nexthop = Some(*id),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = *a,
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(*a),
            RouteAttribute::Oif(index) => oif = Some(*index),
            _ => {}
        }
    }
    let onlink = header.flags.contains(RouteFlags::Onlink);
    // Through a nexthop object, the gateway, link and onlink flag are the object's;
    // the kernel copies them into the dump (net.ipv4.nexthop_compat_mode), and they
    // are dropped so that the route reads as it was written.
    let (gateway, oif, onlink) = match nexthop {
        Some(_) => (None, None, false),
        None => (gateway, oif, onlink),
    };
    Some(Route {
        table,
        dst: Prefix::new(dst, header.destination_prefix_length).ok()?,
        gateway,
        oif,
        onlink,
        protocol: header.protocol.into(),
        nexthop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(table: u32) -> Route {
        Route {
            table,
            dst: "10.2.0.0/24".parse().unwrap(),
            gateway: Some(Ipv4Addr::new(10, 2, 0, 254)),
            oif: Some(7),
            onlink: true,
            protocol: vrouter_state::RTPROT_VROUTER,
            nexthop: None,
        }
    }

    fn through_nexthop(table: u32) -> Route {
        Route {
            gateway: None,
            oif: None,
            onlink: false,
            nexthop: Some(0x0a02_00fe),
            ..route(table)
        }
    }

    #[test]
    fn message_round_trips() {
        for table in [101, 254, 1000] {
            let r = route(table);
            assert_eq!(route_of(route_message(&r, false)), Some(r));
            let r = through_nexthop(table);
            assert_eq!(route_of(route_message(&r, false)), Some(r));
        }
    }

    #[test]
    fn nexthop_route_drops_the_compat_copies() {
        let r = through_nexthop(254);
        let mut m = route_message(&r, false);
        assert_eq!(m.header.scope, RouteScope::Universe);
        assert!(m.attributes.contains(&RouteAttribute::NhId(0x0a02_00fe)));
        // What the kernel adds to a dump of it.
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(
                10, 2, 0, 254,
            ))));
        m.attributes.push(RouteAttribute::Oif(7));
        m.header.flags |= RouteFlags::Onlink;
        assert_eq!(route_of(m), Some(r));
    }

    #[test]
    fn large_table_goes_in_rta_table() {
        let m = route_message(&route(1000), false);
        assert_eq!(m.header.table, 0);
        assert!(m.attributes.contains(&RouteAttribute::Table(1000)));
    }

    #[test]
    fn scope_follows_gateway() {
        let mut r = route(101);
        assert_eq!(route_message(&r, false).header.scope, RouteScope::Universe);
        assert_eq!(route_message(&r, true).header.scope, RouteScope::NoWhere);
        r.gateway = None;
        assert_eq!(route_message(&r, false).header.scope, RouteScope::Link);
    }

    #[test]
    fn description_names_the_route() {
        assert_eq!(
            describe(&route(101)),
            "10.2.0.0/24 via 10.2.0.254 dev index 7 onlink table 101 proto 118"
        );
    }
}
