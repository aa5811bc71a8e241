//! SQL text and row mapping shared by both backends. Placeholders are `$n`, which
//! PostgreSQL and SQLite (through sqlx) both bind by number, and JSON columns go
//! through `sqlx::types::Json` (JSONB in PostgreSQL, TEXT in SQLite).

use std::collections::BTreeMap;

use sqlx::FromRow;
use sqlx::types::Json;

use crate::domain::{
    ApiKey, Batch, BatchErrorEntry, BatchEvent, BatchId, BatchStatus, OutputExpiresAfter,
    RequestCounts, Scope, Usage,
};
use crate::error::{Error, Result};

/// The columns of `batches` that make up a [`Batch`], in binding order.
macro_rules! batch_columns {
    () => {
        "id, user_id, api_key_id, endpoint, input_file_id, completion_window, status, \
         output_file_id, error_file_id, errors, created_at, in_progress_at, expires_at, \
         finalizing_at, completed_at, failed_at, expired_at, cancelling_at, cancelled_at, \
         request_total, request_completed, request_failed, metadata, model, usage, job_id, \
         remark, version, updated_at, output_expires_after"
    };
}
pub(super) use batch_columns;

/// Inserts a batch; binds with [`bind_new_batch!`].
pub(super) const INSERT_BATCH: &str = concat!(
    "INSERT INTO batches (",
    batch_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
     $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30)"
);

/// Binds every column of [`INSERT_BATCH`], in order, from a `&Batch`.
macro_rules! bind_new_batch {
    ($query:expr, $batch:expr) => {{
        let b: &$crate::domain::Batch = $batch;
        $query
            .bind(b.id.as_str())
            .bind(&b.user_id)
            .bind(&b.api_key_id)
            .bind(&b.endpoint)
            .bind(&b.input_file_id)
            .bind(&b.completion_window)
            .bind(b.status.as_str())
            .bind(&b.output_file_id)
            .bind(&b.error_file_id)
            .bind($crate::store::sql::errors_column(b))
            .bind(b.created_at)
            .bind(b.in_progress_at)
            .bind(b.expires_at)
            .bind(b.finalizing_at)
            .bind(b.completed_at)
            .bind(b.failed_at)
            .bind(b.expired_at)
            .bind(b.cancelling_at)
            .bind(b.cancelled_at)
            .bind(b.request_counts.total)
            .bind(b.request_counts.completed)
            .bind(b.request_counts.failed)
            .bind(b.metadata.as_ref().map(sqlx::types::Json))
            .bind(&b.model)
            .bind(b.usage.map(sqlx::types::Json))
            .bind(&b.job_id)
            .bind(&b.remark)
            .bind(b.version)
            .bind(b.updated_at)
            .bind(b.output_expires_after.map(sqlx::types::Json))
    }};
}
pub(super) use bind_new_batch;

/// Replaces the mutable columns of a batch if it is still at the previous version.
/// Binds with [`bind_changed_batch!`]: $1 id, $2..$19 the columns, $20 previous version.
macro_rules! update_batch_sql {
    () => {
        "UPDATE batches SET status = $2, output_file_id = $3, error_file_id = $4, \
         errors = $5, in_progress_at = $6, finalizing_at = $7, completed_at = $8, \
         failed_at = $9, expired_at = $10, cancelling_at = $11, cancelled_at = $12, \
         request_total = $13, request_completed = $14, request_failed = $15, model = $16, \
         usage = $17, version = $18, updated_at = $19 \
         WHERE id = $1 AND version = $20"
    };
}
pub(super) use update_batch_sql;

/// Binds $1..$20 of [`update_batch_sql!`] from the new version of a batch.
macro_rules! bind_changed_batch {
    ($query:expr, $batch:expr) => {{
        let b: &$crate::domain::Batch = $batch;
        $query
            .bind(b.id.as_str())
            .bind(b.status.as_str())
            .bind(&b.output_file_id)
            .bind(&b.error_file_id)
            .bind($crate::store::sql::errors_column(b))
            .bind(b.in_progress_at)
            .bind(b.finalizing_at)
            .bind(b.completed_at)
            .bind(b.failed_at)
            .bind(b.expired_at)
            .bind(b.cancelling_at)
            .bind(b.cancelled_at)
            .bind(b.request_counts.total)
            .bind(b.request_counts.completed)
            .bind(b.request_counts.failed)
            .bind(&b.model)
            .bind(b.usage.map(sqlx::types::Json))
            .bind(b.version)
            .bind(b.updated_at)
            .bind(b.version - 1)
    }};
}
pub(super) use bind_changed_batch;

/// Appends one version to the event log: $1 batch id, $2 version, $3 snapshot, $4 at.
pub(super) const INSERT_EVENT: &str =
    "INSERT INTO batch_events (batch_id, version, snapshot, at) VALUES ($1, $2, $3, $4)";

/// Frees key $2 of owner $1 if its claim was made before $3 (expired).
pub(super) const RELEASE_EXPIRED_IDEMPOTENCY_KEY: &str = "DELETE FROM idempotency_keys \
     WHERE user_id = $1 AND idempotency_key = $2 AND created_at < $3";

/// Claims key $2 of owner $1 for request $3 and batch $4 at $5, unless it is taken.
pub(super) const CLAIM_IDEMPOTENCY_KEY: &str = "INSERT INTO idempotency_keys \
     (user_id, idempotency_key, request_sha256, batch_id, created_at) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id, idempotency_key) DO NOTHING";

/// The claim on key $2 of owner $1.
pub(super) const SELECT_IDEMPOTENCY_KEY: &str = "SELECT batch_id, request_sha256 \
     FROM idempotency_keys WHERE user_id = $1 AND idempotency_key = $2";

/// Deletes at most $2 idempotency keys claimed before $1.
pub(super) const FORGET_IDEMPOTENCY_KEYS: &str = "DELETE FROM idempotency_keys \
     WHERE (user_id, idempotency_key) IN (SELECT user_id, idempotency_key \
     FROM idempotency_keys WHERE created_at < $1 LIMIT $2)";

/// The batch with id $1.
pub(super) const SELECT_BATCH: &str =
    concat!("SELECT ", batch_columns!(), " FROM batches WHERE id = $1");

/// Deletes at most $2 events older than $1, keeping the latest version of every batch.
pub(super) const COMPACT_EVENTS: &str = "DELETE FROM batch_events \
     WHERE (batch_id, version) IN (SELECT e.batch_id, e.version FROM batch_events e \
     JOIN batches b ON b.id = e.batch_id WHERE e.at < $1 AND e.version < b.version LIMIT $2)";

/// Batches whose timer is due: running past $1, or cancelling since $2; at most $3.
pub(super) const SELECT_DUE_BATCHES: &str = concat!(
    "SELECT ",
    batch_columns!(),
    " FROM batches WHERE (status IN ('validating', 'in_progress', 'finalizing') \
     AND expires_at <= $1) OR (status = 'cancelling' AND cancelling_at <= $2) \
     ORDER BY seq LIMIT $3"
);

/// Events of batch $1 after version $2, oldest first, at most $3.
pub(super) const SELECT_EVENTS_AFTER: &str = "SELECT version, snapshot, at FROM batch_events \
     WHERE batch_id = $1 AND version > $2 ORDER BY version LIMIT $3";

/// The API key columns, in [`ApiKeyRow`] order.
macro_rules! api_key_columns {
    () => {
        "id, user_id, scope, created_at, revoked_at"
    };
}

/// Inserts a key: $1 id, $2 digest, $3 user, $4 scope, $5 created_at.
pub(super) const INSERT_API_KEY: &str = "INSERT INTO api_keys \
     (id, secret_sha256, user_id, scope, created_at) VALUES ($1, $2, $3, $4, $5)";

/// Binds $1..$5 of [`INSERT_API_KEY`].
macro_rules! bind_api_key {
    ($query:expr, $key:expr, $digest:expr) => {{
        let key: &$crate::domain::ApiKey = $key;
        let digest: &[u8; 32] = $digest;
        $query
            .bind(&key.id)
            .bind(&digest[..])
            .bind(&key.user_id)
            .bind(key.scope.as_str())
            .bind(key.created_at)
    }};
}
pub(super) use bind_api_key;

/// Whether any key exists.
pub(super) const ANY_API_KEY: &str = "SELECT EXISTS (SELECT 1 FROM api_keys)";

/// The key with digest $1.
pub(super) const SELECT_API_KEY_BY_DIGEST: &str = concat!(
    "SELECT ",
    api_key_columns!(),
    " FROM api_keys WHERE secret_sha256 = $1"
);

/// Every key, oldest first.
pub(super) const SELECT_API_KEYS: &str = concat!(
    "SELECT ",
    api_key_columns!(),
    " FROM api_keys ORDER BY created_at, id"
);

/// Revokes key $1 at $2, keeping an earlier revocation.
pub(super) const REVOKE_API_KEY: &str =
    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1";

/// Implements [`super::Store`] for a backend struct that has a `pool` field and the
/// inherent methods that differ between backends (`migrate_schema`,
/// `insert_batch_with_event`, `commit_change_if_current`, `begin_first_key_check`,
/// `latest_versions_of`). Trait methods only one backend overrides follow in braces.
/// Every query both backends share is written once, here.
macro_rules! impl_store {
    ($store:ty, $db:ty, $system:literal { $($backend_specific:item)* }) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            #[tracing::instrument(level = "debug", name = "store.migrate", skip_all, fields(db.system = $system))]
            async fn migrate(&self) -> Result<()> {
                self.migrate_schema().await
            }

            #[tracing::instrument(level = "debug", name = "store.ping", skip_all, fields(db.system = $system))]
            async fn ping(&self) -> Result<()> {
                self.health.ping().await
            }

            #[tracing::instrument(level = "debug", name = "store.insert_batch", skip_all, fields(db.system = $system, batch_id = %batch.id))]
            async fn insert_batch(&self, batch: &Batch) -> Result<()> {
                self.insert_batch_with_event(batch).await
            }

            #[tracing::instrument(level = "debug", name = "store.insert_batch_once", skip_all, fields(db.system = $system, batch_id = %batch.id))]
            async fn insert_batch_once(
                &self,
                batch: &Batch,
                claim: $crate::store::IdempotencyClaim<'_>,
            ) -> Result<Option<$crate::store::EarlierClaim>> {
                let mut tx = self.begin_claim().await?;
                sqlx::query(sql::RELEASE_EXPIRED_IDEMPOTENCY_KEY)
                    .bind(claim.user_id)
                    .bind(claim.key)
                    .bind(claim.expired_before)
                    .execute(&mut *tx)
                    .await?;
                let claimed = sqlx::query(sql::CLAIM_IDEMPOTENCY_KEY)
                    .bind(claim.user_id)
                    .bind(claim.key)
                    .bind(&claim.request_sha256[..])
                    .bind(batch.id.as_str())
                    .bind(claim.at)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if claimed == 0 {
                    // Taken by a live claim (on PostgreSQL the INSERT waited for the
                    // transaction that made it to commit, so it is visible now).
                    let (batch_id, request_sha256): (String, Vec<u8>) =
                        sqlx::query_as(sql::SELECT_IDEMPOTENCY_KEY)
                            .bind(claim.user_id)
                            .bind(claim.key)
                            .fetch_one(&mut *tx)
                            .await?;
                    return Ok(Some($crate::store::EarlierClaim {
                        batch_id,
                        request_sha256,
                    }));
                }
                Self::insert_batch_in(&mut tx, batch).await?;
                tx.commit().await?;
                Ok(None)
            }

            #[tracing::instrument(level = "debug", name = "store.forget_idempotency_keys", skip_all, fields(db.system = $system))]
            async fn forget_idempotency_keys(&self, before_at: i64, limit: i64) -> Result<u64> {
                let result = sqlx::query(sql::FORGET_IDEMPOTENCY_KEYS)
                    .bind(before_at)
                    .bind(limit)
                    .execute(&self.pool)
                    .await?;
                Ok(result.rows_affected())
            }

            #[tracing::instrument(level = "debug", name = "store.get_batch", skip_all, fields(db.system = $system, batch_id = %id))]
            async fn get_batch(&self, id: &BatchId) -> Result<Option<Batch>> {
                sqlx::query_as::<_, sql::BatchRow>(sql::SELECT_BATCH)
                    .bind(id.as_str())
                    .fetch_optional(&self.pool)
                    .await?
                    .map(Batch::try_from)
                    .transpose()
            }

            #[tracing::instrument(level = "debug", name = "store.get_batches", skip_all, fields(db.system = $system, batches = ids.len()))]
            async fn get_batches(&self, ids: &[BatchId]) -> Result<Vec<Batch>> {
                match ids {
                    [] => Ok(Vec::new()),
                    [id] => Ok(self.get_batch(id).await?.into_iter().collect()),
                    _ => sql::convert_all(self.batches_by_id(ids).await?),
                }
            }

            #[tracing::instrument(level = "debug", name = "store.list_batches", skip_all, fields(db.system = $system))]
            async fn list_batches(
                &self,
                query: $crate::store::BatchPageQuery<'_>,
            ) -> Result<Vec<Batch>> {
                let rows = sql::page_query::<$db>(query)
                    .build_query_as::<sql::BatchRow>()
                    .fetch_all(&self.pool)
                    .await?;
                sql::convert_all(rows)
            }

            #[tracing::instrument(level = "debug", name = "store.commit_change", skip_all, fields(db.system = $system, batch_id = %next.id, version = next.version))]
            async fn commit_change(&self, next: &Batch) -> Result<bool> {
                self.commit_change_if_current(next).await
            }

            #[tracing::instrument(level = "debug", name = "store.events_after", skip_all, fields(db.system = $system, batch_id = %id, after_version))]
            async fn events_after(
                &self,
                id: &BatchId,
                after_version: i64,
                limit: i64,
            ) -> Result<Vec<BatchEvent>> {
                let rows = sqlx::query_as::<_, sql::EventRow>(sql::SELECT_EVENTS_AFTER)
                    .bind(id.as_str())
                    .bind(after_version)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows.into_iter().map(BatchEvent::from).collect())
            }

            #[tracing::instrument(level = "debug", name = "store.insert_api_key", skip_all, fields(db.system = $system))]
            async fn insert_api_key(&self, key: &ApiKey, secret_digest: &[u8; 32]) -> Result<()> {
                sql::bind_api_key!(sqlx::query(sql::INSERT_API_KEY), key, secret_digest)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            #[tracing::instrument(level = "debug", name = "store.insert_first_api_key", skip_all, fields(db.system = $system))]
            async fn insert_first_api_key(
                &self,
                key: &ApiKey,
                secret_digest: &[u8; 32],
            ) -> Result<bool> {
                let mut tx = self.begin_first_key_check().await?;
                let any: bool = sqlx::query_scalar(sql::ANY_API_KEY)
                    .fetch_one(&mut *tx)
                    .await?;
                if any {
                    return Ok(false);
                }
                sql::bind_api_key!(sqlx::query(sql::INSERT_API_KEY), key, secret_digest)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(true)
            }

            #[tracing::instrument(level = "debug", name = "store.api_key_by_digest", skip_all, fields(db.system = $system))]
            async fn api_key_by_digest(&self, secret_digest: &[u8; 32]) -> Result<Option<ApiKey>> {
                sqlx::query_as::<_, sql::ApiKeyRow>(sql::SELECT_API_KEY_BY_DIGEST)
                    .bind(&secret_digest[..])
                    .fetch_optional(&self.pool)
                    .await?
                    .map(ApiKey::try_from)
                    .transpose()
            }

            #[tracing::instrument(level = "debug", name = "store.list_api_keys", skip_all, fields(db.system = $system))]
            async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
                let rows = sqlx::query_as::<_, sql::ApiKeyRow>(sql::SELECT_API_KEYS)
                    .fetch_all(&self.pool)
                    .await?;
                sql::convert_all(rows)
            }

            #[tracing::instrument(level = "debug", name = "store.revoke_api_key", skip_all, fields(db.system = $system))]
            async fn revoke_api_key(&self, id: &str, at: i64) -> Result<bool> {
                let result = sqlx::query(sql::REVOKE_API_KEY)
                    .bind(id)
                    .bind(at)
                    .execute(&self.pool)
                    .await?;
                Ok(result.rows_affected() == 1)
            }

            #[tracing::instrument(level = "debug", name = "store.revoked_api_keys", skip_all, fields(db.system = $system, keys = ids.len()))]
            async fn revoked_api_keys(&self, ids: &[String]) -> Result<Vec<String>> {
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let mut query = sqlx::QueryBuilder::<$db>::new(
                    "SELECT id FROM api_keys WHERE revoked_at IS NOT NULL AND id IN (",
                );
                let mut list = query.separated(", ");
                for id in ids {
                    list.push_bind(id.as_str());
                }
                query.push(")");
                Ok(query.build_query_scalar().fetch_all(&self.pool).await?)
            }

            #[tracing::instrument(level = "debug", name = "store.latest_versions", skip_all, fields(db.system = $system, batches = ids.len()))]
            async fn latest_versions(&self, ids: &[BatchId]) -> Result<Vec<(BatchId, i64)>> {
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let rows = self.latest_versions_of(ids).await?;
                rows.into_iter()
                    .map(|(id, version)| {
                        let id = BatchId::parse("id", &id).map_err(|e| Error::Internal(e.to_string()))?;
                        Ok((id, version))
                    })
                    .collect()
            }

            #[tracing::instrument(level = "debug", name = "store.compact_events", skip_all, fields(db.system = $system))]
            async fn compact_events(&self, before_at: i64, limit: i64) -> Result<u64> {
                let result = sqlx::query(sql::COMPACT_EVENTS)
                    .bind(before_at)
                    .bind(limit)
                    .execute(&self.pool)
                    .await?;
                Ok(result.rows_affected())
            }

            #[tracing::instrument(level = "debug", name = "store.due_batches", skip_all, fields(db.system = $system))]
            async fn due_batches(
                &self,
                now: i64,
                cancelling_before: i64,
                limit: i64,
            ) -> Result<Vec<Batch>> {
                let rows = sqlx::query_as::<_, sql::BatchRow>(sql::SELECT_DUE_BATCHES)
                    .bind(now)
                    .bind(cancelling_before)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?;
                sql::convert_all(rows)
            }

            fn pool_usage(&self) -> (u32, u32) {
                (self.pool.size(), self.pool.num_idle() as u32)
            }

            async fn close(&self) {
                self.pool.close().await;
            }

            $($backend_specific)*
        }
    };
}
pub(super) use impl_store;

/// The connection readiness checks use, apart from the request pool: a pool that
/// clients saturate (or that waits on a database that stopped answering) must not make
/// the check fail or hang with it. A check that fails or is abandoned (its future
/// dropped by a timeout) closes the connection; the next one opens a new one.
pub(super) struct HealthConnection<DB: sqlx::Database> {
    options: <DB::Connection as sqlx::Connection>::Options,
    connection: tokio::sync::Mutex<Option<DB::Connection>>,
}

impl<DB: sqlx::Database> HealthConnection<DB> {
    /// Connects on first use with `options`.
    pub(super) fn new(options: <DB::Connection as sqlx::Connection>::Options) -> Self {
        HealthConnection {
            options,
            connection: tokio::sync::Mutex::new(None),
        }
    }

    /// Succeeds when the database answers a ping on this connection.
    pub(super) async fn ping(&self) -> Result<()> {
        use sqlx::{ConnectOptions, Connection};
        let mut slot = self.connection.lock().await;
        // Taken out while in use: if this future is dropped midway, the connection,
        // in an unknown state, is dropped (closed) with it.
        let mut connection = match slot.take() {
            Some(connection) => connection,
            None => self.options.connect().await?,
        };
        connection.ping().await?;
        *slot = Some(connection);
        Ok(())
    }
}

/// Builds the page query for either backend. Insertion order (`seq`) is the order of
/// a list: unique, so a cursor is exact even when batches share a `created_at`. Each
/// filter has an index (migrations): owner and status, owner and creation time, job,
/// and the metadata pairs in `batch_metadata`.
///
/// Several statuses are one ordered index range each, merged: with `status IN (..)`
/// SQLite would rather walk all of an owner's batches in `seq` order than sort the few
/// that match, which for a tenant with a million batches and a rare status is a scan.
pub(super) fn page_query<'a, DB>(query: super::BatchPageQuery<'a>) -> sqlx::QueryBuilder<DB>
where
    DB: sqlx::Database,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let direction = if query.oldest_first { "ASC" } else { "DESC" };
    if query.statuses.len() <= 1 {
        let mut sql = sqlx::QueryBuilder::new("");
        push_page(&mut sql, &query, query.statuses.first().copied());
        return sql;
    }
    let mut sql = sqlx::QueryBuilder::new(concat!("SELECT ", batch_columns!(), " FROM ("));
    for (i, &status) in query.statuses.iter().enumerate() {
        if i > 0 {
            sql.push(" UNION ALL ");
        }
        sql.push("SELECT * FROM (");
        push_page(&mut sql, &query, Some(status));
        sql.push(format_args!(") AS status_{i}"));
    }
    sql.push(format_args!(") AS pages ORDER BY seq {direction} LIMIT "))
        .push_bind(query.limit);
    sql
}

/// One page of the batches in `status` (any when `None`) matching the other filters:
/// `SELECT seq, <the batch columns> ... ORDER BY seq LIMIT`.
fn push_page<'a, DB>(
    sql: &mut sqlx::QueryBuilder<DB>,
    query: &super::BatchPageQuery<'a>,
    status: Option<BatchStatus>,
) where
    DB: sqlx::Database,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    sql.push(concat!(
        "SELECT seq, ",
        batch_columns!(),
        " FROM batches WHERE TRUE"
    ));
    if let Some(owner) = query.owner {
        sql.push(" AND user_id = ").push_bind(owner);
    }
    let (before_or_after, direction) = if query.oldest_first {
        (">", "ASC")
    } else {
        ("<", "DESC")
    };
    if let Some(after) = query.after {
        sql.push(format_args!(
            " AND seq {before_or_after} (SELECT seq FROM batches WHERE id = "
        ))
        .push_bind(after.as_str())
        .push(")");
    }
    if let Some(status) = status {
        sql.push(" AND status = ").push_bind(status.as_str());
    }
    if let Some(job_id) = query.job_id {
        sql.push(" AND job_id = ").push_bind(job_id);
    }
    if let Some(after) = query.created_after {
        sql.push(" AND created_at >= ").push_bind(after);
    }
    if let Some(before) = query.created_before {
        sql.push(" AND created_at < ").push_bind(before);
    }
    for (key, value) in query.metadata {
        sql.push(" AND seq IN (SELECT batch_seq FROM batch_metadata WHERE ");
        if let Some(owner) = query.owner {
            sql.push("user_id = ").push_bind(owner).push(" AND ");
        }
        sql.push("meta_key = ")
            .push_bind(key.as_str())
            .push(" AND meta_value = ")
            .push_bind(value.as_str())
            .push(")");
    }
    sql.push(format_args!(" ORDER BY seq {direction} LIMIT "))
        .push_bind(query.limit);
}

/// The `errors` column: `NULL` when the batch has none.
pub(crate) fn errors_column(batch: &Batch) -> Option<Json<&Vec<BatchErrorEntry>>> {
    (!batch.errors.is_empty()).then_some(Json(&batch.errors))
}

/// A row of `batches`.
#[derive(Debug, FromRow)]
pub(super) struct BatchRow {
    id: String,
    user_id: String,
    api_key_id: String,
    endpoint: String,
    input_file_id: String,
    completion_window: String,
    status: String,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    errors: Option<Json<Vec<BatchErrorEntry>>>,
    created_at: i64,
    in_progress_at: Option<i64>,
    expires_at: Option<i64>,
    finalizing_at: Option<i64>,
    completed_at: Option<i64>,
    failed_at: Option<i64>,
    expired_at: Option<i64>,
    cancelling_at: Option<i64>,
    cancelled_at: Option<i64>,
    request_total: i64,
    request_completed: i64,
    request_failed: i64,
    metadata: Option<Json<BTreeMap<String, String>>>,
    model: Option<String>,
    usage: Option<Json<Usage>>,
    job_id: Option<String>,
    remark: Option<String>,
    version: i64,
    updated_at: Option<i64>,
    output_expires_after: Option<Json<OutputExpiresAfter>>,
}

impl TryFrom<BatchRow> for Batch {
    type Error = Error;

    fn try_from(row: BatchRow) -> Result<Batch> {
        let corrupt = |what: String| Error::Internal(format!("batch `{}`: {what}", row.id));
        let status = BatchStatus::from_wire(&row.status)
            .ok_or_else(|| corrupt(format!("unknown stored status `{}`", row.status)))?;
        let id = BatchId::parse("id", &row.id).map_err(|e| corrupt(e.to_string()))?;
        Ok(Batch {
            id,
            endpoint: row.endpoint,
            errors: row.errors.map(|e| e.0).unwrap_or_default(),
            input_file_id: row.input_file_id,
            completion_window: row.completion_window,
            status,
            output_file_id: row.output_file_id,
            error_file_id: row.error_file_id,
            created_at: row.created_at,
            in_progress_at: row.in_progress_at,
            expires_at: row.expires_at,
            finalizing_at: row.finalizing_at,
            completed_at: row.completed_at,
            failed_at: row.failed_at,
            expired_at: row.expired_at,
            cancelling_at: row.cancelling_at,
            cancelled_at: row.cancelled_at,
            request_counts: RequestCounts {
                total: row.request_total,
                completed: row.request_completed,
                failed: row.request_failed,
            },
            metadata: row.metadata.map(|m| m.0),
            model: row.model,
            usage: row.usage.map(|u| u.0),
            job_id: row.job_id,
            remark: row.remark,
            output_expires_after: row.output_expires_after.map(|e| e.0),
            user_id: row.user_id,
            api_key_id: row.api_key_id,
            version: row.version,
            updated_at: row.updated_at,
        })
    }
}

/// A row of `batch_events`.
#[derive(Debug, FromRow)]
pub(super) struct EventRow {
    version: i64,
    snapshot: Json<Batch>,
    at: i64,
}

impl From<EventRow> for BatchEvent {
    fn from(row: EventRow) -> BatchEvent {
        BatchEvent {
            version: row.version,
            batch: row.snapshot.0,
            at: row.at,
        }
    }
}

/// A row of `api_keys` (without the digest).
#[derive(Debug, FromRow)]
pub(super) struct ApiKeyRow {
    id: String,
    user_id: String,
    scope: String,
    created_at: i64,
    revoked_at: Option<i64>,
}

impl TryFrom<ApiKeyRow> for ApiKey {
    type Error = Error;

    fn try_from(row: ApiKeyRow) -> Result<ApiKey> {
        let scope = Scope::parse(&row.scope)
            .map_err(|_| Error::Internal(format!("api key `{}`: bad scope", row.id)))?;
        Ok(ApiKey {
            id: row.id,
            user_id: row.user_id,
            scope,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
        })
    }
}

/// Converts fetched rows, failing on the first corrupt one.
pub(super) fn convert_all<R, T>(rows: Vec<R>) -> Result<Vec<T>>
where
    T: TryFrom<R, Error = Error>,
{
    rows.into_iter().map(T::try_from).collect()
}
