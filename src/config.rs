//! The command line. Every flag can also be set with the `BATCHD_*` environment
//! variable shown in `--help`.

use std::time::Duration;

use clap::{ArgMatches, Args, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::app::ServeOptions;
use crate::domain::{
    BatchPolicy, CompletionWindow, DEFAULT_COMPLETION_WINDOWS, DEFAULT_ENDPOINTS, Scope,
};
use crate::store::StoreOptions;
use crate::telemetry::LogFormat;

/// batchd: batch jobs in the shape of the OpenAI Batch API, over gRPC and REST.
#[derive(Parser)]
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
#[derive(Subcommand)]
pub enum Command {
    /// Run the gRPC and HTTP servers (migrates the database first).
    Serve(Box<ServeOptions>),
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

/// Where the database is, for the one-shot commands (`serve` has the same flags in
/// [`ServeOptions`]).
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// `sqlite://PATH` (created if missing) or `postgres://USER:PASSWORD@HOST:PORT/DB`.
    #[arg(long, env = "BATCHD_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,

    /// Pool settings.
    #[command(flatten)]
    pub store: StoreOptions,
}

/// The database of `serve` and the one-shot commands when no flag names one.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://batchd.db";

/// The flags of [`BatchPolicy`], which is a domain type and knows nothing of clap.
#[derive(Args)]
struct BatchPolicyArgs {
    /// Accepted `endpoint` values of new batches, comma-separated.
    #[arg(long, env = "BATCHD_ENDPOINTS", value_delimiter = ',', default_values = DEFAULT_ENDPOINTS)]
    endpoints: Vec<String>,

    /// Accepted `completion_window` values of new batches, comma-separated durations.
    #[arg(long, env = "BATCHD_COMPLETION_WINDOWS", value_delimiter = ',', default_values = DEFAULT_COMPLETION_WINDOWS, value_parser = CompletionWindow::parse)]
    completion_windows: Vec<CompletionWindow>,
}

impl From<BatchPolicyArgs> for BatchPolicy {
    fn from(args: BatchPolicyArgs) -> BatchPolicy {
        BatchPolicy {
            endpoints: args.endpoints,
            completion_windows: args.completion_windows,
        }
    }
}

impl From<BatchPolicy> for BatchPolicyArgs {
    fn from(policy: BatchPolicy) -> BatchPolicyArgs {
        BatchPolicyArgs {
            endpoints: policy.endpoints,
            completion_windows: policy.completion_windows,
        }
    }
}

/// So that [`ServeOptions`] flattens the policy it hands to the service as it is.
impl Args for BatchPolicy {
    fn group_id() -> Option<clap::Id> {
        BatchPolicyArgs::group_id()
    }

    fn augment_args(command: clap::Command) -> clap::Command {
        BatchPolicyArgs::augment_args(command)
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        BatchPolicyArgs::augment_args_for_update(command)
    }
}

impl FromArgMatches for BatchPolicy {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        BatchPolicyArgs::from_arg_matches(matches).map(BatchPolicy::from)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        let mut args = BatchPolicyArgs::from(self.clone());
        args.update_from_arg_matches(matches)?;
        *self = args.into();
        Ok(())
    }
}

/// The values the flags of `T` take when none is given and no `BATCHD_*` variable is
/// set: what the options structs' `Default` returns, so each default is written once,
/// in the flag's `default_value`.
pub fn defaults<T: Args + FromArgMatches>() -> T {
    // Without their variables, so the environment of the process does not leak in.
    let command = T::augment_args(clap::Command::new("defaults")).mut_args(|arg| arg.env(None));
    let parsed = command
        .try_get_matches_from(["defaults"])
        .and_then(|matches| T::from_arg_matches(&matches));
    // Every flag of the options structs has a default that parses, which the test
    // `the_options_defaults_are_what_serve_parses_with_no_flags` checks for each.
    parsed.unwrap_or_else(|error| panic!("the defaults of the flags do not parse: {error}"))
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
    use crate::cache::CacheOptions;
    use crate::watch::WatchOptions;
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

    /// `batchd serve` with no flags and no `BATCHD_*` variable.
    fn serve_with_no_flags() -> ServeOptions {
        let command = Cli::command()
            .mut_args(|arg| arg.env(None))
            .mut_subcommand("serve", |serve| serve.mut_args(|arg| arg.env(None)));
        let matches = command.try_get_matches_from(["batchd", "serve"]).unwrap();
        let Command::Serve(options) = Cli::from_arg_matches(&matches).unwrap().command else {
            panic!("not serve")
        };
        *options
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
        assert_eq!(StoreOptions::default(), serve.store);
        assert_eq!(WatchOptions::default(), serve.watch);
        assert_eq!(CacheOptions::default(), serve.caches);
        let policy = BatchPolicy::default();
        assert_eq!(policy.endpoints, serve.policy.endpoints);
        assert_eq!(policy.completion_windows, serve.policy.completion_windows);
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
