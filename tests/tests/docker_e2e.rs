//! End-to-end tests with the real Docker engine and Compose: the images built from this
//! repository, the compose files of deploy/, stacks on this host and a stack on a
//! simulated host. Root only; they skip (or fail, with CI=true) when no engine is
//! reachable. They take the harness's global lock, label everything they create
//! (`com.docker-vrouter.test=<prefix>`) and remove it on drop, even on failure.
//!
//! Knobs: VROUTER_DOCKER_IMAGES_FRESH=1 reuses the `<prefix>-test` images if they exist;
//! VROUTER_DOCKER_KEEP_IMAGES=1 keeps them afterwards.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vrouter_state::{StackName, StateDir, SteeringMode};

use vrouter_tests::docker::*;
use vrouter_tests::encryption::UnderlayCapture;
use vrouter_tests::mesh::{Mesh, StackDef};
use vrouter_tests::{prefix, require_docker, tcp_send, TcpServer, TestLock};

const NET_ADMIN: u64 = 1 << 12;
const FIVE_S: Duration = Duration::from_secs(5);

fn underlay_mtu() -> u32 {
    let out = run_ok(&["ip", "-4", "route", "show", "default"])
        .unwrap()
        .stdout;
    let dev = out
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .unwrap_or("eth0")
        .to_string();
    std::fs::read_to_string(format!("/sys/class/net/{dev}/mtu"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1500)
}

fn ping(from: &Stack, ip: &str, count: u32, timeout_ms: u32) -> bool {
    from.exec(
        "web",
        &[
            "vrt-probe",
            "ping",
            ip,
            &count.to_string(),
            &timeout_ms.to_string(),
        ],
    )
    .map(|o| o.success())
    .unwrap_or(false)
}

/// Time until `from`'s service gets an echo reply from `ip`, within `timeout`.
fn wait_ping(from: &Stack, ip: &str, timeout: Duration) -> Option<Duration> {
    within(timeout, || ping(from, ip, 1, 500))
}

fn web_ip(s: &Stack) -> String {
    s.ip("web").unwrap()
}

/// A TCP transfer from `from`'s service to `to`'s service on `port`; the receiver must
/// see the sender's own address (no NAT).
fn tcp_check(from: &Stack, to: &Stack, port: u16) {
    let to_ip = web_ip(to);
    let from_ip = web_ip(from);
    let out = format!("/tmp/srv-{port}");
    to.exec_detached(
        "web",
        &[
            "vrt-probe",
            "tcp-serve",
            &format!("0.0.0.0:{port}"),
            &out,
            "20",
        ],
    )
    .unwrap();
    let ready = within(FIVE_S, || {
        to.exec("web", &["cat", &format!("{out}.ready")])
            .map(|o| o.success())
            .unwrap_or(false)
    });
    assert!(
        ready.is_some(),
        "tcp-serve did not start in {}",
        to.spec.project()
    );
    let sent = from
        .exec(
            "web",
            &[
                "vrt-probe",
                "tcp-send",
                &format!("{to_ip}:{port}"),
                "200000",
                "5",
            ],
        )
        .unwrap();
    assert!(
        sent.success(),
        "TCP {} -> {} failed: {}{}",
        from.spec.project(),
        to.spec.project(),
        sent.stdout,
        sent.stderr
    );
    let seen = to.exec("web", &["cat", &out]).unwrap().stdout;
    assert!(
        seen.contains(&format!("peer={from_ip}:")),
        "{} saw {seen:?}, expected the sender's own address {from_ip}",
        to.spec.project()
    );
}

/// `to`'s access policy keeps `from` out on `port`: a server listens there, and a TCP
/// connection from `from`'s service neither completes nor reaches it.
fn tcp_refused_by_policy(from: &Stack, to: &Stack, port: u16) {
    let to_ip = web_ip(to);
    let out = format!("/tmp/srv-{port}");
    to.exec_detached(
        "web",
        &[
            "vrt-probe",
            "tcp-serve",
            &format!("0.0.0.0:{port}"),
            &out,
            "10",
        ],
    )
    .unwrap();
    let ready = within(FIVE_S, || {
        to.exec("web", &["cat", &format!("{out}.ready")])
            .map(|o| o.success())
            .unwrap_or(false)
    });
    assert!(
        ready.is_some(),
        "tcp-serve did not start in {}",
        to.spec.project()
    );
    let sent = from
        .exec(
            "web",
            &[
                "vrt-probe",
                "tcp-send",
                &format!("{to_ip}:{port}"),
                "1000",
                "3",
            ],
        )
        .unwrap();
    assert!(
        !sent.success(),
        "TCP {} -> {}:{port} passed; {}'s policy denies it: {}",
        from.spec.project(),
        to.spec.project(),
        to.spec.project(),
        sent.stdout
    );
    let seen = to
        .exec("web", &["cat", &out])
        .map(|o| o.stdout)
        .unwrap_or_default();
    assert!(
        !seen.contains("peer="),
        "{}'s server saw a connection on {port}: {seen:?}",
        to.spec.project()
    );
}

/// Nothing passes from `from`'s service to `to`'s: neither ping nor TCP.
fn assert_unreachable(from: &Stack, to_ip: &str) {
    assert!(
        !ping(from, to_ip, 2, 1000),
        "{} reached {to_ip} by ping across VNIs",
        from.spec.project()
    );
    let t = from
        .exec(
            "web",
            &[
                "vrt-probe",
                "tcp-send",
                &format!("{to_ip}:5999"),
                "100",
                "2",
            ],
        )
        .unwrap();
    assert!(
        !t.success(),
        "{} reached {to_ip} by TCP across VNIs",
        from.spec.project()
    );
}

/// `GET /metrics` of the host's discovery (host network, 127.0.0.1:9474 by default).
fn discovery_metrics() -> String {
    let get = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(
            &"127.0.0.1:9474".parse().unwrap(),
            Duration::from_secs(3),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    get().unwrap_or_default()
}

/// Sum of the series `name{local_stack="<stack>",...}` in a metrics text.
fn metric_sum(text: &str, name: &str, stack: &str) -> u64 {
    let head = format!("{name}{{local_stack=\"{stack}\"");
    text.lines()
        .filter(|l| l.starts_with(&head))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// How discovery steers `stack` now: its mode in discovery.json's `steering` section
/// and the ports it lists.
fn steering_of(state: &Path, stack: &str) -> Option<(SteeringMode, Vec<String>)> {
    let d = StateDir::open_readonly(state).ok()?.read_discovery().ok()?;
    let st = d.steering?;
    let s = st.stacks.get(&StackName::new(stack).ok()?)?;
    Some((s.mode, s.ports.clone()))
}

/// Packets the host's steering table counted at `stack`'s service ports ("port <ifname>
/// <stack>" rules of `netdev <prefix>vrouter`).
fn port_packets(stack: &str) -> u64 {
    let suffix = format!(" {stack}");
    vrouter_tests::steering::read_table(None, &vrouter_tests::steering::table_name())
        .ok()
        .flatten()
        .map(|t| {
            t.rules
                .iter()
                .filter(|r| {
                    r.comment
                        .as_deref()
                        .is_some_and(|c| c.starts_with("port ") && c.ends_with(&suffix))
                })
                .map(|r| r.packets)
                .sum()
        })
        .unwrap_or(0)
}

fn router_has_route(router_pid: u32, prefix: &str) -> bool {
    in_container_netns(router_pid, &["ip", "-4", "route", "show", prefix])
        .map(|o| !o.stdout.trim().is_empty())
        .unwrap_or(false)
}

fn wait_healthy(id: &str, timeout: Duration) -> String {
    let mut last = String::new();
    within(timeout, || {
        last = docker(&["inspect", "-f", "{{.State.Health.Status}}", id]).unwrap_or_default();
        last == "healthy"
    });
    last
}

struct Snapshots {
    fw: String,
    sysctl: String,
}

fn snapshot() -> Snapshots {
    Snapshots {
        fw: firewall_snapshot(&[]).unwrap(),
        sysctl: sysctl_snapshot().unwrap(),
    }
}

/// The engine's firewall and the bridge/forwarding sysctls must be identical in every
/// snapshot, once the rules Docker itself adds for the test networks are left out.
fn assert_same(snaps: &[(&str, &Snapshots)], exclude: &[String]) {
    let (name0, first) = snaps[0];
    let fw0 = without(&first.fw, exclude);
    for (name, s) in &snaps[1..] {
        let fw = without(&s.fw, exclude);
        if fw != fw0 {
            let a: Vec<&str> = fw0.lines().collect();
            let b: Vec<&str> = fw.lines().collect();
            let gone: Vec<&&str> = a.iter().filter(|l| !b.contains(l)).collect();
            let new: Vec<&&str> = b.iter().filter(|l| !a.contains(l)).collect();
            panic!("firewall differs between {name0} and {name}: only in {name0}: {gone:#?}\nonly in {name}: {new:#?}");
        }
        assert_eq!(
            first.sysctl, s.sysctl,
            "net.bridge.* / forwarding sysctls differ between {name0} and {name}"
        );
    }
}

fn state_dir(tag: &str) -> PathBuf {
    PathBuf::from(format!("/run/{}-docker-state{tag}", prefix()))
}

fn check_images(images: &Images) {
    for (name, size) in images.sizes().unwrap() {
        eprintln!("image {name}: {:.2} MB", size as f64 / 1e6);
        assert!(
            size <= 15_000_000,
            "{name} is {size} bytes, over the 15 MB target"
        );
    }
}

/// A stack file carries only its router and services: Compose resolves no discovery
/// service, no container on the host network, no discovery image and no mount of the
/// private directory; and once up, no container of the project is any of those.
fn assert_router_only(s: &Stack) {
    let who = s.spec.project();
    assert!(
        s.spec.pattern.is_router_only_stack(),
        "{who} is not a stack"
    );
    let services = s.deploy_services().unwrap();
    assert_eq!(
        services,
        ["router", "web"],
        "{who}: {} defines services {services:?}",
        s.spec.pattern.file().display()
    );
    let config = s.deploy_config().unwrap();
    for bad in [
        "docker-vrouter/discovery",
        "network_mode: host",
        "docker-router-private",
    ] {
        assert!(
            !config.contains(bad),
            "{who}: {} holds {bad:?}:\n{config}",
            s.spec.pattern.file().display()
        );
    }
    let private = s.spec.private_dir.display().to_string();
    assert!(
        !config.contains(&private),
        "{who}: the stack mounts the private directory {private}:\n{config}"
    );
}

/// At run time: no container of a stack's project is a discovery (its image or the host
/// network), and the router mounts the shared state directory and nothing private.
fn assert_router_only_running(s: &Stack) {
    let who = s.spec.project();
    for (name, image, net) in s.project_containers().unwrap() {
        assert!(
            !image.starts_with("docker-vrouter/discovery") && net != "host",
            "{who}: container {name} ({image}, network {net}) belongs to no stack"
        );
    }
    let r = container_facts(&s.container("router").unwrap()).unwrap();
    let state = s.spec.state_dir.display().to_string();
    assert!(
        r.mounts.iter().any(|(src, _)| *src == state),
        "router of {who} lacks the state directory: {:?}",
        r.mounts
    );
    assert!(
        r.mounts
            .iter()
            .all(|(src, dst)| !src.contains("private") && !dst.contains("private")),
        "router of {who} mounts a private directory: {:?}",
        r.mounts
    );
}

/// The host's discovery: CAP_NET_ADMIN only, not privileged, host network, no Docker
/// socket, and both the shared and its private directory mounted.
fn assert_discovery_container(disc: &Stack) {
    let d = container_facts(&disc.container("discovery").unwrap()).unwrap();
    let who = format!("discovery ({})", disc.spec.project());
    assert_eq!(d.cap_eff, NET_ADMIN, "{who}: CapEff {:#x}", d.cap_eff);
    assert!(!d.privileged, "{who} is privileged");
    assert!(
        !d.own_netns && d.network_mode == "host",
        "{who}: not host network"
    );
    assert!(
        !d.mounts
            .iter()
            .any(|(src, dst)| src.contains("docker.sock") || dst.contains("docker.sock")),
        "{who} has the Docker socket: {:?}",
        d.mounts
    );
    for (src, dst) in [
        (&disc.spec.state_dir, "/var/lib/docker-router"),
        (&disc.spec.private_dir, "/var/lib/docker-router-private"),
    ] {
        let src = src.display().to_string();
        assert!(
            d.mounts.iter().any(|(s, t)| *s == src && t == dst),
            "{who} does not mount {src} on {dst}: {:?}",
            d.mounts
        );
    }
}

/// The discovery project of this host: up, and attached to nothing but the host.
fn discovery_up(name: &str, pattern: Pattern, state: &std::path::Path, images: &Images) -> Stack {
    let mut d = Stack::new(StackSpec::discovery(name, pattern, state), images).unwrap();
    assert_eq!(d.deploy_services().unwrap(), ["discovery"]);
    d.up().unwrap();
    d
}

/// The host's discovery runs as its own project (deploy/discovery); stacks A and B (VNI
/// 1000, deploy/multi-stack: networks with Docker's default protection, reached through
/// port steering) and C (VNI 2000, deploy/privsep) carry only their routers.
#[test]
fn docker_stacks_on_one_host() {
    require_docker!();
    let _lock = TestLock::acquire().unwrap();
    remove_labelled(None);
    eprintln!("{}", versions());
    let images = Images::build().unwrap();
    check_images(&images);
    let state = state_dir("");
    let mut host = HostGuard::new(&[1000, 2000], &[state.clone(), private_dir_of(&state)]).unwrap();
    let links_before = host_links().unwrap();
    let before = snapshot();
    let mtu = underlay_mtu() - 50;

    // The host's one discovery, its own project, before any stack.
    let mut disc = discovery_up("disc", Pattern::Discovery, &state, &images);
    let spec = |name: &str, pattern, vni, net: &str| {
        let mut s = StackSpec::new(name, pattern, vni, net, &state);
        s.mtu = mtu;
        s
    };
    let mut a = Stack::new(spec("a", Pattern::MultiStackA, 1000, "10.201.0"), &images).unwrap();
    // Stack b's file carries an access policy (default deny; stack a on TCP 5000-5099
    // and ping); its rule names stack "a", which is this test's project name for a.
    let mut b_spec = spec("b", Pattern::MultiStackB, 1000, "10.202.0");
    let a_name = a.spec.project();
    b_spec.compose_env.push((
        "VROUTER_ALLOW_B".into(),
        format!("{a_name}:tcp/5000-5099, {a_name}:icmp"),
    ));
    let mut b = Stack::new(b_spec, &images).unwrap();
    let mut c = Stack::new(spec("c", Pattern::PrivSep, 2000, "10.203.0"), &images).unwrap();
    for s in [&a, &b, &c] {
        assert_router_only(s);
    }

    a.up().unwrap();
    host.bridges.push(a.bridge().unwrap());
    let a_router = container_facts(&a.container("router").unwrap()).unwrap();
    assert!(
        within(Duration::from_secs(20), || in_container_netns(
            a_router.pid,
            &["ip", "link", "show", "ovl1000"]
        )
        .map(|o| o.success())
        .unwrap_or(false))
        .is_some(),
        "router A was not attached\n{}",
        a.logs()
    );
    b.up().unwrap();
    host.bridges.push(b.bridge().unwrap());
    c.up().unwrap();
    host.bridges.push(c.bridge().unwrap());
    let (a_ip, b_ip, c_ip) = (web_ip(&a), web_ip(&b), web_ip(&c));

    // Connectivity, both ways, no NAT; VNI isolation.
    let t = wait_ping(&a, &b_ip, Duration::from_secs(30));
    assert!(t.is_some(), "A never reached B\n{}\n{}", a.logs(), b.logs());
    eprintln!("A -> B converged after {:?}", t.unwrap());
    assert!(ping(&b, &a_ip, 3, 2000), "B -> A ping failed");
    tcp_check(&a, &b, 5001);
    tcp_check(&b, &a, 5002);
    assert_unreachable(&a, &c_ip);
    assert_unreachable(&b, &c_ip);
    assert_unreachable(&c, &a_ip);
    assert_unreachable(&c, &b_ip);

    // b's access policy, from its compose file, is in b's router and enforced: a
    // reached b on TCP 5001 and by ping above, and b's own connection to a (5002) got
    // its replies; a port outside the rule is closed to a.
    let b_config = b.deploy_config().unwrap();
    assert!(
        b_config.contains("VROUTER_DEFAULT_POLICY: deny")
            && b_config.contains(&format!("{a_name}:tcp/5000-5099")),
        "stack b's file carries no policy:\n{b_config}"
    );
    let b_router = container_facts(&b.container("router").unwrap()).unwrap();
    let table = in_container_netns(b_router.pid, &["nft", "list", "table", "ip", "vrouter_acl"])
        .map(|o| o.stdout)
        .unwrap_or_default();
    assert!(
        table.contains("chain forward"),
        "no access table in b's router:\n{table}\n{}",
        b.logs()
    );
    tcp_refused_by_policy(&a, &b, 6001);

    // Port steering, the default, on networks that keep Docker's protection: this
    // engine (20.10) has no raw drop, so reachability alone proves nothing; discovery
    // reports the stacks in `ports` mode and the counters at their ports rise with the
    // traffic, in the host's table and in /metrics.
    for s in [&a, &b] {
        let name = s.spec.project();
        let mut last = None;
        let ok = within(Duration::from_secs(10), || {
            last = steering_of(&state, &name);
            last.as_ref()
                .is_some_and(|(m, ports)| *m == SteeringMode::Ports && !ports.is_empty())
        });
        assert!(
            ok.is_some(),
            "stack {name} not in port steering: {last:?}\n{}",
            disc.logs()
        );
        let mode = format!("vrouter_steering_mode{{local_stack=\"{name}\",mode=\"ports\"}}");
        let metrics = discovery_metrics();
        assert_eq!(
            vrouter_tests::metric(&metrics, &mode),
            Some(1.0),
            "/metrics has no `{mode} 1`"
        );
    }
    let (a_name, b_name) = (a.spec.project(), b.spec.project());
    let counted = (
        port_packets(&a_name),
        port_packets(&b_name),
        metric_sum(
            &discovery_metrics(),
            "vrouter_steering_port_packets_total",
            &a_name,
        ),
    );
    assert!(ping(&a, &b_ip, 5, 2000), "A -> B ping failed");
    tcp_check(&a, &b, 5004);
    tcp_check(&b, &a, 5005);
    let ok = within(Duration::from_secs(5), || {
        port_packets(&a_name) >= counted.0 + 5
            && port_packets(&b_name) > counted.1
            && metric_sum(
                &discovery_metrics(),
                "vrouter_steering_port_packets_total",
                &a_name,
            ) >= counted.2 + 5
    });
    assert!(
        ok.is_some(),
        "steering counters did not rise: table a {} -> {}, b {} -> {}, /metrics a {} -> {}",
        counted.0,
        port_packets(&a_name),
        counted.1,
        port_packets(&b_name),
        counted.2,
        metric_sum(
            &discovery_metrics(),
            "vrouter_steering_port_packets_total",
            &a_name
        )
    );

    // Privileges, as docker inspect and the kernel see them; stacks hold no discovery.
    for s in [&a, &b, &c] {
        let r = container_facts(&s.container("router").unwrap()).unwrap();
        let who = format!("router of {}", s.spec.project());
        assert_eq!(r.cap_eff, NET_ADMIN, "{who}: CapEff {:#x}", r.cap_eff);
        assert!(r.own_netns, "{who} is in the host network namespace");
        assert!(
            r.readonly_rootfs && r.root_mount_ro,
            "{who}: root file system not read-only"
        );
        assert!(!r.privileged, "{who} is privileged");
        assert_router_only_running(s);
    }
    assert_discovery_container(&disc);
    // HEALTHCHECKs run the binaries' own `health` subcommands.
    let id = disc.container("discovery").unwrap();
    let st = wait_healthy(&id, Duration::from_secs(40));
    assert_eq!(st, "healthy", "discovery of the host");
    for s in [&a, &b, &c] {
        let id = s.container("router").unwrap();
        let st = wait_healthy(&id, Duration::from_secs(40));
        assert_eq!(st, "healthy", "router of {}", s.spec.project());
    }
    let middle = snapshot();

    // Router restart: a new network namespace, re-attached, connectivity back in 5 s.
    let old_ns = netns_of(
        container_facts(&a.container("router").unwrap())
            .unwrap()
            .pid,
    )
    .unwrap();
    a.restart("router").unwrap();
    let t = wait_ping(&a, &b_ip, FIVE_S);
    assert!(
        t.is_some(),
        "A -> B not back within 5 s of restarting A's router\n{}\nholders of its old namespace {old_ns} (its old overlay link keeps the router's MAC up while it lives): {:#?}",
        a.logs(),
        netns_holders(&old_ns)
    );
    eprintln!("router restart: connectivity back after {:?}", t.unwrap());
    assert!(ping(&b, &a_ip, 2, 2000));

    // A restart of the host's discovery under a TCP connection that must survive (the
    // datapath is headless), then connectivity within 5 s.
    let hold_port = 5010;
    b.exec_detached(
        "web",
        &[
            "vrt-probe",
            "tcp-serve",
            &format!("0.0.0.0:{hold_port}"),
            "/tmp/hold",
            "30",
        ],
    )
    .unwrap();
    within(FIVE_S, || {
        b.exec("web", &["cat", "/tmp/hold.ready"])
            .map(|o| o.success())
            .unwrap_or(false)
    });
    let mut hold = a
        .exec_background(
            "web",
            &[
                "vrt-probe",
                "tcp-hold",
                &format!("{b_ip}:{hold_port}"),
                "14",
                "2000",
            ],
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    disc.restart("discovery").unwrap();
    let t = wait_ping(&a, &b_ip, FIVE_S);
    assert!(
        t.is_some(),
        "A -> B not back within 5 s of restarting the discovery\n{}",
        disc.logs()
    );
    eprintln!("discovery restart: connectivity after {:?}", t.unwrap());
    // The discovery as it runs from now on; B's `down` below must not touch it.
    let d_after = container_facts(&disc.container("discovery").unwrap()).unwrap();
    hold.wait_success(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("TCP connection did not survive the discovery restart: {e:#}"));

    // Down of B: its routes leave A within 5 s, and nothing of B stays on the host.
    let a_router = container_facts(&a.container("router").unwrap()).unwrap();
    let b_bridge = b.bridge().unwrap();
    let b_router_mac = vrouter_state::Mac::for_router(
        vrouter_state::Vni::new(1000).unwrap(),
        b.spec.router_ip().parse().unwrap(),
    )
    .to_string();
    assert!(router_has_route(a_router.pid, &b.spec.subnet()));
    let t0 = Instant::now();
    b.down().unwrap();
    let down_took = t0.elapsed();
    // Counted from the start of `down` (its router stops within its first second).
    let gone = within(FIVE_S.saturating_sub(down_took), || {
        !router_has_route(a_router.pid, &b.spec.subnet())
    });
    assert!(
        gone.is_some() && t0.elapsed() <= FIVE_S + Duration::from_millis(200),
        "B's route still in router A 5 s after `down` started (down took {down_took:?})\n{}",
        a.logs()
    );
    eprintln!(
        "down of B took {down_took:?}; B's route left A within {:?} of its start",
        t0.elapsed()
    );
    // B's `down` took only B's router: the host's discovery is the same process.
    let d_now = container_facts(&disc.container("discovery").unwrap()).unwrap();
    assert_eq!(
        (d_after.id.as_str(), d_after.started_at.as_str()),
        (d_now.id.as_str(), d_now.started_at.as_str()),
        "the host's discovery was touched by B's down"
    );
    let rules = ip_rules();
    assert!(
        !rules.contains(&b_bridge),
        "a rule for B's bridge stayed:\n{rules}"
    );
    let fdb = fdb("vxlan1000");
    assert!(
        !fdb.to_lowercase().contains(&b_router_mac.to_lowercase())
            && !fdb.contains(&b.spec.router_ip()),
        "an FDB entry of B stayed on vxlan1000:\n{fdb}"
    );
    let a_bridge = a.bridge().unwrap();
    let c_bridge = c.bridge().unwrap();
    for l in host_links().unwrap().difference(&links_before) {
        let line = link_line(l).unwrap_or_default();
        let ours = l == "vxlan1000"
            || l == "vxlan2000"
            || *l == a_bridge
            || *l == c_bridge
            || line.contains(&format!("master {a_bridge} "))
            || line.contains(&format!("master {c_bridge} "));
        assert!(ours, "link {l} stayed after B went down: {line}");
    }
    assert!(ping(&a, &a.spec.router_ip(), 1, 1000));

    // B again: connectivity returns, A untouched.
    b.up().unwrap();
    host.bridges.push(b.bridge().unwrap());
    let b_ip = web_ip(&b);
    let t = wait_ping(&a, &b_ip, Duration::from_secs(20));
    assert!(
        t.is_some(),
        "A -> B not back after B came up again\n{}",
        b.logs()
    );
    eprintln!("B up again: connectivity after {:?}", t.unwrap());
    tcp_check(&b, &a, 5003);
    let a_router2 = container_facts(&a.container("router").unwrap()).unwrap();
    assert_eq!(
        (a_router.id.as_str(), a_router.started_at.as_str()),
        (a_router2.id.as_str(), a_router2.started_at.as_str()),
        "A's router was touched"
    );

    // Everything down; Docker's firewall and the sysctls never changed.
    let mut exclude: Vec<String> = host.bridges.clone();
    exclude.extend([a.spec.subnet(), b.spec.subnet(), c.spec.subnet()]);
    b.down().unwrap();
    c.down().unwrap();
    a.down().unwrap();
    disc.down().unwrap();
    let after = snapshot();
    assert_same(
        &[("before", &before), ("middle", &middle), ("after", &after)],
        &exclude,
    );
    host.cleanup();
}

/// deploy/all-in-one: stacks D and E (VNI 1000) and F (VNI 2000), each one container
/// running both roles.
#[test]
fn docker_all_in_one() {
    require_docker!();
    let _lock = TestLock::acquire().unwrap();
    remove_labelled(None);
    let images = Images::build().unwrap();
    let state = state_dir("-aio");
    let mut host = HostGuard::new(&[1000, 2000], &[state.clone(), private_dir_of(&state)]).unwrap();
    let links_before = host_links().unwrap();
    let before = snapshot();
    let mtu = underlay_mtu() - 50;
    // `privileged: true` cannot start a container on a daemon whose own bounding set
    // lacks a capability (this machine's lacks CAP_SYS_RESOURCE: runc fails with
    // "unable to apply caps"). VROUTER_AIO_PRIVILEGED=0 runs the same container with
    // cap_add NET_ADMIN + SYS_ADMIN instead; the all-in-one then remounts its own copy
    // of /proc/sys to set the router namespace's sysctls.
    let privileged = match std::env::var("VROUTER_AIO_PRIVILEGED") {
        Ok(v) => v != "0",
        Err(_) => {
            let bnd = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            let bnd = bnd
                .lines()
                .find(|l| l.starts_with("CapBnd:"))
                .and_then(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
                .unwrap_or(0);
            let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(40);
            let all = if last >= 63 {
                u64::MAX
            } else {
                (1u64 << (last + 1)) - 1
            };
            bnd & all == all
        }
    };
    eprintln!("all-in-one containers privileged: {privileged}");
    let spec = |name: &str, vni, net: &str| {
        let mut s = StackSpec::new(name, Pattern::AllInOne, vni, net, &state);
        s.mtu = mtu;
        if !privileged {
            s.extra_override =
                Some("    privileged: false\n    cap_add: [NET_ADMIN, SYS_ADMIN]\n".to_string());
        }
        s
    };
    let mut d = Stack::new(spec("d", 1000, "10.204.0"), &images).unwrap();
    let mut e = Stack::new(spec("e", 1000, "10.205.0"), &images).unwrap();
    let mut f = Stack::new(spec("f", 2000, "10.206.0"), &images).unwrap();
    d.up().unwrap();
    host.bridges.push(d.bridge().unwrap());
    e.up().unwrap();
    host.bridges.push(e.bridge().unwrap());
    f.up().unwrap();
    host.bridges.push(f.bridge().unwrap());
    let (d_ip, e_ip, f_ip) = (web_ip(&d), web_ip(&e), web_ip(&f));

    let t = wait_ping(&d, &e_ip, Duration::from_secs(30));
    assert!(t.is_some(), "D never reached E\n{}\n{}", d.logs(), e.logs());
    eprintln!("all-in-one D -> E converged after {:?}", t.unwrap());
    assert!(ping(&e, &d_ip, 3, 2000));
    tcp_check(&d, &e, 5101);
    tcp_check(&e, &d, 5102);
    assert_unreachable(&d, &f_ip);
    assert_unreachable(&e, &f_ip);
    assert_unreachable(&f, &d_ip);
    // The router namespace hangs off D's bridge through the all-in-one's veth.
    let veth = vrouter_discovery_veth(&d);
    let line = link_line(&veth).unwrap_or_default();
    assert!(
        line.contains(&format!("master {} ", d.bridge().unwrap())),
        "{veth} is not on D's bridge: {line:?}"
    );
    // Both roles in one container: it mounts the shared and the private directory.
    let v = container_facts(&d.container("vrouter").unwrap()).unwrap();
    for dir in [&d.spec.state_dir, &d.spec.private_dir] {
        let dir = dir.display().to_string();
        assert!(
            v.mounts.iter().any(|(src, _)| *src == dir),
            "the all-in-one of {} does not mount {dir}: {:?}",
            d.spec.project(),
            v.mounts
        );
    }
    let middle = snapshot();

    // A restart of the all-in-one container brings connectivity back.
    d.restart("vrouter").unwrap();
    let t = wait_ping(&d, &e_ip, Duration::from_secs(10));
    assert!(
        t.is_some(),
        "D -> E not back after restarting D's all-in-one\n{}",
        d.logs()
    );
    eprintln!("all-in-one restart: connectivity after {:?}", t.unwrap());

    let mut exclude: Vec<String> = host.bridges.clone();
    exclude.extend([d.spec.subnet(), e.spec.subnet(), f.spec.subnet()]);
    f.down().unwrap();
    e.down().unwrap();
    d.down().unwrap();
    for l in host_links().unwrap().difference(&links_before) {
        assert!(
            l.starts_with("vxlan"),
            "link {l} stayed after the all-in-one stacks went down"
        );
    }
    let after = snapshot();
    assert_same(
        &[("before", &before), ("middle", &middle), ("after", &after)],
        &exclude,
    );
    host.cleanup();
}

/// The all-in-one's host-side veth name for a stack (mirrors
/// vrouter_discovery::allinone::veth_name: "vra" + FNV-1a of the stack name).
fn vrouter_discovery_veth(s: &Stack) -> String {
    let mut h: u32 = 0x811c9dc5;
    for b in s.spec.project().bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    format!("vra{h:08x}")
}

/// Cross-host: Docker stack X on this host, stack Y on a simulated host (a namespace
/// running the binaries natively) joined to this host by a prefixed veth pair; they
/// talk over VXLAN both ways.
#[test]
fn docker_cross_host() {
    require_docker!();
    cross_host("docker_cross_host", false);
}

/// The same with encryption `require` on both hosts (VXLAN over WireGuard, the
/// userspace backend: the discovery container gets /dev/net/tun from the deploy file and
/// still only CAP_NET_ADMIN): the public keys travel in the peer files, the overlay MTU
/// is 1370, and the underlay between the hosts carries WireGuard and no VXLAN.
#[test]
fn docker_cross_host_encrypted() {
    require_docker!();
    cross_host("docker_cross_host_enc", true);
}

/// The peer file of a host with one remote host `addr` running `stack` (`key`: that
/// host's WireGuard public key).
fn peer_file(addr: &str, stack: &str, prefix: &str, router_ip: &str, key: Option<&str>) -> String {
    let key = key
        .map(|k| format!("public_key = \"{k}\"\n"))
        .unwrap_or_default();
    format!(
        "[[host]]\naddress = \"{addr}\"\n{key}\n[[host.stack]]\nname = \"{stack}\"\nvni = 1000\nprefixes = [\"{prefix}\"]\nrouter_ip = \"{router_ip}\"\n"
    )
}

/// `encryption.public_key` of the discovery.json in `state`, once there.
fn wait_public_key(state: &Path, timeout: Duration) -> Option<String> {
    let mut key = None;
    within(timeout, || {
        key = std::fs::read_to_string(state.join("discovery.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["encryption"]["public_key"].as_str().map(str::to_string));
        key.is_some()
    });
    key
}

fn cross_host(test: &str, encrypted: bool) {
    // The mesh takes the global test lock itself.
    let y = StackDef::new("y", 1, 1000, "10.20.0.0/24");
    let mut mesh = Mesh::build(test, 1, vec![y.clone()]).unwrap();
    if encrypted {
        mesh.set_discovery_env(1, "VROUTER_ENCRYPTION", "require");
        mesh.set_discovery_env(1, "VROUTER_WG_BACKEND", "userspace");
    }
    mesh.start_all().unwrap();
    remove_labelled(None);
    let images = Images::build().unwrap();
    let p = prefix();
    let state = state_dir("-x");
    let conf_dir = PathBuf::from(format!("/run/{p}-docker-conf-x"));
    let mut host = HostGuard::new(
        &[1000],
        &[state.clone(), private_dir_of(&state), conf_dir.clone()],
    )
    .unwrap();
    // This host's WireGuard device: the test's own name (tests/cleanup.sh removes
    // <prefix>-* links), never the host's `vrouter-wg`.
    let wg_dev = format!("{p}-wg");
    if encrypted {
        assert!(
            link_line(&wg_dev).is_none(),
            "{wg_dev} exists before the test (a leftover: tests/cleanup.sh {p})"
        );
        host.links.push(wg_dev.clone());
    }
    let before = snapshot();

    // This host's underlay link to the simulated hosts' underlay bridge.
    let link = format!("{p}-dkr");
    let ul = mesh.topo.underlay_ns.clone();
    run_ok(&[
        "ip", "link", "add", &link, "type", "veth", "peer", "name", "dkr", "netns", &ul,
    ])
    .unwrap();
    run_ok(&[
        "ip", "netns", "exec", &ul, "ip", "link", "set", "dkr", "master", "br0", "up",
    ])
    .unwrap();
    run_ok(&["ip", "addr", "add", "198.18.0.100/24", "dev", &link]).unwrap();
    run_ok(&["ip", "link", "set", &link, "up"]).unwrap();
    let sim = mesh.topo.host(1).underlay_ip.to_string();
    let sim_key = if encrypted {
        let k = wait_public_key(&mesh.state_dir(1), Duration::from_secs(15));
        assert!(k.is_some(), "the simulated host reports no public key");
        k
    } else {
        None
    };

    let x_net = "10.207.0";
    std::fs::write(
        conf_dir.join("peers.toml"),
        peer_file(&sim, y.name, y.cidr, &y.router_ip(), sim_key.as_deref()),
    )
    .unwrap();
    // This host's discovery (deploy/multi-host/discovery, its own project) and stack X
    // (deploy/multi-host, the router only).
    let mut dspec = StackSpec::discovery("xdisc", Pattern::MultiHostDiscovery, &state);
    dspec
        .discovery_env
        .push(("VROUTER_UNDERLAY_INTERFACE".into(), link.clone()));
    if encrypted {
        for (k, v) in [
            ("VROUTER_ENCRYPTION", "require"),
            ("VROUTER_WG_BACKEND", "userspace"),
            ("VROUTER_WG_DEVICE", wg_dev.as_str()),
        ] {
            dspec.discovery_env.push((k.into(), v.into()));
        }
    }
    dspec
        .compose_env
        .push(("VROUTER_CONFIG_DIR".into(), conf_dir.display().to_string()));
    let mut disc = Stack::new(dspec, &images).unwrap();
    assert_eq!(disc.deploy_services().unwrap(), ["discovery"]);
    let mut spec = StackSpec::new("x", Pattern::MultiHost, 1000, x_net, &state);
    spec.mtu = if encrypted { 1370 } else { 1450 };
    let mut x = Stack::new(spec, &images).unwrap();
    assert_router_only(&x);

    disc.up().unwrap();
    // The simulated host learns of X (and, encrypted, of this host's key) from its own
    // peer file.
    let x_key = if encrypted {
        let k = wait_public_key(&state, Duration::from_secs(30));
        assert!(
            k.is_some(),
            "the Docker discovery reports no public key\n{}",
            disc.logs()
        );
        k
    } else {
        None
    };
    vrouter_tests::write_file_atomic(
        &mesh.config_path(1),
        peer_file(
            "198.18.0.100",
            &x.spec.project(),
            &x.spec.subnet(),
            &x.spec.router_ip(),
            x_key.as_deref(),
        ),
    )
    .unwrap();
    x.up().unwrap();
    host.bridges.push(x.bridge().unwrap());
    assert_router_only_running(&x);
    assert_discovery_container(&disc);
    let x_ip = web_ip(&x);
    let y_svc = mesh.svc("y");
    let y_ip = y.service_ip();

    let t = wait_ping(&x, &y_ip, Duration::from_secs(30));
    assert!(
        t.is_some(),
        "X (Docker) never reached Y (simulated host)\n{}\n{}",
        x.logs(),
        disc.logs()
    );
    eprintln!("cross-host X -> Y converged after {:?}", t.unwrap());
    // On the underlay (this host's end of the link, seen from the bridge port): with
    // encryption, WireGuard and no VXLAN while the stacks talk.
    let capture = encrypted.then(|| {
        UnderlayCapture::start(
            &ul,
            "dkr",
            None,
            Duration::from_secs(60),
            mesh.topo.log_dir(),
        )
        .unwrap()
    });
    let local = x
        .exec("web", &["vrt-probe", "ping", &y_ip, "1", "1000"])
        .unwrap();
    assert!(local.success());
    assert!(
        vrouter_tests::ping(&y_svc.ns, &x_ip, 3, Duration::from_secs(3)),
        "Y -> X ping failed"
    );
    // TCP X -> Y (Y's server sees X's own address) and Y -> X.
    let mut srv = TcpServer::start(
        &y_svc.ns,
        &format!("{y_ip}:5201"),
        mesh.topo.log_dir(),
        Duration::from_secs(20),
    )
    .unwrap();
    let sent = x
        .exec(
            "web",
            &[
                "vrt-probe",
                "tcp-send",
                &format!("{y_ip}:5201"),
                "200000",
                "5",
            ],
        )
        .unwrap();
    assert!(
        sent.success(),
        "TCP X -> Y failed: {}{}",
        sent.stdout,
        sent.stderr
    );
    assert_eq!(srv.peer(FIVE_S).unwrap().ip().to_string(), x_ip);
    srv.wait(FIVE_S).unwrap();
    x.exec_detached(
        "web",
        &[
            "vrt-probe",
            "tcp-serve",
            "0.0.0.0:5202",
            "/tmp/srv-5202",
            "20",
        ],
    )
    .unwrap();
    within(FIVE_S, || {
        x.exec("web", &["cat", "/tmp/srv-5202.ready"])
            .map(|o| o.success())
            .unwrap_or(false)
    });
    tcp_send(&y_svc.ns, &format!("{x_ip}:5202"), 200000, FIVE_S).unwrap();
    let seen = x.exec("web", &["cat", "/tmp/srv-5202"]).unwrap().stdout;
    assert!(seen.contains(&format!("peer={y_ip}:")), "X saw {seen:?}");
    let vx = run_ok(&["ip", "-d", "link", "show", "vxlan1000"])
        .unwrap()
        .stdout;
    if let Some(cap) = capture {
        let r = cap.finish().unwrap();
        eprintln!("MEASURED: docker cross-host underlay under require: {r:?}");
        assert_eq!(r.vxlan, 0, "plain VXLAN between the hosts: {r:?}");
        assert!(r.wg > 0, "no WireGuard between the hosts: {r:?}");
        // The VXLAN device leaves the source address to the route (the tunnel
        // address through WireGuard) and carries the encrypted overlay MTU.
        assert!(
            !vx.contains(" local ") && vx.contains("mtu 1370 "),
            "vxlan1000 under encryption: {vx}"
        );
        let wg = link_line(&wg_dev).unwrap_or_default();
        assert!(wg.contains("mtu 1420 "), "{wg_dev}: {wg}");
        let d: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(state.join("discovery.json")).unwrap())
                .unwrap();
        let e = &d["encryption"];
        assert_eq!(e["mode"], "require", "{e}");
        assert_eq!(e["backend"], "userspace", "{e}");
        assert_eq!(e["overlay_mtu"], 1370, "{e}");
        assert!(
            e["peers"].as_array().is_some_and(|p| p
                .iter()
                .any(|p| p["host"] == sim.as_str() && p["state"] == "encrypted")),
            "the simulated host is not an encrypted peer: {e}"
        );
        // Only CAP_NET_ADMIN, and the TUN device from the deploy file.
        let id = disc.container("discovery").unwrap();
        let devices = docker(&[
            "inspect",
            "-f",
            "{{range .HostConfig.Devices}}{{.PathOnHost}} {{end}}",
            &id,
        ])
        .unwrap();
        assert!(devices.contains("/dev/net/tun"), "devices: {devices}");
    } else {
        // The VXLAN device is bound to the configured underlay link.
        assert!(
            vx.contains("local 198.18.0.100") && vx.contains(&format!("dev {link}")),
            "vxlan1000 is not on {link}: {vx}"
        );
    }
    let middle = snapshot();

    let exclude = vec![host.bridges[0].clone(), x.spec.subnet()];
    x.down().unwrap();
    disc.down().unwrap();
    let after = snapshot();
    assert_same(
        &[("before", &before), ("middle", &middle), ("after", &after)],
        &exclude,
    );
    host.cleanup();
    let _ = run(&["ip", "link", "del", &link], &[]);
    drop(mesh);
}
