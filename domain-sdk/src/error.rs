//! The SDK's error type.

/// Everything the SDK can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The coordinator answered with an error status.
    #[error("coordinator: {0}")]
    Coordinator(#[from] tonic::Status),
    /// The coordinator could not be reached.
    #[error("cannot reach the coordinator: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The transaction was already decided (confirmed, cancelled or timed
    /// out) when the try arrived: nothing was published. The message names
    /// the state.
    #[error("the transaction is already decided: {0}")]
    Decided(String),
    /// A command could not be encoded or decoded.
    #[error("command codec: {0}")]
    Codec(#[from] serde_json::Error),
    /// The service's own database failed.
    #[error("local store: {0}")]
    Store(String),
    /// The participant refused a commit/rollback for good.
    #[error("refused: {0}")]
    Refused(String),
    /// A request was malformed (e.g. bad transaction-context metadata).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// True when the coordinator refused for good (the request will never
    /// succeed, and nothing was stored), as opposed to an error after which
    /// the outcome is unknown (timeouts, unavailability), where the caller
    /// must assume it may have succeeded.
    pub fn is_definitive(&self) -> bool {
        use tonic::Code::*;
        match self {
            Error::Decided(_) | Error::Invalid(_) | Error::Codec(_) => true,
            Error::Coordinator(s) => matches!(
                s.code(),
                InvalidArgument
                    | NotFound
                    | AlreadyExists
                    | PermissionDenied
                    | FailedPrecondition
                    | OutOfRange
                    | Unimplemented
                    | Unauthenticated
                    | ResourceExhausted
            ),
            _ => false,
        }
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Store(e.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Coordinator(s) => s,
            Error::Transport(t) => tonic::Status::unavailable(t.to_string()),
            Error::Decided(m) => tonic::Status::failed_precondition(m),
            Error::Codec(c) => tonic::Status::invalid_argument(c.to_string()),
            Error::Store(m) => tonic::Status::unavailable(format!("local store: {m}")),
            Error::Refused(m) => tonic::Status::failed_precondition(m),
            Error::Invalid(m) => tonic::Status::invalid_argument(m),
        }
    }
}

/// Result with the SDK's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
