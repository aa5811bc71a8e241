//! The batch domain: the object, its status machine, validated input and the API key
//! rules. No I/O: everything here is tested without a database or a network.

mod api_key;
mod batch;
mod input;
mod status;

pub use api_key::{Action, ApiKey, ApiKeySecret, Caller, Scope, digest_hex, digest_of};
pub use batch::{
    Batch, BatchErrorEntry, BatchEvent, ExpiryAnchor, MAX_BATCH_BYTES, MAX_BATCH_ERRORS,
    OutputExpiresAfter, RequestCounts, Usage,
};
pub use input::{
    BatchId, BatchPolicy, BatchUpdate, BatchUpdateInput, CompletionWindow, CreateBatchInput,
    DEFAULT_COMPLETION_WINDOWS, DEFAULT_ENDPOINTS, IDEMPOTENCY_WINDOW_SECONDS, IDENTIFIER_PATTERN,
    IdempotencyKey, ListBatches, ListBatchesInput, ListOrder, MAX_IDEMPOTENCY_KEY_BYTES,
    MAX_METADATA_FILTERS, MAX_METADATA_KEY_CHARS, MAX_METADATA_PAIRS, MAX_METADATA_VALUE_CHARS,
    MAX_OUTPUT_EXPIRY_SECONDS, MIN_OUTPUT_EXPIRY_SECONDS, NewBatch, TEXT_PATTERN,
};
pub use status::BatchStatus;

pub(crate) use input::random_hex;

/// Batches for unit tests, made the way the service makes them.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// A new batch of owner `tenant`, created at 1,700,000,000.
    pub(crate) fn batch() -> Batch {
        let key = ApiKey::new("tenant", Scope::Admin, 1_700_000_000).expect("a valid user");
        let input = CreateBatchInput {
            input_file_id: "file-1".into(),
            endpoint: "/v1/chat/completions".into(),
            completion_window: "24h".into(),
            ..Default::default()
        };
        let new = NewBatch::parse(input, &BatchPolicy::default()).expect("a valid request");
        Batch::create(new, &Caller::of(&key), 1_700_000_000)
    }
}
