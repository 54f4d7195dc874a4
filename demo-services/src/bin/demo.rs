//! `shop-demo`: the whole demo in one command. Runs the coordinator and the
//! four shop services on consecutive ports (each service with its own
//! data directory under `--data-dir`), seeds customers and items on first
//! start, prints what to try, and stops everything on Ctrl-C.
//!
//! With `--tls`, everything runs over mutual TLS: a demo CA and one
//! certificate per identity are made in `DATA_DIR/tls` on first start
//! (kept after), the coordinator enforces a policy (`shop` is the only
//! composite, `ops` the only admin, each service acts only on its own
//! partials and endpoints), and only the coordinator may call phase 2.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tcc_demo_services::pb::{self, customers_client::CustomersClient, inventory_client::InventoryClient};
use tcc_demo_services::pki::{Options, Pki};
use tcc_demo_services::runtime::{self, Common, TlsArgs};
use tcc_demo_services::{customers, inventory, orders, shop};

#[derive(Parser)]
#[command(about = "Runs the coordinator and the demo shop (customers, inventory, orders, shop)")]
struct Args {
    /// Where the databases live (coordinator, customers, inventory, orders).
    #[arg(long, default_value = "demo-data")]
    data_dir: PathBuf,
    /// Coordinator port; customers, inventory, orders and shop take the next four.
    #[arg(long, default_value_t = 50051)]
    port: u16,
    /// Run everything over mutual TLS, with a policy (see the module docs).
    #[arg(long)]
    tls: bool,
    /// Keep the services' data in PostgreSQL instead of sled: customers,
    /// inventory and orders each in a database of its own (`shop_customers`,
    /// `shop_inventory`, `shop_orders`, created if missing) on the server at
    /// this URL (`postgres://USER@HOST:PORT`). The coordinator keeps its
    /// embedded store in --data-dir.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
}

/// The URL of database `name` on the server of `url` (a `postgres://` URL,
/// whose own database, if any, is replaced).
fn database_on(url: &str, name: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .with_context(|| format!("--database-url must be a postgres:// URL, got {url:?}"))?;
    let (server, query) = match rest.split_once('?') {
        Some((server, query)) => (server, format!("?{query}")),
        None => (rest, String::new()),
    };
    let server = server.split_once('/').map_or(server, |(server, _)| server);
    Ok(format!("postgres://{server}/{name}{query}"))
}

/// Creates the services' databases on the server at `url`, unless they
/// exist; returns each service's URL.
async fn create_databases(url: &str) -> anyhow::Result<Vec<(&'static str, String)>> {
    let admin = database_on(url, "postgres")?;
    let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {url}"))?;
    tokio::spawn(connection);
    let mut out = Vec::new();
    for service in ["customers", "inventory", "orders"] {
        let name = format!("shop_{service}");
        let exists = client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await?.is_some();
        if !exists {
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .with_context(|| format!("cannot create database {name}"))?;
            println!("created database {name}");
        }
        out.push((service, database_on(url, &name)?));
    }
    Ok(out)
}

/// The identities of the demo.
const IDENTITIES: [&str; 6] = ["tcc-coordinator", "customers", "inventory", "orders", "shop", "ops"];

/// Makes (on first start) the demo CA, a certificate per identity and the
/// coordinator's policy in `dir`; returns the TLS flags of `identity`.
fn tls_material(dir: &std::path::Path) -> anyhow::Result<()> {
    if dir.join("ca.pem").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let pki = Pki::new("tcc demo CA")?;
    for identity in IDENTITIES {
        pki.write(dir, identity, &Options::default())?;
    }
    std::fs::write(dir.join("policy.toml"), "admin = [\"ops\"]\n\n[composite]\nshop = \"own\"\n")?;
    // Last: its presence means the rest is there.
    std::fs::write(dir.join("ca.pem"), pki.ca_pem())?;
    println!("made a demo CA and certificates for {} in {}", IDENTITIES.join(", "), dir.display());
    Ok(())
}

fn tls_args(dir: &std::path::Path, identity: &str) -> TlsArgs {
    TlsArgs {
        tls_cert: Some(dir.join(format!("{identity}.pem"))),
        tls_key: Some(dir.join(format!("{identity}.key"))),
        tls_ca: Some(dir.join("ca.pem")),
        coordinator_identity: "tcc-coordinator".to_string(),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    runtime::main("shop-demo", "shop-demo", None, run(args)).await
}

async fn run(args: Args) -> anyhow::Result<()> {
    let addr = |offset: u16| format!("127.0.0.1:{}", args.port + offset);
    let scheme = if args.tls { "https" } else { "http" };
    let url = |offset: u16| format!("{scheme}://{}", addr(offset));
    let tls_dir = args.data_dir.join("tls");
    if args.tls {
        tls_material(&tls_dir)?;
    }
    let tls = |identity: &str| if args.tls { tls_args(&tls_dir, identity) } else { TlsArgs::default() };
    // Each service stops on SIGINT/SIGTERM by itself; the coordinator stops
    // after them, so that they deregister from a coordinator still there.
    let stop_coordinator = tokio_util::sync::CancellationToken::new();

    let config = {
        use clap::Parser as _;
        let dir = args.data_dir.join("coordinator");
        let mut flags = vec![
            "tcc-coordinator".to_string(),
            "--listen".to_string(),
            addr(0),
            "--data-dir".to_string(),
            dir.to_string_lossy().into_owned(),
        ];
        if args.tls {
            let file = |name: &str| tls_dir.join(name).to_string_lossy().into_owned();
            for (flag, name) in [
                ("--tls-cert", "tcc-coordinator.pem"),
                ("--tls-key", "tcc-coordinator.key"),
                ("--tls-client-ca", "ca.pem"),
                ("--policy", "policy.toml"),
            ] {
                flags.extend([flag.to_string(), file(name)]);
            }
        }
        tcc_coordinator::Config::try_parse_from(flags)?
    };
    // Its first port is the quickstart coordinator's: say what to do.
    let listener = tcc_coordinator::net::bind(config.listen, "--port").await.map_err(|e| anyhow::anyhow!(e))?;
    let mut coordinator = tokio::spawn(tcc_coordinator::server::run(config, listener, stop_coordinator.clone(), |a| {
        println!("coordinator listening on {a}")
    }));

    let databases = match &args.database_url {
        Some(url) => create_databases(url).await?,
        None => Vec::new(),
    };
    let database = |name: &str| databases.iter().find(|(s, _)| *s == name).map(|(_, url)| url.clone());
    let common = |offset: u16, name: &str| Common {
        listen: addr(offset).parse().unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        data_dir: database(name).is_none().then(|| args.data_dir.join(name)),
        database_url: database(name),
        coordinator: url(0),
        lease_ms: 3_000,
        no_register: false,
        reconcile_period_ms: 2_000,
        reconcile_grace_ms: 5_000,
        tls: tls(name),
        otlp_endpoint: None,
    };
    let mut services = tokio::task::JoinSet::new();
    services.spawn(customers::run(common(1, "customers")));
    services.spawn(inventory::run(common(2, "inventory")));
    services.spawn(orders::run(common(3, "orders")));
    services.spawn(shop::run(shop::ShopArgs {
        listen: addr(4).parse()?,
        coordinator: url(0),
        customers: url(1),
        inventory: url(2),
        orders: url(3),
        timeout_ms: 10_000,
        wait_ms: 10_000,
        tls: tls("shop"),
        otlp_endpoint: None,
    }));

    let (customers_url, inventory_url) = (url(1), url(2));
    // A part that stops during start-up (its data directory locked by
    // another demo, say) says why at once.
    let ops = tls("ops");
    tokio::select! {
        seeded = seed(&customers_url, &inventory_url, &ops) => seeded?,
        Some(stopped) = services.join_next() => {
            stopped??;
            anyhow::bail!("a shop service stopped during start-up");
        }
        stopped = &mut coordinator => {
            stopped??;
            anyhow::bail!("the coordinator stopped during start-up");
        }
    }
    if args.tls {
        let file = |name: &str| tls_dir.join(name).display().to_string();
        let flags = format!("-cacert {} -cert {} -key {}", file("ca.pem"), file("ops.pem"), file("ops.key"));
        println!(
            "\nThe shop is open, over mutual TLS. Try (as the identity ops):\n  grpcurl {flags} -d '{{\"customer\": \"alice\", \"items\": [{{\"sku\": \"book\", \"quantity\": 2}}]}}' {} shop.v1.Shop/PlaceOrder\n  grpcurl {flags} -d '{{}}' {} tcc.v1.Admin/ListTransactions\n  grpcurl {flags} -d '{{}}' {} shop.v1.Customers/ListAccounts\nCtrl-C stops everything.\n",
            addr(4),
            addr(0),
            addr(1)
        );
    } else {
        println!(
            "\nThe shop is open. Try:\n  grpcurl -plaintext -d '{{\"customer\": \"alice\", \"items\": [{{\"sku\": \"book\", \"quantity\": 2}}]}}' {} shop.v1.Shop/PlaceOrder\n  grpcurl -plaintext -d '{{}}' {} shop.v1.Customers/ListAccounts\n  grpcurl -plaintext -d '{{}}' {} shop.v1.Inventory/ListItems\nCtrl-C stops everything.\n",
            addr(4),
            addr(1),
            addr(2)
        );
    }

    while let Some(stopped) = services.join_next().await {
        stopped??;
    }
    stop_coordinator.cancel();
    coordinator.await??;
    Ok(())
}

/// Seeds sample customers and items unless they exist.
async fn seed(customers_url: &str, inventory_url: &str, tls: &TlsArgs) -> anyhow::Result<()> {
    let mut customers = connect(customers_url, tls, CustomersClient::new).await?;
    let mut inventory = connect(inventory_url, tls, InventoryClient::new).await?;
    if customers.list_accounts(pb::ListRequest {}).await?.into_inner().accounts.is_empty() {
        for (customer, credit) in [("alice", 100), ("bob", 30)] {
            customers.seed(pb::SeedCustomerRequest { customer: customer.into(), credit }).await?;
        }
        for (sku, quantity, price) in [("book", 10, 15), ("pen", 100, 2)] {
            inventory.seed(pb::SeedItemRequest { sku: sku.into(), quantity, price }).await?;
        }
        println!("seeded customers alice (credit 100), bob (30); items book (10 at 15), pen (100 at 2)");
    }
    Ok(())
}

async fn connect<C>(url: &str, tls: &TlsArgs, make: impl Fn(tonic::transport::Channel) -> C) -> anyhow::Result<C> {
    let endpoint = match tls.load()? {
        Some(tls) => tls.endpoint(url)?,
        None => tonic::transport::Endpoint::from_shared(url.to_string())?,
    };
    for _ in 0..100 {
        if let Ok(ch) = endpoint.connect().await {
            return Ok(make(ch));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("{url} did not come up within 10 s")
}
