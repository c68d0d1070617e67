//! Root tests of what port steering observes of a bridge: its ports, its FDB (learned
//! rows vs the ports' own), and the watcher's notices. Each runs in a throwaway
//! network namespace (see `common`).

mod common;
use common::*;
use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;
use vrouter_kernel::{BridgeWatcher, Kernel};

/// A bridge `name` with 10.7.0.1/24, up.
async fn bridge(k: &Kernel, handle: &rtnetlink::Handle, name: &str) -> u32 {
    handle
        .link()
        .add(rtnetlink::LinkBridge::new(name).build())
        .execute()
        .await
        .expect("create bridge");
    let index = k.link_by_name(name).await.unwrap().unwrap().index;
    k.replace_address(index, Ipv4Addr::new(10, 7, 0, 1), 24)
        .await
        .unwrap();
    k.set_up(index).await.unwrap();
    index
}

/// A veth pair `name`/`name`p, both up, `name` a port of `bridge`. Returns the
/// indexes of (`name`, `name`p).
async fn port(k: &Kernel, handle: &rtnetlink::Handle, name: &str, bridge: u32) -> (u32, u32) {
    let peer = format!("{name}p");
    handle
        .link()
        .add(rtnetlink::LinkVeth::new(name, &peer).build())
        .execute()
        .await
        .expect("create veth");
    let index = k.link_by_name(name).await.unwrap().unwrap().index;
    let peer_index = k.link_by_name(&peer).await.unwrap().unwrap().index;
    k.set_master(index, bridge).await.unwrap();
    k.set_up(index).await.unwrap();
    k.set_up(peer_index).await.unwrap();
    (index, peer_index)
}

/// Waits for the watcher's next notice, at most 2 s.
async fn notice(w: &mut BridgeWatcher, what: &str) {
    tokio::time::timeout(Duration::from_secs(2), w.changed())
        .await
        .unwrap_or_else(|_| panic!("no notice within 2 s after {what}"))
        .expect("watcher connection ended");
}

/// Waits until nothing is queued for 300 ms.
async fn quiet(w: &mut BridgeWatcher) {
    while tokio::time::timeout(Duration::from_millis(300), w.changed())
        .await
        .is_ok()
    {}
}

#[test]
fn bridge_ports_and_fdb() {
    in_new_netns("bridge_ports_and_fdb", || async {
        let k = Kernel::connect().await.unwrap();
        let (connection, handle, _) = rtnetlink::new_connection().expect("netlink socket");
        tokio::spawn(connection);
        let br = bridge(&k, &handle, "brs0").await;
        let other = {
            handle
                .link()
                .add(rtnetlink::LinkBridge::new("brs1").build())
                .execute()
                .await
                .unwrap();
            k.link_by_name("brs1").await.unwrap().unwrap().index
        };
        assert!(k.bridge_ports(br).await.unwrap().is_empty());
        let (a, a_peer) = port(&k, &handle, "vsa", br).await;
        let (b, _) = port(&k, &handle, "vsb", br).await;
        let (c, _) = port(&k, &handle, "vsc", other).await;
        let ports = k.bridge_ports(br).await.unwrap();
        let names: Vec<(&str, u32)> = ports.iter().map(|l| (l.name.as_str(), l.index)).collect();
        assert_eq!(names, [("vsa", a), ("vsb", b)]);
        assert_eq!(ports[0].kind.as_deref(), Some("veth"));
        assert_eq!(k.bridge_ports(other).await.unwrap()[0].index, c);

        // The ports' own addresses are permanent rows on their port.
        let fdb = k.bridge_fdb(br).await.unwrap();
        let a_mac = ports[0].mac.unwrap();
        assert!(
            fdb.iter()
                .any(|r| r.mac == a_mac && r.port == a && !r.learned),
            "{fdb:?}"
        );
        assert!(
            fdb.iter().all(|r| r.port != c),
            "another bridge's rows: {fdb:?}"
        );

        // A frame from behind vsa (vsap's ARP request) is learned on vsa.
        let peer_mac = k.link_by_index(a_peer).await.unwrap().unwrap().mac.unwrap();
        k.replace_address(a_peer, Ipv4Addr::new(10, 8, 0, 2), 24)
            .await
            .unwrap();
        let socket = UdpSocket::bind("10.8.0.2:0").unwrap();
        let mut learned = None;
        for _ in 0..150 {
            let _ = socket.send_to(b"x", "10.8.0.9:9");
            let fdb = k.bridge_fdb(br).await.unwrap();
            learned = fdb.into_iter().find(|r| r.mac == peer_mac);
            if learned.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let learned = learned.expect("vsap's MAC learned");
        assert_eq!((learned.port, learned.learned), (a, true));
    });
}

#[test]
fn watcher_reports_port_and_fdb_changes() {
    in_new_netns("watcher_reports_port_and_fdb_changes", || async {
        // No IPv6 (DAD, router solicitations): the test's own frame is the first one
        // the bridge learns from.
        for conf in ["all", "default"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
        }
        let k = Kernel::connect().await.unwrap();
        let (connection, handle, _) = rtnetlink::new_connection().expect("netlink socket");
        tokio::spawn(connection);
        let br = bridge(&k, &handle, "brw0").await;
        let mut w = Kernel::watch_bridges().unwrap();

        let (a, a_peer) = port(&k, &handle, "vwa", br).await;
        notice(&mut w, "a port was added").await;
        quiet(&mut w).await;

        // A learned MAC is a bridge neighbour event.
        k.replace_address(a_peer, Ipv4Addr::new(10, 8, 0, 2), 24)
            .await
            .unwrap();
        quiet(&mut w).await;
        // To the subnet's broadcast address: one frame, no ARP for an absent peer (whose
        // retries, a second apart, would go on through the checks below).
        let socket = UdpSocket::bind("10.8.0.2:0").unwrap();
        socket.set_broadcast(true).unwrap();
        socket.send_to(b"x", "10.8.0.255:9").unwrap();
        notice(&mut w, "a MAC was learned").await;
        quiet(&mut w).await;

        // An IPv4 neighbour (ARP) event alone is no notice. Any link event counts as a
        // change (the bridge's own state can still move, e.g. its carrier or address),
        // so one unrelated notice in a window is tolerated: the check fails only when
        // every one of five ARP entries came with a notice.
        let mut silent = false;
        for i in 0..5u8 {
            k.replace_neighbour(
                br,
                Ipv4Addr::new(10, 7, 0, 5 + i),
                vrouter_state::Mac([2, 0, 0, 0, 0, 5 + i]),
            )
            .await
            .unwrap();
            if tokio::time::timeout(Duration::from_millis(200), w.changed())
                .await
                .is_err()
            {
                silent = true;
                break;
            }
            quiet(&mut w).await;
        }
        assert!(silent, "an ARP entry is not a bridge change");

        k.delete_link(a).await.unwrap();
        notice(&mut w, "a port was removed").await;
    });
}
