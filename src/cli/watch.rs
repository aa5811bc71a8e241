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
    let bar = ProgressBar::new(0).with_style(bar_style(false)?);
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
    bar.set_prefix(status_name(&batch));
    bar.finish_with_message("");
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
        let had_total = bar.length().is_some_and(|length| length > 0);
        if (counts.total > 0) != had_total {
            // A bar needs a total: until the worker reports one, only the count.
            if let Ok(style) = bar_style(counts.total > 0) {
                bar.set_style(style);
            }
        }
        bar.set_length(counts.total.max(0) as u64);
        bar.set_position((counts.completed + counts.failed).max(0) as u64);
        bar.set_prefix(status_name(&batch));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs() as i64);
        bar.set_message(pace(&batch, now));
        // Printed through the bar so that it shows above it, and on stdout even when
        // stderr is not a terminal (the bar is hidden then).
        for line in news(last.as_ref(), &batch) {
            bar.suspend(|| println!("{line}"));
        }
        *last = Some(batch);
    }
    Ok(())
}

/// The bar's look: with a total, a bar and its percentage; without one (none
/// reported yet), the count alone, so that it never reads `0/0 (100%)`.
fn bar_style(with_total: bool) -> anyhow::Result<ProgressStyle> {
    Ok(ProgressStyle::with_template(bar_template(with_total))
        .context("progress bar template")?
        .progress_chars("=> "))
}

fn bar_template(with_total: bool) -> &'static str {
    if with_total {
        "{spinner} {prefix:12} [{bar:40}] {pos}/{len} ({percent}%) {elapsed} {msg}"
    } else {
        "{spinner} {prefix:12} {pos} done, total not known yet {elapsed} {msg}"
    }
}

/// What is worth a line of its own when `batch` follows `before`: a new status, the
/// batch stalling (with how long it had not changed), and its moving again.
pub(super) fn news(before: Option<&pb::Batch>, batch: &pb::Batch) -> Vec<String> {
    let mut lines = Vec::new();
    if before.is_none_or(|b| b.status != batch.status) {
        lines.push(format!("{} {}", batch.id, status_name(batch)));
    }
    let was_stalled = before.is_some_and(|b| b.stalled_at.is_some());
    match batch.stalled_at {
        Some(at) if !was_stalled => {
            let quiet = before
                .map(|b| at - b.updated_at.unwrap_or(b.created_at))
                .filter(|&quiet| quiet > 0);
            lines.push(match quiet {
                Some(quiet) => format!(
                    "{} stalled: no change for {}",
                    batch.id,
                    short_duration(quiet)
                ),
                None => format!("{} stalled", batch.id),
            });
        }
        None if was_stalled => lines.push(format!("{} moving again", batch.id)),
        _ => {}
    }
    lines
}

/// The pace of `batch` at `now` (Unix seconds): its rate and when it should be done, or
/// how long it has been stalled; empty when there is neither.
pub(super) fn pace(batch: &pb::Batch, now: i64) -> String {
    if let Some(at) = batch.stalled_at {
        return format!("stalled for {}", short_duration((now - at).max(0)));
    }
    let Some(rate) = batch.progress_rate else {
        return String::new();
    };
    match batch.estimated_completion_at {
        Some(eta) => format!(
            "{rate:.1}/s, done in ~{}",
            short_duration((eta - now).max(0))
        ),
        None => format!("{rate:.1}/s"),
    }
}

/// `seconds` as a person reads it: `45s`, `3m`, `2h 5m`, `3d 4h`.
fn short_duration(seconds: i64) -> String {
    let (days, hours, minutes) = (seconds / 86_400, seconds / 3_600 % 24, seconds / 60 % 60);
    if seconds < 60 {
        format!("{seconds}s")
    } else if seconds < 3_600 {
        format!("{minutes}m")
    } else if seconds < 86_400 {
        format!("{}h {minutes}m", seconds / 3_600)
    } else {
        format!("{days}d {hours}h")
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(edit: impl FnOnce(&mut pb::Batch)) -> pb::Batch {
        let mut batch = pb::Batch {
            id: "batch_1".into(),
            status: pb::BatchStatus::InProgress.into(),
            created_at: 1_000,
            updated_at: Some(1_100),
            ..Default::default()
        };
        edit(&mut batch);
        batch
    }

    #[test]
    fn the_pace_is_the_rate_and_the_time_left_or_how_long_it_has_been_stalled() {
        assert_eq!(pace(&batch(|_| {}), 1_200), "");
        let running = batch(|b| {
            b.progress_rate = Some(12.5);
            b.estimated_completion_at = Some(1_380);
        });
        assert_eq!(pace(&running, 1_200), "12.5/s, done in ~3m");
        let stalled = batch(|b| b.stalled_at = Some(1_200));
        assert_eq!(pace(&stalled, 1_200 + 14 * 60), "stalled for 14m");
    }

    #[test]
    fn a_stall_and_its_end_are_news_beside_status_changes() {
        let before = batch(|_| {});
        let stalled = batch(|b| b.stalled_at = Some(1_700));
        assert_eq!(
            news(Some(&before), &stalled),
            ["batch_1 stalled: no change for 10m"]
        );
        assert_eq!(news(Some(&stalled), &before), ["batch_1 moving again"]);
        assert_eq!(news(None, &before), ["batch_1 in_progress"]);
        assert!(news(Some(&before), &before).is_empty());
    }

    #[test]
    fn without_a_total_the_bar_shows_the_count_alone_never_a_percentage() {
        let without = bar_template(false);
        assert!(without.contains("{pos} done, total not known yet"));
        assert!(!without.contains("{len}") && !without.contains("{percent}"));
        assert!(bar_template(true).contains("{pos}/{len} ({percent}%)"));
        for with_total in [false, true] {
            bar_style(with_total).expect("a valid template");
        }
    }

    #[test]
    fn durations_read_as_people_say_them() {
        for (seconds, text) in [
            (0, "0s"),
            (59, "59s"),
            (60, "1m"),
            (3_599, "59m"),
            (3_600, "1h 0m"),
            (7_500, "2h 5m"),
            (90_000, "1d 1h"),
        ] {
            assert_eq!(short_duration(seconds), text);
        }
    }
}
