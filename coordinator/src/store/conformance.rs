//! The conformance suite every [`Store`] implementation must pass.
//!
//! A backend provides a [`Harness`] that can open the *same* storage again
//! (to check that data survives a reopen), then instantiates the suite with
//! [`store_conformance_tests!`](crate::store_conformance_tests), which
//! expands to one `#[tokio::test]` per check:
//!
//! ```ignore
//! tcc_coordinator::store_conformance_tests!(my_harness());
//! ```
//!
//! Besides storage and queries, it checks the conflict rules of the
//! contract: stale, skipped and duplicate versions are refused and write
//! nothing, and of concurrent writers based on one version exactly one
//! wins.

use std::collections::HashSet;
use std::sync::Arc;

use super::{AppendBatch, ListQuery, Store};
use crate::error::{Error, Result};
use crate::model::{
    AppendReceipt, CommandRecord, Event, PartialId, ParticipantRecord, Registration, TxnId, TxnRecord, TxnState, apply,
};

/// Opens a store; every call opens the same underlying storage.
#[async_trait::async_trait]
pub trait Harness: Sync {
    /// Opens the storage (again). The previous store is dropped first.
    async fn open(&self) -> Result<Arc<dyn Store>>;
}

/// Expands to one `#[tokio::test]` per conformance check, each with a fresh
/// harness from `$harness` (an expression evaluated per test).
#[macro_export]
macro_rules! store_conformance_tests {
    (@tests $harness:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() -> $crate::error::Result<()> {
                let h = $harness;
                $crate::store::conformance::$name(&h).await
            }
        )*
    };
    ($harness:expr) => {
        $crate::store_conformance_tests!(@tests $harness;
            create_get_update_round_trip, partial_index_follows_participants, append_is_ordered_and_counted,
            idempotency_receipts, read_topic_paging, list_is_ordered_filtered_and_paged,
            delete_removes_everything_of_one_txn, survives_reopen, concurrent_writers_share_flushes,
            stale_and_skipped_versions_are_refused, concurrent_writers_of_one_version_have_one_winner,
            a_refused_append_stores_nothing, a_stale_delete_is_refused, due_work_queries_follow_the_records,
            registrations_are_stored_renewed_and_removed, unfinished_transactions_are_counted_by_state);
    };
}

const T0: i64 = 1_000;

fn txn(services: &[&str]) -> TxnRecord {
    txn_at(services, T0)
}

fn txn_at(services: &[&str], created: i64) -> TxnRecord {
    let parts = services.iter().map(|s| ParticipantRecord::new(s.to_string(), PartialId::new())).collect();
    let mut t = TxnRecord::new(TxnId::new(), parts, created, created + 30_000);
    t.version = 1;
    t
}

/// Applies `event` and moves to the next version, as the engine does.
fn step(t: &mut TxnRecord, event: Event, now: i64) -> Result<()> {
    apply(t, event, now)?;
    t.version += 1;
    Ok(())
}

fn commands(from: u64, n: u64) -> Vec<CommandRecord> {
    (from..from + n)
        .map(|sequence| CommandRecord {
            sequence,
            kind: "t.Cmd".into(),
            key: format!("k{sequence}"),
            payload: vec![sequence as u8; 3],
        })
        .collect()
}

fn check(cond: bool, what: &str) -> Result<()> {
    if cond { Ok(()) } else { Err(Error::Storage(format!("conformance check failed: {what}"))) }
}

fn is_conflict<T>(r: &Result<T>) -> bool {
    matches!(r, Err(Error::Conflict { .. }))
}

/// Appends `n` commands to participant `idx` the way the engine does.
async fn append_n(s: &dyn Store, t: &mut TxnRecord, idx: usize, n: u64, key: Option<&str>) -> Result<AppendReceipt> {
    let first = t.participants[idx].command_count + 1;
    let cmds = commands(first, n);
    let bytes = cmds.iter().map(|c| c.payload.len() as u64).sum();
    step(t, Event::Append { participant: idx, commands: n, bytes }, 2_000)?;
    let receipt = AppendReceipt { first_sequence: first, last_sequence: first + n - 1, bytes, digest: first };
    let batch = AppendBatch {
        partial_id: t.participants[idx].partial_id,
        commands: &cmds,
        idempotency: key.map(|k| (k, receipt)),
    };
    s.append(t, batch).await?;
    Ok(receipt)
}

/// Decides confirm and acknowledges every participant: CONFIRMED at `at`.
async fn finish(s: &dyn Store, t: &mut TxnRecord, at: i64) -> Result<()> {
    let mut next = t.clone();
    apply(&mut next, Event::Confirm, at)?;
    for i in 0..next.participants.len() {
        apply(&mut next, Event::Delivered { participant: i }, at)?;
    }
    next.version += 1;
    s.update_txn(&next, None).await?;
    *t = next;
    Ok(())
}

/// A written record reads back equal, with its version; a missing one is
/// `None`.
pub async fn create_get_update_round_trip<H: Harness>(h: &H) -> Result<()> {
    let s = h.open().await?;
    let mut t = txn(&["a", "b"]);
    s.create_txn(&t).await?;
    check(s.get_txn(t.id).await? == Some(t.clone()), "record reads back")?;
    step(&mut t, Event::Confirm, 3_000)?;
    s.update_txn(&t, None).await?;
    let back = s.get_txn(t.id).await?;
    check(back.as_ref().map(|b| b.version) == Some(2), "version 2 after one update")?;
    check(back == Some(t.clone()), "update reads back")?;
    step(&mut t, Event::Delivered { participant: 0 }, 3_500)?;
    s.update_txn(&t, None).await?;
    check(s.get_txn(t.id).await? == Some(t.clone()), "second update reads back")?;
    check(s.get_txn(TxnId::new()).await?.is_none(), "missing txn is None")?;
    // The owner (who began it) and the trace context are kept, through
    // updates and a reopen.
    let mut owned = txn(&["a"]);
    owned.owner = "shop".into();
    owned.trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into();
    s.create_txn(&owned).await?;
    step(&mut owned, Event::Cancel { reason: "r".into() }, 3_000)?;
    s.update_txn(&owned, None).await?;
    drop(s);
    let s = h.open().await?;
    let back = s.get_txn(owned.id).await?;
    check(back.as_ref().map(|b| b.owner.as_str()) == Some("shop"), "owner reads back after reopen")?;
    check(back.map(|b| b.trace) == Some(owned.trace.clone()), "trace context reads back after reopen")?;
    check(s.get_txn(t.id).await?.map(|b| b.owner) == Some(String::new()), "no owner reads back as none")
}

/// Every participant's partial id, including enlisted ones, finds its txn.
pub async fn partial_index_follows_participants<H: Harness>(h: &H) -> Result<()> {
    let s = h.open().await?;
    let mut t = txn(&["a"]);
    s.create_txn(&t).await?;
    let p = PartialId::new();
    step(&mut t, Event::Enlist { service: "b".into(), partial_id: p }, 1_500)?;
    s.update_txn(&t, Some(p)).await?;
    // Record-only updates keep the index.
    step(&mut t, Event::Cancel { reason: "r".into() }, 1_600)?;
    s.update_txn(&t, None).await?;
    for part in &t.participants {
        check(s.find_partial(part.partial_id).await? == Some(t.id), "partial index entry")?;
    }
    check(s.find_partial(PartialId::new()).await?.is_none(), "unknown partial is None")
}

/// Appended commands come back in order, with the record's counters.
pub async fn append_is_ordered_and_counted<H: Harness>(h: &H) -> Result<()> {
    let s = h.open().await?;
    let mut t = txn(&["a", "b"]);
    s.create_txn(&t).await?;
    append_n(&*s, &mut t, 0, 3, None).await?;
    append_n(&*s, &mut t, 0, 2, None).await?;
    append_n(&*s, &mut t, 1, 1, None).await?;
    let a = s.read_topic(t.participants[0].partial_id, 1, 100).await?;
    check(a == commands(1, 5), "topic a holds 5 commands in order")?;
    let b = s.read_topic(t.participants[1].partial_id, 1, 100).await?;
    check(b == commands(1, 1), "topic b holds its own command only")?;
    let rec = s.get_txn(t.id).await?;
    check(rec.as_ref().map(|r| r.participants[0].command_count) == Some(5), "counter stored with the batch")?;
    check(rec.map(|r| r.version) == Some(4), "each append is a version")
}

/// A receipt stored with an append is found by its key, and only there.
pub async fn idempotency_receipts<H: Harness>(h: &H) -> Result<()> {
    let s = h.open().await?;
    let mut t = txn(&["a", "b"]);
    s.create_txn(&t).await?;
    let r = append_n(&*s, &mut t, 0, 2, Some("key-1")).await?;
    let pa = t.participants[0].partial_id;
    let pb = t.participants[1].partial_id;
    check(s.find_receipt(pa, "key-1").await? == Some(r), "receipt found")?;
    check(s.find_receipt(pa, "key-2").await?.is_none(), "other key not found")?;
    check(s.find_receipt(pb, "key-1").await?.is_none(), "keys are per topic")
}

/// `read_topic` honours `from` and `limit`.
pub async fn read_topic_paging<H: Harness>(h: &H) -> Result<()> {
    let s = h.open().await?;
    let mut t = txn(&["a"]);
    s.create_txn(&t).await?;
    append_n(&*s, &mut t, 0, 10, None).await?;
    let p = t.participants[0].partial_id;
    check(s.read_topic(p, 4, 3).await? == commands(4, 3), "from 4, 3 commands")?;
    check(s.read_topic(p, 9, 100).await? == commands(9, 2), "tail")?;
    check(s.read_topic(p, 11, 100).await?.is_empty(), "past the end")?;
    check(s.read_topic(p, 1, usize::MAX).await? == commands(1, 10), "no limit")?;
    check(s.read_topic(PartialId::new(), 1, 100).await?.is_empty(), "unknown topic is empty")
}

/// Collects every page of a listing.
async fn list_all(s: &dyn Store, states: &[TxnState], created_until_ms: i64, page: usize) -> Result<Vec<TxnId>> {
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let q = ListQuery { states: states.to_vec(), created_until_ms, after, limit: page };
        let got = s.list(&q).await?;
        check(got.transactions.len() <= page, "page size honoured")?;
        seen.extend(got.transactions.iter().map(|t| t.id));
        match got.next {
            Some(n) => after = Some(n),
            None => return Ok(seen),
        }
    }
}

/// `list` returns records in id (creation) order, filtered by state and
/// creation time record by record (a "young" record in the middle does not
/// end the listing), in pages.
pub async fn list_is_ordered_filtered_and_paged<H: Harness>(h: &H) -> Result<()> {
    let s = h.open().await?;
    let mut all = Vec::new();
    for i in 0..25 {
        // Every fifth record claims to be from the future (clock skew).
        let created = if i % 5 == 2 { T0 + 1_000_000 } else { T0 };
        let mut t = txn_at(&["a"], created);
        s.create_txn(&t).await?;
        if i % 3 == 0 {
            finish(&*s, &mut t, 5_000).await?;
        }
        all.push(t);
    }
    let ids = |f: &dyn Fn(&TxnRecord) -> bool| all.iter().filter(|t| f(t)).map(|t| t.id).collect::<Vec<_>>();
    check(list_all(&*s, &[], i64::MAX, 10).await? == ids(&|_| true), "all records, in creation order, once")?;
    check(list_all(&*s, &[], T0, 4).await? == ids(&|t| t.created_ms <= T0), "skewed records skipped, not an end")?;
    let active = [TxnState::Active];
    check(
        list_all(&*s, &active, i64::MAX, 3).await? == ids(&|t| t.state == TxnState::Active),
        "unfinished state filter",
    )?;
    let done = [TxnState::Confirmed];
    check(
        list_all(&*s, &done, T0, 2).await? == ids(&|t| t.state == TxnState::Confirmed && t.created_ms <= T0),
        "finished state and age filter",
    )
}

/// `delete_txn` removes the record, index entries, topics and receipts of one
/// transaction and nothing of another.
pub async fn delete_removes_everything_of_one_txn<H: Harness>(h: &H) -> Result<()> {
    let s = h.open().await?;
    let mut gone = txn(&["a", "b"]);
    let mut kept = txn(&["a"]);
    for t in [&mut gone, &mut kept] {
        s.create_txn(t).await?;
        append_n(&*s, t, 0, 3, Some("k")).await?;
        finish(&*s, t, 4_000).await?;
    }
    s.delete_txn(&gone).await?;
    check(s.get_txn(gone.id).await?.is_none(), "record deleted")?;
    for p in &gone.participants {
        check(s.find_partial(p.partial_id).await?.is_none(), "index deleted")?;
        check(s.read_topic(p.partial_id, 1, 10).await?.is_empty(), "topic deleted")?;
        check(s.find_receipt(p.partial_id, "k").await?.is_none(), "receipt deleted")?;
    }
    let kp = kept.participants[0].partial_id;
    check(s.get_txn(kept.id).await?.is_some(), "other record kept")?;
    check(s.read_topic(kp, 1, 10).await?.len() == 3, "other topic kept")?;
    check(s.find_receipt(kp, "k").await?.is_some(), "other receipt kept")?;
    let (collectable, _) = s.collectable(i64::MAX, 10).await?;
    check(collectable.iter().map(|t| t.id).collect::<Vec<_>>() == vec![kept.id], "deleted leaves the GC index")?;
    s.delete_txn(&gone).await?; // deleting again is fine

    // In a batch: the current one goes, a stale one and a gone one are
    // skipped.
    let mut stale = txn(&["a"]);
    s.create_txn(&stale).await?;
    finish(&*s, &mut stale, 4_500).await?;
    let old = stale.clone();
    let mut moved = stale.clone();
    moved.version += 1;
    s.update_txn(&moved, None).await?;
    check(s.delete_txns(&[kept.clone(), old, gone.clone()]).await? == 1, "a batch deletes only current ones")?;
    check(s.get_txn(kept.id).await?.is_none(), "the current one is gone")?;
    check(s.read_topic(kp, 1, 10).await?.is_empty(), "with its topic")?;
    check(s.find_receipt(kp, "k").await?.is_none(), "and its receipt")?;
    check(s.find_partial(kp).await?.is_none(), "and its index entry")?;
    check(s.get_txn(moved.id).await? == Some(moved), "the changed one stays")?;
    Ok(())
}

/// What was acknowledged is there after the store is closed and reopened,
/// versions and queries included.
pub async fn survives_reopen<H: Harness>(h: &H) -> Result<()> {
    let mut t = txn(&["a"]);
    {
        let s = h.open().await?;
        s.create_txn(&t).await?;
        append_n(&*s, &mut t, 0, 4, Some("k")).await?;
    }
    let s = h.open().await?;
    check(s.get_txn(t.id).await? == Some(t.clone()), "record (and version) after reopen")?;
    let p = t.participants[0].partial_id;
    check(s.read_topic(p, 1, 10).await? == commands(1, 4), "topic after reopen")?;
    check(s.find_receipt(p, "k").await?.is_some(), "receipt after reopen")?;
    check(s.unfinished(None, 10).await? == vec![t.id], "unfinished after reopen")?;
    check(s.due_deadlines(i64::MAX, 10).await?.0 == vec![t.id], "deadline after reopen")?;
    // The version survived too: a write based on the old one is refused.
    let mut stale = t.clone();
    stale.version -= 1;
    step(&mut stale, Event::Confirm, 3_000)?;
    check(is_conflict(&s.update_txn(&stale, None).await), "stale write after reopen refused")
}

/// Many concurrent writers all complete (group commit must not lose or hang
/// a waiter; sled's own `flush_async` hangs at eight).
pub async fn concurrent_writers_share_flushes<H: Harness>(h: &H) -> Result<()> {
    let s = h.open().await?;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let t = txn(&["a"]);
            s.create_txn(&t).await.map(|_| t.id)
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        let id = t.await.map_err(|e| Error::Storage(e.to_string()))??;
        ids.insert(id);
    }
    for id in &ids {
        check(s.get_txn(*id).await?.is_some(), "every concurrent write stored")?;
    }
    check(ids.len() == 64, "64 distinct writes")
}

/// A second create, a write based on an old version, and a write that skips
/// a version are all conflicts, and leave the stored record as it was.
pub async fn stale_and_skipped_versions_are_refused<H: Harness>(h: &H) -> Result<()> {
    let s = h.open().await?;
    let mut t = txn(&["a"]);
    s.create_txn(&t).await?;
    check(is_conflict(&s.create_txn(&t).await), "create over an existing record")?;
    let stale = t.clone();
    step(&mut t, Event::Confirm, 2_000)?;
    s.update_txn(&t, None).await?;
    // A writer that read version 1 decides cancel: refused.
    let mut loser = stale.clone();
    step(&mut loser, Event::Cancel { reason: "late".into() }, 2_100)?;
    match s.update_txn(&loser, None).await {
        Err(Error::Conflict { txn, expected, found }) => {
            check(txn == t.id && expected == 1 && found == 2, "conflict names the txn and both versions")?
        }
        other => return Err(Error::Storage(format!("expected a conflict, got {other:?}"))),
    }
    let mut skipping = t.clone();
    skipping.version += 5;
    check(is_conflict(&s.update_txn(&skipping, None).await), "a skipped version")?;
    let mut unknown = txn(&["a"]);
    unknown.version = 2;
    check(is_conflict(&s.update_txn(&unknown, None).await), "an update of a missing record")?;
    check(s.get_txn(unknown.id).await?.is_none(), "which creates nothing")?;
    let back = s.get_txn(t.id).await?;
    check(back == Some(t.clone()), "the decision stands; the losers wrote nothing")?;
    check(s.due_deadlines(i64::MAX, 10).await?.0.is_empty(), "nor touched the index")
}

/// Writers racing from the same version: exactly one lands.
pub async fn concurrent_writers_of_one_version_have_one_winner<H: Harness>(h: &H) -> Result<()> {
    let s = h.open().await?;
    for round in 0..10 {
        let base = txn(&["a", "b"]);
        s.create_txn(&base).await?;
        let mut tasks = Vec::new();
        for i in 0..8 {
            let (s, mut t) = (s.clone(), base.clone());
            tasks.push(tokio::spawn(async move {
                let event = if i % 2 == 0 { Event::Confirm } else { Event::Cancel { reason: format!("w{i}") } };
                step(&mut t, event, 2_000)?;
                s.update_txn(&t, None).await.map(|_| t)
            }));
        }
        let mut winners = Vec::new();
        for task in tasks {
            match task.await.map_err(|e| Error::Storage(e.to_string()))? {
                Ok(t) => winners.push(t),
                Err(Error::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        check(winners.len() == 1, &format!("round {round}: exactly one winner, got {}", winners.len()))?;
        check(s.get_txn(base.id).await? == winners.pop(), "the winner's record is stored")?;
    }
    Ok(())
}

/// An append based on a stale version stores neither commands nor receipt.
pub async fn a_refused_append_stores_nothing<H: Harness>(h: &H) -> Result<()> {
    let s = h.open().await?;
    let mut t = txn(&["a"]);
    s.create_txn(&t).await?;
    let stale = t.clone();
    step(&mut t, Event::Cancel { reason: "r".into() }, 1_500)?;
    s.update_txn(&t, None).await?;
    let mut late = stale;
    let refused = append_n(&*s, &mut late, 0, 2, Some("late-key")).await;
    check(is_conflict(&refused), "an append over a decided record is a conflict")?;
    let p = t.participants[0].partial_id;
    check(s.read_topic(p, 1, 10).await?.is_empty(), "no command stored")?;
    check(s.find_receipt(p, "late-key").await?.is_none(), "no receipt stored")?;
    check(s.get_txn(t.id).await? == Some(t), "record unchanged")
}

/// A delete based on an old version is refused and deletes nothing.
pub async fn a_stale_delete_is_refused<H: Harness>(h: &H) -> Result<()> {
    let s = h.open().await?;
    let mut t = txn(&["a"]);
    s.create_txn(&t).await?;
    append_n(&*s, &mut t, 0, 1, None).await?;
    let stale = t.clone();
    finish(&*s, &mut t, 3_000).await?;
    check(is_conflict(&s.delete_txn(&stale).await), "stale delete")?;
    check(s.get_txn(t.id).await? == Some(t.clone()), "record kept")?;
    check(s.read_topic(t.participants[0].partial_id, 1, 10).await?.len() == 1, "topic kept")
}

/// The due-work queries follow every write: deadlines of ACTIVE records,
/// deliveries of decided ones by their earliest pending participant, GC
/// candidates by finish time, unfinished ones in id order.
pub async fn due_work_queries_follow_the_records<H: Harness>(h: &H) -> Result<()> {
    let s = h.open().await?;
    let mut a = txn(&["x"]);
    a.deadline_ms = 5_000;
    let mut b = txn(&["x", "y"]);
    b.deadline_ms = 3_000;
    let mut c = txn(&["x"]);
    c.deadline_ms = 9_000;
    for t in [&a, &b, &c] {
        s.create_txn(t).await?;
    }
    check(s.due_deadlines(4_000, 10).await? == (vec![b.id], Some(5_000)), "due deadlines and the next one")?;
    check(s.due_deadlines(i64::MAX, 2).await?.0 == vec![b.id, a.id], "earliest first, limited")?;
    check(s.unfinished(None, 10).await? == vec![a.id, b.id, c.id], "unfinished in id order")?;
    check(s.unfinished(Some(a.id), 1).await? == vec![b.id], "unfinished paged")?;

    // b decided: no deadline any more; due for delivery from the decision.
    step(&mut b, Event::Confirm, 2_500)?;
    s.update_txn(&b, None).await?;
    check(s.due_deadlines(i64::MAX, 10).await?.0 == vec![a.id, c.id], "a decision removes the deadline")?;
    check(s.due_deliveries(2_499, 10).await?.is_empty(), "not due before the decision")?;
    check(s.due_deliveries(2_500, 10).await? == vec![b.id], "due at the decision")?;
    // y acknowledges, x fails and backs off to 8_000.
    step(&mut b, Event::Delivered { participant: 1 }, 2_600)?;
    step(&mut b, Event::AttemptFailed { participant: 0, error: "down".into(), next_attempt_ms: 8_000 }, 2_600)?;
    b.version -= 1; // two events, one write
    s.update_txn(&b, None).await?;
    check(s.due_deliveries(7_999, 10).await?.is_empty(), "backing off")?;
    check(s.due_deliveries(8_000, 10).await? == vec![b.id], "due again at the next attempt")?;
    step(&mut b, Event::Delivered { participant: 0 }, 8_100)?;
    s.update_txn(&b, None).await?;
    check(b.state == TxnState::Confirmed, "b finished")?;
    check(s.due_deliveries(i64::MAX, 10).await?.is_empty(), "finished: nothing to deliver")?;
    check(s.unfinished(None, 10).await? == vec![a.id, c.id], "finished: not unfinished")?;
    let (gc, next) = s.collectable(8_099, 10).await?;
    check(gc.is_empty() && next == Some(8_100), "not collectable before its finish time")?;
    let (gc, _) = s.collectable(8_100, 10).await?;
    check(gc.iter().map(|t| t.id).collect::<Vec<_>>() == vec![b.id], "collectable from its finish time")?;
    check(gc.first().map(|t| t.version) == Some(b.version), "with its version (for the conditional delete)")
}

/// Registrations are stored by service and endpoint, renewed in place,
/// removed one by one, and survive a reopen.
pub async fn registrations_are_stored_renewed_and_removed<H: Harness>(h: &H) -> Result<()> {
    let reg = |service: &str, endpoint: &str, expires_ms| Registration {
        service: service.into(),
        endpoint: endpoint.into(),
        expires_ms,
    };
    {
        let s = h.open().await?;
        check(s.endpoints().await?.is_empty(), "none at first")?;
        s.put_endpoint(&reg("orders", "http://127.0.0.1:7002", 5_000)).await?;
        s.put_endpoint(&reg("orders", "http://127.0.0.1:7001", 5_000)).await?;
        s.put_endpoint(&reg("bank", "http://127.0.0.1:7003", 5_000)).await?;
        s.put_endpoint(&reg("orders", "http://127.0.0.1:7002", 9_000)).await?;
    }
    let s = h.open().await?;
    let want = vec![
        reg("bank", "http://127.0.0.1:7003", 5_000),
        reg("orders", "http://127.0.0.1:7001", 5_000),
        reg("orders", "http://127.0.0.1:7002", 9_000),
    ];
    check(s.endpoints().await? == want, "ordered by service and endpoint, renewed in place, after reopen")?;
    check(s.remove_endpoint("orders", "http://127.0.0.1:7001").await?, "removed")?;
    check(!s.remove_endpoint("orders", "http://127.0.0.1:7001").await?, "removing again finds none")?;
    check(!s.remove_endpoint("bank", "http://127.0.0.1:7002").await?, "another service's endpoint is not removed")?;
    check(s.endpoints().await?.len() == 2, "the others stay")?;
    // bank's lease ended at 5_000, orders' at 9_000.
    check(s.remove_expired_endpoints(4_999).await? == 0, "nothing expired before 5_000")?;
    check(s.remove_expired_endpoints(5_000).await? == 1, "bank's lease ended at 5_000")?;
    check(s.endpoints().await? == vec![reg("orders", "http://127.0.0.1:7002", 9_000)], "the live one stays")
}

/// Exact counts per unfinished state, following every write.
pub async fn unfinished_transactions_are_counted_by_state<H: Harness>(h: &H) -> Result<()> {
    let s = h.open().await?;
    let count = |counts: Vec<(TxnState, u64)>, state: TxnState| {
        counts.iter().filter(|(st, _)| *st == state).map(|(_, n)| *n).sum::<u64>()
    };
    check(count(s.count_unfinished().await?, TxnState::Active) == 0, "empty store counts nothing")?;
    let mut all = Vec::new();
    for _ in 0..5 {
        let t = txn(&["a"]);
        s.create_txn(&t).await?;
        all.push(t);
    }
    step(&mut all[0], Event::Confirm, 2_000)?;
    s.update_txn(&all[0], None).await?;
    step(&mut all[1], Event::Cancel { reason: "r".into() }, 2_000)?;
    s.update_txn(&all[1], None).await?;
    finish(&*s, &mut all[2], 2_500).await?;
    let counts = s.count_unfinished().await?;
    check(count(counts.clone(), TxnState::Active) == 2, "two ACTIVE")?;
    check(count(counts.clone(), TxnState::Confirming) == 1, "one CONFIRMING")?;
    check(count(counts.clone(), TxnState::Cancelling) == 1, "one CANCELLING")?;
    check(count(counts.clone(), TxnState::Confirmed) == 0, "finished ones are not counted")?;
    drop(s);
    let s = h.open().await?;
    check(count(s.count_unfinished().await?, TxnState::Active) == 2, "counts survive a reopen")
}
