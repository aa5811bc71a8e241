//! Many tenants for months: deleting batches (by request and by retention), the
//! active-batch quota per owner (exact across replicas), and per-key request rates,
//! through the real app on both stores.

use std::sync::Arc;
use std::time::Duration;

use batchd::app::{App, ServeOptions};
use batchd::domain::{
    ApiKey, Batch, BatchPolicy, BatchStatus, BatchUpdate, BatchUpdateInput, Caller,
    CreateBatchInput, NewBatch, Scope,
};
use batchd::proto::batchd::v1 as pb;
use batchd::request_rates::RequestRateOptions;
use batchd::store::Store;
use pb::BatchStatus as S;
use pb::FeedEventType as F;
use reqwest::Method;
use serde_json::{Value, json};
use tonic::Code;
use tonic_types::StatusExt;

use crate::change_feed::{RawSse, next_event, watch_all};
use crate::helpers::*;

on_both_stores!(
    deleting_a_batch_follows_openais_rules_over_rest_and_grpc,
    a_deleted_batch_ends_its_history_in_the_change_feed_with_deleted,
    an_owners_active_batches_are_capped_and_an_ended_batch_frees_its_slot,
    a_key_over_its_request_rate_is_told_when_to_retry_and_other_keys_go_on,
    retention_deletes_every_batch_ended_before_it_and_nothing_else,
);

/// `DELETE path` with the client's key: the status and the JSON body.
async fn delete(rest: &Rest, path: &str) -> (u16, Value) {
    Rest::send(rest.request(Method::DELETE, path)).await
}

/// A batch of the REST client's owner, in `validating`.
async fn rest_create(rest: &Rest) -> String {
    let (status, body) = rest
        .post(
            "/v1/batches",
            json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions",
                   "completion_window": "24h", "metadata": {"team": "ml"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

async fn deleting_a_batch_follows_openais_rules_over_rest_and_grpc(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let alice_key = app.key("alice", Scope::Batches).await;
    let bob_key = app.key("bob", Scope::Batches).await;
    let worker_key = app.key("workers", Scope::Worker).await;
    let (alice, bob, workers) = (
        app.rest(Some(&alice_key)),
        app.rest(Some(&bob_key)),
        app.rest(Some(&worker_key)),
    );
    let mut worker = app.worker(&worker_key);
    let id = rest_create(&alice).await;
    let path = format!("/v1/batches/{id}");

    let (status, body) = delete(&alice, &path).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "invalid_state");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("validating"),
        "{body}"
    );
    let (status, body) = delete(&workers, &path).await;
    assert_eq!(status, 403, "{body}");
    // A malformed id is refused before any database work, naming it, as a read does.
    for bad in [
        "not-an-id",
        "batch_%00",
        &format!("batch_{}", "a".repeat(10_000)),
    ] {
        let (status, body) = delete(&alice, &format!("/v1/batches/{bad}")).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], "batch_id");
    }
    // A made-up id and another tenant's batch get exactly what a read gets: the same
    // lookup, before any write.
    let made_up = "/v1/batches/batch_0123456789abcdef0123456789abcdef";
    let read = alice.get(made_up).await;
    assert_eq!(read.0, 404);
    assert_eq!(delete(&alice, made_up).await, read);
    let read = bob.get(&path).await;
    assert_eq!(read.0, 404);
    assert_eq!(delete(&bob, &path).await, read);

    assert_eq!(
        alice.post(&format!("{path}/cancel"), json!({})).await.0,
        200
    );
    let (status, body) = delete(&alice, &path).await;
    assert_eq!(status, 409);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cancelling"),
        "{body}"
    );
    move_through(&mut worker, &id, &[S::Cancelled]).await;
    // Read once, so that this replica remembers it as terminal.
    assert_eq!(alice.get(&path).await.1["status"], "cancelled");

    let (status, body) = delete(&alice, &path).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"id": id, "object": "batch.deleted", "deleted": true})
    );
    assert_eq!(alice.get(&path).await, read_of_missing(&alice, &id).await);
    assert_eq!(delete(&alice, &path).await.0, 404, "deleted once");
    let (_, listed) = alice.get("/v1/batches").await;
    assert_eq!(listed["data"], json!([]));
    let (_, by_metadata) = alice.get("/v1/batches?metadata[team]=ml").await;
    assert_eq!(by_metadata["data"], json!([]));
    let (_, counts) = alice.get("/v1/batch_counts").await;
    assert_eq!(counts["total"], 0, "{counts}");

    // gRPC: the same rules.
    let mut client = app.client(&alice_key);
    let running = create(&mut client).await;
    assert_status(
        client
            .delete_batch(pb::DeleteBatchRequest {
                batch_id: running.id.clone(),
            })
            .await,
        Code::FailedPrecondition,
        "validating",
    );
    assert_status(
        app.client(&worker_key)
            .delete_batch(pb::DeleteBatchRequest {
                batch_id: running.id.clone(),
            })
            .await,
        Code::PermissionDenied,
        "delete batches",
    );
    // A made-up id and another tenant's batch: NOT_FOUND, as GetBatch answers.
    let made_up = "batch_0123456789abcdef0123456789abcdef".to_owned();
    for (mut caller, id) in [
        (app.client(&alice_key), made_up),
        (app.client(&bob_key), running.id.clone()),
    ] {
        let read = caller
            .get_batch(pb::GetBatchRequest {
                batch_id: id.clone(),
            })
            .await
            .unwrap_err();
        let deleted = caller
            .delete_batch(pb::DeleteBatchRequest { batch_id: id })
            .await
            .unwrap_err();
        assert_eq!(read.code(), Code::NotFound, "{read:?}");
        assert_eq!(
            (deleted.code(), deleted.message()),
            (read.code(), read.message())
        );
    }
    complete(&mut worker, &running.id).await;
    let deleted = client
        .delete_batch(pb::DeleteBatchRequest {
            batch_id: running.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        deleted,
        pb::DeleteBatchResponse {
            id: running.id.clone(),
            object: "batch.deleted".into(),
            deleted: true,
        }
    );
    assert_status(
        client
            .get_batch(pb::GetBatchRequest {
                batch_id: running.id.clone(),
            })
            .await,
        Code::NotFound,
        &running.id,
    );
    // An admin may delete any owner's batch. Its idempotency key goes with it: the
    // same request, sent again, makes a new batch.
    let create_once = || {
        alice
            .request(Method::POST, "/v1/batches")
            .header("Idempotency-Key", "third")
            .json(
                &json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions",
                          "completion_window": "24h"}),
            )
    };
    let (status, third) = Rest::send(create_once()).await;
    assert_eq!(status, 200, "{third}");
    let third = third["id"].as_str().unwrap().to_owned();
    assert_eq!(Rest::send(create_once()).await.1["id"], third, "a repeat");
    move_through(&mut worker, &third, &[S::Failed]).await;
    let admin = app.rest(Some(&app.admin_key));
    assert_eq!(delete(&admin, &format!("/v1/batches/{third}")).await.0, 200);
    let (status, fourth) = Rest::send(create_once()).await;
    assert_eq!(status, 200, "{fourth}");
    assert_ne!(fourth["id"], third, "a new batch, not the deleted one");
    assert_eq!(alice.get(&format!("/v1/batches/{third}")).await.0, 404);

    let text = metrics_text(&app).await;
    assert_eq!(
        metric_value(&text, "batchd_batches_deleted_total{reason=\"request\"}"),
        3.0
    );
}

/// What a read of a batch that never existed answers, for comparison.
async fn read_of_missing(rest: &Rest, id: &str) -> (u16, Value) {
    let (status, mut body) = rest
        .get("/v1/batches/batch_0123456789abcdef0123456789abcdef")
        .await;
    let message = body["error"]["message"]
        .as_str()
        .unwrap()
        .replace("batch_0123456789abcdef0123456789abcdef", id);
    body["error"]["message"] = message.into();
    (status, body)
}

async fn a_deleted_batch_ends_its_history_in_the_change_feed_with_deleted(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let alice_key = app.key("alice", Scope::Batches).await;
    let mut client = app.client(&alice_key);
    let mut worker = app.worker(&app.admin_key);

    let mut everything = watch_all(&mut client, pb::WatchBatchesRequest::default())
        .await
        .unwrap();
    let synced = next_event(&mut everything).await;
    assert_eq!(synced.r#type(), F::Synced);
    // Follows running batches only: it hears the batch leave, then nothing of it.
    let mut running_only = watch_all(
        &mut client,
        pb::WatchBatchesRequest {
            statuses: vec![S::Validating.into(), S::InProgress.into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(next_event(&mut running_only).await.r#type(), F::Synced);

    let batch = create(&mut client).await;
    move_through(&mut worker, &batch.id, &[S::Failed]).await;
    client
        .delete_batch(pb::DeleteBatchRequest {
            batch_id: batch.id.clone(),
        })
        .await
        .unwrap();
    let later = create(&mut client).await;

    let kinds = |stream_events: Vec<pb::WatchBatchesResponse>| -> Vec<(F, String)> {
        stream_events
            .into_iter()
            .map(|m| {
                let kind = m.r#type();
                (kind, m.batch.map(|b| b.id).unwrap_or(m.batch_id))
            })
            .collect()
    };
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_event(&mut everything).await);
    }
    let deletion = seen[2].clone();
    assert_eq!(
        kinds(seen),
        [
            (F::Change, batch.id.clone()),
            (F::Change, batch.id.clone()),
            (F::Deleted, batch.id.clone()),
            (F::Change, later.id.clone()),
        ]
    );
    assert!(deletion.batch.is_none(), "a deletion names the batch only");
    assert!(!deletion.cursor.is_empty());
    let mut filtered = Vec::new();
    for _ in 0..3 {
        filtered.push(next_event(&mut running_only).await);
    }
    assert_eq!(
        kinds(filtered),
        [
            (F::Change, batch.id.clone()),
            (F::LeftFilter, batch.id.clone()),
            (F::Change, later.id.clone()),
        ]
    );

    // A watcher resuming from before the deletion learns of it too, over SSE as well.
    let mut resumed = watch_all(
        &mut client,
        pb::WatchBatchesRequest {
            after_cursor: Some(synced.cursor.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut again = Vec::new();
    for _ in 0..3 {
        again.push(next_event(&mut resumed).await.r#type());
    }
    assert_eq!(again, [F::Change, F::Change, F::Deleted]);
    let response = app
        .rest(Some(&alice_key))
        .request(Method::GET, "/v1/batch_events")
        .header("Last-Event-ID", synced.cursor.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut sse = RawSse {
        response,
        buffer: String::new(),
    };
    let mut events = Vec::new();
    while events.len() < 3 {
        events.push(sse.next_event().await);
    }
    // Sealed cursors differ on every sealing; the two must name one position.
    let sealer = app.app.as_ref().unwrap().hub().cursor_sealer().clone();
    let open = |text: &str| sealer.open("cursor", text, Some("alice")).unwrap();
    let cursor = events[2].id.clone().expect("a deletion has a cursor");
    assert_eq!(events[2].event, "deleted");
    assert_eq!(
        events[2].data,
        json!({"type": "deleted", "cursor": cursor, "batch_id": batch.id})
    );
    assert_eq!(open(&cursor), open(&deletion.cursor));

    // Its own stream is gone with it, over gRPC and over SSE.
    assert_status(
        client
            .watch_batch(pb::WatchBatchRequest {
                batch_id: batch.id.clone(),
                after_version: Some(1),
            })
            .await,
        Code::NotFound,
        &batch.id,
    );
    let (status, body) = app
        .rest(Some(&alice_key))
        .get(&format!("/v1/batches/{}/watch", batch.id))
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&batch.id),
        "{body}"
    );
}

async fn an_owners_active_batches_are_capped_and_an_ended_batch_frees_its_slot(backend: Backend) {
    let app = TestApp::spawn_with(backend, |o| o.max_active_batches_per_owner = 2).await;
    let alice_key = app.key("alice", Scope::Batches).await;
    let alice = app.rest(Some(&alice_key));
    let create_once = |key: &'static str| {
        alice
            .request(Method::POST, "/v1/batches")
            .header("Idempotency-Key", key)
            .json(
                &json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions",
                          "completion_window": "24h"}),
            )
    };
    let (status, first) = Rest::send(create_once("first")).await;
    assert_eq!(status, 200);
    let second = rest_create(&alice).await;

    let response = alice
        .request(Method::POST, "/v1/batches")
        .json(
            &json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions",
                      "completion_window": "24h"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["x-should-retry"], "false");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "active_batch_limit_reached");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2 active batches"),
        "{body}"
    );
    assert_status(
        app.client(&alice_key).create_batch(new_batch()).await,
        Code::ResourceExhausted,
        "2 active batches",
    );
    // A repeat of a create that went through is its batch, not a new one.
    let (status, repeat) = Rest::send(create_once("first")).await;
    assert_eq!(status, 200);
    assert_eq!(repeat["id"], first["id"]);
    // Another owner has its own quota.
    let bob = app.rest(Some(&app.key("bob", Scope::Batches).await));
    rest_create(&bob).await;

    // A batch that ends frees its slot at once.
    move_through(&mut app.worker(&app.admin_key), &second, &[S::Failed]).await;
    rest_create(&alice).await;
    assert_eq!(Rest::send(create_once("third")).await.0, 429);

    let (_, listed) = alice.get("/v1/batches").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 3);
    let text = metrics_text(&app).await;
    assert_eq!(metric_value(&text, "batchd_quota_refused_total"), 3.0);
}

/// 24 creates of one owner at once, on two replicas of one PostgreSQL database, under
/// a quota of 5: exactly 5 batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_replicas_under_one_quota_make_exactly_that_many_batches() {
    let first =
        TestApp::spawn_with(Backend::Postgres, |o| o.max_active_batches_per_owner = 5).await;
    let mut options = ServeOptions::local(first.db.url.clone());
    options.max_active_batches_per_owner = 5;
    let second = App::start(options)
        .await
        .expect("the second replica starts");
    let key = first.key("alice", Scope::Batches).await;
    let client = reqwest::Client::new();
    let mut creates = tokio::task::JoinSet::new();
    for i in 0..24 {
        let http = if i % 2 == 0 {
            first.http_addr
        } else {
            second.http_addr()
        };
        let (client, key) = (client.clone(), key.clone());
        creates.spawn(async move {
            let response = client
                .post(format!("http://{http}/v1/batches"))
                .bearer_auth(key)
                .json(
                    &json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions",
                              "completion_window": "24h"}),
                )
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (status, body["error"]["code"].as_str().map(str::to_owned))
        });
    }
    let mut answers = creates.join_all().await;
    answers.sort();
    // Refused by the quota, each of them: not by a turn that timed out.
    let refused = (429, Some("active_batch_limit_reached".to_owned()));
    assert_eq!(answers, [vec![(200, None); 5], vec![refused; 19]].concat());
    let (_, listed) = first.rest(Some(&key)).get("/v1/batches?limit=100").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 5);
    second.stop().await.unwrap();
}

/// A replica that has a terminal batch in memory (it never changes, so reads of it
/// skip the database) forgets it when another replica deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_batch_deleted_on_one_replica_is_gone_from_the_others_memory() {
    let first = TestApp::spawn(Backend::Postgres).await;
    let second = App::start(ServeOptions::local(first.db.url.clone()))
        .await
        .expect("the second replica starts");
    let key = first.key("alice", Scope::Batches).await;
    let on_first = first.rest(Some(&key));
    let id = rest_create(&on_first).await;
    move_through(&mut first.worker(&first.admin_key), &id, &[S::Failed]).await;
    let path = format!("/v1/batches/{id}");
    let client = reqwest::Client::new();
    let read_on_second = || {
        let request = client
            .get(format!("http://{}{path}", second.http_addr()))
            .bearer_auth(&key);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    // The second replica reads the batch, then answers from memory: a change behind
    // its back (impossible for a terminal batch but for this test) does not show. A
    // late announcement of the move to failed may make it forget once: read again.
    let mut db = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&first.db.url).await.unwrap()
    };
    let model_on_second = || {
        let request = client
            .get(format!("http://{}{path}", second.http_addr()))
            .bearer_auth(&key);
        async move {
            let batch: Value = request.send().await.unwrap().json().await.unwrap();
            batch["model"].clone()
        }
    };
    let mut attempt = 0;
    loop {
        let before = model_on_second().await;
        attempt += 1;
        let behind = format!("changed-behind-its-back-{attempt}");
        sqlx::query("UPDATE batches SET model = $2 WHERE id = $1")
            .bind(&id)
            .bind(&behind)
            .execute(&mut db)
            .await
            .unwrap();
        if model_on_second().await == before {
            break; // from memory
        }
        assert!(
            attempt < 50,
            "the second replica never answered from memory"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(read_on_second().await, 200);

    assert_eq!(delete(&on_first, &path).await.0, 200);
    eventually(
        Duration::from_secs(5),
        "the other replica to forget the batch",
        || async { read_on_second().await == 404 },
    )
    .await;
    second.stop().await.unwrap();
}

async fn a_key_over_its_request_rate_is_told_when_to_retry_and_other_keys_go_on(backend: Backend) {
    let app = TestApp::spawn_with(backend, |o| {
        o.request_rates = Some(RequestRateOptions {
            per_second: 1.0,
            burst: 3,
        })
    })
    .await;
    let alice_key = app.key("alice", Scope::Batches).await;
    let alice = app.rest(Some(&alice_key));
    let header = |response: &reqwest::Response, name: &str| -> String {
        response.headers()[name].to_str().unwrap().to_owned()
    };
    // A token a second: the bucket is full again a second after each one taken. (A
    // slower rate would only lengthen the test; a faster one could refill a token
    // between two of these requests on a busy machine.)
    for (remaining, reset) in [("2", "1s"), ("1", "2s"), ("0", "3s")] {
        let response = alice
            .request(Method::GET, "/v1/batches")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-ratelimit-limit-requests"), "3");
        assert_eq!(
            header(&response, "x-ratelimit-remaining-requests"),
            remaining
        );
        assert_eq!(header(&response, "x-ratelimit-reset-requests"), reset);
    }
    let refused = alice
        .request(Method::GET, "/v1/batches")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "retry-after"), "1");
    let wait_ms: u64 = header(&refused, "retry-after-ms").parse().unwrap();
    assert!(
        (1..=1_000).contains(&wait_ms),
        "{wait_ms} ms: one token a second"
    );
    assert_eq!(header(&refused, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(header(&refused, "x-ratelimit-limit-requests"), "3");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");

    // Over gRPC: RESOURCE_EXHAUSTED, with when to retry as RetryInfo.
    let status = app
        .client(&alice_key)
        .list_batches(pb::ListBatchesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let retry = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("a RetryInfo detail");
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(1),
        "{retry:?}"
    );

    // Another key has its own bucket. Every authenticated answer carries the budget,
    // a refusal of another kind too; opening a stream takes one token, once.
    let bob_key = app.key("bob", Scope::Batches).await;
    let bob = app.rest(Some(&bob_key));
    assert_eq!(bob.get("/v1/batches").await.0, 200);
    let missing = bob
        .request(
            Method::GET,
            "/v1/batches/batch_0123456789abcdef0123456789abcdef",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(header(&missing, "x-ratelimit-remaining-requests"), "1");
    let stream = bob
        .request(Method::GET, "/v1/batch_events")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(header(&stream, "x-ratelimit-remaining-requests"), "0");
    assert_status(
        app.client(&bob_key)
            .watch_batches(pb::WatchBatchesRequest::default())
            .await,
        Code::ResourceExhausted,
        "requests per second",
    );
    drop(stream);

    // Probes, metrics, the console's files and unknown keys take no token.
    let console = reqwest::get(format!("http://{}/console/", app.http_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let asset = console
        .split('"')
        .find(|part| part.starts_with("assets/"))
        .map(|relative| format!("/console/{relative}"))
        .expect("the console's page names its assets");
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/console/",
        asset.as_str(),
    ] {
        for _ in 0..5 {
            let response = reqwest::get(format!("http://{}{path}", app.http_addr))
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{path}");
            assert!(
                !response
                    .headers()
                    .contains_key("x-ratelimit-limit-requests")
            );
        }
    }
    let unknown = app
        .rest(Some("bd_sk_unknown"))
        .request(Method::GET, "/v1/batches")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 401);
    assert!(!unknown.headers().contains_key("x-ratelimit-limit-requests"));

    // After the wait it named, the key gets through again.
    tokio::time::sleep(Duration::from_millis(wait_ms + 10)).await;
    assert_eq!(alice.get("/v1/batches").await.0, 200);

    let text = metrics_text(&app).await;
    assert_eq!(
        metric_value(&text, "batchd_rate_limited_total{transport=\"http\"}"),
        1.0
    );
    assert_eq!(
        metric_value(&text, "batchd_rate_limited_total{transport=\"grpc\"}"),
        2.0
    );
}

/// Batches seeded straight into the store, as a worker would have left them.
const SEEDED: usize = 10_000;

/// A new batch of `owner` created at `now`, with metadata.
fn seeded(owner: &str, now: i64) -> Batch {
    let input = CreateBatchInput {
        input_file_id: "file-abc123".into(),
        endpoint: "/v1/chat/completions".into(),
        completion_window: "24h".into(),
        metadata: Some([("team".to_owned(), "ml".to_owned())].into()),
        ..Default::default()
    };
    let new = NewBatch::parse(input, &BatchPolicy::default()).expect("a valid request");
    let key = ApiKey::new(owner, Scope::Batches, now).expect("a valid user");
    Batch::create(new, &Caller::of(&key), now)
}

/// `batch` failed at `now`.
fn failed(batch: &Batch, now: i64) -> Batch {
    let update = BatchUpdate::parse(BatchUpdateInput {
        status: Some(BatchStatus::Failed),
        ..Default::default()
    })
    .expect("a valid update");
    batch.apply(&update, now).unwrap().unwrap()
}

/// `count` failed batches of the owner `tenant`, created and ended two hours ago (past
/// the tests' retention of an hour), written straight into the store.
async fn seed_ended_batches(store: &Arc<dyn Store>, backend: Backend, count: usize) {
    let long_ago = batchd::clock::wall_clock_ms() / 1_000 - 7_200;
    // SQLite has one writer: seeding from several tasks would only make them wait.
    let tasks = if backend == Backend::Sqlite { 1 } else { 4 };
    assert_eq!(count % (tasks * 500), 0, "every task seeds whole chunks");
    let mut seeds = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let store = store.clone();
        seeds.spawn(async move {
            for chunk in 0..count / tasks / 500 {
                let batches: Vec<Batch> = (0..500).map(|_| seeded("tenant", long_ago)).collect();
                for batch in &batches {
                    store.insert_batch(batch, None).await.unwrap();
                }
                let ended: Vec<Arc<Batch>> = batches
                    .iter()
                    .map(|b| Arc::new(failed(b, long_ago)))
                    .collect();
                let written = store.commit_changes(&ended).await.unwrap();
                assert!(
                    written.iter().all(|&w| w),
                    "seed task {task}, chunk {chunk}"
                );
            }
        });
    }
    seeds.join_all().await;
}

async fn retention_deletes_every_batch_ended_before_it_and_nothing_else(backend: Backend) {
    let app = TestApp::spawn_with(backend, |o| {
        o.retention_terminal = Some(Duration::from_secs(3_600));
        o.retention_sweep_interval = Duration::from_millis(200);
        o.event_retention = Duration::from_secs(1);
        o.event_compaction_interval = Duration::from_millis(500);
    })
    .await;
    let store = app.store().await;
    seed_ended_batches(&store, backend, SEEDED).await;

    // Live: running for long, and ended within the retention.
    let key = app.key("tenant", Scope::Batches).await;
    let rest = app.rest(Some(&key));
    let mut worker = app.worker(&app.admin_key);
    let running = rest_create(&rest).await;
    move_through(&mut worker, &running, &[S::InProgress]).await;
    let recent = rest_create(&rest).await;
    move_through(&mut worker, &recent, &[S::Failed]).await;

    eventually(
        Duration::from_secs(60),
        "every seeded batch to be deleted",
        || async {
            let counts = store.count_batches(&Default::default()).await.unwrap();
            counts.iter().map(|(_, n)| n).sum::<i64>() == 2
        },
    )
    .await;
    assert_eq!(rest.get(&format!("/v1/batches/{running}")).await.0, 200);
    assert_eq!(rest.get(&format!("/v1/batches/{recent}")).await.0, 200);
    let (_, listed) = rest.get("/v1/batches?metadata[team]=ml").await;
    let mut ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut live = [running.as_str(), recent.as_str()];
    live.sort();
    assert_eq!(
        ids, live,
        "the deleted batches' metadata rows went with them"
    );
    // Counted once each deletion has committed: a moment after the rows are gone.
    retention_deletions_counted(&app, SEEDED).await;
    // The tables shrink back: compaction removes the deleted batches' history too.
    eventually(
        Duration::from_secs(60),
        "the event log to shrink back",
        || async { row_count(&app.db, "batch_events").await <= 4 },
    )
    .await;
    assert_eq!(row_count(&app.db, "batches").await, 2);
    assert_eq!(row_count(&app.db, "batch_metadata").await, 2);
}

/// Two replicas sweeping one PostgreSQL database delete each batch once, each deletion
/// logged once, in transactions of at most a chunk each (so the change feed, which
/// holds back everything from the oldest running transaction on, keeps moving).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_replicas_sweep_each_batch_once_in_short_transactions() {
    use std::collections::{BTreeMap, HashSet};

    const BATCHES: usize = 4_000;
    // The replica the watcher reads from does not sweep.
    let first = TestApp::spawn(Backend::Postgres).await;
    let key = first.key("tenant", Scope::Batches).await;
    let mut client = first.client(&key);
    let mut feed = watch_all(&mut client, pb::WatchBatchesRequest::default())
        .await
        .unwrap();
    assert_eq!(next_event(&mut feed).await.r#type(), F::Synced);
    seed_ended_batches(&first.store().await, Backend::Postgres, BATCHES).await;

    let sweeper = || {
        let mut options = ServeOptions::local(first.db.url.clone());
        options.retention_terminal = Some(Duration::from_secs(3_600));
        options.retention_sweep_interval = Duration::from_millis(200);
        App::start(options)
    };
    let (one, two) = (sweeper().await.unwrap(), sweeper().await.unwrap());

    let sealer = first.app.as_ref().unwrap().hub().cursor_sealer().clone();
    let mut deleted = HashSet::new();
    let mut per_transaction: BTreeMap<i64, usize> = BTreeMap::new();
    let mut deletions = 0;
    while deletions < BATCHES {
        let event = next_event(&mut feed).await;
        if event.r#type() == F::Deleted {
            deletions += 1;
            deleted.insert(event.batch_id);
            let cursor = sealer
                .open("cursor", &event.cursor, Some("tenant"))
                .unwrap();
            *per_transaction.entry(cursor.transaction).or_default() += 1;
        }
    }
    assert_eq!(deleted.len(), BATCHES, "each batch deleted once");
    // The bound on a sweep's statement, not the constant: raising the constant
    // past it must fail here.
    let chunk = 500;
    assert!(
        batchd::service::RETENTION_CHUNK <= chunk as i64,
        "a retention chunk of at most {chunk}"
    );
    assert!(
        per_transaction.len() >= BATCHES / chunk && per_transaction.values().all(|&n| n <= chunk),
        "deletions per transaction: {per_transaction:?}"
    );
    // Nothing deleted twice comes after: the next event is a batch created now.
    let marker = create(&mut client).await;
    let next = next_event(&mut feed).await;
    assert_eq!(
        (next.r#type(), next.batch.map(|b| b.id)),
        (F::Change, Some(marker.id))
    );
    // Counted by the replica that made it, once it returned from its commit; all three
    // replicas share this process's metrics.
    retention_deletions_counted(&first, BATCHES).await;
    one.stop().await.unwrap();
    two.stop().await.unwrap();
}

/// Waits until `app`'s metrics count `count` deletions by the retention sweep.
async fn retention_deletions_counted(app: &TestApp, count: usize) {
    eventually(
        Duration::from_secs(5),
        "every deletion to be counted",
        || async {
            let text = metrics_text(app).await;
            metric_value(&text, "batchd_batches_deleted_total{reason=\"retention\"}")
                == count as f64
        },
    )
    .await;
}

/// Rows in `table` of the test's database.
async fn row_count(db: &TestDb, table: &str) -> i64 {
    use sqlx::Connection;
    let sql = sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}"));
    if db.url.starts_with("sqlite") {
        let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
        sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap()
    } else {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap()
    }
}
