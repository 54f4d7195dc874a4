//! The `tcc-coordinator` binary: parses flags, sets up logging, runs the
//! server until SIGINT/SIGTERM, and exits non-zero with a clear message if
//! it cannot start (bad flags, port taken, damaged data directory).
//!
//! Shutdown is bounded: from the signal, the process exits within
//! `--shutdown-timeout-ms` whatever it is doing (a watchdog thread, outside
//! the runtime, ends it if the graceful path has not), so a process
//! supervisor's grace period is never exceeded. Exiting early loses nothing:
//! every acknowledged write is already durable.

use std::process::ExitCode;

use tcc_coordinator::config::{ConfigError, LogFormat};
use tcc_coordinator::telemetry::Telemetry;
use tcc_coordinator::{Config, server};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{EnvFilter, Layer, prelude::*};

/// mimalloc instead of glibc's malloc: the RPC path allocates on every
/// worker thread, and glibc's arena locks and consolidation cost about a
/// tenth of the coordinator's CPU (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::load_from(std::env::args_os()) {
        Ok(config) => config,
        // --help, --version, and bad flags: clap prints and exits.
        Err(ConfigError::Flags(e)) => e.exit(),
        Err(e @ ConfigError::File(_)) => {
            eprintln!("tcc-coordinator: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = match init_logs(config.log_format, config.otlp_endpoint.as_deref()) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("tcc-coordinator: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "tcc-coordinator starting: {}", config.summary());
    let code = match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once, on stderr: the message says what to do.
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    };
    if let Some(telemetry) = telemetry {
        // Blocks until the last spans are exported (or its timeout).
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    }
    code
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` (`info` when unset).
/// An invalid `RUST_LOG` is refused, not ignored. With `otlp_endpoint`,
/// spans are also exported there (see `telemetry`); the spans themselves
/// stay out of the log lines.
fn init_logs(format: LogFormat, otlp_endpoint: Option<&str>) -> Result<Option<Telemetry>, String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) => EnvFilter::try_new(&spec).map_err(|e| {
            format!("RUST_LOG={spec:?} is not a valid log filter ({e}); e.g. RUST_LOG=info or RUST_LOG=info,tcc_coordinator=debug")
        })?,
        Err(_) => EnvFilter::new("info"),
    };
    let filter = filter.add_directive("tcc_coordinator::telemetry=off".parse().map_err(|e| format!("{e}"))?);
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        // Colour only on a terminal: no escape codes in files and pipes.
        LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    let (telemetry, spans) = match otlp_endpoint {
        Some(endpoint) => {
            let (telemetry, layer) = Telemetry::start(endpoint, "tcc-coordinator")?;
            (Some(telemetry), Some(layer))
        }
        None => (None, None),
    };
    tracing_subscriber::registry().with(logs.with_filter(filter)).with(spans).init();
    Ok(telemetry)
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Before the port is bound (and before anything is created on disk).
    config.validate().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let listener = tcc_coordinator::net::bind(config.listen, "--listen").await.map_err(|e| anyhow::anyhow!(e))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone(), config.shutdown_timeout()));
    server::run(config, listener, shutdown, |addr| {
        // The readiness line: scripts and tests wait for it on stdout.
        println!("tcc-coordinator listening on {addr}");
    })
    .await
}

/// Cancels `shutdown` on SIGINT or SIGTERM, and starts the watchdog that
/// ends the process `limit` later.
async fn on_signal(shutdown: CancellationToken, limit: std::time::Duration) {
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
    let watchdog = std::thread::Builder::new().name("tcc-shutdown-watchdog".into()).spawn(move || {
        std::thread::sleep(limit);
        let ms = limit.as_millis();
        tracing::error!(
            "shutdown did not finish within {ms} ms (--shutdown-timeout-ms); exiting now. Every acknowledged write is durable; unfinished work resumes at the next start"
        );
        eprintln!("tcc-coordinator: shutdown did not finish within {ms} ms; exiting");
        std::process::exit(2);
    });
    if let Err(e) = watchdog {
        tracing::warn!(cause = %e, "cannot start the shutdown watchdog; shutdown is not bounded");
    }
    shutdown.cancel();
}
