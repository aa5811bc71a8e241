//! The webhook routes: OpenAI's `/v1/webhook_endpoints` and `/v1/webhook_event_types`,
//! plus batchd's delivery log, over the same [`WebhookService`] as gRPC.
//!
//! [`WebhookService`]: crate::webhooks::service::WebhookService

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::RestState;
use super::error::{ApiError, ErrorResponses};
use super::extract::{Authenticated, JsonBody, QueryParams};
use crate::domain::webhooks::{Delivery, EndpointInput, WebhookEventType};
use crate::webhooks::service::EndpointView;

/// The tag of the webhook routes in the OpenAPI document.
pub const TAG: &str = "webhooks";

/// A webhook endpoint, as OpenAI shows it, with batchd's state beside it.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookEndpointJson {
    /// `we_` and 24 hex digits.
    id: String,
    /// Always `webhook_endpoint`.
    object: &'static str,
    /// Unix seconds.
    created_at: i64,
    /// Unix seconds.
    updated_at: i64,
    name: String,
    url: String,
    event_types: Vec<&'static str>,
    /// The last 4 characters of the signing secret.
    signing_secret_hint: String,
    /// Shown by create and rotate_secret only, once.
    #[serde(skip_serializing_if = "Option::is_none")]
    signing_secret: Option<String>,
    /// `enabled`, or `disabled` (see `disabled_reason`); an update enables it again.
    status: &'static str,
    /// Why it was disabled.
    disabled_reason: Option<String>,
    /// Since when every delivery failed (Unix seconds), if it is failing.
    failing_since: Option<i64>,
}

impl From<EndpointView> for WebhookEndpointJson {
    fn from(view: EndpointView) -> Self {
        let endpoint = view.endpoint;
        let event_types = endpoint.settings.event_type_names().collect();
        WebhookEndpointJson {
            object: "webhook_endpoint",
            created_at: endpoint.created_at,
            updated_at: endpoint.updated_at,
            name: endpoint.settings.name,
            url: endpoint.settings.url.to_string(),
            event_types,
            signing_secret_hint: view.secret_hint,
            signing_secret: view.new_secret,
            status: if endpoint.disabled.is_some() {
                "disabled"
            } else {
                "enabled"
            },
            disabled_reason: endpoint.disabled.map(|(_, reason)| reason),
            failing_since: endpoint.failing_since,
            id: endpoint.id,
        }
    }
}

/// A page of endpoints, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookEndpointListJson {
    /// Always `list`.
    object: &'static str,
    data: Vec<WebhookEndpointJson>,
    first_id: Option<String>,
    last_id: Option<String>,
    has_more: bool,
}

/// Create or update an endpoint (on update every field is optional).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointBody {
    /// 1 to 256 characters.
    name: Option<String>,
    /// An `https://` URL of at most 2048 characters, reaching a public address.
    url: Option<String>,
    /// Event types, from `GET /v1/webhook_event_types`.
    event_types: Option<Vec<String>>,
}

impl From<EndpointBody> for EndpointInput {
    fn from(body: EndpointBody) -> Self {
        EndpointInput {
            name: body.name,
            url: body.url,
            event_types: body.event_types,
        }
    }
}

/// Rotate an endpoint's secret.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    /// Keep signing with the old secret too for 24 hours (every delivery then carries
    /// both signatures).
    #[serde(default)]
    keep_old_secret_active_for_24_hours: Option<bool>,
}

/// Send a test event.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestBody {
    /// The event type of the sample event.
    event_type: String,
}

/// What a test delivery found.
#[derive(Debug, Serialize, ToSchema)]
pub struct TestResultJson {
    /// Always `webhook_endpoint.test`.
    object: &'static str,
    webhook_endpoint_id: String,
    event_type: &'static str,
    /// The receiver's status.
    status_code: u16,
    /// Always true: a failed test is an error.
    success: bool,
}

/// A deleted endpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeletedJson {
    id: String,
    /// Always `webhook_endpoint.deleted`.
    object: &'static str,
    deleted: bool,
}

/// The event types endpoints may subscribe to.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventTypeListJson {
    /// Always `list`.
    object: &'static str,
    data: Vec<&'static str>,
}

/// One delivery of an event to an endpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryJson {
    /// `wd_` and 24 hex digits.
    id: String,
    /// Always `webhook_delivery`.
    object: &'static str,
    /// The event id: the `webhook-id` header of every attempt.
    event_id: String,
    event_type: String,
    batch_id: String,
    /// When the event happened, Unix seconds.
    created_at: i64,
    /// `pending`, `delivered` or `failed`.
    status: &'static str,
    attempts: i64,
    /// When the next attempt is due (Unix milliseconds), while pending.
    next_attempt_at_ms: Option<i64>,
    last_attempt: Option<AttemptJson>,
    /// When it was delivered or given up (Unix milliseconds).
    finished_at_ms: Option<i64>,
}

/// What the latest attempt found.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptJson {
    /// When it started, Unix milliseconds.
    at_ms: i64,
    duration_ms: i64,
    /// The receiver's HTTP status, if it answered.
    status_code: Option<i32>,
    error: Option<String>,
}

impl From<Delivery> for DeliveryJson {
    fn from(delivery: Delivery) -> Self {
        let pending = delivery.state == crate::domain::webhooks::DeliveryState::Pending;
        DeliveryJson {
            object: "webhook_delivery",
            status: delivery.state.as_str(),
            attempts: delivery.attempts,
            next_attempt_at_ms: pending.then_some(delivery.next_attempt_at_ms),
            last_attempt: delivery.last_attempt.map(|attempt| AttemptJson {
                at_ms: attempt.at_ms,
                duration_ms: attempt.duration_ms,
                status_code: attempt.status_code,
                error: attempt.error,
            }),
            finished_at_ms: delivery.finished_at_ms,
            id: delivery.queued.id,
            event_id: delivery.queued.event_id,
            event_type: delivery.queued.event_type,
            batch_id: delivery.queued.batch_id,
            created_at: delivery.queued.created_at,
        }
    }
}

/// An endpoint's latest deliveries, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryListJson {
    /// Always `list`.
    object: &'static str,
    data: Vec<DeliveryJson>,
}

/// A delivery made due again.
#[derive(Debug, Serialize, ToSchema)]
pub struct RetriedJson {
    id: String,
    /// Always `webhook_delivery.retry`.
    object: &'static str,
    /// Always `pending`.
    status: &'static str,
}

/// Paging of endpoints, as OpenAI's.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EndpointListParams {
    /// The last id of the previous page.
    after: Option<String>,
    /// 1 to 100; 20 by default.
    limit: Option<i64>,
}

/// How many deliveries to list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveryListParams {
    /// 1 to 100; 20 by default.
    limit: Option<i64>,
}

/// Creates a webhook endpoint; its signing secret is shown now only.
#[utoipa::path(
    post,
    path = "/v1/webhook_endpoints",
    tag = TAG,
    operation_id = "createWebhookEndpoint",
    request_body = EndpointBody,
    responses((status = 200, description = "The endpoint, with its signing secret", body = WebhookEndpointJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn create_endpoint(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    JsonBody(body): JsonBody<EndpointBody>,
) -> Result<Json<WebhookEndpointJson>, ApiError> {
    let created = state.webhooks.create_endpoint(&caller, body.into()).await?;
    Ok(Json(created.into()))
}

/// Lists the caller's webhook endpoints, newest first.
#[utoipa::path(
    get,
    path = "/v1/webhook_endpoints",
    tag = TAG,
    operation_id = "listWebhookEndpoints",
    params(EndpointListParams),
    responses((status = 200, description = "A page of endpoints", body = WebhookEndpointListJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn list_endpoints(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    QueryParams(params): QueryParams<EndpointListParams>,
) -> Result<Json<WebhookEndpointListJson>, ApiError> {
    let page = state
        .webhooks
        .list_endpoints(&caller, params.after.as_deref(), params.limit)
        .await?;
    let data: Vec<WebhookEndpointJson> = page.endpoints.into_iter().map(Into::into).collect();
    Ok(Json(WebhookEndpointListJson {
        object: "list",
        first_id: data.first().map(|e| e.id.clone()),
        last_id: data.last().map(|e| e.id.clone()),
        has_more: page.has_more,
        data,
    }))
}

/// Retrieves a webhook endpoint.
#[utoipa::path(
    get,
    path = "/v1/webhook_endpoints/{webhook_endpoint_id}",
    tag = TAG,
    operation_id = "retrieveWebhookEndpoint",
    params(("webhook_endpoint_id" = String, Path, description = "The id of the endpoint")),
    responses((status = 200, description = "The endpoint", body = WebhookEndpointJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn get_endpoint(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<WebhookEndpointJson>, ApiError> {
    let endpoint = state.webhooks.get_endpoint(&caller, &id).await?;
    Ok(Json(endpoint.into()))
}

/// Changes an endpoint's name, URL or event types; a disabled endpoint is enabled
/// again.
#[utoipa::path(
    post,
    path = "/v1/webhook_endpoints/{webhook_endpoint_id}",
    tag = TAG,
    operation_id = "updateWebhookEndpoint",
    params(("webhook_endpoint_id" = String, Path, description = "The id of the endpoint")),
    request_body = EndpointBody,
    responses((status = 200, description = "The endpoint", body = WebhookEndpointJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn update_endpoint(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<EndpointBody>,
) -> Result<Json<WebhookEndpointJson>, ApiError> {
    let endpoint = state
        .webhooks
        .update_endpoint(&caller, &id, body.into())
        .await?;
    Ok(Json(endpoint.into()))
}

/// Deletes an endpoint and its deliveries.
#[utoipa::path(
    delete,
    path = "/v1/webhook_endpoints/{webhook_endpoint_id}",
    tag = TAG,
    operation_id = "deleteWebhookEndpoint",
    params(("webhook_endpoint_id" = String, Path, description = "The id of the endpoint")),
    responses((status = 200, description = "Deleted", body = DeletedJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn delete_endpoint(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<DeletedJson>, ApiError> {
    let id = state.webhooks.delete_endpoint(&caller, &id).await?;
    Ok(Json(DeletedJson {
        id,
        object: "webhook_endpoint.deleted",
        deleted: true,
    }))
}

/// Gives an endpoint a new signing secret, shown now only.
#[utoipa::path(
    post,
    path = "/v1/webhook_endpoints/{webhook_endpoint_id}/rotate_secret",
    tag = TAG,
    operation_id = "rotateWebhookEndpointSecret",
    params(("webhook_endpoint_id" = String, Path, description = "The id of the endpoint")),
    request_body = RotateBody,
    responses((status = 200, description = "The endpoint, with its new signing secret", body = WebhookEndpointJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn rotate_secret(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RotateBody>,
) -> Result<Json<WebhookEndpointJson>, ApiError> {
    let keep_old = body.keep_old_secret_active_for_24_hours.unwrap_or(false);
    let rotated = state.webhooks.rotate_secret(&caller, &id, keep_old).await?;
    Ok(Json(rotated.into()))
}

/// Sends one signed sample event to the endpoint now.
#[utoipa::path(
    post,
    path = "/v1/webhook_endpoints/{webhook_endpoint_id}/test",
    tag = TAG,
    operation_id = "testWebhookEndpoint",
    params(("webhook_endpoint_id" = String, Path, description = "The id of the endpoint")),
    request_body = TestBody,
    responses((status = 200, description = "The receiver answered 2xx", body = TestResultJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn test_endpoint(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<TestBody>,
) -> Result<Json<TestResultJson>, ApiError> {
    let result = state
        .webhooks
        .test_endpoint(&caller, &id, &body.event_type)
        .await?;
    Ok(Json(TestResultJson {
        object: "webhook_endpoint.test",
        webhook_endpoint_id: id,
        event_type: result.event_type.as_str(),
        status_code: result.status_code,
        success: true,
    }))
}

/// The event types an endpoint may subscribe to: OpenAI's four, then batchd's own.
#[utoipa::path(
    get,
    path = "/v1/webhook_event_types",
    tag = TAG,
    operation_id = "listWebhookEventTypes",
    responses((status = 200, description = "Every event type", body = EventTypeListJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn list_event_types(
    Authenticated(_caller): Authenticated,
) -> Result<Json<EventTypeListJson>, ApiError> {
    Ok(Json(EventTypeListJson {
        object: "list",
        data: WebhookEventType::ALL.map(WebhookEventType::as_str).to_vec(),
    }))
}

/// An endpoint's latest deliveries, newest first (batchd's own).
#[utoipa::path(
    get,
    path = "/v1/webhook_endpoints/{webhook_endpoint_id}/deliveries",
    tag = TAG,
    operation_id = "listWebhookDeliveries",
    params(("webhook_endpoint_id" = String, Path, description = "The id of the endpoint"), DeliveryListParams),
    responses((status = 200, description = "The latest deliveries", body = DeliveryListJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn list_deliveries(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
    QueryParams(params): QueryParams<DeliveryListParams>,
) -> Result<Json<DeliveryListJson>, ApiError> {
    let deliveries = state
        .webhooks
        .list_deliveries(&caller, &id, params.limit)
        .await?;
    Ok(Json(DeliveryListJson {
        object: "list",
        data: deliveries.into_iter().map(DeliveryJson::from).collect(),
    }))
}

/// Makes a delivery due now: again, with a fresh count of attempts, if it had
/// finished (batchd's own).
#[utoipa::path(
    post,
    path = "/v1/webhook_endpoints/{webhook_endpoint_id}/deliveries/{delivery_id}/retry",
    tag = TAG,
    operation_id = "retryWebhookDelivery",
    params(
        ("webhook_endpoint_id" = String, Path, description = "The id of the endpoint"),
        ("delivery_id" = String, Path, description = "The id of the delivery"),
    ),
    responses((status = 200, description = "The delivery is due", body = RetriedJson), ErrorResponses),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn retry_delivery(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    Path((id, delivery_id)): Path<(String, String)>,
) -> Result<Json<RetriedJson>, ApiError> {
    state
        .webhooks
        .retry_delivery(&caller, &id, &delivery_id)
        .await?;
    Ok(Json(RetriedJson {
        id: delivery_id,
        object: "webhook_delivery.retry",
        status: "pending",
    }))
}
