//! `vrouter-discovery all-in-one`: both roles in one privileged host-network container
//! (the seed's single-container architecture), with the same code path as the
//! privilege-separated deployment.
//!
//! 1. Wait for the stack's bridge: the host interface whose subnet holds the router IP
//!    (Docker creates it when the stack comes up).
//! 2. Create a private network namespace (a helper thread `unshare`s CLONE_NEWNET; the
//!    namespace is then held by a descriptor), set its forwarding sysctl and turn rp_filter off
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
//! The kernel calls go through `vrouter_kernel`: the host end with the Kernel connected
//! in this container's namespace, the inside with one connected from a helper thread
//! that has entered the router's namespace.

use crate::settings::Settings;
use anyhow::{bail, Context};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};
use vrouter_kernel::{Kernel, Route};
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
    let kernel = Kernel::connect().await?;
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
    let plumbing = Plumbing::create(&kernel, &veth, &bridge, router_ip)
        .await
        .with_context(|| format!("cannot plug the router's namespace into {}", bridge.name))?;
    info!("router namespace plugged into {} via {veth}", bridge.name);

    // 3. The router, supervised.
    let stopping = Arc::new(AtomicBool::new(false));
    let started = plumbing.ns.try_clone().and_then(|ns| {
        let stopping = stopping.clone();
        let bin = router_bin.clone();
        let ip = router_ip.to_string();
        std::thread::Builder::new()
            .name("router-supervisor".into())
            .spawn(move || supervise(ns, bin, ip, stopping))
    });
    let supervisor = match started {
        Ok(supervisor) => supervisor,
        Err(e) => {
            plumbing.remove(&kernel).await;
            return Err(e).context("cannot start the router's supervisor thread");
        }
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
    plumbing.remove(&kernel).await;
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

/// The router's namespace (held by a descriptor) and the host end of its veth. The
/// namespace goes with the last descriptor; `remove` deletes the veth.
struct Plumbing {
    ns: OwnedFd,
    veth: String,
    index: u32,
}

impl Plumbing {
    async fn create(
        host: &Kernel,
        veth: &str,
        bridge: &Bridge,
        router_ip: Ipv4Addr,
    ) -> anyhow::Result<Plumbing> {
        // A leftover of an earlier run of this stack's all-in-one: ours by name.
        if let Some(old) = host.link_by_name(veth).await? {
            host.delete_link(old.index).await?;
        }
        let ns = new_netns().context("cannot create the router's network namespace")?;
        // veth: host end on the bridge, peer `eth0` created directly in the namespace.
        let index = host
            .create_veth_into(veth, bridge.mtu, ns.as_fd(), "eth0")
            .await?;
        let plumbing = Plumbing {
            ns,
            veth: veth.to_string(),
            index,
        };
        match plumbing.configure(host, bridge, router_ip).await {
            Ok(()) => Ok(plumbing),
            Err(e) => {
                plumbing.remove(host).await;
                Err(e)
            }
        }
    }

    async fn configure(
        &self,
        host: &Kernel,
        bridge: &Bridge,
        router_ip: Ipv4Addr,
    ) -> anyhow::Result<()> {
        host.set_master(self.index, bridge.index).await?;
        host.set_up(self.index).await?;
        // Sysctls belong to the namespace of the thread that writes them, and a Kernel
        // to the namespace of the thread that connects it: both happen on a helper
        // thread inside; the Kernel is then used from here.
        let runtime = tokio::runtime::Handle::current();
        let inside = in_netns(self.ns.as_fd(), || {
            for (path, value) in [
                ("/proc/sys/net/ipv4/ip_forward", "1"),
                ("/proc/sys/net/ipv4/conf/all/rp_filter", "0"),
                ("/proc/sys/net/ipv4/conf/default/rp_filter", "0"),
            ] {
                write_sysctl(path, value)?;
            }
            Ok(runtime.block_on(Kernel::connect())?)
        })?;
        let lo = inside.link_by_name("lo").await?;
        let eth0 = inside.link_by_name("eth0").await?;
        let (Some(lo), Some(eth0)) = (lo, eth0) else {
            bail!("the router's namespace has no lo or no eth0 (the veth's peer)");
        };
        let eth0 = eth0.index;
        inside.set_up(lo.index).await?;
        inside.set_up(eth0).await?;
        inside
            .replace_address(eth0, router_ip, bridge.prefix_len)
            .await?;
        inside
            .replace_route(&Route {
                table: u32::from(libc::RT_TABLE_MAIN),
                dst: Prefix::containing(Ipv4Addr::UNSPECIFIED, 0),
                gateway: Some(bridge.gateway),
                oif: Some(eth0),
                onlink: false,
                protocol: libc::RTPROT_BOOT,
                nexthop: None,
            })
            .await?;
        Ok(())
    }

    /// Deletes the host end of the veth (the peer goes with it).
    async fn remove(self, host: &Kernel) {
        if let Err(e) = host.delete_link(self.index).await {
            warn!("cannot delete {}: {e}", self.veth);
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
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let raw = ns.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(move || {
            if unsafe { libc::setns(raw, libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error())
                    .context("cannot enter the router's network namespace");
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("namespace thread panicked")))
    })
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
    fn bridge_is_the_subnet_holding_the_router() {
        let link = |index, name: &str| vrouter_kernel::Link {
            index,
            name: name.to_string(),
            mtu: 1500,
            ..Default::default()
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
