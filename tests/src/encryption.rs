//! Encrypted-overlay helpers (issue 16): discovery's encryption settings on simulated
//! hosts, readers for discovery.json's `encryption` section, an underlay capture, a
//! plain-VXLAN injector, background pings that report their longest outage, and the
//! admin commands (`rotate-key`, `status`).
//!
//! The capture and the injector are `vrt-probe` subcommands (`underlay-capture`,
//! `vxlan-inject`): an AF_PACKET socket bound to the host's underlay link, and a raw
//! socket that forges the outer source address.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::daemon::{spawn_in, Daemon};
use crate::gossip::{one_stack_per_host, GossipMesh};
use crate::mesh::{Mesh, StackDef};
use crate::probe::probe_bin;
use crate::wait_until;

/// WireGuard's UDP port (discovery's default `VROUTER_WG_PORT`).
pub const WG_PORT: u16 = 51820;
/// The VXLAN port (discovery's default `VROUTER_VXLAN_PORT`).
pub const VXLAN_PORT: u16 = 4789;
/// Overlay MTU with encryption on a 1500-byte underlay: 1500 - 80 (WireGuard) - 50
/// (VXLAN).
pub const OVERLAY_MTU: u32 = 1370;
/// Overlay MTU without encryption: 1500 - 50.
pub const PLAIN_OVERLAY_MTU: u32 = 1450;
/// The host's underlay link in a simulated host.
pub const UNDERLAY_DEV: &str = "eth0";

/// The WireGuard backend the tests ask for: `$VROUTER_TEST_WG_BACKEND`, else
/// `userspace` (this machine's kernel has no WireGuard; the issue tests that path end to
/// end).
pub fn wg_backend() -> String {
    std::env::var("VROUTER_TEST_WG_BACKEND")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "userspace".to_string())
}

/// `VROUTER_ENCRYPTION=<mode>` (and the test backend) for `host`'s discovery, from its
/// next start on.
pub fn set_encryption(mesh: &mut Mesh, host: usize, mode: &str) {
    mesh.set_discovery_env(host, "VROUTER_ENCRYPTION", mode);
    mesh.set_discovery_env(host, "VROUTER_WG_BACKEND", &wg_backend());
}

/// A gossip mesh with one stack per host (`sN` on host N, VNI 1000, 10.N.0.0/24) where
/// host `i + 1` runs with encryption `modes[i]`; everything started.
pub fn gossip_mesh_with_modes(test: &str, modes: &[&str]) -> Result<GossipMesh> {
    gossip_mesh_with(test, modes, one_stack_per_host(modes.len()))
}

/// [`gossip_mesh_with_modes`] with the given stacks.
pub fn gossip_mesh_with(test: &str, modes: &[&str], stacks: Vec<StackDef>) -> Result<GossipMesh> {
    let mut g = GossipMesh::build(test, modes.len(), stacks)?;
    for (i, mode) in modes.iter().enumerate() {
        set_encryption(&mut g.mesh, i + 1, mode);
    }
    g.start_all()?;
    Ok(g)
}

/// discovery.json's `encryption` section of `host` (`None`: unreadable or absent).
pub fn encryption_json(mesh: &Mesh, host: usize) -> Option<Value> {
    let path = mesh.state_dir(host).join("discovery.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v.get("encryption").filter(|e| !e.is_null()).cloned()
}

/// The `encryption.peers` entry of `host` for the host at underlay address `of`.
pub fn peer_entry(mesh: &Mesh, host: usize, of: Ipv4Addr) -> Option<Value> {
    let e = encryption_json(mesh, host)?;
    let of = of.to_string();
    e["peers"]
        .as_array()?
        .iter()
        .find(|p| p["host"].as_str() == Some(of.as_str()))
        .cloned()
}

/// `state` (`encrypted`, `plain`, `refused`) of `host`'s entry for host `of`.
pub fn peer_state(mesh: &Mesh, host: usize, of: usize) -> Option<String> {
    let ip = mesh.topo.host(of).underlay_ip;
    peer_entry(mesh, host, ip).and_then(|p| p["state"].as_str().map(str::to_string))
}

/// Why `hosts` are not (yet) pairwise in `state` (e.g. `encrypted`); `None` if they are.
pub fn pairwise_state_gap(mesh: &Mesh, hosts: &[usize], state: &str) -> Option<String> {
    let mut gaps = Vec::new();
    for &h in hosts {
        for &o in hosts {
            if h != o {
                let s = peer_state(mesh, h, o);
                if s.as_deref() != Some(state) {
                    gaps.push(format!("host {h} sees host {o} as {s:?}"));
                }
            }
        }
    }
    (!gaps.is_empty()).then(|| gaps.join("; "))
}

/// Waits until every pair of `hosts` sees the other in `state`; the time it took.
pub fn wait_pairwise_state(
    mesh: &Mesh,
    hosts: &[usize],
    state: &str,
    timeout: Duration,
) -> Result<Duration> {
    let t = Instant::now();
    let ok = wait_until(timeout, Duration::from_millis(100), || {
        pairwise_state_gap(mesh, hosts, state).is_none()
    });
    if !ok {
        bail!(
            "not pairwise {state} after {timeout:?}: {}\n{}",
            pairwise_state_gap(mesh, hosts, state).unwrap_or_default(),
            (1..=mesh.topo.hosts().len())
                .map(|h| format!("host {h}: {:?}", encryption_json(mesh, h)))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(t.elapsed())
}

/// The MTU of `link` in namespace `ns` (from `ip -o link`: /sys shows the caller's
/// namespace under nsenter).
pub fn link_mtu(ns: &str, link: &str) -> Result<u32> {
    let o = crate::exec_ok(Some(ns), &["ip", "-o", "link", "show", "dev", link])?.stdout;
    let at = o.find(" mtu ").context("no mtu in ip link output")? + 5;
    o[at..]
        .split_whitespace()
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("mtu of {link}: {o}"))
}

/// A DF ping of `ip_bytes` (whole IP packet) from `ns` to `ip`: whether one of two
/// answered. A size above the route's MTU fails at once (EMSGSIZE).
pub fn df_ping(ns: &str, ip: &str, ip_bytes: u32) -> bool {
    let size = (ip_bytes - 28).to_string();
    crate::exec(
        Some(ns),
        &[
            "ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1", "-M", "do", "-s", &size, ip,
        ],
    )
    .map(|o| o.success())
    .unwrap_or(false)
}

// ------------------------------------------------------------------------------------
// Underlay capture

/// What [`UnderlayCapture`] saw on a link, both directions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CaptureReport {
    pub frames: u64,
    pub bytes: u64,
    /// Frames that held the marker text anywhere.
    pub marker: u64,
    pub ipv4: u64,
    /// IPv4 packets with MF set or a fragment offset.
    pub frags: u64,
    /// UDP to the VXLAN port.
    pub vxlan: u64,
    /// UDP from or to the WireGuard port.
    pub wg: u64,
    /// UDP from or to the gossip port.
    pub gossip: u64,
    pub other_udp: u64,
    /// IPv4 that is not UDP (ICMP, TCP).
    pub other_ip: u64,
    /// `src>dst` of the VXLAN packets (first 32 distinct).
    pub vxlan_flows: Vec<String>,
}

impl CaptureReport {
    pub fn parse(line: &str) -> Result<CaptureReport> {
        let mut r = CaptureReport::default();
        let mut seen = 0;
        for tok in line.split_whitespace() {
            let Some((k, v)) = tok.split_once('=') else {
                continue;
            };
            let n = || v.parse::<u64>().with_context(|| format!("{k}={v}"));
            match k {
                "frames" => r.frames = n()?,
                "bytes" => r.bytes = n()?,
                "marker" => r.marker = n()?,
                "ipv4" => r.ipv4 = n()?,
                "frags" => r.frags = n()?,
                "vxlan" => r.vxlan = n()?,
                "wg" => r.wg = n()?,
                "gossip" => r.gossip = n()?,
                "other_udp" => r.other_udp = n()?,
                "other_ip" => r.other_ip = n()?,
                "vxlan_flows" => {
                    r.vxlan_flows = v
                        .split(',')
                        .filter(|f| !f.is_empty())
                        .map(str::to_string)
                        .collect()
                }
                _ => continue,
            }
            seen += 1;
        }
        if seen < 11 {
            bail!("not a capture report: {line:?}");
        }
        Ok(r)
    }
}

/// A running `vrt-probe underlay-capture` on one link of a namespace, bounded by time
/// and bytes; [`UnderlayCapture::finish`] stops it and reads its report.
pub struct UnderlayCapture {
    daemon: Daemon,
    out: PathBuf,
}

impl UnderlayCapture {
    /// Starts capturing on `dev` in `ns` (returns once the socket is bound). It stops by
    /// itself after `max` or 64 MB.
    pub fn start(
        ns: &str,
        dev: &str,
        marker: Option<&str>,
        max: Duration,
        log_dir: &Path,
    ) -> Result<UnderlayCapture> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let out = log_dir.join(format!("capture-{ns}-{dev}-{n}.txt"));
        for suffix in ["", ".ready", ".stop"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", out.display()));
        }
        let bin = probe_bin()?;
        let out_s = out.display().to_string();
        let ms = max.as_millis().max(1).to_string();
        let mut args = vec![
            "underlay-capture",
            "--dev",
            dev,
            "--out",
            &out_s,
            "--ms",
            &ms,
        ];
        if let Some(m) = marker {
            args.extend(["--marker", m]);
        }
        let mut daemon = spawn_in(ns, log_dir, bin.to_str().unwrap(), &args, &[])?;
        let ready = PathBuf::from(format!("{out_s}.ready"));
        let ok = wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            ready.exists() || !daemon.is_running()
        });
        if !ok || !ready.exists() {
            bail!("underlay-capture did not start\n{}", daemon.logs());
        }
        Ok(UnderlayCapture { daemon, out })
    }

    /// Stops the capture and returns what it saw.
    pub fn finish(mut self) -> Result<CaptureReport> {
        std::fs::write(format!("{}.stop", self.out.display()), "stop\n")?;
        self.daemon.wait_success(Duration::from_secs(10))?;
        let line = std::fs::read_to_string(&self.out)
            .with_context(|| format!("reading {}", self.out.display()))?;
        CaptureReport::parse(&line)
    }
}

// ------------------------------------------------------------------------------------
// Plain VXLAN injection

/// A plain VXLAN frame as an attacker on the underlay would send it: outer source
/// `spoofed_src` (a peer's underlay address), inside an Ethernet frame from `src_mac` to
/// `dst_mac` carrying one UDP datagram `inner_src -> inner_dst:inner_port` with
/// `payload`.
#[derive(Debug, Clone)]
pub struct VxlanFrame {
    pub to: Ipv4Addr,
    pub spoofed_src: Ipv4Addr,
    pub vni: u32,
    pub dst_mac: String,
    pub src_mac: String,
    pub inner_src: Ipv4Addr,
    pub inner_dst: Ipv4Addr,
    pub inner_port: u16,
    pub payload: String,
}

impl VxlanFrame {
    /// Sends the frame `count` times (50 ms apart) from namespace `ns` (as root: the
    /// forged source needs a raw socket).
    pub fn send(&self, ns: &str, count: u32) -> Result<()> {
        let bin = probe_bin()?;
        let s = |x: &dyn ToString| x.to_string();
        let args = [
            s(&bin.display()),
            "vxlan-inject".into(),
            "--to".into(),
            s(&self.to),
            "--src".into(),
            s(&self.spoofed_src),
            "--port".into(),
            s(&VXLAN_PORT),
            "--vni".into(),
            s(&self.vni),
            "--dst-mac".into(),
            self.dst_mac.clone(),
            "--src-mac".into(),
            self.src_mac.clone(),
            "--inner-src".into(),
            s(&self.inner_src),
            "--inner-dst".into(),
            s(&self.inner_dst),
            "--inner-port".into(),
            s(&self.inner_port),
            "--payload".into(),
            self.payload.clone(),
            "--count".into(),
            s(&count),
        ];
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::exec_ok(Some(ns), &argv).map(|_| ())
    }
}

// ------------------------------------------------------------------------------------
// Pings that measure an outage

/// What a background ping run saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingResult {
    pub sent: u32,
    pub received: u32,
    /// The most consecutive requests left unanswered.
    pub longest_loss_run: u32,
}

impl PingResult {
    pub fn lost(&self) -> u32 {
        self.sent.saturating_sub(self.received)
    }
}

/// `count` echo requests every `interval` from `ns` to `ip`, in the background (check
/// with [`ping_result`]). Bounded: the probe gives up `count * interval + 3 s` after it
/// started.
pub fn ping_run(
    ns: &str,
    ip: &str,
    count: u32,
    interval: Duration,
    log_dir: &Path,
) -> Result<Daemon> {
    let bin = probe_bin()?;
    let timeout = interval * count + Duration::from_secs(3);
    spawn_in(
        ns,
        log_dir,
        bin.to_str().unwrap(),
        &[
            "ping",
            ip,
            &count.to_string(),
            &timeout.as_millis().to_string(),
            &interval.as_millis().max(1).to_string(),
        ],
        &[],
    )
}

/// Waits (up to `timeout`) for a [`ping_run`] to end and reads its counts. A run with no
/// reply at all exits 1 and still reports.
pub fn ping_result(d: &mut Daemon, timeout: Duration) -> Result<PingResult> {
    d.wait_exit(timeout)?
        .with_context(|| format!("ping still running after {timeout:?}"))?;
    let out = d.stdout();
    let get = |k: &str| -> Option<u32> {
        out.split_whitespace()
            .find_map(|t| t.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
    };
    match (get("sent"), get("received"), get("longest_loss_run")) {
        (Some(sent), Some(received), Some(longest_loss_run)) => Ok(PingResult {
            sent,
            received,
            longest_loss_run,
        }),
        _ => bail!("no ping report: {out} {}", d.stderr()),
    }
}

// ------------------------------------------------------------------------------------
// Admin commands

/// Runs `vrouter-discovery <args>` on `host` as `docker exec <discovery>` would (same
/// state directory, hence the same private directory and admin socket), to its end:
/// `(success, stdout, stderr)`.
pub fn discovery_cmd(mesh: &Mesh, host: usize, args: &[&str]) -> Result<(bool, String, String)> {
    let bin = mesh.bin("vrouter-discovery");
    let dir = mesh.state_dir(host).display().to_string();
    let table = crate::steering::table_name();
    let mut d = mesh.topo.host(host).spawn_privileged(
        bin.to_str().unwrap(),
        args,
        &[
            ("VROUTER_STATE_DIR", &dir),
            ("VROUTER_STEERING_TABLE", &table),
        ],
    )?;
    let status = d
        .wait_exit(Duration::from_secs(20))?
        .context("vrouter-discovery did not finish within 20 s")?;
    Ok((status.success(), d.stdout(), d.stderr()))
}

/// `vrouter-discovery rotate-key` on `host`.
pub fn rotate_key(mesh: &Mesh, host: usize) -> Result<()> {
    let (ok, out, err) = discovery_cmd(mesh, host, &["rotate-key"])?;
    if !ok {
        bail!("rotate-key on host {host} failed: {out}{err}");
    }
    Ok(())
}

/// `vrouter-discovery status` (text) on `host`.
pub fn status_text(mesh: &Mesh, host: usize) -> Result<String> {
    let (ok, out, err) = discovery_cmd(mesh, host, &["status"])?;
    if !ok {
        bail!("status on host {host} failed: {out}{err}");
    }
    Ok(out)
}

/// `nft list table ip <steering table>` in `host`'s namespace: the input table that
/// drops VXLAN not received through WireGuard (`None`: no such table).
pub fn input_table(mesh: &Mesh, host: usize) -> Option<String> {
    crate::exec(
        Some(&mesh.topo.host(host).ns),
        &["nft", "list", "table", "ip", &crate::steering::table_name()],
    )
    .ok()
    .filter(|o| o.success())
    .map(|o| o.stdout)
}

/// The packets the input table's drop rule counted on `host` (`None`: no table or no
/// counter).
pub fn input_drops(mesh: &Mesh, host: usize) -> Option<u64> {
    let t = input_table(mesh, host)?;
    let at = t.find("counter packets ")? + "counter packets ".len();
    t[at..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_report_parses_the_probe_line() {
        let r = CaptureReport::parse(
            "frames=10 bytes=900 marker=0 ipv4=8 frags=1 vxlan=2 wg=5 gossip=1 other_udp=0 other_ip=0 vxlan_flows=198.18.0.1>198.18.0.2,198.18.0.2>198.18.0.1\n",
        )
        .unwrap();
        assert_eq!(r.frames, 10);
        assert_eq!(r.frags, 1);
        assert_eq!(r.wg, 5);
        assert_eq!(
            r.vxlan_flows,
            ["198.18.0.1>198.18.0.2", "198.18.0.2>198.18.0.1"]
        );
        let empty = CaptureReport::parse(
            "frames=0 bytes=0 marker=0 ipv4=0 frags=0 vxlan=0 wg=0 gossip=0 other_udp=0 other_ip=0 vxlan_flows=",
        )
        .unwrap();
        assert!(empty.vxlan_flows.is_empty());
        assert!(CaptureReport::parse("sent=1").is_err());
    }
}
