//! The operator's view of one host: one pure function from the state files (and, in
//! the daemon, its live readiness and reconcile figures) to a [`Status`] value. The
//! `/v1/status` endpoint serialises it, `/metrics` renders it (`metrics.rs`), and
//! `vrouter-discovery status` prints it, so the three always agree.

use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use vrouter_state::{
    AclHealth, AclRuleCounters, DiscoveryFile, HostInfo, PeerOrigin, Prefix, ProbesFile, Refusal,
    RoutesFile, StackName, SteeringMode, Vni,
};

/// The steering table's rule counters by comment, (packets, bytes), as a dump of the
/// kernel's copy reads them (empty when it cannot be read, e.g. without
/// CAP_NET_ADMIN, or when there is no table).
pub type SteeringCounters = BTreeMap<String, (u64, u64)>;

/// What the state files cannot tell: known only inside the running daemon.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LiveFacts {
    pub ready: bool,
    /// Why the host is not ready (empty when ready).
    pub not_ready: Vec<String>,
    /// Reconciles run by this process, and how many of them failed.
    pub reconciles: u64,
    pub reconcile_errors: u64,
    /// Duration of the last reconcile, in milliseconds.
    pub last_reconcile_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// When this status was computed (ms since the Unix epoch).
    pub generated_ms: u64,
    pub host: HostInfo,
    pub discovery_generation: u64,
    /// When discovery last wrote discovery.json (ms since the Unix epoch).
    pub discovery_updated_ms: u64,
    /// None when routes.json is missing.
    pub routes_generation: Option<u64>,
    /// Present only when served by the running daemon.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveFacts>,
    pub hosts: Vec<HostRow>,
    /// Remote hosts counted by state (membership state, or "static").
    pub peers_by_state: BTreeMap<String, u64>,
    /// VXLAN tunnels: one per (VNI, remote host) that carries published routes, i.e.
    /// the all-zeros FDB rows discovery keeps.
    pub tunnels: u64,
    pub devices: Vec<String>,
    pub stacks: Vec<StackRow>,
    pub routes: Vec<RouteRow>,
    /// Kernel changes made by discovery's timer reconciles (drift) since it started.
    pub drift_repairs: u64,
    pub refused: Vec<Refusal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gossip: Option<GossipCounters>,
    pub traffic: Vec<PeerTraffic>,
    /// Per local stack, its access policy and the counters of its rules.
    pub acl: Vec<StackAcl>,
    /// Port steering, when discovery.json reports it (absent: an older discovery,
    /// the policy-rule path for every stack).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steering: Option<SteeringView>,
    /// Encryption as discovery.json reports it (absent: an older discovery, `off`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption: Option<vrouter_state::EncryptionStatus>,
    /// This host's local, observed and advertised addresses (absent: no gossip, or an
    /// older discovery).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addresses: Option<vrouter_state::AddressesStatus>,
    /// The path to each probed gossip peer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<vrouter_state::PathStatus>>,
    /// This host as a relay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<vrouter_state::RelayStatus>,
    /// State files that could not be used (e.g. a corrupt routes.json), with the fix.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// One remote host.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostRow {
    pub addr: Ipv4Addr,
    /// "static" for a configured peer; else the gossip membership state
    /// ("alive", "suspect", "down", "left", "unknown").
    pub state: String,
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Its stacks are routed from this host now.
    pub routed: bool,
    /// Some local router got an overlay probe answer from it within the reach window.
    pub datapath_reachable: bool,
    /// Last overlay probe answer from any of its routers (ms since the Unix epoch).
    pub last_seen_ms: Option<u64>,
    /// Smoothed round-trip time to its routers (the best local router's view).
    pub rtt_us: Option<u64>,
    pub stacks: Vec<StackName>,
    /// A probed gossip peer: `direct`, `relayed via <host>` or `unreachable (<code>)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// A stack this host knows, local or remote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StackRow {
    pub name: StackName,
    pub vni: Vni,
    pub prefixes: Vec<Prefix>,
    pub router_ip: Ipv4Addr,
    /// None for a stack on this host.
    pub host: Option<Ipv4Addr>,
    /// Local stacks: the router's attach connection is open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    /// Local stacks: the host bridge of the stack network.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Remote stacks of a probed gossip peer: `direct`, `relayed via <host>` or
    /// `unreachable (<code>)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// How a path reads in the status: `direct`, `relayed via <host>`, `unreachable (<code>)`.
pub fn path_text(p: &vrouter_state::PathStatus) -> String {
    match p.via.as_str() {
        "relay" => format!(
            "relayed via {}",
            p.relay_addr
                .map(|a| a.to_string())
                .or_else(|| p.relay_node.clone())
                .unwrap_or_else(|| "?".into())
        ),
        "unreachable" => format!(
            "unreachable ({})",
            p.code.clone().unwrap_or_else(|| "?".into())
        ),
        other => other.to_string(),
    }
}

/// Routes of one local stack: published by discovery and as its router reports them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteRow {
    pub stack: StackName,
    /// Remote routes routes.json gives this stack (what discovery wants installed).
    pub desired: u64,
    /// Of those, installed in the router's namespace at its last check (None: the
    /// router does not report it, or its probe file is stale).
    pub installed: Option<u64>,
    /// Routes or neighbours the router repaired since it started.
    pub router_drift_repaired: Option<u64>,
    pub overlay_link_up: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_error: Option<String>,
    /// Age of the router's probe file, in milliseconds (None: no file).
    pub report_age_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GossipCounters {
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Dropped packets by reason ("bad_key", "malformed", "replayed").
    pub rejected: BTreeMap<String, u64>,
}

/// Between one local stack and one remote stack, from the local router's probe file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerTraffic {
    pub local_stack: StackName,
    pub remote_stack: StackName,
    pub remote_host: Option<Ipv4Addr>,
    /// Reachable at the router's last report, and the report is fresh.
    pub reachable: bool,
    pub rtt_us: Option<u64>,
    /// Recent probe loss, 0..1 (None before any probe was sent in the window).
    pub loss: Option<f64>,
    /// The full-MTU probe passed at its last check (None before one ran).
    pub mtu_ok: Option<bool>,
    pub mtu_size: Option<u32>,
    /// Counters, when the router counts traffic.
    pub tx_bytes: Option<u64>,
    pub tx_packets: Option<u64>,
    pub rx_bytes: Option<u64>,
    pub rx_packets: Option<u64>,
}

/// Port steering on this host: the configured mode and each local stack's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SteeringView {
    pub mode: SteeringMode,
    /// The netdev table (`nft list table netdev <table>`).
    pub table: String,
    pub stacks: Vec<StackSteeringRow>,
}

/// One local stack's steering, with the table's counters as evidence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StackSteeringRow {
    pub local_stack: StackName,
    pub mode: SteeringMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Per service port, the frames its ingress chain steered.
    pub ports: Vec<PortCounters>,
    /// Frames sent to the stack's own router (conntrack stacks, forged sources,
    /// oversized non-TCP frames).
    pub to_router: Option<PortCounters>,
    /// Frames from the router's port delivered straight to a service's port.
    pub delivered: Option<PortCounters>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PortCounters {
    pub port: String,
    pub packets: u64,
    pub bytes: u64,
}

/// One local stack's access policy, from its router's probe file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StackAcl {
    pub local_stack: StackName,
    /// The policy's state at the router's last report, if that report is fresh.
    pub state: Option<AclHealth>,
    /// Per rule, packets and bytes accepted and dropped (totals: a stale report's
    /// still count).
    pub rules: Vec<AclRuleCounters>,
}

/// Builds the status. `probes` are the routers' files as read (stale ones included:
/// their counters still count, their liveness does not).
pub fn build(
    discovery: &DiscoveryFile,
    routes: Option<&RoutesFile>,
    probes: &[ProbesFile],
    live: Option<LiveFacts>,
    steer: &SteeringCounters,
    now_ms: u64,
) -> Status {
    let fresh = |f: &ProbesFile| f.is_fresh(now_ms);

    // Hosts: configured and gossip peers, and gossip members not routed.
    let mut hosts: BTreeMap<Ipv4Addr, HostRow> = BTreeMap::new();
    for p in &discovery.peers {
        let row = hosts.entry(p.addr).or_insert_with(|| HostRow {
            addr: p.addr,
            state: if p.source == PeerOrigin::Static {
                "static".into()
            } else {
                "unknown".into()
            },
            source: p.source.to_string(),
            node_id: p.node.clone(),
            routed: true,
            datapath_reachable: false,
            last_seen_ms: None,
            rtt_us: None,
            stacks: Vec::new(),
            path: None,
        });
        row.stacks.extend(p.stacks.iter().map(|s| s.name.clone()));
    }
    if let Some(g) = &discovery.gossip {
        for m in &g.members {
            let row = hosts.entry(m.underlay).or_insert_with(|| HostRow {
                addr: m.underlay,
                state: m.state.to_string(),
                source: PeerOrigin::Gossip.to_string(),
                node_id: Some(m.node_id.clone()),
                routed: m.routed,
                datapath_reachable: false,
                last_seen_ms: None,
                rtt_us: None,
                stacks: m.stacks.clone(),
                path: None,
            });
            row.state = m.state.to_string();
            row.routed = m.routed;
            row.node_id = Some(m.node_id.clone());
        }
    }
    for p in discovery.paths.iter().flatten() {
        if let Some(row) = hosts.get_mut(&p.peer_addr) {
            row.path = Some(path_text(p));
        }
    }
    for f in probes {
        for p in &f.peers {
            let Some(row) = hosts.get_mut(&p.host) else {
                continue;
            };
            if p.reachable && fresh(f) {
                row.datapath_reachable = true;
            }
            if p.last_ok_ms > row.last_seen_ms {
                row.last_seen_ms = p.last_ok_ms;
            }
            if let Some(rtt) = p.srtt_us.or(p.rtt_us).filter(|_| p.reachable && fresh(f)) {
                row.rtt_us = Some(row.rtt_us.map_or(rtt, |r| r.min(rtt)));
            }
        }
    }
    for row in hosts.values_mut() {
        row.stacks.sort();
        row.stacks.dedup();
    }
    let hosts: Vec<HostRow> = hosts.into_values().collect();
    let mut peers_by_state: BTreeMap<String, u64> = BTreeMap::new();
    if discovery.gossip.is_some() {
        for s in ["alive", "suspect", "down", "left"] {
            peers_by_state.insert(s.into(), 0);
        }
    }
    if discovery.peers.iter().any(|p| p.source == "static") {
        peers_by_state.insert("static".into(), 0);
    }
    for h in &hosts {
        *peers_by_state.entry(h.state.clone()).or_default() += 1;
    }

    // Stacks: local first, then remote by host.
    let mut stacks: Vec<StackRow> = discovery
        .local_stacks
        .iter()
        .map(|l| StackRow {
            name: l.spec.name.clone(),
            vni: l.spec.vni,
            prefixes: l.spec.prefixes.clone(),
            router_ip: l.spec.router_ip,
            host: None,
            connected: Some(l.connected),
            bridge: l.bridge.clone(),
            path: None,
        })
        .collect();
    let path_of = |addr: Ipv4Addr| {
        discovery
            .paths
            .iter()
            .flatten()
            .find(|p| p.peer_addr == addr)
            .map(path_text)
    };
    for p in &discovery.peers {
        for s in &p.stacks {
            stacks.push(StackRow {
                name: s.name.clone(),
                vni: s.vni,
                prefixes: s.prefixes.clone(),
                router_ip: s.router_ip,
                host: Some(p.addr),
                connected: None,
                bridge: None,
                path: path_of(p.addr),
            });
        }
    }

    // Routes per local stack.
    let by_stack: BTreeMap<&StackName, &ProbesFile> =
        probes.iter().map(|f| (&f.stack, f)).collect();
    let mut routes_rows = Vec::new();
    let mut tunnels: BTreeSet<(Vni, Ipv4Addr)> = BTreeSet::new();
    let mut names: BTreeSet<&StackName> = discovery
        .local_stacks
        .iter()
        .map(|l| &l.spec.name)
        .collect();
    if let Some(r) = routes {
        names.extend(r.stacks.keys());
    }
    for name in names {
        let published = routes.and_then(|r| r.stacks.get(name));
        if let Some(p) = published {
            for r in p.routes.iter().filter(|r| !r.same_host) {
                if let Some(vni) = p.vni {
                    tunnels.insert((vni, r.host));
                }
            }
        }
        let file = by_stack.get(name).copied();
        let health = file.filter(|f| fresh(f)).and_then(|f| f.health.as_ref());
        routes_rows.push(RouteRow {
            stack: name.clone(),
            desired: published.map_or(0, |p| p.routes.len() as u64),
            installed: health.map(|h| u64::from(h.routes_installed)),
            router_drift_repaired: file
                .and_then(|f| f.health.as_ref())
                .map(|h| h.drift_repaired),
            overlay_link_up: health.map(|h| h.overlay_link_up),
            router_error: health.and_then(|h| h.last_error.clone()),
            report_age_ms: file.map(|f| now_ms.saturating_sub(f.updated_ms)),
        });
    }

    // Per remote stack, from each local router's file.
    let mut traffic = Vec::new();
    for f in probes {
        let mut remote: BTreeSet<&StackName> = f.peers.iter().map(|p| &p.stack).collect();
        remote.extend(f.traffic.iter().map(|t| &t.stack));
        for r in remote {
            let peer = f.peers.iter().find(|p| &p.stack == r);
            // A stale report's measurements say nothing now; its counters still count.
            let probe = peer.filter(|_| fresh(f));
            let count = f.traffic.iter().find(|t| &t.stack == r);
            // Frames steered at the ports bypass the local router: its tx misses them.
            let steered = steered_toward(discovery, routes, &f.stack, r, steer);
            let tx = |router: Option<u64>, steered: Option<u64>| match (router, steered) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
            };
            traffic.push(PeerTraffic {
                local_stack: f.stack.clone(),
                remote_stack: r.clone(),
                remote_host: peer.map(|p| p.host),
                reachable: probe.is_some_and(|p| p.reachable),
                rtt_us: probe.and_then(|p| p.srtt_us.or(p.rtt_us)),
                loss: probe.filter(|p| p.recent_sent > 0).map(|p| {
                    f64::from(p.recent_lost.min(p.recent_sent)) / f64::from(p.recent_sent)
                }),
                mtu_ok: probe.and_then(|p| p.mtu.as_ref()).map(|m| m.ok),
                mtu_size: probe.and_then(|p| p.mtu.as_ref()).map(|m| m.size),
                tx_bytes: tx(count.map(|c| c.tx_bytes), steered.map(|s| s.1)),
                tx_packets: tx(count.map(|c| c.tx_packets), steered.map(|s| s.0)),
                rx_bytes: count.map(|c| c.rx_bytes),
                rx_packets: count.map(|c| c.rx_packets),
            });
        }
    }

    let acl = probes
        .iter()
        .filter(|f| !f.acl.is_empty() || f.health.as_ref().is_some_and(|h| h.acl.is_some()))
        .map(|f| StackAcl {
            local_stack: f.stack.clone(),
            state: f
                .health
                .as_ref()
                .filter(|_| fresh(f))
                .and_then(|h| h.acl.clone()),
            rules: f.acl.clone(),
        })
        .collect();

    let gossip = discovery.gossip.as_ref().map(|g| {
        let c = |k: &str| g.counters.get(k).copied().unwrap_or(0);
        GossipCounters {
            packets_in: c("packets_in"),
            packets_out: c("packets_out"),
            bytes_in: c("bytes_in"),
            bytes_out: c("bytes_out"),
            rejected: g
                .counters
                .iter()
                .filter_map(|(k, v)| k.strip_prefix("rejected_").map(|r| (r.to_string(), *v)))
                .collect(),
        }
    });

    let steering = discovery.steering.as_ref().map(|st| {
        let get = |port: &str, comment: String| {
            steer.get(&comment).map(|(packets, bytes)| PortCounters {
                port: port.to_string(),
                packets: *packets,
                bytes: *bytes,
            })
        };
        SteeringView {
            mode: st.mode,
            table: st.table.clone(),
            stacks: st
                .stacks
                .iter()
                .map(|(name, s)| StackSteeringRow {
                    local_stack: name.clone(),
                    mode: s.mode,
                    reason: s.reason.clone(),
                    ports: s
                        .ports
                        .iter()
                        .filter_map(|p| get(p, crate::steer::port_comment(p, name)))
                        .collect(),
                    to_router: get("", crate::steer::own_comment(name)),
                    delivered: get("", crate::steer::deliver_comment(name)),
                })
                .collect(),
        }
    });

    Status {
        generated_ms: now_ms,
        host: discovery.host.clone(),
        discovery_generation: discovery.generation,
        discovery_updated_ms: discovery.updated_ms,
        routes_generation: routes.map(|r| r.generation),
        live,
        hosts,
        peers_by_state,
        tunnels: tunnels.len() as u64,
        devices: discovery.devices.iter().map(|v| v.vxlan_ifname()).collect(),
        stacks,
        routes: routes_rows,
        drift_repairs: discovery.drift_repairs,
        refused: discovery.refused.clone(),
        gossip,
        traffic,
        acl,
        steering,
        encryption: discovery.encryption.clone(),
        addresses: discovery.addresses.clone(),
        paths: discovery.paths.clone(),
        relay: discovery.relay.clone(),
        problems: Vec::new(),
    }
}

/// The "steer <local> <remote>" counters, (packets, bytes): what the ports sent from
/// `local` toward `remote` without the local router.
fn steered_toward(
    discovery: &DiscoveryFile,
    routes: Option<&RoutesFile>,
    local: &StackName,
    remote: &StackName,
    steer: &SteeringCounters,
) -> Option<(u64, u64)> {
    let spec = &discovery
        .local_stacks
        .iter()
        .find(|s| &s.spec.name == local)?
        .spec;
    let via = routes?
        .stacks
        .get(local)?
        .routes
        .iter()
        .find(|r| &r.stack == remote)?
        .via;
    crate::steer::steered(steer, spec, remote, via)
}

/// Reads the state directory and builds the status (the CLI's path, and the daemon's
/// with its live facts). A missing or unusable discovery.json is an error that says
/// what to do; a missing routes.json is not (nothing published yet), and an unusable
/// one is listed in `problems` (the rest is still worth showing).
pub fn from_dir(
    dir: &vrouter_state::StateDir,
    live: Option<LiveFacts>,
    steer: &SteeringCounters,
) -> Result<Status, String> {
    let discovery = dir.read_discovery().map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    let routes = match dir.read_routes() {
        Ok(r) => Some(r),
        Err(vrouter_state::ReadError::Missing { .. }) => None,
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    let probes = dir.read_all_probes();
    let mut status = build(
        &discovery,
        routes.as_ref(),
        &probes,
        live,
        steer,
        vrouter_state::now_ms(),
    );
    status.problems = problems;
    Ok(status)
}

/// Human tables for `vrouter-discovery status`.
pub fn render_text(s: &Status) -> String {
    let mut out = String::new();
    let h = &s.host;
    let _ = writeln!(
        out,
        "host {} ({}), advertising {}, VXLAN port {}, pid {}",
        h.local_addr, h.underlay_interface, h.advertise_addr, h.vxlan_port, h.pid
    );
    let _ = writeln!(
        out,
        "discovery.json generation {} written {} ago; routes.json {}",
        s.discovery_generation,
        age(s.generated_ms, Some(s.discovery_updated_ms)),
        s.routes_generation
            .map(|g| format!("generation {g}"))
            .unwrap_or_else(|| "missing".into())
    );
    for p in &s.problems {
        let _ = writeln!(out, "PROBLEM: {p}");
    }
    if let Some(l) = &s.live {
        if l.ready {
            let _ = writeln!(out, "ready");
        } else {
            let _ = writeln!(out, "NOT READY: {}", l.not_ready.join("; "));
        }
    }
    let _ = writeln!(
        out,
        "devices: {}; tunnels: {}; drift repairs: {}",
        if s.devices.is_empty() {
            "none".into()
        } else {
            s.devices.join(", ")
        },
        s.tunnels,
        s.drift_repairs
    );

    out.push_str("\nHOSTS\n");
    let rows: Vec<Vec<String>> = s
        .hosts
        .iter()
        .map(|r| {
            vec![
                r.addr.to_string(),
                r.state.clone(),
                if r.routed { "yes" } else { "no" }.into(),
                if r.datapath_reachable { "yes" } else { "no" }.into(),
                age(s.generated_ms, r.last_seen_ms),
                r.rtt_us.map(fmt_us).unwrap_or_else(|| "-".into()),
                join(&r.stacks),
                r.path.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "ADDRESS",
            "STATE",
            "ROUTED",
            "REACHABLE",
            "LAST SEEN",
            "RTT",
            "STACKS",
            "PATH",
        ],
        &rows,
    );

    out.push_str("\nSTACKS\n");
    let rows: Vec<Vec<String>> = s
        .stacks
        .iter()
        .map(|r| {
            vec![
                r.name.to_string(),
                r.vni.to_string(),
                join(&r.prefixes),
                r.router_ip.to_string(),
                match (r.host, r.connected) {
                    (Some(h), _) => h.to_string(),
                    (None, Some(true)) => "local".into(),
                    (None, _) => "local (disconnected)".into(),
                },
                r.path.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &mut out,
        &["STACK", "VNI", "PREFIXES", "ROUTER", "HOST", "PATH"],
        &rows,
    );

    out.push_str("\nROUTES\n");
    let rows: Vec<Vec<String>> = s
        .routes
        .iter()
        .map(|r| {
            vec![
                r.stack.to_string(),
                format!(
                    "{}/{}",
                    r.installed
                        .map(|i| i.to_string())
                        .unwrap_or_else(|| "?".into()),
                    r.desired
                ),
                r.overlay_link_up
                    .map(|u| if u { "up" } else { "DOWN" }.to_string())
                    .unwrap_or_else(|| "-".into()),
                r.router_drift_repaired
                    .map(|d| d.to_string())
                    .unwrap_or_else(|| "-".into()),
                match r.report_age_ms {
                    Some(a) => fmt_ms(a),
                    None => "no report".into(),
                },
                r.router_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "STACK",
            "INSTALLED/DESIRED",
            "OVERLAY",
            "REPAIRED",
            "REPORT AGE",
            "ERROR",
        ],
        &rows,
    );

    out.push_str("\nCONFLICTS AND REFUSED PREFIXES\n");
    if s.refused.is_empty() {
        out.push_str("none\n");
    }
    for r in &s.refused {
        let _ = writeln!(
            out,
            "{} {}: {}",
            r.stack,
            r.prefix
                .map(|p| p.to_string())
                .unwrap_or_else(|| "(whole stack)".into()),
            r.reason
        );
    }

    out.push_str("\nTRAFFIC\n");
    let rows: Vec<Vec<String>> = s
        .traffic
        .iter()
        .map(|t| {
            let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
            vec![
                format!("{} -> {}", t.local_stack, t.remote_stack),
                t.remote_host
                    .map(|h| h.to_string())
                    .unwrap_or_else(|| "-".into()),
                if t.reachable { "yes" } else { "no" }.into(),
                t.rtt_us.map(fmt_us).unwrap_or_else(|| "-".into()),
                t.loss
                    .map(|l| format!("{:.1}%", l * 100.0))
                    .unwrap_or_else(|| "-".into()),
                match (t.mtu_ok, t.mtu_size) {
                    (Some(true), Some(n)) => format!("ok {n}"),
                    (Some(false), Some(n)) => format!("FAIL {n}"),
                    _ => "-".into(),
                },
                format!("{}/{}", opt(t.tx_bytes), opt(t.tx_packets)),
                format!("{}/{}", opt(t.rx_bytes), opt(t.rx_packets)),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "PEERING",
            "HOST",
            "REACHABLE",
            "RTT",
            "LOSS",
            "MTU",
            "TX BYTES/PKTS",
            "RX BYTES/PKTS",
        ],
        &rows,
    );

    if let Some(st) = &s.steering {
        let mode = |m: SteeringMode| match m {
            SteeringMode::Ports => "ports",
            SteeringMode::Rule => "rule",
        };
        let _ = writeln!(
            out,
            "\nSTEERING\nmode {} (table netdev {})",
            mode(st.mode),
            st.table
        );
        let count = |c: &PortCounters| format!("{}/{}", c.bytes, c.packets);
        let rows: Vec<Vec<String>> = st
            .stacks
            .iter()
            .map(|r| {
                let ports: Vec<String> = r
                    .ports
                    .iter()
                    .map(|p| format!("{} {}", p.port, count(p)))
                    .collect();
                vec![
                    r.local_stack.to_string(),
                    mode(r.mode).into(),
                    if ports.is_empty() {
                        "-".into()
                    } else {
                        ports.join(", ")
                    },
                    r.to_router
                        .as_ref()
                        .map(count)
                        .unwrap_or_else(|| "-".into()),
                    r.delivered
                        .as_ref()
                        .map(count)
                        .unwrap_or_else(|| "-".into()),
                    r.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                "STACK",
                "MODE",
                "PORTS BYTES/PKTS",
                "TO ROUTER",
                "DELIVERED",
                "REASON",
            ],
            &rows,
        );
    }

    if let Some(e) = &s.encryption {
        render_encryption(&mut out, e);
    }

    render_paths(&mut out, s);

    if !s.acl.is_empty() {
        out.push_str("\nACCESS\n");
        for a in &s.acl {
            let state = match &a.state {
                None => "no fresh report".to_string(),
                Some(h) => match &h.closed {
                    Some(reason) => format!("CLOSED: {reason}"),
                    None => format!(
                        "default {}, {} rule(s), generation {}{}",
                        h.default,
                        h.rules,
                        h.generation,
                        match &h.refused {
                            Some(e) => format!("; last change refused: {e}"),
                            None => String::new(),
                        }
                    ),
                },
            };
            let _ = writeln!(out, "{}: {state}", a.local_stack);
        }
        let rows: Vec<Vec<String>> = s
            .acl
            .iter()
            .flat_map(|a| {
                a.rules.iter().map(|r| {
                    vec![
                        a.local_stack.to_string(),
                        r.rule.clone(),
                        r.verdict.clone(),
                        format!("{}/{}", r.accepted_bytes, r.accepted_packets),
                        format!("{}/{}", r.dropped_bytes, r.dropped_packets),
                    ]
                })
            })
            .collect();
        table(
            &mut out,
            &[
                "STACK",
                "RULE",
                "VERDICT",
                "ACCEPTED BYTES/PKTS",
                "DROPPED BYTES/PKTS",
            ],
            &rows,
        );
    }

    if let Some(g) = &s.gossip {
        let rejected: Vec<String> = g.rejected.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            out,
            "\nGOSSIP\npackets in {} out {}, bytes in {} out {}, rejected: {}",
            g.packets_in,
            g.packets_out,
            g.bytes_in,
            g.bytes_out,
            if rejected.is_empty() {
                "none".into()
            } else {
                rejected.join(", ")
            }
        );
    }
    out
}

/// The Addresses and Paths sections (issue 17), and the relay line: this host's
/// local, observed and advertised addresses; per probed peer the address in use and
/// whether traffic goes direct or through which relay.
fn render_paths(out: &mut String, s: &Status) {
    if let Some(a) = &s.addresses {
        out.push_str("\nADDRESSES\n");
        let _ = writeln!(out, "local: {}", a.local);
        let _ = writeln!(
            out,
            "observed: {}{}",
            a.observed
                .map(|o| o.to_string())
                .unwrap_or_else(|| "none (peers see the local address)".into()),
            if a.port_translated {
                " (the NAT rewrites ports)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "advertised: {}{}",
            a.advertised,
            if a.pinned {
                " (pinned by VROUTER_ADVERTISE_ADDR)"
            } else {
                ""
            }
        );
    }
    if let Some(paths) = &s.paths {
        out.push_str("\nPATHS\n");
        let rows: Vec<Vec<String>> = paths
            .iter()
            .map(|p| {
                vec![
                    p.peer_addr.to_string(),
                    p.node.clone(),
                    p.addr_in_use.to_string(),
                    path_text(p),
                    p.rtt_ms
                        .map(|r| format!("{r:.2} ms"))
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        table(
            out,
            &["PEER", "NODE", "ADDRESS IN USE", "PATH", "RTT"],
            &rows,
        );
    }
    if let Some(r) = &s.relay {
        let _ = writeln!(
            out,
            "relay: {}{}",
            if r.offered { "offered" } else { "not offered" },
            if r.offered {
                format!(
                    ", VNIs {}, forwarded {} packets / {} bytes",
                    if r.vnis.is_empty() {
                        "none".to_string()
                    } else {
                        join(&r.vnis)
                    },
                    r.forwarded_packets,
                    r.forwarded_bytes
                )
            } else {
                String::new()
            }
        );
    }
}

/// The Encryption section: the mode, this host's key and tunnel address, every peer's
/// state, and the plain peers named on a line of their own.
fn render_encryption(out: &mut String, e: &vrouter_state::EncryptionStatus) {
    let _ = writeln!(
        out,
        "\nENCRYPTION\nmode {}, backend {}, device {}, overlay MTU {}",
        e.mode,
        e.backend.as_deref().unwrap_or("none"),
        e.device,
        e.overlay_mtu
    );
    if let (Some(k), Some(t)) = (&e.public_key, e.tunnel_address) {
        let _ = writeln!(
            out,
            "public key {k}, tunnel address {t}, port {}",
            e.listen_port.unwrap_or(0)
        );
    }
    if let Some(n) = &e.next_public_key {
        let _ = writeln!(out, "key rotation in progress: next key {n}");
    }
    let plain: Vec<String> = e
        .peers
        .iter()
        .filter(|p| p.state == "plain")
        .map(|p| p.host.to_string())
        .collect();
    if !plain.is_empty() {
        let _ = writeln!(out, "plain (unencrypted) peers: {}", plain.join(", "));
    }
    let rows: Vec<Vec<String>> = e
        .peers
        .iter()
        .map(|p| {
            vec![
                p.host.to_string(),
                p.state.clone(),
                p.tunnel_address
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "-".into()),
                p.last_handshake_age_s
                    .map(|a| format!("{a:.0}s"))
                    .unwrap_or_else(|| "-".into()),
                format!("{}/{}", p.tx_bytes, p.rx_bytes),
                p.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        out,
        &[
            "HOST",
            "STATE",
            "TUNNEL",
            "HANDSHAKE",
            "TX/RX BYTES",
            "REASON",
        ],
        &rows,
    );
}

fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    if rows.is_empty() {
        out.push_str("none\n");
        return;
    }
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.len());
        }
    }
    let line = |out: &mut String, cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = width[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(out, header.to_vec());
    for r in rows {
        line(out, r.iter().map(|s| s.as_str()).collect());
    }
}

fn join<T: std::fmt::Display>(v: &[T]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn fmt_us(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn fmt_ms(ms: u64) -> String {
    if ms < 10_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} s", ms / 1000)
    } else {
        format!("{} h", ms / 3_600_000)
    }
}

fn age(now: u64, then: Option<u64>) -> String {
    match then {
        Some(t) if t > 0 => fmt_ms(now.saturating_sub(t)),
        _ => "never".into(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use vrouter_state::{
        GossipMember, GossipStatus, LocalStack, MtuCheck, PeerHost, PeerProbe, RemoteRoute,
        RouterHealth, StackRoutes, StackSpec, StackTraffic, SCHEMA_VERSION,
    };

    pub(crate) const NOW: u64 = 1_800_000_000_000;

    fn name(s: &str) -> StackName {
        StackName::new(s).unwrap()
    }

    fn spec(n: &str, third: u8) -> StackSpec {
        StackSpec {
            name: name(n),
            vni: Vni::new(1000).unwrap(),
            prefixes: vec![format!("10.{third}.0.0/24").parse().unwrap()],
            router_ip: Ipv4Addr::new(10, third, 0, 254),
        }
    }

    fn route(n: &str, third: u8, host: Ipv4Addr, same_host: bool) -> RemoteRoute {
        let s = spec(n, third);
        RemoteRoute {
            prefix: s.prefixes[0],
            stack: s.name.clone(),
            via: s.router_ip,
            mac: s.router_mac(),
            host,
            same_host,
        }
    }

    const H1: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const H2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const H3: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);

    /// Host 1 carries a and c; host 2 carries b (static); host 3 (gossip, down) d.
    pub(crate) fn discovery() -> DiscoveryFile {
        let local = |n: &str, third: u8, connected: bool| LocalStack {
            spec: spec(n, third),
            router_mac: spec(n, third).router_mac(),
            bridge: Some(format!("br-{n}")),
            connected,
            acked_generation: 4,
            generation: 1,
        };
        DiscoveryFile {
            schema: SCHEMA_VERSION,
            generation: 9,
            updated_ms: NOW - 1_000,
            host: HostInfo {
                underlay_interface: "eth0".into(),
                local_addr: H1,
                advertise_addr: H1,
                vxlan_port: 4789,
                underlay_mtu: 1500,
                overlay_mtu: None,
                pid: 42,
            },
            peers: vec![
                PeerHost {
                    addr: H2,
                    stacks: vec![spec("b", 2)],
                    source: PeerOrigin::Static,
                    node: None,
                    claims: BTreeMap::new(),
                    generations: BTreeMap::new(),
                    encryption: None,
                },
                PeerHost {
                    addr: H3,
                    stacks: vec![spec("d", 4)],
                    source: PeerOrigin::Gossip,
                    node: Some("00000000000000d3".into()),
                    claims: BTreeMap::new(),
                    generations: BTreeMap::new(),
                    encryption: None,
                },
            ],
            local_stacks: vec![local("a", 1, true), local("c", 3, false)],
            refused: vec![vrouter_state::Refusal {
                stack: name("x"),
                prefix: Some("10.2.0.0/25".parse().unwrap()),
                reason: "prefix 10.2.0.0/25 of stack x overlaps a prefix of stack b".into(),
                code: "overlap".into(),
            }],
            devices: vec![Vni::new(1000).unwrap()],
            drift_repairs: 3,
            steering: None,
            encryption: None,
            addresses: None,
            paths: None,
            relay: None,
            gossip: Some(GossipStatus {
                node_id: "00000000000000d1".into(),
                addr: "198.18.0.1:7950".into(),
                keys: vec![],
                insecure: true,
                members: vec![
                    GossipMember {
                        node_id: "00000000000000d3".into(),
                        addr: "198.18.0.3:7950".into(),
                        underlay: H3,
                        state: vrouter_state::MemberState::Down,
                        stacks: vec![name("d")],
                        version: 2,
                        datapath_reachable: true,
                        routed: true,
                    },
                    GossipMember {
                        node_id: "00000000000000d4".into(),
                        addr: "198.18.0.4:7950".into(),
                        underlay: Ipv4Addr::new(198, 18, 0, 4),
                        state: vrouter_state::MemberState::Left,
                        stacks: vec![],
                        version: 7,
                        datapath_reachable: false,
                        routed: false,
                    },
                ],
                counters: [
                    ("packets_in", 100),
                    ("packets_out", 120),
                    ("bytes_in", 10_000),
                    ("bytes_out", 12_000),
                    ("rejected_bad_key", 5),
                    ("rejected_malformed", 1),
                    ("rejected_replayed", 0),
                    ("anti_entropy_rounds", 9),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            }),
        }
    }

    pub(crate) fn routes() -> RoutesFile {
        let vni = Some(Vni::new(1000).unwrap());
        let mut stacks = BTreeMap::new();
        stacks.insert(
            name("a"),
            StackRoutes {
                vni,
                routes: vec![
                    route("b", 2, H2, false),
                    route("c", 3, H1, true),
                    route("d", 4, H3, false),
                ],
            },
        );
        stacks.insert(
            name("c"),
            StackRoutes {
                vni,
                routes: vec![route("a", 1, H1, true), route("b", 2, H2, false)],
            },
        );
        RoutesFile {
            schema: SCHEMA_VERSION,
            generation: 17,
            stacks,
        }
    }

    /// Router a's report: fresh, b reachable with traffic and MTU ok, d lossy and
    /// failing the MTU check. Router c's report is stale.
    pub(crate) fn probes() -> Vec<ProbesFile> {
        let peer = |n: &str, third: u8, host: Ipv4Addr| PeerProbe {
            router_ip: Ipv4Addr::new(10, third, 0, 254),
            stack: name(n),
            host,
            last_ok_ms: Some(NOW - 200),
            rtt_us: Some(900),
            sent: 100,
            received: 99,
            reachable: true,
            srtt_us: Some(800),
            recent_sent: 40,
            recent_lost: 0,
            mtu: Some(MtuCheck {
                size: 1450,
                ok: true,
                checked_ms: NOW - 5_000,
            }),
        };
        let mut d = peer("d", 4, H3);
        d.recent_lost = 10;
        d.srtt_us = Some(2_500);
        d.mtu = Some(MtuCheck {
            size: 1450,
            ok: false,
            checked_ms: NOW - 5_000,
        });
        let a = ProbesFile {
            schema: SCHEMA_VERSION,
            generation: 50,
            stack: name("a"),
            updated_ms: NOW - 300,
            interval_ms: 250,
            peers: vec![peer("b", 2, H2), d],
            health: Some(RouterHealth {
                routes_desired: 3,
                routes_installed: 2,
                drift_repaired: 6,
                overlay_link_up: true,
                last_error: Some("route 10.4.0.0/24: network unreachable".into()),
                traffic_error: None,
                reconciled_ms: None,
                acl: Some(AclHealth {
                    default: "deny".into(),
                    rules: 1,
                    generation: 3,
                    ..AclHealth::default()
                }),
            }),
            traffic: vec![StackTraffic {
                stack: name("b"),
                tx_bytes: 1_000,
                tx_packets: 10,
                rx_bytes: 2_000,
                rx_packets: 20,
            }],
            events: None,
            acl: vec![
                AclRuleCounters {
                    rule: "https from b".into(),
                    verdict: "allow".into(),
                    accepted_packets: 40,
                    accepted_bytes: 4_000,
                    dropped_packets: 0,
                    dropped_bytes: 0,
                },
                AclRuleCounters {
                    rule: "default".into(),
                    verdict: "deny".into(),
                    accepted_packets: 0,
                    accepted_bytes: 0,
                    dropped_packets: 7,
                    dropped_bytes: 420,
                },
            ],
        };
        let mut c_peer = peer("b", 2, H2);
        c_peer.srtt_us = Some(100);
        let c = ProbesFile {
            schema: SCHEMA_VERSION,
            generation: 3,
            stack: name("c"),
            updated_ms: NOW - 60_000,
            interval_ms: 250,
            peers: vec![c_peer],
            health: Some(RouterHealth {
                routes_desired: 2,
                routes_installed: 2,
                drift_repaired: 1,
                overlay_link_up: true,
                last_error: None,
                traffic_error: None,
                reconciled_ms: None,
                acl: Some(AclHealth {
                    default: "allow".into(),
                    closed: Some("old news".into()),
                    ..AclHealth::default()
                }),
            }),
            traffic: vec![],
            events: None,
            acl: vec![AclRuleCounters {
                rule: "default".into(),
                verdict: "allow".into(),
                accepted_packets: 9,
                accepted_bytes: 900,
                dropped_packets: 0,
                dropped_bytes: 0,
            }],
        };
        vec![a, c]
    }

    /// a is steered at its ports (one service port), c is not (no router port yet).
    pub(crate) fn steering() -> (DiscoveryFile, SteeringCounters) {
        let mut d = discovery();
        d.steering = Some(vrouter_state::SteeringStatus {
            mode: SteeringMode::Ports,
            table: "vrouter".into(),
            stacks: [
                (
                    name("a"),
                    vrouter_state::StackSteering {
                        mode: SteeringMode::Ports,
                        reason: None,
                        ports: vec!["veth1".into(), "vethr1".into()],
                    },
                ),
                (
                    name("c"),
                    vrouter_state::StackSteering {
                        mode: SteeringMode::Rule,
                        reason: Some("the router's port is not known yet".into()),
                        ports: vec![],
                    },
                ),
            ]
            .into_iter()
            .collect(),
        });
        let counters = [
            ("port veth1 a", (3, 300)),
            ("own a", (1, 100)),
            ("deliver a", (2, 200)),
            ("steer a b", (5, 500)),
            ("steer c b", (6, 600)),
            ("something else", (7, 700)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        (d, counters)
    }

    #[test]
    fn steering_modes_port_counters_and_steered_tx() {
        let (d, counters) = steering();
        let plain = build(
            &d,
            Some(&routes()),
            &probes(),
            None,
            &SteeringCounters::new(),
            NOW,
        );
        let s = build(&d, Some(&routes()), &probes(), None, &counters, NOW);
        let st = s.steering.as_ref().expect("steering view");
        assert_eq!(
            (st.mode, st.table.as_str()),
            (SteeringMode::Ports, "vrouter")
        );
        let a = &st.stacks[0];
        assert_eq!(a.local_stack, name("a"));
        assert_eq!(
            a.ports,
            vec![PortCounters {
                port: "veth1".into(),
                packets: 3,
                bytes: 300
            }]
        );
        assert_eq!(a.to_router.as_ref().map(|c| c.packets), Some(1));
        assert_eq!(a.delivered.as_ref().map(|c| c.bytes), Some(200));
        let c = &st.stacks[1];
        assert_eq!(c.mode, SteeringMode::Rule);
        assert!(c.reason.is_some() && c.ports.is_empty());

        // tx = the router's count + what the ports steered past it.
        let row = |s: &Status, l: &str, r: &str| {
            s.traffic
                .iter()
                .find(|t| t.local_stack == name(l) && t.remote_stack == name(r))
                .cloned()
                .unwrap()
        };
        let (before, after) = (row(&plain, "a", "b"), row(&s, "a", "b"));
        assert_eq!(after.tx_bytes, before.tx_bytes.map(|b| b + 500));
        assert_eq!(after.tx_packets, before.tx_packets.map(|p| p + 5));
        assert_eq!(after.rx_bytes, before.rx_bytes, "rx is the router's alone");
        let (before, after) = (row(&plain, "c", "b"), row(&s, "c", "b"));
        assert_eq!(
            after.tx_bytes,
            Some(before.tx_bytes.unwrap_or(0) + 600),
            "steered frames count even where the router counts none"
        );

        let text = render_text(&s);
        assert!(
            text.contains("STEERING\nmode ports (table netdev vrouter)"),
            "{text}"
        );
        assert!(text.contains("veth1 300/3"), "{text}");
        assert!(
            text.contains("the router's port is not known yet"),
            "{text}"
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["steering"]["stacks"][0]["ports"][0]["packets"], 3);
        assert!(serde_json::to_value(&plain).unwrap()["steering"].is_object());
        let old = build(
            &discovery(),
            Some(&routes()),
            &probes(),
            None,
            &counters,
            NOW,
        );
        assert!(old.steering.is_none(), "an older discovery.json has none");
    }

    #[test]
    fn hosts_stacks_routes_and_tunnels() {
        let s = build(
            &discovery(),
            Some(&routes()),
            &probes(),
            None,
            &SteeringCounters::new(),
            NOW,
        );
        assert_eq!(s.routes_generation, Some(17));
        assert_eq!(s.devices, vec!["vxlan1000"]);
        // Tunnels: (1000, H2) and (1000, H3); same-host routes need none.
        assert_eq!(s.tunnels, 2);

        let addrs: Vec<Ipv4Addr> = s.hosts.iter().map(|h| h.addr).collect();
        assert_eq!(addrs, vec![H2, H3, Ipv4Addr::new(198, 18, 0, 4)]);
        let h2 = &s.hosts[0];
        assert_eq!(h2.state, "static");
        assert!(h2.datapath_reachable);
        assert_eq!(h2.last_seen_ms, Some(NOW - 200));
        // c's stale report says 100 us, but only fresh reports count for RTT.
        assert_eq!(h2.rtt_us, Some(800));
        let h3 = &s.hosts[1];
        assert_eq!(h3.state, "down");
        assert!(h3.routed && h3.datapath_reachable);
        assert_eq!(h3.node_id.as_deref(), Some("00000000000000d3"));
        assert_eq!(h3.stacks, vec![name("d")]);
        assert_eq!(s.hosts[2].state, "left");
        assert!(!s.hosts[2].routed);
        let by_state: Vec<(&str, u64)> = s
            .peers_by_state
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        assert_eq!(
            by_state,
            vec![
                ("alive", 0),
                ("down", 1),
                ("left", 1),
                ("static", 1),
                ("suspect", 0)
            ]
        );

        let names: Vec<(&str, Option<Ipv4Addr>)> =
            s.stacks.iter().map(|r| (r.name.as_str(), r.host)).collect();
        assert_eq!(
            names,
            vec![("a", None), ("c", None), ("b", Some(H2)), ("d", Some(H3))]
        );
        assert_eq!(s.stacks[1].connected, Some(false));

        assert_eq!(s.routes.len(), 2);
        let a = &s.routes[0];
        assert_eq!((a.desired, a.installed), (3, Some(2)));
        assert_eq!(a.router_drift_repaired, Some(6));
        assert_eq!(a.report_age_ms, Some(300));
        assert!(a.router_error.as_deref().unwrap().contains("unreachable"));
        // c's report is stale: installed unknown, its repair count still stands.
        let c = &s.routes[1];
        assert_eq!((c.desired, c.installed), (2, None));
        assert_eq!(c.router_drift_repaired, Some(1));

        assert_eq!(s.drift_repairs, 3);
        assert_eq!(s.refused.len(), 1);
        let g = s.gossip.as_ref().unwrap();
        assert_eq!(
            (g.packets_in, g.packets_out, g.bytes_in, g.bytes_out),
            (100, 120, 10_000, 12_000)
        );
        assert_eq!(
            g.rejected,
            [("bad_key", 5), ("malformed", 1), ("replayed", 0)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect::<BTreeMap<_, _>>()
        );
    }

    #[test]
    fn traffic_per_remote_stack_from_the_probe_files() {
        let s = build(
            &discovery(),
            Some(&routes()),
            &probes(),
            None,
            &SteeringCounters::new(),
            NOW,
        );
        let rows: Vec<(&str, &str)> = s
            .traffic
            .iter()
            .map(|t| (t.local_stack.as_str(), t.remote_stack.as_str()))
            .collect();
        assert_eq!(rows, vec![("a", "b"), ("a", "d"), ("c", "b")]);
        let ab = &s.traffic[0];
        assert!(ab.reachable);
        assert_eq!(ab.remote_host, Some(H2));
        assert_eq!(ab.rtt_us, Some(800));
        assert_eq!(ab.loss, Some(0.0));
        assert_eq!((ab.mtu_ok, ab.mtu_size), (Some(true), Some(1450)));
        assert_eq!(
            (ab.tx_bytes, ab.tx_packets, ab.rx_bytes, ab.rx_packets),
            (Some(1_000), Some(10), Some(2_000), Some(20))
        );
        let ad = &s.traffic[1];
        assert_eq!(ad.loss, Some(0.25));
        assert_eq!(ad.mtu_ok, Some(false));
        assert_eq!(ad.tx_bytes, None, "no counters for d");
        // A stale report is not reachable, whatever it says, and measures nothing.
        let cb = &s.traffic[2];
        assert!(!cb.reachable);
        assert_eq!(cb.remote_host, Some(H2));
        assert_eq!((cb.rtt_us, cb.loss, cb.mtu_ok), (None, None, None));
    }

    #[test]
    fn access_policy_and_counters_per_local_stack() {
        let s = build(
            &discovery(),
            Some(&routes()),
            &probes(),
            None,
            &SteeringCounters::new(),
            NOW,
        );
        assert_eq!(s.acl.len(), 2);
        let a = &s.acl[0];
        assert_eq!(a.local_stack, name("a"));
        let state = a.state.as_ref().unwrap();
        assert_eq!(
            (state.default.as_str(), state.rules, state.generation),
            ("deny", 1, 3)
        );
        assert_eq!(a.rules[1].dropped_packets, 7);
        // c's report is stale: its state says nothing now, its counters still count.
        let c = &s.acl[1];
        assert_eq!(c.state, None);
        assert_eq!(c.rules[0].accepted_packets, 9);
        // A router without a policy report has no row.
        let mut p = probes();
        for f in &mut p {
            f.acl.clear();
            f.health.as_mut().unwrap().acl = None;
        }
        assert!(build(
            &discovery(),
            Some(&routes()),
            &p,
            None,
            &SteeringCounters::new(),
            NOW
        )
        .acl
        .is_empty());

        let text = render_text(&s);
        for needle in [
            "ACCESS",
            "a: default deny, 1 rule(s), generation 3",
            "c: no fresh report",
            "https from b",
            "4000/40",
            "420/7",
        ] {
            assert!(text.contains(needle), "{needle:?} missing in:\n{text}");
        }
        let json: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(json["acl"][0]["local_stack"], "a");
        assert_eq!(json["acl"][0]["rules"][0]["rule"], "https from b");
        assert_eq!(json["acl"][0]["state"]["default"], "deny");

        // Closed, fresh: said so.
        let mut p = probes();
        p[0].health.as_mut().unwrap().acl.as_mut().unwrap().closed = Some("EPERM".into());
        let text = render_text(&build(
            &discovery(),
            Some(&routes()),
            &p,
            None,
            &SteeringCounters::new(),
            NOW,
        ));
        assert!(text.contains("a: CLOSED: EPERM"), "{text}");
    }

    #[test]
    fn files_without_the_optional_parts() {
        let mut d = discovery();
        d.gossip = None;
        d.peers.truncate(1);
        let mut p = probes();
        for f in &mut p {
            f.health = None;
            f.traffic.clear();
            for peer in &mut f.peers {
                peer.srtt_us = None;
                peer.recent_sent = 0;
                peer.recent_lost = 0;
                peer.mtu = None;
            }
        }
        let s = build(&d, None, &p, None, &SteeringCounters::new(), NOW);
        assert_eq!(s.routes_generation, None);
        assert_eq!(s.tunnels, 0);
        assert!(s.gossip.is_none());
        assert_eq!(s.peers_by_state.get("static"), Some(&1));
        assert_eq!(s.peers_by_state.len(), 1, "{:?}", s.peers_by_state);
        // Local stacks are listed even with nothing published.
        assert_eq!(
            s.routes.iter().map(|r| r.desired).collect::<Vec<_>>(),
            vec![0, 0]
        );
        assert!(s.routes.iter().all(|r| r.installed.is_none()));
        let ab = &s.traffic[0];
        assert_eq!(ab.rtt_us, Some(900), "falls back to the last RTT");
        assert_eq!((ab.loss, ab.mtu_ok, ab.tx_bytes), (None, None, None));
    }

    #[test]
    fn text_has_every_section_and_json_the_same_facts() {
        let live = LiveFacts {
            ready: false,
            not_ready: vec!["vxlan1000 is missing; the next reconcile recreates it".into()],
            reconciles: 5,
            reconcile_errors: 1,
            last_reconcile_ms: Some(2.0),
        };
        let s = build(
            &discovery(),
            Some(&routes()),
            &probes(),
            Some(live),
            &SteeringCounters::new(),
            NOW,
        );
        let text = render_text(&s);
        for needle in [
            "NOT READY: vxlan1000 is missing",
            "tunnels: 2; drift repairs: 3",
            "HOSTS",
            "198.18.0.3  down",
            "0.80 ms",
            "STACKS",
            "10.1.0.0/24",
            "local (disconnected)",
            "ROUTES",
            "2/3",
            "CONFLICTS AND REFUSED PREFIXES",
            "x 10.2.0.0/25: prefix 10.2.0.0/25 of stack x overlaps",
            "TRAFFIC",
            "a -> d",
            "25.0%",
            "FAIL 1450",
            "1000/10",
            "2000/20",
            "rejected: bad_key 5, malformed 1, replayed 0",
        ] {
            assert!(text.contains(needle), "{needle:?} missing in:\n{text}");
        }
        let json: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(json["tunnels"], 2);
        assert_eq!(json["live"]["ready"], false);
        assert_eq!(json["hosts"][1]["state"], "down");
        assert_eq!(json["traffic"][0]["tx_bytes"], 1000);
        assert_eq!(json["routes"][0]["installed"], 2);
        assert_eq!(json["refused"][0]["code"], "overlap");
    }

    #[test]
    fn from_dir_names_missing_and_corrupt_files() {
        let tmp = std::env::temp_dir().join(format!("vrouter-status-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let private = tmp.with_extension("private");
        let dir = vrouter_state::StateDir::open_discovery(&tmp, &private).unwrap();
        let e = from_dir(&dir, None, &SteeringCounters::new()).unwrap_err();
        assert!(e.contains("discovery.json does not exist"), "{e}");
        dir.write_discovery(&discovery()).unwrap();
        let s = from_dir(&dir, None, &SteeringCounters::new()).unwrap();
        assert_eq!(
            s.routes_generation, None,
            "a missing routes.json is no error"
        );
        std::fs::write(tmp.join("routes.json"), b"{not json").unwrap();
        let s = from_dir(&dir, None, &SteeringCounters::new()).unwrap();
        assert_eq!(s.routes_generation, None);
        assert_eq!(s.problems.len(), 1);
        assert!(
            s.problems[0].contains("routes.json is not valid"),
            "{:?}",
            s.problems
        );
        assert!(render_text(&s).contains("PROBLEM: "), "{}", render_text(&s));
        std::fs::write(tmp.join("discovery.json"), b"[]").unwrap();
        let e = from_dir(&dir, None, &SteeringCounters::new()).unwrap_err();
        assert!(e.contains("discovery.json is not valid"), "{e}");
        dir.write_discovery(&discovery()).unwrap();
        dir.write_routes(&routes()).unwrap();
        for p in probes() {
            dir.write_probes(&p).unwrap();
        }
        let s = from_dir(&dir, None, &SteeringCounters::new()).unwrap();
        assert_eq!(s.routes_generation, Some(17));
        assert_eq!(s.traffic.len(), 3);
        std::fs::remove_dir_all(&tmp).unwrap();
        std::fs::remove_dir_all(&private).unwrap();
    }
}
