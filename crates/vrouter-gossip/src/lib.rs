//! vrouter-gossip: how discovery daemons find each other without a database.
//!
//! Sans-IO throughout: [`node::Node`] takes datagrams and the time and returns the
//! datagrams to send, so the daemon drives it from a UDP socket and the simulator from
//! a simulated network and clock, with the same code.
//!
//! - [`seal`]: every packet sealed (XChaCha20-Poly1305, HKDF-derived keys, rotation,
//!   replay window);
//! - [`record`]: a node's versioned record and its SWIM identity;
//! - [`node`]: SWIM membership through foca, record broadcast and anti-entropy;
//! - [`path`]: path probes to chosen members, the address peers see (reflection);
//! - [`sim`]: a simulated network and clock for tests and benchmarks.

pub mod fuzz;
pub mod node;
pub mod path;
pub mod record;
pub mod seal;
pub mod sim;
pub mod validate;
pub mod wire;

pub use node::{Counters, Faults, GossipEvent, MemberState, MemberView, Node, Params};
pub use path::{reflect, PathParams, PathView, Reflection, MAX_PATH_TARGETS};
pub use record::{
    ClaimedStack, Format, Member, NatInfo, NodeId, NodeRecord, RelayOffer, RelayReach,
    MAX_RECORD_BYTES, MAX_RELAY_REACH,
};
pub use seal::{Keyring, Reject, ReplayState};
