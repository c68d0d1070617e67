//! Encoding: the requests that make and remove the table, chain, sets, rules and
//! elements of the counters, as nft itself writes them (`nft --debug=netlink`).

use super::message::{Attr, Request};
use super::model::{PrefixCounter, Slot};
use super::uapi::*;
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE};
use std::net::Ipv4Addr;

/// `table ip <table>`, created if missing.
pub(super) fn new_table(table: &str) -> Request {
    Request::new(
        NFT_MSG_NEWTABLE,
        NLM_F_CREATE | NLM_F_ACK,
        NFPROTO_IPV4,
        vec![Attr::str(NFTA_TABLE_NAME, table)],
    )
}

/// Deletes table `table` of family `family` (an NFPROTO_*).
pub(super) fn del_table(family: u8, table: &str) -> Request {
    Request::new(
        NFT_MSG_DELTABLE,
        NLM_F_ACK,
        family,
        vec![Attr::str(NFTA_TABLE_NAME, table)],
    )
}

/// The counting chain: type filter, hook forward, priority 0, policy accept.
pub(super) fn new_chain(table: &str, chain: &str) -> Request {
    Request::new(
        NFT_MSG_NEWCHAIN,
        NLM_F_CREATE | NLM_F_ACK,
        NFPROTO_IPV4,
        vec![
            Attr::str(NFTA_CHAIN_TABLE, table),
            Attr::str(NFTA_CHAIN_NAME, chain),
            Attr::Nest(
                NFTA_CHAIN_HOOK,
                vec![
                    Attr::be32(NFTA_HOOK_HOOKNUM, NF_INET_FORWARD),
                    Attr::be32(NFTA_HOOK_PRIORITY, 0),
                ],
            ),
            Attr::be32(NFTA_CHAIN_POLICY, NF_ACCEPT),
            Attr::str(NFTA_CHAIN_TYPE, "filter"),
        ],
    )
}

/// `set to_24 { type ipv4_addr; counter; }`: a hash keyed by the 4-byte address,
/// with a counter template the kernel clones into each new element. `id` names the
/// set within its transaction (required by the kernel; we refer to it by name, which
/// works as well once the set is in the batch).
pub(super) fn new_set(table: &str, slot: Slot, id: u32) -> Request {
    Request::new(
        NFT_MSG_NEWSET,
        NLM_F_CREATE | NLM_F_ACK,
        NFPROTO_IPV4,
        vec![
            Attr::str(NFTA_SET_TABLE, table),
            Attr::str(NFTA_SET_NAME, &slot.set_name()),
            Attr::be32(NFTA_SET_FLAGS, 0),
            Attr::be32(NFTA_SET_KEY_TYPE, TYPE_IPADDR),
            Attr::be32(NFTA_SET_KEY_LEN, 4),
            Attr::be32(NFTA_SET_ID, id),
            // No initial values: as nft sends it (each element starts at zero).
            Attr::Nest(
                NFTA_SET_EXPR,
                vec![
                    Attr::str(NFTA_EXPR_NAME, "counter"),
                    Attr::Nest(NFTA_EXPR_DATA, Vec::new()),
                ],
            ),
        ],
    )
}

pub(super) fn del_set(table: &str, name: &str) -> Request {
    Request::new(
        NFT_MSG_DELSET,
        NLM_F_ACK,
        NFPROTO_IPV4,
        vec![
            Attr::str(NFTA_SET_TABLE, table),
            Attr::str(NFTA_SET_NAME, name),
        ],
    )
}

/// `ip daddr & <mask> @to_24`, appended to the chain.
pub(super) fn new_rule(table: &str, chain: &str, slot: Slot) -> Request {
    Request::new(
        NFT_MSG_NEWRULE,
        NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK,
        NFPROTO_IPV4,
        vec![
            Attr::str(NFTA_RULE_TABLE, table),
            Attr::str(NFTA_RULE_CHAIN, chain),
            Attr::Nest(NFTA_RULE_EXPRESSIONS, lookup_exprs(slot)),
            Attr::bytes(NFTA_RULE_USERDATA, &comment_udata(&slot.rule_comment())),
        ],
    )
}

pub(super) fn del_rule(table: &str, chain: &str, handle: u64) -> Request {
    Request::new(
        NFT_MSG_DELRULE,
        NLM_F_ACK,
        NFPROTO_IPV4,
        vec![
            Attr::str(NFTA_RULE_TABLE, table),
            Attr::str(NFTA_RULE_CHAIN, chain),
            Attr::be64(NFTA_RULE_HANDLE, handle),
        ],
    )
}

/// Elements of set `slot`: each counter's key, with its comment.
pub(super) fn new_elements(table: &str, slot: Slot, counters: &[&PrefixCounter]) -> Request {
    let elements = counters
        .iter()
        .map(|c| {
            Attr::Nest(
                NFTA_LIST_ELEM,
                vec![
                    Attr::data(NFTA_SET_ELEM_KEY, &c.prefix.addr().octets()),
                    Attr::bytes(NFTA_SET_ELEM_USERDATA, &comment_udata(&c.comment())),
                ],
            )
        })
        .collect();
    element_list(
        NFT_MSG_NEWSETELEM,
        NLM_F_CREATE | NLM_F_ACK,
        table,
        slot,
        elements,
    )
}

pub(super) fn del_elements(table: &str, slot: Slot, keys: &[Ipv4Addr]) -> Request {
    let elements = keys
        .iter()
        .map(|key| {
            Attr::Nest(
                NFTA_LIST_ELEM,
                vec![Attr::data(NFTA_SET_ELEM_KEY, &key.octets())],
            )
        })
        .collect();
    element_list(NFT_MSG_DELSETELEM, NLM_F_ACK, table, slot, elements)
}

fn element_list(msg: u16, flags: u16, table: &str, slot: Slot, elements: Vec<Attr>) -> Request {
    Request::new(
        msg,
        flags,
        NFPROTO_IPV4,
        vec![
            Attr::str(NFTA_SET_ELEM_LIST_TABLE, table),
            Attr::str(NFTA_SET_ELEM_LIST_SET, &slot.set_name()),
            Attr::Nest(NFTA_SET_ELEM_LIST_ELEMENTS, elements),
        ],
    )
}

/// A counting rule's expressions: load the address, mask it to the prefix length
/// (nothing to mask for a /32), look it up in the slot's set.
pub(super) fn lookup_exprs(slot: Slot) -> Vec<Attr> {
    let mut out = vec![Attr::expr(
        "payload",
        vec![
            Attr::be32(NFTA_PAYLOAD_DREG, NFT_REG_1),
            Attr::be32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER),
            Attr::be32(NFTA_PAYLOAD_OFFSET, slot.direction.offset()),
            Attr::be32(NFTA_PAYLOAD_LEN, 4),
        ],
    )];
    if slot.prefix_len < 32 {
        out.push(Attr::expr(
            "bitwise",
            vec![
                Attr::be32(NFTA_BITWISE_SREG, NFT_REG_1),
                Attr::be32(NFTA_BITWISE_DREG, NFT_REG_1),
                Attr::be32(NFTA_BITWISE_LEN, 4),
                Attr::data(NFTA_BITWISE_MASK, &mask_of(slot.prefix_len).to_be_bytes()),
                Attr::data(NFTA_BITWISE_XOR, &[0; 4]),
            ],
        ));
    }
    out.push(Attr::expr(
        "lookup",
        vec![
            Attr::str(NFTA_LOOKUP_SET, &slot.set_name()),
            Attr::be32(NFTA_LOOKUP_SREG, NFT_REG_1),
        ],
    ));
    out
}

/// The netmask of a prefix length.
pub(super) fn mask_of(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

/// The userdata libnftnl writes for a rule or element comment: type, length, the text
/// with NUL. NFT_USERDATA_MAXLEN is 256 for the whole blob; callers keep comments
/// shorter (`PrefixCounter::owner_is_valid`).
pub(super) fn comment_udata(comment: &str) -> Vec<u8> {
    let mut value = comment.as_bytes().to_vec();
    value.push(0);
    let len = u8::try_from(value.len()).expect("comment under 255 bytes");
    let mut out = vec![UDATA_COMMENT, len];
    out.extend_from_slice(&value);
    out
}
