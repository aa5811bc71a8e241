//! The lifecycle timers: running batches expire at the end of their window, stuck
//! cancellations finish after the grace period, and replicas sweeping together move
//! each due batch once.

use std::sync::Arc;
use std::time::Duration;

use batchd::proto::batchd::v1 as pb;
use pb::BatchStatus as S;
use pb::EventType as E;

use crate::helpers::*;
use crate::watch::watch;

/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600;
const DAY: i64 = 24 * 3600;

fn service(app: &TestApp) -> Arc<batchd::service::BatchService> {
    app.app.as_ref().expect("running").service().clone()
}

async fn lifecycle_timers_expire_running_batches_and_finish_stuck_cancellations(backend: Backend) {
    let clock = ManualClock::at(T0);
    let app_clock: Arc<dyn batchd::clock::Clock> = clock.clone();
    let app = TestApp::spawn_with(backend, |o| o.clock = app_clock).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let validating = create(&mut client).await;
    let running = create(&mut client).await;
    worker
        .update_batch(move_to(&running.id, S::InProgress))
        .await
        .unwrap();
    let stuck = create(&mut client).await;
    client
        .cancel_batch(pb::CancelBatchRequest {
            batch_id: stuck.id.clone(),
        })
        .await
        .unwrap();
    let done = create(&mut client).await;
    complete(&mut worker, &done.id).await;
    let mut watching = watch(&mut client, &running.id, Some(2)).await.unwrap();
    let sweeper = service(&app);
    let grace = Duration::from_secs(600);

    clock.advance(599);
    assert_eq!(
        sweeper.sweep_due_batches(grace).await.unwrap(),
        Default::default()
    );
    clock.advance(1);
    let outcome = sweeper.sweep_due_batches(grace).await.unwrap();
    assert_eq!((outcome.expired, outcome.cancelled), (0, 1));
    let cancelled = get(&mut client, &stuck.id).await;
    assert_eq!(cancelled.status(), S::Cancelled);
    assert_eq!(cancelled.cancelled_at, Some(T0 + 600));

    clock.advance(DAY);
    let outcome = sweeper.sweep_due_batches(grace).await.unwrap();
    assert_eq!((outcome.expired, outcome.cancelled), (2, 0));
    for id in [&validating.id, &running.id] {
        let expired = get(&mut client, id).await;
        assert_eq!(expired.status(), S::Expired);
        assert_eq!(expired.expired_at, Some(T0 + 600 + DAY));
    }
    assert_eq!(get(&mut client, &done.id).await.status(), S::Completed);

    // Watchers see a timer's move like any other change, and the stream then ends.
    let message = watching.message().await.unwrap().unwrap();
    assert_eq!(message.r#type(), E::Change);
    assert_eq!(message.batch.unwrap().status(), S::Expired);
    assert!(watching.message().await.unwrap().is_none());
    assert_eq!(
        sweeper.sweep_due_batches(grace).await.unwrap(),
        Default::default()
    );
}

on_both_stores!(lifecycle_timers_expire_running_batches_and_finish_stuck_cancellations);

/// With two replicas' sweepers on one database, each of 1,000 due batches is moved
/// exactly once: 1,000 transitions, 1,000 events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_sweepers_move_each_due_batch_exactly_once() {
    let clock = ManualClock::at(T0);
    let first_clock: Arc<dyn batchd::clock::Clock> = clock.clone();
    // The replicas' own periodic sweeps stay out of the way: the two sweeps below are
    // the ones counted.
    let hour = Duration::from_secs(3600);
    let first = TestApp::spawn_with(Backend::Postgres, |o| {
        o.clock = first_clock;
        o.sweep_interval = hour;
    })
    .await;
    let mut second_options = batchd::app::ServeOptions::local(first.db.url.clone());
    second_options.clock = clock.clone();
    second_options.sweep_interval = hour;
    let second = batchd::app::App::start(second_options).await.unwrap();

    let creator = service(&first);
    create_many_through_the_service(&first, 1_000).await;

    clock.advance(DAY);
    let grace = Duration::from_secs(600);
    let (a, b) = tokio::join!(
        creator.sweep_due_batches(grace),
        second.service().sweep_due_batches(grace)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.expired + b.expired, 1_000, "{a:?} {b:?}");

    let pool = sqlx::PgPool::connect(&first.db.url).await.unwrap();
    let expired_events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM batch_events WHERE snapshot->>'status' = 'expired'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(expired_events, 1_000);
    let versions: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT version FROM batches")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(versions, vec![2], "each batch moved once");
    second.stop().await.unwrap();
}
