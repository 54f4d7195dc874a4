//! The embedded store, on sled 0.34.
//!
//! Everything lives in one sled tree so that [`sled::Tree::apply_batch`]
//! makes any write atomic across record kinds. Keys start with a fixed kind
//! byte that never changes once assigned:
//!
//! | kind | key                                  | value                 |
//! |------|--------------------------------------|-----------------------|
//! | 0x01 | txn id (16)                          | `TxnRecord`           |
//! | 0x02 | partial id (16)                      | txn id (16 raw bytes) |
//! | 0x03 | partial id (16), sequence (u64 BE)   | `CommandRecord`       |
//! | 0x04 | partial id (16), idempotency key     | `AppendReceipt`       |
//!
//! Values are one format byte ([`FORMAT`]) followed by postcard. Anything
//! else is reported as corrupt, with the key, rather than skipped.
//!
//! ## Group commit
//! Writes are applied to sled's in-memory state at once and made durable by
//! [`GroupCommit`]: one dedicated thread runs `Db::flush`, and every writer
//! waits for a flush that *started after its write*. Writers that arrive
//! while a flush runs share the next one, so N concurrent requests cost one
//! fsync, not N. (A thread rather than `flush_async`: sled 0.34's
//! `flush_async` hangs when eight or more tasks await it at once, sled issue
//! #1308.) If a flush fails, the store is poisoned: every later write fails,
//! because nothing written after a failed flush can be promised durable;
//! reads fail too (UNAVAILABLE), since sled's memory may then hold writes
//! that are not on disk. Restarting recovers what was flushed.

use crate::lock;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use uuid::Uuid;

use super::{AppendBatch, AppendReceipt, CommandRecord, Store};
use crate::engine::state::TxnRecord;
use crate::error::{Error, Result};
use crate::ids::{PartialId, TxnId};

/// The value format version byte.
pub const FORMAT: u8 = 1;

const KIND_TXN: u8 = 0x01;
const KIND_PARTIAL: u8 = 0x02;
const KIND_COMMAND: u8 = 0x03;
const KIND_RECEIPT: u8 = 0x04;

/// The sled-backed [`Store`].
pub struct SledStore {
    tree: sled::Tree,
    commit: GroupCommit,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|e| Error::Storage(format!("cannot open sled database in {}: {e}", dir.display())))?;
        let tree = db.open_tree("tcc")?;
        let commit = GroupCommit::start(db)?;
        Ok(SledStore { tree, commit })
    }

    /// Fail-stop: after a failed flush nothing is served, not even reads,
    /// because sled's memory may hold writes that never reached the disk.
    fn check(&self) -> Result<()> {
        match &self.commit.durable.borrow().failed {
            Some(e) => Err(Error::Unavailable(format!(
                "the store failed to flush ({e}) and takes no more requests; restart the coordinator"
            ))),
            None => Ok(()),
        }
    }

    fn decode_txn(key: &[u8], value: &[u8]) -> Result<TxnRecord> {
        decode(value).map_err(|cause| corrupt("transaction", key, cause))
    }
}

impl Store for SledStore {
    async fn put_txn(&self, txn: &TxnRecord) -> Result<()> {
        self.check()?;
        let mut batch = sled::Batch::default();
        txn_into_batch(&mut batch, txn)?;
        self.tree.apply_batch(batch)?;
        self.commit.sync().await
    }

    async fn append(&self, txn: &TxnRecord, append: AppendBatch<'_>) -> Result<()> {
        self.check()?;
        let mut batch = sled::Batch::default();
        for cmd in append.commands {
            batch.insert(command_key(append.partial_id, cmd.sequence).as_slice(), encode(cmd)?);
        }
        if let Some((key, receipt)) = append.idempotency {
            batch.insert(receipt_key(append.partial_id, key), encode(&receipt)?);
        }
        txn_into_batch(&mut batch, txn)?;
        self.tree.apply_batch(batch)?;
        crate::failpoint::crash_point("append-unflushed");
        self.commit.sync().await
    }

    async fn get_txn(&self, id: TxnId) -> Result<Option<TxnRecord>> {
        self.check()?;
        let key = txn_key(id);
        match self.tree.get(key)? {
            Some(v) => Self::decode_txn(&key, &v).map(Some),
            None => Ok(None),
        }
    }

    async fn find_partial(&self, partial: PartialId) -> Result<Option<TxnId>> {
        self.check()?;
        let key = partial_key(partial);
        match self.tree.get(key)? {
            Some(v) => {
                let id = Uuid::from_slice(&v).map_err(|e| corrupt("partial index", &key, e.to_string()))?;
                Ok(Some(TxnId(id)))
            }
            None => Ok(None),
        }
    }

    async fn find_receipt(&self, partial: PartialId, key: &str) -> Result<Option<AppendReceipt>> {
        self.check()?;
        let k = receipt_key(partial, key);
        match self.tree.get(&k)? {
            Some(v) => decode(&v).map(Some).map_err(|cause| corrupt("append receipt", &k, cause)),
            None => Ok(None),
        }
    }

    async fn read_topic(&self, partial: PartialId, from: u64, limit: usize) -> Result<Vec<CommandRecord>> {
        self.check()?;
        let start = command_key(partial, from);
        let end = command_key(partial, u64::MAX);
        let mut out = Vec::new();
        for item in self.tree.range(start..=end).take(limit) {
            let (k, v) = item?;
            out.push(decode(&v).map_err(|cause| corrupt("command", &k, cause))?);
        }
        Ok(out)
    }

    async fn scan(&self, after: Option<TxnId>, limit: usize) -> Result<Vec<TxnRecord>> {
        self.check()?;
        let mut out = Vec::new();
        let iter = match after {
            Some(id) => self.tree.range(successor(&txn_key(id))..),
            None => self.tree.range([KIND_TXN].as_slice()..),
        };
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            if k.first() != Some(&KIND_TXN) {
                break;
            }
            out.push(Self::decode_txn(&k, &v)?);
        }
        Ok(out)
    }

    async fn delete_txn(&self, txn: &TxnRecord) -> Result<()> {
        self.check()?;
        let mut batch = sled::Batch::default();
        for p in &txn.participants {
            batch.remove(partial_key(p.partial_id).as_slice());
            for prefix in [command_prefix(p.partial_id), receipt_prefix(p.partial_id)] {
                for item in self.tree.scan_prefix(prefix) {
                    let (k, _) = item?;
                    batch.remove(k);
                }
            }
        }
        batch.remove(txn_key(txn.id).as_slice());
        self.tree.apply_batch(batch)?;
        self.commit.sync().await
    }
}

// --- keys ----------------------------------------------------------------

fn txn_key(id: TxnId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = KIND_TXN;
    k[1..].copy_from_slice(id.0.as_bytes());
    k
}

fn partial_key(p: PartialId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = KIND_PARTIAL;
    k[1..].copy_from_slice(p.0.as_bytes());
    k
}

fn command_prefix(p: PartialId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = KIND_COMMAND;
    k[1..].copy_from_slice(p.0.as_bytes());
    k
}

fn command_key(p: PartialId, seq: u64) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[..17].copy_from_slice(&command_prefix(p));
    k[17..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn receipt_prefix(p: PartialId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = KIND_RECEIPT;
    k[1..].copy_from_slice(p.0.as_bytes());
    k
}

fn receipt_key(p: PartialId, key: &str) -> Vec<u8> {
    let mut k = receipt_prefix(p).to_vec();
    k.extend_from_slice(key.as_bytes());
    k
}

/// The smallest key greater than `key`.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut k = key.to_vec();
    k.push(0);
    k
}

fn txn_into_batch(batch: &mut sled::Batch, txn: &TxnRecord) -> Result<()> {
    batch.insert(txn_key(txn.id).as_slice(), encode(txn)?);
    for p in &txn.participants {
        batch.insert(partial_key(p.partial_id).as_slice(), txn.id.0.as_bytes().as_slice());
    }
    Ok(())
}

// --- values --------------------------------------------------------------

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut out = vec![FORMAT];
    postcard::to_io(value, &mut out).map_err(|e| Error::Storage(format!("cannot encode record: {e}")))?;
    Ok(out)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> std::result::Result<T, String> {
    match bytes.split_first() {
        Some((&FORMAT, rest)) => {
            let (value, tail) = postcard::take_from_bytes(rest).map_err(|e| e.to_string())?;
            if !tail.is_empty() {
                return Err(format!("{} trailing bytes", tail.len()));
            }
            Ok(value)
        }
        Some((v, _)) => Err(format!("unknown format version {v}")),
        None => Err("empty value".to_string()),
    }
}

fn corrupt(kind: &str, key: &[u8], cause: String) -> Error {
    let id = key
        .get(1..17)
        .and_then(|b| Uuid::from_slice(b).ok())
        .map(|u| u.to_string())
        .unwrap_or_else(|| format!("{key:02x?}"));
    Error::Corrupt { key: format!("{kind} {id}"), cause }
}

// --- group commit --------------------------------------------------------

/// Shares one `Db::flush` among all writers waiting at the same time.
struct GroupCommit {
    shared: Arc<Shared>,
    durable: watch::Receiver<Progress>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<FlushState>,
    wake: Condvar,
}

#[derive(Default)]
struct FlushState {
    /// Ticket of the latest sync request.
    requested: u64,
    /// Set by `Drop`: flush what is requested and exit.
    stop: bool,
}

/// What the flusher has made durable.
#[derive(Clone, Default)]
struct Progress {
    /// Every ticket up to this one is durable.
    durable: u64,
    /// Set when a flush failed; the store takes no more writes.
    failed: Option<String>,
}

impl GroupCommit {
    fn start(db: sled::Db) -> Result<Self> {
        let shared = Arc::new(Shared { state: Mutex::new(FlushState::default()), wake: Condvar::new() });
        let (tx, rx) = watch::channel(Progress::default());
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tcc-flusher".into())
            .spawn(move || flusher(db, thread_shared, tx))
            .map_err(|e| Error::Storage(format!("cannot start flusher thread: {e}")))?;
        Ok(GroupCommit { shared, durable: rx, thread: Some(thread) })
    }

    /// Returns once every write made before this call is durable.
    async fn sync(&self) -> Result<()> {
        let ticket = {
            let mut st = lock(&self.shared.state);
            st.requested += 1;
            st.requested
        };
        self.shared.wake.notify_one();
        let mut rx = self.durable.clone();
        let progress = rx
            .wait_for(|p| p.durable >= ticket || p.failed.is_some())
            .await
            .map_err(|_| Error::Unavailable("store is closed".into()))?;
        match &progress.failed {
            Some(e) => Err(Error::Unavailable(format!(
                "flush failed ({e}); the store takes no more requests; restart the coordinator"
            ))),
            None => Ok(()),
        }
    }
}

fn flusher(db: sled::Db, shared: Arc<Shared>, tx: watch::Sender<Progress>) {
    let mut done = 0u64;
    loop {
        let (target, stop) = {
            let mut st = lock(&shared.state);
            while st.requested == done && !st.stop {
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            (st.requested, st.stop)
        };
        if target > done {
            match db.flush() {
                Ok(_) => {
                    done = target;
                    tx.send_modify(|p| p.durable = target);
                }
                Err(e) => {
                    tracing::error!(cause = %e, "sled flush failed; refusing further writes");
                    tx.send_modify(|p| p.failed = Some(e.to_string()));
                    return;
                }
            }
        }
        if stop {
            return;
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
