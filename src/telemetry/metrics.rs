//! Prometheus metrics: recorded with the `metrics` facade where things happen, rendered
//! by `metrics-exporter-prometheus` at `GET /metrics`.
//!
//! Names (all prefixed `batchd_`):
//! - `requests_total`, `request_duration_seconds` {transport, route, status}
//! - `watch_streams_open`, `watch_events_delivered_total` {kind},
//!   `watch_notify_lag_seconds` (commit to the feed's broadcast)
//! - `sweeper_transitions_total` {to}
//! - `db_pool_connections` {state = in_use | idle}, `db_errors_total` {kind}

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::store::Store;

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
        match builder.install_recorder() {
            Ok(handle) => handle,
            // Another recorder is installed (an embedding program's): render ours
            // anyway, it just stays empty.
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        }
    })
}

/// The metrics in Prometheus's text format, with the gauges sampled now.
pub fn render(store: &dyn Store) -> String {
    let (open, idle) = store.pool_usage();
    metrics::gauge!("batchd_db_pool_connections", "state" => "in_use")
        .set(f64::from(open.saturating_sub(idle)));
    metrics::gauge!("batchd_db_pool_connections", "state" => "idle").set(f64::from(idle));
    handle().render()
}
