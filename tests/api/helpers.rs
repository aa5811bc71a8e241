//! Test harness: a fresh database per test (a temporary SQLite file or a new PostgreSQL
//! database), a real batchd on random ports, and authenticated tonic clients.

use std::time::Duration;

use batchd::app::{App, ServeOptions};
use batchd::domain::Scope;
use batchd::proto::batchd::v1 as pb;
use pb::batch_service_client::BatchServiceClient;
use pb::batch_worker_service_client::BatchWorkerServiceClient;
use sqlx::Connection;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// The PostgreSQL server the PostgreSQL suite creates its databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("BATCHD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Which store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A temporary SQLite file.
    Sqlite,
    /// A new database on the test PostgreSQL server.
    Postgres,
}

/// A database that exists for one test and is removed afterwards.
pub struct TestDb {
    /// Connection URL for batchd.
    pub url: String,
    /// The PostgreSQL database name, dropped on drop.
    postgres_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// A fresh, empty database.
    pub async fn fresh(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let url = format!("sqlite://{}", dir.path().join("batchd.db").display());
                TestDb {
                    url,
                    postgres_name: None,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let admin = postgres_admin_url();
                let name = format!("batchd_test_{}", random_suffix());
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .unwrap_or_else(|e| {
                        panic!(
                            "PostgreSQL at {admin} is unreachable ({e}). Start it, point \
                         BATCHD_TEST_POSTGRES_URL at one, or run ./scripts/test, which skips \
                         the PostgreSQL suite (and says so) when no server answers."
                        )
                    });
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                let base = admin
                    .rsplit_once('/')
                    .map_or(admin.as_str(), |(base, _)| base);
                TestDb {
                    url: format!("{base}/{name}"),
                    postgres_name: Some(name),
                    _dir: None,
                }
            }
        }
    }

    /// Drops the PostgreSQL database now, terminating its connections.
    pub async fn drop_postgres_database(&self) {
        if let Some(name) = &self.postgres_name {
            drop_postgres_database(name).await;
        }
    }
}

async fn drop_postgres_database(name: &str) {
    if let Ok(mut conn) = sqlx::PgConnection::connect(&postgres_admin_url()).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.postgres_name.take() {
            // Drop runs outside any runtime guarantee; a thread with its own runtime
            // can always block on the cleanup.
            let _ = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|rt| rt.block_on(drop_postgres_database(&name)))
            })
            .join();
        }
    }
}

fn random_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Clone)]
pub struct Bearer(pub Option<String>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(key) = &self.0 {
            let value = format!("Bearer {key}").parse().expect("ASCII key");
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// A client of the batch API.
pub type Client = BatchServiceClient<InterceptedService<Channel, Bearer>>;
/// A client of the worker API.
pub type Worker = BatchWorkerServiceClient<InterceptedService<Channel, Bearer>>;

/// A batchd running in this process on random ports, over its own fresh database.
pub struct TestApp {
    /// The server; `None` once stopped.
    pub app: Option<App>,
    /// Its database.
    pub db: TestDb,
    /// Where HTTP listens.
    pub http_addr: std::net::SocketAddr,
    /// The admin key batchd created on the empty database.
    pub admin_key: String,
    channel: Channel,
}

impl TestApp {
    /// Starts batchd on a fresh database of `backend`.
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, |_| {}).await
    }

    /// Starts batchd on a fresh database, with options edited by `edit`.
    pub async fn spawn_with(backend: Backend, edit: impl FnOnce(&mut ServeOptions)) -> TestApp {
        let db = TestDb::fresh(backend).await;
        let mut options = ServeOptions::local(db.url.clone());
        // Tests apply the lifecycle timers themselves, with a manual clock.
        options.sweep_interval = Duration::from_secs(3600);
        edit(&mut options);
        let mut app = App::start(options).await.expect("batchd starts");
        let (_, secret) = app
            .take_first_api_key()
            .expect("an empty database gets a first admin key");
        let channel = Channel::from_shared(format!("http://{}", app.grpc_addr()))
            .unwrap()
            .connect()
            .await
            .expect("connect to batchd");
        TestApp {
            http_addr: app.http_addr(),
            admin_key: secret.expose().to_owned(),
            app: Some(app),
            db,
            channel,
        }
    }

    /// A new API key for `user` with `scope`.
    pub async fn key(&self, user: &str, scope: Scope) -> String {
        let app = self.app.as_ref().expect("running");
        let (_, secret) = app
            .service()
            .create_api_key(user, scope)
            .await
            .expect("create key");
        secret.expose().to_owned()
    }

    /// A batch API client sending `key`.
    pub fn client(&self, key: &str) -> Client {
        BatchServiceClient::with_interceptor(self.channel.clone(), Bearer(Some(key.to_owned())))
    }

    /// A batch API client sending no key at all.
    pub fn anonymous_client(&self) -> Client {
        BatchServiceClient::with_interceptor(self.channel.clone(), Bearer(None))
    }

    /// A worker API client sending `key`.
    pub fn worker(&self, key: &str) -> Worker {
        BatchWorkerServiceClient::with_interceptor(
            self.channel.clone(),
            Bearer(Some(key.to_owned())),
        )
    }

    /// Where gRPC listens.
    pub fn grpc_addr(&self) -> std::net::SocketAddr {
        self.app.as_ref().expect("running").grpc_addr()
    }

    /// The gRPC channel, for other services (health, reflection).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Opens the store directly, to inspect what was committed.
    pub async fn store(&self) -> std::sync::Arc<dyn batchd::store::Store> {
        batchd::store::connect(&self.db.url, &Default::default())
            .await
            .expect("open store")
    }
}

/// A test clock that stands still until told to move.
#[derive(Debug)]
pub struct ManualClock(std::sync::atomic::AtomicI64);

impl ManualClock {
    /// A clock at `now` (Unix seconds).
    pub fn at(now: i64) -> std::sync::Arc<ManualClock> {
        std::sync::Arc::new(ManualClock(std::sync::atomic::AtomicI64::new(now)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, seconds: i64) {
        self.0
            .fetch_add(seconds, std::sync::atomic::Ordering::SeqCst);
    }
}

impl batchd::clock::Clock for ManualClock {
    fn now(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A REST client of one batchd, sending one API key.
#[derive(Clone)]
pub struct Rest {
    client: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Rest {
    /// A request to `path` with the key as `Authorization: Bearer`.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// Sends `request` and returns the status and the JSON body.
    pub async fn send(request: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
        let response = request.send().await.expect("HTTP request");
        let status = response.status().as_u16();
        let body = response.text().await.expect("HTTP body");
        let json = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {body}"));
        (status, json)
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        Self::send(self.request(reqwest::Method::GET, path)).await
    }

    /// POST `body` as JSON to `path`.
    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        Self::send(self.request(reqwest::Method::POST, path).json(&body)).await
    }
}

impl TestApp {
    /// A REST client sending `key` (or no key).
    pub fn rest(&self, key: Option<&str>) -> Rest {
        Rest {
            client: reqwest::Client::new(),
            base: format!("http://{}", self.http_addr),
            key: key.map(str::to_owned),
        }
    }
}

/// A valid create request.
pub fn new_batch() -> pb::CreateBatchRequest {
    pb::CreateBatchRequest {
        input_file_id: "file-abc123".into(),
        endpoint: "/v1/chat/completions".into(),
        completion_window: "24h".into(),
        ..Default::default()
    }
}

/// Creates a batch with `client` and returns it.
pub async fn create(client: &mut Client) -> pb::Batch {
    client
        .create_batch(new_batch())
        .await
        .expect("create batch")
        .into_inner()
}

/// Fetches a batch with `client`, which must be allowed to see it.
pub async fn get(client: &mut Client, batch_id: &str) -> pb::Batch {
    client
        .get_batch(pb::GetBatchRequest {
            batch_id: batch_id.to_owned(),
        })
        .await
        .expect("get batch")
        .into_inner()
}

/// An update that only moves the status.
pub fn move_to(batch_id: &str, status: pb::BatchStatus) -> pb::UpdateBatchRequest {
    pb::UpdateBatchRequest {
        batch_id: batch_id.to_owned(),
        status: Some(status.into()),
        ..Default::default()
    }
}

/// Moves a batch through `statuses` in turn with `worker`; returns it in the last one.
pub async fn move_through(
    worker: &mut Worker,
    batch_id: &str,
    statuses: &[pb::BatchStatus],
) -> pb::Batch {
    let mut moved = None;
    for &status in statuses {
        let batch = worker
            .update_batch(move_to(batch_id, status))
            .await
            .unwrap_or_else(|e| panic!("move {batch_id} to {status:?}: {e:?}"));
        moved = Some(batch.into_inner());
    }
    moved.expect("at least one status")
}

/// Drives a new (validating) batch the way a worker finishes one: in_progress,
/// finalizing, completed. Returns it completed.
pub async fn complete(worker: &mut Worker, batch_id: &str) -> pb::Batch {
    use pb::BatchStatus as S;
    move_through(
        worker,
        batch_id,
        &[S::InProgress, S::Finalizing, S::Completed],
    )
    .await
}

/// Asserts that `result` failed with `code` and a message containing `needle`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, needle: &str) {
    match result {
        Ok(value) => panic!("expected {code:?} ({needle}), got Ok({value:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(needle),
                "message {:?} does not mention {needle:?}",
                status.message()
            );
        }
    }
}

/// The lines of `/metrics` right now.
pub async fn metrics_text(app: &TestApp) -> String {
    reqwest::get(format!("http://{}/metrics", app.http_addr))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body")
}

/// The value of the first series of `text` that starts with `series` (a name, or a
/// name with its labels).
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(series) && !line.starts_with('#'))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics"))
}

/// Polls `check` every 50 ms until it returns true, failing after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs each named test (an `async fn(Backend)` of the enclosing module) once per store:
/// `<module>::sqlite::<test>` and `<module>::postgres::<test>`.
macro_rules! on_both_stores {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::helpers::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::helpers::Backend::Postgres).await
                }
            )*
        }
    };
}
pub(crate) use on_both_stores;

/// Compacts the event log with `retention` until `expected` events are deleted in all,
/// and checks that no more are. On PostgreSQL compaction leaves what the change feed
/// still holds back, and the feed's horizon is the server's: another test's transaction
/// may hold it a moment after this test's writes.
pub async fn compact_exactly(
    service: &batchd::service::BatchService,
    retention: Duration,
    expected: u64,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut deleted = 0;
    loop {
        deleted += service
            .compact_event_log(retention)
            .await
            .expect("compaction");
        if deleted >= expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "compaction deleted {deleted} of {expected} events"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(deleted, expected, "compaction deleted exactly these");
}

/// Creates `count` batches at once through `app`'s service with its admin key (as
/// concurrent creates would), for tests of what replicas do with many batches.
pub async fn create_many_through_the_service(app: &TestApp, count: usize) {
    let service = app.app.as_ref().expect("running").service().clone();
    let caller = service
        .admit(Some(&app.admin_key))
        .await
        .map_err(|refused| refused.error)
        .unwrap()
        .caller;
    let mut creates = tokio::task::JoinSet::new();
    for _ in 0..count {
        let (service, caller) = (service.clone(), caller.clone());
        creates.spawn(async move {
            service
                .create_batch(
                    &caller,
                    batchd::domain::CreateBatchInput {
                        input_file_id: "file-1".into(),
                        endpoint: "/v1/embeddings".into(),
                        completion_window: "24h".into(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap()
        });
    }
    while let Some(created) = creates.join_next().await {
        created.unwrap();
    }
}

/// The address of the test PostgreSQL server.
pub fn postgres_addr() -> std::net::SocketAddr {
    let url = postgres_admin_url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:5432")
    };
    let authority = authority.replace("localhost", "127.0.0.1");
    authority.parse().expect("the test PostgreSQL address")
}
