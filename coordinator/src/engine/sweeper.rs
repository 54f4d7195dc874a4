//! The background sweeper: cancels ACTIVE transactions at their deadline and
//! garbage-collects finished ones after their retention.
//!
//! Shaped like mini-redis's purge task: sleep until the earliest due time,
//! wake early when the engine schedules something earlier, stop on
//! shutdown. The engine keeps both schedules in ordered sets, so each wake-up
//! costs only the work that is due.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Engine;
use crate::store::Store;

/// Longest sleep, so a wall-clock jump is noticed within this bound.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// Runs until `shutdown` is cancelled.
pub async fn run<S: Store>(engine: Arc<Engine<S>>, shutdown: CancellationToken) {
    loop {
        let expired = engine.expire_due().await;
        if expired > 0 {
            tracing::info!(count = expired, "deadline passed; transactions cancelled");
        }
        engine.collect_garbage().await;

        let sleep = match engine.next_due() {
            Some(t) => Duration::from_millis(t.saturating_sub(engine.now_ms()).max(0) as u64).min(MAX_SLEEP),
            None => MAX_SLEEP,
        };
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = engine.schedule_changed.notified() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
