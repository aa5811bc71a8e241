//! The embedded SQLite store: one file, WAL mode, for a single batchd process.

use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

use super::StoreOptions;
use super::sql;
use crate::domain::{ApiKey, Batch, BatchEvent, BatchId};
use crate::error::{Error, Result};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The batches whose ids are in the JSON array $1.
const SELECT_BATCHES: &str = concat!(
    "SELECT ",
    sql::batch_columns!(),
    " FROM batches WHERE id IN (SELECT value FROM json_each($1))"
);

/// Copies the metadata pairs of batch $1 into `batch_metadata`, the index of the list's
/// metadata filter.
const INDEX_METADATA: &str = "INSERT INTO batch_metadata (batch_seq, user_id, meta_key, \
     meta_value) SELECT b.seq, b.user_id, m.key, m.value FROM batches b, \
     json_each(b.metadata) m WHERE b.id = $1";

/// Batches in a SQLite database file.
pub struct SqliteStore {
    pool: SqlitePool,
    health: sql::HealthConnection<Sqlite>,
}

sql::impl_store!(SqliteStore, Sqlite, "sqlite" {});

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
        let health = sql::HealthConnection::new(connect.clone());
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
        Ok(SqliteStore { pool, health })
    }

    async fn migrate_schema(&self) -> Result<()> {
        Ok(MIGRATOR.run(&self.pool).await?)
    }

    /// A write transaction that takes the database's write lock up front. A deferred
    /// transaction takes it at its first write and, when another writer committed in
    /// between, fails with SQLITE_BUSY instead of waiting.
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    async fn insert_batch_with_event(&self, batch: &Batch) -> Result<()> {
        let mut tx = self.begin_write().await?;
        Self::insert_batch_in(&mut tx, batch).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Inserts a batch, its metadata index rows and its first event inside `tx`.
    async fn insert_batch_in(tx: &mut Transaction<'static, Sqlite>, batch: &Batch) -> Result<()> {
        sql::bind_new_batch!(sqlx::query(sql::INSERT_BATCH), batch)
            .execute(&mut **tx)
            .await?;
        if batch.metadata.is_some() {
            sqlx::query(INDEX_METADATA)
                .bind(batch.id.as_str())
                .execute(&mut **tx)
                .await?;
        }
        append_event(tx, batch).await
    }

    /// The write lock from the idempotency key's check to the batch's insert.
    async fn begin_claim(&self) -> Result<Transaction<'static, Sqlite>> {
        self.begin_write().await
    }

    async fn commit_change_if_current(&self, next: &Batch) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let updated = sql::bind_changed_batch!(sqlx::query(sql::update_batch_sql!()), next)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if updated == 0 {
            // Dropping the transaction rolls it back; nothing was written anyway.
            return Ok(false);
        }
        append_event(&mut tx, next).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn batches_by_id(&self, ids: &[BatchId]) -> Result<Vec<sql::BatchRow>> {
        let ids: Vec<&str> = ids.iter().map(BatchId::as_str).collect();
        Ok(sqlx::query_as(SELECT_BATCHES)
            .bind(sqlx::types::Json(ids))
            .fetch_all(&self.pool)
            .await?)
    }

    async fn latest_versions_of(&self, ids: &[BatchId]) -> Result<Vec<(String, i64)>> {
        let ids: Vec<&str> = ids.iter().map(BatchId::as_str).collect();
        Ok(sqlx::query_as(
            "SELECT id, version FROM batches WHERE id IN (SELECT value FROM json_each($1))",
        )
        .bind(sqlx::types::Json(ids))
        .fetch_all(&self.pool)
        .await?)
    }

    /// BEGIN IMMEDIATE holds the write lock from the "no key yet" check to the insert.
    async fn begin_first_key_check(&self) -> Result<Transaction<'static, Sqlite>> {
        self.begin_write().await
    }
}

/// Appends `batch` at its version to the event log, inside `tx`.
async fn append_event(tx: &mut Transaction<'static, Sqlite>, batch: &Batch) -> Result<()> {
    sqlx::query(sql::INSERT_EVENT)
        .bind(batch.id.as_str())
        .bind(batch.version)
        .bind(sqlx::types::Json(batch))
        .bind(batch.updated_at.unwrap_or(batch.created_at))
        .execute(&mut **tx)
        .await?;
    Ok(())
}
