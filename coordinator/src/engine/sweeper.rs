//! The background sweeper: cancels ACTIVE transactions at their deadline,
//! hands overdue deliveries (a driver that stopped) back to delivery, and
//! garbage-collects finished transactions after their retention.
//!
//! Shaped like mini-redis's purge task: do what is due, sleep until the
//! earliest due time (at most [`MAX_SLEEP`], so a clock step or work
//! another writer added is noticed), wake early when a transaction begins
//! whose deadline comes before the planned wake-up, stop on shutdown. Every pass asks the store what is due; nothing is
//! scheduled in memory, so a restart or a second writer loses nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Engine;
use crate::model::{DEADLINE_REASON, Event, TxnState};
use crate::throttle::Throttle;

/// Longest sleep between passes.
pub const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Work items taken from the store per query.
const BATCH: usize = 256;

/// What one pass did, and when the next is due.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Transactions cancelled by their deadline.
    pub expired: usize,
    /// Deliveries handed back to the driver.
    pub overdue: usize,
    /// Finished transactions deleted.
    pub collected: usize,
    /// The earliest known time with more work (unix ms).
    pub next_due: Option<i64>,
}

impl Engine {
    /// One pass: deadlines, overdue deliveries, garbage collection.
    pub async fn sweep(&self) -> Swept {
        let mut swept = Swept::default();
        let (expired, next_deadline) = self.expire_due().await;
        let (collected, next_collection) = self.collect_garbage().await;
        swept.expired = expired;
        swept.collected = collected;
        swept.overdue = self.resume_overdue().await;
        swept.next_due = next_deadline.into_iter().chain(next_collection).min();
        swept
    }

    /// Cancels every ACTIVE transaction whose deadline has passed. Returns
    /// how many were cancelled and the next deadline.
    pub async fn expire_due(&self) -> (usize, Option<i64>) {
        let mut n = 0;
        loop {
            let now = self.clock.now_ms();
            let (due, next) = match self.store.due_deadlines(now, BATCH).await {
                Ok(found) => found,
                Err(e) => {
                    warn!(cause = %e, "cannot read due deadlines; will retry");
                    return (n, Some(now + 1000));
                }
            };
            let full = due.len() == BATCH;
            let before = n;
            let mut failed = false;
            for id in due {
                match self.transition(id, vec![Event::Expire]).await {
                    Ok(t) if t.state == TxnState::Cancelling && t.reason == DEADLINE_REASON => n += 1,
                    Ok(_) => {}
                    Err(e) => {
                        // A fenced node (a zombie after a takeover) fails
                        // this for every due transaction at once.
                        static THROTTLE: Throttle = Throttle::new(Duration::from_secs(10));
                        if let Some(held_back) = THROTTLE.allow() {
                            warn!(txn = %id, cause = %e, held_back, "could not expire transaction; will retry (one line per 10 s; held_back: the like since the last one)");
                        }
                        failed = true;
                    }
                }
            }
            if failed {
                return (n, Some(now + 1000));
            }
            // A full batch that expired nothing (the clock stepped back
            // meanwhile) must not spin.
            if !full || n == before {
                if n > 0 {
                    info!(count = n, "deadline passed; transactions cancelled");
                }
                return (n, next);
            }
        }
    }

    /// Sends transactions with an overdue pending participant to delivery
    /// (whose start is idempotent): a driver that stopped on an error, or
    /// work another writer decided. Returns how many were found.
    pub async fn resume_overdue(&self) -> usize {
        match self.store.due_deliveries(self.clock.now_ms(), BATCH).await {
            Ok(ids) => {
                let n = ids.len();
                for id in ids {
                    let _ = self.to_deliver.send(id);
                }
                n
            }
            Err(e) => {
                warn!(cause = %e, "cannot read due deliveries; will retry");
                0
            }
        }
    }

    /// Deletes finished transactions whose retention has ended. Returns how
    /// many were deleted and when the next one may be collected.
    pub async fn collect_garbage(&self) -> (usize, Option<i64>) {
        let now = self.clock.now_ms();
        let until = now.saturating_sub(self.retention_ms);
        let mut n = 0;
        loop {
            let (due, next) = match self.store.collectable(until, BATCH).await {
                Ok(found) => found,
                Err(e) => {
                    warn!(cause = %e, "cannot read collectable transactions; will retry");
                    return (n, Some(now + 1000));
                }
            };
            let full = due.len() == BATCH;
            match self.store.delete_txns(&due).await {
                Ok(deleted) => n += deleted,
                Err(e) => {
                    warn!(count = due.len(), cause = %e, "garbage collection failed; will retry");
                    return (n, Some(now + 1000));
                }
            }
            if !full {
                if n > 0 {
                    info!(count = n, "finished transactions garbage-collected");
                }
                return (n, next.map(|t| t.saturating_add(self.retention_ms)));
            }
        }
    }
}

/// Runs until `shutdown` is cancelled.
pub async fn run(engine: Arc<Engine>, shutdown: CancellationToken) {
    loop {
        let swept = engine.sweep().await;
        let sleep = match swept.next_due {
            Some(t) => Duration::from_millis(t.saturating_sub(engine.now_ms()).max(0) as u64).min(MAX_SLEEP),
            None => MAX_SLEEP,
        };
        let wake = engine.now_ms().saturating_add(sleep.as_millis() as i64);
        engine.next_sweep_ms.store(wake, std::sync::atomic::Ordering::SeqCst);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = engine.schedule_changed.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}
