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
//! A change comes in one of two forms. A caller that knows the batch's version (from
//! this replica's memory of its own writes) computes the next one itself and asks for
//! it to be committed ([`GroupCommits::commit`]). A caller that does not hands the
//! round its change as a function of the current version
//! ([`GroupCommits::change_current`]): the round reads every such batch in one query,
//! computes each next version, and commits them with the rest. So a write that misses
//! memory costs its round one read shared by the round's other misses, not a read of
//! its own and a second wait in another queue.
//!
//! Each change stays a compare-and-set on its own version, acknowledged only after the
//! commit that holds it: a version race fails that change alone (`false`, as one commit
//! of its own would; [`CurrentChange::Lost`] for a change computed in the round, whose
//! caller computes it again). A round holds each batch once; of several changes to one
//! batch, those computed from the same version as the one in the round cannot win
//! whatever the round does (one of them at most could, and it is the one in the
//! round), so they are answered `false` with it, and any other change of that batch
//! waits for the next round, in arrival order. Versions and the event log are then
//! exactly what one commit per change would have made.
//!
//! The queue, the slots and the bounds below are those of every round (`rounds.rs`);
//! this file says what a round of commits is. Bounds: a
//! round holds at most `max_round` changes; each statement it sends carries at most
//! [`MAX_ROUND_BYTES`] of batch text (a round whose changes, computed in the round,
//! come to more sends them in several, each a transaction of its own; the first change
//! of a statement always fits); at most [`MAX_WAITING_WRITES`]
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
/// Most bytes of batch text one statement of a round carries (a batch holds up to
/// 1 MiB): a change that would pass it waits for the next round (or, computed in the
/// round, goes in the round's next statement), unless it is the first.
const MAX_ROUND_BYTES: usize = 4 << 20;

/// What group commit needs of a store.
#[async_trait]
pub trait CommitMany: Send + Sync + 'static {
    /// The batches with these ids (sorted, distinct); unknown ids are left out: see
    /// [`BatchStore::get_batches`].
    async fn get_batches(&self, ids: &[BatchId]) -> Result<Vec<Batch>>;
    /// Commits one change: see [`BatchStore::commit_change`].
    async fn commit_change(&self, next: &Batch) -> Result<bool>;
    /// Commits changes of distinct batches in one transaction: see
    /// [`BatchStore::commit_changes`].
    async fn commit_changes(&self, nexts: &[Arc<Batch>]) -> Result<Vec<bool>>;
}

struct StoreCommits(Arc<dyn BatchStore>);

#[async_trait]
impl CommitMany for StoreCommits {
    async fn get_batches(&self, ids: &[BatchId]) -> Result<Vec<Batch>> {
        self.0.get_batches(ids).await
    }

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
    /// One round at a time: the database flushes its log for one commit at a time
    /// anyway, so a second round in flight mostly halves the rounds' size (measured in
    /// BENCHMARKS.md, issue 26, "a sixth pass").
    fn default() -> Self {
        GroupCommitOptions {
            concurrent_rounds: 1,
            max_round: 64,
            max_wait: Duration::from_secs(5),
            database: DatabaseStatus::default(),
        }
    }
}

/// A change as a function of the batch's current version: the next version, `None`
/// when there is nothing to do, or the error that refuses the change. It runs on the
/// round's task, between the round's read and its commit, so it must not wait.
pub type ChangeOfCurrent = Box<dyn Fn(&Batch) -> Result<Option<Batch>> + Send + Sync>;

/// How a change computed in a round from the current version was settled.
#[derive(Debug)]
pub enum CurrentChange {
    /// Committed: the version it was computed from, and the version written.
    Written {
        /// The version the round read.
        from: Arc<Batch>,
        /// The version written.
        next: Arc<Batch>,
    },
    /// The change had nothing to do: the version the round read, unchanged.
    Unchanged(Arc<Batch>),
    /// Another writer committed between the round's read and its commit: nothing was
    /// written, and the change is to be computed again.
    Lost,
}

/// What a change asks of a round.
enum Commit {
    /// A next version computed by the caller: written if the batch is still at the
    /// version before it.
    Computed(Arc<Batch>),
    /// A change the round computes from the version it reads.
    OfCurrent {
        id: BatchId,
        change: ChangeOfCurrent,
    },
}

impl Commit {
    fn id(&self) -> &BatchId {
        match self {
            Commit::Computed(next) => &next.id,
            Commit::OfCurrent { id, .. } => id,
        }
    }

    /// The version a computed change is computed from: changes of one batch from the
    /// same version cannot both win.
    fn computed_version(&self) -> Option<i64> {
        match self {
            Commit::Computed(next) => Some(next.version),
            Commit::OfCurrent { .. } => None,
        }
    }

    /// The batch text it carries into the statement, where known before the round
    /// reads (a change computed in the round is measured after it is computed).
    fn known_bytes(&self) -> usize {
        match self {
            Commit::Computed(next) => next.text_bytes(),
            Commit::OfCurrent { .. } => 0,
        }
    }
}

/// What a change is answered.
enum Settled {
    /// A computed change: written, or not (another change came first).
    Committed(bool),
    /// A change computed in the round.
    OfCurrent(CurrentChange),
}

type CommitWaiter = Waiter<Commit, Settled>;

/// A round: the changes it commits (distinct batches), and the changes answered with
/// them, each with the index of the change of the same batch and version that is in
/// the round (they cannot be written: see the module's notes).
struct Round {
    changes: Vec<CommitWaiter>,
    shadowed: Vec<(usize, CommitWaiter)>,
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
        match self.rounds.ask(Commit::Computed(next)).await? {
            Settled::Committed(written) => Ok(written),
            Settled::OfCurrent(_) => Err(Error::Internal(
                "a computed change was answered as one computed in its round".into(),
            )),
        }
    }

    /// Reads batch `id` in the next round, computes its next version with `change` and
    /// commits it in that round. A batch that does not exist is
    /// [`Error::BatchNotFound`]; an error of `change` is answered as is, nothing
    /// written.
    #[tracing::instrument(level = "debug", name = "group_commit.change_current", skip_all, fields(batch_id = %id))]
    pub async fn change_current(
        self: &Arc<Self>,
        id: BatchId,
        change: ChangeOfCurrent,
    ) -> Result<CurrentChange> {
        match self.rounds.ask(Commit::OfCurrent { id, change }).await? {
            Settled::OfCurrent(settled) => Ok(settled),
            Settled::Committed(_) => Err(Error::Internal(
                "a change computed in its round was answered as a computed one".into(),
            )),
        }
    }

    /// The changes waiting for a round, for tests to look at.
    #[cfg(test)]
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<CommitWaiter>> {
        self.rounds.lock()
    }
}

/// A round of commits: up to `max_round` changes of distinct batches, the batches of
/// the changes it computes read in one query first.
struct CommitRound {
    store: Arc<dyn CommitMany>,
    max_round: usize,
}

impl CommitRound {
    /// Commits `nexts` (distinct batches) in statements of at most [`MAX_ROUND_BYTES`]
    /// of batch text: one result per change, or the error that failed them all.
    async fn commit_all(&self, nexts: &[Arc<Batch>]) -> Result<Vec<Result<bool>>> {
        let mut written = Vec::with_capacity(nexts.len());
        let mut start = 0;
        while start < nexts.len() {
            let mut end = start + 1;
            let mut bytes = nexts[start].text_bytes();
            while end < nexts.len() && bytes + nexts[end].text_bytes() <= MAX_ROUND_BYTES {
                bytes += nexts[end].text_bytes();
                end += 1;
            }
            written.extend(self.commit_statement(&nexts[start..end]).await?);
            start = end;
        }
        Ok(written)
    }

    /// Commits `nexts` in one statement.
    async fn commit_statement(&self, nexts: &[Arc<Batch>]) -> Result<Vec<Result<bool>>> {
        if let [next] = nexts {
            return Ok(vec![self.store.commit_change(next).await]);
        }
        match self.store.commit_changes(nexts).await {
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
                for next in nexts {
                    written.push(self.store.commit_change(next).await);
                }
                Ok(written)
            }
        }
    }

    /// The current versions of the batches whose changes the round computes, read in
    /// one query.
    async fn read_current(&self, round: &Round) -> Result<HashMap<BatchId, Arc<Batch>>> {
        let mut ids: Vec<BatchId> = round
            .changes
            .iter()
            .filter_map(|change| match &change.request {
                Commit::OfCurrent { id, .. } => Some(id.clone()),
                Commit::Computed(_) => None,
            })
            .collect();
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        ids.sort_unstable();
        Ok(self
            .store
            .get_batches(&ids)
            .await?
            .into_iter()
            .map(|batch| (batch.id.clone(), Arc::new(batch)))
            .collect())
    }
}

impl RoundKind for CommitRound {
    type Request = Commit;
    type Answer = Settled;
    type Round = Round;
    type Outcome = Vec<Result<Settled>>;

    const WAITERS: &'static str = "changes";
    const MAX_WAITING: usize = MAX_WAITING_WRITES;
    // A round, once sent, is answered whatever happens to its callers; waiting for it
    // is bounded by the store's own deadline on every call.
    const GIVES_UP_WHEN_SENT: bool = false;

    fn form(&self, waiting: &mut VecDeque<CommitWaiter>) -> Option<Round> {
        let mut round = Round {
            changes: Vec::new(),
            shadowed: Vec::new(),
        };
        let mut in_round: HashMap<BatchId, usize> = HashMap::new();
        let mut round_bytes = 0;
        let mut later = VecDeque::new();
        while let Some(change) = waiting.pop_front() {
            match in_round.get(change.request.id()) {
                Some(&index)
                    if change.request.computed_version().is_some()
                        && round.changes[index].request.computed_version()
                            == change.request.computed_version() =>
                {
                    round.shadowed.push((index, change));
                }
                Some(_) => later.push_back(change),
                None => {
                    let bytes = change.request.known_bytes();
                    let fits = round.changes.is_empty()
                        || (round.changes.len() < self.max_round
                            && round_bytes + bytes <= MAX_ROUND_BYTES);
                    if fits {
                        round_bytes += bytes;
                        in_round.insert(change.request.id().clone(), round.changes.len());
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

    /// Reads the batches of the changes the round computes, computes them, and commits
    /// every change of the round: one result per change, or the error that failed
    /// them all.
    async fn run(&self, round: &Round) -> Result<Vec<Result<Settled>>> {
        let current = self.read_current(round).await?;
        let mut settled: Vec<Option<Result<Settled>>> = Vec::with_capacity(round.changes.len());
        let mut nexts: Vec<Arc<Batch>> = Vec::with_capacity(round.changes.len());
        // Each change to write: its index in the round, and the version it was computed
        // from when the round computed it.
        let mut writers: Vec<(usize, Option<Arc<Batch>>)> = Vec::with_capacity(round.changes.len());
        for (index, change) in round.changes.iter().enumerate() {
            // The next version to write, or the change's answer when there is none.
            let next = match &change.request {
                Commit::Computed(next) => Ok((next.clone(), None)),
                Commit::OfCurrent { id, change } => match current.get(id) {
                    None => Err(Err(Error::BatchNotFound(id.to_string()))),
                    Some(from) => match change(from) {
                        Ok(Some(next)) => Ok((Arc::new(next), Some(from.clone()))),
                        Ok(None) => Err(Ok(Settled::OfCurrent(CurrentChange::Unchanged(
                            from.clone(),
                        )))),
                        Err(error) => Err(Err(error)),
                    },
                },
            };
            match next {
                Ok((next, from)) => {
                    nexts.push(next);
                    writers.push((index, from));
                    settled.push(None);
                }
                Err(answer) => settled.push(Some(answer)),
            }
        }
        // One result per change: each statement's count is checked in `commit_statement`.
        let written = self.commit_all(&nexts).await?;
        for (((index, from), next), written) in writers.into_iter().zip(nexts).zip(written) {
            settled[index] = Some(written.map(|written| match from {
                None => Settled::Committed(written),
                Some(from) if written => Settled::OfCurrent(CurrentChange::Written { from, next }),
                Some(_) => Settled::OfCurrent(CurrentChange::Lost),
            }));
        }
        settled
            .into_iter()
            .map(|settled| {
                settled.ok_or_else(|| Error::Internal("a change of a round was not settled".into()))
            })
            .collect()
    }

    fn answer(round: Round, settled: Result<Vec<Result<Settled>>>) {
        metrics::counter!("batchd_commit_rounds_total").increment(1);
        metrics::counter!("batchd_commit_round_changes_total")
            .increment(round.changes.len() as u64);
        match settled {
            Ok(settled) => {
                for (index, change) in round.shadowed {
                    // An error of the change in the round says nothing of this one's
                    // version: it gets the error, not a made-up race.
                    let answer = match &settled[index] {
                        Ok(_) => Ok(Settled::Committed(false)),
                        Err(error) => Err(error.clone()),
                    };
                    let _ = change.answer.send(answer);
                }
                for (change, settled) in round.changes.into_iter().zip(settled) {
                    let _ = change.answer.send(settled);
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
        /// The ids of every read, one list per query.
        reads: Mutex<Vec<Vec<BatchId>>>,
    }

    impl GatedVersions {
        fn new(batches: u32, refused: Option<u32>) -> Arc<GatedVersions> {
            Arc::new(GatedVersions {
                versions: Mutex::new((1..=batches).map(|n| (id(n), 1)).collect()),
                gate: Semaphore::new(0),
                calls: Mutex::new(Vec::new()),
                refused: refused.map(id),
                reads: Mutex::new(Vec::new()),
            })
        }

        fn reads(&self) -> Vec<Vec<BatchId>> {
            self.reads.lock().unwrap().clone()
        }

        /// Another writer commits the next version of batch `n`.
        fn bump(&self, n: u32) {
            *self.versions.lock().unwrap().get_mut(&id(n)).unwrap() += 1;
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
        async fn get_batches(&self, ids: &[BatchId]) -> Result<Vec<Batch>> {
            self.reads.lock().unwrap().push(ids.to_vec());
            let versions = self.versions.lock().unwrap();
            Ok(ids
                .iter()
                .filter_map(|wanted| {
                    let mut batch = crate::domain::fixtures::batch();
                    batch.id = wanted.clone();
                    batch.version = *versions.get(wanted)?;
                    Some(batch)
                })
                .collect())
        }

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

    /// Changes batch `n` in a round, from the version the round reads: `+1`.
    fn spawn_change_current(
        commits: &Arc<GroupCommits>,
        n: u32,
    ) -> tokio::task::JoinHandle<Result<CurrentChange>> {
        let commits = commits.clone();
        tokio::spawn(async move {
            commits
                .change_current(
                    id(n),
                    Box::new(|current: &Batch| {
                        let mut next = current.clone();
                        next.version += 1;
                        Ok(Some(next))
                    }),
                )
                .await
        })
    }

    fn written_versions(settled: Result<CurrentChange>) -> (i64, i64) {
        match settled {
            Ok(CurrentChange::Written { from, next }) => (from.version, next.version),
            other => panic!("expected a written change: {other:?}"),
        }
    }

    #[tokio::test]
    async fn changes_computed_in_a_round_share_one_read_and_the_commit_of_the_others() {
        let store = GatedVersions::new(4, None);
        let commits = GroupCommits::over(store.clone(), one_round());
        let first = spawn_commit(&commits, 4, 2);
        until("the first round", || store.calls().len() == 1).await;
        let of_current_1 = spawn_change_current(&commits, 3);
        until("queued", || commits.lock().len() == 1).await;
        let computed = spawn_commit(&commits, 2, 2);
        until("queued", || commits.lock().len() == 2).await;
        let of_current_2 = spawn_change_current(&commits, 1);
        until("queued", || commits.lock().len() == 3).await;

        store.gate.add_permits(2);
        assert!(first.await.unwrap().unwrap());
        assert_eq!(written_versions(of_current_1.await.unwrap()), (1, 2));
        assert!(computed.await.unwrap().unwrap());
        assert_eq!(written_versions(of_current_2.await.unwrap()), (1, 2));
        assert_eq!(
            store.reads(),
            vec![vec![id(1), id(3)]],
            "one read for the round's two changes computed in it, none for the others"
        );
        assert_eq!(
            store.calls(),
            vec![vec![(id(4), 2)], vec![(id(3), 2), (id(2), 2), (id(1), 2)]],
            "all three committed in one statement, in arrival order"
        );
        assert_eq!([1, 2, 3, 4].map(|n| store.version(n)), [2, 2, 2, 2]);
    }

    #[tokio::test]
    async fn a_change_computed_in_a_round_is_answered_as_its_own_read_and_commit_would_be() {
        let store = GatedVersions::new(5, None);
        let commits = GroupCommits::over(store.clone(), one_round());
        let first = spawn_commit(&commits, 5, 2);
        until("the first round", || store.calls().len() == 1).await;
        let ask = |n: u32, change: ChangeOfCurrent| {
            let commits = commits.clone();
            tokio::spawn(async move { commits.change_current(id(n), change).await })
        };
        // Batch 9 does not exist; batch 1's change is refused; batch 2's has nothing
        // to do; batch 3 is written by another writer between the round's read and its
        // commit; batch 4's change is written.
        let missing = ask(9, Box::new(|_| panic!("no batch, nothing to compute")));
        until("queued", || commits.lock().len() == 1).await;
        let refused = ask(
            1,
            Box::new(|current| {
                Err(Error::invalid(
                    "status",
                    format!("version {}", current.version),
                ))
            }),
        );
        until("queued", || commits.lock().len() == 2).await;
        let unchanged = ask(2, Box::new(|_| Ok(None)));
        until("queued", || commits.lock().len() == 3).await;
        let racer = store.clone();
        let lost = ask(
            3,
            Box::new(move |current| {
                racer.bump(3);
                let mut next = current.clone();
                next.version += 1;
                Ok(Some(next))
            }),
        );
        until("queued", || commits.lock().len() == 4).await;
        let written = spawn_change_current(&commits, 4);
        until("queued", || commits.lock().len() == 5).await;

        store.gate.add_permits(2);
        assert!(first.await.unwrap().unwrap());
        let missing = missing.await.unwrap();
        assert!(
            matches!(&missing, Err(Error::BatchNotFound(id)) if id.ends_with("9")),
            "{missing:?}"
        );
        let refused = refused.await.unwrap();
        assert!(
            matches!(&refused, Err(Error::InvalidArgument { reason, .. }) if reason == "version 1"),
            "{refused:?}"
        );
        match unchanged.await.unwrap() {
            Ok(CurrentChange::Unchanged(current)) => assert_eq!(current.version, 1),
            other => panic!("expected the version read, unchanged: {other:?}"),
        }
        let lost = lost.await.unwrap();
        assert!(matches!(lost, Ok(CurrentChange::Lost)), "{lost:?}");
        assert_eq!(written_versions(written.await.unwrap()), (1, 2));
        assert_eq!(
            store.calls()[1..],
            [vec![(id(3), 2), (id(4), 2)]],
            "only the changes with something to write went to the commit"
        );
        assert_eq!(
            [1, 2, 3, 4].map(|n| store.version(n)),
            [1, 1, 2, 2],
            "batch 3 is at the other writer's version, not the lost change's"
        );
    }

    #[tokio::test]
    async fn changes_of_one_batch_computed_in_rounds_each_start_from_the_one_before() {
        let store = GatedVersions::new(2, None);
        let commits = GroupCommits::over(store.clone(), one_round());
        let first = spawn_commit(&commits, 2, 2);
        until("the first round", || store.calls().len() == 1).await;
        let earlier = spawn_change_current(&commits, 1);
        until("queued", || commits.lock().len() == 1).await;
        let later = spawn_change_current(&commits, 1);
        until("queued", || commits.lock().len() == 2).await;

        store.gate.add_permits(3);
        assert!(first.await.unwrap().unwrap());
        assert_eq!(written_versions(earlier.await.unwrap()), (1, 2));
        assert_eq!(
            written_versions(later.await.unwrap()),
            (2, 3),
            "the second waited for the next round and read the first's version"
        );
        assert_eq!(store.reads(), vec![vec![id(1)], vec![id(1)]]);
        assert_eq!(store.version(1), 3);
    }

    #[tokio::test]
    async fn changes_computed_in_a_round_go_out_in_statements_of_at_most_its_bytes() {
        let store = GatedVersions::new(4, None);
        let commits = GroupCommits::over(store.clone(), one_round());
        let first = spawn_commit(&commits, 4, 2);
        until("the first round", || store.calls().len() == 1).await;
        // Three changes that each make a batch of 1.5 MiB: their size is known only
        // once the round computed them, so they share the round, in two statements.
        let mut queued = Vec::new();
        for n in 1..=3 {
            let group = commits.clone();
            let change: ChangeOfCurrent = Box::new(|current| {
                let mut next = current.clone();
                next.version += 1;
                next.remark = Some("x".repeat(1_500_000));
                Ok(Some(next))
            });
            queued.push(tokio::spawn(async move {
                group.change_current(id(n), change).await
            }));
            until("queued", || commits.lock().len() == n as usize).await;
        }
        store.gate.add_permits(3);
        assert!(first.await.unwrap().unwrap());
        for change in queued {
            assert_eq!(written_versions(change.await.unwrap()), (1, 2));
        }
        assert_eq!(store.reads(), vec![vec![id(1), id(2), id(3)]]);
        assert_eq!(
            store.calls(),
            vec![
                vec![(id(4), 2)],
                vec![(id(1), 2), (id(2), 2)],
                vec![(id(3), 2)]
            ]
        );
    }
}
