//! Reads: one transaction, waiting for an outcome, and listings.

use std::time::Duration;

use super::{Engine, Found, not_found};
use crate::config::fixed;
use crate::error::Result;
use crate::model::{TxnId, TxnRecord, TxnState};
use crate::store::{ListPage, ListQuery};

impl Engine {
    /// Reads a transaction.
    /// While an operation holds it, that is (after the operation's write)
    /// the record in memory; otherwise what the store holds.
    pub async fn get(&self, id: TxnId) -> Result<TxnRecord> {
        match self.held(id) {
            Some(held) => {
                let txn = held.record.lock().await.clone();
                Ok(txn)
            }
            None => self.store.get_txn(id).await?.ok_or_else(|| not_found(id)),
        }
    }

    /// Waits until the transaction leaves CONFIRMING/CANCELLING or `wait`
    /// passes, then returns it.
    pub async fn wait_settled(&self, id: TxnId, wait: Duration) -> Result<TxnRecord> {
        if let Found::Live(live) = self.find(id).await? {
            let mut rx = live.state.subscribe();
            let _ = tokio::time::timeout(wait, rx.wait_for(|s| !s.is_delivering())).await;
        }
        self.get(id).await
    }

    /// Lists transactions, oldest first, in the given states (all if empty)
    /// created at least `min_age_ms` ago (0: any), starting after `after`. Every
    /// record is judged by its own creation time: a record that looks
    /// "too young" (clock skew between the writers of records) is skipped,
    /// never the end of the listing.
    pub async fn list(
        &self,
        states: &[TxnState],
        min_age_ms: u64,
        page_size: usize,
        after: Option<TxnId>,
    ) -> Result<ListPage> {
        let limit = if page_size == 0 { 100 } else { page_size.min(fixed::MAX_PAGE) };
        // 0 = no age filter: also records whose creation time is ahead of
        // this clock (written by a node whose clock ran ahead, or before
        // this clock stepped back).
        let created_until_ms = match min_age_ms {
            0 => i64::MAX,
            age => self.clock.now_ms().saturating_sub(age.min(i64::MAX as u64) as i64),
        };
        self.store.list(&ListQuery { states: states.to_vec(), created_until_ms, after, limit }).await
    }
}
