//! Where remote stacks come from. Every source yields the same value, a list of
//! `PeerHost`s; the control loop does not care which source produced it. Static
//! configuration is the first source; gossip replaces it later behind this trait.

mod static_file;

pub use static_file::{parse_static_config, StaticPeers};

use vrouter_state::PeerHost;

pub trait PeerSource: Send {
    /// A short name for events and discovery.json ("static", "gossip").
    fn name(&self) -> &'static str;

    /// Loads (or reloads) the peers. An error leaves the previous peers in force; its
    /// message names the file, the setting and the fix.
    fn load(&mut self) -> Result<Vec<PeerHost>, String>;

    /// Files whose change should trigger a reload (watched by the control loop).
    fn watched_files(&self) -> Vec<std::path::PathBuf>;
}

/// A source with no peers, for a host that only has local stacks.
pub struct NoPeers;

impl PeerSource for NoPeers {
    fn name(&self) -> &'static str {
        "none"
    }
    fn load(&mut self) -> Result<Vec<PeerHost>, String> {
        Ok(Vec::new())
    }
    fn watched_files(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }
}
