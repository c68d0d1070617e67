//! The gossip mesh's IO: one UDP socket and one task driving a sans-IO
//! `vrouter_gossip::Node`. The controller sends it this host's stacks and reads back a
//! snapshot of the members; the decision of what to route stays in the controller
//! (membership is not the datapath's liveness).

use crate::placement::{Claim, Remembered};
use crate::settings::Settings;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};
use vrouter_gossip::{
    record::Encryption, ClaimedStack, Counters, Faults, GossipEvent, Keyring, MemberView, Node,
    NodeId, NodeRecord, Params, PathParams, PathView, Reflection, ReplayState,
};
use vrouter_state::{PrivateDir, StackName, StateDir};

pub const NODE_ID_FILE: &str = "node-id";
pub const CLAIMS_FILE: &str = "claims.json";
/// The highest placement generation seen of each stack name (private directory).
pub const GENERATIONS_FILE: &str = "generations.json";
/// Replay protection's state (in the private directory), see [`ReplayFile`].
pub const REPLAY_FILE: &str = "replay.json";
/// How often the replay state is stored while nothing else asks for it.
const REPLAY_SAVE_EVERY: Duration = Duration::from_secs(10);

/// Where the gossip node's replay state lives across restarts: the sequence numbers
/// this node reserved (so it starts above them whatever the clock says) and the newest
/// number heard from each peer (so a packet captured before a restart stays rejected).
/// Stored when a reservation is half used, every 10 s, and when the task stops.
pub struct ReplayFile {
    dir: PathBuf,
}

/// replay.json: a schema number, then the state.
#[derive(serde::Serialize, serde::Deserialize)]
struct ReplayDoc {
    schema: u32,
    #[serde(flatten)]
    state: ReplayState,
}

impl ReplayFile {
    pub fn new(private_dir: &std::path::Path) -> ReplayFile {
        ReplayFile {
            dir: private_dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(REPLAY_FILE)
    }

    /// The stored state; none (with the reason) when missing or unreadable. Read
    /// like every private file: no links, regular files only, a size cap.
    pub fn load(&self) -> Result<Option<ReplayState>, String> {
        let path = self.path();
        let bytes = match PrivateDir::open(&self.dir).and_then(|d| d.read(REPLAY_FILE, REPLAY_CAP))
        {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        match serde_json::from_slice::<ReplayDoc>(&bytes) {
            Ok(d) if d.schema == 1 => Ok(Some(d.state)),
            Ok(d) => Err(format!(
                "{} has schema {}, this version writes 1",
                path.display(),
                d.schema
            )),
            Err(e) => Err(format!("{} is not valid: {e}", path.display())),
        }
    }

    /// Stores `state` atomically through the one atomic writer, creating the private
    /// directory (0700) if missing.
    pub fn store(&self, state: &ReplayState) -> anyhow::Result<()> {
        let doc = ReplayDoc {
            schema: 1,
            state: state.clone(),
        };
        let mut bytes = serde_json::to_vec(&doc)?;
        bytes.push(b'\n');
        PrivateDir::open(&self.dir)?.write(REPLAY_FILE, &bytes)?;
        Ok(())
    }
}

/// Largest replay.json read back: 65,536 peer windows of ~40 bytes, with room.
const REPLAY_CAP: u64 = 8 << 20;

/// What the controller reads.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub node_id: NodeId,
    pub addr: SocketAddrV4,
    pub keys: Vec<String>,
    pub insecure: bool,
    pub members: Vec<MemberView>,
    pub counters: Counters,
    /// This node's path probes, one view per target (issue 17).
    pub paths: Vec<PathView>,
    /// The address peers see this node at.
    pub reflection: Reflection,
}

pub enum Cmd {
    Local {
        advertise: Ipv4Addr,
        vxlan_port: u16,
        stacks: Vec<ClaimedStack>,
        encryption: Option<Encryption>,
    },
    Leave(oneshot::Sender<()>),
    Reload,
    /// The nodes to probe paths to (issue 17).
    PathTargets(BTreeSet<NodeId>),
}

pub struct GossipHandle {
    pub node_id: NodeId,
    /// The gossip node's clock starts here (its monotonic ms, as in `PathView`).
    epoch: Instant,
    shared: Arc<Mutex<Snapshot>>,
    events: Arc<Mutex<Vec<GossipEvent>>>,
    cmd: mpsc::UnboundedSender<Cmd>,
}

impl GossipHandle {
    pub fn snapshot(&self) -> Snapshot {
        self.shared.lock().expect("snapshot lock").clone()
    }

    pub fn take_events(&self) -> Vec<GossipEvent> {
        std::mem::take(&mut *self.events.lock().expect("events lock"))
    }

    pub fn set_local(
        &self,
        advertise: Ipv4Addr,
        vxlan_port: u16,
        stacks: Vec<ClaimedStack>,
        encryption: Option<Encryption>,
    ) {
        let _ = self.cmd.send(Cmd::Local {
            advertise,
            vxlan_port,
            stacks,
            encryption,
        });
    }

    pub fn reload(&self) {
        let _ = self.cmd.send(Cmd::Reload);
    }

    /// The gossip node's monotonic clock, in ms (the time base of its path views).
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn set_path_targets(&self, ids: BTreeSet<NodeId>) {
        let _ = self.cmd.send(Cmd::PathTargets(ids));
    }

    /// Leaves the mesh on purpose; returns once the tombstone went out.
    pub async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Leave(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        }
    }
}

/// Cap on reads of discovery's small private files (node id, claims).
const PRIVATE_FILE_CAP: u64 = 1024 * 1024;

fn private(dir: &StateDir) -> anyhow::Result<&PrivateDir> {
    dir.private().ok_or_else(|| {
        anyhow::anyhow!("the state directory was opened without discovery's private directory")
    })
}

/// `name` as an older version left it in the shared directory, read safely (no link,
/// no FIFO, capped); None when absent or unusable.
fn legacy_file(dir: &StateDir, name: &str) -> Option<Vec<u8>> {
    let shared = vrouter_state::fsio::Dir::open(dir.path()).ok()?;
    match shared.read(name, PRIVATE_FILE_CAP) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            warn!("ignoring {name} of an older version in the shared directory: {e}");
            None
        }
    }
}

/// Reads the node id from the private directory, or makes and stores a new one. On the
/// first start after an upgrade, the id an older version kept in the shared directory
/// is adopted once (if it parses), so other hosts keep seeing the same node; from then
/// on only the private copy counts.
pub fn load_node_id(dir: &StateDir) -> anyhow::Result<NodeId> {
    let private = private(dir)?;
    let path = private.path().join(NODE_ID_FILE);
    if let Some(bytes) = private.read(NODE_ID_FILE, PRIVATE_FILE_CAP)? {
        return String::from_utf8_lossy(&bytes)
            .parse::<NodeId>()
            .map_err(|e| {
                anyhow::anyhow!(
                "{}: {e}; delete the file to get a new node id (other hosts then see a new node)",
                path.display()
            )
            });
    }
    let adopted = legacy_file(dir, NODE_ID_FILE)
        .and_then(|b| String::from_utf8_lossy(&b).parse::<NodeId>().ok());
    let id = match adopted {
        Some(id) => {
            info!(
                "adopted node id {id} from {} (kept by an older version); it now lives in {}",
                dir.path().join(NODE_ID_FILE).display(),
                path.display()
            );
            id
        }
        None => NodeId(vrouter_state::fsio::random_u64()),
    };
    private.write(NODE_ID_FILE, format!("{id}\n").as_bytes())?;
    Ok(id)
}

/// When each local stack was first claimed and its placement generation, kept across
/// restarts so a restart never loses a prefix to a later claimant nor its placement
/// to another copy. Kept in the private directory: claims decide conflicts mesh-wide.
/// An older version's format (a bare claim time per stack) reads as generation 0.
/// After an upgrade an older version's claims.json in the shared directory is adopted
/// once.
pub fn load_claims(dir: &StateDir) -> BTreeMap<StackName, Claim> {
    let Ok(private) = private(dir) else {
        return BTreeMap::new();
    };
    match private.read(CLAIMS_FILE, PRIVATE_FILE_CAP) {
        Ok(Some(b)) => return crate::placement::parse_claims(&b).unwrap_or_default(),
        Ok(None) => {}
        Err(e) => {
            warn!("{e}");
            return BTreeMap::new();
        }
    }
    let adopted = legacy_file(dir, CLAIMS_FILE).and_then(|b| crate::placement::parse_claims(&b));
    match adopted {
        Some(claims) => {
            info!("adopted {} claim(s) from the shared directory's claims.json (kept by an older version)", claims.len());
            if let Err(e) = store_claims(dir, &claims) {
                warn!("cannot store claims.json: {e}");
            }
            claims
        }
        None => BTreeMap::new(),
    }
}

pub fn store_claims(dir: &StateDir, claims: &BTreeMap<StackName, Claim>) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec_pretty(claims)?;
    private(dir)?.write(CLAIMS_FILE, &bytes)?;
    Ok(())
}

/// The highest placement generation seen of each stack name (private
/// `generations.json`, bounded: see [`crate::placement::Remembered`]); empty when
/// absent or unreadable.
pub fn load_generations(dir: &StateDir) -> Remembered {
    let Ok(private) = private(dir) else {
        return Remembered::default();
    };
    match private.read(GENERATIONS_FILE, PRIVATE_FILE_CAP) {
        Ok(Some(b)) => Remembered::parse(&b),
        Ok(None) => Remembered::default(),
        Err(e) => {
            warn!("{e}");
            Remembered::default()
        }
    }
}

/// Writes generations.json (failures are logged: it only sharpens fresh claims).
pub fn store_generations(dir: &StateDir, g: &Remembered) {
    let write = || -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(g)?;
        private(dir)?.write(GENERATIONS_FILE, &bytes)?;
        Ok(())
    };
    if let Err(e) = write() {
        warn!("cannot store {GENERATIONS_FILE}: {e}");
    }
}

/// The keys from the settings: the secret file, else the inline secrets, else the
/// insecure key if allowed. Errors name the setting and the fix.
pub fn load_keyring(s: &Settings) -> Result<Keyring, String> {
    if let Some(path) = &s.secret_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read the gossip secret file {} (--secret-file / VROUTER_SECRET_FILE): {e}",
                path.display()
            )
        })?;
        let lines: Vec<&str> = text.lines().collect();
        return Keyring::from_secrets(&lines).map_err(|e| {
            format!(
                "gossip secret file {} (--secret-file / VROUTER_SECRET_FILE): {e}",
                path.display()
            )
        });
    }
    if let Some(text) = &s.secret {
        let parts: Vec<&str> = text.split(',').collect();
        return Keyring::from_secrets(&parts)
            .map_err(|e| format!("--secret / VROUTER_SECRET: {e}"));
    }
    if s.insecure {
        return Ok(Keyring::insecure());
    }
    Err("gossip needs a shared secret: set VROUTER_SECRET_FILE (one secret per line) or VROUTER_SECRET, or pass --insecure to run an unauthenticated lab mesh".into())
}

/// Bootstrap peers from the settings and the config file's `join = [...]`.
pub fn join_specs(s: &Settings) -> Vec<String> {
    let mut out: Vec<String> = s.join.iter().map(|j| j.trim().to_string()).collect();
    if let Some(path) = &s.config {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(v) = text.parse::<toml::Table>() {
                if let Some(arr) = v.get("join").and_then(|j| j.as_array()) {
                    out.extend(
                        arr.iter()
                            .filter_map(|x| x.as_str())
                            .map(|x| x.trim().to_string()),
                    );
                }
            }
        }
    }
    out.retain(|j| !j.is_empty());
    out.sort();
    out.dedup();
    out
}

/// Resolves `host[:port]` specs (names through the system resolver).
async fn resolve(specs: &[String], default_port: u16) -> Vec<SocketAddrV4> {
    let mut out = Vec::new();
    for spec in specs {
        let with_port = if spec
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            spec.clone()
        } else {
            format!("{spec}:{default_port}")
        };
        match tokio::net::lookup_host(with_port.clone()).await {
            Ok(addrs) => out.extend(addrs.filter_map(|a| match a {
                std::net::SocketAddr::V4(v4) => Some(v4),
                _ => None,
            })),
            Err(e) => warn!("cannot resolve gossip bootstrap peer {spec}: {e}"),
        }
    }
    out.sort();
    out.dedup();
    out
}

fn wall_ms() -> u64 {
    vrouter_state::now_ms()
}

/// Binds the socket and starts the task. `changed` is poked whenever members, records
/// or events changed, so the control loop reconciles.
pub async fn start(
    settings: &Settings,
    node_id: NodeId,
    advertise: Ipv4Addr,
    stacks: Vec<ClaimedStack>,
    encryption: Option<Encryption>,
    changed: mpsc::Sender<()>,
) -> anyhow::Result<GossipHandle> {
    let keyring = load_keyring(settings).map_err(anyhow::Error::msg)?;
    if keyring.is_insecure() {
        warn!("gossip runs WITHOUT a secret (--insecure): anyone who reaches UDP port {} can join and announce routes", settings.gossip_port);
    }
    let bind = SocketAddrV4::new(settings.gossip_bind, settings.gossip_port);
    let socket = std::net::UdpSocket::bind(bind).map_err(|e| {
        anyhow::anyhow!(
            "cannot bind the gossip socket {bind}: {e}; another process holds UDP port {} (Docker Swarm uses 7946), choose another with VROUTER_GOSSIP_PORT on every host",
            settings.gossip_port
        )
    })?;
    let addr = SocketAddrV4::new(advertise, settings.gossip_port);
    let record = NodeRecord {
        id: node_id,
        version: 0,
        gossip_addr: addr,
        underlay: advertise,
        vxlan_port: settings.vxlan_port,
        stacks,
        left: false,
        bump: 0,
        encryption,
        nat: None,
        relay: None,
    };
    let epoch = Instant::now();
    let mut seed = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut seed);
    }
    let mut node = Node::new(
        Params::default(),
        record,
        keyring.clone(),
        0,
        wall_ms(),
        u64::from_be_bytes(seed),
    );
    // Issue 17: path probes (targets come from the controller), the reflected address
    // unless VROUTER_ADVERTISE_ADDR pins one, and the relay offer.
    node.set_path_params(PathParams {
        probe_every_ms: settings.path_probe_ms,
        dead_after_ms: settings.path_dead_ms,
        ..PathParams::default()
    });
    node.set_reflect(settings.advertise_addr.is_none());
    node.set_relay(settings.relay);
    let replay = ReplayFile::new(&settings.private_dir());
    match replay.load() {
        Ok(Some(state)) => node.import_replay(&state),
        Ok(None) => {}
        Err(e) => warn!("{e}; starting without the stored replay state (packets from before this restart may be accepted once, and a clock that stepped back may delay this node's packets)"),
    }
    // Reserve sequence numbers before the first packet goes out.
    let replay_failing = save_replay(&mut node, &replay, false).is_err();
    let shared = Arc::new(Mutex::new(Snapshot {
        node_id,
        addr,
        keys: keyring.fingerprints(),
        insecure: keyring.is_insecure(),
        members: Vec::new(),
        counters: Counters::default(),
        paths: Vec::new(),
        reflection: Reflection::default(),
    }));
    let events = Arc::new(Mutex::new(Vec::new()));
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    info!(
        "gossip node {node_id} on {bind}, advertised as {addr}, keys {:?}",
        keyring.fingerprints()
    );
    socket.set_nonblocking(true)?;
    let (task_shared, task_events) = (shared.clone(), events.clone());
    let (task_settings, specs, stamp) = (
        settings.clone(),
        join_specs(settings),
        secret_stamp(settings),
    );
    // A thread and runtime of its own: SWIM must answer probes within 200 ms whatever
    // the control loop is doing (a reconcile that writes thousands of events, a slow
    // state directory), or a busy host is declared down and its stacks flap.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("gossip".into())
        .spawn(move || {
            runtime.block_on(async move {
                let socket = match UdpSocket::from_std(socket) {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("gossip socket: {e}; gossip stops");
                        return;
                    }
                };
                let task = Task {
                    node,
                    socket,
                    epoch,
                    shared: task_shared,
                    events: task_events,
                    changed,
                    settings: task_settings,
                    join_specs: specs,
                    secret_stamp: stamp,
                    last_view: Vec::new(),
                    last_paths: Vec::new(),
                    replay,
                    replay_saved: Instant::now(),
                    replay_failing,
                };
                task.run(cmd_rx).await
            })
        })?;
    Ok(GossipHandle {
        node_id,
        epoch,
        shared,
        events,
        cmd: cmd_tx,
    })
}

fn secret_stamp(s: &Settings) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(s.secret_file.as_ref()?).ok()?;
    Some((m.modified().ok()?, m.len()))
}

struct Task {
    node: Node,
    socket: UdpSocket,
    epoch: Instant,
    shared: Arc<Mutex<Snapshot>>,
    events: Arc<Mutex<Vec<GossipEvent>>>,
    changed: mpsc::Sender<()>,
    settings: Settings,
    join_specs: Vec<String>,
    secret_stamp: Option<(SystemTime, u64)>,
    last_view: Vec<(NodeId, vrouter_gossip::MemberState, u64)>,
    /// What of the paths and reflection the controller decides on, as last handed
    /// over: a change pokes a reconcile.
    last_paths: PathKey,
    replay: ReplayFile,
    replay_saved: Instant,
    /// The last store failed: retried every REPLAY_SAVE_EVERY, logged once.
    replay_failing: bool,
}

/// Stores the node's replay state and tells it so. A failure is logged unless the
/// previous attempt failed too (`quiet`).
fn save_replay(node: &mut Node, file: &ReplayFile, quiet: bool) -> anyhow::Result<()> {
    let state = node.export_replay();
    match file.store(&state) {
        Ok(()) => {
            node.replay_stored(state.seq_reserved);
            Ok(())
        }
        Err(e) => {
            if !quiet {
                warn!("cannot store the gossip replay state: {e:#}; gossip runs on, but after a restart packets captured before it may be accepted once; retrying every {} s", REPLAY_SAVE_EVERY.as_secs());
            }
            Err(e)
        }
    }
}

/// The task ends when the handle's command channel closes (discovery shutting down):
/// store the state one last time.
impl Drop for Task {
    fn drop(&mut self) {
        let _ = save_replay(&mut self.node, &self.replay, self.replay_failing);
    }
}

impl Task {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The node's clock in ms, with the same instant in µs handed to it first (path
    /// RTTs in microseconds).
    fn clock(&mut self) -> u64 {
        let us = self.epoch.elapsed().as_micros() as u64;
        self.node.set_clock_us(us);
        us / 1000
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        let mut buf = vec![0u8; 2048];
        let mut housekeeping = tokio::time::interval(Duration::from_millis(500));
        let mut next_resolve = Instant::now();
        let mut left: Option<oneshot::Sender<()>> = None;
        loop {
            let deadline = self.node.next_deadline();
            let wait = Duration::from_millis(deadline.saturating_sub(self.now()).min(1000));
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => {
                    if let Ok((n, std::net::SocketAddr::V4(from))) = r {
                        let now = self.clock();
                        self.node.handle_packet(now, from, &buf[..n]);
                    }
                }
                _ = tokio::time::sleep(wait) => {
                    let now = self.clock();
                    self.node.tick(now);
                }
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(Cmd::Local { advertise, vxlan_port, stacks, encryption }) => {
                        let now = self.now();
                        let addr = SocketAddrV4::new(advertise, self.settings.gossip_port);
                        if let Err(e) = self.node.update(now, addr, advertise, vxlan_port, stacks, encryption) {
                            warn!("{e}");
                        }
                        self.shared.lock().expect("snapshot lock").addr = addr;
                    }
                    Some(Cmd::Leave(reply)) => {
                        let now = self.now();
                        self.node.leave(now);
                        left = Some(reply);
                    }
                    Some(Cmd::Reload) => self.reload_keys(true),
                    Some(Cmd::PathTargets(ids)) => self.node.set_path_targets(ids),
                },
                _ = housekeeping.tick() => {
                    self.faults();
                    self.reload_keys(false);
                    if Instant::now() >= next_resolve {
                        // Re-resolve names: every 30 s, or every 2 s while alone.
                        let addrs = resolve(&self.join_specs, self.settings.gossip_port).await;
                        self.node.set_join(addrs);
                        let alone = self.node.active_members() == 0;
                        next_resolve = Instant::now() + Duration::from_secs(if alone { 2 } else { 30 });
                    }
                }
            }
            self.flush().await;
            if let Some(reply) = left.take() {
                let _ = reply.send(());
            }
        }
    }

    /// Stores the replay state when a reservation is half used or every 10 s; while
    /// storing fails, only every 10 s.
    fn maybe_save_replay(&mut self) {
        let periodic = self.replay_saved.elapsed() >= REPLAY_SAVE_EVERY;
        if !periodic && (self.replay_failing || !self.node.replay_due()) {
            return;
        }
        let failed = save_replay(&mut self.node, &self.replay, self.replay_failing).is_err();
        if self.replay_failing && !failed {
            info!(
                "gossip replay state stored again in {}",
                self.replay.path().display()
            );
        }
        self.replay_failing = failed;
        self.replay_saved = Instant::now();
    }

    async fn flush(&mut self) {
        // Before anything is sent: the reservation must cover every number used.
        self.maybe_save_replay();
        for (to, data) in self.node.take_outbox() {
            // Best effort, like any UDP gossip: a full buffer or an unreachable peer is
            // what SWIM's indirect probes and anti-entropy are for.
            let _ = self.socket.send_to(&data, to).await;
        }
        let ev = self.node.take_events();
        let records_changed = self.node.take_changed();
        let view: Vec<_> = self
            .node
            .members()
            .iter()
            .map(|m| (m.record.id, m.state, m.record.version))
            .collect();
        let membership_changed = view != self.last_view;
        let paths = self.node.paths();
        let reflection = self.node.reflection();
        let key = path_key(&paths, &reflection);
        let paths_changed = key != self.last_paths;
        {
            let mut s = self.shared.lock().expect("snapshot lock");
            s.counters = self.node.counters().clone();
            if membership_changed || records_changed {
                s.members = self.node.members();
            }
            s.paths = paths;
            s.reflection = reflection;
        }
        if !ev.is_empty() {
            self.events.lock().expect("events lock").extend(ev);
        }
        if paths_changed {
            self.last_paths = key;
            let _ = self.changed.try_send(());
        }
        if membership_changed || records_changed {
            self.last_view = view;
            let _ = self.changed.try_send(());
        }
    }

    fn faults(&mut self) {
        let Some(path) = &self.settings.test_faults else {
            return;
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let f = Faults {
            drop_broadcasts: text.lines().any(|l| l.trim() == "drop-broadcasts"),
        };
        self.node.set_faults(f);
    }

    fn reload_keys(&mut self, force: bool) {
        let stamp = secret_stamp(&self.settings);
        if !force && stamp == self.secret_stamp {
            return;
        }
        self.secret_stamp = stamp;
        match load_keyring(&self.settings) {
            Ok(k) => {
                let fp = k.fingerprints();
                if fp != self.node.keyring().fingerprints() {
                    info!(
                        "gossip keys reloaded: sending with {}, accepting {:?}",
                        fp[0], fp
                    );
                    let mut e = self.events.lock().expect("events lock");
                    let _ = &mut e;
                    self.node.set_keyring(k);
                    self.shared.lock().expect("snapshot lock").keys = fp;
                }
            }
            Err(e) => warn!("{e} (keeping the previous keys)"),
        }
    }
}

/// The parts of the path views and reflection a path decision depends on (RTT moves
/// alone do not poke a reconcile; the timer one picks them up).
type PathKey = Vec<(
    NodeId,
    bool,
    Option<SocketAddrV4>,
    bool,
    u64,
    Option<Ipv4Addr>,
    bool,
)>;

fn path_key(paths: &[PathView], r: &Reflection) -> PathKey {
    paths
        .iter()
        .map(|p| {
            (
                p.id,
                p.reachable,
                p.addr,
                p.acked_ever,
                p.since_ms,
                r.observed,
                r.port_translated,
            )
        })
        .chain(std::iter::once((
            NodeId(0),
            false,
            None,
            false,
            0,
            r.observed,
            r.port_translated,
        )))
        .collect()
}

/// The path of the secret file, for the config watcher.
pub fn watched(settings: &Settings) -> Vec<PathBuf> {
    settings.secret_file.iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn settings(args: &[&str]) -> Settings {
        let mut v = vec!["vrouter-discovery"];
        v.extend_from_slice(args);
        crate::settings::Cli::try_parse_from(v).unwrap().settings
    }

    #[test]
    fn gossip_refuses_to_start_without_a_secret() {
        let s = settings(&["--join", "198.18.0.1"]);
        assert!(s.gossip_enabled());
        let e = load_keyring(&s).unwrap_err();
        assert!(
            e.contains("VROUTER_SECRET_FILE") && e.contains("--insecure"),
            "{e}"
        );
        assert!(load_keyring(&settings(&["--insecure"]))
            .unwrap()
            .is_insecure());
        assert!(!settings(&[]).gossip_enabled());
    }

    #[test]
    fn secrets_from_file_and_inline() {
        let dir = std::env::temp_dir().join(format!("vrt-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("secret");
        std::fs::write(&f, "new-secret-0123456789\nold-secret-0123456789\n").unwrap();
        let k = load_keyring(&settings(&["--secret-file", f.to_str().unwrap()])).unwrap();
        assert_eq!(k.fingerprints().len(), 2);
        std::fs::write(&f, "short\n").unwrap();
        let e = load_keyring(&settings(&["--secret-file", f.to_str().unwrap()])).unwrap_err();
        assert!(
            e.contains(f.to_str().unwrap()) && e.contains("at least 16"),
            "{e}"
        );
        let e = load_keyring(&settings(&["--secret-file", "/nonexistent/secret"])).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
        let k = load_keyring(&settings(&[
            "--secret",
            "aaaaaaaaaaaaaaaaaaaa,bbbbbbbbbbbbbbbbbbbb",
        ]))
        .unwrap();
        assert_eq!(k.fingerprints().len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn join_from_flag_and_config_file() {
        let dir = std::env::temp_dir().join(format!("vrt-join-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("peers.toml");
        std::fs::write(&f, "join = [\"seed.example:7950\", \"198.18.0.9\"]\n").unwrap();
        let s = settings(&[
            "--join",
            "198.18.0.1, 198.18.0.2:8000",
            "--config",
            f.to_str().unwrap(),
        ]);
        assert_eq!(
            join_specs(&s),
            vec![
                "198.18.0.1",
                "198.18.0.2:8000",
                "198.18.0.9",
                "seed.example:7950"
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    struct Dirs(std::path::PathBuf);

    impl Dirs {
        fn new(tag: &str) -> Dirs {
            let d = std::env::temp_dir().join(format!("vrt-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            let _ = std::fs::remove_dir_all(d.with_extension("private"));
            std::fs::create_dir_all(&d).unwrap();
            Dirs(d)
        }
        fn private(&self) -> std::path::PathBuf {
            self.0.with_extension("private")
        }
        fn state(&self) -> StateDir {
            StateDir::open_discovery(&self.0, &self.private()).unwrap()
        }
    }

    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
            let _ = std::fs::remove_dir_all(self.private());
        }
    }

    #[test]
    fn node_id_is_stable_and_private() {
        let dirs = Dirs::new("nodeid");
        let a = load_node_id(&dirs.state()).unwrap();
        let b = load_node_id(&dirs.state()).unwrap();
        assert_eq!(a, b);
        assert!(
            !dirs.0.join(NODE_ID_FILE).exists(),
            "node id in the shared dir"
        );
        // A node id planted in the shared directory later changes nothing.
        std::fs::write(dirs.0.join(NODE_ID_FILE), "0123456789abcdef\n").unwrap();
        assert_eq!(load_node_id(&dirs.state()).unwrap(), a);
        std::fs::write(dirs.private().join(NODE_ID_FILE), "garbage").unwrap();
        assert!(load_node_id(&dirs.state())
            .unwrap_err()
            .to_string()
            .contains("16 hex"));
    }

    #[test]
    fn an_upgrade_adopts_the_old_node_id_and_claims_once() {
        let dirs = Dirs::new("upgrade");
        let old: NodeId = "00000000cafef00d".parse().unwrap();
        std::fs::write(dirs.0.join(NODE_ID_FILE), format!("{old}\n")).unwrap();
        let claims: BTreeMap<StackName, u64> =
            [(StackName::new("a").unwrap(), 1_700_000_000_000)].into();
        std::fs::write(
            dirs.0.join(CLAIMS_FILE),
            serde_json::to_vec(&claims).unwrap(),
        )
        .unwrap();
        // The old format (a bare claim time) reads as generation 0.
        let claims: BTreeMap<StackName, Claim> = claims
            .into_iter()
            .map(|(n, t)| {
                (
                    n,
                    Claim {
                        claimed_ms: t,
                        generation: 0,
                    },
                )
            })
            .collect();
        assert_eq!(load_node_id(&dirs.state()).unwrap(), old);
        assert_eq!(load_claims(&dirs.state()), claims);
        assert!(dirs.private().join(NODE_ID_FILE).is_file());
        assert!(dirs.private().join(CLAIMS_FILE).is_file());
        // From now on the shared copies are ignored.
        std::fs::write(dirs.0.join(NODE_ID_FILE), "0123456789abcdef\n").unwrap();
        std::fs::write(dirs.0.join(CLAIMS_FILE), b"{}").unwrap();
        assert_eq!(load_node_id(&dirs.state()).unwrap(), old);
        assert_eq!(load_claims(&dirs.state()), claims);
        // Claims and generations round-trip through the private directory.
        let mut c = claims.clone();
        c.get_mut(&StackName::new("a").unwrap()).unwrap().generation = 7;
        store_claims(&dirs.state(), &c).unwrap();
        assert_eq!(load_claims(&dirs.state()), c);
        assert_eq!(load_generations(&dirs.state()), Remembered::default());
        let mut g = Remembered::default();
        g.note(&StackName::new("a").unwrap(), 7, 5);
        store_generations(&dirs.state(), &g);
        assert_eq!(load_generations(&dirs.state()), g);
    }

    #[test]
    fn an_old_node_id_that_is_a_link_or_fifo_is_not_adopted() {
        let dirs = Dirs::new("upgrade-link");
        let elsewhere = dirs.0.join("elsewhere");
        std::fs::write(&elsewhere, "00000000cafef00d\n").unwrap();
        std::os::unix::fs::symlink(&elsewhere, dirs.0.join(NODE_ID_FILE)).unwrap();
        let id = load_node_id(&dirs.state()).unwrap();
        assert_ne!(id, "00000000cafef00d".parse().unwrap());
        nix::unistd::mkfifo(
            &dirs.0.join(CLAIMS_FILE),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let start = std::time::Instant::now();
        assert!(load_claims(&dirs.state()).is_empty());
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn replay_state_is_kept_in_the_private_dir() {
        let top = std::env::temp_dir().join(format!("vrt-replay-{}", std::process::id()));
        let dir = top.join("private");
        let f = ReplayFile::new(&dir);
        assert_eq!(f.load().unwrap(), None);
        let state = ReplayState {
            seq_reserved: 42,
            senders: vec![(7, 99), (8, 1)],
        };
        f.store(&state).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(f.load().unwrap(), Some(state));
        std::fs::write(f.path(), "{not json").unwrap();
        assert!(f.load().unwrap_err().contains("replay.json"));
        // A directory that cannot be made is an error for the caller to log, no panic.
        let bad = ReplayFile::new(&f.path().join("sub"));
        assert!(bad.store(&ReplayState::default()).is_err());
        std::fs::remove_dir_all(&top).unwrap();
    }

    fn node(id: u64, port: u16, wall: u64) -> Node {
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        let record = NodeRecord {
            id: NodeId(id),
            version: 0,
            gossip_addr: addr,
            underlay: Ipv4Addr::LOCALHOST,
            vxlan_port: 4789,
            stacks: Vec::new(),
            left: false,
            bump: 0,
            encryption: None,
            nat: None,
            relay: None,
        };
        let keys = Keyring::from_secrets(&["replay-test-secret-0123456789"]).unwrap();
        Node::new(Params::default(), record, keys, 0, wall, id)
    }

    /// Packets `a` sends while joining `b`'s address.
    fn packets(a: &mut Node, b_addr: SocketAddrV4, now: u64) -> Vec<Vec<u8>> {
        a.set_join(vec![b_addr]);
        a.tick(now);
        let out: Vec<Vec<u8>> = a.take_outbox().into_iter().map(|(_, p)| p).collect();
        assert!(!out.is_empty());
        out
    }

    #[test]
    fn replay_protection_survives_restarts_through_the_file() {
        let top = std::env::temp_dir().join(format!("vrt-replay2-{}", std::process::id()));
        let wall = 1_800_000_000_000;
        let (a_addr, b_addr) = (
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1),
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2),
        );
        let (a_file, b_file) = (
            ReplayFile::new(&top.join("a")),
            ReplayFile::new(&top.join("b")),
        );
        let mut a = node(1, 1, wall);
        save_replay(&mut a, &a_file, false).unwrap();
        let mut b = node(2, 2, wall);
        let captured = packets(&mut a, b_addr, 10);
        for p in &captured {
            b.handle_packet(10, a_addr, p);
        }
        assert_eq!(b.counters().rejected_replayed, 0);
        save_replay(&mut b, &b_file, false).unwrap();
        // b restarts: the captured packets are still old.
        let mut b = node(2, 2, wall + 60_000);
        b.import_replay(&b_file.load().unwrap().unwrap());
        for p in &captured {
            b.handle_packet(0, a_addr, p);
        }
        assert_eq!(b.counters().rejected_replayed, captured.len() as u64);
        // a restarts with its clock an hour back: its packets still get in.
        let mut a = node(1, 1, wall - 3_600_000);
        a.import_replay(&a_file.load().unwrap().unwrap());
        save_replay(&mut a, &a_file, false).unwrap();
        for p in packets(&mut a, b_addr, 10) {
            b.handle_packet(1, a_addr, &p);
        }
        assert_eq!(b.counters().rejected_replayed, captured.len() as u64);
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn path_changes_poke_but_rtt_moves_do_not() {
        let view = |reachable: bool, rtt: u32| PathView {
            id: NodeId(7),
            reachable,
            addr: reachable.then(|| SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 7950)),
            rtt_us: Some(rtt),
            since_ms: 10,
            acked_ever: true,
            learned: None,
        };
        let none = Reflection::default();
        let base = path_key(&[view(true, 500)], &none);
        assert_eq!(base, path_key(&[view(true, 900)], &none));
        assert_ne!(base, path_key(&[view(false, 500)], &none));
        let observed = Reflection {
            observed: Some(Ipv4Addr::new(203, 0, 113, 5)),
            ..Reflection::default()
        };
        assert_ne!(base, path_key(&[view(true, 500)], &observed));
        assert_ne!(path_key(&[], &none), path_key(&[], &observed));
    }

    #[tokio::test]
    async fn names_resolve_with_the_default_port() {
        let a = resolve(&["localhost".into(), "127.0.0.2:9000".into()], 7950).await;
        assert!(a.contains(&"127.0.0.1:7950".parse().unwrap()), "{a:?}");
        assert!(a.contains(&"127.0.0.2:9000".parse().unwrap()), "{a:?}");
    }
}
