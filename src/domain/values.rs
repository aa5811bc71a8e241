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

/// How fast a running batch's requests are finishing, estimated from its recent
/// versions: an average that weighs the last minute most, so that one late or bunched
/// report moves it only a little.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressEstimate {
    /// Requests finished (completed + failed) per second, in thousandths: an integer
    /// keeps versions exactly comparable. `None` until a second sample.
    pub rate_milli: Option<i64>,
    /// When the sample the rate was last moved from was taken.
    pub sampled_at: UnixSeconds,
    /// How many requests had finished at that sample.
    pub sampled_done: i64,
}

impl ProgressEstimate {
    /// Samples closer together than this are not taken: timestamps have whole seconds,
    /// so a shorter interval would be mostly rounding. Reports in between add up into
    /// the next sample.
    pub const MIN_SAMPLE_SECONDS: i64 = 5;
    /// The time constant of the average: a sample this old weighs 1/e of a new one.
    pub const WINDOW_SECONDS: f64 = 60.0;

    /// The first sample: `done` requests finished at `at`, no rate yet.
    pub fn start(at: UnixSeconds, done: i64) -> ProgressEstimate {
        ProgressEstimate {
            rate_milli: None,
            sampled_at: at,
            sampled_done: done,
        }
    }

    /// The estimate after `done` requests have finished at `at`: unchanged when the
    /// last sample is too recent (or in the future of a clock that went back).
    pub fn sample(self, at: UnixSeconds, done: i64) -> ProgressEstimate {
        let elapsed = at.saturating_sub(self.sampled_at);
        if elapsed < Self::MIN_SAMPLE_SECONDS {
            return self;
        }
        let finished = done.saturating_sub(self.sampled_done).max(0) as f64;
        let now_milli = finished * 1_000.0 / elapsed as f64;
        let rate = match self.rate_milli {
            None => now_milli,
            Some(before) => {
                let weight = 1.0 - (-(elapsed as f64) / Self::WINDOW_SECONDS).exp();
                before as f64 + weight * (now_milli - before as f64)
            }
        };
        ProgressEstimate {
            // `as` saturates: an absurd count cannot wrap the rate around.
            rate_milli: Some(rate.round() as i64),
            sampled_at: at,
            sampled_done: done,
        }
    }

    /// Requests per second, once there is a rate.
    pub fn per_second(&self) -> Option<f64> {
        self.rate_milli.map(|milli| milli as f64 / 1_000.0)
    }
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
