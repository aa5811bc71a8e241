//! Point reads that arrive together share one query.
//!
//! Under load, most of the cost of reading one batch by id is the round trip itself
//! (pool checkout, a socket write, a wake-up on the answer, the database's per-statement
//! work), not the row. So at most a few queries run at once, and the reads that arrive
//! while they run wait for the next one, which fetches all of them with a single
//! `WHERE id IN (...)`. At low load every read has a query to itself and waits for
//! nothing.
//!
//! Consistency is that of a query per read: a read only ever joins a query that has not
//! been sent yet, so its answer includes every commit that finished before it was asked.
//!
//! The queue, its slots and its bounds are those of every round (`rounds.rs` has the
//! machinery; this file says what a round of reads is). The queue is bounded in length
//! and in time: a read that finds it full fails with
//! RESOURCE_EXHAUSTED (this replica's load, not the database's), one that has waited
//! longer than its deadline with UNAVAILABLE; a read whose caller went away
//! is dropped from it unasked; and while the database is known to be down (the
//! readiness check says so) reads fail at once instead of queueing behind queries that
//! cannot succeed.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::rounds::{RoundKind, Rounds, Waiter};
use super::{BatchStore, DatabaseStatus};
use crate::domain::{Batch, BatchId};
use crate::error::Result;

/// Most ids fetched by one query.
const MAX_GROUP: usize = 128;
/// Most reads waiting for a query at once: more than the 10,000 watch streams that
/// reconnect together when a replica restarts (each reads its batch first), a few
/// hundred bytes each.
pub const MAX_WAITING_READS: usize = 16_384;

/// What coalesced reads need of a store: many batches by id in one query.
#[async_trait]
pub trait ReadMany: Send + Sync + 'static {
    /// The batches with these ids (sorted, distinct); unknown ids are left out.
    async fn get_batches(&self, ids: &[BatchId]) -> Result<Vec<Batch>>;
}

struct StoreReads(Arc<dyn BatchStore>);

#[async_trait]
impl ReadMany for StoreReads {
    async fn get_batches(&self, ids: &[BatchId]) -> Result<Vec<Batch>> {
        self.0.get_batches(ids).await
    }
}

/// How point reads are bounded.
#[derive(Debug, Clone)]
pub struct PointReadOptions {
    /// Most queries at once.
    pub concurrent_queries: usize,
    /// How long a read waits in all (queue and query) before it fails.
    pub max_wait: Duration,
    /// Reads fail at once while this says the database is down.
    pub database: DatabaseStatus,
}

impl Default for PointReadOptions {
    fn default() -> Self {
        PointReadOptions {
            concurrent_queries: 2,
            max_wait: Duration::from_secs(5),
            database: DatabaseStatus::default(),
        }
    }
}

/// Coalesces point reads of batches on one store.
#[derive(Debug)]
pub struct PointReads {
    rounds: Arc<Rounds<ReadRound>>,
}

impl PointReads {
    /// Point reads on `store`.
    pub fn new(store: Arc<dyn BatchStore>, options: PointReadOptions) -> Arc<PointReads> {
        Self::over(Arc::new(StoreReads(store)), options)
    }

    /// Point reads on any source of batches.
    pub fn over(store: Arc<dyn ReadMany>, options: PointReadOptions) -> Arc<PointReads> {
        let rounds = Rounds::new(
            ReadRound { store },
            options.concurrent_queries,
            options.max_wait,
            options.database,
        );
        Arc::new(PointReads { rounds })
    }

    /// The database is known down: the readiness check fails and so did the last
    /// query. Both, so that a readiness connection that alone cannot connect (say,
    /// `too many connections`) does not refuse reads the pool would answer.
    pub fn database_known_down(&self) -> bool {
        self.rounds.database_known_down()
    }

    /// The reads waiting for a query, for tests to look at.
    #[cfg(test)]
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiter<BatchId, Option<Arc<Batch>>>>> {
        self.rounds.lock()
    }

    /// The batch with this id, whoever owns it, as the database has it now.
    #[tracing::instrument(level = "debug", name = "point_reads.get", skip_all, fields(batch_id = %id))]
    pub async fn get(self: &Arc<Self>, id: &BatchId) -> Result<Option<Arc<Batch>>> {
        self.rounds.ask(id.clone()).await
    }
}

/// A round of point reads: one query for up to [`MAX_GROUP`] ids.
struct ReadRound {
    store: Arc<dyn ReadMany>,
}

impl RoundKind for ReadRound {
    type Request = BatchId;
    type Answer = Option<Arc<Batch>>;
    type Round = Vec<Waiter<BatchId, Option<Arc<Batch>>>>;
    type Outcome = Vec<Batch>;

    const WAITERS: &'static str = "reads";
    const MAX_WAITING: usize = MAX_WAITING_READS;
    const GIVES_UP_WHEN_SENT: bool = true;

    fn form(&self, waiting: &mut VecDeque<Waiter<BatchId, Self::Answer>>) -> Option<Self::Round> {
        let take = waiting.len().min(MAX_GROUP);
        (take > 0).then(|| waiting.drain(..take).collect())
    }

    fn size(round: &Self::Round) -> usize {
        round.len()
    }

    async fn run(&self, round: &Self::Round) -> Result<Vec<Batch>> {
        let mut ids: Vec<BatchId> = round.iter().map(|waiter| waiter.request.clone()).collect();
        ids.sort_unstable();
        ids.dedup();
        self.store.get_batches(&ids).await
    }

    fn answer(round: Self::Round, outcome: Result<Vec<Batch>>) {
        match outcome {
            Ok(batches) => {
                let by_id: HashMap<BatchId, Arc<Batch>> = batches
                    .into_iter()
                    .map(|batch| (batch.id.clone(), Arc::new(batch)))
                    .collect();
                for waiter in round {
                    // A waiter that went away no longer needs its answer.
                    let _ = waiter.answer.send(Ok(by_id.get(&waiter.request).cloned()));
                }
            }
            Err(error) => {
                for waiter in round {
                    let _ = waiter.answer.send(Err(error.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::Semaphore;

    use std::sync::Mutex;

    use super::*;
    use crate::domain::{Batch, BatchId};
    use crate::error::Error;

    /// Batches in memory whose queries wait for the test to let them through, and
    /// which remember the ids of every query.
    struct GatedBatches {
        batches: HashMap<BatchId, Batch>,
        gate: Semaphore,
        queries: Mutex<Vec<Vec<BatchId>>>,
        fail: bool,
    }

    impl GatedBatches {
        fn with_ids(ids: &[&BatchId], fail: bool) -> Arc<GatedBatches> {
            let batches = ids
                .iter()
                .map(|id| {
                    let mut batch = crate::domain::fixtures::batch();
                    batch.id = (*id).clone();
                    ((*id).clone(), batch)
                })
                .collect();
            Arc::new(GatedBatches {
                batches,
                gate: Semaphore::new(0),
                queries: Mutex::new(Vec::new()),
                fail,
            })
        }

        fn queries(&self) -> Vec<Vec<BatchId>> {
            self.queries.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl ReadMany for GatedBatches {
        async fn get_batches(&self, ids: &[BatchId]) -> Result<Vec<Batch>> {
            self.queries.lock().unwrap().push(ids.to_vec());
            self.gate.acquire().await.unwrap().forget();
            if self.fail {
                return Err(Error::Unavailable("connection refused".into()));
            }
            Ok(ids
                .iter()
                .filter_map(|id| self.batches.get(id).cloned())
                .collect())
        }
    }

    fn one_query() -> PointReadOptions {
        PointReadOptions {
            concurrent_queries: 1,
            ..PointReadOptions::default()
        }
    }

    fn id(n: u32) -> BatchId {
        BatchId::parse("batch_id", &format!("batch_{n:032x}")).unwrap()
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

    fn spawn_read(
        reads: &Arc<PointReads>,
        n: u32,
    ) -> tokio::task::JoinHandle<Result<Option<Arc<Batch>>>> {
        let reads = reads.clone();
        tokio::spawn(async move { reads.get(&id(n)).await })
    }

    #[tokio::test]
    async fn reads_that_arrive_while_the_query_runs_share_the_next_one() {
        let source = GatedBatches::with_ids(&[&id(1), &id(2), &id(3), &id(4)], false);
        let reads = PointReads::over(source.clone(), one_query());

        let first = spawn_read(&reads, 1);
        until("the first query", || source.queries().len() == 1).await;
        // The only slot is busy: these wait, and 3 is asked for twice.
        let waiting: Vec<_> = [2, 3, 3, 4, 99].map(|n| spawn_read(&reads, n)).into();
        until("the reads to queue", || reads.lock().len() == 5).await;
        assert_eq!(
            source.queries().len(),
            1,
            "no second query while the slot is busy"
        );

        source.gate.add_permits(2);
        assert_eq!(first.await.unwrap().unwrap().unwrap().id, id(1));
        let mut answers: Vec<Option<BatchId>> = Vec::new();
        for read in waiting {
            answers.push(read.await.unwrap().unwrap().map(|batch| batch.id.clone()));
        }
        assert_eq!(
            answers,
            vec![Some(id(2)), Some(id(3)), Some(id(3)), Some(id(4)), None]
        );
        assert_eq!(
            source.queries(),
            vec![vec![id(1)], vec![id(2), id(3), id(4), id(99)]],
            "one query for the first read, one for everything that queued behind it"
        );
    }

    #[tokio::test]
    async fn a_failed_query_fails_every_read_it_carried() {
        let source = GatedBatches::with_ids(&[&id(1), &id(2)], true);
        let reads = PointReads::over(source.clone(), one_query());
        let first = spawn_read(&reads, 1);
        until("the first query", || source.queries().len() == 1).await;
        let second = spawn_read(&reads, 2);
        let third = spawn_read(&reads, 2);
        until("the reads to queue", || reads.lock().len() == 2).await;
        source.gate.add_permits(2);
        for read in [first, second, third] {
            assert!(matches!(read.await.unwrap(), Err(Error::Unavailable(_))));
        }
    }

    #[tokio::test]
    async fn a_reader_that_goes_away_does_not_take_the_others_answers_along() {
        let source = GatedBatches::with_ids(&[&id(1), &id(2)], false);
        let reads = PointReads::over(source.clone(), one_query());
        // The first read starts the query that its queued companions depend on, then
        // its caller disappears.
        let first = spawn_read(&reads, 1);
        until("the first query", || source.queries().len() == 1).await;
        let second = spawn_read(&reads, 2);
        until("the read to queue", || reads.lock().len() == 1).await;
        first.abort();
        source.gate.add_permits(2);
        assert_eq!(second.await.unwrap().unwrap().unwrap().id, id(2));
    }

    #[tokio::test]
    async fn without_contention_each_read_has_a_query_of_its_own() {
        let source = GatedBatches::with_ids(&[&id(1)], false);
        source.gate.add_permits(10);
        let reads = PointReads::over(source.clone(), PointReadOptions::default());
        for _ in 0..3 {
            assert_eq!(reads.get(&id(1)).await.unwrap().unwrap().id, id(1));
        }
        assert_eq!(source.queries(), vec![vec![id(1)]; 3]);
    }

    #[tokio::test]
    async fn a_read_past_its_deadline_fails_and_is_never_queried() {
        let source = GatedBatches::with_ids(&[&id(1), &id(2), &id(3)], false);
        let reads = PointReads::over(
            source.clone(),
            PointReadOptions {
                concurrent_queries: 1,
                max_wait: Duration::from_millis(100),
                ..PointReadOptions::default()
            },
        );
        let first = spawn_read(&reads, 1);
        until("the first query", || source.queries().len() == 1).await;
        let late = spawn_read(&reads, 2);
        let result = late.await.unwrap();
        assert!(matches!(result, Err(Error::Unavailable(_))), "{result:?}");
        // The query that was stuck answers (too late for its reader); the next one
        // carries only the read that still waits.
        let waiting = spawn_read(&reads, 3);
        source.gate.add_permits(2);
        let _ = first.await.unwrap();
        assert_eq!(waiting.await.unwrap().unwrap().unwrap().id, id(3));
        assert_eq!(source.queries(), vec![vec![id(1)], vec![id(3)]]);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let source = GatedBatches::with_ids(&[&id(1)], false);
        let reads = PointReads::over(source.clone(), one_query());
        let first = spawn_read(&reads, 1);
        until("the first query", || source.queries().len() == 1).await;
        let queued: Vec<_> = (0..MAX_WAITING_READS as u32)
            .map(|n| spawn_read(&reads, 10 + n))
            .collect();
        until("the queue to fill", || {
            reads.lock().len() == MAX_WAITING_READS
        })
        .await;
        let refused = reads.get(&id(1)).await;
        // batchd's own load, said so: not the database's health.
        match refused {
            Err(Error::RateLimited { reason, .. }) => {
                assert!(reason.contains("batchd replica"), "{reason}");
            }
            other => panic!("a full queue must refuse as batchd's load: {other:?}"),
        }
        // One permit per query: the queue drains in groups of MAX_GROUP.
        source.gate.add_permits(MAX_WAITING_READS / MAX_GROUP + 2);
        let _ = first.await.unwrap();
        for read in queued {
            assert!(read.await.unwrap().is_ok());
        }
    }

    #[tokio::test]
    async fn reads_fail_fast_while_the_database_is_known_down() {
        let failing = GatedBatches::with_ids(&[&id(1)], true);
        failing.gate.add_permits(10);
        let database = DatabaseStatus::default();
        let options = PointReadOptions {
            database: database.clone(),
            ..PointReadOptions::default()
        };
        let reads = PointReads::over(failing.clone(), options.clone());
        database.set_down(true);
        // The readiness check alone is not enough: the pool may still answer.
        assert!(matches!(
            reads.get(&id(1)).await,
            Err(Error::Unavailable(_))
        ));
        assert_eq!(
            failing.queries().len(),
            1,
            "queried while only readiness was down"
        );
        // Both down: no more queries.
        assert!(matches!(
            reads.get(&id(1)).await,
            Err(Error::Unavailable(_))
        ));
        assert_eq!(failing.queries().len(), 1, "no query while known down");
        database.set_down(false);
        let _ = reads.get(&id(1)).await;
        assert_eq!(
            failing.queries().len(),
            2,
            "queries again once readiness is back"
        );

        // A readiness connection that fails while the pool answers refuses nothing.
        let healthy = GatedBatches::with_ids(&[&id(1)], false);
        healthy.gate.add_permits(10);
        let reads = PointReads::over(healthy.clone(), options);
        database.set_down(true);
        for _ in 0..3 {
            assert_eq!(reads.get(&id(1)).await.unwrap().unwrap().id, id(1));
        }
    }
}
