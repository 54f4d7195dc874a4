//! End-to-end tests of the demo shop: the coordinator and the four service
//! binaries, each with its own database. Orders that succeed, orders that
//! are refused, orders that compete for the last items, a participant that
//! is down when confirm happens, duplicate deliveries, late tries, and the
//! reconciler settling a hold whose delivery never comes. The shop's
//! invariants are checked after each.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tcc_demo_services::pb;
use tcc_domain_sdk::propagation::attach;
use tcc_domain_sdk::proto::{self as v1, participant_client::ParticipantClient};
use tcc_tests::eventually;
use tcc_tests::shop::Shop;
use tonic::Code;

#[tokio::test]
async fn a_successful_order_moves_credit_and_stock_once() -> Result<()> {
    let mut s = Shop::start().await?;
    s.seed(&[("alice", 100)], &[("book", 10, 15), ("pen", 50, 2)]).await?;
    let r = s.place("alice", &[("book", 2), ("pen", 5)]).await?;
    assert_eq!((r.total, r.state.as_str()), (40, "TRANSACTION_STATE_CONFIRMED"));
    let a = &s.accounts().await?["alice"];
    assert_eq!((a.available, a.held, a.debited), (60, 0, 40));
    let items = s.items().await?;
    assert_eq!((items["book"].available, items["book"].sold), (8, 2));
    assert_eq!((items["pen"].available, items["pen"].sold), (45, 5));
    assert_eq!(s.check_settled().await?, 1);
    let orders = s.orders().await?.list_orders(pb::ListRequest {}).await?.into_inner().orders;
    assert_eq!(
        (orders[0].order_id.as_str(), orders[0].transaction_id.as_str()),
        (r.order_id.as_str(), r.transaction_id.as_str())
    );
    Ok(())
}

#[tokio::test]
async fn refused_orders_leave_every_balance_unchanged() -> Result<()> {
    let mut s = Shop::start().await?;
    s.seed(&[("bob", 30)], &[("book", 2, 15)]).await?;
    let before = (s.accounts().await?, s.items().await?);
    /// (customer, items, expected code, expected message part)
    type Case<'a> = (&'a str, Vec<(&'a str, i64)>, Code, &'a str);
    let cases: Vec<Case> = vec![
        ("nobody", vec![("book", 1)], Code::NotFound, "unknown customer \"nobody\""),
        ("bob", vec![("book", 3)], Code::FailedPrecondition, "not enough stock of \"book\": 2 available, 3 requested"),
        ("bob", vec![("ghost", 1)], Code::NotFound, "unknown item \"ghost\""),
        ("bob", vec![], Code::InvalidArgument, "at least one line"),
        ("bob", vec![("book", 0)], Code::InvalidArgument, "quantity"),
    ];
    for (customer, items, code, msg) in cases {
        let err = s.place(customer, &items).await.expect_err("order must be refused");
        assert_eq!(err.code(), code, "{customer} {items:?}: {err:?}");
        assert!(err.message().contains(msg), "{}", err.message());
        s.check_conservation().await?;
    }
    let overflow = pb::SeedCustomerRequest { customer: "bob".into(), credit: i64::MAX };
    let err = s.customers().await?.seed(overflow).await.expect_err("overflow");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Not enough credit: stock was reserved first, then released by the rollback.
    s.seed(&[], &[("book", 2, 15)]).await?;
    let err = s.place("bob", &[("book", 3)]).await.expect_err("45 > 30");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("not enough credit: customer \"bob\" has 30 available, 45 needed"),
        "{}",
        err.message()
    );
    assert_eq!(s.accounts().await?, before.0);
    let items = s.items().await?;
    assert_eq!((items["book"].available, items["book"].held, items["book"].sold), (4, 0, 0));
    assert_eq!(s.check_settled().await?, 0, "no order recorded");
    // Every refused order's transaction ended CANCELLED.
    let listed = s
        .coordinator
        .admin()
        .await?
        .list_transactions(v1::ListTransactionsRequest::default())
        .await?
        .into_inner()
        .transactions;
    assert!(!listed.is_empty());
    assert!(listed.iter().all(|t| t.state == v1::TransactionState::Cancelled as i32), "{listed:#?}");
    // The cancel reason is the participant's message, not a Status dump.
    let credit = listed.iter().find(|t| t.reason.contains("not enough credit")).expect("the credit refusal");
    assert_eq!(credit.reason, "not enough credit: customer \"bob\" has 30 available, 45 needed", "{credit:#?}");
    Ok(())
}

#[tokio::test]
async fn concurrent_orders_for_the_last_items_never_oversell() -> Result<()> {
    let mut s = Shop::start().await?;
    let buyers: Vec<String> = (0..12).map(|i| format!("buyer-{i}")).collect();
    let seeded: Vec<(&str, i64)> = buyers.iter().map(|b| (b.as_str(), 10)).collect();
    s.seed(&seeded, &[("gem", 5, 3)]).await?;
    let s = Arc::new(s);
    let tasks: Vec<_> = buyers
        .iter()
        .map(|b| {
            let (s, b) = (s.clone(), b.clone());
            tokio::spawn(async move { s.place(&b, &[("gem", 1)]).await })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await? {
            Ok(r) => {
                assert_eq!(r.state, "TRANSACTION_STATE_CONFIRMED");
                ok += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
                assert!(e.message().contains("not enough stock of \"gem\""), "{}", e.message());
                refused += 1;
            }
        }
    }
    assert_eq!((ok, refused), (5, 7), "exactly the stock was sold");
    let gem = &s.items().await?["gem"];
    assert_eq!((gem.available, gem.held, gem.sold), (0, 0, 5));
    assert_eq!(s.check_settled().await?, 5);
    Ok(())
}

/// The test acts as the composite service: begins with the SDK, calls a try
/// with the partial in metadata.
async fn reserve_credit(
    s: &Shop,
    ctx: &tcc_domain_sdk::propagation::PartialContext,
    customer: &str,
    amount: i64,
) -> Result<(), tonic::Status> {
    let mut c = s.customers().await.map_err(|e| tonic::Status::unknown(e.to_string()))?;
    let mut req =
        tonic::Request::new(pb::ReserveCreditRequest { customer: customer.into(), amount, order_id: "order-x".into() });
    attach(&mut req, ctx);
    c.reserve_credit(req).await.map(|_| ())
}

#[tokio::test]
async fn a_participant_down_at_confirm_gets_its_commit_after_restart_exactly_once() -> Result<()> {
    let mut s = Shop::start().await?;
    s.seed(&[("carol", 50)], &[]).await?;
    let sdk = tcc_domain_sdk::Coordinator::connect(&s.coordinator.url()).await?;
    let txn = sdk.begin(&["customers"], Duration::from_secs(30)).await?;
    let ctx = txn.partial("customers")?;
    reserve_credit(&s, &ctx, "carol", 20).await?;
    s.customers.kill9().await?;
    let o = txn.confirm(None).await?;
    assert_eq!(o.state, v1::TransactionState::Confirming);
    s.customers.restart().await?; // new port; registers itself again
    let o = txn.confirm(Some(Duration::from_secs(20))).await?;
    assert_eq!(o.state, v1::TransactionState::Confirmed, "{}", s.coordinator.logs());
    let a = &s.accounts().await?["carol"];
    assert_eq!((a.available, a.held, a.debited), (30, 0, 20));
    // Durable and applied once, across another crash.
    s.customers.kill9().await?;
    s.customers.restart().await?;
    let a = &s.accounts().await?["carol"];
    assert_eq!((a.available, a.held, a.debited), (30, 0, 20));
    let debits = s.customers().await?.list_debits(pb::ListRequest {}).await?.into_inner().movements;
    assert_eq!(debits.len(), 1, "{debits:?}");
    Ok(())
}

#[tokio::test]
async fn duplicate_deliveries_apply_once() -> Result<()> {
    let mut s = Shop::start().await?;
    s.seed(&[("dave", 100)], &[("book", 5, 10)]).await?;
    let r = s.place("dave", &[("book", 1)]).await?;
    let txn = s
        .coordinator
        .transactions()
        .await?
        .get(v1::GetRequest { transaction_id: r.transaction_id.clone() })
        .await?
        .into_inner();
    let p = txn.participants.iter().find(|p| p.service == "customers").expect("customers participant");
    let commands = s
        .coordinator
        .topics()
        .await?
        .read(v1::ReadRequest { partial_id: p.partial_id.clone(), ..Default::default() })
        .await?
        .into_inner()
        .commands;
    let call = v1::PhaseTwoRequest {
        transaction_id: r.transaction_id.clone(),
        partial_id: p.partial_id.clone(),
        service: "customers".into(),
        commands,
    };
    // Redeliver the commit twice, as a coordinator retrying after a lost ack would.
    let mut participant = ParticipantClient::new(s.customers.channel().await?);
    participant.commit(call.clone()).await?;
    participant.commit(call.clone()).await?;
    let a = &s.accounts().await?["dave"];
    assert_eq!((a.available, a.held, a.debited), (90, 0, 10));
    // The opposite outcome for a committed partial is refused.
    let err = participant.rollback(call).await.expect_err("rollback after commit");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(s.check_settled().await?, 1);
    Ok(())
}

#[tokio::test]
async fn a_try_after_the_decision_is_refused_and_holds_nothing() -> Result<()> {
    let mut s = Shop::start().await?;
    s.seed(&[("erin", 40)], &[]).await?;
    let sdk = tcc_domain_sdk::Coordinator::connect(&s.coordinator.url()).await?;
    let txn = sdk.begin(&["customers"], Duration::from_secs(30)).await?;
    txn.cancel("changed our mind", Some(Duration::from_secs(10))).await?;
    let err = reserve_credit(&s, &txn.partial("customers")?, "erin", 10).await.expect_err("late try");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let a = &s.accounts().await?["erin"];
    assert_eq!((a.available, a.held), (40, 0));
    // A forged partial id, or another service's: the coordinator refuses the
    // append for good, and the hold taken for it is released at once.
    let forged = tcc_domain_sdk::propagation::PartialContext {
        partial_id: "0190a1b2-c3d4-4e5f-8a9b-0c1d2e3f4a5b".into(),
        transaction_id: "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
        deadline_ms: i64::MAX,
    };
    let err = reserve_credit(&s, &forged, "erin", 10).await.expect_err("forged partial");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let txn2 = sdk.begin(&["customers", "inventory"], Duration::from_secs(30)).await?;
    let err = reserve_credit(&s, &txn2.partial("inventory")?, "erin", 10).await.expect_err("foreign partial");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("belongs to service \"inventory\""), "{}", err.message());
    let a = &s.accounts().await?["erin"];
    assert_eq!((a.available, a.held), (40, 0), "nothing held for refused tries");
    // A try outside any transaction is refused too.
    let err = s
        .customers()
        .await?
        .reserve_credit(pb::ReserveCreditRequest { customer: "erin".into(), amount: 1, order_id: "o".into() })
        .await
        .expect_err("no transaction");
    assert_eq!(err.code(), Code::FailedPrecondition);
    Ok(())
}

#[tokio::test]
async fn the_reconciler_settles_a_hold_whose_delivery_never_comes() -> Result<()> {
    // Not registered: the coordinator cannot deliver the rollback.
    let mut s = Shop::start_with(&["--no-register"]).await?;
    s.seed(&[("frank", 25)], &[]).await?;
    let sdk = tcc_domain_sdk::Coordinator::connect(&s.coordinator.url()).await?;
    let txn = sdk.begin(&["customers"], Duration::from_millis(500)).await?;
    reserve_credit(&s, &txn.partial("customers")?, "frank", 10).await?;
    assert_eq!(s.accounts().await?["frank"].held, 10);
    // Deadline 500 ms + grace 300 ms + reconciler period 200 ms: settled in
    // about a second; allow 15 s on a loaded machine.
    eventually("the reconciler to release the hold", Duration::from_secs(15), || async {
        let a = s.accounts().await?.remove("frank").expect("frank");
        Ok((a.held == 0).then_some(a))
    })
    .await?;
    let a = &s.accounts().await?["frank"];
    assert_eq!((a.available, a.debited), (25, 0));
    let t =
        s.coordinator.transactions().await?.get(v1::GetRequest { transaction_id: txn.id.clone() }).await?.into_inner();
    assert_eq!(
        t.state,
        v1::TransactionState::Cancelling as i32,
        "the coordinator never delivered: the reconciler did it"
    );
    s.check_settled().await?;
    Ok(())
}

#[tokio::test]
async fn services_register_while_running_and_deregister_when_stopped() -> Result<()> {
    let mut s = Shop::start().await?;
    let endpoints = |svc: &'static str| {
        let c = &s.coordinator;
        async move {
            let req = v1::ListEndpointsRequest { service: svc.into() };
            Ok::<_, anyhow::Error>(c.registry().await?.list_endpoints(req).await?.into_inner().endpoints)
        }
    };
    let listed = endpoints("orders").await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].endpoint, s.orders.url());
    assert!(!listed[0].from_config);
    let status = s.orders.terminate().await?;
    assert!(status.success(), "{status:?}");
    assert!(endpoints("orders").await?.is_empty(), "deregistered on graceful stop");
    assert_eq!(endpoints("customers").await?.len(), 1, "others stay");
    Ok(())
}
