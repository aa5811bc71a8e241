//! The change feed's vocabulary: a position in it (the cursor a client resumes from),
//! what a collection watcher asks for, and which batches its filter matches.

use std::fmt;

use super::batch::Batch;
use super::input::{ListBatches, ListBatchesInput};
use super::status::BatchStatus;
use crate::error::{Error, Result};

/// A position in the change feed: the writing transaction's id and the event's order
/// of writing. On SQLite, whose one writer at a time commits in writing order, the
/// transaction part is always 0. It is every tenant's position, so clients never see
/// it: they get it sealed (`cursor_seal`, the module above this one). Logs show `<transaction>.<position>`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FeedCursor {
    /// The writing transaction (PostgreSQL's `xid8`), or 0.
    pub transaction: i64,
    /// The event's order of writing.
    pub position: i64,
}

impl fmt::Display for FeedCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.transaction, self.position)
    }
}

/// Which batches a collection watcher follows: the filters of a list, scoped to an
/// owner. Everything but the status is fixed when a batch is created, so a batch
/// enters or leaves the filter only by changing status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchFilter {
    /// Only this owner's batches; `None` for every owner.
    pub owner: Option<String>,
    /// Only batches in one of these statuses; empty for any.
    pub statuses: Vec<BatchStatus>,
    /// Only batches of this job.
    pub job_id: Option<String>,
    /// Only batches created at or after this Unix second.
    pub created_after: Option<i64>,
    /// Only batches created before this Unix second.
    pub created_before: Option<i64>,
    /// Only batches whose metadata has every one of these pairs.
    pub metadata: Vec<(String, String)>,
    /// Only batches marked stalled now (`true`), or only the others (`false`). Lists
    /// and counts only: the change feed refuses it (see [`WatchBatches::parse`]).
    pub stalled: Option<bool>,
}

impl BatchFilter {
    /// Validates the filters of a list request that is not a page (the change feed,
    /// the counts): its paging fields (`after`, `limit`, `order`) are refused with
    /// `refusal`. The owner is left unset, for the service to scope.
    pub fn parse_unpaged(input: ListBatchesInput, refusal: &str) -> Result<BatchFilter> {
        let paging = [
            ("after", input.after.is_some()),
            ("limit", input.limit.is_some()),
            ("order", input.order.is_some()),
        ];
        if let Some((name, _)) = paging.iter().find(|(_, given)| *given) {
            return Err(Error::invalid(*name, refusal));
        }
        let list = ListBatches::parse(input)?;
        Ok(BatchFilter {
            owner: None,
            statuses: list.statuses,
            job_id: list.job_id,
            created_after: list.created_after,
            created_before: list.created_before,
            metadata: list.metadata,
            stalled: list.stalled,
        })
    }

    /// Whether `batch` (at any version) matches the filter.
    pub fn matches(&self, batch: &Batch) -> bool {
        self.matches_fixed(batch)
            && self.matches_status(batch.status)
            && self
                .stalled
                .is_none_or(|stalled| batch.stalled_at.is_some() == stalled)
    }

    /// Whether what never changes after creation matches: owner, job, creation time,
    /// metadata.
    pub fn matches_fixed(&self, batch: &Batch) -> bool {
        self.owner
            .as_ref()
            .is_none_or(|owner| *owner == batch.user_id)
            && self
                .job_id
                .as_ref()
                .is_none_or(|job| batch.job_id.as_ref() == Some(job))
            && self.created_after.is_none_or(|t| batch.created_at >= t)
            && self.created_before.is_none_or(|t| batch.created_at < t)
            && self.metadata.iter().all(|(key, value)| {
                batch.metadata.as_ref().and_then(|pairs| pairs.get(key)) == Some(value)
            })
    }

    /// Whether a batch in `status` is in the filter's status set.
    pub fn matches_status(&self, status: BatchStatus) -> bool {
        self.statuses.is_empty() || self.statuses.contains(&status)
    }
}

/// A collection watch request as the transports receive it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchBatchesInput {
    /// The filters, as a list takes them; a list's paging fields (`after`, `limit`,
    /// `order`) mean nothing to a feed and are refused.
    pub filter: ListBatchesInput,
    /// Resume after this cursor (sealed, as the feed sent it).
    pub after_cursor: Option<String>,
    /// Start with every matching batch (`INITIAL`), then `SYNCED`.
    pub send_initial_state: bool,
}

/// Where a collection watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedStart {
    /// Every matching batch first, then the changes after the listing.
    InitialState,
    /// The changes committed after this cursor.
    After(FeedCursor),
    /// The changes committed from now on.
    Now,
}

/// A validated collection watch request (not yet scoped to an owner).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatches {
    /// Which batches to follow; `owner` is left to the caller's scope.
    pub filter: BatchFilter,
    /// Where the stream starts.
    pub start: FeedStart,
}

impl WatchBatches {
    /// Validates a collection watch request: the filters exactly as a list checks
    /// them, that the request asks for one start, and that a cursor opens with
    /// `open_cursor` (the caller's: it knows the key and the scope a cursor is bound
    /// to).
    pub fn parse(
        input: WatchBatchesInput,
        open_cursor: impl FnOnce(&str) -> Result<FeedCursor>,
    ) -> Result<WatchBatches> {
        if input.filter.stalled.is_some() {
            // The feed says when a batch enters or leaves a filter by its status
            // alone; a stall mark moves no status.
            return Err(Error::invalid(
                "stalled",
                "is a filter of lists and counts, not of the change feed; every change carries the batch's stalled_at",
            ));
        }
        let filter = BatchFilter::parse_unpaged(
            input.filter,
            "is a parameter of a list, not of the change feed; resume with after_cursor",
        )?;
        let start = match (input.after_cursor, input.send_initial_state) {
            (Some(_), true) => {
                return Err(Error::invalid(
                    "send_initial_state",
                    "cannot be combined with after_cursor: a resumed stream continues after its cursor, an initial state starts over",
                ));
            }
            (Some(text), false) => FeedStart::After(open_cursor(&text)?),
            (None, true) => FeedStart::InitialState,
            (None, false) => FeedStart::Now,
        };
        Ok(WatchBatches { filter, start })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::fixtures;

    fn field_of(result: Result<impl fmt::Debug>) -> String {
        match result.unwrap_err() {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn cursors_order_by_transaction_then_position() {
        let a = FeedCursor {
            transaction: 5,
            position: 900,
        };
        let b = FeedCursor {
            transaction: 6,
            position: 1,
        };
        assert!(a < b);
    }

    #[test]
    fn a_filter_matches_the_fields_of_a_list() {
        let mut batch = fixtures::created_by("alice", 1_000);
        batch.job_id = Some("job-1".into());
        batch.metadata = Some([("team".to_owned(), "ml".to_owned())].into());
        let everything = BatchFilter::default();
        assert!(everything.matches(&batch));
        let cases = [
            (
                BatchFilter {
                    owner: Some("bob".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                BatchFilter {
                    owner: Some("alice".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                BatchFilter {
                    statuses: vec![BatchStatus::InProgress],
                    ..Default::default()
                },
                false,
            ),
            (
                BatchFilter {
                    statuses: vec![BatchStatus::Validating, BatchStatus::InProgress],
                    ..Default::default()
                },
                true,
            ),
            (
                BatchFilter {
                    job_id: Some("job-2".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                BatchFilter {
                    created_after: Some(1_000),
                    created_before: Some(1_001),
                    ..Default::default()
                },
                true,
            ),
            (
                BatchFilter {
                    created_before: Some(1_000),
                    ..Default::default()
                },
                false,
            ),
            (
                BatchFilter {
                    metadata: vec![("team".into(), "ml".into())],
                    ..Default::default()
                },
                true,
            ),
            (
                BatchFilter {
                    metadata: vec![("team".into(), "search".into())],
                    ..Default::default()
                },
                false,
            ),
        ];
        for (filter, expected) in cases {
            assert_eq!(filter.matches(&batch), expected, "{filter:?}");
        }
    }

    #[test]
    fn a_watch_request_names_what_is_wrong() {
        let five = FeedCursor {
            transaction: 0,
            position: 5,
        };
        // Stands in for the sealer: "five" opens, anything else is refused.
        let open = |text: &str| match text {
            "five" => Ok(five),
            _ => Err(Error::invalid("after_cursor", "not a cursor")),
        };
        let watch = |edit: &dyn Fn(&mut WatchBatchesInput)| {
            let mut input = WatchBatchesInput::default();
            edit(&mut input);
            WatchBatches::parse(input, open)
        };
        assert_eq!(watch(&|_| {}).unwrap().start, FeedStart::Now);
        assert_eq!(
            watch(&|i| i.send_initial_state = true).unwrap().start,
            FeedStart::InitialState
        );
        assert_eq!(
            watch(&|i| i.after_cursor = Some("five".into()))
                .unwrap()
                .start,
            FeedStart::After(five)
        );
        assert_eq!(
            field_of(watch(&|i| {
                i.after_cursor = Some("five".into());
                i.send_initial_state = true;
            })),
            "send_initial_state"
        );
        assert_eq!(field_of(watch(&|i| i.filter.limit = Some(5))), "limit");
        assert_eq!(
            field_of(watch(&|i| i.filter.after = Some("batch_x".into()))),
            "after"
        );
        assert_eq!(
            field_of(watch(&|i| i.filter.order = Some("asc".into()))),
            "order"
        );
        assert_eq!(
            field_of(watch(&|i| i.filter.created_after = Some(-1))),
            "created_after"
        );
        assert_eq!(
            field_of(watch(&|i| i.filter.job_id = Some("bad job\0".into()))),
            "job_id"
        );
        assert_eq!(
            field_of(watch(&|i| i.after_cursor = Some("latest".into()))),
            "after_cursor"
        );
    }
}
