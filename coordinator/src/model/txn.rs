//! The records of the bottom layer: a composite transaction, its
//! participants, the commands of their topics and append receipts.
//!
//! These are plain data. They change only through
//! [`apply`](super::machine::apply); the store persists them; the engine,
//! delivery and API read them. Every write of a [`TxnRecord`] is
//! conditional on its [`TxnRecord::version`] (see `store`).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::ids::{PartialId, TxnId};

/// The state of a composite transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TxnState {
    /// Open for appends and enlistments.
    Active,
    /// Confirm decided; commits being delivered.
    Confirming,
    /// Every participant acknowledged its commit.
    Confirmed,
    /// Cancel decided; rollbacks being delivered.
    Cancelling,
    /// Every participant acknowledged its rollback.
    Cancelled,
    /// Commit delivery failed for good; needs an operator.
    FailedToConfirm,
    /// Rollback delivery failed for good; needs an operator.
    FailedToCancel,
}

impl TxnState {
    /// Every state, in declaration order.
    pub const ALL: [TxnState; 7] = [
        TxnState::Active,
        TxnState::Confirming,
        TxnState::Confirmed,
        TxnState::Cancelling,
        TxnState::Cancelled,
        TxnState::FailedToConfirm,
        TxnState::FailedToCancel,
    ];

    /// CONFIRMED or CANCELLED: nothing more will happen; eligible for GC.
    pub fn is_finished(self) -> bool {
        matches!(self, TxnState::Confirmed | TxnState::Cancelled)
    }

    /// CONFIRMING or CANCELLING: phase-2 delivery is under way.
    pub fn is_delivering(self) -> bool {
        matches!(self, TxnState::Confirming | TxnState::Cancelling)
    }

    /// The decision taken, if any.
    pub fn decision(self) -> Option<Decision> {
        match self {
            TxnState::Active => None,
            TxnState::Confirming | TxnState::Confirmed | TxnState::FailedToConfirm => Some(Decision::Confirm),
            TxnState::Cancelling | TxnState::Cancelled | TxnState::FailedToCancel => Some(Decision::Cancel),
        }
    }
}

impl fmt::Display for TxnState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TxnState::Active => "ACTIVE",
            TxnState::Confirming => "CONFIRMING",
            TxnState::Confirmed => "CONFIRMED",
            TxnState::Cancelling => "CANCELLING",
            TxnState::Cancelled => "CANCELLED",
            TxnState::FailedToConfirm => "FAILED_TO_CONFIRM",
            TxnState::FailedToCancel => "FAILED_TO_CANCEL",
        })
    }
}

/// The phase-2 decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Apply every partial's commands.
    Confirm,
    /// Discard every partial's commands.
    Cancel,
}

/// The phase-2 status of one participant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase2Status {
    /// Not decided yet, or decided and not yet acknowledged.
    Pending,
    /// The participant acknowledged the decision.
    Acknowledged,
    /// The participant refused permanently or the retry budget ran out.
    Failed,
}

/// One participant service of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantRecord {
    /// The participant's service name.
    pub service: String,
    /// Its partial transaction id (the topic name).
    pub partial_id: PartialId,
    /// Phase-2 status for the current decision.
    pub status: Phase2Status,
    /// Phase-2 calls made for the current decision.
    pub attempts: u32,
    /// The last phase-2 error, if any.
    pub last_error: Option<String>,
    /// When the next phase-2 call is due (unix ms, 0 if none scheduled).
    pub next_attempt_ms: i64,
    /// Commands in the topic; the last sequence number handed out.
    pub command_count: u64,
    /// Bytes in the topic, as accounted by `validate::accounted_bytes`.
    pub topic_bytes: u64,
}

impl ParticipantRecord {
    /// A fresh participant with an empty topic.
    pub fn new(service: String, partial_id: PartialId) -> Self {
        ParticipantRecord {
            service,
            partial_id,
            status: Phase2Status::Pending,
            attempts: 0,
            last_error: None,
            next_attempt_ms: 0,
            command_count: 0,
            topic_bytes: 0,
        }
    }
}

/// A composite transaction as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRecord {
    /// The transaction id.
    pub id: TxnId,
    /// How many times the record was written: 1 when created, one more with
    /// every write. A store writes version N+1 only over version N, so of
    /// two writers that read the same version, exactly one wins. Kept by
    /// the store beside the record, not in its encoding.
    #[serde(skip)]
    pub version: u64,
    /// Current state.
    pub state: TxnState,
    /// Participants in enlistment order; service names are unique.
    pub participants: Vec<ParticipantRecord>,
    /// When Begin was accepted (unix ms).
    pub created_ms: i64,
    /// When an ACTIVE transaction is cancelled by the coordinator (unix ms).
    pub deadline_ms: i64,
    /// When the decision was taken (unix ms, 0 while ACTIVE).
    pub decided_ms: i64,
    /// When CONFIRMED/CANCELLED was reached (unix ms, 0 before).
    pub finished_ms: i64,
    /// Why it was cancelled; empty otherwise.
    pub reason: String,
    /// The identity that began it (see `auth`), empty when the coordinator
    /// ran without authorization. Encoded after the rest of the record by
    /// [`TxnRecord::encode`], so records written before owners existed
    /// still read (as unowned).
    #[serde(skip)]
    pub owner: String,
    /// Every change of state, and every operator action, oldest first (at
    /// most [`MAX_HISTORY`]: past that, the oldest after the first are
    /// dropped). Encoded after the owner by [`TxnRecord::encode`].
    #[serde(skip)]
    pub history: Vec<HistoryEntry>,
    /// The W3C trace context (`traceparent`) of the Begin call, when the
    /// caller sent one: phase-2 calls join that trace, after a restart
    /// too. Empty otherwise. Encoded after the history by
    /// [`TxnRecord::encode`].
    #[serde(skip)]
    pub trace: String,
}

/// The most history entries a transaction keeps.
pub const MAX_HISTORY: usize = 64;

/// One entry of a transaction's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When (unix ms).
    pub at_ms: i64,
    /// The state after it.
    pub state: TxnState,
    /// What happened, e.g. "confirm", "deadline exceeded", "orders
    /// acknowledged", "orders resolved by hand by ops: applied manually".
    pub cause: String,
}

impl TxnRecord {
    /// The stored encoding (without the version, which the store keeps
    /// beside it): postcard of the record; then, when it has an owner or a
    /// history, postcard of the owner; then, when it has a history,
    /// postcard of the history; then, when it has a trace context,
    /// postcard of that. Records written before owners and histories
    /// existed are just the first part.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let encode_error = |e: postcard::Error| format!("cannot encode record: {e}");
        let mut out = postcard::to_stdvec(self).map_err(encode_error)?;
        let (trace, history) = (!self.trace.is_empty(), !self.history.is_empty() || !self.trace.is_empty());
        if !self.owner.is_empty() || history {
            out.extend(postcard::to_stdvec(&self.owner).map_err(encode_error)?);
        }
        if history {
            out.extend(postcard::to_stdvec(&self.history).map_err(encode_error)?);
        }
        if trace {
            out.extend(postcard::to_stdvec(&self.trace).map_err(encode_error)?);
        }
        Ok(out)
    }

    /// Reads what [`TxnRecord::encode`] wrote; `bytes` must hold exactly
    /// that. The version is left at 0 for the store to set.
    pub fn decode(bytes: &[u8]) -> Result<TxnRecord, String> {
        let (mut txn, tail): (TxnRecord, _) = postcard::take_from_bytes(bytes).map_err(|e| e.to_string())?;
        if tail.is_empty() {
            return Ok(txn);
        }
        let (owner, rest): (String, _) =
            postcard::take_from_bytes(tail).map_err(|e| format!("unreadable owner: {e}"))?;
        txn.owner = owner;
        if !rest.is_empty() {
            let (history, rest): (Vec<HistoryEntry>, _) =
                postcard::take_from_bytes(rest).map_err(|e| format!("unreadable history: {e}"))?;
            txn.history = history;
            if !rest.is_empty() {
                let (trace, rest): (String, _) =
                    postcard::take_from_bytes(rest).map_err(|e| format!("unreadable trace context: {e}"))?;
                if !rest.is_empty() {
                    return Err(format!("{} trailing bytes", rest.len()));
                }
                // Never written empty: an empty one is damage.
                if trace.is_empty() {
                    return Err("an empty trace context".to_string());
                }
                txn.trace = trace;
            }
        }
        Ok(txn)
    }

    /// Adds a history entry for the current state (see
    /// [`TxnRecord::history`] for the bound).
    pub fn record(&mut self, at_ms: i64, cause: impl Into<String>) {
        if self.history.len() >= MAX_HISTORY {
            self.history.remove(1);
        }
        self.history.push(HistoryEntry { at_ms, state: self.state, cause: cause.into() });
    }

    /// A new ACTIVE transaction.
    pub fn new(id: TxnId, participants: Vec<ParticipantRecord>, now_ms: i64, deadline_ms: i64) -> Self {
        TxnRecord {
            id,
            version: 0,
            state: TxnState::Active,
            participants,
            created_ms: now_ms,
            deadline_ms,
            decided_ms: 0,
            finished_ms: 0,
            reason: String::new(),
            owner: String::new(),
            history: vec![HistoryEntry { at_ms: now_ms, state: TxnState::Active, cause: "begun".to_string() }],
            trace: String::new(),
        }
    }

    /// The index of the participant with this partial id.
    pub fn participant_index(&self, partial: PartialId) -> Option<usize> {
        self.participants.iter().position(|p| p.partial_id == partial)
    }

    /// The latest time the record holds: its creation, decision, finish,
    /// or the last entry of its history.
    pub fn latest_ms(&self) -> i64 {
        let last = self.history.last().map_or(0, |h| h.at_ms);
        self.created_ms.max(self.decided_ms).max(self.finished_ms).max(last)
    }

    /// ACTIVE and at or past its deadline.
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.state == TxnState::Active && now_ms >= self.deadline_ms
    }

    /// While CONFIRMING/CANCELLING: when the earliest pending participant's
    /// next phase-2 call is due (unix ms). `None` in any other state.
    pub fn delivery_due_ms(&self) -> Option<i64> {
        if !self.state.is_delivering() {
            return None;
        }
        self.participants.iter().filter(|p| p.status == Phase2Status::Pending).map(|p| p.next_attempt_ms).min()
    }
}

/// The reason recorded when the deadline cancels a transaction.
pub const DEADLINE_REASON: &str = "deadline exceeded";

/// A command as stored in a topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// Position in its topic, from 1, without gaps.
    pub sequence: u64,
    /// The command type name.
    pub kind: String,
    /// The entity key (may be empty).
    pub key: String,
    /// The opaque payload.
    pub payload: Vec<u8>,
}

/// What an append stored; returned again for a retried idempotent append.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendReceipt {
    /// Sequence of the batch's first command.
    pub first_sequence: u64,
    /// Sequence of the batch's last command.
    pub last_sequence: u64,
    /// Accounted bytes of the batch.
    pub bytes: u64,
    /// Digest of the batch's content (the first 8 bytes of a SHA-256 over
    /// every command), so a key reused for another batch is detected.
    pub digest: u64,
}

/// A participant endpoint registered through `Registry.Register`, with its
/// lease. Stored, so that a restart keeps it and every coordinator of a
/// cluster sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The participant's service name.
    pub service: String,
    /// Where an instance of it listens (http(s)://host:port).
    pub endpoint: String,
    /// When the lease ends unless renewed (unix ms).
    pub expires_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> TxnRecord {
        TxnRecord::new(TxnId::new(), vec![ParticipantRecord::new("a".into(), PartialId::new())], 1, 2)
    }

    #[test]
    fn owner_and_history_are_encoded_after_the_record_and_old_records_read_without() -> Result<(), String> {
        let mut t = record();
        t.history.clear();
        // A record written before owners existed is exactly postcard(t).
        let old = postcard::to_stdvec(&t).map_err(|e| e.to_string())?;
        assert_eq!(t.encode()?, old);
        let back = TxnRecord::decode(&old)?;
        assert_eq!((back.owner.as_str(), back.history.len()), ("", 0));
        // Owner only (as written before histories existed).
        t.owner = "shop".into();
        let owned = t.encode()?;
        assert_eq!(TxnRecord::decode(&owned)?, t);
        // Owner and history, and a history without an owner.
        t.record(5, "confirm");
        assert_eq!(TxnRecord::decode(&t.encode()?)?, t);
        t.owner.clear();
        let new = t.encode()?;
        assert_eq!(TxnRecord::decode(&new)?, t);
        // Anything after the history is damage, not ignored.
        let mut longer = new.clone();
        longer.push(0);
        assert!(TxnRecord::decode(&longer).is_err());
        // A trace context comes after the history, with or without an owner.
        t.trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into();
        let traced = t.encode()?;
        assert_eq!(TxnRecord::decode(&traced)?, t);
        t.owner = "shop".into();
        assert_eq!(TxnRecord::decode(&t.encode()?)?, t);
        let mut longer = traced.clone();
        longer.push(0);
        assert!(TxnRecord::decode(&longer).is_err());
        // Records written before trace contexts read without one.
        t.trace.clear();
        assert_eq!(TxnRecord::decode(&t.encode()?)?.trace, "");
        Ok(())
    }

    #[test]
    fn history_is_bounded_and_keeps_its_first_entry() {
        let mut t = record();
        for i in 0..(MAX_HISTORY as i64 * 2) {
            t.record(10 + i, format!("e{i}"));
        }
        assert_eq!(t.history.len(), MAX_HISTORY);
        assert_eq!(t.history[0].cause, "begun");
        assert_eq!(t.history.last().map(|h| h.at_ms), Some(10 + MAX_HISTORY as i64 * 2 - 1));
    }
}
