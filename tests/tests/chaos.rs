//! Chaos: the demo shop under concurrent load while the coordinator and
//! the participant services are killed (-9) and restarted at random; then
//! the system settles and the shop's invariants are checked: money and
//! stock conserved, every order with exactly one debit and one stock
//! movement, no hold left, no transaction stuck outside a terminal state.
//!
//! The same with the services keeping their data in PostgreSQL (a
//! database each, the coordinator on its embedded store); and on a
//! cluster: three coordinators on one PostgreSQL server (each shop service
//! talks to a different coordinator), coordinators and services killed at
//! random, and the server itself crashed and restarted once in the middle
//! of the run, with the services on sled and again with their databases
//! on that same server.
//!
//! The CI configuration runs 8 s of chaos each. A longer run by hand:
//! `TCC_CHAOS_SECS=300 cargo test --workspace --test chaos -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use tcc_domain_sdk::proto::{self as v1, TransactionState as S};
use tcc_tests::eventually;
use tcc_tests::pg::Postgres;
use tcc_tests::shop::Shop;
use tokio::sync::Mutex;

/// A small deterministic generator (xorshift), seeded per run and printed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn settings() -> (u64, u64) {
    let secs: u64 = std::env::var("TCC_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let seed: u64 = std::env::var("TCC_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64 | 1).unwrap_or(7)
    });
    println!("chaos: {secs} s, seed {seed} (TCC_CHAOS_SEED={seed} replays the schedule)");
    (secs, seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_keeps_its_invariants_while_processes_are_killed() -> Result<()> {
    let (secs, seed) = settings();
    let shop = Shop::start_on_fixed_ports(&[], &["--timeout-ms", "3000", "--wait-ms", "3000"]).await?;
    chaos(shop, secs, seed, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_with_its_services_on_postgres_keeps_its_invariants_while_processes_are_killed() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let (secs, seed) = settings();
    let shop = Shop::start_on_fixed_ports_on_postgres(&pg, &["--timeout-ms", "3000", "--wait-ms", "3000"]).await?;
    chaos(shop, secs, seed, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_on_a_cluster_keeps_its_invariants_while_coordinators_and_the_database_fail() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let (secs, seed) = settings();
    let shop = Shop::start_cluster(&pg, false, &["--timeout-ms", "3000", "--wait-ms", "3000"]).await?;
    chaos(shop, secs, seed, Some(pg)).await
}

/// The cluster's database server also holds the services' databases, so
/// its crash hits the coordinators and the participants at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_on_a_cluster_with_its_services_on_postgres_keeps_its_invariants_while_the_server_fails() -> Result<()>
{
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let (secs, seed) = settings();
    let shop = Shop::start_cluster(&pg, true, &["--timeout-ms", "3000", "--wait-ms", "3000"]).await?;
    chaos(shop, secs, seed, Some(pg)).await
}

/// Runs the load and the kills for `secs`, with the database (if any)
/// crashed and restarted once halfway; then settles and checks.
async fn chaos(mut shop: Shop, secs: u64, seed: u64, mut db: Option<Postgres>) -> Result<()> {
    let customers: Vec<String> = (0..8).map(|i| format!("c{i}")).collect();
    let skus = ["s0", "s1", "s2", "s3"];
    let seeded_customers: Vec<(&str, i64)> = customers.iter().map(|c| (c.as_str(), 500)).collect();
    shop.seed(&seeded_customers, &[("s0", 400, 1), ("s1", 400, 2), ("s2", 400, 3), ("s3", 400, 5)]).await?;
    let shop = Arc::new(Mutex::new(shop));

    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let placed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);

    // Load: 6 buyers, bounded by the deadline.
    let mut buyers = Vec::new();
    for b in 0..6u64 {
        let (shop, stop, outcomes, placed, customers) =
            (shop.clone(), stop.clone(), outcomes.clone(), placed.clone(), customers.clone());
        buyers.push(tokio::spawn(async move {
            let mut rng = Rng(seed.wrapping_add(b * 7919) | 1);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let customer = customers[rng.below(customers.len() as u64) as usize].clone();
                let first = rng.below(4) as usize;
                let mut items = vec![(skus[first], 1 + rng.below(3) as i64)];
                if rng.below(2) == 0 {
                    items.push((skus[(first + 1) % 4], 1));
                }
                let client = { shop.lock().await.shop().await };
                let result = match client {
                    Ok(mut c) => {
                        let items = items
                            .iter()
                            .map(|(s, q)| tcc_demo_services::pb::Line { sku: s.to_string(), quantity: *q })
                            .collect();
                        let req = tcc_demo_services::pb::PlaceOrderRequest { customer, items };
                        let call = tokio::time::timeout(Duration::from_secs(15), c.place_order(req)).await;
                        match call {
                            Ok(Ok(_)) => "confirmed".to_string(),
                            Ok(Err(s)) => format!("{:?}", s.code()),
                            Err(_) => "timeout".to_string(),
                        }
                    }
                    Err(_) => "shop unreachable".to_string(),
                };
                placed.fetch_add(1, Ordering::Relaxed);
                *outcomes.lock().await.entry(result).or_default() += 1;
            }
        }));
    }

    // Chaos: kill -9 and restart a random process, bounded by the deadline.
    let mut rng = Rng(seed);
    let mut kills = BTreeMap::<&str, u64>::new();
    let victims: &[&str] = if shop.lock().await.peers.is_empty() {
        &["coordinator", "customers", "inventory", "orders"]
    } else {
        &["coordinator", "coordinator-2", "coordinator-3", "customers", "inventory", "orders"]
    };
    let db_restart_at = Instant::now() + Duration::from_secs(secs) / 2;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(600))).await;
        if let Some(pg) = db.as_mut()
            && Instant::now() >= db_restart_at
            && !kills.contains_key("database")
        {
            pg.crash().await?;
            tokio::time::sleep(Duration::from_millis(100 + rng.below(300))).await;
            pg.start_again().await?;
            kills.insert("database", 1);
            continue;
        }
        let victim = victims[rng.below(victims.len() as u64) as usize];
        let mut s = shop.lock().await;
        match victim {
            "coordinator" => s.coordinator.kill9().await?,
            "coordinator-2" => s.peers[0].kill9().await?,
            "coordinator-3" => s.peers[1].kill9().await?,
            "customers" => s.customers.kill9().await?,
            "inventory" => s.inventory.kill9().await?,
            _ => s.orders.kill9().await?,
        }
        drop(s);
        tokio::time::sleep(Duration::from_millis(100 + rng.below(300))).await;
        let mut s = shop.lock().await;
        match victim {
            "coordinator" => s.coordinator.restart().await?,
            "coordinator-2" => s.peers[0].restart().await?,
            "coordinator-3" => s.peers[1].restart().await?,
            "customers" => s.customers.restart().await?,
            "inventory" => s.inventory.restart().await?,
            _ => s.orders.restart().await?,
        }
        *kills.entry(victim).or_default() += 1;
    }
    if db.is_some() {
        anyhow::ensure!(kills.contains_key("database"), "the database was restarted once");
    }
    stop.store(true, Ordering::Relaxed);
    for b in buyers {
        b.await?;
    }

    // Settle: every transaction terminal and no hold left (bounded).
    let shop = Arc::try_unwrap(shop).map_err(|_| anyhow::anyhow!("shop still shared"))?.into_inner();
    let unsettled = [S::Active, S::Confirming, S::Cancelling].map(|s| s as i32).to_vec();
    eventually(
        "every transaction to reach a terminal state and every hold to be released",
        Duration::from_secs(60),
        || async {
            let req = v1::ListTransactionsRequest { states: unsettled.clone(), page_size: 10, ..Default::default() };
            let open = shop.coordinator.admin().await?.list_transactions(req).await?.into_inner().transactions;
            let held: i64 = shop.accounts().await?.values().map(|a| a.held).sum::<i64>()
                + shop.items().await?.values().map(|i| i.held).sum::<i64>();
            Ok((open.is_empty() && held == 0).then_some(()))
        },
    )
    .await?;
    let all = shop.coordinator.list_all(&[]).await?;
    let mut states = BTreeMap::<String, u64>::new();
    for t in &all {
        *states.entry(format!("{:?}", S::try_from(t.state).unwrap_or(S::Unspecified))).or_default() += 1;
    }
    assert!(!states.keys().any(|k| k.starts_with("Failed")), "no transaction failed for good: {states:?}");
    let orders = shop.check_settled().await?;
    println!(
        "chaos report: {} orders attempted, outcomes {:?}; kills {:?}; transactions {:?}; {} orders recorded; invariants hold",
        placed.load(Ordering::Relaxed),
        outcomes.lock().await,
        kills,
        states,
        orders
    );
    assert!(kills.values().sum::<u64>() >= 3, "chaos must actually kill processes: {kills:?}");
    assert!(orders > 0, "some orders must get through");
    Ok(())
}
