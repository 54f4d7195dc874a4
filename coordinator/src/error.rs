//! The coordinator's one error type and its mapping to gRPC status codes.
//!
//! Every fallible operation of the library returns [`Error`]. The gRPC layer
//! converts it with the single `From<Error> for tonic::Status` below, so the
//! code a client sees for a given failure is decided here and nowhere else:
//!
//! | variant              | code                |
//! |----------------------|---------------------|
//! | `InvalidArgument`    | INVALID_ARGUMENT    |
//! | `NotFound`           | NOT_FOUND           |
//! | `IllegalTransition`  | FAILED_PRECONDITION |
//! | `LimitExceeded`      | RESOURCE_EXHAUSTED  |
//! | `Unavailable`        | UNAVAILABLE         |  (the store failed a flush)
//! | `Corrupt`            | DATA_LOSS           |
//! | `Storage`            | INTERNAL            |

use crate::engine::state::TxnState;

/// Result with the coordinator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

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
    /// The coordinator is shutting down or its store cannot take writes.
    #[error("{0}")]
    Unavailable(String),
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

impl From<sled::Error> for Error {
    fn from(err: sled::Error) -> Self {
        Error::Storage(err.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let msg = err.to_string();
        match err {
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::IllegalTransition { .. } => tonic::Status::failed_precondition(msg),
            Error::LimitExceeded(_) => tonic::Status::resource_exhausted(msg),
            Error::Unavailable(_) => tonic::Status::unavailable(msg),
            Error::Corrupt { .. } => tonic::Status::data_loss(msg),
            Error::Storage(_) => tonic::Status::internal(msg),
        }
    }
}
