//! The cluster store, on PostgreSQL: several coordinators share one
//! database, and any of them answers any request.
//!
//! ## Tables
//! | table          | key                  | holds                                          |
//! |----------------|----------------------|------------------------------------------------|
//! | `tcc_schema`   |                      | the schema version ([`SCHEMA_VERSION`])        |
//! | `tcc_txn`      | `id`                 | version, owner, query columns, the record      |
//! | `tcc_partial`  | `partial`            | the transaction of a partial id                |
//! | `tcc_command`  | `partial, seq`       | one command of a topic                         |
//! | `tcc_receipt`  | `partial, key`       | an append's idempotency receipt                |
//! | `tcc_endpoint` | `service, endpoint`  | a registration and its lease                   |
//! | `tcc_node`     | `id`                 | a coordinator's lease (`expires_at`)           |
//!
//! A transaction record is stored as postcard (`record`), beside the
//! columns the queries filter and sort by (state, deadline of an ACTIVE
//! one, due time of a delivering one, finish time of a finished one), each
//! with a partial index. Commands are plain columns, so an operator can
//! read a topic with `psql`.
//!
//! ## One statement per write, writes grouped into transactions
//! Each write method is one SQL statement (data-modifying CTEs), so it is
//! atomic by itself. Its conditions are in its `WHERE`: the version it
//! replaces, the writer's lease (`FENCE`), and for a transaction being
//! delivered, the owner (this writer, or one whose lease lapsed:
//! `OWNER_LAPSED`). Rows it would write under a failed
//! condition are never written: every dependent insert or delete is
//! guarded by `EXISTS (SELECT 1 FROM t)`, `t` being the conditional
//! update.
//!
//! Concurrent writes share one database transaction (group commit,
//! [`super::group`]): a writer task sends `BEGIN`, the statements (sorted
//! by transaction id) and `COMMIT` pipelined, and answers each write only
//! once `COMMIT` returned, so every acknowledged write is durable
//! (`synchronous_commit` is the server's; keep it `on`). A statement that
//! fails aborts its group; every write of the group then runs again alone,
//! so one bad write fails only itself. A lone write runs alone at once.
//! Concurrent reads of records, and of topics, likewise share one query
//! each (`id = ANY($1)`; a `LATERAL` join per topic read).
//!
//! Row locks serialise concurrent writers of one transaction, and a lock
//! taken in a group is held until the group commits; under READ COMMITTED
//! a waiting `UPDATE ... WHERE version = $n` re-reads the row after the
//! first commits, finds the version moved, and writes nothing. So
//! operations on one transaction are serialised across nodes and exactly
//! one decision wins. Groups take their row locks in transaction-id order,
//! so two groups (of one coordinator or of two) cannot deadlock; the
//! engine never has two writes of one transaction in flight, so no group
//! holds two versions of one record. Grouping changes no outcome, only the
//! number of commits: a fenced write is refused inside its group as it
//! would be alone, and a takeover's claim waits for the group's row lock,
//! then finds the version moved. (A write's lease is checked when its
//! statement runs and the group commits a little later, so a lease that
//! lapses in between still lets that write land; nothing is overwritten,
//! since whoever takes over writes through the same row and version.)
//!
//! Whether a group committed is decided by the server, not by the client:
//! the last statement before `COMMIT` is a sentinel `SELECT`, which fails
//! ("current transaction is aborted") if anything before it aborted the
//! transaction. The group runs at READ COMMITTED whatever the server's
//! default. A job whose caller gave up while it was queued is not run,
//! and at most [`super::group::QUEUE_LIMIT`] wait per queue (more are
//! UNAVAILABLE).

//! ## Leases, fencing and ownership
//! The scheme of the store module ("Cluster stores") with the database's
//! clock (`clock_timestamp()`), so the coordinators' clocks play no part in
//! who may write: a coordinator inserts its `tcc_node` row at start and a
//! background task renews it every third of the lease, on a connection of
//! its own (requests holding every pooled connection cannot delay it),
//! each attempt bounded by a third of the lease and a failed one retried
//! after a tenth; renewal only extends a lease that has not lapsed (`WHERE
//! expires_at > clock_timestamp()`), so a coordinator that finds its lease
//! lapsed takes a new node id (its in-flight writes under the old id are
//! refused). Graceful shutdown ends the lease at once ([`Store::close`]).
//!
//! ## Faults
//! A database that cannot be reached, restarts or refuses connections gives
//! [`Error::Unavailable`] naming the database; the pool reconnects by
//! itself when it is back. Unless the URL says otherwise, connections use
//! TCP keepalives (a dead peer is noticed in about 11 s), a 10 s TCP user
//! timeout and a 30 s `statement_timeout`, so no call waits on a dead
//! database host for the kernel's 15 minutes. A connection lost while a write was in flight
//! (during its commit, say) leaves its outcome unknown: the error says so,
//! and that retrying is safe (decisions and enlistments are idempotent,
//! appends with an idempotency key are, and a write that did land makes
//! the retry find the next version).

use std::str::FromStr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;
use tracing::{info, warn};
use uuid::Uuid;

use super::group::{Executor, Group};
use super::{AppendBatch, ListPage, ListQuery, Store};
use crate::error::{Error, Result};
use crate::lock;
use crate::model::{AppendReceipt, CommandRecord, PartialId, Registration, TxnId, TxnRecord, TxnState};

/// The schema version this coordinator creates and understands.
pub const SCHEMA_VERSION: i32 = 1;

/// Connections per coordinator. PostgreSQL commits concurrent transactions
/// with one WAL flush (group commit), so throughput grows with the number
/// of writers in flight.
const POOL_SIZE: usize = 32;

/// Writer tasks of the group commit ([`super::group`]): database
/// transactions of writes this coordinator has in flight at once. Fewer
/// writers make larger groups: while they are busy, writes queue up and go
/// together in the next. Two, because on the 2-core benchmark machine two
/// gave more transactions per second than one or four (BENCHMARKS.md).
const WRITERS: usize = 2;

/// Tasks of each kind of grouped read (records, topics): one query of each
/// kind in flight at a time, carrying every read that queued meanwhile.
const READERS: usize = 1;

/// Most writes in one database transaction, or reads in one query.
const MAX_BATCH: usize = 64;

/// How long a request waits for a connection, and for a new connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Key of the advisory lock that serialises migrations of coordinators
/// starting together.
const MIGRATION_LOCK: i64 = 0x0074_6363_5f6d_6967; // "tcc_mig"

/// The migrations, in order: entry `i` brings the schema to version `i + 1`.
const MIGRATIONS: [&str; 1] = [r#"
CREATE TABLE tcc_txn (
    id uuid PRIMARY KEY,
    version bigint NOT NULL,
    state smallint NOT NULL,
    owner uuid,
    created_ms bigint NOT NULL,
    deadline_ms bigint,
    due_ms bigint,
    finished_ms bigint,
    record bytea NOT NULL
);
CREATE INDEX tcc_txn_deadline ON tcc_txn (deadline_ms) WHERE deadline_ms IS NOT NULL;
CREATE INDEX tcc_txn_due ON tcc_txn (due_ms) WHERE due_ms IS NOT NULL;
CREATE INDEX tcc_txn_finished ON tcc_txn (finished_ms) WHERE finished_ms IS NOT NULL;
CREATE INDEX tcc_txn_unfinished ON tcc_txn (id) WHERE state NOT IN (2, 4);
CREATE TABLE tcc_partial (partial uuid PRIMARY KEY, txn uuid NOT NULL);
CREATE INDEX tcc_partial_txn ON tcc_partial (txn);
CREATE TABLE tcc_command (
    partial uuid NOT NULL,
    seq bigint NOT NULL,
    kind text NOT NULL,
    key text NOT NULL,
    payload bytea NOT NULL,
    PRIMARY KEY (partial, seq)
);
CREATE TABLE tcc_receipt (
    partial uuid NOT NULL,
    key text NOT NULL,
    first_seq bigint NOT NULL,
    last_seq bigint NOT NULL,
    bytes bigint NOT NULL,
    digest bigint NOT NULL,
    PRIMARY KEY (partial, key)
);
CREATE TABLE tcc_endpoint (
    service text NOT NULL,
    endpoint text NOT NULL,
    expires_ms bigint NOT NULL,
    PRIMARY KEY (service, endpoint)
);
CREATE TABLE tcc_node (
    id uuid PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at timestamptz NOT NULL
);
"#];

/// The writer's lease is live (`$2` is the writer's node id).
const FENCE: &str = "EXISTS (SELECT 1 FROM tcc_node WHERE id = $2::uuid AND expires_at > clock_timestamp())";

/// The owner of `t` is no live coordinator.
const OWNER_LAPSED: &str =
    "NOT EXISTS (SELECT 1 FROM tcc_node n WHERE n.id = t.owner AND n.expires_at > clock_timestamp())";

/// Stable codes of the states in the `state` column.
fn state_code(s: TxnState) -> i16 {
    match s {
        TxnState::Active => 0,
        TxnState::Confirming => 1,
        TxnState::Confirmed => 2,
        TxnState::Cancelling => 3,
        TxnState::Cancelled => 4,
        TxnState::FailedToConfirm => 5,
        TxnState::FailedToCancel => 6,
    }
}

/// This coordinator's identity in the cluster.
struct Node {
    id: Mutex<Uuid>,
    lease: Duration,
}

impl Node {
    fn id(&self) -> Uuid {
        *lock(&self.id)
    }
}

/// The PostgreSQL [`Store`]. See the module docs.
pub struct PgStore {
    pool: Pool,
    writes: Group<Writes>,
    txn_reads: Group<TxnReads>,
    topic_reads: Group<TopicReads>,
    node: Arc<Node>,
    renewal: tokio::task::JoinHandle<()>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// The query columns of a record, as bound parameters.
struct Columns {
    state: i16,
    deadline: Option<i64>,
    due: Option<i64>,
    finished: Option<i64>,
    record: Vec<u8>,
}

impl Columns {
    fn of(txn: &TxnRecord) -> Result<Self> {
        Ok(Columns {
            state: state_code(txn.state),
            deadline: (txn.state == TxnState::Active).then_some(txn.deadline_ms),
            due: txn.delivery_due_ms(),
            finished: txn.state.is_finished().then_some(txn.finished_ms),
            record: txn.encode().map_err(Error::Storage)?,
        })
    }
}

impl PgStore {
    /// Connects to `url`, creates or migrates the schema, and takes a lease
    /// of `lease` under a new node id (renewed in the background until the
    /// store is dropped).
    pub async fn connect(url: &str, lease: Duration) -> Result<Self> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| Error::invalid(format!("the database URL is not a valid PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("tcc-coordinator");
        }
        // A dead database host or a partition is noticed within seconds
        // (not the kernel's 15 minutes), and no statement waits forever.
        if config.get_keepalives_interval().is_none() {
            config.keepalives_idle(Duration::from_secs(5));
            config.keepalives_interval(Duration::from_secs(2));
            config.keepalives_retries(3);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(Duration::from_secs(10));
        }
        if config.get_options().is_none() {
            config.options("-c statement_timeout=30000");
        }
        let manager =
            Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Storage(format!("cannot set up the database connection pool: {e}")))?;
        migrate(&pool).await?;
        let node = Arc::new(Node { id: Mutex::new(Uuid::new_v4()), lease });
        let lease_client = lease_connection(&config).await?;
        join(&lease_client, &node).await?;
        let renewal = tokio::spawn(renew(config, Some(lease_client), node.clone()));
        let writes = Group::start(Arc::new(Writes { pool: pool.clone() }), WRITERS, MAX_BATCH);
        let txn_reads = Group::start(Arc::new(TxnReads { pool: pool.clone() }), READERS, MAX_BATCH);
        let topic_reads = Group::start(Arc::new(TopicReads { pool: pool.clone() }), READERS, MAX_BATCH);
        Ok(PgStore { pool, writes, txn_reads, topic_reads, node, renewal })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_error)
    }

    /// The latest time the stored transactions hold (the newest's creation,
    /// by its time-ordered id, and the latest finish, both by index): a
    /// coordinator's time must not start before it (see
    /// [`SteadyClock`](crate::clock::SteadyClock)).
    pub async fn latest_ms(&self) -> Result<Option<i64>> {
        let sql = "SELECT greatest((SELECT created_ms FROM tcc_txn ORDER BY id DESC LIMIT 1), \
                   (SELECT max(finished_ms) FROM tcc_txn))";
        let client = self.client().await?;
        let row = client.query_one(sql, &[]).await.map_err(read_error)?;
        row.try_get(0).map_err(read_error)
    }

    /// Why a conditional write of `id` by `node` wrote nothing.
    async fn refusal(&self, id: TxnId, node: Uuid, expected: u64) -> Error {
        let sql = "SELECT (SELECT version FROM tcc_txn WHERE id = $1), \
                   EXISTS (SELECT 1 FROM tcc_node WHERE id = $2 AND expires_at > clock_timestamp()), \
                   (SELECT owner FROM tcc_txn WHERE id = $1)";
        let found = async {
            let client = self.client().await?;
            let row = client.query_one(sql, &[&id.0, &node]).await.map_err(read_error)?;
            let version: Option<i64> = row.try_get(0).map_err(read_error)?;
            let live: bool = row.try_get(1).map_err(read_error)?;
            let owner: Option<Uuid> = row.try_get(2).map_err(read_error)?;
            Ok::<_, Error>((version.unwrap_or(0) as u64, live, owner))
        };
        match found.await {
            Err(e) => e,
            Ok((_, false, _)) => lapsed(node),
            Ok((found, true, _)) if found != expected => Error::Conflict { txn: id, expected, found },
            Ok((_, true, owner)) => Error::Fenced(format!(
                "transaction {id} is being delivered by coordinator {}; this one leaves it",
                owner.map_or_else(|| "?".to_string(), |o| o.to_string())
            )),
        }
    }

    /// The record write shared by update and append: `$1` id, `$2` node,
    /// `$3` new version, `$4..$8` columns, `$9` partial ids to index.
    fn update_params(txn: &TxnRecord, node: Uuid, partials: Vec<Uuid>) -> Result<Vec<Param>> {
        let c = Columns::of(txn)?;
        Ok(vec![
            Box::new(txn.id.0),
            Box::new(node),
            Box::new(txn.version as i64),
            Box::new(c.state),
            Box::new(c.deadline),
            Box::new(c.due),
            Box::new(c.finished),
            Box::new(c.record),
            Box::new(partials),
        ])
    }
}

/// The conditional record write of update and append, as the CTEs `t`
/// (the record) and `p` (index entries of enlisted partial ids, `$9`);
/// see [`PgStore::update_params`].
fn update_ctes() -> String {
    format!(
        "t AS (UPDATE tcc_txn t SET version = $3::bigint, state = $4::smallint, owner = $2::uuid, \
         deadline_ms = $5::bigint, due_ms = $6::bigint, finished_ms = $7::bigint, record = $8::bytea \
         WHERE t.id = $1::uuid AND t.version = $3::bigint - 1 AND {FENCE} \
         AND (t.state NOT IN (1, 3) OR t.owner = $2 OR {OWNER_LAPSED}) RETURNING t.id), \
         p AS (INSERT INTO tcc_partial (partial, txn) SELECT x, $1 FROM unnest($9::uuid[]) AS x \
         WHERE EXISTS (SELECT 1 FROM t))"
    )
}

/// [`Store::create_txn`]: `$1` id, `$2` node, `$3` state, `$4` created,
/// `$5..$8` columns, `$9` the participants' partial ids.
static CREATE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH t AS (INSERT INTO tcc_txn (id, version, state, owner, created_ms, deadline_ms, due_ms, finished_ms, record) \
         SELECT $1::uuid, 1, $3::smallint, $2::uuid, $4::bigint, $5::bigint, $6::bigint, $7::bigint, $8::bytea \
         WHERE {FENCE} ON CONFLICT (id) DO NOTHING RETURNING id), \
         p AS (INSERT INTO tcc_partial (partial, txn) SELECT x, $1 FROM unnest($9::uuid[]) AS x \
         WHERE EXISTS (SELECT 1 FROM t)) \
         SELECT count(*) FROM t"
    )
});

/// [`Store::update_txn`]: [`update_ctes`].
static UPDATE_SQL: LazyLock<String> = LazyLock::new(|| format!("WITH {} SELECT count(*) FROM t", update_ctes()));

/// [`Store::append`]: [`update_ctes`], then `$10` the partial, `$11..$14`
/// the commands' columns, `$15..$19` the receipt (none if `$15` is null).
static APPEND_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {}, \
         c AS (INSERT INTO tcc_command (partial, seq, kind, key, payload) \
         SELECT $10::uuid, s, k, ky, pl FROM unnest($11::bigint[], $12::text[], $13::text[], $14::bytea[]) AS x(s, k, ky, pl) \
         WHERE EXISTS (SELECT 1 FROM t)), \
         r AS (INSERT INTO tcc_receipt (partial, key, first_seq, last_seq, bytes, digest) \
         SELECT $10, $15, $16::bigint, $17::bigint, $18::bigint, $19::bigint \
         WHERE $15::text IS NOT NULL AND EXISTS (SELECT 1 FROM t)) \
         SELECT count(*) FROM t",
        update_ctes()
    )
});

/// [`Store::delete_txn`]: `$1` id, `$2` node, `$3` version, `$4` the
/// participants' partial ids.
static DELETE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH t AS (DELETE FROM tcc_txn t WHERE t.id = $1::uuid AND t.version = $3::bigint AND {FENCE} \
         AND (t.state NOT IN (1, 3) OR t.owner = $2 OR {OWNER_LAPSED}) RETURNING t.id), \
         p AS (DELETE FROM tcc_partial WHERE partial = ANY($4::uuid[]) AND EXISTS (SELECT 1 FROM t)), \
         c AS (DELETE FROM tcc_command WHERE partial = ANY($4::uuid[]) AND EXISTS (SELECT 1 FROM t)), \
         r AS (DELETE FROM tcc_receipt WHERE partial = ANY($4::uuid[]) AND EXISTS (SELECT 1 FROM t)) \
         SELECT count(*) FROM t"
    )
});

#[async_trait::async_trait]
impl Store for PgStore {
    async fn create_txn(&self, txn: &TxnRecord) -> Result<()> {
        if txn.version != 1 {
            return Err(Error::Storage(format!("a new transaction record has version 1, not {}", txn.version)));
        }
        let c = Columns::of(txn)?;
        let node = self.node.id();
        let partials: Vec<Uuid> = txn.participants.iter().map(|p| p.partial_id.0).collect();
        let params: Vec<Param> = vec![
            Box::new(txn.id.0),
            Box::new(node),
            Box::new(c.state),
            Box::new(txn.created_ms),
            Box::new(c.deadline),
            Box::new(c.due),
            Box::new(c.finished),
            Box::new(c.record),
            Box::new(partials),
        ];
        let written = self.writes.submit(Write { key: txn.id.0, sql: CREATE_SQL.as_str(), params }).await?;
        if written { Ok(()) } else { Err(self.refusal(txn.id, node, 0).await) }
    }

    async fn update_txn(&self, txn: &TxnRecord, enlisted: Option<PartialId>) -> Result<()> {
        let node = self.node.id();
        let partials: Vec<Uuid> = enlisted.map(|p| p.0).into_iter().collect();
        let params = Self::update_params(txn, node, partials)?;
        if self.writes.submit(Write { key: txn.id.0, sql: UPDATE_SQL.as_str(), params }).await? {
            Ok(())
        } else {
            Err(self.refusal(txn.id, node, txn.version.saturating_sub(1)).await)
        }
    }

    async fn append(&self, txn: &TxnRecord, batch: AppendBatch<'_>) -> Result<()> {
        let node = self.node.id();
        let mut params = Self::update_params(txn, node, Vec::new())?;
        let seqs: Vec<i64> = batch.commands.iter().map(|c| c.sequence as i64).collect();
        let kinds: Vec<String> = batch.commands.iter().map(|c| c.kind.clone()).collect();
        let keys: Vec<String> = batch.commands.iter().map(|c| c.key.clone()).collect();
        let payloads: Vec<Vec<u8>> = batch.commands.iter().map(|c| c.payload.clone()).collect();
        let (key, receipt) = match batch.idempotency {
            Some((k, r)) => (Some(k.to_string()), Some(r)),
            None => (None, None),
        };
        let r = |f: fn(&AppendReceipt) -> u64| receipt.as_ref().map_or(0, f) as i64;
        params.extend::<[Param; 10]>([
            Box::new(batch.partial_id.0),
            Box::new(seqs),
            Box::new(kinds),
            Box::new(keys),
            Box::new(payloads),
            Box::new(key),
            Box::new(r(|r| r.first_sequence)),
            Box::new(r(|r| r.last_sequence)),
            Box::new(r(|r| r.bytes)),
            Box::new(r(|r| r.digest)),
        ]);
        let written = self.writes.submit(Write { key: txn.id.0, sql: APPEND_SQL.as_str(), params }).await?;
        crate::failpoint::crash_point("append-unflushed");
        if written { Ok(()) } else { Err(self.refusal(txn.id, node, txn.version.saturating_sub(1)).await) }
    }

    async fn delete_txn(&self, txn: &TxnRecord) -> Result<()> {
        let node = self.node.id();
        let version = txn.version as i64;
        let partials: Vec<Uuid> = txn.participants.iter().map(|p| p.partial_id.0).collect();
        let params: Vec<Param> = vec![Box::new(txn.id.0), Box::new(node), Box::new(version), Box::new(partials)];
        if self.writes.submit(Write { key: txn.id.0, sql: DELETE_SQL.as_str(), params }).await? {
            return Ok(());
        }
        match self.refusal(txn.id, node, txn.version).await {
            Error::Conflict { found: 0, .. } => Ok(()), // already gone
            e => Err(e),
        }
    }

    async fn delete_txns(&self, txns: &[TxnRecord]) -> Result<usize> {
        let node = self.node.id();
        let ids: Vec<Uuid> = txns.iter().map(|t| t.id.0).collect();
        let versions: Vec<i64> = txns.iter().map(|t| t.version as i64).collect();
        let sql = format!(
            "WITH v AS (SELECT * FROM unnest($1::uuid[], $3::bigint[]) AS v(id, version)), \
             t AS (DELETE FROM tcc_txn t USING v WHERE t.id = v.id AND t.version = v.version AND {FENCE} \
             AND (t.state NOT IN (1, 3) OR t.owner = $2 OR {OWNER_LAPSED}) RETURNING t.id), \
             c AS (DELETE FROM tcc_command WHERE partial IN \
             (SELECT partial FROM tcc_partial WHERE txn IN (SELECT id FROM t))), \
             r AS (DELETE FROM tcc_receipt WHERE partial IN \
             (SELECT partial FROM tcc_partial WHERE txn IN (SELECT id FROM t))), \
             p AS (DELETE FROM tcc_partial WHERE txn IN (SELECT id FROM t)) \
             SELECT count(*) FROM t"
        );
        let client = self.client().await?;
        let stmt = client.prepare_cached(&sql).await.map_err(read_error)?;
        let row = client.query_one(&stmt, &[&ids, &node, &versions]).await.map_err(write_error)?;
        let n: i64 = row.try_get(0).map_err(read_error)?;
        if n == 0 && !txns.is_empty() {
            // Nothing deleted: say why if it is this node's lease.
            let sql = "SELECT EXISTS (SELECT 1 FROM tcc_node WHERE id = $1 AND expires_at > clock_timestamp())";
            let live = client.query_one(sql, &[&node]).await;
            if live.is_ok_and(|r| !r.get::<_, bool>(0)) {
                return Err(lapsed(node));
            }
        }
        Ok(n as usize)
    }

    async fn get_txn(&self, id: TxnId) -> Result<Option<TxnRecord>> {
        self.txn_reads.submit(id).await
    }

    async fn find_partial(&self, partial: PartialId) -> Result<Option<TxnId>> {
        Ok(self.ids("SELECT txn FROM tcc_partial WHERE partial = $1", &[&partial.0]).await?.first().copied())
    }

    async fn find_receipt(&self, partial: PartialId, key: &str) -> Result<Option<AppendReceipt>> {
        let sql = "SELECT first_seq, last_seq, bytes, digest FROM tcc_receipt WHERE partial = $1 AND key = $2";
        let rows = self.rows(sql, &[&partial.0, &key]).await?;
        let Some(row) = rows.first() else { return Ok(None) };
        let get = |i: usize| row.try_get::<_, i64>(i).map(|v| v as u64).map_err(read_error);
        Ok(Some(AppendReceipt { first_sequence: get(0)?, last_sequence: get(1)?, bytes: get(2)?, digest: get(3)? }))
    }

    async fn read_topic(&self, partial: PartialId, from: u64, limit: usize) -> Result<Vec<CommandRecord>> {
        let from = from.min(i64::MAX as u64) as i64;
        self.topic_reads.submit(TopicRead { partial: partial.0, from, limit: sql_limit(limit) }).await
    }

    async fn unfinished(&self, after: Option<TxnId>, limit: usize) -> Result<Vec<TxnId>> {
        let sql = "SELECT id FROM tcc_txn WHERE state NOT IN (2, 4) AND id > $1 ORDER BY id LIMIT $2";
        self.ids(sql, &[&after.map_or(Uuid::nil(), |a| a.0), &sql_limit(limit)]).await
    }

    async fn due_deadlines(&self, now_ms: i64, limit: usize) -> Result<(Vec<TxnId>, Option<i64>)> {
        let node = self.node.id();
        let sql = format!(
            "SELECT id FROM tcc_txn t WHERE deadline_ms <= $1 AND (t.owner = $2 OR {OWNER_LAPSED}) \
             ORDER BY deadline_ms, id LIMIT $3"
        );
        let ids = self.ids(&sql, &[&now_ms, &node, &sql_limit(limit)]).await?;
        let next = self.min("SELECT min(deadline_ms) FROM tcc_txn WHERE deadline_ms > $1", now_ms).await?;
        Ok((ids, next))
    }

    async fn due_deliveries(&self, until_ms: i64, limit: usize) -> Result<Vec<TxnId>> {
        let node = self.node.id();
        let sql = format!(
            "SELECT id FROM tcc_txn t WHERE due_ms <= $1 AND (t.owner = $2 OR {OWNER_LAPSED}) \
             ORDER BY due_ms, id LIMIT $3"
        );
        self.ids(&sql, &[&until_ms, &node, &sql_limit(limit)]).await
    }

    async fn count_unfinished(&self) -> Result<Vec<(TxnState, u64)>> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT state, count(*) FROM tcc_txn WHERE state NOT IN (2, 4) GROUP BY state", &[])
            .await
            .map_err(read_error)?;
        let mut counts = Vec::new();
        for row in rows {
            let code: i16 = row.try_get(0).map_err(read_error)?;
            let n: i64 = row.try_get(1).map_err(read_error)?;
            let state = TxnState::ALL.into_iter().find(|s| state_code(*s) == code).ok_or_else(|| Error::Corrupt {
                key: "tcc_txn.state".to_string(),
                cause: format!("unknown state code {code}"),
            })?;
            counts.push((state, n.max(0) as u64));
        }
        Ok(counts)
    }

    async fn list(&self, q: &ListQuery) -> Result<ListPage> {
        let limit = q.limit.max(1);
        let states: Vec<i16> = q.states.iter().map(|s| state_code(*s)).collect();
        let after = q.after.map_or(Uuid::nil(), |a| a.0);
        let sql = "SELECT version, record, id FROM tcc_txn WHERE (cardinality($1::smallint[]) = 0 OR state = ANY($1)) \
                   AND created_ms <= $2 AND id > $3 ORDER BY id LIMIT $4";
        let rows = self.rows(sql, &[&states, &q.created_until_ms, &after, &sql_limit(limit)]).await?;
        let mut page = ListPage { transactions: records(&rows)?, next: None };
        if page.transactions.len() == limit {
            page.next = page.transactions.last().map(|t| t.id);
        }
        Ok(page)
    }

    async fn collectable(&self, finished_until_ms: i64, limit: usize) -> Result<(Vec<TxnRecord>, Option<i64>)> {
        let node = self.node.id();
        let sql = format!(
            "SELECT version, record, id FROM tcc_txn t WHERE finished_ms <= $1 AND (t.owner = $2 OR {OWNER_LAPSED}) \
             ORDER BY finished_ms, id LIMIT $3"
        );
        let rows = self.rows(&sql, &[&finished_until_ms, &node, &sql_limit(limit)]).await?;
        let out = records(&rows)?;
        let next = self.min("SELECT min(finished_ms) FROM tcc_txn WHERE finished_ms > $1", finished_until_ms).await?;
        Ok((out, next))
    }

    async fn put_endpoint(&self, r: &Registration) -> Result<()> {
        let client = self.client().await?;
        let sql = "INSERT INTO tcc_endpoint (service, endpoint, expires_ms) VALUES ($1, $2, $3) \
                   ON CONFLICT (service, endpoint) DO UPDATE SET expires_ms = EXCLUDED.expires_ms";
        client.execute(sql, &[&r.service, &r.endpoint, &r.expires_ms]).await.map_err(write_error)?;
        Ok(())
    }

    async fn remove_endpoint(&self, service: &str, endpoint: &str) -> Result<bool> {
        let client = self.client().await?;
        let sql = "DELETE FROM tcc_endpoint WHERE service = $1 AND endpoint = $2";
        Ok(client.execute(sql, &[&service, &endpoint]).await.map_err(write_error)? > 0)
    }

    async fn endpoints(&self) -> Result<Vec<Registration>> {
        let sql = "SELECT service, endpoint, expires_ms FROM tcc_endpoint ORDER BY service, endpoint";
        let rows = self.rows(sql, &[]).await?;
        rows.iter()
            .map(|r| {
                Ok(Registration {
                    service: r.try_get(0).map_err(read_error)?,
                    endpoint: r.try_get(1).map_err(read_error)?,
                    expires_ms: r.try_get(2).map_err(read_error)?,
                })
            })
            .collect()
    }

    async fn remove_expired_endpoints(&self, until_ms: i64) -> Result<usize> {
        let client = self.client().await?;
        let sql = "DELETE FROM tcc_endpoint WHERE expires_ms <= $1";
        Ok(client.execute(sql, &[&until_ms]).await.map_err(write_error)? as usize)
    }

    fn node(&self) -> Option<Uuid> {
        Some(self.node.id())
    }

    async fn claim(&self, txn: &TxnRecord) -> Result<Option<u64>> {
        let node = self.node.id();
        let sql = format!(
            "WITH cur AS (SELECT version, owner FROM tcc_txn WHERE id = $1), \
             u AS (UPDATE tcc_txn t SET version = t.version + 1, owner = $2 WHERE t.id = $1 AND t.version = $3 \
             AND t.owner IS DISTINCT FROM $2 AND {FENCE} AND {OWNER_LAPSED} RETURNING t.version) \
             SELECT (SELECT version FROM cur), (SELECT owner FROM cur), (SELECT version FROM u)"
        );
        let version = txn.version as i64;
        let client = self.client().await?;
        let stmt = client.prepare_cached(&sql).await.map_err(read_error)?;
        let row = client.query_one(&stmt, &[&txn.id.0, &node, &version]).await.map_err(write_error)?;
        let found: Option<i64> = row.try_get(0).map_err(read_error)?;
        let owner: Option<Uuid> = row.try_get(1).map_err(read_error)?;
        let claimed: Option<i64> = row.try_get(2).map_err(read_error)?;
        match (claimed, found) {
            (Some(v), _) => {
                // A takeover claims every transaction of the lapsed node:
                // one line per interval, with a count.
                static THROTTLE: crate::throttle::Throttle =
                    crate::throttle::Throttle::new(std::time::Duration::from_secs(10));
                if let Some(held_back) = THROTTLE.allow() {
                    let previous = owner.map(|o| o.to_string()).unwrap_or_default();
                    info!(txn = %txn.id, %previous, held_back, "took over a transaction whose coordinator's lease lapsed (one line per 10 s; held_back: the like since the last one)");
                }
                Ok(Some(v as u64))
            }
            (None, None) => Ok(None), // gone (collected)
            (None, Some(f)) if f != version => {
                Err(Error::Conflict { txn: txn.id, expected: txn.version, found: f as u64 })
            }
            (None, Some(_)) if owner == Some(node) => Ok(Some(txn.version)),
            (None, Some(_)) => Ok(None),
        }
    }

    async fn close(&self) {
        self.renewal.abort();
        let node = self.node.id();
        let released = async {
            let client = self.client().await?;
            let sql = "UPDATE tcc_node SET expires_at = clock_timestamp() WHERE id = $1";
            client.execute(sql, &[&node]).await.map_err(write_error)
        };
        match released.await {
            Ok(_) => info!(%node, "lease released; the other coordinators take over this one's work"),
            Err(e) => warn!(%node, cause = %e, "could not release the lease; the others take over when it lapses"),
        }
    }
}

impl PgStore {
    /// Runs a read (a prepared statement, cached per connection).
    async fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<tokio_postgres::Row>> {
        query(&self.pool, sql, params).await
    }

    /// A read whose first column is an id.
    async fn ids(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<TxnId>> {
        let rows = self.rows(sql, params).await?;
        rows.iter().map(|r| r.try_get(0).map(TxnId).map_err(read_error)).collect()
    }

    /// A `min(...)` read.
    async fn min(&self, sql: &str, after: i64) -> Result<Option<i64>> {
        let rows = self.rows(sql, &[&after]).await?;
        rows.first().map_or(Ok(None), |r| r.try_get(0).map_err(read_error))
    }
}

/// A bound parameter a write owns (it waits in the group commit's queue).
type Param = Box<dyn ToSql + Send + Sync>;

/// One write for the group commit: a statement whose one row is the number
/// of records its conditional part wrote (0 or 1).
struct Write {
    /// The transaction it writes (the row it locks first).
    key: Uuid,
    sql: &'static str,
    params: Vec<Param>,
}

impl Write {
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()
    }
}

/// Runs [`Write`]s on the pool: several in one database transaction, their
/// statements pipelined (sent without waiting for each answer), or one
/// alone as an implicit transaction.
struct Writes {
    pool: Pool,
}

impl Executor for Writes {
    type Job = Write;
    type Output = bool;

    fn key(job: &Write) -> Uuid {
        job.key
    }

    async fn together(&self, jobs: &[&Write]) -> std::result::Result<Vec<Result<bool>>, Error> {
        let every = |e: Error| each(jobs.len(), &e);
        let client = match self.pool.get().await {
            Ok(c) => c,
            Err(e) => return Ok(every(pool_error(e))),
        };
        // Cached per connection: a round trip the first time only.
        // Prepared, so that each request goes out on its first poll.
        let prepared = async {
            let sentinel = client.prepare_cached(SENTINEL).await?;
            let mut statements = Vec::with_capacity(jobs.len());
            for job in jobs {
                statements.push(client.prepare_cached(job.sql).await?);
            }
            Ok::<_, tokio_postgres::Error>((sentinel, statements))
        };
        let (sentinel, statements) = match prepared.await {
            Ok(p) => p,
            Err(e) => return Ok(every(read_error(e))),
        };
        let params: Vec<_> = jobs.iter().map(|j| j.params()).collect();
        let started = std::time::Instant::now();
        // Pipelined, in this order: BEGIN, the statements, the sentinel,
        // COMMIT; sent in a few packets, answered in order.
        let db: &tokio_postgres::Client = &client;
        let mut steps: Vec<Step<'_>> = Vec::with_capacity(jobs.len() + 3);
        steps.push(Box::pin(
            async move { db.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED").await.map(|_| None) },
        ));
        for (statement, params) in statements.iter().zip(&params) {
            steps.push(Box::pin(async move { db.query_one(statement, params).await.map(Some) }));
        }
        let sentinel = &sentinel;
        steps.push(Box::pin(async move { db.query_one(sentinel, &[]).await.map(Some) }));
        steps.push(Box::pin(async move { db.batch_execute("COMMIT").await.map(|_| None) }));
        let mut answers = in_order(steps).await.into_iter();
        crate::metrics::group_commit(jobs.len(), started.elapsed());
        let (Some(begun), Some(committed), Some(sentinel)) = (answers.next(), answers.next_back(), answers.next_back())
        else {
            return Ok(every(Error::Storage("the database pipeline lost answers".into())));
        };
        let written: Vec<_> = answers.collect();
        if begun.is_err() {
            // No transaction was open: each statement was its own, and its
            // own result is its outcome.
            return Ok(written.into_iter().map(outcome).collect());
        }
        let lost =
            written.iter().chain([&sentinel, &committed]).filter_map(|r| r.as_ref().err()).find(|e| connection_lost(e));
        if let Some(e) = lost {
            // COMMIT may have been processed before the answers were lost:
            // every write's outcome is unknown.
            let unknown = write_error_of(e);
            discard(client);
            return Ok(every(unknown));
        }
        let first_failed = written.iter().find_map(|r| r.as_ref().err()).map(read_error_of);
        match (&sentinel, &committed) {
            // Nothing aborted the transaction before the sentinel, and
            // COMMIT went through: each statement's own result stands (one
            // that failed in the client never reached the server).
            (Ok(_), Ok(_)) => Ok(written.into_iter().map(outcome).collect()),
            // A statement failed, so the server aborted the transaction (its
            // COMMIT answers ROLLBACK): nothing was written.
            (Err(e), _) if e.code() == Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION) => {
                Err(first_failed.unwrap_or_else(|| read_error_of(e)))
            }
            // COMMIT itself was refused: rolled back.
            (Ok(_), Err(e)) => Err(read_error_of(e)),
            (Err(e), _) => Ok(every(Error::Unavailable(format!(
                "the database answered a group of writes unexpectedly ({}); they may or may not have been applied; \
                 retrying is safe (appends: with the same idempotency key)",
                describe(e)
            )))),
        }
    }

    async fn alone(&self, job: &Write) -> Result<bool> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let statement = client.prepare_cached(job.sql).await.map_err(read_error)?;
        // One statement, committed when it returns (autocommit).
        let started = std::time::Instant::now();
        let row = client.query_one(&statement, &job.params()).await;
        crate::metrics::group_commit(1, started.elapsed());
        if row.as_ref().is_err_and(connection_lost) {
            discard(client);
        }
        outcome(row.map(Some))
    }
}

/// Reads transaction records: several in one query by id.
struct TxnReads {
    pool: Pool,
}

impl Executor for TxnReads {
    type Job = TxnId;
    type Output = Option<TxnRecord>;

    fn key(id: &TxnId) -> Uuid {
        id.0
    }

    async fn together(&self, ids: &[&TxnId]) -> std::result::Result<Vec<Result<Option<TxnRecord>>>, Error> {
        let every = |e: Error| each(ids.len(), &e);
        let keys: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
        let sql = "SELECT version, record, id FROM tcc_txn WHERE id = ANY($1)";
        let rows = match query(&self.pool, sql, &[&keys]).await {
            Ok(rows) => rows,
            Err(e) => return Ok(every(e)),
        };
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            match row.try_get::<_, Uuid>(2) {
                Ok(id) => found.insert(id, row),
                Err(e) => return Ok(every(read_error(e))),
            };
        }
        Ok(ids.iter().map(|id| found.get(&id.0).map(|row| decode_txn(**id, row)).transpose()).collect())
    }

    async fn alone(&self, id: &TxnId) -> Result<Option<TxnRecord>> {
        let rows = query(&self.pool, "SELECT version, record FROM tcc_txn WHERE id = $1", &[&id.0]).await?;
        rows.first().map(|row| decode_txn(*id, row)).transpose()
    }
}

/// One [`Store::read_topic`].
struct TopicRead {
    partial: Uuid,
    from: i64,
    limit: i64,
}

/// Reads topics: several in one query.
struct TopicReads {
    pool: Pool,
}

impl Executor for TopicReads {
    type Job = TopicRead;
    type Output = Vec<CommandRecord>;

    fn key(read: &TopicRead) -> Uuid {
        read.partial
    }

    async fn together(&self, reads: &[&TopicRead]) -> std::result::Result<Vec<Result<Vec<CommandRecord>>>, Error> {
        let every = |e: Error| each(reads.len(), &e);
        let partials: Vec<Uuid> = reads.iter().map(|r| r.partial).collect();
        let froms: Vec<i64> = reads.iter().map(|r| r.from).collect();
        let limits: Vec<i64> = reads.iter().map(|r| r.limit).collect();
        let sql = "SELECT q.i, c.seq, c.kind, c.key, c.payload \
                   FROM unnest($1::uuid[], $2::bigint[], $3::bigint[]) WITH ORDINALITY AS q(partial, from_seq, lim, i) \
                   CROSS JOIN LATERAL (SELECT seq, kind, key, payload FROM tcc_command \
                   WHERE partial = q.partial AND seq >= q.from_seq ORDER BY seq LIMIT q.lim) c \
                   ORDER BY q.i, c.seq";
        let rows = match query(&self.pool, sql, &[&partials, &froms, &limits]).await {
            Ok(rows) => rows,
            Err(e) => return Ok(every(e)),
        };
        let mut out: Vec<Result<Vec<CommandRecord>>> = reads.iter().map(|_| Ok(Vec::new())).collect();
        for row in &rows {
            let i = match row.try_get::<_, i64>(0) {
                Ok(i) => i,
                Err(e) => return Ok(every(read_error(e))),
            };
            let slot = i.checked_sub(1).and_then(|i| usize::try_from(i).ok()).and_then(|i| out.get_mut(i));
            match (slot, command(row, 1)) {
                (Some(Ok(commands)), Ok(c)) => commands.push(c),
                (Some(slot), Err(e)) => *slot = Err(e),
                (Some(Err(_)), Ok(_)) => {}
                (None, _) => return Ok(every(Error::Storage(format!("the topic query gave row number {i}")))),
            }
        }
        Ok(out)
    }

    async fn alone(&self, read: &TopicRead) -> Result<Vec<CommandRecord>> {
        let sql =
            "SELECT seq, kind, key, payload FROM tcc_command WHERE partial = $1 AND seq >= $2 ORDER BY seq LIMIT $3";
        let rows = query(&self.pool, sql, &[&read.partial, &read.from, &read.limit]).await?;
        rows.iter().map(|r| command(r, 0)).collect()
    }
}

/// A command from a row whose columns from `at` on are (seq, kind, key,
/// payload).
fn command(r: &tokio_postgres::Row, at: usize) -> Result<CommandRecord> {
    Ok(CommandRecord {
        sequence: r.try_get::<_, i64>(at).map_err(read_error)? as u64,
        kind: r.try_get(at + 1).map_err(read_error)?,
        key: r.try_get(at + 2).map_err(read_error)?,
        payload: r.try_get(at + 3).map_err(read_error)?,
    })
}

/// Runs a read on a pooled connection (a prepared statement, cached per
/// connection).
async fn query(pool: &Pool, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<tokio_postgres::Row>> {
    let client = pool.get().await.map_err(pool_error)?;
    let rows = match client.prepare_cached(sql).await {
        Ok(stmt) => client.query(&stmt, params).await,
        Err(e) => Err(e),
    };
    if rows.as_ref().is_err_and(connection_lost) {
        discard(client);
    }
    rows.map_err(read_error)
}

/// Keeps a connection whose session was lost out of the pool: its next
/// user would fail too (the pool's own check may not have seen it close
/// yet).
fn discard(client: deadpool_postgres::Object) {
    drop(deadpool_postgres::Object::take(client));
}

/// The outcome of one write statement: whether its conditional part wrote.
fn outcome(answer: std::result::Result<Option<tokio_postgres::Row>, tokio_postgres::Error>) -> Result<bool> {
    let row = answer.map_err(write_error)?.ok_or_else(|| Error::Storage("a write statement gave no row".into()))?;
    let n: i64 = row.try_get(0).map_err(read_error)?;
    Ok(n > 0)
}

/// The last statement of a group before `COMMIT`: it succeeds only if
/// nothing aborted the transaction (then the server answers it with
/// "current transaction is aborted"), so its answer tells whether the
/// group committed.
const SENTINEL: &str = "SELECT 1::bigint";

/// One request of a group's pipeline, and its answer.
type Step<'a> = std::pin::Pin<
    Box<dyn Future<Output = std::result::Result<Option<tokio_postgres::Row>, tokio_postgres::Error>> + Send + 'a>,
>;

/// Runs `futures` together, polling every unfinished one in index order at
/// each poll, and gives their outputs in order. A tokio-postgres request
/// (on a prepared statement) is sent on its future's first poll, so the
/// requests go out in index order.
async fn in_order<T>(futures: Vec<std::pin::Pin<Box<dyn Future<Output = T> + Send + '_>>>) -> Vec<T> {
    let mut futures = futures;
    let mut outputs: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *output = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// The same error for each of `n` jobs that failed together.
fn each<T>(n: usize, e: &Error) -> Vec<Result<T>> {
    (0..n).map(|_| Err(copy(e))).collect()
}

/// The same error again.
fn copy(e: &Error) -> Error {
    match e {
        Error::Unavailable(m) => Error::Unavailable(m.clone()),
        Error::Fenced(m) => Error::Fenced(m.clone()),
        Error::Storage(m) => Error::Storage(m.clone()),
        other => Error::Storage(other.to_string()),
    }
}

/// Creates the schema, or migrates it to [`SCHEMA_VERSION`], under an
/// advisory lock; refuses a schema newer than this coordinator's.
async fn migrate(pool: &Pool) -> Result<()> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(read_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(read_error)?;
    // Without the server's NOTICE that the table exists, which every node
    // after the first would log.
    let create =
        "SET LOCAL client_min_messages = warning; CREATE TABLE IF NOT EXISTS tcc_schema (version integer NOT NULL)";
    tx.batch_execute(create).await.map_err(read_error)?;
    let row = tx.query_one("SELECT coalesce(max(version), 0) FROM tcc_schema", &[]).await.map_err(read_error)?;
    let current: i32 = row.try_get(0).map_err(read_error)?;
    if current > SCHEMA_VERSION {
        return Err(Error::Storage(format!(
            "the database schema is version {current}, newer than this coordinator understands \
             (version {SCHEMA_VERSION}): a newer tcc-coordinator migrated it; run that version (or newer)"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current.max(0) as usize) {
        let version = i as i32 + 1;
        tx.batch_execute(sql).await.map_err(read_error)?;
        tx.execute("DELETE FROM tcc_schema", &[]).await.map_err(read_error)?;
        tx.execute("INSERT INTO tcc_schema (version) VALUES ($1)", &[&version]).await.map_err(read_error)?;
        info!(version, "database schema migrated");
    }
    tx.commit().await.map_err(read_error)
}

/// Inserts this node's lease row.
async fn join(client: &tokio_postgres::Client, node: &Node) -> Result<()> {
    let id = node.id();
    let ms = node.lease.as_millis().min(i64::MAX as u128) as i64;
    let sql = "INSERT INTO tcc_node (id, expires_at) VALUES ($1, clock_timestamp() + $2 * interval '1 millisecond')";
    client.execute(sql, &[&id, &(ms as f64)]).await.map_err(write_error)?;
    info!(node = %id, lease_ms = ms, "joined the cluster");
    Ok(())
}

/// A connection of its own for the lease, so that requests holding every
/// pooled connection cannot delay a renewal.
async fn lease_connection(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client> {
    let (client, connection) = config.connect(NoTls).await.map_err(read_error)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(cause = %describe(&e), "the lease connection to the database closed");
        }
    });
    Ok(client)
}

/// One renewal: extends the lease if it has not lapsed (returns whether
/// it had not), and drops the rows of nodes lapsed for an hour (a missing
/// owner counts as lapsed). Reconnects first if needed.
async fn renew_once(
    client: &mut Option<tokio_postgres::Client>,
    config: &tokio_postgres::Config,
    node: &Node,
) -> Result<bool> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = Some(lease_connection(config).await?);
    }
    let c = client.as_ref().ok_or_else(|| Error::Unavailable("no lease connection".into()))?;
    let ms = node.lease.as_millis().min(i64::MAX as u128) as f64;
    let sql = "UPDATE tcc_node SET expires_at = clock_timestamp() + $2 * interval '1 millisecond' \
               WHERE id = $1 AND expires_at > clock_timestamp()";
    let n = c.execute(sql, &[&node.id(), &ms]).await.map_err(write_error)?;
    if n == 0 {
        return Ok(false);
    }
    let prune = "DELETE FROM tcc_node WHERE expires_at < clock_timestamp() - interval '1 hour'";
    c.execute(prune, &[]).await.map_err(write_error)?;
    Ok(true)
}

/// Renews the lease every third of its length (a failed attempt is
/// retried after a tenth), each attempt bounded by a third of the lease. A
/// lapsed lease is never renewed: the node joins again under a new id.
async fn renew(config: tokio_postgres::Config, mut client: Option<tokio_postgres::Client>, node: Arc<Node>) {
    let mut pause = node.lease / 3;
    loop {
        tokio::time::sleep(pause).await;
        pause = node.lease / 10;
        let id = node.id();
        let renewed = match tokio::time::timeout(node.lease / 3, renew_once(&mut client, &config, &node)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Unavailable(format!("no answer within {} ms", (node.lease / 3).as_millis()))),
        };
        match renewed {
            Ok(true) => pause = node.lease / 3,
            Ok(false) => {
                let fresh = Uuid::new_v4();
                warn!(old = %id, new = %fresh,
                    "this coordinator's lease lapsed (paused, or cut off from the database, for longer than the lease); \
                     its late writes are refused and others may have taken over its work; joining again under a new id");
                *lock(&node.id) = fresh;
                let joined = match client.as_ref() {
                    Some(c) => tokio::time::timeout(node.lease / 3, join(c, &node))
                        .await
                        .unwrap_or_else(|_| Err(Error::Unavailable("no answer".into()))),
                    None => Err(Error::Unavailable("no lease connection".into())),
                };
                match joined {
                    Ok(()) => pause = node.lease / 3,
                    // Under the new id, with no row: the next renewal finds
                    // none, which is a lapse again, and joins again.
                    Err(e) => warn!(cause = %e, "cannot join the cluster again; will retry"),
                }
            }
            Err(e) => {
                warn!(node = %id, cause = %e, "cannot renew the lease; will retry");
                client = None; // reconnect
            }
        }
    }
}

/// A `LIMIT` from a count (callers may pass `usize::MAX` for "all").
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// The records of rows of (version, record, id).
fn records(rows: &[tokio_postgres::Row]) -> Result<Vec<TxnRecord>> {
    rows.iter().map(|row| decode_txn(TxnId(row.try_get(2).map_err(read_error)?), row)).collect()
}

/// The record of `id` from a row that starts with (version, record).
fn decode_txn(id: TxnId, row: &tokio_postgres::Row) -> Result<TxnRecord> {
    let version: i64 = row.try_get(0).map_err(read_error)?;
    let bytes: &[u8] = row.try_get(1).map_err(read_error)?;
    let corrupt = |cause: String| Error::Corrupt { key: format!("transaction {id}"), cause };
    let mut txn = TxnRecord::decode(bytes).map_err(corrupt)?;
    if txn.id != id {
        return Err(corrupt(format!("the record holds id {}", txn.id)));
    }
    txn.version = version as u64;
    Ok(txn)
}

/// The error text of a PostgreSQL error with its causes.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Whether an error means the database could not be reached or is not
/// serving (rather than a statement this coordinator got wrong).
fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        // 08 connection, 53 resources, 57 operator intervention (shutdown),
        // 40 transaction rollback (serialization, deadlock).
        // 25006: read-only transaction (a standby after a failover).
        Some(db) => {
            ["08", "53", "57", "40"].iter().any(|class| db.code().code().starts_with(class))
                || db.code().code() == "25006"
        }
        None => e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()),
    }
}

/// A failed read or a failed statement preparation.
fn read_error(e: tokio_postgres::Error) -> Error {
    read_error_of(&e)
}

fn read_error_of(e: &tokio_postgres::Error) -> Error {
    if is_unavailable(e) {
        Error::Unavailable(format!("the database is unavailable: {}", describe(e)))
    } else {
        Error::Storage(format!("database error: {}", describe(e)))
    }
}

/// Whether the connection failed or the server ended the session
/// (shutdown, crash, terminated backend) while a request was in flight:
/// whether a write committed before that is not known here.
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    let cut = e.as_db_error().is_some_and(|db| {
        let code = db.code().code();
        code.starts_with("08") || code.starts_with("57P")
    });
    e.is_closed() || io || cut
}

/// A failed write: if the connection went away while it was in flight, its
/// outcome is unknown, and the message says that a retry is safe.
fn write_error(e: tokio_postgres::Error) -> Error {
    write_error_of(&e)
}

fn write_error_of(e: &tokio_postgres::Error) -> Error {
    if connection_lost(e) {
        Error::Unavailable(format!(
            "the database connection was lost while a write was in flight ({}); it may or may not have been \
             applied; retrying is safe (appends: with the same idempotency key)",
            describe(e)
        ))
    } else {
        read_error_of(e)
    }
}

fn pool_error(e: PoolError) -> Error {
    let cause = match &e {
        PoolError::Backend(pg) => describe(pg),
        other => other.to_string(),
    };
    Error::Unavailable(format!("the database is unavailable: cannot get a connection: {cause}"))
}

fn lapsed(node: Uuid) -> Error {
    Error::Fenced(format!(
        "this coordinator's lease in the database lapsed (node {node}: paused, or cut off from the database, for \
         longer than the lease); the write was refused so as not to overwrite another coordinator's work; retry"
    ))
}
