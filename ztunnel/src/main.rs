//! weft-ztunnel entry point.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "weft-ztunnel", version, about = "Weft's per-node L4 proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(Box<weft_ztunnel::config::Config>),
    /// Remove every pinned eBPF program, link and map of this node's
    /// ztunnel: enrolled pods' traffic goes direct again.
    Uninstall {
        #[arg(long, default_value = "/sys/fs/bpf/weft")]
        bpf_pin_dir: std::path::PathBuf,
        /// Then idle until SIGTERM (the DaemonSet's clean-up mode, whose
        /// image has no shell to do it).
        #[arg(long)]
        wait: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    weft_dataplane::logging::init(matches!(&cli.command, Command::Run(c) if c.log_json));
    let result = match cli.command {
        Command::Run(cfg) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(weft_ztunnel::app::run(*cfg))),
        Command::Uninstall { bpf_pin_dir, wait } => {
            weft_ztunnel::capture::ebpf::Capture::remove_all(&bpf_pin_dir)
                .map_err(anyhow::Error::from)
                .and_then(|()| {
                    eprintln!(
                        "weft-ztunnel: eBPF steering removed from {}",
                        bpf_pin_dir.display()
                    );
                    if !wait {
                        return Ok(());
                    }
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?
                        .block_on(weft_dataplane::logging::shutdown_signal())
                        .map(drop)
                })
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-ztunnel: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
