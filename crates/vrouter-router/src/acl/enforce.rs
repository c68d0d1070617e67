//! The policy in the kernel: [`Acl`] keeps table `ip vrouter_acl` of the router's
//! namespace in step with the policy and the overlay (routes.json), reads its
//! counters, and fails closed.
//!
//! - [`Acl::start`] installs the compiled policy. If it cannot (the compiler refuses
//!   the policy, or the kernel the table) it installs the closed table
//!   ([`super::compile::closed`]: nothing new enters from the overlay) and stays
//!   [`AclState::Closed`] with the reason; only when even that is refused does it
//!   return an error, and the caller keeps the overlay link down.
//! - [`Acl::reload`] compiles and installs a new policy; on any error the old one
//!   stays in force (in the kernel and here) and the error says why.
//! - [`Acl::set_context`] takes the new local prefixes and remote routes: stack names
//!   resolve again, and the table is replaced when it differs. When the policy cannot
//!   be installed for the new context, the closed table goes in.
//!
//! # Generations
//!
//! Every replacement of the policy table takes the next generation, whatever caused
//! it: a reload, and also a context change that alters the table. A context change
//! can take rights away from connections already open: a stack leaves and its prefix
//! goes to another stack, a rule's stack loses a prefix, an address moves from a
//! stack's prefix to nobody's. Their ct marks name a rule id, and the id still stands
//! in `admitted`, so without a new generation such a connection would go on (a UDP
//! flow trivially) though a new connection from the same source is refused. With the
//! new generation every open connection is checked once more on its next packet, in
//! either direction; those still allowed get the new mark and go on, the others drop.
//! The cost is one pass through a class chain per open connection and change (what a
//! new connection costs). A context change that leaves the table as it is (for
//! example a remote route's gateway changed) replaces nothing and keeps the
//! generation. Generations wrap at 65536; a connection idle over 65,536 changes and
//! whose rule id means an allow rule again would pass unchecked, which is accepted.
//! The first generation follows the one in the namespace's table when there is one
//! (a restarted router in the same namespace: its connections' marks are then all of
//! older generations), else it comes from the clock.
//!
//! # Counters
//!
//! Per rule name: accepted packets and bytes (its allow rules in the class chains,
//! which see each connection's first packet, plus its `admitted` element, which
//! counts every later packet), dropped packets and bytes (its deny rules), the same
//! for the default, and the pseudo rules: forged sources from the stack or the
//! overlay, TCP that opens without a bare SYN, everything while closed, and the
//! fallback (never expected). Drops are also kept per (rule, source stack), from the
//! class chains' comments. Replacing a table starts its counters over, so just before
//! each replacement the counts are read and added to a base that [`Acl::read`] adds
//! to; if that read fails, the last successful [`Acl::read`] is carried instead
//! (packets between that read and the replacement go uncounted, as do packets in the
//! instant between the read just before a replacement and the replacement).
//!
//! Under the default policy the table is stateless (see [`super::compile`]): the
//! default's accepted count is then every packet that entered the stack (the
//! "acl entering" rule), not the packets of connections it admitted both ways.
//!
//! # Conntrack
//!
//! [`Acl::tracks_connections`] says whether the table in force uses conntrack; the
//! router reports it to discovery (`Registration.conntrack`), whose port steering
//! then sends the stack's outgoing frames through the router (both directions seen)
//! or straight into the tunnel. Going from the default policy to another one starts
//! tracking with connections already open: those opened from the overlay are picked
//! up and checked on their next packet from the overlay, as after a router restart in
//! a fresh namespace; the stack's own connections opened before are dropped as
//! mid-stream TCP from the stack (rule 3) and must reconnect.

use super::compile::{
    closed, compile, parse_comment, tracks_connections, AclContext, Compiled, CHAIN,
    COMMENT_CLOSED, COMMENT_ENTERING, COMMENT_FALLBACK, COMMENT_SPOOF_FROM_OVERLAY,
    COMMENT_SPOOF_FROM_STACK, COMMENT_TCP_NOT_SYN, DEFAULT_ID, SET_ADMITTED, TABLE,
};
use super::policy::{Policy, Verdict};
use super::resolve::{resolve, ResolvedPolicy};
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use vrouter_kernel::{MarkCounterReading, RuleCounterReading, TableSpec};
use vrouter_state::StackName;

/// What [`Acl`] needs of nftables: `vrouter_kernel::Nft` in the router, a recording
/// double in the unit tests.
pub trait AclKernel {
    /// Replaces the table whole in one transaction; on error the old one stays.
    fn replace_table(&self, table: &TableSpec) -> Result<(), String>;
    fn rule_counters(&self) -> Result<Vec<RuleCounterReading>, String>;
    fn mark_counters(&self, set: &str) -> Result<Vec<MarkCounterReading>, String>;
}

/// Whether the policy is in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AclState {
    /// The policy's table is in the kernel.
    Installed,
    /// The closed table is: nothing new enters the stack from the overlay.
    Closed { reason: String },
}

/// What a counter counts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counted {
    /// A rule of the policy, by name.
    Rule(String),
    /// The default verdict.
    Default,
    /// From the stack's bridge to the overlay with a source outside the stack.
    SpoofFromStack,
    /// From the overlay with a source its sending router does not announce.
    SpoofFromOverlay,
    /// A new TCP connection that does not start with a bare SYN.
    TcpNotSyn,
    /// From the overlay into the stack while closed.
    Closed,
    /// The base chain's last rule: unreachable while the classes cover everything.
    Fallback,
}

impl Counted {
    /// For metric labels and status: the rule's name, else a word in parentheses (rule
    /// names cannot hold parentheses, so the two never meet).
    pub fn label(&self) -> String {
        match self {
            Counted::Rule(name) => name.clone(),
            Counted::Default => "(default)".into(),
            Counted::SpoofFromStack => "(spoof from stack)".into(),
            Counted::SpoofFromOverlay => "(spoof from overlay)".into(),
            Counted::TcpNotSyn => "(tcp not syn)".into(),
            Counted::Closed => "(closed)".into(),
            Counted::Fallback => "(fallback)".into(),
        }
    }
}

impl fmt::Display for Counted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// Packets and bytes (IP length, as the forward hook sees them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

impl Count {
    fn add(&mut self, packets: u64, bytes: u64) {
        self.packets = self.packets.saturating_add(packets);
        self.bytes = self.bytes.saturating_add(bytes);
    }
}

/// Accepted and dropped by one rule (or pseudo rule).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleCount {
    pub accepted: Count,
    pub dropped: Count,
}

/// Totals since the router started (they survive reloads and context changes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AclCounters {
    /// Every rule of the policy in force (zero when nothing matched yet), the default,
    /// and whatever else counted something: pseudo rules, and rules of earlier
    /// policies (their totals stay).
    pub rules: BTreeMap<Counted, RuleCount>,
    /// Drops by rule and source stack (None: a source in no remote stack's prefix).
    pub dropped_from: BTreeMap<(Counted, Option<StackName>), Count>,
}

impl AclCounters {
    fn add(&mut self, other: &AclCounters) {
        for (k, v) in &other.rules {
            let e = self.rules.entry(k.clone()).or_default();
            e.accepted.add(v.accepted.packets, v.accepted.bytes);
            e.dropped.add(v.dropped.packets, v.dropped.bytes);
        }
        for (k, v) in &other.dropped_from {
            self.dropped_from
                .entry(k.clone())
                .or_default()
                .add(v.packets, v.bytes);
        }
    }
}

/// What the kernel holds, as we put it there.
#[derive(Debug, Clone)]
enum Installed {
    Policy {
        table: TableSpec,
        /// id -> (rule name, verdict).
        ids: BTreeMap<u16, (String, Verdict)>,
        default: Verdict,
    },
    Closed {
        table: TableSpec,
    },
    /// Before the first install.
    Nothing,
}

impl Installed {
    fn table(&self) -> Option<&TableSpec> {
        match self {
            Installed::Policy { table, .. } | Installed::Closed { table } => Some(table),
            Installed::Nothing => None,
        }
    }
}

/// The policy of this stack, enforced in its router's namespace.
pub struct Acl<K: AclKernel = vrouter_kernel::Nft> {
    kernel: K,
    policy: Policy,
    ctx: AclContext,
    resolved: ResolvedPolicy,
    /// Of the policy table in the kernel (or the last one, while closed).
    generation: u16,
    installed: Installed,
    state: AclState,
    /// Counts of tables replaced since start.
    base: AclCounters,
    /// The current table's counts at the last successful read.
    last: AclCounters,
    /// Debug builds: while this file exists, policy tables carry a reference to a
    /// missing chain, so the kernel refuses them (`VROUTER_TEST_NFT_REFUSE_FILE`).
    #[cfg(debug_assertions)]
    refuse_file: Option<PathBuf>,
}

impl<K: AclKernel> fmt::Debug for Acl<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acl")
            .field("generation", &self.generation)
            .field("state", &self.state)
            .field("rules", &self.policy.rules.len())
            .finish()
    }
}

impl Acl<vrouter_kernel::Nft> {
    /// Installs `policy` for `ctx` in the calling thread's network namespace (see the
    /// module's documentation). Err only when not even the closed table could go in:
    /// then the overlay link must stay down.
    pub fn start(policy: Policy, ctx: AclContext) -> Result<Acl, String> {
        let nft = vrouter_kernel::Nft::connect(TABLE, CHAIN)
            .map_err(|e| format!("cannot open nftables to close the stack: {e}"))?;
        Acl::with_kernel(nft, policy, ctx, test_refuse_file())
    }
}

impl AclKernel for vrouter_kernel::Nft {
    fn replace_table(&self, table: &TableSpec) -> Result<(), String> {
        vrouter_kernel::Nft::replace_table(self, table).map_err(|e| e.to_string())
    }

    fn rule_counters(&self) -> Result<Vec<RuleCounterReading>, String> {
        vrouter_kernel::Nft::rule_counters(self).map_err(|e| e.to_string())
    }

    fn mark_counters(&self, set: &str) -> Result<Vec<MarkCounterReading>, String> {
        vrouter_kernel::Nft::mark_counters(self, set).map_err(|e| e.to_string())
    }
}

#[cfg(debug_assertions)]
fn test_refuse_file() -> Option<PathBuf> {
    std::env::var_os("VROUTER_TEST_NFT_REFUSE_FILE").map(PathBuf::from)
}

#[cfg(not(debug_assertions))]
fn test_refuse_file() -> Option<PathBuf> {
    None
}

impl<K: AclKernel> Acl<K> {
    /// [`Acl::start`] on another kernel; `refuse_file` is the debug builds' test hook
    /// (ignored in release builds).
    pub fn with_kernel(
        kernel: K,
        policy: Policy,
        ctx: AclContext,
        refuse_file: Option<PathBuf>,
    ) -> Result<Acl<K>, String> {
        #[cfg(not(debug_assertions))]
        let _ = refuse_file;
        let generation = first_generation(&kernel);
        let resolved = resolve(&policy, &ctx.remote);
        let mut acl = Acl {
            kernel,
            policy,
            resolved,
            generation,
            installed: Installed::Nothing,
            ctx,
            state: AclState::Closed {
                reason: "not installed yet".into(),
            },
            base: AclCounters::default(),
            last: AclCounters::default(),
            #[cfg(debug_assertions)]
            refuse_file,
        };
        // Nothing of ours is in the kernel yet: whatever is there is replaced.
        match acl
            .compiled(generation)
            .and_then(|c| acl.put_policy(c, generation))
        {
            Ok(()) => Ok(acl),
            Err(reason) => {
                acl.close(reason)?;
                Ok(acl)
            }
        }
    }

    pub fn state(&self) -> &AclState {
        &self.state
    }

    /// The policy in force (or the one that could not be installed, while closed).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The policy resolved against the current routes: what `decide` explains.
    pub fn resolved(&self) -> &ResolvedPolicy {
        &self.resolved
    }

    pub fn generation(&self) -> u16 {
        self.generation
    }

    /// Whether the table in force uses conntrack, so the router must see both
    /// directions of the stack's traffic: every table but the default policy's (the
    /// closed one does too). True before anything is installed (the safe answer).
    pub fn tracks_connections(&self) -> bool {
        self.installed.table().is_none_or(tracks_connections)
    }

    /// The table in the kernel, as installed (None only before `start` returns).
    pub fn table(&self) -> Option<&TableSpec> {
        self.installed.table()
    }

    /// Installs `policy` (next generation). On error nothing changes: the old policy
    /// stays in force and the error says why in one line. An unchanged policy on an
    /// installed table is a no-op. While closed, a policy that installs opens again.
    pub fn reload(&mut self, policy: Policy) -> Result<(), String> {
        if policy == self.policy && self.state == AclState::Installed {
            return Ok(());
        }
        let resolved = resolve(&policy, &self.ctx.remote);
        let generation = self.generation.wrapping_add(1);
        let compiled = compile(&resolved, &self.ctx, generation)?;
        let compiled = self.with_test_hook(compiled);
        self.put_policy(compiled, generation)?;
        self.policy = policy;
        self.resolved = resolved;
        Ok(())
    }

    /// Takes a new context (routes.json changed, or the stack's prefixes): replaces
    /// the table when it differs (next generation: see the module's documentation).
    /// If the policy cannot be installed for it, the stack closes. Err only when not
    /// even the closed table could go in.
    pub fn set_context(&mut self, ctx: AclContext) -> Result<(), String> {
        self.ctx = ctx;
        self.resolved = resolve(&self.policy, &self.ctx.remote);
        let same = self
            .compiled(self.generation)
            .map(|c| match &self.installed {
                Installed::Policy { table, .. } => c.table == *table,
                Installed::Closed { .. } | Installed::Nothing => false,
            })
            .unwrap_or(false);
        if same {
            return Ok(());
        }
        let generation = self.generation.wrapping_add(1);
        let result = self
            .compiled(generation)
            .and_then(|c| self.put_policy(c, generation));
        match result {
            Ok(()) => Ok(()),
            Err(reason) => self.close(reason),
        }
    }

    /// The counters' totals since start.
    pub fn read(&mut self) -> Result<AclCounters, String> {
        let current = self.current()?;
        let mut total = self.base.clone();
        total.add(&current);
        // Every rule of the policy in force, and the default, even before they count.
        if let Installed::Policy { ids, .. } = &self.installed {
            for (name, _) in ids.values() {
                total.rules.entry(Counted::Rule(name.clone())).or_default();
            }
            total.rules.entry(Counted::Default).or_default();
        }
        self.last = current;
        Ok(total)
    }

    fn compiled(&self, generation: u16) -> Result<Compiled, String> {
        compile(&self.resolved, &self.ctx, generation).map(|c| self.with_test_hook(c))
    }

    #[cfg(debug_assertions)]
    fn with_test_hook(&self, mut compiled: Compiled) -> Compiled {
        use vrouter_kernel::{Ipv4Range, SetElements, SetSpec};
        if self.refuse_file.as_ref().is_some_and(|f| f.exists()) {
            compiled.table.sets.push(SetSpec {
                name: "test_refuse".into(),
                elements: SetElements::JumpMap(vec![(
                    Ipv4Range {
                        first: std::net::Ipv4Addr::UNSPECIFIED,
                        last: std::net::Ipv4Addr::BROADCAST,
                    },
                    "test-missing-chain".into(),
                )]),
            });
        }
        compiled
    }

    #[cfg(not(debug_assertions))]
    fn with_test_hook(&self, compiled: Compiled) -> Compiled {
        compiled
    }

    /// Puts a policy compiled for `generation` in the kernel, carrying the old
    /// table's counts.
    fn put_policy(&mut self, compiled: Compiled, generation: u16) -> Result<(), String> {
        self.replace(&compiled.table)?;
        self.generation = generation;
        self.installed = Installed::Policy {
            table: compiled.table,
            ids: compiled
                .rules
                .into_iter()
                .map(|(id, name, verdict)| (id, (name, verdict)))
                .collect(),
            default: self.resolved.default,
        };
        self.state = AclState::Installed;
        Ok(())
    }

    /// Installs the closed table for the current context with `reason`; Err when
    /// even that is refused (the kernel then holds whatever it held).
    fn close(&mut self, reason: String) -> Result<(), String> {
        let table = closed(&self.ctx);
        let already = matches!(&self.installed, Installed::Closed { table: t } if *t == table)
            && matches!(self.state, AclState::Closed { .. });
        if !already {
            self.replace(&table)
                .map_err(|e| format!("{reason}; and the closed table was refused too: {e}"))?;
            self.installed = Installed::Closed { table };
        }
        self.state = AclState::Closed { reason };
        Ok(())
    }

    /// One transaction; the old table's counts go to the base when it succeeds.
    fn replace(&mut self, table: &TableSpec) -> Result<(), String> {
        let carried = self.current().unwrap_or_else(|_| self.last.clone());
        self.kernel
            .replace_table(table)
            .map_err(|e| format!("the kernel refused the table: {e}"))?;
        self.base.add(&carried);
        self.last = AclCounters::default();
        Ok(())
    }

    /// The current table's counts, by what we installed.
    fn current(&self) -> Result<AclCounters, String> {
        let mut out = AclCounters::default();
        let rules = self.kernel.rule_counters()?;
        for r in &rules {
            let pseudo = match r.comment.as_str() {
                COMMENT_SPOOF_FROM_STACK => Some(Counted::SpoofFromStack),
                COMMENT_SPOOF_FROM_OVERLAY => Some(Counted::SpoofFromOverlay),
                COMMENT_TCP_NOT_SYN => Some(Counted::TcpNotSyn),
                COMMENT_CLOSED => Some(Counted::Closed),
                COMMENT_FALLBACK => Some(Counted::Fallback),
                COMMENT_ENTERING => {
                    out.rules
                        .entry(Counted::Default)
                        .or_default()
                        .accepted
                        .add(r.packets, r.bytes);
                    continue;
                }
                _ => None,
            };
            if let Some(key) = pseudo {
                out.rules
                    .entry(key)
                    .or_default()
                    .dropped
                    .add(r.packets, r.bytes);
                continue;
            }
            let Installed::Policy { ids, default, .. } = &self.installed else {
                continue;
            };
            if r.chain == CHAIN {
                continue;
            }
            let Some((id, stack)) = parse_comment(&r.comment) else {
                continue;
            };
            let Some((key, verdict)) = key_of(ids, *default, id) else {
                continue;
            };
            let e = out.rules.entry(key.clone()).or_default();
            match verdict {
                Verdict::Allow => e.accepted.add(r.packets, r.bytes),
                Verdict::Deny if r.packets > 0 => {
                    e.dropped.add(r.packets, r.bytes);
                    let stack = stack.and_then(|s| StackName::new(s).ok());
                    out.dropped_from
                        .entry((key, stack))
                        .or_default()
                        .add(r.packets, r.bytes);
                }
                Verdict::Deny => {}
            }
        }
        // The stateless table has no marks.
        if let Installed::Policy {
            ids,
            default,
            table,
        } = &self.installed
        {
            if !tracks_connections(table) {
                return Ok(out);
            }
            for m in self.kernel.mark_counters(SET_ADMITTED)? {
                let id = (m.key & 0xffff) as u16;
                let id = (id != DEFAULT_ID).then_some(id);
                if let Some((key, Verdict::Allow)) = key_of(ids, *default, id) {
                    out.rules
                        .entry(key)
                        .or_default()
                        .accepted
                        .add(m.packets, m.bytes);
                }
            }
        }
        Ok(out)
    }
}

/// A rule id (None: the default) as what it counts for, with its verdict.
fn key_of(
    ids: &BTreeMap<u16, (String, Verdict)>,
    default: Verdict,
    id: Option<u16>,
) -> Option<(Counted, Verdict)> {
    match id {
        None => Some((Counted::Default, default)),
        Some(id) => ids
            .get(&id)
            .map(|(name, verdict)| (Counted::Rule(name.clone()), *verdict)),
    }
}

/// After the generation of the table in the namespace, if there is one; else from the
/// clock.
fn first_generation(kernel: &impl AclKernel) -> u16 {
    if let Ok(marks) = kernel.mark_counters(SET_ADMITTED) {
        if let Some(m) = marks.first() {
            return ((m.key >> 16) as u16).wrapping_add(1);
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_secs() as u16) ^ ((now.subsec_nanos() >> 10) as u16)
}

#[cfg(test)]
mod tests;
