//! `shop-inventory`: stock and prices. ReserveStock (try) holds the units of
//! every line under the partial id and publishes one `inventory.Take` per
//! line; commit turns holds into sales (recorded per order); rollback
//! releases them.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tcc_domain_sdk::participant::{LocalStore, Participant, PhaseTwo, Tx, TxResult};
use tcc_domain_sdk::propagation::ExtractInterceptor;
use tcc_domain_sdk::reservations::{Account, HoldError, Reconciler, Reservations, TREES};
use tcc_domain_sdk::{Command, Coordinator, ParticipantService, Publisher};
use tonic::{Request, Response, Status};

use crate::pb::{self, inventory_server::InventoryServer};
use crate::runtime::{Common, serve};
use crate::{check_id, movements, record_movement, require_partial};

/// Service name at the coordinator.
pub const SERVICE: &str = "inventory";
const MOVEMENTS: &str = "movements";
const PRICES: &str = "prices";

/// The command a try publishes, one per order line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Take {
    /// The order.
    pub order_id: String,
    /// The item.
    pub sku: String,
    /// Units.
    pub quantity: i64,
}

impl Command for Take {
    const TYPE: &'static str = "inventory.Take";
}

/// Phase 2 of the inventory service.
pub struct InventoryParticipant;

impl Participant for InventoryParticipant {
    fn commit(&self, tx: &Tx<'_>, call: &PhaseTwo) -> TxResult<()> {
        for c in &call.commands {
            let t: Take = c.decode()?;
            Reservations::consume(tx, &call.partial_id, &t.sku, t.quantity)?;
            record_movement(tx, MOVEMENTS, &t.order_id, &call.partial_id, &t.sku, t.quantity)?;
        }
        // Anything the try held beyond its commands goes back.
        Reservations::release(tx, &call.partial_id).map(|_| ())
    }

    fn rollback(&self, tx: &Tx<'_>, call: &PhaseTwo) -> TxResult<()> {
        Reservations::release(tx, &call.partial_id).map(|_| ())
    }
}

/// The Inventory API.
pub struct InventoryApi {
    store: LocalStore,
    coordinator: Coordinator,
}

impl InventoryApi {
    fn price(&self, sku: &str) -> Result<Option<i64>, Status> {
        let v = self.store.tree(PRICES)?.get(sku.as_bytes()).map_err(|e| Status::unavailable(e.to_string()))?;
        v.map(|v| serde_json::from_slice::<i64>(&v).map_err(|e| Status::data_loss(e.to_string()))).transpose()
    }

    fn item(&self, sku: &str, a: Account) -> Result<pb::Item, Status> {
        Ok(pb::Item {
            sku: sku.to_string(),
            available: a.available,
            held: a.held,
            sold: a.used,
            price: self.price(sku)?.unwrap_or(0),
        })
    }
}

#[tonic::async_trait]
impl pb::inventory_server::Inventory for InventoryApi {
    async fn reserve_stock(
        &self,
        request: Request<pb::ReserveStockRequest>,
    ) -> Result<Response<pb::ReserveStockResponse>, Status> {
        let ctx = require_partial(&request)?;
        let r = request.into_inner();
        if r.lines.is_empty() || r.lines.len() > 100 {
            return Err(Status::invalid_argument("lines must hold 1..100 items"));
        }
        let mut seen = HashSet::new();
        let mut total = 0i64;
        for l in &r.lines {
            check_id("sku", &l.sku)?;
            if l.quantity <= 0 || l.quantity > 1_000_000 {
                return Err(Status::invalid_argument(format!("quantity of {:?} must be 1..1000000", l.sku)));
            }
            if !seen.insert(l.sku.as_str()) {
                return Err(Status::invalid_argument(format!("sku {:?} is listed twice", l.sku)));
            }
            let price = self.price(&l.sku)?.ok_or_else(|| Status::not_found(format!("unknown item {:?}", l.sku)))?;
            total = total.saturating_add(price.saturating_mul(l.quantity));
        }
        let lines: Vec<(String, i64)> = r.lines.iter().map(|l| (l.sku.clone(), l.quantity)).collect();
        let mut publisher = Publisher::new(&self.coordinator, SERVICE, ctx.clone());
        for l in &r.lines {
            publisher
                .publish(&l.sku, &Take { order_id: r.order_id.clone(), sku: l.sku.clone(), quantity: l.quantity })?;
        }
        Reservations::reserve_and_publish(&self.store, &ctx, &lines, publisher).await.map_err(|e| match e {
            HoldError::Insufficient { resource, available, requested } => Status::failed_precondition(format!(
                "not enough stock of {resource:?}: {available} available, {requested} requested"
            )),
            other => other.into(),
        })?;
        Ok(Response::new(pb::ReserveStockResponse { total }))
    }

    async fn seed(&self, request: Request<pb::SeedItemRequest>) -> Result<Response<pb::Item>, Status> {
        let r = request.into_inner();
        check_id("sku", &r.sku)?;
        // Every order costs something, so every order has exactly one debit.
        if r.quantity <= 0 || r.price <= 0 {
            return Err(Status::invalid_argument("quantity and price must be positive"));
        }
        self.store
            .tree(PRICES)?
            .insert(r.sku.as_bytes(), serde_json::to_vec(&r.price).map_err(|e| Status::internal(e.to_string()))?)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let a = Reservations::seed(&self.store, &r.sku, r.quantity).await?;
        Ok(Response::new(self.item(&r.sku, a)?))
    }

    async fn get_item(&self, request: Request<pb::GetItemRequest>) -> Result<Response<pb::Item>, Status> {
        let sku = request.into_inner().sku;
        match Reservations::account(&self.store, &sku)? {
            Some(a) => Ok(Response::new(self.item(&sku, a)?)),
            None => Err(Status::not_found(format!("unknown {sku:?}"))),
        }
    }

    async fn list_items(&self, _: Request<pb::ListRequest>) -> Result<Response<pb::ListItemsResponse>, Status> {
        let mut items = Vec::new();
        for (sku, a) in Reservations::accounts(&self.store)? {
            items.push(self.item(&sku, a)?);
        }
        Ok(Response::new(pb::ListItemsResponse { items }))
    }

    async fn list_movements(&self, _: Request<pb::ListRequest>) -> Result<Response<pb::ListMovementsResponse>, Status> {
        Ok(Response::new(pb::ListMovementsResponse { movements: movements(&self.store, MOVEMENTS)? }))
    }
}

/// Runs the inventory service until a signal.
pub async fn run(common: Common) -> anyhow::Result<()> {
    let mut trees = TREES.to_vec();
    trees.extend([MOVEMENTS, PRICES]);
    let store = LocalStore::open(&common.data_dir, &trees)?;
    let coordinator = Coordinator::from_channel(common.tls.channel(&common.coordinator)?);
    let participant = Arc::new(InventoryParticipant);
    let shutdown = crate::runtime::shutdown_on_signal();
    let reconciler = Reconciler::new(
        store.clone(),
        participant.clone(),
        coordinator.clone(),
        Duration::from_millis(common.reconcile_grace_ms),
    );
    tokio::spawn(reconciler.run(Duration::from_millis(common.reconcile_period_ms), shutdown.clone()));
    let api = InventoryApi { store: store.clone(), coordinator };
    let routes = tonic::service::Routes::new(InventoryServer::with_interceptor(api, ExtractInterceptor))
        .add_service(common.tls.participant(ParticipantService::new(store, participant)).into_server());
    serve(SERVICE, &["shop.v1.Inventory", "tcc.v1.Participant"], &common, routes, shutdown).await
}
