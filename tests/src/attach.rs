//! Talking to discovery's attach socket as a (possibly hostile) router would: from a
//! thread inside the router's network namespace, so the sockets belong to it.

use std::future::Future;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use vrouter_state::attach::{AttachSocket, DiscoveryMessage};

/// Runs `f` on a new thread that has joined network namespace `ns` (/run/netns/<ns>),
/// with a runtime of its own.
pub fn in_netns<F, Fut, T>(ns: &str, f: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<T>>,
    T: Send,
{
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(move || {
            let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// One connection from namespace `ns`: sends each message (raw JSON, so invalid ones
/// too; with the namespace's descriptor when the flag is set) and collects the reply
/// to each (`None`: no reply within 5 s, or the connection closed).
pub fn conversation(
    ns: &str,
    socket: &Path,
    messages: &[(serde_json::Value, bool)],
) -> Result<Vec<Option<DiscoveryMessage>>> {
    in_netns(ns, || async {
        let sock = AttachSocket::connect(socket).await?;
        let own = std::fs::File::open("/proc/thread-self/ns/net")?;
        let mut replies = Vec::new();
        for (msg, with_fd) in messages {
            let fd = with_fd.then(|| own.as_fd());
            sock.send(msg, fd).await?;
            let reply =
                tokio::time::timeout(Duration::from_secs(5), sock.recv::<DiscoveryMessage>())
                    .await
                    .ok()
                    .and_then(|r| r.ok().flatten())
                    .map(|(m, _)| m);
            replies.push(reply);
        }
        Ok(replies)
    })
}

/// Opens up to `n` connections to `socket` from namespace `ns` within `patience`
/// (non-blocking connects; a full backlog is retried) and returns them, held open.
pub fn flood(ns: &str, socket: &Path, n: usize, patience: Duration) -> Result<Vec<OwnedFd>> {
    in_netns(ns, || async {
        let addr = UnixAddr::new(socket)?;
        let deadline = Instant::now() + patience;
        let mut open = Vec::new();
        while open.len() < n && Instant::now() < deadline {
            let fd = socket::socket(
                AddressFamily::Unix,
                SockType::SeqPacket,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            match socket::connect(fd.as_raw_fd(), &addr) {
                Ok(()) => open.push(fd),
                Err(nix::errno::Errno::EAGAIN) => {
                    tokio::time::sleep(Duration::from_millis(2)).await
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(open)
    })
}

/// A connection to `socket` made from namespace `ns` and driven by `rt`, as a router in
/// that namespace holds it: the socket is created while this thread is in `ns` (a
/// socket keeps the namespace it was made in, which is what discovery checks), then
/// the thread goes back to its own namespace.
pub fn connect_from(ns: &str, rt: &tokio::runtime::Runtime, socket: &Path) -> Result<AttachSocket> {
    let own = std::fs::File::open("/proc/thread-self/ns/net").context("own namespace")?;
    let path = format!("/run/netns/{ns}");
    let target = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
    setns(target.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
    // `block_on` polls on this thread, so the socket is made here, in `ns`.
    let conn = rt.block_on(AttachSocket::connect(socket));
    setns(own.as_fd(), CloneFlags::CLONE_NEWNET).context("setns back")?;
    Ok(conn?)
}
