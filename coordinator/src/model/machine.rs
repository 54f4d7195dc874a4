//! The transaction record and its state machine.
//!
//! ```text
//!            confirm                 all acknowledged
//!   ACTIVE ───────────▶ CONFIRMING ───────────────────▶ CONFIRMED
//!     │                   │   ▲
//!     │                   │   │ retry (admin)
//!     │                   ▼   │
//!     │               FAILED_TO_CONFIRM   (a participant refused, or the
//!     │                                    retry budget ran out)
//!     │ cancel / deadline       all acknowledged
//!     └─────────────────▶ CANCELLING ───────────────────▶ CANCELLED
//!                         │   ▲
//!                         ▼   │ retry (admin)
//!                     FAILED_TO_CANCEL
//! ```
//!
//! An operator may also resolve a failed participant by hand (it counts as
//! acknowledged: once no participant is failed, FAILED_TO_CONFIRM becomes
//! CONFIRMED and FAILED_TO_CANCEL CANCELLED), and skip the backoff of
//! pending ones (deliver now).
//!
//! [`apply`] is the only place where a [`TxnRecord`] changes. It is pure (no
//! I/O, time passed in), checks the current state for every [`Event`], and
//! answers with a typed [`Refusal`] for an illegal move. The engine persists the
//! record when `apply` reports [`Outcome::Changed`].
//!
//! Invariants kept here:
//! * the decision is final: once CONFIRMING, the transaction never reaches a
//!   CANCEL* state and vice versa;
//! * appends and enlistments only while ACTIVE;
//! * repeating a decision that was already taken is not an error
//!   ([`Outcome::Unchanged`]), so retried Confirm/Cancel calls are safe;
//! * a transaction finishes exactly when no participant is pending: all
//!   acknowledged gives CONFIRMED/CANCELLED, any failed gives FAILED_TO_*;
//! * every change of state, and every operator action, adds an entry to the
//!   transaction's history, with the time and the cause.

use super::ids::{PartialId, TxnId};
use super::txn::{DEADLINE_REASON, Decision, ParticipantRecord, Phase2Status, TxnRecord, TxnState};

/// Why [`apply`] refused an event; the record is left untouched.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The event is not allowed in the transaction's current state.
    #[error("cannot {action} transaction {txn}: it is {state}{}", reason_suffix(reason))]
    Illegal {
        /// What was attempted ("confirm", "append to", ...).
        action: &'static str,
        /// The transaction.
        txn: TxnId,
        /// The state it is in.
        state: TxnState,
        /// Why it was cancelled, if it was (may be empty).
        reason: String,
    },
    /// The event names a participant index the transaction does not have.
    #[error("transaction {txn} has no participant #{index}")]
    NoParticipant {
        /// The transaction.
        txn: TxnId,
        /// The index asked for.
        index: usize,
    },
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() { String::new() } else { format!(" (reason: {reason})") }
}

/// Something that happens to a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A participant joins (ACTIVE only).
    Enlist {
        /// Its service name (already validated).
        service: String,
        /// Its new partial id.
        partial_id: PartialId,
    },
    /// A batch of commands is appended to participant `participant`'s topic.
    Append {
        /// Index into `participants`.
        participant: usize,
        /// Number of commands.
        commands: u64,
        /// Accounted bytes (`validate::accounted_bytes`).
        bytes: u64,
    },
    /// The composite service decides confirm.
    Confirm,
    /// The composite service decides cancel.
    Cancel {
        /// Why (may be empty).
        reason: String,
    },
    /// The deadline passed (applied by the sweeper, or before any client
    /// event that finds the transaction expired).
    Expire,
    /// Participant `participant` acknowledged the decision.
    Delivered {
        /// Index into `participants`.
        participant: usize,
    },
    /// A phase-2 call failed transiently and will be retried.
    AttemptFailed {
        /// Index into `participants`.
        participant: usize,
        /// What went wrong.
        error: String,
        /// When the next attempt is due (unix ms).
        next_attempt_ms: i64,
    },
    /// A phase-2 call was refused permanently, or the budget ran out.
    GaveUp {
        /// Index into `participants`.
        participant: usize,
        /// What went wrong.
        error: String,
    },
    /// An operator resumes delivery of a FAILED_TO_* transaction.
    Retry {
        /// Who (an identity; empty when the coordinator runs open).
        by: String,
    },
    /// An operator marks failed participant `participant` of a FAILED_TO_*
    /// transaction as done by hand.
    Resolve {
        /// Index into `participants`.
        participant: usize,
        /// Why, e.g. "applied manually in the ledger".
        reason: String,
        /// Who (an identity; empty when the coordinator runs open).
        by: String,
    },
    /// An operator asks for the pending participants of a delivering
    /// transaction to be called now, skipping their backoff.
    DeliverNow,
}

impl Event {
    /// The verb used in error messages.
    fn action(&self) -> &'static str {
        match self {
            Event::Enlist { .. } => "enlist into",
            Event::Append { .. } => "append to",
            Event::Confirm => "confirm",
            Event::Cancel { .. } => "cancel",
            Event::Expire => "expire",
            Event::Delivered { .. } | Event::AttemptFailed { .. } | Event::GaveUp { .. } => {
                "record phase-2 progress of"
            }
            Event::Retry { .. } => "retry",
            Event::Resolve { .. } => "resolve a participant of",
            Event::DeliverNow => "deliver now",
        }
    }

    /// The history entry's cause, if the event is worth one when it changes
    /// the state (or always, for operator actions).
    fn cause(&self, txn: &TxnRecord) -> String {
        let service = |i: &usize| txn.participants.get(*i).map(|p| p.service.as_str()).unwrap_or("?");
        let by = |by: &str| if by.is_empty() { String::new() } else { format!(" by {by}") };
        match self {
            Event::Confirm => "confirm".to_string(),
            Event::Cancel { reason } if reason.is_empty() => "cancel".to_string(),
            Event::Cancel { reason } => format!("cancel: {reason}"),
            Event::Expire => DEADLINE_REASON.to_string(),
            Event::Delivered { participant } => format!("{} acknowledged", service(participant)),
            Event::GaveUp { participant, error } => format!("{} failed: {error}", service(participant)),
            Event::Retry { by: who } => format!("operator retry{}", by(who)),
            Event::Resolve { participant, reason, by: who } => {
                format!("{} resolved by hand{}: {reason}", service(participant), by(who))
            }
            Event::DeliverNow => "deliver now".to_string(),
            Event::Enlist { .. } | Event::Append { .. } | Event::AttemptFailed { .. } => String::new(),
        }
    }

    /// Operator actions are kept in the history even when the state stays.
    fn is_operator_action(&self) -> bool {
        matches!(self, Event::Retry { .. } | Event::Resolve { .. } | Event::DeliverNow)
    }
}

/// What [`apply`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The record changed and must be persisted.
    Changed,
    /// Nothing to do (a repeated decision, a late expiry): not an error.
    Unchanged,
}

/// Applies `event` to `txn` at time `now_ms`: the one function that moves a
/// transaction. On error `txn` is left untouched.
pub fn apply(txn: &mut TxnRecord, event: Event, now_ms: i64) -> Result<Outcome, Refusal> {
    let before = txn.state;
    let (cause, operator) = (event.cause(txn), event.is_operator_action());
    let outcome = step(txn, event, now_ms)?;
    if outcome == Outcome::Changed && (txn.state != before || operator) {
        txn.record(now_ms, cause);
    }
    Ok(outcome)
}

/// [`apply`] without the history.
fn step(txn: &mut TxnRecord, event: Event, now_ms: i64) -> Result<Outcome, Refusal> {
    use TxnState::*;
    let illegal = |txn: &TxnRecord, event: &Event| {
        Err(Refusal::Illegal { action: event.action(), txn: txn.id, state: txn.state, reason: txn.reason.clone() })
    };

    match (txn.state, event) {
        // --- try phase --------------------------------------------------
        (Active, Event::Enlist { service, partial_id }) => {
            txn.participants.push(ParticipantRecord::new(service, partial_id));
            Ok(Outcome::Changed)
        }
        (Active, Event::Append { participant, commands, bytes }) => {
            let Some(p) = txn.participants.get_mut(participant) else {
                return Err(Refusal::NoParticipant { txn: txn.id, index: participant });
            };
            p.command_count += commands;
            p.topic_bytes += bytes;
            Ok(Outcome::Changed)
        }

        // --- decisions ----------------------------------------------------
        (Active, Event::Confirm) => {
            decide(txn, Confirming, String::new(), now_ms);
            Ok(Outcome::Changed)
        }
        (Active, Event::Cancel { reason }) => {
            decide(txn, Cancelling, reason, now_ms);
            Ok(Outcome::Changed)
        }
        (Active, Event::Expire) => {
            if now_ms < txn.deadline_ms {
                return Ok(Outcome::Unchanged);
            }
            decide(txn, Cancelling, DEADLINE_REASON.to_string(), now_ms);
            Ok(Outcome::Changed)
        }
        (Confirming | Confirmed | FailedToConfirm, Event::Confirm) => Ok(Outcome::Unchanged),
        (Cancelling | Cancelled | FailedToCancel, Event::Cancel { .. }) => Ok(Outcome::Unchanged),
        // The sweeper may race a decision; a decided transaction has no deadline.
        (_, Event::Expire) => Ok(Outcome::Unchanged),

        // --- phase 2 ------------------------------------------------------
        (Confirming | Cancelling, Event::Delivered { participant }) => {
            let Some(p) = txn.participants.get_mut(participant) else {
                return illegal(txn, &Event::Delivered { participant });
            };
            if p.status == Phase2Status::Acknowledged {
                return Ok(Outcome::Unchanged);
            }
            p.status = Phase2Status::Acknowledged;
            p.attempts += 1;
            p.next_attempt_ms = 0;
            finish_if_resolved(txn, now_ms);
            Ok(Outcome::Changed)
        }
        (Confirming | Cancelling, Event::AttemptFailed { participant, error, next_attempt_ms }) => {
            let Some(p) = txn.participants.get_mut(participant) else {
                return illegal(txn, &Event::Delivered { participant });
            };
            if p.status != Phase2Status::Pending {
                return Ok(Outcome::Unchanged);
            }
            p.attempts += 1;
            p.last_error = Some(error);
            p.next_attempt_ms = next_attempt_ms;
            Ok(Outcome::Changed)
        }
        (Confirming | Cancelling, Event::GaveUp { participant, error }) => {
            let Some(p) = txn.participants.get_mut(participant) else {
                return illegal(txn, &Event::Delivered { participant });
            };
            if p.status != Phase2Status::Pending {
                return Ok(Outcome::Unchanged);
            }
            p.status = Phase2Status::Failed;
            p.attempts += 1;
            p.last_error = Some(error);
            p.next_attempt_ms = 0;
            finish_if_resolved(txn, now_ms);
            Ok(Outcome::Changed)
        }

        // --- operator -----------------------------------------------------
        (FailedToConfirm | FailedToCancel, Event::Retry { .. }) => {
            txn.state = if txn.state == FailedToConfirm { Confirming } else { Cancelling };
            for p in &mut txn.participants {
                if p.status == Phase2Status::Failed {
                    p.status = Phase2Status::Pending;
                    p.attempts = 0;
                    p.next_attempt_ms = 0;
                }
            }
            Ok(Outcome::Changed)
        }
        (FailedToConfirm | FailedToCancel, Event::Resolve { participant, .. }) => {
            let Some(p) = txn.participants.get_mut(participant) else {
                return Err(Refusal::NoParticipant { txn: txn.id, index: participant });
            };
            if p.status != Phase2Status::Failed {
                // Only a failed participant is resolved by hand.
                let why = format!("participant {:?} has not failed", p.service);
                return Err(Refusal::Illegal {
                    action: "resolve a participant of",
                    txn: txn.id,
                    state: txn.state,
                    reason: why,
                });
            }
            p.status = Phase2Status::Acknowledged;
            p.next_attempt_ms = 0;
            finish_if_resolved(txn, now_ms);
            Ok(Outcome::Changed)
        }
        (Confirming | Cancelling, Event::DeliverNow) => {
            let mut any = false;
            for p in txn.participants.iter_mut().filter(|p| p.status == Phase2Status::Pending) {
                p.next_attempt_ms = now_ms;
                any = true;
            }
            Ok(if any { Outcome::Changed } else { Outcome::Unchanged })
        }

        (_, event) => illegal(txn, &event),
    }
}

/// Takes the decision: every participant becomes pending for it.
fn decide(txn: &mut TxnRecord, state: TxnState, reason: String, now_ms: i64) {
    txn.state = state;
    txn.reason = reason;
    txn.decided_ms = now_ms;
    for p in &mut txn.participants {
        p.status = Phase2Status::Pending;
        p.attempts = 0;
        p.last_error = None;
        p.next_attempt_ms = now_ms;
    }
}

/// Moves a delivering transaction to its end state once no participant is
/// pending.
fn finish_if_resolved(txn: &mut TxnRecord, now_ms: i64) {
    if txn.participants.iter().any(|p| p.status == Phase2Status::Pending) {
        return;
    }
    let failed = txn.participants.iter().any(|p| p.status == Phase2Status::Failed);
    txn.state = match (txn.state.decision(), failed) {
        (Some(Decision::Confirm), false) => TxnState::Confirmed,
        (Some(Decision::Confirm), true) => TxnState::FailedToConfirm,
        (_, false) => TxnState::Cancelled,
        (_, true) => TxnState::FailedToCancel,
    };
    if txn.state.is_finished() {
        txn.finished_ms = now_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000_000;

    fn txn_in(state: TxnState) -> TxnRecord {
        let parts = vec![
            ParticipantRecord::new("a".into(), PartialId::new()),
            ParticipantRecord::new("b".into(), PartialId::new()),
        ];
        let mut t = TxnRecord::new(TxnId::new(), parts, NOW - 10, NOW + 1000);
        match state {
            TxnState::Active => {}
            TxnState::Confirming => decide(&mut t, TxnState::Confirming, String::new(), NOW),
            TxnState::Cancelling => decide(&mut t, TxnState::Cancelling, "r".into(), NOW),
            TxnState::Confirmed | TxnState::Cancelled => {
                let d = if state == TxnState::Confirmed { TxnState::Confirming } else { TxnState::Cancelling };
                decide(&mut t, d, String::new(), NOW);
                for p in &mut t.participants {
                    p.status = Phase2Status::Acknowledged;
                }
                t.state = state;
                t.finished_ms = NOW;
            }
            TxnState::FailedToConfirm | TxnState::FailedToCancel => {
                let d = if state == TxnState::FailedToConfirm { TxnState::Confirming } else { TxnState::Cancelling };
                decide(&mut t, d, String::new(), NOW);
                t.participants[0].status = Phase2Status::Acknowledged;
                t.participants[1].status = Phase2Status::Failed;
                t.state = state;
            }
        }
        t
    }

    fn events() -> Vec<Event> {
        vec![
            Event::Enlist { service: "c".into(), partial_id: PartialId::new() },
            Event::Append { participant: 0, commands: 2, bytes: 10 },
            Event::Confirm,
            Event::Cancel { reason: "why".into() },
            Event::Expire,
            Event::Delivered { participant: 0 },
            Event::AttemptFailed { participant: 0, error: "down".into(), next_attempt_ms: NOW + 5 },
            Event::GaveUp { participant: 0, error: "refused".into() },
            Event::Retry { by: String::new() },
            Event::Resolve { participant: 1, reason: "done by hand".into(), by: "ops".into() },
            Event::DeliverNow,
        ]
    }

    /// What each (state, event) pair must do: the full transition table.
    /// `Ok(state)` = accepted and leads to `state`; `Err(())` = illegal.
    fn expected(state: TxnState, event: &Event) -> Result<TxnState, ()> {
        use TxnState::*;
        match (state, event) {
            (Active, Event::Enlist { .. } | Event::Append { .. }) => Ok(Active),
            (Active, Event::Confirm) => Ok(Confirming),
            (Active, Event::Cancel { .. }) => Ok(Cancelling),
            (Active, Event::Expire) => Ok(Active), // not yet due at NOW
            (s, Event::Expire) => Ok(s),
            (Confirming | Confirmed | FailedToConfirm, Event::Confirm) => Ok(state),
            (Cancelling | Cancelled | FailedToCancel, Event::Cancel { .. }) => Ok(state),
            // one of two participants resolved: still delivering
            (Confirming | Cancelling, Event::Delivered { .. } | Event::AttemptFailed { .. } | Event::GaveUp { .. }) => {
                Ok(state)
            }
            (FailedToConfirm, Event::Retry { .. }) => Ok(Confirming),
            (FailedToCancel, Event::Retry { .. }) => Ok(Cancelling),
            // participant 1 is the failed one; resolving it finishes
            (FailedToConfirm, Event::Resolve { .. }) => Ok(Confirmed),
            (FailedToCancel, Event::Resolve { .. }) => Ok(Cancelled),
            (Confirming | Cancelling, Event::DeliverNow) => Ok(state),
            _ => Err(()),
        }
    }

    #[test]
    fn every_state_and_event_follows_the_table() {
        for state in TxnState::ALL {
            for event in events() {
                let mut txn = txn_in(state);
                let before = txn.clone();
                let got = apply(&mut txn, event.clone(), NOW);
                match (expected(state, &event), got) {
                    (Ok(next), Ok(_)) => assert_eq!(txn.state, next, "{state} + {event:?}"),
                    (Err(()), Err(Refusal::Illegal { state: s, .. })) => {
                        assert_eq!(s, state);
                        assert_eq!(txn, before, "a refused event must not change the record");
                    }
                    (want, got) => panic!("{state} + {event:?}: expected {want:?}, got {got:?}"),
                }
            }
        }
    }

    #[test]
    fn history_records_state_changes_and_operator_actions_with_their_cause() {
        let mut txn = txn_in(TxnState::Active);
        assert_eq!(txn.history.len(), 1);
        apply(&mut txn, Event::Append { participant: 0, commands: 1, bytes: 1 }, NOW).ok();
        assert_eq!(txn.history.len(), 1, "an append is not a change of state");
        apply(&mut txn, Event::Confirm, NOW + 1).ok();
        apply(&mut txn, Event::Delivered { participant: 0 }, NOW + 2).ok();
        apply(&mut txn, Event::GaveUp { participant: 1, error: "refused: no".into() }, NOW + 3).ok();
        // Only participant 1 failed: resolving participant 0 is refused, naming it.
        let err = apply(&mut txn, Event::Resolve { participant: 0, reason: "x".into(), by: "ops".into() }, NOW + 4);
        assert!(err.is_err_and(|e| e.to_string().contains("participant \"a\" has not failed")));
        apply(
            &mut txn,
            Event::Resolve { participant: 1, reason: "applied in the ledger".into(), by: "ops".into() },
            NOW + 5,
        )
        .ok();
        let seen: Vec<(i64, TxnState, &str)> =
            txn.history.iter().map(|h| (h.at_ms, h.state, h.cause.as_str())).collect();
        assert_eq!(
            seen,
            vec![
                (NOW - 10, TxnState::Active, "begun"),
                (NOW + 1, TxnState::Confirming, "confirm"),
                (NOW + 3, TxnState::FailedToConfirm, "b failed: refused: no"),
                (NOW + 5, TxnState::Confirmed, "b resolved by hand by ops: applied in the ledger"),
            ]
        );
        assert_eq!(txn.finished_ms, NOW + 5);
    }

    #[test]
    fn illegal_move_names_the_state_and_reason() {
        let mut txn = txn_in(TxnState::Active);
        apply(&mut txn, Event::Expire, NOW + 1000).ok();
        let err = apply(&mut txn, Event::Confirm, NOW + 1001).err().map(|e| e.to_string());
        let msg = err.unwrap_or_default();
        assert!(msg.contains("CANCELLING") && msg.contains("deadline exceeded"), "{msg}");
    }

    #[test]
    fn repeated_decision_is_unchanged() {
        let mut txn = txn_in(TxnState::Active);
        assert_eq!(apply(&mut txn, Event::Confirm, NOW).ok(), Some(Outcome::Changed));
        assert_eq!(apply(&mut txn, Event::Confirm, NOW).ok(), Some(Outcome::Unchanged));
        assert!(apply(&mut txn, Event::Cancel { reason: String::new() }, NOW).is_err());
    }

    #[test]
    fn expire_only_at_deadline() {
        let mut txn = txn_in(TxnState::Active);
        let deadline = txn.deadline_ms;
        assert_eq!(apply(&mut txn, Event::Expire, deadline - 1).ok(), Some(Outcome::Unchanged));
        assert_eq!(txn.state, TxnState::Active);
        assert_eq!(apply(&mut txn, Event::Expire, deadline).ok(), Some(Outcome::Changed));
        assert_eq!(txn.state, TxnState::Cancelling);
        assert_eq!(txn.reason, DEADLINE_REASON);
    }

    #[test]
    fn all_acknowledged_finishes() {
        for (decision, done) in
            [(Event::Confirm, TxnState::Confirmed), (Event::Cancel { reason: String::new() }, TxnState::Cancelled)]
        {
            let mut txn = txn_in(TxnState::Active);
            apply(&mut txn, decision, NOW).ok();
            apply(&mut txn, Event::Delivered { participant: 0 }, NOW + 1).ok();
            assert!(txn.state.is_delivering());
            // a duplicate acknowledgement changes nothing
            assert_eq!(apply(&mut txn, Event::Delivered { participant: 0 }, NOW + 1).ok(), Some(Outcome::Unchanged));
            apply(&mut txn, Event::Delivered { participant: 1 }, NOW + 2).ok();
            assert_eq!(txn.state, done);
            assert_eq!(txn.finished_ms, NOW + 2);
        }
    }

    #[test]
    fn a_failed_participant_fails_the_transaction_and_retry_resumes() {
        let mut txn = txn_in(TxnState::Active);
        apply(&mut txn, Event::Confirm, NOW).ok();
        apply(&mut txn, Event::AttemptFailed { participant: 1, error: "x".into(), next_attempt_ms: NOW + 9 }, NOW).ok();
        assert_eq!(txn.participants[1].attempts, 1);
        apply(&mut txn, Event::GaveUp { participant: 1, error: "refused".into() }, NOW).ok();
        assert_eq!(txn.state, TxnState::Confirming, "participant 0 still pending");
        apply(&mut txn, Event::Delivered { participant: 0 }, NOW).ok();
        assert_eq!(txn.state, TxnState::FailedToConfirm);
        assert_eq!(txn.finished_ms, 0);
        apply(&mut txn, Event::Retry { by: String::new() }, NOW).ok();
        assert_eq!(txn.state, TxnState::Confirming);
        assert_eq!(txn.participants[1].status, Phase2Status::Pending);
        assert_eq!(txn.participants[1].attempts, 0);
        assert_eq!(txn.participants[0].status, Phase2Status::Acknowledged, "acknowledged stays acknowledged");
    }

    #[test]
    fn append_counts_commands_and_bytes() {
        let mut txn = txn_in(TxnState::Active);
        apply(&mut txn, Event::Append { participant: 1, commands: 3, bytes: 30 }, NOW).ok();
        apply(&mut txn, Event::Append { participant: 1, commands: 2, bytes: 5 }, NOW).ok();
        assert_eq!((txn.participants[1].command_count, txn.participants[1].topic_bytes), (5, 35));
        let bad = apply(&mut txn, Event::Append { participant: 7, commands: 1, bytes: 1 }, NOW);
        assert!(matches!(bad, Err(Refusal::NoParticipant { index: 7, .. })));
    }
}
