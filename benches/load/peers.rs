//! Figure 7: the dedicated watch systems under the same counts as figure 6, on the same
//! machine: etcd's watch (etcd started here on loopback) and NATS JetStream KV watch (the
//! local nats-server). Same method: writes carry their send time, every delivery is
//! timed. batchd's figure-6 latency is reported as a ratio of theirs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio_stream::StreamExt;

use crate::etcd::Etcd as EtcdClient;
use crate::fanout::{Deliveries, steady_writes};
use crate::{Latencies, Plan, Report};

fn parse_stamp(value: &[u8]) -> Option<u128> {
    std::str::from_utf8(value)
        .ok()?
        .strip_prefix('t')?
        .parse()
        .ok()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The figure-7 lines of one peer and one shape, and batchd's ratio to it.
fn report_peer(
    report: &mut Report,
    peer: &str,
    shape: &str,
    latencies: &Latencies,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !latencies.is_empty(),
        "{peer} {shape}: no delivery was measured"
    );
    report.latencies(&format!("{peer}_{shape}"), latencies);
    let p99_name = format!("{peer}_{shape}_p99");
    if let Some(batchd) = report.value(&format!("watch_{shape}_p99")) {
        report.add(
            &format!("watch_{shape}_p99_vs_{peer}"),
            batchd,
            "ms",
            Some((&p99_name, latencies.quantile(0.99))),
        );
    }
    Ok(())
}

/// A missing peer leaves figure 7 incomplete: said loudly on a workstation, an error in CI
/// (where `.ci/run` installs etcd and the machine runs NATS), so it cannot go unnoticed.
fn peer_unavailable(peer: &str, error: anyhow::Error) -> anyhow::Result<()> {
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        return Err(error.context(format!("{peer} is unavailable and CI=true")));
    }
    eprintln!("bench: {peer} unavailable, figure 7 without it: {error:#}");
    Ok(())
}

pub async fn run(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let streams = plan.fanout_streams;
    let shapes = [
        (
            format!("{streams}_streams_{}_batches", plan.fanout_batches),
            plan.fanout_batches,
            plan.fanout_rate,
        ),
        (
            format!("{streams}_streams_1_batch"),
            1,
            (plan.fanout_rate / 20).max(2),
        ),
    ];
    match Etcd::start().await {
        Ok(etcd) => {
            for (shape, keys, rate) in &shapes {
                let latencies = etcd.measure(plan, streams, *keys, *rate).await?;
                report_peer(report, "etcd", shape, &latencies)?;
            }
            etcd.stop().await;
        }
        Err(error) => peer_unavailable("etcd", error)?,
    }
    let url = std::env::var("BATCHD_BENCH_NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".into());
    match async_nats::connect(&url).await {
        Ok(_) => {
            for (shape, keys, rate) in &shapes {
                let latencies = nats_measure(&url, plan, streams, *keys, *rate).await?;
                report_peer(report, "nats_kv", shape, &latencies)?;
            }
        }
        Err(error) => peer_unavailable(&format!("NATS at {url}"), error.into())?,
    }
    Ok(())
}

/// An etcd server on loopback with its data in a temporary directory.
struct Etcd {
    child: tokio::process::Child,
    endpoint: String,
    _data: tempfile::TempDir,
}

impl Etcd {
    async fn start() -> anyhow::Result<Etcd> {
        let data = tempfile::tempdir()?;
        let (client, peer) = (free_port()?, free_port()?);
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "bench", "--data-dir"])
            .arg(data.path())
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args([
                "--initial-cluster",
                &format!("bench={peer_url}"),
                "--log-level",
                "error",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut client) = EtcdClient::connect(&endpoint).await
                && client.put("ready", "1").await.is_ok()
            {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "etcd did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Etcd {
            child,
            endpoint,
            _data: data,
        })
    }

    async fn measure(
        &self,
        plan: &Plan,
        streams: usize,
        keys: usize,
        rate: u32,
    ) -> anyhow::Result<Latencies> {
        let deliveries = Deliveries::default();
        let mut tasks = Vec::new();
        let mut client = EtcdClient::connect(&self.endpoint).await?;
        for s in 0..streams {
            if s % 250 == 0 {
                client = EtcdClient::connect(&self.endpoint).await?;
            }
            let (watcher, mut stream) = client.watch(&format!("batch/{}", s % keys)).await?;
            let deliveries = deliveries.clone();
            tasks.push(tokio::spawn(async move {
                let _watcher = watcher;
                let mut first = true;
                while let Ok(Some(response)) = stream.message().await {
                    if std::mem::take(&mut first) {
                        deliveries.ready.fetch_add(1, Ordering::Relaxed);
                    }
                    for event in response.events {
                        if let Some(sent) = event.kv.and_then(|kv| parse_stamp(&kv.value)) {
                            deliveries.record(sent);
                        }
                    }
                }
            }));
        }
        deliveries.wait_ready(streams).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let writer = EtcdClient::connect(&self.endpoint).await?;
        let writes = steady_writes(rate, keys, stop.clone(), move |key, sent| {
            let mut writer = writer.clone();
            async move {
                writer
                    .put(&format!("batch/{key}"), &format!("t{sent}"))
                    .await
            }
        });
        let latencies = deliveries.measure(plan.warm_up, plan.window).await;
        stop.store(true, Ordering::Relaxed);
        writes.await??;
        tasks.iter().for_each(|t| t.abort());
        Ok(latencies)
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

async fn nats_measure(
    url: &str,
    plan: &Plan,
    streams: usize,
    keys: usize,
    rate: u32,
) -> anyhow::Result<Latencies> {
    let bucket = format!("batchd_bench_{}", std::process::id());
    let admin = async_nats::jetstream::new(async_nats::connect(url).await?);
    let _ = admin.delete_key_value(&bucket).await;
    let config = async_nats::jetstream::kv::Config {
        bucket: bucket.clone(),
        history: 1,
        ..Default::default()
    };
    let store = admin.create_key_value(config).await?;
    let deliveries = Deliveries::default();
    let mut tasks = Vec::new();
    let mut kv = store.clone();
    for s in 0..streams {
        if s % 250 == 0 {
            let jetstream = async_nats::jetstream::new(async_nats::connect(url).await?);
            kv = jetstream.get_key_value(&bucket).await?;
        }
        let mut watch = kv.watch(format!("batch.{}", s % keys)).await?;
        deliveries.ready.fetch_add(1, Ordering::Relaxed);
        let deliveries = deliveries.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(entry)) = watch.next().await {
                if let Some(sent) = parse_stamp(&entry.value) {
                    deliveries.record(sent);
                }
            }
        }));
    }
    deliveries.wait_ready(streams).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = steady_writes(rate, keys, stop.clone(), move |key, sent| {
        let store = store.clone();
        async move {
            store
                .put(format!("batch.{key}"), format!("t{sent}").into())
                .await?;
            Ok(())
        }
    });
    let latencies = deliveries.measure(plan.warm_up, plan.window).await;
    stop.store(true, Ordering::Relaxed);
    writes.await??;
    tasks.iter().for_each(|t| t.abort());
    let _ = admin.delete_key_value(&bucket).await;
    Ok(latencies)
}
