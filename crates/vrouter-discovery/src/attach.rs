//! Discovery's end of the sockets: the shared attach socket (`discovery.sock`, which
//! every router reaches) and the admin socket (`admin.sock` in discovery's private
//! directory, which routers never mount).
//!
//! On the attach socket a connection acts only for its own stack. Each connection is
//! counted against its peer's network namespace (the namespace the connecting socket
//! was created in, from the socket itself), so a flood from one router is cut at
//! [`MAX_CONNECTIONS_PER_NETNS`] while others still get in. Registration and leave
//! are decided on the control loop (`Controller::register`, `Controller::leave`),
//! which checks that the namespace holds the stack's router address (`holder`).
//! Admin commands are answered only on the admin socket.

use crate::registry::ConnId;
use crate::run::Input;
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;
use vrouter_state::attach::{
    AdminMessage, AttachListener, AttachSocket, DiscoveryMessage, NetnsKey, RouterMessage,
    ADMIN_SOCKET,
};

/// Open attach connections from one network namespace. A router needs one, plus one
/// for `vrouter-router leave` and an overlap while it reconnects.
pub const MAX_CONNECTIONS_PER_NETNS: usize = 8;
/// Open attach connections in all (each holds a descriptor here).
pub const MAX_CONNECTIONS: usize = 512;
/// After a refused registration or leave, a connection's next message waits this
/// long: each check costs the control loop kernel dumps, and a router retries every
/// 5 s anyway.
pub const REFUSAL_PAUSE: Duration = Duration::from_secs(1);

/// The namespace a connection came from, for the loop's checks: its key and a
/// descriptor of it (closed when the check is done, so a stopped router's namespace
/// is not kept alive).
#[derive(Debug)]
pub struct Peer {
    pub key: NetnsKey,
    pub ns: OwnedFd,
}

impl Peer {
    fn of(sock: &AttachSocket) -> std::io::Result<Peer> {
        let ns = sock.peer_netns()?;
        Ok(Peer {
            key: NetnsKey::of(ns.as_fd())?,
            ns,
        })
    }
}

/// Open connections counted per peer namespace. Pure.
#[derive(Debug, Default)]
pub struct Admission {
    per_netns: BTreeMap<NetnsKey, usize>,
    total: usize,
    /// Namespaces refused since they last dropped under their cap (one event each).
    reported: BTreeSet<NetnsKey>,
}

/// Why a connection was turned away, and whether this is news for events.log.
#[derive(Debug, PartialEq, Eq)]
pub struct Turned {
    pub reason: String,
    pub first: bool,
}

impl Admission {
    /// Counts a new connection from `ns`, or refuses it.
    pub fn admit(&mut self, ns: NetnsKey) -> Result<(), Turned> {
        let n = self.per_netns.get(&ns).copied().unwrap_or(0);
        let reason = if n >= MAX_CONNECTIONS_PER_NETNS {
            format!(
                "{n} attach connections are already open from this network namespace ({ns}); at most {MAX_CONNECTIONS_PER_NETNS} are accepted from one router. Close the others (a router needs one)"
            )
        } else if self.total >= MAX_CONNECTIONS {
            format!(
                "{} attach connections are open on this host, the most discovery accepts; try again later",
                self.total
            )
        } else {
            self.per_netns.insert(ns, n + 1);
            self.total += 1;
            return Ok(());
        };
        let first = self.reported.insert(ns);
        Err(Turned { reason, first })
    }

    /// A connection from `ns` closed.
    pub fn release(&mut self, ns: NetnsKey) {
        if let Some(n) = self.per_netns.get_mut(&ns) {
            *n -= 1;
            self.total -= 1;
            if *n == 0 {
                self.per_netns.remove(&ns);
                self.reported.remove(&ns);
            }
        }
    }

    pub fn open(&self) -> usize {
        self.total
    }
}

pub(crate) async fn accept_loop(listener: AttachListener, tx: mpsc::Sender<Input>) {
    let admission = Arc::new(Mutex::new(Admission::default()));
    let mut next: ConnId = 1;
    loop {
        let sock = match listener.accept().await {
            Ok(sock) => sock,
            Err(e) => {
                warn!("attach socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let key = match Peer::of(&sock) {
            Ok(p) => p.key,
            Err(e) => {
                let reason = format!(
                    "discovery cannot tell this connection's network namespace ({e}); it needs CAP_NET_ADMIN over the router's namespace"
                );
                warn!("attach connection refused: {reason}");
                tokio::spawn(async move {
                    let reply = DiscoveryMessage::Refused { reason };
                    let _ =
                        tokio::time::timeout(Duration::from_millis(100), sock.send(&reply, None))
                            .await;
                });
                continue;
            }
        };
        let admitted = admission.lock().unwrap().admit(key);
        if let Err(turned) = admitted {
            // Best effort: the reply must not hold up the accept loop.
            let reply = DiscoveryMessage::Refused {
                reason: turned.reason.clone(),
            };
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_millis(100), sock.send(&reply, None)).await;
            });
            if turned.first {
                let _ = tx.try_send(Input::AttachRefused {
                    reason: turned.reason,
                });
            }
            continue;
        }
        let conn = next;
        next += 1;
        let admission = admission.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            serve(conn, Arc::new(sock), tx).await;
            admission.lock().unwrap().release(key);
        });
    }
}

/// The reply to a message that is not one of the attach protocol's.
fn malformed_reply(e: &std::io::Error) -> DiscoveryMessage {
    let mut reason = e.to_string();
    if reason.contains("leave_mesh") || reason.contains("rotate_key") {
        reason.push_str(
            "; admin commands are not accepted on the shared socket: run `vrouter-discovery leave-mesh` (or rotate-key) in the discovery container (it uses admin.sock in discovery's private directory)",
        );
    }
    DiscoveryMessage::Refused { reason }
}

/// Hands a request that needs the connecting namespace to the event loop and waits for
/// its answer. `None` when the loop is gone; `Some(None)` when it dropped the reply.
async fn ask(
    sock: &AttachSocket,
    tx: &mpsc::Sender<Input>,
    input: impl FnOnce(Peer, oneshot::Sender<DiscoveryMessage>) -> Input,
) -> Option<Option<DiscoveryMessage>> {
    let peer = match Peer::of(sock) {
        Ok(peer) => peer,
        Err(e) => {
            return Some(Some(DiscoveryMessage::Refused {
                reason: format!("cannot tell the connection's network namespace: {e}"),
            }))
        }
    };
    let (rtx, rrx) = oneshot::channel();
    tx.send(input(peer, rtx)).await.ok()?;
    Some(rrx.await.ok())
}

async fn serve(conn: ConnId, sock: Arc<AttachSocket>, tx: mpsc::Sender<Input>) {
    loop {
        let msg = match sock.recv::<RouterMessage>().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                warn!("malformed message on attach connection {conn}: {e}");
                if sock.send(&malformed_reply(&e), None).await.is_err() {
                    break;
                }
                continue;
            }
            Err(e) => {
                warn!("attach connection {conn} failed: {e}");
                break;
            }
        };
        let (message, fd) = msg;
        let reply = match message {
            RouterMessage::Ack { generation } => {
                let _ = tx.send(Input::Ack { conn, generation }).await;
                None
            }
            RouterMessage::Register(reg) => {
                match ask(&sock, &tx, |peer, reply| Input::Register {
                    conn,
                    reg,
                    fd,
                    peer,
                    reply,
                })
                .await
                {
                    Some(reply) => reply,
                    None => break,
                }
            }
            RouterMessage::Leave { stack } => {
                match ask(&sock, &tx, |peer, reply| Input::Leave {
                    conn,
                    stack,
                    peer,
                    reply,
                })
                .await
                {
                    Some(reply) => reply,
                    None => break,
                }
            }
        };
        if let Some(r) = reply {
            let refused = matches!(r, DiscoveryMessage::Refused { .. });
            if let Err(e) = sock.send(&r, None).await {
                warn!("attach connection {conn}: reply failed: {e}");
                break;
            }
            if refused {
                tokio::time::sleep(REFUSAL_PAUSE).await;
            }
        }
    }
    let _ = tx.send(Input::Closed { conn }).await;
}

/// Binds `admin.sock` in the private directory, opened like every private file's
/// directory (created or tightened to 0700). The socket is 0600: only discovery's own
/// user reaches it.
pub fn bind_admin(private_dir: &Path) -> std::io::Result<AttachListener> {
    vrouter_state::PrivateDir::open(private_dir).map_err(std::io::Error::other)?;
    let path = private_dir.join(ADMIN_SOCKET);
    let listener = AttachListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub(crate) async fn admin_loop(listener: AttachListener, tx: mpsc::Sender<Input>) {
    loop {
        match listener.accept().await {
            Ok(sock) => {
                tokio::spawn(serve_admin(sock, tx.clone()));
            }
            Err(e) => {
                warn!("admin socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_admin(sock: AttachSocket, tx: mpsc::Sender<Input>) {
    loop {
        let reply = match sock.recv::<AdminMessage>().await {
            Ok(Some((command, _))) => {
                let (rtx, rrx) = oneshot::channel();
                let input = match command {
                    AdminMessage::LeaveMesh => Input::LeaveMesh { reply: rtx },
                    AdminMessage::RotateKey => Input::RotateKey { reply: rtx },
                };
                if tx.send(input).await.is_err() {
                    return;
                }
                match rrx.await {
                    Ok(r) => r,
                    Err(_) => return,
                }
            }
            Ok(None) => return,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => DiscoveryMessage::Refused {
                reason: e.to_string(),
            },
            Err(e) => {
                warn!("admin connection failed: {e}");
                return;
            }
        };
        if sock.send(&reply, None).await.is_err() {
            return;
        }
    }
}

/// Sends one admin command to the running discovery and returns its answer.
async fn admin(
    private_dir: &Path,
    command: AdminMessage,
    name: &str,
) -> anyhow::Result<Option<DiscoveryMessage>> {
    let path = private_dir.join(ADMIN_SOCKET);
    let socket = AttachSocket::connect(&path).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach discovery's admin socket at {} ({e}); run this inside the discovery container (docker exec <discovery> vrouter-discovery {name}), with the same VROUTER_STATE_DIR / VROUTER_PRIVATE_DIR",
            path.display()
        )
    })?;
    socket.send(&command, None).await?;
    let answer = tokio::time::timeout(Duration::from_secs(5), socket.recv::<DiscoveryMessage>())
        .await
        .map_err(|_| anyhow::anyhow!("discovery did not answer {name} within 5 s"))??;
    Ok(answer.map(|(m, _)| m))
}

/// `vrouter-discovery rotate-key`: asks the running discovery, through its admin
/// socket, to start a WireGuard key rotation.
pub async fn rotate_key(private_dir: &Path) -> anyhow::Result<()> {
    match admin(private_dir, AdminMessage::RotateKey, "rotate-key").await? {
        Some(DiscoveryMessage::Rotating { old, new }) => {
            println!("key rotation started: {old} -> {new}; it completes once every routed peer uses the new key (events: key_rotation_completed)");
            Ok(())
        }
        Some(DiscoveryMessage::Refused { reason }) => anyhow::bail!("{reason}"),
        other => anyhow::bail!("unexpected answer from discovery: {other:?}"),
    }
}

/// `vrouter-discovery leave-mesh`: asks the running discovery, through its admin
/// socket, to leave the mesh.
pub async fn leave_mesh(private_dir: &Path) -> anyhow::Result<()> {
    let answer = admin(private_dir, AdminMessage::LeaveMesh, "leave-mesh")
        .await?
        .map(|m| (m, ()));
    match answer {
        Some((DiscoveryMessage::Left, _)) => {
            println!("left the mesh: every other host withdraws this host's stacks");
            Ok(())
        }
        Some((DiscoveryMessage::Refused { reason }, _)) => anyhow::bail!("{reason}"),
        other => anyhow::bail!("unexpected answer from discovery: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(ino: u64) -> NetnsKey {
        NetnsKey { dev: 4, ino }
    }

    #[test]
    fn connections_are_capped_per_namespace() {
        let mut a = Admission::default();
        for _ in 0..MAX_CONNECTIONS_PER_NETNS {
            a.admit(ns(1)).unwrap();
        }
        let t = a.admit(ns(1)).unwrap_err();
        assert!(t.first && t.reason.contains("at most 8"), "{t:?}");
        // One event per namespace, not one per refused connection.
        assert!(!a.admit(ns(1)).unwrap_err().first);
        // Another router still gets in.
        a.admit(ns(2)).unwrap();
        assert_eq!(a.open(), MAX_CONNECTIONS_PER_NETNS + 1);
        a.release(ns(1));
        a.admit(ns(1)).unwrap();
        for _ in 0..MAX_CONNECTIONS_PER_NETNS {
            a.release(ns(1));
        }
        a.release(ns(1)); // nothing open: no underflow
        assert_eq!(a.open(), 1);
        // Back under the cap and refused again: news again.
        for _ in 0..MAX_CONNECTIONS_PER_NETNS {
            a.admit(ns(1)).unwrap();
        }
        assert!(a.admit(ns(1)).unwrap_err().first);
    }

    #[test]
    fn connections_are_capped_in_all() {
        let mut a = Admission::default();
        let mut i = 0;
        while a.open() < MAX_CONNECTIONS {
            a.admit(ns(i / MAX_CONNECTIONS_PER_NETNS as u64)).unwrap();
            i += 1;
        }
        let t = a.admit(ns(100_000)).unwrap_err();
        assert!(t.reason.contains("the most discovery accepts"), "{t:?}");
    }

    #[test]
    fn leave_mesh_on_the_shared_socket_names_the_admin_path() {
        let e = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "malformed attach message (unknown variant `leave_mesh`, expected one of `register`, `ack`, `leave`); dropped",
        );
        let DiscoveryMessage::Refused { reason } = malformed_reply(&e) else {
            panic!()
        };
        assert!(reason.contains("vrouter-discovery leave-mesh"), "{reason}");
    }
}
