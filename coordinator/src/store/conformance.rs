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

use std::collections::HashSet;

use super::{AppendBatch, AppendReceipt, CommandRecord, Store};
use crate::engine::state::{Event, ParticipantRecord, TxnRecord, apply};
use crate::error::{Error, Result};
use crate::ids::{PartialId, TxnId};

/// Opens a store; every call opens the same underlying storage.
pub trait Harness {
    /// The store type under test.
    type S: Store;
    /// Opens the storage (again).
    fn open(&self) -> Result<Self::S>;
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
            put_get_round_trip, partial_index_follows_participants, append_is_ordered_and_counted,
            idempotency_receipts, read_topic_paging, scan_is_ordered_and_paged,
            delete_removes_everything_of_one_txn, survives_reopen, concurrent_writers_share_flushes);
    };
}

fn txn(services: &[&str]) -> TxnRecord {
    let parts = services.iter().map(|s| ParticipantRecord::new(s.to_string(), PartialId::new())).collect();
    TxnRecord::new(TxnId::new(), parts, 1_000, 31_000)
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

/// Appends `n` commands to participant `idx` the way the engine does.
async fn append_n<S: Store>(s: &S, t: &mut TxnRecord, idx: usize, n: u64, key: Option<&str>) -> Result<AppendReceipt> {
    let first = t.participants[idx].command_count + 1;
    let cmds = commands(first, n);
    let bytes = cmds.iter().map(|c| c.payload.len() as u64).sum();
    apply(t, Event::Append { participant: idx, commands: n, bytes }, 2_000)?;
    let receipt = AppendReceipt { first_sequence: first, last_sequence: first + n - 1, bytes, digest: first };
    let batch = AppendBatch {
        partial_id: t.participants[idx].partial_id,
        commands: &cmds,
        idempotency: key.map(|k| (k, receipt)),
    };
    s.append(t, batch).await?;
    Ok(receipt)
}

/// A written record reads back equal; a missing one is `None`.
pub async fn put_get_round_trip<H: Harness>(h: &H) -> Result<()> {
    let s = h.open()?;
    let mut t = txn(&["a", "b"]);
    s.put_txn(&t).await?;
    check(s.get_txn(t.id).await? == Some(t.clone()), "record reads back")?;
    apply(&mut t, Event::Confirm, 3_000)?;
    s.update_txn(&t).await?;
    check(s.get_txn(t.id).await? == Some(t.clone()), "update reads back")?;
    apply(&mut t, Event::Delivered { participant: 0 }, 3_500)?;
    s.put_txn(&t).await?;
    let back = s.get_txn(t.id).await?;
    check(back.as_ref() == Some(&t), "overwrite reads back")?;
    check(s.get_txn(TxnId::new()).await?.is_none(), "missing txn is None")
}

/// Every participant's partial id, including enlisted ones, finds its txn.
pub async fn partial_index_follows_participants<H: Harness>(h: &H) -> Result<()> {
    let s = h.open()?;
    let mut t = txn(&["a"]);
    s.put_txn(&t).await?;
    let p = PartialId::new();
    apply(&mut t, Event::Enlist { service: "b".into(), partial_id: p }, 1_500)?;
    s.put_txn(&t).await?;
    // Record-only updates keep the index.
    apply(&mut t, Event::Cancel { reason: "r".into() }, 1_600)?;
    s.update_txn(&t).await?;
    for part in &t.participants {
        check(s.find_partial(part.partial_id).await? == Some(t.id), "partial index entry")?;
    }
    check(s.find_partial(PartialId::new()).await?.is_none(), "unknown partial is None")
}

/// Appended commands come back in order, with the record's counters.
pub async fn append_is_ordered_and_counted<H: Harness>(h: &H) -> Result<()> {
    let s = h.open()?;
    let mut t = txn(&["a", "b"]);
    s.put_txn(&t).await?;
    append_n(&s, &mut t, 0, 3, None).await?;
    append_n(&s, &mut t, 0, 2, None).await?;
    append_n(&s, &mut t, 1, 1, None).await?;
    let a = s.read_topic(t.participants[0].partial_id, 1, 100).await?;
    check(a == commands(1, 5), "topic a holds 5 commands in order")?;
    let b = s.read_topic(t.participants[1].partial_id, 1, 100).await?;
    check(b == commands(1, 1), "topic b holds its own command only")?;
    let rec = s.get_txn(t.id).await?;
    check(rec.map(|r| r.participants[0].command_count) == Some(5), "counter stored with the batch")
}

/// A receipt stored with an append is found by its key, and only there.
pub async fn idempotency_receipts<H: Harness>(h: &H) -> Result<()> {
    let s = h.open()?;
    let mut t = txn(&["a", "b"]);
    s.put_txn(&t).await?;
    let r = append_n(&s, &mut t, 0, 2, Some("key-1")).await?;
    let pa = t.participants[0].partial_id;
    let pb = t.participants[1].partial_id;
    check(s.find_receipt(pa, "key-1").await? == Some(r), "receipt found")?;
    check(s.find_receipt(pa, "key-2").await?.is_none(), "other key not found")?;
    check(s.find_receipt(pb, "key-1").await?.is_none(), "keys are per topic")
}

/// `read_topic` honours `from` and `limit`.
pub async fn read_topic_paging<H: Harness>(h: &H) -> Result<()> {
    let s = h.open()?;
    let mut t = txn(&["a"]);
    s.put_txn(&t).await?;
    append_n(&s, &mut t, 0, 10, None).await?;
    let p = t.participants[0].partial_id;
    check(s.read_topic(p, 4, 3).await? == commands(4, 3), "from 4, 3 commands")?;
    check(s.read_topic(p, 9, 100).await? == commands(9, 2), "tail")?;
    check(s.read_topic(p, 11, 100).await?.is_empty(), "past the end")?;
    check(s.read_topic(PartialId::new(), 1, 100).await?.is_empty(), "unknown topic is empty")
}

/// `scan` lists records in id (creation) order, in pages.
pub async fn scan_is_ordered_and_paged<H: Harness>(h: &H) -> Result<()> {
    let s = h.open()?;
    let mut ids = Vec::new();
    for _ in 0..25 {
        let t = txn(&["a"]);
        s.put_txn(&t).await?;
        ids.push(t.id);
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s.scan(after, 10).await?;
        check(page.len() <= 10, "page size honoured")?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        seen.extend(page.iter().map(|t| t.id));
    }
    check(seen == ids, "all records, in creation order, once")
}

/// `delete_txn` removes the record, index entries, topics and receipts of one
/// transaction and nothing of another.
pub async fn delete_removes_everything_of_one_txn<H: Harness>(h: &H) -> Result<()> {
    let s = h.open()?;
    let mut gone = txn(&["a", "b"]);
    let mut kept = txn(&["a"]);
    for t in [&mut gone, &mut kept] {
        s.put_txn(t).await?;
        append_n(&s, t, 0, 3, Some("k")).await?;
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
    s.delete_txn(&gone).await // deleting again is fine
}

/// What was acknowledged is there after the store is closed and reopened.
pub async fn survives_reopen<H: Harness>(h: &H) -> Result<()> {
    let mut t = txn(&["a"]);
    {
        let s = h.open()?;
        s.put_txn(&t).await?;
        append_n(&s, &mut t, 0, 4, Some("k")).await?;
    }
    let s = h.open()?;
    check(s.get_txn(t.id).await? == Some(t.clone()), "record after reopen")?;
    let p = t.participants[0].partial_id;
    check(s.read_topic(p, 1, 10).await? == commands(1, 4), "topic after reopen")?;
    check(s.find_receipt(p, "k").await?.is_some(), "receipt after reopen")
}

/// Many concurrent writers all complete (group commit must not lose or hang
/// a waiter; sled's own `flush_async` hangs at eight).
pub async fn concurrent_writers_share_flushes<H: Harness>(h: &H) -> Result<()> {
    let s = std::sync::Arc::new(h.open()?);
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let t = txn(&["a"]);
            s.put_txn(&t).await.map(|_| t.id)
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
