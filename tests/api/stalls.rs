//! Stalls and estimates: a batch that has not changed for the stall time is marked
//! stalled once, as a version that watchers, the change feed and lists see, until its
//! next change; a running batch reports its recent rate and when it should finish.
//! Time is a manual clock; the stall sweep is called by hand.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use batchd::proto::batchd::v1 as pb;
use pb::BatchStatus as S;
use pb::EventType as E;
use pb::FeedEventType as F;

use crate::change_feed::{next_event, watch_all};
use crate::helpers::*;
use crate::watch::watch;

/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600;
/// The stall time of these tests.
const STALL_AFTER: Duration = Duration::from_secs(600);

fn service(app: &TestApp) -> Arc<batchd::service::BatchService> {
    app.app.as_ref().expect("running").service().clone()
}

/// An app on a manual clock at [`T0`].
async fn app_at_t0(backend: Backend) -> (TestApp, Arc<ManualClock>) {
    let clock = ManualClock::at(T0);
    let app_clock: Arc<dyn batchd::clock::Clock> = clock.clone();
    (
        TestApp::spawn_with(backend, |o| o.clock = app_clock).await,
        clock,
    )
}

/// A progress report of `completed` of 1,000 requests.
fn progress(batch_id: &str, completed: i64) -> pb::UpdateBatchRequest {
    pb::UpdateBatchRequest {
        batch_id: batch_id.to_owned(),
        request_counts: Some(pb::RequestCounts {
            total: 1_000,
            completed,
            failed: 0,
        }),
        ..Default::default()
    }
}

/// The ids a REST list with `query` returns.
async fn listed(rest: &Rest, query: &str) -> BTreeSet<String> {
    let (status, page) = rest.get(&format!("/v1/batches?limit=100&{query}")).await;
    assert_eq!(status, 200, "{page}");
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|batch| batch["id"].as_str().unwrap().to_owned())
        .collect()
}

/// `batchd_stalled_batches` of `status` in `metrics`.
fn stalled_gauge(metrics: &str, status: &str) -> f64 {
    metric_value(
        metrics,
        &format!("batchd_stalled_batches{{status=\"{status}\"}}"),
    )
}

fn ids<'a>(batches: impl IntoIterator<Item = &'a pb::Batch>) -> BTreeSet<String> {
    batches.into_iter().map(|b| b.id.clone()).collect()
}

async fn a_quiet_batch_is_marked_stalled_once_seen_everywhere_and_cleared_by_its_next_change(
    backend: Backend,
) {
    let (app, clock) = app_at_t0(backend).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let rest = app.rest(Some(&app.admin_key));
    let queued = create(&mut client).await;
    let running = create(&mut client).await;
    worker
        .update_batch(move_to(&running.id, S::InProgress))
        .await
        .unwrap();
    let moving = create(&mut client).await;
    worker
        .update_batch(move_to(&moving.id, S::InProgress))
        .await
        .unwrap();
    let done = create(&mut client).await;
    complete(&mut worker, &done.id).await;
    let running_version = get(&mut client, &running.id).await.version;
    let mut watching = watch(&mut client, &running.id, Some(running_version))
        .await
        .unwrap();
    let mut feed = watch_all(&mut client, pb::WatchBatchesRequest::default())
        .await
        .unwrap();
    // The feed starts at SYNCED, which its stream sends once it has read where the log
    // is: a change committed before that (the stream's start runs on a task of its own
    // and may come late on a busy machine) is not part of it.
    assert_eq!(next_event(&mut feed).await.r#type(), F::Synced);
    let sweeper = service(&app);

    clock.advance(599);
    assert_eq!(sweeper.mark_stalled_batches(STALL_AFTER).await.unwrap(), 0);
    worker.update_batch(progress(&moving.id, 10)).await.unwrap();
    clock.advance(1);
    // Quiet for 600 s: the queued and the running batch; not the one that moved a
    // second ago, and never a final one.
    assert_eq!(sweeper.mark_stalled_batches(STALL_AFTER).await.unwrap(), 2);
    let stalled = get(&mut client, &running.id).await;
    assert_eq!(stalled.stalled_at, Some(T0 + 600));
    assert_eq!(stalled.version, running_version + 1);
    assert_eq!(stalled.status(), S::InProgress);
    assert_eq!(
        get(&mut client, &queued.id).await.stalled_at,
        Some(T0 + 600)
    );
    assert_eq!(get(&mut client, &moving.id).await.stalled_at, None);
    assert_eq!(get(&mut client, &done.id).await.stalled_at, None);

    // The per-batch watch and the change feed carry the marking version.
    let message = tokio::time::timeout(Duration::from_secs(10), watching.message())
        .await
        .expect("the stall in time")
        .unwrap()
        .unwrap();
    assert_eq!(message.r#type(), E::Change);
    assert_eq!(message.batch.unwrap().stalled_at, Some(T0 + 600));
    let mut marked_in_feed = BTreeSet::new();
    while marked_in_feed.len() < 2 {
        let event = next_event(&mut feed).await;
        if event.r#type() == F::Change
            && let Some(batch) = event.batch.filter(|b| b.stalled_at.is_some())
        {
            marked_in_feed.insert(batch.id);
        }
    }
    assert_eq!(marked_in_feed, ids([&queued, &running]));

    // Lists and counts filter on it, over REST and gRPC.
    assert_eq!(
        listed(&rest, "stalled=true").await,
        ids([&queued, &running])
    );
    assert_eq!(listed(&rest, "stalled=false").await, ids([&moving, &done]));
    assert_eq!(
        listed(&rest, "stalled=true&status=in_progress").await,
        ids([&running])
    );
    let page = client
        .list_batches(pb::ListBatchesRequest {
            stalled: Some(true),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&page.data), ids([&queued, &running]));
    let (status, counts) = rest.get("/v1/batch_counts?stalled=true").await;
    assert_eq!(status, 200, "{counts}");
    assert_eq!(counts["total"], 2, "{counts}");
    assert_eq!(counts["counts"]["validating"], 1, "{counts}");
    assert_eq!(counts["counts"]["in_progress"], 1, "{counts}");
    let metrics = metrics_text(&app).await;
    assert_eq!(stalled_gauge(&metrics, "in_progress"), 1.0);
    assert_eq!(stalled_gauge(&metrics, "validating"), 1.0);

    // Marked once per stall: a later sweep passes the marked ones over, and marks the
    // one that has now been quiet long enough.
    clock.advance(600);
    assert_eq!(sweeper.mark_stalled_batches(STALL_AFTER).await.unwrap(), 1);
    assert_eq!(
        get(&mut client, &running.id).await.version,
        running_version + 1
    );
    assert_eq!(
        get(&mut client, &moving.id).await.stalled_at,
        Some(T0 + 1_200)
    );

    // The next change clears the mark, whoever makes it.
    let moved = worker
        .update_batch(progress(&running.id, 20))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.stalled_at, None);
    let cancelled = client
        .cancel_batch(pb::CancelBatchRequest {
            batch_id: queued.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.stalled_at, None);
    assert_eq!(listed(&rest, "stalled=true").await, ids([&moving]));
    assert_eq!(sweeper.mark_stalled_batches(STALL_AFTER).await.unwrap(), 0);
    let metrics = metrics_text(&app).await;
    assert_eq!(stalled_gauge(&metrics, "in_progress"), 1.0);
    assert_eq!(stalled_gauge(&metrics, "validating"), 0.0);
    assert_eq!(stalled_gauge(&metrics, "cancelling"), 0.0);
    // Quiet again for the stall time, the batch is marked again.
    clock.advance(600);
    assert_eq!(sweeper.mark_stalled_batches(STALL_AFTER).await.unwrap(), 2);
    let again = get(&mut client, &running.id).await;
    assert_eq!(again.stalled_at, Some(T0 + 1_800));
}

async fn the_rate_and_the_estimate_follow_progress_at_a_known_rate(backend: Backend) {
    let (app, clock) = app_at_t0(backend).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let rest = app.rest(Some(&app.admin_key));
    let batch = create(&mut client).await;
    let fresh = get(&mut client, &batch.id).await;
    assert_eq!(
        (fresh.progress_rate, fresh.estimated_completion_at),
        (None, None)
    );
    let started = worker
        .update_batch(pb::UpdateBatchRequest {
            status: Some(S::InProgress.into()),
            ..progress(&batch.id, 0)
        })
        .await
        .unwrap()
        .into_inner();
    // One data point: no rate yet.
    assert_eq!(started.progress_rate, None);
    // 10 requests a second, reported every 2 s (bunched: 14, then 26), for a minute.
    let mut last = started;
    for step in 1..=30 {
        clock.advance(2);
        let completed = 20 * step + if step % 2 == 1 { -6 } else { 6 };
        last = worker
            .update_batch(progress(&batch.id, completed.min(1_000)))
            .await
            .unwrap()
            .into_inner();
    }
    let rate = last
        .progress_rate
        .expect("a rate after a minute of reports");
    assert!((8.0..=12.0).contains(&rate), "rate {rate}/s, 10/s expected");
    // 606 of 1,000 at T0+60 (a report of 600 + 6): 394 left at 10/s is about T0+99.
    let eta = last.estimated_completion_at.expect("an estimate");
    let expected = T0 + 60 + 39;
    assert!(
        (eta - expected).abs() <= 8,
        "estimated {eta}, about {expected} expected"
    );
    // REST says the same.
    let (_, json) = rest.get(&format!("/v1/batches/{}", batch.id)).await;
    assert_eq!(json["progress_rate"].as_f64(), Some(rate));
    assert_eq!(json["estimated_completion_at"].as_i64(), Some(eta));

    // A stalled batch has no estimate; its rate decays towards none.
    clock.advance(600);
    assert_eq!(
        service(&app)
            .mark_stalled_batches(STALL_AFTER)
            .await
            .unwrap(),
        1
    );
    let stalled = get(&mut client, &batch.id).await;
    assert_eq!(stalled.estimated_completion_at, None);
    assert!(stalled.progress_rate.unwrap() < 1.0, "{stalled:?}");

    // Outside in_progress there is neither.
    let finalizing = worker
        .update_batch(move_to(&batch.id, S::Finalizing))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (finalizing.progress_rate, finalizing.estimated_completion_at),
        (None, None)
    );
}

/// `batchd watch` says when a batch stalls and when it moves again, against a server
/// that marks stalls after a second (the real clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_command_says_when_a_batch_stalls_and_moves_again() {
    let app = TestApp::spawn_with(Backend::Sqlite, |o| {
        o.stall_after = Some(Duration::from_secs(1));
        o.sweep_interval = Duration::from_millis(200);
    })
    .await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let batch = create(&mut client).await;
    worker
        .update_batch(move_to(&batch.id, S::InProgress))
        .await
        .unwrap();
    let follower = crate::watch::spawn_watch_command(&app, &batch.id);
    eventually(Duration::from_secs(10), "the stall mark", || {
        let mut client = client.clone();
        let id = batch.id.clone();
        async move { get(&mut client, &id).await.stalled_at.is_some() }
    })
    .await;
    worker.update_batch(progress(&batch.id, 5)).await.unwrap();
    complete_from_in_progress(&mut worker, &batch.id).await;
    let output = tokio::time::timeout(crate::watch::PATIENCE, follower.wait_with_output())
        .await
        .expect("batchd watch exits when the batch ends")
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    let stalled = lines
        .iter()
        .position(|line| line.starts_with(&format!("{} stalled: no change for ", batch.id)))
        .unwrap_or_else(|| panic!("no stall line: {stdout}"));
    let moving = lines
        .iter()
        .position(|line| *line == format!("{} moving again", batch.id))
        .unwrap_or_else(|| panic!("no moving-again line: {stdout}"));
    assert!(stalled < moving, "{stdout}");
    assert_eq!(output.status.code(), Some(0), "{stdout}");
}

async fn complete_from_in_progress(worker: &mut Worker, batch_id: &str) {
    move_through(worker, batch_id, &[S::Finalizing, S::Completed]).await;
}

/// The change feed refuses the stall filter, naming it: a mark moves no status, so the
/// feed could not say when a batch enters or leaves it.
async fn the_change_feed_refuses_the_stall_filter_naming_it(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let rest = app.rest(Some(&app.admin_key));
    let (status, body) = rest.get("/v1/batch_events?stalled=true").await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("stalled")),
        "{body}"
    );
    let (status, body) = rest.get("/v1/batches?stalled=maybe").await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("stalled")),
        "{body}"
    );
    let (status, body) = rest.get("/v1/batches?stalled=true&stalled=false").await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("stalled")),
        "{body}"
    );
}

/// No index of `batches` reads a column that a progress report changes, so that
/// PostgreSQL can keep those updates HOT (no index entry written): the stall sweep
/// finds quiet batches through `quiet_since`, which writes leave alone (see
/// [`progress_reports_leave_the_quiet_mark_and_the_sweep_brings_it_up_to_date`]).
async fn no_index_of_batches_reads_a_column_a_progress_report_changes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let definitions: Vec<String> = match backend {
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&app.db.url).await.unwrap();
            sqlx::query_scalar("SELECT indexdef FROM pg_indexes WHERE tablename = 'batches'")
                .fetch_all(&pool)
                .await
                .unwrap()
        }
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&app.db.url).await.unwrap();
            sqlx::query_scalar(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'batches' \
                 AND sql IS NOT NULL",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    assert!(definitions.iter().any(|d| d.contains("quiet_since")));
    for definition in &definitions {
        for column in [
            "updated_at",
            "version",
            "request_total",
            "request_completed",
            "request_failed",
            "progress_",
            "usage",
            "model",
            "errors",
        ] {
            assert!(
                !definition.contains(column),
                "an index reads {column}, which progress reports change: {definition}"
            );
        }
    }
}

/// The stored `quiet_since` of batch `id`, read from the app's database.
async fn stored_quiet_since(app: &TestApp, backend: Backend, id: &str) -> i64 {
    const SELECT: &str = "SELECT quiet_since FROM batches WHERE id = $1";
    match backend {
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&app.db.url).await.unwrap();
            let quiet = sqlx::query_scalar(SELECT).bind(id).fetch_one(&pool).await;
            pool.close().await;
            quiet.unwrap()
        }
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&app.db.url).await.unwrap();
            let quiet = sqlx::query_scalar(SELECT).bind(id).fetch_one(&pool).await;
            pool.close().await;
            quiet.unwrap()
        }
    }
}

/// A progress report leaves the batch's quiet mark (`quiet_since`, an indexed column)
/// where it was, so that PostgreSQL keeps the update HOT. The stall sweep brings the
/// mark of a batch that changed after the cutoff up to its last change, without a
/// version or an event, instead of marking it; once the batch goes quiet it is marked.
async fn progress_reports_leave_the_quiet_mark_and_the_sweep_brings_it_up_to_date(
    backend: Backend,
) {
    let (app, clock) = app_at_t0(backend).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let batch = create(&mut client).await;
    move_through(&mut worker, &batch.id, &[S::InProgress]).await;
    let sweeper = service(&app);
    assert_eq!(stored_quiet_since(&app, backend, &batch.id).await, T0);

    // A report every 300 s, over twice the stall time: the mark after each report's
    // sweep (the cutoff is 600 s before it): at T0 + 600 and T0 + 1,200 the mark was
    // at the cutoff while the batch had changed since, so the sweep moved it.
    let mut mark = T0;
    for (step, mark_after_sweep) in [(1, T0), (2, T0 + 600), (3, T0 + 600), (4, T0 + 1_200)] {
        clock.advance(300);
        let reported = worker
            .update_batch(progress(&batch.id, step * 10))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reported.updated_at, Some(T0 + 300 * step));
        assert_eq!(
            stored_quiet_since(&app, backend, &batch.id).await,
            mark,
            "report {step} moved the quiet mark"
        );
        assert_eq!(sweeper.mark_stalled_batches(STALL_AFTER).await.unwrap(), 0);
        mark = mark_after_sweep;
        assert_eq!(
            stored_quiet_since(&app, backend, &batch.id).await,
            mark,
            "the sweep after report {step}"
        );
        // Bringing the mark up to date is not a change of the batch.
        let seen = get(&mut client, &batch.id).await;
        assert_eq!(seen.version, reported.version);
        assert_eq!(seen.stalled_at, None);
    }

    // Quiet for the stall time since its last report: marked, once.
    clock.advance(600);
    assert_eq!(sweeper.mark_stalled_batches(STALL_AFTER).await.unwrap(), 1);
    assert_eq!(
        get(&mut client, &batch.id).await.stalled_at,
        Some(T0 + 1_800)
    );
    assert_eq!(sweeper.mark_stalled_batches(STALL_AFTER).await.unwrap(), 0);
}

on_both_stores!(
    a_quiet_batch_is_marked_stalled_once_seen_everywhere_and_cleared_by_its_next_change,
    progress_reports_leave_the_quiet_mark_and_the_sweep_brings_it_up_to_date,
    the_rate_and_the_estimate_follow_progress_at_a_known_rate,
    no_index_of_batches_reads_a_column_a_progress_report_changes,
    the_change_feed_refuses_the_stall_filter_naming_it,
);

/// With two replicas' sweeps on one database, each of 1,000 quiet batches is marked
/// stalled exactly once: 1,000 marks, 1,000 events, every batch at version 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_sweeps_mark_each_quiet_batch_exactly_once() {
    let clock = ManualClock::at(T0);
    let first_clock: Arc<dyn batchd::clock::Clock> = clock.clone();
    let first = TestApp::spawn_with(Backend::Postgres, |o| o.clock = first_clock).await;
    let mut second_options = batchd::app::ServeOptions::local(first.db.url.clone());
    second_options.clock = clock.clone();
    second_options.sweep_interval = Duration::from_secs(3600);
    let second = batchd::app::App::start(second_options).await.unwrap();

    let creator = service(&first);
    create_many_through_the_service(&first, 1_000).await;

    clock.advance(600);
    let (a, b) = tokio::join!(
        creator.mark_stalled_batches(STALL_AFTER),
        second.service().mark_stalled_batches(STALL_AFTER)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a + b, 1_000, "{a} + {b}");

    let pool = sqlx::PgPool::connect(&first.db.url).await.unwrap();
    let marks: i64 =
        sqlx::query_scalar("SELECT count(*) FROM batch_events WHERE snapshot ? 'stalled_at'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(marks, 1_000);
    let versions: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT version FROM batches")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(versions, vec![2], "each batch marked once");
    second.stop().await.unwrap();
}
