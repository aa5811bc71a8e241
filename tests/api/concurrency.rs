//! Concurrent writers: every committed history is legal and gap-free, on one batch and
//! across many whose changes share rounds of group commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use batchd::domain::{BatchId, Scope};
use batchd::proto::batchd::v1 as pb;
use tonic::Code;

use crate::helpers::*;

const WORKERS: usize = 16;
const UPDATES_PER_WORKER: usize = 25;

/// The statuses a racing worker asks for, skewed towards the early ones so that the
/// batch stays alive long enough to race on.
const WISHES: [pb::BatchStatus; 6] = [
    pb::BatchStatus::InProgress,
    pb::BatchStatus::InProgress,
    pb::BatchStatus::Finalizing,
    pb::BatchStatus::Cancelling,
    pb::BatchStatus::Completed,
    pb::BatchStatus::Failed,
];

async fn racing_workers_commit_only_legal_gap_free_histories(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let worker_key = app.key("executor", Scope::Worker).await;
    let mut client = app.client(&app.admin_key);
    let progress = Arc::new(AtomicI64::new(0));
    let mut rounds = 0;
    let mut total_commits = 0;

    // Several batches, so that most rounds race on live (non-terminal) batches.
    while total_commits < 60 && rounds < 10 {
        rounds += 1;
        let batch = create(&mut client).await;
        let mut tasks = Vec::new();
        for w in 0..WORKERS {
            let mut worker = app.worker(&worker_key);
            let id = batch.id.clone();
            let progress = progress.clone();
            tasks.push(tokio::spawn(async move {
                let mut committed = Vec::new();
                for i in 0..UPDATES_PER_WORKER {
                    let mut update = pb::UpdateBatchRequest {
                        batch_id: id.clone(),
                        ..Default::default()
                    };
                    if (w + i) % 3 == 0 {
                        update.status = Some(WISHES[(w * 7 + i) % WISHES.len()].into());
                    } else {
                        // Counts from a shared counter: they reach the server out of
                        // order, so some must be refused for going down.
                        let completed = progress.fetch_add(1, Ordering::Relaxed);
                        update.request_counts = Some(pb::RequestCounts {
                            total: 1_000_000,
                            completed,
                            failed: 0,
                        });
                    }
                    match worker.update_batch(update).await {
                        Ok(response) => committed.push(response.into_inner()),
                        Err(status) => assert!(
                            matches!(status.code(), Code::FailedPrecondition),
                            "unexpected failure: {status:?}"
                        ),
                    }
                }
                committed
            }));
        }
        let mut acknowledged = Vec::new();
        for task in tasks {
            acknowledged.extend(task.await.unwrap());
        }

        let store = app.store().await;
        let id = BatchId::parse("id", &batch.id).unwrap();
        let events = store.events_after(&id, 0, 10_000).await.unwrap();
        let current = store.get_batch(&id).await.unwrap().unwrap();
        store.close().await;

        let versions: Vec<i64> = events.iter().map(|e| e.version).collect();
        let expected: Vec<i64> = (1..=current.version).collect();
        assert_eq!(versions, expected, "versions 1..N without gaps");
        for pair in events.windows(2) {
            let (before, after) = (&pair[0].batch, &pair[1].batch);
            assert!(
                before.status == after.status || before.status.can_move_to(after.status),
                "illegal transition committed: {} -> {}",
                before.status,
                after.status
            );
            assert!(!before.status.is_terminal(), "a terminal batch changed");
            let (b, a) = (before.request_counts, after.request_counts);
            assert!(a.completed >= b.completed && a.failed >= b.failed && a.total >= b.total);
        }
        // Every acknowledged answer is in the log exactly as it was returned.
        for batch in &acknowledged {
            let logged = &events[(batch.version - 1) as usize].batch;
            assert_eq!(&pb::Batch::from(logged.clone()), batch);
        }
        assert_eq!(events.last().unwrap().batch, current);
        total_commits += current.version - 1;
    }
    assert!(total_commits >= 60, "only {total_commits} commits raced");
}

/// What one write of [`writes_sharing_rounds_each_land_once_or_not_at_all`] asked for
/// and got: its unique `completed` count, and the version it was acknowledged at.
struct Outcome {
    batch: usize,
    completed: i64,
    acknowledged: Option<pb::Batch>,
}

/// 64 writers over 50 batches: compare-and-set and plain updates, counts that arrive
/// out of order (refused for going down), status wishes that are illegal from where the
/// batch is, and version races, all inside the same rounds of group commit.
async fn writes_sharing_rounds_each_land_once_or_not_at_all(backend: Backend) {
    const WRITERS: usize = 64;
    const BATCHES: usize = 50;
    const WRITES_PER_WRITER: usize = 20;
    let app = TestApp::spawn(backend).await;
    let worker_key = app.key("executor", Scope::Worker).await;
    let mut client = app.client(&app.admin_key);
    let mut ids = Vec::new();
    for _ in 0..BATCHES {
        ids.push(create(&mut client).await.id);
    }
    let ids = Arc::new(ids);
    // Unique, mostly growing counts: every write is a change, and tells itself apart.
    let counter = Arc::new(AtomicI64::new(1));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut worker = app.worker(&worker_key);
        let (ids, counter) = (ids.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            // The version this writer last saw of each batch: its compare-and-set
            // writes expect it, and lose when another writer came first.
            let mut seen: HashMap<usize, i64> = HashMap::new();
            let mut outcomes = Vec::new();
            for i in 0..WRITES_PER_WRITER {
                let batch = (w * 7 + i * 13) % BATCHES;
                let completed = counter.fetch_add(1, Ordering::Relaxed);
                let mut update = pb::UpdateBatchRequest {
                    batch_id: ids[batch].clone(),
                    request_counts: Some(pb::RequestCounts {
                        total: 1_000_000,
                        completed,
                        failed: 0,
                    }),
                    ..Default::default()
                };
                if (w + i) % 2 == 0 {
                    update.expected_version = Some(*seen.get(&batch).unwrap_or(&1));
                }
                // `validating` is illegal once a batch is in progress.
                match (w + i) % 5 {
                    0 => update.status = Some(pb::BatchStatus::InProgress.into()),
                    1 => update.status = Some(pb::BatchStatus::Validating.into()),
                    _ => {}
                }
                let acknowledged = match worker.update_batch(update).await {
                    Ok(response) => {
                        let batch_now = response.into_inner();
                        seen.insert(batch, batch_now.version);
                        Some(batch_now)
                    }
                    Err(status) => {
                        assert!(
                            matches!(status.code(), Code::FailedPrecondition | Code::Aborted),
                            "unexpected failure: {status:?}"
                        );
                        None
                    }
                };
                outcomes.push(Outcome {
                    batch,
                    completed,
                    acknowledged,
                });
            }
            outcomes
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.extend(task.await.unwrap());
    }

    let store = app.store().await;
    let (mut acknowledged_total, mut refused_total) = (0, 0);
    for (index, id) in ids.iter().enumerate() {
        let id = BatchId::parse("id", id).unwrap();
        let events = store.events_after(&id, 0, 10_000).await.unwrap();
        let current = store.get_batch(&id).await.unwrap().unwrap();
        let versions: Vec<i64> = events.iter().map(|e| e.version).collect();
        assert_eq!(
            versions,
            (1..=current.version).collect::<Vec<i64>>(),
            "versions 1..N without gaps"
        );
        assert_eq!(events.last().unwrap().batch, current);
        let mine: Vec<&Outcome> = outcomes.iter().filter(|o| o.batch == index).collect();
        // Each version after the first is exactly one acknowledged write, as answered.
        let mut acknowledged_versions: Vec<i64> = Vec::new();
        for outcome in &mine {
            let logged_with_count = events
                .iter()
                .filter(|e| e.batch.request_counts.completed == outcome.completed)
                .map(|e| e.version)
                .collect::<Vec<i64>>();
            match &outcome.acknowledged {
                Some(answer) => {
                    acknowledged_total += 1;
                    acknowledged_versions.push(answer.version);
                    let logged = &events[(answer.version - 1) as usize].batch;
                    assert_eq!(&pb::Batch::from(logged.clone()), answer);
                    assert_eq!(
                        logged_with_count.first(),
                        Some(&answer.version),
                        "an acknowledged count first appears at its own version"
                    );
                }
                None => {
                    refused_total += 1;
                    assert!(
                        logged_with_count.is_empty(),
                        "a refused write is in the log at versions {logged_with_count:?}"
                    );
                }
            }
        }
        acknowledged_versions.sort_unstable();
        assert_eq!(
            acknowledged_versions,
            (2..=current.version).collect::<Vec<i64>>(),
            "every change is exactly one acknowledged write"
        );
        for pair in events.windows(2) {
            let (before, after) = (&pair[0].batch, &pair[1].batch);
            assert!(before.status == after.status || before.status.can_move_to(after.status));
            assert!(after.request_counts.completed > before.request_counts.completed);
        }
    }
    store.close().await;
    // The writes really shared rounds: more changes than rounds.
    let metrics = metrics_text(&app).await;
    let rounds = metric_value(&metrics, "batchd_commit_rounds_total");
    let changes = metric_value(&metrics, "batchd_commit_round_changes_total");
    assert!(
        changes > rounds * 1.2,
        "{changes} changes in {rounds} rounds: hardly grouped"
    );
    // The mix really raced: both kinds of answer occurred in numbers.
    assert!(
        acknowledged_total >= 200,
        "only {acknowledged_total} writes acknowledged"
    );
    assert!(refused_total >= 100, "only {refused_total} writes refused");
}

on_both_stores!(
    racing_workers_commit_only_legal_gap_free_histories,
    writes_sharing_rounds_each_land_once_or_not_at_all
);
