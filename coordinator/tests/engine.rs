//! Engine behaviour on a real sled store with a manual clock: deadlines,
//! races, idempotent appends, limits, GC, listing and recovery; and two
//! engines on one store (conditional writes, conflicts reloaded, never an
//! overwrite). No network.

use std::sync::Arc;
use std::time::Duration;

use tcc_coordinator::clock::{ManualClock, OsEntropy};
use tcc_coordinator::config::Limits;
use tcc_coordinator::engine::Engine;
use tcc_coordinator::engine::topics::Appender;
use tcc_coordinator::engine::validate::NewCommand;
use tcc_coordinator::error::Error;
use tcc_coordinator::model::{Event, PartialId, Phase2Status, TxnId, TxnState};
use tcc_coordinator::store::Store;
use tcc_coordinator::store::memory::MemStore;
use tcc_coordinator::store::sled::SledStore;
use tokio::sync::mpsc::UnboundedReceiver;

const T0: i64 = 1_700_000_000_000;
const RETENTION: Duration = Duration::from_secs(60);

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    engine: Arc<Engine>,
    decided: UnboundedReceiver<TxnId>,
}

fn limits() -> Limits {
    Limits {
        max_participants: 3,
        max_commands_per_append: 5,
        max_command_bytes: 100,
        max_topic_bytes: 150,
        default_timeout_ms: 1_000,
        min_timeout_ms: 100,
        max_timeout_ms: 10_000,
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}")));
    let clock = Arc::new(ManualClock::at(T0));
    let (engine, decided) = engine_on(store.clone(), clock.clone());
    Fixture { _dir: dir, store, clock, engine, decided }
}

fn engine_on(store: Arc<dyn Store>, clock: Arc<ManualClock>) -> (Arc<Engine>, UnboundedReceiver<TxnId>) {
    Engine::new(store, clock, Arc::new(OsEntropy), limits(), RETENTION)
}

fn cmd(kind: &str, payload: &[u8]) -> NewCommand {
    NewCommand { kind: kind.into(), key: String::new(), payload: payload.to_vec() }
}

fn svc(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

type R = Result<(), Error>;

#[tokio::test]
async fn begin_validates_its_input() -> R {
    let f = fixture();
    let cases: Vec<(Vec<String>, u64, &str)> = vec![
        (svc(&[]), 0, "at least one"),
        (svc(&["a", "a"]), 0, "twice"),
        (svc(&["a", "b", "c", "d"]), 0, "limit is 3"),
        (svc(&["bad name"]), 0, "contains ' '"),
        (vec!["x".repeat(129)], 0, "limit is 128"),
        (svc(&["a"]), 50, "out of range"),
        (svc(&["a"]), 10_001, "out of range"),
    ];
    for (services, timeout, msg) in cases {
        match f.engine.begin(services.clone(), timeout, String::new(), String::new()).await {
            Err(Error::InvalidArgument(m)) => {
                assert!(m.contains(msg), "{services:?}/{timeout}: {m}")
            }
            other => panic!("{services:?}/{timeout}: expected InvalidArgument, got {other:?}"),
        }
    }
    let t = f.engine.begin(svc(&["a", "b"]), 0, String::new(), String::new()).await?;
    assert_eq!(t.deadline_ms - t.created_ms, 1_000, "0 means the default timeout");
    Ok(())
}

#[tokio::test]
async fn the_deadline_cancels_an_active_transaction() -> R {
    let mut f = fixture();
    let t = f.engine.begin(svc(&["a"]), 500, String::new(), String::new()).await?;
    assert_eq!(f.store.due_deadlines(T0, 10).await?, (vec![], Some(T0 + 500)));
    f.clock.advance(499);
    assert_eq!(f.engine.expire_due().await, (0, Some(T0 + 500)));
    assert_eq!(f.engine.get(t.id).await?.state, TxnState::Active);
    f.clock.advance(1);
    assert_eq!(f.engine.expire_due().await, (1, None));
    let after = f.engine.get(t.id).await?;
    assert_eq!(after.state, TxnState::Cancelling);
    assert_eq!(after.reason, "deadline exceeded");
    assert_eq!(f.decided.try_recv().ok(), Some(t.id), "rollback delivery requested");
    assert_eq!(f.store.get_txn(t.id).await?.map(|t| t.state), Some(TxnState::Cancelling), "durable");
    Ok(())
}

#[tokio::test]
async fn confirm_or_append_racing_the_deadline_loses() -> R {
    let f = fixture();
    let t = f.engine.begin(svc(&["a"]), 500, String::new(), String::new()).await?;
    let p = t.participants[0].partial_id;
    f.clock.advance(500); // the sweeper has not run yet
    match f.engine.append(p, Appender::Anyone, vec![cmd("x", b"1")], "").await {
        Err(Error::IllegalTransition { state: TxnState::Cancelling, .. }) => {}
        other => panic!("late append: {other:?}"),
    }
    match f.engine.confirm(t.id).await {
        Err(e @ Error::IllegalTransition { state: TxnState::Cancelling, .. }) => {
            assert!(e.to_string().contains("deadline exceeded"), "{e}")
        }
        other => panic!("late confirm: {other:?}"),
    }
    assert!(f.store.read_topic(p, 1, 10).await?.is_empty(), "nothing stored by the late try");
    Ok(())
}

#[tokio::test]
async fn confirm_and_cancel_at_once_have_one_winner() -> R {
    let f = fixture();
    for _ in 0..20 {
        let t = f.engine.begin(svc(&["a", "b"]), 0, String::new(), String::new()).await?;
        let (c, k) = tokio::join!(f.engine.confirm(t.id), f.engine.cancel(t.id, "race".into()));
        let state = f.engine.get(t.id).await?.state;
        match (c, k) {
            (Ok(_), Err(Error::IllegalTransition { state: TxnState::Confirming, .. })) => {
                assert_eq!(state, TxnState::Confirming)
            }
            (Err(Error::IllegalTransition { state: TxnState::Cancelling, .. }), Ok(_)) => {
                assert_eq!(state, TxnState::Cancelling)
            }
            other => panic!("expected exactly one winner: {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn repeated_decisions_return_the_same_outcome() -> R {
    let f = fixture();
    let t = f.engine.begin(svc(&["a"]), 0, String::new(), String::new()).await?;
    let first = f.engine.confirm(t.id).await?;
    let second = f.engine.confirm(t.id).await?;
    assert_eq!(first, second);
    assert!(matches!(f.engine.cancel(t.id, String::new()).await, Err(Error::IllegalTransition { .. })));
    Ok(())
}

#[tokio::test]
async fn idempotent_append_stores_once() -> R {
    let f = fixture();
    let t = f.engine.begin(svc(&["a"]), 0, String::new(), String::new()).await?;
    let p = t.participants[0].partial_id;
    let batch = vec![cmd("x", b"1"), cmd("y", b"22")];
    let (r1, dup1) = f.engine.append(p, Appender::Anyone, batch.clone(), "req-1").await?;
    let (r2, dup2) = f.engine.append(p, Appender::Anyone, batch.clone(), "req-1").await?;
    assert_eq!((r1, dup1, dup2), (r2, false, true));
    assert_eq!(f.store.read_topic(p, 1, 10).await?.len(), 2);
    // Same key, different batch: refused, nothing stored; also when only the
    // content differs (same count and size).
    assert!(matches!(
        f.engine.append(p, Appender::Anyone, vec![cmd("z", b"1")], "req-1").await,
        Err(Error::InvalidArgument(_))
    ));
    let same_shape = vec![cmd("x", b"9"), cmd("y", b"99")];
    assert!(matches!(f.engine.append(p, Appender::Anyone, same_shape, "req-1").await, Err(Error::InvalidArgument(_))));
    // A retry that arrives after the decision still gets its receipt.
    f.engine.confirm(t.id).await?;
    assert_eq!(f.engine.append(p, Appender::Anyone, batch, "req-1").await?, (r1, true));
    assert_eq!(f.engine.get(t.id).await?.participants[0].command_count, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_of_one_append_store_it_once() -> R {
    let f = fixture();
    let t = f.engine.begin(svc(&["a"]), 0, String::new(), String::new()).await?;
    let p = t.participants[0].partial_id;
    let batch = vec![cmd("x", b"1"), cmd("y", b"2")];
    let tries: Vec<_> = (0..8)
        .map(|_| {
            let (e, b) = (f.engine.clone(), batch.clone());
            tokio::spawn(async move { e.append(p, Appender::Anyone, b, "same-key").await })
        })
        .collect();
    let mut fresh = 0;
    for t in tries {
        let (receipt, duplicate) = t.await.map_err(|e| Error::Storage(e.to_string()))??;
        assert_eq!((receipt.first_sequence, receipt.last_sequence), (1, 2));
        fresh += usize::from(!duplicate);
    }
    assert_eq!(fresh, 1, "exactly one try stored the batch");
    assert_eq!(f.store.read_topic(p, 1, 10).await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn an_append_naming_another_service_is_refused() -> R {
    let f = fixture();
    let t = f.engine.begin(svc(&["a", "b"]), 0, String::new(), String::new()).await?;
    let pa = t.participants[0].partial_id;
    match f.engine.append(pa, Appender::Declared("b"), vec![cmd("x", b"1")], "").await {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("belongs to service \"a\", not \"b\""), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(f.store.read_topic(pa, 1, 10).await?.is_empty());
    f.engine.append(pa, Appender::Declared("a"), vec![cmd("x", b"1")], "k").await?;
    match f.engine.append(pa, Appender::Identity("b"), vec![cmd("x", b"1")], "k").await {
        Err(Error::PermissionDenied(m)) => assert!(m.contains("identity \"b\"") && m.contains("service \"a\""), "{m}"),
        other => panic!("{other:?}"),
    }
    // Finished, a retried append with the key still answers only its own
    // service: the receipt is not handed to another.
    f.engine.confirm(t.id).await?;
    finish(&f, t.id).await?;
    assert!(f.engine.append(pa, Appender::Identity("a"), vec![cmd("x", b"1")], "k").await?.1, "a duplicate");
    match f.engine.append(pa, Appender::Identity("b"), vec![cmd("x", b"1")], "k").await {
        Err(Error::PermissionDenied(_)) => {}
        other => panic!("a finished partial's receipt went to another identity: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn append_limits() -> R {
    let f = fixture();
    let t = f.engine.begin(svc(&["a"]), 0, String::new(), String::new()).await?;
    let p = t.participants[0].partial_id;
    let too_many = vec![cmd("x", b"1"); 6];
    let cases = vec![
        (vec![], "", "at least one"),
        (too_many, "", "limit is 5"),
        (vec![cmd("", b"")], "", "type must not be empty"),
        (vec![cmd("x", &[0; 101])], "", "limit is 100 bytes"),
        (vec![cmd(&"t".repeat(257), b"")], "", "type is 257"),
    ];
    for (batch, key, msg) in cases {
        match f.engine.append(p, Appender::Anyone, batch, key).await {
            Err(Error::InvalidArgument(m)) => assert!(m.contains(msg), "{m}"),
            other => panic!("{msg}: {other:?}"),
        }
    }
    let long_key = "k".repeat(129);
    assert!(matches!(
        f.engine.append(p, Appender::Anyone, vec![cmd("x", b"")], &long_key).await,
        Err(Error::InvalidArgument(_))
    ));
    f.engine.append(p, Appender::Anyone, vec![cmd("x", &[0; 90])], "").await?;
    match f.engine.append(p, Appender::Anyone, vec![cmd("x", &[0; 90])], "").await {
        Err(Error::LimitExceeded(m)) => assert!(m.contains("limit is 150"), "{m}"),
        other => panic!("topic limit: {other:?}"),
    }
    assert_eq!(f.store.read_topic(p, 1, 10).await?.len(), 1, "the refused batch left nothing");
    assert!(matches!(
        f.engine.append(PartialId::new(), Appender::Anyone, vec![cmd("x", b"")], "").await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

#[tokio::test]
async fn enlist_rules() -> R {
    let f = fixture();
    let t = f.engine.begin(svc(&["a"]), 0, String::new(), String::new()).await?;
    let b = f.engine.enlist(t.id, "b".into()).await?;
    assert_eq!(
        f.engine.enlist(t.id, "b".into()).await?.partial_id,
        b.partial_id,
        "enlisting twice returns the same partial"
    );
    f.engine.append(b.partial_id, Appender::Anyone, vec![cmd("x", b"1")], "").await?;
    f.engine.enlist(t.id, "c".into()).await?;
    assert!(matches!(f.engine.enlist(t.id, "d".into()).await, Err(Error::LimitExceeded(_))));
    f.engine.confirm(t.id).await?;
    assert!(matches!(
        f.engine.enlist(t.id, "e".into()).await,
        Err(Error::IllegalTransition { state: TxnState::Confirming, .. })
    ));
    assert!(matches!(f.engine.enlist(TxnId::new(), "e".into()).await, Err(Error::NotFound(_))));
    Ok(())
}

/// Drives a confirmed transaction to CONFIRMED as the delivery driver would.
async fn finish(f: &Fixture, id: TxnId) -> R {
    let n = f.engine.get(id).await?.participants.len();
    for i in 0..n {
        f.engine.record_phase2(id, vec![Event::Delivered { participant: i }]).await?;
    }
    Ok(())
}

#[tokio::test]
async fn finished_transactions_are_collected_after_retention() -> R {
    let f = fixture();
    let t = f.engine.begin(svc(&["a", "b"]), 0, String::new(), String::new()).await?;
    let p = t.participants[0].partial_id;
    f.engine.append(p, Appender::Anyone, vec![cmd("x", b"1")], "k").await?;
    f.engine.confirm(t.id).await?;
    finish(&f, t.id).await?;
    let done = f.engine.get(t.id).await?;
    assert_eq!(done.state, TxnState::Confirmed);
    f.clock.advance(RETENTION.as_millis() as i64 - 1);
    assert_eq!(f.engine.collect_garbage().await.0, 0);
    assert_eq!(f.engine.get(t.id).await?.state, TxnState::Confirmed, "kept during retention");
    f.clock.advance(1);
    assert_eq!(f.engine.collect_garbage().await.0, 1);
    assert!(matches!(f.engine.get(t.id).await, Err(Error::NotFound(_))));
    assert!(matches!(f.engine.read_topic(p, 1, 10).await, Err(Error::NotFound(_))));
    assert!(f.store.read_topic(p, 1, 10).await?.is_empty(), "topic deleted");
    assert!(f.store.find_receipt(p, "k").await?.is_none(), "receipts deleted");
    Ok(())
}

#[tokio::test]
async fn failed_transactions_are_listed_and_never_collected() -> R {
    let f = fixture();
    let t = f.engine.begin(svc(&["a"]), 0, String::new(), String::new()).await?;
    f.engine.confirm(t.id).await?;
    f.engine.record_phase2(t.id, vec![Event::GaveUp { participant: 0, error: "refused".into() }]).await?;
    assert_eq!(f.engine.get(t.id).await?.state, TxnState::FailedToConfirm);
    f.clock.advance(10 * RETENTION.as_millis() as i64);
    assert_eq!(f.engine.collect_garbage().await.0, 0);
    let page = f.engine.list(&[TxnState::FailedToConfirm], 0, 10, None).await?;
    assert_eq!(page.transactions.iter().map(|t| t.id).collect::<Vec<_>>(), vec![t.id]);
    let retried = f.engine.retry(t.id, "").await?;
    assert_eq!(retried.state, TxnState::Confirming);
    Ok(())
}

#[tokio::test]
async fn listing_filters_by_state_and_age_and_pages() -> R {
    let f = fixture();
    let mut active = Vec::new();
    for i in 0..7 {
        let t = f.engine.begin(svc(&["a"]), 0, String::new(), String::new()).await?;
        if i % 2 == 0 {
            f.engine.cancel(t.id, String::new()).await?;
        } else {
            active.push(t.id);
        }
        f.clock.advance(10);
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = f.engine.list(&[TxnState::Active], 0, 2, after).await?;
        assert!(page.transactions.len() <= 2);
        seen.extend(page.transactions.iter().map(|t| t.id));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, active, "oldest first, each once, only ACTIVE");
    // min_age: only those created at least 35 ms ago (the first four).
    let old = f.engine.list(&[], 35, 100, None).await?;
    assert_eq!(old.transactions.len(), 4);
    // The wall clock steps back an hour: with no age filter every record is
    // still listed, though all now look "created in the future".
    f.clock.advance(-3_600_000);
    assert_eq!(f.engine.list(&[], 0, 100, None).await?.transactions.len(), 7);
    assert!(f.engine.list(&[], 1, 100, None).await?.transactions.is_empty());
    Ok(())
}

#[tokio::test]
async fn recovery_reloads_every_unfinished_transaction() -> R {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let clock = Arc::new(ManualClock::at(T0));
    let (active, confirming, p) = {
        let (engine, _rx) = engine_on(Arc::new(SledStore::open(dir.path())?), clock.clone());
        let a = engine.begin(svc(&["a"]), 5_000, String::new(), String::new()).await?;
        let c = engine.begin(svc(&["a", "b"]), 5_000, String::new(), String::new()).await?;
        engine.append(c.participants[1].partial_id, Appender::Anyone, vec![cmd("x", b"1")], "k").await?;
        engine.confirm(c.id).await?;
        (a.id, c.id, c.participants[1].partial_id)
    };
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path())?);
    let (engine, mut decided) = engine_on(store.clone(), clock.clone());
    let r = engine.recover().await?;
    assert_eq!((r.active, r.delivering), (1, 1));
    assert_eq!(decided.try_recv().ok(), Some(confirming), "delivery resumes");
    assert_eq!(engine.cached(), 0, "recovery loads nothing into memory");
    assert_eq!(store.due_deadlines(T0, 10).await?.1, Some(T0 + 5_000), "the deadline is kept, not restarted");
    clock.advance(5_000);
    assert_eq!(engine.expire_due().await.0, 1);
    assert_eq!(engine.get(active).await?.state, TxnState::Cancelling);
    // The idempotency receipt survived too.
    assert!(engine.append(p, Appender::Anyone, vec![cmd("x", b"1")], "k").await?.1, "duplicate recognised");
    Ok(())
}

#[tokio::test]
async fn phase_two_progress_is_recorded_together_or_not_at_all() -> R {
    let f = fixture();
    let t = f.engine.begin(svc(&["a", "b", "c"]), 0, String::new(), String::new()).await?;
    f.engine.confirm(t.id).await?;
    let retry_at = f.engine.now_ms() + 500;
    let recorded = f
        .engine
        .record_phase2(
            t.id,
            vec![
                Event::Delivered { participant: 0 },
                Event::AttemptFailed { participant: 1, error: "down".into(), next_attempt_ms: retry_at },
            ],
        )
        .await?;
    let statuses: Vec<_> = recorded.participants.iter().map(|p| (p.status, p.attempts)).collect();
    assert_eq!(statuses, vec![(Phase2Status::Acknowledged, 1), (Phase2Status::Pending, 1), (Phase2Status::Pending, 0)]);
    assert_eq!(recorded.participants[1].next_attempt_ms, retry_at);
    assert_eq!(f.store.get_txn(t.id).await?.as_ref(), Some(&recorded), "both events are durable");
    // An illegal event in the batch (a participant that does not exist)
    // refuses the whole batch: the legal one beside it is not recorded.
    let refused = f
        .engine
        .record_phase2(t.id, vec![Event::Delivered { participant: 2 }, Event::Delivered { participant: 9 }])
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(f.engine.get(t.id).await?.participants[2].status, Phase2Status::Pending);
    assert_eq!(f.store.get_txn(t.id).await?.as_ref(), Some(&recorded));
    // The last acknowledgements finish the transaction.
    let done = f
        .engine
        .record_phase2(t.id, vec![Event::Delivered { participant: 1 }, Event::Delivered { participant: 2 }])
        .await?;
    assert_eq!(done.state, TxnState::Confirmed);
    Ok(())
}

/// Two engines on one store (two coordinators): whichever engine a call
/// reaches, it starts from what the store holds and writes conditionally,
/// so a decision taken through one is never overwritten through the other
/// and nothing is appended after it. (Writes that race inside one
/// operation conflict and are reloaded: the next test, and the
/// simulation.)
#[tokio::test]
async fn a_second_engine_never_overwrites_a_decision() -> R {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let clock = Arc::new(ManualClock::at(T0));
    let (a, _) = engine_on(store.clone(), clock.clone());
    let (b, _) = engine_on(store.clone(), clock.clone());
    let t = a.begin(svc(&["x", "y"]), 0, String::new(), String::new()).await?;
    let px = t.participants[0].partial_id;
    assert_eq!(b.get(t.id).await?.state, TxnState::Active);
    b.append(px, Appender::Anyone, vec![cmd("x", b"1")], "").await?;
    let (r, _) = a.append(px, Appender::Anyone, vec![cmd("x", b"2")], "").await?;
    assert_eq!(r.first_sequence, 2, "numbered after b's append");
    a.confirm(t.id).await?;
    // b's cancel loses, and names the winner.
    match b.cancel(t.id, "late".into()).await {
        Err(Error::IllegalTransition { state: TxnState::Confirming, .. }) => {}
        other => panic!("a stale cancel must lose to the confirm: {other:?}"),
    }
    // b's late append is refused too, and stores nothing.
    match b.append(px, Appender::Anyone, vec![cmd("x", b"3")], "").await {
        Err(Error::IllegalTransition { state: TxnState::Confirming, .. }) => {}
        other => panic!("an append after the decision must be refused: {other:?}"),
    }
    assert_eq!(store.read_topic(px, 1, 10).await?.len(), 2);
    let stored = store.get_txn(t.id).await?.unwrap_or_else(|| panic!("record gone"));
    assert_eq!((stored.state, stored.participants[0].command_count), (TxnState::Confirming, 2));
    // Both engines now agree, and a repeated confirm through b is a no-op.
    assert_eq!(b.confirm(t.id).await?.version, stored.version);
    Ok(())
}

/// Racing decisions spread over two engines: exactly one wins, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_racing_on_two_engines_have_one_winner() -> R {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let clock = Arc::new(ManualClock::at(T0));
    let (a, _) = engine_on(store.clone(), clock.clone());
    let (b, _) = engine_on(store.clone(), clock.clone());
    for _ in 0..50 {
        let t = a.begin(svc(&["x"]), 0, String::new(), String::new()).await?;
        b.get(t.id).await?;
        let (c, k) = tokio::join!(a.confirm(t.id), b.cancel(t.id, "race".into()));
        let stored = store.get_txn(t.id).await?.map(|t| t.state);
        match (c, k) {
            (Ok(_), Err(Error::IllegalTransition { .. })) => assert_eq!(stored, Some(TxnState::Confirming)),
            (Err(Error::IllegalTransition { .. }), Ok(_)) => assert_eq!(stored, Some(TxnState::Cancelling)),
            other => panic!("expected exactly one winner: {other:?}"),
        }
    }
    Ok(())
}

/// A caller that goes away (client disconnect, deadline) right after its
/// decision was submitted: the write still lands, and the store's due-work
/// index follows it (it is updated as the write is applied, not by the
/// caller), so the sweeper hands the transaction to delivery; a repeated
/// confirm does too.
#[tokio::test]
async fn a_decision_whose_caller_went_away_is_still_delivered() -> R {
    use futures::FutureExt;
    let mut f = fixture();
    // Polled once: the write is queued in the journal; then dropped. (The
    // journal's thread may, rarely, sync it before the first poll ends:
    // then that confirm was not cut off, and the next transaction is used.)
    let mut cut_off = None;
    for _ in 0..20 {
        let t = f.engine.begin(svc(&["a"]), 10_000, String::new(), String::new()).await?;
        if f.engine.confirm(t.id).now_or_never().is_none() {
            cut_off = Some(t);
            break;
        }
    }
    let t = cut_off.unwrap_or_else(|| panic!("20 confirms all finished within their first poll"));
    // The journal is FIFO: once a later write is durable, the confirm is too.
    f.engine.begin(svc(&["b"]), 10_000, String::new(), String::new()).await?;
    assert_eq!(f.store.get_txn(t.id).await?.map(|t| t.state), Some(TxnState::Confirming));
    assert!(!f.store.due_deadlines(i64::MAX, 10).await?.0.contains(&t.id), "no deadline once decided");
    assert!(f.store.due_deliveries(f.engine.now_ms(), 100).await?.contains(&t.id), "due for delivery");
    while f.decided.try_recv().is_ok() {}
    assert!(f.engine.resume_overdue().await >= 1);
    let mut handed = Vec::new();
    while let Ok(id) = f.decided.try_recv() {
        handed.push(id);
    }
    assert!(handed.contains(&t.id), "the sweeper hands it to delivery");
    assert_eq!(f.engine.confirm(t.id).await?.state, TxnState::Confirming);
    assert_eq!(f.decided.try_recv().ok(), Some(t.id), "a repeated confirm hands it to delivery too");
    assert_eq!(f.engine.cached(), 0, "nothing left in memory by the dropped call");
    Ok(())
}

/// Operations on one transaction from several threads: whoever lets go
/// last removes it from memory (regression: a holder count read after the
/// map's lock was released left an entry nobody held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_holder_on_any_thread_removes_the_transaction_from_memory() -> R {
    let f = fixture();
    let t = f.engine.begin(svc(&["a"]), 10_000, String::new(), String::new()).await?;
    for _ in 0..5_000 {
        let (a, b) = (f.engine.clone(), f.engine.clone());
        let (x, y) = tokio::join!(
            tokio::spawn(async move { a.delivery_plan(t.id).await }),
            tokio::spawn(async move { b.delivery_plan(t.id).await })
        );
        assert!(matches!((x, y), (Ok(Ok(None)), Ok(Ok(None)))));
        assert_eq!(f.engine.cached(), 0);
    }
    Ok(())
}
