//! Hardening: what hostile clients, text a store cannot keep, oversized batches and
//! overflowing numbers do to batchd (a clear 4xx, nothing written), and that the
//! metrics cannot be grown by anyone without a key.

use std::time::Duration;

use batchd::proto::batchd::v1 as pb;
use pb::BatchStatus as S;
use tonic::Code;

use crate::helpers::*;

/// The lines of `/metrics` right now.
async fn metrics_text(app: &TestApp) -> String {
    reqwest::get(format!("http://{}/metrics", app.http_addr))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body")
}

/// A gRPC call to `path` (any path, served or not) without a key, with an empty body.
async fn call_raw(app: &TestApp, path: &str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(app.channel());
    grpc.ready().await.expect("channel ready");
    let path = http::uri::PathAndQuery::try_from(path).expect("a path");
    let codec = tonic_prost::ProstCodec::<pb::GetBatchRequest, pb::Batch>::default();
    grpc.unary(
        tonic::Request::new(pb::GetBatchRequest::default()),
        path,
        codec,
    )
    .await
    .expect_err("no such RPC, or no key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_rpcs_and_methods_cannot_grow_the_metrics() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    // Warm up: the label sets these requests can have at all appear once.
    call_raw(&app, "/xwarmup.Svc/M").await;
    let rest = reqwest::Client::new();
    let custom = reqwest::Method::from_bytes(b"WARMUP").unwrap();
    let _ = rest
        .request(custom, format!("http://{}/v1/batches", app.http_addr))
        .send()
        .await;
    let before = metrics_text(&app).await.lines().count();

    for i in 0..400 {
        let status = call_raw(&app, &format!("/x{i}r{}.Svc/M{i}", i * 7919)).await;
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    }
    for i in 0..100 {
        let method = reqwest::Method::from_bytes(format!("M{i}X").as_bytes()).unwrap();
        let _ = rest
            .request(method, format!("http://{}/v1/batches", app.http_addr))
            .send()
            .await
            .expect("HTTP answer");
        let _ = rest
            .get(format!("http://{}/nowhere/{i}", app.http_addr))
            .send()
            .await
            .expect("HTTP answer");
    }

    let text = metrics_text(&app).await;
    let after = text.lines().count();
    assert!(
        after <= before + 40,
        "500 made-up calls added {} lines to /metrics",
        after - before
    );
    assert!(!text.contains("x17r"), "a made-up path became a label");
    assert!(!text.contains("M17X"), "a made-up method became a label");
    assert!(text.contains(r#"route="unknown""#), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_family_is_there_from_the_start() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let text = metrics_text(&app).await;
    for series in [
        r#"batchd_db_errors_total{kind="unavailable"}"#,
        r#"batchd_db_errors_total{kind="internal"}"#,
        r#"batchd_sweeper_transitions_total{to="expired"}"#,
        r#"batchd_sweeper_transitions_total{to="cancelled"}"#,
        r#"batchd_watch_events_delivered_total{kind="change"}"#,
        "batchd_watch_streams_open",
        r#"route="batchd.v1.BatchService/CreateBatch",status="0"}"#,
        r#"route="batchd.v1.BatchWorkerService/UpdateBatch",status="0"}"#,
        r#"route="POST /v1/batches",status="200"}"#,
    ] {
        assert!(text.contains(series), "{series} is missing:\n{text}");
    }
}

async fn text_a_store_cannot_keep_is_refused_naming_the_field(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let rest = app.rest(Some(&app.admin_key));
    let valid = || {
        serde_json::json!({
            "input_file_id": "file-1",
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        })
    };
    for (field, edit) in [
        (
            "remark",
            Box::new(|b: &mut serde_json::Value| b["remark"] = "a\u{0}b".into())
                as Box<dyn Fn(&mut serde_json::Value)>,
        ),
        (
            "metadata",
            Box::new(|b: &mut serde_json::Value| {
                b["metadata"] = serde_json::json!({"k\u{0}": "v"})
            }),
        ),
        (
            "metadata.k",
            Box::new(|b: &mut serde_json::Value| {
                b["metadata"] = serde_json::json!({"k": "v\u{0}"})
            }),
        ),
        (
            "job_id",
            Box::new(|b: &mut serde_json::Value| b["job_id"] = "j\u{0}".into()),
        ),
        (
            "input_file_id",
            Box::new(|b: &mut serde_json::Value| b["input_file_id"] = "f\u{0}".into()),
        ),
    ] {
        let mut body = valid();
        edit(&mut body);
        let (status, json) = rest.post("/v1/batches", body).await;
        assert_eq!(status, 400, "{field}: {json}");
        assert_eq!(json["error"]["param"], field, "{json}");
    }
    let (_, list) = rest.get("/v1/batches").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "nothing created");

    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let batch = create(&mut client).await;
    let error = |code: &str, message: &str, param: Option<&str>| pb::BatchError {
        code: code.into(),
        line: None,
        message: message.into(),
        param: param.map(str::to_owned),
    };
    for (field, update) in [
        (
            "errors[0].code",
            pb::UpdateBatchRequest {
                errors: vec![error("c\0", "m", None)],
                ..Default::default()
            },
        ),
        (
            "errors[0].message",
            pb::UpdateBatchRequest {
                errors: vec![error("c", "m\0", None)],
                ..Default::default()
            },
        ),
        (
            "errors[0].param",
            pb::UpdateBatchRequest {
                errors: vec![error("c", "m", Some("p\0"))],
                ..Default::default()
            },
        ),
        (
            "model",
            pb::UpdateBatchRequest {
                model: Some("gpt\0".into()),
                ..Default::default()
            },
        ),
    ] {
        let result = worker
            .update_batch(pb::UpdateBatchRequest {
                batch_id: batch.id.clone(),
                ..update
            })
            .await;
        assert_status(result, Code::InvalidArgument, field);
    }
    assert_eq!(get(&mut client, &batch.id).await, batch, "nothing written");
}

async fn counts_that_overflow_are_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let batch = create(&mut client).await;
    let result = worker
        .update_batch(pb::UpdateBatchRequest {
            batch_id: batch.id.clone(),
            request_counts: Some(pb::RequestCounts {
                total: i64::MAX,
                completed: i64::MAX,
                failed: 1,
            }),
            ..Default::default()
        })
        .await;
    assert_status(result, Code::InvalidArgument, "request_counts");
    assert_eq!(get(&mut client, &batch.id).await, batch, "nothing written");
}

async fn a_batch_cannot_grow_past_what_a_default_client_reads(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let batch = create(&mut client).await;
    worker
        .update_batch(move_to(&batch.id, S::InProgress))
        .await
        .unwrap();
    // 25 errors of 4,000 two-byte characters per update: 200 kB a time, 6 MB in all
    // if nothing stopped it.
    let message = "é".repeat(4_000);
    let errors: Vec<pb::BatchError> = (0..25)
        .map(|line| pb::BatchError {
            code: "invalid_request".into(),
            line: Some(line),
            message: message.clone(),
            param: None,
        })
        .collect();
    let mut refused = None;
    for _ in 0..30 {
        let result = worker
            .update_batch(pb::UpdateBatchRequest {
                batch_id: batch.id.clone(),
                errors: errors.clone(),
                ..Default::default()
            })
            .await;
        if let Err(status) = result {
            refused = Some(status);
            break;
        }
    }
    let before = get(&mut client, &batch.id).await;
    let status = refused.expect("the update that would pass 1 MiB is refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("errors"), "{status:?}");

    // A client with the default 4 MiB receive limit reads it, and watches it.
    let stored = before.errors.as_ref().map_or(0, |e| e.data.len());
    assert!(stored > 0 && stored < 150, "{stored} errors stored");
    let text: usize = before
        .errors
        .iter()
        .flat_map(|e| &e.data)
        .map(|e| e.message.len() + e.code.len())
        .sum();
    assert!(text <= 1024 * 1024, "{text} bytes of errors");
    let mut stream = client
        .watch_batch(pb::WatchBatchRequest {
            batch_id: batch.id.clone(),
            after_version: None,
        })
        .await
        .expect("watch")
        .into_inner();
    let first = stream
        .message()
        .await
        .expect("snapshot")
        .expect("a message");
    assert_eq!(first.batch.expect("batch").version, before.version);
    // The refused update wrote nothing.
    assert_eq!(get(&mut client, &batch.id).await, before);
}

/// 64 writers at once for a while, with compaction running beside them: SQLite's busy
/// codes (extended ones included) must never surface as INTERNAL, and writers queue for
/// the write lock instead of failing.
async fn concurrent_writers_get_no_internal_and_no_spurious_unavailable(backend: Backend) {
    let seconds: u64 = std::env::var("BATCHD_TEST_WRITERS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    let until = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let batch = create(&mut client).await;
        let mut worker = app.worker(&app.admin_key);
        writers.spawn(async move {
            worker
                .update_batch(move_to(&batch.id, S::InProgress))
                .await?;
            let mut done = 0;
            while tokio::time::Instant::now() < until {
                done += 1;
                worker
                    .update_batch(pb::UpdateBatchRequest {
                        batch_id: batch.id.clone(),
                        request_counts: Some(pb::RequestCounts {
                            total: 1_000_000,
                            completed: done,
                            failed: 0,
                        }),
                        ..Default::default()
                    })
                    .await?;
            }
            Ok::<i64, tonic::Status>(done)
        });
    }
    let service = app.app.as_ref().unwrap().service().clone();
    let compactor = tokio::spawn(async move {
        while tokio::time::Instant::now() < until {
            service
                .compact_event_log(Duration::ZERO)
                .await
                .expect("compaction");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut updates = 0;
    while let Some(joined) = writers.join_next().await {
        match joined.expect("writer task") {
            Ok(done) => updates += done,
            Err(status) => panic!("a writer failed: {status:?}"),
        }
    }
    compactor.await.expect("compactor");
    assert!(updates > 64, "{updates} updates");
}

on_both_stores!(
    text_a_store_cannot_keep_is_refused_naming_the_field,
    counts_that_overflow_are_refused,
    a_batch_cannot_grow_past_what_a_default_client_reads,
    concurrent_writers_get_no_internal_and_no_spurious_unavailable,
);

/// batchd on PostgreSQL through a proxy the test controls, with short deadlines.
async fn behind_a_proxy(
    proxy: &crate::proxy::TcpProxy,
    edit: impl FnOnce(&mut batchd::app::ServeOptions),
) -> TestApp {
    TestApp::spawn_with(Backend::Postgres, |o| {
        o.database_url = proxy.postgres_url(&o.database_url);
        o.store.acquire_timeout = Duration::from_secs(1);
        o.health_check_interval = Duration::from_millis(200);
        edit(o);
    })
    .await
}

/// How long a call took and how it ended.
async fn timed<T>(call: impl std::future::Future<Output = T>) -> (Duration, T) {
    let started = tokio::time::Instant::now();
    let outcome = call.await;
    (started.elapsed(), outcome)
}

async fn ready(app: &TestApp) -> bool {
    reqwest::get(format!("http://{}/readyz", app.http_addr))
        .await
        .is_ok_and(|r| r.status() == 200)
}

/// A database that stops answering with its connections open (a partition): every
/// call ends UNAVAILABLE / 503 within the acquire timeout and a margin, readiness goes
/// off, and everything comes back by itself once the database answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_silent_database_fails_calls_fast_and_recovers_by_itself() {
    use crate::proxy::{Mode, TcpProxy, postgres_addr};
    let proxy = TcpProxy::start(postgres_addr()).await;
    let app = behind_a_proxy(&proxy, |_| {}).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let rest = app.rest(Some(&app.admin_key));
    let batch = create(&mut client).await;
    worker
        .update_batch(move_to(&batch.id, S::InProgress))
        .await
        .unwrap();
    // The watch opened before the outage must still end or carry on correctly after.
    let mut stream = client
        .watch_batch(pb::WatchBatchRequest {
            batch_id: batch.id.clone(),
            after_version: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());

    proxy.set(Mode::Frozen);
    // The acquire timeout is 1 s: each call ends well within 1 s plus a margin.
    let limit = Duration::from_millis(2_500);
    for _ in 0..3 {
        let (took, result) = timed(client.get_batch(pb::GetBatchRequest {
            batch_id: batch.id.clone(),
        }))
        .await;
        assert_eq!(result.unwrap_err().code(), Code::Unavailable);
        assert!(took < limit, "GetBatch took {took:?}");
    }
    let (took, result) = timed(worker.update_batch(pb::UpdateBatchRequest {
        batch_id: batch.id.clone(),
        model: Some("gpt".into()),
        ..Default::default()
    }))
    .await;
    assert_eq!(result.unwrap_err().code(), Code::Unavailable);
    assert!(took < limit, "UpdateBatch took {took:?}");
    let (took, (status, _)) = timed(rest.get("/v1/batches")).await;
    assert_eq!(status, 503);
    assert!(took < limit, "GET /v1/batches took {took:?}");
    let (took, (status, _)) = timed(rest.post("/v1/batches", serde_json::json!({
        "input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"
    })))
    .await;
    assert_eq!(status, 503);
    assert!(took < limit, "POST /v1/batches took {took:?}");
    eventually(Duration::from_secs(5), "readiness off", || async {
        !ready(&app).await
    })
    .await;

    proxy.set(Mode::Forward);
    eventually(Duration::from_secs(10), "readiness back", || async {
        ready(&app).await
    })
    .await;
    eventually(Duration::from_secs(10), "reads back", || {
        let mut client = client.clone();
        let batch_id = batch.id.clone();
        async move {
            client
                .get_batch(pb::GetBatchRequest { batch_id })
                .await
                .is_ok()
        }
    })
    .await;
    let updated = worker
        .update_batch(pb::UpdateBatchRequest {
            batch_id: batch.id.clone(),
            model: Some("gpt".into()),
            ..Default::default()
        })
        .await
        .expect("writes work again")
        .into_inner();
    // The watch delivers the change made after the outage, with nothing skipped.
    let next = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let message = stream.message().await.unwrap().expect("stream open");
            let batch = message.batch.expect("batch");
            if batch.version == updated.version {
                return batch;
            }
        }
    })
    .await
    .expect("the watch carries on after the outage");
    assert_eq!(next.model.as_deref(), Some("gpt"));
}

/// Made-up API keys by the hundred, on a slow database with a small pool: readiness
/// keeps its own connection and stays SERVING, and a key in memory keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_flood_of_unknown_keys_neither_fails_readiness_nor_starves_known_keys() {
    use crate::proxy::{Mode, TcpProxy, postgres_addr};
    let proxy = TcpProxy::start(postgres_addr()).await;
    let app = behind_a_proxy(&proxy, |o| {
        o.store.max_connections = 4;
        o.store.acquire_timeout = Duration::from_secs(3);
        o.health_check_interval = Duration::from_millis(1_000);
        o.caches.api_key_ttl = Duration::from_secs(600);
    })
    .await;
    let mut client = app.client(&app.admin_key);
    let batch = create(&mut client).await;
    assert!(ready(&app).await);

    proxy.set(Mode::Delayed(Duration::from_millis(40)));
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..300 {
        let mut intruder = app.client(&format!("made-up-key-{i}"));
        let id = batch.id.clone();
        flood.spawn(async move {
            intruder
                .get_batch(pb::GetBatchRequest { batch_id: id })
                .await
                .unwrap_err()
                .code()
        });
    }
    // While the flood runs: readiness on, the known key served.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            ready(&app).await,
            "readiness failed under a flood of unknown keys"
        );
        let (took, result) = timed(client.get_batch(pb::GetBatchRequest {
            batch_id: batch.id.clone(),
        }))
        .await;
        assert!(result.is_ok(), "{result:?}");
        assert!(took < Duration::from_secs(2), "a known key waited {took:?}");
    }
    while let Some(code) = flood.join_next().await {
        let code = code.unwrap();
        assert!(
            matches!(code, Code::Unauthenticated | Code::Unavailable),
            "{code:?}"
        );
    }
}
