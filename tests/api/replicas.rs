//! Several replicas starting together on one PostgreSQL database.

use batchd::app::{App, ServeOptions};

use crate::helpers::*;

/// Replicas race on migrations and on the first API key: each migration is applied
/// once, every replica starts, and exactly one first key is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_starting_together_migrate_once_and_create_one_first_key() {
    let db = TestDb::fresh(Backend::Postgres).await;
    let starts = (0..4).map(|_| App::start(ServeOptions::local(db.url.clone())));
    let mut apps: Vec<App> = futures_join_all(starts).await;
    let first_keys = apps
        .iter_mut()
        .filter_map(|a| a.take_first_api_key())
        .count();
    assert_eq!(first_keys, 1);
    let keys = apps[0].service().list_api_keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    for app in apps {
        app.stop().await.unwrap();
    }
}

async fn futures_join_all<F>(starts: impl Iterator<Item = F>) -> Vec<App>
where
    F: std::future::Future<Output = anyhow::Result<App>> + Send + 'static,
{
    let handles: Vec<_> = starts.map(tokio::spawn).collect();
    let mut apps = Vec::new();
    for handle in handles {
        apps.push(handle.await.unwrap().expect("replica starts"));
    }
    apps
}
