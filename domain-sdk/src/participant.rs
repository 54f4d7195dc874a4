//! The participant side: apply or discard a partial transaction exactly
//! once, in the service's own database.
//!
//! A service implements [`Participant`] for the [`Store`] its data lives in
//! (`SledStore`, embedded, or `PgStore` with the `postgres` feature: see
//! [`crate::store`]). The SDK's
//! [`ParticipantService`](crate::service::ParticipantService) is the
//! `tcc.v1.Participant` gRPC service the coordinator calls. For every
//! commit or rollback the store runs **one local transaction** that first
//! passes the partial's guard and then runs the service's `commit` or
//! `rollback`:
//!
//! * a redelivery of the outcome already recorded is acknowledged without
//!   running anything;
//! * the opposite outcome is refused (a permanent error naming the outcome
//!   recorded), which the protocol never sends;
//! * otherwise the body runs and the outcome is recorded, and both commit
//!   together or not at all.
//!
//! The call is acknowledged only once that transaction is durable. So a
//! crash before it loses both the change and the record (and the
//! coordinator redelivers), and a rollback of a partial that never tried
//! is recorded too, which makes a late try for it refusable.
//!
//! ## The contract a participant keeps
//! * `commit` must not fail for business reasons: reserve in the try (see
//!   [`crate::reservations`]), so commit only turns reservations into
//!   changes. An [`abort`] from commit is a permanent refusal that puts the
//!   transaction in FAILED_TO_CONFIRM for an operator.
//! * `commit` and `rollback` touch the database only through the given
//!   transaction and have no other side effects: they may run more than
//!   once (sled reruns a transaction that conflicts; a PostgreSQL
//!   transaction that fails is retried by the coordinator).
//! * They run on a blocking thread, inside the store's transaction: the
//!   futures they return need not be `Send`, and they should await nothing
//!   but the transaction.

use std::future::Future;
use std::sync::Arc;

use tcc_proto::v1;

use crate::error::{Error, Result};
use crate::publisher::Command;

/// Why a participant's body failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// A permanent refusal (see [`abort`]): the local transaction is rolled
    /// back and the coordinator is told FAILED_PRECONDITION.
    #[error("refused: {0}")]
    Refused(String),
    /// The database failed: the local transaction is rolled back and the
    /// coordinator is told UNAVAILABLE, so it retries.
    #[error("local store: {0}")]
    Store(String),
    /// sled found a conflict and runs the body again (never returned to
    /// the coordinator).
    #[doc(hidden)]
    #[error("conflict")]
    Conflict,
}

/// The result type of a participant's body.
pub type TxResult<T> = std::result::Result<T, TxError>;

/// Refuses the surrounding transaction with `reason`, for good.
pub fn abort<T>(reason: impl Into<String>) -> TxResult<T> {
    Err(TxError::Refused(reason.into()))
}

impl From<TxError> for Error {
    fn from(e: TxError) -> Self {
        match e {
            TxError::Refused(reason) => Error::Refused(reason),
            TxError::Store(cause) => Error::Store(cause),
            TxError::Conflict => Error::Store("the transaction conflicted".into()),
        }
    }
}

impl From<serde_json::Error> for TxError {
    fn from(e: serde_json::Error) -> Self {
        TxError::Refused(format!("cannot encode or decode a record: {e}"))
    }
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
    /// The one-letter code the stores record: `C` or `R` (a try that
    /// reserved, still undecided, is `T`).
    pub fn code(self) -> &'static str {
        match self {
            Phase::Committed => "C",
            Phase::RolledBack => "R",
        }
    }

    /// The phase a recorded code stands for (`None` for `T` or anything
    /// else).
    pub fn from_code(code: &[u8]) -> Option<Self> {
        match code {
            b"C" => Some(Phase::Committed),
            b"R" => Some(Phase::RolledBack),
            _ => None,
        }
    }

    /// Why `wanted` is refused for a partial that already reached `self`.
    pub(crate) fn refusal(self, partial: &str, wanted: Phase) -> String {
        let done = match self {
            Phase::Committed => "committed",
            Phase::RolledBack => "rolled back",
        };
        let verb = match wanted {
            Phase::Committed => "commit",
            Phase::RolledBack => "roll back",
        };
        format!("partial {partial} was already {done}; cannot {verb} it")
    }
}

/// Checks the ids of a call or a try as every store keeps them: a partial
/// id of 1..=64 bytes and a transaction id of at most 64, neither with a
/// NUL character.
pub fn check_ids(partial_id: &str, transaction_id: &str) -> Result<(), String> {
    if partial_id.is_empty() || partial_id.len() > 64 || partial_id.contains('\0') {
        return Err(format!("partial_id {partial_id:?} must be 1..64 bytes without NUL"));
    }
    if transaction_id.len() > 64 || transaction_id.contains('\0') {
        return Err(format!("transaction_id {transaction_id:?} must be at most 64 bytes without NUL"));
    }
    Ok(())
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

/// What a domain service implements, the same way for every store: each
/// method gets the store's open transaction and the call. See the module
/// docs for the contract.
///
/// ```ignore
/// impl Participant for Customers {
///     type Store = PgStore; // or SledStore
///     async fn commit(&self, tx: &mut PgTx<'_>, call: &PhaseTwo) -> TxResult<()> { ... }
///     async fn rollback(&self, tx: &mut PgTx<'_>, call: &PhaseTwo) -> TxResult<()> { ... }
/// }
/// ```
pub trait Participant: Send + Sync + 'static {
    /// The database the service keeps its data in.
    type Store: Store;

    /// Applies the partial's commands (and turns its reservations into
    /// changes) inside `tx`.
    fn commit(&self, tx: &mut Tx<'_, Self::Store>, call: &PhaseTwo) -> impl Future<Output = TxResult<()>>;

    /// Discards the partial: releases what its try reserved, inside `tx`.
    /// Called with no commands (and nothing reserved) when the try never
    /// happened.
    fn rollback(&self, tx: &mut Tx<'_, Self::Store>, call: &PhaseTwo) -> impl Future<Output = TxResult<()>>;
}

/// Runs `participant`'s body for `phase` in `tx`.
pub(crate) async fn run_body<P: Participant>(
    participant: &P,
    tx: &mut Tx<'_, P::Store>,
    phase: Phase,
    call: &PhaseTwo,
) -> TxResult<()> {
    match phase {
        Phase::Committed => participant.commit(tx, call).await,
        Phase::RolledBack => participant.rollback(tx, call).await,
    }
}

/// Whether a phase-2 call did something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Applied now.
    Now,
    /// Already applied earlier (a redelivery): nothing ran.
    Already,
}

/// A service's own database, as the guard sees it: implemented by
/// `SledStore` and `PgStore` (see [`crate::store`], which also documents
/// each guard).
pub trait Store: Clone + Send + Sync + 'static {
    /// What an open local transaction holds: sled's view of the trees, or
    /// PostgreSQL's transaction. Bodies see it as a [`Tx`].
    type Open<'a>;

    /// Runs the guard of `call`'s partial for `phase` and, when it passes,
    /// `participant`'s body, in one local transaction; returns once that
    /// transaction is durable (also for a redelivery, whose first delivery
    /// may still be waiting to be durable). A refusal is
    /// [`Error::Refused`]; a failure of the database is
    /// [`Error::Store`], after which nothing was applied.
    fn apply<P: Participant<Store = Self>>(
        &self,
        participant: Arc<P>,
        phase: Phase,
        call: Arc<PhaseTwo>,
    ) -> impl Future<Output = Result<Applied>> + Send;

    /// The outcome `partial` reached here, if any.
    fn phase_of(&self, partial: &str) -> impl Future<Output = Result<Option<Phase>>> + Send;

    /// [`Tx::consume`] on this store.
    fn consume(tx: &mut Tx<'_, Self>, partial: &str, resource: &str, amount: i64)
    -> impl Future<Output = TxResult<()>>;

    /// [`Tx::release`] on this store.
    fn release(tx: &mut Tx<'_, Self>, partial: &str) -> impl Future<Output = TxResult<i64>>;
}

/// The open local transaction of store `S` that a participant's body runs
/// in: `SledTx` (the service's trees) or `PgTx` (which derefs to the
/// PostgreSQL transaction). The reservation operations of phase 2 are
/// the same on both (see [`crate::reservations`]).
pub struct Tx<'a, S: Store> {
    pub(crate) open: S::Open<'a>,
}

impl<S: Store> Tx<'_, S> {
    /// In a commit: moves `amount` of `resource` held by `partial` to used.
    /// Refuses if the partial holds less (the try did not reserve it).
    pub async fn consume(&mut self, partial: &str, resource: &str, amount: i64) -> TxResult<()> {
        if amount <= 0 {
            return abort(format!("cannot use {amount} of {resource:?}: the amount must be positive"));
        }
        S::consume(self, partial, resource, amount).await
    }

    /// In a rollback (or after a commit, for leftovers): returns everything
    /// `partial` still holds to available. Returns the amount released.
    pub async fn release(&mut self, partial: &str) -> TxResult<i64> {
        S::release(self, partial).await
    }
}

/// Commits or rolls back `call` exactly once, durably, through the
/// participant's store. Used by the gRPC service and by the reconciler.
pub async fn apply<P: Participant>(
    store: &P::Store,
    participant: Arc<P>,
    phase: Phase,
    call: Arc<PhaseTwo>,
) -> Result<Applied> {
    store.apply(participant, phase, call).await
}
