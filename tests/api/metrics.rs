//! Metrics: GET /metrics in the Prometheus text format, counting requests of both
//! transports by route and status, watch streams and the connection pool.

use std::time::Duration;

use batchd::domain::BatchId;
use batchd::proto::batchd::v1 as pb;
use pb::BatchStatus as S;

use crate::helpers::*;
use crate::watch::watch;

async fn metrics_are_served_in_prometheus_text_format(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let batch = create(&mut client).await;
    let _ = client
        .get_batch(pb::GetBatchRequest {
            batch_id: BatchId::generate().to_string(),
        })
        .await;
    let mut stream = watch(&mut client, &batch.id, None).await.unwrap();
    stream.message().await.unwrap().unwrap();
    worker
        .update_batch(move_to(&batch.id, S::InProgress))
        .await
        .unwrap();
    stream.message().await.unwrap().unwrap();
    let rest = app.rest(Some(&app.admin_key));
    assert_eq!(
        rest.get(&format!("/v1/batches/{}", BatchId::generate()))
            .await
            .0,
        404
    );

    let response = reqwest::get(format!("http://{}/metrics", app.http_addr))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    let scrape = openmetrics_parser::prometheus::parse_prometheus(&text)
        .unwrap_or_else(|e| panic!("/metrics does not parse: {e:?}\n{text}"));
    // The value of the first sample of `name` whose labels include `labels`; for a
    // histogram, its count.
    let value = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        use openmetrics_parser::PrometheusValue as V;
        let family = scrape.families.get(name)?;
        family
            .iter_samples()
            .find(|sample| {
                let set = sample.get_labelset().unwrap();
                labels
                    .iter()
                    .all(|(k, v)| set.get_label_value(k) == Some(*v))
            })
            .map(|sample| match &sample.value {
                V::Counter(c) => c.value.as_f64(),
                V::Gauge(n) | V::Unknown(n) => n.as_f64(),
                V::Histogram(h) => h.count.unwrap_or(0) as f64,
                V::Summary(_) => f64::NAN,
            })
    };
    let grpc = |rpc: &str, status: &str| {
        value(
            "batchd_requests_total",
            &[("transport", "grpc"), ("route", rpc), ("status", status)],
        )
    };
    assert_eq!(
        grpc("batchd.v1.BatchService/CreateBatch", "0"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        grpc("batchd.v1.BatchService/GetBatch", "5"),
        Some(1.0),
        "NOT_FOUND counted"
    );
    assert_eq!(
        grpc("batchd.v1.BatchWorkerService/UpdateBatch", "0"),
        Some(1.0)
    );
    assert_eq!(
        value(
            "batchd_requests_total",
            &[
                ("transport", "http"),
                ("route", "GET /v1/batches/{batch_id}"),
                ("status", "404")
            ]
        ),
        Some(1.0)
    );
    assert!(
        value(
            "batchd_request_duration_seconds",
            &[("route", "batchd.v1.BatchService/CreateBatch")]
        )
        .is_some_and(|count| count >= 1.0),
        "latency histogram"
    );
    assert_eq!(value("batchd_watch_streams_open", &[]), Some(1.0));
    assert_eq!(
        value(
            "batchd_watch_events_delivered_total",
            &[("kind", "snapshot")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value("batchd_watch_events_delivered_total", &[("kind", "change")]),
        Some(1.0)
    );
    assert!(value("batchd_watch_notify_lag_seconds", &[]).is_some_and(|n| n >= 1.0));
    assert!(value("batchd_db_pool_connections", &[("state", "idle")]).is_some());
    assert!(value("batchd_db_pool_connections", &[("state", "in_use")]).is_some());
    // The tenant limits' families are there before their first use (all off here).
    for reason in ["request", "retention"] {
        assert_eq!(
            value("batchd_batches_deleted_total", &[("reason", reason)]),
            Some(0.0),
            "{reason}"
        );
    }
    assert_eq!(value("batchd_quota_refused_total", &[]), Some(0.0));
    for transport in ["grpc", "http"] {
        assert_eq!(
            value("batchd_rate_limited_total", &[("transport", transport)]),
            Some(0.0),
            "{transport}"
        );
    }
    assert_eq!(value("batchd_rate_limited_keys", &[]), Some(0.0));

    // The watch stream's own request is counted when it ends, with its final status.
    drop(stream);
    eventually(
        Duration::from_secs(5),
        "the closed stream to be counted",
        || {
            let url = format!("http://{}/metrics", app.http_addr);
            async move {
                let text = reqwest::get(url).await.unwrap().text().await.unwrap();
                text.contains("route=\"batchd.v1.BatchService/WatchBatch\"")
                    && text.contains("batchd_watch_streams_open 0")
            }
        },
    )
    .await;
}

on_both_stores!(metrics_are_served_in_prometheus_text_format);
