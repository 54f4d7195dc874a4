//! `tcc.v1.Transactions`: the composite side.

use std::sync::Arc;
use std::time::Duration;

use tcc_proto::v1::{self, transactions_server::Transactions};
use tonic::{Request, Response, Status};

use super::convert;
use crate::auth::{Access, TxnAction};
use crate::config::fixed;
use crate::engine::Engine;
use crate::error::Result;
use crate::model::TxnId;
use crate::model::TxnRecord;

/// The Transactions service.
pub struct TransactionsApi {
    engine: Arc<Engine>,
    access: Arc<Access>,
}

impl TransactionsApi {
    /// A service over `engine`, under `access`.
    pub fn new(engine: Arc<Engine>, access: Arc<Access>) -> Self {
        TransactionsApi { engine, access }
    }

    /// Parses the id and checks that the caller may do `action` on the
    /// transaction (a read of the cached record; nothing when open).
    async fn authorized<T>(
        &self,
        request: &Request<T>,
        rpc: &'static str,
        action: TxnAction,
        raw_id: &str,
    ) -> Result<TxnId> {
        let caller = self.access.caller(request, rpc)?;
        let id = TxnId::parse("transaction_id", raw_id)?;
        if self.access.is_enforced() {
            let txn = self.engine.get(id).await?;
            self.access.transaction(&caller, rpc, action, &txn)?;
        }
        Ok(id)
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
        let caller = self.access.caller(&request, "Transactions.Begin")?;
        let owner = self.access.begin(&caller, "Transactions.Begin")?;
        let req = request.into_inner();
        // Phase-2 calls join the trace of this Begin (see `telemetry`).
        let trace = crate::telemetry::current();
        let txn = self.engine.begin(req.participants, req.timeout_ms, owner, trace).await?;
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
        let id = self
            .authorized(&request, "Transactions.Enlist", TxnAction::Drive, &request.get_ref().transaction_id)
            .await?;
        let req = request.into_inner();
        let p = self.engine.enlist(id, req.service).await?;
        Ok(Response::new(v1::PartialTransaction { service: p.service, partial_id: p.partial_id.to_string() }))
    }

    async fn confirm(&self, request: Request<v1::ConfirmRequest>) -> Result<Response<v1::DecisionResponse>, Status> {
        let id = self
            .authorized(&request, "Transactions.Confirm", TxnAction::Drive, &request.get_ref().transaction_id)
            .await?;
        let req = request.into_inner();
        let txn = self.engine.confirm_waiting(id, Self::wait(req.wait, req.wait_timeout_ms)).await?;
        Ok(Response::new(Self::decided(txn)))
    }

    async fn cancel(&self, request: Request<v1::CancelRequest>) -> Result<Response<v1::DecisionResponse>, Status> {
        let id = self
            .authorized(&request, "Transactions.Cancel", TxnAction::Cancel, &request.get_ref().transaction_id)
            .await?;
        let req = request.into_inner();
        let txn = self.engine.cancel_waiting(id, req.reason, Self::wait(req.wait, req.wait_timeout_ms)).await?;
        Ok(Response::new(Self::decided(txn)))
    }

    async fn get(&self, request: Request<v1::GetRequest>) -> Result<Response<v1::Transaction>, Status> {
        let caller = self.access.caller(&request, "Transactions.Get")?;
        let id = TxnId::parse("transaction_id", &request.get_ref().transaction_id)?;
        let txn = self.engine.get(id).await?;
        self.access.transaction(&caller, "Transactions.Get", TxnAction::Read, &txn)?;
        Ok(Response::new(convert::transaction(&txn)))
    }
}
