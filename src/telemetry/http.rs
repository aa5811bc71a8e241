//! Observation of the HTTP port: one span per request (continuing the caller's W3C
//! trace), request count and latency per route and status.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use metrics::{Label, SharedString};
use tracing::Instrument;
use tracing::field::Empty;

use super::continue_trace;

/// Counts a finished request and records its latency. Every label comes from a closed
/// set (known routes and methods, status codes), never from what a client sent.
pub fn record_request(
    transport: &'static str,
    route: impl Into<SharedString>,
    status: impl Into<SharedString>,
    elapsed: Duration,
) {
    let labels = request_labels(transport, route.into(), status.into());
    metrics::counter!("batchd_requests_total", labels.clone()).increment(1);
    metrics::histogram!("batchd_request_duration_seconds", labels).record(elapsed.as_secs_f64());
}

/// The labels of the request metrics.
pub(super) fn request_labels(
    transport: &'static str,
    route: SharedString,
    status: SharedString,
) -> Vec<Label> {
    vec![
        Label::from_static_parts("transport", transport),
        Label::new("route", route),
        Label::new("status", status),
    ]
}

/// The route label of requests that match no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The method label: a standard method by name, anything else `OTHER`.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// axum middleware (as a route layer, so the matched route is known).
pub async fn observe(request: Request, next: Next) -> Response {
    // The matched route is one of the router's own (a closed set); the method is
    // whatever the client wrote, so only the standard ones are named.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED_ROUTE, MatchedPath::as_str);
    let name = format!("{} {route}", method_label(request.method()));
    // `debug`: see the gRPC span in `telemetry::grpc`.
    let span = tracing::debug_span!(
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
