//! The gossip mesh's IO: one UDP socket and one task driving a sans-IO
//! `vrouter_gossip::Node`. The controller sends it this host's stacks and reads back a
//! snapshot of the members; the decision of what to route stays in the controller
//! (membership is not the datapath's liveness).

use crate::settings::Settings;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};
use vrouter_gossip::{
    ClaimedStack, Counters, Faults, GossipEvent, Keyring, MemberView, Node, NodeId, NodeRecord,
    Params,
};
use vrouter_state::StackName;

pub const NODE_ID_FILE: &str = "node-id";
pub const CLAIMS_FILE: &str = "claims.json";

/// What the controller reads.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub node_id: NodeId,
    pub addr: SocketAddrV4,
    pub keys: Vec<String>,
    pub insecure: bool,
    pub members: Vec<MemberView>,
    pub counters: Counters,
}

pub enum Cmd {
    Local {
        advertise: Ipv4Addr,
        vxlan_port: u16,
        stacks: Vec<ClaimedStack>,
    },
    Leave(oneshot::Sender<()>),
    Reload,
}

pub struct GossipHandle {
    pub node_id: NodeId,
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

    pub fn set_local(&self, advertise: Ipv4Addr, vxlan_port: u16, stacks: Vec<ClaimedStack>) {
        let _ = self.cmd.send(Cmd::Local {
            advertise,
            vxlan_port,
            stacks,
        });
    }

    pub fn reload(&self) {
        let _ = self.cmd.send(Cmd::Reload);
    }

    /// Leaves the mesh on purpose; returns once the tombstone went out.
    pub async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Leave(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        }
    }
}

/// Reads the node id from the state directory, or makes and stores a new one.
pub fn load_node_id(state_dir: &Path) -> anyhow::Result<NodeId> {
    let path = state_dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => s.parse::<NodeId>().map_err(|e| {
            anyhow::anyhow!(
                "{}: {e}; delete the file to get a new node id (other hosts then see a new node)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = [0u8; 8];
            use std::io::Read;
            std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
            let id = NodeId(u64::from_be_bytes(b));
            let tmp = state_dir.join(format!(".{NODE_ID_FILE}.tmp"));
            std::fs::write(&tmp, format!("{id}\n"))?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(state_dir)?.sync_all()?;
            Ok(id)
        }
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

/// When each local stack was first claimed, kept across restarts so a restart never
/// loses a prefix to a later claimant.
pub fn load_claims(state_dir: &Path) -> BTreeMap<StackName, u64> {
    std::fs::read(state_dir.join(CLAIMS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

pub fn store_claims(state_dir: &Path, claims: &BTreeMap<StackName, u64>) -> std::io::Result<()> {
    let path = state_dir.join(CLAIMS_FILE);
    let tmp = state_dir.join(format!(".{CLAIMS_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(claims)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(state_dir)?.sync_all()
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
    };
    let epoch = Instant::now();
    let mut seed = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut seed);
    }
    let node = Node::new(
        Params::default(),
        record,
        keyring.clone(),
        0,
        wall_ms(),
        u64::from_be_bytes(seed),
    );
    let shared = Arc::new(Mutex::new(Snapshot {
        node_id,
        addr,
        keys: keyring.fingerprints(),
        insecure: keyring.is_insecure(),
        members: Vec::new(),
        counters: Counters::default(),
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
                };
                task.run(cmd_rx).await
            })
        })?;
    Ok(GossipHandle {
        node_id,
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
}

impl Task {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
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
                        let now = self.now();
                        self.node.handle_packet(now, from, &buf[..n]);
                    }
                }
                _ = tokio::time::sleep(wait) => {
                    let now = self.now();
                    self.node.tick(now);
                }
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(Cmd::Local { advertise, vxlan_port, stacks }) => {
                        let now = self.now();
                        let addr = SocketAddrV4::new(advertise, self.settings.gossip_port);
                        if let Err(e) = self.node.update(now, addr, advertise, vxlan_port, stacks) {
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

    async fn flush(&mut self) {
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
        {
            let mut s = self.shared.lock().expect("snapshot lock");
            s.counters = self.node.counters().clone();
            if membership_changed || records_changed {
                s.members = self.node.members();
            }
        }
        if !ev.is_empty() {
            self.events.lock().expect("events lock").extend(ev);
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

    #[test]
    fn node_id_is_stable() {
        let dir = std::env::temp_dir().join(format!("vrt-nodeid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = load_node_id(&dir).unwrap();
        let b = load_node_id(&dir).unwrap();
        assert_eq!(a, b);
        std::fs::write(dir.join(NODE_ID_FILE), "garbage").unwrap();
        assert!(load_node_id(&dir)
            .unwrap_err()
            .to_string()
            .contains("16 hex"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn names_resolve_with_the_default_port() {
        let a = resolve(&["localhost".into(), "127.0.0.2:9000".into()], 7950).await;
        assert!(a.contains(&"127.0.0.1:7950".parse().unwrap()), "{a:?}");
        assert!(a.contains(&"127.0.0.2:9000".parse().unwrap()), "{a:?}");
    }
}
