//! Simulated hosts: namespaces on an underlay bridge, Docker-like networks and containers.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cleanup::{cleanup_leftovers, delete_namespace, list_namespaces};
use crate::cmd::{exec, exec_input, exec_ok, CmdOutput};
use crate::daemon::{spawn_in, spawn_privileged_in, Daemon};
use crate::firewall::{render_ruleset_with, FwNetwork, FwOptions};
use crate::TestLock;

/// Docker's `com.docker.network.bridge.gateway_mode_ipv4` for a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// Default `nat` mode on Docker 28.2+: raw-table drop of packets to the network's
    /// containers arriving from another interface.
    Protected,
    /// `nat-unprotected`: no raw drop, DOCKER chain accepts.
    NatUnprotected,
}

/// What a container namespace is for; decides its sysctls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `net.ipv4.ping_group_range = "0 2147483647"` (as Docker sets it).
    Service,
    /// `ip_forward=1`, `conf.{all,default}.rp_filter=0` (as compose `sysctls:` would).
    Router,
}

/// A "container": a network namespace with `eth0` on a Docker network's bridge.
#[derive(Debug, Clone)]
pub struct Container {
    pub name: String,
    /// Network namespace name (`<prefix>-<network>-<name>`).
    pub ns: String,
    pub ip: Ipv4Addr,
    pub network: String,
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub role: Role,
    /// Namespace of the simulated host it runs on.
    pub host_ns: String,
    /// Host-side veth name (in `host_ns`).
    pub host_veth: String,
    log_dir: PathBuf,
}

impl Container {
    pub fn exec(&self, argv: &[&str]) -> Result<CmdOutput> {
        exec(Some(&self.ns), argv)
    }

    pub fn exec_ok(&self, argv: &[&str]) -> Result<CmdOutput> {
        exec_ok(Some(&self.ns), argv)
    }

    /// Run `cmd` in this container's namespace with only CAP_NET_ADMIN and read-only
    /// /proc/sys and /sys, as Docker runs `cap_drop: [ALL], cap_add: [NET_ADMIN]`.
    pub fn spawn_privileged(
        &self,
        cmd: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        spawn_privileged_in(&self.ns, &self.log_dir, cmd, args, env)
    }

    /// Run `cmd` in this namespace as full root (helpers, not the code under test).
    pub fn spawn(&self, cmd: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Daemon> {
        spawn_in(&self.ns, &self.log_dir, cmd, args, env)
    }
}

/// A Docker bridge network on one simulated host.
#[derive(Debug, Clone)]
pub struct Network {
    pub name: String,
    /// `br-<name>`.
    pub bridge: String,
    pub subnet: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub protection: Protection,
    pub containers: Vec<Container>,
}

impl Network {
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.subnet, self.prefix_len)
    }

    pub fn container(&self, name: &str) -> Option<&Container> {
        self.containers.iter().find(|c| c.name == name)
    }
}

/// A simulated host: a namespace with `eth0` on the underlay, ip_forward on, bridge
/// netfilter on and a Docker-28.2-like firewall.
#[derive(Debug)]
pub struct Host {
    /// 1-based.
    pub index: usize,
    /// `<prefix>-h<index>`.
    pub ns: String,
    pub underlay_ip: Ipv4Addr,
    pub underlay_gw: Ipv4Addr,
    networks: Vec<Network>,
    prefix: String,
    log_dir: PathBuf,
    /// Whether the Docker-like ruleset is loaded (on by default; see [`Host::set_firewall`]).
    firewall: bool,
    /// What the firewall carries beyond Docker's rules (see [`Host::set_ct_invalid_drop`]).
    fw_options: FwOptions,
}

fn parse_cidr(cidr: &str) -> Result<(Ipv4Addr, u8)> {
    let (a, l) = cidr
        .split_once('/')
        .with_context(|| format!("{cidr}: expected a.b.c.d/len"))?;
    let a: Ipv4Addr = a.parse()?;
    let l: u8 = l.parse()?;
    if l > 30 {
        bail!("{cidr}: prefix too long");
    }
    let mask = if l == 0 { 0 } else { u32::MAX << (32 - l) };
    Ok((Ipv4Addr::from(u32::from(a) & mask), l))
}

fn in_subnet(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(net)
}

/// Docker 28+ gives a container a random MAC and announces its address with gratuitous
/// ARP once the interface is up (older engines derived the MAC from the address), so
/// neighbours that cached a previous container's MAC for the same address (a router, after
/// `docker compose up --force-recreate` of a service) learn the new one at once. Here:
/// once the bridge port forwards (a gratuitous ARP sent before that is lost), eth0 gets
/// a fresh random MAC, and `arp_notify` announces it.
fn announce(host_ns: &str, port: &str, ns: &str) -> Result<()> {
    let forwarding = crate::wait_until(Duration::from_secs(3), Duration::from_millis(10), || {
        exec(Some(host_ns), &["bridge", "link", "show", "dev", port])
            .map(|o| o.stdout.contains("state forwarding"))
            .unwrap_or(false)
    });
    if !forwarding {
        bail!("bridge port {port} in {host_ns} did not start forwarding within 3 s");
    }
    exec_ok(
        Some(ns),
        &["ip", "link", "set", "eth0", "address", &random_mac()],
    )?;
    Ok(())
}

/// A random locally administered unicast MAC.
fn random_mac() -> String {
    let mut b = [0u8; 6];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ ((std::process::id() as u128) << 64);
        b.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    b[0] = (b[0] & 0xfc) | 0x02;
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn sysctl(ns: &str, kv: &str) -> Result<()> {
    exec_ok(Some(ns), &["sysctl", "-q", "-w", kv]).map(|_| ())
}

impl Host {
    pub fn networks(&self) -> &[Network] {
        &self.networks
    }

    pub fn network(&self, name: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.name == name)
    }

    /// Container `name` on network `net`.
    pub fn container(&self, net: &str, name: &str) -> Option<&Container> {
        self.network(net).and_then(|n| n.container(name))
    }

    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Add a Docker network: bridge `br-<name>` with the first address of `cidr` as gateway
    /// (ICC on), then re-render the firewall.
    pub fn add_network(
        &mut self,
        name: &str,
        cidr: &str,
        protection: Protection,
    ) -> Result<&Network> {
        let bridge = format!("br-{name}");
        if bridge.len() > 15 {
            bail!("network name {name} too long (bridge name > 15 chars)");
        }
        if self.network(name).is_some() {
            bail!("network {name} already exists on {}", self.ns);
        }
        let (subnet, prefix_len) = parse_cidr(cidr)?;
        let gateway = Ipv4Addr::from(u32::from(subnet) + 1);
        let ns = Some(self.ns.as_str());
        exec_ok(
            ns,
            &[
                "ip",
                "link",
                "add",
                &bridge,
                "type",
                "bridge",
                "stp_state",
                "0",
            ],
        )?;
        // Docker gives every bridge a random MAC of its own; without one a Linux bridge
        // takes its lowest port's MAC and changes it when containers come and go.
        let n = self.networks.len() as u8;
        let idx = self.index as u8;
        let mac = format!(
            "02:42:b0:{idx:02x}:{n:02x}:{:02x}",
            std::process::id() as u8
        );
        exec_ok(ns, &["ip", "link", "set", &bridge, "address", &mac])?;
        exec_ok(
            ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{gateway}/{prefix_len}"),
                "dev",
                &bridge,
            ],
        )?;
        exec_ok(ns, &["ip", "link", "set", &bridge, "up"])?;
        self.networks.push(Network {
            name: name.to_string(),
            bridge,
            subnet,
            prefix_len,
            gateway,
            protection,
            containers: Vec::new(),
        });
        self.apply_firewall()?;
        Ok(self.networks.last().unwrap())
    }

    /// Change a network's gateway mode (re-renders the firewall; like recreating the
    /// network with `gateway_mode_ipv4: nat-unprotected`).
    pub fn set_protection(&mut self, net: &str, protection: Protection) -> Result<()> {
        let n = self
            .networks
            .iter_mut()
            .find(|n| n.name == net)
            .with_context(|| format!("no network {net}"))?;
        n.protection = protection;
        self.apply_firewall()
    }

    /// Add a container namespace `<prefix>-<net>-<name>` with `eth0` on `net`'s bridge at
    /// `ip`, default route via the gateway, sysctls for `role`; re-renders the firewall.
    pub fn add_container(
        &mut self,
        net: &str,
        name: &str,
        ip: &str,
        role: Role,
    ) -> Result<Container> {
        let ip: Ipv4Addr = ip.parse().with_context(|| format!("bad ip {ip}"))?;
        let prefix = self.prefix.clone();
        let host_ns = self.ns.clone();
        let log_dir = self.log_dir.clone();
        let n = self
            .networks
            .iter()
            .find(|n| n.name == net)
            .with_context(|| format!("no network {net} on {host_ns}"))?;
        if !in_subnet(ip, n.subnet, n.prefix_len) || ip == n.gateway {
            bail!("{ip} is not a free address in {}", n.cidr());
        }
        if n.containers.iter().any(|c| c.ip == ip || c.name == name) {
            bail!("container {name} or address {ip} already on {net}");
        }
        let ns = format!("{prefix}-{net}-{name}");
        if Path::new("/run/netns").join(&ns).exists() {
            bail!("namespace {ns} already exists (container names must be unique per topology)");
        }
        let mut host_veth = format!("v-{net}-{name}");
        if host_veth.len() > 15 {
            host_veth = format!(
                "v{}",
                self.networks
                    .iter()
                    .map(|n| n.containers.len())
                    .sum::<usize>()
            );
            host_veth = format!("{host_veth}-{}", &name[..name.len().min(8)]);
        }
        let c = Container {
            name: name.to_string(),
            ns: ns.clone(),
            ip,
            network: net.to_string(),
            bridge: n.bridge.clone(),
            gateway: n.gateway,
            role,
            host_ns: host_ns.clone(),
            host_veth: host_veth.clone(),
            log_dir,
        };
        let plen = n.prefix_len;
        exec_ok(None, &["ip", "netns", "add", &ns])?;
        // From here on the namespace exists: record the container first so that a failure
        // below still gets it cleaned up by the topology.
        let idx = self.networks.iter().position(|n| n.name == net).unwrap();
        self.networks[idx].containers.push(c.clone());
        let cns = Some(ns.as_str());
        // Sysctls before eth0 exists, so conf.default applies to it.
        match role {
            Role::Router => {
                sysctl(&ns, "net.ipv4.ip_forward=1")?;
                sysctl(&ns, "net.ipv4.conf.all.rp_filter=0")?;
                sysctl(&ns, "net.ipv4.conf.default.rp_filter=0")?;
            }
            Role::Service => {
                sysctl(&ns, "net.ipv4.ping_group_range=0 2147483647")?;
            }
        }
        // Gratuitous ARP on a MAC change (see `announce` below).
        sysctl(&ns, "net.ipv4.conf.default.arp_notify=1")?;
        exec_ok(cns, &["ip", "link", "set", "lo", "up"])?;
        exec_ok(
            Some(&host_ns),
            &[
                "ip", "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ],
        )?;
        exec_ok(
            Some(&host_ns),
            &["ip", "link", "set", &host_veth, "master", &c.bridge, "up"],
        )?;
        exec_ok(
            cns,
            &["ip", "addr", "add", &format!("{ip}/{plen}"), "dev", "eth0"],
        )?;
        exec_ok(cns, &["ip", "link", "set", "eth0", "up"])?;
        announce(&host_ns, &host_veth, &ns)?;
        exec_ok(
            cns,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &c.gateway.to_string(),
                "dev",
                "eth0",
            ],
        )?;
        self.apply_firewall()?;
        Ok(c)
    }

    /// Remove a container (kills its processes, deletes its namespace) and re-render the
    /// firewall. Re-adding it under the same name simulates a container restart (Docker
    /// builds a new namespace).
    pub fn remove_container(&mut self, net: &str, name: &str) -> Result<()> {
        let n = self
            .networks
            .iter_mut()
            .find(|n| n.name == net)
            .with_context(|| format!("no network {net}"))?;
        let i = n
            .containers
            .iter()
            .position(|c| c.name == name)
            .with_context(|| format!("no container {name} on {net}"))?;
        let c = n.containers.remove(i);
        delete_namespace(&c.ns);
        let _ = exec(Some(&self.ns), &["ip", "link", "del", &c.host_veth]);
        self.apply_firewall()
    }

    fn fw_networks(&self) -> Vec<FwNetwork> {
        self.networks
            .iter()
            .map(|n| FwNetwork {
                bridge: n.bridge.clone(),
                subnet: n.cidr(),
                protection: n.protection,
                containers: n.containers.iter().map(|c| c.ip).collect(),
            })
            .collect()
    }

    /// The nft script the host's firewall is rendered from.
    pub fn firewall_script(&self) -> String {
        render_ruleset_with(&self.fw_networks(), self.fw_options)
    }

    /// Adds (or removes) firewalld's forward chain with `ct state invalid drop` beside
    /// Docker's rules, as on a host that runs firewalld; reloads the firewall.
    pub fn set_ct_invalid_drop(&mut self, on: bool) -> Result<()> {
        self.fw_options.ct_invalid_drop = on;
        self.apply_firewall()
    }

    /// Packets Docker's raw-table rules dropped (the sum of their counters), and those
    /// firewalld's `ct state invalid drop` dropped (0 without it).
    pub fn firewall_drops(&self) -> Result<(u64, u64)> {
        let count = |family: &str, table: &str, chain: &str| -> Result<u64> {
            let out = exec(
                Some(&self.ns),
                &["nft", "-j", "list", "chain", family, table, chain],
            )?;
            if !out.success() {
                return Ok(0);
            }
            let v: serde_json::Value = serde_json::from_str(&out.stdout)
                .with_context(|| format!("nft -j list chain {family} {table} {chain}"))?;
            let mut n = 0;
            for item in v["nftables"].as_array().into_iter().flatten() {
                for e in item["rule"]["expr"].as_array().into_iter().flatten() {
                    n += e["counter"]["packets"].as_u64().unwrap_or(0);
                }
            }
            Ok(n)
        };
        Ok((
            count("ip", crate::firewall::RAW_TABLE, "PREROUTING")?,
            count("inet", crate::firewall::FIREWALLD_TABLE, "filter_FORWARD")?,
        ))
    }

    /// `Ip: ForwDatagrams` of the host namespace: packets its IP stack forwarded.
    pub fn forw_datagrams(&self) -> Result<u64> {
        crate::steering::forw_datagrams(Some(&self.ns))
    }

    /// Loads the Docker-like ruleset (`on`, the default) or removes its tables (`off`,
    /// for baselines such as `vrt-bench`'s datapath paths); later network and container
    /// changes keep to the choice.
    pub fn set_firewall(&mut self, on: bool) -> Result<()> {
        self.firewall = on;
        self.apply_firewall()
    }

    pub fn firewall_enabled(&self) -> bool {
        self.firewall
    }

    /// (Re)load the Docker-like ruleset atomically; with the firewall turned off, remove
    /// its tables instead.
    pub fn apply_firewall(&self) -> Result<()> {
        if !self.firewall {
            let mut script: String = [
                crate::firewall::RAW_TABLE,
                crate::firewall::FILTER_TABLE,
                crate::firewall::NAT_TABLE,
            ]
            .iter()
            .map(|t| format!("add table ip {t}\ndelete table ip {t}\n"))
            .collect();
            let fwd = crate::firewall::FIREWALLD_TABLE;
            script.push_str(&format!("add table inet {fwd}\ndelete table inet {fwd}\n"));
            return exec_input(Some(&self.ns), &["nft", "-f", "-"], script.as_bytes())
                .context("removing the firewall")
                .map(|_| ());
        }
        exec_input(
            Some(&self.ns),
            &["nft", "-f", "-"],
            self.firewall_script().as_bytes(),
        )
        .with_context(|| format!("loading firewall:\n{}", self.firewall_script()))
        .map(|_| ())
    }

    /// `nft -s list ruleset` in the host namespace (no counters), for "never changed"
    /// assertions; without discovery's own steering table (`netdev <prefix>vrouter`),
    /// which follows the ports.
    pub fn firewall_snapshot(&self) -> Result<String> {
        let rs = exec_ok(Some(&self.ns), &["nft", "-s", "list", "ruleset"])?.stdout;
        Ok(crate::steering::without_table(
            &rs,
            "netdev",
            &crate::steering::table_name(),
        ))
    }

    pub fn exec(&self, argv: &[&str]) -> Result<CmdOutput> {
        exec(Some(&self.ns), argv)
    }

    pub fn exec_ok(&self, argv: &[&str]) -> Result<CmdOutput> {
        exec_ok(Some(&self.ns), argv)
    }

    /// Run `cmd` in the host namespace with only CAP_NET_ADMIN and read-only /proc/sys
    /// and /sys, as Docker runs `network_mode: host, cap_drop: [ALL], cap_add: [NET_ADMIN]`.
    pub fn spawn_privileged(
        &self,
        cmd: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        spawn_privileged_in(&self.ns, &self.log_dir, cmd, args, env)
    }

    /// Run `cmd` in the host namespace as full root.
    pub fn spawn(&self, cmd: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Daemon> {
        spawn_in(&self.ns, &self.log_dir, cmd, args, env)
    }

    fn all_container_ns(&self) -> Vec<String> {
        self.networks
            .iter()
            .flat_map(|n| n.containers.iter().map(|c| c.ns.clone()))
            .collect()
    }
}

/// Builder for [`Topology`].
pub struct TopologyBuilder {
    test_name: String,
    hosts: usize,
    mtu: u32,
}

impl TopologyBuilder {
    /// Number of simulated hosts (1..=200).
    pub fn hosts(mut self, n: usize) -> Self {
        self.hosts = n;
        self
    }

    /// Underlay MTU (default 1500).
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = mtu;
        self
    }

    /// Take the global test lock, remove leftovers of a previous run with the same
    /// prefix, and build the underlay and the hosts.
    pub fn build(self) -> Result<Topology> {
        if self.hosts == 0 || self.hosts > 200 {
            bail!("hosts must be 1..=200");
        }
        let lock = TestLock::acquire()?;
        let prefix = crate::prefix();
        let removed = cleanup_leftovers(&prefix)?;
        if !removed.is_empty() {
            eprintln!("harness: removed leftovers of an earlier run: {removed:?}");
        }
        let log_dir = crate::log_dir_for(&self.test_name);
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir)?;
        let mut topo = Topology {
            prefix: prefix.clone(),
            test_name: self.test_name,
            log_dir,
            underlay_ns: format!("{prefix}-ul"),
            hosts: Vec::new(),
            mtu: self.mtu,
            created_ns: Vec::new(),
            _lock: lock,
        };
        topo.build_underlay()?;
        for i in 1..=self.hosts {
            topo.add_host(i)?;
        }
        Ok(topo)
    }
}

/// The simulated world: an underlay namespace with bridge `br0` (198.18.0.254/24) and
/// hosts `<prefix>-h<N>` at 198.18.0.N. Holds the global test lock; dropping it removes
/// every namespace it created (even while panicking). One topology per test at a time.
pub struct Topology {
    pub prefix: String,
    pub test_name: String,
    pub log_dir: PathBuf,
    /// `<prefix>-ul`.
    pub underlay_ns: String,
    hosts: Vec<Host>,
    mtu: u32,
    created_ns: Vec<String>,
    // Last field: released after Drop::drop has cleaned up.
    _lock: TestLock,
}

/// Underlay gateway address (on the underlay bridge).
pub const UNDERLAY_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

impl Topology {
    pub fn builder(test_name: &str) -> TopologyBuilder {
        TopologyBuilder {
            test_name: test_name.to_string(),
            hosts: 2,
            mtu: 1500,
        }
    }

    fn build_underlay(&mut self) -> Result<()> {
        let ul = self.underlay_ns.clone();
        exec_ok(None, &["ip", "netns", "add", &ul])?;
        self.created_ns.push(ul.clone());
        let u = Some(ul.as_str());
        // No firewall here, and keep bridge netfilter off so nothing can drop underlay
        // frames crossing br0.
        if Path::new("/proc/sys/net/bridge").exists() {
            let _ = exec(
                u,
                &["sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=0"],
            );
        }
        exec_ok(u, &["ip", "link", "set", "lo", "up"])?;
        exec_ok(
            u,
            &[
                "ip",
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "stp_state",
                "0",
            ],
        )?;
        exec_ok(
            u,
            &[
                "ip",
                "link",
                "set",
                "br0",
                "mtu",
                &self.mtu.to_string(),
                "up",
            ],
        )?;
        exec_ok(
            u,
            &[
                "ip",
                "addr",
                "add",
                &format!("{UNDERLAY_GW}/24"),
                "dev",
                "br0",
            ],
        )?;
        Ok(())
    }

    fn add_host(&mut self, i: usize) -> Result<()> {
        let ns = format!("{}-h{i}", self.prefix);
        let ip = Ipv4Addr::new(198, 18, 0, i as u8);
        exec_ok(None, &["ip", "netns", "add", &ns])?;
        self.created_ns.push(ns.clone());
        let h = Some(ns.as_str());
        // Docker loads br_netfilter; the sysctl is per network namespace.
        if !Path::new("/proc/sys/net/bridge").exists() {
            let _ = exec(None, &["modprobe", "br_netfilter"]);
        }
        sysctl(&ns, "net.ipv4.ip_forward=1")?;
        sysctl(&ns, "net.bridge.bridge-nf-call-iptables=1")
            .context("bridge netfilter (br_netfilter) is required")?;
        exec_ok(h, &["ip", "link", "set", "lo", "up"])?;
        let peer = format!("h{i}");
        exec_ok(
            None,
            &[
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                &ns,
                "mtu",
                &self.mtu.to_string(),
                "type",
                "veth",
                "peer",
                "name",
                &peer,
                "netns",
                &self.underlay_ns,
                "mtu",
                &self.mtu.to_string(),
            ],
        )?;
        let u = Some(self.underlay_ns.as_str());
        exec_ok(u, &["ip", "link", "set", &peer, "master", "br0", "up"])?;
        exec_ok(
            h,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        )?;
        exec_ok(h, &["ip", "link", "set", "eth0", "up"])?;
        exec_ok(
            h,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &UNDERLAY_GW.to_string(),
                "dev",
                "eth0",
            ],
        )?;
        let host = Host {
            index: i,
            ns,
            underlay_ip: ip,
            underlay_gw: UNDERLAY_GW,
            networks: Vec::new(),
            prefix: self.prefix.clone(),
            log_dir: self.log_dir.clone(),
            firewall: true,
            fw_options: FwOptions::default(),
        };
        host.apply_firewall()?;
        self.hosts.push(host);
        Ok(())
    }

    /// Adds the next host (index `hosts().len() + 1`, underlay address 198.18.0.<index>)
    /// to a built topology. Returns its index.
    pub fn add_next_host(&mut self) -> Result<usize> {
        let i = self.hosts.len() + 1;
        if i > 200 {
            bail!("at most 200 hosts");
        }
        self.add_host(i)?;
        Ok(i)
    }

    /// Host `i` (1-based). Panics if out of range.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i - 1]
    }

    pub fn host_mut(&mut self, i: usize) -> &mut Host {
        &mut self.hosts[i - 1]
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Firewall snapshots of every host, in host order.
    pub fn firewall_snapshots(&self) -> Result<Vec<String>> {
        self.hosts.iter().map(|h| h.firewall_snapshot()).collect()
    }

    /// Every namespace the topology currently owns.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .hosts
            .iter()
            .flat_map(|h| h.all_container_ns())
            .collect();
        v.extend(self.created_ns.iter().rev().cloned());
        v
    }

    /// Remove everything now (also done on drop).
    pub fn teardown(&mut self) {
        for ns in self.namespaces() {
            delete_namespace(&ns);
        }
        for h in &mut self.hosts {
            h.networks.clear();
        }
        self.created_ns.clear();
        let _ = cleanup_leftovers(&self.prefix);
        let left = list_namespaces(&self.prefix);
        if !left.is_empty() {
            eprintln!("harness: namespaces left after teardown: {left:?}");
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "harness: test {} failed; logs in {}",
                self.test_name,
                self.log_dir.display()
            );
            for h in &self.hosts {
                if let Ok(s) = h.firewall_snapshot() {
                    eprintln!("----- firewall of {} -----\n{s}", h.ns);
                }
            }
        }
        self.teardown();
        // Give the kernel a moment to release the namespaces (bounded).
        std::thread::sleep(Duration::from_millis(10));
    }
}
