//! A transient shortage of file descriptors (EMFILE) never takes the
//! embedded store down: a journal rotation that cannot open its new file
//! is put off, writes go on in the current file, and the rotation happens
//! once descriptors are back. Its own test binary, because it lowers the
//! whole process's open-file limit.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tcc_coordinator::error::Result;
use tcc_coordinator::model::{PartialId, ParticipantRecord, TxnId, TxnRecord};
use tcc_coordinator::store::Store;
use tcc_coordinator::store::sled::SledStore;

fn txn() -> TxnRecord {
    let mut t =
        TxnRecord::new(TxnId::new(), vec![ParticipantRecord::new("svc".into(), PartialId::new())], 1_000, i64::MAX / 2);
    t.version = 1;
    t
}

fn journal_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.retain(|n| n.starts_with("tcc-wal-0"));
    names.sort();
    names
}

#[tokio::test]
async fn running_out_of_descriptors_does_not_stop_the_store() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| tcc_coordinator::Error::Storage(e.to_string()))?;
    let store = SledStore::open(dir.path())?;
    let mut written = Vec::new();
    let first = txn();
    store.create_txn(&first).await?;
    written.push(first);
    let before = journal_files(dir.path());

    // Use up every descriptor the process may open.
    let saved = getrlimit(Resource::Nofile);
    let open_now = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(64) as u64;
    setrlimit(Resource::Nofile, Rlimit { current: Some(open_now + 16), maximum: saved.maximum }).unwrap();
    let mut hogs = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        hogs.push(f);
        assert!(hogs.len() < 10_000, "the limit did not hold");
    }
    // Writes go on past the time a rotation is due (every 2 s), which now
    // cannot open its file.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2_600) {
        let t = txn();
        store.create_txn(&t).await?;
        written.push(t);
    }

    // Descriptors back: the put-off rotation happens, and nothing was lost.
    drop(hogs);
    setrlimit(Resource::Nofile, saved).unwrap();
    let started = Instant::now();
    while journal_files(dir.path()) == before {
        assert!(started.elapsed() < Duration::from_secs(10), "the rotation never happened");
        let t = txn();
        store.create_txn(&t).await?;
        written.push(t);
    }
    store.close().await;
    drop(store);
    let store = SledStore::open(dir.path())?;
    for t in &written {
        assert!(store.get_txn(t.id).await?.is_some(), "{} lost", t.id);
    }
    Ok(())
}
