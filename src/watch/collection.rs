//! One collection watch stream: its start (every matching batch then `SYNCED`, or the
//! changes after a cursor), then every matching change from the replica's change feed,
//! reading the log itself whenever the feed's slices do not continue from its cursor,
//! and a bookmark while nothing matches. It ends early when the replica stops or the
//! stream's API key is found revoked.
//!
//! The initial state is exact without holding a transaction open for the listing: the
//! head is read first, the batches are listed after it in pages, and a batch whose
//! listed version was committed after the head is left out of the listing. The stream
//! continues from the head, so that version comes as its first `CHANGE`: nothing falls
//! between the listing and the live part, and nothing comes twice.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;

use super::change_feed::{ChangeFeed, FEED_PAGE, FeedSlice, SharedChange};
use super::{FeedEvent, FeedEventKind, KEY_REVOKED, Stop};
use crate::domain::{Batch, BatchFilter, BatchId, CursorSealer, FeedCursor, FeedStart};
use crate::error::{Error, Result};
use crate::store::{BatchPageQuery, EventLog};

/// Batches listed per query of an initial state.
const INITIAL_PAGE: i64 = 100;

/// What a collection watcher works with: the request, where to read, when to stop.
pub(super) struct CollectionContext {
    pub(super) log: Arc<dyn EventLog>,
    pub(super) feed: Arc<ChangeFeed>,
    /// Already scoped to the caller's owner.
    pub(super) filter: BatchFilter,
    /// A cursor has been checked against the feed's bounds.
    pub(super) start: FeedStart,
    /// Seals each message's cursor for the filter's owner scope.
    pub(super) cursors: CursorSealer,
    pub(super) heartbeat: Duration,
    pub(super) stopping: watch::Receiver<bool>,
    pub(super) revoked: watch::Receiver<bool>,
}

struct CollectionWatcher {
    context: CollectionContext,
    out: mpsc::Sender<Result<FeedEvent>>,
    /// Every change up to here has been judged (sent, or not matching).
    cursor: FeedCursor,
    last_sent: Instant,
}

/// Streams the feed into `out` until the client goes away or an error ends it.
pub(super) async fn run(
    context: CollectionContext,
    slices: &mut broadcast::Receiver<Arc<FeedSlice>>,
    out: mpsc::Sender<Result<FeedEvent>>,
) {
    let mut watcher = CollectionWatcher {
        context,
        out,
        cursor: FeedCursor::default(),
        last_sent: Instant::now(),
    };
    let outcome = watcher.stream(slices).await;
    super::end_stream(outcome, &watcher.out).await;
}

impl CollectionWatcher {
    async fn stream(
        &mut self,
        slices: &mut broadcast::Receiver<Arc<FeedSlice>>,
    ) -> Result<(), Stop> {
        match self.context.start {
            FeedStart::After(cursor) => self.cursor = cursor,
            FeedStart::Now => {
                self.cursor = self.context.log.feed_bounds().await?.head;
                self.send(FeedEventKind::Synced, None).await?;
            }
            FeedStart::InitialState => {
                self.cursor = self.context.log.feed_bounds().await?.head;
                self.send_initial_state().await?;
                self.send(FeedEventKind::Synced, None).await?;
            }
        }
        self.catch_up().await?;
        let mut stopping = self.context.stopping.clone();
        let mut revoked = self.context.revoked.clone();
        loop {
            let next_bookmark = self.last_sent + self.context.heartbeat;
            tokio::select! {
                _ = crate::shutdown::requested(&mut stopping) => return Err(Error::ShuttingDown.into()),
                _ = super::key_revoked(&mut revoked) => return Err(Error::Unauthenticated(KEY_REVOKED).into()),
                _ = self.out.closed() => return Err(Stop::ClientGone),
                received = slices.recv() => match received {
                    Ok(slice) if slice.to <= self.cursor => {}
                    Ok(slice) if slice.from <= self.cursor => {
                        // Complete over (from, to], so complete over (cursor, to].
                        for change in &slice.changes {
                            if change.cursor > self.cursor {
                                self.judge(change).await?;
                            }
                        }
                        self.cursor = slice.to;
                    }
                    // Behind the slice, or fell behind the buffer: the log has it all.
                    Ok(_) | Err(RecvError::Lagged(_)) => self.catch_up().await?,
                    Err(RecvError::Closed) => return Err(Error::ShuttingDown.into()),
                },
                _ = tokio::time::sleep_until(next_bookmark) => {
                    let owner = self.context.filter.owner.as_deref();
                    self.cursor = self.context.feed.idle_cursor(owner, self.cursor);
                    self.send(FeedEventKind::Bookmark, None).await?;
                }
            }
        }
    }

    /// Sends every batch that matches the filter at the cursor (the head read before
    /// the listing) as `INITIAL`, a page at a time. A batch whose listed version came
    /// after the cursor is left for the live part, which sends it as a `CHANGE`.
    async fn send_initial_state(&mut self) -> Result<(), Stop> {
        let head = self.cursor;
        let mut after: Option<BatchId> = None;
        loop {
            self.still_wanted()?;
            let filter = &self.context.filter;
            // The turn is held for the read only, never while the client is slow.
            let turn = self.context.feed.catch_up_turn().await?;
            self.still_wanted()?;
            let page = self
                .context
                .log
                .batches_with_positions(BatchPageQuery {
                    owner: filter.owner.as_deref(),
                    after: after.as_ref(),
                    statuses: &filter.statuses,
                    job_id: filter.job_id.as_deref(),
                    created_after: filter.created_after,
                    created_before: filter.created_before,
                    metadata: &filter.metadata,
                    // The feed refuses the stalled filter (`WatchBatches::parse`).
                    stalled: None,
                    oldest_first: true,
                    limit: INITIAL_PAGE,
                })
                .await?;
            drop(turn);
            let complete = (page.len() as i64) < INITIAL_PAGE;
            after = page.last().map(|(_, batch)| batch.id.clone());
            for (position, batch) in page {
                if position <= head {
                    self.send(FeedEventKind::Initial, Some(Arc::new(batch)))
                        .await?;
                }
            }
            if complete {
                return Ok(());
            }
        }
    }

    /// Judges every change after the cursor, read from the log a page at a time, each
    /// page in its turn with the replica's other catch-ups.
    async fn catch_up(&mut self) -> Result<(), Stop> {
        loop {
            self.still_wanted()?;
            let page = {
                let _turn = self.context.feed.catch_up_turn().await?;
                // The turn may have been long in coming.
                self.still_wanted()?;
                // The owner's changes only, read as such: a tenant's catch-up costs
                // what it changed, not what every tenant did since its cursor.
                self.context
                    .log
                    .changes_after(self.cursor, self.context.filter.owner.as_deref(), FEED_PAGE)
                    .await?
            };
            let complete = (page.changes.len() as i64) < FEED_PAGE;
            for change in page.changes {
                self.judge(&SharedChange::from(change)).await?;
            }
            self.cursor = page.next;
            if complete {
                return Ok(());
            }
        }
    }

    /// Stops a long read of the log (a catch-up from an old cursor, a large listing)
    /// as soon as nobody wants it: the client left, the replica stops, or the key was
    /// revoked. Sending alone would not notice when nothing matches.
    fn still_wanted(&self) -> Result<(), Stop> {
        if self.out.is_closed() {
            return Err(Stop::ClientGone);
        }
        if *self.context.stopping.borrow() {
            return Err(Error::ShuttingDown.into());
        }
        if *self.context.revoked.borrow() {
            return Err(Error::Unauthenticated(KEY_REVOKED).into());
        }
        Ok(())
    }

    /// Sends `change` as a `CHANGE` when the batch matches the filter, as `LEFT_FILTER`
    /// when it matched at the version before and no longer does, as `DELETED` when a
    /// batch that matched (at its last version) was deleted, else not at all.
    async fn judge(&mut self, change: &SharedChange) -> Result<(), Stop> {
        self.cursor = change.cursor;
        let filter = &self.context.filter;
        if !filter.matches_fixed(&change.batch) {
            return Ok(());
        }
        let kind = if change.deleted {
            // A batch that had left the filter was already the last message about it.
            if !filter.matches_status(change.batch.status) {
                return Ok(());
            }
            FeedEventKind::Deleted
        } else if filter.matches_status(change.batch.status) {
            FeedEventKind::Change
        } else if change_left_filter(filter, change) {
            FeedEventKind::LeftFilter
        } else {
            return Ok(());
        };
        self.send(kind, Some(change.batch.clone())).await
    }

    /// Queues a message for the client; the cursor it carries is the watcher's (none
    /// for `INITIAL`: a stream cut before `SYNCED` starts over).
    async fn send(&mut self, kind: FeedEventKind, batch: Option<Arc<Batch>>) -> Result<(), Stop> {
        if *self.context.revoked.borrow() {
            return Err(Error::Unauthenticated(KEY_REVOKED).into());
        }
        let cursor = (kind != FeedEventKind::Initial).then(|| {
            self.context
                .cursors
                .seal(self.cursor, self.context.filter.owner.as_deref())
        });
        self.last_sent = Instant::now();
        let mut stopping = self.context.stopping.clone();
        let mut revoked = self.context.revoked.clone();
        tokio::select! {
            sent = self.out.send(Ok(FeedEvent { kind, batch, cursor })) => sent.map_err(|_| Stop::ClientGone)?,
            _ = crate::shutdown::requested(&mut stopping) => return Err(Error::ShuttingDown.into()),
            _ = super::key_revoked(&mut revoked) => return Err(Error::Unauthenticated(KEY_REVOKED).into()),
        }
        metrics::counter!("batchd_change_feed_events_delivered_total", "kind" => kind.as_str())
            .increment(1);
        Ok(())
    }
}

/// Whether a change of a batch whose fixed fields match, to a status outside the
/// filter, takes it out: its status before was in the filter. When the version before
/// is no longer in the log, it is taken as having matched, so that a consumer's view
/// never keeps a batch that left (a consumer may then hear of one it never had).
fn change_left_filter(filter: &BatchFilter, change: &SharedChange) -> bool {
    match change.previous_status {
        Some(before) => filter.matches_status(before),
        None => change.batch.version > 1,
    }
}
