//! `shop`: the composite service. PlaceOrder runs one composite transaction
//! across inventory, customers and orders with the SDK's
//! [`Coordinator::run`]: each try is called with its partial in metadata;
//! if all succeed the transaction is confirmed (waiting for the commits),
//! otherwise it is cancelled and the refusal is returned as is.

use std::time::Duration;

use tcc_domain_sdk::composite::RunError;
use tcc_domain_sdk::propagation::{PropagateInterceptor, within};
use tcc_domain_sdk::{Coordinator, proto::TransactionState};
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::check_id;
use crate::pb::{
    self, customers_client::CustomersClient, inventory_client::InventoryClient, orders_client::OrdersClient,
    shop_server::ShopServer,
};
use crate::runtime::Common;

/// Flags of the shop.
#[derive(Clone, Debug, clap::Args)]
pub struct ShopArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// The coordinator.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub coordinator: String,
    /// The customers service.
    #[arg(long)]
    pub customers: String,
    /// The inventory service.
    #[arg(long)]
    pub inventory: String,
    /// The orders service.
    #[arg(long)]
    pub orders: String,
    /// Transaction timeout, in ms.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// How long PlaceOrder waits for the commits/rollbacks, in ms.
    #[arg(long, default_value_t = 10_000)]
    pub wait_ms: u64,
    /// Mutual TLS, to the coordinator and the services and for its own API.
    #[command(flatten)]
    pub tls: crate::runtime::TlsArgs,
    /// Export traces over OTLP/gRPC to this collector.
    #[arg(long, env = "TCC_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

type Traced = InterceptedService<Channel, PropagateInterceptor>;

/// The Shop API.
pub struct ShopApi {
    coordinator: Coordinator,
    customers: CustomersClient<Traced>,
    inventory: InventoryClient<Traced>,
    orders: OrdersClient<Traced>,
    timeout: Duration,
    wait: Duration,
}

impl ShopApi {
    /// Clients to the coordinator and the three services.
    pub fn new(args: &ShopArgs) -> anyhow::Result<Self> {
        let channel = |url: &str| args.tls.channel(url);
        Ok(ShopApi {
            coordinator: Coordinator::from_channel(channel(&args.coordinator)?),
            customers: CustomersClient::with_interceptor(channel(&args.customers)?, PropagateInterceptor),
            inventory: InventoryClient::with_interceptor(channel(&args.inventory)?, PropagateInterceptor),
            orders: OrdersClient::with_interceptor(channel(&args.orders)?, PropagateInterceptor),
            timeout: Duration::from_millis(args.timeout_ms),
            wait: Duration::from_millis(args.wait_ms),
        })
    }
}

#[tonic::async_trait]
impl pb::shop_server::Shop for ShopApi {
    async fn place_order(
        &self,
        request: Request<pb::PlaceOrderRequest>,
    ) -> Result<Response<pb::PlaceOrderResponse>, Status> {
        let r = request.into_inner();
        check_id("customer", &r.customer)?;
        if r.items.is_empty() {
            return Err(Status::invalid_argument("items must hold at least one line"));
        }
        let order_id = uuid::Uuid::new_v4().to_string();
        let (mut inventory, mut customers, mut orders) =
            (self.inventory.clone(), self.customers.clone(), self.orders.clone());
        let (oid, customer, items) = (order_id.clone(), r.customer.clone(), r.items.clone());
        let services = [crate::inventory::SERVICE, crate::customers::SERVICE, crate::orders::SERVICE];
        let result = self
            .coordinator
            .run(&services, self.timeout, Some(self.wait), |txn| async move {
                let ctx = txn.partial(crate::inventory::SERVICE).map_err(Status::from)?;
                let stock = pb::ReserveStockRequest { order_id: oid.clone(), lines: items.clone() };
                let total = within(ctx, inventory.reserve_stock(stock)).await?.into_inner().total;
                let ctx = txn.partial(crate::customers::SERVICE).map_err(Status::from)?;
                let credit =
                    pb::ReserveCreditRequest { customer: customer.clone(), amount: total, order_id: oid.clone() };
                within(ctx, customers.reserve_credit(credit)).await?;
                let ctx = txn.partial(crate::orders::SERVICE).map_err(Status::from)?;
                let order = pb::Order { order_id: oid, customer, lines: items, total, transaction_id: txn.id.clone() };
                within(ctx, orders.create_order(pb::CreateOrderRequest { order: Some(order) })).await?;
                Ok::<_, Status>((total, txn.id.clone()))
            })
            .await;
        match result {
            Ok(((total, transaction_id), outcome)) => {
                tracing::info!(%order_id, txn = %transaction_id, state = ?outcome.state, total, "order placed");
                if outcome.state == TransactionState::FailedToConfirm {
                    return Err(Status::internal(format!(
                        "order {order_id} was confirmed but a service refused to apply it; an operator has been alerted (transaction {transaction_id})"
                    )));
                }
                Ok(Response::new(pb::PlaceOrderResponse {
                    order_id,
                    transaction_id,
                    total,
                    state: outcome.state.as_str_name().to_string(),
                }))
            }
            Err(RunError::Cancelled(status)) => {
                tracing::info!(%order_id, cause = %status.message(), "order refused; transaction cancelled");
                Err(Status::new(status.code(), format!("order refused: {}", status.message())))
            }
            Err(RunError::OutcomeUnknown { transaction_id, cause }) => {
                tracing::error!(%order_id, txn = %transaction_id, %cause, "order outcome unknown");
                Err(Status::unavailable(format!(
                    "the outcome of order {order_id} is unknown (transaction {transaction_id}): {cause}; check the order before retrying"
                )))
            }
            Err(RunError::Coordinator(e)) => {
                tracing::warn!(%order_id, cause = %e, "order failed at the coordinator");
                Err(e.into())
            }
        }
    }
}

/// Runs the shop until a signal.
pub async fn run(args: ShopArgs) -> anyhow::Result<()> {
    let api = ShopApi::new(&args)?;
    let shutdown = crate::runtime::shutdown_on_signal();
    let routes = tonic::service::Routes::new(ShopServer::new(api));
    let common = Common {
        listen: args.listen,
        data_dir: None,
        database_url: None,
        coordinator: args.coordinator.clone(),
        lease_ms: 3_000,
        no_register: true, // a composite service is not a participant
        reconcile_period_ms: 0,
        reconcile_grace_ms: 0,
        tls: args.tls.clone(),
        otlp_endpoint: None,
    };
    crate::runtime::serve("shop", &["shop.v1.Shop"], &common, routes, shutdown).await
}
