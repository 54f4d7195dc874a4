//! Identifiers: composite transaction ids and partial transaction ids.
//!
//! * [`TxnId`] is a UUIDv7: time-ordered, so the store's key order is the
//!   order of creation and listing by age needs no index.
//! * [`PartialId`] is a random UUIDv4 (122 random bits). It names one
//!   participant's topic and is the capability to append to it, so it must
//!   not be derivable from the transaction id.
//!
//! Both travel as hyphenated strings on the wire; parsing a malformed one is
//! a [`BadId`] that names the field (an `INVALID_ARGUMENT` at the API).
//!
//! New ids come from [`TxnId::from_parts`] and [`PartialId::from_random`],
//! so whoever creates them (the engine, through its injected entropy
//! source) decides where time and randomness come from.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A malformed id in a request: the message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadId(pub String);

type Result<T> = std::result::Result<T, BadId>;

/// A composite transaction id (UUIDv7).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TxnId(pub Uuid);

/// A partial transaction id (random UUIDv4).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PartialId(pub Uuid);

impl TxnId {
    /// A new, time-ordered id from the system clock and thread RNG.
    pub fn new() -> Self {
        TxnId(Uuid::now_v7())
    }

    /// A UUIDv7 from a creation time (unix ms) and 10 random bytes.
    pub fn from_parts(unix_ms: u64, random: [u8; 10]) -> Self {
        TxnId(uuid::Builder::from_unix_timestamp_millis(unix_ms, &random).into_uuid())
    }

    /// Parses the `transaction_id` field of a request.
    pub fn parse(field: &str, s: &str) -> Result<Self> {
        parse_uuid(field, s).map(TxnId)
    }
}

impl Default for TxnId {
    fn default() -> Self {
        Self::new()
    }
}

impl PartialId {
    /// A new, unguessable id from the thread RNG.
    pub fn new() -> Self {
        PartialId(Uuid::new_v4())
    }

    /// A UUIDv4 from 16 random bytes (its version bits are overwritten).
    pub fn from_random(random: [u8; 16]) -> Self {
        PartialId(uuid::Builder::from_random_bytes(random).into_uuid())
    }

    /// Parses the `partial_id` field of a request.
    pub fn parse(field: &str, s: &str) -> Result<Self> {
        parse_uuid(field, s).map(PartialId)
    }
}

impl Default for PartialId {
    fn default() -> Self {
        Self::new()
    }
}

fn parse_uuid(field: &str, s: &str) -> Result<Uuid> {
    if s.is_empty() {
        return Err(BadId(format!("{field} is required")));
    }
    // Only the hyphenated form is handed out; accept nothing else, and never
    // echo back more than a short prefix of garbage.
    if s.len() == 36 {
        if let Ok(u) = Uuid::try_parse(s) {
            return Ok(u);
        }
    }
    let shown: String = s.chars().take(40).collect();
    Err(BadId(format!("{field} {shown:?} is not a valid id (expected a hyphenated UUID)")))
}

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for PartialId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for PartialId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trips_and_rejects_garbage() {
        let id = TxnId::new();
        assert_eq!(TxnId::parse("transaction_id", &id.to_string()).ok(), Some(id));
        for bad in ["", "nope", "0000", &id.0.simple().to_string(), &"x".repeat(500)] {
            let err = TxnId::parse("transaction_id", bad).err();
            assert!(err.is_some(), "{bad:?} accepted");
        }
    }

    #[test]
    fn txn_ids_are_time_ordered() {
        let a = TxnId::new();
        let b = TxnId::new();
        assert!(a < b);
    }
}
