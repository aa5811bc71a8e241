//! How a batch is stored: the one storage mapping of [`Batch`]. The same type is a
//! row of `batches` (each field a column) and the snapshot of one version in
//! `batch_events` (JSON). It belongs to the store, not the domain: renaming a field of
//! [`Batch`] changes the conversions here, never what is on disk, so events written by
//! any earlier batchd still read.
//!
//! The JSON shape is frozen as version 1; a field added later must be optional
//! (`Option`, absent in older events). A change that cannot be read that way needs a
//! `StoredBatchV2` and a reader of both.
//!
//! Adding a field to a batch touches, here: the field of [`StoredBatchV1`], its line in
//! [`StoredBatchV1::COLUMNS`], [`StoredBatchV1::POSTGRES_FROM_JSON`] and [`push_values`],
//! and the two conversions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::query_builder::Separated;
use sqlx::types::Json;
use sqlx::{Database, Encode, FromRow, Type};

use crate::domain::with_batch_fields;
use crate::domain::{
    Batch, BatchErrorEntry, BatchId, BatchStatus, ExpiryAnchor, OutputExpiresAfter,
    ProgressEstimate, RequestCounts, Usage,
};
use crate::error::{Error, Result};

/// A batch as stored, version 1 of the event snapshot's JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, FromRow)]
pub(super) struct StoredBatchV1 {
    id: String,
    endpoint: String,
    /// `NULL` in the column when there are none; always a list in JSON.
    #[sqlx(json(nullable))]
    #[serde(default, serialize_with = "errors_as_list")]
    errors: Option<Vec<StoredErrorV1>>,
    input_file_id: String,
    completion_window: String,
    status: String,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    created_at: i64,
    in_progress_at: Option<i64>,
    expires_at: Option<i64>,
    finalizing_at: Option<i64>,
    completed_at: Option<i64>,
    failed_at: Option<i64>,
    expired_at: Option<i64>,
    cancelling_at: Option<i64>,
    cancelled_at: Option<i64>,
    #[sqlx(flatten)]
    request_counts: StoredCountsV1,
    #[sqlx(json(nullable))]
    metadata: Option<BTreeMap<String, String>>,
    model: Option<String>,
    #[sqlx(json(nullable))]
    usage: Option<StoredUsageV1>,
    job_id: Option<String>,
    remark: Option<String>,
    #[sqlx(json(nullable))]
    output_expires_after: Option<StoredExpiryV1>,
    user_id: String,
    api_key_id: String,
    version: i64,
    updated_at: Option<i64>,
    // Added after version 1 (issue 29): absent from older events and, when unset, from
    // newer ones, so that a version-1 snapshot reads the same bytes as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stalled_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    progress_rate_milli: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    progress_sampled_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    progress_sampled_done: Option<i64>,
}

/// `request_counts`: a JSON object, three columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, FromRow)]
pub(super) struct StoredCountsV1 {
    #[sqlx(rename = "request_total")]
    total: i64,
    #[sqlx(rename = "request_completed")]
    completed: i64,
    #[sqlx(rename = "request_failed")]
    failed: i64,
}

/// One entry of `errors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StoredErrorV1 {
    code: String,
    line: Option<i64>,
    message: String,
    param: Option<String>,
}

/// `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StoredUsageV1 {
    input_tokens: i64,
    cached_tokens: i64,
    output_tokens: i64,
    reasoning_tokens: i64,
    total_tokens: i64,
}

/// `output_expires_after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StoredExpiryV1 {
    anchor: String,
    seconds: i64,
}

/// Version 1 always wrote `errors` as a list (`[]` for none); readers of that version
/// expect one.
fn errors_as_list<S: serde::Serializer>(
    errors: &Option<Vec<StoredErrorV1>>,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    serializer.collect_seq(errors.iter().flatten())
}

impl StoredBatchV1 {
    /// The columns of `batches` that hold a batch, in the order of [`push_values`].
    pub(super) const COLUMNS: [&'static str; 34] = [
        "id",
        "endpoint",
        "errors",
        "input_file_id",
        "completion_window",
        "status",
        "output_file_id",
        "error_file_id",
        "created_at",
        "in_progress_at",
        "expires_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
        "request_total",
        "request_completed",
        "request_failed",
        "metadata",
        "model",
        "usage",
        "job_id",
        "remark",
        "output_expires_after",
        "user_id",
        "api_key_id",
        "version",
        "updated_at",
        "stalled_at",
        "progress_rate_milli",
        "progress_sampled_at",
        "progress_sampled_done",
    ];

    /// Each of [`StoredBatchV1::COLUMNS`], in order, as a PostgreSQL expression over
    /// `s`, this type's JSON (`jsonb`): a round of changes is sent as one array of
    /// snapshots, each of which sets a row and is its event. Exactly the values
    /// [`push_values`] binds: no errors are `NULL` (the JSON has `[]`), an absent
    /// object is `NULL` (the JSON has `null`).
    pub(super) const POSTGRES_FROM_JSON: [&'static str; 34] = [
        "s ->> 'id'",
        "s ->> 'endpoint'",
        "NULLIF(s -> 'errors', '[]'::jsonb)",
        "s ->> 'input_file_id'",
        "s ->> 'completion_window'",
        "s ->> 'status'",
        "s ->> 'output_file_id'",
        "s ->> 'error_file_id'",
        "(s ->> 'created_at')::bigint",
        "(s ->> 'in_progress_at')::bigint",
        "(s ->> 'expires_at')::bigint",
        "(s ->> 'finalizing_at')::bigint",
        "(s ->> 'completed_at')::bigint",
        "(s ->> 'failed_at')::bigint",
        "(s ->> 'expired_at')::bigint",
        "(s ->> 'cancelling_at')::bigint",
        "(s ->> 'cancelled_at')::bigint",
        "(s -> 'request_counts' ->> 'total')::bigint",
        "(s -> 'request_counts' ->> 'completed')::bigint",
        "(s -> 'request_counts' ->> 'failed')::bigint",
        "NULLIF(s -> 'metadata', 'null'::jsonb)",
        "s ->> 'model'",
        "NULLIF(s -> 'usage', 'null'::jsonb)",
        "s ->> 'job_id'",
        "s ->> 'remark'",
        "NULLIF(s -> 'output_expires_after', 'null'::jsonb)",
        "s ->> 'user_id'",
        "s ->> 'api_key_id'",
        "(s ->> 'version')::bigint",
        "(s ->> 'updated_at')::bigint",
        "(s ->> 'stalled_at')::bigint",
        "(s ->> 'progress_rate_milli')::bigint",
        "(s ->> 'progress_sampled_at')::bigint",
        "(s ->> 'progress_sampled_done')::bigint",
    ];

    /// The batch's id.
    pub(super) fn id(&self) -> &str {
        &self.id
    }

    /// The batch's owner.
    pub(super) fn owner(&self) -> &str {
        &self.user_id
    }

    /// The version this is.
    pub(super) fn version(&self) -> i64 {
        self.version
    }

    /// Whether the client gave metadata (which the list's metadata filter indexes).
    pub(super) fn has_metadata(&self) -> bool {
        self.metadata.is_some()
    }

    /// When this version was committed: its change, or its creation.
    pub(super) fn committed_at(&self) -> i64 {
        self.updated_at.unwrap_or(self.created_at)
    }
}

/// Binds the value of every column of [`StoredBatchV1::COLUMNS`], in order. Both of
/// batchd's databases encode these types; `SqlDatabase::push_batch` calls this for
/// each, so that shared code needs no bound of its own.
pub(super) fn push_values<DB>(stored: &StoredBatchV1, values: &mut Separated<'_, DB, &str>)
where
    DB: Database,
    for<'a> &'a String: Encode<'a, DB> + Type<DB>,
    for<'a> &'a Option<String>: Encode<'a, DB> + Type<DB>,
    i64: for<'q> Encode<'q, DB> + Type<DB>,
    Option<i64>: for<'q> Encode<'q, DB> + Type<DB>,
    for<'a> Option<Json<&'a Vec<StoredErrorV1>>>: Encode<'a, DB> + Type<DB>,
    for<'a> Option<Json<&'a BTreeMap<String, String>>>: Encode<'a, DB> + Type<DB>,
    for<'a> Option<Json<&'a StoredUsageV1>>: Encode<'a, DB> + Type<DB>,
    for<'a> Option<Json<&'a StoredExpiryV1>>: Encode<'a, DB> + Type<DB>,
{
    let s = stored;
    values
        .push_bind(&s.id)
        .push_bind(&s.endpoint)
        .push_bind(s.errors.as_ref().map(Json))
        .push_bind(&s.input_file_id)
        .push_bind(&s.completion_window)
        .push_bind(&s.status)
        .push_bind(&s.output_file_id)
        .push_bind(&s.error_file_id)
        .push_bind(s.created_at)
        .push_bind(s.in_progress_at)
        .push_bind(s.expires_at)
        .push_bind(s.finalizing_at)
        .push_bind(s.completed_at)
        .push_bind(s.failed_at)
        .push_bind(s.expired_at)
        .push_bind(s.cancelling_at)
        .push_bind(s.cancelled_at)
        .push_bind(s.request_counts.total)
        .push_bind(s.request_counts.completed)
        .push_bind(s.request_counts.failed)
        .push_bind(s.metadata.as_ref().map(Json))
        .push_bind(&s.model)
        .push_bind(s.usage.as_ref().map(Json))
        .push_bind(&s.job_id)
        .push_bind(&s.remark)
        .push_bind(s.output_expires_after.as_ref().map(Json))
        .push_bind(&s.user_id)
        .push_bind(&s.api_key_id)
        .push_bind(s.version)
        .push_bind(s.updated_at)
        .push_bind(s.stalled_at)
        .push_bind(s.progress_rate_milli)
        .push_bind(s.progress_sampled_at)
        .push_bind(s.progress_sampled_done);
}

impl From<&Batch> for StoredBatchV1 {
    fn from(b: &Batch) -> StoredBatchV1 {
        with_batch_fields!(
            StoredBatchV1 {
                id: b.id.as_str().to_owned(),
                errors: (!b.errors.is_empty()).then(|| {
                    b.errors
                        .iter()
                        .map(|e| StoredErrorV1 {
                            code: e.code.clone(),
                            line: e.line,
                            message: e.message.clone(),
                            param: e.param.clone(),
                        })
                        .collect()
                }),
                status: b.status.as_str().to_owned(),
                request_counts: StoredCountsV1 {
                    total: b.request_counts.total,
                    completed: b.request_counts.completed,
                    failed: b.request_counts.failed,
                },
                metadata: b.metadata.clone(),
                usage: b.usage.map(|u| StoredUsageV1 {
                    input_tokens: u.input_tokens,
                    cached_tokens: u.cached_tokens,
                    output_tokens: u.output_tokens,
                    reasoning_tokens: u.reasoning_tokens,
                    total_tokens: u.total_tokens,
                }),
                output_expires_after: b.output_expires_after.map(|e| StoredExpiryV1 {
                    anchor: e.anchor.as_str().to_owned(),
                    seconds: e.seconds,
                }),
                progress_rate_milli: b.progress.and_then(|p| p.rate_milli),
                progress_sampled_at: b.progress.map(|p| p.sampled_at),
                progress_sampled_done: b.progress.map(|p| p.sampled_done),
            },
            cloned from b
        )
    }
}

impl TryFrom<StoredBatchV1> for Batch {
    type Error = Error;

    /// Fails only on data no batchd wrote: a bug or a hand-edited database.
    fn try_from(s: StoredBatchV1) -> Result<Batch> {
        let corrupt = |what: &str| Error::Internal(format!("stored batch `{}`: bad {what}", s.id));
        let status = BatchStatus::from_name(&s.status).ok_or_else(|| corrupt("status"))?;
        let id = BatchId::parse("id", &s.id).map_err(|_| corrupt("id"))?;
        let output_expires_after = match &s.output_expires_after {
            None => None,
            Some(e) => Some(OutputExpiresAfter {
                anchor: ExpiryAnchor::from_name(&e.anchor).ok_or_else(|| corrupt("anchor"))?,
                seconds: e.seconds,
            }),
        };
        Ok(with_batch_fields!(
            Batch {
                id,
                errors: s
                    .errors
                    .unwrap_or_default()
                    .into_iter()
                    .map(|e| BatchErrorEntry {
                        code: e.code,
                        line: e.line,
                        message: e.message,
                        param: e.param,
                    })
                    .collect(),
                status,
                request_counts: RequestCounts {
                    total: s.request_counts.total,
                    completed: s.request_counts.completed,
                    failed: s.request_counts.failed,
                },
                metadata: s.metadata,
                usage: s.usage.map(|u| Usage {
                    input_tokens: u.input_tokens,
                    cached_tokens: u.cached_tokens,
                    output_tokens: u.output_tokens,
                    reasoning_tokens: u.reasoning_tokens,
                    total_tokens: u.total_tokens,
                }),
                output_expires_after,
                progress: match (s.progress_sampled_at, s.progress_sampled_done) {
                    (Some(sampled_at), Some(sampled_done)) => Some(ProgressEstimate {
                        rate_milli: s.progress_rate_milli,
                        sampled_at,
                        sampled_done,
                    }),
                    _ => None,
                },
            },
            from s
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::fixtures;

    /// An event as batchd wrote it before this type existed (the domain type's own
    /// serde shape at the time), every field set.
    const WRITTEN_BEFORE: &str = r#"{"id":"batch_0123456789abcdef0123456789abcdef","endpoint":"/v1/chat/completions","errors":[{"code":"bad_line","line":3,"message":"no \"model\"","param":"body.model"}],"input_file_id":"file-1","completion_window":"24h","status":"completed","output_file_id":"file-out","error_file_id":"file-err","created_at":1700000000,"in_progress_at":1700000010,"expires_at":1700086400,"finalizing_at":1700000020,"completed_at":1700000030,"failed_at":null,"expired_at":null,"cancelling_at":null,"cancelled_at":null,"request_counts":{"total":10,"completed":9,"failed":1},"metadata":{"team":"ml"},"model":"gpt-4o","usage":{"input_tokens":5,"cached_tokens":1,"output_tokens":7,"reasoning_tokens":2,"total_tokens":12},"job_id":"job-7","remark":"nightly","output_expires_after":{"anchor":"created_at","seconds":3600},"user_id":"tenant","api_key_id":"key_6b02b15a6c911a71dd9cedbe","version":4,"updated_at":1700000030}"#;

    /// The batch `WRITTEN_BEFORE` holds.
    fn every_field_set() -> Batch {
        let mut b = fixtures::batch();
        b.id = BatchId::parse("id", "batch_0123456789abcdef0123456789abcdef").unwrap();
        b.errors = vec![BatchErrorEntry {
            code: "bad_line".into(),
            line: Some(3),
            message: "no \"model\"".into(),
            param: Some("body.model".into()),
        }];
        b.status = BatchStatus::Completed;
        b.output_file_id = Some("file-out".into());
        b.error_file_id = Some("file-err".into());
        b.in_progress_at = Some(1_700_000_010);
        b.finalizing_at = Some(1_700_000_020);
        b.completed_at = Some(1_700_000_030);
        b.request_counts = RequestCounts {
            total: 10,
            completed: 9,
            failed: 1,
        };
        b.metadata = Some([("team".to_owned(), "ml".to_owned())].into());
        b.model = Some("gpt-4o".into());
        b.usage = Some(Usage {
            input_tokens: 5,
            cached_tokens: 1,
            output_tokens: 7,
            reasoning_tokens: 2,
            total_tokens: 12,
        });
        b.job_id = Some("job-7".into());
        b.remark = Some("nightly".into());
        b.output_expires_after = Some(OutputExpiresAfter {
            anchor: ExpiryAnchor::CreatedAt,
            seconds: 3600,
        });
        b.api_key_id = "key_6b02b15a6c911a71dd9cedbe".into();
        b.version = 4;
        b.updated_at = Some(1_700_000_030);
        b
    }

    #[test]
    fn an_event_written_by_an_earlier_batchd_reads_back_whole() {
        let stored: StoredBatchV1 = serde_json::from_str(WRITTEN_BEFORE).unwrap();
        assert_eq!(Batch::try_from(stored).unwrap(), every_field_set());
    }

    /// Replicas of the previous release read what this one writes during a rolling
    /// upgrade: the JSON is byte for byte what they wrote themselves.
    #[test]
    fn events_are_written_in_the_version_1_shape() {
        let stored = StoredBatchV1::from(&every_field_set());
        assert_eq!(serde_json::to_string(&stored).unwrap(), WRITTEN_BEFORE);
        let no_errors = StoredBatchV1::from(&fixtures::batch());
        let json: serde_json::Value = serde_json::to_value(&no_errors).unwrap();
        assert_eq!(json["errors"], serde_json::json!([]));
    }

    /// `output_expires_after` was added after the first events were written: an event
    /// without it reads, with the field absent. Every later optional field does too.
    #[test]
    fn an_event_written_before_a_field_was_added_still_reads() {
        let mut older: serde_json::Value = serde_json::from_str(WRITTEN_BEFORE).unwrap();
        older
            .as_object_mut()
            .unwrap()
            .remove("output_expires_after");
        let stored: StoredBatchV1 = serde_json::from_value(older).unwrap();
        let batch = Batch::try_from(stored).unwrap();
        assert_eq!(batch.output_expires_after, None);
        assert_eq!(
            batch,
            Batch {
                output_expires_after: None,
                ..every_field_set()
            }
        );
    }

    #[test]
    fn every_column_gets_one_value() {
        let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new("VALUES (");
        push_values(
            &StoredBatchV1::from(&every_field_set()),
            &mut insert.separated(", "),
        );
        let sql = insert.sql();
        let placeholders = sql.as_str().matches('?').count() + sql.as_str().matches('$').count();
        assert_eq!(placeholders, StoredBatchV1::COLUMNS.len());
    }
}
