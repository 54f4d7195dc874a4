//! `tcc.v1.Admin`: listing, repair and live updates, for operators.
//! Every operator action is logged at WARN with the operator's identity,
//! and kept in the transaction's history.

use std::sync::Arc;

use tcc_proto::v1::{self, admin_server::Admin};
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert;
use crate::auth::{Access, Caller};
use crate::delivery::Delivery;
use crate::engine::Engine;
use crate::error::Result;
use crate::model::{TxnId, TxnRecord, TxnState};

/// The Admin service.
pub struct AdminApi {
    engine: Arc<Engine>,
    delivery: Arc<Delivery>,
    access: Arc<Access>,
}

impl AdminApi {
    /// A service over `engine` and `delivery`; every call needs the admin
    /// role when `access` enforces a policy.
    pub fn new(engine: Arc<Engine>, delivery: Arc<Delivery>, access: Arc<Access>) -> Self {
        AdminApi { engine, delivery, access }
    }

    /// The caller, who must be an admin (when a policy is enforced).
    fn operator<T>(&self, request: &Request<T>, rpc: &'static str) -> Result<Caller> {
        let caller = self.access.caller(request, rpc)?;
        self.access.admin(&caller, rpc)?;
        Ok(caller)
    }
}

/// The operator's name for the history and the log ("" when open).
fn name(caller: &Caller) -> &str {
    match caller {
        Caller::Known { name, .. } => name,
        Caller::Anyone => "",
    }
}

/// Watch over one transaction: its current state, then every change,
/// until it is finished or the client goes away. Each record is sent as
/// `view` makes it (a gRPC message here, JSON for the console).
pub(super) async fn watch_one<T>(
    engine: Arc<Engine>,
    id: TxnId,
    current: TxnRecord,
    mut changes: tokio::sync::broadcast::Receiver<Arc<TxnRecord>>,
    out: tokio::sync::mpsc::Sender<Result<T, Status>>,
    view: fn(&TxnRecord) -> T,
) {
    let mut last = current.version;
    if out.send(Ok(view(&current))).await.is_err() || current.state.is_finished() {
        return;
    }
    loop {
        let txn = tokio::select! {
            _ = out.closed() => return,
            _ = engine.stopping() => return,
            change = changes.recv() => match change {
                Ok(txn) if txn.id == id => txn,
                Ok(_) => continue,
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(txn = %id, missed, "watcher fell behind; sending the current state");
                    match engine.get(id).await {
                        Ok(txn) => Arc::new(txn),
                        Err(e) => {
                            let _ = out.send(Err(e.into())).await;
                            return;
                        }
                    }
                }
                Err(RecvError::Closed) => return,
            },
        };
        if txn.version <= last {
            continue;
        }
        last = txn.version;
        if out.send(Ok(view(&txn))).await.is_err() || txn.state.is_finished() {
            return;
        }
    }
}

/// Watch over every transaction whose new state is in `states` (all when
/// empty), until the client goes away; sent as `view` makes them. A
/// watcher that fell behind skips the changes it missed and is sent
/// `lagged(missed)`, when that gives something (the console then reloads
/// its list; a gRPC stream has no such message).
pub(super) async fn watch_all<T>(
    engine: Arc<Engine>,
    states: Vec<TxnState>,
    mut changes: tokio::sync::broadcast::Receiver<Arc<TxnRecord>>,
    out: tokio::sync::mpsc::Sender<Result<T, Status>>,
    view: fn(&TxnRecord) -> T,
    lagged: fn(u64) -> Option<T>,
) {
    loop {
        let txn = tokio::select! {
            _ = out.closed() => return,
            _ = engine.stopping() => return,
            change = changes.recv() => match change {
                Ok(txn) => txn,
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "a Watch fell behind and skipped {missed} changes");
                    if let Some(notice) = lagged(missed) {
                        if out.send(Ok(notice)).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                Err(RecvError::Closed) => return,
            },
        };
        if (states.is_empty() || states.contains(&txn.state)) && out.send(Ok(view(&txn))).await.is_err() {
            return;
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn list_transactions(
        &self,
        request: Request<v1::ListTransactionsRequest>,
    ) -> Result<Response<v1::ListTransactionsResponse>, Status> {
        self.operator(&request, "Admin.ListTransactions")?;
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
        let caller = self.operator(&request, "Admin.Retry")?;
        let id = TxnId::parse("transaction_id", &request.into_inner().transaction_id)?;
        let txn = self.engine.retry(id, name(&caller)).await?;
        tracing::warn!(txn = %id, state = %txn.state, identity = name(&caller), "operator retry");
        Ok(Response::new(convert::transaction(&txn)))
    }

    async fn deliver_now(&self, request: Request<v1::DeliverNowRequest>) -> Result<Response<v1::Transaction>, Status> {
        let caller = self.operator(&request, "Admin.DeliverNow")?;
        let id = TxnId::parse("transaction_id", &request.into_inner().transaction_id)?;
        let txn = self.engine.deliver_now(id).await?;
        self.delivery.deliver_now(id);
        tracing::warn!(txn = %id, state = %txn.state, identity = name(&caller), "operator: deliver now");
        Ok(Response::new(convert::transaction(&txn)))
    }

    async fn resolve(&self, request: Request<v1::ResolveRequest>) -> Result<Response<v1::Transaction>, Status> {
        let caller = self.operator(&request, "Admin.Resolve")?;
        let req = request.into_inner();
        let id = TxnId::parse("transaction_id", &req.transaction_id)?;
        let txn = self.engine.resolve(id, &req.service, &req.reason, name(&caller)).await?;
        tracing::warn!(txn = %id, service = %req.service, reason = %req.reason, state = %txn.state, identity = name(&caller),
            "operator: participant resolved by hand");
        Ok(Response::new(convert::transaction(&txn)))
    }

    type WatchStream = ReceiverStream<Result<v1::Transaction, Status>>;

    async fn watch(&self, request: Request<v1::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        self.operator(&request, "Admin.Watch")?;
        let req = request.into_inner();
        // Subscribed before the current state is read: no change is lost
        // in between (one may come twice; versions weed it out).
        let changes = self.engine.watch();
        let (out, stream) = tokio::sync::mpsc::channel(64);
        let engine = self.engine.clone();
        if req.transaction_id.is_empty() {
            let mut states = Vec::new();
            for (i, raw) in req.states.iter().enumerate() {
                if let Some(s) = convert::parse_state(&format!("states[{i}]"), *raw)? {
                    states.push(s);
                }
            }
            tokio::spawn(watch_all(engine, states, changes, out, convert::transaction, |_| None));
        } else {
            if !req.states.is_empty() {
                return Err(Status::invalid_argument("give either transaction_id or states, not both"));
            }
            let id = TxnId::parse("transaction_id", &req.transaction_id)?;
            let current = self.engine.get(id).await?;
            tokio::spawn(watch_one(engine, id, current, changes, out, convert::transaction));
        }
        Ok(Response::new(ReceiverStream::new(stream)))
    }
}
