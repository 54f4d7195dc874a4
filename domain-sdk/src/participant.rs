//! The participant side: apply or discard a partial transaction exactly
//! once.
//!
//! A service keeps its state in a [`LocalStore`] (its own sled database,
//! with the trees it names) and implements [`Participant`]. The SDK's
//! [`ParticipantService`] is the `tcc.v1.Participant` gRPC service the
//! coordinator calls. For every commit or rollback it runs **one sled
//! transaction** that:
//!
//! 1. reads the partial's marker: already committed/rolled back with the same
//!    outcome → acknowledge without running anything (a redelivery); the
//!    opposite outcome → refuse (cannot happen under the protocol);
//! 2. otherwise runs the service's `commit`/`rollback` on the service's
//!    trees, and writes the marker,
//!
//! then flushes the database, and only then acknowledges. So a redelivered
//! call never applies twice, a crash before the flush loses both the change
//! and the marker (and the coordinator redelivers), and a rollback of a
//! partial that never tried is a clean no-op (the marker still records it,
//! which makes a late try for that partial refusable).
//!
//! ## The contract a participant keeps
//! * `commit` must not fail for business reasons: reserve in the try (see
//!   [`crate::reservations`]), so commit only turns reservations into
//!   changes. An [`abort`] from commit is a permanent refusal that puts the
//!   transaction in FAILED_TO_CONFIRM for an operator.
//! * `commit` and `rollback` only touch the store through the given [`Tx`]
//!   and have no other side effects: sled may run them more than once when
//!   transactions conflict.

use std::sync::Arc;

use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{Transactional, Tree};
use tcc_proto::v1;
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::publisher::Command;

/// Why a participant refuses (aborts) a transaction body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Abort(pub String);

/// The result type of code running inside a [`Tx`].
pub type TxResult<T> = std::result::Result<T, ConflictableTransactionError<Abort>>;

/// Aborts the surrounding transaction with `reason`.
pub fn abort<T>(reason: impl Into<String>) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(Abort(reason.into())))
}

/// Which outcome a partial transaction reached in this service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Its commands were applied.
    Committed,
    /// It was rolled back.
    RolledBack,
}

impl Phase {
    fn marker(self) -> &'static [u8] {
        match self {
            Phase::Committed => b"C",
            Phase::RolledBack => b"R",
        }
    }
    fn from_marker(v: &[u8]) -> Option<Self> {
        match v {
            b"C" => Some(Phase::Committed),
            b"R" => Some(Phase::RolledBack),
            _ => None,
        }
    }
    fn verb(self) -> &'static str {
        match self {
            Phase::Committed => "commit",
            Phase::RolledBack => "roll back",
        }
    }
}

const MARKERS: &str = "tcc.partials";

/// A service's own sled database: the trees it names plus the SDK's marker
/// tree of finished partial transactions.
#[derive(Clone, Debug)]
pub struct LocalStore {
    db: sled::Db,
    names: Arc<Vec<String>>,
    /// `trees[0]` is the marker tree; `trees[i + 1]` is `names[i]`.
    trees: Arc<Vec<Tree>>,
}

/// The trees of a [`LocalStore`] inside one transaction.
pub struct Tx<'a> {
    names: &'a [String],
    view: &'a [TransactionalTree],
}

impl Tx<'_> {
    /// The service tree `name` (as passed to [`LocalStore::open`]).
    pub fn tree(&self, name: &str) -> TxResult<&TransactionalTree> {
        match self.names.iter().position(|n| n == name) {
            Some(i) => Ok(&self.view[i + 1]),
            None => abort(format!("no tree named {name:?} in this store")),
        }
    }

    /// The outcome `partial` reached here, if any.
    pub fn phase_of(&self, partial: &str) -> TxResult<Option<Phase>> {
        Ok(self.view[0].get(partial.as_bytes())?.and_then(|v| Phase::from_marker(&v)))
    }

    fn mark(&self, partial: &str, phase: Phase) -> TxResult<()> {
        self.view[0].insert(partial.as_bytes(), phase.marker())?;
        Ok(())
    }
}

impl LocalStore {
    /// Opens (or creates) the database at `path` with the service's trees.
    /// sled's own periodic flush is off: every write the SDK acknowledges
    /// is flushed explicitly ([`LocalStore::flush`]), and sled 0.34's
    /// periodic flusher races its writers (see `flush`).
    pub fn open(path: &std::path::Path, trees: &[&str]) -> Result<Self> {
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(None)
            .open()
            .map_err(|e| Error::Store(format!("cannot open {}: {e}", path.display())))?;
        Self::from_db(db, trees)
    }

    /// Uses an open database; open it with `flush_every_ms(None)`, as
    /// [`LocalStore::open`] does.
    pub fn from_db(db: sled::Db, trees: &[&str]) -> Result<Self> {
        let mut opened = vec![db.open_tree(MARKERS)?];
        for t in trees {
            if *t == MARKERS {
                return Err(Error::Invalid(format!("tree name {MARKERS:?} is reserved")));
            }
            opened.push(db.open_tree(t)?);
        }
        Ok(LocalStore { db, names: Arc::new(trees.iter().map(|s| s.to_string()).collect()), trees: Arc::new(opened) })
    }

    /// A service tree, for reads outside transactions.
    pub fn tree(&self, name: &str) -> Result<&Tree> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| &self.trees[i + 1])
            .ok_or_else(|| Error::Invalid(format!("no tree named {name:?} in this store")))
    }

    /// The outcome `partial` reached here, if any.
    pub fn phase_of(&self, partial: &str) -> Result<Option<Phase>> {
        Ok(self.trees[0].get(partial.as_bytes())?.and_then(|v| Phase::from_marker(&v)))
    }

    /// Runs `f` as one atomic sled transaction over every tree (not yet
    /// durable: call [`flush`](Self::flush) before acknowledging).
    pub fn transaction<R>(&self, f: impl Fn(&Tx<'_>) -> TxResult<R>) -> Result<R> {
        let result = self.trees.as_slice().transaction(|view| f(&Tx { names: &self.names, view }));
        match result {
            Ok(r) => Ok(r),
            Err(TransactionError::Abort(Abort(reason))) => Err(Error::Refused(reason)),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Makes everything written so far durable. Runs `flush` on a blocking
    /// thread (sled 0.34's `flush_async` hangs with many waiters), pinned
    /// to sled's epoch: sled 0.34.7 reads its current I/O buffer in `flush`
    /// without pinning, and a writer sealing that buffer on another thread
    /// defers its drop to the epoch collector, which can free it under an
    /// unpinned flush (a double free; the coordinator's RELIABILITY.md,
    /// "sled's drop, and the flaky journal test").
    pub async fn flush(&self) -> Result<()> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let _pinned = sled::pin();
            db.flush()
        })
        .await
        .map_err(|e| Error::Store(format!("flush task failed: {e}")))??;
        Ok(())
    }
}

/// A command as the coordinator delivered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedCommand {
    /// Position in the topic, from 1.
    pub sequence: u64,
    /// The type name given at publish time.
    pub type_name: String,
    /// The entity key given at publish time.
    pub key: String,
    /// The encoded command.
    pub payload: Vec<u8>,
}

impl ReceivedCommand {
    /// Decodes the payload as `C`, checking the type name.
    pub fn decode<C: Command>(&self) -> TxResult<C> {
        if self.type_name != C::TYPE {
            return abort(format!("command #{} is {:?}, not {:?}", self.sequence, self.type_name, C::TYPE));
        }
        match serde_json::from_slice(&self.payload) {
            Ok(c) => Ok(c),
            Err(e) => abort(format!("command #{} ({}) does not decode: {e}", self.sequence, self.type_name)),
        }
    }
}

/// One commit or rollback call.
#[derive(Clone, Debug)]
pub struct PhaseTwo {
    /// The composite transaction.
    pub transaction_id: String,
    /// The partial transaction.
    pub partial_id: String,
    /// Every command of the partial topic, in order.
    pub commands: Vec<ReceivedCommand>,
}

impl From<v1::PhaseTwoRequest> for PhaseTwo {
    fn from(r: v1::PhaseTwoRequest) -> Self {
        PhaseTwo {
            transaction_id: r.transaction_id,
            partial_id: r.partial_id,
            commands: r
                .commands
                .into_iter()
                .map(|c| ReceivedCommand { sequence: c.sequence, type_name: c.r#type, key: c.key, payload: c.payload })
                .collect(),
        }
    }
}

/// What a domain service implements. See the module docs for the contract.
pub trait Participant: Send + Sync + 'static {
    /// Applies the partial's commands (and turns its reservations into
    /// changes) inside `tx`.
    fn commit(&self, tx: &Tx<'_>, call: &PhaseTwo) -> TxResult<()>;
    /// Discards the partial: releases what its try reserved, inside `tx`.
    /// Called with no commands (and nothing reserved) when the try never
    /// happened.
    fn rollback(&self, tx: &Tx<'_>, call: &PhaseTwo) -> TxResult<()>;
}

/// Whether a phase-2 call did something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Applied now.
    Now,
    /// Already applied earlier (a redelivery): nothing ran.
    Already,
}

/// Commits or rolls back `call` exactly once, durably: the transaction runs
/// on a blocking thread, then the database is flushed before returning,
/// also for a redelivery (`Applied::Already`), because the first delivery
/// may still be waiting for its own flush.
/// Used by [`ParticipantService`] and by the reconciler.
pub async fn apply<P: Participant>(
    store: &LocalStore,
    participant: Arc<P>,
    phase: Phase,
    call: Arc<PhaseTwo>,
) -> Result<Applied> {
    let local = store.clone();
    let applied = tokio::task::spawn_blocking(move || apply_in_transaction(&local, participant.as_ref(), phase, &call))
        .await
        .map_err(|e| Error::Store(format!("participant task failed: {e}")))??;
    store.flush().await?;
    Ok(applied)
}

/// The transaction of [`apply`], without the flush.
fn apply_in_transaction<P: Participant>(
    store: &LocalStore,
    participant: &P,
    phase: Phase,
    call: &PhaseTwo,
) -> Result<Applied> {
    store.transaction(|tx| match tx.phase_of(&call.partial_id)? {
        Some(done) if done == phase => Ok(Applied::Already),
        Some(done) => abort(format!(
            "partial {} was already {}; cannot {} it",
            call.partial_id,
            if done == Phase::Committed { "committed" } else { "rolled back" },
            phase.verb()
        )),
        None => {
            match phase {
                Phase::Committed => participant.commit(tx, call)?,
                Phase::RolledBack => participant.rollback(tx, call)?,
            }
            tx.mark(&call.partial_id, phase)?;
            Ok(Applied::Now)
        }
    })
}

/// The `tcc.v1.Participant` gRPC service over a [`Participant`].
pub struct ParticipantService<P> {
    store: LocalStore,
    participant: Arc<P>,
    only_from: Option<String>,
}

impl<P: Participant> ParticipantService<P> {
    /// A service applying calls to `store` through `participant`.
    pub fn new(store: LocalStore, participant: Arc<P>) -> Self {
        ParticipantService { store, participant, only_from: None }
    }

    /// Accepts phase-2 calls only from a client whose verified certificate
    /// names `coordinator` (served over mutual TLS, see [`crate::tls`]):
    /// a Commit carries the commands to apply, so no other holder of a
    /// certificate from the CA may send one. Others get PERMISSION_DENIED
    /// (or UNAUTHENTICATED without a certificate) and nothing is applied.
    pub fn only_from(mut self, coordinator: impl Into<String>) -> Self {
        self.only_from = Some(coordinator.into());
        self
    }

    /// The tonic server for it, accepting the largest messages the
    /// coordinator sends.
    pub fn into_server(self) -> v1::participant_server::ParticipantServer<Self> {
        v1::participant_server::ParticipantServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    async fn handle(
        &self,
        phase: Phase,
        request: Request<v1::PhaseTwoRequest>,
    ) -> Result<Response<v1::PhaseTwoResponse>, Status> {
        if let Some(expected) = &self.only_from {
            match crate::tls::caller_identity(&request) {
                Some(Ok(name)) if name == *expected => {}
                Some(Ok(name)) => {
                    tracing::warn!(caller = %name, %expected, ?phase, "phase-2 call refused: not from the coordinator");
                    return Err(Status::permission_denied(format!(
                        "identity {name:?} may not call phase 2 here: only the coordinator {expected:?} may"
                    )));
                }
                Some(Err(why)) => {
                    return Err(Status::unauthenticated(format!("the client certificate names no identity: {why}")));
                }
                None => {
                    tracing::warn!(%expected, ?phase, "phase-2 call refused: no client certificate");
                    return Err(Status::unauthenticated(format!(
                        "phase 2 here needs the client certificate of the coordinator {expected:?}"
                    )));
                }
            }
        }
        let call = Arc::new(PhaseTwo::from(request.into_inner()));
        if call.partial_id.is_empty() || call.partial_id.len() > 64 {
            return Err(Status::invalid_argument("partial_id is missing or too long"));
        }
        match apply(&self.store, self.participant.clone(), phase, call.clone()).await {
            Ok(applied) => {
                tracing::debug!(txn = %call.transaction_id, partial = %call.partial_id, ?phase, ?applied, "phase 2 acknowledged");
                Ok(Response::new(v1::PhaseTwoResponse {}))
            }
            Err(Error::Refused(reason)) => {
                tracing::error!(txn = %call.transaction_id, partial = %call.partial_id, ?phase, %reason, "phase 2 refused");
                Err(Status::failed_precondition(reason))
            }
            Err(e) => {
                tracing::warn!(txn = %call.transaction_id, partial = %call.partial_id, ?phase, cause = %e, "phase 2 failed; the coordinator will retry");
                Err(Status::unavailable(e.to_string()))
            }
        }
    }
}

#[tonic::async_trait]
impl<P: Participant> v1::participant_server::Participant for ParticipantService<P> {
    async fn commit(&self, request: Request<v1::PhaseTwoRequest>) -> Result<Response<v1::PhaseTwoResponse>, Status> {
        self.handle(Phase::Committed, request).await
    }

    async fn rollback(&self, request: Request<v1::PhaseTwoRequest>) -> Result<Response<v1::PhaseTwoResponse>, Status> {
        self.handle(Phase::RolledBack, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts applications in a tree, to prove exactly-once.
    struct Counter;

    impl Participant for Counter {
        fn commit(&self, tx: &Tx<'_>, call: &PhaseTwo) -> TxResult<()> {
            let t = tx.tree("count")?;
            let n = t.get(b"commits")?.map(|v| v[0]).unwrap_or(0);
            t.insert(b"commits".as_slice(), &[n + call.commands.len() as u8])?;
            Ok(())
        }
        fn rollback(&self, tx: &Tx<'_>, _call: &PhaseTwo) -> TxResult<()> {
            let t = tx.tree("count")?;
            let n = t.get(b"rollbacks")?.map(|v| v[0]).unwrap_or(0);
            t.insert(b"rollbacks".as_slice(), &[n + 1])?;
            Ok(())
        }
    }

    fn call(partial: &str, n: u64) -> PhaseTwo {
        PhaseTwo {
            transaction_id: "t".into(),
            partial_id: partial.into(),
            commands: (1..=n)
                .map(|s| ReceivedCommand { sequence: s, type_name: "x".into(), key: String::new(), payload: vec![] })
                .collect(),
        }
    }

    fn count(store: &LocalStore, key: &[u8]) -> u8 {
        store.tree("count").ok().and_then(|t| t.get(key).ok().flatten()).map(|v| v[0]).unwrap_or(0)
    }

    #[tokio::test]
    async fn redelivery_applies_once_and_opposite_outcome_is_refused() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Store(e.to_string()))?;
        let store = LocalStore::open(dir.path(), &["count"])?;
        assert_eq!(apply(&store, Arc::new(Counter), Phase::Committed, Arc::new(call("p1", 3))).await?, Applied::Now);
        assert_eq!(
            apply(&store, Arc::new(Counter), Phase::Committed, Arc::new(call("p1", 3))).await?,
            Applied::Already
        );
        assert_eq!(count(&store, b"commits"), 3);
        assert!(matches!(
            apply(&store, Arc::new(Counter), Phase::RolledBack, Arc::new(call("p1", 3))).await,
            Err(Error::Refused(_))
        ));
        // A rollback for a partial that never tried: a clean no-op, recorded.
        assert_eq!(apply(&store, Arc::new(Counter), Phase::RolledBack, Arc::new(call("p2", 0))).await?, Applied::Now);
        assert_eq!(
            apply(&store, Arc::new(Counter), Phase::RolledBack, Arc::new(call("p2", 0))).await?,
            Applied::Already
        );
        assert_eq!(store.phase_of("p2")?, Some(Phase::RolledBack));
        assert_eq!(count(&store, b"rollbacks"), 1);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_duplicate_deliveries_apply_once() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Store(e.to_string()))?;
        let store = LocalStore::open(dir.path(), &["count"])?;
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let s = store.clone();
                tokio::spawn(
                    async move { apply(&s, Arc::new(Counter), Phase::Committed, Arc::new(call("p", 1))).await },
                )
            })
            .collect();
        let mut now = 0;
        for t in tasks {
            if t.await.map_err(|e| Error::Store(e.to_string()))?? == Applied::Now {
                now += 1;
            }
        }
        assert_eq!((now, count(&store, b"commits")), (1, 1));
        Ok(())
    }

    #[tokio::test]
    async fn a_refusing_body_changes_nothing() -> Result<()> {
        struct Refuser;
        impl Participant for Refuser {
            fn commit(&self, tx: &Tx<'_>, _: &PhaseTwo) -> TxResult<()> {
                tx.tree("count")?.insert(b"commits".as_slice(), &[9])?;
                abort("broken invariant")
            }
            fn rollback(&self, _: &Tx<'_>, _: &PhaseTwo) -> TxResult<()> {
                Ok(())
            }
        }
        let dir = tempfile::tempdir().map_err(|e| Error::Store(e.to_string()))?;
        let store = LocalStore::open(dir.path(), &["count"])?;
        assert!(matches!(
            apply(&store, Arc::new(Refuser), Phase::Committed, Arc::new(call("p", 1))).await,
            Err(Error::Refused(_))
        ));
        assert_eq!((count(&store, b"commits"), store.phase_of("p")?), (0, None));
        Ok(())
    }
}
