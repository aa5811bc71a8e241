//! `batchd watch BATCH_ID`: follows one batch over `WatchBatch` with a live progress
//! bar, resuming with `after_version` whenever the stream breaks, until the batch ends.
//! Without a batch id, `watch_all` follows the change feed.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::{BearerAuth, authorized_channel};
use crate::config::WatchArgs;
use crate::proto::batchd::v1::{self as pb, batch_service_client::BatchServiceClient};

pub(super) type Client = BatchServiceClient<InterceptedService<Channel, BearerAuth>>;

/// The exit code for a batch that ended in `status`.
pub fn exit_code(status: pb::BatchStatus) -> ExitCode {
    match status {
        pb::BatchStatus::Completed => ExitCode::SUCCESS,
        pb::BatchStatus::Failed => ExitCode::from(2),
        pb::BatchStatus::Expired => ExitCode::from(3),
        pb::BatchStatus::Cancelled => ExitCode::from(4),
        _ => ExitCode::FAILURE,
    }
}

/// Runs `batchd watch BATCH_ID`: follows one batch; the exit code tells how it ended.
pub async fn run(args: WatchArgs, batch_id: String) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args).await?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{spinner} {msg:12} [{bar:40}] {pos}/{len} ({percent}%) {elapsed}",
        )
        .context("progress bar template")?
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));

    let mut last: Option<pb::Batch> = None;
    let mut broken_since: Option<tokio::time::Instant> = None;
    loop {
        let request = pb::WatchBatchRequest {
            batch_id: batch_id.clone(),
            after_version: last.as_ref().map(|b| b.version),
        };
        let outcome = match client.watch_batch(request).await {
            Ok(response) => follow(response.into_inner(), &bar, &mut last, &mut broken_since).await,
            Err(status) => Err(status),
        };
        match outcome {
            Ok(()) => break,
            Err(status) if retryable(&status) => {
                if let Err(error) = keep_reconnecting(&mut broken_since, &args, &status) {
                    bar.abandon();
                    return Err(error);
                }
                bar.set_message("reconnecting");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(status) => {
                bar.abandon();
                bail!("{}", status.message());
            }
        }
    }
    let batch = last.context("the stream ended before sending the batch")?;
    bar.finish_with_message(
        batch
            .status()
            .as_str_name()
            .trim_start_matches("BATCH_STATUS_")
            .to_ascii_lowercase(),
    );
    let counts = batch.request_counts.unwrap_or_default();
    println!(
        "{} {}: {} completed, {} failed, of {}",
        batch.id,
        status_name(&batch),
        counts.completed,
        counts.failed,
        counts.total
    );
    Ok(exit_code(batch.status()))
}

/// Reads one stream to its end, updating the bar and `last`.
async fn follow(
    mut stream: tonic::Streaming<pb::WatchBatchResponse>,
    bar: &ProgressBar,
    last: &mut Option<pb::Batch>,
    broken_since: &mut Option<tokio::time::Instant>,
) -> Result<(), Status> {
    while let Some(message) = stream.message().await? {
        *broken_since = None;
        let Some(batch) = message.batch else { continue };
        let counts = batch.request_counts.unwrap_or_default();
        bar.set_length(counts.total.max(0) as u64);
        bar.set_position((counts.completed + counts.failed).max(0) as u64);
        let changed = last.as_ref().is_none_or(|l| l.status != batch.status);
        bar.set_message(status_name(&batch));
        if changed {
            // Printed through the bar so that it shows above it, and on stdout even
            // when stderr is not a terminal (the bar is hidden then).
            bar.suspend(|| println!("{} {}", batch.id, status_name(&batch)));
        }
        *last = Some(batch);
    }
    Ok(())
}

pub(super) fn status_name(batch: &pb::Batch) -> String {
    batch
        .status()
        .as_str_name()
        .trim_start_matches("BATCH_STATUS_")
        .to_ascii_lowercase()
}

/// Fails once the stream has been broken for longer than `--reconnect-for`.
pub(super) fn keep_reconnecting(
    broken_since: &mut Option<tokio::time::Instant>,
    args: &WatchArgs,
    status: &Status,
) -> anyhow::Result<()> {
    let since = *broken_since.get_or_insert_with(tokio::time::Instant::now);
    if since.elapsed() > args.reconnect_for {
        bail!(
            "lost the stream for longer than {:?}: {}",
            args.reconnect_for,
            status.message()
        );
    }
    Ok(())
}

/// Whether a broken stream is worth resuming (the server or the network went away).
pub(super) fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
    )
}

pub(super) async fn connect(args: &WatchArgs) -> anyhow::Result<Client> {
    let (channel, auth) = authorized_channel(&args.server, &args.api_key)?;
    Ok(BatchServiceClient::with_interceptor(channel, auth))
}
