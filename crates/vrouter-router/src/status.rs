//! `vrouter-router status [--json]`: the router's own stack as its probes file shows it
//! (overlay link, routes desired and installed, and per remote router reachability,
//! RTT, loss, the MTU check and traffic), plus the same-host stacks routes.json lists
//! (reached without the underlay, so not probed over it). [`view`] is a pure function
//! of the files and the clock; [`render`] turns it into the table, and `--json` prints
//! the same view.

use crate::acl::{self, Policy, Protocol};
use serde::Serialize;
use std::fmt::Write;
use std::net::Ipv4Addr;
use vrouter_state::{
    AclRuleCounters, Prefix, ProbesFile, RemoteRoute, RouterHealth, RoutesFile, StackName,
    StackTraffic,
};

/// A probes file older than this says nothing about the present: the router is not
/// running or is wedged (discovery uses the same age).
pub const STALE_MS: u64 = 5_000;

/// The router's stack, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusView {
    pub stack: StackName,
    /// When the router last wrote its file (ms since the Unix epoch), and how long ago.
    pub updated_ms: u64,
    pub age_ms: u64,
    /// Older than [`STALE_MS`]: the figures below are not current.
    pub stale: bool,
    pub probe_interval_ms: u64,
    /// None from a router that does not report its health.
    pub health: Option<RouterHealth>,
    pub peers: Vec<PeerStatus>,
    /// Stacks on this host routes.json routes this stack to (empty without routes.json).
    pub same_host: Vec<SameHostStack>,
    /// Traffic per remote stack, as counted by the router (empty if it does not count).
    pub traffic: Vec<StackTraffic>,
    /// Per access rule, packets and bytes admitted and dropped (the policy's state is
    /// in `health.acl`).
    pub acl: Vec<AclRuleCounters>,
}

/// A remote stack whose router is on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SameHostStack {
    pub stack: StackName,
    pub router_ip: Ipv4Addr,
}

/// One remote router.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerStatus {
    pub stack: StackName,
    pub router_ip: Ipv4Addr,
    pub host: Ipv4Addr,
    pub reachable: bool,
    /// Since the last answer; None if none ever came.
    pub last_ok_age_ms: Option<u64>,
    pub rtt_us: Option<u64>,
    pub srtt_us: Option<u64>,
    /// Lost share of the requests of the last ~10 s, in percent (one decimal); None
    /// before any request was decided.
    pub loss_pct: Option<f64>,
    pub recent_sent: u32,
    pub recent_lost: u32,
    pub mtu: Option<MtuStatus>,
    pub traffic: Option<StackTraffic>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MtuStatus {
    /// IP bytes of the probe (the overlay MTU).
    pub size: u32,
    pub ok: bool,
    pub age_ms: u64,
}

/// The view of `file` (and routes.json, if readable) at wall time `now_ms`. Pure.
pub fn view(file: &ProbesFile, routes: Option<&RoutesFile>, now_ms: u64) -> StatusView {
    let mut same_host: Vec<SameHostStack> = routes
        .and_then(|r| r.stacks.get(&file.stack))
        .map(|entry| {
            entry
                .routes
                .iter()
                .filter(|r| r.same_host)
                .map(|r| SameHostStack {
                    stack: r.stack.clone(),
                    router_ip: r.via,
                })
                .collect()
        })
        .unwrap_or_default();
    same_host.sort_by(|a, b| (&a.stack, a.router_ip).cmp(&(&b.stack, b.router_ip)));
    same_host.dedup();
    let age = |t: u64| now_ms.saturating_sub(t);
    let peers = file
        .peers
        .iter()
        .map(|p| PeerStatus {
            stack: p.stack.clone(),
            router_ip: p.router_ip,
            host: p.host,
            reachable: p.reachable,
            last_ok_age_ms: p.last_ok_ms.map(age),
            rtt_us: p.rtt_us,
            srtt_us: p.srtt_us,
            loss_pct: (p.recent_sent > 0).then(|| {
                (f64::from(p.recent_lost) * 1000.0 / f64::from(p.recent_sent)).round() / 10.0
            }),
            recent_sent: p.recent_sent,
            recent_lost: p.recent_lost,
            mtu: p.mtu.as_ref().map(|m| MtuStatus {
                size: m.size,
                ok: m.ok,
                age_ms: age(m.checked_ms),
            }),
            traffic: file.traffic.iter().find(|t| t.stack == p.stack).cloned(),
        })
        .collect();
    StatusView {
        stack: file.stack.clone(),
        updated_ms: file.updated_ms,
        age_ms: age(file.updated_ms),
        stale: age(file.updated_ms) > STALE_MS,
        probe_interval_ms: file.interval_ms,
        health: file.health.clone(),
        peers,
        same_host,
        traffic: file.traffic.clone(),
        acl: file.acl.clone(),
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}ms", us as f64 / 1000.0)
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// Lays out rows as left-aligned columns two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = width[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The human table of `v`.
pub fn render(v: &StatusView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "stack {}: probes file written {:.1}s ago{}",
        v.stack,
        v.age_ms as f64 / 1000.0,
        if v.stale {
            " (STALE: the router is not running or is stuck; the figures are old)"
        } else {
            ""
        }
    );
    match &v.health {
        Some(h) => {
            let _ = writeln!(
                out,
                "overlay link: {}   routes: {}/{} installed{}   drift repaired: {}",
                if h.overlay_link_up { "up" } else { "DOWN" },
                h.routes_installed,
                h.routes_desired,
                if h.routes_installed == h.routes_desired {
                    ""
                } else {
                    " (DIVERGED)"
                },
                h.drift_repaired
            );
            if let Some(e) = &h.last_error {
                let _ = writeln!(out, "last error: {e}");
            }
            if let Some(e) = &h.traffic_error {
                let _ = writeln!(out, "traffic counters: {e}");
            }
            if let Some(a) = &h.acl {
                let _ = writeln!(
                    out,
                    "access: {}, default {}, {} rule(s), generation {}",
                    if a.closed.is_some() {
                        "CLOSED"
                    } else {
                        "enforced"
                    },
                    a.default,
                    a.rules,
                    a.generation
                );
                if let Some(reason) = &a.closed {
                    let _ = writeln!(
                        out,
                        "access CLOSED, nothing enters from the overlay: {reason}"
                    );
                }
                if let Some(e) = &a.refused {
                    let _ = writeln!(out, "access policy refused (the previous one stays): {e}");
                }
                if !a.unresolved.is_empty() {
                    let names: Vec<String> = a.unresolved.iter().map(|s| s.to_string()).collect();
                    let _ = writeln!(
                        out,
                        "access rules name stacks routes.json does not list (they cover nothing yet): {}",
                        names.join(", ")
                    );
                }
            }
        }
        None => out.push_str("health: not reported by this router version\n"),
    }
    if v.peers.is_empty() {
        out.push_str("no remote routers to probe (no routes to other hosts)\n");
    } else {
        let with_traffic = v.peers.iter().any(|p| p.traffic.is_some());
        let mut header: Vec<String> = [
            "STACK", "ROUTER", "HOST", "STATE", "RTT", "SRTT", "LOSS", "MTU",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if with_traffic {
            header.push("TX".into());
            header.push("RX".into());
        }
        let mut rows = vec![header];
        for p in &v.peers {
            let state = if p.reachable {
                "up".to_string()
            } else {
                match p.last_ok_age_ms {
                    Some(a) => format!("DOWN {:.1}s", a as f64 / 1000.0),
                    None => "DOWN never".to_string(),
                }
            };
            let loss = match p.loss_pct {
                Some(l) => format!("{l:.1}% ({}/{})", p.recent_lost, p.recent_sent),
                None => "-".into(),
            };
            let mtu = match &p.mtu {
                Some(m) if m.ok => format!("{} ok", m.size),
                Some(m) => format!("{} FAIL", m.size),
                None => "-".into(),
            };
            let mut row = vec![
                p.stack.to_string(),
                p.router_ip.to_string(),
                p.host.to_string(),
                state,
                p.rtt_us.map(ms).unwrap_or_else(|| "-".into()),
                p.srtt_us.map(ms).unwrap_or_else(|| "-".into()),
                loss,
                mtu,
            ];
            if with_traffic {
                match &p.traffic {
                    Some(t) => {
                        row.push(format!("{} {}p", bytes(t.tx_bytes), t.tx_packets));
                        row.push(format!("{} {}p", bytes(t.rx_bytes), t.rx_packets));
                    }
                    None => {
                        row.push("-".into());
                        row.push("-".into());
                    }
                }
            }
            rows.push(row);
        }
        out.push_str(&table(&rows));
    }
    if !v.same_host.is_empty() {
        let list: Vec<String> = v
            .same_host
            .iter()
            .map(|s| format!("{} ({})", s.stack, s.router_ip))
            .collect();
        let _ = writeln!(
            out,
            "same host, not probed over the underlay: {}",
            list.join(", ")
        );
    }
    // Traffic with stacks that are not probed (same host) gets its own lines.
    let unprobed: Vec<&StackTraffic> = v
        .traffic
        .iter()
        .filter(|t| !v.peers.iter().any(|p| p.stack == t.stack))
        .collect();
    if !unprobed.is_empty() {
        let mut rows = vec![vec!["TRAFFIC".to_string(), "TX".into(), "RX".into()]];
        for t in unprobed {
            rows.push(vec![
                t.stack.to_string(),
                format!("{} {}p", bytes(t.tx_bytes), t.tx_packets),
                format!("{} {}p", bytes(t.rx_bytes), t.rx_packets),
            ]);
        }
        out.push_str(&table(&rows));
    }
    if !v.acl.is_empty() {
        let mut rows = vec![vec![
            "RULE".to_string(),
            "VERDICT".into(),
            "ACCEPTED".into(),
            "DROPPED".into(),
        ]];
        for r in &v.acl {
            rows.push(vec![
                r.rule.clone(),
                r.verdict.clone(),
                format!("{} {}p", bytes(r.accepted_bytes), r.accepted_packets),
                format!("{} {}p", bytes(r.dropped_bytes), r.dropped_packets),
            ]);
        }
        out.push_str(&table(&rows));
    }
    out
}

/// `status --explain SRC [PROTO[/PORT]]`: a new connection to explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplainQuery {
    pub source: Ipv4Addr,
    /// None: every protocol, without ports.
    pub protocol: Option<Protocol>,
    /// Destination port (tcp and udp).
    pub port: Option<u16>,
}

impl ExplainQuery {
    /// Parses `10.2.0.5` and `tcp/443`, `udp/53`, `icmp` or `tcp`. Err is one line
    /// with the fix.
    pub fn parse(source: &str, service: Option<&str>) -> Result<ExplainQuery, String> {
        let source = source.trim().parse::<Ipv4Addr>().map_err(|_| {
            format!("--explain {source:?}: give the source as an IPv4 address, e.g. --explain 10.2.0.5 tcp/443")
        })?;
        let Some(service) = service else {
            return Ok(ExplainQuery {
                source,
                protocol: None,
                port: None,
            });
        };
        let (proto, port) = match service.split_once('/') {
            Some((p, port)) => (p, Some(port)),
            None => (service, None),
        };
        let protocol = match proto.trim().to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "icmp" => Protocol::Icmp,
            other => {
                return Err(format!(
                    "--explain: protocol {other:?} is not tcp, udp or icmp; write tcp/443, udp/53 or icmp"
                ))
            }
        };
        let port = match port {
            None => None,
            Some(_) if protocol == Protocol::Icmp => {
                return Err("--explain: icmp has no ports; write icmp".into())
            }
            Some(p) => match p.trim().parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    return Err(format!(
                        "--explain: port {p:?} is not a number from 1 to 65535; write tcp/443"
                    ))
                }
            },
        };
        Ok(ExplainQuery {
            source,
            protocol: Some(protocol),
            port,
        })
    }
}

/// The verdict on one kind of new connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExplainedVerdict {
    /// `tcp/443`, `udp`, `icmp`.
    pub service: String,
    /// `allow` or `deny`.
    pub verdict: String,
    /// The deciding rule's name; None when the default decides.
    pub rule: Option<String>,
    /// Why, in one line (the rule, the prefix of its source, the precedence).
    pub why: String,
}

/// What `status --explain` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub source: Ipv4Addr,
    /// The remote stack whose route holds the source (the longest prefix), if any.
    pub source_stack: Option<StackName>,
    pub default: String,
    /// Facts outside the rules that decide what happens to such a packet.
    pub notes: Vec<String>,
    pub verdicts: Vec<ExplainedVerdict>,
}

/// Explains the verdict of `policy` on a new connection from `query.source`, with
/// `remote` as this stack's remote routes from routes.json (`routes_known`: it was
/// readable) and `own` the stack's prefixes when configured. Pure.
pub fn explain(
    policy: &Policy,
    remote: &[RemoteRoute],
    own: Option<&[Prefix]>,
    routes_known: bool,
    query: &ExplainQuery,
) -> Explanation {
    let resolved = acl::resolve(policy, remote);
    let src = query.source;
    let mut notes = Vec::new();
    if !routes_known {
        notes.push(
            "routes.json is not readable here: rules that name stacks cover nothing in this explanation"
                .to_string(),
        );
    }
    if let Some(p) = own.and_then(|own| own.iter().find(|p| p.contains(src))) {
        notes.push(format!(
            "{src} is inside this stack ({p}): traffic within the stack is not filtered, and a packet from the overlay with this source is dropped as forged"
        ));
    }
    let holder = remote
        .iter()
        .filter(|r| r.prefix.contains(src))
        .max_by_key(|r| r.prefix.prefix_len());
    match holder {
        Some(r) => notes.push(format!(
            "{src} is in {} of stack {}: accepted from the overlay only from the router that announces it ({}, MAC {})",
            r.prefix, r.stack, r.via, r.mac
        )),
        None if routes_known => notes.push(format!(
            "no stack routes.json lists announces {src}: a packet from the overlay with this source is dropped as forged (acl spoof-from-overlay) before any rule; the verdicts below apply once a stack announces it"
        )),
        None => {}
    }
    if !resolved.unresolved.is_empty() {
        let names: Vec<String> = resolved.unresolved.iter().map(|s| s.to_string()).collect();
        notes.push(format!(
            "rules name stacks routes.json does not list, covering nothing: {}",
            names.join(", ")
        ));
    }
    let cases: Vec<(Protocol, Option<u16>)> = match query.protocol {
        Some(p) => vec![(p, query.port)],
        None => vec![
            (Protocol::Tcp, None),
            (Protocol::Udp, None),
            (Protocol::Icmp, None),
        ],
    };
    if cases
        .iter()
        .any(|(p, port)| *p != Protocol::Icmp && port.is_none())
    {
        notes.push(
            "no port given: rules that list ports are not considered (add one: tcp/443)".into(),
        );
    }
    let verdicts = cases
        .into_iter()
        .map(|(protocol, port)| {
            let d = resolved.decide(src, protocol.number(), port);
            ExplainedVerdict {
                service: match port {
                    Some(port) => format!("{}/{port}", protocol.as_str()),
                    None => protocol.as_str().to_string(),
                },
                verdict: d.verdict.to_string(),
                rule: d.by.as_ref().map(|(r, _)| r.rule.name.clone()),
                why: d.to_string(),
            }
        })
        .collect();
    Explanation {
        source: src,
        source_stack: holder.map(|r| r.stack.clone()),
        default: policy.default.to_string(),
        notes,
        verdicts,
    }
}

/// The human form of an [`Explanation`].
pub fn render_explanation(e: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "new connections from {}{} (default {}):",
        e.source,
        match &e.source_stack {
            Some(s) => format!(" (stack {s})"),
            None => String::new(),
        },
        e.default
    );
    for v in &e.verdicts {
        let _ = writeln!(out, "  {:<9} {}", v.service, v.why);
    }
    for n in &e.notes {
        let _ = writeln!(out, "note: {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vrouter_state::{MtuCheck, PeerProbe, SCHEMA_VERSION};

    const NOW: u64 = 1_700_000_010_000;

    fn peer(stack: &str, ip: &str, reachable: bool) -> PeerProbe {
        PeerProbe {
            router_ip: ip.parse().unwrap(),
            stack: StackName::new(stack).unwrap(),
            host: "198.18.0.2".parse().unwrap(),
            last_ok_ms: Some(NOW - 2_500),
            rtt_us: Some(412),
            sent: 100,
            received: 90,
            reachable,
            srtt_us: Some(380),
            recent_sent: 40,
            recent_lost: 3,
            mtu: Some(MtuCheck {
                size: 1450,
                ok: reachable,
                checked_ms: NOW - 1_000,
            }),
        }
    }

    fn file() -> ProbesFile {
        ProbesFile {
            schema: SCHEMA_VERSION,
            generation: 9,
            stack: StackName::new("a").unwrap(),
            updated_ms: NOW - 300,
            interval_ms: 250,
            peers: vec![
                peer("b", "10.2.0.254", true),
                peer("c", "10.3.0.254", false),
            ],
            health: Some(RouterHealth {
                routes_desired: 3,
                routes_installed: 2,
                drift_repaired: 4,
                overlay_link_up: true,
                last_error: Some("apply failed".into()),
                traffic_error: None,
                reconciled_ms: None,
                acl: Some(vrouter_state::AclHealth {
                    default: "deny".into(),
                    rules: 1,
                    generation: 2,
                    closed: None,
                    refused: Some("VROUTER_ACL_FILE /acl.toml: line 3: oops".into()),
                    unresolved: vec![StackName::new("ops").unwrap()],
                }),
            }),
            traffic: vec![
                StackTraffic {
                    stack: StackName::new("b").unwrap(),
                    tx_bytes: 2048,
                    tx_packets: 2,
                    rx_bytes: 10,
                    rx_packets: 1,
                },
                StackTraffic {
                    stack: StackName::new("s").unwrap(),
                    tx_bytes: 5,
                    tx_packets: 1,
                    rx_bytes: 0,
                    rx_packets: 0,
                },
            ],
            events: None,
            acl: vec![
                AclRuleCounters {
                    rule: "https from web".into(),
                    verdict: "allow".into(),
                    accepted_packets: 12,
                    accepted_bytes: 3 * 1024,
                    dropped_packets: 0,
                    dropped_bytes: 0,
                },
                AclRuleCounters {
                    rule: "default".into(),
                    verdict: "deny".into(),
                    accepted_packets: 0,
                    accepted_bytes: 0,
                    dropped_packets: 5,
                    dropped_bytes: 300,
                },
            ],
        }
    }

    #[test]
    fn view_derives_ages_loss_and_traffic() {
        let v = view(&file(), None, NOW);
        assert_eq!(v.age_ms, 300);
        assert!(!v.stale);
        assert_eq!(v.probe_interval_ms, 250);
        assert_eq!(v.health.as_ref().unwrap().routes_installed, 2);
        let b = &v.peers[0];
        assert_eq!(b.loss_pct, Some(7.5));
        assert_eq!(b.last_ok_age_ms, Some(2_500));
        assert_eq!(
            b.mtu,
            Some(MtuStatus {
                size: 1450,
                ok: true,
                age_ms: 1_000
            })
        );
        assert_eq!(b.traffic.as_ref().unwrap().tx_bytes, 2048);
        assert_eq!(v.peers[1].traffic, None);
        assert_eq!(v.traffic.len(), 2);

        let mut f = file();
        f.peers[0].recent_sent = 0;
        f.peers[0].recent_lost = 0;
        f.updated_ms = NOW - 6_000;
        let v = view(&f, None, NOW);
        assert_eq!(v.peers[0].loss_pct, None, "nothing decided yet");
        assert!(v.stale);
    }

    #[test]
    fn table_shows_every_field() {
        let text = render(&view(&file(), None, NOW));
        assert!(
            text.starts_with("stack a: probes file written 0.3s ago\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "overlay link: up   routes: 2/3 installed (DIVERGED)   drift repaired: 4"
            ),
            "{text}"
        );
        assert!(text.contains("last error: apply failed"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().find(|l| l.starts_with("STACK")).unwrap();
        assert!(header.contains("MTU") && header.contains("TX"), "{header}");
        let b = lines.iter().find(|l| l.starts_with("b ")).unwrap();
        for cell in [
            "10.2.0.254",
            "198.18.0.2",
            "up",
            "0.41ms",
            "0.38ms",
            "7.5% (3/40)",
            "1450 ok",
            "2.0KiB 2p",
            "10B 1p",
        ] {
            assert!(b.contains(cell), "{cell} in {b}");
        }
        let c = lines.iter().find(|l| l.starts_with("c ")).unwrap();
        assert!(c.contains("DOWN 2.5s") && c.contains("1450 FAIL"), "{c}");
        // Same-host traffic (no probed peer) still shows.
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("s ") && l.contains("5B 1p")),
            "{text}"
        );

        let mut f = file();
        f.peers.clear();
        f.traffic.clear();
        f.health = None;
        f.updated_ms = NOW - 60_000;
        let text = render(&view(&f, None, NOW));
        assert!(text.contains("STALE"), "{text}");
        assert!(text.contains("health: not reported"), "{text}");
        assert!(text.contains("no remote routers"), "{text}");
    }

    #[test]
    fn same_host_stacks_come_from_routes_json() {
        use vrouter_state::{Mac, RemoteRoute, StackRoutes, Vni};
        let route = |prefix: &str, stack: &str, via: &str, same_host| {
            let via: Ipv4Addr = via.parse().unwrap();
            RemoteRoute {
                prefix: prefix.parse().unwrap(),
                stack: StackName::new(stack).unwrap(),
                via,
                mac: Mac::for_router(Vni::new(1000).unwrap(), via),
                host: "198.18.0.1".parse().unwrap(),
                same_host,
            }
        };
        let mut routes = RoutesFile {
            schema: SCHEMA_VERSION,
            generation: 3,
            ..RoutesFile::default()
        };
        routes.stacks.insert(
            StackName::new("a").unwrap(),
            StackRoutes {
                vni: None,
                routes: vec![
                    route("10.2.0.0/24", "b", "10.2.0.254", false),
                    route("10.5.0.0/24", "s", "10.5.0.254", true),
                    route("10.5.1.0/24", "s", "10.5.0.254", true),
                ],
            },
        );
        // Another stack's entry is not ours.
        routes.stacks.insert(
            StackName::new("z").unwrap(),
            StackRoutes {
                vni: None,
                routes: vec![route("10.9.0.0/24", "y", "10.9.0.254", true)],
            },
        );
        let v = view(&file(), Some(&routes), NOW);
        assert_eq!(
            v.same_host,
            vec![SameHostStack {
                stack: StackName::new("s").unwrap(),
                router_ip: "10.5.0.254".parse().unwrap()
            }]
        );
        let text = render(&v);
        assert!(
            text.contains("same host, not probed over the underlay: s (10.5.0.254)"),
            "{text}"
        );
        assert!(view(&file(), None, NOW).same_host.is_empty());
    }

    #[test]
    fn access_rules_and_their_counters_show() {
        let text = render(&view(&file(), None, NOW));
        assert!(
            text.contains("access: enforced, default deny, 1 rule(s), generation 2"),
            "{text}"
        );
        assert!(
            text.contains("access policy refused (the previous one stays): VROUTER_ACL_FILE /acl.toml: line 3: oops"),
            "{text}"
        );
        assert!(text.contains("cover nothing yet): ops"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("RULE") && l.contains("DROPPED")),
            "{text}"
        );
        let web = lines
            .iter()
            .find(|l| l.starts_with("https from web"))
            .unwrap();
        assert!(
            web.contains("allow") && web.contains("3.0KiB 12p") && web.contains("0B 0p"),
            "{web}"
        );
        let default = lines.iter().find(|l| l.starts_with("default ")).unwrap();
        assert!(
            default.contains("deny") && default.contains("300B 5p"),
            "{default}"
        );
        assert!(!text.contains("CLOSED"), "{text}");

        let mut f = file();
        f.health.as_mut().unwrap().acl.as_mut().unwrap().closed =
            Some("the kernel refused the table: EPERM".into());
        let text = render(&view(&f, None, NOW));
        assert!(
            text.contains("access CLOSED, nothing enters from the overlay: the kernel refused the table: EPERM"),
            "{text}"
        );
        // No policy reported: no access lines.
        let mut f = file();
        f.acl.clear();
        f.health.as_mut().unwrap().acl = None;
        let text = render(&view(&f, None, NOW));
        assert!(!text.contains("access") && !text.contains("RULE"), "{text}");
    }

    fn remote(prefix: &str, stack: &str, via: &str) -> RemoteRoute {
        let via: Ipv4Addr = via.parse().unwrap();
        RemoteRoute {
            prefix: prefix.parse().unwrap(),
            stack: StackName::new(stack).unwrap(),
            via,
            mac: vrouter_state::Mac::for_router(vrouter_state::Vni::new(1000).unwrap(), via),
            host: "198.18.0.2".parse().unwrap(),
            same_host: false,
        }
    }

    #[test]
    fn explain_queries_parse_with_a_fix_in_every_error() {
        let q = ExplainQuery::parse("10.2.0.5", Some("tcp/443")).unwrap();
        assert_eq!(
            q,
            ExplainQuery {
                source: "10.2.0.5".parse().unwrap(),
                protocol: Some(Protocol::Tcp),
                port: Some(443)
            }
        );
        assert_eq!(
            ExplainQuery::parse("10.2.0.5", Some("ICMP"))
                .unwrap()
                .protocol,
            Some(Protocol::Icmp)
        );
        assert_eq!(
            ExplainQuery::parse("10.2.0.5", Some("udp")).unwrap().port,
            None
        );
        assert_eq!(
            ExplainQuery::parse("10.2.0.5", None).unwrap().protocol,
            None
        );
        for (src, svc, fix) in [
            ("web", None, "IPv4 address"),
            ("10.2.0.5", Some("sctp/1"), "tcp, udp or icmp"),
            ("10.2.0.5", Some("tcp/0"), "1 to 65535"),
            ("10.2.0.5", Some("tcp/http"), "1 to 65535"),
            ("10.2.0.5", Some("icmp/8"), "no ports"),
        ] {
            let e = ExplainQuery::parse(src, svc).unwrap_err();
            assert!(e.contains(fix) && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn explain_names_the_deciding_rule_and_why() {
        let policy = acl::from_settings(
            Some("deny"),
            Some("web:tcp/443, 10.2.0.0/16:udp/53, ops"),
            Some((
                std::path::Path::new("/acl.toml"),
                "[[rule]]\nname = \"no db\"\ndeny = \"10.2.0.0/24:tcp/5432\"\n",
            )),
        )
        .unwrap();
        let routes = [
            remote("10.2.0.0/24", "web", "10.2.0.254"),
            remote("10.3.0.0/24", "db", "10.3.0.254"),
        ];
        let own: Vec<Prefix> = vec!["10.1.0.0/24".parse().unwrap()];
        let q = ExplainQuery::parse("10.2.0.5", Some("tcp/443")).unwrap();
        let e = explain(&policy, &routes, Some(&own), true, &q);
        assert_eq!(e.source_stack, Some(StackName::new("web").unwrap()));
        assert_eq!(e.default, "deny");
        assert_eq!(e.verdicts.len(), 1);
        let v = &e.verdicts[0];
        assert_eq!(
            (v.service.as_str(), v.verdict.as_str()),
            ("tcp/443", "allow")
        );
        assert_eq!(v.rule.as_deref(), Some("allow web:tcp/443"));
        assert!(v.why.contains("10.2.0.0/24 (stack web)"), "{}", v.why);
        assert!(
            e.notes
                .iter()
                .any(|n| n.contains("only from the router that announces it (10.2.0.254")),
            "{:?}",
            e.notes
        );
        assert!(
            e.notes.iter().any(|n| n.contains("ops")),
            "unresolved: {:?}",
            e.notes
        );

        // The longer prefix decides: the /24 deny over the /16 ... on 5432.
        let q = ExplainQuery::parse("10.2.0.5", Some("tcp/5432")).unwrap();
        let v = &explain(&policy, &routes, Some(&own), true, &q).verdicts[0];
        assert_eq!(
            (v.verdict.as_str(), v.rule.as_deref()),
            ("deny", Some("no db"))
        );

        // No rule: the default, said so.
        let q = ExplainQuery::parse("10.3.0.9", Some("tcp/22")).unwrap();
        let e = explain(&policy, &routes, Some(&own), true, &q);
        assert_eq!(e.verdicts[0].rule, None);
        assert_eq!(e.verdicts[0].why, "deny by default: no rule covers it");

        // No protocol: tcp, udp and icmp without ports, with a note.
        let q = ExplainQuery::parse("10.2.9.9", None).unwrap();
        let e = explain(&policy, &routes, Some(&own), true, &q);
        let got: Vec<(&str, &str)> = e
            .verdicts
            .iter()
            .map(|v| (v.service.as_str(), v.verdict.as_str()))
            .collect();
        assert_eq!(got, [("tcp", "deny"), ("udp", "deny"), ("icmp", "deny")]);
        assert!(e.notes.iter().any(|n| n.contains("no port given")));
        // Nobody announces 10.2.9.9 (web has 10.2.0.0/24 only): forged on arrival.
        assert!(
            e.notes.iter().any(|n| n.contains("spoof-from-overlay")),
            "{:?}",
            e.notes
        );
        let q = ExplainQuery::parse("10.2.9.9", Some("udp/53")).unwrap();
        let v = &explain(&policy, &routes, Some(&own), true, &q).verdicts[0];
        assert_eq!(v.rule.as_deref(), Some("allow 10.2.0.0/16:udp/53"));

        // Inside the stack; routes.json unreadable.
        let q = ExplainQuery::parse("10.1.0.7", Some("icmp")).unwrap();
        let e = explain(&policy, &[], Some(&own), false, &q);
        assert!(e
            .notes
            .iter()
            .any(|n| n.contains("inside this stack (10.1.0.0/24)")));
        assert!(e
            .notes
            .iter()
            .any(|n| n.contains("routes.json is not readable")));

        let text = render_explanation(&explain(
            &policy,
            &routes,
            None,
            true,
            &ExplainQuery::parse("10.2.0.5", Some("tcp/443")).unwrap(),
        ));
        assert!(text.starts_with("new connections from 10.2.0.5 (stack web) (default deny):\n  tcp/443   allow by rule \"allow web:tcp/443\""), "{text}");
    }

    #[test]
    fn json_is_the_same_view() {
        let v = view(&file(), None, NOW);
        let j: serde_json::Value = serde_json::to_value(&v).unwrap();
        assert_eq!(j["stack"], "a");
        assert_eq!(j["stale"], false);
        assert_eq!(j["health"]["routes_desired"], 3);
        assert_eq!(j["peers"][0]["loss_pct"], 7.5);
        assert_eq!(j["peers"][0]["mtu"]["ok"], true);
        assert_eq!(j["peers"][1]["reachable"], false);
        assert_eq!(j["traffic"][1]["stack"], "s");
        assert_eq!(j["acl"][0]["rule"], "https from web");
        assert_eq!(j["acl"][1]["dropped_packets"], 5);
        assert_eq!(j["health"]["acl"]["default"], "deny");
    }
}
