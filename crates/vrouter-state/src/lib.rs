//! The state directory contract shared by vrouter-discovery and vrouter-router: the
//! domain types, the files' schema, their atomic locked I/O, and the attach protocol.

pub mod attach;
pub mod crash;
pub mod fsio;
pub mod kinds;
pub mod logging;
pub mod probes;
pub mod schema;
pub mod store;
#[cfg(test)]
mod test_dir;
pub mod types;

pub use kinds::{EncryptionMode, EventKind, MemberState, PeerOrigin};
pub use probes::{
    AclHealth, AclRuleCounters, MtuCheck, PeerProbe, ProbesFile, RouterEvents, RouterHealth,
    StackTraffic, OVERLAY_PROBE_PORT, PROBES_DIR,
};
pub use schema::*;
pub use store::{LeaderLock, PrivateDir, ReadError, StateDir, StateError};
pub use types::*;
