//! Command-line and environment settings of vrouter-discovery.

use clap::Parser;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;
use vrouter_state::Prefix;
use vrouter_wg::BackendChoice;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "vrouter-discovery",
    version,
    about = "docker-vrouter control plane: owns the VXLAN devices, FDB and host steering, attaches routers, publishes routes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Run the control plane (the default).
    Run,
    /// Exit 0 if an active discovery holds the leader lock of the state directory and
    /// discovery.json is readable; used as the image's HEALTHCHECK.
    Health,
    /// Parse and check the static peer configuration, print the peers, and exit.
    CheckConfig,
    /// Leave the gossip mesh on purpose: every other host withdraws this host's stacks
    /// at once (a plain stop or restart does not). The running discovery then idles.
    LeaveMesh,
    /// Start a WireGuard key rotation: a new key pair is announced beside the current
    /// one, and becomes the key once every routed peer uses it (make before break).
    RotateKey,
    /// Remove everything discovery made on this host (its VXLAN devices, steering rules
    /// and routes, and the state files), after the last stack is down. Refuses while a
    /// discovery is active on the state directory.
    Cleanup,
    /// Print this host's status from the state directory (works while discovery is
    /// down: the datapath is headless): hosts, stacks, routes, conflicts, traffic.
    Status {
        /// Print the status as JSON (the same document as GET /v1/status).
        #[arg(long)]
        json: bool,
    },
    /// Both roles in one privileged host-network container: the router runs in a private
    /// network namespace plugged into the stack's bridge (deploy/all-in-one).
    AllInOne(crate::allinone::AllInOneArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Shared state directory (discovery.json, routes.json, events.log, the attach socket).
    #[arg(
        long,
        env = "VROUTER_STATE_DIR",
        default_value = "/var/lib/docker-router"
    )]
    pub state_dir: PathBuf,

    /// Discovery's private directory (node id, claims, leader lock, replay state, the
    /// admin socket): never mounted by routers. Defaults to `<state-dir>-private`.
    #[arg(long, env = "VROUTER_PRIVATE_DIR")]
    pub private_dir: Option<PathBuf>,

    /// Underlay interface; detected from the default route when unset.
    #[arg(long, env = "VROUTER_UNDERLAY_INTERFACE")]
    pub underlay_interface: Option<String>,

    /// Address peers send VXLAN traffic to, when it differs from the underlay address (NAT).
    #[arg(long, env = "VROUTER_ADVERTISE_ADDR", value_parser = parse_ipv4("--advertise-addr / VROUTER_ADVERTISE_ADDR"))]
    pub advertise_addr: Option<Ipv4Addr>,

    /// UDP port of the VXLAN devices.
    #[arg(long, env = "VROUTER_VXLAN_PORT", default_value_t = 4789, value_parser = parse_port)]
    pub vxlan_port: u16,

    /// Static peer configuration (TOML), reloaded when it changes and on SIGHUP.
    #[arg(long, env = "VROUTER_CONFIG")]
    pub config: Option<PathBuf>,

    /// Static peers inline, in the configuration file's TOML format (instead of --config).
    #[arg(long, env = "VROUTER_PEERS", hide_env_values = true)]
    pub peers: Option<String>,

    /// Turn on source-address learning on the VXLAN devices (off by default: static
    /// entries make it unnecessary, and learned rows hide missing static rows).
    #[arg(long, env = "VROUTER_VXLAN_LEARNING", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub vxlan_learning: bool,

    /// How long a router whose connection closed may take to come back before its stack
    /// is withdrawn, in milliseconds.
    #[arg(long, env = "VROUTER_GRACE_MS", default_value_t = 3000)]
    pub grace_ms: u64,

    /// Interval of the drift-repairing reconcile, in milliseconds.
    #[arg(long, env = "VROUTER_RECONCILE_MS", default_value_t = 2000)]
    pub reconcile_ms: u64,

    /// Priority of the host steering policy rules.
    #[arg(long, env = "VROUTER_RULE_PRIORITY", default_value_t = 1000)]
    pub rule_priority: u32,

    /// Gossip bootstrap peers, `host[:port]` by address or DNS name, comma-separated
    /// (names are re-resolved). One is enough; the config file's `join` adds more.
    #[arg(long, env = "VROUTER_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,

    /// UDP port of the gossip mesh (Docker Swarm uses 7946; this avoids it).
    #[arg(long, env = "VROUTER_GOSSIP_PORT", default_value_t = 7950, value_parser = parse_port)]
    pub gossip_port: u16,

    /// Address the gossip socket binds to (the advertised address is
    /// --advertise-addr or the underlay address).
    #[arg(long, env = "VROUTER_GOSSIP_BIND", default_value = "0.0.0.0", value_parser = parse_ipv4("--gossip-bind / VROUTER_GOSSIP_BIND"))]
    pub gossip_bind: Ipv4Addr,

    /// File of gossip secrets, one per line: the first seals what this host sends, all
    /// are accepted (rotation). Re-read when it changes and on SIGHUP.
    #[arg(long, env = "VROUTER_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,

    /// Gossip secrets inline, comma-separated, the sending one first.
    #[arg(long, env = "VROUTER_SECRET", hide_env_values = true)]
    pub secret: Option<String>,

    /// Run the gossip mesh without a secret: anyone who can reach the port can join
    /// and announce routes. Only for labs.
    #[arg(long, env = "VROUTER_INSECURE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub insecure: bool,

    /// Most prefixes one host may announce, this one included; the rest are refused
    /// (newest stacks first). The default admits 100 stacks of 4 prefixes with room.
    #[arg(long, env = "VROUTER_MAX_PREFIXES_PER_HOST", default_value_t = 512)]
    pub max_prefixes_per_host: usize,

    /// Address of the HTTP endpoint (/healthz, /readyz, /metrics, /v1/status), or `off`.
    /// Loopback by default: expose it on purpose (it has no authentication).
    #[arg(long, env = "VROUTER_HTTP_ADDR", default_value = "127.0.0.1:9474", value_parser = parse_http_addr)]
    pub http_addr: HttpAddr,

    /// Size at which events.log is rotated to events.log.1 (one old file is kept), in bytes.
    #[arg(long, env = "VROUTER_EVENTS_MAX_BYTES", default_value_t = vrouter_state::store::DEFAULT_EVENTS_CAP, value_parser = parse_events_cap)]
    pub events_max_bytes: u64,

    /// How local stacks reach the overlay: `ports` (netdev chains at the bridge ports
    /// steer the services' frames straight to the tunnel or the destination router;
    /// stacks not steerable yet keep the policy rule) or `rule` (the host's policy rule
    /// only, e.g. for DOCKER-USER rules that must see the traffic, or kernels without
    /// netdev ingress hooks).
    #[arg(long, env = "VROUTER_STEERING", default_value = "ports", value_parser = parse_steering)]
    pub steering: vrouter_state::SteeringMode,

    /// Name of the `netdev` nftables table port steering programs (tests give it
    /// their prefix).
    #[arg(long, env = "VROUTER_STEERING_TABLE", default_value = "vrouter", value_parser = parse_table_name)]
    pub steering_table: String,

    /// Encryption of the overlay between hosts (VXLAN over WireGuard): `off`,
    /// `require` (only through WireGuard: a host without a key is not routed) or
    /// `prefer` (encrypted with hosts that have a key, in the clear with the others:
    /// for a rolling enablement).
    #[arg(long, env = "VROUTER_ENCRYPTION", default_value = "off", value_parser = parse_encryption)]
    pub encryption: vrouter_state::EncryptionMode,

    /// This host's WireGuard private key (base64, as `wg genkey` writes it). Created
    /// with mode 0600 on first start when absent. Defaults to `<private-dir>/wg.key`.
    #[arg(long, env = "VROUTER_WG_PRIVATE_KEY_FILE")]
    pub wg_private_key_file: Option<PathBuf>,

    /// UDP port WireGuard listens on (every host announces its own).
    #[arg(long, env = "VROUTER_WG_PORT", default_value_t = 51820, value_parser = parse_wg_port)]
    pub wg_port: u16,

    /// Range of the hosts' tunnel addresses (derived from each host's underlay
    /// address); it must not overlap a stack's prefix, the underlay or a host network.
    #[arg(long, env = "VROUTER_TUNNEL_RANGE", default_value = "10.255.0.0/16", value_parser = parse_tunnel_range)]
    pub tunnel_range: Prefix,

    /// Name of the WireGuard interface discovery owns.
    #[arg(long, env = "VROUTER_WG_DEVICE", default_value = "vrouter-wg", value_parser = parse_wg_device)]
    pub wg_device: String,

    /// WireGuard implementation: `auto` (kernel WireGuard when the module is there,
    /// else the userspace engine), `kernel` or `userspace`.
    #[arg(long, env = "VROUTER_WG_BACKEND", default_value = "auto", value_parser = parse_wg_backend)]
    pub wg_backend: BackendChoice,

    /// Seconds without a WireGuard handshake after which a routed encrypted peer is
    /// reported stale (tests shorten it).
    #[arg(
        long,
        env = "VROUTER_WG_STALE_SECS",
        default_value_t = 180,
        hide = true
    )]
    pub wg_stale_secs: u64,

    /// Longest wait of a key rotation for every peer to use the next key, in seconds
    /// (tests shorten it).
    #[arg(
        long,
        env = "VROUTER_WG_ROTATION_SECS",
        default_value_t = 120,
        hide = true
    )]
    pub wg_rotation_secs: u64,

    /// Offer to relay overlay traffic between hosts that cannot reach each other
    /// directly but both reach this one (forwarding in this host's own namespace; this
    /// host's root sees the relayed frames in the clear unless encryption is on).
    #[arg(long, env = "VROUTER_RELAY", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub relay: bool,

    /// How often each path target is probed, in ms (tests shorten it).
    #[arg(long, env = "VROUTER_PATH_PROBE_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=60_000), hide = true)]
    pub path_probe_ms: u64,

    /// A path with no probe answer for this long is dead, in ms (tests shorten it).
    #[arg(long, env = "VROUTER_PATH_DEAD_MS", default_value_t = 2500, value_parser = clap::value_parser!(u64).range(100..=600_000), hide = true)]
    pub path_dead_ms: u64,

    /// Test-only fault switch: a file whose lines (e.g. `drop-broadcasts`) turn faults on.
    #[arg(long, env = "VROUTER_TEST_FAULTS", hide = true)]
    pub test_faults: Option<PathBuf>,
}

impl Settings {
    /// Discovery's private directory: `--private-dir`, or `<state-dir>-private` beside
    /// the shared one (`/var/lib/docker-router-private` by default).
    pub fn private_dir(&self) -> PathBuf {
        self.private_dir.clone().unwrap_or_else(|| {
            let mut s = self.state_dir.clone().into_os_string();
            s.push("-private");
            PathBuf::from(s)
        })
    }

    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }

    /// Gossip runs when a secret (or `--insecure`) or a bootstrap peer is configured.
    pub fn gossip_enabled(&self) -> bool {
        self.secret_file.is_some()
            || self.secret.is_some()
            || self.insecure
            || !self.join.is_empty()
    }

    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_millis(self.reconcile_ms.max(100))
    }

    /// Whether the overlay runs over WireGuard (`require` or `prefer`).
    pub fn encryption_on(&self) -> bool {
        self.encryption != vrouter_state::EncryptionMode::Off
    }

    /// The WireGuard private key file: `--wg-private-key-file`, or `wg.key` in the
    /// private directory.
    pub fn wg_key_file(&self) -> PathBuf {
        self.wg_private_key_file
            .clone()
            .unwrap_or_else(|| self.private_dir().join("wg.key"))
    }

    /// The encryption settings, one per line, for `check-config`.
    pub fn encryption_summary(&self) -> String {
        let mut out = format!("encryption: {} (VROUTER_ENCRYPTION)\n", self.encryption);
        if self.encryption_on() {
            out.push_str(&format!(
                "  key file: {} (VROUTER_WG_PRIVATE_KEY_FILE)\n  WireGuard port: {} (VROUTER_WG_PORT)\n  tunnel range: {} (VROUTER_TUNNEL_RANGE)\n  device: {} (VROUTER_WG_DEVICE)\n  backend: {} (VROUTER_WG_BACKEND)\n",
                self.wg_key_file().display(),
                self.wg_port,
                self.tunnel_range,
                self.wg_device,
                backend_name(self.wg_backend),
            ));
        }
        out
    }
}

impl Settings {
    /// Addresses and relaying (issue 17), one per line, for `check-config`.
    pub fn paths_summary(&self) -> String {
        let address = match self.advertise_addr {
            Some(a) => format!(
                "address: {a}, pinned by VROUTER_ADVERTISE_ADDR (peers are not asked where they see this host)"
            ),
            None => "address: the underlay address, plus the one peers see it at behind a NAT (reflected; pin one with VROUTER_ADVERTISE_ADDR)".into(),
        };
        let relay = if self.relay {
            "relay: offered (VROUTER_RELAY=true): this host forwards between peers that cannot reach each other; its root namespace sees their frames (in the clear unless encryption is on)"
        } else {
            "relay: not offered (VROUTER_RELAY)"
        };
        format!("{address}\n{relay}\n")
    }
}

pub fn backend_name(b: BackendChoice) -> &'static str {
    match b {
        BackendChoice::Auto => "auto",
        BackendChoice::Kernel => "kernel",
        BackendChoice::Userspace => "userspace",
    }
}

fn parse_encryption(s: &str) -> Result<vrouter_state::EncryptionMode, String> {
    use vrouter_state::EncryptionMode as M;
    match s.trim().to_ascii_lowercase().as_str() {
        "off" => Ok(M::Off),
        "require" => Ok(M::Require),
        "prefer" => Ok(M::Prefer),
        _ => Err(format!(
            "--encryption / VROUTER_ENCRYPTION = {s:?} is not an encryption mode; use off (the default), require or prefer"
        )),
    }
}

fn parse_wg_backend(s: &str) -> Result<BackendChoice, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(BackendChoice::Auto),
        "kernel" => Ok(BackendChoice::Kernel),
        "userspace" => Ok(BackendChoice::Userspace),
        _ => Err(format!(
            "--wg-backend / VROUTER_WG_BACKEND = {s:?} is not a WireGuard backend; use auto (the default), kernel or userspace"
        )),
    }
}

fn parse_wg_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!(
            "--wg-port / VROUTER_WG_PORT = {s:?} is not a UDP port; use 1..65535 (default 51820)"
        )),
    }
}

/// A range of at least 4 addresses (/30): one for the network, one for broadcast,
/// two hosts.
fn parse_tunnel_range(s: &str) -> Result<Prefix, String> {
    let p: Prefix = s
        .parse()
        .map_err(|e| format!("--tunnel-range / VROUTER_TUNNEL_RANGE = {s:?}: {e}"))?;
    if p.prefix_len() > 30 {
        return Err(format!(
            "--tunnel-range / VROUTER_TUNNEL_RANGE = {s:?} is too small; use a /30 or larger range for the hosts' tunnel addresses (default 10.255.0.0/16)"
        ));
    }
    let reserved = crate::safety::RESERVED
        .iter()
        .any(|(a, l, _)| Prefix::containing(*a, *l).overlaps(&p));
    if p.is_default() || reserved {
        return Err(format!(
            "--tunnel-range / VROUTER_TUNNEL_RANGE = {s:?} is not usable for tunnel addresses; use a private range such as 10.255.0.0/16 (the default)"
        ));
    }
    Ok(p)
}

/// An interface name: 1-15 bytes, no '/', ':', whitespace (the kernel's rules).
fn parse_wg_device(s: &str) -> Result<String, String> {
    let t = s.trim();
    let ok = !t.is_empty()
        && t.len() <= 15
        && t != "."
        && t != ".."
        && t.chars()
            .all(|c| c.is_ascii_graphic() && c != '/' && c != ':');
    if ok {
        Ok(t.to_string())
    } else {
        Err(format!(
            "--wg-device / VROUTER_WG_DEVICE = {s:?} is not an interface name; use 1-15 letters, digits, '-' or '_' (default vrouter-wg)"
        ))
    }
}

/// Where the HTTP endpoint listens, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpAddr(pub Option<std::net::SocketAddr>);

fn parse_http_addr(s: &str) -> Result<HttpAddr, String> {
    let t = s.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("off") {
        return Ok(HttpAddr(None));
    }
    t.parse().map(|a| HttpAddr(Some(a))).map_err(|_| {
        format!("--http-addr / VROUTER_HTTP_ADDR = {s:?} is not an address:port; write it like 127.0.0.1:9474, or off")
    })
}

fn parse_events_cap(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if n >= 1024 => Ok(n),
        _ => Err(format!(
            "--events-max-bytes / VROUTER_EVENTS_MAX_BYTES = {s:?} is not a size in bytes of at least 1024 (default 1048576)"
        )),
    }
}

fn parse_steering(s: &str) -> Result<vrouter_state::SteeringMode, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "ports" => Ok(vrouter_state::SteeringMode::Ports),
        "rule" => Ok(vrouter_state::SteeringMode::Rule),
        _ => Err(format!(
            "--steering / VROUTER_STEERING = {s:?} is not a steering mode; use ports (the default) or rule"
        )),
    }
}

fn parse_table_name(s: &str) -> Result<String, String> {
    let t = s.trim();
    let ok = !t.is_empty()
        && t.len() <= 64
        && t.starts_with(|c: char| c.is_ascii_alphabetic())
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(t.to_string())
    } else {
        Err(format!(
            "--steering-table / VROUTER_STEERING_TABLE = {s:?} is not a table name; use 1-64 letters, digits, '_' or '-', starting with a letter (default vrouter)"
        ))
    }
}

fn parse_ipv4(setting: &'static str) -> impl Fn(&str) -> Result<Ipv4Addr, String> + Clone {
    move |s: &str| {
        s.trim().parse::<Ipv4Addr>().map_err(|_| {
            format!("{setting} = {s:?} is not an IPv4 address; write it like 198.18.0.1")
        })
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!(
            "--vxlan-port / VROUTER_VXLAN_PORT = {s:?} is not a UDP port; use 1..65535 (default 4789)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let mut v = vec!["vrouter-discovery"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v)
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.settings.vxlan_port, 4789);
        assert_eq!(
            c.settings.state_dir,
            PathBuf::from("/var/lib/docker-router")
        );
        assert!(!c.settings.vxlan_learning);
        assert!(c.settings.config.is_none());
        assert_eq!(
            c.settings.http_addr,
            HttpAddr(Some("127.0.0.1:9474".parse().unwrap()))
        );
        assert_eq!(c.settings.events_max_bytes, 1024 * 1024);
        assert_eq!(c.settings.steering, vrouter_state::SteeringMode::Ports);
        assert_eq!(c.settings.steering_table, "vrouter");
    }

    #[test]
    fn steering_mode_and_table() {
        let c = parse(&["--steering", "rule", "--steering-table", "vd2vrouter"]).unwrap();
        assert_eq!(c.settings.steering, vrouter_state::SteeringMode::Rule);
        assert_eq!(c.settings.steering_table, "vd2vrouter");
        assert_eq!(
            parse(&["--steering", "Ports"]).unwrap().settings.steering,
            vrouter_state::SteeringMode::Ports
        );
        let e = parse(&["--steering", "tc"]).unwrap_err().to_string();
        assert!(e.contains("VROUTER_STEERING") && e.contains("ports"), "{e}");
        for bad in ["", "1abc", "a b", "a;b"] {
            let e = parse(&["--steering-table", bad]).unwrap_err().to_string();
            assert!(e.contains("VROUTER_STEERING_TABLE"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn http_addr_and_events_cap() {
        let c = parse(&["--http-addr", "off", "--events-max-bytes", "65536"]).unwrap();
        assert_eq!(c.settings.http_addr, HttpAddr(None));
        assert_eq!(c.settings.events_max_bytes, 65536);
        let c = parse(&["--http-addr", "0.0.0.0:9100"]).unwrap();
        assert_eq!(
            c.settings.http_addr,
            HttpAddr(Some("0.0.0.0:9100".parse().unwrap()))
        );
        let e = parse(&["--http-addr", "9474"]).unwrap_err().to_string();
        assert!(e.contains("VROUTER_HTTP_ADDR") && e.contains("off"), "{e}");
        let e = parse(&["--events-max-bytes", "10"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("VROUTER_EVENTS_MAX_BYTES"), "{e}");
        let c = parse(&["status", "--json"]).unwrap();
        assert!(matches!(c.command, Some(Command::Status { json: true })));
    }

    #[test]
    fn bad_values_name_setting() {
        let e = parse(&["--vxlan-port", "0"]).unwrap_err().to_string();
        assert!(
            e.contains("VROUTER_VXLAN_PORT") && e.contains("1..65535"),
            "{e}"
        );
        let e = parse(&["--advertise-addr", "1.2.3"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("VROUTER_ADVERTISE_ADDR"), "{e}");
    }

    #[test]
    fn encryption_settings() {
        let c = parse(&[]).unwrap().settings;
        assert_eq!(c.encryption, vrouter_state::EncryptionMode::Off);
        assert!(!c.encryption_on());
        assert_eq!(c.wg_port, 51820);
        assert_eq!(c.tunnel_range.to_string(), "10.255.0.0/16");
        assert_eq!(c.wg_device, "vrouter-wg");
        assert_eq!(c.wg_backend, BackendChoice::Auto);
        assert_eq!(c.wg_stale_secs, 180);
        assert_eq!(
            c.wg_key_file(),
            PathBuf::from("/var/lib/docker-router-private/wg.key")
        );
        let c = parse(&[
            "--encryption",
            "Require",
            "--wg-port",
            "51999",
            "--tunnel-range",
            "10.99.0.0/24",
            "--wg-device",
            "wgb-wg",
            "--wg-backend",
            "userspace",
            "--wg-private-key-file",
            "/k",
        ])
        .unwrap()
        .settings;
        assert_eq!(c.encryption, vrouter_state::EncryptionMode::Require);
        assert!(c.encryption_on());
        assert_eq!(c.wg_port, 51999);
        assert_eq!(c.tunnel_range.to_string(), "10.99.0.0/24");
        assert_eq!(c.wg_device, "wgb-wg");
        assert_eq!(c.wg_backend, BackendChoice::Userspace);
        assert_eq!(c.wg_key_file(), PathBuf::from("/k"));
        let summary = c.encryption_summary();
        assert!(
            summary.contains("require") && summary.contains("10.99.0.0/24"),
            "{summary}"
        );
        assert_eq!(
            parse(&["--encryption", "prefer"])
                .unwrap()
                .settings
                .encryption,
            vrouter_state::EncryptionMode::Prefer
        );
        for (flag, bad, setting) in [
            ("--encryption", "on", "VROUTER_ENCRYPTION"),
            ("--wg-port", "0", "VROUTER_WG_PORT"),
            ("--wg-port", "70000", "VROUTER_WG_PORT"),
            ("--tunnel-range", "10.255.0.0", "VROUTER_TUNNEL_RANGE"),
            ("--tunnel-range", "10.255.0.0/31", "VROUTER_TUNNEL_RANGE"),
            ("--tunnel-range", "0.0.0.0/0", "VROUTER_TUNNEL_RANGE"),
            ("--tunnel-range", "127.0.0.0/16", "VROUTER_TUNNEL_RANGE"),
            ("--wg-device", "a-name-longer-than-15", "VROUTER_WG_DEVICE"),
            ("--wg-device", "wg/0", "VROUTER_WG_DEVICE"),
            ("--wg-backend", "boringtun", "VROUTER_WG_BACKEND"),
        ] {
            let e = parse(&[flag, bad]).unwrap_err().to_string();
            assert!(e.contains(setting), "{flag} {bad}: {e}");
        }
    }

    #[test]
    fn relay_and_path_settings() {
        let c = parse(&[]).unwrap().settings;
        assert!(!c.relay);
        assert_eq!((c.path_probe_ms, c.path_dead_ms), (1000, 2500));
        let c = parse(&["--relay", "--path-probe-ms", "200", "--path-dead-ms", "700"])
            .unwrap()
            .settings;
        assert!(c.relay);
        assert_eq!((c.path_probe_ms, c.path_dead_ms), (200, 700));
        assert!(!parse(&["--relay", "false"]).unwrap().settings.relay);
        assert!(
            c.paths_summary().contains("relay: offered"),
            "{}",
            c.paths_summary()
        );
        let pinned = parse(&["--advertise-addr", "203.0.113.5"])
            .unwrap()
            .settings;
        let text = pinned.paths_summary();
        assert!(
            text.contains("203.0.113.5, pinned") && text.contains("not offered"),
            "{text}"
        );
        for (flag, bad) in [
            ("--relay", "maybe"),
            ("--path-probe-ms", "0"),
            ("--path-dead-ms", "x"),
        ] {
            let e = parse(&[flag, bad]).unwrap_err().to_string();
            assert!(
                e.contains(&flag[2..]) || e.contains("VROUTER_"),
                "{flag} {bad}: {e}"
            );
        }
        // The probe settings are hidden from --help; the relay is not.
        let help = parse(&["--help"]).unwrap_err().to_string();
        assert!(
            help.contains("VROUTER_RELAY") && !help.contains("VROUTER_PATH_PROBE_MS"),
            "{help}"
        );
    }

    #[test]
    fn learning_flag() {
        assert!(
            parse(&["--vxlan-learning"])
                .unwrap()
                .settings
                .vxlan_learning
        );
        assert!(
            !parse(&["--vxlan-learning", "false"])
                .unwrap()
                .settings
                .vxlan_learning
        );
    }
}
