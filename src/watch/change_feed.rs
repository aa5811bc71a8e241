//! The change feed of one replica: one reader of the event log, in feed order, for all
//! of this replica's collection watchers. Each read is broadcast once as a slice, the
//! changes of a range of cursors `(from, to]`: all of them to the watchers of every
//! owner (worker and admin keys), and to the watchers of one owner only that owner's,
//! on a channel of its own, so that a tenant's watchers wake only for its changes. A
//! watcher applies its filter to each change in memory. A watcher whose cursor is inside or at the start of a
//! slice takes the changes after its cursor; one that is behind the slice (it fell
//! behind, or joined between two reads) reads the log itself, so a slow watcher never
//! makes a gap and never holds up the others.
//!
//! The reader reads only while some watcher is joined, when a commit here or on another
//! replica wakes it, at least every safety poll, and, while committed changes are held
//! back behind an older transaction still running (PostgreSQL), again after a short
//! backoff. How long they have been held back is the `batchd_change_feed_delay_seconds`
//! gauge.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, SemaphorePermit, broadcast, watch};

use crate::domain::{Batch, BatchStatus, FeedCursor};
use crate::error::{Error, Result};
use crate::store::{EventLog, FeedChange};

/// Changes read from the log per query.
pub(super) const FEED_PAGE: i64 = 256;

/// Slices kept for watchers that have not read them yet; one that falls further behind
/// reads the log itself. The buffer is a ring, so this bounds the replica's memory
/// whatever its watchers do: at most this many reads' changes are held.
const SLICE_CAPACITY: usize = 16;

/// Reads of the log by watchers catching up (each a page) at once, on this replica:
/// however many streams fall behind or resume from old cursors, they take turns and
/// load the database no more than this.
const CATCH_UP_READS: usize = 2;

/// The first and the longest wait before reading again while changes are held back.
const HELD_BACK_RETRY: (Duration, Duration) = (Duration::from_millis(20), Duration::from_secs(1));

/// While busy, the reader pauses after a read for this long per change it read, up to
/// `MAX_BUSY_PAUSE`, so that under a heavy write load it reads more changes per query
/// (and asks the database less often), at the cost of at most that much latency; a
/// lightly loaded feed (a change or two per read) is read at once.
const BUSY_PAUSE_PER_CHANGE: Duration = Duration::from_micros(200);
const MAX_BUSY_PAUSE: Duration = Duration::from_millis(5);

/// How long the reader waits after a failed read.
const FAILED_READ_RETRY: Duration = Duration::from_millis(200);

/// One committed version, shared by every watcher that sends it.
#[derive(Debug, Clone)]
pub(super) struct SharedChange {
    pub(super) cursor: FeedCursor,
    pub(super) batch: Arc<Batch>,
    pub(super) previous_status: Option<BatchStatus>,
    /// The batch was deleted; `batch` is its last version.
    pub(super) deleted: bool,
}

impl From<FeedChange> for SharedChange {
    fn from(change: FeedChange) -> SharedChange {
        SharedChange {
            cursor: change.cursor,
            batch: Arc::new(change.batch),
            previous_status: change.previous_status,
            deleted: change.deleted,
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

/// A channel of slices: every slice sent on it is complete, for what the channel
/// carries, over `(from, to]`, and `from` is the previous slice's `to`.
#[derive(Debug)]
struct SliceChannel {
    sender: broadcast::Sender<Arc<FeedSlice>>,
    /// The `to` of the latest slice sent, or where the channel started: nothing it
    /// carries changed between it and the reader's `read_to`.
    broadcast_to: FeedCursor,
    /// Watchers joined (the channel of one owner goes with its last watcher).
    watchers: usize,
}

impl SliceChannel {
    fn new(start: FeedCursor) -> SliceChannel {
        SliceChannel {
            sender: broadcast::channel(SLICE_CAPACITY).0,
            broadcast_to: start,
            watchers: 0,
        }
    }

    /// Starts the channel again at `head`, telling its watchers with an empty slice.
    fn restart_at(&mut self, head: FeedCursor) {
        self.broadcast_to = head;
        let _ = self.sender.send(Arc::new(FeedSlice {
            from: head,
            to: head,
            changes: Vec::new(),
        }));
    }

    /// Sends the changes up to `to` (possibly none: then nothing is sent, and the next
    /// slice covers the range).
    fn send(&mut self, to: FeedCursor, changes: Vec<SharedChange>) {
        if changes.is_empty() {
            return;
        }
        let slice = FeedSlice {
            from: self.broadcast_to,
            to,
            changes,
        };
        self.broadcast_to = to;
        // No receiver is not an error: every watcher just left.
        let _ = self.sender.send(Arc::new(slice));
    }
}

/// Where the reader is, and its channels.
#[derive(Debug)]
struct ReaderPosition {
    /// Read up to here; `None` while the reader rests (it starts at the head again).
    read_to: Option<FeedCursor>,
    /// Every change, for the watchers of every owner.
    everything: SliceChannel,
    /// Each owner's changes, for the owners with watchers here.
    owners: HashMap<String, SliceChannel>,
}

impl ReaderPosition {
    /// Starts every channel at `head`: the reader starts reading there. Each channel
    /// says so with an empty slice `(head, head]`, so that a watcher behind it (however
    /// quiet its owner stays) reads the log up to there, and one past it skips it.
    fn start_at(&mut self, head: FeedCursor) {
        self.read_to = Some(head);
        self.everything.restart_at(head);
        for channel in self.owners.values_mut() {
            channel.restart_at(head);
        }
    }

    fn channel(&mut self, owner: Option<&str>) -> Option<&mut SliceChannel> {
        match owner {
            None => Some(&mut self.everything),
            Some(owner) => self.owners.get_mut(owner),
        }
    }
}

/// The change feed reader of one replica.
pub(super) struct ChangeFeed {
    log: Arc<dyn EventLog>,
    wake: Notify,
    watchers: AtomicUsize,
    position: Mutex<ReaderPosition>,
    reader_started: OnceLock<()>,
    poll: Duration,
    catch_up_reads: Semaphore,
}

/// A watcher's place in the feed; dropping it lets the reader rest when it was the
/// last, and closes its owner's channel when it was the owner's last.
pub(super) struct FeedMembership {
    feed: Arc<ChangeFeed>,
    owner: Option<String>,
    pub(super) slices: broadcast::Receiver<Arc<FeedSlice>>,
}

impl ChangeFeed {
    /// A feed over `log`, read at least every `poll` while watched.
    pub(super) fn new(log: Arc<dyn EventLog>, poll: Duration) -> Arc<ChangeFeed> {
        Arc::new(ChangeFeed {
            log,
            wake: Notify::new(),
            watchers: AtomicUsize::new(0),
            position: Mutex::new(ReaderPosition {
                read_to: None,
                everything: SliceChannel::new(FeedCursor::default()),
                owners: HashMap::new(),
            }),
            reader_started: OnceLock::new(),
            poll,
            catch_up_reads: Semaphore::new(CATCH_UP_READS),
        })
    }

    /// Something was committed: the reader reads, if anyone watches.
    pub(super) fn wake(&self) {
        if self.watchers.load(Ordering::Acquire) > 0 {
            self.wake.notify_one();
        }
    }

    /// Joins the feed: the watcher receives every slice of `owner`'s changes (every
    /// owner's for `None`) broadcast from now on. Starts the reader on first use; it
    /// stops when `stopping` turns true.
    pub(super) fn join(
        self: &Arc<Self>,
        owner: Option<&str>,
        stopping: watch::Receiver<bool>,
    ) -> FeedMembership {
        let slices = {
            let mut position = self.lock_position();
            // A new channel starts where the reader is: nothing before was missed.
            let start = position.read_to.unwrap_or_default();
            let channel = match owner {
                None => &mut position.everything,
                Some(owner) => position
                    .owners
                    .entry(owner.to_owned())
                    .or_insert_with(|| SliceChannel::new(start)),
            };
            channel.watchers += 1;
            channel.sender.subscribe()
        };
        self.watchers.fetch_add(1, Ordering::AcqRel);
        if self.reader_started.set(()).is_ok() {
            tokio::spawn(run_reader(self.clone(), stopping));
        }
        self.wake.notify_one();
        FeedMembership {
            feed: self.clone(),
            owner: owner.map(str::to_owned),
            slices,
        }
    }

    /// A turn to read a page of the log for a watcher's own catch-up or listing.
    pub(super) async fn catch_up_turn(&self) -> Result<SemaphorePermit<'_>> {
        self.catch_up_reads
            .acquire()
            .await
            .map_err(|_| Error::Internal("the catch-up semaphore was closed".into()))
    }

    /// A cursor at or after `cursor` with no change of `owner`'s (every owner's for
    /// `None`) in between: the reader's, when a watcher at `cursor` has everything its
    /// channel sent so far; for idle bookmarks.
    pub(super) fn idle_cursor(&self, owner: Option<&str>, cursor: FeedCursor) -> FeedCursor {
        let mut position = self.lock_position();
        let read_to = position.read_to;
        let sent_to = position.channel(owner).map(|channel| channel.broadcast_to);
        match (read_to, sent_to) {
            (Some(read_to), Some(sent_to)) if cursor >= sent_to => cursor.max(read_to),
            _ => cursor,
        }
    }

    /// Reads everything after the reader's position and broadcasts it. Returns how
    /// many changes it read and whether committed changes are held back (read again
    /// soon).
    async fn read(&self) -> Result<(usize, bool)> {
        let mut read = 0;
        let start = self.lock_position().read_to;
        let mut cursor = match start {
            Some(cursor) => cursor,
            None => {
                let head = self.log.feed_bounds().await?.head;
                self.lock_position().start_at(head);
                head
            }
        };
        loop {
            let page = match self.log.changes_after(cursor, None, FEED_PAGE).await {
                Ok(page) => page,
                Err(Error::FeedCompacted { oldest, .. }) => {
                    // Only a reader far behind (the database was away for longer than
                    // the retention) gets here. It starts again at the head; every
                    // watcher, behind the next slice, reads the log and is refused.
                    tracing::warn!(%cursor, %oldest, "change feed reader fell behind compaction; restarting at the head");
                    self.lock_position().read_to = None;
                    return Ok((read, false));
                }
                Err(error) => return Err(error),
            };
            let full = page.read as i64 >= FEED_PAGE;
            read += page.changes.len();
            let delay = page
                .held_back_since
                .map_or(0, |at| (crate::clock::wall_clock_ms() / 1_000 - at).max(0));
            metrics::gauge!("batchd_change_feed_delay_seconds").set(delay as f64);
            {
                let mut position = self.lock_position();
                metrics::counter!("batchd_change_feed_changes_read_total")
                    .increment(page.changes.len() as u64);
                let changes: Vec<SharedChange> =
                    page.changes.into_iter().map(SharedChange::from).collect();
                if !position.owners.is_empty() {
                    let mut by_owner: HashMap<&str, Vec<SharedChange>> = HashMap::new();
                    for change in &changes {
                        let owner = change.batch.user_id.as_str();
                        if position.owners.contains_key(owner) {
                            by_owner.entry(owner).or_default().push(change.clone());
                        }
                    }
                    for (owner, theirs) in by_owner {
                        if let Some(channel) = position.owners.get_mut(owner) {
                            channel.send(page.next, theirs);
                        }
                    }
                }
                position.everything.send(page.next, changes);
                position.read_to = Some(page.next);
            }
            cursor = page.next;
            if !full {
                return Ok((read, page.held_back_since.is_some()));
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
        {
            let mut position = self.feed.lock_position();
            if let Some(channel) = position.channel(self.owner.as_deref()) {
                channel.watchers -= 1;
                if channel.watchers == 0
                    && let Some(owner) = &self.owner
                {
                    position.owners.remove(owner);
                }
            }
        }
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
        let (read, held_back) = match feed.read().await {
            Ok(outcome) => outcome,
            Err(error) => {
                tracing::warn!(%error, "change feed reader cannot read the event log");
                retry = Some(FAILED_READ_RETRY);
                continue;
            }
        };
        retry = held_back
            .then(|| retry.map_or(HELD_BACK_RETRY.0, |wait| (wait * 2).min(HELD_BACK_RETRY.1)));
        let pause = (BUSY_PAUSE_PER_CHANGE * read as u32).min(MAX_BUSY_PAUSE);
        if read > 1 {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = crate::shutdown::requested(&mut stopping) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::ChangeFeed;
    use crate::domain::FeedCursor;
    use crate::store::StoreOptions;

    /// A reader that starts (or starts again) at the head tells every channel, however
    /// quiet its owner: a watcher behind the head gets a slice starting past its cursor,
    /// which sends it to the log, instead of waiting behind the channel for good.
    #[tokio::test]
    async fn a_starting_reader_tells_a_quiet_owner_where_it_starts() {
        let store = crate::store::connect("sqlite::memory:", &StoreOptions::default())
            .await
            .expect("an in-memory database");
        store.migrate().await.expect("migrations");
        // Another owner's batch: the head moves past where alice's channel begins.
        let bobs = crate::domain::fixtures::created_by("bob", 1_700_000_000);
        store.insert_batch(&bobs, None).await.unwrap();
        let head = store.feed_bounds().await.unwrap().head;
        assert!(head > FeedCursor::default());

        let feed = ChangeFeed::new(store, Duration::from_secs(3600));
        let (_keep_running, stopping) = tokio::sync::watch::channel(false);
        let mut alice = feed.join(Some("alice"), stopping);
        let slice = tokio::time::timeout(Duration::from_secs(5), alice.slices.recv())
            .await
            .expect("the starting reader tells alice's channel")
            .unwrap();
        assert_eq!((slice.from, slice.to), (head, head));
        assert!(slice.changes.is_empty(), "bob's change is not alice's");
        assert_eq!(
            feed.idle_cursor(Some("alice"), head),
            head,
            "a watcher at the head is in step with its channel"
        );
        drop(alice);
    }
}
