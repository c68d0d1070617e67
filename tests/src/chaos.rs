//! Crash at any point (issue 18): a 3-host gossip mesh on simulated hosts with every
//! kind of state the project keeps — VXLAN devices and FDB rows, routers' routes,
//! neighbours and nexthops, port steering (`ports`), an access policy on one router,
//! and userspace WireGuard encryption (`require`) on every host — where discovery and
//! routers are killed with SIGKILL at random moments while stacks come and go, or die
//! at a named crash point ([`DISCOVERY_POINTS`], [`ROUTER_POINTS`],
//! `VROUTER_CRASH_AT`). After each crash the daemon is started again and the harness
//! checks that every state file parses, that temp files do not pile up, that traffic
//! flows, and that the kernel equals the independent oracle (tests/src/oracle.rs).
//!
//! Stacks (all protected networks):
//! - `a` host 1, VNI 1000, 10.1.0.0/24, access policy (deny; allow ICMP from b, c, f);
//! - `b` host 2, VNI 1000, 10.2.0.0/24; `c` host 3, VNI 1000, 10.3.0.0/24;
//! - churn stacks, started and stopped (compose up / down) by the loops: `d` host 1
//!   VNI 2000 10.4.0.0/24, `e` host 2 VNI 2000 10.5.0.0/24, `f` host 3 VNI 1000
//!   10.6.0.0/24 (same host as `c`: same-host traffic through port steering).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::encryption::set_encryption;
use crate::gossip::GossipMesh;
use crate::mesh::StackDef;
use crate::oracle::{self, Diff, Model, OHost, OStack, Objects};
use crate::probe::ping;
use crate::topology::Role;
use crate::wait_until;

/// Every crash point in vrouter-discovery (docs/operations.md, "Crash points").
pub const DISCOVERY_POINTS: &[&str] = &[
    "discovery.after_event",
    "discovery.after_register",
    "discovery.after_attach",
    "discovery.after_device_create",
    "discovery.after_device_delete",
    "discovery.after_wireguard",
    "discovery.after_transit",
    "discovery.after_fdb",
    "discovery.after_routes",
    "discovery.after_steering_rules",
    "discovery.after_steering",
    "discovery.after_discovery",
];

/// Every crash point in vrouter-router.
pub const ROUTER_POINTS: &[&str] = &[
    "router.after_acl",
    "router.after_acl_update",
    "router.after_attach",
    "router.after_rules",
    "router.after_routes",
    "router.after_neighbours",
    "router.after_nexthops",
    "router.after_probes",
];

/// Points this topology cannot reach, with the reason (reported, not crashed at).
pub const UNREACHED: &[(&str, &str)] = &[(
    "discovery.after_transit",
    "needs a relay host (VROUTER_RELAY) with peers it reaches directly; the chaos mesh has none",
)];

/// Stacks the loops start and stop.
pub const CHURN: &[&str] = &["d", "e", "f"];
/// The router with an access policy.
pub const ACL_STACK: &str = "a";
/// Its policy's allow list (`VROUTER_ALLOW`; the default is deny).
pub const ACL_ALLOW: &str = "b:icmp, c:icmp, f:icmp";
/// Grace before a disconnected router's stack is withdrawn (discovery's
/// `VROUTER_GRACE_MS`), short so that churn settles quickly.
pub const GRACE_MS: u64 = 1000;
/// How long a crash may take to converge before the check fails.
pub const CONVERGE: Duration = Duration::from_secs(45);

/// The stacks of the chaos mesh.
pub fn stacks() -> Vec<StackDef> {
    vec![
        StackDef::new("a", 1, 1000, "10.1.0.0/24"),
        StackDef::new("b", 2, 1000, "10.2.0.0/24"),
        StackDef::new("c", 3, 1000, "10.3.0.0/24"),
        StackDef::new("d", 1, 2000, "10.4.0.0/24"),
        StackDef::new("e", 2, 2000, "10.5.0.0/24"),
        StackDef::new("f", 3, 1000, "10.6.0.0/24"),
    ]
}

/// A small deterministic generator (xorshift64*), seeded by the caller.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

/// What one check after a crash found.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// From the restart to the kernel matching the oracle and traffic flowing.
    pub converge: Duration,
    /// Temp files seen in the state directories after convergence.
    pub temps: usize,
}

pub struct Chaos {
    pub g: GossipMesh,
    /// Churn stacks and whether they are up.
    pub up: BTreeMap<&'static str, bool>,
    pub rng: Rng,
}

fn tunnel_of(underlay: Ipv4Addr) -> Ipv4Addr {
    // docs/operations.md (Encryption): offset = underlay mod range size, in the
    // default range 10.255.0.0/16.
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 255, 0, 0)) + (u32::from(underlay) & 0xffff))
}

impl Chaos {
    /// Builds and starts the chaos mesh and waits until it matches the oracle.
    pub fn start(test: &str, seed: u64) -> Result<Chaos> {
        let mut g = GossipMesh::build(test, 3, stacks())?;
        for h in 1..=3 {
            set_encryption(&mut g.mesh, h, "require");
            g.mesh
                .set_discovery_env(h, "VROUTER_GRACE_MS", &GRACE_MS.to_string());
        }
        g.mesh
            .set_router_env(ACL_STACK, "VROUTER_DEFAULT_POLICY", "deny");
        g.mesh.set_router_env(ACL_STACK, "VROUTER_ALLOW", ACL_ALLOW);
        g.start_all()?;
        let c = Chaos {
            g,
            up: CHURN.iter().map(|s| (*s, true)).collect(),
            rng: Rng::new(seed),
        };
        c.wait_converged(Duration::from_secs(90))
            .context("the chaos mesh did not converge after its start")?;
        Ok(c)
    }

    /// Whether `stack` runs (the fixed stacks always do).
    pub fn is_up(&self, stack: &str) -> bool {
        self.up.get(stack).copied().unwrap_or(true)
    }

    /// Live stacks.
    pub fn live(&self) -> Vec<&'static str> {
        self.g
            .stacks
            .iter()
            .map(|s| s.name)
            .filter(|s| self.is_up(s))
            .collect()
    }

    /// The topology as the oracle sees it.
    pub fn model(&self) -> Model {
        let hosts = (1..=3)
            .map(|h| {
                let u = self.g.topo.host(h).underlay_ip;
                OHost {
                    index: h,
                    underlay: u,
                    tunnel: Some(tunnel_of(u)),
                }
            })
            .collect();
        let stacks = self
            .g
            .stacks
            .iter()
            .map(|s| {
                let up = self.is_up(s.name);
                let mut ports = vec![self.g.svc(s.name).host_veth];
                if up {
                    ports.push(self.g.rtr(s.name).host_veth);
                }
                OStack {
                    name: s.name.to_string(),
                    host: s.host,
                    vni: s.vni,
                    cidr: s.cidr.to_string(),
                    router_ip: s.router_ip().parse().unwrap(),
                    up,
                    acl: s.name == ACL_STACK,
                    ports,
                    bridge: self
                        .g
                        .topo
                        .host(s.host)
                        .network(s.name)
                        .map(|n| n.bridge.clone())
                        .unwrap_or_default(),
                    acl_rules: if s.name == ACL_STACK {
                        ACL_ALLOW.split(',').count()
                    } else {
                        0
                    },
                }
            })
            .collect();
        Model {
            hosts,
            stacks,
            port_steering: true,
            require: true,
        }
    }

    /// The WireGuard peers each host's userspace engine has: discovery.json's
    /// `encryption.peers` entries that are encrypted and have completed a handshake
    /// (the handshake age comes from the engine's own peer statistics).
    fn wg_peers(&self, host: usize) -> Vec<(Ipv4Addr, Ipv4Addr)> {
        let Some(e) = crate::encryption::encryption_json(&self.g, host) else {
            return Vec::new();
        };
        e["peers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|p| p["state"] == "encrypted" && !p["last_handshake_age_s"].is_null())
            .filter_map(|p| {
                Some((
                    p["host"].as_str()?.parse().ok()?,
                    p["tunnel_address"].as_str()?.parse().ok()?,
                ))
            })
            .collect()
    }

    /// The real kernel, in the oracle's shape.
    pub fn dump(&self) -> Result<Objects> {
        let table = crate::steering::table_name();
        let mut all = Objects::new();
        for h in 1..=3 {
            let ns = &self.g.topo.host(h).ns;
            all.extend(oracle::dump_host(ns, h, &table, &self.wg_peers(h))?);
        }
        for s in self.live() {
            let ns = self.g.rtr(s).ns;
            all.extend(oracle::dump_router(&ns, s, "vrouter_acl")?);
        }
        Ok(all)
    }

    pub fn oracle_diff(&self) -> Result<Diff> {
        Ok(oracle::diff(&self.model().expected(), &self.dump()?))
    }

    /// Pairs of live stacks on one VNI whose services cannot ping each other.
    pub fn traffic_failures(&self) -> Vec<String> {
        let live = self.live();
        let mut failed = Vec::new();
        for (i, x) in live.iter().enumerate() {
            for y in live.iter().skip(i + 1) {
                if self.g.stack(x).vni != self.g.stack(y).vni {
                    continue;
                }
                let ok = ping(
                    &self.g.svc(x).ns,
                    &self.g.svc(y).ip.to_string(),
                    1,
                    Duration::from_millis(800),
                ) || ping(
                    &self.g.svc(x).ns,
                    &self.g.svc(y).ip.to_string(),
                    2,
                    Duration::from_millis(1500),
                );
                if !ok {
                    failed.push(format!("{x} -> {y}"));
                }
            }
        }
        failed
    }

    /// Every state file of every host parses ([`check_state_files`]); the number of
    /// temp files found.
    pub fn check_files(&self) -> Result<usize> {
        let mut temps = 0;
        for h in 1..=3 {
            temps += check_state_files(&self.g.state_dir(h), &self.g.private_dir(h))
                .with_context(|| format!("host {h}"))?;
        }
        Ok(temps)
    }

    /// Waits until the kernel equals the oracle, traffic flows between every live pair
    /// and every state file parses; the time it took. The error carries the last diff.
    pub fn wait_converged(&self, timeout: Duration) -> Result<Outcome> {
        let t = Instant::now();
        let mut last = String::new();
        let ok = wait_until(timeout, Duration::from_millis(200), || {
            match self.oracle_diff() {
                Ok(d) if d.is_empty() => {}
                Ok(d) => {
                    last = d.to_string();
                    return false;
                }
                Err(e) => {
                    last = format!("dump failed: {e:#}");
                    return false;
                }
            }
            let f = self.traffic_failures();
            if !f.is_empty() {
                last = format!("no traffic: {f:?}");
                return false;
            }
            true
        });
        let converge = t.elapsed();
        let temps = self.check_files()?;
        if !ok {
            bail!("not converged after {timeout:?}:\n{last}");
        }
        // Settled: the files stay readable and the kernel stays right.
        let d = self.oracle_diff()?;
        if !d.is_empty() {
            bail!("converged, then drifted:\n{d}");
        }
        Ok(Outcome { converge, temps })
    }

    /// Compose up / down of a churn stack: down stops its router (SIGTERM) and removes
    /// its namespace; up makes a fresh namespace and starts the router.
    pub fn toggle(&mut self, stack: &'static str) -> Result<()> {
        let up = self.is_up(stack);
        let s = self.g.stack(stack).clone();
        if up {
            self.g.stop_router(stack, libc::SIGTERM)?;
            self.g
                .topo
                .host_mut(s.host)
                .remove_container(s.name, "rtr")?;
        } else {
            self.g.topo.host_mut(s.host).add_container(
                s.name,
                "rtr",
                &s.router_ip(),
                Role::Router,
            )?;
            self.g.start_router(stack)?;
        }
        self.up.insert(stack, !up);
        Ok(())
    }

    /// A random churn step.
    pub fn churn(&mut self) -> Result<&'static str> {
        let s = *self.rng.pick(CHURN);
        self.toggle(s)?;
        Ok(s)
    }

    /// SIGKILLs `host`'s discovery (no wait for anything else).
    pub fn kill_discovery(&mut self, host: usize) -> Result<()> {
        self.g.stop_discovery(host, libc::SIGKILL)
    }

    pub fn start_discovery(&mut self, host: usize, crash_at: Option<&str>) -> Result<()> {
        match crash_at {
            Some(p) => self.g.set_discovery_env(host, vrouter_state::crash::ENV, p),
            None => self
                .g
                .set_discovery_env(host, vrouter_state::crash::ENV, ""),
        }
        self.g.start_discovery(host)?;
        if crash_at.is_none() {
            // A restarted discovery keeps the stacks of its last published state for one
            // grace period, waiting for their routers to reconnect; a stack whose router
            // went away meanwhile (its withdrawal was cut short by the crash) holds its
            // device and rules until then. Judge the kernel after that period.
            std::thread::sleep(Duration::from_millis(GRACE_MS + 1500));
        }
        Ok(())
    }

    /// SIGKILLs `stack`'s router.
    pub fn kill_router(&mut self, stack: &str) -> Result<()> {
        self.g.stop_router(stack, libc::SIGKILL)
    }

    /// Starts `stack`'s router again, in its namespace or (`fresh_ns`, as Docker's
    /// restart does) in a new one with the same address.
    pub fn start_router(
        &mut self,
        stack: &str,
        fresh_ns: bool,
        crash_at: Option<&str>,
    ) -> Result<()> {
        self.g
            .set_router_env(stack, vrouter_state::crash::ENV, crash_at.unwrap_or(""));
        if fresh_ns {
            let s = self.g.stack(stack).clone();
            let h = self.g.topo.host_mut(s.host);
            h.remove_container(s.name, "rtr")?;
            h.add_container(s.name, "rtr", &s.router_ip(), Role::Router)?;
        }
        self.g.start_router(stack)
    }

    /// Waits for `host`'s discovery to exit; whether it died of SIGKILL.
    pub fn discovery_killed_itself(&mut self, host: usize, timeout: Duration) -> Result<bool> {
        let st = self.g.discovery(host).wait_exit(timeout)?;
        Ok(st.is_some_and(|s| {
            use std::os::unix::process::ExitStatusExt;
            s.signal() == Some(libc::SIGKILL)
        }))
    }

    pub fn router_killed_itself(&mut self, stack: &str, timeout: Duration) -> Result<bool> {
        let st = self.g.router(stack).wait_exit(timeout)?;
        Ok(st.is_some_and(|s| {
            use std::os::unix::process::ExitStatusExt;
            s.signal() == Some(libc::SIGKILL)
        }))
    }
}

/// Checks one host's state files: discovery.json and routes.json read as the daemons
/// read them, every events.log line is a whole event ending in a newline, every JSON
/// file in `probes/` and in the private directory parses, and no file has more than
/// one temp file (`.<name>.tmp.<random>`) beside it. Returns the number of temp files.
pub fn check_state_files(dir: &std::path::Path, private: &std::path::Path) -> Result<usize> {
    let mut temps = 0;
    let state = vrouter_state::StateDir::open_readonly(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    state
        .read_discovery()
        .map_err(|e| anyhow::anyhow!("discovery.json: {e}"))?;
    state
        .read_routes()
        .map_err(|e| anyhow::anyhow!("routes.json: {e}"))?;
    for name in ["events.log", "events.log.1"] {
        let Ok(bytes) = std::fs::read(dir.join(name)) else {
            continue;
        };
        if !bytes.is_empty() && bytes.last() != Some(&b'\n') {
            bail!("{name}: torn last line");
        }
        for (n, line) in bytes.split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            serde_json::from_slice::<vrouter_state::Event>(line).with_context(|| {
                format!(
                    "{name} line {}: torn or unreadable: {}",
                    n + 1,
                    String::from_utf8_lossy(line)
                )
            })?;
        }
    }
    let probes = dir.join(vrouter_state::PROBES_DIR);
    for d in [dir, probes.as_path(), private] {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        let mut per_target: BTreeMap<String, usize> = BTreeMap::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some((target, _)) = name.strip_prefix('.').and_then(|n| n.split_once(".tmp.")) {
                temps += 1;
                *per_target.entry(target.to_string()).or_default() += 1;
                continue;
            }
            if name.ends_with(".json") && d != dir {
                let text = std::fs::read(e.path())?;
                serde_json::from_slice::<serde_json::Value>(&text)
                    .with_context(|| format!("{}: unreadable", e.path().display()))?;
            }
        }
        if let Some((t, n)) = per_target.iter().find(|(_, n)| **n > 1) {
            bail!("{}: {n} temp files of {t} (they pile up)", d.display());
        }
    }
    Ok(temps)
}

/// What drove a crash point to fire.
#[derive(Debug, Clone)]
pub struct PointRun {
    pub point: String,
    /// Whether the daemon died of SIGKILL at it.
    pub fired: bool,
    pub outcome: Outcome,
}

impl Chaos {
    /// One random discovery kill: a churn step starts (a registration or a
    /// withdrawal, with the publishes that follow), and at a random moment in it a
    /// random host's discovery is SIGKILLed, then started again.
    pub fn discovery_kill_round(&mut self) -> Result<Outcome> {
        let host = 1 + self.rng.below(3) as usize;
        self.churn()?;
        let delay = self.rng.below(GRACE_MS + 1500);
        std::thread::sleep(Duration::from_millis(delay));
        self.kill_discovery(host)?;
        std::thread::sleep(Duration::from_millis(self.rng.below(300)));
        self.start_discovery(host, None)?;
        self.wait_converged(CONVERGE).with_context(|| {
            format!("after killing discovery on host {host} {delay} ms into a churn step")
        })
    }

    /// One random router kill: a churn step starts (routes change under the routers),
    /// and at a random moment a random live router is SIGKILLed, then started again in
    /// its namespace or, half the time, in a fresh one (Docker's restart).
    pub fn router_kill_round(&mut self) -> Result<Outcome> {
        self.churn()?;
        let live = self.live();
        let stack = *self.rng.pick(&live);
        let delay = self.rng.below(GRACE_MS + 1500);
        std::thread::sleep(Duration::from_millis(delay));
        let fresh = self.rng.below(2) == 0;
        self.kill_router(stack)?;
        std::thread::sleep(Duration::from_millis(self.rng.below(300)));
        self.start_router(stack, fresh, None)?;
        self.wait_converged(CONVERGE).with_context(|| {
            format!("after killing router {stack} {delay} ms into a churn step (fresh namespace: {fresh})")
        })
    }

    /// Crashes discovery on host 1 at `point`: discovery starts with
    /// `VROUTER_CRASH_AT=<point>`, then stack `d` (alone on its VNI there) goes down
    /// and up again until the point fires (withdrawal, device deletion, then
    /// registration, attach, device creation, and every publish in between).
    /// Started again without the switch, the mesh must converge.
    pub fn discovery_point_round(&mut self, point: &str) -> Result<PointRun> {
        let host = 1;
        // Stack e (host 2) shares d's VNI: with e up, d's coming and going also changes
        // host 1's FDB rows, so the FDB step runs (and its point can fire).
        if !self.is_up("e") {
            self.toggle("e")?;
            self.wait_converged(CONVERGE)
                .context("bringing stack e up before a crash-point round")?;
        }
        self.kill_discovery(host)?;
        self.start_discovery(host, Some(point))?;
        let mut fired = false;
        for _ in 0..4 {
            if self.discovery_killed_itself(host, Duration::from_secs(4))? {
                fired = true;
                break;
            }
            self.toggle("d")?;
        }
        if !fired {
            self.kill_discovery(host)?;
        }
        self.start_discovery(host, None)?;
        let outcome = self
            .wait_converged(CONVERGE)
            .with_context(|| format!("after discovery crashed at {point}"))?;
        Ok(PointRun {
            point: point.into(),
            fired,
            outcome,
        })
    }

    /// Crashes router `a` (access policy) at `point`: started in a fresh namespace
    /// with `VROUTER_CRASH_AT=<point>` and a protocol-118 rule planted there (a
    /// leftover of an older release, which the router deletes), then stack `f` goes
    /// down and up (a's routes and access table change) until the point fires.
    /// Started again without the switch (same namespace), the mesh must converge.
    pub fn router_point_round(&mut self, point: &str) -> Result<PointRun> {
        let stack = ACL_STACK;
        self.kill_router(stack)?;
        {
            let s = self.g.stack(stack).clone();
            let h = self.g.topo.host_mut(s.host);
            h.remove_container(s.name, "rtr")?;
            h.add_container(s.name, "rtr", &s.router_ip(), Role::Router)?;
        }
        crate::exec_ok(
            Some(&self.g.rtr(stack).ns),
            &[
                "ip", "rule", "add", "pref", "30000", "table", "30322", "proto", "118",
            ],
        )?;
        self.start_router(stack, false, Some(point))?;
        let mut fired = false;
        for _ in 0..4 {
            if self.router_killed_itself(stack, Duration::from_secs(4))? {
                fired = true;
                break;
            }
            self.toggle("f")?;
        }
        if !fired {
            self.kill_router(stack)?;
        }
        self.start_router(stack, false, None)?;
        let outcome = self
            .wait_converged(CONVERGE)
            .with_context(|| format!("after router {stack} crashed at {point}"))?;
        Ok(PointRun {
            point: point.into(),
            fired,
            outcome,
        })
    }

    /// Every reachable crash point once (only those containing `only`, when given).
    pub fn every_point(&mut self, only: Option<&str>) -> Result<Vec<PointRun>> {
        let wanted = |p: &str| only.is_none_or(|o| o.split(',').any(|x| p.contains(x)));
        let mut runs = Vec::new();
        for p in DISCOVERY_POINTS {
            if UNREACHED.iter().any(|(u, _)| u == p) || !wanted(p) {
                continue;
            }
            runs.push(self.discovery_point_round(p)?);
        }
        for p in ROUTER_POINTS.iter().filter(|p| wanted(p)) {
            runs.push(self.router_point_round(p)?);
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lists equal the `crash::point("...")` calls in the sources (each once).
    #[test]
    fn point_lists_match_the_sources() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut found: Vec<String> = Vec::new();
        for krate in ["vrouter-discovery", "vrouter-router"] {
            let dir = root.join("crates").join(krate).join("src");
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                for part in text.split("crash::point(\"").skip(1) {
                    found.push(part.split('"').next().unwrap().to_string());
                }
            }
        }
        found.sort();
        let mut listed: Vec<String> = DISCOVERY_POINTS
            .iter()
            .chain(ROUTER_POINTS)
            .map(|s| s.to_string())
            .collect();
        listed.sort();
        assert_eq!(found, listed, "crash points in the sources vs the lists");
        for p in DISCOVERY_POINTS {
            assert!(p.starts_with("discovery.after_"), "{p}");
        }
        for p in ROUTER_POINTS {
            assert!(p.starts_with("router.after_"), "{p}");
        }
        let doc = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
        for p in DISCOVERY_POINTS.iter().chain(ROUTER_POINTS) {
            assert!(
                doc.contains(&format!("| `{p}` |")),
                "{p} has no row in docs/operations.md"
            );
        }
    }

    fn write_state(dir: &std::path::Path) {
        std::fs::write(
            dir.join("discovery.json"),
            r#"{"schema": 1, "generation": 1, "updated_ms": 0, "host": {"underlay_interface": "eth0", "local_addr": "198.18.0.1", "advertise_addr": "198.18.0.1", "vxlan_port": 4789, "underlay_mtu": 1500, "pid": 1}, "peers": [], "local_stacks": [], "refused": []}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("routes.json"),
            r#"{"schema": 1, "generation": 1, "stacks": {}}"#,
        )
        .unwrap();
    }

    /// The file check fails on a torn file, a torn event line and piled-up temp files.
    #[test]
    fn torn_files_and_piled_up_temps_fail_the_check() {
        let base = std::env::temp_dir().join(format!("vrt-chaos-files-{}", std::process::id()));
        let dir = base.join("state");
        let private = base.join("private");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&private).unwrap();
        write_state(&dir);
        let ev = serde_json::to_string(&vrouter_state::Event::new(
            "discovery",
            vrouter_state::EventKind::Error,
            "x",
        ))
        .unwrap();
        std::fs::write(dir.join("events.log"), format!("{ev}\n")).unwrap();
        std::fs::write(dir.join(".routes.json.tmp.0123"), "{").unwrap();
        assert_eq!(check_state_files(&dir, &private).unwrap(), 1);

        std::fs::write(dir.join(".routes.json.tmp.4567"), "{").unwrap();
        assert!(
            check_state_files(&dir, &private).is_err(),
            "two temps of one file"
        );
        std::fs::remove_file(dir.join(".routes.json.tmp.4567")).unwrap();

        std::fs::write(dir.join("events.log"), format!("{ev}\n{}", &ev[..10])).unwrap();
        assert!(
            check_state_files(&dir, &private).is_err(),
            "torn last event"
        );
        std::fs::write(dir.join("events.log"), format!("{}\n{ev}\n", &ev[..10])).unwrap();
        assert!(
            check_state_files(&dir, &private).is_err(),
            "torn event inside"
        );
        std::fs::write(dir.join("events.log"), format!("{ev}\n")).unwrap();

        let good = std::fs::read(dir.join("routes.json")).unwrap();
        std::fs::write(dir.join("routes.json"), &good[..good.len() / 2]).unwrap();
        assert!(
            check_state_files(&dir, &private).is_err(),
            "torn routes.json"
        );
        std::fs::write(dir.join("routes.json"), &good).unwrap();

        std::fs::write(private.join("claims.json"), "{\"a\": ").unwrap();
        assert!(
            check_state_files(&dir, &private).is_err(),
            "torn private file"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
