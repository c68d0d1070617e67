//! The attach socket is untrusted input: every router reaches it, so a connection acts
//! only for its own stack, from the namespace that holds the stack's router address;
//! admin commands are not accepted on it; a flood from one router does not stop the
//! others. Real daemons with only CAP_NET_ADMIN, in simulated hosts.

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use vrouter_state::attach::{DiscoveryMessage, Registration, RouterMessage};
use vrouter_state::{StackName, StackSpec, Vni};
use vrouter_tests::attach::{conversation, flood};
use vrouter_tests::mesh::{Mesh, StackDef};
use vrouter_tests::*;

const CONVERGE: Duration = Duration::from_secs(20);

fn register(mesh: &Mesh, stack: &str, needs_link: bool) -> Value {
    let s = mesh.stack(stack);
    serde_json::to_value(RouterMessage::Register(Registration {
        spec: StackSpec {
            name: StackName::new(s.name).unwrap(),
            vni: Vni::new(s.vni).unwrap(),
            prefixes: vec![s.cidr.parse().unwrap()],
            router_ip: s.router_ip().parse().unwrap(),
        },
        needs_link,
        conntrack: true,
    }))
    .unwrap()
}

fn refused(reply: &Option<DiscoveryMessage>) -> String {
    match reply {
        Some(DiscoveryMessage::Refused { reason }) => reason.clone(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn count(mesh: &Mesh, host: usize, kind: &str, stack: &str) -> usize {
    mesh.events(host)
        .iter()
        .filter(|e| e.kind == kind && e.stack.as_ref().map(|s| s.as_str()) == Some(stack))
        .count()
}

fn routed_on(mesh: &Mesh, host: usize, stack: &str) -> bool {
    mesh.routes(host)
        .map(|r| r.stacks.contains_key(&StackName::new(stack).unwrap()))
        .unwrap_or(false)
}

#[test]
fn a_connection_acts_only_for_its_own_stack() {
    require_root!();
    let mut mesh = Mesh::start(
        "attown",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 1, 1000, "10.2.0.0/24"),
            StackDef::new("c", 2, 1000, "10.3.0.0/24"),
        ],
    )
    .unwrap();
    mesh.wait_converged(CONVERGE).unwrap();
    let sock = mesh.state_dir(1).join(vrouter_state::ATTACH_SOCKET);
    let b_ns = mesh.rtr("b").ns.clone();
    let attached_a = count(&mesh, 1, "router_attached", "a");

    // Router B registers stack A's name with A's exact spec, handing over its own
    // namespace: A's overlay link would land in B's namespace, and A's traffic with it.
    let replies = conversation(
        &b_ns,
        &sock,
        &[
            (register(&mesh, "a", true), true),
            (register(&mesh, "a", false), false),
        ],
    )
    .unwrap();
    for r in &replies {
        let reason = refused(r);
        assert!(reason.contains("10.1.0.254"), "{reason}");
    }
    assert_eq!(count(&mesh, 1, "router_attached", "a"), attached_a);
    assert!(count(&mesh, 1, "registration_refused", "a") >= 2);
    let b_links = exec_ok(Some(&b_ns), &["ip", "-o", "link"]).unwrap().stdout;
    assert_eq!(
        b_links.matches("vrm").count(),
        0,
        "no link of A in B: {b_links}"
    );

    // Nor may B withdraw A.
    let leave_a = serde_json::to_value(RouterMessage::Leave {
        stack: StackName::new("a").unwrap(),
    })
    .unwrap();
    let reason = refused(&conversation(&b_ns, &sock, &[(leave_a.clone(), false)]).unwrap()[0]);
    assert!(reason.contains("leave of stack a refused"), "{reason}");
    assert!(routed_on(&mesh, 1, "a"));

    // Admin commands are not taken on the shared socket; a hidden name is refused.
    let reason =
        refused(&conversation(&b_ns, &sock, &[(json!({"type": "leave_mesh"}), false)]).unwrap()[0]);
    assert!(reason.contains("vrouter-discovery leave-mesh"), "{reason}");
    let mut hidden = register(&mesh, "b", false);
    hidden["name"] = json!(".b");
    let reason = refused(&conversation(&b_ns, &sock, &[(hidden, false)]).unwrap()[0]);
    assert!(reason.contains("not starting with '.'"), "{reason}");

    // During A's restart grace its name is not up for grabs either.
    mesh.stop_router("a", libc::SIGTERM).unwrap();
    let reason =
        refused(&conversation(&b_ns, &sock, &[(register(&mesh, "a", true), true)]).unwrap()[0]);
    assert!(reason.contains("10.1.0.254"), "{reason}");
    assert_eq!(count(&mesh, 1, "router_attached", "a"), attached_a);
    // A's own router comes back (a fresh namespace with A's address) and is accepted.
    mesh.restart_router_fresh_ns("a").unwrap();
    mesh.wait_converged(CONVERGE).unwrap();
    assert_eq!(count(&mesh, 1, "router_attached", "a"), attached_a + 1);

    // `vrouter-router leave` (a fresh connection from the stack's own namespace) works.
    let left = conversation(&mesh.rtr("a").ns, &sock, &[(leave_a, false)]).unwrap();
    assert_eq!(left[0], Some(DiscoveryMessage::Left));
    assert!(wait_until(
        Duration::from_secs(3),
        Duration::from_millis(50),
        || !routed_on(&mesh, 1, "a")
    ));

    // Last, since it takes B's registration over: one connection registers one stack.
    let replies = conversation(
        &b_ns,
        &sock,
        &[
            (register(&mesh, "b", false), false),
            (register(&mesh, "c", false), false),
        ],
    )
    .unwrap();
    assert_eq!(replies[0], Some(DiscoveryMessage::Registered));
    let reason = refused(&replies[1]);
    assert!(reason.contains("already registered stack b"), "{reason}");
}

#[test]
fn a_flood_of_connections_from_one_router_leaves_discovery_serving() {
    require_root!();
    // Docker gives containers a soft limit of 1024 descriptors; so do we, to the
    // daemons started now (they inherit it), and restore ours for the flood.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    let low = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: limit.rlim_max,
    };
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) };
    let mesh = Mesh::start(
        "attflood",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("c", 2, 1000, "10.3.0.0/24"),
        ],
    );
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    let mut mesh = mesh.unwrap();
    mesh.wait_converged(CONVERGE).unwrap();
    let sock = mesh.state_dir(1).join(vrouter_state::ATTACH_SOCKET);

    let pid = mesh.discovery(1).pid();
    let open_fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let before = open_fds();
    let t = Instant::now();
    let held = flood(&mesh.rtr("a").ns, &sock, 1000, Duration::from_secs(10)).unwrap();
    eprintln!(
        "flood: {} connections opened in {:?}",
        held.len(),
        t.elapsed()
    );
    // Discovery holds at most the namespace's share of them.
    std::thread::sleep(Duration::from_millis(500));
    let during = open_fds();
    eprintln!("discovery's descriptors: {before} before the flood, {during} during it");
    assert!(
        during <= before + 8 + 4,
        "discovery holds {during} descriptors under the flood ({before} before)"
    );

    // Discovery still answers /healthz ...
    let host_ns = mesh.topo.host(1).ns.clone();
    let healthy = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        http_get(&host_ns, "127.0.0.1:9474", "/healthz").is_ok_and(|r| r.status == 200)
    });
    assert!(healthy, "/healthz not served during the flood");
    // ... and another router still registers, and everyone is routed to it.
    let t = Instant::now();
    mesh.add_stack(StackDef::new("b", 1, 1000, "10.2.0.0/24"))
        .unwrap();
    mesh.write_config(2).unwrap();
    mesh.wait_converged(CONVERGE).unwrap();
    eprintln!(
        "stack b converged {:?} after its router started, under the flood",
        t.elapsed()
    );
    let refusals: Vec<String> = mesh
        .events(1)
        .into_iter()
        .filter(|e| e.kind == "registration_refused" && e.reason == "attach_limit")
        .map(|e| e.message)
        .collect();
    assert_eq!(
        refusals.len(),
        1,
        "one event per flooding namespace: {refusals:?}"
    );
    assert!(refusals[0].contains("at most 8"), "{refusals:?}");
    drop(held);
}

/// The all-in-one variant's router lives in a namespace the container made and plugged
/// into the bridge with a veth: it passes the same check.
#[test]
fn all_in_one_router_passes_the_namespace_check() {
    require_root!();
    let mut topo = Topology::builder("attaio").hosts(1).build().unwrap();
    topo.host_mut(1)
        .add_network("a", "10.1.0.0/24", Protection::Protected)
        .unwrap();
    let state = std::path::PathBuf::from(format!("/run/{}-state-aio", prefix()));
    let private = std::path::PathBuf::from(format!("/run/{}-state-aio-private", prefix()));
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_dir_all(&private);
    std::fs::create_dir_all(&state).unwrap();
    struct Cleanup(Vec<std::path::PathBuf>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for d in &self.0 {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
    let _cleanup = Cleanup(vec![state.clone(), private.clone()]);
    let bin = vrouter_tests::mesh::bin_dir()
        .unwrap()
        .join("vrouter-discovery");
    let dir = state.display().to_string();
    // Privileged, as its compose file runs it.
    let mut d = topo
        .host(1)
        .spawn(
            bin.to_str().unwrap(),
            &["all-in-one"],
            &[
                ("VROUTER_ALLOW_EXTRA_CAPS", "1"),
                ("VROUTER_STACK", "a"),
                ("VROUTER_VNI", "1000"),
                ("VROUTER_ROUTER_IP", "10.1.0.254"),
                ("VROUTER_STATE_DIR", &dir),
                ("VROUTER_HTTP_ADDR", "off"),
                ("RUST_LOG", "info"),
            ],
        )
        .unwrap();
    let events = || {
        vrouter_state::StateDir::open(&state)
            .ok()
            .and_then(|s| s.read_events().ok())
            .unwrap_or_default()
    };
    let attached = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        events().iter().any(|e| e.kind == "router_attached")
    });
    if !attached {
        d.dump_logs();
    }
    assert!(attached, "all-in-one router not attached: {:?}", events());
    assert!(!events().iter().any(|e| e.kind == "registration_refused"));
    let _ = d.kill(libc::SIGTERM);
    let _ = d.wait_exit(Duration::from_secs(5));
}
