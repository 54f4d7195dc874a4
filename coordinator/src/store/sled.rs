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
//!
//! Values are one format byte ([`FORMAT`]) followed by postcard. Anything
//! else is reported as corrupt, with the key, rather than skipped.
//!
//! ## Durability and atomicity
//! Each write method builds one journal [`Write`] (all its keys) and hands
//! it to the [`Journal`](super::journal): it is acknowledged once its frame
//! is synced to the journal (one sync per group of concurrent writers) and
//! applied to sled; sled itself is flushed at checkpoints. A frame is
//! replayed whole or not at all, which makes every write atomic across
//! record kinds. See the journal's docs for recovery and the fail-stop rule.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::journal::{Journal, Write};
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
    journal: Journal,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        // sled's own periodic flush is off: the journal's checkpoints flush.
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .open()
            .map_err(|e| Error::Storage(format!("cannot open sled database in {}: {e}", dir.display())))?;
        let tree = db.open_tree("tcc")?;
        let journal = Journal::open(dir, db, tree.clone())?;
        Ok(SledStore { tree, journal })
    }

    /// Fail-stop: after a failed write nothing is served, not even reads.
    fn check(&self) -> Result<()> {
        self.journal.check()
    }

    fn decode_txn(key: &[u8], value: &[u8]) -> Result<TxnRecord> {
        decode(value).map_err(|cause| corrupt("transaction", key, cause))
    }
}

impl Store for SledStore {
    async fn put_txn(&self, txn: &TxnRecord) -> Result<()> {
        self.check()?;
        let mut write = Write::default();
        write.insert(&txn_key(txn.id), &encode(txn)?);
        for p in &txn.participants {
            write.insert(&partial_key(p.partial_id), txn.id.0.as_bytes());
        }
        self.journal.submit(write)?.durable().await
    }

    async fn update_txn(&self, txn: &TxnRecord) -> Result<()> {
        self.check()?;
        let mut write = Write::default();
        write.insert(&txn_key(txn.id), &encode(txn)?);
        self.journal.submit(write)?.durable().await
    }

    async fn append(&self, txn: &TxnRecord, append: AppendBatch<'_>) -> Result<()> {
        self.check()?;
        let mut write = Write::default();
        for cmd in append.commands {
            write.insert(&command_key(append.partial_id, cmd.sequence), &encode(cmd)?);
        }
        if let Some((key, receipt)) = append.idempotency {
            write.insert(&receipt_key(append.partial_id, key), &encode(&receipt)?);
        }
        write.insert(&txn_key(txn.id), &encode(txn)?);
        let pending = self.journal.submit(write)?;
        crate::failpoint::crash_point("append-unflushed");
        pending.durable().await
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
        let mut write = Write::default();
        for p in &txn.participants {
            write.remove(&partial_key(p.partial_id));
            for prefix in [command_prefix(p.partial_id), receipt_prefix(p.partial_id)] {
                for item in self.tree.scan_prefix(prefix) {
                    let (k, _) = item?;
                    write.remove(&k);
                }
            }
        }
        write.remove(&txn_key(txn.id));
        self.journal.submit(write)?.durable().await
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
