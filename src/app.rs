//! Builds batchd from its parts, binds the listeners (port 0 allowed, so tests run on
//! random ports) and runs until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::server::TcpIncoming;

use crate::clock::{Clock, SystemClock};
use crate::domain::{ApiKey, ApiKeySecret, BatchPolicy, random_hex};
use crate::health::{DatabaseHealth, HealthChecker};
use crate::service::BatchService;
use crate::store::{self, StoreOptions};
use crate::watch::WatchOptions;
use crate::watch::postgres::{self, Outbox};
use crate::{grpc, rest};

/// Everything `serve` needs.
#[derive(Clone)]
pub struct ServeOptions {
    /// `sqlite://...` or `postgres://...`.
    pub database_url: String,
    /// Pool settings.
    pub store: StoreOptions,
    /// gRPC listener.
    pub grpc_addr: SocketAddr,
    /// HTTP listener.
    pub http_addr: SocketAddr,
    /// What new batches may ask for.
    pub policy: BatchPolicy,
    /// How often the database is checked for health.
    pub health_check_interval: Duration,
    /// The source of "now" for every timestamp.
    pub clock: Arc<dyn Clock>,
    /// Watch streams: heartbeats, limits, safety poll.
    pub watch: WatchOptions,
    /// How long the event log keeps versions that are not a batch's latest.
    pub event_retention: Duration,
    /// How often the event log is compacted.
    pub event_compaction_interval: Duration,
}

impl ServeOptions {
    /// Defaults for `database_url`, listening on random local ports.
    pub fn local(database_url: impl Into<String>) -> ServeOptions {
        ServeOptions {
            database_url: database_url.into(),
            store: StoreOptions::default(),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            policy: BatchPolicy::default(),
            health_check_interval: Duration::from_secs(2),
            clock: Arc::new(SystemClock),
            watch: WatchOptions::default(),
            event_retention: Duration::from_secs(7 * 24 * 3600),
            event_compaction_interval: Duration::from_secs(3600),
        }
    }
}

/// A running batchd.
pub struct App {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    service: Arc<BatchService>,
    first_api_key: Option<(ApiKey, ApiKeySecret)>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<(&'static str, anyhow::Result<()>)>,
}

impl App {
    /// Connects and migrates the store, creates the first API key on an empty
    /// database, binds both listeners and starts serving.
    pub async fn start(options: ServeOptions) -> anyhow::Result<App> {
        let options_for_tasks = TaskIntervals {
            event_retention: options.event_retention,
            event_compaction_interval: options.event_compaction_interval,
        };
        let store = store::connect(&options.database_url, &options.store)
            .await
            .with_context(|| {
                format!(
                    "cannot open the database {}",
                    store::redact_url(&options.database_url)
                )
            })?;
        store
            .migrate()
            .await
            .context("cannot migrate the database")?;
        let service = Arc::new(BatchService::new(
            store,
            options.clock,
            options.policy,
            options.watch,
        ));
        let first_api_key = service
            .create_first_api_key()
            .await
            .context("cannot create the first API key")?;

        let grpc_listener = TcpListener::bind(options.grpc_addr)
            .await
            .with_context(|| format!("cannot listen for gRPC on {}", options.grpc_addr))?;
        let http_listener = TcpListener::bind(options.http_addr)
            .await
            .with_context(|| format!("cannot listen for HTTP on {}", options.http_addr))?;
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;

        let (shutdown, _) = watch::channel(false);
        let stopped = |shutdown: &watch::Sender<bool>| {
            let mut stopping = shutdown.subscribe();
            async move { crate::shutdown::requested(&mut stopping).await }
        };

        let (routes, health_reporter) = grpc::routes(service.clone())?;
        let database_health = Arc::new(DatabaseHealth::default());
        let mut tasks = JoinSet::new();

        // The first check runs before the listeners serve, so health is known (and every
        // service registered) from the first probe on.
        let mut checker = HealthChecker::new(
            service.store().clone(),
            health_reporter,
            database_health.clone(),
            &grpc::SERVICE_NAMES,
            options.health_check_interval,
        );
        checker.check().await;
        let checks = checker.run(options.health_check_interval, shutdown.subscribe());
        tasks.spawn(async move {
            checks.await;
            ("health checks", Ok(()))
        });

        spawn_watch_tasks(&mut tasks, &service, &options_for_tasks, &shutdown);

        let grpc_stopped = stopped(&shutdown);
        tasks.spawn(async move {
            let outcome = tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                    grpc_stopped,
                )
                .await
                .context("gRPC server failed");
            ("gRPC server", outcome)
        });

        let http_stopped = stopped(&shutdown);
        let router = rest::router(service.clone(), database_health);
        tasks.spawn(async move {
            let outcome = axum::serve(http_listener, router)
                .with_graceful_shutdown(http_stopped)
                .await
                .context("HTTP server failed");
            ("HTTP server", outcome)
        });

        tracing::info!(%grpc_addr, %http_addr, "batchd is serving");
        Ok(App {
            grpc_addr,
            http_addr,
            service,
            first_api_key,
            shutdown,
            tasks,
        })
    }

    /// Where gRPC listens.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Where HTTP listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The use cases, e.g. to create API keys in-process.
    pub fn service(&self) -> &Arc<BatchService> {
        &self.service
    }

    /// The admin key created at this start because the database had none (once).
    pub fn take_first_api_key(&mut self) -> Option<(ApiKey, ApiKeySecret)> {
        self.first_api_key.take()
    }

    /// Serves until `signal` completes or a part of batchd stops on its own (an
    /// error), then stops everything.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        let early_exit = tokio::select! {
            _ = signal => None,
            Some(joined) = self.tasks.join_next() => Some(joined),
        };
        match early_exit {
            None => {
                tracing::info!("stopping");
                self.stop().await
            }
            Some(joined) => {
                let error = match joined {
                    Ok((name, Ok(()))) => anyhow::anyhow!("{name} stopped unexpectedly"),
                    Ok((_, Err(e))) => e,
                    Err(e) => anyhow::anyhow!("a task of batchd panicked: {e}"),
                };
                // Best effort: the failure above is what gets reported.
                let _ = self.stop().await;
                Err(error)
            }
        }
    }

    /// Stops serving: watch streams end with UNAVAILABLE, listeners close, in-flight
    /// calls finish, the pool closes.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.service.hub().stop();
        let _ = self.shutdown.send(true);
        let mut first_error = None;
        while let Some(joined) = self.tasks.join_next().await {
            let outcome = match joined {
                Ok((_, outcome)) => outcome,
                Err(e) => Err(anyhow::anyhow!("a task of batchd panicked: {e}")),
            };
            if let Err(e) = outcome {
                first_error.get_or_insert(e);
            }
        }
        self.service.store().close().await;
        first_error.map_or(Ok(()), Err)
    }
}

/// The periods of the background tasks.
struct TaskIntervals {
    event_retention: Duration,
    event_compaction_interval: Duration,
}

/// The watch machinery's background work: the hub's safety poll, the event log's
/// compaction and, on PostgreSQL, the cross-replica notifier and listener.
fn spawn_watch_tasks(
    tasks: &mut JoinSet<(&'static str, anyhow::Result<()>)>,
    service: &Arc<BatchService>,
    intervals: &TaskIntervals,
    shutdown: &watch::Sender<bool>,
) {
    let hub = service.hub().clone();
    tasks.spawn(async move {
        hub.run_safety_poll().await;
        ("watch safety poll", Ok(()))
    });

    let compactor = service.clone();
    let (retention, every) = (
        intervals.event_retention,
        intervals.event_compaction_interval,
    );
    let mut stopping = shutdown.subscribe();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {
                    if let Err(error) = compactor.compact_event_log(retention).await {
                        tracing::warn!(%error, "event log compaction failed");
                    }
                }
                _ = crate::shutdown::requested(&mut stopping) => return ("event log compaction", Ok(())),
            }
        }
    });

    if let Some(pool) = service.store().postgres_pool() {
        let replica = format!("replica-{}", random_hex::<8>());
        let outbox = Outbox::new(replica.clone());
        service.hub().publish_to(outbox.clone());
        let (notifier_pool, notifier_stop) = (pool.clone(), shutdown.subscribe());
        tasks.spawn(async move {
            postgres::run_notifier(notifier_pool, outbox, notifier_stop).await;
            ("watch notifier", Ok(()))
        });
        let (hub, listener_stop) = (service.hub().clone(), shutdown.subscribe());
        tasks.spawn(async move {
            postgres::run_listener(pool, hub, replica, listener_stop).await;
            ("watch listener", Ok(()))
        });
    }
}
