//! A participant built on the SDK that finishes applying a commit after the
//! coordinator gave up on the call (its per-call deadline passed): the
//! coordinator retries, the retry finds the SDK's marker, and the commit is
//! applied exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Result;
use tcc_domain_sdk::ParticipantService;
use tcc_domain_sdk::participant::{Participant, PhaseTwo, TxResult};
use tcc_domain_sdk::store::sled::{SledStore, SledTx};
use tcc_proto::v1::{self, TransactionState as S};
use tcc_tests::{Coordinator, command};

/// Applies slowly (longer than the coordinator's call deadline) and counts
/// applications in its own store.
struct Slow {
    calls: Arc<AtomicU32>,
}

impl Participant for Slow {
    type Store = SledStore;
    // Runs on the store's blocking thread: a blocking sleep is what a slow
    // body does.
    async fn commit(&self, tx: &mut SledTx<'_>, call: &PhaseTwo) -> TxResult<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(400));
        let t = tx.tree("applied")?;
        let n = t.get(b"n")?.map(|v| v[0]).unwrap_or(0);
        t.insert(b"n".as_slice(), &[n + call.commands.len() as u8])?;
        Ok(())
    }
    async fn rollback(&self, _: &mut SledTx<'_>, _: &PhaseTwo) -> TxResult<()> {
        Ok(())
    }
}

#[tokio::test]
async fn an_answer_after_the_coordinator_gave_up_is_not_applied_twice() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path(), &["applied"])?;
    let bodies = Arc::new(AtomicU32::new(0));
    let service = ParticipantService::new(store.clone(), Arc::new(Slow { calls: bodies.clone() }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    let p = format!("slow={url}");
    let c = Coordinator::start(&[
        "--participant",
        &p,
        "--call-timeout-ms",
        "150",
        "--retry-initial-ms",
        "50",
        "--retry-max-ms",
        "100",
    ])
    .await?;
    let mut tx = c.transactions().await?;
    let t = tx.begin(v1::BeginRequest { participants: vec!["slow".into()], timeout_ms: 30_000 }).await?.into_inner();
    let req = v1::AppendRequest {
        partial_id: t.partials[0].partial_id.clone(),
        commands: vec![command("x", "", b"1"), command("y", "", b"2")],
        idempotency_key: String::new(),
        service: "slow".into(),
    };
    c.topics().await?.append(req).await?;
    let confirm = v1::ConfirmRequest { transaction_id: t.transaction_id.clone(), wait: true, wait_timeout_ms: 20_000 };
    let d = tx.confirm(confirm).await?.into_inner();
    assert_eq!(d.state, S::Confirmed as i32, "{}", c.logs());
    let attempts = d.transaction.expect("transaction").participants[0].attempts;
    assert!(attempts >= 2, "the first call timed out and was retried (attempts {attempts})");
    let applied = store.tree("applied")?.get(b"n")?.map(|v| v[0]).unwrap_or(0);
    assert_eq!(applied, 2, "the two commands applied once, not once per attempt");
    Ok(())
}
