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
//!  gRPC ──▶ api ──▶ engine ──▶ store (dyn Store: sled, memory)
//!                     │  ▲
//!          decided ids▼  │ progress
//!                   delivery ──▶ transport ──▶ participants (tcc.v1.Participant)
//!
//!  all of them speak model (ids, records, the state machine);
//!  time and randomness come in through clock
//! ```
//!
//! Layers, bottom up; a module imports only from layers below it:
//!
//! 1. [`model`]: ids, records, states, the state machine. Imports nothing
//!    from the crate.
//! 2. [`error`], [`clock`] (time and randomness, injected), [`config`],
//!    [`metrics`] (what is exported, and the recording helpers),
//!    [`telemetry`] (trace context and OTLP export).
//! 3. [`auth`]: identities (client certificates, bearer tokens), the
//!    policy, and the TLS material for the server and for phase 2.
//! 4. [`store`]: the conditional-write store trait, its backends and the
//!    conformance suite every backend passes.
//! 5. [`engine`]: the operations on transactions, per-transaction
//!    serialisation, deadlines and GC ([`engine::sweeper`]).
//! 6. [`delivery`]: phase 2, retries with backoff, the transport and the
//!    endpoint registry.
//! 7. [`api`]: request parsing and the one `Status` mapping, one file per
//!    service; [`net`]: connection limits and deadlines.
//! 8. [`server`]: wiring, recovery at start, graceful shutdown.
//!
//! `ARCHITECTURE.md` at the repository root describes the protocol, its
//! invariants and this map in full. The invariants this crate keeps: decisions are
//! durable before they are acknowledged and never change; appends only
//! while ACTIVE; every acknowledged append is delivered in order with its
//! partial's commit; delivery retries until acknowledged (or an operator is
//! told); everything is bounded and finished transactions are collected.

pub mod api;
pub mod auth;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod metrics;
pub mod model;
pub mod net;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod throttle;

pub use config::Config;

/// Locks a std mutex, recovering from poisoning. Every std mutex in this
/// crate guards maps, sets or counters that are never left half-updated,
/// so the data is still consistent after a holder panicked.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
pub use error::{Error, Result};
