//! `tcc.v1.Admin`: listing and repair, for operators.

use std::sync::Arc;

use tcc_proto::v1::{self, admin_server::Admin};
use tonic::{Request, Response, Status};

use super::convert;
use crate::auth::Access;
use crate::engine::Engine;
use crate::error::Result;
use crate::model::TxnId;

/// The Admin service.
pub struct AdminApi {
    engine: Arc<Engine>,
    access: Arc<Access>,
}

impl AdminApi {
    /// A service over `engine`; every call needs the admin role when
    /// `access` enforces a policy.
    pub fn new(engine: Arc<Engine>, access: Arc<Access>) -> Self {
        AdminApi { engine, access }
    }
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn list_transactions(
        &self,
        request: Request<v1::ListTransactionsRequest>,
    ) -> Result<Response<v1::ListTransactionsResponse>, Status> {
        let caller = self.access.caller(&request, "Admin.ListTransactions")?;
        self.access.admin(&caller, "Admin.ListTransactions")?;
        let req = request.into_inner();
        let mut states = Vec::new();
        for (i, raw) in req.states.iter().enumerate() {
            if let Some(s) = convert::parse_state(&format!("states[{i}]"), *raw)? {
                states.push(s);
            }
        }
        let after = if req.page_token.is_empty() { None } else { Some(TxnId::parse("page_token", &req.page_token)?) };
        let page = self.engine.list(&states, req.min_age_ms, req.page_size as usize, after).await?;
        Ok(Response::new(v1::ListTransactionsResponse {
            transactions: page.transactions.iter().map(convert::transaction).collect(),
            next_page_token: page.next.map(|id| id.to_string()).unwrap_or_default(),
        }))
    }

    async fn retry(&self, request: Request<v1::RetryRequest>) -> Result<Response<v1::Transaction>, Status> {
        let caller = self.access.caller(&request, "Admin.Retry")?;
        self.access.admin(&caller, "Admin.Retry")?;
        let id = TxnId::parse("transaction_id", &request.into_inner().transaction_id)?;
        let txn = self.engine.retry(id).await?;
        let by = match &caller {
            crate::auth::Caller::Known { name, .. } => name.as_str(),
            crate::auth::Caller::Anyone => "-",
        };
        tracing::warn!(txn = %id, state = %txn.state, identity = by, "operator retry");
        Ok(Response::new(convert::transaction(&txn)))
    }
}
