//! Harness side of the `vrt-probe` helper binary: ping and TCP probes in a namespace.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cmd::exec_timeout;
use crate::daemon::{spawn_in, Daemon};

/// Path of the `vrt-probe` binary: `$VRT_PROBE_BIN`, else found next to (or one level
/// above) the running test executable (`target/<profile>/deps/<test>` ->
/// `target/<profile>/vrt-probe`). Cargo builds it for this package's integration tests.
pub fn probe_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VRT_PROBE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let mut dir = exe.parent();
    for _ in 0..3 {
        let Some(d) = dir else { break };
        let cand = d.join("vrt-probe");
        if cand.is_file() {
            return Ok(cand);
        }
        dir = d.parent();
    }
    bail!(
        "vrt-probe not found near {} (build with `cargo test -p vrouter-tests` or set VRT_PROBE_BIN)",
        exe.display()
    )
}

fn probe() -> String {
    probe_bin()
        .expect("vrt-probe binary")
        .to_string_lossy()
        .into_owned()
}

/// ICMP echo from namespace `from_ns` to `ip`: `(sent, received)`.
pub fn ping_count(from_ns: &str, ip: &str, count: u32, timeout: Duration) -> Result<(u32, u32)> {
    let ms = timeout.as_millis().max(1).to_string();
    let out = exec_timeout(
        Some(from_ns),
        &[&probe(), "ping", ip, &count.to_string(), &ms],
        timeout + Duration::from_secs(5),
    )?;
    let mut sent = 0;
    let mut recv = 0;
    for tok in out.stdout.split_whitespace() {
        if let Some(v) = tok.strip_prefix("sent=") {
            sent = v.parse().unwrap_or(0);
        } else if let Some(v) = tok.strip_prefix("received=") {
            recv = v.parse().unwrap_or(0);
        }
    }
    if out.code == Some(2) || (sent == 0 && !out.success()) {
        bail!("ping probe failed: {}", out.stderr.trim());
    }
    Ok((sent, recv))
}

/// True if at least one of `count` echo requests from `from_ns` to `ip` was answered
/// within `timeout` (like `ping -c count -w timeout`).
pub fn ping(from_ns: &str, ip: &str, count: u32, timeout: Duration) -> bool {
    match ping_count(from_ns, ip, count, timeout) {
        Ok((_, r)) => r > 0,
        Err(e) => {
            eprintln!("ping {from_ns} -> {ip}: {e:#}");
            false
        }
    }
}

/// A one-connection TCP echo server (`vrt-probe tcp-serve`) running in a namespace.
pub struct TcpServer {
    pub daemon: Daemon,
    pub addr: SocketAddr,
    outfile: PathBuf,
}

impl TcpServer {
    /// Start listening on `addr` (e.g. `"10.2.0.7:5000"`) in `ns`; returns once bound.
    /// `idle` bounds the wait for the connection and every read.
    pub fn start(ns: &str, addr: &str, log_dir: &Path, idle: Duration) -> Result<TcpServer> {
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("bad address {addr}"))?;
        std::fs::create_dir_all(log_dir)?;
        let outfile = log_dir.join(format!("tcp-serve-{ns}-{}-{}.peer", addr.ip(), addr.port()));
        let ready = PathBuf::from(format!("{}.ready", outfile.display()));
        let _ = std::fs::remove_file(&outfile);
        let _ = std::fs::remove_file(&ready);
        let bin = probe();
        let secs = idle.as_secs().max(1).to_string();
        let mut daemon = spawn_in(
            ns,
            log_dir,
            &bin,
            &[
                "tcp-serve",
                &addr.to_string(),
                &outfile.to_string_lossy(),
                &secs,
            ],
            &[],
        )?;
        let ok = crate::wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            ready.exists() || !daemon.is_running()
        });
        if !ok || !ready.exists() {
            bail!("tcp-serve did not start\n{}", daemon.logs());
        }
        Ok(TcpServer {
            daemon,
            addr,
            outfile,
        })
    }

    /// The client address the server saw (proves there was no NAT), waiting up to `timeout`.
    pub fn peer(&self, timeout: Duration) -> Result<SocketAddr> {
        let mut found = None;
        crate::wait_until(timeout, Duration::from_millis(10), || {
            if let Ok(s) = std::fs::read_to_string(&self.outfile) {
                for line in s.lines() {
                    if let Some(v) = line.strip_prefix("peer=") {
                        found = v.parse().ok();
                    }
                }
            }
            found.is_some()
        });
        match found {
            Some(a) => Ok(a),
            None => bail!(
                "no connection seen by {}\n{}",
                self.addr,
                self.daemon.logs()
            ),
        }
    }

    /// Wait for the server to finish successfully (client closed, everything echoed).
    pub fn wait(&mut self, timeout: Duration) -> Result<()> {
        self.daemon.wait_success(timeout)
    }
}

/// Connect from `ns` to `addr`, send `bytes` bytes, verify the echo. Returns the probe's
/// line `ok local=<addr> peer=<addr> bytes=<n>`.
pub fn tcp_send(ns: &str, addr: &str, bytes: usize, timeout: Duration) -> Result<String> {
    let secs = timeout.as_secs().max(1);
    exec_timeout(
        Some(ns),
        &[
            &probe(),
            "tcp-send",
            addr,
            &bytes.to_string(),
            &secs.to_string(),
        ],
        Duration::from_secs(secs * 2 + 5),
    )?
    .check()
    .map(|o| o.stdout.trim().to_string())
}

/// Start a long-lived connection from `ns` to `addr` that exchanges a message every
/// 100 ms for `duration` and fails on any error or a stall longer than `max_stall`.
/// Check the result with [`Daemon::wait_success`].
pub fn tcp_hold(
    ns: &str,
    addr: &str,
    duration: Duration,
    max_stall: Duration,
    log_dir: &Path,
) -> Result<Daemon> {
    let bin = probe();
    spawn_in(
        ns,
        log_dir,
        &bin,
        &[
            "tcp-hold",
            addr,
            &duration.as_secs().max(1).to_string(),
            &max_stall.as_millis().max(1).to_string(),
        ],
        &[],
    )
}

/// `count` echo requests every `interval` from `from_ns` to `ip`, waiting up to `timeout`
/// in all: `(sent, received)`. For loss measurements.
pub fn ping_burst(
    from_ns: &str,
    ip: &str,
    count: u32,
    interval: Duration,
    timeout: Duration,
) -> Result<(u32, u32)> {
    let out = exec_timeout(
        Some(from_ns),
        &[
            &probe(),
            "ping",
            ip,
            &count.to_string(),
            &timeout.as_millis().max(1).to_string(),
            &interval.as_millis().max(1).to_string(),
        ],
        timeout + Duration::from_secs(5),
    )?;
    let mut sent = None;
    let mut recv = None;
    for tok in out.stdout.split_whitespace() {
        if let Some(v) = tok.strip_prefix("sent=") {
            sent = v.parse().ok();
        } else if let Some(v) = tok.strip_prefix("received=") {
            recv = v.parse().ok();
        }
    }
    match (sent, recv) {
        (Some(s), Some(r)) => Ok((s, r)),
        _ => bail!(
            "ping probe failed: {} {}",
            out.stdout.trim(),
            out.stderr.trim()
        ),
    }
}

/// A running `vrt-probe capture-udp`: the payload of the first UDP datagram that arrives
/// in a namespace for a port.
pub struct UdpCapture {
    pub daemon: Daemon,
    pub out: PathBuf,
}

impl UdpCapture {
    /// Starts capturing in `ns` (returns once the socket is open). `src`: only datagrams
    /// from this address. The capture gives up after `timeout`.
    pub fn start(
        ns: &str,
        port: u16,
        src: Option<std::net::Ipv4Addr>,
        out: &Path,
        timeout: Duration,
        log_dir: &Path,
    ) -> Result<UdpCapture> {
        let ready = PathBuf::from(format!("{}.ready", out.display()));
        let _ = std::fs::remove_file(out);
        let _ = std::fs::remove_file(&ready);
        let bin = probe();
        let port_s = port.to_string();
        let out_s = out.to_string_lossy().into_owned();
        let ms = timeout.as_millis().max(1).to_string();
        let src_s = src.map(|s| s.to_string());
        let mut args = vec![
            "capture-udp",
            "--port",
            &port_s,
            "--out",
            &out_s,
            "--timeout-ms",
            &ms,
        ];
        if let Some(s) = &src_s {
            args.extend(["--src", s.as_str()]);
        }
        let mut daemon = spawn_in(ns, log_dir, &bin, &args, &[])?;
        let ok = crate::wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            ready.exists() || !daemon.is_running()
        });
        if !ok || !ready.exists() {
            bail!("capture-udp did not start\n{}", daemon.logs());
        }
        Ok(UdpCapture {
            daemon,
            out: out.to_path_buf(),
        })
    }

    /// Waits (up to `timeout`) for the capture to finish; the captured payload.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<u8>> {
        self.daemon.wait_success(timeout)?;
        std::fs::read(&self.out).with_context(|| format!("reading {}", self.out.display()))
    }
}

/// Sends the bytes of `file` as one UDP datagram from `ns` to `to` (`ip:port`).
pub fn send_udp_file(ns: &str, to: &str, file: &Path) -> Result<()> {
    exec_timeout(
        Some(ns),
        &[
            &probe(),
            "send-file",
            "--to",
            to,
            "--file",
            &file.to_string_lossy(),
        ],
        Duration::from_secs(10),
    )?
    .check()
    .map(|_| ())
}

/// A running `vrt-probe udp-sink`: counts the datagrams arriving on a port.
pub struct UdpSink {
    pub daemon: Daemon,
    pub out: PathBuf,
}

impl UdpSink {
    /// Starts a sink in `ns` for `count` datagrams on `port` (returns once bound); it
    /// gives up after `timeout`.
    pub fn start(
        ns: &str,
        port: u16,
        count: u64,
        out: &Path,
        timeout: Duration,
        log_dir: &Path,
    ) -> Result<UdpSink> {
        let daemon = spawn_udp_server(ns, "udp-sink", port, count, out, timeout, log_dir)?;
        Ok(UdpSink {
            daemon,
            out: out.to_path_buf(),
        })
    }

    /// Waits for the sink to finish (all its datagrams, or its timeout) and returns what
    /// it got, complete or not: `(datagrams, IP bytes)`.
    pub fn received(&mut self, timeout: Duration) -> Result<(u64, u64)> {
        self.daemon.wait_exit(timeout)?;
        let text = std::fs::read_to_string(&self.out)
            .with_context(|| format!("reading {}", self.out.display()))?;
        let value = |key: &str| {
            text.split_whitespace()
                .find_map(|t| t.strip_prefix(key))
                .and_then(|v| v.parse().ok())
        };
        match (value("received="), value("ip_bytes=")) {
            (Some(n), Some(b)) => Ok((n, b)),
            _ => bail!("udp-sink wrote {text:?}"),
        }
    }

    /// Waits for the sink to get all its datagrams: `(datagrams, IP bytes)`.
    pub fn wait(&mut self, timeout: Duration) -> Result<(u64, u64)> {
        self.daemon.wait_success(timeout)?;
        let text = std::fs::read_to_string(&self.out)
            .with_context(|| format!("reading {}", self.out.display()))?;
        let value = |key: &str| {
            text.split_whitespace()
                .find_map(|t| t.strip_prefix(key))
                .and_then(|v| v.parse().ok())
        };
        match (value("received="), value("ip_bytes=")) {
            (Some(n), Some(b)) => Ok((n, b)),
            _ => bail!("udp-sink wrote {text:?}"),
        }
    }
}

/// Starts sending `count` UDP datagrams of exactly `ip_size` IP bytes from `ns` to `to`
/// (`ip:port`); wait for the returned process with `wait_success`.
pub fn udp_burst(ns: &str, to: &str, count: u64, ip_size: u64, log_dir: &Path) -> Result<Daemon> {
    udp_burst_opts(ns, to, count, ip_size, None, None, log_dir)
}

/// [`udp_burst`] with the source address bound to `from` (which must be an address of
/// the namespace: add it to forge a source) and `gap_us` between datagrams.
pub fn udp_burst_opts(
    ns: &str,
    to: &str,
    count: u64,
    ip_size: u64,
    from: Option<std::net::Ipv4Addr>,
    gap_us: Option<u64>,
    log_dir: &Path,
) -> Result<Daemon> {
    let (count, size) = (count.to_string(), ip_size.to_string());
    let from = from.map(|f| f.to_string());
    let gap = gap_us.map(|g| g.to_string());
    let mut args = vec!["udp-send", "--to", to, "--count", &count, "--size", &size];
    if let Some(f) = &from {
        args.extend(["--from", f.as_str()]);
    }
    if let Some(g) = &gap {
        args.extend(["--gap-us", g.as_str()]);
    }
    spawn_in(ns, log_dir, &probe(), &args, &[])
}

/// A running `vrt-probe udp-echo`: answers every datagram on a port with itself.
pub struct UdpEcho {
    pub daemon: Daemon,
    pub out: PathBuf,
}

impl UdpEcho {
    /// Starts an echo server in `ns` on `port` for `count` datagrams (returns once
    /// bound); it gives up after `timeout`.
    pub fn start(
        ns: &str,
        port: u16,
        count: u64,
        timeout: Duration,
        log_dir: &Path,
    ) -> Result<UdpEcho> {
        std::fs::create_dir_all(log_dir)?;
        let out = log_dir.join(format!("udp-echo-{ns}-{port}.out"));
        let daemon = spawn_udp_server(ns, "udp-echo", port, count, &out, timeout, log_dir)?;
        Ok(UdpEcho { daemon, out })
    }
}

/// `count` UDP requests from `ns` to `to` (`ip:port`, an [`UdpEcho`]) over one flow,
/// within `timeout`: `(requests sent incl. resends, answered)`.
pub fn udp_rr(ns: &str, to: &str, count: u64, timeout: Duration) -> Result<(u64, u64)> {
    let out = exec_timeout(
        Some(ns),
        &[
            &probe(),
            "udp-rr",
            "--to",
            to,
            "--count",
            &count.to_string(),
            "--timeout-ms",
            &timeout.as_millis().max(1).to_string(),
        ],
        timeout + Duration::from_secs(5),
    )?;
    let value = |key: &str| {
        out.stdout
            .split_whitespace()
            .find_map(|t| t.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    };
    match (value("sent="), value("answered=")) {
        (Some(s), Some(a)) => Ok((s, a)),
        _ => bail!("udp-rr failed: {} {}", out.stdout.trim(), out.stderr.trim()),
    }
}

/// Starts `vrt-probe <kind> --port .. --out .. --count .. --timeout-ms ..` (`udp-sink`
/// or `udp-echo`) in `ns` and returns once it is bound (its `<out>.ready` exists).
fn spawn_udp_server(
    ns: &str,
    kind: &str,
    port: u16,
    count: u64,
    out: &Path,
    timeout: Duration,
    log_dir: &Path,
) -> Result<Daemon> {
    let ready = PathBuf::from(format!("{}.ready", out.display()));
    let _ = std::fs::remove_file(out);
    let _ = std::fs::remove_file(&ready);
    let (port_s, count_s) = (port.to_string(), count.to_string());
    let out_s = out.to_string_lossy().into_owned();
    let ms = timeout.as_millis().max(1).to_string();
    let args = [
        kind,
        "--port",
        &port_s,
        "--out",
        &out_s,
        "--count",
        &count_s,
        "--timeout-ms",
        &ms,
    ];
    let mut daemon = spawn_in(ns, log_dir, &probe(), &args, &[])?;
    let ok = crate::wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        ready.exists() || !daemon.is_running()
    });
    if !ok || !ready.exists() {
        bail!("{kind} did not start\n{}", daemon.logs());
    }
    Ok(daemon)
}
