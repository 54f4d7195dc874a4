//! The transaction engine: moves composite transactions through the state
//! machine of [`crate::model::machine`], persisting each change through the
//! [`Store`] before anyone is told about it.
//!
//! ## Writes: conditional, reloaded on conflict
//! Every change is computed with [`apply`] from the
//! record as last read, and written as the next version of that record
//! (the store refuses it if the stored version moved on: see
//! [`crate::store`]). On [`Error::Conflict`] the engine reloads the record
//! from the store and decides again on what it finds (the move may now be
//! a no-op, or illegal: a confirm that lost to a cancel reports the
//! cancel); it never overwrites. After [`CONFLICT_RETRIES`] conflicts in a
//! row the caller gets the conflict (ABORTED, safe to retry).
//!
//! ## Memory: only what is in use
//! A transaction sits in memory only while an operation or a waiter holds
//! it (`Held`): behind its own async mutex, which serialises this
//! engine's operations on it (an append and a confirm cannot interleave
//! here, so this engine never conflicts with itself), with a watch for
//! waiters. The first operation loads it from the store, the last one to
//! let go drops it, so what an operation starts from is what the store
//! holds, memory stays bounded by the work in flight, and recovery loads
//! nothing: the sweeper and delivery ask the store for what is due. What
//! is in memory is always durable already.
//!
//! ## Deadlines
//! An ACTIVE transaction past its deadline is cancelled by the sweeper
//! ([`sweeper`]), and also by the first client event that finds it expired,
//! so a confirm or append that races the deadline never wins after it.
//!
//! ## Side effects
//! The engine performs no network I/O. When a transaction enters
//! CONFIRMING/CANCELLING (a decision, an admin retry, or a reload that finds
//! one) its id is sent on the channel returned by [`Engine::new`]; the
//! phase-2 driver ([`crate::delivery`]) takes it from there and reports
//! progress back with [`Engine::record_phase2`].
//!
//! The operations live in [`lifecycle`] (begin, enlist, decisions, phase-2
//! progress), [`topics`] (appends and reads), [`query`] (get, wait, list)
//! and [`sweeper`] (deadlines, overdue deliveries, GC).

pub mod lifecycle;
pub mod query;
pub mod sweeper;
pub mod topics;
pub mod validate;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tracing::{error, info};

use crate::clock::{Clock, Entropy};
use crate::config::Limits;
use crate::error::{Error, Result};
use crate::lock;
use crate::model::{Event, Outcome, Phase2Status, TxnId, TxnRecord, TxnState, apply};
use crate::store::{AppendBatch, Store};

/// Most partial ids the engine remembers the transaction of.
pub const PARTIALS_CACHED: usize = 65_536;

/// Conflicts in a row one operation absorbs (reload and decide again)
/// before it reports the conflict to its caller.
pub const CONFLICT_RETRIES: usize = 16;

/// One transaction this engine has in memory.
struct Live {
    /// The record as last written or read; in memory only what is durable.
    record: tokio::sync::Mutex<TxnRecord>,
    /// Its state, for callers that wait for an outcome.
    state: watch::Sender<TxnState>,
    /// How many [`Held`]s there are. Changed only under the lock of the
    /// engine's map, so that the last holder's check-and-remove cannot
    /// race a new holder (an `Arc` count could: it drops after the lock).
    holders: AtomicUsize,
    /// The version of the record this engine last wrote or claimed, with
    /// the store's node id at the time (`None`: not yet). A cluster store
    /// makes the writer the owner, so while the record is at that version
    /// and the node id has not changed (a lapsed lease changes it), this
    /// engine owns it: delivery need not claim it, and waiters need not
    /// poll the store eagerly.
    owned: Mutex<Option<(u64, Option<uuid::Uuid>)>>,
}

/// Counts of what recovery found.
#[derive(Clone, Copy, Debug, Default)]
pub struct Recovered {
    /// ACTIVE transactions (the sweeper keeps their deadlines).
    pub active: usize,
    /// CONFIRMING/CANCELLING transactions (delivery resumed).
    pub delivering: usize,
    /// FAILED_TO_* transactions (waiting for an operator).
    pub failed: usize,
}

/// How a change is written.
enum How<'a> {
    /// The record only, plus the index entry of an enlisted participant.
    Update(Option<crate::model::PartialId>),
    /// The record with a batch of commands.
    Append(AppendBatch<'a>),
}

/// The transaction engine. See the module docs.
pub struct Engine {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    entropy: Arc<dyn Entropy>,
    limits: Limits,
    retention_ms: i64,
    live: Mutex<HashMap<TxnId, Arc<Live>>>,
    /// Partial id -> transaction id, for appends (see `topics::txn_of`):
    /// filled at begin, enlist and lookup; emptied when it reaches
    /// [`PARTIALS_CACHED`] entries.
    partials: Mutex<HashMap<crate::model::PartialId, TxnId>>,
    /// Wakes the sweeper when a transaction begins whose deadline is before
    /// the sweeper's next pass.
    pub(crate) schedule_changed: Notify,
    /// When the sweeper's next pass is due (unix ms; 0 = now, i64::MAX =
    /// not planned). A begin with an earlier deadline wakes it; others do
    /// not, so a busy coordinator does not sweep once per begin.
    pub(crate) next_sweep_ms: AtomicI64,
    to_deliver: mpsc::UnboundedSender<TxnId>,
    /// Cancelled at shutdown: every waiting Confirm/Cancel answers with the
    /// state reached so far, so shutdown is not held up by waits.
    stopping: tokio_util::sync::CancellationToken,
    /// Every record this engine writes or reloads, for [`Engine::watch`]
    /// (sent only while someone watches).
    changes: tokio::sync::broadcast::Sender<Arc<TxnRecord>>,
}

/// How many changes a slow watcher may fall behind before it misses some.
pub const WATCH_BACKLOG: usize = 4096;

/// Where a transaction is.
enum Found<'a> {
    /// In memory, lockable, held until dropped.
    Live(Held<'a>),
    /// Finished: never changes again.
    Finished(TxnRecord),
}

/// A transaction held in memory by one operation or waiter; the last
/// holder to drop it removes it from memory.
struct Held<'a> {
    engine: &'a Engine,
    live: Arc<Live>,
    id: TxnId,
}

impl std::ops::Deref for Held<'_> {
    type Target = Live;
    fn deref(&self) -> &Live {
        &self.live
    }
}

impl<'a> Held<'a> {
    /// A new holder of `live`; call with the map's lock held.
    fn new(engine: &'a Engine, live: Arc<Live>, id: TxnId) -> Self {
        live.holders.fetch_add(1, Ordering::SeqCst);
        Held { engine, live, id }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut live = lock(&self.engine.live);
        let left = self.live.holders.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        if left == 0
            && let Some(entry) = live.get(&self.id)
            && Arc::ptr_eq(entry, &self.live)
        {
            live.remove(&self.id);
        }
    }
}

/// Runs `$attempt` (an expression evaluated anew each time) until it does
/// not conflict, reloading the record in `$guard` after each conflict.
macro_rules! until_no_conflict {
    ($engine:expr, $live:expr, $guard:expr, $attempt:expr) => {{
        let mut conflicts = 0;
        loop {
            match $attempt {
                Err($crate::error::Error::Conflict { txn, expected, found })
                    if conflicts < $crate::engine::CONFLICT_RETRIES =>
                {
                    conflicts += 1;
                    tracing::debug!(%txn, expected, found, conflicts, "write conflict; reloading");
                    $engine.reload($live, &mut $guard).await?;
                }
                other => break other,
            }
        }
    }};
}
pub(crate) use until_no_conflict;

impl Engine {
    /// Creates an engine; the receiver yields transactions that need phase-2
    /// delivery.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        entropy: Arc<dyn Entropy>,
        limits: Limits,
        retention: Duration,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<TxnId>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let engine = Engine {
            store,
            clock,
            entropy,
            limits,
            retention_ms: retention.as_millis().min(i64::MAX as u128) as i64,
            live: Mutex::default(),
            partials: Mutex::default(),
            schedule_changed: Notify::new(),
            next_sweep_ms: AtomicI64::new(0),
            to_deliver: tx,
            stopping: tokio_util::sync::CancellationToken::new(),
            changes: tokio::sync::broadcast::channel(WATCH_BACKLOG).0,
        };
        (Arc::new(engine), rx)
    }

    /// Every transaction record written (or re-read after another writer's
    /// change) from now on, in the order written. A receiver more than
    /// [`WATCH_BACKLOG`] changes behind skips ahead (`Lagged`). Records
    /// written by other coordinators of a cluster are not seen.
    pub fn watch(&self) -> tokio::sync::broadcast::Receiver<Arc<TxnRecord>> {
        self.changes.subscribe()
    }

    /// Resolves once shutdown has begun (see [`Engine::release_waiters`]).
    pub async fn stopping(&self) {
        self.stopping.cancelled().await
    }

    /// Sends `txn` to the watchers, if any.
    fn announce(&self, txn: &TxnRecord) {
        if self.changes.receiver_count() > 0 {
            let _ = self.changes.send(Arc::new(txn.clone()));
        }
    }

    /// Shutdown has begun: every Confirm/Cancel waiting for an outcome
    /// answers now with the state reached so far (the outcome is still
    /// driven to its end, after a restart if need be), and later ones do
    /// not wait.
    pub fn release_waiters(&self) {
        self.stopping.cancel();
    }

    /// The current time of the engine's clock.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// How many transactions this engine holds in memory (those with an
    /// operation or a waiter in flight).
    pub fn cached(&self) -> usize {
        lock(&self.live).len()
    }

    /// Finds what there is to resume in the store: queues every
    /// CONFIRMING/CANCELLING transaction for delivery and counts the rest.
    /// ACTIVE deadlines need nothing (the sweeper asks the store). Run
    /// once, before serving.
    pub async fn recover(&self) -> Result<Recovered> {
        let mut counts = Recovered::default();
        let mut after = None;
        loop {
            let ids = self.store.unfinished(after, 512).await?;
            let Some(last) = ids.last() else { break };
            after = Some(*last);
            for id in ids {
                crate::failpoint::crash_point("during-recovery");
                let Some(txn) = self.store.get_txn(id).await? else { continue };
                match txn.state {
                    TxnState::Active => counts.active += 1,
                    TxnState::Confirming | TxnState::Cancelling => {
                        counts.delivering += 1;
                        let _ = self.to_deliver.send(id);
                    }
                    TxnState::FailedToConfirm | TxnState::FailedToCancel => counts.failed += 1,
                    TxnState::Confirmed | TxnState::Cancelled => {}
                }
            }
        }
        self.schedule_changed.notify_one();
        Ok(counts)
    }

    // --- internals -----------------------------------------------------------

    /// Whether this engine owns `live` at `version` (see [`Live::owned`]).
    fn owns(&self, live: &Live, version: u64) -> bool {
        *lock(&live.owned) == Some((version, self.store.node()))
    }

    /// Remembers which transaction `partials` belong to.
    fn remember_partials(&self, id: TxnId, partials: impl IntoIterator<Item = crate::model::PartialId>) {
        let mut cache = lock(&self.partials);
        for p in partials {
            if cache.len() >= PARTIALS_CACHED {
                cache.clear();
            }
            cache.insert(p, id);
        }
    }

    /// The in-memory entry of `id`, loading it from the store if no one
    /// holds it, or its finished record.
    async fn find(&self, id: TxnId) -> Result<Found<'_>> {
        if let Some(held) = self.held(id) {
            return Ok(Found::Live(held));
        }
        match self.store.get_txn(id).await? {
            None => Err(not_found(id)),
            Some(txn) if txn.state.is_finished() => Ok(Found::Finished(txn)),
            Some(txn) => Ok(Found::Live(self.adopt(txn))),
        }
    }

    /// A new holder of `id` if it is in memory.
    fn held(&self, id: TxnId) -> Option<Held<'_>> {
        let map = lock(&self.live);
        map.get(&id).map(|live| Held::new(self, live.clone(), id))
    }

    /// Puts a record read from the store in memory, unless another task did
    /// first (then that entry is used: it is at least as new).
    fn adopt(&self, txn: TxnRecord) -> Held<'_> {
        let id = txn.id;
        let mut map = lock(&self.live);
        let live = match map.entry(id) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(v) => {
                let (state, _) = watch::channel(txn.state);
                let live = Live {
                    record: tokio::sync::Mutex::new(txn),
                    state,
                    holders: AtomicUsize::new(0),
                    owned: Mutex::new(None),
                };
                v.insert(Arc::new(live)).clone()
            }
        };
        Held::new(self, live, id)
    }

    /// Writes `next` as the version after `guard`'s, then publishes it.
    async fn write(&self, live: &Live, guard: &mut TxnRecord, mut next: TxnRecord, how: How<'_>) -> Result<()> {
        next.version = guard.version + 1;
        match how {
            How::Update(enlisted) => self.store.update_txn(&next, enlisted).await?,
            How::Append(batch) => {
                let bytes = batch.commands.iter().map(|c| c.payload.len() as u64).sum();
                self.store.append(&next, batch).await?;
                crate::metrics::appended(bytes);
            }
        }
        crate::metrics::transition(guard.state, &next);
        *lock(&live.owned) = Some((next.version, self.store.node()));
        self.publish(live, guard, next);
        Ok(())
    }

    /// After a conflict: reads the record again and publishes what it finds.
    async fn reload(&self, live: &Live, guard: &mut TxnRecord) -> Result<()> {
        match self.store.get_txn(guard.id).await? {
            Some(txn) => {
                self.publish(live, guard, txn);
                Ok(())
            }
            None => Err(not_found(guard.id)),
        }
    }

    /// Under the lock: if the transaction is ACTIVE past its deadline, cancel
    /// it now (durably), before the caller's event is considered.
    async fn expire_if_due(&self, live: &Live, guard: &mut TxnRecord) -> Result<()> {
        let now = self.clock.now_ms();
        if !guard.is_expired(now) {
            return Ok(());
        }
        let mut next = guard.clone();
        apply(&mut next, Event::Expire, now)?;
        self.write(live, guard, next, How::Update(None)).await
    }

    /// Replaces the in-memory copy with a record that is durable, and does
    /// the bookkeeping its state change calls for.
    fn publish(&self, live: &Live, guard: &mut TxnRecord, next: TxnRecord) {
        let old = guard.state;
        *guard = next;
        let txn = &*guard;
        self.announce(txn);
        if old == txn.state {
            return;
        }
        match txn.state {
            TxnState::Confirming | TxnState::Cancelling => {
                info!(txn = %txn.id, from = %old, to = %txn.state, reason = %txn.reason, "decision durable; delivering");
                let _ = self.to_deliver.send(txn.id);
            }
            TxnState::Confirmed | TxnState::Cancelled => {
                info!(txn = %txn.id, state = %txn.state, "transaction finished");
            }
            TxnState::FailedToConfirm | TxnState::FailedToCancel => {
                let failed: Vec<String> = txn
                    .participants
                    .iter()
                    .filter(|p| p.status == Phase2Status::Failed)
                    .map(|p| format!("{} ({})", p.service, p.last_error.as_deref().unwrap_or("")))
                    .collect();
                error!(txn = %txn.id, state = %txn.state, failed = ?failed,
                    "phase-2 delivery failed; operator action needed (Admin.Retry once fixed)");
            }
            TxnState::Active => {}
        }
        live.state.send_replace(txn.state);
    }

    /// Applies events to a finished (read-only) record: each is either a
    /// no-op (a repeated decision) or illegal, and the error names the state.
    fn apply_finished(&self, mut txn: TxnRecord, events: Vec<Event>) -> Result<TxnRecord> {
        for event in events {
            if apply(&mut txn, event, self.clock.now_ms())? == Outcome::Changed {
                return Err(Error::Storage(format!("transaction {} is {} but an event changed it", txn.id, txn.state)));
            }
        }
        Ok(txn)
    }
}

fn not_found(id: TxnId) -> Error {
    Error::txn_not_found(id)
}
