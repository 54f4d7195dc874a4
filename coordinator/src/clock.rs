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
//! never postpones due work by more than that bound.

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
