//! The removal half of "publish only after the FDB row exists": a router row leaves
//! the FDB only after every connected router on its VNI has acknowledged a routes.json
//! generation that no longer uses it. Pure bookkeeping.

use crate::desired::FdbRow;
use std::collections::{BTreeMap, BTreeSet};
use vrouter_state::{StackName, StackRoutes, Vni};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Retention {
    /// Row -> first generation published without it.
    withdrawn: BTreeMap<FdbRow, u64>,
}

/// The router FDB rows a routes map relies on.
pub fn referenced(routes: &BTreeMap<StackName, StackRoutes>) -> BTreeSet<FdbRow> {
    let mut out = BTreeSet::new();
    for s in routes.values() {
        let Some(vni) = s.vni else { continue };
        for r in s.routes.iter().filter(|r| !r.same_host) {
            out.insert(FdbRow {
                vni,
                mac: r.mac,
                dst: r.host,
            });
        }
    }
    out
}

impl Retention {
    /// Records that `new` was published as `generation`, replacing `old`.
    pub fn published(
        &mut self,
        old: &BTreeMap<StackName, StackRoutes>,
        new: &BTreeMap<StackName, StackRoutes>,
        generation: u64,
    ) {
        let now = referenced(new);
        for row in referenced(old).difference(&now) {
            self.withdrawn.entry(*row).or_insert(generation);
        }
        self.withdrawn.retain(|row, _| !now.contains(row));
    }

    /// Rows still to keep. `acks(vni)` gives the acknowledged generation of every
    /// connected router on that VNI.
    pub fn retained(&self, acks: impl Fn(Vni) -> Vec<u64>) -> BTreeSet<FdbRow> {
        self.withdrawn
            .iter()
            .filter(|(row, gen)| acks(row.vni).iter().any(|a| a < gen))
            .map(|(row, _)| *row)
            .collect()
    }

    /// Forgets rows that no connected router still needs.
    pub fn forget_acked(&mut self, acks: impl Fn(Vni) -> Vec<u64>) {
        self.withdrawn
            .retain(|row, gen| acks(row.vni).iter().any(|a| a < gen));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use vrouter_state::{Mac, RemoteRoute};

    fn routes(with_b: bool) -> BTreeMap<StackName, StackRoutes> {
        let vni = Vni::new(1000).unwrap();
        let router: Ipv4Addr = "10.2.0.254".parse().unwrap();
        let mut m = BTreeMap::new();
        m.insert(
            StackName::new("a").unwrap(),
            StackRoutes {
                vni: Some(vni),
                routes: if with_b {
                    vec![RemoteRoute {
                        prefix: "10.2.0.0/24".parse().unwrap(),
                        stack: StackName::new("b").unwrap(),
                        via: router,
                        mac: Mac::for_router(vni, router),
                        host: "198.18.0.2".parse().unwrap(),
                        same_host: false,
                    }]
                } else {
                    vec![]
                },
            },
        );
        m
    }

    #[test]
    fn row_kept_until_acked() {
        let mut r = Retention::default();
        r.published(&routes(true), &routes(false), 7);
        assert_eq!(r.retained(|_| vec![6]).len(), 1, "router still on gen 6");
        assert!(r.retained(|_| vec![7]).is_empty(), "router acked gen 7");
        assert!(
            r.retained(|_| vec![]).is_empty(),
            "no connected router waits"
        );
        r.forget_acked(|_| vec![6]);
        assert_eq!(r.retained(|_| vec![6]).len(), 1);
        r.forget_acked(|_| vec![8]);
        assert_eq!(r, Retention::default());
    }

    #[test]
    fn republished_row_is_no_longer_withdrawn() {
        let mut r = Retention::default();
        r.published(&routes(true), &routes(false), 7);
        r.published(&routes(false), &routes(true), 8);
        assert!(r.retained(|_| vec![0]).is_empty());
    }
}
