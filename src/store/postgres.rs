//! The PostgreSQL store, for deployments with several batchd replicas on one database.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

use super::StoreOptions;
use super::sql;
use crate::domain::{ApiKey, Batch, BatchEvent, BatchId};
use crate::error::{Error, Result};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Inserts a batch, its metadata index rows (`batch_metadata`, for the list's metadata
/// filter) and its first event in one statement (one round trip, atomic).
/// $1..$30 as in [`sql::INSERT_BATCH`] ($11 created_at, $28 version), $31 the snapshot.
const INSERT_BATCH_WITH_EVENT: &str = concat!(
    "WITH inserted AS (",
    "INSERT INTO batches (",
    sql::batch_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
     $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30) \
     RETURNING id, seq, user_id, metadata), \
     indexed AS (INSERT INTO batch_metadata (batch_seq, user_id, meta_key, meta_value) \
     SELECT i.seq, i.user_id, m.key, m.value FROM inserted i, jsonb_each_text(i.metadata) m) \
     INSERT INTO batch_events (batch_id, version, snapshot, at) \
     SELECT id, $28, $31, $11 FROM inserted"
);

/// Replaces a batch if it is still at the previous version and appends the event, in
/// one statement: when the version moved, the UPDATE matches no row and so the INSERT
/// selects nothing. $1..$20 as in [`sql::update_batch_sql!`], $21 the snapshot.
const COMMIT_CHANGE: &str = concat!(
    "WITH changed AS (",
    sql::update_batch_sql!(),
    " RETURNING id) \
     INSERT INTO batch_events (batch_id, version, snapshot, at) \
     SELECT id, $18, $21, $19 FROM changed"
);

/// The batches whose ids are in the array $1.
const SELECT_BATCHES: &str = concat!(
    "SELECT ",
    sql::batch_columns!(),
    " FROM batches WHERE id = ANY($1)"
);

/// Serialises the "first key on an empty table" check across replicas.
const FIRST_KEY_LOCK: i64 = 0x6261_7463_6864_6b31; // "batchdk1"

/// Batches in a PostgreSQL database.
pub struct PostgresStore {
    pool: PgPool,
    health: sql::HealthConnection<Postgres>,
    migration_options: PgConnectOptions,
}

sql::impl_store!(PostgresStore, Postgres, "postgresql" {
    fn postgres_pool(&self) -> Option<PgPool> {
        Some(self.pool.clone())
    }
});

impl PostgresStore {
    /// Connects a pool to `url`, e.g. `postgres://batchd@db:5432/batchd`.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<PostgresStore> {
        let statement_timeout = format!("{}ms", options.call_deadline().as_millis().max(1));
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| Error::invalid("database_url", format!("{e}")))?
            .application_name("batchd")
            .options([
                // The server abandons what batchd's own deadline abandoned.
                ("statement_timeout", statement_timeout.as_str()),
                // sqlx cannot set keepalive on its client sockets; the server's probes
                // find a vanished batchd and end its sessions and their locks.
                ("tcp_keepalives_idle", "10"),
                ("tcp_keepalives_interval", "5"),
                ("tcp_keepalives_count", "3"),
            ]);
        let health = sql::HealthConnection::new(connect.clone().application_name("batchd-health"));
        // A later `-c` wins over an earlier one.
        let migration_options = connect.clone().options([("statement_timeout", "0")]);
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            // sqlx pings every connection before handing it out by default: a second
            // round trip per query. A broken connection shows up as an error of the
            // query itself (UNAVAILABLE) and is dropped from the pool.
            .test_before_acquire(false)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await?;
        Ok(PostgresStore {
            pool,
            health,
            migration_options,
        })
    }

    async fn migrate_schema(&self) -> Result<()> {
        // A migration may rightly take longer than a request's statement_timeout, so
        // it runs on a connection of its own without one.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(self.migration_options.clone())
            .await?;
        // sqlx holds a PostgreSQL advisory lock while migrating, so replicas that start
        // together apply each migration exactly once.
        let migrated = MIGRATOR.run(&pool).await;
        pool.close().await;
        Ok(migrated?)
    }

    async fn insert_batch_with_event(&self, batch: &Batch) -> Result<()> {
        sql::bind_new_batch!(sqlx::query(INSERT_BATCH_WITH_EVENT), batch)
            .bind(sqlx::types::Json(batch))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Inserts a batch and its first event inside `tx`.
    async fn insert_batch_in(tx: &mut Transaction<'static, Postgres>, batch: &Batch) -> Result<()> {
        sql::bind_new_batch!(sqlx::query(INSERT_BATCH_WITH_EVENT), batch)
            .bind(sqlx::types::Json(batch))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// A transaction for an idempotency claim: the primary key on (owner, key) makes a
    /// concurrent claim of the same key wait for this one to commit or roll back.
    async fn begin_claim(&self) -> Result<Transaction<'static, Postgres>> {
        Ok(self.pool.begin().await?)
    }

    async fn commit_change_if_current(&self, next: &Batch) -> Result<bool> {
        let inserted = sql::bind_changed_batch!(sqlx::query(COMMIT_CHANGE), next)
            .bind(sqlx::types::Json(next))
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(inserted == 1)
    }

    async fn batches_by_id(&self, ids: &[BatchId]) -> Result<Vec<sql::BatchRow>> {
        let ids: Vec<&str> = ids.iter().map(BatchId::as_str).collect();
        Ok(sqlx::query_as(SELECT_BATCHES)
            .bind(ids)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn latest_versions_of(&self, ids: &[BatchId]) -> Result<Vec<(String, i64)>> {
        let ids: Vec<&str> = ids.iter().map(BatchId::as_str).collect();
        Ok(
            sqlx::query_as("SELECT id, version FROM batches WHERE id = ANY($1)")
                .bind(ids)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// A transaction holding an advisory lock, so replicas starting together on an
    /// empty database cannot both see "no key yet".
    async fn begin_first_key_check(&self) -> Result<Transaction<'static, Postgres>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(FIRST_KEY_LOCK)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }
}
