//! Which gossip members' stacks are routed from this host. Pure: the controller
//! observes (gossip snapshot, probe files, the clock) and hands the facts in; this
//! decides; the controller writes the events and discovery.json from the result.
//!
//! A member's stacks are routed unless this host left the mesh, the member left, or
//! its membership failed and none of its routers answered a local router's overlay
//! probe recently (the datapath is headless: a host whose discovery is down keeps its
//! routes while its routers answer). After a restart, the previous run's gossip peers
//! stay routed until gossip knows them again or the remembering window has passed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use vrouter_gossip::MemberView;
use vrouter_state::{GossipMember, MemberState, PeerHost, PeerOrigin, ProbesFile};

/// What the local routers' overlay probes say answers right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reachability {
    /// Underlay addresses of hosts with a router that answered.
    pub hosts: BTreeSet<Ipv4Addr>,
    /// Router addresses that answered.
    pub routers: BTreeSet<Ipv4Addr>,
}

/// Reads the probe files written by the local routers; stale files (or ones dated in
/// the future beyond the freshness window) count for nothing.
pub fn reachability(probes: &[ProbesFile], now_ms: u64) -> Reachability {
    let mut r = Reachability::default();
    for f in probes {
        if !f.is_fresh(now_ms) {
            continue;
        }
        for p in f.peers.iter().filter(|p| p.reachable) {
            r.hosts.insert(p.host);
            r.routers.insert(p.router_ip);
        }
    }
    r
}

/// Everything the decision needs, observed by the controller.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub members: &'a [MemberView],
    pub reachable: &'a Reachability,
    /// This host left the mesh on purpose: nothing is routed.
    pub left_mesh: bool,
    /// Still within the remembering window after a start.
    pub remembering: bool,
    /// Gossip peers the previous run routed, not yet known to gossip.
    pub remembered: &'a [PeerHost],
    /// Node ids whose stacks were routed at the previous decision.
    pub routed_before: &'a BTreeSet<String>,
}

/// A change in which nodes are routed, for events.log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Withdrawn { node: String, why: String },
    Routed { node: String },
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Membership {
    /// The gossip peers to route (input to [`crate::desired::compute`]).
    pub peers: Vec<PeerHost>,
    /// Every member as discovery.json shows it.
    pub members: Vec<GossipMember>,
    /// Node ids routed now.
    pub routed: BTreeSet<String>,
    /// What is still remembered from the previous run (empty once the window closed).
    pub remembered: Vec<PeerHost>,
    pub changes: Vec<Change>,
}

pub fn member_state(s: vrouter_gossip::MemberState) -> MemberState {
    use vrouter_gossip::MemberState as G;
    match s {
        G::Alive => MemberState::Alive,
        G::Suspect => MemberState::Suspect,
        G::Down => MemberState::Down,
        G::Left => MemberState::Left,
        G::Unknown => MemberState::Unknown,
    }
}

/// What a record announces about its encryption, as discovery.json holds it.
pub fn peer_encryption(e: &vrouter_gossip::record::Encryption) -> vrouter_state::PeerEncryption {
    let text = |k: [u8; 32]| vrouter_wg::PublicKey(k).to_string();
    vrouter_state::PeerEncryption {
        mode: e.mode.clone(),
        public_key: e.public_key.map(text),
        next_public_key: e.next_public_key.map(text),
        tunnel: e.tunnel,
        wg_port: e.wg_port,
    }
}

/// Decides which members are routed. Pure.
pub fn decide(f: Facts) -> Membership {
    let mut out = Membership::default();
    for m in f.members {
        let r = &m.record;
        let reachable = f.reachable.hosts.contains(&r.underlay)
            || r.stacks
                .iter()
                .any(|s| f.reachable.routers.contains(&s.spec.router_ip));
        let state = member_state(m.state);
        let routed = !f.left_mesh
            && match state {
                MemberState::Left => false,
                MemberState::Down => reachable,
                _ => true,
            };
        let id = r.id.to_string();
        if routed && !r.stacks.is_empty() {
            out.routed.insert(id.clone());
            out.peers.push(PeerHost {
                addr: r.underlay,
                stacks: r.stacks.iter().map(|s| s.spec.clone()).collect(),
                source: PeerOrigin::Gossip,
                node: Some(id.clone()),
                claims: r
                    .stacks
                    .iter()
                    .map(|s| (s.spec.name.clone(), s.claimed_ms))
                    .collect::<BTreeMap<_, _>>(),
                generations: r
                    .stacks
                    .iter()
                    .filter(|s| s.generation != 0)
                    .map(|s| (s.spec.name.clone(), s.generation))
                    .collect::<BTreeMap<_, _>>(),
                encryption: r.encryption.as_ref().map(peer_encryption),
            });
        }
        out.members.push(GossipMember {
            node_id: id,
            addr: r.gossip_addr.to_string(),
            underlay: r.underlay,
            state,
            stacks: r.stacks.iter().map(|s| s.spec.name.clone()).collect(),
            version: r.version,
            datapath_reachable: reachable,
            routed,
        });
    }
    if f.remembering && !f.left_mesh {
        let known: BTreeSet<&str> = out.members.iter().map(|m| m.node_id.as_str()).collect();
        out.remembered = f
            .remembered
            .iter()
            .filter(|p| !known.contains(p.node.as_deref().unwrap_or_default()))
            .cloned()
            .collect();
        for p in &out.remembered {
            out.routed.insert(p.node.clone().unwrap_or_default());
            out.peers.push(p.clone());
        }
    }
    for gone in f.routed_before.difference(&out.routed) {
        let why = out
            .members
            .iter()
            .find(|m| &m.node_id == gone)
            .map(|m| match &m.state {
                MemberState::Left => "it left the mesh".to_string(),
                MemberState::Down => {
                    "its membership failed and its routers do not answer overlay probes".to_string()
                }
                s => format!("state {s}"),
            })
            .unwrap_or_else(|| "it is no longer known".into());
        out.changes.push(Change::Withdrawn {
            node: gone.clone(),
            why,
        });
    }
    for back in out.routed.difference(f.routed_before) {
        out.changes.push(Change::Routed { node: back.clone() });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vrouter_gossip::{ClaimedStack, MemberState as G, NodeId, NodeRecord};
    use vrouter_state::{PeerProbe, StackName, StackSpec, Vni};

    fn view(id: u64, underlay: &str, router: &str, state: G) -> MemberView {
        let spec = StackSpec {
            name: StackName::new(&format!("s{id}")).unwrap(),
            vni: Vni::new(1000).unwrap(),
            prefixes: vec![format!("10.{id}.0.0/24").parse().unwrap()],
            router_ip: router.parse().unwrap(),
        };
        MemberView {
            record: NodeRecord {
                id: NodeId(id),
                version: 3,
                gossip_addr: format!("{underlay}:7946").parse().unwrap(),
                underlay: underlay.parse().unwrap(),
                vxlan_port: 4789,
                stacks: vec![ClaimedStack {
                    spec,
                    claimed_ms: 100 + id,
                    generation: id,
                }],
                left: state == G::Left,
                bump: 1,
                encryption: None,
                nat: None,
                relay: None,
            },
            state,
            since: 0,
        }
    }

    fn facts<'a>(
        members: &'a [MemberView],
        reachable: &'a Reachability,
        routed_before: &'a BTreeSet<String>,
    ) -> Facts<'a> {
        Facts {
            members,
            reachable,
            left_mesh: false,
            remembering: false,
            remembered: &[],
            routed_before,
        }
    }

    fn node(id: u64) -> String {
        NodeId(id).to_string()
    }

    #[test]
    fn alive_and_suspect_are_routed_left_is_not() {
        let members = [
            view(1, "198.18.0.1", "10.1.0.254", G::Alive),
            view(2, "198.18.0.2", "10.2.0.254", G::Suspect),
            view(3, "198.18.0.3", "10.3.0.254", G::Left),
            view(4, "198.18.0.4", "10.4.0.254", G::Unknown),
        ];
        let none = Reachability::default();
        let before = BTreeSet::new();
        let m = decide(facts(&members, &none, &before));
        let routed: Vec<_> = m.peers.iter().map(|p| p.node.clone().unwrap()).collect();
        assert_eq!(routed, vec![node(1), node(2), node(4)]);
        assert!(m.peers.iter().all(|p| p.source == PeerOrigin::Gossip));
        assert_eq!(m.peers[0].claims[&StackName::new("s1").unwrap()], 101);
        assert_eq!(m.peers[0].generations[&StackName::new("s1").unwrap()], 1);
        let states: Vec<_> = m.members.iter().map(|g| g.state.clone()).collect();
        assert_eq!(
            states,
            vec![
                MemberState::Alive,
                MemberState::Suspect,
                MemberState::Left,
                MemberState::Unknown
            ]
        );
        assert!(!m.members[2].routed);
        assert_eq!(
            m.changes,
            vec![
                Change::Routed { node: node(1) },
                Change::Routed { node: node(2) },
                Change::Routed { node: node(4) }
            ]
        );
    }

    #[test]
    fn a_down_member_stays_routed_while_its_routers_answer() {
        let members = [
            view(1, "198.18.0.1", "10.1.0.254", G::Down),
            view(2, "198.18.0.2", "10.2.0.254", G::Down),
            view(3, "198.18.0.3", "10.3.0.254", G::Down),
        ];
        let reachable = Reachability {
            hosts: ["198.18.0.1".parse().unwrap()].into(),
            routers: ["10.2.0.254".parse().unwrap()].into(),
        };
        let before: BTreeSet<String> = [node(1), node(2), node(3)].into();
        let m = decide(facts(&members, &reachable, &before));
        assert_eq!(m.routed, [node(1), node(2)].into());
        assert!(m.members[0].datapath_reachable && m.members[1].datapath_reachable);
        assert_eq!(
            m.changes,
            vec![Change::Withdrawn {
                node: node(3),
                why: "its membership failed and its routers do not answer overlay probes".into()
            }]
        );
    }

    #[test]
    fn leaving_the_mesh_routes_nothing_and_says_why_for_each() {
        let members = [view(1, "198.18.0.1", "10.1.0.254", G::Alive)];
        let none = Reachability::default();
        let before: BTreeSet<String> = [node(1), node(9)].into();
        let mut f = facts(&members, &none, &before);
        f.left_mesh = true;
        let m = decide(f);
        assert!(m.peers.is_empty() && m.routed.is_empty());
        assert!(!m.members[0].routed);
        assert_eq!(
            m.changes,
            vec![
                Change::Withdrawn {
                    node: node(1),
                    why: "state alive".into()
                },
                Change::Withdrawn {
                    node: node(9),
                    why: "it is no longer known".into()
                }
            ]
        );
    }

    #[test]
    fn remembered_peers_stay_until_gossip_knows_them_or_the_window_closes() {
        let members = [view(1, "198.18.0.1", "10.1.0.254", G::Left)];
        let old = |id: u64| PeerHost {
            addr: "198.18.0.9".parse().unwrap(),
            stacks: Vec::new(),
            source: PeerOrigin::Gossip,
            node: Some(node(id)),
            claims: BTreeMap::new(),
            generations: BTreeMap::new(),
            encryption: None,
        };
        let remembered = [old(1), old(7)];
        let none = Reachability::default();
        let before = BTreeSet::new();
        let mut f = facts(&members, &none, &before);
        f.remembering = true;
        f.remembered = &remembered;
        let m = decide(f);
        // Node 1 is known (and left): gossip's word wins. Node 7 is kept.
        assert_eq!(m.remembered, vec![old(7)]);
        assert_eq!(m.routed, [node(7)].into());
        f.remembering = false;
        let m = decide(f);
        assert!(m.remembered.is_empty() && m.routed.is_empty());
    }

    #[test]
    fn only_fresh_probe_files_count() {
        let file = |updated_ms: u64, host: &str, reachable: bool| ProbesFile {
            schema: 1,
            generation: 1,
            stack: StackName::new("a").unwrap(),
            updated_ms,
            interval_ms: 1000,
            peers: vec![{
                let mut p: PeerProbe = serde_json::from_str(
                    r#"{"router_ip":"10.2.0.254","stack":"b","host":"198.18.0.2","last_ok_ms":null,"rtt_us":null,"sent":1,"received":1,"reachable":false}"#,
                )
                .unwrap();
                p.host = host.parse().unwrap();
                p.reachable = reachable;
                p
            }],
            health: None,
            traffic: Vec::new(),
            events: None,
            acl: Vec::new(),
        };
        let now = 1_000_000;
        let r = reachability(
            &[
                file(now - 1_000, "198.18.0.2", true),
                file(now - 10_000, "198.18.0.3", true),
                file(now + 60_000, "198.18.0.4", true),
                file(now, "198.18.0.5", false),
            ],
            now,
        );
        assert_eq!(r.hosts, ["198.18.0.2".parse().unwrap()].into());
    }
}
