//! The contents of the state directory's files. Both binaries read and write these;
//! every file carries a schema version and a generation counter.

use crate::kinds::{EncryptionMode, EventKind, MemberState, PeerOrigin};
use crate::types::{Mac, Prefix, StackName, StackSpec, Vni};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Version of the JSON schema in discovery.json and routes.json. A reader that finds
/// another version keeps its last good state and reports it.
pub const SCHEMA_VERSION: u32 = 1;

pub const DISCOVERY_FILE: &str = "discovery.json";
pub const ROUTES_FILE: &str = "routes.json";
pub const EVENTS_FILE: &str = "events.log";
pub const STATE_LOCK_FILE: &str = "state.lock";
pub const LEADER_LOCK_FILE: &str = "leader.lock";
pub const ATTACH_SOCKET: &str = "discovery.sock";

/// discovery.json: what discovery knows about this host, its peers and its stacks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscoveryFile {
    pub schema: u32,
    pub generation: u64,
    /// Milliseconds since the Unix epoch.
    pub updated_ms: u64,
    pub host: HostInfo,
    pub peers: Vec<PeerHost>,
    pub local_stacks: Vec<LocalStack>,
    /// Prefixes or stacks that were refused, with the reason.
    pub refused: Vec<Refusal>,
    /// VNIs whose `vxlan<VNI>` device this discovery created and owns.
    #[serde(default)]
    pub devices: Vec<Vni>,
    /// Count of kernel changes made by timer reconciles with no input change (drift).
    #[serde(default)]
    pub drift_repairs: u64,
    /// The gossip mesh as this host sees it (absent in static-only mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gossip: Option<GossipStatus>,
    /// How this host's local stacks reach the overlay (absent: written by a version
    /// without port steering, which is the `rule` path for every stack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steering: Option<SteeringStatus>,
    /// The overlay's encryption (`VROUTER_ENCRYPTION`) and each peer's state (absent:
    /// written by a version without encryption, which is `off`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionStatus>,
    /// This host's addresses: local, observed by peers, advertised (absent: written by
    /// a version without reflection, or static-only mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<AddressesStatus>,
    /// The path to each probed gossip peer (absent: no gossip, or an older version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<PathStatus>>,
    /// This host as a relay (absent: no gossip, or an older version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayStatus>,
}

/// This host's addresses (issue 17).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressesStatus {
    /// The underlay interface's address.
    pub local: Ipv4Addr,
    /// The address peers see this host's packets come from, when a strict majority of
    /// the peers outside its NAT agree on one that differs from `local`.
    pub observed: Option<Ipv4Addr>,
    /// The address this host announces (VROUTER_ADVERTISE_ADDR or `local`).
    pub advertised: Ipv4Addr,
    /// VROUTER_ADVERTISE_ADDR pins the address (no reflection).
    pub pinned: bool,
    /// The NAT in front of this host also rewrites ports.
    pub port_translated: bool,
}

/// How this host's overlay traffic reaches one gossip peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathStatus {
    /// Its node id (16 hex digits).
    pub node: String,
    /// The address it announces.
    pub peer_addr: Ipv4Addr,
    /// The address this host sends to for it.
    pub addr_in_use: Ipv4Addr,
    /// `direct`, `relay` or `unreachable`.
    pub via: String,
    pub relay_node: Option<String>,
    pub relay_addr: Option<Ipv4Addr>,
    /// Probe RTT (through the relay: to the relay plus the relay's to the peer).
    pub rtt_ms: Option<f64>,
    /// Monotonic ms of discovery's process when `via` last changed.
    pub since_ms: u64,
    /// Why it is unreachable: `no_relay` or `nat_port_translated`.
    pub code: Option<String>,
}

/// This host as a relay (`VROUTER_RELAY`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatus {
    pub offered: bool,
    /// VNIs this host forwards between peers.
    pub vnis: Vec<Vni>,
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    /// The counters per VNI.
    #[serde(default)]
    pub per_vni: Vec<RelayVni>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayVni {
    pub vni: Vni,
    pub packets: u64,
    pub bytes: u64,
}

/// Encryption as discovery last applied it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncryptionStatus {
    pub mode: EncryptionMode,
    /// `kernel` or `userspace` while the WireGuard device runs; null when off (or it
    /// could not be opened).
    pub backend: Option<String>,
    /// The WireGuard interface (`VROUTER_WG_DEVICE`).
    pub device: String,
    /// This host's public key (base64), and the next one during a key rotation.
    pub public_key: Option<String>,
    pub next_public_key: Option<String>,
    pub tunnel_address: Option<Ipv4Addr>,
    pub listen_port: Option<u16>,
    /// MTU of the VXLAN devices (and so of the routers' overlay links).
    pub overlay_mtu: u32,
    pub peers: Vec<EncryptionPeer>,
}

/// One peer host's encryption state as this host sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncryptionPeer {
    /// Its underlay address.
    pub host: Ipv4Addr,
    /// `encrypted`, `plain` or `refused`.
    pub state: String,
    /// Why it is plain or refused.
    pub reason: Option<String>,
    pub public_key: Option<String>,
    pub tunnel_address: Option<Ipv4Addr>,
    /// Seconds since the latest WireGuard handshake (null: none yet, or not encrypted).
    pub last_handshake_age_s: Option<f64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// What a peer host announces about its encryption (its gossip record, or the static
/// file's `public_key` / `wg_port`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PeerEncryption {
    /// Its `VROUTER_ENCRYPTION` (a static peer with a key counts as `prefer`).
    pub mode: EncryptionMode,
    /// Its WireGuard public key (base64); none when its mode is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// During its key rotation: the key it moves to (peers switch to it at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<String>,
    /// Its tunnel address (announced by the host, or computed for a static peer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<Ipv4Addr>,
    /// UDP port its WireGuard listens on.
    pub wg_port: u16,
}

/// Port steering as discovery last applied it (`VROUTER_STEERING`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SteeringStatus {
    /// The configured mode: `ports` (the default) or `rule`.
    pub mode: SteeringMode,
    /// The netdev table discovery programs (`nft list table netdev <table>`).
    pub table: String,
    /// Per local stack, the mode it runs in now and why when that is not the
    /// configured one.
    pub stacks: BTreeMap<StackName, StackSteering>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackSteering {
    pub mode: SteeringMode,
    /// Why the stack is not steered at its ports (router port not found yet, the
    /// kernel refused the table, ...); absent when it runs in the configured mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The host-side ports steered for this stack (service ports and the router's).
    #[serde(default)]
    pub ports: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SteeringMode {
    /// netdev chains at the ports (the default).
    Ports,
    /// The host's policy rule per stack bridge (the fallback, and every stack of an
    /// older version).
    Rule,
}

/// This host's view of the gossip mesh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GossipStatus {
    /// This host's stable node id (16 hex digits, kept in the state directory).
    pub node_id: String,
    /// The gossip address other hosts reach this host at.
    pub addr: String,
    /// Fingerprints of the accepted keys, the sending key first.
    pub keys: Vec<String>,
    pub insecure: bool,
    pub members: Vec<GossipMember>,
    /// Packet and rejection counters since start.
    pub counters: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GossipMember {
    pub node_id: String,
    /// Gossip address.
    pub addr: String,
    /// Underlay (VXLAN) address.
    pub underlay: Ipv4Addr,
    pub state: MemberState,
    pub stacks: Vec<StackName>,
    pub version: u64,
    /// Whether a local router got an overlay probe answer from this host's routers
    /// recently (the datapath's own liveness, separate from membership).
    pub datapath_reachable: bool,
    /// Whether its stacks are routed from this host now.
    pub routed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub underlay_interface: String,
    pub local_addr: Ipv4Addr,
    pub advertise_addr: Ipv4Addr,
    pub vxlan_port: u16,
    pub underlay_mtu: u32,
    /// MTU of the VXLAN devices: underlay MTU - 50, or - 130 with encryption (absent:
    /// written by an older version, underlay MTU - 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_mtu: Option<u32>,
    /// Process id of the active discovery (for operators; not used for locking).
    pub pid: u32,
}

/// A remote host and the stacks it carries.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerHost {
    /// The host's underlay address: where VXLAN packets for its stacks go.
    pub addr: Ipv4Addr,
    pub stacks: Vec<StackSpec>,
    /// Where this peer came from.
    pub source: PeerOrigin,
    /// Gossip only: the node id of the host (ties between equal claims go by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Gossip only: when each stack was first claimed (ms since the epoch); between two
    /// overlapping prefixes the earlier claim wins. Static peers have none and rank as 0.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<StackName, u64>,
    /// Gossip only: each stack's placement generation (absent: 0, as from an older
    /// version or a static peer). Between copies of one stack on several hosts the
    /// higher generation wins (see docs/ARCHITECTURE.md "Placement generations").
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub generations: BTreeMap<StackName, u64>,
    /// Its encryption (absent: an older version, or a static peer without a key; both
    /// count as `off`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<PeerEncryption>,
}

/// A stack whose router runs on this host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalStack {
    #[serde(flatten)]
    pub spec: StackSpec,
    pub router_mac: Mac,
    /// Host bridge whose subnet holds the router's IP (None until found).
    pub bridge: Option<String>,
    /// Whether the router's attach connection is open right now.
    pub connected: bool,
    /// Highest routes.json generation the router has acknowledged.
    pub acked_generation: u64,
    /// The stack's placement generation on this host (0 in static mode, or written
    /// by an older version).
    #[serde(default)]
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub stack: StackName,
    pub prefix: Option<Prefix>,
    pub reason: String,
    /// Machine-readable cause: "prefix_cap", "own_address", "duplicate_stack",
    /// "superseded" (a local copy that another host's copy of the stack outranks),
    /// "default_route", "reserved_prefix", "underlay_network", "host_network",
    /// "router_outside_prefixes", "router_ip_clash" or "overlap".
    #[serde(default)]
    pub code: String,
}

/// routes.json: for each local stack, the remote routes its router must install.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesFile {
    pub schema: u32,
    pub generation: u64,
    pub stacks: BTreeMap<StackName, StackRoutes>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackRoutes {
    pub vni: Option<Vni>,
    pub routes: Vec<RemoteRoute>,
}

/// One remote prefix, reached through a remote router over the overlay.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RemoteRoute {
    pub prefix: Prefix,
    /// The stack that owns the prefix.
    pub stack: StackName,
    /// Remote router's overlay address (the route's gateway, onlink).
    pub via: Ipv4Addr,
    /// Remote router's MAC (the permanent neighbour entry).
    pub mac: Mac,
    /// Underlay address of the host carrying the remote stack.
    pub host: Ipv4Addr,
    /// The remote stack's router lives on this host (reached through a sibling macvlan).
    pub same_host: bool,
}

/// One line of events.log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// "discovery" or "router/<stack>".
    pub source: String,
    /// What happened, machine-readable.
    pub kind: EventKind,
    /// Short machine-readable cause, e.g. "overlap" for a refusal, "fdb_row_missing"
    /// for a withdrawn route, "reconcile_failed" for an error. Events without a more
    /// specific cause carry their kind. Absent in lines written by older versions.
    #[serde(default)]
    pub reason: String,
    /// One line for an operator: what happened and, for problems, the fix.
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<StackName>,
}

impl Event {
    pub fn new(source: impl Into<String>, kind: EventKind, message: impl Into<String>) -> Event {
        Event {
            ts_ms: now_ms(),
            source: source.into(),
            reason: kind.as_str().to_string(),
            kind,
            message: message.into(),
            stack: None,
        }
    }

    /// Sets the machine-readable cause (the kind by default).
    pub fn because(mut self, reason: impl Into<String>) -> Event {
        self.reason = reason.into();
        self
    }

    pub fn for_stack(mut self, stack: &StackName) -> Event {
        self.stack = Some(stack.clone());
        self
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Files that carry a schema version and a generation, so readers can check them.
pub trait Versioned {
    fn schema(&self) -> u32;
    fn generation(&self) -> u64;
}

impl Versioned for DiscoveryFile {
    fn schema(&self) -> u32 {
        self.schema
    }
    fn generation(&self) -> u64 {
        self.generation
    }
}

impl Versioned for RoutesFile {
    fn schema(&self) -> u32 {
        self.schema
    }
    fn generation(&self) -> u64 {
        self.generation
    }
}
