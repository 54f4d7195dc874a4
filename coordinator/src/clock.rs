//! Time and randomness, injected.
//!
//! Everything in the coordinator that reads the time or draws a random
//! number does it through a [`Clock`] or an [`Entropy`] it was given: the
//! engine (deadlines, decision and finish times, ids), delivery (backoff,
//! jitter) and the sweeper. The server passes the system clock and the
//! thread RNG; tests and the deterministic simulation pass a clock they
//! move and a seeded generator, so the same seed gives the same run.
//!
//! Times are unix milliseconds ([`Clock::now_ms`]). A wall clock can step
//! (NTP, a VM restored from a snapshot): code that waits for a persisted
//! time bounds the wait it derives from it (see `delivery`), so a step
//! never postpones due work by more than that bound. And the server's
//! clock is a [`SteadyClock`]: coordinator time never runs backwards, not
//! within a run and not across a restart (it starts no earlier than the
//! latest time the store recorded), so deadlines fire at their real due
//! time and listings by age stay right after a step back.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::lock;
use crate::model::{PartialId, TxnId};

/// Milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        now.map(|d| d.as_millis() as i64).unwrap_or(0)
    }
}

/// The wall clock, kept from running backwards: the latest time it showed
/// (or was given as a floor, [`SteadyClock::hold_at_least`]) advances at
/// the real rate, measured by the monotonic clock, until the wall clock
/// catches up. A step forward is taken as it is.
#[derive(Debug)]
pub struct SteadyClock<W: Clock = SystemClock> {
    wall: W,
    started: std::time::Instant,
    /// Coordinator time is at least this plus the milliseconds since
    /// `started`.
    base: AtomicI64,
}

impl SteadyClock<SystemClock> {
    /// The system's wall clock, kept steady.
    pub fn system() -> Self {
        SteadyClock::over(SystemClock)
    }
}

impl<W: Clock> SteadyClock<W> {
    /// `wall`, kept steady.
    pub fn over(wall: W) -> Self {
        let base = wall.now_ms();
        SteadyClock { wall, started: std::time::Instant::now(), base: base.into() }
    }

    fn elapsed_ms(&self) -> i64 {
        i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX / 2)
    }

    /// Makes coordinator time at least `floor_ms` from now on (and advance
    /// from it). Returns how far the wall clock is behind it, if it is.
    pub fn hold_at_least(&self, floor_ms: i64) -> Option<i64> {
        self.base.fetch_max(floor_ms.saturating_sub(self.elapsed_ms()), Ordering::SeqCst);
        let behind = floor_ms - self.wall.now_ms();
        (behind > 0).then_some(behind)
    }
}

impl<W: Clock> Clock for SteadyClock<W> {
    fn now_ms(&self) -> i64 {
        let elapsed = self.elapsed_ms();
        let steady = self.base.load(Ordering::Acquire).saturating_add(elapsed);
        let wall = self.wall.now_ms();
        if wall > steady {
            self.base.fetch_max(wall - elapsed, Ordering::AcqRel);
            return wall;
        }
        steady
    }
}

impl<W: Clock> Clock for std::sync::Arc<W> {
    fn now_ms(&self) -> i64 {
        (**self).now_ms()
    }
}

/// A clock that only moves when told to, for tests.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock at `ms`.
    pub fn at(ms: i64) -> Self {
        ManualClock(ms.into())
    }
    /// Moves the clock (backwards for a negative `ms`).
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Where ids and jitter come from.
pub trait Entropy: Send + Sync + 'static {
    /// A new transaction id created at `now_ms` (time-ordered, UUIDv7).
    fn txn_id(&self, now_ms: i64) -> TxnId;
    /// A new, unguessable partial id.
    fn partial_id(&self) -> PartialId;
    /// A number in `0..=max`.
    fn up_to(&self, max: u64) -> u64;
}

/// The operating system's randomness (through the thread RNG).
#[derive(Clone, Copy, Debug, Default)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn txn_id(&self, now_ms: i64) -> TxnId {
        TxnId::from_parts(now_ms.max(0) as u64, rand::random())
    }
    fn partial_id(&self) -> PartialId {
        PartialId::from_random(rand::random())
    }
    fn up_to(&self, max: u64) -> u64 {
        rand::random_range(0..=max)
    }
}

/// A seeded generator: the same seed gives the same ids and jitter. For
/// tests and the simulation only (its partial ids are guessable).
#[derive(Debug)]
pub struct SeededEntropy(Mutex<StdRng>);

impl SeededEntropy {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        SeededEntropy(Mutex::new(StdRng::seed_from_u64(seed)))
    }
}

impl Entropy for SeededEntropy {
    fn txn_id(&self, now_ms: i64) -> TxnId {
        TxnId::from_parts(now_ms.max(0) as u64, lock(&self.0).random())
    }
    fn partial_id(&self) -> PartialId {
        PartialId::from_random(lock(&self.0).random())
    }
    fn up_to(&self, max: u64) -> u64 {
        lock(&self.0).random_range(0..=max)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Within this much of `expected` (the test's own run time).
    fn near(found: i64, expected: i64) -> bool {
        (expected..expected + 1_000).contains(&found)
    }

    #[test]
    fn a_steady_clock_never_runs_backwards() {
        let wall = Arc::new(ManualClock::at(10_000));
        let clock = SteadyClock::over(wall.clone());
        assert!(near(clock.now_ms(), 10_000));
        // Forward steps are taken.
        wall.advance(5_000);
        assert!(near(clock.now_ms(), 15_000));
        // A step back is not: time goes on from the latest it showed.
        wall.advance(-7_200_000);
        assert!(near(clock.now_ms(), 15_000));
        // Until the wall clock is ahead again.
        wall.advance(7_210_000);
        assert!(near(clock.now_ms(), 25_000));
    }

    #[test]
    fn a_floor_from_the_store_holds_time_up_after_a_restart() {
        // The clock was stepped back 2 h while stopped: the store's latest
        // record is 2 h ahead of it.
        let wall = Arc::new(ManualClock::at(1_000_000));
        let clock = SteadyClock::over(wall.clone());
        assert_eq!(clock.hold_at_least(1_000_000 + 7_200_000), Some(7_200_000));
        assert!(near(clock.now_ms(), 8_200_000));
        // A floor behind the clock changes nothing.
        assert_eq!(clock.hold_at_least(5), None);
        assert!(near(clock.now_ms(), 8_200_000));
        // The wall clock catches up, and leads again.
        wall.advance(7_300_000);
        assert!(near(clock.now_ms(), 8_300_000));
    }
}
