//! Figure 6: watch fan-out. Many open WatchBatch streams (spread over many batches, or
//! all on one), writes at a steady rate, and the latency from sending a write to its
//! delivery at every subscriber (the write carries its send time; this bounds
//! commit-to-delivery from above). Also batchd's resident memory per open stream, and
//! the same with the writes going through a second batchd process.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use batchd::proto::batchd::v1 as pb;

use crate::setup::{Batchd, Seeded, now_nanos, seeded_id};
use crate::writes::growing_counts;
use crate::{Latencies, Plan, Report};

/// Deliveries recorded while `measuring` is on, in milliseconds.
#[derive(Clone, Default)]
pub struct Deliveries {
    pub measuring: Arc<AtomicBool>,
    pub samples: Arc<Mutex<Vec<f64>>>,
    pub ready: Arc<AtomicUsize>,
}

impl Deliveries {
    /// Records a delivery of a write sent at `sent_nanos`.
    pub fn record(&self, sent_nanos: u128) {
        if self.measuring.load(Ordering::Relaxed) {
            let latency = now_nanos().saturating_sub(sent_nanos) as f64 / 1e6;
            self.samples.lock().unwrap().push(latency);
        }
    }

    /// Waits until `count` subscribers said they are ready.
    pub async fn wait_ready(&self, count: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.ready.load(Ordering::Relaxed) < count {
            anyhow::ensure!(Instant::now() < deadline, "subscribers did not all start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Turns recording on after `warm_up`, off after `window`, plus a moment for the
    /// last deliveries; returns what was recorded.
    pub async fn measure(&self, warm_up: Duration, window: Duration) -> Latencies {
        self.measure_with_cpu(warm_up, window, || Ok(0.0))
            .await
            .map(|(latencies, _)| latencies)
            .expect("reading no CPU cannot fail")
    }

    /// The same, and the CPU seconds `cpu` counted while recording was on.
    pub async fn measure_with_cpu(
        &self,
        warm_up: Duration,
        window: Duration,
        cpu: impl Fn() -> anyhow::Result<f64>,
    ) -> anyhow::Result<(Latencies, f64)> {
        tokio::time::sleep(warm_up).await;
        let cpu_before = cpu()?;
        self.measuring.store(true, Ordering::Relaxed);
        tokio::time::sleep(window).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.measuring.store(false, Ordering::Relaxed);
        let used = cpu()? - cpu_before;
        let latencies = Latencies::new(std::mem::take(&mut *self.samples.lock().unwrap()));
        Ok((latencies, used))
    }
}

/// Writes `rate` changes per second, round-robin over `targets`, until `stop`; each
/// carries its send time in nanoseconds, produced by `stamp`.
pub fn steady_writes<F, Fut>(
    rate: u32,
    targets: usize,
    stop: Arc<AtomicBool>,
    mut write: F,
) -> tokio::task::JoinHandle<anyhow::Result<()>>
where
    F: FnMut(usize, u128) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next = 0;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            write(next % targets, now_nanos()).await?;
            next += 1;
        }
        Ok(())
    })
}

/// What one fan-out measurement watches and writes.
struct Shape<'a> {
    name: String,
    /// Batch numbers the streams spread over, round-robin.
    batches: &'a [u64],
    streams: usize,
    /// Writes per second.
    rate: u32,
}

/// One fan-out measurement: the shape's streams on `watched`, writes through `writer`.
async fn measure(
    plan: &Plan,
    report: &mut Report,
    shape: Shape<'_>,
    watched: &Batchd,
    writer: &Batchd,
) -> anyhow::Result<()> {
    let Shape {
        name,
        batches,
        streams,
        rate,
    } = shape;
    let before = watched.rss_kib()?;
    let deliveries = Deliveries::default();
    let mut channel = watched.channel().await?;
    let mut tasks = Vec::new();
    for s in 0..streams {
        if s % 250 == 0 {
            channel = watched.channel().await?;
        }
        let id = seeded_id(batches[s % batches.len()]);
        let mut stream = watched.watch(channel.clone(), id).await?;
        let deliveries = deliveries.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(message)) = stream.message().await {
                let kind = message.r#type();
                if kind == pb::EventType::Snapshot {
                    deliveries.ready.fetch_add(1, Ordering::Relaxed);
                }
                let sent = message
                    .batch
                    .and_then(|b| b.model)
                    .and_then(|m| m.strip_prefix('t').and_then(|t| t.parse().ok()));
                if kind == pb::EventType::Change
                    && let Some(sent) = sent
                {
                    deliveries.record(sent);
                }
            }
        }));
    }
    deliveries.wait_ready(streams).await?;
    let after = watched.rss_kib()?;

    let stop = Arc::new(AtomicBool::new(false));
    let worker = writer.worker(writer.channel().await?);
    let targets: Vec<String> = batches.iter().map(|n| seeded_id(*n)).collect();
    // The writes' own round trips, which the delivery latency includes: what is left
    // is the fan-out.
    let write_latencies = Arc::new(Mutex::new(Vec::new()));
    let (measuring, recorded) = (deliveries.measuring.clone(), write_latencies.clone());
    let writes = steady_writes(rate, targets.len(), stop.clone(), move |i, sent| {
        let mut worker = worker.clone();
        let batch_id = targets[i].clone();
        let (measuring, recorded) = (measuring.clone(), recorded.clone());
        async move {
            let started = Instant::now();
            worker
                .update_batch(pb::UpdateBatchRequest {
                    batch_id,
                    request_counts: Some(growing_counts()),
                    model: Some(format!("t{sent}")),
                    ..Default::default()
                })
                .await?;
            if measuring.load(Ordering::Relaxed) {
                let took = started.elapsed().as_secs_f64() * 1_000.0;
                recorded.lock().unwrap().push(took);
            }
            Ok(())
        }
    });
    let (latencies, cpu_seconds) = deliveries
        .measure_with_cpu(plan.warm_up, plan.window, || watched.cpu_seconds())
        .await?;
    stop.store(true, Ordering::Relaxed);
    writes.await??;
    for task in tasks {
        task.abort();
    }
    anyhow::ensure!(!latencies.is_empty(), "{name}: no delivery was measured");
    report.latencies(&name, &latencies);
    let write_latencies = Latencies::new(std::mem::take(&mut *write_latencies.lock().unwrap()));
    report.add(
        &format!("{name}_write_p50"),
        write_latencies.quantile(0.50),
        "ms",
        None,
    );
    report.add(
        &format!("{name}_deliveries"),
        latencies.len() as f64,
        "events",
        None,
    );
    // The watched replica's CPU while deliveries were recorded, per delivery. It
    // includes the writes' own work on that replica (all of it when it is also the
    // writer), which is small beside 10,000 deliveries a write on one batch and not
    // beside 10 a write spread over 1,000 batches.
    report.add(
        &format!("{name}_batchd_cpu_per_delivery"),
        cpu_seconds * 1e6 / latencies.len() as f64,
        "us",
        None,
    );
    let per_stream = after.saturating_sub(before) as f64 / streams as f64;
    report.add(&format!("{name}_rss_per_stream"), per_stream, "KiB", None);
    // Let the aborted streams close before the next measurement counts memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// A reconnect storm, as when a replica restarts and its watchers come back together:
/// `streams` WatchBatch calls on batch `n`, all sent at once over connections already
/// open (250 streams each). Reports how long until every stream that was accepted had
/// its snapshot, and how many were refused (and with which code and message).
async fn reconnect_storm(
    report: &mut Report,
    server: &Batchd,
    n: u64,
    streams: usize,
) -> anyhow::Result<()> {
    let mut channels = Vec::new();
    for _ in 0..streams.div_ceil(250) {
        channels.push(server.channel().await?);
    }
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for s in 0..streams {
        let client = server.client(channels[s / 250].clone());
        calls.spawn(async move {
            let mut client = client;
            let opened = client
                .watch_batch(pb::WatchBatchRequest {
                    batch_id: seeded_id(n),
                    after_version: None,
                })
                .await;
            let mut stream = match opened {
                Ok(stream) => stream.into_inner(),
                Err(status) => return Err(status),
            };
            match stream.message().await {
                Ok(Some(_snapshot)) => Ok((started.elapsed(), stream)),
                Ok(None) => Err(tonic::Status::unknown(
                    "the stream ended before its snapshot",
                )),
                Err(status) => Err(status),
            }
        });
    }
    let (mut serving, mut last, mut refused) = (Vec::new(), Duration::ZERO, 0usize);
    let mut refusal = None;
    while let Some(joined) = calls.join_next().await {
        match joined? {
            Ok((at, stream)) => {
                last = last.max(at);
                serving.push(stream);
            }
            Err(status) => {
                refused += 1;
                refusal.get_or_insert_with(|| format!("{:?}: {}", status.code(), status.message()));
            }
        }
    }
    let name = format!("watch_storm_{streams}_streams_1_batch");
    report.add(
        &format!("{name}_all_serving"),
        last.as_secs_f64(),
        "s",
        None,
    );
    report.add(&format!("{name}_refused"), refused as f64, "streams", None);
    if let Some(refusal) = refusal {
        eprintln!("bench: {name}: refused with {refusal}");
    }
    drop(serving);
    // Let the closed streams end before the next measurement.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// Figure 6 on PostgreSQL: one replica, spread and one batch, a reconnect storm; then
/// across replicas.
pub async fn run(
    plan: &Plan,
    server: &Batchd,
    seeded: &Seeded,
    database_url: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let spread: Vec<u64> = (1..=plan.fanout_batches as u64).collect();
    let one = [plan.fanout_batches as u64 + 1];
    anyhow::ensure!(
        one[0] <= seeded.running,
        "not enough running batches seeded"
    );
    let streams = plan.fanout_streams;
    let spread_name = format!("watch_{streams}_streams_{}_batches", plan.fanout_batches);
    let spread_shape = |name: String| Shape {
        name,
        batches: &spread,
        streams,
        rate: plan.fanout_rate,
    };
    measure(
        plan,
        report,
        spread_shape(spread_name.clone()),
        server,
        server,
    )
    .await?;
    // Every write reaches every stream: a lower rate keeps deliveries per second sane.
    let one_batch = Shape {
        name: format!("watch_{streams}_streams_1_batch"),
        batches: &one,
        streams,
        rate: (plan.fanout_rate / 20).max(2),
    };
    measure(plan, report, one_batch, server, server).await?;
    reconnect_storm(report, server, one[0], streams).await?;
    let second = Batchd::start_with_key(database_url, &[], Some(&server.key)).await?;
    let cross = spread_shape(format!("{spread_name}_cross_replica"));
    measure(plan, report, cross, server, &second).await?;
    second.stop().await;
    Ok(())
}
