//! batchd's benchmark harness: `cargo bench --bench load [-- --quick] [-- --json FILE]`.
//!
//! It starts what it needs (a release `batchd` on a fresh PostgreSQL database on the
//! local server and on a temporary SQLite file, etcd on loopback, the local NATS),
//! seeds 100,000 batches, drives batchd with tonic and hyper load generators (open
//! connections reused, fixed concurrency, a warm-up, then a timed window) and measures
//! each anchor in the same run: `pgbench` for the database's own limit, etcd and NATS
//! JetStream KV for watch latency. On a small, noisy machine only ratios taken side by
//! side mean much. Each figure is printed as `name value unit ratio-to-anchor` and the
//! whole set is written as JSON.

mod etcd;
mod failover;
mod fanout;
mod feed;
mod lean_grpc;
mod peers;
mod reads;
mod setup;
mod webhooks;
mod writes;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use setup::{Batchd, Seeded, TempPostgres, TempSqlite};

/// The settings of one run.
pub struct Plan {
    quick: bool,
    json: Option<PathBuf>,
    /// Batches seeded (a tenth of them terminal).
    pub batches: u64,
    /// Concurrencies of the read figures.
    pub read_concurrency: Vec<usize>,
    /// Concurrency of the write figure.
    pub write_concurrency: usize,
    /// Watch streams open during the write figure.
    pub write_watchers: usize,
    /// Watch streams of the fan-out figures, and the batches they spread over.
    pub fanout_streams: usize,
    /// Batches the spread fan-out streams watch.
    pub fanout_batches: usize,
    /// Changes per second written during a fan-out measurement.
    pub fanout_rate: u32,
    /// Running batches the change feed figures write to (and, per batch, watch).
    pub feed_batches: usize,
    /// Changes per second written during a change feed latency measurement.
    pub feed_rate: u32,
    /// Collection watchers (one per tenant) of the change feed's memory figure.
    pub feed_tenants: usize,
    /// Warm-up before each timed window.
    pub warm_up: Duration,
    /// Each timed window.
    pub window: Duration,
    /// `--only GROUP[,GROUP...]`: run these groups of figures (reads, fanout, feed,
    /// webhooks, writes, sqlite, peers, failover), always in the full run's order, e.g.
    /// to profile one, or to see what one leaves behind for the next; the figures that
    /// need another group's then lack a ratio.
    only: Option<String>,
}

impl Plan {
    /// Whether the group of figures `group` is to run.
    fn runs(&self, group: &str) -> bool {
        self.only
            .as_deref()
            .is_none_or(|only| only.split(',').any(|one| one == group))
    }

    fn from_args() -> Plan {
        let args: Vec<String> = std::env::args().collect();
        let quick = args.iter().any(|a| a == "--quick");
        let value = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        let json = value("--json").map(PathBuf::from);
        let only = value("--only");
        if quick {
            Plan {
                quick,
                json,
                batches: 5_000,
                read_concurrency: vec![32],
                write_concurrency: 16,
                write_watchers: 100,
                fanout_streams: 500,
                fanout_batches: 50,
                fanout_rate: 50,
                feed_batches: 1_000,
                feed_rate: 320,
                feed_tenants: 200,
                warm_up: Duration::from_millis(500),
                window: Duration::from_secs(2),
                only,
            }
        } else {
            Plan {
                quick,
                json,
                batches: 100_000,
                read_concurrency: vec![32, 64],
                write_concurrency: 16,
                write_watchers: 1_000,
                fanout_streams: 10_000,
                fanout_batches: 1_000,
                fanout_rate: 100,
                feed_batches: 10_000,
                feed_rate: 800,
                feed_tenants: 1_000,
                warm_up: Duration::from_secs(2),
                window: Duration::from_secs(6),
                only,
            }
        }
    }
}

/// One measured figure.
#[derive(Debug, Serialize)]
pub struct Figure {
    name: String,
    value: f64,
    unit: &'static str,
    /// `value / anchor`, where the figure has an anchor.
    ratio: Option<f64>,
    anchor: Option<String>,
}

/// The figures of the run, printed as they come.
#[derive(Default)]
pub struct Report {
    figures: Vec<Figure>,
}

impl Report {
    /// Records and prints a figure; `anchor` is the figure it is a ratio of.
    pub fn add(&mut self, name: &str, value: f64, unit: &'static str, anchor: Option<(&str, f64)>) {
        let figure = Figure {
            name: name.to_owned(),
            value,
            unit,
            ratio: anchor
                .filter(|(_, base)| *base > 0.0)
                .map(|(_, base)| value / base),
            anchor: anchor.map(|(name, _)| name.to_owned()),
        };
        let ratio = figure
            .ratio
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"));
        println!(
            "{} {:.2} {} {}",
            figure.name, figure.value, figure.unit, ratio
        );
        self.figures.push(figure);
    }

    /// Records `{name}_p50` and `{name}_p99` of `latencies`, in milliseconds.
    pub fn latencies(&mut self, name: &str, latencies: &Latencies) {
        self.add(&format!("{name}_p50"), latencies.quantile(0.50), "ms", None);
        self.add(&format!("{name}_p99"), latencies.quantile(0.99), "ms", None);
    }

    /// The value of a figure recorded earlier.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value)
    }
}

/// Latencies of one measurement, in milliseconds.
pub struct Latencies(Vec<f64>);

impl Latencies {
    /// Sorts the samples.
    pub fn new(mut samples: Vec<f64>) -> Latencies {
        samples.sort_by(f64::total_cmp);
        Latencies(samples)
    }

    /// The `p`-quantile (0..=1), 0 without samples.
    pub fn quantile(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let index = ((self.0.len() as f64 * p) as usize).min(self.0.len() - 1);
        self.0[index]
    }

    /// How many samples.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let plan = Plan::from_args();
    let started = Instant::now();
    eprintln!(
        "bench: {} mode, {} batches",
        if plan.quick { "quick" } else { "full" },
        plan.batches
    );
    let postgres = TempPostgres::create().await?;
    let sqlite = TempSqlite::create()?;
    let mut report = Report::default();
    let outcome = run(&plan, &postgres, &sqlite, &mut report).await;
    postgres.drop().await;
    outcome?;
    eprintln!("bench: done in {:.0?}", started.elapsed());
    if let Some(path) = &plan.json {
        std::fs::write(path, serde_json::to_string_pretty(&report.figures)?)?;
    }
    Ok(())
}

async fn run(
    plan: &Plan,
    postgres: &TempPostgres,
    sqlite: &TempSqlite,
    report: &mut Report,
) -> anyhow::Result<()> {
    // PostgreSQL: reads (figures 1-3), the watch fan-out on one replica and across two
    // (figure 6), the change feed (figure 8), webhooks (figure 9, on batches of its
    // own), then writes with watchers (figure 5),
    // whose pgbench anchor must come last: it writes rows behind batchd's back.
    // Webhooks (figure 9) go to a receiver in this process: every replica that may send
    // them must be allowed to reach it.
    let server = Batchd::start(&postgres.url, webhooks::REACH_THIS_PROCESS).await?;
    let seeded = Seeded::create(plan, &server, &postgres.url).await?;
    setup::pgbench_initialize(&postgres.url).await?;
    if plan.runs("reads") {
        reads::postgres(plan, &server, &seeded, &postgres.url, report).await?;
    }
    if plan.runs("fanout") {
        fanout::run(plan, &server, &seeded, &postgres.url, report).await?;
    }
    if plan.runs("feed") {
        feed::run(plan, &server, &seeded, &postgres.url, report).await?;
    }
    if plan.runs("webhooks") {
        webhooks::run(plan, &server, report).await?;
    }
    if plan.runs("writes") {
        writes::run(plan, &server, &seeded, &postgres.url, report).await?;
    }
    server.stop().await;

    // SQLite (figure 4).
    if plan.runs("sqlite") {
        let server = Batchd::start(&sqlite.url, &[]).await?;
        let seeded = Seeded::create(plan, &server, &sqlite.url).await?;
        reads::sqlite(plan, &server, &seeded, report).await?;
        server.stop().await;
    }

    // The dedicated watch systems, same counts (figure 7).
    if plan.runs("peers") {
        peers::run(plan, report).await?;
    }

    // PostgreSQL's own failover and switchover, on servers of its own (figure 10).
    if plan.runs("failover") {
        failover::run(plan, report).await?;
    }
    Ok(())
}
