//! The one place that reads and changes the router's routing state in the kernel:
//! dump what this project owns, and carry out a plan from [`crate::diff`].
//!
//! It works through [`RoutingKernel`], implemented by `vrouter_kernel::Kernel` and, in
//! tests, by a model, so the dump filters and the error handling are tested without
//! root.

use crate::desired::{RoutingState, MAIN_TABLE, PROBE_TABLE};
use crate::diff::Change;
use std::net::Ipv4Addr;
use vrouter_kernel::{Kernel, KernelError, Neighbour, Route, Rule};
use vrouter_state::{Mac, RTPROT_VROUTER};

/// The kernel operations the router's reconcile needs.
#[allow(async_fn_in_trait)]
pub trait RoutingKernel {
    async fn routes(&self, table: u32) -> Result<Vec<Route>, KernelError>;
    async fn neighbours(&self, index: u32) -> Result<Vec<Neighbour>, KernelError>;
    async fn rules(&self) -> Result<Vec<Rule>, KernelError>;
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
/// neighbours on the overlay link, routes with protocol RTPROT_VROUTER in the main and
/// probe tables, rules with that protocol. Everything else (Docker's routes, the
/// kernel's connected routes, learned neighbours) is invisible to the diff and so is
/// never touched.
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
    for table in [MAIN_TABLE, PROBE_TABLE] {
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
}

impl Applied {
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Carries out `plan` in order.
pub async fn apply<K: RoutingKernel>(kernel: &K, plan: &[Change]) -> Applied {
    let mut out = Applied::default();
    for change in plan {
        let result = match change {
            Change::DeleteRule(r) => kernel.delete_rule(r).await,
            Change::DeleteRoute(r) => kernel.delete_route(r).await,
            Change::ReplaceNeighbour { index, ip, mac } => {
                kernel.replace_neighbour(*index, *ip, *mac).await
            }
            Change::ReplaceRoute(r) => kernel.replace_route(r).await,
            Change::AddRule(r) => kernel.add_rule(r).await,
            Change::DeleteNeighbour { index, ip } => kernel.delete_neighbour(*index, *ip).await,
        };
        match result {
            Ok(()) => {
                tracing::debug!(%change, "applied");
                out.done += 1;
            }
            Err(e) => {
                tracing::warn!(%change, error = %e, "change failed");
                out.failed.push(format!("{change}: {e}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{DesiredRouter, ProbePath};
    use crate::diff::{diff, tests::model_apply};
    use std::sync::Mutex;
    use vrouter_state::{Prefix, Vni};

    /// A kernel modelled by the diff's own semantics, plus objects that are not ours.
    struct FakeKernel {
        ours: Mutex<RoutingState>,
        foreign_routes: Vec<Route>,
        foreign_neighbours: Vec<Neighbour>,
        fail_routes: bool,
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
                fail_routes: false,
            }
        }
        fn change(&self, c: Change) -> Result<(), KernelError> {
            if self.fail_routes && matches!(c, Change::ReplaceRoute(_)) {
                return Err(KernelError::NotPermitted {
                    op: "replace route".into(),
                });
            }
            model_apply(&mut self.ours.lock().unwrap(), &c);
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
        async fn replace_route(&self, route: &Route) -> Result<(), KernelError> {
            self.change(Change::ReplaceRoute(route.clone()))
        }
        async fn delete_route(&self, route: &Route) -> Result<(), KernelError> {
            self.change(Change::DeleteRoute(route.clone()))
        }
        async fn replace_neighbour(
            &self,
            index: u32,
            ip: Ipv4Addr,
            mac: Mac,
        ) -> Result<(), KernelError> {
            self.change(Change::ReplaceNeighbour { index, ip, mac })
        }
        async fn delete_neighbour(&self, index: u32, ip: Ipv4Addr) -> Result<(), KernelError> {
            self.change(Change::DeleteNeighbour { index, ip })
        }
        async fn add_rule(&self, rule: &Rule) -> Result<(), KernelError> {
            self.change(Change::AddRule(rule.clone()))
        }
        async fn delete_rule(&self, rule: &Rule) -> Result<(), KernelError> {
            self.change(Change::DeleteRule(rule.clone()))
        }
    }

    const OVL: u32 = 9;

    fn desired() -> RoutingState {
        let via: Ipv4Addr = "10.2.0.254".parse().unwrap();
        let mut d = DesiredRouter::default();
        d.neighbours
            .insert(via, Mac::for_router(Vni::new(1000).unwrap(), via));
        d.routes
            .insert("10.2.0.0/24".parse::<Prefix>().unwrap(), via);
        d.routing_state(
            Some(OVL),
            Some(ProbePath {
                gateway: "10.1.0.1".parse().unwrap(),
                oif: 2,
            }),
        )
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
            let plan = diff(&d, &observe(&k, Some(OVL)).await.unwrap());
            let done = apply(&k, &plan).await;
            assert!(done.ok());
            assert_eq!(done.done, plan.len());
            let after = observe(&k, Some(OVL)).await.unwrap();
            assert_eq!(after, d);
            assert!(diff(&d, &after).is_empty());
            // Withdrawal removes ours and leaves the foreign default route alone.
            let plan = diff(&RoutingState::default(), &after);
            assert!(apply(&k, &plan).await.ok());
            assert_eq!(
                observe(&k, Some(OVL)).await.unwrap(),
                RoutingState::default()
            );
            assert_eq!(k.routes(MAIN_TABLE).await.unwrap().len(), 1);
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
            assert_eq!(done.failed.len(), 2, "{:?}", done.failed);
            assert!(done.failed[0].contains("CAP_NET_ADMIN"));
            // The neighbour and rule went in; the next reconcile retries the routes.
            let after = observe(&k, Some(OVL)).await.unwrap();
            assert_eq!(after.neighbours, d.neighbours);
            k.fail_routes = false;
            let retry = diff(&d, &after);
            assert_eq!(retry.len(), 2);
            assert!(apply(&k, &retry).await.ok());
            assert_eq!(observe(&k, Some(OVL)).await.unwrap(), d);
        })
    }
}
