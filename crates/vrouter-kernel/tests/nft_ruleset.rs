//! Root tests of whole nftables rulesets (`Nft::replace_table`, `rule_counters`,
//! `mark_counters`) against the real kernel: the ACL table of issue 14 in throwaway
//! network namespaces (as in nft_root.rs). Without root they print a skip line, except
//! under CI=true, where they fail.

mod common;
use common::*;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};
use vrouter_kernel::nft::{
    AddrField, BaseHook, ChainSpec, Family, Hook, Ipv4Range, MarkCounterReading, Match, RuleSpec,
    RuleVerdict, SetElements, SetSpec, TableSpec,
};
use vrouter_kernel::{Kernel, KernelError, Nft, Route};
use vrouter_state::Mac;

const TABLE: &str = "vrouter_acl";
const OVL: &str = "ovl0";
const TCP: u8 = 6;
const UDP: u8 = 17;

/// Runs the `nft` binary (dev and CI hosts only: the router never runs it) in the
/// calling thread's namespace; its stdout, or None when it failed or is missing.
fn nft_cli(args: &[&str], stdin: Option<&str>) -> Option<String> {
    use std::io::Write;
    let mut child = Command::new("timeout")
        .arg("10")
        .arg("nft")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.unwrap_or("").as_bytes()).ok()?;
    drop(input);
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        eprintln!(
            "nft {args:?} failed or is missing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `nft list table ip vrouter_acl` with runs of white space as one space.
fn listing() -> Option<String> {
    let text = nft_cli(&["list", "table", "ip", TABLE], None)?;
    Some(text.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn range(first: &str, last: &str) -> Ipv4Range {
    Ipv4Range {
        first: first.parse().unwrap(),
        last: last.parse().unwrap(),
    }
}

fn prefix(p: &str) -> Ipv4Range {
    p.parse::<vrouter_state::Prefix>().unwrap().into()
}

fn rule(matches: Vec<Match>, verdict: RuleVerdict, comment: &str) -> RuleSpec {
    RuleSpec {
        matches,
        counter: !comment.is_empty(),
        counter_start: (0, 0),
        set_ct_mark: None,
        statements: Vec::new(),
        verdict,
        comment: comment.into(),
    }
}

fn in_set(field: AddrField, set: &str, equal: bool) -> Match {
    Match::AddrInSet {
        field,
        set: set.into(),
        equal,
    }
}

/// The base chain of the contract: rules 1 to 9 (or 1 to 6 and `acl closed`).
fn forward(closed: bool) -> ChainSpec {
    let tcp_not_syn = |field| {
        rule(
            vec![
                Match::CtStateNew,
                Match::TcpNotSyn,
                in_set(field, "local", true),
            ],
            RuleVerdict::Drop,
            "acl tcp-not-syn",
        )
    };
    let mut rules = vec![
        rule(
            vec![
                Match::IifName {
                    name: OVL.into(),
                    equal: false,
                },
                Match::OifName {
                    name: OVL.into(),
                    equal: true,
                },
                in_set(AddrField::IpSaddr, "local", false),
            ],
            RuleVerdict::Drop,
            "acl spoof-from-stack",
        ),
        rule(
            vec![
                Match::IifName {
                    name: OVL.into(),
                    equal: true,
                },
                in_set(AddrField::IpDaddr, "local", true),
                Match::SourceMacNotInSet {
                    set: "origins".into(),
                },
            ],
            RuleVerdict::Drop,
            "acl spoof-from-overlay",
        ),
        tcp_not_syn(AddrField::IpDaddr),
        tcp_not_syn(AddrField::IpSaddr),
        rule(
            vec![in_set(AddrField::CtOriginalDaddr, "local", false)],
            RuleVerdict::Accept,
            "",
        ),
        rule(
            vec![in_set(AddrField::CtOriginalSaddr, "local", true)],
            RuleVerdict::Accept,
            "",
        ),
    ];
    if closed {
        rules.push(rule(vec![], RuleVerdict::Drop, "acl closed"));
    } else {
        rules.extend([
            rule(
                vec![Match::CtMarkInSet {
                    set: "admitted".into(),
                }],
                RuleVerdict::Accept,
                "",
            ),
            rule(
                vec![],
                RuleVerdict::Vmap {
                    field: AddrField::CtOriginalSaddr,
                    map: "classes".into(),
                },
                "",
            ),
            rule(vec![], RuleVerdict::Drop, "acl fallback"),
        ]);
    }
    ChainSpec {
        name: "forward".into(),
        hook: Some(BaseHook {
            hook: Hook::Forward,
            priority: -10,
            policy_accept: true,
        }),
        rules,
    }
}

/// `ct original protocol P [ct original proto-dst A-B] counter (ct mark set M accept |
/// drop)`, or the default without matches.
fn class_rule(
    proto: Option<u8>,
    ports: Option<(u16, u16)>,
    mark: Option<u32>,
    comment: &str,
) -> RuleSpec {
    let mut matches = Vec::new();
    if let Some(p) = proto {
        matches.push(Match::CtOriginalProtocol(p));
    }
    if let Some((first, last)) = ports {
        matches.push(Match::CtOriginalDport { first, last });
    }
    RuleSpec {
        matches,
        counter: true,
        counter_start: (0, 0),
        set_ct_mark: mark,
        statements: Vec::new(),
        verdict: if mark.is_some() {
            RuleVerdict::Accept
        } else {
            RuleVerdict::Drop
        },
        comment: comment.into(),
    }
}

fn chain(name: &str, rules: Vec<RuleSpec>) -> ChainSpec {
    ChainSpec {
        name: name.into(),
        hook: None,
        rules,
    }
}

fn mark(generation: u16, id: u16) -> u32 {
    (u32::from(generation) << 16) | u32::from(id)
}

const REMOTE_MAC: Mac = Mac([2, 0, 0, 0, 0, 2]);

/// The contract's full table for stack "-" (10.1.0.0/24 and 10.1.5.0/24) with one
/// remote stack b (10.2.0.0/24 behind `b_mac`, and 10.3.0.0-10.3.0.9 behind another
/// MAC), generation `gen`: c0 for everyone but b (rule 1 allows tcp/80, rule 2 denies
/// udp/1000-2000, default deny), c1 for b (rule 3 allows udp/5000, rule 4 denies
/// udp/5001, default deny), and the marks of the allow rules admitted.
fn acl_table(generation: u16, b_mac: Mac) -> TableSpec {
    TableSpec {
        family: Family::Ip,
        name: TABLE.into(),
        sets: vec![
            SetSpec {
                name: "local".into(),
                elements: SetElements::Ipv4Ranges(vec![
                    prefix("10.1.5.0/24"),
                    prefix("10.1.0.0/24"),
                ]),
            },
            SetSpec {
                name: "origins".into(),
                elements: SetElements::SourceMacs(vec![
                    (prefix("10.2.0.0/24"), b_mac),
                    (range("10.3.0.0", "10.3.0.9"), Mac([2, 0, 0, 0, 0, 3])),
                ]),
            },
            SetSpec {
                name: "admitted".into(),
                elements: SetElements::CountedMarks(vec![
                    (mark(generation, 1), "acl 1".into()),
                    (mark(generation, 3), "acl 3".into()),
                ]),
            },
            SetSpec {
                name: "classes".into(),
                elements: SetElements::JumpMap(vec![
                    (range("0.0.0.0", "10.1.255.255"), "c0".into()),
                    (prefix("10.2.0.0/24"), "c1".into()),
                    (range("10.2.1.0", "255.255.255.255"), "c0".into()),
                ]),
            },
        ],
        chains: vec![
            chain(
                "c0",
                vec![
                    class_rule(
                        Some(TCP),
                        Some((80, 80)),
                        Some(mark(generation, 1)),
                        "acl 1 -",
                    ),
                    class_rule(Some(UDP), Some((1000, 2000)), None, "acl 2 -"),
                    class_rule(None, None, None, "acl default -"),
                ],
            ),
            chain(
                "c1",
                vec![
                    class_rule(
                        Some(UDP),
                        Some((5000, 5000)),
                        Some(mark(generation, 3)),
                        "acl 3 b",
                    ),
                    class_rule(Some(UDP), Some((5001, 5001)), None, "acl 4 b"),
                    class_rule(None, None, None, "acl default b"),
                ],
            ),
            forward(false),
        ],
    }
}

/// The same table as `nft -f` input (generation 1, b's MAC 02:00:00:00:00:02).
const ACL_TABLE_TEXT: &str = r#"
table ip vrouter_acl {
  set local { type ipv4_addr; flags interval; elements = { 10.1.0.0/24, 10.1.5.0/24 } }
  set origins { type ipv4_addr . ether_addr; flags interval;
    elements = { 10.2.0.0/24 . 02:00:00:00:00:02, 10.3.0.0-10.3.0.9 . 02:00:00:00:00:03 } }
  set admitted { type mark; counter;
    elements = { 0x00010001 comment "acl 1", 0x00010003 comment "acl 3" } }
  map classes { type ipv4_addr : verdict; flags interval;
    elements = { 0.0.0.0-10.1.255.255 : jump c0, 10.2.0.0/24 : jump c1, 10.2.1.0-255.255.255.255 : jump c0 } }
  chain c0 {
    ct original protocol 6 ct original proto-dst 80 counter ct mark set 0x00010001 accept comment "acl 1 -"
    ct original protocol 17 ct original proto-dst 1000-2000 counter drop comment "acl 2 -"
    counter drop comment "acl default -"
  }
  chain c1 {
    ct original protocol 17 ct original proto-dst 5000 counter ct mark set 0x00010003 accept comment "acl 3 b"
    ct original protocol 17 ct original proto-dst 5001 counter drop comment "acl 4 b"
    counter drop comment "acl default b"
  }
  chain forward {
    type filter hook forward priority -10; policy accept;
    iifname != "ovl0" oifname "ovl0" ip saddr != @local counter drop comment "acl spoof-from-stack"
    iifname "ovl0" ip daddr @local ip saddr . ether saddr != @origins counter drop comment "acl spoof-from-overlay"
    ct state new meta l4proto tcp tcp flags & (fin|syn|rst|ack) != syn ip daddr @local counter drop comment "acl tcp-not-syn"
    ct state new meta l4proto tcp tcp flags & (fin|syn|rst|ack) != syn ip saddr @local counter drop comment "acl tcp-not-syn"
    ct original ip daddr != @local accept
    ct original ip saddr @local accept
    ct mark @admitted accept
    ct original ip saddr vmap @classes
    counter drop comment "acl fallback"
  }
}
"#;

fn comments(nft: &Nft) -> Vec<(String, String)> {
    nft.rule_counters()
        .unwrap()
        .into_iter()
        .map(|r| (r.chain, r.comment))
        .collect()
}

#[test]
fn the_acl_table_goes_in_as_nft_would_write_it() {
    in_new_netns("the_acl_table_goes_in_as_nft_would_write_it", || async {
        let nft = Nft::connect(TABLE, "forward").unwrap();
        assert_eq!(nft.rule_counters().unwrap(), vec![], "no table yet");
        assert_eq!(nft.mark_counters("admitted").unwrap(), vec![]);
        let table = acl_table(1, REMOTE_MAC);
        nft.replace_table(&table)
            .expect("a missing table is replaced too");

        let rules = nft.rule_counters().unwrap();
        let want: Vec<(String, String)> = table
            .chains
            .iter()
            .flat_map(|c| c.rules.iter().map(|r| (c.name.clone(), r.comment.clone())))
            .collect();
        let mut got = comments(&nft);
        let mut sorted_want = want.clone();
        got.sort();
        sorted_want.sort();
        assert_eq!(got, sorted_want);
        assert!(rules
            .iter()
            .all(|r| r.packets == 0 && r.bytes == 0 && r.handle > 0));
        assert_eq!(
            nft.mark_counters("admitted").unwrap(),
            vec![
                MarkCounterReading {
                    key: 0x0001_0001,
                    comment: Some("acl 1".into()),
                    packets: 0,
                    bytes: 0
                },
                MarkCounterReading {
                    key: 0x0001_0003,
                    comment: Some("acl 3".into()),
                    packets: 0,
                    bytes: 0
                },
            ]
        );

        let Some(ours) = listing() else { return };
        println!("{ours}");
        for construct in [
            "set local { type ipv4_addr flags interval elements = { 10.1.0.0/24, 10.1.5.0/24 } }",
            "set origins { type ipv4_addr . ether_addr flags interval elements = { 10.2.0.0/24 . 02:00:00:00:00:02, 10.3.0.0-10.3.0.9 . 02:00:00:00:00:03 } }",
            "set admitted { type mark counter elements = { 0x00010001 counter packets 0 bytes 0 comment \"acl 1\", 0x00010003 counter packets 0 bytes 0 comment \"acl 3\" } }",
            "map classes { type ipv4_addr : verdict flags interval elements = { 0.0.0.0-10.1.255.255 : jump c0, 10.2.0.0/24 : jump c1, 10.2.1.0-255.255.255.255 : jump c0 } }",
            "ct protocol tcp ct original proto-dst 80 counter packets 0 bytes 0 ct mark set 0x00010001 accept comment \"acl 1 -\"",
            "ct protocol udp ct original proto-dst 1000-2000 counter packets 0 bytes 0 drop comment \"acl 2 -\"",
            "counter packets 0 bytes 0 drop comment \"acl default -\"",
            "ct protocol udp ct original proto-dst 5000 counter packets 0 bytes 0 ct mark set 0x00010003 accept comment \"acl 3 b\"",
            "type filter hook forward priority filter - 10; policy accept;",
            "iifname != \"ovl0\" oifname \"ovl0\" ip saddr != @local counter packets 0 bytes 0 drop comment \"acl spoof-from-stack\"",
            "iifname \"ovl0\" ip daddr @local ip saddr . ether saddr != @origins counter packets 0 bytes 0 drop comment \"acl spoof-from-overlay\"",
            "ct state new tcp flags != syn / fin,syn,rst,ack ip daddr @local counter packets 0 bytes 0 drop comment \"acl tcp-not-syn\"",
            "ct state new tcp flags != syn / fin,syn,rst,ack ip saddr @local counter packets 0 bytes 0 drop comment \"acl tcp-not-syn\"",
            "ct original ip daddr != @local accept ct original ip saddr @local accept ct mark @admitted accept ct original ip saddr vmap @classes counter packets 0 bytes 0 drop comment \"acl fallback\"",
        ] {
            assert!(ours.contains(construct), "missing {construct:?} in\n{ours}");
        }
        // Whole: nft's own encoding of the same text lists the same, line for line.
        assert!(nft_cli(&["delete", "table", "ip", TABLE], None).is_some());
        assert!(nft_cli(&["-f", "-"], Some(ACL_TABLE_TEXT)).is_some());
        let theirs = listing().unwrap();
        assert_eq!(ours, theirs);
    });
}

/// A second, different table: generation 2, b's class allows udp/6000 only, no c0
/// rules but the default, everyone else in one class.
fn other_table() -> TableSpec {
    let mut t = acl_table(2, REMOTE_MAC);
    t.sets[2].elements = SetElements::CountedMarks(vec![(mark(2, 9), "acl 9".into())]);
    t.sets[3].elements = SetElements::JumpMap(vec![
        (range("0.0.0.0", "10.1.255.255"), "c0".into()),
        (prefix("10.2.0.0/16"), "c1".into()),
        (range("10.3.0.0", "255.255.255.255"), "c0".into()),
    ]);
    t.chains[0].rules = vec![class_rule(None, None, None, "acl default -")];
    t.chains[1].rules = vec![
        class_rule(Some(UDP), Some((6000, 6000)), Some(mark(2, 9)), "acl 9 b"),
        class_rule(None, None, None, "acl default b"),
    ];
    t
}

#[test]
fn a_replaced_table_is_gone_and_a_refused_one_changes_nothing() {
    in_new_netns(
        "a_replaced_table_is_gone_and_a_refused_one_changes_nothing",
        || async {
            let nft = Nft::connect(TABLE, "forward").unwrap();
            nft.replace_table(&acl_table(1, REMOTE_MAC)).unwrap();
            let first = listing();
            let other = other_table();
            nft.replace_table(&other).unwrap();
            let mut got = comments(&nft);
            got.sort();
            let mut want: Vec<(String, String)> = other
                .chains
                .iter()
                .flat_map(|c| c.rules.iter().map(|r| (c.name.clone(), r.comment.clone())))
                .collect();
            want.sort();
            assert_eq!(got, want, "only the new table's rules");
            let marks: Vec<(u32, Option<String>)> = nft
                .mark_counters("admitted")
                .unwrap()
                .into_iter()
                .map(|r| (r.key, r.comment))
                .collect();
            assert_eq!(marks, vec![(0x0002_0009, Some("acl 9".into()))]);
            let second = listing();
            if let (Some(first), Some(second)) = (&first, &second) {
                assert_ne!(first, second);
                for gone in [
                    "acl 1 -",
                    "acl 3 b",
                    "0x00010001",
                    "10.2.1.0-255.255.255.255",
                ] {
                    assert!(!second.contains(gone), "{gone:?} still in\n{second}");
                }
                for new in [
                    "10.2.0.0/16 : jump c1",
                    "10.3.0.0-255.255.255.255 : jump c0",
                    "ct mark set 0x00020009 accept comment \"acl 9 b\"",
                ] {
                    assert!(second.contains(new), "{new:?} missing in\n{second}");
                }
            }

            // Refused by the kernel: a jump to a chain the table does not have, a
            // lookup in a set it does not have. The table in force stays as it was.
            let before = nft.rule_counters().unwrap();
            let mut jump_nowhere = acl_table(3, REMOTE_MAC);
            if let SetElements::JumpMap(list) = &mut jump_nowhere.sets[3].elements {
                list[1].1 = "c9".into();
            }
            let mut no_such_set = acl_table(3, REMOTE_MAC);
            no_such_set.sets.remove(1); // origins
            for (what, bad) in [("jump to c9", jump_nowhere), ("no origins", no_such_set)] {
                let err = nft.replace_table(&bad).unwrap_err();
                assert!(matches!(err, KernelError::Errno { .. }), "{what}: {err:?}");
                println!("{what}: {err}");
                assert_eq!(nft.rule_counters().unwrap(), before, "{what}");
                assert_eq!(listing(), second, "{what}");
            }
            // Refused before the kernel sees it: overlapping ranges, a long comment.
            let mut overlap = other_table();
            overlap.sets[0].elements =
                SetElements::Ipv4Ranges(vec![prefix("10.1.0.0/16"), prefix("10.1.5.0/24")]);
            let mut long = other_table();
            long.chains[1].rules[0].comment = "x".repeat(129);
            for bad in [overlap, long] {
                let err = nft.replace_table(&bad).unwrap_err();
                assert!(err.to_string().contains("replace nftables table"), "{err}");
                assert_eq!(nft.rule_counters().unwrap(), before);
            }
            // A table of another name is not this socket's.
            let mut renamed = other_table();
            renamed.name = "elsewhere".into();
            assert!(nft.replace_table(&renamed).is_err());
            assert_eq!(nft.rule_counters().unwrap(), before);
        },
    );
}

/// 1,000 class chains of 3 rules, a 1,000-range class map, 1,000 admitted marks: one
/// batch of several hundred KiB, over the default socket send buffer (208 KiB), goes
/// in whole; replacing it again as well.
#[test]
fn a_thousand_classes_go_in_as_one_batch() {
    in_new_netns("a_thousand_classes_go_in_as_one_batch", || async {
        let nft = Nft::connect(TABLE, "forward").unwrap();
        let mut table = acl_table(1, REMOTE_MAC);
        let classes: Vec<(Ipv4Range, String)> = (0..1000u32)
            .map(|i| {
                let first = u32::from(Ipv4Addr::new(11, 0, 0, 0)) + i * 256;
                let r = Ipv4Range {
                    first: Ipv4Addr::from(first),
                    last: Ipv4Addr::from(first + 255),
                };
                (r, format!("k{i}"))
            })
            .chain([
                (range("0.0.0.0", "10.255.255.255"), "c0".to_string()),
                (range("11.3.232.0", "255.255.255.255"), "c0".to_string()),
            ])
            .collect();
        table.sets[3].elements = SetElements::JumpMap(classes);
        table.sets[2].elements = SetElements::CountedMarks(
            (1..=1000u16)
                .map(|id| (mark(1, id), format!("acl {id}")))
                .collect(),
        );
        for i in 0..1000u16 {
            let stack = format!("stack-{i}");
            table.chains.push(chain(
                &format!("k{i}"),
                vec![
                    class_rule(
                        Some(TCP),
                        Some((80, 80)),
                        Some(mark(1, i + 1)),
                        &format!("acl {} {stack}", i + 1),
                    ),
                    class_rule(
                        Some(UDP),
                        Some((1000, 2000)),
                        None,
                        &format!("acl 1001 {stack}"),
                    ),
                    class_rule(None, None, None, &format!("acl default {stack}")),
                ],
            ));
        }
        let rules: usize = table.chains.iter().map(|c| c.rules.len()).sum();
        for round in 0..2 {
            let started = Instant::now();
            nft.replace_table(&table).unwrap();
            println!(
                "round {round}: {} chains, {rules} rules, 1,002 map ranges, 1,000 marks replaced in {:?}",
                table.chains.len(),
                started.elapsed()
            );
        }
        let started = Instant::now();
        let readings = nft.rule_counters().unwrap();
        println!(
            "{} rule counters read in {:?}",
            readings.len(),
            started.elapsed()
        );
        assert_eq!(readings.len(), rules);
        assert_eq!(
            readings
                .iter()
                .filter(|r| r.comment == "acl default stack-999")
                .count(),
            1
        );
        let started = Instant::now();
        let marks = nft.mark_counters("admitted").unwrap();
        println!(
            "{} mark counters read in {:?}",
            marks.len(),
            started.elapsed()
        );
        assert_eq!(marks.len(), 1000);
        assert_eq!(marks[999].comment.as_deref(), Some("acl 1000"));
        if let Some(text) = listing() {
            assert!(text.contains("11.3.231.0/24 : jump k999"), "the last class");
        }
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

/// Receives until `want` datagrams from `from` arrived or `wait` passed without one;
/// returns how many did.
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

/// One side's namespace: addresses on its eth0, a route through the router.
async fn side(addrs: &[(Ipv4Addr, u8)], via: Ipv4Addr, dst: &str) -> Mac {
    let k = Kernel::connect().await.unwrap();
    let eth0 = k.link_by_name("eth0").await.unwrap().unwrap();
    for (a, len) in addrs {
        k.replace_address(eth0.index, *a, *len).await.unwrap();
    }
    k.set_up(eth0.index).await.unwrap();
    k.replace_route(&Route {
        table: 254,
        dst: dst.parse().unwrap(),
        gateway: Some(via),
        oif: Some(eth0.index),
        onlink: false,
        protocol: 4,
        nexthop: None,
    })
    .await
    .unwrap();
    eth0.mac.expect("eth0 has a MAC")
}

fn udp(at: Ipv4Addr, port: u16) -> (UdpSocket, SocketAddrV4) {
    let a = SocketAddrV4::new(at, port);
    (UdpSocket::bind(a).unwrap(), a)
}

/// A router-like namespace (this thread's) forwards between its stack (S: 10.1.0.5
/// and a stray 10.9.0.1) and the overlay (O: remote stack b's 10.2.0.7 and 10.3.0.7,
/// whose origin MAC is not O's). Under the contract's table, datagrams in known counts
/// and sizes: admitted ones pass and count once in their class rule, then in their
/// mark's element; denied ones drop and count in their rule; spoofed ones drop and
/// count in the spoof rules. After a replace with the next generation, the open
/// connection is classified again. Every count is exact.
#[test]
fn counters_count_forwarded_traffic_exactly() {
    in_new_netns("counters_count_forwarded_traffic_exactly", || async {
        let k = Kernel::connect().await.unwrap();
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable forwarding");
        let stack_ns = spare_netns();
        let overlay_ns = spare_netns();
        let stk = k
            .create_veth_into("stk0", 1500, stack_ns.as_fd(), "eth0")
            .await
            .unwrap();
        let ovl = k
            .create_veth_into(OVL, 1500, overlay_ns.as_fd(), "eth0")
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
        let stray = Ipv4Addr::new(10, 9, 0, 1);
        let b = Ipv4Addr::new(10, 2, 0, 7);
        let b_spoofed = Ipv4Addr::new(10, 3, 0, 7);
        in_netns(&stack_ns, || async {
            side(
                &[(service, 24), (stray, 32)],
                Ipv4Addr::new(10, 1, 0, 254),
                "0.0.0.0/0",
            )
            .await
        });
        let overlay_mac = in_netns(&overlay_ns, || async {
            side(
                &[(Ipv4Addr::new(10, 255, 0, 2), 24), (b, 32), (b_spoofed, 32)],
                Ipv4Addr::new(10, 255, 0, 1),
                "10.1.0.0/24",
            )
            .await
        });
        // Sockets live on in the namespace they were made in.
        let in_stack = |at, port| in_netns(&stack_ns, || async move { udp(at, port) });
        let in_overlay = |at, port| in_netns(&overlay_ns, || async move { udp(at, port) });
        let (svc5000, svc5000_at) = in_stack(service, 5000);
        let (svc5001, svc5001_at) = in_stack(service, 5001);
        let (svc6000, svc6000_at) = in_stack(service, 6000);
        let (from_stray, _) = in_stack(stray, 7000);
        let (from_service, from_service_at) = in_stack(service, 7000);
        let (b1, b1_at) = in_overlay(b, 7001);
        let (b2, b2_at) = in_overlay(b, 7002);
        let (b3, b3_at) = in_overlay(b, 7003);
        let (spoofed, spoofed_at) = in_overlay(b_spoofed, 7004);
        let (b_in, b_in_at) = in_overlay(b, 7000);

        // Warm up the paths (neighbour resolution) before any table, from ports the
        // counted flows do not use (no conntrack entry yet: nothing hooks it).
        let (warm, warm_at) = in_overlay(b, 7999);
        let (warm_back, warm_back_at) = in_stack(service, 7999);
        send_burst(&warm, warm_back_at, 1, 100);
        assert_eq!(receive(&warm_back, warm_at, 1, Duration::from_secs(5)), 1);
        send_burst(&warm_back, warm_at, 1, 100);
        assert_eq!(receive(&warm, warm_back_at, 1, Duration::from_secs(5)), 1);

        let nft = Nft::connect(TABLE, "forward").unwrap();
        nft.replace_table(&acl_table(1, overlay_mac)).unwrap();
        let short = Duration::from_millis(300);
        let long = Duration::from_secs(5);
        // b → udp/5000: rule 3 allows (7 × 200).
        send_burst(&b1, svc5000_at, 7, 200);
        assert_eq!(receive(&svc5000, b1_at, 7, long), 7);
        // b → udp/5001: rule 4 denies (3 × 300).
        send_burst(&b2, svc5001_at, 3, 300);
        // b → udp/6000: b's default denies (4 × 100).
        send_burst(&b3, svc6000_at, 4, 100);
        // 10.3.0.7 is b's only from another MAC: spoofed (5 × 120).
        send_burst(&spoofed, svc5000_at, 5, 120);
        // The stack from an address not its own: spoofed (2 × 150).
        send_burst(&from_stray, b_in_at, 2, 150);
        // The stack's own outgoing connection passes uncounted (6 × 90).
        send_burst(&from_service, b_in_at, 6, 90);
        assert_eq!(receive(&b_in, from_service_at, 6, long), 6);
        assert_eq!(receive(&svc5001, b2_at, 1, short), 0, "denied");
        assert_eq!(receive(&svc6000, b3_at, 1, short), 0, "denied by default");
        assert_eq!(receive(&svc5000, spoofed_at, 1, short), 0, "spoofed");
        assert_eq!(
            receive(&b_in, SocketAddrV4::new(stray, 7000), 1, short),
            0,
            "spoofed"
        );

        let counts = |nft: &Nft| {
            let mut v: Vec<(String, u64, u64)> = nft
                .rule_counters()
                .unwrap()
                .into_iter()
                .filter(|r| r.packets > 0)
                .map(|r| (r.comment, r.packets, r.bytes))
                .collect();
            v.sort();
            v
        };
        let marks = |nft: &Nft| {
            nft.mark_counters("admitted")
                .unwrap()
                .into_iter()
                .map(|r| (r.key, r.packets, r.bytes))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            counts(&nft),
            vec![
                ("acl 3 b".into(), 1, 200),
                ("acl 4 b".into(), 3, 900),
                ("acl default b".into(), 4, 400),
                ("acl spoof-from-overlay".into(), 5, 600),
                ("acl spoof-from-stack".into(), 2, 300),
            ]
        );
        assert_eq!(marks(&nft), vec![(mark(1, 1), 0, 0), (mark(1, 3), 6, 1200)]);

        // Generation 2: the open connection of b1 carries mark 1/3, no longer
        // admitted: its next packet is classified again and marked 2/3, the one after
        // is admitted.
        nft.replace_table(&acl_table(2, overlay_mac)).unwrap();
        assert_eq!(counts(&nft), vec![], "a new table counts from zero");
        send_burst(&b1, svc5000_at, 2, 250);
        assert_eq!(receive(&svc5000, b1_at, 2, long), 2);
        assert_eq!(counts(&nft), vec![("acl 3 b".into(), 1, 250)]);
        assert_eq!(marks(&nft), vec![(mark(2, 1), 0, 0), (mark(2, 3), 1, 250)]);

        // A table that denies b's udp/5000 drops the open connection's next packets.
        let mut deny = acl_table(3, overlay_mac);
        deny.chains[1].rules.remove(0);
        nft.replace_table(&deny).unwrap();
        send_burst(&b1, svc5000_at, 3, 100);
        assert_eq!(receive(&svc5000, b1_at, 1, short), 0, "denied now");
        assert_eq!(counts(&nft), vec![("acl default b".into(), 3, 300)]);
        nft.delete_table().unwrap();
    });
}
