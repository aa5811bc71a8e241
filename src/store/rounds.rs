//! Rounds: requests that arrive together share one database call. The machinery that
//! coalesced reads ([`PointReads`](super::PointReads)) and group commit
//! ([`GroupCommits`](super::GroupCommits)) share: a bounded queue of waiters, a few
//! slots for rounds in flight, each round on its own task, and the fast failures.
//! Only what a round is differs, and each says it as a [`RoundKind`]: which waiters
//! form the next round, the call that serves it, and how its answers are handed out.
//!
//! No waiter is left behind: a waiter is queued before it looks for a slot, and a
//! round frees its slot before it looks at the queue. A waiter whose caller went away
//! is never sent; one past its deadline before it was sent is answered UNAVAILABLE,
//! unsent; a full queue answers RESOURCE_EXHAUSTED at once (this replica's load, not
//! the database's); while the readiness check finds the database down and the last
//! round failed for want of it, requests fail at once instead of queueing.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::Instant;
use tracing::Instrument as _;

use super::DatabaseStatus;
use crate::error::{Error, Result};

/// A request waiting for its round: what it asks, where its answer goes, and when it
/// gives up.
pub(super) struct Waiter<Q, A> {
    /// What it asks.
    pub(super) request: Q,
    /// Where the answer goes.
    pub(super) answer: oneshot::Sender<Result<A>>,
    deadline: Instant,
}

/// What makes a round of one kind: the rest is [`Rounds`]'.
pub(super) trait RoundKind: Send + Sync + 'static {
    /// What one request asks.
    type Request: Send + 'static;
    /// What one request is answered.
    type Answer: Send + 'static;
    /// The waiters of one round, as the kind groups them.
    type Round: Send + 'static;
    /// What the call of a round returns.
    type Outcome: Send + 'static;

    /// Names for errors and traces: what waits ("reads", "changes"), and the span of a
    /// round.
    const WAITERS: &'static str;
    /// Most waiters at once.
    const MAX_WAITING: usize;
    /// Whether a caller stops waiting at its deadline even once its round was sent (a
    /// read), or waits for the answer of a sent round, which the store's own deadline
    /// bounds (a commit, whose outcome the caller must learn).
    const GIVES_UP_WHEN_SENT: bool;

    /// Takes the next round from `waiting` (live waiters only, oldest first); those
    /// left wait for a later round.
    fn form(
        &self,
        waiting: &mut VecDeque<Waiter<Self::Request, Self::Answer>>,
    ) -> Option<Self::Round>;

    /// How many requests a round serves, for its span.
    fn size(round: &Self::Round) -> usize;

    /// The database call of a round.
    fn run(&self, round: &Self::Round) -> impl Future<Output = Result<Self::Outcome>> + Send;

    /// Hands each waiter of `round` its answer.
    fn answer(round: Self::Round, outcome: Result<Self::Outcome>);
}

/// Rounds of one kind on one store.
pub(super) struct Rounds<K: RoundKind> {
    kind: K,
    waiting: Mutex<VecDeque<Waiter<K::Request, K::Answer>>>,
    /// One permit per round that may run at once.
    slots: Arc<Semaphore>,
    max_wait: Duration,
    database: DatabaseStatus,
    /// The last round failed for want of the database (`UNAVAILABLE`).
    last_round_unavailable: AtomicBool,
}

impl<K: RoundKind> Rounds<K> {
    /// Rounds of `kind`, at most `concurrent` at once, each request waiting at most
    /// `max_wait` to be sent.
    pub(super) fn new(
        kind: K,
        concurrent: usize,
        max_wait: Duration,
        database: DatabaseStatus,
    ) -> Arc<Rounds<K>> {
        Arc::new(Rounds {
            kind,
            waiting: Mutex::new(VecDeque::new()),
            slots: Arc::new(Semaphore::new(concurrent.max(1))),
            max_wait,
            database,
            last_round_unavailable: AtomicBool::new(false),
        })
    }

    /// The database is known down: the readiness check fails and so did the last
    /// round. Both, so that a readiness connection that alone cannot connect (say,
    /// `too many connections`) does not refuse requests the pool would serve.
    pub(super) fn database_known_down(&self) -> bool {
        self.database.is_down() && self.last_round_unavailable.load(Ordering::Acquire)
    }

    /// Queues `request` for a round and waits for its answer.
    pub(super) async fn ask(self: &Arc<Self>, request: K::Request) -> Result<K::Answer> {
        if self.database_known_down() {
            return Err(Error::Unavailable(format!(
                "the database is down; not queueing the {}",
                K::WAITERS
            )));
        }
        let deadline = Instant::now() + self.max_wait;
        let (answer, answered) = oneshot::channel();
        {
            let mut waiting = self.lock();
            if waiting.len() >= K::MAX_WAITING {
                return Err(Error::overloaded(format_args!(
                    "{} {} are already waiting for the database",
                    K::MAX_WAITING,
                    K::WAITERS
                )));
            }
            waiting.push_back(Waiter {
                request,
                answer,
                deadline,
            });
        }
        self.start_round();
        // Dropping `answered` on time-out marks this waiter gone: no round sends it.
        let answered = if K::GIVES_UP_WHEN_SENT {
            match tokio::time::timeout_at(deadline, answered).await {
                Ok(answered) => answered,
                Err(_) => {
                    return Err(Error::Unavailable(format!(
                        "no answer from the database within {:?}",
                        self.max_wait
                    )));
                }
            }
        } else {
            answered.await
        };
        answered.unwrap_or_else(|_| {
            Err(Error::Internal(format!(
                "a round of {} ended without an answer",
                K::WAITERS
            )))
        })
    }

    pub(super) fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, VecDeque<Waiter<K::Request, K::Answer>>> {
        // The queue stays valid whatever panicked while holding the lock.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends one round of what waits, if a slot is free. When none is, the round that
    /// finishes next calls this again.
    fn start_round(self: &Arc<Self>) {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return;
        };
        let mut expired = Vec::new();
        let round = {
            let mut waiting = self.lock();
            // Callers that went away need no round; callers past their deadline are
            // told so rather than sent.
            let now = Instant::now();
            waiting.retain(|waiter| !waiter.answer.is_closed());
            let (late, live): (VecDeque<_>, VecDeque<_>) =
                waiting.drain(..).partition(|waiter| waiter.deadline <= now);
            *waiting = live;
            expired.extend(late);
            self.kind.form(&mut waiting)
        };
        for waiter in expired {
            let _ = waiter.answer.send(Err(Error::Unavailable(format!(
                "no turn at the database within {:?}",
                self.max_wait
            ))));
        }
        let Some(round) = round else {
            return;
        };
        // Its own task: a caller that goes away must not take the others' answers along.
        let span =
            tracing::debug_span!("store.round", waiters = K::WAITERS, size = K::size(&round));
        tokio::spawn(self.clone().run(round, slot).instrument(span));
    }

    async fn run(self: Arc<Self>, round: K::Round, slot: OwnedSemaphorePermit) {
        let outcome = self.kind.run(&round).await;
        self.last_round_unavailable.store(
            matches!(outcome, Err(Error::Unavailable(_))),
            Ordering::Release,
        );
        drop(slot);
        self.start_round();
        K::answer(round, outcome);
    }
}

impl<K: RoundKind> Debug for Rounds<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rounds")
            .field("waiters", &K::WAITERS)
            .field("waiting", &self.lock().len())
            .finish()
    }
}
