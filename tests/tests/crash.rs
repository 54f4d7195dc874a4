//! Crash points: the coordinator aborts (like `kill -9`) at a named
//! protocol step (`TCC_CRASH_AT`, compiled in with the `failpoints`
//! feature), is restarted on the same data, and the invariants are checked:
//! the decision is kept, every participant gets exactly its outcome, no
//! acknowledged command is lost, nothing is applied twice. Plus: a damaged
//! record makes start-up fail with a message naming it.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use anyhow::Result;
use tcc_proto::v1::{self, TransactionState as S};
use tcc_tests::{Call, Coordinator, TestParticipant, command};
use tonic::Code;

const FAST: &[&str] = &["--retry-initial-ms", "20", "--retry-max-ms", "200", "--call-timeout-ms", "2000"];

async fn coordinator_with(participants: &[(&str, &TestParticipant)]) -> Result<Coordinator> {
    let specs: Vec<String> = participants.iter().map(|(s, p)| format!("{s}={}", p.url())).collect();
    let mut args: Vec<&str> = FAST.to_vec();
    for s in &specs {
        args.extend(["--participant", s.as_str()]);
    }
    Coordinator::start(&args).await
}

fn acked(calls: &[Call], kind: &str) -> usize {
    calls.iter().filter(|c| c.kind == kind && c.acked).count()
}

async fn crash_after_decision(confirm: bool) -> Result<()> {
    let (a, b) = (TestParticipant::start().await?, TestParticipant::start().await?);
    let mut c = coordinator_with(&[("a", &a), ("b", &b)]).await?;
    c.kill9().await?;
    c.restart_with_env(&[("TCC_CRASH_AT", "after-decision")]).await?;
    let t = c.begin(&["a", "b"], 60_000).await?;
    c.append(&t.partials[0].partial_id, vec![command("a.X", "", b"1"), command("a.Y", "", b"2")], "").await?;
    c.append(&t.partials[1].partial_id, vec![command("b.X", "", b"3")], "").await?;
    let id = t.transaction_id.clone();
    let decided = if confirm {
        c.transactions()
            .await?
            .confirm(v1::ConfirmRequest { transaction_id: id.clone(), ..Default::default() })
            .await
            .map(|_| ())
    } else {
        let req = v1::CancelRequest { transaction_id: id.clone(), reason: "crash test".into(), ..Default::default() };
        c.transactions().await?.cancel(req).await.map(|_| ())
    };
    assert!(decided.is_err(), "the coordinator must die before replying");
    let status = c.wait_exit(Duration::from_secs(10)).await?;
    assert!(!status.success(), "{status:?}");
    assert!(a.calls().is_empty() && b.calls().is_empty(), "crashed before phase 2 started");

    c.restart().await?;
    let (kind, done) = if confirm { ("commit", S::Confirmed) } else { ("rollback", S::Cancelled) };
    // Before anyone asks again: the decision is there (delivering or done).
    let kept = c.transactions().await?.get(v1::GetRequest { transaction_id: id.clone() }).await?.into_inner().state;
    let delivering = if confirm { S::Confirming } else { S::Cancelling };
    assert!(kept == delivering as i32 || kept == done as i32, "decision lost across the crash: state {kept}");
    let state = if confirm {
        let req = v1::ConfirmRequest { transaction_id: id.clone(), wait: true, wait_timeout_ms: 20_000 };
        c.transactions().await?.confirm(req).await?.into_inner().state
    } else {
        let req =
            v1::CancelRequest { transaction_id: id.clone(), wait: true, wait_timeout_ms: 20_000, ..Default::default() };
        c.transactions().await?.cancel(req).await?.into_inner().state
    };
    assert_eq!(state, done as i32, "the unacknowledged decision was kept: {}", c.logs());
    // The opposite decision is refused.
    let opposite = if confirm {
        let req = v1::CancelRequest { transaction_id: id.clone(), ..Default::default() };
        c.transactions().await?.cancel(req).await.map(|_| ())
    } else {
        c.transactions()
            .await?
            .confirm(v1::ConfirmRequest { transaction_id: id.clone(), ..Default::default() })
            .await
            .map(|_| ())
    };
    assert_eq!(opposite.map_err(|s| s.code()), Err(Code::FailedPrecondition));
    for (p, n) in [(&a, 2), (&b, 1)] {
        let calls = p.calls();
        assert_eq!((calls.len(), acked(&calls, kind)), (1, 1), "{calls:#?}");
        assert_eq!(calls[0].commands.len(), n, "every acknowledged command delivered");
    }
    Ok(())
}

#[tokio::test]
async fn crash_after_a_confirm_decision_is_durable() -> Result<()> {
    crash_after_decision(true).await
}

#[tokio::test]
async fn crash_after_a_cancel_decision_is_durable() -> Result<()> {
    crash_after_decision(false).await
}

#[tokio::test]
async fn crash_after_some_participants_acknowledged() -> Result<()> {
    let (fast, slow) = (TestParticipant::start().await?, TestParticipant::start().await?);
    // The first round records the fast one's acknowledgement together with
    // the other's failed attempt; the coordinator dies right after.
    slow.fail_transiently(1);
    let mut c = coordinator_with(&[("fast", &fast), ("slow", &slow)]).await?;
    c.kill9().await?;
    c.restart_with_env(&[("TCC_CRASH_AT", "after-ack")]).await?;
    let t = c.begin(&["fast", "slow"], 60_000).await?;
    let _ = c
        .transactions()
        .await?
        .confirm(v1::ConfirmRequest { transaction_id: t.transaction_id.clone(), wait: true, wait_timeout_ms: 20_000 })
        .await;
    let status = c.wait_exit(Duration::from_secs(10)).await?;
    assert!(!status.success());
    assert_eq!(acked(&fast.calls(), "commit"), 1);
    assert_eq!(acked(&slow.calls(), "commit"), 0, "still to be retried when the coordinator died");
    c.restart().await?;
    let req = v1::ConfirmRequest { transaction_id: t.transaction_id.clone(), wait: true, wait_timeout_ms: 20_000 };
    assert_eq!(c.transactions().await?.confirm(req).await?.into_inner().state, S::Confirmed as i32);
    assert_eq!(fast.calls().len(), 1, "the recorded acknowledgement is not redelivered");
    assert_eq!(
        acked(&slow.calls(), "commit"),
        1,
        "the other participant is acknowledged exactly once: {:#?}",
        slow.calls()
    );
    Ok(())
}

#[tokio::test]
async fn crash_in_the_middle_of_an_append_loses_or_keeps_the_whole_batch() -> Result<()> {
    let p = TestParticipant::start().await?;
    let mut c = coordinator_with(&[("svc", &p)]).await?;
    let t = c.begin(&["svc"], 60_000).await?;
    let partial = t.partials[0].partial_id.clone();
    c.append(&partial, vec![command("svc.First", "", b"0")], "k0").await?;
    c.kill9().await?;
    c.restart_with_env(&[("TCC_CRASH_AT", "append-unflushed")]).await?;
    let batch: Vec<v1::Command> = (1..=5).map(|i| command("svc.Cmd", &format!("k{i}"), &[i])).collect();
    assert!(c.append(&partial, batch.clone(), "k1").await.is_err(), "died before acknowledging");
    assert!(!c.wait_exit(Duration::from_secs(10)).await?.success());
    c.restart().await?;
    let read = c
        .topics()
        .await?
        .read(v1::ReadRequest { partial_id: partial.clone(), ..Default::default() })
        .await?
        .into_inner();
    assert!(matches!(read.commands.len(), 1 | 6), "all of the batch or none of it: {}", read.commands.len());
    // The client retries its unacknowledged append with the same key.
    let retried = c.append(&partial, batch, "k1").await?;
    assert_eq!((retried.first_sequence, retried.last_sequence), (2, 6));
    let req = v1::ConfirmRequest { transaction_id: t.transaction_id.clone(), wait: true, wait_timeout_ms: 20_000 };
    assert_eq!(c.transactions().await?.confirm(req).await?.into_inner().state, S::Confirmed as i32);
    let calls = p.calls();
    assert_eq!(calls.len(), 1);
    let seqs: Vec<u64> = calls[0].commands.iter().map(|c| c.sequence).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6], "the acknowledged command and the retried batch, once, in order");
    Ok(())
}

#[tokio::test]
async fn crash_during_recovery_then_recover() -> Result<()> {
    // A participant that never answers keeps one transaction CONFIRMING.
    let mut c = Coordinator::start(&["--participant", "gone=http://127.0.0.1:9", "--retry-initial-ms", "50"]).await?;
    let stuck = c.begin(&["gone"], 60_000).await?;
    c.append(&stuck.partials[0].partial_id, vec![command("g.X", "", b"1")], "").await?;
    c.transactions()
        .await?
        .confirm(v1::ConfirmRequest { transaction_id: stuck.transaction_id.clone(), ..Default::default() })
        .await?;
    let mut active = Vec::new();
    for _ in 0..4 {
        active.push(c.begin(&["gone"], 60_000).await?);
    }
    c.kill9().await?;
    let log = c.start_crashing(&[("TCC_CRASH_AT", "during-recovery:3")]).await?;
    assert!(log.contains("crash point during-recovery"), "{log}");
    c.restart().await?;
    let mut tx = c.transactions().await?;
    let g = tx.get(v1::GetRequest { transaction_id: stuck.transaction_id.clone() }).await?.into_inner();
    assert_eq!((g.state, g.participants[0].command_count), (S::Confirming as i32, 1));
    for a in &active {
        let g = tx.get(v1::GetRequest { transaction_id: a.transaction_id.clone() }).await?.into_inner();
        assert_eq!((g.state, g.deadline_unix_ms), (S::Active as i32, a.deadline_unix_ms));
    }
    Ok(())
}

#[tokio::test]
async fn a_damaged_record_fails_start_up_naming_it() -> Result<()> {
    let mut c = Coordinator::start(&[]).await?;
    let t = c.begin(&["svc"], 60_000).await?;
    assert!(c.terminate().await?.success());
    let id = uuid::Uuid::parse_str(&t.transaction_id)?;
    {
        let db = sled::open(c.data_dir())?;
        let tree = db.open_tree("tcc")?;
        let mut key = vec![0x01u8];
        key.extend_from_slice(id.as_bytes());
        let mut value = tree.get(&key)?.expect("record present").to_vec();
        value.truncate(value.len() / 2); // a truncated record
        tree.insert(key, value)?;
        db.flush()?;
    }
    let (status, log) = Coordinator::start_failing(c.data_dir(), &[]).await?;
    assert!(!status.success());
    assert!(log.contains(&format!("is damaged: transaction {id}")), "{log}");
    Ok(())
}
