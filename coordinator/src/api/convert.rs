//! Conversions between engine records and `tcc.v1` messages.

use tcc_proto::v1;

use crate::error::{Error, Result};
use crate::model::{CommandRecord, ParticipantRecord, Phase2Status, TxnRecord, TxnState};

/// Engine state to wire enum.
pub fn state(s: TxnState) -> v1::TransactionState {
    use v1::TransactionState as W;
    match s {
        TxnState::Active => W::Active,
        TxnState::Confirming => W::Confirming,
        TxnState::Confirmed => W::Confirmed,
        TxnState::Cancelling => W::Cancelling,
        TxnState::Cancelled => W::Cancelled,
        TxnState::FailedToConfirm => W::FailedToConfirm,
        TxnState::FailedToCancel => W::FailedToCancel,
    }
}

/// Wire enum (as sent, an i32) to engine state; `None` for UNSPECIFIED.
pub fn parse_state(field: &str, raw: i32) -> Result<Option<TxnState>> {
    use v1::TransactionState as W;
    let w = W::try_from(raw).map_err(|_| Error::invalid(format!("{field}: {raw} is not a TransactionState")))?;
    Ok(match w {
        W::Unspecified => None,
        W::Active => Some(TxnState::Active),
        W::Confirming => Some(TxnState::Confirming),
        W::Confirmed => Some(TxnState::Confirmed),
        W::Cancelling => Some(TxnState::Cancelling),
        W::Cancelled => Some(TxnState::Cancelled),
        W::FailedToConfirm => Some(TxnState::FailedToConfirm),
        W::FailedToCancel => Some(TxnState::FailedToCancel),
    })
}

/// Engine participant to wire participant.
pub fn participant(p: &ParticipantRecord) -> v1::TransactionParticipant {
    let status = match p.status {
        Phase2Status::Pending => v1::ParticipantStatus::Pending,
        Phase2Status::Acknowledged => v1::ParticipantStatus::Acknowledged,
        Phase2Status::Failed => v1::ParticipantStatus::Failed,
    };
    v1::TransactionParticipant {
        service: p.service.clone(),
        partial_id: p.partial_id.to_string(),
        status: status.into(),
        attempts: p.attempts,
        last_error: p.last_error.clone().unwrap_or_default(),
        next_attempt_unix_ms: if p.status == Phase2Status::Pending { p.next_attempt_ms } else { 0 },
        command_count: p.command_count,
        topic_bytes: p.topic_bytes,
    }
}

/// Engine record to wire transaction.
pub fn transaction(t: &TxnRecord) -> v1::Transaction {
    v1::Transaction {
        transaction_id: t.id.to_string(),
        state: state(t.state).into(),
        participants: t.participants.iter().map(participant).collect(),
        created_unix_ms: t.created_ms,
        deadline_unix_ms: t.deadline_ms,
        decided_unix_ms: t.decided_ms,
        finished_unix_ms: t.finished_ms,
        reason: t.reason.clone(),
        history: t
            .history
            .iter()
            .map(|h| v1::HistoryEntry { at_unix_ms: h.at_ms, state: state(h.state).into(), cause: h.cause.clone() })
            .collect(),
        owner: t.owner.clone(),
    }
}

/// Stored command to wire command.
pub fn command(c: CommandRecord) -> v1::StoredCommand {
    v1::StoredCommand { sequence: c.sequence, r#type: c.kind, key: c.key, payload: c.payload }
}
