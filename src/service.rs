//! The batch and key use cases. Both transports call these (and, for webhook endpoints,
//! `webhooks::service`) and nothing else: each one authorizes the caller, validates the
//! input, applies the state machine and talks to the store, reading batches by id
//! through coalesced reads and committing changes through group commit. The service is
//! the only writer of batches and keys. Besides it, the store's other seams go to the
//! webhook use cases, the dispatcher and the deliverer, the health checks
//! ([`Maintenance`](crate::store::Maintenance)) and the watch hub, which sees only the
//! read-only [`EventLog`](crate::store::EventLog).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_stream::wrappers::ReceiverStream;

use crate::cache::{CacheOptions, CachedKey, Caches};
use crate::clock::Clock;
use crate::domain::{
    Action, ApiKey, ApiKeySecret, Batch, BatchFilter, BatchId, BatchPolicy, BatchStatus,
    BatchUpdate, BatchUpdateInput, Caller, CreateBatchInput, IDEMPOTENCY_WINDOW_SECONDS,
    IdempotencyKey, ListBatches, ListBatchesInput, ListOrder, NewBatch, Scope, WatchBatches,
    WatchBatchesInput, digest_of,
};
use crate::error::{Error, Result};
use crate::request_rates::{RequestBudget, RequestRateOptions, RequestRates};
use crate::store::{
    BatchPageQuery, ChangeOfCurrent, CurrentChange, EarlierClaim, GroupCommitOptions, GroupCommits,
    IdempotencyClaim, PointReadOptions, PointReads, Store, StoreOptions,
};
use crate::watch::{FeedEvent, WatchEvent, WatchHub};

/// Most bytes of batch text one page of a list carries (a page of 100 batches of up to
/// 1 MiB each would pass the 4 MiB that default gRPC clients accept).
pub const MAX_PAGE_BYTES: usize = 3 * 1024 * 1024;

/// Most events one compaction statement deletes.
pub const COMPACTION_CHUNK: i64 = 1_000;

/// The locks one replica's creates under the quota take turns on, by owner.
const QUOTA_TURNS: usize = 64;

/// Most batches one statement of the retention sweep deletes.
pub const RETENTION_CHUNK: i64 = 500;

/// Most batches one transaction of the stall sweep marks.
pub const STALL_CHUNK: i64 = 500;

/// How long compaction pauses between chunks.
const CHUNK_PAUSE: Duration = Duration::from_millis(10);

/// Runs `delete` (which deletes at most its argument of rows) until it deletes fewer
/// than a whole chunk; returns how many rows were deleted in all.
async fn in_chunks<F, Fut>(mut delete: F) -> Result<u64>
where
    F: FnMut(i64) -> Fut,
    Fut: std::future::Future<Output = Result<u64>>,
{
    let mut deleted = 0;
    loop {
        let chunk = delete(COMPACTION_CHUNK).await?;
        deleted += chunk;
        if chunk < COMPACTION_CHUNK as u64 {
            return Ok(deleted);
        }
        // A pause for the writers queued behind this chunk: SQLite's waiting writers
        // retry the lock from their busy handler on their own schedule, so yielding
        // alone would let the next chunk take it again at once.
        tokio::time::sleep(CHUNK_PAUSE).await;
    }
}

/// How often a change is retried when other writers keep committing first. Each failed
/// attempt means another writer's change went through, so the system always progresses.
const MAX_COMMIT_ATTEMPTS: usize = 64;

/// One page of a batch listing, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPage {
    /// The batches of this page.
    pub batches: Vec<Batch>,
    /// Whether older batches follow.
    pub has_more: bool,
}

impl BatchPage {
    /// The id of the first batch of the page.
    pub fn first_id(&self) -> Option<&BatchId> {
        self.batches.first().map(|b| &b.id)
    }

    /// The id of the last batch of the page: the cursor for the next one.
    pub fn last_id(&self) -> Option<&BatchId> {
        self.batches.last().map(|b| &b.id)
    }
}

/// What one sweep of the lifecycle timers moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Batches moved to `expired`.
    pub expired: u64,
    /// Batches moved from `cancelling` to `cancelled`.
    pub cancelled: u64,
}

/// Extracts the key from an `Authorization: Bearer <key>` header value.
pub fn bearer_token(authorization: &str) -> Result<&str> {
    match authorization.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(Error::Unauthenticated(
            "malformed authorization: expected `Bearer <API key>`",
        )),
    }
}

/// A stream of watch events; an `Err` item ends it with that error.
pub type WatchStream = ReceiverStream<Result<WatchEvent>>;

/// A stream of change feed events; an `Err` item ends it with that error.
pub type FeedStream = ReceiverStream<Result<FeedEvent>>;

/// How the service behaves, beyond its store, hub and clock.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// What new batches may ask for.
    pub policy: BatchPolicy,
    /// In-memory caches.
    pub caches: CacheOptions,
    /// How reads of batches by id are coalesced and bounded (see [`PointReads`]).
    pub point_reads: PointReadOptions,
    /// How commits of batch changes are grouped and bounded (see [`GroupCommits`]).
    pub commits: GroupCommitOptions,
    /// Most API key lookups in the database at once, in each of two lanes (keys seen
    /// valid before, and all others): made-up keys, which anyone can send, never take
    /// more than these connections.
    pub key_lookups: usize,
    /// Most active (not terminal) batches per owner; 0 for no limit.
    pub max_active_batches_per_owner: u32,
    /// Each API key's request rate on this replica; `None` for no limit.
    pub request_rates: Option<RequestRateOptions>,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            policy: BatchPolicy::default(),
            caches: CacheOptions::default(),
            point_reads: PointReadOptions::default(),
            commits: GroupCommitOptions::default(),
            key_lookups: key_lookups_for(StoreOptions::default().max_connections),
            max_active_batches_per_owner: 0,
            request_rates: None,
        }
    }
}

/// The share of a pool of `max_connections` that each lane of API key lookups may use
/// at once: a quarter, so the two lanes together leave half the pool to requests.
pub fn key_lookups_for(max_connections: u32) -> usize {
    (max_connections as usize / 4).max(1)
}

/// The batch use cases over a store and a clock.
pub struct BatchService {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    policy: BatchPolicy,
    hub: Arc<WatchHub>,
    caches: Caches,
    reads: Arc<PointReads>,
    commits: Arc<GroupCommits>,
    /// Lookups of keys seen valid before, and of all other keys (see `look_up_api_key`).
    known_key_lookups: Semaphore,
    unknown_key_lookups: Semaphore,
    /// How long an API key lookup may take in all, its turn included.
    key_lookup_wait: Duration,
    /// See [`ServiceOptions::max_active_batches_per_owner`]; `None` for no limit.
    active_limit: Option<u32>,
    /// Under the quota, one owner's creates take turns here (owners hashed onto
    /// [`QUOTA_TURNS`] locks) before they take a database connection: on PostgreSQL
    /// they would otherwise each hold one while they wait for the owner's lock, and
    /// one tenant's burst of creates could take the pool from everyone.
    quota_turns: Vec<tokio::sync::Mutex<()>>,
    request_rates: Option<RequestRates>,
}

/// An authenticated request: its caller, and what the caller's key may still send
/// when request rates are limited.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// Who is calling.
    pub caller: Caller,
    /// The key's budget after this request; `None` when rates are not limited.
    pub budget: Option<RequestBudget>,
}

/// Why a request was not admitted, with the key's budget when it was its rate.
#[derive(Debug, Clone)]
pub struct Refused {
    /// The error to answer with.
    pub error: Error,
    /// Set when the key's rate refused the request.
    pub budget: Option<RequestBudget>,
}

impl From<Error> for Refused {
    fn from(error: Error) -> Refused {
        Refused {
            error,
            budget: None,
        }
    }
}

/// API keys asked about per revocation query, to keep its parameter list bounded.
const REVOCATION_PAGE: usize = 500;

impl BatchService {
    /// A service over `store`, telling `hub` of every commit, stamping changes with
    /// `clock`.
    pub fn new(
        store: Arc<dyn Store>,
        hub: Arc<WatchHub>,
        clock: Arc<dyn Clock>,
        options: ServiceOptions,
    ) -> Self {
        BatchService {
            hub,
            caches: Caches::new(&options.caches),
            known_key_lookups: Semaphore::new(options.key_lookups.max(1)),
            unknown_key_lookups: Semaphore::new(options.key_lookups.max(1)),
            key_lookup_wait: options.point_reads.max_wait,
            reads: PointReads::new(store.clone(), options.point_reads),
            commits: GroupCommits::new(store.clone(), options.commits),
            store,
            clock,
            policy: options.policy,
            active_limit: (options.max_active_batches_per_owner > 0)
                .then_some(options.max_active_batches_per_owner),
            quota_turns: (0..QUOTA_TURNS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            request_rates: options.request_rates.map(RequestRates::new),
        }
    }

    /// What new batches may ask for.
    pub fn policy(&self) -> &BatchPolicy {
        &self.policy
    }

    /// Admits a request: resolves its API key (the bearer token, if one was sent) to
    /// its caller, then takes a token from the key's request rate, if rates are
    /// limited. Unknown keys are refused before they reach a bucket.
    pub async fn admit(&self, token: Option<&str>) -> Result<Admitted, Refused> {
        let caller = self.authenticate(token).await?;
        let Some(rates) = &self.request_rates else {
            return Ok(Admitted {
                caller,
                budget: None,
            });
        };
        match rates.admit(&caller.key_id) {
            Ok(budget) => Ok(Admitted {
                caller,
                budget: Some(budget),
            }),
            Err(error) => Err(Refused {
                error,
                budget: Some(rates.exhausted()),
            }),
        }
    }

    /// Drops the request-rate buckets of keys that went idle; returns how many keys
    /// are tracked. The period to call it at, `None` when rates are not limited.
    pub fn forget_idle_request_rates(&self) -> usize {
        self.request_rates
            .as_ref()
            .map_or(0, RequestRates::forget_idle)
    }

    /// How often [`BatchService::forget_idle_request_rates`] is worth calling; `None`
    /// when rates are not limited.
    pub fn request_rate_sweep_period(&self) -> Option<Duration> {
        self.request_rates
            .as_ref()
            .map(RequestRates::idle_sweep_period)
    }

    /// Resolves an API key (the bearer token, if one was sent) to its caller.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn authenticate(&self, token: Option<&str>) -> Result<Caller> {
        let token = token.ok_or(Error::Unauthenticated(
            "missing API key: send `authorization: Bearer <API key>`",
        ))?;
        let digest = digest_of(token);
        let caller = match self.caches.api_key(&digest) {
            CachedKey::Valid(caller) => Some(caller),
            CachedKey::Invalid => None,
            CachedKey::NotCached => self.look_up_api_key(digest).await?,
        };
        caller.ok_or(Error::Unauthenticated("invalid API key"))
    }

    /// Looks a key up in the database, within one deadline for the wait and the query
    /// together. Keys this replica has seen valid (their entry only went stale) and
    /// keys it has not seen take turns in separate lanes of `key_lookups` each, so a
    /// flood of made-up keys, which anyone can send, neither takes the rest of the pool
    /// nor holds up the renewal of valid keys.
    async fn look_up_api_key(&self, digest: [u8; 32]) -> Result<Option<Caller>> {
        if self.reads.database_known_down() {
            return Err(Error::Unavailable(
                "the database is down; cannot check the API key".into(),
            ));
        }
        let lane = if self.caches.was_valid(&digest) {
            &self.known_key_lookups
        } else {
            &self.unknown_key_lookups
        };
        let lookup = async {
            let _turn = lane
                .acquire()
                .await
                .map_err(|_| Error::Internal("the key lookup semaphore was closed".into()))?;
            // Another caller with the same key may have looked it up meanwhile.
            match self.caches.api_key(&digest) {
                CachedKey::Valid(caller) => return Ok(Some(caller)),
                CachedKey::Invalid => return Ok(None),
                CachedKey::NotCached => {}
            }
            let caller = self
                .store
                .api_key_by_digest(&digest)
                .await?
                .filter(|key| key.revoked_at.is_none())
                .map(|key| Caller::of(&key));
            self.caches.remember_api_key(digest, caller.clone());
            Ok(caller)
        };
        tokio::time::timeout(self.key_lookup_wait, lookup)
            .await
            .map_err(|_| Error::Unavailable("no answer to the API key lookup in time".into()))?
    }

    /// Creates a batch in `validating`, owned by the caller.
    #[tracing::instrument(level = "debug", skip_all, fields(batch_id = tracing::field::Empty, user_id = %caller.user_id))]
    pub async fn create_batch(&self, caller: &Caller, input: CreateBatchInput) -> Result<Batch> {
        caller.authorize(Action::CreateBatch)?;
        let mut new = NewBatch::parse(input, &self.policy)?;
        let idempotency_key = new.idempotency_key.take();
        let fingerprint = new.fingerprint();
        let now = self.clock.now();
        let batch = Batch::create(new, caller, now);
        tracing::Span::current().record("batch_id", tracing::field::display(&batch.id));
        let _turn = self.quota_turn(&caller.user_id).await?;
        match &idempotency_key {
            None => self.store.insert_batch(&batch, self.active_limit).await?,
            Some(key) => {
                let claim = IdempotencyClaim {
                    user_id: &caller.user_id,
                    key: key.as_str(),
                    request_sha256: &fingerprint,
                    at: now,
                    expired_before: now.saturating_sub(IDEMPOTENCY_WINDOW_SECONDS),
                };
                if let Some(earlier) = self
                    .store
                    .insert_batch_once(&batch, claim, self.active_limit)
                    .await?
                {
                    return self
                        .repeated_create(caller, key, &fingerprint, earlier)
                        .await;
                }
            }
        }
        let created = Arc::new(batch.clone());
        self.hub.committed(&created, None);
        self.caches.remember(created);
        tracing::info!(batch_id = %batch.id, user_id = %batch.user_id, "batch created");
        Ok(batch)
    }

    /// This owner's turn to create under the quota (none without a quota), within the
    /// time a database call may take.
    async fn quota_turn(&self, owner: &str) -> Result<Option<tokio::sync::MutexGuard<'_, ()>>> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        if self.active_limit.is_none() {
            return Ok(None);
        }
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(owner);
        let turns = &self.quota_turns[hash as usize % self.quota_turns.len()];
        tokio::time::timeout(self.key_lookup_wait, turns.lock())
            .await
            .map(Some)
            .map_err(|_| Error::overloaded("this owner's creates are waiting for their turn"))
    }

    /// A create whose idempotency key an earlier request holds: the same request gets
    /// the batch the earlier one created (as it is now); a different one is refused.
    async fn repeated_create(
        &self,
        caller: &Caller,
        key: &IdempotencyKey,
        fingerprint: &[u8; 32],
        earlier: EarlierClaim,
    ) -> Result<Batch> {
        if earlier.request_sha256 != fingerprint {
            return Err(Error::IdempotencyKeyReused(key.as_str().to_owned()));
        }
        let id = BatchId::parse("batch_id", &earlier.batch_id)
            .map_err(|e| Error::Internal(format!("stored idempotency claim: {e}")))?;
        tracing::info!(batch_id = %id, user_id = %caller.user_id, "repeated create answered with the first one's batch");
        self.visible_batch(caller, &id).await
    }

    /// Deletes the idempotency keys older than their window, in chunks. Returns how
    /// many were deleted.
    pub async fn forget_expired_idempotency_keys(&self) -> Result<u64> {
        let before_at = self.clock.now().saturating_sub(IDEMPOTENCY_WINDOW_SECONDS);
        in_chunks(|limit| self.store.forget_idempotency_keys(before_at, limit)).await
    }

    /// One batch the caller can see.
    #[tracing::instrument(level = "debug", skip_all, fields(batch_id = %batch_id, user_id = %caller.user_id))]
    pub async fn get_batch(&self, caller: &Caller, batch_id: &str) -> Result<Batch> {
        caller.authorize(Action::ReadBatches)?;
        let id = BatchId::parse("batch_id", batch_id)?;
        self.visible_batch(caller, &id).await
    }

    /// A page of the batches the caller can see that match the filters, newest first
    /// unless asked otherwise.
    #[tracing::instrument(level = "debug", skip_all, fields(user_id = %caller.user_id))]
    pub async fn list_batches(
        &self,
        caller: &Caller,
        input: ListBatchesInput,
    ) -> Result<BatchPage> {
        caller.authorize(Action::ReadBatches)?;
        let list = ListBatches::parse(input)?;
        if let Some(after) = &list.after {
            // An unknown cursor would silently yield an empty page: NOT_FOUND instead,
            // the same for another tenant's batch as for one that does not exist.
            self.visible_batch(caller, after).await?;
        }
        let mut batches = self
            .store
            .list_batches(BatchPageQuery {
                owner: caller.owner_filter(),
                after: list.after.as_ref(),
                statuses: &list.statuses,
                job_id: list.job_id.as_deref(),
                created_after: list.created_after,
                created_before: list.created_before,
                metadata: &list.metadata,
                stalled: list.stalled,
                oldest_first: list.order == ListOrder::OldestFirst,
                // One more than asked tells whether another page follows.
                limit: list.limit + 1,
            })
            .await?;
        let mut has_more = batches.len() as i64 > list.limit;
        batches.truncate(list.limit as usize);
        // A page stays readable by a default gRPC client (4 MiB): it ends early, with
        // `has_more`, rather than carry more text than MAX_PAGE_BYTES. The first batch
        // always fits, since one batch holds at most MAX_BATCH_BYTES.
        let mut bytes = 0;
        if let Some(full) = batches.iter().position(|batch| {
            bytes += batch.text_bytes();
            bytes > MAX_PAGE_BYTES
        }) {
            batches.truncate(full.max(1));
            has_more = true;
        }
        Ok(BatchPage { batches, has_more })
    }

    /// Requests cancellation of a batch the caller can see. Idempotent.
    #[tracing::instrument(level = "debug", skip_all, fields(batch_id = %batch_id, user_id = %caller.user_id))]
    pub async fn cancel_batch(&self, caller: &Caller, batch_id: &str) -> Result<Batch> {
        caller.authorize(Action::CancelBatch)?;
        let id = BatchId::parse("batch_id", batch_id)?;
        let batch = self
            .change_batch(caller, &id, None, |batch, now| batch.cancel(now))
            .await?;
        tracing::info!(batch_id = %id, status = %batch.status, "batch cancel requested");
        Ok(batch)
    }

    /// Deletes a terminal batch the caller can see, with everything that belongs to it.
    /// Another tenant's batch, an unknown one and one already deleted are NOT_FOUND,
    /// exactly as a read; a batch still running is refused, naming its status.
    #[tracing::instrument(level = "debug", skip_all, fields(batch_id = %batch_id, user_id = %caller.user_id))]
    pub async fn delete_batch(&self, caller: &Caller, batch_id: &str) -> Result<BatchId> {
        caller.authorize(Action::DeleteBatch)?;
        let id = BatchId::parse("batch_id", batch_id)?;
        let batch = self.visible_batch(caller, &id).await?;
        if !batch.status.is_terminal() {
            return Err(Error::FailedPrecondition(format!(
                "batch `{id}` is {}; only a completed, failed, expired or cancelled batch can be deleted (cancel it first)",
                batch.status
            )));
        }
        // Terminal batches never change, so only a deletion can have come between.
        if !self.store.delete_batch(&id, self.clock.now()).await? {
            self.caches.forget_batch(&id);
            return Err(Error::BatchNotFound(id.to_string()));
        }
        self.deleted(&id, DeletionReason::Request);
        tracing::info!(batch_id = %id, user_id = %caller.user_id, "batch deleted");
        Ok(id)
    }

    /// Deletes every batch that has been terminal for longer than `retention`, in
    /// chunks of [`RETENTION_CHUNK`], each its own short transaction, with a pause
    /// between chunks. Returns how many were deleted.
    pub async fn delete_expired_terminal_batches(&self, retention: Duration) -> Result<u64> {
        let retention = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
        let mut deleted = 0;
        loop {
            let now = self.clock.now();
            let gone = self
                .store
                .delete_terminal_batches(now.saturating_sub(retention), now, RETENTION_CHUNK)
                .await?;
            for id in &gone {
                self.deleted(id, DeletionReason::Retention);
            }
            deleted += gone.len() as u64;
            if (gone.len() as i64) < RETENTION_CHUNK {
                if deleted > 0 {
                    tracing::info!(deleted, "deleted batches past their retention");
                }
                return Ok(deleted);
            }
            tokio::time::sleep(CHUNK_PAUSE).await;
        }
    }

    /// Brings the store's quiet marks of the batches that changed since up to date
    /// ([`crate::store::BatchStore::catch_up_quiet_since`]), then marks stalled every
    /// batch, not final and not marked yet, that has not changed for `stall_after`, each
    /// as a new version (so its watchers, the change feed and the webhooks hear of it),
    /// in chunks of [`STALL_CHUNK`], each its own short transaction; then sets the gauge
    /// of stalled batches. Replicas sweeping together
    /// skip each other's chunks (PostgreSQL), so each stall is marked once.
    pub async fn mark_stalled_batches(&self, stall_after: Duration) -> Result<u64> {
        let stall_after = i64::try_from(stall_after.as_secs()).unwrap_or(i64::MAX);
        // First the batches that changed since their quiet mark fell behind the cutoff
        // (writes leave it behind), so that only quiet ones stay behind it.
        loop {
            let cutoff = self.clock.now().saturating_sub(stall_after);
            let moved = self.store.catch_up_quiet_since(cutoff, STALL_CHUNK).await?;
            if (moved as i64) < STALL_CHUNK {
                break;
            }
            tokio::time::sleep(CHUNK_PAUSE).await;
        }
        let mut marked = 0;
        loop {
            let now = self.clock.now();
            let chunk = self
                .store
                .mark_stalled_batches(now, stall_after, STALL_CHUNK)
                .await?;
            for batch in &chunk {
                tracing::info!(batch_id = %batch.id, status = %batch.status, version = batch.version, "batch stalled");
                metrics::counter!("batchd_batches_stalled_total", "status" => batch.status.as_str())
                    .increment(1);
            }
            for batch in chunk.iter().cloned().map(Arc::new) {
                self.hub.committed(&batch, Some(batch.status));
                self.caches.remember(batch);
            }
            marked += chunk.len() as u64;
            if (chunk.len() as i64) < STALL_CHUNK {
                break;
            }
            tokio::time::sleep(CHUNK_PAUSE).await;
        }
        self.measure_stalled_batches().await?;
        Ok(marked)
    }

    /// Sets `batchd_stalled_batches{status}` to the stalled batches of every replica,
    /// through the partial index of stalled batches.
    async fn measure_stalled_batches(&self) -> Result<()> {
        let counts = self
            .store
            .count_batches(&BatchFilter {
                stalled: Some(true),
                ..Default::default()
            })
            .await?;
        for status in BatchStatus::STALLABLE {
            let count = counts
                .iter()
                .find(|(counted, _)| *counted == status)
                .map_or(0, |(_, count)| *count);
            metrics::gauge!("batchd_stalled_batches", "status" => status.as_str())
                .set(count as f64);
        }
        Ok(())
    }

    /// What follows a committed deletion on this replica: the caches forget the batch,
    /// the change feed and the other replicas hear of it.
    fn deleted(&self, id: &BatchId, reason: DeletionReason) {
        self.caches.forget_batch(id);
        self.hub.deleted(id);
        metrics::counter!("batchd_batches_deleted_total", "reason" => reason.as_str()).increment(1);
    }

    /// Another replica committed a change of batch `id`, or deleted it: what this one
    /// remembers of it may be stale.
    pub fn committed_elsewhere(&self, id: &BatchId) {
        self.caches.forget_batch(id);
    }

    /// Other replicas' announcements may have been lost: nothing remembered of a batch
    /// can be trusted to still exist.
    pub fn announcements_lost(&self) {
        self.caches.forget_all_batches();
    }

    /// Applies a worker's update atomically: all of it or nothing.
    #[tracing::instrument(level = "debug", skip_all, fields(batch_id = %batch_id, user_id = %caller.user_id))]
    pub async fn update_batch(
        &self,
        caller: &Caller,
        batch_id: &str,
        input: BatchUpdateInput,
    ) -> Result<Batch> {
        caller.authorize(Action::UpdateBatch)?;
        let id = BatchId::parse("batch_id", batch_id)?;
        let update = BatchUpdate::parse(input)?;
        let expected_version = update.expected_version;
        self.change_batch(caller, &id, expected_version, move |batch, now| {
            batch.apply(&update, now)
        })
        .await
    }

    /// Streams every committed version of a batch the caller can see: a snapshot (or
    /// the versions after `after_version`), then each change, until it is terminal.
    #[tracing::instrument(level = "debug", skip_all, fields(batch_id = %batch_id, user_id = %caller.user_id))]
    pub async fn watch_batch(
        &self,
        caller: &Caller,
        batch_id: &str,
        after_version: Option<i64>,
    ) -> Result<WatchStream> {
        caller.authorize(Action::ReadBatches)?;
        let id = BatchId::parse("batch_id", batch_id)?;
        let current = self.visible_batch(caller, &id).await?;
        if let Some(after) = after_version {
            if after < 0 {
                return Err(Error::invalid(
                    "after_version",
                    format!("{after} is negative"),
                ));
            }
            if after > current.version {
                return Err(Error::invalid(
                    "after_version",
                    format!(
                        "{after} is ahead of the batch, which is at version {}",
                        current.version
                    ),
                ));
            }
        }
        self.hub.watch(caller, &id, after_version).await
    }

    /// How many of the batches the caller can see match the filters, per status (every
    /// status present, zero when none): what the console's header shows. The filters
    /// are a list's; its paging fields are refused.
    #[tracing::instrument(level = "debug", skip_all, fields(user_id = %caller.user_id))]
    pub async fn count_batches(
        &self,
        caller: &Caller,
        input: ListBatchesInput,
    ) -> Result<Vec<(BatchStatus, i64)>> {
        caller.authorize(Action::ReadBatches)?;
        let mut filter = BatchFilter::parse_unpaged(
            input,
            "is a parameter of a list, not of the counts; counts cover every matching batch",
        )?;
        filter.owner = caller.owner_filter().map(str::to_owned);
        let stored = self.store.count_batches(&filter).await?;
        Ok(BatchStatus::ALL
            .into_iter()
            .map(|status| {
                let count = stored
                    .iter()
                    .find(|(counted, _)| *counted == status)
                    .map_or(0, |(_, count)| *count);
                (status, count)
            })
            .collect())
    }

    /// Streams the change feed of every batch the caller can see that matches the
    /// request's filters: a `batches` key sees its owner's batches only, `worker` and
    /// `admin` keys every owner's.
    #[tracing::instrument(level = "debug", skip_all, fields(user_id = %caller.user_id))]
    pub async fn watch_batches(
        &self,
        caller: &Caller,
        input: WatchBatchesInput,
    ) -> Result<FeedStream> {
        caller.authorize(Action::ReadBatches)?;
        let owner = caller.owner_filter();
        let sealer = self.hub.cursor_sealer();
        let WatchBatches { mut filter, start } =
            WatchBatches::parse(input, |text| sealer.open("after_cursor", text, owner))?;
        filter.owner = owner.map(str::to_owned);
        self.hub.watch_all(caller, filter, start).await
    }

    /// Applies the lifecycle timers to every batch that is due now: expiry after the
    /// completion window, and `cancelled` after `cancel_grace` in `cancelling`. Each
    /// move goes through the state machine, the event log and the watchers like any
    /// other change; with several replicas sweeping one database, the version check of
    /// the commit lets exactly one of them move each batch.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn sweep_due_batches(&self, cancel_grace: Duration) -> Result<SweepOutcome> {
        const PAGE: i64 = 500;
        let grace = i64::try_from(cancel_grace.as_secs()).unwrap_or(i64::MAX);
        let mut outcome = SweepOutcome::default();
        loop {
            let now = self.clock.now();
            let due = self
                .store
                .due_batches(now, now.saturating_sub(grace), PAGE)
                .await?;
            // The page's moves are committed together: group commit puts them in
            // rounds of their own instead of one commit each.
            let mut commits = tokio::task::JoinSet::new();
            for batch in &due {
                let Some(next) = batch.on_timer(now, grace) else {
                    continue;
                };
                let (group, from) = (self.commits.clone(), batch.status);
                commits.spawn(async move {
                    let next = Arc::new(next);
                    let written = group.commit(next.clone()).await;
                    (next, from, written)
                });
            }
            let mut moved = 0;
            let mut failed = None;
            while let Some(joined) = commits.join_next().await {
                let (next, from, written) = joined
                    .map_err(|e| Error::Internal(format!("a sweeper commit panicked: {e}")))?;
                // `false`: another writer (a worker, another replica's sweeper) changed
                // the batch first; the next sweep sees its new state.
                match written {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(error) => {
                        failed = Some(error);
                        continue;
                    }
                }
                self.hub.committed(&next, Some(from));
                self.caches.remember(next.clone());
                moved += 1;
                match next.status {
                    BatchStatus::Expired => outcome.expired += 1,
                    _ => outcome.cancelled += 1,
                }
                metrics::counter!("batchd_sweeper_transitions_total", "to" => next.status.as_str())
                    .increment(1);
                tracing::info!(batch_id = %next.id, from = %from, to = %next.status, "lifecycle timer moved batch");
            }
            // Every commit that succeeded was announced before an error is returned.
            if let Some(error) = failed {
                return Err(error);
            }
            if (due.len() as i64) < PAGE || moved == 0 {
                return Ok(outcome);
            }
        }
    }

    /// Deletes the event history older than `retention`, keeping each batch's latest
    /// version, in chunks of [`COMPACTION_CHUNK`] events, each its own short
    /// transaction: writers wait behind one chunk at most, never the whole
    /// compaction. Returns how many events were deleted.
    pub async fn compact_event_log(&self, retention: Duration) -> Result<u64> {
        let retention = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
        let before_at = self.clock.now().saturating_sub(retention);
        let deleted = in_chunks(|limit| self.store.compact_events(before_at, limit)).await?;
        if deleted > 0 {
            tracing::info!(deleted, "compacted the event log");
        }
        Ok(deleted)
    }

    /// Creates an API key; the secret is returned once and stored only as a digest.
    pub async fn create_api_key(
        &self,
        user_id: &str,
        scope: Scope,
    ) -> Result<(ApiKey, ApiKeySecret)> {
        let key = ApiKey::new(user_id, scope, self.clock.now())?;
        let secret = ApiKeySecret::generate();
        self.store.insert_api_key(&key, &secret.digest()).await?;
        Ok((key, secret))
    }

    /// Creates an admin key for user `admin` if the database has no key at all, so a
    /// fresh installation can be used at once. `None` when keys already exist.
    pub async fn create_first_api_key(&self) -> Result<Option<(ApiKey, ApiKeySecret)>> {
        let key = ApiKey::new("admin", Scope::Admin, self.clock.now())?;
        let secret = ApiKeySecret::generate();
        let created = self
            .store
            .insert_first_api_key(&key, &secret.digest())
            .await?;
        Ok(created.then_some((key, secret)))
    }

    /// Every API key, oldest first.
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        self.store.list_api_keys().await
    }

    /// Revokes a key: it authenticates nothing from now on.
    pub async fn revoke_api_key(&self, key_id: &str) -> Result<()> {
        let key_id = ApiKey::check_id(key_id)?;
        if self.store.revoke_api_key(key_id, self.clock.now()).await? {
            Ok(())
        } else {
            Err(Error::ApiKeyNotFound(key_id.to_owned()))
        }
    }

    /// Asks the database which API keys with open watch streams here were revoked, and
    /// has the hub end those streams with UNAUTHENTICATED. The database, not this
    /// process, is asked because a key is revoked by another process (`batchd keys
    /// revoke`) and every replica must notice.
    pub async fn end_watches_of_revoked_keys(&self) -> Result<()> {
        let keys = self.hub.watching_keys();
        for page in keys.chunks(REVOCATION_PAGE) {
            let revoked = self.store.revoked_api_keys(page).await?;
            self.hub.end_streams_of_revoked(&revoked);
        }
        Ok(())
    }

    /// The batch, if the caller may see it; otherwise NOT_FOUND, exactly as if it did
    /// not exist, so ids of other tenants' batches cannot be probed. A terminal batch
    /// comes from memory once read: it never changes again (a deletion makes the caches
    /// forget it).
    async fn visible_batch(&self, caller: &Caller, id: &BatchId) -> Result<Batch> {
        let batch = match self.caches.terminal(id) {
            Some(batch) => Arc::unwrap_or_clone(batch),
            None => {
                let deletions_seen = self.caches.deletions_seen();
                let batch = self
                    .reads
                    .get(id)
                    .await?
                    .ok_or_else(|| Error::BatchNotFound(id.to_string()))?;
                self.caches.remember_read(batch.clone(), deletions_seen);
                Arc::unwrap_or_clone(batch)
            }
        };
        if caller.sees(&batch) {
            Ok(batch)
        } else {
            Err(Error::BatchNotFound(id.to_string()))
        }
    }

    /// Computes a batch's next version with `change` and commits it if no other writer
    /// committed in between; otherwise computes it again from the new version.
    /// `change` returning `None` means "nothing to do": the current batch is returned
    /// and nothing is written.
    ///
    /// The first attempt starts from this replica's memory of its own last write, which
    /// saves a read. Memory may be stale, so only a commit settles an answer computed
    /// from it: a refusal or "nothing to do" computed from memory is computed again
    /// from the database. Every attempt after that (and the first, when memory has not
    /// got the batch) hands the change to group commit, whose round reads the batch
    /// with its other changes' batches in one query and commits it with them: no read
    /// of its own, no second queue.
    async fn change_batch(
        &self,
        caller: &Caller,
        id: &BatchId,
        expected_version: Option<i64>,
        change: impl Fn(&Batch, i64) -> Result<Option<Batch>> + Send + Sync + 'static,
    ) -> Result<Batch> {
        let (who, batch_id, clock) = (caller.clone(), id.clone(), self.clock.clone());
        let next_version = Arc::new(move |current: &Batch| -> Result<Option<Batch>> {
            if !who.sees(current) {
                return Err(Error::BatchNotFound(batch_id.to_string()));
            }
            match expected_version {
                Some(expected) if expected != current.version => Err(Error::VersionMismatch {
                    expected,
                    actual: current.version,
                }),
                _ => change(current, clock.now()),
            }
        });
        let remembered = self.caches.terminal(id).or_else(|| self.caches.latest(id));
        let memory = if let Some(current) = remembered {
            // A batch's owner never changes: memory is right about who sees it.
            if !caller.sees(&current) {
                return Err(Error::BatchNotFound(id.to_string()));
            }
            if let Ok(Some(next)) = next_version(&current) {
                let next = Arc::new(next);
                if self.commits.commit(next.clone()).await? {
                    WriteMemory::Hit.count();
                    return Ok(self.after_commit(&current, next));
                }
                self.caches.forget(id);
            }
            WriteMemory::Retried
        } else {
            WriteMemory::Miss
        };
        memory.count();
        for _ in 0..MAX_COMMIT_ATTEMPTS {
            let next_version = next_version.clone();
            let change: ChangeOfCurrent = Box::new(move |current| next_version(current));
            match self.commits.change_current(id.clone(), change).await? {
                CurrentChange::Written { from, next } => return Ok(self.after_commit(&from, next)),
                CurrentChange::Unchanged(current) => return Ok(Arc::unwrap_or_clone(current)),
                CurrentChange::Lost => tokio::task::yield_now().await,
            }
        }
        Err(Error::Contended(id.to_string()))
    }

    /// What follows the commit of `next` over `from`: the status change's log line,
    /// this replica's watchers, its memory of the batch.
    fn after_commit(&self, from: &Batch, next: Arc<Batch>) -> Batch {
        if next.status != from.status {
            tracing::info!(batch_id = %next.id, from = %from.status, to = %next.status, version = next.version, "batch status changed");
        }
        self.hub.committed(&next, Some(from.status));
        self.caches.remember(next.clone());
        Arc::unwrap_or_clone(next)
    }
}

/// What this replica's memory of a batch did for a write: the label of
/// `batchd_write_memory_total`. Misses are expected after a restart, and for a batch's
/// first writes (the cache keeps an entry for good from its second use on); a low share
/// of hits on a steady load means the latest cache (`--latest-cache-entries`,
/// `--latest-cache-bytes`) is smaller than the batches its workers keep writing, and
/// most writes cost a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMemory {
    /// The remembered version was current: the write took one statement.
    Hit,
    /// The remembered version was stale (or refused the change): computed again from
    /// the database.
    Retried,
    /// Not remembered: the write read the batch first.
    Miss,
}

impl WriteMemory {
    /// Every outcome, for registering the metric's series at zero.
    pub const ALL: [WriteMemory; 3] = [WriteMemory::Hit, WriteMemory::Retried, WriteMemory::Miss];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteMemory::Hit => "hit",
            WriteMemory::Retried => "retried",
            WriteMemory::Miss => "miss",
        }
    }

    fn count(self) {
        metrics::counter!("batchd_write_memory_total", "outcome" => self.as_str()).increment(1);
    }
}

/// Why a batch was deleted: the label of `batchd_batches_deleted_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeletionReason {
    /// A client's `DELETE` (or `DeleteBatch`).
    Request,
    /// The retention sweep: terminal for longer than `--retention-terminal`.
    Retention,
}

impl DeletionReason {
    /// Every reason, for registering the metric's series at zero.
    pub const ALL: [DeletionReason; 2] = [DeletionReason::Request, DeletionReason::Retention];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DeletionReason::Request => "request",
            DeletionReason::Retention => "retention",
        }
    }
}
