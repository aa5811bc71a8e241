//! Watching a batch: every committed version, in order, each exactly once, resumable;
//! and watching every batch (the change feed, [`FeedEvent`]): one reader per replica
//! for all collection watchers (see `change_feed` and `collection`).
//!
//! The event log (`batch_events`, written in the same transaction as each change) is
//! the source of truth; everything else is a wake-up signal. Per replica there is one
//! [`WatchHub`] with one feed per watched batch: a woken feed reads the versions after
//! its cursor from the log once and broadcasts them to every watcher of that batch.
//! Each watcher checks that what it sends is contiguous and, when it is not (it fell
//! behind, or joined between two reads), catches up from the log itself, so a slow or
//! late watcher never makes a gap and never slows the others.
//!
//! A feed lives exactly as long as it has watchers: the hub counts them per feed under
//! the lock of its feed map, where each watcher also subscribes, and the last watcher
//! to leave removes and closes the feed. When a feed finds that compaction removed the
//! versions right after its cursor, it moves its cursor to what the log has; its
//! watchers see a version ahead of theirs and resume from a snapshot.
//!
//! The hub reads only through the store's read-only [`EventLog`](crate::store::EventLog).
//! Wake-ups come from commits in this process, from other replicas through the
//! store's [`ChangeNotifier`](crate::store::ChangeNotifier) (PostgreSQL LISTEN/NOTIFY),
//! and from a safety poll that compares every
//! feed's cursor with the batches' current versions, for notifications that were lost.
//! The listener replaces a lost connection itself, with backoff, and re-reads every
//! watched batch only once LISTEN works again, so nothing committed meanwhile waits
//! for the safety poll.
//!
//! Streams are counted per API key. Every API key cache TTL, the service asks the
//! database which keys with open streams here were revoked (by any process: `batchd
//! keys revoke` writes only the database) and the hub ends their streams with
//! UNAUTHENTICATED, freeing their places, on every replica.

mod change_feed;
mod collection;
mod hub;
mod subscriber;

use std::sync::Arc;
use std::time::Duration;

use crate::domain::Batch;

pub use hub::WatchHub;

/// Versions read from the log per query.
const LOG_PAGE: i64 = 256;
/// What a stream of a revoked API key ends with.
const KEY_REVOKED: &str = "the API key was revoked";

/// What a watcher receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// Which kind of message this is.
    pub kind: WatchEventKind,
    /// The batch: the current state, a committed version, or (heartbeat) the latest
    /// version sent, as a bookmark.
    pub batch: Arc<Batch>,
}

/// The kinds of watch messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WatchEventKind {
    /// The current state: first, when no version to resume after was given or the
    /// history after it is no longer retained.
    Snapshot,
    /// The next committed version.
    Change,
    /// Nothing changed for a while; the batch is the latest version sent.
    Heartbeat,
}

impl WatchEventKind {
    /// Every kind.
    pub const ALL: [WatchEventKind; 3] = [
        WatchEventKind::Snapshot,
        WatchEventKind::Change,
        WatchEventKind::Heartbeat,
    ];

    /// The name of the kind: the SSE event name and the metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            WatchEventKind::Snapshot => "snapshot",
            WatchEventKind::Change => "change",
            WatchEventKind::Heartbeat => "heartbeat",
        }
    }
}

/// What a collection watcher (`WatchBatches`) receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEvent {
    /// Which kind of message this is.
    pub kind: FeedEventKind,
    /// The batch (`INITIAL`, `CHANGE`, `LEFT_FILTER`; for `DELETED` its last version,
    /// of which only the id is sent); `None` for `SYNCED` and `BOOKMARK`.
    pub batch: Option<Arc<Batch>>,
    /// Where a resumed stream continues: after this message, sealed for the stream's
    /// owner scope. `None` for `INITIAL`.
    pub cursor: Option<String>,
}

/// The kinds of collection watch messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedEventKind {
    /// A batch that matched the filter when the stream began.
    Initial,
    /// The initial state is complete (or, without one, the stream is live); its cursor
    /// is where the changes continue.
    Synced,
    /// A committed version of a matching batch.
    Change,
    /// A committed version that took the batch out of the filter (its status left the
    /// filter's set): the last message about it until it matches again.
    LeftFilter,
    /// Nothing matching changed for a while; the cursor is current, for checkpoints.
    Bookmark,
    /// A batch that matched was deleted: the last message about it. Its `batch` is
    /// the last version, for the transports to take the id from.
    Deleted,
}

impl FeedEventKind {
    /// Every kind.
    pub const ALL: [FeedEventKind; 6] = [
        FeedEventKind::Initial,
        FeedEventKind::Synced,
        FeedEventKind::Change,
        FeedEventKind::LeftFilter,
        FeedEventKind::Bookmark,
        FeedEventKind::Deleted,
    ];

    /// The name of the kind: the SSE event name and the metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            FeedEventKind::Initial => "initial",
            FeedEventKind::Synced => "synced",
            FeedEventKind::Change => "change",
            FeedEventKind::LeftFilter => "left_filter",
            FeedEventKind::Bookmark => "bookmark",
            FeedEventKind::Deleted => "deleted",
        }
    }
}

/// How long an ending stream waits for room to queue its closing error.
const FINAL_ERROR_WAIT: Duration = Duration::from_secs(2);

/// Why a stream (of one batch, or of the change feed) stops early.
enum Stop {
    /// The client went away: nothing more to send.
    ClientGone,
    /// The stream ends with this error.
    Failed(crate::error::Error),
}

impl From<crate::error::Error> for Stop {
    fn from(error: crate::error::Error) -> Stop {
        Stop::Failed(error)
    }
}

/// Queues the error that ended a stream, if one did. Behind what the client has not
/// read yet; a client that reads nothing at all cannot get it, and must not keep the
/// stream's task (and a shutdown) waiting.
async fn end_stream<T>(
    outcome: Result<(), Stop>,
    out: &tokio::sync::mpsc::Sender<crate::error::Result<T>>,
) {
    if let Err(Stop::Failed(error)) = outcome {
        let _ = tokio::time::timeout(FINAL_ERROR_WAIT, out.send(Err(error))).await;
    }
}

/// Completes once the stream's API key is found revoked.
async fn key_revoked(revoked: &mut tokio::sync::watch::Receiver<bool>) {
    // The sender lives while the key has open streams, this one included; were it gone
    // anyway, nothing could revoke the key any more, so this waits for good.
    if revoked.wait_for(|revoked| *revoked).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Settings of the watch machinery; all but the stream buffer are flags of `serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchOptions {
    /// A watch stream gets a heartbeat after this long without a change.
    pub heartbeat: Duration,

    /// Most open watch streams per API key, per replica.
    pub max_watches_per_key: usize,

    /// Every watched batch is re-read at least this often, in case a cross-replica
    /// notification was lost.
    pub safety_poll: Duration,

    /// Messages buffered per stream before its watcher waits for the client.
    pub stream_buffer: usize,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            heartbeat: Duration::from_secs(15),
            max_watches_per_key: 100,
            safety_poll: Duration::from_secs(3),
            stream_buffer: 16,
        }
    }
}
