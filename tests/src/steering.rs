//! Port steering as the tests see it: discovery's `netdev` table in a host namespace
//! (read with `nft -j`, as an operator would), and the host counters that prove the host
//! stayed off the overlay path (Docker's raw drops, `Ip: ForwDatagrams`).
//!
//! The table is `netdev <prefix>vrouter` (discovery's `VROUTER_STEERING_TABLE`, which
//! [`crate::mesh::Mesh`] always sets), so a test never touches a production table.
//! Layout and rule comments follow CONTRACT.md (issue 15): per steered port an ingress
//! chain whose rule carries the comment `port <ifname> <stack>`, per router port one
//! whose rule carries `deliver <stack>`, and counters `own <stack>` and
//! `steer <stack> <remote>`.

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cmd::exec;

/// Discovery's steering setting (`VROUTER_STEERING`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steering {
    /// netdev chains at the ports (discovery's default).
    Ports,
    /// The host's policy rule per stack bridge (the fallback).
    Rule,
}

impl Steering {
    pub fn as_str(self) -> &'static str {
        match self {
            Steering::Ports => "ports",
            Steering::Rule => "rule",
        }
    }

    /// `VROUTER_TEST_STEERING` (`ports` or `rule`), which makes every mesh of a test run
    /// use that mode unless the test sets one itself; `None` leaves discovery's default.
    /// Panics on another value: a typo must not silently test the default.
    pub fn from_env() -> Option<Steering> {
        match std::env::var("VROUTER_TEST_STEERING").ok()?.as_str() {
            "" => None,
            "ports" => Some(Steering::Ports),
            "rule" => Some(Steering::Rule),
            other => panic!("VROUTER_TEST_STEERING={other}: use ports or rule"),
        }
    }
}

/// The steering table's name for this test run: `<prefix>vrouter`.
pub fn table_name() -> String {
    format!("{}vrouter", crate::prefix())
}

/// A chain of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainInfo {
    pub name: String,
    /// `ingress` for a base chain, `None` for a regular one.
    pub hook: Option<String>,
    /// The device an ingress chain is bound to.
    pub dev: Option<String>,
}

/// A rule of the table, with its comment and counter (zero when it has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    pub chain: String,
    pub comment: Option<String>,
    pub packets: u64,
    pub bytes: u64,
}

/// Packets and bytes of a counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

impl std::ops::Sub for Count {
    type Output = Count;
    fn sub(self, o: Count) -> Count {
        Count {
            packets: self.packets.saturating_sub(o.packets),
            bytes: self.bytes.saturating_sub(o.bytes),
        }
    }
}

/// The steering table as `nft -j list table netdev <name>` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetdevTable {
    pub chains: Vec<ChainInfo>,
    pub rules: Vec<RuleInfo>,
    /// Set and map names.
    pub sets: Vec<String>,
}

impl NetdevTable {
    /// Parses `nft -j list table netdev ...` output (`json`) and the text listing of the
    /// same table (`text`), which names each ingress chain's device (nft 1.0.6 leaves
    /// `dev` out of its JSON).
    pub fn parse(json: &str, text: &str) -> Result<NetdevTable> {
        let devs = chain_devices(text);
        let v: Value = serde_json::from_str(json).context("nft -j output is not JSON")?;
        let items = v["nftables"]
            .as_array()
            .context("nft -j output has no nftables array")?;
        let mut t = NetdevTable::default();
        for item in items {
            if let Some(c) = item.get("chain") {
                let dev = match &c["dev"] {
                    Value::String(s) => Some(s.clone()),
                    Value::Array(a) => a.first().and_then(|d| d.as_str()).map(str::to_string),
                    _ => None,
                };
                let name = c["name"].as_str().unwrap_or_default().to_string();
                let dev = dev.or_else(|| {
                    devs.iter()
                        .find(|(chain, _)| *chain == name)
                        .map(|(_, d)| d.clone())
                });
                t.chains.push(ChainInfo {
                    name,
                    hook: c["hook"].as_str().map(str::to_string),
                    dev,
                });
            } else if let Some(r) = item.get("rule") {
                let mut count = Count::default();
                for e in r["expr"].as_array().map(Vec::as_slice).unwrap_or_default() {
                    if let Some(c) = e.get("counter") {
                        count.packets += c["packets"].as_u64().unwrap_or(0);
                        count.bytes += c["bytes"].as_u64().unwrap_or(0);
                    }
                }
                t.rules.push(RuleInfo {
                    chain: r["chain"].as_str().unwrap_or_default().to_string(),
                    comment: r["comment"].as_str().map(str::to_string),
                    packets: count.packets,
                    bytes: count.bytes,
                });
            } else if let Some(s) = item.get("set").or_else(|| item.get("map")) {
                t.sets
                    .push(s["name"].as_str().unwrap_or_default().to_string());
            }
        }
        Ok(t)
    }

    /// The ingress chain bound to `dev`, if any.
    pub fn chain_on(&self, dev: &str) -> Option<&ChainInfo> {
        self.chains
            .iter()
            .find(|c| c.hook.as_deref() == Some("ingress") && c.dev.as_deref() == Some(dev))
    }

    /// Devices that have an ingress chain, sorted.
    pub fn hooked_devices(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .chains
            .iter()
            .filter(|c| c.hook.as_deref() == Some("ingress"))
            .filter_map(|c| c.dev.clone())
            .collect();
        v.sort();
        v
    }

    /// The sum of the counters of the rules whose comment is `comment`.
    pub fn counter(&self, comment: &str) -> Count {
        self.rules
            .iter()
            .filter(|r| r.comment.as_deref() == Some(comment))
            .fold(Count::default(), |a, r| Count {
                packets: a.packets + r.packets,
                bytes: a.bytes + r.bytes,
            })
    }

    /// Whether a rule with comment `comment` exists.
    pub fn has_rule(&self, comment: &str) -> bool {
        self.rules
            .iter()
            .any(|r| r.comment.as_deref() == Some(comment))
    }
}

/// `(chain, device)` of every chain in an `nft list table` text listing that has
/// `hook ingress device "<dev>"`.
pub fn chain_devices(text: &str) -> Vec<(String, String)> {
    let mut v = Vec::new();
    let mut chain: Option<String> = None;
    for l in text.lines() {
        let t = l.trim();
        if let Some(rest) = t.strip_prefix("chain ") {
            chain = rest.strip_suffix('{').map(|n| n.trim().to_string());
        } else if let (Some(c), Some(i)) = (&chain, t.find("hook ingress device ")) {
            let rest = &t[i + "hook ingress device ".len()..];
            let dev = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .trim_matches('"');
            v.push((c.clone(), dev.to_string()));
        }
    }
    v
}

/// The steering table in host namespace `ns` (`None`: this process's), or `None` when
/// there is no such table.
pub fn read_table(ns: Option<&str>, table: &str) -> Result<Option<NetdevTable>> {
    let out = exec(ns, &["nft", "-j", "list", "table", "netdev", table])?;
    if !out.success() {
        let err = out.stderr.to_lowercase();
        if err.contains("no such file") || err.contains("does not exist") {
            return Ok(None);
        }
        bail!("nft -j list table netdev {table}: {}", out.stderr.trim());
    }
    let text = exec(ns, &["nft", "list", "table", "netdev", table])?;
    if !text.success() {
        // Deleted between the two listings.
        return Ok(None);
    }
    NetdevTable::parse(&out.stdout, &text.stdout).map(Some)
}

/// `nft list ruleset` text without the block of `table <family> <name>`: for "the
/// firewall never changed" comparisons, which must not see discovery's own table.
pub fn without_table(ruleset: &str, family: &str, name: &str) -> String {
    let head = format!("table {family} {name} {{");
    let mut out = String::new();
    let mut skipping = false;
    for l in ruleset.lines() {
        if !skipping && l.trim_end() == head {
            skipping = true;
            continue;
        }
        if skipping {
            if l.trim_end() == "}" {
                skipping = false;
            }
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// `Ip: ForwDatagrams` of `/proc/net/snmp` as read in namespace `ns`: IPv4 packets the
/// namespace's IP stack forwarded (bridged frames are not counted).
pub fn forw_datagrams(ns: Option<&str>) -> Result<u64> {
    let out = crate::cmd::exec_ok(ns, &["cat", "/proc/net/snmp"])?.stdout;
    snmp_value(&out, "Ip", "ForwDatagrams")
        .with_context(|| format!("no Ip: ForwDatagrams in /proc/net/snmp of {ns:?}"))
}

/// One value of `/proc/net/snmp`'s text: a header line `<group>: names...` followed by
/// a value line `<group>: values...`.
pub fn snmp_value(snmp: &str, group: &str, name: &str) -> Option<u64> {
    let tag = format!("{group}:");
    let mut lines = snmp.lines().filter(|l| l.starts_with(&tag));
    let names = lines.next()?;
    let values = lines.next()?;
    let i = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "netdev", "name": "vrtvrouter", "handle": 3}}, {"set": {"family": "netdev", "name": "src_0a0100fe", "table": "vrtvrouter", "type": "ipv4_addr", "handle": 1, "flags": ["interval"]}}, {"map": {"family": "netdev", "name": "macs_0a0100fe", "table": "vrtvrouter", "type": "ether_addr", "handle": 2, "map": "iface_index"}}, {"chain": {"family": "netdev", "table": "vrtvrouter", "name": "out_0a0100fe", "handle": 3}}, {"chain": {"family": "netdev", "table": "vrtvrouter", "name": "p_12", "handle": 4, "type": "filter", "hook": "ingress", "prio": 0, "policy": "accept", "dev": "v-a-svc"}}, {"chain": {"family": "netdev", "table": "vrtvrouter", "name": "r_11", "handle": 5, "type": "filter", "hook": "ingress", "prio": 0, "policy": "accept", "dev": ["v-a-rtr"]}}, {"rule": {"family": "netdev", "table": "vrtvrouter", "chain": "p_12", "handle": 6, "comment": "port v-a-svc a", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "protocol"}}, "right": "ip"}}, {"counter": {"packets": 7, "bytes": 700}}, {"jump": {"target": "out_0a0100fe"}}]}}, {"rule": {"family": "netdev", "table": "vrtvrouter", "chain": "r_11", "handle": 7, "comment": "deliver a", "expr": [{"counter": {"packets": 3, "bytes": 300}}]}}]}"#;

    const TEXT: &str = "table netdev vrtvrouter {\n\tchain out_0a0100fe {\n\t}\n\n\tchain p_12 {\n\t\ttype filter hook ingress device \"v-a-svc\" priority filter; policy accept;\n\t\tmeta protocol ip counter packets 7 bytes 700 jump out_0a0100fe comment \"port v-a-svc a\"\n\t}\n}\n";

    #[test]
    fn parses_chains_rules_and_counters() {
        let t = NetdevTable::parse(LISTING, TEXT).unwrap();
        assert_eq!(t.hooked_devices(), ["v-a-rtr", "v-a-svc"]);
        assert_eq!(t.chain_on("v-a-svc").unwrap().name, "p_12");
        assert_eq!(t.chain_on("v-a-rtr").unwrap().name, "r_11");
        assert!(t.chain_on("v-b-svc").is_none());
        assert_eq!(
            t.counter("port v-a-svc a"),
            Count {
                packets: 7,
                bytes: 700
            }
        );
        assert_eq!(t.counter("deliver a").packets, 3);
        assert_eq!(t.counter("own a"), Count::default());
        assert!(t.has_rule("deliver a") && !t.has_rule("own a"));
        assert_eq!(t.sets, ["src_0a0100fe", "macs_0a0100fe"]);
        assert!(NetdevTable::parse("not json", "").is_err());
        // The device from the text listing when the JSON leaves it out (nft 1.0.6).
        let no_dev = LISTING.replace(r#", "dev": "v-a-svc""#, "");
        let t = NetdevTable::parse(&no_dev, TEXT).unwrap();
        assert_eq!(t.chain_on("v-a-svc").unwrap().name, "p_12");
        assert_eq!(
            chain_devices(TEXT),
            [("p_12".to_string(), "v-a-svc".to_string())]
        );
    }

    #[test]
    fn drops_one_table_from_a_ruleset() {
        let rs = "table ip vrt_raw {\n\tchain PREROUTING {\n\t}\n}\ntable netdev vrtvrouter {\n\tchain p_1 {\n\t\ttype filter hook ingress device \"v\" priority filter; policy accept;\n\t}\n}\ntable ip vrt_nat {\n}\n";
        let out = without_table(rs, "netdev", "vrtvrouter");
        assert_eq!(
            out,
            "table ip vrt_raw {\n\tchain PREROUTING {\n\t}\n}\ntable ip vrt_nat {\n}\n"
        );
        assert_eq!(without_table(rs, "netdev", "other"), rs);
    }

    #[test]
    fn reads_snmp_values() {
        let snmp = "Ip: Forwarding DefaultTTL InReceives ForwDatagrams\nIp: 1 64 2851 42\nIcmp: InMsgs\nIcmp: 3\n";
        assert_eq!(snmp_value(snmp, "Ip", "ForwDatagrams"), Some(42));
        assert_eq!(snmp_value(snmp, "Icmp", "InMsgs"), Some(3));
        assert_eq!(snmp_value(snmp, "Ip", "Nope"), None);
        assert_eq!(snmp_value(snmp, "Tcp", "RtoMin"), None);
    }
}
