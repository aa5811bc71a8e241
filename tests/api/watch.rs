//! WatchBatch: every committed version, in order, exactly once, resumable, across
//! disconnects, slow readers, replicas, a lost listener and a dead server.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use batchd::domain::{BatchId, Scope};
use batchd::proto::batchd::v1 as pb;
use pb::BatchStatus as S;
use pb::EventType as E;
use tokio::task::JoinSet;
use tonic::{Code, Status, Streaming};

use crate::helpers::*;
use crate::process::Server;

/// How long any single watch message may take to arrive before a test fails.
pub(crate) const PATIENCE: Duration = Duration::from_secs(20);

pub(crate) async fn watch(
    client: &mut Client,
    batch_id: &str,
    after_version: Option<i64>,
) -> Result<Streaming<pb::WatchBatchResponse>, Status> {
    client
        .watch_batch(pb::WatchBatchRequest {
            batch_id: batch_id.to_owned(),
            after_version,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The next message, `None` when the stream ended with OK; panics on an error or
/// when nothing arrives in time.
pub(crate) async fn next(stream: &mut Streaming<pb::WatchBatchResponse>) -> Option<(E, pb::Batch)> {
    let message = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("a watch message in time")
        .expect("the stream does not fail")?;
    Some((
        message.r#type(),
        message.batch.expect("every message has a batch"),
    ))
}

/// Advances a batch by one version: counts up, or the next status at the end.
pub(crate) fn progress(batch_id: &str, step: i64) -> pb::UpdateBatchRequest {
    pb::UpdateBatchRequest {
        batch_id: batch_id.to_owned(),
        request_counts: Some(pb::RequestCounts {
            total: 10_000,
            completed: step,
            failed: 0,
        }),
        ..Default::default()
    }
}

/// Drives a batch through `updates` versions after creation, ending completed.
async fn drive(worker: &mut Worker, batch_id: &str, updates: i64) {
    worker
        .update_batch(move_to(batch_id, S::InProgress))
        .await
        .unwrap();
    for step in 1..=updates - 3 {
        worker.update_batch(progress(batch_id, step)).await.unwrap();
    }
    move_through(worker, batch_id, &[S::Finalizing, S::Completed]).await;
}

/// Commits progress `steps` on a running batch, then cancels it (cancelling, cancelled).
async fn progress_then_cancel(
    worker: &mut Worker,
    batch_id: &str,
    steps: std::ops::RangeInclusive<i64>,
) {
    for step in steps {
        worker.update_batch(progress(batch_id, step)).await.unwrap();
    }
    move_through(worker, batch_id, &[S::Cancelling, S::Cancelled]).await;
}

async fn a_watch_starts_with_a_snapshot_and_ends_after_the_terminal_status(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let batch = create(&mut client).await;
    let mut stream = watch(&mut client, &batch.id, None).await.unwrap();
    assert_eq!(next(&mut stream).await, Some((E::Snapshot, batch.clone())));

    drive(&mut worker, &batch.id, 6).await;
    for version in 2..=7 {
        let (kind, received) = next(&mut stream).await.expect("a change");
        assert_eq!((kind, received.version), (E::Change, version));
    }
    assert_eq!(
        next(&mut stream).await,
        None,
        "ends with OK after `completed`"
    );

    // A watch of a batch that is already terminal sends the snapshot and ends.
    let mut stream = watch(&mut client, &batch.id, None).await.unwrap();
    let (kind, done) = next(&mut stream).await.unwrap();
    assert_eq!((kind, done.status()), (E::Snapshot, S::Completed));
    assert_eq!(next(&mut stream).await, None);
}

async fn resuming_after_a_version_yields_exactly_the_versions_after_it(backend: Backend) {
    let app =
        TestApp::spawn_with(backend, |o| o.watch.heartbeat = Duration::from_millis(300)).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let batch = create(&mut client).await;
    for step in 1..=4 {
        if step == 1 {
            worker
                .update_batch(move_to(&batch.id, S::InProgress))
                .await
                .unwrap();
        } else {
            worker
                .update_batch(progress(&batch.id, step))
                .await
                .unwrap();
        }
    }
    let mut stream = watch(&mut client, &batch.id, Some(2)).await.unwrap();
    for version in 3..=5 {
        let (kind, received) = next(&mut stream).await.unwrap();
        assert_eq!((kind, received.version), (E::Change, version));
    }
    // Up to date: the next message is a heartbeat bookmarking version 5.
    let (kind, bookmark) = next(&mut stream).await.unwrap();
    assert_eq!((kind, bookmark.version), (E::Heartbeat, 5));

    // At the current version: nothing to replay, then the next change.
    let mut stream = watch(&mut client, &batch.id, Some(5)).await.unwrap();
    worker.update_batch(progress(&batch.id, 99)).await.unwrap();
    let (kind, received) = next(&mut stream).await.unwrap();
    assert_eq!((kind, received.version), (E::Change, 6));

    assert_status(
        watch(&mut client, &batch.id, Some(7)).await,
        Code::InvalidArgument,
        "after_version",
    );
    assert_status(
        watch(&mut client, &batch.id, Some(-1)).await,
        Code::InvalidArgument,
        "after_version",
    );

    // Resuming at the terminal version of a finished batch: nothing left, ends at once.
    worker
        .update_batch(move_to(&batch.id, S::Failed))
        .await
        .unwrap();
    let mut stream = watch(&mut client, &batch.id, Some(7)).await.unwrap();
    assert_eq!(next(&mut stream).await, None);
}

async fn watching_follows_the_same_rules_as_reading(backend: Backend) {
    let app = TestApp::spawn_with(backend, |o| o.watch.max_watches_per_key = 2).await;
    let alice_key = app.key("alice", Scope::Batches).await;
    let mut alice = app.client(&alice_key);
    let mut bob = app.client(&app.key("bob", Scope::Batches).await);
    let batch = create(&mut alice).await;
    assert_status(
        watch(&mut bob, &batch.id, None).await,
        Code::NotFound,
        &batch.id,
    );
    assert_status(
        watch(&mut bob, "nope", None).await,
        Code::InvalidArgument,
        "batch_id",
    );
    assert_status(
        app.anonymous_client()
            .watch_batch(pb::WatchBatchRequest {
                batch_id: batch.id.clone(),
                after_version: None,
            })
            .await,
        Code::Unauthenticated,
        "",
    );

    // Two streams per key at most; closing one frees its place.
    let first = watch(&mut alice, &batch.id, None).await.unwrap();
    let _second = watch(&mut alice, &batch.id, None).await.unwrap();
    assert_status(
        watch(&mut alice, &batch.id, None).await,
        Code::ResourceExhausted,
        "2 open watch streams",
    );
    let (status, body) = app
        .rest(Some(&alice_key))
        .get(&format!("/v1/batches/{}/watch", batch.id))
        .await;
    assert_eq!(status, 429, "{body}");
    drop(first);
    eventually(Duration::from_secs(5), "a freed watch place", || {
        let mut alice = alice.clone();
        let id = batch.id.clone();
        async move { watch(&mut alice, &id, None).await.is_ok() }
    })
    .await;
}

/// Watchers that disconnect and resume at random see exactly the committed history:
/// with 8 writers driving 50 batches through 2,000 updates and 20 watchers per batch,
/// every watcher's sequence is strictly increasing, gap-free and equal to the log.
async fn resuming_watchers_see_exactly_the_committed_history(backend: Backend) {
    const BATCHES: usize = 50;
    const WRITERS: usize = 8;
    const UPDATES_PER_BATCH: i64 = 40; // 50 x 40 = 2,000 updates
    const WATCHERS_PER_BATCH: usize = 20;

    // Heartbeats would only add noise; a long one keeps them out of the sequences.
    let app = TestApp::spawn_with(backend, |o| {
        o.watch.heartbeat = Duration::from_secs(3600);
        o.watch.max_watches_per_key = 10_000;
    })
    .await;
    let mut client = app.client(&app.admin_key);
    let mut ids = Vec::new();
    for _ in 0..BATCHES {
        ids.push(create(&mut client).await.id);
    }

    let mut watchers = JoinSet::new();
    for (b, id) in ids.iter().enumerate() {
        // One connection per batch, as separate clients would have.
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.grpc_addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        for w in 0..WATCHERS_PER_BATCH {
            let mut client = pb::batch_service_client::BatchServiceClient::with_interceptor(
                channel.clone(),
                Bearer(Some(app.admin_key.clone())),
            );
            let id = id.clone();
            let mut seed = (b * 1_000 + w + 1) as u64;
            watchers.spawn(async move {
                let mut seen: Vec<(E, pb::Batch)> = Vec::new();
                let mut reconnects = 0;
                loop {
                    let after = seen.last().map(|(_, batch)| batch.version);
                    let mut stream = watch(&mut client, &id, after).await.expect("watch");
                    // Read a random 1..=6 messages, then hang up (or finish).
                    let budget = 1 + xorshift(&mut seed) % 6;
                    let mut ended = false;
                    for _ in 0..budget {
                        match next(&mut stream).await {
                            Some(message) => seen.push(message),
                            None => {
                                ended = true;
                                break;
                            }
                        }
                    }
                    if ended {
                        return (id, seen, reconnects);
                    }
                    reconnects += 1;
                }
            });
        }
    }

    let mut writers = JoinSet::new();
    for w in 0..WRITERS {
        let mut worker = app.worker(&app.admin_key);
        let mine: Vec<String> = ids.iter().skip(w).step_by(WRITERS).cloned().collect();
        writers.spawn(async move {
            // Interleave the writer's batches, one version at a time.
            for step in 0..UPDATES_PER_BATCH {
                for id in &mine {
                    let update = match step {
                        0 => move_to(id, S::InProgress),
                        s if s == UPDATES_PER_BATCH - 2 => move_to(id, S::Finalizing),
                        s if s == UPDATES_PER_BATCH - 1 => move_to(id, S::Completed),
                        s => progress(id, s),
                    };
                    worker.update_batch(update).await.expect("update");
                }
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }

    let store = app.store().await;
    let mut histories = HashMap::new();
    for id in &ids {
        let batch_id = BatchId::parse("id", id).unwrap();
        let events = store.events_after(&batch_id, 0, 1_000).await.unwrap();
        assert_eq!(events.len() as i64, UPDATES_PER_BATCH + 1);
        let history: Vec<pb::Batch> = events.into_iter().map(|e| e.batch.into()).collect();
        histories.insert(id.clone(), history);
    }
    store.close().await;

    let mut total_reconnects = 0;
    while let Some(done) = watchers.join_next().await {
        let (id, seen, reconnects) = done.unwrap();
        total_reconnects += reconnects;
        let history = &histories[&id];
        let (first_kind, first) = &seen[0];
        assert_eq!(*first_kind, E::Snapshot, "{id}: starts with a snapshot");
        for (i, (kind, batch)) in seen.iter().enumerate().skip(1) {
            assert_eq!(*kind, E::Change, "{id}: only changes after the snapshot");
            assert_eq!(
                batch.version,
                seen[i - 1].1.version + 1,
                "{id}: gap-free, no duplicates"
            );
        }
        for (_, batch) in &seen {
            assert_eq!(
                batch,
                &history[(batch.version - 1) as usize],
                "{id}: as committed"
            );
        }
        assert_eq!(
            seen.last().unwrap().1.version,
            UPDATES_PER_BATCH + 1,
            "{id}: to the end"
        );
        assert!(first.version >= 1);
    }
    assert!(
        total_reconnects > (BATCHES * WATCHERS_PER_BATCH) as u64,
        "watchers did resume"
    );
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// A watcher that reads nothing for a while does not hold up the
/// others, and still gets everything, in order.
async fn a_stalled_watcher_neither_slows_the_others_nor_misses_anything(backend: Backend) {
    const UPDATES: i64 = 400; // more than a feed and a stream buffer hold together
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let batch = create(&mut client).await;
    // From version 0, not a snapshot: a snapshot is read when the server-side watcher
    // starts, which may be after the first update here, and the expected list would
    // then start at 2. Every version from 1 on is exact whenever the watcher starts.
    let mut stalled = watch(&mut client, &batch.id, Some(0)).await.unwrap();
    let mut readers = JoinSet::new();
    for _ in 0..3 {
        let mut stream = watch(&mut client, &batch.id, Some(0)).await.unwrap();
        readers.spawn(async move {
            let mut versions = Vec::new();
            while let Some((_, batch)) = next(&mut stream).await {
                versions.push(batch.version);
            }
            versions
        });
    }
    drive(&mut worker, &batch.id, UPDATES).await;
    // The others finish while the stalled one has not read a single message.
    let expected: Vec<i64> = (1..=UPDATES + 1).collect();
    while let Some(versions) = readers.join_next().await {
        assert_eq!(versions.unwrap(), expected);
    }
    let mut versions = Vec::new();
    while let Some((_, batch)) = next(&mut stalled).await {
        versions.push(batch.version);
    }
    assert_eq!(versions, expected);
}

/// Resuming from a version the log no longer keeps yields a
/// SNAPSHOT of the current state, never a silent gap.
async fn resuming_from_a_compacted_version_yields_a_snapshot(backend: Backend) {
    let clock = ManualClock::at(1_767_225_600);
    let app_clock: Arc<dyn batchd::clock::Clock> = clock.clone();
    let app = TestApp::spawn_with(backend, |o| o.clock = app_clock).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let batch = create(&mut client).await;
    worker
        .update_batch(move_to(&batch.id, S::InProgress))
        .await
        .unwrap();
    for step in 1..=4 {
        worker
            .update_batch(progress(&batch.id, step))
            .await
            .unwrap();
    }
    clock.advance(8 * 24 * 3600);
    let service = app.app.as_ref().unwrap().service().clone();
    // Versions 1..=5 go, the latest (6) stays.
    compact_exactly(&service, Duration::from_secs(7 * 24 * 3600), 5).await;

    let mut stream = watch(&mut client, &batch.id, Some(2)).await.unwrap();
    let (kind, snapshot) = next(&mut stream).await.unwrap();
    assert_eq!((kind, snapshot.version), (E::Snapshot, 6));
    worker.update_batch(progress(&batch.id, 50)).await.unwrap();
    let (kind, change) = next(&mut stream).await.unwrap();
    assert_eq!((kind, change.version), (E::Change, 7));
}

/// A Server-Sent Events message.
#[derive(Debug)]
pub(crate) struct Sse {
    pub(crate) id: Option<i64>,
    pub(crate) event: String,
    pub(crate) data: serde_json::Value,
}

/// Reads SSE messages from a streaming HTTP response.
pub(crate) struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    pub(crate) async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if event.is_empty() && data.is_empty() {
                    continue; // a comment or keep-alive
                }
                let data = serde_json::from_str(&data).expect("SSE data is JSON");
                return Some(Sse { id, event, data });
            }
            let chunk = tokio::time::timeout(PATIENCE, self.response.chunk())
                .await
                .expect("an SSE chunk in time")
                .expect("the SSE stream does not fail")?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

pub(crate) async fn sse(rest: &Rest, batch_id: &str, last_event_id: Option<i64>) -> SseReader {
    let mut request = rest.request(
        reqwest::Method::GET,
        &format!("/v1/batches/{batch_id}/watch"),
    );
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id.to_string());
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    SseReader {
        response,
        buffer: String::new(),
    }
}

/// Over SSE, `Last-Event-ID` resumes with exactly the rest, and
/// an idle stream gets heartbeats.
async fn server_sent_events_resume_with_last_event_id_and_heartbeat(backend: Backend) {
    let app =
        TestApp::spawn_with(backend, |o| o.watch.heartbeat = Duration::from_millis(300)).await;
    let rest = app.rest(Some(&app.admin_key));
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let batch = create(&mut client).await;

    let mut stream = sse(&rest, &batch.id, None).await;
    let first = stream.next().await.unwrap();
    assert_eq!((first.event.as_str(), first.id), ("snapshot", Some(1)));
    assert_eq!(first.data["status"], "validating");
    assert_eq!(first.data["object"], "batch");
    let heartbeat = stream.next().await.unwrap();
    assert_eq!(
        (heartbeat.event.as_str(), heartbeat.id),
        ("heartbeat", Some(1))
    );

    worker
        .update_batch(move_to(&batch.id, S::InProgress))
        .await
        .unwrap();
    let change = stream.next().await.unwrap();
    assert_eq!((change.event.as_str(), change.id), ("change", Some(2)));
    assert_eq!(change.data["status"], "in_progress");
    drop(stream); // the connection drops after version 2

    progress_then_cancel(&mut worker, &batch.id, 1..=3).await;
    let mut resumed = sse(&rest, &batch.id, Some(2)).await;
    let mut rest_of_it = Vec::new();
    while let Some(message) = resumed.next().await {
        rest_of_it.push((
            message.event,
            message.id.unwrap(),
            message.data["version"].as_i64().unwrap(),
        ));
    }
    let expected: Vec<(String, i64, i64)> = (3..=7).map(|v| ("change".to_owned(), v, v)).collect();
    assert_eq!(
        rest_of_it, expected,
        "exactly versions 3..=7, then the stream ends"
    );

    let bad = rest
        .request(
            reqwest::Method::GET,
            &format!("/v1/batches/{}/watch", batch.id),
        )
        .header("Last-Event-ID", "three");
    let (status, body) = Rest::send(bad).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("Last-Event-ID"))
    );
}

/// `batchd watch BATCH_ID` against `app` with its admin key, its stdout captured.
pub(crate) fn spawn_watch_command(app: &TestApp, batch_id: &str) -> tokio::process::Child {
    let server = format!("http://{}", app.grpc_addr());
    crate::process::batchd(
        &[
            "watch",
            batch_id,
            "--server",
            &server,
            "--api-key",
            &app.admin_key,
        ],
        "unused://",
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap()
}

/// `batchd watch` follows a batch to its end; its exit code tells how it ended.
async fn the_watch_command_follows_a_batch_to_its_end(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let server = format!("http://{}", app.grpc_addr());
    for (ending, code) in [(S::Completed, 0), (S::Failed, 2), (S::Cancelled, 4)] {
        let batch = create(&mut client).await;
        let follower = spawn_watch_command(&app, &batch.id);
        worker
            .update_batch(move_to(&batch.id, S::InProgress))
            .await
            .unwrap();
        worker.update_batch(progress(&batch.id, 40)).await.unwrap();
        let path: &[S] = match ending {
            S::Completed => &[S::Finalizing, S::Completed],
            S::Cancelled => &[S::Cancelling, S::Cancelled],
            _ => &[S::Failed],
        };
        move_through(&mut worker, &batch.id, path).await;
        let output = tokio::time::timeout(PATIENCE, follower.wait_with_output())
            .await
            .expect("batchd watch exits when the batch ends")
            .unwrap();
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert_eq!(output.status.code(), Some(code), "{stdout}");
        let name = ending
            .as_str_name()
            .trim_start_matches("BATCH_STATUS_")
            .to_ascii_lowercase();
        assert!(
            stdout.ends_with(&format!(
                "{} {name}: 40 completed, 0 failed, of 10000\n",
                batch.id
            )),
            "{stdout}"
        );
    }
    let (code, _, stderr) = crate::process::run(
        &[
            "watch",
            &BatchId::generate().to_string(),
            "--server",
            &server,
            "--api-key",
            &app.admin_key,
        ],
        "unused://",
    )
    .await;
    assert_eq!(code, 1);
    assert!(stderr.contains("no batch found"), "{stderr}");
}

on_both_stores!(
    the_watch_command_follows_a_batch_to_its_end,
    a_watch_starts_with_a_snapshot_and_ends_after_the_terminal_status,
    resuming_after_a_version_yields_exactly_the_versions_after_it,
    watching_follows_the_same_rules_as_reading,
    resuming_watchers_see_exactly_the_committed_history,
    a_stalled_watcher_neither_slows_the_others_nor_misses_anything,
    resuming_from_a_compacted_version_yields_a_snapshot,
    server_sent_events_resume_with_last_event_id_and_heartbeat,
);

/// Watches on `reader` the versions that `writer` commits, checking each arrives.
async fn versions_arrive(
    reader: &mut Client,
    writer: &mut Worker,
    batch_id: &str,
    from: i64,
    to: i64,
    mid: impl AsyncFnOnce(),
) {
    let mut stream = watch(reader, batch_id, Some(from - 1)).await.unwrap();
    let mut mid = Some(mid);
    for version in from..=to {
        if version == (from + to) / 2
            && let Some(mid) = mid.take()
        {
            mid().await;
        }
        writer
            .update_batch(progress(batch_id, version))
            .await
            .unwrap();
        let (kind, batch) = next(&mut stream).await.expect("the version arrives");
        assert_eq!((kind, batch.version), (E::Change, version));
    }
}

/// Two server processes on `db`, A with its safety poll off (so that only
/// cross-replica notifications deliver to its watchers) and B, and a batch created and
/// started through B. Returns A, a client of A, B, a worker of B and the batch.
async fn replicas_and_a_running_batch(db: &TestDb) -> (Server, Client, Server, Worker, pb::Batch) {
    let a = Server::start(&db.url, &["--watch-safety-poll", "1h"]).await;
    let key = a.first_key();
    let b = Server::start(&db.url, &[]).await;
    let on_a = a.client(&key).await;
    let mut on_b = b.worker(&key).await;
    let batch = create(&mut b.client(&key).await).await;
    let batch = move_through(&mut on_b, &batch.id, &[S::InProgress]).await;
    (a, on_a, b, on_b, batch)
}

/// A watch on one replica receives every version written through another (two server
/// processes, A and B, on one PostgreSQL database). The safety poll is off on A, so only
/// the cross-replica notifications can deliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_watch_on_one_replica_sees_every_write_on_another() {
    let db = TestDb::fresh(Backend::Postgres).await;
    let (_a, mut on_a, _b, mut on_b, batch) = replicas_and_a_running_batch(&db).await;
    versions_arrive(&mut on_a, &mut on_b, &batch.id, 3, 60, async || {}).await;
}

/// When the listener's connection is killed mid-run, no version is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_killed_listener_connection_loses_no_version() {
    let db = TestDb::fresh(Backend::Postgres).await;
    let (_a, mut on_a, _b, mut on_b, batch) = replicas_and_a_running_batch(&db).await;
    let url = db.url.clone();
    versions_arrive(&mut on_a, &mut on_b, &batch.id, 3, 60, async move || {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(
            killed,
            vec![true, true],
            "both replicas' listeners were cut"
        );
    })
    .await;
}

/// When the server process a client watches through dies, the client resumes on the
/// other one with `after_version` and gets exactly the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_client_resumes_on_another_replica_when_its_server_dies() {
    let db = TestDb::fresh(Backend::Postgres).await;
    let mut a = Server::start(&db.url, &[]).await;
    let key = a.first_key();
    let b = Server::start(&db.url, &[]).await;
    let mut writer = b.worker(&key).await;
    let batch = create(&mut b.client(&key).await).await;
    let mut stream = watch(&mut a.client(&key).await, &batch.id, None)
        .await
        .unwrap();
    let mut seen = vec![next(&mut stream).await.unwrap().1.version];
    writer
        .update_batch(move_to(&batch.id, S::InProgress))
        .await
        .unwrap();
    for step in 1..=10 {
        writer
            .update_batch(progress(&batch.id, step))
            .await
            .unwrap();
    }
    for _ in 0..5 {
        seen.push(next(&mut stream).await.unwrap().1.version);
    }
    a.signal("KILL");
    a.child.wait().await.unwrap();
    // What was already on the wire still arrives; then the stream breaks.
    loop {
        match tokio::time::timeout(PATIENCE, stream.message())
            .await
            .unwrap()
        {
            Ok(Some(message)) => seen.push(message.batch.unwrap().version),
            Ok(None) => panic!("a dead server cannot end the stream with OK"),
            Err(_) => break,
        }
    }

    // Meanwhile more versions are committed, through B.
    progress_then_cancel(&mut writer, &batch.id, 11..=20).await;
    let mut resumed = watch(&mut b.client(&key).await, &batch.id, seen.last().copied())
        .await
        .unwrap();
    while let Some((kind, batch)) = next(&mut resumed).await {
        assert_eq!(kind, E::Change);
        seen.push(batch.version);
    }
    assert_eq!(seen, (1..=24).collect::<Vec<i64>>());
}
