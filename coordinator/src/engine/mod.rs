//! The transaction engine: owns every composite transaction and moves it
//! through the state machine of [`state`], persisting each change before
//! anyone is told about it.
//!
//! ## Concurrency
//! Each live transaction (any state but CONFIRMED/CANCELLED) sits in memory
//! behind its own async mutex. An operation locks it, computes the next
//! record with [`state::apply`], writes it through the [`Store`] (durable on
//! return), and only then replaces the in-memory copy and releases the lock.
//! So:
//! * operations on one transaction are serialised: an append and a confirm
//!   cannot interleave, and confirm/cancel races have exactly one winner;
//! * what a reader sees in memory is always on disk already;
//! * operations on different transactions run in parallel and share flushes
//!   through the store's group commit.
//!
//! Finished transactions leave memory; reads of them go to the store.
//!
//! ## Deadlines
//! An ACTIVE transaction past its deadline is cancelled by the sweeper
//! ([`sweeper`]), and also by the first client event that finds it expired,
//! so a confirm or append that races the deadline never wins after it.
//!
//! ## Side effects
//! The engine performs no network I/O. When a transaction enters
//! CONFIRMING/CANCELLING (a decision, or an admin retry) its id is sent on
//! the channel returned by [`Engine::new`]; the phase-2 driver
//! ([`crate::delivery`]) takes it from there and reports progress back with
//! [`Engine::record_phase2`].

pub mod state;
pub mod sweeper;
pub mod validate;

use crate::lock;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tracing::{error, info, warn};

use crate::config::{Limits, fixed};
use crate::error::{Error, Result};
use crate::ids::{PartialId, TxnId};
use crate::store::{AppendBatch, AppendReceipt, CommandRecord, Store};
use state::{Event, Outcome, ParticipantRecord, Phase2Status, TxnRecord, TxnState, apply};
use validate::NewCommand;

/// Milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        now.map(|d| d.as_millis() as i64).unwrap_or(0)
    }
}

/// A clock that only moves when told to, for tests.
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicI64);

impl ManualClock {
    /// A clock at `ms`.
    pub fn at(ms: i64) -> Self {
        ManualClock(ms.into())
    }
    /// Moves the clock forward.
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// One live transaction.
struct Live {
    /// The record; in memory only what is already durable.
    record: tokio::sync::Mutex<TxnRecord>,
    /// Its state, for callers that wait for an outcome.
    state: watch::Sender<TxnState>,
}

/// What the sweeper must do and when.
#[derive(Default)]
struct Schedule {
    /// (deadline, id) of ACTIVE transactions.
    deadlines: BTreeSet<(i64, TxnId)>,
    /// (time it may be collected, id) of finished transactions.
    collectable: BTreeSet<(i64, TxnId)>,
}

/// The pending phase-2 work of one transaction.
#[derive(Clone, Debug)]
pub struct DeliveryPlan {
    /// The transaction.
    pub txn: TxnId,
    /// Confirm (commit) or cancel (rollback).
    pub decision: state::Decision,
    /// Pending participants with their index.
    pub pending: Vec<(usize, ParticipantRecord)>,
}

/// A page of [`Engine::list`].
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    /// Matching transactions, oldest first.
    pub transactions: Vec<TxnRecord>,
    /// Where to continue, if there may be more.
    pub next: Option<TxnId>,
}

/// Counts of what recovery found.
#[derive(Clone, Copy, Debug, Default)]
pub struct Recovered {
    /// ACTIVE transactions (deadlines re-armed).
    pub active: usize,
    /// CONFIRMING/CANCELLING transactions (delivery resumed).
    pub delivering: usize,
    /// FAILED_TO_* transactions (waiting for an operator).
    pub failed: usize,
    /// CONFIRMED/CANCELLED transactions (scheduled for GC).
    pub finished: usize,
}

/// The transaction engine. See the module docs.
pub struct Engine<S> {
    store: Arc<S>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    retention_ms: i64,
    live: Mutex<HashMap<TxnId, Arc<Live>>>,
    partials: Mutex<HashMap<PartialId, TxnId>>,
    schedule: Mutex<Schedule>,
    /// Wakes the sweeper when an earlier deadline or collection appears.
    pub(crate) schedule_changed: Notify,
    to_deliver: mpsc::UnboundedSender<TxnId>,
}

impl<S: Store> Engine<S> {
    /// Creates an engine; the receiver yields transactions that need phase-2
    /// delivery.
    pub fn new(
        store: Arc<S>,
        clock: Arc<dyn Clock>,
        limits: Limits,
        retention: Duration,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<TxnId>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let engine = Engine {
            store,
            clock,
            limits,
            retention_ms: retention.as_millis().min(i64::MAX as u128) as i64,
            live: Mutex::default(),
            partials: Mutex::default(),
            schedule: Mutex::default(),
            schedule_changed: Notify::new(),
            to_deliver: tx,
        };
        (Arc::new(engine), rx)
    }

    /// The store.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// The current time of the engine's clock.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Loads every unfinished transaction from the store: re-arms deadlines
    /// of ACTIVE ones, queues CONFIRMING/CANCELLING ones for delivery, and
    /// schedules finished ones for GC. Run once, before serving.
    pub async fn recover(&self) -> Result<Recovered> {
        let mut counts = Recovered::default();
        let mut after = None;
        loop {
            let page = self.store.scan(after, 512).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for txn in page {
                crate::failpoint::crash_point("during-recovery");
                match txn.state {
                    TxnState::Active => counts.active += 1,
                    TxnState::Confirming | TxnState::Cancelling => counts.delivering += 1,
                    TxnState::FailedToConfirm | TxnState::FailedToCancel => counts.failed += 1,
                    TxnState::Confirmed | TxnState::Cancelled => counts.finished += 1,
                }
                if txn.state.is_finished() {
                    lock(&self.schedule)
                        .collectable
                        .insert((txn.finished_ms.saturating_add(self.retention_ms), txn.id));
                } else {
                    self.insert_live(txn);
                }
            }
        }
        self.schedule_changed.notify_one();
        Ok(counts)
    }

    fn insert_live(&self, txn: TxnRecord) {
        let id = txn.id;
        {
            let mut partials = lock(&self.partials);
            for p in &txn.participants {
                partials.insert(p.partial_id, id);
            }
        }
        match txn.state {
            TxnState::Active => {
                lock(&self.schedule).deadlines.insert((txn.deadline_ms, id));
            }
            s if s.is_delivering() => {
                let _ = self.to_deliver.send(id);
            }
            _ => {}
        }
        let (state, _) = watch::channel(txn.state);
        let live = Arc::new(Live { record: tokio::sync::Mutex::new(txn), state });
        lock(&self.live).insert(id, live);
    }

    // --- composite side ----------------------------------------------------

    /// Begins a transaction for `services` with `timeout_ms` (0 = default).
    pub async fn begin(&self, services: Vec<String>, timeout_ms: u64) -> Result<TxnRecord> {
        validate::participants(&self.limits, &services)?;
        let timeout = validate::timeout_ms(&self.limits, timeout_ms)?;
        let now = self.clock.now_ms();
        let parts = services.into_iter().map(|s| ParticipantRecord::new(s, PartialId::new())).collect();
        let txn = TxnRecord::new(TxnId::new(), parts, now, now.saturating_add(timeout as i64));
        self.store.put_txn(&txn).await?;
        tracing::debug!(txn = %txn.id, participants = txn.participants.len(), timeout_ms = timeout, "transaction begun");
        self.insert_live(txn.clone());
        self.schedule_changed.notify_one();
        Ok(txn)
    }

    /// Adds a participant to an ACTIVE transaction; returns the existing one
    /// if the service already participates.
    pub async fn enlist(&self, id: TxnId, service: String) -> Result<ParticipantRecord> {
        validate::service_name("service", &service)?;
        let live = match self.find(id).await? {
            Found::Live(live) => live,
            Found::Finished(txn) => {
                return Err(self.refuse_finished(txn, Event::Enlist { service, partial_id: PartialId::new() }));
            }
        };
        let mut guard = live.record.lock().await;
        self.expire_if_due(&live, &mut guard).await?;
        if guard.state == TxnState::Active {
            if let Some(p) = guard.participants.iter().find(|p| p.service == service) {
                return Ok(p.clone());
            }
            if guard.participants.len() >= self.limits.max_participants {
                return Err(Error::LimitExceeded(format!(
                    "transaction {id} already has {} participants; the limit is {}",
                    guard.participants.len(),
                    self.limits.max_participants
                )));
            }
        }
        let partial_id = PartialId::new();
        let mut next = guard.clone();
        apply(&mut next, Event::Enlist { service: service.clone(), partial_id }, self.clock.now_ms())?;
        self.store.put_txn(&next).await?;
        lock(&self.partials).insert(partial_id, id);
        info!(txn = %id, partial = %partial_id, %service, "participant enlisted");
        let participant = next.participants.last().cloned();
        self.commit(&live, &mut guard, next);
        participant.ok_or_else(|| Error::Storage("enlisted participant missing".into()))
    }

    /// Decides confirm. Returns the record after the (durable) decision.
    pub async fn confirm(&self, id: TxnId) -> Result<TxnRecord> {
        self.transition(id, vec![Event::Confirm]).await
    }

    /// Decides cancel. Returns the record after the (durable) decision.
    pub async fn cancel(&self, id: TxnId, reason: String) -> Result<TxnRecord> {
        validate::reason(&reason)?;
        let reason = if reason.is_empty() { "cancelled by request".to_string() } else { reason };
        self.transition(id, vec![Event::Cancel { reason }]).await
    }

    /// Resumes delivery of a FAILED_TO_* transaction.
    pub async fn retry(&self, id: TxnId) -> Result<TxnRecord> {
        self.transition(id, vec![Event::Retry]).await
    }

    /// Waits until the transaction leaves CONFIRMING/CANCELLING or `wait`
    /// passes, then returns it.
    pub async fn wait_settled(&self, id: TxnId, wait: Duration) -> Result<TxnRecord> {
        let live = lock(&self.live).get(&id).cloned();
        if let Some(live) = live {
            let mut rx = live.state.subscribe();
            let _ = tokio::time::timeout(wait, rx.wait_for(|s| !s.is_delivering())).await;
        }
        self.get(id).await
    }

    /// Reads a transaction.
    pub async fn get(&self, id: TxnId) -> Result<TxnRecord> {
        let live = lock(&self.live).get(&id).cloned();
        match live {
            Some(live) => Ok(live.record.lock().await.clone()),
            None => self.store.get_txn(id).await?.ok_or_else(|| not_found(id)),
        }
    }

    // --- domain side -------------------------------------------------------

    /// Appends a batch to a partial topic. Returns the receipt and whether it
    /// was a duplicate of an earlier append with the same idempotency key.
    ///
    /// A retried append whose first try landed is answered from its receipt
    /// in any state (the commands are part of the topic). The receipt is
    /// looked up under the transaction's lock, which the first try holds
    /// until its write is durable, so a retry is never told "stored" about a
    /// write that is still in flight.
    /// With `service`, the partial must belong to that participant service.
    pub async fn append(
        &self,
        partial: PartialId,
        service: Option<&str>,
        commands: Vec<NewCommand>,
        idempotency_key: &str,
    ) -> Result<(AppendReceipt, bool)> {
        let key = validate::idempotency_key(idempotency_key)?;
        let bytes = validate::commands(&self.limits, &commands)?;
        let digest = validate::digest(&commands);
        let n = commands.len() as u64;
        let id = self.txn_of(partial).await?;
        let live = match self.find(id).await? {
            Found::Live(live) => live,
            Found::Finished(txn) => {
                if let Some(key) = key {
                    if let Some(r) = self.store.find_receipt(partial, key).await? {
                        return check_receipt(r, n, digest, key).map(|r| (r, true));
                    }
                }
                let event = Event::Append { participant: 0, commands: n, bytes };
                return Err(self.refuse_finished(txn, event));
            }
        };
        let mut guard = live.record.lock().await;
        let idx = guard
            .participant_index(partial)
            .ok_or_else(|| Error::NotFound(format!("partial transaction {partial} not found")))?;
        if let Some(service) = service {
            let owner = &guard.participants[idx].service;
            if owner != service {
                return Err(Error::invalid(format!(
                    "partial transaction {partial} belongs to service {owner:?}, not {service:?}"
                )));
            }
        }
        if let Some(key) = key {
            if let Some(r) = self.store.find_receipt(partial, key).await? {
                return check_receipt(r, n, digest, key).map(|r| (r, true));
            }
        }
        self.expire_if_due(&live, &mut guard).await?;
        let mut next = guard.clone();
        apply(&mut next, Event::Append { participant: idx, commands: n, bytes }, self.clock.now_ms())?;
        let p = &next.participants[idx];
        if p.topic_bytes > self.limits.max_topic_bytes {
            return Err(Error::LimitExceeded(format!(
                "partial topic {partial} would hold {} bytes; the limit is {}",
                p.topic_bytes, self.limits.max_topic_bytes
            )));
        }
        let first = p.command_count - n + 1;
        let records: Vec<CommandRecord> = commands
            .into_iter()
            .zip(first..)
            .map(|(c, sequence)| CommandRecord { sequence, kind: c.kind, key: c.key, payload: c.payload })
            .collect();
        let receipt = AppendReceipt { first_sequence: first, last_sequence: first + n - 1, bytes, digest };
        let batch = AppendBatch { partial_id: partial, commands: &records, idempotency: key.map(|k| (k, receipt)) };
        self.store.append(&next, batch).await?;
        tracing::debug!(txn = %id, %partial, first, count = n, "commands appended");
        self.commit(&live, &mut guard, next);
        Ok((receipt, false))
    }

    /// Reads a topic from `from` (0 or 1 = start), at most `limit` commands
    /// (0 = the maximum). Returns the transaction and the participant too,
    /// read together with the commands (under the lock while live), so the
    /// participant's `command_count` matches what was read.
    pub async fn read_topic(
        &self,
        partial: PartialId,
        from: u64,
        limit: usize,
    ) -> Result<(TxnRecord, ParticipantRecord, Vec<CommandRecord>)> {
        let id = self.txn_of(partial).await?;
        let limit = if limit == 0 { fixed::MAX_PAGE } else { limit.min(fixed::MAX_PAGE) };
        let (txn, commands) = match self.find(id).await? {
            Found::Live(live) => {
                let guard = live.record.lock().await;
                let commands = self.store.read_topic(partial, from.max(1), limit).await?;
                (guard.clone(), commands)
            }
            Found::Finished(txn) => {
                let commands = self.store.read_topic(partial, from.max(1), limit).await?;
                (txn, commands)
            }
        };
        let participant = txn
            .participants
            .iter()
            .find(|p| p.partial_id == partial)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("partial transaction {partial} not found")))?;
        Ok((txn, participant, commands))
    }

    // --- admin ---------------------------------------------------------------

    /// Lists transactions, oldest first, in the given states (all if empty)
    /// created at least `min_age_ms` ago, starting after `after`.
    pub async fn list(
        &self,
        states: &[TxnState],
        min_age_ms: u64,
        page_size: usize,
        after: Option<TxnId>,
    ) -> Result<ListPage> {
        const SCAN_BUDGET: usize = 100_000;
        let page_size = if page_size == 0 { 100 } else { page_size.min(fixed::MAX_PAGE) };
        let newest_created = self.clock.now_ms().saturating_sub(min_age_ms.min(i64::MAX as u64) as i64);
        let mut out = ListPage::default();
        let mut cursor = after;
        let mut scanned = 0;
        while scanned < SCAN_BUDGET {
            let batch = self.store.scan(cursor, 256).await?;
            let Some(last) = batch.last() else {
                return Ok(out);
            };
            cursor = Some(last.id);
            for txn in batch {
                scanned += 1;
                // Ids are time-ordered: once one is too young, all later are.
                if txn.created_ms > newest_created {
                    return Ok(out);
                }
                if states.is_empty() || states.contains(&txn.state) {
                    let id = txn.id;
                    out.transactions.push(txn);
                    if out.transactions.len() == page_size {
                        out.next = Some(id);
                        return Ok(out);
                    }
                }
            }
        }
        out.next = cursor;
        Ok(out)
    }

    // --- phase 2 -------------------------------------------------------------

    /// The pending phase-2 work of a transaction, or `None` if it is not
    /// delivering.
    pub async fn delivery_plan(&self, id: TxnId) -> Result<Option<DeliveryPlan>> {
        let live = lock(&self.live).get(&id).cloned();
        let Some(live) = live else { return Ok(None) };
        let txn = live.record.lock().await;
        let Some(decision) = txn.state.decision().filter(|_| txn.state.is_delivering()) else {
            return Ok(None);
        };
        let pending = txn
            .participants
            .iter()
            .enumerate()
            .filter(|(_, p)| p.status == Phase2Status::Pending)
            .map(|(i, p)| (i, p.clone()))
            .collect();
        Ok(Some(DeliveryPlan { txn: id, decision, pending }))
    }

    /// Records phase-2 progress (acknowledgements, failed attempts, giving
    /// up) reported by the delivery driver: all of `events` in one durable
    /// write, or none of them.
    pub async fn record_phase2(&self, id: TxnId, events: Vec<Event>) -> Result<TxnRecord> {
        self.transition(id, events).await
    }

    // --- sweeper -------------------------------------------------------------

    /// The earliest time the sweeper has work (a deadline or a collection).
    pub fn next_due(&self) -> Option<i64> {
        let s = lock(&self.schedule);
        let d = s.deadlines.first().map(|(t, _)| *t);
        let c = s.collectable.first().map(|(t, _)| *t);
        d.into_iter().chain(c).min()
    }

    /// Cancels every ACTIVE transaction whose deadline has passed. Returns
    /// how many were cancelled.
    pub async fn expire_due(&self) -> usize {
        let now = self.clock.now_ms();
        let due = pop_due(&mut lock(&self.schedule).deadlines, now);
        let mut n = 0;
        for id in due {
            match self.transition(id, vec![Event::Expire]).await {
                Ok(t) if t.state == TxnState::Active => {
                    // Not due by the clock after all (it stepped back): keep it.
                    lock(&self.schedule).deadlines.insert((t.deadline_ms, id));
                }
                Ok(t) if t.reason == state::DEADLINE_REASON => n += 1,
                Ok(_) => {}
                Err(e) => {
                    warn!(txn = %id, cause = %e, "could not expire transaction; will retry in 1 s");
                    lock(&self.schedule).deadlines.insert((now + 1000, id));
                }
            }
        }
        n
    }

    /// Deletes finished transactions whose retention has ended. Returns how
    /// many were deleted.
    pub async fn collect_garbage(&self) -> usize {
        let now = self.clock.now_ms();
        let due = pop_due(&mut lock(&self.schedule).collectable, now);
        let mut n = 0;
        for id in due {
            let result = match self.store.get_txn(id).await {
                Ok(Some(txn)) if txn.state.is_finished() => self.store.delete_txn(&txn).await.map(|_| true),
                Ok(_) => Ok(false),
                Err(e) => Err(e),
            };
            match result {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => {
                    warn!(txn = %id, cause = %e, "garbage collection failed; will retry in 1 s");
                    lock(&self.schedule).collectable.insert((now + 1000, id));
                }
            }
        }
        if n > 0 {
            info!(count = n, "finished transactions garbage-collected");
        }
        n
    }

    // --- internals -----------------------------------------------------------

    /// The one path for events that only change the record: lock, expire
    /// first if due (client decisions only), apply every event in order,
    /// persist once, publish.
    async fn transition(&self, id: TxnId, events: Vec<Event>) -> Result<TxnRecord> {
        let live = match self.find(id).await? {
            Found::Live(live) => live,
            Found::Finished(mut txn) => {
                for event in events {
                    txn = self.apply_finished(txn, event)?;
                }
                return Ok(txn);
            }
        };
        let mut guard = live.record.lock().await;
        if events.iter().any(|e| matches!(e, Event::Confirm | Event::Cancel { .. })) {
            self.expire_if_due(&live, &mut guard).await?;
        }
        let mut next = guard.clone();
        let now = self.clock.now_ms();
        let mut changed = false;
        for event in events {
            changed |= apply(&mut next, event, now)? == Outcome::Changed;
        }
        if changed {
            self.store.update_txn(&next).await?;
            if guard.state == TxnState::Active && next.state.is_delivering() {
                crate::failpoint::crash_point("after-decision");
            }
            self.commit(&live, &mut guard, next);
        }
        Ok(guard.clone())
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
        self.store.update_txn(&next).await?;
        self.commit(live, guard, next);
        Ok(())
    }

    /// Publishes a record that is already durable: replaces the in-memory
    /// copy and performs the bookkeeping its state change calls for.
    fn commit(&self, live: &Live, guard: &mut TxnRecord, next: TxnRecord) {
        let old = guard.state;
        *guard = next;
        let txn = &*guard;
        if old == txn.state {
            return;
        }
        if old == TxnState::Active {
            lock(&self.schedule).deadlines.remove(&(txn.deadline_ms, txn.id));
        }
        match txn.state {
            TxnState::Confirming | TxnState::Cancelling => {
                info!(txn = %txn.id, from = %old, to = %txn.state, reason = %txn.reason, "decision durable; delivering");
                let _ = self.to_deliver.send(txn.id);
            }
            TxnState::Confirmed | TxnState::Cancelled => {
                info!(txn = %txn.id, state = %txn.state, "transaction finished");
                {
                    let mut partials = lock(&self.partials);
                    for p in &txn.participants {
                        partials.remove(&p.partial_id);
                    }
                }
                lock(&self.live).remove(&txn.id);
                lock(&self.schedule).collectable.insert((txn.finished_ms.saturating_add(self.retention_ms), txn.id));
                self.schedule_changed.notify_one();
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

    /// The live entry of `id`, or its finished record from the store.
    async fn find(&self, id: TxnId) -> Result<Found> {
        if let Some(live) = lock(&self.live).get(&id).cloned() {
            return Ok(Found::Live(live));
        }
        match self.store.get_txn(id).await? {
            Some(txn) => Ok(Found::Finished(txn)),
            None => Err(not_found(id)),
        }
    }

    /// Applies an event to a finished (read-only) record: it is either a
    /// no-op (a repeated decision) or illegal, and the error names the state.
    fn apply_finished(&self, mut txn: TxnRecord, event: Event) -> Result<TxnRecord> {
        match apply(&mut txn, event, self.clock.now_ms())? {
            Outcome::Unchanged => Ok(txn),
            Outcome::Changed => Err(Error::Storage(format!(
                "transaction {} is {} in the store but not loaded; restart the coordinator",
                txn.id, txn.state
            ))),
        }
    }

    /// The error for an event that is never legal on a finished record
    /// (append, enlist).
    fn refuse_finished(&self, txn: TxnRecord, event: Event) -> Error {
        match self.apply_finished(txn, event) {
            Err(e) => e,
            Ok(txn) => Error::Storage(format!("transaction {} accepted an event while {}", txn.id, txn.state)),
        }
    }

    /// The transaction a partial id belongs to.
    async fn txn_of(&self, partial: PartialId) -> Result<TxnId> {
        if let Some(id) = lock(&self.partials).get(&partial).copied() {
            return Ok(id);
        }
        self.store
            .find_partial(partial)
            .await?
            .ok_or_else(|| Error::NotFound(format!("partial transaction {partial} not found")))
    }
}

/// Where a transaction is.
enum Found {
    /// In memory, lockable.
    Live(Arc<Live>),
    /// Finished: only in the store, never changes again.
    Finished(TxnRecord),
}

fn not_found(id: TxnId) -> Error {
    Error::NotFound(format!("transaction {id} not found (never begun, or garbage-collected)"))
}

/// A receipt answers a retry only if the retry carries the same batch.
fn check_receipt(r: AppendReceipt, count: u64, digest: u64, key: &str) -> Result<AppendReceipt> {
    if r.last_sequence - r.first_sequence + 1 != count || r.digest != digest {
        return Err(Error::invalid(format!(
            "idempotency_key {key:?} was already used for a different batch ({} commands, {} bytes)",
            r.last_sequence - r.first_sequence + 1,
            r.bytes
        )));
    }
    Ok(r)
}

fn pop_due(set: &mut BTreeSet<(i64, TxnId)>, now: i64) -> Vec<TxnId> {
    let mut due = Vec::new();
    while let Some(&(t, id)) = set.first() {
        if t > now {
            break;
        }
        set.pop_first();
        due.push(id);
    }
    due
}
