//! Webhook storage: endpoints, the dispatcher's position in the change feed, and the
//! queue of deliveries, written once for both backends like the rest of `sql.rs`.

use async_trait::async_trait;
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, QueryBuilder, Type};

use super::sql::{Backend, SqlDatabase, SqlStore, convert_all, push_list};
use super::{FeedCursor, store_trait};
use crate::error::{Error, Result};

/// Why a revoked key's change of an endpoint is refused.
const KEY_REVOKED: &str = "the API key was revoked";
use crate::domain::webhooks::{
    AfterAttempt, AttemptRecord, AttemptReport, Delivery, DeliveryState, EndpointHealth,
    EndpointSettings, NewDelivery, SealedSecret, WebhookEndpoint, WebhookEventType,
};

/// A claim of due deliveries by one replica.
#[derive(Debug, Clone)]
pub struct DeliveryClaim<'a> {
    /// The claiming replica, recorded as the lease's owner.
    pub replica: &'a str,
    /// Now, Unix milliseconds: deliveries due by now whose lease (if any) ran out.
    pub now_ms: i64,
    /// When the lease runs out, Unix milliseconds.
    pub lease_until_ms: i64,
    /// Endpoints not to claim for (the replica sends to them all it may at once).
    pub busy_endpoints: &'a [String],
    /// Owners whose endpoints not to claim for, likewise.
    pub busy_owners: &'a [String],
    /// Most deliveries of one endpoint to claim.
    pub per_endpoint: i64,
    /// Most deliveries of one owner's endpoints to claim.
    pub per_owner: i64,
    /// Most deliveries to claim.
    pub limit: i64,
}

/// How many deliveries wait, and since when the oldest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeliveryQueue {
    /// Pending deliveries.
    pub pending: i64,
    /// When the oldest pending event happened, Unix seconds.
    pub oldest_created_at: Option<i64>,
}

store_trait! {
    /// Webhook endpoints and deliveries.
    pub trait WebhookStore {
        /// Inserts `endpoint` unless its owner already has `max_per_owner` of its kind (its
        /// own, or all-owners ones); also creates
        /// the dispatcher's position (at the endpoint's start) if there is none yet.
        /// Fails with [`Error::Unauthenticated`] if its configuring key is revoked.
        async fn insert_endpoint(&self, endpoint: &WebhookEndpoint, max_per_owner: i64)
        -> Result<bool>;

        /// The endpoint with this id.
        async fn get_endpoint(&self, id: &str) -> Result<Option<WebhookEndpoint>>;

        /// Endpoints newest first: `owner`'s own, which leaves out its all-owners ones
        /// (every endpoint for `None`), created before endpoint `before` if given; at
        /// most `limit`.
        async fn list_endpoints(
            &self,
            owner: Option<&str>,
            before: Option<&str>,
            limit: i64,
        ) -> Result<Vec<WebhookEndpoint>>;

        /// Replaces the endpoint's settings, secrets, state and configuring key, if its
        /// current secret is still `expected_secret` (no other change got in between) and
        /// that key is not revoked; `false` otherwise.
        async fn update_endpoint(
            &self,
            endpoint: &WebhookEndpoint,
            expected_secret: &SealedSecret,
        ) -> Result<bool>;

        /// Deletes the endpoint and its deliveries.
        async fn delete_endpoint(&self, id: &str) -> Result<bool>;

        /// The enabled endpoints that follow any of `owners`' batches (an all-owners
        /// endpoint only while its key is not revoked).
        async fn endpoints_following(&self, owners: &[&str]) -> Result<Vec<WebhookEndpoint>>;

        /// Where the dispatcher is; `start` when it has no position yet (which is then
        /// stored).
        async fn dispatch_position(&self, start: FeedCursor) -> Result<FeedCursor>;

        /// Moves the dispatcher from `from` to `to` and queues `deliveries`, atomically;
        /// `false`, writing nothing, if it is no longer at `from` (another replica moved
        /// it). A delivery of an event already queued for its endpoint is left out.
        async fn queue_deliveries(
            &self,
            from: FeedCursor,
            to: FeedCursor,
            deliveries: &[NewDelivery],
        ) -> Result<bool>;

        /// Leases due deliveries to a replica, at most `per_endpoint` of any one endpoint
        /// and `per_owner` of any one owner, taking the owners in turn (each owner's
        /// longest due first).
        async fn claim_deliveries(&self, claim: &DeliveryClaim<'_>) -> Result<Vec<Delivery>>;

        /// Gives back leases a replica took but will not use.
        async fn release_deliveries(&self, replica: &str, ids: &[String]) -> Result<()>;

        /// Records an attempt on delivery `id` of `endpoint_id` and its consequences, if
        /// `replica` still holds its lease; `false` otherwise.
        async fn record_attempt(
            &self,
            replica: &str,
            endpoint_id: &str,
            id: &str,
            attempt: &AttemptRecord,
        ) -> Result<bool>;

        /// An endpoint's deliveries, newest first, at most `limit`.
        async fn list_deliveries(&self, endpoint_id: &str, limit: i64) -> Result<Vec<Delivery>>;

        /// Makes delivery `id` of `endpoint_id` due at `now_ms` (again, with a fresh
        /// count of attempts if it had finished); `false` if there is no such delivery.
        async fn retry_delivery(&self, endpoint_id: &str, id: &str, now_ms: i64) -> Result<bool>;

        /// The queue's depth and age.
        async fn delivery_queue(&self) -> Result<DeliveryQueue>;

        /// Deletes up to `limit` deliveries that finished before `before_ms`.
        async fn forget_deliveries(&self, before_ms: i64, limit: i64) -> Result<u64>;

        /// Has the database gather the statistics of the delivery queue, so that claims
        /// are planned for what it holds now (PostgreSQL plans a table it never analyzed
        /// as nearly empty: a claim then sorts every due delivery instead of walking
        /// the index of due ones).
        async fn refresh_delivery_statistics(&self) -> Result<()>;
    }
}

const ENDPOINT_COLUMNS: &str = "id, owner, all_owners, name, url, event_types, secret, \
     previous_secret, previous_secret_until, created_at, updated_at, \
     starts_after_transaction, starts_after_position, failing_since, disabled_at, disabled_reason, \
     key_id";

/// A condition on an endpoint `e`: its key, if it is an all-owners endpoint, is not
/// revoked. Deliveries and the dispatcher check it, so that nothing goes to such an
/// endpoint once its key is revoked, even before the revocation has disabled it.
const KEY_NOT_REVOKED: &str = "(e.all_owners = FALSE OR e.key_id IS NULL OR NOT EXISTS \
     (SELECT 1 FROM api_keys k WHERE k.id = e.key_id AND k.revoked_at IS NOT NULL))";

/// How many usable (known and not revoked) API keys have id $1, 0 or 1: only a usable
/// key configures an endpoint.
const COUNT_USABLE_KEY: &str = "SELECT COUNT(*) FROM api_keys WHERE id = $1 AND revoked_at IS NULL";

const DELIVERY_COLUMNS: &str = "id, endpoint_id, event_id, event_type, batch_id, payload, \
     created_at, state, attempts, next_attempt_at, last_attempt_at, last_duration_ms, \
     last_status_code, last_error, finished_at";

/// An owner's endpoints of one kind: its own ($2 false) or its all-owners ones ($2
/// true, an admin key's). Each kind has its own limit, so that a `batches` key whose
/// user id is an admin key's cannot use up the admin's.
const COUNT_OWNED_ENDPOINTS: &str =
    "SELECT COUNT(*) FROM webhook_endpoints WHERE owner = $1 AND all_owners = $2";

const START_DISPATCH: &str = "INSERT INTO webhook_dispatch (id, after_transaction, after_position) \
     VALUES (1, $1, $2) ON CONFLICT (id) DO NOTHING";

const SELECT_DISPATCH: &str =
    "SELECT after_transaction, after_position FROM webhook_dispatch WHERE id = 1";

const MOVE_DISPATCH: &str = "UPDATE webhook_dispatch SET after_transaction = $1, after_position = $2 \
     WHERE id = 1 AND after_transaction = $3 AND after_position = $4";

/// Refused (no row changed) when the configuring key $13 is revoked, as for a stale
/// secret: a revoked key still remembered by a replica's cache re-enables nothing.
const UPDATE_ENDPOINT: &str = "UPDATE webhook_endpoints SET name = $1, url = $2, event_types = $3, \
     secret = $4, previous_secret = $5, previous_secret_until = $6, updated_at = $7, \
     failing_since = $8, disabled_at = $9, disabled_reason = $10, key_id = $13 \
     WHERE id = $11 AND secret = $12 \
     AND ($13 IS NULL OR NOT EXISTS (SELECT 1 FROM api_keys WHERE id = $13 AND revoked_at IS NOT NULL))";

const RECORD_DELIVERY_ATTEMPT: &str = "UPDATE webhook_deliveries SET state = $1, \
     attempts = attempts + 1, next_attempt_at = $2, lease_owner = NULL, lease_until = NULL, \
     last_attempt_at = $3, last_duration_ms = $4, last_status_code = $5, last_error = $6, \
     finished_at = $7 WHERE id = $8 AND lease_owner = $9 AND state = 'pending'";

const ENDPOINT_HEALTHY: &str =
    "UPDATE webhook_endpoints SET failing_since = NULL WHERE id = $1 AND failing_since IS NOT NULL";

const ENDPOINT_FAILING: &str =
    "UPDATE webhook_endpoints SET failing_since = COALESCE(failing_since, $1) WHERE id = $2";

const DISABLE_ENDPOINT: &str = "UPDATE webhook_endpoints SET disabled_at = $1, disabled_reason = $2, \
     failing_since = COALESCE(failing_since, $1) WHERE id = $3 AND disabled_at IS NULL";

const RETRY_DELIVERY: &str = "UPDATE webhook_deliveries SET \
     attempts = CASE WHEN state = 'pending' THEN attempts ELSE 0 END, \
     state = 'pending', next_attempt_at = $1, finished_at = NULL \
     WHERE id = $2 AND endpoint_id = $3";

const DELIVERY_QUEUE: &str =
    "SELECT COUNT(*), MIN(created_at) FROM webhook_deliveries WHERE state = 'pending'";

const FORGET_DELIVERIES: &str = "DELETE FROM webhook_deliveries WHERE seq IN \
     (SELECT seq FROM webhook_deliveries WHERE state <> 'pending' AND finished_at < $1 LIMIT $2)";

/// Due deliveries a claim chooses from, oldest first (of endpoints and owners with
/// room: full ones are left out by the claim's condition, so a backlog of one owner or
/// endpoint at the head takes its room and the next claim looks past it). Sorting and
/// locking the window is most of a claim's cost: 256 drained figure 9's 10,000
/// deliveries in 3.6-3.8 s against 4.2-4.4 s with 1,000 (two runs each, alternated).
const CLAIM_WINDOW: i64 = 256;

/// Rows per multi-row insert of deliveries: 8 values each stays far below both
/// databases' limit on bound values.
const DELIVERIES_PER_INSERT: usize = 500;

#[async_trait]
impl<B: Backend> WebhookStore for SqlStore<B>
where
    for<'c> &'c mut <B::Db as Database>::Connection: Executor<'c, Database = B::Db>,
    <B::Db as Database>::Arguments: IntoArguments<B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    i64: for<'q> Encode<'q, B::Db> + Type<B::Db>,
    bool: for<'q> Encode<'q, B::Db> + Type<B::Db>,
    Option<i64>: for<'q> Encode<'q, B::Db> + Type<B::Db>,
    Option<String>: for<'q> Encode<'q, B::Db> + Type<B::Db>,
    String: for<'q> Encode<'q, B::Db> + Type<B::Db>,
    EndpointRow: for<'r> FromRow<'r, <B::Db as Database>::Row>,
    DeliveryRow: for<'r> FromRow<'r, <B::Db as Database>::Row>,
    (i64,): for<'r> FromRow<'r, <B::Db as Database>::Row>,
    (String,): for<'r> FromRow<'r, <B::Db as Database>::Row>,
    (i64, i64): for<'r> FromRow<'r, <B::Db as Database>::Row>,
    (i64, Option<i64>): for<'r> FromRow<'r, <B::Db as Database>::Row>,
{
    #[tracing::instrument(level = "debug", name = "store.insert_endpoint", skip_all, fields(db.system = B::SYSTEM))]
    async fn insert_endpoint(
        &self,
        endpoint: &WebhookEndpoint,
        max_per_owner: i64,
    ) -> Result<bool> {
        let mut tx = B::begin_write(&self.pool).await?;
        if let Some(lock) = B::LOCK_OWNER_ENDPOINTS {
            sqlx::query(lock)
                .bind(endpoint.owner.as_str())
                .execute(&mut *tx)
                .await?;
        }
        if let Some(key_id) = &endpoint.key_id {
            let (usable,): (i64,) = sqlx::query_as(COUNT_USABLE_KEY)
                .bind(key_id.as_str())
                .fetch_one(&mut *tx)
                .await?;
            if usable == 0 {
                return Err(Error::Unauthenticated(KEY_REVOKED));
            }
        }
        let (owned,): (i64,) = sqlx::query_as(COUNT_OWNED_ENDPOINTS)
            .bind(endpoint.owner.as_str())
            .bind(endpoint.all_owners)
            .fetch_one(&mut *tx)
            .await?;
        if owned >= max_per_owner {
            return Ok(false);
        }
        let mut insert = QueryBuilder::<B::Db>::new(format!(
            "INSERT INTO webhook_endpoints ({ENDPOINT_COLUMNS}) VALUES ("
        ));
        let mut values = insert.separated(", ");
        let (previous, previous_until) = split_previous(endpoint);
        let (disabled_at, disabled_reason) = split_disabled(endpoint);
        values
            .push_bind(endpoint.id.clone())
            .push_bind(endpoint.owner.clone())
            .push_bind(endpoint.all_owners)
            .push_bind(endpoint.settings.name.clone())
            .push_bind(endpoint.settings.url.to_string())
            .push_bind(event_type_names(&endpoint.settings.event_types))
            .push_bind(endpoint.secret.0.clone())
            .push_bind(previous)
            .push_bind(previous_until)
            .push_bind(endpoint.created_at)
            .push_bind(endpoint.updated_at)
            .push_bind(endpoint.starts_after.transaction)
            .push_bind(endpoint.starts_after.position)
            .push_bind(endpoint.failing_since)
            .push_bind(disabled_at)
            .push_bind(disabled_reason)
            .push_bind(endpoint.key_id.clone());
        insert.push(")");
        insert.build().execute(&mut *tx).await?;
        sqlx::query(START_DISPATCH)
            .bind(endpoint.starts_after.transaction)
            .bind(endpoint.starts_after.position)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    #[tracing::instrument(level = "debug", name = "store.get_endpoint", skip_all, fields(db.system = B::SYSTEM))]
    async fn get_endpoint(&self, id: &str) -> Result<Option<WebhookEndpoint>> {
        let sql = format!("SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1");
        sqlx::query_as::<_, EndpointRow>(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(WebhookEndpoint::try_from)
            .transpose()
    }

    #[tracing::instrument(level = "debug", name = "store.list_endpoints", skip_all, fields(db.system = B::SYSTEM))]
    async fn list_endpoints(
        &self,
        owner: Option<&str>,
        before: Option<&str>,
        limit: i64,
    ) -> Result<Vec<WebhookEndpoint>> {
        let mut sql = QueryBuilder::<B::Db>::new(format!(
            "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE TRUE"
        ));
        if let Some(owner) = owner {
            sql.push(" AND all_owners = FALSE AND owner = ")
                .push_bind(owner.to_owned());
        }
        if let Some(before) = before {
            sql.push(" AND seq < (SELECT seq FROM webhook_endpoints WHERE id = ")
                .push_bind(before.to_owned())
                .push(")");
        }
        sql.push(" ORDER BY seq DESC LIMIT ").push_bind(limit);
        let rows: Vec<EndpointRow> = sql.build_query_as().fetch_all(&self.pool).await?;
        convert_all(rows)
    }

    #[tracing::instrument(level = "debug", name = "store.update_endpoint", skip_all, fields(db.system = B::SYSTEM))]
    async fn update_endpoint(
        &self,
        endpoint: &WebhookEndpoint,
        expected_secret: &SealedSecret,
    ) -> Result<bool> {
        let (previous, previous_until) = split_previous(endpoint);
        let (disabled_at, disabled_reason) = split_disabled(endpoint);
        let result = sqlx::query(UPDATE_ENDPOINT)
            .bind(endpoint.settings.name.clone())
            .bind(endpoint.settings.url.to_string())
            .bind(event_type_names(&endpoint.settings.event_types))
            .bind(endpoint.secret.0.clone())
            .bind(previous)
            .bind(previous_until)
            .bind(endpoint.updated_at)
            .bind(endpoint.failing_since)
            .bind(disabled_at)
            .bind(disabled_reason)
            .bind(endpoint.id.as_str())
            .bind(expected_secret.0.as_str())
            .bind(endpoint.key_id.clone())
            .execute(&self.pool)
            .await?;
        Ok(B::Db::rows_affected(&result) == 1)
    }

    #[tracing::instrument(level = "debug", name = "store.delete_endpoint", skip_all, fields(db.system = B::SYSTEM))]
    async fn delete_endpoint(&self, id: &str) -> Result<bool> {
        let mut tx = B::begin_write(&self.pool).await?;
        sqlx::query("DELETE FROM webhook_deliveries WHERE endpoint_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let result = sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(B::Db::rows_affected(&result) == 1)
    }

    #[tracing::instrument(level = "debug", name = "store.endpoints_following", skip_all, fields(db.system = B::SYSTEM, owners = owners.len()))]
    async fn endpoints_following(&self, owners: &[&str]) -> Result<Vec<WebhookEndpoint>> {
        let mut sql = QueryBuilder::<B::Db>::new(format!(
            "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints e \
             WHERE disabled_at IS NULL AND {KEY_NOT_REVOKED} AND (all_owners = TRUE"
        ));
        if !owners.is_empty() {
            sql.push(" OR owner IN (");
            let mut list = sql.separated(", ");
            for owner in owners {
                list.push_bind((*owner).to_owned());
            }
            sql.push(")");
        }
        sql.push(")");
        let rows: Vec<EndpointRow> = sql.build_query_as().fetch_all(&self.pool).await?;
        convert_all(rows)
    }

    #[tracing::instrument(level = "debug", name = "store.dispatch_position", skip_all, fields(db.system = B::SYSTEM))]
    async fn dispatch_position(&self, start: FeedCursor) -> Result<FeedCursor> {
        sqlx::query(START_DISPATCH)
            .bind(start.transaction)
            .bind(start.position)
            .execute(&self.pool)
            .await?;
        let (transaction, position): (i64, i64) = sqlx::query_as(SELECT_DISPATCH)
            .fetch_one(&self.pool)
            .await?;
        Ok(FeedCursor {
            transaction,
            position,
        })
    }

    #[tracing::instrument(level = "debug", name = "store.queue_deliveries", skip_all, fields(db.system = B::SYSTEM, deliveries = deliveries.len()))]
    async fn queue_deliveries(
        &self,
        from: FeedCursor,
        to: FeedCursor,
        deliveries: &[NewDelivery],
    ) -> Result<bool> {
        let mut tx = B::begin_write(&self.pool).await?;
        let moved = sqlx::query(MOVE_DISPATCH)
            .bind(to.transaction)
            .bind(to.position)
            .bind(from.transaction)
            .bind(from.position)
            .execute(&mut *tx)
            .await?;
        if B::Db::rows_affected(&moved) != 1 {
            return Ok(false);
        }
        // Only batches that still exist get deliveries, and they stay until this
        // commits: a deletion (which drops the pending deliveries of its batch) waits
        // for the lock on PostgreSQL, and SQLite has one writer.
        let mut batch_ids: Vec<String> = deliveries.iter().map(|d| d.batch_id.clone()).collect();
        batch_ids.sort_unstable();
        batch_ids.dedup();
        let mut existing = Vec::with_capacity(batch_ids.len());
        for chunk in batch_ids.chunks(DELIVERIES_PER_INSERT) {
            let mut select = QueryBuilder::<B::Db>::new("SELECT id FROM batches WHERE id IN");
            push_list(&mut select, chunk);
            select.push(format_args!(" ORDER BY id{}", B::LOCK_KEY_SHARE));
            let rows: Vec<(String,)> = select.build_query_as().fetch_all(&mut *tx).await?;
            existing.extend(rows.into_iter().map(|(id,)| id));
        }
        // The database's collation need not be byte order.
        existing.sort_unstable();
        let deliveries: Vec<&NewDelivery> = deliveries
            .iter()
            .filter(|d| existing.binary_search(&d.batch_id).is_ok())
            .collect();
        for chunk in deliveries.chunks(DELIVERIES_PER_INSERT) {
            let mut insert = QueryBuilder::<B::Db>::new(
                "INSERT INTO webhook_deliveries (id, endpoint_id, event_id, event_type, \
                 batch_id, payload, created_at, state, attempts, next_attempt_at) ",
            );
            insert.push_values(chunk, |mut row, delivery| {
                row.push_bind(delivery.id.clone())
                    .push_bind(delivery.endpoint_id.clone())
                    .push_bind(delivery.event_id.clone())
                    .push_bind(delivery.event_type.clone())
                    .push_bind(delivery.batch_id.clone())
                    .push_bind(delivery.payload.clone())
                    .push_bind(delivery.created_at)
                    .push("'pending'")
                    .push("0")
                    .push_bind(0_i64);
            });
            insert.push(" ON CONFLICT (endpoint_id, event_id) DO NOTHING");
            insert.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    #[tracing::instrument(level = "debug", name = "store.claim_deliveries", skip_all, fields(db.system = B::SYSTEM))]
    async fn claim_deliveries(&self, claim: &DeliveryClaim<'_>) -> Result<Vec<Delivery>> {
        // The oldest due deliveries (a bounded window, through the index of due
        // deliveries) of enabled endpoints whose endpoint and owner have room, at most
        // `per_endpoint` of each endpoint and `per_owner` of each owner, taken round
        // robin between owners (each owner's first, then each owner's second, ...) up
        // to `limit`: neither one endpoint's nor one tenant's backlog fills a claim.
        // The outer conditions are checked again on the row as it is when updated, so
        // two replicas never lease one delivery.
        let mut sql = QueryBuilder::<B::Db>::new("UPDATE webhook_deliveries SET lease_owner = ");
        sql.push_bind(claim.replica.to_owned())
            .push(", lease_until = ")
            .push_bind(claim.lease_until_ms)
            .push(
                " WHERE seq IN (SELECT seq FROM (SELECT seq, next_attempt_at, \
                 row_number() OVER (PARTITION BY owner ORDER BY next_attempt_at, seq) AS owner_rank \
                 FROM (SELECT c.seq, c.owner, c.next_attempt_at, \
                 row_number() OVER (PARTITION BY c.endpoint_id ORDER BY c.next_attempt_at, c.seq) \
                 AS endpoint_rank FROM (SELECT d.seq, d.endpoint_id, e.owner, d.next_attempt_at \
                 FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id \
                 WHERE d.state = 'pending' AND d.next_attempt_at <= ",
            )
            .push_bind(claim.now_ms)
            .push(" AND (d.lease_until IS NULL OR d.lease_until < ")
            .push_bind(claim.now_ms)
            .push(") AND e.disabled_at IS NULL AND ")
            .push(KEY_NOT_REVOKED);
        for (column, busy) in [
            ("d.endpoint_id", claim.busy_endpoints),
            ("e.owner", claim.busy_owners),
        ] {
            if !busy.is_empty() {
                sql.push(format_args!(" AND {column} NOT IN ("));
                let mut list = sql.separated(", ");
                for id in busy {
                    list.push_bind(id.clone());
                }
                sql.push(")");
            }
        }
        sql.push(" ORDER BY d.next_attempt_at, d.seq LIMIT ")
            .push_bind(CLAIM_WINDOW)
            .push(B::CLAIM_LOCK)
            .push(") c) by_endpoint WHERE endpoint_rank <= ")
            .push_bind(claim.per_endpoint)
            .push(") by_owner WHERE owner_rank <= ")
            .push_bind(claim.per_owner)
            .push(" ORDER BY owner_rank, next_attempt_at, seq LIMIT ")
            .push_bind(claim.limit)
            .push(") AND state = 'pending' AND (lease_until IS NULL OR lease_until < ")
            .push_bind(claim.now_ms)
            .push(format!(") RETURNING {DELIVERY_COLUMNS}"));
        // A claim runs each time attempts finish: on a kept connection, like the
        // records below.
        let mut connection = self.held.take().await?;
        let rows: Vec<DeliveryRow> = sql.build_query_as().fetch_all(&mut *connection).await?;
        connection.keep();
        convert_all(rows)
    }

    #[tracing::instrument(level = "debug", name = "store.release_deliveries", skip_all, fields(db.system = B::SYSTEM))]
    async fn release_deliveries(&self, replica: &str, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut sql = QueryBuilder::<B::Db>::new(
            "UPDATE webhook_deliveries SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ",
        );
        sql.push_bind(replica.to_owned()).push(" AND id IN (");
        let mut list = sql.separated(", ");
        for id in ids {
            list.push_bind(id.clone());
        }
        sql.push(")");
        sql.build().execute(&self.pool).await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "store.record_attempt", skip_all, fields(db.system = B::SYSTEM))]
    async fn record_attempt(
        &self,
        replica: &str,
        endpoint_id: &str,
        id: &str,
        attempt: &AttemptRecord,
    ) -> Result<bool> {
        let report = &attempt.report;
        let finished_at = report.at_ms + report.duration_ms;
        let (state, next_attempt_at, finished) = match attempt.after {
            AfterAttempt::Delivered => (DeliveryState::Delivered, finished_at, Some(finished_at)),
            AfterAttempt::RetryAt(at) => (DeliveryState::Pending, at, None),
            AfterAttempt::GiveUp => (DeliveryState::Failed, finished_at, Some(finished_at)),
        };
        let record = || {
            sqlx::query(RECORD_DELIVERY_ATTEMPT)
                .bind(state.as_str())
                .bind(next_attempt_at)
                .bind(report.at_ms)
                .bind(report.duration_ms)
                .bind(report.status_code.map(i64::from))
                .bind(report.error.clone())
                .bind(finished)
                .bind(id)
                .bind(replica)
        };
        // One record per attempt, the deliverer's every few milliseconds: on a kept
        // connection (see `held.rs`), without the pool's test round trip after each.
        match attempt.endpoint {
            EndpointHealth::Unchanged => {
                let mut connection = self.held.take().await?;
                let recorded = record().execute(&mut *connection).await?;
                connection.keep();
                return Ok(B::Db::rows_affected(&recorded) == 1);
            }
            // The common case after a success: two statements, no transaction. Clearing
            // is idempotent (and writes nothing when the endpoint was not failing); a
            // crash between the two leaves a `failing_since` the next success clears.
            EndpointHealth::Healthy => {
                let mut connection = self.held.take().await?;
                let recorded = record().execute(&mut *connection).await?;
                if B::Db::rows_affected(&recorded) == 1 {
                    sqlx::query(ENDPOINT_HEALTHY)
                        .bind(endpoint_id)
                        .execute(&mut *connection)
                        .await?;
                }
                connection.keep();
                return Ok(B::Db::rows_affected(&recorded) == 1);
            }
            EndpointHealth::Failing(_) | EndpointHealth::Disable { .. } => {}
        }
        let mut tx = B::begin_write(&self.pool).await?;
        let recorded = record().execute(&mut *tx).await?;
        if B::Db::rows_affected(&recorded) != 1 {
            return Ok(false);
        }
        match &attempt.endpoint {
            EndpointHealth::Unchanged | EndpointHealth::Healthy => {}
            EndpointHealth::Failing(at) => {
                sqlx::query(ENDPOINT_FAILING)
                    .bind(*at)
                    .bind(endpoint_id)
                    .execute(&mut *tx)
                    .await?;
            }
            EndpointHealth::Disable { at, reason } => {
                sqlx::query(DISABLE_ENDPOINT)
                    .bind(*at)
                    .bind(reason.clone())
                    .bind(endpoint_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    #[tracing::instrument(level = "debug", name = "store.list_deliveries", skip_all, fields(db.system = B::SYSTEM))]
    async fn list_deliveries(&self, endpoint_id: &str, limit: i64) -> Result<Vec<Delivery>> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE endpoint_id = $1 \
             ORDER BY seq DESC LIMIT $2"
        );
        let rows: Vec<DeliveryRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(endpoint_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        convert_all(rows)
    }

    #[tracing::instrument(level = "debug", name = "store.retry_delivery", skip_all, fields(db.system = B::SYSTEM))]
    async fn retry_delivery(&self, endpoint_id: &str, id: &str, now_ms: i64) -> Result<bool> {
        let result = sqlx::query(RETRY_DELIVERY)
            .bind(now_ms)
            .bind(id)
            .bind(endpoint_id)
            .execute(&self.pool)
            .await?;
        Ok(B::Db::rows_affected(&result) == 1)
    }

    #[tracing::instrument(level = "debug", name = "store.delivery_queue", skip_all, fields(db.system = B::SYSTEM))]
    async fn delivery_queue(&self) -> Result<DeliveryQueue> {
        let (pending, oldest_created_at): (i64, Option<i64>) =
            sqlx::query_as(DELIVERY_QUEUE).fetch_one(&self.pool).await?;
        Ok(DeliveryQueue {
            pending,
            oldest_created_at,
        })
    }

    #[tracing::instrument(level = "debug", name = "store.refresh_delivery_statistics", skip_all, fields(db.system = B::SYSTEM))]
    async fn refresh_delivery_statistics(&self) -> Result<()> {
        sqlx::query("ANALYZE webhook_deliveries")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "store.forget_deliveries", skip_all, fields(db.system = B::SYSTEM))]
    async fn forget_deliveries(&self, before_ms: i64, limit: i64) -> Result<u64> {
        let result = sqlx::query(FORGET_DELIVERIES)
            .bind(before_ms)
            .bind(limit)
            .execute(&self.pool)
            .await?;
        Ok(B::Db::rows_affected(&result))
    }
}

fn split_previous(endpoint: &WebhookEndpoint) -> (Option<String>, Option<i64>) {
    match &endpoint.previous_secret {
        Some((secret, until)) => (Some(secret.0.clone()), Some(*until)),
        None => (None, None),
    }
}

fn split_disabled(endpoint: &WebhookEndpoint) -> (Option<i64>, Option<String>) {
    match &endpoint.disabled {
        Some((at, reason)) => (Some(*at), Some(reason.clone())),
        None => (None, None),
    }
}

fn event_type_names(types: &[WebhookEventType]) -> String {
    types
        .iter()
        .map(|kind| kind.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// A row of `webhook_endpoints`.
#[derive(Debug, FromRow)]
pub(super) struct EndpointRow {
    id: String,
    owner: String,
    all_owners: bool,
    name: String,
    url: String,
    event_types: String,
    secret: String,
    previous_secret: Option<String>,
    previous_secret_until: Option<i64>,
    created_at: i64,
    updated_at: i64,
    starts_after_transaction: i64,
    starts_after_position: i64,
    failing_since: Option<i64>,
    disabled_at: Option<i64>,
    disabled_reason: Option<String>,
    key_id: Option<String>,
}

impl TryFrom<EndpointRow> for WebhookEndpoint {
    type Error = Error;

    fn try_from(row: EndpointRow) -> Result<WebhookEndpoint> {
        let corrupt =
            |what: &str| Error::Internal(format!("webhook endpoint `{}`: {what}", row.id));
        let url = url::Url::parse(&row.url).map_err(|_| corrupt("bad url"))?;
        let event_types = row
            .event_types
            .split(',')
            .map(|name| WebhookEventType::from_name(name).ok_or_else(|| corrupt("bad event type")))
            .collect::<Result<Vec<_>>>()?;
        let previous_secret = match (row.previous_secret, row.previous_secret_until) {
            (Some(secret), Some(until)) => Some((SealedSecret(secret), until)),
            _ => None,
        };
        let disabled = row
            .disabled_at
            .map(|at| (at, row.disabled_reason.unwrap_or_default()));
        Ok(WebhookEndpoint {
            settings: EndpointSettings {
                name: row.name,
                url,
                event_types,
            },
            owner: row.owner,
            all_owners: row.all_owners,
            secret: SealedSecret(row.secret),
            previous_secret,
            created_at: row.created_at,
            updated_at: row.updated_at,
            starts_after: FeedCursor {
                transaction: row.starts_after_transaction,
                position: row.starts_after_position,
            },
            failing_since: row.failing_since,
            disabled,
            key_id: row.key_id,
            id: row.id,
        })
    }
}

/// A row of `webhook_deliveries`.
#[derive(Debug, FromRow)]
pub(super) struct DeliveryRow {
    id: String,
    endpoint_id: String,
    event_id: String,
    event_type: String,
    batch_id: String,
    payload: String,
    created_at: i64,
    state: String,
    attempts: i64,
    next_attempt_at: i64,
    last_attempt_at: Option<i64>,
    last_duration_ms: Option<i64>,
    last_status_code: Option<i64>,
    last_error: Option<String>,
    finished_at: Option<i64>,
}

impl TryFrom<DeliveryRow> for Delivery {
    type Error = Error;

    fn try_from(row: DeliveryRow) -> Result<Delivery> {
        let last_attempt = row.last_attempt_at.map(|at_ms| AttemptReport {
            at_ms,
            duration_ms: row.last_duration_ms.unwrap_or(0),
            status_code: row
                .last_status_code
                .and_then(|code| i32::try_from(code).ok()),
            error: row.last_error.clone(),
        });
        Ok(Delivery {
            state: DeliveryState::parse(&row.state)?,
            attempts: row.attempts,
            next_attempt_at_ms: row.next_attempt_at,
            last_attempt,
            finished_at_ms: row.finished_at,
            queued: NewDelivery {
                id: row.id,
                endpoint_id: row.endpoint_id,
                event_id: row.event_id,
                event_type: row.event_type,
                batch_id: row.batch_id,
                payload: row.payload,
                created_at: row.created_at,
            },
        })
    }
}
