//! Same-host block detection. Docker 28.2+ drops packets that enter the host from one
//! bridge addressed to a container of another protected bridge, which is exactly the
//! path from a service of stack A to a service of same-host stack C. The router finds
//! out by sending a probe to C's router marked with [`PROBE_MARK`]: its own policy rule
//! sends marked packets out through the host (the stack network's gateway) instead of
//! over the overlay, so the probe takes a service's path. If Docker lets it through,
//! the host steers it back to this router, which forwards it over the overlay to C,
//! whose echo comes straight back over the overlay.
//!
//! Every router answers probes with an echo responder on `router_ip:probe_port`.

use crate::desired::{SameHostPeer, PROBE_MARK};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;
use tokio::net::UdpSocket;
use vrouter_state::StackName;

const PROBE_MAGIC: &[u8] = b"vrouter-probe ";
const ECHO_MAGIC: &[u8] = b"vrouter-echo ";
/// Tries per probe round, and how long each waits for the echo.
pub const PROBE_TRIES: u32 = 3;
pub const PROBE_WAIT: Duration = Duration::from_millis(1000);
/// Time between probe rounds.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// Whether the kernel accepts, on the stack interface, a packet whose source is one
/// of the router's own addresses. A marked probe comes back from the host with the
/// router's own address as its source; without `accept_local` the kernel drops it as
/// a martian and every probe would report a block that is not there. `all` and the
/// device's value are ORed by the kernel.
pub fn accept_local_on(all: Option<&str>, dev: Option<&str>) -> bool {
    let on = |v: Option<&str>| v.is_some_and(|v| v.trim() == "1");
    on(all) || on(dev)
}

/// Reads `accept_local` for `ifname` from /proc/sys (readable with a read-only /proc/sys).
pub fn accept_local_enabled(ifname: &str) -> bool {
    let read = |dev: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{dev}/accept_local")).ok()
    };
    let dev = if ifname.is_empty() || ifname.contains('/') {
        None
    } else {
        read(ifname)
    };
    accept_local_on(read("all").as_deref(), dev.as_deref())
}

/// Why same-host probing is off, and the fix (an event at start).
pub fn accept_local_fix(ifname: &str) -> String {
    format!(
        "same-host probes are off: net.ipv4.conf.all.accept_local (or .{ifname}.accept_local) is 0 in the router's namespace, so a probe returning through the host would be dropped as a martian; add sysctls: {{net.ipv4.conf.all.accept_local: 1}} to the router service to detect Docker's same-host block"
    )
}

/// The echo for a probe datagram, or None for anything else (the responder answers
/// only probes, so it cannot be used to reflect arbitrary traffic).
pub fn echo_for(datagram: &[u8]) -> Option<Vec<u8>> {
    let nonce = datagram.strip_prefix(PROBE_MAGIC)?;
    if nonce.is_empty() || nonce.len() > 64 {
        return None;
    }
    Some([ECHO_MAGIC, nonce].concat())
}

fn probe_datagram(nonce: u64) -> Vec<u8> {
    [PROBE_MAGIC, nonce.to_string().as_bytes()].concat()
}

fn is_echo_of(datagram: &[u8], nonce: u64) -> bool {
    datagram.strip_prefix(ECHO_MAGIC) == Some(nonce.to_string().as_bytes())
}

/// Answers probes on `addr` until the task is dropped.
pub async fn respond(socket: UdpSocket) {
    let mut buf = [0u8; 128];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, from)) => {
                if let Some(echo) = echo_for(&buf[..n]) {
                    if let Err(e) = socket.send_to(&echo, from).await {
                        tracing::debug!(%from, error = %e, "probe echo not sent");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "probe responder receive failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Binds the echo responder.
pub async fn bind_responder(router_ip: Ipv4Addr, port: u16) -> std::io::Result<UdpSocket> {
    UdpSocket::bind(SocketAddrV4::new(router_ip, port)).await
}

/// Sends up to [`PROBE_TRIES`] marked probes from `router_ip` to `target` and reports
/// whether an echo came back.
pub async fn probe(router_ip: Ipv4Addr, target: Ipv4Addr, port: u16) -> std::io::Result<bool> {
    let std_sock = std::net::UdpSocket::bind(SocketAddrV4::new(router_ip, 0))?;
    // SO_MARK needs CAP_NET_ADMIN, which the router keeps for this among others.
    nix::sys::socket::setsockopt(&std_sock, nix::sys::socket::sockopt::Mark, &PROBE_MARK)
        .map_err(std::io::Error::from)?;
    std_sock.set_nonblocking(true)?;
    let sock = UdpSocket::from_std(std_sock)?;
    sock.connect(SocketAddrV4::new(target, port)).await?;
    let mut buf = [0u8; 128];
    for _ in 0..PROBE_TRIES {
        let nonce = nonce();
        if let Err(e) = sock.send(&probe_datagram(nonce)).await {
            // No route or a refused ICMP from the last try: count it as a lost try.
            tracing::debug!(%target, error = %e, "probe not sent");
        }
        let deadline = tokio::time::Instant::now() + PROBE_WAIT;
        loop {
            match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                Err(_elapsed) => break,
                Ok(Ok(n)) if is_echo_of(&buf[..n], nonce) => return Ok(true),
                // A late echo of an earlier try still proves the path.
                Ok(Ok(n)) if buf[..n].starts_with(ECHO_MAGIC) => return Ok(true),
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => {
                    tracing::debug!(%target, error = %e, "probe receive failed");
                    tokio::time::sleep_until(deadline).await;
                    break;
                }
            }
        }
    }
    Ok(false)
}

fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// One probe round's result for one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    pub peer: SameHostPeer,
    pub reachable: bool,
}

/// An event the tracker wants written: (kind, message).
pub type ProbeEvent = (&'static str, String);

/// Turns probe results into events, only when a peer's state changes: blocked the
/// first time it fails, ok when it answers again after having been blocked.
#[derive(Debug, Default)]
pub struct ProbeTracker {
    blocked: BTreeMap<SameHostPeer, bool>,
}

impl ProbeTracker {
    pub fn record(&mut self, own: &StackName, result: &ProbeResult) -> Option<ProbeEvent> {
        let was_blocked = self.blocked.insert(result.peer.clone(), !result.reachable);
        match (was_blocked, result.reachable) {
            (Some(true), true) => Some((
                "same_host_ok",
                format!(
                    "traffic from stack {own} to same-host stack {} passes again",
                    result.peer.stack
                ),
            )),
            (None | Some(false), false) => Some((
                "same_host_blocked",
                format!(
                    "traffic from stack {own} to same-host stack {} ({}) is dropped by Docker's firewall (Docker 28.2+ isolates bridges); set driver option com.docker.network.bridge.gateway_mode_ipv4=nat-unprotected on both stacks' networks, or daemon option allow-direct-routing",
                    result.peer.stack, result.peer.via
                ),
            )),
            _ => None,
        }
    }

    /// Forgets peers that are no longer same-host peers.
    pub fn retain(&mut self, peers: &BTreeSet<SameHostPeer>) {
        self.blocked.retain(|p, _| peers.contains(p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_local_is_ored() {
        assert!(!accept_local_on(None, None));
        assert!(!accept_local_on(Some("0\n"), Some("0\n")));
        assert!(accept_local_on(Some("1\n"), Some("0\n")));
        assert!(accept_local_on(Some("0\n"), Some("1\n")));
        assert!(accept_local_fix("eth0").contains("net.ipv4.conf.all.accept_local: 1"));
    }

    #[test]
    fn responder_answers_only_probes() {
        let p = probe_datagram(42);
        let echo = echo_for(&p).unwrap();
        assert!(is_echo_of(&echo, 42));
        assert!(!is_echo_of(&echo, 43));
        assert_eq!(echo_for(b"hello"), None);
        assert_eq!(echo_for(PROBE_MAGIC), None);
        assert_eq!(echo_for(&[PROBE_MAGIC, &[b'x'; 65]].concat()), None);
    }

    fn peer() -> SameHostPeer {
        SameHostPeer {
            stack: StackName::new("c").unwrap(),
            via: "10.3.0.254".parse().unwrap(),
        }
    }

    #[test]
    fn events_only_on_change() {
        let own = StackName::new("a").unwrap();
        let mut t = ProbeTracker::default();
        let ok = ProbeResult {
            peer: peer(),
            reachable: true,
        };
        let bad = ProbeResult {
            peer: peer(),
            reachable: false,
        };
        assert_eq!(t.record(&own, &ok), None);
        let (kind, msg) = t.record(&own, &bad).unwrap();
        assert_eq!(kind, "same_host_blocked");
        assert!(
            msg.contains("stack a") && msg.contains("stack c") && msg.contains("nat-unprotected"),
            "{msg}"
        );
        assert_eq!(t.record(&own, &bad), None);
        assert_eq!(t.record(&own, &ok).unwrap().0, "same_host_ok");
        assert_eq!(t.record(&own, &ok), None);
        // Forgotten peers start over.
        t.retain(&BTreeSet::new());
        assert_eq!(t.record(&own, &bad).unwrap().0, "same_host_blocked");
    }

    #[test]
    fn echo_round_trip_on_loopback() {
        // Without CAP_NET_ADMIN, SO_MARK fails; the responder half is still tested.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let responder = bind_responder(Ipv4Addr::LOCALHOST, 0).await.unwrap();
            let port = responder.local_addr().unwrap().port();
            let task = tokio::spawn(respond(responder));
            match probe(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, port).await {
                Ok(reachable) => assert!(reachable),
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
            }
            // Silence: a port nobody answers on.
            let quiet = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let qport = quiet.local_addr().unwrap().port();
            if let Ok(r) = probe(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, qport).await {
                assert!(!r);
            }
            task.abort();
        });
    }
}
