//! The world `vrt-bench` measures the datapath in: simulated hosts carrying, side by
//! side, the paths the issue compares, and the probes that measure them.
//!
//! Paths (sender first):
//! - `overlay`: the real mesh with port steering (discovery's default,
//!   `VROUTER_STEERING=ports`). Stacks `a` (10.1.0.0/24, host 1) and `b` (10.2.0.0/24,
//!   host 2) on VNI 1000, discovery on every host, a router in each stack, the default
//!   access policy: service a -> its host-side port, where discovery's netdev chain
//!   sends the frame straight into vxlan1000 -> underlay -> vxlan1000 -> router b's
//!   ovl1000 -> router b -> its host-side port, where the delivery chain sends it to
//!   service b's port. Neither host forwards it.
//! - `overlay_rule`: the same over the policy-rule path (issue 15's "today"), on two
//!   more hosts whose discovery runs `VROUTER_STEERING=rule`: stacks `d` (10.4.0.0/24,
//!   host 3) and `e` (10.5.0.0/24, host 4): service d -> br-d -> host 3 (policy rule)
//!   -> br-d -> router d -> ovl1000 -> vxlan1000 -> underlay -> vxlan1000 -> router e
//!   -> br-e -> service e. So the gain of port steering is measured, not assumed.
//! - `flannel`: Flannel's VXLAN backend, built by hand in the host namespaces of hosts
//!   1 and 2: networks `fa` (10.11.0.0/24, host 1) and `fb` (10.12.0.0/24, host 2) with
//!   a service each; `flannel.1` (VNI 1) per host with 10.250.0.<host>/32, a route to
//!   the remote network `via 10.250.0.<remote> dev flannel.1 onlink`, a permanent
//!   neighbour 10.250.0.<remote> -> the remote device's MAC, and an FDB row remote MAC
//!   -> remote underlay address. The service's gateway is its host bridge; the host
//!   forwards into the device. No router.
//! - `routed`: networks `ra` (10.21.0.0/24) and `rb` (10.22.0.0/24) with a service
//!   each; each host routes the remote network via the remote host's underlay address.
//! - `underlay`: host namespace 1 to host namespace 2 over the underlay (198.18.0.x).
//! - `same_host`: stack `a` to stack `c` (10.3.0.0/24), both on host 1 and VNI 1000,
//!   with port steering: service a's port sends the frame to router c's port, router c
//!   forwards it back out of its stack side, the delivery chain hands it to service
//!   c's port.
//! - `bridged`: its baseline, two networks on host 1 (`sa` 10.31.0.0/24, `sb`
//!   10.32.0.0/24) with a service each, routed by the host from bridge to bridge, no
//!   firewall (what two Docker networks with direct routing allowed would do).
//! - `overlay_fw`: the `overlay` path with the Docker-28.2-like firewall loaded on
//!   hosts 1 and 2 (it is loaded only while this path is measured and removed again, so
//!   the other paths never run under it).
//!
//! Under the Docker-like firewall the Flannel-style path carries nothing: the receiving
//! host forwards from `flannel.1` into a protected bridge, which Docker's raw-table
//! rule and FORWARD chain drop (and the sending host would masquerade the source).
//! [`Datapath::flannel_under_firewall`] checks that and the JSON records it.
//!
//! [`Datapath::build`] checks that the hosts run the steering the paths are named
//! after (discovery.json's `steering`: stacks `a` and `c` in `ports` mode, `d` in
//! `rule` mode), so a fallback cannot pass for port steering, and the description
//! records the netdev tables with their counters after the run.
//!
//! What the baselines share with the overlay, from the same code:
//! - `flannel.1` is created by `vrouter_kernel::Kernel::create_vxlan`, the call
//!   discovery makes for `vxlan1000`, with the UDP port, learning flag, underlay device
//!   and MTU read back from the running `vxlan1000` (so underlay MTU - 50, port 4789,
//!   learning off, the kernel's default checksum and offload settings). Its neighbour,
//!   FDB row and route are written with the same `Kernel` calls the router and discovery
//!   use. Both devices share one UDP socket on port 4789 (different VNIs).
//! - Every service, bridge and veth is made by the same harness code
//!   ([`crate::topology::Host::add_network`], `add_container`), so MTUs (1500 on the
//!   service links), offloads and sysctls (`ip_forward=1` and `bridge-nf-call-iptables=1`
//!   on the hosts) are the same on every path.
//! - MTU and segment size: both VXLAN paths carry at most the VXLAN device MTU (1450)
//!   per packet, the routed, bridged and underlay paths could carry 1500. So that every
//!   path sends segments of the same size, the TCP clients set their MSS to the VXLAN
//!   MTU - 40 (`iperf3 -M 1410`); nothing else on those paths is changed.
//!
//! ICMP redirects (the `overlay_rule` path only): the sender reaches its router through
//! the host (policy rule, br-d back to br-d). A namespace inherits the init namespace's
//! IPv4 `conf/all` settings, so on a host with `ip_forward=1` and
//! `conf.all.accept_redirects=0` (as here) the service ignores the host's redirect and
//! every packet takes the detour, as on a Docker host. The description records the
//! sender's route and the redirect counters.
//!
//! The exact topology (addresses, devices, MTUs, `ethtool -k` offloads, the VXLAN
//! devices' `ip -d link` details, sysctls, steering) goes into the JSON's `extra`
//! through [`Datapath::describe`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use vrouter_kernel::{Kernel, Route, VxlanSpec};
use vrouter_state::{Mac, Prefix, Vni};

use crate::bench::{Figure, Samples};
use crate::cmd::{exec_ok, exec_timeout};
use crate::daemon::spawn_in;
use crate::mesh::{Mesh, StackDef};
use crate::topology::{Protection, Role};
use crate::wait_until;

/// VNI of the overlay stacks.
pub const OVERLAY_VNI: u32 = 1000;
/// Flannel's default VNI and device name.
pub const FLANNEL_VNI: u32 = 1;
pub const FLANNEL_DEV: &str = "flannel.1";
/// IPv4 + TCP headers: MSS = MTU - 40.
const TCP_IP_HEADERS: u32 = 40;
/// Route protocol of the baselines' routes (RTPROT_STATIC: not discovery's 118).
const RTPROT_STATIC: u8 = 4;

/// One measured path: sender and receiver namespaces and the receiver's address.
#[derive(Debug, Clone)]
pub struct PathDef {
    /// `overlay`, `flannel`, `routed`, `underlay`, `overlay_fw`.
    pub name: &'static str,
    pub label: &'static str,
    pub from_ns: String,
    pub from_ip: Ipv4Addr,
    pub to_ns: String,
    pub to_ip: Ipv4Addr,
    /// How the hosts are set while it is measured.
    pub condition: Condition,
}

/// How the hosts are set while a path is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// No firewall, bridge netfilter on (`bridge-nf-call-iptables=1`, as Docker sets).
    Plain,
    /// The Docker-like firewall loaded on hosts 1 and 2.
    Firewall,
}

impl Condition {
    pub const ALL: [Condition; 2] = [Condition::Plain, Condition::Firewall];

    pub fn name(self) -> &'static str {
        match self {
            Condition::Plain => "plain",
            Condition::Firewall => "firewall",
        }
    }
}

/// Discovery's steering modes on the bench's hosts: 1 and 2 the default (`ports`), 3
/// and 4 `rule` (the `overlay_rule` path).
pub const RULE_HOSTS: [usize; 2] = [3, 4];
/// Hosts of the mesh.
pub const HOSTS: usize = 4;

/// The steering mode discovery.json gives `stack`: its own mode when listed, else the
/// configured one; None without a `steering` section (a discovery without port
/// steering). Pure.
pub fn steering_mode(discovery: &Value, stack: &str) -> Option<String> {
    let st = discovery.get("steering")?;
    st.get("stacks")
        .and_then(|m| m.get(stack))
        .and_then(|s| s.get("mode"))
        .or_else(|| st.get("mode"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The two hosts, the mesh and the baselines, built and checked.
pub struct Datapath {
    pub mesh: Mesh,
    pub paths: Vec<PathDef>,
    /// MSS every TCP client uses (VXLAN device MTU - 40).
    pub mss: u32,
    /// MTU of `vxlan1000` as discovery made it (and so of `flannel.1`).
    pub vxlan_mtu: u32,
}

/// Runs `f` on a thread of its own in network namespace `ns` with a current-thread tokio
/// runtime and a [`Kernel`] bound to that namespace.
fn with_kernel<T, F, Fut>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(Kernel) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> Result<T> {
        let fd = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns {path}"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let k = Kernel::connect().await?;
            f(k).await
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("kernel thread in {ns} panicked"))?
}

/// What `vxlan<VNI>` looks like after discovery made it: (port, learning, underlay
/// index, MTU).
fn overlay_device(ns: &str) -> Result<(u16, bool, u32, u32)> {
    let name = Vni::new(OVERLAY_VNI)?.vxlan_ifname();
    with_kernel(ns, move |k| async move {
        let l = k
            .link_by_name(&name)
            .await?
            .with_context(|| format!("discovery made no {name}"))?;
        let v = l.vxlan.with_context(|| format!("{name} is not a vxlan"))?;
        let underlay = v
            .underlay
            .with_context(|| format!("{name} has no underlay device"))?;
        Ok((v.port, v.learning, underlay, l.mtu))
    })
}

/// Creates `flannel.1` in `ns` as discovery creates its devices, puts `addr/32` on it,
/// brings it up; returns its MAC.
fn create_flannel_device(ns: &str, spec: VxlanSpec, addr: Ipv4Addr) -> Result<Mac> {
    with_kernel(ns, move |k| async move {
        let index = k.create_vxlan(&spec).await?;
        k.set_up(index).await?;
        k.replace_address(index, addr, 32).await?;
        let l = k
            .link_by_index(index)
            .await?
            .context("flannel device vanished")?;
        l.mac.context("flannel device has no MAC")
    })
}

/// Flannel's per-remote-host state on `flannel.1`: neighbour, FDB row, onlink route.
fn flannel_peer(
    ns: &str,
    remote_subnet: Prefix,
    remote_dev_ip: Ipv4Addr,
    remote_mac: Mac,
    remote_underlay: Ipv4Addr,
) -> Result<()> {
    with_kernel(ns, move |k| async move {
        let l = k
            .link_by_name(FLANNEL_DEV)
            .await?
            .context("no flannel device")?;
        k.replace_neighbour(l.index, remote_dev_ip, remote_mac)
            .await?;
        k.replace_fdb(l.index, remote_mac, remote_underlay).await?;
        k.replace_route(&Route {
            table: 254,
            dst: remote_subnet,
            gateway: Some(remote_dev_ip),
            oif: Some(l.index),
            onlink: true,
            protocol: RTPROT_STATIC,
            nexthop: None,
        })
        .await?;
        Ok(())
    })
}

/// The router `ns` sends to `dst` through when it holds a redirected route for it
/// (`ip route get` shows `<redirected>`), else None.
pub fn redirected_to(ns: &str, dst: Ipv4Addr) -> Option<Ipv4Addr> {
    let out = exec_ok(Some(ns), &["ip", "-4", "route", "get", &dst.to_string()]).ok()?;
    if !out.stdout.contains("redirected") {
        return None;
    }
    let mut words = out.stdout.split_whitespace();
    words.find(|w| *w == "via")?;
    words.next()?.parse().ok()
}

impl Datapath {
    /// Builds the mesh and the baselines, checks every path answers a ping, and leaves
    /// the firewall off on both hosts.
    pub fn build(test: &str) -> Result<Datapath> {
        let mut mesh = Mesh::build(
            test,
            HOSTS,
            vec![
                StackDef::new("a", 1, OVERLAY_VNI, "10.1.0.0/24"),
                StackDef::new("b", 2, OVERLAY_VNI, "10.2.0.0/24"),
                StackDef::new("c", 1, OVERLAY_VNI, "10.3.0.0/24"),
                StackDef::new("d", 3, OVERLAY_VNI, "10.4.0.0/24"),
                StackDef::new("e", 4, OVERLAY_VNI, "10.5.0.0/24"),
            ],
        )?;
        for h in RULE_HOSTS {
            mesh.set_discovery_env(h, "VROUTER_STEERING", "rule");
        }
        for h in 1..=HOSTS {
            mesh.write_config(h)?;
            mesh.start_discovery(h)?;
        }
        mesh.start_routers()?;
        mesh.wait_converged(Duration::from_secs(30))?;
        let (a, b, c) = (mesh.svc("a"), mesh.svc("b"), mesh.svc("c"));
        let (d, e) = (mesh.svc("d"), mesh.svc("e"));

        // The baselines' networks and services (no routers).
        let mut svcs = Vec::new();
        for (net, host, cidr, ip) in [
            ("fa", 1, "10.11.0.0/24", "10.11.0.5"),
            ("fb", 2, "10.12.0.0/24", "10.12.0.5"),
            ("ra", 1, "10.21.0.0/24", "10.21.0.5"),
            ("rb", 2, "10.22.0.0/24", "10.22.0.5"),
            ("sa", 1, "10.31.0.0/24", "10.31.0.5"),
            ("sb", 1, "10.32.0.0/24", "10.32.0.5"),
        ] {
            let h = mesh.topo.host_mut(host);
            h.add_network(net, cidr, Protection::Protected)?;
            svcs.push(h.add_container(net, "svc", ip, Role::Service)?);
        }
        let (fa, fb, ra, rb, sa, sb) = (&svcs[0], &svcs[1], &svcs[2], &svcs[3], &svcs[4], &svcs[5]);

        let h1 = mesh.topo.host(1).ns.clone();
        let h2 = mesh.topo.host(2).ns.clone();
        let u1 = mesh.topo.host(1).underlay_ip;
        let u2 = mesh.topo.host(2).underlay_ip;

        // Flannel-style VXLAN, from discovery's own device spec.
        let mut macs = Vec::new();
        let mut vxlan_mtu = 0;
        for (ns, local, dev_ip) in [
            (&h1, u1, Ipv4Addr::new(10, 250, 0, 1)),
            (&h2, u2, Ipv4Addr::new(10, 250, 0, 2)),
        ] {
            let (port, learning, underlay, mtu) = overlay_device(ns)?;
            vxlan_mtu = mtu;
            let spec = VxlanSpec {
                name: FLANNEL_DEV.into(),
                vni: Vni::new(FLANNEL_VNI)?,
                local: Some(local),
                underlay,
                port,
                mtu,
                learning,
            };
            macs.push(create_flannel_device(ns, spec, dev_ip)?);
        }
        flannel_peer(
            &h1,
            "10.12.0.0/24".parse()?,
            Ipv4Addr::new(10, 250, 0, 2),
            macs[1],
            u2,
        )?;
        flannel_peer(
            &h2,
            "10.11.0.0/24".parse()?,
            Ipv4Addr::new(10, 250, 0, 1),
            macs[0],
            u1,
        )?;

        // Routed host to host.
        exec_ok(
            Some(&h1),
            &[
                "ip",
                "route",
                "replace",
                "10.22.0.0/24",
                "via",
                &u2.to_string(),
                "dev",
                "eth0",
            ],
        )?;
        exec_ok(
            Some(&h2),
            &[
                "ip",
                "route",
                "replace",
                "10.21.0.0/24",
                "via",
                &u1.to_string(),
                "dev",
                "eth0",
            ],
        )?;

        use Condition::{Firewall, Plain};
        let path =
            |name, label, from: &crate::Container, to: &crate::Container, condition| PathDef {
                name,
                label,
                from_ns: from.ns.clone(),
                from_ip: from.ip,
                to_ns: to.ns.clone(),
                to_ip: to.ip,
                condition,
            };
        let paths = vec![
            path(
                "overlay",
                "service to service over docker-vrouter, port steering",
                &a,
                &b,
                Plain,
            ),
            path(
                "overlay_rule",
                "service to service over docker-vrouter, policy-rule steering",
                &d,
                &e,
                Plain,
            ),
            path(
                "flannel",
                "service to service over Flannel-style VXLAN in the hosts",
                fa,
                fb,
                Plain,
            ),
            path(
                "routed",
                "service to service routed host to host, no VXLAN",
                ra,
                rb,
                Plain,
            ),
            PathDef {
                name: "underlay",
                label: "host to host over the underlay",
                from_ns: h1.clone(),
                from_ip: u1,
                to_ns: h2.clone(),
                to_ip: u2,
                condition: Plain,
            },
            path(
                "same_host",
                "same-host stack to stack over docker-vrouter, port steering",
                &a,
                &c,
                Plain,
            ),
            path(
                "bridged",
                "same-host bridge to bridge routed by the host, no firewall",
                sa,
                sb,
                Plain,
            ),
            path(
                "overlay_fw",
                "service to service over docker-vrouter, port steering, Docker-like firewall loaded",
                &a,
                &b,
                Firewall,
            ),
        ];
        if vxlan_mtu <= TCP_IP_HEADERS + 500 {
            bail!("vxlan1000 MTU {vxlan_mtu} is too small to benchmark");
        }
        let mut dp = Datapath {
            mesh,
            paths,
            mss: vxlan_mtu - TCP_IP_HEADERS,
            vxlan_mtu,
        };
        // Every path must work under its condition.
        for c in Condition::ALL {
            dp.set_condition(c)?;
            for p in dp.paths.iter().filter(|p| p.condition == c) {
                let ok = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
                    crate::ping(&p.from_ns, &p.to_ip.to_string(), 1, Duration::from_secs(1))
                });
                if !ok {
                    dp.mesh.dump_logs();
                    bail!(
                        "path {} ({} -> {}) does not answer a ping",
                        p.name,
                        p.from_ns,
                        p.to_ip
                    );
                }
            }
        }
        dp.set_condition(Plain)?;
        dp.check_steering()?;
        Ok(dp)
    }

    /// Sets the hosts for a path's [`Condition`]: the firewall.
    pub fn set_condition(&mut self, c: Condition) -> Result<()> {
        self.set_firewall(c == Condition::Firewall)
    }

    /// discovery.json of `host`, as JSON (Null when unreadable).
    fn discovery_json(&self, host: usize) -> Value {
        std::fs::read(self.mesh.state_dir(host).join("discovery.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    /// Fails unless discovery steers stacks `a` and `c` at their ports and stack `d`
    /// by the policy rule (waiting up to 10 s for the first steering pass): the paths'
    /// names must say what was measured.
    pub fn check_steering(&self) -> Result<()> {
        for (stack, host, want) in [("a", 1, "ports"), ("c", 1, "ports"), ("d", 3, "rule")] {
            let mut seen = None;
            let ok = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
                seen = steering_mode(&self.discovery_json(host), stack);
                // No steering section is the policy-rule path (schema.rs).
                seen.as_deref().unwrap_or("rule") == want
            });
            if !ok {
                let doc = self.discovery_json(host);
                bail!(
                    "stack {stack} on host {host} is not steered in mode {want}: discovery.json says {} (steering: {}); a discovery without port steering, or a fallback (see its log)",
                    seen.as_deref().unwrap_or("nothing"),
                    doc.get("steering").cloned().unwrap_or(Value::Null)
                );
            }
        }
        Ok(())
    }

    /// Whether the Flannel-style path answers a ping with the Docker-like firewall
    /// loaded (it should not: see the module doc). Leaves the hosts [`Condition::Plain`].
    pub fn flannel_under_firewall(&mut self) -> Result<bool> {
        let p = self
            .paths
            .iter()
            .find(|p| p.name == "flannel")
            .context("no flannel path")?
            .clone();
        self.set_condition(Condition::Firewall)?;
        let answered = crate::ping(&p.from_ns, &p.to_ip.to_string(), 3, Duration::from_secs(3));
        self.set_condition(Condition::Plain)?;
        Ok(answered)
    }

    /// Loads (`on`) or removes the Docker-like firewall on both hosts.
    pub fn set_firewall(&mut self, on: bool) -> Result<()> {
        for h in 1..=2 {
            self.mesh.topo.host_mut(h).set_firewall(on)?;
        }
        Ok(())
    }

    pub fn log_dir(&self) -> &Path {
        self.mesh.topo.log_dir()
    }

    /// The topology as measured: paths, links (MTU, offloads), VXLAN details, sysctls.
    pub fn describe(&self) -> Value {
        let h1 = self.mesh.topo.host(1).ns.clone();
        let h2 = self.mesh.topo.host(2).ns.clone();
        let (ra, rb) = (self.mesh.rtr("a"), self.mesh.rtr("b"));
        let (rd, re) = (self.mesh.rtr("d"), self.mesh.rtr("e"));
        let h3 = self.mesh.topo.host(3).ns.clone();
        let vx = Vni::new(OVERLAY_VNI)
            .map(|v| v.vxlan_ifname())
            .unwrap_or_default();
        let ovl = Vni::new(OVERLAY_VNI)
            .map(|v| v.overlay_ifname())
            .unwrap_or_default();
        let svc_ns = |p: &str| {
            self.paths
                .iter()
                .find(|x| x.name == p)
                .map(|x| x.from_ns.clone())
                .unwrap_or_default()
        };
        let links: Vec<(String, String, &str)> = vec![
            (h1.clone(), "eth0".into(), "host 1 underlay (veth)"),
            (
                h1.clone(),
                vx.clone(),
                "host 1 overlay VXLAN device (discovery)",
            ),
            (
                h1.clone(),
                FLANNEL_DEV.into(),
                "host 1 Flannel-style VXLAN device",
            ),
            (h1.clone(), "br-a".into(), "host 1 bridge of stack a"),
            (
                h1.clone(),
                "br-fa".into(),
                "host 1 bridge of the flannel service",
            ),
            (
                h1.clone(),
                "br-ra".into(),
                "host 1 bridge of the routed service",
            ),
            (ra.ns.clone(), "eth0".into(), "router a, on br-a (veth)"),
            (
                ra.ns.clone(),
                ovl.clone(),
                "router a overlay link (macvlan on vxlan1000)",
            ),
            (svc_ns("overlay"), "eth0".into(), "service a (veth)"),
            (
                svc_ns("flannel"),
                "eth0".into(),
                "flannel service on host 1 (veth)",
            ),
            (
                svc_ns("routed"),
                "eth0".into(),
                "routed service on host 1 (veth)",
            ),
            (h2.clone(), "eth0".into(), "host 2 underlay (veth)"),
            (
                h2.clone(),
                vx.clone(),
                "host 2 overlay VXLAN device (discovery)",
            ),
            (
                h2.clone(),
                FLANNEL_DEV.into(),
                "host 2 Flannel-style VXLAN device",
            ),
            (
                rb.ns.clone(),
                ovl.clone(),
                "router b overlay link (macvlan on vxlan1000)",
            ),
            (
                h3.clone(),
                vx.clone(),
                "host 3 overlay VXLAN device (discovery, rule steering)",
            ),
            (h3.clone(), "br-d".into(), "host 3 bridge of stack d"),
            (rd.ns.clone(), "eth0".into(), "router d, on br-d (veth)"),
            (
                re.ns.clone(),
                ovl.clone(),
                "router e overlay link (macvlan on vxlan1000)",
            ),
            (svc_ns("overlay_rule"), "eth0".into(), "service d (veth)"),
            (
                svc_ns("same_host"),
                "eth0".into(),
                "service a, same-host sender (veth)",
            ),
            (
                svc_ns("bridged"),
                "eth0".into(),
                "bridged service on host 1 (veth)",
            ),
        ];
        let links: Vec<Value> = links
            .iter()
            .map(|(ns, dev, role)| {
                json!({
                    "ns": ns,
                    "dev": dev,
                    "role": role,
                    "mtu": link_mtu(ns, dev),
                    "offloads": offloads(ns, dev),
                })
            })
            .collect();
        let details = |ns: &str, dev: &str| {
            exec_ok(Some(ns), &["ip", "-d", "-o", "link", "show", "dev", dev])
                .map(|o| o.stdout.trim().to_string())
                .unwrap_or_else(|e| format!("error: {e:#}"))
        };
        let same_features = features(&h1, &vx) == features(&h1, FLANNEL_DEV);
        let sysctl = |ns: &str, k: &str| {
            exec_ok(Some(ns), &["sysctl", "-n", k])
                .map(|o| o.stdout.trim().to_string())
                .unwrap_or_else(|_| "?".into())
        };
        let svc_a = svc_ns("overlay");
        let svc_d = svc_ns("overlay_rule");
        let sysctls: Vec<Value> = [
            (h1.as_str(), "host 1"),
            (h2.as_str(), "host 2"),
            (h3.as_str(), "host 3"),
            (ra.ns.as_str(), "router a"),
            (rd.ns.as_str(), "router d"),
            (svc_a.as_str(), "service a (overlay sender)"),
            (svc_d.as_str(), "service d (overlay_rule sender)"),
        ]
        .iter()
        .map(|(ns, who)| {
            let keys = [
                "net.ipv4.ip_forward",
                "net.ipv4.conf.all.rp_filter",
                "net.ipv4.conf.default.rp_filter",
                "net.bridge.bridge-nf-call-iptables",
                "net.ipv4.tcp_congestion_control",
                "net.ipv4.conf.eth0.forwarding",
                "net.ipv4.conf.all.accept_redirects",
                "net.ipv4.conf.eth0.accept_redirects",
            ];
            let vals: serde_json::Map<String, Value> = keys
                .iter()
                .map(|k| (k.to_string(), json!(sysctl(ns, k))))
                .collect();
            json!({"who": who, "ns": ns, "values": vals})
        })
        .collect();
        let routes = |ns: &str| {
            exec_ok(Some(ns), &["ip", "-4", "route", "show"])
                .map(|o| o.stdout.lines().map(str::to_string).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let lines = |ns: &str, argv: &[&str]| {
            exec_ok(Some(ns), argv)
                .map(|o| o.stdout.lines().map(str::to_string).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let route_get = |path: &str| {
            self.paths.iter().find(|p| p.name == path).map(|p| {
                lines(
                    &p.from_ns,
                    &["ip", "-4", "route", "get", &p.to_ip.to_string()],
                )
            })
        };
        let steering = |h: usize| self.discovery_json(h).get("steering").cloned();
        json!({
            "host_rules": {"host1": lines(&h1, &["ip", "-4", "rule", "show"]), "host3": lines(&h3, &["ip", "-4", "rule", "show"])},
            // Port steering: discovery's view and the netdev tables with their counters
            // (after the runs: the per-port counters show the traffic took the chains).
            "steering": {
                "discovery_host1": steering(1),
                "discovery_host2": steering(2),
                "discovery_host3": steering(3),
                "netdev_host1": lines(&h1, &["nft", "list", "ruleset", "netdev"]),
                "netdev_host2": lines(&h2, &["nft", "list", "ruleset", "netdev"]),
                "netdev_host3": lines(&h3, &["nft", "list", "ruleset", "netdev"]),
            },
            // Whether overlay_rule's sender took the host's ICMP redirect to its router (a
            // service namespace that inherited forwarding=1 and all.accept_redirects=0
            // ignores it and keeps sending through the host).
            "overlay_rule_sender_icmp_redirects": lines(&svc_d, &["nstat", "-az", "IcmpInRedirects"]),
            "overlay_rule_host_icmp_redirects": lines(&h3, &["nstat", "-az", "IcmpOutRedirects"]),
            "overlay_sender_route": route_get("overlay"),
            "overlay_rule_sender_route": route_get("overlay_rule"),
            "router_nft": {"router_a": lines(&ra.ns, &["nft", "list", "ruleset"]), "router_d": lines(&rd.ns, &["nft", "list", "ruleset"])},
            "host_forwarded": {"host1": lines(&h1, &["nstat", "-az", "IpForwDatagrams"]), "host3": lines(&h3, &["nstat", "-az", "IpForwDatagrams"])},
            "underlay": {"subnet": "198.18.0.0/24", "host1": self.mesh.topo.host(1).underlay_ip.to_string(), "host2": self.mesh.topo.host(2).underlay_ip.to_string(), "mtu": link_mtu(&h1, "eth0")},
            "vxlan_mtu": self.vxlan_mtu,
            "tcp_mss": self.mss,
            "paths": self.paths.iter().map(|p| json!({
                "name": p.name,
                "label": p.label,
                "from_ns": p.from_ns,
                "from_ip": p.from_ip.to_string(),
                "to_ns": p.to_ns,
                "to_ip": p.to_ip.to_string(),
                "condition": p.condition.name(),
            })).collect::<Vec<_>>(),
            "links": links,
            "vxlan_details": {
                "overlay": details(&h1, &vx),
                "flannel": details(&h1, FLANNEL_DEV),
                "same_offloads": same_features,
            },
            "host_routes": {"host1": routes(&h1), "host2": routes(&h2)},
            "sysctls": sysctls,
            "flannel": {
                "vni": FLANNEL_VNI,
                "device": FLANNEL_DEV,
                "addresses": ["10.250.0.1/32 on host 1", "10.250.0.2/32 on host 2"],
                "recipe": "route <remote subnet> via 10.250.0.<remote> dev flannel.1 onlink; permanent neighbour 10.250.0.<remote> -> remote flannel.1 MAC; FDB remote MAC -> remote underlay IP",
            },
            "routed": "each host: ip route <remote subnet> via <remote underlay IP> dev eth0",
            "bridged": "host 1 routes between its bridges br-sa and br-sb (connected routes), no firewall",
            "steering_modes": "hosts 1 and 2: VROUTER_STEERING=ports (the default); hosts 3 and 4: VROUTER_STEERING=rule",
            "firewall": "Docker-28.2-like nftables ruleset (tests/src/firewall.rs) loaded on hosts 1 and 2 only while overlay_fw is measured, removed for the other paths",
        })
    }
}

fn link_mtu(ns: &str, dev: &str) -> Value {
    exec_ok(Some(ns), &["ip", "-o", "link", "show", "dev", dev])
        .ok()
        .and_then(|o| {
            let w: Vec<&str> = o.stdout.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "mtu")?;
            w.get(i + 1)?.parse::<u64>().ok()
        })
        .map(Value::from)
        .unwrap_or(Value::Null)
}

/// `ethtool -k` as (feature, state) pairs, `[fixed]` kept in the state.
fn features(ns: &str, dev: &str) -> Vec<(String, String)> {
    let Ok(o) = exec_ok(Some(ns), &["ethtool", "-k", dev]) else {
        return Vec::new();
    };
    o.stdout
        .lines()
        .skip(1)
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// The offloads that matter for this comparison, from `ethtool -k`.
fn offloads(ns: &str, dev: &str) -> Value {
    const KEYS: [&str; 11] = [
        "rx-checksumming",
        "tx-checksumming",
        "scatter-gather",
        "tcp-segmentation-offload",
        "generic-segmentation-offload",
        "generic-receive-offload",
        "large-receive-offload",
        "rx-gro-list",
        "rx-udp-gro-forwarding",
        "tx-udp_tnl-segmentation",
        "tx-udp_tnl-csum-segmentation",
    ];
    let f = features(ns, dev);
    let m: serde_json::Map<String, Value> = f
        .into_iter()
        .filter(|(k, _)| KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k, json!(v)))
        .collect();
    Value::Object(m)
}

/// Waits until something listens on TCP `port` in `ns`.
fn wait_listening(ns: &str, port: u16) -> bool {
    let want = format!(":{port}");
    wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        exec_ok(Some(ns), &["ss", "-Hltn"])
            .map(|o| {
                o.stdout.lines().any(|l| {
                    l.split_whitespace()
                        .nth(3)
                        .is_some_and(|a| a.ends_with(&want))
                })
            })
            .unwrap_or(false)
    })
}

/// One iperf3 run from `p.from_ns` to `p.to_ip`: `streams` parallel TCP streams for
/// `secs` seconds with MSS `mss`; returns the received rate in Mbit/s.
pub fn iperf(
    log_dir: &Path,
    p: &PathDef,
    port: u16,
    secs: u32,
    streams: u32,
    mss: u32,
) -> Result<f64> {
    let port_s = port.to_string();
    let mut server = spawn_in(
        &p.to_ns,
        log_dir,
        "iperf3",
        &["-s", "-1", "-p", &port_s],
        &[],
    )?;
    if !wait_listening(&p.to_ns, port) {
        bail!(
            "iperf3 server did not listen in {}\n{}",
            p.to_ns,
            server.logs()
        );
    }
    let out = exec_timeout(
        Some(&p.from_ns),
        &[
            "iperf3",
            "-c",
            &p.to_ip.to_string(),
            "-p",
            &port_s,
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-M",
            &mss.to_string(),
            "-J",
        ],
        Duration::from_secs(u64::from(secs) + 30),
    )?;
    let _ = server.wait_exit(Duration::from_secs(5));
    let v: Value = serde_json::from_str(&out.stdout).with_context(|| {
        format!(
            "iperf3 client output is not JSON ({}): {}",
            out.stderr.trim(),
            out.stdout
        )
    })?;
    if let Some(e) = v.get("error") {
        bail!("iperf3 {}: {e}\n{}", p.name, server.logs());
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 output has no end.sum_received: {}", out.stdout))?;
    Ok(bps / 1e6)
}

/// Average ICMP echo RTT in ms over `count` pings 50 ms apart.
pub fn ping_rtt(p: &PathDef, count: u32) -> Result<f64> {
    let out = exec_timeout(
        Some(&p.from_ns),
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.05",
            "-W",
            "2",
            &p.to_ip.to_string(),
        ],
        Duration::from_secs(u64::from(count) / 10 + 15),
    )?;
    parse_ping_avg(&out.stdout)
        .with_context(|| format!("ping {} failed: {} {}", p.name, out.stdout, out.stderr))
}

/// The average of `rtt min/avg/max/mdev = a/b/c/d ms`.
pub fn parse_ping_avg(out: &str) -> Option<f64> {
    let l = out.lines().find(|l| l.contains("min/avg/max"))?;
    let vals = l.split('=').nth(1)?.trim();
    vals.split('/').nth(1)?.trim().parse().ok()
}

/// TCP request/response: `iterations` 1-byte exchanges over one connection
/// (`vrt-probe tcp-rr` against `vrt-probe tcp-serve`). Returns (median, mean) in µs.
pub fn tcp_rr(log_dir: &Path, p: &PathDef, port: u16, iterations: u32) -> Result<(f64, f64)> {
    let probe = crate::probe_bin()?.display().to_string();
    let addr = format!("{}:{port}", p.to_ip);
    let out = log_dir.join(format!("rr-{port}"));
    let ready = log_dir.join(format!("rr-{port}.ready"));
    let outs = out.display().to_string();
    let mut server = spawn_in(
        &p.to_ns,
        log_dir,
        &probe,
        &["tcp-serve", &addr, &outs, "30"],
        &[],
    )?;
    if !wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        ready.exists()
    }) {
        bail!("tcp-serve did not start in {}\n{}", p.to_ns, server.logs());
    }
    let line = exec_timeout(
        Some(&p.from_ns),
        &[&probe, "tcp-rr", &addr, &iterations.to_string(), "10"],
        Duration::from_secs(120),
    )?
    .check()
    .with_context(|| server.logs())?
    .stdout;
    server.wait_success(Duration::from_secs(10))?;
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("unexpected tcp-rr output: {line}"))
    };
    Ok((field("p50_us=")?, field("mean_us=")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steering_mode_from_discovery_json() {
        let doc = |v: &str| -> Value { serde_json::from_str(v).unwrap() };
        let d = doc(
            r#"{"schema":1,"steering":{"mode":"ports","table":"vrouter","stacks":{"a":{"mode":"ports","ports":["veth1"]},"x":{"mode":"rule","reason":"router port not found yet"}}}}"#,
        );
        assert_eq!(steering_mode(&d, "a").as_deref(), Some("ports"));
        assert_eq!(steering_mode(&d, "x").as_deref(), Some("rule"));
        // Not listed: the configured mode.
        assert_eq!(steering_mode(&d, "c").as_deref(), Some("ports"));
        // A discovery without port steering, or no file.
        assert_eq!(steering_mode(&doc(r#"{"schema":1}"#), "a"), None);
        assert_eq!(steering_mode(&Value::Null, "a"), None);
    }

    #[test]
    fn ping_average() {
        let out = "--- 10.2.0.5 ping statistics ---\n20 packets transmitted, 20 received, 0% packet loss, time 969ms\nrtt min/avg/max/mdev = 0.061/0.118/0.341/0.061 ms\n";
        assert_eq!(parse_ping_avg(out), Some(0.118));
        assert_eq!(parse_ping_avg("100% packet loss"), None);
    }
}

/// Samples of one path, by metric (`tcp1`, `tcp4`, `ping`, `tcp_rr`, `tcp_rr_mean`).
pub type PathSamples = BTreeMap<&'static str, Samples>;

/// The newest sample of `k` (NaN when there is none).
pub fn last(s: &PathSamples, k: &str) -> f64 {
    s.get(k)
        .and_then(|v| v.0.last().copied())
        .unwrap_or(f64::NAN)
}

/// How long and how much one round measures on a path.
#[derive(Debug, Clone, Copy)]
pub struct RoundSpec {
    pub secs: u32,
    pub mss: u32,
    pub pings: u32,
    pub rr_iterations: u32,
}

/// One round on one path, as vrt-bench and vrt-enc-bench take it: iperf with 1 and 4
/// streams, ping RTT and TCP request/response, appended to `s`. `stop` runs between
/// measurements (an interrupted bench stops at the next one); `port` moves on for
/// every iperf and tcp_rr server.
pub fn measure_round(
    log_dir: &Path,
    p: &PathDef,
    spec: RoundSpec,
    port: &mut u16,
    s: &mut PathSamples,
    stop: &dyn Fn() -> Result<()>,
) -> Result<()> {
    for (key, streams) in [("tcp1", 1), ("tcp4", 4)] {
        stop()?;
        *port += 1;
        let v = iperf(log_dir, p, *port, spec.secs, streams, spec.mss)
            .with_context(|| format!("{key} on {}", p.name))?;
        s.entry(key).or_default().push(v);
    }
    stop()?;
    s.entry("ping").or_default().push(ping_rtt(p, spec.pings)?);
    stop()?;
    *port += 1;
    let (p50, mean) = tcp_rr(log_dir, p, *port, spec.rr_iterations)
        .with_context(|| format!("tcp_rr on {}", p.name))?;
    s.entry("tcp_rr").or_default().push(p50);
    s.entry("tcp_rr_mean").or_default().push(mean);
    eprintln!(
        "  {:<16} tcp1 {:>7.0} Mbit/s  tcp4 {:>7.0} Mbit/s  ping {:.3} ms  tcp_rr {:.1} us",
        p.name,
        last(s, "tcp1"),
        last(s, "tcp4"),
        last(s, "ping"),
        last(s, "tcp_rr")
    );
    Ok(())
}

/// Prints the ratio figures (unit `ratio`) with median, spread and target verdict; keys
/// lose `strip` (e.g. `datapath.ratio.`), the name column is `width` wide.
pub fn print_ratios(figs: &[Figure], strip: &str, width: usize) {
    println!(
        "\n{:<width$} {:>7} {:>7}  target",
        "ratio", "median", "spread"
    );
    for f in figs.iter().filter(|f| f.unit == "ratio") {
        let target = f
            .target
            .map(|t| t.verdict(f.samples.median(), &f.unit))
            .unwrap_or_default();
        println!(
            "{:<width$} {:>7.3} {:>7.2}  {target}",
            f.key.trim_start_matches(strip),
            f.samples.median(),
            f.samples.spread()
        );
    }
}
