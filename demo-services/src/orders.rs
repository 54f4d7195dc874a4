//! `shop-orders`: records orders. CreateOrder (try) publishes an
//! `orders.Create`; commit stores the order; rollback has nothing to undo.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tcc_domain_sdk::participant::{LocalStore, Participant, PhaseTwo, Tx, TxResult};
use tcc_domain_sdk::propagation::ExtractInterceptor;
use tcc_domain_sdk::{Command, Coordinator, ParticipantService, Publisher};
use tonic::{Request, Response, Status};

use crate::pb::{self, orders_server::OrdersServer};
use crate::runtime::{Common, serve};
use crate::{check_id, require_partial, to_json};

/// Service name at the coordinator.
pub const SERVICE: &str = "orders";
const ORDERS: &str = "orders";

/// An order as stored and published.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrderRecord {
    /// Order id.
    pub order_id: String,
    /// Customer.
    pub customer: String,
    /// (sku, quantity).
    pub lines: Vec<(String, i64)>,
    /// Total price.
    pub total: i64,
    /// The composite transaction.
    pub transaction_id: String,
}

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

/// Phase 2 of the orders service.
pub struct OrdersParticipant;

impl Participant for OrdersParticipant {
    fn commit(&self, tx: &Tx<'_>, call: &PhaseTwo) -> TxResult<()> {
        for c in &call.commands {
            let o: OrderRecord = c.decode()?;
            tx.tree(ORDERS)?.insert(o.order_id.as_bytes(), to_json(&o)?)?;
        }
        Ok(())
    }

    fn rollback(&self, _tx: &Tx<'_>, _call: &PhaseTwo) -> TxResult<()> {
        Ok(())
    }
}

/// The Orders API.
pub struct OrdersApi {
    store: LocalStore,
    coordinator: Coordinator,
}

#[tonic::async_trait]
impl pb::orders_server::Orders for OrdersApi {
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
        let mut orders = Vec::new();
        for item in self.store.tree(ORDERS)?.iter() {
            let (_, v) = item.map_err(|e| Status::unavailable(e.to_string()))?;
            let o: OrderRecord = serde_json::from_slice(&v).map_err(|e| Status::data_loss(e.to_string()))?;
            orders.push(o.into());
        }
        Ok(Response::new(pb::ListOrdersResponse { orders }))
    }
}

/// Runs the orders service until a signal.
pub async fn run(common: Common) -> anyhow::Result<()> {
    let store = LocalStore::open(&common.data_dir, &[ORDERS])?;
    let coordinator = Coordinator::from_channel(common.tls.channel(&common.coordinator)?);
    let shutdown = crate::runtime::shutdown_on_signal();
    let api = OrdersApi { store: store.clone(), coordinator };
    let routes = tonic::service::Routes::new(OrdersServer::with_interceptor(api, ExtractInterceptor))
        .add_service(common.tls.participant(ParticipantService::new(store, Arc::new(OrdersParticipant))).into_server());
    serve(SERVICE, &["shop.v1.Orders", "tcc.v1.Participant"], &common, routes, shutdown).await
}
