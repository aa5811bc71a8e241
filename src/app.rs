//! Builds batchd's parts ([`Parts::build`]), serves them on listeners (port 0 allowed,
//! so tests run on random ports) with the background work ([`App::serve`]), and stops
//! in order when told to.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::server::TcpIncoming;

use crate::cache::CacheOptions;
use crate::clock::{Clock, SystemClock};
use crate::domain::{ApiKey, ApiKeySecret, BatchId, BatchPolicy, CursorSealer};
use crate::health::{HealthChecker, Readiness};
use crate::request_rates::RequestRateOptions;
use crate::service::{BatchService, ServiceOptions, key_lookups_for};
use crate::store::{
    self, CommitListener, DatabaseStatus, GroupCommitOptions, PointReadOptions, Store, StoreOptions,
};
use crate::telemetry::grpc::ObserveLayer;
use crate::watch::{WatchHub, WatchOptions};
use crate::webhooks::deliverer::Deliverer;
use crate::webhooks::dispatcher;
use crate::webhooks::service::{WebhookOptions, WebhookService};
use crate::{grpc, rest, shutdown};

/// Everything `serve` needs. `batchd serve`'s flags (in `config`) fill it; tests and
/// embedders build it from [`ServeOptions::local`] or [`Default`].
#[derive(Clone)]
pub struct ServeOptions {
    /// `sqlite://PATH` (created if missing) or `postgres://USER:PASSWORD@HOST:PORT/DB`.
    pub database_url: String,

    /// Pool settings.
    pub store: StoreOptions,

    /// How reads of batches by id share queries (its `max_wait` and `database` are
    /// set when the parts are built: the pool's call deadline, the readiness check's
    /// finding).
    pub point_reads: PointReadOptions,

    /// How commits of batch changes share rounds (`max_wait` and `database` as for
    /// `point_reads`).
    pub commits: GroupCommitOptions,

    /// Address of the gRPC listener (port 0 picks a free port).
    pub grpc_addr: SocketAddr,

    /// Address of the HTTP listener: REST API and probes (port 0 picks a free port).
    pub http_addr: SocketAddr,

    /// What new batches may ask for (its flags are in `config`).
    pub policy: BatchPolicy,

    /// How often the database is checked for the health service and `/readyz`.
    pub health_check_interval: Duration,

    /// The source of "now" for every timestamp and timer.
    pub clock: Arc<dyn Clock>,

    /// Watch streams: heartbeats, limits, safety poll.
    pub watch: WatchOptions,

    /// How long the event log keeps versions older than each batch's latest; a watch
    /// resuming from before that gets a snapshot.
    pub event_retention: Duration,

    /// How often the event log is compacted.
    pub event_compaction_interval: Duration,

    /// A batch `cancelling` for longer than this moves to `cancelled` by itself.
    pub cancel_grace: Duration,

    /// How often the lifecycle timers (expiry, cancel grace) are applied and stalls
    /// marked.
    pub sweep_interval: Duration,

    /// A batch not final that has not changed for this long is marked stalled (a new
    /// version with `stalled_at`); `None` turns stall detection off.
    pub stall_after: Option<Duration>,

    /// After SIGTERM/SIGINT, readiness fails at once but requests are still served for
    /// this long, so load balancers stop sending new ones.
    pub shutdown_delay: Duration,

    /// The process exits within this long after SIGTERM/SIGINT, even if a client never
    /// reads its stream.
    pub shutdown_timeout: Duration,

    /// Serve the web console at `/console/` of the HTTP port (`/` redirects there).
    /// It is static files calling the REST API with the key the operator enters; off,
    /// both paths are 404.
    pub console: bool,

    /// Create an admin key, printed once on stdout, when the database has no key at
    /// all (the quick start). Deployments that create keys on purpose turn it off.
    pub create_first_key: bool,

    /// In-memory caches: API keys, terminal batches, latest versions.
    pub caches: CacheOptions,

    /// Webhooks: where they may go, retries, limits, the secrets key.
    pub webhooks: WebhookOptions,

    /// Most active (not terminal) batches per owner; 0 for no limit.
    pub max_active_batches_per_owner: u32,

    /// Each API key's request rate on this replica; `None` for no limit.
    pub request_rates: Option<RequestRateOptions>,

    /// Batches terminal for longer than this are deleted; `None` keeps them forever.
    pub retention_terminal: Option<Duration>,

    /// How often batches past `retention_terminal` are looked for.
    pub retention_sweep_interval: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        const MINUTE: Duration = Duration::from_secs(60);
        ServeOptions {
            database_url: store::DEFAULT_DATABASE_URL.to_owned(),
            store: StoreOptions::default(),
            point_reads: PointReadOptions::default(),
            commits: GroupCommitOptions::default(),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            policy: BatchPolicy::default(),
            health_check_interval: Duration::from_secs(2),
            clock: Arc::new(SystemClock),
            watch: WatchOptions::default(),
            event_retention: 7 * 24 * 60 * MINUTE,
            event_compaction_interval: 60 * MINUTE,
            cancel_grace: 10 * MINUTE,
            sweep_interval: Duration::from_secs(5),
            stall_after: Some(10 * MINUTE),
            shutdown_delay: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
            console: true,
            create_first_key: true,
            caches: CacheOptions::default(),
            webhooks: WebhookOptions::default(),
            max_active_batches_per_owner: 0,
            request_rates: None,
            retention_terminal: None,
            retention_sweep_interval: MINUTE,
        }
    }
}

impl ServeOptions {
    /// The defaults of `batchd serve` for `database_url`, listening on random local
    /// ports and stopping without a shutdown delay: what tests start.
    pub fn local(database_url: impl Into<String>) -> ServeOptions {
        ServeOptions {
            database_url: database_url.into(),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            shutdown_delay: Duration::ZERO,
            ..ServeOptions::default()
        }
    }
}

/// batchd's parts, built and wired but not serving: the store (connected and
/// migrated), the watch hub over its event log, and the use cases over both.
pub struct Parts {
    /// The database.
    pub store: Arc<dyn Store>,
    /// This replica's watch streams.
    pub hub: Arc<WatchHub>,
    /// The use cases, which both transports call.
    pub service: Arc<BatchService>,
    /// The webhook use cases.
    pub webhooks: Arc<WebhookService>,
    /// What the readiness checks find, for the request paths to fail fast on.
    pub database: DatabaseStatus,
    /// The admin key created because the database had none.
    pub first_api_key: Option<(ApiKey, ApiKeySecret)>,
}

impl Parts {
    /// Connects and migrates the store, wires the hub and the service, and creates
    /// the first API key on an empty database (if `create_first_key`).
    pub async fn build(options: &ServeOptions) -> anyhow::Result<Parts> {
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
        let database = store.database_status();
        // Every replica seals change feed cursors with one key, kept in the database,
        // so a client resumes on any of them.
        let cursor_key = store
            .server_key(CURSOR_KEY_NAME, &CursorSealer::generate_key_text())
            .await
            .context("cannot read the change feed cursor key")?;
        let cursors = CursorSealer::from_key_text(&cursor_key)
            .context("cannot use the change feed cursor key")?;
        let hub = WatchHub::new(store.clone(), options.watch.clone(), cursors);
        let service = Arc::new(BatchService::new(
            store.clone(),
            hub.clone(),
            options.clock.clone(),
            ServiceOptions {
                policy: options.policy.clone(),
                caches: options.caches.clone(),
                point_reads: PointReadOptions {
                    max_wait: options.store.call_deadline(),
                    database: database.clone(),
                    ..options.point_reads.clone()
                },
                commits: GroupCommitOptions {
                    max_wait: options.store.call_deadline(),
                    database: database.clone(),
                    ..options.commits.clone()
                },
                key_lookups: key_lookups_for(options.store.max_connections),
                max_active_batches_per_owner: options.max_active_batches_per_owner,
                request_rates: options.request_rates,
            },
        ));
        let webhooks = Arc::new(
            WebhookService::new(
                store.clone(),
                options.clock.clone(),
                options.webhooks.clone(),
            )
            .context("cannot set up webhooks")?,
        );
        if !options.webhooks.sealer.is_keyed() {
            tracing::info!(
                "webhook signing secrets are stored unsealed: set BATCHD_WEBHOOK_SECRETS_KEY to seal them"
            );
        }
        let first_api_key = if options.create_first_key {
            service
                .create_first_api_key()
                .await
                .context("cannot create the first API key")?
        } else {
            None
        };
        Ok(Parts {
            store,
            hub,
            service,
            webhooks,
            database,
            first_api_key,
        })
    }
}

/// A running batchd.
pub struct App {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    store: Arc<dyn Store>,
    hub: Arc<WatchHub>,
    service: Arc<BatchService>,
    readiness: Arc<Readiness>,
    first_api_key: Option<(ApiKey, ApiKeySecret)>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<(&'static str, anyhow::Result<()>)>,
    shutdown_delay: Duration,
    shutdown_timeout: Duration,
}

impl App {
    /// Builds batchd's [`Parts`], binds both listeners and starts serving.
    pub async fn start(options: ServeOptions) -> anyhow::Result<App> {
        // Installed before anything is recorded: the facade drops what comes earlier.
        crate::telemetry::metrics::handle();
        let parts = Parts::build(&options).await?;
        let grpc_listener = TcpListener::bind(options.grpc_addr)
            .await
            .with_context(|| format!("cannot listen for gRPC on {}", options.grpc_addr))?;
        let http_listener = TcpListener::bind(options.http_addr)
            .await
            .with_context(|| format!("cannot listen for HTTP on {}", options.http_addr))?;
        App::serve(parts, grpc_listener, http_listener, &options).await
    }

    /// Serves `parts` on the two listeners, and runs health checks and the background
    /// work, until stopped.
    pub async fn serve(
        parts: Parts,
        grpc_listener: TcpListener,
        http_listener: TcpListener,
        options: &ServeOptions,
    ) -> anyhow::Result<App> {
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;

        let (shutdown, _) = watch::channel(false);
        let stopped = |shutdown: &watch::Sender<bool>| {
            let mut stopping = shutdown.subscribe();
            async move { shutdown::requested(&mut stopping).await }
        };

        let (routes, health_reporter) =
            grpc::routes(parts.service.clone(), parts.webhooks.clone())?;
        let readiness = Readiness::new(health_reporter, &grpc::SERVICE_NAMES, grpc::LIVENESS).await;
        let mut tasks = JoinSet::new();

        // The first check runs before the listeners serve, so health is known (and every
        // service registered) from the first probe on.
        let mut checker = HealthChecker::new(
            parts.store.clone(),
            readiness.clone(),
            parts.database,
            options.health_check_interval,
        );
        checker.check().await;
        let checks = checker.run(shutdown.subscribe());
        tasks.spawn(async move {
            checks.await;
            ("health checks", Ok(()))
        });

        spawn_background_work(
            &mut tasks,
            &parts.store,
            &parts.hub,
            (&parts.service, &parts.webhooks),
            options,
            &shutdown,
        );

        let grpc_stopped = stopped(&shutdown);
        tasks.spawn(async move {
            let outcome = tonic::transport::Server::builder()
                .layer(ObserveLayer)
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
        let pool = parts.store.clone();
        let router = rest::router(
            parts.service.clone(),
            parts.webhooks.clone(),
            readiness.clone(),
            Arc::new(move || pool.pool_usage()),
        );
        let router = if options.console {
            router.merge(crate::console::routes())
        } else {
            router
        };
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
            store: parts.store,
            hub: parts.hub,
            service: parts.service,
            readiness,
            first_api_key: parts.first_api_key,
            shutdown,
            tasks,
            shutdown_delay: options.shutdown_delay,
            shutdown_timeout: options.shutdown_timeout,
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

    /// This replica's watch hub, e.g. to see how many batches are watched.
    pub fn hub(&self) -> &Arc<WatchHub> {
        &self.hub
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
            None => self.stop().await,
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

    /// Stops in order, within `shutdown_timeout`: readiness fails at once (gRPC health
    /// NOT_SERVING, `/readyz` 503) while requests are still served for
    /// `shutdown_delay`; then watch streams end with UNAVAILABLE, the listeners close,
    /// in-flight calls finish and the pool closes. Whatever is still running when the
    /// timeout comes (a client that never reads its stream) is abandoned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.shutdown_timeout;
        tracing::info!(delay = ?self.shutdown_delay, "stopping: readiness off");
        self.readiness.start_shutdown().await;
        tokio::time::sleep(self.shutdown_delay.min(self.shutdown_timeout)).await;

        self.hub.stop();
        let _ = self.shutdown.send(true);
        let mut first_error = None;
        loop {
            match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(joined)) => {
                    let outcome = match joined {
                        Ok((_, outcome)) => outcome,
                        Err(e) => Err(anyhow::anyhow!("a task of batchd panicked: {e}")),
                    };
                    if let Err(e) = outcome {
                        first_error.get_or_insert(e);
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        timeout = ?self.shutdown_timeout,
                        "shutdown timeout reached; abandoning open connections"
                    );
                    self.tasks.abort_all();
                    break;
                }
            }
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(remaining, self.store.close()).await;
        tracing::info!("stopped");
        first_error.map_or(Ok(()), Err)
    }
}

/// Revocations are checked at most this often, even with the API key cache off.
/// The name of the change feed cursor key among the server's keys.
const CURSOR_KEY_NAME: &str = "change_feed_cursors";

const MIN_REVOCATION_CHECK: Duration = Duration::from_millis(100);

/// The background work of a replica: the lifecycle timers, the event log's
/// compaction, the watch hub's safety poll, the revocation checks of open watch
/// streams and, when the store has one, the cross-replica notifier. Each runs until
/// the stop signal. Then the webhooks': the dispatcher (change feed to deliveries),
/// this replica's deliverer, and the deletion of finished deliveries past their
/// retention.
/// What other replicas' commits (deletions among them) reach: the hub's watchers, and
/// the service's caches.
struct CommitsElsewhere {
    hub: Arc<WatchHub>,
    service: Arc<BatchService>,
}

impl CommitListener for CommitsElsewhere {
    fn committed_elsewhere(&self, id: &BatchId, committed_at_ms: i64) {
        self.service.committed_elsewhere(id);
        self.hub.committed_elsewhere(id, committed_at_ms);
    }

    fn announcements_lost(&self) {
        self.service.announcements_lost();
        self.hub.announcements_lost();
    }
}

fn spawn_background_work(
    tasks: &mut JoinSet<(&'static str, anyhow::Result<()>)>,
    store: &Arc<dyn Store>,
    hub: &Arc<WatchHub>,
    (service, webhooks): (&Arc<BatchService>, &Arc<WebhookService>),
    options: &ServeOptions,
    shutdown: &watch::Sender<bool>,
) {
    let (cancel_grace, stall_after) = (options.cancel_grace, options.stall_after);
    tasks.spawn(every(
        options.sweep_interval,
        shutdown,
        "applying the lifecycle timers",
        service.clone(),
        move |service| async move {
            // The timers first: a batch due to expire or be cancelled moves rather than
            // being marked stalled. Each failure is logged as its own.
            let moved = service.sweep_due_batches(cancel_grace).await.map(drop);
            if let Some(stall_after) = stall_after
                && let Err(error) = service.mark_stalled_batches(stall_after).await
            {
                tracing::warn!(%error, "marking stalled batches failed");
            }
            moved
        },
    ));

    let retention = options.event_retention;
    tasks.spawn(every(
        options.event_compaction_interval,
        shutdown,
        "event log compaction",
        service.clone(),
        move |service| async move {
            // One after the other, as two writers would contend for SQLite's one lock;
            // each failure logged as its own.
            let compacted = service.compact_event_log(retention).await;
            if let Err(error) = service.forget_expired_idempotency_keys().await {
                tracing::warn!(%error, "deleting expired idempotency keys failed");
            }
            compacted
        },
    ));

    let poller = hub.clone();
    tasks.spawn(async move {
        poller.run_safety_poll().await;
        ("watch safety poll", Ok(()))
    });

    // Open streams of a revoked key end within the time its cached lookup is trusted,
    // the time in which new requests with it are refused.
    tasks.spawn(every(
        options.caches.api_key_ttl.max(MIN_REVOCATION_CHECK),
        shutdown,
        "checking watched API keys for revocation",
        service.clone(),
        move |service| async move { service.end_watches_of_revoked_keys().await },
    ));

    if let Some(retention) = options.retention_terminal {
        tasks.spawn(every(
            options.retention_sweep_interval,
            shutdown,
            "deleting batches past their retention",
            service.clone(),
            move |service| async move {
                service
                    .delete_expired_terminal_batches(retention)
                    .await
                    .map(drop)
            },
        ));
    }

    if let Some(period) = service.request_rate_sweep_period() {
        tasks.spawn(every(
            period,
            shutdown,
            "forgetting idle request rates",
            service.clone(),
            move |service| async move {
                let tracked = service.forget_idle_request_rates();
                metrics::gauge!("batchd_rate_limited_keys").set(tracked as f64);
                Ok(())
            },
        ));
    }

    if let Some(notifier) = store.notifier() {
        hub.publish_to(notifier.clone());
        let listener = Arc::new(CommitsElsewhere {
            hub: hub.clone(),
            service: service.clone(),
        });
        let stopping = shutdown.subscribe();
        tasks.spawn(async move {
            notifier.run(listener, stopping).await;
            ("cross-replica wake-ups", Ok(()))
        });
    }

    // Webhooks.
    let queued = Arc::new(tokio::sync::Notify::new());
    let dispatch = dispatcher::run(
        store.clone(),
        store.clone(),
        hub.commits(),
        queued.clone(),
        options.webhooks.poll,
        shutdown.subscribe(),
    );
    tasks.spawn(async move {
        dispatch.await;
        ("webhook dispatcher", Ok(()))
    });
    let deliverer = Deliverer::new(webhooks, store.clone(), options.clock.clone(), queued);
    let stopping = shutdown.subscribe();
    tasks.spawn(async move {
        deliverer.run(stopping).await;
        ("webhook deliverer", Ok(()))
    });
    tasks.spawn(every(
        options.event_compaction_interval,
        shutdown,
        "deleting finished webhook deliveries",
        webhooks.clone(),
        move |webhooks| async move { webhooks.forget_finished_deliveries().await },
    ));
}

/// Runs `work` on `part` every `period` until the stop signal. A failed run is logged
/// as `name` failing, and the next run comes a period later.
fn every<T, W, Fut, R>(
    period: Duration,
    shutdown: &watch::Sender<bool>,
    name: &'static str,
    part: Arc<T>,
    work: W,
) -> impl Future<Output = (&'static str, anyhow::Result<()>)> + Send + 'static
where
    T: Send + Sync + 'static,
    W: Fn(Arc<T>) -> Fut + Send + 'static,
    Fut: Future<Output = crate::error::Result<R>> + Send,
{
    let mut stopping = shutdown.subscribe();
    async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {
                    if let Err(error) = work(part.clone()).await {
                        tracing::warn!(%error, "{name} failed");
                    }
                }
                _ = shutdown::requested(&mut stopping) => return (name, Ok(())),
            }
        }
    }
}
