//! The demo shop as a test fixture: the coordinator and the four shop
//! binaries, each with its own database, plus seeding and the invariant
//! checks every shop test (and the chaos test) ends with.

use std::collections::{BTreeMap, HashSet};

use anyhow::Result;
use tcc_demo_services::pb::{
    self, customers_client::CustomersClient, inventory_client::InventoryClient, orders_client::OrdersClient,
    shop_client::ShopClient,
};
use tonic::transport::Channel;

use crate::{Coordinator, Process};

/// Fast phase-2 retries for tests.
pub const FAST: &[&str] = &["--retry-initial-ms", "20", "--retry-max-ms", "200", "--call-timeout-ms", "2000"];

/// The running shop and what was seeded.
pub struct Shop {
    /// The coordinator process (in a cluster: the first; the shop and the
    /// orders service use it).
    pub coordinator: Coordinator,
    /// In a cluster: the other coordinators (customers uses the first of
    /// them, inventory the second). Empty otherwise.
    pub peers: Vec<Coordinator>,
    /// The customers process.
    pub customers: Process,
    /// The inventory process.
    pub inventory: Process,
    /// The orders process.
    pub orders: Process,
    /// The shop process.
    pub shop: Process,
    /// Credit seeded per customer.
    pub credit: BTreeMap<String, i64>,
    /// Stock seeded per sku.
    pub stock: BTreeMap<String, i64>,
}

/// Flags of a domain service in a test.
pub fn service_args(c: &Coordinator, name: &str, extra: &[&str]) -> Vec<String> {
    let dir = c.tmp().path().join(name);
    let mut args: Vec<String> = vec!["--data-dir".into(), dir.to_string_lossy().into_owned()];
    args.extend(common_args(c, extra));
    args
}

/// The flags of shop service `name` keeping its data in its own database
/// (`shop_NAME`, created here) on the PostgreSQL server `pg`.
pub async fn service_args_on_postgres(
    c: &Coordinator,
    pg: &crate::pg::Postgres,
    name: &str,
    extra: &[&str],
) -> Result<Vec<String>> {
    let database = format!("shop_{name}");
    pg.client().await?.batch_execute(&format!("CREATE DATABASE {database}")).await?;
    let url = format!("postgres://tcc@127.0.0.1:{}/{database}", pg.port());
    let mut args: Vec<String> = vec!["--database-url".into(), url];
    args.extend(common_args(c, extra));
    Ok(args)
}

fn common_args(c: &Coordinator, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--coordinator".into(),
        c.url(),
        "--lease-ms".into(),
        "2000".into(),
        "--reconcile-period-ms".into(),
        "200".into(),
        "--reconcile-grace-ms".into(),
        "300".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

impl Shop {
    /// See the module docs.
    pub async fn start() -> Result<Self> {
        Self::start_with(&[]).await
    }

    /// See the module docs.
    pub async fn start_with(customers_extra: &[&str]) -> Result<Self> {
        Self::start_everywhere(customers_extra, &[]).await
    }

    /// The shop with every one of the five processes exporting its spans
    /// to the OTLP collector at `endpoint`.
    pub async fn start_traced(endpoint: &str) -> Result<Self> {
        Self::start_everywhere(&[], &["--otlp-endpoint", endpoint]).await
    }

    /// `all_extra` goes to all five processes, `customers_extra` to
    /// customers too.
    async fn start_everywhere(customers_extra: &[&str], all_extra: &[&str]) -> Result<Self> {
        let mut coordinator_args = FAST.to_vec();
        coordinator_args.extend(all_extra);
        let coordinator = Coordinator::start(&coordinator_args).await?;
        let tmp = coordinator.tmp();
        let with = |extra: &[&str]| -> Vec<String> { extra.iter().chain(all_extra).map(|s| s.to_string()).collect() };
        let args = |name: &str, extra: &[&str]| {
            let extra = with(extra);
            service_args(&coordinator, name, &extra.iter().map(String::as_str).collect::<Vec<_>>())
        };
        let customers =
            Process::start("shop-customers", "customers", args("customers", customers_extra), tmp.clone()).await?;
        let inventory = Process::start("shop-inventory", "inventory", args("inventory", &[]), tmp.clone()).await?;
        let orders = Process::start("shop-orders", "orders", args("orders", &[]), tmp.clone()).await?;
        let mut shop_args = with(&[]);
        shop_args.extend([
            "--coordinator".into(),
            coordinator.url(),
            "--customers".into(),
            customers.url(),
            "--inventory".into(),
            inventory.url(),
            "--orders".into(),
            orders.url(),
        ]);
        let shop = Process::start("shop", "shop", shop_args, tmp).await?;
        Ok(Shop {
            coordinator,
            peers: Vec::new(),
            customers,
            inventory,
            orders,
            shop,
            credit: BTreeMap::new(),
            stock: BTreeMap::new(),
        })
    }

    /// Starts all five processes on fixed loopback ports, so that any of
    /// them can be killed and restarted where the others expect it.
    pub async fn start_on_fixed_ports(coordinator_extra: &[&str], shop_extra: &[&str]) -> Result<Self> {
        let mut args: Vec<&str> = FAST.to_vec();
        args.extend(coordinator_extra);
        Self::start_fixed(1, &args, [0, 0, 0], shop_extra, None).await
    }

    /// [`Shop::start_on_fixed_ports`] with customers, inventory and orders
    /// each keeping its data in a database of its own on `pg` (the
    /// coordinator keeps its embedded store).
    pub async fn start_on_fixed_ports_on_postgres(pg: &crate::pg::Postgres, shop_extra: &[&str]) -> Result<Self> {
        Self::start_fixed(1, FAST, [0, 0, 0], shop_extra, Some(pg)).await
    }

    /// The shop on a cluster: three coordinators sharing the PostgreSQL
    /// server `pg` (lease 2 s), every process on a fixed loopback port. The
    /// shop and orders use the first coordinator, customers the second,
    /// inventory the third, so every transaction crosses nodes. With
    /// `services_on_postgres`, customers, inventory and orders keep their
    /// data in databases of their own on the same server.
    pub async fn start_cluster(
        pg: &crate::pg::Postgres,
        services_on_postgres: bool,
        shop_extra: &[&str],
    ) -> Result<Self> {
        let url = pg.url();
        let mut args: Vec<&str> = FAST.to_vec();
        args.extend(["--database-url", url.as_str(), "--lease-ms", "2000"]);
        Self::start_fixed(3, &args, [1, 2, 0], shop_extra, services_on_postgres.then_some(pg)).await
    }

    /// `coordinators` coordinators with `coordinator_args`, then customers,
    /// inventory and orders, each on the coordinator `uses` names, and the
    /// shop on the first; every process on a fixed loopback port.
    async fn start_fixed(
        coordinators: usize,
        coordinator_args: &[&str],
        uses: [usize; 3],
        shop_extra: &[&str],
        services_on: Option<&crate::pg::Postgres>,
    ) -> Result<Self> {
        let mut addrs = Vec::new();
        for _ in 0..coordinators + 4 {
            addrs.push(format!("127.0.0.1:{}", crate::free_port()?));
        }
        let mut nodes = Vec::new();
        for addr in &addrs[..coordinators] {
            let mut args = coordinator_args.to_vec();
            args.extend(["--listen", addr.as_str()]);
            nodes.push(Coordinator::start(&args).await?);
        }
        let tmp = nodes[0].tmp();
        let mut procs = Vec::new();
        for (i, (name, c)) in ["customers", "inventory", "orders"].into_iter().zip(uses).enumerate() {
            let extra = ["--listen", addrs[coordinators + i].as_str()];
            let a = match services_on {
                Some(pg) => service_args_on_postgres(&nodes[c], pg, name, &extra).await?,
                None => service_args(&nodes[c], name, &extra),
            };
            procs.push(Process::start(&format!("shop-{name}"), name, a, tmp.clone()).await?);
        }
        let mut shop_args: Vec<String> =
            vec!["--listen".into(), addrs[coordinators + 3].clone(), "--coordinator".into(), nodes[0].url()];
        for (flag, p) in [("--customers", &procs[0]), ("--inventory", &procs[1]), ("--orders", &procs[2])] {
            shop_args.extend([flag.to_string(), p.url()]);
        }
        shop_args.extend(shop_extra.iter().map(|s| s.to_string()));
        let shop = Process::start("shop", "shop", shop_args, tmp).await?;
        let orders = procs.pop().ok_or_else(|| anyhow::anyhow!("orders"))?;
        let inventory = procs.pop().ok_or_else(|| anyhow::anyhow!("inventory"))?;
        let customers = procs.pop().ok_or_else(|| anyhow::anyhow!("customers"))?;
        let mut nodes = nodes.into_iter();
        let coordinator = nodes.next().ok_or_else(|| anyhow::anyhow!("coordinator"))?;
        Ok(Shop {
            coordinator,
            peers: nodes.collect(),
            customers,
            inventory,
            orders,
            shop,
            credit: BTreeMap::new(),
            stock: BTreeMap::new(),
        })
    }

    /// See the module docs.
    pub async fn customers(&self) -> Result<CustomersClient<Channel>> {
        Ok(CustomersClient::new(self.customers.channel().await?))
    }
    /// See the module docs.
    pub async fn inventory(&self) -> Result<InventoryClient<Channel>> {
        Ok(InventoryClient::new(self.inventory.channel().await?))
    }
    /// See the module docs.
    pub async fn orders(&self) -> Result<OrdersClient<Channel>> {
        Ok(OrdersClient::new(self.orders.channel().await?))
    }
    /// See the module docs.
    pub async fn shop(&self) -> Result<ShopClient<Channel>> {
        Ok(ShopClient::new(self.shop.channel().await?))
    }

    /// See the module docs.
    pub async fn seed(&mut self, customers: &[(&str, i64)], items: &[(&str, i64, i64)]) -> Result<()> {
        let mut c = self.customers().await?;
        for (customer, credit) in customers {
            c.seed(pb::SeedCustomerRequest { customer: customer.to_string(), credit: *credit }).await?;
            *self.credit.entry(customer.to_string()).or_default() += credit;
        }
        let mut i = self.inventory().await?;
        for (sku, quantity, price) in items {
            i.seed(pb::SeedItemRequest { sku: sku.to_string(), quantity: *quantity, price: *price }).await?;
            *self.stock.entry(sku.to_string()).or_default() += quantity;
        }
        Ok(())
    }

    /// See the module docs.
    pub async fn place(&self, customer: &str, items: &[(&str, i64)]) -> Result<pb::PlaceOrderResponse, tonic::Status> {
        let mut shop = self.shop().await.map_err(|e| tonic::Status::unknown(e.to_string()))?;
        let items =
            items.iter().map(|(sku, quantity)| pb::Line { sku: sku.to_string(), quantity: *quantity }).collect();
        Ok(shop.place_order(pb::PlaceOrderRequest { customer: customer.into(), items }).await?.into_inner())
    }

    /// See the module docs.
    pub async fn accounts(&self) -> Result<BTreeMap<String, pb::Account>> {
        let list = self.customers().await?.list_accounts(pb::ListRequest {}).await?.into_inner().accounts;
        Ok(list.into_iter().map(|a| (a.customer.clone(), a)).collect())
    }

    /// See the module docs.
    pub async fn items(&self) -> Result<BTreeMap<String, pb::Item>> {
        let list = self.inventory().await?.list_items(pb::ListRequest {}).await?.into_inner().items;
        Ok(list.into_iter().map(|i| (i.sku.clone(), i)).collect())
    }

    /// Conservation, true at any time: credit and stock only move between
    /// available, held and used.
    /// See the module docs.
    pub async fn check_conservation(&self) -> Result<()> {
        for (c, a) in self.accounts().await? {
            assert_eq!(a.available + a.held + a.debited, self.credit[&c], "credit of {c} not conserved: {a:?}");
            assert!(a.available >= 0 && a.held >= 0 && a.debited >= 0, "{a:?}");
        }
        for (s, i) in self.items().await? {
            assert_eq!(i.available + i.held + i.sold, self.stock[&s], "stock of {s} not conserved: {i:?}");
            assert!(i.available >= 0 && i.held >= 0 && i.sold >= 0, "{i:?}");
        }
        Ok(())
    }

    /// Once settled: no holds; every order has exactly one debit (of its
    /// total) and one stock movement (its lines, from one partial); no debit
    /// or movement without an order. Returns the number of orders.
    /// See the module docs.
    pub async fn check_settled(&self) -> Result<usize> {
        self.check_conservation().await?;
        for a in self.accounts().await?.values() {
            assert_eq!(a.held, 0, "credit still held: {a:?}");
        }
        for i in self.items().await?.values() {
            assert_eq!(i.held, 0, "stock still held: {i:?}");
        }
        let orders = self.orders().await?.list_orders(pb::ListRequest {}).await?.into_inner().orders;
        let debits = self.customers().await?.list_debits(pb::ListRequest {}).await?.into_inner().movements;
        let moves = self.inventory().await?.list_movements(pb::ListRequest {}).await?.into_inner().movements;
        let ids: HashSet<&str> = orders.iter().map(|o| o.order_id.as_str()).collect();
        for o in &orders {
            let d: Vec<_> = debits.iter().filter(|d| d.order_id == o.order_id).collect();
            assert_eq!(d.len(), 1, "order {} has {} debits", o.order_id, d.len());
            assert_eq!((d[0].key.as_str(), d[0].amount), (o.customer.as_str(), o.total));
            let m: Vec<_> = moves.iter().filter(|m| m.order_id == o.order_id).collect();
            let partials: HashSet<&str> = m.iter().map(|m| m.partial_id.as_str()).collect();
            assert_eq!(partials.len(), 1, "order {} has {} stock movements", o.order_id, partials.len());
            let mut got: Vec<(String, i64)> = m.iter().map(|m| (m.key.clone(), m.amount)).collect();
            let mut want: Vec<(String, i64)> = o.lines.iter().map(|l| (l.sku.clone(), l.quantity)).collect();
            got.sort();
            want.sort();
            assert_eq!(got, want, "stock movement of order {}", o.order_id);
        }
        assert!(debits.iter().all(|d| ids.contains(d.order_id.as_str())), "a debit without an order: {debits:?}");
        assert!(
            moves.iter().all(|m| ids.contains(m.order_id.as_str())),
            "a stock movement without an order: {moves:?}"
        );
        Ok(orders.len())
    }
}
