//! Log lines that a failure could repeat for every transaction (a fenced
//! coordinator's writes, a takeover of many transactions at once) go
//! through a [`Throttle`]: at most one line per interval, which says how
//! many like it were held back since the last one. The events themselves
//! are still counted where they have a metric. A burst shows as its first
//! line; its count is told by the next line, if another comes.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// At most one log line per `every`; see the module docs.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Mutex<Option<Instant>>,
    held_back: AtomicU64,
}

impl Throttle {
    /// A throttle allowing one line per `every`.
    pub const fn new(every: Duration) -> Self {
        Throttle { every, last: Mutex::new(None), held_back: AtomicU64::new(0) }
    }

    /// `Some(n)` if a line may be logged now, with `n` lines held back
    /// since the last one; `None` (and one more held back) otherwise.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < self.every) {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.held_back.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_saying_how_many_were_held_back() {
        let t = Throttle::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(t.allow_at(start), Some(0));
        for i in 0..64 {
            assert_eq!(t.allow_at(start + Duration::from_millis(i * 100)), None);
        }
        assert_eq!(t.allow_at(start + Duration::from_secs(10)), Some(64));
        assert_eq!(t.allow_at(start + Duration::from_secs(11)), None);
        assert_eq!(t.allow_at(start + Duration::from_secs(20)), Some(1));
    }
}
