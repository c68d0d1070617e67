//! TEMPORARY: the nftables types of CONTRACT.md's "Kernel API", until the kernel
//! branch lands (then `steer.rs` uses `vrouter_kernel::nft` and this file goes).
#![allow(dead_code, clippy::enum_variant_names)]

pub use vrouter_kernel::nft::{AddrField, Ipv4Range};
use vrouter_state::Mac;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Ip,
    Netdev,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub family: Family,
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
    pub hook: Hook,
    pub priority: i32,
    pub policy_accept: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hook {
    Forward,
    Ingress { device: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub matches: Vec<Match>,
    pub counter: bool,
    pub counter_start: (u64, u64),
    pub set_ct_mark: Option<u32>,
    pub statements: Vec<Statement>,
    pub verdict: RuleVerdict,
    pub comment: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleVerdict {
    Accept,
    Drop,
    Continue,
    Return,
    Jump(String),
    Goto(String),
    Vmap { field: AddrField, map: String },
    FwdToIndex(u32),
    FwdByEtherDaddrMap(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    SetEtherSaddr(Mac),
    SetEtherDaddr(Mac),
    SetTcpMss(u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    AddrInSet {
        field: AddrField,
        set: String,
        equal: bool,
    },
    MetaProtocolIpv4,
    MetaL4Proto(u8),
    MetaLengthGt(u32),
    TcpSynMssAbove(u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub name: String,
    pub elements: SetElements,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetElements {
    Ipv4Ranges(Vec<Ipv4Range>),
    JumpMap(Vec<(Ipv4Range, String)>),
    MacToIndex(Vec<(Mac, u32)>),
}

pub use vrouter_kernel::nft::RuleCounterReading;
use vrouter_kernel::KernelError;

/// Stand-in for `vrouter_kernel::Nft` with the contract's signatures: every call
/// fails until the kernel branch lands.
#[derive(Debug)]
pub struct Nft;

fn unavailable(op: &str) -> KernelError {
    KernelError::Errno {
        op: format!("{op} (netdev tables: kernel API not merged yet)"),
        errno: nix::errno::Errno::ENOSYS,
    }
}

impl Nft {
    pub fn connect_table(_family: Family, _table: &str) -> Result<Nft, KernelError> {
        Err(unavailable("connect nftables table"))
    }
    pub fn replace_table(&self, _t: &TableSpec) -> Result<(), KernelError> {
        Err(unavailable("replace nftables table"))
    }
    pub fn rule_counters(&self) -> Result<Vec<RuleCounterReading>, KernelError> {
        Err(unavailable("dump nftables rules"))
    }
    pub fn delete_table(&self) -> Result<(), KernelError> {
        Err(unavailable("delete nftables table"))
    }
}
