//! `tcc.v1.Transactions`: the composite side.

use std::sync::Arc;
use std::time::Duration;

use tcc_proto::v1::{self, transactions_server::Transactions};
use tonic::{Request, Response, Status};

use super::convert;
use crate::config::fixed;
use crate::engine::Engine;
use crate::error::Result;
use crate::model::TxnId;
use crate::model::TxnRecord;

/// The Transactions service.
pub struct TransactionsApi {
    engine: Arc<Engine>,
}

impl TransactionsApi {
    /// A service over `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        TransactionsApi { engine }
    }

    /// How long a decision with `wait` waits (0 = the default), if at all.
    fn wait(wait: bool, wait_ms: u64) -> Option<Duration> {
        wait.then(|| {
            Duration::from_millis(if wait_ms == 0 { fixed::DEFAULT_WAIT_MS } else { wait_ms.min(fixed::MAX_WAIT_MS) })
        })
    }

    /// The answer to a decision: the state reached, and the transaction.
    fn decided(txn: TxnRecord) -> v1::DecisionResponse {
        v1::DecisionResponse { state: convert::state(txn.state).into(), transaction: Some(convert::transaction(&txn)) }
    }
}

#[tonic::async_trait]
impl Transactions for TransactionsApi {
    async fn begin(&self, request: Request<v1::BeginRequest>) -> Result<Response<v1::BeginResponse>, Status> {
        let req = request.into_inner();
        let txn = self.engine.begin(req.participants, req.timeout_ms).await?;
        Ok(Response::new(v1::BeginResponse {
            transaction_id: txn.id.to_string(),
            partials: txn
                .participants
                .iter()
                .map(|p| v1::PartialTransaction { service: p.service.clone(), partial_id: p.partial_id.to_string() })
                .collect(),
            deadline_unix_ms: txn.deadline_ms,
        }))
    }

    async fn enlist(&self, request: Request<v1::EnlistRequest>) -> Result<Response<v1::PartialTransaction>, Status> {
        let req = request.into_inner();
        let id = TxnId::parse("transaction_id", &req.transaction_id)?;
        let p = self.engine.enlist(id, req.service).await?;
        Ok(Response::new(v1::PartialTransaction { service: p.service, partial_id: p.partial_id.to_string() }))
    }

    async fn confirm(&self, request: Request<v1::ConfirmRequest>) -> Result<Response<v1::DecisionResponse>, Status> {
        let req = request.into_inner();
        let id = TxnId::parse("transaction_id", &req.transaction_id)?;
        let txn = self.engine.confirm_waiting(id, Self::wait(req.wait, req.wait_timeout_ms)).await?;
        Ok(Response::new(Self::decided(txn)))
    }

    async fn cancel(&self, request: Request<v1::CancelRequest>) -> Result<Response<v1::DecisionResponse>, Status> {
        let req = request.into_inner();
        let id = TxnId::parse("transaction_id", &req.transaction_id)?;
        let txn = self.engine.cancel_waiting(id, req.reason, Self::wait(req.wait, req.wait_timeout_ms)).await?;
        Ok(Response::new(Self::decided(txn)))
    }

    async fn get(&self, request: Request<v1::GetRequest>) -> Result<Response<v1::Transaction>, Status> {
        let id = TxnId::parse("transaction_id", &request.into_inner().transaction_id)?;
        let txn = self.engine.get(id).await?;
        Ok(Response::new(convert::transaction(&txn)))
    }
}
