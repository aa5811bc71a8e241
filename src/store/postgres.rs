//! The PostgreSQL store, for deployments with several batchd replicas on one database.

use std::str::FromStr;
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::held::HeldConnections;
use super::postgres_wakeups::PostgresWakeups;
use super::sql::{self, Backend, FeedRead, FeedRow, HealthConnection, SqlStore};
use super::stored_batch::StoredBatchV1;
use super::{ChangeNotifier, DatabaseStatus, FeedCursor, StoreOptions};
use crate::domain::BatchId;
use crate::error::{Error, Result};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Serialises the "first key on an empty table" check across replicas.
const FIRST_KEY_LOCK: i64 = 0x6261_7463_6864_6b31; // "batchdk1"

/// The batches whose ids are in the array $1.
static SELECT_BATCHES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM batches WHERE id = ANY($1)",
        *sql::BATCH_COLUMNS
    )
});

/// Commits a round of changes, given as the JSON array $1 of their snapshots (distinct
/// batches), in one statement: the rows are locked in id order, with the lock an
/// UPDATE that keeps the key takes (so the webhook dispatcher's key-share lock on a
/// batch it queues deliveries for does not hold the round up; two rounds that
/// share batches cannot deadlock), each row is replaced if it is still at the version
/// before its snapshot's, and each replaced row's snapshot is appended to the event
/// log in the round's order. Returns the 1-based index of every change written.
/// `batches` is reached only through its id index (`= ANY (ARRAY(...))`): joined to
/// the input instead, a table without statistics yet (just seeded, not analyzed) was
/// planned as two sequential scans, 5 ms for 5,000 rows.
static COMMIT_ROUND: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH input AS (SELECT t.s, t.ord FROM jsonb_array_elements($1) \
         WITH ORDINALITY AS t(s, ord)), \
         locked AS (SELECT id FROM batches \
         WHERE id = ANY (ARRAY(SELECT s ->> 'id' FROM input)) ORDER BY id FOR NO KEY UPDATE), \
         written AS (UPDATE batches SET ({columns}) = ({values}) FROM input \
         WHERE batches.id = ANY (ARRAY(SELECT id FROM locked)) \
         AND batches.id = input.s ->> 'id' \
         AND batches.version = (input.s ->> 'version')::bigint - 1 \
         RETURNING batches.id, batches.version, batches.user_id, input.s, input.ord, \
         COALESCE(batches.updated_at, batches.created_at) AS at), \
         logged AS (INSERT INTO batch_events (batch_id, version, snapshot, at, owner) \
         SELECT id, version, s, at, user_id FROM written ORDER BY ord) \
         SELECT ord FROM written",
        columns = *sql::BATCH_COLUMNS,
        values = StoredBatchV1::POSTGRES_FROM_JSON.join(", "),
    )
});

/// The feed's horizon, `horizon` (an `xid8`) of a one-row subquery: the oldest
/// transaction still running, or the next to start when none is (every transaction
/// below it has ended, so no event below it can appear any more), but at most one
/// above the newest event below it (or the compaction watermark).
///
/// That limit keeps cursors valid across a crash or a failover. A transaction that
/// writes nothing before its commit record (the wake-ups' `pg_notify`), like one that
/// rolls back, ends without waiting for its WAL to be flushed or to reach a
/// synchronous standby. If the server dies then, the recovered or promoted server
/// hands that transaction id out again, and an event written under it would sort
/// below a cursor that had passed it. An event's own transaction id is on disk (and on
/// the synchronous standby) before its commit is acknowledged, so every id handed out
/// after a crash is above it.
const HORIZON: &str = "(SELECT LEAST(r.oldest_running, \
     (GREATEST(COALESCE((SELECT xid FROM batch_events WHERE xid < r.oldest_running \
     ORDER BY xid DESC LIMIT 1)::text::bigint, 0), \
     (SELECT through_transaction FROM feed_compaction)) + 1)::text::xid8) AS horizon \
     FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS oldest_running) AS r)";

/// The feed's [`HORIZON`], as a number.
static FEED_HORIZON: LazyLock<String> =
    LazyLock::new(|| format!("SELECT horizon::text::bigint FROM {HORIZON} AS now"));

/// The horizon, and when the first event above it that this statement sees (committed,
/// but held back by an older transaction still running) was written.
static FEED_HORIZON_AND_HELD_BACK: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT horizon::text::bigint, \
         (SELECT at FROM batch_events WHERE xid >= horizon ORDER BY xid, position LIMIT 1) \
         FROM {HORIZON} AS now"
    )
});

/// [`SELECT_CHANGES`] below the [`HORIZON`] of its own snapshot, in one statement, each
/// row with that horizon and when the first event above it was written: the
/// statement's snapshot is what `pg_current_snapshot()` returns, so every transaction
/// below its oldest running one has ended and is seen. $1 transaction, $2 order, $3 limit, and
/// in the owner's form $4 the owner. An empty result carries no horizon; the caller
/// then reads in two statements. One form per [`FeedRead`].
static SELECT_CHANGES_BELOW_OWN_HORIZON: LazyLock<[String; 3]> = LazyLock::new(|| {
    sql::feed_forms(
        &"SELECT e.xid::text::bigint AS \"transaction\", \
         e.position, e.version, {snapshot}, {previous_status} AS previous_status, \
         w.through_transaction AS compacted_transaction, \
         w.through_position AS compacted_position, \
         h.horizon::text::bigint AS horizon, h.held_back_since \
         FROM (SELECT now.horizon, (SELECT at FROM batch_events \
               WHERE xid >= now.horizon ORDER BY xid, position LIMIT 1) AS held_back_since \
               FROM {horizon} AS now) AS h \
         CROSS JOIN feed_compaction w \
         JOIN batch_events e ON (e.xid, e.position) > ($1::text::xid8, $2) AND e.xid < h.horizon{owner} \
         LEFT JOIN batch_events p ON p.batch_id = e.batch_id AND p.version = e.version - 1 \
         ORDER BY e.xid, e.position LIMIT $3"
            .replace("{horizon}", HORIZON),
        4,
        field_in,
    )
});

/// Events after position ($1 transaction, $2 order) of transactions below $3, in
/// transaction id order, at most $4, and in the owner's form of owner $5 only (through
/// the index of each owner's changes); each with the status of the version before it
/// and the compaction watermark. One form per [`FeedRead`].
static SELECT_CHANGES: LazyLock<[String; 3]> = LazyLock::new(|| {
    sql::feed_forms(
        "SELECT e.xid::text::bigint AS \"transaction\", e.position, \
         e.version, {snapshot}, {previous_status} AS previous_status, \
         w.through_transaction AS compacted_transaction, \
         w.through_position AS compacted_position \
         FROM batch_events e CROSS JOIN feed_compaction w \
         LEFT JOIN batch_events p ON p.batch_id = e.batch_id AND p.version = e.version - 1 \
         WHERE (e.xid, e.position) > ($1::text::xid8, $2) \
         AND e.xid < $3::text::xid8{owner} ORDER BY e.xid, e.position LIMIT $4",
        5,
        field_in,
    )
});

/// The top-level `field` of the snapshot of the event aliased `alias`, as text.
fn field_in(alias: &str, field: &str) -> String {
    format!("({alias}.snapshot ->> '{field}')")
}

/// Batches in a PostgreSQL database.
pub(super) type PostgresStore = SqlStore<PostgresBackend>;

/// What PostgreSQL does its own way: each write in one statement (one round trip),
/// arrays of ids, migrations without a statement timeout, and LISTEN/NOTIFY between
/// replicas.
pub(super) struct PostgresBackend {
    migration_options: PgConnectOptions,
    wakeups: Arc<PostgresWakeups>,
}

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
        let health = HealthConnection::new(connect.clone().application_name("batchd-health"));
        // A later `-c` wins over an earlier one.
        let migration_options = connect.clone().options([("statement_timeout", "0")]);
        let status = DatabaseStatus::default();
        let suspect = status.clone();
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            // A connection opened before another one broke (a crash, a switchover) is
            // closed rather than handed out: no statement goes to a server that is
            // gone, and no round trip is spent finding out.
            .before_acquire(move |_, opened| {
                let keep = !suspect.opened_before_loss(opened.age);
                Box::pin(async move { Ok(keep) })
            })
            // sqlx pings every connection before handing it out by default: a second
            // round trip per query. A broken connection shows up as an error of the
            // query itself (UNAVAILABLE) and is dropped from the pool.
            .test_before_acquire(false)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await?;
        let wakeups = Arc::new(PostgresWakeups::new(
            pool.clone(),
            options.call_deadline(),
            status.clone(),
        ));
        Ok(SqlStore {
            held: HeldConnections::new(pool.clone(), options.max_connections, status.clone()),
            pool,
            health,
            status,
            backend: PostgresBackend {
                migration_options,
                wakeups,
            },
        })
    }
}

/// Appends the event of the batch a `WITH written AS (... RETURNING id, user_id,
/// version, created_at, updated_at)` wrote, with `snapshot` as its content.
fn push_event_of_written(sql: &mut sqlx::QueryBuilder<Postgres>, snapshot: &StoredBatchV1) {
    sql.push(
        " INSERT INTO batch_events (batch_id, version, snapshot, at, owner) \
         SELECT id, version, ",
    )
    .push_bind(Json(snapshot))
    .push(", COALESCE(updated_at, created_at), user_id FROM written");
}

#[async_trait]
impl Backend for PostgresBackend {
    type Db = Postgres;
    const SYSTEM: &'static str = "postgresql";

    async fn migrate(&self, _pool: &PgPool) -> Result<()> {
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

    /// Row locks and unique keys order PostgreSQL's writers; a plain transaction.
    async fn begin_write(pool: &PgPool) -> Result<Transaction<'static, Postgres>> {
        Ok(pool.begin().await?)
    }

    /// An advisory lock, so replicas starting together on an empty database cannot
    /// both see "no key yet".
    async fn begin_first_key_check(pool: &PgPool) -> Result<Transaction<'static, Postgres>> {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(FIRST_KEY_LOCK)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// One statement: one round trip.
    async fn insert_batch(connection: &mut PgConnection, batch: &StoredBatchV1) -> Result<()> {
        Self::insert_batch_in(connection, batch).await
    }

    async fn insert_batch_in(connection: &mut PgConnection, batch: &StoredBatchV1) -> Result<()> {
        insert_with_event(batch).build().execute(connection).await?;
        Ok(())
    }

    /// One statement: one round trip.
    async fn commit_change(connection: &mut PgConnection, next: &StoredBatchV1) -> Result<bool> {
        Self::commit_change_in(connection, next).await
    }

    async fn commit_change_in(connection: &mut PgConnection, next: &StoredBatchV1) -> Result<bool> {
        let inserted = change_with_event(next).build().execute(connection).await?;
        Ok(inserted.rows_affected() == 1)
    }

    async fn commit_changes(
        connection: &mut PgConnection,
        nexts: &[StoredBatchV1],
    ) -> Result<Vec<bool>> {
        let written: Vec<(i64,)> = sqlx::query_as(COMMIT_ROUND.as_str())
            .bind(Json(nexts))
            .fetch_all(connection)
            .await?;
        let mut committed = vec![false; nexts.len()];
        for (ordinal,) in written {
            if let Some(slot) = usize::try_from(ordinal - 1)
                .ok()
                .and_then(|index| committed.get_mut(index))
            {
                *slot = true;
            }
        }
        Ok(committed)
    }

    async fn batches_by_id(
        connection: &mut PgConnection,
        ids: &[BatchId],
    ) -> Result<Vec<StoredBatchV1>> {
        let ids: Vec<&str> = ids.iter().map(BatchId::as_str).collect();
        Ok(sqlx::query_as(SELECT_BATCHES.as_str())
            .bind(ids)
            .fetch_all(connection)
            .await?)
    }

    async fn versions_by_id(pool: &PgPool, ids: &[BatchId]) -> Result<Vec<(String, i64)>> {
        let ids: Vec<&str> = ids.iter().map(BatchId::as_str).collect();
        Ok(
            sqlx::query_as("SELECT id, version FROM batches WHERE id = ANY($1)")
                .bind(ids)
                .fetch_all(pool)
                .await?,
        )
    }

    /// The horizon is read first, in a statement of its own: every transaction below
    /// it had ended then, so the second statement sees all of their events.
    async fn changes_after(
        pool: &PgPool,
        after: FeedCursor,
        read: FeedRead<'_>,
        limit: i64,
    ) -> Result<(Vec<FeedRow>, FeedCursor, Option<i64>)> {
        let (form, owner) = (read.form(), read.owner());
        // Under load there is something to read: one statement, one round trip.
        let mut read = sqlx::query_as(sqlx::AssertSqlSafe(
            &*SELECT_CHANGES_BELOW_OWN_HORIZON[form],
        ))
        .bind(after.transaction.to_string())
        .bind(after.position)
        .bind(limit);
        if let Some(owner) = owner {
            read = read.bind(owner);
        }
        let rows: Vec<FeedRow> = read.fetch_all(pool).await?;
        if let Some((horizon, held_back_since)) = rows.first().and_then(FeedRow::own_horizon) {
            let horizon = FeedCursor {
                transaction: horizon,
                position: 0,
            };
            return Ok((rows, horizon, held_back_since));
        }
        // Nothing to read, or no horizon with it: the horizon is read first, then the
        // rows below it.
        let (oldest_running, held_back_since): (i64, Option<i64>) =
            sqlx::query_as(sqlx::AssertSqlSafe(FEED_HORIZON_AND_HELD_BACK.as_str()))
                .fetch_one(pool)
                .await?;
        let mut read = sqlx::query_as(sqlx::AssertSqlSafe(&*SELECT_CHANGES[form]))
            .bind(after.transaction.to_string())
            .bind(after.position)
            .bind(oldest_running.to_string())
            .bind(limit);
        if let Some(owner) = owner {
            read = read.bind(owner);
        }
        let rows: Vec<FeedRow> = read.fetch_all(pool).await?;
        // Below every event still to come: those have a transaction id of at least
        // `oldest_running` and a position of at least 1.
        let horizon = FeedCursor {
            transaction: oldest_running,
            position: 0,
        };
        Ok((rows, horizon, held_back_since))
    }

    async fn feed_head(pool: &PgPool) -> Result<FeedCursor> {
        let (oldest_running,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(FEED_HORIZON.as_str()))
            .fetch_one(pool)
            .await?;
        Ok(FeedCursor {
            transaction: oldest_running,
            position: 0,
        })
    }

    const READABLE_BY_THE_FEED: &'static str = "e.xid < pg_snapshot_xmin(pg_current_snapshot())";

    fn transaction_of(alias: &str) -> String {
        format!("{alias}xid::text::bigint")
    }

    fn notifier(&self) -> Option<Arc<dyn ChangeNotifier>> {
        Some(self.wakeups.clone())
    }

    const CLAIM_LOCK: &'static str = " FOR UPDATE OF d SKIP LOCKED";

    const LOCK_OWNER_ENDPOINTS: Option<&'static str> =
        Some("SELECT pg_advisory_xact_lock(hashtext('webhook_endpoints'), hashtext($1))");

    const LOCK_OWNER_BATCHES: Option<&'static str> =
        Some("SELECT pg_advisory_xact_lock(hashtext('batches'), hashtext($1))");

    const LOCK_SKIPPING_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";

    const LOCK_FOR_UPDATE: &'static str = " FOR UPDATE";

    const LOCK_KEY_SHARE: &'static str = " FOR KEY SHARE";

    const LOCK_TO_CHANGE_SKIPPING_LOCKED: &'static str = " FOR NO KEY UPDATE SKIP LOCKED";

    /// One statement for every deletion: the feed position is an identity column.
    async fn log_deletions(
        tx: &mut Transaction<'static, Postgres>,
        gone: &[(String, i64)],
        at: i64,
    ) -> Result<()> {
        let (ids, versions): (Vec<&str>, Vec<i64>) = gone
            .iter()
            .map(|(id, version)| (id.as_str(), *version))
            .unzip();
        sqlx::query(LOG_DELETIONS)
            .bind(ids)
            .bind(versions)
            .bind(at)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// Logs the deletion of each batch of the array $1 at the version of the array $2 at
/// $3: the event after that version, with its snapshot, in id order.
const LOG_DELETIONS: &str = "INSERT INTO batch_events \
     (batch_id, version, snapshot, at, owner, deleted) \
     SELECT e.batch_id, e.version + 1, e.snapshot, $3, e.owner, TRUE \
     FROM batch_events e JOIN UNNEST($1::text[], $2::bigint[]) AS gone (id, version) \
     ON e.batch_id = gone.id AND e.version = gone.version ORDER BY e.batch_id";

/// Replaces the batch by `next` if it is still at the version before, and appends its
/// event, in one statement: when the version moved, the UPDATE matches no row and so
/// the INSERT of the event selects nothing.
fn change_with_event(next: &StoredBatchV1) -> sqlx::QueryBuilder<Postgres> {
    let mut sql = sqlx::QueryBuilder::new("WITH written AS (");
    sql::push_update_if_current(&mut sql, next);
    sql.push(" RETURNING id, user_id, version, created_at, updated_at)");
    push_event_of_written(&mut sql, next);
    sql
}

/// Inserts a batch, its metadata index rows (`batch_metadata`, for the list's metadata
/// filter) and its first event in one statement (one round trip, atomic).
fn insert_with_event(batch: &StoredBatchV1) -> sqlx::QueryBuilder<Postgres> {
    let mut sql = sqlx::QueryBuilder::new("WITH written AS (");
    sql::push_insert_batch(&mut sql, batch);
    sql.push(
        " RETURNING id, seq, user_id, metadata, version, created_at, updated_at), \
         indexed AS (INSERT INTO batch_metadata (batch_seq, user_id, meta_key, meta_value) \
         SELECT w.seq, w.user_id, m.key, m.value FROM written w, \
         jsonb_each_text(w.metadata) m)",
    );
    push_event_of_written(&mut sql, batch);
    sql
}
