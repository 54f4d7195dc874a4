//! The store conformance suite on PostgreSQL (a real server per test), and
//! what only a shared store has: leases, fencing and ownership between two
//! coordinators' stores, schema versions, and a database that restarts.
//!
//! Skipped, loudly, where PostgreSQL is not installed (see `tcc_tests::pg`);
//! required in CI.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tcc_coordinator::error::Error;
use tcc_coordinator::model::{Event, PartialId, ParticipantRecord, TxnId, TxnRecord, apply};
use tcc_coordinator::store::Store;
use tcc_coordinator::store::conformance::{self, Harness};
use tcc_coordinator::store::postgres::PgStore;
use tcc_tests::pg::Postgres;

/// Every open is a coordinator starting: the previous one is gone (its
/// lease is lapsed here, as if it had died and the lease run out), and the
/// new one takes over its work.
struct PgHarness(Postgres);

#[async_trait::async_trait]
impl Harness for PgHarness {
    async fn open(&self) -> tcc_coordinator::error::Result<Arc<dyn Store>> {
        let lapse = async {
            let c = self.0.client().await?;
            c.execute("UPDATE tcc_node SET expires_at = clock_timestamp() WHERE expires_at > clock_timestamp()", &[])
                .await
                .map(|_| ())
                .or_else(|e| if e.code().is_some() { Ok(()) } else { Err(e) }) // no table yet
                .map_err(anyhow::Error::from)
        };
        lapse.await.map_err(|e| Error::Storage(e.to_string()))?;
        Ok(Arc::new(PgStore::connect(&self.0.url(), Duration::from_secs(30)).await?))
    }
}

macro_rules! conformance_on_postgres {
    ($($name:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() -> Result<()> {
            let Some(pg) = Postgres::start().await? else { return Ok(()) };
            let h = PgHarness(pg);
            conformance::$name(&h).await.map_err(|e| anyhow::anyhow!("{e}; postgres log:\n{}", h.0.logs()))
        }
    )*};
}

conformance_on_postgres!(
    create_get_update_round_trip,
    partial_index_follows_participants,
    append_is_ordered_and_counted,
    idempotency_receipts,
    read_topic_paging,
    list_is_ordered_filtered_and_paged,
    delete_removes_everything_of_one_txn,
    survives_reopen,
    concurrent_writers_share_flushes,
    stale_and_skipped_versions_are_refused,
    concurrent_writers_of_one_version_have_one_winner,
    a_refused_append_stores_nothing,
    a_stale_delete_is_refused,
    due_work_queries_follow_the_records,
    registrations_are_stored_renewed_and_removed,
    unfinished_transactions_are_counted_by_state
);

fn txn(services: &[&str]) -> TxnRecord {
    let parts = services.iter().map(|s| ParticipantRecord::new(s.to_string(), PartialId::new())).collect();
    let mut t = TxnRecord::new(TxnId::new(), parts, 1_000, 31_000);
    t.version = 1;
    t
}

/// The next version of `t` after `event`.
fn next(t: &TxnRecord, event: Event) -> Result<TxnRecord> {
    let mut n = t.clone();
    apply(&mut n, event, 2_000)?;
    n.version += 1;
    Ok(n)
}

async fn lapse(pg: &Postgres, store: &PgStore) -> Result<()> {
    let node = store.node().context("a cluster store has a node id")?;
    let c = pg.client().await?;
    let n = c.execute("UPDATE tcc_node SET expires_at = clock_timestamp() WHERE id = $1", &[&node]).await?;
    ensure!(n == 1, "the node's lease row exists");
    Ok(())
}

/// A coordinator whose lease lapsed (it was paused, say) writes nothing
/// more; another takes its delivering transaction over, and the first,
/// back, is refused: nothing it does lands over the new owner's work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lapsed_lease_fences_every_write_and_the_work_is_taken_over() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let lease = Duration::from_secs(60);
    let a = PgStore::connect(&pg.url(), lease).await?;
    let b = PgStore::connect(&pg.url(), lease).await?;
    ensure!(a.node() != b.node(), "two coordinators, two node ids");

    let t = txn(&["x", "y"]);
    a.create_txn(&t).await?;
    let decided = next(&t, Event::Confirm)?;
    a.update_txn(&decided, None).await?;
    ensure!(b.due_deliveries(i64::MAX, 10).await?.is_empty(), "b leaves a's delivery alone while a's lease is live");
    ensure!(b.claim(&decided).await?.is_none(), "b cannot claim it either");
    let progress = next(&decided, Event::Delivered { participant: 0 })?;
    match b.update_txn(&progress, None).await {
        Err(Error::Fenced(m)) => ensure!(m.contains("being delivered by"), "{m}"),
        other => bail!("b's write of a's delivering transaction: {other:?}"),
    }
    ensure!(a.claim(&decided).await? == Some(decided.version), "a already owns it: no write");

    // a is paused past its lease.
    lapse(&pg, &a).await?;
    match a.update_txn(&progress, None).await {
        Err(Error::Fenced(m)) => ensure!(m.contains("lease") && m.contains("lapsed"), "{m}"),
        other => bail!("a write under a lapsed lease: {other:?}"),
    }
    let other = txn(&["z"]);
    ensure!(matches!(a.create_txn(&other).await, Err(Error::Fenced(_))), "no write at all, new records included");
    ensure!(b.get_txn(other.id).await?.is_none(), "the refused create stored nothing");
    ensure!(b.get_txn(t.id).await? == Some(decided.clone()), "the refused progress stored nothing");

    // b takes over: the transaction is due for b now, and b claims it.
    ensure!(b.due_deliveries(i64::MAX, 10).await? == vec![t.id], "orphaned delivery is b's to do");
    let claimed = b.claim(&decided).await?.context("b claims the orphan")?;
    ensure!(claimed == decided.version + 1, "a claim is a write");
    let mut by_b = decided.clone();
    by_b.version = claimed;
    let by_b = next(&by_b, Event::Delivered { participant: 1 })?;
    b.update_txn(&by_b, None).await?;

    // a, back under a new id (as its renewal task does), is still refused:
    // its write is based on the version before b's.
    let a2 = PgStore::connect(&pg.url(), lease).await?;
    match a2.update_txn(&progress, None).await {
        Err(Error::Conflict { expected, found, .. }) => ensure!(expected == 2 && found == 4, "{expected} {found}"),
        other => bail!("a stale write after the takeover: {other:?}"),
    }
    ensure!(a2.claim(&by_b).await?.is_none(), "b is live and owns it");
    ensure!(b.get_txn(t.id).await? == Some(by_b), "b's work stands");
    Ok(())
}

/// Deadlines and GC follow the same ownership as delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadlines_and_collection_are_the_owners_until_its_lease_lapses() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let lease = Duration::from_secs(60);
    let a = PgStore::connect(&pg.url(), lease).await?;
    let b = PgStore::connect(&pg.url(), lease).await?;
    let active = txn(&["x"]);
    a.create_txn(&active).await?;
    let mut done = txn(&["x"]);
    a.create_txn(&done).await?;
    done = next(&done, Event::Cancel { reason: "r".into() })?;
    done.version -= 1;
    apply(&mut done, Event::Delivered { participant: 0 }, 3_000)?;
    done.version += 1;
    a.update_txn(&done, None).await?;

    ensure!(a.due_deadlines(i64::MAX, 10).await?.0 == vec![active.id], "a sweeps its own deadline");
    ensure!(b.due_deadlines(i64::MAX, 10).await?.0.is_empty(), "b does not");
    ensure!(a.collectable(i64::MAX, 10).await?.0.len() == 1, "a collects its own");
    ensure!(b.collectable(i64::MAX, 10).await?.0.is_empty(), "b does not");
    lapse(&pg, &a).await?;
    ensure!(b.due_deadlines(i64::MAX, 10).await?.0 == vec![active.id], "b sweeps a's deadline once a's lease lapsed");
    let (gc, _) = b.collectable(i64::MAX, 10).await?;
    ensure!(gc.len() == 1, "and collects a's finished transaction");
    b.delete_txn(&gc[0]).await?;
    ensure!(b.get_txn(done.id).await?.is_none(), "collected");
    Ok(())
}

/// A database migrated by a newer coordinator is refused with a message
/// that says so; an up-to-date one is used as is by every coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_newer_schema_is_refused_with_a_clear_message() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let first = PgStore::connect(&pg.url(), Duration::from_secs(10)).await?;
    drop(first);
    let again = PgStore::connect(&pg.url(), Duration::from_secs(10)).await;
    ensure!(again.is_ok(), "the same schema version is accepted: {:?}", again.err());
    let c = pg.client().await?;
    c.execute("UPDATE tcc_schema SET version = 99", &[]).await?;
    match PgStore::connect(&pg.url(), Duration::from_secs(10)).await {
        Err(e) => {
            let m = e.to_string();
            ensure!(m.contains("schema is version 99") && m.contains("newer"), "{m}");
        }
        Ok(_) => bail!("a newer schema was accepted"),
    }
    Ok(())
}

/// Coordinators starting together against an empty database: the schema is
/// created once, and all of them come up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_starts_migrate_once() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let url = pg.url();
    let starts = (0..4).map(|_| PgStore::connect(&url, Duration::from_secs(10)));
    for s in futures::future::join_all(starts).await {
        s?;
    }
    let c = pg.client().await?;
    let rows = c.query("SELECT version FROM tcc_schema", &[]).await?;
    ensure!(rows.len() == 1 && rows[0].get::<_, i32>(0) == 1, "one schema row at version 1");
    Ok(())
}

/// Unreachable database: UNAVAILABLE naming the database; back by itself
/// once the database is, and nothing acknowledged before is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_restart_is_unavailable_then_recovered_without_a_restart() -> Result<()> {
    let Some(mut pg) = Postgres::start().await? else { return Ok(()) };
    let s = PgStore::connect(&pg.url(), Duration::from_secs(30)).await?;
    let t = txn(&["x"]);
    s.create_txn(&t).await?;
    pg.crash().await?;
    match s.get_txn(t.id).await {
        Err(Error::Unavailable(m)) => ensure!(m.contains("database"), "{m}"),
        other => bail!("a read while the database is down: {other:?}"),
    }
    match s.create_txn(&txn(&["y"])).await {
        Err(Error::Unavailable(m)) => ensure!(m.contains("database"), "{m}"),
        other => bail!("a write while the database is down: {other:?}"),
    }
    pg.start_again().await?;
    let back = tcc_tests::eventually("the store to work again", Duration::from_secs(20), || async {
        Ok(s.get_txn(t.id).await.ok())
    })
    .await?;
    ensure!(back == Some(t.clone()), "the acknowledged create survived the crash");
    let decided = next(&t, Event::Confirm)?;
    s.update_txn(&decided, None).await?;
    ensure!(s.get_txn(t.id).await? == Some(decided), "writes work again");
    Ok(())
}

/// A write whose connection is lost while it is in flight (here: while it
/// waits for a row lock, then its backend is terminated) fails UNAVAILABLE,
/// saying that its outcome is unknown and a retry is safe; the retry then
/// lands exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_cut_off_in_flight_is_reported_as_unknown_and_safe_to_retry() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let s = Arc::new(PgStore::connect(&pg.url(), Duration::from_secs(30)).await?);
    let t = txn(&["x"]);
    s.create_txn(&t).await?;
    let blocker = pg.client().await?;
    blocker.batch_execute(&format!("BEGIN; SELECT 1 FROM tcc_txn WHERE id = '{}' FOR UPDATE", t.id.0)).await?;
    let decided = next(&t, Event::Confirm)?;
    let write = tokio::spawn({
        let (s, decided) = (s.clone(), decided.clone());
        async move { s.update_txn(&decided, None).await }
    });
    let killer = pg.client().await?;
    let waiting =
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'tcc-coordinator' AND wait_event_type = 'Lock'";
    tcc_tests::eventually("the write to wait for the row lock", Duration::from_secs(10), || async {
        Ok((!killer.query(waiting, &[]).await?.is_empty()).then_some(()))
    })
    .await?;
    killer.execute(&format!("SELECT pg_terminate_backend(pid) FROM ({waiting}) w"), &[]).await?;
    match write.await? {
        Err(Error::Unavailable(m)) => {
            ensure!(m.contains("may or may not have been applied") && m.contains("retrying is safe"), "{m}")
        }
        other => bail!("a write cut off in flight: {other:?}"),
    }
    blocker.batch_execute("ROLLBACK").await?;
    // The pool replaces the dead connection; the retry lands once.
    let retried = tcc_tests::eventually("the retry to land", Duration::from_secs(10), || async {
        Ok(s.update_txn(&decided, None).await.ok())
    })
    .await;
    ensure!(retried.is_ok(), "retry: {retried:?}");
    ensure!(s.get_txn(t.id).await? == Some(decided.clone()), "applied once, at version 2");
    ensure!(matches!(s.update_txn(&decided, None).await, Err(Error::Conflict { .. })), "a second retry conflicts");
    Ok(())
}

/// Concurrent writes share database transactions (group commit: fewer
/// write transactions than writes), and a write that fails in a group
/// fails alone: the group is rolled back and each of its writes runs again
/// by itself, so the others are written. (The bad write: a command type
/// with a NUL byte, which PostgreSQL's `text` refuses.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grouped_writes_commit_together_and_a_bad_one_fails_alone() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let s = Arc::new(PgStore::connect(&pg.url(), Duration::from_secs(30)).await?);
    let db = pg.client().await?;
    let xid = || async { Ok::<i64, anyhow::Error>(db.query_one("SELECT txid_current()", &[]).await?.get(0)) };
    const N: usize = 64;
    let txns: Vec<TxnRecord> = (0..N).map(|_| txn(&["x"])).collect();

    let before = xid().await?;
    let creates = txns.iter().map(|t| {
        let (s, t) = (s.clone(), t.clone());
        tokio::spawn(async move { s.create_txn(&t).await })
    });
    for r in futures::future::join_all(creates).await {
        r??;
    }
    let commits = xid().await? - before - 1; // txid_current() itself is one
    ensure!(commits < N as i64, "{N} concurrent creates in {commits} write transactions: not grouped");

    let rollbacks = || async {
        let sql = "SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()";
        Ok::<i64, anyhow::Error>(db.query_one(sql, &[]).await?.get(0))
    };
    let rolled_back = rollbacks().await?;
    let bad = |i: usize| i % 16 == 5;
    let appends = txns.iter().enumerate().map(|(i, t)| {
        let s = s.clone();
        let mut n = t.clone();
        let kind = if bad(i) { "bad\0type".to_string() } else { "t.Cmd".to_string() };
        let command = tcc_coordinator::model::CommandRecord { sequence: 1, kind, key: "k".into(), payload: vec![1; 8] };
        tokio::spawn(async move {
            apply(&mut n, Event::Append { participant: 0, commands: 1, bytes: 8 }, 2_000)?;
            n.version += 1;
            let partial_id = n.participants[0].partial_id;
            let batch = tcc_coordinator::store::AppendBatch { partial_id, commands: &[command], idempotency: None };
            s.append(&n, batch).await.map_err(anyhow::Error::from)?;
            Ok::<_, anyhow::Error>(n)
        })
    });
    let results = futures::future::join_all(appends).await;
    for (i, (r, t)) in results.into_iter().zip(&txns).enumerate() {
        let stored = s.get_txn(t.id).await?;
        let topic = s.read_topic(t.participants[0].partial_id, 1, 10).await?;
        match r? {
            Ok(n) if !bad(i) => {
                ensure!(stored == Some(n), "append {i} was acknowledged and is stored");
                ensure!(topic.len() == 1 && topic[0].kind == "t.Cmd", "its command is stored: {topic:?}");
            }
            Err(e) if bad(i) => {
                ensure!(e.to_string().contains("SQLSTATE 22021"), "the bad write names its error: {e}");
                ensure!(stored == Some(t.clone()) && topic.is_empty(), "the bad write stored nothing");
            }
            other => bail!("append {i} (bad: {}): {other:?}", bad(i)),
        }
    }
    // A group with a bad write in it was rolled back, so the fallback ran:
    // more rollbacks than the bad writes' own (each fails alone once), as
    // the statistics say within their flush interval (at most 10 s).
    let bad_writes = (0..N).filter(|i| bad(*i)).count() as i64;
    tcc_tests::eventually("a rolled-back group in the statistics", Duration::from_secs(20), || async {
        Ok((rollbacks().await? > rolled_back + bad_writes).then_some(()))
    })
    .await?;
    Ok(())
}

/// Concurrent reads share queries (one per group of record reads, one per
/// group of topic reads); each still gets exactly its own answer: its
/// record or none, its topic's commands from its `from`, at most its
/// `limit`, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grouped_reads_each_get_their_own_answer() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let s = Arc::new(PgStore::connect(&pg.url(), Duration::from_secs(30)).await?);
    const N: usize = 48;
    let mut txns = Vec::new();
    for i in 0..N {
        let t = txn(&["x"]);
        s.create_txn(&t).await?;
        let commands: Vec<_> = (1..=(i % 5) as u64)
            .map(|sequence| tcc_coordinator::model::CommandRecord {
                sequence,
                kind: format!("t.Cmd{i}"),
                key: format!("k{sequence}"),
                payload: vec![i as u8; sequence as usize],
            })
            .collect();
        let mut n = t.clone();
        if !commands.is_empty() {
            let bytes = commands.iter().map(|c| c.payload.len() as u64).sum();
            apply(&mut n, Event::Append { participant: 0, commands: commands.len() as u64, bytes }, 2_000)?;
            n.version += 1;
            let batch = tcc_coordinator::store::AppendBatch {
                partial_id: n.participants[0].partial_id,
                commands: &commands,
                idempotency: None,
            };
            s.append(&n, batch).await?;
        }
        txns.push((n, commands));
    }
    for _round in 0..3 {
        let mut reads = Vec::new();
        for (i, (t, commands)) in txns.iter().enumerate() {
            let (s, t, commands) = (s.clone(), t.clone(), commands.clone());
            reads.push(tokio::spawn(async move {
                ensure!(s.get_txn(t.id).await? == Some(t.clone()), "record {i}");
                ensure!(s.get_txn(TxnId::new()).await?.is_none(), "a missing record is none");
                let (from, limit) = (1 + (i as u64 % 3), 1 + i % 2);
                let want: Vec<_> = commands.iter().filter(|c| c.sequence >= from).take(limit).cloned().collect();
                let got = s.read_topic(t.participants[0].partial_id, from, limit).await?;
                ensure!(got == want, "topic {i} from {from}, at most {limit}: {got:?}, not {want:?}");
                let all = s.read_topic(t.participants[0].partial_id, 1, usize::MAX).await?;
                ensure!(all == commands, "topic {i} whole");
                Ok(())
            }));
        }
        for r in futures::future::join_all(reads).await {
            r??;
        }
    }
    Ok(())
}

/// A group whose connection is lost before its COMMIT: every write in it
/// is reported UNAVAILABLE with an unknown outcome (safe to retry), and
/// none of them is applied, even those whose statements had already run.
///
/// Made deterministic with row locks: both writer tasks are first kept
/// busy by lone writes waiting for locks; the group's writes are queued
/// meanwhile (each is queued on its first poll); one writer is let go and
/// takes them all as one group, which runs its statements up to the last
/// one (a locked row); then its backend is terminated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_cut_off_before_its_commit_is_unknown_and_applies_nothing() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let s = Arc::new(PgStore::connect(&pg.url(), Duration::from_secs(30)).await?);
    let (x0, x1) = (txn(&["x"]), txn(&["x"]));
    let ys: Vec<TxnRecord> = (0..6).map(|_| txn(&["x"])).collect();
    let z = txn(&["x"]); // created last: the largest id, so the last statement of its group
    for t in [&x0, &x1].into_iter().chain(&ys).chain([&z]) {
        s.create_txn(t).await?;
    }
    let lock = |ids: Vec<uuid::Uuid>| {
        let pg = &pg;
        async move {
            let c = pg.client().await?;
            c.execute("BEGIN", &[]).await?;
            c.execute("SELECT 1 FROM tcc_txn WHERE id = ANY($1) FOR UPDATE", &[&ids]).await?;
            Ok::<_, anyhow::Error>(c)
        }
    };
    let blocker0 = lock(vec![x0.id.0]).await?;
    let blocker1 = lock(vec![x1.id.0, z.id.0]).await?;
    let admin = pg.client().await?;
    let waiting =
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'tcc-coordinator' AND wait_event_type = 'Lock'";
    let waiters = |n: usize| {
        let admin = &admin;
        async move {
            tcc_tests::eventually(&format!("{n} writes waiting for row locks"), Duration::from_secs(10), || async {
                Ok((admin.query(waiting, &[]).await?.len() == n).then_some(()))
            })
            .await
        }
    };
    let spawn_confirm = |t: &TxnRecord| {
        let (s, next) = (s.clone(), next(t, Event::Confirm));
        tokio::spawn(async move { s.update_txn(&next?, None).await.map_err(anyhow::Error::from) })
    };
    let first = spawn_confirm(&x0);
    waiters(1).await?;
    let second = spawn_confirm(&x1);
    waiters(2).await?; // both writer tasks are busy

    let nexts: Vec<TxnRecord> = ys.iter().chain([&z]).map(|t| next(t, Event::Confirm)).collect::<Result<_>>()?;
    let mut group = Box::pin(futures::future::join_all(nexts.iter().map(|n| s.update_txn(n, None))));
    ensure!(futures::poll!(group.as_mut()).is_pending(), "the group's writes wait");
    blocker0.execute("COMMIT", &[]).await?;
    first.await??; // x0's writer is free, and takes the queued writes as one group
    waiters(2).await?; // x1's lone write, and the group at z's row
    admin.execute(&format!("SELECT pg_terminate_backend(pid) FROM ({waiting}) w"), &[]).await?;

    for (what, r) in group.await.into_iter().map(|r| ("grouped", r)).chain([(
        "lone",
        second.await?.map_err(|e| match e.downcast::<Error>() {
            Ok(e) => e,
            Err(e) => Error::Storage(e.to_string()),
        }),
    )]) {
        match r {
            Err(Error::Unavailable(m)) => ensure!(
                m.contains("may or may not have been applied") && m.contains("retrying is safe"),
                "{what} write: {m}"
            ),
            other => bail!("a {what} write cut off before its commit: {other:?}"),
        }
    }
    blocker1.execute("ROLLBACK", &[]).await?;
    for t in ys.iter().chain([&z, &x1]) {
        ensure!(s.get_txn(t.id).await? == Some(t.clone()), "nothing of the cut-off writes was applied");
    }
    ensure!(s.get_txn(x0.id).await?.map(|t| t.version) == Some(2), "the write that went through stays");
    Ok(())
}

/// The latest time the stored transactions hold, from which a coordinator
/// whose clock was stepped back starts its time (`SteadyClock`): the
/// newest creation, or a later finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latest_stored_time_is_the_newest_creation_or_a_later_finish() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let store = PgStore::connect(&pg.url(), Duration::from_secs(30)).await?;
    ensure!(store.latest_ms().await?.is_none(), "an empty database holds no time");
    let mut old = txn(&["x"]);
    old.created_ms = 1_000;
    store.create_txn(&old).await?;
    let mut new = txn(&["x"]);
    new.created_ms = 5_000;
    store.create_txn(&new).await?;
    ensure!(store.latest_ms().await? == Some(5_000), "the newest creation");
    // Finished (the state is all the store reads of it).
    let mut finished = next(&old, Event::Cancel { reason: String::new() })?;
    finished.state = tcc_coordinator::model::TxnState::Cancelled;
    finished.finished_ms = 9_000;
    store.update_txn(&finished, None).await?;
    ensure!(store.latest_ms().await? == Some(9_000), "a later finish");
    Ok(())
}
