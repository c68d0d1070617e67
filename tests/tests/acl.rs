//! Access control between stacks (issue 14) with the real daemons on simulated hosts:
//! each stack's router enforces its own policy (`VROUTER_DEFAULT_POLICY`,
//! `VROUTER_ALLOW`, `VROUTER_ACL_FILE`) on what enters the stack from the overlay, in
//! the nftables table `ip vrouter_acl` of its namespace. Traffic is sent in known
//! counts (fixed-size datagrams, single TCP connections, echo requests) between the
//! stacks' services; the kernel's counters are read with `nft -j` in the router's
//! namespace, the router's own ones from its probes file and discovery.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vrouter_tests::mesh::{Mesh, StackDef};
use vrouter_tests::steering::Steering;
use vrouter_tests::*;

const CONVERGE: Duration = Duration::from_secs(20);
/// How long a policy change may take to reach the kernel (file watch, SIGHUP, a
/// routes.json change), generously.
const APPLY: Duration = Duration::from_secs(10);
const TABLE: &str = "vrouter_acl";
const HTTP: &str = "127.0.0.1:9474";

// ---------------------------------------------------------------------------------
// Helpers

/// A directory for one test's policy files, removed on drop (panicking or not).
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let d = PathBuf::from(format!("/run/{}-acl-{test}", prefix()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds the hosts and stacks, gives the routers their extra environment (stack, key,
/// value), starts discovery on every host and every router.
fn start_mesh(test: &str, hosts: usize, stacks: Vec<StackDef>, env: &[(&str, &str, &str)]) -> Mesh {
    let mut mesh = Mesh::build(test, hosts, stacks).expect("mesh builds");
    for (stack, k, v) in env {
        mesh.set_router_env(stack, k, v);
    }
    for h in 1..=hosts {
        mesh.write_config(h).unwrap();
        mesh.start_discovery(h).unwrap();
    }
    mesh.start_routers().unwrap();
    mesh
}

/// `nft <args>` in `stack`'s router namespace.
fn nft(mesh: &Mesh, stack: &str, args: &[&str]) -> CmdOutput {
    let mut argv = vec!["nft"];
    argv.extend_from_slice(args);
    mesh.rtr(stack).exec(&argv).unwrap()
}

/// The ACL table of `stack`'s router as `nft -s` lists it (no counters), if present.
fn acl_table(mesh: &Mesh, stack: &str) -> Option<String> {
    let out = nft(mesh, stack, &["-s", "list", "table", "ip", TABLE]);
    out.success().then_some(out.stdout)
}

/// True when the router holds a policy table (not the closed one).
fn policy_installed(mesh: &Mesh, stack: &str) -> bool {
    acl_table(mesh, stack).is_some_and(|t| t.contains("chain forward") && !t.contains("acl closed"))
}

fn wait_policy(mesh: &Mesh, stack: &str) {
    let ok = wait_until(APPLY, Duration::from_millis(50), || {
        policy_installed(mesh, stack)
    });
    if !ok {
        mesh.dump_logs();
        panic!(
            "no ACL policy in {stack}'s router: {:?}",
            acl_table(mesh, stack)
        );
    }
}

/// Waits until `stack`'s ACL table differs from `before` (a reload reached the kernel).
fn wait_table_changed(mesh: &Mesh, stack: &str, before: &Option<String>) -> bool {
    wait_until(APPLY, Duration::from_millis(20), || {
        let now = acl_table(mesh, stack);
        now.is_some() && now != *before
    })
}

/// One counter of the ACL table: packets and bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Count {
    packets: u64,
    bytes: u64,
}

impl std::ops::Sub for Count {
    type Output = Count;
    fn sub(self, o: Count) -> Count {
        Count {
            packets: self.packets - o.packets,
            bytes: self.bytes - o.bytes,
        }
    }
}

impl std::ops::Add for Count {
    type Output = Count;
    fn add(self, o: Count) -> Count {
        Count {
            packets: self.packets + o.packets,
            bytes: self.bytes + o.bytes,
        }
    }
}

/// The ACL table of `stack`'s router as `nft -j` gives it (with counters).
fn acl_json(mesh: &Mesh, stack: &str) -> serde_json::Value {
    let out = nft(mesh, stack, &["-j", "list", "table", "ip", TABLE]);
    assert!(
        out.success(),
        "no table {TABLE} in {stack}'s router: {}",
        out.stderr
    );
    serde_json::from_str(&out.stdout).unwrap()
}

fn counter_of(v: &serde_json::Value) -> Count {
    Count {
        packets: v["packets"].as_u64().unwrap_or(0),
        bytes: v["bytes"].as_u64().unwrap_or(0),
    }
}

/// Sum of the counters of the table's rules whose comment satisfies `pick`.
fn rule_counters(mesh: &Mesh, stack: &str, pick: impl Fn(&str) -> bool) -> Count {
    let v = acl_json(mesh, stack);
    let mut total = Count::default();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let rule = &item["rule"];
        let Some(comment) = rule["comment"].as_str() else {
            continue;
        };
        if !pick(comment) {
            continue;
        }
        for e in rule["expr"].as_array().into_iter().flatten() {
            if e.get("counter").is_some() {
                total = total + counter_of(&e["counter"]);
            }
        }
    }
    total
}

/// Sum of the counters of the `admitted` set's elements whose comment is `comment`.
fn admitted_counters(mesh: &Mesh, stack: &str, comment: &str) -> Count {
    let v = acl_json(mesh, stack);
    let mut total = Count::default();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let set = &item["set"];
        if set["name"].as_str() != Some("admitted") {
            continue;
        }
        for el in set["elem"].as_array().into_iter().flatten() {
            let el = &el["elem"];
            if el["comment"].as_str() == Some(comment) {
                total = total + counter_of(&el["counter"]);
            }
        }
    }
    total
}

/// Every packet of the connections rule `id` admitted: its class-chain rules' counters
/// (the first packet of each connection) plus its `admitted` element's (the rest).
fn accepted_by_rule(mesh: &Mesh, stack: &str, id: u16) -> Count {
    let class = format!("acl {id} ");
    rule_counters(mesh, stack, |c| c.starts_with(&class))
        + admitted_counters(mesh, stack, &format!("acl {id}"))
}

/// Runs `vrouter-router <args>` in `stack`'s router namespace with the router's
/// settings plus `env`, as `docker exec` would.
fn router_cmd(mesh: &Mesh, stack: &str, env: &[(&str, &str)], args: &[&str]) -> CmdOutput {
    let s = mesh.stack(stack);
    let bin = mesh.bin("vrouter-router");
    let mut vars = vec![
        format!("VROUTER_STACK={}", s.name),
        format!("VROUTER_VNI={}", s.vni),
        format!("VROUTER_STATE_DIR={}", mesh.state_dir(s.host).display()),
        "RUST_LOG=warn".to_string(),
    ];
    vars.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    let mut argv: Vec<&str> = vec!["env"];
    argv.extend(vars.iter().map(String::as_str));
    argv.push(bin.to_str().unwrap());
    argv.extend_from_slice(args);
    mesh.rtr(stack).exec(&argv).unwrap()
}

/// A TCP connection from `from`'s service to `to`'s on `port` that moves 64 KiB both
/// ways within `timeout`.
fn tcp_ok(mesh: &Mesh, from: &str, to: &str, port: u16, timeout: Duration) -> Result<(), String> {
    let dst = mesh.svc(to);
    let addr = format!("{}:{port}", dst.ip);
    let _server = TcpServer::start(&dst.ns, &addr, mesh.topo.log_dir(), Duration::from_secs(5))
        .map_err(|e| format!("{e:#}"))?;
    tcp_send(&mesh.svc(from).ns, &addr, 64 * 1024, timeout)
        .map(|_| ())
        .map_err(|e| format!("{from} -> {to}:{port}: {e:#}"))
}

fn assert_tcp(mesh: &Mesh, from: &str, to: &str, port: u16) {
    if let Err(e) = tcp_ok(mesh, from, to, port, Duration::from_secs(5)) {
        mesh.dump_logs();
        panic!("TCP {from} -> {to}:{port} should pass: {e}");
    }
}

fn assert_no_tcp(mesh: &Mesh, from: &str, to: &str, port: u16) {
    assert!(
        tcp_ok(mesh, from, to, port, Duration::from_secs(2)).is_err(),
        "TCP {from} -> {to}:{port} passed; the policy denies it"
    );
}

/// `count` datagrams of `size` IP bytes from `src_ns` (bound to `bind`, if given) to
/// `dst_ip:port`, received by a sink in `dst_ns`: the datagrams and IP bytes that
/// arrived. The sink waits at most `wait` beyond the sending.
#[allow(clippy::too_many_arguments)]
fn udp_delivered(
    mesh: &Mesh,
    src_ns: &str,
    bind: Option<Ipv4Addr>,
    dst_ns: &str,
    dst_ip: &str,
    port: u16,
    count: u64,
    size: u64,
    wait: Duration,
) -> (u64, u64) {
    let log = mesh.topo.log_dir().to_path_buf();
    let out = log.join(format!("sink-{dst_ns}-{port}.out"));
    let send_time = Duration::from_micros(count * 400) + Duration::from_secs(2);
    let mut sink = UdpSink::start(dst_ns, port, count, &out, send_time + wait, &log).unwrap();
    let mut sender = udp_burst_opts(
        src_ns,
        &format!("{dst_ip}:{port}"),
        count,
        size,
        bind,
        None,
        &log,
    )
    .unwrap();
    sender
        .wait_success(send_time + Duration::from_secs(10))
        .unwrap();
    sink.received(send_time + wait + Duration::from_secs(5))
        .unwrap()
}

/// Datagrams from `from`'s service to `to`'s service that arrive.
fn udp_between(mesh: &Mesh, from: &str, to: &str, port: u16, count: u64, wait: Duration) -> u64 {
    let dst = mesh.svc(to);
    udp_delivered(
        mesh,
        &mesh.svc(from).ns,
        None,
        &dst.ns,
        &dst.ip.to_string(),
        port,
        count,
        200,
        wait,
    )
    .0
}

fn assert_udp(mesh: &Mesh, from: &str, to: &str, port: u16) {
    let got = udp_between(mesh, from, to, port, 20, Duration::from_secs(3));
    assert_eq!(got, 20, "UDP {from} -> {to}:{port}: {got} of 20 arrived");
}

fn assert_no_udp(mesh: &Mesh, from: &str, to: &str, port: u16) {
    let got = udp_between(mesh, from, to, port, 20, Duration::from_secs(1));
    assert_eq!(
        got, 0,
        "UDP {from} -> {to}:{port}: {got} of 20 arrived; the policy denies it"
    );
}

fn pings(mesh: &Mesh, from: &str, to: &str) -> bool {
    ping(
        &mesh.svc(from).ns,
        &mesh.svc(to).ip.to_string(),
        3,
        Duration::from_secs(2),
    )
}

/// UDP request/response over one flow from `from`'s service to an echo server in `to`'s:
/// how many of `count` requests were answered.
fn udp_answered(
    mesh: &Mesh,
    from: &str,
    to: &str,
    port: u16,
    count: u64,
    timeout: Duration,
) -> u64 {
    let dst = mesh.svc(to);
    let _echo = UdpEcho::start(
        &dst.ns,
        port,
        count,
        timeout + Duration::from_secs(2),
        mesh.topo.log_dir(),
    )
    .unwrap();
    udp_rr(
        &mesh.svc(from).ns,
        &format!("{}:{port}", dst.ip),
        count,
        timeout,
    )
    .unwrap()
    .1
}

/// Events of `stack`'s router (from the events log of its host) since `since_ms`.
fn router_events(mesh: &Mesh, stack: &str, since_ms: u64) -> Vec<vrouter_state::Event> {
    let host = mesh.stack(stack).host;
    let source = format!("router/{stack}");
    mesh.events(host)
        .into_iter()
        .filter(|e| e.ts_ms >= since_ms && e.source == source)
        .collect()
}

fn policy_file(default: &str, rules: &[(&str, &str, &str)]) -> String {
    let mut s = format!("default = \"{default}\"\n");
    for (name, verdict, rule) in rules {
        s.push_str(&format!(
            "\n[[rule]]\nname = \"{name}\"\n{verdict} = \"{rule}\"\n"
        ));
    }
    s
}

// ---------------------------------------------------------------------------------
// Tests

/// Stack a denies by default and allows b and c on TCP 7001, UDP 7002 and ICMP: those
/// pass, from the other host (b) and from the same host (c); other ports and protocols
/// fail, and stack d (on a's host), named by no rule, gets nothing in, though it
/// reaches b (no policy) fine.
#[test]
fn default_deny_admits_only_the_allowed_services() {
    require_root!();
    let rules = "b:tcp/7001, b:udp/7002, b:icmp, c:tcp/7001, c:udp/7002, c:icmp";
    // Protected networks under port steering (the default).
    let mode = Steering::from_env().unwrap_or(Steering::Ports);
    let mesh = start_mesh(
        "acl_deny",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24").same_host_peer(mode),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("c", 1, 1000, "10.3.0.0/24").same_host_peer(mode),
            StackDef::new("d", 1, 1000, "10.4.0.0/24").same_host_peer(mode),
        ],
        &[
            ("a", "VROUTER_DEFAULT_POLICY", "deny"),
            ("a", "VROUTER_ALLOW", rules),
        ],
    );
    mesh.wait_converged(CONVERGE).unwrap();
    wait_policy(&mesh, "a");

    for from in ["b", "c"] {
        assert!(pings(&mesh, from, "a"), "ping {from} -> a should pass");
        assert_tcp(&mesh, from, "a", 7001);
        assert_udp(&mesh, from, "a", 7002);
        // The right port with the wrong protocol, and other ports.
        assert_no_tcp(&mesh, from, "a", 7002);
        assert_no_tcp(&mesh, from, "a", 7003);
        assert_no_udp(&mesh, from, "a", 7001);
        assert_no_udp(&mesh, from, "a", 7003);
    }
    // d is in no rule: nothing enters a from it, though the path works (d -> b).
    assert!(pings(&mesh, "d", "b"), "ping d -> b (no policy) failed");
    assert_tcp(&mesh, "d", "b", 7001);
    assert!(!pings(&mesh, "d", "a"), "ping d -> a passed");
    assert_no_tcp(&mesh, "d", "a", 7001);
    assert_no_udp(&mesh, "d", "a", 7002);
}

/// Both a and b deny by default; each allows the other on one TCP and one UDP port.
/// Connections either way work, replies included (TCP, and UDP request/response over
/// one flow); ICMP, which neither allows, fails both ways; and a's own connections to
/// c (no policy) get their replies through a's default deny.
#[test]
fn replies_pass_both_ways_under_default_deny() {
    require_root!();
    let mesh = start_mesh(
        "acl_replies",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("c", 2, 1000, "10.3.0.0/24"),
        ],
        &[
            ("a", "VROUTER_DEFAULT_POLICY", "deny"),
            ("a", "VROUTER_ALLOW", "b:tcp/7101, b:udp/7102"),
            ("b", "VROUTER_DEFAULT_POLICY", "deny"),
            ("b", "VROUTER_ALLOW", "a:tcp/7103, a:udp/7104"),
        ],
    );
    mesh.wait_converged(CONVERGE).unwrap();
    wait_policy(&mesh, "a");
    wait_policy(&mesh, "b");

    assert_tcp(&mesh, "b", "a", 7101);
    assert_tcp(&mesh, "a", "b", 7103);
    let t = Duration::from_secs(8);
    assert_eq!(udp_answered(&mesh, "b", "a", 7102, 20, t), 20, "UDP b -> a");
    assert_eq!(udp_answered(&mesh, "a", "b", 7104, 20, t), 20, "UDP a -> b");
    // The policies are in force: what neither allows fails.
    assert!(!pings(&mesh, "a", "b"), "ping a -> b passed");
    assert!(!pings(&mesh, "b", "a"), "ping b -> a passed");
    assert_eq!(
        udp_answered(&mesh, "a", "b", 7102, 3, Duration::from_secs(3)),
        0,
        "UDP a -> b:7102 (b allows only 7104 from a) was answered"
    );
    // a's own connections out, to a stack without a policy.
    assert_tcp(&mesh, "a", "c", 7105);
    assert_eq!(udp_answered(&mesh, "a", "c", 7106, 20, t), 20, "UDP a -> c");
}

/// A TCP connection b -> a admitted by a's file policy survives a reload (the file
/// replaced by rename) that still allows it; a second one is cut by a reload (an edit
/// the watcher cannot see, behind a symlink, then SIGHUP) that no longer does, and no
/// new connection gets through, while the port the new policy allows does.
#[test]
fn live_connection_survives_allowing_reload_and_is_cut_by_denying_one() {
    require_root!();
    let dir = TempDir::new("reload");
    let path = dir.path("policy.toml");
    let v1 = policy_file("deny", &[("hold", "allow", "b:tcp/7201-7202")]);
    write_file_atomic(&path, &v1).unwrap();
    let file = path.display().to_string();
    let mut mesh = start_mesh(
        "acl_reload",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
        ],
        &[("a", "VROUTER_ACL_FILE", &file)],
    );
    mesh.wait_converged(CONVERGE).unwrap();
    wait_policy(&mesh, "a");
    assert_no_tcp(&mesh, "b", "a", 7203);

    // 1. Reload that keeps the connection allowed: the file replaced by a rename.
    let a = mesh.svc("a");
    let addr = format!("{}:7201", a.ip);
    let log = mesh.topo.log_dir().to_path_buf();
    let server = TcpServer::start(&a.ns, &addr, &log, Duration::from_secs(30)).unwrap();
    let max_stall = Duration::from_millis(1500);
    let mut hold = tcp_hold(
        &mesh.svc("b").ns,
        &addr,
        Duration::from_secs(8),
        max_stall,
        &log,
    )
    .unwrap();
    server.peer(Duration::from_secs(3)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let before = acl_table(&mesh, "a");
    let v2 = policy_file(
        "deny",
        &[
            ("hold", "allow", "b:tcp/7201-7202"),
            ("more", "allow", "b:tcp/7203"),
        ],
    );
    let t0 = Instant::now();
    write_file_atomic(&path, &v2).unwrap();
    assert!(
        wait_table_changed(&mesh, "a", &before),
        "the renamed file did not reach the kernel"
    );
    println!("reload (rename) in the kernel after {:?}", t0.elapsed());
    hold.wait_success(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("the allowed connection did not survive the reload: {e:#}"));
    drop(server);
    assert_tcp(&mesh, "b", "a", 7203);

    // 2. The path becomes a symlink to a file elsewhere (same policy), so that edits of
    // the target are invisible to a watcher of the path: only SIGHUP applies them.
    let target_dir = TempDir::new("reload-target");
    let target = target_dir.path("policy.toml");
    std::fs::write(&target, &v2).unwrap();
    let link_tmp = dir.path("policy.link");
    std::os::unix::fs::symlink(&target, &link_tmp).unwrap();
    let before = acl_table(&mesh, "a");
    std::fs::rename(&link_tmp, &path).unwrap();
    // It may reload the same policy (a new generation); let that settle.
    wait_table_changed(&mesh, "a", &before);
    std::thread::sleep(Duration::from_millis(500));

    let addr = format!("{}:7202", a.ip);
    let server = TcpServer::start(&a.ns, &addr, &log, Duration::from_secs(30)).unwrap();
    let mut hold = tcp_hold(
        &mesh.svc("b").ns,
        &addr,
        Duration::from_secs(12),
        max_stall,
        &log,
    )
    .unwrap();
    server.peer(Duration::from_secs(3)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(hold.is_running(), "the connection failed before the reload");
    let v3 = policy_file("deny", &[("more", "allow", "b:tcp/7203")]);
    let before = acl_table(&mesh, "a");
    std::fs::write(&target, &v3).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let seen_without_signal = acl_table(&mesh, "a") != before;
    println!("edit behind the symlink applied without SIGHUP: {seen_without_signal}");
    let before = acl_table(&mesh, "a");
    let t0 = Instant::now();
    mesh.router("a").kill(libc::SIGHUP).unwrap();
    if !seen_without_signal {
        assert!(
            wait_table_changed(&mesh, "a", &before),
            "SIGHUP did not reload the policy"
        );
        println!("reload (SIGHUP) in the kernel after {:?}", t0.elapsed());
    }
    let cut = hold.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(
        cut.is_some_and(|st| !st.success()),
        "the connection the new policy denies went on: {cut:?}\n{}",
        hold.logs()
    );
    drop(server);
    assert!(mesh.router("a").is_running(), "router a died on SIGHUP");
    assert_no_tcp(&mesh, "b", "a", 7202);
    assert_tcp(&mesh, "b", "a", 7203);
}

/// A rule naming stack b follows b's prefixes as host 1's configuration gives them: b
/// gains 10.12.0.0/24 (its service sends from an address there), then gives it up.
/// Datagrams from 10.12.0.5 arrive exactly while the prefix is b's; those from b's
/// subnet all along.
#[test]
fn rule_naming_a_stack_follows_its_prefixes() {
    require_root!();
    let mesh = start_mesh(
        "acl_follow",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24").announce("10.2.0.0/24,10.12.0.0/24"),
        ],
        &[
            ("a", "VROUTER_DEFAULT_POLICY", "deny"),
            ("a", "VROUTER_ALLOW", "b:udp/7301"),
        ],
    );
    mesh.wait_converged(CONVERGE).unwrap();
    wait_policy(&mesh, "a");
    let b = mesh.svc("b");
    let new_addr: Ipv4Addr = "10.12.0.5".parse().unwrap();
    b.exec_ok(&["ip", "addr", "add", "10.12.0.5/32", "dev", "eth0"])
        .unwrap();
    let a = mesh.svc("a");
    let a_ip = a.ip.to_string();
    let from = |bind: Option<Ipv4Addr>, n: u64, wait: Duration| {
        udp_delivered(&mesh, &b.ns, bind, &a.ns, &a_ip, 7301, n, 200, wait).0
    };
    let config = |prefixes: &[&str]| {
        let list: Vec<String> = prefixes.iter().map(|p| format!("\"{p}\"")).collect();
        let text = format!(
            "[[host]]\naddress = \"{}\"\n[[host.stack]]\nname = \"b\"\nvni = 1000\nprefixes = [{}]\nrouter_ip = \"10.2.0.254\"\n",
            mesh.topo.host(2).underlay_ip,
            list.join(", ")
        );
        write_file_atomic(&mesh.config_path(1), text).unwrap();
    };
    let has_route = |p: &str| mesh.router_routes("a").iter().any(|r| r == p);

    assert_eq!(from(None, 20, Duration::from_secs(3)), 20, "from 10.2.0.5");
    assert_eq!(
        from(Some(new_addr), 20, Duration::from_secs(1)),
        0,
        "from 10.12.0.5 before b announced it"
    );

    // b gains 10.12.0.0/24.
    config(&["10.2.0.0/24", "10.12.0.0/24"]);
    assert!(
        wait_until(APPLY, Duration::from_millis(50), || has_route(
            "10.12.0.0/24"
        )),
        "router a never routed b's new prefix: {:?}",
        mesh.router_routes("a")
    );
    let admitted = wait_until(APPLY, Duration::from_millis(200), || {
        from(Some(new_addr), 3, Duration::from_millis(500)) == 3
    });
    assert!(admitted, "b's new prefix never admitted");
    assert_eq!(from(Some(new_addr), 20, Duration::from_secs(3)), 20);
    assert_eq!(from(None, 20, Duration::from_secs(3)), 20, "from 10.2.0.5");

    // b gives 10.12.0.0/24 up again: its rights there go, those in 10.2.0.0/24 stay.
    config(&["10.2.0.0/24"]);
    assert!(
        wait_until(APPLY, Duration::from_millis(50), || !has_route(
            "10.12.0.0/24"
        )),
        "router a still routes b's old prefix: {:?}",
        mesh.router_routes("a")
    );
    let gone = wait_until(APPLY, Duration::from_millis(200), || {
        from(Some(new_addr), 3, Duration::from_millis(500)) == 0
    });
    assert!(gone, "b's old prefix still admitted");
    assert_eq!(
        from(Some(new_addr), 20, Duration::from_secs(1)),
        0,
        "from 10.12.0.5 after b gave the prefix up"
    );
    assert_eq!(from(None, 20, Duration::from_secs(3)), 20, "from 10.2.0.5");
}

/// Per-rule counters match the traffic exactly: 40 datagrams of 500 IP bytes admitted
/// by rule "from-b", 25 of 300 dropped by rule "no-c", 15 of 700 dropped by the
/// default, in the kernel's counters and in what the router publishes.
#[test]
fn per_rule_counters_match_the_packets_sent() {
    require_root!();
    let dir = TempDir::new("counters");
    let path = dir.path("policy.toml");
    write_file_atomic(
        &path,
        policy_file(
            "deny",
            &[
                ("from-b", "allow", "b:udp/7401"),
                ("no-c", "deny", "c:udp/7402"),
            ],
        ),
    )
    .unwrap();
    let file = path.display().to_string();
    let mesh = start_mesh(
        "acl_counters",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("c", 2, 1000, "10.3.0.0/24"),
            StackDef::new("d", 2, 1000, "10.4.0.0/24"),
        ],
        &[("a", "VROUTER_ACL_FILE", &file)],
    );
    mesh.wait_converged(CONVERGE).unwrap();
    wait_policy(&mesh, "a");

    // Rule ids follow the policy's order: 1 from-b, 2 no-c.
    let kernel = |mesh: &Mesh| {
        (
            accepted_by_rule(mesh, "a", 1),
            rule_counters(mesh, "a", |c| c.starts_with("acl 2 ")),
            rule_counters(mesh, "a", |c| c.starts_with("acl default")),
        )
    };
    let published_before = acl_published(&mesh);
    let file_before = acl_in_probes_file(&mesh);
    let k0 = kernel(&mesh);
    // (from, port, datagrams, IP bytes each)
    let flows: [(&str, u16, u64, u64); 3] = [
        ("b", 7401, 40, 500),
        ("c", 7402, 25, 300),
        ("d", 7403, 15, 700),
    ];
    let a = mesh.svc("a");
    let a_ip = a.ip.to_string();
    for (from, port, count, size) in flows {
        let wait = Duration::from_secs(if from == "b" { 5 } else { 1 });
        let got = udp_delivered(
            &mesh,
            &mesh.svc(from).ns,
            None,
            &a.ns,
            &a_ip,
            port,
            count,
            size,
            wait,
        );
        let want = if from == "b" {
            (count, count * size)
        } else {
            (0, 0)
        };
        assert_eq!(got, want, "{from} -> a:{port}: delivered");
    }
    let k1 = kernel(&mesh);
    let want = |i: usize| Count {
        packets: flows[i].2,
        bytes: flows[i].2 * flows[i].3,
    };
    println!("kernel counters before {k0:?}, after {k1:?}");
    assert_eq!(k1.0 - k0.0, want(0), "kernel: accepted by from-b");
    assert_eq!(k1.1 - k0.1, want(1), "kernel: dropped by no-c");
    assert_eq!(k1.2 - k0.2, want(2), "kernel: dropped by the default");

    // What the router publishes: its probes file, discovery's /v1/status and /metrics.
    let expect = [
        ("from-b", "accepted", want(0)),
        ("no-c", "dropped", want(1)),
        ("(default)", "dropped", want(2)),
        ("from-b", "dropped", Count::default()),
        ("no-c", "accepted", Count::default()),
    ];
    let matches = |before: &BTreeMap<(String, String), Count>,
                   now: &BTreeMap<(String, String), Count>| {
        expect.iter().all(|(rule, what, w)| {
            let key = (rule.to_string(), what.to_string());
            let b = before.get(&key).copied().unwrap_or_default();
            now.get(&key).is_some_and(|n| *n - b == *w)
        })
    };
    for (source, read) in [
        (
            "probes file",
            acl_in_probes_file as fn(&Mesh) -> BTreeMap<(String, String), Count>,
        ),
        ("/v1/status", acl_published),
    ] {
        let before = if source == "probes file" {
            &file_before
        } else {
            &published_before
        };
        let mut last = BTreeMap::new();
        let ok = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
            last = read(&mesh);
            matches(before, &last)
        });
        assert!(
            ok,
            "{source}: counters {last:#?} (before {before:#?}); want these deltas: {expect:?}"
        );
    }
    let metrics = http_get(&mesh.topo.host(1).ns, HTTP, "/metrics")
        .unwrap()
        .body;
    for (rule, verdict, w) in [
        ("from-b", "accepted", want(0)),
        ("no-c", "dropped", want(1)),
    ] {
        let find = |name: &str| {
            metrics
                .lines()
                .filter(|l| {
                    l.starts_with(&format!("{name}{{"))
                        && l.contains("local_stack=\"a\"")
                        && l.contains(&format!("rule=\"{rule}\""))
                        && l.contains(&format!("verdict=\"{verdict}\""))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .map(|v| v as u64)
                .next()
        };
        let before = published_before
            .get(&(rule.to_string(), verdict.to_string()))
            .copied()
            .unwrap_or_default();
        let p = find("vrouter_acl_packets_total");
        let b = find("vrouter_acl_bytes_total");
        assert_eq!(
            (p, b),
            (
                Some(before.packets + w.packets),
                Some(before.bytes + w.bytes)
            ),
            "/metrics for {rule} {verdict}"
        );
    }
}

/// Per (rule, accepted|dropped), stack a's counters as discovery's /v1/status shows
/// them (`acl[local_stack = a].rules[]`). Empty when there are none yet.
fn acl_published(mesh: &Mesh) -> BTreeMap<(String, String), Count> {
    let Ok(reply) = http_get(&mesh.topo.host(1).ns, HTTP, "/v1/status") else {
        return BTreeMap::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&reply.body) else {
        return BTreeMap::new();
    };
    let rules = v["acl"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["local_stack"].as_str() == Some("a"))
        .map(|a| a["rules"].clone())
        .unwrap_or_default();
    acl_rows(&rules)
}

/// The same from stack a's probes file (`acl` rows), as the router wrote it.
fn acl_in_probes_file(mesh: &Mesh) -> BTreeMap<(String, String), Count> {
    let path = mesh.state_dir(1).join("probes").join("a.json");
    let v: serde_json::Value = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    acl_rows(&v["acl"])
}

/// `[{rule, verdict, accepted_packets, accepted_bytes, dropped_packets, dropped_bytes}]`
/// as (rule, "accepted"|"dropped") -> counters.
fn acl_rows(rows: &serde_json::Value) -> BTreeMap<(String, String), Count> {
    let mut out = BTreeMap::new();
    for r in rows.as_array().into_iter().flatten() {
        let Some(rule) = r["rule"].as_str() else {
            continue;
        };
        for what in ["accepted", "dropped"] {
            out.insert(
                (rule.to_string(), what.to_string()),
                Count {
                    packets: r[format!("{what}_packets")].as_u64().unwrap_or(0),
                    bytes: r[format!("{what}_bytes")].as_u64().unwrap_or(0),
                },
            );
        }
    }
    out
}

/// What `ip monitor link` in a namespace saw first of the overlay link coming up, and
/// the ACL table at that moment.
struct LinkUpWatch {
    child: std::process::Child,
    result: std::sync::mpsc::Receiver<(String, Option<String>)>,
}

impl LinkUpWatch {
    /// Watches `ns` (before anything of the router runs in it): on the first event
    /// that shows an `ovl*` link up, reads the ACL table at once.
    fn start(ns: &str) -> LinkUpWatch {
        let mut child = Command::new("ip")
            .args(["-n", ns, "-o", "monitor", "link"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = ns.to_string();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let name = line.split(':').nth(1).unwrap_or("").trim();
                let flags = line
                    .split_once('<')
                    .and_then(|(_, r)| r.split_once('>'))
                    .map(|(f, _)| f)
                    .unwrap_or("");
                if name.starts_with("ovl") && flags.split(',').any(|f| f == "UP") {
                    let table = exec(Some(&ns), &["nft", "-s", "list", "table", "ip", TABLE])
                        .ok()
                        .filter(|o| o.success())
                        .map(|o| o.stdout);
                    let _ = tx.send((line, table));
                    break;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        LinkUpWatch { child, result: rx }
    }
}

impl Drop for LinkUpWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A router restarted the way `docker restart` does (a fresh namespace) has its ACL
/// table in the kernel before its overlay link comes up, and nothing of a flood of
/// denied datagrams from b, running all through the restart, reaches a's service; the
/// allowed port works afterwards.
#[test]
fn restarted_router_admits_nothing_before_its_policy() {
    require_root!();
    let mut mesh = start_mesh(
        "acl_restart",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
        ],
        &[
            ("a", "VROUTER_DEFAULT_POLICY", "deny"),
            ("a", "VROUTER_ALLOW", "b:udp/7501"),
        ],
    );
    mesh.wait_converged(CONVERGE).unwrap();
    wait_policy(&mesh, "a");
    assert_udp(&mesh, "b", "a", 7501);

    // A flood of denied datagrams, 1 every 500 us for 10 s, through the restart.
    let a = mesh.svc("a");
    let log = mesh.topo.log_dir().to_path_buf();
    let count = 20_000;
    let out = log.join("flood.out");
    let mut sink = UdpSink::start(&a.ns, 7502, count, &out, Duration::from_secs(16), &log).unwrap();
    let mut flood = udp_burst_opts(
        &mesh.svc("b").ns,
        &format!("{}:7502", a.ip),
        count,
        100,
        None,
        Some(500),
        &log,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));

    mesh.stop_router("a", libc::SIGTERM).unwrap();
    let s = mesh.stack("a").clone();
    let h = mesh.topo.host_mut(s.host);
    h.remove_container(s.name, "rtr").unwrap();
    let rtr = h
        .add_container(s.name, "rtr", &s.router_ip(), Role::Router)
        .unwrap();
    let watch = LinkUpWatch::start(&rtr.ns);
    mesh.start_router("a").unwrap();
    let (line, table) = watch
        .result
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| {
            mesh.dump_logs();
            panic!("the restarted router's overlay link never came up")
        });
    println!("overlay link up: {line}");
    assert!(
        table
            .as_deref()
            .is_some_and(|t| t.contains("chain forward")),
        "the overlay link came up before the ACL table was in the kernel: {table:?}"
    );
    mesh.wait_converged(CONVERGE).unwrap();
    wait_policy(&mesh, "a");

    flood.wait_success(Duration::from_secs(30)).unwrap();
    let (got, _) = sink.received(Duration::from_secs(20)).unwrap();
    assert_eq!(got, 0, "{got} denied datagrams of the flood entered a");
    assert_udp(&mesh, "b", "a", 7501);
}

/// A policy the kernel refuses (the debug builds' test hook: while the file
/// VROUTER_TEST_NFT_REFUSE_FILE names exists, policy tables are refused) leaves stack
/// a closed: nothing enters from the overlay, not even what the policy allows, the
/// healthcheck fails, and an event says why. Once the kernel takes policies again, a
/// new policy (the file replaced) goes in and the stack opens.
#[test]
fn refused_policy_leaves_the_stack_closed() {
    require_root!();
    let dir = TempDir::new("refuse");
    let refuse = dir.path("refuse");
    std::fs::write(&refuse, "refuse\n").unwrap();
    let path = dir.path("policy.toml");
    write_file_atomic(
        &path,
        policy_file(
            "deny",
            &[("udp", "allow", "b:udp/7601"), ("ping", "allow", "b:icmp")],
        ),
    )
    .unwrap();
    let (refuse_s, file) = (refuse.display().to_string(), path.display().to_string());
    let env = [
        ("VROUTER_ACL_FILE", file.as_str()),
        ("VROUTER_TEST_NFT_REFUSE_FILE", refuse_s.as_str()),
    ];
    let since = vrouter_state::now_ms();
    let mut mesh = start_mesh(
        "acl_refuse",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
        ],
        &env.map(|(k, v)| ("a", k, v)),
    );
    // b's side of the path is ready (b routes to a).
    assert!(
        mesh.wait_router_routes("b", &["a"], CONVERGE),
        "b never routed to a"
    );
    let link_up = |mesh: &Mesh| {
        exec(Some(&mesh.rtr("a").ns), &["ip", "link", "show", "ovl1000"])
            .is_ok_and(|o| o.success() && o.stdout.contains(",UP"))
    };
    let closed = wait_until(APPLY, Duration::from_millis(100), || {
        acl_table(&mesh, "a").is_some_and(|t| t.contains("acl closed")) || !link_up(&mesh)
    });
    assert!(
        closed,
        "router a is not closed: {:?}",
        acl_table(&mesh, "a")
    );
    let mut event = None;
    let said = wait_until(APPLY, Duration::from_millis(200), || {
        event = router_events(&mesh, "a", since)
            .into_iter()
            .find(|e| e.kind.as_str() == "acl_closed");
        event.is_some()
    });
    assert!(
        said,
        "no acl_closed event: {:#?}",
        router_events(&mesh, "a", since)
    );
    println!("event: {:?}", event.unwrap());
    let unhealthy = wait_until(APPLY, Duration::from_millis(200), || {
        !router_cmd(&mesh, "a", &env, &["healthcheck"]).success()
    });
    let hc = router_cmd(&mesh, "a", &env, &["healthcheck"]);
    assert!(
        unhealthy,
        "a closed router passes its healthcheck: {}",
        hc.stdout
    );
    println!("healthcheck: {}", hc.stderr.trim());
    assert!(
        mesh.router("a").is_running(),
        "router a exited instead of staying closed"
    );
    // Closed: what the policy allows does not enter either.
    assert!(
        !pings(&mesh, "b", "a"),
        "ping b -> a entered a closed stack"
    );
    assert_no_udp(&mesh, "b", "a", 7601);

    // The kernel takes policies again; a new one goes in.
    std::fs::remove_file(&refuse).unwrap();
    write_file_atomic(
        &path,
        policy_file(
            "deny",
            &[
                ("udp", "allow", "b:udp/7601"),
                ("ping", "allow", "b:icmp"),
                ("tcp", "allow", "b:tcp/7602"),
            ],
        ),
    )
    .unwrap();
    wait_policy(&mesh, "a");
    mesh.wait_converged(CONVERGE).unwrap();
    assert_udp(&mesh, "b", "a", 7601);
    assert_tcp(&mesh, "b", "a", 7602);
    assert!(
        pings(&mesh, "b", "a"),
        "ping b -> a after the policy went in"
    );
    let healthy = wait_until(APPLY, Duration::from_millis(200), || {
        router_cmd(&mesh, "a", &env, &["healthcheck"]).success()
    });
    assert!(
        healthy,
        "healthcheck still fails: {}",
        router_cmd(&mesh, "a", &env, &["healthcheck"]).stderr
    );
}

/// Forged sources. Stacks a and c allow b (UDP 7701), and b reaches both. a's service
/// sends to c from an address of b's: router a drops it (it leaves a's stack with a
/// source outside a's prefixes). c's router sends to a from an address of b's: router a
/// drops it on arrival (b's prefix comes only from b's router, by its MAC).
#[test]
fn forged_sources_are_dropped() {
    require_root!();
    let env: Vec<(&str, &str, &str)> = ["a", "c"]
        .into_iter()
        .flat_map(|s| {
            [
                (s, "VROUTER_DEFAULT_POLICY", "deny"),
                (s, "VROUTER_ALLOW", "b:udp/7701"),
            ]
        })
        .collect();
    let mesh = start_mesh(
        "acl_spoof",
        3,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("c", 3, 1000, "10.3.0.0/24"),
        ],
        &env,
    );
    mesh.wait_converged(CONVERGE).unwrap();
    wait_policy(&mesh, "a");
    wait_policy(&mesh, "c");
    assert_udp(&mesh, "b", "a", 7701);
    assert_udp(&mesh, "b", "c", 7701);
    let forged: Ipv4Addr = "10.2.0.77".parse().unwrap();
    let n = 30;

    // From a's service, to c, as b.
    let (a, c) = (mesh.svc("a"), mesh.svc("c"));
    a.exec_ok(&["ip", "addr", "add", "10.2.0.77/32", "dev", "lo"])
        .unwrap();
    let spoof_out = |m: &Mesh| rule_counters(m, "a", |c| c == "acl spoof-from-stack");
    let before = spoof_out(&mesh);
    let published = |rule: &str| {
        acl_in_probes_file(&mesh)
            .get(&(rule.to_string(), "dropped".to_string()))
            .copied()
            .unwrap_or_default()
    };
    let published_out = published("(spoof from stack)");
    let published_in = published("(spoof from overlay)");
    let got = udp_delivered(
        &mesh,
        &a.ns,
        Some(forged),
        &c.ns,
        &c.ip.to_string(),
        7701,
        n,
        200,
        Duration::from_secs(1),
    );
    assert_eq!(got.0, 0, "c received datagrams forged by a's service");
    assert_eq!(
        (spoof_out(&mesh) - before).packets,
        n,
        "router a's spoof-from-stack counter"
    );

    // From c's router, to a, as b (the wrong router MAC for b's prefix).
    // Another address of b's: a's service holds 10.2.0.77 now, and drops datagrams
    // from its own address as martians.
    let forged: Ipv4Addr = "10.2.0.78".parse().unwrap();
    let rc = mesh.rtr("c");
    rc.exec_ok(&["ip", "addr", "add", "10.2.0.78/32", "dev", "lo"])
        .unwrap();
    let spoof_in = |m: &Mesh| rule_counters(m, "a", |c| c == "acl spoof-from-overlay");
    let before = spoof_in(&mesh);
    let got = udp_delivered(
        &mesh,
        &rc.ns,
        Some(forged),
        &a.ns,
        &a.ip.to_string(),
        7701,
        n,
        200,
        Duration::from_secs(1),
    );
    assert_eq!(got.0, 0, "a received datagrams forged by c's router");
    assert_eq!(
        (spoof_in(&mesh) - before).packets,
        n,
        "router a's spoof-from-overlay counter"
    );
    // b itself still gets in.
    assert_udp(&mesh, "b", "a", 7701);
    // Router a publishes both drops (its probes file, rewritten every second).
    let ok = wait_until(Duration::from_secs(5), Duration::from_millis(200), || {
        (published("(spoof from stack)") - published_out).packets == n
            && (published("(spoof from overlay)") - published_in).packets == n
    });
    assert!(
        ok,
        "published spoof drops: from stack {:?} (before {published_out:?}), from overlay {:?} (before {published_in:?}); want {n} more each",
        published("(spoof from stack)"),
        published("(spoof from overlay)")
    );
}

/// Bad rules: at start, the router exits 2 with one line naming the setting, the rule
/// and the fix; on a reload, the event says so and the policy in force stays.
#[test]
fn bad_rules_are_refused_and_the_old_policy_stays() {
    require_root!();
    let dir = TempDir::new("bad");
    let path = dir.path("policy.toml");
    let file = path.display().to_string();
    let mut mesh = start_mesh(
        "acl_bad",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
        ],
        &[("a", "VROUTER_ALLOW", "b:tcp/0")],
    );
    let start_fails = |mesh: &mut Mesh, what: &str, needles: &[&str]| {
        let st = mesh.router("a").wait_exit(Duration::from_secs(10)).unwrap();
        let err = mesh.router("a").stderr();
        assert_eq!(
            st.and_then(|s| s.code()),
            Some(2),
            "{what}: the router did not exit 2: {err}"
        );
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{what}: want one line naming {needles:?}: {err}"
        );
        println!("{what}: {}", lines[0]);
        assert!(
            lines[0].len() <= 300,
            "{what}: the line is long: {}",
            lines[0]
        );
        assert!(
            acl_table(mesh, "a").is_none(),
            "{what}: a refused policy left a table"
        );
    };
    start_fails(
        &mut mesh,
        "VROUTER_ALLOW",
        &["VROUTER_ALLOW", "b:tcp/0", "port"],
    );

    mesh.set_router_env("a", "VROUTER_ALLOW", "");
    mesh.set_router_env("a", "VROUTER_DEFAULT_POLICY", "maybe");
    mesh.start_router("a").unwrap();
    start_fails(
        &mut mesh,
        "VROUTER_DEFAULT_POLICY",
        &["VROUTER_DEFAULT_POLICY", "maybe", "deny"],
    );

    std::fs::write(
        &path,
        "default = \"deny\"\n[[rule]]\nallow = \"b:udp/99999\"\n",
    )
    .unwrap();
    mesh.set_router_env("a", "VROUTER_DEFAULT_POLICY", "");
    mesh.set_router_env("a", "VROUTER_ACL_FILE", &file);
    mesh.start_router("a").unwrap();
    start_fails(
        &mut mesh,
        "VROUTER_ACL_FILE",
        &["VROUTER_ACL_FILE", "rule 1", "99999"],
    );

    // A good file, then a bad edit.
    write_file_atomic(
        &path,
        policy_file("deny", &[("web", "allow", "b:udp/7801")]),
    )
    .unwrap();
    mesh.start_router("a").unwrap();
    mesh.wait_converged(CONVERGE).unwrap();
    wait_policy(&mesh, "a");
    assert_udp(&mesh, "b", "a", 7801);
    assert_no_udp(&mesh, "b", "a", 7802);
    let table = acl_table(&mesh, "a");
    let since = vrouter_state::now_ms();
    write_file_atomic(
        &path,
        "default = \"deny\"\n[[rule]]\nname = \"web\"\nallow = \"b:udp/7801\"\n[[rule]]\nname = \"oops\"\nallow = \"b:tcpx/7802\"\n",
    )
    .unwrap();
    let mut event = None;
    let said = wait_until(APPLY, Duration::from_millis(200), || {
        event = router_events(&mesh, "a", since).into_iter().find(|e| {
            e.kind.as_str() == "acl_refused"
                && e.message.contains("oops")
                && e.message.contains("tcpx")
        });
        event.is_some()
    });
    assert!(
        said,
        "no event about the bad edit: {:#?}",
        router_events(&mesh, "a", since)
    );
    println!("event: {:?}", event.unwrap());
    assert!(mesh.router("a").is_running(), "router a died on a bad edit");
    assert_eq!(
        acl_table(&mesh, "a"),
        table,
        "the table changed on a bad edit"
    );
    assert_udp(&mesh, "b", "a", 7801);
    assert_no_udp(&mesh, "b", "a", 7802);
}
