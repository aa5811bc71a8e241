//! Figure 5: worker progress updates on random running batches with watchers connected,
//! against pgbench running the same statement (row update + event insert, no NOTIFY),
//! and, for reference, the same with a NOTIFY in each transaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use batchd::proto::batchd::v1 as pb;

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

/// UpdateBatch in a closed loop at the plan's write concurrency, each task on its own
/// share of the running batches `1..=running` (no two updates of one batch race).
pub async fn updates_on_own_shares(
    plan: &Plan,
    server: &Batchd,
    running: u64,
) -> anyhow::Result<Throughput> {
    let mut workers = Vec::new();
    for _ in 0..4 {
        workers.push(server.worker(server.channel().await?));
    }
    let clients = plan.write_concurrency;
    closed_loop(plan, clients, move |task, rng| {
        let mut worker = workers[task % workers.len()].clone();
        let mine = (running / clients as u64).max(1);
        let n = ((rng.pick(mine) - 1) * clients as u64 + task as u64) % running + 1;
        async move {
            worker
                .update_batch(pb::UpdateBatchRequest {
                    batch_id: seeded_id(n),
                    request_counts: Some(growing_counts()),
                    ..Default::default()
                })
                .await?;
            Ok(())
        }
    })
    .await
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
    let watchers = Watchers::open(server, plan.write_watchers, seeded.running).await?;
    // Each task writes only the batches n with n % clients == task, so that no two
    // updates of one batch race and none is refused.
    let cpu_before = server.cpu_seconds()?;
    let updates = updates_on_own_shares(plan, server, seeded.running).await?;
    let cpu_per_update =
        (server.cpu_seconds()? - cpu_before) * 1e6 / updates.completed.max(1) as f64;
    let delivered = watchers.stop();

    let variables = [
        ("nbatches", seeded.running.to_string()),
        ("snapshot", seeded.running_snapshot.clone()),
    ];
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
        "update_watch_events_delivered",
        delivered as f64,
        "events",
        None,
    );
    Ok(())
}
