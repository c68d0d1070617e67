//! `vrouter-discovery all-in-one`: both roles in one privileged host-network container
//! (the seed's single-container architecture), with the same code path as the
//! privilege-separated deployment.
//!
//! 1. Wait for the stack's bridge: the host interface whose subnet holds the router IP
//!    (Docker creates it when the stack comes up).
//! 2. Create a private network namespace (a helper thread `unshare`s CLONE_NEWNET; the
//!    namespace is then held by a descriptor), set its forwarding and loose rp_filter
//!    sysctls, and plug it into the bridge with a veth pair: `vra<hash>` on the bridge,
//!    `eth0` inside with the router IP and a default route via the bridge's address.
//!    This is what Docker does for a router container.
//! 3. Spawn `vrouter-router` inside that namespace (`setns` before exec: this container
//!    is privileged) with the container's environment, and respawn it if it dies.
//! 4. Run the discovery role in-process: it attaches the router through the state
//!    directory's socket exactly as in the two-container deployment.
//!
//! On SIGTERM/SIGINT the router gets SIGTERM (not a departure: the stack stays in the
//! mesh for the grace period, as with a container restart), the veth is deleted, and
//! the namespace goes with the last descriptor.
//!
//! The kernel calls needed here (veth, addresses, master, default route) are not part
//! of the control plane's kernel layer, so this module speaks a few rtnetlink requests
//! itself over a raw netlink socket.

use crate::settings::Settings;
use anyhow::{bail, Context};
use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};
use vrouter_state::{Prefix, StackName};

/// Settings of the all-in-one variant (besides the discovery settings).
#[derive(Debug, Clone, clap::Args)]
pub struct AllInOneArgs {
    /// Stack name; passed to the router too.
    #[arg(long, env = "VROUTER_STACK")]
    pub stack: String,

    /// The router's fixed address on the stack network (keep it outside IPAM's ip_range).
    #[arg(long, env = "VROUTER_ROUTER_IP")]
    pub router_ip: String,

    /// Path of the vrouter-router binary (default: next to this binary).
    #[arg(long, env = "VROUTER_ROUTER_BIN")]
    pub router_bin: Option<PathBuf>,

    /// How long to wait for the stack's bridge to appear, in seconds.
    #[arg(long, env = "VROUTER_BRIDGE_WAIT_S", default_value_t = 120)]
    pub bridge_wait_s: u64,
}

/// Name of the host end of the router's veth: `vra` + 8 hex digits of a hash of the
/// stack name, so a restarted all-in-one finds (and replaces) its own leftover.
pub fn veth_name(stack: &StackName) -> String {
    // FNV-1a, 32 bit.
    let mut h: u32 = 0x811c9dc5;
    for b in stack.as_str().bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    format!("vra{h:08x}")
}

/// The stack's bridge as seen from the host namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
}

/// Picks the interface whose IPv4 subnet holds `router_ip` (and is not the router IP
/// itself).
pub fn find_bridge(
    router_ip: Ipv4Addr,
    links: &[vrouter_kernel::Link],
    addrs: &[vrouter_kernel::Address],
) -> Option<Bridge> {
    addrs
        .iter()
        .filter(|a| a.addr != router_ip && a.prefix_len > 0 && a.prefix_len < 32)
        .filter(|a| Prefix::containing(a.addr, a.prefix_len).contains(router_ip))
        .max_by_key(|a| a.prefix_len)
        .and_then(|a| {
            links.iter().find(|l| l.index == a.index).map(|l| Bridge {
                name: l.name.clone(),
                index: l.index,
                mtu: l.mtu,
                gateway: a.addr,
                prefix_len: a.prefix_len,
            })
        })
}

pub async fn run(settings: Settings, args: AllInOneArgs) -> anyhow::Result<()> {
    let stack = StackName::new(args.stack.trim()).map_err(|e| {
        anyhow::anyhow!(
            "VROUTER_STACK={:?} is invalid: {}; set it to the stack's name",
            args.stack,
            e.0
        )
    })?;
    let router_ip: Ipv4Addr = args.router_ip.trim().parse().map_err(|_| {
        anyhow::anyhow!(
            "VROUTER_ROUTER_IP={:?} is invalid: write the router's fixed IPv4 address on the stack network, e.g. 10.1.0.254",
            args.router_ip
        )
    })?;
    let router_bin = match &args.router_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("cannot find this binary's path; set VROUTER_ROUTER_BIN")?
            .with_file_name("vrouter-router"),
    };
    if !router_bin.is_file() {
        bail!(
            "VROUTER_ROUTER_BIN={} does not exist; point it at the vrouter-router binary",
            router_bin.display()
        );
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    // 1. The stack's bridge.
    let kernel = vrouter_kernel::Kernel::connect().await?;
    let deadline = Instant::now() + Duration::from_secs(args.bridge_wait_s);
    let mut logged = false;
    let bridge = loop {
        let links = kernel.links().await?;
        let addrs = kernel.addresses().await?;
        if let Some(b) = find_bridge(router_ip, &links, &addrs) {
            break b;
        }
        if Instant::now() >= deadline {
            bail!(
                "no host interface has a subnet holding VROUTER_ROUTER_IP={router_ip} after {}s; bring the stack's network up first (docker compose up) or fix the router IP",
                args.bridge_wait_s
            );
        }
        if !logged {
            info!("waiting for the stack network holding {router_ip} to appear");
            logged = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    };
    info!(
        "stack {stack}: bridge {} ({}/{}), router {router_ip}",
        bridge.name, bridge.gateway, bridge.prefix_len
    );

    // 2. The router's namespace and its veth.
    let veth = veth_name(&stack);
    let plumbing = Plumbing::create(&veth, &bridge, router_ip)
        .with_context(|| format!("cannot plug the router's namespace into {}", bridge.name))?;
    info!("router namespace plugged into {} via {veth}", bridge.name);

    // 3. The router, supervised.
    let stopping = Arc::new(AtomicBool::new(false));
    let supervisor = {
        let ns = plumbing.ns.try_clone()?;
        let stopping = stopping.clone();
        let bin = router_bin.clone();
        let ip = router_ip.to_string();
        std::thread::Builder::new()
            .name("router-supervisor".into())
            .spawn(move || supervise(ns, bin, ip, stopping))?
    };

    // 4. Discovery, in-process, until a signal.
    let mut disc = std::pin::pin!(crate::run::run(settings));
    let (result, finished) = tokio::select! {
        r = &mut disc => (r, true),
        _ = term.recv() => {
            // discovery handles the same signal itself; give it a moment to stop cleanly
            match tokio::time::timeout(Duration::from_secs(2), &mut disc).await {
                Ok(r) => (r, true),
                Err(_) => (Ok(()), false),
            }
        }
        _ = int.recv() => {
            match tokio::time::timeout(Duration::from_secs(2), &mut disc).await {
                Ok(r) => (r, true),
                Err(_) => (Ok(()), false),
            }
        }
    };
    stopping.store(true, Ordering::SeqCst);
    let _ = supervisor.join();
    drop(plumbing);
    if let Err(e) = &result {
        warn!("discovery role failed: {e:#}");
    }
    if !finished {
        // A standby blocked on the leader lock runs on a blocking thread the runtime
        // would wait for; nothing is left to clean up.
        std::process::exit(0);
    }
    result
}

/// Runs the router inside `ns` until `stopping`, respawning it (after a second) if it
/// exits; on stop, SIGTERM then (after 5 s) SIGKILL.
fn supervise(ns: OwnedFd, bin: PathBuf, router_ip: String, stopping: Arc<AtomicBool>) {
    let mut child: Option<Child> = None;
    let mut next_start = Instant::now();
    while !stopping.load(Ordering::SeqCst) {
        if let Some(c) = &mut child {
            match c.try_wait() {
                Ok(Some(st)) => {
                    warn!("vrouter-router exited ({st}); restarting it in a second");
                    child = None;
                    next_start = Instant::now() + Duration::from_secs(1);
                }
                Ok(None) => {}
                Err(e) => warn!("cannot poll vrouter-router: {e}"),
            }
        } else if Instant::now() >= next_start {
            match spawn_router(ns.as_fd(), &bin, &router_ip) {
                Ok(c) => {
                    info!("vrouter-router started (pid {})", c.id());
                    child = Some(c);
                }
                Err(e) => {
                    warn!("cannot start {}: {e}", bin.display());
                    next_start = Instant::now() + Duration::from_secs(1);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(mut c) = child {
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match c.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

fn spawn_router(ns: BorrowedFd<'_>, bin: &std::path::Path, router_ip: &str) -> io::Result<Child> {
    let nsfd = ns.as_raw_fd();
    let mut cmd = Command::new(bin);
    cmd.env("VROUTER_ROUTER_IP", router_ip);
    if std::env::var_os("VROUTER_ALLOW_EXTRA_CAPS").is_none() {
        // This container is privileged by definition.
        cmd.env("VROUTER_ALLOW_EXTRA_CAPS", "1");
    }
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(nsfd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// The router's namespace (held by a descriptor) and the host end of its veth; both go
/// away on drop.
struct Plumbing {
    ns: OwnedFd,
    veth: String,
}

impl Plumbing {
    fn create(veth: &str, bridge: &Bridge, router_ip: Ipv4Addr) -> io::Result<Plumbing> {
        let host = Netlink::open()?;
        // A leftover of an earlier run of this stack's all-in-one: ours by name.
        let _ = host.request(
            RTM_DELLINK,
            0,
            &link_msg(0, 0, 0, |m| m.attr_str(IFLA_IFNAME, veth)),
        );
        let ns = new_netns()?;
        let plumbing = Plumbing {
            ns,
            veth: veth.to_string(),
        };
        // veth: host end on the bridge, peer `eth0` created directly in the namespace.
        let nsfd = plumbing.ns.as_raw_fd() as u32;
        host.request(
            RTM_NEWLINK,
            NLM_F_CREATE | NLM_F_EXCL,
            &link_msg(0, 0, 0, |m| {
                m.attr_str(IFLA_IFNAME, veth);
                m.attr_u32(IFLA_MTU, bridge.mtu);
                m.nest(IFLA_LINKINFO, |m| {
                    m.attr_str(IFLA_INFO_KIND, "veth");
                    m.nest(IFLA_INFO_DATA, |m| {
                        m.nest(VETH_INFO_PEER, |m| {
                            m.ifinfo(0, 0, 0);
                            m.attr_str(IFLA_IFNAME, "eth0");
                            m.attr_u32(IFLA_MTU, bridge.mtu);
                            m.attr_u32(IFLA_NET_NS_FD, nsfd);
                        })
                    })
                })
            }),
        )?;
        let vindex = if_index(veth)?;
        host.request(
            RTM_NEWLINK,
            0,
            &link_msg(vindex, IFF_UP, IFF_UP, |m| {
                m.attr_u32(IFLA_MASTER, bridge.index)
            }),
        )?;
        let gateway = bridge.gateway;
        let prefix_len = bridge.prefix_len;
        in_netns(plumbing.ns.as_fd(), move || {
            for (path, value) in [
                ("/proc/sys/net/ipv4/ip_forward", "1"),
                ("/proc/sys/net/ipv4/conf/all/rp_filter", "2"),
                ("/proc/sys/net/ipv4/conf/default/rp_filter", "2"),
            ] {
                write_sysctl(path, value)?;
            }
            let nl = Netlink::open()?;
            let lo = if_index("lo")?;
            nl.request(RTM_NEWLINK, 0, &link_msg(lo, IFF_UP, IFF_UP, |_| {}))?;
            let eth0 = if_index("eth0")?;
            nl.request(RTM_NEWLINK, 0, &link_msg(eth0, IFF_UP, IFF_UP, |_| {}))?;
            let mut m = Msg::default();
            m.u8(libc::AF_INET as u8);
            m.u8(prefix_len);
            m.u8(0); // flags
            m.u8(0); // scope universe
            m.u32(eth0);
            m.attr_bytes(IFA_LOCAL, &router_ip.octets());
            m.attr_bytes(IFA_ADDRESS, &router_ip.octets());
            nl.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, &m.buf)?;
            let mut m = Msg::default();
            m.u8(libc::AF_INET as u8);
            m.u8(0); // dst_len: default route
            m.u8(0);
            m.u8(0);
            m.u8(libc::RT_TABLE_MAIN);
            m.u8(libc::RTPROT_BOOT);
            m.u8(libc::RT_SCOPE_UNIVERSE);
            m.u8(libc::RTN_UNICAST);
            m.u32(0); // flags
            m.attr_bytes(RTA_GATEWAY, &gateway.octets());
            m.attr_u32(RTA_OIF, eth0);
            nl.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, &m.buf)?;
            Ok(())
        })?;
        Ok(plumbing)
    }
}

impl Drop for Plumbing {
    fn drop(&mut self) {
        if let Ok(nl) = Netlink::open() {
            if let Err(e) = nl.request(
                RTM_DELLINK,
                0,
                &link_msg(0, 0, 0, |m| m.attr_str(IFLA_IFNAME, &self.veth)),
            ) {
                if e.raw_os_error() != Some(libc::ENODEV) {
                    warn!("cannot delete {}: {e}", self.veth);
                }
            }
        }
    }
}

/// Writes a sysctl of the calling thread's network namespace. Docker mounts /proc/sys
/// read-only unless the container is privileged; with CAP_SYS_ADMIN (which this
/// variant needs anyway, for the namespace) the calling helper thread then takes a
/// private mount namespace of its own and remounts its copy of /proc/sys read-write.
/// Nothing changes for the container's other processes.
fn write_sysctl(path: &str, value: &str) -> io::Result<()> {
    match std::fs::write(path, value) {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
            remount_proc_sys_rw_for_this_thread()?;
            std::fs::write(path, value)
        }
        r => r,
    }
    .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}

fn remount_proc_sys_rw_for_this_thread() -> io::Result<()> {
    let none = c"none";
    let root = c"/";
    let sys = c"/proc/sys";
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::mount(
            none.as_ptr(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        if libc::mount(
            none.as_ptr(),
            sys.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A new network namespace, held by the returned descriptor.
fn new_netns() -> io::Result<OwnedFd> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // CLONE_NEWNET applies to the calling thread only; this thread ends right after.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let f = std::fs::File::open("/proc/thread-self/ns/net")?;
            Ok(OwnedFd::from(f))
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}

/// Runs `f` on a helper thread that has joined the namespace `ns`.
fn in_netns<T: Send>(
    ns: BorrowedFd<'_>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    let raw = ns.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(move || {
            if unsafe { libc::setns(raw, libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}

/// Interface index in the calling thread's namespace.
fn if_index(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {name}"),
        )),
        i => Ok(i),
    }
}

// --- a minimal rtnetlink client -------------------------------------------------------

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const IFF_UP: u32 = libc::IFF_UP as u32;

#[derive(Default)]
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_ne_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_ne_bytes());
    }
    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
    /// struct ifinfomsg.
    fn ifinfo(&mut self, index: u32, flags: u32, change: u32) {
        self.u8(libc::AF_UNSPEC as u8);
        self.u8(0);
        self.u16(0);
        self.u32(index);
        self.u32(flags);
        self.u32(change);
    }
    fn attr_bytes(&mut self, ty: u16, data: &[u8]) {
        self.u16((4 + data.len()) as u16);
        self.u16(ty);
        self.buf.extend_from_slice(data);
        self.pad();
    }
    fn attr_str(&mut self, ty: u16, s: &str) {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr_bytes(ty, &v);
    }
    fn attr_u32(&mut self, ty: u16, v: u32) {
        self.attr_bytes(ty, &v.to_ne_bytes());
    }
    fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Msg)) {
        let start = self.buf.len();
        self.u16(0);
        self.u16(ty | NLA_F_NESTED);
        f(self);
        self.pad();
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

fn link_msg(index: u32, flags: u32, change: u32, attrs: impl FnOnce(&mut Msg)) -> Vec<u8> {
    let mut m = Msg::default();
    m.ifinfo(index, flags, change);
    attrs(&mut m);
    m.buf
}

/// A NETLINK_ROUTE socket; it stays in the namespace it was created in.
struct Netlink {
    fd: OwnedFd,
}

impl Netlink {
    fn open() -> io::Result<Netlink> {
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Ok(Netlink { fd })
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&self, ty: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let mut m = Msg::default();
        m.u32((16 + body.len()) as u32);
        m.u16(ty);
        m.u16(NLM_F_REQUEST | NLM_F_ACK | flags);
        m.u32(seq);
        m.u32(0);
        m.buf.extend_from_slice(body);
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                m.buf.as_ptr() as *const libc::c_void,
                m.buf.len(),
                0,
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 16384];
        for _ in 0..64 {
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut off = 0usize;
            let n = n as usize;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
                let mty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
                let mseq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap());
                if len < 16 || off + len > n {
                    break;
                }
                if mty == NLMSG_ERROR && mseq == seq && len >= 20 {
                    let code = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap());
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-code))
                    };
                }
                off += (len + 3) & !3;
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no netlink acknowledgement",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_name_is_short_and_stable() {
        let a = veth_name(&StackName::new("shop").unwrap());
        assert_eq!(a, veth_name(&StackName::new("shop").unwrap()));
        assert_ne!(a, veth_name(&StackName::new("shop2").unwrap()));
        assert!(a.len() <= 15 && a.starts_with("vra"), "{a}");
    }

    #[test]
    fn nested_attribute_lengths() {
        let m = link_msg(0, 0, 0, |m| {
            m.nest(IFLA_LINKINFO, |m| m.attr_str(IFLA_INFO_KIND, "veth"))
        });
        // ifinfomsg (16) + nest header (4) + "veth\0" attr (4 + 5, padded to 12)
        assert_eq!(m.len(), 16 + 4 + 12);
        assert_eq!(u16::from_ne_bytes([m[16], m[17]]), 16);
        assert_eq!(
            u16::from_ne_bytes([m[18], m[19]]),
            IFLA_LINKINFO | NLA_F_NESTED
        );
    }

    #[test]
    fn bridge_is_the_subnet_holding_the_router() {
        let link = |index, name: &str| vrouter_kernel::Link {
            index,
            name: name.to_string(),
            kind: None,
            mac: None,
            mtu: 1500,
            up: true,
            parent: None,
            vxlan: None,
        };
        let addr = |index, a: [u8; 4], len| vrouter_kernel::Address {
            index,
            addr: Ipv4Addr::from(a),
            prefix_len: len,
        };
        let links = vec![link(2, "eth0"), link(5, "br-abc")];
        let addrs = vec![addr(2, [192, 0, 2, 2], 24), addr(5, [10, 1, 0, 1], 24)];
        let b = find_bridge("10.1.0.254".parse().unwrap(), &links, &addrs).unwrap();
        assert_eq!(b.name, "br-abc");
        assert_eq!(b.gateway, Ipv4Addr::new(10, 1, 0, 1));
        assert!(find_bridge("10.9.0.254".parse().unwrap(), &links, &addrs).is_none());
    }
}
