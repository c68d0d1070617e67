//! The one place that reads and changes the router's routing state in the kernel:
//! dump what this project owns, and carry out a plan from [`crate::diff`].
//!
//! It works through [`RoutingKernel`], implemented by `vrouter_kernel::Kernel` and, in
//! tests, by a model, so the dump filters, the error handling and the fallback to
//! plain routes are tested without root.

use crate::desired::{RoutingState, LEGACY_PROBE_TABLE, MAIN_TABLE};
use crate::diff::Change;
use futures::StreamExt;
use std::net::Ipv4Addr;
use vrouter_kernel::{Kernel, KernelError, Neighbour, Nexthop, Route, Rule};
use vrouter_state::{Mac, RTPROT_VROUTER};

/// Requests kept in flight at once while carrying out a plan: one at a time, 10,000
/// routes would each wait a round trip to the kernel.
pub const IN_FLIGHT: usize = 64;

/// The kernel operations the router's reconcile needs.
#[allow(async_fn_in_trait)]
pub trait RoutingKernel {
    async fn routes(&self, table: u32) -> Result<Vec<Route>, KernelError>;
    async fn neighbours(&self, index: u32) -> Result<Vec<Neighbour>, KernelError>;
    async fn rules(&self) -> Result<Vec<Rule>, KernelError>;
    async fn nexthops(&self) -> Result<Vec<Nexthop>, KernelError>;
    async fn replace_nexthop(&self, nexthop: &Nexthop) -> Result<(), KernelError>;
    async fn delete_nexthop(&self, id: u32) -> Result<(), KernelError>;
    async fn replace_route(&self, route: &Route) -> Result<(), KernelError>;
    async fn delete_route(&self, route: &Route) -> Result<(), KernelError>;
    async fn replace_neighbour(
        &self,
        index: u32,
        ip: Ipv4Addr,
        mac: Mac,
    ) -> Result<(), KernelError>;
    async fn delete_neighbour(&self, index: u32, ip: Ipv4Addr) -> Result<(), KernelError>;
    async fn add_rule(&self, rule: &Rule) -> Result<(), KernelError>;
    async fn delete_rule(&self, rule: &Rule) -> Result<(), KernelError>;
}

impl RoutingKernel for Kernel {
    async fn routes(&self, table: u32) -> Result<Vec<Route>, KernelError> {
        Kernel::routes(self, table).await
    }
    async fn neighbours(&self, index: u32) -> Result<Vec<Neighbour>, KernelError> {
        Kernel::neighbours(self, index).await
    }
    async fn rules(&self) -> Result<Vec<Rule>, KernelError> {
        Kernel::rules(self).await
    }
    async fn nexthops(&self) -> Result<Vec<Nexthop>, KernelError> {
        Kernel::nexthops(self).await
    }
    async fn replace_nexthop(&self, nexthop: &Nexthop) -> Result<(), KernelError> {
        Kernel::replace_nexthop(self, nexthop).await
    }
    async fn delete_nexthop(&self, id: u32) -> Result<(), KernelError> {
        Kernel::delete_nexthop(self, id).await
    }
    async fn replace_route(&self, route: &Route) -> Result<(), KernelError> {
        Kernel::replace_route(self, route).await
    }
    async fn delete_route(&self, route: &Route) -> Result<(), KernelError> {
        Kernel::delete_route(self, route).await
    }
    async fn replace_neighbour(
        &self,
        index: u32,
        ip: Ipv4Addr,
        mac: Mac,
    ) -> Result<(), KernelError> {
        Kernel::replace_neighbour(self, index, ip, mac).await
    }
    async fn delete_neighbour(&self, index: u32, ip: Ipv4Addr) -> Result<(), KernelError> {
        Kernel::delete_neighbour(self, index, ip).await
    }
    async fn add_rule(&self, rule: &Rule) -> Result<(), KernelError> {
        Kernel::add_rule(self, rule).await
    }
    async fn delete_rule(&self, rule: &Rule) -> Result<(), KernelError> {
        Kernel::delete_rule(self, rule).await
    }
}

/// Dumps the objects this project owns in the router's namespace: permanent
/// neighbours on the overlay link, nexthop objects, routes and rules with protocol
/// RTPROT_VROUTER (routes in the main table, and in the probe table of older
/// releases). Everything else (Docker's routes, the kernel's connected routes, learned neighbours) is invisible to the
/// diff and so is never touched. A kernel without nexthop objects has none of ours.
pub async fn observe<K: RoutingKernel>(
    kernel: &K,
    overlay: Option<u32>,
) -> Result<RoutingState, KernelError> {
    let mut state = RoutingState::default();
    if let Some(ovl) = overlay {
        for n in kernel.neighbours(ovl).await? {
            if let (true, Some(mac), true) = (n.permanent, n.mac, n.index == ovl) {
                state.neighbours.insert((ovl, n.ip), mac);
            }
        }
    }
    match kernel.nexthops().await {
        Ok(nexthops) => {
            for n in nexthops {
                if n.protocol == RTPROT_VROUTER {
                    state.nexthops.insert(n.id, n);
                }
            }
        }
        Err(KernelError::NoNexthops { .. }) => {}
        Err(e) => return Err(e),
    }
    for table in [MAIN_TABLE, LEGACY_PROBE_TABLE] {
        for r in kernel.routes(table).await? {
            if r.protocol == RTPROT_VROUTER && r.table == table {
                state.routes.insert((r.table, r.dst), r);
            }
        }
    }
    for rule in kernel.rules().await? {
        if rule.protocol == RTPROT_VROUTER {
            state.rules.insert(rule);
        }
    }
    Ok(state)
}

/// What carrying out a plan did.
#[derive(Debug, Default)]
pub struct Applied {
    pub done: usize,
    /// One line per change that failed. The rest of the plan is still carried out:
    /// a later reconcile retries what failed, and stopping would leave more stale.
    pub failed: Vec<String>,
    /// The kernel refused a nexthop object as unsupported (before Linux 5.3): the
    /// caller should go on with [`crate::desired::RouteStyle::Plain`].
    pub nexthops_refused: bool,
}

impl Applied {
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Carries out `plan` in order. Consecutive changes of one kind (the diff groups
/// them: all route deletes, then all neighbours, ...) do not depend on each other, so
/// up to [`IN_FLIGHT`] of them go to the kernel at once; a kind starts once the one
/// before it is done, which keeps the diff's order where it matters.
pub async fn apply<K: RoutingKernel>(kernel: &K, plan: &[Change]) -> Applied {
    let mut out = Applied::default();
    for group in plan.chunk_by(|a, b| std::mem::discriminant(a) == std::mem::discriminant(b)) {
        let mut results = futures::stream::iter(group)
            .map(|change| async move { (change, carry_out(kernel, change).await) })
            .buffered(IN_FLIGHT);
        while let Some((change, result)) = results.next().await {
            match result {
                Ok(()) => {
                    tracing::debug!(%change, "applied");
                    out.done += 1;
                }
                Err(e) => {
                    if matches!(e, KernelError::NoNexthops { .. }) {
                        out.nexthops_refused = true;
                    }
                    tracing::debug!(%change, error = %e, "change failed");
                    out.failed.push(format!("{change}: {e}"));
                }
            }
        }
        // After each group: one kind of object changed, the next kinds not yet.
        match group[0] {
            Change::DeleteRoute(_) | Change::ReplaceRoute(_) => {
                vrouter_state::crash::point("router.after_routes")
            }
            Change::ReplaceNeighbour { .. } | Change::DeleteNeighbour { .. } => {
                vrouter_state::crash::point("router.after_neighbours")
            }
            Change::ReplaceNexthop(_) | Change::DeleteNexthop(_) => {
                vrouter_state::crash::point("router.after_nexthops")
            }
            Change::AddRule(_) | Change::DeleteRule(_) => {
                vrouter_state::crash::point("router.after_rules")
            }
        }
    }
    if !out.failed.is_empty() {
        tracing::warn!(
            failed = out.failed.len(),
            of = plan.len(),
            first = %out.failed[0],
            "changes failed"
        );
    }
    out
}

async fn carry_out<K: RoutingKernel>(kernel: &K, change: &Change) -> Result<(), KernelError> {
    match change {
        Change::DeleteRule(r) => kernel.delete_rule(r).await,
        Change::DeleteRoute(r) => kernel.delete_route(r).await,
        Change::ReplaceNeighbour { index, ip, mac } => {
            kernel.replace_neighbour(*index, *ip, *mac).await
        }
        Change::ReplaceNexthop(n) => kernel.replace_nexthop(n).await,
        Change::ReplaceRoute(r) => kernel.replace_route(r).await,
        Change::AddRule(r) => kernel.add_rule(r).await,
        Change::DeleteNexthop(id) => kernel.delete_nexthop(*id).await,
        Change::DeleteNeighbour { index, ip } => kernel.delete_neighbour(*index, *ip).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{DesiredRouter, RouteStyle};
    use crate::diff::{diff, tests::model_apply};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use vrouter_state::{Prefix, Vni};

    /// A kernel modelled by the diff's own semantics, plus objects that are not ours.
    /// Each request yields once, as a real one waits for the kernel's answer, so that
    /// pipelining shows in `most_in_flight`.
    struct FakeKernel {
        ours: Mutex<RoutingState>,
        foreign_routes: Vec<Route>,
        foreign_neighbours: Vec<Neighbour>,
        foreign_nexthops: Vec<Nexthop>,
        fail_routes: bool,
        /// A kernel before 5.3: no nexthop objects at all.
        no_nexthops: bool,
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
    }

    impl FakeKernel {
        fn new() -> FakeKernel {
            FakeKernel {
                ours: Mutex::new(RoutingState::default()),
                foreign_routes: vec![Route {
                    table: MAIN_TABLE,
                    dst: "0.0.0.0/0".parse().unwrap(),
                    gateway: Some("10.1.0.1".parse().unwrap()),
                    oif: Some(2),
                    onlink: false,
                    protocol: 3, // boot: Docker's default route
                    nexthop: None,
                }],
                foreign_neighbours: vec![Neighbour {
                    index: OVL,
                    ip: "10.2.0.99".parse().unwrap(),
                    mac: Some(Mac::ZERO),
                    permanent: false,
                }],
                foreign_nexthops: vec![Nexthop {
                    id: 1,
                    gateway: Some("10.1.0.1".parse().unwrap()),
                    oif: Some(2),
                    onlink: false,
                    protocol: 4, // static: made by hand
                }],
                fail_routes: false,
                no_nexthops: false,
                in_flight: AtomicUsize::new(0),
                most_in_flight: AtomicUsize::new(0),
            }
        }

        async fn change(&self, c: Change) -> Result<(), KernelError> {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::task::yield_now().await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if self.fail_routes && matches!(c, Change::ReplaceRoute(_)) {
                return Err(KernelError::NotPermitted {
                    op: "replace route".into(),
                });
            }
            let mut ours = self.ours.lock().unwrap();
            match &c {
                Change::ReplaceNexthop(_) | Change::DeleteNexthop(_) if self.no_nexthops => {
                    return Err(KernelError::NoNexthops { op: format!("{c}") });
                }
                // As the kernel: a route through a nexthop it does not have is
                // refused.
                Change::ReplaceRoute(Route {
                    nexthop: Some(id), ..
                }) if !ours.nexthops.contains_key(id) => {
                    return Err(KernelError::NoSuchLink(format!("nexthop id {id}")));
                }
                _ => {}
            }
            model_apply(&mut ours, &c);
            Ok(())
        }
    }

    impl RoutingKernel for FakeKernel {
        async fn routes(&self, table: u32) -> Result<Vec<Route>, KernelError> {
            let ours = self.ours.lock().unwrap();
            Ok(ours
                .routes
                .values()
                .chain(self.foreign_routes.iter())
                .filter(|r| r.table == table)
                .cloned()
                .collect())
        }
        async fn neighbours(&self, index: u32) -> Result<Vec<Neighbour>, KernelError> {
            let ours = self.ours.lock().unwrap();
            Ok(ours
                .neighbours
                .iter()
                .map(|(&(i, ip), &mac)| Neighbour {
                    index: i,
                    ip,
                    mac: Some(mac),
                    permanent: true,
                })
                .chain(self.foreign_neighbours.iter().cloned())
                .filter(|n| n.index == index)
                .collect())
        }
        async fn rules(&self) -> Result<Vec<Rule>, KernelError> {
            let mut rules: Vec<Rule> = self.ours.lock().unwrap().rules.iter().cloned().collect();
            rules.push(Rule {
                priority: 32766,
                iif: None,
                fwmark: None,
                table: MAIN_TABLE,
                protocol: 2,
            });
            Ok(rules)
        }
        async fn nexthops(&self) -> Result<Vec<Nexthop>, KernelError> {
            if self.no_nexthops {
                return Err(KernelError::NoNexthops {
                    op: "dump nexthops".into(),
                });
            }
            let ours = self.ours.lock().unwrap();
            Ok(ours
                .nexthops
                .values()
                .chain(self.foreign_nexthops.iter())
                .cloned()
                .collect())
        }
        async fn replace_nexthop(&self, nexthop: &Nexthop) -> Result<(), KernelError> {
            self.change(Change::ReplaceNexthop(nexthop.clone())).await
        }
        async fn delete_nexthop(&self, id: u32) -> Result<(), KernelError> {
            self.change(Change::DeleteNexthop(id)).await
        }
        async fn replace_route(&self, route: &Route) -> Result<(), KernelError> {
            self.change(Change::ReplaceRoute(route.clone())).await
        }
        async fn delete_route(&self, route: &Route) -> Result<(), KernelError> {
            self.change(Change::DeleteRoute(route.clone())).await
        }
        async fn replace_neighbour(
            &self,
            index: u32,
            ip: Ipv4Addr,
            mac: Mac,
        ) -> Result<(), KernelError> {
            self.change(Change::ReplaceNeighbour { index, ip, mac })
                .await
        }
        async fn delete_neighbour(&self, index: u32, ip: Ipv4Addr) -> Result<(), KernelError> {
            self.change(Change::DeleteNeighbour { index, ip }).await
        }
        async fn add_rule(&self, rule: &Rule) -> Result<(), KernelError> {
            self.change(Change::AddRule(rule.clone())).await
        }
        async fn delete_rule(&self, rule: &Rule) -> Result<(), KernelError> {
            self.change(Change::DeleteRule(rule.clone())).await
        }
    }

    const OVL: u32 = 9;

    fn desired_router() -> DesiredRouter {
        let via: Ipv4Addr = "10.2.0.254".parse().unwrap();
        let mut d = DesiredRouter::default();
        d.neighbours
            .insert(via, Mac::for_router(Vni::new(1000).unwrap(), via));
        d.routes
            .insert("10.2.0.0/24".parse::<Prefix>().unwrap(), via);
        d
    }

    fn desired() -> RoutingState {
        desired_router().routing_state(Some(OVL), RouteStyle::Nexthop)
    }

    /// `n` prefixes 10.x.y.0/24, each behind its own router 10.x.y.254.
    fn many(n: u32) -> DesiredRouter {
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

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn observe_sees_only_our_objects() {
        block_on(async {
            let k = FakeKernel::new();
            let seen = observe(&k, Some(OVL)).await.unwrap();
            assert_eq!(seen, RoutingState::default());
        })
    }

    #[test]
    fn apply_then_observe_converges() {
        block_on(async {
            let k = FakeKernel::new();
            let d = desired();
            assert_eq!(d.nexthops.len(), 1);
            let plan = diff(&d, &observe(&k, Some(OVL)).await.unwrap());
            let done = apply(&k, &plan).await;
            assert!(done.ok());
            assert_eq!(done.done, plan.len());
            let after = observe(&k, Some(OVL)).await.unwrap();
            assert_eq!(after, d);
            assert!(diff(&d, &after).is_empty());
            // Withdrawal removes ours and leaves the foreign objects alone.
            let plan = diff(&RoutingState::default(), &after);
            assert!(apply(&k, &plan).await.ok());
            assert_eq!(
                observe(&k, Some(OVL)).await.unwrap(),
                RoutingState::default()
            );
            assert_eq!(k.routes(MAIN_TABLE).await.unwrap().len(), 1);
            assert_eq!(k.nexthops().await.unwrap(), k.foreign_nexthops);
        })
    }

    #[test]
    fn many_changes_are_pipelined_in_order() {
        block_on(async {
            let k = FakeKernel::new();
            let d = many(1000).routing_state(Some(OVL), RouteStyle::Nexthop);
            let plan = diff(&d, &observe(&k, Some(OVL)).await.unwrap());
            assert_eq!(plan.len(), 3 * 1000);
            let done = apply(&k, &plan).await;
            // Every route found its nexthop: kinds did not overtake each other.
            assert!(done.ok(), "{:?}", &done.failed[..done.failed.len().min(3)]);
            let most = k.most_in_flight.load(Ordering::SeqCst);
            assert!(most > 1 && most <= IN_FLIGHT, "{most} in flight");
            assert_eq!(observe(&k, Some(OVL)).await.unwrap(), d);
            // Withdrawn: routes go before their nexthops, which would take them along
            // in a real kernel, and nothing of ours is left.
            let plan = diff(&RoutingState::default(), &d);
            assert!(apply(&k, &plan).await.ok());
            assert_eq!(
                observe(&k, Some(OVL)).await.unwrap(),
                RoutingState::default()
            );
        })
    }

    #[test]
    fn failures_are_collected_and_the_rest_applied() {
        block_on(async {
            let mut k = FakeKernel::new();
            k.fail_routes = true;
            let d = desired();
            let plan = diff(&d, &RoutingState::default());
            let done = apply(&k, &plan).await;
            assert!(!done.ok());
            assert!(!done.nexthops_refused);
            assert_eq!(done.failed.len(), 1, "{:?}", done.failed);
            assert!(done.failed[0].contains("CAP_NET_ADMIN"));
            // The neighbour and nexthop went in; the next reconcile retries the route.
            let after = observe(&k, Some(OVL)).await.unwrap();
            assert_eq!(after.neighbours, d.neighbours);
            assert_eq!(after.nexthops, d.nexthops);
            k.fail_routes = false;
            let retry = diff(&d, &after);
            assert_eq!(retry.len(), 1);
            assert!(apply(&k, &retry).await.ok());
            assert_eq!(observe(&k, Some(OVL)).await.unwrap(), d);
        })
    }

    #[test]
    fn without_nexthop_objects_plain_routes_do() {
        block_on(async {
            let mut k = FakeKernel::new();
            k.no_nexthops = true;
            // Observing such a kernel works: it has none of ours.
            let seen = observe(&k, Some(OVL)).await.unwrap();
            assert_eq!(seen, RoutingState::default());
            // The first try says why it failed, per change.
            let plan = diff(&desired(), &seen);
            let done = apply(&k, &plan).await;
            assert!(done.nexthops_refused);
            assert_eq!(done.failed.len(), 2, "{:?}", done.failed);
            assert!(
                done.failed[0].contains("no nexthop objects"),
                "{:?}",
                done.failed
            );
            assert!(
                done.failed[1].contains("replace route 10.2.0.0/24"),
                "{:?}",
                done.failed
            );
            // The same intent as plain routes goes in whole.
            let plain = desired_router().routing_state(Some(OVL), RouteStyle::Plain);
            let plan = diff(&plain, &observe(&k, Some(OVL)).await.unwrap());
            let done = apply(&k, &plan).await;
            assert!(done.ok() && !done.nexthops_refused, "{:?}", done.failed);
            let after = observe(&k, Some(OVL)).await.unwrap();
            assert_eq!(after, plain);
            assert!(diff(&plain, &after).is_empty());
        })
    }
}
