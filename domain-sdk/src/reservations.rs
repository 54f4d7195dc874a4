//! Reserve in try, settle in phase 2.
//!
//! Credit, stock, seats: anything a try must hold so that commit cannot fail.
//! Each resource has an [`Account`] of `available`, `held` and `used`
//! amounts whose sum only changes when the resource is seeded:
//!
//! * try: [`Reservations::hold`] moves amounts from `available` to `held`
//!   under the partial id (all lines or none), refusing if the partial was
//!   already decided here, so a late try reserves nothing;
//! * commit: [`Tx::consume`](crate::participant::Tx::consume) moves a held amount to `used`;
//! * rollback: [`Tx::release`](crate::participant::Tx::release) moves what the partial still holds
//!   back to `available`.
//!
//! [`Reservations`] are the store's operations, and
//! [`Tx`](crate::participant::Tx)'s methods the ones inside a phase-2
//! transaction; both stores implement them with the same
//! semantics and errors (sled in two trees, PostgreSQL in two tables: see
//! [`crate::store`]).
//!
//! A hold records its transaction's deadline. The [`Reconciler`] finds holds
//! past their deadline (plus a grace period), asks the coordinator for the
//! outcome (by reading the partial topic), and applies it through the same
//! exactly-once path as the coordinator's own call, so a lost delivery can
//! never leak a hold forever.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tcc_proto::v1::{self, TransactionState};
use tokio_util::sync::CancellationToken;

use crate::composite::Coordinator;
use crate::error::{Error, Result};
use crate::participant::{Participant, Phase, PhaseTwo, ReceivedCommand, Store, apply, check_ids};
use crate::propagation::PartialContext;
use crate::publisher::{Published, Publisher};

/// Amounts of one resource.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Free to reserve.
    pub available: i64,
    /// Reserved by undecided transactions.
    pub held: i64,
    /// Taken by committed transactions.
    pub used: i64,
}

impl Account {
    /// `available + held + used`: constant except when seeded.
    pub fn total(&self) -> i64 {
        self.available + self.held + self.used
    }
}

/// What one partial transaction holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The partial transaction.
    pub partial_id: String,
    /// Its composite transaction.
    pub transaction_id: String,
    /// The transaction's deadline (unix ms).
    pub deadline_ms: i64,
    /// (resource, amount still held).
    pub lines: Vec<(String, i64)>,
    /// (resource, amount) as the try asked, sorted: a retried try must ask
    /// the same.
    pub requested: Vec<(String, i64)>,
}

/// Longest a hold waits for its transaction before the reconciler looks at
/// it, whatever deadline the caller's metadata claims: the coordinator's
/// largest timeout (1 h) plus a margin.
pub const MAX_HOLD_MS: i64 = 3_600_000 + 60_000;

/// Why a try could not reserve.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    /// The partial was already committed or rolled back here.
    #[error("partial {0} is already decided; nothing reserved")]
    Decided(String),
    /// No such resource.
    #[error("unknown {0:?}")]
    Unknown(String),
    /// Not enough available.
    #[error("not enough {resource:?}: {available} available, {requested} requested")]
    Insufficient {
        /// The resource.
        resource: String,
        /// What is available.
        available: i64,
        /// What was asked for.
        requested: i64,
    },
    /// A bad request (non-positive amount, no lines, a resource twice,
    /// or a retried try asking for other lines).
    #[error("{0}")]
    Invalid(String),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] Error),
    /// Reserved, but publishing the commands failed (see
    /// [`Reservations::reserve_and_publish`]).
    #[error("publishing the try's commands failed: {0}")]
    Publish(Error),
}

impl From<HoldError> for tonic::Status {
    fn from(e: HoldError) -> Self {
        match e {
            HoldError::Decided(_) => tonic::Status::failed_precondition(e.to_string()),
            HoldError::Unknown(_) => tonic::Status::not_found(e.to_string()),
            HoldError::Insufficient { .. } => tonic::Status::failed_precondition(e.to_string()),
            HoldError::Invalid(_) => tonic::Status::invalid_argument(e.to_string()),
            HoldError::Store(s) | HoldError::Publish(s) => s.into(),
        }
    }
}

/// Longest resource name, in bytes (a key in every store).
pub const MAX_RESOURCE_LEN: usize = 255;

/// Checks a seed: a positive amount, a resource of 1..=255 bytes without
/// NUL.
pub(crate) fn check_seed(resource: &str, amount: i64) -> Result<()> {
    if amount <= 0 || resource.is_empty() || resource.len() > MAX_RESOURCE_LEN || resource.contains('\0') {
        return Err(Error::Invalid(format!(
            "cannot seed {amount} of {resource:?}: the amount must be positive and the resource 1..255 bytes without NUL"
        )));
    }
    Ok(())
}

/// The refusal of a retried try that asks for other lines than the first.
pub(crate) fn retried_try_differs(partial: &str, first: &[(String, i64)]) -> HoldError {
    HoldError::Invalid(format!("partial {partial} already reserved {first:?}; a retried try must ask the same"))
}

/// The refusal of a seed that would take an account past `i64`.
pub(crate) fn seed_overflow(resource: &str, amount: i64) -> String {
    format!("cannot add {amount} to {resource:?}: the total would leave the range of a 64-bit integer")
}

/// Checks a try's lines and makes its hold: 1..=100 lines, distinct
/// resources of 1..=255 bytes, positive amounts; the deadline capped at
/// [`MAX_HOLD_MS`] from now.
pub fn checked_hold(ctx: &PartialContext, lines: &[(String, i64)]) -> Result<Hold, HoldError> {
    if lines.is_empty() || lines.len() > 100 {
        return Err(HoldError::Invalid(format!("a hold needs 1..100 lines, got {}", lines.len())));
    }
    if let Some((r, a)) = lines.iter().find(|(_, a)| *a <= 0) {
        return Err(HoldError::Invalid(format!("amount for {r:?} must be positive, got {a}")));
    }
    if let Some((r, _)) = lines.iter().find(|(r, _)| r.is_empty() || r.len() > MAX_RESOURCE_LEN) {
        return Err(HoldError::Invalid(format!("resource {r:?} must be 1..{MAX_RESOURCE_LEN} bytes")));
    }
    let mut requested = lines.to_vec();
    requested.sort();
    if let Some(w) = requested.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(HoldError::Invalid(format!("resource {:?} is listed twice", w[0].0)));
    }
    check_ids(&ctx.partial_id, &ctx.transaction_id).map_err(HoldError::Invalid)?;
    if let Some((r, _)) = lines.iter().find(|(r, _)| r.contains('\0')) {
        return Err(HoldError::Invalid(format!("resource {r:?} holds a NUL character")));
    }
    Ok(Hold {
        partial_id: ctx.partial_id.clone(),
        transaction_id: ctx.transaction_id.clone(),
        // Never trust a far-future deadline from metadata: the reconciler
        // must get to every hold.
        deadline_ms: ctx.deadline_ms.min(now_ms().saturating_add(MAX_HOLD_MS)),
        lines: lines.to_vec(),
        requested,
    })
}

/// The reservation operations of a store, outside phase 2. Implemented by
/// `SledStore` and `PgStore`; each documents its tables.
pub trait Reservations: Store {
    /// Adds `amount` to a resource's available amount (creating it),
    /// durably. A non-positive amount, or one that would take the total
    /// past `i64`, is [`Error::Invalid`].
    fn seed(&self, resource: &str, amount: i64) -> impl Future<Output = Result<Account>> + Send;

    /// A resource's account.
    fn account(&self, resource: &str) -> impl Future<Output = Result<Option<Account>>> + Send;

    /// Every account, by resource.
    fn accounts(&self) -> impl Future<Output = Result<Vec<(String, Account)>>> + Send;

    /// Every current hold, by partial id.
    fn holds(&self) -> impl Future<Output = Result<Vec<Hold>>> + Send;

    /// The holds whose deadline is at or before `cutoff_ms`, by partial id.
    fn overdue(&self, cutoff_ms: i64) -> impl Future<Output = Result<Vec<Hold>>> + Send;

    /// Stores `hold` (made by [`checked_hold`]) in one local transaction,
    /// durably; the store's half of [`hold`](Self::hold).
    fn store_hold(&self, hold: Hold) -> impl Future<Output = Result<bool, HoldError>> + Send;

    /// Releases what `partial` holds (a hold whose publish then failed, or
    /// a leftover after its decision), durably; returns the amount
    /// released. Records no outcome, so a retried try may hold again.
    fn release_now(&self, partial: &str) -> impl Future<Output = Result<i64>> + Send;

    /// The try: reserves every `(resource, amount)` line for the partial
    /// `ctx`, all or none, durably. A retried try for the same partial with
    /// the same lines is a no-op (returns `false`); with other lines it is
    /// refused. A fresh reservation returns `true`. A partial already
    /// decided here is refused ([`HoldError::Decided`]) in the same local
    /// transaction that would have reserved, so a late try holds nothing.
    fn hold(
        &self,
        ctx: &PartialContext,
        lines: &[(String, i64)],
    ) -> impl Future<Output = Result<bool, HoldError>> + Send {
        let checked = checked_hold(ctx, lines);
        async move { self.store_hold(checked?).await }
    }

    /// The whole try for a reserving service: [`hold`](Self::hold) the
    /// lines, then send `publisher`. If the coordinator refuses the append
    /// for good (the transaction is decided, unknown, or not this
    /// service's), a fresh hold is released at once. If the outcome of the
    /// append is unknown (timeout, unavailable), the hold stays: the
    /// transaction's rollback, or the reconciler, settles it.
    fn reserve_and_publish(
        &self,
        ctx: &PartialContext,
        lines: &[(String, i64)],
        publisher: Publisher,
    ) -> impl Future<Output = Result<Published, HoldError>> + Send {
        async move {
            let fresh = self.hold(ctx, lines).await?;
            match publisher.send().await {
                Ok(p) => Ok(p),
                Err(e) if e.is_definitive() => {
                    if fresh {
                        self.release_now(&ctx.partial_id).await?;
                    }
                    Err(HoldError::Publish(e))
                }
                Err(e) => Err(HoldError::Publish(e)),
            }
        }
    }
}

/// What one reconciliation pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Holds past their deadline that were looked at.
    pub overdue: usize,
    /// Commits applied by the reconciler.
    pub committed: usize,
    /// Rollbacks applied by the reconciler.
    pub rolled_back: usize,
    /// Holds left over after their partial's decision, released.
    pub leftovers: usize,
    /// Left for later (still undecided, the coordinator unreachable, or
    /// the store failing).
    pub pending: usize,
}

/// Resolves holds whose transaction's deadline passed without a delivery.
pub struct Reconciler<P: Participant> {
    store: P::Store,
    participant: Arc<P>,
    coordinator: Coordinator,
    grace: Duration,
}

impl<P: Participant> Reconciler<P>
where
    P::Store: Reservations,
{
    /// A reconciler acting on holds older than their deadline plus `grace`.
    pub fn new(store: P::Store, participant: Arc<P>, coordinator: Coordinator, grace: Duration) -> Self {
        Reconciler { store, participant, coordinator, grace }
    }

    /// Runs a pass every `period` until `shutdown`.
    pub async fn run(self, period: Duration, shutdown: CancellationToken) {
        loop {
            match self.reconcile_once().await {
                Ok(r) if r.committed + r.rolled_back > 0 => {
                    tracing::warn!(?r, "reconciler settled holds whose delivery had not arrived")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(cause = %e, "reconciliation pass failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// One pass over the overdue holds. A hold that cannot be settled is
    /// logged and left for the next pass; it does not stop the others.
    pub async fn reconcile_once(&self) -> Result<Reconciled> {
        let cutoff = now_ms().saturating_sub(self.grace.as_millis().min(i64::MAX as u128) as i64);
        let mut report = Reconciled::default();
        for hold in self.store.overdue(cutoff).await? {
            report.overdue += 1;
            // Already decided here: what is left is a leftover; release it.
            let decided = match self.store.phase_of(&hold.partial_id).await {
                Ok(decided) => decided,
                Err(e) => {
                    tracing::warn!(partial = %hold.partial_id, cause = %e, "cannot read an overdue hold's outcome");
                    report.pending += 1;
                    continue;
                }
            };
            if let Some(phase) = decided {
                match self.store.release_now(&hold.partial_id).await {
                    Ok(_) => {
                        tracing::warn!(partial = %hold.partial_id, ?phase, "released a hold left over after its decision");
                        report.leftovers += 1;
                    }
                    Err(e) => {
                        tracing::warn!(partial = %hold.partial_id, cause = %e, "cannot release a leftover hold");
                        report.pending += 1;
                    }
                }
                continue;
            }
            let (phase, commands) = match self.read_topic(&hold.partial_id).await {
                Ok((state, commands)) => match state {
                    TransactionState::Confirming | TransactionState::Confirmed | TransactionState::FailedToConfirm => {
                        (Phase::Committed, commands)
                    }
                    TransactionState::Cancelling | TransactionState::Cancelled | TransactionState::FailedToCancel => {
                        (Phase::RolledBack, commands)
                    }
                    _ => {
                        report.pending += 1;
                        continue;
                    }
                },
                // Never begun (a forged or mistaken partial id, or one that
                // cannot name a partial at all), or collected long after it
                // finished: nothing will ever be delivered.
                Err(Error::Coordinator(s))
                    if matches!(s.code(), tonic::Code::NotFound | tonic::Code::InvalidArgument) =>
                {
                    (Phase::RolledBack, Vec::new())
                }
                Err(e) => {
                    tracing::warn!(partial = %hold.partial_id, cause = %e, "cannot learn the outcome of an overdue hold");
                    report.pending += 1;
                    continue;
                }
            };
            let call = Arc::new(PhaseTwo {
                transaction_id: hold.transaction_id.clone(),
                partial_id: hold.partial_id.clone(),
                commands,
            });
            match apply(&self.store, self.participant.clone(), phase, call).await {
                Ok(_) if phase == Phase::Committed => report.committed += 1,
                Ok(_) => report.rolled_back += 1,
                Err(e) => {
                    tracing::error!(partial = %hold.partial_id, ?phase, cause = %e, "reconciler cannot settle a hold");
                    report.pending += 1;
                }
            }
        }
        Ok(report)
    }

    async fn read_topic(&self, partial: &str) -> Result<(TransactionState, Vec<ReceivedCommand>)> {
        let mut commands = Vec::new();
        let mut from = 1;
        loop {
            let req = v1::ReadRequest { partial_id: partial.to_string(), from_sequence: from, limit: 0 };
            let page = self.coordinator.topics.clone().read(req).await?.into_inner();
            commands.extend(page.commands.into_iter().map(|c| ReceivedCommand {
                sequence: c.sequence,
                type_name: c.r#type,
                key: c.key,
                payload: c.payload,
            }));
            if page.next_sequence == 0 {
                let state = TransactionState::try_from(page.state).unwrap_or(TransactionState::Unspecified);
                return Ok((state, commands));
            }
            from = page.next_sequence;
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
