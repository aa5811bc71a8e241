//! What a replica remembers to spare the database work it would answer the same way:
//! API keys for a few seconds (revocation takes effect within that time), terminal
//! batches for good (they never change again), and the latest version of recently
//! written batches for the write path, where the version check of every commit catches
//! a stale entry and the write is retried from the database.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quick_cache::sync::Cache;

use crate::domain::{Batch, BatchId, Caller};

/// Sizes and lifetimes of the caches.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// How long an API key lookup (found or not) is trusted; zero disables the cache.
    pub api_key_ttl: Duration,
    /// Terminal batches kept in memory.
    pub terminal_batches: usize,
    /// Recently written batches kept for the write path.
    pub latest_batches: usize,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            api_key_ttl: Duration::from_secs(2),
            terminal_batches: 20_000,
            latest_batches: 20_000,
        }
    }
}

/// A key lookup: its caller (`None`: no valid key) and when it was made.
type KeyLookup = (Option<Caller>, Instant);

/// The caches of one replica.
pub struct Caches {
    api_keys: Option<Cache<[u8; 32], KeyLookup>>,
    api_key_ttl: Duration,
    terminal: Cache<BatchId, Arc<Batch>>,
    latest: Cache<BatchId, Arc<Batch>>,
}

/// Most API keys remembered at once.
const API_KEY_ENTRIES: usize = 10_000;

impl Caches {
    /// Empty caches of the given sizes.
    pub fn new(options: &CacheOptions) -> Caches {
        Caches {
            api_keys: (!options.api_key_ttl.is_zero()).then(|| Cache::new(API_KEY_ENTRIES)),
            api_key_ttl: options.api_key_ttl,
            terminal: Cache::new(options.terminal_batches.max(1)),
            latest: Cache::new(options.latest_batches.max(1)),
        }
    }

    /// The caller of the key with this digest (`Some(None)`: no valid key), if looked up
    /// less than the TTL ago.
    pub fn api_key(&self, digest: &[u8; 32]) -> Option<Option<Caller>> {
        let (caller, fetched) = self.api_keys.as_ref()?.get(digest)?;
        (fetched.elapsed() < self.api_key_ttl).then_some(caller)
    }

    /// Remembers a key lookup.
    pub fn remember_api_key(&self, digest: [u8; 32], caller: Option<Caller>) {
        if let Some(keys) = &self.api_keys {
            keys.insert(digest, (caller, Instant::now()));
        }
    }

    /// A terminal batch: it is final, so this copy is the truth.
    pub fn terminal(&self, id: &BatchId) -> Option<Arc<Batch>> {
        self.terminal.get(id)
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
            self.terminal.insert(batch.id.clone(), batch);
        } else {
            self.latest.insert(batch.id.clone(), batch);
        }
    }

    /// Forgets what the write path knew of a batch (another writer got there first).
    pub fn forget(&self, id: &BatchId) {
        self.latest.remove(id);
    }
}
