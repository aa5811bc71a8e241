//! The command line. Every flag can also be set with the `BATCHD_*` environment
//! variable shown in `--help`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::app::ServeOptions;
use crate::cache::CacheOptions;
use crate::clock::SystemClock;
use crate::domain::{
    BatchPolicy, CompletionWindow, DEFAULT_COMPLETION_WINDOWS, DEFAULT_ENDPOINTS, Scope,
};
use crate::store::StoreOptions;
use crate::telemetry::LogFormat;
use crate::watch::WatchOptions;

/// batchd: batch jobs in the shape of the OpenAI Batch API, over gRPC and REST.
#[derive(Debug, Parser)]
#[command(name = "batchd", version, about, propagate_version = true)]
pub struct Cli {
    /// How log lines look (logs go to stderr; filter them with RUST_LOG).
    #[arg(long, global = true, env = "BATCHD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
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
}

/// Where the database is.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// `sqlite://PATH` (created if missing) or `postgres://USER:PASSWORD@HOST:PORT/DB`.
    #[arg(
        long,
        env = "BATCHD_DATABASE_URL",
        default_value = "sqlite://batchd.db"
    )]
    pub database_url: String,

    /// Most open database connections.
    #[arg(long, env = "BATCHD_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,

    /// How long a request waits for a database connection before failing with
    /// UNAVAILABLE.
    #[arg(long, env = "BATCHD_DATABASE_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub database_acquire_timeout: Duration,

    /// Most queries reading batches by id that run at once. Reads that arrive while
    /// they run are fetched together by the next one, which spares the database a
    /// round trip per read under load.
    #[arg(long, env = "BATCHD_DATABASE_POINT_READ_QUERIES", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub database_point_read_queries: u32,
}

impl DatabaseArgs {
    /// The pool settings.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            max_connections: self.database_max_connections,
            acquire_timeout: self.database_acquire_timeout,
            point_read_queries: self.database_point_read_queries as usize,
        }
    }
}

/// `batchd serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The database.
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Address of the gRPC listener (port 0 picks a free port).
    #[arg(long, env = "BATCHD_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// Address of the HTTP listener: REST API and probes (port 0 picks a free port).
    #[arg(long, env = "BATCHD_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Accepted `endpoint` values of new batches, comma-separated.
    #[arg(long, env = "BATCHD_ENDPOINTS", value_delimiter = ',', default_values_t = DEFAULT_ENDPOINTS.map(String::from))]
    pub endpoints: Vec<String>,

    /// Accepted `completion_window` values of new batches, comma-separated durations.
    #[arg(long, env = "BATCHD_COMPLETION_WINDOWS", value_delimiter = ',', default_values_t = DEFAULT_COMPLETION_WINDOWS.map(String::from), value_parser = parse_window)]
    pub completion_windows: Vec<String>,

    /// How often the database is checked for the health service and `/readyz`.
    #[arg(long, env = "BATCHD_HEALTH_CHECK_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub health_check_interval: Duration,

    /// A watch stream gets a heartbeat after this long without a change.
    #[arg(long, env = "BATCHD_WATCH_HEARTBEAT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub watch_heartbeat: Duration,

    /// Most open watch streams per API key, per replica.
    #[arg(long, env = "BATCHD_MAX_WATCHES_PER_KEY", default_value_t = 100)]
    pub max_watches_per_key: usize,

    /// Every watched batch is re-read at least this often, in case a cross-replica
    /// notification was lost.
    #[arg(long, env = "BATCHD_WATCH_SAFETY_POLL", default_value = "3s", value_parser = humantime::parse_duration)]
    pub watch_safety_poll: Duration,

    /// How long the event log keeps versions older than each batch's latest; a watch
    /// resuming from before that gets a snapshot.
    #[arg(long, env = "BATCHD_EVENT_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub event_retention: Duration,

    /// How often the event log is compacted.
    #[arg(long, env = "BATCHD_EVENT_COMPACTION_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub event_compaction_interval: Duration,

    /// A batch `cancelling` for longer than this moves to `cancelled` by itself.
    #[arg(long, env = "BATCHD_CANCEL_GRACE", default_value = "10m", value_parser = humantime::parse_duration)]
    pub cancel_grace: Duration,

    /// How often the lifecycle timers (expiry, cancel grace) are applied.
    #[arg(long, env = "BATCHD_SWEEP_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,

    /// After SIGTERM/SIGINT, readiness fails at once but requests are still served for
    /// this long, so load balancers stop sending new ones.
    #[arg(long, env = "BATCHD_SHUTDOWN_DELAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,

    /// The process exits within this long after SIGTERM/SIGINT, even if a client never
    /// reads its stream.
    #[arg(long, env = "BATCHD_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Create an admin key, printed once on stdout, when the database has no key at
    /// all (the quick start). Deployments that create keys on purpose turn it off.
    #[arg(long, env = "BATCHD_CREATE_FIRST_KEY", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_first_key: bool,

    /// How long an API key lookup is remembered: a revoked key stops working within
    /// this time, and its open watch streams end within it too (each replica checks
    /// the keys of its open streams this often). 0 checks the database on every call.
    #[arg(long, env = "BATCHD_API_KEY_CACHE_TTL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub api_key_cache_ttl: Duration,

    /// Terminal batches kept in memory (they never change, so reads need no database).
    #[arg(long, env = "BATCHD_TERMINAL_CACHE_ENTRIES", default_value_t = 20_000)]
    pub terminal_cache_entries: usize,

    /// Most bytes of terminal batches kept in memory (batch text counted in bytes).
    #[arg(long, env = "BATCHD_TERMINAL_CACHE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub terminal_cache_bytes: u64,

    /// Recently written batches kept in memory, so a write usually needs one database
    /// round trip (a stale entry is caught by the commit's version check).
    #[arg(long, env = "BATCHD_LATEST_CACHE_ENTRIES", default_value_t = 20_000)]
    pub latest_cache_entries: usize,

    /// Most bytes of recently written batches kept in memory.
    #[arg(long, env = "BATCHD_LATEST_CACHE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub latest_cache_bytes: u64,
}

fn parse_window(text: &str) -> Result<String, String> {
    CompletionWindow::parse(text).map(|w| w.text)
}

impl ServeArgs {
    /// Everything `serve` needs, with the system clock.
    pub fn serve_options(&self) -> ServeOptions {
        ServeOptions {
            database_url: self.database.database_url.clone(),
            store: self.database.store_options(),
            grpc_addr: self.grpc_addr,
            http_addr: self.http_addr,
            policy: self.batch_policy(),
            health_check_interval: self.health_check_interval,
            clock: Arc::new(SystemClock),
            watch: WatchOptions {
                heartbeat: self.watch_heartbeat,
                max_watches_per_key: self.max_watches_per_key,
                safety_poll: self.watch_safety_poll,
                ..WatchOptions::default()
            },
            event_retention: self.event_retention,
            event_compaction_interval: self.event_compaction_interval,
            cancel_grace: self.cancel_grace,
            sweep_interval: self.sweep_interval,
            shutdown_delay: self.shutdown_delay,
            shutdown_timeout: self.shutdown_timeout,
            create_first_key: self.create_first_key,
            caches: CacheOptions {
                api_key_ttl: self.api_key_cache_ttl,
                terminal_batches: self.terminal_cache_entries,
                terminal_bytes: self.terminal_cache_bytes,
                latest_batches: self.latest_cache_entries,
                latest_bytes: self.latest_cache_bytes,
            },
        }
    }

    /// What new batches may ask for.
    pub fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy {
            endpoints: self.endpoints.clone(),
            completion_windows: self
                .completion_windows
                .iter()
                // Each value was already checked by `parse_window`.
                .filter_map(|w| CompletionWindow::parse(w).ok())
                .collect(),
        }
    }
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
    /// The batch to follow.
    pub batch_id: String,

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
    use clap::CommandFactory;

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

    #[test]
    fn serve_defaults_are_the_documented_ones() {
        let cli = Cli::try_parse_from(["batchd", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.database.database_url, "sqlite://batchd.db");
        assert_eq!(args.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(args.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(args.batch_policy().completion_windows.len(), 2);
        assert_eq!(args.batch_policy().endpoints.len(), 8);
    }
}
