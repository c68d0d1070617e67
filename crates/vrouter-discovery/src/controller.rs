//! The control loop's state and its one reconcile: compute the desired host state,
//! diff it against kernel dumps, apply the difference, publish the state files.

use crate::attach::Peer;
use crate::desired::{self, FdbRow, HostView, LocalRouter};
use crate::diff::{self, Change, DeviceAction, DeviceSpec};
use crate::gossip::GossipHandle;
use crate::membership;
use crate::peers::PeerSource;
use crate::registry::{ConnId, Registry};
use crate::retention::Retention;
use crate::settings::Settings;
use crate::steer::{self, StackFacts};
use crate::underlay::{self, Underlay};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;
use tracing::{info, warn};
use vrouter_kernel::{FdbEntry, Kernel, KernelError, Link, Route, Rule, VxlanSpec};
use vrouter_state::attach::{DiscoveryMessage, NetnsKey, Registration};
use vrouter_state::crash;
use vrouter_state::{
    now_ms, DiscoveryFile, Event, EventKind, GossipStatus, HostInfo, LocalStack, Mac, PeerHost,
    Prefix, RoutesFile, StackName, StackRoutes, StackSteering, StateDir, SteeringMode,
    SteeringStatus, Vni, RTPROT_VROUTER, SCHEMA_VERSION,
};

/// How long a restarted discovery keeps routing the previous run's gossip peers that
/// gossip has not reported yet.
const REMEMBER_FOR: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Controller {
    settings: Settings,
    dir: StateDir,
    kernel: Kernel,
    source: Box<dyn PeerSource>,
    peers: Vec<PeerHost>,
    pub registry: Registry,
    retention: Retention,
    published: BTreeMap<StackName, StackRoutes>,
    routes_generation: u64,
    discovery_generation: u64,
    last_discovery: Option<DiscoveryFile>,
    owned_vnis: BTreeSet<Vni>,
    /// VNIs whose device could not be made, with the operator's message.
    failed_vnis: BTreeMap<Vni, String>,
    underlay: Underlay,
    advertise: Ipv4Addr,
    reported: BTreeSet<String>,
    refusals: Vec<vrouter_state::Refusal>,
    /// Local stacks refused by a limit, with the reason (for /readyz).
    refused_local: Vec<String>,
    drift_repairs: u64,
    /// The gossip mesh, when configured; static peers still apply beside it.
    gossip: Option<GossipHandle>,
    /// When each local stack was first claimed and its placement generation (kept in
    /// the private directory's claims.json).
    claims: BTreeMap<StackName, crate::placement::Claim>,
    /// The highest placement generation seen of each stack name (generations.json).
    generations: crate::placement::Remembered,
    /// Every stack copy in the current gossip records (any member state), by name:
    /// what a fresh claim numbers itself above.
    gossip_copies: BTreeMap<StackName, Vec<crate::placement::Copy>>,
    /// Local stacks another host's copy outranks (withdrawn here), with the winner.
    superseded: BTreeMap<StackName, crate::placement::Copy>,
    /// Placement changes already reported (stack_moved, stack_superseded).
    placement_tracker: crate::placement::Tracker,
    /// The copies a running local copy lost to (see `placement::update_claims`).
    yielded: BTreeMap<StackName, crate::placement::Copy>,
    /// Static and gossip peers routed in the last reconcile.
    all_peers: Vec<PeerHost>,
    gossip_status: Option<GossipStatus>,
    /// Gossip node ids whose stacks were routed at the last reconcile.
    routed_nodes: BTreeSet<String>,
    left_mesh: bool,
    /// Gossip peers the previous run routed (from discovery.json), kept routed after a
    /// restart until gossip knows them again or `REMEMBER_FOR` has passed: a restart
    /// must not withdraw anything (the datapath is headless).
    remembered: Vec<PeerHost>,
    started: Instant,
    /// routes.json holds what this process computes (it wrote it, or found it equal).
    routes_current: bool,
    /// The last reconcile's state-directory writes or writability check failed: why.
    state_error: Option<String>,
    /// The first state-directory failure of the reconcile in progress.
    state_failure: Option<String>,
    /// Devices the last reconcile made or found, which must stay.
    devices_up: Vec<Vni>,
    /// Port steering: the local stacks of the last reconcile (the fast steering pass
    /// between reconciles works from them).
    last_local: Vec<LocalRouter>,
    /// The steering table last put in the kernel (None: none, or deleted).
    steer_applied: Option<vrouter_kernel::TableSpec>,
    /// Learned MACs per bridge that aged out while steered (see `steer::remember`).
    steer_memory: BTreeMap<u32, BTreeMap<Mac, u32>>,
    /// The steering status discovery.json shows.
    steer_status: Option<SteeringStatus>,
    /// The last steering failure reported (events are sent on change).
    steer_error: Option<String>,
    /// Rule mode: the table was deleted once (a ports-mode run may have left it).
    steer_cleared: bool,
    /// Encryption's runtime (None when VROUTER_ENCRYPTION=off).
    tunnel: Option<crate::wireguard::Tunnel>,
    /// The last reconcile's per-peer encryption decisions.
    enc_plan: crate::encryption::Plan,
    /// discovery.json's `encryption`.
    enc_status: Option<vrouter_state::EncryptionStatus>,
    /// Encryption events already written (refusals, plain peers, collisions), so each
    /// is written once per episode.
    enc_reported: BTreeSet<String>,
    /// Issue 17: the last path decision per probed gossip peer.
    paths: BTreeMap<vrouter_gossip::NodeId, crate::paths::PeerPath>,
    /// The gossip members as the path decision reads them, and this host's probe
    /// views (from the last gossip snapshot).
    path_members: Vec<crate::paths::Member>,
    path_views: BTreeMap<vrouter_gossip::NodeId, crate::paths::View>,
    /// The probe targets last handed to gossip.
    path_targets: BTreeSet<vrouter_gossip::NodeId>,
    /// When the path decision may change without new input (see `paths::next_due`).
    path_due: Option<Instant>,
    /// This host's observed address and whether its NAT rewrites ports (reflection).
    observed: Option<Ipv4Addr>,
    port_translated: bool,
    /// Peers that see this host at its local address (inside its NAT).
    inside: BTreeSet<vrouter_gossip::NodeId>,
    /// discovery.json's `addresses`, `paths` and `relay`.
    addresses: Option<vrouter_state::AddressesStatus>,
    path_status: Option<Vec<vrouter_state::PathStatus>>,
    relay_status: Option<vrouter_state::RelayStatus>,
    /// The relay (transit) table is in the kernel.
    transit_applied: bool,
    /// The last relay table failure reported (events on change).
    relay_error: Option<String>,
}

impl Controller {
    /// Starts from the previous run's files, so a restart or a standby's takeover
    /// computes the same state and leaves the kernel alone.
    pub async fn new(
        settings: Settings,
        dir: StateDir,
        kernel: Kernel,
        mut source: Box<dyn PeerSource>,
    ) -> anyhow::Result<Controller> {
        let underlay = underlay::detect(&kernel, settings.underlay_interface.as_deref())
            .await
            .map_err(anyhow::Error::msg)?;
        let advertise = settings.advertise_addr.unwrap_or(underlay.addr);
        let mut registry = Registry::default();
        let now = Instant::now();
        let mut legacy_devices = Vec::new();
        let mut discovery_generation = 0;
        let mut last_discovery = None;
        let mut remembered = Vec::new();
        if let Ok(prev) = dir.read_discovery() {
            remembered = prev
                .peers
                .iter()
                .filter(|p| p.source == vrouter_state::PeerOrigin::Gossip && p.node.is_some())
                .cloned()
                .collect();
            for s in &prev.local_stacks {
                registry.restore(s.spec.clone(), s.acked_generation, now);
            }
            legacy_devices = prev.devices.clone();
            discovery_generation = prev.generation;
            last_discovery = Some(prev);
        }
        // discovery.json is in the shared directory: its `devices` only seed the private
        // record once, on the first start after an upgrade (see ownership).
        let owned_vnis = crate::ownership::recorded(&dir, &legacy_devices);
        let (published, routes_generation) = match dir.read_routes() {
            Ok(r) => (r.stacks, r.generation),
            Err(_) => (BTreeMap::new(), 0),
        };
        let peers = match source.load() {
            Ok(p) => p,
            Err(e) => {
                // At start a bad configuration is fatal: there is no previous one to keep.
                anyhow::bail!(e)
            }
        };
        let tunnel = if settings.encryption_on() {
            let stacks: Vec<(String, Prefix)> = registry
                .entries()
                .map(|e| &e.spec)
                .chain(peers.iter().flat_map(|p| p.stacks.iter()))
                .flat_map(|s| s.prefixes.iter().map(|p| (s.name.to_string(), *p)))
                .collect();
            check_tunnel_range(&settings, &kernel, &underlay, &stacks).await?;
            let keys =
                crate::wireguard::load_keys(&settings.wg_key_file()).map_err(anyhow::Error::msg)?;
            Some(crate::wireguard::Tunnel::new(&settings, keys))
        } else {
            remove_encryption_leftovers(&settings, &kernel).await;
            None
        };
        let c = Controller {
            settings,
            dir,
            kernel,
            source,
            peers,
            registry,
            retention: Retention::default(),
            published,
            routes_generation,
            discovery_generation,
            last_discovery,
            owned_vnis,
            failed_vnis: BTreeMap::new(),
            underlay,
            advertise,
            reported: BTreeSet::new(),
            refusals: Vec::new(),
            refused_local: Vec::new(),
            drift_repairs: 0,
            gossip: None,
            claims: BTreeMap::new(),
            generations: Default::default(),
            gossip_copies: BTreeMap::new(),
            superseded: BTreeMap::new(),
            placement_tracker: Default::default(),
            yielded: BTreeMap::new(),
            all_peers: Vec::new(),
            gossip_status: None,
            routed_nodes: BTreeSet::new(),
            left_mesh: false,
            remembered: Vec::new(),
            started: Instant::now(),
            routes_current: false,
            state_error: None,
            state_failure: None,
            devices_up: Vec::new(),
            last_local: Vec::new(),
            steer_applied: None,
            steer_memory: BTreeMap::new(),
            steer_status: None,
            steer_error: None,
            steer_cleared: false,
            tunnel,
            enc_plan: Default::default(),
            enc_status: None,
            enc_reported: BTreeSet::new(),
            paths: BTreeMap::new(),
            path_members: Vec::new(),
            path_views: BTreeMap::new(),
            path_targets: BTreeSet::new(),
            path_due: None,
            observed: None,
            port_translated: false,
            inside: BTreeSet::new(),
            addresses: None,
            path_status: None,
            relay_status: None,
            // A previous run's relay table goes at the first reconcile if not wanted.
            transit_applied: true,
            relay_error: None,
        };
        c.event(
            EventKind::Started,
            format!(
                "active on underlay {} ({}), advertising {}, VXLAN port {}, {} peer host(s) from {}",
                c.underlay.ifname,
                c.underlay.addr,
                c.advertise,
                c.settings.vxlan_port,
                c.peers.len(),
                c.source.name()
            ),
            None,
        );
        c.check_sysctls();
        let mut c = c;
        c.remembered = remembered;
        // A restart keeps relayed paths while the probes start (see paths::decide).
        if let Some(p) = c.last_discovery.as_ref().and_then(|d| d.paths.as_ref()) {
            c.paths = crate::paths::from_status(p);
        }
        c.relay_status = c.last_discovery.as_ref().and_then(|d| d.relay.clone());
        Ok(c)
    }

    pub fn event(&self, kind: EventKind, message: String, stack: Option<&StackName>) {
        let reason = kind.as_str().to_string();
        self.event_because(kind, &reason, message, stack)
    }

    /// An event with a machine-readable cause other than its kind.
    pub fn event_because(
        &self,
        kind: EventKind,
        reason: &str,
        message: String,
        stack: Option<&StackName>,
    ) {
        let e = Self::logged_event(kind, reason, message, stack);
        self.append_events(std::slice::from_ref(&e));
    }

    /// Appends logged events to events.log in one batch ([`StateDir::append_events`]).
    fn append_events(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        if let Err(err) = self.dir.append_events(events) {
            warn!("cannot append to events.log: {err}");
        }
        crash::point("discovery.after_event");
    }

    /// An event, logged; the caller appends it to events.log.
    fn logged_event(
        kind: EventKind,
        reason: &str,
        message: String,
        stack: Option<&StackName>,
    ) -> Event {
        let stack_name = stack.map(|s| s.as_str());
        match kind {
            EventKind::Error
            | EventKind::StateUnwritable
            | EventKind::RegistrationRefused
            | EventKind::ConflictRefused
            | EventKind::ConfigInvalid
            | EventKind::HostCheck => {
                warn!(kind = %kind, stack = stack_name, "{message}")
            }
            _ => info!(kind = %kind, stack = stack_name, "{message}"),
        }
        let mut e = Event::new("discovery", kind, message).because(reason);
        if let Some(s) = stack {
            e = e.for_stack(s);
        }
        e
    }

    /// Discovery never writes sysctls (it may not); it reports the ones that break the
    /// datapath.
    fn check_sysctls(&self) {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_string())
        };
        if read("/proc/sys/net/ipv4/ip_forward").as_deref() == Some("0") {
            self.event(
                EventKind::HostCheck,
                "net.ipv4.ip_forward is 0 on this host, so stacks cannot be steered to their routers; Docker normally enables it, check the daemon's ip-forward setting".into(),
                None,
            );
        }
    }

    pub fn config_files(&self) -> Vec<std::path::PathBuf> {
        let mut f = self.source.watched_files();
        f.extend(crate::gossip::watched(&self.settings));
        f
    }

    /// The address this host advertises (VXLAN and gossip).
    pub fn advertise(&self) -> Ipv4Addr {
        self.advertise
    }

    /// The stacks this host announces: every registered one (in grace too, so a
    /// restart announces the same stacks), with its first claim time and placement
    /// generation (see [`crate::placement::update_claims`]). Superseded copies are
    /// among them; the announcement leaves them out.
    pub fn claimed_stacks(&mut self) -> Vec<vrouter_gossip::ClaimedStack> {
        let now = now_ms();
        let names: BTreeSet<StackName> = self
            .registry
            .entries()
            .map(|e| e.spec.name.clone())
            .collect();
        let gens = &self.generations;
        let copies = &self.gossip_copies;
        let known = |n: &StackName| {
            copies
                .get(n)
                .into_iter()
                .flatten()
                .map(|c| c.generation)
                .max()
                .unwrap_or(0)
                .max(gens.get(n))
        };
        // A winner that left every gossip record is forgotten.
        self.yielded.retain(|n, w| {
            copies
                .get(n)
                .is_some_and(|v| v.iter().any(|c| c.node == w.node))
        });
        let changed = crate::placement::update_claims(
            &mut self.claims,
            &names,
            known,
            copies,
            &self.yielded,
            now,
        );
        let mut raised = false;
        for (n, c) in &self.claims {
            raised |= self.generations.note(n, c.generation, now);
        }
        if self.gossip.is_some() {
            if changed {
                if let Err(e) = crate::gossip::store_claims(&self.dir, &self.claims) {
                    warn!("cannot store claims.json: {e}");
                }
            }
            if raised {
                crate::gossip::store_generations(&self.dir, &self.generations);
            }
        }
        self.registry
            .entries()
            .map(|e| {
                let c = self.claims.get(&e.spec.name);
                vrouter_gossip::ClaimedStack {
                    spec: e.spec.clone(),
                    claimed_ms: c.map_or(now, |c| c.claimed_ms),
                    generation: c.map_or(0, |c| c.generation),
                }
            })
            .collect()
    }

    /// What to announce when gossip starts: [`Controller::claimed_stacks`] without
    /// the copies the previous run found superseded (the first reconcile decides
    /// again), so a restart does not announce a withdrawn copy for a moment.
    pub fn initial_stacks(&mut self) -> Vec<vrouter_gossip::ClaimedStack> {
        let superseded: BTreeSet<StackName> = self
            .last_discovery
            .iter()
            .flat_map(|d| d.refused.iter())
            .filter(|r| r.code == "superseded")
            .map(|r| r.stack.clone())
            .collect();
        self.claimed_stacks()
            .into_iter()
            .filter(|c| !superseded.contains(&c.spec.name))
            .collect()
    }

    pub fn set_gossip_claims(
        &mut self,
        claims: BTreeMap<StackName, crate::placement::Claim>,
        generations: crate::placement::Remembered,
    ) {
        self.claims = claims;
        self.generations = generations;
    }

    pub fn claims(&self) -> &BTreeMap<StackName, crate::placement::Claim> {
        &self.claims
    }

    pub fn set_gossip(&mut self, g: GossipHandle) {
        self.gossip = Some(g);
    }

    /// Claims of the admitted local stacks, as the placement rule ranks them: in
    /// static mode every copy ranks as claim 0, generation 0.
    fn placement_claims(
        &self,
        local: &[LocalRouter],
    ) -> BTreeMap<StackName, crate::placement::Claim> {
        let gossip_on = self.gossip.is_some();
        local
            .iter()
            .map(|l| {
                let c = self
                    .claims
                    .get(&l.spec.name)
                    .copied()
                    .filter(|_| gossip_on)
                    .unwrap_or(crate::placement::Claim {
                        claimed_ms: 0,
                        generation: 0,
                    });
                (l.spec.name.clone(), c)
            })
            .collect()
    }

    /// Placement changes since the last reconcile as events (once per change).
    fn report_placement(&mut self, local: &[LocalRouter], peers: &[PeerHost]) {
        use crate::placement::Note;
        let claims = self.placement_claims(local);
        let own = self
            .gossip
            .as_ref()
            .map(|g| g.node_id.to_string())
            .unwrap_or_default();
        let winners = crate::placement::winners(&crate::placement::copies(&claims, &own, peers));
        let registry = &self.registry;
        let notes = self
            .placement_tracker
            .observe(&winners, self.advertise, &claims, |n| {
                registry.get(n).is_some_and(|e| e.conn.is_some())
            });
        for n in notes {
            match n {
                Note::Moved {
                    stack,
                    from,
                    to,
                    from_generation,
                    to_generation,
                } => self.event(
                    EventKind::StackMoved,
                    format!("stack {stack} moved from host {from} to host {to} (placement {from_generation} -> {to_generation})"),
                    Some(&stack),
                ),
                Note::Superseded {
                    stack,
                    winner,
                    own_generation,
                } => {
                    self.event(
                        EventKind::StackSuperseded,
                        format!(
                            "stack {stack} also runs on host {} with a newer placement (generation {} against this copy's {own_generation}); this copy is withdrawn: no routes, not announced. Stop this copy: docker compose down",
                            winner.host.map(|h| h.to_string()).unwrap_or_default(),
                            winner.generation
                        ),
                        Some(&stack),
                    );
                    self.yielded.insert(stack, winner);
                }
            }
        }
    }

    pub fn has_gossip(&self) -> bool {
        self.gossip.is_some()
    }

    /// Whether some gossip member's membership failed (then datapath probes matter).
    pub fn has_failed_members(&self) -> bool {
        self.gossip_status.as_ref().is_some_and(|s| {
            s.members
                .iter()
                .any(|m| m.state == vrouter_state::MemberState::Down)
        })
    }

    /// `vrouter-discovery leave-mesh`: leave on purpose; others withdraw at once.
    pub async fn leave_mesh(&mut self) {
        if let Some(g) = &self.gossip {
            g.leave().await;
            self.left_mesh = true;
            if let Err(e) = crate::transit::remove(&self.relay_table()) {
                self.event_because(
                    EventKind::Error,
                    "relay_cleanup_failed",
                    format!("{e:#}"),
                    None,
                );
            }
            self.transit_applied = false;
            if let Some(t) = self.tunnel.as_mut() {
                for e in t.remove().await {
                    self.event_because(EventKind::Error, "encryption_cleanup_failed", e, None);
                }
            }
            self.event(
                EventKind::LeftMesh,
                "this host left the gossip mesh on purpose; every other host withdraws its stacks now, and this host stops routing to theirs".into(),
                None,
            );
        }
    }

    fn gossip_event(&self, e: vrouter_gossip::GossipEvent) {
        use vrouter_gossip::GossipEvent as G;
        match e {
            G::MemberJoined(id, addr) => {
                self.event(EventKind::MemberJoined, format!("node {id} at {addr} is alive"), None)
            }
            G::MemberFailed(id) => self.event(
                EventKind::MemberFailed,
                format!("membership of node {id} failed (no answer to direct or indirect probes); its stacks stay routed while its routers answer overlay probes"),
                None,
            ),
            G::MemberLeft(id) => self.event(
                EventKind::MemberLeft,
                format!("node {id} left the mesh on purpose; its stacks are withdrawn"),
                None,
            ),
            G::MemberMigrated { id, from, to } => self.event(
                EventKind::MemberMigrated,
                format!("node {id} moved from {from} to {to}; its stacks follow"),
                None,
            ),
            G::Rejoined => self.event(
                EventKind::Rejoined,
                "the mesh had declared this host down; it rejoined with a new incarnation".into(),
                None,
            ),
            // Reported by the address and path logic (issue 17).
            G::Reflected { .. } => {}
            G::Rejected(list) => {
                let parts: Vec<String> = list.iter().map(|(r, n)| format!("{n} {}", r.as_str())).collect();
                self.event(
                    EventKind::GossipRejected,
                    format!("dropped gossip packets: {} (bad_key: a host with another secret, or a rotation step missed; replayed: a copy of an old packet)", parts.join(", ")),
                    None,
                )
            }
        }
    }

    /// Gossip members whose stacks are routed: observes the gossip snapshot and the
    /// probe files, lets [`membership::decide`] choose, and reports the transitions.
    /// Also builds the status for discovery.json.
    fn gossip_peers(&mut self) -> Vec<PeerHost> {
        let Some(g) = &self.gossip else {
            return Vec::new();
        };
        let events = g.take_events();
        let snap = g.snapshot();
        for e in events {
            self.gossip_event(e);
        }
        // Every copy in the records gossip holds, whatever the member's state: a
        // fresh claim numbers itself above all of them.
        let mut copies: BTreeMap<StackName, Vec<crate::placement::Copy>> = BTreeMap::new();
        for m in snap.members.iter().filter(|m| !m.record.left) {
            for s in &m.record.stacks {
                copies
                    .entry(s.spec.name.clone())
                    .or_default()
                    .push(crate::placement::Copy {
                        host: Some(m.record.underlay),
                        node: m.record.id.to_string(),
                        claimed_ms: s.claimed_ms,
                        generation: s.generation,
                    });
            }
        }
        let now = now_ms();
        let mut raised = false;
        for (n, v) in &copies {
            for c in v {
                raised |= self.generations.note(n, c.generation, now);
            }
        }
        if raised {
            crate::gossip::store_generations(&self.dir, &self.generations);
        }
        self.gossip_copies = copies;
        let reachable = membership::reachability(&self.dir.read_all_probes(), now_ms());
        let decided = membership::decide(membership::Facts {
            members: &snap.members,
            reachable: &reachable,
            left_mesh: self.left_mesh,
            remembering: self.started.elapsed() < REMEMBER_FOR,
            remembered: &self.remembered,
            routed_before: &self.routed_nodes,
        });
        for change in &decided.changes {
            match change {
                membership::Change::Withdrawn { node, why } => self.event(
                    EventKind::PeerWithdrawn,
                    format!("stacks of node {node} withdrawn: {why}"),
                    None,
                ),
                membership::Change::Routed { node } => self.event(
                    EventKind::PeerRouted,
                    format!("stacks of node {node} are routed"),
                    None,
                ),
            }
        }
        self.remembered = decided.remembered;
        self.routed_nodes = decided.routed;
        // Issue 17: what the path decision reads (see `path_pass`).
        self.path_members = snap
            .members
            .iter()
            .map(|m| crate::paths::Member {
                node: m.record.id,
                underlay: m.record.underlay,
                gossip_addr: Some(m.record.gossip_addr),
                alive: matches!(
                    m.state,
                    vrouter_gossip::MemberState::Alive | vrouter_gossip::MemberState::Suspect
                ) && !m.record.left,
                vnis: m.record.stacks.iter().map(|s| s.spec.vni).collect(),
                relay: m
                    .record
                    .relay
                    .as_ref()
                    .map(|r| r.reach.iter().map(|x| (x.id, x.rtt_ms)).collect()),
                port_translated: m.record.nat.as_ref().is_some_and(|n| n.port_translated),
                encrypted: false,
            })
            .collect();
        self.path_views = snap
            .paths
            .iter()
            .map(|v| {
                (
                    v.id,
                    crate::paths::View {
                        reachable: v.reachable,
                        addr: v.addr,
                        rtt_us: v.rtt_us,
                        since_ms: v.since_ms,
                        acked_ever: v.acked_ever,
                    },
                )
            })
            .collect();
        self.note_reflection(snap.reflection.observed, snap.reflection.port_translated);
        // Peers that see this host at its own address are inside its NAT.
        let own_ip = *snap.addr.ip();
        self.inside = snap
            .reflection
            .reports
            .iter()
            .filter(|(_, seen)| *seen.ip() == own_ip)
            .map(|(id, _)| *id)
            .collect();
        let members = decided.members;
        let peers = decided.peers;
        let c = &snap.counters;
        let counters: BTreeMap<String, u64> = [
            ("packets_in", c.packets_in),
            ("packets_out", c.packets_out),
            ("bytes_in", c.bytes_in),
            ("bytes_out", c.bytes_out),
            ("rejected_bad_key", c.rejected_bad_key),
            ("rejected_malformed", c.rejected_malformed),
            ("rejected_replayed", c.rejected_replayed),
            ("anti_entropy_rounds", c.anti_entropy_rounds),
            ("records_pulled", c.records_pulled),
            ("skipped_unknown", c.skipped_unknown),
            ("records_pruned", c.records_pruned),
            ("refused_full", c.refused_full),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        self.gossip_status = Some(GossipStatus {
            node_id: snap.node_id.to_string(),
            addr: snap.addr.to_string(),
            keys: snap.keys.clone(),
            insecure: snap.insecure,
            members,
            counters,
        });
        peers
    }

    /// Reloads the peers; a bad file keeps the previous peers.
    pub fn reload_peers(&mut self) {
        match self.source.load() {
            Ok(p) => {
                if p != self.peers {
                    self.event(
                        EventKind::ConfigLoaded,
                        format!("peer configuration reloaded: {} peer host(s)", p.len()),
                        None,
                    );
                    self.peers = p;
                }
            }
            Err(e) => self.event(
                EventKind::ConfigInvalid,
                format!("{e} (keeping the previous peers)"),
                None,
            ),
        }
    }

    /// Handles a router's registration from the namespace `peer`; returns the reply.
    /// Everything is checked, and the overlay link made, before the registry changes:
    /// a refused registration leaves the registry as it was.
    pub async fn register(
        &mut self,
        conn: ConnId,
        reg: Registration,
        netns: Option<OwnedFd>,
        peer: Peer,
    ) -> DiscoveryMessage {
        let spec = reg.spec;
        if !spec.prefixes.iter().any(|p| p.contains(spec.router_ip)) {
            return self.refuse(
                &spec.name,
                format!(
                    "router address {} of stack {} is outside its prefixes {}; set VROUTER_PREFIXES to include the stack network",
                    spec.router_ip,
                    spec.name,
                    join(&spec.prefixes)
                ),
            );
        }
        if let Some(r) =
            crate::safety::registration_clash(&spec, self.registry.entries().map(|e| &e.spec))
        {
            return self.refuse(&spec.name, r.reason);
        }
        if let Err(e) = self.registry.admit(&spec, conn, peer.key) {
            return self.refuse(&spec.name, e);
        }
        // The descriptor the link moves through must be the connecting namespace.
        if let Some(fd) = &netns {
            if NetnsKey::of(fd.as_fd()).ok() != Some(peer.key) {
                return self.refuse(
                    &spec.name,
                    format!(
                        "the namespace descriptor sent with stack {}'s registration is not the connecting router's own network namespace (/proc/self/ns/net)",
                        spec.name
                    ),
                );
            }
        }
        let holder = match crate::holder::observe(&self.kernel, peer.ns.as_fd()).await {
            Ok(o) => crate::holder::verify(spec.router_ip, &o),
            Err(e) => Err(e),
        };
        drop(peer.ns);
        if let Err(e) = holder {
            return self.refuse(&spec.name, format!("stack {} refused: {e}", spec.name));
        }
        if !reg.needs_link {
            if let Err(e) = self.registry.register(spec.clone(), conn, peer.key) {
                return self.refuse(&spec.name, e);
            }
            self.registry.set_conntrack(&spec.name, reg.conntrack);
            self.event(
                EventKind::RouterRegistered,
                format!(
                    "router of stack {} reconnected with its overlay link",
                    spec.name
                ),
                Some(&spec.name),
            );
            return DiscoveryMessage::Registered;
        }
        let Some(netns) = netns else {
            return self.refuse(
                &spec.name,
                "registration asked for an overlay link but carried no namespace descriptor".into(),
            );
        };
        let device = match self.ensure_device(spec.vni).await {
            Ok(d) => d,
            Err(e) => return self.refuse(&spec.name, e),
        };
        let mac = spec.router_mac();
        let name = format!("vrm{:08x}", u32::from(spec.router_ip));
        if let Err(e) = self.attach_link(&name, &device, mac, netns).await {
            return self.refuse(&spec.name, e);
        }
        if let Err(e) = self.registry.register(spec.clone(), conn, peer.key) {
            return self.refuse(&spec.name, e);
        }
        self.registry.set_conntrack(&spec.name, reg.conntrack);
        self.event(
            EventKind::RouterAttached,
            format!(
                "router of stack {} ({}, VNI {}) attached through {} on {}",
                spec.name, spec.router_ip, spec.vni, name, device.name
            ),
            Some(&spec.name),
        );
        // Registered and attached; the reply is not sent yet.
        crash::point("discovery.after_register");
        DiscoveryMessage::Attached {
            ifname: name,
            mac,
            mtu: device.mtu,
        }
    }

    fn refuse(&self, stack: &StackName, reason: String) -> DiscoveryMessage {
        self.event(EventKind::RegistrationRefused, reason.clone(), Some(stack));
        DiscoveryMessage::Refused { reason }
    }

    /// Creates the router's macvlan on the VXLAN device and moves it into the router's
    /// namespace. The descriptor is closed on return, so a stopped router's namespace
    /// is not kept alive. Nothing is left behind on failure.
    async fn attach_link(
        &self,
        name: &str,
        device: &Link,
        mac: Mac,
        netns: OwnedFd,
    ) -> Result<(), String> {
        let k = &self.kernel;
        if let Some(stale) = k.link_by_name(name).await.map_err(|e| e.to_string())? {
            // Only a leftover of ours (a macvlan on our device) is removed.
            if stale.kind.as_deref() != Some("macvlan") || stale.parent != Some(device.index) {
                return Err(format!(
                    "{name} exists and is not a macvlan on {}: docker-vrouter did not make it and leaves it untouched; remove or rename it",
                    device.name
                ));
            }
            k.delete_link(stale.index)
                .await
                .map_err(|e| e.to_string())?;
        }
        let index = k
            .create_macvlan(name, device.index, mac, device.mtu)
            .await
            .map_err(|e| format!("cannot create the router's macvlan {name}: {e}"))?;
        if let Err(e) = k.move_to_netns(index, netns.as_fd()).await {
            let _ = k.delete_link(index).await;
            return Err(format!(
                "cannot move {name} into the router's network namespace: {e}"
            ));
        }
        // The macvlan is in the router's namespace; the registry does not know yet.
        crash::point("discovery.after_attach");
        drop(netns);
        Ok(())
    }

    pub fn ack(&mut self, conn: ConnId, generation: u64) -> bool {
        self.registry.ack(conn, generation)
    }

    /// An explicit leave of `stack`, on connection `conn` from namespace `peer`: for
    /// the stack the connection registered, or, on a connection that registered none
    /// (`vrouter-router leave`), from the namespace that holds the stack's router
    /// address. Returns the reply.
    pub async fn leave(&mut self, conn: ConnId, stack: &StackName, peer: Peer) -> DiscoveryMessage {
        let refuse = |this: &Self, reason: String| {
            this.event_because(
                EventKind::RegistrationRefused,
                "leave_refused",
                reason.clone(),
                Some(stack),
            );
            DiscoveryMessage::Refused { reason }
        };
        if let Some(own) = self.registry.by_conn(conn) {
            if own.spec.name != *stack {
                let reason = format!(
                    "this connection registered stack {}; it cannot withdraw stack {stack}",
                    own.spec.name
                );
                return refuse(self, reason);
            }
        } else if let Some(e) = self.registry.get(stack) {
            let router_ip = e.spec.router_ip;
            let holder = match crate::holder::observe(&self.kernel, peer.ns.as_fd()).await {
                Ok(o) => crate::holder::verify(router_ip, &o),
                Err(e) => Err(e),
            };
            if let Err(e) = holder {
                return refuse(self, format!("leave of stack {stack} refused: {e}"));
            }
        }
        if self.registry.leave(stack).is_some() {
            self.event(
                EventKind::StackLeft,
                format!("stack {stack} left (explicit leave); its routes are withdrawn now"),
                Some(stack),
            );
        }
        DiscoveryMessage::Left
    }

    pub fn disconnected(&mut self, conn: ConnId) {
        for name in self.registry.disconnected(conn, Instant::now()) {
            self.event(
                EventKind::RouterDisconnected,
                format!(
                    "router of stack {name} disconnected; withdrawing it in {} ms unless it comes back",
                    self.settings.grace_ms
                ),
                Some(&name),
            );
        }
    }

    pub fn expire(&mut self) {
        for name in self.registry.expire(Instant::now(), self.settings.grace()) {
            self.event(
                EventKind::StackWithdrawn,
                format!(
                    "router of stack {name} did not come back within {} ms; stack withdrawn",
                    self.settings.grace_ms
                ),
                Some(&name),
            );
        }
    }

    pub fn next_expiry(&self) -> Option<Instant> {
        let grace = self.registry.next_expiry(self.settings.grace());
        match (grace, self.path_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// With encryption on, no local address: the kernel picks the tunnel address for
    /// packets that go through WireGuard and the underlay address for plain peers.
    fn device_spec(&self, vni: Vni) -> DeviceSpec {
        DeviceSpec {
            vni,
            local: (!self.settings.encryption_on()).then_some(self.underlay.addr),
            underlay: self.underlay.index,
            port: self.settings.vxlan_port,
            mtu: self.overlay_mtu(),
            learning: self.settings.vxlan_learning,
        }
    }

    /// MTU of the VXLAN devices: underlay - 50, and - 80 more with encryption.
    pub fn overlay_mtu(&self) -> u32 {
        crate::encryption::overlay_mtu(self.underlay.mtu, &self.settings.encryption)
    }

    /// Makes `vxlan<VNI>` match its spec: reuse, adjust in place, or (only when it must)
    /// replace. A failed device is deleted again and the error names the fix.
    async fn ensure_device(&mut self, vni: Vni) -> Result<Link, String> {
        let want = self.device_spec(vni);
        let name = vni.vxlan_ifname();
        let k = &self.kernel;
        let have = k.link_by_name(&name).await.map_err(|e| e.to_string())?;
        let owner = crate::ownership::owner(&want, have.as_ref(), self.owned_vnis.contains(&vni));
        if let crate::ownership::Owner::Foreign(why) = &owner {
            let msg = crate::ownership::refusal(vni, why);
            if self.failed_vnis.insert(vni, msg.clone()).as_ref() != Some(&msg) {
                self.event_because(
                    EventKind::ConflictRefused,
                    "foreign_device",
                    msg.clone(),
                    None,
                );
            }
            return Err(msg);
        }
        let action = diff::device_action(&want, have.as_ref());
        let result = match action {
            DeviceAction::Keep => Ok(()),
            DeviceAction::Adjust { local, mtu, up } => {
                let index = have.as_ref().expect("adjust has a link").index;
                async {
                    if let Some(a) = local {
                        k.set_vxlan_local(index, a).await?;
                    }
                    if let Some(m) = mtu {
                        k.set_mtu(index, m).await?;
                    }
                    if up {
                        k.set_up(index).await?;
                    }
                    Ok::<(), KernelError>(())
                }
                .await
                .map_err(|e| (e, Some(index)))
            }
            DeviceAction::Create | DeviceAction::Replace { .. } => {
                if let DeviceAction::Replace { why } = &action {
                    self.event(
                        EventKind::DeviceReplaced,
                        format!("replacing {name}: {why}; routers on it are re-attached"),
                        None,
                    );
                    if let Some(old) = &have {
                        k.delete_link(old.index).await.map_err(|e| e.to_string())?;
                    }
                }
                // Recorded before it exists: a crash between the create and the marker
                // below must leave a device the next start adopts (unmarked, recorded,
                // as built), never one it refuses as foreign for good.
                if self.owned_vnis.insert(vni) {
                    crate::ownership::record(&self.dir, &self.owned_vnis);
                }
                let spec = VxlanSpec {
                    name: name.clone(),
                    vni,
                    local: want.local,
                    underlay: want.underlay,
                    port: want.port,
                    mtu: want.mtu,
                    learning: want.learning,
                };
                match k.create_vxlan(&spec).await {
                    Err(e) => Err((e, None)),
                    Ok(index) => async {
                        // Made, not yet marked as ours.
                        crash::point("discovery.after_device_create");
                        k.set_alias(index, &crate::ownership::marker(vni)).await?;
                        k.set_up(index).await
                    }
                    .await
                    .map_err(|e| (e, Some(index))),
                }
            }
        };
        let result = match (result, &owner, &have) {
            (Ok(()), crate::ownership::Owner::Adopt, Some(l)) => {
                let marked = k.set_alias(l.index, &crate::ownership::marker(vni)).await;
                if marked.is_ok() {
                    self.event(
                        EventKind::DeviceAdopted,
                        format!(
                            "{name} (made by an older version, or by a run that stopped before marking it) now carries the marker \"{}\"",
                            crate::ownership::marker(vni)
                        ),
                        None,
                    );
                }
                // Not deleted on failure: it was there before this run.
                marked.map_err(|e| (e, None))
            }
            (r, _, _) => r,
        };
        match result {
            Ok(()) => {
                self.failed_vnis.remove(&vni);
                if matches!(action, DeviceAction::Create | DeviceAction::Replace { .. }) {
                    self.event(
                        EventKind::DeviceCreated,
                        format!(
                            "created {name} (VNI {vni}, local {}, dev {}, UDP port {}, MTU {})",
                            want.local
                                .map(|a| a.to_string())
                                .unwrap_or_else(|| "by route (encryption)".into()),
                            self.underlay.ifname,
                            want.port,
                            want.mtu
                        ),
                        None,
                    );
                }
                self.owned_vnis.insert(vni);
                k.link_by_name(&name)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("{name} vanished right after it was set up"))
            }
            Err((e, index)) => {
                // A device that cannot come up is deleted again: no half-built state.
                if let (Some(i), false) = (index, matches!(action, DeviceAction::Adjust { .. })) {
                    let _ = k.delete_link(i).await;
                }
                let msg = format!("cannot set up {name} for VNI {vni}: {e}");
                if self.failed_vnis.insert(vni, msg.clone()).as_ref() != Some(&msg) {
                    self.event_because(EventKind::Error, "device_failed", msg.clone(), None);
                }
                Err(msg)
            }
        }
    }

    fn local_routers(&self, links: &[Link], addrs: &[vrouter_kernel::Address]) -> Vec<LocalRouter> {
        self.registry
            .entries()
            .map(|e| {
                let bridge = addrs
                    .iter()
                    .filter(|a| Prefix::containing(a.addr, a.prefix_len).contains(e.spec.router_ip))
                    .filter_map(|a| links.iter().find(|l| l.index == a.index))
                    .find(|l| !matches!(l.kind.as_deref(), Some("vxlan") | Some("macvlan")))
                    .map(|l| (l.name.clone(), l.index));
                LocalRouter {
                    spec: e.spec.clone(),
                    bridge,
                }
            })
            .collect()
    }

    /// One full reconcile. Returns the number of kernel changes made.
    pub async fn reconcile(&mut self) -> anyhow::Result<usize> {
        let r = self.reconcile_once().await;
        self.settle_state();
        r
    }

    async fn reconcile_once(&mut self) -> anyhow::Result<usize> {
        self.expire();
        // Writes happen only on change, so prove the directory writable every time:
        // readiness must notice an unwritable directory before the next write fails.
        // The kernel is reconciled either way: the datapath does not need the files.
        let check = self.dir.check_writable();
        let _ = self.note_state("checking the state directory", check);
        if let Ok(u) =
            underlay::detect(&self.kernel, self.settings.underlay_interface.as_deref()).await
        {
            if u != self.underlay {
                self.event(
                    EventKind::UnderlayChanged,
                    format!("underlay is now {} ({}), MTU {}", u.ifname, u.addr, u.mtu),
                    None,
                );
                if self.settings.advertise_addr.is_none() {
                    self.advertise = u.addr;
                }
                self.underlay = u;
            }
        }
        let k = &self.kernel;
        let links = k.links().await?;
        let addrs = k.addresses().await?;
        let local = self.local_routers(&links, &addrs);
        let bridges: BTreeSet<u32> = local
            .iter()
            .filter_map(|l| l.bridge.as_ref().map(|b| b.1))
            .collect();
        // The peers first: a fresh claim's generation goes above every copy gossip
        // knows.
        let mut all_peers = self.peers.clone();
        all_peers.extend(self.gossip_peers());
        // Claim times next: the newest stacks are the ones a limit refuses.
        let stacks = self.claimed_stacks();
        let admission = HostView {
            local_claims: self
                .claims
                .iter()
                .map(|(n, c)| (n.clone(), c.claimed_ms))
                .collect(),
            max_prefixes_per_host: self.settings.max_prefixes_per_host,
            ..HostView::default()
        };
        let gossip_on = self.gossip.is_some();
        use vrouter_gossip::record::{stack_cost, MAX_RECORD_BYTES, RECORD_OVERHEAD};
        let budget = if gossip_on {
            MAX_RECORD_BYTES - RECORD_OVERHEAD
        } else {
            usize::MAX
        };
        let (refused_local, local_refusals) =
            desired::admit_local(&admission, &local, stack_cost, budget);
        let local: Vec<LocalRouter> = local
            .into_iter()
            .filter(|l| !refused_local.contains(&l.spec.name))
            .collect();
        self.refused_local = local_refusals.iter().map(|r| r.reason.clone()).collect();
        // Placement: local copies another host's copy outranks are withdrawn (not
        // announced, no routes) until that copy disappears.
        let own_node = self
            .gossip
            .as_ref()
            .map(|g| g.node_id.to_string())
            .unwrap_or_default();
        self.superseded =
            crate::placement::superseded(&self.placement_claims(&local), &own_node, &all_peers);
        self.report_placement(&local, &all_peers);
        let own_tunnel = self.encryption_pass(&mut all_peers).await;
        if let Some(g) = &self.gossip {
            let stacks = stacks
                .into_iter()
                .filter(|c| {
                    !refused_local.contains(&c.spec.name)
                        && !self.superseded.contains_key(&c.spec.name)
                })
                .collect();
            let encryption = self.announcement(own_tunnel);
            g.set_local(self.advertise, self.settings.vxlan_port, stacks, encryption);
        }
        // Refused peers are not routed at all, as if absent.
        let routed_peers = self.enc_plan.routed(&all_peers);
        let destinations = self.path_pass(&local, &routed_peers);
        let host = HostView {
            advertise_addr: Some(self.advertise),
            host_networks: addrs
                .iter()
                .filter(|a| !bridges.contains(&a.index) && !a.addr.is_loopback())
                .map(|a| Prefix::containing(a.addr, a.prefix_len))
                .collect(),
            node_id: self.gossip.as_ref().map(|g| g.node_id.to_string()),
            // Static mode ranks every stack as claim 0 (ties by name); the claim times
            // kept in memory there only order local stacks for the prefix cap.
            local_claims: if gossip_on {
                self.claims
                    .iter()
                    .map(|(n, c)| (n.clone(), c.claimed_ms))
                    .collect()
            } else {
                BTreeMap::new()
            },
            local_generations: if gossip_on {
                self.claims
                    .iter()
                    .map(|(n, c)| (n.clone(), c.generation))
                    .collect()
            } else {
                BTreeMap::new()
            },
            superseded: self.superseded.clone(),
            max_prefixes_per_host: self.settings.max_prefixes_per_host,
            underlay_network: Some(Prefix::containing(
                self.underlay.addr,
                self.underlay.prefix_len,
            )),
            bridge_networks: addrs
                .iter()
                .filter(|a| bridges.contains(&a.index) && !a.addr.is_loopback())
                .map(|a| (a.index, Prefix::containing(a.addr, a.prefix_len)))
                .collect(),
            destinations,
        };
        let mut want = desired::compute(&host, &local, &routed_peers);
        want.refusals.extend(local_refusals);
        // A relay forwards between the peers it reaches directly (transit.rs): their
        // VNIs need devices here and their routers' rows point at them directly.
        let relay_on = self.settings.relay && self.gossip.is_some() && !self.left_mesh;
        let direct_known = crate::paths::direct_hosts(
            &self.path_members,
            &self.path_views,
            self.gossip.as_ref().map_or(0, |g| g.now_ms()),
            self.settings.path_dead_ms,
        );
        // Routed gossip peers gossip does not know yet (right after a restart: the
        // previous run's, see `remembered`) are not decided either: forwarded to.
        let known: BTreeSet<Ipv4Addr> = self.path_members.iter().map(|m| m.underlay).collect();
        let direct: BTreeSet<Ipv4Addr> = routed_peers
            .iter()
            .filter(|p| p.node.is_some())
            .map(|p| p.addr)
            .filter(|a| direct_known.contains(a) || !known.contains(a))
            .collect();
        let transit = crate::transit::plan(relay_on, &routed_peers, &direct, &want.destinations);
        want.vnis.extend(transit.vnis.iter().copied());
        // Right after a restart, before gossip knows the members, the relay keeps what
        // the previous run relayed (its devices, and its table: see `transit_pass`).
        let transit_settling =
            relay_on && self.path_members.is_empty() && self.started.elapsed() < REMEMBER_FOR;
        if transit_settling {
            if let Some(r) = self.last_discovery.as_ref().and_then(|d| d.relay.as_ref()) {
                want.vnis.extend(r.vnis.iter().copied());
            }
        }
        want.fdb
            .retain(|r| !transit.fdb.iter().any(|t| t.vni == r.vni && t.mac == r.mac));
        want.fdb.extend(transit.fdb.iter().copied());
        self.all_peers = all_peers;
        // A superseded local copy is reported as `stack_superseded` (report_placement).
        for r in want.refusals.iter().filter(|r| r.code != "superseded") {
            let key = format!("{}|{:?}|{}", r.stack, r.prefix, r.reason);
            if self.reported.insert(key) {
                self.event_because(
                    EventKind::ConflictRefused,
                    &r.code,
                    r.reason.clone(),
                    Some(&r.stack),
                );
            }
        }
        let mut changes = 0;

        // Devices: one per VNI in use; devices we own and no longer need go.
        let mut devices: BTreeMap<Vni, Link> = BTreeMap::new();
        for vni in &want.vnis {
            if let Ok(link) = self.ensure_device(*vni).await {
                devices.insert(*vni, link);
            }
        }
        for vni in self.owned_vnis.clone() {
            if want.vnis.contains(&vni) {
                continue;
            }
            if let Some(l) = self.kernel.link_by_name(&vni.vxlan_ifname()).await? {
                let owner = crate::ownership::owner(&self.device_spec(vni), Some(&l), true);
                if let crate::ownership::Owner::Foreign(why) = owner {
                    warn!("not deleting {}: {why}", l.name);
                } else {
                    self.kernel.delete_link(l.index).await?;
                    // Deleted; the private record still lists it.
                    crash::point("discovery.after_device_delete");
                    changes += 1;
                    self.event(
                        EventKind::DeviceDeleted,
                        format!(
                            "deleted {} (no stack on VNI {vni} left on this host)",
                            l.name
                        ),
                        None,
                    );
                }
            }
            self.owned_vnis.remove(&vni);
        }
        crate::ownership::record(&self.dir, &self.owned_vnis);
        // The relay table changes before FDB rows move away from direct.
        if !transit_settling {
            self.transit_pass(transit, &devices);
        }

        // FDB: desired rows plus rows routers may still use, on the devices we have.
        let registry = &self.registry;
        let mut target: BTreeSet<FdbRow> = want.fdb.clone();
        // Retained rows follow their host's current destination (tunnel or underlay);
        // under `require` a host without a tunnel (refused now) keeps none: nothing
        // may leave in the clear, not even for routers that have not caught up.
        let require = self.settings.encryption == vrouter_state::EncryptionMode::Require;
        // A router MAC lives on one host: a retained row for a MAC the desired rows
        // place elsewhere (a stack that moved) gives way at once.
        let wanted_macs: BTreeSet<(Vni, Mac)> = want
            .fdb
            .iter()
            .filter(|r| !r.is_flood())
            .map(|r| (r.vni, r.mac))
            .collect();
        target.extend(
            self.retention
                .retained(|v| registry.acks(v))
                .into_iter()
                .filter(|r| r.is_flood() || !wanted_macs.contains(&(r.vni, r.mac)))
                .filter(|r| !require || self.enc_plan.tunnel_dst.contains_key(&r.dst))
                .map(|r| FdbRow {
                    dst: want.fdb_dst(r.dst),
                    ..r
                }),
        );
        target.retain(|r| devices.contains_key(&r.vni));
        let observed = self.dump_fdb(&devices).await?;
        let fdb_changes = diff::diff_fdb(&target, &observed);
        for change in &fdb_changes {
            changes += 1;
            if let Err(e) = self.apply(change, &devices).await {
                self.event_because(
                    EventKind::Error,
                    "kernel_change_failed",
                    format!("{change:?} failed: {e}"),
                    None,
                );
            }
        }
        if !fdb_changes.is_empty() {
            // FDB changed; routes.json not yet written.
            crash::point("discovery.after_fdb");
        }

        // Publish what the FDB now carries.
        let present = self.dump_fdb(&devices).await?;
        let published = desired::publish(&local, &want.candidates, &present, &want.destinations);
        if !self.routes_current && published == self.published {
            // After a restart: routes.json is current if it already says the same.
            self.routes_current = self.dir.read_routes().is_ok_and(|r| r.stacks == published);
        }
        if published != self.published || !self.routes_current {
            self.routes_generation += 1;
            let file = RoutesFile {
                schema: SCHEMA_VERSION,
                generation: self.routes_generation,
                stacks: published.clone(),
            };
            let written = self.dir.write_routes(&file);
            if self.note_state("writing routes.json", written).is_ok() {
                crash::point("discovery.after_routes");
                self.routes_current = true;
                self.report_route_changes(&published, &want);
                self.retention
                    .published(&self.published, &published, self.routes_generation);
                self.published = published;
            } else {
                // Not published: the next reconcile tries again with this generation.
                self.routes_generation -= 1;
            }
        }
        let registry = &self.registry;
        self.retention.forget_acked(|v| registry.acks(v));

        // Steering, from what is published.
        let (want_rules, want_routes) =
            desired::steering(&local, &self.published, self.settings.rule_priority);
        let have_rules: BTreeSet<Rule> = self
            .kernel
            .rules()
            .await?
            .into_iter()
            .filter(|r| r.protocol == RTPROT_VROUTER && r.iif.is_some() && r.fwmark.is_none())
            .collect();
        let tables: BTreeSet<u32> = want_rules
            .iter()
            .chain(have_rules.iter())
            .map(|r| r.table)
            .collect();
        // One dump for every stack's table: the kernel lists all tables in any dump.
        let have_routes: BTreeSet<Route> = self
            .kernel
            .routes_of_tables(&tables)
            .await?
            .into_iter()
            .filter(|r| r.protocol == RTPROT_VROUTER)
            .collect();
        let steering_changes =
            diff::diff_steering(&want_rules, &want_routes, &have_rules, &have_routes);
        for change in &steering_changes {
            changes += 1;
            if let Err(e) = self.apply(change, &devices).await {
                self.event_because(
                    EventKind::Error,
                    "kernel_change_failed",
                    format!("{change:?} failed: {e}"),
                    None,
                );
            }
        }
        if !steering_changes.is_empty() {
            crash::point("discovery.after_steering_rules");
        }

        self.devices_up = devices.keys().copied().collect();
        self.refusals = want.refusals;
        self.last_local = local.clone();
        self.steer_pass(&local).await;
        self.write_discovery(&local)?;
        Ok(changes)
    }

    /// Encryption decided and applied: static peers' tunnel addresses, this host's
    /// own (reported collisions), each peer encrypted, plain or refused (events once
    /// per episode), then the WireGuard device and the `require` filter brought to
    /// match. Runs before the FDB is reconciled, so a tunnel address is routed into
    /// the device before any FDB row points at it. Returns this host's tunnel address.
    async fn encryption_pass(&mut self, peers: &mut [PeerHost]) -> Option<Ipv4Addr> {
        let mode = self.settings.encryption.clone();
        let mut own = None;
        let mut reported: BTreeSet<String> = BTreeSet::new();
        if self.tunnel.is_some() {
            let range = self.settings.tunnel_range;
            crate::encryption::fill_static_tunnels(range, self.advertise, peers);
            let mut hosts: BTreeSet<Ipv4Addr> = peers.iter().map(|p| p.addr).collect();
            if let Some(g) = &self.gossip_status {
                hosts.extend(g.members.iter().map(|m| m.underlay));
            }
            hosts.insert(self.advertise);
            let a = crate::tunnel::assign(range, &hosts);
            for c in &a.collisions {
                let list: Vec<String> = c.hosts.iter().map(|h| h.to_string()).collect();
                let key = format!("collision|{}|{}", c.address, list.join(","));
                if !self.enc_reported.contains(&key) {
                    self.event(
                        EventKind::TunnelAddressCollision,
                        format!(
                            "hosts {} all derive tunnel address {} from their underlay addresses; {} keeps it (the lowest underlay address) and the others take the next free address in {range}",
                            list.join(", "),
                            c.address,
                            list[0]
                        ),
                        None,
                    );
                }
                reported.insert(key);
            }
            own = a.addresses.get(&self.advertise).copied();
            if own.is_none() {
                let key = "range_full".to_string();
                if !self.enc_reported.contains(&key) {
                    self.event_because(
                        EventKind::Error,
                        "tunnel_range_full",
                        format!("the tunnel range {range} (VROUTER_TUNNEL_RANGE) has no address left for this host among {} hosts; use a larger range on every host", hosts.len()),
                        None,
                    );
                }
                reported.insert(key);
            }
        }
        let mut plan = crate::encryption::plan(&mode, peers, self.settings.tunnel_range, own);
        // The device comes first: without it, nothing is sent towards a tunnel address.
        let overlay_mtu = self.overlay_mtu();
        let mut notes = Vec::new();
        let endpoints = self.wg_endpoints(&plan);
        if let (Some(t), Some(addr), false) = (self.tunnel.as_mut(), own, self.left_mesh) {
            t.set_endpoints(endpoints);
            notes = t.apply(addr, self.underlay.mtu, &plan).await;
            // The WireGuard device and the input filter applied.
            crash::point("discovery.after_wireguard");
        }
        for n in notes {
            self.encryption_note(n);
        }
        if let Some(t) = self.tunnel.as_ref().filter(|t| !t.is_open()) {
            let why = if t.is_stopped() {
                "this host left the mesh (leave-mesh)".to_string()
            } else {
                t.error().unwrap_or_else(|| {
                    "it has not been opened (no tunnel address for this host)".to_string()
                })
            };
            plan = plan.without_tunnel(&why);
        }
        for d in plan.peers.values() {
            use crate::encryption::PeerState;
            let (Some(code), Some(reason)) = (d.code, &d.reason) else {
                continue;
            };
            let host = d.host;
            match d.state {
                PeerState::Refused => {
                    let key = format!("refused|{host}|{code}");
                    if !self.enc_reported.contains(&key) {
                        self.event_because(
                            EventKind::EncryptionPeerRefused,
                            code,
                            format!(
                                "host {host} is not routed (local mode {mode}, its mode {}): {reason}",
                                d.peer_mode
                            ),
                            None,
                        );
                    }
                    reported.insert(key);
                }
                PeerState::Plain => {
                    let key = format!("plain|{host}");
                    if !self.enc_reported.contains(&key) {
                        self.event_because(
                            EventKind::EncryptionPeerPlain,
                            code,
                            format!("host {host} is routed in the clear: {reason}"),
                            None,
                        );
                    }
                    reported.insert(key);
                }
                PeerState::Encrypted => {}
            }
        }
        self.enc_reported = reported;
        self.enc_status = Some(match &self.tunnel {
            Some(t) => t.status(&plan, overlay_mtu),
            None => crate::wireguard::status(
                &mode,
                None,
                &self.settings.wg_device,
                None,
                None,
                None,
                None,
                overlay_mtu,
                &plan,
                &[],
            ),
        });
        self.enc_plan = plan;
        own
    }

    /// WireGuard endpoints (issue 17): each gossip peer at its address in use (the
    /// probed candidate that answers, else its announced address), with a 15 s
    /// keepalive toward every peer while this host is behind a NAT (its reflection
    /// has an observed address), so its tunnels stay open from the inside.
    fn wg_endpoints(
        &self,
        plan: &crate::encryption::Plan,
    ) -> BTreeMap<Ipv4Addr, crate::wireguard::PeerEndpoint> {
        let keepalive = Some(if self.observed.is_some() {
            crate::wireguard::NAT_KEEPALIVE_SECS
        } else {
            crate::encryption::KEEPALIVE_SECS
        });
        let in_use: BTreeMap<Ipv4Addr, Ipv4Addr> = self
            .path_members
            .iter()
            .filter_map(|m| {
                let v = self.path_views.get(&m.node).filter(|v| v.reachable)?;
                Some((m.underlay, *v.addr?.ip()))
            })
            .collect();
        plan.wg_peers
            .iter()
            .map(|p| {
                // The plan's endpoint is the peer's announced (underlay) address.
                let host = *p.endpoint.ip();
                (
                    host,
                    crate::wireguard::PeerEndpoint {
                        addr: in_use.get(&host).copied().unwrap_or(host),
                        keepalive_secs: keepalive,
                    },
                )
            })
            .collect()
    }

    /// The relay's netdev table: `<steering_table>_relay`.
    fn relay_table(&self) -> String {
        format!("{}_relay", self.settings.steering_table)
    }

    /// Issue 17: decides each probed gossip peer's path (`paths::decide`), reports
    /// the transitions, hands gossip its probe targets, fills discovery.json's
    /// `addresses` and `paths`, and returns the FDB destination of every routed peer
    /// host. A relay sends to the peers it reaches directly at their own address.
    fn path_pass(
        &mut self,
        local: &[LocalRouter],
        routed: &[PeerHost],
    ) -> BTreeMap<Ipv4Addr, Ipv4Addr> {
        use crate::paths;
        let tunnel = self.enc_plan.tunnel_dst.clone();
        let Some(g) = &self.gossip else {
            self.paths.clear();
            self.path_due = None;
            self.addresses = None;
            self.path_status = None;
            return paths::fdb_destinations(routed, &BTreeMap::new(), &[], &tunnel);
        };
        let me = g.node_id;
        let now = g.now_ms();
        for m in &mut self.path_members {
            m.encrypted = tunnel.contains_key(&m.underlay);
        }
        let local_vnis: BTreeSet<Vni> = local.iter().map(|l| l.spec.vni).collect();
        let relay_on = self.settings.relay && !self.left_mesh;
        let targets = if self.left_mesh {
            BTreeSet::new()
        } else {
            paths::targets(me, relay_on, &local_vnis, &self.path_members)
        };
        if targets != self.path_targets {
            g.set_path_targets(targets.clone());
            self.path_targets = targets.clone();
        }
        let inputs = paths::Inputs {
            me,
            now_ms: now,
            dead_after_ms: self.settings.path_dead_ms,
            members: &self.path_members,
            views: &self.path_views,
            previous: &self.paths,
            own_port_translated: self.port_translated,
            inside: &self.inside,
            targets: &targets,
        };
        let mut decided = paths::decide(&inputs);
        self.path_due = paths::next_due(&inputs, &decided)
            .map(|at| Instant::now() + std::time::Duration::from_millis(at.saturating_sub(now)));
        // Right after a restart gossip does not know the members yet: the previous
        // run's decisions stand for the peers it still routes (see `remembered`).
        if self.started.elapsed() < REMEMBER_FOR {
            for (id, p) in &self.paths {
                if !targets.contains(id) {
                    decided.entry(*id).or_insert_with(|| p.clone());
                }
            }
        }
        let mut dests = paths::fdb_destinations(routed, &decided, &self.path_members, &tunnel);
        if relay_on {
            // The peers this relay forwards to (see `transit`): its own rows to them
            // are direct, as the transit rows, so no frame is relayed twice.
            let direct = paths::direct_hosts(
                &self.path_members,
                &self.path_views,
                now,
                self.settings.path_dead_ms,
            );
            for m in self
                .path_members
                .iter()
                .filter(|m| direct.contains(&m.underlay))
            {
                let addr = self
                    .path_views
                    .get(&m.node)
                    .filter(|v| v.reachable)
                    .and_then(|v| v.addr)
                    .map(|a| *a.ip())
                    .unwrap_or(m.underlay);
                if let Some(d) = dests.get_mut(&m.underlay) {
                    *d = tunnel.get(&m.underlay).copied().unwrap_or(addr);
                }
            }
        }
        self.report_paths(&decided);
        self.path_status = Some(
            decided
                .values()
                .map(|p| {
                    let (relay_node, relay_addr) = match p.via {
                        paths::Via::Relay { node, addr } => (Some(node.to_string()), Some(addr)),
                        _ => (None, None),
                    };
                    vrouter_state::PathStatus {
                        node: p.node.to_string(),
                        peer_addr: p.peer_addr,
                        addr_in_use: p.addr_in_use,
                        via: p.via.name().to_string(),
                        relay_node,
                        relay_addr,
                        // 0.1 ms steps: discovery.json is rewritten on change only.
                        rtt_ms: p.rtt_us.map(|us| (f64::from(us) / 100.0).round() / 10.0),
                        since_ms: p.since_ms,
                        code: match p.via {
                            paths::Via::Unreachable { code } => Some(code.to_string()),
                            _ => None,
                        },
                    }
                })
                .collect(),
        );
        self.addresses = Some(vrouter_state::AddressesStatus {
            local: self.underlay.addr,
            observed: self.observed,
            advertised: self.advertise,
            pinned: self.settings.advertise_addr.is_some(),
            port_translated: self.port_translated,
        });
        self.paths = decided;
        dests
    }

    /// Events for the path changes between the last decision and `decided`.
    fn report_paths(&self, decided: &BTreeMap<vrouter_gossip::NodeId, crate::paths::PeerPath>) {
        use crate::paths::{Change, Via};
        for (id, change) in crate::paths::changes(&self.paths, decided) {
            let p = &decided[&id];
            let host = p.peer_addr;
            let before = match change {
                Change::AddressInUse { old } => {
                    self.event(
                        EventKind::PeerAddressChanged,
                        format!(
                            "host {host} (node {id}) is now reached at {} (was {old}): {}",
                            p.addr_in_use,
                            if p.addr_in_use == host {
                                "its announced address"
                            } else {
                                "the address its path probes answer at (it is behind a NAT)"
                            }
                        ),
                        None,
                    );
                    continue;
                }
                Change::Way { before } => before,
            };
            match p.via {
                Via::Direct => self.event(
                    EventKind::PathDirect,
                    format!(
                        "traffic to host {host} (node {id}) goes directly again, to {}: {}",
                        p.addr_in_use,
                        match before {
                            Via::Relay { node, .. } => format!(
                                "its path probes have been answered for {} ms (it went through relay {node})",
                                crate::paths::RETURN_HOLD_MS
                            ),
                            _ => "its path probes are answered again".to_string(),
                        }
                    ),
                    None,
                ),
                Via::Relay { node, addr } => self.event(
                    EventKind::PathRelayed,
                    format!(
                        "traffic to host {host} (node {id}) now goes through relay host {addr} (node {node}){}: {}",
                        p.rtt_us
                            .map(|us| format!(", RTT {:.1} ms", f64::from(us) / 1000.0))
                            .unwrap_or_default(),
                        match before {
                            Via::Relay { node: old, .. } => {
                                format!("relay {old} is gone or much slower")
                            }
                            _ => "the direct path answers no probe".to_string(),
                        }
                    ),
                    None,
                ),
                Via::Unreachable { code } => {
                    let fix = if code == "nat_port_translated" {
                        self.nat_fix()
                    } else {
                        format!(
                            "set VROUTER_RELAY=true on a host both reach (UDP ports {} and {} open to both), or open UDP between the two hosts",
                            self.settings.gossip_port, self.settings.vxlan_port
                        )
                    };
                    self.event_because(
                        EventKind::PathUnreachable,
                        code,
                        format!(
                            "host {host} (node {id}) answers no path probe and no relay reaches it; its direct FDB row stays. Fix: {fix}"
                        ),
                        None,
                    );
                    if code == "nat_port_translated" {
                        self.event(
                            EventKind::NatPortTranslated,
                            format!(
                                "host {host} (node {id}) cannot be reached: {} behind a NAT that rewrites ports, and traffic between the two is not encrypted. Fix: {}",
                                if self.port_translated { "this host is" } else { "it is" },
                                self.nat_fix()
                            ),
                            None,
                        );
                    }
                }
            }
        }
    }

    /// The fix for a port-translating NAT without encryption.
    fn nat_fix(&self) -> String {
        format!(
            "set VROUTER_ENCRYPTION=prefer or require on both hosts (WireGuard keeps the NAT open from inside), or forward UDP ports {},{} to the host behind the NAT and set VROUTER_ADVERTISE_ADDR there",
            self.settings.gossip_port, self.settings.vxlan_port
        )
    }

    /// This host's reflection from gossip: events on change.
    fn note_reflection(&mut self, observed: Option<Ipv4Addr>, port_translated: bool) {
        if observed != self.observed {
            self.event(
                EventKind::AddressObserved,
                match observed {
                    Some(o) => format!(
                        "peers see this host at {o} (local address {}): it is behind a NAT; peers outside it use {o}, peers inside use {}",
                        self.underlay.addr, self.advertise
                    ),
                    None => format!(
                        "peers see this host at its local address {} again (no NAT between them)",
                        self.underlay.addr
                    ),
                },
                None,
            );
        }
        if port_translated && !self.port_translated && !self.settings.encryption_on() {
            self.event(
                EventKind::NatPortTranslated,
                format!(
                    "this host is behind a NAT that rewrites ports (peers see it at {}, from other ports than its own): peers outside cannot reach its gossip and VXLAN ports. Fix: {}",
                    observed.map(|o| o.to_string()).unwrap_or_else(|| "?".into()),
                    self.nat_fix()
                ),
                None,
            );
        }
        self.observed = observed;
        self.port_translated = port_translated;
    }

    /// The relay's transit table brought to `plan` (only VNIs whose device exists),
    /// and its counters read into discovery.json's `relay`.
    fn transit_pass(
        &mut self,
        mut plan: crate::transit::TransitPlan,
        devices: &BTreeMap<Vni, Link>,
    ) {
        plan.vnis.retain(|v| devices.contains_key(v));
        plan.macs.retain(|v, _| devices.contains_key(v));
        let table = self.relay_table();
        if !plan.is_empty() || self.transit_applied {
            match crate::transit::apply(&table, &plan) {
                Ok(()) => {
                    crash::point("discovery.after_transit");
                    self.transit_applied = !plan.is_empty()
                }
                // Nothing wanted and nothing to remove (no nftables): fine.
                Err(_) if plan.is_empty() && !self.settings.relay => self.transit_applied = false,
                Err(e) => {
                    let msg = format!("{e:#}");
                    if self.relay_error.as_ref() != Some(&msg) {
                        self.event_because(
                            EventKind::Error,
                            "relay_failed",
                            format!("cannot program the relay table netdev {table}: {msg}; this host does not forward between other hosts meanwhile"),
                            None,
                        );
                    }
                    self.relay_error = Some(msg);
                }
            }
            if self.transit_applied || plan.is_empty() {
                self.relay_error = None;
            }
        }
        if self.gossip.is_none() {
            self.relay_status = None;
            return;
        }
        let counters = if self.transit_applied {
            crate::transit::counters(&table).unwrap_or_default()
        } else {
            BTreeMap::new()
        };
        self.relay_status = Some(vrouter_state::RelayStatus {
            offered: self.settings.relay,
            vnis: plan.vnis.iter().copied().collect(),
            forwarded_packets: counters.values().map(|c| c.0).sum(),
            forwarded_bytes: counters.values().map(|c| c.1).sum(),
            per_vni: counters
                .iter()
                .map(|(vni, (packets, bytes))| vrouter_state::RelayVni {
                    vni: *vni,
                    packets: *packets,
                    bytes: *bytes,
                })
                .collect(),
        });
    }

    fn encryption_note(&self, n: crate::wireguard::Note) {
        use crate::wireguard::Note;
        match n {
            Note::Started {
                backend,
                public_key,
                tunnel,
            } => self.event(
                EventKind::EncryptionStarted,
                format!(
                    "encryption {}: WireGuard device {} up ({} backend), public key {public_key}, tunnel address {tunnel}, port {}, overlay MTU {}",
                    self.settings.encryption,
                    self.settings.wg_device,
                    match backend {
                        vrouter_wg::BackendKind::Kernel => "kernel",
                        vrouter_wg::BackendKind::Userspace => "userspace",
                    },
                    self.settings.wg_port,
                    self.overlay_mtu()
                ),
                None,
            ),
            Note::Stale { host, age } => self.event(
                EventKind::WgHandshakeStale,
                format!(
                    "host {host}: no WireGuard handshake for {} s (over VROUTER_WG_STALE_SECS={}) while it is routed; check that UDP port {} is open between the hosts and that its discovery runs",
                    age.as_secs(),
                    self.settings.wg_stale_secs,
                    self.settings.wg_port
                ),
                None,
            ),
            Note::RotationCompleted {
                new,
                waited,
                laggards,
            } => self.event(
                EventKind::KeyRotationCompleted,
                format!(
                    "key rotation completed: {new} is now this host's key (waited {} ms; laggards: {})",
                    waited.as_millis(),
                    if laggards.is_empty() {
                        "none".to_string()
                    } else {
                        laggards
                            .iter()
                            .map(|h| h.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ),
                None,
            ),
            Note::Failed(msg) => {
                self.event_because(EventKind::Error, "encryption_failed", msg, None)
            }
        }
    }

    /// What this host announces about its encryption before its first reconcile: the
    /// tunnel address computed over the hosts the previous run knew (discovery.json),
    /// so a restart announces what it announced before and no peer that requires
    /// encryption refuses it meanwhile.
    pub fn encryption_at_start(&self) -> Option<vrouter_gossip::record::Encryption> {
        if self.tunnel.is_none() {
            return self.announcement(None);
        }
        let mut hosts: BTreeSet<Ipv4Addr> = self.peers.iter().map(|p| p.addr).collect();
        hosts.extend(self.remembered.iter().map(|p| p.addr));
        if let Some(g) = self.last_discovery.as_ref().and_then(|d| d.gossip.as_ref()) {
            hosts.extend(g.members.iter().map(|m| m.underlay));
        }
        hosts.insert(self.advertise);
        let a = crate::tunnel::assign(self.settings.tunnel_range, &hosts);
        self.announcement(a.addresses.get(&self.advertise).copied())
    }

    /// This host's encryption in its gossip record: mode off and no key, or the
    /// tunnel's keys and `tunnel` address.
    fn announcement(&self, tunnel: Option<Ipv4Addr>) -> Option<vrouter_gossip::record::Encryption> {
        match &self.tunnel {
            Some(t) => t.announcement(tunnel),
            None => Some(vrouter_gossip::record::Encryption {
                mode: vrouter_state::EncryptionMode::Off,
                public_key: None,
                next_public_key: None,
                tunnel: None,
                wg_port: self.settings.wg_port,
            }),
        }
    }

    /// `vrouter-discovery rotate-key`: the next key is written, then announced by the
    /// reconcile that follows this input.
    pub fn rotate_key(&mut self) -> DiscoveryMessage {
        let Some(t) = self.tunnel.as_mut() else {
            return DiscoveryMessage::Refused {
                reason: "this discovery runs with VROUTER_ENCRYPTION=off; there is no WireGuard key to rotate".into(),
            };
        };
        match t.start_rotation() {
            Ok((old, new)) => {
                self.event(
                    EventKind::KeyRotationStarted,
                    format!(
                        "key rotation started: old {old}, new {new}; peers switch to the new key as they see it, and it becomes the key once every routed peer uses it (at most {} s)",
                        self.settings.wg_rotation_secs
                    ),
                    None,
                );
                DiscoveryMessage::Rotating {
                    old: old.to_string(),
                    new: new.to_string(),
                }
            }
            Err(reason) => {
                self.event_because(
                    EventKind::Error,
                    "key_rotation_refused",
                    reason.clone(),
                    None,
                );
                DiscoveryMessage::Refused { reason }
            }
        }
    }

    /// On shutdown: the WireGuard engine stops; its device stays (a restart adopts it).
    pub async fn shutdown(&mut self) {
        if let Some(t) = self.tunnel.as_mut() {
            t.close().await;
        }
    }

    /// The fast steering pass, on a bridge change between reconciles: the local
    /// stacks of the last reconcile, their bridges dumped again.
    pub async fn steer_now(&mut self) {
        let local = self.last_local.clone();
        self.steer_pass(&local).await;
        if let Err(e) = self.write_discovery(&local) {
            warn!("cannot write discovery.json after a steering pass: {e:#}");
        }
        self.settle_state();
    }

    /// One steering pass: observe the stacks' bridges, decide (`steer::plan`), and
    /// replace the netdev table when it differs from what was last applied or the
    /// kernel's copy is missing or different; in `rule` mode delete it. The status
    /// for discovery.json is recorded; events report status changes and failures.
    async fn steer_pass(&mut self, local: &[LocalRouter]) {
        let table = self.settings.steering_table.clone();
        let stacks = match self.steering_facts(local).await {
            Ok(s) => s,
            Err(e) => {
                self.steer_failed(format!(
                    "cannot observe the stacks' bridges for port steering: {e}"
                ));
                return;
            }
        };
        let stacks_status = match self.settings.steering {
            SteeringMode::Rule => {
                if self.steer_applied.is_some() || !self.steer_cleared {
                    match crate::steering::delete(&table) {
                        Ok(()) => {
                            self.steer_applied = None;
                            self.steer_cleared = true;
                            self.steer_error = None;
                        }
                        Err(e) => self.steer_failed(format!(
                            "cannot delete the steering table netdev {table} (VROUTER_STEERING=rule): {e}"
                        )),
                    }
                }
                steer::rule_mode(&stacks)
            }
            SteeringMode::Ports => self.steer_ports(&table, stacks).await,
        };
        let status = SteeringStatus {
            mode: self.settings.steering,
            table,
            stacks: stacks_status,
        };
        let first_and_empty = self.steer_status.is_none() && status.stacks.is_empty();
        if !first_and_empty && self.steer_status.as_ref().map(|s| &s.stacks) != Some(&status.stacks)
        {
            self.event(
                EventKind::SteeringApplied,
                format!(
                    "port steering ({}): {}",
                    mode_name(status.mode),
                    summary(&status.stacks)
                ),
                None,
            );
        }
        self.steer_status = Some(status);
    }

    /// `ports` mode: plan and apply, once more with fresh facts if the kernel refuses
    /// (a port may have gone between the dump and the replace).
    async fn steer_ports(
        &mut self,
        table: &str,
        mut stacks: Vec<StackFacts>,
    ) -> BTreeMap<StackName, StackSteering> {
        let mut failure = String::new();
        for attempt in 0..2 {
            if attempt > 0 {
                match self.steering_facts(&self.last_local.clone()).await {
                    Ok(s) => stacks = s,
                    Err(_) => break,
                }
            }
            let counters = crate::steering::read_counters(table);
            let facts = steer::Facts {
                table: table.to_string(),
                stacks: stacks.clone(),
                counters: counters.as_ref().cloned().unwrap_or_default(),
            };
            let plan = steer::plan(&facts);
            let in_kernel: Option<std::collections::BTreeSet<String>> =
                counters.ok().map(|c| c.into_keys().collect());
            let action = steer::apply_action(
                plan.table.as_ref(),
                self.steer_applied.as_ref(),
                in_kernel.as_ref(),
            );
            let applied = match (action, &plan.table) {
                (steer::Apply::Replace, Some(t)) => crate::steering::replace(t),
                (steer::Apply::Delete, _) => crate::steering::delete(table),
                _ => Ok(()),
            };
            if applied.is_ok() && matches!(action, steer::Apply::Replace | steer::Apply::Delete) {
                // The port-steering table replaced (or deleted).
                crash::point("discovery.after_steering");
            }
            match applied {
                Ok(()) => {
                    self.steer_applied = plan.table;
                    self.steer_error = None;
                    return plan.stacks;
                }
                Err(e) => {
                    failure = format!(
                        "the kernel refused the steering table netdev {table}: {e}; the previous table stays, stacks it does not cover keep the policy-rule path"
                    );
                }
            }
        }
        self.steer_failed(failure.clone());
        // What the old table (if any) still steers keeps its status; the rest runs on
        // the policy rule.
        let previous = self.steer_status.as_ref().map(|s| s.stacks.clone());
        stacks
            .iter()
            .map(|s| {
                let kept = previous
                    .as_ref()
                    .and_then(|p| p.get(&s.spec.name))
                    .filter(|p| p.mode == SteeringMode::Ports && self.steer_applied.is_some())
                    .cloned();
                let status = kept.unwrap_or_else(|| StackSteering {
                    mode: SteeringMode::Rule,
                    reason: Some(failure.clone()),
                    ports: Vec::new(),
                });
                (s.spec.name.clone(), status)
            })
            .collect()
    }

    fn steer_failed(&mut self, message: String) {
        if self.steer_error.as_ref() != Some(&message) {
            self.event(EventKind::SteeringFailed, message.clone(), None);
            self.steer_error = Some(message);
        }
    }

    /// What the steering pass needs to know of each local stack, from fresh dumps of
    /// its bridge (ports and FDB) and its VNI's device.
    async fn steering_facts(
        &mut self,
        local: &[LocalRouter],
    ) -> Result<Vec<StackFacts>, KernelError> {
        let k = self.kernel.clone();
        let bridges: Vec<u32> = local
            .iter()
            .filter_map(|l| l.bridge.as_ref().map(|b| b.1))
            .collect();
        // One dump each for every bridge: a pass costs the same for 1 stack or 100.
        let ports_of = k.ports_of_bridges(&bridges).await?;
        let fdb_of = k.fdb_of_bridges(&bridges).await?;
        let mut memory = BTreeMap::new();
        let mut overlays: BTreeMap<Vni, Option<steer::Overlay>> = BTreeMap::new();
        let mut out = Vec::new();
        for l in local {
            let bridge = match &l.bridge {
                Some((name, index)) => {
                    let ports: Vec<steer::Port> = ports_of
                        .get(index)
                        .into_iter()
                        .flatten()
                        .map(|p| steer::Port {
                            index: p.index,
                            name: p.name.clone(),
                        })
                        .collect();
                    let fdb = fdb_of.get(index).cloned().unwrap_or_default();
                    let known = self.steer_memory.get(index).cloned().unwrap_or_default();
                    let (rows, kept) = steer::remember(&known, &fdb, &ports);
                    memory.insert(*index, kept);
                    Some(steer::Bridge {
                        name: name.clone(),
                        index: *index,
                        ports,
                        fdb: rows,
                    })
                }
                None => None,
            };
            // One lookup per VNI, however many stacks share it.
            let overlay = match overlays.get(&l.spec.vni) {
                Some(o) => *o,
                None => {
                    let o = if self.owned_vnis.contains(&l.spec.vni) {
                        k.link_by_name(&l.spec.vni.vxlan_ifname())
                            .await?
                            .filter(|d| d.up)
                            .map(|d| steer::Overlay {
                                index: d.index,
                                mtu: d.mtu,
                            })
                    } else {
                        None
                    };
                    overlays.insert(l.spec.vni, o);
                    o
                }
            };
            out.push(StackFacts {
                spec: l.spec.clone(),
                conntrack: self.registry.get(&l.spec.name).is_none_or(|e| e.conntrack),
                bridge,
                overlay,
                routes: self
                    .published
                    .get(&l.spec.name)
                    .map(|r| r.routes.clone())
                    .unwrap_or_default(),
            });
        }
        self.steer_memory = memory;
        Ok(out)
    }

    /// What the loop hands to `/readyz` after a reconcile.
    pub fn readiness(&self) -> crate::readiness::Readiness {
        crate::readiness::Readiness {
            routes_current: self.routes_current,
            unattached: self
                .registry
                .entries()
                .filter(|e| e.conn.is_none())
                .map(|e| e.spec.name.clone())
                .collect(),
            state_error: self.state_error.clone(),
            devices: self.devices_up.clone(),
            device_errors: self
                .failed_vnis
                .values()
                .cloned()
                .chain(self.tunnel.as_ref().and_then(|t| t.error()))
                .collect(),
            refused_local: self.refused_local.clone(),
        }
    }

    /// Notes the outcome of a state-directory write or check (the first failure of a
    /// reconcile counts; [`Controller::settle_state`] reports transitions).
    fn note_state<T>(
        &mut self,
        what: &str,
        r: Result<T, vrouter_state::StateError>,
    ) -> anyhow::Result<T> {
        r.map_err(|e| {
            if self.state_failure.is_none() {
                self.state_failure = Some(format!("{what}: {e}"));
            }
            e.into()
        })
    }

    /// At the end of a reconcile: the state directory is healthy if nothing failed.
    fn settle_state(&mut self) {
        let now = self.state_failure.take();
        match (&self.state_error, &now) {
            (None, Some(msg)) => self.event_because(
                EventKind::StateUnwritable,
                "state_write_failed",
                msg.clone(),
                None,
            ),
            (Some(_), None) => self.event(
                EventKind::StateWritable,
                format!(
                    "the state directory {} is writable again; the state files are current",
                    self.dir.path().display()
                ),
                None,
            ),
            _ => {}
        }
        self.state_error = now;
    }

    /// Records changes made by a timer reconcile that had no new input: drift.
    pub fn count_drift(&mut self, changes: usize) {
        if changes > 0 {
            self.drift_repairs += changes as u64;
            self.event(
                EventKind::DriftRepaired,
                format!(
                    "repaired {changes} kernel entr{} that drifted from the desired state",
                    if changes == 1 { "y" } else { "ies" }
                ),
                None,
            );
        }
    }

    /// One event per route that routes.json gained or lost, with the cause, appended
    /// in one batch ([`StateDir::append_events`]).
    fn report_route_changes(
        &self,
        new: &BTreeMap<StackName, StackRoutes>,
        want: &desired::Desired,
    ) {
        let generation = self.routes_generation;
        let events: Vec<Event> = diff::route_changes(&self.published, new, want)
            .into_iter()
            .map(|c| {
                let (stack, p, from) = (&c.stack, c.prefix, &c.from);
                if c.added {
                    Self::logged_event(
                        EventKind::RouteAdded,
                        c.reason,
                        format!("stack {stack}: {p} of stack {from} published (routes.json generation {generation})"),
                        Some(stack),
                    )
                } else {
                    Self::logged_event(
                        EventKind::RouteWithdrawn,
                        c.reason,
                        format!("stack {stack}: {p} of stack {from} withdrawn ({}; routes.json generation {generation})", c.reason.replace('_', " ")),
                        Some(stack),
                    )
                }
            })
            .collect();
        self.append_events(&events);
    }

    async fn dump_fdb(&self, devices: &BTreeMap<Vni, Link>) -> anyhow::Result<BTreeSet<FdbRow>> {
        let mut out = BTreeSet::new();
        for (vni, link) in devices {
            for FdbEntry {
                mac,
                dst,
                permanent,
                ..
            } in self.kernel.fdb(link.index).await?
            {
                if let (Some(dst), true) = (dst, permanent) {
                    out.insert(FdbRow {
                        vni: *vni,
                        mac,
                        dst,
                    });
                }
            }
        }
        Ok(out)
    }

    async fn apply(
        &self,
        change: &Change,
        devices: &BTreeMap<Vni, Link>,
    ) -> Result<(), KernelError> {
        let k = &self.kernel;
        let dev = |r: &FdbRow| devices.get(&r.vni).map(|l| l.index).unwrap_or(0);
        match change {
            Change::AppendFlood(r) => k.append_fdb(dev(r), r.mac, r.dst).await,
            Change::ReplaceRouterRow(r) => k.replace_fdb(dev(r), r.mac, r.dst).await,
            Change::DeleteFdb(r) => k.delete_fdb(dev(r), r.mac, Some(r.dst)).await,
            Change::ReplaceRoute(r) => k.replace_route(r).await,
            Change::DeleteRoute(r) => k.delete_route(r).await,
            Change::AddRule(r) => k.add_rule(r).await,
            Change::DeleteRule(r) => k.delete_rule(r).await,
        }
    }

    fn write_discovery(&mut self, local: &[LocalRouter]) -> anyhow::Result<()> {
        let mut file = DiscoveryFile {
            schema: SCHEMA_VERSION,
            generation: self.discovery_generation,
            updated_ms: 0,
            host: HostInfo {
                underlay_interface: self.underlay.ifname.clone(),
                local_addr: self.underlay.addr,
                advertise_addr: self.advertise,
                vxlan_port: self.settings.vxlan_port,
                underlay_mtu: self.underlay.mtu,
                overlay_mtu: Some(self.overlay_mtu()),
                pid: std::process::id(),
            },
            peers: self.all_peers.clone(),
            local_stacks: local
                .iter()
                .map(|l| {
                    let e = self.registry.get(&l.spec.name);
                    LocalStack {
                        spec: l.spec.clone(),
                        router_mac: l.spec.router_mac(),
                        bridge: l.bridge.as_ref().map(|b| b.0.clone()),
                        connected: e.is_some_and(|e| e.conn.is_some()),
                        acked_generation: e.map(|e| e.acked).unwrap_or(0),
                        generation: if self.gossip.is_some() {
                            self.claims.get(&l.spec.name).map_or(0, |c| c.generation)
                        } else {
                            0
                        },
                    }
                })
                .collect(),
            refused: self.refusals.clone(),
            devices: self.owned_vnis.iter().copied().collect(),
            drift_repairs: self.drift_repairs,
            gossip: self.gossip_status.clone(),
            steering: self.steer_status.clone(),
            encryption: self.enc_status.clone(),
            addresses: self.addresses.clone(),
            paths: self.path_status.clone(),
            relay: self.relay_status.clone(),
        };
        let unchanged = self.last_discovery.as_ref().is_some_and(|prev| {
            let mut p = prev.clone();
            p.updated_ms = 0;
            p.generation = file.generation;
            p == file
        });
        if unchanged {
            return Ok(());
        }
        file.generation = self.discovery_generation + 1;
        file.updated_ms = now_ms();
        let written = self.dir.write_discovery(&file);
        if self.note_state("writing discovery.json", written).is_err() {
            // Readiness reports it; the next reconcile tries again.
            return Ok(());
        }
        crash::point("discovery.after_discovery");
        self.discovery_generation += 1;
        self.last_discovery = Some(file);
        Ok(())
    }
}

/// Refuses a tunnel range that overlaps the underlay network, a host network (other
/// than the WireGuard device's own address in it) or a stack prefix known at start.
async fn check_tunnel_range(
    settings: &Settings,
    kernel: &Kernel,
    underlay: &Underlay,
    stacks: &[(String, Prefix)],
) -> anyhow::Result<()> {
    let links = kernel.links().await?;
    let wg_index = links
        .iter()
        .find(|l| l.name == settings.wg_device)
        .map(|l| l.index);
    let nets: Vec<Prefix> = kernel
        .addresses()
        .await?
        .iter()
        .filter(|a| Some(a.index) != wg_index && !a.addr.is_loopback())
        .map(|a| Prefix::containing(a.addr, a.prefix_len))
        .collect();
    let n = crate::tunnel::Neighbourhood {
        underlay: Some(Prefix::containing(underlay.addr, underlay.prefix_len)),
        host_networks: &nets,
        stacks,
    };
    crate::tunnel::check_range(settings.tunnel_range, &n).map_err(anyhow::Error::msg)
}

/// With encryption off: a WireGuard device (wireguard or tun link of the configured
/// name) and the `require` filter a previous run left are removed.
async fn remove_encryption_leftovers(settings: &Settings, kernel: &Kernel) {
    if let Ok(Some(l)) = kernel.link_by_name(&settings.wg_device).await {
        if matches!(l.kind.as_deref(), Some("wireguard") | Some("tun")) {
            match vrouter_wg::destroy(&settings.wg_device).await {
                Ok(()) => info!("encryption is off: removed the WireGuard device {}", l.name),
                Err(e) => warn!("cannot remove the WireGuard device {}: {e}", l.name),
            }
        }
    }
    if let Err(e) = crate::wireguard::delete_filter(&settings.steering_table) {
        warn!(
            "cannot remove nftables table ip {}: {e}",
            settings.steering_table
        );
    }
}

fn mode_name(m: SteeringMode) -> &'static str {
    match m {
        SteeringMode::Ports => "ports",
        SteeringMode::Rule => "rule",
    }
}

/// "a ports (veth1, vethr1); c rule: <reason>" for the steering events.
fn summary(stacks: &BTreeMap<StackName, StackSteering>) -> String {
    if stacks.is_empty() {
        return "no local stacks".into();
    }
    stacks
        .iter()
        .map(|(name, s)| match (&s.reason, s.ports.is_empty()) {
            (Some(r), _) => format!("{name} {}: {r}", mode_name(s.mode)),
            (None, false) => format!("{name} {} ({})", mode_name(s.mode), s.ports.join(", ")),
            (None, true) => format!("{name} {}", mode_name(s.mode)),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn join(prefixes: &[Prefix]) -> String {
    prefixes
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
