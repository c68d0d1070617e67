//! Root tests of the nftables traffic counters against the real kernel, each in
//! throwaway network namespaces (as in kernel_root.rs). Without root they print a skip
//! line, except under CI=true, where they fail.

mod common;
use common::*;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};
use vrouter_kernel::{
    CounterReading, Direction, Kernel, KernelError, Nft, PrefixCounter, Route, Slot,
};

fn counter(direction: Direction, prefix: &str, stack: &str) -> PrefixCounter {
    PrefixCounter {
        owner: format!("stack {stack}"),
        prefix: prefix.parse().unwrap(),
        direction,
    }
}

/// `nft` output for the table, when the binary is installed (dev and CI hosts only:
/// the router never runs it). Runs in the calling thread's namespace.
fn nft_list(table: &str) -> Option<String> {
    let out = Command::new("timeout")
        .args(["10", "nft", "-a", "list", "table", "ip", table])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "nft list failed or is missing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nft_run(args: &[&str]) -> bool {
    Command::new("timeout")
        .arg("10")
        .arg("nft")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

fn ours(readings: &[CounterReading]) -> Vec<PrefixCounter> {
    let mut v: Vec<PrefixCounter> = readings.iter().filter_map(|r| r.counter.clone()).collect();
    v.sort();
    v
}

fn slot(direction: Direction, prefix_len: u8) -> Slot {
    Slot {
        direction,
        prefix_len,
    }
}

#[test]
fn counters_create_dump_readd_delete() {
    in_new_netns("counters_create_dump_readd_delete", || async {
        let nft = Nft::connect("vrtest", "traffic").unwrap();
        assert_eq!(nft.counters().unwrap(), vec![], "no table yet: no counters");
        assert_eq!(nft.dump().unwrap(), Default::default());
        nft.delete_table().expect("deleting a missing table is Ok");
        nft.ensure_chain().unwrap();
        nft.ensure_chain().expect("ensuring twice is Ok");
        assert_eq!(nft.counters().unwrap(), vec![]);

        let a_to = counter(Direction::ToPrefix, "10.2.0.0/24", "a");
        let a_from = counter(Direction::FromPrefix, "10.2.0.0/24", "a");
        let b_to = counter(Direction::ToPrefix, "10.3.0.7/32", "b");
        let b_from = counter(Direction::FromPrefix, "10.3.0.7/32", "b");
        nft.add_counters(&[a_to.clone(), a_from.clone(), b_to.clone()])
            .unwrap();
        let first = nft.dump().unwrap();
        assert_eq!(first.elements.len(), 3, "{first:?}");
        assert_eq!(
            ours(&first.elements),
            vec![a_to.clone(), a_from.clone(), b_to.clone()]
        );
        assert!(first
            .elements
            .iter()
            .all(|r| r.bytes == 0 && r.packets == 0));
        // One set and one rule per slot.
        let mut slots: Vec<Option<Slot>> = first.rules.iter().map(|r| r.slot).collect();
        slots.sort();
        assert_eq!(
            slots,
            vec![
                Some(slot(Direction::ToPrefix, 24)),
                Some(slot(Direction::ToPrefix, 32)),
                Some(slot(Direction::FromPrefix, 24)),
            ]
        );
        assert_eq!(first.sets.len(), 3);
        assert!(first.sets.iter().all(|s| s.slot.is_some()), "{first:?}");

        // Re-adding what is there adds nothing; the new one is added with its set.
        nft.add_counters(&[a_to.clone(), b_to.clone(), b_from.clone(), b_from.clone()])
            .unwrap();
        let second = nft.dump().unwrap();
        assert_eq!(second.elements.len(), 4, "{second:?}");
        assert_eq!(second.rules.len(), 4);
        for r in &first.rules {
            assert!(second.rules.contains(r), "rule {r:?} kept with its handle");
        }
        for e in &first.elements {
            assert!(second.elements.contains(e), "element {e:?} kept");
        }

        // The kernel agrees with our encoding, as nft decodes it.
        if let Some(listing) = nft_list("vrtest") {
            println!("{listing}");
            assert!(
                listing.contains("type filter hook forward priority filter; policy accept;"),
                "{listing}"
            );
            for line in [
                "ip daddr & 255.255.255.0 == @to_24 comment \"vrouter count to_24\"",
                "ip saddr & 255.255.255.0 == @from_24 comment \"vrouter count from_24\"",
                "ip daddr @to_32 comment \"vrouter count to_32\"",
                "ip saddr @from_32 comment \"vrouter count from_32\"",
                "set to_24 {",
                "type ipv4_addr",
                "counter",
                "10.2.0.0 counter packets 0 bytes 0 comment \"vrouter to 10.2.0.0/24 stack a\"",
                "10.3.0.7 counter packets 0 bytes 0 comment \"vrouter from 10.3.0.7/32 stack b\"",
            ] {
                assert!(listing.contains(line), "missing {line:?} in\n{listing}");
            }
            assert!(!listing.contains("flags"), "a plain hash:\n{listing}");
            // A rule someone else put in the chain shows up, but not as ours.
            assert!(nft_run(&[
                "add",
                "rule",
                "ip",
                "vrtest",
                "traffic",
                "ip",
                "daddr",
                "10.9.0.0/16",
                "counter",
            ]));
            let with_foreign = nft.rules().unwrap();
            assert_eq!(with_foreign.len(), 5);
            let foreign: Vec<u64> = with_foreign
                .iter()
                .filter(|r| r.slot.is_none())
                .map(|r| r.handle)
                .collect();
            assert_eq!(foreign.len(), 1);
            nft.delete_rules(&foreign).unwrap();
            // An element someone else added to our set: there, but not ours.
            assert!(nft_run(&[
                "add", "element", "ip", "vrtest", "to_24", "{", "10.9.9.0", "}",
            ]));
            let elements = nft.counters().unwrap();
            assert_eq!(elements.len(), 5);
            assert_eq!(elements.iter().filter(|e| e.counter.is_none()).count(), 1);
            nft.delete_elements(&[(slot(Direction::ToPrefix, 24), "10.9.9.0".parse().unwrap())])
                .unwrap();
        }

        // Delete elements; what is gone already is fine, alone or in a batch.
        let a_from_at = (Slot::of(&a_from), a_from.prefix.addr());
        let b_to_at = (Slot::of(&b_to), b_to.prefix.addr());
        nft.delete_elements(&[a_from_at]).unwrap();
        nft.delete_elements(&[a_from_at])
            .expect("deleting a gone element is Ok");
        nft.delete_elements(&[a_from_at, b_to_at])
            .expect("a gone element in a batch does not stop the rest");
        assert_eq!(
            ours(&nft.counters().unwrap()),
            vec![a_to.clone(), b_from.clone()]
        );

        // A set goes after its rule; rules and sets already gone are fine.
        let to32 = second
            .rules
            .iter()
            .find(|r| r.slot == Some(slot(Direction::ToPrefix, 32)))
            .unwrap()
            .handle;
        nft.delete_rules(&[to32]).unwrap();
        nft.delete_rules(&[to32])
            .expect("deleting a gone rule is Ok");
        nft.delete_sets(&["to_32".into()]).unwrap();
        nft.delete_sets(&["to_32".into(), "nope".into()])
            .expect("deleting gone sets is Ok");
        let now = nft.dump().unwrap();
        assert_eq!(now.rules.len(), 3);
        assert_eq!(now.sets.len(), 3);

        nft.delete_table().unwrap();
        assert_eq!(nft.counters().unwrap(), vec![]);
        nft.delete_table().expect("deleting it again is Ok");
        if let Some(listing) = nft_list("vrtest") {
            panic!("table still there:\n{listing}");
        }
    });
}

/// Clears CAP_NET_ADMIN from the calling thread's effective set.
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
fn without_net_admin_counting_is_not_permitted() {
    in_new_netns("without_net_admin_counting_is_not_permitted", || async {
        drop_net_admin_on_this_thread();
        let nft = Nft::connect("vrtest", "traffic").unwrap();
        let err = nft.ensure_chain().unwrap_err();
        assert!(matches!(err, KernelError::NotPermitted { .. }), "{err:?}");
        assert!(err.to_string().contains("CAP_NET_ADMIN"), "{err}");
    });
}

const UDP_IP_OVERHEAD: usize = 28; // IPv4 header (no options) + UDP header

/// Sends `count` datagrams of `ip_size` IP bytes from `from` to `to`.
fn send_burst(from: &UdpSocket, to: SocketAddrV4, count: usize, ip_size: usize) {
    let payload = vec![0x5a; ip_size - UDP_IP_OVERHEAD];
    for _ in 0..count {
        assert_eq!(from.send_to(&payload, to).unwrap(), payload.len());
    }
}

/// Receives until `want` datagrams of `ip_size` IP bytes from `from` arrived, or the
/// deadline passes; returns how many did.
fn receive(socket: &UdpSocket, from: Ipv4Addr, want: usize, ip_size: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = 0;
    let mut buf = [0u8; 2048];
    while got < want && Instant::now() < deadline {
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        if let Ok((n, SocketAddr::V4(src))) = socket.recv_from(&mut buf) {
            if *src.ip() == from && n == ip_size - UDP_IP_OVERHEAD {
                got += 1;
            }
        }
    }
    got
}

/// A router-like namespace (this thread's) forwards between a stack side (L, service
/// 10.1.0.5) and an overlay side (W, carrying the remote stacks' 10.2.0.7 and
/// 10.3.0.7). Datagrams of known sizes in different counts go both ways to both
/// remote prefixes at once; each counter must hold exactly count × IP size.
#[test]
fn forwarded_ip_bytes_are_counted_exactly() {
    in_new_netns("forwarded_ip_bytes_are_counted_exactly", || async {
        count_forwarded(0).await
    });
}

/// The same among counters for 1,000 more remote /24s and an overlapping /16: the chain
/// holds one rule per direction and prefix length (4), not two per prefix (2,006);
/// each count lands on its own element, the /16 counts what its /24 does, and the
/// 1,000 others stay at zero.
#[test]
fn a_thousand_prefixes_take_four_rules_and_count_exactly() {
    in_new_netns(
        "a_thousand_prefixes_take_four_rules_and_count_exactly",
        || async { count_forwarded(1000).await },
    );
}

/// `extra` more /24 prefixes (10.100.0.0/24 and up, stacks x0, x1, ...) and, when
/// `extra` > 0, stack "wide" owning 10.2.0.0/16 around stack a's 10.2.0.0/24.
async fn count_forwarded(extra: usize) {
    {
        let k = Kernel::connect().await.unwrap();
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable forwarding");
        let stack_ns = spare_netns();
        let overlay_ns = spare_netns();
        let stk = k
            .create_veth_into("stk0", 1500, stack_ns.as_fd(), "eth0")
            .await
            .unwrap();
        let ovl = k
            .create_veth_into("ovl0", 1500, overlay_ns.as_fd(), "eth0")
            .await
            .unwrap();
        k.replace_address(stk, Ipv4Addr::new(10, 1, 0, 254), 24)
            .await
            .unwrap();
        k.replace_address(ovl, Ipv4Addr::new(10, 255, 0, 1), 24)
            .await
            .unwrap();
        k.set_up(stk).await.unwrap();
        k.set_up(ovl).await.unwrap();
        for dst in ["10.2.0.0/24", "10.3.0.0/24"] {
            k.replace_route(&Route {
                table: 254,
                dst: dst.parse().unwrap(),
                gateway: Some(Ipv4Addr::new(10, 255, 0, 2)),
                oif: Some(ovl),
                onlink: false,
                protocol: 4,
                nexthop: None,
            })
            .await
            .unwrap();
        }

        let service = Ipv4Addr::new(10, 1, 0, 5);
        let remote_a = Ipv4Addr::new(10, 2, 0, 7);
        let remote_b = Ipv4Addr::new(10, 3, 0, 7);
        // One side: an address (or two), a route back through the router, sockets.
        async fn side(addrs: &[(Ipv4Addr, u8)], via: Ipv4Addr, dst: &str) -> Vec<UdpSocket> {
            let k = Kernel::connect().await.unwrap();
            let eth0 = k.link_by_name("eth0").await.unwrap().unwrap().index;
            for (a, len) in addrs {
                k.replace_address(eth0, *a, *len).await.unwrap();
            }
            k.set_up(eth0).await.unwrap();
            k.replace_route(&Route {
                table: 254,
                dst: dst.parse().unwrap(),
                gateway: Some(via),
                oif: Some(eth0),
                onlink: false,
                protocol: 4,
                nexthop: None,
            })
            .await
            .unwrap();
            addrs
                .iter()
                .filter(|(_, len)| *len == 32 || *len == 24)
                .map(|(a, _)| UdpSocket::bind((*a, 7000)).unwrap())
                .collect()
        }
        let l = in_netns(&stack_ns, || async {
            side(&[(service, 24)], Ipv4Addr::new(10, 1, 0, 254), "0.0.0.0/0").await
        });
        let w = in_netns(&overlay_ns, || async {
            side(
                &[
                    (Ipv4Addr::new(10, 255, 0, 2), 24),
                    (remote_a, 32),
                    (remote_b, 32),
                ],
                Ipv4Addr::new(10, 255, 0, 1),
                "10.1.0.0/24",
            )
            .await
        });
        let (l, w_a, w_b) = (&l[0], &w[1], &w[2]);
        let to = |ip| SocketAddrV4::new(ip, 7000);

        // Warm up every path (neighbour resolution) before the counters exist.
        for (remote, w_sock) in [(remote_a, w_a), (remote_b, w_b)] {
            send_burst(l, to(remote), 1, 100);
            assert_eq!(receive(w_sock, service, 1, 100), 1, "path to {remote}");
            send_burst(w_sock, to(service), 1, 100);
            assert_eq!(receive(l, remote, 1, 100), 1, "path from {remote}");
        }

        let nft = Nft::connect("vrtest", "traffic").unwrap();
        // In the order of `flows` below.
        let counters = [
            counter(Direction::ToPrefix, "10.2.0.0/24", "a"),
            counter(Direction::ToPrefix, "10.3.0.0/24", "b"),
            counter(Direction::FromPrefix, "10.2.0.0/24", "a"),
            counter(Direction::FromPrefix, "10.3.0.0/24", "b"),
        ];
        let mut all = counters.to_vec();
        let others: Vec<PrefixCounter> = (0..extra)
            .flat_map(|i| {
                let prefix = format!("10.{}.{}.0/24", 100 + i / 256, i % 256);
                let stack = format!("x{i}");
                [Direction::ToPrefix, Direction::FromPrefix].map(|d| counter(d, &prefix, &stack))
            })
            .collect();
        all.extend(others.iter().cloned());
        let wide = [
            counter(Direction::ToPrefix, "10.2.0.0/16", "wide"),
            counter(Direction::FromPrefix, "10.2.0.0/16", "wide"),
        ];
        if extra > 0 {
            all.extend(wide.iter().cloned());
        }
        let started = Instant::now();
        nft.add_counters(&all).unwrap();
        println!("{} counters added in {:?}", all.len(), started.elapsed());
        let dump = nft.dump().unwrap();
        assert_eq!(dump.elements.len(), all.len());
        let want_rules = if extra > 0 { 4 } else { 2 };
        assert_eq!(dump.rules.len(), want_rules, "{:?}", dump.rules);
        assert!(dump.rules.iter().all(|r| r.slot.is_some()));
        // Adding them all again changes nothing. (Element order is the hash set's, which
        // the kernel's deferred rehash after 2,000 inserts may change between dumps.)
        nft.add_counters(&all).unwrap();
        let sorted = |mut d: vrouter_kernel::CounterDump| {
            d.elements.sort_by_key(|e| (e.slot, e.key));
            d
        };
        assert_eq!(sorted(nft.dump().unwrap()), sorted(dump.clone()));

        // (from socket, to, count, IP size, receiving socket, sender address)
        let flows = [
            (l, to(remote_a), 37usize, 500usize, w_a, service),
            (l, to(remote_b), 61, 1200, w_b, service),
            (w_a, to(service), 23, 300, l, remote_a),
            (w_b, to(service), 11, 100, l, remote_b),
        ];
        let received: Vec<(usize, usize)> = std::thread::scope(|scope| {
            // Receivers: one per socket; the service's socket gets two flows.
            let a = scope.spawn(|| receive(w_a, service, 37, 500));
            let b = scope.spawn(|| receive(w_b, service, 61, 1200));
            let back = scope.spawn(|| {
                let deadline = Instant::now() + Duration::from_secs(10);
                let (mut from_a, mut from_b) = (0, 0);
                let mut buf = [0u8; 2048];
                l.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                while (from_a < 23 || from_b < 11) && Instant::now() < deadline {
                    if let Ok((n, SocketAddr::V4(src))) = l.recv_from(&mut buf) {
                        match (*src.ip(), n + UDP_IP_OVERHEAD) {
                            (ip, 300) if ip == remote_a => from_a += 1,
                            (ip, 100) if ip == remote_b => from_b += 1,
                            _ => {}
                        }
                    }
                }
                (from_a, from_b)
            });
            let senders: Vec<_> = flows
                .iter()
                .map(|&(from, dst, count, size, _, _)| {
                    scope.spawn(move || send_burst(from, dst, count, size))
                })
                .collect();
            for s in senders {
                s.join().unwrap();
            }
            let (from_a, from_b) = back.join().unwrap();
            vec![
                (a.join().unwrap(), 37),
                (b.join().unwrap(), 61),
                (from_a, 23),
                (from_b, 11),
            ]
        });
        for (got, want) in &received {
            assert_eq!(got, want, "datagrams delivered: {received:?}");
        }

        let readings = nft.counters().unwrap();
        let count_of = |c: &PrefixCounter| {
            let r = readings
                .iter()
                .find(|r| r.counter.as_ref() == Some(c))
                .unwrap_or_else(|| panic!("{c:?} in {readings:?}"));
            (r.packets, r.bytes)
        };
        for (c, (_, _, count, size, _, _)) in counters.iter().zip(flows.iter()) {
            let (count, size) = (*count as u64, *size as u64);
            assert_eq!(
                count_of(c),
                (count, count * size),
                "{c:?}: {count} datagrams of {size} IP bytes"
            );
        }
        if extra > 0 {
            // The /16 around a's /24 counts the same packets again.
            assert_eq!(count_of(&wide[0]), count_of(&counters[0]));
            assert_eq!(count_of(&wide[1]), count_of(&counters[2]));
            for c in &others {
                assert_eq!(count_of(c), (0, 0), "{c:?}");
            }
        }
        nft.delete_table().unwrap();
    }
}
