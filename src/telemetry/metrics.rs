//! Prometheus metrics: recorded with the `metrics` facade where things happen, rendered
//! by `metrics-exporter-prometheus` at `GET /metrics`.
//!
//! Names (all prefixed `batchd_`):
//! - `requests_total`, `request_duration_seconds` {transport, route, status}
//! - `watch_streams_open`, `watch_events_delivered_total` {kind},
//!   `watch_notify_lag_seconds` (commit to the feed's broadcast)
//! - `sweeper_transitions_total` {to}, `batches_stalled_total` {status},
//!   `stalled_batches` {status} (all replicas)
//! - `db_pool_connections` {state = in_use | idle}, `db_errors_total` {kind}
//! - `write_memory_total` {outcome = hit | retried | miss}: the latest cache on writes

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets in seconds, from sub-millisecond reads to slow streams.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use. One per process: several
/// in-process servers (tests) share it.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
            .expect("the latency buckets are not empty");
        let handle = match builder.install_recorder() {
            Ok(handle) => handle,
            // Another recorder is installed (an embedding program's): render ours
            // anyway, it just stays empty.
            Err(_) => return PrometheusBuilder::new().build_recorder().handle(),
        };
        register_families();
        handle
    })
}

/// Registers every family at zero, so that dashboards and alerts see `0` from the
/// start rather than an absent series (Prometheus' advice on missing metrics).
/// Request series are registered for each gRPC RPC with status OK; the HTTP routes are
/// registered by [`register_http_routes`] once the router exists.
fn register_families() {
    metrics::describe_counter!(
        "batchd_requests_total",
        "Requests finished, by transport, route and status"
    );
    metrics::describe_histogram!(
        "batchd_request_duration_seconds",
        "Request latency (streams: to the first byte)"
    );
    metrics::describe_gauge!(
        "batchd_watch_streams_open",
        "Open watch streams on this replica"
    );
    metrics::describe_counter!(
        "batchd_watch_events_delivered_total",
        "Watch messages queued for clients, by kind"
    );
    metrics::describe_histogram!(
        "batchd_watch_notify_lag_seconds",
        "From a commit to its broadcast by the watch feed"
    );
    metrics::describe_counter!(
        "batchd_sweeper_transitions_total",
        "Batches moved by the lifecycle timers, by target status"
    );
    metrics::describe_counter!(
        "batchd_batches_stalled_total",
        "Batches this replica marked stalled, by status"
    );
    metrics::describe_gauge!(
        "batchd_stalled_batches",
        "Batches marked stalled now, by status, all replicas (set by the stall sweep)"
    );
    metrics::describe_gauge!(
        "batchd_db_pool_connections",
        "Database pool connections, by state"
    );
    metrics::describe_counter!("batchd_db_errors_total", "Database errors, by kind");
    metrics::describe_counter!(
        "batchd_webhook_deliveries_queued_total",
        "Webhook deliveries queued by the dispatcher, by event type"
    );
    metrics::describe_counter!(
        "batchd_webhook_attempts_total",
        "Webhook delivery attempts, by event type and outcome"
    );
    metrics::describe_histogram!(
        "batchd_webhook_attempt_duration_seconds",
        "Latency of one webhook delivery attempt, by outcome"
    );
    metrics::describe_gauge!(
        "batchd_webhook_queue_depth",
        "Pending webhook deliveries, all replicas"
    );
    metrics::describe_gauge!(
        "batchd_webhook_oldest_pending_age_seconds",
        "Age of the oldest pending webhook delivery's event"
    );
    metrics::describe_counter!(
        "batchd_batches_deleted_total",
        "Batches this replica deleted, by reason (request, retention)"
    );
    metrics::describe_counter!(
        "batchd_write_memory_total",
        "Batch writes by what the replica's memory of the batch did: hit, retried, miss"
    );
    metrics::describe_counter!(
        "batchd_quota_refused_total",
        "Creates refused by --max-active-batches-per-owner"
    );
    metrics::describe_counter!(
        "batchd_rate_limited_total",
        "Requests refused by --rate-limit-per-key, by transport"
    );
    metrics::describe_gauge!(
        "batchd_rate_limited_keys",
        "API keys with a request-rate bucket on this replica"
    );
    for rpc in super::grpc::rpc_labels() {
        register_request_series("grpc", rpc, "0");
    }
    metrics::gauge!("batchd_watch_streams_open").increment(0.0);
    for kind in crate::watch::WatchEventKind::ALL {
        metrics::counter!("batchd_watch_events_delivered_total", "kind" => kind.as_str())
            .increment(0);
    }
    // Registering the handle is the point: it renders from now on.
    let _ = metrics::histogram!("batchd_watch_notify_lag_seconds");
    for to in ["expired", "cancelled"] {
        metrics::counter!("batchd_sweeper_transitions_total", "to" => to).increment(0);
    }
    for status in crate::domain::BatchStatus::STALLABLE {
        metrics::counter!("batchd_batches_stalled_total", "status" => status.as_str()).increment(0);
        metrics::gauge!("batchd_stalled_batches", "status" => status.as_str()).increment(0.0);
    }
    for state in ["in_use", "idle"] {
        metrics::gauge!("batchd_db_pool_connections", "state" => state).increment(0.0);
    }
    for kind in ["unavailable", "internal"] {
        metrics::counter!("batchd_db_errors_total", "kind" => kind).increment(0);
    }
    for kind in crate::domain::webhooks::WebhookEventType::ALL {
        let kind = kind.as_str();
        metrics::counter!("batchd_webhook_deliveries_queued_total", "event_type" => kind)
            .increment(0);
        for outcome in crate::webhooks::deliverer::OUTCOMES {
            metrics::counter!("batchd_webhook_attempts_total", "event_type" => kind, "outcome" => outcome)
                .increment(0);
        }
    }
    for outcome in crate::webhooks::deliverer::OUTCOMES {
        let _ =
            metrics::histogram!("batchd_webhook_attempt_duration_seconds", "outcome" => outcome);
    }
    metrics::gauge!("batchd_webhook_queue_depth").increment(0.0);
    metrics::gauge!("batchd_webhook_oldest_pending_age_seconds").increment(0.0);
    for reason in crate::service::DeletionReason::ALL {
        metrics::counter!("batchd_batches_deleted_total", "reason" => reason.as_str()).increment(0);
    }
    for outcome in crate::service::WriteMemory::ALL {
        metrics::counter!("batchd_write_memory_total", "outcome" => outcome.as_str()).increment(0);
    }
    metrics::counter!("batchd_quota_refused_total").increment(0);
    for transport in ["grpc", "http"] {
        metrics::counter!("batchd_rate_limited_total", "transport" => transport).increment(0);
    }
    metrics::gauge!("batchd_rate_limited_keys").increment(0.0);
}

/// Registers the request series of each HTTP route (`METHOD /path`) with status 200.
pub fn register_http_routes<'a>(routes: impl IntoIterator<Item = &'a str>) {
    for route in routes {
        register_request_series("http", route.to_owned(), "200");
    }
}

fn register_request_series(
    transport: &'static str,
    route: impl Into<metrics::SharedString>,
    status: &'static str,
) {
    let labels = super::http::request_labels(transport, route.into(), status.into());
    metrics::counter!("batchd_requests_total", labels.clone()).increment(0);
    let _ = metrics::histogram!("batchd_request_duration_seconds", labels);
}

/// The metrics in Prometheus's text format, with the pool's connections (open, idle)
/// as sampled now.
pub fn render((open, idle): (u32, u32)) -> String {
    metrics::gauge!("batchd_db_pool_connections", "state" => "in_use")
        .set(f64::from(open.saturating_sub(idle)));
    metrics::gauge!("batchd_db_pool_connections", "state" => "idle").set(f64::from(idle));
    handle().render()
}
