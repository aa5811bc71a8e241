//! Observation of the HTTP port: one span per request (continuing the caller's W3C
//! trace), request count and latency per route and status.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;
use tracing::field::Empty;

use super::continue_trace;

/// Counts a finished request and records its latency.
pub fn record_request(transport: &'static str, route: String, status: String, elapsed: Duration) {
    let labels = [
        ("transport", transport.to_owned()),
        ("route", route),
        ("status", status),
    ];
    metrics::counter!("batchd_requests_total", &labels).increment(1);
    metrics::histogram!("batchd_request_duration_seconds", &labels).record(elapsed.as_secs_f64());
}

/// axum middleware (as a route layer, so the matched route is known).
pub async fn observe(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    let name = format!("{} {route}", request.method());
    let span = tracing::info_span!(
        "http_request",
        otel.name = %name,
        otel.kind = "server",
        http.request.method = %request.method(),
        http.route = %route,
        http.response.status_code = Empty,
    );
    continue_trace(&span, request.headers());
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    // For a stream (SSE) this is the time to its first byte; the stream lives on.
    record_request("http", name, status.as_u16().to_string(), started.elapsed());
    response
}
