//! Persistence: SQLite (embedded default) and PostgreSQL (replicated deployments)
//! behind narrow traits, one per kind of caller: [`BatchStore`], [`EventLog`] (the
//! read-only history the watchers and the webhook dispatcher follow), [`KeyStore`],
//! [`WebhookStore`], [`Maintenance`] and [`Lifecycle`]; [`Store`] is all of them.
//! [`connect`] picks the backend by URL scheme and wraps it in [`WithinDeadline`], so
//! that every call ends within [`StoreOptions::call_deadline`], whatever the database
//! does; the deadline is applied where each trait is declared (`deadline.rs`).
//!
//! The store knows rows and transactions, not rules: the state machine lives in the
//! domain, and the service is the only writer of batches and keys. Other replicas'
//! commits are heard through the store's [`ChangeNotifier`]. Every query both backends
//! share is written once, in [`sql`]; each backend says only what differs;
//! [`stored_batch`] is the one mapping of a batch to its columns and to its event-log
//! snapshots. The point reads, the commits, creates and the webhook deliverer's claims and
//! records keep a few connections between their statements (`held.rs`), sparing each statement sqlx's test round trip when a
//! connection goes back to its pool. In front of the store, on the service's side, reads by id are coalesced
//! ([`PointReads`]) and commits of batch changes grouped ([`GroupCommits`]);
//! [`DatabaseStatus`] is what this replica knows of the database's reachability (the
//! readiness check's last result, a connection lost in a crash or a switchover), on
//! which both hold, fail fast or try.

mod coalesce;
mod database_status;
mod deadline;
mod group_commit;
mod held;
mod postgres;
mod postgres_wakeups;
mod rounds;
mod sql;
mod sqlite;
mod stored_batch;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::domain::{ApiKey, Batch, BatchEvent, BatchFilter, BatchId, BatchStatus};
use crate::error::{Error, Result};

pub use coalesce::{MAX_WAITING_READS, PointReadOptions, PointReads};
pub use database_status::DatabaseStatus;
pub use deadline::WithinDeadline;
use deadline::store_trait;
pub use group_commit::{
    ChangeOfCurrent, CommitMany, CurrentChange, GroupCommitOptions, GroupCommits,
    MAX_WAITING_WRITES,
};
use postgres::PostgresStore;
use sqlite::SqliteStore;
pub use webhooks::{DeliveryClaim, DeliveryQueue, WebhookStore};

pub use crate::domain::FeedCursor;

/// One committed version in the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedChange {
    /// Its position in the feed.
    pub cursor: FeedCursor,
    /// The batch at this version.
    pub batch: Batch,
    /// The status at the version before, when that version is still in the log
    /// (`None` for version 1, and when compaction removed the one before).
    pub previous_status: Option<BatchStatus>,
    /// The batch was deleted: `batch` is its last version, as it was deleted.
    pub deleted: bool,
}

/// What one read of the change feed returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedPage {
    /// Committed versions after the cursor, in feed order.
    pub changes: Vec<FeedChange>,
    /// Where the next read continues: the last change's position when the page is
    /// full, else a position below every change not yet visible, so that a reader
    /// with nothing to read still moves forward.
    pub next: FeedCursor,
    /// How many changes the read passed over: those in `changes` and, for a read of
    /// status moves, those it left out. At the read's limit, more may follow at once.
    pub read: usize,
    /// When (Unix seconds) the oldest change that is committed but held back was
    /// committed: a transaction that began before it is still running (PostgreSQL).
    /// `None` when nothing committed is held back.
    pub held_back_since: Option<i64>,
}

/// The range of cursors the feed can resume from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedBounds {
    /// The oldest cursor still resumable: compaction removed changes up to it.
    pub oldest: FeedCursor,
    /// Every change visible at or below this cursor has been committed for good; no
    /// cursor the feed hands out is beyond it.
    pub head: FeedCursor,
}

store_trait! {
    /// The history of every batch, read-only: what watchers read committed versions
    /// from.
    pub trait EventLog {
        /// Up to `limit` committed versions of a batch after `after_version`, oldest first.
        async fn events_after(
            &self,
            id: &BatchId,
            after_version: i64,
            limit: i64,
        ) -> Result<Vec<BatchEvent>>;

        /// The current version of each of these batches; unknown ids are left out.
        async fn latest_versions(&self, ids: &[BatchId]) -> Result<Vec<(BatchId, i64)>>;

        /// The batch with this id, whoever owns it.
        async fn get_batch(&self, id: &BatchId) -> Result<Option<Batch>>;

        /// Up to `limit` (at least 1) versions of any batch, or of `owner`'s batches only
        /// (read through an index of each owner's changes, so that the read costs what the
        /// owner changed, not what every tenant did), in feed order, after `after`.
        /// Each batch's versions come in version order. Never skips one: on PostgreSQL,
        /// where the order is the writing transactions' ids rather than their commits, the
        /// versions of every transaction still running are held back, with everything
        /// after them, until it has ended; SQLite's order is commit order. Fails with
        /// [`Error::FeedCompacted`] when compaction removed changes after `after`.
        async fn changes_after(
            &self,
            after: FeedCursor,
            owner: Option<&str>,
            limit: i64,
        ) -> Result<FeedPage>;

        /// The same read as [`changes_after`](EventLog::changes_after) over every owner, but
        /// the page holds only the changes that moved a batch's status (from the version
        /// before, when that is still in the log) or created it. `next`, and whether the
        /// page was full, count every change read: a reader that needs only status moves
        /// (the webhook dispatcher) reads past the others without their snapshots.
        async fn status_moves_after(&self, after: FeedCursor, limit: i64) -> Result<FeedPage>;

        /// The cursors the feed can resume from now.
        async fn feed_bounds(&self) -> Result<FeedBounds>;

        /// A page of the batches matching `query` (whose `after` and order page through
        /// them), each with the feed position of the version read: the listing part of a
        /// collection watch.
        async fn batches_with_positions(
            &self,
            query: BatchPageQuery<'_>,
        ) -> Result<Vec<(FeedCursor, Batch)>>;
    }
}

/// Cross-replica wake-ups: a commit on one replica wakes the watchers of that batch on
/// the others. A store whose database several processes share provides one.
#[async_trait]
pub trait ChangeNotifier: Send + Sync + 'static {
    /// Tells the other replicas that this one committed batch `id` at `committed_at_ms`
    /// (wall clock). Never waits: announcements are sent in the background.
    fn announce(&self, id: &BatchId, committed_at_ms: i64);

    /// Sends this replica's announcements and passes the other replicas' to `listener`,
    /// until `stopping`.
    async fn run(
        self: Arc<Self>,
        listener: Arc<dyn CommitListener>,
        stopping: tokio::sync::watch::Receiver<bool>,
    );
}

/// What a [`ChangeNotifier`] wakes when other replicas commit.
pub trait CommitListener: Send + Sync {
    /// Batch `id` was committed elsewhere at `committed_at_ms` (wall clock).
    fn committed_elsewhere(&self, id: &BatchId, committed_at_ms: i64);

    /// Announcements may have been lost (the connection that hears them was replaced):
    /// everything watched should be re-read.
    fn announcements_lost(&self);
}

/// A page request against the store, already validated and scoped to the caller.
#[derive(Debug, Clone, Copy)]
pub struct BatchPageQuery<'a> {
    /// Only this owner's batches; `None` for every owner.
    pub owner: Option<&'a str>,
    /// Only batches after this one (which must exist) in the page's order.
    pub after: Option<&'a BatchId>,
    /// Only batches in one of these statuses; empty for any.
    pub statuses: &'a [BatchStatus],
    /// Only batches of this job.
    pub job_id: Option<&'a str>,
    /// Only batches created at or after this Unix second.
    pub created_after: Option<i64>,
    /// Only batches created before this Unix second.
    pub created_before: Option<i64>,
    /// Only batches whose metadata has every one of these pairs.
    pub metadata: &'a [(String, String)],
    /// Only batches marked stalled now (`true`), or only the others (`false`).
    pub stalled: Option<bool>,
    /// Oldest first instead of newest first.
    pub oldest_first: bool,
    /// At most this many rows.
    pub limit: i64,
}

/// A create that carries an idempotency key: the key claimed for the new batch.
#[derive(Debug, Clone, Copy)]
pub struct IdempotencyClaim<'a> {
    /// The owner the key is scoped to.
    pub user_id: &'a str,
    /// The client's key.
    pub key: &'a str,
    /// The fingerprint of the request.
    pub request_sha256: &'a [u8; 32],
    /// When the claim is made, Unix seconds.
    pub at: i64,
    /// A claim made before this (Unix seconds) has expired and is replaced.
    pub expired_before: i64,
}

/// The claim an earlier request holds on an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlierClaim {
    /// The batch it created.
    pub batch_id: String,
    /// The fingerprint of that request.
    pub request_sha256: Vec<u8>,
}

store_trait! {
    /// Batches: created, read by id, listed, counted, and changed by compare-and-set (the
    /// service and its grouped commits and coalesced reads).
    pub trait BatchStore {
        /// Inserts a new batch (version 1) and its first event, atomically. With
        /// `active_limit`, only if its owner has fewer active (not terminal) batches than
        /// that, decided in the same transaction and exact across replicas: else
        /// [`Error::ActiveBatchLimit`], writing nothing.
        async fn insert_batch(&self, batch: &Batch, active_limit: Option<u32>) -> Result<()>;

    /// Like [`BatchStore::insert_batch`], but only if the idempotency key of `claim` is free
        /// (or its claim expired), claiming it for `batch` in the same transaction.
        /// Returns the earlier, live claim instead, writing nothing, when there is one
        /// (whatever the quota: a repeated create is not a new batch).
        async fn insert_batch_once(
            &self,
            batch: &Batch,
            claim: IdempotencyClaim<'_>,
            active_limit: Option<u32>,
        ) -> Result<Option<EarlierClaim>>;

    /// Deletes the batch with this id if it is terminal, with what belongs to it (its
        /// metadata index rows, its idempotency key, its webhook deliveries not yet
        /// sent), and logs the deletion for the change feed, atomically, at `at` (Unix
        /// seconds). `false` when there was no such terminal batch (it is not terminal,
        /// or already gone).
        async fn delete_batch(&self, id: &BatchId, at: i64) -> Result<bool>;

    /// [`BatchStore::delete_batch`] of up to `limit` batches that became terminal
        /// before `terminal_before` (Unix seconds), in one short transaction; returns
        /// their ids. Replicas sweeping together skip the batches another one is
        /// deleting (PostgreSQL), so no batch is deleted twice.
        async fn delete_terminal_batches(
            &self,
            terminal_before: i64,
            at: i64,
            limit: i64,
        ) -> Result<Vec<BatchId>>;

    /// The batches with these ids, in no particular order; unknown ids are left out.
        async fn get_batches(&self, ids: &[BatchId]) -> Result<Vec<Batch>>;

    /// Batches matching `query`, in the order they were stored (`seq`): last stored
        /// first, or first stored first with `oldest_first`. That is creation order as long
        /// as the replicas' clocks agree; a cursor is exact either way.
        async fn list_batches(&self, query: BatchPageQuery<'_>) -> Result<Vec<Batch>>;

    /// How many batches match `filter`, per status; statuses without any are left out.
        async fn count_batches(&self, filter: &BatchFilter) -> Result<Vec<(BatchStatus, i64)>>;

    /// Replaces the batch by `next`, whose version must be one more than the stored
        /// one, and appends `next` to the event log, atomically. Returns `false`, writing
        /// nothing, when the stored version is no longer `next.version - 1` (another writer
        /// got there first). Every column is written: `next` must come from the stored
        /// batch through the domain, so that what is fixed at creation (the owner, the
        /// metadata, whose index is written only on insert) is as stored.
        async fn commit_change(&self, next: &Batch) -> Result<bool>;

    /// [`BatchStore::commit_change`] of each of `nexts` (distinct batches) in one commit:
        /// `true` at each index whose change was written. Each change is a compare-and-set
        /// of its own: a version race fails that one alone.
        async fn commit_changes(&self, nexts: &[Arc<Batch>]) -> Result<Vec<bool>>;

    /// Up to `limit` batches whose lifecycle timer is due: running (validating,
        /// in_progress, finalizing) with `expires_at <= now`, or cancelling since
        /// `cancelling_before` or earlier. In the order they were stored, which is not
        /// necessarily the most overdue first.
        async fn due_batches(&self, now: i64, cancelling_before: i64, limit: i64)
        -> Result<Vec<Batch>>;

    /// Brings up to `limit` batches, not final and not marked stalled, whose stored
        /// quiet mark is at or before `changed_after` although they changed after it, up
        /// to date (writes leave the mark behind, to keep PostgreSQL's updates HOT; no
        /// version, no event); returns how many. The stall sweep calls it until fewer
        /// come back, so that only quiet batches stay behind the cutoff.
        async fn catch_up_quiet_since(&self, changed_after: i64, limit: i64) -> Result<u64>;

    /// Marks stalled (`Batch::mark_stalled` at `now`) up to `limit` batches, not final
        /// and not marked yet, that have not changed for `stall_after` seconds, each as a
        /// committed change with its event, in one short transaction; returns the
        /// versions written. Replicas sweeping together skip the batches another one is
        /// marking (PostgreSQL), so no batch is marked twice.
        async fn mark_stalled_batches(&self, now: i64, stall_after: i64, limit: i64)
        -> Result<Vec<Batch>>;
    }
}

store_trait! {
    /// API keys, the server's own shared keys, and the expiry of idempotency keys.
    pub trait KeyStore {
        /// Stores a new API key by the digest of its secret.
        async fn insert_api_key(&self, key: &ApiKey, secret_digest: &[u8; 32]) -> Result<()>;

    /// Stores `key` only if there is no API key at all yet; `true` if it was stored.
        /// Two replicas starting together on an empty database store exactly one.
        async fn insert_first_api_key(&self, key: &ApiKey, secret_digest: &[u8; 32]) -> Result<bool>;

    /// The key whose secret has this digest, revoked or not.
        async fn api_key_by_digest(&self, secret_digest: &[u8; 32]) -> Result<Option<ApiKey>>;

    /// Every API key, oldest first.
        async fn list_api_keys(&self) -> Result<Vec<ApiKey>>;

    /// Marks the key revoked at `at` and, in the same transaction, disables the
        /// all-owners webhook endpoints it configured (reason `key revoked`); `false` if
        /// there is no such key. Revoking a revoked key keeps its first revocation time.
        async fn revoke_api_key(&self, id: &str, at: i64) -> Result<bool>;

    /// Which of the keys with these ids are revoked; unknown ids are left out.
        async fn revoked_api_keys(&self, ids: &[String]) -> Result<Vec<String>>;

    /// The server's own key named `name`, which every replica shares: `candidate` is
        /// stored and returned if there is none yet, else the stored one (whichever
        /// replica stored first).
        async fn server_key(&self, name: &str, candidate: &str) -> Result<String>;

    /// Deletes at most `limit` idempotency keys claimed before `before_at`; returns
        /// how many.
        async fn forget_idempotency_keys(&self, before_at: i64, limit: i64) -> Result<u64>;
    }
}

store_trait! {
    /// What the background work and the health checks ask of the database.
    pub trait Maintenance {
        /// Succeeds when the database answers a trivial query.
        async fn ping(&self) -> Result<()>;

    /// Deletes at most `limit` of the events committed before `before_at`, never the
        /// latest version of a batch, and raises the feed's oldest resumable cursor past
        /// them in the same transaction. Returns how many were deleted. Callers delete in
        /// chunks, each its own short transaction, so that writers (SQLite has one write
        /// lock) never wait behind a whole compaction.
        async fn compact_events(&self, before_at: i64, limit: i64) -> Result<u64>;
    }
}

/// Opening, closing and watching the store: the calls without a deadline (they run
/// at start and stop, or do not wait).
#[async_trait]
pub trait Lifecycle: Send + Sync + 'static {
    /// Applies pending migrations. Safe when several replicas start at once.
    async fn migrate(&self) -> Result<()>;

    /// How this replica's commits reach the watchers of other replicas: PostgreSQL's
    /// LISTEN/NOTIFY; `None` for SQLite, whose database one process owns.
    fn notifier(&self) -> Option<Arc<dyn ChangeNotifier>>;

    /// Connections of the pool: (open, idle).
    fn pool_usage(&self) -> (u32, u32);

    /// What this replica knows about the database's reachability: the pool and the
    /// LISTEN connection record lost connections in it, the readiness check what it
    /// finds, and the request paths act on it.
    fn database_status(&self) -> DatabaseStatus;

    /// Closes the connection pool, waiting for connections in use to be returned.
    async fn close(&self);
}

/// Where batches, their history, API keys and webhooks are kept: every seam of the
/// store, for the parts given the whole of it (the app, and the two services: batches
/// and keys, and webhook endpoints, which also read the feed's head and revocations).
/// Other callers take the seams they use: the hub and the dispatcher the
/// [`EventLog`], the dispatcher and the deliverer the [`WebhookStore`], the health
/// checks [`Maintenance`], coalesced reads and grouped commits the [`BatchStore`].
pub trait Store: BatchStore + EventLog + KeyStore + WebhookStore + Maintenance + Lifecycle {}

impl<T> Store for T where
    T: BatchStore + EventLog + KeyStore + WebhookStore + Maintenance + Lifecycle + ?Sized
{
}

/// Connection settings shared by both backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Most open database connections.
    pub max_connections: u32,

    /// How long a request waits for a database connection before failing with
    /// UNAVAILABLE.
    // Also the deadline of each whole database call and PostgreSQL's
    // `statement_timeout`: see `call_deadline`.
    pub acquire_timeout: Duration,
}

impl StoreOptions {
    /// How long one database call may take in all: the wait for a connection and the
    /// statement together. A database that does not answer fails the call within it.
    pub fn call_deadline(&self) -> Duration {
        self.acquire_timeout
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// The database of `serve` and the one-shot commands when none is named.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://batchd.db";

/// Opens the store named by `url`: `sqlite://path` (created if missing) or
/// `postgres://...`, every call of which ends within the acquire timeout (see
/// [`WithinDeadline`]). Does not migrate; call [`Lifecycle::migrate`].
pub async fn connect(url: &str, options: &StoreOptions) -> Result<Arc<dyn Store>> {
    let scheme = url.split(':').next().unwrap_or_default();
    let deadline = options.call_deadline();
    let store: Arc<dyn Store> = match scheme {
        "sqlite" => Arc::new(WithinDeadline::new(
            SqliteStore::connect(url, options).await?,
            deadline,
        )),
        "postgres" | "postgresql" => Arc::new(WithinDeadline::new(
            PostgresStore::connect(url, options).await?,
            deadline,
        )),
        _ => {
            return Err(Error::invalid(
                "database_url",
                format!(
                    "unsupported scheme `{scheme}`; use sqlite://PATH or postgres://USER@HOST/DB"
                ),
            ));
        }
    };
    Ok(store)
}

/// Hides credentials when a URL is logged.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl From<sqlx::Error> for Error {
    /// Connection trouble becomes `Unavailable` (retryable); anything else is a bug or
    /// corrupt data and becomes `Internal`. The detail is only logged.
    fn from(error: sqlx::Error) -> Error {
        let unavailable = match &error {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::BeginFailed => true,
            sqlx::Error::Database(db)
                if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() =>
            {
                // SQLite reports extended result codes, whose low byte is the primary
                // code: SQLITE_BUSY (5) and SQLITE_LOCKED (6) with every variant of
                // theirs (BUSY_RECOVERY 261, BUSY_SNAPSHOT 517, BUSY_TIMEOUT 773,
                // LOCKED_SHAREDCACHE 262, ...): another writer held on past
                // busy_timeout.
                db.code()
                    .and_then(|code| code.parse::<i32>().ok())
                    .is_some_and(|code| matches!(code & 0xff, 5 | 6))
            }
            sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                // PostgreSQL: connection exceptions (08xxx), shutdown or restart in
                // progress (57P0x), the database was dropped (3D000), too many
                // connections and other resource shortages (53xxx), a database that
                // does not accept connections (55000), a statement cancelled by
                // statement_timeout or an admin (57014).
                code.starts_with("08")
                    || code.starts_with("57P0")
                    || code.starts_with("53")
                    || code == "3D000"
                    || code == "55000"
                    || code == "57014"
            }),
            _ => false,
        };
        let kind = if unavailable {
            "unavailable"
        } else {
            "internal"
        };
        metrics::counter!("batchd_db_errors_total", "kind" => kind).increment(1);
        if unavailable {
            Error::Unavailable(error.to_string())
        } else {
            Error::Internal(error.to_string())
        }
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(error: sqlx::migrate::MigrateError) -> Error {
        match error {
            sqlx::migrate::MigrateError::Execute(inner) => inner.into(),
            other => Error::Internal(format!("migration failed: {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;
    use crate::error::Error;

    /// A real SQLITE_BUSY_SNAPSHOT (517, an extended code of SQLITE_BUSY): a read
    /// transaction that tries to write after another connection committed.
    #[tokio::test]
    async fn sqlite_extended_busy_codes_are_unavailable_not_internal() {
        use sqlx::Connection;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("busy.db").display());
        let mut reader = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let mut writer = sqlx::SqliteConnection::connect(&url).await.unwrap();
        for statement in ["PRAGMA journal_mode = WAL", "CREATE TABLE t (x INTEGER)"] {
            sqlx::query(statement).execute(&mut reader).await.unwrap();
        }
        sqlx::query("BEGIN").execute(&mut reader).await.unwrap();
        sqlx::query("SELECT count(*) FROM t")
            .fetch_one(&mut reader)
            .await
            .unwrap();
        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut writer)
            .await
            .unwrap();
        let busy = sqlx::query("INSERT INTO t VALUES (2)")
            .execute(&mut reader)
            .await
            .unwrap_err();
        let code = busy.as_database_error().and_then(|e| e.code());
        assert_eq!(code.as_deref(), Some("517"), "{busy}");
        assert!(matches!(Error::from(busy), Error::Unavailable(_)));
    }

    #[test]
    fn credentials_are_hidden_from_logs() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/batchd"),
            "postgres://***@db:5432/batchd"
        );
        assert_eq!(redact_url("sqlite://batchd.db"), "sqlite://batchd.db");
    }
}
