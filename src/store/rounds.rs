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
//! round failed for want of it, requests fail at once instead of queueing, but for a
//! spaced trial that finds the database back; and for a request's deadline after a
//! connection broke (a crash, a switchover) rounds wait for a new one rather than go to
//! a server that is gone.

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
    /// A task waits for the hold on rounds after a lost connection to end.
    holding: AtomicBool,
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
            holding: AtomicBool::new(false),
        })
    }

    /// The database is known down: the readiness check fails, and so did the last
    /// round or an open connection. Both, so that a readiness connection that alone
    /// cannot connect (say, `too many connections`) does not refuse requests the pool
    /// would serve.
    pub(super) fn database_known_down(&self) -> bool {
        self.database.is_down()
            && (self.last_round_unavailable.load(Ordering::Acquire) || self.database.is_lost())
            && !self.holding()
    }

    /// A connection broke less than a request's deadline ago and nothing has reached
    /// the database since: rounds wait rather than go (see
    /// [`Self::hold_while_connection_lost`]).
    fn holding(&self) -> bool {
        self.database
            .lost_for()
            .is_some_and(|lost_for| lost_for < self.max_wait)
    }

    /// Queues `request` for a round and waits for its answer. While the database is
    /// known down it is refused at once, unless it is the trial that finds the
    /// database back.
    pub(super) async fn ask(self: &Arc<Self>, request: K::Request) -> Result<K::Answer> {
        if self.database_known_down() && !self.database.take_trial() {
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
        if self.hold_while_connection_lost() {
            let late = Self::take_late(&mut self.lock());
            self.answer_late(late);
            return;
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return;
        };
        let (late, round) = {
            let mut waiting = self.lock();
            let late = Self::take_late(&mut waiting);
            (late, self.kind.form(&mut waiting))
        };
        self.answer_late(late);
        let Some(round) = round else {
            return;
        };
        // Its own task: a caller that goes away must not take the others' answers along.
        let span =
            tracing::debug_span!("store.round", waiters = K::WAITERS, size = K::size(&round));
        tokio::spawn(self.clone().run(round, slot).instrument(span));
    }

    /// Drops the waiters whose callers went away (they need no round) and takes out
    /// those past their deadline.
    fn take_late(
        waiting: &mut VecDeque<Waiter<K::Request, K::Answer>>,
    ) -> Vec<Waiter<K::Request, K::Answer>> {
        let now = Instant::now();
        waiting.retain(|waiter| !waiter.answer.is_closed());
        let (late, live): (VecDeque<_>, VecDeque<_>) =
            waiting.drain(..).partition(|waiter| waiter.deadline <= now);
        *waiting = live;
        late.into()
    }

    /// Tells the waiters past their deadline so, unsent.
    fn answer_late(&self, late: Vec<Waiter<K::Request, K::Answer>>) {
        for waiter in late {
            let _ = waiter.answer.send(Err(Error::Unavailable(format!(
                "no turn at the database within {:?}",
                self.max_wait
            ))));
        }
    }

    /// For a request's deadline after a connection broke (a crash, a switchover), until
    /// a new connection or the readiness check reaches the database, rounds are not
    /// sent: the connections they would get may be as dead, and a switchover ends
    /// within moments, so requests that wait for it are refused nothing. The waiters
    /// stay queued within their deadlines; one task waits for the hold to end (or the
    /// first deadline) and starts the round then. After that, a database still away
    /// is an outage: requests fail at once, but for the trials.
    fn hold_while_connection_lost(self: &Arc<Self>) -> bool {
        let Some(lost_for) = self.database.lost_for() else {
            return false;
        };
        let Some(hold_left) = self.max_wait.checked_sub(lost_for) else {
            return false;
        };
        if self.holding.swap(true, Ordering::AcqRel) {
            return true;
        }
        let rounds = self.clone();
        tokio::spawn(async move {
            let database = rounds.database.clone();
            let change = database.next_change();
            tokio::pin!(change);
            change.as_mut().enable();
            if database.is_lost() {
                let hold_ends = Instant::now() + hold_left;
                let first_deadline = rounds.lock().iter().map(|waiter| waiter.deadline).min();
                let wake = first_deadline.map_or(hold_ends, |first| first.min(hold_ends));
                tokio::select! {
                    _ = change => {}
                    _ = tokio::time::sleep_until(wake) => {}
                }
            }
            rounds.holding.store(false, Ordering::Release);
            rounds.start_round();
        });
        true
    }

    async fn run(self: Arc<Self>, round: K::Round, slot: OwnedSemaphorePermit) {
        let sent = std::time::Instant::now();
        let outcome = self.kind.run(&round).await;
        let unavailable = matches!(outcome, Err(Error::Unavailable(_)));
        self.last_round_unavailable
            .store(unavailable, Ordering::Release);
        if !unavailable {
            self.database.answered(sent);
        }
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
