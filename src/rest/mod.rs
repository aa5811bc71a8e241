//! The HTTP port: liveness and readiness probes (the OpenAI-compatible REST shim of the
//! batch API joins them here).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::health::DatabaseHealth;

/// The HTTP routes.
pub fn router(health: Arc<DatabaseHealth>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health)
}

/// 200 while the database answers, 503 while it does not.
async fn readyz(State(health): State<Arc<DatabaseHealth>>) -> (StatusCode, &'static str) {
    if health.is_reachable() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "database unreachable")
    }
}
