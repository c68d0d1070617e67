//! Per-prefix traffic counters in nftables, driven over NETLINK_NETFILTER.
//!
//! The router counts what it forwards to and from each remote stack with rules of the
//! form `ip daddr <prefix> counter` and `ip saddr <prefix> counter` in one base chain
//! at the forward hook (type filter, priority 0, policy accept, no verdicts: it never
//! drops anything). No `nft` binary is needed, so it works from a FROM scratch image
//! with only CAP_NET_ADMIN in the router's own namespace. At the ip-family forward hook
//! the counter adds the IP packet's length (header and payload, no link-layer bytes).
//!
//! The messages are encoded here by hand (no crate types NF_TABLES messages under a
//! permissive licence that fits this tree: neli only knows NFLOG, rustables is GPL):
//! `struct nlmsghdr`, `struct nfgenmsg`, then attributes, every u32/u64 in network
//! byte order as nf_tables expects (NLA_BE32/NLA_BE64). Changes go in one
//! NFNL_MSG_BATCH_BEGIN/END transaction, so a batch applies whole or not at all.
//! Numbers are from include/uapi/linux/netfilter/nf_tables.h and nfnetlink.h.
//!
//! Each rule carries its identity in the rule's userdata, in the TLV format libnftnl
//! uses for comments, so `nft list ruleset` shows it as
//! `comment "vrouter to 10.2.0.0/24 stack b"`, and a dump maps a rule back to its
//! (remote stack, prefix, direction) without any state outside the kernel.
//!
//! The kernel answers netlink requests synchronously inside `sendmsg` (and continues
//! dumps inside `recvmsg`), so the calls here are plain blocking calls that return in
//! well under a millisecond; a receive timeout bounds them anyway.

use crate::{KernelError, Result};
use nix::errno::Errno;
use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use vrouter_state::{Prefix, StackName};

// nfnetlink.h
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10; // NLMSG_MIN_TYPE
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNETLINK_V0: u8 = 0;
// enum nf_tables_msg_types
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_DELRULE: u16 = 8;
// netlink.h
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
// netfilter.h
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_IPV4: u8 = 2;
const NF_INET_FORWARD: u32 = 2;
const NF_ACCEPT: u32 = 1;
// enum nft_table_attributes
const NFTA_TABLE_NAME: u16 = 1;
// enum nft_chain_attributes
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
// enum nft_hook_attributes
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
// enum nft_rule_attributes
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
// enum nft_list_attributes, nft_expr_attributes
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
// enum nft_payload_attributes, nft_payload_bases
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
// enum nft_bitwise_attributes
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
// enum nft_cmp_attributes, nft_cmp_ops
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
// enum nft_counter_attributes
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
// enum nft_data_attributes
const NFTA_DATA_VALUE: u16 = 1;
// enum nft_registers: NFT_REG_1 (a 16-byte register; 4 bytes are used)
const NFT_REG_1: u32 = 1;
// libnftnl's udata.h: NFTNL_UDATA_RULE_COMMENT
const UDATA_RULE_COMMENT: u8 = 0;
// Offsets of the addresses in the IPv4 header.
const IPV4_SADDR: u32 = 12;
const IPV4_DADDR: u32 = 16;

const RECV_BUFFER: usize = 128 * 1024;
/// Nothing should ever wait: the kernel has answered before `send` returns.
const RECV_TIMEOUT_SECS: i64 = 5;
/// Dumps interrupted by a concurrent change are retried this often.
const DUMP_TRIES: usize = 3;
/// The comment's first word: rules without it are not ours.
const TAG_WORD: &str = "vrouter";

/// Which address of the forwarded packet a counter matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// `ip daddr <prefix>`: traffic toward the prefix.
    ToPrefix,
    /// `ip saddr <prefix>`: traffic from the prefix.
    FromPrefix,
}

impl Direction {
    fn word(self) -> &'static str {
        match self {
            Direction::ToPrefix => "to",
            Direction::FromPrefix => "from",
        }
    }

    fn offset(self) -> u32 {
        match self {
            Direction::ToPrefix => IPV4_DADDR,
            Direction::FromPrefix => IPV4_SADDR,
        }
    }
}

/// One counter rule: what it matches and whom it is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PrefixCounter {
    /// The remote stack owning `prefix`.
    pub stack: StackName,
    pub prefix: Prefix,
    pub direction: Direction,
}

impl PrefixCounter {
    /// The rule's comment: "vrouter to 10.2.0.0/24 stack b".
    pub fn comment(&self) -> String {
        format!(
            "{TAG_WORD} {} {} stack {}",
            self.direction.word(),
            self.prefix,
            self.stack
        )
    }

    /// The inverse of [`PrefixCounter::comment`]; None for anything else.
    pub fn from_comment(comment: &str) -> Option<PrefixCounter> {
        let words: Vec<&str> = comment.split(' ').collect();
        let [TAG_WORD, direction, prefix, "stack", stack] = words.as_slice() else {
            return None;
        };
        let direction = match *direction {
            "to" => Direction::ToPrefix,
            "from" => Direction::FromPrefix,
            _ => return None,
        };
        Some(PrefixCounter {
            stack: StackName::new(stack).ok()?,
            prefix: prefix.parse().ok()?,
            direction,
        })
    }
}

/// A rule of the counting chain as a dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterReading {
    /// The kernel's handle of the rule (for deletion).
    pub handle: u64,
    /// The counter this rule is, if it carries our comment **and** its expressions
    /// match exactly what the comment says; None for any other rule in the chain.
    pub counter: Option<PrefixCounter>,
    /// IP bytes counted since the rule was created.
    pub bytes: u64,
    pub packets: u64,
}

/// A socket on the nf_tables netlink subsystem of one network namespace, scoped to
/// one table (family ip) and its counting chain.
pub struct Nft {
    fd: OwnedFd,
    table: String,
    chain: String,
    seq: AtomicU32,
}

impl std::fmt::Debug for Nft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nft")
            .field("table", &self.table)
            .field("chain", &self.chain)
            .finish()
    }
}

impl Nft {
    /// Opens a NETLINK_NETFILTER socket in the calling thread's network namespace, for
    /// the counting chain `chain` of table `ip <table>`. Nothing is created yet (see
    /// [`Nft::ensure_chain`]).
    pub fn connect(table: &str, chain: &str) -> Result<Nft> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(|errno| classify_errno("open a NETLINK_NETFILTER socket", errno))?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))
            .map_err(|errno| classify_errno("bind the NETLINK_NETFILTER socket", errno))?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &TimeVal::new(RECV_TIMEOUT_SECS, 0),
        )
        .map_err(|errno| classify_errno("set a receive timeout", errno))?;
        // Any start will do; it only has to differ from a previous socket's stale
        // answers, which are ignored by sequence anyway.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos() | 1);
        Ok(Nft {
            fd,
            table: table.to_string(),
            chain: chain.to_string(),
            seq: AtomicU32::new(start),
        })
    }

    /// `ip <table>` and its chain: type filter, hook forward, priority 0, policy accept.
    pub fn table(&self) -> &str {
        &self.table
    }

    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// Creates the table and the counting chain if missing, in one transaction.
    /// Idempotent: existing ones are kept with their rules and counters, and a chain
    /// whose policy was changed gets `accept` back.
    pub fn ensure_chain(&self) -> Result<()> {
        self.transact(
            "create nftables chain",
            vec![self.new_table(), self.new_chain()],
        )
    }

    /// Adds the counters that are not in the chain yet (the table and chain are made
    /// if missing), all in one transaction. Idempotent: a counter whose rule is already
    /// there (same comment, same match) is not added again, so its count goes on.
    pub fn add_counters(&self, counters: &[PrefixCounter]) -> Result<()> {
        let present: Vec<PrefixCounter> = self
            .counters()?
            .into_iter()
            .filter_map(|r| r.counter)
            .collect();
        let mut messages = vec![self.new_table(), self.new_chain()];
        let mut added: Vec<&PrefixCounter> = Vec::new();
        for c in counters {
            if !present.contains(c) && !added.contains(&c) {
                messages.push(self.new_rule(c));
                added.push(c);
            }
        }
        self.transact("add nftables counter rules", messages)
    }

    /// Every rule of the counting chain with its counter. A missing table or chain is
    /// an empty chain.
    pub fn counters(&self) -> Result<Vec<CounterReading>> {
        let mut out = Vec::new();
        for _ in 0..DUMP_TRIES {
            let (rules, interrupted) = self.dump_rules()?;
            out = rules
                .iter()
                .filter_map(|payload| parse_rule(payload))
                .filter(|(table, chain, _)| *table == self.table && *chain == self.chain)
                .map(|(_, _, reading)| reading)
                .collect();
            if !interrupted {
                break;
            }
        }
        Ok(out)
    }

    /// Deletes rules of the counting chain by handle, in one transaction. Rules that
    /// are already gone are not an error.
    pub fn delete_rules(&self, handles: &[u64]) -> Result<()> {
        if handles.is_empty() {
            return Ok(());
        }
        let messages = handles.iter().map(|h| self.del_rule(*h)).collect();
        match self.transact("delete nftables rules", messages) {
            Err(KernelError::Errno {
                errno: Errno::ENOENT,
                ..
            }) => {
                // One gone rule fails the whole batch; delete the rest one by one.
                for h in handles {
                    match self.transact("delete nftables rule", vec![self.del_rule(*h)]) {
                        Ok(())
                        | Err(KernelError::Errno {
                            errno: Errno::ENOENT,
                            ..
                        }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            other => other,
        }
    }

    /// Deletes the table with its chain, rules and counters. A table that is already
    /// gone is not an error.
    pub fn delete_table(&self) -> Result<()> {
        let mut m = Message::new(NFT_MSG_DELTABLE, NLM_F_ACK, NFPROTO_IPV4);
        m.str(NFTA_TABLE_NAME, &self.table);
        match self.transact("delete nftables table", vec![m]) {
            Err(KernelError::Errno {
                errno: Errno::ENOENT,
                ..
            }) => Ok(()),
            other => other,
        }
    }

    fn new_table(&self) -> Message {
        let mut m = Message::new(NFT_MSG_NEWTABLE, NLM_F_CREATE | NLM_F_ACK, NFPROTO_IPV4);
        m.str(NFTA_TABLE_NAME, &self.table);
        m
    }

    fn new_chain(&self) -> Message {
        let mut m = Message::new(NFT_MSG_NEWCHAIN, NLM_F_CREATE | NLM_F_ACK, NFPROTO_IPV4);
        m.str(NFTA_CHAIN_TABLE, &self.table);
        m.str(NFTA_CHAIN_NAME, &self.chain);
        let hook = m.nest(NFTA_CHAIN_HOOK);
        m.be32(NFTA_HOOK_HOOKNUM, NF_INET_FORWARD);
        m.be32(NFTA_HOOK_PRIORITY, 0);
        m.end(hook);
        m.be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
        m.str(NFTA_CHAIN_TYPE, "filter");
        m
    }

    fn new_rule(&self, counter: &PrefixCounter) -> Message {
        let mut m = Message::new(
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK,
            NFPROTO_IPV4,
        );
        m.str(NFTA_RULE_TABLE, &self.table);
        m.str(NFTA_RULE_CHAIN, &self.chain);
        let list = m.nest(NFTA_RULE_EXPRESSIONS);
        encode_match(&mut m, counter.direction, counter.prefix);
        let data = m.expr("counter");
        m.be64(NFTA_COUNTER_BYTES, 0);
        m.be64(NFTA_COUNTER_PACKETS, 0);
        m.end_expr(data);
        m.end(list);
        m.attr(NFTA_RULE_USERDATA, &comment_udata(&counter.comment()));
        m
    }

    fn del_rule(&self, handle: u64) -> Message {
        let mut m = Message::new(NFT_MSG_DELRULE, NLM_F_ACK, NFPROTO_IPV4);
        m.str(NFTA_RULE_TABLE, &self.table);
        m.str(NFTA_RULE_CHAIN, &self.chain);
        m.be64(NFTA_RULE_HANDLE, handle);
        m
    }

    fn next_seq(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends `messages` as one batch and waits for every message's answer.
    fn transact(&self, op: &'static str, messages: Vec<Message>) -> Result<()> {
        let begin = self.next_seq();
        let mut buf = Message::batch(NFNL_MSG_BATCH_BEGIN).finish(begin);
        let mut pending = Vec::new();
        for m in messages {
            let seq = self.next_seq();
            pending.push(seq);
            buf.extend_from_slice(&m.finish(seq));
        }
        let end = self.next_seq();
        buf.extend_from_slice(&Message::batch(NFNL_MSG_BATCH_END).finish(end));
        send(self.fd.as_raw_fd(), &buf, MsgFlags::empty())
            .map_err(|errno| classify_errno(op, errno))?;

        // Successes are acknowledged one by one after the commit; a failure aborts
        // the whole batch and comes as an error on the failing message (or on the
        // batch's first message for EPERM, a missing subsystem or a failed commit).
        let mut failure: Option<Errno> = None;
        let mut rx = vec![0u8; RECV_BUFFER];
        loop {
            let done = pending.is_empty() || failure.is_some();
            // Once everything is in, drain without waiting: the kernel queued all its
            // answers before `send` returned.
            let flags = if done {
                MsgFlags::MSG_DONTWAIT
            } else {
                MsgFlags::empty()
            };
            let n = match recv(self.fd.as_raw_fd(), &mut rx, flags) {
                Ok(n) => n,
                Err(Errno::EAGAIN) if done => break,
                Err(Errno::EAGAIN) => {
                    return Err(KernelError::Errno {
                        op: format!("{op}: no answer from nf_tables within {RECV_TIMEOUT_SECS}s"),
                        errno: Errno::ETIMEDOUT,
                    })
                }
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(classify_errno(op, errno)),
            };
            for msg in messages_in(&rx[..n]) {
                if msg.seq < begin || msg.seq > end || msg.kind != NLMSG_ERROR {
                    continue;
                }
                let code = msg
                    .payload
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("four bytes")));
                if code == 0 {
                    pending.retain(|s| *s != msg.seq);
                } else if failure.is_none() {
                    failure = Some(Errno::from_raw(-code));
                }
            }
        }
        match failure {
            Some(errno) => Err(classify_errno(op, errno)),
            None => Ok(()),
        }
    }

    /// Dumps the family's rules of our table; returns the NEWRULE payloads and
    /// whether the dump was interrupted by a concurrent change.
    fn dump_rules(&self) -> Result<(Vec<Vec<u8>>, bool)> {
        const OP: &str = "dump nftables rules";
        let seq = self.next_seq();
        let mut m = Message::new(NFT_MSG_GETRULE, NLM_F_DUMP, NFPROTO_IPV4);
        m.str(NFTA_RULE_TABLE, &self.table);
        send(self.fd.as_raw_fd(), &m.finish(seq), MsgFlags::empty())
            .map_err(|errno| classify_errno(OP, errno))?;
        let mut rules = Vec::new();
        let mut interrupted = false;
        let mut rx = vec![0u8; RECV_BUFFER];
        loop {
            let n = match recv(self.fd.as_raw_fd(), &mut rx, MsgFlags::empty()) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    return Err(KernelError::Errno {
                        op: format!("{OP}: no answer within {RECV_TIMEOUT_SECS}s"),
                        errno: Errno::ETIMEDOUT,
                    })
                }
                Err(errno) => return Err(classify_errno(OP, errno)),
            };
            for msg in messages_in(&rx[..n]) {
                if msg.seq != seq {
                    continue;
                }
                interrupted |= msg.flags & NLM_F_DUMP_INTR != 0;
                match msg.kind {
                    NLMSG_DONE => return Ok((rules, interrupted)),
                    NLMSG_ERROR => {
                        let code = msg
                            .payload
                            .get(..4)
                            .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("four bytes")));
                        if code == 0 {
                            return Ok((rules, interrupted));
                        }
                        let errno = Errno::from_raw(-code);
                        // A table that does not exist holds no rules.
                        if errno == Errno::ENOENT {
                            return Ok((Vec::new(), false));
                        }
                        return Err(classify_errno(OP, errno));
                    }
                    kind if kind == nft_type(NFT_MSG_NEWRULE) => {
                        rules.push(msg.payload.to_vec());
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Turns an errno from the nf_tables socket into the error that tells the operator
/// what to do.
fn classify_errno(op: &'static str, errno: Errno) -> KernelError {
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

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// The match part of a counter rule: load the address, mask it to the prefix length
/// (nothing to mask for a /32), compare with the network.
fn encode_match(m: &mut Message, direction: Direction, prefix: Prefix) {
    let e = m.expr("payload");
    m.be32(NFTA_PAYLOAD_DREG, NFT_REG_1);
    m.be32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER);
    m.be32(NFTA_PAYLOAD_OFFSET, direction.offset());
    m.be32(NFTA_PAYLOAD_LEN, 4);
    m.end_expr(e);
    if prefix.prefix_len() < 32 {
        let e = m.expr("bitwise");
        m.be32(NFTA_BITWISE_SREG, NFT_REG_1);
        m.be32(NFTA_BITWISE_DREG, NFT_REG_1);
        m.be32(NFTA_BITWISE_LEN, 4);
        m.data(
            NFTA_BITWISE_MASK,
            &mask_of(prefix.prefix_len()).to_be_bytes(),
        );
        m.data(NFTA_BITWISE_XOR, &[0; 4]);
        m.end_expr(e);
    }
    let e = m.expr("cmp");
    m.be32(NFTA_CMP_SREG, NFT_REG_1);
    m.be32(NFTA_CMP_OP, NFT_CMP_EQ);
    m.data(NFTA_CMP_DATA, &prefix.addr().octets());
    m.end_expr(e);
}

fn mask_of(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

/// The rule userdata libnftnl writes for a comment: type, length, the text with NUL.
fn comment_udata(comment: &str) -> Vec<u8> {
    let mut value = comment.as_bytes().to_vec();
    value.push(0);
    // NFT_USERDATA_MAXLEN is 256 for the whole blob; our comments are far shorter
    // (stack names have at most 64 characters).
    let len = u8::try_from(value.len()).expect("comment under 255 bytes");
    let mut out = vec![UDATA_RULE_COMMENT, len];
    out.extend_from_slice(&value);
    out
}

/// The comment in a rule's userdata, if there is one.
fn comment_of(udata: &[u8]) -> Option<String> {
    let mut rest = udata;
    while rest.len() >= 2 {
        let (kind, len) = (rest[0], usize::from(rest[1]));
        let value = rest.get(2..2 + len)?;
        if kind == UDATA_RULE_COMMENT {
            let text = value.strip_suffix(&[0]).unwrap_or(value);
            return String::from_utf8(text.to_vec()).ok();
        }
        rest = &rest[2 + len..];
    }
    None
}

/// A NEWRULE payload (nfgenmsg and attributes) as (table, chain, reading).
fn parse_rule(payload: &[u8]) -> Option<(String, String, CounterReading)> {
    let mut table = None;
    let mut chain = None;
    let mut handle = None;
    let mut comment = None;
    let mut exprs = Vec::new();
    for (kind, value) in attrs(payload.get(NFGENMSG_LEN..)?) {
        match kind {
            NFTA_RULE_TABLE => table = Some(c_string(value)),
            NFTA_RULE_CHAIN => chain = Some(c_string(value)),
            NFTA_RULE_HANDLE => handle = be64(value),
            NFTA_RULE_USERDATA => comment = comment_of(value),
            NFTA_RULE_EXPRESSIONS => {
                for (elem, body) in attrs(value) {
                    if elem == NFTA_LIST_ELEM {
                        exprs.push(parse_expr(body));
                    }
                }
            }
            _ => {}
        }
    }
    let (matched, bytes, packets) = decode_rule(&exprs);
    let counter = comment
        .as_deref()
        .and_then(PrefixCounter::from_comment)
        .filter(|c| matched == Some((c.direction, c.prefix)));
    Some((
        table?,
        chain?,
        CounterReading {
            handle: handle?,
            counter,
            bytes,
            packets,
        },
    ))
}

/// One expression of a dumped rule, reduced to what a counter rule uses.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    Payload { base: u32, offset: u32, len: u32 },
    Bitwise { mask: Vec<u8>, xor: Vec<u8> },
    Cmp { op: u32, data: Vec<u8> },
    Counter { bytes: u64, packets: u64 },
    Other(String),
}

fn parse_expr(body: &[u8]) -> Expr {
    let mut name = String::new();
    let mut data: &[u8] = &[];
    for (kind, value) in attrs(body) {
        match kind {
            NFTA_EXPR_NAME => name = c_string(value),
            NFTA_EXPR_DATA => data = value,
            _ => {}
        }
    }
    let get = |want: u16| attrs(data).find(|(k, _)| *k == want).map(|(_, v)| v);
    let u32_of = |want: u16| get(want).and_then(be32).unwrap_or(u32::MAX);
    let data_of = |want: u16| {
        get(want)
            .and_then(|nest| attrs(nest).find(|(k, _)| *k == NFTA_DATA_VALUE))
            .map(|(_, v)| v.to_vec())
            .unwrap_or_default()
    };
    match name.as_str() {
        "payload" => Expr::Payload {
            base: u32_of(NFTA_PAYLOAD_BASE),
            offset: u32_of(NFTA_PAYLOAD_OFFSET),
            len: u32_of(NFTA_PAYLOAD_LEN),
        },
        "bitwise" => Expr::Bitwise {
            mask: data_of(NFTA_BITWISE_MASK),
            xor: data_of(NFTA_BITWISE_XOR),
        },
        "cmp" => Expr::Cmp {
            op: u32_of(NFTA_CMP_OP),
            data: data_of(NFTA_CMP_DATA),
        },
        "counter" => Expr::Counter {
            bytes: get(NFTA_COUNTER_BYTES).and_then(be64).unwrap_or(0),
            packets: get(NFTA_COUNTER_PACKETS).and_then(be64).unwrap_or(0),
        },
        _ => Expr::Other(name),
    }
}

/// What a rule's expressions match, if they are exactly `payload [bitwise] cmp
/// counter` on an IPv4 address, and its counter values.
fn decode_rule(exprs: &[Expr]) -> (Option<(Direction, Prefix)>, u64, u64) {
    let (bytes, packets) = exprs
        .iter()
        .find_map(|e| match e {
            Expr::Counter { bytes, packets } => Some((*bytes, *packets)),
            _ => None,
        })
        .unwrap_or((0, 0));
    let (load, mask, cmp) = match exprs {
        [load, Expr::Bitwise { mask, xor }, cmp, Expr::Counter { .. }] if xor == &[0; 4] => {
            (load, Some(mask.as_slice()), cmp)
        }
        [load, cmp, Expr::Counter { .. }] => (load, None, cmp),
        _ => return (None, bytes, packets),
    };
    let direction = match load {
        Expr::Payload {
            base: NFT_PAYLOAD_NETWORK_HEADER,
            offset: IPV4_DADDR,
            len: 4,
        } => Direction::ToPrefix,
        Expr::Payload {
            base: NFT_PAYLOAD_NETWORK_HEADER,
            offset: IPV4_SADDR,
            len: 4,
        } => Direction::FromPrefix,
        _ => return (None, bytes, packets),
    };
    let Expr::Cmp {
        op: NFT_CMP_EQ,
        data,
    } = cmp
    else {
        return (None, bytes, packets);
    };
    let Ok(addr) = <[u8; 4]>::try_from(data.as_slice()) else {
        return (None, bytes, packets);
    };
    let len = match mask {
        None => 32,
        Some(mask) => {
            let Ok(mask) = <[u8; 4]>::try_from(mask) else {
                return (None, bytes, packets);
            };
            let mask = u32::from_be_bytes(mask);
            let len = mask.leading_ones() as u8;
            if mask_of(len) != mask {
                return (None, bytes, packets);
            }
            len
        }
    };
    let matched = Prefix::new(Ipv4Addr::from(addr), len)
        .ok()
        .map(|p| (direction, p));
    (matched, bytes, packets)
}

fn c_string(value: &[u8]) -> String {
    let text = value.split(|b| *b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(text).into_owned()
}

fn be32(value: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(value.get(..4)?.try_into().ok()?))
}

fn be64(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes in `buf` as (type without flags, value); stops at the first
/// malformed one.
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            return None;
        }
        let value = &rest[4..len];
        rest = rest.get(align4(len)..).unwrap_or_default();
        Some((kind, value))
    })
}

/// One netlink message of a received datagram.
struct Received<'a> {
    kind: u16,
    flags: u16,
    seq: u32,
    /// What follows the netlink header.
    payload: &'a [u8],
}

fn messages_in(buf: &[u8]) -> impl Iterator<Item = Received<'_>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return None;
        }
        let msg = Received {
            kind: u16::from_ne_bytes([rest[4], rest[5]]),
            flags: u16::from_ne_bytes([rest[6], rest[7]]),
            seq: u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes")),
            payload: &rest[NLMSG_HDRLEN..len],
        };
        rest = rest.get(align4(len)..).unwrap_or_default();
        Some(msg)
    })
}

/// An nf_tables request being built: netlink header, nfgenmsg, attributes.
struct Message {
    buf: Vec<u8>,
}

impl Message {
    fn new(msg: u16, flags: u16, family: u8) -> Message {
        Message::with_header(nft_type(msg), NLM_F_REQUEST | flags, family, 0)
    }

    /// NFNL_MSG_BATCH_BEGIN/END: the subsystem goes in res_id.
    fn batch(kind: u16) -> Message {
        Message::with_header(kind, NLM_F_REQUEST, NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES)
    }

    fn with_header(kind: u16, flags: u16, family: u8, res_id: u16) -> Message {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // sequence, set by finish
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        buf.push(family);
        buf.push(NFNETLINK_V0);
        buf.extend_from_slice(&res_id.to_be_bytes());
        Message { buf }
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).expect("message under 4 GiB");
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }

    fn attr(&mut self, kind: u16, value: &[u8]) {
        let len = u16::try_from(4 + value.len()).expect("attribute under 64 KiB");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    fn str(&mut self, kind: u16, value: &str) {
        let mut v = value.as_bytes().to_vec();
        v.push(0);
        self.attr(kind, &v);
    }

    fn be32(&mut self, kind: u16, value: u32) {
        self.attr(kind, &value.to_be_bytes());
    }

    fn be64(&mut self, kind: u16, value: u64) {
        self.attr(kind, &value.to_be_bytes());
    }

    /// Opens a nested attribute; returns where it starts, for [`Message::end`].
    fn nest(&mut self, kind: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        start
    }

    fn end(&mut self, start: usize) {
        let len = u16::try_from(self.buf.len() - start).expect("attribute under 64 KiB");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// `NFTA_DATA_VALUE` nested in `kind`, as registers' data is passed.
    fn data(&mut self, kind: u16, value: &[u8]) {
        let n = self.nest(kind);
        self.attr(NFTA_DATA_VALUE, value);
        self.end(n);
    }

    /// Opens a list element for expression `name` and its data; returns both starts.
    fn expr(&mut self, name: &str) -> (usize, usize) {
        let elem = self.nest(NFTA_LIST_ELEM);
        self.str(NFTA_EXPR_NAME, name);
        (elem, self.nest(NFTA_EXPR_DATA))
    }

    fn end_expr(&mut self, (elem, data): (usize, usize)) {
        self.end(data);
        self.end(elem);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(direction: Direction, prefix: &str, stack: &str) -> PrefixCounter {
        PrefixCounter {
            stack: StackName::new(stack).unwrap(),
            prefix: prefix.parse().unwrap(),
            direction,
        }
    }

    #[test]
    fn comments_round_trip() {
        for c in [
            counter(Direction::ToPrefix, "10.2.0.0/24", "b"),
            counter(Direction::FromPrefix, "10.3.0.7/32", "stack-c.prod_1"),
            counter(Direction::ToPrefix, "0.0.0.0/0", "d"),
        ] {
            assert_eq!(PrefixCounter::from_comment(&c.comment()), Some(c.clone()));
            assert_eq!(comment_of(&comment_udata(&c.comment())), Some(c.comment()));
        }
        assert_eq!(
            counter(Direction::ToPrefix, "10.2.0.0/24", "b").comment(),
            "vrouter to 10.2.0.0/24 stack b"
        );
        for other in [
            "",
            "hello",
            "vrouter to 10.2.0.0/24 stack",
            "vrouter up 10.2.0.0/24 stack b",
            "vrouter to 10.2.0.1/24 stack b",
            "vrouter to 10.2.0.0/24 stack b extra",
            "nope to 10.2.0.0/24 stack b",
        ] {
            assert_eq!(PrefixCounter::from_comment(other), None, "{other:?}");
        }
    }

    #[test]
    fn udata_skips_other_tlvs() {
        // Another TLV first (type 1, 3 bytes), then the comment.
        let mut udata = vec![1, 3, 9, 9, 9];
        udata.extend(comment_udata("vrouter from 10.2.0.0/16 stack x"));
        assert_eq!(
            comment_of(&udata).as_deref(),
            Some("vrouter from 10.2.0.0/16 stack x")
        );
        assert_eq!(comment_of(&[0, 10, b'a']), None, "truncated");
        assert_eq!(comment_of(&[]), None);
    }

    /// Encodes a rule as the kernel would dump it (the NEWRULE attributes plus a
    /// handle) and parses it back.
    fn dumped(nft_table: &str, c: &PrefixCounter, handle: u64) -> Vec<u8> {
        let mut m = Message::new(NFT_MSG_NEWRULE, 0, NFPROTO_IPV4);
        m.str(NFTA_RULE_TABLE, nft_table);
        m.str(NFTA_RULE_CHAIN, "traffic");
        m.be64(NFTA_RULE_HANDLE, handle);
        let list = m.nest(NFTA_RULE_EXPRESSIONS);
        encode_match(&mut m, c.direction, c.prefix);
        let e = m.expr("counter");
        m.be64(NFTA_COUNTER_BYTES, 1500);
        m.be64(NFTA_COUNTER_PACKETS, 3);
        m.end_expr(e);
        m.end(list);
        m.attr(NFTA_RULE_USERDATA, &comment_udata(&c.comment()));
        m.finish(7)[NLMSG_HDRLEN..].to_vec()
    }

    #[test]
    fn rules_round_trip_through_the_encoding() {
        for c in [
            counter(Direction::ToPrefix, "10.2.0.0/24", "b"),
            counter(Direction::FromPrefix, "10.3.0.0/16", "c"),
            counter(Direction::FromPrefix, "10.4.0.9/32", "d"),
            counter(Direction::ToPrefix, "0.0.0.0/0", "e"),
        ] {
            let (table, chain, reading) = parse_rule(&dumped("vrouter", &c, 42)).unwrap();
            assert_eq!((table.as_str(), chain.as_str()), ("vrouter", "traffic"));
            assert_eq!(
                reading,
                CounterReading {
                    handle: 42,
                    counter: Some(c),
                    bytes: 1500,
                    packets: 3
                }
            );
        }
    }

    #[test]
    fn a_comment_that_disagrees_with_the_match_is_not_ours() {
        let c = counter(Direction::ToPrefix, "10.2.0.0/24", "b");
        let mut m = Message::new(NFT_MSG_NEWRULE, 0, NFPROTO_IPV4);
        m.str(NFTA_RULE_TABLE, "vrouter");
        m.str(NFTA_RULE_CHAIN, "traffic");
        m.be64(NFTA_RULE_HANDLE, 5);
        let list = m.nest(NFTA_RULE_EXPRESSIONS);
        // Matches the source address, while the comment says destination.
        encode_match(&mut m, Direction::FromPrefix, c.prefix);
        let e = m.expr("counter");
        m.end_expr(e);
        m.end(list);
        m.attr(NFTA_RULE_USERDATA, &comment_udata(&c.comment()));
        let (_, _, reading) = parse_rule(&m.finish(1)[NLMSG_HDRLEN..]).unwrap();
        assert_eq!(reading.handle, 5);
        assert_eq!(reading.counter, None);
    }

    #[test]
    fn match_encoding_is_what_nft_writes() {
        // `ip daddr 10.2.0.0/24`: payload load 4b @ network header + 16, bitwise mask
        // ffffff00 xor 0, cmp eq 10.2.0.0 (libnftnl's layout for a prefix).
        let mut m = Message::new(NFT_MSG_NEWRULE, 0, NFPROTO_IPV4);
        let list = m.nest(NFTA_RULE_EXPRESSIONS);
        encode_match(&mut m, Direction::ToPrefix, "10.2.0.0/24".parse().unwrap());
        m.end(list);
        let buf = m.finish(1);
        let (_, list) = attrs(&buf[NLMSG_HDRLEN + NFGENMSG_LEN..]).next().unwrap();
        let exprs: Vec<Expr> = attrs(list).map(|(_, e)| parse_expr(e)).collect();
        assert_eq!(
            exprs,
            vec![
                Expr::Payload {
                    base: 1,
                    offset: 16,
                    len: 4
                },
                Expr::Bitwise {
                    mask: vec![255, 255, 255, 0],
                    xor: vec![0; 4]
                },
                Expr::Cmp {
                    op: 0,
                    data: vec![10, 2, 0, 0]
                },
            ]
        );
        // Nested attributes carry NLA_F_NESTED, as the kernel's strict parsers want.
        let kind = u16::from_ne_bytes([buf[NLMSG_HDRLEN + 6], buf[NLMSG_HDRLEN + 7]]);
        assert_eq!(kind, NFTA_RULE_EXPRESSIONS | NLA_F_NESTED);
    }

    #[test]
    fn headers() {
        let buf = Message::batch(NFNL_MSG_BATCH_BEGIN).finish(9);
        assert_eq!(buf.len(), NLMSG_HDRLEN + NFGENMSG_LEN);
        assert_eq!(u32::from_ne_bytes(buf[0..4].try_into().unwrap()), 20);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), 0x10);
        assert_eq!(u32::from_ne_bytes(buf[8..12].try_into().unwrap()), 9);
        // res_id is the subsystem, big-endian.
        assert_eq!(&buf[16..20], &[0, 0, 0, 10]);
        let buf = Message::new(NFT_MSG_NEWRULE, NLM_F_ACK, NFPROTO_IPV4).finish(1);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), 0x0a06);
        assert_eq!(
            u16::from_ne_bytes([buf[6], buf[7]]),
            NLM_F_REQUEST | NLM_F_ACK
        );
        assert_eq!(buf[16], NFPROTO_IPV4);
    }

    #[test]
    fn errors_are_classified() {
        assert!(matches!(
            classify_errno("x", Errno::EOPNOTSUPP),
            KernelError::NoNfTables
        ));
        assert!(matches!(
            classify_errno("x", Errno::EPROTONOSUPPORT),
            KernelError::NoNfTables
        ));
        assert!(matches!(
            classify_errno("add rules", Errno::EPERM),
            KernelError::NotPermitted { .. }
        ));
        let e = classify_errno("add rules", Errno::EINVAL);
        assert!(e.to_string().contains("add rules"), "{e}");
    }

    #[test]
    fn malformed_input_does_not_panic() {
        assert_eq!(attrs(&[5, 0, 1]).count(), 0);
        assert_eq!(attrs(&[200, 0, 1, 0, 0, 0]).count(), 0);
        assert_eq!(messages_in(&[0; 15]).count(), 0);
        assert!(parse_rule(&[]).is_none());
        assert!(parse_rule(&[2, 0, 0, 0]).is_none(), "no table/chain/handle");
        let mut junk = vec![2, 0, 0, 0];
        junk.extend([8, 0, 4, 0x80, 4, 0, 1, 0]);
        assert!(parse_rule(&junk).is_none());
    }
}
