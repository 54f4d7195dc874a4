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
//! Each domain service keeps its own sled database, serves its API and
//! `tcc.v1.Participant` on one port, registers with the coordinator, and
//! runs a reconciler for holds whose delivery never came.
//!
//! Invariants a test can check at any time: per customer,
//! `available + held + debited` is what was seeded; per item,
//! `available + held + sold` likewise. Once settled: every order has exactly
//! one debit and one stock movement, and no hold remains.

pub mod customers;
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

/// A committed debit or stock movement as stored (pb types are not serde).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct MovementRecord {
    order_id: String,
    partial_id: String,
    key: String,
    amount: i64,
}

/// In a commit: records that `partial` moved `amount` of `key` for
/// `order_id`, in `tree` (one entry per order, partial and key).
pub fn record_movement(
    tx: &tcc_domain_sdk::participant::Tx<'_>,
    tree: &str,
    order_id: &str,
    partial: &str,
    key: &str,
    amount: i64,
) -> tcc_domain_sdk::participant::TxResult<()> {
    let record = MovementRecord { order_id: order_id.into(), partial_id: partial.into(), key: key.into(), amount };
    let id = format!("{order_id}/{partial}/{key}");
    tx.tree(tree)?.insert(id.as_bytes(), to_json(&record)?)?;
    Ok(())
}

/// Every movement recorded in `tree`.
pub fn movements(
    store: &tcc_domain_sdk::participant::LocalStore,
    tree: &str,
) -> Result<Vec<pb::Movement>, tonic::Status> {
    let mut out = Vec::new();
    for item in store.tree(tree)?.iter() {
        let (_, v) = item.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let m: MovementRecord = serde_json::from_slice(&v).map_err(|e| tonic::Status::data_loss(e.to_string()))?;
        out.push(pb::Movement { order_id: m.order_id, partial_id: m.partial_id, key: m.key, amount: m.amount });
    }
    Ok(out)
}

/// Encodes a record for a sled tree.
pub fn to_json<T: serde::Serialize>(v: &T) -> tcc_domain_sdk::participant::TxResult<Vec<u8>> {
    serde_json::to_vec(v).or_else(|e| tcc_domain_sdk::participant::abort(format!("cannot encode: {e}")))
}
