//! Conversions between the protobuf messages and the domain, and the one mapping of
//! [`Error`] to a gRPC status.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::with_batch_fields;
use crate::domain::{
    Batch, BatchErrorEntry, BatchStatus, BatchUpdateInput, CreateBatchInput, ListBatchesInput,
    RequestCounts, Usage, WatchBatchesInput,
};
use crate::error::{Error, Result};
use crate::proto::batchd::v1 as pb;
use crate::service::BatchPage;
use crate::watch::{FeedEvent, FeedEventKind, WatchEvent, WatchEventKind};

impl From<Error> for Status {
    /// Every variant picks its canonical code; no catch-all arm, so a new variant does
    /// not build until it has one.
    fn from(error: Error) -> Status {
        error.log_detail();
        let code = match &error {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied { .. } => Code::PermissionDenied,
            Error::BatchNotFound(_) | Error::ApiKeyNotFound(_) | Error::NotFound { .. } => {
                Code::NotFound
            }
            Error::IllegalTransition { .. }
            | Error::FailedPrecondition(_)
            | Error::FeedCompacted { .. } => Code::FailedPrecondition,
            Error::VersionMismatch { .. } | Error::Contended(_) => Code::Aborted,
            Error::IdempotencyKeyReused(_) => Code::AlreadyExists,
            Error::TooManyWatches { .. }
            | Error::RateLimited { .. }
            | Error::ActiveBatchLimit { .. } => Code::ResourceExhausted,
            Error::Unavailable(_) | Error::ShuttingDown => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        };
        match &error {
            // The standard detail gRPC clients read when to retry from (`RetryInfo`),
            // and the whole seconds as metadata for clients that read only that.
            Error::RateLimited { retry_after, .. } => {
                let details = ErrorDetails::with_retry_info(Some(*retry_after));
                let mut status = Status::with_error_details(code, error.to_string(), details);
                let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                status.metadata_mut().insert("retry-after", seconds.into());
                status
            }
            _ => Status::new(code, error.to_string()),
        }
    }
}

impl From<BatchStatus> for pb::BatchStatus {
    fn from(status: BatchStatus) -> pb::BatchStatus {
        match status {
            BatchStatus::Validating => pb::BatchStatus::Validating,
            BatchStatus::Failed => pb::BatchStatus::Failed,
            BatchStatus::InProgress => pb::BatchStatus::InProgress,
            BatchStatus::Finalizing => pb::BatchStatus::Finalizing,
            BatchStatus::Completed => pb::BatchStatus::Completed,
            BatchStatus::Expired => pb::BatchStatus::Expired,
            BatchStatus::Cancelling => pb::BatchStatus::Cancelling,
            BatchStatus::Cancelled => pb::BatchStatus::Cancelled,
        }
    }
}

/// The domain status of a wire enum value; unset and unknown values are refused.
fn status_from_proto(field: &str, value: i32) -> Result<BatchStatus> {
    let status = match pb::BatchStatus::try_from(value) {
        Ok(pb::BatchStatus::Validating) => BatchStatus::Validating,
        Ok(pb::BatchStatus::Failed) => BatchStatus::Failed,
        Ok(pb::BatchStatus::InProgress) => BatchStatus::InProgress,
        Ok(pb::BatchStatus::Finalizing) => BatchStatus::Finalizing,
        Ok(pb::BatchStatus::Completed) => BatchStatus::Completed,
        Ok(pb::BatchStatus::Expired) => BatchStatus::Expired,
        Ok(pb::BatchStatus::Cancelling) => BatchStatus::Cancelling,
        Ok(pb::BatchStatus::Cancelled) => BatchStatus::Cancelled,
        Ok(pb::BatchStatus::Unspecified) => {
            return Err(Error::invalid(
                field,
                "BATCH_STATUS_UNSPECIFIED is not a status; omit the field instead",
            ));
        }
        Err(_) => {
            return Err(Error::invalid(
                field,
                format!("{value} is not a BatchStatus value"),
            ));
        }
    };
    Ok(status)
}

impl From<Batch> for pb::Batch {
    fn from(b: Batch) -> pb::Batch {
        let (progress_rate, estimated_completion_at) =
            (b.progress_rate(), b.estimated_completion_at());
        with_batch_fields!(
            pb::Batch {
                id: b.id.to_string(),
                object: "batch".into(),
                errors: (!b.errors.is_empty()).then(|| pb::BatchErrors {
                    object: "list".into(),
                    data: b.errors.into_iter().map(pb::BatchError::from).collect(),
                }),
                status: pb::BatchStatus::from(b.status).into(),
                request_counts: Some(b.request_counts.into()),
                metadata: b.metadata.unwrap_or_default().into_iter().collect(),
                usage: b.usage.map(pb::Usage::from),
                output_expires_after: b.output_expires_after.map(|e| pb::OutputExpiresAfter {
                    anchor: e.anchor.as_str().to_owned(),
                    seconds: e.seconds,
                }),
                progress_rate,
                estimated_completion_at,
            },
            from b
        )
    }
}

impl From<BatchErrorEntry> for pb::BatchError {
    fn from(e: BatchErrorEntry) -> pb::BatchError {
        pb::BatchError {
            code: e.code,
            line: e.line,
            message: e.message,
            param: e.param,
        }
    }
}

impl From<pb::BatchError> for BatchErrorEntry {
    fn from(e: pb::BatchError) -> BatchErrorEntry {
        BatchErrorEntry {
            code: e.code,
            line: e.line,
            message: e.message,
            param: e.param,
        }
    }
}

impl From<RequestCounts> for pb::RequestCounts {
    fn from(c: RequestCounts) -> pb::RequestCounts {
        pb::RequestCounts {
            total: c.total,
            completed: c.completed,
            failed: c.failed,
        }
    }
}

impl From<pb::RequestCounts> for RequestCounts {
    fn from(c: pb::RequestCounts) -> RequestCounts {
        RequestCounts {
            total: c.total,
            completed: c.completed,
            failed: c.failed,
        }
    }
}

impl From<Usage> for pb::Usage {
    fn from(u: Usage) -> pb::Usage {
        pb::Usage {
            input_tokens: u.input_tokens,
            input_tokens_details: Some(pb::InputTokensDetails {
                cached_tokens: u.cached_tokens,
            }),
            output_tokens: u.output_tokens,
            output_tokens_details: Some(pb::OutputTokensDetails {
                reasoning_tokens: u.reasoning_tokens,
            }),
            total_tokens: u.total_tokens,
        }
    }
}

impl From<pb::Usage> for Usage {
    fn from(u: pb::Usage) -> Usage {
        Usage {
            input_tokens: u.input_tokens,
            cached_tokens: u.input_tokens_details.map_or(0, |d| d.cached_tokens),
            output_tokens: u.output_tokens,
            reasoning_tokens: u.output_tokens_details.map_or(0, |d| d.reasoning_tokens),
            total_tokens: u.total_tokens,
        }
    }
}

impl From<pb::CreateBatchRequest> for CreateBatchInput {
    fn from(r: pb::CreateBatchRequest) -> CreateBatchInput {
        CreateBatchInput {
            input_file_id: r.input_file_id,
            endpoint: r.endpoint,
            completion_window: r.completion_window,
            // A proto map cannot be null: empty means "no metadata".
            metadata: (!r.metadata.is_empty())
                .then(|| r.metadata.into_iter().collect::<BTreeMap<_, _>>()),
            job_id: r.job_id,
            remark: r.remark,
            idempotency_key: r.request_id,
            output_expires_after: r.output_expires_after.map(|e| (e.anchor, e.seconds)),
        }
    }
}

impl TryFrom<pb::ListBatchesRequest> for ListBatchesInput {
    type Error = Error;

    fn try_from(r: pb::ListBatchesRequest) -> Result<ListBatchesInput> {
        let mut statuses = r
            .statuses
            .iter()
            .map(|&s| status_from_proto("statuses", s))
            .collect::<Result<Vec<_>>>()?;
        if let Some(status) = r.status {
            statuses.push(status_from_proto("status", status)?);
        }
        Ok(ListBatchesInput {
            after: r.after,
            limit: r.limit.map(i64::from),
            statuses,
            job_id: r.job_id,
            created_after: r.created_after,
            created_before: r.created_before,
            metadata: r.metadata.into_iter().collect(),
            order: r.order,
            stalled: r.stalled,
        })
    }
}

impl TryFrom<pb::UpdateBatchRequest> for BatchUpdateInput {
    type Error = Error;

    fn try_from(r: pb::UpdateBatchRequest) -> Result<BatchUpdateInput> {
        Ok(BatchUpdateInput {
            expected_version: r.expected_version,
            status: r
                .status
                .map(|s| status_from_proto("status", s))
                .transpose()?,
            request_counts: r.request_counts.map(RequestCounts::from),
            output_file_id: r.output_file_id,
            error_file_id: r.error_file_id,
            errors: r.errors.into_iter().map(BatchErrorEntry::from).collect(),
            usage: r.usage.map(Usage::from),
            model: r.model,
        })
    }
}

impl From<WatchEvent> for pb::WatchBatchResponse {
    fn from(event: WatchEvent) -> pb::WatchBatchResponse {
        let kind = match event.kind {
            WatchEventKind::Snapshot => pb::EventType::Snapshot,
            WatchEventKind::Change => pb::EventType::Change,
            WatchEventKind::Heartbeat => pb::EventType::Heartbeat,
        };
        pb::WatchBatchResponse::new(kind, Arc::unwrap_or_clone(event.batch).into())
    }
}

impl From<FeedEvent> for pb::WatchBatchesResponse {
    fn from(event: FeedEvent) -> pb::WatchBatchesResponse {
        let kind = match event.kind {
            FeedEventKind::Initial => pb::FeedEventType::Initial,
            FeedEventKind::Synced => pb::FeedEventType::Synced,
            FeedEventKind::Change => pb::FeedEventType::Change,
            FeedEventKind::LeftFilter => pb::FeedEventType::LeftFilter,
            FeedEventKind::Bookmark => pb::FeedEventType::Bookmark,
            FeedEventKind::Deleted => pb::FeedEventType::Deleted,
        };
        // A deletion names the batch; its last version is not sent again.
        let (batch, batch_id) = match (event.kind, event.batch) {
            (FeedEventKind::Deleted, Some(batch)) => (None, batch.id.to_string()),
            (_, batch) => (batch.map(|b| Arc::unwrap_or_clone(b).into()), String::new()),
        };
        pb::WatchBatchesResponse {
            r#type: kind.into(),
            batch,
            cursor: event.cursor.unwrap_or_default(),
            batch_id,
        }
    }
}

impl TryFrom<pb::WatchBatchesRequest> for WatchBatchesInput {
    type Error = Error;

    fn try_from(r: pb::WatchBatchesRequest) -> Result<WatchBatchesInput> {
        let statuses = r
            .statuses
            .iter()
            .map(|&s| status_from_proto("statuses", s))
            .collect::<Result<Vec<_>>>()?;
        Ok(WatchBatchesInput {
            filter: ListBatchesInput {
                statuses,
                job_id: r.job_id,
                created_after: r.created_after,
                created_before: r.created_before,
                metadata: r.metadata.into_iter().collect(),
                ..Default::default()
            },
            after_cursor: r.after_cursor,
            send_initial_state: r.send_initial_state,
        })
    }
}

impl From<BatchPage> for pb::ListBatchesResponse {
    fn from(page: BatchPage) -> pb::ListBatchesResponse {
        pb::ListBatchesResponse {
            object: "list".into(),
            first_id: page.first_id().map(ToString::to_string),
            last_id: page.last_id().map(ToString::to_string),
            has_more: page.has_more,
            data: page.batches.into_iter().map(pb::Batch::from).collect(),
        }
    }
}
