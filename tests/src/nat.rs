//! Several underlay subnets, NAT and UDP blocks for a gossip mesh (issue 17).
//!
//! The topology's underlay namespace (`<p>-ul`, bridge `br0`, 198.18.0.0/24) is the
//! "core": the public network. A [`Site`] is a namespace `<p>-siteS` with an uplink `up0` on
//! the core (198.18.0.(200+S)/24, default route via the core gateway 198.18.0.254) and a
//! LAN bridge `lan` (192.168.S.254/24). A host attached to a site moves its underlay link
//! from `br0` onto the site's `lan`, and its `eth0` becomes 192.168.S.<host index>/24 with
//! a default route via the site (so tunnel address claims and last octets stay unique).
//! A site is one of ([`SiteKind`]):
//! - `Routed`: a plain router; the core routes 192.168.S.0/24 to its uplink (the core
//!   namespace forwards, without ICMP redirects), so its hosts reach and are reached by
//!   everyone at their own addresses.
//! - `OneToOne`: nftables `dnat` of a public address 198.18.0.(100+host) to one host and
//!   `snat` of that host to it (ports kept); the site's other hosts share the uplink
//!   address by a plain `masquerade`.
//! - `MasqueradeRandom`: every host behind `masquerade random` (the source port of each
//!   new flow is random), nothing reaches them from outside but replies.
//!
//! UDP blocks ([`NatNet::block`], [`NatNet::isolate`]) are rules with counters in a
//! `bridge` table `<p>_block` of the core and of every site (chains on the prerouting and
//! output hooks), matching every address a host has (its own and its public one): they
//! drop a pair's UDP whether it crosses the core, a site's LAN or a NAT.
//!
//! No host behind a site gets `VROUTER_ADVERTISE_ADDR`: discovery must find out. Hosts
//! join the first host's reachable address ([`NatMesh::start_all`]). Everything lives in
//! namespaces named with the test prefix: the sites go when the [`NatNet`] drops (before
//! the topology, which removes every `<p>-*` namespace again), also when a test fails.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::ops::{Deref, DerefMut};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cleanup::delete_namespace;
use crate::cmd::{exec, exec_input, exec_ok};
use crate::gossip::GossipMesh;
use crate::mesh::StackDef;
use crate::topology::{Topology, UNDERLAY_GW};

/// What a site's router does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteKind {
    /// Routes its subnet; no NAT.
    Routed,
    /// 1:1 NAT (dnat + snat) of a public address per mapped host; masquerade for the rest.
    OneToOne,
    /// `masquerade random` for everyone.
    MasqueradeRandom,
}

/// One underlay subnet behind a router namespace.
#[derive(Debug, Clone)]
pub struct Site {
    /// 1-based.
    pub index: u8,
    /// `<prefix>-site<index>`.
    pub ns: String,
    pub kind: SiteKind,
    /// The router's address on the core (198.18.0.(200+index)); the NAT address.
    pub uplink_ip: Ipv4Addr,
    /// The router's address on the site's LAN (192.168.index.254).
    pub lan_gw: Ipv4Addr,
    /// Hosts attached, with their public address (1:1 NAT only).
    pub hosts: Vec<(usize, Option<Ipv4Addr>)>,
}

impl Site {
    pub fn subnet(&self) -> String {
        format!("192.168.{}.0/24", self.index)
    }

    /// `nft list ruleset` of the site (diagnostics).
    pub fn ruleset(&self) -> String {
        exec(Some(&self.ns), &["nft", "list", "ruleset"])
            .map(|o| o.stdout)
            .unwrap_or_default()
    }
}

/// Name of the NAT table in a site.
const NAT_TABLE: &str = "sitenat";
/// Name of a site's table counting what it forwards (diagnostics only).
const FWD_TABLE: &str = "sitefwd";

/// The sites, public addresses and UDP blocks of one topology.
pub struct NatNet {
    prefix: String,
    core_ns: String,
    sites: Vec<Site>,
    /// Per host: (its underlay address, its public address if 1:1 NATed).
    addrs: BTreeMap<usize, (Ipv4Addr, Option<Ipv4Addr>)>,
}

impl NatNet {
    pub fn new(topo: &Topology) -> NatNet {
        NatNet {
            prefix: topo.prefix.clone(),
            core_ns: topo.underlay_ns.clone(),
            sites: Vec::new(),
            addrs: topo
                .hosts()
                .iter()
                .map(|h| (h.index, (h.underlay_ip, None)))
                .collect(),
        }
    }

    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    pub fn site(&self, s: u8) -> &Site {
        &self.sites[s as usize - 1]
    }

    /// The site host `host` is attached to (`None`: on the core).
    pub fn site_of(&self, host: usize) -> Option<&Site> {
        self.sites
            .iter()
            .find(|s| s.hosts.iter().any(|(h, _)| *h == host))
    }

    /// The public address of a 1:1 NATed host.
    pub fn public_ip(&self, host: usize) -> Option<Ipv4Addr> {
        self.addrs.get(&host).and_then(|a| a.1)
    }

    /// The address other hosts of the core see `host`'s packets come from: its public
    /// address (1:1), its NAT's uplink (masquerade), else its own.
    pub fn seen_from_core(&self, topo: &Topology, host: usize) -> Ipv4Addr {
        if let Some(p) = self.public_ip(host) {
            return p;
        }
        match self.site_of(host) {
            Some(s) if s.kind != SiteKind::Routed => s.uplink_ip,
            _ => topo.host(host).underlay_ip,
        }
    }

    /// The address a host outside `host`'s site can send to and reach it, if any
    /// (`None` behind `masquerade random`, or behind a 1:1 site without a mapping).
    pub fn reachable_ip(&self, topo: &Topology, host: usize) -> Option<Ipv4Addr> {
        if let Some(p) = self.public_ip(host) {
            return Some(p);
        }
        match self.site_of(host) {
            Some(s) if s.kind != SiteKind::Routed => None,
            _ => Some(topo.host(host).underlay_ip),
        }
    }

    /// Every namespace the UDP blocks live in: the core and every site.
    fn block_namespaces(&self) -> Vec<String> {
        let mut v = vec![self.core_ns.clone()];
        v.extend(self.sites.iter().map(|s| s.ns.clone()));
        v
    }

    /// Creates a site (namespace, uplink, LAN bridge, NAT or core route). Returns its
    /// index.
    pub fn add_site(&mut self, kind: SiteKind) -> Result<u8> {
        let idx = self.sites.len() as u8 + 1;
        if idx > 40 {
            bail!("at most 40 sites");
        }
        let ns = format!("{}-site{idx}", self.prefix);
        exec_ok(None, &["ip", "netns", "add", &ns])?;
        let uplink_ip = Ipv4Addr::new(198, 18, 0, 200 + idx);
        let lan_gw = Ipv4Addr::new(192, 168, idx, 254);
        // Recorded first: a failure below still gets the namespace removed on drop.
        self.sites.push(Site {
            index: idx,
            ns: ns.clone(),
            kind,
            uplink_ip,
            lan_gw,
            hosts: Vec::new(),
        });
        let n = Some(ns.as_str());
        for kv in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.default.send_redirects=0",
        ] {
            exec_ok(n, &["sysctl", "-q", "-w", kv])?;
        }
        exec_ok(n, &["ip", "link", "set", "lo", "up"])?;
        let core_port = format!("s{idx}");
        exec_ok(
            None,
            &[
                "ip",
                "link",
                "add",
                "up0",
                "netns",
                &ns,
                "type",
                "veth",
                "peer",
                "name",
                &core_port,
                "netns",
                &self.core_ns,
            ],
        )?;
        let c = Some(self.core_ns.as_str());
        exec_ok(c, &["ip", "link", "set", &core_port, "master", "br0", "up"])?;
        // Packets reach a NAT with their checksums done, as from a wire (see attach).
        exec_ok(c, &["ethtool", "-K", &core_port, "tx", "off"])?;
        exec_ok(
            n,
            &[
                "ip",
                "addr",
                "add",
                &format!("{uplink_ip}/24"),
                "dev",
                "up0",
            ],
        )?;
        exec_ok(n, &["ip", "link", "set", "up0", "up"])?;
        exec_ok(
            n,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &UNDERLAY_GW.to_string(),
                "dev",
                "up0",
            ],
        )?;
        exec_ok(
            n,
            &[
                "ip",
                "link",
                "add",
                "lan",
                "type",
                "bridge",
                "stp_state",
                "0",
            ],
        )?;
        exec_ok(
            n,
            &["ip", "addr", "add", &format!("{lan_gw}/24"), "dev", "lan"],
        )?;
        exec_ok(n, &["ip", "link", "set", "lan", "up"])?;
        let nat = match kind {
            SiteKind::Routed => {
                // The core routes the site's subnet to its uplink (hosts on br0 send it to
                // their default gateway, the core, which forwards it back out of br0).
                for kv in [
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.default.send_redirects=0",
                    "net.ipv4.conf.br0.send_redirects=0",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.br0.rp_filter=0",
                ] {
                    exec_ok(c, &["sysctl", "-q", "-w", kv])?;
                }
                exec_ok(
                    c,
                    &[
                        "ip",
                        "route",
                        "replace",
                        &format!("192.168.{idx}.0/24"),
                        "via",
                        &uplink_ip.to_string(),
                        "dev",
                        "br0",
                    ],
                )?;
                None
            }
            SiteKind::OneToOne => Some("masquerade"),
            SiteKind::MasqueradeRandom => Some("masquerade random"),
        };
        // Counters of what the site forwards, per direction and port (printed on
        // failure).
        let mut fwd = format!(
            "table ip {FWD_TABLE} {{\n\tchain counts {{ type filter hook forward priority 0; policy accept;\n"
        );
        for dir in ["iifname", "oifname"] {
            for (what, m) in [
                ("gossip", "udp dport 7950"),
                ("gossip-reply", "udp sport 7950"),
                ("vxlan", "udp dport 4789"),
                ("wg", "udp dport 51820"),
                ("wg-reply", "udp sport 51820"),
                ("icmp", "ip protocol icmp"),
            ] {
                fwd.push_str(&format!(
                    "\t\t{dir} \"up0\" {m} counter comment \"{dir}-up0-{what}\"\n"
                ));
            }
        }
        fwd.push_str("\t}\n}\n");
        exec_input(n, &["nft", "-f", "-"], fwd.as_bytes())
            .with_context(|| format!("site {idx} counters:\n{fwd}"))?;
        if let Some(masq) = nat {
            let script = format!(
                "table ip {NAT_TABLE} {{\n\
                 \tchain pre {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
                 \tchain post {{ type nat hook postrouting priority srcnat; policy accept;\n\
                 \t\toifname \"up0\" ip saddr 192.168.{idx}.0/24 counter {masq} comment \"site-masq\"\n\
                 \t}}\n\
                 }}\n"
            );
            exec_input(n, &["nft", "-f", "-"], script.as_bytes())
                .with_context(|| format!("site {idx} NAT:\n{script}"))?;
        }
        self.sync_blocks()?;
        Ok(idx)
    }

    /// Moves host `host`'s underlay link from the core onto site `s`'s LAN: `eth0`
    /// becomes 192.168.s.<host>/24 with a default route via the site. With `public` (1:1
    /// sites only) the host gets public address 198.18.0.(100+host): dnat in, snat out.
    /// Before discovery starts on the host. Updates the topology's `underlay_ip`.
    pub fn attach(&mut self, topo: &mut Topology, host: usize, s: u8, public: bool) -> Result<()> {
        let site = self.site(s).clone();
        if public && site.kind != SiteKind::OneToOne {
            bail!("a public address needs a 1:1 NAT site");
        }
        if self.site_of(host).is_some() {
            bail!("host {host} is already behind a site");
        }
        if host > 99 {
            bail!("host {host}: at most 99 hosts behind sites");
        }
        let port = topo.underlay_port(host);
        let c = Some(self.core_ns.as_str());
        let n = Some(site.ns.as_str());
        exec_ok(c, &["ip", "link", "set", &port, "nomaster"])?;
        exec_ok(c, &["ip", "link", "set", &port, "netns", &site.ns])?;
        exec_ok(n, &["ip", "link", "set", &port, "master", "lan", "up"])?;
        let ip = Ipv4Addr::new(192, 168, s, host as u8);
        let h = topo.host(host).ns.clone();
        let hn = Some(h.as_str());
        // A veth hands packets on with their checksums still to do (CHECKSUM_PARTIAL);
        // for VXLAN (outer UDP checksum over an offloaded inner one) the NAT's checksum
        // update then corrupts the outer checksum and the receiver drops the packet
        // (UdpInCsumErrors): TCP through the overlay fails while pings pass. A packet
        // from a real wire has its checksums done: the host's link computes them.
        exec_ok(hn, &["ethtool", "-K", "eth0", "tx", "off"])?;
        exec_ok(hn, &["ip", "addr", "flush", "dev", "eth0"])?;
        exec_ok(
            hn,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        )?;
        exec_ok(
            hn,
            &[
                "ip",
                "route",
                "replace",
                "default",
                "via",
                &site.lan_gw.to_string(),
                "dev",
                "eth0",
            ],
        )?;
        let hm = topo.host_mut(host);
        hm.underlay_ip = ip;
        hm.underlay_gw = site.lan_gw;
        let pub_ip = public.then(|| Ipv4Addr::new(198, 18, 0, 100 + host as u8));
        if let Some(p) = pub_ip {
            exec_ok(n, &["ip", "addr", "add", &format!("{p}/32"), "dev", "up0"])?;
            let script = format!(
                "add rule ip {NAT_TABLE} pre ip daddr {p} counter dnat to {ip} comment \"dnat-h{host}\"\n\
                 insert rule ip {NAT_TABLE} post oifname \"up0\" ip saddr {ip} counter snat to {p} comment \"snat-h{host}\"\n"
            );
            exec_input(n, &["nft", "-f", "-"], script.as_bytes())
                .with_context(|| format!("1:1 NAT of host {host}"))?;
        }
        self.sites[s as usize - 1].hosts.push((host, pub_ip));
        self.addrs.insert(host, (ip, pub_ip));
        Ok(())
    }

    // --------------------------------------------------------------------------------
    // UDP blocks

    /// Name of the bridge table holding the blocks (in the core and every site).
    pub fn block_table(&self) -> String {
        format!("{}_block", self.prefix)
    }

    /// Creates the block table in every namespace that lacks it (idempotent).
    fn sync_blocks(&self) -> Result<()> {
        let t = self.block_table();
        let script = format!(
            "add table bridge {t}\n\
             add chain bridge {t} pre {{ type filter hook prerouting priority -300; policy accept; }}\n\
             add chain bridge {t} out {{ type filter hook output priority -300; policy accept; }}\n"
        );
        for ns in self.block_namespaces() {
            exec_input(Some(&ns), &["nft", "-f", "-"], script.as_bytes())
                .with_context(|| format!("block table in {ns}"))?;
        }
        Ok(())
    }

    fn host_set(&self, host: usize) -> String {
        let (ip, public) = self
            .addrs
            .get(&host)
            .copied()
            .unwrap_or((Ipv4Addr::UNSPECIFIED, None));
        match public {
            Some(p) => format!("{{ {ip}, {p} }}"),
            None => ip.to_string(),
        }
    }

    fn add_rules(&self, comment: &str, matches: &[String]) -> Result<()> {
        self.sync_blocks()?;
        let t = self.block_table();
        let mut script = String::new();
        for chain in ["pre", "out"] {
            for m in matches {
                script.push_str(&format!(
                    "add rule bridge {t} {chain} {m} meta l4proto udp counter drop comment \"{comment}\"\n"
                ));
            }
        }
        for ns in self.block_namespaces() {
            exec_input(Some(&ns), &["nft", "-f", "-"], script.as_bytes())
                .with_context(|| format!("block {comment} in {ns}:\n{script}"))?;
        }
        Ok(())
    }

    /// The rules tagged `comment` in every namespace: (namespace, handle, packets).
    fn rules(&self, comment: &str) -> Vec<(String, u64, u64)> {
        let t = self.block_table();
        let tag = format!("comment \"{comment}\"");
        let mut v = Vec::new();
        for ns in self.block_namespaces() {
            let Ok(o) = exec(Some(&ns), &["nft", "-a", "list", "table", "bridge", &t]) else {
                continue;
            };
            for line in o.stdout.lines() {
                if !line.contains(&tag) {
                    continue;
                }
                let handle = line
                    .rsplit_once("# handle ")
                    .and_then(|(_, h)| h.trim().parse().ok());
                let packets = line
                    .split_once("counter packets ")
                    .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
                    .unwrap_or(0);
                if let Some(h) = handle {
                    v.push((ns.clone(), h, packets));
                }
            }
        }
        v
    }

    fn remove_rules(&self, comment: &str) -> Result<()> {
        let t = self.block_table();
        let chains = ["pre", "out"];
        for (ns, handle, _) in self.rules(comment) {
            // The handle is unique in the table; try both chains.
            let ok = chains.iter().any(|c| {
                exec(
                    Some(&ns),
                    &[
                        "nft",
                        "delete",
                        "rule",
                        "bridge",
                        &t,
                        c,
                        "handle",
                        &handle.to_string(),
                    ],
                )
                .map(|o| o.success())
                .unwrap_or(false)
            });
            if !ok {
                bail!("could not delete rule {handle} ({comment}) in {ns}");
            }
        }
        Ok(())
    }

    fn pair_tag(a: usize, b: usize) -> String {
        let (x, y) = if a < b { (a, b) } else { (b, a) };
        format!("blk-{x}-{y}")
    }

    /// Drops every UDP packet between hosts `a` and `b` (both ways, at every address
    /// either has), wherever it crosses the core or a site. Applies to the sites that
    /// exist now: add sites and attach hosts first.
    pub fn block(&self, a: usize, b: usize) -> Result<()> {
        if a == b {
            bail!("block: same host {a}");
        }
        let (sa, sb) = (self.host_set(a), self.host_set(b));
        self.add_rules(
            &Self::pair_tag(a, b),
            &[
                format!("ip saddr {sa} ip daddr {sb}"),
                format!("ip saddr {sb} ip daddr {sa}"),
            ],
        )
    }

    /// Removes the block between `a` and `b`.
    pub fn unblock(&self, a: usize, b: usize) -> Result<()> {
        self.remove_rules(&Self::pair_tag(a, b))
    }

    /// Packets the block between `a` and `b` dropped so far (0 once removed).
    pub fn block_drops(&self, a: usize, b: usize) -> u64 {
        self.rules(&Self::pair_tag(a, b)).iter().map(|r| r.2).sum()
    }

    /// Drops every UDP packet from or to host `h` (any of its addresses).
    pub fn isolate(&self, h: usize) -> Result<()> {
        let s = self.host_set(h);
        self.add_rules(
            &format!("iso-{h}"),
            &[format!("ip saddr {s}"), format!("ip daddr {s}")],
        )
    }

    pub fn unisolate(&self, h: usize) -> Result<()> {
        self.remove_rules(&format!("iso-{h}"))
    }

    pub fn isolate_drops(&self, h: usize) -> u64 {
        self.rules(&format!("iso-{h}")).iter().map(|r| r.2).sum()
    }

    /// The block table and every site's NAT as `nft` lists them, and the sites'
    /// conntrack tables (diagnostics).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let t = self.block_table();
        for ns in self.block_namespaces() {
            out.push_str(&format!("----- {ns}: bridge {t}\n"));
            out.push_str(
                &exec(Some(&ns), &["nft", "list", "table", "bridge", &t])
                    .map(|o| o.stdout)
                    .unwrap_or_default(),
            );
        }
        for s in &self.sites {
            out.push_str(&format!("----- {} ({:?}) nat\n", s.ns, s.kind));
            out.push_str(
                &exec(Some(&s.ns), &["nft", "list", "table", "ip", NAT_TABLE])
                    .map(|o| o.stdout)
                    .unwrap_or_default(),
            );
            out.push_str(&format!("----- {} forward counters\n", s.ns));
            out.push_str(
                &exec(Some(&s.ns), &["nft", "list", "table", "ip", FWD_TABLE])
                    .map(|o| o.stdout)
                    .unwrap_or_default(),
            );
            out.push_str(&format!("----- {} conntrack (udp)\n", s.ns));
            let ct = exec(Some(&s.ns), &["cat", "/proc/net/nf_conntrack"])
                .map(|o| o.stdout)
                .unwrap_or_default();
            for line in ct.lines().filter(|l| l.contains(" udp ")).take(60) {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Removes the sites and the core's block table now (also done on drop).
    pub fn teardown(&mut self) {
        for s in self.sites.drain(..).rev() {
            delete_namespace(&s.ns);
        }
        let _ = exec(
            Some(&self.core_ns),
            &["nft", "delete", "table", "bridge", &self.block_table()],
        );
    }
}

impl Drop for NatNet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- NAT sites and UDP blocks at failure -----\n{}",
                self.describe()
            );
        }
        self.teardown();
    }
}

// ------------------------------------------------------------------------------------
// A gossip mesh over sites

/// A [`GossipMesh`] whose hosts may sit behind sites. Dereferences to the mesh.
pub struct NatMesh {
    /// Drops first: the sites go before the daemons and the topology.
    pub net: NatNet,
    pub g: GossipMesh,
}

impl Deref for NatMesh {
    type Target = GossipMesh;
    fn deref(&self) -> &GossipMesh {
        &self.g
    }
}

impl DerefMut for NatMesh {
    fn deref_mut(&mut self) -> &mut GossipMesh {
        &mut self.g
    }
}

impl NatMesh {
    /// The hosts and stacks of [`GossipMesh::build`] (nothing started), all on the core.
    pub fn build(test: &str, hosts: usize, stacks: Vec<StackDef>) -> Result<NatMesh> {
        let g = GossipMesh::build(test, hosts, stacks)?;
        let net = NatNet::new(&g.mesh.topo);
        Ok(NatMesh { net, g })
    }

    pub fn add_site(&mut self, kind: SiteKind) -> Result<u8> {
        self.net.add_site(kind)
    }

    /// [`NatNet::attach`].
    pub fn attach(&mut self, host: usize, site: u8, public: bool) -> Result<()> {
        self.net.attach(&mut self.g.mesh.topo, host, site, public)
    }

    /// Every host but `join` joins `join` at the address it can reach it: its public
    /// address, else its own (the join host must not be behind `masquerade random`).
    pub fn set_join(&mut self, join: usize) -> Result<()> {
        let Some(ip) = self.net.reachable_ip(&self.g.mesh.topo, join) else {
            bail!("host {join} cannot be joined from outside its site");
        };
        for h in 1..=self.g.mesh.topo.hosts().len() {
            if h != join {
                // A host inside the join host's site joins its private address.
                let same_site = matches!(
                    (self.net.site_of(h), self.net.site_of(join)),
                    (Some(a), Some(b)) if a.index == b.index
                );
                let addr = if same_site {
                    self.g.mesh.topo.host(join).underlay_ip
                } else {
                    ip
                };
                self.g
                    .mesh
                    .set_discovery_env(h, "VROUTER_JOIN", &addr.to_string());
            }
        }
        Ok(())
    }

    /// Joins host 1 ([`NatMesh::set_join`]), then starts every discovery and router.
    pub fn start_all(&mut self) -> Result<()> {
        self.set_join(1)?;
        self.g.start_all()
    }

    pub fn block(&self, a: usize, b: usize) -> Result<()> {
        self.net.block(a, b)
    }

    pub fn unblock(&self, a: usize, b: usize) -> Result<()> {
        self.net.unblock(a, b)
    }
}

// ------------------------------------------------------------------------------------
// discovery.json: addresses, paths, relay (CONTRACT.md)

/// One entry of discovery.json's `paths`.
#[derive(Debug, Clone, PartialEq)]
pub struct PathEntry {
    pub node: String,
    pub peer_addr: String,
    pub addr_in_use: String,
    /// `direct`, `relay` or `unreachable`.
    pub via: String,
    pub relay_node: Option<String>,
    pub relay_addr: Option<String>,
    pub rtt_ms: Option<f64>,
    pub since_ms: Option<u64>,
    pub code: Option<String>,
}

impl PathEntry {
    pub fn from_json(v: &Value) -> PathEntry {
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        let o = |k: &str| v[k].as_str().map(str::to_string);
        PathEntry {
            node: s("node"),
            peer_addr: s("peer_addr"),
            addr_in_use: s("addr_in_use"),
            via: s("via"),
            relay_node: o("relay_node"),
            relay_addr: o("relay_addr"),
            rtt_ms: v["rtt_ms"].as_f64(),
            since_ms: v["since_ms"].as_u64(),
            code: o("code"),
        }
    }

    /// `via`, with the relay's node or the code: for messages.
    pub fn brief(&self) -> String {
        match self.via.as_str() {
            "relay" => format!("relay {}", self.relay_node.clone().unwrap_or_default()),
            "unreachable" => format!("unreachable {}", self.code.clone().unwrap_or_default()),
            v => format!("{v} {}", self.addr_in_use),
        }
    }
}

/// discovery.json's `addresses` of `host` (`Value::Null` if absent).
pub fn addresses(g: &GossipMesh, host: usize) -> Value {
    g.discovery_json(host)
        .map(|v| v["addresses"].clone())
        .unwrap_or(Value::Null)
}

/// discovery.json's `relay` of `host` (`Value::Null` if absent).
pub fn relay_json(g: &GossipMesh, host: usize) -> Value {
    g.discovery_json(host)
        .map(|v| v["relay"].clone())
        .unwrap_or(Value::Null)
}

/// `relay.forwarded_packets` of `host` (0 if absent).
pub fn relay_forwarded(g: &GossipMesh, host: usize) -> u64 {
    relay_json(g, host)["forwarded_packets"]
        .as_u64()
        .unwrap_or(0)
}

/// discovery.json's `paths` of `host`.
pub fn paths(g: &GossipMesh, host: usize) -> Vec<PathEntry> {
    g.discovery_json(host)
        .ok()
        .and_then(|v| {
            v["paths"]
                .as_array()
                .map(|a| a.iter().map(PathEntry::from_json).collect())
        })
        .unwrap_or_default()
}

/// `host`'s `paths` entry for host `of` (by `of`'s node id).
pub fn path_to(g: &GossipMesh, host: usize, of: usize) -> Option<PathEntry> {
    let id = g.node_id(of)?;
    paths(g, host).into_iter().find(|p| p.node == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_entry_reads_the_contract_keys() {
        let v: Value = serde_json::from_str(
            r#"{"node":"00000000000000aa","peer_addr":"10.0.1.2","addr_in_use":"203.0.113.5",
                "via":"relay","relay_node":"00000000000000bb","relay_addr":"198.18.0.3",
                "rtt_ms":0.4,"since_ms":123,"code":null}"#,
        )
        .unwrap();
        let p = PathEntry::from_json(&v);
        assert_eq!(p.via, "relay");
        assert_eq!(p.relay_node.as_deref(), Some("00000000000000bb"));
        assert_eq!(p.addr_in_use, "203.0.113.5");
        assert_eq!(p.rtt_ms, Some(0.4));
        assert_eq!(p.code, None);
        assert_eq!(p.brief(), "relay 00000000000000bb");
    }
}
