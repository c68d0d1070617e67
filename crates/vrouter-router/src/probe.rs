//! Same-host block detection. Docker 28.2+ drops packets that enter the host from one
//! bridge addressed to a container of another protected bridge, which is exactly the
//! path from a service of stack A to a service of same-host stack C. The rule sits in
//! the raw table's PREROUTING chain (`iifname != "br-C" ip daddr <container> drop`),
//! before routing.
//!
//! The router finds out with a UDP datagram to C's router that takes a service's path
//! and goes no further than the host:
//! - its socket names the stack interface as its output (IP_UNICAST_IF), so the route
//!   lookup skips the remote routes on the overlay link and takes the default route
//!   through the stack network's gateway (the host). No policy rule and no mark: a
//!   rule in the router's namespace would cost every forwarded packet a rule walk
//!   (the kernel looks up one merged table only while a namespace has no rules);
//! - its TTL is 1, so if the host routes it at all, forwarding expires it and the host
//!   answers ICMP Time Exceeded. `ip_forward` checks the TTL before the FORWARD hook,
//!   so Docker's filter rules do not matter; only the raw drop does;
//! - the socket has IP_RECVERR, so that ICMP error lands on its error queue, read with
//!   `recvmsg(MSG_ERRQUEUE)`.
//!
//! Time Exceeded means the path is open; silence after [`PROBE_TRIES`] tries means
//! Docker dropped it. No responder is needed on the peer and no sysctl in the router
//! (the answer comes from the host's address, not the router's own). Tries are spread
//! [`PROBE_SPACING`] apart because the host rate-limits ICMP errors per destination
//! (`net.ipv4.icmp_ratelimit`: one per second after a burst of six), and one answer
//! is enough.
//!
//! Only a stack whose traffic takes the policy-rule path needs this
//! ([`crosses_the_host`]): with port steering (issue 15, discovery.json's `steering`)
//! a service's frame for a same-host stack goes from its port straight to that
//! stack's router port, and never enters the host's IP stack, so the raw drop cannot
//! hit it and a probe through the host would report a path nobody uses.

use crate::desired::SameHostPeer;
use nix::sys::socket::{self, sockopt, ControlMessageOwned, MsgFlags, SockaddrIn};
use std::collections::{BTreeMap, BTreeSet};
use std::io::IoSliceMut;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use vrouter_state::EventKind;
use vrouter_state::{StackName, SteeringMode, SteeringStatus};

/// Destination port of probes. Nothing listens there: the datagram never gets past
/// the host (traceroute's first port, for whoever reads a capture).
pub const PROBE_PORT: u16 = 33434;
/// Probes per peer and round; one answer is enough.
pub const PROBE_TRIES: u32 = 3;
/// Time between tries. A peer's tries span a full second, so even when the host's
/// ICMP rate limit is spent (many same-host peers) one of them gets an answer.
pub const PROBE_SPACING: Duration = Duration::from_millis(500);
/// How long to wait for an answer after the last try.
pub const PROBE_WAIT: Duration = Duration::from_millis(1000);
/// Time between probe rounds.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(10);

const ICMP_TIME_EXCEEDED: u8 = 11;
/// `SO_EE_ORIGIN_ICMP`: the queued error came from an ICMP message.
const SO_EE_ORIGIN_ICMP: u8 = 2;

/// Whether one entry of the error queue answers the probe: only ICMP Time Exceeded
/// does (the host routed it). Local errors and unreachables say nothing. Pure.
pub fn is_answer(origin: u8, icmp_type: u8) -> bool {
    origin == SO_EE_ORIGIN_ICMP && icmp_type == ICMP_TIME_EXCEEDED
}

/// Sets an int-valued IPPROTO_IP option that nix has no wrapper for.
pub(crate) fn set_ipv4_option(
    sock: &std::net::UdpSocket,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: a valid descriptor, and a pointer to a c_int with its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets IP_UNICAST_IF: unicast datagrams of `sock` leave through link `oif` (routes
/// through other links are skipped in the lookup). Needs no capability.
fn set_unicast_if(sock: &std::net::UdpSocket, oif: u32) -> std::io::Result<()> {
    // The kernel reads the index of an IPv4 socket in network byte order.
    set_ipv4_option(sock, libc::IP_UNICAST_IF, oif.to_be() as libc::c_int)
}

/// Binds a probe socket: from `router_ip`, out through link `oif`, TTL 1, ICMP errors
/// queued.
fn probe_socket(router_ip: Ipv4Addr, oif: u32) -> std::io::Result<UdpSocket> {
    let sock = std::net::UdpSocket::bind(SocketAddrV4::new(router_ip, 0))?;
    set_unicast_if(&sock, oif)?;
    sock.set_ttl(1)?;
    socket::setsockopt(&sock, sockopt::Ipv4RecvErr, &true)?;
    sock.set_nonblocking(true)?;
    UdpSocket::from_std(sock)
}

/// One entry of a socket's error queue.
#[derive(Debug, Clone, Copy, Default)]
struct QueuedError {
    origin: u8,
    icmp_type: u8,
    icmp_code: u8,
    offender: Option<Ipv4Addr>,
}

/// Reads one entry of the socket's error queue; WouldBlock when it is empty.
fn read_error(sock: &UdpSocket) -> std::io::Result<QueuedError> {
    let mut buf = [0u8; 256];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in);
    let msg = socket::recvmsg::<SockaddrIn>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
    )?;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::Ipv4RecvErr(ee, offender) = c {
            return Ok(QueuedError {
                origin: ee.ee_origin,
                icmp_type: ee.ee_type,
                icmp_code: ee.ee_code,
                offender: offender.map(|a| Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))),
            });
        }
    }
    // An entry without an extended error: consumed, and no answer.
    Ok(QueuedError::default())
}

/// Waits until `deadline` for an answer on the error queue.
async fn answered(sock: &UdpSocket, target: Ipv4Addr, deadline: tokio::time::Instant) -> bool {
    loop {
        // The error queue makes the socket report EPOLLERR.
        let next = sock.async_io(Interest::ERROR, || read_error(sock));
        match tokio::time::timeout_at(deadline, next).await {
            Err(_elapsed) => return false,
            Ok(Ok(e)) if is_answer(e.origin, e.icmp_type) => return true,
            Ok(Ok(e)) => tracing::debug!(
                %target, origin = e.origin, icmp_type = e.icmp_type, icmp_code = e.icmp_code,
                offender = ?e.offender, "a probe error that is no answer"
            ),
            Ok(Err(e)) => {
                tracing::debug!(%target, error = %e, "reading the probe's error queue failed");
                tokio::time::sleep_until(deadline).await;
                return false;
            }
        }
    }
}

/// Sends up to [`PROBE_TRIES`] TTL-1 probes from `router_ip` out through the stack
/// interface `oif` to `target` and reports whether the host answered Time Exceeded,
/// i.e. whether the path through the host is open. Err only when the socket cannot be
/// set up.
pub async fn probe(router_ip: Ipv4Addr, oif: u32, target: Ipv4Addr) -> std::io::Result<bool> {
    let sock = probe_socket(router_ip, oif)?;
    let dest = SocketAddrV4::new(target, PROBE_PORT);
    for n in 1..=PROBE_TRIES {
        if let Err(e) = sock.send_to(b"vrouter-probe", dest).await {
            // An ICMP error also leaves a pending socket error, which a send reports
            // once; the entry stays on the error queue.
            tracing::debug!(%target, error = %e, "probe not sent");
        }
        let wait = if n < PROBE_TRIES {
            PROBE_SPACING
        } else {
            PROBE_WAIT
        };
        if answered(&sock, target, tokio::time::Instant::now() + wait).await {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether stack `own`'s same-host traffic goes through the host (the policy-rule
/// path), so the same-host probe applies: its steering mode in discovery.json is
/// `rule`; a stack not listed there yet takes the configured mode; no `steering`
/// section (a discovery without port steering, or no discovery.json) is `rule`. Pure.
pub fn crosses_the_host(steering: Option<&SteeringStatus>, own: &StackName) -> bool {
    let Some(s) = steering else {
        return true;
    };
    s.stacks.get(own).map_or(s.mode, |stack| stack.mode) == SteeringMode::Rule
}

/// One probe round's result for one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    pub peer: SameHostPeer,
    pub reachable: bool,
}

/// An event the tracker wants written: (kind, message).
pub type ProbeEvent = (EventKind, String);

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
                EventKind::SameHostOk,
                format!(
                    "traffic from stack {own} to same-host stack {} passes again",
                    result.peer.stack
                ),
            )),
            (None | Some(false), false) => Some((
                EventKind::SameHostBlocked,
                format!(
                    "traffic from stack {own} to same-host stack {} ({}) is dropped by Docker's firewall (Docker 28.2+ isolates bridges) on the policy-rule path; steer at the ports (VROUTER_STEERING=ports on discovery, the default; `vrouter-discovery status` says why a stack is not), or set driver option com.docker.network.bridge.gateway_mode_ipv4=nat-unprotected on both stacks' networks, or daemon option allow-direct-routing",
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
    fn only_time_exceeded_answers() {
        assert!(is_answer(SO_EE_ORIGIN_ICMP, 11));
        // Port/host unreachable, echo reply, a local error (origin 1): no answer.
        assert!(!is_answer(SO_EE_ORIGIN_ICMP, 3));
        assert!(!is_answer(SO_EE_ORIGIN_ICMP, 0));
        assert!(!is_answer(1, 11));
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
            msg.contains("stack a")
                && msg.contains("stack c")
                && msg.contains("VROUTER_STEERING=ports")
                && msg.contains("nat-unprotected"),
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
    fn only_stacks_on_the_policy_rule_path_are_probed() {
        use vrouter_state::StackSteering;
        let own = StackName::new("a").unwrap();
        let stack = |mode| StackSteering {
            mode,
            reason: None,
            ports: Vec::new(),
        };
        let status = |mode, stacks: Vec<(&str, SteeringMode)>| SteeringStatus {
            mode,
            table: "vrouter".into(),
            stacks: stacks
                .into_iter()
                .map(|(n, m)| (StackName::new(n).unwrap(), stack(m)))
                .collect(),
        };
        // An older discovery, or none: the host path.
        assert!(crosses_the_host(None, &own));
        // Steered at its ports: no probe; on the fallback or configured so: probe.
        use SteeringMode::{Ports, Rule};
        assert!(!crosses_the_host(
            Some(&status(Ports, vec![("a", Ports), ("b", Rule)])),
            &own
        ));
        assert!(crosses_the_host(
            Some(&status(Ports, vec![("a", Rule), ("b", Ports)])),
            &own
        ));
        assert!(crosses_the_host(
            Some(&status(Rule, vec![("a", Rule)])),
            &own
        ));
        // Not listed yet: the configured mode.
        assert!(!crosses_the_host(
            Some(&status(Ports, vec![("b", Rule)])),
            &own
        ));
        assert!(crosses_the_host(Some(&status(Rule, vec![])), &own));
        // The mode as discovery writes it.
        let file: SteeringStatus = serde_json::from_str(
            r#"{"mode":"ports","table":"vrouter","stacks":{"a":{"mode":"rule","reason":"router port not found yet"}}}"#,
        )
        .unwrap();
        assert!(crosses_the_host(Some(&file), &own));
    }

    #[test]
    fn loopback_gives_no_answer() {
        // On loopback nothing is forwarded, so nothing expires: the probe gets a port
        // unreachable (not an answer) and reports the path closed. No capability is
        // needed (lo is link 1 in every namespace).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let open = probe(Ipv4Addr::LOCALHOST, 1, Ipv4Addr::LOCALHOST)
                .await
                .unwrap();
            assert!(!open);
        });
    }
}
