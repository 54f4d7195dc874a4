//! A transaction's life: begin, enlist, the decisions, phase-2 progress and
//! the operator's retry. Each operation reads the record, applies its
//! events, and writes the next version (reloading on a conflict).

use std::time::Duration;

use tracing::info;

use super::{Engine, Found, Held, How, until_no_conflict, validate};
use crate::error::{Error, Result};
use crate::model::{Decision, Event, Outcome, ParticipantRecord, Phase2Status, TxnId, TxnRecord, apply};

/// The pending phase-2 work of one transaction.
#[derive(Clone, Debug)]
pub struct DeliveryPlan {
    /// The transaction.
    pub txn: TxnId,
    /// Confirm (commit) or cancel (rollback).
    pub decision: Decision,
    /// Pending participants with their index.
    pub pending: Vec<(usize, ParticipantRecord)>,
    /// The transaction's trace context (`traceparent`; empty if none).
    pub trace: String,
}

impl Engine {
    /// Begins a transaction for `services` with `timeout_ms` (0 = default),
    /// owned by the identity `owner` (empty when the coordinator runs open),
    /// in the trace `trace` (a W3C `traceparent`; empty when untraced).
    pub async fn begin(
        &self,
        services: Vec<String>,
        timeout_ms: u64,
        owner: String,
        trace: String,
    ) -> Result<TxnRecord> {
        validate::participants(&self.limits, &services)?;
        let timeout = validate::timeout_ms(&self.limits, timeout_ms)?;
        let now = self.clock.now_ms();
        let parts = services.into_iter().map(|s| ParticipantRecord::new(s, self.entropy.partial_id())).collect();
        let mut txn = TxnRecord::new(self.entropy.txn_id(now), parts, now, now.saturating_add(timeout as i64));
        txn.version = 1;
        txn.owner = owner;
        txn.trace = trace;
        self.store.create_txn(&txn).await?;
        self.announce(&txn);
        crate::metrics::begun();
        self.remember_partials(txn.id, txn.participants.iter().map(|p| p.partial_id));
        tracing::debug!(txn = %txn.id, participants = txn.participants.len(), timeout_ms = timeout, "transaction begun");
        if txn.deadline_ms < self.next_sweep_ms.load(std::sync::atomic::Ordering::SeqCst) {
            self.schedule_changed.notify_one();
        }
        Ok(txn)
    }

    /// Adds a participant to an ACTIVE transaction; returns the existing one
    /// if the service already participates.
    pub async fn enlist(&self, id: TxnId, service: String) -> Result<ParticipantRecord> {
        validate::service_name("service", &service)?;
        let live = match self.find(id).await? {
            Found::Live(live) => live,
            Found::Finished(txn) => {
                let event = Event::Enlist { service, partial_id: self.entropy.partial_id() };
                return Err(self.apply_finished(txn, vec![event]).err().unwrap_or_else(|| accepted_late(id)));
            }
        };
        let mut guard = live.record.lock().await;
        until_no_conflict!(
            self,
            &live,
            guard,
            async {
                self.expire_if_due(&live, &mut guard).await?;
                if guard.state == crate::model::TxnState::Active {
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
                let partial_id = self.entropy.partial_id();
                let mut next = guard.clone();
                apply(&mut next, Event::Enlist { service: service.clone(), partial_id }, self.clock.now_ms())?;
                let participant = next.participants.last().cloned();
                self.write(&live, &mut guard, next, How::Update(Some(partial_id))).await?;
                self.remember_partials(id, [partial_id]);
                info!(txn = %id, partial = %partial_id, %service, "participant enlisted");
                participant.ok_or_else(|| Error::Storage("enlisted participant missing".into()))
            }
            .await
        )
    }

    /// Decides confirm. Returns the record after the (durable) decision.
    pub async fn confirm(&self, id: TxnId) -> Result<TxnRecord> {
        self.confirm_waiting(id, None).await
    }

    /// Decides cancel. Returns the record after the (durable) decision.
    pub async fn cancel(&self, id: TxnId, reason: String) -> Result<TxnRecord> {
        self.cancel_waiting(id, reason, None).await
    }

    /// Decides confirm, then, with `wait`, waits (at most that long) until
    /// the transaction leaves CONFIRMING; returns the record reached.
    pub async fn confirm_waiting(&self, id: TxnId, wait: Option<Duration>) -> Result<TxnRecord> {
        self.decide(id, Event::Confirm, wait).await
    }

    /// Decides cancel, then, with `wait`, waits (at most that long) until
    /// the transaction leaves CANCELLING; returns the record reached.
    pub async fn cancel_waiting(&self, id: TxnId, reason: String, wait: Option<Duration>) -> Result<TxnRecord> {
        validate::reason(&reason)?;
        let reason = if reason.is_empty() { "cancelled by request".to_string() } else { reason };
        self.decide(id, Event::Cancel { reason }, wait).await
    }

    /// A decision and the wait for its outcome on one hold of the
    /// transaction, so that this engine's delivery updates the very record
    /// the waiter watches (no reload from the store, no claim, no polling).
    async fn decide(&self, id: TxnId, event: Event, wait: Option<Duration>) -> Result<TxnRecord> {
        let live = match self.find(id).await? {
            Found::Live(live) => live,
            Found::Finished(txn) => return self.apply_finished(txn, vec![event]),
        };
        let txn = self.transition_on(&live, id, vec![event]).await?;
        match wait {
            Some(wait) if txn.state.is_delivering() => self.wait_on(&live, id, wait).await,
            _ => Ok(txn),
        }
    }

    /// Resumes delivery of a FAILED_TO_* transaction, for the operator
    /// `by` (kept in its history).
    pub async fn retry(&self, id: TxnId, by: &str) -> Result<TxnRecord> {
        self.transition(id, vec![Event::Retry { by: by.to_string() }]).await
    }

    /// Marks the failed participant `service` of a FAILED_TO_* transaction
    /// as done by hand, for the operator `by`, with `reason` (both kept in
    /// its history). Once no participant is failed, the transaction is
    /// CONFIRMED or CANCELLED.
    pub async fn resolve(&self, id: TxnId, service: &str, reason: &str, by: &str) -> Result<TxnRecord> {
        crate::engine::validate::reason(reason)?;
        if reason.trim().is_empty() {
            return Err(Error::invalid("reason must say why the participant is resolved by hand"));
        }
        let txn = self.get(id).await?;
        let participant = txn
            .participants
            .iter()
            .position(|p| p.service == service)
            .ok_or_else(|| Error::NotFound(format!("transaction {id} has no participant {service:?}")))?;
        self.transition(id, vec![Event::Resolve { participant, reason: reason.to_string(), by: by.to_string() }]).await
    }

    /// Makes the pending participants of a CONFIRMING/CANCELLING
    /// transaction due now (delivery must also be woken: see
    /// `Delivery::deliver_now`).
    pub async fn deliver_now(&self, id: TxnId) -> Result<TxnRecord> {
        self.transition(id, vec![Event::DeliverNow]).await
    }

    /// The pending phase-2 work of a transaction, or `None` if it is not
    /// delivering (finished, or already collected: another node may have
    /// finished it and its retention passed), or if another live
    /// coordinator delivers it (a cluster store: see [`Store::claim`]).
    ///
    /// [`Store::claim`]: crate::store::Store::claim
    pub async fn delivery_plan(&self, id: TxnId) -> Result<Option<DeliveryPlan>> {
        let live = match self.find(id).await {
            Ok(Found::Live(live)) => live,
            Ok(Found::Finished(_)) | Err(Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut guard = live.record.lock().await;
        until_no_conflict!(
            self,
            &live,
            guard,
            async {
                let Some(decision) = guard.state.decision().filter(|_| guard.state.is_delivering()) else {
                    return Ok(None);
                };
                if !self.owns(&live, guard.version) {
                    match self.store.claim(&guard).await? {
                        Some(version) => {
                            guard.version = version;
                            *crate::lock(&live.owned) = Some((version, self.store.node()));
                        }
                        None => return Ok(None),
                    }
                }
                let pending = guard
                    .participants
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.status == Phase2Status::Pending)
                    .map(|(i, p)| (i, p.clone()))
                    .collect();
                Ok(Some(DeliveryPlan { txn: id, decision, pending, trace: guard.trace.clone() }))
            }
            .await
        )
    }

    /// Records phase-2 progress (acknowledgements, failed attempts, giving
    /// up) reported by the delivery driver: all of `events` in one durable
    /// write, or none of them.
    pub async fn record_phase2(&self, id: TxnId, events: Vec<Event>) -> Result<TxnRecord> {
        self.transition(id, events).await
    }

    /// The one path for events that only change the record: lock, expire
    /// first if due (client decisions only), apply every event in order,
    /// write once, publish.
    pub(super) async fn transition(&self, id: TxnId, events: Vec<Event>) -> Result<TxnRecord> {
        match self.find(id).await? {
            Found::Live(live) => self.transition_on(&live, id, events).await,
            Found::Finished(txn) => self.apply_finished(txn, events),
        }
    }

    /// [`Engine::transition`] on a transaction already held.
    async fn transition_on(&self, live: &Held<'_>, id: TxnId, events: Vec<Event>) -> Result<TxnRecord> {
        let mut guard = live.record.lock().await;
        let decision = events.iter().any(|e| matches!(e, Event::Confirm | Event::Cancel { .. }));
        until_no_conflict!(
            self,
            &live,
            guard,
            async {
                if decision {
                    self.expire_if_due(live, &mut guard).await?;
                }
                let mut next = guard.clone();
                let now = self.clock.now_ms();
                let mut changed = false;
                for event in events.iter().cloned() {
                    changed |= apply(&mut next, event, now)? == Outcome::Changed;
                }
                if changed {
                    let was_active = guard.state == crate::model::TxnState::Active;
                    self.write(live, &mut guard, next, How::Update(None)).await?;
                    if was_active && guard.state.is_delivering() {
                        crate::failpoint::crash_point("after-decision");
                    }
                } else if decision && guard.state.is_delivering() {
                    // A repeated decision: the call that took it may have
                    // been cancelled between its durable write and handing
                    // the transaction to delivery. Starting a driver is
                    // idempotent.
                    let _ = self.to_deliver.send(id);
                }
                Ok(guard.clone())
            }
            .await
        )
    }
}

/// A finished record accepted an append or enlist: cannot happen (the
/// state machine refuses both outside ACTIVE).
pub(super) fn accepted_late(id: TxnId) -> Error {
    Error::Storage(format!("finished transaction {id} accepted a try-phase event"))
}
