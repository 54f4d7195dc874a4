//! Crash points for the failure tests.
//!
//! Compiled in only with the `failpoints` feature (the workspace's tests
//! enable it; a plain `cargo build -p tcc-coordinator` leaves it out). With
//! it, the environment variable `TCC_CRASH_AT=NAME` (or `NAME:N`, the N-th
//! time) makes the process abort at that protocol step: no destructor, no
//! flush, the same as `kill -9` there. The points:
//!
//! | name               | where                                                        |
//! |--------------------|--------------------------------------------------------------|
//! | `after-decision`   | the decision is on disk; no reply, no participant called yet |
//! | `after-ack`        | a participant's acknowledgement was recorded                 |
//! | `append-unflushed` | an append is applied in memory, not yet flushed              |
//! | `during-recovery`  | recovery is about to load a (the N-th) transaction           |

/// Aborts the process if `TCC_CRASH_AT` names this point (and its count is
/// reached). A no-op without the `failpoints` feature.
#[inline]
pub fn crash_point(name: &str) {
    #[cfg(feature = "failpoints")]
    imp::hit(name);
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

#[cfg(feature = "failpoints")]
mod imp {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);

    pub fn hit(name: &str) {
        let target = TARGET.get_or_init(|| {
            let spec = std::env::var("TCC_CRASH_AT").ok()?;
            match spec.split_once(':') {
                Some((n, count)) => Some((n.to_string(), count.parse().unwrap_or(1))),
                None => Some((spec, 1)),
            }
        });
        if let Some((point, count)) = target {
            if point == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *count {
                eprintln!("tcc-coordinator: crash point {name} reached; aborting");
                std::process::abort();
            }
        }
    }
}
