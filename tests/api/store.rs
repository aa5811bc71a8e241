//! Properties of the stores themselves.

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
