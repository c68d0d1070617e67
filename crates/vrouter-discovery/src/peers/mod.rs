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

/// Static peers given inline (`--peers` / `VROUTER_PEERS`), in the same TOML format as
/// the file: handy in a compose file's `environment:` as a block scalar. Fixed for the
/// life of the process.
pub struct InlinePeers {
    text: String,
}

impl InlinePeers {
    pub fn new(text: &str) -> InlinePeers {
        InlinePeers {
            text: text.to_string(),
        }
    }
}

impl PeerSource for InlinePeers {
    fn name(&self) -> &'static str {
        "static"
    }
    fn load(&mut self) -> Result<Vec<PeerHost>, String> {
        parse_static_config(&self.text, "--peers / VROUTER_PEERS")
    }
    fn watched_files(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }
}

/// Picks the peer source from the settings; both a file and inline peers is an error.
pub fn from_settings(s: &crate::settings::Settings) -> Result<Box<dyn PeerSource>, String> {
    match (&s.config, &s.peers) {
        (Some(_), Some(_)) => Err(
            "both --config / VROUTER_CONFIG and --peers / VROUTER_PEERS are set; give the peers in one place".into(),
        ),
        (Some(path), None) => Ok(Box::new(StaticPeers::new(path))),
        (None, Some(text)) => Ok(Box::new(InlinePeers::new(text))),
        (None, None) => Ok(Box::new(NoPeers)),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn settings(args: &[&str]) -> crate::settings::Settings {
        let mut v = vec!["vrouter-discovery"];
        v.extend_from_slice(args);
        crate::settings::Cli::try_parse_from(v).unwrap().settings
    }

    #[test]
    fn inline_peers_parse_like_the_file() {
        let text = "[[host]]\naddress = \"198.18.0.2\"\n[[host.stack]]\nname = \"b\"\nprefixes = [\"10.2.0.0/24\"]\nrouter_ip = \"10.2.0.254\"\n";
        let mut src = from_settings(&settings(&["--peers", text])).unwrap();
        let peers = src.load().unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].stacks[0].name.as_str(), "b");
        let mut bad =
            from_settings(&settings(&["--peers", "[[host]]\naddress = \"x\"\n"])).unwrap();
        let e = bad.load().unwrap_err();
        assert!(e.starts_with("--peers / VROUTER_PEERS"), "{e}");
    }

    #[test]
    fn one_source_only() {
        let e = from_settings(&settings(&["--peers", "", "--config", "/x"]))
            .err()
            .unwrap();
        assert!(e.contains("one place"), "{e}");
        assert_eq!(from_settings(&settings(&[])).unwrap().name(), "none");
    }
}
