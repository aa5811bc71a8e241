//! The plain values a batch is made of: timestamps, request counts, token usage, error
//! entries and the output file expiry. Leaves of the domain: they depend on nothing.

use serde::{Deserialize, Serialize};

/// A point in time as batchd stores and sends it: seconds since 1970-01-01 UTC.
pub type UnixSeconds = i64;

/// How many requests of a batch have run so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    /// Requests in the batch.
    pub total: i64,
    /// Requests that completed successfully.
    pub completed: i64,
    /// Requests that failed.
    pub failed: i64,
}

/// Token usage of a batch, as OpenAI reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Input tokens.
    pub input_tokens: i64,
    /// Input tokens served from the cache.
    pub cached_tokens: i64,
    /// Output tokens.
    pub output_tokens: i64,
    /// Output tokens spent on reasoning.
    pub reasoning_tokens: i64,
    /// `input_tokens + output_tokens`.
    pub total_tokens: i64,
}

/// One error met while processing a batch, an entry of the batch's `errors` list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchErrorEntry {
    /// Machine-readable code.
    pub code: String,
    /// Line of the input file, if the error is about one.
    pub line: Option<i64>,
    /// Human-readable message.
    pub message: String,
    /// The parameter at fault, if any.
    pub param: Option<String>,
}

/// When the output and error files of a batch expire (OpenAI's
/// `BatchFileExpirationAfter`): `seconds` after the anchor, the files' creation. The
/// worker that writes the files reads it from the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputExpiresAfter {
    /// What the expiry counts from; OpenAI supports only `created_at`.
    pub anchor: ExpiryAnchor,
    /// Seconds after the anchor, 3600 (one hour) to 2,592,000 (30 days).
    pub seconds: i64,
}

/// What a file expiry counts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpiryAnchor {
    /// The file's creation.
    CreatedAt,
}

impl ExpiryAnchor {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ExpiryAnchor::CreatedAt => "created_at",
        }
    }

    /// The anchor named `text` (its [`as_str`](Self::as_str) spelling); `None` for
    /// anything else.
    pub fn from_name(text: &str) -> Option<ExpiryAnchor> {
        (text == "created_at").then_some(ExpiryAnchor::CreatedAt)
    }
}
