use std::process::ExitCode;
use vrouter_router::settings::{Settings, HELP};
use vrouter_router::Command;

fn main() -> ExitCode {
    vrouter_state::logging::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match Command::parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vrouter-router: {e}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Version => {
            println!("vrouter-router {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::Help => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vrouter-router: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match command {
        Command::Run => {
            // A bad policy at start is an error, not an open door.
            let policy = match settings.acl.policy() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("vrouter-router: {e}");
                    return ExitCode::from(2);
                }
            };
            vrouter_router::main_run(settings, policy)
        }
        Command::Leave => vrouter_router::main_leave(settings),
        Command::Healthcheck => vrouter_router::main_healthcheck(settings),
        Command::Status { json, explain } => vrouter_router::main_status(settings, json, explain),
        Command::Version | Command::Help => unreachable!("handled above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vrouter-router: {e:#}");
            ExitCode::FAILURE
        }
    }
}
