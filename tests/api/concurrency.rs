//! Concurrent writers on one batch: every committed history is legal and gap-free.

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

on_both_stores!(racing_workers_commit_only_legal_gap_free_histories);
