use clap::Parser;
use vrouter_discovery::settings::{Cli, Command};

fn main() -> std::process::ExitCode {
    vrouter_state::logging::init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vrouter-discovery: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => rt.block_on(vrouter_discovery::run::run(cli.settings)),
        Command::Health => vrouter_discovery::run::health(&cli.settings),
        Command::CheckConfig => vrouter_discovery::run::check_config(&cli.settings),
        Command::Status { json } => vrouter_discovery::run::status(&cli.settings, json),
        Command::LeaveMesh => rt.block_on(vrouter_discovery::attach::leave_mesh(
            &cli.settings.private_dir(),
        )),
        Command::RotateKey => rt.block_on(vrouter_discovery::attach::rotate_key(
            &cli.settings.private_dir(),
        )),
        Command::Cleanup => rt.block_on(vrouter_discovery::run::cleanup(&cli.settings)),
        Command::AllInOne(a) => rt.block_on(vrouter_discovery::allinone::run(cli.settings, a)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vrouter-discovery: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
