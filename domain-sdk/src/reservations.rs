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
}

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
}

impl From<HoldError> for tonic::Status {
    fn from(e: HoldError) -> Self {
        match e {
            HoldError::Decided(_) => tonic::Status::failed_precondition(e.to_string()),
            HoldError::Unknown(_) => tonic::Status::not_found(e.to_string()),
            HoldError::Insufficient { .. } => tonic::Status::failed_precondition(e.to_string()),
            HoldError::Invalid(_) => tonic::Status::invalid_argument(e.to_string()),
            HoldError::Store(s) => s.into(),
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
            a.available += amount;
            put_json(accounts, resource.as_bytes(), &a)?;
            Ok(a)
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
    /// `ctx`, all or none, durably. A retried try for the same partial is a
    /// no-op (returns `false`); a fresh reservation returns `true`.
    pub async fn hold(store: &LocalStore, ctx: &PartialContext, lines: &[(String, i64)]) -> Result<bool, HoldError> {
        if lines.is_empty() {
            return Err(HoldError::Invalid("nothing to reserve".into()));
        }
        if let Some((r, a)) = lines.iter().find(|(_, a)| *a <= 0) {
            return Err(HoldError::Invalid(format!("amount for {r:?} must be positive, got {a}")));
        }
        // Business refusals are found inside the transaction, reported after.
        let refusal = std::sync::Mutex::new(None);
        let result = store.transaction(|tx| {
            if tx.phase_of(&ctx.partial_id)?.is_some() {
                *lock(&refusal) = Some(HoldError::Decided(ctx.partial_id.clone()));
                return abort("decided");
            }
            let holds = tx.tree(HOLDS)?;
            if holds.get(ctx.partial_id.as_bytes())?.is_some() {
                return Ok(false);
            }
            let accounts = tx.tree(ACCOUNTS)?;
            for (resource, amount) in lines {
                let Some(mut a) = get_json::<Account>(accounts, resource.as_bytes())? else {
                    *lock(&refusal) = Some(HoldError::Unknown(resource.clone()));
                    return abort("unknown");
                };
                if a.available < *amount {
                    *lock(&refusal) = Some(HoldError::Insufficient {
                        resource: resource.clone(),
                        available: a.available,
                        requested: *amount,
                    });
                    return abort("insufficient");
                }
                a.available -= amount;
                a.held += amount;
                put_json(accounts, resource.as_bytes(), &a)?;
            }
            let hold = Hold {
                partial_id: ctx.partial_id.clone(),
                transaction_id: ctx.transaction_id.clone(),
                deadline_ms: ctx.deadline_ms,
                lines: lines.to_vec(),
            };
            put_json(holds, ctx.partial_id.as_bytes(), &hold)?;
            Ok(true)
        });
        match result {
            Ok(fresh) => {
                store.flush().await?;
                Ok(fresh)
            }
            Err(Error::Refused(reason)) => {
                Err(lock(&refusal).take().unwrap_or(HoldError::Store(Error::Refused(reason))))
            }
            Err(e) => Err(HoldError::Store(e)),
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

    /// One pass over the overdue holds.
    pub async fn reconcile_once(&self) -> Result<Reconciled> {
        let now = now_ms();
        let mut report = Reconciled::default();
        for hold in Reservations::holds(&self.store)? {
            if hold.deadline_ms.saturating_add(self.grace.as_millis() as i64) > now {
                continue;
            }
            report.overdue += 1;
            let (state, commands) = match self.read_topic(&hold.partial_id).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(partial = %hold.partial_id, cause = %e, "cannot learn the outcome of an overdue hold");
                    report.pending += 1;
                    continue;
                }
            };
            let phase = match state {
                TransactionState::Confirming | TransactionState::Confirmed => Phase::Committed,
                TransactionState::Cancelling | TransactionState::Cancelled => Phase::RolledBack,
                _ => {
                    report.pending += 1;
                    continue;
                }
            };
            let call = Arc::new(PhaseTwo {
                transaction_id: hold.transaction_id.clone(),
                partial_id: hold.partial_id.clone(),
                commands,
            });
            apply(&self.store, self.participant.clone(), phase, call).await?;
            match phase {
                Phase::Committed => report.committed += 1,
                Phase::RolledBack => report.rolled_back += 1,
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
        Ok(())
    }
}
