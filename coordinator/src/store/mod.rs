//! Durable storage of transactions and their topics.
//!
//! The [`Store`] trait is everything the engine needs from a database, and
//! it is used as a trait object (`Arc<dyn Store>`): the backend is chosen at
//! run time, so a new backend adds a file here, not a type parameter
//! through every API type. Its contract (the [`conformance`] suite checks it
//! against every backend; crash durability is checked end to end by the
//! kill -9 tests of the workspace):
//!
//! * **Durable on return.** A write method returns `Ok` only after its
//!   change is on disk. Implementations batch concurrent writers into one
//!   flush (group commit) rather than skip the flush.
//! * **Atomic.** Each write method is all-or-nothing, in particular
//!   [`Store::append`]: the commands, the idempotency receipt and the updated
//!   transaction record are stored together or not at all.
//! * **Conditional: many writers, one winner.** Every transaction record
//!   carries a version ([`TxnRecord::version`]): 1 when created, one more
//!   with every write. A write of version N+1 succeeds only if the stored
//!   record is at version N ([`Store::create_txn`]: only if there is none);
//!   otherwise nothing is written and the writer gets
//!   [`Error::Conflict`](crate::error::Error::Conflict). So two writers (two
//!   coordinators, or a paused one that wakes up) that read the same
//!   version cannot both write: the loser reloads and decides again, and a
//!   decision is never overwritten. A version rather than an owner epoch,
//!   because it fences every stale writer, whoever it is, without a lease;
//!   leases for background work can build on top (an epoch is then one
//!   more condition). Conditions are checked inside the write's own
//!   atomic step, so they add no round trip and no sync.
//! * **Queries, not scans.** The engine asks for what it needs:
//!   [`Store::unfinished`], [`Store::due_deadlines`],
//!   [`Store::due_deliveries`], [`Store::list`] and [`Store::collectable`];
//!   each backend answers from an index ([`index::TxnIndex`] for the
//!   embedded stores, SQL indexes for a database).
//! * **Ordered by id.** Listings are in id order; ids are UUIDv7, so that is
//!   the order of creation.
//! * **Loud on damage.** A record that does not decode is an
//!   [`Error::Corrupt`](crate::error::Error::Corrupt) naming the key, never
//!   skipped.
//!
//! * **Registrations.** Endpoints registered through `Registry.Register`
//!   are stored with their lease ([`Store::put_endpoint`]), so a restart
//!   keeps them and every coordinator sharing the store sees them.
//!
//! ## Cluster stores: work ownership and fencing
//! A store shared by several coordinators ([`postgres::PgStore`]) adds
//! three rules, so that background work (deadlines, phase-2 delivery, GC)
//! is done by one coordinator at a time and a coordinator that was paused
//! cannot overwrite what another did meanwhile:
//!
//! 1. **Leases.** Each coordinator holds a lease in the store under its
//!    node id ([`Store::node`]), renewed well before it lapses. A lapsed
//!    lease is never renewed: the coordinator joins again under a new id.
//! 2. **Fenced writes.** Every write checks, inside its own atomic step and
//!    by the store's clock, that the writer's lease is live; otherwise it
//!    writes nothing and fails with
//!    [`Error::Fenced`](crate::error::Error::Fenced).
//! 3. **Owners.** Every write of a transaction makes the writer its owner.
//!    A transaction that is being delivered (CONFIRMING/CANCELLING) may be
//!    written only by its owner, or by anyone once the owner's lease has
//!    lapsed. The due-work queries return only the caller's own
//!    transactions and those whose owner's lease lapsed, and delivery
//!    starts with [`Store::claim`]. So when a coordinator dies, the others
//!    take over its work one lease period later, and never before.
//!
//! A single-process store ([`Store::node`] is `None`) owns everything and
//! needs none of this.
//!
//! Backends: [`sled::SledStore`] is the embedded default, made durable by a
//! write-ahead [`journal`] with group commit; [`memory::MemStore`] keeps
//! everything in memory (tests and the simulation); [`postgres::PgStore`]
//! is shared by a cluster of coordinators (one SQL statement per write,
//! `WHERE version = $n` and the rules above; concurrent writes share one
//! database transaction through [`group`], as the journal's share one
//! sync).

pub mod conformance;
pub mod group;
pub mod index;
pub mod integrity;
pub mod journal;
pub mod memory;
pub mod postgres;
pub mod sled;

use crate::error::Result;
use crate::model::{AppendReceipt, CommandRecord, PartialId, Registration, TxnId, TxnRecord, TxnState};

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

/// What [`Store::list`] selects.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    /// Only these states (all if empty).
    pub states: Vec<TxnState>,
    /// Only transactions created at or before this time (unix ms).
    pub created_until_ms: i64,
    /// Start after this id (from the first if `None`).
    pub after: Option<TxnId>,
    /// At most this many records.
    pub limit: usize,
}

impl ListQuery {
    /// Whether `txn` is selected (state and age; not the position).
    pub fn matches(&self, txn: &TxnRecord) -> bool {
        (self.states.is_empty() || self.states.contains(&txn.state)) && txn.created_ms <= self.created_until_ms
    }
}

/// A page of [`Store::list`].
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    /// Matching transactions in id order.
    pub transactions: Vec<TxnRecord>,
    /// Where to continue, if there may be more: a full page, or a backend
    /// that bounds the work of one call and stopped early.
    pub next: Option<TxnId>,
}

/// Durable storage for the coordinator. See the module docs for the contract.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates a transaction record, which must have version 1, with the
    /// partial-id index entries of its participants. Conflict if a record
    /// with that id exists.
    async fn create_txn(&self, txn: &TxnRecord) -> Result<()>;

    /// Replaces the record at version `txn.version - 1` with `txn`.
    /// `enlisted` is a participant added by this change, whose partial-id
    /// index entry is written with it.
    async fn update_txn(&self, txn: &TxnRecord, enlisted: Option<PartialId>) -> Result<()>;

    /// Atomically stores a batch of commands, the idempotency receipt, and
    /// `txn` (whose participant counters already include the batch), under
    /// the same condition as [`Store::update_txn`].
    async fn append(&self, txn: &TxnRecord, batch: AppendBatch<'_>) -> Result<()>;

    /// Deletes a finished transaction with its partial index entries, topics
    /// and idempotency receipts, if the stored record is still at
    /// `txn.version`. Deleting a missing transaction is not an error.
    async fn delete_txn(&self, txn: &TxnRecord) -> Result<()>;

    /// Garbage collection: deletes those of `txns` whose stored record is
    /// still at their version, as [`Store::delete_txn`] does, and skips the
    /// others (changed since, or gone). Returns how many were deleted.
    /// Backends may do it in one write.
    async fn delete_txns(&self, txns: &[TxnRecord]) -> Result<usize> {
        let mut n = 0;
        for txn in txns {
            if self.get_txn(txn.id).await?.is_none() {
                continue;
            }
            match self.delete_txn(txn).await {
                Ok(()) => n += 1,
                Err(crate::error::Error::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Reads a transaction record.
    async fn get_txn(&self, id: TxnId) -> Result<Option<TxnRecord>>;

    /// Finds the transaction a partial id belongs to.
    async fn find_partial(&self, partial: PartialId) -> Result<Option<TxnId>>;

    /// Looks up the receipt of an earlier append with this idempotency key.
    async fn find_receipt(&self, partial: PartialId, key: &str) -> Result<Option<AppendReceipt>>;

    /// Reads up to `limit` commands of a topic from sequence `from` on, in
    /// order.
    async fn read_topic(&self, partial: PartialId, from: u64, limit: usize) -> Result<Vec<CommandRecord>>;

    /// Up to `limit` records that are not CONFIRMED/CANCELLED, with ids
    /// greater than `after`, in id order (recovery).
    async fn unfinished(&self, after: Option<TxnId>, limit: usize) -> Result<Vec<TxnId>>;

    /// Up to `limit` ACTIVE transactions whose deadline is at or before
    /// `now_ms`, earliest deadline first; and the earliest deadline after
    /// `now_ms`, if any (when to look again).
    async fn due_deadlines(&self, now_ms: i64, limit: usize) -> Result<(Vec<TxnId>, Option<i64>)>;

    /// Up to `limit` CONFIRMING/CANCELLING transactions with a pending
    /// participant due at or before `until_ms`, earliest first.
    async fn due_deliveries(&self, until_ms: i64, limit: usize) -> Result<Vec<TxnId>>;

    /// Lists records by state and age, in id order, in pages.
    async fn list(&self, query: &ListQuery) -> Result<ListPage>;

    /// How many transactions are in each state that is not CONFIRMED or
    /// CANCELLED (for metrics): exact, however many there are. States with
    /// none may be left out.
    async fn count_unfinished(&self) -> Result<Vec<(TxnState, u64)>>;

    /// Up to `limit` CONFIRMED/CANCELLED records that finished at or before
    /// `finished_until_ms`, earliest first; and the earliest finish time
    /// after it, if any.
    async fn collectable(&self, finished_until_ms: i64, limit: usize) -> Result<(Vec<TxnRecord>, Option<i64>)>;

    /// Stores (or renews) a registration, keyed by service and endpoint.
    async fn put_endpoint(&self, registration: &Registration) -> Result<()>;

    /// Removes a registration; whether there was one.
    async fn remove_endpoint(&self, service: &str, endpoint: &str) -> Result<bool>;

    /// Every stored registration (expired ones included), by service and
    /// endpoint.
    async fn endpoints(&self) -> Result<Vec<Registration>>;

    /// Removes the registrations whose lease ended at or before
    /// `until_ms` (checked at the time of the write, so one renewed
    /// meanwhile stays). Returns how many were removed.
    async fn remove_expired_endpoints(&self, until_ms: i64) -> Result<usize>;

    /// This coordinator's node id in a store shared by several (see
    /// "Cluster stores"); `None` for a single-process store.
    fn node(&self) -> Option<uuid::Uuid> {
        None
    }

    /// Before delivering `txn` (as read, at `txn.version`): makes this
    /// coordinator its owner unless another live one is. Returns the
    /// record's version afterwards (one more if ownership moved), or `None`
    /// if another live coordinator owns it. A single-process store owns
    /// everything: `Some(txn.version)`.
    async fn claim(&self, txn: &TxnRecord) -> Result<Option<u64>> {
        Ok(Some(txn.version))
    }

    /// Gives up this coordinator's lease (graceful shutdown), so the others
    /// take over its work at once instead of one lease period later.
    async fn close(&self) {}

    /// Resolves, with the cause, once the store has failed for good and
    /// takes no more requests until a restart (the fail-stop of the
    /// embedded store); never, for a store whose failures are transient.
    /// The health service answers NOT_SERVING from then on.
    async fn failed(&self) -> String {
        std::future::pending().await
    }
}
