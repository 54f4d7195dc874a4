//! Reserve in try, settle in phase 2.
//!
//! Credit, stock, seats: anything a try must hold so that commit cannot fail.
//! Each resource has an [`Account`] of `available`, `held` and `used`
//! amounts whose sum only changes when the resource is seeded:
//!
//! * try: [`Reservations::hold`] moves amounts from `available` to `held`
//!   under the partial id (all lines or none), refusing if the partial was
//!   already decided here, so a late try reserves nothing;
//! * commit: [`Reservations::consume`] moves a held amount to `used`;
//! * rollback: [`Reservations::release`] moves what the partial still holds
//!   back to `available`.
//!
//! A hold records its transaction's deadline. The [`Reconciler`] finds holds
//! past their deadline (plus a grace period), asks the coordinator for the
//! outcome (by reading the partial topic), and applies it through the same
//! exactly-once path as the coordinator's own call, so a lost delivery can
//! never leak a hold forever.
//!
//! Services using this open their [`LocalStore`] with [`TREES`] among their
//! trees.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tcc_proto::v1::{self, TransactionState};
use tokio_util::sync::CancellationToken;

use crate::composite::Coordinator;
use crate::error::{Error, Result};
use crate::participant::{LocalStore, Participant, Phase, PhaseTwo, ReceivedCommand, Tx, TxResult, abort, apply};
use crate::propagation::PartialContext;
use crate::publisher::{Published, Publisher};

/// Tree of accounts: resource → [`Account`].
pub const ACCOUNTS: &str = "tcc.accounts";
/// Tree of holds: partial id → [`Hold`].
pub const HOLDS: &str = "tcc.holds";
/// The trees to open a [`LocalStore`] with.
pub const TREES: [&str; 2] = [ACCOUNTS, HOLDS];

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
    /// A bad request (non-positive amount, no lines).
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

fn get_json<T: serde::de::DeserializeOwned>(
    tree: &sled::transaction::TransactionalTree,
    key: &[u8],
) -> TxResult<Option<T>> {
    match tree.get(key)? {
        Some(v) => match serde_json::from_slice(&v) {
            Ok(t) => Ok(Some(t)),
            Err(e) => abort(format!("corrupt record {:?}: {e}", String::from_utf8_lossy(key))),
        },
        None => Ok(None),
    }
}

fn put_json<T: Serialize>(tree: &sled::transaction::TransactionalTree, key: &[u8], value: &T) -> TxResult<()> {
    match serde_json::to_vec(value) {
        Ok(v) => {
            tree.insert(key, v)?;
            Ok(())
        }
        Err(e) => abort(format!("cannot encode record: {e}")),
    }
}

/// The reservation operations. Stateless; the data lives in the store.
pub struct Reservations;

impl Reservations {
    /// Adds `amount` to a resource's available amount (creating it), durably.
    pub async fn seed(store: &LocalStore, resource: &str, amount: i64) -> Result<Account> {
        let account = store.transaction(|tx| {
            let accounts = tx.tree(ACCOUNTS)?;
            let mut a: Account = get_json(accounts, resource.as_bytes())?.unwrap_or_default();
            match (a.available.checked_add(amount), a.total().checked_add(amount)) {
                (Some(v), Some(_)) if amount > 0 => a.available = v,
                _ => {
                    return abort(format!(
                        "cannot add {amount} to {resource:?}: must be positive and keep the total in range"
                    ));
                }
            }
            put_json(accounts, resource.as_bytes(), &a)?;
            Ok(a)
        });
        let account = account.map_err(|e| match e {
            Error::Refused(m) => Error::Invalid(m),
            other => other,
        })?;
        store.flush().await?;
        Ok(account)
    }

    /// A resource's account.
    pub fn account(store: &LocalStore, resource: &str) -> Result<Option<Account>> {
        match store.tree(ACCOUNTS)?.get(resource.as_bytes())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Every account, by resource.
    pub fn accounts(store: &LocalStore) -> Result<Vec<(String, Account)>> {
        let mut out = Vec::new();
        for item in store.tree(ACCOUNTS)?.iter() {
            let (k, v) = item?;
            out.push((String::from_utf8_lossy(&k).into_owned(), serde_json::from_slice(&v)?));
        }
        Ok(out)
    }

    /// Every current hold.
    pub fn holds(store: &LocalStore) -> Result<Vec<Hold>> {
        let mut out = Vec::new();
        for item in store.tree(HOLDS)?.iter() {
            let (_, v) = item?;
            out.push(serde_json::from_slice(&v)?);
        }
        Ok(out)
    }

    /// The try: reserves every `(resource, amount)` line for the partial
    /// `ctx`, all or none, durably. A retried try for the same partial with
    /// the same lines is a no-op (returns `false`); with other lines it is
    /// refused. A fresh reservation returns `true`.
    pub async fn hold(store: &LocalStore, ctx: &PartialContext, lines: &[(String, i64)]) -> Result<bool, HoldError> {
        if lines.is_empty() {
            return Err(HoldError::Invalid("nothing to reserve".into()));
        }
        if let Some((r, a)) = lines.iter().find(|(_, a)| *a <= 0) {
            return Err(HoldError::Invalid(format!("amount for {r:?} must be positive, got {a}")));
        }
        let mut requested = lines.to_vec();
        requested.sort();
        let hold = Hold {
            partial_id: ctx.partial_id.clone(),
            transaction_id: ctx.transaction_id.clone(),
            // Never trust a far-future deadline from metadata: the
            // reconciler must get to every hold.
            deadline_ms: ctx.deadline_ms.min(now_ms().saturating_add(MAX_HOLD_MS)),
            lines: lines.to_vec(),
            requested,
        };
        let local = store.clone();
        let result = tokio::task::spawn_blocking(move || Self::hold_in_transaction(&local, hold))
            .await
            .map_err(|e| HoldError::Store(Error::Store(format!("hold task failed: {e}"))))?;
        let fresh = result?;
        if fresh {
            store.flush().await?;
        }
        Ok(fresh)
    }

    fn hold_in_transaction(store: &LocalStore, hold: Hold) -> Result<bool, HoldError> {
        // Business refusals are found inside the transaction and reported
        // after it; reset on every run, since sled may run the closure again.
        let refusal = std::sync::Mutex::new(None);
        let refuse = |e: HoldError| -> TxResult<bool> {
            *lock(&refusal) = Some(e);
            abort("refused")
        };
        let result = store.transaction(|tx| {
            *lock(&refusal) = None;
            if tx.phase_of(&hold.partial_id)?.is_some() {
                return refuse(HoldError::Decided(hold.partial_id.clone()));
            }
            let holds = tx.tree(HOLDS)?;
            if let Some(existing) = get_json::<Hold>(holds, hold.partial_id.as_bytes())? {
                if existing.requested == hold.requested {
                    return Ok(false);
                }
                return refuse(HoldError::Invalid(format!(
                    "partial {} already reserved {:?}; a retried try must ask the same",
                    hold.partial_id, existing.requested
                )));
            }
            let accounts = tx.tree(ACCOUNTS)?;
            for (resource, amount) in &hold.lines {
                let Some(mut a) = get_json::<Account>(accounts, resource.as_bytes())? else {
                    return refuse(HoldError::Unknown(resource.clone()));
                };
                if a.available < *amount {
                    return refuse(HoldError::Insufficient {
                        resource: resource.clone(),
                        available: a.available,
                        requested: *amount,
                    });
                }
                a.available -= amount;
                a.held += amount;
                put_json(accounts, resource.as_bytes(), &a)?;
            }
            put_json(holds, hold.partial_id.as_bytes(), &hold)?;
            Ok(true)
        });
        match result {
            Ok(fresh) => Ok(fresh),
            Err(Error::Refused(reason)) => {
                Err(lock(&refusal).take().unwrap_or(HoldError::Store(Error::Refused(reason))))
            }
            Err(e) => Err(HoldError::Store(e)),
        }
    }

    /// The whole try for a reserving service: [`hold`](Self::hold) the
    /// lines, then send `publisher`. If the coordinator refuses the append
    /// for good (the transaction is decided, unknown, or not this
    /// service's), a fresh hold is released at once. If the outcome of the
    /// append is unknown (timeout, unavailable), the hold stays: the
    /// transaction's rollback, or the reconciler, settles it.
    pub async fn reserve_and_publish(
        store: &LocalStore,
        ctx: &PartialContext,
        lines: &[(String, i64)],
        publisher: Publisher,
    ) -> Result<Published, HoldError> {
        let fresh = Self::hold(store, ctx, lines).await?;
        match publisher.send().await {
            Ok(p) => Ok(p),
            Err(e) if e.is_definitive() => {
                if fresh {
                    Self::release_now(store, &ctx.partial_id).await?;
                }
                Err(HoldError::Publish(e))
            }
            Err(e) => Err(HoldError::Publish(e)),
        }
    }

    /// Releases a hold taken by [`hold`](Self::hold) whose publish then
    /// failed (e.g. the transaction was already decided). Durable.
    pub async fn release_now(store: &LocalStore, partial: &str) -> Result<()> {
        store.transaction(|tx| Self::release(tx, partial).map(|_| ()))?;
        store.flush().await
    }

    /// In a commit: moves `amount` of `resource` held by `partial` to used.
    /// Aborts if the partial holds less (the try did not reserve it).
    pub fn consume(tx: &Tx<'_>, partial: &str, resource: &str, amount: i64) -> TxResult<()> {
        let holds = tx.tree(HOLDS)?;
        let Some(mut hold) = get_json::<Hold>(holds, partial.as_bytes())? else {
            return abort(format!("partial {partial} holds nothing; cannot use {amount} of {resource:?}"));
        };
        let Some(line) = hold.lines.iter_mut().find(|(r, a)| r == resource && *a >= amount) else {
            return abort(format!("partial {partial} does not hold {amount} of {resource:?}"));
        };
        line.1 -= amount;
        let accounts = tx.tree(ACCOUNTS)?;
        let mut a: Account = get_json(accounts, resource.as_bytes())?.unwrap_or_default();
        a.held -= amount;
        a.used += amount;
        put_json(accounts, resource.as_bytes(), &a)?;
        hold.lines.retain(|(_, a)| *a > 0);
        if hold.lines.is_empty() {
            holds.remove(partial.as_bytes())?;
        } else {
            put_json(holds, partial.as_bytes(), &hold)?;
        }
        Ok(())
    }

    /// In a rollback (or after a commit, for leftovers): returns everything
    /// `partial` still holds to available. Returns the amount released.
    pub fn release(tx: &Tx<'_>, partial: &str) -> TxResult<i64> {
        let holds = tx.tree(HOLDS)?;
        let Some(hold) = get_json::<Hold>(holds, partial.as_bytes())? else { return Ok(0) };
        let accounts = tx.tree(ACCOUNTS)?;
        let mut total = 0;
        for (resource, amount) in &hold.lines {
            let mut a: Account = get_json(accounts, resource.as_bytes())?.unwrap_or_default();
            a.held -= amount;
            a.available += amount;
            put_json(accounts, resource.as_bytes(), &a)?;
            total += amount;
        }
        holds.remove(partial.as_bytes())?;
        Ok(total)
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    /// Left for later (still undecided, or the coordinator unreachable).
    pub pending: usize,
}

/// Resolves holds whose transaction's deadline passed without a delivery.
pub struct Reconciler<P> {
    store: LocalStore,
    participant: Arc<P>,
    coordinator: Coordinator,
    grace: Duration,
}

impl<P: Participant> Reconciler<P> {
    /// A reconciler acting on holds older than their deadline plus `grace`.
    pub fn new(store: LocalStore, participant: Arc<P>, coordinator: Coordinator, grace: Duration) -> Self {
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
        let now = now_ms();
        let mut report = Reconciled::default();
        for hold in Reservations::holds(&self.store)? {
            if hold.deadline_ms.saturating_add(self.grace.as_millis() as i64) > now {
                continue;
            }
            report.overdue += 1;
            // Already decided here: what is left is a leftover; release it.
            if let Some(phase) = self.store.phase_of(&hold.partial_id)? {
                let partial = hold.partial_id.clone();
                self.store.transaction(|tx| Reservations::release(tx, &partial))?;
                self.store.flush().await?;
                tracing::warn!(partial = %hold.partial_id, ?phase, "released a hold left over after its decision");
                report.rolled_back += 1;
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
                // Never begun (a forged or mistaken partial id), or collected
                // long after it finished: nothing will ever be delivered.
                Err(Error::Coordinator(s)) if s.code() == tonic::Code::NotFound => (Phase::RolledBack, Vec::new()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(p: &str) -> PartialContext {
        PartialContext { partial_id: p.into(), transaction_id: "t".into(), deadline_ms: 0 }
    }

    struct Settle;
    impl Participant for Settle {
        fn commit(&self, tx: &Tx<'_>, call: &PhaseTwo) -> TxResult<()> {
            Reservations::consume(tx, &call.partial_id, "bob", 30)
        }
        fn rollback(&self, tx: &Tx<'_>, call: &PhaseTwo) -> TxResult<()> {
            Reservations::release(tx, &call.partial_id).map(|_| ())
        }
    }

    fn call(p: &str) -> Arc<PhaseTwo> {
        Arc::new(PhaseTwo { transaction_id: "t".into(), partial_id: p.into(), commands: vec![] })
    }

    #[tokio::test]
    async fn hold_consume_release_keep_the_total() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Store(e.to_string()))?;
        let store = LocalStore::open(dir.path(), &TREES)?;
        Reservations::seed(&store, "bob", 100).await?;
        let line = vec![("bob".to_string(), 30)];
        assert!(Reservations::hold(&store, &ctx("p1"), &line).await.map_err(|e| Error::Store(e.to_string()))?);
        assert!(
            !Reservations::hold(&store, &ctx("p1"), &line).await.map_err(|e| Error::Store(e.to_string()))?,
            "retried try is a no-op"
        );
        Reservations::hold(&store, &ctx("p2"), &line).await.map_err(|e| Error::Store(e.to_string()))?;
        let a = Reservations::account(&store, "bob")?.unwrap_or_default();
        assert_eq!((a.available, a.held, a.used, a.total()), (40, 60, 0, 100));
        apply(&store, Arc::new(Settle), Phase::Committed, call("p1")).await?;
        apply(&store, Arc::new(Settle), Phase::RolledBack, call("p2")).await?;
        let a = Reservations::account(&store, "bob")?.unwrap_or_default();
        assert_eq!((a.available, a.held, a.used, a.total()), (70, 0, 30, 100));
        assert!(Reservations::holds(&store)?.is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn refusals_reserve_nothing() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Store(e.to_string()))?;
        let store = LocalStore::open(dir.path(), &TREES)?;
        Reservations::seed(&store, "bob", 10).await?;
        Reservations::seed(&store, "amy", 10).await?;
        let two = vec![("amy".to_string(), 5), ("bob".to_string(), 11)];
        assert!(matches!(Reservations::hold(&store, &ctx("p"), &two).await, Err(HoldError::Insufficient { .. })));
        assert_eq!(Reservations::account(&store, "amy")?.map(|a| a.available), Some(10), "all or nothing");
        let unknown = vec![("zed".to_string(), 1)];
        assert!(matches!(Reservations::hold(&store, &ctx("p"), &unknown).await, Err(HoldError::Unknown(_))));
        // A rollback that arrived first makes a late try refusable.
        apply(&store, Arc::new(Settle), Phase::RolledBack, call("late")).await?;
        let one = vec![("bob".to_string(), 1)];
        assert!(matches!(Reservations::hold(&store, &ctx("late"), &one).await, Err(HoldError::Decided(_))));
        assert_eq!(Reservations::account(&store, "bob")?.map(|a| (a.available, a.held)), Some((10, 0)));
        assert!(matches!(
            Reservations::hold(&store, &ctx("q"), &[("bob".to_string(), 0)]).await,
            Err(HoldError::Invalid(_))
        ));
        // A retried try must ask the same; a different ask is refused.
        Reservations::hold(&store, &ctx("r"), &[("bob".to_string(), 2)])
            .await
            .map_err(|e| Error::Store(e.to_string()))?;
        let other = Reservations::hold(&store, &ctx("r"), &[("bob".to_string(), 3)]).await;
        assert!(matches!(other, Err(HoldError::Invalid(_))), "{other:?}");
        assert_eq!(Reservations::account(&store, "bob")?.map(|a| a.held), Some(2));
        // Seeding past i64 is refused, not wrapped.
        assert!(matches!(Reservations::seed(&store, "bob", i64::MAX).await, Err(Error::Invalid(_))));
        // A far-future deadline from metadata is capped.
        let far = PartialContext { partial_id: "far".into(), transaction_id: "t".into(), deadline_ms: i64::MAX };
        Reservations::hold(&store, &far, &[("amy".to_string(), 1)]).await.map_err(|e| Error::Store(e.to_string()))?;
        let h = Reservations::holds(&store)?.into_iter().find(|h| h.partial_id == "far").map(|h| h.deadline_ms);
        assert!(h.is_some_and(|d| d <= now_ms() + MAX_HOLD_MS), "{h:?}");
        Ok(())
    }
}
