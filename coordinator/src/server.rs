//! Assembles and runs the coordinator: store, engine, recovery, phase-2
//! delivery, sweeper, and the gRPC server with health and reflection,
//! `/metrics` and the web console on the same port.
//!
//! Start-up order matters: recovery runs before the listener serves, so no
//! client sees a transaction the engine has not loaded. Shutdown is the
//! reverse: health turns NOT_SERVING, Confirm/Cancel calls waiting for an
//! outcome answer with the state reached so far, the server stops
//! accepting and finishes in-flight requests, then the background tasks
//! stop (abandoning phase-2 calls in flight), then the store closes (every
//! acknowledged write was already flushed). The binary bounds all of it
//! (`--shutdown-timeout-ms`). Connections are accepted through [`net`],
//! and each service decodes requests only up to what a valid one can be.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tcc_proto::v1::{
    admin_server::AdminServer, registry_server::RegistryServer, topics_server::TopicsServer,
    transactions_server::TransactionsServer,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

use crate::api::console::{self, Console};
use crate::api::{admin::AdminApi, registry::RegistryApi, topics::TopicsApi, transactions::TransactionsApi};
use crate::auth::tls::{Tls, TlsFiles};
use crate::auth::{self, Access};
use crate::clock::{OsEntropy, SteadyClock};
use crate::config::{Config, fixed};
use crate::delivery::registry::{self, Registry};
use crate::delivery::{Delivery, transport::GrpcTransport};
use crate::engine::{Engine, sweeper};
use crate::error::Error;
use crate::net;
use crate::store::Store;
use crate::store::memory::MemStore;
use crate::store::postgres::PgStore;
use crate::store::sled::SledStore;

/// HTTP/2 keepalive: a ping after this long without frames from a client...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...which closes the connection unless answered within this.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most concurrent requests (HTTP/2 streams) on one connection; a client
/// with more queues them on its side.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// The HTTP/2 flow-control window of one request: how much of its body a
/// client may send before the server reads it (a request waiting for room
/// in `--max-request-bytes` holds at most this much). The connection's
/// window stays hyper's 1 MiB.
pub const STREAM_WINDOW: u32 = 256 * 1024;

/// Runs the coordinator on `listener` until `shutdown` is cancelled.
/// `on_ready` is called with the listening address once recovery is done
/// and requests are about to be served.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    config.validate().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let addr = listener.local_addr().context("listener has no local address")?;
    let (tls, access) = security(&config, addr)?;
    let entropy = Arc::new(OsEntropy);
    let clock = Arc::new(SteadyClock::system());
    let connect_timeout = Duration::from_millis(config.delivery.call_timeout_ms.clamp(100, 2_000));
    // Checked before the store is opened: a bad flag creates nothing.
    Registry::new(&config.participants, connect_timeout, tls.clone(), Arc::new(MemStore::new()), clock.clone())
        .context("bad --participant")?;
    let (store, place, latest_ms) = open_store(&config).await?;
    if let Some(latest) = latest_ms
        && let Some(behind) = clock.hold_at_least(latest)
    {
        tracing::warn!(
            behind_ms = behind,
            "the system clock is {} s behind the latest time {place} recorded (it was stepped back): coordinator time goes on from that time at the real rate until the clock catches up, so deadlines and ages stay right",
            behind / 1000
        );
    }
    let (engine, decided) =
        Engine::new(store.clone(), clock.clone(), entropy.clone(), config.limits.clone(), config.retention());
    let registry = Arc::new(
        Registry::new(&config.participants, connect_timeout, tls.clone(), store.clone(), clock.clone())
            .context("bad --participant")?,
    );
    registry.load().await.with_context(|| format!("cannot read the registrations from {place}"))?;

    let started = Instant::now();
    let recovered =
        engine.recover().await.with_context(|| format!("recovery failed; {place} is damaged or unreadable"))?;
    info!(
        active = recovered.active,
        delivering = recovered.delivering,
        failed = recovered.failed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        store = %place,
        "recovery complete"
    );

    let background = CancellationToken::new();
    let tasks = TaskTracker::new();
    let transport = Arc::new(GrpcTransport::new(registry.clone()));
    let delivery = Delivery::new(engine.clone(), transport, entropy, config.delivery.clone(), background.clone());
    tasks.spawn(delivery.clone().run(decided));
    tasks.spawn(sweeper::run(engine.clone(), background.clone()));
    tasks.spawn(registry::run(registry.clone(), background.clone()));
    tasks.spawn(auth::watch(tls.clone(), access.clone(), background.clone()));

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, true).await;
    // NOT_SERVING once the store has failed for good (a load balancer
    // then sends no more requests here) or shutdown has begun; at shutdown,
    // waiting decisions answer with the state reached so far.
    tasks.spawn({
        let (store, engine, shutdown, background) =
            (store.clone(), engine.clone(), shutdown.clone(), background.clone());
        async move {
            tokio::select! {
                cause = store.failed() => {
                    error!(%cause, "the store has failed; health is NOT_SERVING until a restart");
                    crate::metrics::store_failed(true);
                    set_health(&health, false).await;
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = background.cancelled() => return,
                    }
                }
                _ = shutdown.cancelled() => {}
                _ = background.cancelled() => return,
            }
            info!(
                "shutting down: no new connections; waiting Confirm/Cancel calls answer with the state reached so far"
            );
            set_health(&health, false).await;
            engine.release_waiters();
        }
    });
    let reflection = reflection_builder().build_v1().context("building reflection service")?;
    let reflection_alpha = reflection_builder().build_v1alpha().context("building reflection service")?;

    // Requests are decoded only up to what a valid one can be; answers may
    // be large (a Read page, a listing).
    let out = fixed::MAX_MESSAGE_BYTES;
    let small = config.limits.max_small_message_bytes();
    let append = config.limits.max_append_message_bytes();
    let c = &config.connections;
    let max = net::descriptor_budget(c.max_connections);
    let limits = net::ConnectionLimits {
        max,
        handshake: Duration::from_millis(c.handshake_timeout_ms),
        idle: Duration::from_millis(c.idle_timeout_ms),
        per_peer: c.per_peer(max),
        body: Duration::from_millis(c.body_timeout_ms),
    };
    let metrics = crate::metrics::install();
    crate::metrics::store_failed(false);
    let console = Console::new(engine.clone(), delivery.clone(), registry.clone(), access.clone(), metrics.clone());
    if let Some(http) = config.http_listen {
        let listener = net::bind(http, "--http-listen").await.map_err(|e| anyhow::anyhow!(e))?;
        // Metrics only: this listener is plaintext wherever it is bound, so
        // the console (which acts) stays on the main port, under its TLS and
        // its loopback rule.
        let router = axum::Router::new().route("/metrics", metrics_route(engine.clone(), metrics.clone()));
        let stop = background.clone();
        info!(addr = %http, "serving /metrics over HTTP");
        tasks.spawn(async move {
            let served = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await;
            if let Err(e) = served {
                error!(cause = %e, "the --http-listen server failed");
            }
        });
    }
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(
            TransactionsServer::new(TransactionsApi::new(engine.clone(), access.clone()))
                .max_decoding_message_size(small)
                .max_encoding_message_size(out),
        )
        .add_service(
            TopicsServer::new(TopicsApi::new(engine.clone(), access.clone()))
                .max_decoding_message_size(append)
                .max_encoding_message_size(out),
        )
        .add_service(
            RegistryServer::new(RegistryApi::new(registry.clone(), clock, access.clone()))
                .max_decoding_message_size(small)
                .max_encoding_message_size(out),
        )
        .add_service(
            AdminServer::new(AdminApi::new(engine.clone(), delivery.clone(), access.clone()))
                .max_decoding_message_size(small)
                .max_encoding_message_size(out),
        )
        .into_axum_router()
        // Plain HTTP beside gRPC on the same port: metrics and the console.
        .route("/metrics", metrics_route(engine.clone(), metrics))
        .merge(console::router(console));
    info!(%addr, max_connections = limits.max, per_peer = limits.per_peer, "serving");
    on_ready(addr);
    tonic::transport::Server::builder()
        .accept_http1(true)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        // What a client may send before the server reads it, per request
        // (the rest waits under --max-request-bytes): hyper's 1 MiB default
        // let 128 connections park 128 MiB outside the budget.
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .layer(net::TrackRequests {
            body: limits.body,
            budget: net::RequestBudget::new(c.max_request_bytes),
            access: access.clone(),
        })
        .add_routes(tonic::service::Routes::from(routes))
        .serve_with_incoming_shutdown(net::incoming(listener, limits, tls), shutdown.cancelled())
        .await
        .context("gRPC server failed")?;

    info!("server stopped accepting; in-flight requests done; stopping background tasks");
    background.cancel();
    tasks.close();
    tasks.wait().await;
    store.close().await;
    info!("coordinator stopped");
    Ok(())
}

/// The TLS material and the access policy the configuration names,
/// checked before anything is created on disk. Refuses plaintext beyond
/// loopback without `--insecure`, and warns loudly with it.
fn security(config: &Config, addr: SocketAddr) -> anyhow::Result<(Option<Arc<Tls>>, Arc<Access>)> {
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let files = TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: config.tls_client_ca.clone() };
            Some(Arc::new(Tls::load(files, config.tokens.is_some()).map_err(|e| anyhow::anyhow!("TLS: {e}"))?))
        }
        _ => None,
    };
    if tls.is_none() && !addr.ip().is_loopback() {
        if !config.insecure {
            anyhow::bail!(
                "{addr} is not a loopback address and TLS is off: give --tls-cert and --tls-key (and --tls-client-ca), or --insecure to serve plaintext there anyway"
            );
        }
        tracing::warn!(
            %addr,
            "INSECURE: serving plaintext beyond loopback (--insecure). Anyone who can reach {addr} can read the commands in transit{}",
            if config.policy.is_none() { ", and, with no --policy, do anything" } else { "" }
        );
    }
    let access = match &config.policy {
        None => Access::open(),
        Some(policy) => Access::enforced(policy.clone(), config.tokens.clone()).map_err(|e| anyhow::anyhow!(e))?,
    };
    if config.policy.is_none() {
        if !addr.ip().is_loopback() {
            // Only with --allow-open-access (the configuration checks).
            tracing::warn!(
                %addr,
                "OPEN ACCESS beyond loopback (--allow-open-access, no --policy): every caller who can reach {addr} may register as any service, receive its commits and decide any transaction"
            );
        } else if config.tls_client_ca.is_some() {
            tracing::warn!(
                "mutual TLS without --policy: every caller with a certificate from --tls-client-ca may do everything (register as any service, receive its commits, decide any transaction); give --policy for least privilege"
            );
        }
    }
    info!(access = %access.summary(), tls = tls.is_some(), mutual = config.tls_client_ca.is_some(), "security");
    Ok((tls, Arc::new(access)))
}

/// `GET /metrics`: refreshes the gauges read from the store, then renders
/// every metric in Prometheus' text format.
fn metrics_route(
    engine: Arc<Engine>,
    handle: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> axum::routing::MethodRouter {
    axum::routing::get(move || {
        let (engine, handle) = (engine.clone(), handle.clone());
        async move {
            use crate::model::TxnState::*;
            // Exact counts; on an error the gauges keep their last values.
            let counts: Vec<(crate::model::TxnState, usize)> = match engine.count_unfinished().await {
                Ok(exact) => [Active, Confirming, Cancelling, FailedToConfirm, FailedToCancel]
                    .into_iter()
                    .map(|state| (state, exact.iter().find(|(s, _)| *s == state).map_or(0, |(_, n)| *n as usize)))
                    .collect(),
                Err(e) => {
                    tracing::warn!(cause = %e, "metrics: cannot count the transactions");
                    Vec::new()
                }
            };
            let oldest = engine
                .oldest_unfinished_created_ms()
                .await
                .ok()
                .flatten()
                .map(|created| Duration::from_millis(engine.now_ms().saturating_sub(created).max(0) as u64));
            crate::metrics::set_states(&counts, oldest);
            (
                [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                handle.map(|h| h.render()).unwrap_or_default(),
            )
        }
    })
}

/// Sets every served service's health, and the server's overall health.
async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic_health::ServingStatus::{NotServing, Serving};
    let status = if serving { Serving } else { NotServing };
    health.set_service_status("", status).await;
    health.set_service_status("tcc.v1.Transactions", status).await;
    health.set_service_status("tcc.v1.Topics", status).await;
    health.set_service_status("tcc.v1.Registry", status).await;
    health.set_service_status("tcc.v1.Admin", status).await;
}

/// Opens the store the configuration names: the PostgreSQL database of a
/// cluster, or the embedded store in the data directory. Returns it with a
/// description for messages and the latest time its records hold (for
/// [`SteadyClock::hold_at_least`]).
async fn open_store(config: &Config) -> anyhow::Result<(Arc<dyn Store>, String, Option<i64>)> {
    if let Some(url) = &config.database_url {
        let place = format!("the database {}", crate::config::redact_url(url));
        let store =
            PgStore::connect(url, config.lease()).await.map_err(|e| anyhow::anyhow!("cannot use {place}: {e}"))?;
        let node = store.node().map(|n| n.to_string()).unwrap_or_default();
        info!(%node, lease_ms = config.lease_ms, "cluster mode: coordinators share {place}");
        let latest = store.latest_ms().await.map_err(|e| anyhow::anyhow!("cannot read {place}: {e}"))?;
        return Ok((Arc::new(store), place, latest));
    }
    let dir = config.data_dir.display();
    let opened = if config.salvage_journal {
        SledStore::open_salvaging(&config.data_dir)
    } else {
        SledStore::open(&config.data_dir)
    };
    let store = opened.map_err(|e| match e {
        Error::Corrupt { key, cause } => anyhow::anyhow!("the data directory {dir} is damaged: {key}: {cause}"),
        other if other.to_string().contains("could not acquire lock") => anyhow::anyhow!(
            "cannot open data directory {dir}: another coordinator is using it (its lock is held); stop that one, or give this one its own --data-dir"
        ),
        other => anyhow::anyhow!("cannot open data directory {dir}: {other}"),
    })?;
    let latest = store.latest_ms();
    Ok((Arc::new(store), format!("the data directory {dir}"), latest))
}

/// Reflection over the services this server actually serves (the
/// descriptor also holds `tcc.v1.Participant`, which domain services
/// implement; it stays describable but is not listed).
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tcc_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for name in [
        "tcc.v1.Transactions",
        "tcc.v1.Topics",
        "tcc.v1.Registry",
        "tcc.v1.Admin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        builder = builder.with_service_name(name);
    }
    builder
}
