//! Process set-up both proxies share: structured logs (`WEFT_LOG` filter,
//! JSON lines on request) and the signals that start a shutdown.

use tracing_subscriber::EnvFilter;

/// Logs to stderr, filtered by `WEFT_LOG` (default `info`), as JSON lines
/// when `json`.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    } else {
        use std::io::IsTerminal;
        tracing_subscriber::fmt()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    }
}

/// Resolves at SIGTERM (what Kubernetes sends) or SIGINT, naming which.
pub async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
