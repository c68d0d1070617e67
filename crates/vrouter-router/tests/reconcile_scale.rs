//! Root test of the router's reconcile at scale against the real kernel: 10,000 remote
//! prefixes, each behind its own remote router, go in through nexthop objects, match
//! the desired state, shrink and are withdrawn without leaving anything of ours. It
//! also times the kernel part (neighbours, nexthops and routes, pipelined as the
//! router does it) with nexthop objects and with plain routes, and prints the figures
//! (`FIGURE` lines; run with `--nocapture`).
//!
//! Each case runs on its own thread in a throwaway network namespace
//! (`unshare(CLONE_NEWNET)`), so nothing outlives it. Without root it prints a skip
//! line, except under CI=true where a skip would hide a regression, so it fails.

use nix::sched::{unshare, CloneFlags};
use std::future::Future;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};
use vrouter_kernel::Kernel;
use vrouter_router::apply::{apply, observe};
use vrouter_router::desired::{DesiredRouter, RouteStyle, RoutingState};
use vrouter_router::diff::diff;
use vrouter_state::{Mac, Prefix, Vni, RTPROT_VROUTER};

const PREFIXES: u32 = 10_000;
const TIMEOUT: Duration = Duration::from_secs(300);

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

/// Runs `body` on a new thread in a new network namespace, with a current-thread
/// runtime, and an overlay link `ovl1000` (a veth, up) whose index it is given.
fn in_new_netns<F, Fut>(test: &str, body: F)
where
    F: FnOnce(Kernel, u32) -> Fut + Send,
    Fut: Future<Output = ()>,
{
    if !root_or_skip(test) {
        return;
    }
    std::thread::scope(|scope| {
        let thread = scope.spawn(move || {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
            // A child process starts in its parent thread's namespace.
            for args in [
                &[
                    "link", "add", "ovl1000", "type", "veth", "peer", "name", "ovl1000p",
                ][..],
                &["link", "set", "ovl1000p", "up"],
                &["link", "set", "ovl1000", "up"],
                &["addr", "add", "10.1.0.254/24", "dev", "ovl1000"],
            ] {
                let out = Command::new("ip").args(args).output().expect("run ip");
                assert!(
                    out.status.success(),
                    "ip {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(async {
                let kernel = Kernel::connect().await.expect("netlink");
                let ovl = kernel
                    .link_by_name("ovl1000")
                    .await
                    .unwrap()
                    .expect("ovl1000 exists")
                    .index;
                tokio::time::timeout(TIMEOUT, body(kernel, ovl))
                    .await
                    .expect("test timed out")
            })
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// `n` prefixes 10.x.y.0/24 from 10.2.0.0 on, each behind its own router 10.x.y.254.
fn remote_stacks(n: u32) -> DesiredRouter {
    let mut d = DesiredRouter::default();
    for i in 0..n {
        let [_, _, x, y] = (i + 2 * 256).to_be_bytes();
        let via = Ipv4Addr::new(10, x, y, 254);
        d.neighbours
            .insert(via, Mac::for_router(Vni::new(1000).unwrap(), via));
        d.routes
            .insert(Prefix::new(Ipv4Addr::new(10, x, y, 0), 24).unwrap(), via);
    }
    d
}

/// Observes, diffs and applies once; returns the time the apply took and how many
/// changes it carried out. Every change must succeed.
async fn reconcile(k: &Kernel, ovl: u32, desired: &RoutingState) -> (Duration, usize) {
    let observed = observe(k, Some(ovl)).await.expect("dump");
    let plan = diff(desired, &observed);
    let started = Instant::now();
    let done = apply(k, &plan).await;
    let took = started.elapsed();
    assert!(
        done.ok(),
        "{} of {} changes failed, first: {}",
        done.failed.len(),
        plan.len(),
        done.failed[0]
    );
    assert!(!done.nexthops_refused);
    (took, plan.len())
}

/// Nothing of ours left: no route, nexthop or permanent neighbour, checked on the
/// kernel's own dumps rather than through `observe`.
async fn assert_nothing_of_ours(k: &Kernel, ovl: u32) {
    let routes = k.routes(254).await.unwrap();
    assert!(
        routes.iter().all(|r| r.protocol != RTPROT_VROUTER),
        "routes left: {}",
        routes.len()
    );
    let nexthops = k.nexthops().await.unwrap();
    assert!(nexthops.is_empty(), "nexthops left: {}", nexthops.len());
    let neighbours = k.neighbours(ovl).await.unwrap();
    assert!(
        neighbours.iter().all(|n| !n.permanent),
        "neighbours left: {}",
        neighbours.len()
    );
}

#[test]
fn ten_thousand_gateways_through_nexthop_objects() {
    in_new_netns(
        "ten_thousand_gateways_through_nexthop_objects",
        |k, ovl| async move {
            let all = remote_stacks(PREFIXES).routing_state(Some(ovl), RouteStyle::Nexthop);
            assert_eq!(all.nexthops.len(), PREFIXES as usize);

            let (took, changes) = reconcile(&k, ovl, &all).await;
            assert_eq!(changes, 3 * PREFIXES as usize);
            eprintln!(
            "FIGURE nexthop objects: {PREFIXES} prefixes behind {PREFIXES} gateways installed in {} ms ({changes} changes)",
            took.as_millis()
        );
            let seen = observe(&k, Some(ovl)).await.unwrap();
            assert!(
                seen == all,
                "the kernel dump differs from the desired state"
            );
            assert!(diff(&all, &seen).is_empty());
            // The kernel's own view: every route names its nexthop.
            let routes: Vec<_> = k
                .routes(254)
                .await
                .unwrap()
                .into_iter()
                .filter(|r| r.protocol == RTPROT_VROUTER)
                .collect();
            assert_eq!(routes.len(), PREFIXES as usize);
            assert!(routes
                .iter()
                .all(|r| r.nexthop.is_some() && r.gateway.is_none()));

            // Half the remote stacks go: their routes, nexthops and neighbours with them.
            let half = remote_stacks(PREFIXES / 2).routing_state(Some(ovl), RouteStyle::Nexthop);
            let (took, changes) = reconcile(&k, ovl, &half).await;
            assert_eq!(changes, 3 * (PREFIXES / 2) as usize);
            eprintln!(
                "FIGURE nexthop objects: {} of {PREFIXES} withdrawn in {} ms",
                PREFIXES / 2,
                took.as_millis()
            );
            assert!(observe(&k, Some(ovl)).await.unwrap() == half);

            // A restarted router with nothing to route withdraws everything it finds.
            let (took, _) = reconcile(&k, ovl, &RoutingState::default()).await;
            eprintln!(
                "FIGURE nexthop objects: the other {} withdrawn in {} ms",
                PREFIXES / 2,
                took.as_millis()
            );
            assert_eq!(
                observe(&k, Some(ovl)).await.unwrap(),
                RoutingState::default()
            );
            assert_nothing_of_ours(&k, ovl).await;
        },
    );
}

/// The same 10,000 prefixes as plain routes (a gateway in each route), as on kernels
/// without nexthop objects: the kernel takes quadratic time over distinct gateways.
/// Compared with nexthop objects in a namespace of its own each.
#[test]
fn plain_routes_against_nexthop_objects() {
    let mut took = Vec::new();
    for style in [RouteStyle::Plain, RouteStyle::Nexthop] {
        in_new_netns("plain_routes_against_nexthop_objects", |k, ovl| {
            let took = &mut took;
            async move {
                let d = remote_stacks(PREFIXES).routing_state(Some(ovl), style);
                let (install, _) = reconcile(&k, ovl, &d).await;
                assert!(observe(&k, Some(ovl)).await.unwrap() == d);
                let (withdraw, _) = reconcile(&k, ovl, &RoutingState::default()).await;
                assert_nothing_of_ours(&k, ovl).await;
                eprintln!(
                    "FIGURE {style:?}: {PREFIXES} prefixes behind {PREFIXES} gateways installed in {} ms, withdrawn in {} ms",
                    install.as_millis(),
                    withdraw.as_millis()
                );
                took.push(install);
            }
        });
    }
    if let [plain, nexthop] = took[..] {
        assert!(
            nexthop < plain,
            "nexthop objects ({nexthop:?}) are not faster than plain routes ({plain:?})"
        );
    }
}
