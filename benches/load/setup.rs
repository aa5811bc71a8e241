//! What the figures run against: databases, `batchd` processes, seeded batches, pgbench.

use std::process::Stdio;
use std::time::Instant;

use batchd::proto::batchd::v1 as pb;
use pb::batch_service_client::BatchServiceClient;
use pb::batch_worker_service_client::BatchWorkerServiceClient;
use sqlx::{Connection, PgConnection, SqliteConnection};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::Plan;

const POSTGRES_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A PostgreSQL database for one run.
pub struct TempPostgres {
    admin_url: String,
    name: String,
    /// Its URL.
    pub url: String,
}

impl TempPostgres {
    pub async fn create() -> anyhow::Result<TempPostgres> {
        let admin_url = std::env::var("BATCHD_BENCH_POSTGRES_URL")
            .unwrap_or_else(|_| POSTGRES_ADMIN.to_owned());
        let name = format!("batchd_bench_{}", std::process::id());
        let mut admin = PgConnection::connect(&admin_url).await?;
        for sql in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut admin)
                .await?;
        }
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url.as_str(), |(base, _)| base);
        Ok(TempPostgres {
            url: format!("{base}/{name}"),
            admin_url,
            name,
        })
    }

    pub async fn drop(&self) {
        if let Ok(mut admin) = PgConnection::connect(&self.admin_url).await {
            let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
            let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut admin)
                .await;
        }
    }
}

/// A temporary SQLite file.
pub struct TempSqlite {
    _dir: tempfile::TempDir,
    /// Its URL.
    pub url: String,
}

impl TempSqlite {
    pub fn create() -> anyhow::Result<TempSqlite> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        Ok(TempSqlite { _dir: dir, url })
    }
}

/// A release `batchd serve` process on random ports.
pub struct Batchd {
    child: Child,
    /// `http://127.0.0.1:PORT` of gRPC.
    pub grpc_url: String,
    /// `127.0.0.1:PORT` of HTTP.
    pub http_addr: String,
    /// The admin key it created.
    pub key: String,
}

impl Batchd {
    /// Starts batchd on `database_url`; `key` reuses a key of a database that has one.
    pub async fn start(database_url: &str, extra: &[&str]) -> anyhow::Result<Batchd> {
        Self::start_with_key(database_url, extra, None).await
    }

    pub async fn start_with_key(
        database_url: &str,
        extra: &[&str],
        key: Option<&str>,
    ) -> anyhow::Result<Batchd> {
        // BATCHD_BENCH_BINARY: another build of batchd, e.g. one with frame pointers for
        // profiling.
        let binary = std::env::var("BATCHD_BENCH_BINARY")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_batchd").to_owned());
        let mut child = Command::new(binary)
            .args([
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
            ])
            .args(["--max-watches-per-key", "1000000", "--shutdown-delay", "0s"])
            .args(extra)
            .env("BATCHD_DATABASE_URL", database_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut first_key = key.map(str::to_owned);
        while let Some(line) = lines.next_line().await? {
            if line.starts_with("bd_sk_") {
                first_key = Some(line);
            } else if let Some(rest) = line.strip_prefix("batchd is serving gRPC on ") {
                let (grpc, http) = rest.split_once(" and HTTP on ").unwrap_or_default();
                return Ok(Batchd {
                    child,
                    grpc_url: format!("http://{grpc}"),
                    http_addr: http.to_owned(),
                    key: first_key.ok_or_else(|| anyhow::anyhow!("batchd printed no first key"))?,
                });
            }
        }
        anyhow::bail!("batchd exited before serving")
    }

    /// A new HTTP/2 connection.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(self.grpc_url.clone())?
            .connect()
            .await?)
    }

    pub fn bearer(&self) -> Bearer {
        Bearer(
            format!("Bearer {}", self.key)
                .parse()
                .expect("an ASCII key"),
        )
    }

    /// A client sending `key` instead of the admin key.
    pub fn client_as(&self, channel: Channel, key: &str) -> Client {
        let bearer = Bearer(format!("Bearer {key}").parse().expect("an ASCII key"));
        BatchServiceClient::with_interceptor(channel, bearer)
    }

    pub fn client(&self, channel: Channel) -> Client {
        BatchServiceClient::with_interceptor(channel, self.bearer())
    }

    pub fn worker(&self, channel: Channel) -> Worker {
        BatchWorkerServiceClient::with_interceptor(channel, self.bearer())
    }

    /// Opens a WatchBatch stream from the start (a snapshot first).
    pub async fn watch(
        &self,
        channel: Channel,
        batch_id: String,
    ) -> anyhow::Result<tonic::Streaming<pb::WatchBatchResponse>> {
        Ok(self
            .client(channel)
            .watch_batch(pb::WatchBatchRequest {
                batch_id,
                after_version: None,
            })
            .await?
            .into_inner())
    }

    fn pid(&self) -> anyhow::Result<u32> {
        self.child
            .id()
            .ok_or_else(|| anyhow::anyhow!("batchd exited"))
    }

    /// The resident set size of the process, KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))
    }

    /// CPU time batchd has used so far (user + system), in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let pid = self.pid()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces, inside parentheses):
        // utime and stime are the 12th and 13th, in clock ticks.
        let after_name = stat
            .rsplit_once(')')
            .ok_or_else(|| anyhow::anyhow!("unreadable /proc/{pid}/stat"))?
            .1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        // SAFETY: sysconf has no preconditions.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Ok(ticks as f64 / per_second as f64)
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

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

pub type Client = BatchServiceClient<InterceptedService<Channel, Bearer>>;
pub type Worker = BatchWorkerServiceClient<InterceptedService<Channel, Bearer>>;

/// The id of seeded batch number `n` (1-based).
pub fn seeded_id(n: u64) -> String {
    format!("batch_{n:032x}")
}

/// The seeded batches: `1..=running` are `in_progress` at version 2, the rest up to
/// `batches` are `completed`.
pub struct Seeded {
    pub running: u64,
    pub batches: u64,
    /// The snapshot JSON of a running batch, for pgbench's equivalent of a write.
    pub running_snapshot: String,
}

impl Seeded {
    /// Seeds by cloning batches made through the API, so that rows and event snapshots
    /// are exactly what batchd writes.
    pub async fn create(
        plan: &Plan,
        server: &Batchd,
        database_url: &str,
    ) -> anyhow::Result<Seeded> {
        let channel = server.channel().await?;
        let (client, worker) = (server.client(channel.clone()), server.worker(channel));
        let template = |statuses: &'static [pb::BatchStatus]| {
            let (mut client, mut worker) = (client.clone(), worker.clone());
            async move {
                let batch = client
                    .create_batch(pb::CreateBatchRequest {
                        input_file_id: "file-bench".into(),
                        endpoint: "/v1/chat/completions".into(),
                        completion_window: "24h".into(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                let mut version = batch.version;
                for (i, status) in statuses.iter().enumerate() {
                    let counts = (i == 0).then_some(pb::RequestCounts {
                        total: 1_000_000_000,
                        completed: 0,
                        failed: 0,
                    });
                    version = worker
                        .update_batch(pb::UpdateBatchRequest {
                            batch_id: batch.id.clone(),
                            status: Some((*status).into()),
                            request_counts: counts,
                            ..Default::default()
                        })
                        .await?
                        .into_inner()
                        .version;
                }
                anyhow::Ok((batch.id, version))
            }
        };
        use pb::BatchStatus as S;
        let running_template = template(&[S::InProgress]).await?;
        let terminal_template = template(&[S::InProgress, S::Finalizing, S::Completed]).await?;
        let running = plan.batches * 9 / 10;
        let started = Instant::now();
        let postgres = database_url.starts_with("postgres");
        let clone = |template: &(String, i64), from: u64, to: u64| {
            let (id, version) = template.clone();
            let url = database_url.to_owned();
            async move {
                if postgres {
                    clone_postgres(&url, &id, version, from, to).await
                } else {
                    clone_sqlite(&url, &id, version, from, to).await
                }
            }
        };
        clone(&running_template, 1, running).await?;
        clone(&terminal_template, running + 1, plan.batches).await?;
        let running_snapshot = if postgres {
            let mut db = PgConnection::connect(database_url).await?;
            sqlx::query_scalar(
                "SELECT snapshot::text FROM batch_events WHERE batch_id = $1 AND version = $2",
            )
            .bind(&running_template.0)
            .bind(running_template.1)
            .fetch_one(&mut db)
            .await?
        } else {
            String::new()
        };
        eprintln!(
            "bench: seeded {} batches in {:.1?}",
            plan.batches,
            started.elapsed()
        );
        Ok(Seeded {
            running,
            batches: plan.batches,
            running_snapshot,
        })
    }
}

const COPY_COLUMNS: &str = "user_id, api_key_id, endpoint, input_file_id, completion_window, \
    status, output_file_id, error_file_id, errors, created_at, in_progress_at, expires_at, \
    finalizing_at, completed_at, failed_at, expired_at, cancelling_at, cancelled_at, \
    request_total, request_completed, request_failed, metadata, model, usage, job_id, remark, \
    version, updated_at, stalled_at, progress_rate_milli, progress_sampled_at, \
    progress_sampled_done, quiet_since";

async fn clone_postgres(
    url: &str,
    template: &str,
    version: i64,
    from: u64,
    to: u64,
) -> anyhow::Result<()> {
    let mut db = PgConnection::connect(url).await?;
    let id = "'batch_' || lpad(to_hex(g), 32, '0')";
    let rows = format!(
        "INSERT INTO batches (id, {COPY_COLUMNS}) SELECT {id}, {COPY_COLUMNS} \
         FROM batches, generate_series($2::bigint, $3::bigint) AS g WHERE id = $1"
    );
    let events = format!(
        "INSERT INTO batch_events (batch_id, version, snapshot, at) \
         SELECT {id}, version, jsonb_set(snapshot, '{{id}}', to_jsonb({id})), at \
         FROM batch_events, generate_series($2::bigint, $3::bigint) AS g \
         WHERE batch_id = $1 AND version = $4"
    );
    for sql in [rows, events] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(template)
            .bind(from as i64)
            .bind(to as i64)
            .bind(version)
            .execute(&mut db)
            .await?;
    }
    sqlx::query("ANALYZE").execute(&mut db).await?;
    Ok(())
}

async fn clone_sqlite(
    url: &str,
    template: &str,
    version: i64,
    from: u64,
    to: u64,
) -> anyhow::Result<()> {
    let mut db = SqliteConnection::connect(url).await?;
    let series = "WITH RECURSIVE g(n) AS (SELECT $2 UNION ALL SELECT n + 1 FROM g WHERE n < $3)";
    let id = "printf('batch_%032x', n)";
    let rows = format!(
        "{series} INSERT INTO batches (id, {COPY_COLUMNS}) SELECT {id}, {COPY_COLUMNS} \
         FROM batches, g WHERE id = $1"
    );
    let events = format!(
        "{series} INSERT INTO batch_events (batch_id, version, snapshot, at) \
         SELECT {id}, version, json_set(snapshot, '$.id', {id}), at \
         FROM batch_events, g WHERE batch_id = $1 AND version = $4"
    );
    for sql in [rows, events] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(template)
            .bind(from as i64)
            .bind(to as i64)
            .bind(version)
            .execute(&mut db)
            .await?;
    }
    Ok(())
}

/// Creates pgbench's own tables (scale 1: 100,000 accounts) for its select-only anchor.
pub async fn pgbench_initialize(database_url: &str) -> anyhow::Result<()> {
    let output = Command::new("pgbench")
        .args(["-i", "-q", "-s", "1"])
        .arg(database_url)
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Runs pgbench for the plan's warm-up plus window at `clients`; returns transactions
/// per second. `script` is a custom script, or `None` for the built-in select-only.
pub async fn pgbench(
    database_url: &str,
    script: Option<&str>,
    variables: &[(&str, String)],
    clients: usize,
    plan: &Plan,
) -> anyhow::Result<f64> {
    let seconds = (plan.warm_up + plan.window).as_secs().max(1).to_string();
    let mut command = Command::new("pgbench");
    command
        .args(["-n", "-M", "prepared", "-j", "2", "-T", &seconds, "-c"])
        .arg(clients.to_string());
    let file = std::env::temp_dir().join(format!("batchd-bench-{}.sql", std::process::id()));
    match script {
        Some(script) => {
            std::fs::write(&file, script)?;
            command.arg("-f").arg(&file);
        }
        None => {
            command.arg("-S");
        }
    }
    for (name, value) in variables {
        command.arg("-D").arg(format!("{name}={value}"));
    }
    let output = command.arg(database_url).output().await?;
    let _ = std::fs::remove_file(&file);
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "pgbench gave no tps: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
}

/// A small xorshift generator: the load needs spread, not quality.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// A number in `1..=n`.
    pub fn pick(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        1 + self.0 % n
    }
}

/// Nanoseconds since the Unix epoch: stamped into writes, read back at delivery.
pub fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The value of an unlabelled counter or gauge on the `/metrics` of the batchd at
/// `http_addr` (0 when absent).
pub async fn metric_at(http_addr: &str, name: &str) -> anyhow::Result<f64> {
    Ok(metrics_at(http_addr, &[name]).await?[0])
}

/// The values of several series (names, with their labels where they have some) from
/// one read of the `/metrics` of the batchd at `http_addr` (0 for each one absent).
pub async fn metrics_at<const N: usize>(
    http_addr: &str,
    series: &[&str; N],
) -> anyhow::Result<[f64; N]> {
    let text = reqwest::get(format!("http://{http_addr}/metrics"))
        .await?
        .text()
        .await?;
    Ok(series.map(|name| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0.0)
    }))
}
