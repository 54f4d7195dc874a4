//! The stores a participant keeps its data in, each with the guard that
//! makes phase 2 exactly-once and the reservations:
//!
//! * [`sled::SledStore`]: the embedded default, the service's own sled
//!   database (no server; the demo's zero-configuration start);
//! * `postgres::PgStore` (cargo feature `postgres`): the service's own
//!   PostgreSQL database, three tables the SDK creates; its module docs
//!   give the DDL and every statement of the guard, for a participant
//!   written in another language.
//!
//! Both implement [`Store`](crate::participant::Store) (with the
//! reservation operations of their transaction,
//! [`Tx`](crate::participant::Tx)) and
//! [`Reservations`](crate::reservations::Reservations), with the same
//! semantics and errors: one participant's code reads the same on either.

#[cfg(feature = "postgres")]
pub mod postgres;
pub mod sled;
