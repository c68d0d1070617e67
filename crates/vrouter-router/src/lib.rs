//! vrouter-router: the data plane of one compose stack. It runs in the stack's network
//! namespace with CAP_NET_ADMIN only, registers its stack with discovery, takes over
//! the overlay link discovery moves in, and keeps its neighbours, routes and probe
//! rule reconciled to routes.json.
//!
//! At start, before registering, the router gives its stack interface a stable MAC,
//! 02:42 followed by its IPv4 address (Docker's historic derivation, so a no-op where
//! Docker still derives it), and sends one datagram to the gateway so that it ARPs and
//! the host refreshes its neighbour entry for the router. A restarted router container
//! gets a fresh namespace and, on recent Docker, a random MAC; with the stable one the
//! host's steering neighbour and the services' entries stay right and traffic does not
//! stall until their neighbour entries are probed again. Failing to set it is logged
//! and reported (`stack_mac_unchanged`), and the router goes on.
//!
//! Same-host block detection ([`probe`]) needs no responder and no sysctl: a marked
//! TTL-1 probe is answered by the host's ICMP Time Exceeded unless Docker's raw-table
//! drop swallows it.
//!
//! Overlay liveness ([`overlay_probe`]): every router answers UDP probes on its router
//! IP and probes the routers of its remote routes over the overlay, writing the
//! results to `probes/<stack>.json` for discovery, which withdraws a host only when
//! both its gossip membership and its datapath are gone.
//!
//! Traffic statistics ([`traffic`]): per remote prefix, an nftables counter rule in
//! each direction at the forward hook (over netlink, no `nft` binary), summed per
//! remote stack once a second into `probes/<stack>.json`.
//!
//! Pure parts ([`settings`], [`desired`], [`diff`], the plan in [`traffic`]) are tested
//! without root; [`apply`], [`link`] and [`traffic`]'s `TrafficCounters` are the only
//! code that touches the kernel.

pub mod apply;
pub mod attach;
pub mod caps;
pub mod desired;
pub mod diff;
pub mod link;
pub mod overlay_probe;
pub mod probe;
pub mod run;
pub mod settings;
pub mod traffic;

use settings::Settings;
use vrouter_kernel::Kernel;
use vrouter_state::StateDir;

/// What `vrouter-router` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run,
    Leave,
    Health,
    Version,
    Help,
}

impl Command {
    /// Parses the arguments after the program name.
    pub fn parse(args: &[String]) -> Result<Command, String> {
        match args {
            [] => Ok(Command::Run),
            [a] => match a.as_str() {
                "run" => Ok(Command::Run),
                "leave" => Ok(Command::Leave),
                "health" => Ok(Command::Health),
                "--version" | "-V" | "version" => Ok(Command::Version),
                "--help" | "-h" | "help" => Ok(Command::Help),
                other => Err(format!(
                    "unknown argument {other:?}; use leave, health, --version or --help (settings come from the environment)"
                )),
            },
            _ => Err(format!(
                "too many arguments ({}); use one of leave, health, --version, --help (settings come from the environment)",
                args.join(" ")
            )),
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    // One thread: the router does little at a time, and a netlink socket belongs to
    // the namespace of the thread that made it.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// `vrouter-router`: lower privileges, then run until SIGTERM/SIGINT.
pub fn main_run(settings: Settings) -> anyhow::Result<()> {
    // Before any other thread exists: capability sets are per thread.
    caps::restrict(settings.allow_extra_caps)?;
    runtime()?.block_on(run::run(settings))
}

/// `vrouter-router leave`.
pub fn main_leave(settings: Settings) -> anyhow::Result<()> {
    let socket = settings.state_dir.join(vrouter_state::ATTACH_SOCKET);
    runtime()?.block_on(attach::leave(&socket, &settings.stack))?;
    println!("stack {} left the mesh", settings.stack);
    Ok(())
}

/// `vrouter-router health`: Ok when the overlay link exists and is up and routes.json
/// is readable; otherwise the reason.
pub fn main_health(settings: Settings) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let name = settings.overlay_ifname();
        let kernel = Kernel::connect().await?;
        match kernel.link_by_name(&name).await? {
            None => anyhow::bail!("overlay link {name} is absent (not attached by discovery yet?)"),
            Some(l) if !l.up => anyhow::bail!("overlay link {name} is down"),
            Some(_) => {}
        }
        let state = StateDir::open_readonly(&settings.state_dir)?;
        state.read_routes().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        Command::parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn commands() {
        assert_eq!(parse(&[]), Ok(Command::Run));
        assert_eq!(parse(&["leave"]), Ok(Command::Leave));
        assert_eq!(parse(&["health"]), Ok(Command::Health));
        assert_eq!(parse(&["--version"]), Ok(Command::Version));
        assert_eq!(parse(&["-h"]), Ok(Command::Help));
        assert!(parse(&["--stack=a"]).unwrap_err().contains("environment"));
        assert!(parse(&["leave", "now"]).is_err());
    }
}
