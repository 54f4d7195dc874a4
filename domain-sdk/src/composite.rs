//! The composite side: begin a composite transaction, run the calls to the
//! domain services inside it, and confirm or cancel.
//!
//! [`Coordinator::run`] is the easy path: it begins, runs the caller's async
//! closure, and confirms when the closure returns `Ok`, cancels when it
//! returns `Err` or panics (the panic then continues). Explicit
//! [`CompositeTransaction::confirm`] / [`cancel`](CompositeTransaction::cancel)
//! are there for flows that need them.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use tcc_proto::v1::{self, TransactionState, topics_client::TopicsClient, transactions_client::TransactionsClient};
use tonic::transport::{Channel, Endpoint};

use crate::telemetry::{TraceInterceptor, Traced};

use crate::error::{Error, Result};
use crate::propagation::PartialContext;

/// A connection to the coordinator.
#[derive(Clone, Debug)]
pub struct Coordinator {
    pub(crate) transactions: TransactionsClient<Traced>,
    pub(crate) topics: TopicsClient<Traced>,
}

/// The outcome of a decision.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The state reached (terminal if the call waited and delivery ended).
    pub state: TransactionState,
    /// The transaction as the coordinator reported it.
    pub transaction: Option<v1::Transaction>,
}

/// What [`Coordinator::run`] returns when the transaction was not confirmed.
#[derive(Debug, thiserror::Error)]
pub enum RunError<E> {
    /// The closure failed; the transaction was cancelled.
    #[error("cancelled: {0}")]
    Cancelled(E),
    /// The coordinator failed (begin, or a refused confirm).
    #[error(transparent)]
    Coordinator(#[from] Error),
    /// Confirm could not be confirmed: the decision may or may not have
    /// been taken. Ask the coordinator (`Get`) before retrying anything.
    #[error("outcome of transaction {transaction_id} unknown: {cause}")]
    OutcomeUnknown {
        /// The transaction to look up.
        transaction_id: String,
        /// The last error.
        cause: Error,
    },
}

impl Coordinator {
    /// Connects to the coordinator at `url` (e.g. `http://127.0.0.1:50051`).
    pub async fn connect(url: &str) -> Result<Self> {
        let channel = Endpoint::from_shared(url.to_string())
            .map_err(|e| Error::Invalid(format!("coordinator URL {url:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await?;
        Ok(Self::from_channel(channel))
    }

    /// Uses an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Coordinator {
            transactions: TransactionsClient::with_interceptor(channel.clone(), TraceInterceptor),
            topics: TopicsClient::with_interceptor(channel, TraceInterceptor),
        }
    }

    /// Begins a composite transaction for `services`, cancelled by the
    /// coordinator if still undecided after `timeout`.
    pub async fn begin(&self, services: &[&str], timeout: Duration) -> Result<CompositeTransaction> {
        let req = v1::BeginRequest {
            participants: services.iter().map(|s| s.to_string()).collect(),
            timeout_ms: timeout.as_millis() as u64,
        };
        let resp = self.transactions.clone().begin(req).await?.into_inner();
        let partials = resp
            .partials
            .into_iter()
            .map(|p| {
                let ctx = PartialContext {
                    partial_id: p.partial_id,
                    transaction_id: resp.transaction_id.clone(),
                    deadline_ms: resp.deadline_unix_ms,
                };
                (p.service, ctx)
            })
            .collect();
        Ok(CompositeTransaction {
            id: resp.transaction_id,
            deadline_ms: resp.deadline_unix_ms,
            partials,
            client: self.transactions.clone(),
        })
    }

    /// Begins a transaction, runs `f` with it, then confirms (waiting up to
    /// `wait` for every participant to acknowledge) if `f` returned `Ok`, or
    /// cancels (waiting the same way for the rollbacks) if it returned `Err`,
    /// or cancels and resumes the panic if it panicked.
    pub async fn run<T, E, F, Fut>(
        &self,
        services: &[&str],
        timeout: Duration,
        wait: Option<Duration>,
        f: F,
    ) -> Result<(T, Outcome), RunError<E>>
    where
        F: FnOnce(CompositeTransaction) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display + 'static,
    {
        let txn = self.begin(services, timeout).await?;
        match AssertUnwindSafe(f(txn.clone())).catch_unwind().await {
            Ok(Ok(value)) => {
                // Confirm is idempotent: retry it while the outcome is unknown.
                let mut attempt = 0;
                loop {
                    match txn.confirm(wait).await {
                        Ok(outcome) => return Ok((value, outcome)),
                        Err(e) if e.is_definitive() => return Err(RunError::Coordinator(e)),
                        Err(e) if attempt >= 3 => {
                            return Err(RunError::OutcomeUnknown { transaction_id: txn.id.clone(), cause: e });
                        }
                        Err(e) => {
                            attempt += 1;
                            tracing::warn!(txn = %txn.id, cause = %e, attempt, "confirm failed; retrying");
                            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                        }
                    }
                }
            }
            Ok(Err(e)) => {
                let reason = reason_of(&e);
                if let Err(cancel) = txn.cancel(&reason, wait).await {
                    tracing::warn!(txn = %txn.id, cause = %cancel, "cancel failed; the deadline will cancel it");
                }
                Err(RunError::Cancelled(e))
            }
            Err(panic) => {
                if let Err(cancel) = txn.cancel("the composite operation panicked", None).await {
                    tracing::warn!(txn = %txn.id, cause = %cancel, "cancel failed; the deadline will cancel it");
                }
                std::panic::resume_unwind(panic)
            }
        }
    }
}

/// A begun composite transaction.
#[derive(Clone, Debug)]
pub struct CompositeTransaction {
    /// The transaction id.
    pub id: String,
    /// When the coordinator cancels it if still undecided (unix ms).
    pub deadline_ms: i64,
    partials: Vec<(String, PartialContext)>,
    client: TransactionsClient<Traced>,
}

impl CompositeTransaction {
    /// The partial context of `service`, to pass to that service's calls
    /// (with [`crate::propagation::within`] or
    /// [`crate::propagation::attach`]).
    pub fn partial(&self, service: &str) -> Result<PartialContext> {
        self.partials
            .iter()
            .find(|(s, _)| s == service)
            .map(|(_, p)| p.clone())
            .ok_or_else(|| Error::Invalid(format!("service {service:?} is not a participant of {}", self.id)))
    }

    /// Enlists one more participant (while undecided).
    pub async fn enlist(&mut self, service: &str) -> Result<PartialContext> {
        let req = v1::EnlistRequest { transaction_id: self.id.clone(), service: service.to_string() };
        let p = self.client.clone().enlist(req).await?.into_inner();
        let ctx =
            PartialContext { partial_id: p.partial_id, transaction_id: self.id.clone(), deadline_ms: self.deadline_ms };
        if !self.partials.iter().any(|(s, _)| s == service) {
            self.partials.push((service.to_string(), ctx.clone()));
        }
        Ok(ctx)
    }

    /// Confirms; with `wait`, waits up to that long for every participant
    /// to acknowledge. Fails with [`Error::Decided`] if it was cancelled.
    pub async fn confirm(&self, wait: Option<Duration>) -> Result<Outcome> {
        let req = v1::ConfirmRequest {
            transaction_id: self.id.clone(),
            wait: wait.is_some(),
            wait_timeout_ms: wait.map(|w| w.as_millis() as u64).unwrap_or(0),
        };
        match self.client.clone().confirm(req).await {
            Ok(r) => Ok(outcome(r.into_inner())),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Err(Error::Decided(s.message().to_string())),
            Err(s) => Err(s.into()),
        }
    }

    /// Cancels with `reason`; with `wait`, waits for the rollbacks.
    pub async fn cancel(&self, reason: &str, wait: Option<Duration>) -> Result<Outcome> {
        let req = v1::CancelRequest {
            transaction_id: self.id.clone(),
            reason: reason.chars().take(1024).collect(),
            wait: wait.is_some(),
            wait_timeout_ms: wait.map(|w| w.as_millis() as u64).unwrap_or(0),
        };
        match self.client.clone().cancel(req).await {
            Ok(r) => Ok(outcome(r.into_inner())),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Err(Error::Decided(s.message().to_string())),
            Err(s) => Err(s.into()),
        }
    }
}

fn outcome(r: v1::DecisionResponse) -> Outcome {
    Outcome {
        state: TransactionState::try_from(r.state).unwrap_or(TransactionState::Unspecified),
        transaction: r.transaction,
    }
}

/// The cancel reason for a composite operation that failed with `e`: a gRPC
/// status's own message (a participant's "not enough credit: ..."), not
/// the whole text of the status; any other error's text.
fn reason_of<E: std::fmt::Display + 'static>(e: &E) -> String {
    let any: &dyn std::any::Any = e;
    if let Some(status) = any.downcast_ref::<tonic::Status>() {
        return status.message().to_string();
    }
    if let Some(crate::error::Error::Coordinator(status)) = any.downcast_ref::<crate::error::Error>() {
        return status.message().to_string();
    }
    e.to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_status_gives_its_message_as_the_cancel_reason() {
        let refused = tonic::Status::failed_precondition("not enough credit: 5 short");
        assert_eq!(super::reason_of(&refused), "not enough credit: 5 short");
        let wrapped = crate::error::Error::Coordinator(tonic::Status::not_found("no such partial"));
        assert_eq!(super::reason_of(&wrapped), "no such partial");
        assert_eq!(super::reason_of(&"plain text"), "plain text");
    }
}
