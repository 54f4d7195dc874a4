//! `shop-customers`: customer credit. ReserveCredit (try) holds credit under
//! the partial id and publishes a `customers.Debit`; commit turns the hold
//! into a debit (recorded per order for auditing); rollback releases it.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tcc_domain_sdk::participant::{Participant, PhaseTwo, Tx, TxResult};
use tcc_domain_sdk::propagation::ExtractInterceptor;
use tcc_domain_sdk::reservations::{Account, HoldError, Reconciler};
use tcc_domain_sdk::{Command, Coordinator, ParticipantService, Publisher};
use tonic::{Request, Response, Status};

use crate::db::{Movement, Movements, ShopStore};
use crate::pb::{self, customers_server::CustomersServer};
use crate::runtime::{Common, serve};
use crate::{check_id, require_partial};

/// Service name at the coordinator.
pub const SERVICE: &str = "customers";

/// The command a try publishes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Debit {
    /// The order paid for.
    pub order_id: String,
    /// Who pays.
    pub customer: String,
    /// How much.
    pub amount: i64,
}

impl Command for Debit {
    const TYPE: &'static str = "customers.Debit";
}

/// Phase 2 of the customers service, on either store.
pub struct CustomersParticipant<S>(PhantomData<fn() -> S>);

impl<S> Default for CustomersParticipant<S> {
    fn default() -> Self {
        CustomersParticipant(PhantomData)
    }
}

impl<S: ShopStore> Participant for CustomersParticipant<S> {
    type Store = S;

    async fn commit(&self, tx: &mut Tx<'_, S>, call: &PhaseTwo) -> TxResult<()> {
        for c in &call.commands {
            let d: Debit = c.decode()?;
            tx.consume(&call.partial_id, &d.customer, d.amount).await?;
            let debit = Movement {
                order_id: d.order_id,
                partial_id: call.partial_id.clone(),
                key: d.customer,
                amount: d.amount,
            };
            S::record(tx, Movements::Debits, &debit).await?;
        }
        // Anything the try held beyond its commands goes back.
        tx.release(&call.partial_id).await.map(|_| ())
    }

    async fn rollback(&self, tx: &mut Tx<'_, S>, call: &PhaseTwo) -> TxResult<()> {
        tx.release(&call.partial_id).await.map(|_| ())
    }
}

fn account(customer: &str, a: Account) -> pb::Account {
    pb::Account { customer: customer.to_string(), available: a.available, held: a.held, debited: a.used }
}

/// The Customers API.
pub struct CustomersApi<S> {
    store: S,
    coordinator: Coordinator,
}

#[tonic::async_trait]
impl<S: ShopStore> pb::customers_server::Customers for CustomersApi<S> {
    async fn reserve_credit(
        &self,
        request: Request<pb::ReserveCreditRequest>,
    ) -> Result<Response<pb::ReserveCreditResponse>, Status> {
        let ctx = require_partial(&request)?;
        let r = request.into_inner();
        check_id("customer", &r.customer)?;
        if r.amount <= 0 {
            return Err(Status::invalid_argument("amount must be positive"));
        }
        let mut publisher = Publisher::new(&self.coordinator, SERVICE, ctx.clone());
        publisher
            .publish(&r.customer, &Debit { order_id: r.order_id, customer: r.customer.clone(), amount: r.amount })?;
        let lines = [(r.customer.clone(), r.amount)];
        self.store.reserve_and_publish(&ctx, &lines, publisher).await.map_err(|e| match e {
            HoldError::Insufficient { resource, available, requested } => Status::failed_precondition(format!(
                "not enough credit: customer {resource:?} has {available} available, {requested} needed"
            )),
            HoldError::Unknown(c) => Status::not_found(format!("unknown customer {c:?}")),
            other => other.into(),
        })?;
        Ok(Response::new(pb::ReserveCreditResponse {}))
    }

    async fn seed(&self, request: Request<pb::SeedCustomerRequest>) -> Result<Response<pb::Account>, Status> {
        let r = request.into_inner();
        check_id("customer", &r.customer)?;
        if r.credit <= 0 {
            return Err(Status::invalid_argument("credit must be positive"));
        }
        let a = self.store.seed(&r.customer, r.credit).await?;
        Ok(Response::new(account(&r.customer, a)))
    }

    async fn get_account(&self, request: Request<pb::GetAccountRequest>) -> Result<Response<pb::Account>, Status> {
        let c = request.into_inner().customer;
        match self.store.account(&c).await? {
            Some(a) => Ok(Response::new(account(&c, a))),
            None => Err(Status::not_found(format!("unknown customer {c:?}"))),
        }
    }

    async fn list_accounts(&self, _: Request<pb::ListRequest>) -> Result<Response<pb::ListAccountsResponse>, Status> {
        let accounts = self.store.accounts().await?.into_iter().map(|(c, a)| account(&c, a)).collect();
        Ok(Response::new(pb::ListAccountsResponse { accounts }))
    }

    async fn list_debits(&self, _: Request<pb::ListRequest>) -> Result<Response<pb::ListMovementsResponse>, Status> {
        let movements = self.store.movements(Movements::Debits).await?.into_iter().map(Into::into).collect();
        Ok(Response::new(pb::ListMovementsResponse { movements }))
    }
}

/// Runs the customers service until a signal, on PostgreSQL with
/// `--database-url`, else on sled in `--data-dir`.
pub async fn run(common: Common) -> anyhow::Result<()> {
    match common.database_url.clone() {
        Some(url) => serve_on(crate::db::open_postgres(&url, SERVICE).await?, common).await,
        None => serve_on(crate::db::open_sled(&common)?, common).await,
    }
}

async fn serve_on<S: ShopStore>(store: S, common: Common) -> anyhow::Result<()> {
    let coordinator = Coordinator::from_channel(common.tls.channel(&common.coordinator)?);
    let participant = Arc::new(CustomersParticipant::<S>::default());
    let shutdown = crate::runtime::shutdown_on_signal();
    let reconciler = Reconciler::new(
        store.clone(),
        participant.clone(),
        coordinator.clone(),
        Duration::from_millis(common.reconcile_grace_ms),
    );
    tokio::spawn(reconciler.run(Duration::from_millis(common.reconcile_period_ms), shutdown.clone()));
    let api = CustomersApi { store: store.clone(), coordinator };
    let routes = tonic::service::Routes::new(CustomersServer::with_interceptor(api, ExtractInterceptor))
        .add_service(common.tls.participant(ParticipantService::new(store, participant)).into_server());
    serve(SERVICE, &["shop.v1.Customers", "tcc.v1.Participant"], &common, routes, shutdown).await
}
