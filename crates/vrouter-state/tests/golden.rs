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
        source: PeerOrigin::Static,
        node: None,
        claims: BTreeMap::new(),
        generations: BTreeMap::new(),
        encryption: None,
    }
}

fn peer_gossip() -> PeerHost {
    PeerHost {
        addr: "198.18.0.3".parse().unwrap(),
        stacks: vec![spec(
            "c",
            1000,
            &["10.3.0.0/24", "10.33.0.0/16"],
            "10.3.0.254",
        )],
        source: PeerOrigin::Gossip,
        node: Some("00000000000000c3".into()),
        claims: [(stack("c"), TS - 5_000)].into_iter().collect(),
        generations: [(stack("c"), 2)].into_iter().collect(),
        encryption: None,
    }
}

fn member(id: &str, state: &MemberState, routed: bool) -> GossipMember {
    GossipMember {
        node_id: id.into(),
        addr: "198.18.0.3:7946".into(),
        underlay: "198.18.0.3".parse().unwrap(),
        state: state.clone(),
        stacks: vec![stack("c")],
        version: 7,
        datapath_reachable: !routed,
        routed,
    }
}

#[test]
fn discovery_json_is_unchanged() {
    let dir = TempDir::new("golden-discovery");
    let private = TempDir::new("golden-discovery-private");
    let state = StateDir::open_discovery(dir.path(), private.path()).unwrap();
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
            overlay_mtu: None,
            pid: 4242,
        },
        peers: vec![peer_static(), peer_gossip()],
        local_stacks: vec![LocalStack {
            router_mac: a.router_mac(),
            spec: a,
            bridge: Some("br-a".into()),
            connected: true,
            acked_generation: 9,
            generation: 3,
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
        steering: None,
        encryption: None,
        addresses: None,
        paths: None,
        relay: None,
        gossip: Some(GossipStatus {
            node_id: "00000000000000a1".into(),
            addr: "198.18.0.1:7946".into(),
            keys: vec!["k1".into()],
            insecure: false,
            members: MemberState::ALL
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
    let private = TempDir::new("golden-routes-private");
    let state = StateDir::open_discovery(dir.path(), private.path()).unwrap();
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
const EVENTS: &[(&str, EventKind, &str)] = &[
    ("discovery", EventKind::Started, "started"),
    ("discovery", EventKind::Standby, "standby"),
    ("discovery", EventKind::HostCheck, "host_check"),
    ("discovery", EventKind::ConfigLoaded, "config_loaded"),
    ("discovery", EventKind::ConfigInvalid, "config_invalid"),
    ("discovery", EventKind::MemberJoined, "member_joined"),
    ("discovery", EventKind::MemberFailed, "member_failed"),
    ("discovery", EventKind::MemberLeft, "member_left"),
    ("discovery", EventKind::MemberMigrated, "member_migrated"),
    ("discovery", EventKind::Rejoined, "rejoined"),
    ("discovery", EventKind::GossipRejected, "gossip_rejected"),
    ("discovery", EventKind::LeftMesh, "left_mesh"),
    ("discovery", EventKind::PeerWithdrawn, "peer_withdrawn"),
    ("discovery", EventKind::PeerRouted, "peer_routed"),
    (
        "discovery",
        EventKind::RegistrationRefused,
        "registration_refused",
    ),
    (
        "discovery",
        EventKind::RouterRegistered,
        "router_registered",
    ),
    ("discovery", EventKind::RouterAttached, "router_attached"),
    ("discovery", EventKind::StackLeft, "stack_left"),
    (
        "discovery",
        EventKind::RouterDisconnected,
        "router_disconnected",
    ),
    ("discovery", EventKind::StackWithdrawn, "stack_withdrawn"),
    ("discovery", EventKind::DeviceCreated, "device_created"),
    ("discovery", EventKind::DeviceReplaced, "device_replaced"),
    ("discovery", EventKind::DeviceDeleted, "device_deleted"),
    ("discovery", EventKind::UnderlayChanged, "underlay_changed"),
    ("discovery", EventKind::ConflictRefused, "overlap"),
    ("discovery", EventKind::ConflictRefused, "prefix_cap"),
    ("discovery", EventKind::RouteAdded, "announced"),
    ("discovery", EventKind::RouteWithdrawn, "fdb_row_missing"),
    ("discovery", EventKind::RouteWithdrawn, "stack_gone"),
    ("discovery", EventKind::RouteWithdrawn, "local_stack_gone"),
    ("discovery", EventKind::RouteWithdrawn, "conflict_refused"),
    ("discovery", EventKind::Error, "kernel_change_failed"),
    ("discovery", EventKind::Error, "device_failed"),
    ("discovery", EventKind::Error, "reconcile_failed"),
    ("discovery", EventKind::Error, "http_bind_failed"),
    (
        "discovery",
        EventKind::StateUnwritable,
        "state_write_failed",
    ),
    ("discovery", EventKind::StateWritable, "state_writable"),
    ("discovery", EventKind::DriftRepaired, "drift_repaired"),
    (
        "router/a",
        EventKind::StackMacUnchanged,
        "stack_mac_unchanged",
    ),
    ("router/a", EventKind::AttachFailed, "attach_failed"),
    (
        "router/a",
        EventKind::RegistrationRefused,
        "registration_refused",
    ),
    (
        "router/a",
        EventKind::NexthopsUnsupported,
        "nexthops_unsupported",
    ),
    ("router/a", EventKind::ApplyFailed, "apply_failed"),
    ("router/a", EventKind::MtuCheckOk, "mtu_check_ok"),
    ("router/a", EventKind::MtuCheckFailed, "mtu_check_failed"),
    ("router/a", EventKind::SameHostOk, "same_host_ok"),
    ("router/a", EventKind::SameHostBlocked, "same_host_blocked"),
    ("router/a", EventKind::RouteSkipped, "route_skipped"),
    ("router/a", EventKind::StateUnreadable, "state_unreadable"),
    // Added after the golden file was first written: appended, so earlier lines keep
    // their numbers.
    ("discovery", EventKind::DeviceAdopted, "device_adopted"),
    ("router/a", EventKind::AclInstalled, "acl_installed"),
    ("router/a", EventKind::AclRefused, "acl_refused"),
    ("router/a", EventKind::AclClosed, "acl_closed"),
    ("router/a", EventKind::AclDrops, "acl_drops"),
    ("discovery", EventKind::SteeringApplied, "steering_applied"),
    ("discovery", EventKind::SteeringFailed, "steering_failed"),
    (
        "discovery",
        EventKind::EncryptionStarted,
        "encryption_started",
    ),
    (
        "discovery",
        EventKind::EncryptionPeerRefused,
        "peer_requires_encryption",
    ),
    (
        "discovery",
        EventKind::EncryptionPeerPlain,
        "encryption_peer_plain",
    ),
    (
        "discovery",
        EventKind::WgHandshakeStale,
        "wg_handshake_stale",
    ),
    (
        "discovery",
        EventKind::KeyRotationStarted,
        "key_rotation_started",
    ),
    (
        "discovery",
        EventKind::KeyRotationCompleted,
        "key_rotation_completed",
    ),
    (
        "discovery",
        EventKind::TunnelAddressCollision,
        "tunnel_address_collision",
    ),
    ("discovery", EventKind::AddressObserved, "address_observed"),
    (
        "discovery",
        EventKind::PeerAddressChanged,
        "peer_address_changed",
    ),
    ("discovery", EventKind::PathRelayed, "path_relayed"),
    ("discovery", EventKind::PathDirect, "path_direct"),
    ("discovery", EventKind::PathUnreachable, "no_relay"),
    (
        "discovery",
        EventKind::NatPortTranslated,
        "nat_port_translated",
    ),
    ("discovery", EventKind::StackSuperseded, "stack_superseded"),
    ("discovery", EventKind::StackMoved, "stack_moved"),
];

fn event(source: &str, kind: &EventKind, reason: &str, i: usize) -> Event {
    let mut e = Event::new(source, kind.clone(), format!("message {i}")).because(reason);
    if i.is_multiple_of(2) {
        e = e.for_stack(&stack("a"));
    }
    e.ts_ms = TS + i as u64;
    e
}

#[test]
fn events_log_is_unchanged() {
    let dir = TempDir::new("golden-events");
    let private = TempDir::new("golden-events-private");
    let state = StateDir::open_discovery(dir.path(), private.path()).unwrap();
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

#[test]
fn every_event_kind_is_in_the_golden_log() {
    for k in EventKind::ALL {
        assert!(
            EVENTS.iter().any(|(_, e, _)| e == k),
            "{k} is missing from EVENTS: add it, and bless the golden file"
        );
    }
}
