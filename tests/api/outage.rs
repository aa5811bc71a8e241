//! A database outage: requests fail fast, health follows the database, and nothing
//! acknowledged is lost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use batchd::domain::Scope;
use batchd::proto::batchd::v1 as pb;
use tokio::task::JoinSet;
use tonic::Code;

use crate::helpers::*;

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
