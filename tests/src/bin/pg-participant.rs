//! `pg-participant`: a participant service on PostgreSQL built on the SDK
//! (the [`Counter`] of `tcc_tests::participants`), for the test that kills
//! a service between its local COMMIT and its answer. With
//! `--hang-after-commit`, every Commit that applies is committed in the
//! database and then never answered, so the test can kill -9 the process
//! in exactly that window.

use std::sync::Arc;

use anyhow::Result;
use clap::Parser;
use tcc_domain_sdk::ParticipantService;
use tcc_domain_sdk::proto::participant_server::{Participant as Phase2, ParticipantServer};
use tcc_domain_sdk::proto::{PhaseTwoRequest, PhaseTwoResponse};
use tcc_domain_sdk::store::postgres::PgStore;
use tcc_tests::participants::{Counter, open_counting_pg};
use tonic::{Request, Response, Status};

#[derive(Parser)]
struct Args {
    /// Where to serve tcc.v1.Participant.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// The service's own database.
    #[arg(long)]
    database_url: String,
    /// Never answer a Commit once it is committed locally.
    #[arg(long)]
    hang_after_commit: bool,
}

/// The SDK's service, hanging after each local COMMIT.
struct HangAfterCommit(ParticipantService<Counter<PgStore>>);

#[tonic::async_trait]
impl Phase2 for HangAfterCommit {
    async fn commit(&self, request: Request<PhaseTwoRequest>) -> Result<Response<PhaseTwoResponse>, Status> {
        let partial = request.get_ref().partial_id.clone();
        self.0.commit(request).await?;
        tracing::info!(%partial, "committed locally; never answering");
        std::future::pending().await
    }

    async fn rollback(&self, request: Request<PhaseTwoRequest>) -> Result<Response<PhaseTwoResponse>, Status> {
        self.0.rollback(request).await
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse();
    let store = open_counting_pg(&args.database_url).await?;
    let service = ParticipantService::new(store, Arc::new(Counter::<PgStore>::default()));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    println!("counter listening on {}", args.listen);
    let mut server = tonic::transport::Server::builder();
    if args.hang_after_commit {
        server.add_service(ParticipantServer::new(HangAfterCommit(service))).serve_with_incoming(incoming).await?;
    } else {
        server.add_service(service.into_server()).serve_with_incoming(incoming).await?;
    }
    Ok(())
}
