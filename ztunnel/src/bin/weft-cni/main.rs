//! weft-cni: Weft's chained CNI plugin and, with a subcommand, its
//! installer. A container runtime runs it without arguments (the CNI
//! protocol is environment variables and stdin): that is the plugin
//! (`plugin.rs`), which decides from node-local facts and the Kubernetes
//! API (`kube.rs`) whether a pod must wait for the ztunnel. With a
//! subcommand it is the DaemonSet's installer (`install.rs`, editing the
//! primary conflist with `conflist.rs`), so the ztunnel image needs no
//! shell.

mod conflist;
mod install;
mod kube;
mod plugin;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "weft-cni",
    version,
    about = "Weft's chained CNI plugin (run without arguments by the container runtime) and its installer"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Check the host mounts the ztunnel relies on (bpffs, cgroup v2).
    Preflight(install::Preflight),
    /// Copy weft-cni into the CNI bin dir, chain it last in the primary
    /// conflist with the plugin's kubeconfig, and keep both in place.
    Install(Box<install::Install>),
    /// Take weft-cni out of every conflist and delete the binary and the
    /// plugin's kubeconfig.
    Remove(install::Remove),
}

fn main() -> ExitCode {
    // The runtime passes no arguments; anything else is the installer's.
    if std::env::args_os().len() <= 1 {
        return plugin::main();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        None => return plugin::main(),
        Some(Command::Preflight(p)) => install::preflight(&p),
        Some(Command::Install(i)) => install::install(&i),
        Some(Command::Remove(r)) => install::remove(&r),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-cni: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
