//! The router's event loop: routes.json changes, the reconcile timer, messages from
//! discovery, probe results and signals, one at a time on one task.

use crate::access::{self, Access, Enforcer, Surround};
use crate::acl::Policy;
use crate::apply;
use crate::attach::{self, DiscoveryConn, Phase, RECONNECT_MIN, REFUSED_RETRY, REPLY_TIMEOUT};
use crate::desired::{
    Intent, ProbePath, RemoteRouter, RouteStyle, RoutingState, SameHostPeer, MAIN_TABLE,
};
use crate::diff::{diff, Change};
use crate::health::{check_routes, RouteCheck};
use crate::link::{self, OverlayLink, Surroundings};
use crate::overlay_probe::{self, HealthReport, ProbeConfig};
use crate::probe::{self, ProbeResult, ProbeTracker, PROBE_INTERVAL};
use crate::settings::{AclSettings, Settings};
use crate::traffic::{self, TrafficCounters};
use anyhow::Context;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use vrouter_kernel::Kernel;
use vrouter_state::attach::DiscoveryMessage;
use vrouter_state::EventKind;
use vrouter_state::{
    now_ms, AclRuleCounters, Event, Mac, RemoteRoute, RouterHealth, StackSpec, StateDir,
    ROUTES_FILE,
};

/// Why a reconcile runs; only the timer finds drift (the others bring new intent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Start,
    RoutesChanged,
    Attached,
    Timer,
}

pub struct Router {
    spec: StackSpec,
    source: String,
    overlay_name: String,
    mac: Mac,
    probe_path: Option<ProbePath>,
    socket_path: PathBuf,
    state: StateDir,
    kernel: Kernel,
    intent: Intent,
    discovery: DiscoveryConn,
    /// The routing state last applied in full, to tell drift from new intent.
    applied: Option<RoutingState>,
    /// Routes, neighbours and rules found wrong or missing and repaired, since start.
    drift_repairs: u64,
    /// Nexthop objects until the kernel refuses one, then plain routes for good.
    style: RouteStyle,
    last_apply_error: Option<String>,
    /// Why routes.json could not be read at the last try (the last good state stays).
    routes_error: Option<String>,
    /// The version of routes.json behind `intent`, when it was read without error.
    routes_stamp: Option<vrouter_state::fsio::Stamp>,
    /// The router's health, for the probes file.
    health: watch::Sender<Option<HealthReport>>,
    last_overlay: Option<OverlayLink>,
    probes: ProbeTracker,
    peers: watch::Sender<BTreeSet<SameHostPeer>>,
    /// The remote routers the overlay probe task probes.
    remote_routers: watch::Sender<BTreeSet<RemoteRouter>>,
    /// Per-remote-stack traffic counters (nftables), published to the probe task.
    traffic: TrafficCounters,
    /// When the last reconcile completed (ms since the epoch), for the healthcheck.
    heartbeat: Arc<AtomicU64>,
    /// Access control: the policy in the kernel (issue 14).
    access: Access<Box<dyn Enforcer>>,
    acl_settings: AclSettings,
    /// The rules' counters, published to the probe task.
    acl_counters: watch::Sender<Vec<AclRuleCounters>>,
    /// The overlay link is down because no access table could be installed (the
    /// router took it down, or adopted it without bringing it up).
    link_held: bool,
    /// Whether the stack's same-host traffic crossed the host at the last look
    /// (discovery.json's steering mode), to log when that changes.
    crosses_the_host: Option<bool>,
}

/// Runs the router until SIGTERM or SIGINT. Neither sends Leave: Docker sends SIGTERM
/// on every restart, and the kernel state should outlive this process.
pub async fn run(settings: Settings, policy: Policy) -> anyhow::Result<()> {
    let kernel = Kernel::connect()
        .await
        .context("opening the routing netlink socket")?;
    let Surroundings {
        attachment,
        stack_ifname,
        prefixes,
        probe_path,
    } = link::surroundings(&kernel, &settings).await?;
    let spec = StackSpec {
        name: settings.stack.clone(),
        vni: settings.vni,
        prefixes,
        router_ip: attachment.router_ip,
    };
    let state = StateDir::open(&settings.state_dir)?;
    tracing::info!(
        stack = %spec.name,
        vni = %spec.vni,
        router_ip = %spec.router_ip,
        prefixes = %spec.prefixes.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","),
        state_dir = %settings.state_dir.display(),
        "vrouter-router starting"
    );
    if probe_path.is_none() {
        tracing::warn!("same-host probes are off: the router has no default route with a gateway (the stack network's gateway is the way through the host)");
    }
    let events = EventSink {
        source: format!("router/{}", spec.name),
        stack: spec.name.clone(),
        state: &state,
    };
    // Before registering: the host and the services must find this router under the
    // MAC they already know.
    if let Err(message) = link::set_stable_stack_mac(
        &kernel,
        attachment.index,
        &stack_ifname,
        spec.router_ip,
        probe_path.map(|p| p.gateway),
    )
    .await
    {
        tracing::warn!("{message}");
        events.emit(EventKind::StackMacUnchanged, message);
    }

    // The access policy goes into the kernel before the router registers: the
    // overlay link comes up (link::adopt) only once it is there.
    let overlay_name = settings.overlay_ifname();
    let remote = state
        .read_routes()
        .ok()
        .and_then(|f| accepted_remote(&spec, &f))
        .unwrap_or_default();
    let surround = Surround {
        local: spec.prefixes.clone(),
        overlay_ifname: overlay_name.clone(),
        remote,
    };
    let (access, acl_events) = Access::start(policy, surround, access::start_enforcer);
    for (kind, message) in acl_events {
        if kind == EventKind::AclInstalled {
            tracing::info!("{message}");
        } else {
            tracing::error!("{message}");
        }
        events.emit(kind, message);
    }

    let (file_tx, mut file_rx) = mpsc::unbounded_channel::<()>();
    let _watcher = watch_files(&settings.state_dir, ROUTES_FILE.as_ref(), false, file_tx);
    let (acl_file_tx, mut acl_file_rx) = mpsc::unbounded_channel::<()>();
    let _acl_watcher = settings.acl.file.as_deref().and_then(|path| {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        watch_files(dir, path.file_name()?, true, acl_file_tx)
    });
    let (acl_counters, acl_counters_rx) = watch::channel(Vec::new());

    let (peers_tx, peers_rx) = watch::channel(BTreeSet::new());
    let (probe_tx, mut probe_rx) = mpsc::channel::<ProbeResult>(64);
    if let Some(path) = probe_path {
        tokio::spawn(probe_loop(spec.router_ip, path.oif, peers_rx, probe_tx));
    }
    let (remote_tx, remote_rx) = watch::channel(BTreeSet::new());
    let (health_tx, health_rx) = watch::channel(None);
    let (traffic, traffic_rx) = TrafficCounters::new();
    let heartbeat = Arc::new(AtomicU64::new(0));
    let probe_config = ProbeConfig {
        stack: spec.name.clone(),
        router_ip: spec.router_ip,
        state_dir: settings.state_dir.clone(),
        interval: overlay_probe::PROBE_INTERVAL,
        traffic: Some(traffic_rx),
        loop_heartbeat: Some(heartbeat.clone()),
        acl: Some(acl_counters_rx),
    };

    let mut router = Router {
        source: format!("router/{}", spec.name),
        overlay_name,
        mac: spec.router_mac(),
        probe_path,
        socket_path: state.socket_path(),
        spec,
        state,
        kernel,
        intent: Intent::default(),
        discovery: DiscoveryConn::default(),
        applied: None,
        drift_repairs: 0,
        style: RouteStyle::Nexthop,
        last_apply_error: None,
        routes_error: None,
        routes_stamp: None,
        health: health_tx,
        last_overlay: None,
        probes: ProbeTracker::default(),
        peers: peers_tx,
        remote_routers: remote_tx,
        traffic,
        heartbeat,
        access,
        acl_settings: settings.acl.clone(),
        acl_counters,
        link_held: false,
        crosses_the_host: None,
    };
    router.hold_link().await;

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut timer = tokio::time::interval(settings.reconcile_interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut traffic_timer = tokio::time::interval(traffic::READ_EVERY);
    traffic_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    router.reconcile(Trigger::Start).await;
    // After the first reconcile, so the probes file carries the health from its first
    // write on.
    tokio::spawn(overlay_probe::run(probe_config, remote_rx, health_rx));
    loop {
        let socket = router.discovery.socket.clone();
        let connected = socket.is_some();
        let retry_at = router.discovery.retry_at;
        tokio::select! {
            _ = sigterm.recv() => {
                router.going_away().await;
                tracing::info!("SIGTERM: exiting, routes stay in place");
                return Ok(());
            }
            _ = sigint.recv() => {
                router.going_away().await;
                tracing::info!("SIGINT: exiting, routes stay in place");
                return Ok(());
            }
            Some(()) = file_rx.recv() => {
                // Coalesce a burst (temp file, rename) into one reconcile.
                while file_rx.try_recv().is_ok() {}
                router.reconcile(Trigger::RoutesChanged).await;
            }
            Some(()) = acl_file_rx.recv() => {
                // An editor's or a deploy tool's burst (write, rename) is one change.
                tokio::time::sleep(ACL_FILE_SETTLE).await;
                while acl_file_rx.try_recv().is_ok() {}
                router.reload_acl("the policy file changed").await;
            }
            _ = sighup.recv() => router.reload_acl("SIGHUP").await,
            _ = timer.tick() => router.tick().await,
            _ = traffic_timer.tick() => {
                router.traffic.read();
                router.read_acl();
            }
            msg = attach::recv(socket), if connected => router.on_message(msg).await,
            _ = tokio::time::sleep_until(retry_at), if !connected => router.connect().await,
            Some(result) = probe_rx.recv() => router.on_probe(result),
        }
    }
}

/// Test hook, in debug builds only: while the file named by `VROUTER_TEST_STALL_FILE`
/// exists, the loop waits before its next reconcile, as a wedged kernel call would
/// hold it.
#[cfg(debug_assertions)]
async fn test_stall() {
    let Some(path) = std::env::var_os("VROUTER_TEST_STALL_FILE") else {
        return;
    };
    while std::path::Path::new(&path).exists() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// How long a change to the policy file settles before it is read: an editor's or a
/// deploy tool's writes and rename arrive as one burst.
const ACL_FILE_SETTLE: Duration = Duration::from_millis(5);

/// Watches a directory (a rename replaces a file's inode, so watching the file would
/// go deaf after the first write) and signals changes to the file `name` in it.
///
/// The kernel is asked only for the events that can replace a file (create, rename in
/// or out, delete), and a close after writing when the file may be `written_in_place`
/// (the policy file, by an editor; discovery replaces its files only by rename).
/// Opening a file and appending to one are left out: every router on a host watches the same state
/// directory, and each open or events.log append by any of them or by discovery would
/// otherwise wake all the others (at 100 stacks on a host, tens of thousands of wakeups
/// a second). A queue overflow counts as a change.
fn watch_files(
    dir: &std::path::Path,
    name: &std::ffi::OsStr,
    written_in_place: bool,
    tx: mpsc::UnboundedSender<()>,
) -> Option<std::thread::JoinHandle<()>> {
    watch_files_counted(dir, name, written_in_place, tx, Arc::new(AtomicU64::new(0)))
}

/// [`watch_files`], counting the watch thread's wakeups in `wakeups`.
fn watch_files_counted(
    dir: &std::path::Path,
    name: &std::ffi::OsStr,
    written_in_place: bool,
    tx: mpsc::UnboundedSender<()>,
    wakeups: Arc<AtomicU64>,
) -> Option<std::thread::JoinHandle<()>> {
    use inotify::{EventMask, Inotify, WatchMask};
    let name = name.to_owned();
    let watching = Inotify::init().and_then(|inotify| {
        let mut mask =
            WatchMask::CREATE | WatchMask::MOVED_TO | WatchMask::MOVED_FROM | WatchMask::DELETE;
        if written_in_place {
            mask |= WatchMask::CLOSE_WRITE;
        }
        inotify.watches().add(dir, mask)?;
        Ok(inotify)
    });
    let mut inotify = match watching {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the directory; relying on the reconcile timer for routes.json and on SIGHUP for the policy file (raise fs.inotify.max_user_instances?)");
            return None;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("watch-files".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let events = match inotify.read_events_blocking(&mut buf) {
                    Ok(events) => events,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "the directory watch failed; relying on the reconcile timer");
                        return;
                    }
                };
                wakeups.fetch_add(1, Ordering::Relaxed);
                let change = events.into_iter().any(|ev| {
                    ev.mask.contains(EventMask::Q_OVERFLOW)
                        || ev.name.is_some_and(|n| n == name.as_os_str())
                });
                // The receiver is gone: the router is exiting.
                if change && tx.send(()).is_err() {
                    return;
                }
            }
        });
    spawned
        .map_err(|e| tracing::warn!(error = %e, "cannot start the directory watch"))
        .ok()
}

async fn probe_loop(
    router_ip: std::net::Ipv4Addr,
    oif: u32,
    mut peers: watch::Receiver<BTreeSet<SameHostPeer>>,
    results: mpsc::Sender<ProbeResult>,
) {
    let mut interval = tokio::time::interval(PROBE_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            changed = peers.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let round: Vec<SameHostPeer> = peers.borrow_and_update().iter().cloned().collect();
        // One peer after another: the host's ICMP rate limit is per destination (this
        // router), so concurrent probes would compete for its answers.
        for peer in round {
            let result = match probe::probe(router_ip, oif, peer.via).await {
                Ok(reachable) => ProbeResult { peer, reachable },
                Err(e) => {
                    tracing::warn!(peer = %peer.stack, error = %e, "cannot send a same-host probe");
                    continue;
                }
            };
            if results.send(result).await.is_err() {
                return;
            }
        }
    }
}

/// Writes events before the router exists (at start).
struct EventSink<'a> {
    source: String,
    stack: vrouter_state::StackName,
    state: &'a StateDir,
}

impl EventSink<'_> {
    fn emit(&self, kind: EventKind, message: impl Into<String>) {
        let event = Event::new(&self.source, kind, message).for_stack(&self.stack);
        if let Err(e) = self.state.append_event(&event) {
            tracing::warn!(error = %e, kind = %event.kind, "cannot write an event");
        }
    }
}

impl Router {
    fn event(&self, kind: EventKind, message: impl Into<String>) {
        let event = Event::new(&self.source, kind, message).for_stack(&self.spec.name);
        if let Err(e) = self.state.append_event(&event) {
            tracing::warn!(error = %e, kind = %event.kind, "cannot write an event");
        }
    }

    async fn overlay(&mut self) -> OverlayLink {
        let now = match link::overlay_link(&self.kernel, &self.overlay_name, self.mac).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the overlay link");
                // Unknown is not absent: do not ask for a new link on a failed dump.
                return self.last_overlay.clone().unwrap_or(OverlayLink::Absent);
            }
        };
        if self.last_overlay.as_ref() != Some(&now) {
            match &now {
                OverlayLink::Working { index, mtu } => {
                    tracing::info!(link = %self.overlay_name, index, mtu, "overlay link is working")
                }
                OverlayLink::Broken { reason, .. } => {
                    tracing::warn!(link = %self.overlay_name, %reason, "overlay link is not usable")
                }
                OverlayLink::Absent => {
                    tracing::warn!(link = %self.overlay_name, "overlay link is absent")
                }
            }
            self.last_overlay = Some(now.clone());
        }
        now
    }

    async fn tick(&mut self) {
        // Closed, or no table at all: try the policy again.
        let events = self.access.retry(access::start_enforcer);
        self.emit_all(events);
        self.hold_link().await;
        self.follow_overlay_mtu().await;
        let overlay = self.overlay().await;
        match self.discovery.phase {
            // A link held down for the access policy is not one to replace.
            Phase::Registered
                if overlay.index().is_none() && self.access.link_blocked().is_none() =>
            {
                tracing::info!("asking discovery for a new overlay link");
                self.register(true).await;
            }
            Phase::Awaiting { since, .. } if since.elapsed() > REPLY_TIMEOUT => {
                tracing::warn!(
                    "discovery did not answer the registration within {}s; reconnecting",
                    REPLY_TIMEOUT.as_secs()
                );
                self.discovery.disconnect_for(RECONNECT_MIN);
            }
            _ => {}
        }
        self.reconcile(Trigger::Timer).await;
    }

    /// Sets the overlay link's MTU to discovery's overlay MTU when they differ (see
    /// [`link::mtu_to_follow`]); the MTU probes use the link's MTU.
    async fn follow_overlay_mtu(&mut self) {
        let link = self.overlay().await;
        let want = self
            .state
            .read_discovery()
            .ok()
            .and_then(|d| d.host.overlay_mtu);
        let (Some(mtu), Some(index)) = (link::mtu_to_follow(&link, want), link.index()) else {
            return;
        };
        match self.kernel.set_mtu(index, mtu).await {
            Ok(()) => tracing::info!(
                link = %self.overlay_name,
                from = link.mtu(),
                to = mtu,
                "overlay link MTU follows discovery's overlay MTU"
            ),
            Err(e) => tracing::warn!(error = %e, to = mtu, "cannot set the overlay link's MTU"),
        }
    }

    async fn connect(&mut self) {
        if self.discovery.connect(&self.socket_path).await {
            let needs_link = self.overlay().await.index().is_none();
            self.register(needs_link).await;
        }
    }

    async fn register(&mut self, needs_link: bool) {
        let conntrack = self.access.tracks_connections();
        if let Err(e) = self
            .discovery
            .register(&self.spec, needs_link, conntrack)
            .await
        {
            tracing::warn!(error = %e, "cannot register with discovery; reconnecting");
            self.discovery.disconnect_for(RECONNECT_MIN);
        }
    }

    async fn on_message(&mut self, msg: std::io::Result<Option<(DiscoveryMessage, bool)>>) {
        let msg = match msg {
            Ok(Some((m, with_fd))) => {
                if with_fd {
                    tracing::debug!("discovery sent an unexpected descriptor; closed");
                }
                m
            }
            Ok(None) => {
                tracing::info!("discovery closed the connection; routes stay, reconnecting");
                self.discovery.disconnect_for(Duration::ZERO);
                return;
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!(error = %e, "ignored a bad message from discovery");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "attach connection failed; reconnecting");
                self.discovery.disconnect_for(RECONNECT_MIN);
                return;
            }
        };
        match msg {
            DiscoveryMessage::Attached { ifname, mac, mtu } => {
                if mac != self.mac {
                    tracing::warn!(%mac, expected = %self.mac, "discovery sent another MAC; using the derived one");
                }
                self.discovery.phase = Phase::Registered;
                // Without an access table the link is adopted but not brought up.
                let up = self.access.link_blocked().is_none();
                match link::adopt(&self.kernel, &ifname, &self.overlay_name, self.mac, mtu, up)
                    .await
                {
                    Ok(index) => {
                        // The overlay link renamed and configured; routes not yet.
                        vrouter_state::crash::point("router.after_attach");
                        self.link_held |= !up;
                        tracing::info!(%ifname, link = %self.overlay_name, index, mtu, "overlay link attached");
                        self.hold_link().await;
                        self.reconcile(Trigger::Attached).await;
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        tracing::error!(error = %msg, "cannot take over the overlay link");
                        self.event(
                            EventKind::AttachFailed,
                            format!("cannot take over overlay link {ifname}: {msg}"),
                        );
                    }
                }
            }
            DiscoveryMessage::Registered => {
                tracing::info!("registration accepted, overlay link kept");
                self.discovery.phase = Phase::Registered;
                // Acknowledge the current generation on this new connection.
                self.reconcile(Trigger::RoutesChanged).await;
            }
            DiscoveryMessage::Refused { reason } => {
                tracing::error!(%reason, "discovery refused the registration; retrying in {}s", REFUSED_RETRY.as_secs());
                self.event(EventKind::RegistrationRefused, reason);
                self.discovery.disconnect_for(REFUSED_RETRY);
            }
            // Answers to a leave and to an admin command: not for a registered router.
            DiscoveryMessage::Left | DiscoveryMessage::Rotating { .. } => {
                tracing::debug!("unexpected answer from discovery; ignored")
            }
        }
    }

    fn on_probe(&mut self, result: ProbeResult) {
        // A result for a peer removed meanwhile is stale.
        if !self.peers.borrow().contains(&result.peer) {
            return;
        }
        if let Some((kind, message)) = self.probes.record(&self.spec.name, &result) {
            if kind == EventKind::SameHostOk {
                tracing::info!(peer = %result.peer.stack, "{message}");
            } else {
                tracing::warn!(peer = %result.peer.stack, "{message}");
            }
            self.event(kind, message);
        }
    }

    /// Reads routes.json into `self.intent`, reporting problems once.
    fn read_intent(&mut self) {
        // The file this router last read without error is still there: the intent
        // stands (a parse of a 100-stack host's routes.json costs milliseconds, on
        // every tick of every router).
        let stamp = self.state.routes_stamp();
        if stamp.is_some() && stamp == self.routes_stamp {
            return;
        }
        let read = self.state.read_routes();
        self.routes_stamp = if read.is_ok() { stamp } else { None };
        self.routes_error = read
            .as_ref()
            .err()
            .map(|e| format!("{e}; the last good routes stay in force"));
        // The access rules follow the stacks' prefixes (those the router accepts).
        let remote = read
            .as_ref()
            .ok()
            .and_then(|f| accepted_remote(&self.spec, f));
        for (kind, message) in self.intent.absorb(&self.spec, read) {
            tracing::warn!("{message}");
            self.event(kind, message);
        }
        if let Some(remote) = remote {
            let events = self.access.set_remote(remote);
            self.emit_all(events);
        }
    }

    fn emit_all(&self, events: access::Events) {
        for (kind, message) in events {
            if kind == EventKind::AclInstalled {
                tracing::info!("{message}");
            } else {
                tracing::warn!("{message}");
            }
            self.event(kind, message);
        }
    }

    /// Reads the policy from the settings again and installs it; a bad one is
    /// reported and the old one stays.
    async fn reload_acl(&mut self, why: &str) {
        tracing::info!("{why}: reading the access policy again");
        let events = self.access.reload(self.acl_settings.policy());
        self.emit_all(events);
        self.sync_conntrack().await;
    }

    /// Registers again when the access table's use of conntrack changed since the
    /// registration discovery accepted (a reload to or from the default policy, a
    /// table closed or opened again): discovery then steers the stack's traffic
    /// through the router, or straight on.
    async fn sync_conntrack(&mut self) {
        let now = self.access.tracks_connections();
        if self.discovery.conntrack_changed(now) {
            tracing::info!(
                conntrack = now,
                "the access table's connection tracking changed; registering again"
            );
            self.register(false).await;
        }
    }

    /// The access counters (the traffic timer): published for the probes file, drop
    /// summaries written as events.
    fn read_acl(&mut self) {
        let events = self.access.read(now_ms());
        self.emit_all(events);
        let counters = self.access.counters();
        self.acl_counters.send_if_modified(|current| {
            if current.as_slice() != counters {
                *current = counters.to_vec();
                true
            } else {
                false
            }
        });
    }

    /// Keeps the overlay link down while no access table can be installed, and
    /// brings it back up once one is (only a link held down here: a link down for
    /// another reason is discovery's to replace).
    /// Before exiting on SIGTERM or SIGINT, under a policy that restricts anything:
    /// takes the overlay link down. Docker stops a container (SIGTERM) and then tears
    /// its namespace down, and the kernel unregisters the namespace's nftables hooks
    /// before it removes the namespace's links: for that moment, packets arriving on
    /// the overlay link would be forwarded into the stack with no access table in the
    /// way (seen here: one datagram of a denied flood). A router started again in the
    /// same namespace finds the link down and asks discovery for a new one, as for a
    /// lost link. Under the default policy (allow, no rules) the link stays up, so such
    /// a restart keeps forwarding. A SIGKILL skips this (docs/operations.md says so).
    async fn going_away(&mut self) {
        if self.access.policy().is_default() {
            return;
        }
        match self.kernel.link_by_name(&self.overlay_name).await {
            Ok(Some(link)) if link.up => {
                if let Err(e) = self.kernel.set_down(link.index).await {
                    tracing::warn!(link = %self.overlay_name, error = %e, "cannot take the overlay link down before exiting");
                } else {
                    tracing::info!(link = %self.overlay_name, "overlay link down: the access policy cannot hold while the namespace is torn down");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(link = %self.overlay_name, error = %e, "cannot read the overlay link before exiting")
            }
        }
    }

    async fn hold_link(&mut self) {
        let blocked = self.access.link_blocked().is_some();
        if !blocked && !self.link_held {
            return;
        }
        let Ok(Some(link)) = self.kernel.link_by_name(&self.overlay_name).await else {
            return;
        };
        let result = match (blocked, link.up) {
            (true, true) => {
                tracing::error!(link = %self.overlay_name, "holding the overlay link down: no access table is in force");
                self.kernel
                    .set_down(link.index)
                    .await
                    .map(|()| self.link_held = true)
            }
            (false, false) => {
                tracing::info!(link = %self.overlay_name, "access table in force: bringing the overlay link up");
                self.kernel
                    .set_up(link.index)
                    .await
                    .map(|()| self.link_held = false)
            }
            (false, true) => {
                self.link_held = false;
                Ok(())
            }
            (true, false) => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(link = %self.overlay_name, error = %e, "cannot set the overlay link's state");
        }
    }

    /// Makes the kernel match the intent: the routes, then the traffic counters of
    /// the routed prefixes. Never fails: problems are logged and reported as events,
    /// and the next trigger tries again.
    pub async fn reconcile(&mut self, trigger: Trigger) {
        #[cfg(debug_assertions)]
        test_stall().await;
        self.read_intent();
        self.reconcile_routes(trigger).await;
        self.traffic.reconcile(self.intent.last_good.as_ref());
        // After a routes change or a retry that closed or opened the table, and once
        // discovery answered a registration.
        self.sync_conntrack().await;
        self.heartbeat.store(now_ms(), Ordering::Relaxed);
    }

    async fn reconcile_routes(&mut self, trigger: Trigger) {
        let link = self.overlay().await;
        let overlay = link.index();
        // At most twice: once more with plain routes if the kernel refuses nexthop
        // objects.
        let mut attempts = 0;
        let (desired, plan, observed) = loop {
            attempts += 1;
            let known = self.intent.last_good.as_ref();
            let desired = known
                .cloned()
                .unwrap_or_default()
                .routing_state(overlay, self.style);
            let mut observed = match apply::observe(&self.kernel, overlay).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot dump the routing state");
                    self.publish_health(
                        &link,
                        None,
                        Some(format!("cannot dump the routing state: {e}")),
                    )
                    .await;
                    return;
                }
            };
            if known.is_none() {
                // Nothing good was ever read: leave the remote routes as they are
                // (they may be from before a restart in this namespace) and only set
                // up probing. Their nexthops stay too: deleting one deletes its routes.
                observed.routes.retain(|(table, _), _| *table != MAIN_TABLE);
                observed.neighbours.clear();
                observed.nexthops.clear();
            }
            let plan = diff(&desired, &observed);
            if plan.is_empty() {
                break (desired, plan, observed);
            }
            let drift = trigger == Trigger::Timer && self.applied.as_ref() == Some(&desired);
            if drift {
                self.drift_repairs += plan.len() as u64;
                tracing::warn!(
                    changes = plan.len(),
                    repairs = self.drift_repairs,
                    "repairing drift: the kernel no longer matched the desired state"
                );
            }
            log_plan(trigger, &plan);
            let done = apply::apply(&self.kernel, &plan).await;
            if done.nexthops_refused && self.style == RouteStyle::Nexthop && attempts == 1 {
                let message = "the kernel has no nexthop objects (Linux 5.3 or later has them); remote routes carry their gateway instead, which installs slower at scale";
                tracing::warn!("{message}");
                self.event(EventKind::NexthopsUnsupported, message);
                self.style = RouteStyle::Plain;
                continue;
            }
            if !done.ok() {
                // The first few say what is wrong; 10,000 lines would not say more.
                const SHOWN: usize = 5;
                let mut msg = done.failed[..done.failed.len().min(SHOWN)].join("; ");
                if done.failed.len() > SHOWN {
                    msg += &format!("; and {} more", done.failed.len() - SHOWN);
                }
                if self.last_apply_error.as_deref() != Some(msg.as_str()) {
                    self.event(
                        EventKind::ApplyFailed,
                        format!(
                            "{} of {} changes failed: {msg}",
                            done.failed.len(),
                            plan.len()
                        ),
                    );
                    self.last_apply_error = Some(msg);
                }
                self.applied = None;
                self.update_peers();
                let error = self.last_apply_error.clone();
                self.publish_health(&link, None, error).await;
                return;
            }
            break (desired, plan, observed);
        };
        self.last_apply_error = None;
        // Unchanged, the dump is still the kernel's state; else dump again.
        let after = plan.is_empty().then_some(observed);
        self.publish_health(&link, after, None).await;
        self.applied = Some(desired);
        self.update_peers();
        if let (true, Some(_), Some(d)) = (self.intent.listed, overlay, &self.intent.last_good) {
            if let Err(e) = self.discovery.ack(d.generation).await {
                tracing::warn!(error = %e, "cannot acknowledge to discovery; reconnecting");
                self.discovery.disconnect_for(RECONNECT_MIN);
            }
        }
    }

    /// Compares the kernel (`observed`, or a fresh dump) with routes.json's routes and
    /// hands the result to the probe task, which writes it into the probes file.
    async fn publish_health(
        &mut self,
        link: &OverlayLink,
        observed: Option<RoutingState>,
        error: Option<String>,
    ) {
        let desired = self.intent.last_good.clone().unwrap_or_default();
        let observed = match observed {
            Some(o) => Ok(o),
            None => apply::observe(&self.kernel, link.index()).await,
        };
        let (check, error) = match observed {
            Ok(o) => (check_routes(&desired, link.index(), &o), error),
            Err(e) => (
                RouteCheck {
                    desired: u32::try_from(desired.routes.len()).unwrap_or(u32::MAX),
                    ..RouteCheck::default()
                },
                error.or(Some(format!("cannot dump the routing state: {e}"))),
            ),
        };
        let report = HealthReport {
            health: RouterHealth {
                routes_desired: check.desired,
                routes_installed: check.installed,
                drift_repaired: self.drift_repairs,
                overlay_link_up: link.index().is_some(),
                last_error: error.or_else(|| self.routes_error.clone()),
                traffic_error: None,
                reconciled_ms: None,
                acl: Some(self.access.health()),
            },
            overlay_mtu: link.mtu(),
        };
        self.health.send_if_modified(|current| {
            if current.as_ref() != Some(&report) {
                *current = Some(report);
                true
            } else {
                false
            }
        });
    }

    /// Hands the probe loop the peers to probe (none without a probe path: no default
    /// route through the stack network's gateway). The overlay probe task gets the remote routers of the desired routes whatever
    /// the outcome: a route that could not be installed shows as unreachable.
    fn update_peers(&mut self) {
        let remote = self
            .intent
            .last_good
            .as_ref()
            .map(|d| d.remote_routers.clone())
            .unwrap_or_default();
        self.remote_routers.send_if_modified(|current| {
            if *current != remote {
                *current = remote;
                true
            } else {
                false
            }
        });
        let candidates = match (&self.intent.last_good, self.probe_path) {
            (Some(d), Some(_)) => d.same_host.clone(),
            _ => BTreeSet::new(),
        };
        // Only on the host's path (discovery.json read only when there is a peer).
        let peers = if !candidates.is_empty() && self.same_host_crosses_the_host() {
            candidates
        } else {
            BTreeSet::new()
        };
        self.probes.retain(&peers);
        self.peers.send_if_modified(|current| {
            if *current != peers {
                *current = peers;
                true
            } else {
                false
            }
        });
    }
}

impl Router {
    /// Whether this stack's same-host traffic takes the host's path, from
    /// discovery.json's steering mode ([`probe::crosses_the_host`]); an unreadable or
    /// absent file counts as the host's path (as before port steering).
    fn same_host_crosses_the_host(&mut self) -> bool {
        let steering = match self.state.read_discovery() {
            Ok(f) => f.steering,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read discovery.json; same-host probes as on the policy-rule path");
                None
            }
        };
        let now = probe::crosses_the_host(steering.as_ref(), &self.spec.name);
        if self.crosses_the_host != Some(now) {
            if now {
                tracing::info!(
                    "same-host traffic takes the host's path (policy-rule steering): probing it"
                );
            } else {
                tracing::info!("same-host traffic is steered at the ports and never crosses the host: no same-host probes");
            }
            self.crosses_the_host = Some(now);
        }
        now
    }
}

/// The remote routes of `own`'s entry in `file` that the router accepts (see
/// [`crate::desired::compute`]); None when the file does not list the stack.
fn accepted_remote(own: &StackSpec, file: &vrouter_state::RoutesFile) -> Option<Vec<RemoteRoute>> {
    let crate::desired::Computed::Listed { desired, .. } = crate::desired::compute(own, file)
    else {
        return None;
    };
    let entry = file.stacks.get(&own.name)?;
    let mut remote: Vec<RemoteRoute> = entry
        .routes
        .iter()
        .filter(|r| desired.routes.get(&r.prefix) == Some(&r.via))
        .cloned()
        .collect();
    remote.sort();
    remote.dedup();
    Some(remote)
}

/// Logs a plan: each change when there are few, else a count per kind (each change
/// at debug), since 10,000 lines would slow the reconcile they describe.
fn log_plan(trigger: Trigger, plan: &[Change]) {
    const EACH: usize = 32;
    if plan.len() <= EACH {
        for change in plan {
            tracing::info!(?trigger, "{change}");
        }
        return;
    }
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for change in plan {
        tracing::debug!(?trigger, "{change}");
        let kind: String = change
            .to_string()
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        match kinds.last_mut() {
            Some((k, n)) if *k == kind => *n += 1,
            _ => kinds.push((kind, 1)),
        }
    }
    let summary: Vec<String> = kinds.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    tracing::info!(?trigger, changes = plan.len(), "{}", summary.join(", "));
}

#[cfg(test)]
mod tests {
    use super::*;
    use vrouter_state::{RoutesFile, StackName, StackRoutes, Vni};

    #[test]
    fn the_file_watch_wakes_for_replacements_not_for_opens_or_appends() {
        let dir = std::env::temp_dir().join(format!(
            "vrouter-watch-{}-{}",
            std::process::id(),
            vrouter_state::fsio::random_suffix()
        ));
        std::fs::create_dir(&dir).unwrap();
        let state = StateDir::open_discovery(&dir, &dir.with_extension("private")).unwrap();
        state.write_routes(&RoutesFile::default()).unwrap();
        state
            .append_event(&Event::new("t", EventKind::Started, "events.log exists"))
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let wakeups = Arc::new(AtomicU64::new(0));
        let _w =
            watch_files_counted(&dir, ROUTES_FILE.as_ref(), false, tx, wakeups.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // What every router and discovery do all the time: read the files, append
        // events. None of it may wake a watcher (every router on the host has one).
        for i in 0..50 {
            let _ = state.read_routes();
            let _ = state.read_discovery();
            state
                .append_event(&Event::new("t", EventKind::Started, format!("{i}")))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            wakeups.load(Ordering::Relaxed),
            0,
            "woken by opens or appends"
        );
        assert!(rx.try_recv().is_err());
        // A new routes.json (by rename) is a change.
        state.write_routes(&RoutesFile::default()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while rx.try_recv().is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "no signal for a new routes.json"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(dir.with_extension("private"));
    }

    #[test]
    fn access_follows_the_routes_the_router_accepts() {
        let own = StackSpec {
            name: StackName::new("a").unwrap(),
            vni: Vni::new(1000).unwrap(),
            prefixes: vec!["10.1.0.0/24".parse().unwrap()],
            router_ip: "10.1.0.254".parse().unwrap(),
        };
        let route = |prefix: &str, stack: &str, via: &str| {
            let via: std::net::Ipv4Addr = via.parse().unwrap();
            RemoteRoute {
                prefix: prefix.parse().unwrap(),
                stack: StackName::new(stack).unwrap(),
                via,
                mac: Mac::for_router(Vni::new(1000).unwrap(), via),
                host: "198.18.0.2".parse().unwrap(),
                same_host: false,
            }
        };
        let mut file = RoutesFile::default();
        assert_eq!(accepted_remote(&own, &file), None, "not listed");
        file.stacks.insert(
            own.name.clone(),
            StackRoutes {
                vni: None,
                routes: vec![
                    route("10.2.0.0/24", "b", "10.2.0.254"),
                    // Overlaps this stack's prefix: skipped by the router, so no rights.
                    route("10.1.0.0/25", "x", "10.9.0.254"),
                    // A second route for b's prefix via another router: skipped.
                    route("10.2.0.0/24", "y", "10.8.0.254"),
                ],
            },
        );
        let got = accepted_remote(&own, &file).unwrap();
        assert_eq!(got, vec![route("10.2.0.0/24", "b", "10.2.0.254")]);
    }
}
