//! One watch stream: its start (snapshot, or the versions after `after_version`), then
//! every next version from the feed, checked for contiguity, with catch-up from the log
//! whenever the feed's broadcast skipped ahead, and heartbeats while nothing changes.
//! It ends early when the replica stops or the stream's API key is found revoked.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use tokio::sync::broadcast;

use super::{KEY_REVOKED, LOG_PAGE, Stop, WatchEvent, WatchEventKind};
use crate::domain::{Batch, BatchId};
use crate::error::{Error, Result};
use crate::store::EventLog;

/// What a watcher works with: the request, where to read, when to stop.
pub(super) struct WatcherContext {
    pub(super) log: Arc<dyn EventLog>,
    pub(super) batch_id: BatchId,
    pub(super) after_version: Option<i64>,
    pub(super) heartbeat: Duration,
    pub(super) stopping: watch::Receiver<bool>,
    /// Turns `true` when the stream's API key is found revoked.
    pub(super) revoked: watch::Receiver<bool>,
}

struct Watcher {
    context: WatcherContext,
    out: mpsc::Sender<Result<WatchEvent>>,
    /// The latest version sent (0 before the first).
    cursor: i64,
    /// The batch at `cursor`.
    last: Option<Arc<Batch>>,
    last_sent: Instant,
}

/// Streams batch events into `out` until the batch is terminal (the stream then ends
/// normally), the client goes away, or an error ends it.
pub(super) async fn run(
    context: WatcherContext,
    feed: &mut broadcast::Receiver<Arc<Batch>>,
    out: mpsc::Sender<Result<WatchEvent>>,
) {
    let mut watcher = Watcher {
        cursor: context.after_version.unwrap_or(0),
        context,
        out,
        last: None,
        last_sent: Instant::now(),
    };
    let outcome = watcher.stream(feed).await;
    super::end_stream(outcome, &watcher.out).await;
}

impl Watcher {
    async fn stream(&mut self, feed: &mut broadcast::Receiver<Arc<Batch>>) -> Result<(), Stop> {
        match self.context.after_version {
            None => {
                let current = self.current().await?;
                self.send(WatchEventKind::Snapshot, current).await?;
            }
            Some(_) => loop {
                self.catch_up().await?;
                if self.last.is_some() {
                    break;
                }
                // Nothing after `after_version` was in the log: the batch is at that
                // version, unless a commit landed between the two reads. Then it is
                // in the log now, and the next catch-up sends it: taking the newer
                // version as the starting point would skip it (and, were it terminal,
                // end the stream without a word).
                let current = self.current().await?;
                if current.version <= self.cursor {
                    self.last = Some(current);
                    break;
                }
            },
        }
        let mut stopping = self.context.stopping.clone();
        let mut revoked = self.context.revoked.clone();
        loop {
            if self.last.as_ref().is_some_and(|b| b.status.is_terminal()) {
                return Ok(());
            }
            let next_heartbeat = self.last_sent + self.context.heartbeat;
            tokio::select! {
                _ = crate::shutdown::requested(&mut stopping) => return Err(Error::ShuttingDown.into()),
                _ = super::key_revoked(&mut revoked) => return Err(Error::Unauthenticated(KEY_REVOKED).into()),
                _ = self.out.closed() => return Err(Stop::ClientGone),
                received = feed.recv() => match received {
                    Ok(batch) if batch.version <= self.cursor => {}
                    Ok(batch) if batch.version == self.cursor + 1 => {
                        self.send(WatchEventKind::Change, batch).await?;
                    }
                    // Ahead of the cursor (joined between two reads) or fell behind
                    // the feed's buffer: the log has everything in between.
                    Ok(_) | Err(RecvError::Lagged(_)) => self.catch_up().await?,
                    Err(RecvError::Closed) => return Err(Error::ShuttingDown.into()),
                },
                _ = tokio::time::sleep_until(next_heartbeat) => {
                    if let Some(last) = self.last.clone() {
                        self.send(WatchEventKind::Heartbeat, last).await?;
                    }
                }
            }
        }
    }

    /// Sends every version after the cursor from the log, or a snapshot of the current
    /// state when the versions right after the cursor are no longer retained.
    async fn catch_up(&mut self) -> Result<(), Stop> {
        loop {
            let events = self
                .context
                .log
                .events_after(&self.context.batch_id, self.cursor, LOG_PAGE)
                .await?;
            let complete = (events.len() as i64) < LOG_PAGE;
            match events.first() {
                None => return Ok(()),
                Some(first) if first.version != self.cursor + 1 => {
                    let current = self.current().await?;
                    return self.send(WatchEventKind::Snapshot, current).await;
                }
                Some(_) => {}
            }
            for event in events {
                let terminal = event.batch.status.is_terminal();
                self.send(WatchEventKind::Change, Arc::new(event.batch))
                    .await?;
                if terminal {
                    return Ok(());
                }
            }
            if complete {
                return Ok(());
            }
        }
    }

    async fn current(&self) -> Result<Arc<Batch>> {
        let batch = self
            .context
            .log
            .get_batch(&self.context.batch_id)
            .await?
            .ok_or_else(|| Error::BatchNotFound(self.context.batch_id.to_string()))?;
        Ok(Arc::new(batch))
    }

    /// Queues a message for the client. Waits while the stream's buffer is full (the
    /// client reads slowly), but not past a shutdown: a client that never reads must
    /// not hold the process up.
    async fn send(&mut self, kind: WatchEventKind, batch: Arc<Batch>) -> Result<(), Stop> {
        // Nothing more goes out on a revoked key, even when the buffer has room.
        if *self.context.revoked.borrow() {
            return Err(Error::Unauthenticated(KEY_REVOKED).into());
        }
        if kind != WatchEventKind::Heartbeat {
            self.cursor = batch.version;
            self.last = Some(batch.clone());
        }
        self.last_sent = Instant::now();
        let mut stopping = self.context.stopping.clone();
        let mut revoked = self.context.revoked.clone();
        tokio::select! {
            sent = self.out.send(Ok(WatchEvent { kind, batch })) => sent.map_err(|_| Stop::ClientGone)?,
            _ = crate::shutdown::requested(&mut stopping) => return Err(Error::ShuttingDown.into()),
            _ = super::key_revoked(&mut revoked) => return Err(Error::Unauthenticated(KEY_REVOKED).into()),
        }
        metrics::counter!("batchd_watch_events_delivered_total", "kind" => kind.as_str())
            .increment(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;

    use crate::domain::{ApiKey, Batch, BatchEvent, BatchId, BatchStatus, Caller, Scope};
    use crate::error::Result;
    use crate::store::{
        BatchPageQuery, EventLog, FeedBounds, FeedCursor, FeedPage, Store, StoreOptions,
    };
    use crate::watch::{WatchEventKind, WatchHub, WatchOptions};

    /// A real event log that commits `next` the first time the watcher reads the
    /// current batch: the commit lands between the watcher's read of the log and its
    /// read of the batch, the one interleaving a resume must survive.
    struct CommitsDuringTheRead {
        inner: Arc<dyn Store>,
        next: Batch,
        done: AtomicBool,
    }

    #[async_trait]
    impl EventLog for CommitsDuringTheRead {
        async fn get_batch(&self, id: &BatchId) -> Result<Option<Batch>> {
            if !self.done.swap(true, Ordering::SeqCst) {
                assert!(self.inner.commit_change(&self.next).await?);
            }
            self.inner.get_batch(id).await
        }
        async fn events_after(
            &self,
            id: &BatchId,
            after: i64,
            limit: i64,
        ) -> Result<Vec<BatchEvent>> {
            self.inner.events_after(id, after, limit).await
        }
        async fn latest_versions(&self, ids: &[BatchId]) -> Result<Vec<(BatchId, i64)>> {
            self.inner.latest_versions(ids).await
        }
        async fn changes_after(
            &self,
            after: FeedCursor,
            owner: Option<&str>,
            limit: i64,
        ) -> Result<FeedPage> {
            self.inner.changes_after(after, owner, limit).await
        }
        async fn status_moves_after(&self, after: FeedCursor, limit: i64) -> Result<FeedPage> {
            self.inner.status_moves_after(after, limit).await
        }
        async fn feed_bounds(&self) -> Result<FeedBounds> {
            self.inner.feed_bounds().await
        }
        async fn batches_with_positions(
            &self,
            query: BatchPageQuery<'_>,
        ) -> Result<Vec<(FeedCursor, Batch)>> {
            self.inner.batches_with_positions(query).await
        }
    }

    /// Resuming after the latest version while a commit lands between the watcher's two
    /// reads: that commit (here the terminal one) is sent, not skipped.
    #[tokio::test]
    async fn a_commit_between_the_resume_reads_is_sent() {
        let inner = crate::store::connect("sqlite::memory:", &StoreOptions::default())
            .await
            .expect("an in-memory database");
        inner.migrate().await.expect("migrations");
        let batch = crate::domain::fixtures::batch();
        inner.insert_batch(&batch, None).await.unwrap();
        let mut next = batch.clone();
        next.status = BatchStatus::Failed;
        next.failed_at = Some(batch.created_at + 1);
        next.version = 2;
        next.updated_at = next.failed_at;
        let store = Arc::new(CommitsDuringTheRead {
            inner,
            next,
            done: AtomicBool::new(false),
        });
        let hub = WatchHub::new(
            store,
            WatchOptions::default(),
            crate::domain::CursorSealer::with_random_key(),
        );
        let caller = Caller::of(&ApiKey::new("tenant", Scope::Admin, 0).unwrap());
        let mut stream = hub.watch(&caller, &batch.id, Some(1)).await.unwrap();
        use tokio_stream::StreamExt;
        let event = stream
            .next()
            .await
            .expect("the commit made during the resume is sent")
            .expect("not an error");
        assert_eq!(event.kind, WatchEventKind::Change);
        assert_eq!(event.batch.version, 2);
        assert_eq!(event.batch.status, BatchStatus::Failed);
        assert!(stream.next().await.is_none(), "the stream ends after it");
    }
}
