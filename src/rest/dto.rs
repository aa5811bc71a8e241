//! The JSON shapes of the REST shim: exactly OpenAI's batch object (every field always
//! present, `null` where unset, timestamps as integer Unix seconds), plus the fields
//! other vendors document.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::domain::with_batch_fields;
use crate::domain::{
    Batch, BatchErrorEntry, BatchStatus, BatchUpdateInput, CreateBatchInput, ListBatchesInput,
    RequestCounts, Usage,
};
use crate::error::{Error, Result};
use crate::service::BatchPage;

/// An integer as JSON writes it: `3600` or `3600.0` (JSON Schema's `integer` admits
/// both, and some clients serialize every number as a float). A fraction, or a value
/// outside i64, is refused.
fn integer<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    if let Some(integer) = number.as_i64() {
        return Ok(integer);
    }
    match number.as_f64() {
        // `i64::MAX as f64` rounds up to 2^63, which does not fit: hence `<`.
        Some(float)
            if float.fract() == 0.0 && float >= i64::MIN as f64 && float < i64::MAX as f64 =>
        {
            Ok(float as i64)
        }
        _ => Err(serde::de::Error::custom(format!(
            "{number} is not an integer in range"
        ))),
    }
}

/// [`integer`], for optional fields.
fn optional_integer<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    struct Integer(#[serde(deserialize_with = "integer")] i64);
    Ok(Option::<Integer>::deserialize(deserializer)?.map(|Integer(value)| value))
}

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
    /// When the batch was created, in Unix seconds.
    pub created_at: i64,
    /// When it started processing (`in_progress`), in Unix seconds.
    #[schema(required = true)]
    pub in_progress_at: Option<i64>,
    /// When the completion window ends (`created_at` + the window), in Unix seconds.
    #[schema(required = true)]
    pub expires_at: Option<i64>,
    /// When it started finalizing, in Unix seconds.
    #[schema(required = true)]
    pub finalizing_at: Option<i64>,
    /// When it completed, in Unix seconds.
    #[schema(required = true)]
    pub completed_at: Option<i64>,
    /// When it failed, in Unix seconds.
    #[schema(required = true)]
    pub failed_at: Option<i64>,
    /// When it expired, in Unix seconds.
    #[schema(required = true)]
    pub expired_at: Option<i64>,
    /// When its cancellation was requested, in Unix seconds.
    #[schema(required = true)]
    pub cancelling_at: Option<i64>,
    /// When it was cancelled, in Unix seconds.
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
    /// When the output and error files expire, as asked on create; `null` otherwise.
    #[schema(required = true)]
    pub output_expires_after: Option<OutputExpiresAfterJson>,
    /// batchd's own, beside OpenAI's fields: requests finished (completed + failed)
    /// per second, averaged over the last minute or so of versions; `null` until two
    /// samples at least 5 s apart in `in_progress`, and outside it.
    #[schema(required = true)]
    pub progress_rate: Option<f64>,
    /// batchd's own: when `request_counts.total` will be reached at `progress_rate`
    /// (Unix seconds); `null` without a rate or a total, while stalled, and outside
    /// `in_progress`.
    #[schema(required = true)]
    pub estimated_completion_at: Option<i64>,
    /// batchd's own: when batchd marked the batch stalled (not final, and no change for
    /// the server's `--stall-after`); the batch's next change clears it (`null`).
    #[schema(required = true)]
    pub stalled_at: Option<i64>,
}

/// `output_expires_after`: OpenAI's `BatchFileExpirationAfter`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = BatchFileExpirationAfter)]
pub struct OutputExpiresAfterJson {
    /// What the expiry counts from: only `created_at`.
    #[schema(pattern = "^created_at$")]
    pub anchor: String,
    /// Seconds after the anchor: one hour to 30 days.
    #[schema(minimum = 3600, maximum = 2592000)]
    #[serde(deserialize_with = "integer")]
    pub seconds: i64,
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
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = BatchRequestCounts)]
pub struct RequestCountsJson {
    /// Requests in the batch.
    #[serde(deserialize_with = "integer")]
    pub total: i64,
    /// Requests that completed successfully.
    #[serde(deserialize_with = "integer")]
    pub completed: i64,
    /// Requests that failed.
    #[serde(deserialize_with = "integer")]
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
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[schema(as = InputTokensDetails)]
pub struct InputTokensDetailsJson {
    /// Input tokens served from the cache.
    #[serde(deserialize_with = "integer")]
    pub cached_tokens: i64,
}

/// `usage.output_tokens_details`.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[schema(as = OutputTokensDetails)]
pub struct OutputTokensDetailsJson {
    /// Output tokens spent on reasoning.
    #[serde(deserialize_with = "integer")]
    pub reasoning_tokens: i64,
}

impl From<Batch> for BatchJson {
    fn from(b: Batch) -> BatchJson {
        let (progress_rate, estimated_completion_at) =
            (b.progress_rate(), b.estimated_completion_at());
        with_batch_fields!(
            BatchJson {
                id: b.id.to_string(),
                object: "batch",
                errors: (!b.errors.is_empty()).then(|| ErrorListJson {
                    object: "list",
                    data: b.errors.into_iter().map(ErrorEntryJson::from).collect(),
                }),
                status: b.status,
                request_counts: b.request_counts.into(),
                metadata: b.metadata,
                usage: b.usage.map(UsageJson::from),
                output_expires_after: b.output_expires_after.map(|e| OutputExpiresAfterJson {
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

impl From<RequestCountsJson> for RequestCounts {
    fn from(c: RequestCountsJson) -> RequestCounts {
        RequestCounts {
            total: c.total,
            completed: c.completed,
            failed: c.failed,
        }
    }
}

/// An error a worker reports (`errors[]` of an update). The response's `BatchError`
/// always carries every field; here `line` and `param` may be left out.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchErrorInput {
    /// Machine-readable code.
    #[schema(min_length = 1, max_length = 128)]
    pub code: String,
    /// Line of the input file, if the error is about one.
    #[schema(minimum = 0)]
    #[serde(default, deserialize_with = "optional_integer")]
    pub line: Option<i64>,
    /// Human-readable message.
    #[schema(min_length = 1, max_length = 4096)]
    pub message: String,
    /// The parameter at fault, if any.
    #[schema(max_length = 256)]
    pub param: Option<String>,
}

/// Token usage a worker reports; the details may be left out (zero).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageInput {
    /// Input tokens.
    #[schema(minimum = 0)]
    #[serde(deserialize_with = "integer")]
    pub input_tokens: i64,
    /// Details of the input tokens.
    #[serde(default)]
    pub input_tokens_details: Option<InputTokensDetailsJson>,
    /// Output tokens.
    #[schema(minimum = 0)]
    #[serde(deserialize_with = "integer")]
    pub output_tokens: i64,
    /// Details of the output tokens.
    #[serde(default)]
    pub output_tokens_details: Option<OutputTokensDetailsJson>,
    /// `input_tokens + output_tokens`.
    #[schema(minimum = 0)]
    #[serde(deserialize_with = "integer")]
    pub total_tokens: i64,
}

impl From<BatchErrorInput> for BatchErrorEntry {
    fn from(e: BatchErrorInput) -> BatchErrorEntry {
        BatchErrorEntry {
            code: e.code,
            line: e.line,
            message: e.message,
            param: e.param,
        }
    }
}

impl From<UsageInput> for Usage {
    fn from(u: UsageInput) -> Usage {
        Usage {
            input_tokens: u.input_tokens,
            cached_tokens: u.input_tokens_details.map_or(0, |d| d.cached_tokens),
            output_tokens: u.output_tokens,
            reasoning_tokens: u.output_tokens_details.map_or(0, |d| d.reasoning_tokens),
            total_tokens: u.total_tokens,
        }
    }
}

/// The body of `PATCH /v1/batches/{batch_id}`: a worker's update, field for field the
/// gRPC `UpdateBatchRequest`, in the JSON shapes of the batch object. Unknown fields
/// are refused: a misspelt field must not be an update that silently does nothing.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = UpdateBatchRequest)]
pub struct UpdateBatchBody {
    /// Apply only if the batch is at this version (409 otherwise).
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "optional_integer")]
    pub expected_version: Option<i64>,
    /// The new status; must be a legal move from the current one.
    pub status: Option<BatchStatus>,
    /// The new counts: none goes down, and `completed + failed <= total`.
    pub request_counts: Option<RequestCountsJson>,
    /// The file with the successful outputs.
    pub output_file_id: Option<String>,
    /// The file with the failed requests' outputs.
    pub error_file_id: Option<String>,
    /// Appended to the batch's errors.
    #[serde(default)]
    #[schema(max_items = 1000)]
    pub errors: Vec<BatchErrorInput>,
    /// Replaces the batch's usage; `total_tokens = input_tokens + output_tokens`.
    pub usage: Option<UsageInput>,
    /// The model that runs the batch.
    pub model: Option<String>,
}

impl From<UpdateBatchBody> for BatchUpdateInput {
    fn from(body: UpdateBatchBody) -> BatchUpdateInput {
        BatchUpdateInput {
            expected_version: body.expected_version,
            status: body.status,
            request_counts: body.request_counts.map(RequestCounts::from),
            output_file_id: body.output_file_id,
            error_file_id: body.error_file_id,
            errors: body.errors.into_iter().map(BatchErrorEntry::from).collect(),
            usage: body.usage.map(Usage::from),
            model: body.model,
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
    /// When the output and error files expire (anchor `created_at`, 3600 to 2592000
    /// seconds).
    pub output_expires_after: Option<OutputExpiresAfterJson>,
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
            output_expires_after: body.output_expires_after.map(|e| (e.anchor, e.seconds)),
        })
    }
}

/// `GET /v1/batch_counts`: how many batches match, per status.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = BatchCounts)]
pub struct BatchCountsJson {
    /// Always `batch_counts`.
    #[schema(pattern = "^batch_counts$")]
    pub object: &'static str,
    /// Every matching batch.
    pub total: i64,
    /// The matching batches in each status (every status present).
    pub counts: StatusCountsJson,
}

/// A count per status.
#[derive(Debug, Default, Serialize, ToSchema)]
#[schema(as = StatusCounts)]
pub struct StatusCountsJson {
    #[allow(missing_docs)]
    pub validating: i64,
    #[allow(missing_docs)]
    pub failed: i64,
    #[allow(missing_docs)]
    pub in_progress: i64,
    #[allow(missing_docs)]
    pub finalizing: i64,
    #[allow(missing_docs)]
    pub completed: i64,
    #[allow(missing_docs)]
    pub expired: i64,
    #[allow(missing_docs)]
    pub cancelling: i64,
    #[allow(missing_docs)]
    pub cancelled: i64,
}

impl From<Vec<(BatchStatus, i64)>> for BatchCountsJson {
    fn from(counts: Vec<(BatchStatus, i64)>) -> BatchCountsJson {
        let mut json = StatusCountsJson::default();
        for &(status, count) in &counts {
            let field = match status {
                BatchStatus::Validating => &mut json.validating,
                BatchStatus::Failed => &mut json.failed,
                BatchStatus::InProgress => &mut json.in_progress,
                BatchStatus::Finalizing => &mut json.finalizing,
                BatchStatus::Completed => &mut json.completed,
                BatchStatus::Expired => &mut json.expired,
                BatchStatus::Cancelling => &mut json.cancelling,
                BatchStatus::Cancelled => &mut json.cancelled,
            };
            *field += count;
        }
        BatchCountsJson {
            object: "batch_counts",
            total: counts.iter().map(|(_, count)| count).sum(),
            counts: json,
        }
    }
}

/// The filters of a list, as the OpenAPI document describes them: shared by the list,
/// the counts and the change feed, and parsed by [`ListParams::parse`] (`status` may
/// repeat, `metadata[key]` names a key).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documentation only: the fields are read by `ListParams::parse`
pub struct FilterParams {
    /// Only batches in one of these statuses: repeat the parameter
    /// (`status=in_progress&status=finalizing`) or separate them with commas.
    #[param(style = Form, explode)]
    pub status: Option<Vec<BatchStatus>>,
    /// Only batches of this job.
    pub job_id: Option<String>,
    /// Only batches created at or after this Unix second.
    #[param(minimum = 0)]
    pub created_after: Option<i64>,
    /// Only batches created before this Unix second.
    #[param(minimum = 0)]
    pub created_before: Option<i64>,
    /// Only batches whose metadata has each pair: `metadata[team]=search` (at most 4).
    #[param(style = DeepObject, explode, value_type = Option<Object>)]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// The stall filter of the list and the counts (not of the change feed, which refuses
/// it), as the OpenAPI document describes it; parsed by [`ListParams::parse`].
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documentation only: the field is read by `ListParams::parse`
pub struct StalledParams {
    /// `true`: only batches marked stalled now; `false`: only the others.
    pub stalled: Option<bool>,
}

/// The answer to `DELETE /v1/batches/{batch_id}`, OpenAI's deletion object.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = BatchDeleted)]
pub struct BatchDeletedJson {
    /// The deleted batch's id.
    pub id: String,
    /// Always `batch.deleted`.
    #[schema(pattern = "^batch\\.deleted$")]
    pub object: &'static str,
    /// Always `true`: a deletion that did not happen is an error.
    pub deleted: bool,
}

impl From<crate::domain::BatchId> for BatchDeletedJson {
    fn from(id: crate::domain::BatchId) -> BatchDeletedJson {
        BatchDeletedJson {
            id: id.to_string(),
            object: crate::domain::BATCH_DELETED_OBJECT,
            deleted: true,
        }
    }
}

/// `GET /v1/me`: the API key of the request, and what it may do.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = CurrentApiKey)]
pub struct CurrentKeyJson {
    /// Always `api_key`.
    #[schema(pattern = "^api_key$")]
    pub object: &'static str,
    /// The key's id (never its secret).
    pub id: String,
    /// The key's owner.
    pub user_id: String,
    /// `batches`, `worker` or `admin`.
    #[schema(pattern = "^(batches|worker|admin)$")]
    pub scope: &'static str,
    /// Whether the key sees every owner's batches (`worker`, `admin`) or its owner's.
    pub sees_all_owners: bool,
    /// What the key may do: `create_batches`, `read_batches`, `cancel_batches`,
    /// `delete_batches`, `update_batches`, `manage_webhooks`.
    pub permissions: Vec<&'static str>,
}

impl From<&crate::domain::Caller> for CurrentKeyJson {
    fn from(caller: &crate::domain::Caller) -> CurrentKeyJson {
        CurrentKeyJson {
            object: "api_key",
            id: caller.key_id.clone(),
            user_id: caller.user_id.clone(),
            scope: caller.scope.as_str(),
            sees_all_owners: caller.owner_filter().is_none(),
            permissions: crate::domain::Action::ALL
                .into_iter()
                .filter(|&action| caller.may(action))
                .map(crate::domain::Action::as_str)
                .collect(),
        }
    }
}

/// The paging of `GET /v1/batches`, as the OpenAPI document describes it (its filters
/// are [`FilterParams`]). Both are parsed by [`ListParams::parse`].
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documentation only: the fields are read by `parse`
pub struct ListParams {
    /// A batch id: the page starts after it (the previous page's `last_id`).
    pub after: Option<String>,
    /// Page size, 1 to 100; 20 when absent.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// `desc` (newest first, the default) or `asc`.
    #[param(pattern = "^(asc|desc)$")]
    pub order: Option<String>,
}

/// A query parameter's boolean: `true` or `false`, else refused naming `name`.
pub fn query_bool(name: &str, value: &str) -> Result<bool> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(Error::invalid(
            name,
            format!("`{other:.40}` is not a boolean; use true or false"),
        )),
    }
}

impl ListParams {
    /// Parses the query string of a list. Unknown parameters are ignored, as OpenAI
    /// does; a known one given twice (but `status`) or malformed is refused, naming it.
    pub fn parse(query: &str) -> Result<ListBatchesInput> {
        let mut input = ListBatchesInput::default();
        let mut seen = std::collections::BTreeSet::new();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            if let Some(key) = name
                .strip_prefix("metadata[")
                .and_then(|rest| rest.strip_suffix(']'))
            {
                if input.metadata.iter().any(|(k, _)| k == key) {
                    return Err(Error::invalid(
                        format!("metadata[{key}]"),
                        "is given twice; each key may be filtered on once",
                    ));
                }
                input.metadata.push((key.to_owned(), value.into_owned()));
                continue;
            }
            let known = [
                "after",
                "limit",
                "status",
                "job_id",
                "created_after",
                "created_before",
                "order",
                "stalled",
            ];
            let Some(&name) = known.iter().find(|&&known| known == name) else {
                continue;
            };
            if name != "status" && !seen.insert(name) {
                return Err(Error::invalid(name, "is given twice"));
            }
            let integer = |value: &str| {
                value
                    .parse::<i64>()
                    .map_err(|_| Error::invalid(name, format!("`{value:.40}` is not an integer")))
            };
            match name {
                "after" => input.after = Some(value.into_owned()),
                "limit" => input.limit = Some(integer(&value)?),
                "job_id" => input.job_id = Some(value.into_owned()),
                "created_after" => input.created_after = Some(integer(&value)?),
                "created_before" => input.created_before = Some(integer(&value)?),
                "order" => input.order = Some(value.into_owned()),
                "stalled" => input.stalled = Some(query_bool(name, &value)?),
                _ => {
                    for status in value.split(',') {
                        let parsed = BatchStatus::from_name(status).ok_or_else(|| {
                            Error::invalid(
                                "status",
                                format!(
                                    "`{status:.40}` is not a status; use {}",
                                    BatchStatus::ALL.map(BatchStatus::as_str).join(", ")
                                ),
                            )
                        })?;
                        input.statuses.push(parsed);
                    }
                }
            }
        }
        Ok(input)
    }
}
