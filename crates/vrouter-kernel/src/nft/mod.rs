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
//! No crate types NF_TABLES messages under a permissive licence that fits this tree
//! (neli only knows NFLOG, rustables is GPL), so the module is in layers:
//!
//! - `uapi.rs`: the kernel's numbers;
//! - `model.rs`: the public values (slots, counters, readings);
//! - `message.rs`: the message model, `struct nfgenmsg` and an attribute tree, framed
//!   by netlink-packet-core (the crate's rtnetlink stack, as `nexthop.rs` uses it);
//! - `encode.rs` / `decode.rs`: requests as nft writes them, dumps read back;
//! - `socket.rs`: a netlink-sys NETLINK_NETFILTER socket, NFNL_MSG_BATCH_BEGIN/END
//!   transactions (a batch applies whole or not at all; large element lists are split
//!   in several batches to stay under the socket's send buffer) and dumps;
//! - this file: [`Nft`], the operations the router calls.
//!
//! Every u32/u64 goes in network byte order, as nf_tables expects (NLA_BE32/NLA_BE64).
//!
//! Each element carries its identity in its userdata, in the TLV format libnftnl uses
//! for comments, so `nft list ruleset` shows it as
//! `10.2.0.0 counter packets 0 bytes 0 comment "vrouter to 10.2.0.0/24 stack b"`, and
//! a dump maps an element back to its (owner, prefix, direction) without any state
//! outside the kernel. The owner is the caller's text ("stack b"): stacks are the
//! router's business, not this crate's. Rules and sets are recognised by their shape
//! and names.

mod decode;
mod encode;
mod message;
mod model;
mod ruleset;
mod socket;
#[cfg(test)]
mod tests;
mod uapi;

pub use model::{
    CounterDump, CounterReading, Direction, PrefixCounter, RuleReading, SetReading, Slot,
    MAX_OWNER_LEN,
};
pub use ruleset::{
    AddrField, BaseHook, ChainSpec, Family, Hook, Ipv4Range, MarkCounterReading, Match,
    RuleCounterReading, RuleSpec, RuleVerdict, SetElements, SetSpec, Statement, TableSpec,
    MAX_COMMENT_LEN,
};

use crate::{KernelError, Result};
use decode::{parse_elements, parse_rule, parse_set};
use message::{Attr, Request};
use nix::errno::Errno;
use rtnetlink::packet_core::NLM_F_DUMP;
use socket::NfSocket;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use uapi::*;

/// Dumps interrupted by a concurrent change are retried this often.
const DUMP_TRIES: usize = 3;
/// Elements per NEWSETELEM/DELSETELEM message: a nested attribute is at most 64 KiB
/// and an element with its comment about 130 bytes (at most about 170).
const ELEMENTS_PER_MESSAGE: usize = 256;

/// A socket on the nf_tables netlink subsystem of one network namespace, scoped to
/// one table (family ip, or netdev for [`Nft::connect_table`]) and its counting chain.
pub struct Nft {
    socket: NfSocket,
    family: Family,
    table: String,
    chain: String,
}

impl std::fmt::Debug for Nft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nft")
            .field("family", &self.family)
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
        Ok(Nft {
            socket: NfSocket::connect()?,
            family: Family::Ip,
            table: table.to_string(),
            chain: chain.to_string(),
        })
    }

    /// Opens a NETLINK_NETFILTER socket in the calling thread's network namespace for
    /// whole-table work on table `<family> <table>`: [`Nft::replace_table`],
    /// [`Nft::rule_counters`], [`Nft::mark_counters`], [`Nft::delete_table`]. (The
    /// counting-chain operations are for [`Nft::connect`]'s family ip table.)
    pub fn connect_table(family: Family, table: &str) -> Result<Nft> {
        Ok(Nft {
            socket: NfSocket::connect()?,
            family,
            table: table.to_string(),
            chain: String::new(),
        })
    }

    pub fn family(&self) -> Family {
        self.family
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
        self.socket.transact(
            "create nftables chain",
            vec![
                encode::new_table(&self.table),
                encode::new_chain(&self.table, &self.chain),
            ],
        )
    }

    /// Adds the counters that are not there yet, with the set and lookup rule of each
    /// slot they need and of each slot in `slots` (the table and chain are made if
    /// missing). Idempotent: an element already in its set (same key) is not added
    /// again, so its count goes on; a set or rule already there is kept. The table,
    /// chain, sets, rules and the first elements go in one transaction; a long element
    /// list continues in further ones.
    pub fn add(&self, slots: &[Slot], counters: &[PrefixCounter]) -> Result<()> {
        if let Some(bad) = counters.iter().find(|c| !c.owner_is_valid()) {
            return Err(KernelError::Errno {
                op: format!(
                    "add nftables counter for {}: its owner {:?} must be 1 to {MAX_OWNER_LEN} bytes without NUL",
                    bad.prefix, bad.owner
                ),
                errno: Errno::EINVAL,
            });
        }
        let present = self.dump()?;
        let mut wanted: BTreeSet<Slot> = slots.iter().copied().collect();
        wanted.extend(counters.iter().map(Slot::of));
        let mut messages = vec![
            encode::new_table(&self.table),
            encode::new_chain(&self.table, &self.chain),
        ];
        for slot in &wanted {
            let name = slot.set_name();
            if !present.sets.iter().any(|s| s.name == name) {
                messages.push(encode::new_set(&self.table, *slot, self.socket.next_seq()));
            }
            if !present.rules.iter().any(|r| r.slot == Some(*slot)) {
                messages.push(encode::new_rule(&self.table, &self.chain, *slot));
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
                messages.push(encode::new_elements(&self.table, *slot, chunk));
            }
        }
        self.socket
            .transact_split("add nftables counters", messages)
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

    /// A dump of `get` objects matching `attrs`, retried while a concurrent change
    /// interrupts it ([`DUMP_TRIES`] times; the last try stands). The reply payloads.
    fn dump_objects(
        &self,
        op: &'static str,
        get: u16,
        attrs: Vec<Attr>,
        reply: u16,
    ) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        for _ in 0..DUMP_TRIES {
            let m = Request::new(get, NLM_F_DUMP, self.family.nfproto(), attrs.clone());
            let (payloads, interrupted) = self.socket.dump(op, m, reply)?;
            out = payloads;
            if !interrupted {
                break;
            }
        }
        Ok(out)
    }

    /// The payloads of every rule of the table.
    fn dump_rules(&self) -> Result<Vec<Vec<u8>>> {
        self.dump_objects(
            "dump nftables rules",
            NFT_MSG_GETRULE,
            vec![Attr::str(NFTA_RULE_TABLE, &self.table)],
            NFT_MSG_NEWRULE,
        )
    }

    /// The payloads of the elements of set `set` of the table.
    fn dump_elements(&self, set: &str) -> Result<Vec<Vec<u8>>> {
        self.dump_objects(
            "dump nftables set elements",
            NFT_MSG_GETSETELEM,
            vec![
                Attr::str(NFTA_SET_ELEM_LIST_TABLE, &self.table),
                Attr::str(NFTA_SET_ELEM_LIST_SET, set),
            ],
            NFT_MSG_NEWSETELEM,
        )
    }

    /// Every rule of the counting chain. A missing table or chain is an empty chain.
    pub fn rules(&self) -> Result<Vec<RuleReading>> {
        Ok(self
            .dump_rules()?
            .iter()
            .filter_map(|payload| parse_rule(payload))
            .filter(|(table, chain, _)| *table == self.table && *chain == self.chain)
            .map(|(_, _, reading)| reading)
            .collect())
    }

    /// Every set of the table. A missing table has none.
    pub fn sets(&self) -> Result<Vec<SetReading>> {
        let sets = self.dump_objects(
            "dump nftables sets",
            NFT_MSG_GETSET,
            vec![Attr::str(NFTA_SET_TABLE, &self.table)],
            NFT_MSG_NEWSET,
        )?;
        Ok(sets
            .iter()
            .filter_map(|payload| parse_set(payload))
            .filter(|(table, _)| *table == self.table)
            .map(|(_, set)| set)
            .collect())
    }

    /// The elements of those of `sets` that are ours.
    fn elements(&self, sets: &[SetReading]) -> Result<Vec<CounterReading>> {
        let mut out = Vec::new();
        for set in sets {
            let Some(slot) = set.slot else { continue };
            out.extend(
                self.dump_elements(&set.name)?
                    .iter()
                    .flat_map(|p| parse_elements(p, &self.table, slot)),
            );
        }
        Ok(out)
    }

    /// Deletes rules of the counting chain by handle, in one transaction. Rules that
    /// are already gone are not an error.
    pub fn delete_rules(&self, handles: &[u64]) -> Result<()> {
        let messages = handles
            .iter()
            .map(|h| encode::del_rule(&self.table, &self.chain, *h))
            .collect();
        self.socket
            .transact_tolerant("delete nftables rules", messages)
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
                messages.push(encode::del_elements(
                    &self.table,
                    *slot,
                    std::slice::from_ref(key),
                ));
            }
        }
        self.socket
            .transact_tolerant("delete nftables set elements", messages)
    }

    /// Deletes sets of the table by name, with their elements (their rules must be
    /// gone first). Sets that are already gone are not an error.
    pub fn delete_sets(&self, names: &[String]) -> Result<()> {
        let messages = names
            .iter()
            .map(|n| encode::del_set(&self.table, n))
            .collect();
        self.socket
            .transact_tolerant("delete nftables sets", messages)
    }

    /// Deletes the table with its chain, rules, sets and counters. A table that is
    /// already gone is not an error, nor is a netdev table whose devices are gone
    /// (the kernel drops a base chain with its device, or keeps it unhooked).
    pub fn delete_table(&self) -> Result<()> {
        match self.socket.transact(
            "delete nftables table",
            vec![encode::del_table(self.family.nfproto(), &self.table)],
        ) {
            Err(KernelError::Errno {
                errno: Errno::ENOENT,
                ..
            }) => Ok(()),
            other => other,
        }
    }

    /// Deletes the table `self.table()` if present and creates `table` in ONE
    /// nftables batch (atomic: packets see the old or the new, never neither, and a
    /// table the kernel refuses leaves the old one as it was). Large batches raise the
    /// socket's send buffer (SO_SNDBUFFORCE, CAP_NET_ADMIN) rather than split.
    /// `table.name` and `table.family` must be this socket's. A table whose ingress
    /// hook names a device missing in this namespace fails with
    /// [`KernelError::NoSuchLink`] and changes nothing, whatever the kernel (6.18
    /// would take it and hook the device once it appears).
    pub fn replace_table(&self, table: &TableSpec) -> Result<()> {
        let invalid = |why: String| KernelError::Errno {
            op: format!(
                "replace nftables table {} {}: {why}",
                table.family.name(),
                table.name
            ),
            errno: Errno::EINVAL,
        };
        if table.name != self.table || table.family != self.family {
            return Err(invalid(format!(
                "this socket is for table {} {}",
                self.family.name(),
                self.table
            )));
        }
        ruleset::check(table).map_err(invalid)?;
        // Older kernels refuse a hook on a missing device (ENOENT); 6.18 takes it and
        // hooks the device once it appears. Refuse it here on every kernel.
        if let Some(device) = missing_device(table) {
            return Err(KernelError::NoSuchLink(device));
        }
        let mut messages = ruleset::replace_requests(table);
        // One acknowledgement, for the last message: it comes after the commit,
        // errors come for any message.
        if let Some(last) = messages.pop() {
            messages.push(ruleset::acked(last));
        }
        let result = self.socket.transact("replace nftables table", messages);
        // A device that went away meanwhile: ENOENT from older kernels.
        if let Err(KernelError::Errno {
            errno: Errno::ENOENT | Errno::ENODEV,
            ..
        }) = &result
        {
            if let Some(device) = missing_device(table) {
                return Err(KernelError::NoSuchLink(device));
            }
        }
        result
    }

    /// Every rule of every chain of the table, in chain and rule order as the kernel
    /// dumps them, with its comment and counter. A missing table has none.
    pub fn rule_counters(&self) -> Result<Vec<RuleCounterReading>> {
        Ok(self
            .dump_rules()?
            .iter()
            .filter_map(|payload| ruleset::parse_rule_counter(payload))
            .filter(|(table, _)| *table == self.table)
            .map(|(_, reading)| reading)
            .collect())
    }

    /// The elements of set `set` (a counted-marks set) with their counters, by key. A
    /// missing table or set has none.
    pub fn mark_counters(&self, set: &str) -> Result<Vec<MarkCounterReading>> {
        let mut out: Vec<MarkCounterReading> = self
            .dump_elements(set)?
            .iter()
            .flat_map(|p| ruleset::parse_mark_counters(p, &self.table, set))
            .collect();
        out.sort_by_key(|r| r.key);
        Ok(out)
    }
}

/// The first ingress device of `table` that does not exist in the calling thread's
/// namespace.
fn missing_device(table: &TableSpec) -> Option<String> {
    table
        .chains
        .iter()
        .find_map(|c| match c.hook.as_ref().map(|h| &h.hook) {
            Some(Hook::Ingress { device })
                if nix::net::if_::if_nametoindex(device.as_str()).is_err() =>
            {
                Some(device.clone())
            }
            _ => None,
        })
}
