//! `shop-orders`: records orders. CreateOrder (try) publishes an
//! `orders.Create`; commit stores the order; rollback has nothing to undo.

use std::marker::PhantomData;
use std::sync::Arc;

use tcc_domain_sdk::participant::{Participant, PhaseTwo, Tx, TxResult};
use tcc_domain_sdk::propagation::ExtractInterceptor;
use tcc_domain_sdk::{Command, Coordinator, ParticipantService, Publisher};
use tonic::{Request, Response, Status};

pub use crate::db::OrderRecord;
use crate::db::ShopStore;
use crate::pb::{self, orders_server::OrdersServer};
use crate::runtime::{Common, serve};
use crate::{check_id, require_partial};

/// Service name at the coordinator.
pub const SERVICE: &str = "orders";

impl Command for OrderRecord {
    const TYPE: &'static str = "orders.Create";
}

impl From<OrderRecord> for pb::Order {
    fn from(o: OrderRecord) -> Self {
        pb::Order {
            order_id: o.order_id,
            customer: o.customer,
            lines: o.lines.into_iter().map(|(sku, quantity)| pb::Line { sku, quantity }).collect(),
            total: o.total,
            transaction_id: o.transaction_id,
        }
    }
}

/// Phase 2 of the orders service, on either store.
pub struct OrdersParticipant<S>(PhantomData<fn() -> S>);

impl<S> Default for OrdersParticipant<S> {
    fn default() -> Self {
        OrdersParticipant(PhantomData)
    }
}

impl<S: ShopStore> Participant for OrdersParticipant<S> {
    type Store = S;

    async fn commit(&self, tx: &mut Tx<'_, S>, call: &PhaseTwo) -> TxResult<()> {
        for c in &call.commands {
            let o: OrderRecord = c.decode()?;
            S::save_order(tx, &o).await?;
        }
        Ok(())
    }

    async fn rollback(&self, _tx: &mut Tx<'_, S>, _call: &PhaseTwo) -> TxResult<()> {
        Ok(())
    }
}

/// The Orders API.
pub struct OrdersApi<S> {
    store: S,
    coordinator: Coordinator,
}

#[tonic::async_trait]
impl<S: ShopStore> pb::orders_server::Orders for OrdersApi<S> {
    async fn create_order(
        &self,
        request: Request<pb::CreateOrderRequest>,
    ) -> Result<Response<pb::CreateOrderResponse>, Status> {
        let ctx = require_partial(&request)?;
        let o = request.into_inner().order.ok_or_else(|| Status::invalid_argument("order is required"))?;
        check_id("order_id", &o.order_id)?;
        check_id("customer", &o.customer)?;
        let record = OrderRecord {
            order_id: o.order_id,
            customer: o.customer,
            lines: o.lines.into_iter().map(|l| (l.sku, l.quantity)).collect(),
            total: o.total,
            transaction_id: ctx.transaction_id.clone(),
        };
        let mut publisher = Publisher::new(&self.coordinator, SERVICE, ctx);
        publisher.publish(&record.order_id, &record)?;
        publisher.send().await?;
        Ok(Response::new(pb::CreateOrderResponse {}))
    }

    async fn list_orders(&self, _: Request<pb::ListRequest>) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let orders = self.store.orders().await?.into_iter().map(Into::into).collect();
        Ok(Response::new(pb::ListOrdersResponse { orders }))
    }
}

/// Runs the orders service until a signal, on PostgreSQL with
/// `--database-url`, else on sled in `--data-dir`.
pub async fn run(common: Common) -> anyhow::Result<()> {
    match common.database_url.clone() {
        Some(url) => serve_on(crate::db::open_postgres(&url, SERVICE).await?, common).await,
        None => serve_on(crate::db::open_sled(&common)?, common).await,
    }
}

async fn serve_on<S: ShopStore>(store: S, common: Common) -> anyhow::Result<()> {
    let coordinator = Coordinator::from_channel(common.tls.channel(&common.coordinator)?);
    let shutdown = crate::runtime::shutdown_on_signal();
    let api = OrdersApi { store: store.clone(), coordinator };
    let participant = Arc::new(OrdersParticipant::<S>::default());
    let routes = tonic::service::Routes::new(OrdersServer::with_interceptor(api, ExtractInterceptor))
        .add_service(common.tls.participant(ParticipantService::new(store, participant)).into_server());
    serve(SERVICE, &["shop.v1.Orders", "tcc.v1.Participant"], &common, routes, shutdown).await
}
