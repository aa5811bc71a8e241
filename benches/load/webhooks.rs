//! Figure 9: webhooks on PostgreSQL, to a receiver in this process, on the server of
//! figures 1-8 (10 endpoints, deleted at the end).
//!
//! - Commit-to-delivery: `batches` batches (1,000; 200 quick) waiting in `finalizing`
//!   complete at once (16 writers), with 10 endpoints subscribed to `batch.completed`:
//!   from sending each UpdateBatch to its event's arrival at each endpoint (an upper
//!   bound of commit-to-delivery), p50 and p99 over every delivery, and the time until
//!   the last one arrived.
//! - CreateBatch throughput with those 10 endpoints subscribed to `batch.created`
//!   (every create makes 10 deliveries) against none subscribed, measured without,
//!   with, without, against the mean of the two (target >= 0.9).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::routing::post;
use batchd::proto::batchd::v1 as pb;
use serde_json::{Value, json};

use crate::reads::closed_loop;
use crate::setup::{Batchd, now_nanos};
use crate::{Latencies, Plan, Report};

/// Endpoints subscribed, as in the issue.
const ENDPOINTS: usize = 10;
/// Writers completing the batches at once.
const WRITERS: usize = 16;

/// Arrival time (ns) of each (endpoint, batch) event, and how many arrived.
#[derive(Default)]
struct Arrivals {
    at: Mutex<HashMap<(usize, String), u128>>,
}

async fn arrive(
    State(arrivals): State<Arc<Arrivals>>,
    Path(endpoint): Path<usize>,
    body: String,
) -> &'static str {
    let now = now_nanos();
    if let Ok(event) = serde_json::from_str::<Value>(&body)
        && let Some(batch) = event["data"]["id"].as_str()
    {
        arrivals
            .at
            .lock()
            .unwrap()
            .entry((endpoint, batch.to_owned()))
            .or_insert(now);
    }
    "ok"
}

/// The flags that let batchd send webhooks to a receiver in this process.
pub const REACH_THIS_PROCESS: &[&str] =
    &["--webhook-allow-http", "--webhook-allow-private-networks"];

/// Runs figure 9 on `server`, started with [`REACH_THIS_PROCESS`].
pub async fn run(plan: &Plan, server: &Batchd, report: &mut Report) -> anyhow::Result<()> {
    let arrivals = Arc::new(Arrivals::default());
    let router = axum::Router::new()
        .route("/hook/{endpoint}", post(arrive))
        .with_state(arrivals.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let receiver = listener.local_addr()?;
    let receiving = tokio::spawn(async move { axum::serve(listener, router).await });

    let rest = reqwest::Client::new();
    let endpoints_api = format!("http://{}/v1/webhook_endpoints", server.http_addr);
    let mut endpoint_ids = Vec::new();
    for endpoint in 0..ENDPOINTS {
        let created: Value = rest
            .post(&endpoints_api)
            .bearer_auth(&server.key)
            .json(&json!({
                "name": format!("bench {endpoint}"),
                "url": format!("http://{receiver}/hook/{endpoint}"),
                "event_types": ["batch.completed"],
            }))
            .send()
            .await?
            .json()
            .await?;
        let id = created["id"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no endpoint created: {created}"))?;
        endpoint_ids.push(id.to_owned());
    }

    let latencies = completing_at_once(plan, server, &arrivals).await?;
    report.latencies("webhook_commit_to_delivery", &latencies.0);
    report.add(
        "webhook_all_delivered_after",
        latencies.1.as_secs_f64(),
        "s",
        None,
    );

    // Throughput of creates, without and with subscribed endpoints.
    let subscribe = |types: Value| {
        let (rest, endpoint_ids) = (&rest, &endpoint_ids);
        async move {
            for id in endpoint_ids {
                rest.post(format!(
                    "http://{}/v1/webhook_endpoints/{id}",
                    server.http_addr
                ))
                .bearer_auth(&server.key)
                .json(&json!({"event_types": types}))
                .send()
                .await?
                .error_for_status()?;
            }
            anyhow::Ok(())
        }
    };
    // "Off": subscribed only to an event these creates never make.
    subscribe(json!(["batch.expired"])).await?;
    let off_before = creates(plan, server).await?;
    subscribe(json!(["batch.created"])).await?;
    let on = creates(plan, server).await?;
    subscribe(json!(["batch.expired"])).await?;
    let off_after = creates(plan, server).await?;
    let off = (off_before + off_after) / 2.0;
    let off_name = "webhook_create_grpc_c16_off";
    report.add(off_name, off, "tx/s", None);
    report.add(
        "webhook_create_grpc_c16_10_endpoints_on",
        on,
        "tx/s",
        Some((off_name, off)),
    );
    // The endpoints go, so that no later figure pays for them.
    for id in &endpoint_ids {
        rest.delete(format!("{endpoints_api}/{id}"))
            .bearer_auth(&server.key)
            .send()
            .await?
            .error_for_status()?;
    }
    receiving.abort();
    Ok(())
}

/// CreateBatch per second at 16 clients.
async fn creates(plan: &Plan, server: &Batchd) -> anyhow::Result<f64> {
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(server.client(server.channel().await?));
    }
    let throughput = closed_loop(plan, WRITERS, move |task, _| {
        let mut client = clients[task % clients.len()].clone();
        async move {
            client
                .create_batch(pb::CreateBatchRequest {
                    input_file_id: "file-bench-webhooks".into(),
                    endpoint: "/v1/chat/completions".into(),
                    completion_window: "24h".into(),
                    ..Default::default()
                })
                .await?;
            Ok(())
        }
    })
    .await?;
    Ok(throughput.per_second)
}

/// Completes the batches at once; the latency of every delivery (ms) and the time
/// until the last one arrived.
async fn completing_at_once(
    plan: &Plan,
    server: &Batchd,
    arrivals: &Arrivals,
) -> anyhow::Result<(Latencies, Duration)> {
    let count = if plan.quick { 200 } else { 1_000 };
    let channel = server.channel().await?;
    let (mut client, mut worker) = (server.client(channel.clone()), server.worker(channel));
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        let batch = client
            .create_batch(pb::CreateBatchRequest {
                input_file_id: "file-bench-webhooks".into(),
                endpoint: "/v1/chat/completions".into(),
                completion_window: "24h".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        for status in [pb::BatchStatus::InProgress, pb::BatchStatus::Finalizing] {
            worker
                .update_batch(pb::UpdateBatchRequest {
                    batch_id: batch.id.clone(),
                    status: Some(status.into()),
                    ..Default::default()
                })
                .await?;
        }
        ids.push(batch.id);
    }
    let sent: Arc<Mutex<HashMap<String, u128>>> = Arc::default();
    let started = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for task in 0..WRITERS {
        let mine: Vec<String> = ids.iter().skip(task).step_by(WRITERS).cloned().collect();
        let (mut worker, sent) = (server.worker(server.channel().await?), sent.clone());
        writers.spawn(async move {
            for id in mine {
                sent.lock().unwrap().insert(id.clone(), now_nanos());
                worker
                    .update_batch(pb::UpdateBatchRequest {
                        batch_id: id,
                        status: Some(pb::BatchStatus::Completed.into()),
                        ..Default::default()
                    })
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(written) = writers.join_next().await {
        written??;
    }
    let expected = count * ENDPOINTS;
    let deadline = Instant::now() + Duration::from_secs(300);
    while arrivals.at.lock().unwrap().len() < expected {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {expected} webhook deliveries arrived",
            arrivals.at.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all_after = started.elapsed();
    let sent = sent.lock().unwrap();
    let samples = arrivals
        .at
        .lock()
        .unwrap()
        .iter()
        .filter_map(|((_, batch), arrived)| {
            let sent = sent.get(batch)?;
            Some(arrived.saturating_sub(*sent) as f64 / 1e6)
        })
        .collect();
    Ok((Latencies::new(samples), all_after))
}
