//! The OpenAI-compatible REST shim: the exact JSON object, parity with gRPC, and
//! errors in OpenAI's envelope with the statuses the SDKs map.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use batchd::domain::{BatchId, Scope};
use batchd::proto::batchd::v1 as pb;
use pb::BatchStatus as S;
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;

/// 2026-01-01T00:00:00Z: golden files need a clock that stands still.
const T0: i64 = 1_767_225_600;

/// `in_progress` for `BATCH_STATUS_IN_PROGRESS`.
fn wire_name(status: S) -> String {
    status
        .as_str_name()
        .trim_start_matches("BATCH_STATUS_")
        .to_ascii_lowercase()
}

fn golden_path(status: S) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/golden/batch_{}.json", wire_name(status)))
}

/// Creates a batch and drives it to `target` with every field a batch in that status
/// can have, advancing the clock a minute per step.
async fn drive_to(app: &TestApp, clock: &ManualClock, target: S) -> pb::Batch {
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let mut request = new_batch();
    request.metadata = HashMap::from([("team".into(), "search".into())]);
    request.job_id = Some("job-42".into());
    request.remark = Some("nightly eval".into());
    request.output_expires_after = Some(pb::OutputExpiresAfter {
        anchor: "created_at".into(),
        seconds: 7 * 24 * 3600,
    });
    let mut batch = client.create_batch(request).await.unwrap().into_inner();
    let id = batch.id.clone();
    let update = |f: fn(&mut pb::UpdateBatchRequest)| {
        let mut update = pb::UpdateBatchRequest {
            batch_id: id.clone(),
            ..Default::default()
        };
        f(&mut update);
        update
    };
    let path: &[fn(&mut pb::UpdateBatchRequest)] = match target {
        S::Validating => &[],
        S::Failed => &[|u| {
            u.status = Some(S::Failed.into());
            u.errors = vec![pb::BatchError {
                code: "invalid_json_line".into(),
                line: Some(3),
                message: "line 3 is not valid JSON".into(),
                param: None,
            }];
        }],
        S::InProgress => &[start],
        S::Finalizing => &[start, progress, |u| u.status = Some(S::Finalizing.into())],
        S::Completed => &[
            start,
            progress,
            |u| u.status = Some(S::Finalizing.into()),
            finish,
        ],
        S::Expired => &[start, progress, |u| u.status = Some(S::Expired.into())],
        S::Cancelling | S::Cancelled => &[start, progress],
        S::Unspecified => unreachable!(),
    };
    for (i, step) in path.iter().enumerate() {
        // An expired batch expires after its window, not within it.
        let last = i + 1 == path.len();
        clock.advance(if target == S::Expired && last {
            86_400
        } else {
            60
        });
        batch = worker
            .update_batch(update(*step))
            .await
            .unwrap()
            .into_inner();
    }
    if matches!(target, S::Cancelling | S::Cancelled) {
        clock.advance(60);
        batch = client
            .cancel_batch(pb::CancelBatchRequest {
                batch_id: batch.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
    }
    if target == S::Cancelled {
        clock.advance(60);
        batch = worker
            .update_batch(update(|u| u.status = Some(S::Cancelled.into())))
            .await
            .unwrap()
            .into_inner();
    }
    assert_eq!(batch.status(), target);
    batch
}

fn start(u: &mut pb::UpdateBatchRequest) {
    u.status = Some(S::InProgress.into());
    u.request_counts = Some(pb::RequestCounts {
        total: 100,
        completed: 0,
        failed: 0,
    });
    u.model = Some("gpt-4o-mini-2024-07-18".into());
}

fn progress(u: &mut pb::UpdateBatchRequest) {
    u.request_counts = Some(pb::RequestCounts {
        total: 100,
        completed: 97,
        failed: 3,
    });
    u.errors = vec![pb::BatchError {
        code: "invalid_request".into(),
        line: Some(17),
        message: "max_tokens is too large".into(),
        param: Some("body.max_tokens".into()),
    }];
}

fn finish(u: &mut pb::UpdateBatchRequest) {
    u.status = Some(S::Completed.into());
    u.request_counts = Some(pb::RequestCounts {
        total: 100,
        completed: 97,
        failed: 3,
    });
    u.output_file_id = Some("file-out-1".into());
    u.error_file_id = Some("file-err-1".into());
    u.usage = Some(pb::Usage {
        input_tokens: 12_000,
        input_tokens_details: Some(pb::InputTokensDetails {
            cached_tokens: 2_000,
        }),
        output_tokens: 3_000,
        output_tokens_details: Some(pb::OutputTokensDetails {
            reasoning_tokens: 500,
        }),
        total_tokens: 15_000,
    });
}

/// Replaces the random parts (batch id, API key id) with fixed placeholders.
fn normalized(body: &str, batch: &pb::Batch) -> String {
    body.replace(&batch.id, "batch_GOLDEN")
        .replace(&batch.api_key_id, "key_GOLDEN")
}

async fn the_json_object_is_pinned_by_a_golden_file_for_every_status(backend: Backend) {
    let clock = ManualClock::at(T0);
    let clock_for_app: Arc<dyn batchd::clock::Clock> = clock.clone();
    let app = TestApp::spawn_with(backend, |o| o.clock = clock_for_app).await;
    let rest = app.rest(Some(&app.admin_key));
    for status in [
        S::Validating,
        S::Failed,
        S::InProgress,
        S::Finalizing,
        S::Completed,
        S::Expired,
        S::Cancelling,
        S::Cancelled,
    ] {
        let batch = drive_to(&app, &clock, status).await;
        let response = rest
            .request(Method::GET, &format!("/v1/batches/{}", batch.id))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body = normalized(&response.text().await.unwrap(), &batch);
        // The golden files are pretty-printed for review; the comparison is on the
        // exact compact bytes, so field order and number formats are pinned too.
        let golden = golden_path(status);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            let pretty: Value = serde_json::from_str(&body).unwrap();
            std::fs::write(
                &golden,
                serde_json::to_string_pretty(&pretty).unwrap() + "\n",
            )
            .unwrap();
        }
        let expected: Value = serde_json::from_str(&std::fs::read_to_string(&golden).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", golden.display()));
        assert_eq!(
            body,
            serde_json::to_string(&expected).unwrap(),
            "{} differs",
            golden.display()
        );
        clock.advance(3600);
    }
}

/// The gRPC message as OpenAI JSON, derived field by field here, independently of the
/// REST shim's own conversion.
fn grpc_as_json(b: &pb::Batch) -> Value {
    let status = wire_name(b.status());
    let counts = b.request_counts.unwrap();
    json!({
        "id": b.id, "object": b.object, "endpoint": b.endpoint,
        "errors": b.errors.as_ref().map(|e| json!({
            "object": e.object,
            "data": e.data.iter().map(|d| json!({
                "code": d.code, "line": d.line, "message": d.message, "param": d.param
            })).collect::<Vec<_>>(),
        })),
        "input_file_id": b.input_file_id, "completion_window": b.completion_window,
        "status": status, "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
        "created_at": b.created_at, "in_progress_at": b.in_progress_at,
        "expires_at": b.expires_at, "finalizing_at": b.finalizing_at,
        "completed_at": b.completed_at, "failed_at": b.failed_at, "expired_at": b.expired_at,
        "cancelling_at": b.cancelling_at, "cancelled_at": b.cancelled_at,
        "request_counts": {"total": counts.total, "completed": counts.completed, "failed": counts.failed},
        "metadata": (!b.metadata.is_empty()).then(|| b.metadata.clone()),
        "model": b.model,
        "usage": b.usage.map(|u| json!({
            "input_tokens": u.input_tokens,
            "input_tokens_details": {"cached_tokens": u.input_tokens_details.unwrap().cached_tokens},
            "output_tokens": u.output_tokens,
            "output_tokens_details": {"reasoning_tokens": u.output_tokens_details.unwrap().reasoning_tokens},
            "total_tokens": u.total_tokens,
        })),
        "job_id": b.job_id, "remark": b.remark, "user_id": b.user_id,
        "api_key_id": b.api_key_id, "version": b.version, "updated_at": b.updated_at,
        "output_expires_after": b.output_expires_after.as_ref().map(|e| json!({
            "anchor": e.anchor, "seconds": e.seconds,
        })),
        "progress_rate": b.progress_rate,
        "estimated_completion_at": b.estimated_completion_at,
        "stalled_at": b.stalled_at,
    })
}

async fn rest_and_grpc_carry_the_same_values_for_every_field(backend: Backend) {
    let clock = ManualClock::at(T0);
    let clock_for_app: Arc<dyn batchd::clock::Clock> = clock.clone();
    let app = TestApp::spawn_with(backend, |o| o.clock = clock_for_app).await;
    let rest = app.rest(Some(&app.admin_key));
    let mut client = app.client(&app.admin_key);
    for status in [S::Validating, S::Completed, S::Cancelled, S::Failed] {
        let driven = drive_to(&app, &clock, status).await;
        let via_grpc = get(&mut client, &driven.id).await;
        let (code, via_rest) = rest.get(&format!("/v1/batches/{}", driven.id)).await;
        assert_eq!(code, 200);
        assert_eq!(via_rest, grpc_as_json(&via_grpc), "{status:?}");
        let (_, listed) = rest.get("/v1/batches?limit=1").await;
        assert_eq!(listed["data"][0], via_rest);
    }
}

async fn errors_use_openais_envelope_and_status_codes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let rest = app.rest(Some(&app.admin_key));
    let assert_error = |(status, body): (u16, Value), expected_status: u16, param: Option<&str>| {
        assert_eq!(status, expected_status, "{body}");
        let error = &body["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert!(error["type"].is_string(), "{body}");
        assert!(
            error.get("code").is_some() && error.get("param").is_some(),
            "{body}"
        );
        assert_eq!(error["param"].as_str(), param, "{body}");
        body
    };
    let valid = || json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"});

    // 400, naming the field or parameter.
    for (path, param) in [
        ("/v1/batches?limit=0", "limit"),
        ("/v1/batches?limit=1000", "limit"),
        ("/v1/batches?limit=ten", "limit"),
        ("/v1/batches?status=done", "status"),
        ("/v1/batches?after=nope", "after"),
        ("/v1/batches/not-a-batch-id", "batch_id"),
    ] {
        assert_error(rest.get(path).await, 400, Some(param));
    }
    let mut cases = vec![];
    for (field, value) in [
        ("input_file_id", json!(5)),
        ("endpoint", json!("/v1/images")),
        ("completion_window", json!(null)),
        ("metadata", json!(["a"])),
        ("job_id", json!(false)),
    ] {
        let mut body = valid();
        body[field] = value;
        cases.push((body, field.to_owned()));
    }
    let mut body = valid();
    body["metadata"] = json!({"k": 1});
    cases.push((body, "metadata.k".into()));
    let mut body = valid();
    body.as_object_mut().unwrap().remove("endpoint");
    cases.push((body, "endpoint".into()));
    for (body, param) in cases {
        let response = assert_error(rest.post("/v1/batches", body).await, 400, Some(&param));
        assert_eq!(response["error"]["type"], "invalid_request_error");
    }
    // Unknown fields are ignored, as OpenAI does.
    let mut body = valid();
    body["priority"] = json!("high");
    assert_eq!(rest.post("/v1/batches", body).await.0, 200);

    // Bodies that are not JSON, not declared JSON, or too large.
    let post_raw = |content_type: &str, body: Vec<u8>| {
        Rest::send(
            rest.request(Method::POST, "/v1/batches")
                .header("content-type", content_type)
                .body(body),
        )
    };
    assert_error(
        post_raw("application/json", b"{\"input_file_id\":".to_vec()).await,
        400,
        None,
    );
    assert_error(
        post_raw("application/json", b"{} trailing".to_vec()).await,
        400,
        None,
    );
    assert_error(
        post_raw("text/plain", valid().to_string().into_bytes()).await,
        415,
        None,
    );
    let mut huge = valid();
    huge["remark"] = json!("x".repeat(2 * 1024 * 1024));
    assert_error(
        post_raw("application/json", huge.to_string().into_bytes()).await,
        413,
        None,
    );

    // 401 without a key or with an unknown one; 403 for the wrong scope.
    assert_error(app.rest(None).get("/v1/batches").await, 401, None);
    assert_error(
        app.rest(Some("bd_sk_unknown")).get("/v1/batches").await,
        401,
        None,
    );
    let worker_key = app.key("executor", Scope::Worker).await;
    assert_error(
        app.rest(Some(&worker_key))
            .post("/v1/batches", valid())
            .await,
        403,
        None,
    );

    // 404 for an unknown batch and for another tenant's batch: the same body.
    let (_, mine) = rest.post("/v1/batches", valid()).await;
    let mine = mine["id"].as_str().unwrap().to_owned();
    let stranger = app.rest(Some(&app.key("mallory", Scope::Batches).await));
    let unknown = BatchId::generate().to_string();
    let foreign = assert_error(
        stranger.get(&format!("/v1/batches/{mine}")).await,
        404,
        None,
    );
    let missing = assert_error(
        stranger.get(&format!("/v1/batches/{unknown}")).await,
        404,
        None,
    );
    assert_eq!(
        foreign.to_string().replace(&mine, "ID"),
        missing.to_string().replace(&unknown, "ID")
    );
    assert_error(
        stranger
            .post(&format!("/v1/batches/{mine}/cancel"), json!({}))
            .await,
        404,
        None,
    );

    // 409 for a transition the state machine refuses.
    let mut worker = app.worker(&app.admin_key);
    complete(&mut worker, &mine).await;
    let conflict = assert_error(
        rest.post(&format!("/v1/batches/{mine}/cancel"), json!({}))
            .await,
        409,
        None,
    );
    assert!(
        conflict["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`completed` to `cancelling`")
    );

    // Unknown routes and methods answer in the same envelope.
    assert_error(rest.get("/v1/files").await, 404, None);
    assert_error(
        Rest::send(rest.request(Method::DELETE, "/v1/batches")).await,
        405,
        None,
    );
}

async fn the_portkey_header_authenticates_like_bearer(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let key = app.key("alice", Scope::Batches).await;
    let portkey = |path: &str| {
        app.rest(None)
            .request(Method::GET, path)
            .header("x-portkey-api-key", key.as_str())
    };
    let (status, page) = Rest::send(portkey("/v1/batches")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["object"], "list");
    let (status, _) = Rest::send(
        app.rest(None)
            .request(Method::GET, "/v1/batches")
            .header("x-portkey-api-key", "bd_sk_wrong"),
    )
    .await;
    assert_eq!(status, 401);
}

async fn internal_errors_disclose_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let rest = app.rest(Some(&app.admin_key));
    let (_, batch) = rest
        .post(
            "/v1/batches",
            json!({"input_file_id": "f", "endpoint": "/v1/embeddings", "completion_window": "24h"}),
        )
        .await;
    let id = batch["id"].as_str().unwrap();
    // Corrupt the stored row behind batchd's back.
    corrupt_status(&app.db.url, id).await;
    let (status, body) = rest.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["message"], "internal error");
    assert_eq!(body["error"]["type"], "server_error");
    assert!(!body.to_string().contains("bogus"), "{body}");
}

async fn corrupt_status(url: &str, id: &str) {
    let sql = "UPDATE batches SET status = 'bogus' WHERE id = $1";
    if url.starts_with("sqlite") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        sqlx::query(sql).bind(id).execute(&pool).await.unwrap();
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::query(sql).bind(id).execute(&pool).await.unwrap();
    }
}

/// `PATCH /v1/batches/{id}` is UpdateBatch for executors without gRPC: the same rules,
/// the same errors, statuses as OpenAI's lowercase strings.
async fn a_worker_drives_a_batch_over_rest_patch(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let owner = app.rest(Some(&app.key("alice", Scope::Batches).await));
    let worker = app.rest(Some(&app.key("executor", Scope::Worker).await));
    let (_, batch) = owner
        .post(
            "/v1/batches",
            json!({"input_file_id": "file-1", "endpoint": "/v1/embeddings", "completion_window": "24h"}),
        )
        .await;
    let path = format!("/v1/batches/{}", batch["id"].as_str().unwrap());
    let patch =
        |rest: &Rest, body: Value| Rest::send(rest.request(Method::PATCH, &path).json(&body));

    let (status, running) = patch(
        &worker,
        json!({"status": "in_progress", "model": "text-embedding-3-small",
               "request_counts": {"total": 10, "completed": 0, "failed": 0}}),
    )
    .await;
    assert_eq!(status, 200, "{running}");
    assert_eq!(running["status"], "in_progress");
    assert!(running["in_progress_at"].is_i64());
    assert_eq!(running["version"], 2);
    let (status, progressed) = patch(
        &worker,
        json!({"expected_version": 2,
               "request_counts": {"total": 10, "completed": 9, "failed": 1},
               "errors": [{"code": "invalid_request", "line": 4, "message": "bad line"}],
               "usage": {"input_tokens": 30, "output_tokens": 0, "total_tokens": 30}}),
    )
    .await;
    assert_eq!(status, 200, "{progressed}");
    assert_eq!(progressed["errors"]["data"][0]["line"], 4);
    assert_eq!(
        progressed["usage"]["input_tokens_details"]["cached_tokens"],
        0
    );
    let (_, fetched) = owner.get(&path).await;
    assert_eq!(fetched, progressed, "GET sees what PATCH returned");

    // The same errors as gRPC, in OpenAI's envelope.
    for (body, code, param) in [
        (json!({"expected_version": 2, "model": "m"}), 409, None),
        (json!({"status": "completed"}), 409, None),
        (json!({"status": "done"}), 400, Some("status")),
        (json!({"stauts": "completed"}), 400, None),
        (
            json!({"usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 5}}),
            400,
            Some("usage.total_tokens"),
        ),
        (
            json!({"request_counts": {"total": 10, "completed": 1, "failed": 0}}),
            409,
            None,
        ),
        (json!({"model": "a\u{0}b"}), 400, Some("model")),
    ] {
        let (status, error) = patch(&worker, body.clone()).await;
        assert_eq!(status, code, "{body}: {error}");
        if let Some(param) = param {
            assert_eq!(error["error"]["param"], param, "{body}: {error}");
        }
    }
    let (status, error) = patch(&worker, json!({"stauts": "completed"})).await;
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stauts"),
        "{status}: {error}"
    );
    // A client key may not update.
    let (status, _) = patch(&owner, json!({"model": "m"})).await;
    assert_eq!(status, 403);
    let (_, after) = owner.get(&path).await;
    assert_eq!(after, progressed, "nothing written by the refused updates");
}

/// Every `google.api.http` annotation of the proto, as `(METHOD, path)`: what the
/// contract promises the REST shim serves.
fn http_annotations() -> Vec<(String, String)> {
    let proto = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/batchd/v1/batch.proto"),
    )
    .expect("read the proto");
    let mut annotations = Vec::new();
    for (at, _) in proto.match_indices("option (google.api.http)") {
        let body = &proto[at..];
        let body = &body[body.find('{').expect("an option body")..];
        // The option ends with `};` (paths hold braces of their own).
        let body = &body[..body.find("};").expect("an option body's end")];
        for method in ["get", "put", "post", "delete", "patch"] {
            for (at, _) in body.match_indices(&format!("{method}:")) {
                let quoted = &body[at + method.len() + 1..];
                let start = quoted.find('"').expect("a quoted path") + 1;
                let end = start + quoted[start..].find('"').expect("a closing quote");
                annotations.push((method.to_uppercase(), quoted[start..end].to_owned()));
            }
        }
    }
    annotations
}

/// The proto and the REST shim cannot drift apart: every path the proto annotates is
/// served (neither 404 "no route" nor 405) and listed in `/openapi.json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_annotation_of_the_proto_is_served_and_documented() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let annotations = http_annotations();
    assert!(annotations.len() >= 6, "{annotations:?}");
    let document: Value = reqwest::get(format!("http://{}/openapi.json", app.http_addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rest = app.rest(Some(&app.admin_key));
    for (method, path) in annotations {
        assert!(
            document["paths"][&path][method.to_lowercase()].is_object(),
            "{method} {path} is not in /openapi.json"
        );
        let mut url = path.replace("{batch_id}", &format!("batch_{}", "0".repeat(32)));
        if path == "/v1/batch_events" {
            // A valid request opens a stream that never ends; a bad cursor answers 400.
            url.push_str("?after_cursor=not-a-cursor");
        }
        let request = rest
            .request(method.parse().unwrap(), &url)
            .header("content-type", "application/json")
            .body("{}");
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        assert_ne!(status, 405, "{method} {path}: {body}");
        assert!(!body.contains("unknown_url"), "{method} {path}: {body}");
    }
}

on_both_stores!(
    a_worker_drives_a_batch_over_rest_patch,
    the_json_object_is_pinned_by_a_golden_file_for_every_status,
    rest_and_grpc_carry_the_same_values_for_every_field,
    errors_use_openais_envelope_and_status_codes,
    the_portkey_header_authenticates_like_bearer,
    internal_errors_disclose_nothing,
);

/// PostgreSQL only: with the database gone, REST answers 503 without detail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rest_answers_503_while_the_database_is_gone() {
    let app = TestApp::spawn_with(Backend::Postgres, |o| {
        o.store.acquire_timeout = std::time::Duration::from_millis(500);
    })
    .await;
    let rest = app.rest(Some(&app.admin_key));
    assert_eq!(rest.get("/v1/batches").await.0, 200);
    app.db.drop_postgres_database().await;
    let (status, body) = rest.get("/v1/batches").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["type"], "server_error");
    assert!(!body.to_string().contains("batchd_test"), "{body}");
}
