//! The demo's own surface: each shop service lists in reflection exactly
//! the services it serves and reports each as SERVING; `shop-demo` stops
//! on SIGINT without a warning (the services deregister before the
//! coordinator stops), and a second `shop-demo` on the same data says why
//! it cannot start, at once. `shop-demo --tls` runs the whole shop over
//! mutual TLS with a policy.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use tcc_tests::shop::Shop;
use tcc_tests::{binary, free_port};

/// A port such that it and the next four are free (`shop-demo` takes five
/// in a row).
fn five_free_ports() -> Result<u16> {
    for _ in 0..50 {
        let port = free_port()?;
        if port < 65_000 && (1..5).all(|i| std::net::TcpListener::bind(("127.0.0.1", port + i)).is_ok()) {
            return Ok(port);
        }
    }
    anyhow::bail!("no five free ports in a row")
}
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

async fn listed(channel: tonic::transport::Channel) -> Result<Vec<String>> {
    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl.server_reflection_info(tokio_stream::iter(vec![req])).await?.into_inner();
    let resp = stream.message().await?.context("no reflection answer")?;
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { anyhow::bail!("not a list") };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    Ok(names)
}

#[tokio::test]
async fn each_shop_service_lists_and_reports_what_it_serves() -> Result<()> {
    let shop = Shop::start().await?;
    for (process, served) in [
        (&shop.customers, vec!["shop.v1.Customers", "tcc.v1.Participant"]),
        (&shop.inventory, vec!["shop.v1.Inventory", "tcc.v1.Participant"]),
        (&shop.orders, vec!["shop.v1.Orders", "tcc.v1.Participant"]),
        (&shop.shop, vec!["shop.v1.Shop"]),
    ] {
        let mut want: Vec<String> = served.iter().map(|s| s.to_string()).collect();
        want.extend(["grpc.health.v1.Health".to_string(), "grpc.reflection.v1.ServerReflection".to_string()]);
        want.sort();
        assert_eq!(listed(process.channel().await?).await?, want);
        let mut health = HealthClient::new(process.channel().await?);
        for service in served {
            let status = health.check(HealthCheckRequest { service: service.into() }).await?.into_inner().status;
            assert_eq!(status, ServingStatus::Serving as i32, "{service}");
        }
    }
    Ok(())
}

/// Starts `shop-demo` on `data` and `port`; returns it once the shop is
/// open (or its exit, if it ends first), with its output so far.
async fn shop_demo(data: &std::path::Path, port: u16) -> Result<(tokio::process::Child, String)> {
    shop_demo_with(data, port, &[]).await
}

async fn shop_demo_with(data: &std::path::Path, port: u16, extra: &[&str]) -> Result<(tokio::process::Child, String)> {
    let mut child = tokio::process::Command::new(binary("shop-demo"))
        .arg("--data-dir")
        .arg(data)
        .args(["--port", &port.to_string()])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = out.next_line().await? {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("The shop is open") {
                break;
            }
        }
        anyhow::Ok(())
    })
    .await??;
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    Ok((child, seen))
}

#[tokio::test]
async fn shop_demo_stops_cleanly_and_a_second_one_says_why_it_cannot_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let port = five_free_ports()?;
    let (mut first, seen) = shop_demo(dir.path(), port).await?;
    assert!(seen.contains("The shop is open"), "{seen}");

    // Same data, other ports: refused at once, naming the lock.
    let started = std::time::Instant::now();
    let second = tokio::process::Command::new(binary("shop-demo"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--port", &five_free_ports()?.to_string()])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let second = tokio::time::timeout(Duration::from_secs(30), second).await??;
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(said.contains("another coordinator is using it") || said.contains("lock"), "{said}");
    assert!(!said.contains("did not come up"), "{said}");
    assert!(started.elapsed() < Duration::from_secs(8), "took {:?}", started.elapsed());
    assert!(!said.contains('\x1b'), "colour codes in a log that is not a terminal: {said:?}");

    // Other data, the same ports (the quickstart's coordinator still on
    // 50051, say): it says what to do.
    let other = tempfile::tempdir()?;
    let third = tokio::process::Command::new(binary("shop-demo"))
        .arg("--data-dir")
        .arg(other.path())
        .args(["--port", &port.to_string()])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let third = tokio::time::timeout(Duration::from_secs(30), third).await??;
    let said = String::from_utf8_lossy(&third.stderr);
    assert!(!third.status.success());
    assert!(said.contains("already in use") && said.contains("give --port another port"), "{said}");

    // SIGINT: everything stops, without a warning.
    let pid = first.id().context("pid")?;
    std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status()?;
    let status = tokio::time::timeout(Duration::from_secs(20), first.wait()).await??;
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut first.stderr.take().context("stderr")?, &mut stderr).await?;
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(!stderr.contains("deregistration failed"), "{stderr}");
    assert!(!stderr.contains("WARN") && !stderr.contains("ERROR"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn the_shop_demo_runs_entirely_over_mutual_tls() -> Result<()> {
    use tcc_demo_services::pb::{self, customers_client::CustomersClient, shop_client::ShopClient};
    use tcc_proto::v1::{PhaseTwoRequest, participant_client::ParticipantClient};

    let dir = tempfile::tempdir()?;
    let port = five_free_ports()?;
    let (mut demo, seen) = shop_demo_with(dir.path(), port, &["--tls"]).await?;
    assert!(seen.contains("over mutual TLS"), "{seen}");
    let tls = dir.path().join("tls");
    let ops = tcc_domain_sdk::tls::Tls::from_files(&tls.join("ops.pem"), &tls.join("ops.key"), &tls.join("ca.pem"))?;
    let url = |offset: u16| format!("https://127.0.0.1:{}", port + offset);

    // An order goes through: the shop begins over TLS, the services append
    // over TLS, and the coordinator delivers phase 2 over TLS to them.
    let mut shop = ShopClient::new(ops.endpoint(&url(4))?.connect().await?);
    let line = pb::Line { sku: "book".into(), quantity: 2 };
    let order = pb::PlaceOrderRequest { customer: "alice".into(), items: vec![line] };
    let placed = shop.place_order(order).await?.into_inner();
    assert_eq!(placed.state, "TRANSACTION_STATE_CONFIRMED", "{placed:?}");
    let mut customers = CustomersClient::new(ops.endpoint(&url(1))?.connect().await?);
    let alice = customers.get_account(pb::GetAccountRequest { customer: "alice".into() }).await?.into_inner();
    assert_eq!((alice.available, alice.held, alice.debited), (70, 0, 30), "{alice:?}");

    // Nothing is served in plaintext.
    for offset in 0..5 {
        let plain = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", port + offset))?;
        let answered = match plain.connect().await {
            Ok(channel) => HealthClient::new(channel).check(HealthCheckRequest::default()).await.is_ok(),
            Err(_) => false,
        };
        assert!(!answered, "port {} answered in plaintext", port + offset);
    }
    // Phase 2 is accepted from the coordinator only: an operator's valid
    // certificate cannot make a service apply commands.
    let mut participant = ParticipantClient::new(ops.endpoint(&url(1))?.connect().await?);
    let forged = PhaseTwoRequest {
        transaction_id: placed.transaction_id.clone(),
        partial_id: "forged".into(),
        service: "customers".into(),
        commands: Vec::new(),
    };
    let refused = participant.commit(forged).await.expect_err("a forged commit was accepted");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("\"ops\""), "{refused:?}");

    let pid = demo.id().context("pid")?;
    std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status()?;
    let status = tokio::time::timeout(Duration::from_secs(20), demo.wait()).await??;
    assert!(status.success(), "{status:?}");
    Ok(())
}

/// Places the same orders on a `shop-demo` (alice buys two books, bob
/// three pens, bob ten books: refused) and returns what its services
/// then list: every account and every item.
async fn orders_and_balances(port: u16) -> Result<(Vec<String>, Vec<String>)> {
    use tcc_demo_services::pb::{
        self, customers_client::CustomersClient, inventory_client::InventoryClient, shop_client::ShopClient,
    };
    let url = |offset: u16| format!("http://127.0.0.1:{}", port + offset);
    let mut shop = ShopClient::connect(url(4)).await?;
    for (customer, sku, quantity, ok) in
        [("alice", "book", 2, true), ("bob", "pen", 3, true), ("bob", "book", 10, false)]
    {
        let order =
            pb::PlaceOrderRequest { customer: customer.into(), items: vec![pb::Line { sku: sku.into(), quantity }] };
        let placed = shop.place_order(order).await;
        assert_eq!(placed.is_ok(), ok, "{customer} {quantity} {sku}: {placed:?}");
    }
    let accounts = CustomersClient::connect(url(1)).await?.list_accounts(pb::ListRequest {}).await?.into_inner();
    let items = InventoryClient::connect(url(2)).await?.list_items(pb::ListRequest {}).await?.into_inner();
    let mut accounts: Vec<String> = accounts.accounts.iter().map(|a| format!("{a:?}")).collect();
    let mut items: Vec<String> = items.items.iter().map(|i| format!("{i:?}")).collect();
    accounts.sort();
    items.sort();
    Ok((accounts, items))
}

#[tokio::test]
async fn the_shop_demo_on_postgres_gives_the_balances_of_the_sled_run() -> Result<()> {
    let Some(pg) = tcc_tests::pg::Postgres::start().await? else { return Ok(()) };
    let on_sled = {
        let dir = tempfile::tempdir()?;
        let port = five_free_ports()?;
        let (_demo, _) = shop_demo(dir.path(), port).await?;
        orders_and_balances(port).await?
    };
    let dir = tempfile::tempdir()?;
    let port = five_free_ports()?;
    let server = format!("postgres://tcc@127.0.0.1:{}", pg.port());
    let (mut demo, seen) = shop_demo_with(dir.path(), port, &["--database-url", &server]).await?;
    assert!(seen.contains("created database shop_customers"), "{seen}");
    let on_postgres = orders_and_balances(port).await?;
    assert_eq!(on_postgres, on_sled, "the same orders leave the same balances on either store");
    assert!(on_sled.0.iter().any(|a| a.contains("\"alice\"") && a.contains("debited: 30")), "{on_sled:?}");

    // The data is in the services' own databases, referring to each other
    // only by soft references.
    let db = |name: &str| format!("postgres://tcc@127.0.0.1:{}/{name}", pg.port());
    let (orders, conn) = tokio_postgres::connect(&db("shop_orders"), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let rows = orders.query("SELECT customers_customer_id, total FROM orders ORDER BY total", &[]).await?;
    let placed: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(placed, vec![("bob".to_string(), 6), ("alice".to_string(), 30)]);
    let (customers, conn) = tokio_postgres::connect(&db("shop_customers"), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let debits: i64 = customers.query_one("SELECT count(*) FROM debits", &[]).await?.get(0);
    let decided: i64 = customers.query_one("SELECT count(*) FROM tcc_guard WHERE outcome <> 'T'", &[]).await?.get(0);
    assert_eq!((debits, decided), (2, 3), "two debits; three partials decided (the refused order's rolled back)");
    for (client, name) in [(&orders, "orders"), (&customers, "customers")] {
        let fks: i64 = client
            .query_one("SELECT count(*) FROM information_schema.table_constraints WHERE constraint_type = 'FOREIGN KEY' AND table_name <> 'order_lines'", &[])
            .await?
            .get(0);
        assert_eq!(fks, 0, "no foreign key leaves the {name} service");
    }
    let pid = demo.id().context("pid")?;
    std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status()?;
    let status = tokio::time::timeout(Duration::from_secs(20), demo.wait()).await??;
    assert!(status.success(), "{status:?}");
    Ok(())
}
