//! Transit on a relay host: L2 forwarding of VXLAN frames between two peer hosts that
//! cannot reach each other, in the relay HOST's namespace (no router, no tenant).
//!
//! A sender host L points the FDB rows of a destination D's router MACs at the relay
//! R (see `paths.rs`). On R, a frame arriving on `vxlan<vni>` whose destination MAC
//! is a router of a host R reaches DIRECTLY goes straight back out of `vxlan<vni>`,
//! where R's own FDB rows for those MACs (direct) send it on to D:
//!
//! ```text
//! table netdev <steering_table>_relay {
//!     set relay_<vni> { type ether_addr; elements = { <router MACs> } }
//!     chain relay_<vni> {
//!         type filter hook ingress device "vxlan<vni>" priority 0; policy accept;
//!         ether daddr @relay_<vni> counter fwd to "vxlan<vni>" comment "vrouter relay <vni>"
//!     }
//! }
//! ```
//!
//! A frame is relayed at most once: MACs of hosts R does not reach directly are never
//! in a set, so R never sends a frame on to another relay. Frames for local routers'
//! MACs are not in the sets and go on to the macvlans as before. The relay's owner
//! sees relayed inner frames in its root namespace (in the clear when the underlay is
//! not encrypted; decrypted by its WireGuard and re-encrypted when it is); no tenant
//! router sees them, and they touch no stack's router, ACLs, counters or ICMP
//! redirects.
//!
//! [`plan`] is pure; [`apply`], [`counters`] and [`remove`] work on the calling
//! thread's network namespace.

use crate::desired::FdbRow;
use anyhow::Context as _;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Mutex;
use vrouter_kernel::{
    BaseHook, ChainSpec, Family, Hook, Match, Nft, RuleSpec, RuleVerdict, SetElements, SetSpec,
    TableSpec,
};
use vrouter_state::{Mac, PeerHost, Vni};

/// What a relay host forwards: the VNIs it relays on (each needs `vxlan<vni>` on this
/// host, with or without a local stack on it), the FDB rows of the routers it relays
/// to (direct, merged into the host's FDB by the caller), and the router MACs of each
/// relayed VNI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransitPlan {
    pub vnis: BTreeSet<Vni>,
    pub fdb: BTreeSet<FdbRow>,
    pub macs: BTreeMap<Vni, BTreeSet<Mac>>,
}

impl TransitPlan {
    pub fn is_empty(&self) -> bool {
        self.vnis.is_empty()
    }
}

/// The transit plan of this host: nothing unless `relay_on`; else every VNI with
/// stacks on at least two peer hosts this host reaches directly (`direct`: their
/// underlay addresses), with FDB rows for those stacks' router MACs (destination:
/// `fdb_dst` of the peer's address, e.g. its tunnel address, else the address itself)
/// and the MACs per VNI. A host not reached directly contributes nothing, so a frame
/// is never relayed twice.
pub fn plan(
    relay_on: bool,
    peers: &[PeerHost],
    direct: &BTreeSet<Ipv4Addr>,
    fdb_dst: &BTreeMap<Ipv4Addr, Ipv4Addr>,
) -> TransitPlan {
    let mut out = TransitPlan::default();
    if !relay_on {
        return out;
    }
    let reached: Vec<&PeerHost> = peers.iter().filter(|p| direct.contains(&p.addr)).collect();
    let mut hosts_on: BTreeMap<Vni, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for p in &reached {
        for s in &p.stacks {
            hosts_on.entry(s.vni).or_default().insert(p.addr);
        }
    }
    out.vnis = hosts_on
        .into_iter()
        .filter(|(_, hosts)| hosts.len() >= 2)
        .map(|(vni, _)| vni)
        .collect();
    for p in &reached {
        let dst = crate::desired::fdb_dst(fdb_dst, p.addr);
        for s in p.stacks.iter().filter(|s| out.vnis.contains(&s.vni)) {
            let mac = s.router_mac();
            out.fdb.insert(FdbRow {
                vni: s.vni,
                mac,
                dst,
            });
            out.macs.entry(s.vni).or_default().insert(mac);
        }
    }
    out
}

/// The name of the chain and the set of one relayed VNI.
pub fn relay_name(vni: Vni) -> String {
    format!("relay_{vni}")
}

/// The rule's comment, by which [`counters`] finds its VNI.
fn comment(vni: Vni) -> String {
    format!("vrouter relay {vni}")
}

/// The device a VNI's frames arrive on and leave by.
pub fn device(vni: Vni) -> String {
    format!("vxlan{vni}")
}

/// The netdev table of `plan` (see the module doc), with `vxlan<vni>` device indexes
/// of the calling thread's namespace. A VNI whose device is missing is left out (see
/// [`apply`], which refuses that).
pub fn table_spec(table: &str, plan: &TransitPlan) -> TableSpec {
    table_spec_with(table, plan, &BTreeMap::new(), &|name| {
        nix::net::if_::if_nametoindex(name).ok()
    })
}

/// [`table_spec`] with the device indexes from `index` and each rule's counter
/// starting at `start` (packets, bytes) of its VNI, so that counts survive a
/// replacement.
pub fn table_spec_with(
    table: &str,
    plan: &TransitPlan,
    start: &BTreeMap<Vni, (u64, u64)>,
    index: &dyn Fn(&str) -> Option<u32>,
) -> TableSpec {
    let mut spec = TableSpec {
        family: Family::Netdev,
        name: table.to_string(),
        sets: Vec::new(),
        chains: Vec::new(),
    };
    for vni in &plan.vnis {
        let Some(ifindex) = index(&device(*vni)) else {
            continue;
        };
        let name = relay_name(*vni);
        spec.sets.push(SetSpec {
            name: name.clone(),
            elements: SetElements::Macs(
                plan.macs
                    .get(vni)
                    .map(|m| m.iter().copied().collect())
                    .unwrap_or_default(),
            ),
        });
        spec.chains.push(ChainSpec {
            name: name.clone(),
            hook: Some(BaseHook {
                hook: Hook::Ingress {
                    device: device(*vni),
                },
                priority: 0,
                policy_accept: true,
            }),
            rules: vec![RuleSpec {
                matches: vec![Match::EtherDaddrInSet { set: name }],
                counter: true,
                counter_start: start.get(vni).copied().unwrap_or((0, 0)),
                set_ct_mark: None,
                statements: Vec::new(),
                verdict: RuleVerdict::FwdToIndex(ifindex),
                comment: comment(*vni),
            }],
        });
    }
    spec
}

/// The layouts last applied, by (network namespace, table): a table already in the
/// kernel as planned is left alone, so its counters count on undisturbed.
static APPLIED: Mutex<BTreeMap<(u64, String), TableSpec>> = Mutex::new(BTreeMap::new());

/// The calling thread's network namespace (its inode), to key [`APPLIED`].
fn netns_id() -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0)
}

fn without_counts(t: &TableSpec) -> TableSpec {
    let mut t = t.clone();
    for c in &mut t.chains {
        for r in &mut c.rules {
            r.counter_start = (0, 0);
        }
    }
    t
}

/// Puts `plan`'s table `netdev <table>` in the calling thread's namespace, replacing
/// the table whole in one transaction (atomic: frames see the old sets or the new).
/// Idempotent: when the kernel already holds the planned table (as last applied here,
/// every relay rule present) nothing is sent; otherwise each rule's counter carries
/// over. An empty plan removes the table. Every `vxlan<vni>` of the plan must exist.
/// Call it before moving FDB rows away from direct, so that a MAC leaves its set first.
pub fn apply(table: &str, plan: &TransitPlan) -> anyhow::Result<()> {
    if plan.is_empty() {
        return remove(table);
    }
    let mut indexes = BTreeMap::new();
    for vni in &plan.vnis {
        let dev = device(*vni);
        let index = nix::net::if_::if_nametoindex(dev.as_str())
            .with_context(|| format!("relay on VNI {vni} needs device {dev}"))?;
        indexes.insert(dev, index);
    }
    let nft = Nft::connect_table(Family::Netdev, table)?;
    let in_kernel = nft.rule_counters()?;
    let start: BTreeMap<Vni, (u64, u64)> = in_kernel
        .iter()
        .filter_map(|r| {
            let vni = vni_of(&r.comment)?;
            Some((vni, (r.packets, r.bytes)))
        })
        .collect();
    let spec = table_spec_with(table, plan, &start, &|name| indexes.get(name).copied());
    let key = (netns_id(), table.to_string());
    let comments: BTreeSet<&str> = in_kernel.iter().map(|r| r.comment.as_str()).collect();
    let wanted: BTreeSet<String> = plan.vnis.iter().map(|v| comment(*v)).collect();
    let current = APPLIED
        .lock()
        .expect("transit cache")
        .get(&key)
        .is_some_and(|a| *a == without_counts(&spec))
        && comments.len() == in_kernel.len()
        && wanted.iter().all(|c| comments.contains(c.as_str()))
        && comments.len() == wanted.len();
    if current {
        return Ok(());
    }
    nft.replace_table(&spec)
        .with_context(|| format!("install relay table netdev {table}"))?;
    APPLIED
        .lock()
        .expect("transit cache")
        .insert(key, without_counts(&spec));
    Ok(())
}

/// The VNI of a relay rule's comment.
fn vni_of(comment: &str) -> Option<Vni> {
    comment.strip_prefix("vrouter relay ")?.parse().ok()
}

/// What each relay rule forwarded since its table first went in: (packets, bytes)
/// by VNI. A missing table has none.
pub fn counters(table: &str) -> anyhow::Result<BTreeMap<Vni, (u64, u64)>> {
    let nft = Nft::connect_table(Family::Netdev, table)?;
    Ok(nft
        .rule_counters()?
        .into_iter()
        .filter_map(|r| Some((vni_of(&r.comment)?, (r.packets, r.bytes))))
        .collect())
}

/// Deletes table `netdev <table>` with its sets and counters; a missing table is no
/// error.
pub fn remove(table: &str) -> anyhow::Result<()> {
    Nft::connect_table(Family::Netdev, table)?
        .delete_table()
        .with_context(|| format!("delete relay table netdev {table}"))?;
    APPLIED
        .lock()
        .expect("transit cache")
        .remove(&(netns_id(), table.to_string()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vrouter_state::{PeerOrigin, Prefix, StackName, StackSpec};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn vni(v: u32) -> Vni {
        Vni::new(v).unwrap()
    }

    fn stack(name: &str, v: u32, third: u8) -> StackSpec {
        StackSpec {
            name: StackName::new(name).unwrap(),
            vni: vni(v),
            router_ip: Ipv4Addr::new(10, third, 0, 254),
            prefixes: vec![Prefix::new(Ipv4Addr::new(10, third, 0, 0), 24).unwrap()],
        }
    }

    fn peer(addr: &str, stacks: Vec<StackSpec>) -> PeerHost {
        PeerHost {
            addr: ip(addr),
            stacks,
            source: PeerOrigin::Gossip,
            node: None,
            claims: BTreeMap::new(),
            generations: BTreeMap::new(),
            encryption: None,
        }
    }

    fn peers() -> Vec<PeerHost> {
        vec![
            peer("198.18.0.1", vec![stack("a", 1000, 1), stack("x", 3000, 9)]),
            peer("198.18.0.2", vec![stack("b", 1000, 2), stack("c", 2000, 3)]),
            peer("198.18.0.4", vec![stack("d", 2000, 4), stack("y", 3000, 8)]),
        ]
    }

    fn direct(list: &[&str]) -> BTreeSet<Ipv4Addr> {
        list.iter().map(|s| ip(s)).collect()
    }

    #[test]
    fn vnis_on_two_directly_reached_hosts_are_relayed() {
        let p = plan(
            true,
            &peers(),
            &direct(&["198.18.0.1", "198.18.0.2", "198.18.0.4"]),
            &BTreeMap::new(),
        );
        assert_eq!(p.vnis, [vni(1000), vni(2000), vni(3000)].into());
        assert_eq!(
            p.macs[&vni(1000)],
            [
                stack("a", 1000, 1).router_mac(),
                stack("b", 1000, 2).router_mac()
            ]
            .into()
        );
        assert_eq!(p.fdb.len(), 6);
        assert!(p.fdb.contains(&FdbRow {
            vni: vni(2000),
            mac: stack("d", 2000, 4).router_mac(),
            dst: ip("198.18.0.4"),
        }));
        assert!(p.fdb.iter().all(|r| !r.is_flood()));
    }

    #[test]
    fn a_host_not_reached_directly_contributes_nothing() {
        // 198.18.0.4 is not reached directly: VNI 2000 and 3000 have one host left.
        let p = plan(
            true,
            &peers(),
            &direct(&["198.18.0.1", "198.18.0.2"]),
            &BTreeMap::new(),
        );
        assert_eq!(p.vnis, [vni(1000)].into());
        assert_eq!(p.fdb.len(), 2);
        assert!(p.fdb.iter().all(|r| r.dst != ip("198.18.0.4")));
        assert!(!p.macs.contains_key(&vni(2000)));
        // A single reached host relays nothing.
        let p = plan(true, &peers(), &direct(&["198.18.0.1"]), &BTreeMap::new());
        assert!(p.is_empty() && p.fdb.is_empty() && p.macs.is_empty());
    }

    #[test]
    fn rows_point_at_the_tunnel_address_of_encrypted_peers() {
        let tunnels: BTreeMap<_, _> = [(ip("198.18.0.2"), ip("100.64.0.2"))].into();
        let p = plan(
            true,
            &peers(),
            &direct(&["198.18.0.1", "198.18.0.2"]),
            &tunnels,
        );
        let b = stack("b", 1000, 2).router_mac();
        let a = stack("a", 1000, 1).router_mac();
        assert_eq!(
            p.fdb,
            [
                FdbRow {
                    vni: vni(1000),
                    mac: a,
                    dst: ip("198.18.0.1")
                },
                FdbRow {
                    vni: vni(1000),
                    mac: b,
                    dst: ip("100.64.0.2")
                },
            ]
            .into()
        );
    }

    #[test]
    fn relay_off_plans_nothing() {
        let p = plan(
            false,
            &peers(),
            &direct(&["198.18.0.1", "198.18.0.2", "198.18.0.4"]),
            &BTreeMap::new(),
        );
        assert_eq!(p, TransitPlan::default());
    }

    #[test]
    fn the_table_has_a_chain_and_a_set_per_vni() {
        let p = plan(
            true,
            &peers(),
            &direct(&["198.18.0.1", "198.18.0.2", "198.18.0.4"]),
            &BTreeMap::new(),
        );
        let index = |name: &str| match name {
            "vxlan1000" => Some(7),
            "vxlan2000" => Some(8),
            _ => None,
        };
        let start = [(vni(2000), (3, 300))].into();
        let t = table_spec_with("vrouter_relay", &p, &start, &index);
        assert_eq!(t.family, Family::Netdev);
        assert_eq!(t.name, "vrouter_relay");
        // vxlan3000 is missing: left out.
        let names: Vec<&str> = t.chains.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["relay_1000", "relay_2000"]);
        let c = &t.chains[0];
        assert_eq!(
            c.hook,
            Some(BaseHook {
                hook: Hook::Ingress {
                    device: "vxlan1000".into()
                },
                priority: 0,
                policy_accept: true,
            })
        );
        let r = &c.rules[0];
        assert_eq!(
            r.matches,
            [Match::EtherDaddrInSet {
                set: "relay_1000".into()
            }]
        );
        assert!(r.counter);
        assert_eq!(r.verdict, RuleVerdict::FwdToIndex(7));
        assert_eq!(r.comment, "vrouter relay 1000");
        assert_eq!(vni_of(&r.comment), Some(vni(1000)));
        assert_eq!(t.chains[1].rules[0].counter_start, (3, 300));
        assert_eq!(t.chains[1].rules[0].verdict, RuleVerdict::FwdToIndex(8));
        assert_eq!(
            t.sets[0],
            SetSpec {
                name: "relay_1000".into(),
                elements: SetElements::Macs(p.macs[&vni(1000)].iter().copied().collect()),
            }
        );
        assert_eq!(t.sets.len(), 2);
    }
}
