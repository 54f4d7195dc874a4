//! The embedded store: the service's own sled database.
//!
//! [`SledStore`] holds the trees the service names plus three of the SDK's:
//! `tcc.partials` (partial id → `C` or `R`, the guard), `tcc.accounts`
//! (resource → [`Account`] as JSON) and `tcc.holds` (partial id → [`Hold`]
//! as JSON).
//!
//! The guard: one sled transaction over every tree reads the partial's
//! record (same outcome → acknowledge without running anything; the other
//! → refuse), else runs the body and writes the record. sled transactions
//! are serializable, so a try needs no record of its own: it reads the
//! partial's record in the transaction that holds. The transaction is then
//! flushed before the call returns.
//!
//! The body's future runs to completion inside sled's (synchronous)
//! transaction closure, on a blocking thread; sled may run it again when
//! the transaction conflicts.

use std::future::Future;
use std::sync::{Arc, Mutex};

use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};
use sled::{Transactional, Tree};

use crate::error::{Error, Result};
use crate::participant::{Applied, Participant, Phase, PhaseTwo, Store, Tx, TxError, TxResult, abort, run_body};
use crate::reservations::{Account, Hold, HoldError, Reservations, retried_try_differs, seed_overflow};

const PARTIALS: &str = "tcc.partials";
const ACCOUNTS: &str = "tcc.accounts";
const HOLDS: &str = "tcc.holds";
/// The SDK's trees, before the service's.
const OWN: [&str; 3] = [PARTIALS, ACCOUNTS, HOLDS];

/// A service's own sled database: the trees it names plus the SDK's.
#[derive(Clone, Debug)]
pub struct SledStore {
    db: sled::Db,
    names: Arc<Vec<String>>,
    /// The SDK's trees ([`OWN`]), then `names`.
    trees: Arc<Vec<Tree>>,
}

/// A phase-2 transaction on a [`SledStore`]: its trees.
pub type SledTx<'a> = Tx<'a, SledStore>;

/// The trees of a [`SledStore`] inside one transaction.
#[derive(Clone, Copy)]
pub struct SledView<'a> {
    names: &'a [String],
    view: &'a [TransactionalTree],
}

impl From<UnabortableTransactionError> for TxError {
    fn from(e: UnabortableTransactionError) -> Self {
        match e {
            UnabortableTransactionError::Conflict => TxError::Conflict,
            UnabortableTransactionError::Storage(e) => TxError::Store(e.to_string()),
        }
    }
}

impl SledTx<'_> {
    /// The service tree `name` (as passed to [`SledStore::open`]).
    pub fn tree(&self, name: &str) -> TxResult<&TransactionalTree> {
        self.open.tree(name)
    }

    /// The outcome `partial` reached here, if any.
    pub fn phase_of(&self, partial: &str) -> TxResult<Option<Phase>> {
        self.open.phase_of(partial)
    }
}

impl<'a> SledView<'a> {
    fn tree(&self, name: &str) -> TxResult<&'a TransactionalTree> {
        match self.names.iter().position(|n| n == name) {
            Some(i) => Ok(&self.view[i + OWN.len()]),
            None => abort(format!("no tree named {name:?} in this store")),
        }
    }

    fn phase_of(&self, partial: &str) -> TxResult<Option<Phase>> {
        Ok(self.view[0].get(partial.as_bytes())?.and_then(|v| Phase::from_code(&v)))
    }

    fn accounts(&self) -> &TransactionalTree {
        &self.view[1]
    }

    fn holds(&self) -> &TransactionalTree {
        &self.view[2]
    }

    fn mark(&self, partial: &str, phase: Phase) -> TxResult<()> {
        self.view[0].insert(partial.as_bytes(), phase.code().as_bytes())?;
        Ok(())
    }

    fn consume_now(&self, partial: &str, resource: &str, amount: i64) -> TxResult<()> {
        let Some(mut hold) = get_json::<Hold>(self.holds(), partial.as_bytes())? else {
            return abort(format!("partial {partial} holds nothing; cannot use {amount} of {resource:?}"));
        };
        let Some(line) = hold.lines.iter_mut().find(|(r, a)| r == resource && *a >= amount) else {
            return abort(format!("partial {partial} does not hold {amount} of {resource:?}"));
        };
        line.1 -= amount;
        let mut a: Account = get_json(self.accounts(), resource.as_bytes())?.unwrap_or_default();
        a.held -= amount;
        a.used += amount;
        put_json(self.accounts(), resource.as_bytes(), &a)?;
        hold.lines.retain(|(_, a)| *a > 0);
        if hold.lines.is_empty() {
            self.holds().remove(partial.as_bytes())?;
        } else {
            put_json(self.holds(), partial.as_bytes(), &hold)?;
        }
        Ok(())
    }

    fn release_now(&self, partial: &str) -> TxResult<i64> {
        let Some(hold) = get_json::<Hold>(self.holds(), partial.as_bytes())? else { return Ok(0) };
        let mut total = 0;
        for (resource, amount) in &hold.lines {
            let mut a: Account = get_json(self.accounts(), resource.as_bytes())?.unwrap_or_default();
            a.held -= amount;
            a.available += amount;
            put_json(self.accounts(), resource.as_bytes(), &a)?;
            total += amount;
        }
        self.holds().remove(partial.as_bytes())?;
        Ok(total)
    }
}

impl SledStore {
    /// Opens (or creates) the database at `path` with the service's trees.
    /// sled's own periodic flush is off: every write the SDK acknowledges
    /// is flushed explicitly ([`SledStore::flush`]), and sled 0.34's
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
    /// [`SledStore::open`] does.
    pub fn from_db(db: sled::Db, trees: &[&str]) -> Result<Self> {
        let mut opened = Vec::with_capacity(OWN.len() + trees.len());
        for t in OWN {
            opened.push(db.open_tree(t)?);
        }
        for t in trees {
            if t.starts_with("tcc.") {
                return Err(Error::Invalid(format!("tree name {t:?} is reserved: names starting tcc. are the SDK's")));
            }
            opened.push(db.open_tree(t)?);
        }
        Ok(SledStore { db, names: Arc::new(trees.iter().map(|s| s.to_string()).collect()), trees: Arc::new(opened) })
    }

    /// A service tree, for reads outside transactions.
    pub fn tree(&self, name: &str) -> Result<&Tree> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| &self.trees[i + OWN.len()])
            .ok_or_else(|| Error::Invalid(format!("no tree named {name:?} in this store")))
    }

    /// Runs `f` as one atomic sled transaction over every tree (not yet
    /// durable: call [`flush`](Self::flush) before acknowledging).
    pub fn transaction<R>(&self, f: impl Fn(&SledTx<'_>) -> TxResult<R>) -> Result<R> {
        let result = self.trees.as_slice().transaction(|view| {
            f(&Tx { open: SledView { names: &self.names, view } }).map_err(|e| match e {
                TxError::Conflict => ConflictableTransactionError::Conflict,
                other => ConflictableTransactionError::Abort(other),
            })
        });
        match result {
            Ok(r) => Ok(r),
            Err(TransactionError::Abort(e)) => Err(e.into()),
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

    /// Runs `f` on a blocking thread, then flushes: a write, durable when
    /// this returns.
    async fn write<R: Send + 'static>(&self, f: impl FnOnce(&SledStore) -> Result<R> + Send + 'static) -> Result<R> {
        let store = self.clone();
        let r = tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Error::Store(format!("store task failed: {e}")))??;
        self.flush().await?;
        Ok(r)
    }

    /// The guard and the body, in one sled transaction (see the module
    /// docs); not yet durable.
    fn apply_here<P: Participant<Store = Self>>(
        &self,
        participant: &P,
        phase: Phase,
        call: &PhaseTwo,
    ) -> Result<Applied> {
        self.transaction(|tx| match tx.phase_of(&call.partial_id)? {
            Some(done) if done == phase => Ok(Applied::Already),
            Some(done) => abort(done.refusal(&call.partial_id, phase)),
            None => {
                // sled hands the closure a shared view; the participant API
                // takes the transaction by `&mut`, as PostgreSQL needs.
                let mut body_tx = Tx { open: tx.open };
                futures::executor::block_on(run_body(participant, &mut body_tx, phase, call))?;
                tx.open.mark(&call.partial_id, phase)?;
                Ok(Applied::Now)
            }
        })
    }

    fn read_json<T: serde::de::DeserializeOwned>(&self, tree: usize, key: &[u8]) -> Result<Option<T>> {
        match self.trees[tree].get(key)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    fn all_holds(&self) -> Result<Vec<Hold>> {
        let mut out = Vec::new();
        for item in self.trees[2].iter() {
            let (_, v) = item?;
            out.push(serde_json::from_slice(&v)?);
        }
        Ok(out)
    }

    fn hold_here(&self, hold: &Hold) -> Result<bool, HoldError> {
        // Business refusals are found inside the transaction and reported
        // after it; reset on every run, since sled may run the closure again.
        let refusal = Mutex::new(None);
        let refuse = |e: HoldError| -> TxResult<bool> {
            *lock(&refusal) = Some(e);
            abort("refused")
        };
        let result = self.transaction(|tx| {
            *lock(&refusal) = None;
            if tx.open.phase_of(&hold.partial_id)?.is_some() {
                return refuse(HoldError::Decided(hold.partial_id.clone()));
            }
            if let Some(existing) = get_json::<Hold>(tx.open.holds(), hold.partial_id.as_bytes())? {
                if existing.requested == hold.requested {
                    return Ok(false);
                }
                return refuse(retried_try_differs(&hold.partial_id, &existing.requested));
            }
            for (resource, amount) in &hold.lines {
                let Some(mut a) = get_json::<Account>(tx.open.accounts(), resource.as_bytes())? else {
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
                put_json(tx.open.accounts(), resource.as_bytes(), &a)?;
            }
            put_json(tx.open.holds(), hold.partial_id.as_bytes(), hold)?;
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
}

impl Store for SledStore {
    type Open<'a> = SledView<'a>;

    fn apply<P: Participant<Store = Self>>(
        &self,
        participant: Arc<P>,
        phase: Phase,
        call: Arc<PhaseTwo>,
    ) -> impl Future<Output = Result<Applied>> + Send {
        // Flushed also for a redelivery: the first delivery may still be
        // waiting for its own flush.
        self.write(move |store| store.apply_here(participant.as_ref(), phase, &call))
    }

    fn phase_of(&self, partial: &str) -> impl Future<Output = Result<Option<Phase>>> + Send {
        let found = self.trees[0].get(partial.as_bytes()).map_err(Error::from);
        std::future::ready(found.map(|v| v.and_then(|v| Phase::from_code(&v))))
    }

    fn consume(tx: &mut SledTx<'_>, partial: &str, resource: &str, amount: i64) -> impl Future<Output = TxResult<()>> {
        std::future::ready(tx.open.consume_now(partial, resource, amount))
    }

    fn release(tx: &mut SledTx<'_>, partial: &str) -> impl Future<Output = TxResult<i64>> {
        std::future::ready(tx.open.release_now(partial))
    }
}

impl Reservations for SledStore {
    async fn seed(&self, resource: &str, amount: i64) -> Result<Account> {
        crate::reservations::check_seed(resource, amount)?;
        let account = self.transaction(|tx| {
            let mut a: Account = get_json(tx.open.accounts(), resource.as_bytes())?.unwrap_or_default();
            match (a.available.checked_add(amount), a.total().checked_add(amount)) {
                (Some(v), Some(_)) => a.available = v,
                _ => return abort(seed_overflow(resource, amount)),
            }
            put_json(tx.open.accounts(), resource.as_bytes(), &a)?;
            Ok(a)
        });
        let account = account.map_err(|e| match e {
            Error::Refused(m) => Error::Invalid(m),
            other => other,
        })?;
        self.flush().await?;
        Ok(account)
    }

    fn account(&self, resource: &str) -> impl Future<Output = Result<Option<Account>>> + Send {
        std::future::ready(self.read_json(1, resource.as_bytes()))
    }

    fn accounts(&self) -> impl Future<Output = Result<Vec<(String, Account)>>> + Send {
        let all = || -> Result<Vec<(String, Account)>> {
            let mut out = Vec::new();
            for item in self.trees[1].iter() {
                let (k, v) = item?;
                out.push((String::from_utf8_lossy(&k).into_owned(), serde_json::from_slice(&v)?));
            }
            Ok(out)
        };
        std::future::ready(all())
    }

    fn holds(&self) -> impl Future<Output = Result<Vec<Hold>>> + Send {
        std::future::ready(self.all_holds())
    }

    fn overdue(&self, cutoff_ms: i64) -> impl Future<Output = Result<Vec<Hold>>> + Send {
        std::future::ready(self.all_holds().map(|h| h.into_iter().filter(|h| h.deadline_ms <= cutoff_ms).collect()))
    }

    async fn store_hold(&self, hold: Hold) -> Result<bool, HoldError> {
        let local = self.clone();
        let fresh = tokio::task::spawn_blocking(move || local.hold_here(&hold))
            .await
            .map_err(|e| HoldError::Store(Error::Store(format!("hold task failed: {e}"))))??;
        // Also for a retried try: the first may still wait for its flush,
        // and its publish must not go out before the hold is durable.
        self.flush().await?;
        Ok(fresh)
    }

    fn release_now(&self, partial: &str) -> impl Future<Output = Result<i64>> + Send {
        let partial = partial.to_string();
        self.write(move |store| store.transaction(|tx| tx.open.release_now(&partial)))
    }
}

fn get_json<T: serde::de::DeserializeOwned>(tree: &TransactionalTree, key: &[u8]) -> TxResult<Option<T>> {
    match tree.get(key)? {
        Some(v) => match serde_json::from_slice(&v) {
            Ok(t) => Ok(Some(t)),
            Err(e) => abort(format!("corrupt record {:?}: {e}", String::from_utf8_lossy(key))),
        },
        None => Ok(None),
    }
}

fn put_json<T: serde::Serialize>(tree: &TransactionalTree, key: &[u8], value: &T) -> TxResult<()> {
    tree.insert(key, serde_json::to_vec(value)?)?;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
