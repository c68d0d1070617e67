//! The process: leader election, the attach server, watchers, and the event loop that
//! feeds the controller. All kernel work happens on the loop's task, one at a time.

use crate::attach::Peer;
use crate::controller::Controller;
use crate::readiness::Live;
use crate::registry::ConnId;
use crate::settings::{HttpAddr, Settings};
use anyhow::Context;
use notify::Watcher;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};
use vrouter_kernel::Kernel;
use vrouter_state::attach::{AttachListener, DiscoveryMessage};
use vrouter_state::{Event, EventKind, StackName, StateDir};

/// What the event loop handles, one at a time.
pub(crate) enum Input {
    Register {
        conn: ConnId,
        reg: vrouter_state::attach::Registration,
        fd: Option<OwnedFd>,
        peer: Peer,
        reply: oneshot::Sender<DiscoveryMessage>,
    },
    Ack {
        conn: ConnId,
        generation: u64,
    },
    Leave {
        conn: ConnId,
        stack: StackName,
        peer: Peer,
        reply: oneshot::Sender<DiscoveryMessage>,
    },
    Closed {
        conn: ConnId,
    },
    /// A namespace reached a cap on attach connections (first refusal only).
    AttachRefused {
        reason: String,
    },
    ConfigChanged,
    /// From the admin socket only.
    LeaveMesh {
        reply: oneshot::Sender<DiscoveryMessage>,
    },
    /// From the admin socket only.
    RotateKey {
        reply: oneshot::Sender<DiscoveryMessage>,
    },
    /// A router's overlay probe results changed.
    ProbesChanged,
}

impl Input {
    fn name(&self) -> &'static str {
        match self {
            Input::Register { .. } => "register",
            Input::Ack { .. } => "ack",
            Input::Leave { .. } => "leave",
            Input::Closed { .. } => "closed",
            Input::AttachRefused { .. } => "attach_refused",
            Input::ConfigChanged => "config_changed",
            Input::LeaveMesh { .. } => "leave_mesh",
            Input::RotateKey { .. } => "rotate_key",
            Input::ProbesChanged => "probes_changed",
        }
    }
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let dir = open_state(&settings)?.with_events_cap(settings.events_max_bytes);
    let lead = match dir.try_lead()? {
        Some(l) => l,
        None => {
            info!(
                "another discovery is active on {}; waiting as standby",
                settings.state_dir.display()
            );
            let _ = dir.append_event(&Event::new(
                "discovery",
                EventKind::Standby,
                format!(
                    "pid {} waits as standby for the leader lock",
                    std::process::id()
                ),
            ));
            // Poll instead of blocking in lead_blocking: a standby must still stop at once
            // on SIGTERM (as PID 1 of a container an unhandled SIGTERM is ignored, so
            // `docker stop` waited its full timeout and SIGKILLed it).
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = term.recv() => return Ok(()),
                    _ = int.recv() => return Ok(()),
                }
                if let Some(l) = dir.try_lead()? {
                    break l;
                }
            }
        }
    };
    info!("leader lock acquired");
    let kernel = Kernel::connect().await?;
    // Link and bridge-FDB events drive the port-steering pass between reconciles.
    let mut bridges = watch_bridges(&settings);
    let source = crate::peers::from_settings(&settings).map_err(anyhow::Error::msg)?;
    let mut ctl = Controller::new(settings.clone(), dir, kernel, source).await?;
    // The HTTP endpoint belongs to the leader: standbys share the host's port.
    let live = Arc::new(Live::new(settings.reconcile_interval()));
    if let HttpAddr(Some(addr)) = settings.http_addr {
        match crate::http::bind(addr).await {
            Ok(listener) => {
                info!("HTTP endpoint on http://{addr} (/healthz, /readyz, /metrics, /v1/status)");
                tokio::spawn(crate::http::serve(
                    listener,
                    settings.state_dir.clone(),
                    settings.steering_table.clone(),
                    live.clone(),
                ));
            }
            // The control plane matters more than its endpoint: report and go on.
            Err(e) => ctl.event_because(
                EventKind::Error,
                "http_bind_failed",
                format!("cannot serve HTTP on {addr} ({e}); set --http-addr / VROUTER_HTTP_ADDR to a free address, or off"),
                None,
            ),
        }
    }
    let (gossip_tx, mut gossip_rx) = mpsc::channel::<()>(1);
    if settings.gossip_enabled() {
        let state = open_state(&settings)?;
        let node_id = crate::gossip::load_node_id(&state)?;
        let claims = crate::gossip::load_claims(&state);
        let generations = crate::gossip::load_generations(&state);
        // Announce what the previous run had (routers in grace), so a restart changes
        // nothing elsewhere.
        ctl.set_gossip_claims(claims, generations);
        let stacks = ctl.initial_stacks();
        let encryption = ctl.encryption_at_start();
        let handle = crate::gossip::start(
            &settings,
            node_id,
            ctl.advertise(),
            stacks,
            encryption,
            gossip_tx,
        )
        .await?;
        ctl.set_gossip(handle);
    }
    let listener = AttachListener::bind(&StateDir::open(&settings.state_dir)?.socket_path())
        .with_context(|| {
            format!(
                "cannot listen on the attach socket in {}; check that the state directory is writable",
                settings.state_dir.display()
            )
        })?;

    let (tx, mut rx) = mpsc::channel::<Input>(256);
    tokio::spawn(crate::attach::accept_loop(listener, tx.clone()));
    let private_dir = settings.private_dir();
    match crate::attach::bind_admin(&private_dir) {
        Ok(admin) => {
            tokio::spawn(crate::attach::admin_loop(admin, tx.clone()));
        }
        // Routing goes on without it; only the admin commands are unavailable.
        Err(e) => ctl.event_because(
            EventKind::Error,
            "admin_socket_failed",
            format!(
                "cannot listen on {} ({e}); admin commands (leave-mesh, rotate-key) are unavailable. Make --private-dir / VROUTER_PRIVATE_DIR a writable directory of discovery's own",
                private_dir.join(vrouter_state::attach::ADMIN_SOCKET).display()
            ),
            None,
        ),
    }
    let _watcher = watch_config(&ctl.config_files(), tx.clone());
    let _probes_watcher = if ctl.has_gossip() {
        watch_probes(&settings.state_dir, tx.clone())
    } else {
        None
    };
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(settings.reconcile_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Router events travel in their probes files; copy them into events.log.
    let mut relay = crate::relay::Relay::new(open_state(&settings)?);
    reconcile(&mut ctl, &live, false).await;
    let mut steer_due: Option<tokio::time::Instant> = None;
    loop {
        let expiry = ctl.next_expiry();
        let steer_timer = async {
            match steer_due {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let bridge_change = async {
            match bridges.as_mut() {
                Some(w) => w.changed().await,
                None => std::future::pending().await,
            }
        };
        let timer = async {
            match expiry {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        let mut timer_reconcile = false;
        // Probe results only matter while some member's membership has failed.
        let mut only_probes = false;
        tokio::select! {
            Some(input) = rx.recv() => {
                only_probes = matches!(input, Input::ProbesChanged);
                handle(&mut ctl, input).await
            }
            _ = tick.tick() => timer_reconcile = true,
            _ = timer => {},
            Some(()) = gossip_rx.recv() => {}
            changed = bridge_change => {
                match changed {
                    // Debounced: one pass for a burst (a container start is several
                    // link and FDB events).
                    Some(()) => {
                        steer_due.get_or_insert(tokio::time::Instant::now() + STEER_DEBOUNCE);
                    }
                    None => {
                        warn!("the link event socket closed; watching again (the timer reconcile covers the gap)");
                        bridges = watch_bridges(&settings);
                    }
                }
                continue;
            }
            _ = steer_timer => {
                steer_due = None;
                ctl.steer_now().await;
                continue;
            }
            _ = hup.recv() => { info!("SIGHUP: reloading peer configuration"); ctl.reload_peers(); }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        // Batch whatever else arrived before reconciling once.
        while let Ok(input) = rx.try_recv() {
            timer_reconcile = false;
            only_probes &= matches!(input, Input::ProbesChanged);
            handle(&mut ctl, input).await;
        }
        relay.run(timer_reconcile);
        if only_probes && !ctl.has_failed_members() {
            continue;
        }
        reconcile(&mut ctl, &live, timer_reconcile).await;
    }
    // Kernel state stays: the datapath keeps running while the control plane is away
    // (the WireGuard device too; a userspace engine pauses until the next start).
    ctl.shutdown().await;
    info!("stopping; kernel state is left in place");
    drop(lead);
    Ok(())
}

/// How long the steering pass waits after a bridge change for the rest of its burst.
const STEER_DEBOUNCE: Duration = Duration::from_millis(20);

/// The bridge watcher for port steering (none in `rule` mode: nothing to follow).
fn watch_bridges(settings: &Settings) -> Option<vrouter_kernel::BridgeWatcher> {
    if settings.steering != vrouter_state::SteeringMode::Ports {
        return None;
    }
    match Kernel::watch_bridges() {
        Ok(w) => Some(w),
        Err(e) => {
            warn!("cannot watch link events ({e}); port steering follows the timer reconcile only");
            None
        }
    }
}

/// One reconcile, timed, with its readiness handed to the HTTP task. A timer
/// reconcile's changes are drift.
async fn reconcile(ctl: &mut Controller, live: &Live, timer: bool) {
    #[cfg(debug_assertions)]
    test_stall().await;
    let started = std::time::Instant::now();
    let result = ctl.reconcile().await;
    let took = started.elapsed();
    let ok = result.is_ok();
    match result {
        Ok(n) if timer => ctl.count_drift(n),
        Ok(_) => {}
        Err(e) => ctl.event_because(
            EventKind::Error,
            "reconcile_failed",
            format!("reconcile failed: {e:#}"),
            None,
        ),
    }
    live.reconciled(took, ok, ctl.readiness());
}

/// Test hook, in debug builds only: while the file named by `VROUTER_TEST_STALL_FILE`
/// exists, the control loop waits before its next reconcile, as a wedged kernel call
/// or file read would hold it. The HTTP task goes on answering meanwhile.
#[cfg(debug_assertions)]
async fn test_stall() {
    let Some(path) = std::env::var_os("VROUTER_TEST_STALL_FILE") else {
        return;
    };
    while std::path::Path::new(&path).exists() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn handle(ctl: &mut Controller, input: Input) {
    tracing::debug!(input = input.name(), "loop input");
    match input {
        Input::Register {
            conn,
            reg,
            fd,
            peer,
            reply,
        } => {
            let answer = ctl.register(conn, reg, fd, peer).await;
            let _ = reply.send(answer);
        }
        Input::Ack { conn, generation } => {
            ctl.ack(conn, generation);
        }
        Input::Leave {
            conn,
            stack,
            peer,
            reply,
        } => {
            let answer = ctl.leave(conn, &stack, peer).await;
            let _ = reply.send(answer);
        }
        Input::Closed { conn } => ctl.disconnected(conn),
        Input::AttachRefused { reason } => {
            ctl.event_because(EventKind::RegistrationRefused, "attach_limit", reason, None)
        }
        Input::ConfigChanged => ctl.reload_peers(),
        Input::LeaveMesh { reply } => {
            if ctl.has_gossip() {
                ctl.leave_mesh().await;
                let _ = reply.send(DiscoveryMessage::Left);
            } else {
                let _ = reply.send(DiscoveryMessage::Refused {
                    reason: "this discovery runs without gossip (no secret or join configured); there is no mesh to leave".into(),
                });
            }
        }
        Input::RotateKey { reply } => {
            let _ = reply.send(ctl.rotate_key());
        }
        Input::ProbesChanged => {}
    }
}

/// Watches the routers' probe results (`probes/` in the state directory).
fn watch_probes(
    state_dir: &std::path::Path,
    tx: mpsc::Sender<Input>,
) -> Option<notify::RecommendedWatcher> {
    let dir = state_dir.join(vrouter_state::PROBES_DIR);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        warn!("cannot create {}: {e}", dir.display());
        return None;
    }
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if matches!(
                ev.kind,
                notify::EventKind::Create(_) | notify::EventKind::Modify(_)
            ) {
                let _ = tx.try_send(Input::ProbesChanged);
            }
        }
    })
    .ok()?;
    w.watch(&dir, notify::RecursiveMode::NonRecursive).ok()?;
    Some(w)
}

/// Whether a watcher event can mean new content. Opening and reading a file is an
/// event too (inotify's IN_OPEN / IN_CLOSE_NOWRITE): reacting to those made every
/// reload trigger the next, and discovery spun at full CPU after the first change.
fn changes_content(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    matches!(
        kind,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any
    ) || matches!(
        kind,
        EventKind::Access(notify::event::AccessKind::Close(
            notify::event::AccessMode::Write
        ))
    )
}

/// Watches the configuration files' directories (a rename replaces the inode, and
/// Docker configs and editors both rename).
fn watch_config(
    files: &[std::path::PathBuf],
    tx: mpsc::Sender<Input>,
) -> Option<notify::RecommendedWatcher> {
    if files.is_empty() {
        return None;
    }
    let names: Vec<std::path::PathBuf> = files.to_vec();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if changes_content(&ev.kind)
                && ev.paths.iter().any(|p| {
                    names
                        .iter()
                        .any(|n| p == n || p.file_name() == n.file_name())
                })
            {
                let _ = tx.try_send(Input::ConfigChanged);
            }
        }
    })
    .map_err(|e| warn!("cannot watch the configuration: {e}; reload with SIGHUP"))
    .ok()?;
    for f in files {
        let dir = f
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        if let Err(e) = w.watch(dir, notify::RecursiveMode::NonRecursive) {
            warn!("cannot watch {}: {e}; reload with SIGHUP", dir.display());
        }
    }
    Some(w)
}

/// The shared state directory with discovery's private directory: discovery's write
/// lock, leader lock, node id and claims live there, out of every router's reach.
pub fn open_state(settings: &Settings) -> anyhow::Result<StateDir> {
    Ok(StateDir::open_discovery(
        &settings.state_dir,
        &settings.private_dir(),
    )?)
}

/// HEALTHCHECK: healthy when some discovery holds the leader lock and discovery.json
/// is readable.
pub fn health(settings: &Settings) -> anyhow::Result<()> {
    let dir = open_state(settings)?;
    if let Some(lock) = dir.try_lead()? {
        drop(lock);
        anyhow::bail!(
            "no active discovery holds the leader lock of {}",
            settings.state_dir.display()
        );
    }
    let d = dir
        .read_discovery()
        .map_err(|e| anyhow::anyhow!("discovery.json: {e}"))?;
    // The files outlive a stuck loop; the loop's own endpoint says whether it still
    // completes reconciles. No listener there (HTTP off, or its bind failed: an error
    // event) leaves the loop unchecked; a listener that does not answer is a process
    // wedged as a whole.
    let mut unchecked = None;
    if let HttpAddr(Some(addr)) = settings.http_addr {
        match crate::http::get(addr, "/healthz") {
            Ok((200, _)) => {}
            Ok((_, body)) => anyhow::bail!("{}", body.trim()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                unchecked = Some(format!("nothing listens on http://{addr}"))
            }
            Err(e) => anyhow::bail!(
                "the active discovery does not answer on http://{addr}/healthz ({e}): it is stuck"
            ),
        }
    }
    if let Some(why) = unchecked {
        println!("control loop not checked: {why} (--http-addr / VROUTER_HTTP_ADDR)");
    }
    println!(
        "ok: generation {}, {} local stack(s), {} peer host(s)",
        d.generation,
        d.local_stacks.len(),
        d.peers.len()
    );
    Ok(())
}

/// `vrouter-discovery status [--json]`: the status from the state files alone, so it
/// works while discovery is down.
pub fn status(settings: &Settings, json: bool) -> anyhow::Result<()> {
    let dir = StateDir::open_readonly(&settings.state_dir).map_err(anyhow::Error::msg)?;
    let counters = crate::steering::counters_or_none(&settings.steering_table);
    let status = crate::status::from_dir(&dir, None, &counters).map_err(anyhow::Error::msg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", crate::status::render_text(&status));
    }
    Ok(())
}

/// Checks the peer configuration and prints what it declares.
pub fn check_config(settings: &Settings) -> anyhow::Result<()> {
    // To stderr: stdout stays the peers as JSON.
    eprint!("{}", settings.encryption_summary());
    eprint!("{}", settings.paths_summary());
    if settings.config.is_none() && settings.peers.is_none() {
        anyhow::bail!(
            "no peer configuration given; set --config / VROUTER_CONFIG or --peers / VROUTER_PEERS"
        );
    }
    let peers = crate::peers::from_settings(settings)
        .and_then(|mut s| s.load())
        .map_err(anyhow::Error::msg)?;
    println!("{}", serde_json::to_string_pretty(&peers)?);
    Ok(())
}

/// Removes what discovery made on this host: the VXLAN devices that carry its marker
/// (or, made by an older version, are in its private record),
/// every steering rule and steering-table route stamped with its protocol, the port
/// steering table, the WireGuard device and the encryption filter, and the state
/// files. The WireGuard key files stay (they are the host's identity). Holds the leader lock meanwhile, so it never races an active discovery.
pub async fn cleanup(settings: &Settings) -> anyhow::Result<()> {
    use vrouter_state::RTPROT_VROUTER;
    let dir = open_state(settings)?;
    let Some(_lead) = dir.try_lead()? else {
        anyhow::bail!(
            "a discovery is active on {}; stop it (and its standbys) before cleaning up",
            settings.state_dir.display()
        );
    };
    let kernel = Kernel::connect().await?;
    let mut removed = Vec::new();
    // Devices carrying discovery's marker, and unmarked ones of an older version that
    // discovery's private record says it made; never anything else (see ownership).
    let legacy = dir.read_discovery().map(|d| d.devices).unwrap_or_default();
    let recorded = crate::ownership::recorded(&dir, &legacy);
    for l in kernel.links().await? {
        let Some(vni) = l.vxlan.as_ref().map(|v| v.vni) else {
            continue;
        };
        let ours = l.name == vni.vxlan_ifname()
            && l.kind.as_deref() == Some("vxlan")
            && match l.alias.as_deref() {
                Some(a) => a == crate::ownership::marker(vni),
                None => recorded.contains(&vni),
            };
        if ours {
            kernel.delete_link(l.index).await?;
            removed.push(l.name);
        }
    }
    crate::ownership::record(&dir, &Default::default());
    let rules: Vec<_> = kernel
        .rules()
        .await?
        .into_iter()
        .filter(|r| r.protocol == RTPROT_VROUTER && r.iif.is_some() && r.fwmark.is_none())
        .collect();
    // One dump for all the rules' tables (not one per stack).
    let tables: std::collections::BTreeSet<u32> = rules.iter().map(|r| r.table).collect();
    let routes = kernel.routes_of_tables(&tables).await?;
    let mut emptied = std::collections::BTreeSet::new();
    for rule in rules {
        let first = emptied.insert(rule.table);
        for route in routes.iter().filter(|r| first && r.table == rule.table) {
            if route.protocol == RTPROT_VROUTER {
                kernel.delete_route(route).await?;
                removed.push(format!("route {} table {}", route.dst, route.table));
            }
        }
        kernel.delete_rule(&rule).await?;
        removed.push(format!(
            "rule iif {} table {}",
            rule.iif.as_deref().unwrap_or("?"),
            rule.table
        ));
    }
    // The port-steering table (in either mode: a ports-mode run may have left it).
    // A kernel without nftables has none to remove.
    let table = &settings.steering_table;
    match crate::steering::read_counters(table) {
        Err(vrouter_kernel::KernelError::NoNfTables) => {}
        counters => {
            let had_rules = !counters?.is_empty();
            crate::steering::delete(table)?;
            if had_rules {
                removed.push(format!("nftables table netdev {table}"));
            }
        }
    }
    // Encryption: the WireGuard device (a wireguard or tun link of the configured
    // name: never another kind) and the `require` input filter.
    if let Some(l) = kernel.link_by_name(&settings.wg_device).await? {
        if matches!(l.kind.as_deref(), Some("wireguard") | Some("tun")) {
            vrouter_wg::destroy(&settings.wg_device)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("cannot delete the WireGuard device {}: {e}", l.name)
                })?;
            removed.push(format!("WireGuard device {}", l.name));
        }
    }
    let had_filter =
        vrouter_kernel::nft::Nft::connect_table(vrouter_kernel::nft::Family::Ip, table)
            .and_then(|n| n.rule_counters())
            .is_ok_and(|r| {
                r.iter()
                    .any(|r| r.comment == crate::wireguard::FILTER_COMMENT)
            });
    crate::wireguard::delete_filter(table)?;
    if had_filter {
        removed.push(format!("nftables table ip {table}"));
    }
    // The relay's transit table (VROUTER_RELAY), if a relay run left it.
    let relay = format!("{table}_relay");
    if let Ok(c) = crate::transit::counters(&relay) {
        crate::transit::remove(&relay)?;
        if !c.is_empty() {
            removed.push(format!("nftables table netdev {relay}"));
        }
    }
    for name in [vrouter_state::DISCOVERY_FILE, vrouter_state::ROUTES_FILE] {
        let path = settings.state_dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path)?;
            removed.push(path.display().to_string());
        }
    }
    if removed.is_empty() {
        println!("nothing to remove");
    }
    for r in removed {
        println!("removed {r}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::changes_content;
    use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
    use notify::EventKind;

    #[test]
    fn reading_the_configuration_is_not_a_change() {
        assert!(!changes_content(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!changes_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(changes_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(changes_content(&EventKind::Create(CreateKind::File)));
        assert!(changes_content(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
    }
}
