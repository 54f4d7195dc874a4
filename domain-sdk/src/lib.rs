//! What a service links to take part in TCC composite transactions.
//!
//! * **Composite side** ([`composite`]): [`Coordinator::run`] begins a
//!   composite transaction, runs your async closure, and confirms when it
//!   returns `Ok`, cancels when it returns `Err` or panics.
//! * **Propagation** ([`propagation`]): tonic interceptors that carry the
//!   partial transaction in gRPC metadata, so a domain handler can ask
//!   [`propagation::partial_of`] whether it runs inside a composite
//!   transaction, and which partial.
//! * **Try phase** ([`publisher`]): typed [`Command`]s collected by a
//!   [`Publisher`] and sent in one idempotent append per request.
//! * **Participant side** ([`participant`], [`store`]): implement
//!   [`Participant`] for your store; the SDK's [`ParticipantService`]
//!   applies commit/rollback **exactly once**, recording each partial's
//!   outcome in your own database in the same local transaction as your
//!   changes: PostgreSQL (`store::postgres::PgStore`, cargo feature
//!   `postgres`) or embedded sled ([`store::sled::SledStore`]).
//! * **Reservations** ([`reservations`]): hold in try, consume at commit,
//!   release at rollback; a [`Reconciler`](reservations::Reconciler) settles
//!   holds whose delivery never came.
//! * **Registration** ([`registration`]): keep your endpoint registered with
//!   the coordinator while you run.
//!
//! # Example
//!
//! A "customers" service that reserves credit in its try and debits it at
//! commit, and a composite service that uses it:
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use serde::{Deserialize, Serialize};
//! use tcc_domain_sdk::participant::{Participant, PhaseTwo, TxResult};
//! use tcc_domain_sdk::reservations::Reservations;
//! use tcc_domain_sdk::store::sled::{SledStore, SledTx};
//! use tcc_domain_sdk::{Command, Coordinator, Publisher, propagation::PartialContext};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Debit { customer: String, amount: i64 }
//! impl Command for Debit { const TYPE: &'static str = "customers.Debit"; }
//!
//! struct Customers;
//! impl Participant for Customers {
//!     type Store = SledStore; // with PgStore, `tx` is a PgTx: the body reads the same
//!     async fn commit(&self, tx: &mut SledTx<'_>, call: &PhaseTwo) -> TxResult<()> {
//!         for c in &call.commands {
//!             let d: Debit = c.decode()?;
//!             tx.consume(&call.partial_id, &d.customer, d.amount).await?;
//!         }
//!         tx.release(&call.partial_id).await.map(|_| ()) // leftovers, if any
//!     }
//!     async fn rollback(&self, tx: &mut SledTx<'_>, call: &PhaseTwo) -> TxResult<()> {
//!         tx.release(&call.partial_id).await.map(|_| ())
//!     }
//! }
//!
//! /// The try, inside the customers service's request handler: reserve,
//! /// then publish; a definitive refusal releases the reservation.
//! async fn reserve(store: &SledStore, coordinator: &Coordinator, ctx: PartialContext,
//!                  customer: &str, amount: i64) -> Result<(), Box<dyn std::error::Error>> {
//!     let mut publisher = Publisher::new(coordinator, "customers", ctx.clone());
//!     publisher.publish(customer, &Debit { customer: customer.into(), amount })?;
//!     store.reserve_and_publish(&ctx, &[(customer.to_string(), amount)], publisher).await?;
//!     Ok(())
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SledStore::open(std::path::Path::new("customers-db"), &[])?;
//! let service = tcc_domain_sdk::ParticipantService::new(store.clone(), Arc::new(Customers));
//! // serve `service.into_server()` with tonic, next to your own API ...
//!
//! // The composite side: confirm if every try succeeded, cancel otherwise.
//! let coordinator = Coordinator::connect("http://127.0.0.1:50051").await?;
//! let (_, outcome) = coordinator
//!     .run(&["customers"], Duration::from_secs(10), Some(Duration::from_secs(5)), |txn| {
//!         let (store, coordinator) = (store.clone(), coordinator.clone());
//!         async move {
//!             let ctx = txn.partial("customers").map_err(|e| e.to_string())?;
//!             // normally: call the customers service with ctx in metadata
//!             reserve(&store, &coordinator, ctx, "alice", 30).await.map_err(|e| e.to_string())
//!         }
//!     })
//!     .await
//!     .map_err(|e| e.to_string())?;
//! println!("{:?}", outcome.state);
//! # Ok(()) }
//! ```

pub mod composite;
pub mod error;
pub mod participant;
pub mod propagation;
pub mod publisher;
pub mod registration;
pub mod reservations;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod tls;

pub use composite::{CompositeTransaction, Coordinator, Outcome};
pub use error::{Error, Result};
pub use participant::{Participant, Store};
pub use publisher::{Command, Publisher};
pub use service::ParticipantService;
/// The encoded descriptor set of `tcc.v1`, for a service's gRPC reflection.
pub use tcc_proto::FILE_DESCRIPTOR_SET as PROTO_DESCRIPTOR_SET;
pub use tcc_proto::v1 as proto;
