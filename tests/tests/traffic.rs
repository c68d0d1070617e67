//! End to end: the real daemons count the traffic a router forwards to and from each
//! remote stack (nftables counters in the router's namespace) and publish it in
//! `probes/<stack>.json`; discovery serves the stack's traffic in `/metrics` and
//! `/v1/status`.
//!
//! With port steering (the default) a stack with the default policy sends past its
//! router, straight into the tunnel: its router counts only what enters the stack (rx),
//! and discovery adds its steering counters to the router's tx. With
//! `VROUTER_STEERING=rule` the router forwards both directions and counts both.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use vrouter_state::{StackTraffic, StateDir};
use vrouter_tests::mesh::{Mesh, StackDef};
use vrouter_tests::steering::Steering;
use vrouter_tests::*;

const CONVERGE: Duration = Duration::from_secs(20);
/// What else router a may forward while the test runs, besides the test's datagrams.
/// Its own overlay and same-host probes are sent by the router itself (not forwarded),
/// so nothing is expected; the allowance covers a stray packet or two.
const OVERHEAD_PACKETS: u64 = 4;
const OVERHEAD_BYTES: u64 = OVERHEAD_PACKETS * 100;
const HTTP: &str = "127.0.0.1:9474";

/// Router a's counters toward/from `remote` as discovery's `/metrics` on host 1 shows
/// them: (tx packets, tx bytes, rx packets, rx bytes).
fn metrics_of_a(mesh: &Mesh, remote: &str) -> Option<(u64, u64, u64, u64)> {
    let reply = http_get(&mesh.topo.host(1).ns, HTTP, "/metrics").ok()?;
    let m = |name: &str, dir: &str| {
        metric(
            &reply.body,
            &format!(
                r#"vrouter_stack_traffic_{name}_total{{local_stack="a",remote_stack="{remote}",direction="{dir}"}}"#
            ),
        )
        .map(|v| v as u64)
    };
    Some((
        m("packets", "tx")?,
        m("bytes", "tx")?,
        m("packets", "rx")?,
        m("bytes", "rx")?,
    ))
}

/// The same from `/v1/status` (its `traffic` rows).
fn status_of_a(mesh: &Mesh, remote: &str) -> Option<(u64, u64, u64, u64)> {
    let reply = http_get(&mesh.topo.host(1).ns, HTTP, "/v1/status").ok()?;
    let v: serde_json::Value = serde_json::from_str(&reply.body).ok()?;
    let row = v["traffic"].as_array()?.iter().find(|r| {
        r["local_stack"].as_str() == Some("a") && r["remote_stack"].as_str() == Some(remote)
    })?;
    Some((
        row["tx_packets"].as_u64()?,
        row["tx_bytes"].as_u64()?,
        row["rx_packets"].as_u64()?,
        row["rx_bytes"].as_u64()?,
    ))
}

/// Stack a's view of its traffic, per remote stack, from host 1's probes file, and
/// when the file was written (ms since the epoch).
fn traffic_of_a_at(mesh: &Mesh) -> (BTreeMap<String, StackTraffic>, u64) {
    let dir = StateDir::open_readonly(&mesh.state_dir(1)).unwrap();
    dir.read_all_probes()
        .into_iter()
        .find(|f| f.stack.as_str() == "a")
        .map(|f| {
            let traffic = f
                .traffic
                .into_iter()
                .map(|t| (t.stack.to_string(), t))
                .collect();
            (traffic, f.updated_ms)
        })
        .unwrap_or_default()
}

fn traffic_of_a(mesh: &Mesh) -> BTreeMap<String, StackTraffic> {
    traffic_of_a_at(mesh).0
}

/// Stack a (host 1) exchanges fixed-size UDP datagrams with b (host 2) and c (host 3),
/// in different counts, all four flows at once, under port steering. Discovery's
/// counters for each remote stack and direction grow by N to N + overhead, where N is
/// counted in IP bytes; router a's own (probes file) count rx so, and no tx: a's
/// frames went past it.
#[test]
fn traffic_per_remote_stack_is_counted() {
    require_root!();
    traffic_counted("traffic", Steering::Ports);
}

/// The same on the policy-rule path (`VROUTER_STEERING=rule`): router a forwards both
/// directions, and its own counters grow by N to N + overhead both ways.
#[test]
fn traffic_per_remote_stack_is_counted_in_rule_mode() {
    require_root!();
    traffic_counted("traffic_rule", Steering::Rule);
}

fn traffic_counted(test: &str, mode: Steering) {
    let mesh = Mesh::start_with_steering(
        test,
        3,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
            StackDef::new("c", 3, 1000, "10.3.0.0/24"),
        ],
        mode,
    )
    .expect("mesh starts");
    mesh.wait_converged(CONVERGE).unwrap();
    if mode == Steering::Ports {
        mesh.wait_ports_steered(Duration::from_secs(10)).unwrap();
    }
    // Warm the paths (neighbours, the hosts' redirects) before the baseline.
    for to in ["b", "c"] {
        assert!(
            ping(
                &mesh.svc("a").ns,
                &mesh.svc(to).ip.to_string(),
                3,
                Duration::from_secs(5)
            ),
            "ping a -> {to}"
        );
    }
    // Both remote stacks are counted (counters exist) before the baseline is taken.
    let ok = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let t = traffic_of_a(&mesh);
        t.contains_key("b") && t.contains_key("c")
    });
    if !ok {
        mesh.dump_logs();
        panic!("no traffic counters for b and c in probes/a.json");
    }
    // The baseline must include the warm-up: counters are read every second and the
    // file written every second, so a file written 1.1 s after now has read them after
    // now.
    let settled = vrouter_state::now_ms() + 1100;
    let mut before = BTreeMap::new();
    let ok = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let (t, updated) = traffic_of_a_at(&mesh);
        before = t;
        updated >= settled
    });
    assert!(ok, "probes/a.json is not rewritten");

    // Discovery's own baselines (its tx adds the steering counters to the router's):
    // taken once it serves the settled probes file (the same rx).
    type Reader = fn(&Mesh, &str) -> Option<(u64, u64, u64, u64)>;
    let readers: [(&str, Reader); 2] = [("/metrics", metrics_of_a), ("/v1/status", status_of_a)];
    let mut served_before = BTreeMap::new();
    for (what, read) in readers {
        for stack in ["b", "c"] {
            let b = &before[stack];
            let mut last = None;
            let ok = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
                last = read(&mesh, stack);
                last.is_some_and(|c| c.2 == b.rx_packets && c.3 == b.rx_bytes)
            });
            assert!(
                ok,
                "{what}: a <-> {stack} shows {last:?}, not the probes file's rx {b:?}"
            );
            served_before.insert((what, stack), last.unwrap());
        }
    }

    // (from, to, port, datagrams, IP bytes each)
    let flows: [(&str, &str, u16, u64, u64); 4] = [
        ("a", "b", 7601, 40, 500),
        ("a", "c", 7602, 70, 1200),
        ("b", "a", 7603, 25, 300),
        ("c", "a", 7604, 15, 700),
    ];
    let log_dir = mesh.topo.log_dir().to_path_buf();
    let mut sinks: Vec<UdpSink> = flows
        .iter()
        .map(|(_, to, port, count, _)| {
            let out = log_dir.join(format!("sink-{port}.out"));
            UdpSink::start(
                &mesh.svc(to).ns,
                *port,
                *count,
                &out,
                Duration::from_secs(20),
                &log_dir,
            )
            .unwrap()
        })
        .collect();
    let mut senders: Vec<Daemon> = flows
        .iter()
        .map(|(from, to, port, count, size)| {
            let dst = format!("{}:{port}", mesh.svc(to).ip);
            udp_burst(&mesh.svc(from).ns, &dst, *count, *size, &log_dir).unwrap()
        })
        .collect();
    for s in &mut senders {
        s.wait_success(Duration::from_secs(20)).unwrap();
    }
    for (sink, (from, to, _, count, size)) in sinks.iter_mut().zip(flows.iter()) {
        assert_eq!(
            sink.wait(Duration::from_secs(20)).unwrap(),
            (*count, count * size),
            "{from} -> {to}: every datagram arrives"
        );
    }

    // Expected growth of a's counters: tx toward b and c, rx from them.
    let want = |stack: &str| {
        let tx = flows.iter().find(|f| f.0 == "a" && f.1 == stack).unwrap();
        let rx = flows.iter().find(|f| f.0 == stack && f.1 == "a").unwrap();
        (tx.3, tx.3 * tx.4, rx.3, rx.3 * rx.4)
    };
    let delta = |now: &BTreeMap<String, StackTraffic>, stack: &str| {
        let (n, b) = (&now[stack], &before[stack]);
        (
            n.tx_packets - b.tx_packets,
            n.tx_bytes - b.tx_bytes,
            n.rx_packets - b.rx_packets,
            n.rx_bytes - b.rx_bytes,
        )
    };
    let at_least = |d: (u64, u64, u64, u64), w: (u64, u64, u64, u64)| {
        d.0 >= w.0 && d.1 >= w.1 && d.2 >= w.2 && d.3 >= w.3
    };
    // What router a itself forwards: both directions on the policy-rule path, only
    // what enters its stack (rx) under port steering.
    let router_sees = |stack: &str| {
        let w = want(stack);
        match mode {
            Steering::Rule => w,
            Steering::Ports => (0, 0, w.2, w.3),
        }
    };
    // The file is rewritten about once a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    let now = loop {
        let now = traffic_of_a(&mesh);
        if ["b", "c"]
            .iter()
            .all(|s| now.contains_key(*s) && at_least(delta(&now, s), router_sees(s)))
        {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "counters did not reach the sent traffic: before {before:#?}, now {now:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for stack in ["b", "c"] {
        let (d, w) = (delta(&now, stack), router_sees(stack));
        println!("probes file a <-> {stack}: counted (tx pkts, tx bytes, rx pkts, rx bytes) {d:?}, router forwarded {w:?}");
        assert!(
            d.0 <= w.0 + OVERHEAD_PACKETS
                && d.1 <= w.1 + OVERHEAD_BYTES
                && d.2 <= w.2 + OVERHEAD_PACKETS
                && d.3 <= w.3 + OVERHEAD_BYTES,
            "probes file a <-> {stack}: counted {d:?}, router forwarded {w:?}, more than the overhead allows"
        );
    }

    // Discovery's /metrics and /v1/status carry the stack's traffic (the router's
    // counters, plus the steering counters for tx under port steering): each lands
    // between the sent traffic and the sent traffic plus the overhead, over the
    // baseline.
    for (what, read) in readers {
        for stack in ["b", "c"] {
            let b = served_before[&(what, stack)];
            let w = want(stack);
            let mut last = None;
            let ok = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
                last = read(&mesh, stack);
                last.is_some_and(|c| {
                    let d = (
                        c.0.saturating_sub(b.0),
                        c.1.saturating_sub(b.1),
                        c.2.saturating_sub(b.2),
                        c.3.saturating_sub(b.3),
                    );
                    at_least(d, w)
                        && d.0 <= w.0 + OVERHEAD_PACKETS
                        && d.1 <= w.1 + OVERHEAD_BYTES
                        && d.2 <= w.2 + OVERHEAD_PACKETS
                        && d.3 <= w.3 + OVERHEAD_BYTES
                })
            });
            println!("{what} a <-> {stack}: {last:?} (baseline {b:?}, sent {w:?})");
            assert!(
                ok,
                "{what}: a <-> {stack} shows {last:?}; baseline {b:?}, sent {w:?}"
            );
        }
    }
}
