//! The `tcc-coordinator` binary: parses flags, sets up logging, runs the
//! server until SIGINT/SIGTERM, and exits non-zero with a clear message if
//! it cannot start (bad flags, port taken, damaged data directory).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tcc_coordinator::{Config, server};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc's malloc: the RPC path allocates on every
/// worker thread, and glibc's arena locks and consolidation cost about a
/// tenth of the coordinator's CPU (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("tcc-coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    server::run(config, listener, shutdown, |addr| {
        // The readiness line: scripts and tests wait for it on stdout.
        println!("tcc-coordinator listening on {addr}");
    })
    .await
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received; shutting down gracefully"),
        _ = term => tracing::info!("SIGTERM received; shutting down gracefully"),
    }
    shutdown.cancel();
}
