//! WatchBatch stays exact and bounded under stress: watchers coming and going by the
//! thousand, versions compacted away before a feed read them, a listener whose
//! reconnect is slow, and an API key revoked while its streams are open.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use batchd::clock::Clock;
use batchd::domain::{BatchId, Scope};
use batchd::proto::batchd::v1 as pb;
use batchd::store::Store;
use pb::BatchStatus as S;
use pb::EventType as E;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tonic::Code;

use crate::helpers::*;
use crate::watch::{next, progress, sse, watch};

/// Item A (a, b): 2,000 watchers of one batch are opened and dropped while a worker
/// commits. Each sees a contiguous sequence; the watchers that stay see every version
/// up to the terminal one; and once none is left the hub holds no feed. (The races
/// themselves last nanoseconds, too short to be hit reliably through gRPC on two
/// cores; the hub's unit tests hit them by subscribing in tight loops.)
async fn watchers_coming_and_going_by_the_thousand_miss_nothing_and_leave_no_feed(
    backend: Backend,
) {
    const CHURNERS: u64 = 8;
    const CYCLES: u64 = 250; // 8 x 250 = 2,000 watchers opened and dropped
    let app = TestApp::spawn_with(backend, |o| {
        // Only commits wake the feed, and only versions are sent.
        o.watch.safety_poll = Duration::from_secs(3600);
        o.watch.heartbeat = Duration::from_secs(3600);
        o.watch.max_watches_per_key = 10_000;
    })
    .await;
    let hub = app.app.as_ref().unwrap().hub().clone();
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let id = create(&mut client).await.id;
    worker
        .update_batch(move_to(&id, S::InProgress))
        .await
        .unwrap();

    let (stop_writing, writing) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn({
        let (mut worker, id) = (worker.clone(), id.clone());
        async move {
            let mut step = 0;
            while !*writing.borrow() {
                step += 1;
                worker.update_batch(progress(&id, step)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });

    let (staying, mut stayed) = mpsc::channel(CHURNERS as usize);
    let mut churners = JoinSet::new();
    for churner in 0..CHURNERS {
        let (mut client, id, staying) = (client.clone(), id.clone(), staying.clone());
        churners.spawn(async move {
            for cycle in 0..CYCLES {
                let mut stream = watch(&mut client, &id, None).await.expect("watch");
                let (kind, first) = next(&mut stream).await.expect("a snapshot");
                assert_eq!(kind, E::Snapshot);
                // Half of them hang up at once, the others after the next version.
                if (cycle + churner) % 2 == 0 {
                    let (kind, second) = next(&mut stream).await.expect("the next version");
                    assert_eq!((kind, second.version), (E::Change, first.version + 1));
                }
            }
            // The last watcher of each task stays to the end.
            let mut stream = watch(&mut client, &id, None).await.expect("watch");
            let mut seen = vec![next(&mut stream).await.expect("a snapshot")];
            staying.send(()).await.unwrap();
            while let Some(message) = next(&mut stream).await {
                seen.push(message);
            }
            seen
        });
    }
    for _ in 0..CHURNERS {
        stayed.recv().await.unwrap();
    }
    stop_writing.send_replace(true);
    writer.await.unwrap();
    move_through(&mut worker, &id, &[S::Finalizing, S::Completed]).await;
    let last = get(&mut client, &id).await.version;

    while let Some(seen) = churners.join_next().await {
        let seen = seen.unwrap();
        assert_eq!(seen[0].0, E::Snapshot);
        for pair in seen.windows(2) {
            assert_eq!(
                (pair[1].0, pair[1].1.version),
                (E::Change, pair[0].1.version + 1),
                "contiguous"
            );
        }
        let (_, end) = seen.last().unwrap();
        assert_eq!((end.version, end.status()), (last, S::Completed));
    }
    eventually(Duration::from_secs(5), "no feed left", || async {
        hub.watched_batches() == 0 && hub.open_streams() == 0
    })
    .await;
}

/// Commits the next version of a batch straight into the database, as another replica
/// whose notification never arrived would: this replica's hub hears nothing of it.
async fn commit_behind_the_replicas_back(store: &dyn Store, id: &str, at: i64) -> i64 {
    let id = BatchId::parse("id", id).unwrap();
    let mut next = store.get_batch(&id).await.unwrap().expect("the batch");
    next.version += 1;
    next.request_counts.completed += 1;
    next.updated_at = Some(at);
    assert!(
        store.commit_change(&next).await.unwrap(),
        "nobody else writes"
    );
    next.version
}

/// Item A (c): versions a feed had not read yet are compacted away; the feed moves on
/// to what the log has, and its watcher gets a snapshot of the batch, then every change.
async fn a_feed_moves_past_versions_compacted_away_before_it_read_them(backend: Backend) {
    let clock = ManualClock::at(1_767_225_600);
    let app_clock: Arc<dyn Clock> = clock.clone();
    let app = TestApp::spawn_with(backend, |o| {
        o.clock = app_clock;
        o.watch.safety_poll = Duration::from_secs(3600);
        o.watch.heartbeat = Duration::from_secs(3600);
    })
    .await;
    let service = app.app.as_ref().unwrap().service().clone();
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let id = create(&mut client).await.id;
    worker
        .update_batch(move_to(&id, S::InProgress))
        .await
        .unwrap();
    let mut stream = watch(&mut client, &id, None).await.unwrap();
    let (kind, snapshot) = next(&mut stream).await.unwrap();
    assert_eq!((kind, snapshot.version), (E::Snapshot, 2));

    // Versions 3..=6 are committed elsewhere and their notifications lost; a week
    // later compaction keeps only the latest of them.
    let store = app.store().await;
    for _ in 3..=6 {
        commit_behind_the_replicas_back(store.as_ref(), &id, clock.now()).await;
    }
    store.close().await;
    clock.advance(8 * 24 * 3600);
    // Versions 1..=5 go, the latest (6) stays.
    compact_exactly(&service, Duration::from_secs(7 * 24 * 3600), 5).await;

    // The next commit here wakes the feed: the log after its cursor (2) starts at 6.
    worker.update_batch(progress(&id, 100)).await.unwrap();
    let (kind, snapshot) = next(&mut stream).await.expect("the feed moved on");
    assert_eq!((kind, snapshot.version), (E::Snapshot, 7));
    for (status, version) in [(S::Finalizing, 8), (S::Completed, 9)] {
        worker.update_batch(move_to(&id, status)).await.unwrap();
        let (kind, change) = next(&mut stream).await.unwrap();
        assert_eq!((kind, change.version), (E::Change, version));
    }
    assert_eq!(next(&mut stream).await, None);
}

/// Item B: revoking a key ends its open streams, gRPC and SSE, with UNAUTHENTICATED
/// within the API key cache TTL and frees their places; another key's stream goes on.
async fn revoking_a_key_ends_its_open_streams(backend: Backend) {
    let app = TestApp::spawn_with(backend, |o| {
        o.caches.api_key_ttl = Duration::from_millis(500);
        o.watch.heartbeat = Duration::from_secs(3600);
    })
    .await;
    let service = app.app.as_ref().unwrap().service().clone();
    let hub = app.app.as_ref().unwrap().hub().clone();
    let (key, secret) = service
        .create_api_key("dana", Scope::Batches)
        .await
        .unwrap();
    let mut dana = app.client(secret.expose());
    let id = create(&mut dana).await.id;
    let mut grpc = watch(&mut dana, &id, None).await.unwrap();
    assert_eq!(next(&mut grpc).await.unwrap().0, E::Snapshot);
    let mut events = sse(&app.rest(Some(secret.expose())), &id, None).await;
    assert_eq!(events.next().await.unwrap().event, "snapshot");
    let mut other = app.client(&app.key("dana", Scope::Batches).await);
    let mut kept = watch(&mut other, &id, None).await.unwrap();
    assert_eq!(next(&mut kept).await.unwrap().0, E::Snapshot);
    assert_eq!(hub.open_streams(), 3);

    service.revoke_api_key(&key.id).await.unwrap();
    let revoked = tokio::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), grpc.message())
        .await
        .expect("the gRPC stream ends in time");
    assert_status(ended, Code::Unauthenticated, "revoked");
    let error = events.next().await.expect("an error event");
    assert_eq!(error.event, "error", "{error:?}");
    assert_eq!(error.data["error"]["code"], "invalid_api_key", "{error:?}");
    assert!(events.next().await.is_none(), "the SSE stream ends");
    assert!(revoked.elapsed() < Duration::from_secs(3), "within the TTL");
    eventually(Duration::from_secs(5), "freed stream places", || async {
        hub.open_streams() == 1
    })
    .await;

    // The other key of the same user keeps its stream.
    let mut worker = app.worker(&app.admin_key);
    worker
        .update_batch(move_to(&id, S::InProgress))
        .await
        .unwrap();
    let (kind, change) = next(&mut kept).await.unwrap();
    assert_eq!((kind, change.version), (E::Change, 2));
}

on_both_stores!(
    watchers_coming_and_going_by_the_thousand_miss_nothing_and_leave_no_feed,
    a_feed_moves_past_versions_compacted_away_before_it_read_them,
    revoking_a_key_ends_its_open_streams,
);

/// Item A (d): the listener's connection is cut and its first LISTEN on a new one
/// fails; a commit made while the next LISTEN is on its way is still delivered, with
/// no safety poll, because the feeds re-read only once LISTEN works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_listener_rereads_the_log_only_once_listen_works_again() {
    let proxy = ListenSaboteur::start().await;
    let app = TestApp::spawn_with(Backend::Postgres, |o| {
        o.database_url = proxy.route(&o.database_url);
        o.watch.safety_poll = Duration::from_secs(3600);
        o.watch.heartbeat = Duration::from_secs(3600);
    })
    .await;
    let mut client = app.client(&app.admin_key);
    let id = create(&mut client).await.id;
    let mut stream = watch(&mut client, &id, None).await.unwrap();
    assert_eq!(next(&mut stream).await.unwrap().0, E::Snapshot);

    let admin = sqlx::PgPool::connect(&app.db.url).await.unwrap();
    let listeners = "FROM pg_stat_activity WHERE datname = current_database() \
                     AND query ILIKE 'LISTEN%'";
    eventually(Duration::from_secs(5), "the listener", || async {
        let count: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) {listeners}")))
                .fetch_one(&admin)
                .await
                .unwrap();
        count == 1
    })
    .await;
    let held = proxy.cut_then_hold_the_next_listens();
    let killed: Vec<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT pg_terminate_backend(pid) {listeners}"
    )))
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(killed, vec![true]);
    tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("the listener tries LISTEN again")
        .unwrap();

    let store = app.store().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let version = commit_behind_the_replicas_back(store.as_ref(), &id, now).await;
    store.close().await;
    let (kind, change) = next(&mut stream).await.expect("the change arrives");
    assert_eq!((kind, change.version), (E::Change, version));
}

/// How long the proxy holds a LISTEN: ample time for the test to commit meanwhile.
const LISTEN_HOLD: Duration = Duration::from_secs(1);

/// A TCP proxy in front of the test PostgreSQL server that, once told to, cuts the
/// connection carrying the first LISTEN it sees and holds the next LISTEN back for
/// [`LISTEN_HOLD`]. Everything else passes through untouched. (`crate::proxy` acts on
/// every connection at once, which cannot single out the listener's.)
struct ListenSaboteur {
    addr: SocketAddr,
    plan: Arc<Mutex<Plan>>,
}

#[derive(Default)]
enum Plan {
    #[default]
    PassThrough,
    Cut(oneshot::Sender<()>),
    Hold(oneshot::Sender<()>),
}

impl ListenSaboteur {
    async fn start() -> ListenSaboteur {
        let upstream = crate::helpers::postgres_addr();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let plan = Arc::new(Mutex::new(Plan::PassThrough));
        let shared = plan.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(upstream).await.unwrap();
                tokio::spawn(forward(client, server, shared.clone()));
            }
        });
        ListenSaboteur { addr, plan }
    }

    /// `url` (a test database on the PostgreSQL server) through this proxy.
    fn route(&self, url: &str) -> String {
        let mut url = reqwest::Url::parse(url).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(self.addr.port())).unwrap();
        url.to_string()
    }

    /// Cuts the next LISTEN and holds the one after; the receiver fires once that one
    /// is held.
    fn cut_then_hold_the_next_listens(&self) -> oneshot::Receiver<()> {
        let (held, on_hold) = oneshot::channel();
        *self.plan.lock().unwrap() = Plan::Cut(held);
        on_hold
    }
}

/// Copies one connection both ways, applying the plan to what the client sends.
async fn forward(client: TcpStream, server: TcpStream, plan: Arc<Mutex<Plan>>) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let downstream =
        tokio::spawn(async move { tokio::io::copy(&mut from_server, &mut to_client).await });
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = match from_client.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let chunk = &buffer[..read];
        // `LISTEN "channel"`, as sqlx sends it; `UNLISTEN *` does not match.
        if chunk.windows(8).any(|w| w == b"LISTEN \"") {
            let step = std::mem::take(&mut *plan.lock().unwrap());
            match step {
                Plan::PassThrough => {}
                Plan::Cut(held) => {
                    *plan.lock().unwrap() = Plan::Hold(held);
                    break;
                }
                Plan::Hold(held) => {
                    let _ = held.send(());
                    tokio::time::sleep(LISTEN_HOLD).await;
                }
            }
        }
        if to_server.write_all(chunk).await.is_err() {
            break;
        }
    }
    downstream.abort();
}
