//! What the shop's services keep besides the SDK's accounts and holds, in
//! either store: movements (customers' debits, inventory's sales), prices
//! and orders. [`ShopStore`] is implemented for sled (a tree each) and for
//! PostgreSQL (a table each, in the service's own database).
//!
//! The services refer to each other's data only by soft references: no
//! foreign key crosses a service, and a column that holds another
//! service's id is named after that service (`orders_order_id` in the
//! customers' and inventory's movements, `customers_customer_id` and
//! `inventory_sku` in orders).

use std::future::Future;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tcc_domain_sdk::participant::{Tx, TxResult};
use tcc_domain_sdk::reservations::Reservations;
use tcc_domain_sdk::store::postgres::{PgStore, PgTx};
use tcc_domain_sdk::store::sled::{SledStore, SledTx};
use tonic::Status;

use crate::pb;

/// Which service's movements: customers' debits or inventory's sales.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Movements {
    /// Customers: one debit per order and customer.
    Debits,
    /// Inventory: one sale per order and item.
    Sales,
}

impl Movements {
    fn name(self) -> &'static str {
        match self {
            Movements::Debits => "debits",
            Movements::Sales => "sales",
        }
    }
}

/// A committed debit or sale.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Movement {
    /// The order (owned by the orders service).
    pub order_id: String,
    /// The partial transaction that made it.
    pub partial_id: String,
    /// The customer or the item.
    pub key: String,
    /// Credit or units.
    pub amount: i64,
}

impl From<Movement> for pb::Movement {
    fn from(m: Movement) -> Self {
        pb::Movement { order_id: m.order_id, partial_id: m.partial_id, key: m.key, amount: m.amount }
    }
}

/// An order as stored (and published by the orders service's try).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrderRecord {
    /// Order id.
    pub order_id: String,
    /// Customer (owned by the customers service).
    pub customer: String,
    /// (sku, quantity); skus are owned by the inventory service.
    pub lines: Vec<(String, i64)>,
    /// Total price.
    pub total: i64,
    /// The composite transaction.
    pub transaction_id: String,
}

/// A shop service's store: the SDK's, plus the shop's own records.
pub trait ShopStore: Reservations {
    /// In a commit: records a movement.
    fn record(tx: &mut Tx<'_, Self>, kind: Movements, m: &Movement) -> impl Future<Output = TxResult<()>>;
    /// Every movement of `kind`.
    fn movements(&self, kind: Movements) -> impl Future<Output = Result<Vec<Movement>, Status>> + Send;
    /// In a commit: stores an order.
    fn save_order(tx: &mut Tx<'_, Self>, order: &OrderRecord) -> impl Future<Output = TxResult<()>>;
    /// Every order.
    fn orders(&self) -> impl Future<Output = Result<Vec<OrderRecord>, Status>> + Send;
    /// Sets an item's price.
    fn set_price(&self, sku: &str, price: i64) -> impl Future<Output = Result<(), Status>> + Send;
    /// An item's price.
    fn price(&self, sku: &str) -> impl Future<Output = Result<Option<i64>, Status>> + Send;
}

/// The sled trees of the shop's records.
pub const TREES: [&str; 4] = ["debits", "sales", "orders", "prices"];

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("local store: {e}"))
}

fn data_loss(e: impl std::fmt::Display) -> Status {
    Status::data_loss(format!("a stored record does not decode: {e}"))
}

impl ShopStore for SledStore {
    async fn record(tx: &mut SledTx<'_>, kind: Movements, m: &Movement) -> TxResult<()> {
        let id = format!("{}/{}/{}", m.order_id, m.partial_id, m.key);
        tx.tree(kind.name())?.insert(id.as_bytes(), serde_json::to_vec(m)?)?;
        Ok(())
    }

    fn movements(&self, kind: Movements) -> impl Future<Output = Result<Vec<Movement>, Status>> + Send {
        std::future::ready(read_all(self, kind.name()))
    }

    async fn save_order(tx: &mut SledTx<'_>, order: &OrderRecord) -> TxResult<()> {
        tx.tree("orders")?.insert(order.order_id.as_bytes(), serde_json::to_vec(order)?)?;
        Ok(())
    }

    fn orders(&self) -> impl Future<Output = Result<Vec<OrderRecord>, Status>> + Send {
        std::future::ready(read_all(self, "orders"))
    }

    fn set_price(&self, sku: &str, price: i64) -> impl Future<Output = Result<(), Status>> + Send {
        let set = || -> Result<(), Status> {
            let tree = self.tree("prices")?;
            tree.insert(sku.as_bytes(), serde_json::to_vec(&price).map_err(|e| Status::internal(e.to_string()))?)
                .map_err(unavailable)?;
            Ok(())
        };
        std::future::ready(set())
    }

    fn price(&self, sku: &str) -> impl Future<Output = Result<Option<i64>, Status>> + Send {
        let get = || -> Result<Option<i64>, Status> {
            let v = self.tree("prices")?.get(sku.as_bytes()).map_err(unavailable)?;
            v.map(|v| serde_json::from_slice::<i64>(&v).map_err(data_loss)).transpose()
        };
        std::future::ready(get())
    }
}

fn read_all<T: serde::de::DeserializeOwned>(store: &SledStore, tree: &str) -> Result<Vec<T>, Status> {
    let mut out = Vec::new();
    for item in store.tree(tree)?.iter() {
        let (_, v) = item.map_err(unavailable)?;
        out.push(serde_json::from_slice(&v).map_err(data_loss)?);
    }
    Ok(out)
}

/// The customers' table: one debit per order and customer.
pub const CUSTOMERS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS debits (
    orders_order_id TEXT   NOT NULL,
    partial_id      TEXT   NOT NULL,
    customer_id     TEXT   NOT NULL,
    amount          BIGINT NOT NULL,
    PRIMARY KEY (orders_order_id, partial_id, customer_id)
)";

/// The inventory's tables: one sale per order and item; prices.
pub const INVENTORY_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sales (
    orders_order_id TEXT   NOT NULL,
    partial_id      TEXT   NOT NULL,
    sku             TEXT   NOT NULL,
    quantity        BIGINT NOT NULL,
    PRIMARY KEY (orders_order_id, partial_id, sku)
);
CREATE TABLE IF NOT EXISTS prices (
    sku   TEXT   PRIMARY KEY,
    price BIGINT NOT NULL
)";

/// The orders' tables: orders and their lines (a foreign key inside the
/// service; the customer and the skus are soft references).
pub const ORDERS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS orders (
    order_id              TEXT   PRIMARY KEY,
    customers_customer_id TEXT   NOT NULL,
    total                 BIGINT NOT NULL,
    transaction_id        TEXT   NOT NULL
);
CREATE TABLE IF NOT EXISTS order_lines (
    order_id      TEXT   NOT NULL REFERENCES orders (order_id),
    inventory_sku TEXT   NOT NULL,
    quantity      BIGINT NOT NULL,
    PRIMARY KEY (order_id, inventory_sku)
)";

/// The shop's tables in `service`'s database (`customers`, `inventory` or
/// `orders`).
pub fn schema(service: &str) -> &'static str {
    match service {
        "customers" => CUSTOMERS_SCHEMA,
        "inventory" => INVENTORY_SCHEMA,
        _ => ORDERS_SCHEMA,
    }
}

/// Connects to `service`'s own PostgreSQL database at `url` and creates
/// its tables (the SDK's, then the shop's).
pub async fn open_postgres(url: &str, service: &str) -> anyhow::Result<PgStore> {
    let store = PgStore::connect(url).await.with_context(|| format!("cannot open the database of {service}"))?;
    let mut client = store.pool().get().await?;
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL client_min_messages = warning").await?;
    tx.batch_execute(schema(service)).await?;
    tx.commit().await?;
    Ok(store)
}

/// Opens the service's sled database in `--data-dir`.
pub fn open_sled(common: &crate::runtime::Common) -> anyhow::Result<SledStore> {
    let dir = common.data_dir.as_deref().context("--data-dir or --database-url is required")?;
    Ok(SledStore::open(dir, &TREES)?)
}

async fn pg<T>(
    store: &PgStore,
    f: impl AsyncFnOnce(&deadpool_postgres::Client) -> Result<T, tokio_postgres::Error>,
) -> Result<T, Status> {
    let client = store.pool().get().await.map_err(unavailable)?;
    f(&client).await.map_err(|e| Status::from(tcc_domain_sdk::Error::from(e)))
}

impl ShopStore for PgStore {
    async fn record(tx: &mut PgTx<'_>, kind: Movements, m: &Movement) -> TxResult<()> {
        let sql = match kind {
            Movements::Debits => {
                "INSERT INTO debits (orders_order_id, partial_id, customer_id, amount) VALUES ($1, $2, $3, $4)"
            }
            Movements::Sales => {
                "INSERT INTO sales (orders_order_id, partial_id, sku, quantity) VALUES ($1, $2, $3, $4)"
            }
        };
        let statement = tx.prepare_cached(sql).await?;
        tx.execute(&statement, &[&m.order_id, &m.partial_id, &m.key, &m.amount]).await?;
        Ok(())
    }

    fn movements(&self, kind: Movements) -> impl Future<Output = Result<Vec<Movement>, Status>> + Send {
        let sql = match kind {
            Movements::Debits => "SELECT orders_order_id, partial_id, customer_id, amount FROM debits ORDER BY 1, 2, 3",
            Movements::Sales => "SELECT orders_order_id, partial_id, sku, quantity FROM sales ORDER BY 1, 2, 3",
        };
        pg(self, async move |c| {
            let mut out = Vec::new();
            for row in c.query(sql, &[]).await? {
                out.push(Movement {
                    order_id: row.try_get(0)?,
                    partial_id: row.try_get(1)?,
                    key: row.try_get(2)?,
                    amount: row.try_get(3)?,
                });
            }
            Ok(out)
        })
    }

    async fn save_order(tx: &mut PgTx<'_>, o: &OrderRecord) -> TxResult<()> {
        let sql = "INSERT INTO orders (order_id, customers_customer_id, total, transaction_id) VALUES ($1, $2, $3, $4)";
        tx.execute(sql, &[&o.order_id, &o.customer, &o.total, &o.transaction_id]).await?;
        for (sku, quantity) in &o.lines {
            let sql = "INSERT INTO order_lines (order_id, inventory_sku, quantity) VALUES ($1, $2, $3)";
            tx.execute(sql, &[&o.order_id, sku, quantity]).await?;
        }
        Ok(())
    }

    fn orders(&self) -> impl Future<Output = Result<Vec<OrderRecord>, Status>> + Send {
        pg(self, async move |c| {
            let sql = "SELECT o.order_id, o.customers_customer_id, o.total, o.transaction_id, l.inventory_sku, l.quantity \
                       FROM orders o LEFT JOIN order_lines l ON l.order_id = o.order_id ORDER BY o.order_id, l.inventory_sku";
            let mut out: Vec<OrderRecord> = Vec::new();
            for row in c.query(sql, &[]).await? {
                let id: String = row.try_get(0)?;
                let line: Option<(String, i64)> = match row.try_get::<_, Option<String>>(4)? {
                    Some(sku) => Some((sku, row.try_get(5)?)),
                    None => None,
                };
                match out.last_mut() {
                    Some(o) if o.order_id == id => o.lines.extend(line),
                    _ => out.push(OrderRecord {
                        order_id: id,
                        customer: row.try_get(1)?,
                        total: row.try_get(2)?,
                        transaction_id: row.try_get(3)?,
                        lines: line.into_iter().collect(),
                    }),
                }
            }
            Ok(out)
        })
    }

    fn set_price(&self, sku: &str, price: i64) -> impl Future<Output = Result<(), Status>> + Send {
        let sku = sku.to_string();
        pg(self, async move |c| {
            let sql = "INSERT INTO prices (sku, price) VALUES ($1, $2) ON CONFLICT (sku) DO UPDATE SET price = EXCLUDED.price";
            c.execute(sql, &[&sku, &price]).await.map(|_| ())
        })
    }

    fn price(&self, sku: &str) -> impl Future<Output = Result<Option<i64>, Status>> + Send {
        let sku = sku.to_string();
        pg(self, async move |c| {
            let row = c.query_opt("SELECT price FROM prices WHERE sku = $1", &[&sku]).await?;
            row.map(|r| r.try_get(0)).transpose()
        })
    }
}
