//! The attach protocol between a router and discovery, over the Unix socket
//! `discovery.sock` in the state directory (SOCK_SEQPACKET: one JSON message per
//! packet, a namespace descriptor riding along as SCM_RIGHTS).
//!
//! The router connects, sends `Register` (with its /proc/self/ns/net descriptor when
//! it needs an overlay link), and keeps the connection open: its closing is how
//! discovery learns the router is gone. It sends `Ack` after each routes.json
//! generation it applied, and `Register` again if its overlay link disappears.
//! `Leave` withdraws the stack at once.
//!
//! Every router can reach this socket, so a connection acts only for its own stack:
//! it registers one stack, from the network namespace that holds the stack's router
//! address (discovery learns the connecting namespace from the socket itself,
//! [`AttachSocket::peer_netns`]); `Ack` and `Leave` apply to that stack only. Admin
//! commands ([`AdminMessage`]) never come through it: they go through `admin.sock` in
//! discovery's private directory, which routers do not mount.

use crate::types::{Mac, StackName, StackSpec};
use serde::{Deserialize, Serialize};

/// Largest message either side sends; bigger packets are refused.
pub const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RouterMessage {
    Register(Registration),
    /// The router applied this routes.json generation.
    Ack {
        generation: u64,
    },
    /// Withdraw this stack now (`vrouter-router leave`). Accepted for the stack this
    /// connection registered, or, on a connection that registered none, from the
    /// namespace that holds the stack's router address.
    Leave {
        stack: StackName,
    },
}

/// Commands on the admin socket (`admin.sock` in discovery's private directory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AdminMessage {
    /// This host leaves the gossip mesh on purpose (`vrouter-discovery leave-mesh`):
    /// every other host withdraws its stacks at once.
    LeaveMesh,
    /// Start a WireGuard key rotation (`vrouter-discovery rotate-key`).
    RotateKey,
}

/// Name of the admin socket in discovery's private directory.
pub const ADMIN_SOCKET: &str = "admin.sock";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    #[serde(flatten)]
    pub spec: StackSpec,
    /// True when a descriptor rides along and discovery must (re)create the overlay
    /// link; false when the router already has a working one (discovery restarted).
    pub needs_link: bool,
    /// True when the router's access policy tracks connections (anything but the
    /// default "allow, no rules"): then it must forward both directions of its stack's
    /// traffic, and discovery's port steering sends the stack's outgoing frames to the
    /// router rather than straight into the tunnel. Absent (an older router): true.
    #[serde(default = "conntrack_default")]
    pub conntrack: bool,
}

fn conntrack_default() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DiscoveryMessage {
    /// The overlay link was moved into the router's namespace under `ifname`.
    Attached { ifname: String, mac: Mac, mtu: u32 },
    /// Registration accepted; the router's existing link is kept.
    Registered,
    /// Registration refused; `reason` names the problem and the fix.
    Refused { reason: String },
    /// Reply to `Leave` (and to the admin command `LeaveMesh`).
    Left,
    /// Reply to the admin command `RotateKey`: the rotation started (public keys).
    Rotating { old: String, new: String },
}

/// A network namespace's identity: the device and inode of its nsfs file, unique
/// while the namespace lives. Two descriptors name the same namespace exactly when
/// their keys are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetnsKey {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsKey {
    /// The key of the namespace behind `fd` (a /proc/<pid>/ns/net or SIOCGSKNS
    /// descriptor). Anything that is not a namespace file is `InvalidInput`.
    pub fn of(fd: BorrowedFd<'_>) -> io::Result<NetnsKey> {
        let st = nix::sys::stat::fstat(fd)?;
        // nsfs files are their own kind: neither regular, directory, socket nor device.
        // NS_GET_NSTYPE (an ioctl on nsfs only) tells a network namespace for sure.
        // SAFETY: ioctl with no argument on a descriptor we borrow.
        let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
        if kind != libc::CLONE_NEWNET {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the descriptor is not a network namespace",
            ));
        }
        Ok(NetnsKey {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }
}

impl std::fmt::Display for NetnsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

/// `ioctl(sock, SIOCGSKNS)`: a descriptor of the socket's network namespace
/// (linux/sockios.h). Needs CAP_NET_ADMIN over that namespace.
const SIOCGSKNS: libc::c_ulong = 0x894C;
/// `ioctl(nsfd, NS_GET_NSTYPE)`: the CLONE_NEW* type of a namespace (linux/nsfs.h,
/// `_IO(0xb7, 0x3)`).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

// ---------------------------------------------------------------------------------
// The socket.

use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use serde::de::DeserializeOwned;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::unix::AsyncFd;

/// Mode of the socket file: owner and group may connect. A router running under
/// another uid needs the state directory's group (connecting needs write permission
/// on the socket file); 0666 would let any local user register stacks.
pub const SOCKET_MODE: u32 = 0o660;

/// Room for every descriptor one message can carry (the kernel's SCM_MAX_FD), so
/// a peer sending too many never truncates the control data and leaks them here.
const MAX_FDS: usize = 253;

/// How long `connect` keeps retrying while the listener's backlog is full.
const CONNECT_PATIENCE: Duration = Duration::from_secs(5);

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is open, is owned by the AsyncFd from here on, and always
    // returns the same descriptor from as_raw_fd.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

fn nonblocking_seqpacket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// Discovery's end: listens on `discovery.sock`.
#[derive(Debug)]
pub struct AttachListener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl AttachListener {
    /// Binds and listens at `path`. A socket file left behind by a process that died
    /// (nobody accepts on it) is replaced; a live listener is an `AddrInUse` error and
    /// anything that is not a socket is left alone (`AlreadyExists`). Must be called
    /// inside a tokio runtime.
    pub fn bind(path: &Path) -> io::Result<AttachListener> {
        remove_stale_socket(path)?;
        let fd = nonblocking_seqpacket()?;
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
        socket::listen(&fd, Backlog::new(64)?)?;
        Ok(AttachListener {
            fd: register(fd)?,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn accept(&self) -> io::Result<AttachSocket> {
        loop {
            let mut guard = self.fd.readable().await?;
            let accepted = guard.try_io(|fd| {
                let raw = socket::accept4(
                    fd.as_raw_fd(),
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                )?;
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                Ok(unsafe { OwnedFd::from_raw_fd(raw) })
            });
            match accepted {
                Ok(Ok(fd)) => return AttachSocket::from_fd(fd),
                // The connection was reset before we took it; wait for the next.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; remove it so discovery can listen there",
                path.display()
            ),
        ));
    }
    let probe = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    match socket::connect(probe.as_raw_fd(), &UnixAddr::new(path)?) {
        Ok(()) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another process is listening on {}; only one discovery may run per state directory",
                path.display()
            ),
        )),
        Err(Errno::ECONNREFUSED) => std::fs::remove_file(path),
        Err(e) => Err(io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot probe {}: {e}", path.display()),
        )),
    }
}

/// One attach connection, either end. `send` and `recv` take `&self`, so one task can
/// send while another waits in `recv` (share it in an `Arc`).
#[derive(Debug)]
pub struct AttachSocket {
    fd: AsyncFd<OwnedFd>,
}

impl AttachSocket {
    fn from_fd(fd: OwnedFd) -> io::Result<AttachSocket> {
        Ok(AttachSocket { fd: register(fd)? })
    }

    /// Connects to the listener at `path`. Must be called inside a tokio runtime.
    pub async fn connect(path: &Path) -> io::Result<AttachSocket> {
        let addr = UnixAddr::new(path)?;
        let deadline = tokio::time::Instant::now() + CONNECT_PATIENCE;
        loop {
            let fd = nonblocking_seqpacket()?;
            match socket::connect(fd.as_raw_fd(), &addr) {
                Ok(()) => return AttachSocket::from_fd(fd),
                // A non-blocking Unix connect fails with EAGAIN while the listener's
                // backlog is full, rather than completing later.
                Err(Errno::EAGAIN) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    let hint = match e {
                        Errno::ENOENT | Errno::ECONNREFUSED => {
                            "; is vrouter-discovery running with the same state directory?"
                        }
                        Errno::EACCES => {
                            "; the router's uid or gid needs write access to the socket (mode 0660)"
                        }
                        _ => "",
                    };
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("cannot connect to {}: {e}{hint}", path.display()),
                    ));
                }
            }
        }
    }

    /// A connected pair, for tests and in-process use.
    pub fn pair() -> io::Result<(AttachSocket, AttachSocket)> {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((AttachSocket::from_fd(a)?, AttachSocket::from_fd(b)?))
    }

    /// Sends `msg` as one packet, with `fd` attached as SCM_RIGHTS. A message over
    /// [`MAX_MESSAGE`] is refused here (`InvalidInput`) rather than by the peer.
    pub async fn send<T: Serialize>(&self, msg: &T, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "attach message of {} bytes is over the {MAX_MESSAGE}-byte limit",
                    bytes.len()
                ),
            ));
        }
        let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
        loop {
            let mut guard = self.fd.writable().await?;
            let sent = guard.try_io(|sock| {
                let iov = [IoSlice::new(&bytes)];
                let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
                    Vec::new()
                } else {
                    vec![ControlMessage::ScmRights(&fds)]
                };
                // MSG_NOSIGNAL: a closed peer is an EPIPE error, not a SIGPIPE.
                Ok(socket::sendmsg::<UnixAddr>(
                    sock.as_raw_fd(),
                    &iov,
                    &cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )?)
            });
            match sent {
                Ok(result) => return result.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one message and the descriptor that rode with it (close-on-exec).
    /// `Ok(None)` means the peer closed the connection or its process died. A packet
    /// that is too big, not JSON of type `T`, or carries more than one descriptor is
    /// an `InvalidData` error; its descriptors are closed and the connection stays
    /// usable for the next message.
    pub async fn recv<T: DeserializeOwned>(&self) -> io::Result<Option<(T, Option<OwnedFd>)>> {
        // One byte more than allowed, so an oversized packet shows up as MSG_TRUNC.
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let (len, truncated, mut fds) = loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|sock| recv_packet(sock.get_ref().as_fd(), &mut buf)) {
                Ok(Ok(r)) => break r,
                // A peer that dies with unread data in its queue resets the connection.
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        };
        // A SEQPACKET read of zero bytes is end of stream; the protocol never sends
        // an empty packet, JSON cannot be empty.
        if len == 0 && !truncated && fds.is_empty() {
            return Ok(None);
        }
        let invalid = |m: String| Err(io::Error::new(io::ErrorKind::InvalidData, m));
        if truncated {
            return invalid(format!(
                "attach message over the {MAX_MESSAGE}-byte limit; dropped"
            ));
        }
        if fds.len() > 1 {
            return invalid(format!(
                "attach message carried {} descriptors, at most one is allowed; dropped",
                fds.len()
            ));
        }
        match serde_json::from_slice::<T>(&buf[..len]) {
            Ok(msg) => Ok(Some((msg, fds.pop()))),
            Err(e) => invalid(format!("malformed attach message ({e}); dropped")),
        }
    }

    /// The network namespace of the process that connected (the other end). The
    /// kernel creates the accepted end of a Unix connection in the connecting
    /// socket's namespace, so SIOCGSKNS on it names the peer's namespace: no peer can
    /// forge it, and a router without CAP_SYS_ADMIN cannot create a socket in another
    /// namespace. Needs CAP_NET_ADMIN over that namespace (discovery has it).
    pub fn peer_netns(&self) -> io::Result<OwnedFd> {
        // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor or -1.
        let raw = unsafe { libc::ioctl(self.fd.get_ref().as_raw_fd(), SIOCGSKNS as _) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just opened this descriptor for us (close-on-exec).
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    /// True once the peer has closed its end or its process has died (POLLHUP),
    /// without consuming anything. Messages it sent before closing may still be
    /// waiting for `recv`.
    pub fn peer_closed(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.get_ref().as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0
    }
}

impl AsFd for AttachSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

/// One recvmsg: (bytes, truncated, descriptors received). Descriptors are owned
/// immediately so that every early return closes them.
fn recv_packet(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, bool, Vec<OwnedFd>)> {
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg_buf),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel installed these descriptors for us; nothing else owns them.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    Ok((msg.bytes, msg.flags.contains(MsgFlags::MSG_TRUNC), fds))
}
