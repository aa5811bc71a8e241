//! The in-memory caches never change an answer: terminal batches served from memory,
//! and a write path that starts from this replica's last known version and falls back
//! to the database whenever another replica wrote in between.

use batchd::app::{App, ServeOptions};
use batchd::proto::batchd::v1 as pb;
use pb::BatchStatus as S;
use tonic::Code;

use crate::helpers::*;

/// A terminal batch is answered from memory, even with the database gone; a running
/// one still needs the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_terminal_batches_are_served_from_memory() {
    let app = TestApp::spawn_with(Backend::Postgres, |o| {
        o.store.acquire_timeout = std::time::Duration::from_millis(500);
    })
    .await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let done = create(&mut client).await;
    complete(&mut worker, &done.id).await;
    let running = create(&mut client).await;
    let before = get(&mut client, &done.id).await;

    app.db.drop_postgres_database().await;
    assert_eq!(get(&mut client, &done.id).await, before);
    let status = client
        .get_batch(pb::GetBatchRequest {
            batch_id: running.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
}

/// A second replica on `a`'s database, and a worker client of it with `a`'s admin key.
async fn second_replica(a: &TestApp) -> (App, Worker) {
    let b = App::start(ServeOptions::local(a.db.url.clone()))
        .await
        .unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", b.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let worker = pb::batch_worker_service_client::BatchWorkerServiceClient::with_interceptor(
        channel,
        Bearer(Some(a.admin_key.clone())),
    );
    (b, worker)
}

/// Replica A writes from its memory of a batch; replica B writes behind its back; A's
/// next writes still see B's version: a stale memory costs a retry, never a wrong answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_stale_memory_of_another_replicas_write_changes_no_answer() {
    let a = TestApp::spawn(Backend::Postgres).await;
    let (b, mut on_b) = second_replica(&a).await;
    let mut on_a = a.worker(&a.admin_key);
    let batch = create(&mut a.client(&a.admin_key)).await;
    on_a.update_batch(move_to(&batch.id, S::InProgress))
        .await
        .unwrap(); // A remembers v2
    on_b.update_batch(move_to(&batch.id, S::Finalizing))
        .await
        .unwrap(); // v3, unknown to A

    // From memory, A would think `in_progress -> completed` is illegal and that the
    // version is 2; the database says finalizing at 3, where both are right.
    let mut finish = move_to(&batch.id, S::Completed);
    finish.expected_version = Some(3);
    let done = on_a.update_batch(finish).await.unwrap().into_inner();
    assert_eq!((done.status(), done.version), (S::Completed, 4));
    assert!(done.finalizing_at.is_some());

    // A stale expected version is still refused, after checking the database.
    let other = create(&mut a.client(&a.admin_key)).await;
    on_a.update_batch(move_to(&other.id, S::InProgress))
        .await
        .unwrap();
    on_b.update_batch(move_to(&other.id, S::Finalizing))
        .await
        .unwrap();
    let mut stale = move_to(&other.id, S::Completed);
    stale.expected_version = Some(2);
    assert_status(
        on_a.update_batch(stale).await,
        Code::Aborted,
        "version 3, not the expected version 2",
    );
    b.stop().await.unwrap();
}

/// `batchd_write_memory_total` counts what memory did for each write: a write from
/// this replica's last version (hit), one that memory refused and the database
/// settled (retried), and one that memory did not have (miss).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writes_are_counted_by_what_memory_did_for_them() {
    let a = TestApp::spawn(Backend::Postgres).await;
    let (b, mut on_b) = second_replica(&a).await;
    let mut on_a = a.worker(&a.admin_key);
    // Both replicas are in this process: the counters are theirs together.
    let counts = || async {
        let text = metrics_text(&a).await;
        ["hit", "retried", "miss"].map(|outcome| {
            metric_value(
                &text,
                &format!("batchd_write_memory_total{{outcome=\"{outcome}\"}}"),
            )
        })
    };
    let before = counts().await;
    let batch = create(&mut a.client(&a.admin_key)).await;
    let since = |after: [f64; 3]| [0, 1, 2].map(|i| after[i] - before[i]);

    on_a.update_batch(move_to(&batch.id, S::InProgress))
        .await
        .unwrap(); // A created the batch: it starts from memory.
    assert_eq!(since(counts().await), [1.0, 0.0, 0.0]);
    let mut behind = move_to(&batch.id, S::Finalizing);
    behind.expected_version = Some(1);
    assert_status(
        on_a.update_batch(behind).await,
        Code::Aborted,
        "version 2, not the expected version 1",
    ); // Memory refuses it, so the database is asked before the answer.
    assert_eq!(since(counts().await), [1.0, 1.0, 0.0]);
    on_b.update_batch(move_to(&batch.id, S::Finalizing))
        .await
        .unwrap(); // B never saw the batch: it reads it first.
    assert_eq!(since(counts().await), [1.0, 1.0, 1.0]);
    b.stop().await.unwrap();
}
