//! Input parsed at the edge into validated types, so the rest of batchd never sees an
//! invalid value. Every error names the field and the value at fault.

use std::collections::BTreeMap;
use std::ops::Deref;

use super::ids::{BatchId, truncate_for_message};
use super::status::BatchStatus;
use super::values::{
    BatchErrorEntry, ExpiryAnchor, OutputExpiresAfter, RequestCounts, UnixSeconds, Usage,
};
use crate::error::{Error, Result};

/// A completion window batchd accepts, such as `24h`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletionWindow {
    /// The spelling clients send.
    pub text: String,
    /// Its length.
    pub seconds: i64,
}

impl CompletionWindow {
    /// Parses a window such as `24h` or `48h` (any humantime duration).
    pub fn parse(text: &str) -> std::result::Result<CompletionWindow, String> {
        let duration = humantime::parse_duration(text)
            .map_err(|e| format!("`{text}` is not a duration like `24h`: {e}"))?;
        let seconds = i64::try_from(duration.as_secs())
            .ok()
            .filter(|&s| s > 0)
            .ok_or_else(|| {
                format!("`{text}` is not a positive duration that fits in i64 seconds")
            })?;
        Ok(CompletionWindow {
            text: text.to_owned(),
            seconds,
        })
    }
}

/// What a deployment accepts on create.
#[derive(Debug, Clone)]
pub struct BatchPolicy {
    /// Accepted `endpoint` values.
    pub endpoints: Vec<String>,
    /// Accepted `completion_window` values.
    pub completion_windows: Vec<CompletionWindow>,
}

/// The endpoints OpenAI's Batch API accepts (`CreateBatchRequest.endpoint` of its
/// OpenAPI document).
pub const DEFAULT_ENDPOINTS: [&str; 8] = [
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
];

/// The completion windows accepted by default.
pub const DEFAULT_COMPLETION_WINDOWS: [&str; 2] = ["24h", "48h"];

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            endpoints: DEFAULT_ENDPOINTS.iter().map(|s| s.to_string()).collect(),
            completion_windows: DEFAULT_COMPLETION_WINDOWS
                .iter()
                .map(|w| CompletionWindow::parse(w).expect("the default windows parse"))
                .collect(),
        }
    }
}

/// Metadata limits, as OpenAI documents them.
pub const MAX_METADATA_PAIRS: usize = 16;
/// Longest metadata key, in characters.
pub const MAX_METADATA_KEY_CHARS: usize = 64;
/// Longest metadata value, in characters.
pub const MAX_METADATA_VALUE_CHARS: usize = 512;
/// Longest file id, job id or model name, in characters.
const MAX_ID_CHARS: usize = 256;
/// Longest remark, in characters.
const MAX_REMARK_CHARS: usize = 1_024;
/// Longest error code, in characters.
const MAX_ERROR_CODE_CHARS: usize = 128;
/// Longest error message, in characters.
const MAX_ERROR_MESSAGE_CHARS: usize = 4_096;
/// Most errors one update may append.
const MAX_ERRORS_PER_UPDATE: usize = 1_000;

/// What identifier-like values (file ids, job ids, model names) must look like, as an
/// ECMA-262 regular expression: what [`check_identifier`] accepts.
pub const IDENTIFIER_PATTERN: &str = "^[^\\s\\x00-\\x1f\\x7f-\\x9f]{1,256}$";

/// An identifier-like value: 1..=256 characters, none of them whitespace or control.
fn check_identifier(field: &str, text: &str) -> Result<()> {
    let chars = text.chars().count();
    if chars == 0 {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if chars > MAX_ID_CHARS {
        return Err(Error::invalid(
            field,
            format!("is {chars} characters long; at most {MAX_ID_CHARS} are allowed"),
        ));
    }
    if let Some(bad) = text.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::invalid(
            field,
            format!(
                "`{}` contains the character {bad:?}; whitespace and control characters are not allowed",
                truncate_for_message(text)
            ),
        ));
    }
    Ok(())
}

/// What free text (remarks, metadata, error messages) must look like, as an ECMA-262
/// regular expression: anything but the NUL character.
pub const TEXT_PATTERN: &str = "^[^\\u0000]*$";

/// Refuses text a store cannot keep: PostgreSQL's TEXT and JSONB refuse the NUL
/// character (SQLite would keep it, and both stores must accept the same values).
/// Rust strings are valid UTF-8, so NUL is the only character either store refuses.
fn refuse_nul(field: &str, text: &str) -> Result<()> {
    match text.find('\0') {
        None => Ok(()),
        Some(at) => Err(Error::invalid(
            field,
            format!("contains the NUL character (\\u0000) at byte {at}; it cannot be stored"),
        )),
    }
}

/// Free text of at most `max` characters, empty allowed only when `allow_empty`.
fn check_text(field: &str, text: &str, max: usize, allow_empty: bool) -> Result<()> {
    refuse_nul(field, text)?;
    let chars = text.chars().count();
    if chars == 0 && !allow_empty {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if chars > max {
        return Err(Error::invalid(
            field,
            format!("is {chars} characters long; at most {max} are allowed"),
        ));
    }
    Ok(())
}

/// Metadata of at most [`MAX_METADATA_PAIRS`] pairs, each key and value within its
/// limit.
fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<()> {
    if metadata.len() > MAX_METADATA_PAIRS {
        return Err(Error::invalid(
            "metadata",
            format!(
                "has {} pairs; at most {MAX_METADATA_PAIRS} are allowed",
                metadata.len()
            ),
        ));
    }
    for (key, value) in metadata {
        refuse_nul("metadata", key)?;
        refuse_nul(&format!("metadata.{key}"), value)?;
        let key_chars = key.chars().count();
        if key_chars == 0 || key_chars > MAX_METADATA_KEY_CHARS {
            return Err(Error::invalid(
                "metadata",
                format!(
                    "key `{}` is {key_chars} characters long; keys must be 1 to {MAX_METADATA_KEY_CHARS}",
                    truncate_for_message(key)
                ),
            ));
        }
        let value_chars = value.chars().count();
        if value_chars > MAX_METADATA_VALUE_CHARS {
            return Err(Error::invalid(
                format!("metadata.{key}"),
                format!(
                    "value is {value_chars} characters long; at most {MAX_METADATA_VALUE_CHARS} are allowed"
                ),
            ));
        }
    }
    Ok(())
}

/// A create request, in the two forms that share this one declaration of its fields:
/// [`CreateBatchInput`] as the transports receive it, and [`NewBatch`] once
/// [`NewBatch::parse`] has checked every field. The three fields whose checked form is
/// richer than what clients send are the type parameters; the others are checked in
/// place and keep their type.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest<Window, Key, Expiry> {
    /// The file holding the requests; required.
    pub input_file_id: String,
    /// One of the policy's endpoints; required.
    pub endpoint: String,
    /// One of the policy's windows, e.g. `24h`; required.
    pub completion_window: Window,
    /// `None` or up to 16 pairs.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Optional grouping id.
    pub job_id: Option<String>,
    /// Optional note.
    pub remark: Option<String>,
    /// Makes a retried create return the first one's batch (REST `Idempotency-Key`,
    /// gRPC `request_id`).
    pub idempotency_key: Option<Key>,
    /// When the output files expire; clients send `(anchor, seconds)`.
    pub output_expires_after: Option<Expiry>,
}

/// A create request as the transports receive it.
pub type CreateBatchInput = CreateRequest<String, String, (String, i64)>;

/// A validated create request.
pub type NewBatch = CreateRequest<CompletionWindow, IdempotencyKey, OutputExpiresAfter>;

/// Shortest output file expiry OpenAI accepts: one hour.
const MIN_OUTPUT_EXPIRY_SECONDS: i64 = 3_600;
/// Longest output file expiry OpenAI accepts: 30 days.
const MAX_OUTPUT_EXPIRY_SECONDS: i64 = 2_592_000;

/// Validates `output_expires_after` exactly as OpenAI does.
fn parse_output_expires_after(anchor: &str, seconds: i64) -> Result<OutputExpiresAfter> {
    let anchor = ExpiryAnchor::from_name(anchor).ok_or_else(|| {
        Error::invalid(
            "output_expires_after.anchor",
            format!(
                "`{}` is not supported; the only anchor is `created_at`",
                truncate_for_message(anchor)
            ),
        )
    })?;
    if !(MIN_OUTPUT_EXPIRY_SECONDS..=MAX_OUTPUT_EXPIRY_SECONDS).contains(&seconds) {
        return Err(Error::invalid(
            "output_expires_after.seconds",
            format!(
                "{seconds} is out of range; use {MIN_OUTPUT_EXPIRY_SECONDS} (1 hour) to {MAX_OUTPUT_EXPIRY_SECONDS} (30 days)"
            ),
        ));
    }
    Ok(OutputExpiresAfter { anchor, seconds })
}

/// How long an idempotency key stands for the batch its first request created.
pub const IDEMPOTENCY_WINDOW_SECONDS: i64 = 24 * 3600;
/// Longest idempotency key, in bytes (all ASCII).
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

/// A client's idempotency key: 1 to 255 visible ASCII characters, as HTTP headers
/// carry them and as UUIDs and ULIDs are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The field name errors report.
    pub const FIELD: &'static str = crate::error::IDEMPOTENCY_KEY_FIELD;
    /// What [`IdempotencyKey::parse`] accepts, as an ECMA-262 regular expression.
    pub const PATTERN: &'static str = "^[!-~]{1,255}$";

    /// Parses a key sent by a client.
    pub fn parse(text: &str) -> Result<IdempotencyKey> {
        if text.is_empty() || text.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(Error::invalid(
                Self::FIELD,
                format!(
                    "is {} bytes long; use 1 to {MAX_IDEMPOTENCY_KEY_BYTES} visible ASCII characters",
                    text.len()
                ),
            ));
        }
        if let Some(bad) = text.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(Error::invalid(
                Self::FIELD,
                format!(
                    "contains the character {bad:?}; only visible ASCII characters are allowed"
                ),
            ));
        }
        Ok(IdempotencyKey(text.to_owned()))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl NewBatch {
    /// A digest of what the request asks for (everything but the key itself): a retry
    /// with the same key must ask for exactly the same batch.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        // Length-prefixed fields, so that no two different requests share an encoding.
        let mut hash = Sha256::new();
        let mut field = |text: Option<&str>| match text {
            None => hash.update([0u8]),
            Some(text) => {
                hash.update([1u8]);
                hash.update((text.len() as u64).to_le_bytes());
                hash.update(text.as_bytes());
            }
        };
        field(Some(&self.input_file_id));
        field(Some(&self.endpoint));
        field(Some(&self.completion_window.text));
        field(self.job_id.as_deref());
        field(self.remark.as_deref());
        let expiry = self
            .output_expires_after
            .map(|e| format!("{}:{}", e.anchor.as_str(), e.seconds));
        field(expiry.as_deref());
        match &self.metadata {
            None => field(None),
            Some(metadata) => {
                field(Some(&metadata.len().to_string()));
                for (key, value) in metadata {
                    field(Some(key));
                    field(Some(value));
                }
            }
        }
        hash.finalize().into()
    }

    /// Validates a create request against the deployment's policy.
    pub fn parse(input: CreateBatchInput, policy: &BatchPolicy) -> Result<NewBatch> {
        check_identifier("input_file_id", &input.input_file_id)?;
        if !policy.endpoints.contains(&input.endpoint) {
            return Err(Error::invalid(
                "endpoint",
                format!(
                    "`{}` is not supported; use one of {}",
                    truncate_for_message(&input.endpoint),
                    policy.endpoints.join(", ")
                ),
            ));
        }
        let completion_window = policy
            .completion_windows
            .iter()
            .find(|w| w.text == input.completion_window)
            .cloned()
            .ok_or_else(|| {
                let accepted: Vec<&str> = policy
                    .completion_windows
                    .iter()
                    .map(|w| w.text.as_str())
                    .collect();
                Error::invalid(
                    "completion_window",
                    format!(
                        "`{}` is not supported; use one of {}",
                        truncate_for_message(&input.completion_window),
                        accepted.join(", ")
                    ),
                )
            })?;
        if let Some(metadata) = &input.metadata {
            check_metadata(metadata)?;
        }
        if let Some(job_id) = &input.job_id {
            check_identifier("job_id", job_id)?;
        }
        if let Some(remark) = &input.remark {
            check_text("remark", remark, MAX_REMARK_CHARS, false)?;
        }
        Ok(NewBatch {
            input_file_id: input.input_file_id,
            endpoint: input.endpoint,
            completion_window,
            metadata: input.metadata,
            job_id: input.job_id,
            remark: input.remark,
            idempotency_key: input
                .idempotency_key
                .map(|k| IdempotencyKey::parse(&k))
                .transpose()?,
            output_expires_after: input
                .output_expires_after
                .map(|(anchor, seconds)| parse_output_expires_after(&anchor, seconds))
                .transpose()?,
        })
    }
}

/// A worker's update as the transports receive it (status already mapped to the
/// domain enum by the transport, which knows its own spelling).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchUpdateInput {
    /// Apply only if the batch is at this version.
    pub expected_version: Option<i64>,
    /// New status.
    pub status: Option<BatchStatus>,
    /// New counts, internally consistent once checked.
    pub request_counts: Option<RequestCounts>,
    /// Output file id.
    pub output_file_id: Option<String>,
    /// Error file id.
    pub error_file_id: Option<String>,
    /// Errors to append.
    pub errors: Vec<BatchErrorEntry>,
    /// New usage, internally consistent once checked.
    pub usage: Option<Usage>,
    /// Model name.
    pub model: Option<String>,
}

/// A worker update whose every field [`BatchUpdate::parse`] has checked. Checking
/// changes no field's type, so it wraps the input and is read through `Deref`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchUpdate(BatchUpdateInput);

impl Deref for BatchUpdate {
    type Target = BatchUpdateInput;

    fn deref(&self) -> &BatchUpdateInput {
        &self.0
    }
}

impl BatchUpdate {
    /// Validates what can be checked without the batch (the rest is in `Batch::apply`).
    pub fn parse(input: BatchUpdateInput) -> Result<BatchUpdate> {
        if let Some(version) = input.expected_version.filter(|&v| v < 1) {
            return Err(Error::invalid(
                "expected_version",
                format!("{version} is not a version; versions start at 1"),
            ));
        }
        if let Some(counts) = input.request_counts {
            check_request_counts(counts)?;
        }
        if let Some(usage) = input.usage {
            check_usage(usage)?;
        }
        if input.errors.len() > MAX_ERRORS_PER_UPDATE {
            return Err(Error::invalid(
                "errors",
                format!(
                    "has {} entries; at most {MAX_ERRORS_PER_UPDATE} per update",
                    input.errors.len()
                ),
            ));
        }
        for (i, entry) in input.errors.iter().enumerate() {
            check_error_entry(i, entry)?;
        }
        for (field, value) in [
            ("output_file_id", &input.output_file_id),
            ("error_file_id", &input.error_file_id),
            ("model", &input.model),
        ] {
            if let Some(value) = value {
                check_identifier(field, value)?;
            }
        }
        Ok(BatchUpdate(input))
    }
}

fn check_request_counts(counts: RequestCounts) -> Result<()> {
    for (name, value) in [
        ("total", counts.total),
        ("completed", counts.completed),
        ("failed", counts.failed),
    ] {
        if value < 0 {
            return Err(Error::invalid(
                format!("request_counts.{name}"),
                format!("{value} is negative"),
            ));
        }
    }
    // `checked_add`: a sum past i64::MAX is no count either, and must not wrap or
    // saturate into passing the invariant.
    if counts
        .completed
        .checked_add(counts.failed)
        .is_none_or(|done| done > counts.total)
    {
        return Err(Error::invalid(
            "request_counts",
            format!(
                "completed ({}) + failed ({}) exceeds total ({})",
                counts.completed, counts.failed, counts.total
            ),
        ));
    }
    Ok(())
}

fn check_usage(usage: Usage) -> Result<()> {
    for (name, value) in [
        ("input_tokens", usage.input_tokens),
        ("input_tokens_details.cached_tokens", usage.cached_tokens),
        ("output_tokens", usage.output_tokens),
        (
            "output_tokens_details.reasoning_tokens",
            usage.reasoning_tokens,
        ),
        ("total_tokens", usage.total_tokens),
    ] {
        if value < 0 {
            return Err(Error::invalid(
                format!("usage.{name}"),
                format!("{value} is negative"),
            ));
        }
    }
    if usage.cached_tokens > usage.input_tokens {
        return Err(Error::invalid(
            "usage.input_tokens_details.cached_tokens",
            format!(
                "{} exceeds input_tokens ({})",
                usage.cached_tokens, usage.input_tokens
            ),
        ));
    }
    if usage.reasoning_tokens > usage.output_tokens {
        return Err(Error::invalid(
            "usage.output_tokens_details.reasoning_tokens",
            format!(
                "{} exceeds output_tokens ({})",
                usage.reasoning_tokens, usage.output_tokens
            ),
        ));
    }
    if usage.input_tokens.checked_add(usage.output_tokens) != Some(usage.total_tokens) {
        return Err(Error::invalid(
            "usage.total_tokens",
            format!(
                "{} is not input_tokens + output_tokens ({} + {})",
                usage.total_tokens, usage.input_tokens, usage.output_tokens
            ),
        ));
    }
    Ok(())
}

fn check_error_entry(index: usize, entry: &BatchErrorEntry) -> Result<()> {
    check_text(
        &format!("errors[{index}].code"),
        &entry.code,
        MAX_ERROR_CODE_CHARS,
        false,
    )?;
    check_text(
        &format!("errors[{index}].message"),
        &entry.message,
        MAX_ERROR_MESSAGE_CHARS,
        false,
    )?;
    if let Some(line) = entry.line.filter(|&l| l < 0) {
        return Err(Error::invalid(
            format!("errors[{index}].line"),
            format!("{line} is negative"),
        ));
    }
    if let Some(param) = &entry.param {
        check_text(&format!("errors[{index}].param"), param, MAX_ID_CHARS, true)?;
    }
    Ok(())
}

/// Default page size of a list.
const DEFAULT_LIST_LIMIT: i64 = 20;
/// Largest page size of a list.
const MAX_LIST_LIMIT: i64 = 100;

/// Most metadata pairs one list may filter on.
pub const MAX_METADATA_FILTERS: usize = 4;

/// The order of a list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ListOrder {
    /// Newest first (the default, as OpenAI lists).
    #[default]
    NewestFirst,
    /// Oldest first.
    OldestFirst,
}

impl ListOrder {
    /// Parses `desc` or `asc`.
    pub fn parse(text: &str) -> Result<ListOrder> {
        match text {
            "desc" => Ok(ListOrder::NewestFirst),
            "asc" => Ok(ListOrder::OldestFirst),
            other => Err(Error::invalid(
                "order",
                format!(
                    "`{}` is not an order; use `asc` or `desc`",
                    truncate_for_message(other)
                ),
            )),
        }
    }
}

/// A list request, in the two forms that share this one declaration of its fields:
/// [`ListBatchesInput`] as the transports receive it, and [`ListBatches`] once
/// [`ListBatches::parse`] has checked every field. The three fields whose checked form
/// differs from what clients send are the type parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListRequest<Cursor, Limit, Order> {
    /// Cursor: the id of the last batch of the previous page.
    pub after: Option<Cursor>,
    /// Page size, 1..=100; 20 when the client sends none.
    pub limit: Limit,
    /// Only batches in one of these statuses (none: any status); distinct once checked.
    pub statuses: Vec<BatchStatus>,
    /// Only batches of this job.
    pub job_id: Option<String>,
    /// Only batches created at or after this time.
    pub created_after: Option<UnixSeconds>,
    /// Only batches created before this time.
    pub created_before: Option<UnixSeconds>,
    /// Only batches whose metadata has each of these pairs; distinct keys once checked.
    pub metadata: Vec<(String, String)>,
    /// The order of the page: `asc` or `desc` (the default) as clients send it.
    pub order: Order,
    /// Only batches marked stalled now (`true`), or only the others (`false`).
    pub stalled: Option<bool>,
}

/// A list request as the transports receive it.
pub type ListBatchesInput = ListRequest<String, Option<i64>, Option<String>>;

/// A validated list request.
pub type ListBatches = ListRequest<BatchId, i64, ListOrder>;

impl ListBatches {
    /// Validates a list request.
    pub fn parse(input: ListBatchesInput) -> Result<ListBatches> {
        let limit = input.limit.unwrap_or(DEFAULT_LIST_LIMIT);
        if !(1..=MAX_LIST_LIMIT).contains(&limit) {
            return Err(Error::invalid(
                "limit",
                format!("{limit} is out of range; use 1 to {MAX_LIST_LIMIT}"),
            ));
        }
        let mut statuses = input.statuses;
        statuses.sort_by_key(|s| s.as_str());
        statuses.dedup();
        for (name, value) in [
            ("created_after", input.created_after),
            ("created_before", input.created_before),
        ] {
            if let Some(value) = value.filter(|&v| v < 0) {
                return Err(Error::invalid(
                    name,
                    format!("{value} is not a Unix time (seconds since 1970)"),
                ));
            }
        }
        if input.metadata.len() > MAX_METADATA_FILTERS {
            return Err(Error::invalid(
                "metadata",
                format!(
                    "filters on {} pairs; at most {MAX_METADATA_FILTERS} per list",
                    input.metadata.len()
                ),
            ));
        }
        let mut metadata = input.metadata;
        metadata.sort();
        metadata.dedup();
        if metadata.windows(2).any(|pair| pair[0].0 == pair[1].0) {
            return Err(Error::invalid(
                "metadata",
                "names the same key twice with different values; no batch can match",
            ));
        }
        // The same limits as stored metadata: a filter that no stored pair could match
        // is a mistake, and the text reaches SQL.
        check_metadata(&metadata.iter().cloned().collect())?;
        let after = input
            .after
            .map(|a| BatchId::parse("after", &a))
            .transpose()?;
        if let Some(job_id) = &input.job_id {
            check_identifier("job_id", job_id)?;
        }
        Ok(ListBatches {
            after,
            limit,
            statuses,
            job_id: input.job_id,
            created_after: input.created_after,
            created_before: input.created_before,
            metadata,
            order: input
                .order
                .as_deref()
                .map(ListOrder::parse)
                .transpose()?
                .unwrap_or_default(),
            stalled: input.stalled,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::fmt;

    use super::*;

    fn create(edit: impl FnOnce(&mut CreateBatchInput)) -> Result<NewBatch> {
        let mut input = CreateBatchInput {
            input_file_id: "file-abc".into(),
            endpoint: "/v1/chat/completions".into(),
            completion_window: "24h".into(),
            ..Default::default()
        };
        edit(&mut input);
        NewBatch::parse(input, &BatchPolicy::default())
    }

    fn field_of(result: Result<impl fmt::Debug>) -> String {
        match result.unwrap_err() {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn generated_ids_are_well_formed_and_distinct() {
        let a = BatchId::generate();
        let b = BatchId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), "batch_".len() + 32);
        assert_eq!(BatchId::parse("batch_id", a.as_str()).unwrap(), a);
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in [
            "",
            "batch_",
            "batch-123",
            "file_123",
            "batch_a b",
            "batch_../x",
        ] {
            assert_eq!(
                field_of(BatchId::parse("batch_id", bad)),
                "batch_id",
                "{bad}"
            );
        }
        let too_long = format!("batch_{}", "a".repeat(65));
        assert!(BatchId::parse("batch_id", &too_long).is_err());
    }

    #[test]
    fn create_checks_every_field_and_names_it() {
        assert!(create(|_| {}).is_ok());
        assert_eq!(
            field_of(create(|i| i.input_file_id.clear())),
            "input_file_id"
        );
        assert_eq!(
            field_of(create(|i| i.endpoint = "/v1/audio/speech".into())),
            "endpoint"
        );
        assert_eq!(
            field_of(create(|i| i.completion_window = "72h".into())),
            "completion_window"
        );
        assert_eq!(
            field_of(create(|i| i.job_id = Some(String::new()))),
            "job_id"
        );
        assert_eq!(
            field_of(create(|i| i.remark = Some("x".repeat(2_000)))),
            "remark"
        );
    }

    #[test]
    fn metadata_limits_are_the_documented_ones() {
        let pairs = |n: usize| (0..n).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(create(|i| i.metadata = Some(pairs(16))).is_ok());
        assert_eq!(
            field_of(create(|i| i.metadata = Some(pairs(17)))),
            "metadata"
        );
        let one = |k: String, v: String| Some(BTreeMap::from([(k, v)]));
        assert!(create(|i| i.metadata = one("k".repeat(64), "v".repeat(512))).is_ok());
        assert_eq!(
            field_of(create(|i| i.metadata = one("k".repeat(65), "v".into()))),
            "metadata"
        );
        assert_eq!(
            field_of(create(|i| i.metadata = one("k".into(), "v".repeat(513)))),
            "metadata.k"
        );
    }

    #[test]
    fn list_limit_must_be_between_1_and_100() {
        let list = |limit| {
            ListBatches::parse(ListBatchesInput {
                limit: Some(limit),
                ..Default::default()
            })
        };
        assert_eq!(field_of(list(0)), "limit");
        assert_eq!(field_of(list(1000)), "limit");
        assert_eq!(field_of(list(-1)), "limit");
        assert_eq!(list(100).unwrap().limit, 100);
        assert_eq!(ListBatches::parse(Default::default()).unwrap().limit, 20);
    }

    #[test]
    fn update_checks_counts_usage_and_errors() {
        let update = |edit: fn(&mut BatchUpdateInput)| {
            let mut input = BatchUpdateInput::default();
            edit(&mut input);
            BatchUpdate::parse(input)
        };
        assert_eq!(
            field_of(update(|u| u.request_counts = Some(RequestCounts {
                total: 1,
                completed: -1,
                failed: 0
            }))),
            "request_counts.completed"
        );
        assert_eq!(
            field_of(update(|u| u.request_counts = Some(RequestCounts {
                total: 1,
                completed: 1,
                failed: 1
            }))),
            "request_counts"
        );
        assert_eq!(
            field_of(update(|u| u.usage = Some(Usage {
                input_tokens: 1,
                output_tokens: 1,
                total_tokens: 3,
                ..Default::default()
            }))),
            "usage.total_tokens"
        );
        assert_eq!(
            field_of(update(|u| u.errors = vec![BatchErrorEntry {
                code: "bad_line".into(),
                line: Some(3),
                message: String::new(),
                param: None
            }])),
            "errors[0].message"
        );
        assert_eq!(
            field_of(update(|u| u.expected_version = Some(0))),
            "expected_version"
        );
    }

    #[test]
    fn text_a_store_cannot_keep_is_refused_naming_the_field() {
        let nul = "a\0b".to_owned();
        assert_eq!(field_of(create(|i| i.remark = Some(nul.clone()))), "remark");
        assert_eq!(field_of(create(|i| i.job_id = Some(nul.clone()))), "job_id");
        assert_eq!(
            field_of(create(|i| i.input_file_id = nul.clone())),
            "input_file_id"
        );
        let one = |k: &str, v: &str| Some(BTreeMap::from([(k.to_owned(), v.to_owned())]));
        assert_eq!(
            field_of(create(|i| i.metadata = one("a\0", "v"))),
            "metadata"
        );
        assert_eq!(
            field_of(create(|i| i.metadata = one("k", "a\0"))),
            "metadata.k"
        );
        let entry = |code: &str, message: &str, param: Option<&str>| BatchUpdateInput {
            errors: vec![BatchErrorEntry {
                code: code.into(),
                line: None,
                message: message.into(),
                param: param.map(str::to_owned),
            }],
            ..Default::default()
        };
        for (input, field) in [
            (entry("a\0", "m", None), "errors[0].code"),
            (entry("c", "a\0", None), "errors[0].message"),
            (entry("c", "m", Some("a\0")), "errors[0].param"),
            (
                BatchUpdateInput {
                    model: Some(nul.clone()),
                    ..Default::default()
                },
                "model",
            ),
        ] {
            assert_eq!(field_of(BatchUpdate::parse(input)), field);
        }
    }

    #[test]
    fn output_expires_after_is_checked_as_openai_checks_it() {
        let expiry = |anchor: &str, seconds| {
            create(|i| i.output_expires_after = Some((anchor.to_owned(), seconds)))
        };
        for seconds in [3_600, 86_400, 2_592_000] {
            let new = expiry("created_at", seconds).unwrap();
            assert_eq!(new.output_expires_after.unwrap().seconds, seconds);
        }
        for seconds in [3_599, 2_592_001, 0, -1, i64::MAX] {
            assert_eq!(
                field_of(expiry("created_at", seconds)),
                "output_expires_after.seconds"
            );
        }
        assert_eq!(
            field_of(expiry("completed_at", 3_600)),
            "output_expires_after.anchor"
        );
    }

    #[test]
    fn counts_whose_sum_overflows_are_refused() {
        let counts = RequestCounts {
            total: i64::MAX,
            completed: i64::MAX,
            failed: 1,
        };
        let input = BatchUpdateInput {
            request_counts: Some(counts),
            ..Default::default()
        };
        assert_eq!(field_of(BatchUpdate::parse(input)), "request_counts");
        let full = RequestCounts {
            total: i64::MAX,
            completed: i64::MAX - 1,
            failed: 1,
        };
        assert!(
            BatchUpdate::parse(BatchUpdateInput {
                request_counts: Some(full),
                ..Default::default()
            })
            .is_ok()
        );
    }

    #[test]
    fn completion_windows_parse_as_durations() {
        assert_eq!(CompletionWindow::parse("24h").unwrap().seconds, 86_400);
        assert!(CompletionWindow::parse("soon").is_err());
        assert!(CompletionWindow::parse("0s").is_err());
    }
}
