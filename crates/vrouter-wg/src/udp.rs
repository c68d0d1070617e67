//! The engine's UDP socket with segmentation offload both ways: a batch of equal-size
//! datagrams to one peer leaves in one sendmsg(2) with UDP_SEGMENT (the kernel cuts
//! it, as late as the device allows), and UDP_GRO hands over runs of coalesced
//! datagrams in one recvmsg(2). Kernels without them (before 4.18 / 5.0) get one
//! datagram per call.
//!
//! Hidden knob for the benchmark (`vrt-enc-bench`): `VROUTER_WG_UDP_OFFLOAD=off` in the
//! process environment turns both off (one sendmsg/recvmsg per datagram), so what they
//! change is measured, not assumed. Anything else, or unset, leaves them on.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

// include/uapi/linux/udp.h
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// At most this many segments per GSO send (the kernel's UDP_MAX_SEGMENTS is 128).
pub(crate) const MAX_SEGMENTS: usize = 64;
/// Payload bytes of one GSO send (IPv4 total length is 16 bits).
pub(crate) const MAX_GSO_BYTES: usize = 65_000;

pub(crate) struct Udp {
    pub(crate) sock: UdpSocket,
    gso: AtomicBool,
}

/// A run of datagrams received at once: all `segment` bytes long but the last.
pub(crate) struct Received {
    pub len: usize,
    pub from: SocketAddr,
    pub segment: usize,
}

/// Whether `VROUTER_WG_UDP_OFFLOAD` (the benchmark's knob) leaves GSO/GRO on. Pure.
pub(crate) fn offload_enabled(value: Option<&str>) -> bool {
    !matches!(
        value.map(str::trim),
        Some("off") | Some("0") | Some("false")
    )
}

impl Udp {
    pub(crate) fn new(sock: UdpSocket) -> Udp {
        let offload = offload_enabled(std::env::var("VROUTER_WG_UDP_OFFLOAD").ok().as_deref());
        if !offload {
            tracing::info!("VROUTER_WG_UDP_OFFLOAD=off: no UDP segmentation or receive offload");
        }
        let one: libc::c_int = 1;
        if offload {
            // SAFETY: an int option on a valid socket; failure only means no GRO.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    SOL_UDP,
                    UDP_GRO,
                    (&one as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        Udp {
            sock,
            gso: AtomicBool::new(offload),
        }
    }

    /// Sends `data`, a run of datagrams of `segment` bytes each (the last may be
    /// shorter), to `to`. Errors are dropped packets, as on a NIC.
    pub(crate) fn send_segments(&self, data: &[u8], segment: usize, to: SocketAddr) {
        if data.len() <= segment {
            self.send(data, to);
            return;
        }
        if self.gso.load(Ordering::Relaxed) {
            match self.send_gso(data, segment, to) {
                Ok(()) => return,
                // No UDP GSO on this kernel or route: one datagram at a time from now.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL)
                            | Some(libc::EIO)
                            | Some(libc::ENOPROTOOPT)
                            | Some(libc::EOPNOTSUPP)
                    ) =>
                {
                    tracing::info!(error = %e, "UDP segmentation offload unavailable; sending datagrams one by one");
                    self.gso.store(false, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::trace!(error = %e, %to, "wireguard: udp gso send");
                    return;
                }
            }
        }
        for chunk in data.chunks(segment) {
            self.send(chunk, to);
        }
    }

    pub(crate) fn send(&self, datagram: &[u8], to: SocketAddr) {
        if let Err(e) = self.sock.send_to(datagram, to) {
            tracing::trace!(error = %e, %to, "wireguard: udp send");
        }
    }

    fn send_gso(&self, data: &[u8], segment: usize, to: SocketAddr) -> io::Result<()> {
        let SocketAddr::V4(to) = to else {
            return Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT));
        };
        let mut addr = sockaddr_in(to);
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // u64 alignment covers cmsghdr's.
        let mut control = [0u64; 4];
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
        let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
        msg.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `control`, large enough for one u16 cmsg.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = SOL_UDP;
            (*cmsg).cmsg_type = UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment as u16);
        }
        // SAFETY: every pointer in `msg` is live for the call.
        let n = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives into `buf`: one datagram, or with GRO a run of them.
    pub(crate) fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        let mut addr: libc::sockaddr_in = unsafe { MaybeUninit::zeroed().assume_init() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u64; 8];
        let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
        msg.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of::<[u64; 8]>() as _;
        // SAFETY: every pointer in `msg` is live for the call.
        let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let len = n as usize;
        let mut segment = len;
        // SAFETY: walking the control buffer the kernel filled, with the libc macros.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                    let size =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                    if size > 0 {
                        segment = size as usize;
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        let from = SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
            u16::from_be(addr.sin_port),
        ));
        Ok(Received { len, from, segment })
    }
}

fn sockaddr_in(to: SocketAddrV4) -> libc::sockaddr_in {
    let mut addr: libc::sockaddr_in = unsafe { MaybeUninit::zeroed().assume_init() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_port = to.port().to_be();
    addr.sin_addr.s_addr = u32::from(*to.ip()).to_be();
    addr
}

#[cfg(test)]
mod tests {
    use super::offload_enabled;

    #[test]
    fn the_offload_knob_turns_off_only_when_asked() {
        assert!(offload_enabled(None));
        assert!(offload_enabled(Some("on")));
        assert!(offload_enabled(Some("")));
        for off in ["off", "0", "false", " off "] {
            assert!(!offload_enabled(Some(off)), "{off:?}");
        }
    }
}
