use super::*;
use crate::acl::compile::tests::{ctx, ip, mac_of, policy, route, walk, Packet, TCP, UDP};
use crate::acl::compile::MAX_RULES;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;
use vrouter_kernel::{RuleVerdict, SetElements};

/// A kernel that holds one table, refuses what the kernel would refuse (references
/// to missing chains or sets) or what the test says, and counts the packets a test
/// sends through the table (walked as the kernel would, see compile's tests).
type Refusal = Box<dyn Fn(&TableSpec) -> bool>;

#[derive(Default)]
struct Fake {
    table: Option<TableSpec>,
    replaced: usize,
    refuse: Option<Refusal>,
    /// (chain, comment) -> (packets, bytes) of the table in place.
    rules: BTreeMap<(String, String), (u64, u64)>,
    marks: BTreeMap<u32, (u64, u64)>,
    /// Marks of a table from before the router started.
    marks_before: Vec<u32>,
}

#[derive(Clone, Default)]
struct FakeKernel(Rc<RefCell<Fake>>);

impl AclKernel for FakeKernel {
    fn replace_table(&self, table: &TableSpec) -> Result<(), String> {
        let mut f = self.0.borrow_mut();
        if f.refuse.as_ref().is_some_and(|r| r(table)) {
            return Err("No such file or directory (os error 2)".into());
        }
        let chains: BTreeSet<&str> = table.chains.iter().map(|c| c.name.as_str()).collect();
        let sets: BTreeSet<&str> = table.sets.iter().map(|s| s.name.as_str()).collect();
        for s in &table.sets {
            if let SetElements::JumpMap(v) = &s.elements {
                if let Some((_, c)) = v.iter().find(|(_, c)| !chains.contains(c.as_str())) {
                    return Err(format!("jump to missing chain {c}: ENOENT"));
                }
            }
        }
        for c in &table.chains {
            for r in &c.rules {
                if let RuleVerdict::VmapCtOriginalSaddr(m) = &r.verdict {
                    if !sets.contains(m.as_str()) {
                        return Err(format!("missing map {m}: ENOENT"));
                    }
                }
            }
        }
        f.table = Some(table.clone());
        f.replaced += 1;
        f.rules.clear();
        f.marks.clear();
        f.marks_before.clear();
        Ok(())
    }

    fn rule_counters(&self) -> Result<Vec<RuleCounterReading>, String> {
        let f = self.0.borrow();
        let Some(t) = &f.table else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for c in &t.chains {
            for r in &c.rules {
                let key = (c.name.clone(), r.comment.clone());
                let (packets, bytes) = match f.rules.get(&key) {
                    // Rules that share a comment share the count: give it to the first.
                    Some(&n)
                        if !out.iter().any(|o: &RuleCounterReading| {
                            o.chain == c.name && o.comment == r.comment
                        }) =>
                    {
                        n
                    }
                    _ => (0, 0),
                };
                out.push(RuleCounterReading {
                    chain: c.name.clone(),
                    handle: out.len() as u64 + 1,
                    comment: r.comment.clone(),
                    packets,
                    bytes,
                });
            }
        }
        Ok(out)
    }

    fn mark_counters(&self, set: &str) -> Result<Vec<MarkCounterReading>, String> {
        let f = self.0.borrow();
        if let Some(t) = &f.table {
            let Some(SetElements::CountedMarks(v)) =
                t.sets.iter().find(|s| s.name == set).map(|s| &s.elements)
            else {
                return Ok(Vec::new());
            };
            return Ok(v
                .iter()
                .map(|(key, comment)| {
                    let (packets, bytes) = f.marks.get(key).copied().unwrap_or_default();
                    MarkCounterReading {
                        key: *key,
                        comment: Some(comment.clone()),
                        packets,
                        bytes,
                    }
                })
                .collect());
        }
        Ok(f.marks_before
            .iter()
            .map(|&key| MarkCounterReading {
                key,
                comment: None,
                packets: 0,
                bytes: 0,
            })
            .collect())
    }
}

impl FakeKernel {
    /// Sends one packet of `len` bytes through the table; returns the outcome and
    /// the connection's ct mark after it.
    fn send(&self, p: &Packet, len: u64) -> (bool, u32) {
        let mut f = self.0.borrow_mut();
        let t = f.table.clone().expect("a table");
        let o = walk(&t, p);
        if let (Some(chain), Some(by)) = (&o.chain, &o.by) {
            if by == "acl admitted" {
                let e = f.marks.entry(p.ct_mark).or_default();
                *e = (e.0 + 1, e.1 + len);
            } else {
                let counted = t
                    .chains
                    .iter()
                    .find(|c| c.name == *chain)
                    .and_then(|c| c.rules.iter().find(|r| r.comment == *by))
                    .is_some_and(|r| r.counter);
                if counted {
                    let e = f.rules.entry((chain.clone(), by.clone())).or_default();
                    *e = (e.0 + 1, e.1 + len);
                }
            }
        }
        (o.accept, o.ct_mark)
    }

    fn table(&self) -> TableSpec {
        self.0.borrow().table.clone().expect("a table")
    }

    fn replaced(&self) -> usize {
        self.0.borrow().replaced
    }

    fn refuse(&self, r: impl Fn(&TableSpec) -> bool + 'static) {
        self.0.borrow_mut().refuse = Some(Box::new(r));
    }

    fn accept_all(&self) {
        self.0.borrow_mut().refuse = None;
    }
}

fn routes() -> Vec<vrouter_state::RemoteRoute> {
    vec![
        route("web", "10.1.0.0/24", 1),
        route("ops", "10.2.0.0/24", 2),
    ]
}

fn start(k: &FakeKernel, p: Policy) -> Acl<FakeKernel> {
    Acl::with_kernel(k.clone(), p, ctx(routes()), None).unwrap()
}

fn count(packets: u64, bytes: u64) -> Count {
    Count { packets, bytes }
}

#[test]
fn start_installs_the_policy_and_reloads_take_the_next_generation() {
    let k = FakeKernel::default();
    let acl = start(&k, policy("deny", "web:tcp/443", None));
    let mut acl = acl;
    assert_eq!(acl.state(), &AclState::Installed);
    let g = acl.generation();
    let want = compile(&acl.resolved().clone(), &ctx(routes()), g).unwrap();
    assert_eq!(k.table(), want.table);
    assert_eq!(acl.table(), Some(&want.table));

    acl.reload(policy("deny", "web:tcp/443, ops", None))
        .unwrap();
    assert_eq!(acl.generation(), g.wrapping_add(1));
    assert_eq!(k.replaced(), 2);
    let (ok, _) = k.send(
        &Packet::new_from_overlay(ip("10.2.0.5"), mac_of(2), UDP, Some(53)),
        100,
    );
    assert!(ok, "ops is allowed now");
    // The same policy again: nothing to do.
    acl.reload(policy("deny", "web:tcp/443, ops", None))
        .unwrap();
    assert_eq!(k.replaced(), 2);
}

#[test]
fn a_refused_reload_keeps_the_old_policy() {
    let k = FakeKernel::default();
    let mut acl = start(&k, policy("deny", "web:tcp/443", None));
    let (g, table) = (acl.generation(), k.table());
    k.refuse(|_| true);
    let err = acl.reload(policy("deny", "ops", None)).unwrap_err();
    assert!(err.contains("refused"), "{err}");
    assert_eq!((acl.generation(), acl.state()), (g, &AclState::Installed));
    assert_eq!(acl.policy(), &policy("deny", "web:tcp/443", None));
    assert_eq!(k.table(), table);
    // Refused by the compiler: the same.
    k.accept_all();
    let mut huge = Policy::default();
    for i in 0..=MAX_RULES {
        let mut r = crate::acl::parse_rule("10.5.0.0/16:tcp/80", Verdict::Allow, None).unwrap();
        r.name = format!("r{i}");
        huge.rules.push(r);
    }
    let err = acl.reload(huge).unwrap_err();
    assert!(err.contains("65535 rules"), "{err}");
    assert_eq!(k.table(), table);
    assert_eq!(k.replaced(), 1);
}

#[test]
fn start_closes_when_the_policy_cannot_go_in_and_reload_opens_again() {
    let k = FakeKernel::default();
    // The kernel refuses any table with class chains: only the closed one goes in.
    k.refuse(|t| t.chains.len() > 1);
    let mut acl = start(&k, policy("deny", "web:tcp/443", None));
    let AclState::Closed { reason } = acl.state().clone() else {
        panic!("{:?}", acl.state())
    };
    assert!(reason.contains("refused"), "{reason}");
    assert_eq!(k.table(), closed(&ctx(routes())));
    let syn = Packet::new_from_overlay(ip("10.1.0.5"), mac_of(1), TCP, Some(443));
    assert!(!k.send(&syn, 60).0, "closed");
    // A context change while closed and still refused: the closed table follows it.
    let mut more = routes();
    more.push(route("db", "10.3.0.0/24", 3));
    let c = AclContext {
        remote: more.clone(),
        ..ctx(routes())
    };
    acl.set_context(c.clone()).unwrap();
    assert!(matches!(acl.state(), AclState::Closed { .. }));
    assert_eq!(k.table(), closed(&c));
    // The kernel takes it again: a reload installs the policy.
    k.accept_all();
    acl.reload(policy("deny", "web:tcp/443", None)).unwrap();
    assert_eq!(acl.state(), &AclState::Installed);
    assert!(k.send(&syn, 60).0);
    let counters = acl.read().unwrap();
    assert_eq!(counters.rules[&Counted::Closed].dropped, count(1, 60));
}

#[test]
fn start_fails_when_even_the_closed_table_is_refused() {
    let k = FakeKernel::default();
    k.refuse(|_| true);
    let err =
        Acl::with_kernel(k.clone(), policy("deny", "web", None), ctx(routes()), None).unwrap_err();
    assert!(err.contains("closed table was refused too"), "{err}");
}

#[test]
fn a_context_change_replaces_only_a_table_that_differs() {
    let k = FakeKernel::default();
    let mut acl = start(&k, policy("deny", "web:tcp/443", None));
    let g = acl.generation();
    // Another gateway for web: the table is the same.
    let mut moved_gateway = routes();
    moved_gateway[0].via = ip("10.250.0.77");
    acl.set_context(AclContext {
        remote: moved_gateway,
        ..ctx(routes())
    })
    .unwrap();
    assert_eq!((k.replaced(), acl.generation()), (1, g));
    // web gains a prefix: replaced, next generation, and its rights follow.
    let mut grown = routes();
    grown.push(route("web", "10.7.0.0/24", 1));
    let syn = Packet::new_from_overlay(ip("10.7.0.5"), mac_of(1), TCP, Some(443));
    assert!(!k.send(&syn, 60).0);
    acl.set_context(AclContext {
        remote: grown,
        ..ctx(routes())
    })
    .unwrap();
    assert_eq!((k.replaced(), acl.generation()), (2, g.wrapping_add(1)));
    assert!(k.send(&syn, 60).0);
}

#[test]
fn a_context_change_rechecks_open_connections() {
    let k = FakeKernel::default();
    let mut acl = start(&k, policy("deny", "web", None));
    let syn = Packet::new_from_overlay(ip("10.1.0.5"), mac_of(1), UDP, Some(53));
    let (ok, m) = k.send(&syn, 60);
    assert!(ok);
    assert!(k.send(&syn.again(m), 60).0);
    // web leaves; ops takes its prefix: the open flow from 10.1.0.5 stops both ways.
    let taken = vec![route("ops", "10.1.0.0/24", 2)];
    acl.set_context(AclContext {
        remote: taken,
        ..ctx(routes())
    })
    .unwrap();
    let mut again = syn.again(m);
    again.src_mac = mac_of(2);
    assert!(!k.send(&again, 60).0);
    assert!(!k.send(&syn.reply(m), 60).0);
}

#[test]
fn counters_add_up_across_replacements() {
    let k = FakeKernel::default();
    let file = r#"
        [[rule]]
        name = "https"
        allow = "web:tcp/443"
        [[rule]]
        name = "no ops"
        deny = "ops"
    "#;
    let mut acl = start(&k, policy("deny", "", Some(file)));
    let web = Packet::new_from_overlay(ip("10.1.0.5"), mac_of(1), TCP, Some(443));
    // A connection: its first packet and three more, one of them a reply.
    let (ok, m) = k.send(&web, 60);
    assert!(ok);
    for p in [web.again(m), web.reply(m), web.again(m)] {
        assert!(k.send(&p, 100).0);
    }
    // ops: dropped by "no ops" from ops; web on 80: by the default, from web.
    let ops = Packet::new_from_overlay(ip("10.2.0.5"), mac_of(2), TCP, Some(22));
    for _ in 0..2 {
        assert!(!k.send(&ops, 60).0);
    }
    let web80 = Packet::new_from_overlay(ip("10.1.0.5"), mac_of(1), TCP, Some(80));
    assert!(!k.send(&web80, 60).0);
    // A forgery.
    let forged = Packet::new_from_overlay(ip("10.1.0.5"), mac_of(2), TCP, Some(443));
    assert!(!k.send(&forged, 40).0);

    let first = acl.read().unwrap();
    let https = Counted::Rule("https".into());
    let no_ops = Counted::Rule("no ops".into());
    assert_eq!(first.rules[&https].accepted, count(4, 360));
    assert_eq!(first.rules[&https].dropped, count(0, 0));
    assert_eq!(first.rules[&no_ops].dropped, count(2, 120));
    assert_eq!(first.rules[&Counted::Default].dropped, count(1, 60));
    assert_eq!(
        first.rules[&Counted::SpoofFromOverlay].dropped,
        count(1, 40)
    );
    let from =
        |c: &Counted, s: &str| first.dropped_from[&(c.clone(), Some(StackName::new(s).unwrap()))];
    assert_eq!(from(&no_ops, "ops"), count(2, 120));
    assert_eq!(from(&Counted::Default, "web"), count(1, 60));
    assert_eq!(first.dropped_from.len(), 2);

    // A reload: the totals go on from there, the open connection is checked again
    // (counted once more as a first packet) and keeps counting.
    acl.reload(policy(
        "deny",
        "",
        Some(&format!("{file}\n[[rule]]\nallow = \"ops:udp\"\n")),
    ))
    .unwrap();
    let (ok, m2) = k.send(&web.again(m), 100);
    assert!(ok);
    assert_ne!(m2, m);
    assert!(k.send(&web.reply(m2), 100).0);
    let second = acl.read().unwrap();
    assert_eq!(second.rules[&https].accepted, count(6, 560));
    assert_eq!(second.rules[&no_ops].dropped, count(2, 120));
    assert_eq!(
        second.rules[&Counted::Rule("allow ops:udp".into())].accepted,
        count(0, 0)
    );
    // A rule gone from the policy keeps its totals.
    acl.reload(policy("deny", "ops:udp", None)).unwrap();
    let third = acl.read().unwrap();
    assert_eq!(third.rules[&https].accepted, count(6, 560));
    assert_eq!(third.rules[&no_ops].dropped, count(2, 120));
}

#[test]
fn the_test_hook_makes_the_kernel_refuse_the_policy() {
    let dir = std::env::temp_dir().join(format!("vc-acl-refuse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("refuse");
    std::fs::write(&file, "").unwrap();
    let k = FakeKernel::default();
    let mut acl = Acl::with_kernel(
        k.clone(),
        policy("deny", "web", None),
        ctx(routes()),
        Some(file.clone()),
    )
    .unwrap();
    let closed_now =
        matches!(acl.state(), AclState::Closed { reason } if reason.contains("missing chain"));
    assert!(closed_now, "{:?}", acl.state());
    assert_eq!(k.table(), closed(&ctx(routes())));
    std::fs::remove_file(&file).unwrap();
    acl.set_context(ctx(routes())).unwrap();
    assert_eq!(acl.state(), &AclState::Installed);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_first_generation_follows_the_table_already_there() {
    let k = FakeKernel::default();
    k.0.borrow_mut().marks_before = vec![7 << 16 | 1, 7 << 16 | 0xffff];
    let acl = start(&k, policy("allow", "", None));
    assert_eq!(acl.generation(), 8);
    let SetElements::CountedMarks(marks) = &k.table().sets[2].elements else {
        panic!()
    };
    assert_eq!(marks, &vec![(8 << 16 | 0xffff, "acl default".to_string())]);
}

#[test]
fn labels_never_meet_rule_names() {
    for c in [
        Counted::Default,
        Counted::SpoofFromStack,
        Counted::SpoofFromOverlay,
        Counted::TcpNotSyn,
        Counted::Closed,
        Counted::Fallback,
    ] {
        let label = c.label();
        let named = crate::acl::parse_rule("web", Verdict::Allow, Some(&label));
        assert!(named.is_err(), "{label} is usable as a rule name");
    }
    assert_eq!(Counted::Rule("https".into()).label(), "https");
}
