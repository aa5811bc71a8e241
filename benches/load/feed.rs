//! Figure 8: the change feed (WatchBatches) on PostgreSQL.
//!
//! - One collection watcher following every running batch while 16 workers update them
//!   at a steady rate, against per-batch WatchBatch streams on the same batches under
//!   the same writes: latency from sending a write to its delivery (the write carries
//!   its send time; this bounds commit-to-delivery from above). Target: the feed's p99
//!   within 1.5x the per-batch watch's.
//! - Many collection watchers of as many tenants: batchd's resident memory per stream
//!   (target <= 16 KiB) and UpdateBatch throughput with them open against without
//!   (target >= 0.9), measured without, with, without, against the mean of the two.
//! - The feed's delay behind commits while another transaction on the same server stays
//!   open: the delivery latency over the hold, and the delay gauge; reported only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use batchd::domain::{ApiKey, ApiKeySecret, Scope};
use batchd::proto::batchd::v1 as pb;
use sqlx::Connection;

use crate::fanout::Deliveries;
use crate::setup::{Batchd, Seeded, now_nanos, seeded_id};
use crate::writes::{growing_counts, updates_on_own_shares};
use crate::{Latencies, Plan, Report};

/// Writer tasks of the latency figures, as in the issue: 16 workers.
const WRITERS: usize = 16;

/// The send time a delivered batch carries, from its `model`.
fn sent_time(batch: &pb::Batch) -> Option<u128> {
    batch.model.as_deref()?.strip_prefix('t')?.parse().ok()
}

/// Notes a stream's message: the one that says it is live (`live`) counts it ready; a
/// delivered change records its write-to-delivery latency.
fn note(deliveries: &Deliveries, live: bool, change: Option<pb::Batch>) {
    if live {
        deliveries.ready.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(sent) = change.as_ref().and_then(sent_time) {
        deliveries.record(sent);
    }
}

/// `WRITERS` tasks each writing `rate / WRITERS` changes per second to its own share of
/// `1..=batches` (no two writers touch one batch), each write carrying its send time,
/// until `stop`.
fn steady_writers(
    server: &Batchd,
    channel: tonic::transport::Channel,
    batches: u64,
    rate: u32,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let per_writer = Duration::from_secs_f64(WRITERS as f64 / f64::from(rate.max(1)));
    (0..WRITERS)
        .map(|task| {
            let mut worker = server.worker(channel.clone());
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(per_writer);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mine: Vec<u64> = (1..=batches)
                    .filter(|n| *n as usize % WRITERS == task)
                    .collect();
                let mut next = 0;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let sent = now_nanos();
                    worker
                        .update_batch(pb::UpdateBatchRequest {
                            batch_id: seeded_id(mine[next % mine.len()]),
                            request_counts: Some(growing_counts()),
                            model: Some(format!("t{sent}")),
                            ..Default::default()
                        })
                        .await?;
                    next += 1;
                }
                Ok(())
            })
        })
        .collect()
}

/// Runs the steady writers over the plan's window and returns what `deliveries`
/// recorded meanwhile.
async fn under_steady_writes(
    plan: &Plan,
    server: &Batchd,
    batches: u64,
    rate: u32,
    deliveries: &Deliveries,
    during: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<Latencies> {
    let stop = Arc::new(AtomicBool::new(false));
    let writers = steady_writers(server, server.channel().await?, batches, rate, stop.clone());
    let (latencies, during) = tokio::join!(deliveries.measure(plan.warm_up, plan.window), during);
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await??;
    }
    during?;
    Ok(latencies)
}

/// Opens a collection stream of `key` following everything it may see, recording the
/// send time of every CHANGE into `deliveries` and counting SYNCED as ready.
async fn follow_all(
    server: &Batchd,
    channel: tonic::transport::Channel,
    key: &str,
    deliveries: Deliveries,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut stream = server
        .client_as(channel, key)
        .watch_batches(pb::WatchBatchesRequest::default())
        .await?
        .into_inner();
    Ok(tokio::spawn(async move {
        while let Ok(Some(message)) = stream.message().await {
            let kind = message.r#type();
            let change = message.batch.filter(|_| kind == pb::FeedEventType::Change);
            note(&deliveries, kind == pb::FeedEventType::Synced, change);
        }
    }))
}

/// One collection stream of the admin key, following everything, once it is live.
async fn following_everything(
    server: &Batchd,
) -> anyhow::Result<(Deliveries, tokio::task::JoinHandle<()>)> {
    let deliveries = Deliveries::default();
    let channel = server.channel().await?;
    let task = follow_all(server, channel, &server.key, deliveries.clone()).await?;
    deliveries.wait_ready(1).await?;
    Ok((deliveries, task))
}

/// Figure 8.
pub async fn run(
    plan: &Plan,
    server: &Batchd,
    seeded: &Seeded,
    database_url: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let batches = (plan.feed_batches as u64).min(seeded.running);
    latency_against_per_batch_watches(plan, server, batches, report).await?;
    many_tenants(plan, server, seeded, database_url, report).await?;
    delay_behind_a_long_transaction(plan, server, batches, database_url, report).await
}

async fn latency_against_per_batch_watches(
    plan: &Plan,
    server: &Batchd,
    batches: u64,
    report: &mut Report,
) -> anyhow::Result<()> {
    let rate = plan.feed_rate;
    // Per-batch: one WatchBatch stream on every batch written.
    let deliveries = Deliveries::default();
    let mut tasks = Vec::new();
    let mut channel = server.channel().await?;
    for n in 1..=batches {
        if n % 250 == 0 {
            channel = server.channel().await?;
        }
        let mut stream = server.watch(channel.clone(), seeded_id(n)).await?;
        let deliveries = deliveries.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(message)) = stream.message().await {
                let kind = message.r#type();
                let change = message.batch.filter(|_| kind == pb::EventType::Change);
                note(&deliveries, kind == pb::EventType::Snapshot, change);
            }
        }));
    }
    deliveries.wait_ready(batches as usize).await?;
    let per_batch =
        under_steady_writes(plan, server, batches, rate, &deliveries, async { Ok(()) }).await?;
    for task in tasks {
        task.abort();
    }
    anyhow::ensure!(!per_batch.is_empty(), "no per-batch delivery was measured");
    let per_batch_name = format!("feed_per_batch_watch_{batches}_batches_{rate}_writes_per_s");
    report.latencies(&per_batch_name, &per_batch);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The change feed: one stream following all of them.
    let (deliveries, task) = following_everything(server).await?;
    let feed =
        under_steady_writes(plan, server, batches, rate, &deliveries, async { Ok(()) }).await?;
    task.abort();
    anyhow::ensure!(!feed.is_empty(), "no change feed delivery was measured");
    let name = format!("feed_collection_watch_{batches}_batches_{rate}_writes_per_s");
    report.add(
        &format!("{name}_p50"),
        feed.quantile(0.50),
        "ms",
        Some((&format!("{per_batch_name}_p50"), per_batch.quantile(0.50))),
    );
    report.add(
        &format!("{name}_p99"),
        feed.quantile(0.99),
        "ms",
        Some((&format!("{per_batch_name}_p99"), per_batch.quantile(0.99))),
    );
    report.add(
        &format!("{name}_deliveries"),
        feed.len() as f64,
        "events",
        None,
    );
    Ok(())
}

async fn many_tenants(
    plan: &Plan,
    server: &Batchd,
    seeded: &Seeded,
    database_url: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let tenants = plan.feed_tenants;
    let store = batchd::store::connect(database_url, &Default::default()).await?;
    let mut keys = Vec::with_capacity(tenants);
    for t in 0..tenants {
        let key = ApiKey::new(&format!("tenant-{t}"), Scope::Batches, 0)?;
        let secret = ApiKeySecret::generate();
        store.insert_api_key(&key, &secret.digest()).await?;
        keys.push(secret.expose().to_owned());
    }
    store.close().await;

    let without_before =
        updates_on_own_shares(plan, server, seeded.running, plan.write_concurrency)
            .await?
            .per_second;

    let before = server.rss_kib()?;
    let deliveries = Deliveries::default();
    let mut tasks = Vec::new();
    let mut channel = server.channel().await?;
    for (t, key) in keys.iter().enumerate() {
        if t % 250 == 0 {
            channel = server.channel().await?;
        }
        tasks.push(follow_all(server, channel.clone(), key, deliveries.clone()).await?);
    }
    deliveries.wait_ready(tenants).await?;
    let after = server.rss_kib()?;
    let with = updates_on_own_shares(plan, server, seeded.running, plan.write_concurrency)
        .await?
        .per_second;
    for task in tasks {
        task.abort();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let without_after = updates_on_own_shares(plan, server, seeded.running, plan.write_concurrency)
        .await?
        .per_second;

    let without = (without_before + without_after) / 2.0;
    let clients = plan.write_concurrency;
    let anchor = format!("feed_update_grpc_c{clients}_without_collection_watchers");
    report.add(&anchor, without, "tx/s", None);
    report.add(
        &format!("feed_update_grpc_c{clients}_with_{tenants}_collection_watchers"),
        with,
        "tx/s",
        Some((&anchor, without)),
    );
    let per_stream = after.saturating_sub(before) as f64 / tenants as f64;
    report.add(
        &format!("feed_{tenants}_collection_watchers_rss_per_stream"),
        per_stream,
        "KiB",
        None,
    );
    Ok(())
}

async fn delay_behind_a_long_transaction(
    plan: &Plan,
    server: &Batchd,
    batches: u64,
    database_url: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let (deliveries, task) = following_everything(server).await?;
    let hold = plan.window / 2;
    let highest_gauge = Arc::new(Mutex::new(0.0_f64));
    let long_transaction = {
        let (url, highest_gauge, http) = (
            database_url.to_owned(),
            highest_gauge.clone(),
            server.http_addr.clone(),
        );
        let warm_up = plan.warm_up;
        async move {
            tokio::time::sleep(warm_up).await;
            // Any transaction with an id holds the feed's horizon, in any database of
            // the server; this one writes nothing.
            let mut connection = sqlx::PgConnection::connect(&url).await?;
            sqlx::query("BEGIN").execute(&mut connection).await?;
            sqlx::query("SELECT pg_current_xact_id()")
                .execute(&mut connection)
                .await?;
            let until = Instant::now() + hold;
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let gauge =
                    crate::setup::metric_at(&http, "batchd_change_feed_delay_seconds").await?;
                let mut highest = highest_gauge.lock().unwrap();
                *highest = highest.max(gauge);
            }
            sqlx::query("COMMIT").execute(&mut connection).await?;
            anyhow::Ok(())
        }
    };
    let rate = plan.feed_rate;
    let latencies =
        under_steady_writes(plan, server, batches, rate, &deliveries, long_transaction).await?;
    task.abort();
    anyhow::ensure!(
        !latencies.is_empty(),
        "no delivery during the long transaction"
    );
    let name = format!("feed_delay_with_a_{}ms_transaction", hold.as_millis());
    report.latencies(&name, &latencies);
    let highest = *highest_gauge.lock().unwrap();
    report.add(&format!("{name}_delay_gauge_max"), highest, "s", None);
    Ok(())
}
