//! Root tests of whole nftables rulesets (`Nft::replace_table`, `rule_counters`,
//! `mark_counters`) against the real kernel: the ACL table of issue 14 in throwaway
//! network namespaces (as in nft_root.rs). Without root they print a skip line, except
//! under CI=true, where they fail.

use nix::sched::{unshare, CloneFlags};
use std::future::Future;
use std::process::Command;
use std::time::Duration;
use vrouter_kernel::nft::{
    AddrField, BaseHook, ChainSpec, Ipv4Range, MarkCounterReading, Match, RuleSpec, RuleVerdict,
    SetElements, SetSpec, TableSpec,
};
use vrouter_kernel::Nft;
use vrouter_state::Mac;

const TIMEOUT: Duration = Duration::from_secs(60);
const TABLE: &str = "vrouter_acl";
const OVL: &str = "ovl0";
const TCP: u8 = 6;
const UDP: u8 = 17;

fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("root test skipped under CI: {test} needs root for network namespaces");
    }
    eprintln!("skipping {test}: needs root for network namespaces");
    false
}

/// Runs `body` on a new thread with a current-thread runtime, after `enter` has put
/// that thread in the namespace to use.
fn on_thread<F, Fut, T>(enter: impl FnOnce() + Send, body: F) -> T
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = T>,
    T: Send,
{
    std::thread::scope(|scope| {
        let thread = scope.spawn(move || {
            enter();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(async {
                tokio::time::timeout(TIMEOUT, body())
                    .await
                    .expect("test timed out")
            })
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Runs `body` in a new network namespace of its own, gone when the thread ends.
fn in_new_netns<F, Fut>(test: &str, body: F)
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = ()>,
{
    if root_or_skip(test) {
        on_thread(
            || unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)"),
            body,
        );
    }
}

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
        set_ct_mark: None,
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
                RuleVerdict::VmapCtOriginalSaddr("classes".into()),
                "",
            ),
            rule(vec![], RuleVerdict::Drop, "acl fallback"),
        ]);
    }
    ChainSpec {
        name: "forward".into(),
        hook: Some(BaseHook {
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
        set_ct_mark: mark,
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
