//! Static peers from a TOML file (`--config` / `VROUTER_CONFIG`):
//!
//! ```toml
//! [[host]]
//! address = "198.18.0.2"        # the remote host's underlay (advertised) address
//! public_key = "<base64>"       # optional: its WireGuard public key (`wg pubkey`)
//! wg_port = 51820               # optional: its WireGuard port (default 51820)
//!
//! [[host.stack]]
//! name = "b"
//! vni = 1000
//! prefixes = ["10.2.0.0/24"]
//! router_ip = "10.2.0.254"
//! ```
//!
//! Router MACs are derived (`Mac::for_router`), so the file carries none.

use super::PeerSource;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use vrouter_state::{PeerHost, Prefix, StackName, StackSpec, Vni};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    host: Vec<HostDoc>,
    /// Gossip bootstrap peers (`host[:port]`), read by the gossip module; the static
    /// peers and gossip mix in one file.
    #[serde(default)]
    #[allow(dead_code)]
    join: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostDoc {
    address: String,
    /// Its WireGuard public key: with one, the host counts as `prefer` (it can
    /// encrypt); without, as `off`.
    #[serde(default)]
    public_key: Option<String>,
    #[serde(default)]
    wg_port: Option<i64>,
    #[serde(default)]
    stack: Vec<StackDoc>,
}

/// WireGuard's usual port, a static peer's default.
const DEFAULT_WG_PORT: u16 = 51820;

/// A static peer's encryption: a key makes it `prefer` (its tunnel address is filled
/// in by [`crate::encryption::fill_static_tunnels`]).
fn static_encryption(
    h: &HostDoc,
    at: &str,
) -> Result<Option<vrouter_state::PeerEncryption>, String> {
    let wg_port = match h.wg_port {
        None => DEFAULT_WG_PORT,
        Some(p) => u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| {
            format!("{at}: wg_port = {p} is not a UDP port; use 1..65535 (default 51820)")
        })?,
    };
    let Some(text) = &h.public_key else {
        if h.wg_port.is_some() {
            return Err(format!(
                "{at}: wg_port is set without public_key; add the host's WireGuard public key (`wg pubkey < wg.key` on it, or `vrouter-discovery status` there)"
            ));
        }
        return Ok(None);
    };
    let key: vrouter_wg::PublicKey = text.parse().map_err(|e| {
        format!("{at}: public_key = {text:?} is not a WireGuard public key ({e}); copy it from `vrouter-discovery status` on that host (44 base64 characters)")
    })?;
    Ok(Some(vrouter_state::PeerEncryption {
        mode: vrouter_state::EncryptionMode::Prefer,
        public_key: Some(key.to_string()),
        next_public_key: None,
        tunnel: None,
        wg_port,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StackDoc {
    name: String,
    #[serde(default = "default_vni")]
    vni: u64,
    prefixes: Vec<String>,
    router_ip: String,
}

fn default_vni() -> u64 {
    1000
}

/// Parses and checks a static configuration. `origin` names the file in messages.
pub fn parse_static_config(text: &str, origin: &str) -> Result<Vec<PeerHost>, String> {
    let doc: FileDoc = toml::from_str(text).map_err(|e| {
        format!(
            "{origin}: not valid peer configuration: {}",
            e.to_string().trim()
        )
    })?;
    let mut hosts: Vec<PeerHost> = Vec::new();
    let mut names = BTreeSet::new();
    for (hi, h) in doc.host.iter().enumerate() {
        let at = format!("{origin}: host #{}", hi + 1);
        let addr: Ipv4Addr = h.address.trim().parse().map_err(|_| {
            format!("{at}: address = {:?} is not an IPv4 address; write the host's underlay address like 198.18.0.2", h.address)
        })?;
        if hosts.iter().any(|p| p.addr == addr) {
            return Err(format!(
                "{at}: address {addr} is listed twice; merge its stacks into one [[host]] entry"
            ));
        }
        let encryption = static_encryption(h, &format!("{at} ({addr})"))?;
        let mut stacks = Vec::new();
        for s in &h.stack {
            let at = format!("{at} ({addr}), stack {:?}", s.name);
            let name = StackName::new(&s.name).map_err(|e| format!("{at}: {e}"))?;
            if !names.insert(name.clone()) {
                return Err(format!(
                    "{at}: stack name {name} is used twice; every stack needs its own name"
                ));
            }
            let vni = u32::try_from(s.vni)
                .map_err(|_| ())
                .and_then(|v| Vni::new(v).map_err(|_| ()))
                .map_err(|_| {
                    format!(
                        "{at}: vni = {} is outside 1..{}; pick a VNI in that range",
                        s.vni,
                        Vni::MAX
                    )
                })?;
            if s.prefixes.is_empty() {
                return Err(format!(
                    "{at}: prefixes is empty; list the stack's subnets, e.g. [\"10.2.0.0/24\"]"
                ));
            }
            let prefixes = s
                .prefixes
                .iter()
                .map(|p| {
                    p.parse::<Prefix>()
                        .map_err(|e| format!("{at}: prefixes: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let router_ip: Ipv4Addr = s.router_ip.trim().parse().map_err(|_| {
                format!(
                    "{at}: router_ip = {:?} is not an IPv4 address; give the router's fixed address on the stack network",
                    s.router_ip
                )
            })?;
            if !prefixes.iter().any(|p| p.contains(router_ip)) {
                return Err(format!(
                    "{at}: router_ip {router_ip} is outside the stack's prefixes; the router must sit on the stack network"
                ));
            }
            stacks.push(StackSpec {
                name,
                vni,
                prefixes,
                router_ip,
            });
        }
        stacks.sort();
        hosts.push(PeerHost {
            addr,
            stacks,
            source: vrouter_state::PeerOrigin::Static,
            node: None,
            claims: Default::default(),
            generations: Default::default(),
            encryption,
        });
    }
    hosts.sort();
    Ok(hosts)
}

/// The static peer source: one TOML file, reloaded on demand.
pub struct StaticPeers {
    path: PathBuf,
}

impl StaticPeers {
    pub fn new(path: &Path) -> StaticPeers {
        StaticPeers {
            path: path.to_path_buf(),
        }
    }
}

impl PeerSource for StaticPeers {
    fn name(&self) -> &'static str {
        "static"
    }

    fn load(&mut self) -> Result<Vec<PeerHost>, String> {
        let origin = self.path.display().to_string();
        let text = std::fs::read_to_string(&self.path).map_err(|e| {
            format!("{origin} (--config / VROUTER_CONFIG): cannot read the peer configuration: {e}; check the path and the mount")
        })?;
        parse_static_config(&text, &origin)
    }

    fn watched_files(&self) -> Vec<PathBuf> {
        vec![self.path.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[host]]
address = "198.18.0.2"
[[host.stack]]
name = "b"
vni = 1000
prefixes = ["10.2.0.0/24"]
router_ip = "10.2.0.254"

[[host]]
address = "198.18.0.3"
[[host.stack]]
name = "d"
vni = 2000
prefixes = ["10.4.0.0/24", "10.44.0.0/16"]
router_ip = "10.4.0.254"
[[host.stack]]
name = "g"
prefixes = ["10.7.0.0/24"]
router_ip = "10.7.0.254"
"#;

    #[test]
    fn parses_hosts_and_stacks() {
        let hosts = parse_static_config(GOOD, "peers.toml").unwrap();
        assert_eq!(hosts.len(), 2);
        assert_eq!(hosts[0].addr, "198.18.0.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(hosts[1].stacks.len(), 2);
        assert_eq!(hosts[1].stacks[0].prefixes.len(), 2);
        assert_eq!(hosts[1].stacks[1].vni.get(), 1000, "default VNI");
        assert!(parse_static_config("", "x").unwrap().is_empty());
    }

    #[test]
    fn a_host_may_carry_a_wireguard_key_and_port() {
        let key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
        let text = GOOD.replace(
            "address = \"198.18.0.2\"",
            &format!("address = \"198.18.0.2\"\npublic_key = \"{key}\"\nwg_port = 51999"),
        );
        let hosts = parse_static_config(&text, "peers.toml").unwrap();
        let e = hosts[0].encryption.as_ref().unwrap();
        assert_eq!(e.public_key.as_deref(), Some(key));
        assert_eq!(e.wg_port, 51999);
        assert_eq!(e.mode, vrouter_state::EncryptionMode::Prefer);
        assert!(hosts[1].encryption.is_none());
        let only_key = GOOD.replace(
            "address = \"198.18.0.2\"",
            &format!("address = \"198.18.0.2\"\npublic_key = \"{key}\""),
        );
        let hosts = parse_static_config(&only_key, "peers.toml").unwrap();
        assert_eq!(hosts[0].encryption.as_ref().unwrap().wg_port, 51820);
        for (bad, want) in [
            ("public_key = \"abc\"", "public_key = \"abc\""),
            (
                "public_key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8yk!=\"",
                "not a WireGuard public key",
            ),
            ("wg_port = 51820", "without public_key"),
            (
                &format!("public_key = \"{key}\"\nwg_port = 0"),
                "wg_port = 0",
            ),
            (
                &format!("public_key = \"{key}\"\nwg_port = 65536"),
                "wg_port = 65536",
            ),
        ] {
            let text = GOOD.replace(
                "address = \"198.18.0.2\"",
                &format!("address = \"198.18.0.2\"\n{bad}"),
            );
            let e = err(&text);
            assert!(e.contains(want) && e.contains("198.18.0.2"), "{bad}: {e}");
        }
    }

    fn err(text: &str) -> String {
        parse_static_config(text, "peers.toml").unwrap_err()
    }

    #[test]
    fn bad_input_names_the_field_and_fix() {
        let e = err(&GOOD.replace("10.2.0.0/24", "10.2.0.0/33"));
        assert!(
            e.contains("peers.toml") && e.contains("stack \"b\"") && e.contains("10.2.0.0/33"),
            "{e}"
        );
        let e = err(&GOOD.replace("vni = 1000", "vni = 16777216"));
        assert!(e.contains("16777216") && e.contains("1..16777215"), "{e}");
        let e = err(&GOOD.replace("vni = 1000", "vni = 0"));
        assert!(e.contains("vni = 0"), "{e}");
        let e = err(&GOOD.replace("198.18.0.2", "198.18.0"));
        assert!(e.contains("address") && e.contains("198.18.0"), "{e}");
        let e = err(&GOOD.replace("router_ip = \"10.2.0.254\"", "router_ip = \"10.9.0.1\""));
        assert!(e.contains("outside the stack's prefixes"), "{e}");
        let e = err(&GOOD.replace("name = \"g\"", "name = \"b\""));
        assert!(e.contains("used twice"), "{e}");
        let e = err(&GOOD.replace("198.18.0.3", "198.18.0.2"));
        assert!(e.contains("listed twice"), "{e}");
        let e = err(&GOOD.replace("router_ip", "routerip"));
        assert!(e.contains("peers.toml") && e.contains("routerip"), "{e}");
        let e = err("[[host]]\naddress = \"1.2.3.4\"\n[[host.stack]]\nname=\"x\"\nprefixes=[]\nrouter_ip=\"1.2.3.4\"\n");
        assert!(e.contains("prefixes is empty"), "{e}");
    }

    #[test]
    fn reload_reads_file_again() {
        let dir = std::env::temp_dir().join(format!("vrouter-static-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("peers.toml");
        std::fs::write(&path, GOOD).unwrap();
        let mut src = StaticPeers::new(&path);
        assert_eq!(src.load().unwrap().len(), 2);
        std::fs::write(&path, "").unwrap();
        assert!(src.load().unwrap().is_empty());
        std::fs::remove_file(&path).unwrap();
        let e = src.load().unwrap_err();
        assert!(e.contains("VROUTER_CONFIG"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
