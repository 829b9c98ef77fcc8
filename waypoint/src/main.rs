//! weft-waypoint entry point.

use clap::Parser;

// Every request allocates (headers, bodies, futures): glibc's malloc took
// about a fifth of the waypoint's CPU under load, mimalloc far less.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cfg = weft_waypoint::config::Config::parse();
    weft_dataplane::logging::init(cfg.log_json);
    let mut runtime = match cfg.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let result = runtime
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(weft_waypoint::app::run(cfg)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-waypoint: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
