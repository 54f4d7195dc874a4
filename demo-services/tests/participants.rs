//! The shop's participants applied directly on their own stores (no
//! network): commit turns holds into debits/sales, rollback releases, and a
//! commit whose commands do not match the holds is refused without changing
//! anything. (Cargo also builds this package's binaries for its integration
//! tests, which the end-to-end tests in `tests/` spawn.)

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use tcc_demo_services::customers::{CustomersParticipant, Debit};
use tcc_demo_services::db::{Movements, ShopStore, TREES};
use tcc_demo_services::inventory::{InventoryParticipant, Take};
use tcc_domain_sdk::participant::{Phase, PhaseTwo, ReceivedCommand, apply};
use tcc_domain_sdk::propagation::PartialContext;
use tcc_domain_sdk::reservations::Reservations;
use tcc_domain_sdk::store::sled::SledStore;
use tcc_domain_sdk::{Command, Error};

fn store() -> (tempfile::TempDir, SledStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), &TREES).unwrap();
    (dir, store)
}

async fn movements(store: &SledStore, kind: Movements) -> usize {
    store.movements(kind).await.unwrap().len()
}

fn command<C: Command>(seq: u64, c: &C) -> ReceivedCommand {
    ReceivedCommand {
        sequence: seq,
        type_name: C::TYPE.into(),
        key: String::new(),
        payload: serde_json::to_vec(c).unwrap(),
    }
}

fn ctx(p: &str) -> PartialContext {
    PartialContext { partial_id: p.into(), transaction_id: "t".into(), deadline_ms: i64::MAX }
}

#[tokio::test]
async fn customers_commit_debits_what_was_held() -> Result<(), Error> {
    let (_d, store) = store();
    store.seed("ann", 50).await?;
    store.hold(&ctx("p1"), &[("ann".into(), 20)]).await.map_err(|e| Error::Store(e.to_string()))?;
    let debit = Debit { order_id: "o1".into(), customer: "ann".into(), amount: 20 };
    let call =
        Arc::new(PhaseTwo { transaction_id: "t".into(), partial_id: "p1".into(), commands: vec![command(1, &debit)] });
    apply(&store, Arc::new(CustomersParticipant::default()), Phase::Committed, call).await?;
    let a = store.account("ann").await?.unwrap();
    assert_eq!((a.available, a.held, a.used), (30, 0, 20));
    assert_eq!(movements(&store, Movements::Debits).await, 1);
    Ok(())
}

#[tokio::test]
async fn a_commit_that_does_not_match_the_holds_is_refused_and_changes_nothing() -> Result<(), Error> {
    let (_d, store) = store();
    store.seed("ann", 50).await?;
    store.hold(&ctx("p1"), &[("ann".into(), 20)]).await.map_err(|e| Error::Store(e.to_string()))?;
    let too_much = Debit { order_id: "o1".into(), customer: "ann".into(), amount: 25 };
    let call = Arc::new(PhaseTwo {
        transaction_id: "t".into(),
        partial_id: "p1".into(),
        commands: vec![command(1, &too_much)],
    });
    let r = apply(&store, Arc::new(CustomersParticipant::default()), Phase::Committed, call).await;
    assert!(matches!(r, Err(Error::Refused(_))), "{r:?}");
    let a = store.account("ann").await?.unwrap();
    assert_eq!((a.available, a.held, a.used), (30, 20, 0), "nothing applied");
    assert_eq!(movements(&store, Movements::Debits).await, 0);
    Ok(())
}

#[tokio::test]
async fn inventory_rollback_releases_every_line() -> Result<(), Error> {
    let (_d, store) = store();
    store.seed("book", 5).await?;
    store.seed("pen", 9).await?;
    let lines = [("book".to_string(), 2), ("pen".to_string(), 3)];
    store.hold(&ctx("p2"), &lines).await.map_err(|e| Error::Store(e.to_string()))?;
    let takes: Vec<ReceivedCommand> = lines
        .iter()
        .enumerate()
        .map(|(i, (sku, q))| command(i as u64 + 1, &Take { order_id: "o2".into(), sku: sku.clone(), quantity: *q }))
        .collect();
    let call = Arc::new(PhaseTwo { transaction_id: "t".into(), partial_id: "p2".into(), commands: takes });
    apply(&store, Arc::new(InventoryParticipant::default()), Phase::RolledBack, call).await?;
    for (sku, total) in [("book", 5), ("pen", 9)] {
        let a = store.account(sku).await?.unwrap();
        assert_eq!((a.available, a.held, a.used), (total, 0, 0), "{sku}");
    }
    assert_eq!(movements(&store, Movements::Sales).await, 0);
    Ok(())
}
