//! `shop-inventory`: stock and prices. ReserveStock (try) holds the units of
//! every line under the partial id and publishes one `inventory.Take` per
//! line; commit turns holds into sales (recorded per order); rollback
//! releases them.

use std::collections::HashSet;
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
use crate::pb::{self, inventory_server::InventoryServer};
use crate::runtime::{Common, serve};
use crate::{check_id, require_partial};

/// Service name at the coordinator.
pub const SERVICE: &str = "inventory";

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

/// Phase 2 of the inventory service, on either store.
pub struct InventoryParticipant<S>(PhantomData<fn() -> S>);

impl<S> Default for InventoryParticipant<S> {
    fn default() -> Self {
        InventoryParticipant(PhantomData)
    }
}

impl<S: ShopStore> Participant for InventoryParticipant<S> {
    type Store = S;

    async fn commit(&self, tx: &mut Tx<'_, S>, call: &PhaseTwo) -> TxResult<()> {
        for c in &call.commands {
            let t: Take = c.decode()?;
            tx.consume(&call.partial_id, &t.sku, t.quantity).await?;
            let sale =
                Movement { order_id: t.order_id, partial_id: call.partial_id.clone(), key: t.sku, amount: t.quantity };
            S::record(tx, Movements::Sales, &sale).await?;
        }
        // Anything the try held beyond its commands goes back.
        tx.release(&call.partial_id).await.map(|_| ())
    }

    async fn rollback(&self, tx: &mut Tx<'_, S>, call: &PhaseTwo) -> TxResult<()> {
        tx.release(&call.partial_id).await.map(|_| ())
    }
}

/// The Inventory API.
pub struct InventoryApi<S> {
    store: S,
    coordinator: Coordinator,
}

impl<S: ShopStore> InventoryApi<S> {
    async fn item(&self, sku: &str, a: Account) -> Result<pb::Item, Status> {
        Ok(pb::Item {
            sku: sku.to_string(),
            available: a.available,
            held: a.held,
            sold: a.used,
            price: self.store.price(sku).await?.unwrap_or(0),
        })
    }
}

#[tonic::async_trait]
impl<S: ShopStore> pb::inventory_server::Inventory for InventoryApi<S> {
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
            let price = self
                .store
                .price(&l.sku)
                .await?
                .ok_or_else(|| Status::not_found(format!("unknown item {:?}", l.sku)))?;
            total = total.saturating_add(price.saturating_mul(l.quantity));
        }
        let lines: Vec<(String, i64)> = r.lines.iter().map(|l| (l.sku.clone(), l.quantity)).collect();
        let mut publisher = Publisher::new(&self.coordinator, SERVICE, ctx.clone());
        for l in &r.lines {
            publisher
                .publish(&l.sku, &Take { order_id: r.order_id.clone(), sku: l.sku.clone(), quantity: l.quantity })?;
        }
        self.store.reserve_and_publish(&ctx, &lines, publisher).await.map_err(|e| match e {
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
        self.store.set_price(&r.sku, r.price).await?;
        let a = self.store.seed(&r.sku, r.quantity).await?;
        Ok(Response::new(self.item(&r.sku, a).await?))
    }

    async fn get_item(&self, request: Request<pb::GetItemRequest>) -> Result<Response<pb::Item>, Status> {
        let sku = request.into_inner().sku;
        match self.store.account(&sku).await? {
            Some(a) => Ok(Response::new(self.item(&sku, a).await?)),
            None => Err(Status::not_found(format!("unknown {sku:?}"))),
        }
    }

    async fn list_items(&self, _: Request<pb::ListRequest>) -> Result<Response<pb::ListItemsResponse>, Status> {
        let mut items = Vec::new();
        for (sku, a) in self.store.accounts().await? {
            items.push(self.item(&sku, a).await?);
        }
        Ok(Response::new(pb::ListItemsResponse { items }))
    }

    async fn list_movements(&self, _: Request<pb::ListRequest>) -> Result<Response<pb::ListMovementsResponse>, Status> {
        let movements = self.store.movements(Movements::Sales).await?.into_iter().map(Into::into).collect();
        Ok(Response::new(pb::ListMovementsResponse { movements }))
    }
}

/// Runs the inventory service until a signal, on PostgreSQL with
/// `--database-url`, else on sled in `--data-dir`.
pub async fn run(common: Common) -> anyhow::Result<()> {
    match common.database_url.clone() {
        Some(url) => serve_on(crate::db::open_postgres(&url, SERVICE).await?, common).await,
        None => serve_on(crate::db::open_sled(&common)?, common).await,
    }
}

async fn serve_on<S: ShopStore>(store: S, common: Common) -> anyhow::Result<()> {
    let coordinator = Coordinator::from_channel(common.tls.channel(&common.coordinator)?);
    let participant = Arc::new(InventoryParticipant::<S>::default());
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
