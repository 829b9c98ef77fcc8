//! weft-controller entry point.

use clap::{Parser, Subcommand};

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
            weft_dataplane::logging::init(cfg.log_json);
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
