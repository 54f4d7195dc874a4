//! The operator's tools against the real binary: every transaction keeps
//! its history (surviving a restart), "deliver now" skips a long backoff,
//! a failed participant resolved by hand finishes its transaction, and
//! Watch streams one transaction's changes or every change into chosen
//! states.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tcc_proto::v1::{self, TransactionState as S};
use tcc_tests::{Coordinator, TestParticipant};
use tonic::Code;

fn states(t: &v1::Transaction) -> Vec<(i32, String)> {
    t.history.iter().map(|h| (h.state, h.cause.clone())).collect()
}

async fn confirm(c: &Coordinator, id: &str, wait: bool) -> Result<v1::Transaction> {
    let req = v1::ConfirmRequest { transaction_id: id.into(), wait, wait_timeout_ms: 20_000 };
    c.transactions().await?.confirm(req).await?.into_inner().transaction.context("no transaction")
}

async fn get(c: &Coordinator, id: &str) -> Result<v1::Transaction> {
    Ok(c.transactions().await?.get(v1::GetRequest { transaction_id: id.into() }).await?.into_inner())
}

#[tokio::test]
async fn every_transaction_keeps_its_history_across_a_restart() -> Result<()> {
    let mut c = Coordinator::start(&[]).await?;
    let (a, b) = (TestParticipant::start().await?, TestParticipant::start().await?);
    c.register("a", &a).await?;
    c.register("b", &b).await?;
    let t = c.begin(&["a", "b"], 30_000).await?;
    let done = confirm(&c, &t.transaction_id, true).await?;
    assert_eq!(done.state, S::Confirmed as i32);
    let seen = states(&done);
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[0], (S::Active as i32, "begun".to_string()));
    assert_eq!(seen[1], (S::Confirming as i32, "confirm".to_string()));
    assert_eq!(seen[2].0, S::Confirmed as i32);
    assert!(seen[2].1.ends_with(" acknowledged"), "{seen:?}");
    let times: Vec<i64> = done.history.iter().map(|h| h.at_unix_ms).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]) && times[0] == done.created_unix_ms, "{times:?}");

    // A cancelled one says why.
    let t2 = c.begin(&["a"], 30_000).await?;
    let req = v1::CancelRequest {
        transaction_id: t2.transaction_id.clone(),
        reason: "out of stock".into(),
        wait: true,
        wait_timeout_ms: 20_000,
    };
    c.transactions().await?.cancel(req).await?;

    c.kill9().await?;
    c.restart().await?;
    assert_eq!(states(&get(&c, &t.transaction_id).await?), seen, "the history survives kill -9");
    let cancelled = states(&get(&c, &t2.transaction_id).await?);
    assert_eq!(cancelled[1], (S::Cancelling as i32, "cancel: out of stock".to_string()), "{cancelled:?}");
    Ok(())
}

#[tokio::test]
async fn deliver_now_skips_what_is_left_of_a_long_backoff() -> Result<()> {
    // After one failure, the next call would be a minute away.
    let c = Coordinator::start(&["--retry-initial-ms", "60000", "--retry-max-ms", "60000"]).await?;
    let p = TestParticipant::start().await?;
    c.register("slow", &p).await?;
    p.fail_transiently(1);
    let t = c.begin(&["slow"], 30_000).await?;
    confirm(&c, &t.transaction_id, false).await?;
    p.wait_for("the first, failing call", |calls| !calls.is_empty()).await?;
    // The failure is recorded, with its next attempt far away.
    let backing_off = tcc_tests::eventually("the failure recorded", Duration::from_secs(10), || async {
        let txn = get(&c, &t.transaction_id).await?;
        Ok((txn.participants[0].attempts == 1).then_some(txn))
    })
    .await?;
    let next = backing_off.participants[0].next_attempt_unix_ms - backing_off.history[1].at_unix_ms;
    assert!(next >= 20_000, "next attempt only {next} ms after the decision");

    let mut admin = c.admin().await?;
    let asked = Instant::now();
    let now = admin.deliver_now(v1::DeliverNowRequest { transaction_id: t.transaction_id.clone() }).await?.into_inner();
    assert_eq!(now.state, S::Confirming as i32);
    p.wait_for("the second call", |calls| calls.iter().any(|c| c.acked)).await?;
    assert!(asked.elapsed() < Duration::from_secs(10), "delivered {:?} after asking", asked.elapsed());
    let done = confirm(&c, &t.transaction_id, true).await?;
    assert_eq!(done.state, S::Confirmed as i32);
    assert!(states(&done).iter().any(|(_, cause)| cause == "deliver now"), "{:?}", states(&done));

    // Only a delivering transaction can be delivered now.
    let err = admin.deliver_now(v1::DeliverNowRequest { transaction_id: t.transaction_id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("CONFIRMED"), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn a_failed_participant_resolved_by_hand_finishes_its_transaction() -> Result<()> {
    let c = Coordinator::start(&["--retry-initial-ms", "20", "--retry-max-ms", "100"]).await?;
    let (ok, stubborn) = (TestParticipant::start().await?, TestParticipant::start().await?);
    c.register("ok", &ok).await?;
    c.register("stubborn", &stubborn).await?;
    stubborn.refuse(true);
    let t = c.begin(&["ok", "stubborn"], 30_000).await?;
    let failed = confirm(&c, &t.transaction_id, true).await?;
    assert_eq!(failed.state, S::FailedToConfirm as i32);

    let mut admin = c.admin().await?;
    let resolve = |service: &str, reason: &str| v1::ResolveRequest {
        transaction_id: t.transaction_id.clone(),
        service: service.into(),
        reason: reason.into(),
    };
    let err = admin.resolve(resolve("stubborn", " ")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = admin.resolve(resolve("nobody", "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = admin.resolve(resolve("ok", "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("\"ok\" has not failed"), "{err:?}");

    let done = admin.resolve(resolve("stubborn", "applied by hand in the ledger, ticket 4711")).await?.into_inner();
    assert_eq!(done.state, S::Confirmed as i32);
    assert!(done.finished_unix_ms > 0);
    let last = done.history.last().context("history")?;
    assert_eq!(last.state, S::Confirmed as i32);
    assert_eq!(last.cause, "stubborn resolved by hand: applied by hand in the ledger, ticket 4711");
    assert!(
        states(&done)
            .iter()
            .any(|(s, cause)| *s == S::FailedToConfirm as i32 && cause.starts_with("stubborn failed: refused"))
    );
    assert!(c.logs().contains("participant resolved by hand"));
    // It is finished: nothing more to resolve, and no more calls.
    let err = admin.resolve(resolve("stubborn", "again")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    Ok(())
}

#[tokio::test]
async fn watch_streams_one_transaction_until_it_finishes_and_every_change_into_chosen_states() -> Result<()> {
    let c = Coordinator::start(&["--retry-initial-ms", "20", "--retry-max-ms", "100"]).await?;
    let (ok, stubborn) = (TestParticipant::start().await?, TestParticipant::start().await?);
    c.register("ok", &ok).await?;
    c.register("stubborn", &stubborn).await?;
    stubborn.refuse(true);
    let mut admin = c.admin().await?;

    // Every change into FAILED_TO_CONFIRM, from now on.
    let all = v1::WatchRequest { transaction_id: String::new(), states: vec![S::FailedToConfirm as i32] };
    let mut failures = admin.watch(all).await?.into_inner();

    let t = c.begin(&["ok"], 30_000).await?;
    let one = v1::WatchRequest { transaction_id: t.transaction_id.clone(), states: Vec::new() };
    let mut stream = admin.watch(one).await?.into_inner();
    let first = stream.message().await?.context("no first message")?;
    assert_eq!(first.state, S::Active as i32, "the current state comes first");
    confirm(&c, &t.transaction_id, false).await?;
    let mut seen = Vec::new();
    let collected = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(txn) = stream.message().await? {
            seen.push(txn.state);
        }
        anyhow::Ok(())
    })
    .await;
    assert!(collected.is_ok(), "the stream did not end after CONFIRMED: {seen:?}");
    collected??;
    assert_eq!(seen.last(), Some(&(S::Confirmed as i32)), "{seen:?}");
    assert!(seen.contains(&(S::Confirming as i32)), "{seen:?}");

    // The failure watch saw nothing of that, and sees this one fail.
    let bad = c.begin(&["stubborn"], 30_000).await?;
    confirm(&c, &bad.transaction_id, false).await?;
    let failed = tokio::time::timeout(Duration::from_secs(20), failures.message()).await??.context("stream ended")?;
    assert_eq!(
        (failed.transaction_id.as_str(), failed.state),
        (bad.transaction_id.as_str(), S::FailedToConfirm as i32)
    );

    // Bad requests.
    let both = v1::WatchRequest { transaction_id: t.transaction_id.clone(), states: vec![S::Active as i32] };
    assert_eq!(admin.watch(both).await.unwrap_err().code(), Code::InvalidArgument);
    let unknown = v1::WatchRequest { transaction_id: uuid::Uuid::now_v7().to_string(), states: Vec::new() };
    assert_eq!(admin.watch(unknown).await.unwrap_err().code(), Code::NotFound);
    Ok(())
}
