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
//! Same-host block detection ([`probe`]) needs no responder, no sysctl and no policy
//! rule: a TTL-1 probe sent out through the stack interface (IP_UNICAST_IF) is answered by the host's ICMP Time Exceeded unless Docker's raw-table
//! drop swallows it.
//!
//! Overlay liveness ([`overlay_probe`]): every router answers UDP probes on its router
//! IP and probes the routers of its remote routes over the overlay, writing the
//! results to `probes/<stack>.json` for discovery, which withdraws a host only when
//! both its gossip membership and its datapath are gone.
//!
//! Health ([`health`]): after every reconcile the router compares the kernel's routes
//! and neighbours with routes.json and publishes the counts, the overlay link's state
//! and the last error in its probes file; `vrouter-router healthcheck` (the image's
//! HEALTHCHECK) makes the same comparison from its own reads. `vrouter-router status`
//! ([`status`]) shows the probes file as a table or as JSON.
//!
//! Traffic statistics ([`traffic`]): per remote prefix, an nftables counter rule in
//! each direction at the forward hook (over netlink, no `nft` binary), summed per
//! remote stack once a second into `probes/<stack>.json`.
//!
//! Pure parts ([`settings`], [`desired`], [`diff`], [`health::check_routes`],
//! [`status::view`], the plan in [`traffic`]) are tested without root; [`apply`],
//! [`link`] and [`traffic`]'s `TrafficCounters` are the only code that touches the
//! kernel.

pub mod access;
pub mod acl;
pub mod apply;
pub mod attach;
pub mod caps;
pub mod desired;
pub mod diff;
pub mod health;
pub mod link;
pub mod overlay_probe;
pub mod probe;
pub mod run;
pub mod settings;
pub mod status;
pub mod traffic;

use settings::Settings;
use vrouter_state::StateDir;

/// What `vrouter-router` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run,
    Leave,
    /// The image's HEALTHCHECK (`health` is accepted as an older name).
    Healthcheck,
    Status {
        json: bool,
        /// `--explain SRC [PROTO[/PORT]]`: which access rule decides, and why.
        explain: Option<status::ExplainQuery>,
    },
    Version,
    Help,
}

impl Command {
    /// Parses the arguments after the program name.
    pub fn parse(args: &[String]) -> Result<Command, String> {
        const USE: &str =
            "use leave, healthcheck, status [--json] [--explain SRC [PROTO[/PORT]]], --version or --help (settings come from the environment)";
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match args.as_slice() {
            [] | ["run"] => Ok(Command::Run),
            ["leave"] => Ok(Command::Leave),
            ["healthcheck"] | ["health"] => Ok(Command::Healthcheck),
            ["status", rest @ ..] => {
                let (json, rest) = match rest {
                    ["--json", rest @ ..] => (true, rest),
                    rest => (false, rest),
                };
                let explain = match rest {
                    [] => None,
                    ["--explain", source] => Some(status::ExplainQuery::parse(source, None)?),
                    ["--explain", source, service] => {
                        Some(status::ExplainQuery::parse(source, Some(service))?)
                    }
                    ["--explain", ..] => {
                        return Err(format!(
                            "--explain takes a source address and optionally PROTO[/PORT], e.g. --explain 10.2.0.5 tcp/443; {USE}"
                        ))
                    }
                    [other, ..] => return Err(format!("unknown status option {other:?}; {USE}")),
                };
                Ok(Command::Status { json, explain })
            }
            ["--version" | "-V" | "version"] => Ok(Command::Version),
            ["--help" | "-h" | "help"] => Ok(Command::Help),
            [other] => Err(format!("unknown argument {other:?}; {USE}")),
            _ => Err(format!("unexpected arguments ({}); {USE}", args.join(" "))),
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

/// `vrouter-router`: lower privileges, then run until SIGTERM/SIGINT. `policy` is
/// the access policy the settings give, read by the caller (a bad one stops the
/// router before it starts).
pub fn main_run(settings: Settings, policy: acl::Policy) -> anyhow::Result<()> {
    // Before any other thread exists: capability sets are per thread.
    caps::restrict(settings.allow_extra_caps)?;
    runtime()?.block_on(run::run(settings, policy))
}

/// `vrouter-router leave`.
pub fn main_leave(settings: Settings) -> anyhow::Result<()> {
    let socket = settings.state_dir.join(vrouter_state::ATTACH_SOCKET);
    runtime()?.block_on(attach::leave(&socket, &settings.stack))?;
    println!("stack {} left the mesh", settings.stack);
    Ok(())
}

/// `vrouter-router healthcheck`: Ok when the overlay link is there and up and the
/// kernel's routes and neighbours match routes.json; otherwise the one-line reason.
/// Reads the kernel and routes.json itself, never the daemon's files.
pub fn main_healthcheck(settings: Settings) -> anyhow::Result<()> {
    let verdict = runtime()?.block_on(health::healthcheck(&settings));
    match verdict {
        Ok(summary) => {
            println!("{summary}");
            Ok(())
        }
        Err(reason) => anyhow::bail!("unhealthy: {reason}"),
    }
}

/// `vrouter-router status [--json]`: this stack's probes file as a table or JSON.
/// With `--explain`, the verdict of the policy the settings give (as the daemon
/// reads them) on one new connection, with the stacks of routes.json.
pub fn main_status(
    settings: Settings,
    json: bool,
    explain: Option<status::ExplainQuery>,
) -> anyhow::Result<()> {
    let state = StateDir::open_readonly(&settings.state_dir)?;
    if let Some(query) = explain {
        let policy = settings.acl.policy()?;
        let routes = state.read_routes().ok();
        let remote = routes
            .as_ref()
            .and_then(|r| r.stacks.get(&settings.stack))
            .map(|s| s.routes.clone())
            .unwrap_or_default();
        let own = settings.prefixes.clone();
        let e = status::explain(&policy, &remote, own.as_deref(), routes.is_some(), &query);
        if json {
            println!("{}", serde_json::to_string_pretty(&e)?);
        } else {
            print!("{}", status::render_explanation(&e));
        }
        return Ok(());
    }
    let Some(file) = state
        .read_all_probes()
        .into_iter()
        .find(|f| f.stack == settings.stack)
    else {
        anyhow::bail!(
            "no probes file for stack {} in {}: the router has not run with this state directory (check VROUTER_STACK and VROUTER_STATE_DIR)",
            settings.stack,
            settings.state_dir.display()
        );
    };
    let routes = state.read_routes().ok();
    let view = status::view(&file, routes.as_ref(), vrouter_state::now_ms());
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", status::render(&view));
    }
    Ok(())
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
        assert_eq!(parse(&["healthcheck"]), Ok(Command::Healthcheck));
        assert_eq!(parse(&["health"]), Ok(Command::Healthcheck));
        assert_eq!(
            parse(&["status"]),
            Ok(Command::Status {
                json: false,
                explain: None
            })
        );
        assert_eq!(
            parse(&["status", "--json"]),
            Ok(Command::Status {
                json: true,
                explain: None
            })
        );
        let q = |s: &str, svc: Option<&str>| Some(status::ExplainQuery::parse(s, svc).unwrap());
        assert_eq!(
            parse(&["status", "--explain", "10.2.0.5", "tcp/443"]),
            Ok(Command::Status {
                json: false,
                explain: q("10.2.0.5", Some("tcp/443"))
            })
        );
        assert_eq!(
            parse(&["status", "--json", "--explain", "10.2.0.5"]),
            Ok(Command::Status {
                json: true,
                explain: q("10.2.0.5", None)
            })
        );
        assert!(parse(&["status", "--explain"])
            .unwrap_err()
            .contains("--explain 10.2.0.5 tcp/443"));
        assert!(parse(&["status", "--explain", "web"])
            .unwrap_err()
            .contains("IPv4 address"));
        assert_eq!(parse(&["--version"]), Ok(Command::Version));
        assert_eq!(parse(&["-h"]), Ok(Command::Help));
        assert!(parse(&["--stack=a"]).unwrap_err().contains("environment"));
        assert!(parse(&["leave", "now"]).is_err());
        assert!(parse(&["status", "--yaml"]).unwrap_err().contains("--yaml"));
    }
}
