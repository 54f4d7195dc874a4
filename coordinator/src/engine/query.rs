//! Reads: one transaction, waiting for an outcome, and listings.

use std::time::Duration;

use super::{Engine, Held, not_found};
use crate::config::fixed;
use crate::error::Result;
use crate::model::{TxnId, TxnRecord, TxnState};
use crate::store::{ListPage, ListQuery};

/// First poll of a waiter on a shared store.
pub const POLL_FIRST: Duration = Duration::from_millis(5);

/// Longest interval between polls of a waiter on a shared store.
pub const POLL_MAX: Duration = Duration::from_millis(200);

impl Engine {
    /// How many transactions are in each unfinished or failed state,
    /// exactly (for metrics).
    pub async fn count_unfinished(&self) -> Result<Vec<(crate::model::TxnState, u64)>> {
        self.store.count_unfinished().await
    }

    /// Reads a transaction.
    /// While an operation holds it, that is (after the operation's write)
    /// the record in memory; otherwise what the store holds. With a store
    /// shared by several coordinators, always what the store holds:
    /// another one may have written since this one's operation did.
    pub async fn get(&self, id: TxnId) -> Result<TxnRecord> {
        if self.store.node().is_some() {
            return self.store.get_txn(id).await?.ok_or_else(|| not_found(id));
        }
        match self.held(id) {
            Some(held) => {
                let txn = held.record.lock().await.clone();
                Ok(txn)
            }
            None => self.store.get_txn(id).await?.ok_or_else(|| not_found(id)),
        }
    }

    /// Waits, on a transaction already held (by the decision that just
    /// moved it: see `lifecycle::decide`), until it leaves
    /// CONFIRMING/CANCELLING or `wait` passes, then returns it.
    ///
    /// This engine's own writes wake the waiter at once. With a store
    /// shared by several coordinators, another one may deliver the
    /// transaction (a decision taken there, or a takeover), so the waiter
    /// also polls the store, every [`POLL_FIRST`] doubling to
    /// [`POLL_MAX`]. Polling rather than LISTEN/NOTIFY: nothing to
    /// re-subscribe after a database restart and no notification to lose,
    /// at a cost of a few indexed reads per second per waiter. When this
    /// engine delivers the transaction itself (it took the decision, the
    /// usual case), its own writes wake the waiter, and the store is polled
    /// only every [`POLL_MAX`], in case another coordinator takes over.
    /// A failed poll of the store is logged and the wait goes on: the
    /// caller's decision is durable already, and its outcome is still to
    /// come.
    pub(super) async fn wait_on(&self, live: &Held<'_>, id: TxnId, wait: Duration) -> Result<TxnRecord> {
        let shared = self.store.node().is_some();
        let mut rx = live.state.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        let mut poll = POLL_FIRST;
        loop {
            if crate::lock(&live.owned).is_some() {
                poll = POLL_MAX;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let step = if shared { poll.min(left) } else { left };
            tokio::select! {
                settled = async { tokio::time::timeout(step, rx.wait_for(|s| !s.is_delivering())).await.is_ok() } => {
                    if settled {
                        // Settled here: what this engine wrote is the latest.
                        return Ok(live.record.lock().await.clone());
                    }
                }
                // Shutdown: answer with the state reached so far.
                _ = self.stopping.cancelled() => break,
            }
            if left == step {
                break;
            }
            match self.store.get_txn(id).await {
                Ok(Some(txn)) if !txn.state.is_delivering() => return Ok(txn),
                Ok(Some(_)) => {}
                Ok(None) => return Err(not_found(id)),
                Err(e) => tracing::warn!(txn = %id, cause = %e, "waiting for an outcome: cannot poll the store"),
            }
            poll = (poll * 2).min(POLL_MAX);
        }
        if shared {
            // Timed out: what this engine holds may be older than what
            // another wrote; if the store cannot say, what this engine has.
            if let Ok(Some(txn)) = self.store.get_txn(id).await {
                return Ok(txn);
            }
        }
        Ok(live.record.lock().await.clone())
    }

    /// When the oldest unfinished (ACTIVE, CONFIRMING, CANCELLING)
    /// transaction was created (unix ms), if there is one.
    pub async fn oldest_unfinished_created_ms(&self) -> Result<Option<i64>> {
        use crate::model::TxnState::*;
        let page = self.list(&[Active, Confirming, Cancelling], 0, 1, None).await?;
        Ok(page.transactions.first().map(|t| t.created_ms))
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
