//! The attach protocol between a router and discovery, over the Unix socket
//! `discovery.sock` in the state directory (SOCK_SEQPACKET: one JSON message per
//! packet, a namespace descriptor riding along as SCM_RIGHTS).
//!
//! The router connects, sends `Register` (with its /proc/self/ns/net descriptor when
//! it needs an overlay link), and keeps the connection open: its closing is how
//! discovery learns the router is gone. It sends `Ack` after each routes.json
//! generation it applied, and `Register` again if its overlay link disappears.
//! `Leave` withdraws the stack at once.

use crate::types::{Mac, StackName, StackSpec};
use serde::{Deserialize, Serialize};

/// Largest message either side sends; bigger packets are refused.
pub const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RouterMessage {
    Register(Registration),
    /// The router applied this routes.json generation.
    Ack {
        generation: u64,
    },
    /// Withdraw this stack now (`vrouter-router leave`).
    Leave {
        stack: StackName,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    #[serde(flatten)]
    pub spec: StackSpec,
    /// True when a descriptor rides along and discovery must (re)create the overlay
    /// link; false when the router already has a working one (discovery restarted).
    pub needs_link: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DiscoveryMessage {
    /// The overlay link was moved into the router's namespace under `ifname`.
    Attached { ifname: String, mac: Mac, mtu: u32 },
    /// Registration accepted; the router's existing link is kept.
    Registered,
    /// Registration refused; `reason` names the problem and the fix.
    Refused { reason: String },
    /// Reply to `Leave`.
    Left,
}
