//! The TCC (Try-Confirm-Cancel) composite-transaction coordinator.
//!
//! A composite service begins a transaction for a set of participant
//! services; each participant buffers the writes of its *try* as commands in
//! a durable topic named by its partial transaction id; the coordinator then
//! drives *confirm* (every participant commits its commands) or *cancel*
//! (every participant rolls back), surviving crashes, timeouts and retries.
//!
//! The modules follow the flow of a request:
//!
//! ```text
//!  gRPC ──▶ api ──▶ engine ──▶ store (trait; sled)
//!                     │  ▲
//!          decided ids▼  │ progress
//!                   delivery ──▶ participants (tcc.v1.Participant)
//! ```
//!
//! * [`api`]: request parsing and `Status` mapping, one file per service.
//! * [`engine`]: the state machine ([`engine::state`]), per-transaction
//!   serialisation, deadlines and GC ([`engine::sweeper`]).
//! * [`delivery`]: phase 2, retries with backoff, endpoint registry.
//! * [`store`]: the durable store trait, the sled backend with group
//!   commit, and the conformance suite every backend passes.
//! * [`config`]: flags and environment variables, all with defaults.
//! * [`server`]: wiring, recovery at start, graceful shutdown.
//!
//! The invariants this crate keeps are those of `DESIGN.md`: decisions are
//! durable before they are acknowledged and never change; appends only
//! while ACTIVE; every acknowledged append is delivered in order with its
//! partial's commit; delivery retries until acknowledged (or an operator is
//! told); everything is bounded and finished transactions are collected.

pub mod api;
pub mod config;
pub mod delivery;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod ids;
pub mod server;
pub mod store;

pub use config::Config;

/// Locks a std mutex, recovering from poisoning. Every std mutex in this
/// crate guards maps, sets or counters that are never left half-updated,
/// so the data is still consistent after a holder panicked.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
pub use error::{Error, Result};
