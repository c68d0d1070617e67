//! Root tests of netdev tables (`Nft::connect_table(Family::Netdev, ..)`) against the
//! real kernel: frames entering a device's ingress hook are rewritten and forwarded
//! to another device, by index or by a MAC map; TCP SYNs get their MSS clamped; and
//! what happens when a hooked device goes away. Each test builds its own namespaces:
//! this thread's ("the host") holds the veth ends a0 and b0, whose peers are eth0 of
//! namespaces A (10.9.0.1) and B (10.9.0.2). The host has no addresses and does not
//! forward: only the netdev table moves frames between A and B.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};
use vrouter_kernel::nft::{
    AddrField, BaseHook, ChainSpec, Family, Hook, Ipv4Range, Match, RuleCounterReading, RuleSpec,
    RuleVerdict, SetElements, SetSpec, Statement, TableSpec,
};
use vrouter_kernel::{Kernel, KernelError, Nft};
use vrouter_state::Mac;

const TABLE: &str = "vk1steer";
const A_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);
/// An address B does not have, reached through a MAC the map does not know.
const NOBODY_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 3);
const NOBODY_MAC: Mac = Mac([0x02, 0, 0, 0, 0, 0x99]);
/// The source MAC the table writes on frames from A.
const REWRITTEN: Mac = Mac([0x02, 0x42, 0x0a, 0x09, 0, 0xfe]);
/// What A and B first address each other's frames to (the table rewrites it).
const PLACEHOLDER: Mac = Mac([0x02, 0, 0, 0, 0, 0x01]);

/// The host side of the two links and the far ends.
struct Net {
    a_ns: OwnedFd,
    b_ns: OwnedFd,
    a0: u32,
    b0: u32,
    a_mac: Mac,
    b_mac: Mac,
}

/// One side's eth0: its address, up, and static neighbours (no ARP needed).
async fn side(at: Ipv4Addr, neighbours: &[(Ipv4Addr, Mac)]) -> Mac {
    let k = Kernel::connect().await.unwrap();
    let eth0 = k.link_by_name("eth0").await.unwrap().unwrap();
    k.replace_address(eth0.index, at, 24).await.unwrap();
    k.set_up(eth0.index).await.unwrap();
    for (ip, mac) in neighbours {
        k.replace_neighbour(eth0.index, *ip, *mac).await.unwrap();
    }
    eth0.mac.expect("eth0 has a MAC")
}

/// A and B, linked to this thread's namespace by a0 and b0. A's neighbours: B and
/// NOBODY; B's: A. All through `PLACEHOLDER` (or NOBODY_MAC), which the table fixes.
async fn net() -> Net {
    let k = Kernel::connect().await.unwrap();
    let a_ns = spare_netns();
    let b_ns = spare_netns();
    let a0 = k
        .create_veth_into("a0", 1500, a_ns.as_fd(), "eth0")
        .await
        .unwrap();
    let b0 = k
        .create_veth_into("b0", 1500, b_ns.as_fd(), "eth0")
        .await
        .unwrap();
    k.set_up(a0).await.unwrap();
    k.set_up(b0).await.unwrap();
    let a_mac = in_netns(&a_ns, || async {
        side(A_IP, &[(B_IP, PLACEHOLDER), (NOBODY_IP, NOBODY_MAC)]).await
    });
    let b_mac = in_netns(&b_ns, || async { side(B_IP, &[(A_IP, PLACEHOLDER)]).await });
    Net {
        a_ns,
        b_ns,
        a0,
        b0,
        a_mac,
        b_mac,
    }
}

fn rule(matches: Vec<Match>, statements: Vec<Statement>, verdict: RuleVerdict) -> RuleSpec {
    RuleSpec {
        matches,
        counter: false,
        counter_start: (0, 0),
        set_ct_mark: None,
        statements,
        verdict,
        comment: String::new(),
    }
}

fn counted(mut r: RuleSpec, start: (u64, u64), comment: &str) -> RuleSpec {
    r.counter = true;
    r.counter_start = start;
    r.comment = comment.into();
    r
}

fn ingress(name: &str, device: &str, rules: Vec<RuleSpec>) -> ChainSpec {
    ChainSpec {
        name: name.into(),
        hook: Some(BaseHook {
            hook: Hook::Ingress {
                device: device.into(),
            },
            priority: 0,
            policy_accept: true,
        }),
        rules,
    }
}

fn table(sets: Vec<SetSpec>, chains: Vec<ChainSpec>) -> TableSpec {
    TableSpec {
        family: Family::Netdev,
        name: TABLE.into(),
        sets,
        chains,
    }
}

/// IPv4 frames from b0 go to A (daddr rewritten) through a0.
fn b_to_a(n: &Net) -> ChainSpec {
    ingress(
        "in_b",
        "b0",
        vec![rule(
            vec![Match::MetaProtocolIpv4],
            vec![Statement::SetEtherDaddr(n.a_mac)],
            RuleVerdict::FwdToIndex(n.a0),
        )],
    )
}

fn udp(ns: &OwnedFd, at: Ipv4Addr, port: u16) -> (UdpSocket, SocketAddrV4) {
    let a = SocketAddrV4::new(at, port);
    let s = in_netns(ns, || async move { UdpSocket::bind(a).unwrap() });
    (s, a)
}

/// Sends `count` datagrams of `ip_size` IP bytes (20 + 8 + payload).
fn send(from: &UdpSocket, to: SocketAddrV4, count: usize, ip_size: usize) {
    let payload = vec![0x5a; ip_size - 28];
    for _ in 0..count {
        assert_eq!(from.send_to(&payload, to).unwrap(), payload.len());
    }
}

/// How many datagrams from `from` arrive before `wait` passes without one.
fn receive(socket: &UdpSocket, from: SocketAddrV4, want: usize, wait: Duration) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = 0;
    let mut buf = [0u8; 2048];
    socket.set_read_timeout(Some(wait)).unwrap();
    while got < want && Instant::now() < deadline {
        match socket.recv_from(&mut buf) {
            Ok((_, SocketAddr::V4(src))) if src == from => got += 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    got
}

/// An AF_PACKET socket on `ifname` of namespace `ns` that sees every frame.
fn capture(ns: &OwnedFd, ifname: &'static str) -> OwnedFd {
    in_netns(ns, || async move {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET socket");
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let index = nix::net::if_::if_nametoindex(ifname).unwrap();
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: addr is a valid sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind AF_PACKET");
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: tv is a valid timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO");
        fd
    })
}

/// Frames received on a capture socket until `wait` passes without one (at most 10 s).
fn frames(fd: &OwnedFd, wait: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while Instant::now() < deadline {
        // SAFETY: buf is writable for its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n > 0 {
            out.push(buf[..n as usize].to_vec());
        }
    }
    out
}

/// A frame's (source MAC, destination MAC, IPv4 protocol, IPv4 payload) if IPv4.
fn ipv4(frame: &[u8]) -> Option<(Mac, Mac, u8, &[u8])> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let dst = Mac(frame[0..6].try_into().ok()?);
    let src = Mac(frame[6..12].try_into().ok()?);
    Some((src, dst, frame[23], frame.get(14 + ihl..)?))
}

/// The MSS option of a TCP SYN (or SYN-ACK) segment.
fn syn_mss(tcp: &[u8]) -> Option<u16> {
    if tcp.len() < 20 || tcp[13] & 0x02 == 0 {
        return None;
    }
    let end = (usize::from(tcp[12] >> 4) * 4).min(tcp.len());
    let mut i = 20;
    while i < end {
        match tcp[i] {
            0 => return None,
            1 => i += 1,
            2 if i + 4 <= end => return Some(u16::from_be_bytes([tcp[i + 2], tcp[i + 3]])),
            _ => i += usize::from(tcp.get(i + 1).copied().unwrap_or(0)).max(2),
        }
    }
    None
}

fn counters(nft: &Nft) -> Vec<(String, u64, u64)> {
    let mut v: Vec<(String, u64, u64)> = nft
        .rule_counters()
        .unwrap()
        .into_iter()
        .filter(|r| !r.comment.is_empty())
        .map(|r| (r.comment, r.packets, r.bytes))
        .collect();
    v.sort();
    v
}

/// Frames of A to B's prefix enter a0, get the table's source MAC and B's MAC, and
/// leave by b0 (B sees them from REWRITTEN); B's answers come back through b0 to a0.
/// The counter starts from `counter_start` and adds IP bytes (netdev ingress counts
/// skb->len, the frame without its Ethernet header).
#[test]
fn a_netdev_table_rewrites_macs_and_forwards() {
    in_new_netns("a_netdev_table_rewrites_macs_and_forwards", || async {
        let n = net().await;
        let nft = Nft::connect_table(Family::Netdev, TABLE).unwrap();
        assert_eq!(nft.family(), Family::Netdev);
        assert_eq!(nft.rule_counters().unwrap(), vec![], "no table yet");
        let t = table(
            vec![SetSpec {
                name: "dst".into(),
                elements: SetElements::Ipv4Ranges(vec![Ipv4Range {
                    first: Ipv4Addr::new(10, 9, 0, 0),
                    last: Ipv4Addr::new(10, 9, 0, 255),
                }]),
            }],
            vec![
                ingress(
                    "in_a",
                    "a0",
                    vec![counted(
                        rule(
                            vec![
                                Match::MetaProtocolIpv4,
                                Match::AddrInSet {
                                    field: AddrField::IpDaddr,
                                    set: "dst".into(),
                                    equal: true,
                                },
                            ],
                            vec![
                                Statement::SetEtherSaddr(REWRITTEN),
                                Statement::SetEtherDaddr(n.b_mac),
                            ],
                            RuleVerdict::FwdToIndex(n.b0),
                        ),
                        (5, 500),
                        "a to b",
                    )],
                ),
                b_to_a(&n),
            ],
        );
        nft.replace_table(&t).unwrap();
        assert_eq!(counters(&nft), vec![("a to b".into(), 5, 500)]);

        let sniff = capture(&n.b_ns, "eth0");
        let (from_a, from_a_at) = udp(&n.a_ns, A_IP, 7000);
        let (at_b, at_b_at) = udp(&n.b_ns, B_IP, 5000);
        send(&from_a, at_b_at, 3, 100);
        assert_eq!(receive(&at_b, from_a_at, 3, Duration::from_secs(5)), 3);
        let seen: Vec<(Mac, Mac)> = frames(&sniff, Duration::from_millis(500))
            .iter()
            .filter_map(|f| ipv4(f))
            .filter(|(_, _, proto, _)| *proto == 17)
            .map(|(src, dst, _, _)| (src, dst))
            .collect();
        assert_eq!(
            seen,
            vec![(REWRITTEN, n.b_mac); 3],
            "B sees the table's MACs"
        );
        assert_eq!(counters(&nft), vec![("a to b".into(), 8, 800)]);

        // And back: b0's chain sends B's answer to A.
        send(&at_b, from_a_at, 2, 60);
        assert_eq!(receive(&from_a, at_b_at, 2, Duration::from_secs(5)), 2);

        // Without the table the frames go nowhere.
        nft.delete_table().unwrap();
        assert_eq!(nft.rule_counters().unwrap(), vec![]);
        send(&from_a, at_b_at, 1, 100);
        assert_eq!(receive(&at_b, from_a_at, 1, Duration::from_millis(300)), 0);
    });
}

/// `fwd to ether daddr map @macs`: frames to a MAC of the map leave by its device
/// and count; frames to another MAC are not forwarded (the host drops them) and do
/// not count.
#[test]
fn fwd_by_map_delivers_and_counts_only_hits() {
    in_new_netns("fwd_by_map_delivers_and_counts_only_hits", || async {
        let n = net().await;
        let nft = Nft::connect_table(Family::Netdev, TABLE).unwrap();
        // A addresses B by its real MAC here.
        in_netns(&n.a_ns, || async {
            side(A_IP, &[(B_IP, n.b_mac)]).await;
        });
        let t = table(
            vec![SetSpec {
                name: "macs".into(),
                elements: SetElements::MacToIndex(vec![(n.b_mac, n.b0), (REWRITTEN, n.a0)]),
            }],
            vec![
                ingress(
                    "in_a",
                    "a0",
                    vec![counted(
                        rule(
                            vec![],
                            vec![],
                            RuleVerdict::FwdByEtherDaddrMap("macs".into()),
                        ),
                        (0, 0),
                        "deliver",
                    )],
                ),
                b_to_a(&n),
            ],
        );
        nft.replace_table(&t).unwrap();
        let (from_a, from_a_at) = udp(&n.a_ns, A_IP, 7000);
        let (at_b, at_b_at) = udp(&n.b_ns, B_IP, 5000);
        send(&from_a, at_b_at, 4, 120);
        send(&from_a, SocketAddrV4::new(NOBODY_IP, 5000), 2, 120);
        assert_eq!(receive(&at_b, from_a_at, 4, Duration::from_secs(5)), 4);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(counters(&nft), vec![("deliver".into(), 4, 480)]);
        nft.delete_table().unwrap();
    });
}

/// A TCP connection from A to B through a table that clamps SYN MSS to 1000 in both
/// directions: B sees A's SYN with MSS 1000, A sees B's SYN-ACK with MSS 1000 (both
/// advertised 1460), the connection works (the checksum was fixed), and a SYN whose
/// MSS is below the clamp keeps it.
#[test]
fn mss_clamp_rewrites_syn_mss() {
    in_new_netns("mss_clamp_rewrites_syn_mss", || async {
        let n = net().await;
        let clamp = || {
            rule(
                vec![Match::TcpSynMssAbove(1000)],
                vec![Statement::SetTcpMss(1000)],
                RuleVerdict::Continue,
            )
        };
        let t = table(
            vec![],
            vec![
                ingress(
                    "in_a",
                    "a0",
                    vec![
                        clamp(),
                        rule(
                            vec![Match::MetaProtocolIpv4],
                            vec![Statement::SetEtherDaddr(n.b_mac)],
                            RuleVerdict::FwdToIndex(n.b0),
                        ),
                    ],
                ),
                ingress(
                    "in_b",
                    "b0",
                    vec![
                        clamp(),
                        rule(
                            vec![Match::MetaProtocolIpv4],
                            vec![Statement::SetEtherDaddr(n.a_mac)],
                            RuleVerdict::FwdToIndex(n.a0),
                        ),
                    ],
                ),
            ],
        );
        let nft = Nft::connect_table(Family::Netdev, TABLE).unwrap();
        nft.replace_table(&t).unwrap();
        let at_b = SocketAddrV4::new(B_IP, 8000);
        let listener = in_netns(&n.b_ns, || async move { TcpListener::bind(at_b).unwrap() });
        let sniff_b = capture(&n.b_ns, "eth0");
        let sniff_a = capture(&n.a_ns, "eth0");

        // SYNs that arrive (to the side's MAC; its own leave to PLACEHOLDER).
        let syns = |fd: &OwnedFd, to: Mac| -> Vec<u16> {
            frames(fd, Duration::from_millis(500))
                .iter()
                .filter_map(|f| ipv4(f))
                .filter(|(_, dst, proto, _)| *proto == 6 && *dst == to)
                .filter_map(|(_, _, _, tcp)| syn_mss(tcp))
                .collect()
        };
        let mut client = in_netns(&n.a_ns, || async move {
            TcpStream::connect_timeout(&at_b.into(), Duration::from_secs(5)).unwrap()
        });
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(syns(&sniff_b, n.b_mac), vec![1000], "A's SYN as B sees it");
        assert_eq!(
            syns(&sniff_a, n.a_mac),
            vec![1000],
            "B's SYN-ACK as A sees it"
        );

        // A SYN that advertises less keeps it.
        let small = connect_with_mss(&n.a_ns, at_b, 600);
        let _second = listener.accept().unwrap();
        assert_eq!(
            syns(&sniff_b, n.b_mac),
            vec![600],
            "not raised to the clamp"
        );
        drop(small);

        // The kernel's write alone (no size match) never raises an MSS either.
        let mut bare = t.clone();
        bare.chains[0].rules[0].matches.clear();
        nft.replace_table(&bare).unwrap();
        let small = connect_with_mss(&n.a_ns, at_b, 600);
        let _third = listener.accept().unwrap();
        assert_eq!(
            syns(&sniff_b, n.b_mac),
            vec![600],
            "nft_exthdr does not raise"
        );
        drop(small);
        nft.delete_table().unwrap();
    });
}

/// A TCP connection from namespace `ns` to `to` whose SYN advertises `mss`
/// (TCP_MAXSEG before connect).
fn connect_with_mss(ns: &OwnedFd, to: SocketAddrV4, mss: u32) -> OwnedFd {
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
    in_netns(ns, || async move {
        let s = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        socket::setsockopt(&s, sockopt::TcpMaxSeg, &mss).unwrap();
        socket::connect(s.as_raw_fd(), &SockaddrIn::from(to)).unwrap();
        s
    })
}

fn comments(nft: &Nft) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = nft
        .rule_counters()
        .unwrap()
        .into_iter()
        .map(|r: RuleCounterReading| (r.chain, r.comment))
        .collect();
    v.sort();
    v
}

fn counted_accept(comment: &str) -> RuleSpec {
    counted(rule(vec![], vec![], RuleVerdict::Accept), (0, 0), comment)
}

/// A device with an ingress chain goes away. Then: a table that no longer names it
/// replaces the old one; a table naming a missing device fails with NoSuchLink and
/// leaves the old table; delete_table works whatever the kernel did with the chain.
/// Prints what the kernel did with the orphaned chain.
#[test]
fn hooked_devices_may_go_away() {
    in_new_netns("hooked_devices_may_go_away", || async {
        let n = net().await;
        let k = Kernel::connect().await.unwrap();
        let nft = Nft::connect_table(Family::Netdev, TABLE).unwrap();
        let both = table(
            vec![],
            vec![
                ingress("in_a", "a0", vec![counted_accept("on a0")]),
                ingress("in_b", "b0", vec![counted_accept("on b0")]),
            ],
        );
        nft.replace_table(&both).unwrap();
        k.delete_link(n.a0).await.unwrap();
        let after = comments(&nft);
        let kept = after.contains(&("in_a".into(), "on a0".into()));
        println!(
            "kernel {}: the ingress chain of a deleted device is {}",
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim(),
            if kept { "kept (unhooked)" } else { "removed" }
        );
        assert!(after.contains(&("in_b".into(), "on b0".into())));

        let only_b = table(
            vec![],
            vec![ingress("in_b", "b0", vec![counted_accept("only b0")])],
        );
        nft.replace_table(&only_b).unwrap();
        assert_eq!(comments(&nft), vec![("in_b".into(), "only b0".into())]);

        let missing = table(
            vec![],
            vec![
                ingress("in_b", "b0", vec![counted_accept("b0 again")]),
                ingress("in_x", "vk1gone", vec![counted_accept("gone")]),
            ],
        );
        match nft.replace_table(&missing) {
            Err(KernelError::NoSuchLink(name)) => assert_eq!(name, "vk1gone"),
            other => panic!("want NoSuchLink(vk1gone), got {other:?}"),
        }
        assert_eq!(
            comments(&nft),
            vec![("in_b".into(), "only b0".into())],
            "the old table stays"
        );

        // A table whose only device is gone is deleted all the same.
        k.delete_link(n.b0).await.unwrap();
        nft.delete_table().unwrap();
        assert_eq!(nft.rule_counters().unwrap(), vec![]);
        nft.delete_table().unwrap();
    });
}

/// The encoding refuses what a table of the other family cannot hold, before the
/// kernel sees it.
#[test]
fn families_and_hooks_must_agree() {
    in_new_netns("families_and_hooks_must_agree", || async {
        let ip = Nft::connect_table(Family::Ip, TABLE).unwrap();
        let mut t = table(vec![], vec![ingress("in", "lo", vec![])]);
        t.family = Family::Ip;
        let err = ip.replace_table(&t).unwrap_err().to_string();
        assert!(err.contains("needs a netdev table"), "{err}");
        let netdev = Nft::connect_table(Family::Netdev, TABLE).unwrap();
        let err = netdev.replace_table(&t).unwrap_err().to_string();
        assert!(err.contains("this socket is for table netdev"), "{err}");
        let mut fwd = table(vec![], vec![]);
        fwd.chains.push(ChainSpec {
            name: "c".into(),
            hook: Some(BaseHook {
                hook: Hook::Forward,
                priority: 0,
                policy_accept: true,
            }),
            rules: vec![],
        });
        let err = netdev.replace_table(&fwd).unwrap_err().to_string();
        assert!(err.contains("no forward hook"), "{err}");
        assert_eq!(netdev.rule_counters().unwrap(), vec![]);
    });
}
