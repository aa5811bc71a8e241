//! The JSON shapes of the REST shim: exactly OpenAI's batch object (every field always
//! present, `null` where unset, timestamps as integer Unix seconds), plus the fields
//! other vendors document.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::domain::{
    Batch, BatchErrorEntry, BatchStatus, CreateBatchInput, ListBatchesInput, RequestCounts, Usage,
};
use crate::error::{Error, Result};
use crate::service::BatchPage;

/// The batch object.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Batch)]
pub struct BatchJson {
    /// `batch_` followed by 32 hex digits.
    pub id: String,
    /// Always `batch`.
    #[schema(pattern = "^batch$")]
    pub object: &'static str,
    /// The endpoint every request of the batch goes to.
    pub endpoint: String,
    /// Errors met while processing; `null` when there are none.
    #[schema(required = true)]
    pub errors: Option<ErrorListJson>,
    /// The file holding the requests.
    pub input_file_id: String,
    /// The completion window, e.g. `24h`.
    pub completion_window: String,
    /// The lifecycle status.
    pub status: BatchStatus,
    /// The file with the successful outputs.
    #[schema(required = true)]
    pub output_file_id: Option<String>,
    /// The file with the outputs of failed requests.
    #[schema(required = true)]
    pub error_file_id: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    #[schema(required = true)]
    pub in_progress_at: Option<i64>,
    /// Unix seconds: `created_at` + the completion window.
    #[schema(required = true)]
    pub expires_at: Option<i64>,
    /// Unix seconds.
    #[schema(required = true)]
    pub finalizing_at: Option<i64>,
    /// Unix seconds.
    #[schema(required = true)]
    pub completed_at: Option<i64>,
    /// Unix seconds.
    #[schema(required = true)]
    pub failed_at: Option<i64>,
    /// Unix seconds.
    #[schema(required = true)]
    pub expired_at: Option<i64>,
    /// Unix seconds.
    #[schema(required = true)]
    pub cancelling_at: Option<i64>,
    /// Unix seconds.
    #[schema(required = true)]
    pub cancelled_at: Option<i64>,
    /// Progress counters.
    pub request_counts: RequestCountsJson,
    /// Up to 16 key/value pairs; `null` when none were given.
    #[schema(required = true)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// The model, once a worker reports it.
    #[schema(required = true)]
    pub model: Option<String>,
    /// Token usage, once a worker reports it.
    #[schema(required = true)]
    pub usage: Option<UsageJson>,
    /// The job the batch belongs to.
    #[schema(required = true)]
    pub job_id: Option<String>,
    /// A free-form note.
    #[schema(required = true)]
    pub remark: Option<String>,
    /// The owner.
    pub user_id: String,
    /// The API key that created the batch.
    pub api_key_id: String,
    /// 1 at creation, +1 on every change.
    pub version: i64,
    /// Unix seconds of the last change; `null` until the first one.
    #[schema(required = true)]
    pub updated_at: Option<i64>,
}

/// The OpenAPI schema of the status: the domain enum itself is the DTO (its serde
/// spelling is OpenAI's lowercase one), so only its schema is written here.
impl utoipa::PartialSchema for BatchStatus {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .description(Some(
                "The lifecycle status, in OpenAI's lowercase spelling.",
            ))
            .enum_values(Some(BatchStatus::ALL.map(BatchStatus::as_str)))
            .into()
    }
}

impl ToSchema for BatchStatus {}

/// `errors`: a list object.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = BatchErrors)]
pub struct ErrorListJson {
    /// Always `list`.
    #[schema(pattern = "^list$")]
    pub object: &'static str,
    /// The errors.
    pub data: Vec<ErrorEntryJson>,
}

/// One error met while processing the batch.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = BatchError)]
pub struct ErrorEntryJson {
    /// Machine-readable code.
    pub code: String,
    /// Line of the input file, if any.
    #[schema(required = true)]
    pub line: Option<i64>,
    /// Human-readable message.
    pub message: String,
    /// The parameter at fault, if any.
    #[schema(required = true)]
    pub param: Option<String>,
}

/// `request_counts`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = BatchRequestCounts)]
pub struct RequestCountsJson {
    /// Requests in the batch.
    pub total: i64,
    /// Requests that completed successfully.
    pub completed: i64,
    /// Requests that failed.
    pub failed: i64,
}

/// `usage`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = BatchUsage)]
pub struct UsageJson {
    /// Input tokens.
    pub input_tokens: i64,
    /// Details of the input tokens.
    pub input_tokens_details: InputTokensDetailsJson,
    /// Output tokens.
    pub output_tokens: i64,
    /// Details of the output tokens.
    pub output_tokens_details: OutputTokensDetailsJson,
    /// `input_tokens + output_tokens`.
    pub total_tokens: i64,
}

/// `usage.input_tokens_details`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = InputTokensDetails)]
pub struct InputTokensDetailsJson {
    /// Input tokens served from the cache.
    pub cached_tokens: i64,
}

/// `usage.output_tokens_details`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = OutputTokensDetails)]
pub struct OutputTokensDetailsJson {
    /// Output tokens spent on reasoning.
    pub reasoning_tokens: i64,
}

impl From<Batch> for BatchJson {
    fn from(b: Batch) -> BatchJson {
        BatchJson {
            id: b.id.to_string(),
            object: "batch",
            endpoint: b.endpoint,
            errors: (!b.errors.is_empty()).then(|| ErrorListJson {
                object: "list",
                data: b.errors.into_iter().map(ErrorEntryJson::from).collect(),
            }),
            input_file_id: b.input_file_id,
            completion_window: b.completion_window,
            status: b.status,
            output_file_id: b.output_file_id,
            error_file_id: b.error_file_id,
            created_at: b.created_at,
            in_progress_at: b.in_progress_at,
            expires_at: b.expires_at,
            finalizing_at: b.finalizing_at,
            completed_at: b.completed_at,
            failed_at: b.failed_at,
            expired_at: b.expired_at,
            cancelling_at: b.cancelling_at,
            cancelled_at: b.cancelled_at,
            request_counts: b.request_counts.into(),
            metadata: b.metadata,
            model: b.model,
            usage: b.usage.map(UsageJson::from),
            job_id: b.job_id,
            remark: b.remark,
            user_id: b.user_id,
            api_key_id: b.api_key_id,
            version: b.version,
            updated_at: b.updated_at,
        }
    }
}

impl From<BatchErrorEntry> for ErrorEntryJson {
    fn from(e: BatchErrorEntry) -> ErrorEntryJson {
        ErrorEntryJson {
            code: e.code,
            line: e.line,
            message: e.message,
            param: e.param,
        }
    }
}

impl From<RequestCounts> for RequestCountsJson {
    fn from(c: RequestCounts) -> RequestCountsJson {
        RequestCountsJson {
            total: c.total,
            completed: c.completed,
            failed: c.failed,
        }
    }
}

impl From<Usage> for UsageJson {
    fn from(u: Usage) -> UsageJson {
        UsageJson {
            input_tokens: u.input_tokens,
            input_tokens_details: InputTokensDetailsJson {
                cached_tokens: u.cached_tokens,
            },
            output_tokens: u.output_tokens,
            output_tokens_details: OutputTokensDetailsJson {
                reasoning_tokens: u.reasoning_tokens,
            },
            total_tokens: u.total_tokens,
        }
    }
}

/// A page of batches.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = BatchList)]
pub struct BatchListJson {
    /// Always `list`.
    #[schema(pattern = "^list$")]
    pub object: &'static str,
    /// The batches, newest first.
    pub data: Vec<BatchJson>,
    /// Id of the first batch of the page.
    #[schema(required = true)]
    pub first_id: Option<String>,
    /// Id of the last batch of the page: `after` for the next page.
    #[schema(required = true)]
    pub last_id: Option<String>,
    /// Whether older batches follow.
    pub has_more: bool,
}

impl From<BatchPage> for BatchListJson {
    fn from(page: BatchPage) -> BatchListJson {
        BatchListJson {
            object: "list",
            first_id: page.first_id().map(ToString::to_string),
            last_id: page.last_id().map(ToString::to_string),
            has_more: page.has_more,
            data: page.batches.into_iter().map(BatchJson::from).collect(),
        }
    }
}

/// The body of `POST /v1/batches`. Unknown fields are ignored, as OpenAI does.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = CreateBatchRequest)]
pub struct CreateBatchBody {
    /// The file holding the requests.
    #[schema(required = true, nullable = false)]
    pub input_file_id: Option<String>,
    /// One of the accepted endpoints, e.g. `/v1/chat/completions`.
    #[schema(required = true, nullable = false)]
    pub endpoint: Option<String>,
    /// One of the accepted completion windows, e.g. `24h`.
    #[schema(required = true, nullable = false)]
    pub completion_window: Option<String>,
    /// Up to 16 pairs; keys up to 64 characters, values up to 512.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Groups batches of one job.
    pub job_id: Option<String>,
    /// A free-form note.
    #[schema(min_length = 1, max_length = 1024)]
    pub remark: Option<String>,
}

fn required(field: &str, value: Option<String>) -> Result<String> {
    value.ok_or_else(|| Error::invalid(field, "is required"))
}

impl TryFrom<CreateBatchBody> for CreateBatchInput {
    type Error = Error;

    fn try_from(body: CreateBatchBody) -> Result<CreateBatchInput> {
        Ok(CreateBatchInput {
            input_file_id: required("input_file_id", body.input_file_id)?,
            endpoint: required("endpoint", body.endpoint)?,
            completion_window: required("completion_window", body.completion_window)?,
            metadata: body.metadata,
            job_id: body.job_id,
            remark: body.remark,
            // A header, not a body field: the handler sets it.
            idempotency_key: None,
        })
    }
}

/// The query of `GET /v1/batches`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// A batch id: the page starts after it (the previous page's `last_id`).
    pub after: Option<String>,
    /// Page size, 1 to 100; 20 when absent.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// Only batches in this status.
    pub status: Option<BatchStatus>,
    /// Only batches of this job.
    pub job_id: Option<String>,
}

impl From<ListParams> for ListBatchesInput {
    fn from(params: ListParams) -> ListBatchesInput {
        ListBatchesInput {
            after: params.after,
            limit: params.limit,
            status: params.status,
            job_id: params.job_id,
        }
    }
}
