//! How a phase-2 call reaches a participant: the [`Transport`] trait, and
//! [`GrpcTransport`], which calls `tcc.v1.Participant` on an instance
//! picked from the [`Registry`].
//!
//! The driver ([`super::Delivery`]) decides what to call and what an
//! outcome means for the transaction; a transport only makes one call and
//! classifies its outcome ([`CallError`]). The deterministic simulation
//! puts a simulated transport in its place.

use std::sync::Arc;
use std::time::Duration;

use tcc_proto::v1::participant_client::ParticipantClient;
use tcc_proto::v1::{PhaseTwoRequest, StoredCommand};
use tonic::Code;
use tracing::{debug, warn};

use super::registry::Registry;
use crate::config::fixed;
use crate::model::{CommandRecord, Decision, PartialId, TxnId};

/// One phase-2 call: deliver `decision` for one partial transaction.
#[derive(Clone, Debug)]
pub struct Phase2Call {
    /// The transaction.
    pub txn: TxnId,
    /// The partial transaction.
    pub partial: PartialId,
    /// The participant service.
    pub service: String,
    /// Commit (confirm) or rollback (cancel).
    pub decision: Decision,
    /// The partial's whole topic, in order.
    pub commands: Vec<CommandRecord>,
    /// The transaction's trace context (`traceparent`; empty if none):
    /// the call joins that trace.
    pub trace: String,
}

/// Why a phase-2 call did not succeed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// Worth retrying: the participant was not reached, did not answer in
    /// time, or answered with a transient status.
    Transient(String),
    /// The participant refused for good.
    Permanent(String),
}

/// Makes phase-2 calls. See the module docs.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Calls some instance of `call.service`, waiting at most `timeout`.
    async fn call(&self, call: Phase2Call, timeout: Duration) -> Result<(), CallError>;
}

/// Phase-2 calls over gRPC to the instances in a [`Registry`].
pub struct GrpcTransport {
    registry: Arc<Registry>,
}

impl GrpcTransport {
    /// A transport over `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        GrpcTransport { registry }
    }
}

#[async_trait::async_trait]
impl Transport for GrpcTransport {
    async fn call(&self, call: Phase2Call, timeout: Duration) -> Result<(), CallError> {
        let service = call.service.clone();
        let Some((endpoint, channel)) = self.registry.pick(&service) else {
            return Err(CallError::Transient(format!("no endpoint known for service {service:?}")));
        };
        let mut client = ParticipantClient::new(channel)
            .max_encoding_message_size(fixed::MAX_MESSAGE_BYTES)
            .max_decoding_message_size(fixed::SMALL_MESSAGE_BYTES);
        let decision = call.decision;
        let mut req = tonic::Request::new(PhaseTwoRequest {
            transaction_id: call.txn.to_string(),
            partial_id: call.partial.to_string(),
            service: call.service,
            commands: call
                .commands
                .into_iter()
                .map(|c| StoredCommand { sequence: c.sequence, r#type: c.kind, key: c.key, payload: c.payload })
                .collect(),
        });
        req.set_timeout(timeout);
        // Untraced, a disabled span: entering it is one branch.
        let span = match crate::telemetry::enabled() {
            true => {
                let verb = if decision == Decision::Confirm { "Commit" } else { "Rollback" };
                let span = crate::telemetry::phase2_span(&call.trace, verb, &service, &call.txn.to_string());
                span.in_scope(|| crate::telemetry::inject(req.metadata_mut()));
                span
            }
            false => tracing::Span::none(),
        };
        let rpc = tracing::Instrument::instrument(
            async {
                match decision {
                    Decision::Confirm => client.commit(req).await,
                    Decision::Cancel => client.rollback(req).await,
                }
            },
            span,
        );
        // The grpc-timeout header asks the server to give up; this bounds the
        // wait even if the server ignores it.
        let result = tokio::time::timeout(timeout + Duration::from_millis(100), rpc).await;
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
                    // The server there does not serve tcc.v1.Participant: a
                    // wrong address, not the participant's answer. Another
                    // instance (or this one, once fixed) gets the call.
                    Code::Unimplemented => {
                        self.registry.report(&endpoint, false);
                        warn!(
                            %service,
                            %endpoint,
                            answer = status.message(),
                            "this endpoint is not a tcc.v1.Participant (UNIMPLEMENTED); is the wrong address registered for the service? trying another instance later"
                        );
                        Err(CallError::Transient(format!("{endpoint} is not a participant of {service:?}: {msg}")))
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
}
