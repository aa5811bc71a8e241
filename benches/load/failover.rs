//! Figure 10: PostgreSQL's own failover and switchover under writes. Each run makes a
//! primary and a synchronous streaming standby of its own (never the shared server),
//! puts a TCP proxy in front (the service name that moves), starts batchd on its
//! defaults with 4 writers reporting progress as fast as they are answered, and then:
//!
//! - failover: stops the primary at once (`-m immediate`), waits until batchd's
//!   readiness reports the outage (as a failover manager waits out its timeout),
//!   promotes the standby and moves the proxy to it;
//! - switchover: stops the primary cleanly (`-m fast`) and promotes the standby at once.
//!
//! Measured: from the promotion to the first acknowledged write (worst and median of
//! the runs), and how many writes batchd refused in a switchover. The failover test
//! (tests/api/failover.rs) checks what must hold; this measures how long it takes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use batchd::proto::batchd::v1 as pb;

use crate::setup::Batchd;
use crate::{Latencies, Plan, Report};

#[allow(dead_code)]
#[path = "../../tests/api/own_postgres.rs"]
mod own_postgres;
#[allow(dead_code)]
#[path = "../../tests/api/proxy.rs"]
mod proxy;

use own_postgres::OwnPostgres;
use proxy::TcpProxy;

/// Writers during each run.
const WRITERS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handover {
    Failover,
    Switchover,
}

/// What one run measured.
struct Run {
    /// From the promotion to the first acknowledged write.
    recovery: Duration,
    /// Writes refused (each then sent again).
    refused: usize,
}

pub async fn run(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let runs = if plan.quick { 2 } else { 10 };
    for (handover, name) in [
        (Handover::Failover, "failover"),
        (Handover::Switchover, "switchover"),
    ] {
        let mut recoveries = Vec::new();
        let mut refused = Vec::new();
        for _ in 0..runs {
            let run = hand_over(handover).await?;
            eprintln!(
                "bench: {name}: first write {:.0?} after the promotion, {} refused",
                run.recovery, run.refused
            );
            recoveries.push(run.recovery.as_secs_f64() * 1000.0);
            refused.push(run.refused as f64);
        }
        let recoveries = Latencies::new(recoveries);
        let worst = recoveries.quantile(1.0);
        report.add(&format!("{name}_recovery_worst"), worst, "ms", None);
        report.add(
            &format!("{name}_recovery_median"),
            recoveries.quantile(0.5),
            "ms",
            None,
        );
        let refused = Latencies::new(refused);
        report.add(
            &format!("{name}_refused_writes_worst"),
            refused.quantile(1.0),
            "writes",
            None,
        );
        report.add(
            &format!("{name}_runs"),
            recoveries.len() as f64,
            "runs",
            None,
        );
    }
    Ok(())
}

async fn hand_over(handover: Handover) -> anyhow::Result<Run> {
    let cluster = OwnPostgres::start().await;
    let proxy = TcpProxy::start(OwnPostgres::addr(cluster.primary)).await;
    let server = Batchd::start(&proxy.postgres_url(&cluster.url(cluster.primary)), &[]).await?;
    let channel = server.channel().await?;
    let (mut client, mut worker) = (server.client(channel.clone()), server.worker(channel));
    let mut ids = Vec::new();
    for _ in 0..WRITERS {
        let batch = client
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
                batch_id: batch.id.clone(),
                status: Some(pb::BatchStatus::InProgress.into()),
                ..Default::default()
            })
            .await?;
        ids.push(batch.id);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let promoted: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let resumed = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for id in ids {
        let worker = server.worker(server.channel().await?);
        writers.push(tokio::spawn(write_until(
            worker,
            id,
            stop.clone(),
            promoted.clone(),
            resumed.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let primary = cluster.path("primary");
    if handover == Handover::Failover {
        cluster.run("pg_ctl", &["-D", &primary, "-m", "immediate", "stop"]);
        wait_for_readiness(&server.http_addr, 503).await?;
    } else {
        cluster.run("pg_ctl", &["-D", &primary, "-m", "fast", "stop"]);
    }
    cluster.run("pg_ctl", &["-D", &cluster.path("standby"), "-w", "promote"]);
    proxy.retarget(OwnPostgres::addr(cluster.standby));
    let promoted_at = Instant::now();
    promoted.set(promoted_at).expect("promoted once");
    let deadline = Instant::now() + Duration::from_secs(60);
    while resumed.load(Ordering::Relaxed) < WRITERS {
        anyhow::ensure!(
            Instant::now() < deadline,
            "writes did not resume within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut first = None::<Instant>;
    let mut refused = 0;
    for writer in writers {
        let (first_after, refused_here) = writer.await?;
        first = match (first, first_after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        refused += refused_here;
    }
    server.stop().await;
    let first = first.ok_or_else(|| anyhow::anyhow!("no write after the promotion"))?;
    Ok(Run {
        recovery: first.duration_since(promoted_at),
        refused,
    })
}

/// Reports progress on `batch_id` until `stop`, a refused report sent again after
/// 20 ms. Returns the first acknowledgement after the promotion and how many reports
/// were refused.
async fn write_until(
    mut worker: crate::setup::Worker,
    batch_id: String,
    stop: Arc<AtomicBool>,
    promoted: Arc<std::sync::OnceLock<Instant>>,
    resumed: Arc<AtomicUsize>,
) -> (Option<Instant>, usize) {
    let (mut first_after, mut refused, mut completed) = (None, 0, 0);
    while !stop.load(Ordering::Relaxed) {
        completed += 1;
        loop {
            let report = pb::UpdateBatchRequest {
                batch_id: batch_id.clone(),
                request_counts: Some(pb::RequestCounts {
                    total: 1_000_000,
                    completed,
                    failed: 0,
                }),
                ..Default::default()
            };
            let answered =
                tokio::time::timeout(Duration::from_secs(10), worker.update_batch(report)).await;
            if matches!(answered, Ok(Ok(_))) {
                let at = Instant::now();
                if first_after.is_none() && promoted.get().is_some_and(|p| at > *p) {
                    first_after = Some(at);
                    resumed.fetch_add(1, Ordering::Relaxed);
                }
                break;
            }
            refused += 1;
            if stop.load(Ordering::Relaxed) {
                return (first_after, refused);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (first_after, refused)
}

/// Waits until GET /readyz answers `status` (at most 30 s).
async fn wait_for_readiness(http_addr: &str, status: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answered = reqwest::get(format!("http://{http_addr}/readyz"))
            .await
            .map(|response| response.status().as_u16());
        if answered.as_ref().is_ok_and(|answered| *answered == status) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "readiness did not answer {status} within 30 s: {answered:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
