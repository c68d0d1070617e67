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
//! - [`sim`]: a simulated network and clock for tests and benchmarks.

pub mod fuzz;
pub mod node;
pub mod record;
pub mod seal;
pub mod sim;
pub mod validate;
pub mod wire;

pub use node::{Counters, Faults, GossipEvent, MemberState, MemberView, Node, Params};
pub use record::{ClaimedStack, Format, Member, NodeId, NodeRecord, MAX_RECORD_BYTES};
pub use seal::{Keyring, Reject, ReplayState};
