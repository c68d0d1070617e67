//! The router's end of the attach protocol: connecting to discovery, registering,
//! acknowledging generations, and `vrouter-router leave`.
//!
//! Discovery may be absent or restarting at any time; the router then keeps its
//! kernel state (the datapath is headless) and reconnects with a short bounded
//! backoff. The connection staying open is how discovery knows the router lives, so
//! the router never closes it on purpose except to start over.
//!
//! A registration carries whether the router's access table tracks connections
//! (`Registration.conntrack`, issue 15): discovery's port steering then sends the
//! stack's outgoing frames through the router, else straight into the tunnel. When a
//! policy reload (or a table closed or opened again) changes it, the router registers
//! again on the open connection ([`conntrack_changed`]), without asking for a link.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use vrouter_state::attach::{AttachSocket, DiscoveryMessage, Registration, RouterMessage};
use vrouter_state::{StackName, StackSpec};

/// First and last delay between connection attempts while discovery is away.
pub const RECONNECT_MIN: Duration = Duration::from_millis(200);
pub const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// Delay before registering again after a refusal: not a crash loop, not a hang.
pub const REFUSED_RETRY: Duration = Duration::from_secs(5);
/// How long a registration may go unanswered before the router starts over.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `leave` waits for discovery's answer.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The next delay in the reconnect backoff.
pub fn next_backoff(current: Duration) -> Duration {
    (current * 2).clamp(RECONNECT_MIN, RECONNECT_MAX)
}

/// Where the conversation with discovery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No connection; the next attempt is due at `retry_at`.
    Disconnected,
    /// Register sent, no answer yet.
    Awaiting { since: Instant, needs_link: bool },
    /// Discovery accepted the registration on this connection.
    Registered,
}

/// The connection to discovery and what was said on it.
pub struct DiscoveryConn {
    pub socket: Option<Arc<AttachSocket>>,
    pub phase: Phase,
    pub retry_at: Instant,
    backoff: Duration,
    /// Highest generation acknowledged on this connection.
    pub acked: Option<u64>,
    /// The `conntrack` of the last registration sent on this connection.
    pub conntrack: Option<bool>,
    /// Whether the last failure to connect was already logged (log once per outage).
    outage_logged: bool,
}

impl Default for DiscoveryConn {
    fn default() -> Self {
        DiscoveryConn {
            socket: None,
            phase: Phase::Disconnected,
            retry_at: Instant::now(),
            backoff: RECONNECT_MIN,
            acked: None,
            conntrack: None,
            outage_logged: false,
        }
    }
}

impl DiscoveryConn {
    /// Tries to connect; on failure schedules the next attempt.
    pub async fn connect(&mut self, path: &Path) -> bool {
        match AttachSocket::connect(path).await {
            Ok(s) => {
                if self.outage_logged {
                    tracing::info!("connected to discovery");
                } else {
                    tracing::debug!("connected to discovery");
                }
                self.socket = Some(Arc::new(s));
                self.backoff = RECONNECT_MIN;
                self.outage_logged = false;
                self.acked = None;
                self.conntrack = None;
                true
            }
            Err(e) => {
                let away = matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                );
                if !self.outage_logged {
                    if away {
                        tracing::info!(socket = %path.display(), "discovery is not running; keeping the current routes and retrying");
                    } else {
                        tracing::warn!(socket = %path.display(), error = %e, "cannot connect to discovery; retrying (check the state directory's bind mount and permissions)");
                    }
                    self.outage_logged = true;
                }
                self.disconnect_for(self.backoff);
                self.backoff = next_backoff(self.backoff);
                false
            }
        }
    }

    /// Drops the connection; the next attempt is due after `delay`.
    pub fn disconnect_for(&mut self, delay: Duration) {
        self.socket = None;
        self.phase = Phase::Disconnected;
        self.acked = None;
        self.conntrack = None;
        self.retry_at = Instant::now() + delay;
    }

    /// Sends Register, with this namespace's descriptor when a link is needed;
    /// `conntrack`: whether the access table in force tracks connections.
    pub async fn register(
        &mut self,
        spec: &StackSpec,
        needs_link: bool,
        conntrack: bool,
    ) -> io::Result<()> {
        let Some(socket) = self.socket.clone() else {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        };
        let msg = RouterMessage::Register(Registration {
            spec: spec.clone(),
            needs_link,
            conntrack,
        });
        if needs_link {
            // The descriptor travels as SCM_RIGHTS; discovery moves the new link
            // through it (IFLA_NET_NS_FD) without entering the namespace.
            let ns = File::open("/proc/self/ns/net")?;
            socket.send(&msg, Some(ns.as_fd())).await?;
        } else {
            socket.send(&msg, None).await?;
        }
        tracing::info!(
            needs_link,
            conntrack,
            "registered with discovery, awaiting the answer"
        );
        self.phase = Phase::Awaiting {
            since: Instant::now(),
            needs_link,
        };
        self.conntrack = Some(conntrack);
        Ok(())
    }

    /// Whether to register again because the access table's conntrack changed.
    pub fn conntrack_changed(&self, now: bool) -> bool {
        conntrack_changed(self.phase, self.conntrack, now)
    }

    /// Acknowledges `generation` unless it already was on this connection.
    pub async fn ack(&mut self, generation: u64) -> io::Result<()> {
        if self.phase != Phase::Registered || self.acked == Some(generation) {
            return Ok(());
        }
        let Some(socket) = self.socket.clone() else {
            return Ok(());
        };
        socket
            .send(&RouterMessage::Ack { generation }, None)
            .await?;
        tracing::debug!(generation, "acknowledged routes.json generation");
        self.acked = Some(generation);
        Ok(())
    }
}

/// Whether the router must register again on its connection: discovery accepted a
/// registration whose `conntrack` (`sent`) is not the table's now. While an answer is
/// awaited nothing is sent (it is checked again once the answer came); without a
/// connection the next registration carries the new value anyway. Pure.
pub fn conntrack_changed(phase: Phase, sent: Option<bool>, now: bool) -> bool {
    phase == Phase::Registered && sent.is_some_and(|s| s != now)
}

/// Waits for the next message on `socket`, or forever without one.
pub async fn recv(
    socket: Option<Arc<AttachSocket>>,
) -> io::Result<Option<(DiscoveryMessage, bool)>> {
    match socket {
        Some(s) => Ok(s
            .recv::<DiscoveryMessage>()
            .await?
            // A descriptor is never expected from discovery; it is closed on drop.
            .map(|(m, fd)| (m, fd.is_some()))),
        None => std::future::pending().await,
    }
}

/// `vrouter-router leave`: withdraws the stack now and waits for discovery's answer.
pub async fn leave(socket_path: &Path, stack: &StackName) -> anyhow::Result<()> {
    let socket = AttachSocket::connect(socket_path).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach discovery at {} ({e}); start vrouter-discovery on this host (it withdraws the stack itself a few seconds after the router stops), or check VROUTER_STATE_DIR",
            socket_path.display()
        )
    })?;
    socket
        .send(
            &RouterMessage::Leave {
                stack: stack.clone(),
            },
            None,
        )
        .await?;
    let answer = tokio::time::timeout(LEAVE_TIMEOUT, async {
        loop {
            match socket.recv::<DiscoveryMessage>().await? {
                Some((DiscoveryMessage::Left, _)) => return Ok(()),
                Some((DiscoveryMessage::Refused { reason }, _)) => {
                    anyhow::bail!("discovery refused to withdraw stack {stack}: {reason}")
                }
                Some((other, _)) => tracing::debug!(?other, "ignored while leaving"),
                None => anyhow::bail!(
                    "discovery closed the connection before confirming that stack {stack} left"
                ),
            }
        }
    })
    .await;
    match answer {
        Ok(r) => r,
        Err(_) => anyhow::bail!(
            "discovery did not confirm within {}s that stack {stack} left; check its log",
            LEAVE_TIMEOUT.as_secs()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded() {
        let mut d = RECONNECT_MIN;
        let mut seen = vec![d];
        for _ in 0..6 {
            d = next_backoff(d);
            seen.push(d);
        }
        assert_eq!(seen[0], Duration::from_millis(200));
        assert_eq!(seen[1], Duration::from_millis(400));
        assert_eq!(seen[2], Duration::from_millis(800));
        assert!(seen[3..].iter().all(|d| *d == RECONNECT_MAX));
    }

    #[test]
    fn a_changed_conntrack_registers_again_only_once_registered() {
        let awaiting = Phase::Awaiting {
            since: Instant::now(),
            needs_link: false,
        };
        assert!(conntrack_changed(Phase::Registered, Some(true), false));
        assert!(conntrack_changed(Phase::Registered, Some(false), true));
        assert!(!conntrack_changed(Phase::Registered, Some(true), true));
        // Awaiting an answer: after it. Disconnected: the next registration says it.
        assert!(!conntrack_changed(awaiting, Some(true), false));
        assert!(!conntrack_changed(Phase::Disconnected, None, false));
        assert!(!conntrack_changed(Phase::Registered, None, false));
        // A connection dropped forgets what was said on it.
        let mut c = DiscoveryConn {
            phase: Phase::Registered,
            conntrack: Some(true),
            ..DiscoveryConn::default()
        };
        c.disconnect_for(Duration::ZERO);
        assert_eq!(c.conntrack, None);
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn absent_discovery_schedules_a_retry() {
        rt().block_on(async {
            let dir = std::env::temp_dir().join(format!("vr-attach-{}", std::process::id()));
            let mut c = DiscoveryConn::default();
            let before = Instant::now();
            assert!(!c.connect(&dir.join("discovery.sock")).await);
            assert!(c.socket.is_none());
            assert!(c.retry_at >= before + RECONNECT_MIN);
            assert!(!c.connect(&dir.join("discovery.sock")).await);
            assert!(c.retry_at >= Instant::now() + Duration::from_millis(300));
        })
    }

    #[test]
    fn register_and_ack_over_a_socket_pair() {
        rt().block_on(async {
            let (router, discovery) = AttachSocket::pair().unwrap();
            let mut c = DiscoveryConn {
                socket: Some(Arc::new(router)),
                ..DiscoveryConn::default()
            };
            let spec = StackSpec {
                name: StackName::new("a").unwrap(),
                vni: vrouter_state::Vni::new(1000).unwrap(),
                prefixes: vec!["10.1.0.0/24".parse().unwrap()],
                router_ip: "10.1.0.254".parse().unwrap(),
            };
            c.register(&spec, true, true).await.unwrap();
            let (msg, fd) = discovery.recv::<RouterMessage>().await.unwrap().unwrap();
            assert_eq!(
                msg,
                RouterMessage::Register(Registration {
                    spec: spec.clone(),
                    needs_link: true,
                    conntrack: true,
                })
            );
            assert_eq!(c.conntrack, Some(true));
            assert!(fd.is_some(), "namespace descriptor attached");
            assert!(matches!(
                c.phase,
                Phase::Awaiting {
                    needs_link: true,
                    ..
                }
            ));
            // No ack before discovery answered.
            c.ack(3).await.unwrap();
            c.phase = Phase::Registered;
            c.ack(3).await.unwrap();
            c.ack(3).await.unwrap();
            c.ack(4).await.unwrap();
            let (m, _) = discovery.recv::<RouterMessage>().await.unwrap().unwrap();
            assert_eq!(m, RouterMessage::Ack { generation: 3 });
            let (m, _) = discovery.recv::<RouterMessage>().await.unwrap().unwrap();
            assert_eq!(m, RouterMessage::Ack { generation: 4 });
            // The policy became the default: registered again, no link asked for.
            assert!(c.conntrack_changed(false));
            assert!(!c.conntrack_changed(true));
            c.register(&spec, false, false).await.unwrap();
            let (msg, fd) = discovery.recv::<RouterMessage>().await.unwrap().unwrap();
            assert_eq!(
                msg,
                RouterMessage::Register(Registration {
                    spec: spec.clone(),
                    needs_link: false,
                    conntrack: false,
                })
            );
            assert!(fd.is_none());
            c.phase = Phase::Registered;
            assert!(!c.conntrack_changed(false));
            // Discovery going away is a None, not an error.
            discovery
                .send(&DiscoveryMessage::Registered, None)
                .await
                .unwrap();
            drop(discovery);
            let got = recv(c.socket.clone()).await.unwrap();
            assert_eq!(got, Some((DiscoveryMessage::Registered, false)));
            assert_eq!(recv(c.socket.clone()).await.unwrap(), None);
        })
    }
}
