//! `/metrics`: the [`Status`] rendered as Prometheus text (OpenMetrics exposition,
//! through the prometheus-client crate). A fresh registry per scrape, filled from the
//! status, so the numbers are the ones `/v1/status` shows; only the reconcile-duration
//! histogram lives across scrapes, in the daemon.

use crate::status::Status;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;
type GaugeF = Gauge<f64, AtomicU64>;

/// The reconcile-duration histogram: 1 ms to about 16 s.
pub fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Renders the status (and, in the daemon, the reconcile histogram).
pub fn render(s: &Status, reconcile: Option<&Histogram>) -> String {
    let mut reg = Registry::default();

    let peers = Family::<Labels, Gauge>::default();
    for (state, n) in &s.peers_by_state {
        peers.get_or_create(&l(&[("state", state)])).set(*n as i64);
    }
    reg.register("vrouter_peers", "Remote hosts by state", peers);

    let tunnels = Gauge::<i64>::default();
    tunnels.set(s.tunnels as i64);
    reg.register(
        "vrouter_tunnels",
        "VXLAN tunnels: (VNI, remote host) pairs carrying published routes",
        tunnels,
    );

    let desired = Family::<Labels, Gauge>::default();
    let installed = Family::<Labels, Gauge>::default();
    let router_drift = Family::<Labels, Counter>::default();
    for r in &s.routes {
        let stack = l(&[("stack", r.stack.as_str())]);
        desired.get_or_create(&stack).set(r.desired as i64);
        if let Some(i) = r.installed {
            installed.get_or_create(&stack).set(i as i64);
        }
        if let Some(d) = r.router_drift_repaired {
            router_drift
                .get_or_create(&l(&[("component", "router"), ("stack", r.stack.as_str())]))
                .inc_by(d);
        }
    }
    reg.register(
        "vrouter_routes_desired",
        "Remote routes routes.json gives each local stack",
        desired,
    );
    reg.register(
        "vrouter_routes_installed",
        "Remote routes installed in each local router's namespace, as the router reports",
        installed,
    );
    router_drift
        .get_or_create(&l(&[("component", "discovery")]))
        .inc_by(s.drift_repairs);
    reg.register(
        "vrouter_drift_repairs",
        "Kernel entries found drifted and repaired (discovery's host state, each router's namespace)",
        router_drift,
    );

    if let Some(g) = &s.gossip {
        let packets = Family::<Labels, Counter>::default();
        packets
            .get_or_create(&l(&[("direction", "rx")]))
            .inc_by(g.packets_in);
        packets
            .get_or_create(&l(&[("direction", "tx")]))
            .inc_by(g.packets_out);
        reg.register("vrouter_gossip_packets", "Gossip packets", packets);
        let bytes = Family::<Labels, Counter>::default();
        bytes
            .get_or_create(&l(&[("direction", "rx")]))
            .inc_by(g.bytes_in);
        bytes
            .get_or_create(&l(&[("direction", "tx")]))
            .inc_by(g.bytes_out);
        reg.register("vrouter_gossip_bytes", "Gossip bytes (sealed)", bytes);
        let rejected = Family::<Labels, Counter>::default();
        for (reason, n) in &g.rejected {
            rejected.get_or_create(&l(&[("reason", reason)])).inc_by(*n);
        }
        reg.register(
            "vrouter_gossip_rejected",
            "Gossip packets dropped, by reason",
            rejected,
        );
    }

    let refused = Gauge::<i64>::default();
    refused.set(s.refused.len() as i64);
    reg.register(
        "vrouter_refused_prefixes",
        "Prefixes or stacks refused (overlap, default route, host network, name clash, cap)",
        refused,
    );

    let bytes = Family::<Labels, Counter>::default();
    let packets = Family::<Labels, Counter>::default();
    let rtt = Family::<Labels, GaugeF>::default();
    let loss = Family::<Labels, GaugeF>::default();
    let reachable = Family::<Labels, Gauge>::default();
    let mtu_ok = Family::<Labels, Gauge>::default();
    for t in &s.traffic {
        let pair = [
            ("local_stack", t.local_stack.as_str()),
            ("remote_stack", t.remote_stack.as_str()),
        ];
        for (dir, b, p) in [
            ("tx", t.tx_bytes, t.tx_packets),
            ("rx", t.rx_bytes, t.rx_packets),
        ] {
            let mut labels = l(&pair);
            labels.push(("direction".into(), dir.into()));
            if let Some(b) = b {
                bytes.get_or_create(&labels).inc_by(b);
            }
            if let Some(p) = p {
                packets.get_or_create(&labels).inc_by(p);
            }
        }
        let labels = l(&pair);
        if let Some(us) = t.rtt_us {
            rtt.get_or_create(&labels).set(us as f64 / 1e6);
        }
        if let Some(x) = t.loss {
            loss.get_or_create(&labels).set(x);
        }
        reachable.get_or_create(&labels).set(i64::from(t.reachable));
        if let Some(ok) = t.mtu_ok {
            mtu_ok.get_or_create(&labels).set(i64::from(ok));
        }
    }
    reg.register(
        "vrouter_stack_traffic_bytes",
        "IP bytes forwarded between a local and a remote stack (tx: toward the remote stack)",
        bytes,
    );
    reg.register(
        "vrouter_stack_traffic_packets",
        "Packets forwarded between a local and a remote stack (tx: toward the remote stack)",
        packets,
    );
    // The same family holds each gossip peer's path probe RTT, by node (through its
    // relay when relayed).
    for p in s.paths.iter().flatten() {
        if let Some(ms) = p.rtt_ms {
            rtt.get_or_create(&l(&[("node", &p.node)])).set(ms / 1000.0);
        }
    }
    reg.register(
        "vrouter_peer_rtt_seconds",
        "Smoothed overlay probe round-trip time to a remote stack's router (local_stack, remote_stack), or path probe round-trip time to a gossip peer host (node)",
        rtt,
    );
    reg.register(
        "vrouter_peer_loss_ratio",
        "Recent overlay probe loss to a remote stack's router (0..1)",
        loss,
    );
    reg.register(
        "vrouter_peer_reachable",
        "1 if the remote stack's router answered overlay probes recently",
        reachable,
    );
    reg.register(
        "vrouter_peer_mtu_ok",
        "1 if a probe of the full overlay MTU passed at the last path-MTU check",
        mtu_ok,
    );

    let acl_packets = Family::<Labels, Counter>::default();
    let acl_bytes = Family::<Labels, Counter>::default();
    let acl_closed = Family::<Labels, Gauge>::default();
    for a in &s.acl {
        for r in &a.rules {
            for (verdict, packets, bytes) in [
                ("accepted", r.accepted_packets, r.accepted_bytes),
                ("dropped", r.dropped_packets, r.dropped_bytes),
            ] {
                let labels = l(&[
                    ("local_stack", a.local_stack.as_str()),
                    ("rule", &r.rule),
                    ("verdict", verdict),
                ]);
                acl_packets.get_or_create(&labels).inc_by(packets);
                acl_bytes.get_or_create(&labels).inc_by(bytes);
            }
        }
        if let Some(state) = &a.state {
            acl_closed
                .get_or_create(&l(&[("local_stack", a.local_stack.as_str())]))
                .set(i64::from(state.closed.is_some()));
        }
    }
    reg.register(
        "vrouter_acl_packets",
        "Packets per access rule of a local stack: accepted (every packet of the connections the rule admitted; under the default policy's stateless table, every packet entering the stack) or dropped",
        acl_packets,
    );
    reg.register(
        "vrouter_acl_bytes",
        "IP bytes per access rule of a local stack: accepted or dropped",
        acl_bytes,
    );
    reg.register(
        "vrouter_acl_closed",
        "1 while a local stack's access policy is not installed and nothing enters it from the overlay",
        acl_closed,
    );

    if let Some(st) = &s.steering {
        let port_packets = Family::<Labels, Counter>::default();
        let port_bytes = Family::<Labels, Counter>::default();
        let mode = Family::<Labels, Gauge>::default();
        for r in &st.stacks {
            for p in &r.ports {
                let labels = l(&[("local_stack", r.local_stack.as_str()), ("port", &p.port)]);
                port_packets.get_or_create(&labels).inc_by(p.packets);
                port_bytes.get_or_create(&labels).inc_by(p.bytes);
            }
            for (m, name) in [
                (vrouter_state::SteeringMode::Ports, "ports"),
                (vrouter_state::SteeringMode::Rule, "rule"),
            ] {
                mode.get_or_create(&l(&[
                    ("local_stack", r.local_stack.as_str()),
                    ("mode", name),
                ]))
                .set(i64::from(r.mode == m));
            }
        }
        reg.register(
            "vrouter_steering_port_packets",
            "Frames a service port's steering chain sent toward remote stacks, per local stack and port",
            port_packets,
        );
        reg.register(
            "vrouter_steering_port_bytes",
            "Bytes (L3) a service port's steering chain sent toward remote stacks, per local stack and port",
            port_bytes,
        );
        reg.register(
            "vrouter_steering_mode",
            "1 for the steering mode a local stack runs in (ports or rule)",
            mode,
        );
    }

    if let Some(e) = &s.encryption {
        let mode = Family::<Labels, Gauge>::default();
        mode.get_or_create(&l(&[("mode", e.mode.as_str())])).set(1);
        reg.register(
            "vrouter_encryption_mode",
            "1 for this host's VROUTER_ENCRYPTION (off, require or prefer)",
            mode,
        );
        let backend = Family::<Labels, Gauge>::default();
        if let Some(b) = &e.backend {
            backend.get_or_create(&l(&[("backend", b)])).set(1);
        }
        reg.register(
            "vrouter_wg_backend",
            "1 for the WireGuard implementation in use (kernel or userspace)",
            backend,
        );
        let rx = Family::<Labels, Counter>::default();
        let tx = Family::<Labels, Counter>::default();
        let age = Family::<Labels, GaugeF>::default();
        let encrypted = Family::<Labels, Gauge>::default();
        for p in &e.peers {
            let host = l(&[("host", &p.host.to_string())]);
            encrypted
                .get_or_create(&host)
                .set(i64::from(p.state == "encrypted"));
            if p.state != "encrypted" {
                continue;
            }
            rx.get_or_create(&host).inc_by(p.rx_bytes);
            tx.get_or_create(&host).inc_by(p.tx_bytes);
            if let Some(a) = p.last_handshake_age_s {
                age.get_or_create(&host).set(a);
            }
        }
        reg.register(
            "vrouter_wg_peer_rx_bytes",
            "Bytes received from a peer host through WireGuard",
            rx,
        );
        reg.register(
            "vrouter_wg_peer_tx_bytes",
            "Bytes sent to a peer host through WireGuard",
            tx,
        );
        reg.register_with_unit(
            "vrouter_wg_peer_handshake_age",
            "Age of the latest WireGuard handshake with a peer host",
            Unit::Seconds,
            age,
        );
        reg.register(
            "vrouter_wg_peer_encrypted",
            "1 when traffic to a peer host goes through WireGuard, 0 when plain or refused",
            encrypted,
        );
    }

    if let Some(r) = &s.relay {
        let offered = Gauge::<i64>::default();
        offered.set(i64::from(r.offered));
        reg.register(
            "vrouter_relay_offered",
            "1 when this host offers to relay (VROUTER_RELAY=true)",
            offered,
        );
        let bytes = Family::<Labels, Counter>::default();
        let packets = Family::<Labels, Counter>::default();
        for v in &r.per_vni {
            let vni = l(&[("vni", &v.vni.to_string())]);
            bytes.get_or_create(&vni).inc_by(v.bytes);
            packets.get_or_create(&vni).inc_by(v.packets);
        }
        reg.register(
            "vrouter_relay_forwarded_bytes",
            "Bytes (inner frames) this relay forwarded between two other hosts, per VNI",
            bytes,
        );
        reg.register(
            "vrouter_relay_forwarded_packets",
            "Frames this relay forwarded between two other hosts, per VNI",
            packets,
        );
    }
    if let Some(paths) = &s.paths {
        let via = Family::<Labels, Gauge>::default();
        for p in paths {
            via.get_or_create(&l(&[("node", &p.node), ("via", &p.via)]))
                .set(1);
        }
        reg.register(
            "vrouter_peer_path",
            "1 for the way traffic to a gossip peer takes: direct, relay or unreachable",
            via,
        );
    }
    if let Some(a) = &s.addresses {
        let info = Family::<Labels, Gauge>::default();
        if let Some(o) = a.observed {
            info.get_or_create(&l(&[("address", &o.to_string())]))
                .set(1);
        }
        reg.register(
            "vrouter_observed_address_info",
            "1 for the address peers see this host at, when it differs from the local one (NAT)",
            info,
        );
    }

    if let Some(live) = &s.live {
        let ready = Gauge::<i64>::default();
        ready.set(i64::from(live.ready));
        reg.register(
            "vrouter_ready",
            "1 when /readyz answers 200: datapath programmed and state files current",
            ready,
        );
        let runs = Family::<Labels, Counter>::default();
        runs.get_or_create(&l(&[("result", "ok")]))
            .inc_by(live.reconciles.saturating_sub(live.reconcile_errors));
        runs.get_or_create(&l(&[("result", "error")]))
            .inc_by(live.reconcile_errors);
        reg.register("vrouter_reconciles", "Reconciles run, by result", runs);
    }
    if let Some(h) = reconcile {
        reg.register_with_unit(
            "vrouter_reconcile_duration",
            "Duration of one reconcile",
            Unit::Seconds,
            h.clone(),
        );
    }

    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tests::{discovery, probes, routes, NOW};
    use crate::status::{build, LiveFacts};

    /// The value of one series, by its exact name and labels as rendered.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn paths_relay_and_addresses_metrics_and_status_text() {
        let mut d = discovery();
        let h3: std::net::Ipv4Addr = "198.18.0.3".parse().unwrap();
        let relay: std::net::Ipv4Addr = "198.18.0.9".parse().unwrap();
        d.addresses = Some(vrouter_state::AddressesStatus {
            local: "198.18.0.1".parse().unwrap(),
            observed: Some("203.0.113.5".parse().unwrap()),
            advertised: "198.18.0.1".parse().unwrap(),
            pinned: false,
            port_translated: false,
        });
        d.paths = Some(vec![vrouter_state::PathStatus {
            node: "00000000000000d3".into(),
            peer_addr: h3,
            addr_in_use: h3,
            via: "relay".into(),
            relay_node: Some("00000000000000d9".into()),
            relay_addr: Some(relay),
            rtt_ms: Some(4.0),
            since_ms: 10,
            code: None,
        }]);
        let vni = vrouter_state::Vni::new(1000).unwrap();
        d.relay = Some(vrouter_state::RelayStatus {
            offered: true,
            vnis: vec![vni],
            forwarded_packets: 7,
            forwarded_bytes: 700,
            per_vni: vec![vrouter_state::RelayVni {
                vni,
                packets: 7,
                bytes: 700,
            }],
        });
        let s = build(
            &d,
            Some(&routes()),
            &probes(),
            None,
            &Default::default(),
            NOW,
        );
        let text = render(&s, None);
        for (series, want) in [
            ("vrouter_relay_offered", 1.0),
            (r#"vrouter_relay_forwarded_bytes_total{vni="1000"}"#, 700.0),
            (r#"vrouter_relay_forwarded_packets_total{vni="1000"}"#, 7.0),
            (
                r#"vrouter_peer_path{node="00000000000000d3",via="relay"}"#,
                1.0,
            ),
            (
                r#"vrouter_peer_rtt_seconds{node="00000000000000d3"}"#,
                0.004,
            ),
            (
                r#"vrouter_observed_address_info{address="203.0.113.5"}"#,
                1.0,
            ),
        ] {
            assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
        }
        let status = crate::status::render_text(&s);
        for needle in [
            "ADDRESSES",
            "observed: 203.0.113.5",
            "advertised: 198.18.0.1",
            "PATHS",
            "relayed via 198.18.0.9",
            "relay: offered, VNIs 1000, forwarded 7 packets / 700 bytes",
        ] {
            assert!(status.contains(needle), "{needle:?} in\n{status}");
        }
        // The remote stack d on host 3 shows its path in STACKS.
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("d ") && l.contains("relayed via 198.18.0.9")),
            "{status}"
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["paths"][0]["via"], "relay");
        assert_eq!(json["stacks"][3]["path"], "relayed via 198.18.0.9");
        let h3_row = json["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["addr"] == "198.18.0.3")
            .unwrap();
        assert_eq!(h3_row["path"], "relayed via 198.18.0.9");
        // Without gossip nothing of it shows.
        let plain = render(
            &build(
                &discovery(),
                Some(&routes()),
                &probes(),
                None,
                &Default::default(),
                NOW,
            ),
            None,
        );
        assert!(!plain.contains("vrouter_relay_") && !plain.contains("vrouter_peer_path"));
    }

    #[test]
    fn encryption_metrics_and_status_text() {
        let mut d = discovery();
        d.encryption = Some(vrouter_state::EncryptionStatus {
            mode: vrouter_state::EncryptionMode::Prefer,
            backend: Some("userspace".into()),
            device: "vrouter-wg".into(),
            public_key: Some("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=".into()),
            next_public_key: None,
            tunnel_address: Some("10.255.0.1".parse().unwrap()),
            listen_port: Some(51820),
            overlay_mtu: 1370,
            peers: vec![
                vrouter_state::EncryptionPeer {
                    host: "198.18.0.2".parse().unwrap(),
                    state: "encrypted".into(),
                    reason: None,
                    public_key: Some("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into()),
                    tunnel_address: Some("10.255.0.2".parse().unwrap()),
                    last_handshake_age_s: Some(12.5),
                    rx_bytes: 1000,
                    tx_bytes: 2000,
                },
                vrouter_state::EncryptionPeer {
                    host: "198.18.0.3".parse().unwrap(),
                    state: "plain".into(),
                    reason: Some("host 198.18.0.3 has no key".into()),
                    public_key: None,
                    tunnel_address: None,
                    last_handshake_age_s: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                },
            ],
        });
        let s = build(
            &d,
            Some(&routes()),
            &probes(),
            None,
            &Default::default(),
            NOW,
        );
        let text = render(&s, None);
        for (series, want) in [
            (r#"vrouter_encryption_mode{mode="prefer"}"#, 1.0),
            (r#"vrouter_wg_backend{backend="userspace"}"#, 1.0),
            (
                r#"vrouter_wg_peer_rx_bytes_total{host="198.18.0.2"}"#,
                1000.0,
            ),
            (
                r#"vrouter_wg_peer_tx_bytes_total{host="198.18.0.2"}"#,
                2000.0,
            ),
            (
                r#"vrouter_wg_peer_handshake_age_seconds{host="198.18.0.2"}"#,
                12.5,
            ),
            (r#"vrouter_wg_peer_encrypted{host="198.18.0.2"}"#, 1.0),
            (r#"vrouter_wg_peer_encrypted{host="198.18.0.3"}"#, 0.0),
        ] {
            assert_eq!(value(&text, series), Some(want), "{series}\n{text}");
        }
        let human = crate::status::render_text(&s);
        assert!(human.contains("ENCRYPTION"), "{human}");
        assert!(
            human.contains("plain (unencrypted) peers: 198.18.0.3"),
            "{human}"
        );
        // Without the section (an older discovery, or tests above): no series.
        let plain = render(
            &build(
                &discovery(),
                Some(&routes()),
                &probes(),
                None,
                &Default::default(),
                NOW,
            ),
            None,
        );
        assert!(!plain.contains("vrouter_wg_"), "{plain}");
    }

    #[test]
    fn steering_metrics() {
        let (d, counters) = crate::status::tests::steering();
        let s = build(&d, Some(&routes()), &probes(), None, &counters, NOW);
        let text = render(&s, None);
        for (series, v) in [
            (
                r#"vrouter_steering_port_packets_total{local_stack="a",port="veth1"}"#,
                3.0,
            ),
            (
                r#"vrouter_steering_port_bytes_total{local_stack="a",port="veth1"}"#,
                300.0,
            ),
            (
                r#"vrouter_steering_mode{local_stack="a",mode="ports"}"#,
                1.0,
            ),
            (r#"vrouter_steering_mode{local_stack="a",mode="rule"}"#, 0.0),
            (r#"vrouter_steering_mode{local_stack="c",mode="rule"}"#, 1.0),
            (
                r#"vrouter_steering_mode{local_stack="c",mode="ports"}"#,
                0.0,
            ),
            (
                r#"vrouter_stack_traffic_bytes_total{local_stack="c",remote_stack="b",direction="tx"}"#,
                600.0,
            ),
        ] {
            assert_eq!(value(&text, series), Some(v), "{series} in\n{text}");
        }
        let plain = render(
            &build(
                &discovery(),
                Some(&routes()),
                &probes(),
                None,
                &counters,
                NOW,
            ),
            None,
        );
        assert!(
            !plain.contains("vrouter_steering"),
            "no steering section, no series"
        );
    }

    #[test]
    fn every_metric_from_hand_made_files() {
        let live = LiveFacts {
            ready: true,
            not_ready: vec![],
            reconciles: 7,
            reconcile_errors: 2,
            last_reconcile_ms: Some(1.5),
        };
        let s = build(
            &discovery(),
            Some(&routes()),
            &probes(),
            Some(live),
            &crate::status::SteeringCounters::new(),
            NOW,
        );
        let h = reconcile_histogram();
        h.observe(0.004);
        h.observe(0.020);
        let text = render(&s, Some(&h));
        let expect = [
            (r#"vrouter_peers{state="static"}"#, 1.0),
            (r#"vrouter_peers{state="down"}"#, 1.0),
            (r#"vrouter_peers{state="left"}"#, 1.0),
            (r#"vrouter_peers{state="alive"}"#, 0.0),
            ("vrouter_tunnels", 2.0),
            (r#"vrouter_routes_desired{stack="a"}"#, 3.0),
            (r#"vrouter_routes_desired{stack="c"}"#, 2.0),
            (r#"vrouter_routes_installed{stack="a"}"#, 2.0),
            (r#"vrouter_drift_repairs_total{component="discovery"}"#, 3.0),
            (
                r#"vrouter_drift_repairs_total{component="router",stack="a"}"#,
                6.0,
            ),
            (r#"vrouter_gossip_packets_total{direction="rx"}"#, 100.0),
            (r#"vrouter_gossip_packets_total{direction="tx"}"#, 120.0),
            (r#"vrouter_gossip_bytes_total{direction="tx"}"#, 12_000.0),
            (r#"vrouter_gossip_rejected_total{reason="bad_key"}"#, 5.0),
            (r#"vrouter_gossip_rejected_total{reason="malformed"}"#, 1.0),
            ("vrouter_refused_prefixes", 1.0),
            (
                r#"vrouter_stack_traffic_bytes_total{local_stack="a",remote_stack="b",direction="tx"}"#,
                1_000.0,
            ),
            (
                r#"vrouter_stack_traffic_bytes_total{local_stack="a",remote_stack="b",direction="rx"}"#,
                2_000.0,
            ),
            (
                r#"vrouter_stack_traffic_packets_total{local_stack="a",remote_stack="b",direction="rx"}"#,
                20.0,
            ),
            (
                r#"vrouter_peer_rtt_seconds{local_stack="a",remote_stack="b"}"#,
                0.0008,
            ),
            (
                r#"vrouter_peer_loss_ratio{local_stack="a",remote_stack="d"}"#,
                0.25,
            ),
            (
                r#"vrouter_peer_reachable{local_stack="a",remote_stack="b"}"#,
                1.0,
            ),
            (
                r#"vrouter_peer_reachable{local_stack="c",remote_stack="b"}"#,
                0.0,
            ),
            (
                r#"vrouter_peer_mtu_ok{local_stack="a",remote_stack="b"}"#,
                1.0,
            ),
            (
                r#"vrouter_peer_mtu_ok{local_stack="a",remote_stack="d"}"#,
                0.0,
            ),
            (
                r#"vrouter_acl_packets_total{local_stack="a",rule="https from b",verdict="accepted"}"#,
                40.0,
            ),
            (
                r#"vrouter_acl_bytes_total{local_stack="a",rule="https from b",verdict="accepted"}"#,
                4_000.0,
            ),
            (
                r#"vrouter_acl_packets_total{local_stack="a",rule="default",verdict="dropped"}"#,
                7.0,
            ),
            (
                r#"vrouter_acl_bytes_total{local_stack="a",rule="default",verdict="dropped"}"#,
                420.0,
            ),
            (
                r#"vrouter_acl_packets_total{local_stack="c",rule="default",verdict="accepted"}"#,
                9.0,
            ),
            (r#"vrouter_acl_closed{local_stack="a"}"#, 0.0),
            ("vrouter_ready", 1.0),
            (r#"vrouter_reconciles_total{result="ok"}"#, 5.0),
            (r#"vrouter_reconciles_total{result="error"}"#, 2.0),
            ("vrouter_reconcile_duration_seconds_count", 2.0),
            (
                r#"vrouter_reconcile_duration_seconds_bucket{le="0.008"}"#,
                1.0,
            ),
        ];
        for (series, want) in expect {
            assert_eq!(value(&text, series), Some(want), "{series} in:\n{text}");
        }
        // Stale report: no installed figure for c; no counters for a->d.
        assert_eq!(value(&text, r#"vrouter_routes_installed{stack="c"}"#), None);
        let stale = r#"{local_stack="c",remote_stack="b"}"#;
        for m in [
            "vrouter_peer_rtt_seconds",
            "vrouter_peer_loss_ratio",
            "vrouter_peer_mtu_ok",
        ] {
            assert_eq!(value(&text, &format!("{m}{stale}")), None, "{m}");
        }
        assert!(!text.contains(r#"remote_stack="d",direction"#), "{text}");
        // c's policy state is stale: no closed gauge for it.
        assert_eq!(value(&text, r#"vrouter_acl_closed{local_stack="c"}"#), None);
        assert!(text.contains("# TYPE vrouter_reconcile_duration_seconds histogram"));
        assert!(text.contains("# TYPE vrouter_stack_traffic_bytes counter"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn without_the_daemon_or_gossip() {
        let mut d = discovery();
        d.gossip = None;
        let s = build(
            &d,
            Some(&routes()),
            &[],
            None,
            &crate::status::SteeringCounters::new(),
            NOW,
        );
        let text = render(&s, None);
        assert!(!text.contains("vrouter_ready"), "{text}");
        assert!(!text.contains("vrouter_gossip"), "{text}");
        assert!(!text.contains("vrouter_reconcile_duration"), "{text}");
        assert_eq!(value(&text, "vrouter_tunnels"), Some(2.0));
        assert_eq!(
            value(&text, r#"vrouter_routes_desired{stack="a"}"#),
            Some(3.0)
        );
    }
}
