//! What a replica remembers to spare the database work it would answer the same way:
//! API keys for a few seconds (revocation takes effect within that time), terminal
//! batches (they never change again, but may be deleted: forgotten when a deletion is
//! heard of, and read again after [`TERMINAL_RECHECK`] in case that was missed), and the latest version of recently
//! written batches for the write path, where the version check of every commit catches
//! a stale entry and the write is retried from the database.
//!
//! Every cache is bounded in entries and the batch caches in bytes too: a batch may
//! hold up to [`MAX_BATCH_BYTES`](crate::domain::MAX_BATCH_BYTES) of text, so a bound on
//! entries alone would allow gigabytes. Unknown API keys have a cache of their own, so
//! a client sending made-up keys can neither evict the valid ones nor make each repeat
//! cost a database lookup.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quick_cache::sync::{Cache, DefaultLifecycle};
use quick_cache::{DefaultHashBuilder, OptionsBuilder, Weighter};

use crate::domain::{Batch, BatchId, Caller, MAX_BATCH_BYTES};

/// Sizes and lifetimes of the caches: flags of `serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOptions {
    /// How long an API key lookup is remembered: a revoked key stops working within
    /// this time, and its open watch streams end within it too (each replica checks
    /// the keys of its open streams this often). 0 checks the database on every call.
    pub api_key_ttl: Duration,

    /// Terminal batches kept in memory (they never change, so reads need no database).
    pub terminal_batches: usize,

    /// Most bytes of terminal batches kept in memory (batch text counted in bytes).
    pub terminal_bytes: u64,

    /// Recently written batches kept in memory, so a write usually needs one database
    /// round trip (a stale entry is caught by the commit's version check).
    pub latest_batches: usize,

    /// Most bytes of recently written batches kept in memory.
    pub latest_bytes: u64,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            api_key_ttl: Duration::from_secs(2),
            terminal_batches: 20_000,
            terminal_bytes: 64 * 1024 * 1024,
            // Bound by its bytes rather than its entries: a replica whose workers keep
            // more batches running than it holds starts every write with a read.
            latest_batches: 100_000,
            latest_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A key lookup: its caller and when it was made.
type KeyLookup<T> = (T, Instant);

/// How long a terminal batch is served from memory before it is read again: the bound
/// on serving a batch that another replica deleted when its announcement was lost (a
/// failed NOTIFY is not retried).
pub const TERMINAL_RECHECK: Duration = Duration::from_secs(60);

/// A cached batch with its weight, computed once when it is inserted (the weighter runs
/// during eviction and must be cheap), and when it was stored.
#[derive(Clone)]
struct Weighed {
    batch: Arc<Batch>,
    bytes: u64,
    stored: Instant,
}

/// Weighs a cached batch by its bytes, but never less than `floor`, the byte budget
/// divided by the most entries: so the cache holds at most that many entries and at
/// most that many bytes, whichever bound is reached first.
#[derive(Clone)]
struct BatchWeight {
    floor: u64,
}

impl Weighter<BatchId, Weighed> for BatchWeight {
    fn weight(&self, _id: &BatchId, value: &Weighed) -> u64 {
        value.bytes.max(self.floor)
    }
}

/// Bytes a batch occupies in memory besides its text: the struct, the `Arc`, the map
/// entry (measured order of magnitude; the text dominates large batches).
const BATCH_OVERHEAD_BYTES: u64 = 512;

/// A byte- and entry-bounded cache of batches.
struct BatchCache(Cache<BatchId, Weighed, BatchWeight>);

impl BatchCache {
    fn new(entries: usize, bytes: u64) -> BatchCache {
        let entries = entries.max(1);
        let bytes = bytes.max(BATCH_OVERHEAD_BYTES);
        let floor = (bytes / entries as u64).max(1);
        // The cache is split into shards, each with its share of the bytes, and an
        // item heavier than its shard's share is never kept: so that the largest
        // batch fits, a shard holds at least four of them.
        let largest = (MAX_BATCH_BYTES as u64).saturating_add(BATCH_OVERHEAD_BYTES);
        let shards = (bytes / largest.saturating_mul(4)).clamp(1, 64) as usize;
        let options = OptionsBuilder::new()
            .estimated_items_capacity(entries)
            .weight_capacity(bytes)
            .shards(shards)
            .build()
            // Every setting above is in range: capacities and shards are at least 1.
            .expect("valid cache options");
        BatchCache(Cache::with_options(
            options,
            BatchWeight { floor },
            DefaultHashBuilder::default(),
            DefaultLifecycle::default(),
        ))
    }

    fn get(&self, id: &BatchId) -> Option<Arc<Batch>> {
        self.0.get(id).map(|weighed| weighed.batch)
    }

    /// The batch, if it was stored less than `age` ago.
    fn get_fresh(&self, id: &BatchId, age: Duration) -> Option<Arc<Batch>> {
        self.0
            .get(id)
            .filter(|weighed| weighed.stored.elapsed() < age)
            .map(|weighed| weighed.batch)
    }

    fn insert(&self, batch: Arc<Batch>) {
        let bytes = batch.text_bytes() as u64 + BATCH_OVERHEAD_BYTES;
        let stored = Instant::now();
        self.0.insert(
            batch.id.clone(),
            Weighed {
                batch,
                bytes,
                stored,
            },
        );
    }

    fn remove(&self, id: &BatchId) {
        self.0.remove(id);
    }

    fn weight(&self) -> u64 {
        self.0.weight()
    }
}

/// What the cache holds for an API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CachedKey {
    /// A valid key, of this caller.
    Valid(Caller),
    /// No valid key has this secret (unknown or revoked).
    Invalid,
    /// Not looked up within the TTL: the database must be asked.
    NotCached,
}

/// The caches of one replica.
pub struct Caches {
    api_keys: Option<Cache<[u8; 32], KeyLookup<Caller>>>,
    unknown_keys: Option<Cache<[u8; 32], KeyLookup<()>>>,
    api_key_ttl: Duration,
    terminal: BatchCache,
    latest: BatchCache,
    /// Deletions heard of so far: a read that began before one may have read a batch
    /// that is gone now, so what it read is not remembered.
    deletions: AtomicU64,
}

/// Most valid API keys remembered at once (each well under 1 KiB).
const API_KEY_ENTRIES: usize = 10_000;
/// Most unknown key digests remembered at once (32 bytes and an instant each).
const UNKNOWN_KEY_ENTRIES: usize = 10_000;

impl Caches {
    /// Empty caches of the given sizes.
    pub fn new(options: &CacheOptions) -> Caches {
        let enabled = !options.api_key_ttl.is_zero();
        Caches {
            api_keys: enabled.then(|| Cache::new(API_KEY_ENTRIES)),
            unknown_keys: enabled.then(|| Cache::new(UNKNOWN_KEY_ENTRIES)),
            api_key_ttl: options.api_key_ttl,
            terminal: BatchCache::new(options.terminal_batches, options.terminal_bytes),
            latest: BatchCache::new(options.latest_batches, options.latest_bytes),
            deletions: AtomicU64::new(0),
        }
    }

    /// What a lookup less than the TTL ago found for the key with this digest.
    pub fn api_key(&self, digest: &[u8; 32]) -> CachedKey {
        let fresh = |fetched: Instant| fetched.elapsed() < self.api_key_ttl;
        if let Some((caller, fetched)) = self.api_keys.as_ref().and_then(|keys| keys.get(digest))
            && fresh(fetched)
        {
            return CachedKey::Valid(caller);
        }
        match self.unknown_keys.as_ref().and_then(|keys| keys.get(digest)) {
            Some(((), fetched)) if fresh(fetched) => CachedKey::Invalid,
            _ => CachedKey::NotCached,
        }
    }

    /// Whether the key with this digest was valid when last looked up, however long
    /// ago (while its entry is still held): its renewal takes the lane of known keys.
    pub fn was_valid(&self, digest: &[u8; 32]) -> bool {
        self.api_keys
            .as_ref()
            .is_some_and(|keys| keys.get(digest).is_some())
    }

    /// Remembers a key lookup: a valid key, or that no valid key has this digest. A key
    /// created after its digest was remembered as unknown works within the TTL.
    pub fn remember_api_key(&self, digest: [u8; 32], caller: Option<Caller>) {
        let now = Instant::now();
        match caller {
            Some(caller) => {
                if let Some(keys) = &self.api_keys {
                    keys.insert(digest, (caller, now));
                }
            }
            None => {
                if let Some(keys) = &self.api_keys {
                    // A key revoked since it was remembered.
                    keys.remove(&digest);
                }
                if let Some(unknown) = &self.unknown_keys {
                    unknown.insert(digest, ((), now));
                }
            }
        }
    }

    /// A terminal batch: it is final, so this copy is the truth, unless the batch was
    /// deleted since; it is read again after [`TERMINAL_RECHECK`].
    pub fn terminal(&self, id: &BatchId) -> Option<Arc<Batch>> {
        self.terminal.get_fresh(id, TERMINAL_RECHECK)
    }

    /// A mark to take before reading a batch from the database, for
    /// [`Caches::remember_read`].
    pub fn deletions_seen(&self) -> u64 {
        self.deletions.load(Ordering::Acquire)
    }

    /// Remembers a terminal batch read from the database, unless a deletion was heard
    /// of since `deletions_seen` was taken: the batch read may be that one.
    pub fn remember_read(&self, batch: Arc<Batch>, deletions_seen: u64) {
        if batch.status.is_terminal() && self.deletions_seen() == deletions_seen {
            self.remember(batch);
        }
    }

    /// The latest version this replica has seen of a batch it wrote; possibly stale
    /// when another replica wrote since.
    pub fn latest(&self, id: &BatchId) -> Option<Arc<Batch>> {
        self.latest.get(id)
    }

    /// Remembers a batch as read or committed: terminal ones for good, others for the
    /// write path.
    pub fn remember(&self, batch: Arc<Batch>) {
        if batch.status.is_terminal() {
            self.latest.remove(&batch.id);
            self.terminal.insert(batch);
        } else {
            self.latest.insert(batch);
        }
    }

    /// Forgets what the write path knew of a batch (another writer got there first).
    pub fn forget(&self, id: &BatchId) {
        self.latest.remove(id);
    }

    /// Forgets everything known of a batch, terminal or not: it was deleted (here, or
    /// by another replica, which announces it like a commit).
    pub fn forget_batch(&self, id: &BatchId) {
        self.deletions.fetch_add(1, Ordering::AcqRel);
        self.latest.remove(id);
        self.terminal.remove(id);
    }

    /// Forgets every batch: announcements of other replicas' commits (deletions
    /// among them) may have been lost, so no terminal batch is known to still exist.
    pub fn forget_all_batches(&self) {
        self.deletions.fetch_add(1, Ordering::AcqRel);
        self.latest.0.clear();
        self.terminal.0.clear();
    }

    /// Bytes held by the batch caches (terminal, latest), as their weighers count them.
    pub fn batch_bytes(&self) -> (u64, u64) {
        (self.terminal.weight(), self.latest.weight())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ApiKey, BatchErrorEntry, Scope, fixtures};

    fn batch_of_text(bytes: usize) -> Arc<Batch> {
        let mut batch = fixtures::batch();
        batch.errors = vec![BatchErrorEntry {
            code: "c".into(),
            line: None,
            message: "m".repeat(bytes),
            param: None,
        }];
        Arc::new(batch)
    }

    #[test]
    fn batch_caches_are_bounded_in_bytes_as_well_as_entries() {
        let caches = Caches::new(&CacheOptions {
            terminal_batches: 1_000,
            terminal_bytes: 4 * 1024 * 1024,
            ..CacheOptions::default()
        });
        // 40 batches of 1 MiB: far fewer entries than allowed, far more bytes.
        for _ in 0..40 {
            let mut batch = Arc::unwrap_or_clone(batch_of_text(1024 * 1024));
            batch.status = crate::domain::BatchStatus::Completed;
            caches.remember(Arc::new(batch));
        }
        let (terminal, _) = caches.batch_bytes();
        assert!(terminal <= 4 * 1024 * 1024, "{terminal} bytes cached");
        assert!(terminal > 0);
    }

    #[test]
    fn batch_caches_are_bounded_in_entries_when_batches_are_small() {
        let cache = BatchCache::new(10, 64 * 1024 * 1024);
        let ids: Vec<BatchId> = (0..100)
            .map(|_| {
                let batch = batch_of_text(1);
                let id = batch.id.clone();
                cache.insert(batch);
                id
            })
            .collect();
        let held = ids.iter().filter(|id| cache.get(id).is_some()).count();
        assert!((1..=10).contains(&held), "{held} entries held");
    }

    #[test]
    fn a_read_that_a_deletion_overtook_is_not_remembered() {
        let caches = Caches::new(&CacheOptions::default());
        let mut batch = Arc::unwrap_or_clone(batch_of_text(1));
        batch.status = crate::domain::BatchStatus::Completed;
        let batch = Arc::new(batch);
        // The read began, then a deletion (of this batch or another) was heard of.
        let seen = caches.deletions_seen();
        caches.forget_batch(&batch.id);
        caches.remember_read(batch.clone(), seen);
        assert!(caches.terminal(&batch.id).is_none());
        // A read with nothing in between is remembered; a deletion forgets it.
        caches.remember_read(batch.clone(), caches.deletions_seen());
        assert!(caches.terminal(&batch.id).is_some());
        caches.forget_batch(&batch.id);
        assert!(caches.terminal(&batch.id).is_none());
    }

    #[test]
    fn unknown_keys_do_not_evict_valid_ones() {
        let caches = Caches::new(&CacheOptions::default());
        let key = ApiKey::new("alice", Scope::Batches, 1).unwrap();
        caches.remember_api_key([7; 32], Some(Caller::of(&key)));
        for i in 0..(3 * UNKNOWN_KEY_ENTRIES as u32) {
            let mut digest = [0u8; 32];
            digest[..4].copy_from_slice(&i.to_le_bytes());
            digest[31] = 1;
            caches.remember_api_key(digest, None);
        }
        let CachedKey::Valid(known) = caches.api_key(&[7; 32]) else {
            panic!("alice's key is no longer cached as valid");
        };
        assert_eq!(known.user_id, "alice");
    }
}
