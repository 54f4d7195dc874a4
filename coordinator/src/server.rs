//! Assembles and runs the coordinator: store, engine, recovery, phase-2
//! delivery, sweeper, and the gRPC server with health and reflection.
//!
//! Start-up order matters: recovery runs before the listener serves, so no
//! client sees a transaction the engine has not loaded. Shutdown is the
//! reverse: the server stops accepting and finishes in-flight requests, then
//! the background tasks stop, then the store closes (every acknowledged
//! write was already flushed).

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
use tonic::transport::server::TcpIncoming;
use tracing::info;

use crate::api::{admin::AdminApi, registry::RegistryApi, topics::TopicsApi, transactions::TransactionsApi};
use crate::clock::{OsEntropy, SystemClock};
use crate::config::{Config, fixed};
use crate::delivery::registry::{self, Registry};
use crate::delivery::{Delivery, transport::GrpcTransport};
use crate::engine::{Engine, sweeper};
use crate::error::Error;
use crate::store::Store;
use crate::store::memory::MemStore;
use crate::store::postgres::PgStore;
use crate::store::sled::SledStore;

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
    let entropy = Arc::new(OsEntropy);
    let clock = Arc::new(SystemClock);
    let connect_timeout = Duration::from_millis(config.delivery.call_timeout_ms.clamp(100, 2_000));
    // Checked before the store is opened: a bad flag creates nothing.
    Registry::new(&config.participants, connect_timeout, Arc::new(MemStore::new()), clock.clone())
        .context("bad --participant")?;
    let (store, place) = open_store(&config).await?;
    let (engine, decided) =
        Engine::new(store.clone(), clock.clone(), entropy.clone(), config.limits.clone(), config.retention());
    let registry = Arc::new(
        Registry::new(&config.participants, connect_timeout, store.clone(), clock.clone())
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
    tasks.spawn(delivery.run(decided));
    tasks.spawn(sweeper::run(engine.clone(), background.clone()));
    tasks.spawn(registry::run(registry.clone(), background.clone()));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TransactionsServer<TransactionsApi>>().await;
    health.set_serving::<TopicsServer<TopicsApi>>().await;
    health.set_serving::<RegistryServer<RegistryApi>>().await;
    health.set_serving::<AdminServer<AdminApi>>().await;
    let reflection = reflection_builder().build_v1().context("building reflection service")?;
    let reflection_alpha = reflection_builder().build_v1alpha().context("building reflection service")?;

    let max = fixed::MAX_MESSAGE_BYTES;
    info!(%addr, "serving");
    on_ready(addr);
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(
            TransactionsServer::new(TransactionsApi::new(engine.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            TopicsServer::new(TopicsApi::new(engine.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(RegistryServer::new(RegistryApi::new(registry, clock)))
        .add_service(
            AdminServer::new(AdminApi::new(engine.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown.cancelled())
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

/// Opens the store the configuration names: the PostgreSQL database of a
/// cluster, or the embedded store in the data directory. Returns it with a
/// description for messages.
async fn open_store(config: &Config) -> anyhow::Result<(Arc<dyn Store>, String)> {
    if let Some(url) = &config.database_url {
        let place = format!("the database {}", redact(url));
        let store =
            PgStore::connect(url, config.lease()).await.map_err(|e| anyhow::anyhow!("cannot use {place}: {e}"))?;
        info!(node = ?store.node(), lease_ms = config.lease_ms, "cluster mode: coordinators share {place}");
        return Ok((Arc::new(store), place));
    }
    let dir = config.data_dir.display();
    let store = SledStore::open(&config.data_dir).map_err(|e| match e {
        Error::Corrupt { .. } => anyhow::anyhow!("the data directory {dir} is damaged: {e}"),
        other => anyhow::anyhow!("cannot open data directory {dir}: {other}"),
    })?;
    Ok((Arc::new(store), format!("the data directory {dir}")))
}

/// A database URL without its password, for messages and logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
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

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(super::redact("postgres://tcc:secret@db:5432/tcc"), "postgres://tcc:***@db:5432/tcc");
        assert_eq!(super::redact("postgres://tcc@db/tcc"), "postgres://tcc@db/tcc");
        assert_eq!(super::redact("postgres://db/tcc"), "postgres://db/tcc");
    }
}
