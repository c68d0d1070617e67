//! Port steering against the kernel: the netdev table's rule counters read back by
//! comment, and the table replaced or deleted. The decision is `steer.rs`'s; the
//! controller observes the bridges and calls these.
//!
//! Every call opens its own NETLINK_NETFILTER socket in the calling thread's network
//! namespace (the host's, for discovery and its HTTP task).

use crate::status::SteeringCounters;
use vrouter_kernel::nft::{Family, Nft, RuleCounterReading, TableSpec};
use vrouter_kernel::KernelError;

/// The counters of the table's counted rules by comment (rules without a comment
/// are skipped; two rules with one comment add up).
pub fn counters_of(readings: Vec<RuleCounterReading>) -> SteeringCounters {
    let mut out = SteeringCounters::new();
    for r in readings.into_iter().filter(|r| !r.comment.is_empty()) {
        let c = out.entry(r.comment).or_insert((0, 0));
        c.0 += r.packets;
        c.1 += r.bytes;
    }
    out
}

/// The rule counters of `netdev <table>` by comment; a missing table has none.
pub fn read_counters(table: &str) -> Result<SteeringCounters, KernelError> {
    let nft = Nft::connect_table(Family::Netdev, table)?;
    Ok(counters_of(nft.rule_counters()?))
}

/// What the status endpoints show: the counters, or none when they cannot be read
/// (no CAP_NET_ADMIN for the CLI, say): the status is still worth showing.
pub fn counters_or_none(table: &str) -> SteeringCounters {
    read_counters(table).unwrap_or_default()
}

/// Puts `table` in place of the kernel's `netdev <table.name>` in one transaction.
pub fn replace(table: &TableSpec) -> Result<(), KernelError> {
    Nft::connect_table(Family::Netdev, &table.name)?.replace_table(table)
}

/// Deletes `netdev <table>`; a missing table is not an error.
pub fn delete(table: &str) -> Result<(), KernelError> {
    Nft::connect_table(Family::Netdev, table)?.delete_table()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(comment: &str, packets: u64, bytes: u64) -> RuleCounterReading {
        RuleCounterReading {
            chain: "c".into(),
            handle: 1,
            comment: comment.into(),
            packets,
            bytes,
        }
    }

    #[test]
    fn counters_by_comment() {
        let c = counters_of(vec![
            reading("port veth1 a", 3, 300),
            reading("", 9, 900),
            reading("steer a b", 1, 100),
            reading("steer a b", 2, 200),
        ]);
        assert_eq!(c.len(), 2);
        assert_eq!(c["port veth1 a"], (3, 300));
        assert_eq!(c["steer a b"], (3, 300));
    }
}
