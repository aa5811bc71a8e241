//! Authentication, scopes and tenant isolation over gRPC.

use batchd::domain::{BatchId, Scope};
use batchd::proto::batchd::v1 as pb;
use tonic::Code;

use crate::helpers::*;

async fn calls_without_a_valid_key_are_unauthenticated(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let get = pb::GetBatchRequest {
        batch_id: BatchId::generate().to_string(),
    };
    assert_status(
        app.anonymous_client().get_batch(get.clone()).await,
        Code::Unauthenticated,
        "missing API key",
    );
    assert_status(
        app.client("bd_sk_not-a-real-key")
            .get_batch(get.clone())
            .await,
        Code::Unauthenticated,
        "invalid API key",
    );
    let mut request = tonic::Request::new(get.clone());
    request.metadata_mut().insert(
        "authorization",
        format!("Basic {}", app.admin_key).parse().unwrap(),
    );
    let mut raw = pb::batch_service_client::BatchServiceClient::new(app.channel());
    assert_status(
        raw.get_batch(request).await,
        Code::Unauthenticated,
        "Bearer",
    );
    assert_status(
        app.worker("")
            .update_batch(move_to(&get.batch_id, pb::BatchStatus::Failed))
            .await,
        Code::Unauthenticated,
        "",
    );
}

/// Key lookups are cached for `--api-key-cache-ttl` (2 s by default), so a revoked
/// key stops working within that time, not necessarily on the very next call.
async fn a_revoked_key_stops_working_within_the_cache_ttl(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let service = app.app.as_ref().unwrap().service().clone();
    let (key, secret) = service
        .create_api_key("carol", Scope::Batches)
        .await
        .unwrap();
    let mut client = app.client(secret.expose());
    create(&mut client).await;
    service.revoke_api_key(&key.id).await.unwrap();
    let revoked = std::time::Instant::now();
    eventually(
        std::time::Duration::from_secs(5),
        "the key to stop working",
        || {
            let mut client = client.clone();
            async move {
                client.create_batch(new_batch()).await.is_err_and(|status| {
                    status.code() == Code::Unauthenticated && status.message() == "invalid API key"
                })
            }
        },
    )
    .await;
    assert!(
        revoked.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        revoked.elapsed()
    );
}

async fn tenants_never_see_each_others_batches(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let alice_key = app.key("alice", Scope::Batches).await;
    let bob_key = app.key("bob", Scope::Batches).await;
    let mut alice = app.client(&alice_key);
    let mut bob = app.client(&bob_key);
    let alices = create(&mut alice).await;
    let bobs = create(&mut bob).await;

    // A foreign batch looks exactly like one that does not exist.
    let unknown = BatchId::generate().to_string();
    for (id, other) in [(&alices.id, &unknown), (&unknown, &alices.id)] {
        let foreign = bob
            .get_batch(pb::GetBatchRequest {
                batch_id: id.clone(),
            })
            .await
            .unwrap_err();
        let missing = bob
            .get_batch(pb::GetBatchRequest {
                batch_id: other.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(foreign.code(), Code::NotFound);
        assert_eq!(missing.code(), Code::NotFound);
        assert_eq!(
            foreign.message().replace(id.as_str(), "ID"),
            missing.message().replace(other.as_str(), "ID")
        );
    }
    assert_status(
        bob.cancel_batch(pb::CancelBatchRequest {
            batch_id: alices.id.clone(),
        })
        .await,
        Code::NotFound,
        &alices.id,
    );
    // Nor can a foreign batch serve as a paging cursor: NOT_FOUND, as for an unknown one.
    assert_status(
        bob.list_batches(pb::ListBatchesRequest {
            after: Some(alices.id.clone()),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        &alices.id,
    );

    let ids =
        |page: pb::ListBatchesResponse| page.data.into_iter().map(|b| b.id).collect::<Vec<_>>();
    let listed = bob
        .list_batches(pb::ListBatchesRequest::default())
        .await
        .unwrap();
    assert_eq!(ids(listed.into_inner()), vec![bobs.id.clone()]);
    let listed = alice
        .list_batches(pb::ListBatchesRequest::default())
        .await
        .unwrap();
    assert_eq!(ids(listed.into_inner()), vec![alices.id.clone()]);

    // Workers and admins see every tenant's batches.
    let worker_key = app.key("executor", Scope::Worker).await;
    for key in [worker_key.as_str(), app.admin_key.as_str()] {
        let mut client = app.client(key);
        let listed = client
            .list_batches(pb::ListBatchesRequest::default())
            .await
            .unwrap();
        assert_eq!(
            ids(listed.into_inner()),
            vec![bobs.id.clone(), alices.id.clone()]
        );
        client
            .get_batch(pb::GetBatchRequest {
                batch_id: alices.id.clone(),
            })
            .await
            .unwrap();
    }
}

async fn each_scope_is_limited_to_its_own_operations(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let tenant_key = app.key("alice", Scope::Batches).await;
    let worker_key = app.key("executor", Scope::Worker).await;
    let mut tenant = app.client(&tenant_key);
    let batch = create(&mut tenant).await;

    assert_status(
        app.worker(&tenant_key)
            .update_batch(move_to(&batch.id, pb::BatchStatus::InProgress))
            .await,
        Code::PermissionDenied,
        "batches",
    );
    let mut worker_as_client = app.client(&worker_key);
    assert_status(
        worker_as_client.create_batch(new_batch()).await,
        Code::PermissionDenied,
        "worker",
    );
    assert_status(
        worker_as_client
            .cancel_batch(pb::CancelBatchRequest {
                batch_id: batch.id.clone(),
            })
            .await,
        Code::PermissionDenied,
        "worker",
    );
    // Admins may do everything, on anyone's batch.
    let mut admin = app.client(&app.admin_key);
    let cancelled = admin
        .cancel_batch(pb::CancelBatchRequest {
            batch_id: batch.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.status(), pb::BatchStatus::Cancelling);
    app.worker(&app.admin_key)
        .update_batch(move_to(&batch.id, pb::BatchStatus::Cancelled))
        .await
        .unwrap();
}

on_both_stores!(
    calls_without_a_valid_key_are_unauthenticated,
    a_revoked_key_stops_working_within_the_cache_ttl,
    tenants_never_see_each_others_batches,
    each_scope_is_limited_to_its_own_operations,
);
