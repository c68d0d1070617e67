//! Pieces of `vrt-ctl-bench` (the control-plane figures of `make bench`): synthetic remote
//! stacks (routes.json generations and static peer files), a routes.json writer that
//! marks the instant of its rename, a small rtnetlink dump reader opened inside a
//! namespace, peak RSS from /proc, and a readiness poller.
//!
//! The pure parts (generators, netlink message parsing, /proc parsing) are unit tested
//! without root.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vrouter_state::{
    Mac, Prefix, RemoteRoute, RoutesFile, StackName, StackRoutes, Vni, ROUTES_FILE, RTPROT_VROUTER,
    SCHEMA_VERSION,
};

/// Most synthetic remote stacks: one /24 each in 10.64.0.0/10.
pub const MAX_REMOTE: usize = 16384;

/// The main routing table.
pub const MAIN_TABLE: u32 = 254;

/// Synthetic remote stack `i` (0-based): its own /24 in 10.64.0.0/10, its router at .254
/// of it (so N stacks have N distinct gateways), alone on a remote host in 198.19.0.0/16
/// (a benchmark range no simulated host uses; packets to it die in the harness's
/// underlay namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteStack {
    pub name: String,
    pub prefix: Prefix,
    pub router_ip: Ipv4Addr,
    pub host: Ipv4Addr,
}

pub fn remote_stack(i: usize) -> Result<RemoteStack> {
    ensure!(
        i < MAX_REMOTE,
        "remote stack #{i}: at most {MAX_REMOTE} synthetic stacks (10.64.0.0/10 in /24s)"
    );
    let (a, b) = ((64 + i / 256) as u8, (i % 256) as u8);
    let prefix = Prefix::new(Ipv4Addr::new(10, a, b, 0), 24).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(RemoteStack {
        name: format!("r{i:05}"),
        prefix,
        router_ip: Ipv4Addr::new(10, a, b, 254),
        host: Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8),
    })
}

/// The routes.json rows of `n` synthetic remote stacks on VNI `vni`, as discovery
/// publishes them (MAC derived from VNI and router IP, not same-host).
pub fn remote_routes(n: usize, vni: Vni) -> Result<Vec<RemoteRoute>> {
    (0..n)
        .map(|i| {
            let s = remote_stack(i)?;
            Ok(RemoteRoute {
                prefix: s.prefix,
                stack: StackName::new(&s.name).map_err(|e| anyhow::anyhow!("{e}"))?,
                via: s.router_ip,
                mac: Mac::for_router(vni, s.router_ip),
                host: s.host,
                same_host: false,
            })
        })
        .collect()
}

/// A routes.json generation listing `routes` for the one local stack `stack`.
pub fn routes_file(
    stack: &StackName,
    vni: Vni,
    routes: Vec<RemoteRoute>,
    generation: u64,
) -> RoutesFile {
    let mut f = RoutesFile {
        schema: SCHEMA_VERSION,
        generation,
        ..RoutesFile::default()
    };
    f.stacks.insert(
        stack.clone(),
        StackRoutes {
            vni: Some(vni),
            routes,
        },
    );
    f
}

/// Discovery's static peer file (`--config`) with `n` synthetic remote stacks on VNI
/// `vni`, one per remote host (so no host reaches the per-host prefix cap).
pub fn static_peers_toml(n: usize, vni: Vni) -> Result<String> {
    let mut out = String::new();
    for i in 0..n {
        let s = remote_stack(i)?;
        out.push_str(&format!(
            "[[host]]\naddress = \"{}\"\n[[host.stack]]\nname = \"{}\"\nvni = {}\nprefixes = [\"{}\"]\nrouter_ip = \"{}\"\n\n",
            s.host, s.name, vni, s.prefix, s.router_ip
        ));
    }
    Ok(out)
}

/// A `bridge -batch` script giving `vxlan<VNI>` the forwarding rows discovery keeps for
/// `routes`: per remote host a flood row (all-zeros MAC) and per remote router its MAC,
/// both towards the host's underlay address.
pub fn fdb_batch(vni: Vni, routes: &[RemoteRoute]) -> String {
    let dev = vni.vxlan_ifname();
    let mut out = String::new();
    let mut hosts = HashSet::new();
    for r in routes {
        if hosts.insert(r.host) {
            out.push_str(&format!(
                "fdb append 00:00:00:00:00:00 dev {dev} dst {} self permanent\n",
                r.host
            ));
        }
        out.push_str(&format!(
            "fdb replace {} dev {dev} dst {} self permanent\n",
            r.mac, r.host
        ));
    }
    out
}

/// The (network, length) keys of `routes`' prefixes, for [`count_installed`].
pub fn prefix_keys(routes: &[RemoteRoute]) -> HashSet<(Ipv4Addr, u8)> {
    routes
        .iter()
        .map(|r| (r.prefix.addr(), r.prefix.prefix_len()))
        .collect()
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// Replaces `dir/routes.json` the way discovery does (vrouter-state's `Dir::write_atomic`:
/// a complete, fsynced temp file in the same directory, renamed into place, then the
/// directory fsynced; discovery's lock is in its private directory, which no reader
/// needs), and returns the instant just before the rename. Kept apart from the one
/// writer only to take that instant.
pub fn publish_routes(dir: &Path, file: &RoutesFile) -> Result<Instant> {
    let mut bytes = serde_json::to_vec_pretty(file)?;
    bytes.push(b'\n');
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{ROUTES_FILE}.tmp.{}.{n}", std::process::id()));
    let target = dir.join(ROUTES_FILE);
    let written = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    let t0 = Instant::now();
    if let Err(e) = std::fs::rename(&tmp, &target) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("renaming into {}", target.display()));
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(t0)
}

// ---------------------------------------------------------------------------------
// /proc

/// A `kB` field (e.g. `VmHWM`) of /proc/PID/status text, in KiB.
pub fn status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let mut it = rest.split_whitespace();
        let v = it.next()?.parse().ok()?;
        (it.next() == Some("kB")).then_some(v)
    })
}

/// utime + stime (clock ticks) from /proc/PID/stat text.
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses; fields restart after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU time used by `pid` so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let ticks = stat_cpu_ticks(&stat).with_context(|| format!("bad /proc/{pid}/stat"))?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// Waits until `pid` uses less than `share` of one CPU over a `window` (the daemon has
/// finished the work a change gave it), at most `timeout`. Returns whether it did.
pub fn wait_quiet(pid: u32, share: f64, window: Duration, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let c0 = cpu_time(pid)?;
        let t0 = Instant::now();
        std::thread::sleep(window);
        let used = (cpu_time(pid)? - c0).as_secs_f64() / t0.elapsed().as_secs_f64();
        if used < share {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
    }
}

/// Peak RSS (VmHWM) of `pid` in MiB, after checking that `pid` runs `comm` (the
/// daemon itself, not a wrapper that has not exec'd yet).
pub fn peak_rss_mib(pid: u32, comm: &str) -> Result<f64> {
    let actual = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .with_context(|| format!("reading /proc/{pid}/comm"))?;
    // comm is cut to 15 bytes.
    let want: String = comm.chars().take(15).collect();
    ensure!(
        actual.trim_end() == want,
        "pid {pid} runs {:?}, not {want:?}",
        actual.trim_end()
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = status_kib(&status, "VmHWM").with_context(|| format!("no VmHWM for pid {pid}"))?;
    Ok(kib as f64 / 1024.0)
}

// ---------------------------------------------------------------------------------
// Readiness over HTTP

/// Polls `GET path` on `addr` inside namespace `ns` every `interval` until it answers
/// 200; returns the instant the 200 was read. Bounded by `timeout`.
pub fn wait_http_200(
    ns: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    interval: Duration,
) -> Result<Instant> {
    let ns_path = format!("/run/netns/{ns}");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let deadline = Instant::now() + timeout;
    std::thread::spawn(move || -> Result<Instant> {
        join_netns(&ns_path)?;
        loop {
            let last = match get_status(addr, &request) {
                Ok(200) => return Ok(Instant::now()),
                Ok(code) => format!("status {code}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                bail!("GET {addr} not 200 within {timeout:?} in {ns_path}: {last}");
            }
            std::thread::sleep(interval);
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("readiness poller panicked"))?
}

fn get_status(addr: SocketAddr, request: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(request.as_bytes())?;
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < 12 {
        let n = s.read(&mut head[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    std::str::from_utf8(&head[..got])
        .ok()
        .and_then(|t| t.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))
}

fn join_netns(ns_path: &str) -> Result<()> {
    let f = File::open(ns_path).with_context(|| format!("opening {ns_path}"))?;
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {ns_path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// rtnetlink dumps

const NLMSG_HDR: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const RTA_DST: u16 = 1;
const RTA_GATEWAY: u16 = 5;
const RTA_MULTIPATH: u16 = 9;
const RTA_TABLE: u16 = 15;
const RTA_NH_ID: u16 = 30;
const IFLA_IFNAME: u16 = 3;
/// IFF_UP.
pub const IFF_UP: u32 = 1;

/// One IPv4 route of a dump, as far as the bench needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub dst: Ipv4Addr,
    pub dst_len: u8,
    pub table: u32,
    pub protocol: u8,
    pub gateway: Option<Ipv4Addr>,
    /// A nexthop object (RTA_NH_ID).
    pub nh_id: Option<u32>,
    pub multipath: bool,
}

/// One link of a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEntry {
    pub index: i32,
    pub name: String,
    pub flags: u32,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_ne_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// The attributes (type, payload) in `b`; stops at the first malformed one.
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut v = Vec::new();
    while b.len() >= 4 {
        let len = u16_at(b, 0) as usize;
        let kind = u16_at(b, 2) & 0x3fff; // without NLA_F_NESTED / NET_BYTEORDER
        if len < 4 || len > b.len() {
            break;
        }
        v.push((kind, &b[4..len]));
        b = &b[align4(len).min(b.len())..];
    }
    v
}

/// Parses the payload of an RTM_NEWROUTE message (after the netlink header).
pub fn parse_route(p: &[u8]) -> Option<RouteEntry> {
    if p.len() < 12 || p[0] != libc::AF_INET as u8 {
        return None;
    }
    let mut r = RouteEntry {
        dst: Ipv4Addr::UNSPECIFIED,
        dst_len: p[1],
        table: u32::from(p[4]),
        protocol: p[5],
        gateway: None,
        nh_id: None,
        multipath: false,
    };
    for (kind, v) in attrs(&p[12..]) {
        match kind {
            RTA_DST if v.len() == 4 => r.dst = Ipv4Addr::new(v[0], v[1], v[2], v[3]),
            RTA_GATEWAY if v.len() == 4 => r.gateway = Some(Ipv4Addr::new(v[0], v[1], v[2], v[3])),
            RTA_TABLE if v.len() == 4 => r.table = u32_at(v, 0),
            RTA_NH_ID if v.len() == 4 => r.nh_id = Some(u32_at(v, 0)),
            RTA_MULTIPATH => r.multipath = true,
            _ => {}
        }
    }
    Some(r)
}

/// Parses the payload of an RTM_NEWLINK message.
pub fn parse_link(p: &[u8]) -> Option<LinkEntry> {
    if p.len() < 16 {
        return None;
    }
    let index = u32_at(p, 4) as i32;
    let flags = u32_at(p, 8);
    let name = attrs(&p[16..]).into_iter().find_map(|(k, v)| {
        (k == IFLA_IFNAME).then(|| {
            String::from_utf8_lossy(v.split(|&c| c == 0).next().unwrap_or(&[])).into_owned()
        })
    })?;
    Some(LinkEntry { index, name, flags })
}

/// How many of `routes` are the project's (protocol 118, main table) remote routes to
/// one of `wanted`, through a gateway or a nexthop object.
pub fn count_installed(routes: &[RouteEntry], wanted: &HashSet<(Ipv4Addr, u8)>) -> usize {
    routes
        .iter()
        .filter(|r| {
            r.protocol == RTPROT_VROUTER
                && r.table == MAIN_TABLE
                && (r.gateway.is_some() || r.nh_id.is_some() || r.multipath)
                && wanted.contains(&(r.dst, r.dst_len))
        })
        .count()
}

/// A NETLINK_ROUTE socket opened inside a network namespace (a socket stays in the
/// namespace it was made in, whichever thread uses it).
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    pub fn in_netns(ns: &str) -> Result<Netlink> {
        let ns_path = format!("/run/netns/{ns}");
        let fd = std::thread::spawn(move || -> Result<OwnedFd> {
            join_netns(&ns_path)?;
            let raw = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::NETLINK_ROUTE,
                )
            };
            if raw < 0 {
                bail!("netlink socket: {}", std::io::Error::last_os_error());
            }
            Ok(unsafe { OwnedFd::from_raw_fd(raw) })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netlink opener panicked"))??;
        // Bounded reads: a dump that stalls is an error, not a hang.
        let tv = libc::timeval {
            tv_sec: 10,
            tv_usec: 0,
        };
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        Ok(Netlink {
            fd,
            seq: 1,
            buf: vec![0; 1 << 18],
        })
    }

    /// Sends a dump request and hands each answer's payload of type `want` to `f`.
    fn dump(&mut self, kind: u16, body: &[u8], want: u16, mut f: impl FnMut(&[u8])) -> Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let len = NLMSG_HDR + body.len();
        let mut req = Vec::with_capacity(len);
        req.extend_from_slice(&(len as u32).to_ne_bytes());
        req.extend_from_slice(&kind.to_ne_bytes());
        req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req.extend_from_slice(&seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        req.extend_from_slice(body);
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                req.as_ptr() as *const libc::c_void,
                req.len(),
                0,
            )
        };
        if sent < 0 {
            bail!("netlink send: {}", std::io::Error::last_os_error());
        }
        // Bounded: a dump ends with NLMSG_DONE; each read is bounded by SO_RCVTIMEO.
        for _ in 0..1_000_000 {
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr() as *mut libc::c_void,
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                bail!("netlink recv: {}", std::io::Error::last_os_error());
            }
            let mut b = &self.buf[..n as usize];
            while b.len() >= NLMSG_HDR {
                let mlen = u32_at(b, 0) as usize;
                let mkind = u16_at(b, 4);
                let mseq = u32_at(b, 8);
                if mlen < NLMSG_HDR || mlen > b.len() {
                    bail!("malformed netlink message (length {mlen})");
                }
                let payload = &b[NLMSG_HDR..mlen];
                if mseq == seq {
                    match mkind {
                        NLMSG_DONE => return Ok(()),
                        NLMSG_ERROR => {
                            let code = if payload.len() >= 4 {
                                u32_at(payload, 0) as i32
                            } else {
                                0
                            };
                            if code != 0 {
                                bail!(
                                    "netlink dump failed: {}",
                                    std::io::Error::from_raw_os_error(-code)
                                );
                            }
                            return Ok(());
                        }
                        k if k == want => f(payload),
                        _ => {}
                    }
                }
                b = &b[align4(mlen).min(b.len())..];
            }
        }
        bail!("netlink dump did not end")
    }

    /// All IPv4 routes of the namespace (every table).
    pub fn routes(&mut self) -> Result<Vec<RouteEntry>> {
        let mut body = [0u8; 12];
        body[0] = libc::AF_INET as u8;
        let mut v = Vec::new();
        self.dump(RTM_GETROUTE, &body, RTM_NEWROUTE, |p| {
            if let Some(r) = parse_route(p) {
                v.push(r);
            }
        })?;
        Ok(v)
    }

    /// All links of the namespace.
    pub fn links(&mut self) -> Result<Vec<LinkEntry>> {
        let body = [0u8; 16];
        let mut v = Vec::new();
        self.dump(RTM_GETLINK, &body, RTM_NEWLINK, |p| {
            if let Some(l) = parse_link(p) {
                v.push(l);
            }
        })?;
        Ok(v)
    }

    /// How many of `wanted` are installed (see [`count_installed`]).
    pub fn installed(&mut self, wanted: &HashSet<(Ipv4Addr, u8)>) -> Result<usize> {
        Ok(count_installed(&self.routes()?, wanted))
    }

    /// Polls every `interval` until exactly `target` of `wanted` are installed; returns
    /// the instant the matching dump was taken (its start). Bounded by `timeout`.
    pub fn wait_installed(
        &mut self,
        wanted: &HashSet<(Ipv4Addr, u8)>,
        target: usize,
        timeout: Duration,
        interval: Duration,
    ) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let at = Instant::now();
            let n = self.installed(wanted)?;
            if n == target {
                return Ok(at);
            }
            if Instant::now() >= deadline {
                bail!("{n} of the routes installed after {timeout:?}, want {target}");
            }
            std::thread::sleep(interval);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_routes_have_distinct_gateways_in_their_own_prefixes() {
        let vni = Vni::new(1000).unwrap();
        let routes = remote_routes(10_000, vni).unwrap();
        assert_eq!(routes.len(), 10_000);
        let gws: HashSet<Ipv4Addr> = routes.iter().map(|r| r.via).collect();
        assert_eq!(gws.len(), 10_000, "one gateway per remote stack");
        assert_eq!(prefix_keys(&routes).len(), 10_000, "distinct prefixes");
        let hosts: HashSet<Ipv4Addr> = routes.iter().map(|r| r.host).collect();
        assert_eq!(hosts.len(), 10_000, "one host per remote stack");
        let local: Prefix = "10.1.0.0/24".parse().unwrap();
        for r in &routes {
            assert!(r.prefix.contains(r.via), "{} not in {}", r.via, r.prefix);
            assert_eq!(r.prefix.prefix_len(), 24);
            assert!(!r.prefix.overlaps(&local));
            assert_eq!(r.mac, Mac::for_router(vni, r.via));
            assert!(!r.same_host);
            let o = r.host.octets();
            assert!(o[0] == 198 && o[1] == 19 && o[3] != 0 && o[3] != 255);
        }
        // No two prefixes overlap (the router would skip one).
        let mut sorted: Vec<Prefix> = routes.iter().map(|r| r.prefix).collect();
        sorted.sort();
        assert!(sorted.windows(2).all(|w| !w[0].overlaps(&w[1])));
        assert!(remote_stack(MAX_REMOTE).is_err());
        assert_eq!(remote_stack(0).unwrap().prefix.to_string(), "10.64.0.0/24");
        assert_eq!(
            remote_stack(MAX_REMOTE - 1).unwrap().prefix.to_string(),
            "10.127.255.0/24"
        );
    }

    #[test]
    fn routes_file_round_trips_and_lists_the_stack() {
        let vni = Vni::new(1000).unwrap();
        let a = StackName::new("a").unwrap();
        let f = routes_file(&a, vni, remote_routes(3, vni).unwrap(), 7);
        let back: RoutesFile = serde_json::from_slice(&serde_json::to_vec(&f).unwrap()).unwrap();
        assert_eq!(back, f);
        assert_eq!(back.generation, 7);
        assert_eq!(back.stacks[&a].routes.len(), 3);
        assert_eq!(back.stacks[&a].vni, Some(vni));
    }

    #[test]
    fn fdb_rows_per_host_and_router() {
        let vni = Vni::new(1000).unwrap();
        let routes = remote_routes(3, vni).unwrap();
        let b = fdb_batch(vni, &routes);
        assert_eq!(b.lines().count(), 6);
        assert!(
            b.contains("fdb append 00:00:00:00:00:00 dev vxlan1000 dst 198.19.0.3 self permanent")
        );
        assert!(b.contains(&format!(
            "fdb replace {} dev vxlan1000 dst 198.19.0.1 self permanent",
            Mac::for_router(vni, "10.64.0.254".parse().unwrap())
        )));
    }

    #[test]
    fn static_peers_one_host_per_stack() {
        let vni = Vni::new(1000).unwrap();
        let t = static_peers_toml(2, vni).unwrap();
        assert_eq!(t.matches("[[host]]").count(), 2);
        assert!(t.contains("address = \"198.19.0.1\""));
        assert!(t.contains("name = \"r00001\""));
        assert!(t.contains("prefixes = [\"10.64.1.0/24\"]"));
        assert!(t.contains("router_ip = \"10.64.1.254\""));
        assert!(static_peers_toml(MAX_REMOTE + 1, vni).is_err());
    }

    #[test]
    fn publish_routes_replaces_the_file() {
        let dir = std::env::temp_dir().join(format!("ctlbench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let vni = Vni::new(1000).unwrap();
        let a = StackName::new("a").unwrap();
        let f = routes_file(&a, vni, remote_routes(5, vni).unwrap(), 3);
        let before = Instant::now();
        let t0 = publish_routes(&dir, &f).unwrap();
        assert!(t0 >= before);
        let read = vrouter_state::StateDir::open(&dir)
            .unwrap()
            .read_routes()
            .unwrap();
        assert_eq!(read, f);
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cpu_ticks_from_stat() {
        let s =
            "42 (vrouter (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 3 0 100 1000 200";
        assert_eq!(stat_cpu_ticks(s), Some(22));
        assert_eq!(stat_cpu_ticks("42 (x) S 1"), None);
    }

    #[test]
    fn vmhwm_from_status() {
        let s =
            "Name:\tvrouter-router\nVmPeak:\t  20000 kB\nVmHWM:\t    8123 kB\nVmRSS:\t 7000 kB\n";
        assert_eq!(status_kib(s, "VmHWM"), Some(8123));
        assert_eq!(status_kib(s, "VmRSS"), Some(7000));
        assert_eq!(status_kib(s, "VmSwap"), None);
        assert_eq!(status_kib("VmHWM:\tlots\n", "VmHWM"), None);
    }

    fn attr(kind: u16, v: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(v);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn route_msg(dst: [u8; 4], len: u8, proto: u8, extra: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![libc::AF_INET as u8, len, 0, 0, 254, proto, 0, 1, 0, 0, 0, 0];
        p.extend(attr(RTA_TABLE, &254u32.to_ne_bytes()));
        p.extend(attr(RTA_DST, &dst));
        for e in extra {
            p.extend_from_slice(e);
        }
        p
    }

    #[test]
    fn routes_count_with_a_gateway_or_a_nexthop_object() {
        let gw = route_msg(
            [10, 64, 0, 0],
            24,
            118,
            &[attr(RTA_GATEWAY, &[10, 64, 0, 254])],
        );
        let nh = route_msg(
            [10, 64, 1, 0],
            24,
            118,
            &[attr(RTA_NH_ID, &7u32.to_ne_bytes())],
        );
        let other_proto = route_msg([10, 64, 2, 0], 24, 4, &[attr(RTA_GATEWAY, &[1, 1, 1, 1])]);
        let unwanted = route_msg([10, 99, 0, 0], 24, 118, &[attr(RTA_GATEWAY, &[1, 1, 1, 1])]);
        let no_gw = route_msg([10, 64, 3, 0], 24, 118, &[]);
        let r = parse_route(&gw).unwrap();
        assert_eq!(r.dst, Ipv4Addr::new(10, 64, 0, 0));
        assert_eq!(r.gateway, Some(Ipv4Addr::new(10, 64, 0, 254)));
        assert_eq!(r.table, MAIN_TABLE);
        assert_eq!(parse_route(&nh).unwrap().nh_id, Some(7));
        let all: Vec<RouteEntry> = [gw, nh, other_proto, unwanted, no_gw]
            .iter()
            .map(|m| parse_route(m).unwrap())
            .collect();
        let vni = Vni::new(1000).unwrap();
        let wanted = prefix_keys(&remote_routes(4, vni).unwrap());
        assert_eq!(count_installed(&all, &wanted), 2);
        // IPv6 and short messages are not routes of ours.
        let mut v6 = route_msg([0; 4], 0, 118, &[]);
        v6[0] = libc::AF_INET6 as u8;
        assert!(parse_route(&v6).is_none());
        assert!(parse_route(&[2, 0]).is_none());
    }

    #[test]
    fn link_name_and_flags() {
        let mut p = vec![0u8; 16];
        p[4..8].copy_from_slice(&5i32.to_ne_bytes());
        p[8..12].copy_from_slice(&(IFF_UP | 0x10000).to_ne_bytes());
        p.extend(attr(IFLA_IFNAME, b"ovl1000\0"));
        let l = parse_link(&p).unwrap();
        assert_eq!(
            l,
            LinkEntry {
                index: 5,
                name: "ovl1000".into(),
                flags: IFF_UP | 0x10000
            }
        );
        assert!(parse_link(&p[..10]).is_none());
    }
}
