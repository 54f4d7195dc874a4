//! The `tcc.v1.Participant` gRPC service: checks who calls, then hands
//! each Commit or Rollback to [`apply`], and maps the result to the status
//! the coordinator classifies (OK; FAILED_PRECONDITION for a permanent
//! refusal; UNAVAILABLE for a failure it retries).

use std::sync::Arc;

use tcc_proto::v1;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::participant::{Participant, Phase, PhaseTwo, apply, check_ids};

/// The `tcc.v1.Participant` gRPC service over a [`Participant`].
pub struct ParticipantService<P: Participant> {
    store: P::Store,
    participant: Arc<P>,
    only_from: Option<String>,
}

impl<P: Participant> ParticipantService<P> {
    /// A service applying calls to `store` through `participant`.
    pub fn new(store: P::Store, participant: Arc<P>) -> Self {
        ParticipantService { store, participant, only_from: None }
    }

    /// Accepts phase-2 calls only from a client whose verified certificate
    /// names `coordinator` (served over mutual TLS, see [`crate::tls`]):
    /// a Commit carries the commands to apply, so no other holder of a
    /// certificate from the CA may send one. Others get PERMISSION_DENIED
    /// (or UNAUTHENTICATED without a certificate) and nothing is applied.
    pub fn only_from(mut self, coordinator: impl Into<String>) -> Self {
        self.only_from = Some(coordinator.into());
        self
    }

    /// The tonic server for it, accepting the largest messages the
    /// coordinator sends.
    pub fn into_server(self) -> v1::participant_server::ParticipantServer<Self> {
        v1::participant_server::ParticipantServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    async fn handle(
        &self,
        phase: Phase,
        request: Request<v1::PhaseTwoRequest>,
    ) -> Result<Response<v1::PhaseTwoResponse>, Status> {
        if let Some(expected) = &self.only_from {
            match crate::tls::caller_identity(&request) {
                Some(Ok(name)) if name == *expected => {}
                Some(Ok(name)) => {
                    tracing::warn!(caller = %name, %expected, ?phase, "phase-2 call refused: not from the coordinator");
                    return Err(Status::permission_denied(format!(
                        "identity {name:?} may not call phase 2 here: only the coordinator {expected:?} may"
                    )));
                }
                Some(Err(why)) => {
                    return Err(Status::unauthenticated(format!("the client certificate names no identity: {why}")));
                }
                None => {
                    tracing::warn!(%expected, ?phase, "phase-2 call refused: no client certificate");
                    return Err(Status::unauthenticated(format!(
                        "phase 2 here needs the client certificate of the coordinator {expected:?}"
                    )));
                }
            }
        }
        let call = Arc::new(PhaseTwo::from(request.into_inner()));
        if let Err(why) = check_ids(&call.partial_id, &call.transaction_id) {
            return Err(Status::invalid_argument(why));
        }
        match apply(&self.store, self.participant.clone(), phase, call.clone()).await {
            Ok(applied) => {
                tracing::debug!(txn = %call.transaction_id, partial = %call.partial_id, ?phase, ?applied, "phase 2 acknowledged");
                Ok(Response::new(v1::PhaseTwoResponse {}))
            }
            Err(Error::Refused(reason)) => {
                tracing::error!(txn = %call.transaction_id, partial = %call.partial_id, ?phase, %reason, "phase 2 refused");
                Err(Status::failed_precondition(reason))
            }
            Err(e) => {
                tracing::warn!(txn = %call.transaction_id, partial = %call.partial_id, ?phase, cause = %e, "phase 2 failed; the coordinator will retry");
                Err(Status::unavailable(e.to_string()))
            }
        }
    }
}

#[tonic::async_trait]
impl<P: Participant> v1::participant_server::Participant for ParticipantService<P> {
    async fn commit(&self, request: Request<v1::PhaseTwoRequest>) -> Result<Response<v1::PhaseTwoResponse>, Status> {
        self.handle(Phase::Committed, request).await
    }

    async fn rollback(&self, request: Request<v1::PhaseTwoRequest>) -> Result<Response<v1::PhaseTwoResponse>, Status> {
        self.handle(Phase::RolledBack, request).await
    }
}
