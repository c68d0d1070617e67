//! Whole rulesets: a table of family ip or netdev described as plain values
//! ([`TableSpec`]: sets, chains, rules) and its encoding into one nf_tables
//! transaction that replaces the table whole (see [`super::Nft::replace_table`]); and
//! what a dump of its rule and set-element counters reads back.
//!
//! The encoding is what `nft -f` sends for the same ruleset (checked against
//! `nft --debug=netlink,mnl` of nftables 1.0.6; for a netdev table byte for byte, see
//! `testdata/netdev.nft` and the test beside it), expression by expression, so
//! `nft list table` prints it back as written:
//!
//! - interfaces: `meta load iifname` and a 16-byte NUL-padded `cmp`;
//! - addresses: `payload load 4b @ network header + 12/16` or `ct load src_ip/dst_ip,
//!   dir original`, then `lookup` (flag NFT_LOOKUP_F_INV for `!=`);
//! - `ct state new`: `ct load state`, `bitwise & 8`, `cmp neq 0`;
//! - `tcp flags & (fin|syn|rst|ack) != syn`: `meta l4proto tcp`, `payload load 1b @
//!   transport header + 13`, `bitwise & 0x17`, `cmp neq 0x02`;
//! - `ct original protocol P` / `proto-dst A[-B]`: `ct load protocol/proto_dst, dir
//!   original`, `cmp eq` (1 byte, 2 bytes big-endian), a range as `cmp gte` and `cmp
//!   lte`;
//! - `ip saddr . ether saddr`: `meta iiftype == ether` (nft's dependency for the link
//!   header), the address into register 1, the MAC into register 9 (32-bit register 1
//!   of the 16-byte register 1), one lookup of the 12-byte key (4 + 6, padded to 8);
//! - `ct mark set M`: `immediate` into register 1 and `ct set mark`; marks and their
//!   keys are host byte order (the kernel's u32 ct mark), everything else network order;
//! - comments: userdata TLV 0 (libnftnl's NFTNL_UDATA_RULE_COMMENT).
//!
//! In family netdev (frames at a device's ingress hook, before any IP processing):
//!
//! - nft's implicit dependencies go in once per rule where nft puts them: `meta
//!   protocol ip` before the first `ip saddr/daddr` (so an explicit
//!   [`Match::MetaProtocolIpv4`] first encodes exactly as without it), `meta iiftype
//!   ether` before the first Ethernet field read or written, `meta l4proto tcp` before
//!   `tcp flags` (none before `tcp option maxseg size set`, as nft);
//! - `meta length > N`: `meta load len`, `byteorder hton` (4 bytes), `cmp gt` with N
//!   big-endian; skb->len at netdev ingress is the L3 length (the Ethernet header is
//!   pulled), and so is what counters count;
//! - `tcp flags syn tcp option maxseg size > N`: `payload load 1b @ transport header +
//!   13`, `bitwise & 0x02` (no NFTA_BITWISE_OP, as nft for a flag match), `cmp neq 0`,
//!   `exthdr load tcpopt 2b @ 2 + 2`, `cmp gt`; `... size set N`: `immediate`, `exthdr
//!   write`. The kernel's write leaves an MSS at or below N alone (it never raises one)
//!   and fixes the checksum; the SYN match keeps other segments out of the option walk;
//! - `ether saddr/daddr set M`: `immediate` of 6 bytes, `payload write` at offset 6/0
//!   of the link header (no checksum); `fwd to I`: `immediate` of the host-order index, `fwd`;
//!   `fwd to ether daddr map @m`: `payload load` of the MAC, `lookup` into register 1,
//!   `fwd` (with a counter the rule is `ether daddr @m counter fwd to ...`, so the
//!   counter counts only hits);
//! - a `type ether_addr : iface_index` map: key 6 bytes, data a host-order u32;
//! - set elements carry attribute types 1, 2, 3, ... in each message, as libnftnl
//!   numbers them (the kernel reads any type).
//!
//! Interval sets and maps (rbtree) get one element per range start and an
//! INTERVAL_END element one past its end, preceded by an end element at 0.0.0.0 when
//! the first range does not start there (as nft sends it); a range that ends at
//! 255.255.255.255 has no end element (its start carries libnftnl's "open interval"
//! userdata flag, for `nft list`). The concatenated `ipv4_addr . ether_addr` set is a
//! pipapo set: NFTA_SET_DESC_CONCAT gives the field lengths and each element has a
//! KEY and a KEY_END. Sets carry the userdata nft writes (key byte order and so on)
//! so that `nft list` prints keys as addresses and marks rather than raw bytes.

use super::decode::{be64, c_string, comment_of, list_exprs, parse_expr, Expr};
use super::encode::comment_udata;
use super::message::attrs;
use super::message::{Attr, Request};
use super::uapi::*;
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE};
use std::net::Ipv4Addr;
use vrouter_state::Mac;

/// The longest rule or element comment.
pub const MAX_COMMENT_LEN: usize = 128;
/// Elements per NEWSETELEM message: a nested attribute is at most 64 KiB and an
/// element here at most about 200 bytes.
const ELEMENTS_PER_MESSAGE: usize = 256;

/// A table's address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `ip` (NFPROTO_IPV4).
    Ip,
    /// `netdev` (NFPROTO_NETDEV): ingress hooks of devices, frames with their
    /// Ethernet header.
    Netdev,
}

impl Family {
    pub(super) fn nfproto(self) -> u8 {
        match self {
            Family::Ip => NFPROTO_IPV4,
            Family::Netdev => NFPROTO_NETDEV,
        }
    }

    /// Its name in nft's syntax.
    pub fn name(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Netdev => "netdev",
        }
    }
}

/// A table (family ip or netdev): sets and chains, created whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub family: Family,
    pub name: String,
    pub sets: Vec<SetSpec>,
    pub chains: Vec<ChainSpec>,
}

/// A chain: a base chain when it has a hook, else a regular chain (jumped to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSpec {
    pub name: String,
    pub hook: Option<BaseHook>,
    pub rules: Vec<RuleSpec>,
}

/// A base chain's hook: `type filter hook forward` (family ip) or `type filter hook
/// ingress device <name>` (family netdev).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseHook {
    pub hook: Hook,
    pub priority: i32,
    /// `policy accept`, else `policy drop`.
    pub policy_accept: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hook {
    /// `hook forward` (family ip).
    Forward,
    /// `hook input` (family ip): packets for this host, before their socket.
    Input,
    /// `hook ingress device "<device>"` (family netdev; NFTA_HOOK_DEV). The device
    /// must exist when the table goes in.
    Ingress { device: String },
}

/// One rule: matches (all must hold), an optional counter, an optional `ct mark
/// set`, statements, a verdict, a comment. Expressions go in that order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub matches: Vec<Match>,
    pub counter: bool,
    /// The counter's initial (packets, bytes) (`counter packets P bytes B`), so that
    /// counts survive a table replacement; ignored without `counter`.
    pub counter_start: (u64, u64),
    pub set_ct_mark: Option<u32>,
    /// Statements after the counter and `ct mark set`, before the verdict.
    pub statements: Vec<Statement>,
    pub verdict: RuleVerdict,
    /// The rule's comment (userdata, libnftnl's comment TLV): at most
    /// [`MAX_COMMENT_LEN`] bytes, no NUL; empty for none.
    pub comment: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleVerdict {
    Accept,
    Drop,
    /// No verdict: the next rule decides.
    Continue,
    /// `return`.
    Return,
    /// `jump <chain>`.
    Jump(String),
    /// `goto <chain>`.
    Goto(String),
    /// `<field> vmap @<map>`: the verdict of the map's element holding the address
    /// (a [`SetElements::JumpMap`]); no element, no verdict.
    Vmap {
        field: AddrField,
        map: String,
    },
    /// `fwd to <ifindex>` (family netdev): the frame leaves by that device.
    FwdToIndex(u32),
    /// `fwd to ether daddr map @<map>` (family netdev; a [`SetElements::MacToIndex`]
    /// map): the frame leaves by the device its destination MAC maps to; a MAC not in
    /// the map, no verdict. With the rule's `counter`, the rule is `ether daddr @<map>
    /// counter fwd to ether daddr map @<map>` (what nft accepts: no statement may
    /// follow `fwd`), so the counter counts only frames the map forwards.
    FwdByEtherDaddrMap(String),
}

/// What a rule does to a frame before its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    /// `ether saddr set <mac>`.
    SetEtherSaddr(Mac),
    /// `ether daddr set <mac>`.
    SetEtherDaddr(Mac),
    /// `tcp option maxseg size set <mss>`: the kernel (nft_exthdr) rewrites an MSS
    /// option that is there (it never adds one) and never raises it: an MSS at or
    /// below `<mss>` stays. The checksum is updated.
    SetTcpMss(u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// `iifname "<name>"` (or `!=` when not `equal`).
    IifName { name: String, equal: bool },
    /// `oifname "<name>"` (or `!=`).
    OifName { name: String, equal: bool },
    /// `<field> @<set>` (or `!= @<set>`) for a [`SetElements::Ipv4Ranges`] set.
    AddrInSet {
        field: AddrField,
        set: String,
        equal: bool,
    },
    /// `ct state new`.
    CtStateNew,
    /// `meta l4proto tcp tcp flags & (fin|syn|rst|ack) != syn`.
    TcpNotSyn,
    /// `ct original protocol <P>`.
    CtOriginalProtocol(u8),
    /// `ct original proto-dst <first>` when first == last, `<first>-<last>` otherwise.
    CtOriginalDport { first: u16, last: u16 },
    /// `ct mark @<set>` for a [`SetElements::CountedMarks`] set.
    CtMarkInSet { set: String },
    /// `ip saddr . ether saddr != @<set>` for a [`SetElements::SourceMacs`] set.
    SourceMacNotInSet { set: String },
    /// `meta protocol ip`: the frame carries IPv4 (family netdev; nft's dependency of
    /// `ip` matches, which the encoding adds itself when missing).
    MetaProtocolIpv4,
    /// `meta l4proto <proto>`.
    MetaL4Proto(u8),
    /// `meta l4proto != <proto>`.
    MetaL4ProtoNot(u8),
    /// `meta length > <len>`: the packet's length (skb->len: at netdev ingress the
    /// L3 length, the Ethernet header already pulled).
    MetaLengthGt(u32),
    /// `tcp flags syn tcp option maxseg size > <mss>`: a TCP segment with SYN set
    /// (SYN or SYN-ACK) whose MSS option is above `<mss>`.
    TcpSynMssAbove(u16),
    /// `udp dport <port>` (with nft's dependency `meta l4proto udp` before it).
    UdpDport(u16),
    /// `ether daddr @<set>` for a [`SetElements::Macs`] set (family netdev; with
    /// nft's dependency `meta iiftype ether` before it).
    EtherDaddrInSet { set: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrField {
    /// `ip saddr`.
    IpSaddr,
    /// `ip daddr`.
    IpDaddr,
    /// `ct original ip saddr`.
    CtOriginalSaddr,
    /// `ct original ip daddr`.
    CtOriginalDaddr,
}

/// A named set (or map) of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub name: String,
    pub elements: SetElements,
}

/// A set's kind and its elements. Ranges of one set must not overlap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetElements {
    /// `type ipv4_addr; flags interval`.
    Ipv4Ranges(Vec<Ipv4Range>),
    /// `type mark; counter`: each element (a ct mark) has a counter of its own, and a
    /// comment.
    CountedMarks(Vec<(u32, String)>),
    /// `type ipv4_addr . ether_addr; flags interval`: source ranges with the MAC
    /// their packets may come from.
    SourceMacs(Vec<(Ipv4Range, Mac)>),
    /// `type ipv4_addr : verdict; flags interval`: `<range> : jump <chain>`.
    JumpMap(Vec<(Ipv4Range, String)>),
    /// `type ether_addr : iface_index`: a MAC and the device index to forward to.
    MacToIndex(Vec<(Mac, u32)>),
    /// `type ether_addr`: a plain hash set of MACs.
    Macs(Vec<Mac>),
}

/// An inclusive range of IPv4 addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Range {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl Ipv4Range {
    /// Every address.
    pub const ALL: Ipv4Range = Ipv4Range {
        first: Ipv4Addr::UNSPECIFIED,
        last: Ipv4Addr::BROADCAST,
    };
}

impl From<vrouter_state::Prefix> for Ipv4Range {
    fn from(p: vrouter_state::Prefix) -> Ipv4Range {
        let first = u32::from(p.addr());
        let host_bits = 32 - u32::from(p.prefix_len());
        let last = first | u32::MAX.checked_shr(32 - host_bits).unwrap_or(0);
        Ipv4Range {
            first: Ipv4Addr::from(first),
            last: Ipv4Addr::from(last),
        }
    }
}

/// A rule of the table as a dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleCounterReading {
    pub chain: String,
    /// The kernel's handle of the rule.
    pub handle: u64,
    /// Its comment; empty when it has none.
    pub comment: String,
    /// What its counter counted since the rule was created; 0 without a counter.
    pub packets: u64,
    pub bytes: u64,
}

/// An element of a counted-marks set as a dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkCounterReading {
    pub key: u32,
    pub comment: Option<String>,
    pub packets: u64,
    pub bytes: u64,
}

/// Why a table cannot be encoded (before the kernel sees it).
pub(super) fn check(table: &TableSpec) -> Result<(), String> {
    let name_ok = |what: &str, name: &str| {
        if name.is_empty() || name.len() > 255 || name.contains('\0') {
            Err(format!(
                "{what} name {name:?} must be 1 to 255 bytes without NUL"
            ))
        } else {
            Ok(())
        }
    };
    name_ok("table", &table.name)?;
    for set in &table.sets {
        name_ok("set", &set.name)?;
        let ranges: Vec<Ipv4Range> = match &set.elements {
            SetElements::Ipv4Ranges(r) => r.clone(),
            SetElements::SourceMacs(r) => r.iter().map(|(r, _)| *r).collect(),
            SetElements::JumpMap(r) => {
                for (_, chain) in r {
                    name_ok("chain", chain)?;
                }
                r.iter().map(|(r, _)| *r).collect()
            }
            SetElements::CountedMarks(marks) => {
                for (_, comment) in marks {
                    comment_ok(comment)?;
                }
                Vec::new()
            }
            SetElements::MacToIndex(_) | SetElements::Macs(_) => {
                let mut macs: Vec<Mac> = match &set.elements {
                    SetElements::MacToIndex(list) => list.iter().map(|(m, _)| *m).collect(),
                    SetElements::Macs(list) => list.clone(),
                    _ => Vec::new(),
                };
                macs.sort_by_key(|m| m.0);
                if let Some(w) = macs.windows(2).find(|w| w[0] == w[1]) {
                    return Err(format!("map {}: MAC {} twice", set.name, w[0]));
                }
                Vec::new()
            }
        };
        if let Some(r) = ranges.iter().find(|r| r.first > r.last) {
            return Err(format!(
                "set {}: range {}-{} ends before it starts",
                set.name, r.first, r.last
            ));
        }
        // Concatenated ranges may overlap in the address when the MACs differ; the
        // kernel judges those.
        if !matches!(set.elements, SetElements::SourceMacs(_)) {
            let mut sorted = ranges;
            sorted.sort();
            if let Some(w) = sorted.windows(2).find(|w| w[1].first <= w[0].last) {
                return Err(format!(
                    "set {}: ranges {}-{} and {}-{} overlap",
                    set.name, w[0].first, w[0].last, w[1].first, w[1].last
                ));
            }
        }
    }
    let netdev = table.family == Family::Netdev;
    for chain in &table.chains {
        name_ok("chain", &chain.name)?;
        match chain.hook.as_ref().map(|h| &h.hook) {
            Some(Hook::Forward | Hook::Input) if netdev => {
                return Err(format!(
                    "chain {}: a netdev table has no forward hook (nor input)",
                    chain.name
                ))
            }
            Some(Hook::Ingress { device }) if !netdev => {
                return Err(format!(
                    "chain {}: ingress device {device:?} needs a netdev table",
                    chain.name
                ))
            }
            Some(Hook::Ingress { device }) => ifname_ok(device)?,
            _ => {}
        }
        for rule in &chain.rules {
            comment_ok(&rule.comment)?;
            match &rule.verdict {
                RuleVerdict::Jump(to) | RuleVerdict::Goto(to) => name_ok("chain", to)?,
                RuleVerdict::FwdToIndex(_) | RuleVerdict::FwdByEtherDaddrMap(_) if !netdev => {
                    return Err(format!("chain {}: fwd needs a netdev table", chain.name))
                }
                _ => {}
            }
            if !netdev && !rule.statements.is_empty() {
                return Err(format!(
                    "chain {}: ether and tcp option statements need a netdev table",
                    chain.name
                ));
            }
            for m in &rule.matches {
                match m {
                    Match::IifName { name, .. } | Match::OifName { name, .. } => ifname_ok(name)?,
                    Match::EtherDaddrInSet { .. } if !netdev => {
                        return Err(format!(
                            "chain {}: ether daddr needs a netdev table",
                            chain.name
                        ))
                    }
                    Match::CtOriginalDport { first, last } if first > last => {
                        return Err(format!("port range {first}-{last} ends before it starts"));
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

fn ifname_ok(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
        Err(format!(
            "interface name {name:?} must be 1 to {} bytes without NUL",
            IFNAMSIZ - 1
        ))
    } else {
        Ok(())
    }
}

fn comment_ok(comment: &str) -> Result<(), String> {
    if comment.len() > MAX_COMMENT_LEN || comment.contains('\0') {
        Err(format!(
            "comment {comment:?} must be at most {MAX_COMMENT_LEN} bytes without NUL"
        ))
    } else {
        Ok(())
    }
}

/// The requests of one transaction that replaces table `<family> <table.name>` with
/// `table`: NEWTABLE, DELTABLE, NEWTABLE (so a missing table is no error), every
/// chain (empty, so that map elements can jump to them), every set with its elements,
/// every rule. None carries NLM_F_ACK: the caller asks for the one it waits for.
/// After the first two, the requests are what `nft -f` sends for the same table.
pub(super) fn replace_requests(table: &TableSpec) -> Vec<Request> {
    let t = table.name.as_str();
    let family = table.family;
    let mut out = vec![
        new_table(family, t),
        Request::new(
            NFT_MSG_DELTABLE,
            0,
            family.nfproto(),
            vec![Attr::str(NFTA_TABLE_NAME, t)],
        ),
        new_table(family, t),
    ];
    for chain in &table.chains {
        out.push(new_chain(family, t, chain));
    }
    for (i, set) in table.sets.iter().enumerate() {
        let id = set_id(i);
        out.push(new_set(family, t, set, id));
        let elements = set_elements(&set.elements);
        for chunk in elements.chunks(ELEMENTS_PER_MESSAGE) {
            out.push(Request::new(
                NFT_MSG_NEWSETELEM,
                NLM_F_CREATE,
                family.nfproto(),
                vec![
                    Attr::str(NFTA_SET_ELEM_LIST_TABLE, t),
                    Attr::str(NFTA_SET_ELEM_LIST_SET, &set.name),
                    Attr::be32(NFTA_SET_ELEM_LIST_SET_ID, id),
                    Attr::Nest(NFTA_SET_ELEM_LIST_ELEMENTS, numbered(chunk)),
                ],
            ));
        }
    }
    let ids = |name: &str| table.sets.iter().position(|s| s.name == name).map(set_id);
    for chain in &table.chains {
        for rule in &chain.rules {
            out.push(new_rule(family, t, &chain.name, rule, &ids));
        }
    }
    out
}

/// A message's elements with the attribute types libnftnl gives them: 1, 2, 3, ...
/// (the kernel reads any type; NFTA_LIST_ELEM is 1).
fn numbered(elements: &[Attr]) -> Vec<Attr> {
    elements
        .iter()
        .zip(1u16..)
        .map(|(e, i)| match e {
            Attr::Nest(_, attrs) => Attr::Nest(i, attrs.clone()),
            other => other.clone(),
        })
        .collect()
}

/// Adds NLM_F_ACK to a request.
pub(super) fn acked(mut r: Request) -> Request {
    r.flags |= NLM_F_ACK;
    r
}

/// A set's id within its transaction (the kernel wants one; nft numbers from 1).
fn set_id(index: usize) -> u32 {
    u32::try_from(index + 1).unwrap_or(u32::MAX)
}

fn new_table(family: Family, table: &str) -> Request {
    Request::new(
        NFT_MSG_NEWTABLE,
        NLM_F_CREATE,
        family.nfproto(),
        vec![
            Attr::str(NFTA_TABLE_NAME, table),
            Attr::be32(NFTA_TABLE_FLAGS, 0),
        ],
    )
}

pub(super) fn new_chain(family: Family, table: &str, chain: &ChainSpec) -> Request {
    let mut attrs = vec![
        Attr::str(NFTA_CHAIN_TABLE, table),
        Attr::str(NFTA_CHAIN_NAME, &chain.name),
    ];
    if let Some(hook) = &chain.hook {
        let mut hook_attrs = vec![
            Attr::be32(
                NFTA_HOOK_HOOKNUM,
                match hook.hook {
                    Hook::Forward => NF_INET_FORWARD,
                    Hook::Input => NF_INET_LOCAL_IN,
                    Hook::Ingress { .. } => NF_NETDEV_INGRESS,
                },
            ),
            Attr::be32(NFTA_HOOK_PRIORITY, hook.priority as u32),
        ];
        if let Hook::Ingress { device } = &hook.hook {
            hook_attrs.push(Attr::str(NFTA_HOOK_DEV, device));
        }
        attrs.extend([
            Attr::str(NFTA_CHAIN_TYPE, "filter"),
            Attr::be32(
                NFTA_CHAIN_POLICY,
                if hook.policy_accept {
                    NF_ACCEPT
                } else {
                    NF_DROP
                },
            ),
            Attr::Nest(NFTA_CHAIN_HOOK, hook_attrs),
        ]);
    }
    Request::new(NFT_MSG_NEWCHAIN, NLM_F_CREATE, family.nfproto(), attrs)
}

/// One TLV of libnftnl's userdata with a host-order u32.
fn udata_u32(kind: u8, value: u32) -> Vec<u8> {
    let mut out = vec![kind, 4];
    out.extend_from_slice(&value.to_ne_bytes());
    out
}

pub(super) fn new_set(family: Family, table: &str, set: &SetSpec, id: u32) -> Request {
    let mut attrs = vec![
        Attr::str(NFTA_SET_TABLE, table),
        Attr::str(NFTA_SET_NAME, &set.name),
    ];
    match &set.elements {
        SetElements::Ipv4Ranges(_) => attrs.extend([
            Attr::be32(NFTA_SET_FLAGS, NFT_SET_INTERVAL),
            Attr::be32(NFTA_SET_KEY_TYPE, TYPE_IPADDR),
            Attr::be32(NFTA_SET_KEY_LEN, 4),
            Attr::be32(NFTA_SET_ID, id),
            Attr::bytes(
                NFTA_SET_USERDATA,
                &udata_u32(UDATA_SET_KEYBYTEORDER, BYTEORDER_BIG_ENDIAN),
            ),
        ]),
        SetElements::CountedMarks(_) => attrs.extend([
            Attr::be32(NFTA_SET_FLAGS, 0),
            Attr::be32(NFTA_SET_KEY_TYPE, TYPE_MARK),
            Attr::be32(NFTA_SET_KEY_LEN, 4),
            Attr::be32(NFTA_SET_ID, id),
            Attr::bytes(
                NFTA_SET_USERDATA,
                &udata_u32(UDATA_SET_KEYBYTEORDER, BYTEORDER_HOST_ENDIAN),
            ),
            // The template the kernel clones into every element: a counter from 0.
            Attr::Nest(
                NFTA_SET_EXPR,
                vec![
                    Attr::str(NFTA_EXPR_NAME, "counter"),
                    Attr::Nest(NFTA_EXPR_DATA, Vec::new()),
                ],
            ),
        ]),
        SetElements::SourceMacs(_) => {
            let field =
                |len: u32| Attr::Nest(NFTA_LIST_ELEM, vec![Attr::be32(NFTA_SET_FIELD_LEN, len)]);
            // KEY_TYPEOF: a concatenation (expression type 13) with no sub-expressions
            // named, as nft 1.0.6 writes it for `type ipv4_addr . ether_addr`.
            let mut udata = udata_u32(UDATA_SET_KEYBYTEORDER, BYTEORDER_INVALID);
            udata.extend([UDATA_SET_KEY_TYPEOF, 8]);
            udata.extend([0, 4]);
            udata.extend(EXPR_CONCAT.to_ne_bytes());
            udata.extend([1, 0]);
            attrs.extend([
                Attr::be32(NFTA_SET_FLAGS, NFT_SET_INTERVAL | NFT_SET_CONCAT),
                Attr::be32(
                    NFTA_SET_KEY_TYPE,
                    (TYPE_IPADDR << TYPE_BITS) | TYPE_ETHERADDR,
                ),
                Attr::be32(NFTA_SET_KEY_LEN, CONCAT_KEY_LEN as u32),
                Attr::be32(NFTA_SET_ID, id),
                Attr::Nest(
                    NFTA_SET_DESC,
                    vec![Attr::Nest(NFTA_SET_DESC_CONCAT, vec![field(4), field(6)])],
                ),
                Attr::bytes(NFTA_SET_USERDATA, &udata),
            ]);
        }
        SetElements::JumpMap(_) => {
            let mut udata = udata_u32(UDATA_SET_KEYBYTEORDER, BYTEORDER_BIG_ENDIAN);
            udata.extend(udata_u32(UDATA_SET_DATABYTEORDER, BYTEORDER_INVALID));
            udata.extend(udata_u32(UDATA_SET_DATA_INTERVAL, 0));
            attrs.extend([
                Attr::be32(NFTA_SET_FLAGS, NFT_SET_MAP | NFT_SET_INTERVAL),
                Attr::be32(NFTA_SET_KEY_TYPE, TYPE_IPADDR),
                Attr::be32(NFTA_SET_KEY_LEN, 4),
                Attr::be32(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT),
                Attr::be32(NFTA_SET_DATA_LEN, 0),
                Attr::be32(NFTA_SET_ID, id),
                Attr::bytes(NFTA_SET_USERDATA, &udata),
            ]);
        }
        SetElements::MacToIndex(_) => {
            let mut udata = udata_u32(UDATA_SET_KEYBYTEORDER, BYTEORDER_BIG_ENDIAN);
            udata.extend(udata_u32(UDATA_SET_DATABYTEORDER, BYTEORDER_HOST_ENDIAN));
            udata.extend(udata_u32(UDATA_SET_DATA_INTERVAL, 0));
            attrs.extend([
                Attr::be32(NFTA_SET_FLAGS, NFT_SET_MAP),
                Attr::be32(NFTA_SET_KEY_TYPE, TYPE_ETHERADDR),
                Attr::be32(NFTA_SET_KEY_LEN, 6),
                Attr::be32(NFTA_SET_DATA_TYPE, TYPE_IFINDEX),
                Attr::be32(NFTA_SET_DATA_LEN, 4),
                Attr::be32(NFTA_SET_ID, id),
                Attr::bytes(NFTA_SET_USERDATA, &udata),
            ]);
        }
        SetElements::Macs(_) => attrs.extend([
            Attr::be32(NFTA_SET_FLAGS, 0),
            Attr::be32(NFTA_SET_KEY_TYPE, TYPE_ETHERADDR),
            Attr::be32(NFTA_SET_KEY_LEN, 6),
            Attr::be32(NFTA_SET_ID, id),
            Attr::bytes(
                NFTA_SET_USERDATA,
                &udata_u32(UDATA_SET_KEYBYTEORDER, BYTEORDER_BIG_ENDIAN),
            ),
        ]),
    }
    Request::new(NFT_MSG_NEWSET, NLM_F_CREATE, family.nfproto(), attrs)
}

/// `ipv4_addr . ether_addr`: 4 bytes, then 6 padded to the next 32-bit register.
const CONCAT_KEY_LEN: usize = 12;

fn concat_key(addr: Ipv4Addr, mac: Mac) -> Vec<u8> {
    let mut key = addr.octets().to_vec();
    key.extend_from_slice(&mac.0);
    key.resize(CONCAT_KEY_LEN, 0);
    key
}

fn jump(chain: &str) -> Attr {
    Attr::Nest(
        NFTA_DATA_VERDICT,
        vec![
            Attr::be32(NFTA_VERDICT_CODE, NFT_JUMP),
            Attr::str(NFTA_VERDICT_CHAIN, chain),
        ],
    )
}

/// The NFTA_LIST_ELEM attributes of a set's elements, in the order nft sends them.
pub(super) fn set_elements(elements: &SetElements) -> Vec<Attr> {
    let elem = |attrs: Vec<Attr>| Attr::Nest(NFTA_LIST_ELEM, attrs);
    match elements {
        SetElements::CountedMarks(marks) => marks
            .iter()
            .map(|(mark, comment)| {
                let mut attrs = vec![Attr::data(NFTA_SET_ELEM_KEY, &mark.to_ne_bytes())];
                if !comment.is_empty() {
                    attrs.push(Attr::bytes(NFTA_SET_ELEM_USERDATA, &comment_udata(comment)));
                }
                elem(attrs)
            })
            .collect(),
        SetElements::SourceMacs(list) => list
            .iter()
            .map(|(range, mac)| {
                elem(vec![
                    Attr::data(NFTA_SET_ELEM_KEY, &concat_key(range.first, *mac)),
                    Attr::data(NFTA_SET_ELEM_KEY_END, &concat_key(range.last, *mac)),
                ])
            })
            .collect(),
        SetElements::MacToIndex(list) => list
            .iter()
            .map(|(mac, index)| {
                elem(vec![
                    Attr::data(NFTA_SET_ELEM_KEY, &mac.0),
                    Attr::data(NFTA_SET_ELEM_DATA, &index.to_ne_bytes()),
                ])
            })
            .collect(),
        SetElements::Macs(list) => list
            .iter()
            .map(|mac| elem(vec![Attr::data(NFTA_SET_ELEM_KEY, &mac.0)]))
            .collect(),
        SetElements::Ipv4Ranges(ranges) => intervals(ranges.iter().map(|r| (*r, None)).collect()),
        SetElements::JumpMap(list) => intervals(
            list.iter()
                .map(|(r, chain)| (*r, Some(chain.as_str())))
                .collect(),
        ),
    }
}

/// rbtree intervals: sorted starts (with their data), each followed by an end
/// element one past its last address unless it ends at 255.255.255.255; an end at
/// 0.0.0.0 first when the first range starts later.
fn intervals(mut ranges: Vec<(Ipv4Range, Option<&str>)>) -> Vec<Attr> {
    ranges.sort_by_key(|(r, _)| *r);
    let end = |at: u32| {
        Attr::Nest(
            NFTA_LIST_ELEM,
            vec![
                Attr::be32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END),
                Attr::data(NFTA_SET_ELEM_KEY, &at.to_be_bytes()),
            ],
        )
    };
    let mut out = Vec::new();
    if ranges
        .first()
        .is_some_and(|(r, _)| r.first != Ipv4Addr::UNSPECIFIED)
    {
        out.push(end(0));
    }
    for (range, chain) in ranges {
        let mut attrs = vec![Attr::data(NFTA_SET_ELEM_KEY, &range.first.octets())];
        if let Some(chain) = chain {
            attrs.push(Attr::Nest(NFTA_SET_ELEM_DATA, vec![jump(chain)]));
        }
        let last = u32::from(range.last);
        if last == u32::MAX {
            attrs.push(Attr::bytes(
                NFTA_SET_ELEM_USERDATA,
                &udata_u32(UDATA_SET_ELEM_FLAGS, UDATA_SET_ELEM_F_INTERVAL_OPEN),
            ));
            out.push(Attr::Nest(NFTA_LIST_ELEM, attrs));
        } else {
            out.push(Attr::Nest(NFTA_LIST_ELEM, attrs));
            out.push(end(last + 1));
        }
    }
    out
}

pub(super) fn new_rule(
    family: Family,
    table: &str,
    chain: &str,
    rule: &RuleSpec,
    set_id: &dyn Fn(&str) -> Option<u32>,
) -> Request {
    let mut attrs = vec![
        Attr::str(NFTA_RULE_TABLE, table),
        Attr::str(NFTA_RULE_CHAIN, chain),
        Attr::Nest(NFTA_RULE_EXPRESSIONS, rule_exprs(family, rule, set_id)),
    ];
    if !rule.comment.is_empty() {
        attrs.push(Attr::bytes(
            NFTA_RULE_USERDATA,
            &comment_udata(&rule.comment),
        ));
    }
    Request::new(
        NFT_MSG_NEWRULE,
        NLM_F_CREATE | NLM_F_APPEND,
        family.nfproto(),
        attrs,
    )
}

/// What a rule's earlier expressions established, so that nft's implicit
/// dependencies go in once, where nft puts them: `meta protocol ip` before the first
/// IPv4 header field (family netdev only: in family ip every packet is IPv4), `meta
/// iiftype ether` before the first Ethernet header field (load or write), `meta
/// l4proto tcp` before the first TCP flags or option match (not before `tcp option
/// maxseg size set`: nft adds none there, and the kernel edits TCP segments only).
struct Deps {
    netdev: bool,
    ipv4: bool,
    ether: bool,
    tcp: bool,
    udp: bool,
}

impl Deps {
    fn new(family: Family) -> Deps {
        Deps {
            netdev: family == Family::Netdev,
            ipv4: false,
            ether: false,
            tcp: false,
            udp: false,
        }
    }

    fn ipv4(&mut self, out: &mut Vec<Attr>) {
        if self.netdev && !self.ipv4 {
            out.push(meta_load(NFT_META_PROTOCOL));
            out.push(cmp(NFT_CMP_EQ, &ETH_P_IP.to_be_bytes()));
        }
        self.ipv4 = true;
    }

    fn ether(&mut self, out: &mut Vec<Attr>) {
        if !self.ether {
            out.push(meta_load(NFT_META_IIFTYPE));
            out.push(cmp(NFT_CMP_EQ, &ARPHRD_ETHER.to_ne_bytes()));
        }
        self.ether = true;
    }

    fn udp(&mut self, out: &mut Vec<Attr>) {
        if !self.udp {
            out.push(meta_load(NFT_META_L4PROTO));
            out.push(cmp(NFT_CMP_EQ, &[IPPROTO_UDP]));
        }
        self.udp = true;
    }

    fn tcp(&mut self, out: &mut Vec<Attr>) {
        if !self.tcp {
            out.push(meta_load(NFT_META_L4PROTO));
            out.push(cmp(NFT_CMP_EQ, &[IPPROTO_TCP]));
        }
        self.tcp = true;
    }
}

/// A rule's expressions: its matches, counter, mark, statements, verdict (with the
/// dependencies nft adds for them).
pub(super) fn rule_exprs(
    family: Family,
    rule: &RuleSpec,
    set_id: &dyn Fn(&str) -> Option<u32>,
) -> Vec<Attr> {
    let mut out = Vec::new();
    let mut deps = Deps::new(family);
    for m in &rule.matches {
        match_exprs(m, set_id, &mut deps, &mut out);
    }
    if rule.counter {
        if let RuleVerdict::FwdByEtherDaddrMap(map) = &rule.verdict {
            // `ether daddr @<map>`: the counter counts only what the map forwards.
            deps.ether(&mut out);
            out.push(payload_load(
                NFT_PAYLOAD_LL_HEADER,
                ETHER_DADDR,
                6,
                NFT_REG_1,
            ));
            out.push(lookup(map, set_id, true));
        }
        let (packets, bytes) = rule.counter_start;
        let attrs = if (packets, bytes) == (0, 0) {
            Vec::new()
        } else {
            vec![
                Attr::be64(NFTA_COUNTER_BYTES, bytes),
                Attr::be64(NFTA_COUNTER_PACKETS, packets),
            ]
        };
        out.push(Attr::expr("counter", attrs));
    }
    if let Some(mark) = rule.set_ct_mark {
        out.push(immediate(&mark.to_ne_bytes()));
        out.push(Attr::expr(
            "ct",
            vec![
                Attr::be32(NFTA_CT_KEY, NFT_CT_MARK),
                Attr::be32(NFTA_CT_SREG, NFT_REG_1),
            ],
        ));
    }
    for statement in &rule.statements {
        statement_exprs(statement, &mut deps, &mut out);
    }
    match &rule.verdict {
        RuleVerdict::Accept => out.push(verdict(NF_ACCEPT)),
        RuleVerdict::Drop => out.push(verdict(NF_DROP)),
        RuleVerdict::Continue => {}
        RuleVerdict::Return => out.push(verdict(NFT_RETURN)),
        RuleVerdict::Jump(chain) => out.push(verdict_to(NFT_JUMP, chain)),
        RuleVerdict::Goto(chain) => out.push(verdict_to(NFT_GOTO, chain)),
        RuleVerdict::Vmap { field, map } => {
            addr_load_with(*field, &mut deps, &mut out);
            let mut attrs = vec![
                Attr::be32(NFTA_LOOKUP_SREG, NFT_REG_1),
                Attr::be32(NFTA_LOOKUP_DREG, NFT_REG_VERDICT),
                Attr::str(NFTA_LOOKUP_SET, map),
            ];
            if let Some(id) = set_id(map) {
                attrs.push(Attr::be32(NFTA_LOOKUP_SET_ID, id));
            }
            out.push(Attr::expr("lookup", attrs));
        }
        RuleVerdict::FwdToIndex(index) => {
            out.push(immediate(&index.to_ne_bytes()));
            out.push(fwd());
        }
        RuleVerdict::FwdByEtherDaddrMap(map) => {
            deps.ether(&mut out);
            out.push(payload_load(
                NFT_PAYLOAD_LL_HEADER,
                ETHER_DADDR,
                6,
                NFT_REG_1,
            ));
            let mut attrs = vec![
                Attr::be32(NFTA_LOOKUP_SREG, NFT_REG_1),
                Attr::be32(NFTA_LOOKUP_DREG, NFT_REG_1),
                Attr::str(NFTA_LOOKUP_SET, map),
            ];
            if let Some(id) = set_id(map) {
                attrs.push(Attr::be32(NFTA_LOOKUP_SET_ID, id));
            }
            out.push(Attr::expr("lookup", attrs));
            out.push(fwd());
        }
    }
    out
}

fn statement_exprs(statement: &Statement, deps: &mut Deps, out: &mut Vec<Attr>) {
    match statement {
        Statement::SetEtherSaddr(mac) | Statement::SetEtherDaddr(mac) => {
            let offset = if matches!(statement, Statement::SetEtherSaddr(_)) {
                ETHER_SADDR
            } else {
                ETHER_DADDR
            };
            deps.ether(out);
            out.push(immediate(&mac.0));
            out.push(Attr::expr(
                "payload",
                vec![
                    Attr::be32(NFTA_PAYLOAD_SREG, NFT_REG_1),
                    Attr::be32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_LL_HEADER),
                    Attr::be32(NFTA_PAYLOAD_OFFSET, offset),
                    Attr::be32(NFTA_PAYLOAD_LEN, 6),
                ],
            ));
        }
        // nft adds no dependency: the kernel only touches TCP segments' options.
        Statement::SetTcpMss(mss) => {
            out.push(immediate(&mss.to_be_bytes()));
            out.push(Attr::expr(
                "exthdr",
                vec![
                    Attr::be32(NFTA_EXTHDR_SREG, NFT_REG_1),
                    Attr::bytes(NFTA_EXTHDR_TYPE, &[TCPOPT_MAXSEG]),
                    Attr::be32(NFTA_EXTHDR_OFFSET, 2),
                    Attr::be32(NFTA_EXTHDR_LEN, 2),
                    Attr::be32(NFTA_EXTHDR_OP, NFT_EXTHDR_OP_TCPOPT),
                ],
            ));
        }
    }
}

/// `immediate` of `data` into register 1.
fn immediate(data: &[u8]) -> Attr {
    Attr::expr(
        "immediate",
        vec![
            Attr::be32(NFTA_IMMEDIATE_DREG, NFT_REG_1),
            Attr::data(NFTA_IMMEDIATE_DATA, data),
        ],
    )
}

/// `fwd` to the device index in register 1.
fn fwd() -> Attr {
    Attr::expr("fwd", vec![Attr::be32(NFTA_FWD_SREG_DEV, NFT_REG_1)])
}

/// A jump or goto to `chain`.
fn verdict_to(code: u32, chain: &str) -> Attr {
    Attr::expr(
        "immediate",
        vec![
            Attr::be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT),
            Attr::Nest(
                NFTA_IMMEDIATE_DATA,
                vec![Attr::Nest(
                    NFTA_DATA_VERDICT,
                    vec![
                        Attr::be32(NFTA_VERDICT_CODE, code),
                        Attr::str(NFTA_VERDICT_CHAIN, chain),
                    ],
                )],
            ),
        ],
    )
}

/// The load of an address into register 1; `meta protocol ip` first where needed.
fn addr_load_with(field: AddrField, deps: &mut Deps, out: &mut Vec<Attr>) {
    match field {
        AddrField::IpSaddr => {
            deps.ipv4(out);
            out.push(payload_load(
                NFT_PAYLOAD_NETWORK_HEADER,
                IPV4_SADDR,
                4,
                NFT_REG_1,
            ));
        }
        AddrField::IpDaddr => {
            deps.ipv4(out);
            out.push(payload_load(
                NFT_PAYLOAD_NETWORK_HEADER,
                IPV4_DADDR,
                4,
                NFT_REG_1,
            ));
        }
        AddrField::CtOriginalSaddr => out.push(ct_load(NFT_CT_SRC_IP, true)),
        AddrField::CtOriginalDaddr => out.push(ct_load(NFT_CT_DST_IP, true)),
    }
}

fn verdict(code: u32) -> Attr {
    Attr::expr(
        "immediate",
        vec![
            Attr::be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT),
            Attr::Nest(
                NFTA_IMMEDIATE_DATA,
                vec![Attr::Nest(
                    NFTA_DATA_VERDICT,
                    vec![Attr::be32(NFTA_VERDICT_CODE, code)],
                )],
            ),
        ],
    )
}

/// `ct load <key> => reg 1`, of the original direction when `original`.
fn ct_load(key: u32, original: bool) -> Attr {
    let mut attrs = vec![
        Attr::be32(NFTA_CT_KEY, key),
        Attr::be32(NFTA_CT_DREG, NFT_REG_1),
    ];
    if original {
        attrs.push(Attr::bytes(NFTA_CT_DIRECTION, &[IP_CT_DIR_ORIGINAL]));
    }
    Attr::expr("ct", attrs)
}

fn meta_load(key: u32) -> Attr {
    Attr::expr(
        "meta",
        vec![
            Attr::be32(NFTA_META_KEY, key),
            Attr::be32(NFTA_META_DREG, NFT_REG_1),
        ],
    )
}

fn payload_load(base: u32, offset: u32, len: u32, dreg: u32) -> Attr {
    Attr::expr(
        "payload",
        vec![
            Attr::be32(NFTA_PAYLOAD_DREG, dreg),
            Attr::be32(NFTA_PAYLOAD_BASE, base),
            Attr::be32(NFTA_PAYLOAD_OFFSET, offset),
            Attr::be32(NFTA_PAYLOAD_LEN, len),
        ],
    )
}

fn cmp(op: u32, data: &[u8]) -> Attr {
    Attr::expr(
        "cmp",
        vec![
            Attr::be32(NFTA_CMP_SREG, NFT_REG_1),
            Attr::be32(NFTA_CMP_OP, op),
            Attr::data(NFTA_CMP_DATA, data),
        ],
    )
}

fn lookup(set: &str, set_id: &dyn Fn(&str) -> Option<u32>, equal: bool) -> Attr {
    let mut attrs = vec![
        Attr::be32(NFTA_LOOKUP_SREG, NFT_REG_1),
        Attr::str(NFTA_LOOKUP_SET, set),
    ];
    if let Some(id) = set_id(set) {
        attrs.push(Attr::be32(NFTA_LOOKUP_SET_ID, id));
    }
    if !equal {
        attrs.push(Attr::be32(NFTA_LOOKUP_FLAGS, NFT_LOOKUP_F_INV));
    }
    Attr::expr("lookup", attrs)
}

fn ifname(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.resize(IFNAMSIZ, 0);
    v
}

fn eq_op(equal: bool) -> u32 {
    if equal {
        NFT_CMP_EQ
    } else {
        NFT_CMP_NEQ
    }
}

fn match_exprs(
    m: &Match,
    set_id: &dyn Fn(&str) -> Option<u32>,
    deps: &mut Deps,
    out: &mut Vec<Attr>,
) {
    match m {
        Match::IifName { name, equal } => {
            out.push(meta_load(NFT_META_IIFNAME));
            out.push(cmp(eq_op(*equal), &ifname(name)));
        }
        Match::OifName { name, equal } => {
            out.push(meta_load(NFT_META_OIFNAME));
            out.push(cmp(eq_op(*equal), &ifname(name)));
        }
        Match::AddrInSet { field, set, equal } => {
            addr_load_with(*field, deps, out);
            out.push(lookup(set, set_id, *equal));
        }
        Match::CtStateNew => {
            out.push(ct_load(NFT_CT_STATE, false));
            out.push(Attr::expr(
                "bitwise",
                vec![
                    Attr::be32(NFTA_BITWISE_SREG, NFT_REG_1),
                    Attr::be32(NFTA_BITWISE_DREG, NFT_REG_1),
                    Attr::be32(NFTA_BITWISE_LEN, 4),
                    Attr::data(NFTA_BITWISE_MASK, &NF_CT_STATE_NEW_BIT.to_ne_bytes()),
                    Attr::data(NFTA_BITWISE_XOR, &[0; 4]),
                ],
            ));
            out.push(cmp(NFT_CMP_NEQ, &[0; 4]));
        }
        Match::TcpNotSyn => {
            deps.tcp(out);
            out.extend(tcp_flags(TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK, true));
            out.push(cmp(NFT_CMP_NEQ, &[TCP_SYN]));
        }
        Match::CtOriginalProtocol(p) => {
            out.push(ct_load(NFT_CT_PROTOCOL, true));
            out.push(cmp(NFT_CMP_EQ, &[*p]));
        }
        Match::CtOriginalDport { first, last } => {
            out.push(ct_load(NFT_CT_PROTO_DST, true));
            if first == last {
                out.push(cmp(NFT_CMP_EQ, &first.to_be_bytes()));
            } else {
                out.push(cmp(NFT_CMP_GTE, &first.to_be_bytes()));
                out.push(cmp(NFT_CMP_LTE, &last.to_be_bytes()));
            }
        }
        Match::CtMarkInSet { set } => {
            out.push(ct_load(NFT_CT_MARK, false));
            out.push(lookup(set, set_id, true));
        }
        Match::SourceMacNotInSet { set } => {
            deps.ether(out);
            addr_load_with(AddrField::IpSaddr, deps, out);
            out.push(payload_load(
                NFT_PAYLOAD_LL_HEADER,
                ETHER_SADDR,
                6,
                NFT_REG32_01,
            ));
            out.push(lookup(set, set_id, false));
        }
        Match::MetaProtocolIpv4 => {
            out.push(meta_load(NFT_META_PROTOCOL));
            out.push(cmp(NFT_CMP_EQ, &ETH_P_IP.to_be_bytes()));
            deps.ipv4 = true;
        }
        Match::MetaL4Proto(p) => {
            out.push(meta_load(NFT_META_L4PROTO));
            out.push(cmp(NFT_CMP_EQ, &[*p]));
            deps.tcp |= *p == IPPROTO_TCP;
            deps.udp |= *p == IPPROTO_UDP;
        }
        Match::MetaL4ProtoNot(p) => {
            out.push(meta_load(NFT_META_L4PROTO));
            out.push(cmp(NFT_CMP_NEQ, &[*p]));
        }
        Match::MetaLengthGt(len) => {
            // skb->len is a host-order u32: nft turns it to network order to compare.
            out.push(meta_load(NFT_META_LEN));
            out.push(Attr::expr(
                "byteorder",
                vec![
                    Attr::be32(NFTA_BYTEORDER_SREG, NFT_REG_1),
                    Attr::be32(NFTA_BYTEORDER_DREG, NFT_REG_1),
                    Attr::be32(NFTA_BYTEORDER_OP, NFT_BYTEORDER_HTON),
                    Attr::be32(NFTA_BYTEORDER_LEN, 4),
                    Attr::be32(NFTA_BYTEORDER_SIZE, 4),
                ],
            ));
            out.push(cmp(NFT_CMP_GT, &len.to_be_bytes()));
        }
        Match::EtherDaddrInSet { set } => {
            deps.ether(out);
            out.push(payload_load(
                NFT_PAYLOAD_LL_HEADER,
                ETHER_DADDR,
                6,
                NFT_REG_1,
            ));
            out.push(lookup(set, set_id, true));
        }
        Match::UdpDport(port) => {
            deps.udp(out);
            out.push(payload_load(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, NFT_REG_1));
            out.push(cmp(NFT_CMP_EQ, &port.to_be_bytes()));
        }
        Match::TcpSynMssAbove(mss) => {
            deps.tcp(out);
            out.extend(tcp_flags(TCP_SYN, false));
            out.push(cmp(NFT_CMP_NEQ, &[0]));
            out.push(Attr::expr(
                "exthdr",
                vec![
                    Attr::be32(NFTA_EXTHDR_DREG, NFT_REG_1),
                    Attr::bytes(NFTA_EXTHDR_TYPE, &[TCPOPT_MAXSEG]),
                    Attr::be32(NFTA_EXTHDR_OFFSET, 2),
                    Attr::be32(NFTA_EXTHDR_LEN, 2),
                    Attr::be32(NFTA_EXTHDR_OP, NFT_EXTHDR_OP_TCPOPT),
                    Attr::be32(NFTA_EXTHDR_FLAGS, 0),
                ],
            ));
            out.push(cmp(NFT_CMP_GT, &mss.to_be_bytes()));
        }
    }
}

/// `tcp flags & <mask>`: the flags byte into register 1, masked. nft names the
/// bitwise operation for an explicit `&` (`tcp flags & (...) != syn`), not for the
/// implicit one of a flag match (`tcp flags syn`).
fn tcp_flags(mask: u8, explicit_and: bool) -> Vec<Attr> {
    let mut bitwise = vec![
        Attr::be32(NFTA_BITWISE_SREG, NFT_REG_1),
        Attr::be32(NFTA_BITWISE_DREG, NFT_REG_1),
    ];
    if explicit_and {
        bitwise.push(Attr::be32(NFTA_BITWISE_OP, NFT_BITWISE_BOOL));
    }
    bitwise.extend([
        Attr::be32(NFTA_BITWISE_LEN, 1),
        Attr::data(NFTA_BITWISE_MASK, &[mask]),
        Attr::data(NFTA_BITWISE_XOR, &[0]),
    ]);
    vec![
        payload_load(NFT_PAYLOAD_TRANSPORT_HEADER, TCP_FLAGS_OFFSET, 1, NFT_REG_1),
        Attr::expr("bitwise", bitwise),
    ]
}

/// A NEWRULE payload of a dump as (table, reading): its chain, handle, comment and
/// the first counter among its expressions.
pub(super) fn parse_rule_counter(payload: &[u8]) -> Option<(String, RuleCounterReading)> {
    let mut table = None;
    let mut chain = None;
    let mut handle = None;
    let mut comment = String::new();
    let mut counter = None;
    for (kind, value) in attrs(payload.get(NFGENMSG_LEN..)?) {
        match kind {
            NFTA_RULE_TABLE => table = Some(c_string(value)),
            NFTA_RULE_CHAIN => chain = Some(c_string(value)),
            NFTA_RULE_HANDLE => handle = be64(value),
            NFTA_RULE_EXPRESSIONS => {
                counter = counter.or_else(|| list_exprs(value).find_map(counter_of))
            }
            NFTA_RULE_USERDATA => comment = comment_of(value).unwrap_or_default(),
            _ => {}
        }
    }
    let (packets, bytes) = counter.unwrap_or((0, 0));
    Some((
        table?,
        RuleCounterReading {
            chain: chain?,
            handle: handle?,
            comment,
            packets,
            bytes,
        },
    ))
}

fn counter_of(e: Expr) -> Option<(u64, u64)> {
    match e {
        Expr::Counter { bytes, packets } => Some((packets, bytes)),
        _ => None,
    }
}

/// The elements of a NEWSETELEM payload of a dump of set `set` in `table` (none if it
/// is of another one): host-order u32 keys, comments, counters.
pub(super) fn parse_mark_counters(
    payload: &[u8],
    table: &str,
    set: &str,
) -> Vec<MarkCounterReading> {
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
                    .filter_map(|(_, elem)| parse_mark_element(elem)),
            ),
            _ => {}
        }
    }
    if of_table.as_deref() != Some(table) || of_set.as_deref() != Some(set) {
        return Vec::new();
    }
    out
}

fn parse_mark_element(elem: &[u8]) -> Option<MarkCounterReading> {
    let mut key = None;
    let mut comment = None;
    let mut counter = None;
    for (kind, value) in attrs(elem) {
        match kind {
            NFTA_SET_ELEM_KEY => {
                key = attrs(value)
                    .find(|(k, _)| *k == NFTA_DATA_VALUE)
                    .and_then(|(_, v)| <[u8; 4]>::try_from(v).ok())
                    .map(u32::from_ne_bytes);
            }
            NFTA_SET_ELEM_USERDATA => comment = comment_of(value),
            NFTA_SET_ELEM_EXPR => counter = counter.or_else(|| counter_of(parse_expr(value))),
            NFTA_SET_ELEM_EXPRESSIONS => {
                counter = counter.or_else(|| list_exprs(value).find_map(counter_of))
            }
            _ => {}
        }
    }
    let (packets, bytes) = counter.unwrap_or((0, 0));
    Some(MarkCounterReading {
        key: key?,
        comment,
        packets,
        bytes,
    })
}
