//! Figures 1-4: point reads of one batch, over gRPC and REST, on PostgreSQL and SQLite,
//! against pgbench's select-only run (the database's own point-read limit).

use std::future::Future;
use std::time::{Duration, Instant};

use batchd::proto::batchd::v1 as pb;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;

use crate::lean_grpc::LeanGrpc;
use crate::setup::{Batchd, Rng, Seeded, pgbench, seeded_id};
use crate::{Latencies, Plan, Report};

/// Requests per second and latency of a closed-loop load.
pub struct Throughput {
    pub per_second: f64,
    pub latencies: Latencies,
    /// Every request completed, warm-up included.
    pub completed: usize,
}

/// Runs `request` from `concurrency` tasks in a loop: a warm-up, then the timed window
/// whose completions are counted. Every request must succeed.
pub async fn closed_loop<F, Fut>(
    plan: &Plan,
    concurrency: usize,
    request: F,
) -> anyhow::Result<Throughput>
where
    F: Fn(usize, &mut Rng) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let measure_from = Instant::now() + plan.warm_up;
    let end = measure_from + plan.window;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..concurrency {
        let request = request.clone();
        tasks.spawn(async move {
            let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15 ^ (task as u64 + 1));
            let mut latencies = Vec::new();
            let mut completed = 0;
            while Instant::now() < end {
                let sent = Instant::now();
                request(task, &mut rng).await?;
                completed += 1;
                if sent >= measure_from {
                    latencies.push(sent.elapsed().as_secs_f64() * 1_000.0);
                }
            }
            anyhow::Ok((latencies, completed))
        });
    }
    let mut latencies = Vec::new();
    let mut completed = 0;
    while let Some(done) = tasks.join_next().await {
        let (task_latencies, task_completed) = done??;
        latencies.extend(task_latencies);
        completed += task_completed;
    }
    Ok(Throughput {
        per_second: latencies.len() as f64 / plan.window.as_secs_f64(),
        latencies: Latencies::new(latencies),
        completed,
    })
}

/// GetBatch over gRPC (the lean client) for ids from `pick`, on a few shared HTTP/2
/// connections.
pub async fn grpc_gets(
    server: &Batchd,
    plan: &Plan,
    concurrency: usize,
    first: u64,
    count: u64,
) -> anyhow::Result<Throughput> {
    let mut connections = Vec::new();
    for _ in 0..4 {
        connections.push(LeanGrpc::connect(server).await?);
    }
    closed_loop(plan, concurrency, move |task, rng| {
        let connection = connections[task % connections.len()].clone();
        let batch_id = seeded_id(first + rng.pick(count) - 1);
        async move {
            let request = pb::GetBatchRequest { batch_id };
            connection
                .unary("/batchd.v1.BatchService/GetBatch", &request)
                .await?;
            Ok(())
        }
    })
    .await
}

/// Runs `load` and adds batchd's CPU time per completed request to its figures: the
/// cost of a request, which noise on a shared machine moves much less than throughput.
async fn with_cpu(
    server: &Batchd,
    load: impl Future<Output = anyhow::Result<Throughput>>,
) -> anyhow::Result<(Throughput, f64)> {
    let before = server.cpu_seconds()?;
    let reads = load.await?;
    let used = server.cpu_seconds()? - before;
    let per_request = used * 1e6 / reads.completed.max(1) as f64;
    Ok((reads, per_request))
}

fn report_reads(
    report: &mut Report,
    name: &str,
    (reads, cpu_per_request): &(Throughput, f64),
    anchor: Option<(&str, f64)>,
) {
    report.add(name, reads.per_second, "req/s", anchor);
    report.add(
        &format!("{name}_batchd_cpu"),
        *cpu_per_request,
        "us/req",
        None,
    );
    report.latencies(name, &reads.latencies);
}

/// Figures 1-3 on PostgreSQL.
pub async fn postgres(
    plan: &Plan,
    server: &Batchd,
    seeded: &Seeded,
    database_url: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let terminal = seeded.batches - seeded.running;
    for &clients in &plan.read_concurrency {
        let anchor_name = format!("pgbench_select_c{clients}");
        let anchor = pgbench(database_url, None, &[], clients, plan).await?;
        report.add(&anchor_name, anchor, "tx/s", None);
        let running = with_cpu(server, grpc_gets(server, plan, clients, 1, seeded.running)).await?;
        report_reads(
            report,
            &format!("get_grpc_running_c{clients}"),
            &running,
            Some((&anchor_name, anchor)),
        );
        let done = with_cpu(
            server,
            grpc_gets(server, plan, clients, seeded.running + 1, terminal),
        )
        .await?;
        report_reads(
            report,
            &format!("get_grpc_terminal_c{clients}"),
            &done,
            Some((&anchor_name, anchor)),
        );
    }

    let clients = plan.read_concurrency[0];
    let grpc_name = format!("get_grpc_running_c{clients}");
    let grpc = report.value(&grpc_name).unwrap_or(0.0);
    let rest = with_cpu(server, rest_gets(server, plan, clients, seeded.running)).await?;
    report_reads(
        report,
        &format!("get_rest_running_c{clients}"),
        &rest,
        Some((&grpc_name, grpc)),
    );
    Ok(())
}

/// Figure 4: GetBatch on SQLite, as a ratio of the PostgreSQL figure.
pub async fn sqlite(
    plan: &Plan,
    server: &Batchd,
    seeded: &Seeded,
    report: &mut Report,
) -> anyhow::Result<()> {
    let clients = plan.read_concurrency[0];
    let postgres_name = format!("get_grpc_running_c{clients}");
    let postgres = report.value(&postgres_name).unwrap_or(0.0);
    let reads = with_cpu(server, grpc_gets(server, plan, clients, 1, seeded.running)).await?;
    report_reads(
        report,
        &format!("get_grpc_running_sqlite_c{clients}"),
        &reads,
        Some((&postgres_name, postgres)),
    );
    Ok(())
}

/// `GET /v1/batches/{id}` with keep-alive HTTP/1.1 connections.
async fn rest_gets(
    server: &Batchd,
    plan: &Plan,
    concurrency: usize,
    running: u64,
) -> anyhow::Result<Throughput> {
    let client: HttpClient<_, Empty<Bytes>> = HttpClient::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(concurrency)
        .build_http();
    let base = format!("http://{}/v1/batches/", server.http_addr);
    let authorization = format!("Bearer {}", server.key);
    closed_loop(plan, concurrency, move |_, rng| {
        let request = hyper::Request::get(format!("{base}{}", seeded_id(rng.pick(running))))
            .header("authorization", &authorization)
            .body(Empty::<Bytes>::new());
        let client = client.clone();
        async move {
            let response = client.request(request?).await?;
            anyhow::ensure!(
                response.status() == 200,
                "REST read answered {}",
                response.status()
            );
            response.into_body().collect().await?;
            Ok(())
        }
    })
    .await
}
