//! batchd's benchmark harness: `cargo bench --bench load [-- --quick] [-- --json FILE]`.
//!
//! It starts what it needs (a release `batchd` on a fresh PostgreSQL database on the
//! local server), seeds it, drives it with a tonic load generator at fixed concurrency
//! (connections reused, a warm-up, then a timed window) and measures the database's
//! own limit for the same work with `pgbench` in the same run, because on a small,
//! noisy machine only ratios taken side by side mean much. Each figure is printed as
//! one line, `name value unit ratio-to-anchor`, and written as JSON.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use batchd::proto::batchd::v1 as pb;
use pb::batch_service_client::BatchServiceClient;
use pb::batch_worker_service_client::BatchWorkerServiceClient;
use serde::Serialize;
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The settings of one run.
struct Plan {
    quick: bool,
    json: Option<PathBuf>,
    /// Batches seeded.
    batches: u64,
    /// Open watch streams during the update figure.
    watchers: usize,
    /// Concurrent requests (and pgbench clients).
    concurrency: usize,
    warm_up: Duration,
    window: Duration,
}

impl Plan {
    fn from_args() -> Plan {
        let args: Vec<String> = std::env::args().collect();
        let quick = args.iter().any(|a| a == "--quick");
        let json = args
            .iter()
            .position(|a| a == "--json")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from);
        if quick {
            Plan {
                quick,
                json,
                batches: 2_000,
                watchers: 200,
                concurrency: 16,
                warm_up: Duration::from_secs(1),
                window: Duration::from_secs(3),
            }
        } else {
            Plan {
                quick,
                json,
                batches: 100_000,
                watchers: 1_000,
                concurrency: 16,
                warm_up: Duration::from_secs(3),
                window: Duration::from_secs(10),
            }
        }
    }
}

/// One measured figure.
#[derive(Debug, Serialize)]
struct Figure {
    name: String,
    value: f64,
    unit: &'static str,
    /// `value / anchor`, where the figure has an anchor.
    ratio: Option<f64>,
    anchor: Option<String>,
}

#[derive(Default)]
struct Report {
    figures: Vec<Figure>,
}

impl Report {
    fn add(&mut self, name: &str, value: f64, unit: &'static str, anchor: Option<(&str, f64)>) {
        let figure = Figure {
            name: name.to_owned(),
            value,
            unit,
            ratio: anchor.map(|(_, base)| value / base),
            anchor: anchor.map(|(name, _)| name.to_owned()),
        };
        let ratio = figure
            .ratio
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"));
        println!(
            "{} {:.1} {} {}",
            figure.name, figure.value, figure.unit, ratio
        );
        self.figures.push(figure);
    }
}

const POSTGRES_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let plan = Plan::from_args();
    let admin_url =
        std::env::var("BATCHD_BENCH_POSTGRES_URL").unwrap_or_else(|_| POSTGRES_ADMIN.to_owned());
    let database = TempDatabase::create(&admin_url).await?;
    eprintln!(
        "bench: {} mode, {} batches, {} watchers, concurrency {}",
        if plan.quick { "quick" } else { "full" },
        plan.batches,
        plan.watchers,
        plan.concurrency
    );
    let mut report = Report::default();
    let outcome = run(&plan, &database, &mut report).await;
    database.drop().await;
    outcome?;
    if let Some(path) = &plan.json {
        std::fs::write(path, serde_json::to_string_pretty(&report.figures)?)?;
    }
    Ok(())
}

async fn run(plan: &Plan, database: &TempDatabase, report: &mut Report) -> anyhow::Result<()> {
    let server = Batchd::start(&database.url).await?;
    let template = seed(plan, database, &server).await?;

    let watchers = Watchers::open(&server, plan).await?;
    let updates = update_load(&server, plan).await?;
    let delivered = watchers.stop();
    server.stop().await;

    // The database's own limit for what an UpdateBatch does: one row update and one
    // event insert in one statement (no NOTIFY), then the same with a NOTIFY in each
    // transaction, which is what batchd avoids. Run after batchd has stopped: pgbench
    // writes raw rows that batchd's watchers would not expect.
    let anchor = pgbench(
        &database.url,
        &pgbench_update_script(false),
        &template,
        plan,
    )
    .await?;
    let with_notify = pgbench(&database.url, &pgbench_update_script(true), &template, plan).await?;
    report.add("update_pgbench_anchor", anchor, "tx/s", None);
    report.add(
        "update_pgbench_notify_in_each_tx",
        with_notify,
        "tx/s",
        Some(("update_pgbench_anchor", anchor)),
    );
    report.add(
        &format!(
            "update_batchd_grpc_c{}_{}_watchers",
            plan.concurrency, plan.watchers
        ),
        updates.per_second,
        "tx/s",
        Some(("update_pgbench_anchor", anchor)),
    );
    report.add("update_batchd_grpc_p50", updates.p50_ms, "ms", None);
    report.add("update_batchd_grpc_p99", updates.p99_ms, "ms", None);
    report.add("watch_events_delivered", delivered as f64, "events", None);
    Ok(())
}

/// A PostgreSQL database for one run.
struct TempDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TempDatabase {
    async fn create(admin_url: &str) -> anyhow::Result<TempDatabase> {
        let name = format!("batchd_bench_{}", std::process::id());
        let mut admin = PgConnection::connect(admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await?;
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url, |(base, _)| base);
        Ok(TempDatabase {
            admin_url: admin_url.to_owned(),
            url: format!("{base}/{name}"),
            name,
        })
    }

    async fn drop(&self) {
        if let Ok(mut admin) = PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut admin)
            .await;
        }
    }
}

/// A release `batchd serve` process.
struct Batchd {
    child: Child,
    grpc_url: String,
    key: String,
}

impl Batchd {
    async fn start(database_url: &str) -> anyhow::Result<Batchd> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_batchd"))
            .args([
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
            ])
            .args(["--max-watches-per-key", "100000"])
            .env("BATCHD_DATABASE_URL", database_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut key = None;
        while let Some(line) = lines.next_line().await? {
            if line.starts_with("bd_sk_") {
                key = Some(line);
            } else if let Some(rest) = line.strip_prefix("batchd is serving gRPC on ") {
                let grpc = rest.split(' ').next().unwrap_or_default();
                return Ok(Batchd {
                    child,
                    grpc_url: format!("http://{grpc}"),
                    key: key.ok_or_else(|| anyhow::anyhow!("batchd printed no first key"))?,
                });
            }
        }
        anyhow::bail!("batchd exited before serving")
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(self.grpc_url.clone())?
            .connect()
            .await?)
    }

    fn bearer(&self) -> Bearer {
        Bearer(format!("Bearer {}", self.key).parse().expect("ASCII key"))
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

type Client = BatchServiceClient<InterceptedService<Channel, Bearer>>;
type Worker = BatchWorkerServiceClient<InterceptedService<Channel, Bearer>>;

/// The id of seeded batch number `n` (1-based).
fn seeded_id(n: u64) -> String {
    format!("batch_{n:032x}")
}

/// What the seeded batches were cloned from.
struct Template {
    snapshot: String,
}

/// Seeds `plan.batches` running batches by cloning one made through the API, so that
/// rows and event snapshots are exactly what batchd writes.
async fn seed(plan: &Plan, database: &TempDatabase, server: &Batchd) -> anyhow::Result<Template> {
    let channel = server.channel().await?;
    let mut client: Client = BatchServiceClient::with_interceptor(channel.clone(), server.bearer());
    let mut worker: Worker = BatchWorkerServiceClient::with_interceptor(channel, server.bearer());
    let template = client
        .create_batch(pb::CreateBatchRequest {
            input_file_id: "file-bench".into(),
            endpoint: "/v1/chat/completions".into(),
            completion_window: "24h".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    worker
        .update_batch(pb::UpdateBatchRequest {
            batch_id: template.id.clone(),
            status: Some(pb::BatchStatus::InProgress.into()),
            request_counts: Some(pb::RequestCounts {
                total: 1_000_000_000,
                completed: 0,
                failed: 0,
            }),
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut db = PgConnection::connect(&database.url).await?;
    sqlx::query(
        "INSERT INTO batches (id, user_id, api_key_id, endpoint, input_file_id, \
         completion_window, status, created_at, in_progress_at, expires_at, request_total, \
         request_completed, request_failed, version, updated_at) \
         SELECT 'batch_' || lpad(to_hex(g), 32, '0'), user_id, api_key_id, endpoint, \
         input_file_id, completion_window, status, created_at, in_progress_at, expires_at, \
         request_total, request_completed, request_failed, version, updated_at \
         FROM batches, generate_series(1, $2) AS g WHERE id = $1",
    )
    .bind(&template.id)
    .bind(plan.batches as i64)
    .execute(&mut db)
    .await?;
    sqlx::query(
        "INSERT INTO batch_events (batch_id, version, snapshot, at) \
         SELECT 'batch_' || lpad(to_hex(g), 32, '0'), version, \
         jsonb_set(snapshot, '{id}', to_jsonb('batch_' || lpad(to_hex(g), 32, '0'))), at \
         FROM batch_events, generate_series(1, $2) AS g WHERE batch_id = $1 AND version = 2",
    )
    .bind(&template.id)
    .bind(plan.batches as i64)
    .execute(&mut db)
    .await?;
    sqlx::query("ANALYZE").execute(&mut db).await?;
    let snapshot: String = sqlx::query_scalar(
        "SELECT snapshot::text FROM batch_events WHERE batch_id = $1 AND version = 2",
    )
    .bind(&template.id)
    .fetch_one(&mut db)
    .await?;
    eprintln!(
        "bench: seeded {} batches in {:.1?}",
        plan.batches,
        started.elapsed()
    );
    Ok(Template { snapshot })
}

/// The SQL of one UpdateBatch as a pgbench script: the same statement shape as
/// batchd's (every mutable column set, the event appended in the same statement), the
/// snapshot bound as a parameter (`-D snapshot=...`) as batchd binds it.
fn pgbench_update_script(notify_in_transaction: bool) -> String {
    let change = "WITH changed AS (UPDATE batches SET status = 'in_progress', output_file_id = NULL, \
         error_file_id = NULL, errors = NULL, in_progress_at = 1, finalizing_at = NULL, \
         completed_at = NULL, failed_at = NULL, expired_at = NULL, cancelling_at = NULL, \
         cancelled_at = NULL, request_total = 1000000000, \
         request_completed = request_completed + 1, request_failed = 0, model = NULL, \
         usage = NULL, version = version + 1, updated_at = 1 \
         WHERE id = 'batch_' || lpad(to_hex(:n::bigint), 32, '0') RETURNING id, version) \
         INSERT INTO batch_events (batch_id, version, snapshot, at) \
         SELECT id, version, :snapshot::jsonb, 1 FROM changed;";
    if notify_in_transaction {
        format!(
            "\\set n random(1, :nbatches)\nBEGIN;\n{change}\n\
             SELECT pg_notify('batchd_bench', 'batch_' || :n::text);\nCOMMIT;\n"
        )
    } else {
        format!("\\set n random(1, :nbatches)\n{change}\n")
    }
}

/// Runs a pgbench script at the plan's concurrency; returns transactions per second.
async fn pgbench(
    database_url: &str,
    script: &str,
    template: &Template,
    plan: &Plan,
) -> anyhow::Result<f64> {
    let file = std::env::temp_dir().join(format!("batchd-bench-{}.sql", std::process::id()));
    std::fs::write(&file, script)?;
    let seconds = (plan.warm_up + plan.window).as_secs().to_string();
    let output = Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-c"])
        .arg(plan.concurrency.to_string())
        .args(["-j", "2", "-T", &seconds, "-D"])
        .arg(format!("nbatches={}", plan.batches))
        .arg("-D")
        .arg(format!("snapshot={}", template.snapshot))
        .arg("-f")
        .arg(&file)
        .arg(database_url)
        .output()
        .await?;
    let _ = std::fs::remove_file(&file);
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "pgbench gave no tps: {}{}",
                stdout,
                String::from_utf8_lossy(&output.stderr)
            )
        })
}

/// Open watch streams, counting what they receive.
struct Watchers {
    stop: Arc<AtomicBool>,
    delivered: Arc<AtomicU64>,
}

impl Watchers {
    async fn open(server: &Batchd, plan: &Plan) -> anyhow::Result<Watchers> {
        let stop = Arc::new(AtomicBool::new(false));
        let delivered = Arc::new(AtomicU64::new(0));
        // A few hundred streams per connection, as separate clients would open them.
        let mut channel = server.channel().await?;
        for w in 0..plan.watchers {
            if w % 250 == 0 {
                channel = server.channel().await?;
            }
            let mut client: Client =
                BatchServiceClient::with_interceptor(channel.clone(), server.bearer());
            // Spread over the batches the update load touches.
            let id = seeded_id(1 + (w as u64 * 7919) % plan.batches);
            let mut stream = client
                .watch_batch(pb::WatchBatchRequest {
                    batch_id: id,
                    after_version: None,
                })
                .await?
                .into_inner();
            let (stop, delivered) = (stop.clone(), delivered.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match stream.message().await {
                        Ok(Some(_)) => {
                            delivered.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => return,
                    }
                }
            });
        }
        Ok(Watchers { stop, delivered })
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.delivered.load(Ordering::Relaxed)
    }
}

struct Throughput {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// UpdateBatch at fixed concurrency: each worker owns a disjoint set of batches and
/// moves their counts forward one at a time, so no update is refused.
async fn update_load(server: &Batchd, plan: &Plan) -> anyhow::Result<Throughput> {
    let channels: Vec<Channel> = {
        let mut channels = Vec::new();
        for _ in 0..4 {
            channels.push(server.channel().await?);
        }
        channels
    };
    let start = Instant::now();
    let measure_from = start + plan.warm_up;
    let end = measure_from + plan.window;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..plan.concurrency {
        let mut worker: Worker = BatchWorkerServiceClient::with_interceptor(
            channels[w % channels.len()].clone(),
            server.bearer(),
        );
        let owned: Vec<u64> = (1..=plan.batches)
            .filter(|n| (*n as usize) % plan.concurrency == w)
            .collect();
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64 ^ w as u64;
        tasks.spawn(async move {
            let mut counts = std::collections::HashMap::<u64, i64>::new();
            let mut latencies = Vec::new();
            let mut failures = 0u64;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let n = owned[(seed % owned.len() as u64) as usize];
                let completed = counts.entry(n).or_insert(0);
                *completed += 1;
                let request = pb::UpdateBatchRequest {
                    batch_id: seeded_id(n),
                    request_counts: Some(pb::RequestCounts {
                        total: 1_000_000_000,
                        completed: *completed,
                        failed: 0,
                    }),
                    ..Default::default()
                };
                let sent = Instant::now();
                let outcome = worker.update_batch(request).await;
                if sent >= measure_from {
                    match outcome {
                        Ok(_) => latencies.push(sent.elapsed()),
                        Err(_) => failures += 1,
                    }
                }
            }
            (latencies, failures)
        });
    }
    let mut latencies = Vec::new();
    let mut failures = 0;
    while let Some(done) = tasks.join_next().await {
        let (mut mine, failed) = done?;
        latencies.append(&mut mine);
        failures += failed;
    }
    if failures > 0 {
        anyhow::bail!("{failures} updates failed during the window");
    }
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1_000.0)
    };
    Ok(Throughput {
        per_second: latencies.len() as f64 / plan.window.as_secs_f64(),
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
    })
}
