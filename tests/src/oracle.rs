//! The chaos tests' kernel oracle: what the kernel of each simulated host and router
//! namespace must hold, derived from the test topology alone (stack subnets, router
//! addresses, host underlay addresses, VNIs, which stacks are up, which hosts encrypt,
//! which routers enforce an access policy, the steering mode), never from the code
//! under test's desired-state functions; and dumps of the real kernel (`ip -j`,
//! `bridge -j`, `nft -j`, the userspace WireGuard engine's peers as discovery reports
//! them) in the same shape, so [`diff`] lists what is missing or left over.
//!
//! The derivations repeat the documented rules (docs/ARCHITECTURE.md, operations.md):
//! a router's MAC is `02:<VNI low byte>:<router IPv4>`; a remote router's nexthop id is
//! its address read as a number; every route a router owns carries protocol 118; each
//! VNI in use on a host has one `vxlan<VNI>` device stamped `docker-vrouter vni=<VNI>`;
//! a router's overlay link is `ovl<VNI>`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::exec_ok;

/// The protocol number of every route, rule and nexthop docker-vrouter owns.
pub const PROTO: u64 = 118;

/// One simulated stack as the test built it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OStack {
    pub name: String,
    pub host: usize,
    pub vni: u32,
    pub cidr: String,
    pub router_ip: Ipv4Addr,
    /// Its router runs (registered, not withdrawn).
    pub up: bool,
    /// Its router enforces a policy other than the default (allow, no rules).
    pub acl: bool,
    /// Host-side names of its router's and its services' bridge ports (port steering
    /// binds one ingress chain to each).
    pub ports: Vec<String>,
    /// Its network's bridge on the host.
    pub bridge: String,
    /// Number of allow entries in its access policy.
    pub acl_rules: usize,
}

/// One simulated host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OHost {
    pub index: usize,
    pub underlay: Ipv4Addr,
    /// WireGuard tunnel address (`None`: no encryption on this host).
    pub tunnel: Option<Ipv4Addr>,
}

/// The topology the expectations come from.
#[derive(Debug, Clone)]
pub struct Model {
    pub hosts: Vec<OHost>,
    pub stacks: Vec<OStack>,
    /// Port steering (`ports`) on every host.
    pub port_steering: bool,
    /// `require` encryption on every host (the input filter table exists).
    pub require: bool,
}

/// Kernel objects as comparable one-line strings, grouped by place (`host 1`,
/// `router a`) and kind (`fdb`, `route`, ...).
pub type Objects = BTreeMap<(String, String), BTreeSet<String>>;

/// A router's MAC: 02, the VNI's low byte, the router's IPv4 address.
pub fn router_mac(vni: u32, ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        vni & 0xff,
        o[0],
        o[1],
        o[2],
        o[3]
    )
}

fn put(o: &mut Objects, place: &str, kind: &str, item: String) {
    o.entry((place.to_string(), kind.to_string()))
        .or_default()
        .insert(item);
}

fn touch(o: &mut Objects, place: &str, kind: &str) {
    o.entry((place.to_string(), kind.to_string())).or_default();
}

impl Model {
    fn host(&self, i: usize) -> &OHost {
        self.hosts.iter().find(|h| h.index == i).expect("host")
    }

    /// Where a host sends VXLAN for `to`: its tunnel address when both encrypt, else
    /// its underlay address.
    fn fdb_dst(&self, from: usize, to: usize) -> Ipv4Addr {
        match (self.host(from).tunnel, self.host(to).tunnel) {
            (Some(_), Some(t)) => t,
            _ => self.host(to).underlay,
        }
    }

    /// The kernel objects the topology implies.
    pub fn expected(&self) -> Objects {
        let mut o = Objects::new();
        let up: Vec<&OStack> = self.stacks.iter().filter(|s| s.up).collect();
        for s in &self.stacks {
            // A stopped stack's router namespace is gone (compose down): nothing there.
            if !s.up {
                continue;
            }
            let place = format!("router {}", s.name);
            for kind in ["route", "nexthop", "neigh", "rule", "overlay", "acl"] {
                touch(&mut o, &place, kind);
            }
            put(
                &mut o,
                &place,
                "overlay",
                format!("ovl{} macvlan up", s.vni),
            );
            // Every router holds an access table (the default policy's too): its own
            // prefix, and each remote prefix with the router MAC it must come from.
            put(&mut o, &place, "acl", "table ip vrouter_acl".into());
            put(&mut o, &place, "acl", format!("local {}", s.cidr));
            for n in 1..=s.acl_rules {
                put(&mut o, &place, "acl", format!("rule acl {n}"));
            }
            for t in up.iter().filter(|t| t.vni == s.vni && t.name != s.name) {
                let id = u32::from(t.router_ip);
                put(&mut o, &place, "route", format!("{} nhid {id}", t.cidr));
                put(
                    &mut o,
                    &place,
                    "nexthop",
                    format!("id {id} via {} dev ovl{} onlink", t.router_ip, s.vni),
                );
                put(
                    &mut o,
                    &place,
                    "neigh",
                    format!(
                        "{} lladdr {} dev ovl{} permanent",
                        t.router_ip,
                        router_mac(t.vni, t.router_ip),
                        s.vni
                    ),
                );
                put(
                    &mut o,
                    &place,
                    "acl",
                    format!("remote {} from {}", t.cidr, router_mac(t.vni, t.router_ip)),
                );
                // A policy (every remote stack of the chaos mesh is in its allow
                // list) maps each remote source prefix to its rule's chain, the rest
                // of the address space to the default.
                if s.acl {
                    put(&mut o, &place, "acl", format!("source {} jump", t.cidr));
                    put(&mut o, &place, "acl", "source ranges to the default".into());
                }
            }
        }
        for h in &self.hosts {
            let place = format!("host {}", h.index);
            for kind in [
                "vxlan", "fdb", "macvlan", "rule", "route", "steer", "wg_peer", "filter",
            ] {
                touch(&mut o, &place, kind);
            }
            let local: Vec<&&OStack> = up.iter().filter(|s| s.host == h.index).collect();
            // The policy-rule path: per local stack a rule from its bridge into a table
            // numbered after its router's address, holding each remote prefix of its
            // VNI via the router.
            for s in &local {
                let table = u32::from(s.router_ip);
                put(
                    &mut o,
                    &place,
                    "rule",
                    format!("iif {} table {table}", s.bridge),
                );
                for t in up.iter().filter(|t| t.vni == s.vni && t.name != s.name) {
                    put(
                        &mut o,
                        &place,
                        "route",
                        format!(
                            "{} via {} dev {} table {table}",
                            t.cidr, s.router_ip, s.bridge
                        ),
                    );
                }
            }
            let vnis: BTreeSet<u32> = local.iter().map(|s| s.vni).collect();
            for v in &vnis {
                put(
                    &mut o,
                    &place,
                    "vxlan",
                    format!("vxlan{v} docker-vrouter vni={v}"),
                );
                // Rows to every remote router on the VNI, and one flood row per remote
                // host with a stack on it.
                let mut flood = BTreeSet::new();
                for t in up.iter().filter(|t| t.vni == *v && t.host != h.index) {
                    let dst = self.fdb_dst(h.index, t.host);
                    put(
                        &mut o,
                        &place,
                        "fdb",
                        format!("vxlan{v} {} dst {dst}", router_mac(t.vni, t.router_ip)),
                    );
                    flood.insert(dst);
                }
                for dst in flood {
                    put(
                        &mut o,
                        &place,
                        "fdb",
                        format!("vxlan{v} 00:00:00:00:00:00 dst {dst}"),
                    );
                }
            }
            if self.port_steering {
                for s in &local {
                    for p in &s.ports {
                        put(&mut o, &place, "steer", format!("chain on {p}"));
                    }
                }
            }
            if h.tunnel.is_some() {
                for other in self.hosts.iter().filter(|x| x.index != h.index) {
                    if let Some(t) = other.tunnel {
                        put(
                            &mut o,
                            &place,
                            "wg_peer",
                            format!("{} tunnel {t}", other.underlay),
                        );
                    }
                }
                if self.require {
                    put(&mut o, &place, "filter", "vxlan input filter".into());
                }
            }
        }
        o
    }
}

/// `cmd` in namespace `ns`, parsed as JSON (an empty output is an empty list).
fn json(ns: &str, argv: &[&str]) -> Result<Value> {
    let out = exec_ok(Some(ns), argv)?.stdout;
    if out.trim().is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(&out).with_context(|| format!("{argv:?} in {ns}: {out}"))
}

fn arr(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

fn s(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::String(x) => x.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

fn proto_is_ours(v: &Value) -> bool {
    let p = s(v, "protocol");
    p == PROTO.to_string() || p == "0x76"
}

/// The objects docker-vrouter owns in a router namespace (`place` = `router <stack>`):
/// protocol-118 routes (every table), nexthops and rules, permanent neighbours on any
/// link, every macvlan (the overlay link, and any leftover), and the access table's
/// remote-prefix elements.
pub fn dump_router(ns: &str, stack: &str, acl_table: &str) -> Result<Objects> {
    let place = format!("router {stack}");
    let mut o = Objects::new();
    for kind in ["route", "nexthop", "neigh", "rule", "overlay", "acl"] {
        touch(&mut o, &place, kind);
    }
    let links = json(ns, &["ip", "-j", "-d", "link", "show"])?;
    let mut names: BTreeMap<u64, String> = BTreeMap::new();
    for l in arr(&links) {
        let name = s(&l, "ifname");
        names.insert(l["ifindex"].as_u64().unwrap_or(0), name.clone());
        if l["linkinfo"]["info_kind"].as_str() == Some("macvlan") {
            let up = arr(&l["flags"]).iter().any(|f| f.as_str() == Some("UP"));
            put(
                &mut o,
                &place,
                "overlay",
                format!("{name} macvlan{}", if up { " up" } else { " down" }),
            );
        }
    }
    for r in arr(&json(ns, &["ip", "-j", "route", "show", "table", "all"])?) {
        if !proto_is_ours(&r) {
            continue;
        }
        let mut line = s(&r, "dst");
        if let Some(id) = r["nhid"].as_u64() {
            line += &format!(" nhid {id}");
        } else {
            line += &format!(" via {} dev {}", s(&r, "gateway"), s(&r, "dev"));
        }
        let table = s(&r, "table");
        if !table.is_empty() && table != "main" {
            line += &format!(" table {table}");
        }
        put(&mut o, &place, "route", line);
    }
    // Older kernels without nexthop objects fail here: none of ours then.
    if let Ok(nh) = json(ns, &["ip", "-j", "nexthop", "show"]) {
        for n in arr(&nh) {
            if !proto_is_ours(&n) {
                continue;
            }
            let onlink = arr(&n["flags"])
                .iter()
                .any(|f| f.as_str() == Some("onlink"));
            put(
                &mut o,
                &place,
                "nexthop",
                format!(
                    "id {} via {} dev {}{}",
                    s(&n, "id"),
                    s(&n, "gateway"),
                    s(&n, "dev"),
                    if onlink { " onlink" } else { "" }
                ),
            );
        }
    }
    for n in arr(&json(
        ns,
        &["ip", "-j", "neigh", "show", "nud", "permanent"],
    )?) {
        put(
            &mut o,
            &place,
            "neigh",
            format!(
                "{} lladdr {} dev {} permanent",
                s(&n, "dst"),
                s(&n, "lladdr"),
                s(&n, "dev")
            ),
        );
    }
    for r in arr(&json(ns, &["ip", "-j", "rule", "show"])?) {
        if proto_is_ours(&r) {
            put(&mut o, &place, "rule", format!("{r}"));
        }
    }
    let _ = names;
    acl_objects(ns, &place, acl_table, &mut o)?;
    Ok(o)
}

/// The access table of a router namespace: its presence, and the remote prefixes its
/// set elements hold (one `remote <prefix>` per element of any set).
fn acl_objects(ns: &str, place: &str, table: &str, o: &mut Objects) -> Result<()> {
    let out = crate::exec(Some(ns), &["nft", "-j", "list", "table", "ip", table])?;
    if !out.success() {
        return Ok(());
    }
    let v: Value = serde_json::from_str(&out.stdout).context("nft -j")?;
    let items = arr(&v["nftables"]);
    let closed = items.iter().any(|i| {
        i["rule"]["comment"]
            .as_str()
            .is_some_and(|c| c.contains("closed"))
    });
    put(
        o,
        place,
        "acl",
        format!("table ip {table}{}", if closed { " (closed)" } else { "" }),
    );
    let prefix = |v: &Value| match v {
        Value::Object(m) if m.contains_key("prefix") => Some(format!(
            "{}/{}",
            s(&m["prefix"], "addr"),
            s(&m["prefix"], "len")
        )),
        Value::String(x) => Some(x.clone()),
        _ => None,
    };
    // Elements of every set and map: a bare prefix (the stack's own), a prefix with
    // the router MAC it must come from (a remote stack), or a rule's element (by its
    // comment).
    for i in &items {
        let Some(set) = i.get("set").or_else(|| i.get("map")) else {
            continue;
        };
        for e in arr(&set["elem"]) {
            let text = if let Some(p) = prefix(&e) {
                format!("local {p}")
            } else if let Some(c) = e["concat"].as_array() {
                let p = c.first().and_then(prefix).unwrap_or_default();
                let mac = c.get(1).and_then(|m| m.as_str()).unwrap_or_default();
                format!("remote {p} from {mac}")
            } else if let Some(c) = e["elem"]["comment"].as_str() {
                format!("rule {c}")
            } else if let Some([key, verdict]) = e.as_array().map(|a| a.as_slice()) {
                // The policy's source map: an allowed stack's prefix, or a range of
                // everything else, to its chain.
                match prefix(key) {
                    Some(p) if verdict.get("jump").is_some() => format!("source {p} jump"),
                    _ if key.get("range").is_some() => "source ranges to the default".into(),
                    _ => format!("element {e}"),
                }
            } else {
                format!("element {e}")
            };
            put(o, place, "acl", text);
        }
    }
    Ok(())
}

/// The objects discovery owns on a simulated host (`place` = `host <i>`): VXLAN devices
/// (with their marker), permanent FDB rows with a destination on them, every macvlan in
/// the host namespace (each a leftover: routers' links live in their namespaces),
/// protocol-118 rules, the port-steering chains (by the port they are bound to), the
/// WireGuard peers and the `require` input filter.
pub fn dump_host(
    ns: &str,
    index: usize,
    steering_table: &str,
    wg_peers: &[(Ipv4Addr, Ipv4Addr)],
) -> Result<Objects> {
    let place = format!("host {index}");
    let mut o = Objects::new();
    for kind in [
        "vxlan", "fdb", "macvlan", "rule", "route", "steer", "wg_peer", "filter",
    ] {
        touch(&mut o, &place, kind);
    }
    for r in arr(&json(ns, &["ip", "-j", "route", "show", "table", "all"])?) {
        if !proto_is_ours(&r) {
            continue;
        }
        put(
            &mut o,
            &place,
            "route",
            format!(
                "{} via {} dev {} table {}",
                s(&r, "dst"),
                s(&r, "gateway"),
                s(&r, "dev"),
                s(&r, "table")
            ),
        );
    }
    let links = json(ns, &["ip", "-j", "-d", "link", "show"])?;
    for l in arr(&links) {
        let name = s(&l, "ifname");
        match l["linkinfo"]["info_kind"].as_str() {
            Some("vxlan") => put(
                &mut o,
                &place,
                "vxlan",
                format!("{name} {}", s(&l, "ifalias")),
            ),
            Some("macvlan") => put(&mut o, &place, "macvlan", name),
            _ => {}
        }
    }
    for r in arr(&json(ns, &["bridge", "-j", "fdb", "show"])?) {
        let dev = s(&r, "ifname");
        if !dev.starts_with("vxlan") || s(&r, "dst").is_empty() {
            continue;
        }
        let permanent = s(&r, "state") == "permanent"
            || arr(&r["flags"])
                .iter()
                .any(|f| f.as_str() == Some("permanent"));
        if !permanent {
            continue;
        }
        put(
            &mut o,
            &place,
            "fdb",
            format!("{dev} {} dst {}", s(&r, "mac"), s(&r, "dst")),
        );
    }
    for r in arr(&json(ns, &["ip", "-j", "rule", "show"])?) {
        if proto_is_ours(&r) {
            put(
                &mut o,
                &place,
                "rule",
                format!("iif {} table {}", s(&r, "iif"), s(&r, "table")),
            );
        }
    }
    if let Ok(Some(t)) = crate::steering::read_table(Some(ns), steering_table) {
        for dev in t.hooked_devices() {
            put(&mut o, &place, "steer", format!("chain on {dev}"));
        }
    }
    for (host, tunnel) in wg_peers {
        put(&mut o, &place, "wg_peer", format!("{host} tunnel {tunnel}"));
    }
    let filter = crate::exec(
        Some(ns),
        &["nft", "-j", "list", "table", "ip", steering_table],
    )?;
    if filter.success() && filter.stdout.contains("\"rule\"") {
        put(&mut o, &place, "filter", "vxlan input filter".into());
    }
    Ok(o)
}

/// Missing (expected, absent) and leftover (present, unexpected) objects, one
/// human-readable line each. Places and kinds the expectation does not list are not
/// compared (dump more than you expect, never less).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff {
    pub missing: Vec<String>,
    pub leftover: Vec<String>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.leftover.is_empty()
    }

    pub fn count(&self) -> usize {
        self.missing.len() + self.leftover.len()
    }
}

impl std::fmt::Display for Diff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for m in &self.missing {
            writeln!(f, "missing:  {m}")?;
        }
        for l in &self.leftover {
            writeln!(f, "leftover: {l}")?;
        }
        Ok(())
    }
}

pub fn diff(expected: &Objects, actual: &Objects) -> Diff {
    let mut d = Diff::default();
    let empty = BTreeSet::new();
    let keys: BTreeSet<&(String, String)> = expected.keys().chain(actual.keys()).collect();
    for key in keys {
        let want = expected.get(key).unwrap_or(&empty);
        let have = actual.get(key).unwrap_or(&empty);
        let (place, kind) = key;
        for m in want.difference(have) {
            d.missing.push(format!("{place}: {kind} {m}"));
        }
        // A place the expectation leaves out entirely (a router namespace that is
        // gone) is not judged.
        if expected.contains_key(key) {
            for l in have.difference(want) {
                d.leftover.push(format!("{place}: {kind} {l}"));
            }
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_follow_the_documented_rule() {
        assert_eq!(
            router_mac(1000, "10.2.0.254".parse().unwrap()),
            "02:e8:0a:02:00:fe"
        );
    }

    #[test]
    fn diff_lists_missing_and_leftover() {
        let mut want = Objects::new();
        put(&mut want, "host 1", "fdb", "a".into());
        put(&mut want, "host 1", "fdb", "b".into());
        let mut have = Objects::new();
        put(&mut have, "host 1", "fdb", "b".into());
        put(&mut have, "host 1", "fdb", "c".into());
        put(&mut have, "router x", "route", "gone ns".into());
        let d = diff(&want, &have);
        assert_eq!(d.missing, vec!["host 1: fdb a"]);
        assert_eq!(d.leftover, vec!["host 1: fdb c"]);
    }
}
