//! Durable storage of transactions and their topics.
//!
//! The [`Store`] trait is everything the engine needs from a database. Its
//! contract (the [`conformance`] suite checks what an in-process test can:
//! atomicity, ordering, reopen, concurrency; crash durability is checked end
//! to end by the kill -9 tests of the workspace):
//!
//! * **Durable on return.** A write method returns `Ok` only after its
//!   change is on disk. Implementations batch concurrent writers into one
//!   flush (group commit) rather than skip the flush.
//! * **Atomic.** Each write method is all-or-nothing, in particular
//!   [`Store::append`]: the commands, the idempotency receipt and the updated
//!   transaction record are stored together or not at all.
//! * **Single writer per transaction.** The engine serialises writes to one
//!   transaction, so a store needs no compare-and-swap; writes to different
//!   transactions may run concurrently.
//! * **Ordered by id.** [`Store::scan`] returns records in id order; ids are
//!   UUIDv7, so that is the order of creation.
//! * **Loud on damage.** A record that does not decode is an
//!   [`Error::Corrupt`](crate::error::Error::Corrupt) naming the key, never
//!   skipped.
//!
//! The sled store ([`sled::SledStore`]) is the embedded default, made
//! durable by a write-ahead [`journal`] with group commit; a
//! PostgreSQL store fits the same trait (one SQL transaction per method).

pub mod conformance;
pub mod journal;
pub mod sled;

use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::engine::state::TxnRecord;
use crate::error::Result;
use crate::ids::{PartialId, TxnId};

/// A command as stored in a topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// Position in its topic, from 1, without gaps.
    pub sequence: u64,
    /// The command type name.
    pub kind: String,
    /// The entity key (may be empty).
    pub key: String,
    /// The opaque payload.
    pub payload: Vec<u8>,
}

/// What an append stored; returned again for a retried idempotent append.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendReceipt {
    /// Sequence of the batch's first command.
    pub first_sequence: u64,
    /// Sequence of the batch's last command.
    pub last_sequence: u64,
    /// Accounted bytes of the batch.
    pub bytes: u64,
    /// Digest of the batch's content (the first 8 bytes of a SHA-256 over
    /// every command), so a key reused for another batch is detected.
    pub digest: u64,
}

/// One append: the commands (already numbered) and the optional key.
#[derive(Clone, Debug)]
pub struct AppendBatch<'a> {
    /// The topic.
    pub partial_id: PartialId,
    /// The commands, numbered consecutively after the topic's last one.
    pub commands: &'a [CommandRecord],
    /// The client's idempotency key, with the receipt to remember for it.
    pub idempotency: Option<(&'a str, AppendReceipt)>,
}

/// Durable storage for the coordinator. See the module docs for the contract.
pub trait Store: Send + Sync + 'static {
    /// Writes (creates or replaces) a transaction record, and the partial-id
    /// index entries of all its participants: for a new transaction and
    /// after a participant was added.
    fn put_txn(&self, txn: &TxnRecord) -> impl Future<Output = Result<()>> + Send;

    /// Replaces a transaction record whose participants are the same as
    /// when it was last written with [`Store::put_txn`] (their statuses and
    /// counters may differ): the partial-id index is left as it is.
    fn update_txn(&self, txn: &TxnRecord) -> impl Future<Output = Result<()>> + Send;

    /// Atomically stores a batch of commands, the idempotency receipt, and
    /// `txn` (whose participant counters already include the batch; its
    /// participants are unchanged, as for [`Store::update_txn`]).
    fn append(&self, txn: &TxnRecord, batch: AppendBatch<'_>) -> impl Future<Output = Result<()>> + Send;

    /// Reads a transaction record.
    fn get_txn(&self, id: TxnId) -> impl Future<Output = Result<Option<TxnRecord>>> + Send;

    /// Finds the transaction a partial id belongs to.
    fn find_partial(&self, partial: PartialId) -> impl Future<Output = Result<Option<TxnId>>> + Send;

    /// Looks up the receipt of an earlier append with this idempotency key.
    fn find_receipt(&self, partial: PartialId, key: &str)
    -> impl Future<Output = Result<Option<AppendReceipt>>> + Send;

    /// Reads up to `limit` commands of a topic from sequence `from` on, in
    /// order.
    fn read_topic(
        &self,
        partial: PartialId,
        from: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<CommandRecord>>> + Send;

    /// Reads up to `limit` transaction records with ids greater than
    /// `after` (from the first when `None`), in id order.
    fn scan(&self, after: Option<TxnId>, limit: usize) -> impl Future<Output = Result<Vec<TxnRecord>>> + Send;

    /// Deletes a transaction with its partial index entries, topics and
    /// idempotency receipts. Deleting a missing transaction is not an error.
    fn delete_txn(&self, txn: &TxnRecord) -> impl Future<Output = Result<()>> + Send;
}
