//! The `batchd` binary: parse the command line, set up logging, run the command.

use std::process::ExitCode;

use clap::Parser;

use batchd::app::{App, ServeOptions};
use batchd::config::{Cli, Command};
use batchd::{cli, telemetry};

fn main() -> ExitCode {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    // Fewer, larger writes when many watch streams receive an event at once; see
    // .cargo/config.toml for the measurement.
    #[cfg(tokio_unstable)]
    runtime.disable_lifo_slot();
    match runtime.build() {
        Ok(runtime) => runtime.block_on(run()),
        Err(error) => {
            eprintln!("batchd: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    let cli = Cli::parse();
    // Held to the end of main: dropping it flushes the trace exporter.
    let _telemetry = match telemetry::init(cli.log_format.into()) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("batchd: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let success = |()| ExitCode::SUCCESS;
    let outcome = match cli.command {
        Command::Serve(args) => serve(ServeOptions::from(*args)).await.map(success),
        Command::Migrate(database) => cli::migrate::run(&database)
            .await
            .map(success)
            .map_err(Into::into),
        Command::Keys { command } => cli::keys::run(command)
            .await
            .map(success)
            .map_err(Into::into),
        Command::Watch(args) => cli::watch(args).await,
        Command::Webhooks { command } => cli::webhooks::run(command).await.map(success),
        Command::Health(args) => cli::health::run(args).await,
    };
    outcome.unwrap_or_else(|error| {
        eprintln!("batchd: {error:#}");
        ExitCode::FAILURE
    })
}

async fn serve(options: ServeOptions) -> anyhow::Result<()> {
    let console_enabled = options.console;
    let mut app = App::start(options).await?;
    // First: the first key's secret stays the line before the "serving" line, which is
    // the last one (supervisors and tests read up to it and may close stdout after).
    if console_enabled {
        let mut console = app.http_addr();
        if console.ip().is_unspecified() {
            console.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        println!(
            "The console is at http://{console}{}",
            batchd::console::PATH
        );
    }
    if let Some((key, secret)) = app.take_first_api_key() {
        println!(
            "The database had no API key, so batchd created {} (user {}, scope {}).",
            key.id, key.user_id, key.scope
        );
        println!("Its secret is shown only now; send it as `Authorization: Bearer <secret>`:");
        println!("{}", secret.expose());
    }
    println!(
        "batchd is serving gRPC on {} and HTTP on {}",
        app.grpc_addr(),
        app.http_addr()
    );
    app.run_until(shutdown_signal()).await
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops batchd");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
