//! The HTTP port: the OpenAI-compatible REST shim of the batch API, its OpenAPI
//! document, and the liveness and readiness probes. Handlers convert JSON to domain
//! input, call the same [`BatchService`] as gRPC and convert back; no rule lives here.

mod batches;
mod dto;
mod error;
mod extract;
mod watch;
mod webhooks;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::{CONTENT_TYPE, HeaderName};
use axum::http::{Method, StatusCode, Uri};
use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use dto::{BatchJson, BatchListJson};
pub use error::ApiError;

use serde_json::{Value, json};

use crate::domain::{
    BatchId, BatchPolicy, IDENTIFIER_PATTERN, IdempotencyKey, MAX_METADATA_FILTERS,
    MAX_METADATA_KEY_CHARS, MAX_METADATA_PAIRS, MAX_METADATA_VALUE_CHARS, TEXT_PATTERN,
};
use crate::health::Readiness;
use crate::service::BatchService;
use crate::webhooks::service::WebhookService;

/// Largest accepted request body. Larger bodies get a 413 before any parsing.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Samples the database pool's connections as (open, idle), for `/metrics`.
pub type PoolUsage = Arc<dyn Fn() -> (u32, u32) + Send + Sync>;

/// What the handlers share.
#[derive(Clone)]
pub struct RestState {
    service: Arc<BatchService>,
    webhooks: Arc<WebhookService>,
    readiness: Arc<Readiness>,
    pool_usage: PoolUsage,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "batchd",
        description = "Batch jobs in the shape of the OpenAI Batch API. Send the API key as \
                       `Authorization: Bearer <key>` (or `x-portkey-api-key: <key>`)."
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail)),
    modifiers(&SecuritySchemes),
    tags(
        (name = batches::TAG, description = "The batch object and its lifecycle"),
        (name = webhooks::TAG, description = "Webhook endpoints, OpenAI's, and their deliveries")
    )
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "portkey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new(extract::PORTKEY_API_KEY))),
        );
    }
}

/// The router of the HTTP port and the OpenAPI document of its batch routes.
pub fn router(
    service: Arc<BatchService>,
    webhooks: Arc<WebhookService>,
    readiness: Arc<Readiness>,
    pool_usage: PoolUsage,
) -> Router {
    let (api, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(batches::create_batch, batches::list_batches))
        .routes(routes!(
            batches::get_batch,
            batches::update_batch,
            batches::delete_batch
        ))
        .routes(routes!(batches::cancel_batch))
        .routes(routes!(batches::count_batches))
        .routes(routes!(batches::current_key))
        .routes(routes!(watch::watch_batch))
        .routes(routes!(watch::watch_batches))
        .routes(routes!(webhooks::create_endpoint, webhooks::list_endpoints))
        .routes(routes!(
            webhooks::get_endpoint,
            webhooks::update_endpoint,
            webhooks::delete_endpoint
        ))
        .routes(routes!(webhooks::rotate_secret))
        .routes(routes!(webhooks::test_endpoint))
        .routes(routes!(webhooks::list_deliveries))
        .routes(routes!(webhooks::retry_delivery))
        .routes(routes!(webhooks::list_event_types))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .split_for_parts();
    let document = Arc::new(openapi_document(&openapi, service.policy()));
    register_route_metrics(&document);
    api.route_layer(axum::middleware::from_fn(extract::request_budget_headers))
        .route_layer(axum::middleware::from_fn(crate::telemetry::http::observe))
        .route(
            "/openapi.json",
            get(move || async move { Json(document.as_ref().clone()) }),
        )
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(RestState {
            service,
            webhooks,
            readiness,
            pool_usage,
        })
}

/// The OpenAPI document as served: utoipa's, plus what it cannot express in attributes:
/// this deployment's policy (accepted endpoints and windows), the metadata limits, and
/// the patterns of ids, taken from the domain that enforces them.
fn openapi_document(openapi: &utoipa::openapi::OpenApi, policy: &BatchPolicy) -> Value {
    let mut document = serde_json::to_value(openapi).unwrap_or_else(|_| json!({}));
    if let Some(paths) = document["paths"].as_object_mut() {
        let parameters = paths
            .values_mut()
            .filter_map(Value::as_object_mut)
            .flat_map(|operations| operations.values_mut())
            // `get_mut`, not indexing: indexing would insert `"parameters": null`.
            .filter_map(|operation| operation.get_mut("parameters")?.as_array_mut())
            .flatten();
        for parameter in parameters {
            if parameter["name"] == "metadata" {
                constrain_metadata(&mut parameter["schema"], MAX_METADATA_FILTERS);
                continue;
            }
            let pattern = match parameter["name"].as_str() {
                Some("batch_id" | "after") => BatchId::PATTERN,
                Some("job_id") => IDENTIFIER_PATTERN,
                Some(IdempotencyKey::FIELD) => IdempotencyKey::PATTERN,
                _ => continue,
            };
            parameter["schema"]["pattern"] = json!(pattern);
        }
    }
    let create = &mut document["components"]["schemas"]["CreateBatchRequest"]["properties"];
    create["input_file_id"]["pattern"] = json!(IDENTIFIER_PATTERN);
    create["job_id"]["pattern"] = json!(IDENTIFIER_PATTERN);
    create["endpoint"]["enum"] = json!(policy.endpoints);
    let windows: Vec<&str> = policy
        .completion_windows
        .iter()
        .map(|w| w.text.as_str())
        .collect();
    create["completion_window"]["enum"] = json!(windows);
    create["remark"]["pattern"] = json!(TEXT_PATTERN);
    constrain_metadata(&mut create["metadata"], MAX_METADATA_PAIRS);
    let schemas = &mut document["components"]["schemas"];
    for field in ["output_file_id", "error_file_id", "model"] {
        schemas["UpdateBatchRequest"]["properties"][field]["pattern"] = json!(IDENTIFIER_PATTERN);
    }
    for field in ["code", "message", "param"] {
        schemas["BatchErrorInput"]["properties"][field]["pattern"] = json!(TEXT_PATTERN);
    }
    document
}

/// Adds the domain's limits to a metadata schema (stored metadata, or a list's filter):
/// at most `pairs` pairs, keys and values as long as the domain allows, no NUL.
fn constrain_metadata(schema: &mut Value, pairs: usize) {
    schema["maxProperties"] = json!(pairs);
    schema["propertyNames"] = json!({"type": "string", "minLength": 1,
        "maxLength": MAX_METADATA_KEY_CHARS, "pattern": TEXT_PATTERN});
    schema["additionalProperties"] = json!({"type": "string",
        "maxLength": MAX_METADATA_VALUE_CHARS, "pattern": TEXT_PATTERN});
}

/// Registers the request metrics of every observed route (`METHOD /path`, as the
/// observation middleware names them) at zero.
fn register_route_metrics(document: &Value) {
    let Some(paths) = document["paths"].as_object() else {
        return;
    };
    let routes: Vec<String> = paths
        .iter()
        .filter_map(|(path, operations)| Some((path, operations.as_object()?)))
        .flat_map(|(path, operations)| {
            operations
                .keys()
                .map(move |method| format!("{} {path}", method.to_ascii_uppercase()))
        })
        .collect();
    crate::telemetry::metrics::register_http_routes(routes.iter().map(String::as_str));
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "probes", responses((status = 200, description = "Alive", body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// Ready for traffic: the database answers and the replica is not shutting down.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "probes",
    responses(
        (status = 200, description = "Ready", body = String),
        (status = 503, description = "The database does not answer, or batchd is shutting down", body = String)
    )
)]
async fn readyz(State(state): State<RestState>) -> (StatusCode, &'static str) {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Prometheus metrics, in the text exposition format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "probes",
    responses((status = 200, description = "Metrics", content_type = "text/plain; version=0.0.4", body = String))
)]
async fn metrics(State(state): State<RestState>) -> ([(HeaderName, &'static str); 1], String) {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        crate::telemetry::metrics::render((state.pool_usage)()),
    )
}

async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::transport(
        StatusCode::NOT_FOUND,
        "unknown_url",
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::transport(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not accept {method}", uri.path()),
    )
}
