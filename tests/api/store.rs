//! Properties of the stores themselves.

use batchd::proto::batchd::v1 as pb;
use sqlx::Connection;

use crate::helpers::*;

/// The embedded store runs in WAL mode, so reads never wait for a writer.
#[tokio::test]
async fn sqlite_databases_are_created_in_wal_mode() {
    let db = TestDb::fresh(Backend::Sqlite).await;
    let store = batchd::store::connect(&db.url, &Default::default())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    store.close().await;
}

/// `get_batches` (the query behind coalesced point reads) returns exactly the batches
/// asked for that exist, with their current content.
async fn many_batches_are_read_by_id_in_one_query(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    let first = create(&mut client).await;
    let second = create(&mut client).await;
    let _not_asked_for = create(&mut client).await;
    let worker_key = app.key("executor", batchd::domain::Scope::Worker).await;
    let moved = app
        .worker(&worker_key)
        .update_batch(move_to(&second.id, pb::BatchStatus::InProgress))
        .await
        .unwrap()
        .into_inner();

    let store = app.store().await;
    let unknown = batchd::domain::BatchId::parse("id", &format!("batch_{:032x}", 7)).unwrap();
    let ids: Vec<batchd::domain::BatchId> = [&first.id, &second.id]
        .iter()
        .map(|id| batchd::domain::BatchId::parse("id", id).unwrap())
        .chain([unknown])
        .collect();
    let mut found = store.get_batches(&ids).await.unwrap();
    found.sort_by_key(|batch| batch.version);
    let found: Vec<(String, i64, &str)> = found
        .iter()
        .map(|b| (b.id.to_string(), b.version, b.status.as_str()))
        .collect();
    assert_eq!(
        found,
        vec![
            (first.id.clone(), 1, "validating"),
            (second.id.clone(), moved.version, "in_progress"),
        ]
    );
    assert!(store.get_batches(&[]).await.unwrap().is_empty());
    store.close().await;
}

on_both_stores!(many_batches_are_read_by_id_in_one_query);
