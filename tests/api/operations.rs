//! Operations: lifecycle timers, metrics, traces, logs, readiness, shutdown, outages.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchd::domain::{BatchId, Scope};
use batchd::proto::batchd::v1 as pb;
use pb::BatchStatus as S;
use pb::EventType as E;
use tokio::task::JoinSet;
use tonic::Code;

use crate::helpers::*;

/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600;
const DAY: i64 = 24 * 3600;

fn service(app: &TestApp) -> Arc<batchd::service::BatchService> {
    app.app.as_ref().expect("running").service().clone()
}

async fn lifecycle_timers_expire_running_batches_and_finish_stuck_cancellations(backend: Backend) {
    let clock = ManualClock::at(T0);
    let app_clock: Arc<dyn batchd::clock::Clock> = clock.clone();
    let app = TestApp::spawn_with(backend, |o| o.clock = app_clock).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let validating = create(&mut client).await;
    let running = create(&mut client).await;
    worker
        .update_batch(move_to(&running.id, S::InProgress))
        .await
        .unwrap();
    let stuck = create(&mut client).await;
    client
        .cancel_batch(pb::CancelBatchRequest {
            batch_id: stuck.id.clone(),
        })
        .await
        .unwrap();
    let done = create(&mut client).await;
    for status in [S::InProgress, S::Finalizing, S::Completed] {
        worker
            .update_batch(move_to(&done.id, status))
            .await
            .unwrap();
    }
    let mut watching = client
        .watch_batch(pb::WatchBatchRequest {
            batch_id: running.id.clone(),
            after_version: Some(2),
        })
        .await
        .unwrap()
        .into_inner();
    let sweeper = service(&app);
    let grace = Duration::from_secs(600);

    clock.advance(599);
    assert_eq!(
        sweeper.sweep_due_batches(grace).await.unwrap(),
        Default::default()
    );
    clock.advance(1);
    let outcome = sweeper.sweep_due_batches(grace).await.unwrap();
    assert_eq!((outcome.expired, outcome.cancelled), (0, 1));
    let cancelled = get(&mut client, &stuck.id).await;
    assert_eq!(cancelled.status(), S::Cancelled);
    assert_eq!(cancelled.cancelled_at, Some(T0 + 600));

    clock.advance(DAY);
    let outcome = sweeper.sweep_due_batches(grace).await.unwrap();
    assert_eq!((outcome.expired, outcome.cancelled), (2, 0));
    for id in [&validating.id, &running.id] {
        let expired = get(&mut client, id).await;
        assert_eq!(expired.status(), S::Expired);
        assert_eq!(expired.expired_at, Some(T0 + 600 + DAY));
    }
    assert_eq!(get(&mut client, &done.id).await.status(), S::Completed);

    // Watchers see a timer's move like any other change, and the stream then ends.
    let message = watching.message().await.unwrap().unwrap();
    assert_eq!(message.r#type(), E::Change);
    assert_eq!(message.batch.unwrap().status(), S::Expired);
    assert!(watching.message().await.unwrap().is_none());
    assert_eq!(
        sweeper.sweep_due_batches(grace).await.unwrap(),
        Default::default()
    );
}

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
    let mut stream = client
        .watch_batch(pb::WatchBatchRequest {
            batch_id: batch.id.clone(),
            after_version: None,
        })
        .await
        .unwrap()
        .into_inner();
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

on_both_stores!(
    lifecycle_timers_expire_running_batches_and_finish_stuck_cancellations,
    metrics_are_served_in_prometheus_text_format,
);

/// With two replicas' sweepers on one database, each of 1,000 due batches is moved
/// exactly once: 1,000 transitions, 1,000 events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_sweepers_move_each_due_batch_exactly_once() {
    let clock = ManualClock::at(T0);
    let first_clock: Arc<dyn batchd::clock::Clock> = clock.clone();
    // The replicas' own periodic sweeps stay out of the way: the two sweeps below are
    // the ones counted.
    let hour = Duration::from_secs(3600);
    let first = TestApp::spawn_with(Backend::Postgres, |o| {
        o.clock = first_clock;
        o.sweep_interval = hour;
    })
    .await;
    let mut second_options = batchd::app::ServeOptions::local(first.db.url.clone());
    second_options.clock = clock.clone();
    second_options.sweep_interval = hour;
    let second = batchd::app::App::start(second_options).await.unwrap();

    let creator = service(&first);
    let caller = creator.authenticate(Some(&first.admin_key)).await.unwrap();
    let mut creates = JoinSet::new();
    for _ in 0..1_000 {
        let (creator, caller) = (creator.clone(), caller.clone());
        creates.spawn(async move {
            creator
                .create_batch(
                    &caller,
                    batchd::domain::CreateBatchInput {
                        input_file_id: "file-1".into(),
                        endpoint: "/v1/embeddings".into(),
                        completion_window: "24h".into(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap()
        });
    }
    while let Some(created) = creates.join_next().await {
        created.unwrap();
    }

    clock.advance(DAY);
    let grace = Duration::from_secs(600);
    let (a, b) = tokio::join!(
        creator.sweep_due_batches(grace),
        second.service().sweep_due_batches(grace)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.expired + b.expired, 1_000, "{a:?} {b:?}");

    let pool = sqlx::PgPool::connect(&first.db.url).await.unwrap();
    let expired_events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM batch_events WHERE snapshot->>'status' = 'expired'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(expired_events, 1_000);
    let versions: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT version FROM batches")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(versions, vec![2], "each batch moved once");
    second.stop().await.unwrap();
}

/// The OTLP receiver of the trace test: collects every exported span.
mod otlp {
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes;
    use axum::extract::State;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;

    /// A received span: trace id (hex), name, service name.
    pub type Spans = Arc<Mutex<Vec<(String, String, String)>>>;

    pub async fn start() -> (String, Spans) {
        let spans = Spans::default();
        let router = axum::Router::new()
            .route("/v1/traces", axum::routing::post(receive))
            .with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        (url, spans)
    }

    async fn receive(State(spans): State<Spans>, body: Bytes) -> &'static str {
        let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
        let mut spans = spans.lock().unwrap();
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let trace: String = span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                    spans.push((trace, span.name, service.clone()));
                }
            }
        }
        ""
    }
}

/// A caller's W3C trace continues through batchd into its store calls, and the spans
/// are exported over OTLP/HTTP to the standard OTEL_* endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_continue_the_callers_trace_and_are_exported_over_otlp() {
    let (endpoint, spans) = otlp::start().await;
    let db = TestDb::fresh(Backend::Sqlite).await;
    let mut command = crate::process::batchd(
        &[
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ],
        &db.url,
    );
    command
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_SERVICE_NAME", "batchd-under-test")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    let server = crate::process::Server::spawn(command).await;
    let key = server.first_key();
    let batch = create(&mut server.client(&key).await).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let mut request = tonic::Request::new(pb::GetBatchRequest {
        batch_id: batch.id.clone(),
    });
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    server.client(&key).await.get_batch(request).await.unwrap();

    let rest_trace = "0af7651916cd43dd8448eb211c80319c";
    let response = reqwest::Client::new()
        .get(format!(
            "http://{}/v1/batches/{}",
            server.http_addr, batch.id
        ))
        .bearer_auth(&key)
        .header(
            "traceparent",
            format!("00-{rest_trace}-b7ad6b7169203331-01"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let names_in = |trace: &str| -> HashSet<String> {
        spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _, _)| t == trace)
            .map(|(_, name, _)| name.clone())
            .collect()
    };
    eventually(Duration::from_secs(10), "the spans to be exported", || {
        let (grpc, rest) = (names_in(trace_id), names_in(rest_trace));
        async move {
            [
                "batchd.v1.BatchService/GetBatch",
                "authenticate",
                "get_batch",
                "store.get_batch",
            ]
            .iter()
            .all(|n| grpc.contains(*n))
                && ["GET /v1/batches/{batch_id}", "get_batch", "store.get_batch"]
                    .iter()
                    .all(|n| rest.contains(*n))
        }
    })
    .await;
    assert!(
        spans
            .lock()
            .unwrap()
            .iter()
            .all(|(_, _, service)| service.contains("batchd-under-test"))
    );
}

/// `--log-format json` writes one JSON object per line.
#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let db = TestDb::fresh(Backend::Sqlite).await;
    let mut command = crate::process::batchd(
        &[
            "--log-format",
            "json",
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ],
        &db.url,
    );
    command
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped());
    let server = crate::process::Server::spawn(command).await;
    server.signal("TERM");
    let output = server.child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() >= 2, "{stderr}");
    for line in &lines {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            entry["timestamp"].is_string() && entry["level"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"message\":\"batchd is serving\"")),
        "{stderr}"
    );
}

/// SIGTERM with 200 open watch streams and calls in flight: readiness fails at once,
/// calls keep being served during the delay, every call that started before the
/// signal completes, every stream ends with UNAVAILABLE, and the process exits 0
/// within the timeout although some clients never read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly_within_the_timeout() {
    let db = TestDb::fresh(Backend::Sqlite).await;
    let mut server = crate::process::Server::start(
        &db.url,
        &[
            "--shutdown-delay",
            "1s",
            "--shutdown-timeout",
            "8s",
            "--watch-heartbeat",
            "50ms",
            "--max-watches-per-key",
            "1000",
        ],
    )
    .await;
    let key = server.first_key();
    let mut client = server.client(&key).await;
    let batch = create(&mut client).await;

    // 150 streams that are read, 50 that never are (heartbeats pile up behind them).
    let mut readers = JoinSet::new();
    let mut unread = Vec::new();
    for i in 0..200 {
        let mut stream = server
            .client(&key)
            .await
            .watch_batch(pb::WatchBatchRequest {
                batch_id: batch.id.clone(),
                after_version: None,
            })
            .await
            .unwrap()
            .into_inner();
        if i < 150 {
            readers.spawn(async move {
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => return Code::Ok,
                        Err(status) => return status.code(),
                    }
                }
            });
        } else {
            unread.push(stream);
        }
    }

    // Unary calls in flight the whole time, each remembering when it started.
    let stop_calling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = JoinSet::new();
    for _ in 0..4 {
        let mut client = server.client(&key).await;
        let stop = stop_calling.clone();
        let id = batch.id.clone();
        callers.spawn(async move {
            let mut calls = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let outcome = client
                    .get_batch(pb::GetBatchRequest {
                        batch_id: id.clone(),
                    })
                    .await;
                calls.push((started, outcome.map(|_| ()).map_err(|s| s.code())));
            }
            calls
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let signalled = Instant::now();
    server.signal("TERM");
    // Readiness fails at once while calls are still served.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let readyz = reqwest::get(format!("http://{}/readyz", server.http_addr))
        .await
        .unwrap();
    assert_eq!(readyz.status(), 503);
    get(&mut client, &batch.id).await;

    let status = tokio::time::timeout(Duration::from_secs(12), server.child.wait())
        .await
        .expect("the process is gone within the timeout")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(9),
        "{:?}",
        signalled.elapsed()
    );
    stop_calling.store(true, std::sync::atomic::Ordering::Relaxed);

    while let Some(code) = readers.join_next().await {
        assert_eq!(code.unwrap(), Code::Unavailable);
    }
    let mut before_signal = 0;
    while let Some(calls) = callers.join_next().await {
        for (started, outcome) in calls.unwrap() {
            if started < signalled {
                before_signal += 1;
                assert_eq!(outcome, Ok(()), "a call started before SIGTERM failed");
            }
        }
    }
    assert!(before_signal > 10, "calls were in flight: {before_signal}");
    drop(unread);
}

/// The database goes away under load and comes back: requests meanwhile fail fast with
/// UNAVAILABLE (never a hang past their deadline), health says NOT_SERVING and then
/// SERVING again by itself, and every acknowledged write is in the database after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_outage_fails_fast_and_recovers_without_losing_acknowledged_writes() {
    let app = TestApp::spawn_with(Backend::Postgres, |o| {
        o.store.acquire_timeout = Duration::from_millis(500);
        o.health_check_interval = Duration::from_millis(200);
    })
    .await;
    let worker_key = app.key("executor", Scope::Worker).await;
    let mut client = app.client(&app.admin_key);
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(create(&mut client).await.id);
    }
    let db_name = app.db.url.rsplit('/').next().unwrap().to_owned();
    let admin = sqlx::PgPool::connect(&postgres_admin_url()).await.unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = JoinSet::new();
    for id in ids.clone() {
        let mut worker = app.worker(&worker_key);
        let stop = stop.clone();
        load.spawn(async move {
            let mut acknowledged = Vec::new();
            let mut failures = Vec::new();
            let mut step = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                step += 1;
                let mut request = tonic::Request::new(pb::UpdateBatchRequest {
                    batch_id: id.clone(),
                    request_counts: Some(pb::RequestCounts {
                        total: 1_000_000,
                        completed: step,
                        failed: 0,
                    }),
                    ..Default::default()
                });
                request.set_timeout(Duration::from_secs(3));
                let started = Instant::now();
                match worker.update_batch(request).await {
                    Ok(batch) => acknowledged.push((id.clone(), batch.into_inner().version)),
                    Err(status) => {
                        failures.push((status.code(), started.elapsed()));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (acknowledged, failures)
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The outage: no new connections, and the open ones cut.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {db_name} ALLOW_CONNECTIONS false"
    )))
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&db_name)
        .execute(&admin)
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(app.channel());
    let serving = |expected: i32| {
        let health = health.clone();
        move || {
            let mut health = health.clone();
            async move {
                health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .is_ok_and(|r| r.into_inner().status == expected)
            }
        }
    };
    use tonic_health::pb::health_check_response::ServingStatus;
    eventually(
        Duration::from_secs(5),
        "NOT_SERVING",
        serving(ServingStatus::NotServing as i32),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {db_name} ALLOW_CONNECTIONS true"
    )))
    .execute(&admin)
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "SERVING again",
        serving(ServingStatus::Serving as i32),
    )
    .await;
    // Requests succeed again by themselves.
    eventually(Duration::from_secs(10), "writes to succeed again", || {
        let mut worker = app.worker(&worker_key);
        let id = ids[0].clone();
        async move {
            worker
                .update_batch(pb::UpdateBatchRequest {
                    batch_id: id,
                    model: Some(format!("m{}", rand_suffix())),
                    ..Default::default()
                })
                .await
                .is_ok()
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut acknowledged = Vec::new();
    let mut failures = Vec::new();
    while let Some(done) = load.join_next().await {
        let (mut acks, mut fails) = done.unwrap();
        acknowledged.append(&mut acks);
        failures.append(&mut fails);
    }
    assert!(!failures.is_empty(), "the outage was felt");
    for (code, took) in &failures {
        assert_eq!(
            *code,
            Code::Unavailable,
            "failed with {code:?} after {took:?}"
        );
        assert!(
            *took < Duration::from_secs(3),
            "a request hung for {took:?}"
        );
    }
    let pool = sqlx::PgPool::connect(&app.db.url).await.unwrap();
    for (id, version) in &acknowledged {
        let logged: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM batch_events WHERE batch_id = $1 AND version = $2",
        )
        .bind(id)
        .bind(version)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(logged, 1, "acknowledged {id} v{version} is missing");
    }
    assert!(
        acknowledged.len() > 8,
        "writes went through before and after"
    );
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}
