//! Participants built on the SDK, for the participant-store tests and the
//! `pg-participant` binary: [`Counter`] counts every application in the
//! service's own store (a sled tree, or a PostgreSQL table), and consumes
//! what a `take` command names, so a test can tell exactly how often a
//! body ran to its commit.

use std::future::Future;
use std::marker::PhantomData;

use tcc_domain_sdk::participant::{Participant, PhaseTwo, Tx, TxError, TxResult, abort};
use tcc_domain_sdk::reservations::Reservations;
use tcc_domain_sdk::store::postgres::{PgStore, PgTx};
use tcc_domain_sdk::store::sled::{SledStore, SledTx};

/// A store a [`Counter`] can count in.
pub trait Counting: Reservations {
    /// In a transaction: adds one to `key`.
    fn bump(tx: &mut Tx<'_, Self>, key: &str) -> impl Future<Output = TxResult<()>>;
    /// The committed count of `key`.
    fn count(&self, key: &str) -> impl Future<Output = anyhow::Result<i64>> + Send;
}

/// The sled tree of counts.
pub const COUNTS: &str = "counts";

impl Counting for SledStore {
    async fn bump(tx: &mut SledTx<'_>, key: &str) -> TxResult<()> {
        let tree = tx.tree(COUNTS)?;
        let n = tree.get(key.as_bytes())?.map(|v| i64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])));
        tree.insert(key.as_bytes(), &(n.unwrap_or(0) + 1).to_be_bytes())?;
        Ok(())
    }

    fn count(&self, key: &str) -> impl Future<Output = anyhow::Result<i64>> + Send {
        let read = || -> anyhow::Result<i64> {
            let v = self.tree(COUNTS)?.get(key.as_bytes())?;
            Ok(v.map(|v| i64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]))).unwrap_or(0))
        };
        std::future::ready(read())
    }
}

/// The PostgreSQL table of counts, created by [`open_counting_pg`].
pub const COUNTS_TABLE: &str = "CREATE TABLE IF NOT EXISTS counts (key TEXT PRIMARY KEY, n BIGINT NOT NULL)";

impl Counting for PgStore {
    async fn bump(tx: &mut PgTx<'_>, key: &str) -> TxResult<()> {
        let sql = "INSERT INTO counts (key, n) VALUES ($1, 1) ON CONFLICT (key) DO UPDATE SET n = counts.n + 1";
        let statement = tx.prepare_cached(sql).await?;
        tx.execute(&statement, &[&key]).await?;
        Ok(())
    }

    fn count(&self, key: &str) -> impl Future<Output = anyhow::Result<i64>> + Send {
        let key = key.to_string();
        async move {
            let client = self.pool().get().await?;
            let row = client.query_opt("SELECT n FROM counts WHERE key = $1", &[&key]).await?;
            Ok(row.map(|r| r.get(0)).unwrap_or(0))
        }
    }
}

/// A [`PgStore`] on `url` with the counts table.
pub async fn open_counting_pg(url: &str) -> anyhow::Result<PgStore> {
    let store = PgStore::connect(url).await?;
    let client = store.pool().get().await?;
    client
        .batch_execute(&format!("SET client_min_messages = warning; {COUNTS_TABLE}; RESET client_min_messages"))
        .await?;
    Ok(store)
}

/// Counts applications: a commit adds one to the partial's count per
/// command, after consuming what a `take` command names (key: resource,
/// payload: the amount in decimal), and releases leftovers; a rollback
/// releases and adds one to `PARTIAL:rollback`.
pub struct Counter<S>(PhantomData<fn() -> S>);

impl<S> Default for Counter<S> {
    fn default() -> Self {
        Counter(PhantomData)
    }
}

impl<S: Counting> Participant for Counter<S> {
    type Store = S;

    async fn commit(&self, tx: &mut Tx<'_, S>, call: &PhaseTwo) -> TxResult<()> {
        for c in &call.commands {
            if c.type_name == "take" {
                let Some(amount) = std::str::from_utf8(&c.payload).ok().and_then(|s| s.parse::<i64>().ok()) else {
                    return abort(format!("command #{} is not an amount", c.sequence));
                };
                tx.consume(&call.partial_id, &c.key, amount).await?;
            }
            S::bump(tx, &call.partial_id).await?;
        }
        tx.release(&call.partial_id).await.map(|_| ())
    }

    async fn rollback(&self, tx: &mut Tx<'_, S>, call: &PhaseTwo) -> TxResult<()> {
        tx.release(&call.partial_id).await?;
        S::bump(tx, &format!("{}:rollback", call.partial_id)).await
    }
}

/// Writes (a count) and then fails its body with `.0`: nothing it wrote
/// may remain, nor any record of the partial.
pub struct Failing<S>(pub TxError, pub PhantomData<fn() -> S>);

impl<S: Counting> Participant for Failing<S> {
    type Store = S;

    async fn commit(&self, tx: &mut Tx<'_, S>, call: &PhaseTwo) -> TxResult<()> {
        S::bump(tx, &call.partial_id).await?;
        Err(self.0.clone())
    }

    async fn rollback(&self, tx: &mut Tx<'_, S>, call: &PhaseTwo) -> TxResult<()> {
        S::bump(tx, &format!("{}:rollback", call.partial_id)).await?;
        Err(self.0.clone())
    }
}

/// Serves the SDK's `tcc.v1.Participant` over a [`Counter`] on `store`, on
/// an ephemeral loopback port, for the rest of the process; returns its
/// endpoint URI.
pub async fn serve_counter<S: Counting>(store: S) -> anyhow::Result<String> {
    let service = tcc_domain_sdk::ParticipantService::new(store, std::sync::Arc::new(Counter::<S>::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    Ok(format!("http://{addr}"))
}
