//! The dispatcher: follows the change feed from a position stored in the database and
//! turns every committed status change into one delivery per subscribed endpoint.
//! Moving the position and queueing the deliveries of the changes read are one
//! transaction, and the move is a compare-and-set, so every change yields its
//! deliveries exactly once whichever replica reads it, and nothing is lost when a
//! replica dies between a commit and its dispatch: any replica's dispatcher continues
//! from the stored position.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::domain::webhooks::delivery::NewDelivery;
use crate::domain::webhooks::endpoint::WebhookEndpoint;
use crate::domain::webhooks::events::{WebhookEvent, WebhookEventType};
use crate::error::{Error, Result};
use crate::shutdown;
use crate::store::{EventLog, FeedChange, FeedCursor, WebhookStore};

/// Changes read per page.
const PAGE: i64 = 500;

/// How soon a read is tried again while committed changes are held back, and after
/// an error.
const HELD_BACK_RETRY: Duration = Duration::from_millis(25);
const HELD_BACK_MAX_WAIT: Duration = Duration::from_secs(1);
const ERROR_RETRY: Duration = Duration::from_secs(1);

/// How long changes that make no delivery may be read past the stored position before
/// it is moved: one write per second at most while nothing is subscribed, rather than
/// one per commit. (Re-reading them after a crash is harmless: they make nothing.)
const STORE_IDLE_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Deliveries queued (by this replica) after which the queue's statistics are
/// refreshed, at most once per [`STATISTICS_EVERY`]: a burst into a table PostgreSQL
/// never analyzed (a new deployment, autovacuum's next round a minute away) otherwise
/// makes every claim sort the whole queue (measured: 9 ms a claim with 10,000 queued,
/// 2.6 ms once analyzed).
const STATISTICS_AFTER: usize = 1_000;
const STATISTICS_EVERY: Duration = Duration::from_secs(60);

/// Runs the dispatcher until the stop signal: woken by `commits`, or every `poll`;
/// wakes `deliveries` whenever it queued some.
pub async fn run(
    feed: Arc<dyn EventLog>,
    queue: Arc<dyn WebhookStore>,
    commits: Arc<Notify>,
    deliveries: Arc<Notify>,
    poll: Duration,
    mut stopping: watch::Receiver<bool>,
) {
    let mut position: Option<Position> = None;
    let mut held_back_wait = HELD_BACK_RETRY;
    let mut statistics = QueueStatistics::default();
    loop {
        let progress = dispatch_once(
            &*feed,
            &*queue,
            &mut position,
            &deliveries,
            &mut statistics.queued,
        )
        .await;
        statistics.refresh_if_due(&queue);
        if !matches!(progress, Ok(Progress::HeldBack)) {
            held_back_wait = HELD_BACK_RETRY;
        }
        let rest = match progress {
            Ok(Progress::More) => continue,
            // A long transaction elsewhere may hold changes back for long: read again
            // soon, then less and less often.
            Ok(Progress::HeldBack) => {
                let wait = held_back_wait;
                held_back_wait = (held_back_wait * 2).min(HELD_BACK_MAX_WAIT);
                wait
            }
            // Progress read but not stored yet is stored once it is a second old.
            Ok(Progress::CaughtUp(changes)) => {
                if changes > 0 {
                    tokio::time::sleep(pause_after(changes)).await;
                }
                match position {
                    Some(at) if at.read > at.stored => poll.min(
                        STORE_IDLE_PROGRESS_EVERY.saturating_sub(at.stored_at.elapsed())
                            + Duration::from_millis(1),
                    ),
                    _ => poll,
                }
            }
            Err(error) => {
                tracing::warn!(%error, "webhook dispatch failed; retrying");
                position = None;
                ERROR_RETRY
            }
        };
        tokio::select! {
            _ = commits.notified() => {}
            _ = tokio::time::sleep(rest) => {}
            _ = shutdown::requested(&mut stopping) => return,
        }
    }
}

/// When the queue's statistics were last refreshed, and what was queued since.
#[derive(Default)]
struct QueueStatistics {
    queued: usize,
    refreshed_at: Option<Instant>,
}

impl QueueStatistics {
    /// Refreshes them in the background once enough was queued since, and not more
    /// often than [`STATISTICS_EVERY`].
    fn refresh_if_due(&mut self, queue: &Arc<dyn WebhookStore>) {
        let recently = self
            .refreshed_at
            .is_some_and(|at| at.elapsed() < STATISTICS_EVERY);
        if self.queued < STATISTICS_AFTER || recently {
            return;
        }
        self.queued = 0;
        self.refreshed_at = Some(Instant::now());
        let queue = queue.clone();
        tokio::spawn(async move {
            if let Err(error) = queue.refresh_delivery_statistics().await {
                tracing::debug!(%error, "refreshing the webhook queue's statistics failed");
            }
        });
    }
}

/// Where this dispatcher is: the position stored in the database, and how far past it
/// it has read changes that made no delivery.
#[derive(Debug, Clone, Copy)]
struct Position {
    stored: FeedCursor,
    read: FeedCursor,
    stored_at: Instant,
}

/// What one read found.
enum Progress {
    /// A full page: read again at once.
    More,
    /// Committed changes are held back: read again soon.
    HeldBack,
    /// Nothing more for now; this many changes were read.
    CaughtUp(usize),
}

/// Under a steady stream of commits each read would take a change or two; pausing a
/// little after a read (0.2 ms per change read, at most 5 ms) lets each query take
/// more, as the change feed reader does, at a cost of at most 5 ms of delay.
fn pause_after(changes: usize) -> Duration {
    (Duration::from_micros(200) * changes as u32).min(Duration::from_millis(5))
}

async fn dispatch_once(
    feed: &dyn EventLog,
    queue: &dyn WebhookStore,
    position: &mut Option<Position>,
    deliveries: &Notify,
    queued_count: &mut usize,
) -> Result<Progress> {
    let at = match *position {
        Some(at) => at,
        None => {
            let head = feed.feed_bounds().await?.head;
            let stored = queue.dispatch_position(head).await?;
            let at = Position {
                stored,
                read: stored,
                stored_at: Instant::now(),
            };
            *position = Some(at);
            at
        }
    };
    let page = match feed.status_moves_after(at.read, PAGE).await {
        Ok(page) => page,
        Err(Error::FeedCompacted { .. }) => {
            // Compaction keeps what the dispatcher has not read, so this means the
            // stored position was moved back by hand; the events in between are gone.
            metrics::counter!("batchd_webhook_dispatch_gaps_total").increment(1);
            let bounds = feed.feed_bounds().await?;
            tracing::error!(
                after = %at.read,
                oldest = %bounds.oldest,
                "webhook dispatch: the event log no longer holds every change after the dispatcher's position; continuing from the oldest"
            );
            feed.status_moves_after(bounds.oldest, PAGE).await?
        }
        Err(other) => return Err(other),
    };
    let progress = if page.read as i64 >= PAGE {
        Progress::More
    } else if page.held_back_since.is_some() {
        Progress::HeldBack
    } else {
        Progress::CaughtUp(page.read)
    };
    let queued = deliveries_of(queue, &page.changes).await?;
    let idle_for_long = at.stored_at.elapsed() >= STORE_IDLE_PROGRESS_EVERY;
    if queued.is_empty() && !(idle_for_long && page.next > at.stored) {
        *position = Some(Position {
            read: page.next,
            ..at
        });
        return Ok(progress);
    }
    if !queue
        .queue_deliveries(at.stored, page.next, &queued)
        .await?
    {
        // Another replica's dispatcher moved first: continue from where it is (an
        // event it queued too is queued once: deliveries are unique per endpoint).
        *position = None;
        return Ok(Progress::More);
    }
    *position = Some(Position {
        stored: page.next,
        read: page.next,
        stored_at: Instant::now(),
    });
    if !queued.is_empty() {
        *queued_count += queued.len();
        for delivery in &queued {
            metrics::counter!(
                "batchd_webhook_deliveries_queued_total",
                "event_type" => event_type_label(&delivery.event_type)
            )
            .increment(1);
        }
        deliveries.notify_one();
    }
    Ok(progress)
}

/// The deliveries of `changes`: for each status change, one per enabled endpoint that
/// follows the batch's owner, subscribes to the event type and was created before the
/// change.
async fn deliveries_of(
    queue: &dyn WebhookStore,
    changes: &[FeedChange],
) -> Result<Vec<NewDelivery>> {
    let events: Vec<(&FeedChange, WebhookEventType)> = changes
        .iter()
        // OpenAI has no webhook event for a deletion.
        .filter(|change| !change.deleted)
        .filter_map(|change| {
            WebhookEventType::of_change(change.previous_status, &change.batch)
                .map(|kind| (change, kind))
        })
        .collect();
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let owners: BTreeSet<&str> = events
        .iter()
        .map(|(change, _)| change.batch.user_id.as_str())
        .collect();
    let owners: Vec<&str> = owners.into_iter().collect();
    let endpoints = queue.endpoints_following(&owners).await?;
    if endpoints.is_empty() {
        return Ok(Vec::new());
    }
    let mut queued = Vec::new();
    for (change, kind) in events {
        let receivers: Vec<&WebhookEndpoint> = endpoints
            .iter()
            .filter(|endpoint| {
                endpoint.follows(&change.batch.user_id)
                    && endpoint.subscribes_to(kind)
                    && change.cursor > endpoint.starts_after
            })
            .collect();
        if receivers.is_empty() {
            continue;
        }
        let event = WebhookEvent::of(kind, &change.batch);
        let payload = serde_json::to_string(&event)
            .map_err(|e| Error::Internal(format!("cannot encode a webhook event: {e}")))?;
        for endpoint in receivers {
            queued.push(NewDelivery {
                id: NewDelivery::new_id(),
                endpoint_id: endpoint.id.clone(),
                event_id: event.id.clone(),
                event_type: kind.as_str().to_owned(),
                batch_id: change.batch.id.to_string(),
                payload: payload.clone(),
                created_at: event.created_at,
            });
        }
    }
    Ok(queued)
}

/// The event type's name as a metric label: one of a fixed few.
pub(super) fn event_type_label(name: &str) -> &'static str {
    WebhookEventType::from_name(name).map_or("other", WebhookEventType::as_str)
}
