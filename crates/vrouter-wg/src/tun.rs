//! The persistent TUN device the userspace engine reads and writes: IP packets without
//! a packet-information header (IFF_TUN | IFF_NO_PI), marked persistent (TUNSETPERSIST)
//! so the link, its address and the routes through it outlive the process; the next
//! engine adopts it by name.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::WgError;

// include/uapi/linux/if_tun.h
const TUNSETIFF: libc::c_ulong = 0x4004_54ca; // _IOW('T', 202, int)
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb; // _IOW('T', 203, int)
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// struct ifreq as TUNSETIFF reads it: the name, then the flags (the rest of the union
/// is padding).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open queue of the TUN device: a non-blocking file descriptor.
pub(crate) struct Tun {
    fd: OwnedFd,
}

/// Opens (creating or adopting) the persistent TUN device `name` in the calling
/// thread's network namespace.
pub(crate) fn open(name: &str) -> Result<Tun, WgError> {
    check_name(name)?;
    let path = CString::new("/dev/net/tun").expect("no NUL");
    // SAFETY: a valid NUL-terminated path; the result is checked.
    let raw = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if raw < 0 {
        return Err(WgError::NoTun(io::Error::last_os_error().to_string()));
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI,
        _pad: [0; 22],
    };
    for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads a struct ifreq; `req` is one, alive for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
        let err = io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::EBUSY) => WgError::Kernel(format!(
                "TUN device {name} is in use by another process (another discovery still \
                 running?); stop it, or pick another VROUTER_WG_DEVICE"
            )),
            Some(libc::EINVAL) => WgError::Kernel(format!(
                "a link named {name} exists and is not a TUN device without packet \
                 information; delete it (ip link del {name}) or pick another VROUTER_WG_DEVICE"
            )),
            Some(libc::EPERM) => WgError::Kernel(format!(
                "cannot create TUN device {name}: operation not permitted; the process needs \
                 CAP_NET_ADMIN"
            )),
            _ => WgError::Kernel(format!("cannot create TUN device {name}: {err}")),
        });
    }
    // SAFETY: TUNSETPERSIST takes an int by value.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) } < 0 {
        let err = io::Error::last_os_error();
        return Err(WgError::Kernel(format!(
            "cannot make TUN device {name} persistent: {err}"
        )));
    }
    Ok(Tun { fd })
}

/// Clears the persistent flag so the device goes away with the last descriptor: the
/// fallback of `destroy` when netlink cannot delete it.
pub(crate) fn unpersist(name: &str) -> Result<(), WgError> {
    let tun = open(name)?;
    // SAFETY: TUNSETPERSIST takes an int by value.
    if unsafe { libc::ioctl(tun.fd.as_raw_fd(), TUNSETPERSIST as _, 0 as libc::c_ulong) } < 0 {
        return Err(WgError::Io(io::Error::last_os_error()));
    }
    Ok(())
}

pub(crate) fn check_name(name: &str) -> Result<(), WgError> {
    if name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
        || name == "."
        || name == ".."
    {
        return Err(WgError::Kernel(format!(
            "bad interface name {name:?}: 1 to 15 bytes, no '/', no whitespace (VROUTER_WG_DEVICE)"
        )));
    }
    Ok(())
}

impl Tun {
    /// One packet into `buf`; `Ok(None)` when none is waiting.
    pub(crate) fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(err),
            };
        }
        Ok(Some(n as usize))
    }

    /// Writes one packet; a full queue drops it (as a NIC would).
    pub(crate) fn send(&self, packet: &[u8]) -> io::Result<()> {
        // SAFETY: `packet` is valid for reads of its length.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
                _ => Err(err),
            };
        }
        Ok(())
    }

    pub(crate) fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

/// Waits until `fd` or `wake` is readable, or `timeout_ms` passes.
pub(crate) fn wait_readable(fd: i32, wake: &Wake, timeout_ms: i32) {
    let mut pfds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: two valid pollfds.
    unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout_ms) };
}

/// An eventfd that wakes every thread waiting in [`wait_readable`] at once (stop).
pub(crate) struct Wake {
    fd: OwnedFd,
}

impl Wake {
    pub(crate) fn new() -> io::Result<Wake> {
        // SAFETY: plain syscall; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        Ok(Wake {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        })
    }

    /// Makes the eventfd readable for good (it is never read).
    pub(crate) fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for bad in ["", "a/b", "0123456789abcdef", "a b", "..", "."] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["vrouter-wg", "wg0", "0123456789abcde"] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
    }
}
