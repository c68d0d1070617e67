//! Stacks that move between simulated gossip hosts (issue 18, "Migration"): the
//! pieces tests/tests/migration.rs and `vrt-migration-bench` share.
//!
//! The mesh: three hosts with gossip, stack `sN` on host N (VNI 1000, 10.N.0.0/24) and
//! stack [`MOVED`] (VNI 1000, 10.50.0.0/24) on host 1, which the tests move to host 2
//! ([`crate::mesh::Mesh::move_stack`]: the same name, subnet and addresses, as the same compose
//! file brought up there). Host 3 is the third host whose traffic must follow.
//! Which copy receives traffic is read from an nftables counter of ICMP echo requests
//! in each copy's service namespace ([`EchoCounter`]), independent of the code under
//! test.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::gossip::{one_stack_per_host, GossipMesh};
use crate::mesh::{copy_name, StackDef};
use crate::probe::ping;
use crate::{exec_ok, wait_until};

/// The stack that moves.
pub const MOVED: &str = "mv";
/// Where it starts, where it goes, and the host whose traffic follows it.
pub const OLD: usize = 1;
pub const NEW: usize = 2;
pub const THIRD: usize = 3;
/// The third host's stack, which sends the traffic.
pub const FROM: &str = "s3";
/// One probe's timeout: the resolution of the measured times.
pub const PROBE: Duration = Duration::from_millis(150);

/// The three-host mesh with [`MOVED`] on host 1, converged, with traffic from host 3
/// to it.
pub fn mesh(test: &str) -> Result<GossipMesh> {
    mesh_with(test, &[])
}

/// [`mesh`] with extra discovery settings on every host.
pub fn mesh_with(test: &str, env: &[(&str, &str)]) -> Result<GossipMesh> {
    let mut stacks = one_stack_per_host(3);
    stacks.push(StackDef::new(MOVED, OLD, 1000, "10.50.0.0/24"));
    let mut g = GossipMesh::build(test, 3, stacks)?;
    for h in 1..=3 {
        for (k, v) in env {
            g.set_discovery_env(h, k, v);
        }
    }
    g.start_all()?;
    g.wait_full_mesh(Duration::from_secs(40))
        .context("the mesh did not converge")?;
    if wait_reply(&g, FROM, MOVED, Duration::from_secs(15)).is_none() {
        bail!(
            "no traffic from {FROM} to {MOVED} at the start\n{}",
            g.summary()
        );
    }
    Ok(g)
}

/// One ping from `from`'s service to `to`'s (its current copy) with [`PROBE`].
pub fn probe(g: &GossipMesh, from: &str, to: &str) -> bool {
    ping(&g.svc(from).ns, &g.svc(to).ip.to_string(), 1, PROBE)
}

/// Pings until one is answered: the time it took (None after `timeout`).
pub fn wait_reply(g: &GossipMesh, from: &str, to: &str, timeout: Duration) -> Option<Duration> {
    let t = Instant::now();
    wait_until(timeout, Duration::from_millis(10), || probe(g, from, to)).then(|| t.elapsed())
}

/// The host (underlay address) `host`'s routes.json sends `stack` to, from any local
/// stack.
pub fn route_host(g: &GossipMesh, host: usize, stack: &str) -> Option<Ipv4Addr> {
    let r = g.routes(host).ok()?;
    r.stacks
        .values()
        .flat_map(|s| s.routes.iter())
        .find(|x| x.stack.as_str() == stack)
        .map(|x| x.host)
}

/// Counts ICMP echo requests arriving in a service namespace (an nftables table of
/// the test's own, in that namespace only).
pub struct EchoCounter {
    ns: String,
    table: String,
}

impl EchoCounter {
    pub fn install(ns: &str) -> Result<EchoCounter> {
        let table = format!("{}echo", crate::prefix());
        let script = format!(
            "table ip {table} {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  icmp type echo-request counter\n }}\n}}\n"
        );
        let path = std::env::temp_dir().join(format!("{table}-{}.nft", std::process::id()));
        std::fs::write(&path, script)?;
        let r = exec_ok(Some(ns), &["nft", "-f", path.to_str().unwrap()]);
        let _ = std::fs::remove_file(&path);
        r?;
        Ok(EchoCounter {
            ns: ns.to_string(),
            table,
        })
    }

    /// Echo requests counted so far.
    pub fn count(&self) -> u64 {
        let out = exec_ok(
            Some(&self.ns),
            &["nft", "list", "chain", "ip", &self.table, "input"],
        )
        .map(|o| o.stdout)
        .unwrap_or_default();
        let words: Vec<&str> = out.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[0] == "packets")
            .and_then(|w| w[1].parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for EchoCounter {
    fn drop(&mut self) {
        let _ = exec_ok(
            Some(&self.ns),
            &["nft", "delete", "table", "ip", &self.table],
        );
    }
}

/// Graceful move of [`MOVED`] from [`OLD`] to [`NEW`]: `docker compose down` on the
/// old host ([`crate::mesh::Mesh::compose_down`]: the router stops, the old copy enters its grace
/// period, its containers go), then its router starts on the new host. Returns the time from the new router's start to the first answer
/// from host 3, and whether the old copy was still in its grace period then.
pub fn graceful_move(g: &mut GossipMesh) -> Result<(Duration, bool)> {
    g.compose_down(MOVED)?;
    g.move_stack(MOVED, NEW)?;
    let t = Instant::now();
    g.start_router(MOVED)?;
    wait_reply(g, FROM, MOVED, Duration::from_secs(15)).with_context(|| {
        format!(
            "no traffic from {FROM} to the moved {MOVED} within 15 s\n{}",
            g.summary()
        )
    })?;
    let took = t.elapsed();
    let old_in_grace = g
        .discovery_file(OLD)
        .is_some_and(|d| d.local_stacks.iter().any(|s| s.spec.name.as_str() == MOVED));
    Ok((took, old_in_grace))
}

/// Crash move: [`OLD`] is cut off from the others with [`MOVED`] still running there,
/// and the stack is started on [`NEW`]. Returns (from the cut, from the new router's
/// start) to the first answer from host 3.
pub fn crash_move(g: &mut GossipMesh) -> Result<(Duration, Duration)> {
    let cut = Instant::now();
    g.partition(&[OLD], &[NEW, THIRD])?;
    g.move_stack(MOVED, NEW)?;
    let start = Instant::now();
    g.start_router(MOVED)?;
    wait_reply(g, FROM, MOVED, Duration::from_secs(20)).with_context(|| {
        format!(
            "no traffic from {FROM} to {MOVED} on host {NEW} within 20 s\n{}",
            g.summary()
        )
    })?;
    Ok((cut.elapsed(), start.elapsed()))
}

/// What [`watch`] saw.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Watched {
    pub probes: u64,
    pub lost: u64,
    /// Samples where traffic or a route went to the old copy: echo requests counted
    /// there, or a route on host 3 to it.
    pub flips: u64,
    /// Echo requests the old copy's service received.
    pub old_copy_echoes: u64,
}

/// Probes host 3 -> [`MOVED`] continuously for `dur` while `during` runs once at the
/// start, checking after each probe that the old copy's service got nothing and host
/// 3 routes the stack to the new host.
pub fn watch(
    g: &GossipMesh,
    old: &EchoCounter,
    dur: Duration,
    mut during: impl FnMut() -> Result<()>,
) -> Result<Watched> {
    let new_ip = g.topo.host(NEW).underlay_ip;
    let base = old.count();
    let mut w = Watched::default();
    during()?;
    let t = Instant::now();
    let mut last_old = base;
    while t.elapsed() < dur {
        crate::interrupt::check_stop()?;
        w.probes += 1;
        if !probe(g, FROM, MOVED) {
            w.lost += 1;
        }
        let now_old = old.count();
        let routed_old = route_host(g, THIRD, MOVED).is_some_and(|h| h != new_ip);
        if now_old > last_old || routed_old {
            w.flips += 1;
        }
        last_old = now_old;
        std::thread::sleep(Duration::from_millis(30));
    }
    w.old_copy_echoes = old.count() - base;
    Ok(w)
}

/// The old copy's router, when still running after a move, is named so.
pub fn old_router() -> String {
    copy_name(MOVED, OLD)
}
