//! Figure 5: worker progress updates on random running batches with watchers connected,
//! against pgbench running the same statement (row update + event insert, no NOTIFY),
//! and, for reference, the same with a NOTIFY in each transaction; the same updates
//! through REST (`PATCH /v1/batches/{id}`, driven by `wrk`); for each of the two, batchd's
//! CPU per update, the changes per commit round and the share of writes that started
//! from its memory of the batch; and a lone writer's latency against pgbench's single
//! client. Before them every running batch is written twice through batchd, so that
//! both transports start from a replica's steady state, where its memory holds the
//! batches its workers write.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use batchd::proto::batchd::v1 as pb;
use sqlx::{Connection, PgConnection};

use crate::lean_grpc::LeanGrpc;
use crate::reads::{Throughput, closed_loop};
use crate::setup::{Batchd, Seeded, now_nanos, pgbench, seeded_id};
use crate::{Plan, Report};

/// Request counts that only grow, across every phase of the run: microseconds since the
/// epoch, far below the total.
pub fn growing_counts() -> pb::RequestCounts {
    pb::RequestCounts {
        total: 4_000_000_000_000_000_000,
        completed: (now_nanos() / 1_000) as i64,
        failed: 0,
    }
}

/// Open watch streams on running batches, counting what they receive.
struct Watchers {
    stop: Arc<AtomicBool>,
    delivered: Arc<AtomicU64>,
}

impl Watchers {
    async fn open(server: &Batchd, count: usize, running: u64) -> anyhow::Result<Watchers> {
        let stop = Arc::new(AtomicBool::new(false));
        let delivered = Arc::new(AtomicU64::new(0));
        let mut channel = server.channel().await?;
        for w in 0..count {
            if w % 250 == 0 {
                channel = server.channel().await?;
            }
            let id = seeded_id(1 + (w as u64 * 7_919) % running);
            let mut stream = server.watch(channel.clone(), id).await?;
            let (stop, delivered) = (stop.clone(), delivered.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match stream.message().await {
                        Ok(Some(_)) => delivered.fetch_add(1, Ordering::Relaxed),
                        _ => return,
                    };
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

/// The statement of one UpdateBatch as a pgbench script: the same shape as batchd's
/// (every mutable column set, the event appended in the same statement), the snapshot
/// bound as a parameter as batchd binds it.
fn update_script(notify_in_transaction: bool) -> String {
    let change = "WITH changed AS (UPDATE batches SET status = 'in_progress', \
         output_file_id = NULL, error_file_id = NULL, errors = NULL, in_progress_at = 1, \
         finalizing_at = NULL, completed_at = NULL, failed_at = NULL, expired_at = NULL, \
         cancelling_at = NULL, cancelled_at = NULL, request_total = 4000000000000000000, \
         request_completed = request_completed + 1, request_failed = 0, model = NULL, \
         usage = NULL, version = version + 1, updated_at = 1 \
         WHERE id = 'batch_' || lpad(to_hex(:n::bigint), 32, '0') RETURNING id, version, user_id) \
         INSERT INTO batch_events (batch_id, version, snapshot, at, owner) \
         SELECT id, version, :snapshot::jsonb, 1, user_id FROM changed;";
    if notify_in_transaction {
        format!(
            "\\set n random(1, :nbatches)\nBEGIN;\n{change}\n\
             SELECT pg_notify('batchd_bench', 'batch_' || :n::text);\nCOMMIT;\n"
        )
    } else {
        format!("\\set n random(1, :nbatches)\n{change}\n")
    }
}

/// A worker's progress report on seeded batch `n`.
fn progress_of(n: u64) -> pb::UpdateBatchRequest {
    pb::UpdateBatchRequest {
        batch_id: seeded_id(n),
        request_counts: Some(growing_counts()),
        ..Default::default()
    }
}

/// The worker service's UpdateBatch, as an HTTP/2 path.
const UPDATE_BATCH: &str = "/batchd.v1.BatchWorkerService/UpdateBatch";

/// UpdateBatch (on the lean client) in a closed loop from `clients` tasks, each on its own share of the
/// running batches `1..=running` (no two updates of one batch race).
pub async fn updates_on_own_shares(
    plan: &Plan,
    server: &Batchd,
    running: u64,
    clients: usize,
) -> anyhow::Result<Throughput> {
    let mut connections = Vec::new();
    for _ in 0..4 {
        connections.push(LeanGrpc::connect(server).await?);
    }
    closed_loop(plan, clients, move |task, rng| {
        let connection = connections[task % connections.len()].clone();
        let mine = (running / clients as u64).max(1);
        let n = ((rng.pick(mine) - 1) * clients as u64 + task as u64) % running + 1;
        async move {
            connection.unary(UPDATE_BATCH, &progress_of(n)).await?;
            Ok(())
        }
    })
    .await
}

/// Writes every running batch twice through batchd, from `clients` tasks, each on its
/// own share. The write figures measure a replica's steady state, in which the batches
/// its workers report on were written through it before and are in its memory: the
/// latest cache admits a batch for good on its second write (its first only reaches the
/// cache's small probation ring). The seeded batches were cloned in the database and
/// never written through batchd, so without this pass a phase's share of writes that
/// must read first would depend on which batches the phases before it happened to
/// draw: the gRPC phase replays the feed group's draws, `wrk` draws its own.
async fn write_every_running_batch_twice(
    server: &Batchd,
    running: u64,
    clients: usize,
) -> anyhow::Result<()> {
    let connection = LeanGrpc::connect(server).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..clients as u64 {
        let connection = connection.clone();
        tasks.spawn(async move {
            for _pass in 0..2 {
                for n in (1 + task..=running).step_by(clients) {
                    connection.unary(UPDATE_BATCH, &progress_of(n)).await?;
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// Makes PostgreSQL write its dirty pages now (`CHECKPOINT`), before each c16 phase:
/// every phase then starts from a fresh checkpoint, so the full-page images that the
/// first write of each page costs after one fall alike on batchd's phases and on
/// pgbench's, and no checkpoint forced by the WAL of the phases before lands inside
/// one of them by chance.
async fn checkpoint(database_url: &str) -> anyhow::Result<()> {
    let mut db = PgConnection::connect(database_url).await?;
    sqlx::query("CHECKPOINT").execute(&mut db).await?;
    Ok(())
}

/// batchd's write counters so far: commit rounds, the changes they carried, and what
/// the replica's memory of the batch (its latest cache) did for each write.
#[derive(Clone, Copy)]
struct WriteCounters {
    rounds: f64,
    changes: f64,
    memory_hits: f64,
    writes: f64,
}

impl WriteCounters {
    async fn read(server: &Batchd) -> anyhow::Result<WriteCounters> {
        let [rounds, changes, hits, retried, misses] = crate::setup::metrics_at(
            &server.http_addr,
            &[
                "batchd_commit_rounds_total",
                "batchd_commit_round_changes_total",
                "batchd_write_memory_total{outcome=\"hit\"}",
                "batchd_write_memory_total{outcome=\"retried\"}",
                "batchd_write_memory_total{outcome=\"miss\"}",
            ],
        )
        .await?;
        Ok(WriteCounters {
            rounds,
            changes,
            memory_hits: hits,
            writes: hits + retried + misses,
        })
    }

    /// Changes per commit round since `before`: a round's cost is shared by them.
    fn changes_per_round(&self, before: &WriteCounters) -> f64 {
        (self.changes - before.changes) / (self.rounds - before.rounds).max(1.0)
    }

    /// The share of writes since `before` that started from memory and committed: the
    /// rest read the batch from the database first.
    fn memory_hit_share(&self, before: &WriteCounters) -> f64 {
        (self.memory_hits - before.memory_hits) / (self.writes - before.writes).max(1.0)
    }
}

/// Figure 5. Runs last on PostgreSQL: pgbench writes rows that batchd's watchers would
/// not expect, so nothing of batchd's reads the database after it.
pub async fn run(
    plan: &Plan,
    server: &Batchd,
    seeded: &Seeded,
    database_url: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let clients = plan.write_concurrency;
    write_every_running_batch_twice(server, seeded.running, clients).await?;
    let watchers = Watchers::open(server, plan.write_watchers, seeded.running).await?;
    // Each task writes only the batches n with n % clients == task, so that no two
    // updates of one batch race and none is refused.
    let cpu_before = server.cpu_seconds()?;
    checkpoint(database_url).await?;
    let counters_before = WriteCounters::read(server).await?;
    let updates = updates_on_own_shares(plan, server, seeded.running, clients).await?;
    let cpu_per_update =
        (server.cpu_seconds()? - cpu_before) * 1e6 / updates.completed.max(1) as f64;
    let counters = WriteCounters::read(server).await?;
    // The same load through REST, with the same watchers open.
    checkpoint(database_url).await?;
    let rest = rest_updates(plan, server, seeded.running, clients).await?;
    let delivered = watchers.stop();
    // A lone writer: nothing to group, so this is the write path's own latency; and a
    // lone reader of terminal batches (answered from memory, no database): the floor
    // that gRPC, tokio and the load generator put under any call.
    let lone = updates_on_own_shares(plan, server, seeded.running, 1).await?;
    let terminal = seeded.batches - seeded.running;
    let floor = crate::reads::grpc_gets(server, plan, 1, seeded.running + 1, terminal).await?;

    let variables = [
        ("nbatches", seeded.running.to_string()),
        ("snapshot", seeded.running_snapshot.clone()),
    ];
    checkpoint(database_url).await?;
    let anchor = pgbench(
        database_url,
        Some(&update_script(false)),
        &variables,
        clients,
        plan,
    )
    .await?;
    let anchor_name = format!("update_pgbench_c{clients}");
    report.add(&anchor_name, anchor, "tx/s", None);
    let notifying = pgbench(
        database_url,
        Some(&update_script(true)),
        &variables,
        clients,
        plan,
    )
    .await?;
    report.add(
        &format!("update_pgbench_notify_in_each_tx_c{clients}"),
        notifying,
        "tx/s",
        Some((&anchor_name, anchor)),
    );
    let name = format!("update_grpc_c{clients}_{}_watchers", plan.write_watchers);
    report.add(
        &name,
        updates.per_second,
        "tx/s",
        Some((&anchor_name, anchor)),
    );
    report.latencies(&name, &updates.latencies);
    report.add(
        &format!("{name}_batchd_cpu"),
        cpu_per_update,
        "us/req",
        None,
    );
    report.add(
        &format!("{name}_changes_per_round"),
        counters.changes_per_round(&counters_before),
        "changes",
        None,
    );
    report.add(
        &format!("{name}_memory_hits"),
        counters.memory_hit_share(&counters_before),
        "share",
        None,
    );
    let rest_name = format!("update_rest_c{clients}_{}_watchers", plan.write_watchers);
    report.add(
        &rest_name,
        rest.per_second,
        "req/s",
        Some((&name, updates.per_second)),
    );
    report.add(
        &format!("{rest_name}_batchd_cpu"),
        rest.cpu_per_request_us,
        "us/req",
        None,
    );
    report.add(
        &format!("{rest_name}_changes_per_round"),
        rest.changes_per_round,
        "changes",
        None,
    );
    report.add(
        &format!("{rest_name}_memory_hits"),
        rest.memory_hit_share,
        "share",
        None,
    );
    report.add(
        &format!("{rest_name}_refused"),
        rest.refused as f64,
        "req",
        None,
    );

    let lone_anchor = pgbench(
        database_url,
        Some(&update_script(false)),
        &variables,
        1,
        plan,
    )
    .await?;
    // A closed loop of one: the mean latency is the inverse of the rate.
    let lone_anchor_ms = 1_000.0 / lone_anchor.max(f64::MIN_POSITIVE);
    report.add("update_pgbench_c1_latency", lone_anchor_ms, "ms", None);
    report.add(
        "update_grpc_c1_latency",
        1_000.0 / lone.per_second.max(f64::MIN_POSITIVE),
        "ms",
        Some(("update_pgbench_c1_latency", lone_anchor_ms)),
    );
    report.latencies("update_grpc_c1", &lone.latencies);
    report.add(
        "get_grpc_c1_terminal_latency",
        1_000.0 / floor.per_second.max(f64::MIN_POSITIVE),
        "ms",
        None,
    );
    report.add(
        "update_watch_events_delivered",
        delivered as f64,
        "events",
        None,
    );
    Ok(())
}

/// What `wrk` measured.
struct WrkRun {
    per_second: f64,
    /// Answers other than 2xx (an update refused because two of them for one batch
    /// crossed, which the script makes rare).
    refused: u64,
    /// batchd's CPU time per request of the timed run (the warm-up left out).
    cpu_per_request_us: f64,
    /// Changes per commit round in the timed run.
    changes_per_round: f64,
    /// The share of the timed run's writes that started from memory and committed.
    memory_hit_share: f64,
}

/// `PATCH /v1/batches/{id}` from `wrk` (2 threads, `clients` connections), each thread on
/// its own half of the running batches, with counts that grow across the whole run.
async fn rest_updates(
    plan: &Plan,
    server: &Batchd,
    running: u64,
    clients: usize,
) -> anyhow::Result<WrkRun> {
    const SCRIPT: &str = r#"
-- Each thread updates its own half of the running batches (ids batch_%032x, 1..running)
-- with counts above every count batchd wrote before this run.
local threads = 0
function setup(thread)
  thread:set("index", threads)
  threads = threads + 1
end
function init(args)
  running = tonumber(args[1])
  key = args[2]
  counter = (os.time() + 1) * 1000000
  headers = { ["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json" }
end
function request()
  counter = counter + 1
  local n = math.random(0, math.floor(running / 2) - 1) * 2 + index + 1
  local body = '{"request_counts":{"total":4000000000000000000,"completed":'
    .. string.format("%d", counter) .. ',"failed":0}}'
  return wrk.format("PATCH", string.format("/v1/batches/batch_%032x", n), headers, body)
end
"#;
    let file = std::env::temp_dir().join(format!("batchd-bench-{}.lua", std::process::id()));
    std::fs::write(&file, SCRIPT)?;
    let url = format!("http://{}", server.http_addr);
    let run = |seconds: u64| {
        tokio::process::Command::new("wrk")
            .args(["-t", "2", "-c", &clients.to_string(), "-d"])
            .arg(format!("{seconds}s"))
            .arg("-s")
            .arg(&file)
            .arg(&url)
            .arg("--")
            .arg(running.to_string())
            .arg(&server.key)
            .output()
    };
    // wrk has no warm-up of its own: a short run first.
    run(plan.warm_up.as_secs().max(1)).await?;
    let cpu_before = server.cpu_seconds()?;
    let counters_before = WriteCounters::read(server).await?;
    let output = run(plan.window.as_secs().max(1)).await?;
    let cpu = server.cpu_seconds()? - cpu_before;
    let counters = WriteCounters::read(server).await?;
    let _ = std::fs::remove_file(&file);
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "wrk failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let number_after = |prefix: &str| {
        stdout
            .lines()
            .find_map(|line| line.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse::<f64>().ok())
    };
    let per_second = number_after("Requests/sec:")
        .ok_or_else(|| anyhow::anyhow!("wrk gave no rate: {stdout}"))?;
    let refused = number_after("Non-2xx or 3xx responses:").unwrap_or(0.0) as u64;
    let errors = number_after("Socket errors:");
    anyhow::ensure!(errors.is_none(), "wrk saw socket errors: {stdout}");
    // "  N requests in 6.00s, ..." is the timed run's count.
    let requests = stdout
        .lines()
        .find_map(|line| line.trim().split_once(" requests in "))
        .and_then(|(count, _)| count.parse::<f64>().ok())
        .ok_or_else(|| anyhow::anyhow!("wrk gave no request count: {stdout}"))?;
    Ok(WrkRun {
        per_second,
        refused,
        cpu_per_request_us: cpu * 1e6 / requests.max(1.0),
        changes_per_round: counters.changes_per_round(&counters_before),
        memory_hit_share: counters.memory_hit_share(&counters_before),
    })
}
