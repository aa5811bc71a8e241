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

/// On PostgreSQL the pages of `batches` keep room for the next version of their rows (a
/// fill factor of 90): the first write after a batch's create lands on the batch's own
/// page, as a progress report then can as a HOT update (no entry in any index). At 100 %
/// a page that creates filled has no room, and every first update of its rows goes to
/// another page, with an entry in each of the table's indexes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pages_keep_room_for_the_next_version_of_their_batches() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let first = create(&mut client).await;
    let pool = sqlx::PgPool::connect(&app.db.url).await.unwrap();
    let page_of = |id: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, f64>("SELECT (ctid::text::point)[0] FROM batches WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    // Creates until the first batch's page is full: a batch landed on the next page.
    let before = page_of(first.id.clone()).await;
    let mut last_page = before;
    for _ in 0..500 {
        if last_page > before {
            break;
        }
        last_page = page_of(create(&mut client).await.id).await;
    }
    assert!(last_page > before, "500 creates did not fill a page");

    worker
        .update_batch(move_to(&first.id, pb::BatchStatus::InProgress))
        .await
        .unwrap();
    assert_eq!(
        page_of(first.id.clone()).await,
        before,
        "the batch's next version went to another page: its page had no room"
    );
}
