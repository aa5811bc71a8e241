//! The change feed of one replica: one reader of the event log, in feed order, for all
//! of this replica's collection watchers. Each read is broadcast once as a slice, the
//! changes of a range of cursors `(from, to]`, all of them; a watcher applies its
//! filter to each in memory. A watcher whose cursor is inside or at the start of a
//! slice takes the changes after its cursor; one that is behind the slice (it fell
//! behind, or joined between two reads) reads the log itself, so a slow watcher never
//! makes a gap and never holds up the others.
//!
//! The reader reads only while some watcher is joined, when a commit here or on another
//! replica wakes it, at least every safety poll, and, while committed changes are held
//! back behind an older transaction still running (PostgreSQL), again after a short
//! backoff. How long they have been held back is the `batchd_change_feed_delay_seconds`
//! gauge.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, watch};

use crate::domain::{Batch, BatchStatus, FeedCursor};
use crate::error::{Error, Result};
use crate::store::{EventLog, FeedChange};

/// Changes read from the log per query.
pub(super) const FEED_PAGE: i64 = 256;

/// Slices kept for watchers that have not read them yet; one that falls further behind
/// reads the log itself.
const SLICE_CAPACITY: usize = 64;

/// The first and the longest wait before reading again while changes are held back.
const HELD_BACK_RETRY: (Duration, Duration) = (Duration::from_millis(20), Duration::from_secs(1));

/// How long the reader waits after a failed read.
const FAILED_READ_RETRY: Duration = Duration::from_millis(200);

/// One committed version, shared by every watcher that sends it.
#[derive(Debug, Clone)]
pub(super) struct SharedChange {
    pub(super) cursor: FeedCursor,
    pub(super) batch: Arc<Batch>,
    pub(super) previous_status: Option<BatchStatus>,
}

impl From<FeedChange> for SharedChange {
    fn from(change: FeedChange) -> SharedChange {
        SharedChange {
            cursor: change.cursor,
            batch: Arc::new(change.batch),
            previous_status: change.previous_status,
        }
    }
}

/// Every change with a cursor in `(from, to]`, in feed order.
#[derive(Debug)]
pub(super) struct FeedSlice {
    pub(super) from: FeedCursor,
    pub(super) to: FeedCursor,
    pub(super) changes: Vec<SharedChange>,
}

/// Where the reader is.
#[derive(Debug, Default)]
struct ReaderPosition {
    /// Read up to here; `None` while no watcher is joined (the reader starts at the
    /// head again when one joins).
    read_to: Option<FeedCursor>,
    /// The `to` of the latest slice, or where the reader started: nothing between it
    /// and `read_to` changed.
    broadcast_to: FeedCursor,
}

/// The change feed reader of one replica.
pub(super) struct ChangeFeed {
    log: Arc<dyn EventLog>,
    slices: broadcast::Sender<Arc<FeedSlice>>,
    wake: Notify,
    watchers: AtomicUsize,
    position: Mutex<ReaderPosition>,
    reader_started: OnceLock<()>,
    poll: Duration,
}

/// A watcher's place in the feed; dropping it lets the reader rest when it was the
/// last.
pub(super) struct FeedMembership {
    feed: Arc<ChangeFeed>,
    pub(super) slices: broadcast::Receiver<Arc<FeedSlice>>,
}

impl ChangeFeed {
    /// A feed over `log`, read at least every `poll` while watched.
    pub(super) fn new(log: Arc<dyn EventLog>, poll: Duration) -> Arc<ChangeFeed> {
        Arc::new(ChangeFeed {
            log,
            slices: broadcast::channel(SLICE_CAPACITY).0,
            wake: Notify::new(),
            watchers: AtomicUsize::new(0),
            position: Mutex::default(),
            reader_started: OnceLock::new(),
            poll,
        })
    }

    /// Something was committed: the reader reads, if anyone watches.
    pub(super) fn wake(&self) {
        if self.watchers.load(Ordering::Acquire) > 0 {
            self.wake.notify_one();
        }
    }

    /// Joins the feed: the watcher receives every slice broadcast from now on. Starts
    /// the reader on first use; it stops when `stopping` turns true.
    pub(super) fn join(self: &Arc<Self>, stopping: watch::Receiver<bool>) -> FeedMembership {
        let slices = self.slices.subscribe();
        self.watchers.fetch_add(1, Ordering::AcqRel);
        if self.reader_started.set(()).is_ok() {
            tokio::spawn(run_reader(self.clone(), stopping));
        }
        self.wake.notify_one();
        FeedMembership {
            feed: self.clone(),
            slices,
        }
    }

    /// A cursor at or after `cursor` with no change in between: the reader's, when a
    /// watcher at `cursor` has everything broadcast so far; for idle bookmarks.
    pub(super) fn idle_cursor(&self, cursor: FeedCursor) -> FeedCursor {
        let position = self.lock_position();
        match position.read_to {
            Some(read_to) if cursor >= position.broadcast_to => cursor.max(read_to),
            _ => cursor,
        }
    }

    /// Reads everything after the reader's position and broadcasts it. Returns whether
    /// committed changes are held back (read again soon).
    async fn read(&self) -> Result<bool> {
        let start = self.lock_position().read_to;
        let mut cursor = match start {
            Some(cursor) => cursor,
            None => {
                let head = self.log.feed_bounds().await?.head;
                *self.lock_position() = ReaderPosition {
                    read_to: Some(head),
                    broadcast_to: head,
                };
                head
            }
        };
        loop {
            let page = match self.log.changes_after(cursor, FEED_PAGE).await {
                Ok(page) => page,
                Err(Error::FeedCompacted { oldest, .. }) => {
                    // Only a reader far behind (the database was away for longer than
                    // the retention) gets here. It starts again at the head; every
                    // watcher, behind the next slice, reads the log and is refused.
                    tracing::warn!(%cursor, %oldest, "change feed reader fell behind compaction; restarting at the head");
                    self.lock_position().read_to = None;
                    return Ok(false);
                }
                Err(error) => return Err(error),
            };
            let full = page.changes.len() as i64 >= FEED_PAGE;
            let delay = page
                .held_back_since
                .map_or(0, |at| (super::hub::now_ms() / 1_000 - at).max(0));
            metrics::gauge!("batchd_change_feed_delay_seconds").set(delay as f64);
            {
                let mut position = self.lock_position();
                if !page.changes.is_empty() {
                    let slice = FeedSlice {
                        from: position.broadcast_to,
                        to: page.next,
                        changes: page.changes.into_iter().map(SharedChange::from).collect(),
                    };
                    metrics::counter!("batchd_change_feed_changes_read_total")
                        .increment(slice.changes.len() as u64);
                    position.broadcast_to = page.next;
                    // No receiver is not an error: every watcher just left.
                    let _ = self.slices.send(Arc::new(slice));
                }
                position.read_to = Some(page.next);
            }
            cursor = page.next;
            if !full {
                return Ok(page.held_back_since.is_some());
            }
        }
    }

    fn lock_position(&self) -> std::sync::MutexGuard<'_, ReaderPosition> {
        // Every update under this lock is a plain assignment: a panic cannot leave it
        // half-done.
        self.position
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for FeedMembership {
    fn drop(&mut self) {
        self.feed.watchers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The reader: reads on every wake-up (coalesced), every poll, and soon again while
/// changes are held back; rests while nobody watches.
async fn run_reader(feed: Arc<ChangeFeed>, mut stopping: watch::Receiver<bool>) {
    let mut retry: Option<Duration> = None;
    loop {
        let wait = retry.unwrap_or(feed.poll);
        tokio::select! {
            _ = feed.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = crate::shutdown::requested(&mut stopping) => return,
        }
        if feed.watchers.load(Ordering::Acquire) == 0 {
            feed.lock_position().read_to = None;
            retry = None;
            metrics::gauge!("batchd_change_feed_delay_seconds").set(0.0);
            continue;
        }
        retry = match feed.read().await {
            Ok(false) => None,
            Ok(true) => {
                Some(retry.map_or(HELD_BACK_RETRY.0, |wait| (wait * 2).min(HELD_BACK_RETRY.1)))
            }
            Err(error) => {
                tracing::warn!(%error, "change feed reader cannot read the event log");
                Some(FAILED_READ_RETRY)
            }
        };
    }
}
