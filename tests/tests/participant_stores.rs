//! The participant's guarantees, one suite run on both stores of the SDK:
//! sled (a temp directory) and PostgreSQL (a real server per test, skipped
//! loudly where it is not installed, required in CI).
//!
//! * duplicates are harmless, and outcomes stay apart;
//! * an empty compensation is acknowledged and recorded, and a late try
//!   after it holds nothing (no hanging);
//! * a body that fails leaves nothing: not its writes, not the guard's
//!   record;
//! * the reservations: all or none, retried tries, refusals, totals;
//! * 16 concurrent duplicate commits apply once;
//! * commit and rollback racing on one partial: exactly one wins, the
//!   other is refused naming the outcome recorded.
//!
//! PostgreSQL only: a newer schema is refused, and phase-2 calls that
//! arrive while the server restarts fail as UNAVAILABLE, then succeed.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use tcc_domain_sdk::participant::{Applied, Phase, PhaseTwo, ReceivedCommand, TxError, apply};
use tcc_domain_sdk::propagation::PartialContext;
use tcc_domain_sdk::reservations::{Account, HoldError, MAX_HOLD_MS, Reservations};
use tcc_domain_sdk::store::postgres::PgStore;
use tcc_domain_sdk::store::sled::SledStore;
use tcc_domain_sdk::{Error, Store};
use tcc_tests::participants::{COUNTS, Counter, Counting, Failing, open_counting_pg};
use tcc_tests::pg::Postgres;

fn ctx(partial: &str) -> PartialContext {
    PartialContext { partial_id: partial.into(), transaction_id: format!("t-{partial}"), deadline_ms: i64::MAX }
}

fn call(partial: &str, commands: &[(&str, &str, i64)]) -> Arc<PhaseTwo> {
    let commands = commands
        .iter()
        .enumerate()
        .map(|(i, (kind, key, amount))| ReceivedCommand {
            sequence: i as u64 + 1,
            type_name: kind.to_string(),
            key: key.to_string(),
            payload: amount.to_string().into_bytes(),
        })
        .collect();
    Arc::new(PhaseTwo { transaction_id: format!("t-{partial}"), partial_id: partial.into(), commands })
}

async fn commit<S: Counting>(store: &S, c: &Arc<PhaseTwo>) -> Result<Applied, Error> {
    apply(store, Arc::new(Counter::<S>::default()), Phase::Committed, c.clone()).await
}

async fn rollback<S: Counting>(store: &S, c: &Arc<PhaseTwo>) -> Result<Applied, Error> {
    apply(store, Arc::new(Counter::<S>::default()), Phase::RolledBack, c.clone()).await
}

async fn account<S: Counting>(store: &S, resource: &str) -> Result<(i64, i64, i64)> {
    let a: Account = store.account(resource).await?.unwrap_or_default();
    Ok((a.available, a.held, a.used))
}

fn refused(r: Result<Applied, Error>, naming: &str) -> Result<()> {
    match r {
        Err(Error::Refused(m)) if m.contains(naming) => Ok(()),
        other => bail!("expected a refusal naming {naming:?}, got {other:?}"),
    }
}

/// Duplicates, outcomes apart, empty compensation, no hanging.
async fn guard<S: Counting>(store: &S) -> Result<()> {
    let c = call("dup", &[("x", "", 0), ("y", "", 0)]);
    ensure!(commit(store, &c).await? == Applied::Now);
    ensure!(commit(store, &c).await? == Applied::Already, "a redelivered commit is acknowledged, not applied");
    ensure!(store.count("dup").await? == 2, "two commands, applied once");
    refused(rollback(store, &c).await, "already committed")?;
    ensure!(store.count("dup:rollback").await? == 0);

    let r = call("undo", &[]);
    ensure!(rollback(store, &r).await? == Applied::Now, "an empty compensation is acknowledged");
    ensure!(rollback(store, &r).await? == Applied::Already);
    ensure!(store.count("undo:rollback").await? == 1);
    ensure!(store.phase_of("undo").await? == Some(Phase::RolledBack), "and recorded");
    refused(commit(store, &r).await, "already rolled back")?;
    ensure!(store.count("undo").await? == 0);

    // The late try, after the empty compensation: refused, nothing held.
    store.seed("late-stock", 10).await?;
    let late = store.hold(&ctx("undo"), &[("late-stock".into(), 4)]).await;
    ensure!(matches!(late, Err(HoldError::Decided(_))), "{late:?}");
    ensure!(account(store, "late-stock").await? == (10, 0, 0), "a late try reserves nothing");
    ensure!(store.holds().await?.is_empty());
    Ok(())
}

/// A failing body (refused, or the store failing) leaves nothing behind.
async fn one_transaction<S: Counting>(store: &S) -> Result<()> {
    for (partial, error) in [("fail-a", TxError::Refused("no".into())), ("fail-b", TxError::Store("disk".into()))] {
        let c = call(partial, &[("x", "", 0)]);
        let failing = Arc::new(Failing::<S>(error.clone(), PhantomData));
        let r = apply(store, failing, Phase::Committed, c.clone()).await;
        match (&error, &r) {
            (TxError::Refused(_), Err(Error::Refused(_))) | (TxError::Store(_), Err(Error::Store(_))) => {}
            _ => bail!("{error:?} gave {r:?}"),
        }
        ensure!(store.count(partial).await? == 0, "the body's write was rolled back");
        ensure!(store.phase_of(partial).await?.is_none(), "no outcome recorded");
        // The guard left no record: the next delivery applies.
        ensure!(commit(store, &c).await? == Applied::Now);
        ensure!(store.count(partial).await? == 1);
    }
    Ok(())
}

/// Reserve, consume, release: same semantics and errors on both stores.
async fn reservations<S: Counting>(store: &S) -> Result<()> {
    store.seed("bob", 100).await?;
    let line = vec![("bob".to_string(), 30)];
    ensure!(store.hold(&ctx("h1"), &line).await?, "a fresh hold");
    ensure!(!store.hold(&ctx("h1"), &line).await?, "a retried try is a no-op");
    let other = store.hold(&ctx("h1"), &[("bob".to_string(), 31)]).await;
    ensure!(matches!(other, Err(HoldError::Invalid(_))), "a retried try must ask the same: {other:?}");
    store.hold(&ctx("h2"), &line).await?;
    ensure!(account(store, "bob").await? == (40, 60, 0));
    ensure!(commit(store, &call("h1", &[("take", "bob", 25)])).await? == Applied::Now);
    ensure!(rollback(store, &call("h2", &[])).await? == Applied::Now);
    ensure!(account(store, "bob").await? == (75, 0, 25), "25 used, the 5 left over and h2's 30 released");
    ensure!(store.holds().await?.is_empty());

    // A commit that takes more than was held is refused and changes nothing.
    store.hold(&ctx("h3"), &[("bob".to_string(), 5)]).await?;
    refused(commit(store, &call("h3", &[("take", "bob", 6)])).await, "does not hold")?;
    ensure!(account(store, "bob").await? == (70, 5, 25));
    ensure!(store.phase_of("h3").await?.is_none());
    ensure!(store.release_now("h3").await? == 5);
    ensure!(store.hold(&ctx("h3"), &[("bob".to_string(), 7)]).await?, "a released try may hold again");
    ensure!(rollback(store, &call("h3", &[])).await? == Applied::Now);

    // Only positive amounts are used, on either store.
    store.hold(&ctx("h6"), &[("bob".to_string(), 5)]).await?;
    for amount in [0, -5] {
        refused(commit(store, &call("h6", &[("take", "bob", amount)])).await, "must be positive")?;
    }
    ensure!(rollback(store, &call("h6", &[])).await? == Applied::Now);
    // Refusals reserve nothing, all lines or none.
    store.seed("amy", 10).await?;
    let two = vec![("amy".to_string(), 5), ("bob".to_string(), 1000)];
    let r = store.hold(&ctx("h4"), &two).await;
    ensure!(
        matches!(&r, Err(HoldError::Insufficient { resource, available: 75, requested: 1000 }) if resource == "bob"),
        "{r:?}"
    );
    ensure!(account(store, "amy").await? == (10, 0, 0), "all or nothing");
    let r = store.hold(&ctx("h4"), &[("zed".to_string(), 1)]).await;
    ensure!(matches!(&r, Err(HoldError::Unknown(z)) if z == "zed"), "{r:?}");
    for bad in [vec![("bob".to_string(), 0)], vec![], vec![("amy".to_string(), 1), ("amy".to_string(), 1)]] {
        let r = store.hold(&ctx("h4"), &bad).await;
        ensure!(matches!(r, Err(HoldError::Invalid(_))), "{bad:?}: {r:?}");
    }
    let nul = PartialContext { partial_id: "h\0".into(), transaction_id: "t".into(), deadline_ms: 0 };
    ensure!(matches!(store.hold(&nul, &[("amy".to_string(), 1)]).await, Err(HoldError::Invalid(_))));
    ensure!(matches!(store.hold(&ctx("h4"), &[("a\0".to_string(), 1)]).await, Err(HoldError::Invalid(_))));
    ensure!(matches!(store.seed("a\0", 1).await, Err(Error::Invalid(_))));
    // A retried try of several lines is a no-op whatever their order (and
    // whatever order the database sorts them in).
    store.seed("Zoe", 5).await?;
    store.seed("abe", 5).await?;
    let mixed = vec![("abe".to_string(), 1), ("Zoe".to_string(), 2)];
    ensure!(store.hold(&ctx("h5"), &mixed).await?);
    let reordered = vec![("Zoe".to_string(), 2), ("abe".to_string(), 1)];
    ensure!(!store.hold(&ctx("h5"), &reordered).await?, "the same lines in another order are the same try");
    ensure!(rollback(store, &call("h5", &[])).await? == Applied::Now);
    // The failed tries left no record: h4 may still hold.
    ensure!(store.hold(&ctx("h4"), &[("amy".to_string(), 1)]).await?);
    ensure!(rollback(store, &call("h4", &[])).await? == Applied::Now);
    // Seeding past i64 is refused, not wrapped.
    ensure!(matches!(store.seed("bob", i64::MAX).await, Err(Error::Invalid(_))));
    ensure!(matches!(store.seed("bob", -1).await, Err(Error::Invalid(_))));
    // A far-future deadline from metadata is capped; the hold is overdue
    // only after it.
    store.hold(&ctx("far"), &[("amy".to_string(), 1)]).await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    let held = store.holds().await?;
    ensure!(held.len() == 1 && held[0].deadline_ms <= now + MAX_HOLD_MS, "{held:?}");
    ensure!(store.overdue(now).await?.is_empty());
    ensure!(store.overdue(now + MAX_HOLD_MS + 1).await?.len() == 1);
    let totals: i64 = store.accounts().await?.iter().map(|(_, a)| a.total()).sum();
    ensure!(totals == 100 + 10 + 10 + 5 + 5, "seeded amounts are conserved: {totals}");
    Ok(())
}

/// 16 identical commits at once, after a try: one applies.
async fn concurrent_duplicates<S: Counting>(store: &S) -> Result<()> {
    store.seed("conc", 50).await?;
    store.hold(&ctx("conc-p"), &[("conc".to_string(), 5)]).await?;
    let c = call("conc-p", &[("take", "conc", 5)]);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (store, c) = (store.clone(), c.clone());
            tokio::spawn(async move { commit(&store, &c).await })
        })
        .collect();
    let mut now = 0;
    for t in tasks {
        if t.await?? == Applied::Now {
            now += 1;
        }
    }
    ensure!(now == 1, "{now} of 16 applied");
    ensure!(store.count("conc-p").await? == 1);
    ensure!(account(store, "conc").await? == (45, 0, 5));
    Ok(())
}

/// Commit and rollback of one partial at once (a buggy coordinator): one
/// wins, the other is refused naming the outcome; with and without a try.
async fn commit_rollback_race<S: Counting>(store: &S) -> Result<()> {
    store.seed("race", 1000).await?;
    for i in 0..12 {
        let partial = format!("race-{i}");
        let tried = i % 2 == 0;
        if tried {
            store.hold(&ctx(&partial), &[("race".to_string(), 3)]).await?;
        }
        let commands: &[(&str, &str, i64)] = if tried { &[("take", "race", 3)] } else { &[("x", "", 0)] };
        let c = call(&partial, commands);
        let (s1, c1, s2, c2) = (store.clone(), c.clone(), store.clone(), c.clone());
        let (a, b) = tokio::join!(
            tokio::spawn(async move { commit(&s1, &c1).await }),
            tokio::spawn(async move { rollback(&s2, &c2).await })
        );
        match (a?, b?) {
            (Ok(Applied::Now), lost) => {
                refused(lost, "already committed")?;
                ensure!(store.phase_of(&partial).await? == Some(Phase::Committed));
            }
            (lost, Ok(Applied::Now)) => {
                refused(lost, "already rolled back")?;
                ensure!(store.phase_of(&partial).await? == Some(Phase::RolledBack));
            }
            other => bail!("{partial}: neither won cleanly: {other:?}"),
        }
        let applied = store.count(&partial).await? + store.count(&format!("{partial}:rollback")).await?;
        ensure!(applied == 1, "{partial}: one body ran to commit, not {applied}");
    }
    let (available, held, used) = account(store, "race").await?;
    ensure!(held == 0 && available + used == 1000, "{available} + {used}");
    Ok(())
}

/// A try's own release (its publish refused) racing the coordinator's
/// rollback of the same partial: both finish, and the hold goes back once.
async fn release_rollback_race<S: Counting>(store: &S) -> Result<()> {
    store.seed("rr", 100).await?;
    for i in 0..10 {
        let partial = format!("rr-{i}");
        store.hold(&ctx(&partial), &[("rr".to_string(), 7)]).await?;
        let (s1, s2, c) = (store.clone(), store.clone(), call(&partial, &[]));
        let p = partial.clone();
        let (released, rolled) = tokio::join!(
            tokio::spawn(async move { s1.release_now(&p).await }),
            tokio::spawn(async move { rollback(&s2, &c).await })
        );
        let (released, rolled) = (released??, rolled??);
        ensure!(rolled == Applied::Now && (released == 7 || released == 0), "{partial}: {released} {rolled:?}");
        ensure!(account(store, "rr").await? == (100, 0, 0), "{partial}: released once");
    }
    Ok(())
}

async fn suite<S: Counting>(store: &S) -> Result<()> {
    guard(store).await?;
    one_transaction(store).await?;
    reservations(store).await?;
    concurrent_duplicates(store).await?;
    commit_rollback_race(store).await?;
    release_rollback_race(store).await
}

fn sled() -> Result<(tempfile::TempDir, SledStore)> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path(), &[COUNTS])?;
    Ok((dir, store))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sled_keeps_every_guarantee() -> Result<()> {
    let (_dir, store) = sled()?;
    suite(&store).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_keeps_every_guarantee() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let store = open_counting_pg(&pg.url()).await?;
    suite(&store).await
}

#[tokio::test]
async fn postgres_refuses_a_newer_schema_and_opens_its_own_again() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    PgStore::connect(&pg.url()).await?;
    PgStore::connect(&pg.url()).await?; // the second start finds version 1
    pg.client().await?.execute("UPDATE tcc_sdk_schema SET version = 7", &[]).await?;
    let err = PgStore::connect(&pg.url()).await.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(err.contains("version 7") && err.contains("newer than this tcc-domain-sdk"), "{err}");
    let bad = PgStore::connect("postgres://nobody@127.0.0.1:1/x?connect_timeout=1").await.err();
    ensure!(matches!(bad, Some(Error::Store(_))), "an unreachable server is a store error: {bad:?}");
    let bad = PgStore::connect("not a url at all ===").await.err();
    ensure!(matches!(bad, Some(Error::Invalid(_))), "{bad:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restarting_under_phase_two_is_transient() -> Result<()> {
    use tcc_domain_sdk::proto::{self as v1, participant_client::ParticipantClient};
    let Some(mut pg) = Postgres::start().await? else { return Ok(()) };
    let store = open_counting_pg(&pg.url()).await?;
    store.seed("stock", 100).await?;
    for i in 0..8 {
        store.hold(&ctx(&format!("p{i}")), &[("stock".to_string(), 2)]).await?;
    }
    // The SDK's gRPC service, as the coordinator calls it.
    let service = tcc_domain_sdk::ParticipantService::new(store.clone(), Arc::new(Counter::<PgStore>::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let mut client = ParticipantClient::connect(url).await?;
    let request = |i: usize| v1::PhaseTwoRequest {
        transaction_id: format!("t-p{i}"),
        partial_id: format!("p{i}"),
        service: "counter".into(),
        commands: vec![v1::StoredCommand {
            sequence: 1,
            r#type: "take".into(),
            key: "stock".into(),
            payload: b"2".to_vec(),
        }],
    };
    client.commit(request(0)).await?;
    let forged = v1::PhaseTwoRequest { transaction_id: "t".repeat(65), ..request(1) };
    let refused = client.commit(forged).await.err().map(|s| s.code());
    ensure!(refused == Some(tonic::Code::InvalidArgument), "an overlong transaction id: {refused:?}");
    pg.crash().await?;
    for i in 1..8 {
        let status = client.commit(request(i)).await.err().map(|s| s.code());
        ensure!(status == Some(tonic::Code::Unavailable), "p{i} while the server is down: {status:?}");
    }
    pg.start_again().await?;
    // The pool finds its connections dead and opens new ones; each call
    // is retried, as the coordinator does, until acknowledged (bounded).
    for i in 0..8 {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match client.commit(request(i)).await {
                Ok(_) => break,
                Err(s) if s.code() == tonic::Code::Unavailable && attempts < 50 => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(s) => bail!("p{i} after the restart: {s:?}"),
            }
        }
    }
    for i in 0..8 {
        ensure!(store.count(&format!("p{i}")).await? == 1, "p{i} applied once");
    }
    ensure!(account(&store, "stock").await? == (84, 0, 16));
    Ok(())
}

/// A service killed (-9) between its local COMMIT and its answer: the
/// coordinator redelivers the Commit to the restarted service, which
/// acknowledges it without applying it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_killed_between_its_commit_and_its_answer_applies_once() -> Result<()> {
    use tcc_domain_sdk::proto::{self as v1, TransactionState};
    use tcc_tests::{Coordinator, Process, command, eventually, free_port};
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let addr = format!("127.0.0.1:{}", free_port()?);
    let endpoint = format!("counter=http://{addr}");
    let c =
        Coordinator::start(&["--participant", &endpoint, "--retry-initial-ms", "20", "--retry-max-ms", "200"]).await?;
    let args = vec!["--listen".to_string(), addr.clone(), "--database-url".to_string(), pg.url()];
    let mut service = Process::start("pg-participant", "counter", args, c.tmp()).await?;
    // The first life hangs after every local COMMIT.
    service.kill9().await?;
    service.restart_with_args(&["--hang-after-commit"]).await?;
    let store = open_counting_pg(&pg.url()).await?;

    let mut txns = c.transactions().await?;
    let begin = v1::BeginRequest { participants: vec!["counter".into()], timeout_ms: 30_000 };
    let t = txns.begin(begin).await?.into_inner();
    let partial = t.partials[0].partial_id.clone();
    let append = v1::AppendRequest {
        partial_id: partial.clone(),
        commands: vec![command("x", "", b"1"), command("y", "", b"2"), command("z", "", b"3")],
        idempotency_key: String::new(),
        service: "counter".into(),
    };
    c.topics().await?.append(append).await?;
    let confirm = v1::ConfirmRequest { transaction_id: t.transaction_id.clone(), wait: false, wait_timeout_ms: 0 };
    txns.confirm(confirm).await?;
    // Committed in the service's database, never answered.
    eventually("the service's local COMMIT", Duration::from_secs(20), || async {
        Ok((store.phase_of(&partial).await? == Some(Phase::Committed)).then_some(()))
    })
    .await?;
    // Its log line follows the COMMIT: the process is in the window.
    eventually("the service to say it will not answer", Duration::from_secs(10), || async {
        Ok(service.logs().contains("never answering").then_some(()))
    })
    .await?;
    service.kill9().await?;
    service.restart().await?;

    let get = v1::GetRequest { transaction_id: t.transaction_id.clone() };
    eventually("the transaction to be confirmed", Duration::from_secs(20), || {
        let (mut txns, get) = (txns.clone(), get.clone());
        async move {
            let state = txns.get(get).await?.into_inner().state;
            Ok((state == TransactionState::Confirmed as i32).then_some(()))
        }
    })
    .await?;
    ensure!(store.count(&partial).await? == 3, "three commands, applied once: {}", store.count(&partial).await?);
    ensure!(
        service.logs().contains("applied=Already"),
        "the redelivered Commit was acknowledged as already applied:\n{}",
        service.logs()
    );
    Ok(())
}

/// The reconciler on `store`: a hold whose transaction was confirmed but
/// never delivered (the service is not registered) is committed from the
/// topic; one whose partial the coordinator never began is rolled back;
/// both through the guard, so a later delivery is a redelivery.
async fn reconciler<S: Counting>(store: S) -> Result<()> {
    use tcc_domain_sdk::reservations::{Reconciled, Reconciler};
    use tcc_tests::{Coordinator, command};
    let c = Coordinator::start(&[]).await?;
    let sdk = tcc_domain_sdk::Coordinator::connect(&c.url()).await?;
    store.seed("stock", 20).await?;
    let txn = sdk.begin(&["counter"], Duration::from_millis(400)).await?;
    let ctx = txn.partial("counter")?;
    store.hold(&ctx, &[("stock".to_string(), 4)]).await?;
    let append = tcc_domain_sdk::proto::AppendRequest {
        partial_id: ctx.partial_id.clone(),
        commands: vec![command("take", "stock", b"3")],
        idempotency_key: String::new(),
        service: "counter".into(),
    };
    c.topics().await?.append(append).await?;
    let confirm =
        tcc_domain_sdk::proto::ConfirmRequest { transaction_id: txn.id.clone(), wait: false, wait_timeout_ms: 0 };
    c.transactions().await?.confirm(confirm).await?;
    // Never begun: an id the coordinator cannot have made, and a
    // well-formed one it does not know.
    let unknown = uuid::Uuid::now_v7().to_string();
    for partial in ["never-begun", unknown.as_str()] {
        let never = PartialContext { partial_id: partial.into(), transaction_id: "t".into(), deadline_ms: 0 };
        store.hold(&never, &[("stock".to_string(), 2)]).await?;
    }
    ensure!(account(&store, "stock").await? == (12, 8, 0));

    let reconciler = Reconciler::new(store.clone(), Arc::new(Counter::<S>::default()), sdk, Duration::ZERO);
    // The confirmed transaction's hold is overdue once its deadline passes.
    let total = std::sync::Mutex::new(Reconciled::default());
    tcc_tests::eventually("the confirmed hold to be settled", Duration::from_secs(10), || async {
        let r = reconciler.reconcile_once().await?;
        let mut total = total.lock().unwrap();
        total.committed += r.committed;
        total.rolled_back += r.rolled_back;
        total.pending += r.pending;
        Ok((total.committed == 1).then_some(()))
    })
    .await?;
    let total = *total.lock().unwrap();
    ensure!((total.committed, total.rolled_back, total.pending) == (1, 2, 0), "{total:?}");
    ensure!(account(&store, "stock").await? == (17, 0, 3), "3 used, the 1 left over and the 2 + 2 released");
    ensure!(store.count(&ctx.partial_id).await? == 1);
    ensure!(store.phase_of("never-begun").await? == Some(Phase::RolledBack));
    ensure!(store.phase_of(&unknown).await? == Some(Phase::RolledBack));
    ensure!(commit(&store, &call(&ctx.partial_id, &[("take", "stock", 3)])).await? == Applied::Already);
    ensure!(reconciler.reconcile_once().await? == Reconciled::default(), "nothing left");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_settles_overdue_holds_on_sled() -> Result<()> {
    let (_dir, store) = sled()?;
    reconciler(store).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_settles_overdue_holds_on_postgres() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    reconciler(open_counting_pg(&pg.url()).await?).await
}

/// A body that swallows a failed statement leaves PostgreSQL's
/// transaction aborted, and PostgreSQL answers its COMMIT with a silent
/// rollback: the SDK must not acknowledge it.
struct Swallowing;

impl tcc_domain_sdk::Participant for Swallowing {
    type Store = PgStore;

    async fn commit(
        &self,
        tx: &mut tcc_domain_sdk::store::postgres::PgTx<'_>,
        call: &PhaseTwo,
    ) -> tcc_domain_sdk::participant::TxResult<()> {
        PgStore::bump(tx, &call.partial_id).await?;
        let _ignored = tx.execute("SELECT 1 / 0", &[]).await;
        Ok(())
    }

    async fn rollback(
        &self,
        _: &mut tcc_domain_sdk::store::postgres::PgTx<'_>,
        _: &PhaseTwo,
    ) -> tcc_domain_sdk::participant::TxResult<()> {
        Ok(())
    }
}

#[tokio::test]
async fn postgres_does_not_acknowledge_a_body_that_swallowed_a_failed_statement() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let store = open_counting_pg(&pg.url()).await?;
    let c = call("swallow", &[("x", "", 0)]);
    let r = apply(&store, Arc::new(Swallowing), Phase::Committed, c.clone()).await;
    ensure!(matches!(&r, Err(Error::Store(m)) if m.contains("25P02") || m.contains("no longer holds")), "{r:?}");
    ensure!(store.phase_of("swallow").await?.is_none() && store.count("swallow").await? == 0, "nothing committed");
    // The redelivery, to a body that works, applies.
    ensure!(commit(&store, &c).await? == Applied::Now);
    ensure!(store.count("swallow").await? == 1);
    Ok(())
}
