//! The store conformance suite on the sled backend, plus sled-specific
//! checks: damaged records are reported at open (naming the key), not
//! skipped; records written before versions existed read as version 1.

use std::sync::Arc;

use tcc_coordinator::error::{Error, Result};
use tcc_coordinator::model::{PartialId, ParticipantRecord, TxnId, TxnRecord};
use tcc_coordinator::store::Store;
use tcc_coordinator::store::conformance::Harness;
use tcc_coordinator::store::sled::SledStore;

struct SledHarness(tempfile::TempDir);

#[async_trait::async_trait]
impl Harness for SledHarness {
    async fn open(&self) -> Result<Arc<dyn Store>> {
        Ok(Arc::new(SledStore::open(self.0.path())?))
    }
}

fn harness() -> SledHarness {
    match tempfile::tempdir() {
        Ok(d) => SledHarness(d),
        Err(e) => panic!("tempdir: {e}"),
    }
}

tcc_coordinator::store_conformance_tests!(harness());

fn sled_err(e: sled::Error) -> Error {
    Error::Storage(e.to_string())
}

/// Writes `value` under the record key of `id`, with sled directly.
fn write_raw(dir: &std::path::Path, id: uuid::Uuid, value: Vec<u8>) -> Result<()> {
    // No background flusher thread: it could still hold the directory's
    // lock when the store opens it right after.
    let db = sled::Config::new().path(dir).flush_every_ms(None).open().map_err(sled_err)?;
    let tree = db.open_tree("tcc").map_err(sled_err)?;
    let mut key = vec![0x01];
    key.extend_from_slice(id.as_bytes());
    tree.insert(key, value).map_err(sled_err)?;
    db.flush().map_err(sled_err)?;
    Ok(())
}

/// Opens the store after [`write_raw`]. sled releases its directory lock
/// from a pool thread shortly after the handle is dropped, with nothing to
/// wait on: retry only that error, a bounded number of times.
fn open_after_raw(dir: &std::path::Path) -> Result<SledStore> {
    for _ in 0..100 {
        match SledStore::open(dir) {
            Err(Error::Storage(msg)) if msg.contains("could not acquire lock") => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            other => return other,
        }
    }
    SledStore::open(dir)
}

#[tokio::test]
async fn a_damaged_record_stops_open_naming_its_key() -> Result<()> {
    let dir = harness();
    let id = uuid::Uuid::now_v7();
    write_raw(dir.0.path(), id, vec![2u8, 0xff, 0xff, 0xff])?;
    match open_after_raw(dir.0.path()) {
        Err(Error::Corrupt { key, .. }) => assert!(key.contains(&id.to_string()), "{key}"),
        Err(other) => panic!("expected Corrupt, got {other:?}"),
        Ok(_) => panic!("a damaged record was accepted at open"),
    }
    Ok(())
}

#[tokio::test]
async fn a_record_from_before_versions_reads_as_version_1() -> Result<()> {
    let dir = harness();
    let parts = vec![ParticipantRecord::new("a".into(), PartialId::new())];
    let mut old = TxnRecord::new(TxnId::new(), parts, 1_000, 31_000);
    // Written before histories existed too.
    old.history.clear();
    // Format 1: one format byte, then postcard of the record (which never
    // carried the version).
    let mut value = vec![1u8];
    postcard::to_io(&old, &mut value).map_err(|e| Error::Storage(e.to_string()))?;
    write_raw(dir.0.path(), old.id.0, value)?;
    let store = open_after_raw(dir.0.path())?;
    old.version = 1;
    assert_eq!(store.get_txn(old.id).await?, Some(old.clone()));
    assert_eq!(store.due_deadlines(i64::MAX, 10).await?.0, vec![old.id], "indexed at open");
    let mut next = old.clone();
    next.version = 2;
    next.reason = "upgraded".into();
    store.update_txn(&next, None).await?;
    assert_eq!(store.get_txn(old.id).await?.map(|t| t.version), Some(2));
    Ok(())
}

/// A start interrupted by a full disk can leave sled's unfinished snapshot
/// (`snap.*.generating`, empty) behind; sled 0.34 would take it for its
/// newest snapshot and refuse it as damage. It is never a complete
/// snapshot: the next start removes it and has every record.
#[tokio::test]
async fn an_unfinished_snapshot_is_not_taken_for_damage() -> Result<()> {
    let dir = harness();
    let mut txn =
        TxnRecord::new(TxnId::new(), vec![ParticipantRecord::new("a".into(), PartialId::new())], 1_000, 31_000);
    txn.version = 1;
    {
        let store = SledStore::open(dir.0.path())?;
        store.create_txn(&txn).await?;
        store.close().await;
    }
    let unfinished = dir.0.path().join("snap.00000000000000A0.generating");
    std::fs::write(&unfinished, b"").map_err(|e| Error::Storage(e.to_string()))?;
    let store = open_after_raw(dir.0.path())?;
    assert_eq!(store.get_txn(txn.id).await?.map(|t| t.id), Some(txn.id));
    assert!(!unfinished.exists(), "removed");
    Ok(())
}
