//! The socket: a NETLINK_NETFILTER socket (netlink-sys) that sends requests in
//! NFNL_MSG_BATCH_BEGIN/END transactions, so a batch applies whole or not at all, and
//! runs dumps.
//!
//! The kernel answers netlink requests synchronously inside `sendmsg` (and continues
//! dumps inside `recvmsg`), so these are plain blocking calls that return in well
//! under a millisecond; a receive timeout bounds them anyway.

use super::message::{replies, Reply, Request};
use super::uapi::*;
use crate::KernelError;
use nix::errno::Errno;
use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use nix::sys::time::TimeVal;
use rtnetlink::packet_core::{NetlinkPayload, NLM_F_ACK, NLM_F_DUMP_INTR};
use rtnetlink::sys::{protocols::NETLINK_NETFILTER, Socket};
use std::sync::atomic::{AtomicU32, Ordering};

const RECV_BUFFER: usize = 128 * 1024;
/// Nothing should ever wait: the kernel has answered before `send` returns.
const RECV_TIMEOUT_SECS: i64 = 5;
/// Bytes per batch: netlink refuses a datagram above the send buffer (about 208 KiB
/// by default).
pub(super) const BATCH_BYTES: usize = 96 * 1024;

/// A NETLINK_NETFILTER socket of the calling thread's network namespace.
pub(super) struct NfSocket {
    socket: Socket,
    seq: AtomicU32,
}

impl NfSocket {
    pub(super) fn connect() -> crate::Result<NfSocket> {
        let io = |op: &'static str| {
            move |e: std::io::Error| {
                classify_errno(op, Errno::from_raw(e.raw_os_error().unwrap_or(0)))
            }
        };
        let mut socket =
            Socket::new(NETLINK_NETFILTER).map_err(io("open a NETLINK_NETFILTER socket"))?;
        socket
            .bind_auto()
            .map_err(io("bind the NETLINK_NETFILTER socket"))?;
        setsockopt(
            &socket,
            sockopt::ReceiveTimeout,
            &TimeVal::new(RECV_TIMEOUT_SECS, 0),
        )
        .map_err(|errno| classify_errno("set a receive timeout", errno))?;
        // Any start will do; it only has to differ from a previous socket's stale
        // answers, which are ignored by sequence anyway.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos() | 1);
        Ok(NfSocket {
            socket,
            seq: AtomicU32::new(start),
        })
    }

    pub(super) fn next_seq(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn send(&self, op: &str, buf: &[u8]) -> crate::Result<()> {
        self.socket
            .send(buf, 0)
            .map(drop)
            .map_err(|e| classify_errno(op, Errno::from_raw(e.raw_os_error().unwrap_or(0))))
    }

    fn recv(&self, rx: &mut Vec<u8>, flags: libc::c_int) -> Result<(), Errno> {
        rx.clear();
        self.socket
            .recv(rx, flags)
            .map(drop)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))
    }

    /// Raises the send buffer so that a datagram of `len` bytes goes in one piece
    /// (netlink refuses one above the buffer less 32 bytes): SO_SNDBUFFORCE, which
    /// CAP_NET_ADMIN allows past net.core.wmem_max, else SO_SNDBUF up to that limit.
    fn make_room(&self, op: &str, len: usize) -> crate::Result<()> {
        let have = getsockopt(&self.socket, sockopt::SndBuf)
            .map_err(|errno| classify_errno("read the send buffer size", errno))?;
        let want = len + 4096;
        if have >= want {
            return Ok(());
        }
        // The kernel doubles what it is given (for its bookkeeping) and caps it at
        // INT_MAX.
        let ask = (want / 2 + 1).min(i32::MAX as usize / 2);
        if setsockopt(&self.socket, sockopt::SndBufForce, &ask).is_ok() {
            return Ok(());
        }
        setsockopt(&self.socket, sockopt::SndBuf, &ask).map_err(|errno| {
            classify_errno(
                &format!("{op}: raise the send buffer to {want} bytes"),
                errno,
            )
        })
    }

    /// Sends `requests` in as few batches as fit in [`BATCH_BYTES`], in order.
    pub(super) fn transact_split(
        &self,
        op: &'static str,
        requests: Vec<Request>,
    ) -> crate::Result<()> {
        for batch in split_batches(requests) {
            self.transact(op, batch)?;
        }
        Ok(())
    }

    /// Deletions: one batch per [`BATCH_BYTES`]; when something is already gone
    /// (ENOENT fails the whole batch), the batch's messages are sent one by one and
    /// the gone ones skipped.
    pub(super) fn transact_tolerant(
        &self,
        op: &'static str,
        requests: Vec<Request>,
    ) -> crate::Result<()> {
        for batch in split_batches(requests) {
            match self.transact(op, batch.clone()) {
                Err(KernelError::Errno {
                    errno: Errno::ENOENT,
                    ..
                }) => {
                    for m in batch {
                        match self.transact(op, vec![m]) {
                            Ok(())
                            | Err(KernelError::Errno {
                                errno: Errno::ENOENT,
                                ..
                            }) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// Sends `requests` as one batch and waits for every message's answer.
    pub(super) fn transact(&self, op: &'static str, requests: Vec<Request>) -> crate::Result<()> {
        let begin = self.next_seq();
        let mut buf = Request::batch(NFNL_MSG_BATCH_BEGIN).encode(begin);
        let mut pending = Vec::new();
        // What each message was, to name the one that failed.
        let mut kinds: Vec<(u32, u16)> = Vec::new();
        for m in &requests {
            let seq = self.next_seq();
            // Only acknowledged messages are waited for (errors come for any).
            if m.flags & NLM_F_ACK != 0 {
                pending.push(seq);
            }
            kinds.push((seq, m.kind()));
            buf.extend_from_slice(&m.encode(seq));
        }
        let end = self.next_seq();
        buf.extend_from_slice(&Request::batch(NFNL_MSG_BATCH_END).encode(end));
        self.make_room(op, buf.len())?;
        self.send(op, &buf)?;

        // Successes are acknowledged one by one after the commit; a failure aborts
        // the whole batch and comes as an error on the failing message (or on the
        // batch's first message for EPERM, a missing subsystem or a failed commit).
        let mut failure: Option<(u32, Errno)> = None;
        let mut rx = Vec::with_capacity(RECV_BUFFER);
        loop {
            let done = pending.is_empty() || failure.is_some();
            // Once everything is in, drain without waiting: the kernel queued all its
            // answers before `send` returned.
            let flags = if done { libc::MSG_DONTWAIT } else { 0 };
            match self.recv(&mut rx, flags) {
                Ok(()) => {}
                Err(Errno::EAGAIN) if done => break,
                Err(Errno::EAGAIN) => {
                    return Err(KernelError::Errno {
                        op: format!("{op}: no answer from nf_tables within {RECV_TIMEOUT_SECS}s"),
                        errno: Errno::ETIMEDOUT,
                    })
                }
                Err(Errno::EINTR) => continue,
                // More errors than the receive buffer holds: the first is in.
                Err(Errno::ENOBUFS) if failure.is_some() => break,
                Err(errno) => return Err(classify_errno(op, errno)),
            }
            for msg in replies(&rx) {
                let seq = msg.header.sequence_number;
                if seq < begin || seq > end {
                    continue;
                }
                let NetlinkPayload::Error(error) = msg.payload else {
                    continue;
                };
                match error.code {
                    None => pending.retain(|s| *s != seq),
                    Some(code) if failure.is_none() => {
                        failure = Some((seq, Errno::from_raw(-code.get())))
                    }
                    Some(_) => {}
                }
            }
        }
        match failure {
            Some((seq, errno)) => {
                let at = match kinds.iter().position(|(s, _)| *s == seq) {
                    Some(i) if kinds.len() > 1 => format!(
                        "{op} ({} message {} of {})",
                        message_name(kinds[i].1),
                        i + 1,
                        kinds.len()
                    ),
                    _ => op.to_string(),
                };
                Err(classify_errno(&at, errno))
            }
            None => Ok(()),
        }
    }

    /// Sends the dump request `request` and collects the payloads of the answers of
    /// type `reply` (NFT_MSG_*); returns them and whether the dump was interrupted by
    /// a concurrent change. ENOENT (no such table or set) is an empty dump.
    pub(super) fn dump(
        &self,
        op: &'static str,
        request: Request,
        reply: u16,
    ) -> crate::Result<(Vec<Vec<u8>>, bool)> {
        let seq = self.next_seq();
        self.send(op, &request.encode(seq))?;
        let mut out = Vec::new();
        let mut interrupted = false;
        let mut rx = Vec::with_capacity(RECV_BUFFER);
        loop {
            match self.recv(&mut rx, 0) {
                Ok(()) => {}
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    return Err(KernelError::Errno {
                        op: format!("{op}: no answer within {RECV_TIMEOUT_SECS}s"),
                        errno: Errno::ETIMEDOUT,
                    })
                }
                Err(errno) => return Err(classify_errno(op, errno)),
            }
            for msg in replies(&rx) {
                if msg.header.sequence_number != seq {
                    continue;
                }
                interrupted |= msg.header.flags & NLM_F_DUMP_INTR != 0;
                let kind = msg.header.message_type;
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok((out, interrupted)),
                    NetlinkPayload::Error(error) => {
                        let Some(code) = error.code else {
                            return Ok((out, interrupted));
                        };
                        let errno = Errno::from_raw(-code.get());
                        if errno == Errno::ENOENT {
                            return Ok((Vec::new(), false));
                        }
                        return Err(classify_errno(op, errno));
                    }
                    NetlinkPayload::InnerMessage(Reply { payload })
                        if kind == super::message::nft_type(reply) =>
                    {
                        out.push(payload)
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Groups requests into batches of at most [`BATCH_BYTES`] (a request larger than
/// that goes alone), in order.
pub(super) fn split_batches(requests: Vec<Request>) -> Vec<Vec<Request>> {
    let mut out: Vec<Vec<Request>> = Vec::new();
    let mut size = 0;
    for m in requests {
        let len = m.len();
        match out.last_mut() {
            Some(batch) if size + len <= BATCH_BYTES => batch.push(m),
            _ => {
                size = 0;
                out.push(vec![m]);
            }
        }
        size += len;
    }
    out
}

/// Turns an errno from the nf_tables socket into the error that tells the operator
/// what to do.
pub(super) fn classify_errno(op: &str, errno: Errno) -> KernelError {
    match errno {
        Errno::EPERM | Errno::EACCES => KernelError::NotPermitted { op: op.to_string() },
        // No NETLINK_NETFILTER at all, or no nf_tables subsystem behind it.
        Errno::EPROTONOSUPPORT | Errno::EOPNOTSUPP => KernelError::NoNfTables,
        errno => KernelError::Errno {
            op: op.to_string(),
            errno,
        },
    }
}

/// The name of an nf_tables message type, for errors.
fn message_name(kind: u16) -> &'static str {
    match kind & 0xff {
        NFT_MSG_NEWTABLE => "NEWTABLE",
        NFT_MSG_DELTABLE => "DELTABLE",
        NFT_MSG_NEWCHAIN => "NEWCHAIN",
        NFT_MSG_NEWRULE => "NEWRULE",
        NFT_MSG_DELRULE => "DELRULE",
        NFT_MSG_NEWSET => "NEWSET",
        NFT_MSG_DELSET => "DELSET",
        NFT_MSG_NEWSETELEM => "NEWSETELEM",
        NFT_MSG_DELSETELEM => "DELSETELEM",
        _ => "nf_tables",
    }
}
