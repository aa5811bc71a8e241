//! Changes that arrive together share one commit (group commit).
//!
//! A write's cost is mostly the commit, not the row: a round trip, the database's
//! per-statement and per-transaction work, and a flush of its log. So at most a few
//! rounds of commits run at once, and the changes that arrive while they run wait for
//! the next round, which commits all of them in one transaction
//! ([`BatchStore::commit_changes`]: one statement on PostgreSQL). A change that finds a round
//! free goes out at once, alone, through the one-change statement: no wait is added
//! when there is nothing to group.
//!
//! Each change stays a compare-and-set on its own version, acknowledged only after the
//! commit that holds it: a version race fails that change alone (`false`, as one commit
//! of its own would). A round holds each batch once; of several changes to one batch,
//! those computed from the same version as the one in the round cannot win whatever
//! the round does (one of them at most could, and it is the one in the round), so they
//! are answered `false` with it, and a change from another version waits for the next
//! round, in arrival order. Versions and the event log are then exactly what one
//! commit per change would have made.
//!
//! The queue, the slots and the bounds below are those of every round (`rounds.rs`);
//! this file says what a round of commits is. Bounds: a
//! round holds at most `max_round` changes and [`MAX_ROUND_BYTES`] of batch
//! text (the first change of a round always fits); at most [`MAX_WAITING_WRITES`]
//! wait, and a change that finds them all taken fails at once with RESOURCE_EXHAUSTED
//! (this replica's load, not the database's); a change that has waited past its deadline without being sent fails with
//! UNAVAILABLE, unwritten; a change whose caller went away before it was sent is never
//! sent. A round that fails for any reason but an unavailable database is retried one
//! change at a time, so that a change the database refuses fails alone.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::rounds::{RoundKind, Rounds, Waiter};
use super::{BatchStore, DatabaseStatus};
use crate::domain::{Batch, BatchId};
use crate::error::{Error, Result};

/// Most changes waiting for a round at once.
pub const MAX_WAITING_WRITES: usize = 4_096;
/// Most bytes of batch text one round carries (a batch holds up to 1 MiB): a change
/// that would pass it waits for the next round, unless it is the round's first.
const MAX_ROUND_BYTES: usize = 4 << 20;

/// What group commit needs of a store.
#[async_trait]
pub trait CommitMany: Send + Sync + 'static {
    /// Commits one change: see [`BatchStore::commit_change`].
    async fn commit_change(&self, next: &Batch) -> Result<bool>;
    /// Commits changes of distinct batches in one transaction: see
    /// [`BatchStore::commit_changes`].
    async fn commit_changes(&self, nexts: &[Arc<Batch>]) -> Result<Vec<bool>>;
}

struct StoreCommits(Arc<dyn BatchStore>);

#[async_trait]
impl CommitMany for StoreCommits {
    async fn commit_change(&self, next: &Batch) -> Result<bool> {
        self.0.commit_change(next).await
    }

    async fn commit_changes(&self, nexts: &[Arc<Batch>]) -> Result<Vec<bool>> {
        self.0.commit_changes(nexts).await
    }
}

/// How commits are grouped and bounded.
#[derive(Debug, Clone)]
pub struct GroupCommitOptions {
    /// Most rounds committing at once.
    pub concurrent_rounds: usize,
    /// Most changes in one round.
    pub max_round: usize,
    /// How long a change may wait for its round before it fails, unwritten.
    pub max_wait: Duration,
    /// Changes fail at once while this says the database is down.
    pub database: DatabaseStatus,
}

impl Default for GroupCommitOptions {
    fn default() -> Self {
        GroupCommitOptions {
            concurrent_rounds: 2,
            max_round: 64,
            max_wait: Duration::from_secs(5),
            database: DatabaseStatus::default(),
        }
    }
}

/// A round: the changes it commits (distinct batches), and the changes answered with
/// them, each with the index of the change of the same batch and version that is in
/// the round (they cannot be written: see the module's notes).
struct Round {
    changes: Vec<Waiter<Arc<Batch>, bool>>,
    shadowed: Vec<(usize, Waiter<Arc<Batch>, bool>)>,
}

/// Groups the commits of batch changes on one store.
#[derive(Debug)]
pub struct GroupCommits {
    rounds: Arc<Rounds<CommitRound>>,
}

impl GroupCommits {
    /// Group commit on `store`.
    pub fn new(store: Arc<dyn BatchStore>, options: GroupCommitOptions) -> Arc<GroupCommits> {
        Self::over(Arc::new(StoreCommits(store)), options)
    }

    /// Group commit on any store of changes.
    pub fn over(store: Arc<dyn CommitMany>, options: GroupCommitOptions) -> Arc<GroupCommits> {
        let kind = CommitRound {
            store,
            max_round: options.max_round.max(1),
        };
        let rounds = Rounds::new(
            kind,
            options.concurrent_rounds,
            options.max_wait,
            options.database,
        );
        Arc::new(GroupCommits { rounds })
    }

    /// Commits `next` if its batch is still at the version before it: `true` when
    /// written, `false` (nothing written) when another change came first.
    #[tracing::instrument(level = "debug", name = "group_commit.commit", skip_all, fields(batch_id = %next.id, version = next.version))]
    pub async fn commit(self: &Arc<Self>, next: Arc<Batch>) -> Result<bool> {
        self.rounds.ask(next).await
    }

    /// The changes waiting for a round, for tests to look at.
    #[cfg(test)]
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiter<Arc<Batch>, bool>>> {
        self.rounds.lock()
    }
}

/// A round of commits: up to `max_round` changes of distinct batches in one commit.
struct CommitRound {
    store: Arc<dyn CommitMany>,
    max_round: usize,
}

impl RoundKind for CommitRound {
    type Request = Arc<Batch>;
    type Answer = bool;
    type Round = Round;
    type Outcome = Vec<Result<bool>>;

    const WAITERS: &'static str = "changes";
    const MAX_WAITING: usize = MAX_WAITING_WRITES;
    // A round, once sent, is answered whatever happens to its callers; waiting for it
    // is bounded by the store's own deadline on every call.
    const GIVES_UP_WHEN_SENT: bool = false;

    fn form(&self, waiting: &mut VecDeque<Waiter<Arc<Batch>, bool>>) -> Option<Round> {
        let mut round = Round {
            changes: Vec::new(),
            shadowed: Vec::new(),
        };
        let mut in_round: HashMap<BatchId, usize> = HashMap::new();
        let mut round_bytes = 0;
        let mut later = VecDeque::new();
        while let Some(change) = waiting.pop_front() {
            match in_round.get(&change.request.id) {
                Some(&index) if round.changes[index].request.version == change.request.version => {
                    round.shadowed.push((index, change));
                }
                Some(_) => later.push_back(change),
                None => {
                    let bytes = change.request.text_bytes();
                    let fits = round.changes.is_empty()
                        || (round.changes.len() < self.max_round
                            && round_bytes + bytes <= MAX_ROUND_BYTES);
                    if fits {
                        round_bytes += bytes;
                        in_round.insert(change.request.id.clone(), round.changes.len());
                        round.changes.push(change);
                    } else {
                        later.push_back(change);
                    }
                }
            }
        }
        *waiting = later;
        (!round.changes.is_empty()).then_some(round)
    }

    fn size(round: &Round) -> usize {
        round.changes.len()
    }

    /// Commits the changes of a round: one of each result per change, or the error
    /// that failed them all.
    async fn run(&self, round: &Round) -> Result<Vec<Result<bool>>> {
        if let [change] = &round.changes[..] {
            return Ok(vec![self.store.commit_change(&change.request).await]);
        }
        let nexts: Vec<Arc<Batch>> = round
            .changes
            .iter()
            .map(|change| change.request.clone())
            .collect();
        match self.store.commit_changes(&nexts).await {
            Ok(written) if written.len() == nexts.len() => {
                Ok(written.into_iter().map(Ok).collect())
            }
            Ok(_) => Err(Error::Internal(
                "a round of commits answered for a different number of changes".into(),
            )),
            Err(error @ Error::Unavailable(_)) => Err(error),
            Err(error) => {
                // Something in the round was refused: each change on its own, so that
                // only the one at fault fails.
                tracing::warn!(%error, changes = nexts.len(), "a round of commits failed; committing its changes one at a time");
                let mut written = Vec::with_capacity(nexts.len());
                for next in &nexts {
                    written.push(self.store.commit_change(next).await);
                }
                Ok(written)
            }
        }
    }

    fn answer(round: Round, written: Result<Vec<Result<bool>>>) {
        metrics::counter!("batchd_commit_rounds_total").increment(1);
        metrics::counter!("batchd_commit_round_changes_total")
            .increment(round.changes.len() as u64);
        match written {
            Ok(written) => {
                for (index, change) in round.shadowed {
                    // An error of the change in the round says nothing of this one's
                    // version: it gets the error, not a made-up race.
                    let answer = match &written[index] {
                        Ok(_) => Ok(false),
                        Err(error) => Err(error.clone()),
                    };
                    let _ = change.answer.send(answer);
                }
                for (change, written) in round.changes.into_iter().zip(written) {
                    let _ = change.answer.send(written);
                }
            }
            Err(error) => {
                for change in round.changes {
                    let _ = change.answer.send(Err(error.clone()));
                }
                for (_, change) in round.shadowed {
                    let _ = change.answer.send(Err(error.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::sync::Semaphore;

    use super::*;

    /// Batch versions in memory whose commits wait for the test to let them through,
    /// and which remember every call: `[id]` for a lone commit, several for a round.
    struct GatedVersions {
        versions: Mutex<HashMap<BatchId, i64>>,
        gate: Semaphore,
        calls: Mutex<Vec<Vec<(BatchId, i64)>>>,
        /// Changes to this batch are refused by the database (a round that holds one
        /// fails as a whole).
        refused: Option<BatchId>,
    }

    impl GatedVersions {
        fn new(batches: u32, refused: Option<u32>) -> Arc<GatedVersions> {
            Arc::new(GatedVersions {
                versions: Mutex::new((1..=batches).map(|n| (id(n), 1)).collect()),
                gate: Semaphore::new(0),
                calls: Mutex::new(Vec::new()),
                refused: refused.map(id),
            })
        }

        fn calls(&self) -> Vec<Vec<(BatchId, i64)>> {
            self.calls.lock().unwrap().clone()
        }

        fn version(&self, n: u32) -> i64 {
            self.versions.lock().unwrap()[&id(n)]
        }

        fn apply(&self, next: &Batch) -> Result<bool> {
            if self.refused.as_ref() == Some(&next.id) {
                return Err(Error::Internal("value too long".into()));
            }
            let mut versions = self.versions.lock().unwrap();
            let current = versions.get_mut(&next.id).expect("a known batch");
            if *current != next.version - 1 {
                return Ok(false);
            }
            *current = next.version;
            Ok(true)
        }
    }

    #[async_trait]
    impl CommitMany for GatedVersions {
        async fn commit_change(&self, next: &Batch) -> Result<bool> {
            self.calls
                .lock()
                .unwrap()
                .push(vec![(next.id.clone(), next.version)]);
            self.gate.acquire().await.unwrap().forget();
            self.apply(next)
        }

        async fn commit_changes(&self, nexts: &[Arc<Batch>]) -> Result<Vec<bool>> {
            self.calls.lock().unwrap().push(
                nexts
                    .iter()
                    .map(|next| (next.id.clone(), next.version))
                    .collect(),
            );
            self.gate.acquire().await.unwrap().forget();
            if nexts
                .iter()
                .any(|next| self.refused.as_ref() == Some(&next.id))
            {
                return Err(Error::Internal("value too long".into()));
            }
            Ok(nexts.iter().map(|next| self.apply(next).unwrap()).collect())
        }
    }

    fn id(n: u32) -> BatchId {
        BatchId::parse("batch_id", &format!("batch_{n:032x}")).unwrap()
    }

    fn one_round() -> GroupCommitOptions {
        GroupCommitOptions {
            concurrent_rounds: 1,
            ..GroupCommitOptions::default()
        }
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..500 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// Commits version `version` of batch `n`.
    fn spawn_commit(
        commits: &Arc<GroupCommits>,
        n: u32,
        version: i64,
    ) -> tokio::task::JoinHandle<Result<bool>> {
        let commits = commits.clone();
        let mut next = crate::domain::fixtures::batch();
        next.id = id(n);
        next.version = version;
        tokio::spawn(async move { commits.commit(Arc::new(next)).await })
    }

    #[tokio::test]
    async fn changes_that_arrive_while_a_round_runs_share_the_next_one() {
        let store = GatedVersions::new(4, None);
        let commits = GroupCommits::over(store.clone(), one_round());
        let first = spawn_commit(&commits, 1, 2);
        until("the first round", || store.calls().len() == 1).await;
        let waiting: Vec<_> = [2, 3, 4].map(|n| spawn_commit(&commits, n, 2)).into();
        until("the changes to queue", || commits.lock().len() == 3).await;
        assert_eq!(
            store.calls().len(),
            1,
            "no second round while the slot is busy"
        );

        store.gate.add_permits(2);
        assert!(first.await.unwrap().unwrap());
        for change in waiting {
            assert!(change.await.unwrap().unwrap());
        }
        assert_eq!(
            store.calls(),
            vec![vec![(id(1), 2)], vec![(id(2), 2), (id(3), 2), (id(4), 2)]],
            "a lone change went out at once and alone; the others shared one round"
        );
        assert_eq!([2, 3, 4].map(|n| store.version(n)), [2, 2, 2]);
    }

    #[tokio::test]
    async fn changes_to_one_batch_in_one_round_are_settled_as_one_commit_each_would() {
        let store = GatedVersions::new(3, None);
        let commits = GroupCommits::over(store.clone(), one_round());
        let first = spawn_commit(&commits, 3, 2);
        until("the first round", || store.calls().len() == 1).await;
        // Two racers from version 1 of batch 1, then batch 2, then a change of batch 1
        // from version 2 (its writer saw the first racer's commit elsewhere).
        let winner = spawn_commit(&commits, 1, 2);
        until("queued", || commits.lock().len() == 1).await;
        let loser = spawn_commit(&commits, 1, 2);
        until("queued", || commits.lock().len() == 2).await;
        let other = spawn_commit(&commits, 2, 2);
        until("queued", || commits.lock().len() == 3).await;
        let after = spawn_commit(&commits, 1, 3);
        until("queued", || commits.lock().len() == 4).await;

        store.gate.add_permits(3);
        assert!(first.await.unwrap().unwrap());
        assert!(
            winner.await.unwrap().unwrap(),
            "the first of the racers wins"
        );
        assert!(
            !loser.await.unwrap().unwrap(),
            "the second loses, as it would alone"
        );
        assert!(other.await.unwrap().unwrap());
        assert!(
            after.await.unwrap().unwrap(),
            "applied on the winner's version"
        );
        assert_eq!(
            store.calls(),
            vec![
                vec![(id(3), 2)],
                vec![(id(1), 2), (id(2), 2)],
                vec![(id(1), 3)]
            ],
            "a batch is in a round once; the change from the next version waited for the next round"
        );
        assert_eq!(store.version(1), 3);
    }

    #[tokio::test]
    async fn a_change_the_database_refuses_fails_alone() {
        let store = GatedVersions::new(4, Some(3));
        let commits = GroupCommits::over(store.clone(), one_round());
        // The first round holds the only slot, so that the next three share a round.
        let first = spawn_commit(&commits, 4, 2);
        until("the first round", || store.calls().len() == 1).await;
        let round: Vec<_> = [1, 2, 3].map(|n| spawn_commit(&commits, n, 2)).into();
        until("the changes to queue", || commits.lock().len() == 3).await;
        store.gate.add_permits(100);
        assert!(first.await.unwrap().unwrap());
        let answers: Vec<Result<bool>> = answers_of(round).await;
        assert!(answers[0].as_ref().is_ok_and(|written| *written));
        assert!(answers[1].as_ref().is_ok_and(|written| *written));
        assert!(
            matches!(answers[2], Err(Error::Internal(_))),
            "{:?}",
            answers[2]
        );
        assert_eq!([1, 2, 3].map(|n| store.version(n)), [2, 2, 1]);
        assert_eq!(
            store.calls()[1..],
            [
                vec![(id(1), 2), (id(2), 2), (id(3), 2)],
                vec![(id(1), 2)],
                vec![(id(2), 2)],
                vec![(id(3), 2)]
            ],
            "the failed round was retried one change at a time"
        );
    }

    async fn answers_of(handles: Vec<tokio::task::JoinHandle<Result<bool>>>) -> Vec<Result<bool>> {
        let mut answers = Vec::new();
        for handle in handles {
            answers.push(handle.await.unwrap());
        }
        answers
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_takes_neither_its_round_nor_an_unsent_change_along() {
        let store = GatedVersions::new(3, None);
        let commits = GroupCommits::over(store.clone(), one_round());
        let first = spawn_commit(&commits, 1, 2);
        until("the first round", || store.calls().len() == 1).await;
        let gone = spawn_commit(&commits, 2, 2);
        let kept = spawn_commit(&commits, 3, 2);
        until("the changes to queue", || commits.lock().len() == 2).await;
        // The caller of the round in flight and the caller of a queued change go away.
        first.abort();
        gone.abort();
        store.gate.add_permits(2);
        assert!(kept.await.unwrap().unwrap());
        assert_eq!(store.version(1), 2, "the round that was sent was committed");
        assert_eq!(
            store.version(2),
            1,
            "the change nobody waits for was never sent"
        );
        assert_eq!(store.calls(), vec![vec![(id(1), 2)], vec![(id(3), 2)]]);
    }

    #[tokio::test]
    async fn a_change_past_its_deadline_fails_unwritten() {
        let store = GatedVersions::new(2, None);
        let commits = GroupCommits::over(
            store.clone(),
            GroupCommitOptions {
                concurrent_rounds: 1,
                max_wait: Duration::from_millis(50),
                ..GroupCommitOptions::default()
            },
        );
        let first = spawn_commit(&commits, 1, 2);
        until("the first round", || store.calls().len() == 1).await;
        let late = spawn_commit(&commits, 2, 2);
        until("queued", || commits.lock().len() == 1).await;
        tokio::time::sleep(Duration::from_millis(80)).await;
        store.gate.add_permits(1);
        assert!(first.await.unwrap().unwrap());
        let result = late.await.unwrap();
        assert!(matches!(result, Err(Error::Unavailable(_))), "{result:?}");
        assert_eq!(store.version(2), 1);
        assert_eq!(store.calls().len(), 1, "the late change was never sent");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_every_queued_change_is_still_committed() {
        let store = GatedVersions::new(MAX_WAITING_WRITES as u32 + 2, None);
        let commits = GroupCommits::over(
            store.clone(),
            GroupCommitOptions {
                concurrent_rounds: 1,
                max_round: 1_000,
                ..GroupCommitOptions::default()
            },
        );
        let first = spawn_commit(&commits, 1, 2);
        until("the first round", || store.calls().len() == 1).await;
        let queued: Vec<_> = (2..MAX_WAITING_WRITES as u32 + 2)
            .map(|n| spawn_commit(&commits, n, 2))
            .collect();
        until("the queue to fill", || {
            commits.lock().len() == MAX_WAITING_WRITES
        })
        .await;
        let mut refused = crate::domain::fixtures::batch();
        refused.id = id(MAX_WAITING_WRITES as u32 + 2);
        refused.version = 2;
        let result = commits.commit(Arc::new(refused)).await;
        // batchd's own load, said so: not the database's health.
        match result {
            Err(Error::RateLimited { reason, .. }) => {
                assert!(reason.contains("batchd replica"), "{reason}");
            }
            other => panic!("a full queue must refuse as batchd's load: {other:?}"),
        }
        store.gate.add_permits(100);
        assert!(first.await.unwrap().unwrap());
        for change in queued {
            assert!(change.await.unwrap().unwrap());
        }
        assert_eq!(
            store.version(MAX_WAITING_WRITES as u32 + 2),
            1,
            "the refused change was never written"
        );
    }

    #[tokio::test]
    async fn a_round_carries_at_most_its_bytes_of_batch_text() {
        let store = GatedVersions::new(4, None);
        let commits = GroupCommits::over(store.clone(), one_round());
        let first = spawn_commit(&commits, 1, 2);
        until("the first round", || store.calls().len() == 1).await;
        // Three changes of 1.5 MiB each: two fit in 4 MiB, the third waits.
        let mut queued = Vec::new();
        for n in 2..=4 {
            let group = commits.clone();
            let mut next = crate::domain::fixtures::batch();
            next.id = id(n);
            next.version = 2;
            next.remark = Some("x".repeat(1_500_000));
            queued.push(tokio::spawn(
                async move { group.commit(Arc::new(next)).await },
            ));
            until("queued", || commits.lock().len() == n as usize - 1).await;
        }
        store.gate.add_permits(3);
        assert!(first.await.unwrap().unwrap());
        for change in queued {
            assert!(change.await.unwrap().unwrap());
        }
        assert_eq!(
            store.calls(),
            vec![
                vec![(id(1), 2)],
                vec![(id(2), 2), (id(3), 2)],
                vec![(id(4), 2)]
            ]
        );
    }

    #[tokio::test]
    async fn a_round_holds_at_most_its_size_and_the_rest_follow_in_order() {
        let store = GatedVersions::new(5, None);
        let commits = GroupCommits::over(
            store.clone(),
            GroupCommitOptions {
                concurrent_rounds: 1,
                max_round: 2,
                ..GroupCommitOptions::default()
            },
        );
        let first = spawn_commit(&commits, 1, 2);
        until("the first round", || store.calls().len() == 1).await;
        let mut queued = Vec::new();
        for n in 2..=5 {
            queued.push(spawn_commit(&commits, n, 2));
            until("queued", || commits.lock().len() == n as usize - 1).await;
        }
        store.gate.add_permits(3);
        assert!(first.await.unwrap().unwrap());
        for change in queued {
            assert!(change.await.unwrap().unwrap());
        }
        assert_eq!(
            store.calls(),
            vec![
                vec![(id(1), 2)],
                vec![(id(2), 2), (id(3), 2)],
                vec![(id(4), 2), (id(5), 2)]
            ]
        );
    }
}
