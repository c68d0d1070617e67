//! Root tests against the real kernel. Each runs on its own thread inside a throwaway
//! network namespace (`unshare(CLONE_NEWNET)` on that thread), so nothing leaks into
//! the host and tests run in parallel. Without root they print a skip line, except
//! under CI=true where a skip would hide a regression, so they fail.

mod common;
use common::*;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsFd;
use vrouter_kernel::{
    FdbEntry, Kernel, KernelError, Neighbour, Nexthop, Route, Rule, VxlanInfo, VxlanSpec,
};
use vrouter_state::{Mac, Vni, RTPROT_VROUTER};

const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// A veth pair `name`/`name`p, up, with `addr/len` on `name` (this kernel has no dummy
/// driver). Returns the index of `name`.
async fn veth(kernel: &Kernel, name: &str, addr: Ipv4Addr, len: u8) -> u32 {
    let (connection, handle, _) = rtnetlink::new_connection().expect("netlink socket");
    tokio::spawn(connection);
    let peer = format!("{name}p");
    handle
        .link()
        .add(rtnetlink::LinkVeth::new(name, &peer).build())
        .execute()
        .await
        .expect("create veth");
    let index = kernel
        .link_by_name(name)
        .await
        .unwrap()
        .expect("veth exists")
        .index;
    kernel
        .replace_address(index, addr, len)
        .await
        .expect("add address");
    kernel.set_up(index).await.expect("veth up");
    let peer_index = kernel.link_by_name(&peer).await.unwrap().unwrap().index;
    kernel.set_up(peer_index).await.expect("veth peer up");
    index
}

fn spec(name: &str, vni: u32, underlay: u32, port: u16) -> VxlanSpec {
    VxlanSpec {
        name: name.into(),
        vni: Vni::new(vni).unwrap(),
        local: Some(LOCAL),
        underlay,
        port,
        mtu: 1450,
        learning: false,
    }
}

#[test]
fn vxlan_create_dump_and_link_changes() {
    in_new_netns("vxlan_create_dump_and_link_changes", || async {
        let k = Kernel::connect().await.unwrap();
        let under = veth(&k, "under0", LOCAL, 24).await;

        let index = k
            .create_vxlan(&spec("vxlan1000", 1000, under, 4789))
            .await
            .unwrap();
        let link = k.link_by_name("vxlan1000").await.unwrap().expect("created");
        assert_eq!(link.index, index);
        assert_eq!(link.kind.as_deref(), Some("vxlan"));
        assert_eq!(link.mtu, 1450);
        assert!(!link.up, "created down");
        assert!(link.mac.is_some());
        assert_eq!(
            link.vxlan,
            Some(VxlanInfo {
                vni: Vni::new(1000).unwrap(),
                local: Some(LOCAL),
                underlay: Some(under),
                port: 4789,
                learning: false,
            })
        );
        assert_eq!(k.link_by_index(index).await.unwrap(), Some(link.clone()));
        assert!(k.links().await.unwrap().contains(&link));

        // Learning on, for the seed's mode.
        let learning = VxlanSpec {
            learning: true,
            ..spec("vxlan2000", 2000, under, 4789)
        };
        let i2 = k.create_vxlan(&learning).await.unwrap();
        let info = k.link_by_index(i2).await.unwrap().unwrap().vxlan.unwrap();
        assert!(info.learning);

        // No local address (encryption on): none reads back.
        let unbound = VxlanSpec {
            local: None,
            ..spec("vxlan3000", 3000, under, 4789)
        };
        let i3 = k.create_vxlan(&unbound).await.unwrap();
        let info = k.link_by_index(i3).await.unwrap().unwrap().vxlan.unwrap();
        assert_eq!((info.local, info.underlay), (None, Some(under)));

        // A veth's IFLA_LINK is its peer.
        let peer = k.link_by_name("under0p").await.unwrap().unwrap();
        assert_eq!(
            k.link_by_index(under).await.unwrap().unwrap().parent,
            Some(peer.index)
        );

        k.set_up(index).await.unwrap();
        k.set_mtu(index, 1400).await.unwrap();
        let mac = Mac([0x02, 0xe8, 0, 0, 0, 1]);
        k.set_mac(index, mac).await.unwrap();
        // The alias marks discovery's own devices; none until set.
        assert_eq!(link.alias, None);
        k.set_alias(index, "docker-vrouter vni=1000").await.unwrap();
        k.rename(index, "vx-renamed").await.unwrap();
        let link = k.link_by_index(index).await.unwrap().unwrap();
        assert_eq!(link.alias.as_deref(), Some("docker-vrouter vni=1000"));
        assert!(link.up);
        assert_eq!(
            (link.mtu, link.mac, link.name.as_str()),
            (1400, Some(mac), "vx-renamed")
        );
        assert_eq!(k.link_by_name("vxlan1000").await.unwrap(), None);

        k.delete_link(index).await.unwrap();
        assert_eq!(k.link_by_index(index).await.unwrap(), None);
        k.delete_link(index)
            .await
            .expect("deleting a gone link is Ok");

        let err = k.set_mtu(index, 1400).await.unwrap_err();
        assert!(matches!(err, KernelError::NoSuchLink(_)), "{err}");
        assert!(err.to_string().contains(&index.to_string()), "{err}");
    });
}

#[test]
fn duplicate_vni_is_vni_in_use() {
    in_new_netns("duplicate_vni_is_vni_in_use", || async {
        let k = Kernel::connect().await.unwrap();
        let under = veth(&k, "under0", LOCAL, 24).await;
        k.create_vxlan(&spec("vxlan1000", 1000, under, 4789))
            .await
            .unwrap();

        let err = k
            .create_vxlan(&spec("other", 1000, under, 4789))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::VniInUse {
                    vni: 1000,
                    port: 4789
                }
            ),
            "{err}"
        );
        assert_eq!(k.link_by_name("other").await.unwrap(), None);

        // The same name with another VNI is a name clash, reported as such.
        let err = k
            .create_vxlan(&spec("vxlan1000", 1001, under, 4789))
            .await
            .unwrap_err();
        assert!(matches!(err, KernelError::Netlink { .. }), "{err}");
        assert!(err.to_string().contains("vxlan1000"), "{err}");

        // The same VNI on another port is another VXLAN network.
        k.create_vxlan(&spec("vxlan1000b", 1000, under, 4790))
            .await
            .unwrap();

        // A missing underlay is named.
        let err = k
            .create_vxlan(&spec("vxlan3000", 3000, 9999, 4789))
            .await
            .unwrap_err();
        assert!(matches!(err, KernelError::NoSuchLink(_)), "{err}");
    });
}

#[test]
fn port_held_by_udp_socket_is_port_in_use() {
    in_new_netns("port_held_by_udp_socket_is_port_in_use", || async {
        let k = Kernel::connect().await.unwrap();
        let under = veth(&k, "under0", LOCAL, 24).await;
        let index = k
            .create_vxlan(&spec("vxlan1000", 1000, under, 4790))
            .await
            .unwrap();

        // Created on this thread, so bound in this namespace.
        let squatter = UdpSocket::bind("0.0.0.0:4790").unwrap();
        let err = k.set_up(index).await.unwrap_err();
        assert!(
            matches!(err, KernelError::PortInUse { port: 4790 }),
            "{err}"
        );
        assert!(!k.link_by_index(index).await.unwrap().unwrap().up);

        drop(squatter);
        k.set_up(index).await.unwrap();
        assert!(k.link_by_index(index).await.unwrap().unwrap().up);
    });
}

#[test]
fn vxlan_local_changes_in_place() {
    in_new_netns("vxlan_local_changes_in_place", || async {
        let k = Kernel::connect().await.unwrap();
        let under = veth(&k, "under0", LOCAL, 24).await;
        let index = k
            .create_vxlan(&spec("vxlan1000", 1000, under, 4789))
            .await
            .unwrap();
        k.set_up(index).await.unwrap();
        let peer = Ipv4Addr::new(198, 18, 0, 2);
        k.append_fdb(index, Mac::ZERO, peer).await.unwrap();
        let mv = k
            .create_macvlan("mv0", index, Mac([2, 0xe8, 10, 1, 0, 0xfe]), 1450)
            .await
            .unwrap();

        let moved = Ipv4Addr::new(198, 18, 0, 9);
        k.set_vxlan_local(index, moved).await.unwrap();

        let link = k.link_by_name("vxlan1000").await.unwrap().unwrap();
        assert_eq!(link.index, index, "same device");
        assert!(link.up);
        let info = link.vxlan.unwrap();
        assert_eq!(info.local, Some(moved));
        assert_eq!(
            (info.vni.get(), info.port, info.underlay),
            (1000, 4789, Some(under))
        );
        assert_eq!(k.fdb(index).await.unwrap().len(), 1, "FDB kept");
        assert!(k.link_by_index(mv).await.unwrap().is_some(), "macvlan kept");

        // 0.0.0.0 removes the local address in place (encryption on: the kernel picks
        // the source by route), and it can be set again.
        k.set_vxlan_local(index, Ipv4Addr::UNSPECIFIED)
            .await
            .unwrap();
        let link = k.link_by_name("vxlan1000").await.unwrap().unwrap();
        assert_eq!(link.index, index, "same device");
        assert_eq!(link.vxlan.unwrap().local, None);
        assert_eq!(k.fdb(index).await.unwrap().len(), 1, "FDB kept");
        k.set_vxlan_local(index, moved).await.unwrap();
        let info = k
            .link_by_name("vxlan1000")
            .await
            .unwrap()
            .unwrap()
            .vxlan
            .unwrap();
        assert_eq!(info.local, Some(moved));

        let err = k.set_vxlan_local(9999, moved).await.unwrap_err();
        assert!(matches!(err, KernelError::NoSuchLink(_)), "{err}");
    });
}

#[test]
fn macvlan_moves_into_another_namespace() {
    in_new_netns("macvlan_moves_into_another_namespace", || async {
        let k = Kernel::connect().await.unwrap();
        let under = veth(&k, "under0", LOCAL, 24).await;
        let vx = k
            .create_vxlan(&spec("vxlan1000", 1000, under, 4789))
            .await
            .unwrap();
        let mac = Mac([2, 0xe8, 10, 1, 0, 0xfe]);
        let index = k.create_macvlan("mv0", vx, mac, 1450).await.unwrap();

        let link = k.link_by_index(index).await.unwrap().unwrap();
        assert_eq!(link.kind.as_deref(), Some("macvlan"));
        assert_eq!(
            (link.parent, link.mac, link.mtu, link.up),
            (Some(vx), Some(mac), 1450, false)
        );

        let router = spare_netns();
        k.move_to_netns(index, router.as_fd()).await.unwrap();
        assert_eq!(k.link_by_name("mv0").await.unwrap(), None);
        assert!(!k.links().await.unwrap().iter().any(|l| l.name == "mv0"));

        // Renamed on the way: the name is free in the target even if the source's
        // naming scheme differs.
        let mac2 = Mac([2, 0xe8, 10, 3, 0, 0xfe]);
        let index2 = k.create_macvlan("mv1", vx, mac2, 1450).await.unwrap();
        k.move_to_netns_as(index2, router.as_fd(), "ovl1000")
            .await
            .unwrap();
        assert_eq!(k.link_by_name("mv1").await.unwrap(), None);

        let seen = in_netns(&router, || async {
            let k = Kernel::connect().await.unwrap();
            let mv0 = k.link_by_name("mv0").await.unwrap().expect("mv0 arrived");
            let ovl = k
                .link_by_name("ovl1000")
                .await
                .unwrap()
                .expect("renamed on move");
            // The router finishes the attachment itself.
            k.rename(mv0.index, "ovl2000").await.unwrap();
            k.set_up(ovl.index).await.unwrap();
            let ovl = k.link_by_index(ovl.index).await.unwrap().unwrap();
            (mv0, ovl, k.link_by_name("ovl2000").await.unwrap().is_some())
        });
        let (mv0, ovl, renamed) = seen;
        assert_eq!((mv0.kind.as_deref(), mv0.mac), (Some("macvlan"), Some(mac)));
        // IFLA_LINK still names the lower device by its index in the namespace it left.
        assert_eq!(mv0.parent, Some(vx));
        assert_eq!((ovl.mac, ovl.up), (Some(mac2), true));
        assert!(renamed);

        let err = k.create_macvlan("mv2", 9999, mac, 1450).await.unwrap_err();
        assert!(matches!(err, KernelError::NoSuchLink(_)), "{err}");
    });
}

/// IFLA_MASTER of a link, read straight from rtnetlink (`Link` does not carry it).
async fn master_of(index: u32) -> Option<u32> {
    use futures::TryStreamExt;
    use rtnetlink::packet_route::link::LinkAttribute;
    let (connection, handle, _) = rtnetlink::new_connection().expect("netlink socket");
    tokio::spawn(connection);
    let message = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .expect("get link")
        .expect("link exists");
    message.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(master) => Some(*master),
        _ => None,
    })
}

#[test]
fn veth_into_namespace_on_a_bridge() {
    in_new_netns("veth_into_namespace_on_a_bridge", || async {
        let k = Kernel::connect().await.unwrap();
        let (connection, handle, _) = rtnetlink::new_connection().expect("netlink socket");
        tokio::spawn(connection);
        handle
            .link()
            .add(rtnetlink::LinkBridge::new("br-stack").build())
            .execute()
            .await
            .expect("create bridge");
        let bridge = k.link_by_name("br-stack").await.unwrap().unwrap().index;
        k.replace_address(bridge, Ipv4Addr::new(10, 1, 0, 1), 24)
            .await
            .unwrap();
        k.set_up(bridge).await.unwrap();

        // The host end here, the peer created (and named) in the router's namespace.
        let router = spare_netns();
        let host = k
            .create_veth_into("vra0", 1400, router.as_fd(), "eth0")
            .await
            .unwrap();
        let link = k.link_by_index(host).await.unwrap().unwrap();
        assert_eq!(
            (link.name.as_str(), link.kind.as_deref(), link.mtu, link.up),
            ("vra0", Some("veth"), 1400, false)
        );
        assert_eq!(k.link_by_name("eth0").await.unwrap(), None, "peer moved");

        // A name taken on either side is a leftover to delete, named as such.
        for (name, peer) in [("vra0", "eth1"), ("vra1", "eth0")] {
            let err = k
                .create_veth_into(name, 1400, router.as_fd(), peer)
                .await
                .unwrap_err();
            assert!(matches!(err, KernelError::LinkExists { .. }), "{err}");
            assert!(err.to_string().contains(name), "{err}");
            assert_eq!(k.link_by_name("vra1").await.unwrap(), None);
        }

        assert_eq!(master_of(host).await, None);
        k.set_master(host, bridge).await.unwrap();
        k.set_master(host, bridge)
            .await
            .expect("same master again is Ok");
        assert_eq!(master_of(host).await, Some(bridge));
        k.set_up(host).await.unwrap();

        // Only a bridge can be a master, and it must exist.
        let other = veth(&k, "other0", Ipv4Addr::new(10, 9, 0, 1), 24).await;
        let err = k.set_master(host, other).await.unwrap_err();
        assert!(matches!(err, KernelError::NotABridge { .. }), "{err}");
        assert!(err.to_string().contains("other0"), "{err}");
        let err = k.set_master(host, 9999).await.unwrap_err();
        assert!(matches!(err, KernelError::NoSuchLink(_)), "{err}");
        assert!(err.to_string().contains("9999"), "{err}");
        // The kernel detaches from the old master before it looks at the new one.
        assert_eq!(master_of(host).await, None, "left without a master");
        k.set_master(host, bridge).await.unwrap();
        assert_eq!(master_of(host).await, Some(bridge));

        // The inside end, configured by a Kernel connected in the router's namespace.
        let gateway = Ipv4Addr::new(10, 1, 0, 1);
        let router_ip = Ipv4Addr::new(10, 1, 0, 254);
        let (eth0, addresses, default) = in_netns(&router, || async {
            let k = Kernel::connect().await.unwrap();
            let lo = k.link_by_name("lo").await.unwrap().unwrap();
            k.set_up(lo.index).await.unwrap();
            let eth0 = k.link_by_name("eth0").await.unwrap().expect("peer here");
            k.set_up(eth0.index).await.unwrap();
            k.replace_address(eth0.index, router_ip, 24).await.unwrap();
            k.replace_address(eth0.index, router_ip, 24)
                .await
                .expect("replace is idempotent");
            let default = Route {
                table: 254,
                dst: "0.0.0.0/0".parse().unwrap(),
                gateway: Some(gateway),
                oif: Some(eth0.index),
                onlink: false,
                protocol: 3, // RTPROT_BOOT, as `ip route add` does
                nexthop: None,
            };
            k.replace_route(&default).await.unwrap();
            let err = k.replace_address(9999, router_ip, 24).await.unwrap_err();
            assert!(matches!(err, KernelError::NoSuchLink(_)), "{err}");
            let eth0 = k.link_by_index(eth0.index).await.unwrap().unwrap();
            (
                eth0,
                k.addresses().await.unwrap(),
                k.default_route().await.unwrap(),
            )
        });
        assert_eq!(
            (eth0.kind.as_deref(), eth0.mtu, eth0.up),
            (Some("veth"), 1400, true)
        );
        let on_eth0: Vec<_> = addresses.iter().filter(|a| a.index == eth0.index).collect();
        assert_eq!(on_eth0.len(), 1, "{addresses:?}");
        assert_eq!((on_eth0[0].addr, on_eth0[0].prefix_len), (router_ip, 24));
        assert_eq!(default, Some((eth0.index, Some(gateway))));

        k.delete_link(host).await.unwrap();
        assert_eq!(k.link_by_name("vra0").await.unwrap(), None);
    });
}

#[test]
fn routes_replace_dump_delete() {
    in_new_netns("routes_replace_dump_delete", || async {
        let k = Kernel::connect().await.unwrap();
        let dev = veth(&k, "brA", Ipv4Addr::new(10, 1, 0, 1), 24).await;

        assert!(k
            .addresses()
            .await
            .unwrap()
            .iter()
            .any(|a| a.index == dev && a.addr == Ipv4Addr::new(10, 1, 0, 1) && a.prefix_len == 24));

        let overlay = Route {
            table: 101,
            dst: "10.2.0.0/24".parse().unwrap(),
            gateway: Some(Ipv4Addr::new(10, 2, 0, 254)),
            oif: Some(dev),
            onlink: true,
            protocol: RTPROT_VROUTER,
            nexthop: None,
        };
        k.replace_route(&overlay).await.unwrap();
        k.replace_route(&overlay)
            .await
            .expect("replace is idempotent");
        assert_eq!(k.routes(101).await.unwrap(), vec![overlay.clone()]);

        let moved = Route {
            gateway: Some(Ipv4Addr::new(10, 2, 0, 253)),
            ..overlay.clone()
        };
        k.replace_route(&moved).await.unwrap();
        assert_eq!(k.routes(101).await.unwrap(), vec![moved.clone()]);

        // Tables above 255 travel in RTA_TABLE.
        let big = Route {
            table: 1000,
            ..overlay.clone()
        };
        k.replace_route(&big).await.unwrap();
        assert_eq!(k.routes(1000).await.unwrap(), vec![big.clone()]);

        // Main: a gateway in the connected subnet, an onlink one, a device route.
        assert_eq!(k.default_route().await.unwrap(), None);
        let steer = Route {
            table: 254,
            dst: "10.3.0.0/24".parse().unwrap(),
            gateway: Some(Ipv4Addr::new(10, 1, 0, 254)),
            oif: Some(dev),
            onlink: false,
            protocol: RTPROT_VROUTER,
            nexthop: None,
        };
        let onlink = Route {
            dst: "10.4.0.0/24".parse().unwrap(),
            gateway: Some(Ipv4Addr::new(10, 9, 9, 9)),
            onlink: true,
            ..steer.clone()
        };
        let direct = Route {
            dst: "10.5.0.0/24".parse().unwrap(),
            gateway: None,
            ..steer.clone()
        };
        let default = Route {
            dst: "0.0.0.0/0".parse().unwrap(),
            protocol: 4, // RTPROT_STATIC
            nexthop: None,
            ..steer.clone()
        };
        for r in [&steer, &onlink, &direct, &default] {
            k.replace_route(r).await.unwrap();
        }
        let main = k.routes(254).await.unwrap();
        for r in [&steer, &onlink, &direct, &default] {
            assert!(main.contains(r), "{r:?} not in {main:?}");
        }
        assert!(
            main.iter()
                .any(|r| r.dst == "10.1.0.0/24".parse().unwrap() && r.protocol == 2),
            "the kernel's connected route is listed too: {main:?}"
        );
        assert!(!main.contains(&overlay), "tables are kept apart");
        assert_eq!(
            k.default_route().await.unwrap(),
            Some((dev, Some(Ipv4Addr::new(10, 1, 0, 254))))
        );

        // Delete is exact and idempotent.
        k.delete_route(&moved).await.unwrap();
        assert_eq!(k.routes(101).await.unwrap(), vec![]);
        k.delete_route(&moved)
            .await
            .expect("deleting a gone route is Ok");
        for r in [&steer, &onlink, &direct, &default, &big] {
            k.delete_route(r).await.unwrap();
        }
        let main = k.routes(254).await.unwrap();
        assert!(
            main.iter().all(|r| r.protocol != RTPROT_VROUTER),
            "{main:?}"
        );
        assert_eq!(k.default_route().await.unwrap(), None);
        assert_eq!(k.routes(1000).await.unwrap(), vec![]);

        // A gateway outside every subnet without onlink is refused, and named.
        let unreachable = Route {
            onlink: false,
            ..overlay.clone()
        };
        let err = k.replace_route(&unreachable).await.unwrap_err();
        assert!(
            err.to_string().contains("10.2.0.0/24 via 10.2.0.254"),
            "{err}"
        );
    });
}

#[test]
fn nexthops_replace_dump_delete() {
    in_new_netns("nexthops_replace_dump_delete", || async {
        let k = Kernel::connect().await.unwrap();
        let dev = veth(&k, "ovl1000", Ipv4Addr::new(10, 1, 0, 254), 24).await;
        assert_eq!(k.nexthops().await.unwrap(), vec![]);
        let nh = Nexthop {
            id: u32::from(Ipv4Addr::new(10, 2, 0, 254)),
            gateway: Some(Ipv4Addr::new(10, 2, 0, 254)),
            oif: Some(dev),
            onlink: true,
            protocol: RTPROT_VROUTER,
        };
        k.replace_nexthop(&nh).await.unwrap();
        k.replace_nexthop(&nh).await.expect("replace is idempotent");
        assert_eq!(k.nexthops().await.unwrap(), vec![nh.clone()]);

        let route = Route {
            table: 254,
            dst: "10.2.0.0/24".parse().unwrap(),
            gateway: None,
            oif: None,
            onlink: false,
            protocol: RTPROT_VROUTER,
            nexthop: Some(nh.id),
        };
        k.replace_route(&route).await.unwrap();
        let main = k.routes(254).await.unwrap();
        assert!(main.contains(&route), "{main:?}");

        // Replacing the nexthop moves its routes with it.
        let moved = Nexthop {
            gateway: Some(Ipv4Addr::new(10, 2, 0, 253)),
            ..nh.clone()
        };
        k.replace_nexthop(&moved).await.unwrap();
        assert_eq!(k.nexthops().await.unwrap(), vec![moved.clone()]);
        assert!(k.routes(254).await.unwrap().contains(&route));

        // A route cannot name a nexthop that does not exist.
        let dangling = Route {
            nexthop: Some(7),
            dst: "10.3.0.0/24".parse().unwrap(),
            ..route.clone()
        };
        let err = k.replace_route(&dangling).await.unwrap_err();
        assert!(err.to_string().contains("10.3.0.0/24 nhid 7"), "{err}");

        // Delete is exact and idempotent; the route goes first, as the router does.
        k.delete_route(&route).await.unwrap();
        assert!(!k.routes(254).await.unwrap().contains(&route));
        k.delete_nexthop(nh.id).await.unwrap();
        k.delete_nexthop(nh.id)
            .await
            .expect("deleting a gone nexthop is Ok");
        assert_eq!(k.nexthops().await.unwrap(), vec![]);

        // A nexthop on a missing link is refused and named.
        let err = k
            .replace_nexthop(&Nexthop {
                oif: Some(9999),
                ..nh.clone()
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("dev index 9999"), "{err}");
    });
}

#[test]
fn neighbours_replace_dump_delete() {
    in_new_netns("neighbours_replace_dump_delete", || async {
        let k = Kernel::connect().await.unwrap();
        let dev = veth(&k, "ovl1000", Ipv4Addr::new(10, 1, 0, 254), 24).await;
        let ip = Ipv4Addr::new(10, 2, 0, 254);
        let mac = Mac([2, 0xe8, 10, 2, 0, 0xfe]);

        k.replace_neighbour(dev, ip, mac).await.unwrap();
        k.replace_neighbour(dev, ip, mac)
            .await
            .expect("replace is idempotent");
        let want = Neighbour {
            index: dev,
            ip,
            mac: Some(mac),
            permanent: true,
        };
        assert_eq!(k.neighbours(dev).await.unwrap(), vec![want.clone()]);

        let mac2 = Mac([2, 0xe8, 10, 2, 0, 0xfd]);
        k.replace_neighbour(dev, ip, mac2).await.unwrap();
        assert_eq!(
            k.neighbours(dev).await.unwrap(),
            vec![Neighbour {
                mac: Some(mac2),
                ..want
            }]
        );

        let peer = k.link_by_name("ovl1000p").await.unwrap().unwrap().index;
        assert_eq!(k.neighbours(peer).await.unwrap(), vec![], "per link");

        k.delete_neighbour(dev, ip).await.unwrap();
        assert_eq!(k.neighbours(dev).await.unwrap(), vec![]);
        k.delete_neighbour(dev, ip)
            .await
            .expect("deleting a gone neighbour is Ok");

        let err = k.replace_neighbour(9999, ip, mac).await.unwrap_err();
        assert!(matches!(err, KernelError::NoSuchLink(_)), "{err}");
    });
}

#[test]
fn fdb_append_replace_dump_delete() {
    in_new_netns("fdb_append_replace_dump_delete", || async {
        let k = Kernel::connect().await.unwrap();
        let under = veth(&k, "under0", LOCAL, 24).await;
        let vx = k
            .create_vxlan(&spec("vxlan1000", 1000, under, 4789))
            .await
            .unwrap();
        let (host2, host3, host4) = (
            Ipv4Addr::new(198, 18, 0, 2),
            Ipv4Addr::new(198, 18, 0, 3),
            Ipv4Addr::new(198, 18, 0, 4),
        );
        let flood = |dst| FdbEntry {
            index: vx,
            mac: Mac::ZERO,
            dst: Some(dst),
            permanent: true,
        };

        // The flood list: one row per remote host.
        k.append_fdb(vx, Mac::ZERO, host2).await.unwrap();
        k.append_fdb(vx, Mac::ZERO, host3).await.unwrap();
        k.append_fdb(vx, Mac::ZERO, host2)
            .await
            .expect("append is idempotent");
        let mut rows = k.fdb(vx).await.unwrap();
        rows.sort();
        assert_eq!(rows, vec![flood(host2), flood(host3)]);

        // A remote router's MAC: one destination, replaced when it moves.
        let router = Mac([2, 0xe8, 10, 2, 0, 0xfe]);
        k.replace_fdb(vx, router, host2).await.unwrap();
        k.replace_fdb(vx, router, host4).await.unwrap();
        let rows = k.fdb(vx).await.unwrap();
        let router_rows: Vec<_> = rows.iter().filter(|r| r.mac == router).collect();
        assert_eq!(
            router_rows,
            vec![&FdbEntry {
                index: vx,
                mac: router,
                dst: Some(host4),
                permanent: true
            }]
        );

        // The kernel refuses replace on the all-zeros row; append is the way there.
        let err = k.replace_fdb(vx, Mac::ZERO, host4).await.unwrap_err();
        assert!(matches!(err, KernelError::Netlink { .. }), "{err}");
        assert!(
            err.to_string().contains("00:00:00:00:00:00 dst 198.18.0.4"),
            "{err}"
        );

        // One destination of the flood list goes, the other stays.
        k.delete_fdb(vx, Mac::ZERO, Some(host2)).await.unwrap();
        k.delete_fdb(vx, Mac::ZERO, Some(host2))
            .await
            .expect("deleting a gone row is Ok");
        k.delete_fdb(vx, router, None).await.unwrap();
        k.delete_fdb(vx, router, None)
            .await
            .expect("deleting a gone row is Ok");
        assert_eq!(k.fdb(vx).await.unwrap(), vec![flood(host3)]);

        // Another device's rows are not listed.
        let vx2 = k
            .create_vxlan(&spec("vxlan2000", 2000, under, 4789))
            .await
            .unwrap();
        assert_eq!(k.fdb(vx2).await.unwrap(), vec![]);
    });
}

#[test]
fn rules_add_dump_delete() {
    in_new_netns("rules_add_dump_delete", || async {
        let k = Kernel::connect().await.unwrap();
        let defaults = k.rules().await.unwrap();
        let priorities: Vec<u32> = defaults.iter().map(|r| r.priority).collect();
        assert_eq!(priorities, vec![0, 32766, 32767], "{defaults:?}");
        assert_eq!(defaults[1].table, 254);

        // The bridge need not exist: rules match interface names.
        let steer = Rule {
            priority: 1000,
            iif: Some("brA".into()),
            fwmark: None,
            table: 101,
            protocol: RTPROT_VROUTER,
        };
        let probe = Rule {
            priority: 1001,
            iif: None,
            fwmark: Some(0x76),
            table: 1000,
            protocol: RTPROT_VROUTER,
        };
        k.add_rule(&steer).await.unwrap();
        k.add_rule(&steer)
            .await
            .expect("adding an existing rule is Ok");
        k.add_rule(&probe).await.unwrap();
        let rules = k.rules().await.unwrap();
        let ours: Vec<_> = rules
            .iter()
            .filter(|r| r.protocol == RTPROT_VROUTER)
            .cloned()
            .collect();
        assert_eq!(ours, vec![steer.clone(), probe.clone()]);

        // Exact delete: another protocol does not match.
        let other = Rule {
            protocol: 4,
            ..steer.clone()
        };
        k.delete_rule(&other).await.unwrap();
        assert!(k.rules().await.unwrap().contains(&steer));

        k.delete_rule(&steer).await.unwrap();
        k.delete_rule(&probe).await.unwrap();
        k.delete_rule(&probe)
            .await
            .expect("deleting a gone rule is Ok");
        assert_eq!(k.rules().await.unwrap(), defaults);
    });
}

/// Clears CAP_NET_ADMIN from the calling thread's effective set (capabilities are per
/// thread), as a process without it would run.
fn drop_net_admin_on_this_thread() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_ADMIN: u32 = 12;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: header and a two-element data array, as capget/capset take for version 3.
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
            0
        );
        data[0].effective &= !(1 << CAP_NET_ADMIN);
        assert_eq!(
            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
            0
        );
    }
}

#[test]
fn without_net_admin_is_not_permitted() {
    in_new_netns("without_net_admin_is_not_permitted", || async {
        // The kernel checks the credentials the netlink socket was opened with.
        drop_net_admin_on_this_thread();
        let k = Kernel::connect().await.unwrap();
        let lo = k
            .link_by_name("lo")
            .await
            .unwrap()
            .expect("dumps need no privilege");
        let err = k.set_up(lo.index).await.unwrap_err();
        let KernelError::NotPermitted { op } = &err else {
            panic!("{err:?}")
        };
        assert!(op.contains("set link up") && op.contains("lo"), "{err}");
        let err = k
            .create_vxlan(&spec("vxlan1000", 1000, lo.index, 4789))
            .await
            .unwrap_err();
        assert!(matches!(err, KernelError::NotPermitted { .. }), "{err:?}");
    });
}

#[test]
fn another_namespace_seen_through_its_veth_without_entering_it() {
    in_new_netns("another_namespace_seen_through_its_veth", || async {
        let k = Kernel::connect().await.unwrap();
        let router = spare_netns();
        let stranger = spare_netns();
        // Nothing here refers to either namespace yet.
        assert_eq!(k.netns_id(router.as_fd()).await.unwrap(), None);
        let host = k
            .create_veth_into("vra0", 1400, router.as_fd(), "eth0")
            .await
            .unwrap();
        in_netns(&router, || async {
            let inside = Kernel::connect().await.unwrap();
            let eth0 = inside.link_by_name("eth0").await.unwrap().unwrap().index;
            inside
                .replace_address(eth0, Ipv4Addr::new(10, 1, 0, 254), 24)
                .await
                .unwrap();
        });
        let ports = k.foreign_veths().await.unwrap();
        assert_eq!(ports.len(), 1, "{ports:?}");
        let port = &ports[0];
        assert_eq!(
            (port.index, port.name.as_str(), port.master),
            (host, "vra0", None)
        );
        // The dump gave the peer's namespace an id; the descriptor resolves to it.
        assert_eq!(
            k.netns_id(router.as_fd()).await.unwrap(),
            Some(port.peer_netnsid)
        );
        assert_eq!(k.netns_id(stranger.as_fd()).await.unwrap(), None);
        // Its addresses, not this namespace's (strict mode is what makes the kernel
        // honour the target).
        let addrs = k.addresses_in(port.peer_netnsid).await.unwrap();
        assert!(
            addrs.iter().any(|a| a.addr == Ipv4Addr::new(10, 1, 0, 254)
                && a.index == port.peer_index
                && a.prefix_len == 24),
            "{addrs:?}"
        );
        assert!(k
            .addresses()
            .await
            .unwrap()
            .iter()
            .all(|a| a.addr != Ipv4Addr::new(10, 1, 0, 254)));
        // An unknown id shows nothing (the kernel's error ends the dump).
        assert!(k
            .addresses_in(port.peer_netnsid + 100)
            .await
            .map_or(true, |a| a.is_empty()));
    });
}

/// Discovery keeps a steering table per local stack. The kernel dumps every table
/// whatever the request names, so reading 100 tables one by one costs 100 full dumps:
/// `routes_of_tables` reads them all from one dump, with the same rows.
#[test]
fn one_dump_reads_many_tables() {
    in_new_netns("one_dump_reads_many_tables", || async {
        let k = Kernel::connect().await.unwrap();
        let dev = veth(&k, "brS", Ipv4Addr::new(10, 255, 0, 1), 16).await;
        const TABLES: u32 = 100;
        const PER_TABLE: u32 = 100;
        let tables: std::collections::BTreeSet<u32> = (0..TABLES).map(|t| 1000 + t).collect();
        for &t in &tables {
            for j in 0..PER_TABLE {
                let r = Route {
                    table: t,
                    dst: format!("10.{}.{}.0/24", 100 + j / 200, j % 200)
                        .parse()
                        .unwrap(),
                    gateway: Some(Ipv4Addr::new(10, 255, 0, 254)),
                    oif: Some(dev),
                    onlink: false,
                    protocol: RTPROT_VROUTER,
                    nexthop: None,
                };
                k.replace_route(&r).await.unwrap();
            }
        }
        let t0 = std::time::Instant::now();
        let mut one_by_one = Vec::new();
        for &t in &tables {
            one_by_one.extend(k.routes(t).await.unwrap());
        }
        let per_table = t0.elapsed();
        let t1 = std::time::Instant::now();
        let mut together = k.routes_of_tables(&tables).await.unwrap();
        let one = t1.elapsed();
        eprintln!(
            "{TABLES} tables x {PER_TABLE} routes: {TABLES} dumps {per_table:?}, one dump {one:?}"
        );
        assert_eq!(together.len(), (TABLES * PER_TABLE) as usize);
        let key = |r: &Route| (r.table, r.dst.addr(), r.dst.prefix_len());
        one_by_one.sort_by_key(key);
        together.sort_by_key(key);
        assert_eq!(together, one_by_one);
        assert!(k
            .routes_of_tables(&Default::default())
            .await
            .unwrap()
            .is_empty());
        // 100 dumps against one: far more than noise on a busy machine.
        assert!(
            per_table > one * 10,
            "one dump {one:?} is not much cheaper than {TABLES} dumps {per_table:?}"
        );
    });
}
