//! What every demo service binary shares: flags, logging, the server with
//! health and reflection, registration with the coordinator, the
//! readiness line, and graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tcc_domain_sdk::registration::Registration;
use tcc_domain_sdk::tls::Tls;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Channel;

/// Flags of a domain service.
#[derive(Clone, Debug, clap::Args)]
pub struct Common {
    /// Address to listen on (API and tcc.v1.Participant).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Directory of this service's sled database.
    #[arg(long, required_unless_present = "database_url")]
    pub data_dir: Option<PathBuf>,
    /// This service's own PostgreSQL database (`postgres://…`), instead of
    /// sled; the SDK and the service create their tables in it.
    #[arg(long, value_name = "URL", conflicts_with = "data_dir")]
    pub database_url: Option<String>,
    /// The coordinator.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub coordinator: String,
    /// Registration lease, in ms.
    #[arg(long, default_value_t = 3_000)]
    pub lease_ms: u64,
    /// Do not register with the coordinator (it must then know the endpoint
    /// statically, or phase 2 only happens through the reconciler).
    #[arg(long)]
    pub no_register: bool,
    /// How often the reconciler looks for overdue holds, in ms.
    #[arg(long, default_value_t = 2_000)]
    pub reconcile_period_ms: u64,
    /// How long after its deadline a hold counts as overdue, in ms.
    #[arg(long, default_value_t = 5_000)]
    pub reconcile_grace_ms: u64,
    /// Mutual TLS.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Export traces over OTLP/gRPC to this collector.
    #[arg(long, env = "TCC_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

/// Mutual TLS flags: all three, or none for plaintext.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TlsArgs {
    /// This service's certificate (PEM); it names the service.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) that signs every identity, the coordinator's included.
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// The identity of the coordinator: the only client allowed to call
    /// phase 2 (with TLS).
    #[arg(long, default_value = "tcc-coordinator")]
    pub coordinator_identity: String,
}

impl TlsArgs {
    /// The TLS material, if configured.
    pub fn load(&self) -> anyhow::Result<Option<Tls>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(Some(Tls::from_files(cert, key, ca)?)),
            _ => Ok(None),
        }
    }

    /// A lazy channel to `url`, over mutual TLS when configured.
    pub fn channel(&self, url: &str) -> anyhow::Result<Channel> {
        let endpoint = match self.load()? {
            Some(tls) => tls.endpoint(url)?,
            None => tonic::transport::Endpoint::from_shared(url.to_string())?,
        };
        Ok(endpoint.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true).connect_lazy())
    }

    /// `service`, accepting phase-2 calls only from the coordinator when
    /// TLS is on.
    pub fn participant<P: tcc_domain_sdk::Participant>(
        &self,
        service: tcc_domain_sdk::ParticipantService<P>,
    ) -> tcc_domain_sdk::ParticipantService<P> {
        if self.tls_cert.is_some() { service.only_from(self.coordinator_identity.clone()) } else { service }
    }
}

/// A binary's whole `main`: tracing on (exporting to `otlp_endpoint`, if
/// any) as `service`, then `run`, then the last spans flushed, then the
/// exit code (a failure printed as `binary: error`).
pub async fn main<F>(binary: &str, service: &'static str, otlp_endpoint: Option<&str>, run: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let tracing = match init_tracing(service, otlp_endpoint) {
        Ok(tracing) => tracing,
        Err(e) => return exit_code(binary, Err(e)),
    };
    let result = run.await;
    tracing.finish().await;
    exit_code(binary, result)
}

/// Turns a binary's result into its exit code, printing the error chain.
fn exit_code(binary: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{binary}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs and traces, set up by [`init_tracing`]; [`Tracing::finish`]
/// exports the spans still buffered.
pub struct Tracing(Option<tcc_coordinator::telemetry::Telemetry>);

impl Tracing {
    /// Exports the last spans (bounded by the exporter's timeout).
    pub async fn finish(self) {
        if let Some(telemetry) = self.0 {
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        }
    }
}

/// Sets up `tracing` to stderr (`RUST_LOG`, default `info`), and, with
/// `otlp_endpoint`, span export as `service` (the SDK's request spans join
/// the callers' traces: see `tcc_domain_sdk::telemetry`). Runs inside the
/// runtime.
fn init_tracing(service: &'static str, otlp_endpoint: Option<&str>) -> anyhow::Result<Tracing> {
    use tracing_subscriber::{Layer, prelude::*};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        // The request spans go to the exporter, not into the log lines.
        .add_directive("tcc_domain_sdk::telemetry=off".parse()?)
        .add_directive("tcc_coordinator::telemetry=off".parse()?);
    // Colour only on a terminal: never escape codes in a log file.
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter);
    let (telemetry, spans) = match otlp_endpoint {
        Some(endpoint) => {
            let (telemetry, layer) =
                tcc_coordinator::telemetry::Telemetry::start(endpoint, service).map_err(|e| anyhow::anyhow!(e))?;
            (Some(telemetry), Some(layer))
        }
        None => (None, None),
    };
    tracing_subscriber::registry().with(logs).with(spans).init();
    Ok(Tracing(telemetry))
}

/// A token cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("signal received; shutting down gracefully");
        t.cancel();
    });
    token
}

/// Serves `routes` (plus health and reflection), which hold the gRPC
/// services named in `served` (e.g. `shop.v1.Customers`), as service
/// `name`: registers with the coordinator (unless `--no-register`), prints
/// `NAME listening on ADDR` on stdout once ready, and stops on `shutdown`,
/// deregistering first. Health reports each of `served`; reflection lists
/// them and nothing else.
pub async fn serve(
    name: &str,
    served: &[&str],
    common: &Common,
    routes: Routes,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tcc_coordinator::net::bind(common.listen, "--listen").await.map_err(|e| anyhow::anyhow!(e))?;
    let addr = listener.local_addr()?;
    let tls = common.tls.load()?;
    let registration = if common.no_register {
        None
    } else {
        let channel = common.tls.channel(&common.coordinator)?;
        let endpoint = format!("{}://{addr}", if tls.is_some() { "https" } else { "http" });
        let reg = Registration::start(channel, name, &endpoint, Duration::from_millis(common.lease_ms))
            .await
            .with_context(|| format!("cannot register with the coordinator at {}", common.coordinator))?;
        Some(reg)
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    for service in served {
        health.set_service_status(*service, tonic_health::ServingStatus::Serving).await;
    }
    let mut reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tcc_domain_sdk::PROTO_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for service in served.iter().copied().chain(["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"]) {
        reflection = reflection.with_service_name(service);
    }
    let reflection = reflection.build_v1()?;
    println!("{name} listening on {addr}");
    tracing::info!(%addr, service = name, "serving");
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        builder = builder.tls_config(tls.server())?;
    }
    let result = builder
        .layer(tcc_domain_sdk::telemetry::TraceLayer)
        .add_routes(routes)
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled(),
        )
        .await;
    if let Some(r) = registration {
        r.stop().await;
    }
    result.context("server failed")?;
    tracing::info!(service = name, "stopped");
    Ok(())
}
