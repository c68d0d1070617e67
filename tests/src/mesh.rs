//! A docker-vrouter mesh on simulated hosts: the project's real binaries, each run as
//! Docker would run it, on top of [`Topology`]. Used by the integration tests and the demo.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vrouter_state::{DiscoveryFile, Event, RoutesFile, StateDir};

use crate::daemon::Daemon;
use crate::probe::{tcp_send, TcpServer};
use crate::steering::{NetdevTable, Steering};
use crate::topology::{Container, Protection, Role, Topology};
use crate::{exec_ok, wait_until};

/// One compose stack: a network with a router at .254 and a service at .5.
#[derive(Debug, Clone)]
pub struct StackDef {
    pub name: &'static str,
    pub host: usize,
    pub vni: u32,
    pub cidr: &'static str,
    pub protection: Protection,
    /// What the router announces (`VROUTER_PREFIXES`), when not its network's subnet.
    pub prefixes: Option<&'static str>,
    /// Router and service addresses, when not `.254` and `.5` of the subnet's first /24.
    pub addrs: Option<(&'static str, &'static str)>,
}

impl StackDef {
    pub fn new(name: &'static str, host: usize, vni: u32, cidr: &'static str) -> StackDef {
        StackDef {
            name,
            host,
            vni,
            cidr,
            protection: Protection::Protected,
            prefixes: None,
            addrs: None,
        }
    }

    /// Router at `router`, service at `service` (both in the subnet).
    pub fn addresses(mut self, router: &'static str, service: &'static str) -> StackDef {
        self.addrs = Some((router, service));
        self
    }

    /// The router announces `prefixes` (comma-separated CIDRs) instead of its subnet.
    pub fn announce(mut self, prefixes: &'static str) -> StackDef {
        self.prefixes = Some(prefixes);
        self
    }

    pub fn unprotected(mut self) -> StackDef {
        self.protection = Protection::NatUnprotected;
        self
    }

    /// A stack that same-host stacks must reach: a protected network under port
    /// steering, a nat-unprotected one on the policy-rule path (which needs it on
    /// Docker 28.2+).
    pub fn same_host_peer(self, mode: Steering) -> StackDef {
        match mode {
            Steering::Ports => self,
            Steering::Rule => self.unprotected(),
        }
    }

    fn base(&self) -> [u8; 4] {
        let a: std::net::Ipv4Addr = self.cidr.split('/').next().unwrap().parse().unwrap();
        a.octets()
    }

    pub fn router_ip(&self) -> String {
        if let Some((r, _)) = self.addrs {
            return r.to_string();
        }
        let o = self.base();
        format!("{}.{}.{}.254", o[0], o[1], o[2])
    }

    pub fn service_ip(&self) -> String {
        if let Some((_, v)) = self.addrs {
            return v.to_string();
        }
        let o = self.base();
        format!("{}.{}.{}.5", o[0], o[1], o[2])
    }
}

/// Directory holding the project's binaries: `$VROUTER_BIN_DIR`, else the cargo profile
/// directory this test binary was built into (`target/<profile>`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VROUTER_BIN_DIR") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent();
    for _ in 0..3 {
        let Some(d) = dir else { break };
        if d.join("vrouter-discovery").is_file() && d.join("vrouter-router").is_file() {
            return Ok(d.to_path_buf());
        }
        dir = d.parent();
    }
    bail!(
        "vrouter-discovery / vrouter-router not found near {}; run `cargo build --release --workspace --bins` (make test does) or set VROUTER_BIN_DIR",
        exe.display()
    )
}

pub struct Mesh {
    // Daemons first: fields drop in order, so processes die before their namespaces go.
    discovery: BTreeMap<usize, Daemon>,
    standby: BTreeMap<usize, Daemon>,
    routers: BTreeMap<String, Daemon>,
    pub stacks: Vec<StackDef>,
    /// Stacks left out of the other hosts' static configuration.
    removed: Vec<String>,
    /// The network of each stack copy made by [`Mesh::move_stack`], by (stack, host):
    /// container namespaces are named after their network, so a copy's network is
    /// `<stack>-h<host>` (its router still announces the stack's name).
    copy_nets: BTreeMap<(String, usize), String>,
    /// Extra environment of each host's discovery (e.g. the gossip settings).
    discovery_env: BTreeMap<usize, Vec<(String, String)>>,
    /// Extra environment of each stack's router.
    router_env: BTreeMap<String, Vec<(String, String)>>,
    /// Whether discovery gets the static peer file (`--config`); off for gossip meshes.
    static_peers: bool,
    /// Discovery's `VROUTER_STEERING` on every host (`None`: its default, or
    /// `VROUTER_TEST_STEERING`).
    steering: Option<Steering>,
    pub topo: Topology,
    bins: PathBuf,
}

impl Mesh {
    /// A TCP transfer (256 kB) from one stack's service to another's; the receiver must
    /// see the sender's own address (the overlay does no NAT, whatever the underlay does).
    pub fn transfer(&self, from: &str, to: &str, port: u16) -> Result<(), String> {
        let dst = self.svc(to);
        let src = self.svc(from);
        let addr = format!("{}:{port}", dst.ip);
        let server = TcpServer::start(&dst.ns, &addr, self.topo.log_dir(), Duration::from_secs(5))
            .map_err(|e| format!("{e:#}"))?;
        tcp_send(&src.ns, &addr, 256 * 1024, Duration::from_secs(5))
            .map_err(|e| format!("{from}->{to}: {e:#}"))?;
        let peer = server
            .peer(Duration::from_secs(2))
            .map_err(|e| format!("{e:#}"))?;
        if peer.ip() != std::net::IpAddr::V4(src.ip) {
            return Err(format!(
                "{from}->{to}: receiver saw {peer}, sender is {}",
                src.ip
            ));
        }
        Ok(())
    }

    /// Builds the hosts and stacks, writes each host's static peer file, and starts
    /// discovery on every host and a router in every stack.
    pub fn start(test: &str, hosts: usize, stacks: Vec<StackDef>) -> Result<Mesh> {
        let mut mesh = Mesh::build(test, hosts, stacks)?;
        mesh.start_all()?;
        Ok(mesh)
    }

    /// [`Mesh::start`] with discovery's steering set to `mode` on every host.
    pub fn start_with_steering(
        test: &str,
        hosts: usize,
        stacks: Vec<StackDef>,
        mode: Steering,
    ) -> Result<Mesh> {
        let mut mesh = Mesh::build(test, hosts, stacks)?;
        mesh.set_steering(mode);
        mesh.start_all()?;
        Ok(mesh)
    }

    /// On a built mesh: writes every host's static peer file, starts discovery on every
    /// host and a router in every stack.
    pub fn start_all(&mut self) -> Result<()> {
        for h in 1..=self.topo.hosts().len() {
            self.write_config(h)?;
            self.start_discovery(h)?;
        }
        self.start_routers()
    }

    /// Builds the hosts, the stacks' networks and containers, and empty state
    /// directories; starts nothing (see [`Mesh::start`], [`crate::gossip::GossipMesh`]).
    pub fn build(test: &str, hosts: usize, stacks: Vec<StackDef>) -> Result<Mesh> {
        let bins = bin_dir()?;
        let topo = Topology::builder(test).hosts(hosts).build()?;
        let mut mesh = Mesh {
            discovery: BTreeMap::new(),
            standby: BTreeMap::new(),
            routers: BTreeMap::new(),
            stacks: Vec::new(),
            removed: Vec::new(),
            copy_nets: BTreeMap::new(),
            discovery_env: BTreeMap::new(),
            router_env: BTreeMap::new(),
            static_peers: true,
            steering: Steering::from_env(),
            topo,
            bins,
        };
        for s in stacks {
            mesh.add_stack_containers(s)?;
        }
        for h in 1..=hosts {
            mesh.reset_state_dir(h)?;
        }
        Ok(mesh)
    }

    /// A fresh state directory, and no private directory left from an earlier run (its
    /// node id and claims would carry over into this one).
    fn reset_state_dir(&self, host: usize) -> Result<()> {
        let dir = self.state_dir(host);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(self.private_dir(host));
        std::fs::create_dir_all(&dir)?;
        Ok(())
    }

    /// Adds a stack's network, service and router namespace without starting its router.
    pub fn add_stack_containers(&mut self, s: StackDef) -> Result<()> {
        let h = self.topo.host_mut(s.host);
        h.add_network(s.name, s.cidr, s.protection)?;
        h.add_container(s.name, "rtr", &s.router_ip(), Role::Router)?;
        h.add_container(s.name, "svc", &s.service_ip(), Role::Service)?;
        self.stacks.push(s);
        Ok(())
    }

    /// Starts the router of every stack that has none running.
    pub fn start_routers(&mut self) -> Result<()> {
        let names: Vec<String> = self
            .stacks
            .iter()
            .map(|s| s.name.to_string())
            .filter(|n| !self.routers.contains_key(n))
            .collect();
        for n in names {
            self.start_router(&n)?;
        }
        Ok(())
    }

    /// A new stack on a running mesh: its network, router and service, and its router
    /// started.
    pub fn add_stack(&mut self, s: StackDef) -> Result<()> {
        let name = s.name;
        self.add_stack_containers(s)?;
        self.start_router(name)
    }

    /// A new simulated host (next index, next underlay address) with an empty state
    /// directory; nothing started on it. Returns its index.
    pub fn add_host(&mut self) -> Result<usize> {
        let h = self.topo.add_next_host()?;
        self.reset_state_dir(h)?;
        Ok(h)
    }

    /// Discovery's steering mode on every host, from its next start on (a host's own
    /// `VROUTER_STEERING` from [`Mesh::set_discovery_env`] wins).
    pub fn set_steering(&mut self, mode: Steering) {
        self.steering = Some(mode);
    }

    /// The steering mode the mesh asked discovery for (`None`: discovery's default,
    /// which is `ports`).
    pub fn steering(&self) -> Steering {
        self.steering.unwrap_or(Steering::Ports)
    }

    /// Give discovery the static peer file (`--config`, the default) or not.
    pub fn set_static_peers(&mut self, on: bool) {
        self.static_peers = on;
    }

    /// Sets (replaces) one environment variable of `host`'s discovery, for its next start.
    pub fn set_discovery_env(&mut self, host: usize, key: &str, value: &str) {
        let env = self.discovery_env.entry(host).or_default();
        env.retain(|(k, _)| k != key);
        env.push((key.to_string(), value.to_string()));
    }

    /// Sets an environment variable of `stack`'s router (from its next start on).
    pub fn set_router_env(&mut self, stack: &str, key: &str, value: &str) {
        let env = self.router_env.entry(stack.to_string()).or_default();
        env.retain(|(k, _)| k != key);
        env.push((key.to_string(), value.to_string()));
    }

    /// Path of the project's binary `name` (`vrouter-discovery`, `vrouter-router`).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bins.join(name)
    }

    pub fn state_dir(&self, host: usize) -> PathBuf {
        PathBuf::from(format!("/run/{}-state-h{host}", crate::prefix()))
    }

    /// Discovery's private directory on `host`: the default beside the state directory.
    pub fn private_dir(&self, host: usize) -> PathBuf {
        crate::docker::private_dir_of(&self.state_dir(host))
    }

    /// The static peer file; in a directory of its own, as a mounted Docker config is.
    pub fn config_path(&self, host: usize) -> PathBuf {
        PathBuf::from(format!("/run/{}-conf-h{host}/peers.toml", crate::prefix()))
    }

    pub fn stack(&self, name: &str) -> &StackDef {
        self.stacks
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no stack {name}"))
    }

    pub fn svc(&self, stack: &str) -> Container {
        self.svc_on(stack, self.stack(stack).host)
    }

    pub fn rtr(&self, stack: &str) -> Container {
        self.rtr_on(stack, self.stack(stack).host)
    }

    /// The static peer file of `host`: every stack on the other hosts, except removed ones.
    pub fn write_config(&self, host: usize) -> Result<()> {
        let mut out = String::new();
        for h in self.topo.hosts() {
            if h.index == host {
                continue;
            }
            let stacks: Vec<&StackDef> = self
                .stacks
                .iter()
                .filter(|s| s.host == h.index && !self.removed.iter().any(|r| r == s.name))
                .collect();
            if stacks.is_empty() {
                continue;
            }
            out.push_str(&format!("[[host]]\naddress = \"{}\"\n", h.underlay_ip));
            for s in stacks {
                out.push_str(&format!(
                    "[[host.stack]]\nname = \"{}\"\nvni = {}\nprefixes = [\"{}\"]\nrouter_ip = \"{}\"\n",
                    s.name,
                    s.vni,
                    s.cidr,
                    s.router_ip()
                ));
            }
            out.push('\n');
        }
        crate::write_file_atomic(&self.config_path(host), out)
    }

    /// Drops a stack from every other host's configuration (its router keeps running).
    pub fn remove_from_config(&mut self, stack: &str) -> Result<()> {
        self.removed.push(stack.to_string());
        let owner = self.stack(stack).host;
        for h in 1..=self.topo.hosts().len() {
            if h != owner {
                self.write_config(h)?;
            }
        }
        Ok(())
    }

    fn discovery_args(&self, host: usize) -> Vec<String> {
        let mut v = vec![
            "--state-dir".into(),
            self.state_dir(host).display().to_string(),
        ];
        if self.static_peers {
            v.push("--config".into());
            v.push(self.config_path(host).display().to_string());
        }
        v
    }

    fn spawn_discovery(&self, host: usize) -> Result<Daemon> {
        let bin = self.bins.join("vrouter-discovery");
        let args = self.discovery_args(host);
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        // The test's own steering table, never a production one (set_discovery_env may
        // override it).
        let table = crate::steering::table_name();
        let mut env: Vec<(&str, &str)> =
            vec![("RUST_LOG", "info"), ("VROUTER_STEERING_TABLE", &table)];
        if let Some(mode) = self.steering {
            env.push(("VROUTER_STEERING", mode.as_str()));
        }
        if let Some(extra) = self.discovery_env.get(&host) {
            env.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        self.topo
            .host(host)
            .spawn_privileged(bin.to_str().unwrap(), &args, &env)
    }

    pub fn start_discovery(&mut self, host: usize) -> Result<()> {
        let d = self.spawn_discovery(host)?;
        self.discovery.insert(host, d);
        Ok(())
    }

    /// A second discovery on the same state directory: it waits as standby.
    pub fn start_standby(&mut self, host: usize) -> Result<()> {
        let d = self.spawn_discovery(host)?;
        self.standby.insert(host, d);
        Ok(())
    }

    /// Promotes the standby's process handle to "the discovery" of the host (after the
    /// active one was killed).
    pub fn standby_is_active(&mut self, host: usize) {
        if let Some(d) = self.standby.remove(&host) {
            self.discovery.insert(host, d);
        }
    }

    pub fn discovery(&mut self, host: usize) -> &mut Daemon {
        self.discovery.get_mut(&host).expect("discovery running")
    }

    /// The running router of `stack`.
    pub fn router(&mut self, stack: &str) -> &mut Daemon {
        self.routers.get_mut(stack).expect("router running")
    }

    pub fn stop_discovery(&mut self, host: usize, signal: i32) -> Result<()> {
        if let Some(mut d) = self.discovery.remove(&host) {
            d.kill(signal)?;
            d.wait_exit(Duration::from_secs(5))?;
        }
        Ok(())
    }

    pub fn start_router(&mut self, stack: &str) -> Result<()> {
        let host = self.stack(stack).host;
        self.start_router_on(stack, host)
    }

    /// Starts the router of `stack`'s copy on `host` (see [`Mesh::move_stack`]): on the
    /// stack's own host under its name, on another under the name `<stack>@h<host>`.
    pub fn start_router_on(&mut self, stack: &str, host: usize) -> Result<()> {
        let s = self.stack(stack).clone();
        let bin = self.bins.join("vrouter-router");
        let dir = self.state_dir(host).display().to_string();
        let vni = s.vni.to_string();
        let mut env = vec![
            ("VROUTER_STACK", s.name),
            ("VROUTER_VNI", vni.as_str()),
            ("VROUTER_STATE_DIR", dir.as_str()),
            ("RUST_LOG", "info"),
        ];
        if let Some(p) = s.prefixes {
            env.push(("VROUTER_PREFIXES", p));
        }
        if let Some(extra) = self.router_env.get(stack) {
            env.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        let (rtr, key) = if s.host == host {
            (self.rtr(stack), stack.to_string())
        } else {
            (self.rtr_on(stack, host), copy_name(stack, host))
        };
        let d = rtr.spawn_privileged(bin.to_str().unwrap(), &[], &env)?;
        self.routers.insert(key, d);
        Ok(())
    }

    pub fn stop_router(&mut self, stack: &str, signal: i32) -> Result<()> {
        if let Some(mut d) = self.routers.remove(stack) {
            d.kill(signal)?;
            d.wait_exit(Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// `docker compose down` of `stack`'s current copy: its router stops (SIGTERM: the
    /// stack enters its grace period) and its router and service containers go (their
    /// namespaces, with the router's overlay link). The network stays.
    pub fn compose_down(&mut self, stack: &str) -> Result<()> {
        self.stop_router(stack, libc::SIGTERM)?;
        let host = self.stack(stack).host;
        let net = self.net_of(stack, host);
        let h = self.topo.host_mut(host);
        h.remove_container(&net, "svc")?;
        h.remove_container(&net, "rtr")
    }

    /// Puts a copy of `stack` on `host` (its network, router and service containers,
    /// the same name and addresses; made once) and makes it the stack's current copy,
    /// as when the same compose file is brought up on another host: from then on
    /// [`Mesh::svc`], [`Mesh::rtr`], [`Mesh::start_router`], [`Mesh::router`] and
    /// [`Mesh::stop_router`] with the stack's name mean the copy on `host`. A router
    /// still running in the previous copy stays, under the name `<stack>@h<old host>`
    /// (stop it with `stop_router("<stack>@h<old>", ..)`); [`Mesh::svc_on`] and
    /// [`Mesh::rtr_on`] reach either copy. Starts nothing.
    pub fn move_stack(&mut self, stack: &str, host: usize) -> Result<()> {
        let s = self.stack(stack).clone();
        if s.host == host {
            return Ok(());
        }
        let net = self.net_of(stack, host);
        if self.topo.host(host).container(&net, "rtr").is_none() {
            let net = format!("{stack}-h{host}");
            let h = self.topo.host_mut(host);
            h.add_network(&net, s.cidr, s.protection)?;
            h.add_container(&net, "rtr", &s.router_ip(), Role::Router)?;
            h.add_container(&net, "svc", &s.service_ip(), Role::Service)?;
            self.copy_nets.insert((stack.to_string(), host), net);
        }
        if let Some(d) = self.routers.remove(stack) {
            self.routers.insert(copy_name(stack, s.host), d);
        }
        if let Some(d) = self.routers.remove(&copy_name(stack, host)) {
            self.routers.insert(stack.to_string(), d);
        }
        if let Some(x) = self.stacks.iter_mut().find(|x| x.name == stack) {
            x.host = host;
        }
        Ok(())
    }

    /// The network of `stack`'s copy on `host`: the stack's name, or the copy's
    /// network made by [`Mesh::move_stack`].
    pub fn net_of(&self, stack: &str, host: usize) -> String {
        self.copy_nets
            .get(&(stack.to_string(), host))
            .cloned()
            .unwrap_or_else(|| stack.to_string())
    }

    /// The service container of `stack`'s copy on `host` (see [`Mesh::move_stack`]).
    pub fn svc_on(&self, stack: &str, host: usize) -> Container {
        self.container_on(stack, host, "svc")
    }

    /// The router container of `stack`'s copy on `host`.
    pub fn rtr_on(&self, stack: &str, host: usize) -> Container {
        self.container_on(stack, host, "rtr")
    }

    fn container_on(&self, stack: &str, host: usize, name: &str) -> Container {
        self.topo
            .host(host)
            .container(&self.net_of(stack, host), name)
            .unwrap_or_else(|| panic!("no container {name} of stack {stack} on host {host}"))
            .clone()
    }

    /// Restarts a router the way `docker restart` does: SIGTERM, a fresh network
    /// namespace with the same address, and a new process.
    pub fn restart_router_fresh_ns(&mut self, stack: &str) -> Result<()> {
        self.stop_router(stack, libc::SIGTERM)?;
        let s = self.stack(stack).clone();
        let h = self.topo.host_mut(s.host);
        h.remove_container(s.name, "rtr")?;
        h.add_container(s.name, "rtr", &s.router_ip(), Role::Router)?;
        self.start_router(stack)
    }

    /// Another service container `name` at `ip` on `stack`'s network (a new veth on the
    /// stack's bridge), as `docker compose up --scale` or a new service would add one.
    pub fn add_service(&mut self, stack: &str, name: &str, ip: &str) -> Result<Container> {
        let s = self.stack(stack).clone();
        self.topo
            .host_mut(s.host)
            .add_container(s.name, name, ip, Role::Service)
    }

    /// Removes service container `name` of `stack` (its namespace and veth go).
    pub fn remove_service(&mut self, stack: &str, name: &str) -> Result<()> {
        let s = self.stack(stack).clone();
        self.topo.host_mut(s.host).remove_container(s.name, name)
    }

    /// Recreates `stack`'s service `svc` the way `docker compose up --force-recreate`
    /// does: a new namespace and veth (new ifindex, new MAC), the same address.
    pub fn recreate_service(&mut self, stack: &str) -> Result<Container> {
        let ip = self.svc(stack).ip.to_string();
        self.remove_service(stack, "svc")?;
        self.add_service(stack, "svc", &ip)
    }

    /// Container `name` of `stack`.
    pub fn container(&self, stack: &str, name: &str) -> Container {
        let s = self.stack(stack);
        self.topo
            .host(s.host)
            .container(s.name, name)
            .unwrap_or_else(|| panic!("no container {name} in stack {stack}"))
            .clone()
    }

    /// Runs `vrouter-discovery cleanup` on `host` (its state directory, the test's
    /// steering table) to its end: whether it succeeded, and its stdout and stderr.
    pub fn run_cleanup(&self, host: usize) -> (bool, String) {
        let bin = self.bin("vrouter-discovery");
        let dir = self.state_dir(host).display().to_string();
        let table = crate::steering::table_name();
        let mut d = self
            .topo
            .host(host)
            .spawn_privileged(
                bin.to_str().unwrap(),
                &["--state-dir", &dir, "cleanup"],
                &[("VROUTER_STEERING_TABLE", &table)],
            )
            .unwrap();
        let status = d
            .wait_exit(Duration::from_secs(10))
            .unwrap()
            .expect("cleanup finished");
        (status.success(), d.stdout() + &d.stderr())
    }

    /// Discovery's steering table on `host` (`None`: no table).
    pub fn steering_table(&self, host: usize) -> Result<Option<NetdevTable>> {
        crate::steering::read_table(
            Some(&self.topo.host(host).ns),
            &crate::steering::table_name(),
        )
    }

    /// Waits until every stack of the mesh runs in `ports` mode (its discovery.json
    /// `steering` section) with an ingress chain bound to its service's and its router's
    /// current port (chains are named after the port's ifindex, CONTRACT.md).
    pub fn wait_ports_steered(&self, timeout: Duration) -> Result<()> {
        for s in &self.stacks {
            if self.removed.iter().any(|r| r == s.name) {
                continue;
            }
            let ports = [self.svc(s.name).host_veth, self.rtr(s.name).host_veth];
            let name = vrouter_state::StackName::new(s.name)?;
            let steered = || -> bool {
                let mode = self
                    .discovery_file(s.host)
                    .and_then(|d| d.steering)
                    .and_then(|st| st.stacks.get(&name).map(|x| x.mode));
                if mode != Some(vrouter_state::SteeringMode::Ports) {
                    return false;
                }
                let Ok(Some(t)) = self.steering_table(s.host) else {
                    return false;
                };
                ports.iter().all(|p| {
                    let Ok(idx) = self.ifindex(s.host, p) else {
                        return false;
                    };
                    t.chain_on(p)
                        .is_some_and(|c| c.name.ends_with(&format!("_{idx}")))
                })
            };
            if !wait_until(timeout, Duration::from_millis(100), steered) {
                self.dump_logs();
                let table = exec_ok(
                    Some(&self.topo.host(s.host).ns),
                    &[
                        "nft",
                        "list",
                        "table",
                        "netdev",
                        &crate::steering::table_name(),
                    ],
                )
                .map(|o| o.stdout)
                .unwrap_or_else(|e| format!("{e:#}"));
                bail!(
                    "stack {} not steered at its ports {ports:?}: discovery.json says {:?}\n{table}",
                    s.name,
                    self.discovery_file(s.host).and_then(|d| d.steering)
                );
            }
        }
        Ok(())
    }

    /// discovery.json of `host`, if readable.
    pub fn discovery_file(&self, host: usize) -> Option<DiscoveryFile> {
        StateDir::open_readonly(&self.state_dir(host))
            .ok()?
            .read_discovery()
            .ok()
    }

    pub fn routes(&self, host: usize) -> Result<RoutesFile> {
        let dir = StateDir::open(&self.state_dir(host))?;
        dir.read_routes().map_err(|e| anyhow::anyhow!("{e}"))
    }

    pub fn events(&self, host: usize) -> Vec<Event> {
        StateDir::open(&self.state_dir(host))
            .ok()
            .and_then(|d| d.read_events().ok())
            .unwrap_or_default()
    }

    /// Prefixes routed (proto 118) in a stack's router namespace.
    pub fn router_routes(&self, stack: &str) -> Vec<String> {
        let out = exec_ok(
            Some(&self.rtr(stack).ns),
            &["ip", "-4", "route", "show", "proto", "118"],
        )
        .map(|o| o.stdout)
        .unwrap_or_default();
        let mut v: Vec<String> = out
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .filter(|p| p != "default")
            .collect();
        v.sort();
        v
    }

    /// Waits until a stack's router has exactly the routes of `to` installed.
    pub fn wait_router_routes(&self, stack: &str, to: &[&str], timeout: Duration) -> bool {
        let mut want: Vec<String> = to.iter().map(|s| self.stack(s).cidr.to_string()).collect();
        want.sort();
        wait_until(timeout, Duration::from_millis(50), || {
            self.router_routes(stack) == want
        })
    }

    /// Waits until every stack's router has routes to every other stack on its VNI.
    pub fn wait_converged(&self, timeout: Duration) -> Result<()> {
        for s in &self.stacks {
            let peers: Vec<&str> = self
                .stacks
                .iter()
                .filter(|o| {
                    o.vni == s.vni && o.name != s.name && !self.removed.iter().any(|r| r == o.name)
                })
                .map(|o| o.name)
                .collect();
            if !self.wait_router_routes(s.name, &peers, timeout) {
                self.dump_logs();
                bail!(
                    "stack {} did not converge: router has {:?}, want routes to {:?}",
                    s.name,
                    self.router_routes(s.name),
                    peers
                );
            }
        }
        Ok(())
    }

    pub fn dump_logs(&self) {
        for d in self
            .discovery
            .values()
            .chain(self.standby.values())
            .chain(self.routers.values())
        {
            d.dump_logs();
        }
        for h in 1..=self.topo.hosts().len() {
            eprintln!("--- events.log of host {h}");
            for e in self.events(h) {
                eprintln!("{} {} {}: {}", e.ts_ms, e.source, e.kind, e.message);
            }
        }
    }

    /// ifindex of a link in a host namespace.
    pub fn ifindex(&self, host: usize, link: &str) -> Result<u32> {
        link_index(&self.topo.host(host).ns, link)
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for d in self
            .discovery
            .values_mut()
            .chain(self.standby.values_mut())
            .chain(self.routers.values_mut())
        {
            let _ = d.kill(libc::SIGKILL);
        }
        for h in 1..=self.topo.hosts().len() {
            let _ = std::fs::remove_dir_all(self.state_dir(h));
            let _ = std::fs::remove_dir_all(self.private_dir(h));
            let _ = std::fs::remove_dir_all(self.config_path(h).parent().unwrap());
        }
    }
}

/// The name [`Mesh::move_stack`] keeps a previous copy's router under.
pub fn copy_name(stack: &str, host: usize) -> String {
    format!("{stack}@h{host}")
}

/// ifindex of a link in a namespace (from netlink: /sys in the caller's mount namespace
/// shows the caller's network namespace, not `ns`'s).
pub fn link_index(ns: &str, link: &str) -> Result<u32> {
    let out = exec_ok(Some(ns), &["ip", "-o", "link", "show", "dev", link])?.stdout;
    out.split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .with_context(|| format!("no index for {link} in {ns}: {out}"))
}
