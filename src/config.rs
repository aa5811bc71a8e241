//! The command line, every subcommand and flag of it, and nothing below reads clap:
//! each flag set converts into the plain options struct of the layer that uses it
//! ([`ServeArgs`] into [`ServeOptions`], which holds the store's, the watch hub's, the
//! caches' and the webhooks' options). Every flag can also be set with the `BATCHD_*`
//! environment variable shown in `--help`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use humantime::Duration as HumanDuration;

use crate::app::ServeOptions;
use crate::cache::CacheOptions;
use crate::domain::webhooks::{DestinationPolicy, RetrySchedule, SecretSealer};
use crate::domain::{
    BatchPolicy, CompletionWindow, DEFAULT_COMPLETION_WINDOWS, DEFAULT_ENDPOINTS, Scope,
};
use crate::request_rates::{MAX_RATE, MIN_RATE, RequestRateOptions};
use crate::store::{self, GroupCommitOptions, PointReadOptions, StoreOptions};
use crate::telemetry::LogFormat;
use crate::watch::WatchOptions;
use crate::webhooks::service::WebhookOptions;

/// batchd: batch jobs in the shape of the OpenAI Batch API, over gRPC and REST.
#[derive(Parser)]
#[command(name = "batchd", version, about, propagate_version = true)]
pub struct Cli {
    /// How log lines look (logs go to stderr; filter them with RUST_LOG).
    #[arg(long, global = true, env = "BATCHD_LOG_FORMAT", value_enum, default_value_t = LogFormatArg::Text)]
    pub log_format: LogFormatArg,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(format: LogFormatArg) -> LogFormat {
        match format {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Run the gRPC and HTTP servers (migrates the database first).
    Serve(Box<ServeArgs>),
    /// Apply pending database migrations and exit.
    Migrate(DatabaseArgs),
    /// Ask a batchd's gRPC health service whether it is SERVING (exit 0) or not (1);
    /// what the Helm chart's `helm test` pod runs.
    Health(HealthArgs),
    /// Follow a batch live: a progress bar of completed + failed over total, until it
    /// ends. Exit code 0 when it completed, 2 failed, 3 expired, 4 cancelled, 1 error.
    Watch(WatchArgs),
    /// Manage API keys.
    Keys {
        /// What to do with keys.
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage webhook endpoints (OpenAI's webhook API) of the API key's owner, over
    /// gRPC: create, list, delete, rotate, test, deliveries.
    Webhooks {
        /// What to do with endpoints.
        #[command(subcommand)]
        command: WebhooksCommand,
    },
}

/// Which batchd to call, with which key.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// batchd's gRPC address.
    #[arg(long, env = "BATCHD_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,

    /// The API key to call with.
    #[arg(long, env = "BATCHD_API_KEY", hide_env_values = true)]
    pub api_key: String,
}

/// `batchd webhooks ...`.
#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Create an endpoint; its signing secret is printed once, as the last line.
    Create {
        /// The server and key.
        #[command(flatten)]
        api: ApiArgs,
        /// A name, 1 to 256 characters.
        #[arg(long, env = "BATCHD_WEBHOOK_NAME")]
        name: String,
        /// Where deliveries go (`https://`, reaching a public address).
        #[arg(long, env = "BATCHD_WEBHOOK_URL")]
        url: String,
        /// Event types, comma-separated (`batchd webhooks event-types` lists them).
        #[arg(
            long,
            env = "BATCHD_WEBHOOK_EVENT_TYPES",
            value_delimiter = ',',
            required = true
        )]
        event_types: Vec<String>,
    },
    /// List the key owner's endpoints.
    List {
        /// The server and key.
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete an endpoint and its deliveries.
    Delete {
        /// The server and key.
        #[command(flatten)]
        api: ApiArgs,
        /// The endpoint's id (`we_...`).
        endpoint_id: String,
    },
    /// Give an endpoint a new signing secret, printed once, as the last line.
    Rotate {
        /// The server and key.
        #[command(flatten)]
        api: ApiArgs,
        /// The endpoint's id (`we_...`).
        endpoint_id: String,
        /// Keep signing with the old secret too for 24 hours.
        #[arg(long, env = "BATCHD_WEBHOOK_KEEP_OLD_SECRET")]
        keep_old_secret: bool,
    },
    /// Send one signed sample event to an endpoint now.
    Test {
        /// The server and key.
        #[command(flatten)]
        api: ApiArgs,
        /// The endpoint's id (`we_...`).
        endpoint_id: String,
        /// The sample event's type.
        #[arg(
            long,
            env = "BATCHD_WEBHOOK_EVENT_TYPE",
            default_value = "batch.completed"
        )]
        event_type: String,
    },
    /// An endpoint's latest deliveries, newest first.
    Deliveries {
        /// The server and key.
        #[command(flatten)]
        api: ApiArgs,
        /// The endpoint's id (`we_...`).
        endpoint_id: String,
        /// How many, 1 to 100.
        #[arg(long, env = "BATCHD_WEBHOOK_DELIVERIES_LIMIT", default_value_t = 20)]
        limit: i64,
    },
}

/// Where the database is: for `serve` and the one-shot commands alike.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// `sqlite://PATH` (created if missing) or `postgres://USER:PASSWORD@HOST:PORT/DB`.
    #[arg(long, env = "BATCHD_DATABASE_URL", default_value = store::DEFAULT_DATABASE_URL)]
    pub database_url: String,

    /// Pool settings.
    #[command(flatten)]
    pool: PoolArgs,
}

impl DatabaseArgs {
    /// The pool settings the flags ask for.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            max_connections: self.pool.database_max_connections,
            acquire_timeout: self.pool.database_acquire_timeout.into(),
        }
    }
}

/// The `--database-*` pool flags: [`StoreOptions`].
#[derive(Debug, Clone, Args)]
struct PoolArgs {
    /// Most open database connections.
    #[arg(
        long,
        env = "BATCHD_DATABASE_MAX_CONNECTIONS",
        default_value_t = StoreOptions::default().max_connections
    )]
    database_max_connections: u32,

    /// How long a request waits for a database connection before failing with
    /// UNAVAILABLE.
    // Also the deadline of each whole database call and PostgreSQL's
    // `statement_timeout`: see `StoreOptions::call_deadline`.
    #[arg(
        long,
        env = "BATCHD_DATABASE_ACQUIRE_TIMEOUT",
        default_value_t = StoreOptions::default().acquire_timeout.into()
    )]
    database_acquire_timeout: HumanDuration,
}

/// A count of at least 1 (a `u32` on the command line).
fn at_least_one() -> impl clap::builder::TypedValueParser<Value = usize> {
    clap::builder::TypedValueParser::map(clap::value_parser!(u32).range(1..), |n| n as usize)
}

/// The flags of the coalesced reads and grouped commits: [`PointReadOptions`] and
/// [`GroupCommitOptions`].
#[derive(Debug, Clone, Args)]
struct RoundArgs {
    /// Most queries reading batches by id that run at once. Reads that arrive while
    /// they run are fetched together by the next one, which spares the database a
    /// round trip per read under load.
    #[arg(
        long,
        env = "BATCHD_DATABASE_POINT_READ_QUERIES",
        default_value_t = PointReadOptions::default().concurrent_queries,
        value_parser = at_least_one()
    )]
    database_point_read_queries: usize,

    /// Most rounds of batch changes committing at once. Changes that arrive while they
    /// run are committed together by the next round, in one transaction (one statement
    /// on PostgreSQL), which spares the database a commit per change under load; the
    /// round first reads, in one query, the batches of its changes that this replica's
    /// memory lacks.
    #[arg(
        long,
        env = "BATCHD_DATABASE_COMMIT_ROUNDS",
        default_value_t = GroupCommitOptions::default().concurrent_rounds,
        value_parser = at_least_one()
    )]
    database_commit_rounds: usize,

    /// Most batch changes committed by one round.
    #[arg(
        long,
        env = "BATCHD_DATABASE_COMMIT_ROUND_SIZE",
        default_value_t = GroupCommitOptions::default().max_round,
        value_parser = clap::builder::TypedValueParser::map(
            clap::value_parser!(u32).range(1..=1_000),
            |changes| changes as usize
        )
    )]
    database_commit_round_size: usize,
}

/// `batchd serve`'s flags, which fill [`ServeOptions`]. Every default is the one the
/// options structs' `Default` gives, so it is written once, beside the field it sets.
#[derive(Args)]
pub struct ServeArgs {
    /// The database.
    #[command(flatten)]
    database: DatabaseArgs,

    /// Coalesced reads and grouped commits.
    #[command(flatten)]
    rounds: RoundArgs,

    /// Address of the gRPC listener (port 0 picks a free port).
    #[arg(long, env = "BATCHD_GRPC_ADDR", default_value_t = ServeOptions::default().grpc_addr)]
    grpc_addr: SocketAddr,

    /// Address of the HTTP listener: REST API and probes (port 0 picks a free port).
    #[arg(long, env = "BATCHD_HTTP_ADDR", default_value_t = ServeOptions::default().http_addr)]
    http_addr: SocketAddr,

    /// What new batches may ask for.
    #[command(flatten)]
    policy: BatchPolicyArgs,

    /// How often the database is checked for the health service and `/readyz`.
    #[arg(long, env = "BATCHD_HEALTH_CHECK_INTERVAL", default_value_t = ServeOptions::default().health_check_interval.into())]
    health_check_interval: HumanDuration,

    /// Watch streams: heartbeats, limits, safety poll.
    #[command(flatten)]
    watch: WatchStreamArgs,

    /// How long the event log keeps versions older than each batch's latest; a watch
    /// resuming from before that gets a snapshot.
    #[arg(long, env = "BATCHD_EVENT_RETENTION", default_value_t = ServeOptions::default().event_retention.into())]
    event_retention: HumanDuration,

    /// How often the event log is compacted.
    #[arg(long, env = "BATCHD_EVENT_COMPACTION_INTERVAL", default_value_t = ServeOptions::default().event_compaction_interval.into())]
    event_compaction_interval: HumanDuration,

    /// A batch `cancelling` for longer than this moves to `cancelled` by itself.
    #[arg(long, env = "BATCHD_CANCEL_GRACE", default_value_t = ServeOptions::default().cancel_grace.into())]
    cancel_grace: HumanDuration,

    /// How often the lifecycle timers (expiry, cancel grace) are applied and stalls
    /// marked.
    #[arg(long, env = "BATCHD_SWEEP_INTERVAL", default_value_t = ServeOptions::default().sweep_interval.into())]
    sweep_interval: HumanDuration,

    /// A batch not final (validating, in_progress, finalizing, cancelling) that has not
    /// changed for this long is marked stalled: a new version with `stalled_at`, a
    /// `batch.stalled` webhook. 0 turns stall detection off.
    #[arg(
        long,
        env = "BATCHD_STALL_AFTER",
        value_name = "DURATION",
        default_value_t = ServeOptions::default().stall_after.unwrap_or_default().into(),
        value_parser = parse_stall_after
    )]
    stall_after: HumanDuration,

    /// After SIGTERM/SIGINT, readiness fails at once but requests are still served for
    /// this long, so load balancers stop sending new ones.
    #[arg(long, env = "BATCHD_SHUTDOWN_DELAY", default_value_t = ServeOptions::default().shutdown_delay.into())]
    shutdown_delay: HumanDuration,

    /// The process exits within this long after SIGTERM/SIGINT, even if a client never
    /// reads its stream.
    #[arg(long, env = "BATCHD_SHUTDOWN_TIMEOUT", default_value_t = ServeOptions::default().shutdown_timeout.into())]
    shutdown_timeout: HumanDuration,

    /// Serve the web console at `/console/` of the HTTP port (`/` redirects there).
    /// It is static files calling the REST API with the key the operator enters; off,
    /// both paths are 404.
    #[arg(long, env = "BATCHD_CONSOLE", default_value_t = ServeOptions::default().console, action = clap::ArgAction::Set)]
    console: bool,

    /// Create an admin key, printed once on stdout, when the database has no key at
    /// all (the quick start). Deployments that create keys on purpose turn it off.
    #[arg(long, env = "BATCHD_CREATE_FIRST_KEY", default_value_t = ServeOptions::default().create_first_key, action = clap::ArgAction::Set)]
    create_first_key: bool,

    /// In-memory caches: API keys, terminal batches, latest versions.
    #[command(flatten)]
    caches: CacheArgs,

    /// Webhooks: where they may go, retries, limits, the secrets key.
    #[command(flatten)]
    webhooks: WebhookArgs,

    /// Many tenants: active-batch quotas, request rates, retention.
    #[command(flatten)]
    tenants: TenantArgs,
}

/// The flags that keep tenants within bounds: how many batches each may hold open,
/// how fast each key may call, how long finished batches are kept.
#[derive(Debug, Clone, Args)]
struct TenantArgs {
    /// Most active (not terminal) batches one owner may have; a create over it is 429
    /// `active_batch_limit_reached` (gRPC RESOURCE_EXHAUSTED), exact across replicas.
    /// 0: no limit.
    #[arg(
        long,
        env = "BATCHD_MAX_ACTIVE_BATCHES_PER_OWNER",
        value_name = "N",
        default_value_t = ServeOptions::default().max_active_batches_per_owner,
        value_parser = clap::value_parser!(u32).range(0..=10_000_000)
    )]
    max_active_batches_per_owner: u32,

    /// Requests per second each API key may send to this replica (decimals allowed;
    /// N replicas allow N times the rate); over it, 429 `rate_limit_exceeded` with
    /// Retry-After (gRPC RESOURCE_EXHAUSTED with RetryInfo). 0: no limit.
    #[arg(long, env = "BATCHD_RATE_LIMIT_PER_KEY", value_name = "RATE", default_value_t = 0.0, value_parser = parse_rate)]
    rate_limit_per_key: f64,

    /// Requests a key may send at once after being idle. 0: the rate rounded up.
    #[arg(
        long,
        env = "BATCHD_RATE_LIMIT_BURST",
        value_name = "N",
        default_value_t = 0,
        requires = "rate_limit_per_key",
        value_parser = clap::value_parser!(u32).range(0..=MAX_RATE as i64)
    )]
    rate_limit_burst: u32,

    /// Batches terminal (completed, failed, expired, cancelled) for longer than this
    /// are deleted, with a `deleted` change feed event each. Unset: kept forever.
    #[arg(long, env = "BATCHD_RETENTION_TERMINAL", value_name = "DURATION", value_parser = parse_retention)]
    retention_terminal: Option<HumanDuration>,

    /// How often batches past --retention-terminal are looked for (at least 1s).
    #[arg(
        long,
        env = "BATCHD_RETENTION_SWEEP_INTERVAL",
        default_value_t = ServeOptions::default().retention_sweep_interval.into(),
        value_parser = parse_sweep_interval
    )]
    retention_sweep_interval: HumanDuration,
}

/// A request rate: 0 (off), or a number of requests per second from [`MIN_RATE`] to
/// [`MAX_RATE`].
fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of requests per second"))?;
    // NaN compares false with everything, so the range check below refuses it too.
    if !(rate == 0.0 || (MIN_RATE..=MAX_RATE).contains(&rate)) {
        return Err(format!(
            "{rate} is not 0 (off) nor a rate from {MIN_RATE} to {MAX_RATE} requests per second"
        ));
    }
    Ok(rate)
}

/// How often the retention sweep runs: at least a second (each sweep is a database
/// transaction, and 0 would run them back to back).
fn parse_sweep_interval(text: &str) -> Result<HumanDuration, String> {
    let interval: HumanDuration = text.parse().map_err(|e| format!("{e}"))?;
    if Duration::from(interval) < Duration::from_secs(1) {
        return Err(format!("{interval} is shorter than a second"));
    }
    Ok(interval)
}

/// A stall time: 0 (off), or from a second to 100 years.
fn parse_stall_after(text: &str) -> Result<HumanDuration, String> {
    const MOST: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let stall_after: HumanDuration = text.parse().map_err(|e| format!("{e}"))?;
    let duration: Duration = stall_after.into();
    if duration.is_zero() {
        return Ok(stall_after);
    }
    if duration < Duration::from_secs(1) {
        return Err(format!(
            "{stall_after} is shorter than a second; use 0 to turn stall detection off"
        ));
    }
    if duration > MOST {
        return Err(format!("{stall_after} is longer than 100 years"));
    }
    Ok(stall_after)
}

/// A retention: at least a second, at most 100 years.
fn parse_retention(text: &str) -> Result<HumanDuration, String> {
    const MOST: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let retention: HumanDuration = text.parse().map_err(|e| format!("{e}"))?;
    let duration: Duration = retention.into();
    if duration < Duration::from_secs(1) {
        return Err(format!(
            "{retention} is shorter than a second; leave it unset to keep terminal batches forever"
        ));
    }
    if duration > MOST {
        return Err(format!("{retention} is longer than 100 years"));
    }
    Ok(retention)
}

impl From<ServeArgs> for ServeOptions {
    fn from(args: ServeArgs) -> ServeOptions {
        ServeOptions {
            store: args.database.store_options(),
            database_url: args.database.database_url,
            point_reads: PointReadOptions {
                concurrent_queries: args.rounds.database_point_read_queries,
                ..PointReadOptions::default()
            },
            commits: GroupCommitOptions {
                concurrent_rounds: args.rounds.database_commit_rounds,
                max_round: args.rounds.database_commit_round_size,
                ..GroupCommitOptions::default()
            },
            grpc_addr: args.grpc_addr,
            http_addr: args.http_addr,
            policy: BatchPolicy {
                endpoints: args.policy.endpoints,
                completion_windows: args.policy.completion_windows,
            },
            health_check_interval: args.health_check_interval.into(),
            watch: WatchOptions {
                heartbeat: args.watch.watch_heartbeat.into(),
                max_watches_per_key: args.watch.max_watches_per_key,
                safety_poll: args.watch.watch_safety_poll.into(),
                ..WatchOptions::default()
            },
            event_retention: args.event_retention.into(),
            event_compaction_interval: args.event_compaction_interval.into(),
            cancel_grace: args.cancel_grace.into(),
            sweep_interval: args.sweep_interval.into(),
            stall_after: Some(Duration::from(args.stall_after)).filter(|d| !d.is_zero()),
            shutdown_delay: args.shutdown_delay.into(),
            shutdown_timeout: args.shutdown_timeout.into(),
            console: args.console,
            create_first_key: args.create_first_key,
            caches: CacheOptions {
                api_key_ttl: args.caches.api_key_cache_ttl.into(),
                terminal_batches: args.caches.terminal_cache_entries,
                terminal_bytes: args.caches.terminal_cache_bytes,
                latest_batches: args.caches.latest_cache_entries,
                latest_bytes: args.caches.latest_cache_bytes,
            },
            webhooks: WebhookOptions {
                policy: DestinationPolicy {
                    allow_http: args.webhooks.webhook_allow_http,
                    allow_private_networks: args.webhooks.webhook_allow_private_networks,
                },
                retries: args.webhooks.webhook_retry_schedule,
                attempt_timeout: args.webhooks.webhook_timeout.into(),
                disable_after: args.webhooks.webhook_disable_after.into(),
                concurrency: args.webhooks.webhook_concurrency,
                concurrency_per_endpoint: args.webhooks.webhook_concurrency_per_endpoint,
                concurrency_per_owner: args.webhooks.webhook_concurrency_per_owner,
                poll: args.webhooks.webhook_poll.into(),
                sealer: args.webhooks.webhook_secrets_key,
                max_endpoints_per_owner: args.webhooks.webhook_max_endpoints_per_owner,
                delivery_retention: args.webhooks.webhook_delivery_retention.into(),
            },
            max_active_batches_per_owner: args.tenants.max_active_batches_per_owner,
            request_rates: RequestRateOptions::from_flags(
                args.tenants.rate_limit_per_key,
                args.tenants.rate_limit_burst,
            ),
            retention_terminal: args.tenants.retention_terminal.map(Into::into),
            retention_sweep_interval: args.tenants.retention_sweep_interval.into(),
            ..ServeOptions::default()
        }
    }
}

/// The flags of [`BatchPolicy`].
#[derive(Args)]
struct BatchPolicyArgs {
    /// Accepted `endpoint` values of new batches, comma-separated.
    #[arg(long, env = "BATCHD_ENDPOINTS", value_delimiter = ',', default_values = DEFAULT_ENDPOINTS)]
    endpoints: Vec<String>,

    /// Accepted `completion_window` values of new batches, comma-separated durations.
    #[arg(long, env = "BATCHD_COMPLETION_WINDOWS", value_delimiter = ',', default_values = DEFAULT_COMPLETION_WINDOWS, value_parser = CompletionWindow::parse)]
    completion_windows: Vec<CompletionWindow>,
}

/// The flags of [`WatchOptions`].
#[derive(Args)]
struct WatchStreamArgs {
    /// A watch stream gets a heartbeat after this long without a change.
    #[arg(
        long,
        env = "BATCHD_WATCH_HEARTBEAT",
        default_value_t = WatchOptions::default().heartbeat.into()
    )]
    watch_heartbeat: HumanDuration,

    /// Most open watch streams per API key, per replica.
    #[arg(long, env = "BATCHD_MAX_WATCHES_PER_KEY", default_value_t = WatchOptions::default().max_watches_per_key)]
    max_watches_per_key: usize,

    /// Every watched batch is re-read at least this often, in case a cross-replica
    /// notification was lost.
    #[arg(
        long,
        env = "BATCHD_WATCH_SAFETY_POLL",
        default_value_t = WatchOptions::default().safety_poll.into()
    )]
    watch_safety_poll: HumanDuration,
}

/// The flags of [`CacheOptions`].
#[derive(Args)]
struct CacheArgs {
    /// How long an API key lookup is remembered: a revoked key stops working within
    /// this time, and its open watch streams end within it too (each replica checks
    /// the keys of its open streams this often). 0 checks the database on every call.
    #[arg(
        long,
        env = "BATCHD_API_KEY_CACHE_TTL",
        default_value_t = CacheOptions::default().api_key_ttl.into()
    )]
    api_key_cache_ttl: HumanDuration,

    /// Terminal batches kept in memory (they never change, so reads need no database).
    #[arg(
        long,
        env = "BATCHD_TERMINAL_CACHE_ENTRIES",
        default_value_t = CacheOptions::default().terminal_batches
    )]
    terminal_cache_entries: usize,

    /// Most bytes of terminal batches kept in memory (batch text counted in bytes).
    #[arg(
        long,
        env = "BATCHD_TERMINAL_CACHE_BYTES",
        default_value_t = CacheOptions::default().terminal_bytes
    )]
    terminal_cache_bytes: u64,

    /// Recently written batches kept in memory, so a write usually needs one database
    /// round trip (a stale entry is caught by the commit's version check).
    #[arg(
        long,
        env = "BATCHD_LATEST_CACHE_ENTRIES",
        default_value_t = CacheOptions::default().latest_batches
    )]
    latest_cache_entries: usize,

    /// Most bytes of recently written batches kept in memory.
    #[arg(
        long,
        env = "BATCHD_LATEST_CACHE_BYTES",
        default_value_t = CacheOptions::default().latest_bytes
    )]
    latest_cache_bytes: u64,
}

/// The flags of [`WebhookOptions`].
#[derive(Args)]
struct WebhookArgs {
    /// Let webhook endpoints be plain `http://` URLs, not only `https://`.
    #[arg(long, env = "BATCHD_WEBHOOK_ALLOW_HTTP")]
    webhook_allow_http: bool,

    /// Let webhooks reach addresses inside private, loopback and link-local networks
    /// (refused by default, when saved and at every delivery).
    #[arg(long, env = "BATCHD_WEBHOOK_ALLOW_PRIVATE_NETWORKS")]
    webhook_allow_private_networks: bool,

    /// Waits before each retry after a failed attempt, comma-separated (Standard
    /// Webhooks' schedule; each gets up to 10% jitter, and a longer `Retry-After`
    /// wins). An empty list means one attempt only.
    #[arg(
        long,
        env = "BATCHD_WEBHOOK_RETRY_SCHEDULE",
        default_value_t = WebhookOptions::default().retries,
        value_parser = |text: &str| RetrySchedule::parse("--webhook-retry-schedule", text)
    )]
    webhook_retry_schedule: RetrySchedule,

    /// Longest one delivery attempt may take.
    #[arg(long, env = "BATCHD_WEBHOOK_TIMEOUT", default_value_t = WebhookOptions::default().attempt_timeout.into())]
    webhook_timeout: HumanDuration,

    /// An endpoint whose every delivery failed for longer than this is disabled (an
    /// update enables it again).
    #[arg(long, env = "BATCHD_WEBHOOK_DISABLE_AFTER", default_value_t = WebhookOptions::default().disable_after.into())]
    webhook_disable_after: HumanDuration,

    /// Most delivery attempts in flight on one replica.
    #[arg(
        long,
        env = "BATCHD_WEBHOOK_CONCURRENCY",
        default_value_t = WebhookOptions::default().concurrency
    )]
    webhook_concurrency: usize,

    /// Most delivery attempts in flight to one endpoint from one replica, so that one
    /// slow receiver cannot hold every slot.
    #[arg(
        long,
        env = "BATCHD_WEBHOOK_CONCURRENCY_PER_ENDPOINT",
        default_value_t = WebhookOptions::default().concurrency_per_endpoint
    )]
    webhook_concurrency_per_endpoint: usize,

    /// Most delivery attempts in flight to the endpoints of one owner from one
    /// replica, so that one tenant's hanging receivers hold only its share and other
    /// tenants' deliveries go on. Test deliveries count too.
    #[arg(
        long,
        env = "BATCHD_WEBHOOK_CONCURRENCY_PER_OWNER",
        default_value_t = WebhookOptions::default().concurrency_per_owner
    )]
    webhook_concurrency_per_owner: usize,

    /// How often a replica looks for due deliveries besides being woken by its own
    /// dispatcher (retries, and deliveries other replicas queued), and its dispatcher
    /// reads the change feed besides being woken by commits.
    #[arg(long, env = "BATCHD_WEBHOOK_POLL", default_value_t = WebhookOptions::default().poll.into())]
    webhook_poll: HumanDuration,

    /// 32 bytes in base64 (`openssl rand -base64 32`) that seal endpoints' signing
    /// secrets in the database; every replica needs the same. Without it secrets are
    /// stored as plain text.
    // No key is the empty text, which the sealer reads as none.
    #[arg(
        long,
        env = "BATCHD_WEBHOOK_SECRETS_KEY",
        default_value = "",
        hide_default_value = true,
        hide_env_values = true,
        value_parser = |text: &str| SecretSealer::new("--webhook-secrets-key", Some(text))
    )]
    webhook_secrets_key: SecretSealer,

    /// Most endpoints one owner may have: its own, and apart from them the all-owners
    /// endpoints of admin keys with its user id.
    #[arg(
        long,
        env = "BATCHD_WEBHOOK_MAX_ENDPOINTS_PER_OWNER",
        default_value_t = WebhookOptions::default().max_endpoints_per_owner
    )]
    webhook_max_endpoints_per_owner: i64,

    /// How long finished deliveries stay listed.
    #[arg(long, env = "BATCHD_WEBHOOK_DELIVERY_RETENTION", default_value_t = WebhookOptions::default().delivery_retention.into())]
    webhook_delivery_retention: HumanDuration,
}

/// `batchd health`.
#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// batchd's gRPC address.
    #[arg(long, env = "BATCHD_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,

    /// The health service name to check: empty for the whole server (readiness),
    /// `liveness` for the process alone.
    #[arg(long, env = "BATCHD_HEALTH_SERVICE", default_value = "")]
    pub service: String,

    /// How long to wait for an answer.
    #[arg(long, env = "BATCHD_HEALTH_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// `batchd watch`.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// The batch to follow. Without one, every batch the key may see is followed (as
    /// with `--all`).
    #[arg(conflicts_with_all = ["all", "status", "job_id", "metadata", "created_after"])]
    pub batch_id: Option<String>,

    /// Follow every batch the key may see (the change feed), one line and one progress
    /// bar per active batch, until interrupted.
    #[arg(long, env = "BATCHD_WATCH_ALL")]
    pub all: bool,

    /// With `--all`: only batches in this status (repeat for several; the variable takes
    /// them comma-separated).
    #[arg(
        long,
        value_name = "STATUS",
        env = "BATCHD_WATCH_STATUS",
        value_delimiter = ','
    )]
    pub status: Vec<String>,

    /// With `--all`: only batches of this job.
    #[arg(long, env = "BATCHD_WATCH_JOB_ID")]
    pub job_id: Option<String>,

    /// With `--all`: only batches with this metadata pair, as KEY=VALUE (repeat for
    /// several; the variable takes one).
    #[arg(long, value_name = "KEY=VALUE", env = "BATCHD_WATCH_METADATA")]
    pub metadata: Vec<String>,

    /// With `--all`: only batches created at or after this Unix second.
    #[arg(long, env = "BATCHD_WATCH_CREATED_AFTER")]
    pub created_after: Option<i64>,

    /// batchd's gRPC address.
    #[arg(long, env = "BATCHD_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,

    /// The API key to watch with.
    #[arg(long, env = "BATCHD_API_KEY", hide_env_values = true)]
    pub api_key: String,

    /// How long to keep reconnecting (resuming where the stream broke) before giving up.
    #[arg(long, env = "BATCHD_WATCH_RECONNECT_FOR", default_value = "60s", value_parser = humantime::parse_duration)]
    pub reconnect_for: Duration,
}

/// `batchd keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; its secret is printed once, as the last line of stdout.
    Create {
        /// The database.
        #[command(flatten)]
        database: DatabaseArgs,
        /// The owner of the batches created with the key.
        #[arg(long, env = "BATCHD_KEY_USER")]
        user: String,
        /// What the key may do.
        #[arg(long, env = "BATCHD_KEY_SCOPE", value_enum, default_value_t = ScopeArg::Batches)]
        scope: ScopeArg,
    },
    /// List keys (never their secrets).
    List {
        /// The database.
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Revoke a key: it authenticates nothing from then on.
    Revoke {
        /// The database.
        #[command(flatten)]
        database: DatabaseArgs,
        /// The key's id, as `keys list` shows it (`key_...`).
        key_id: String,
    },
}

/// The scope of a new key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScopeArg {
    /// Create, read, list and cancel the owner's own batches.
    Batches,
    /// Update and read any batch (for the executors).
    Worker,
    /// Everything.
    Admin,
}

impl From<ScopeArg> for Scope {
    fn from(scope: ScopeArg) -> Scope {
        match scope {
            ScopeArg::Batches => Scope::Batches,
            ScopeArg::Worker => Scope::Worker,
            ScopeArg::Admin => Scope::Admin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_a_batchd_environment_variable() {
        fn check(command: &clap::Command) {
            for arg in command.get_arguments() {
                let is_flag = arg.get_long().is_some();
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if is_flag && !builtin {
                    let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                    assert!(
                        env.as_deref().is_some_and(|e| e.starts_with("BATCHD_")),
                        "--{} of `{}` has no BATCHD_* variable",
                        arg.get_long().unwrap_or_default(),
                        command.get_name()
                    );
                }
            }
            command.get_subcommands().for_each(check);
        }
        check(&Cli::command());
    }

    /// `batchd serve` with no flags and no `BATCHD_*` variable.
    fn serve_with_no_flags() -> ServeOptions {
        let command = Cli::command()
            .mut_args(|arg| arg.env(None))
            .mut_subcommand("serve", |serve| serve.mut_args(|arg| arg.env(None)));
        let matches = command.try_get_matches_from(["batchd", "serve"]).unwrap();
        let Command::Serve(args) = Cli::from_arg_matches(&matches).unwrap().command else {
            panic!("not serve")
        };
        ServeOptions::from(*args)
    }

    #[test]
    fn serve_defaults_are_the_documented_ones() {
        let options = serve_with_no_flags();
        assert_eq!(options.database_url, "sqlite://batchd.db");
        assert_eq!(options.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(options.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(options.policy.completion_windows.len(), 2);
        assert_eq!(options.policy.endpoints.len(), 8);
        assert_eq!(options.store.max_connections, 16);
        assert_eq!(options.watch.heartbeat, Duration::from_secs(15));
        assert_eq!(options.caches.terminal_batches, 20_000);
    }

    #[test]
    fn the_options_defaults_are_what_serve_parses_with_no_flags() {
        let serve = serve_with_no_flags();
        let defaults = ServeOptions::default();
        assert_eq!(defaults.database_url, serve.database_url);
        assert_eq!(defaults.store, serve.store);
        assert_eq!(
            defaults.point_reads.concurrent_queries,
            serve.point_reads.concurrent_queries
        );
        assert_eq!(
            defaults.commits.concurrent_rounds,
            serve.commits.concurrent_rounds
        );
        assert_eq!(defaults.commits.max_round, serve.commits.max_round);
        assert_eq!(defaults.grpc_addr, serve.grpc_addr);
        assert_eq!(defaults.http_addr, serve.http_addr);
        assert_eq!(defaults.watch, serve.watch);
        assert_eq!(defaults.caches, serve.caches);
        let policy = BatchPolicy::default();
        assert_eq!(policy.endpoints, serve.policy.endpoints);
        assert_eq!(policy.completion_windows, serve.policy.completion_windows);
        for (default, parsed) in [
            (defaults.health_check_interval, serve.health_check_interval),
            (defaults.event_retention, serve.event_retention),
            (
                defaults.event_compaction_interval,
                serve.event_compaction_interval,
            ),
            (defaults.cancel_grace, serve.cancel_grace),
            (defaults.sweep_interval, serve.sweep_interval),
            (defaults.shutdown_delay, serve.shutdown_delay),
            (defaults.shutdown_timeout, serve.shutdown_timeout),
        ] {
            assert_eq!(default, parsed);
        }
        assert_eq!(defaults.console, serve.console);
        assert_eq!(defaults.create_first_key, serve.create_first_key);
        let (webhooks, parsed) = (defaults.webhooks, serve.webhooks);
        assert_eq!(webhooks.policy, parsed.policy);
        assert_eq!(webhooks.retries, parsed.retries);
        assert_eq!(webhooks.attempt_timeout, parsed.attempt_timeout);
        assert_eq!(webhooks.disable_after, parsed.disable_after);
        assert_eq!(webhooks.bounds(), parsed.bounds());
        assert_eq!(webhooks.poll, parsed.poll);
        assert_eq!(webhooks.sealer.is_keyed(), parsed.sealer.is_keyed());
        assert_eq!(
            webhooks.max_endpoints_per_owner,
            parsed.max_endpoints_per_owner
        );
        assert_eq!(webhooks.delivery_retention, parsed.delivery_retention);
        assert_eq!(
            defaults.max_active_batches_per_owner,
            serve.max_active_batches_per_owner
        );
        assert_eq!(defaults.request_rates, serve.request_rates);
        assert_eq!(defaults.retention_terminal, serve.retention_terminal);
        assert_eq!(
            defaults.retention_sweep_interval,
            serve.retention_sweep_interval
        );
    }

    /// `batchd serve` with `flags` and no `BATCHD_*` variable: its options, or clap's
    /// error text.
    fn serve_with(flags: &[&str]) -> Result<ServeOptions, String> {
        let command = Cli::command()
            .mut_args(|arg| arg.env(None))
            .mut_subcommand("serve", |serve| serve.mut_args(|arg| arg.env(None)));
        let matches = command
            .try_get_matches_from(["batchd", "serve"].iter().chain(flags))
            .map_err(|e| e.to_string())?;
        let Command::Serve(args) = Cli::from_arg_matches(&matches).unwrap().command else {
            panic!("not serve")
        };
        Ok(ServeOptions::from(*args))
    }

    #[test]
    fn tenant_limits_are_off_by_default_and_parse_their_flags() {
        let off = serve_with(&[]).unwrap();
        assert_eq!(off.max_active_batches_per_owner, 0);
        assert_eq!(off.request_rates, None);
        assert_eq!(off.retention_terminal, None);
        let on = serve_with(&[
            "--max-active-batches-per-owner",
            "100",
            "--rate-limit-per-key",
            "0.5",
            "--retention-terminal",
            "30d",
        ])
        .unwrap();
        assert_eq!(on.max_active_batches_per_owner, 100);
        assert_eq!(
            on.request_rates,
            Some(RequestRateOptions {
                per_second: 0.5,
                burst: 1
            })
        );
        assert_eq!(
            on.retention_terminal,
            Some(Duration::from_secs(30 * 24 * 3600))
        );
    }

    #[test]
    fn stall_detection_is_on_after_ten_minutes_by_default_and_zero_turns_it_off() {
        assert_eq!(
            serve_with(&[]).unwrap().stall_after,
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            serve_with(&["--stall-after", "0"]).unwrap().stall_after,
            None
        );
        assert_eq!(
            serve_with(&["--stall-after", "90s"]).unwrap().stall_after,
            Some(Duration::from_secs(90))
        );
        for bad in ["500ms", "200years", "soon", "-1m"] {
            let error = serve_with(&[&format!("--stall-after={bad}")])
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(error.contains("--stall-after"), "{bad}: {error}");
        }
    }

    #[test]
    fn tenant_limits_out_of_range_are_refused_naming_the_flag() {
        for (flags, flag) in [
            (&["--rate-limit-per-key=-1"][..], "--rate-limit-per-key"),
            (&["--rate-limit-per-key", "NaN"], "--rate-limit-per-key"),
            (&["--rate-limit-per-key", "2000000"], "--rate-limit-per-key"),
            (&["--rate-limit-per-key", "many"], "--rate-limit-per-key"),
            (&["--rate-limit-per-key", "1e-300"], "--rate-limit-per-key"),
            (
                &["--retention-sweep-interval", "0s"],
                "--retention-sweep-interval",
            ),
            (
                &["--rate-limit-per-key", "5", "--rate-limit-burst", "2000000"],
                "--rate-limit-burst",
            ),
            (&["--rate-limit-burst", "5"], "--rate-limit-per-key"),
            (&["--retention-terminal", "0s"], "--retention-terminal"),
            (
                &["--retention-terminal", "200years"],
                "--retention-terminal",
            ),
            (&["--retention-terminal", "soon"], "--retention-terminal"),
            (
                &["--max-active-batches-per-owner=-1"],
                "--max-active-batches-per-owner",
            ),
            (
                &["--max-active-batches-per-owner", "20000000"],
                "--max-active-batches-per-owner",
            ),
        ] {
            let error = serve_with(flags)
                .err()
                .unwrap_or_else(|| panic!("{flags:?} accepted"));
            assert!(error.contains(flag), "{flags:?}: {error}");
        }
    }

    #[test]
    fn local_options_are_the_serve_defaults_on_random_ports_without_a_shutdown_delay() {
        let serve = serve_with_no_flags();
        let local = ServeOptions::local("sqlite::memory:");
        assert_eq!(local.database_url, "sqlite::memory:");
        assert_eq!(local.grpc_addr.port(), 0);
        assert_eq!(local.http_addr.port(), 0);
        assert_eq!(local.shutdown_delay, Duration::ZERO);
        assert_eq!(local.store, serve.store);
        assert_eq!(local.watch, serve.watch);
        assert_eq!(local.caches, serve.caches);
        assert_eq!(local.health_check_interval, serve.health_check_interval);
        assert_eq!(local.event_retention, serve.event_retention);
        assert_eq!(local.shutdown_timeout, serve.shutdown_timeout);
        assert_eq!(local.create_first_key, serve.create_first_key);
    }

    #[test]
    fn the_one_shot_commands_and_serve_open_the_same_database() {
        let command = Cli::command();
        let url = |name: &str| {
            let subcommand = command.find_subcommand(name).unwrap();
            let arg = subcommand
                .get_arguments()
                .find(|arg| arg.get_id() == "database_url")
                .unwrap();
            (
                arg.get_env().map(ToOwned::to_owned),
                arg.get_default_values().to_vec(),
                arg.get_help().map(ToString::to_string),
            )
        };
        assert_eq!(url("serve"), url("migrate"));
    }
}
