//! The state files on disk, byte for byte: discovery.json, routes.json and events.log
//! as StateDir writes them, compared with the files in tests/golden/. They were
//! written by the code before event kinds, peer sources and member states became
//! enums; a change here changes what operators' tools and older routers read.
//! `VROUTER_BLESS=1 cargo test -p vrouter-state --test golden` rewrites them.

mod common;

use common::TempDir;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vrouter_state::*;

const TS: u64 = 1_700_000_000_000;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn check(name: &str, written: &Path) {
    let got = std::fs::read_to_string(written).unwrap();
    if std::env::var_os("VROUTER_BLESS").is_some() {
        std::fs::write(golden(name), &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(golden(name)).unwrap();
    assert!(
        got == want,
        "{name} differs from tests/golden/{name}:\n--- got\n{got}\n--- want\n{want}"
    );
}

fn spec(name: &str, vni: u32, prefixes: &[&str], router: &str) -> StackSpec {
    StackSpec {
        name: StackName::new(name).unwrap(),
        vni: Vni::new(vni).unwrap(),
        prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
        router_ip: router.parse().unwrap(),
    }
}

fn stack(s: &str) -> StackName {
    StackName::new(s).unwrap()
}

fn peer_static() -> PeerHost {
    PeerHost {
        addr: "198.18.0.2".parse().unwrap(),
        stacks: vec![spec("b", 1000, &["10.2.0.0/24"], "10.2.0.254")],
        source: "static".into(),
        node: None,
        claims: BTreeMap::new(),
    }
}

fn peer_gossip() -> PeerHost {
    PeerHost {
        addr: "198.18.0.3".parse().unwrap(),
        stacks: vec![spec("c", 1000, &["10.3.0.0/24", "10.33.0.0/16"], "10.3.0.254")],
        source: "gossip".into(),
        node: Some("00000000000000c3".into()),
        claims: [(stack("c"), TS - 5_000)].into_iter().collect(),
    }
}

fn member(id: &str, state: &str, routed: bool) -> GossipMember {
    GossipMember {
        node_id: id.into(),
        addr: "198.18.0.3:7946".into(),
        underlay: "198.18.0.3".parse().unwrap(),
        state: state.into(),
        stacks: vec![stack("c")],
        version: 7,
        datapath_reachable: !routed,
        routed,
    }
}

#[test]
fn discovery_json_is_unchanged() {
    let dir = TempDir::new("golden-discovery");
    let state = StateDir::open(dir.path()).unwrap();
    let a = spec("a", 1000, &["10.1.0.0/24"], "10.1.0.254");
    let file = DiscoveryFile {
        schema: SCHEMA_VERSION,
        generation: 42,
        updated_ms: TS,
        host: HostInfo {
            underlay_interface: "eth0".into(),
            local_addr: "198.18.0.1".parse().unwrap(),
            advertise_addr: "203.0.113.1".parse().unwrap(),
            vxlan_port: 4789,
            underlay_mtu: 1500,
            pid: 4242,
        },
        peers: vec![peer_static(), peer_gossip()],
        local_stacks: vec![LocalStack {
            router_mac: a.router_mac(),
            spec: a,
            bridge: Some("br-a".into()),
            connected: true,
            acked_generation: 9,
        }],
        refused: vec![
            Refusal {
                stack: stack("d"),
                prefix: Some("10.1.0.0/16".parse().unwrap()),
                reason: "prefix 10.1.0.0/16 of stack d overlaps a prefix of stack a, which keeps it; give each stack its own subnet".into(),
                code: "overlap".into(),
            },
            Refusal {
                stack: stack("e"),
                prefix: None,
                reason: "stack e is announced by more than one host; only the first (198.18.0.2) is used".into(),
                code: "duplicate_stack".into(),
            },
        ],
        devices: vec![Vni::new(1000).unwrap()],
        drift_repairs: 3,
        gossip: Some(GossipStatus {
            node_id: "00000000000000a1".into(),
            addr: "198.18.0.1:7946".into(),
            keys: vec!["k1".into()],
            insecure: false,
            members: ["alive", "suspect", "down", "left", "unknown"]
                .iter()
                .enumerate()
                .map(|(i, s)| member(&format!("00000000000000c{i}"), s, i < 2))
                .collect(),
            counters: [("packets_in".to_string(), 12u64), ("packets_out".to_string(), 13)]
                .into_iter()
                .collect(),
        }),
    };
    state.write_discovery(&file).unwrap();
    check("discovery.json", &state.discovery_path());
    assert_eq!(state.read_discovery().unwrap(), file);
}

#[test]
fn routes_json_is_unchanged() {
    let dir = TempDir::new("golden-routes");
    let state = StateDir::open(dir.path()).unwrap();
    let b = spec("b", 1000, &["10.2.0.0/24"], "10.2.0.254");
    let c = spec("c", 1000, &["10.3.0.0/24"], "10.3.0.254");
    let file = RoutesFile {
        schema: SCHEMA_VERSION,
        generation: 17,
        stacks: [
            (
                stack("a"),
                StackRoutes {
                    vni: Some(Vni::new(1000).unwrap()),
                    routes: vec![
                        RemoteRoute {
                            prefix: b.prefixes[0],
                            stack: b.name.clone(),
                            via: b.router_ip,
                            mac: b.router_mac(),
                            host: "198.18.0.2".parse().unwrap(),
                            same_host: false,
                        },
                        RemoteRoute {
                            prefix: c.prefixes[0],
                            stack: c.name.clone(),
                            via: c.router_ip,
                            mac: c.router_mac(),
                            host: "198.18.0.1".parse().unwrap(),
                            same_host: true,
                        },
                    ],
                },
            ),
            (stack("z"), StackRoutes::default()),
        ]
        .into_iter()
        .collect(),
    };
    state.write_routes(&file).unwrap();
    check("routes.json", &state.routes_path());
    assert_eq!(state.read_routes().unwrap(), file);
}

/// Every kind either binary writes, with the reasons that go with it.
const EVENTS: &[(&str, &str, &str)] = &[
    ("discovery", "started", "started"),
    ("discovery", "standby", "standby"),
    ("discovery", "host_check", "host_check"),
    ("discovery", "config_loaded", "config_loaded"),
    ("discovery", "config_invalid", "config_invalid"),
    ("discovery", "member_joined", "member_joined"),
    ("discovery", "member_failed", "member_failed"),
    ("discovery", "member_left", "member_left"),
    ("discovery", "member_migrated", "member_migrated"),
    ("discovery", "rejoined", "rejoined"),
    ("discovery", "gossip_rejected", "gossip_rejected"),
    ("discovery", "left_mesh", "left_mesh"),
    ("discovery", "peer_withdrawn", "peer_withdrawn"),
    ("discovery", "peer_routed", "peer_routed"),
    ("discovery", "registration_refused", "registration_refused"),
    ("discovery", "router_registered", "router_registered"),
    ("discovery", "router_attached", "router_attached"),
    ("discovery", "stack_left", "stack_left"),
    ("discovery", "router_disconnected", "router_disconnected"),
    ("discovery", "stack_withdrawn", "stack_withdrawn"),
    ("discovery", "device_created", "device_created"),
    ("discovery", "device_replaced", "device_replaced"),
    ("discovery", "device_deleted", "device_deleted"),
    ("discovery", "underlay_changed", "underlay_changed"),
    ("discovery", "conflict_refused", "overlap"),
    ("discovery", "conflict_refused", "prefix_cap"),
    ("discovery", "route_added", "announced"),
    ("discovery", "route_withdrawn", "fdb_row_missing"),
    ("discovery", "route_withdrawn", "stack_gone"),
    ("discovery", "route_withdrawn", "local_stack_gone"),
    ("discovery", "route_withdrawn", "conflict_refused"),
    ("discovery", "error", "kernel_change_failed"),
    ("discovery", "error", "device_failed"),
    ("discovery", "error", "reconcile_failed"),
    ("discovery", "error", "http_bind_failed"),
    ("discovery", "state_unwritable", "state_write_failed"),
    ("discovery", "state_writable", "state_writable"),
    ("discovery", "drift_repaired", "drift_repaired"),
    ("router/a", "stack_mac_unchanged", "stack_mac_unchanged"),
    ("router/a", "attach_failed", "attach_failed"),
    ("router/a", "registration_refused", "registration_refused"),
    ("router/a", "nexthops_unsupported", "nexthops_unsupported"),
    ("router/a", "apply_failed", "apply_failed"),
    ("router/a", "mtu_check_ok", "mtu_check_ok"),
    ("router/a", "mtu_check_failed", "mtu_check_failed"),
    ("router/a", "same_host_ok", "same_host_ok"),
    ("router/a", "same_host_blocked", "same_host_blocked"),
    ("router/a", "route_skipped", "route_skipped"),
    ("router/a", "state_unreadable", "state_unreadable"),
];

fn event(source: &str, kind: &str, reason: &str, i: usize) -> Event {
    let mut e = Event::new(source, kind, format!("message {i}")).because(reason);
    if i % 2 == 0 {
        e = e.for_stack(&stack("a"));
    }
    e.ts_ms = TS + i as u64;
    e
}

#[test]
fn events_log_is_unchanged() {
    let dir = TempDir::new("golden-events");
    let state = StateDir::open(dir.path()).unwrap();
    let events: Vec<Event> = EVENTS
        .iter()
        .enumerate()
        .map(|(i, (source, kind, reason))| event(source, kind, reason, i))
        .collect();
    for e in &events {
        state.append_event(e).unwrap();
    }
    check("events.log", &state.events_path());
    assert_eq!(state.read_events().unwrap(), events);
}
