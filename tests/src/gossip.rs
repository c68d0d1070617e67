//! A docker-vrouter mesh whose discoveries find each other by gossip: no static peer
//! file; every host gets a secret file, a fault-switch file and (hosts 2..N) host 1 as
//! its bootstrap address. Adds underlay faults (see [`crate::underlay`]) and readers for
//! the gossip part of discovery.json.
//!
//! Per host `N` (prefix `p`): `/run/<p>-conf-hN/secret` (`VROUTER_SECRET_FILE`, one
//! secret per line, the first one sends), `/run/<p>-conf-hN/faults`
//! (`VROUTER_TEST_FAULTS`, a line `drop-broadcasts` turns record broadcasts off), and
//! `VROUTER_JOIN=<host 1's underlay address>` except on host 1. Both files go with the
//! configuration directory when the mesh is dropped.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use vrouter_state::Event;

use crate::mesh::{Mesh, StackDef};
use crate::probe::ping;
use crate::wait_until;

/// Default UDP port of the gossip.
pub const GOSSIP_PORT: u16 = 7950;
/// The secret every host starts with.
pub const OLD_SECRET: &str = "vrt-test-gossip-secret-old-0123456789";
/// A second secret, for rotations.
pub const NEW_SECRET: &str = "vrt-test-gossip-secret-new-9876543210";
/// A secret no host of the mesh knows.
pub const WRONG_SECRET: &str = "vrt-test-gossip-secret-WRONG-000000";

/// Event kinds that mean a route or stack was withdrawn.
pub const WITHDRAWAL_KINDS: [&str; 2] = ["route_withdrawn", "stack_withdrawn"];

/// One entry of discovery.json's `gossip.members`.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub node_id: String,
    pub addr: Option<SocketAddr>,
    pub state: String,
    pub stacks: Vec<String>,
    pub version: u64,
    pub datapath_reachable: Option<bool>,
}

impl Member {
    fn from_json(v: &Value) -> Member {
        Member {
            node_id: v["node_id"].as_str().unwrap_or_default().to_string(),
            addr: v["addr"].as_str().and_then(|a| a.parse().ok()),
            state: v["state"].as_str().unwrap_or_default().to_string(),
            stacks: v["stacks"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            version: v["version"].as_u64().unwrap_or(0),
            datapath_reachable: v["datapath_reachable"].as_bool(),
        }
    }

    pub fn ip(&self) -> Option<Ipv4Addr> {
        match self.addr {
            Some(SocketAddr::V4(a)) => Some(*a.ip()),
            _ => None,
        }
    }
}

/// One entry of discovery.json's `peers`, as far as these tests look at it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerView {
    pub addr: String,
    pub source: String,
    pub stacks: Vec<String>,
}

/// One stack per host: stack `sN` on host N, VNI 1000, 10.N.0.0/24 (router .254,
/// service .5).
pub fn one_stack_per_host(hosts: usize) -> Vec<StackDef> {
    (1..=hosts)
        .map(|h| {
            let name: &'static str = Box::leak(format!("s{h}").into_boxed_str());
            let cidr: &'static str = Box::leak(format!("10.{h}.0.0/24").into_boxed_str());
            StackDef::new(name, h, 1000, cidr)
        })
        .collect()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct GossipMesh {
    pub mesh: Mesh,
    /// Hosts that belong to the mesh (share its secret); others (a host with a wrong
    /// secret) are left out of the expectations.
    pub mesh_hosts: Vec<usize>,
    /// Stacks no host should route to (refused, or on a host outside the mesh).
    pub excluded_stacks: Vec<String>,
}

impl Deref for GossipMesh {
    type Target = Mesh;
    fn deref(&self) -> &Mesh {
        &self.mesh
    }
}

impl DerefMut for GossipMesh {
    fn deref_mut(&mut self) -> &mut Mesh {
        &mut self.mesh
    }
}

impl GossipMesh {
    /// `hosts` hosts, each discovery in gossip mode with [`OLD_SECRET`]; hosts 2..N join
    /// host 1. Starts every discovery, then every router.
    pub fn start(test: &str, hosts: usize, stacks: Vec<StackDef>) -> Result<GossipMesh> {
        let mut g = GossipMesh::build(test, hosts, stacks)?;
        g.start_all()?;
        Ok(g)
    }

    /// [`GossipMesh::start`] without starting anything: the hosts, stacks, secrets and
    /// gossip settings, so a test can add discovery settings
    /// ([`Mesh::set_discovery_env`]) before [`GossipMesh::start_all`].
    pub fn build(test: &str, hosts: usize, stacks: Vec<StackDef>) -> Result<GossipMesh> {
        let mesh = Mesh::build(test, hosts, stacks)?;
        let mut g = GossipMesh {
            mesh,
            mesh_hosts: (1..=hosts).collect(),
            excluded_stacks: Vec::new(),
        };
        g.mesh.set_static_peers(false);
        for h in 1..=hosts {
            g.prepare_host(h, &[OLD_SECRET])?;
        }
        Ok(g)
    }

    /// Starts every host's discovery, then every router.
    pub fn start_all(&mut self) -> Result<()> {
        for h in 1..=self.mesh.topo.hosts().len() {
            self.mesh.start_discovery(h)?;
        }
        self.mesh.start_routers()
    }

    /// `hosts` hosts and one stack per host: stack `sN` on host N, VNI 1000,
    /// 10.N.0.0/24 (router .254, service .5).
    pub fn start_one_stack_per_host(test: &str, hosts: usize) -> Result<GossipMesh> {
        GossipMesh::start(test, hosts, one_stack_per_host(hosts))
    }

    /// Writes the host's secret and (empty) fault file and sets its gossip environment.
    fn prepare_host(&mut self, host: usize, secret: &[&str]) -> Result<()> {
        std::fs::create_dir_all(self.conf_dir(host))?;
        self.write_secret(host, secret)?;
        std::fs::write(self.faults_path(host), "")?;
        let secret_path = self.secret_path(host).display().to_string();
        let faults_path = self.faults_path(host).display().to_string();
        self.mesh
            .set_discovery_env(host, "VROUTER_SECRET_FILE", &secret_path);
        self.mesh
            .set_discovery_env(host, "VROUTER_TEST_FAULTS", &faults_path);
        if host != 1 {
            let join = self.mesh.topo.host(1).underlay_ip.to_string();
            self.mesh.set_discovery_env(host, "VROUTER_JOIN", &join);
        }
        Ok(())
    }

    /// Adds a host joining host 1 with `secret` and starts its discovery. It counts as a
    /// mesh host only if `in_mesh`. Returns its index.
    pub fn add_host(&mut self, secret: &[&str], in_mesh: bool) -> Result<usize> {
        let h = self.mesh.add_host()?;
        self.prepare_host(h, secret)?;
        self.mesh.start_discovery(h)?;
        if in_mesh {
            self.mesh_hosts.push(h);
        }
        Ok(h)
    }

    /// `/run/<prefix>-conf-hN` (the same directory as the static peer file, removed by
    /// the mesh on drop).
    pub fn conf_dir(&self, host: usize) -> PathBuf {
        PathBuf::from(format!("/run/{}-conf-h{host}", crate::prefix()))
    }

    pub fn secret_path(&self, host: usize) -> PathBuf {
        self.conf_dir(host).join("secret")
    }

    pub fn faults_path(&self, host: usize) -> PathBuf {
        self.conf_dir(host).join("faults")
    }

    /// Replaces the host's secret file (atomically) with `lines`, one secret a line.
    pub fn write_secret(&self, host: usize, lines: &[&str]) -> Result<()> {
        let mut text = lines.join("\n");
        text.push('\n');
        crate::write_file_atomic(&self.secret_path(host), text)
    }

    /// Turns a test fault (a line of the host's fault file, e.g. `drop-broadcasts`) on
    /// or off.
    pub fn set_fault(&self, host: usize, fault: &str, on: bool) -> Result<()> {
        let path = self.faults_path(host);
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let mut lines: Vec<&str> = old
            .lines()
            .filter(|l| l.trim() != fault && !l.trim().is_empty())
            .collect();
        if on {
            lines.push(fault);
        }
        let mut text = lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        crate::write_file_atomic(&path, text)
    }

    /// [`Topology::set_underlay_link`](crate::topology::Topology::set_underlay_link).
    pub fn set_underlay_link(&self, host: usize, up: bool) -> Result<()> {
        self.mesh.topo.set_underlay_link(host, up)
    }

    /// [`Topology::change_underlay_ip`](crate::topology::Topology::change_underlay_ip).
    pub fn change_underlay_ip(&mut self, host: usize, new_ip: Ipv4Addr) -> Result<()> {
        self.mesh.topo.change_underlay_ip(host, new_ip)
    }

    pub fn partition(&self, a: &[usize], b: &[usize]) -> Result<()> {
        self.mesh.topo.partition(a, b)
    }

    pub fn heal(&self) -> Result<()> {
        self.mesh.topo.heal()
    }

    pub fn underlay_loss(&self, percent: u32) -> Result<()> {
        self.mesh.topo.underlay_loss(percent)
    }

    pub fn clear_underlay_loss(&self) -> Result<()> {
        self.mesh.topo.clear_underlay_loss()
    }

    /// The host's discovery.json.
    pub fn discovery_json(&self, host: usize) -> Result<Value> {
        let path = self.state_dir(host).join("discovery.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// `gossip.node_id` of the host.
    pub fn node_id(&self, host: usize) -> Option<String> {
        self.discovery_json(host)
            .ok()
            .and_then(|v| v["gossip"]["node_id"].as_str().map(str::to_string))
    }

    /// `gossip.members` of the host's discovery.json (empty if unreadable).
    pub fn members(&self, host: usize) -> Vec<Member> {
        self.discovery_json(host)
            .ok()
            .and_then(|v| {
                v["gossip"]["members"]
                    .as_array()
                    .map(|a| a.iter().map(Member::from_json).collect())
            })
            .unwrap_or_default()
    }

    pub fn members_in_state(&self, host: usize, state: &str) -> Vec<Member> {
        self.members(host)
            .into_iter()
            .filter(|m| m.state == state)
            .collect()
    }

    /// The state in which `host` sees host `of` (by `of`'s current underlay address);
    /// "alive" wins when several entries carry that address.
    pub fn member_state(&self, host: usize, of: usize) -> Option<String> {
        let ip = self.topo.host(of).underlay_ip;
        let states: Vec<String> = self
            .members(host)
            .into_iter()
            .filter(|m| m.ip() == Some(ip))
            .map(|m| m.state)
            .collect();
        if states.iter().any(|s| s == "alive") {
            return Some("alive".into());
        }
        states.into_iter().next()
    }

    /// `gossip.counters.<name>` of the host (0 if absent).
    pub fn counter(&self, host: usize, name: &str) -> u64 {
        self.discovery_json(host)
            .ok()
            .and_then(|v| v["gossip"]["counters"][name].as_u64())
            .unwrap_or(0)
    }

    /// `peers` of the host's discovery.json.
    pub fn peers(&self, host: usize) -> Vec<PeerView> {
        let Ok(v) = self.discovery_json(host) else {
            return Vec::new();
        };
        v["peers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| PeerView {
                        addr: p["addr"].as_str().unwrap_or_default().to_string(),
                        source: p["source"].as_str().unwrap_or_default().to_string(),
                        stacks: p["stacks"]
                            .as_array()
                            .map(|s| {
                                s.iter()
                                    .filter_map(|x| x["name"].as_str().map(str::to_string))
                                    .collect()
                            })
                            .unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `refused` of the host's discovery.json, as `"<stack> <prefix>"` lines.
    pub fn refused(&self, host: usize) -> Vec<String> {
        let Ok(v) = self.discovery_json(host) else {
            return Vec::new();
        };
        v["refused"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| {
                        format!(
                            "{} {}",
                            r["stack"].as_str().unwrap_or_default(),
                            r["prefix"].as_str().unwrap_or_default()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `host`'s discovery.json mentions underlay address `ip` anywhere in its
    /// members or peers.
    pub fn knows_address(&self, host: usize, ip: Ipv4Addr) -> bool {
        let ip = ip.to_string();
        self.members(host)
            .iter()
            .any(|m| m.ip().map(|i| i.to_string()) == Some(ip.clone()))
            || self
                .peers(host)
                .iter()
                .any(|p| p.addr == ip || p.addr.starts_with(&format!("{ip}:")))
    }

    /// Every stack `host`'s routes.json knows: its local stacks and every stack a route
    /// leads to.
    pub fn routed_stacks(&self, host: usize) -> BTreeSet<String> {
        let mut set = BTreeSet::new();
        if let Ok(r) = self.routes(host) {
            for (local, sr) in &r.stacks {
                set.insert(local.to_string());
                for route in &sr.routes {
                    set.insert(route.stack.to_string());
                }
            }
        }
        set
    }

    /// The routes.json entries of every local stack, as comparable text lines
    /// (`local: prefix stack via host`), leaving out stacks in `skip`.
    pub fn route_lines(&self, host: usize, skip: &[&str]) -> Vec<String> {
        let mut v = Vec::new();
        if let Ok(r) = self.routes(host) {
            for (local, sr) in &r.stacks {
                if skip.contains(&local.as_str()) {
                    continue;
                }
                for route in &sr.routes {
                    v.push(format!(
                        "{local}: {} {} via {} host {}",
                        route.prefix, route.stack, route.via, route.host
                    ));
                }
            }
        }
        v.sort();
        v
    }

    /// The first stack on `host`.
    pub fn stack_on(&self, host: usize) -> &'static str {
        self.stacks
            .iter()
            .find(|s| s.host == host)
            .map(|s| s.name)
            .unwrap_or_else(|| panic!("no stack on host {host}"))
    }

    /// Stacks every mesh host should know (on mesh hosts, not excluded).
    pub fn expected_stacks(&self) -> Vec<&'static str> {
        self.stacks
            .iter()
            .filter(|s| self.mesh_hosts.contains(&s.host))
            .filter(|s| !self.excluded_stacks.iter().any(|x| x == s.name))
            .map(|s| s.name)
            .collect()
    }

    /// The stacks in `want` that `host` does not know (routes.json).
    pub fn missing_stacks(&self, host: usize, want: &[&str]) -> Vec<String> {
        let have = self.routed_stacks(host);
        want.iter()
            .filter(|s| !have.contains(**s))
            .map(|s| s.to_string())
            .collect()
    }

    /// Why the mesh hosts are not (yet) a full mesh: every expected stack in every
    /// host's routes.json and every other mesh host alive in its members. `None` if they
    /// are.
    pub fn full_mesh_gap(&self) -> Option<String> {
        let want = self.expected_stacks();
        let mut gaps = Vec::new();
        for &h in &self.mesh_hosts {
            let missing = self.missing_stacks(h, &want);
            if !missing.is_empty() {
                gaps.push(format!("host {h} lacks routes to {missing:?}"));
            }
            for &o in &self.mesh_hosts {
                if o != h && self.member_state(h, o).as_deref() != Some("alive") {
                    gaps.push(format!(
                        "host {h} sees host {o} as {:?}",
                        self.member_state(h, o)
                    ));
                }
            }
        }
        if gaps.is_empty() {
            None
        } else {
            Some(gaps.join("; "))
        }
    }

    /// Why some mesh host does not (yet) route to every expected stack; `None` if all do.
    pub fn routes_gap(&self) -> Option<String> {
        let want = self.expected_stacks();
        let gaps: Vec<String> = self
            .mesh_hosts
            .iter()
            .filter_map(|&h| {
                let missing = self.missing_stacks(h, &want);
                (!missing.is_empty()).then(|| format!("host {h} lacks routes to {missing:?}"))
            })
            .collect();
        (!gaps.is_empty()).then(|| gaps.join("; "))
    }

    /// Waits until every mesh host routes to every expected stack (membership not
    /// checked); the time it took.
    pub fn wait_all_routes(&self, timeout: Duration) -> Result<Duration> {
        let t = Instant::now();
        if !wait_until(timeout, Duration::from_millis(100), || {
            self.routes_gap().is_none()
        }) {
            bail!(
                "routes incomplete after {timeout:?}: {}",
                self.routes_gap().unwrap_or_default()
            );
        }
        Ok(t.elapsed())
    }

    /// Waits until [`GossipMesh::full_mesh_gap`] is none; the time it took.
    pub fn wait_full_mesh(&self, timeout: Duration) -> Result<Duration> {
        let t = Instant::now();
        let ok = wait_until(timeout, Duration::from_millis(100), || {
            self.full_mesh_gap().is_none()
        });
        if !ok {
            bail!(
                "no full mesh after {timeout:?}: {}",
                self.full_mesh_gap().unwrap_or_default()
            );
        }
        Ok(t.elapsed())
    }

    /// Ping from the service of stack `from` to the service of stack `to`.
    pub fn reachable(&self, from: &str, to: &str, timeout: Duration) -> bool {
        ping(&self.svc(from).ns, &self.svc(to).ip.to_string(), 3, timeout)
    }

    /// Pings around the ring of mesh hosts (first stack of each, host i -> host i+1,
    /// last -> first); the pairs that failed.
    pub fn ring_failures(&self, timeout: Duration) -> Vec<(String, String)> {
        let hosts: Vec<usize> = self
            .mesh_hosts
            .iter()
            .copied()
            .filter(|h| self.stacks.iter().any(|s| s.host == *h))
            .collect();
        let mut failed = Vec::new();
        for (i, &h) in hosts.iter().enumerate() {
            let next = hosts[(i + 1) % hosts.len()];
            if next == h {
                continue;
            }
            let (a, b) = (self.stack_on(h), self.stack_on(next));
            if !self.reachable(a, b, timeout) {
                failed.push((a.to_string(), b.to_string()));
            }
        }
        failed
    }

    /// Waits until a ping from `from`'s service to `to`'s answers; the time it took.
    pub fn wait_reachable(&self, from: &str, to: &str, timeout: Duration) -> Option<Duration> {
        let t = Instant::now();
        wait_until(timeout, Duration::from_millis(50), || {
            ping(
                &self.svc(from).ns,
                &self.svc(to).ip.to_string(),
                1,
                Duration::from_millis(700),
            )
        })
        .then(|| t.elapsed())
    }

    /// Events of `host` at or after `since_ms` (see [`now_ms`]).
    pub fn events_since(&self, host: usize, since_ms: u64) -> Vec<Event> {
        self.events(host)
            .into_iter()
            .filter(|e| e.ts_ms >= since_ms)
            .collect()
    }

    /// Events of any of `kinds` on any mesh host at or after `since_ms`, as
    /// `(host, event)`.
    pub fn events_of_kinds_since(&self, kinds: &[&str], since_ms: u64) -> Vec<(usize, Event)> {
        let mut v = Vec::new();
        for &h in &self.mesh_hosts {
            for e in self.events_since(h, since_ms) {
                if kinds.contains(&e.kind.as_str()) {
                    v.push((h, e));
                }
            }
        }
        v
    }

    /// The router's probe file `probes/<stack>.json` on `host`.
    pub fn probes(&self, host: usize, stack: &str) -> Option<Value> {
        let path = self
            .state_dir(host)
            .join("probes")
            .join(format!("{stack}.json"));
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// What stack `stack`'s probe file on `host` says about remote stack `remote`:
    /// `Some(reachable)` if it has an entry for it (an object naming the stack with a
    /// boolean `reachable`/`ok`/`up`, or a key named after the stack), `None` if not.
    pub fn probe_reachable(&self, host: usize, stack: &str, remote: &str) -> Option<bool> {
        fn verdict(o: &serde_json::Map<String, Value>) -> Option<bool> {
            ["reachable", "ok", "up", "alive"]
                .iter()
                .find_map(|k| o.get(*k).and_then(Value::as_bool))
        }
        fn walk(v: &Value, remote: &str) -> Option<bool> {
            match v {
                Value::Object(o) => {
                    let names_it = ["stack", "name", "remote", "peer"]
                        .iter()
                        .any(|k| o.get(*k).and_then(Value::as_str) == Some(remote));
                    if names_it {
                        if let Some(b) = verdict(o) {
                            return Some(b);
                        }
                    }
                    if let Some(x) = o.get(remote) {
                        if let Some(b) = x.as_bool() {
                            return Some(b);
                        }
                        if let Some(b) = x.as_object().and_then(verdict) {
                            return Some(b);
                        }
                    }
                    o.values().find_map(|x| walk(x, remote))
                }
                Value::Array(a) => a.iter().find_map(|x| walk(x, remote)),
                _ => None,
            }
        }
        walk(&self.probes(host, stack)?, remote)
    }

    /// `vrouter-discovery leave-mesh` on `host`, as `docker exec <discovery>` runs it
    /// (same state directory, so the same private directory and its admin socket):
    /// its discovery leaves the mesh on purpose.
    pub fn leave_mesh(&self, host: usize) -> Result<()> {
        let bin = self.bin("vrouter-discovery");
        let dir = self.state_dir(host).display().to_string();
        let mut d = self.topo.host(host).spawn_privileged(
            bin.to_str().unwrap(),
            &["leave-mesh"],
            &[("VROUTER_STATE_DIR", &dir)],
        )?;
        d.wait_success(Duration::from_secs(10))
    }

    /// A one-line summary of every mesh host's view, for test output.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for h in 1..=self.topo.hosts().len() {
            let members: Vec<String> = self
                .members(h)
                .iter()
                .map(|m| {
                    format!(
                        "{}={}",
                        m.addr.map(|a| a.to_string()).unwrap_or_default(),
                        m.state
                    )
                })
                .collect();
            let probes: Vec<String> = std::fs::read_dir(self.state_dir(h).join("probes"))
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| {
                            format!(
                                "{}={}",
                                e.file_name().to_string_lossy(),
                                std::fs::read_to_string(e.path())
                                    .unwrap_or_default()
                                    .replace('\n', " ")
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push_str(&format!(
                "host {h}: stacks {:?} members [{}] probes [{}]\n",
                self.routed_stacks(h),
                members.join(" "),
                probes.join(" ")
            ));
        }
        out
    }
}

impl Drop for GossipMesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- gossip view at failure -----\n{}", self.summary());
            eprintln!("{}", self.mesh.topo.underlay_faults());
        }
        self.mesh.topo.clear_underlay_faults();
        // The mesh (daemons, state and configuration directories) and then the topology
        // (namespaces) drop after this.
    }
}
