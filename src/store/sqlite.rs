//! The embedded SQLite store: one file, WAL mode, for a single batchd process.

use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::types::Json;
use sqlx::{Connection as _, Sqlite, SqliteConnection, SqlitePool, Transaction};

use super::held::HeldConnections;
use super::sql::{self, Backend, FeedRead, FeedRow, HealthConnection, SqlStore};
use super::stored_batch::StoredBatchV1;
use super::{ChangeNotifier, DatabaseStatus, FeedCursor, StoreOptions};
use crate::domain::BatchId;
use crate::error::{Error, Result};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Copies the metadata pairs of batch $1 into `batch_metadata`, the index of the list's
/// metadata filter.
const INDEX_METADATA: &str = "INSERT INTO batch_metadata (batch_seq, user_id, meta_key, \
     meta_value) SELECT b.seq, b.user_id, m.key, m.value FROM batches b, \
     json_each(b.metadata) m WHERE b.id = $1";

/// `(id, version)` of the batches whose ids are in the JSON array $1.
const SELECT_VERSIONS: &str =
    "SELECT id, version FROM batches WHERE id IN (SELECT value FROM json_each($1))";

/// The highest feed position ever written: the highest in the log, or the compaction
/// watermark when compaction removed the newest events (every event of a deleted batch
/// goes in time, its deletion too), so that no position is ever given out twice.
const HIGHEST_POSITION: &str = "(SELECT max(COALESCE(MAX(position), 0), \
     (SELECT through_position FROM feed_compaction)) FROM batch_events)";

/// Appends one version to the event log: batch id, version, snapshot, commit time, and
/// the next feed position (the write lock makes it the order of commit).
static INSERT_EVENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO batch_events (batch_id, version, snapshot, at, owner, position) \
         VALUES ($1, $2, $3, $4, $5, {HIGHEST_POSITION} + 1)"
    )
});

/// The highest feed position written.
static FEED_HORIZON: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {HIGHEST_POSITION}"));

/// Events at positions after $1 up to $2, in order, at most $3, and in the second form
/// of owner $4 only (through the index of each owner's changes); each with the status
/// of the version before it and the compaction watermark.
static SELECT_CHANGES: std::sync::LazyLock<[String; 3]> = std::sync::LazyLock::new(|| {
    sql::feed_forms(
        "SELECT 0 AS \"transaction\", e.position, e.version, {snapshot}, \
         {previous_status} AS previous_status, \
         w.through_transaction AS compacted_transaction, \
         w.through_position AS compacted_position \
         FROM batch_events e CROSS JOIN feed_compaction w \
         LEFT JOIN batch_events p ON p.batch_id = e.batch_id AND p.version = e.version - 1 \
         WHERE e.position > $1 AND e.position <= $2{owner} ORDER BY e.position LIMIT $3",
        4,
        |alias, field| format!("({alias}.snapshot ->> '$.{field}')"),
    )
});

/// Batches in a SQLite database file.
pub(super) type SqliteStore = SqlStore<SqliteBackend>;

/// What SQLite does its own way: one writer at a time, so every write transaction
/// takes the write lock up front; lists of ids as one JSON array.
pub(super) struct SqliteBackend;

impl SqliteStore {
    /// Opens (creating if missing) the database at `url`, e.g. `sqlite://batchd.db`.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<SqliteStore> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::invalid("database_url", format!("{e}")))?
            .create_if_missing(true)
            // WAL lets reads proceed while one writer commits.
            .journal_mode(SqliteJournalMode::Wal)
            // FULL syncs the WAL on every commit: an acknowledged change survives a
            // power cut, not only a crash of batchd.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(options.acquire_timeout);
        let health = HealthConnection::new(connect.clone());
        // Each connection to `:memory:` would be a database of its own.
        let max_connections = if connect.get_filename().as_os_str() == ":memory:" {
            1
        } else {
            options.max_connections
        };
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            // sqlx pings every connection before handing it out by default: a second
            // round trip per query. A broken connection shows up as an error of the
            // query itself (UNAVAILABLE) and is dropped from the pool.
            .test_before_acquire(false)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await?;
        let status = DatabaseStatus::default();
        Ok(SqlStore {
            held: HeldConnections::new(pool.clone(), max_connections, status.clone()),
            pool,
            health,
            status,
            backend: SqliteBackend,
        })
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    type Db = Sqlite;
    const SYSTEM: &'static str = "sqlite";

    async fn migrate(&self, pool: &SqlitePool) -> Result<()> {
        Ok(MIGRATOR.run(pool).await?)
    }

    /// BEGIN IMMEDIATE takes the database's write lock up front. A deferred
    /// transaction takes it at its first write and, when another writer committed in
    /// between, fails with SQLITE_BUSY instead of waiting.
    async fn begin_write(pool: &SqlitePool) -> Result<Transaction<'static, Sqlite>> {
        Ok(pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// The write lock alone keeps the "no key yet" check true until the insert.
    async fn begin_first_key_check(pool: &SqlitePool) -> Result<Transaction<'static, Sqlite>> {
        Self::begin_write(pool).await
    }

    async fn insert_batch(connection: &mut SqliteConnection, batch: &StoredBatchV1) -> Result<()> {
        let mut tx = connection.begin_with("BEGIN IMMEDIATE").await?;
        Self::insert_batch_in(&mut tx, batch).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn insert_batch_in(
        connection: &mut SqliteConnection,
        batch: &StoredBatchV1,
    ) -> Result<()> {
        let mut insert = sqlx::QueryBuilder::new("");
        sql::push_insert_batch::<Sqlite>(&mut insert, batch);
        insert.build().execute(&mut *connection).await?;
        if batch.has_metadata() {
            sqlx::query(INDEX_METADATA)
                .bind(batch.id())
                .execute(&mut *connection)
                .await?;
        }
        append_event(connection, batch).await
    }

    async fn commit_change(
        connection: &mut SqliteConnection,
        next: &StoredBatchV1,
    ) -> Result<bool> {
        let mut tx = connection.begin_with("BEGIN IMMEDIATE").await?;
        if !Self::commit_change_in(&mut tx, next).await? {
            // Dropping the transaction rolls it back; nothing was written anyway.
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn commit_change_in(
        connection: &mut SqliteConnection,
        next: &StoredBatchV1,
    ) -> Result<bool> {
        let mut update = sqlx::QueryBuilder::new("");
        sql::push_update_if_current::<Sqlite>(&mut update, next);
        if update
            .build()
            .execute(&mut *connection)
            .await?
            .rows_affected()
            == 0
        {
            return Ok(false);
        }
        append_event(connection, next).await?;
        Ok(true)
    }

    /// One write transaction, one statement pair per change: SQLite's cost is the
    /// commit (a sync of the WAL), which the changes share.
    async fn commit_changes(
        connection: &mut SqliteConnection,
        nexts: &[StoredBatchV1],
    ) -> Result<Vec<bool>> {
        let mut tx = connection.begin_with("BEGIN IMMEDIATE").await?;
        let mut written = Vec::with_capacity(nexts.len());
        for next in nexts {
            let mut update = sqlx::QueryBuilder::new("");
            sql::push_update_if_current::<Sqlite>(&mut update, next);
            let updated = update.build().execute(&mut *tx).await?.rows_affected() == 1;
            if updated {
                append_event(&mut tx, next).await?;
            }
            written.push(updated);
        }
        tx.commit().await?;
        Ok(written)
    }

    async fn batches_by_id(
        connection: &mut SqliteConnection,
        ids: &[BatchId],
    ) -> Result<Vec<StoredBatchV1>> {
        let ids: Vec<&str> = ids.iter().map(BatchId::as_str).collect();
        Ok(sqlx::query_as(SELECT_BATCHES.as_str())
            .bind(Json(ids))
            .fetch_all(connection)
            .await?)
    }

    async fn versions_by_id(pool: &SqlitePool, ids: &[BatchId]) -> Result<Vec<(String, i64)>> {
        let ids: Vec<&str> = ids.iter().map(BatchId::as_str).collect();
        Ok(sqlx::query_as(SELECT_VERSIONS)
            .bind(Json(ids))
            .fetch_all(pool)
            .await?)
    }

    /// The horizon is read first: a write committed between the two reads is then
    /// above it and left for the next read, never passed over.
    async fn changes_after(
        pool: &SqlitePool,
        after: FeedCursor,
        read: FeedRead<'_>,
        limit: i64,
    ) -> Result<(Vec<FeedRow>, FeedCursor, Option<i64>)> {
        let (form, owner) = (read.form(), read.owner());
        let horizon = Self::feed_head(pool).await?;
        let mut read = sqlx::query_as(sqlx::AssertSqlSafe(&*SELECT_CHANGES[form]))
            .bind(after.position)
            .bind(horizon.position)
            .bind(limit);
        if let Some(owner) = owner {
            read = read.bind(owner);
        }
        let rows: Vec<FeedRow> = read.fetch_all(pool).await?;
        // Commit order is writing order: nothing committed is ever held back.
        Ok((rows, horizon, None))
    }

    async fn feed_head(pool: &SqlitePool) -> Result<FeedCursor> {
        let (highest,): (i64,) = sqlx::query_as(FEED_HORIZON.as_str())
            .fetch_one(pool)
            .await?;
        Ok(FeedCursor {
            transaction: 0,
            position: highest,
        })
    }

    // Every committed event is readable: positions are commit order.
    const READABLE_BY_THE_FEED: &'static str = "TRUE";

    fn transaction_of(_alias: &str) -> String {
        "0".to_owned()
    }

    fn notifier(&self) -> Option<Arc<dyn ChangeNotifier>> {
        None
    }

    const CLAIM_LOCK: &'static str = "";

    const LOCK_OWNER_ENDPOINTS: Option<&'static str> = None;

    const LOCK_OWNER_BATCHES: Option<&'static str> = None;

    const LOCK_SKIPPING_LOCKED: &'static str = "";

    const LOCK_FOR_UPDATE: &'static str = "";

    const LOCK_KEY_SHARE: &'static str = "";

    const LOCK_TO_CHANGE_SKIPPING_LOCKED: &'static str = "";

    /// One statement per deletion: each takes the next feed position.
    async fn log_deletions(
        tx: &mut Transaction<'static, Sqlite>,
        gone: &[(String, i64)],
        at: i64,
    ) -> Result<()> {
        for (id, version) in gone {
            sqlx::query(LOG_DELETION.as_str())
                .bind(id)
                .bind(version)
                .bind(at)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

/// Logs the deletion of batch $1 at version $2 at $3: the event after that version,
/// with its snapshot, at the next feed position.
static LOG_DELETION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO batch_events (batch_id, version, snapshot, at, owner, deleted, position) \
         SELECT batch_id, version + 1, snapshot, $3, owner, TRUE, {HIGHEST_POSITION} + 1 \
         FROM batch_events WHERE batch_id = $1 AND version = $2"
    )
});

/// The batches whose ids are in the JSON array $1.
static SELECT_BATCHES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {} FROM batches WHERE id IN (SELECT value FROM json_each($1))",
        *sql::BATCH_COLUMNS
    )
});

/// Appends `batch` at its version to the event log, inside the connection's transaction.
async fn append_event(connection: &mut SqliteConnection, batch: &StoredBatchV1) -> Result<()> {
    sqlx::query(INSERT_EVENT.as_str())
        .bind(batch.id())
        .bind(batch.version())
        .bind(Json(batch))
        .bind(batch.committed_at())
        .bind(batch.owner())
        .execute(connection)
        .await?;
    Ok(())
}
