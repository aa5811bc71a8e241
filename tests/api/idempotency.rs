//! Idempotent create: a retried POST (the official SDKs retry after a timeout) with the
//! same Idempotency-Key, or a gRPC CreateBatch with the same request_id, gets the batch
//! of the first request instead of a second batch.

use batchd::domain::Scope;
use batchd::proto::batchd::v1 as pb;
use serde_json::json;
use tonic::Code;

use crate::helpers::*;

fn body(input_file_id: &str) -> serde_json::Value {
    json!({
        "input_file_id": input_file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"run": "1"},
    })
}

async fn post_with_key(
    rest: &Rest,
    key: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    Rest::send(
        rest.request(reqwest::Method::POST, "/v1/batches")
            .header("Idempotency-Key", key)
            .json(&body),
    )
    .await
}

async fn batch_count(rest: &Rest) -> usize {
    let (status, list) = rest.get("/v1/batches?limit=100").await;
    assert_eq!(status, 200, "{list}");
    list["data"].as_array().unwrap().len()
}

async fn a_repeated_key_returns_the_first_batch_and_a_changed_request_is_a_conflict(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let alice = app.rest(Some(&app.key("alice", Scope::Batches).await));
    let (status, first) = post_with_key(&alice, "retry-1", body("file-1")).await;
    assert_eq!(status, 200, "{first}");
    let (status, again) = post_with_key(&alice, "retry-1", body("file-1")).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], first["id"]);
    assert_eq!(batch_count(&alice).await, 1);

    let (status, conflict) = post_with_key(&alice, "retry-1", body("file-2")).await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["error"]["param"], "Idempotency-Key", "{conflict}");
    assert_eq!(conflict["error"]["code"], "idempotency_key_reused");
    assert!(
        conflict["error"]["message"]
            .as_str()
            .unwrap()
            .contains("retry-1")
    );
    assert_eq!(batch_count(&alice).await, 1, "nothing created");

    // Without a key, or with another, each create is a new batch.
    let (_, other) = post_with_key(&alice, "retry-2", body("file-1")).await;
    assert_ne!(other["id"], first["id"]);
    let (_, plain) = alice.post("/v1/batches", body("file-1")).await;
    assert_ne!(plain["id"], first["id"]);
    assert_eq!(batch_count(&alice).await, 3);

    // Keys are scoped per owner: bob's "retry-1" is his own.
    let bob = app.rest(Some(&app.key("bob", Scope::Batches).await));
    let (status, bobs) = post_with_key(&bob, "retry-1", body("file-2")).await;
    assert_eq!(status, 200, "{bobs}");
    assert_ne!(bobs["id"], first["id"]);
    assert_eq!(bobs["user_id"], "bob");
}

async fn grpc_request_id_is_the_same_key(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    let request = |input_file_id: &str| pb::CreateBatchRequest {
        request_id: Some("8d0f7a2e-4d0c-4b7e-9c3e-1f2a3b4c5d6e".into()),
        input_file_id: input_file_id.into(),
        ..new_batch()
    };
    let first = client
        .create_batch(request("file-1"))
        .await
        .unwrap()
        .into_inner();
    let again = client
        .create_batch(request("file-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.id, first.id);
    assert_status(
        client.create_batch(request("file-2")).await,
        Code::AlreadyExists,
        "8d0f7a2e",
    );
    for bad in ["", "a\0b", "with space", &"k".repeat(256)] {
        assert_status(
            client
                .create_batch(pb::CreateBatchRequest {
                    request_id: Some(bad.to_owned()),
                    ..new_batch()
                })
                .await,
            Code::InvalidArgument,
            "request_id",
        );
    }
    let listed = client
        .list_batches(pb::ListBatchesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.data.len(), 1);
}

async fn a_key_expires_after_24_hours(backend: Backend) {
    let clock = ManualClock::at(1_800_000_000);
    let app_clock = clock.clone();
    let app = TestApp::spawn_with(backend, |o| o.clock = app_clock).await;
    let rest = app.rest(Some(&app.admin_key));
    let (_, first) = post_with_key(&rest, "daily", body("file-1")).await;
    clock.advance(24 * 3600 - 1);
    let (_, same) = post_with_key(&rest, "daily", body("file-1")).await;
    assert_eq!(same["id"], first["id"]);
    clock.advance(2);
    // Expired: the key is free again, for any request.
    let (status, fresh) = post_with_key(&rest, "daily", body("file-9")).await;
    assert_eq!(status, 200, "{fresh}");
    assert_ne!(fresh["id"], first["id"]);
    let service = app.app.as_ref().unwrap().service().clone();
    clock.advance(24 * 3600 + 1);
    assert_eq!(service.forget_expired_idempotency_keys().await.unwrap(), 1);
}

async fn concurrent_retries_with_one_key_create_one_batch(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let rest = app.rest(Some(&app.admin_key));
    let mut creates = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let rest = rest.clone();
        creates.spawn(async move { post_with_key(&rest, "burst", body("file-1")).await });
    }
    let mut ids = std::collections::BTreeSet::new();
    while let Some(created) = creates.join_next().await {
        let (status, batch) = created.unwrap();
        assert_eq!(status, 200, "{batch}");
        ids.insert(batch["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(batch_count(&rest).await, 1);
}

async fn a_malformed_key_header_is_refused_naming_it(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let rest = app.rest(Some(&app.admin_key));
    for bad in ["k".repeat(256), "ünïcode".to_owned()] {
        let request = rest
            .request(reqwest::Method::POST, "/v1/batches")
            .header(
                "Idempotency-Key",
                reqwest::header::HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
            )
            .json(&body("file-1"));
        let (status, error) = Rest::send(request).await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["param"], "Idempotency-Key", "{error}");
    }
    assert_eq!(batch_count(&rest).await, 0);
}

on_both_stores!(
    a_repeated_key_returns_the_first_batch_and_a_changed_request_is_a_conflict,
    grpc_request_id_is_the_same_key,
    a_key_expires_after_24_hours,
    concurrent_retries_with_one_key_create_one_batch,
    a_malformed_key_header_is_refused_naming_it,
);
