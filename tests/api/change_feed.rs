//! WatchBatches, the change feed: every committed change of every batch a key may see,
//! in commit order, exactly once, resumable on any replica; an initial state with no
//! gap to the live part; filters, tenancy, revocation, compaction and slow watchers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use batchd::app::{App, ServeOptions};
use batchd::domain::{BatchId, Scope};
use batchd::proto::batchd::v1 as pb;
use pb::BatchStatus as S;
use pb::FeedEventType as F;
use tokio::task::JoinSet;
use tonic::{Code, Status, Streaming};

use crate::helpers::*;
use crate::watch::{PATIENCE, progress};

/// A request that follows everything the key may see.
fn everything() -> pb::WatchBatchesRequest {
    pb::WatchBatchesRequest::default()
}

pub(crate) async fn watch_all(
    client: &mut Client,
    request: pb::WatchBatchesRequest,
) -> Result<Streaming<pb::WatchBatchesResponse>, Status> {
    client
        .watch_batches(request)
        .await
        .map(tonic::Response::into_inner)
}

/// Waits until the change feed of the database at `url` holds back nothing committed.
/// On PostgreSQL its horizon is the server's: another test's transaction (each test's
/// `CREATE DATABASE` takes a while) may hold it below a change committed a moment ago,
/// and an initial state read then leaves that change for the live part, after SYNCED.
pub(crate) async fn until_the_feed_holds_nothing_back(url: &str) {
    let probe = batchd::store::connect(url, &Default::default())
        .await
        .unwrap();
    eventually(PATIENCE, "the feed to hold nothing back", || async {
        let oldest = probe.feed_bounds().await.unwrap().oldest;
        let page = probe.changes_after(oldest, None, 1).await.unwrap();
        page.held_back_since.is_none()
    })
    .await;
    probe.close().await;
}

/// The next message; panics on an error, an end, or nothing in time.
async fn next(stream: &mut Streaming<pb::WatchBatchesResponse>) -> pb::WatchBatchesResponse {
    tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("a feed message in time")
        .expect("the feed does not fail")
        .expect("the feed does not end")
}

/// The next message that is not a bookmark, within [`PATIENCE`] in all: bookmarks
/// keep coming while nothing else does, so they must not extend the wait.
pub(crate) async fn next_event(
    stream: &mut Streaming<pb::WatchBatchesResponse>,
) -> pb::WatchBatchesResponse {
    let skip_bookmarks = async {
        loop {
            let message = next(stream).await;
            if message.r#type() != F::Bookmark {
                return message;
            }
        }
    };
    tokio::time::timeout(PATIENCE, skip_bookmarks)
        .await
        .expect("a feed message other than a bookmark in time")
}

/// Reads up to SYNCED: the initial batches, and SYNCED's cursor.
async fn initial_state(
    stream: &mut Streaming<pb::WatchBatchesResponse>,
) -> (Vec<pb::Batch>, String) {
    let mut batches = Vec::new();
    loop {
        let message = next_event(stream).await;
        match message.r#type() {
            F::Initial => {
                assert!(message.cursor.is_empty(), "INITIAL carries no cursor");
                batches.push(message.batch.expect("INITIAL has a batch"));
            }
            F::Synced => {
                assert!(message.batch.is_none());
                assert!(!message.cursor.is_empty(), "SYNCED carries the cursor");
                return (batches, message.cursor);
            }
            other => panic!("{other:?} before SYNCED"),
        }
    }
}

/// The committed history of every batch, from the event log: id -> versions 1..
async fn histories(
    store: &dyn batchd::store::Store,
    ids: &[String],
) -> HashMap<String, Vec<pb::Batch>> {
    let mut all = HashMap::new();
    for id in ids {
        let batch_id = BatchId::parse("id", id).unwrap();
        let events = store.events_after(&batch_id, 0, 10_000).await.unwrap();
        let history: Vec<pb::Batch> = events.into_iter().map(|e| e.batch.into()).collect();
        for (i, batch) in history.iter().enumerate() {
            assert_eq!(batch.version, i as i64 + 1, "the log holds every version");
        }
        all.insert(id.clone(), history);
    }
    all
}

/// What a watcher with `statuses` (empty: any) must receive about a batch with this
/// history, from version `from` on: CHANGE for a matching version, LEFT_FILTER for
/// the version that leaves the status set.
fn expected(history: &[pb::Batch], statuses: &[S], from: i64) -> Vec<(F, pb::Batch)> {
    let matches = |b: &pb::Batch| statuses.is_empty() || statuses.contains(&b.status());
    let mut events = Vec::new();
    for (i, batch) in history.iter().enumerate() {
        if batch.version < from {
            continue;
        }
        if matches(batch) {
            events.push((F::Change, batch.clone()));
        } else if i > 0 && matches(&history[i - 1]) {
            events.push((F::LeftFilter, batch.clone()));
        }
    }
    events
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// A client of one of `addresses`, picked by `seed`.
async fn client_of(addresses: &[std::net::SocketAddr], seed: u64, key: &str) -> Client {
    let address = addresses[(seed % addresses.len() as u64) as usize];
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    pb::batch_service_client::BatchServiceClient::with_interceptor(
        channel,
        Bearer(Some(key.to_owned())),
    )
}

/// Test 1, the history check: 8 writers drive 200 batches through 2,200 committed
/// versions while 20 collection watchers (some filtered) hang up at random and resume
/// with their last cursor on a random replica (3 replicas on PostgreSQL). Each
/// watcher's events, per batch, are exactly the committed history it matches, in
/// version order, nothing missing, nothing twice; and across batches, in cursor order.
async fn resuming_collection_watchers_see_exactly_the_committed_history(backend: Backend) {
    const BATCHES: usize = 200;
    const WRITERS: usize = 8;
    const UPDATES_PER_BATCH: i64 = 10;
    const WATCHERS: u64 = 20;

    let db = TestDb::fresh(backend).await;
    let replicas = if backend == Backend::Postgres { 3 } else { 1 };
    let mut apps = Vec::new();
    let mut admin_key = None;
    for _ in 0..replicas {
        let mut options = ServeOptions::local(db.url.clone());
        options.sweep_interval = Duration::from_secs(3600);
        options.watch.heartbeat = Duration::from_millis(500);
        options.watch.max_watches_per_key = 1_000;
        let mut app = App::start(options).await.expect("replica starts");
        if let Some((_, secret)) = app.take_first_api_key() {
            admin_key = Some(secret.expose().to_owned());
        }
        apps.push(app);
    }
    let admin_key = admin_key.expect("one replica created the first key");
    let addresses: Vec<_> = apps.iter().map(App::grpc_addr).collect();
    // Odd batches are a tenant's, and a quarter of the watchers watch as that tenant:
    // they must see its batches only (the feed routes a tenant's changes apart).
    let (_, tenant_secret) = apps[0]
        .service()
        .create_api_key("tenant-a", Scope::Batches)
        .await
        .unwrap();
    let tenant_key = tenant_secret.expose().to_owned();
    let as_tenant = |w: u64| w % 4 == 3;
    let mut admin = client_of(&addresses, 0, &admin_key).await;
    let mut tenant = client_of(&addresses, 1, &tenant_key).await;
    let mut ids = Vec::new();
    for i in 0..BATCHES {
        let mut request = new_batch();
        request.metadata.insert("group".into(), (i % 4).to_string());
        let owner = if i % 2 == 1 { &mut tenant } else { &mut admin };
        let batch = owner.create_batch(request).await.unwrap().into_inner();
        ids.push(batch.id);
    }
    let tenants_batch: HashMap<&str, bool> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i % 2 == 1))
        .collect();
    // The initial states below must hold every creation.
    until_the_feed_holds_nothing_back(&db.url).await;

    // Watchers: a third follow everything, a third in_progress only, a third group 1.
    let filter_of = |w: u64| -> pb::WatchBatchesRequest {
        match w % 3 {
            0 => everything(),
            1 => pb::WatchBatchesRequest {
                statuses: vec![S::InProgress as i32],
                ..Default::default()
            },
            _ => pb::WatchBatchesRequest {
                metadata: [("group".to_owned(), "1".to_owned())].into(),
                ..Default::default()
            },
        }
    };
    let (target_sender, target) = tokio::sync::watch::channel(HashMap::<u64, usize>::new());
    let (ready_sender, mut ready) = tokio::sync::mpsc::channel::<()>(WATCHERS as usize);
    let mut watchers = JoinSet::new();
    for w in 0..WATCHERS {
        let key = if as_tenant(w) {
            &tenant_key
        } else {
            &admin_key
        };
        let (addresses, key, mut target) = (addresses.clone(), key.clone(), target.clone());
        let ready_sender = ready_sender.clone();
        let request = filter_of(w);
        watchers.spawn(async move {
            let mut seed = w * 7_919 + 1;
            let mut client = client_of(&addresses, seed, &key).await;
            let mut first = request.clone();
            first.send_initial_state = true;
            let mut stream = watch_all(&mut client, first).await.expect("watch");
            let (initial, mut cursor) = initial_state(&mut stream).await;
            ready_sender.send(()).await.unwrap();
            let mut seen: Vec<(F, pb::Batch, String)> = Vec::new();
            let mut reconnects = 0;
            loop {
                let budget = 1 + xorshift(&mut seed) % 40;
                for _ in 0..budget {
                    let done = target.borrow_and_update().get(&w).copied();
                    if done.is_some_and(|count| seen.len() >= count) {
                        return (w, initial, seen, reconnects);
                    }
                    let message = next(&mut stream).await;
                    cursor = message.cursor.clone();
                    if message.r#type() != F::Bookmark {
                        let batch = message.batch.clone().expect("a batch");
                        seen.push((message.r#type(), batch, message.cursor));
                    }
                }
                drop(stream);
                reconnects += 1;
                client = client_of(&addresses, xorshift(&mut seed), &key).await;
                let mut resume = request.clone();
                resume.after_cursor = Some(cursor.clone());
                stream = watch_all(&mut client, resume).await.expect("resume");
            }
        });
    }
    for _ in 0..WATCHERS {
        ready.recv().await.unwrap();
    }

    let mut writers = JoinSet::new();
    for w in 0..WRITERS {
        let mut worker =
            pb::batch_worker_service_client::BatchWorkerServiceClient::with_interceptor(
                tonic::transport::Channel::from_shared(format!(
                    "http://{}",
                    addresses[w % addresses.len()]
                ))
                .unwrap()
                .connect()
                .await
                .unwrap(),
                Bearer(Some(admin_key.clone())),
            );
        let mine: Vec<String> = ids.iter().skip(w).step_by(WRITERS).cloned().collect();
        writers.spawn(async move {
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

    let store = batchd::store::connect(&db.url, &Default::default())
        .await
        .unwrap();
    let histories = histories(&*store, &ids).await;
    store.close().await;
    let group_of: HashMap<&str, String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), (i % 4).to_string()))
        .collect();
    let mut expectations: HashMap<u64, BTreeMap<String, Vec<(F, pb::Batch)>>> = HashMap::new();
    for w in 0..WATCHERS {
        let request = filter_of(w);
        let statuses: Vec<S> = request
            .statuses
            .iter()
            .map(|&s| S::try_from(s).unwrap())
            .collect();
        let mut per_batch = BTreeMap::new();
        for id in &ids {
            if let Some(group) = request.metadata.get("group")
                && *group != group_of[id.as_str()]
            {
                continue;
            }
            if as_tenant(w) && !tenants_batch[id.as_str()] {
                continue;
            }
            let events = expected(&histories[id], &statuses, 2);
            if !events.is_empty() {
                per_batch.insert(id.clone(), events);
            }
        }
        expectations.insert(w, per_batch);
    }
    let targets = expectations
        .iter()
        .map(|(w, per_batch)| (*w, per_batch.values().map(Vec::len).sum()))
        .collect();
    target_sender.send_replace(targets);

    let mut total_reconnects = 0;
    while let Some(done) = watchers.join_next().await {
        let (w, initial, seen, reconnects) = done.unwrap();
        total_reconnects += reconnects;
        let request = filter_of(w);
        // The initial state: every batch at version 1 that matched then.
        let initially_matching = ids
            .iter()
            .filter(|id| !as_tenant(w) || tenants_batch[id.as_str()])
            .filter(|id| match request.metadata.get("group") {
                Some(group) => *group == group_of[id.as_str()],
                None => request.statuses.is_empty(),
            })
            .count();
        assert_eq!(
            initial.len(),
            initially_matching,
            "watcher {w}: the initial state"
        );
        assert!(initial.iter().all(|b| b.version == 1));
        let cursors: Vec<&String> = seen.iter().map(|(_, _, c)| c).collect();
        // Opaque to clients; the test opens them with the replicas' key, for the
        // scope they were handed out for.
        let sealer = apps[0].hub().cursor_sealer();
        let scope = as_tenant(w).then_some("tenant-a");
        let parsed: Vec<batchd::domain::FeedCursor> = cursors
            .iter()
            .map(|c| sealer.open("cursor", c, scope).unwrap())
            .collect();
        assert!(
            parsed.windows(2).all(|pair| pair[0] < pair[1]),
            "watcher {w}: in strictly increasing cursor order"
        );
        let mut got: BTreeMap<String, Vec<(F, pb::Batch)>> = BTreeMap::new();
        for (kind, batch, _) in seen {
            got.entry(batch.id.clone()).or_default().push((kind, batch));
        }
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expectations[&w].keys().collect::<Vec<_>>(),
            "watcher {w}: the batches it matches, and no other"
        );
        for (id, events) in &got {
            assert_eq!(
                events, &expectations[&w][id],
                "watcher {w}, {id}: exactly the history"
            );
        }
    }
    assert!(
        total_reconnects >= WATCHERS * 10,
        "watchers did resume ({total_reconnects})"
    );
    for app in apps {
        app.stop().await.unwrap();
    }
}

/// Test 3: watchers that ask for the initial state while writers create and change
/// batches end, once the writers stop, with exactly the database's state: each batch's
/// versions strictly increasing and gap-free after its first event, nothing twice.
async fn the_initial_state_meets_the_live_part_with_no_gap_and_no_duplicate(backend: Backend) {
    let app = TestApp::spawn_with(backend, |o| {
        o.watch.heartbeat = Duration::from_millis(300);
    })
    .await;
    let mut client = app.client(&app.admin_key);
    let mut ids = Vec::new();
    for _ in 0..150 {
        ids.push(create(&mut client).await.id);
    }
    let ids = Arc::new(ids);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = JoinSet::new();
    for w in 0..4u64 {
        let (mut worker, mut client) = (app.worker(&app.admin_key), app.client(&app.admin_key));
        let (ids, stop) = (ids.clone(), stop.clone());
        writers.spawn(async move {
            let mut seed = w + 11;
            let mut created = Vec::new();
            let mut step = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                step += 1;
                if step % 5 == 0 {
                    created.push(create(&mut client).await.id);
                    continue;
                }
                let id = &ids[(xorshift(&mut seed) % ids.len() as u64) as usize];
                // Some fail (a terminal batch, a lost race); each success is a version.
                let update = if step % 7 == 0 {
                    move_to(id, S::InProgress)
                } else {
                    progress(id, step)
                };
                let _ = worker.update_batch(update).await;
            }
            created
        });
    }
    let mut states = Vec::new();
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let mut client = app.client(&app.admin_key);
        let request = pb::WatchBatchesRequest {
            send_initial_state: true,
            ..Default::default()
        };
        let stream = watch_all(&mut client, request).await.unwrap();
        states.push((round, stream));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    let store = app.store().await;
    let mut all_ids: Vec<String> = ids.to_vec();
    let mut page_after = None;
    loop {
        let page = client
            .list_batches(pb::ListBatchesRequest {
                after: page_after.clone(),
                limit: Some(100),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for batch in &page.data {
            if !all_ids.contains(&batch.id) {
                all_ids.push(batch.id.clone());
            }
        }
        if !page.has_more {
            break;
        }
        page_after = page.last_id;
    }
    let histories = histories(&*store, &all_ids).await;
    let head = store.feed_bounds().await.unwrap().head;
    store.close().await;
    for (round, mut stream) in states {
        let (initial, synced) = initial_state(&mut stream).await;
        let mut view: HashMap<String, pb::Batch> = HashMap::new();
        for batch in initial {
            assert_eq!(
                batch,
                histories[&batch.id][(batch.version - 1) as usize],
                "round {round}: an INITIAL batch is a committed version"
            );
            assert!(
                view.insert(batch.id.clone(), batch).is_none(),
                "round {round}: listed once"
            );
        }
        let sealer = app.app.as_ref().unwrap().hub().cursor_sealer();
        let mut cursor = sealer.open("c", &synced, None).unwrap();
        // Read until the stream's bookmark passes everything committed.
        while cursor < head {
            let message = next(&mut stream).await;
            cursor = sealer.open("c", &message.cursor, None).unwrap();
            if message.r#type() == F::Bookmark {
                continue;
            }
            assert_eq!(
                message.r#type(),
                F::Change,
                "round {round}: no filter, no leaving"
            );
            let batch = message.batch.unwrap();
            if let Some(before) = view.get(&batch.id) {
                assert_eq!(
                    batch.version,
                    before.version + 1,
                    "round {round}, {}: after the listing, gap-free and never twice",
                    batch.id
                );
            }
            view.insert(batch.id.clone(), batch);
        }
        assert_eq!(view.len(), histories.len(), "round {round}: every batch");
        for (id, history) in &histories {
            assert_eq!(
                view.get(id),
                history.last(),
                "round {round}, {id}: the view ends at the database's state"
            );
        }
    }
}

/// Test 2 (PostgreSQL): a write whose transaction began first (the lower position) but
/// commits last is delivered, after a later one that committed first; meanwhile the
/// feed holds back, and its delay shows in the metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_change_that_began_first_but_committed_last_is_delivered() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let early = create(&mut client).await;
    let late = create(&mut client).await;
    let mut stream = watch_all(&mut client, everything()).await.unwrap();
    let synced = next_event(&mut stream).await;
    assert_eq!(synced.r#type(), F::Synced);

    // The held transaction takes its id (the lower position) and writes version 2 of
    // `early` the way batchd does: the row and its event, in one transaction.
    use sqlx::Connection;
    let mut held = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut held).await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut held)
        .await
        .unwrap();
    let write_early = [
        "UPDATE batches SET version = 2 WHERE id = $1",
        "INSERT INTO batch_events (batch_id, version, snapshot, at) \
         SELECT batch_id, 2, jsonb_set(snapshot, '{version}', '2'), at FROM batch_events \
         WHERE batch_id = $1 AND version = 1",
    ];
    for statement in write_early {
        sqlx::query(statement)
            .bind(&early.id)
            .execute(&mut held)
            .await
            .unwrap();
    }
    // A later transaction commits first, through batchd.
    worker
        .update_batch(move_to(&late.id, S::InProgress))
        .await
        .unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(2_500), stream.message()).await;
    assert!(
        quiet.is_err()
            || quiet
                .as_ref()
                .unwrap()
                .as_ref()
                .unwrap()
                .as_ref()
                .unwrap()
                .r#type()
                == F::Bookmark,
        "nothing is delivered while the earlier transaction runs: {quiet:?}"
    );
    let metrics = metrics_text(&app).await;
    let delay = metric_value(&metrics, "batchd_change_feed_delay_seconds");
    assert!(delay >= 1.0, "the delay shows while held back: {delay}");

    sqlx::query("COMMIT").execute(&mut held).await.unwrap();
    let first = next_event(&mut stream).await;
    let second = next_event(&mut stream).await;
    let delivered: Vec<(String, i64)> = [first, second]
        .into_iter()
        .map(|m| {
            let batch = m.batch.unwrap();
            (batch.id, batch.version)
        })
        .collect();
    assert_eq!(
        delivered,
        vec![(early.id.clone(), 2), (late.id.clone(), 2)],
        "both, in the order of their positions"
    );
}

/// Test 4a: filters and tenancy. A `batches` key sees only its owner's batches, worker
/// and admin keys every owner's; a status filter sends LEFT_FILTER once when a batch
/// leaves it; metadata, job and creation-time filters apply.
async fn filters_and_tenancy_decide_what_a_watcher_sees(backend: Backend) {
    let app = TestApp::spawn_with(backend, |o| o.watch.heartbeat = Duration::from_secs(3600)).await;
    let mut alice = app.client(&app.key("alice", Scope::Batches).await);
    let mut bob = app.client(&app.key("bob", Scope::Batches).await);
    let mut worker_watch = app.client(&app.key("ops", Scope::Worker).await);
    let mut worker = app.worker(&app.admin_key);

    let mut alice_all = watch_all(&mut alice, everything()).await.unwrap();
    let mut bob_all = watch_all(&mut bob, everything()).await.unwrap();
    let mut ops_all = watch_all(&mut worker_watch, everything()).await.unwrap();
    let mut alice_running = watch_all(
        &mut alice,
        pb::WatchBatchesRequest {
            statuses: vec![S::InProgress as i32],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut alice_ml = watch_all(
        &mut alice,
        pb::WatchBatchesRequest {
            metadata: [("team".to_owned(), "ml".to_owned())].into(),
            job_id: Some("job-1".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for stream in [
        &mut alice_all,
        &mut bob_all,
        &mut ops_all,
        &mut alice_running,
        &mut alice_ml,
    ] {
        assert_eq!(next_event(stream).await.r#type(), F::Synced);
    }

    let bobs = create(&mut bob).await;
    let mut request = new_batch();
    request.metadata.insert("team".into(), "ml".into());
    request.job_id = Some("job-1".into());
    let alices = alice.create_batch(request).await.unwrap().into_inner();
    move_through(&mut worker, &alices.id, &[S::InProgress, S::Finalizing]).await;

    let ids = |events: Vec<pb::WatchBatchesResponse>| -> Vec<(F, String, i64)> {
        events
            .into_iter()
            .map(|m| {
                let b = m.batch.clone().unwrap();
                (m.r#type(), b.id, b.version)
            })
            .collect()
    };
    let read = async |stream: &mut Streaming<pb::WatchBatchesResponse>, n: usize| {
        let mut events = Vec::new();
        for _ in 0..n {
            events.push(next_event(stream).await);
        }
        ids(events)
    };
    let a = |kind, version| (kind, alices.id.clone(), version);
    assert_eq!(
        read(&mut alice_all, 3).await,
        vec![a(F::Change, 1), a(F::Change, 2), a(F::Change, 3)],
        "alice sees her batch, never bob's"
    );
    assert_eq!(
        read(&mut bob_all, 1).await,
        vec![(F::Change, bobs.id.clone(), 1)],
        "bob sees his"
    );
    assert_eq!(
        read(&mut ops_all, 4).await,
        vec![
            (F::Change, bobs.id.clone(), 1),
            a(F::Change, 1),
            a(F::Change, 2),
            a(F::Change, 3)
        ],
        "a worker key sees every owner's"
    );
    assert_eq!(
        read(&mut alice_running, 2).await,
        vec![a(F::Change, 2), a(F::LeftFilter, 3)],
        "in_progress only: entering, then one LEFT_FILTER"
    );
    assert_eq!(
        read(&mut alice_ml, 3).await,
        vec![a(F::Change, 1), a(F::Change, 2), a(F::Change, 3)],
        "metadata and job match"
    );
    // Bob's stream saw nothing of alice's: its next message is a later change of his.
    worker
        .update_batch(move_to(&bobs.id, S::InProgress))
        .await
        .unwrap();
    assert_eq!(
        read(&mut bob_all, 1).await,
        vec![(F::Change, bobs.id.clone(), 2)]
    );
    // And the filtered stream heard nothing more of a batch that left it.
    worker
        .update_batch(move_to(&alices.id, S::Completed))
        .await
        .unwrap();
    let mut request = new_batch();
    request.metadata.insert("team".into(), "ml".into());
    request.job_id = Some("job-1".into());
    let second = alice.create_batch(request).await.unwrap().into_inner();
    worker
        .update_batch(move_to(&second.id, S::InProgress))
        .await
        .unwrap();
    assert_eq!(
        read(&mut alice_running, 1).await,
        vec![(F::Change, second.id.clone(), 2)]
    );

    // The initial state is scoped the same way.
    until_the_feed_holds_nothing_back(&app.db.url).await;
    let mut listing = watch_all(
        &mut bob,
        pb::WatchBatchesRequest {
            send_initial_state: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (initial, _) = initial_state(&mut listing).await;
    let listed: Vec<String> = initial.into_iter().map(|b| b.id).collect();
    assert_eq!(listed, vec![bobs.id.clone()]);
}

/// Test 4b: bad input is refused with the field named, before the stream starts; no
/// key is refused; the per-key limit applies; a revoked key's stream ends.
async fn hostile_requests_are_refused_and_limits_hold(backend: Backend) {
    let app = TestApp::spawn_with(backend, |o| {
        o.watch.max_watches_per_key = 2;
        o.caches.api_key_ttl = Duration::from_millis(500);
        o.watch.heartbeat = Duration::from_secs(3600);
    })
    .await;
    let mut admin = app.client(&app.admin_key);
    let huge = "7".repeat(1 << 16);
    // Sealed with the deployment's key, as if from a later copy of the database.
    let ahead = app.app.as_ref().unwrap().hub().cursor_sealer().seal(
        batchd::domain::FeedCursor {
            transaction: i64::MAX,
            position: i64::MAX,
        },
        None,
    );
    let cursor = |text: &str| pb::WatchBatchesRequest {
        after_cursor: Some(text.to_owned()),
        ..Default::default()
    };
    let cases: Vec<(pb::WatchBatchesRequest, &str)> = vec![
        (cursor("latest"), "after_cursor"),
        (cursor("1.2\0"), "after_cursor"),
        (cursor(&huge), "after_cursor"),
        (cursor("-1.5"), "after_cursor"),
        (cursor("fc_0.1"), "not a change feed cursor of this API key"),
        (cursor(&ahead), "ahead of the change feed"),
        (
            pb::WatchBatchesRequest {
                send_initial_state: true,
                ..cursor("0.0")
            },
            "send_initial_state",
        ),
        (
            pb::WatchBatchesRequest {
                statuses: vec![0],
                ..Default::default()
            },
            "statuses",
        ),
        (
            pb::WatchBatchesRequest {
                statuses: vec![99],
                ..Default::default()
            },
            "statuses",
        ),
        (
            pb::WatchBatchesRequest {
                job_id: Some("a b\0".into()),
                ..Default::default()
            },
            "job_id",
        ),
        (
            pb::WatchBatchesRequest {
                created_after: Some(-5),
                ..Default::default()
            },
            "created_after",
        ),
        (
            pb::WatchBatchesRequest {
                metadata: (0..5).map(|i| (format!("k{i}"), "v".to_owned())).collect(),
                ..Default::default()
            },
            "metadata",
        ),
    ];
    for (request, needle) in cases {
        let result = watch_all(&mut admin, request.clone()).await;
        assert_status(result, Code::InvalidArgument, needle);
    }
    let mut anonymous = app.anonymous_client();
    assert_status(
        watch_all(&mut anonymous, everything()).await,
        Code::Unauthenticated,
        "API key",
    );

    let rest = app.rest(Some(&app.admin_key));
    for (query, param) in [
        ("?send_initial_state=yes", "send_initial_state"),
        ("?limit=5", "limit"),
        ("?after=batch_0123456789abcdef0123456789abcdef", "after"),
        ("?status=running", "status"),
        ("?after_cursor=1.2&after_cursor=1.3", "after_cursor"),
        ("?after_cursor=%00", "after_cursor"),
    ] {
        let (status, body) = rest.get(&format!("/v1/batch_events{query}")).await;
        assert_eq!(
            (status, body["error"]["param"].as_str()),
            (400, Some(param)),
            "{query}: {body}"
        );
    }
    let bad_header = rest
        .request(reqwest::Method::GET, "/v1/batch_events")
        .header("Last-Event-ID", "yesterday");
    let (status, body) = Rest::send(bad_header).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("Last-Event-ID"))
    );
    let (status, _) = app.rest(None).get("/v1/batch_events").await;
    assert_eq!(status, 401);

    // The per-key limit counts collection and batch watches together.
    let service = app.app.as_ref().unwrap().service().clone();
    let (key, secret) = service
        .create_api_key("erin", Scope::Batches)
        .await
        .unwrap();
    let mut erin = app.client(secret.expose());
    let mut first = watch_all(&mut erin, everything()).await.unwrap();
    let _second = watch_all(&mut erin, everything()).await.unwrap();
    assert_status(
        watch_all(&mut erin, everything()).await,
        Code::ResourceExhausted,
        "2 open watch streams",
    );
    assert_eq!(next_event(&mut first).await.r#type(), F::Synced);

    service.revoke_api_key(&key.id).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), first.message())
        .await
        .expect("the stream ends in time");
    assert_status(ended, Code::Unauthenticated, "revoked");
}

/// Test 4c: compaction. A cursor older than what the log keeps is refused, gRPC
/// FAILED_PRECONDITION and HTTP 410, naming no position of the feed (they are every
/// tenant's); an initial state starts over.
async fn a_compacted_cursor_is_refused_naming_no_position(backend: Backend) {
    let clock = ManualClock::at(1_767_225_600);
    let app_clock: Arc<dyn batchd::clock::Clock> = clock.clone();
    let app = TestApp::spawn_with(backend, |o| o.clock = app_clock).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let mut stream = watch_all(&mut client, everything()).await.unwrap();
    let start = next_event(&mut stream).await.cursor;
    let batch = create(&mut client).await;
    worker
        .update_batch(move_to(&batch.id, S::InProgress))
        .await
        .unwrap();
    let first = next_event(&mut stream).await.cursor;
    for step in 1..=3 {
        worker
            .update_batch(progress(&batch.id, step))
            .await
            .unwrap();
    }
    clock.advance(8 * 24 * 3600);
    let service = app.app.as_ref().unwrap().service().clone();
    // Versions 1..=4 go, the latest (5) stays.
    compact_exactly(&service, Duration::from_secs(7 * 24 * 3600), 4).await;

    for old in [&start, &first] {
        let refused = watch_all(
            &mut client,
            pb::WatchBatchesRequest {
                after_cursor: Some(old.clone()),
                ..Default::default()
            },
        )
        .await;
        assert_status(
            refused,
            Code::FailedPrecondition,
            "no longer holds every change after this cursor",
        );
    }
    let (status, body) = app
        .rest(Some(&app.admin_key))
        .get(&format!("/v1/batch_events?after_cursor={start}"))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (410, Some("cursor_expired")),
        "{body}"
    );
    // The message names no position: the feed's are every tenant's.
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("send_initial_state") && !message.contains('`'),
        "{message}"
    );
    let internal = app
        .app
        .as_ref()
        .unwrap()
        .hub()
        .cursor_sealer()
        .open("c", &start, None)
        .unwrap();
    assert!(!message.contains(&internal.to_string()), "{message}");
    // Starting over reads the batch as it is, then what comes after.
    until_the_feed_holds_nothing_back(&app.db.url).await;
    let mut resumed = watch_all(
        &mut client,
        pb::WatchBatchesRequest {
            send_initial_state: true,
            ..Default::default()
        },
    )
    .await
    .expect("an initial state starts over");
    let (initial, _) = initial_state(&mut resumed).await;
    assert_eq!(
        initial.iter().map(|b| b.version).collect::<Vec<_>>(),
        [5],
        "the kept version"
    );
    worker.update_batch(progress(&batch.id, 9)).await.unwrap();
    let change = next_event(&mut resumed).await;
    assert_eq!(change.batch.unwrap().version, 6, "then what came after it");
}

/// Test 4d: a watcher that does not read while 300 versions are committed holds up
/// neither the writers nor another watcher, and later gets every one of them.
async fn a_slow_collection_watcher_holds_up_nobody_and_misses_nothing(backend: Backend) {
    let app = TestApp::spawn_with(backend, |o| o.watch.heartbeat = Duration::from_secs(3600)).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let mut slow = watch_all(&mut client, everything()).await.unwrap();
    let mut fast = watch_all(&mut client, everything()).await.unwrap();
    assert_eq!(next_event(&mut slow).await.r#type(), F::Synced);
    assert_eq!(next_event(&mut fast).await.r#type(), F::Synced);
    let batch = create(&mut client).await;
    worker
        .update_batch(move_to(&batch.id, S::InProgress))
        .await
        .unwrap();
    assert_eq!(next_event(&mut fast).await.batch.unwrap().version, 1);
    assert_eq!(next_event(&mut fast).await.batch.unwrap().version, 2);
    for step in 1..=300 {
        worker
            .update_batch(progress(&batch.id, step))
            .await
            .unwrap();
        let message = next_event(&mut fast).await;
        assert_eq!(
            message.batch.unwrap().version,
            step + 2,
            "the fast watcher keeps up"
        );
    }
    for version in 1..=302 {
        let message = next_event(&mut slow).await;
        assert_eq!(
            message.batch.unwrap().version,
            version,
            "the slow one gets them all, in order"
        );
    }
}

/// Over SSE: events carry `id: <cursor>` (none for `initial`), and reconnecting with
/// `Last-Event-ID` resumes with exactly the rest, even with the initial state asked for
/// in the URL, as a reconnecting `EventSource` sends it.
async fn server_sent_events_resume_with_the_cursor(backend: Backend) {
    let app =
        TestApp::spawn_with(backend, |o| o.watch.heartbeat = Duration::from_millis(300)).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let existing = create(&mut client).await;
    let rest = app.rest(Some(&app.admin_key));
    let open = |last: Option<String>| {
        let mut request = rest.request(
            reqwest::Method::GET,
            "/v1/batch_events?send_initial_state=true&status=validating,in_progress",
        );
        if let Some(id) = last {
            request = request.header("Last-Event-ID", id);
        }
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()["content-type"], "text/event-stream");
            RawSse {
                response,
                buffer: String::new(),
            }
        }
    };
    until_the_feed_holds_nothing_back(&app.db.url).await;
    let mut events = open(None).await;
    let initial = events.next().await;
    assert_eq!(
        (initial.event.as_str(), initial.id.as_deref()),
        ("initial", None)
    );
    assert_eq!(initial.data["batch"]["id"], existing.id.as_str());
    assert_eq!(initial.data["batch"]["object"], "batch");
    let synced = events.next().await;
    assert_eq!(synced.event, "synced");
    assert_eq!(synced.data["cursor"].as_str(), synced.id.as_deref());
    let bookmark = events.next().await;
    assert_eq!(bookmark.event, "bookmark");
    let sealer = app.app.as_ref().unwrap().hub().cursor_sealer().clone();
    let cursor = |id: &Option<String>| sealer.open("id", id.as_deref().unwrap(), None).unwrap();
    // The same, or (PostgreSQL, whose horizon moves with any transaction) further on.
    assert!(
        cursor(&bookmark.id) >= cursor(&synced.id),
        "a bookmark never goes back"
    );
    worker
        .update_batch(move_to(&existing.id, S::InProgress))
        .await
        .unwrap();
    let change = events.next_event().await;
    assert_eq!(change.event, "change");
    assert_eq!(change.data["batch"]["status"], "in_progress");
    let last_id = change.id.clone().expect("a change has an id");
    drop(events);

    worker
        .update_batch(move_to(&existing.id, S::Finalizing))
        .await
        .unwrap();
    let later = create(&mut client).await;
    let mut resumed = open(Some(last_id)).await;
    let left = resumed.next_event().await;
    assert_eq!(
        (left.event.as_str(), left.data["batch"]["status"].as_str()),
        ("left_filter", Some("finalizing"))
    );
    let created = resumed.next_event().await;
    assert_eq!(
        (created.event.as_str(), created.data["batch"]["id"].as_str()),
        ("change", Some(later.id.as_str()))
    );
}

/// A Server-Sent Events message of the feed, whose ids are cursors.
pub(crate) struct RawEvent {
    pub(crate) id: Option<String>,
    pub(crate) event: String,
    pub(crate) data: serde_json::Value,
}

/// Reads the feed's Server-Sent Events from a streaming response.
pub(crate) struct RawSse {
    pub(crate) response: reqwest::Response,
    pub(crate) buffer: String,
}

impl RawSse {
    /// The next event that is not a bookmark, within [`PATIENCE`] in all: a bookmark
    /// may come first whenever the change waited for is held back for a heartbeat.
    pub(crate) async fn next_event(&mut self) -> RawEvent {
        let skip_bookmarks = async {
            loop {
                let event = self.next().await;
                if event.event != "bookmark" {
                    return event;
                }
            }
        };
        tokio::time::timeout(PATIENCE, skip_bookmarks)
            .await
            .expect("an SSE event other than a bookmark in time")
    }

    pub(crate) async fn next(&mut self) -> RawEvent {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if event.is_empty() && data.is_empty() {
                    continue;
                }
                let data = serde_json::from_str(&data).expect("SSE data is JSON");
                return RawEvent { id, event, data };
            }
            let chunk = tokio::time::timeout(PATIENCE, self.response.chunk())
                .await
                .expect("an SSE chunk in time")
                .expect("the SSE stream does not fail")
                .expect("the SSE stream does not end");
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

/// `batchd watch --all` follows every batch of the key's owner, printing each status
/// change, with filters as flags; a batch id and `--all` together are refused.
async fn the_watch_all_command_prints_every_status_change(backend: Backend) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let app = TestApp::spawn(backend).await;
    let key = app.key("frank", Scope::Batches).await;
    let mut client = app.client(&key);
    let mut worker = app.worker(&app.admin_key);
    let server = format!("http://{}", app.grpc_addr());
    let existing = create(&mut client).await;
    let foreign = create(&mut app.client(&app.key("gina", Scope::Batches).await)).await;
    let mut follower = crate::process::batchd(
        &["watch", "--all", "--server", &server, "--api-key", &key],
        "unused://",
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    let mut line = async || {
        tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .expect("a line in time")
            .unwrap()
            .expect("batchd watch --all keeps running")
    };
    assert_eq!(
        line().await,
        format!("{} validating", existing.id),
        "the initial state"
    );
    move_through(&mut worker, &foreign.id, &[S::InProgress]).await;
    let later = create(&mut client).await;
    assert_eq!(
        line().await,
        format!("{} validating", later.id),
        "not gina's batch"
    );
    move_through(
        &mut worker,
        &existing.id,
        &[S::InProgress, S::Finalizing, S::Completed],
    )
    .await;
    for status in ["in_progress", "finalizing", "completed"] {
        assert_eq!(line().await, format!("{} {status}", existing.id));
    }
    client
        .delete_batch(pb::DeleteBatchRequest {
            batch_id: existing.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(line().await, format!("{} deleted", existing.id));
    follower.kill().await.unwrap();

    let (code, _, stderr) = crate::process::run(
        &[
            "watch",
            &later.id,
            "--all",
            "--server",
            &server,
            "--api-key",
            &key,
        ],
        "unused://",
    )
    .await;
    assert_eq!(code, 2, "a usage error: {stderr}");
    let (code, _, stderr) = crate::process::run(
        &[
            "watch",
            "--status",
            "running",
            "--server",
            &server,
            "--api-key",
            &key,
        ],
        "unused://",
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("--status `running` is not a status"),
        "{stderr}"
    );
}

on_both_stores!(
    the_watch_all_command_prints_every_status_change,
    resuming_collection_watchers_see_exactly_the_committed_history,
    the_initial_state_meets_the_live_part_with_no_gap_and_no_duplicate,
    filters_and_tenancy_decide_what_a_watcher_sees,
    hostile_requests_are_refused_and_limits_hold,
    a_compacted_cursor_is_refused_naming_no_position,
    a_slow_collection_watcher_holds_up_nobody_and_misses_nothing,
    server_sent_events_resume_with_the_cursor,
);
