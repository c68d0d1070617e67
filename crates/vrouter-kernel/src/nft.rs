//! Per-prefix traffic counters in nftables, driven over NETLINK_NETFILTER.
//!
//! The router counts what it forwards to and from each remote stack with counters kept
//! on set elements, so a forwarded packet costs a few hash lookups however many remote
//! prefixes there are. Per direction and prefix length in use there is one hash set
//! (`to_24`, `from_16`, ...: key `ipv4_addr`, no flags, a `counter` expression as the
//! set's template, which the kernel clones into every element added without its own)
//! and one rule in the base chain at the forward hook (type filter, priority 0, policy
//! accept, no verdicts: it never drops anything):
//!
//! ```text
//! ip daddr & 255.255.255.0 @to_24     (payload load, bitwise mask unless /32, lookup)
//! ip saddr & 255.255.255.0 @from_24
//! ```
//!
//! An element is a remote prefix's network address (the masked key); the lookup that
//! finds it updates its counter. A packet is counted once per prefix length, in the
//! element of every configured prefix that contains the address (as the earlier one
//! rule per prefix did: overlapping prefixes of different lengths each count). With
//! typically one or two prefix lengths in use that is two to four rules in the chain.
//! No `nft` binary is needed, so it works from a FROM scratch image with only
//! CAP_NET_ADMIN in the router's own namespace. At the ip-family forward hook the
//! counter adds the IP packet's length (header and payload, no link-layer bytes).
//!
//! The messages are encoded here by hand (no crate types NF_TABLES messages under a
//! permissive licence that fits this tree: neli only knows NFLOG, rustables is GPL):
//! `struct nlmsghdr`, `struct nfgenmsg`, then attributes, every u32/u64 in network
//! byte order as nf_tables expects (NLA_BE32/NLA_BE64). Changes go in
//! NFNL_MSG_BATCH_BEGIN/END transactions, so a batch applies whole or not at all
//! (large element lists are split in several batches to stay under the socket's send
//! buffer). Numbers are from include/uapi/linux/netfilter/nf_tables.h and nfnetlink.h.
//!
//! Each element carries its identity in its userdata, in the TLV format libnftnl uses
//! for comments, so `nft list ruleset` shows it as
//! `10.2.0.0 counter packets 0 bytes 0 comment "vrouter to 10.2.0.0/24 stack b"`, and
//! a dump maps an element back to its (remote stack, prefix, direction) without any
//! state outside the kernel. Rules and sets are recognised by their shape and names.
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
use std::collections::{BTreeMap, BTreeSet};
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
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
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
// enum nft_set_attributes
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_EXPR: u16 = 17;
const NFTA_SET_EXPRESSIONS: u16 = 18;
// nftables' datatype numbers (userspace only; `nft list` prints keys by it)
const TYPE_IPADDR: u32 = 7;
// enum nft_set_elem_list_attributes
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
// enum nft_set_elem_attributes
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_SET_ELEM_EXPR: u16 = 7;
const NFTA_SET_ELEM_EXPRESSIONS: u16 = 11;
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
// enum nft_lookup_attributes
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_DREG: u16 = 3;
const NFTA_LOOKUP_FLAGS: u16 = 5;
// enum nft_counter_attributes
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
// enum nft_data_attributes
const NFTA_DATA_VALUE: u16 = 1;
// enum nft_registers: NFT_REG_1 (a 16-byte register; 4 bytes are used)
const NFT_REG_1: u32 = 1;
// libnftnl's udata.h: NFTNL_UDATA_RULE_COMMENT, NFTNL_UDATA_SET_ELEM_COMMENT
const UDATA_COMMENT: u8 = 0;
// Offsets of the addresses in the IPv4 header.
const IPV4_SADDR: u32 = 12;
const IPV4_DADDR: u32 = 16;

const RECV_BUFFER: usize = 128 * 1024;
/// Nothing should ever wait: the kernel has answered before `send` returns.
const RECV_TIMEOUT_SECS: i64 = 5;
/// Dumps interrupted by a concurrent change are retried this often.
const DUMP_TRIES: usize = 3;
/// Elements per NEWSETELEM/DELSETELEM message: a nested attribute is at most 64 KiB
/// and an element with its comment about 130 bytes.
const ELEMENTS_PER_MESSAGE: usize = 256;
/// Bytes per batch: netlink refuses a datagram above the send buffer (about 208 KiB
/// by default).
const BATCH_BYTES: usize = 96 * 1024;
/// The comment's first word: elements and rules without it are not ours.
const TAG_WORD: &str = "vrouter";

/// Which address of the forwarded packet a counter matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// `ip daddr`: traffic toward the prefix.
    ToPrefix,
    /// `ip saddr`: traffic from the prefix.
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

/// One set and its lookup rule: all counters of one direction and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot {
    pub direction: Direction,
    /// 0..=32.
    pub prefix_len: u8,
}

impl Slot {
    pub fn of(counter: &PrefixCounter) -> Slot {
        Slot {
            direction: counter.direction,
            prefix_len: counter.prefix.prefix_len(),
        }
    }

    /// The set's name: `to_24`, `from_32`.
    pub fn set_name(&self) -> String {
        format!("{}_{}", self.direction.word(), self.prefix_len)
    }

    /// The inverse of [`Slot::set_name`]; None for any other name.
    pub fn from_set_name(name: &str) -> Option<Slot> {
        let (word, len) = name.split_once('_')?;
        let direction = match word {
            "to" => Direction::ToPrefix,
            "from" => Direction::FromPrefix,
            _ => return None,
        };
        let prefix_len: u8 = len.parse().ok()?;
        // Only the canonical spelling ("24", not "024" or "+24").
        (prefix_len <= 32 && prefix_len.to_string() == len).then_some(Slot {
            direction,
            prefix_len,
        })
    }

    /// The rule's comment: "vrouter count to_24".
    fn rule_comment(&self) -> String {
        format!("{TAG_WORD} count {}", self.set_name())
    }
}

/// One counter: what it matches and whom it is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PrefixCounter {
    /// The remote stack owning `prefix`.
    pub stack: StackName,
    pub prefix: Prefix,
    pub direction: Direction,
}

impl PrefixCounter {
    /// The element's comment: "vrouter to 10.2.0.0/24 stack b".
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

/// An element of one of our counting sets as a dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterReading {
    /// The set it is in.
    pub slot: Slot,
    /// The element's key: the network address of the prefix.
    pub key: Ipv4Addr,
    /// The counter this element is, if it carries our comment **and** the comment's
    /// prefix and direction are the set's and the key's; None for any other element.
    pub counter: Option<PrefixCounter>,
    /// IP bytes counted since the element was created.
    pub bytes: u64,
    pub packets: u64,
}

/// A rule of the counting chain as a dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleReading {
    /// The kernel's handle of the rule (for deletion).
    pub handle: u64,
    /// The set this rule looks up, if its expressions are exactly the lookup of a
    /// counting set (`payload`, `bitwise` unless /32, `lookup`); None for any other
    /// rule, such as the per-prefix counter rules of earlier versions.
    pub slot: Option<Slot>,
}

/// A set of our table as a dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetReading {
    pub name: String,
    /// Its slot when the name is one and the set is what we create: 4-byte keys, no
    /// flags (a plain hash, no intervals, no map), a counter template.
    pub slot: Option<Slot>,
}

/// Everything of ours in the kernel: rules of the chain, sets of the table, elements
/// of the sets that are ours.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterDump {
    pub rules: Vec<RuleReading>,
    pub sets: Vec<SetReading>,
    pub elements: Vec<CounterReading>,
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

    /// Adds the counters that are not there yet, with the set and lookup rule of each
    /// slot they need and of each slot in `slots` (the table and chain are made if
    /// missing). Idempotent: an element already in its set (same key) is not added
    /// again, so its count goes on; a set or rule already there is kept. The table,
    /// chain, sets, rules and the first elements go in one transaction; a long element
    /// list continues in further ones.
    pub fn add(&self, slots: &[Slot], counters: &[PrefixCounter]) -> Result<()> {
        let present = self.dump()?;
        let mut wanted: BTreeSet<Slot> = slots.iter().copied().collect();
        wanted.extend(counters.iter().map(Slot::of));
        let mut messages = vec![self.new_table(), self.new_chain()];
        for slot in &wanted {
            let name = slot.set_name();
            if !present.sets.iter().any(|s| s.name == name) {
                messages.push(self.new_set(*slot));
            }
            if !present.rules.iter().any(|r| r.slot == Some(*slot)) {
                messages.push(self.new_rule(*slot));
            }
        }
        let mut per_set: BTreeMap<Slot, Vec<&PrefixCounter>> = BTreeMap::new();
        let mut keys: BTreeSet<(Slot, Ipv4Addr)> =
            present.elements.iter().map(|e| (e.slot, e.key)).collect();
        for c in counters {
            if keys.insert((Slot::of(c), c.prefix.addr())) {
                per_set.entry(Slot::of(c)).or_default().push(c);
            }
        }
        for (slot, list) in &per_set {
            for chunk in list.chunks(ELEMENTS_PER_MESSAGE) {
                messages.push(self.new_elements(*slot, chunk));
            }
        }
        self.transact_split("add nftables counters", messages)
    }

    /// [`Nft::add`] without extra slots.
    pub fn add_counters(&self, counters: &[PrefixCounter]) -> Result<()> {
        self.add(&[], counters)
    }

    /// The elements of our counting sets with their counters. A missing table is no
    /// counters.
    pub fn counters(&self) -> Result<Vec<CounterReading>> {
        let sets = self.sets()?;
        self.elements(&sets)
    }

    /// Rules of the chain, sets of the table and elements of our sets.
    pub fn dump(&self) -> Result<CounterDump> {
        let rules = self.rules()?;
        let sets = self.sets()?;
        let elements = self.elements(&sets)?;
        Ok(CounterDump {
            rules,
            sets,
            elements,
        })
    }

    /// Every rule of the counting chain. A missing table or chain is an empty chain.
    pub fn rules(&self) -> Result<Vec<RuleReading>> {
        let mut out = Vec::new();
        for _ in 0..DUMP_TRIES {
            let mut m = Message::new(NFT_MSG_GETRULE, NLM_F_DUMP, NFPROTO_IPV4);
            m.str(NFTA_RULE_TABLE, &self.table);
            let (rules, interrupted) = self.dump_of("dump nftables rules", m, NFT_MSG_NEWRULE)?;
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

    /// Every set of the table. A missing table has none.
    pub fn sets(&self) -> Result<Vec<SetReading>> {
        let mut out = Vec::new();
        for _ in 0..DUMP_TRIES {
            let mut m = Message::new(NFT_MSG_GETSET, NLM_F_DUMP, NFPROTO_IPV4);
            m.str(NFTA_SET_TABLE, &self.table);
            let (sets, interrupted) = self.dump_of("dump nftables sets", m, NFT_MSG_NEWSET)?;
            out = sets
                .iter()
                .filter_map(|payload| parse_set(payload))
                .filter(|(table, _)| *table == self.table)
                .map(|(_, set)| set)
                .collect();
            if !interrupted {
                break;
            }
        }
        Ok(out)
    }

    /// The elements of those of `sets` that are ours.
    fn elements(&self, sets: &[SetReading]) -> Result<Vec<CounterReading>> {
        let mut out = Vec::new();
        for set in sets {
            let Some(slot) = set.slot else { continue };
            let mut found = Vec::new();
            for _ in 0..DUMP_TRIES {
                let mut m = Message::new(NFT_MSG_GETSETELEM, NLM_F_DUMP, NFPROTO_IPV4);
                m.str(NFTA_SET_ELEM_LIST_TABLE, &self.table);
                m.str(NFTA_SET_ELEM_LIST_SET, &set.name);
                let (payloads, interrupted) =
                    self.dump_of("dump nftables set elements", m, NFT_MSG_NEWSETELEM)?;
                found = payloads
                    .iter()
                    .flat_map(|p| parse_elements(p, &self.table, slot))
                    .collect();
                if !interrupted {
                    break;
                }
            }
            out.extend(found);
        }
        Ok(out)
    }

    /// Deletes rules of the counting chain by handle, in one transaction. Rules that
    /// are already gone are not an error.
    pub fn delete_rules(&self, handles: &[u64]) -> Result<()> {
        let messages = handles.iter().map(|h| self.del_rule(*h)).collect();
        self.transact_tolerant("delete nftables rules", messages)
    }

    /// Deletes elements (by set and key). Elements that are already gone are not an
    /// error.
    pub fn delete_elements(&self, elements: &[(Slot, Ipv4Addr)]) -> Result<()> {
        let mut per_set: BTreeMap<Slot, Vec<Ipv4Addr>> = BTreeMap::new();
        for (slot, key) in elements {
            per_set.entry(*slot).or_default().push(*key);
        }
        // One element per message, so that one already gone skips only itself.
        let mut messages = Vec::new();
        for (slot, keys) in &per_set {
            for key in keys {
                messages.push(self.del_elements(*slot, std::slice::from_ref(key)));
            }
        }
        self.transact_tolerant("delete nftables set elements", messages)
    }

    /// Deletes sets of the table by name, with their elements (their rules must be
    /// gone first). Sets that are already gone are not an error.
    pub fn delete_sets(&self, names: &[String]) -> Result<()> {
        let messages = names.iter().map(|n| self.del_set(n)).collect();
        self.transact_tolerant("delete nftables sets", messages)
    }

    /// Deletes the table with its chain, rules, sets and counters. A table that is
    /// already gone is not an error.
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

    /// `set to_24 { type ipv4_addr; counter; }`: a hash keyed by the 4-byte address,
    /// with a counter template the kernel clones into each new element.
    fn new_set(&self, slot: Slot) -> Message {
        let mut m = Message::new(NFT_MSG_NEWSET, NLM_F_CREATE | NLM_F_ACK, NFPROTO_IPV4);
        m.str(NFTA_SET_TABLE, &self.table);
        m.str(NFTA_SET_NAME, &slot.set_name());
        m.be32(NFTA_SET_FLAGS, 0);
        m.be32(NFTA_SET_KEY_TYPE, TYPE_IPADDR);
        m.be32(NFTA_SET_KEY_LEN, 4);
        // Required by the kernel: names the set within its transaction (we refer to it
        // by name, which works as well once the set is in the batch).
        m.be32(NFTA_SET_ID, self.next_seq());
        let e = m.nest(NFTA_SET_EXPR);
        m.str(NFTA_EXPR_NAME, "counter");
        // No initial values: as nft sends it (each element starts at zero).
        let data = m.nest(NFTA_EXPR_DATA);
        m.end(data);
        m.end(e);
        m
    }

    /// `ip daddr & <mask> @to_24`.
    fn new_rule(&self, slot: Slot) -> Message {
        let mut m = Message::new(
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK,
            NFPROTO_IPV4,
        );
        m.str(NFTA_RULE_TABLE, &self.table);
        m.str(NFTA_RULE_CHAIN, &self.chain);
        let list = m.nest(NFTA_RULE_EXPRESSIONS);
        encode_lookup(&mut m, slot);
        m.end(list);
        m.attr(NFTA_RULE_USERDATA, &comment_udata(&slot.rule_comment()));
        m
    }

    fn new_elements(&self, slot: Slot, counters: &[&PrefixCounter]) -> Message {
        let mut m = Message::new(NFT_MSG_NEWSETELEM, NLM_F_CREATE | NLM_F_ACK, NFPROTO_IPV4);
        m.str(NFTA_SET_ELEM_LIST_TABLE, &self.table);
        m.str(NFTA_SET_ELEM_LIST_SET, &slot.set_name());
        let list = m.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
        for c in counters {
            let elem = m.nest(NFTA_LIST_ELEM);
            m.data(NFTA_SET_ELEM_KEY, &c.prefix.addr().octets());
            m.attr(NFTA_SET_ELEM_USERDATA, &comment_udata(&c.comment()));
            m.end(elem);
        }
        m.end(list);
        m
    }

    fn del_elements(&self, slot: Slot, keys: &[Ipv4Addr]) -> Message {
        let mut m = Message::new(NFT_MSG_DELSETELEM, NLM_F_ACK, NFPROTO_IPV4);
        m.str(NFTA_SET_ELEM_LIST_TABLE, &self.table);
        m.str(NFTA_SET_ELEM_LIST_SET, &slot.set_name());
        let list = m.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
        for key in keys {
            let elem = m.nest(NFTA_LIST_ELEM);
            m.data(NFTA_SET_ELEM_KEY, &key.octets());
            m.end(elem);
        }
        m.end(list);
        m
    }

    fn del_set(&self, name: &str) -> Message {
        let mut m = Message::new(NFT_MSG_DELSET, NLM_F_ACK, NFPROTO_IPV4);
        m.str(NFTA_SET_TABLE, &self.table);
        m.str(NFTA_SET_NAME, name);
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

    /// Sends `messages` in as few batches as fit in [`BATCH_BYTES`], in order.
    fn transact_split(&self, op: &'static str, messages: Vec<Message>) -> Result<()> {
        for batch in split_batches(messages) {
            self.transact(op, batch)?;
        }
        Ok(())
    }

    /// Deletions: one batch per [`BATCH_BYTES`]; when something is already gone
    /// (ENOENT fails the whole batch), the batch's messages are sent one by one and
    /// the gone ones skipped.
    fn transact_tolerant(&self, op: &'static str, messages: Vec<Message>) -> Result<()> {
        for batch in split_batches(messages) {
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

    /// Sends `messages` as one batch and waits for every message's answer.
    fn transact(&self, op: &'static str, messages: Vec<Message>) -> Result<()> {
        let begin = self.next_seq();
        let mut buf = Message::batch(NFNL_MSG_BATCH_BEGIN).finish(begin);
        let mut pending = Vec::new();
        // What each message was, to name the one that failed.
        let mut kinds: Vec<(u32, u16)> = Vec::new();
        for m in messages {
            let seq = self.next_seq();
            pending.push(seq);
            kinds.push((seq, m.kind()));
            buf.extend_from_slice(&m.finish(seq));
        }
        let end = self.next_seq();
        buf.extend_from_slice(&Message::batch(NFNL_MSG_BATCH_END).finish(end));
        send(self.fd.as_raw_fd(), &buf, MsgFlags::empty())
            .map_err(|errno| classify_errno(op, errno))?;

        // Successes are acknowledged one by one after the commit; a failure aborts
        // the whole batch and comes as an error on the failing message (or on the
        // batch's first message for EPERM, a missing subsystem or a failed commit).
        let mut failure: Option<(u32, Errno)> = None;
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
                    failure = Some((msg.seq, Errno::from_raw(-code)));
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
    /// type `reply`; returns them and whether the dump was interrupted by a concurrent
    /// change. ENOENT (no such table or set) is an empty dump.
    fn dump_of(
        &self,
        op: &'static str,
        request: Message,
        reply: u16,
    ) -> Result<(Vec<Vec<u8>>, bool)> {
        let seq = self.next_seq();
        send(self.fd.as_raw_fd(), &request.finish(seq), MsgFlags::empty())
            .map_err(|errno| classify_errno(op, errno))?;
        let mut out = Vec::new();
        let mut interrupted = false;
        let mut rx = vec![0u8; RECV_BUFFER];
        loop {
            let n = match recv(self.fd.as_raw_fd(), &mut rx, MsgFlags::empty()) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    return Err(KernelError::Errno {
                        op: format!("{op}: no answer within {RECV_TIMEOUT_SECS}s"),
                        errno: Errno::ETIMEDOUT,
                    })
                }
                Err(errno) => return Err(classify_errno(op, errno)),
            };
            for msg in messages_in(&rx[..n]) {
                if msg.seq != seq {
                    continue;
                }
                interrupted |= msg.flags & NLM_F_DUMP_INTR != 0;
                match msg.kind {
                    NLMSG_DONE => return Ok((out, interrupted)),
                    NLMSG_ERROR => {
                        let code = msg
                            .payload
                            .get(..4)
                            .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("four bytes")));
                        if code == 0 {
                            return Ok((out, interrupted));
                        }
                        let errno = Errno::from_raw(-code);
                        if errno == Errno::ENOENT {
                            return Ok((Vec::new(), false));
                        }
                        return Err(classify_errno(op, errno));
                    }
                    kind if kind == nft_type(reply) => out.push(msg.payload.to_vec()),
                    _ => {}
                }
            }
        }
    }
}

/// Groups messages into batches of at most [`BATCH_BYTES`] (a message larger than
/// that goes alone), in order.
fn split_batches(messages: Vec<Message>) -> Vec<Vec<Message>> {
    let mut out: Vec<Vec<Message>> = Vec::new();
    let mut size = 0;
    for m in messages {
        let len = m.buf.len();
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
fn classify_errno(op: &str, errno: Errno) -> KernelError {
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

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// A counting rule's expressions: load the address, mask it to the prefix length
/// (nothing to mask for a /32), look it up in the slot's set.
fn encode_lookup(m: &mut Message, slot: Slot) {
    let e = m.expr("payload");
    m.be32(NFTA_PAYLOAD_DREG, NFT_REG_1);
    m.be32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER);
    m.be32(NFTA_PAYLOAD_OFFSET, slot.direction.offset());
    m.be32(NFTA_PAYLOAD_LEN, 4);
    m.end_expr(e);
    if slot.prefix_len < 32 {
        let e = m.expr("bitwise");
        m.be32(NFTA_BITWISE_SREG, NFT_REG_1);
        m.be32(NFTA_BITWISE_DREG, NFT_REG_1);
        m.be32(NFTA_BITWISE_LEN, 4);
        m.data(NFTA_BITWISE_MASK, &mask_of(slot.prefix_len).to_be_bytes());
        m.data(NFTA_BITWISE_XOR, &[0; 4]);
        m.end_expr(e);
    }
    let e = m.expr("lookup");
    m.str(NFTA_LOOKUP_SET, &slot.set_name());
    m.be32(NFTA_LOOKUP_SREG, NFT_REG_1);
    m.end_expr(e);
}
fn mask_of(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

/// The userdata libnftnl writes for a rule or element comment: type, length, the text with NUL.
fn comment_udata(comment: &str) -> Vec<u8> {
    let mut value = comment.as_bytes().to_vec();
    value.push(0);
    // NFT_USERDATA_MAXLEN is 256 for the whole blob; our comments are far shorter
    // (stack names have at most 64 characters).
    let len = u8::try_from(value.len()).expect("comment under 255 bytes");
    let mut out = vec![UDATA_COMMENT, len];
    out.extend_from_slice(&value);
    out
}

/// The comment in a rule's or element's userdata, if there is one.
fn comment_of(udata: &[u8]) -> Option<String> {
    let mut rest = udata;
    while rest.len() >= 2 {
        let (kind, len) = (rest[0], usize::from(rest[1]));
        let value = rest.get(2..2 + len)?;
        if kind == UDATA_COMMENT {
            let text = value.strip_suffix(&[0]).unwrap_or(value);
            return String::from_utf8(text.to_vec()).ok();
        }
        rest = &rest[2 + len..];
    }
    None
}

/// A NEWRULE payload (nfgenmsg and attributes) as (table, chain, reading).
fn parse_rule(payload: &[u8]) -> Option<(String, String, RuleReading)> {
    let mut table = None;
    let mut chain = None;
    let mut handle = None;
    let mut exprs = Vec::new();
    for (kind, value) in attrs(payload.get(NFGENMSG_LEN..)?) {
        match kind {
            NFTA_RULE_TABLE => table = Some(c_string(value)),
            NFTA_RULE_CHAIN => chain = Some(c_string(value)),
            NFTA_RULE_HANDLE => handle = be64(value),
            NFTA_RULE_EXPRESSIONS => exprs.extend(list_exprs(value)),
            _ => {}
        }
    }
    Some((
        table?,
        chain?,
        RuleReading {
            handle: handle?,
            slot: decode_rule(&exprs),
        },
    ))
}

/// A NEWSET payload as (table, reading).
fn parse_set(payload: &[u8]) -> Option<(String, SetReading)> {
    let mut table = None;
    let mut name = None;
    let mut flags = None;
    let mut key_len = None;
    let mut exprs = Vec::new();
    for (kind, value) in attrs(payload.get(NFGENMSG_LEN..)?) {
        match kind {
            NFTA_SET_TABLE => table = Some(c_string(value)),
            NFTA_SET_NAME => name = Some(c_string(value)),
            NFTA_SET_FLAGS => flags = be32(value),
            NFTA_SET_KEY_LEN => key_len = be32(value),
            NFTA_SET_EXPR => exprs.push(parse_expr(value)),
            NFTA_SET_EXPRESSIONS => exprs.extend(list_exprs(value)),
            _ => {}
        }
    }
    let name = name?;
    let counts = matches!(exprs.as_slice(), [Expr::Counter { .. }]);
    let slot = Slot::from_set_name(&name)
        .filter(|_| flags.unwrap_or(0) == 0 && key_len == Some(4) && counts);
    Some((table?, SetReading { name, slot }))
}

/// The elements of a NEWSETELEM payload of set `slot` in `table`; none if the
/// payload is of another table or set.
fn parse_elements(payload: &[u8], table: &str, slot: Slot) -> Vec<CounterReading> {
    let Some(body) = payload.get(NFGENMSG_LEN..) else {
        return Vec::new();
    };
    let mut of_table = None;
    let mut of_set = None;
    let mut out = Vec::new();
    for (kind, value) in attrs(body) {
        match kind {
            NFTA_SET_ELEM_LIST_TABLE => of_table = Some(c_string(value)),
            NFTA_SET_ELEM_LIST_SET => of_set = Some(c_string(value)),
            NFTA_SET_ELEM_LIST_ELEMENTS => out.extend(
                attrs(value)
                    .filter(|(k, _)| *k == NFTA_LIST_ELEM)
                    .filter_map(|(_, elem)| parse_element(elem, slot)),
            ),
            _ => {}
        }
    }
    if of_table.as_deref() != Some(table) || of_set != Some(slot.set_name()) {
        return Vec::new();
    }
    out
}

/// One element (the attributes in an NFTA_LIST_ELEM) of set `slot`.
fn parse_element(elem: &[u8], slot: Slot) -> Option<CounterReading> {
    let mut key = None;
    let mut comment = None;
    let mut exprs = Vec::new();
    for (kind, value) in attrs(elem) {
        match kind {
            NFTA_SET_ELEM_KEY => {
                key = attrs(value)
                    .find(|(k, _)| *k == NFTA_DATA_VALUE)
                    .and_then(|(_, v)| <[u8; 4]>::try_from(v).ok())
                    .map(Ipv4Addr::from);
            }
            NFTA_SET_ELEM_USERDATA => comment = comment_of(value),
            NFTA_SET_ELEM_EXPR => exprs.push(parse_expr(value)),
            NFTA_SET_ELEM_EXPRESSIONS => exprs.extend(list_exprs(value)),
            _ => {}
        }
    }
    let key = key?;
    let (bytes, packets) = exprs
        .iter()
        .find_map(|e| match e {
            Expr::Counter { bytes, packets } => Some((*bytes, *packets)),
            _ => None,
        })
        .unwrap_or((0, 0));
    let counter = comment
        .as_deref()
        .and_then(PrefixCounter::from_comment)
        .filter(|c| Slot::of(c) == slot && c.prefix.addr() == key);
    Some(CounterReading {
        slot,
        key,
        counter,
        bytes,
        packets,
    })
}

/// One expression of a dumped rule, reduced to what a counting rule, set or element uses.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    Payload {
        base: u32,
        offset: u32,
        len: u32,
    },
    Bitwise {
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    Lookup {
        set: String,
        sreg: u32,
        dreg: Option<u32>,
        flags: u32,
    },
    Counter {
        bytes: u64,
        packets: u64,
    },
    Other(String),
}

/// The expressions of a nested NFTA_LIST_ELEM list (a rule's, a set's, an element's).
fn list_exprs(list: &[u8]) -> impl Iterator<Item = Expr> + '_ {
    attrs(list)
        .filter(|(k, _)| *k == NFTA_LIST_ELEM)
        .map(|(_, body)| parse_expr(body))
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
        "lookup" => Expr::Lookup {
            set: get(NFTA_LOOKUP_SET).map(c_string).unwrap_or_default(),
            sreg: u32_of(NFTA_LOOKUP_SREG),
            dreg: get(NFTA_LOOKUP_DREG).and_then(be32),
            flags: get(NFTA_LOOKUP_FLAGS).and_then(be32).unwrap_or(0),
        },
        "counter" => Expr::Counter {
            bytes: get(NFTA_COUNTER_BYTES).and_then(be64).unwrap_or(0),
            packets: get(NFTA_COUNTER_PACKETS).and_then(be64).unwrap_or(0),
        },
        _ => Expr::Other(name),
    }
}

/// The slot a rule's expressions look up, if they are exactly `payload [bitwise]
/// lookup` of an IPv4 address into the slot's set, masked to the slot's length.
fn decode_rule(exprs: &[Expr]) -> Option<Slot> {
    let (load, mask, lookup) = match exprs {
        [load, Expr::Bitwise { mask, xor }, lookup] if xor == &[0; 4] => {
            (load, Some(mask.as_slice()), lookup)
        }
        [load, lookup] => (load, None, lookup),
        _ => return None,
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
        _ => return None,
    };
    let Expr::Lookup {
        set,
        sreg: NFT_REG_1,
        dreg: None,
        flags: 0,
    } = lookup
    else {
        return None;
    };
    let prefix_len = match mask {
        None => 32,
        Some(mask) => {
            let mask = u32::from_be_bytes(<[u8; 4]>::try_from(mask).ok()?);
            let len = mask.leading_ones() as u8;
            if mask_of(len) != mask || len == 32 {
                return None;
            }
            len
        }
    };
    let slot = Slot {
        direction,
        prefix_len,
    };
    (Slot::from_set_name(set) == Some(slot)).then_some(slot)
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
#[derive(Clone)]
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

    /// The netlink message type.
    fn kind(&self) -> u16 {
        u16::from_ne_bytes([self.buf[4], self.buf[5]])
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

    fn slot(direction: Direction, prefix_len: u8) -> Slot {
        Slot {
            direction,
            prefix_len,
        }
    }

    /// The attributes after nlmsghdr and nfgenmsg of an encoded message.
    fn body(buf: &[u8]) -> &[u8] {
        &buf[NLMSG_HDRLEN + NFGENMSG_LEN..]
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
    fn set_names_round_trip() {
        for s in [
            slot(Direction::ToPrefix, 24),
            slot(Direction::FromPrefix, 32),
            slot(Direction::ToPrefix, 0),
        ] {
            assert_eq!(Slot::from_set_name(&s.set_name()), Some(s));
        }
        assert_eq!(slot(Direction::FromPrefix, 16).set_name(), "from_16");
        for other in [
            "", "to", "to_", "to_33", "to_024", "to_+4", "up_24", "to_24_x",
        ] {
            assert_eq!(Slot::from_set_name(other), None, "{other:?}");
        }
        assert_eq!(
            Slot::of(&counter(Direction::FromPrefix, "10.2.0.0/16", "b")),
            slot(Direction::FromPrefix, 16)
        );
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

    /// A rule as the kernel would dump it (the NEWRULE attributes plus a handle).
    fn dumped_rule(s: Slot, handle: u64) -> Vec<u8> {
        let mut m = Message::new(NFT_MSG_NEWRULE, 0, NFPROTO_IPV4);
        m.str(NFTA_RULE_TABLE, "vrouter");
        m.str(NFTA_RULE_CHAIN, "traffic");
        m.be64(NFTA_RULE_HANDLE, handle);
        let list = m.nest(NFTA_RULE_EXPRESSIONS);
        encode_lookup(&mut m, s);
        m.end(list);
        m.attr(NFTA_RULE_USERDATA, &comment_udata(&s.rule_comment()));
        m.finish(7)[NLMSG_HDRLEN..].to_vec()
    }

    #[test]
    fn rules_round_trip_through_the_encoding() {
        for s in [
            slot(Direction::ToPrefix, 24),
            slot(Direction::FromPrefix, 16),
            slot(Direction::FromPrefix, 32),
            slot(Direction::ToPrefix, 0),
        ] {
            let (table, chain, reading) = parse_rule(&dumped_rule(s, 42)).unwrap();
            assert_eq!((table.as_str(), chain.as_str()), ("vrouter", "traffic"));
            assert_eq!(
                reading,
                RuleReading {
                    handle: 42,
                    slot: Some(s)
                }
            );
        }
    }

    #[test]
    fn lookup_encoding_is_what_nft_writes() {
        // `ip daddr & 255.255.255.0 @to_24`: payload load 4b @ network header + 16,
        // bitwise mask ffffff00 xor 0, lookup reg 1 set to_24 (as `nft --debug=netlink`
        // shows it).
        let mut m = Message::new(NFT_MSG_NEWRULE, 0, NFPROTO_IPV4);
        let list = m.nest(NFTA_RULE_EXPRESSIONS);
        encode_lookup(&mut m, slot(Direction::ToPrefix, 24));
        m.end(list);
        let buf = m.finish(1);
        let (_, list) = attrs(body(&buf)).next().unwrap();
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
                Expr::Lookup {
                    set: "to_24".into(),
                    sreg: 1,
                    dreg: None,
                    flags: 0
                },
            ]
        );
        // Nested attributes carry NLA_F_NESTED, as the kernel's strict parsers want.
        let kind = u16::from_ne_bytes([buf[NLMSG_HDRLEN + 6], buf[NLMSG_HDRLEN + 7]]);
        assert_eq!(kind, NFTA_RULE_EXPRESSIONS | NLA_F_NESTED);
    }

    #[test]
    fn other_rules_are_not_ours() {
        let payload = |e: Expr| e;
        let daddr = payload(Expr::Payload {
            base: 1,
            offset: 16,
            len: 4,
        });
        let lookup = |set: &str, flags| Expr::Lookup {
            set: set.into(),
            sreg: 1,
            dreg: None,
            flags,
        };
        let mask24 = Expr::Bitwise {
            mask: vec![255, 255, 255, 0],
            xor: vec![0; 4],
        };
        assert_eq!(
            decode_rule(&[daddr.clone(), mask24.clone(), lookup("to_24", 0)]),
            Some(slot(Direction::ToPrefix, 24))
        );
        for exprs in [
            // The set of another length or direction than the mask and load say.
            vec![daddr.clone(), mask24.clone(), lookup("to_16", 0)],
            vec![daddr.clone(), mask24.clone(), lookup("from_24", 0)],
            vec![daddr.clone(), lookup("to_24", 0)],
            // Inverted lookup (`!= @to_24`).
            vec![daddr.clone(), mask24.clone(), lookup("to_24", 1)],
            // A non-prefix mask.
            vec![
                daddr.clone(),
                Expr::Bitwise {
                    mask: vec![255, 0, 255, 0],
                    xor: vec![0; 4],
                },
                lookup("to_24", 0),
            ],
            // The per-prefix rule of earlier versions: payload, bitwise, cmp, counter.
            vec![
                daddr.clone(),
                mask24.clone(),
                Expr::Other("cmp".into()),
                Expr::Counter {
                    bytes: 0,
                    packets: 0,
                },
            ],
            vec![],
        ] {
            assert_eq!(decode_rule(&exprs), None, "{exprs:?}");
        }
    }

    #[test]
    fn the_set_has_a_counter_template() {
        let nft_set = |flags: u32, key_len: u32, with_counter: bool, name: &str| {
            let mut m = Message::new(NFT_MSG_NEWSET, 0, NFPROTO_IPV4);
            m.str(NFTA_SET_TABLE, "vrouter");
            m.str(NFTA_SET_NAME, name);
            m.be32(NFTA_SET_FLAGS, flags);
            m.be32(NFTA_SET_KEY_TYPE, TYPE_IPADDR);
            m.be32(NFTA_SET_KEY_LEN, key_len);
            if with_counter {
                let e = m.nest(NFTA_SET_EXPR);
                m.str(NFTA_EXPR_NAME, "counter");
                let data = m.nest(NFTA_EXPR_DATA);
                m.end(data);
                m.end(e);
            }
            parse_set(&m.finish(1)[NLMSG_HDRLEN..]).unwrap()
        };
        let to24 = Some(slot(Direction::ToPrefix, 24));
        assert_eq!(nft_set(0, 4, true, "to_24").1.slot, to24);
        assert_eq!(nft_set(0, 4, true, "to_24").0, "vrouter");
        assert_eq!(nft_set(NFT_SET_INTERVAL, 4, true, "to_24").1.slot, None);
        assert_eq!(nft_set(0, 16, true, "to_24").1.slot, None);
        assert_eq!(nft_set(0, 4, false, "to_24").1.slot, None);
        assert_eq!(nft_set(0, 4, true, "mine").1.slot, None);

        // What `new_set` sends parses back as ours (the same attributes).
        let nft = Nft {
            fd: socket(
                AddressFamily::Unix,
                SockType::Datagram,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap(),
            table: "vrouter".into(),
            chain: "traffic".into(),
            seq: AtomicU32::new(1),
        };
        let sent = nft.new_set(slot(Direction::FromPrefix, 32)).finish(1);
        let (table, set) = parse_set(&sent[NLMSG_HDRLEN..]).unwrap();
        assert_eq!(table, "vrouter");
        assert_eq!(
            set,
            SetReading {
                name: "from_32".into(),
                slot: Some(slot(Direction::FromPrefix, 32))
            }
        );
    }

    const NFT_SET_INTERVAL: u32 = 0x4;

    /// Elements as the kernel dumps them: the NEWSETELEM that `new_elements` sends,
    /// with a counter expression added to each element.
    fn dumped_elements(
        table: &str,
        s: Slot,
        elems: &[(Ipv4Addr, Option<&str>, u64, u64)],
    ) -> Vec<u8> {
        let mut m = Message::new(NFT_MSG_NEWSETELEM, 0, NFPROTO_IPV4);
        m.str(NFTA_SET_ELEM_LIST_TABLE, table);
        m.str(NFTA_SET_ELEM_LIST_SET, &s.set_name());
        let list = m.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
        for (key, comment, bytes, packets) in elems {
            let elem = m.nest(NFTA_LIST_ELEM);
            m.data(NFTA_SET_ELEM_KEY, &key.octets());
            if let Some(c) = comment {
                m.attr(NFTA_SET_ELEM_USERDATA, &comment_udata(c));
            }
            let e = m.nest(NFTA_SET_ELEM_EXPR);
            m.str(NFTA_EXPR_NAME, "counter");
            let data = m.nest(NFTA_EXPR_DATA);
            m.be64(NFTA_COUNTER_BYTES, *bytes);
            m.be64(NFTA_COUNTER_PACKETS, *packets);
            m.end(data);
            m.end(e);
            m.end(elem);
        }
        m.end(list);
        m.finish(3)[NLMSG_HDRLEN..].to_vec()
    }

    #[test]
    fn elements_round_trip_with_their_counters() {
        let to24 = slot(Direction::ToPrefix, 24);
        let b = counter(Direction::ToPrefix, "10.2.0.0/24", "b");
        let c = counter(Direction::ToPrefix, "10.3.0.0/24", "c");
        let net = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let from = counter(Direction::FromPrefix, "10.4.0.0/24", "d");
        let payload = dumped_elements(
            "vrouter",
            to24,
            &[
                (net("10.2.0.0"), Some(&b.comment()), 1500, 3),
                (net("10.3.0.0"), Some(&c.comment()), 0, 0),
                // A comment for another key, another direction, none at all.
                (net("10.9.0.0"), Some(&b.comment()), 7, 1),
                (net("10.4.0.0"), Some(&from.comment()), 7, 1),
                (net("10.5.0.0"), None, 7, 1),
            ],
        );
        let got = parse_elements(&payload, "vrouter", to24);
        let want = |key: &str, counter: Option<&PrefixCounter>, bytes, packets| CounterReading {
            slot: to24,
            key: net(key),
            counter: counter.cloned(),
            bytes,
            packets,
        };
        assert_eq!(
            got,
            vec![
                want("10.2.0.0", Some(&b), 1500, 3),
                want("10.3.0.0", Some(&c), 0, 0),
                want("10.9.0.0", None, 7, 1),
                want("10.4.0.0", None, 7, 1),
                want("10.5.0.0", None, 7, 1),
            ]
        );
        // Another table's or set's answer is not taken.
        assert!(parse_elements(&payload, "other", to24).is_empty());
        assert!(parse_elements(&payload, "vrouter", slot(Direction::ToPrefix, 16)).is_empty());
    }

    #[test]
    fn element_messages_carry_key_and_comment() {
        let nft = Nft {
            fd: socket(
                AddressFamily::Unix,
                SockType::Datagram,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap(),
            table: "vrouter".into(),
            chain: "traffic".into(),
            seq: AtomicU32::new(1),
        };
        let to24 = slot(Direction::ToPrefix, 24);
        let b = counter(Direction::ToPrefix, "10.2.0.0/24", "b");
        let sent = nft.new_elements(to24, &[&b]).finish(1);
        // Parsed as a dump would be: key and comment; no counter yet (the kernel clones
        // the set's template), so zero.
        assert_eq!(
            parse_elements(&sent[NLMSG_HDRLEN..], "vrouter", to24),
            vec![CounterReading {
                slot: to24,
                key: Ipv4Addr::new(10, 2, 0, 0),
                counter: Some(b),
                bytes: 0,
                packets: 0,
            }]
        );
        let del = nft
            .del_elements(to24, &[Ipv4Addr::new(10, 2, 0, 0)])
            .finish(1);
        let got = parse_elements(&del[NLMSG_HDRLEN..], "vrouter", to24);
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].key, got[0].counter.clone()),
            (Ipv4Addr::new(10, 2, 0, 0), None)
        );
    }

    #[test]
    fn big_element_lists_are_split() {
        let mk = |n: usize| {
            // Attributes of 1,000 bytes up to about `n` bytes (one is at most 64 KiB).
            let mut m = Message::new(NFT_MSG_NEWSETELEM, 0, NFPROTO_IPV4);
            for _ in 0..n.div_ceil(1000) {
                m.attr(1, &[0; 996]);
            }
            m
        };
        let sizes =
            |batches: &[Vec<Message>]| -> Vec<usize> { batches.iter().map(Vec::len).collect() };
        assert!(split_batches(Vec::new()).is_empty());
        assert_eq!(sizes(&split_batches(vec![mk(10), mk(10)])), vec![2]);
        let big = BATCH_BYTES / 2;
        assert_eq!(
            sizes(&split_batches(vec![mk(big), mk(big), mk(big), mk(10)])),
            vec![1, 1, 2]
        );
        assert_eq!(
            sizes(&split_batches(vec![mk(BATCH_BYTES * 2), mk(10)])),
            vec![1, 1]
        );
        // A full chunk of elements with the longest comments fits one attribute.
        let long = counter(Direction::FromPrefix, "255.255.255.255/32", &"s".repeat(64));
        let list = vec![&long; ELEMENTS_PER_MESSAGE];
        let mut m = Message::new(NFT_MSG_NEWSETELEM, 0, NFPROTO_IPV4);
        let n = m.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
        for c in &list {
            let e = m.nest(NFTA_LIST_ELEM);
            m.data(NFTA_SET_ELEM_KEY, &c.prefix.addr().octets());
            m.attr(NFTA_SET_ELEM_USERDATA, &comment_udata(&c.comment()));
            m.end(e);
        }
        m.end(n);
        assert!(m.buf.len() < BATCH_BYTES);
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
        let buf = Message::new(NFT_MSG_GETSETELEM, NLM_F_DUMP, NFPROTO_IPV4).finish(1);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), 0x0a0d);
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
        assert!(parse_set(&junk).is_none());
        assert!(parse_elements(&junk, "vrouter", slot(Direction::ToPrefix, 24)).is_empty());
        assert!(parse_element(&[4, 0, 1, 0], slot(Direction::ToPrefix, 24)).is_none());
    }
}
