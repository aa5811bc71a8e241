//! Cross-replica wake-ups over PostgreSQL LISTEN/NOTIFY: the [`ChangeNotifier`] of
//! the PostgreSQL store.
//!
//! PostgreSQL serializes every committing transaction that has sent a NOTIFY, so a
//! NOTIFY inside each write would cap write throughput. Writes send none: each replica
//! queues the ids it committed in its [`Outbox`], and one notifier task sends them,
//! coalesced, in a separate short transaction after the commits. One listener per
//! replica wakes the local hub. A lost notification (a replica dying between its
//! commit and its notify, a listener reconnecting) only delays delivery until the
//! hub's safety poll, or until the listener's reconnect has succeeded and re-reads
//! every watched batch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, watch};

use super::{ChangeNotifier, CommitListener, DatabaseStatus};
use crate::domain::{BatchId, random_hex};

/// The notification channel.
const CHANNEL: &str = "batchd_batch_events";
/// How long the listener waits without a notification before it checks that its
/// connection still answers.
const LIVENESS_PROBE: Duration = Duration::from_secs(10);
/// How long the notifier waits for more commits before it sends.
const COALESCE: Duration = Duration::from_millis(3);
/// NOTIFY payloads must stay under 8000 bytes.
const MAX_PAYLOAD: usize = 7_900;
/// The first wait before LISTEN is tried again; it doubles up to the maximum.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// The longest wait between two LISTEN attempts. The new LISTEN connection is what
/// ends the hold on writes after a switchover or a failover (see `DatabaseStatus`),
/// so the wait is short: one connection attempt per replica twice a second is
/// nothing to a database, and recovery then takes at most this long.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// This replica's end of LISTEN/NOTIFY: the commits it has not yet announced, and
/// what it needs to announce them and to listen for the others'.
pub(super) struct PostgresWakeups {
    pool: PgPool,
    deadline: Duration,
    outbox: Outbox,
    /// Where a lost LISTEN connection (the first to see a crash or a switchover, as
    /// it always reads) and its replacement are recorded.
    status: DatabaseStatus,
}

impl PostgresWakeups {
    /// Wake-ups over `pool`'s database, each statement within `deadline`, for a
    /// replica with a fresh random name; lost connections are recorded in `status`.
    pub(super) fn new(pool: PgPool, deadline: Duration, status: DatabaseStatus) -> PostgresWakeups {
        PostgresWakeups {
            pool,
            deadline,
            outbox: Outbox::new(format!("replica-{}", random_hex::<8>())),
            status,
        }
    }
}

#[async_trait]
impl ChangeNotifier for PostgresWakeups {
    fn announce(&self, id: &BatchId, committed_at_ms: i64) {
        self.outbox.push(id, committed_at_ms);
    }

    async fn run(
        self: Arc<Self>,
        listener: Arc<dyn CommitListener>,
        stopping: watch::Receiver<bool>,
    ) {
        tokio::join!(
            run_notifier(&self.pool, &self.outbox, self.deadline, stopping.clone()),
            run_listener(
                &self.pool,
                listener.as_ref(),
                &self.outbox.replica,
                self.deadline,
                &self.status,
                stopping
            ),
        );
    }
}

/// Batch ids committed by this replica and not yet announced to the others, each with
/// the wall-clock time (ms) of its earliest unannounced commit.
#[derive(Debug)]
struct Outbox {
    replica: String,
    pending: Mutex<HashMap<BatchId, i64>>,
    wake: Notify,
}

impl Outbox {
    /// An outbox of the replica named `replica` (unique per process).
    fn new(replica: impl Into<String>) -> Outbox {
        Outbox {
            replica: replica.into(),
            pending: Mutex::default(),
            wake: Notify::new(),
        }
    }

    /// Queues a wake-up for batch `id`, committed at `committed_at_ms`.
    fn push(&self, id: &BatchId, committed_at_ms: i64) {
        self.lock().entry(id.clone()).or_insert(committed_at_ms);
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<(BatchId, i64)> {
        self.lock().drain().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<BatchId, i64>> {
        // Inserts and drains cannot leave the set half-updated.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `replica|id@ms,id@ms,...` payloads of at most [`MAX_PAYLOAD`] bytes.
    fn payloads(&self, ids: &[(BatchId, i64)]) -> Vec<String> {
        let mut payloads = Vec::new();
        let mut current = String::new();
        for (id, committed_at_ms) in ids {
            let entry = format!("{id}@{committed_at_ms}");
            if !current.is_empty() && current.len() + 1 + entry.len() > MAX_PAYLOAD {
                payloads.push(std::mem::take(&mut current));
            }
            if current.is_empty() {
                current.push_str(&self.replica);
                current.push('|');
            } else {
                current.push(',');
            }
            current.push_str(&entry);
        }
        if !current.is_empty() {
            payloads.push(current);
        }
        payloads
    }
}

/// Sends the outbox's wake-ups until `stopping`, one NOTIFY per batch of pending ids.
/// Each NOTIFY ends within `deadline`: a database that stopped answering must not hold
/// the notifier (and a pool connection) until it answers again.
async fn run_notifier(
    pool: &PgPool,
    outbox: &Outbox,
    deadline: Duration,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = outbox.wake.notified() => {}
            _ = crate::shutdown::requested(&mut stopping) => return,
        }
        // Let a burst of commits gather: under load this bounds the NOTIFY transactions
        // to a few hundred per second, whatever the write rate.
        tokio::time::sleep(COALESCE).await;
        let ids = outbox.take();
        for payload in outbox.payloads(&ids) {
            let notify = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(&payload)
                .execute(pool);
            let sent = match tokio::time::timeout(deadline, notify).await {
                Ok(sent) => sent.map(drop).map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {deadline:?}")),
            };
            if let Err(error) = sent {
                // The other replicas' safety polls pick these changes up.
                tracing::warn!(%error, "cannot notify other replicas");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Listens for the other replicas' wake-ups and passes them to `hub` until `stopping`.
///
/// Notifications sent while the connection is down are gone, so each time LISTEN takes
/// effect (first, and after every reconnect) every watched batch is re-read: only once
/// LISTEN succeeded, never before, or a commit made between the re-read and the LISTEN
/// would wait for the safety poll. A lost connection is replaced explicitly, with
/// backoff, rather than by the listener's own reconnect inside its next receive, which
/// would leave no place to re-read after it.
///
/// A connection that goes silent (a partition: the socket stays open and never errs)
/// would wait for notifications forever; so after [`LIVENESS_PROBE`] without one, the
/// listener's own connection must answer a query within `deadline`, or it is replaced.
async fn run_listener(
    pool: &PgPool,
    hub: &dyn CommitListener,
    replica: &str,
    deadline: Duration,
    status: &DatabaseStatus,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        let connecting = std::time::Instant::now();
        let Some(mut listener) = listen_until_it_works(pool, deadline, &mut stopping).await else {
            return;
        };
        // A new connection answered: rounds held since the last one broke may go.
        status.answered(connecting);
        // LISTEN is in effect: anything committed without a notification reaching us
        // is in the log by now.
        hub.announcements_lost();
        loop {
            let received = tokio::select! {
                received = tokio::time::timeout(LIVENESS_PROBE, listener.try_recv()) => received,
                _ = crate::shutdown::requested(&mut stopping) => return,
            };
            match received {
                Ok(Ok(Some(notification))) => wake_for(hub, replica, notification.payload()),
                Ok(Ok(None)) => {
                    tracing::warn!("LISTEN connection was lost; reconnecting");
                    status.connection_lost();
                    break;
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "LISTEN connection failed; reconnecting");
                    status.connection_lost();
                    break;
                }
                Err(_quiet) => {
                    let probe = sqlx::query("SELECT 1").execute(&mut listener);
                    if !matches!(tokio::time::timeout(deadline, probe).await, Ok(Ok(_))) {
                        tracing::warn!("LISTEN connection does not answer; reconnecting");
                        status.connection_lost();
                        break;
                    }
                }
            }
        }
    }
}

/// Wakes the feeds of the batches another replica committed, named in `payload`
/// (`replica|id@ms,id@ms,...`).
fn wake_for(hub: &dyn CommitListener, replica: &str, payload: &str) {
    let Some((sender, ids)) = payload.split_once('|') else {
        return;
    };
    if sender == replica {
        return; // our own commits woke the hub already
    }
    for entry in ids.split(',') {
        let Some((id, at)) = entry.split_once('@') else {
            continue;
        };
        if let (Ok(id), Ok(at)) = (BatchId::parse("id", id), at.parse()) {
            hub.committed_elsewhere(&id, at);
        }
    }
}

/// A listener on [`CHANNEL`], retried with exponential backoff until LISTEN succeeds;
/// `None` when stopping comes first.
async fn listen_until_it_works(
    pool: &PgPool,
    deadline: Duration,
    stopping: &mut watch::Receiver<bool>,
) -> Option<PgListener> {
    let mut backoff = RECONNECT_BACKOFF_MIN;
    loop {
        tokio::select! {
            listened = tokio::time::timeout(deadline, listen(pool)) => match listened {
                Ok(Ok(listener)) => return Some(listener),
                Ok(Err(error)) => {
                    tracing::warn!(%error, retry_in = ?backoff, "cannot LISTEN for other replicas' changes");
                }
                Err(_) => {
                    tracing::warn!(retry_in = ?backoff, "LISTEN got no answer in time");
                }
            },
            _ = crate::shutdown::requested(stopping) => return None,
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = crate::shutdown::requested(stopping) => return None,
        }
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }
}

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // A lost connection makes `try_recv` return `Ok(None)` at once, for
    // `run_listener` to reconnect and then re-read, in that order.
    listener.eager_reconnect(false);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_the_replica_and_stay_under_the_limit() {
        let outbox = Outbox::new("replica-1");
        let ids: Vec<(BatchId, i64)> = (0..500)
            .map(|i| (BatchId::generate(), 1_700_000_000_000 + i))
            .collect();
        let payloads = outbox.payloads(&ids);
        assert!(payloads.len() > 1);
        let mut seen = Vec::new();
        for payload in &payloads {
            assert!(payload.len() <= MAX_PAYLOAD, "{}", payload.len());
            let (replica, list) = payload.split_once('|').unwrap();
            assert_eq!(replica, "replica-1");
            seen.extend(list.split(',').map(str::to_owned));
        }
        let expected: Vec<String> = ids.iter().map(|(id, at)| format!("{id}@{at}")).collect();
        assert_eq!(seen, expected);
    }
}
