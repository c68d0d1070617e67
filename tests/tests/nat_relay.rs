//! Issue 17 on simulated hosts: several underlay subnets, 1:1 and port-randomising NAT,
//! relays. The real discovery and router binaries, each with only CAP_NET_ADMIN, in
//! gossip mode; hosts behind a NAT have no `VROUTER_ADVERTISE_ADDR`. Every scenario
//! checks real traffic between stacks (pings and TCP between their services) and reads
//! discovery.json's `addresses`, `paths` and `relay` (CONTRACT.md). Measured times are
//! printed as `MEASURED:` lines (`--nocapture`).
//!
//! Stack `sN` is 10.N.0.0/24 on host N (router .254, service .5), VNI 1000. Hosts on the
//! core are 198.18.0.N; behind site S they are 192.168.S.N, a 1:1 NATed host's public
//! address is 198.18.0.(100+N), site S's NAT address 198.18.0.(200+S) (tests/src/nat.rs).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::Value;
use vrouter_tests::encryption::{ping_result, ping_run, set_encryption, status_text};
use vrouter_tests::gossip::{now_ms, one_stack_per_host, GossipMesh};
use vrouter_tests::nat::*;
use vrouter_tests::*;

const CONVERGE: Duration = Duration::from_secs(40);
const POLL: Duration = Duration::from_millis(100);

// ------------------------------------------------------------------------------------
// Helpers

/// Waits until `host`'s path entry for `of` satisfies `want`; the time it took and the
/// entry. Fails with the last entry seen.
fn wait_path(
    g: &GossipMesh,
    host: usize,
    of: usize,
    timeout: Duration,
    what: &str,
    want: impl Fn(&PathEntry) -> bool,
) -> (Duration, PathEntry) {
    let t = Instant::now();
    let mut last = None;
    let ok = wait_until(timeout, POLL, || {
        last = path_to(g, host, of);
        last.as_ref().is_some_and(&want)
    });
    assert!(
        ok,
        "host {host}'s path to host {of}: wanted {what} within {timeout:?}, last {last:?}\nall paths of host {host}: {:?}",
        paths(g, host)
    );
    (t.elapsed(), last.unwrap())
}

/// Waits until `host`'s discovery.json `addresses` satisfies `want`; the time it took.
fn wait_addresses(
    g: &GossipMesh,
    host: usize,
    timeout: Duration,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> (Duration, Value) {
    let t = Instant::now();
    let mut last = Value::Null;
    let ok = wait_until(timeout, POLL, || {
        last = addresses(g, host);
        want(&last)
    });
    assert!(
        ok,
        "host {host}'s addresses: wanted {what} within {timeout:?}, last {last}"
    );
    (t.elapsed(), last)
}

/// Stacks `a` and `b` reach each other: pings both ways (waiting up to `within` for the
/// first), then a TCP transfer each way. Returns the time until both pings answered.
fn assert_talk(
    g: &GossipMesh,
    a: &str,
    b: &str,
    within: Duration,
    port: u16,
    ctx: &str,
) -> Duration {
    let t = Instant::now();
    for (x, y) in [(a, b), (b, a)] {
        let left = within
            .saturating_sub(t.elapsed())
            .max(Duration::from_secs(1));
        assert!(
            g.wait_reachable(x, y, left).is_some(),
            "{ctx}: no ping from {x} to {y} within {within:?}"
        );
    }
    let took = t.elapsed();
    for (i, (x, y)) in [(a, b), (b, a)].into_iter().enumerate() {
        let mut err = String::new();
        let ok = wait_until(Duration::from_secs(10), POLL, || {
            match g.transfer(x, y, port + i as u16) {
                Ok(()) => true,
                Err(e) => {
                    err = e;
                    false
                }
            }
        });
        assert!(ok, "{ctx}: TCP {x} -> {y} failed: {err}");
    }
    took
}

/// The node id of `host`, waiting for discovery.json.
fn node_id(g: &GossipMesh, host: usize) -> String {
    let mut id = None;
    wait_until(CONVERGE, POLL, || {
        id = g.node_id(host);
        id.is_some()
    });
    id.unwrap_or_else(|| panic!("host {host} has no node id"))
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn print_paths(g: &GossipMesh, hosts: &[usize], ctx: &str) {
    for &h in hosts {
        let v: Vec<String> = paths(g, h)
            .iter()
            .map(|p| format!("{}={}", &p.node[..p.node.len().min(6)], p.brief()))
            .collect();
        eprintln!("{ctx}: host {h} paths {v:?}");
    }
}

/// Waits (up to 10 s: discovery reads the counters when it reconciles) until `host`'s
/// `relay.forwarded_packets` is above `before`; its last value.
fn wait_forwarded_above(g: &GossipMesh, host: usize, before: u64) -> u64 {
    let mut now = 0;
    wait_until(Duration::from_secs(10), POLL, || {
        now = relay_forwarded(g, host);
        now > before
    });
    now
}

/// Samples how hosts `a` and `b` see each other in gossip; remembers every state other
/// than `alive`.
struct AliveWatch {
    a: usize,
    b: usize,
    samples: u64,
    bad: Vec<String>,
}

impl AliveWatch {
    fn new(a: usize, b: usize) -> AliveWatch {
        AliveWatch {
            a,
            b,
            samples: 0,
            bad: Vec::new(),
        }
    }

    fn sample(&mut self, g: &GossipMesh, step: &str) {
        self.samples += 1;
        for (x, y) in [(self.a, self.b), (self.b, self.a)] {
            let s = g.member_state(x, y);
            if s.as_deref() != Some("alive") {
                self.bad
                    .push(format!("{step}: host {x} sees host {y} as {s:?}"));
            }
        }
    }

    /// [`wait_until`] that samples the membership at every poll.
    fn wait(
        &mut self,
        g: &GossipMesh,
        step: &str,
        timeout: Duration,
        mut f: impl FnMut() -> bool,
    ) -> bool {
        wait_until(timeout, POLL, || {
            self.sample(g, step);
            f()
        })
    }
}

/// Waits until `h`'s path to `o` is relayed through node `id`, sampling membership.
fn wait_relayed(
    watch: &mut AliveWatch,
    g: &NatMesh,
    h: usize,
    o: usize,
    id: &str,
    step: &str,
) -> PathEntry {
    let mut last = None;
    let ok = watch.wait(g, step, CONVERGE, || {
        last = path_to(g, h, o);
        last.as_ref()
            .is_some_and(|p| p.via == "relay" && p.relay_node.as_deref() == Some(id))
    });
    assert!(
        ok,
        "{step}: host {h} not relayed to {o} via {id}: {last:?}\n{}",
        g.net.describe()
    );
    last.unwrap()
}

/// Waits until `h`'s path to `o` is direct, sampling membership.
fn wait_direct(watch: &mut AliveWatch, g: &NatMesh, h: usize, o: usize) {
    let mut last = None;
    let ok = watch.wait(g, "unblocked 1-2", Duration::from_secs(20), || {
        last = path_to(g, h, o);
        last.as_ref().is_some_and(|p| p.via == "direct")
    });
    assert!(ok, "host {h} not direct to {o} after the unblock: {last:?}");
}

// ------------------------------------------------------------------------------------
// The harness itself

/// The simulated underlay before any daemon runs: a routed subnet reaches and is reached
/// at its own addresses, a 1:1 NATed host is seen and reached at its public address
/// only, a host behind `masquerade random` reaches out but is not reached, and UDP
/// blocks drop UDP (counted) but not ICMP, and go away again.
#[test]
fn nat_harness_sites_nat_and_blocks() {
    require_root!();
    let mut m = NatMesh::build("nat_harness", 4, Vec::new()).expect("hosts");
    let routed = m.add_site(SiteKind::Routed).unwrap();
    let one = m.add_site(SiteKind::OneToOne).unwrap();
    let masq = m.add_site(SiteKind::MasqueradeRandom).unwrap();
    m.attach(2, routed, false).unwrap();
    m.attach(3, one, true).unwrap();
    m.attach(4, masq, false).unwrap();
    let ns = |h: usize| m.topo.host(h).ns.clone();
    let addr = |h: usize| m.topo.host(h).underlay_ip.to_string();
    let public3 = m.net.public_ip(3).unwrap();
    assert_eq!(public3, ip("198.18.0.103"));
    assert_eq!(addr(2), "192.168.1.2");
    let t = Duration::from_secs(2);
    assert!(ping(&ns(1), &addr(2), 2, t), "core -> routed site");
    assert!(ping(&ns(2), &addr(1), 2, t), "routed site -> core");
    assert!(
        ping(&ns(1), &public3.to_string(), 2, t),
        "core -> 1:1 public"
    );
    assert!(
        !ping(&ns(1), &addr(3), 2, Duration::from_millis(800)),
        "1:1 private reachable"
    );
    assert!(ping(&ns(3), &addr(1), 2, t), "1:1 host -> core");
    assert!(ping(&ns(4), &addr(1), 2, t), "masquerade host -> core");
    assert!(
        ping(&ns(4), &addr(2), 2, t),
        "masquerade host -> routed site"
    );
    assert!(
        !ping(&ns(1), &addr(4), 2, Duration::from_millis(800)),
        "masqueraded private reachable"
    );
    let nat4 = m.net.site(masq).uplink_ip;

    // The source address the core sees.
    for (from, want) in [(2, ip(&addr(2))), (3, public3), (4, nat4)] {
        let server = TcpServer::start(
            &ns(1),
            "198.18.0.1:5100",
            m.topo.log_dir(),
            Duration::from_secs(5),
        )
        .unwrap();
        tcp_send(&ns(from), "198.18.0.1:5100", 1000, Duration::from_secs(5)).unwrap();
        let peer = server.peer(Duration::from_secs(2)).unwrap();
        assert_eq!(
            peer.ip(),
            std::net::IpAddr::V4(want),
            "host {from} seen from the core"
        );
        assert_eq!(m.net.seen_from_core(&m.topo, from), want);
    }

    // UDP blocks: between a routed host and the core, then a 1:1 host isolated.
    let udp_ok = |from: usize, to: usize, port: u16| -> bool {
        let echo =
            UdpEcho::start(&ns(to), port, 100, Duration::from_secs(5), m.topo.log_dir()).unwrap();
        let target = m.net.reachable_ip(&m.topo, to).unwrap();
        let r = udp_rr(
            &ns(from),
            &format!("{target}:{port}"),
            3,
            Duration::from_millis(1500),
        );
        drop(echo);
        matches!(r, Ok((_, a)) if a >= 3)
    };
    assert!(udp_ok(2, 1, 6001));
    m.block(1, 2).unwrap();
    assert!(!udp_ok(2, 1, 6002), "UDP passed the block");
    assert!(
        m.net.block_drops(1, 2) > 0,
        "block counted nothing\n{}",
        m.net.describe()
    );
    assert!(ping(&ns(2), &addr(1), 2, t), "the block dropped ICMP");
    assert!(udp_ok(3, 1, 6003), "block of 1-2 hit 3");
    m.unblock(1, 2).unwrap();
    assert_eq!(m.net.block_drops(1, 2), 0);
    assert!(udp_ok(2, 1, 6004), "UDP still blocked after unblock");
    m.net.isolate(3).unwrap();
    assert!(
        !udp_ok(3, 1, 6005) && !udp_ok(2, 3, 6006),
        "isolated host passed UDP"
    );
    assert!(m.net.isolate_drops(3) > 0);
    m.net.unisolate(3).unwrap();
    assert!(udp_ok(3, 1, 6007) && udp_ok(2, 3, 6008));
    // Inside a site: hosts 3 and another host of the same 1:1 site would meet on its
    // LAN; the block table is there too.
    assert!(exec_ok(
        Some(&m.net.site(one).ns),
        &["nft", "list", "table", "bridge", &m.net.block_table()]
    )
    .is_ok());
}

// ------------------------------------------------------------------------------------
// a. 1:1 NAT, no VROUTER_ADVERTISE_ADDR

/// Host 2 (H) behind a 1:1 NAT (public 198.18.0.102) without VROUTER_ADVERTISE_ADDR,
/// host 3 (I) inside the same NAT, host 1 (O) outside: H learns its public address as
/// observed, O uses the public address for H and I the private one, and the stacks on O
/// and I both reach H's stack and back.
#[test]
fn nat_one_to_one_inside_and_outside_peers() {
    require_root!();
    let mut m = NatMesh::build("nat_one_to_one", 3, one_stack_per_host(3)).expect("mesh");
    let site = m.add_site(SiteKind::OneToOne).unwrap();
    m.attach(2, site, true).unwrap();
    m.attach(3, site, false).unwrap();
    m.start_all().expect("start");
    let public = m.net.public_ip(2).unwrap().to_string();
    let private = m.topo.host(2).underlay_ip.to_string();
    let t0 = Instant::now();
    match m.wait_all_routes(CONVERGE) {
        Ok(t) => eprintln!("MEASURED: one_to_one routes complete after {t:?}"),
        Err(e) => panic!("{e:#}"),
    }
    let (t, a) = wait_addresses(&m, 2, CONVERGE, "observed = public", |a| {
        a["observed"].as_str() == Some(public.as_str())
    });
    eprintln!("MEASURED: one_to_one H observed {public} after {t:?} ({a})");
    assert_eq!(a["local"].as_str(), Some(private.as_str()), "{a}");
    assert_eq!(a["pinned"].as_bool(), Some(false), "{a}");
    assert_eq!(
        a["port_translated"].as_bool(),
        Some(false),
        "1:1 NAT keeps ports: {a}"
    );
    let (t, p) = wait_path(&m, 1, 2, CONVERGE, "direct at the public address", |p| {
        p.via == "direct" && p.addr_in_use == public
    });
    eprintln!("MEASURED: one_to_one O uses {public} for H after {t:?} more ({p:?})");
    let (_, p) = wait_path(&m, 3, 2, CONVERGE, "direct at the private address", |p| {
        p.via == "direct" && p.addr_in_use == private
    });
    eprintln!("one_to_one: I's path to H {p:?}");
    let t = assert_talk(&m, "s1", "s2", CONVERGE, 5201, "O <-> H");
    eprintln!("MEASURED: one_to_one O<->H pings after {t:?}");
    let t = assert_talk(&m, "s3", "s2", CONVERGE, 5203, "I <-> H");
    eprintln!("MEASURED: one_to_one I<->H pings after {t:?}");
    // The choice holds: still the public address for O, the private one for I.
    assert_eq!(
        path_to(&m, 1, 2).map(|p| p.addr_in_use),
        Some(public.clone())
    );
    assert_eq!(
        path_to(&m, 3, 2).map(|p| p.addr_in_use),
        Some(private.clone())
    );
    // The status shows H's addresses, and on O the public address in use for H.
    let st = status_text(&m, 2).expect("status on H");
    assert!(
        st.contains("ADDRESSES")
            && st.contains(&format!("observed: {public}"))
            && st.contains(&format!("local: {private}")),
        "H's status lacks its addresses:\n{st}"
    );
    let st = status_text(&m, 1).expect("status on O");
    let row = st
        .lines()
        .find(|l| l.starts_with(&private) && l.contains(&public))
        .unwrap_or_else(|| panic!("O's status has no path row for H at {public}:\n{st}"));
    assert!(row.contains("direct"), "{row}");
    eprintln!("MEASURED: one_to_one total {:?}", t0.elapsed());
}

// ------------------------------------------------------------------------------------
// b. masquerade random, encryption require

/// Host 2 (N) behind `masquerade random`, hosts 1 (O) and 3 (P) outside, encryption
/// `require` everywhere: N learns that its NAT translates ports, and O and N reach each
/// other's stacks (through the tunnels N keeps open from inside).
#[test]
fn nat_port_random_with_encryption() {
    require_root!();
    let mut m = NatMesh::build("nat_port_random_enc", 3, one_stack_per_host(3)).expect("mesh");
    let site = m.add_site(SiteKind::MasqueradeRandom).unwrap();
    m.attach(2, site, false).unwrap();
    for h in 1..=3 {
        set_encryption(&mut m.g.mesh, h, "require");
    }
    m.start_all().expect("start");
    let nat = m.net.site(site).uplink_ip.to_string();
    let (t, a) = wait_addresses(&m, 2, CONVERGE, "port_translated behind the NAT", |a| {
        a["port_translated"].as_bool() == Some(true) && a["observed"].as_str() == Some(nat.as_str())
    });
    eprintln!("MEASURED: port_random N port_translated after {t:?} ({a})");
    match m.wait_all_routes(CONVERGE) {
        Ok(t) => eprintln!("MEASURED: port_random routes complete after {t:?} more"),
        Err(e) => panic!("{e:#}"),
    }
    let t = assert_talk(&m, "s1", "s2", CONVERGE, 5211, "O <-> N");
    eprintln!("MEASURED: port_random O<->N pings after {t:?}");
    let t = assert_talk(&m, "s3", "s2", CONVERGE, 5213, "P <-> N");
    eprintln!("MEASURED: port_random P<->N pings after {t:?}");
    let p = path_to(&m, 1, 2).expect("O has a path to N");
    assert_eq!(p.via, "direct", "{p:?}");
    assert_eq!(p.addr_in_use, nat, "O sends to N's NAT: {p:?}");
}

// ------------------------------------------------------------------------------------
// c. relays, failover and return

/// Hosts 1..4, hosts 1 and 2 each in a routed subnet of its own, 3 and 4 on the core;
/// relay on 3 (and, once 1 and 2 are relayed through 3, on 4). All UDP between 1 and 2
/// blocked: their stacks talk through 3 (paths `relay` via 3's node id; 3's
/// forwarded_packets rise). 3 blocked from 1 and 2: they fail over to 4 within failure
/// detection + 2 s. 1 <-> 2 unblocked: they go direct. Gossip keeps 1 and 2 alive
/// members of each other all along.
#[test]
fn nat_relay_failover_and_return() {
    require_root!();
    let mut m = NatMesh::build("nat_relay_failover", 4, one_stack_per_host(4)).expect("mesh");
    let a = m.add_site(SiteKind::Routed).unwrap();
    let b = m.add_site(SiteKind::Routed).unwrap();
    m.attach(1, a, false).unwrap();
    m.attach(2, b, false).unwrap();
    m.set_discovery_env(3, "VROUTER_RELAY", "true");
    m.set_discovery_env(4, "VROUTER_RELAY", "true");
    m.set_join(1).unwrap();
    // Host 4 (the second relay) comes later.
    m.g.mesh_hosts = vec![1, 2, 3];
    for h in 1..=3 {
        m.start_discovery(h).unwrap();
    }
    for s in ["s1", "s2", "s3"] {
        m.start_router(s).unwrap();
    }
    match m.wait_full_mesh(CONVERGE) {
        Ok(t) => eprintln!("MEASURED: relay full mesh of 1..3 after {t:?}"),
        Err(e) => panic!("{e:#}"),
    }
    let id3 = node_id(&m, 3);
    assert_talk(&m, "s1", "s2", CONVERGE, 5221, "direct at start");
    for (h, o) in [(1, 2), (2, 1)] {
        wait_path(&m, h, o, CONVERGE, "direct", |p| p.via == "direct");
    }
    let mut watch = AliveWatch::new(1, 2);
    watch.sample(&m, "start");

    // Step 1: 1 <-> 2 blocked: through 3.
    let relay3_before = relay_forwarded(&m, 3);
    m.block(1, 2).unwrap();
    let t0 = Instant::now();
    let p12 = wait_relayed(&mut watch, &m, 1, 2, &id3, "blocked 1-2");
    let p21 = wait_relayed(&mut watch, &m, 2, 1, &id3, "blocked 1-2");
    let t_relay = t0.elapsed();
    eprintln!("MEASURED: relay paths via 3 after {t_relay:?} ({p12:?}; {p21:?})");
    assert_eq!(p12.relay_addr.as_deref(), Some("198.18.0.3"), "{p12:?}");
    let t = assert_talk(&m, "s1", "s2", CONVERGE, 5223, "through relay 3");
    eprintln!(
        "MEASURED: relay traffic through 3 {:?} after the block",
        t0.elapsed()
    );
    let _ = t;
    assert!(ping(
        &m.svc("s1").ns,
        &m.svc("s2").ip.to_string(),
        5,
        Duration::from_secs(3)
    ));
    let relay3_after = wait_forwarded_above(&m, 3, relay3_before);
    assert!(
        relay3_after > relay3_before,
        "relay 3 forwarded nothing: {} -> {} ({})",
        relay3_before,
        relay3_after,
        relay_json(&m, 3)
    );
    assert!(m.net.block_drops(1, 2) > 0, "the block dropped nothing");
    // The status on 1 shows the relay for 2's peer entry and its stack.
    let st = status_text(&m, 1).expect("status on 1");
    assert!(
        st.lines()
            .any(|l| l.starts_with("192.168.2.2") && l.contains("relayed via 198.18.0.3")),
        "host 1's status does not show 2 relayed via 3:\n{st}"
    );
    let r3 = relay_json(&m, 3);
    eprintln!("relay: host 3 relay section {r3}");
    assert_eq!(r3["offered"].as_bool(), Some(true), "{r3}");
    assert!(
        r3["vnis"]
            .as_array()
            .is_some_and(|v| v.iter().any(|x| x.as_u64() == Some(1000))),
        "{r3}"
    );

    // Host 4 joins as a second relay.
    let since_join = now_ms();
    m.g.mesh_hosts.push(4);
    m.start_discovery(4).unwrap();
    m.start_router("s4").unwrap();
    let ok = watch.wait(&m, "host 4 joins", CONVERGE, || {
        m.routes_gap().is_none()
            && relay_json(&m, 4)["offered"].as_bool() == Some(true)
            && [1, 2]
                .iter()
                .all(|&h| path_to(&m, 4, h).is_some_and(|p| p.via == "direct"))
    });
    assert!(
        ok,
        "host 4 did not join as a relay reaching 1 and 2: {}\n{:?}",
        relay_json(&m, 4),
        paths(&m, 4)
    );
    let id4 = node_id(&m, 4);
    // Let 4's offer spread. The hysteresis keeps relay 3 unless 4 scores under half of
    // it and 2 ms lower, which noisy RTTs on a loaded machine allow: the relay in use
    // from 1 to 2 now is the one to fail (the brief's "block 3" when it still is).
    watch.wait(&m, "host 4 joined", Duration::from_secs(4), || false);
    print_paths(&m, &[1, 2, 3, 4], "before failover");
    let in_use = path_to(&m, 1, 2).and_then(|p| p.relay_node);
    let (old, new, id_new) = if in_use.as_deref() == Some(id4.as_str()) {
        (4, 3, id3.clone())
    } else {
        assert_eq!(in_use.as_deref(), Some(id3.as_str()), "1 -> 2 not relayed");
        (3, 4, id4.clone())
    };
    let switches = m.events_of_kinds_since(&["path_relayed"], since_join).len();
    eprintln!("MEASURED: relay switches after host 4 joined: {switches} (failing relay {old})");

    // Step 2: the relay in use blocked from 1 and 2: fail over to the other. A ping
    // every 100 ms measures the outage.
    let svc1 = m.svc("s1");
    let s2ip = m.svc("s2").ip.to_string();
    let mut pinger = ping_run(
        &svc1.ns,
        &s2ip,
        200,
        Duration::from_millis(100),
        m.topo.log_dir(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let relay_new_before = relay_forwarded(&m, new);
    m.block(1, old).unwrap();
    m.block(2, old).unwrap();
    let t1 = Instant::now();
    let mut back = None;
    let ok = watch.wait(&m, "failover", Duration::from_secs(20), || {
        if back.is_none() && ping(&svc1.ns, &s2ip, 1, Duration::from_millis(300)) {
            back = Some(t1.elapsed());
        }
        back.is_some()
    });
    assert!(ok, "no traffic 1 -> 2 after {old} was blocked");
    let t_traffic = back.unwrap();
    let q12 = wait_relayed(&mut watch, &m, 1, 2, &id_new, "failover");
    let q21 = wait_relayed(&mut watch, &m, 2, 1, &id_new, "failover");
    let t_paths = t1.elapsed();
    let res = ping_result(&mut pinger, Duration::from_secs(30)).unwrap();
    let outage = Duration::from_millis(100) * res.longest_loss_run;
    eprintln!(
        "MEASURED: relay failover {old} -> {new}: traffic back after {t_traffic:?}, paths via {new} after {t_paths:?}, ping outage {outage:?} ({res:?})"
    );
    eprintln!("failover: {q12:?}; {q21:?}");
    assert!(
        t_traffic <= Duration::from_secs(6),
        "failover took {t_traffic:?} > 6 s"
    );
    assert!(outage <= Duration::from_secs(6), "outage {outage:?} > 6 s");
    assert_talk(
        &m,
        "s1",
        "s2",
        Duration::from_secs(10),
        5225,
        "through the second relay",
    );
    let relay_new_after = wait_forwarded_above(&m, new, relay_new_before);
    assert!(
        relay_new_after > relay_new_before,
        "relay {new} forwarded nothing ({})",
        relay_json(&m, new)
    );

    // Step 3: the direct path returns.
    let mut pinger = ping_run(
        &svc1.ns,
        &s2ip,
        150,
        Duration::from_millis(100),
        m.topo.log_dir(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    m.unblock(1, 2).unwrap();
    let t2 = Instant::now();
    wait_direct(&mut watch, &m, 1, 2);
    wait_direct(&mut watch, &m, 2, 1);
    let t_direct = t2.elapsed();
    let res = ping_result(&mut pinger, Duration::from_secs(30)).unwrap();
    eprintln!(
        "MEASURED: relay return to direct after {t_direct:?}; pings during it {res:?} (longest outage {:?})",
        Duration::from_millis(100) * res.longest_loss_run
    );
    assert!(
        t_direct <= Duration::from_secs(8),
        "return to direct took {t_direct:?} > 8 s"
    );
    assert_talk(
        &m,
        "s1",
        "s2",
        Duration::from_secs(10),
        5227,
        "direct again",
    );
    // Traffic really goes direct: with the first relay unblocked too (it reached 1 and
    // 2 through the other meanwhile), neither relay forwards a ping between 1 and 2.
    m.unblock(1, old).unwrap();
    m.unblock(2, old).unwrap();
    for (h, o) in [(old, 1), (old, 2), (1, 2), (2, 1)] {
        wait_direct(&mut watch, &m, h, o);
    }
    std::thread::sleep(Duration::from_secs(3));
    let (r3, r4) = (relay_forwarded(&m, 3), relay_forwarded(&m, 4));
    assert!(ping(&svc1.ns, &s2ip, 20, Duration::from_secs(5)));
    // Counters are read when discovery reconciles: give them time to show it.
    std::thread::sleep(Duration::from_secs(3));
    let (r3b, r4b) = (relay_forwarded(&m, 3), relay_forwarded(&m, 4));
    assert!(
        r3b < r3 + 10 && r4b < r4 + 10,
        "relays still forward after the return: 3 {r3} -> {r3b}, 4 {r4} -> {r4b}"
    );
    watch.sample(&m, "end");
    eprintln!(
        "MEASURED: relay membership samples {} with {} not alive",
        watch.samples,
        watch.bad.len()
    );
    assert!(
        watch.bad.is_empty(),
        "1 and 2 were not alive members of each other all along: {:?}",
        &watch.bad[..watch.bad.len().min(20)]
    );
}

// ------------------------------------------------------------------------------------
// d. both behind NAT, through a relay

/// Hosts 2 and 3 each behind its own `masquerade random` NAT, encryption `require`
/// everywhere, relay host 1 outside: the stacks on 2 and 3 reach each other through 1.
#[test]
fn nat_both_behind_nat_through_relay() {
    require_root!();
    let mut m = NatMesh::build("nat_both_behind", 3, one_stack_per_host(3)).expect("mesh");
    let s1 = m.add_site(SiteKind::MasqueradeRandom).unwrap();
    let s2 = m.add_site(SiteKind::MasqueradeRandom).unwrap();
    m.attach(2, s1, false).unwrap();
    m.attach(3, s2, false).unwrap();
    for h in 1..=3 {
        set_encryption(&mut m.g.mesh, h, "require");
    }
    m.set_discovery_env(1, "VROUTER_RELAY", "true");
    m.start_all().expect("start");
    let t0 = Instant::now();
    match m.wait_all_routes(CONVERGE) {
        Ok(t) => eprintln!("MEASURED: both_behind routes complete after {t:?}"),
        Err(e) => panic!("{e:#}"),
    }
    let id1 = node_id(&m, 1);
    for (h, o) in [(2, 3), (3, 2)] {
        let (t, p) = wait_path(&m, h, o, CONVERGE, "relay via host 1", |p| {
            p.via == "relay" && p.relay_node.as_deref() == Some(id1.as_str())
        });
        eprintln!("MEASURED: both_behind host {h} relayed to {o} via 1 after {t:?} more ({p:?})");
    }
    let before = relay_forwarded(&m, 1);
    let t = assert_talk(&m, "s2", "s3", CONVERGE, 5231, "2 <-> 3 through relay 1");
    eprintln!(
        "MEASURED: both_behind 2<->3 pings after {t:?} ({:?} since start)",
        t0.elapsed()
    );
    let after = wait_forwarded_above(&m, 1, before);
    assert!(
        after > before,
        "relay 1 forwarded nothing: {}",
        relay_json(&m, 1)
    );
    // The relay's own stack reaches both.
    assert_talk(&m, "s1", "s2", CONVERGE, 5233, "1 <-> 2");
    assert_talk(&m, "s1", "s3", CONVERGE, 5235, "1 <-> 3");
}

// ------------------------------------------------------------------------------------
// e. plain host behind masquerade random

/// Host 2 behind `masquerade random` without encryption, hosts 1 and 3 outside: 2 is
/// reported unreachable with code `nat_port_translated` and a `nat_port_translated`
/// event names the fix; its stack is indeed not reachable, while 1 and 3 talk.
#[test]
fn nat_port_random_plain_reported_unreachable() {
    require_root!();
    let mut m = NatMesh::build("nat_port_random_plain", 3, one_stack_per_host(3)).expect("mesh");
    let site = m.add_site(SiteKind::MasqueradeRandom).unwrap();
    m.attach(2, site, false).unwrap();
    let since = now_ms();
    m.start_all().expect("start");
    let (t, a) = wait_addresses(&m, 2, CONVERGE, "port_translated", |a| {
        a["port_translated"].as_bool() == Some(true)
    });
    eprintln!("MEASURED: plain port_translated after {t:?} ({a})");
    for o in [1, 3] {
        let (t, p) = wait_path(&m, o, 2, CONVERGE, "unreachable nat_port_translated", |p| {
            p.via == "unreachable" && p.code.as_deref() == Some("nat_port_translated")
        });
        eprintln!("MEASURED: plain host {o} reports host 2 unreachable after {t:?} ({p:?})");
    }
    let mut found = Vec::new();
    let ok = wait_until(Duration::from_secs(10), POLL, || {
        found = m.events_of_kinds_since(&["nat_port_translated"], since);
        !found.is_empty()
    });
    assert!(ok, "no nat_port_translated event on any host");
    for (h, e) in &found {
        eprintln!("plain: host {h} event {}: {}", e.kind, e.message);
    }
    assert!(
        found
            .iter()
            .any(|(_, e)| e.message.contains("VROUTER_ENCRYPTION")),
        "the event does not name the fix: {found:?}"
    );
    assert_talk(&m, "s1", "s3", CONVERGE, 5241, "1 <-> 3");
    // What is reported is true: 1 does not reach 2's stack.
    assert!(
        !ping(
            &m.svc("s1").ns,
            &m.svc("s2").ip.to_string(),
            3,
            Duration::from_secs(3)
        ),
        "host 2's stack answered although reported unreachable"
    );
}
