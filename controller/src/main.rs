//! weft-controller entry point.

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "weft-controller", version, about = "Weft's control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (in a cluster, or fed by a folder of manifests).
    Run(Box<weft_controller::app::Config>),
    /// Print the CustomResourceDefinitions of weft.dev as YAML (what
    /// `cargo xtask chart` writes into the Helm chart).
    PrintCrds,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::PrintCrds => {
            print!("{}", weft_api::crd::crds_yaml());
            Ok(())
        }
        Command::Run(cfg) => {
            use std::io::IsTerminal;
            let filter =
                EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
            if cfg.log_json {
                tracing_subscriber::fmt()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_env_filter(filter)
                    .init();
            } else {
                tracing_subscriber::fmt()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr)
                    .with_env_filter(filter)
                    .init();
            }
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(weft_controller::app::run(*cfg)))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-controller: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
