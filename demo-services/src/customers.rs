//! `shop-customers`: customer credit. ReserveCredit (try) holds credit under
//! the partial id and publishes a `customers.Debit`; commit turns the hold
//! into a debit (recorded per order for auditing); rollback releases it.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tcc_domain_sdk::participant::{LocalStore, Participant, PhaseTwo, Tx, TxResult};
use tcc_domain_sdk::propagation::ExtractInterceptor;
use tcc_domain_sdk::reservations::{Account, HoldError, Reconciler, Reservations, TREES};
use tcc_domain_sdk::{Command, Coordinator, ParticipantService, Publisher};
use tonic::{Request, Response, Status};

use crate::pb::{self, customers_server::CustomersServer};
use crate::runtime::{Common, serve};
use crate::{check_id, movements, record_movement, require_partial};

/// Service name at the coordinator.
pub const SERVICE: &str = "customers";
const DEBITS: &str = "debits";

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

/// Phase 2 of the customers service.
pub struct CustomersParticipant;

impl Participant for CustomersParticipant {
    fn commit(&self, tx: &Tx<'_>, call: &PhaseTwo) -> TxResult<()> {
        for c in &call.commands {
            let d: Debit = c.decode()?;
            Reservations::consume(tx, &call.partial_id, &d.customer, d.amount)?;
            record_movement(tx, DEBITS, &d.order_id, &call.partial_id, &d.customer, d.amount)?;
        }
        // Anything the try held beyond its commands goes back.
        Reservations::release(tx, &call.partial_id).map(|_| ())
    }

    fn rollback(&self, tx: &Tx<'_>, call: &PhaseTwo) -> TxResult<()> {
        Reservations::release(tx, &call.partial_id).map(|_| ())
    }
}

fn account(customer: &str, a: Account) -> pb::Account {
    pb::Account { customer: customer.to_string(), available: a.available, held: a.held, debited: a.used }
}

/// The Customers API.
pub struct CustomersApi {
    store: LocalStore,
    coordinator: Coordinator,
}

#[tonic::async_trait]
impl pb::customers_server::Customers for CustomersApi {
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
        Reservations::reserve_and_publish(&self.store, &ctx, &lines, publisher).await.map_err(|e| match e {
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
        let a = Reservations::seed(&self.store, &r.customer, r.credit).await?;
        Ok(Response::new(account(&r.customer, a)))
    }

    async fn get_account(&self, request: Request<pb::GetAccountRequest>) -> Result<Response<pb::Account>, Status> {
        let c = request.into_inner().customer;
        match Reservations::account(&self.store, &c)? {
            Some(a) => Ok(Response::new(account(&c, a))),
            None => Err(Status::not_found(format!("unknown customer {c:?}"))),
        }
    }

    async fn list_accounts(&self, _: Request<pb::ListRequest>) -> Result<Response<pb::ListAccountsResponse>, Status> {
        let accounts = Reservations::accounts(&self.store)?.into_iter().map(|(c, a)| account(&c, a)).collect();
        Ok(Response::new(pb::ListAccountsResponse { accounts }))
    }

    async fn list_debits(&self, _: Request<pb::ListRequest>) -> Result<Response<pb::ListMovementsResponse>, Status> {
        Ok(Response::new(pb::ListMovementsResponse { movements: movements(&self.store, DEBITS)? }))
    }
}

/// Runs the customers service until a signal.
pub async fn run(common: Common) -> anyhow::Result<()> {
    let mut trees = TREES.to_vec();
    trees.push(DEBITS);
    let store = LocalStore::open(&common.data_dir, &trees)?;
    let coordinator = Coordinator::from_channel(common.tls.channel(&common.coordinator)?);
    let participant = Arc::new(CustomersParticipant);
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
