//! The gRPC layer: thin handlers that parse requests, call the engine and
//! convert the results. Validation of names and sizes lives in the engine
//! ([`crate::engine::validate`]) so that it holds for any transport; this
//! layer only parses ids and enums. Errors become `tonic::Status` through the
//! single `From<Error>` in [`status`]. [`console`] serves the web console
//! and its JSON API over the same engine operations.

pub mod admin;
pub mod console;
pub mod convert;
pub mod registry;
pub mod status;
pub mod topics;
pub mod transactions;
