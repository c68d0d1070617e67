//! Pieces of `vrt-relay-bench` (issue 17): UDP blocks between simulated hosts, and
//! the readers that tell which path a host uses and whether a relay still forwards.
//!
//! UDP blocks are nftables rules in a `bridge` table of the underlay namespace
//! (`relayblocks_<prefix>`, forward hook of `br0`, priority -210, before the partition
//! and loss rules of [`crate::underlay`]): UDP between two hosts' underlay addresses is
//! dropped both ways, so gossip, path probes and VXLAN between them stop while ICMP and
//! TCP still pass. The whole set of blocked pairs is rewritten on each change; deleting
//! the underlay namespace (topology drop) removes the table.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::cmd::{exec, exec_input, exec_ok};
use crate::topology::Topology;

/// What a host's discovery.json says about its path to one peer host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathState {
    /// `direct`, `relay` or `unreachable`.
    pub via: String,
    /// The relay's address when `via` is `relay`.
    pub relay_addr: Option<Ipv4Addr>,
}

impl PathState {
    pub fn is_direct(&self) -> bool {
        self.via == "direct"
    }
    /// Relayed through `r` (any relay when None).
    pub fn is_relayed(&self, r: Option<Ipv4Addr>) -> bool {
        self.via == "relay" && (r.is_none() || self.relay_addr == r)
    }
}

/// The entry of discovery.json's `paths` whose `peer_addr` is `peer`. Pure.
pub fn path_to(discovery: &Value, peer: Ipv4Addr) -> Option<PathState> {
    let want = peer.to_string();
    let p = discovery
        .get("paths")?
        .as_array()?
        .iter()
        .find(|p| p["peer_addr"].as_str() == Some(want.as_str()))?;
    Some(PathState {
        via: p["via"].as_str()?.to_string(),
        relay_addr: p["relay_addr"].as_str().and_then(|a| a.parse().ok()),
    })
}

/// Sums every `counter packets N bytes M` of an `nft list` text: (packets, bytes). Pure.
pub fn nft_counters(text: &str) -> (u64, u64) {
    let mut packets = 0u64;
    let mut bytes = 0u64;
    let words: Vec<&str> = text.split_whitespace().collect();
    for w in words.windows(5) {
        if w[0] == "counter" && w[1] == "packets" && w[3] == "bytes" {
            if let (Ok(p), Ok(b)) = (
                w[2].parse::<u64>(),
                w[4].trim_end_matches(',').parse::<u64>(),
            ) {
                packets = packets.saturating_add(p);
                bytes = bytes.saturating_add(b);
            }
        }
    }
    (packets, bytes)
}

/// The packets the relay table of a host has forwarded (its `fwd` rules' counters):
/// `nft list table netdev <table>`; 0 when the host has no such table.
pub fn relay_forwarded(ns: &str, table: &str) -> u64 {
    exec(Some(ns), &["nft", "list", "table", "netdev", table])
        .ok()
        .filter(|o| o.code == Some(0))
        .map(|o| nft_counters(&o.stdout).0)
        .unwrap_or(0)
}

/// Watches traffic move back from a relay to the direct path: fed with polls (time
/// since the direct path was restored, whether both hosts report `direct`, the relays'
/// forwarded-packet counter), it says when the move was complete: both hosts direct,
/// and the counter not rising any more (its last rise is the last relayed packet seen).
/// Pure.
#[derive(Debug, Clone, Default)]
pub struct ReturnWatch {
    /// First poll at which both hosts reported direct (and kept it).
    pub direct_at_ms: Option<u64>,
    /// Poll at which the counter last rose.
    pub last_rise_ms: Option<u64>,
    last_counter: Option<u64>,
    last_poll_ms: u64,
}

impl ReturnWatch {
    pub fn poll(&mut self, t_ms: u64, both_direct: bool, counter: u64) {
        if both_direct {
            self.direct_at_ms.get_or_insert(t_ms);
        } else {
            self.direct_at_ms = None;
        }
        if let Some(prev) = self.last_counter {
            if counter > prev {
                self.last_rise_ms = Some(t_ms);
            }
        }
        self.last_counter = Some(counter);
        self.last_poll_ms = t_ms;
    }

    /// Done once both hosts are direct and the counter has not risen for `quiet_ms`
    /// (with traffic flowing, so that a relayed path would have moved it).
    pub fn done(&self, quiet_ms: u64) -> bool {
        let Some(direct) = self.direct_at_ms else {
            return false;
        };
        let since = self.last_rise_ms.unwrap_or(0).max(direct);
        self.last_poll_ms >= since + quiet_ms
    }

    /// When traffic was back on the direct path: the later of "both direct" and the last
    /// relayed packet seen.
    pub fn returned_ms(&self) -> Option<u64> {
        let direct = self.direct_at_ms?;
        Some(direct.max(self.last_rise_ms.unwrap_or(0)))
    }
}

/// UDP blocks between pairs of simulated hosts (see the module's doc).
pub struct UdpBlocks {
    underlay_ns: String,
    table: String,
    pairs: RefCell<BTreeSet<(Ipv4Addr, Ipv4Addr)>>,
}

impl UdpBlocks {
    pub fn new(topo: &Topology) -> UdpBlocks {
        UdpBlocks {
            underlay_ns: topo.underlay_ns.clone(),
            table: format!("relayblocks_{}", topo.prefix),
            pairs: RefCell::new(BTreeSet::new()),
        }
    }

    fn key(topo: &Topology, a: usize, b: usize) -> (Ipv4Addr, Ipv4Addr) {
        let (x, y) = (topo.host(a).underlay_ip, topo.host(b).underlay_ip);
        (x.min(y), x.max(y))
    }

    /// Blocks UDP between host `a` and each host of `others`.
    pub fn block(&self, topo: &Topology, a: usize, others: &[usize]) -> Result<()> {
        for &b in others {
            self.pairs.borrow_mut().insert(Self::key(topo, a, b));
        }
        self.apply()
    }

    /// Lets UDP between host `a` and each host of `others` through again.
    pub fn unblock(&self, topo: &Topology, a: usize, others: &[usize]) -> Result<()> {
        for &b in others {
            self.pairs.borrow_mut().remove(&Self::key(topo, a, b));
        }
        self.apply()
    }

    /// The nft script that makes the table hold exactly the current pairs. Pure.
    pub fn script(table: &str, pairs: &BTreeSet<(Ipv4Addr, Ipv4Addr)>) -> String {
        let mut s = format!(
            "add table bridge {table}\n\
             add chain bridge {table} blocks {{ type filter hook forward priority -210; policy accept; }}\n\
             flush chain bridge {table} blocks\n"
        );
        for (x, y) in pairs {
            s.push_str(&format!(
                "add rule bridge {table} blocks ip saddr {x} ip daddr {y} meta l4proto udp counter drop\n\
                 add rule bridge {table} blocks ip saddr {y} ip daddr {x} meta l4proto udp counter drop\n"
            ));
        }
        s
    }

    fn apply(&self) -> Result<()> {
        let script = Self::script(&self.table, &self.pairs.borrow());
        exec_input(
            Some(&self.underlay_ns),
            &["nft", "-f", "-"],
            script.as_bytes(),
        )
        .and_then(|o| o.check())
        .context("setting the UDP blocks")?;
        Ok(())
    }

    /// The table as `nft list` shows it, for diagnostics.
    pub fn listing(&self) -> String {
        exec_ok(
            Some(&self.underlay_ns),
            &["nft", "list", "table", "bridge", &self.table],
        )
        .map(|o| o.stdout)
        .unwrap_or_default()
    }
}

impl Drop for UdpBlocks {
    fn drop(&mut self) {
        let _ = exec(
            Some(&self.underlay_ns),
            &["nft", "delete", "table", "bridge", &self.table],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn path_to_finds_the_peer_entry() {
        let doc = json!({"paths": [
            {"node": "00000000000000aa", "peer_addr": "198.18.0.2", "via": "relay",
             "relay_node": "00000000000000bb", "relay_addr": "198.18.0.3"},
            {"node": "00000000000000cc", "peer_addr": "198.18.0.4", "via": "direct",
             "relay_node": null, "relay_addr": null},
        ]});
        let p = path_to(&doc, "198.18.0.2".parse().unwrap()).unwrap();
        assert!(p.is_relayed(None));
        assert!(p.is_relayed(Some("198.18.0.3".parse().unwrap())));
        assert!(!p.is_relayed(Some("198.18.0.4".parse().unwrap())));
        assert!(!p.is_direct());
        let d = path_to(&doc, "198.18.0.4".parse().unwrap()).unwrap();
        assert!(d.is_direct());
        assert_eq!(d.relay_addr, None);
        assert_eq!(path_to(&doc, "198.18.0.9".parse().unwrap()), None);
        assert_eq!(path_to(&json!({}), "198.18.0.2".parse().unwrap()), None);
    }

    #[test]
    fn nft_counters_add_up() {
        let text = "table netdev vrtvrouter_relay {\n\
            \tset relay_1000 {\n\t\ttype ether_addr\n\t\telements = { 02:e8:0a:02:00:fe }\n\t}\n\
            \tchain relay_1000 {\n\t\ttype filter hook ingress device \"vxlan1000\" priority filter; policy accept;\n\
            \t\tether daddr @relay_1000 counter packets 12 bytes 1200 fwd to \"vxlan1000\"\n\t}\n\
            \tchain relay_1001 {\n\t\tether daddr @relay_1001 counter packets 3 bytes 300 fwd to \"vxlan1001\"\n\t}\n}\n";
        assert_eq!(nft_counters(text), (15, 1500));
        assert_eq!(nft_counters(""), (0, 0));
    }

    #[test]
    fn return_watch_waits_for_direct_and_a_quiet_counter() {
        let mut w = ReturnWatch::default();
        w.poll(0, false, 100);
        w.poll(100, false, 110);
        // Both direct, but the relay still forwards.
        w.poll(200, true, 120);
        assert!(!w.done(300));
        w.poll(300, true, 125);
        w.poll(400, true, 125);
        w.poll(500, true, 125);
        assert!(!w.done(300));
        w.poll(600, true, 125);
        assert!(w.done(300));
        assert_eq!(w.returned_ms(), Some(300));
        // A host that flips back to relay restarts the "direct" clock.
        let mut w = ReturnWatch::default();
        w.poll(0, true, 5);
        w.poll(100, false, 5);
        w.poll(200, true, 5);
        w.poll(600, true, 5);
        assert!(w.done(300));
        assert_eq!(w.returned_ms(), Some(200));
        // Never direct: never done.
        let mut w = ReturnWatch::default();
        for t in 0..10 {
            w.poll(t * 100, false, 5);
        }
        assert!(!w.done(0));
        assert_eq!(w.returned_ms(), None);
    }

    #[test]
    fn block_script_drops_udp_both_ways_and_only_the_listed_pairs() {
        let mut pairs = BTreeSet::new();
        let empty = UdpBlocks::script("t", &pairs);
        assert!(empty.contains("flush chain bridge t blocks"));
        assert!(!empty.contains("drop"));
        pairs.insert(("198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap()));
        let s = UdpBlocks::script("t", &pairs);
        assert!(s.contains("ip saddr 198.18.0.1 ip daddr 198.18.0.2 meta l4proto udp counter drop"));
        assert!(s.contains("ip saddr 198.18.0.2 ip daddr 198.18.0.1 meta l4proto udp counter drop"));
        assert_eq!(s.matches("drop").count(), 2);
    }
}
