//! The batch domain: the object, its status machine, validated input and the API key
//! rules. No I/O: everything here is tested without a database or a network.
//!
//! Layered, each module using only those before it (and `crate::error`): `ids`,
//! `status` and `values` (what a batch is made of), then `api_key` (who may do what)
//! and `input` (validation), then `batch`, then `feed` (the change feed's cursor and
//! filter) and `cursor_seal` (the cursor as clients see it) on top; [`webhooks`]
//! (events, endpoints, deliveries, signatures) beside them, over `ids` and `batch`.

mod api_key;
mod batch;
mod cursor_seal;
mod feed;
mod ids;
mod input;
mod status;
mod values;
pub mod webhooks;

pub use api_key::{Action, ApiKey, ApiKeySecret, Caller, Scope, digest_of};
pub(crate) use batch::with_batch_fields;
pub use batch::{BATCH_DELETED_OBJECT, Batch, BatchEvent, MAX_BATCH_BYTES};
pub use cursor_seal::{CURSOR_KEY_BYTES, CursorSealer};
pub use feed::{BatchFilter, FeedCursor, FeedStart, WatchBatches, WatchBatchesInput};
pub use ids::BatchId;
pub use input::{
    BatchPolicy, BatchUpdate, BatchUpdateInput, CompletionWindow, CreateBatchInput, CreateRequest,
    DEFAULT_COMPLETION_WINDOWS, DEFAULT_ENDPOINTS, IDEMPOTENCY_WINDOW_SECONDS, IDENTIFIER_PATTERN,
    IdempotencyKey, ListBatches, ListBatchesInput, ListOrder, ListRequest, MAX_METADATA_FILTERS,
    MAX_METADATA_KEY_CHARS, MAX_METADATA_PAIRS, MAX_METADATA_VALUE_CHARS, NewBatch, TEXT_PATTERN,
};
pub use status::BatchStatus;
pub use values::{
    BatchErrorEntry, ExpiryAnchor, OutputExpiresAfter, ProgressEstimate, RequestCounts,
    UnixSeconds, Usage,
};

pub(crate) use ids::random_hex;

/// Batches for unit tests, made the way the service makes them.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// A new batch of owner `tenant`, created at 1,700,000,000.
    pub(crate) fn batch() -> Batch {
        created_by("tenant", 1_700_000_000)
    }

    /// A new 24h batch of owner `user`, created at `now` by the service's own path.
    pub(crate) fn created_by(user: &str, now: UnixSeconds) -> Batch {
        let key = ApiKey::new(user, Scope::Admin, now).expect("a valid user");
        let input = CreateBatchInput {
            input_file_id: "file-1".into(),
            endpoint: "/v1/chat/completions".into(),
            completion_window: "24h".into(),
            ..Default::default()
        };
        let new = NewBatch::parse(input, &BatchPolicy::default()).expect("a valid request");
        Batch::create(new, &Caller::of(&key), now)
    }
}
