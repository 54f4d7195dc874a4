//! The one mapping from [`Error`] to `tonic::Status` (see the table in
//! [`crate::error`]). Handlers return `Result<_, Status>` and convert with
//! `?`, so no handler chooses a status code of its own.

use crate::error::Error;

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let msg = err.to_string();
        let status = match err {
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::IllegalTransition { .. } => tonic::Status::failed_precondition(msg),
            Error::LimitExceeded(_) => tonic::Status::resource_exhausted(msg),
            Error::Conflict { .. } => tonic::Status::aborted(msg),
            Error::Unavailable(_) | Error::Fenced(_) => tonic::Status::unavailable(msg),
            Error::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
            Error::PermissionDenied(_) => tonic::Status::permission_denied(msg),
            Error::Corrupt { .. } => tonic::Status::data_loss(msg),
            Error::Storage(_) => tonic::Status::internal(msg),
        };
        tracing::debug!(code = ?status.code(), reason = status.message(), "request refused");
        status
    }
}

impl From<crate::model::BadId> for tonic::Status {
    fn from(err: crate::model::BadId) -> Self {
        Error::from(err).into()
    }
}
