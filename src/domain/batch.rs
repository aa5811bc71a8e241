//! The batch object and the changes it can go through. Pure: every timestamp comes in
//! as an argument, so the state machine is tested without a clock or a database.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::api_key::Caller;
use super::ids::BatchId;
use super::input::{BatchUpdate, NewBatch};
use super::status::BatchStatus;
use super::values::{
    BatchErrorEntry, OutputExpiresAfter, ProgressEstimate, RequestCounts, UnixSeconds, Usage,
};
use crate::error::{Error, Result};

/// The length of `text` inside a JSON string: `"` and `\` and the short escapes take
/// 2 bytes, other control characters 6 (`\u0001`), everything else its UTF-8 bytes.
fn json_bytes(text: &str) -> usize {
    text.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0x00..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

/// The batch object. Field names follow the documented JSON object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// `batch_` + 128 random bits.
    pub id: BatchId,
    /// The API endpoint each request goes to.
    pub endpoint: String,
    /// Errors met while processing; empty means none (`null` on the wire).
    pub errors: Vec<BatchErrorEntry>,
    /// The file holding the requests.
    pub input_file_id: String,
    /// The completion window as the client gave it, e.g. `24h`.
    pub completion_window: String,
    /// Where the batch is in its lifecycle.
    pub status: BatchStatus,
    /// The file with the successful outputs.
    pub output_file_id: Option<String>,
    /// The file with the failed requests' outputs.
    pub error_file_id: Option<String>,
    /// When it was created.
    pub created_at: UnixSeconds,
    /// When it entered `in_progress`.
    pub in_progress_at: Option<UnixSeconds>,
    /// When its completion window ends: `created_at` + the window.
    pub expires_at: Option<UnixSeconds>,
    /// When it entered `finalizing`.
    pub finalizing_at: Option<UnixSeconds>,
    /// When it entered `completed`.
    pub completed_at: Option<UnixSeconds>,
    /// When it entered `failed`.
    pub failed_at: Option<UnixSeconds>,
    /// When it entered `expired`.
    pub expired_at: Option<UnixSeconds>,
    /// When it entered `cancelling`.
    pub cancelling_at: Option<UnixSeconds>,
    /// When it entered `cancelled`.
    pub cancelled_at: Option<UnixSeconds>,
    /// Progress counters.
    pub request_counts: RequestCounts,
    /// Client key/value pairs; `None` when the client gave none.
    pub metadata: Option<BTreeMap<String, String>>,
    /// The model, once a worker reports it.
    pub model: Option<String>,
    /// Token usage, once a worker reports it.
    pub usage: Option<Usage>,
    /// Optional grouping id.
    pub job_id: Option<String>,
    /// Optional note.
    pub remark: Option<String>,
    /// When the output and error files expire, as the client asked on create.
    pub output_expires_after: Option<OutputExpiresAfter>,
    /// The owner.
    pub user_id: String,
    /// The API key that created the batch.
    pub api_key_id: String,
    /// 1 at creation, +1 on every committed change.
    pub version: i64,
    /// When the batch last changed; `None` until its first change.
    pub updated_at: Option<UnixSeconds>,
    /// When batchd marked the batch stalled: it had not changed for the stall time
    /// (`--stall-after`). Only the marking version has it; the next change clears it.
    pub stalled_at: Option<UnixSeconds>,
    /// How fast its requests are finishing, while it is `in_progress`.
    pub progress: Option<ProgressEstimate>,
}

/// Builds `Target { fields... }` with the fields that every layer's flat batch struct
/// (proto, REST JSON, stored row) shares with [`Batch`] by name and type copied from
/// `source`: the lifecycle timestamps, the version, and the ids and texts. The one
/// list of them, so that no conversion spells them out by hand; `cloned from` clones
/// the texts of a borrowed source instead of moving them.
macro_rules! with_batch_fields {
    ($($target:ident)::+ { $($fields:tt)* }, from $source:ident) => {
        with_batch_fields!(@build [] $($target)::+ { $($fields)* } $source)
    };
    ($($target:ident)::+ { $($fields:tt)* }, cloned from $source:ident) => {
        with_batch_fields!(@build [cloned] $($target)::+ { $($fields)* } $source)
    };
    (
        @build [$($how:ident)?]
        $($target:ident)::+ { $($field:ident $(: $value:expr)?),* $(,)? } $source:ident
    ) => {
        $($target)::+ {
            $($field $(: $value)?,)*
            created_at: $source.created_at,
            in_progress_at: $source.in_progress_at,
            expires_at: $source.expires_at,
            finalizing_at: $source.finalizing_at,
            completed_at: $source.completed_at,
            failed_at: $source.failed_at,
            expired_at: $source.expired_at,
            cancelling_at: $source.cancelling_at,
            cancelled_at: $source.cancelled_at,
            version: $source.version,
            updated_at: $source.updated_at,
            stalled_at: $source.stalled_at,
            endpoint: with_batch_fields!(@text $($how)? $source.endpoint),
            input_file_id: with_batch_fields!(@text $($how)? $source.input_file_id),
            completion_window: with_batch_fields!(@text $($how)? $source.completion_window),
            output_file_id: with_batch_fields!(@text $($how)? $source.output_file_id),
            error_file_id: with_batch_fields!(@text $($how)? $source.error_file_id),
            model: with_batch_fields!(@text $($how)? $source.model),
            job_id: with_batch_fields!(@text $($how)? $source.job_id),
            remark: with_batch_fields!(@text $($how)? $source.remark),
            user_id: with_batch_fields!(@text $($how)? $source.user_id),
            api_key_id: with_batch_fields!(@text $($how)? $source.api_key_id),
        }
    };
    (@text $source:ident . $field:ident) => { $source.$field };
    (@text cloned $source:ident . $field:ident) => { $source.$field.clone() };
}
pub(crate) use with_batch_fields;

/// One committed version of a batch, as its history (the event log) records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEvent {
    /// The version this event committed.
    pub version: i64,
    /// The whole batch at that version.
    pub batch: Batch,
}

/// Most errors a batch keeps; a worker that reports more is refused, not truncated.
const MAX_BATCH_ERRORS: usize = 1_000;

/// Most bytes of text one batch may hold (see [`Batch::text_bytes`]). Every version is
/// sent whole to each reader and watcher, and default gRPC clients (grpcio, grpc-go,
/// tonic) refuse messages over 4 MiB: 1 MiB leaves room for the encoding's overhead
/// and keeps each version, in memory and in the event log, small.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// The `object` of OpenAI's answer to a deletion.
pub const BATCH_DELETED_OBJECT: &str = "batch.deleted";

impl Batch {
    /// The batch a create request makes for `caller` at `now`: `validating`, version 1,
    /// expiring at the end of its completion window.
    pub fn create(new: NewBatch, caller: &Caller, now: UnixSeconds) -> Batch {
        Batch {
            id: BatchId::generate(),
            endpoint: new.endpoint,
            errors: Vec::new(),
            input_file_id: new.input_file_id,
            completion_window: new.completion_window.text,
            status: BatchStatus::Validating,
            output_file_id: None,
            error_file_id: None,
            created_at: now,
            in_progress_at: None,
            expires_at: Some(now.saturating_add(new.completion_window.seconds)),
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts::default(),
            metadata: new.metadata,
            model: None,
            usage: None,
            job_id: new.job_id,
            remark: new.remark,
            output_expires_after: new.output_expires_after,
            user_id: caller.user_id.clone(),
            api_key_id: caller.key_id.clone(),
            version: 1,
            updated_at: None,
            stalled_at: None,
            progress: None,
        }
    }

    /// Moves the batch to `to`, stamping that status's `*_at` with `now`.
    fn move_to(&mut self, to: BatchStatus, now: UnixSeconds) -> Result<()> {
        if !self.status.can_move_to(to) {
            return Err(Error::IllegalTransition {
                from: self.status.as_str(),
                to: to.as_str(),
            });
        }
        let stamp = match to {
            BatchStatus::Validating => None,
            BatchStatus::InProgress => Some(&mut self.in_progress_at),
            BatchStatus::Finalizing => Some(&mut self.finalizing_at),
            BatchStatus::Completed => Some(&mut self.completed_at),
            BatchStatus::Failed => Some(&mut self.failed_at),
            BatchStatus::Expired => Some(&mut self.expired_at),
            BatchStatus::Cancelling => Some(&mut self.cancelling_at),
            BatchStatus::Cancelled => Some(&mut self.cancelled_at),
        };
        if let Some(stamp) = stamp {
            *stamp = Some(now);
        }
        self.status = to;
        Ok(())
    }

    /// Closes a change: one more version, stamped `now`. `None` when nothing changed,
    /// so an idempotent request writes nothing and bumps no version.
    fn commit(mut self, before: &Batch, now: UnixSeconds) -> Option<Batch> {
        if self == *before {
            return None;
        }
        self.version = before.version + 1;
        self.updated_at = Some(now);
        // A stall lasts until the batch's next change: every change but the marking
        // one clears it, so a version with `stalled_at` is always the marking version.
        if self.stalled_at == before.stalled_at {
            self.stalled_at = None;
        }
        let done = self
            .request_counts
            .completed
            .saturating_add(self.request_counts.failed);
        self.progress = match (self.status, self.progress) {
            (BatchStatus::InProgress, None) => Some(ProgressEstimate::start(now, done)),
            (BatchStatus::InProgress, Some(estimate)) => Some(estimate.sample(now, done)),
            _ => None,
        };
        Some(self)
    }

    /// The stall mark at `now`: a batch that is not final and has not changed for
    /// `stall_after` seconds gets `stalled_at` in a version of its own. `None` when it
    /// is final, moved more recently, or already marked (it is marked once per stall).
    pub fn mark_stalled(&self, now: UnixSeconds, stall_after: i64) -> Option<Batch> {
        if self.status.is_terminal() || self.stalled_at.is_some() {
            return None;
        }
        let last_change = self.updated_at.unwrap_or(self.created_at);
        if last_change.saturating_add(stall_after) > now {
            return None;
        }
        let mut next = self.clone();
        next.stalled_at = Some(now);
        next.commit(self, now)
    }

    /// Requests finished per second, recently: `None` until two samples in
    /// `in_progress`, and outside it.
    pub fn progress_rate(&self) -> Option<f64> {
        self.progress.and_then(|estimate| estimate.per_second())
    }

    /// When the batch will have run every request at its recent rate, counted from its
    /// last change: `None` outside `in_progress`, while stalled, without a total, or
    /// without a rate above zero.
    pub fn estimated_completion_at(&self) -> Option<UnixSeconds> {
        if self.status != BatchStatus::InProgress || self.stalled_at.is_some() {
            return None;
        }
        let rate_milli = self.progress?.rate_milli.filter(|&rate| rate > 0)?;
        let counts = self.request_counts;
        if counts.total <= 0 {
            return None;
        }
        let left =
            i128::from(counts.total) - i128::from(counts.completed) - i128::from(counts.failed);
        // Rounded up: "done at" must not be a second before the last request.
        let seconds = (left.max(0) * 1_000 + i128::from(rate_milli) - 1) / i128::from(rate_milli);
        let since = self.updated_at.unwrap_or(self.created_at);
        Some(since.saturating_add(i64::try_from(seconds).unwrap_or(i64::MAX)))
    }

    /// A client's cancel request: a running batch moves to `cancelling`; a batch that is
    /// already cancelling or cancelled stays as it is; other terminal batches refuse.
    pub fn cancel(&self, now: UnixSeconds) -> Result<Option<Batch>> {
        if matches!(
            self.status,
            BatchStatus::Cancelling | BatchStatus::Cancelled
        ) {
            return Ok(None);
        }
        let mut next = self.clone();
        next.move_to(BatchStatus::Cancelling, now)?;
        Ok(next.commit(self, now))
    }

    /// Whether this committed version moves the batch's status for webhooks, as the
    /// change feed's status moves read it (`StatusMoves` in the store: the first
    /// version, a status other than the version before's, or the stall mark).
    /// `previous_status` is the status of the version before, `None` when it is unknown
    /// (compacted away: then nothing says the status moved).
    pub fn is_status_move(&self, previous_status: Option<BatchStatus>) -> bool {
        self.version == 1
            || previous_status.is_some_and(|before| before != self.status)
            || self.stalled_at.is_some()
    }

    /// The lifecycle's timers at `now`: a running batch whose window has passed moves
    /// to `expired`; a batch `cancelling` for longer than `cancel_grace` seconds moves
    /// to `cancelled` (no worker confirmed in time). `None` when neither is due.
    pub fn on_timer(&self, now: UnixSeconds, cancel_grace: i64) -> Option<Batch> {
        let to = match self.status {
            BatchStatus::Validating | BatchStatus::InProgress | BatchStatus::Finalizing
                if self.expires_at.is_some_and(|at| at <= now) =>
            {
                BatchStatus::Expired
            }
            BatchStatus::Cancelling
                if self
                    .cancelling_at
                    .is_some_and(|at| at.saturating_add(cancel_grace) <= now) =>
            {
                BatchStatus::Cancelled
            }
            _ => return None,
        };
        let mut next = self.clone();
        // Both moves are legal from these statuses; `move_to` checks it all the same.
        next.move_to(to, now).ok()?;
        next.commit(self, now)
    }

    /// A worker's update, applied all or nothing. `None` when it changes nothing.
    pub fn apply(&self, update: &BatchUpdate, now: UnixSeconds) -> Result<Option<Batch>> {
        if self.status.is_terminal() {
            return Err(Error::FailedPrecondition(format!(
                "batch `{}` is `{}`, a final status; it accepts no more updates",
                self.id, self.status
            )));
        }
        let mut next = self.clone();
        if let Some(to) = update.status.filter(|&to| to != self.status) {
            next.move_to(to, now)?;
        }
        if let Some(counts) = update.request_counts {
            next.request_counts = self.counts_moving_forward(counts)?;
        }
        if let Some(id) = &update.output_file_id {
            next.output_file_id = Some(id.clone());
        }
        if let Some(id) = &update.error_file_id {
            next.error_file_id = Some(id.clone());
        }
        if !update.errors.is_empty() {
            if self.errors.len() + update.errors.len() > MAX_BATCH_ERRORS {
                return Err(Error::invalid(
                    "errors",
                    format!(
                        "batch `{}` has {} errors; {} more would exceed the limit of {MAX_BATCH_ERRORS} per batch",
                        self.id,
                        self.errors.len(),
                        update.errors.len()
                    ),
                ));
            }
            next.errors.extend(update.errors.iter().cloned());
            // Only errors accumulate: every other field is replaced, and bounded by
            // its own limit, so this is the one place a batch can outgrow the cap.
            let bytes = next.text_bytes();
            if bytes > MAX_BATCH_BYTES {
                return Err(Error::invalid(
                    "errors",
                    format!(
                        "these {} errors would grow batch `{}` to {bytes} bytes of text; at most {MAX_BATCH_BYTES} are allowed per batch",
                        update.errors.len(),
                        self.id
                    ),
                ));
            }
        }
        if let Some(usage) = update.usage {
            next.usage = Some(usage);
        }
        if let Some(model) = &update.model {
            next.model = Some(model.clone());
        }
        Ok(next.commit(self, now))
    }

    /// The bytes of text the batch holds: every string field, metadata key and value,
    /// and error field, counted as JSON writes them (the REST body, the SSE event and
    /// the event log are JSON; protobuf is never larger): UTF-8 bytes, not characters,
    /// and 6 bytes for a control character that JSON escapes as `\u00XX`. Fixed-size
    /// fields are left out: they are the same few hundred bytes for every batch.
    pub fn text_bytes(&self) -> usize {
        let optional = |text: &Option<String>| text.as_deref().map_or(0, json_bytes);
        let metadata: usize = self
            .metadata
            .iter()
            .flatten()
            .map(|(key, value)| json_bytes(key) + json_bytes(value))
            .sum();
        let errors: usize = self
            .errors
            .iter()
            .map(|e| json_bytes(&e.code) + json_bytes(&e.message) + optional(&e.param))
            .sum();
        [
            self.id.as_str(),
            &self.endpoint,
            &self.input_file_id,
            &self.completion_window,
            &self.user_id,
            &self.api_key_id,
        ]
        .into_iter()
        .map(json_bytes)
        .sum::<usize>()
            + optional(&self.output_file_id)
            + optional(&self.error_file_id)
            + optional(&self.model)
            + optional(&self.job_id)
            + optional(&self.remark)
            + metadata
            + errors
    }

    /// Request counts only move forward: a stale report must not undo progress.
    fn counts_moving_forward(&self, new: RequestCounts) -> Result<RequestCounts> {
        let old = self.request_counts;
        for (name, before, after) in [
            ("total", old.total, new.total),
            ("completed", old.completed, new.completed),
            ("failed", old.failed, new.failed),
        ] {
            if after < before {
                return Err(Error::FailedPrecondition(format!(
                    "request_counts.{name} cannot go down (batch `{}` is at {before}, the update says {after})",
                    self.id
                )));
            }
        }
        Ok(new)
    }
}

// Who sees which batch is decided beside the batch, so that API keys need not know
// what a batch is.
impl Caller {
    /// Whether the caller can see `batch` at all. Tenants see only their own batches;
    /// workers and admins see every batch.
    pub fn sees(&self, batch: &Batch) -> bool {
        self.owner_filter()
            .is_none_or(|owner| owner == batch.user_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::input::{BatchUpdate, BatchUpdateInput};

    /// A batch of `alice` created at 1,000, in `status`.
    fn batch(status: BatchStatus) -> Batch {
        Batch {
            status,
            ..crate::domain::fixtures::created_by("alice", 1_000)
        }
    }

    fn update(input: BatchUpdateInput) -> BatchUpdate {
        BatchUpdate::parse(input).expect("valid update")
    }

    /// `batch` after the change `input`, made at `now`; the change must change it.
    fn applied(batch: &Batch, input: BatchUpdateInput, now: UnixSeconds) -> Batch {
        batch
            .apply(&update(input), now)
            .expect("an allowed change")
            .expect("a new version")
    }

    #[test]
    fn each_transition_stamps_its_own_timestamp_and_bumps_the_version() {
        let start = batch(BatchStatus::Validating);
        let running = applied(
            &start,
            BatchUpdateInput {
                status: Some(BatchStatus::InProgress),
                ..Default::default()
            },
            2_000,
        );
        assert_eq!(running.status, BatchStatus::InProgress);
        assert_eq!(running.in_progress_at, Some(2_000));
        assert_eq!(running.version, 2);
        assert_eq!(running.updated_at, Some(2_000));
        assert_eq!(running.finalizing_at, None);
    }

    #[test]
    fn an_illegal_transition_names_both_statuses() {
        let start = batch(BatchStatus::Validating);
        let err = start
            .apply(
                &update(BatchUpdateInput {
                    status: Some(BatchStatus::Completed),
                    ..Default::default()
                }),
                2_000,
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "a batch cannot move from `validating` to `completed`"
        );
    }

    #[test]
    fn cancelling_a_completed_batch_is_refused() {
        let err = batch(BatchStatus::Completed).cancel(5).unwrap_err();
        assert!(matches!(
            err,
            Error::IllegalTransition {
                from: "completed",
                to: "cancelling"
            }
        ));
    }

    #[test]
    fn cancelling_twice_changes_nothing_the_second_time() {
        let cancelling = batch(BatchStatus::InProgress).cancel(5).unwrap().unwrap();
        assert_eq!(cancelling.cancelling_at, Some(5));
        assert_eq!(cancelling.cancel(6).unwrap(), None);
        assert_eq!(batch(BatchStatus::Cancelled).cancel(6).unwrap(), None);
    }

    #[test]
    fn request_counts_never_go_down() {
        let mut running = batch(BatchStatus::InProgress);
        running.request_counts = RequestCounts {
            total: 10,
            completed: 5,
            failed: 1,
        };
        let err = running
            .apply(
                &update(BatchUpdateInput {
                    request_counts: Some(RequestCounts {
                        total: 10,
                        completed: 4,
                        failed: 1,
                    }),
                    ..Default::default()
                }),
                9,
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("request_counts.completed"),
            "{err}"
        );
    }

    #[test]
    fn a_terminal_batch_accepts_no_update() {
        let err = batch(BatchStatus::Failed)
            .apply(
                &update(BatchUpdateInput {
                    model: Some("gpt".into()),
                    ..Default::default()
                }),
                9,
            )
            .unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    }

    #[test]
    fn a_running_batch_expires_when_its_window_has_passed() {
        for status in [
            BatchStatus::Validating,
            BatchStatus::InProgress,
            BatchStatus::Finalizing,
        ] {
            let running = batch(status);
            let deadline = running.expires_at.unwrap();
            assert_eq!(running.on_timer(deadline - 1, 600), None, "{status}");
            let expired = running.on_timer(deadline, 600).expect("due");
            assert_eq!(expired.status, BatchStatus::Expired);
            assert_eq!(expired.expired_at, Some(deadline));
            assert_eq!(expired.version, 2);
        }
        for status in [
            BatchStatus::Completed,
            BatchStatus::Failed,
            BatchStatus::Cancelled,
        ] {
            assert_eq!(batch(status).on_timer(i64::MAX, 600), None, "{status}");
        }
    }

    #[test]
    fn a_cancelling_batch_is_cancelled_after_the_grace_period() {
        let cancelling = batch(BatchStatus::InProgress)
            .cancel(5_000)
            .unwrap()
            .unwrap();
        assert_eq!(cancelling.on_timer(5_599, 600), None);
        let cancelled = cancelling.on_timer(5_600, 600).expect("due");
        assert_eq!(cancelled.status, BatchStatus::Cancelled);
        assert_eq!(cancelled.cancelled_at, Some(5_600));
        // A cancelling batch past its window is cancelled, not expired.
        assert_eq!(
            cancelling.on_timer(i64::MAX, 600).unwrap().status,
            BatchStatus::Cancelled
        );
    }

    #[test]
    fn an_update_that_changes_nothing_writes_nothing() {
        let running = batch(BatchStatus::InProgress);
        let same = update(BatchUpdateInput {
            status: Some(BatchStatus::InProgress),
            request_counts: Some(RequestCounts::default()),
            ..Default::default()
        });
        assert_eq!(running.apply(&same, 9).unwrap(), None);
    }

    fn errors_of(count: usize, message: &str) -> BatchUpdate {
        update(BatchUpdateInput {
            errors: (0..count)
                .map(|i| BatchErrorEntry {
                    code: "bad_line".into(),
                    line: Some(i as i64),
                    message: message.into(),
                    param: None,
                })
                .collect(),
            ..Default::default()
        })
    }

    fn invalid_field(error: Error) -> String {
        match error {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn errors_past_the_batch_size_cap_are_refused_naming_errors() {
        // 4,000 characters of 2-byte text each: 8,000 bytes per error, so the cap is
        // reached in bytes long before the count (and long before 1 MiB of characters).
        let message = "é".repeat(4_000);
        let mut grown = batch(BatchStatus::InProgress);
        let mut refused = None;
        for round in 0..20 {
            match grown.apply(&errors_of(10, &message), round) {
                Ok(next) => grown = next.expect("errors were appended"),
                Err(error) => {
                    refused = Some(error);
                    break;
                }
            }
        }
        assert!(grown.text_bytes() <= MAX_BATCH_BYTES);
        assert!(grown.text_bytes() > MAX_BATCH_BYTES - 10 * 8_020);
        assert_eq!(
            invalid_field(refused.expect("the cap was reached")),
            "errors"
        );
    }

    #[test]
    fn more_than_the_most_errors_per_batch_are_refused_naming_errors() {
        let full = batch(BatchStatus::InProgress)
            .apply(&errors_of(MAX_BATCH_ERRORS, "x"), 5)
            .unwrap()
            .unwrap();
        let error = full.apply(&errors_of(1, "x"), 6).unwrap_err();
        assert_eq!(invalid_field(error), "errors");
    }

    #[test]
    fn text_bytes_counts_bytes_as_json_writes_them() {
        let mut one = batch(BatchStatus::InProgress);
        let base = one.text_bytes();
        for (remark, bytes) in [("日本", 6), ("a\u{1}", 7), ("\"\n", 4)] {
            one.remark = Some(remark.into());
            assert_eq!(one.text_bytes(), base + bytes, "{remark:?}");
            let json = serde_json::to_string(remark).unwrap();
            assert_eq!(json.len() - 2, bytes, "as serde_json writes {remark:?}");
        }
    }

    fn running(total: i64) -> Batch {
        let mut batch = batch(BatchStatus::Validating)
            .apply(
                &update(BatchUpdateInput {
                    status: Some(BatchStatus::InProgress),
                    request_counts: Some(RequestCounts {
                        total,
                        completed: 0,
                        failed: 0,
                    }),
                    ..Default::default()
                }),
                2_000,
            )
            .unwrap()
            .unwrap();
        batch.errors.clear();
        batch
    }

    fn report(batch: &Batch, completed: i64, failed: i64, at: UnixSeconds) -> Batch {
        let total = batch.request_counts.total;
        batch
            .apply(
                &update(BatchUpdateInput {
                    request_counts: Some(RequestCounts {
                        total,
                        completed,
                        failed,
                    }),
                    ..Default::default()
                }),
                at,
            )
            .unwrap()
            .unwrap()
    }

    #[test]
    fn the_rate_needs_two_samples_five_seconds_apart_then_follows_recent_progress() {
        let started = running(1_000);
        assert_eq!(started.progress_rate(), None);
        // Reports within 5 s of the first sample add up into the next one.
        let early = report(&started, 30, 0, 2_003);
        assert_eq!(early.progress_rate(), None);
        let second = report(&early, 80, 20, 2_010);
        assert_eq!(second.progress_rate(), Some(10.0));
        // 900 left at 10/s: 90 s after the last change.
        assert_eq!(second.estimated_completion_at(), Some(2_100));
        // One late, bunched report moves the average only a little.
        let bunched = report(&second, 400, 20, 2_015);
        let rate = bunched.progress_rate().unwrap();
        assert!(rate > 10.0 && rate < 17.0, "{rate}");
    }

    #[test]
    fn no_estimate_without_a_total_or_outside_in_progress() {
        let with_rate = report(&running(100), 50, 0, 2_010);
        assert_eq!(with_rate.progress_rate(), Some(5.0));
        assert_eq!(with_rate.estimated_completion_at(), Some(2_020));
        let no_total = Batch {
            request_counts: RequestCounts::default(),
            ..with_rate.clone()
        };
        assert_eq!(no_total.estimated_completion_at(), None);
        let stopped = Batch {
            progress: with_rate.progress.map(|estimate| ProgressEstimate {
                rate_milli: Some(0),
                ..estimate
            }),
            ..with_rate.clone()
        };
        assert_eq!(stopped.estimated_completion_at(), None);
        let progressing = report(&running(100), 50, 0, 2_010);
        let finalizing = progressing
            .apply(
                &update(BatchUpdateInput {
                    status: Some(BatchStatus::Finalizing),
                    ..Default::default()
                }),
                2_020,
            )
            .unwrap()
            .unwrap();
        assert_eq!(finalizing.progress, None);
        assert_eq!(finalizing.estimated_completion_at(), None);
    }

    #[test]
    fn a_quiet_batch_is_marked_stalled_once_and_its_next_change_clears_it() {
        let quiet = running(100);
        assert_eq!(
            quiet.mark_stalled(2_599, 600),
            None,
            "not quiet long enough"
        );
        let stalled = quiet.mark_stalled(2_600, 600).expect("marked");
        assert_eq!(stalled.stalled_at, Some(2_600));
        assert_eq!(stalled.version, quiet.version + 1);
        assert_eq!(stalled.status, BatchStatus::InProgress);
        assert_eq!(stalled.estimated_completion_at(), None);
        assert_eq!(stalled.mark_stalled(9_999, 600), None, "once per stall");
        // A report that changes nothing is not a change, and does not clear it.
        assert_eq!(
            stalled
                .apply(
                    &update(BatchUpdateInput {
                        request_counts: Some(stalled.request_counts),
                        ..Default::default()
                    }),
                    2_700
                )
                .unwrap(),
            None
        );
        let moving = report(&stalled, 10, 0, 2_700);
        assert_eq!(moving.stalled_at, None);
        let cancelling = stalled.cancel(2_700).unwrap().unwrap();
        assert_eq!(cancelling.stalled_at, None);
        assert!(
            cancelling.mark_stalled(3_300, 600).is_some(),
            "cancelling stalls too"
        );
    }

    #[test]
    fn a_status_move_is_the_first_version_a_new_status_or_the_stall_mark() {
        let created = batch(BatchStatus::Validating);
        assert!(created.is_status_move(None), "the first version");
        let running = applied(
            &created,
            BatchUpdateInput {
                status: Some(BatchStatus::InProgress),
                ..Default::default()
            },
            2_000,
        );
        assert!(running.is_status_move(Some(created.status)));
        let progressed = applied(
            &running,
            BatchUpdateInput {
                request_counts: Some(RequestCounts {
                    total: 10,
                    completed: 3,
                    failed: 0,
                }),
                ..Default::default()
            },
            2_100,
        );
        assert!(
            !progressed.is_status_move(Some(running.status)),
            "a progress report"
        );
        assert!(
            !progressed.is_status_move(None),
            "a version whose version before is unknown"
        );
        let stalled = progressed.mark_stalled(10_000, 600).unwrap();
        assert!(
            stalled.is_status_move(Some(progressed.status)),
            "the stall mark"
        );
    }

    #[test]
    fn final_batches_never_stall() {
        for status in BatchStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            assert_eq!(batch(status).mark_stalled(i64::MAX, 1), None, "{status}");
        }
        for status in BatchStatus::STALLABLE {
            assert!(batch(status).mark_stalled(1_600, 600).is_some(), "{status}");
        }
    }
}
