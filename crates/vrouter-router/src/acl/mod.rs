//! Access control: who may open connections into this stack from the overlay (issue
//! 14). The destination stack's owner writes the policy; its own router enforces it.
//!
//! - [`policy`]: the policy model and its parsing (pure);
//! - [`resolve`]: stack names to prefixes, and the decision for one connection (pure);
//! - [`ranges`]: the policy's sources as disjoint address ranges, each with its
//!   covering rules in precedence order and its remote stack (pure);
//! - [`compile`]: the nftables table `ip vrouter_acl` that enforces a resolved policy,
//!   and the closed table for when none can be installed (pure; a test walks the
//!   table as the kernel would and checks it decides as [`ResolvedPolicy::decide`]);
//! - [`enforce`]: [`Acl`], the table in the router's namespace: start (fail closed),
//!   reload (the old policy stays on error), routes changes, counters.
//!
//! The daemon uses [`Acl`] through `access.rs` (events, health, counters) and
//! `run.rs` (installed before the overlay link comes up, reloaded on file change and
//! SIGHUP, kept in step with routes.json).
//!
//! # Writing a policy
//!
//! - `VROUTER_DEFAULT_POLICY`: `allow` (the default, today's behaviour) or `deny`,
//!   for new connections that no rule covers.
//! - `VROUTER_ALLOW`: allow rules, separated by commas or newlines:
//!   `web:tcp/443, ops, 10.9.0.0/16:udp/53, any:icmp, api:tcp/{80,443,8000-8080}`.
//!   A rule is `SOURCE[:PROTOCOL[/PORTS]]`: the source is a stack name, a prefix
//!   (`10.9.0.0/16`, `10.9.0.5/32` for one address) or `any`; the protocol `tcp`,
//!   `udp` or `icmp` (none: every protocol); ports (tcp and udp only, destination
//!   ports) one (`443`), a range (`8000-8080`) or a list in braces (`{80,443}`).
//!   `any` is reserved: a stack called `any` cannot be named in a rule, nor a stack
//!   whose name is an IPv4 address.
//! - `VROUTER_ACL_FILE`: the same rules in TOML, with optional names and deny rules:
//!
//!   ```toml
//!   default = "deny"          # optional; must agree with VROUTER_DEFAULT_POLICY
//!
//!   [[rule]]
//!   name = "https from web"   # optional: the rule's text otherwise
//!   allow = "web:tcp/443"
//!
//!   [[rule]]
//!   deny = "10.9.5.0/24"
//!   ```
//!
//! The list's rules and the file's make one policy. A rule's name (given, or
//! `allow web:tcp/443` from its text) must be unique: it names the rule in errors,
//! counters and verdict explanations. A bad rule is refused with one line that names
//! the setting, the rule and the fix ([`PolicyError`]).
//!
//! # Precedence
//!
//! Order in the list or file does not matter. Of the rules that cover a new
//! connection (source address in the rule's source, protocol and port in its
//! service), the one with the **most specific source** decides: the longest prefix
//! that holds the address (a stack name counts as the prefix of that stack which
//! holds it, `any` as /0). Between rules with equally specific sources, the **narrower
//! service** decides (ports before a protocol before every protocol). If that still
//! ties, **deny beats allow**. When no rule covers the connection, the default
//! decides. So `deny 10.9.0.0/16` with `allow 10.9.1.0/24:tcp/443` admits 443 from
//! 10.9.1.0/24 and nothing else from 10.9/16; `deny web` with `allow web:tcp/443`
//! admits web on 443 only; `allow web` with `deny web` denies web.
//!
//! # Stack names
//!
//! A stack name stands for that stack's prefixes as this stack's routes in
//! routes.json list them, on whatever host, same host included ([`resolve::resolve`],
//! run again on every change): when the stack moves or gains a prefix its rights
//! follow, when it leaves they go, and a stack not yet there is listed in
//! `ResolvedPolicy::unresolved`.

pub mod compile;
pub mod enforce;
pub mod policy;
pub mod ranges;
pub mod resolve;
#[cfg(test)]
mod tests;

pub use compile::{closed, compile, AclContext, Compiled};
pub use enforce::{Acl, AclCounters, AclKernel, AclState, Count, Counted, RuleCount};
pub use policy::{
    from_settings, parse_rule, Policy, PolicyError, PortRange, Protocol, Rule, Service, Source,
    Verdict,
};
pub use resolve::{resolve, Decision, ResolvedPolicy, ResolvedRule};
