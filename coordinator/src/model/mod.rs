//! The bottom layer: the data every other module speaks in.
//!
//! * [`ids`]: transaction and partial transaction ids;
//! * [`txn`]: the transaction record, its participants, states and
//!   decisions, stored commands and append receipts;
//! * [`machine`]: the state machine, [`machine::apply`], the one function
//!   that moves a transaction.
//!
//! Nothing here imports anything else from the crate, performs I/O or reads
//! a clock: time comes in as arguments. The store, engine, delivery and API
//! all build on this layer, and never the other way round.

pub mod ids;
pub mod machine;
pub mod txn;

pub use ids::{BadId, PartialId, TxnId};
pub use machine::{Event, Outcome, Refusal, apply};
pub use txn::{
    AppendReceipt, CommandRecord, DEADLINE_REASON, Decision, HistoryEntry, ParticipantRecord, Phase2Status,
    Registration, TxnRecord, TxnState,
};
