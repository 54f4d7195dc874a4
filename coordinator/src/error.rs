//! The coordinator's one error type.
//!
//! Every fallible operation of the library returns [`Error`]. It depends on
//! the model layer only (no engine, no store backend, no transport); the
//! single mapping to gRPC status codes lives with the API
//! (`api::status`), so the code a client sees for a given failure is
//! decided in one place:
//!
//! | variant              | code                |
//! |----------------------|---------------------|
//! | `InvalidArgument`    | INVALID_ARGUMENT    |
//! | `NotFound`           | NOT_FOUND           |
//! | `IllegalTransition`  | FAILED_PRECONDITION |
//! | `LimitExceeded`      | RESOURCE_EXHAUSTED  |
//! | `Conflict`           | ABORTED             |  (lost a race with another writer; safe to retry)
//! | `Unavailable`        | UNAVAILABLE         |  (the store failed a flush; the database is unreachable)
//! | `Fenced`             | UNAVAILABLE         |  (this node's lease lapsed, or another node owns the work)
//! | `Unauthenticated`    | UNAUTHENTICATED     |  (no identity, or one that does not hold up)
//! | `PermissionDenied`   | PERMISSION_DENIED   |  (a known identity the policy does not allow)
//! | `Corrupt`            | DATA_LOSS           |
//! | `Storage`            | INTERNAL            |

use crate::model::{BadId, PartialId, Refusal, TxnId, TxnState};

/// Result with the coordinator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A transaction that does not exist: also the answer to a caller that
    /// may not read one that does, so that it learns nothing of it.
    pub fn txn_not_found(id: TxnId) -> Error {
        Error::NotFound(format!("transaction {id} not found (never begun, or garbage-collected)"))
    }

    /// A partial transaction that does not exist; also the answer to a
    /// service that it does not belong to.
    pub fn partial_not_found(partial: PartialId) -> Error {
        Error::NotFound(format!("partial transaction {partial} not found"))
    }
}

/// Everything that can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or breaks a per-request limit.
    #[error("{0}")]
    InvalidArgument(String),
    /// The transaction, partial transaction or endpoint does not exist (or
    /// was garbage-collected).
    #[error("{0}")]
    NotFound(String),
    /// The requested move is not allowed in the transaction's current state.
    #[error("cannot {action} transaction {txn}: it is {state}{detail}")]
    IllegalTransition {
        /// What was attempted ("confirm", "append to", ...).
        action: &'static str,
        /// The transaction id.
        txn: String,
        /// The state it is in.
        state: TxnState,
        /// Extra context, e.g. " (reason: deadline exceeded)"; may be empty.
        detail: String,
    },
    /// A cumulative limit (bytes per topic, participants per transaction)
    /// would be exceeded. Not transient: retrying the same call fails again.
    #[error("{0}")]
    LimitExceeded(String),
    /// A conditional write lost: the stored record is no longer the version
    /// the writer read (another writer, or a writer that was fenced off,
    /// got there first). The engine reloads and decides again; a client
    /// that sees it may retry.
    #[error("transaction {txn} was changed concurrently (expected version {expected}, found {found})")]
    Conflict {
        /// The transaction.
        txn: TxnId,
        /// The version the writer based its change on (0 = expected absent).
        expected: u64,
        /// The version in the store (0 = absent).
        found: u64,
    },
    /// The coordinator is shutting down or its store cannot take writes.
    #[error("{0}")]
    Unavailable(String),
    /// A cluster store refused a write because this coordinator may not
    /// make it: its lease in the database lapsed (it was paused or cut off
    /// for longer than the lease), or another live coordinator is
    /// delivering the transaction. Nothing was written; safe to retry.
    #[error("{0}")]
    Fenced(String),
    /// The request carries no identity, or one that does not hold up
    /// (see `auth`).
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's identity is known and the policy does not allow the
    /// request.
    #[error("{0}")]
    PermissionDenied(String),
    /// A stored record cannot be decoded: the data directory is damaged.
    #[error("corrupt record {key}: {cause}")]
    Corrupt {
        /// Which record (key kind and id).
        key: String,
        /// What the decoder said.
        cause: String,
    },
    /// The store failed (I/O error, flush failure).
    #[error("storage error: {0}")]
    Storage(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Illegal { action, txn, state, reason } => Error::IllegalTransition {
                action,
                txn: txn.to_string(),
                state,
                detail: if reason.is_empty() { String::new() } else { format!(" (reason: {reason})") },
            },
            r @ Refusal::NoParticipant { .. } => Error::NotFound(r.to_string()),
        }
    }
}

impl From<BadId> for Error {
    fn from(b: BadId) -> Self {
        Error::InvalidArgument(b.0)
    }
}
