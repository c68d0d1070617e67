//! What the counters are, as plain values: the sets and rules we make, the elements
//! we put in them, and what a dump reads back. Nothing here knows about stacks: an
//! element carries an opaque `owner` text that the caller chooses and reads back.

use super::uapi::{IPV4_DADDR, IPV4_SADDR};
use std::net::Ipv4Addr;
use vrouter_state::Prefix;

/// The comment's first word: elements and rules without it are not ours.
pub(super) const TAG_WORD: &str = "vrouter";
/// The longest owner text: the whole comment must fit libnftnl's 255-byte TLV.
pub const MAX_OWNER_LEN: usize = 100;

/// Which address of the forwarded packet a counter matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// `ip daddr`: traffic toward the prefix.
    ToPrefix,
    /// `ip saddr`: traffic from the prefix.
    FromPrefix,
}

impl Direction {
    pub(super) fn word(self) -> &'static str {
        match self {
            Direction::ToPrefix => "to",
            Direction::FromPrefix => "from",
        }
    }

    pub(super) fn offset(self) -> u32 {
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
    pub(super) fn rule_comment(&self) -> String {
        format!("{TAG_WORD} count {}", self.set_name())
    }
}

/// One counter: what it matches and whom it is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PrefixCounter {
    /// Whom the counter is for, in the caller's words (the router writes
    /// "stack b"): the rest of the element's comment after the prefix. Non-empty, at
    /// most [`MAX_OWNER_LEN`] bytes, no NUL.
    pub owner: String,
    pub prefix: Prefix,
    pub direction: Direction,
}

impl PrefixCounter {
    /// The element's comment: "vrouter to 10.2.0.0/24 stack b" for owner "stack b".
    pub fn comment(&self) -> String {
        format!(
            "{TAG_WORD} {} {} {}",
            self.direction.word(),
            self.prefix,
            self.owner
        )
    }

    /// The inverse of [`PrefixCounter::comment`]; None for anything else.
    pub fn from_comment(comment: &str) -> Option<PrefixCounter> {
        let mut words = comment.splitn(4, ' ');
        let (Some(TAG_WORD), Some(direction), Some(prefix), Some(owner)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return None;
        };
        let direction = match direction {
            "to" => Direction::ToPrefix,
            "from" => Direction::FromPrefix,
            _ => return None,
        };
        let counter = PrefixCounter {
            owner: owner.to_string(),
            prefix: prefix.parse().ok()?,
            direction,
        };
        counter.owner_is_valid().then_some(counter)
    }

    /// Whether the owner text can go in a comment and come back unchanged.
    pub fn owner_is_valid(&self) -> bool {
        !self.owner.is_empty() && self.owner.len() <= MAX_OWNER_LEN && !self.owner.contains('\0')
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
