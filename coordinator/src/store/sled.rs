//! The embedded store, on sled 0.34.
//!
//! Everything lives in one sled tree. Keys start with a fixed kind byte that
//! never changes once assigned:
//!
//! | kind | key                                  | value                 |
//! |------|--------------------------------------|-----------------------|
//! | 0x01 | txn id (16)                          | `TxnRecord`           |
//! | 0x02 | partial id (16)                      | txn id (16 raw bytes) |
//! | 0x03 | partial id (16), sequence (u64 BE)   | `CommandRecord`       |
//! | 0x04 | partial id (16), idempotency key     | `AppendReceipt`       |
//! | 0x05 | service, 0x00, endpoint              | `Registration`        |
//!
//! Values are one format byte ([`FORMAT`]) followed by postcard; a
//! transaction record is [`FORMAT_VERSIONED`], its version (u64 LE), then
//! postcard (a record written before versions existed, format 1, reads as
//! version 1). Anything else is reported as corrupt, with the key, rather
//! than skipped.
//!
//! ## Conditions and queries
//! Every write of a transaction record requires the version it replaces
//! ([`Write::require`]); the journal's flusher checks it just before the
//! group is written, so a conditional write costs no extra sync. The
//! queries of the [`Store`] trait are answered from a [`TxnIndex`] built at
//! open from every record and updated by the flusher thread as each write
//! is applied (in journal order, whether or not its writer still waits):
//! sled is a single
//! process's database (it locks its directory), so this store sees every
//! write there is. Listings that include finished states scan records in
//! id order, at most [`LIST_SCAN`] per call, and say where to continue.
//!
//! ## Durability and atomicity
//! Each write method builds one journal [`Write`] (all its keys) and hands
//! it to the [`Journal`](super::journal): it is acknowledged once its frame
//! is synced to the journal (one sync per group of concurrent writers) and
//! applied to sled; sled itself is flushed at checkpoints. A frame is
//! replayed whole or not at all, which makes every write atomic across
//! record kinds. See the journal's docs for recovery and the fail-stop rule.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::index::{Keys, TxnIndex};
use super::integrity;
use super::journal::{Journal, Versioning, Write};
use super::{AppendBatch, ListPage, ListQuery, Store};
use crate::error::{Error, Result};
use crate::lock;
use crate::model::{AppendReceipt, CommandRecord, PartialId, Registration, TxnId, TxnRecord};

/// The value format byte of commands and receipts.
pub const FORMAT: u8 = 1;

/// The value format byte of a transaction record with its version.
pub const FORMAT_VERSIONED: u8 = 2;

/// Most records one [`Store::list`] call reads when the index cannot answer.
pub const LIST_SCAN: usize = 10_000;

const KIND_TXN: u8 = 0x01;
const KIND_PARTIAL: u8 = 0x02;
const KIND_COMMAND: u8 = 0x03;
const KIND_RECEIPT: u8 = 0x04;
const KIND_ENDPOINT: u8 = 0x05;

/// The sled-backed [`Store`].
pub struct SledStore {
    dir: PathBuf,
    tree: sled::Tree,
    journal: Journal,
    index: Arc<Mutex<TxnIndex>>,
    /// The latest time any record held at open (see [`SledStore::latest_ms`]).
    latest_ms: Option<i64>,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. Damage to its files refuses
    /// the open ([`Error::Corrupt`], naming the file; see
    /// [`integrity`](super::integrity) and the journal's docs). A start
    /// short of free space is refused before anything is written. An open
    /// that fails after sled opened keeps sled's handles (and its lock on
    /// `dir`) for the rest of the process rather than run sled's drop,
    /// whose flush can hang on a failed disk: the coordinator exits then.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, false)
    }

    /// [`SledStore::open`] that salvages a damaged journal: keeps the writes
    /// before the damage and moves the rest aside (`--salvage-journal`).
    pub fn open_salvaging(dir: &Path) -> Result<Self> {
        Self::open_with(dir, true)
    }

    fn open_with(dir: &Path, salvage: bool) -> Result<Self> {
        if dir.exists() && !dir.is_dir() {
            return Err(Error::Storage(format!(
                "--data-dir {} is a file, not a directory: give a directory (it is created if missing)",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Storage(format!("cannot create the data directory {}: {e}", dir.display())))?;
        integrity::check_files(dir)?;
        let journal = super::journal::bytes_on_disk(dir)?;
        integrity::check_space(dir, journal)?;
        integrity::remove_unfinished_snapshots(dir)?;
        let place = format!("sled database in {}", dir.display());
        let (db, tree) = integrity::catching_panics(&place, || {
            // sled's own periodic flush is off: the journal's checkpoints flush.
            let db = sled::Config::new().path(dir).flush_every_ms(None).open().map_err(|e| sled_open_error(dir, e))?;
            let tree = db.open_tree("tcc").map_err(|e| sled_open_error(dir, e))?;
            Ok((db, tree))
        })
        .map_err(|e| integrity::explain_no_space(dir, journal, e))?;
        let opened = Self::open_journal(dir, &place, db.clone(), tree.clone(), salvage);
        if opened.is_err() {
            // A failed start: sled's last flush on drop may wait forever on
            // a log whose write failed (a full disk), and nothing it holds
            // matters (the journal has every acknowledged write). The
            // process is about to exit.
            std::mem::forget((db, tree));
        }
        opened.map_err(|e| integrity::explain_no_space(dir, journal, e))
    }

    fn open_journal(dir: &Path, place: &str, db: sled::Db, tree: sled::Tree, salvage: bool) -> Result<Self> {
        integrity::mark(dir)?;
        let versioning = Versioning { version_of, conflict };
        let journal = if salvage {
            Journal::open_salvaging(dir, db, tree.clone(), versioning)?
        } else {
            Journal::open(dir, db, tree.clone(), versioning)?
        };
        let (index, summary, latest_ms) = integrity::catching_panics(place, || read_everything(&tree))?;
        // A manifest is removed before the first write after a clean
        // close, so while it exists the records are what it describes.
        if let Some(recorded) = integrity::read_manifest(dir)? {
            integrity::compare(dir, &recorded, &summary)?;
        }
        integrity::remove_manifest(dir)?;
        Ok(SledStore { dir: dir.to_path_buf(), tree, journal, index: Arc::new(Mutex::new(index)), latest_ms })
    }

    /// The latest time a transaction record held when the store was
    /// opened: coordinator time must not start before it (see
    /// [`SteadyClock`](crate::clock::SteadyClock)).
    pub fn latest_ms(&self) -> Option<i64> {
        self.latest_ms
    }

    /// Fail-stop: after a failed write nothing is served, not even reads.
    fn check(&self) -> Result<()> {
        self.journal.check()
    }

    /// A sled error on a read. An I/O error means sled failed to write
    /// what the journal applied (sled then returns it from every call): the
    /// store fails-stop, as for a failed journal write.
    fn failed_read(&self, e: sled::Error) -> Error {
        match e {
            sled::Error::Io(io) => self.journal.fail(format!("sled: {io}")),
            other => sled_error(other),
        }
    }

    /// A write of `txn` that lands only over its previous version, and
    /// updates the index as it is applied.
    fn txn_write(&self, txn: &TxnRecord) -> Result<Write> {
        if txn.version == 0 {
            return Err(Error::Storage(format!("transaction {} written without a version", txn.id)));
        }
        let mut write = Write::default();
        let key = txn_key(txn.id);
        write.insert(&key, &encode_txn(txn)?);
        write.require(&key, txn.version - 1, txn.version);
        let (index, keys) = (self.index.clone(), Keys::of(txn));
        write.after_apply(Box::new(move || lock(&index).apply(keys)));
        Ok(write)
    }

    fn read_txn(&self, id: TxnId) -> Result<Option<TxnRecord>> {
        let key = txn_key(id);
        match self.tree.get(key).map_err(|e| self.failed_read(e))? {
            Some(v) => decode_txn(&key, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Reads the records of ids the index gave; one deleted since is
    /// skipped (and dropped from the index, should it still be there).
    fn read_all(&self, ids: &[TxnId]) -> Result<Vec<TxnRecord>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.read_txn(*id)? {
                Some(t) => out.push(t),
                None => lock(&self.index).remove(*id),
            }
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl Store for SledStore {
    async fn create_txn(&self, txn: &TxnRecord) -> Result<()> {
        self.check()?;
        if txn.version != 1 {
            return Err(Error::Storage(format!("a new transaction record has version 1, not {}", txn.version)));
        }
        let mut write = self.txn_write(txn)?;
        for p in &txn.participants {
            write.insert(&partial_key(p.partial_id), txn.id.0.as_bytes());
        }
        self.journal.submit(write)?.durable().await
    }

    async fn update_txn(&self, txn: &TxnRecord, enlisted: Option<PartialId>) -> Result<()> {
        self.check()?;
        let mut write = self.txn_write(txn)?;
        if let Some(p) = enlisted {
            write.insert(&partial_key(p), txn.id.0.as_bytes());
        }
        self.journal.submit(write)?.durable().await
    }

    async fn append(&self, txn: &TxnRecord, append: AppendBatch<'_>) -> Result<()> {
        self.check()?;
        let mut write = self.txn_write(txn)?;
        for cmd in append.commands {
            write.insert(&command_key(append.partial_id, cmd.sequence), &encode(cmd)?);
        }
        if let Some((key, receipt)) = append.idempotency {
            write.insert(&receipt_key(append.partial_id, key), &encode(&receipt)?);
        }
        let pending = self.journal.submit(write)?;
        crate::failpoint::crash_point("append-unflushed");
        pending.durable().await
    }

    async fn delete_txn(&self, txn: &TxnRecord) -> Result<()> {
        self.check()?;
        let mut write = Write::default();
        for p in &txn.participants {
            write.remove(&partial_key(p.partial_id));
            for prefix in [command_prefix(p.partial_id), receipt_prefix(p.partial_id)] {
                for item in self.tree.scan_prefix(prefix) {
                    let (k, _) = item.map_err(|e| self.failed_read(e))?;
                    write.remove(&k);
                }
            }
        }
        let key = txn_key(txn.id);
        write.remove(&key);
        let (index, id) = (self.index.clone(), txn.id);
        match self.tree.get(key).map_err(|e| self.failed_read(e))? {
            None => {
                lock(&index).remove(id);
                return Ok(());
            }
            Some(_) => write.require(&key, txn.version, 0),
        }
        write.after_apply(Box::new(move || lock(&index).remove(id)));
        self.journal.submit(write)?.durable().await
    }

    async fn get_txn(&self, id: TxnId) -> Result<Option<TxnRecord>> {
        self.check()?;
        self.read_txn(id)
    }

    async fn find_partial(&self, partial: PartialId) -> Result<Option<TxnId>> {
        self.check()?;
        let key = partial_key(partial);
        match self.tree.get(key).map_err(|e| self.failed_read(e))? {
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
        match self.tree.get(&k).map_err(|e| self.failed_read(e))? {
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
            let (k, v) = item.map_err(|e| self.failed_read(e))?;
            out.push(decode(&v).map_err(|cause| corrupt("command", &k, cause))?);
        }
        Ok(out)
    }

    async fn unfinished(&self, after: Option<TxnId>, limit: usize) -> Result<Vec<TxnId>> {
        self.check()?;
        Ok(lock(&self.index).unfinished(after, limit))
    }

    async fn due_deadlines(&self, now_ms: i64, limit: usize) -> Result<(Vec<TxnId>, Option<i64>)> {
        self.check()?;
        Ok(lock(&self.index).due_deadlines(now_ms, limit))
    }

    async fn due_deliveries(&self, until_ms: i64, limit: usize) -> Result<Vec<TxnId>> {
        self.check()?;
        Ok(lock(&self.index).due_deliveries(until_ms, limit))
    }

    async fn count_unfinished(&self) -> Result<Vec<(crate::model::TxnState, u64)>> {
        self.check()?;
        Ok(lock(&self.index).count_unfinished())
    }

    async fn list(&self, q: &ListQuery) -> Result<ListPage> {
        self.check()?;
        let limit = q.limit.max(1);
        if TxnIndex::covers(&q.states) {
            let (ids, next) = lock(&self.index).list_unfinished(&q.states, q.created_until_ms, q.after, limit);
            // The record may have moved on since the index was read.
            let mut transactions = self.read_all(&ids)?;
            transactions.retain(|t| q.matches(t));
            return Ok(ListPage { transactions, next });
        }
        let iter = match q.after {
            Some(id) => self.tree.range(successor(&txn_key(id))..),
            None => self.tree.range([KIND_TXN].as_slice()..),
        };
        let mut page = ListPage::default();
        for (scanned, item) in iter.enumerate() {
            let (k, v) = item.map_err(|e| self.failed_read(e))?;
            if k.first() != Some(&KIND_TXN) {
                return Ok(page);
            }
            let t = decode_txn(&k, &v)?;
            let id = t.id;
            if q.matches(&t) {
                page.transactions.push(t);
                if page.transactions.len() == limit {
                    page.next = Some(id);
                    return Ok(page);
                }
            }
            if scanned + 1 >= LIST_SCAN {
                page.next = Some(id);
                return Ok(page);
            }
        }
        Ok(page)
    }

    async fn collectable(&self, finished_until_ms: i64, limit: usize) -> Result<(Vec<TxnRecord>, Option<i64>)> {
        self.check()?;
        let (ids, next) = lock(&self.index).collectable(finished_until_ms, limit);
        Ok((self.read_all(&ids)?, next))
    }

    async fn put_endpoint(&self, r: &Registration) -> Result<()> {
        self.check()?;
        let mut write = Write::default();
        write.insert(&endpoint_key(&r.service, &r.endpoint), &encode(r)?);
        self.journal.submit(write)?.durable().await
    }

    async fn remove_endpoint(&self, service: &str, endpoint: &str) -> Result<bool> {
        self.check()?;
        let key = endpoint_key(service, endpoint);
        if !self.tree.contains_key(&key).map_err(|e| self.failed_read(e))? {
            return Ok(false);
        }
        let mut write = Write::default();
        write.remove(&key);
        self.journal.submit(write)?.durable().await?;
        Ok(true)
    }

    async fn endpoints(&self) -> Result<Vec<Registration>> {
        self.check()?;
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([KIND_ENDPOINT]) {
            let (k, v) = item.map_err(|e| self.failed_read(e))?;
            let key = || format!("registration {}", String::from_utf8_lossy(&k[1..]).replace('\0', " "));
            out.push(decode(&v).map_err(|cause| Error::Corrupt { key: key(), cause })?);
        }
        Ok(out)
    }

    async fn remove_expired_endpoints(&self, until_ms: i64) -> Result<usize> {
        // Not atomic (a read, then a write): on sled, registrations come
        // only through this process's registry, which removes expired ones
        // when it loads them at start, before serving, so nothing renews
        // meanwhile.
        let expired: Vec<Registration> =
            self.endpoints().await?.into_iter().filter(|r| r.expires_ms <= until_ms).collect();
        if expired.is_empty() {
            return Ok(0);
        }
        let mut write = Write::default();
        for r in &expired {
            write.remove(&endpoint_key(&r.service, &r.endpoint));
        }
        self.journal.submit(write)?.durable().await?;
        Ok(expired.len())
    }

    async fn failed(&self) -> String {
        self.journal.failed().await
    }

    /// Checkpoints everything, then records the summary of the records for
    /// the next open to check (a clean close).
    async fn close(&self) {
        if !self.journal.close() {
            return;
        }
        let summary = integrity::catching_panics("sled database", || read_everything(&self.tree));
        match summary.and_then(|(_, summary, _)| integrity::write_manifest(&self.dir, &summary)) {
            Ok(()) => tracing::info!("store closed cleanly; its summary is recorded for the next start to check"),
            Err(e) => tracing::warn!(cause = %e, "cannot record the store's summary; the next start cannot check it"),
        }
    }
}

fn sled_error(e: sled::Error) -> Error {
    Error::Storage(e.to_string())
}

/// sled's errors at open: its own damage detection is damage.
fn sled_open_error(dir: &Path, e: sled::Error) -> Error {
    match e {
        sled::Error::Corruption { .. } => Error::Corrupt {
            key: format!("sled database in {}", dir.display()),
            cause: format!("sled found it damaged ({e}); restore the data directory from a backup"),
        },
        other => Error::Storage(format!("cannot open sled database in {}: {other}", dir.display())),
    }
}

/// Reads and decodes every record (so damage is found at open, not by a
/// request later), building the transaction index and the records'
/// summary.
fn read_everything(tree: &sled::Tree) -> Result<(TxnIndex, integrity::Summary, Option<i64>)> {
    let mut index = TxnIndex::default();
    let mut summing = integrity::Summing::default();
    let mut latest = None;
    for item in tree.iter() {
        let (k, v) = item.map_err(sled_error)?;
        summing.add(&k, &v);
        match k.first() {
            Some(&KIND_TXN) => {
                let txn = decode_txn(&k, &v)?;
                latest = latest.max(Some(txn.latest_ms()));
                index.put(&txn);
            }
            Some(&KIND_PARTIAL) if k.len() == 17 && v.len() == 16 => {}
            Some(&KIND_COMMAND) if k.len() == 25 => {
                decode::<CommandRecord>(&v).map_err(|cause| corrupt("command", &k, cause))?;
            }
            Some(&KIND_RECEIPT) if k.len() >= 17 => {
                decode::<AppendReceipt>(&v).map_err(|cause| corrupt("append receipt", &k, cause))?;
            }
            Some(&KIND_ENDPOINT) => {
                decode::<Registration>(&v).map_err(|cause| corrupt("registration", &k, cause))?;
            }
            _ => return Err(corrupt("record", &k, format!("unknown key of {} bytes", k.len()))),
        }
    }
    Ok((index, summing.finish(), latest))
}

/// The version a stored transaction value carries (for the journal's
/// conditions); 0 if it has none that can be read.
fn version_of(value: &[u8]) -> u64 {
    match value.split_first() {
        Some((&FORMAT_VERSIONED, rest)) => rest.get(..8).map_or(0, |b| {
            let mut v = [0u8; 8];
            v.copy_from_slice(b);
            u64::from_le_bytes(v)
        }),
        Some((&FORMAT, _)) => 1,
        _ => 0,
    }
}

fn conflict(key: &[u8], expected: u64, found: u64) -> Error {
    let txn = key.get(1..17).and_then(|b| Uuid::from_slice(b).ok()).map(TxnId).unwrap_or(TxnId(Uuid::nil()));
    Error::Conflict { txn, expected, found }
}

fn encode_txn(txn: &TxnRecord) -> Result<Vec<u8>> {
    let mut out = vec![FORMAT_VERSIONED];
    out.extend_from_slice(&txn.version.to_le_bytes());
    out.extend(txn.encode().map_err(Error::Storage)?);
    Ok(out)
}

fn decode_txn(key: &[u8], value: &[u8]) -> Result<TxnRecord> {
    let decoded = match value.split_first() {
        Some((&FORMAT_VERSIONED, rest)) if rest.len() >= 8 => {
            TxnRecord::decode(&rest[8..]).map(|t| (t, version_of(value)))
        }
        // Written before records carried versions: the first version.
        Some((&FORMAT, _)) => decode(value).map(|t| (t, 1)),
        Some((v, _)) => Err(format!("unknown format version {v} or truncated header")),
        None => Err("empty value".to_string()),
    };
    let (mut txn, version): (TxnRecord, u64) = decoded.map_err(|cause| corrupt("transaction", key, cause))?;
    txn.version = version;
    Ok(txn)
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

fn endpoint_key(service: &str, endpoint: &str) -> Vec<u8> {
    // Service names never contain 0x00 (validated), so the key is unique.
    let mut k = vec![KIND_ENDPOINT];
    k.extend_from_slice(service.as_bytes());
    k.push(0);
    k.extend_from_slice(endpoint.as_bytes());
    k
}

/// The smallest key greater than `key`.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut k = key.to_vec();
    k.push(0);
    k
}

// --- values --------------------------------------------------------------

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut out = vec![FORMAT];
    postcard::to_io(value, &mut out).map_err(|e| Error::Storage(format!("cannot encode record: {e}")))?;
    Ok(out)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> std::result::Result<T, String> {
    match bytes.split_first() {
        Some((&FORMAT, rest)) => take_all(rest),
        Some((v, _)) => Err(format!("unknown format version {v}")),
        None => Err("empty value".to_string()),
    }
}

/// Decodes postcard that must fill `bytes` exactly.
fn take_all<T: DeserializeOwned>(bytes: &[u8]) -> std::result::Result<T, String> {
    let (value, tail) = postcard::take_from_bytes(bytes).map_err(|e| e.to_string())?;
    if !tail.is_empty() {
        return Err(format!("{} trailing bytes", tail.len()));
    }
    Ok(value)
}

fn corrupt(kind: &str, key: &[u8], cause: String) -> Error {
    let id = key
        .get(1..17)
        .and_then(|b| Uuid::from_slice(b).ok())
        .map(|u| u.to_string())
        .unwrap_or_else(|| format!("{key:02x?}"));
    Error::Corrupt { key: format!("{kind} {id}"), cause }
}
