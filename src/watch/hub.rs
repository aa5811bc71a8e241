//! The per-replica hub: one feed per watched batch, woken by commits, notifications
//! and the safety poll; each feed reads the log once per wake-up for all watchers.
//!
//! A feed lives exactly as long as it has watchers. The feed map counts them under its
//! lock, and every subscription to a feed's broadcast is made under that same lock, so
//! a watcher never joins a feed that is being closed, and the last one to leave always
//! removes it, however many leave at once.
//!
//! The hub also counts each API key's open streams, and ends them all when the
//! database says the key was revoked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::change_feed::ChangeFeed;
use super::collection::{self, CollectionContext};
use super::subscriber::{self, WatcherContext};
use super::{FeedEvent, KEY_REVOKED, LOG_PAGE, WatchEvent, WatchOptions};
use crate::clock::wall_clock_ms;
use crate::domain::{Batch, BatchFilter, BatchId, BatchStatus, Caller, CursorSealer, FeedStart};
use crate::error::{Error, Result};
use crate::store::{ChangeNotifier, CommitListener, EventLog};

/// Versions a feed keeps for watchers that have not read them yet; one that falls
/// further behind catches up from the log.
const FEED_CAPACITY: usize = 256;

/// One watched batch.
pub(super) struct Feed {
    id: BatchId,
    sender: broadcast::Sender<Arc<Batch>>,
    wake: Notify,
    /// The latest version broadcast.
    cursor: AtomicI64,
    /// Wall-clock milliseconds of the earliest commit not yet broadcast (0: none
    /// known), for the notification lag metric.
    pending_commit_ms: AtomicI64,
    closed: AtomicBool,
    /// Held while advancing the cursor and broadcasting, by the feed's reader and by
    /// this replica's commits, so that each version goes out once and in order.
    publishing: std::sync::Mutex<()>,
}

impl Feed {
    /// Broadcasts `batch`, just committed by this replica, if it is the version right
    /// after the cursor; `true` when it went out now or already had. `false` means the
    /// feed has not seen versions before it, which only the log has.
    fn publish_commit(&self, batch: &Arc<Batch>) -> bool {
        let _publishing = self.lock_publishing();
        let cursor = self.cursor.load(Ordering::Acquire);
        if batch.version != cursor + 1 {
            return batch.version <= cursor;
        }
        self.advance(batch);
        true
    }

    /// Broadcasts `batch`, read from the log, if it is ahead of the cursor. The log is
    /// the truth: when compaction removed the versions right after the cursor, the
    /// cursor jumps to what the log has, and each watcher, seeing a version ahead of
    /// its own, catches up from the log itself (with a snapshot across the gap).
    fn publish_from_log(&self, batch: &Arc<Batch>) {
        let _publishing = self.lock_publishing();
        let cursor = self.cursor.load(Ordering::Acquire);
        if batch.version <= cursor {
            return;
        }
        if batch.version > cursor + 1 {
            tracing::info!(
                batch_id = %self.id,
                cursor,
                version = batch.version,
                "watch feed skips versions the event log no longer keeps"
            );
        }
        self.advance(batch);
    }

    /// Moves the cursor to `batch` and broadcasts it; the caller holds `publishing`.
    fn advance(&self, batch: &Arc<Batch>) {
        self.cursor.store(batch.version, Ordering::Release);
        // No receiver is not an error: the feed is being closed.
        let _ = self.sender.send(batch.clone());
    }

    fn lock_publishing(&self) -> std::sync::MutexGuard<'_, ()> {
        // Nothing under this lock can panic and leave the guarded state inconsistent.
        self.publishing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A watched batch in the feed map: its feed and how many subscriptions hold it.
struct FeedEntry {
    feed: Arc<Feed>,
    watchers: usize,
}

/// The open streams of one API key.
struct KeyStreams {
    open: usize,
    /// Turns `true` once the key is found revoked; every stream of the key ends then.
    revoked: watch::Sender<bool>,
}

/// The watch hub of one replica.
pub struct WatchHub {
    log: Arc<dyn EventLog>,
    options: WatchOptions,
    feeds: Mutex<HashMap<BatchId, FeedEntry>>,
    open_per_key: Mutex<HashMap<String, KeyStreams>>,
    notifier: OnceLock<Arc<dyn ChangeNotifier>>,
    /// The one reader of the change feed, for every collection watcher here.
    change_feed: Arc<ChangeFeed>,
    /// Signalled on every status move committed here and every commit on another
    /// replica: wakes the webhook dispatcher (a stored permit, so no commit between two
    /// reads goes unnoticed). A progress report here does not signal it: the dispatcher
    /// would read it only to pass over it, and its next read passes over every report
    /// since in one page.
    commits: Arc<Notify>,
    stopping: watch::Sender<bool>,
    /// Seals the change feed's cursors for clients and opens what they send back.
    cursors: CursorSealer,
}

/// A watcher's hold on a feed, counted in the feed map; dropping it lets the feed go
/// when it was the last.
struct Subscription {
    hub: Arc<WatchHub>,
    feed: Arc<Feed>,
    events: broadcast::Receiver<Arc<Batch>>,
}

/// One open stream counted against its API key; dropping it frees the place.
struct StreamPermit {
    hub: Arc<WatchHub>,
    key_id: String,
    /// The key's revocation signal.
    revoked: watch::Receiver<bool>,
}

impl WatchHub {
    /// A hub reading committed versions from `log`.
    pub fn new(
        log: Arc<dyn EventLog>,
        options: WatchOptions,
        cursors: CursorSealer,
    ) -> Arc<WatchHub> {
        Arc::new(WatchHub {
            cursors,
            change_feed: ChangeFeed::new(log.clone(), options.safety_poll),
            options,
            feeds: Mutex::default(),
            open_per_key: Mutex::default(),
            notifier: OnceLock::new(),
            log,
            commits: Arc::new(Notify::new()),
            stopping: watch::channel(false).0,
        })
    }

    /// What seals the change feed's cursors for clients.
    pub fn cursor_sealer(&self) -> &CursorSealer {
        &self.cursors
    }

    /// The signal of every status move committed here and of every commit (when the
    /// store announces them) on another replica: what wakes the webhook dispatcher.
    pub fn commits(&self) -> Arc<Notify> {
        self.commits.clone()
    }

    /// Announces this replica's commits to the other replicas through `notifier` from
    /// now on.
    pub fn publish_to(&self, notifier: Arc<dyn ChangeNotifier>) {
        let _ = self.notifier.set(notifier);
    }

    /// `batch` was committed by this replica, from a version in `previous_status`
    /// (`None` when it is the first): its watchers here get it at once when it is the
    /// version right after what they were sent (otherwise the feed reads the log), the
    /// webhook dispatcher wakes when it moved the status, and the other replicas are
    /// told.
    pub fn committed(&self, batch: &Arc<Batch>, previous_status: Option<BatchStatus>) {
        let at = wall_clock_ms();
        self.change_feed.wake();
        if batch.is_status_move(previous_status) {
            self.commits.notify_one();
        }
        let feed = self.feed_of(&batch.id);
        if let Some(feed) = feed {
            if feed.publish_commit(batch) {
                metrics::histogram!("batchd_watch_notify_lag_seconds")
                    .record((wall_clock_ms() - at).max(0) as f64 / 1_000.0);
            } else {
                self.wake_for_commit(&batch.id, at);
            }
        }
        if let Some(notifier) = self.notifier.get() {
            notifier.announce(&batch.id, at);
        }
    }

    /// Batch `id` was deleted here: the change feed reads the deletion, and the other
    /// replicas hear of it like a commit (their feeds read it, their caches forget the
    /// batch). Its per-batch watchers need nothing: only a terminal batch is deleted,
    /// and their streams ended with its terminal version.
    pub fn deleted(&self, id: &BatchId) {
        self.change_feed.wake();
        if let Some(notifier) = self.notifier.get() {
            notifier.announce(id, wall_clock_ms());
        }
    }

    /// Batch `id` changed in a commit at `committed_at_ms` (wall clock): its feed (if
    /// watched) re-reads the log.
    fn wake_for_commit(&self, id: &BatchId, committed_at_ms: i64) {
        if let Some(entry) = self.lock_feeds().get(id) {
            // Keep the earliest commit still waiting; 0 means none.
            let _ = entry.feed.pending_commit_ms.fetch_update(
                Ordering::AcqRel,
                Ordering::Acquire,
                |pending| (pending == 0 || committed_at_ms < pending).then_some(committed_at_ms),
            );
            entry.feed.wake.notify_one();
        }
    }

    /// Something may have changed batch `id`: its feed (if watched) re-reads the log.
    fn wake(&self, id: &BatchId) {
        if let Some(entry) = self.lock_feeds().get(id) {
            entry.feed.wake.notify_one();
        }
    }

    /// Wake-ups may have been lost (the listener reconnected): every feed re-reads.
    fn wake_all(&self) {
        for entry in self.lock_feeds().values() {
            entry.feed.wake.notify_one();
        }
    }

    /// Compares every feed's cursor with its batch's current version and wakes the
    /// feeds that are behind: the safety net for lost notifications.
    async fn poll_once(&self) -> Result<()> {
        let cursors: Vec<(BatchId, i64)> = self
            .lock_feeds()
            .values()
            .map(|entry| {
                let feed = &entry.feed;
                (feed.id.clone(), feed.cursor.load(Ordering::Acquire))
            })
            .collect();
        if cursors.is_empty() {
            return Ok(());
        }
        let ids: Vec<BatchId> = cursors.iter().map(|(id, _)| id.clone()).collect();
        let latest: HashMap<BatchId, i64> =
            self.log.latest_versions(&ids).await?.into_iter().collect();
        for (id, cursor) in cursors {
            if latest.get(&id).is_some_and(|&version| version > cursor) {
                tracing::debug!(batch_id = %id, "safety poll found a missed change");
                self.wake(&id);
            }
        }
        Ok(())
    }

    /// Runs [`WatchHub::poll_once`] every `safety_poll` until the hub stops.
    pub async fn run_safety_poll(self: Arc<Self>) {
        let mut stopping = self.stopping.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.options.safety_poll) => {
                    if let Err(error) = self.poll_once().await {
                        tracing::warn!(%error, "watch safety poll failed");
                    }
                }
                _ = crate::shutdown::requested(&mut stopping) => return,
            }
        }
    }

    /// The API keys with open streams on this replica.
    pub fn watching_keys(&self) -> Vec<String> {
        self.lock_keys().keys().cloned().collect()
    }

    /// Ends the streams of these revoked keys with UNAUTHENTICATED and refuses new ones
    /// while any of theirs is still open.
    pub fn end_streams_of_revoked(&self, key_ids: &[String]) {
        let open = self.lock_keys();
        for key_id in key_ids {
            if let Some(streams) = open.get(key_id)
                && !streams.revoked.send_replace(true)
            {
                tracing::info!(
                    key_id,
                    streams = streams.open,
                    "API key revoked: ending its watch streams"
                );
            }
        }
    }

    /// Ends every open stream with UNAVAILABLE (clients resume on another replica)
    /// and refuses new ones.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Open watch streams on this replica.
    pub fn open_streams(&self) -> usize {
        self.lock_keys().values().map(|streams| streams.open).sum()
    }

    /// Batches watched on this replica: one feed (and one reader task) each.
    pub fn watched_batches(&self) -> usize {
        self.lock_feeds().len()
    }

    /// Starts streaming batch `id` to `caller` (who may see it): counts the stream
    /// against the caller's key, joins the batch's feed, and spawns the watcher, which
    /// reads its starting point only after joining, so no commit can fall in between.
    pub(crate) async fn watch(
        self: &Arc<Self>,
        caller: &Caller,
        id: &BatchId,
        after_version: Option<i64>,
    ) -> Result<ReceiverStream<Result<WatchEvent>>> {
        if *self.stopping.borrow() {
            return Err(Error::ShuttingDown);
        }
        let permit = self.open_stream(&caller.key_id)?;
        let subscription = self.subscribe(id).await?;
        let (sender, receiver) = mpsc::channel(self.options.stream_buffer);
        let context = WatcherContext {
            log: self.log.clone(),
            batch_id: id.clone(),
            after_version,
            heartbeat: self.options.heartbeat,
            stopping: self.stopping.subscribe(),
            revoked: permit.revoked.clone(),
        };
        // A child of the request's span: the stream's work shows in the caller's trace.
        let span = tracing::info_span!("watch_stream", batch_id = %id, after_version);
        tokio::spawn(
            async move {
                let mut subscription = subscription;
                subscriber::run(context, &mut subscription.events, sender).await;
                drop(subscription);
                drop(permit);
            }
            .instrument(span),
        );
        Ok(ReceiverStream::new(receiver))
    }

    /// Starts streaming the change feed to `caller`: every change of the batches that
    /// match `filter` (already scoped to what the caller may see), from `start`. A
    /// cursor is checked here, so that the call itself fails when it is too old
    /// (compacted away) or ahead of anything the feed handed out.
    pub(crate) async fn watch_all(
        self: &Arc<Self>,
        caller: &Caller,
        filter: BatchFilter,
        start: FeedStart,
    ) -> Result<ReceiverStream<Result<FeedEvent>>> {
        if *self.stopping.borrow() {
            return Err(Error::ShuttingDown);
        }
        let permit = self.open_stream(&caller.key_id)?;
        if let FeedStart::After(cursor) = start {
            let bounds = self.log.feed_bounds().await?;
            // Sealed here, so only a database restored to an older state gets here.
            // Neither refusal names a position: the feed's are every tenant's.
            if cursor > bounds.head {
                return Err(Error::invalid(
                    "after_cursor",
                    "is ahead of the change feed (was the database restored from an older copy?); start again with send_initial_state",
                ));
            }
            if cursor < bounds.oldest {
                return Err(Error::FeedCompacted {
                    after: cursor.to_string(),
                    oldest: bounds.oldest.to_string(),
                });
            }
        }
        let membership = self
            .change_feed
            .join(filter.owner.as_deref(), self.stopping.subscribe());
        let (sender, receiver) = mpsc::channel(self.options.stream_buffer);
        let context = CollectionContext {
            log: self.log.clone(),
            feed: self.change_feed.clone(),
            filter,
            start,
            cursors: self.cursors.clone(),
            heartbeat: self.options.heartbeat,
            stopping: self.stopping.subscribe(),
            revoked: permit.revoked.clone(),
        };
        let span = tracing::info_span!("watch_batches_stream", start = ?start);
        tokio::spawn(
            async move {
                let mut membership = membership;
                collection::run(context, &mut membership.slices, sender).await;
                drop(membership);
                drop(permit);
            }
            .instrument(span),
        );
        Ok(ReceiverStream::new(receiver))
    }

    fn open_stream(self: &Arc<Self>, key_id: &str) -> Result<StreamPermit> {
        let limit = self.options.max_watches_per_key;
        let mut open = self.lock_keys();
        let streams = open.entry(key_id.to_owned()).or_insert_with(|| KeyStreams {
            open: 0,
            revoked: watch::channel(false).0,
        });
        // Revoked, but still cached as valid by the request's authentication: the
        // key's other streams are ending, and this one would at once.
        let refused = if *streams.revoked.borrow() {
            Some(Error::Unauthenticated(KEY_REVOKED))
        } else if streams.open >= limit {
            Some(Error::TooManyWatches { limit })
        } else {
            None
        };
        if let Some(error) = refused {
            if streams.open == 0 {
                open.remove(key_id);
            }
            return Err(error);
        }
        streams.open += 1;
        let revoked = streams.revoked.subscribe();
        metrics::gauge!("batchd_watch_streams_open").increment(1.0);
        Ok(StreamPermit {
            hub: self.clone(),
            key_id: key_id.to_owned(),
            revoked,
        })
    }

    /// Joins the feed of batch `id`, creating it if nobody watches the batch yet.
    async fn subscribe(self: &Arc<Self>, id: &BatchId) -> Result<Subscription> {
        if let Some(subscription) = self.join_existing(&mut self.lock_feeds(), id) {
            return Ok(subscription);
        }
        // The new feed starts at the version current now: every commit after this
        // read wakes it, since it is registered before the watcher reads its own start.
        let version = self
            .log
            .latest_versions(std::slice::from_ref(id))
            .await?
            .first()
            .map_or(0, |(_, version)| *version);
        let mut feeds = self.lock_feeds();
        // Another watcher may have created it meanwhile.
        if let Some(subscription) = self.join_existing(&mut feeds, id) {
            return Ok(subscription);
        }
        let feed = Arc::new(Feed {
            id: id.clone(),
            sender: broadcast::channel(FEED_CAPACITY).0,
            wake: Notify::new(),
            cursor: AtomicI64::new(version),
            pending_commit_ms: AtomicI64::new(0),
            closed: AtomicBool::new(false),
            publishing: std::sync::Mutex::new(()),
        });
        feeds.insert(
            id.clone(),
            FeedEntry {
                feed: feed.clone(),
                watchers: 1,
            },
        );
        let subscription = Subscription {
            hub: self.clone(),
            events: feed.sender.subscribe(),
            feed: feed.clone(),
        };
        drop(feeds);
        tokio::spawn(run_feed(self.log.clone(), feed));
        Ok(subscription)
    }

    /// Joins the feed of batch `id` if there is one. Takes the map's guard: counting
    /// the watcher and subscribing to the broadcast under the lock is what keeps the
    /// last leaving watcher from closing the feed in between.
    fn join_existing(
        self: &Arc<Self>,
        feeds: &mut HashMap<BatchId, FeedEntry>,
        id: &BatchId,
    ) -> Option<Subscription> {
        let entry = feeds.get_mut(id)?;
        entry.watchers += 1;
        Some(Subscription {
            hub: self.clone(),
            events: entry.feed.sender.subscribe(),
            feed: entry.feed.clone(),
        })
    }

    fn feed_of(&self, id: &BatchId) -> Option<Arc<Feed>> {
        self.lock_feeds().get(id).map(|entry| entry.feed.clone())
    }

    fn lock_feeds(&self) -> std::sync::MutexGuard<'_, HashMap<BatchId, FeedEntry>> {
        // A panic while holding the lock cannot leave the map inconsistent (every
        // update is a single insert, remove or count change), so a poisoned lock is
        // still usable.
        self.feeds
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, KeyStreams>> {
        self.open_per_key
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Other replicas' commits, heard through the store's [`ChangeNotifier`].
impl CommitListener for WatchHub {
    fn committed_elsewhere(&self, id: &BatchId, committed_at_ms: i64) {
        self.change_feed.wake();
        self.commits.notify_one();
        self.wake_for_commit(id, committed_at_ms);
    }

    fn announcements_lost(&self) {
        self.change_feed.wake();
        self.commits.notify_one();
        self.wake_all();
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut feeds = self.hub.lock_feeds();
        let Some(entry) = feeds.get_mut(&self.feed.id) else {
            return;
        };
        // The map keeps a feed while it has watchers, so this is always ours; the
        // check only keeps a bug from closing another feed.
        if !Arc::ptr_eq(&entry.feed, &self.feed) {
            return;
        }
        entry.watchers -= 1;
        if entry.watchers == 0 {
            feeds.remove(&self.feed.id);
            self.feed.closed.store(true, Ordering::Release);
            self.feed.wake.notify_one();
        }
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        metrics::gauge!("batchd_watch_streams_open").decrement(1.0);
        let mut open = self.hub.lock_keys();
        if let Some(streams) = open.get_mut(&self.key_id) {
            streams.open -= 1;
            if streams.open == 0 {
                open.remove(&self.key_id);
            }
        }
    }
}

/// A feed's reader: on every wake-up, reads the versions after its cursor from the log
/// and broadcasts them. Wake-ups that arrive while it reads coalesce into one more read.
async fn run_feed(log: Arc<dyn EventLog>, feed: Arc<Feed>) {
    loop {
        feed.wake.notified().await;
        if feed.closed.load(Ordering::Acquire) {
            return;
        }
        // Not a child of whichever request woke the feed: it serves every watcher.
        let span = tracing::info_span!(parent: None, "watch_feed_read", batch_id = %feed.id, versions = tracing::field::Empty);
        read_new_versions(log.as_ref(), &feed)
            .instrument(span)
            .await;
    }
}

/// Broadcasts every version after the feed's cursor.
async fn read_new_versions(log: &dyn EventLog, feed: &Feed) {
    let mut versions = 0;
    loop {
        let cursor = feed.cursor.load(Ordering::Acquire);
        match log.events_after(&feed.id, cursor, LOG_PAGE).await {
            Ok(events) => {
                let complete = (events.len() as i64) < LOG_PAGE;
                if !events.is_empty() {
                    let committed = feed.pending_commit_ms.swap(0, Ordering::AcqRel);
                    if committed > 0 {
                        let lag = (wall_clock_ms() - committed).max(0) as f64 / 1_000.0;
                        metrics::histogram!("batchd_watch_notify_lag_seconds").record(lag);
                    }
                }
                for event in events {
                    versions += 1;
                    feed.publish_from_log(&Arc::new(event.batch));
                }
                if complete {
                    break;
                }
            }
            Err(error) => {
                // The safety poll wakes this feed again once the database answers.
                tracing::warn!(batch_id = %feed.id, %error, "watch feed cannot read the event log");
                tokio::time::sleep(Duration::from_millis(200)).await;
                break;
            }
        }
    }
    tracing::Span::current().record("versions", versions);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use tokio::sync::Barrier;
    use tokio::task::JoinSet;

    use super::WatchHub;
    use crate::domain::{BatchId, BatchStatus};
    use crate::store::StoreOptions;
    use crate::watch::WatchOptions;

    async fn hub() -> Arc<WatchHub> {
        let store = crate::store::connect("sqlite::memory:", &StoreOptions::default())
            .await
            .expect("an in-memory database");
        store.migrate().await.expect("migrations");
        WatchHub::new(
            store,
            WatchOptions::default(),
            crate::domain::CursorSealer::with_random_key(),
        )
    }

    /// The webhook dispatcher is woken by status moves committed here, not by progress
    /// reports: it reads the reports past only when a move or its poll wakes it.
    #[tokio::test]
    async fn only_a_status_move_committed_here_wakes_the_webhook_dispatcher() {
        let hub = hub().await;
        let commits = hub.commits();
        let woken = || async {
            tokio::time::timeout(Duration::from_millis(50), commits.notified())
                .await
                .is_ok()
        };
        let created = crate::domain::fixtures::batch();
        hub.committed(&Arc::new(created.clone()), None);
        assert!(woken().await, "a new batch");
        let mut progressed = created.clone();
        progressed.version += 1;
        progressed.request_counts.completed += 1;
        hub.committed(&Arc::new(progressed.clone()), Some(created.status));
        assert!(!woken().await, "a progress report");
        let mut moved = progressed.clone();
        moved.version += 1;
        moved.status = BatchStatus::Finalizing;
        hub.committed(&Arc::new(moved), Some(progressed.status));
        assert!(woken().await, "a status move");
    }

    /// Watchers join while the last one leaves, on several threads at once: none ever
    /// holds a feed that was closed under it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_watcher_never_joins_a_feed_that_is_closing() {
        let hub = hub().await;
        let id = BatchId::generate();
        let mut watchers = JoinSet::new();
        for _ in 0..4 {
            let (hub, id) = (hub.clone(), id.clone());
            watchers.spawn(async move {
                for _ in 0..20_000 {
                    let subscription = hub.subscribe(&id).await.expect("subscribe");
                    assert!(
                        !subscription.feed.closed.load(Ordering::Acquire),
                        "joined a closed feed"
                    );
                }
            });
        }
        while let Some(done) = watchers.join_next().await {
            done.expect("watcher");
        }
        assert_eq!(hub.watched_batches(), 0);
    }

    /// Every round, several watchers of one feed leave at the same moment: afterwards
    /// the feed is gone, every time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_last_of_watchers_leaving_together_removes_the_feed() {
        const WATCHERS: usize = 4;
        let hub = hub().await;
        let id = BatchId::generate();
        let barrier = Arc::new(Barrier::new(WATCHERS));
        let mut watchers = JoinSet::new();
        for _ in 0..WATCHERS {
            let (hub, id, barrier) = (hub.clone(), id.clone(), barrier.clone());
            watchers.spawn(async move {
                for round in 0..5_000 {
                    let subscription = hub.subscribe(&id).await.expect("subscribe");
                    barrier.wait().await;
                    drop(subscription);
                    barrier.wait().await;
                    assert_eq!(
                        hub.watched_batches(),
                        0,
                        "a feed left behind in round {round}"
                    );
                    barrier.wait().await;
                }
            });
        }
        while let Some(done) = watchers.join_next().await {
            done.expect("watcher");
        }
    }
}
