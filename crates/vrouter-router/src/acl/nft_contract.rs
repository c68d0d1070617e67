//! TEMPORARY copy of the kernel crate's ruleset types from ACL-CONTRACT.md, until
//! branch acl-kernel lands `vrouter_kernel::nft::{TableSpec, ...}`; then deleted.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use vrouter_state::Mac;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub name: String,
    pub sets: Vec<SetSpec>,
    pub chains: Vec<ChainSpec>,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSpec {
    pub name: String,
    pub hook: Option<BaseHook>,
    pub rules: Vec<RuleSpec>,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseHook {
    pub priority: i32,
    pub policy_accept: bool,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub matches: Vec<Match>,
    pub counter: bool,
    pub set_ct_mark: Option<u32>,
    pub verdict: RuleVerdict,
    pub comment: String,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleVerdict {
    Accept,
    Drop,
    Continue,
    VmapCtOriginalSaddr(String),
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    IifName {
        name: String,
        equal: bool,
    },
    OifName {
        name: String,
        equal: bool,
    },
    AddrInSet {
        field: AddrField,
        set: String,
        equal: bool,
    },
    CtStateNew,
    TcpNotSyn,
    CtOriginalProtocol(u8),
    CtOriginalDport {
        first: u16,
        last: u16,
    },
    CtMarkInSet {
        set: String,
    },
    SourceMacNotInSet {
        set: String,
    },
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrField {
    IpSaddr,
    IpDaddr,
    CtOriginalSaddr,
    CtOriginalDaddr,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub name: String,
    pub elements: SetElements,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetElements {
    Ipv4Ranges(Vec<Ipv4Range>),
    CountedMarks(Vec<(u32, String)>),
    SourceMacs(Vec<(Ipv4Range, Mac)>),
    JumpMap(Vec<(Ipv4Range, String)>),
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Range {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleCounterReading {
    pub chain: String,
    pub handle: u64,
    pub comment: String,
    pub packets: u64,
    pub bytes: u64,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkCounterReading {
    pub key: u32,
    pub comment: Option<String>,
    pub packets: u64,
    pub bytes: u64,
}
