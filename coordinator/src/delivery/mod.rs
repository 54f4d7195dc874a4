//! Phase-2 delivery: once a decision is durable, call every pending
//! participant's `Commit` (confirm) or `Rollback` (cancel) until it
//! acknowledges.
//!
//! * One driver task per transaction ([`Delivery::start`] is idempotent: a
//!   second start while one runs makes it look again when it finishes, which
//!   is how an admin retry that races the end of a driver is not lost).
//! * Participants are called in parallel; each carries its whole topic. The
//!   outcomes of the first round are recorded together, in one durable
//!   write; retries are then recorded one by one. So a slow participant
//!   delays the record of a fast one's acknowledgement, by at most the call
//!   timeout; should the coordinator die in between, the fast one is called
//!   again and acknowledges without applying twice (exactly-once is the
//!   participant's marker, not this record).
//! * A transient failure (transport error, UNAVAILABLE, DEADLINE_EXCEEDED,
//!   RESOURCE_EXHAUSTED, ABORTED, INTERNAL, UNKNOWN, CANCELLED, or no
//!   endpoint known) is recorded and retried after a capped exponential
//!   backoff with jitter. UNIMPLEMENTED means the address is not a
//!   participant at all (a wrong registration): a routing failure, retried
//!   on another instance and logged as a warning. Any other status is the
//!   participant's own permanent refusal. A refusal,
//!   or an exhausted attempt budget, marks the participant failed; the state
//!   machine then ends the transaction in FAILED_TO_CONFIRM/CANCEL.
//! * Every attempt's outcome is persisted through the engine, so after a
//!   restart delivery resumes with the right attempt count and next time.
//!   Recovery re-queues every CONFIRMING/CANCELLING transaction at start.
//! * The driver never decides anything: it only reports progress.
//! * An operator's "deliver now" ([`Delivery::deliver_now`]) cuts short the
//!   backoff waits of the transaction's pending participants (the engine
//!   has made them due in the record, for a driver that starts afresh).
//! * Waits derived from a persisted time (the next attempt of a
//!   participant) are capped at the maximum backoff, so a wall clock that
//!   stepped back (at a restart, say) postpones a due call by at most that.
//! * Calls go through a [`Transport`] ([`transport::GrpcTransport`] in the
//!   server); what to call comes from the engine
//!   ([`Engine::delivery_plan`], [`Engine::commands`]), never from the
//!   store directly.

pub mod registry;
pub mod transport;

use crate::lock;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::clock::Entropy;
use crate::config::DeliveryPolicy;
use crate::engine::Engine;
use crate::engine::lifecycle::DeliveryPlan;
use crate::error::Result;
use crate::model::{Decision, Event, ParticipantRecord, TxnId};
use crate::throttle::Throttle;
use transport::{CallError, Phase2Call, Transport};

/// One participant's phase-2 delivery in progress.
struct Call {
    txn: TxnId,
    decision: Decision,
    /// Index into the transaction's participants.
    idx: usize,
    p: ParticipantRecord,
    /// The call's message, read from the topic; taken by the next attempt
    /// (a retry reads the topic again rather than every delivery keeping a
    /// copy: a decided topic never changes).
    request: Option<Phase2Call>,
    /// The transaction's trace context (`traceparent`, empty if none).
    trace: Arc<str>,
    /// The transaction's "deliver now" count when this call last waited.
    kicks_seen: u64,
    attempts: u32,
    /// When the next attempt is due (unix ms; 0 = now).
    next_at: i64,
}

/// Whether a participant's delivery is over (acknowledged or given up).
fn is_final(event: &Event) -> bool {
    matches!(event, Event::Delivered { .. } | Event::GaveUp { .. })
}

/// Repeated failures of one transaction's phase-2 calls are logged at WARN
/// at most this often (the first one always, and the final outcome).
pub const WARN_EVERY_MS: i64 = 60_000;

/// The phase-2 driver. See the module docs.
pub struct Delivery {
    engine: Arc<Engine>,
    transport: Arc<dyn Transport>,
    entropy: Arc<dyn Entropy>,
    policy: DeliveryPolicy,
    /// Transactions with a running driver; `true` = look again when done.
    running: Mutex<HashMap<TxnId, bool>>,
    /// When a failed phase-2 call of a transaction was last logged at WARN
    /// (engine ms): at most one such line per transaction per
    /// [`WARN_EVERY_MS`]; the others go to DEBUG.
    warned: Mutex<HashMap<TxnId, i64>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Per transaction being delivered: how many times "deliver now" was
    /// asked (see [`Delivery::deliver_now`]).
    kicks: Mutex<HashMap<TxnId, tokio::sync::watch::Sender<u64>>>,
}

impl Delivery {
    /// A driver that stops when `shutdown` is cancelled.
    pub fn new(
        engine: Arc<Engine>,
        transport: Arc<dyn Transport>,
        entropy: Arc<dyn Entropy>,
        policy: DeliveryPolicy,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Delivery {
            engine,
            transport,
            entropy,
            policy,
            running: Mutex::default(),
            warned: Mutex::default(),
            tasks: TaskTracker::new(),
            shutdown,
            kicks: Mutex::default(),
        })
    }

    /// Calls `id`'s pending participants now: wakes the retries waiting
    /// out their backoff, and starts a driver if none runs.
    pub fn deliver_now(self: &Arc<Self>, id: TxnId) {
        lock(&self.kicks).entry(id).or_insert_with(|| tokio::sync::watch::channel(0).0).send_modify(|n| *n += 1);
        self.start(id);
    }

    /// The "deliver now" counter of `id`.
    fn kicks(&self, id: TxnId) -> tokio::sync::watch::Receiver<u64> {
        lock(&self.kicks).entry(id).or_insert_with(|| tokio::sync::watch::channel(0).0).subscribe()
    }

    /// The transactions with a running driver, in id order.
    pub fn running(&self) -> Vec<TxnId> {
        let mut ids: Vec<TxnId> = lock(&self.running).keys().copied().collect();
        ids.sort();
        ids
    }

    /// Takes transactions to deliver from the engine until shutdown, then
    /// waits for the running drivers to stop.
    pub async fn run(self: Arc<Self>, mut decided: mpsc::UnboundedReceiver<TxnId>) {
        loop {
            tokio::select! {
                biased;
                id = decided.recv() => match id {
                    Some(id) => self.start(id),
                    None => break,
                },
                _ = self.shutdown.cancelled() => break,
            }
        }
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Starts a driver for `id` unless one runs.
    pub fn start(self: &Arc<Self>, id: TxnId) {
        let mut running = lock(&self.running);
        if let Some(again) = running.get_mut(&id) {
            *again = true;
            return;
        }
        running.insert(id, false);
        let this = self.clone();
        self.tasks.spawn(async move {
            // A panicking driver must not leave the transaction without one.
            let outcome = AssertUnwindSafe(this.clone().drive(id)).catch_unwind().await;
            if outcome.is_err() {
                error!(txn = %id, "delivery driver panicked; restarting it in 1 s");
                lock(&this.running).remove(&id);
                this.pause(Duration::from_secs(1)).await;
                if !this.shutdown.is_cancelled() {
                    this.start(id);
                }
            }
        });
    }

    async fn drive(self: Arc<Self>, id: TxnId) {
        loop {
            while !self.shutdown.is_cancelled() {
                match self.engine.delivery_plan(id).await {
                    Ok(Some(plan)) if !plan.pending.is_empty() => self.deliver_all(plan).await,
                    Ok(_) => break,
                    Err(e) => {
                        error!(txn = %id, cause = %e, "cannot read delivery plan; retrying in 1 s");
                        self.pause(Duration::from_secs(1)).await;
                    }
                }
            }
            let mut running = lock(&self.running);
            match running.get_mut(&id) {
                Some(again) if *again && !self.shutdown.is_cancelled() => *again = false,
                _ => {
                    running.remove(&id);
                    lock(&self.warned).remove(&id);
                    lock(&self.kicks).remove(&id);
                    return;
                }
            }
        }
    }

    /// Calls every pending participant that is due once, in parallel, and
    /// records the outcomes in one durable write (the common case, everyone
    /// acknowledging at once, costs one write per transaction); those not
    /// done, and those backing off, then retry on their own.
    async fn deliver_all(&self, plan: DeliveryPlan) {
        let DeliveryPlan { txn, decision, pending, trace } = plan;
        let trace: Arc<str> = trace.into();
        let calls = pending.into_iter().map(|(idx, p)| {
            let trace = trace.clone();
            async move {
                match self.request(txn, decision, &p, &trace).await {
                    Ok(request) => {
                        let (attempts, next_at) = (p.attempts, p.next_attempt_ms);
                        let kicks_seen = lock(&self.kicks).get(&txn).map_or(0, |k| *k.borrow());
                        Some(Call {
                            txn,
                            decision,
                            idx,
                            attempts,
                            next_at,
                            p,
                            request: Some(request),
                            trace,
                            kicks_seen,
                        })
                    }
                    Err(e) => {
                        error!(txn = %txn, partial = %p.partial_id, cause = %e, "cannot read topic for delivery");
                        None
                    }
                }
            }
        });
        let calls: Vec<Call> = futures::future::join_all(calls).await.into_iter().flatten().collect();
        if calls.is_empty() {
            // No topic could be read: the driver loop looks again.
            return self.pause(Duration::from_secs(1)).await;
        }
        let now = self.engine.now_ms();
        let (due, later): (Vec<Call>, Vec<Call>) = calls.into_iter().partition(|c| c.next_at <= now);
        let later = futures::future::join_all(later.into_iter().map(|call| self.retry(call)));
        futures::future::join(self.first_round(txn, due), later).await;
    }

    /// The parallel first attempts of [`Delivery::deliver_all`], recorded
    /// together; then the retries of those not done.
    async fn first_round(&self, txn: TxnId, due: Vec<Call>) {
        let attempts = due.into_iter().map(|mut call| async move {
            let event = self.attempt(&mut call).await?;
            Some((call, event))
        });
        let firsts: Vec<(Call, Event)> = futures::future::join_all(attempts).await.into_iter().flatten().collect();
        if firsts.is_empty() {
            return; // nothing was due, or shutdown
        }
        if !self.record(txn, firsts.iter().map(|(_, e)| e.clone()).collect()).await {
            return;
        }
        let retries = firsts.into_iter().filter(|(_, e)| !is_final(e)).map(|(call, _)| self.retry(call));
        futures::future::join_all(retries).await;
    }

    /// Retries one participant until it acknowledges, refuses, the budget
    /// runs out, or shutdown; each outcome recorded on its own. Returns
    /// early on a store error (the driver loop tries again).
    async fn retry(&self, mut call: Call) {
        while let Some(event) = self.attempt(&mut call).await {
            let done = is_final(&event);
            if !self.record(call.txn, vec![event]).await || done {
                return;
            }
        }
    }

    /// Records phase-2 outcomes in one write. On a store error, logs and
    /// pauses, and returns `false` (the driver loop tries again).
    async fn record(&self, txn: TxnId, events: Vec<Event>) -> bool {
        let acked = events.iter().any(|e| matches!(e, Event::Delivered { .. }));
        if let Err(e) = self.engine.record_phase2(txn, events).await {
            // A fenced or failed store refuses this for every transaction
            // at once: one line per interval, with a count.
            static THROTTLE: Throttle = Throttle::new(Duration::from_secs(10));
            if let Some(held_back) = THROTTLE.allow() {
                error!(txn = %txn, cause = %e, held_back, "cannot record phase-2 progress (one line per 10 s; held_back: the like since the last one)");
            }
            self.pause(Duration::from_secs(1)).await;
            return false;
        }
        if acked {
            crate::failpoint::crash_point("after-ack");
        }
        true
    }

    /// One attempt, after waiting until it is due: the event to record, or
    /// `None` on shutdown or when the topic cannot be read (the driver loop
    /// tries again).
    async fn attempt(&self, call: &mut Call) -> Option<Event> {
        let (txn, idx, p) = (call.txn, call.idx, &call.p);
        let verb = if call.decision == Decision::Confirm { "commit" } else { "rollback" };
        // Capped: `next_at` may come from before a clock step.
        let wait = call.next_at.saturating_sub(self.engine.now_ms()).min(self.policy.retry_max_ms as i64);
        if wait > 0 {
            // Unless an operator asked for it now (since this call last
            // waited, or while it waits).
            let mut kicked = self.kicks(txn);
            if *kicked.borrow() == call.kicks_seen {
                tokio::select! {
                    _ = self.pause(Duration::from_millis(wait as u64)) => {}
                    _ = kicked.changed() => debug!(txn = %txn, partial = %p.partial_id, "delivering now, as asked"),
                }
            }
            call.kicks_seen = *kicked.borrow();
        }
        if self.shutdown.is_cancelled() {
            return None;
        }
        let request = match call.request.take() {
            Some(r) => r,
            None => match self.request(txn, call.decision, p, &call.trace).await {
                Ok(r) => r,
                Err(e) => {
                    error!(txn = %txn, partial = %p.partial_id, cause = %e, "cannot read topic for delivery");
                    self.pause(Duration::from_secs(1)).await;
                    return None;
                }
            },
        };
        let timeout = Duration::from_millis(self.policy.call_timeout_ms);
        let outcome = tokio::select! {
            outcome = self.transport.call(request, timeout) => outcome,
            // Shutdown: the call's outcome is unknown and nothing is
            // recorded; it is made again after the restart (or by another
            // node), and the participant applies it once.
            _ = self.shutdown.cancelled() => return None,
        };
        call.attempts += 1;
        let attempts = call.attempts;
        let class = match &outcome {
            Ok(()) => "ok",
            Err(CallError::Transient(_)) => "transient",
            Err(CallError::Permanent(_)) => "refused",
        };
        crate::metrics::phase2(&p.service, call.decision, class, attempts);
        Some(match outcome {
            Ok(()) => {
                if attempts > 1 {
                    info!(txn = %txn, partial = %p.partial_id, service = %p.service, attempts, "{verb} acknowledged after retries");
                } else {
                    debug!(txn = %txn, partial = %p.partial_id, service = %p.service, attempts, "{verb} acknowledged");
                }
                Event::Delivered { participant: idx }
            }
            Err(CallError::Transient(error)) if !self.policy.exhausted(attempts) => {
                let delay = self.policy.backoff(attempts, self.entropy.as_ref());
                let now = self.engine.now_ms();
                call.next_at = now + delay.as_millis() as i64;
                let loud = {
                    let mut warned = lock(&self.warned);
                    let due = warned.get(&txn).is_none_or(|last| now - last >= WARN_EVERY_MS || now < *last);
                    if due {
                        warned.insert(txn, now);
                    }
                    due
                };
                // And across transactions, one line a second: a participant
                // down (or a takeover) fails every transaction at once.
                static THROTTLE: Throttle = Throttle::new(Duration::from_secs(1));
                let allowed = if loud { THROTTLE.allow() } else { None };
                if let Some(held_back) = allowed {
                    warn!(txn = %txn, partial = %p.partial_id, service = %p.service, attempts, retry_in_ms = delay.as_millis() as u64,
                        cause = %error, held_back, "{verb} failed; retrying with backoff (further failures of this transaction are logged at most once a minute, and of all at most one a second; held_back: the like since the last line)");
                } else {
                    debug!(txn = %txn, partial = %p.partial_id, service = %p.service, attempts, retry_in_ms = delay.as_millis() as u64,
                        cause = %error, "{verb} failed; will retry");
                }
                Event::AttemptFailed { participant: idx, error, next_attempt_ms: call.next_at }
            }
            Err(CallError::Transient(error)) => {
                error!(txn = %txn, partial = %p.partial_id, service = %p.service, attempts, cause = %error,
                    "{verb} retry budget exhausted; giving up");
                Event::GaveUp { participant: idx, error: format!("gave up after {attempts} attempts: {error}") }
            }
            Err(CallError::Permanent(error)) => {
                error!(txn = %txn, partial = %p.partial_id, service = %p.service, cause = %error, "{verb} refused permanently");
                Event::GaveUp { participant: idx, error: format!("refused: {error}") }
            }
        })
    }

    async fn request(&self, txn: TxnId, decision: Decision, p: &ParticipantRecord, trace: &str) -> Result<Phase2Call> {
        let commands = self.engine.commands(p.partial_id).await?;
        let trace = trace.to_string();
        Ok(Phase2Call { txn, partial: p.partial_id, service: p.service.clone(), decision, commands, trace })
    }

    /// Sleeps, or returns at once on shutdown.
    async fn pause(&self, d: Duration) {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }
}
