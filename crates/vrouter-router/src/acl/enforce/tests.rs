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
                if let RuleVerdict::Vmap { map: m, .. } = &r.verdict {
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
            // As the kernel: no such set, no dump.
            let Some(SetElements::CountedMarks(v)) =
                t.sets.iter().find(|s| s.name == set).map(|s| &s.elements)
            else {
                return Err(format!(
                    "no set {set}: No such file or directory (os error 2)"
                ));
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

/// The default policy's table has no conntrack and no marks: the router says so
/// (for its registration), counts what enters the stack as the default's, and a
/// reload to another policy and back flips both.
#[test]
fn the_default_policy_installs_the_stateless_table_and_counts_what_enters() {
    let k = FakeKernel::default();
    let mut acl = start(&k, Policy::default());
    assert_eq!(acl.state(), &AclState::Installed);
    assert_eq!(k.table(), crate::acl::compile::stateless(&ctx(routes())));
    assert!(!acl.tracks_connections());
    // The second half of a connection (no conntrack entry) and a new one: in.
    let web = Packet::new_from_overlay(ip("10.1.0.5"), mac_of(1), TCP, Some(443));
    assert!(k.send(&web.again(0).untracked(), 100).0);
    assert!(k.send(&web.untracked(), 60).0);
    let forged = Packet::new_from_overlay(ip("10.1.0.5"), mac_of(2), TCP, Some(443));
    assert!(!k.send(&forged.untracked(), 40).0);
    let first = acl.read().unwrap();
    assert_eq!(first.rules[&Counted::Default].accepted, count(2, 160));
    assert_eq!(
        first.rules[&Counted::SpoofFromOverlay].dropped,
        count(1, 40)
    );
    // A context change keeps it stateless.
    let mut more = routes();
    more.push(route("db", "10.3.0.0/24", 3));
    acl.set_context(AclContext {
        remote: more.clone(),
        ..ctx(routes())
    })
    .unwrap();
    assert!(!acl.tracks_connections());
    // Restricting: stateful; its counts go on from the stateless table's.
    acl.reload(policy("deny", "web", None)).unwrap();
    assert!(acl.tracks_connections());
    let (ok, m) = k.send(&web, 60);
    assert!(ok);
    assert!(k.send(&web.reply(m), 100).0);
    let second = acl.read().unwrap();
    assert_eq!(second.rules[&Counted::Default].accepted, count(2, 160));
    assert_eq!(
        second.rules[&Counted::Rule("allow web".into())].accepted,
        count(2, 160)
    );
    // And back.
    acl.reload(Policy::default()).unwrap();
    assert!(!acl.tracks_connections());
    assert!(acl.read().is_ok());
    // Closed is stateful, whatever the policy.
    k.refuse(|t| !crate::acl::compile::tracks_connections(t));
    acl.set_context(ctx(routes())).unwrap();
    assert!(matches!(acl.state(), AclState::Closed { .. }));
    assert!(acl.tracks_connections());
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
    let acl = start(&k, policy("allow", "gone", None));
    assert_eq!(acl.generation(), 8);
    let SetElements::CountedMarks(marks) = &k.table().sets[2].elements else {
        panic!()
    };
    assert_eq!(
        marks,
        &vec![
            (8 << 16 | 1, "acl 1".to_string()),
            (8 << 16 | 0xffff, "acl default".to_string())
        ]
    );
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

/// Against the kernel, in throwaway network namespaces (anonymous: nothing named is
/// left behind, even on failure). Without root they print a skip line, except under
/// CI=true, where they fail.
mod root {
    use super::*;
    use nix::sched::{setns, unshare, CloneFlags};
    use std::future::Future;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
    use std::os::fd::{AsFd, OwnedFd};
    use std::time::Duration;
    use vrouter_kernel::{Kernel, Nft, Route};
    use vrouter_state::{Mac, Prefix, RemoteRoute};

    fn root_or_skip(test: &str) -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "root test skipped under CI: {test} needs root for network namespaces"
        );
        eprintln!("skipping {test}: needs root for network namespaces");
        false
    }

    /// `body` on a new thread, after `enter` put it in its namespace; a current-thread
    /// runtime for the async kernel calls, bounded by 60 s.
    fn on_thread<F, Fut, T>(enter: impl FnOnce() + Send, body: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    enter();
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("tokio runtime")
                        .block_on(async {
                            tokio::time::timeout(Duration::from_secs(60), body())
                                .await
                                .expect("test timed out")
                        })
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

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

    fn in_netns<F, Fut, T>(netns: &OwnedFd, body: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        on_thread(
            || setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns"),
            body,
        )
    }

    /// A namespace of its own, held by its fd (gone with the last reference).
    fn spare_netns() -> OwnedFd {
        std::thread::spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
            OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net").expect("ns/net"))
        })
        .join()
        .expect("namespace thread")
    }

    /// (chain, comment) of every rule, sorted.
    fn listed(nft: &Nft) -> Vec<(String, String)> {
        let mut v: Vec<_> = nft
            .rule_counters()
            .unwrap()
            .into_iter()
            .map(|r| (r.chain, r.comment))
            .collect();
        v.sort();
        v
    }

    fn specified(t: &TableSpec) -> Vec<(String, String)> {
        let mut v: Vec<_> = t
            .chains
            .iter()
            .flat_map(|c| c.rules.iter().map(|r| (c.name.clone(), r.comment.clone())))
            .collect();
        v.sort();
        v
    }

    fn admitted(t: &TableSpec) -> Vec<u32> {
        t.sets
            .iter()
            .find_map(|s| match &s.elements {
                SetElements::CountedMarks(m) if s.name == SET_ADMITTED => {
                    Some(m.iter().map(|(k, _)| *k).collect())
                }
                _ => None,
            })
            .unwrap()
    }

    fn marks_in_kernel(nft: &Nft) -> Vec<u32> {
        let mut v: Vec<u32> = nft
            .mark_counters(SET_ADMITTED)
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        v.sort();
        v
    }

    /// Start, read back, reload, refuse (the test hook), reopen, and fail when even
    /// the closed table cannot go in (no CAP_NET_ADMIN).
    #[test]
    fn root_the_policy_goes_in_reloads_and_closes() {
        in_new_netns("root_the_policy_goes_in_reloads_and_closes", || async {
            let c = ctx(routes());
            let nft = Nft::connect(TABLE, CHAIN).unwrap();
            let mut acl =
                Acl::start(policy("deny", "web:tcp/443, ops:udp/53", None), c.clone()).unwrap();
            assert_eq!(acl.state(), &AclState::Installed);
            let table = acl.table().unwrap().clone();
            assert_eq!(listed(&nft), specified(&table));
            assert_eq!(marks_in_kernel(&nft), admitted(&table));
            let counters = acl.read().unwrap();
            // Both rules, the default and the base chain's counted rules, at zero.
            let keys: Vec<Counted> = counters.rules.keys().cloned().collect();
            assert_eq!(
                keys,
                vec![
                    Counted::Rule("allow ops:udp/53".into()),
                    Counted::Rule("allow web:tcp/443".into()),
                    Counted::Default,
                    Counted::SpoofFromStack,
                    Counted::SpoofFromOverlay,
                    Counted::TcpNotSyn,
                    Counted::Fallback,
                ]
            );
            assert!(counters.rules.values().all(|c| *c == RuleCount::default()));

            let g = acl.generation();
            acl.reload(policy("allow", "web:tcp/443", None)).unwrap();
            assert_eq!(acl.generation(), g.wrapping_add(1));
            let table = acl.table().unwrap().clone();
            assert_eq!(listed(&nft), specified(&table));
            assert_eq!(
                marks_in_kernel(&nft),
                vec![
                    crate::acl::compile::mark(g.wrapping_add(1), 1),
                    crate::acl::compile::mark(g.wrapping_add(1), DEFAULT_ID)
                ]
            );

            // A second router start in the same namespace follows the generation.
            drop(acl);
            let refuse = std::env::temp_dir().join(format!("vc-acl-root-{}", std::process::id()));
            std::fs::write(&refuse, "").unwrap();
            let mut acl = Acl::with_kernel(
                Nft::connect(TABLE, CHAIN).unwrap(),
                policy("deny", "web", None),
                c.clone(),
                Some(refuse.clone()),
            )
            .unwrap();
            std::fs::remove_file(&refuse).unwrap();
            let AclState::Closed { reason } = acl.state().clone() else {
                panic!("{:?}", acl.state())
            };
            assert!(reason.contains("refused"), "{reason}");
            assert_eq!(listed(&nft), specified(&closed(&c)));
            assert!(listed(&nft).iter().any(|(_, c)| c == COMMENT_CLOSED));
            // The kernel takes it again.
            acl.reload(policy("deny", "web", None)).unwrap();
            assert_eq!(acl.state(), &AclState::Installed);
            // The restart took g+2 (after g+1 in the namespace's table) for the refused
            // table; the reload takes the next.
            assert_eq!(acl.generation(), g.wrapping_add(3));
            assert_eq!(listed(&nft), specified(acl.table().unwrap()));

            // Without CAP_NET_ADMIN not even the closed table goes in.
            use caps::{CapSet, Capability};
            caps::drop(None, CapSet::Effective, Capability::CAP_NET_ADMIN).unwrap();
            let err = Acl::start(policy("deny", "web", None), c.clone()).unwrap_err();
            caps::raise(None, CapSet::Effective, Capability::CAP_NET_ADMIN).unwrap();
            assert!(err.contains("closed table was refused too"), "{err}");
            nft.delete_table().unwrap();
        });
    }

    /// The router's namespace (this thread's) between a stack (S, 172.16.0.10 behind
    /// eth0-like `stk0`) and the overlay (O, web's 10.1.0.5 behind `ovl0`). Default
    /// deny, web allowed on tcp/8080: a connection to 8080 opens, one to 8081 does
    /// not; a reload that denies web cuts the open one both ways; counters count.
    #[test]
    fn root_denied_tcp_fails_and_allowed_tcp_passes() {
        in_new_netns("root_denied_tcp_fails_and_allowed_tcp_passes", || async {
            let k = Kernel::connect().await.unwrap();
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("forwarding");
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
            k.replace_address(stk, Ipv4Addr::new(172, 16, 0, 1), 24)
                .await
                .unwrap();
            k.replace_address(ovl, Ipv4Addr::new(10, 1, 0, 1), 24)
                .await
                .unwrap();
            k.set_up(stk).await.unwrap();
            k.set_up(ovl).await.unwrap();
            let server = Ipv4Addr::new(172, 16, 0, 10);
            let client = Ipv4Addr::new(10, 1, 0, 5);
            in_netns(&stack_ns, || side(server, Ipv4Addr::new(172, 16, 0, 1)));
            let web_mac = in_netns(&overlay_ns, || side(client, Ipv4Addr::new(10, 1, 0, 1)));
            let c = AclContext {
                local: vec!["172.16.0.0/24".parse().unwrap()],
                overlay_ifname: "ovl0".into(),
                remote: vec![RemoteRoute {
                    prefix: Prefix::containing(client, 24),
                    stack: StackName::new("web").unwrap(),
                    via: client,
                    mac: web_mac,
                    host: Ipv4Addr::new(192, 168, 0, 2),
                    same_host: false,
                }],
            };
            let listen = |port| {
                in_netns(&stack_ns, || async move {
                    TcpListener::bind(SocketAddr::from((server, port))).unwrap()
                })
            };
            let (open, shut) = (listen(8080), listen(8081));
            let connect = |port| {
                in_netns(&overlay_ns, || async move {
                    TcpStream::connect_timeout(
                        &SocketAddr::from((server, port)),
                        Duration::from_millis(1500),
                    )
                })
            };

            let mut acl = Acl::start(policy("deny", "web:tcp/8080", None), c).unwrap();
            assert_eq!(acl.state(), &AclState::Installed);
            let mut to_server = connect(8080).expect("allowed");
            let err = connect(8081).expect_err("denied");
            assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
            drop(shut);

            let (mut at_server, from) = open.accept().unwrap();
            assert_eq!(from.ip(), client);
            let wait = Some(Duration::from_millis(700));
            at_server.set_read_timeout(wait).unwrap();
            to_server.set_read_timeout(wait).unwrap();
            let mut buf = [0u8; 16];
            to_server.write_all(b"ping").unwrap();
            assert_eq!(at_server.read(&mut buf).unwrap(), 4);
            at_server.write_all(b"pong").unwrap();
            assert_eq!(to_server.read(&mut buf).unwrap(), 4);

            let before = acl.read().unwrap();
            let rule = Counted::Rule("allow web:tcp/8080".into());
            // The SYN in the class chain, the rest of the handshake and the data on
            // the admitted mark.
            assert!(before.rules[&rule].accepted.packets >= 5, "{before:?}");
            assert!(
                before.rules[&Counted::Default].dropped.packets >= 1,
                "{before:?}"
            );
            let web = Some(StackName::new("web").unwrap());
            assert!(before.dropped_from[&(Counted::Default, web.clone())].packets >= 1);

            // Denied now: the open connection stops both ways (the server speaking
            // first included).
            acl.reload(policy("deny", "web:tcp/9999", None)).unwrap();
            at_server.write_all(b"late").unwrap();
            let err = to_server.read(&mut buf).expect_err("cut");
            assert!(
                matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "{err}"
            );
            to_server.write_all(b"late").unwrap();
            let err = at_server.read(&mut buf).expect_err("cut");
            assert!(
                matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "{err}"
            );
            let after = acl.read().unwrap();
            assert!(
                after.rules[&Counted::Default].dropped.packets
                    >= before.rules[&Counted::Default].dropped.packets + 2,
                "{after:?}"
            );
            assert_eq!(
                after.rules[&rule].accepted, before.rules[&rule].accepted,
                "totals kept"
            );
            Nft::connect(TABLE, CHAIN).unwrap().delete_table().unwrap();
        });
    }

    /// The default policy in the kernel: a TCP connection whose server answers by
    /// another way, so the router sees the client's half only (what port steering
    /// does to a stack of the default policy: its own frames go straight into the
    /// tunnel), opens and carries data, and conntrack holds nothing in the router's
    /// namespace. Under a restricting policy that allows the client, the router takes
    /// the same half connection for invalid and drops it.
    #[test]
    fn root_the_default_policy_forwards_a_connection_it_sees_one_way() {
        in_new_netns(
            "root_the_default_policy_forwards_a_connection_it_sees_one_way",
            || async {
                let k = Kernel::connect().await.unwrap();
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("forwarding");
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
                k.replace_address(stk, Ipv4Addr::new(172, 16, 0, 1), 24)
                    .await
                    .unwrap();
                k.replace_address(ovl, Ipv4Addr::new(10, 1, 0, 1), 24)
                    .await
                    .unwrap();
                k.set_up(stk).await.unwrap();
                k.set_up(ovl).await.unwrap();
                let server = Ipv4Addr::new(172, 16, 0, 10);
                let client = Ipv4Addr::new(10, 1, 0, 5);
                in_netns(&stack_ns, || side(server, Ipv4Addr::new(172, 16, 0, 1)));
                let web_mac = in_netns(&overlay_ns, || side(client, Ipv4Addr::new(10, 1, 0, 1)));
                // The server's way back: a link of its own to the client, around the router.
                in_netns(&stack_ns, || async {
                    let k = Kernel::connect().await.unwrap();
                    let direct = k
                        .create_veth_into("direct", 1500, overlay_ns.as_fd(), "direct")
                        .await
                        .unwrap();
                    k.set_up(direct).await.unwrap();
                    k.replace_route(&Route {
                        table: 254,
                        dst: Prefix::containing(client, 32),
                        gateway: None,
                        oif: Some(direct),
                        onlink: false,
                        protocol: 4,
                        nexthop: None,
                    })
                    .await
                    .unwrap();
                    loose_rp_filter(&["eth0", "direct"]);
                });
                in_netns(&overlay_ns, || async {
                    let k = Kernel::connect().await.unwrap();
                    let direct = k.link_by_name("direct").await.unwrap().unwrap();
                    k.set_up(direct.index).await.unwrap();
                    loose_rp_filter(&["eth0", "direct"]);
                });
                let c = AclContext {
                    local: vec!["172.16.0.0/24".parse().unwrap()],
                    overlay_ifname: "ovl0".into(),
                    remote: vec![RemoteRoute {
                        prefix: Prefix::containing(client, 24),
                        stack: StackName::new("web").unwrap(),
                        via: client,
                        mac: web_mac,
                        host: Ipv4Addr::new(192, 168, 0, 2),
                        same_host: false,
                    }],
                };
                let listener = in_netns(&stack_ns, || async move {
                    let l = TcpListener::bind(SocketAddr::from((server, 8080))).unwrap();
                    l.set_nonblocking(true).unwrap();
                    l
                });
                let connect = || {
                    in_netns(&overlay_ns, || async move {
                        TcpStream::connect_timeout(
                            &SocketAddr::from((server, 8080)),
                            Duration::from_millis(1500),
                        )
                    })
                };
                // The server's side of the next connection, if it opens within 1.5 s.
                let accept = || {
                    let until = std::time::Instant::now() + Duration::from_millis(1500);
                    loop {
                        match listener.accept() {
                            Ok((s, from)) => break Some((s, from)),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                if std::time::Instant::now() > until {
                                    break None;
                                }
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            Err(e) => panic!("accept: {e}"),
                        }
                    }
                };

                let mut acl = Acl::start(Policy::default(), c).unwrap();
                assert_eq!(acl.state(), &AclState::Installed);
                assert!(!acl.tracks_connections());
                let mut to_server = connect().expect("the client's half passes the router");
                let (mut at_server, from) = accept().expect("the server accepts");
                assert_eq!(from.ip(), client, "source kept");
                at_server.set_nonblocking(false).unwrap();
                let wait = Some(Duration::from_millis(1500));
                at_server.set_read_timeout(wait).unwrap();
                to_server.set_read_timeout(wait).unwrap();
                let mut buf = [0u8; 16];
                to_server.write_all(b"ping").unwrap();
                assert_eq!(at_server.read(&mut buf).unwrap(), 4);
                at_server.write_all(b"pong").unwrap();
                assert_eq!(to_server.read(&mut buf).unwrap(), 4);
                // SYN, ACK, data: the default's, counted where they enter the stack.
                let counters = acl.read().unwrap();
                assert!(
                    counters.rules[&Counted::Default].accepted.packets >= 3,
                    "{counters:?}"
                );
                // Nothing tracked in this namespace (the file exists only while the
                // module is loaded, by whatever namespace).
                match std::fs::read_to_string("/proc/thread-self/net/nf_conntrack") {
                    Ok(table) => assert!(
                        !table.contains(&format!("src={client}")),
                        "conntrack entries in the router's namespace:\n{table}"
                    ),
                    Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}"),
                }
                drop((to_server, at_server));

                // A policy that allows web, but tracks connections: the SYN passes, the
                // client's ACK after the SYN-ACK it never saw is invalid, and dropped.
                acl.reload(policy("deny", "web", None)).unwrap();
                assert!(acl.tracks_connections());
                let _half_open = connect();
                assert!(
                    accept().is_none(),
                    "the server got a connection the router saw half of"
                );
                let counters = acl.read().unwrap();
                assert!(
                    counters.rules[&Counted::Fallback].dropped.packets >= 1,
                    "{counters:?}"
                );
                Nft::connect(TABLE, CHAIN).unwrap().delete_table().unwrap();
            },
        );
    }

    /// Reverse-path filtering off in this thread's namespace for `links` (the
    /// effective value is the larger of `all` and the link's).
    fn loose_rp_filter(links: &[&str]) {
        for l in ["all", "default"].iter().chain(links) {
            std::fs::write(format!("/proc/sys/net/ipv4/conf/{l}/rp_filter"), "0")
                .expect("rp_filter");
        }
    }

    /// One side's namespace: `addr`/24 on eth0, default route via `via`; its MAC.
    async fn side(addr: Ipv4Addr, via: Ipv4Addr) -> Mac {
        let k = Kernel::connect().await.unwrap();
        let eth0 = k.link_by_name("eth0").await.unwrap().unwrap();
        k.replace_address(eth0.index, addr, 24).await.unwrap();
        k.set_up(eth0.index).await.unwrap();
        k.replace_route(&Route {
            table: 254,
            dst: "0.0.0.0/0".parse().unwrap(),
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
}
