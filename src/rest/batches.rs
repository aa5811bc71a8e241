//! The batch routes: the paths of OpenAI's Batch API, over the same service as gRPC.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;

use super::RestState;
use super::dto::{
    BatchCountsJson, BatchDeletedJson, BatchJson, BatchListJson, CreateBatchBody, CurrentKeyJson,
    FilterParams, ListParams, StalledParams, UpdateBatchBody,
};
use super::error::{ApiError, ErrorResponses};
use super::extract::{Authenticated, JsonBody};
use crate::domain::{CreateBatchInput, IdempotencyKey};
use crate::error::Error;

/// The tag of the batch routes in the OpenAPI document.
pub const TAG: &str = "batches";

/// Creates a batch.
#[utoipa::path(
    post,
    path = "/v1/batches",
    tag = TAG,
    operation_id = "createBatch",
    request_body = CreateBatchBody,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe: the same key from the same owner within 24 hours returns the batch of the first request; with a different request it is 409. 1 to 255 visible ASCII characters."),
    ),
    responses((status = 200, description = "The new batch, in status `validating` (or, for a repeated Idempotency-Key, the batch its first request created)", body = BatchJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn create_batch(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CreateBatchBody>,
) -> Result<Json<BatchJson>, ApiError> {
    let mut input: CreateBatchInput = body.try_into()?;
    input.idempotency_key = match headers.get(IDEMPOTENCY_KEY) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| {
                    Error::invalid(IdempotencyKey::FIELD, "must be visible ASCII characters")
                })?
                .to_owned(),
        ),
    };
    let batch = state.service.create_batch(&caller, input).await?;
    Ok(Json(batch.into()))
}

/// The header of a safe retry (OpenAI's SDKs and Stripe spell it so).
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Applies a worker's update to a batch, all of it or nothing (gRPC `UpdateBatch`):
/// for executors that report progress without gRPC. Needs a `worker` or `admin` key.
#[utoipa::path(
    patch,
    path = "/v1/batches/{batch_id}",
    tag = TAG,
    operation_id = "updateBatch",
    params(("batch_id" = String, Path, description = "The id of the batch")),
    request_body = UpdateBatchBody,
    responses((status = 200, description = "The batch after the update", body = BatchJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn update_batch(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    Path(batch_id): Path<String>,
    JsonBody(body): JsonBody<UpdateBatchBody>,
) -> Result<Json<BatchJson>, ApiError> {
    let batch = state
        .service
        .update_batch(&caller, &batch_id, body.into())
        .await?;
    Ok(Json(batch.into()))
}

/// Lists the caller's batches that match the filters, newest first (or `order=asc`).
#[utoipa::path(
    get,
    path = "/v1/batches",
    tag = TAG,
    operation_id = "listBatches",
    params(ListParams, FilterParams, StalledParams),
    responses((status = 200, description = "A page of batches", body = BatchListJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn list_batches(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    RawQuery(query): RawQuery,
) -> Result<Json<BatchListJson>, ApiError> {
    let input = ListParams::parse(query.as_deref().unwrap_or_default())?;
    let page = state.service.list_batches(&caller, input).await?;
    Ok(Json(page.into()))
}

/// Counts the caller's batches that match the filters, per status (a list's filters,
/// without its paging): what a dashboard shows above a list.
#[utoipa::path(
    get,
    path = "/v1/batch_counts",
    tag = TAG,
    operation_id = "countBatches",
    params(FilterParams, StalledParams),
    responses((status = 200, description = "How many batches match, per status", body = BatchCountsJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn count_batches(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    RawQuery(query): RawQuery,
) -> Result<Json<BatchCountsJson>, ApiError> {
    let input = ListParams::parse(query.as_deref().unwrap_or_default())?;
    let counts = state.service.count_batches(&caller, input).await?;
    Ok(Json(counts.into()))
}

/// The API key of the request: its id, owner, scope and what it may do (the console
/// shows only the actions a key may take).
#[utoipa::path(
    get,
    path = "/v1/me",
    tag = TAG,
    operation_id = "currentApiKey",
    responses((status = 200, description = "The key of the request", body = CurrentKeyJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn current_key(Authenticated(caller): Authenticated) -> Json<CurrentKeyJson> {
    Json(CurrentKeyJson::from(&caller))
}

/// Retrieves a batch.
#[utoipa::path(
    get,
    path = "/v1/batches/{batch_id}",
    tag = TAG,
    operation_id = "retrieveBatch",
    params(("batch_id" = String, Path, description = "The id of the batch")),
    responses((status = 200, description = "The batch", body = BatchJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn get_batch(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    Path(batch_id): Path<String>,
) -> Result<Json<BatchJson>, ApiError> {
    let batch = state.service.get_batch(&caller, &batch_id).await?;
    Ok(Json(batch.into()))
}

/// Deletes a terminal batch (completed, failed, expired, cancelled): reads, lists,
/// counts and the change feed (`deleted`) no longer show it. A batch in another
/// status is 409; an unknown, another owner's or an already deleted batch is 404.
#[utoipa::path(
    delete,
    path = "/v1/batches/{batch_id}",
    tag = TAG,
    operation_id = "deleteBatch",
    params(("batch_id" = String, Path, description = "The id of the batch")),
    responses((status = 200, description = "The batch was deleted", body = BatchDeletedJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn delete_batch(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    Path(batch_id): Path<String>,
) -> Result<Json<BatchDeletedJson>, ApiError> {
    let id = state.service.delete_batch(&caller, &batch_id).await?;
    Ok(Json(id.into()))
}

/// Requests cancellation of a batch; a batch already cancelling or cancelled is
/// returned unchanged.
#[utoipa::path(
    post,
    path = "/v1/batches/{batch_id}/cancel",
    tag = TAG,
    operation_id = "cancelBatch",
    params(("batch_id" = String, Path, description = "The id of the batch")),
    responses((status = 200, description = "The batch, now `cancelling`", body = BatchJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn cancel_batch(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    Path(batch_id): Path<String>,
) -> Result<Json<BatchJson>, ApiError> {
    let batch = state.service.cancel_batch(&caller, &batch_id).await?;
    Ok(Json(batch.into()))
}
