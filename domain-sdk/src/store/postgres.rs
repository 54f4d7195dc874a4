//! The service's own PostgreSQL database (cargo feature `postgres`).
//!
//! [`PgStore`] keeps the guard and the reservations in three tables of the
//! service's database, created and versioned by the SDK at start
//! ([`SCHEMA`], version [`SCHEMA_VERSION`] in `tcc_sdk_schema`; a newer
//! version than this SDK knows is refused). Phase 2 runs in one
//! transaction (READ COMMITTED, the default) on a pooled connection: the
//! guard's statements, then the participant's body with the open
//! [`PgTx`] (a `deadpool_postgres::Transaction`, which derefs to
//! `tokio_postgres::Transaction`), then COMMIT, which is durable before
//! the call is acknowledged (with the server's default
//! `synchronous_commit`).
//!
//! # The guard
//!
//! `tcc_guard` has one row per partial transaction, keyed by its id, with
//! an outcome: `T` (a try reserved; undecided), `C` (committed) or `R`
//! (rolled back). Every statement is one that MySQL and MariaDB also have,
//! but for `ON CONFLICT (partial_id) DO NOTHING`, which is
//! `INSERT IGNORE` there; each tells from its row count what happened.
//!
//! Phase 2 with outcome `O` (`$1` partial id, `$2` transaction id, `$3`
//! `O`, `$4` now in unix ms):
//!
//! 1. `UPDATE tcc_guard SET outcome = $3, updated_ms = $4 WHERE partial_id = $1 AND outcome = 'T'`
//!    one row → the try's record is now decided; run the body.
//! 2. Else `INSERT INTO tcc_guard (partial_id, transaction_id, outcome, updated_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (partial_id) DO NOTHING`:
//!    one row → no try reserved here (an empty compensation, or a service
//!    that reserves nothing); run the body.
//! 3. Else `SELECT outcome FROM tcc_guard WHERE partial_id = $1 FOR SHARE`:
//!    `O` → a redelivery: roll back, acknowledge. The other outcome →
//!    roll back, refuse for good, naming it. `T` (a try committed between
//!    1 and 2) → back to 1.
//! 4. The body; then the outcome read back (`SELECT outcome ... WHERE
//!    partial_id = $1` must say `O`: PostgreSQL would turn the COMMIT of a
//!    transaction that a swallowed error aborted into a silent rollback);
//!    then COMMIT. A failure anywhere rolls everything back.
//!
//! 1 and 2 are sent together (pipelined, one round trip): after an UPDATE
//! that decided the row, the INSERT finds it and does nothing.
//!
//! Two deliveries of one partial at once serialize on its row: the
//! UPDATE's row lock, or the INSERT's wait on the unique key, holds the
//! second until the first commits (then it finds the outcome) or rolls
//! back (then it goes on).
//!
//! The try ([`Reservations::hold`]), in one transaction:
//!
//! 1. `INSERT INTO tcc_guard (...) VALUES ($1, $2, 'T', $4) ON CONFLICT (partial_id) DO NOTHING`;
//!    no row → `SELECT outcome ... FOR SHARE`: `C` or `R` → refuse (a late
//!    try reserves nothing: no hanging); `T` → a retried try, a no-op if
//!    it asks the same lines (`SELECT resource, requested FROM tcc_hold WHERE partial_id = $1`,
//!    compared sorted by byte order).
//! 2. Per line, by resource (in byte order, as phase 2 also locks
//!    accounts): `UPDATE tcc_account SET available = available - $2, held = held + $2 WHERE resource = $1 AND available >= $2`
//!    (no row → unknown or not enough: roll back), then
//!    `INSERT INTO tcc_hold (...)`.
//! 3. COMMIT.
//!
//! A rollback that arrives before its try inserts `R`; the try's INSERT
//! then finds it (or waits for it) and refuses. A try that commits first
//! leaves `T`, which the rollback's UPDATE decides.

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;

use crate::error::{Error, Result};
use crate::participant::{Applied, Participant, Phase, PhaseTwo, Store, Tx, TxError, TxResult, abort, run_body};
use crate::reservations::{Account, Hold, HoldError, Reservations, now_ms, retried_try_differs, seed_overflow};

/// The schema version this SDK writes and understands.
pub const SCHEMA_VERSION: i32 = 1;

/// The SDK's tables, version 1 (PostgreSQL; the MySQL equivalent differs
/// only in `CREATE INDEX` syntax).
pub const SCHEMA: &str = "
CREATE TABLE tcc_guard (
    partial_id     VARCHAR(64)  NOT NULL PRIMARY KEY,
    transaction_id VARCHAR(64)  NOT NULL,
    outcome        CHAR(1)      NOT NULL CHECK (outcome IN ('T', 'C', 'R')),
    updated_ms     BIGINT       NOT NULL
);
CREATE TABLE tcc_account (
    resource       VARCHAR(255) NOT NULL PRIMARY KEY,
    available      BIGINT       NOT NULL,
    held           BIGINT       NOT NULL,
    used           BIGINT       NOT NULL
);
CREATE TABLE tcc_hold (
    partial_id     VARCHAR(64)  NOT NULL,
    resource       VARCHAR(255) NOT NULL,
    transaction_id VARCHAR(64)  NOT NULL,
    deadline_ms    BIGINT       NOT NULL,
    requested      BIGINT       NOT NULL,
    held           BIGINT       NOT NULL,
    PRIMARY KEY (partial_id, resource)
);
CREATE INDEX tcc_hold_deadline ON tcc_hold (deadline_ms);
";

const MIGRATION_LOCK: i64 = 0x0074_6363_5f73_646b; // "tcc_sdk"
const POOL_SIZE: usize = 16;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const DECIDE_TRY: &str = "UPDATE tcc_guard SET outcome = $2, updated_ms = $3 WHERE partial_id = $1 AND outcome = 'T'";
const RECORD: &str = "INSERT INTO tcc_guard (partial_id, transaction_id, outcome, updated_ms) \
                      VALUES ($1, $2, $3, $4) ON CONFLICT (partial_id) DO NOTHING";
const READ_OUTCOME: &str = "SELECT outcome FROM tcc_guard WHERE partial_id = $1 FOR SHARE";

/// A service's own PostgreSQL database: a connection pool, with the SDK's
/// tables in place.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: Pool,
}

/// The open transaction a participant's body runs in. Derefs to
/// `deadpool_postgres::Transaction` (and so to
/// `tokio_postgres::Transaction`): run the service's own statements on it.
pub type PgTx<'a> = Tx<'a, PgStore>;

impl<'a> Deref for PgTx<'a> {
    type Target = deadpool_postgres::Transaction<'a>;
    fn deref(&self) -> &Self::Target {
        &self.open
    }
}

impl DerefMut for PgTx<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.open
    }
}

/// What a database error says: its SQLSTATE and message, or the failure
/// of the connection.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("PostgreSQL {}: {}", db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("PostgreSQL: {e}: {cause}"),
            None => format!("PostgreSQL: {e}"),
        },
    }
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Store(describe(&e))
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Store(describe(&e))
    }
}

impl From<tokio_postgres::Error> for HoldError {
    fn from(e: tokio_postgres::Error) -> Self {
        HoldError::Store(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for HoldError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        HoldError::Store(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => Error::Store(format!("no database connection: {other}")),
        }
    }
}

impl PgStore {
    /// Connects to the service's database at `url` (`postgres://…` or
    /// `host=… dbname=…`) with a pool of 16 connections, and creates or
    /// checks the SDK's tables.
    pub async fn connect(url: &str) -> Result<Self> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| Error::Invalid(format!("not a PostgreSQL connection string: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("tcc-domain-sdk");
        }
        // No statement (a body waiting on a lock, say) holds a phase-2
        // call and its connection forever; the call fails and is retried.
        if config.get_options().is_none() {
            config.options("-c statement_timeout=30000");
        }
        // A dead database host is noticed within seconds, not minutes.
        if config.get_keepalives_interval().is_none() {
            config.keepalives_idle(Duration::from_secs(5));
            config.keepalives_interval(Duration::from_secs(2));
            config.keepalives_retries(3);
        }
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Store(format!("cannot set up the connection pool: {e}")))?;
        Self::from_pool(pool).await
    }

    /// Uses the service's own pool, after creating or checking the SDK's
    /// tables.
    pub async fn from_pool(pool: Pool) -> Result<Self> {
        let store = PgStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// The pool, for the service's own reads and writes.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Creates the SDK's tables, under an advisory lock so that instances
    /// starting together do it once; refuses a newer schema.
    async fn migrate(&self) -> Result<()> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        tx.batch_execute(
            "SET LOCAL client_min_messages = warning; CREATE TABLE IF NOT EXISTS tcc_sdk_schema (version integer NOT NULL)",
        )
        .await?;
        let current: i32 =
            tx.query_one("SELECT coalesce(max(version), 0) FROM tcc_sdk_schema", &[]).await?.try_get(0)?;
        if current > SCHEMA_VERSION {
            return Err(Error::Store(format!(
                "the participant tables in this database are schema version {current}, newer than this \
                 tcc-domain-sdk understands (version {SCHEMA_VERSION}): a newer SDK created them; run a service \
                 built with that SDK (or newer)"
            )));
        }
        if current < SCHEMA_VERSION {
            tx.batch_execute(SCHEMA).await?;
            tx.execute("DELETE FROM tcc_sdk_schema", &[]).await?;
            tx.execute("INSERT INTO tcc_sdk_schema (version) VALUES ($1)", &[&SCHEMA_VERSION]).await?;
            tracing::info!(
                version = SCHEMA_VERSION,
                "created the participant tables (tcc_guard, tcc_account, tcc_hold)"
            );
        }
        tx.commit().await?;
        Ok(())
    }

    /// The guard and the body in one transaction (see the module docs).
    async fn apply_here<P: Participant<Store = Self>>(
        &self,
        participant: &P,
        phase: Phase,
        call: &PhaseTwo,
    ) -> Result<Applied> {
        let mut client = self.pool.get().await?;
        let mut tx = Tx { open: client.transaction().await? };
        let pass = match guard(&tx, phase, call).await {
            Ok(pass) => pass,
            Err(e) => {
                let _ = tx.open.rollback().await;
                return Err(e);
            }
        };
        if !pass {
            // The outcome is recorded and committed: nothing to undo.
            let _ = tx.open.rollback().await;
            return Ok(Applied::Already);
        }
        if let Err(e) = run_body(participant, &mut tx, phase, call).await {
            let _ = tx.open.rollback().await;
            return Err(e.into());
        }
        // PostgreSQL answers COMMIT of an aborted transaction (a body that
        // swallowed a failed statement) with a rollback, and tokio-postgres
        // reports that as success: read the outcome back first. This fails
        // (25P02) in an aborted transaction, and finds nothing after a body
        // that ended the transaction itself.
        let check = tx.open.prepare_cached(READ_OUTCOME).await?;
        let recorded = tx.open.query_opt(&check, &[&call.partial_id]).await?;
        let recorded = recorded.map(|row| row.try_get::<_, String>(0)).transpose()?;
        if recorded.as_deref() != Some(phase.code()) {
            let _ = tx.open.rollback().await;
            return Err(Error::Store(format!(
                "partial {}: the participant's transaction no longer holds its outcome (the body ended or \
                 aborted the transaction); nothing was committed",
                call.partial_id
            )));
        }
        // A connection lost during COMMIT leaves the outcome unknown here;
        // the coordinator retries, and the guard tells which.
        tx.open.commit().await?;
        Ok(Applied::Now)
    }

    async fn hold_here(&self, hold: &Hold) -> Result<bool, HoldError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let result = hold_in(&tx, hold).await;
        match result {
            Ok(true) => {
                tx.commit().await?;
                Ok(true)
            }
            other => {
                let _ = tx.rollback().await;
                other
            }
        }
    }

    async fn read_holds(&self, cutoff_ms: i64) -> Result<Vec<Hold>> {
        let client = self.pool.get().await?;
        let sql = "SELECT partial_id, transaction_id, deadline_ms, resource, held, requested FROM tcc_hold \
                   WHERE deadline_ms <= $1 ORDER BY partial_id, resource";
        let mut out: Vec<Hold> = Vec::new();
        for row in client.query(sql, &[&cutoff_ms]).await? {
            let partial: String = row.try_get(0)?;
            let resource: String = row.try_get(3)?;
            let (held, requested): (i64, i64) = (row.try_get(4)?, row.try_get(5)?);
            match out.last_mut() {
                Some(h) if h.partial_id == partial => {
                    h.lines.push((resource.clone(), held));
                    h.requested.push((resource, requested));
                }
                _ => out.push(Hold {
                    partial_id: partial,
                    transaction_id: row.try_get(1)?,
                    deadline_ms: row.try_get(2)?,
                    lines: vec![(resource.clone(), held)],
                    requested: vec![(resource, requested)],
                }),
            }
        }
        Ok(out)
    }
}

/// The phase-2 guard's statements: `true` when the body is to run, `false`
/// for a redelivery of the recorded outcome.
async fn guard(tx: &deadpool_postgres::Transaction<'_>, phase: Phase, call: &PhaseTwo) -> Result<bool> {
    let (partial, code, now) = (call.partial_id.as_str(), phase.code(), now_ms());
    let decide = tx.prepare_cached(DECIDE_TRY).await?;
    let record = tx.prepare_cached(RECORD).await?;
    for _ in 0..3 {
        // Sent together, in one round trip: after an UPDATE that decided
        // the try's row, the INSERT finds that row and does nothing.
        let decide_params: [&(dyn ToSql + Sync); 3] = [&partial, &code, &now];
        let record_params: [&(dyn ToSql + Sync); 4] = [&partial, &call.transaction_id, &code, &now];
        let (decided, recorded) =
            tokio::try_join!(tx.execute(&decide, &decide_params), tx.execute(&record, &record_params))?;
        if decided == 1 || recorded == 1 {
            return Ok(true);
        }
        let read = tx.prepare_cached(READ_OUTCOME).await?;
        let Some(row) = tx.query_opt(&read, &[&partial]).await? else { continue };
        let found: String = row.try_get(0)?;
        match Phase::from_code(found.as_bytes()) {
            Some(done) if done == phase => return Ok(false),
            Some(done) => return Err(Error::Refused(done.refusal(partial, phase))),
            // A try committed between the UPDATE and the INSERT.
            None => continue,
        }
    }
    Err(Error::Store(format!("the record of partial {partial} kept changing under this call; it will be retried")))
}

/// The try's statements (see the module docs); `Ok(true)` leaves `tx` to
/// be committed, anything else to be rolled back.
async fn hold_in(tx: &deadpool_postgres::Transaction<'_>, hold: &Hold) -> Result<bool, HoldError> {
    let partial = hold.partial_id.as_str();
    let record = tx.prepare_cached(RECORD).await?;
    let inserted = tx.execute(&record, &[&partial, &hold.transaction_id, &"T", &now_ms()]).await?;
    if inserted == 0 {
        let read = tx.prepare_cached(READ_OUTCOME).await?;
        let Some(row) = tx.query_opt(&read, &[&partial]).await? else {
            return Err(HoldError::Store(Error::Store(format!(
                "partial {partial}'s hold was released while this try ran; retry the try"
            ))));
        };
        let found: String = row.try_get(0)?;
        if found != "T" {
            return Err(HoldError::Decided(partial.to_string()));
        }
        let sql = "SELECT resource, requested FROM tcc_hold WHERE partial_id = $1";
        let mut first = Vec::new();
        for row in tx.query(sql, &[&partial]).await? {
            first.push((row.try_get::<_, String>(0)?, row.try_get(1)?));
        }
        // In Rust's order, as `requested` is (the server's collation may differ).
        first.sort();
        return if first == hold.requested { Ok(false) } else { Err(retried_try_differs(partial, &first)) };
    }
    let take = tx
        .prepare_cached(
            "UPDATE tcc_account SET available = available - $2, held = held + $2 \
             WHERE resource = $1 AND available >= $2",
        )
        .await?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO tcc_hold (partial_id, resource, transaction_id, deadline_ms, requested, held) \
             VALUES ($1, $2, $3, $4, $5, $5)",
        )
        .await?;
    // By resource, so that concurrent tries lock accounts in one order.
    for (resource, amount) in &hold.requested {
        if tx.execute(&take, &[resource, amount]).await? == 0 {
            let sql = "SELECT available FROM tcc_account WHERE resource = $1";
            return Err(match tx.query_opt(sql, &[resource]).await? {
                None => HoldError::Unknown(resource.clone()),
                Some(row) => HoldError::Insufficient {
                    resource: resource.clone(),
                    available: row.try_get(0)?,
                    requested: *amount,
                },
            });
        }
        let params: [&(dyn ToSql + Sync); 5] = [&partial, resource, &hold.transaction_id, &hold.deadline_ms, amount];
        tx.execute(&insert, &params).await?;
    }
    Ok(true)
}

impl PgTx<'_> {
    async fn release_in(&mut self, partial: &str) -> TxResult<i64> {
        let read =
            self.open.prepare_cached("SELECT resource, held FROM tcc_hold WHERE partial_id = $1 FOR UPDATE").await?;
        let mut rows = Vec::new();
        for row in self.open.query(&read, &[&partial]).await? {
            rows.push((row.try_get::<_, String>(0)?, row.try_get::<_, i64>(1)?));
        }
        if rows.is_empty() {
            return Ok(0);
        }
        // Accounts in the order a try locks them (Rust's, not the server's
        // collation), so that a release and a try do not deadlock.
        rows.sort();
        let give = self
            .open
            .prepare_cached("UPDATE tcc_account SET held = held - $2, available = available + $2 WHERE resource = $1")
            .await?;
        let mut total = 0i64;
        for (resource, held) in rows {
            self.open.execute(&give, &[&resource, &held]).await?;
            total = total.saturating_add(held);
        }
        self.open.execute("DELETE FROM tcc_hold WHERE partial_id = $1", &[&partial]).await?;
        Ok(total)
    }

    async fn consume_in(&mut self, partial: &str, resource: &str, amount: i64) -> TxResult<()> {
        let take = self
            .open
            .prepare_cached(
                "UPDATE tcc_hold SET held = held - $3 WHERE partial_id = $1 AND resource = $2 AND held >= $3 AND $3 > 0",
            )
            .await?;
        if self.open.execute(&take, &[&partial, &resource, &amount]).await? == 0 {
            return abort(format!("partial {partial} does not hold {amount} of {resource:?}"));
        }
        let used = self
            .open
            .prepare_cached("UPDATE tcc_account SET held = held - $2, used = used + $2 WHERE resource = $1")
            .await?;
        self.open.execute(&used, &[&resource, &amount]).await?;
        let done = self
            .open
            .prepare_cached("DELETE FROM tcc_hold WHERE partial_id = $1 AND resource = $2 AND held = 0")
            .await?;
        self.open.execute(&done, &[&partial, &resource]).await?;
        Ok(())
    }
}

impl Store for PgStore {
    type Open<'a> = deadpool_postgres::Transaction<'a>;

    fn consume(tx: &mut PgTx<'_>, partial: &str, resource: &str, amount: i64) -> impl Future<Output = TxResult<()>> {
        tx.consume_in(partial, resource, amount)
    }

    fn release(tx: &mut PgTx<'_>, partial: &str) -> impl Future<Output = TxResult<i64>> {
        tx.release_in(partial)
    }

    fn apply<P: Participant<Store = Self>>(
        &self,
        participant: Arc<P>,
        phase: Phase,
        call: Arc<PhaseTwo>,
    ) -> impl Future<Output = Result<Applied>> + Send {
        let store = self.clone();
        async move {
            // The body's future need not be Send: it runs to completion on
            // a blocking thread, driven by this runtime.
            let runtime = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || runtime.block_on(store.apply_here(participant.as_ref(), phase, &call)))
                .await
                .map_err(|e| Error::Store(format!("participant task failed: {e}")))?
        }
    }

    async fn phase_of(&self, partial: &str) -> Result<Option<Phase>> {
        let client = self.pool.get().await?;
        let row = client.query_opt("SELECT outcome FROM tcc_guard WHERE partial_id = $1", &[&partial]).await?;
        Ok(match row {
            Some(row) => Phase::from_code(row.try_get::<_, String>(0)?.as_bytes()),
            None => None,
        })
    }
}

impl Reservations for PgStore {
    async fn seed(&self, resource: &str, amount: i64) -> Result<Account> {
        crate::reservations::check_seed(resource, amount)?;
        let client = self.pool.get().await?;
        // The WHERE fails with numeric_value_out_of_range (22003) when
        // the total would leave the range.
        let sql = "INSERT INTO tcc_account AS a (resource, available, held, used) VALUES ($1, $2, 0, 0) \
                   ON CONFLICT (resource) DO UPDATE SET available = a.available + EXCLUDED.available \
                   WHERE a.available + a.held + a.used + EXCLUDED.available IS NOT NULL \
                   RETURNING available, held, used";
        match client.query_one(sql, &[&resource, &amount]).await {
            Ok(row) => Ok(Account { available: row.try_get(0)?, held: row.try_get(1)?, used: row.try_get(2)? }),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::NUMERIC_VALUE_OUT_OF_RANGE) => {
                Err(Error::Invalid(seed_overflow(resource, amount)))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn account(&self, resource: &str) -> Result<Option<Account>> {
        let client = self.pool.get().await?;
        let sql = "SELECT available, held, used FROM tcc_account WHERE resource = $1";
        match client.query_opt(sql, &[&resource]).await? {
            Some(row) => Ok(Some(Account { available: row.try_get(0)?, held: row.try_get(1)?, used: row.try_get(2)? })),
            None => Ok(None),
        }
    }

    async fn accounts(&self) -> Result<Vec<(String, Account)>> {
        let client = self.pool.get().await?;
        let sql = "SELECT resource, available, held, used FROM tcc_account ORDER BY resource";
        let mut out = Vec::new();
        for row in client.query(sql, &[]).await? {
            let account = Account { available: row.try_get(1)?, held: row.try_get(2)?, used: row.try_get(3)? };
            out.push((row.try_get(0)?, account));
        }
        Ok(out)
    }

    fn holds(&self) -> impl Future<Output = Result<Vec<Hold>>> + Send {
        self.read_holds(i64::MAX)
    }

    fn overdue(&self, cutoff_ms: i64) -> impl Future<Output = Result<Vec<Hold>>> + Send {
        self.read_holds(cutoff_ms)
    }

    async fn store_hold(&self, hold: Hold) -> Result<bool, HoldError> {
        self.hold_here(&hold).await
    }

    async fn release_now(&self, partial: &str) -> Result<i64> {
        let mut client = self.pool.get().await?;
        let mut tx: PgTx<'_> = Tx { open: client.transaction().await? };
        // The guard's row first, then the holds: phase 2's order, so that
        // the two cannot deadlock.
        let sql = "SELECT outcome FROM tcc_guard WHERE partial_id = $1 FOR UPDATE";
        let row = tx.open.query_opt(sql, &[&partial]).await?;
        let outcome: Option<String> = row.map(|r| r.try_get(0)).transpose()?;
        let released = tx.release_in(partial).await?;
        // An undecided try's record goes too, so that a retried try
        // may hold again (as with sled, which keeps no record of tries).
        if outcome.as_deref() == Some("T") {
            tx.open.execute("DELETE FROM tcc_guard WHERE partial_id = $1", &[&partial]).await?;
        }
        tx.open.commit().await?;
        Ok(released)
    }
}
