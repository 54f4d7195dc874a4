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
//!   backoff with jitter. Any other status is a permanent refusal. A refusal,
//!   or an exhausted attempt budget, marks the participant failed; the state
//!   machine then ends the transaction in FAILED_TO_CONFIRM/CANCEL.
//! * Every attempt's outcome is persisted through the engine, so after a
//!   restart delivery resumes with the right attempt count and next time.
//!   Recovery re-queues every CONFIRMING/CANCELLING transaction at start.
//! * The driver never decides anything: it only reports progress.

pub mod registry;

use crate::lock;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use tcc_proto::v1::participant_client::ParticipantClient;
use tcc_proto::v1::{PhaseTwoRequest, StoredCommand};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Code;
use tracing::{debug, error, warn};

use crate::config::{DeliveryPolicy, fixed};
use crate::engine::state::{Decision, Event, ParticipantRecord};
use crate::engine::{DeliveryPlan, Engine};
use crate::error::Result;
use crate::ids::TxnId;
use crate::store::Store;
use registry::Registry;

/// Why a phase-2 call did not succeed.
#[derive(Debug)]
enum CallError {
    /// Worth retrying.
    Transient(String),
    /// The participant refused for good.
    Permanent(String),
}

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
    request: Option<PhaseTwoRequest>,
    attempts: u32,
    /// When the next attempt is due (unix ms; 0 = now).
    next_at: i64,
}

/// Whether a participant's delivery is over (acknowledged or given up).
fn is_final(event: &Event) -> bool {
    matches!(event, Event::Delivered { .. } | Event::GaveUp { .. })
}

/// The phase-2 driver. See the module docs.
pub struct Delivery<S> {
    engine: Arc<Engine<S>>,
    registry: Arc<Registry>,
    policy: DeliveryPolicy,
    /// Transactions with a running driver; `true` = look again when done.
    running: Mutex<HashMap<TxnId, bool>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl<S: Store> Delivery<S> {
    /// A driver that stops when `shutdown` is cancelled.
    pub fn new(
        engine: Arc<Engine<S>>,
        registry: Arc<Registry>,
        policy: DeliveryPolicy,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Delivery { engine, registry, policy, running: Mutex::default(), tasks: TaskTracker::new(), shutdown })
    }

    /// Takes transactions to deliver from the engine until shutdown, then
    /// waits for the running drivers to stop.
    pub async fn run(self: Arc<Self>, mut decided: mpsc::UnboundedReceiver<TxnId>) {
        loop {
            tokio::select! {
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
        let DeliveryPlan { txn, decision, pending } = plan;
        let calls = pending.into_iter().map(|(idx, p)| async move {
            match self.request(txn, &p).await {
                Ok(request) => {
                    let (attempts, next_at) = (p.attempts, p.next_attempt_ms);
                    Some(Call { txn, decision, idx, attempts, next_at, p, request: Some(request) })
                }
                Err(e) => {
                    error!(txn = %txn, partial = %p.partial_id, cause = %e, "cannot read topic for delivery");
                    None
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
            error!(txn = %txn, cause = %e, "cannot record phase-2 progress");
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
        let wait = call.next_at.saturating_sub(self.engine.now_ms());
        if wait > 0 {
            self.pause(Duration::from_millis(wait as u64)).await;
        }
        if self.shutdown.is_cancelled() {
            return None;
        }
        let request = match call.request.take() {
            Some(r) => r,
            None => match self.request(txn, p).await {
                Ok(r) => r,
                Err(e) => {
                    error!(txn = %txn, partial = %p.partial_id, cause = %e, "cannot read topic for delivery");
                    self.pause(Duration::from_secs(1)).await;
                    return None;
                }
            },
        };
        let outcome = self.call(&p.service, call.decision, request).await;
        call.attempts += 1;
        let attempts = call.attempts;
        Some(match outcome {
            Ok(()) => {
                debug!(txn = %txn, partial = %p.partial_id, service = %p.service, attempts, "{verb} acknowledged");
                Event::Delivered { participant: idx }
            }
            Err(CallError::Transient(error)) if !self.policy.exhausted(attempts) => {
                let delay = self.policy.backoff(attempts);
                call.next_at = self.engine.now_ms() + delay.as_millis() as i64;
                warn!(txn = %txn, partial = %p.partial_id, service = %p.service, attempts, retry_in_ms = delay.as_millis() as u64,
                    cause = %error, "{verb} failed; will retry");
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

    async fn request(&self, txn: TxnId, p: &ParticipantRecord) -> Result<PhaseTwoRequest> {
        let commands = self.engine.store().read_topic(p.partial_id, 1, usize::MAX).await?;
        Ok(PhaseTwoRequest {
            transaction_id: txn.to_string(),
            partial_id: p.partial_id.to_string(),
            service: p.service.clone(),
            commands: commands
                .into_iter()
                .map(|c| StoredCommand { sequence: c.sequence, r#type: c.kind, key: c.key, payload: c.payload })
                .collect(),
        })
    }

    /// One phase-2 call to some instance of `service`.
    async fn call(&self, service: &str, decision: Decision, request: PhaseTwoRequest) -> Result<(), CallError> {
        let Some((endpoint, channel)) = self.registry.pick(service) else {
            return Err(CallError::Transient(format!("no endpoint known for service {service:?}")));
        };
        let timeout = Duration::from_millis(self.policy.call_timeout_ms);
        let mut client = ParticipantClient::new(channel)
            .max_encoding_message_size(fixed::MAX_MESSAGE_BYTES)
            .max_decoding_message_size(fixed::MAX_MESSAGE_BYTES);
        let mut req = tonic::Request::new(request);
        req.set_timeout(timeout);
        let call = async {
            match decision {
                Decision::Confirm => client.commit(req).await,
                Decision::Cancel => client.rollback(req).await,
            }
        };
        // The grpc-timeout header asks the server to give up; this bounds the
        // wait even if the server ignores it.
        let result = tokio::time::timeout(timeout + Duration::from_millis(100), call).await;
        debug!(%service, %endpoint, ok = matches!(result, Ok(Ok(_))), "phase-2 call");
        match result {
            Ok(Ok(_)) => {
                self.registry.report(&endpoint, true);
                Ok(())
            }
            Err(_) => Err(CallError::Transient(format!("{endpoint}: no answer within {} ms", timeout.as_millis()))),
            Ok(Err(status)) => {
                let msg = format!("{endpoint}: {:?}: {}", status.code(), status.message());
                match status.code() {
                    Code::Unavailable => {
                        self.registry.report(&endpoint, false);
                        Err(CallError::Transient(msg))
                    }
                    Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::Internal
                    | Code::Unknown
                    | Code::Cancelled => Err(CallError::Transient(msg)),
                    _ => Err(CallError::Permanent(msg)),
                }
            }
        }
    }

    /// Sleeps, or returns at once on shutdown.
    async fn pause(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.shutdown.cancelled() => {}
        }
    }
}
