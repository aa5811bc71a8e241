//! The store both backends share: every query is written once here, generic over the
//! sqlx database, and each backend implements the small [`Backend`] trait for what
//! differs (transactions, PostgreSQL's one-statement writes, lists of ids, migrations,
//! cross-replica wake-ups). Values are bound with sqlx's `QueryBuilder` or in
//! statements of their own, so no statement depends on another's placeholder numbers.
//! JSON columns are JSONB in PostgreSQL and TEXT in SQLite.

use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use sqlx::query::Query;
use sqlx::query_builder::Separated;
use sqlx::{
    Database, Encode, Executor, FromRow, IntoArguments, Pool, QueryBuilder, Transaction, Type,
};

use super::held::HeldConnections;
use super::stored_batch::{self, StoredBatchV1};
use super::{
    BatchPageQuery, ChangeNotifier, DatabaseStatus, EarlierClaim, EventLog, FeedBounds, FeedChange,
    FeedCursor, FeedPage, IdempotencyClaim,
};
use crate::domain::{ApiKey, Batch, BatchEvent, BatchFilter, BatchId, BatchStatus, Scope};
use crate::error::{Error, Result};

/// A connection of database `DB`, alone or inside a transaction.
pub(super) type Connection<DB> = <DB as Database>::Connection;

/// What the shared code needs of a sqlx database beyond what sqlx's traits say; both
/// of batchd's databases implement it.
pub(super) trait SqlDatabase: Database {
    /// Binds every column of a stored batch, in [`StoredBatchV1::COLUMNS`] order.
    fn push_batch(values: &mut Separated<'_, Self, &str>, batch: &StoredBatchV1);

    /// Rows an `INSERT`, `UPDATE` or `DELETE` changed.
    fn rows_affected(result: &Self::QueryResult) -> u64;
}

impl SqlDatabase for sqlx::Sqlite {
    fn push_batch(values: &mut Separated<'_, Self, &str>, batch: &StoredBatchV1) {
        stored_batch::push_values(batch, values);
    }

    fn rows_affected(result: &Self::QueryResult) -> u64 {
        result.rows_affected()
    }
}

impl SqlDatabase for sqlx::Postgres {
    fn push_batch(values: &mut Separated<'_, Self, &str>, batch: &StoredBatchV1) {
        stored_batch::push_values(batch, values);
    }

    fn rows_affected(result: &Self::QueryResult) -> u64 {
        result.rows_affected()
    }
}

/// What differs between the backends.
#[async_trait]
pub(super) trait Backend: Send + Sync + 'static {
    /// The sqlx database.
    type Db: SqlDatabase;
    /// `db.system` of the spans, as OpenTelemetry names the database.
    const SYSTEM: &'static str;

    /// Applies pending migrations.
    async fn migrate(&self, pool: &Pool<Self::Db>) -> Result<()>;

    /// A transaction that will write, serialised with other writers as the database
    /// needs.
    async fn begin_write(pool: &Pool<Self::Db>) -> Result<Transaction<'static, Self::Db>>;

    /// A transaction in which "there is no API key yet" stays true until it commits,
    /// whatever other replicas do.
    async fn begin_first_key_check(pool: &Pool<Self::Db>)
    -> Result<Transaction<'static, Self::Db>>;

    /// Inserts a batch, its metadata index rows and its first event, atomically.
    async fn insert_batch(
        connection: &mut Connection<Self::Db>,
        batch: &StoredBatchV1,
    ) -> Result<()>;

    /// [`Backend::insert_batch`] inside a transaction of the caller's.
    async fn insert_batch_in(
        connection: &mut Connection<Self::Db>,
        batch: &StoredBatchV1,
    ) -> Result<()>;

    /// Replaces the batch by `next` if it is still at the previous version and appends
    /// `next` to the event log, atomically; `false`, writing nothing, otherwise.
    async fn commit_change(
        connection: &mut Connection<Self::Db>,
        next: &StoredBatchV1,
    ) -> Result<bool>;

    /// [`Backend::commit_change`] inside a write transaction the caller commits.
    async fn commit_change_in(
        connection: &mut Connection<Self::Db>,
        next: &StoredBatchV1,
    ) -> Result<bool>;

    /// [`Backend::commit_change`] of each of `nexts` (distinct batches), all in one
    /// transaction: `true` at each index whose change was written. One change's version
    /// race writes nothing of it and leaves the others alone.
    async fn commit_changes(
        connection: &mut Connection<Self::Db>,
        nexts: &[StoredBatchV1],
    ) -> Result<Vec<bool>>;

    /// The batches with these ids (at least two).
    async fn batches_by_id(
        connection: &mut Connection<Self::Db>,
        ids: &[BatchId],
    ) -> Result<Vec<StoredBatchV1>>;

    /// `(id, version)` of the batches with these ids (at least one).
    async fn versions_by_id(pool: &Pool<Self::Db>, ids: &[BatchId]) -> Result<Vec<(String, i64)>>;

    /// The feed's position of an event in `batch_events` (aliased `alias`, with its
    /// dot, or "" when not aliased), as a `bigint` column expression.
    fn transaction_of(alias: &str) -> String;

    /// A condition on event `e`: the feed can read it now (it is below the horizon).
    /// Compaction deletes nothing else, so that its watermark never passes the head.
    const READABLE_BY_THE_FEED: &'static str;

    /// The rows of [`EventLog::changes_after`] (each with the compaction watermark
    /// read in the same statement), the horizon they were read below, and when the
    /// oldest change held back above it was committed.
    async fn changes_after(
        pool: &Pool<Self::Db>,
        after: FeedCursor,
        read: FeedRead<'_>,
        limit: i64,
    ) -> Result<(Vec<FeedRow>, FeedCursor, Option<i64>)>;

    /// The feed's horizon: see [`FeedBounds::head`].
    async fn feed_head(pool: &Pool<Self::Db>) -> Result<FeedCursor>;

    /// See [`Store::notifier`].
    fn notifier(&self) -> Option<Arc<dyn ChangeNotifier>>;

    /// A statement that makes a write transaction the only one counting and inserting
    /// the endpoints of owner $1 until it ends (PostgreSQL: an advisory lock per owner),
    /// so concurrent creates cannot pass the per-owner limit together; `None` where a
    /// write transaction is alone anyway (SQLite).
    const LOCK_OWNER_ENDPOINTS: Option<&'static str>;

    /// Ends the subquery that picks the deliveries a replica may claim: PostgreSQL
    /// locks them and skips rows other replicas are claiming; SQLite has one writer.
    const CLAIM_LOCK: &'static str;

    /// Like [`Backend::LOCK_OWNER_ENDPOINTS`], for the active batches of owner $1: a
    /// create under the quota counts and inserts alone.
    const LOCK_OWNER_BATCHES: Option<&'static str>;

    /// Ends a `SELECT` of batches to delete: PostgreSQL locks them and skips the ones
    /// another replica is deleting (or changing); SQLite has one writer.
    const LOCK_SKIPPING_LOCKED: &'static str;

    /// Ends a `SELECT` of batches about to be deleted: PostgreSQL locks them, waiting
    /// for whoever holds them; SQLite has one writer.
    const LOCK_FOR_UPDATE: &'static str;

    /// Ends a `SELECT` of batches a transaction relies on existing until it commits:
    /// PostgreSQL holds a key-share lock, which a deletion waits for; SQLite has one
    /// writer.
    const LOCK_KEY_SHARE: &'static str;

    /// Ends a `SELECT` of batches a sweep is about to change: PostgreSQL locks them as
    /// an UPDATE that keeps the key does and skips the ones another replica's sweep
    /// holds; SQLite has one writer.
    const LOCK_TO_CHANGE_SKIPPING_LOCKED: &'static str;

    /// Logs the deletion of each `(id, version)` of `gone` (deleted in `tx`, at their
    /// last version) as the event after that version, carrying its snapshot, marked
    /// deleted, at `at`.
    async fn log_deletions(
        tx: &mut Transaction<'static, Self::Db>,
        gone: &[(String, i64)],
        at: i64,
    ) -> Result<()>;
}

/// The columns of `batches` that make up a batch, comma-separated.
pub(super) static BATCH_COLUMNS: LazyLock<String> =
    LazyLock::new(|| StoredBatchV1::COLUMNS.join(", "));

/// What a read of the change feed returns. Each backend has one statement per kind,
/// indexed by [`FeedRead::form`].
#[derive(Debug, Clone, Copy)]
pub(super) enum FeedRead<'a> {
    /// Every change, each with its batch.
    Every,
    /// One owner's changes (through the index of each owner's changes), each with its
    /// batch.
    OfOwner(&'a str),
    /// Every change, but only the ones that moved a batch's status (or created it)
    /// carry their batch: the rest are read past without decoding or sending their
    /// snapshots, which is most of what a feed read costs both sides.
    StatusMoves,
}

impl<'a> FeedRead<'a> {
    /// The index of its statement among a backend's forms.
    pub(super) fn form(self) -> usize {
        match self {
            FeedRead::Every => 0,
            FeedRead::OfOwner(_) => 1,
            FeedRead::StatusMoves => 2,
        }
    }

    /// The owner to bind after the statement's other parameters, if any.
    pub(super) fn owner(self) -> Option<&'a str> {
        match self {
            FeedRead::OfOwner(owner) => Some(owner),
            FeedRead::Every | FeedRead::StatusMoves => None,
        }
    }
}

/// The three forms of a feed statement: `template` with `{snapshot}` (the snapshot
/// column or, for status moves, the expression that keeps it only where the status
/// moved or the batch was marked stalled) and `{owner}` (nothing, or the owner
/// condition on parameter `owner_param`). `field_of(alias, field)` is the backend's
/// expression for a top-level field of a snapshot.
pub(super) fn feed_forms(
    template: &str,
    owner_param: usize,
    field_of: fn(&str, &str) -> String,
) -> [String; 3] {
    let every = "e.deleted, e.snapshot".to_owned();
    // Compaction may have removed the version before: then the move is unknown, and
    // the change counts as none (version 1 has no version before and always counts).
    // A deletion keeps the status of the version before, so it is no move either. Only
    // the version that marked a batch stalled carries `stalled_at`. The domain's
    // `Batch::is_status_move` is this rule (it decides when the dispatcher is woken);
    // the store contract test checks that the two agree.
    let moved = format!(
        "e.deleted, CASE WHEN e.version = 1 OR {} <> {} OR {} IS NOT NULL \
         THEN e.snapshot END AS snapshot",
        field_of("e", "status"),
        field_of("p", "status"),
        field_of("e", "stalled_at")
    );
    let owner = format!(" AND e.owner = ${owner_param}");
    [(&every, ""), (&every, owner.as_str()), (&moved, "")].map(|(snapshot, owner)| {
        template
            .replace("{snapshot}", snapshot)
            .replace("{previous_status}", &field_of("p", "status"))
            .replace("{owner}", owner)
    })
}

/// `SELECT <the batch columns> FROM batches <rest>`, built once.
fn select_batches(rest: &str) -> String {
    format!("SELECT {} FROM batches {rest}", *BATCH_COLUMNS)
}

/// The batch with id $1.
static SELECT_BATCH: LazyLock<String> = LazyLock::new(|| select_batches("WHERE id = $1"));

/// Batches whose timer is due: running past $1, or cancelling since $2; at most $3.
static SELECT_DUE_BATCHES: LazyLock<String> = LazyLock::new(|| {
    select_batches(
        "WHERE (status IN ('validating', 'in_progress', 'finalizing') AND expires_at <= $1) \
         OR (status = 'cancelling' AND cancelling_at <= $2) ORDER BY seq LIMIT $3",
    )
});

/// The batches whose `quiet_since` is at or before $1, through the partial index
/// `batches_quiet` (whose predicate this repeats: not final, not marked stalled).
const BEHIND_THE_CUTOFF: &str = "status IN ('validating', 'in_progress', 'finalizing', \
     'cancelling') AND stalled_at IS NULL AND quiet_since <= $1";

/// Batches not final and not marked stalled whose last change was at or before $1,
/// at most $2, the longest quiet first. `quiet_since` (never after the last change; see
/// [`catch_up_quiet_since`]) finds them through the partial index `batches_quiet`; the
/// last change itself is checked on the rows found.
static SELECT_QUIET_BATCHES: LazyLock<String> = LazyLock::new(|| {
    select_batches(&format!(
        "WHERE {BEHIND_THE_CUTOFF} \
         AND COALESCE(updated_at, created_at) <= $1 ORDER BY quiet_since LIMIT $2"
    ))
});

/// Pushes `INSERT INTO batches (<columns>) VALUES (<batch>)`.
pub(super) fn push_insert_batch<DB: SqlDatabase>(sql: &mut QueryBuilder<DB>, batch: &StoredBatchV1)
where
    i64: for<'q> Encode<'q, DB> + Type<DB>,
{
    sql.push(format_args!(
        "INSERT INTO batches ({}, quiet_since) VALUES (",
        *BATCH_COLUMNS
    ));
    DB::push_batch(&mut sql.separated(", "), batch);
    sql.push(", ").push_bind(batch.committed_at()).push(")");
}

/// The statement that moves `quiet_since` up to the last change of up to $2 batches
/// that changed after $1 although their `quiet_since` is at or before it, the longest
/// behind first, skipping rows another writer holds where the store can.
///
/// Writes leave `quiet_since` alone: it is an indexed column, and moving it would cost
/// PostgreSQL the HOT update (an entry in each of the table's indexes). So it is only a
/// lower bound of the last change, and the stall sweep brings the batches that changed
/// since it fell behind the cutoff up to date before it looks for quiet ones: each
/// running batch costs that once per stall time, in bulk and off the request path,
/// instead of on one of its progress reports. (The migration `stalls`, whose text
/// cannot change once applied, describes the rule before this one: writes moved the
/// mark once it was a minute behind, which made every report of a batch that reports
/// less often than that an update of every index.)
pub(super) fn catch_up_quiet_since(lock_skipping_locked: &str) -> String {
    format!(
        "UPDATE batches SET quiet_since = COALESCE(updated_at, created_at) \
         WHERE seq IN (SELECT seq FROM batches WHERE {BEHIND_THE_CUTOFF} \
         AND COALESCE(updated_at, created_at) > $1 ORDER BY quiet_since LIMIT $2\
         {lock_skipping_locked})"
    )
}

/// Pushes an `UPDATE` that replaces every column of the batch by `next`'s if the
/// stored version is still the one before `next`'s.
pub(super) fn push_update_if_current<DB: SqlDatabase>(
    sql: &mut QueryBuilder<DB>,
    next: &StoredBatchV1,
) where
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    i64: for<'q> Encode<'q, DB> + Type<DB>,
{
    sql.push(format_args!("UPDATE batches SET ({}) = (", *BATCH_COLUMNS));
    DB::push_batch(&mut sql.separated(", "), next);
    // `quiet_since` stays: see `catch_up_quiet_since`.
    sql.push(") WHERE id = ")
        .push_bind(next.id())
        .push(" AND version = ")
        .push_bind(next.version() - 1);
}

/// Frees key $2 of owner $1 if its claim was made before $3 (expired).
const RELEASE_EXPIRED_IDEMPOTENCY_KEY: &str = "DELETE FROM idempotency_keys \
     WHERE user_id = $1 AND idempotency_key = $2 AND created_at < $3";

/// Claims key $2 of owner $1 for request $3 and batch $4 at $5, unless it is taken.
const CLAIM_IDEMPOTENCY_KEY: &str = "INSERT INTO idempotency_keys \
     (user_id, idempotency_key, request_sha256, batch_id, created_at) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id, idempotency_key) DO NOTHING";

/// The claim on key $2 of owner $1.
const SELECT_IDEMPOTENCY_KEY: &str = "SELECT batch_id, request_sha256 \
     FROM idempotency_keys WHERE user_id = $1 AND idempotency_key = $2";

/// Deletes at most $2 idempotency keys claimed before $1.
const FORGET_IDEMPOTENCY_KEYS: &str = "DELETE FROM idempotency_keys \
     WHERE (user_id, idempotency_key) IN (SELECT user_id, idempotency_key \
     FROM idempotency_keys WHERE created_at < $1 LIMIT $2)";

/// Deletes at most $2 events older than $1, keeping the latest version of every batch
/// that still exists (a deleted batch's events, its deletion included, all go),
/// every event the feed still holds back, and every event that the webhook dispatcher
/// has not read or whose next version it has not read (the dispatcher tells a status
/// change by the version before), so no webhook event is lost to compaction. Returns
/// the feed position of each (`transaction`, `transaction_of_e`, `transaction_of_n` and
/// `readable` are the backend's expressions).
fn compact_events(
    transaction: &str,
    transaction_of_e: &str,
    transaction_of_n: &str,
    readable: &str,
) -> String {
    format!(
        "DELETE FROM batch_events \
         WHERE (batch_id, version) IN (SELECT e.batch_id, e.version FROM batch_events e \
         LEFT JOIN batches b ON b.id = e.batch_id \
         WHERE e.at < $1 AND (b.version IS NULL OR e.version < b.version) \
         AND {readable} AND NOT EXISTS (SELECT 1 FROM webhook_dispatch w \
         LEFT JOIN batch_events n ON n.batch_id = e.batch_id AND n.version = e.version + 1 \
         WHERE ({transaction_of_e}, e.position) > (w.after_transaction, w.after_position) \
         OR ({transaction_of_n}, n.position) > (w.after_transaction, w.after_position)) \
         LIMIT $2) \
         RETURNING {transaction}, position"
    )
}

/// Raises the feed's compaction watermark to ($1, $2) if it is below.
const RAISE_COMPACTION_WATERMARK: &str = "UPDATE feed_compaction \
     SET through_transaction = $1, through_position = $2 \
     WHERE (through_transaction, through_position) < ($1, $2)";

/// The feed's compaction watermark: every change compacted away is at or below it.
const SELECT_COMPACTION_WATERMARK: &str =
    "SELECT through_transaction, through_position FROM feed_compaction";

/// Versions of batch $1 after version $2, oldest first, at most $3 (a deletion is not
/// a version: only the change feed tells of it).
const SELECT_EVENTS_AFTER: &str = "SELECT version, snapshot FROM batch_events \
     WHERE batch_id = $1 AND version > $2 AND NOT deleted ORDER BY version LIMIT $3";

/// The statuses a batch may be deleted in (`BatchStatus::is_terminal`), as SQL; the
/// migrations' partial indexes name the same.
const TERMINAL_STATUSES: &str = "('completed', 'failed', 'expired', 'cancelled')";

/// When a terminal batch became terminal: the time stamp of its status. The
/// expression of the migrations' `batches_terminal_by_time` index, word for word.
const TERMINAL_TIME: &str = "(CASE status \
     WHEN 'completed' THEN completed_at WHEN 'failed' THEN failed_at \
     WHEN 'expired' THEN expired_at WHEN 'cancelled' THEN cancelled_at END)";

/// How many of owner $1's batches are active (not terminal), counted up to $2.
const COUNT_ACTIVE_BATCHES: &str = "SELECT COUNT(*) FROM (SELECT 1 FROM batches \
     WHERE user_id = $1 AND status IN ('validating', 'in_progress', 'finalizing', 'cancelling') \
     LIMIT $2) AS active";

/// Pushes ` (<binds>)`: a parenthesised list of `values`, for `IN`.
pub(super) fn push_list<DB: Database>(sql: &mut QueryBuilder<DB>, values: &[String])
where
    String: for<'q> Encode<'q, DB> + Type<DB>,
{
    sql.push(" (");
    let mut list = sql.separated(", ");
    for value in values {
        list.push_bind(value.clone());
    }
    sql.push(")");
}

/// Deletes the batches among `ids` that are terminal, each with its metadata index
/// rows, its idempotency key and its webhook deliveries not yet sent, and logs each
/// deletion, inside `tx`. Returns the ids deleted.
async fn delete_terminal_in<B: Backend>(
    tx: &mut Transaction<'static, B::Db>,
    ids: &[String],
    at: i64,
) -> Result<Vec<String>>
where
    for<'c> &'c mut <B::Db as Database>::Connection: Executor<'c, Database = B::Db>,
    <B::Db as Database>::Arguments: IntoArguments<B::Db>,
    String: for<'q> Encode<'q, B::Db> + Type<B::Db>,
    (String, i64): for<'r> FromRow<'r, <B::Db as Database>::Row>,
{
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // The batches' rows are locked first, in id order, as every deletion does (the
    // retention sweep holds its chunk's already): a request's deletion and the sweep
    // never lock the index rows and the batch in opposite orders.
    let mut lock = QueryBuilder::<B::Db>::new(format!(
        "SELECT id FROM batches WHERE status IN {TERMINAL_STATUSES} AND id IN"
    ));
    push_list(&mut lock, ids);
    lock.push(format_args!(" ORDER BY id{}", B::LOCK_FOR_UPDATE));
    lock.build().execute(&mut **tx).await?;
    // The index rows first: they refer to the batch.
    let mut sql = QueryBuilder::<B::Db>::new(format!(
        "DELETE FROM batch_metadata WHERE batch_seq IN (SELECT seq FROM batches \
         WHERE status IN {TERMINAL_STATUSES} AND id IN"
    ));
    push_list(&mut sql, ids);
    sql.push(")");
    sql.build().execute(&mut **tx).await?;
    let mut sql = QueryBuilder::<B::Db>::new(format!(
        "DELETE FROM batches WHERE status IN {TERMINAL_STATUSES} AND id IN"
    ));
    push_list(&mut sql, ids);
    sql.push(" RETURNING id, version");
    let gone: Vec<(String, i64)> = sql.build_query_as().fetch_all(&mut **tx).await?;
    if gone.is_empty() {
        return Ok(Vec::new());
    }
    B::log_deletions(tx, &gone, at).await?;
    let gone: Vec<String> = gone.into_iter().map(|(id, _)| id).collect();
    for table in [
        "DELETE FROM idempotency_keys WHERE batch_id IN",
        // Delivered and failed ones stay, as the endpoint's history, until they expire.
        "DELETE FROM webhook_deliveries WHERE state = 'pending' AND batch_id IN",
    ] {
        let mut sql = QueryBuilder::<B::Db>::new(table);
        push_list(&mut sql, &gone);
        sql.build().execute(&mut **tx).await?;
    }
    Ok(gone)
}

/// Inserts a key: $1 id, $2 digest, $3 user, $4 scope, $5 created_at.
const INSERT_API_KEY: &str = "INSERT INTO api_keys \
     (id, secret_sha256, user_id, scope, created_at) VALUES ($1, $2, $3, $4, $5)";

/// Whether any key exists.
const ANY_API_KEY: &str = "SELECT EXISTS (SELECT 1 FROM api_keys)";

/// The key with digest $1.
const SELECT_API_KEY_BY_DIGEST: &str = "SELECT id, user_id, scope, created_at, revoked_at \
     FROM api_keys WHERE secret_sha256 = $1";

/// Every key, oldest first.
const SELECT_API_KEYS: &str = "SELECT id, user_id, scope, created_at, revoked_at \
     FROM api_keys ORDER BY created_at, id";

/// Revokes key $1 at $2, keeping an earlier revocation.
/// With a key's revocation, in its transaction: the all-owners webhook endpoints it
/// configured stop (an owner's own endpoints belong to the owner and go on).
const DISABLE_ENDPOINTS_OF_REVOKED_KEY: &str = "UPDATE webhook_endpoints \
     SET disabled_at = $2, disabled_reason = 'key revoked' \
     WHERE key_id = $1 AND all_owners = TRUE AND disabled_at IS NULL";

const INSERT_SERVER_KEY: &str =
    "INSERT INTO server_keys (name, secret) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING";

const SELECT_SERVER_KEY: &str = "SELECT secret FROM server_keys WHERE name = $1";

const REVOKE_API_KEY: &str =
    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1";

/// `sql` with its two parameters bound: $1 a Unix second, $2 a row limit.
fn before_and_limit<DB: Database>(
    sql: &'static str,
    before_at: i64,
    limit: i64,
) -> Query<'static, DB, DB::Arguments>
where
    i64: for<'q> Encode<'q, DB> + Type<DB>,
{
    sqlx::query(sql).bind(before_at).bind(limit)
}

/// [`INSERT_API_KEY`] with `key` and the digest of its secret bound.
fn insert_api_key<DB: Database>(
    key: &ApiKey,
    secret_digest: &[u8; 32],
) -> Query<'static, DB, DB::Arguments>
where
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    i64: for<'q> Encode<'q, DB> + Type<DB>,
{
    sqlx::query(INSERT_API_KEY)
        .bind(key.id.as_str())
        .bind(&secret_digest[..])
        .bind(key.user_id.as_str())
        .bind(key.scope.as_str())
        .bind(key.created_at)
}

/// A store on a sqlx pool; `B` says what its database does differently.
pub(super) struct SqlStore<B: Backend> {
    pub(super) pool: Pool<B::Db>,
    /// Connections kept between statements for the frequent single statements: point
    /// reads, commits, creates, and the webhook deliverer's claims and records.
    pub(super) held: HeldConnections<B::Db>,
    pub(super) health: HealthConnection<B::Db>,
    /// What this replica knows about the database's reachability.
    pub(super) status: DatabaseStatus,
    pub(super) backend: B,
}

impl<B: Backend> SqlStore<B>
where
    for<'c> &'c mut <B::Db as Database>::Connection: Executor<'c, Database = B::Db>,
    <B::Db as Database>::Arguments: IntoArguments<B::Db>,
    (i64, i64): for<'r> FromRow<'r, <B::Db as Database>::Row>,
{
    /// Inside a write transaction that is about to insert a batch of `owner`: makes it
    /// the only one counting and inserting that owner's batches until it ends, and
    /// fails with [`Error::ActiveBatchLimit`] when the owner has `limit` active batches.
    async fn hold_quota(tx: &mut Transaction<'static, B::Db>, owner: &str, limit: u32) -> Result<()>
    where
        for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
        i64: for<'q> Encode<'q, B::Db> + Type<B::Db>,
        (i64,): for<'r> FromRow<'r, <B::Db as Database>::Row>,
    {
        if let Some(lock) = B::LOCK_OWNER_BATCHES {
            sqlx::query(lock).bind(owner).execute(&mut **tx).await?;
        }
        let (active,): (i64,) = sqlx::query_as(COUNT_ACTIVE_BATCHES)
            .bind(owner)
            .bind(i64::from(limit))
            .fetch_one(&mut **tx)
            .await?;
        if active >= i64::from(limit) {
            metrics::counter!("batchd_quota_refused_total").increment(1);
            return Err(Error::ActiveBatchLimit { limit });
        }
        Ok(())
    }

    /// One read of the change feed: see [`EventLog::changes_after`].
    async fn read_feed(
        &self,
        after: FeedCursor,
        read: FeedRead<'_>,
        limit: i64,
    ) -> Result<FeedPage> {
        // An empty page must not count as full: the next read would skip to the horizon.
        if limit < 1 {
            return Err(Error::invalid(
                "limit",
                format!("{limit}: the change feed is read at least one change at a time"),
            ));
        }
        let (rows, horizon, held_back_since) =
            B::changes_after(&self.pool, after, read, limit).await?;
        // Read with the rows, in the same statement, when there are any; an empty read
        // reads it afterwards, so that changes deleted before it are still noticed.
        let compacted_through = match rows.first() {
            Some(row) => row.compacted_through(),
            None => {
                let (transaction, position) = sqlx::query_as(SELECT_COMPACTION_WATERMARK)
                    .fetch_one(&self.pool)
                    .await?;
                FeedCursor {
                    transaction,
                    position,
                }
            }
        };
        if compacted_through > after {
            return Err(Error::FeedCompacted {
                after: after.to_string(),
                oldest: compacted_through.to_string(),
            });
        }
        feed_page(rows, after, horizon, held_back_since, limit)
    }
}

#[async_trait]
impl<B: Backend> EventLog for SqlStore<B>
where
    for<'c> &'c mut <B::Db as Database>::Connection: Executor<'c, Database = B::Db>,
    <B::Db as Database>::Arguments: IntoArguments<B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    i64: for<'q> Encode<'q, B::Db> + Type<B::Db>,
    StoredBatchV1: for<'r> FromRow<'r, <B::Db as Database>::Row>,
    EventRow: for<'r> FromRow<'r, <B::Db as Database>::Row>,
    PositionedRow: for<'r> FromRow<'r, <B::Db as Database>::Row>,
    (i64, i64): for<'r> FromRow<'r, <B::Db as Database>::Row>,
{
    #[tracing::instrument(level = "debug", name = "store.events_after", skip_all, fields(db.system = B::SYSTEM, batch_id = %id, after_version))]
    async fn events_after(
        &self,
        id: &BatchId,
        after_version: i64,
        limit: i64,
    ) -> Result<Vec<BatchEvent>> {
        let rows: Vec<EventRow> = sqlx::query_as(SELECT_EVENTS_AFTER)
            .bind(id.as_str())
            .bind(after_version)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(BatchEvent::try_from).collect()
    }

    #[tracing::instrument(level = "debug", name = "store.latest_versions", skip_all, fields(db.system = B::SYSTEM, batches = ids.len()))]
    async fn latest_versions(&self, ids: &[BatchId]) -> Result<Vec<(BatchId, i64)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = B::versions_by_id(&self.pool, ids).await?;
        rows.into_iter()
            .map(|(id, version)| {
                let id = BatchId::parse("id", &id).map_err(|e| Error::Internal(e.to_string()))?;
                Ok((id, version))
            })
            .collect()
    }

    #[tracing::instrument(level = "debug", name = "store.changes_after", skip_all, fields(db.system = B::SYSTEM, after = ?after))]
    async fn changes_after(
        &self,
        after: FeedCursor,
        owner: Option<&str>,
        limit: i64,
    ) -> Result<FeedPage> {
        let read = owner.map_or(FeedRead::Every, FeedRead::OfOwner);
        self.read_feed(after, read, limit).await
    }

    #[tracing::instrument(level = "debug", name = "store.status_moves_after", skip_all, fields(db.system = B::SYSTEM, after = ?after))]
    async fn status_moves_after(&self, after: FeedCursor, limit: i64) -> Result<FeedPage> {
        self.read_feed(after, FeedRead::StatusMoves, limit).await
    }

    #[tracing::instrument(level = "debug", name = "store.feed_bounds", skip_all, fields(db.system = B::SYSTEM))]
    async fn feed_bounds(&self) -> Result<FeedBounds> {
        // The watermark first: compaction between the two reads can only make the
        // bounds look narrower than they were, never wider.
        let (transaction, position) = sqlx::query_as(SELECT_COMPACTION_WATERMARK)
            .fetch_one(&self.pool)
            .await?;
        let head = B::feed_head(&self.pool).await?;
        Ok(FeedBounds {
            oldest: FeedCursor {
                transaction,
                position,
            },
            head,
        })
    }

    #[tracing::instrument(level = "debug", name = "store.batches_with_positions", skip_all, fields(db.system = B::SYSTEM))]
    async fn batches_with_positions(
        &self,
        query: BatchPageQuery<'_>,
    ) -> Result<Vec<(FeedCursor, Batch)>> {
        let direction = if query.oldest_first { "ASC" } else { "DESC" };
        let mut sql = QueryBuilder::new(format!(
            "SELECT {} AS \"transaction\", e.position AS position, page.* FROM (",
            B::transaction_of("e.")
        ));
        push_page_query(&mut sql, query);
        sql.push(format_args!(
            ") AS page JOIN batch_events e ON e.batch_id = page.id AND e.version = page.version \
             ORDER BY page.seq {direction}"
        ));
        let rows = sql
            .build_query_as::<PositionedRow>()
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| {
                let cursor = FeedCursor {
                    transaction: row.transaction,
                    position: row.position,
                };
                Ok((cursor, Batch::try_from(row.batch)?))
            })
            .collect()
    }

    #[tracing::instrument(level = "debug", name = "store.get_batch", skip_all, fields(db.system = B::SYSTEM, batch_id = %id))]
    async fn get_batch(&self, id: &BatchId) -> Result<Option<Batch>> {
        let mut connection = self.held.take().await?;
        let row = sqlx::query_as::<_, StoredBatchV1>(SELECT_BATCH.as_str())
            .bind(id.as_str())
            .fetch_optional(&mut *connection)
            .await?;
        connection.keep();
        row.map(Batch::try_from).transpose()
    }
}

#[async_trait]
impl<B: Backend> super::BatchStore for SqlStore<B>
where
    for<'c> &'c mut <B::Db as Database>::Connection: Executor<'c, Database = B::Db>,
    <B::Db as Database>::Arguments: IntoArguments<B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    i64: for<'q> Encode<'q, B::Db> + Type<B::Db>,
    for<'q> &'q [u8]: Encode<'q, B::Db> + Type<B::Db>,
    StoredBatchV1: for<'r> FromRow<'r, <B::Db as Database>::Row>,
    EventRow: for<'r> FromRow<'r, <B::Db as Database>::Row>,
    PositionedRow: for<'r> FromRow<'r, <B::Db as Database>::Row>,
    (i64, i64): for<'r> FromRow<'r, <B::Db as Database>::Row>,
    (String, Vec<u8>): for<'r> FromRow<'r, <B::Db as Database>::Row>,
    (String, i64): for<'r> FromRow<'r, <B::Db as Database>::Row>,
    (String,): for<'r> FromRow<'r, <B::Db as Database>::Row>,
    (i64,): for<'r> FromRow<'r, <B::Db as Database>::Row>,
    String: for<'q> Encode<'q, B::Db> + Type<B::Db>,
{
    #[tracing::instrument(level = "debug", name = "store.insert_batch", skip_all, fields(db.system = B::SYSTEM, batch_id = %batch.id))]
    async fn insert_batch(&self, batch: &Batch, active_limit: Option<u32>) -> Result<()> {
        let Some(limit) = active_limit else {
            let mut connection = self.held.take().await?;
            B::insert_batch(&mut connection, &StoredBatchV1::from(batch)).await?;
            connection.keep();
            return Ok(());
        };
        let mut tx = B::begin_write(&self.pool).await?;
        Self::hold_quota(&mut tx, &batch.user_id, limit).await?;
        B::insert_batch_in(&mut *tx, &StoredBatchV1::from(batch)).await?;
        tx.commit().await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "store.insert_batch_once", skip_all, fields(db.system = B::SYSTEM, batch_id = %batch.id))]
    async fn insert_batch_once(
        &self,
        batch: &Batch,
        claim: IdempotencyClaim<'_>,
        active_limit: Option<u32>,
    ) -> Result<Option<EarlierClaim>> {
        // On SQLite the write lock, on PostgreSQL the primary key on (owner, key),
        // makes a concurrent claim of the same key wait for this one to end.
        let mut tx = B::begin_write(&self.pool).await?;
        sqlx::query(RELEASE_EXPIRED_IDEMPOTENCY_KEY)
            .bind(claim.user_id)
            .bind(claim.key)
            .bind(claim.expired_before)
            .execute(&mut *tx)
            .await?;
        let claimed = sqlx::query(CLAIM_IDEMPOTENCY_KEY)
            .bind(claim.user_id)
            .bind(claim.key)
            .bind(&claim.request_sha256[..])
            .bind(batch.id.as_str())
            .bind(claim.at)
            .execute(&mut *tx)
            .await?;
        if B::Db::rows_affected(&claimed) == 0 {
            // Taken by a live claim (on PostgreSQL the INSERT waited for the
            // transaction that made it to commit, so it is visible now).
            let (batch_id, request_sha256): (String, Vec<u8>) =
                sqlx::query_as(SELECT_IDEMPOTENCY_KEY)
                    .bind(claim.user_id)
                    .bind(claim.key)
                    .fetch_one(&mut *tx)
                    .await?;
            return Ok(Some(EarlierClaim {
                batch_id,
                request_sha256,
            }));
        }
        // After the claim: a repeated create is answered above and never counted. The
        // claim is taken before the owner's lock by every create, so they cannot
        // deadlock.
        if let Some(limit) = active_limit {
            Self::hold_quota(&mut tx, &batch.user_id, limit).await?;
        }
        B::insert_batch_in(&mut *tx, &StoredBatchV1::from(batch)).await?;
        tx.commit().await?;
        Ok(None)
    }

    #[tracing::instrument(level = "debug", name = "store.delete_batch", skip_all, fields(db.system = B::SYSTEM, batch_id = %id))]
    async fn delete_batch(&self, id: &BatchId, at: i64) -> Result<bool> {
        let mut tx = B::begin_write(&self.pool).await?;
        let gone = delete_terminal_in::<B>(&mut tx, &[id.as_str().to_owned()], at).await?;
        tx.commit().await?;
        Ok(!gone.is_empty())
    }

    #[tracing::instrument(level = "debug", name = "store.delete_terminal_batches", skip_all, fields(db.system = B::SYSTEM))]
    async fn delete_terminal_batches(
        &self,
        terminal_before: i64,
        at: i64,
        limit: i64,
    ) -> Result<Vec<BatchId>> {
        let mut tx = B::begin_write(&self.pool).await?;
        let doomed: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM batches WHERE status IN {TERMINAL_STATUSES} \
             AND {TERMINAL_TIME} < $1 ORDER BY {TERMINAL_TIME} LIMIT $2{}",
            B::LOCK_SKIPPING_LOCKED
        )))
        .bind(terminal_before)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let doomed: Vec<String> = doomed.into_iter().map(|(id,)| id).collect();
        let gone = delete_terminal_in::<B>(&mut tx, &doomed, at).await?;
        tx.commit().await?;
        gone.iter()
            .map(|id| BatchId::parse("id", id).map_err(|e| Error::Internal(e.to_string())))
            .collect()
    }

    async fn catch_up_quiet_since(&self, changed_after: i64, limit: i64) -> Result<u64> {
        // A write transaction of its own, as SQLite needs for a write that reads first.
        let mut tx = B::begin_write(&self.pool).await?;
        let moved = sqlx::query(sqlx::AssertSqlSafe(catch_up_quiet_since(
            B::LOCK_TO_CHANGE_SKIPPING_LOCKED,
        )))
        .bind(changed_after)
        .bind(limit)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(B::Db::rows_affected(&moved))
    }

    async fn mark_stalled_batches(
        &self,
        now: i64,
        stall_after: i64,
        limit: i64,
    ) -> Result<Vec<Batch>> {
        let mut tx = B::begin_write(&self.pool).await?;
        let quiet: Vec<StoredBatchV1> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "{}{}",
            *SELECT_QUIET_BATCHES,
            B::LOCK_TO_CHANGE_SKIPPING_LOCKED
        )))
        .bind(now.saturating_sub(stall_after))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut marked = Vec::new();
        for stored in quiet {
            let Some(next) = Batch::try_from(stored)?.mark_stalled(now, stall_after) else {
                continue;
            };
            // The row is locked: no other writer can have moved its version since.
            if B::commit_change_in(&mut *tx, &StoredBatchV1::from(&next)).await? {
                marked.push(next);
            }
        }
        tx.commit().await?;
        Ok(marked)
    }

    #[tracing::instrument(level = "debug", name = "store.get_batches", skip_all, fields(db.system = B::SYSTEM, batches = ids.len()))]
    async fn get_batches(&self, ids: &[BatchId]) -> Result<Vec<Batch>> {
        match ids {
            [] => Ok(Vec::new()),
            [id] => Ok(self.get_batch(id).await?.into_iter().collect()),
            _ => {
                let mut connection = self.held.take().await?;
                let rows = B::batches_by_id(&mut connection, ids).await?;
                connection.keep();
                convert_all(rows)
            }
        }
    }

    #[tracing::instrument(level = "debug", name = "store.list_batches", skip_all, fields(db.system = B::SYSTEM))]
    async fn list_batches(&self, query: BatchPageQuery<'_>) -> Result<Vec<Batch>> {
        let rows = page_query::<B::Db>(query)
            .build_query_as::<StoredBatchV1>()
            .fetch_all(&self.pool)
            .await?;
        convert_all(rows)
    }

    #[tracing::instrument(level = "debug", name = "store.count_batches", skip_all, fields(db.system = B::SYSTEM))]
    async fn count_batches(&self, filter: &BatchFilter) -> Result<Vec<(BatchStatus, i64)>> {
        let query = BatchPageQuery {
            owner: filter.owner.as_deref(),
            after: None,
            statuses: &filter.statuses,
            job_id: filter.job_id.as_deref(),
            created_after: filter.created_after,
            created_before: filter.created_before,
            metadata: &filter.metadata,
            stalled: filter.stalled,
            oldest_first: false,
            limit: 0,
        };
        let rows: Vec<(String, i64)> = count_query::<B::Db>(query)
            .build_query_as()
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|(status, count)| {
                let known = BatchStatus::from_name(&status).ok_or_else(|| {
                    Error::Internal(format!(
                        "a stored batch has the unknown status `{status:.40}`"
                    ))
                })?;
                Ok((known, count))
            })
            .collect()
    }

    #[tracing::instrument(level = "debug", name = "store.commit_change", skip_all, fields(db.system = B::SYSTEM, batch_id = %next.id, version = next.version))]
    async fn commit_change(&self, next: &Batch) -> Result<bool> {
        let mut connection = self.held.take().await?;
        let written = B::commit_change(&mut connection, &StoredBatchV1::from(next)).await?;
        connection.keep();
        Ok(written)
    }

    #[tracing::instrument(level = "debug", name = "store.commit_changes", skip_all, fields(db.system = B::SYSTEM, batches = nexts.len()))]
    async fn commit_changes(&self, nexts: &[Arc<Batch>]) -> Result<Vec<bool>> {
        let stored: Vec<StoredBatchV1> = nexts
            .iter()
            .map(|next| StoredBatchV1::from(next.as_ref()))
            .collect();
        let mut ids: Vec<&str> = stored.iter().map(StoredBatchV1::id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(Error::Internal(
                "one round of commits changes a batch twice".into(),
            ));
        }
        let mut connection = self.held.take().await?;
        let written = B::commit_changes(&mut connection, &stored).await?;
        connection.keep();
        Ok(written)
    }

    #[tracing::instrument(level = "debug", name = "store.due_batches", skip_all, fields(db.system = B::SYSTEM))]
    async fn due_batches(
        &self,
        now: i64,
        cancelling_before: i64,
        limit: i64,
    ) -> Result<Vec<Batch>> {
        let rows: Vec<StoredBatchV1> = sqlx::query_as(SELECT_DUE_BATCHES.as_str())
            .bind(now)
            .bind(cancelling_before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        convert_all(rows)
    }
}

#[async_trait]
impl<B: Backend> super::KeyStore for SqlStore<B>
where
    for<'c> &'c mut <B::Db as Database>::Connection: Executor<'c, Database = B::Db>,
    <B::Db as Database>::Arguments: IntoArguments<B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    i64: for<'q> Encode<'q, B::Db> + Type<B::Db>,
    for<'q> &'q [u8]: Encode<'q, B::Db> + Type<B::Db>,
    ApiKeyRow: for<'r> FromRow<'r, <B::Db as Database>::Row>,
    (bool,): for<'r> FromRow<'r, <B::Db as Database>::Row>,
    (String,): for<'r> FromRow<'r, <B::Db as Database>::Row>,
{
    #[tracing::instrument(level = "debug", name = "store.insert_api_key", skip_all, fields(db.system = B::SYSTEM))]
    async fn insert_api_key(&self, key: &ApiKey, secret_digest: &[u8; 32]) -> Result<()> {
        insert_api_key(key, secret_digest)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "store.insert_first_api_key", skip_all, fields(db.system = B::SYSTEM))]
    async fn insert_first_api_key(&self, key: &ApiKey, secret_digest: &[u8; 32]) -> Result<bool> {
        let mut tx = B::begin_first_key_check(&self.pool).await?;
        let (any,): (bool,) = sqlx::query_as(ANY_API_KEY).fetch_one(&mut *tx).await?;
        if any {
            return Ok(false);
        }
        insert_api_key(key, secret_digest).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    #[tracing::instrument(level = "debug", name = "store.api_key_by_digest", skip_all, fields(db.system = B::SYSTEM))]
    async fn api_key_by_digest(&self, secret_digest: &[u8; 32]) -> Result<Option<ApiKey>> {
        sqlx::query_as::<_, ApiKeyRow>(SELECT_API_KEY_BY_DIGEST)
            .bind(&secret_digest[..])
            .fetch_optional(&self.pool)
            .await?
            .map(ApiKey::try_from)
            .transpose()
    }

    #[tracing::instrument(level = "debug", name = "store.list_api_keys", skip_all, fields(db.system = B::SYSTEM))]
    async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        let rows: Vec<ApiKeyRow> = sqlx::query_as(SELECT_API_KEYS)
            .fetch_all(&self.pool)
            .await?;
        convert_all(rows)
    }

    #[tracing::instrument(level = "debug", name = "store.revoke_api_key", skip_all, fields(db.system = B::SYSTEM))]
    async fn revoke_api_key(&self, id: &str, at: i64) -> Result<bool> {
        let mut tx = B::begin_write(&self.pool).await?;
        let result = sqlx::query(REVOKE_API_KEY)
            .bind(id)
            .bind(at)
            .execute(&mut *tx)
            .await?;
        sqlx::query(DISABLE_ENDPOINTS_OF_REVOKED_KEY)
            .bind(id)
            .bind(at)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(B::Db::rows_affected(&result) == 1)
    }

    #[tracing::instrument(level = "debug", name = "store.revoked_api_keys", skip_all, fields(db.system = B::SYSTEM, keys = ids.len()))]
    async fn revoked_api_keys(&self, ids: &[String]) -> Result<Vec<String>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = QueryBuilder::<B::Db>::new(
            "SELECT id FROM api_keys WHERE revoked_at IS NOT NULL AND id IN (",
        );
        let mut list = query.separated(", ");
        for id in ids {
            list.push_bind(id.as_str());
        }
        query.push(")");
        let rows: Vec<(String,)> = query.build_query_as().fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    #[tracing::instrument(level = "debug", name = "store.server_key", skip_all, fields(db.system = B::SYSTEM))]
    async fn server_key(&self, name: &str, candidate: &str) -> Result<String> {
        sqlx::query(INSERT_SERVER_KEY)
            .bind(name)
            .bind(candidate)
            .execute(&self.pool)
            .await?;
        let (secret,): (String,) = sqlx::query_as(SELECT_SERVER_KEY)
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(secret)
    }

    #[tracing::instrument(level = "debug", name = "store.forget_idempotency_keys", skip_all, fields(db.system = B::SYSTEM))]
    async fn forget_idempotency_keys(&self, before_at: i64, limit: i64) -> Result<u64> {
        let result = before_and_limit(FORGET_IDEMPOTENCY_KEYS, before_at, limit)
            .execute(&self.pool)
            .await?;
        Ok(B::Db::rows_affected(&result))
    }
}

#[async_trait]
impl<B: Backend> super::Maintenance for SqlStore<B>
where
    for<'c> &'c mut <B::Db as Database>::Connection: Executor<'c, Database = B::Db>,
    <B::Db as Database>::Arguments: IntoArguments<B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    i64: for<'q> Encode<'q, B::Db> + Type<B::Db>,
    (i64, i64): for<'r> FromRow<'r, <B::Db as Database>::Row>,
{
    #[tracing::instrument(level = "debug", name = "store.ping", skip_all, fields(db.system = B::SYSTEM))]
    async fn ping(&self) -> Result<()> {
        self.health.ping().await
    }

    #[tracing::instrument(level = "debug", name = "store.compact_events", skip_all, fields(db.system = B::SYSTEM))]
    async fn compact_events(&self, before_at: i64, limit: i64) -> Result<u64> {
        let mut tx = B::begin_write(&self.pool).await?;
        // Built from constant text only: the backend's column expression.
        let delete = sqlx::AssertSqlSafe(compact_events(
            &B::transaction_of(""),
            &B::transaction_of("e."),
            &B::transaction_of("n."),
            B::READABLE_BY_THE_FEED,
        ));
        let deleted: Vec<(i64, i64)> = sqlx::query_as(delete)
            .bind(before_at)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        // A reader that has not passed every deleted change yet is refused from now on
        // (`FeedCompacted`), never served a gap.
        if let Some(&(transaction, position)) = deleted.iter().max() {
            sqlx::query(RAISE_COMPACTION_WATERMARK)
                .bind(transaction)
                .bind(position)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(deleted.len() as u64)
    }
}

#[async_trait]
impl<B: Backend> super::Lifecycle for SqlStore<B> {
    #[tracing::instrument(level = "debug", name = "store.migrate", skip_all, fields(db.system = B::SYSTEM))]
    async fn migrate(&self) -> Result<()> {
        self.backend.migrate(&self.pool).await
    }

    fn notifier(&self) -> Option<Arc<dyn ChangeNotifier>> {
        self.backend.notifier()
    }

    /// Kept connections count as idle: they wait for a statement, as the pool's do.
    fn pool_usage(&self) -> (u32, u32) {
        let idle = self.pool.num_idle() + self.held.kept();
        (self.pool.size(), idle as u32)
    }

    fn database_status(&self) -> DatabaseStatus {
        self.status.clone()
    }

    async fn close(&self) {
        self.held.release_all();
        self.pool.close().await;
    }
}

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
    let mut sql = sqlx::QueryBuilder::new("");
    push_page_query(&mut sql, query);
    sql
}

/// Pushes the page query of [`page_query`]: `SELECT seq, <the batch columns> ...`.
fn push_page_query<'a, DB>(sql: &mut sqlx::QueryBuilder<DB>, query: super::BatchPageQuery<'a>)
where
    DB: sqlx::Database,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let direction = if query.oldest_first { "ASC" } else { "DESC" };
    if query.statuses.len() <= 1 {
        push_page(sql, &query, query.statuses.first().copied());
        return;
    }
    sql.push(format_args!("SELECT seq, {} FROM (", *BATCH_COLUMNS));
    for (i, &status) in query.statuses.iter().enumerate() {
        if i > 0 {
            sql.push(" UNION ALL ");
        }
        sql.push("SELECT * FROM (");
        push_page(sql, &query, Some(status));
        sql.push(format_args!(") AS status_{i}"));
    }
    sql.push(format_args!(") AS pages ORDER BY seq {direction} LIMIT "))
        .push_bind(query.limit);
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
    sql.push(format_args!(
        "SELECT seq, {} FROM batches WHERE TRUE",
        *BATCH_COLUMNS
    ));
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
    push_filters(sql, query);
    sql.push(format_args!(" ORDER BY seq {direction} LIMIT "))
        .push_bind(query.limit);
}

/// Counts the batches matching `query`'s filters (its paging fields are not used):
/// `SELECT status, COUNT(*) ... GROUP BY status`.
fn count_query<'a, DB>(query: super::BatchPageQuery<'a>) -> QueryBuilder<DB>
where
    DB: sqlx::Database,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let mut sql = QueryBuilder::new("SELECT status, COUNT(*) FROM batches WHERE TRUE");
    if !query.statuses.is_empty() {
        sql.push(" AND status IN (");
        let mut statuses = sql.separated(", ");
        for status in query.statuses {
            statuses.push_bind(status.as_str());
        }
        sql.push(")");
    }
    push_filters(&mut sql, &query);
    sql.push(" GROUP BY status");
    sql
}

/// The conditions of every filter but status and paging: ` AND ...` for the owner,
/// the job, the creation range and each metadata pair.
fn push_filters<'a, DB>(sql: &mut QueryBuilder<DB>, query: &super::BatchPageQuery<'a>)
where
    DB: sqlx::Database,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    if let Some(owner) = query.owner {
        sql.push(" AND user_id = ").push_bind(owner);
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
    match query.stalled {
        Some(true) => sql.push(" AND stalled_at IS NOT NULL"),
        Some(false) => sql.push(" AND stalled_at IS NULL"),
        None => sql,
    };
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
}

/// A row of `batch_events`: one committed version.
#[derive(Debug, FromRow)]
pub(super) struct EventRow {
    version: i64,
    #[sqlx(json)]
    snapshot: StoredBatchV1,
}

impl TryFrom<EventRow> for BatchEvent {
    type Error = Error;

    fn try_from(row: EventRow) -> Result<BatchEvent> {
        Ok(BatchEvent {
            version: row.version,
            batch: Batch::try_from(row.snapshot)?,
        })
    }
}

/// A row of the change feed: an event, its position, the status of the version
/// before it (when still in the log), and the compaction watermark.
#[derive(Debug, FromRow)]
pub(super) struct FeedRow {
    transaction: i64,
    position: i64,
    version: i64,
    /// The event logs the batch's deletion.
    deleted: bool,
    /// `None` where a read of status moves passed over a change that moved none.
    snapshot: Option<sqlx::types::Json<StoredBatchV1>>,
    previous_status: Option<String>,
    compacted_transaction: i64,
    compacted_position: i64,
    /// The horizon of the statement that read the row, where it reads its own.
    #[sqlx(default)]
    horizon: Option<i64>,
    /// With `horizon`: when the first event above it was written.
    #[sqlx(default)]
    held_back_since: Option<i64>,
}

impl FeedRow {
    /// The horizon the row was read below, and when the first event above it was
    /// written, if the statement read its own horizon.
    pub(super) fn own_horizon(&self) -> Option<(i64, Option<i64>)> {
        Some((self.horizon?, self.held_back_since))
    }

    fn compacted_through(&self) -> FeedCursor {
        FeedCursor {
            transaction: self.compacted_transaction,
            position: self.compacted_position,
        }
    }
}

/// A listed batch and the feed position of the version listed.
#[derive(Debug, FromRow)]
pub(super) struct PositionedRow {
    transaction: i64,
    position: i64,
    #[sqlx(flatten)]
    batch: StoredBatchV1,
}

/// The page of `rows` read below `horizon` (everything after `after` up to it, or
/// `limit` of it).
fn feed_page(
    rows: Vec<FeedRow>,
    after: FeedCursor,
    horizon: FeedCursor,
    held_back_since: Option<i64>,
    limit: i64,
) -> Result<FeedPage> {
    let read = rows.len();
    let full = read as i64 >= limit;
    // A full page continues after its last row, whether or not that row carried its
    // batch.
    let last_read = rows.last().map(|row| FeedCursor {
        transaction: row.transaction,
        position: row.position,
    });
    let mut changes = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(snapshot) = row.snapshot else {
            continue;
        };
        let previous_status = row
            .previous_status
            .map(|name| {
                BatchStatus::from_name(&name)
                    .ok_or_else(|| Error::Internal(format!("event log: `{name}` is not a status")))
            })
            .transpose()?;
        let event = BatchEvent::try_from(EventRow {
            version: row.version,
            snapshot: snapshot.0,
        })?;
        changes.push(FeedChange {
            cursor: FeedCursor {
                transaction: row.transaction,
                position: row.position,
            },
            batch: event.batch,
            previous_status,
            deleted: row.deleted,
        });
    }
    let next = match last_read {
        Some(last) if full => last,
        _ => horizon.max(after),
    };
    Ok(FeedPage {
        changes,
        next,
        read,
        held_back_since,
    })
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
