//! Decoding: what a dump of rules, sets and elements says, reduced to the readings of
//! `model.rs`. Anything that is not exactly what we create reads as not ours.

use super::encode::mask_of;
use super::message::attrs;
use super::model::{CounterReading, Direction, PrefixCounter, RuleReading, SetReading, Slot};
use super::uapi::*;
use std::net::Ipv4Addr;

/// The comment in a rule's or element's userdata, if there is one.
pub(super) fn comment_of(udata: &[u8]) -> Option<String> {
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
pub(super) fn parse_rule(payload: &[u8]) -> Option<(String, String, RuleReading)> {
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
pub(super) fn parse_set(payload: &[u8]) -> Option<(String, SetReading)> {
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
pub(super) fn parse_elements(payload: &[u8], table: &str, slot: Slot) -> Vec<CounterReading> {
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
pub(super) fn parse_element(elem: &[u8], slot: Slot) -> Option<CounterReading> {
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
pub(super) enum Expr {
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
pub(super) fn list_exprs(list: &[u8]) -> impl Iterator<Item = Expr> + '_ {
    attrs(list)
        .filter(|(k, _)| *k == NFTA_LIST_ELEM)
        .map(|(_, body)| parse_expr(body))
}

pub(super) fn parse_expr(body: &[u8]) -> Expr {
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
pub(super) fn decode_rule(exprs: &[Expr]) -> Option<Slot> {
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

pub(super) fn c_string(value: &[u8]) -> String {
    let text = value.split(|b| *b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(text).into_owned()
}

pub(super) fn be32(value: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(value.get(..4)?.try_into().ok()?))
}

pub(super) fn be64(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}
