//! A store that keeps everything in memory: for tests and the
//! deterministic simulation, where "durable" means "survives the engine
//! that wrote it" (a simulated crash drops the engine, not the store).
//!
//! One mutex guards everything, so every method is trivially atomic and
//! the version conditions are checked and the write applied in one step.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use super::index::TxnIndex;
use super::{AppendBatch, ListPage, ListQuery, Store};
use crate::error::{Error, Result};
use crate::lock;
use crate::model::{AppendReceipt, CommandRecord, PartialId, Registration, TxnId, TxnRecord};

#[derive(Default)]
struct Inner {
    txns: BTreeMap<TxnId, TxnRecord>,
    partials: HashMap<PartialId, TxnId>,
    topics: BTreeMap<(PartialId, u64), CommandRecord>,
    receipts: HashMap<(PartialId, String), AppendReceipt>,
    endpoints: BTreeMap<(String, String), Registration>,
    index: TxnIndex,
}

impl Inner {
    /// The version condition of a write of `txn`: the stored record must be
    /// at `txn.version - 1` (0 = absent).
    fn check(&self, txn: &TxnRecord) -> Result<()> {
        let found = self.txns.get(&txn.id).map_or(0, |t| t.version);
        let expected = txn.version.saturating_sub(1);
        if txn.version == 0 || found != expected {
            return Err(Error::Conflict { txn: txn.id, expected, found });
        }
        Ok(())
    }

    fn put(&mut self, txn: &TxnRecord) {
        self.index.put(txn);
        self.txns.insert(txn.id, txn.clone());
    }
}

/// The in-memory [`Store`].
#[derive(Default)]
pub struct MemStore {
    inner: Mutex<Inner>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait::async_trait]
impl Store for MemStore {
    async fn create_txn(&self, txn: &TxnRecord) -> Result<()> {
        let mut s = lock(&self.inner);
        if txn.version != 1 {
            return Err(Error::Storage(format!("a new transaction record has version 1, not {}", txn.version)));
        }
        s.check(txn)?;
        for p in &txn.participants {
            s.partials.insert(p.partial_id, txn.id);
        }
        s.put(txn);
        Ok(())
    }

    async fn update_txn(&self, txn: &TxnRecord, enlisted: Option<PartialId>) -> Result<()> {
        let mut s = lock(&self.inner);
        s.check(txn)?;
        if let Some(p) = enlisted {
            s.partials.insert(p, txn.id);
        }
        s.put(txn);
        Ok(())
    }

    async fn append(&self, txn: &TxnRecord, batch: AppendBatch<'_>) -> Result<()> {
        let mut s = lock(&self.inner);
        s.check(txn)?;
        for c in batch.commands {
            s.topics.insert((batch.partial_id, c.sequence), c.clone());
        }
        if let Some((key, receipt)) = batch.idempotency {
            s.receipts.insert((batch.partial_id, key.to_string()), receipt);
        }
        s.put(txn);
        Ok(())
    }

    async fn delete_txn(&self, txn: &TxnRecord) -> Result<()> {
        let mut s = lock(&self.inner);
        let found = s.txns.get(&txn.id).map_or(0, |t| t.version);
        if found == 0 {
            return Ok(());
        }
        if found != txn.version {
            return Err(Error::Conflict { txn: txn.id, expected: txn.version, found });
        }
        for p in &txn.participants {
            s.partials.remove(&p.partial_id);
            let seqs: Vec<u64> =
                s.topics.range((p.partial_id, 0)..=(p.partial_id, u64::MAX)).map(|(k, _)| k.1).collect();
            for seq in seqs {
                s.topics.remove(&(p.partial_id, seq));
            }
            s.receipts.retain(|(pid, _), _| *pid != p.partial_id);
        }
        s.txns.remove(&txn.id);
        s.index.remove(txn.id);
        Ok(())
    }

    async fn get_txn(&self, id: TxnId) -> Result<Option<TxnRecord>> {
        Ok(lock(&self.inner).txns.get(&id).cloned())
    }

    async fn find_partial(&self, partial: PartialId) -> Result<Option<TxnId>> {
        Ok(lock(&self.inner).partials.get(&partial).copied())
    }

    async fn find_receipt(&self, partial: PartialId, key: &str) -> Result<Option<AppendReceipt>> {
        Ok(lock(&self.inner).receipts.get(&(partial, key.to_string())).copied())
    }

    async fn read_topic(&self, partial: PartialId, from: u64, limit: usize) -> Result<Vec<CommandRecord>> {
        let s = lock(&self.inner);
        Ok(s.topics.range((partial, from)..=(partial, u64::MAX)).take(limit).map(|(_, c)| c.clone()).collect())
    }

    async fn unfinished(&self, after: Option<TxnId>, limit: usize) -> Result<Vec<TxnId>> {
        Ok(lock(&self.inner).index.unfinished(after, limit))
    }

    async fn due_deadlines(&self, now_ms: i64, limit: usize) -> Result<(Vec<TxnId>, Option<i64>)> {
        Ok(lock(&self.inner).index.due_deadlines(now_ms, limit))
    }

    async fn due_deliveries(&self, until_ms: i64, limit: usize) -> Result<Vec<TxnId>> {
        Ok(lock(&self.inner).index.due_deliveries(until_ms, limit))
    }

    async fn count_unfinished(&self) -> Result<Vec<(crate::model::TxnState, u64)>> {
        Ok(lock(&self.inner).index.count_unfinished())
    }

    async fn list(&self, q: &ListQuery) -> Result<ListPage> {
        let s = lock(&self.inner);
        let limit = q.limit.max(1);
        if TxnIndex::covers(&q.states) {
            let (ids, next) = s.index.list_unfinished(&q.states, q.created_until_ms, q.after, limit);
            let transactions = ids.iter().filter_map(|id| s.txns.get(id).cloned()).collect();
            return Ok(ListPage { transactions, next });
        }
        let range = match q.after {
            Some(a) => s.txns.range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => s.txns.range(..),
        };
        let mut page = ListPage::default();
        for (id, t) in range {
            if q.matches(t) {
                page.transactions.push(t.clone());
                if page.transactions.len() == limit {
                    page.next = Some(*id);
                    break;
                }
            }
        }
        Ok(page)
    }

    async fn collectable(&self, finished_until_ms: i64, limit: usize) -> Result<(Vec<TxnRecord>, Option<i64>)> {
        let s = lock(&self.inner);
        let (ids, next) = s.index.collectable(finished_until_ms, limit);
        Ok((ids.iter().filter_map(|id| s.txns.get(id).cloned()).collect(), next))
    }

    async fn put_endpoint(&self, r: &Registration) -> Result<()> {
        lock(&self.inner).endpoints.insert((r.service.clone(), r.endpoint.clone()), r.clone());
        Ok(())
    }

    async fn remove_endpoint(&self, service: &str, endpoint: &str) -> Result<bool> {
        Ok(lock(&self.inner).endpoints.remove(&(service.to_string(), endpoint.to_string())).is_some())
    }

    async fn endpoints(&self) -> Result<Vec<Registration>> {
        Ok(lock(&self.inner).endpoints.values().cloned().collect())
    }

    async fn remove_expired_endpoints(&self, until_ms: i64) -> Result<usize> {
        let mut s = lock(&self.inner);
        let before = s.endpoints.len();
        s.endpoints.retain(|_, r| r.expires_ms > until_ms);
        Ok(before - s.endpoints.len())
    }
}
