//! `batchd watch --all`: follows every batch the key may see over `WatchBatches`, one
//! progress bar per active batch (indicatif's `MultiProgress`) and one line per status
//! change, until interrupted. It starts with the initial state, resumes after the last
//! cursor whenever the stream breaks, and lists again when the cursor has been
//! compacted away.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tonic::{Code, Status};

use super::watch::{Client, connect, news, pace, retryable, status_name};
use crate::config::WatchArgs;
use crate::domain::BatchStatus;
use crate::proto::batchd::v1 as pb;

/// The bars of the batches being followed, each with the version it shows.
struct Board {
    bars: MultiProgress,
    active: HashMap<String, (ProgressBar, pb::Batch)>,
}

impl Board {
    /// Shows `batch`: its bar moves, a status change is printed, a batch that ended
    /// (or left the filter) leaves the board.
    fn show(&mut self, batch: &pb::Batch, left_filter: bool) {
        let before = self.active.get(&batch.id).map(|(_, shown)| shown.clone());
        let counts = batch.request_counts.unwrap_or_default();
        let with_total = counts.total > 0;
        let (bar, shown) = self.active.entry(batch.id.clone()).or_insert_with(|| {
            let bar = self.bars.add(ProgressBar::new(0));
            bar.set_prefix(batch.id.clone());
            (bar, batch.clone())
        });
        if before.is_none() || bar.length().is_some_and(|l| l > 0) != with_total {
            // A bar needs a total: until the worker reports one, only the count.
            if let Ok(style) = bar_style(with_total) {
                bar.set_style(style);
            }
        }
        bar.set_length(counts.total.max(0) as u64);
        bar.set_position((counts.completed + counts.failed).max(0) as u64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs() as i64);
        bar.set_message(format!("{:12} {}", status_name(batch), pace(batch, now)));
        *shown = batch.clone();
        for line in news(before.as_ref(), batch) {
            // Printed through the bars so that it shows above them, and on stdout even
            // when stderr is not a terminal (the bars are hidden then).
            let _ = self.bars.println(&line);
            if self.bars.is_hidden() {
                println!("{line}");
            }
        }
        if (has_ended(batch) || left_filter)
            && let Some((bar, _)) = self.active.remove(&batch.id)
        {
            bar.finish_and_clear();
            self.bars.remove(&bar);
        }
    }

    /// A batch was deleted: said once, and its bar (were it still shown) removed.
    fn deleted(&mut self, id: &str) {
        let line = format!("{id} deleted");
        let _ = self.bars.println(&line);
        if self.bars.is_hidden() {
            println!("{line}");
        }
        if let Some((bar, _)) = self.active.remove(id) {
            bar.finish_and_clear();
            self.bars.remove(&bar);
        }
    }

    fn clear(&mut self) {
        for (_, (bar, _)) in self.active.drain() {
            bar.finish_and_clear();
            self.bars.remove(&bar);
        }
    }
}

/// A bar's look: with a total, a bar and its percentage; without one (none reported
/// yet), the count alone, so that it never reads `0/0 (100%)`.
fn bar_style(with_total: bool) -> anyhow::Result<ProgressStyle> {
    let template = if with_total {
        "{prefix:38} [{bar:30}] {pos}/{len} ({percent}%) {msg}"
    } else {
        "{prefix:38} {pos} done, total not known yet {msg}"
    };
    Ok(ProgressStyle::with_template(template)
        .context("progress bar template")?
        .progress_chars("=> "))
}

/// Whether the batch is in a terminal status.
fn has_ended(batch: &pb::Batch) -> bool {
    matches!(
        batch.status(),
        pb::BatchStatus::Completed
            | pb::BatchStatus::Failed
            | pb::BatchStatus::Expired
            | pb::BatchStatus::Cancelled
    )
}

/// Runs `batchd watch --all` until interrupted (exit 0) or an error that resuming
/// cannot cure.
pub async fn run(args: WatchArgs) -> anyhow::Result<ExitCode> {
    let request = filters(&args)?;
    let mut client = connect(&args).await?;
    let mut board = Board {
        bars: MultiProgress::new(),
        active: HashMap::new(),
    };
    let mut cursor: Option<String> = None;
    let mut broken_since: Option<tokio::time::Instant> = None;
    loop {
        let mut next = request.clone();
        if cursor.is_none() {
            // Listing (again): what the board shows comes from this listing alone.
            board.clear();
        }
        next.send_initial_state = cursor.is_none();
        next.after_cursor = cursor.clone();
        let followed = tokio::select! {
            followed = follow(&mut client, next, &mut board, &mut cursor, &mut broken_since) => followed,
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        };
        let status = match followed {
            Err(status) => status,
            // A server (or a proxy) ended the stream without an error: resume, after a
            // pause, as for any break.
            Ok(()) => Status::unavailable("the stream ended"),
        };
        if status.code() == Code::FailedPrecondition && cursor.is_some() {
            // The cursor was compacted away: list again.
            let _ = board
                .bars
                .println("the change feed moved past our cursor: listing again");
            board.clear();
            cursor = None;
            continue;
        }
        if !retryable(&status) {
            board.clear();
            bail!("{}", status.message());
        }
        if let Err(error) = super::watch::keep_reconnecting(&mut broken_since, &args, &status) {
            board.clear();
            return Err(error);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// Reads one stream until it ends, showing every batch and keeping the last cursor.
async fn follow(
    client: &mut Client,
    request: pb::WatchBatchesRequest,
    board: &mut Board,
    cursor: &mut Option<String>,
    broken_since: &mut Option<tokio::time::Instant>,
) -> Result<(), Status> {
    let mut stream = client.watch_batches(request).await?.into_inner();
    while let Some(message) = stream.message().await? {
        *broken_since = None;
        let kind = message.r#type();
        if kind == pb::FeedEventType::Deleted {
            board.deleted(&message.batch_id);
        }
        if let Some(batch) = &message.batch {
            // The initial state shows the active batches only, not every one that ended.
            let ended_before = kind == pb::FeedEventType::Initial && has_ended(batch);
            if !ended_before {
                board.show(batch, kind == pb::FeedEventType::LeftFilter);
            }
        }
        if !message.cursor.is_empty() {
            *cursor = Some(message.cursor);
        }
    }
    Ok(())
}

/// The filters of the flags, checked as far as the client can (the server checks the
/// rest and names what is wrong).
fn filters(args: &WatchArgs) -> anyhow::Result<pb::WatchBatchesRequest> {
    let mut statuses = Vec::new();
    for name in &args.status {
        let status = BatchStatus::from_name(name).with_context(|| {
            format!(
                "--status `{name}` is not a status; use {}",
                BatchStatus::ALL.map(BatchStatus::as_str).join(", ")
            )
        })?;
        statuses.push(pb::BatchStatus::from(status) as i32);
    }
    let mut metadata = HashMap::new();
    for pair in &args.metadata {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--metadata `{pair}` is not KEY=VALUE"))?;
        metadata.insert(key.to_owned(), value.to_owned());
    }
    Ok(pb::WatchBatchesRequest {
        statuses,
        job_id: args.job_id.clone(),
        created_after: args.created_after,
        metadata,
        ..Default::default()
    })
}
