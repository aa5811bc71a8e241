//! The per-replica hub: one feed per watched batch, woken by commits, notifications
//! and the safety poll; each feed reads the log once per wake-up for all watchers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::postgres::Outbox;
use super::subscriber::{self, Start};
use super::{WatchEvent, WatchOptions};
use crate::domain::{Batch, BatchId, Caller};
use crate::error::{Error, Result};
use crate::store::Store;

/// Versions a feed keeps for watchers that have not read them yet; one that falls
/// further behind catches up from the log.
const FEED_CAPACITY: usize = 256;
/// Versions read from the log per query.
pub(super) const LOG_PAGE: i64 = 256;

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
    /// Broadcasts `batch` if it is the version right after the cursor; `true` when it
    /// went out now or already had.
    fn publish(&self, batch: &Arc<Batch>) -> bool {
        // Nothing in here can panic and leave the guarded state inconsistent.
        let _publishing = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        let cursor = self.cursor.load(Ordering::Acquire);
        if batch.version != cursor + 1 {
            return batch.version <= cursor;
        }
        self.cursor.store(batch.version, Ordering::Release);
        // No receiver is not an error: the feed is being closed.
        let _ = self.sender.send(batch.clone());
        true
    }
}

/// The watch hub of one replica.
pub struct WatchHub {
    store: Arc<dyn Store>,
    options: WatchOptions,
    feeds: Mutex<HashMap<BatchId, Arc<Feed>>>,
    open_per_key: Mutex<HashMap<String, usize>>,
    outbox: OnceLock<Arc<Outbox>>,
    stopping: watch::Sender<bool>,
}

/// A watcher's hold on a feed; dropping it lets the feed go when it was the last.
pub(super) struct Subscription {
    hub: Arc<WatchHub>,
    feed: Arc<Feed>,
    pub(super) events: broadcast::Receiver<Arc<Batch>>,
}

/// One open stream counted against its API key; dropping it frees the place.
pub(super) struct StreamPermit {
    hub: Arc<WatchHub>,
    key_id: String,
}

impl WatchHub {
    /// A hub over `store`.
    pub fn new(store: Arc<dyn Store>, options: WatchOptions) -> Arc<WatchHub> {
        Arc::new(WatchHub {
            store,
            options,
            feeds: Mutex::default(),
            open_per_key: Mutex::default(),
            outbox: OnceLock::new(),
            stopping: watch::channel(false).0,
        })
    }

    /// Sends wake-ups for this replica's commits to the other replicas through
    /// `outbox` from now on.
    pub fn publish_to(&self, outbox: Arc<Outbox>) {
        let _ = self.outbox.set(outbox);
    }

    /// `batch` was committed by this replica: its watchers here get it at once when
    /// it is the version right after what they were sent (otherwise the feed reads the
    /// log), and the other replicas are told.
    pub fn committed(&self, batch: &Arc<Batch>) {
        let at = now_ms();
        let feed = self.lock_feeds().get(&batch.id).cloned();
        if let Some(feed) = feed {
            if feed.publish(batch) {
                metrics::histogram!("batchd_watch_notify_lag_seconds")
                    .record((now_ms() - at).max(0) as f64 / 1_000.0);
            } else {
                self.wake_for_commit(&batch.id, at);
            }
        }
        if let Some(outbox) = self.outbox.get() {
            outbox.push(&batch.id, at);
        }
    }

    /// Batch `id` changed in a commit at `committed_at_ms` (wall clock): its feed (if
    /// watched) re-reads the log.
    pub fn wake_for_commit(&self, id: &BatchId, committed_at_ms: i64) {
        if let Some(feed) = self.lock_feeds().get(id) {
            // Keep the earliest commit still waiting; 0 means none.
            let _ = feed.pending_commit_ms.fetch_update(
                Ordering::AcqRel,
                Ordering::Acquire,
                |pending| (pending == 0 || committed_at_ms < pending).then_some(committed_at_ms),
            );
            feed.wake.notify_one();
        }
    }

    /// Something may have changed batch `id`: its feed (if watched) re-reads the log.
    pub fn wake(&self, id: &BatchId) {
        if let Some(feed) = self.lock_feeds().get(id) {
            feed.wake.notify_one();
        }
    }

    /// Wake-ups may have been lost (the listener reconnected): every feed re-reads.
    pub fn wake_all(&self) {
        for feed in self.lock_feeds().values() {
            feed.wake.notify_one();
        }
    }

    /// Compares every feed's cursor with its batch's current version and wakes the
    /// feeds that are behind: the safety net for lost notifications.
    pub async fn poll_once(&self) -> Result<()> {
        let cursors: Vec<(BatchId, i64)> = self
            .lock_feeds()
            .values()
            .map(|feed| (feed.id.clone(), feed.cursor.load(Ordering::Acquire)))
            .collect();
        if cursors.is_empty() {
            return Ok(());
        }
        let ids: Vec<BatchId> = cursors.iter().map(|(id, _)| id.clone()).collect();
        let latest: HashMap<BatchId, i64> = self
            .store
            .latest_versions(&ids)
            .await?
            .into_iter()
            .collect();
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

    /// Ends every open stream with UNAVAILABLE (clients resume on another replica)
    /// and refuses new ones.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Open watch streams on this replica.
    pub fn open_streams(&self) -> usize {
        self.lock_keys().values().sum()
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
        let start = Start {
            store: self.store.clone(),
            batch_id: id.clone(),
            after_version,
            heartbeat: self.options.heartbeat,
            stopping: self.stopping.subscribe(),
        };
        // A child of the request's span: the stream's work shows in the caller's trace.
        let span = tracing::info_span!("watch_stream", batch_id = %id, after_version);
        tokio::spawn(
            async move {
                subscriber::run(start, subscription, sender).await;
                drop(permit);
            }
            .instrument(span),
        );
        Ok(ReceiverStream::new(receiver))
    }

    fn open_stream(self: &Arc<Self>, key_id: &str) -> Result<StreamPermit> {
        let limit = self.options.max_watches_per_key;
        let mut open = self.lock_keys();
        let count = open.entry(key_id.to_owned()).or_default();
        if *count >= limit {
            return Err(Error::TooManyWatches { limit });
        }
        *count += 1;
        metrics::gauge!("batchd_watch_streams_open").increment(1.0);
        Ok(StreamPermit {
            hub: self.clone(),
            key_id: key_id.to_owned(),
        })
    }

    /// Joins the feed of batch `id`, creating it if nobody watches the batch yet.
    async fn subscribe(self: &Arc<Self>, id: &BatchId) -> Result<Subscription> {
        if let Some(subscription) = self.join_existing(id) {
            return Ok(subscription);
        }
        // The new feed starts at the version current now: every commit after this
        // read wakes it, since it is registered before the watcher reads its own start.
        let version = self
            .store
            .latest_versions(std::slice::from_ref(id))
            .await?
            .first()
            .map_or(0, |(_, version)| *version);
        let mut feeds = self.lock_feeds();
        // Another watcher may have created it meanwhile.
        if let Some(feed) = feeds.get(id) {
            return Ok(self.subscription(feed.clone()));
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
        feeds.insert(id.clone(), feed.clone());
        let subscription = self.subscription(feed.clone());
        tokio::spawn(run_feed(self.store.clone(), feed));
        Ok(subscription)
    }

    fn join_existing(self: &Arc<Self>, id: &BatchId) -> Option<Subscription> {
        let feed = self.lock_feeds().get(id).cloned()?;
        Some(self.subscription(feed))
    }

    fn subscription(self: &Arc<Self>, feed: Arc<Feed>) -> Subscription {
        Subscription {
            hub: self.clone(),
            events: feed.sender.subscribe(),
            feed,
        }
    }

    fn lock_feeds(&self) -> std::sync::MutexGuard<'_, HashMap<BatchId, Arc<Feed>>> {
        // A panic while holding the lock cannot leave the map inconsistent (every
        // update is a single insert or remove), so a poisoned lock is still usable.
        self.feeds
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.open_per_key
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut feeds = self.hub.lock_feeds();
        // This receiver still counts until the struct is gone, hence `<= 1`. The
        // check runs under the map's lock, which every new subscription also takes.
        if self.feed.sender.receiver_count() <= 1
            && feeds
                .get(&self.feed.id)
                .is_some_and(|feed| Arc::ptr_eq(feed, &self.feed))
        {
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
        if let Some(count) = open.get_mut(&self.key_id) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key_id);
            }
        }
    }
}

/// A feed's reader: on every wake-up, reads the versions after its cursor from the log
/// and broadcasts them. Wake-ups that arrive while it reads coalesce into one more read.
async fn run_feed(store: Arc<dyn Store>, feed: Arc<Feed>) {
    loop {
        feed.wake.notified().await;
        if feed.closed.load(Ordering::Acquire) {
            return;
        }
        // Not a child of whichever request woke the feed: it serves every watcher.
        let span = tracing::info_span!(parent: None, "watch_feed_read", batch_id = %feed.id, versions = tracing::field::Empty);
        read_new_versions(store.as_ref(), &feed)
            .instrument(span)
            .await;
    }
}

/// Broadcasts every version after the feed's cursor.
async fn read_new_versions(store: &dyn Store, feed: &Feed) {
    let mut versions = 0;
    loop {
        let cursor = feed.cursor.load(Ordering::Acquire);
        match store.events_after(&feed.id, cursor, LOG_PAGE).await {
            Ok(events) => {
                let complete = (events.len() as i64) < LOG_PAGE;
                if !events.is_empty() {
                    let committed = feed.pending_commit_ms.swap(0, Ordering::AcqRel);
                    if committed > 0 {
                        let lag = (now_ms() - committed).max(0) as f64 / 1_000.0;
                        metrics::histogram!("batchd_watch_notify_lag_seconds").record(lag);
                    }
                }
                for event in events {
                    versions += 1;
                    feed.publish(&Arc::new(event.batch));
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

/// Wall-clock Unix milliseconds: commit times travel between replicas, so they cannot
/// be `Instant`s.
pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
