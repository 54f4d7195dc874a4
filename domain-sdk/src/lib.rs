//! What a service links to take part in TCC composite transactions.
//!
//! For now this crate re-exports the wire contract ([`proto`]): the
//! `Transactions` and `Topics` clients a service calls, and the
//! `Participant` server trait the coordinator calls back. The typed
//! publisher, partial-id propagation, exactly-once participant server and
//! composite client are built on top of it by the SDK issue.

pub use tcc_proto::v1 as proto;
