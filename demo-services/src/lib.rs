//! The demo shop, built only on the domain-sdk: a first real user of it.
//!
//! * `shop-customers`: credit. Reserved at try, debited at commit,
//!   released at rollback.
//! * `shop-inventory`: stock, the same pattern, plus prices.
//! * `shop-orders`: records orders; no reservation.
//! * `shop`: the composite service. `PlaceOrder` runs one composite
//!   transaction across the three.
//! * `shop-demo`: starts the coordinator and the four services, seeded,
//!   for a newcomer.
//!
//! Each domain service keeps its own database (sled in `--data-dir`, or
//! PostgreSQL with `--database-url`: see [`db`]), serves its API and
//! `tcc.v1.Participant` on one port, registers with the coordinator, and
//! runs a reconciler for holds whose delivery never came.
//!
//! Invariants a test can check at any time: per customer,
//! `available + held + debited` is what was seeded; per item,
//! `available + held + sold` likewise. Once settled: every order has exactly
//! one debit and one stock movement, and no hold remains.

pub mod customers;
pub mod db;
pub mod inventory;
pub mod orders;
pub mod pki;
pub mod runtime;
pub mod shop;

/// Messages, clients and servers of `shop.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("shop.v1");
}

/// The encoded descriptor set of `shop.v1`, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("shop_descriptor");

/// Checks an id (customer, sku): 1..=64 printable characters.
pub fn check_id(field: &str, id: &str) -> Result<(), tonic::Status> {
    if id.is_empty() || id.len() > 64 || id.chars().any(|c| c.is_control()) {
        return Err(tonic::Status::invalid_argument(format!("{field} must be 1..64 printable characters")));
    }
    Ok(())
}

/// The partial transaction of a try request, or FAILED_PRECONDITION.
pub fn require_partial<T>(
    request: &tonic::Request<T>,
) -> Result<tcc_domain_sdk::propagation::PartialContext, tonic::Status> {
    tcc_domain_sdk::propagation::partial_of(request).cloned().ok_or_else(|| {
        tonic::Status::failed_precondition(
            "this is a try operation: call it inside a composite transaction (tcc-partial-id metadata)",
        )
    })
}
