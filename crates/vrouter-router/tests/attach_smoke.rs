//! Root smoke test of the router binary against a fake discovery, in throwaway
//! network namespaces: attach through the namespace descriptor, routes and neighbours
//! from routes.json, drift repair, a corrupt file keeping the routes, discovery
//! restarts, the overlay link disappearing, health, SIGTERM leaving routes in place.
//!
//! Skipped (passes trivially) when not root or without iproute2. The router runs
//! under `setpriv` with NET_ADMIN only, as in its container.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use vrouter_kernel::Kernel;
use vrouter_state::attach::{AttachListener, DiscoveryMessage, RouterMessage};
use vrouter_state::{
    Mac, RemoteRoute, RoutesFile, StackName, StackRoutes, StateDir, Vni, SCHEMA_VERSION,
};

const BIN: &str = env!("CARGO_BIN_EXE_vrouter-router");

fn can_run() -> bool {
    (unsafe { libc::geteuid() }) == 0
        && Command::new("ip").arg("-V").output().is_ok()
        && Command::new("setpriv").arg("--version").output().is_ok()
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes the namespaces (and so every link in them) however the test ends.
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Removes the state directory however the test ends; declared before the routers so
/// it is dropped after them (nothing writes into it any more).
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_dir_all(self.0.with_extension("private"));
    }
}

/// The routers' events, as they travel in their probes files (the only file a router
/// writes; discovery copies them into events.log).
fn router_events(state: &StateDir) -> Vec<vrouter_state::Event> {
    state
        .read_all_probes()
        .into_iter()
        .filter_map(|f| f.events)
        .flat_map(|e| e.recent)
        .collect()
}

/// The state directory as discovery opens it (its lock in a private directory beside),
/// for tests that stand in for discovery.
fn discovery_state(path: &std::path::Path) -> StateDir {
    StateDir::open_discovery(path, &path.with_extension("private")).unwrap()
}

struct Router(Child);

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

enum Control {
    DropConnection,
}

/// A fake discovery in the "host" namespace: answers Register with a fresh macvlan on
/// a VXLAN device (moved through the descriptor) or Registered, and logs every
/// message. Serves any number of routers; `DropConnection` closes all connections.
fn fake_discovery(
    host_ns: String,
    socket: PathBuf,
    log: Arc<Mutex<Vec<RouterMessage>>>,
    control: mpsc::Receiver<Control>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/run/netns/{host_ns}")).unwrap();
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let kernel = Kernel::connect().await.unwrap();
            let lower = kernel.link_by_name("vx0").await.unwrap().unwrap().index;
            let listener = AttachListener::bind(&socket).unwrap();
            let (drop_tx, _) = tokio::sync::watch::channel(0u32);
            let made = Arc::new(std::sync::atomic::AtomicU32::new(0));
            loop {
                if let Ok(Control::DropConnection) = control.try_recv() {
                    drop_tx.send_modify(|g| *g += 1);
                }
                let accepted = tokio::select! {
                    a = listener.accept() => a.unwrap(),
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                };
                let (kernel, log, made) = (kernel.clone(), log.clone(), made.clone());
                let mut dropped = drop_tx.subscribe();
                tokio::spawn(async move {
                    loop {
                        let msg = tokio::select! {
                            m = accepted.recv::<RouterMessage>() => m.unwrap(),
                            _ = dropped.changed() => return,
                        };
                        let Some((msg, fd)) = msg else { return };
                        log.lock().unwrap().push(msg.clone());
                        if let RouterMessage::Register(reg) = msg {
                            if reg.needs_link {
                                let fd: OwnedFd = fd.expect("descriptor with needs_link");
                                let n = made.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                                let name = format!("mv{n}");
                                let mac = reg.spec.router_mac();
                                let idx = kernel
                                    .create_macvlan(&name, lower, mac, 1450)
                                    .await
                                    .unwrap();
                                kernel.move_to_netns(idx, fd.as_fd()).await.unwrap();
                                drop(fd);
                                accepted
                                    .send(
                                        &DiscoveryMessage::Attached {
                                            ifname: name,
                                            mac,
                                            mtu: 1450,
                                        },
                                        None,
                                    )
                                    .await
                                    .unwrap();
                            } else {
                                accepted
                                    .send(&DiscoveryMessage::Registered, None)
                                    .await
                                    .unwrap();
                            }
                        }
                    }
                });
            }
        });
    })
}

fn routes_file(generation: u64, via: &str) -> RoutesFile {
    let via: std::net::Ipv4Addr = via.parse().unwrap();
    let vni = Vni::new(1000).unwrap();
    let mut stacks = BTreeMap::new();
    stacks.insert(
        StackName::new("a").unwrap(),
        StackRoutes {
            vni: Some(vni),
            routes: vec![RemoteRoute {
                prefix: "10.2.0.0/24".parse().unwrap(),
                stack: StackName::new("b").unwrap(),
                via,
                mac: Mac::for_router(vni, via),
                host: "198.18.0.2".parse().unwrap(),
                same_host: false,
            }],
        },
    );
    RoutesFile {
        schema: SCHEMA_VERSION,
        generation,
        stacks,
    }
}

fn in_ns(ns: &str, args: &[&str]) -> String {
    let mut full = vec!["ip", "-n", ns];
    full.extend_from_slice(args);
    let out = Command::new(full[0]).args(&full[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The router's routes (`ip route show proto 118`), each line without its `nhid N`:
/// the routes go through nexthop objects, whose gateway and link `ip` prints too.
fn our_routes(ns: &str) -> String {
    in_ns(ns, &["route", "show", "proto", "118"])
        .lines()
        .map(|line| {
            let mut words = line.split_whitespace();
            let mut kept = Vec::new();
            while let Some(w) = words.next() {
                if w == "nhid" {
                    words.next();
                } else {
                    kept.push(w);
                }
            }
            kept.join(" ") + "\n"
        })
        .collect()
}

fn acks(log: &Mutex<Vec<RouterMessage>>) -> Vec<u64> {
    log.lock()
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            RouterMessage::Ack { generation } => Some(*generation),
            _ => None,
        })
        .collect()
}

fn registrations(log: &Mutex<Vec<RouterMessage>>) -> Vec<bool> {
    log.lock()
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            RouterMessage::Register(r) => Some(r.needs_link),
            _ => None,
        })
        .collect()
}

fn router_cmd(ns: &str, state: &Path, sub: Option<&str>) -> Command {
    router_cmd_for("a", ns, state, sub)
}

fn router_cmd_for(stack: &str, ns: &str, state: &Path, sub: Option<&str>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "setpriv"])
        .args([
            "--bounding-set=-all,+net_admin",
            "--inh-caps=-all,+net_admin",
            "--ambient-caps=-all,+net_admin",
            BIN,
        ])
        .args(sub)
        .env("VROUTER_STACK", stack)
        .env("VROUTER_STATE_DIR", state)
        .env("VROUTER_RECONCILE_INTERVAL_MS", "200")
        .env("RUST_LOG", "info");
    c
}

#[test]
fn router_attaches_reconciles_and_survives_discovery() {
    if !can_run() {
        eprintln!("skipped: needs root, iproute2 and setpriv");
        return;
    }
    let tag = std::process::id();
    let (h, r) = (format!("vrr{tag}h"), format!("vrr{tag}r"));
    let _ns = Netns(vec![h.clone(), r.clone()]);
    sh(&["ip", "netns", "add", &h]);
    sh(&["ip", "netns", "add", &r]);
    sh(&[
        "ip", "-n", &h, "link", "add", "br-a", "type", "veth", "peer", "name", "eth0", "netns", &r,
    ]);
    sh(&["ip", "-n", &h, "addr", "add", "10.1.0.1/24", "dev", "br-a"]);
    sh(&["ip", "-n", &h, "link", "set", "br-a", "up"]);
    sh(&[
        "ip",
        "-n",
        &h,
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        "1000",
        "dstport",
        "4789",
        "nolearning",
    ]);
    sh(&["ip", "-n", &h, "link", "set", "vx0", "up"]);
    sh(&["ip", "-n", &r, "link", "set", "lo", "up"]);
    sh(&[
        "ip",
        "-n",
        &r,
        "addr",
        "add",
        "10.1.0.254/24",
        "dev",
        "eth0",
    ]);
    sh(&["ip", "-n", &r, "link", "set", "eth0", "up"]);
    sh(&["ip", "-n", &r, "route", "add", "default", "via", "10.1.0.1"]);
    // As the router's compose service sets them (sysctls:).
    sh(&[
        "ip",
        "netns",
        "exec",
        &r,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.rp_filter=0",
    ]);
    // What a router of an earlier release (stop 10) left in its namespace: the probe
    // rule and table. The router removes them.
    sh(&[
        "ip", "-n", &r, "rule", "add", "fwmark", "0x7672", "lookup", "30322", "pref", "100",
        "proto", "118",
    ]);
    sh(&[
        "ip", "-n", &r, "route", "add", "default", "via", "10.1.0.1", "dev", "eth0", "table",
        "30322", "proto", "118",
    ]);

    let dir = TempDir::new("vrr-state");
    let state_path = dir.0.clone();
    let state = discovery_state(&state_path);
    state.write_routes(&routes_file(1, "10.2.0.254")).unwrap();

    let log = Arc::new(Mutex::new(Vec::new()));
    let (ctl_tx, ctl_rx) = mpsc::channel();
    let _discovery = fake_discovery(h.clone(), state.socket_path(), log.clone(), ctl_rx);

    let mut router = Router(
        router_cmd(&r, &state_path, None)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );

    // Attach: registered with the descriptor, link adopted, routes in, generation acked.
    wait_for("ack of generation 1", Duration::from_secs(10), || {
        acks(&log).contains(&1)
    });
    assert_eq!(registrations(&log), vec![true]);
    let link = in_ns(&r, &["-d", "link", "show", "ovl1000"]);
    assert!(
        link.contains("02:e8:0a:01:00:fe") && link.contains("mtu 1450") && link.contains("macvlan"),
        "{link}"
    );
    let routes = in_ns(&r, &["route", "show", "proto", "118"]);
    assert!(
        routes.contains("10.2.0.0/24 nhid 167903486 via 10.2.0.254 dev ovl1000 onlink"),
        "{routes}"
    );
    let nexthops = in_ns(&r, &["nexthop", "show", "proto", "118"]);
    assert!(
        nexthops.contains("id 167903486 via 10.2.0.254 dev ovl1000") && nexthops.contains("onlink"),
        "{nexthops}"
    );
    let neigh = in_ns(&r, &["neigh", "show", "dev", "ovl1000"]);
    assert!(
        neigh.contains("10.2.0.254 lladdr 02:e8:0a:02:00:fe PERMANENT"),
        "{neigh}"
    );
    // No policy rule of ours (the old probe rule and table are gone): with none, the
    // kernel forwards with one lookup in the merged table.
    let rules = in_ns(&r, &["rule", "show"]);
    assert!(!rules.contains("proto 118"), "{rules}");
    let table = in_ns(&r, &["route", "show", "table", "30322"]);
    assert!(table.trim().is_empty(), "{table}");
    // The stack interface carries the stable MAC.
    let eth0 = in_ns(&r, &["link", "show", "eth0"]);
    assert!(eth0.contains("link/ether 02:42:0a:01:00:fe"), "{eth0}");

    // Health passes.
    let health = router_cmd(&r, &state_path, Some("health"))
        .output()
        .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );

    // Drift is repaired by the timer.
    sh(&["ip", "-n", &r, "route", "del", "10.2.0.0/24"]);
    wait_for("drift repair", Duration::from_secs(5), || {
        our_routes(&r).contains("10.2.0.0/24 via 10.2.0.254")
    });

    // A changed gateway is replaced; the old neighbour goes.
    state.write_routes(&routes_file(2, "10.2.0.253")).unwrap();
    wait_for("gateway change", Duration::from_secs(5), || {
        our_routes(&r).contains("10.2.0.0/24 via 10.2.0.253")
            && !in_ns(&r, &["neigh", "show", "dev", "ovl1000"]).contains("10.2.0.254")
            && !in_ns(&r, &["nexthop", "show"]).contains("10.2.0.254")
    });
    wait_for("ack of generation 2", Duration::from_secs(5), || {
        acks(&log).contains(&2)
    });

    // A corrupt file keeps the routes and is reported once.
    std::fs::write(state_path.join("routes.json"), b"{\"schema\": 1, \"gener").unwrap();
    // The event reaches the probes file with its next write (once a second).
    std::thread::sleep(Duration::from_millis(2500));
    assert!(our_routes(&r).contains("10.2.0.0/24 via 10.2.0.253"));
    let unreadable = router_events(&state)
        .iter()
        .filter(|e| e.kind == "state_unreadable")
        .count();
    assert_eq!(unreadable, 1);

    // Discovery restarts: the router reconnects without asking for a link.
    state.write_routes(&routes_file(3, "10.2.0.253")).unwrap();
    ctl_tx.send(Control::DropConnection).unwrap();
    wait_for("re-registration", Duration::from_secs(5), || {
        registrations(&log).len() == 2
    });
    assert_eq!(registrations(&log), vec![true, false]);
    wait_for("ack of generation 3", Duration::from_secs(5), || {
        acks(&log).contains(&3)
    });

    // The overlay link disappears: the router asks for a new one and reinstalls.
    sh(&["ip", "-n", &r, "link", "del", "ovl1000"]);
    wait_for("re-attach", Duration::from_secs(5), || {
        registrations(&log) == vec![true, false, true]
            && our_routes(&r).contains("10.2.0.0/24 via 10.2.0.253 dev ovl1000 onlink")
    });

    // SIGTERM: exit 0, routes stay, no Leave.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(router.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = router.0.wait().unwrap();
    // `ip netns exec` passes the signal's outcome through as the child's exit code.
    assert!(status.success(), "{status:?}");
    assert!(our_routes(&r).contains("10.2.0.0/24"));
    assert!(!log
        .lock()
        .unwrap()
        .iter()
        .any(|m| matches!(m, RouterMessage::Leave { .. })));
}

fn remote(prefix: &str, stack: &str, via: &str) -> RemoteRoute {
    let via: std::net::Ipv4Addr = via.parse().unwrap();
    RemoteRoute {
        prefix: prefix.parse().unwrap(),
        stack: StackName::new(stack).unwrap(),
        via,
        mac: Mac::for_router(Vni::new(1000).unwrap(), via),
        host: "198.18.0.1".parse().unwrap(),
        same_host: true,
    }
}

/// Two stacks on one host: the TTL-1 probe from A to C's router goes out through the
/// host, whose forwarding expires it and answers Time Exceeded. A host that drops it
/// in the raw table before routing (as Docker 28.2+ does for protected networks: the
/// same nftables rule here) is reported, and so is the recovery once the drop goes.
/// No accept_local or other extra sysctl in the routers.
#[test]
fn same_host_probe_reports_block_and_recovery() {
    if !can_run() || Command::new("nft").arg("--version").output().is_err() {
        eprintln!("skipped: needs root, iproute2, setpriv and nft");
        return;
    }
    let tag = std::process::id();
    let (h, a, c) = (
        format!("vrp{tag}h"),
        format!("vrp{tag}a"),
        format!("vrp{tag}c"),
    );
    let _ns = Netns(vec![h.clone(), a.clone(), c.clone()]);
    for n in [&h, &a, &c] {
        sh(&["ip", "netns", "add", n]);
        sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
    }
    sh(&[
        "ip",
        "netns",
        "exec",
        &h,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    sh(&[
        "ip",
        "-n",
        &h,
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        "1000",
        "dstport",
        "4789",
        "nolearning",
    ]);
    sh(&["ip", "-n", &h, "link", "set", "vx0", "up"]);
    for (ns, br, net) in [(&a, "br-a", "10.1.0"), (&c, "br-c", "10.3.0")] {
        sh(&[
            "ip", "-n", &h, "link", "add", br, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ]);
        sh(&[
            "ip",
            "-n",
            &h,
            "addr",
            "add",
            &format!("{net}.1/24"),
            "dev",
            br,
        ]);
        sh(&["ip", "-n", &h, "link", "set", br, "up"]);
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{net}.254/24"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        sh(&[
            "ip",
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &format!("{net}.1"),
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=2",
        ]);
    }
    // Host steering, as discovery installs it.
    for (br, table, dst, via) in [
        ("br-a", "101", "10.3.0.0/24", "10.1.0.254"),
        ("br-c", "103", "10.1.0.0/24", "10.3.0.254"),
    ] {
        sh(&[
            "ip", "-n", &h, "rule", "add", "iif", br, "lookup", table, "pref", "1000",
        ]);
        sh(&[
            "ip", "-n", &h, "route", "add", dst, "via", via, "dev", br, "table", table,
        ]);
    }
    // C's network is protected as by Docker 28.2+: a raw-table drop of packets to C's
    // containers that enter from anywhere but C's bridge. A's network is not.
    sh(&[
        "ip",
        "netns",
        "exec",
        &h,
        "nft",
        "add table ip vrt_raw; add chain ip vrt_raw PREROUTING { type filter hook prerouting priority raw; policy accept; }; add rule ip vrt_raw PREROUTING iifname != \"br-c\" ip daddr 10.3.0.254 drop",
    ]);

    let dir = TempDir::new("vrp-state");
    let state_path = dir.0.clone();
    let state = discovery_state(&state_path);
    let mut stacks = BTreeMap::new();
    let vni = Some(Vni::new(1000).unwrap());
    stacks.insert(
        StackName::new("a").unwrap(),
        StackRoutes {
            vni,
            routes: vec![remote("10.3.0.0/24", "c", "10.3.0.254")],
        },
    );
    stacks.insert(
        StackName::new("c").unwrap(),
        StackRoutes {
            vni,
            routes: vec![remote("10.1.0.0/24", "a", "10.1.0.254")],
        },
    );
    state
        .write_routes(&RoutesFile {
            schema: SCHEMA_VERSION,
            generation: 1,
            stacks,
        })
        .unwrap();

    let log = Arc::new(Mutex::new(Vec::new()));
    let (_ctl_tx, ctl_rx) = mpsc::channel();
    let _discovery = fake_discovery(h.clone(), state.socket_path(), log.clone(), ctl_rx);
    let _ra = Router(
        router_cmd_for("a", &a, &state_path, None)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let _rc = Router(
        router_cmd_for("c", &c, &state_path, None)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );

    let events = |kind: &str, stack: &str| {
        router_events(&state)
            .into_iter()
            .filter(|e| e.kind == kind && e.stack.as_ref().map(|s| s.as_str()) == Some(stack))
            .collect::<Vec<_>>()
    };
    wait_for("A reports the block", Duration::from_secs(15), || {
        !events("same_host_blocked", "a").is_empty()
    });
    let blocked = &events("same_host_blocked", "a")[0];
    assert_eq!(blocked.source, "router/a");
    assert!(
        blocked.message.contains("same-host stack c")
            && blocked.message.contains("nat-unprotected"),
        "{}",
        blocked.message
    );
    // C's path through the host is open: no block reported.
    assert!(events("same_host_blocked", "c").is_empty());

    // Unblock: as with gateway_mode_ipv4=nat-unprotected, no raw drop.
    sh(&["ip", "netns", "exec", &h, "nft", "delete table ip vrt_raw"]);
    wait_for("A reports recovery", Duration::from_secs(20), || {
        !events("same_host_ok", "a").is_empty()
    });
    assert_eq!(events("same_host_blocked", "a").len(), 1, "reported once");
    assert!(events("same_host_blocked", "c").is_empty());
}

/// A router in a fresh namespace (as after a container restart: a new veth with a new
/// random MAC) sets its stack interface's MAC to 02:42:<IPv4>, with the link up, and
/// the host's neighbour entry for the router, still holding the previous MAC, is
/// corrected at once by the router's ARP for its gateway.
#[test]
fn stack_interface_gets_stable_mac_and_host_learns_it() {
    if !can_run() {
        eprintln!("skipped: needs root, iproute2 and setpriv");
        return;
    }
    let tag = std::process::id();
    let (h, r) = (format!("vrm{tag}h"), format!("vrm{tag}r"));
    let _ns = Netns(vec![h.clone(), r.clone()]);
    sh(&["ip", "netns", "add", &h]);
    sh(&["ip", "netns", "add", &r]);
    sh(&[
        "ip", "-n", &h, "link", "add", "br-a", "type", "veth", "peer", "name", "eth0", "netns", &r,
    ]);
    sh(&["ip", "-n", &h, "addr", "add", "10.1.0.1/24", "dev", "br-a"]);
    sh(&["ip", "-n", &h, "link", "set", "br-a", "up"]);
    sh(&["ip", "-n", &r, "link", "set", "lo", "up"]);
    sh(&[
        "ip",
        "-n",
        &r,
        "addr",
        "add",
        "10.1.0.254/24",
        "dev",
        "eth0",
    ]);
    sh(&["ip", "-n", &r, "link", "set", "eth0", "up"]);
    sh(&["ip", "-n", &r, "route", "add", "default", "via", "10.1.0.1"]);
    let old = "02:11:22:33:44:55";
    sh(&["ip", "-n", &r, "link", "set", "eth0", "address", old]);
    // The host knows the router under the old MAC (as after the previous container).
    sh(&[
        "ip",
        "-n",
        &h,
        "neigh",
        "replace",
        "10.1.0.254",
        "lladdr",
        old,
        "dev",
        "br-a",
        "nud",
        "reachable",
    ]);

    let dir = TempDir::new("vrm-state");
    let state = discovery_state(&dir.0);
    let started = Instant::now();
    let _router = Router(
        router_cmd(&r, &dir.0, None)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let stable = "02:42:0a:01:00:fe";
    wait_for(
        "the host to learn the stable MAC",
        Duration::from_secs(3),
        || in_ns(&h, &["neigh", "show", "10.1.0.254", "dev", "br-a"]).contains(stable),
    );
    eprintln!(
        "host neighbour corrected {:?} after the router started",
        started.elapsed()
    );
    let eth0 = in_ns(&r, &["link", "show", "eth0"]);
    assert!(eth0.contains(&format!("link/ether {stable}")), "{eth0}");
    assert!(eth0.contains("state UP") || eth0.contains(",UP"), "{eth0}");
    // Nothing was flushed: the default route stays.
    let routes = in_ns(&r, &["route", "show", "default"]);
    assert!(routes.contains("default via 10.1.0.1 dev eth0"), "{routes}");
    assert!(
        !router_events(&state)
            .iter()
            .any(|e| e.kind == "stack_mac_unchanged"),
        "no event when the MAC was set"
    );
}
