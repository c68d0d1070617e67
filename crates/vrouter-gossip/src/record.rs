//! What a node tells the mesh about itself: a versioned record, and the identity it
//! uses in SWIM membership.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use vrouter_state::StackSpec;

/// A node's stable id, kept in the state directory across restarts.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for NodeId {
    type Err = String;
    fn from_str(s: &str) -> Result<NodeId, String> {
        let s = s.trim();
        if s.len() != 16 {
            return Err(format!("node id {s:?} is not 16 hex digits"));
        }
        u64::from_str_radix(s, 16)
            .map(NodeId)
            .map_err(|_| format!("node id {s:?} is not 16 hex digits"))
    }
}

/// A stack as announced, with the time its node first claimed it. Between two
/// overlapping claims the earlier one wins, so a newcomer cannot take a prefix someone
/// already holds whatever its node id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedStack {
    pub spec: StackSpec,
    /// Milliseconds since the Unix epoch when this node first announced the stack.
    pub claimed_ms: u64,
}

/// Everything a node publishes. The owner raises `version` on every change; every other
/// node keeps the highest version it has seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub version: u64,
    /// Where the node's gossip is reached (advertised, may differ from its bind address).
    pub gossip_addr: SocketAddrV4,
    /// Where VXLAN packets for its stacks go.
    pub underlay: Ipv4Addr,
    pub vxlan_port: u16,
    pub stacks: Vec<ClaimedStack>,
    /// Set by an explicit leave: the node's stacks are withdrawn at once everywhere.
    pub left: bool,
    /// The bump of the node's SWIM identity (see [`Member`]) when this version was made:
    /// a node that learns a record before it learns the member can add the member to
    /// its membership directly.
    pub bump: u64,
}

impl NodeRecord {
    pub fn prefix_count(&self) -> usize {
        self.stacks.iter().map(|s| s.spec.prefixes.len()).sum()
    }
}

/// The SWIM identity: the stable id plus where to reach it and a bump that makes every
/// start (and every rejoin after being declared down) a new incarnation that wins over
/// the old one. Foca keys members by `id`, so a new address is a rename, not a new member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub addr: SocketAddrV4,
    pub bump: u64,
}

impl foca::Identity for Member {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        Some(Member {
            bump: self.bump.saturating_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> NodeId {
        self.id
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}
