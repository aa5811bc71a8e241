//! The contract of `batchd::store::Store`, as its documentation states it, checked on
//! every backend (`store_contract::sqlite::<test>` and `store_contract::postgres::<test>`)
//! by calling the trait directly: what the service relies on, whichever database is
//! behind it. Batches are made and changed by the domain, as the service makes them.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use batchd::domain::{
    ApiKey, ApiKeySecret, Batch, BatchErrorEntry, BatchEvent, BatchId, BatchPolicy, BatchStatus,
    BatchUpdate, BatchUpdateInput, Caller, CreateBatchInput, NewBatch, RequestCounts, Scope, Usage,
};
use batchd::store::{
    BatchPageQuery, EarlierClaim, FeedChange, FeedCursor, IdempotencyClaim, Store,
};

use crate::helpers::*;

/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600;
const DAY: i64 = 24 * 3600;

/// A migrated store on a fresh database of `backend`; the database lives as long as
/// the returned `TestDb`.
async fn fresh_store(backend: Backend) -> (TestDb, Arc<dyn Store>) {
    let db = TestDb::fresh(backend).await;
    let store = batchd::store::connect(&db.url, &Default::default())
        .await
        .expect("open store");
    store.migrate().await.expect("migrate");
    (db, store)
}

/// A new batch of `owner` created at `now`, from a create request edited by `edit`.
fn created(owner: &str, now: i64, edit: impl FnOnce(&mut CreateBatchInput)) -> Batch {
    let mut input = CreateBatchInput {
        input_file_id: "file-abc123".into(),
        endpoint: "/v1/chat/completions".into(),
        completion_window: "24h".into(),
        ..Default::default()
    };
    edit(&mut input);
    let new = NewBatch::parse(input, &BatchPolicy::default()).expect("a valid request");
    let key = ApiKey::new(owner, Scope::Batches, now).expect("a valid user");
    Batch::create(new, &Caller::of(&key), now)
}

/// A new batch of `owner` from the plainest create request.
fn plain(owner: &str, now: i64) -> Batch {
    created(owner, now, |_| {})
}

/// The next version of `batch`: a worker's update applied at `now`.
fn updated(batch: &Batch, update: BatchUpdateInput, now: i64) -> Batch {
    let update = BatchUpdate::parse(update).expect("a valid update");
    batch
        .apply(&update, now)
        .expect("a legal update")
        .expect("an update that changes the batch")
}

/// The next version of `batch`, moved to `status` at `now`.
fn moved(batch: &Batch, status: BatchStatus, now: i64) -> Batch {
    let update = BatchUpdateInput {
        status: Some(status),
        ..Default::default()
    };
    updated(batch, update, now)
}

/// The next version of `batch`, `completed` requests done at `now`.
fn progressed(batch: &Batch, completed: i64, now: i64) -> Batch {
    let update = BatchUpdateInput {
        request_counts: Some(RequestCounts {
            total: 1_000,
            completed,
            failed: 0,
        }),
        ..Default::default()
    };
    updated(batch, update, now)
}

/// Commits `next`, which must win.
async fn commit(store: &dyn Store, next: &Batch) {
    assert!(
        store.commit_change(next).await.unwrap(),
        "v{} of {} was refused",
        next.version,
        next.id
    );
}

/// Moves `batch` through `statuses` at `now`, committing each version; returns the last.
async fn commit_moves(
    store: &dyn Store,
    batch: &Batch,
    statuses: &[BatchStatus],
    now: i64,
) -> Batch {
    let mut batch = batch.clone();
    for &status in statuses {
        batch = moved(&batch, status, now);
        commit(store, &batch).await;
    }
    batch
}

/// A running batch of `owner`, created at `now` and taken to version `versions` by
/// progress reports a minute apart.
async fn with_versions(store: &dyn Store, owner: &str, now: i64, versions: i64) -> Batch {
    let mut batch = plain(owner, now);
    store.insert_batch(&batch, None).await.unwrap();
    for version in 2..=versions {
        let at = now + 60 * (version - 1);
        batch = if version == 2 {
            moved(&batch, BatchStatus::InProgress, at)
        } else {
            progressed(&batch, version, at)
        };
        commit(store, &batch).await;
    }
    batch
}

/// Every change of the feed from the start, once `count` are readable: on PostgreSQL
/// the horizon is the server's, and other tests' transactions may hold it a moment.
/// Then compaction, which leaves what the feed holds back, sees them all too.
async fn readable_changes(store: &dyn Store, count: usize) -> Vec<FeedChange> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let page = store
            .changes_after(FeedCursor::default(), None, 1_000)
            .await
            .unwrap();
        if page.changes.len() >= count {
            assert_eq!(page.changes.len(), count, "no more changes than committed");
            return page.changes;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {count} changes became readable",
            page.changes.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

// The event log's two reads are called here only, so that the suite follows them
// wherever the trait that declares them moves.

/// `EventLog::events_after`.
async fn events(store: &dyn Store, id: &BatchId, after: i64, limit: i64) -> Vec<BatchEvent> {
    store.events_after(id, after, limit).await.unwrap()
}

/// The versions of `id` the event log keeps, oldest first.
async fn logged_versions(store: &dyn Store, id: &BatchId) -> Vec<i64> {
    let events = events(store, id, 0, 1_000).await;
    events.iter().map(|event| event.version).collect()
}

/// `EventLog::latest_versions`, sorted by id.
async fn latest(store: &dyn Store, ids: &[BatchId]) -> Vec<(BatchId, i64)> {
    let mut versions = store.latest_versions(ids).await.unwrap();
    versions.sort();
    versions
}

/// A query of every batch of every owner, oldest first, that a test narrows.
fn everything() -> BatchPageQuery<'static> {
    BatchPageQuery {
        owner: None,
        after: None,
        statuses: &[],
        job_id: None,
        created_after: None,
        created_before: None,
        metadata: &[],
        stalled: None,
        oldest_first: true,
        limit: 100,
    }
}

/// The ids `query` lists.
async fn listed(store: &dyn Store, query: BatchPageQuery<'_>) -> Vec<BatchId> {
    let page = store.list_batches(query).await.unwrap();
    page.into_iter().map(|batch| batch.id).collect()
}

/// Every id `query` lists, read page by page (`limit` a page) with the `after` cursor.
async fn listed_in_pages(store: &dyn Store, query: BatchPageQuery<'_>) -> Vec<BatchId> {
    let mut all: Vec<BatchId> = Vec::new();
    loop {
        let page = listed(
            store,
            BatchPageQuery {
                after: all.last(),
                ..query
            },
        )
        .await;
        assert!(page.len() as i64 <= query.limit, "a page over the limit");
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

fn ids(batches: &[&Batch]) -> Vec<BatchId> {
    batches.iter().map(|batch| batch.id.clone()).collect()
}

async fn an_inserted_batch_is_read_back_whole_alone_and_among_others(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    let full = created("alice", T0, |input| {
        input.metadata = Some(BTreeMap::from([("team".into(), "search".into())]));
        input.job_id = Some("job-42".into());
        input.remark = Some("nightly eval".into());
        input.output_expires_after = Some(("created_at".into(), 7 * DAY));
    });
    let other = plain("bob", T0 + 1);
    let unknown = BatchId::generate();
    store.insert_batch(&full, None).await.unwrap();
    store.insert_batch(&other, None).await.unwrap();

    assert_eq!(store.get_batch(&full.id).await.unwrap(), Some(full.clone()));
    assert_eq!(store.get_batch(&unknown).await.unwrap(), None);
    let mut found = store
        .get_batches(&[other.id.clone(), unknown.clone(), full.id.clone()])
        .await
        .unwrap();
    found.sort_by_key(|batch| batch.created_at);
    assert_eq!(found, vec![full.clone(), other.clone()]);
    assert_eq!(
        store
            .get_batches(std::slice::from_ref(&other.id))
            .await
            .unwrap(),
        vec![other]
    );
    assert!(store.get_batches(&[unknown]).await.unwrap().is_empty());
    assert!(store.get_batches(&[]).await.unwrap().is_empty());
    // Its first event is version 1, the whole batch.
    assert_eq!(
        events(&*store, &full.id, 0, 10).await,
        vec![BatchEvent {
            version: 1,
            batch: full,
        }]
    );
    store.close().await;
}

async fn a_commit_from_the_stored_version_replaces_the_batch_and_logs_it(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    let first = plain("alice", T0);
    store.insert_batch(&first, None).await.unwrap();
    let running = moved(&first, BatchStatus::InProgress, T0 + 60);

    assert!(store.commit_change(&running).await.unwrap());
    assert_eq!(
        store.get_batch(&first.id).await.unwrap(),
        Some(running.clone())
    );
    assert_eq!(
        events(&*store, &first.id, 1, 10).await,
        vec![BatchEvent {
            version: 2,
            batch: running,
        }]
    );
    store.close().await;
}

async fn a_commit_from_a_stale_version_writes_nothing(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    let first = plain("alice", T0);
    store.insert_batch(&first, None).await.unwrap();
    // Two writers read version 1 and each commit their own version 2 at once.
    let started = moved(&first, BatchStatus::InProgress, T0 + 60);
    let cancelled = first.cancel(T0 + 61).unwrap().expect("a change");
    let (a, b) = tokio::join!(
        store.commit_change(&started),
        store.commit_change(&cancelled)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a != b, "exactly one writer wins: {a} {b}");
    let (winner, loser) = if a {
        (started, cancelled)
    } else {
        (cancelled, started)
    };
    assert_eq!(
        store.get_batch(&first.id).await.unwrap(),
        Some(winner.clone())
    );
    let log = events(&*store, &first.id, 0, 10).await;
    let logged: Vec<&Batch> = log.iter().map(|event| &event.batch).collect();
    assert_eq!(logged, vec![&first, &winner], "only the winner is logged");

    // The loser retrying its stale version, or a version that skips one, is refused.
    assert!(!store.commit_change(&loser).await.unwrap());
    let skipping = progressed(&progressed(&winner, 1, T0 + 120), 2, T0 + 180);
    assert!(!store.commit_change(&skipping).await.unwrap());
    assert_eq!(store.get_batch(&first.id).await.unwrap(), Some(winner));
    assert_eq!(logged_versions(&*store, &first.id).await, vec![1, 2]);
    store.close().await;
}

async fn a_round_of_commits_writes_each_change_as_its_own_commit_would(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    let full = created("alice", T0, |input| {
        input.metadata = Some(BTreeMap::from([("team".into(), "search".into())]));
        input.job_id = Some("job-42".into());
        input.remark = Some("nightly eval".into());
        input.output_expires_after = Some(("created_at".into(), 7 * DAY));
    });
    let (raced, plain_one) = (plain("bob", T0 + 1), plain("carol", T0 + 2));
    for batch in [&full, &raced, &plain_one] {
        store.insert_batch(batch, None).await.unwrap();
    }
    // Every column set: status, counts, files, model, usage, errors.
    let running = updated(
        &full,
        BatchUpdateInput {
            status: Some(BatchStatus::InProgress),
            request_counts: Some(RequestCounts {
                total: 10,
                completed: 3,
                failed: 1,
            }),
            output_file_id: Some("file-out".into()),
            error_file_id: Some("file-err".into()),
            errors: vec![BatchErrorEntry {
                code: "invalid_request".into(),
                line: Some(7),
                message: "bad <line>".into(),
                param: Some("body".into()),
            }],
            usage: Some(Usage {
                input_tokens: 100,
                cached_tokens: 10,
                output_tokens: 50,
                reasoning_tokens: 5,
                total_tokens: 150,
            }),
            model: Some("gpt-4o-mini".into()),
            ..Default::default()
        },
        T0 + 60,
    );
    // Another writer moves `raced` first: the round's change from version 1 is stale.
    commit(&*store, &moved(&raced, BatchStatus::InProgress, T0 + 61)).await;
    let stale = raced.cancel(T0 + 62).unwrap().expect("a change");
    let progressed_one = progressed(&plain_one, 1, T0 + 63);

    let written = store
        .commit_changes(&[
            Arc::new(running.clone()),
            Arc::new(stale),
            Arc::new(progressed_one.clone()),
        ])
        .await
        .unwrap();
    assert_eq!(
        written,
        vec![true, false, true],
        "the stale change fails alone"
    );
    assert_eq!(
        store.get_batch(&full.id).await.unwrap(),
        Some(running.clone())
    );
    assert_eq!(
        events(&*store, &full.id, 1, 10).await,
        vec![BatchEvent {
            version: 2,
            batch: running.clone(),
        }]
    );
    assert_eq!(logged_versions(&*store, &raced.id).await, vec![1, 2]);
    assert_eq!(
        store.get_batch(&raced.id).await.unwrap().unwrap().status,
        BatchStatus::InProgress
    );
    assert_eq!(
        store.get_batch(&plain_one.id).await.unwrap(),
        Some(progressed_one.clone())
    );

    // A round's row is the same as one commit's: the next change of each applies on
    // it, and the same change through either path reads back the same.
    let completed = moved(&running, BatchStatus::Finalizing, T0 + 120);
    assert!(store.commit_change(&completed).await.unwrap());
    let finished = moved(&completed, BatchStatus::Completed, T0 + 121);
    let more = progressed(&progressed_one, 2, T0 + 122);
    assert_eq!(
        store
            .commit_changes(&[Arc::new(more.clone()), Arc::new(finished.clone())])
            .await
            .unwrap(),
        vec![true, true]
    );
    assert_eq!(store.get_batch(&full.id).await.unwrap(), Some(finished));
    assert_eq!(store.get_batch(&plain_one.id).await.unwrap(), Some(more));
    assert_eq!(logged_versions(&*store, &full.id).await, vec![1, 2, 3, 4]);
    store.close().await;
}

async fn events_after_a_version_are_the_committed_ones_oldest_first_within_the_limit(
    backend: Backend,
) {
    let (_db, store) = fresh_store(backend).await;
    let batch = with_versions(&*store, "alice", T0, 5).await;
    let neighbour = with_versions(&*store, "alice", T0, 3).await;

    let all = events(&*store, &batch.id, 0, 100).await;
    let versions: Vec<i64> = all.iter().map(|event| event.version).collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5]);
    for event in &all {
        assert_eq!(event.batch.id, batch.id);
        assert_eq!(event.batch.version, event.version);
        let committed_at = event.batch.updated_at.unwrap_or(event.batch.created_at);
        assert_eq!(committed_at, T0 + 60 * (event.version - 1), "committed at");
    }
    assert_eq!(
        all.last().unwrap().batch,
        batch,
        "the last event is the batch"
    );
    let window: Vec<i64> = events(&*store, &batch.id, 2, 2)
        .await
        .iter()
        .map(|event| event.version)
        .collect();
    assert_eq!(window, vec![3, 4]);
    assert!(events(&*store, &batch.id, 5, 100).await.is_empty());
    assert!(
        events(&*store, &BatchId::generate(), 0, 100)
            .await
            .is_empty()
    );
    assert_eq!(logged_versions(&*store, &neighbour.id).await, vec![1, 2, 3]);
    store.close().await;
}

async fn compaction_deletes_old_versions_in_chunks_and_never_a_latest_version(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    // Versions 1 to 5 committed at T0, T0+60, ..., T0+240.
    let busy = with_versions(&*store, "alice", T0, 5).await;
    // One version only, as old as the oldest: the latest, so it stays.
    let quiet = with_versions(&*store, "alice", T0, 1).await;
    readable_changes(&*store, 6).await;

    // Before T0+61: versions 1 and 2 of the busy batch, one per chunk of 1.
    assert_eq!(store.compact_events(T0 + 61, 1).await.unwrap(), 1);
    assert_eq!(store.compact_events(T0 + 61, 1).await.unwrap(), 1);
    assert_eq!(store.compact_events(T0 + 61, 10).await.unwrap(), 0);
    assert_eq!(logged_versions(&*store, &busy.id).await, vec![3, 4, 5]);

    // However late the bound, each batch keeps its latest version.
    assert_eq!(store.compact_events(i64::MAX, 10).await.unwrap(), 2);
    assert_eq!(store.compact_events(i64::MAX, 10).await.unwrap(), 0);
    assert_eq!(logged_versions(&*store, &busy.id).await, vec![5]);
    assert_eq!(logged_versions(&*store, &quiet.id).await, vec![1]);
    assert_eq!(store.get_batch(&busy.id).await.unwrap(), Some(busy));
    store.close().await;
}

async fn latest_versions_are_the_stored_ones_leaving_out_unknown_ids(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    let new = with_versions(&*store, "alice", T0, 1).await;
    let changed = with_versions(&*store, "bob", T0, 3).await;
    let asked = [new.id.clone(), BatchId::generate(), changed.id.clone()];

    let mut expected = vec![(new.id.clone(), 1), (changed.id.clone(), 3)];
    expected.sort();
    assert_eq!(latest(&*store, &asked).await, expected);
    assert!(latest(&*store, &[]).await.is_empty());
    store.close().await;
}

async fn pages_neither_repeat_nor_skip_a_batch_in_either_order_even_when_created_at_ties(
    backend: Backend,
) {
    let (_db, store) = fresh_store(backend).await;
    let mut alices = Vec::new();
    // Three batches share a second, then two pairs more: ties a cursor must order.
    for created_at in [T0, T0, T0, T0 + 1, T0 + 1, T0 + 2, T0 + 2] {
        let batch = plain("alice", created_at);
        store.insert_batch(&batch, None).await.unwrap();
        alices.push(batch.id);
    }
    let bobs = plain("bob", T0 + 1);
    store.insert_batch(&bobs, None).await.unwrap();

    for oldest_first in [true, false] {
        let whole = BatchPageQuery {
            owner: Some("alice"),
            oldest_first,
            ..everything()
        };
        let all = listed(&*store, whole).await;
        assert_eq!(all, listed(&*store, whole).await, "the order is stable");
        let expected: HashSet<&BatchId> = alices.iter().collect();
        assert_eq!(all.iter().collect::<HashSet<_>>(), expected, "alice's only");
        assert_eq!(all.len(), alices.len(), "each once");
        let created: Vec<i64> = store
            .list_batches(whole)
            .await
            .unwrap()
            .iter()
            .map(|batch| batch.created_at)
            .collect();
        let mut sorted = created.clone();
        sorted.sort();
        if !oldest_first {
            sorted.reverse();
        }
        assert_eq!(
            created, sorted,
            "ordered by creation (oldest_first: {oldest_first})"
        );
        for limit in 1..=3 {
            assert_eq!(
                listed_in_pages(&*store, BatchPageQuery { limit, ..whole }).await,
                all,
                "pages of {limit} (oldest_first: {oldest_first})"
            );
        }
    }
    let mut newest_first = listed(
        &*store,
        BatchPageQuery {
            owner: Some("alice"),
            oldest_first: false,
            ..everything()
        },
    )
    .await;
    newest_first.reverse();
    let oldest_first = BatchPageQuery {
        owner: Some("alice"),
        ..everything()
    };
    assert_eq!(newest_first, listed(&*store, oldest_first).await);
    assert_eq!(listed(&*store, everything()).await.len(), 8, "every owner");
    store.close().await;
}

async fn each_list_filter_keeps_exactly_the_batches_that_match(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    let pairs = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let validating = created("alice", T0, |input| {
        input.job_id = Some("j1".into());
        input.metadata = Some(pairs(&[("team", "search"), ("tier", "gold")]));
    });
    let running = created("alice", T0 + 10, |input| {
        input.job_id = Some("j1".into());
        input.metadata = Some(pairs(&[("team", "search")]));
    });
    let finalizing = created("alice", T0 + 20, |input| {
        input.job_id = Some("j2".into());
        input.metadata = Some(pairs(&[("team", "ads")]));
    });
    let cancelling = plain("alice", T0 + 30);
    for batch in [&validating, &running, &finalizing, &cancelling] {
        store.insert_batch(batch, None).await.unwrap();
    }
    let running = commit_moves(&*store, &running, &[BatchStatus::InProgress], T0 + 40).await;
    let finalizing = commit_moves(
        &*store,
        &finalizing,
        &[BatchStatus::InProgress, BatchStatus::Finalizing],
        T0 + 50,
    )
    .await;
    let cancelling = cancelling.cancel(T0 + 40).unwrap().expect("a change");
    commit(&*store, &cancelling).await;
    let team_search = [("team".to_owned(), "search".to_owned())];
    let search_gold = [
        ("team".to_owned(), "search".to_owned()),
        ("tier".to_owned(), "gold".to_owned()),
    ];
    let team_nobody = [("team".to_owned(), "nobody".to_owned())];
    let busy = [
        BatchStatus::InProgress,
        BatchStatus::Finalizing,
        BatchStatus::Cancelling,
    ];

    let cases: Vec<(&str, BatchPageQuery<'_>, Vec<BatchId>)> = vec![
        (
            "one status",
            BatchPageQuery {
                statuses: &[BatchStatus::Validating],
                ..everything()
            },
            ids(&[&validating]),
        ),
        (
            "several statuses",
            BatchPageQuery {
                statuses: &[BatchStatus::InProgress, BatchStatus::Finalizing],
                ..everything()
            },
            ids(&[&running, &finalizing]),
        ),
        (
            "a status nobody is in",
            BatchPageQuery {
                statuses: &[BatchStatus::Completed],
                ..everything()
            },
            vec![],
        ),
        (
            "job",
            BatchPageQuery {
                job_id: Some("j1"),
                ..everything()
            },
            ids(&[&validating, &running]),
        ),
        (
            "created at or after",
            BatchPageQuery {
                created_after: Some(T0 + 10),
                ..everything()
            },
            ids(&[&running, &finalizing, &cancelling]),
        ),
        (
            "created before",
            BatchPageQuery {
                created_before: Some(T0 + 20),
                ..everything()
            },
            ids(&[&validating, &running]),
        ),
        (
            "one metadata pair",
            BatchPageQuery {
                metadata: &team_search,
                ..everything()
            },
            ids(&[&validating, &running]),
        ),
        (
            "every metadata pair",
            BatchPageQuery {
                metadata: &search_gold,
                ..everything()
            },
            ids(&[&validating]),
        ),
        (
            "a metadata value nobody has",
            BatchPageQuery {
                metadata: &team_nobody,
                ..everything()
            },
            vec![],
        ),
        (
            "job and status together",
            BatchPageQuery {
                job_id: Some("j1"),
                statuses: &[BatchStatus::InProgress],
                ..everything()
            },
            ids(&[&running]),
        ),
        (
            "another owner",
            BatchPageQuery {
                owner: Some("bob"),
                ..everything()
            },
            vec![],
        ),
        (
            "several statuses, first page oldest first",
            BatchPageQuery {
                statuses: &busy,
                limit: 2,
                ..everything()
            },
            ids(&[&running, &finalizing]),
        ),
        (
            "several statuses, after a cursor oldest first",
            BatchPageQuery {
                statuses: &busy,
                after: Some(&finalizing.id),
                ..everything()
            },
            ids(&[&cancelling]),
        ),
        (
            "several statuses, first page newest first",
            BatchPageQuery {
                statuses: &busy,
                limit: 2,
                oldest_first: false,
                ..everything()
            },
            ids(&[&cancelling, &finalizing]),
        ),
        (
            "several statuses, after a cursor newest first",
            BatchPageQuery {
                statuses: &busy,
                after: Some(&finalizing.id),
                oldest_first: false,
                ..everything()
            },
            ids(&[&running]),
        ),
    ];
    for (name, query, expected) in cases {
        assert_eq!(listed(&*store, query).await, expected, "{name}");
    }
    store.close().await;
}

async fn due_batches_are_running_past_their_window_or_cancelling_past_the_grace(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    // Created at T0 with a 24h window: due at T0 + DAY.
    let validating = plain("alice", T0);
    let running = plain("alice", T0);
    // Created a second later: due a second later.
    let finalizing = plain("alice", T0 + 1);
    let cancelling = plain("alice", T0);
    let completed = plain("alice", T0);
    for batch in [&validating, &running, &finalizing, &cancelling, &completed] {
        store.insert_batch(batch, None).await.unwrap();
    }
    let running = commit_moves(&*store, &running, &[BatchStatus::InProgress], T0 + 10).await;
    commit_moves(
        &*store,
        &finalizing,
        &[BatchStatus::InProgress, BatchStatus::Finalizing],
        T0 + 20,
    )
    .await;
    // Cancelling since T0 + 100.
    let cancelling = cancelling.cancel(T0 + 100).unwrap().expect("a change");
    commit(&*store, &cancelling).await;
    let finished = [
        BatchStatus::InProgress,
        BatchStatus::Finalizing,
        BatchStatus::Completed,
    ];
    commit_moves(&*store, &completed, &finished, T0 + 30).await;
    let due = async |now: i64, cancelling_before: i64, limit: i64| -> Vec<BatchId> {
        let due = store.due_batches(now, cancelling_before, limit).await;
        due.unwrap().into_iter().map(|batch| batch.id).collect()
    };

    assert_eq!(due(T0 + DAY - 1, T0 + 99, 10).await, vec![]);
    assert_eq!(due(T0 + DAY - 1, T0 + 100, 10).await, ids(&[&cancelling]));
    assert_eq!(
        due(T0 + DAY, T0 + 99, 10).await,
        ids(&[&validating, &running])
    );
    assert_eq!(
        due(T0 + DAY + 1, T0 + 100, 10).await,
        ids(&[&validating, &running, &finalizing, &cancelling]),
        "oldest first, a terminal batch never"
    );
    assert_eq!(
        due(T0 + DAY + 1, T0 + 100, 2).await,
        ids(&[&validating, &running])
    );
    store.close().await;
}

/// A claim of `key` for `user_id` at `at`, for request `request`; claims made more
/// than a day before `at` have expired.
fn claim<'a>(
    user_id: &'a str,
    key: &'a str,
    request: &'a [u8; 32],
    at: i64,
) -> IdempotencyClaim<'a> {
    IdempotencyClaim {
        user_id,
        key,
        request_sha256: request,
        at,
        expired_before: at - DAY,
    }
}

async fn an_idempotency_key_is_claimed_once_while_live_and_again_once_expired(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    let (first_request, second_request) = ([1u8; 32], [2u8; 32]);

    let first = plain("alice", T0);
    let fresh = claim("alice", "retry-1", &first_request, T0);
    assert_eq!(
        store.insert_batch_once(&first, fresh, None).await.unwrap(),
        None
    );
    assert_eq!(
        store.get_batch(&first.id).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(logged_versions(&*store, &first.id).await, vec![1]);

    // A live claim is answered with the earlier batch, and nothing is written.
    let retry = plain("alice", T0 + DAY - 1);
    let live = claim("alice", "retry-1", &second_request, T0 + DAY - 1);
    assert_eq!(
        store.insert_batch_once(&retry, live, None).await.unwrap(),
        Some(EarlierClaim {
            batch_id: first.id.to_string(),
            request_sha256: first_request.to_vec(),
        })
    );
    assert_eq!(store.get_batch(&retry.id).await.unwrap(), None);
    assert!(logged_versions(&*store, &retry.id).await.is_empty());

    // Keys are scoped to their owner.
    let bobs = plain("bob", T0 + 1);
    let other_owner = claim("bob", "retry-1", &second_request, T0 + 1);
    assert_eq!(
        store
            .insert_batch_once(&bobs, other_owner, None)
            .await
            .unwrap(),
        None
    );

    // An expired claim is replaced by the new one.
    let later = plain("alice", T0 + DAY + 1);
    let expired = claim("alice", "retry-1", &second_request, T0 + DAY + 1);
    assert_eq!(
        store
            .insert_batch_once(&later, expired, None)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.get_batch(&later.id).await.unwrap(),
        Some(later.clone())
    );
    let again = plain("alice", T0 + DAY + 2);
    assert_eq!(
        store
            .insert_batch_once(
                &again,
                claim("alice", "retry-1", &first_request, T0 + DAY + 2),
                None,
            )
            .await
            .unwrap(),
        Some(EarlierClaim {
            batch_id: later.id.to_string(),
            request_sha256: second_request.to_vec(),
        })
    );
    store.close().await;
}

async fn forgetting_idempotency_keys_deletes_at_most_the_limit_of_the_old_ones(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    let request = [7u8; 32];
    for (key, at) in [
        ("a", T0),
        ("b", T0 + 1),
        ("c", T0 + 2),
        ("recent", T0 + 100),
    ] {
        let batch = plain("alice", at);
        let fresh = claim("alice", key, &request, at);
        assert_eq!(
            store.insert_batch_once(&batch, fresh, None).await.unwrap(),
            None
        );
    }

    assert_eq!(store.forget_idempotency_keys(T0 + 100, 2).await.unwrap(), 2);
    assert_eq!(store.forget_idempotency_keys(T0 + 100, 2).await.unwrap(), 1);
    assert_eq!(store.forget_idempotency_keys(T0 + 100, 2).await.unwrap(), 0);
    // A forgotten key is free again, though its claim had not expired; a recent one is
    // still held.
    for (key, free) in [("a", true), ("b", true), ("c", true), ("recent", false)] {
        let batch = plain("alice", T0 + 200);
        let outcome = store
            .insert_batch_once(&batch, claim("alice", key, &request, T0 + 200), None)
            .await
            .unwrap();
        assert_eq!(outcome.is_none(), free, "key {key}: {outcome:?}");
    }
    store.close().await;
}

/// A new key of `user` and the digest of a fresh secret.
fn new_key(user: &str, now: i64) -> (ApiKey, [u8; 32]) {
    let key = ApiKey::new(user, Scope::Admin, now).expect("a valid user");
    (key, ApiKeySecret::generate().digest())
}

async fn only_the_first_api_key_of_an_empty_store_is_stored_as_first(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    // Two replicas starting together on an empty database.
    let (a, a_digest) = new_key("admin", T0);
    let (b, b_digest) = new_key("admin", T0);
    let (a_stored, b_stored) = tokio::join!(
        store.insert_first_api_key(&a, &a_digest),
        store.insert_first_api_key(&b, &b_digest)
    );
    let (a_stored, b_stored) = (a_stored.unwrap(), b_stored.unwrap());
    assert!(
        a_stored != b_stored,
        "exactly one first key: {a_stored} {b_stored}"
    );
    let first = if a_stored { a } else { b };
    assert_eq!(store.list_api_keys().await.unwrap(), vec![first.clone()]);

    let (late, late_digest) = new_key("admin", T0 + 1);
    assert!(
        !store
            .insert_first_api_key(&late, &late_digest)
            .await
            .unwrap()
    );
    assert_eq!(store.api_key_by_digest(&late_digest).await.unwrap(), None);
    assert_eq!(store.list_api_keys().await.unwrap(), vec![first]);
    store.close().await;
}

async fn api_keys_are_found_by_digest_listed_oldest_first_and_revoked_once(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    let (older, older_digest) = new_key("alice", T0);
    let (newer, newer_digest) = new_key("bob", T0 + 1);
    store.insert_api_key(&newer, &newer_digest).await.unwrap();
    store.insert_api_key(&older, &older_digest).await.unwrap();

    assert_eq!(
        store.api_key_by_digest(&older_digest).await.unwrap(),
        Some(older.clone())
    );
    assert_eq!(
        store
            .api_key_by_digest(&ApiKeySecret::generate().digest())
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.list_api_keys().await.unwrap(),
        vec![older.clone(), newer.clone()]
    );

    assert!(store.revoke_api_key(&older.id, T0 + 5).await.unwrap());
    assert!(store.revoke_api_key(&older.id, T0 + 9).await.unwrap());
    assert!(!store.revoke_api_key("key_unknown", T0 + 9).await.unwrap());
    let revoked = store.api_key_by_digest(&older_digest).await.unwrap();
    assert_eq!(
        revoked.and_then(|key| key.revoked_at),
        Some(T0 + 5),
        "the first revocation time is kept"
    );
    let asked = [older.id.clone(), newer.id.clone(), "key_unknown".to_owned()];
    assert_eq!(
        store.revoked_api_keys(&asked).await.unwrap(),
        vec![older.id.clone()]
    );
    assert!(store.revoked_api_keys(&[]).await.unwrap().is_empty());
    store.close().await;
}

/// Reads the change feed after `after`, `page` changes per read, until it has `count`
/// changes; returns `(batch id, version)` of each and where to resume. On PostgreSQL a
/// transaction still running anywhere on the server (other tests' databases included)
/// holds the feed back for a moment, so an empty read is retried, for a while.
async fn read_feed(
    store: &dyn Store,
    mut after: FeedCursor,
    page: i64,
    count: usize,
) -> (Vec<(BatchId, i64)>, FeedCursor) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut seen = Vec::new();
    while seen.len() < count {
        let read = store.changes_after(after, None, page).await.unwrap();
        assert!(read.changes.len() as i64 <= page, "the limit is kept");
        let mut previous = after;
        for change in &read.changes {
            assert!(change.cursor > previous, "positions only go forward");
            previous = change.cursor;
            seen.push((change.batch.id.clone(), change.batch.version));
        }
        assert!(
            read.next >= previous,
            "the next read starts after this page"
        );
        after = read.next;
        if read.changes.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the feed gave {} of {count} changes",
                seen.len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    // Whatever is visible after them is read too, so that a surplus shows.
    let rest = store.changes_after(after, None, page).await.unwrap();
    for change in &rest.changes {
        seen.push((change.batch.id.clone(), change.batch.version));
    }
    (
        seen,
        rest.changes
            .last()
            .map_or(rest.next.max(after), |change| change.cursor),
    )
}

async fn the_change_feed_has_every_commit_once_in_commit_order_and_resumes_anywhere(
    backend: Backend,
) {
    let (_db, store) = fresh_store(backend).await;
    let (start, nothing) = read_feed(&*store, FeedCursor::default(), 10, 0).await;
    assert!(start.is_empty(), "an empty store has no changes");
    // Commits interleaved over three batches, in this order.
    let mut committed = Vec::new();
    let mut batches = Vec::new();
    for owner in ["alice", "bob", "carol"] {
        let batch = plain(owner, T0);
        store.insert_batch(&batch, None).await.unwrap();
        committed.push((batch.id.clone(), 1));
        batches.push(batch);
    }
    for step in 0..12 {
        let i = step % 3;
        let next = if batches[i].version == 1 {
            moved(&batches[i], BatchStatus::InProgress, T0 + step as i64)
        } else {
            progressed(&batches[i], step as i64, T0 + step as i64)
        };
        commit(&*store, &next).await;
        committed.push((next.id.clone(), next.version));
        batches[i] = next;
    }
    // A read of no changes is refused: an empty "full" page would skip to the end.
    for limit in [0, -1] {
        let refused = store
            .changes_after(FeedCursor::default(), None, limit)
            .await;
        assert!(refused.is_err(), "limit {limit} was accepted");
    }
    // A refused commit (a stale version) adds nothing to the feed.
    assert!(!store.commit_change(&batches[0]).await.unwrap());

    // Read in pages of every size: always the same changes, in commit order.
    for page in [1, 2, 5, 100] {
        let (seen, _) = read_feed(&*store, FeedCursor::default(), page, committed.len()).await;
        assert_eq!(seen, committed, "pages of {page}");
    }
    // Resuming from where an empty store left off, or from any change's position,
    // gives exactly the changes after it.
    let (seen, end) = read_feed(&*store, nothing, 4, committed.len()).await;
    assert_eq!(seen, committed);
    let all = store
        .changes_after(FeedCursor::default(), None, 100)
        .await
        .unwrap();
    assert_eq!(all.changes.len(), committed.len());
    for (i, change) in all.changes.iter().enumerate() {
        let expected = &committed[i + 1..];
        let (rest, _) = read_feed(&*store, change.cursor, 3, expected.len()).await;
        assert_eq!(rest, expected, "after change {i}");
    }
    // A later commit comes after the end, alone.
    let next = progressed(&batches[1], 99, T0 + 99);
    commit(&*store, &next).await;
    let (latest, _) = read_feed(&*store, end, 10, 1).await;
    assert_eq!(latest, vec![(next.id.clone(), next.version)]);
    store.close().await;
}

/// Each change of the feed carries the status of the version before it, while that
/// version is in the log: what tells a filtered watcher that a batch left its filter.
async fn each_feed_change_carries_the_status_before_it(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    with_versions(&*store, "alice", T0, 3).await;
    let changes = readable_changes(&*store, 3).await;
    let before: Vec<Option<BatchStatus>> = changes.iter().map(|c| c.previous_status).collect();
    assert_eq!(
        before,
        vec![
            None,
            Some(BatchStatus::Validating),
            Some(BatchStatus::InProgress)
        ]
    );
    store.close().await;
}

/// A read of status moves passes over progress reports without their batches, yet
/// pages through them exactly as the full read does: the same `next` and the same
/// fullness page after page, and exactly the creations and status moves of the full
/// read, each whole. A change whose version before was compacted away moves nothing
/// that can be known, and is left out.
async fn a_read_of_status_moves_pages_like_the_full_read_and_keeps_only_the_moves(
    backend: Backend,
) {
    let (_db, store) = fresh_store(backend).await;
    let mut batch = with_versions(&*store, "alice", T0, 5).await; // v1 created, v2 moved, v3-5 progress
    batch = commit_moves(&*store, &batch, &[BatchStatus::Finalizing], T0 + 600).await; // v6
    for completed in 7..=9 {
        batch = progressed(&batch, completed, T0 + 600 + completed);
        commit(&*store, &batch).await; // v7-9
    }
    batch = commit_moves(&*store, &batch, &[BatchStatus::Completed], T0 + 700).await; // v10
    let other = with_versions(&*store, "bob", T0, 3).await; // v1, v2 moved, v3 progress
    let all = readable_changes(&*store, 13).await;
    let expected: Vec<FeedChange> = all
        .iter()
        // The domain's notion, which wakes the webhook dispatcher, and the store's read
        // must agree: the versions below say which changes that is.
        .filter(|change| change.batch.is_status_move(change.previous_status))
        .cloned()
        .collect();
    let versions: Vec<(BatchId, i64)> = expected
        .iter()
        .map(|c| (c.batch.id.clone(), c.batch.version))
        .collect();
    assert_eq!(
        versions,
        vec![
            (batch.id.clone(), 1),
            (batch.id.clone(), 2),
            (batch.id.clone(), 6),
            (batch.id.clone(), 10),
            (other.id.clone(), 1),
            (other.id.clone(), 2),
        ]
    );
    for page in [1, 2, 3, 100] {
        let (mut full_at, mut moves_at) = (FeedCursor::default(), FeedCursor::default());
        let mut moves = Vec::new();
        loop {
            let full = store.changes_after(full_at, None, page).await.unwrap();
            let read = store.status_moves_after(moves_at, page).await.unwrap();
            // A page that is not full ends at the server's horizon, which other
            // databases' transactions move: only a full page's end is fixed.
            if (full.read as i64) >= page {
                assert_eq!(read.next, full.next, "pages of {page}: the same next");
            }
            assert_eq!(
                read.read, full.read,
                "pages of {page}: as many changes read"
            );
            assert_eq!(
                full.read,
                full.changes.len(),
                "the full read keeps every change"
            );
            assert!(read.changes.len() <= full.changes.len());
            moves.extend(read.changes);
            (full_at, moves_at) = (full.next, read.next);
            if (full.read as i64) < page {
                break;
            }
        }
        assert_eq!(moves, expected, "pages of {page}");
    }
    // Bob's batch moves once more; then compaction takes every version before the
    // latest ones, and the read resumes after the last change it deleted: bob's move
    // is left, but its version before is gone, so nothing says it moved.
    commit_moves(&*store, &other, &[BatchStatus::Finalizing], T0 + 800).await;
    readable_changes(&*store, 14).await;
    assert!(store.compact_events(i64::MAX, 100).await.unwrap() > 0);
    let oldest = store.feed_bounds().await.unwrap().oldest;
    let left = store.status_moves_after(oldest, 100).await.unwrap();
    let everything = store.changes_after(oldest, None, 100).await.unwrap();
    let kept: Vec<i64> = everything.changes.iter().map(|c| c.batch.version).collect();
    assert_eq!(kept, vec![4], "bob's move is after the compacted changes");
    assert!(
        left.changes.is_empty(),
        "a change whose version before is gone counts as no move: {:?}",
        left.changes
    );
    store.close().await;
}

/// Compaction raises the feed's oldest resumable cursor past every change it deleted,
/// in the same transaction: a read from before it is refused, naming it; a read from
/// it gets exactly what is left after it. The head never goes below it.
async fn compaction_raises_the_oldest_cursor_and_an_older_read_is_refused(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    let start = store.feed_bounds().await.unwrap();
    assert_eq!(
        start.oldest,
        FeedCursor::default(),
        "a new store keeps everything"
    );
    let batch = with_versions(&*store, "alice", T0, 4).await;
    let all = readable_changes(&*store, 4).await;
    assert_eq!(store.compact_events(i64::MAX, 10).await.unwrap(), 3);
    let bounds = store.feed_bounds().await.unwrap();
    assert_eq!(bounds.oldest, all[2].cursor, "the last change deleted");
    assert!(bounds.head >= bounds.oldest);
    for old in [FeedCursor::default(), all[1].cursor] {
        match store.changes_after(old, None, 10).await {
            Err(batchd::error::Error::FeedCompacted { oldest, .. }) => {
                assert_eq!(oldest, bounds.oldest.to_string());
            }
            other => panic!("a read from {old} must be refused, got {other:?}"),
        }
    }
    let rest = store.changes_after(bounds.oldest, None, 10).await.unwrap();
    let versions: Vec<i64> = rest.changes.iter().map(|c| c.batch.version).collect();
    assert_eq!(versions, vec![4]);
    assert_eq!(rest.changes[0].batch, batch);
    assert_eq!(
        rest.changes[0].previous_status, None,
        "the version before is gone"
    );
    store.close().await;
}

/// A listing for the feed gives each batch with the position of the version listed:
/// the position of its latest change in the feed.
async fn listed_batches_come_with_the_position_of_their_version(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    let a = with_versions(&*store, "alice", T0, 3).await;
    let b = with_versions(&*store, "alice", T0, 1).await;
    let c = with_versions(&*store, "bob", T0, 2).await;
    let feed = readable_changes(&*store, 6).await;
    let latest_position = |batch: &Batch| {
        feed.iter()
            .filter(|change| change.batch.id == batch.id)
            .map(|change| change.cursor)
            .max()
            .unwrap()
    };
    let mut query = everything();
    query.oldest_first = true;
    let listed = store.batches_with_positions(query).await.unwrap();
    let expected: Vec<(FeedCursor, Batch)> = [&a, &b, &c]
        .into_iter()
        .map(|batch| (latest_position(batch), batch.clone()))
        .collect();
    assert_eq!(listed, expected);
    query.owner = Some("alice");
    query.statuses = &[BatchStatus::InProgress];
    let listed = store.batches_with_positions(query).await.unwrap();
    assert_eq!(listed, vec![(latest_position(&a), a.clone())]);
    store.close().await;
}

on_both_stores!(
    each_feed_change_carries_the_status_before_it,
    a_read_of_status_moves_pages_like_the_full_read_and_keeps_only_the_moves,
    compaction_raises_the_oldest_cursor_and_an_older_read_is_refused,
    listed_batches_come_with_the_position_of_their_version,
    the_change_feed_has_every_commit_once_in_commit_order_and_resumes_anywhere,
    an_inserted_batch_is_read_back_whole_alone_and_among_others,
    a_commit_from_the_stored_version_replaces_the_batch_and_logs_it,
    a_commit_from_a_stale_version_writes_nothing,
    a_round_of_commits_writes_each_change_as_its_own_commit_would,
    events_after_a_version_are_the_committed_ones_oldest_first_within_the_limit,
    compaction_deletes_old_versions_in_chunks_and_never_a_latest_version,
    latest_versions_are_the_stored_ones_leaving_out_unknown_ids,
    pages_neither_repeat_nor_skip_a_batch_in_either_order_even_when_created_at_ties,
    each_list_filter_keeps_exactly_the_batches_that_match,
    due_batches_are_running_past_their_window_or_cancelling_past_the_grace,
    an_idempotency_key_is_claimed_once_while_live_and_again_once_expired,
    forgetting_idempotency_keys_deletes_at_most_the_limit_of_the_old_ones,
    only_the_first_api_key_of_an_empty_store_is_stored_as_first,
    api_keys_are_found_by_digest_listed_oldest_first_and_revoked_once,
    webhook_deliveries_are_queued_once_and_leased_to_one_replica_at_a_time,
    compaction_keeps_what_the_webhook_dispatcher_has_not_read,
    claims_take_owners_in_turn_and_leave_full_owners_out,
    revoking_a_key_stops_the_all_owners_endpoints_it_configured,
    deleting_a_terminal_batch_takes_what_belongs_to_it_and_logs_the_deletion,
    a_batch_still_running_is_not_deleted,
    the_retention_sweep_deletes_batches_terminal_before_its_time_in_chunks,
    compaction_removes_every_event_of_a_deleted_batch_once_old,
    an_owner_at_its_active_limit_inserts_nothing_until_a_batch_ends,
);

/// A webhook endpoint of `owner` that follows completions, and the dispatcher's
/// position, so that deliveries can be queued.
async fn completions_endpoint(store: &dyn Store, owner: &str) -> FeedCursor {
    use batchd::domain::webhooks::WebhookEventType as E;
    let id = format!("we_{owner}");
    assert!(
        store
            .insert_endpoint(&endpoint(&id, owner, false, &[E::BatchCompleted]), 10)
            .await
            .unwrap()
    );
    store.dispatch_position(cursor(0)).await.unwrap()
}

async fn deleting_a_terminal_batch_takes_what_belongs_to_it_and_logs_the_deletion(
    backend: Backend,
) {
    let (_db, store) = fresh_store(backend).await;
    let request = [7u8; 32];
    let batch = created("alice", T0, |input| {
        input.metadata = Some([("team".to_owned(), "ml".to_owned())].into());
    });
    assert_eq!(
        store
            .insert_batch_once(&batch, claim("alice", "key-1", &request, T0), None)
            .await
            .unwrap(),
        None
    );
    let kept = created("alice", T0, |input| {
        input.metadata = Some([("team".to_owned(), "ml".to_owned())].into());
    });
    store.insert_batch(&kept, None).await.unwrap();
    let done = commit_moves(
        &*store,
        &batch,
        &[
            BatchStatus::InProgress,
            BatchStatus::Finalizing,
            BatchStatus::Completed,
        ],
        T0 + 60,
    )
    .await;
    let start = completions_endpoint(&*store, "alice").await;
    assert!(
        store
            .queue_deliveries(start, cursor(1), &[delivery(&done, "we_alice", "evt_1")])
            .await
            .unwrap()
    );
    assert_eq!(store.delivery_queue().await.unwrap().pending, 1);

    assert!(store.delete_batch(&done.id, T0 + 120).await.unwrap());

    assert_eq!(store.get_batch(&done.id).await.unwrap(), None);
    assert_eq!(
        store
            .get_batches(&[done.id.clone(), kept.id.clone()])
            .await
            .unwrap(),
        std::slice::from_ref(&kept)
    );
    let team = [("team".to_owned(), "ml".to_owned())];
    let by_metadata = BatchPageQuery {
        metadata: &team,
        ..everything()
    };
    assert_eq!(
        listed(&*store, by_metadata).await,
        std::slice::from_ref(&kept.id)
    );
    assert_eq!(
        store.count_batches(&Default::default()).await.unwrap(),
        [(BatchStatus::Validating, 1)]
    );
    assert_eq!(latest(&*store, std::slice::from_ref(&done.id)).await, []);
    assert_eq!(
        store.delivery_queue().await.unwrap().pending,
        0,
        "its pending delivery is dropped"
    );
    // A dispatcher that read the batch's completion before the deletion committed
    // queues nothing for it afterwards: its position moves on, its deliveries do not
    // reach the queue, and a batch that still exists gets its own.
    let kept_done = commit_moves(&*store, &kept, &[BatchStatus::Failed], T0 + 125).await;
    assert!(
        store
            .queue_deliveries(
                cursor(1),
                cursor(2),
                &[
                    delivery(&done, "we_alice", "evt_late"),
                    delivery(&kept_done, "we_alice", "evt_kept"),
                ],
            )
            .await
            .unwrap()
    );
    assert_eq!(
        store.delivery_queue().await.unwrap().pending,
        1,
        "only the batch that still exists gets a delivery"
    );
    assert_eq!(store.dispatch_position(cursor(0)).await.unwrap(), cursor(2));
    // The idempotency key went with the batch: the same request makes a new one.
    let again = plain("alice", T0 + 130);
    assert_eq!(
        store
            .insert_batch_once(&again, claim("alice", "key-1", &request, T0 + 130), None)
            .await
            .unwrap(),
        None
    );
    // Per-batch reads of the log never return the deletion; the feed ends the batch's
    // history with it, carrying its last version.
    assert_eq!(logged_versions(&*store, &done.id).await, [1, 2, 3, 4]);
    let changes = readable_changes(&*store, 8).await;
    let of_done: Vec<&FeedChange> = changes.iter().filter(|c| c.batch.id == done.id).collect();
    assert_eq!(of_done.len(), 5);
    assert!(of_done[..4].iter().all(|c| !c.deleted));
    let deletion = of_done[4];
    assert!(deletion.deleted);
    assert_eq!(
        deletion.batch, done,
        "the deletion carries the last version"
    );
    assert_eq!(deletion.previous_status, Some(BatchStatus::Completed));
    assert!(
        !store
            .status_moves_after(FeedCursor::default(), 100)
            .await
            .unwrap()
            .changes
            .iter()
            .any(|c| c.deleted),
        "a deletion is no status move (no webhook)"
    );
    assert!(
        !store.delete_batch(&done.id, T0 + 200).await.unwrap(),
        "deleted once"
    );
}

async fn a_batch_still_running_is_not_deleted(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    let batch = plain("alice", T0);
    store.insert_batch(&batch, None).await.unwrap();
    let cancelling = commit_moves(&*store, &batch, &[BatchStatus::Cancelling], T0 + 1).await;
    assert!(!store.delete_batch(&batch.id, T0 + 2).await.unwrap());
    assert_eq!(store.get_batch(&batch.id).await.unwrap(), Some(cancelling));
    let unknown = BatchId::parse("id", "batch_0123456789abcdef0123456789abcdef").unwrap();
    assert!(!store.delete_batch(&unknown, T0 + 2).await.unwrap());
    assert_eq!(logged_versions(&*store, &batch.id).await, [1, 2]);
}

async fn the_retention_sweep_deletes_batches_terminal_before_its_time_in_chunks(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    let mut old = Vec::new();
    for i in 0..5 {
        let batch = plain("alice", T0);
        store.insert_batch(&batch, None).await.unwrap();
        let status = [BatchStatus::Failed, BatchStatus::Cancelling][i % 2];
        let mut ended = commit_moves(&*store, &batch, &[status], T0 + 10 + i as i64).await;
        if status == BatchStatus::Cancelling {
            ended = commit_moves(
                &*store,
                &ended,
                &[BatchStatus::Cancelled],
                T0 + 10 + i as i64,
            )
            .await;
        }
        old.push(ended.id);
    }
    // Ended at the cut-off: kept. Running for long: kept.
    let recent = plain("alice", T0);
    store.insert_batch(&recent, None).await.unwrap();
    commit_moves(&*store, &recent, &[BatchStatus::Failed], T0 + 100).await;
    let running = plain("alice", T0 - DAY);
    store.insert_batch(&running, None).await.unwrap();
    commit_moves(&*store, &running, &[BatchStatus::InProgress], T0 - DAY).await;

    let first = store
        .delete_terminal_batches(T0 + 100, T0 + 200, 2)
        .await
        .unwrap();
    let second = store
        .delete_terminal_batches(T0 + 100, T0 + 200, 2)
        .await
        .unwrap();
    let third = store
        .delete_terminal_batches(T0 + 100, T0 + 200, 2)
        .await
        .unwrap();
    let last = store
        .delete_terminal_batches(T0 + 100, T0 + 200, 2)
        .await
        .unwrap();
    assert_eq!(
        [first.len(), second.len(), third.len(), last.len()],
        [2, 2, 1, 0]
    );
    let mut deleted: Vec<BatchId> = [first, second, third].concat();
    deleted.sort();
    old.sort();
    assert_eq!(
        deleted, old,
        "every batch ended before the cut-off, each once"
    );
    let mut left = listed(&*store, everything()).await;
    left.sort();
    let mut expected = vec![recent.id.clone(), running.id.clone()];
    expected.sort();
    assert_eq!(left, expected);
    // Failed ones: created, failed; cancelled ones: created, cancelling, cancelled.
    let deletions = readable_changes(&*store, 3 * 2 + 2 * 3 + 2 + 2 + 5)
        .await
        .into_iter()
        .filter(|c| c.deleted)
        .count();
    assert_eq!(deletions, 5, "one feed event per deleted batch");
}

/// Compacts events older than `before_at` until at least `expected` are deleted (on
/// PostgreSQL, another test's transaction may hold the feed's horizon a moment), or
/// gives up after 5 s; returns how many were deleted.
async fn compact_at_least(store: &dyn Store, before_at: i64, expected: u64) -> u64 {
    let mut deleted = 0;
    for _ in 0..100 {
        deleted += store.compact_events(before_at, 100).await.unwrap();
        if deleted >= expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    deleted
}

async fn compaction_removes_every_event_of_a_deleted_batch_once_old(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    let batch = plain("alice", T0);
    store.insert_batch(&batch, None).await.unwrap();
    let ended = commit_moves(&*store, &batch, &[BatchStatus::Failed], T0 + 1).await;
    let kept = plain("bob", T0);
    store.insert_batch(&kept, None).await.unwrap();
    assert!(store.delete_batch(&ended.id, T0 + 2).await.unwrap());
    // The deletion is the newest change: its position is the feed's highest so far.
    let deletion = readable_changes(&*store, 4).await[3].clone();
    assert!(deletion.deleted);
    // Older than the deletion's time: its two versions go, the deletion stays.
    assert_eq!(compact_at_least(&*store, T0 + 2, 2).await, 2);
    let left = store.changes_after(FeedCursor::default(), None, 100).await;
    assert!(
        matches!(left, Err(batchd::error::Error::FeedCompacted { .. })),
        "a cursor before the compacted versions is refused: {left:?}"
    );
    // Once the deletion is old too, it goes; bob's only version stays.
    assert_eq!(compact_at_least(&*store, T0 + 3, 1).await, 1);
    assert_eq!(store.compact_events(T0 + 1_000, 100).await.unwrap(), 0);
    assert_eq!(logged_versions(&*store, &kept.id).await, [1]);
    // With the newest events gone, the next change still comes after every position
    // the feed gave out: a reader at the deletion's cursor reads it.
    let later = plain("carol", T0 + 4);
    store.insert_batch(&later, None).await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let page = store
            .changes_after(deletion.cursor, None, 100)
            .await
            .unwrap();
        if let Some(change) = page.changes.first() {
            assert_eq!(change.batch, later);
            assert!(change.cursor > deletion.cursor);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the next change is read"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(store.feed_bounds().await.unwrap().head >= deletion.cursor);
}

async fn an_owner_at_its_active_limit_inserts_nothing_until_a_batch_ends(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    let first = plain("alice", T0);
    let second = plain("alice", T0);
    store.insert_batch(&first, Some(2)).await.unwrap();
    store.insert_batch(&second, Some(2)).await.unwrap();
    let refused = plain("alice", T0);
    let error = store.insert_batch(&refused, Some(2)).await.unwrap_err();
    assert!(
        matches!(error, batchd::error::Error::ActiveBatchLimit { limit: 2 }),
        "{error:?}"
    );
    let request = [1u8; 32];
    let with_key = plain("alice", T0);
    assert!(matches!(
        store
            .insert_batch_once(&with_key, claim("alice", "k", &request, T0), Some(2))
            .await
            .unwrap_err(),
        batchd::error::Error::ActiveBatchLimit { limit: 2 }
    ));
    assert_eq!(
        store
            .get_batches(&[refused.id.clone(), with_key.id.clone()])
            .await
            .unwrap(),
        []
    );
    // Another owner has its own count; a batch that ends frees its slot at once.
    store
        .insert_batch(&plain("bob", T0), Some(2))
        .await
        .unwrap();
    commit_moves(&*store, &first, &[BatchStatus::Cancelling], T0 + 1).await;
    assert!(
        store
            .insert_batch(&plain("alice", T0), Some(2))
            .await
            .is_err(),
        "cancelling is active"
    );
    commit_moves(
        &*store,
        &moved(&first, BatchStatus::Cancelling, T0 + 1),
        &[BatchStatus::Cancelled],
        T0 + 2,
    )
    .await;
    // The key refused above was not kept: the same request now goes through.
    assert_eq!(
        store
            .insert_batch_once(&with_key, claim("alice", "k", &request, T0 + 3), Some(2))
            .await
            .unwrap(),
        None
    );
    // And a repeat of it is answered with its batch, whatever the quota.
    let repeat = plain("alice", T0 + 4);
    assert!(matches!(
        store
            .insert_batch_once(&repeat, claim("alice", "k", &request, T0 + 4), Some(2))
            .await
            .unwrap(),
        Some(EarlierClaim { .. })
    ));
}

/// PostgreSQL takes transaction ids before commit: a writer that began first can commit
/// last, below a position a reader has already passed. The feed holds back everything
/// from the oldest running transaction on, so that change is still delivered, in its
/// place, once it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_change_that_began_first_but_committed_last_is_not_skipped() {
    use sqlx::{Connection, Executor};

    let (db, store) = fresh_store(Backend::Postgres).await;
    let early = plain("alice", T0);
    let late = plain("bob", T0);
    store.insert_batch(&early, None).await.unwrap();
    store.insert_batch(&late, None).await.unwrap();
    let (created, cursor) = read_feed(&*store, FeedCursor::default(), 10, 2).await;
    assert_eq!(created.len(), 2);

    // A writer takes its transaction id by appending a version of `early` to the log,
    // and stays open, as a slow commit would.
    let mut slow = sqlx::PgConnection::connect(&db.url).await.unwrap();
    slow.execute("BEGIN").await.unwrap();
    sqlx::query(
        "INSERT INTO batch_events (batch_id, version, snapshot, at) \
         SELECT batch_id, 2, jsonb_set(snapshot, '{version}', '2'), at \
         FROM batch_events WHERE batch_id = $1 AND version = 1",
    )
    .bind(early.id.as_str())
    .execute(&mut slow)
    .await
    .unwrap();

    // A later writer commits a change to `late` while the first is still open.
    let late_running = moved(&late, BatchStatus::InProgress, T0 + 2);
    commit(&*store, &late_running).await;
    let (while_open, held_at) = read_feed(&*store, cursor, 10, 0).await;
    assert!(
        while_open.is_empty(),
        "a change above an open transaction is held back, got {while_open:?}"
    );

    // The first writer commits: its change comes first, then the one held back.
    slow.execute("COMMIT").await.unwrap();
    let (after_commit, _) = read_feed(&*store, held_at, 10, 2).await;
    assert_eq!(
        after_commit,
        vec![(early.id.clone(), 2), (late.id.clone(), 2)]
    );
    store.close().await;
}

/// Compaction deletes nothing the feed still holds back: while a transaction that began
/// before them is open, old-enough changes above the horizon stay, so the oldest
/// resumable cursor never passes the head; once it ends, they go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_compaction_keeps_what_the_feed_holds_back() {
    use sqlx::{Connection, Executor};

    let (db, store) = fresh_store(Backend::Postgres).await;
    let mut open = sqlx::PgConnection::connect(&db.url).await.unwrap();
    open.execute("BEGIN").await.unwrap();
    open.execute("SELECT pg_current_xact_id()").await.unwrap();
    let batch = with_versions(&*store, "alice", T0, 3).await;
    assert_eq!(
        store.compact_events(i64::MAX, 10).await.unwrap(),
        0,
        "held back: kept"
    );
    let bounds = store.feed_bounds().await.unwrap();
    assert!(bounds.oldest <= bounds.head);
    open.execute("COMMIT").await.unwrap();
    // The horizon is the server's: other tests' transactions may hold it a moment more.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut deleted = 0;
    while deleted < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "compacted {deleted} of 2"
        );
        deleted += store.compact_events(i64::MAX, 10).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(deleted, 2);
    assert_eq!(logged_versions(&*store, &batch.id).await, vec![3]);
    let bounds = store.feed_bounds().await.unwrap();
    assert!(bounds.oldest <= bounds.head);
    store.close().await;
}

/// An endpoint of `owner` (of every owner's batches if `all_owners`) created after
/// `starts_after`, subscribed to `types`.
fn endpoint(
    id: &str,
    owner: &str,
    all_owners: bool,
    types: &[batchd::domain::webhooks::WebhookEventType],
) -> batchd::domain::webhooks::WebhookEndpoint {
    batchd::domain::webhooks::WebhookEndpoint {
        id: id.to_owned(),
        owner: owner.to_owned(),
        all_owners,
        settings: batchd::domain::webhooks::EndpointSettings {
            name: id.to_owned(),
            // Only stored, never called: loopback all the same.
            url: url::Url::parse("https://127.0.0.1/b").unwrap(),
            event_types: types.to_vec(),
        },
        secret: batchd::domain::webhooks::SealedSecret(format!("plain:secret-of-{id}")),
        previous_secret: None,
        created_at: T0,
        updated_at: T0,
        starts_after: FeedCursor::default(),
        failing_since: None,
        disabled: None,
        key_id: None,
    }
}

/// The ids of the endpoints that follow `owner`'s batches, sorted.
async fn following_ids(store: &dyn Store, owner: &str) -> Vec<String> {
    let mut ids: Vec<String> = store
        .endpoints_following(&[owner])
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    ids.sort();
    ids
}

/// A delivery of event `event` to `endpoint`.
/// A delivery of an event of `batch`, which must exist: deliveries are queued only
/// for batches that do.
fn delivery(batch: &Batch, endpoint: &str, event: &str) -> batchd::domain::webhooks::NewDelivery {
    batchd::domain::webhooks::NewDelivery {
        id: batchd::domain::webhooks::NewDelivery::new_id(),
        endpoint_id: endpoint.to_owned(),
        event_id: event.to_owned(),
        event_type: "batch.completed".to_owned(),
        batch_id: batch.id.to_string(),
        payload: format!(r#"{{"id":"{event}"}}"#),
        created_at: T0,
    }
}

fn cursor(position: i64) -> FeedCursor {
    FeedCursor {
        transaction: 0,
        position,
    }
}

async fn webhook_deliveries_are_queued_once_and_leased_to_one_replica_at_a_time(backend: Backend) {
    use batchd::domain::webhooks::{
        AfterAttempt, AttemptRecord, AttemptReport, DeliveryState, EndpointHealth,
        WebhookEventType as E,
    };
    use batchd::store::DeliveryClaim;
    let (_db, store) = fresh_store(backend).await;
    let batch = plain("alice", T0);
    store.insert_batch(&batch, None).await.unwrap();
    let alices = endpoint("we_a", "alice", false, &[E::BatchCompleted]);
    assert!(store.insert_endpoint(&alices, 2).await.unwrap());
    assert!(
        store
            .insert_endpoint(&endpoint("we_b", "bob", false, &[E::BatchCompleted]), 2)
            .await
            .unwrap()
    );
    assert!(
        store
            .insert_endpoint(&endpoint("we_all", "root", true, &[E::BatchFailed]), 2)
            .await
            .unwrap()
    );
    assert!(
        store
            .insert_endpoint(&endpoint("we_a2", "alice", false, &[E::BatchFailed]), 2)
            .await
            .unwrap()
    );
    assert!(
        !store
            .insert_endpoint(&endpoint("we_a3", "alice", false, &[E::BatchFailed]), 2)
            .await
            .unwrap(),
        "an owner's limit holds"
    );
    let following = following_ids(&*store, "alice").await;
    assert_eq!(following, ["we_a", "we_a2", "we_all"]);
    assert_eq!(
        store.get_endpoint("we_a").await.unwrap(),
        Some(alices.clone())
    );
    let listed: Vec<String> = store
        .list_endpoints(Some("alice"), None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(listed, ["we_a2", "we_a"], "newest first");
    let after: Vec<String> = store
        .list_endpoints(None, Some("we_all"), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(after, ["we_b", "we_a"]);

    // The dispatcher's position: created once, moved only from where it is.
    let start = store.dispatch_position(cursor(0)).await.unwrap();
    assert_eq!(store.dispatch_position(cursor(99)).await.unwrap(), start);
    let queued = [
        delivery(&batch, "we_a", "evt_1"),
        delivery(&batch, "we_a", "evt_2"),
    ];
    assert!(
        store
            .queue_deliveries(start, cursor(5), &queued)
            .await
            .unwrap()
    );
    assert!(
        !store
            .queue_deliveries(start, cursor(6), &[delivery(&batch, "we_a", "evt_3")])
            .await
            .unwrap(),
        "a stale position queues nothing"
    );
    assert!(
        store
            .queue_deliveries(cursor(5), cursor(7), &[delivery(&batch, "we_a", "evt_1")])
            .await
            .unwrap(),
        "an event queued again for its endpoint is left out"
    );
    assert_eq!(store.dispatch_position(cursor(0)).await.unwrap(), cursor(7));
    assert_eq!(store.list_deliveries("we_a", 10).await.unwrap().len(), 2);
    assert_eq!(store.delivery_queue().await.unwrap().pending, 2);

    // One replica at a time, until its lease runs out.
    let now = 1_000_000;
    let claim = |replica: &'static str, now_ms: i64, busy: &'static [String]| DeliveryClaim {
        replica,
        now_ms,
        lease_until_ms: now_ms + 1_000,
        busy_endpoints: busy,
        busy_owners: &[],
        per_endpoint: 10,
        per_owner: 10,
        limit: 10,
    };
    let one_each = store
        .claim_deliveries(&DeliveryClaim {
            per_endpoint: 1,
            ..claim("r1", now, &[])
        })
        .await
        .unwrap();
    assert_eq!(one_each.len(), 1, "at most per_endpoint of one endpoint");
    store
        .release_deliveries("r1", std::slice::from_ref(&one_each[0].queued.id))
        .await
        .unwrap();
    let first = store
        .claim_deliveries(&claim("r1", now, &[]))
        .await
        .unwrap();
    assert_eq!(first.len(), 2);
    assert!(
        store
            .claim_deliveries(&claim("r2", now + 500, &[]))
            .await
            .unwrap()
            .is_empty()
    );
    let taken = store
        .claim_deliveries(&claim("r2", now + 1_001, &[]))
        .await
        .unwrap();
    assert_eq!(taken.len(), 2, "an expired lease is taken over");
    let delivered = AttemptRecord {
        report: AttemptReport {
            at_ms: now + 1_001,
            duration_ms: 5,
            status_code: Some(200),
            error: None,
        },
        after: AfterAttempt::Delivered,
        endpoint: EndpointHealth::Healthy,
    };
    let id = taken[0].queued.id.clone();
    assert!(
        !store
            .record_attempt("r1", "we_a", &id, &delivered)
            .await
            .unwrap(),
        "the replica that lost its lease records nothing"
    );
    assert!(
        store
            .record_attempt("r2", "we_a", &id, &delivered)
            .await
            .unwrap()
    );
    let failing = AttemptRecord {
        report: AttemptReport {
            at_ms: now + 1_002,
            duration_ms: 5,
            status_code: Some(503),
            error: Some("the receiver answered 503".into()),
        },
        after: AfterAttempt::RetryAt(now + 5_000),
        endpoint: EndpointHealth::Failing(T0 + 10),
    };
    let other = taken[1].queued.id.clone();
    assert!(
        store
            .record_attempt("r2", "we_a", &other, &failing)
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .get_endpoint("we_a")
            .await
            .unwrap()
            .unwrap()
            .failing_since,
        Some(T0 + 10)
    );
    assert!(
        store
            .claim_deliveries(&claim("r1", now + 4_999, &[]))
            .await
            .unwrap()
            .is_empty(),
        "a retry waits for its time"
    );
    static BUSY: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| vec!["we_a".to_owned()]);
    assert!(
        store
            .claim_deliveries(&claim("r1", now + 5_000, &BUSY))
            .await
            .unwrap()
            .is_empty(),
        "a busy endpoint's deliveries are left to others"
    );
    let retried = store
        .claim_deliveries(&claim("r1", now + 5_000, &[]))
        .await
        .unwrap();
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].attempts, 1);
    assert_eq!(
        retried[0].last_attempt.as_ref().unwrap().status_code,
        Some(503)
    );
    store
        .release_deliveries("r1", std::slice::from_ref(&other))
        .await
        .unwrap();
    assert_eq!(
        store
            .claim_deliveries(&claim("r2", now + 5_001, &[]))
            .await
            .unwrap()
            .len(),
        1,
        "a released lease is free at once"
    );
    let gone = AttemptRecord {
        after: AfterAttempt::GiveUp,
        endpoint: EndpointHealth::Disable {
            at: T0 + 20,
            reason: "the receiver answered 410 Gone".into(),
        },
        ..failing.clone()
    };
    assert!(
        store
            .record_attempt("r2", "we_a", &other, &gone)
            .await
            .unwrap()
    );
    let disabled = store.get_endpoint("we_a").await.unwrap().unwrap();
    assert_eq!(
        disabled.disabled,
        Some((T0 + 20, "the receiver answered 410 Gone".into()))
    );
    assert!(
        !store
            .endpoints_following(&["alice"])
            .await
            .unwrap()
            .iter()
            .any(|e| e.id == "we_a")
    );
    let states: Vec<DeliveryState> = store
        .list_deliveries("we_a", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.state)
        .collect();
    assert_eq!(states.len(), 2);
    assert!(states.contains(&DeliveryState::Delivered) && states.contains(&DeliveryState::Failed));
    assert_eq!(store.delivery_queue().await.unwrap().pending, 0);

    // Enabled again (the service does this on update); a finished delivery retried.
    let enabled = batchd::domain::webhooks::WebhookEndpoint {
        disabled: None,
        failing_since: None,
        ..disabled.clone()
    };
    assert!(
        !store
            .update_endpoint(
                &enabled,
                &batchd::domain::webhooks::SealedSecret("plain:stale".into())
            )
            .await
            .unwrap(),
        "an update from a stale secret is refused"
    );
    assert!(
        store
            .update_endpoint(&enabled, &disabled.secret)
            .await
            .unwrap()
    );
    assert!(
        store
            .retry_delivery("we_a", &other, now + 6_000)
            .await
            .unwrap()
    );
    assert!(
        !store
            .retry_delivery("we_b", &other, now + 6_000)
            .await
            .unwrap(),
        "not another endpoint's"
    );
    let again = store
        .claim_deliveries(&claim("r1", now + 6_000, &[]))
        .await
        .unwrap();
    assert_eq!(
        (again.len(), again[0].attempts),
        (1, 0),
        "a fresh count of attempts"
    );
    let delivered_later = AttemptRecord {
        report: AttemptReport {
            at_ms: now + 6_000,
            ..delivered.report.clone()
        },
        ..delivered.clone()
    };
    assert!(
        store
            .record_attempt("r1", "we_a", &other, &delivered_later)
            .await
            .unwrap()
    );

    // Finished deliveries are forgotten after their retention (the first finished at
    // now + 1,006 ms, the other at now + 6,005); deleting an endpoint deletes its
    // deliveries.
    assert_eq!(store.forget_deliveries(now + 1_006, 10).await.unwrap(), 0);
    assert_eq!(store.forget_deliveries(now + 1_007, 10).await.unwrap(), 1);
    assert_eq!(store.list_deliveries("we_a", 10).await.unwrap().len(), 1);
    assert!(store.delete_endpoint("we_a").await.unwrap());
    assert!(!store.delete_endpoint("we_a").await.unwrap());
    assert!(store.list_deliveries("we_a", 10).await.unwrap().is_empty());
    store.close().await;
}

async fn compaction_keeps_what_the_webhook_dispatcher_has_not_read(backend: Backend) {
    let (_db, store) = fresh_store(backend).await;
    let start = store
        .dispatch_position(FeedCursor::default())
        .await
        .unwrap();
    let busy = with_versions(&*store, "alice", T0, 4).await;
    let changes = readable_changes(&*store, 4).await;
    assert_eq!(
        store.compact_events(i64::MAX, 10).await.unwrap(),
        0,
        "nothing the dispatcher has not read"
    );
    // Read through version 2: version 1 is read and so is the one after it.
    assert!(
        store
            .queue_deliveries(start, changes[1].cursor, &[])
            .await
            .unwrap()
    );
    assert_eq!(store.compact_events(i64::MAX, 10).await.unwrap(), 1);
    assert_eq!(logged_versions(&*store, &busy.id).await, vec![2, 3, 4]);
    assert!(
        store
            .queue_deliveries(changes[1].cursor, changes[3].cursor, &[])
            .await
            .unwrap()
    );
    assert_eq!(store.compact_events(i64::MAX, 10).await.unwrap(), 2);
    assert_eq!(logged_versions(&*store, &busy.id).await, vec![4]);
    store.close().await;
}

/// One owner's backlog does not fill a claim: owners are taken in turn (each one's
/// oldest first), at most `per_owner` of one owner, none of an owner that is full.
async fn claims_take_owners_in_turn_and_leave_full_owners_out(backend: Backend) {
    use batchd::domain::webhooks::WebhookEventType as E;
    use batchd::store::DeliveryClaim;
    let (_db, store) = fresh_store(backend).await;
    let batch = plain("alice", T0);
    store.insert_batch(&batch, None).await.unwrap();
    for (id, owner) in [
        ("we_m1", "mallory"),
        ("we_m2", "mallory"),
        ("we_al", "alice"),
    ] {
        assert!(
            store
                .insert_endpoint(&endpoint(id, owner, false, &[E::BatchCompleted]), 10)
                .await
                .unwrap()
        );
    }
    let start = store.dispatch_position(cursor(0)).await.unwrap();
    // Mallory's six come first, alice's one last.
    let mut queued = Vec::new();
    for i in 0..3 {
        queued.push(delivery(&batch, "we_m1", &format!("evt_m1_{i}")));
        queued.push(delivery(&batch, "we_m2", &format!("evt_m2_{i}")));
    }
    queued.push(delivery(&batch, "we_al", "evt_alice"));
    assert!(
        store
            .queue_deliveries(start, cursor(1), &queued)
            .await
            .unwrap()
    );
    // The claims below are planned on fresh statistics; what they take is the same.
    store.refresh_delivery_statistics().await.unwrap();
    let claim = |replica: &'static str, limit: i64, per_owner: i64, full: &'static [String]| {
        DeliveryClaim {
            replica,
            now_ms: 1_000,
            lease_until_ms: 100_000,
            busy_endpoints: &[],
            busy_owners: full,
            per_endpoint: 10,
            per_owner,
            limit,
        }
    };
    let endpoints_of = |claimed: &[batchd::domain::webhooks::Delivery]| {
        let mut ids: Vec<String> = claimed
            .iter()
            .map(|d| d.queued.endpoint_id.clone())
            .collect();
        ids.sort();
        ids
    };
    let first = store
        .claim_deliveries(&claim("r1", 2, 10, &[]))
        .await
        .unwrap();
    assert_eq!(
        endpoints_of(&first),
        ["we_al", "we_m1"],
        "alice's one comes with mallory's oldest, not after all of mallory's"
    );
    let capped = store
        .claim_deliveries(&claim("r1", 10, 2, &[]))
        .await
        .unwrap();
    assert_eq!(
        endpoints_of(&capped),
        ["we_m1", "we_m2"],
        "per_owner of one owner"
    );
    static MALLORY: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| vec!["mallory".to_owned()]);
    assert!(
        store
            .claim_deliveries(&claim("r1", 10, 10, &MALLORY))
            .await
            .unwrap()
            .is_empty(),
        "a full owner's deliveries are left for later"
    );
    assert_eq!(
        store
            .claim_deliveries(&claim("r1", 10, 10, &[]))
            .await
            .unwrap()
            .len(),
        3,
        "the rest"
    );
}

/// Revoking a key disables the all-owners endpoints it configured, in the same
/// transaction, and not its owner's own; a revoked key neither enables nor creates one.
async fn revoking_a_key_stops_the_all_owners_endpoints_it_configured(backend: Backend) {
    use batchd::domain::webhooks::{WebhookEndpoint, WebhookEventType as E};
    let (_db, store) = fresh_store(backend).await;
    let (ops, ops_digest) = new_key("ops", T0);
    let (other, other_digest) = new_key("root", T0);
    store.insert_api_key(&ops, &ops_digest).await.unwrap();
    store.insert_api_key(&other, &other_digest).await.unwrap();
    let configured_by = |id: &str, all_owners: bool, key: &ApiKey| WebhookEndpoint {
        key_id: Some(key.id.clone()),
        ..endpoint(id, "ops", all_owners, &[E::BatchCompleted])
    };
    let everyones = configured_by("we_all", true, &ops);
    let owners = configured_by("we_own", false, &ops);
    assert!(store.insert_endpoint(&everyones, 10).await.unwrap());
    assert!(store.insert_endpoint(&owners, 10).await.unwrap());
    assert!(store.revoke_api_key(&ops.id, T0 + 5).await.unwrap());

    let stored = store.get_endpoint("we_all").await.unwrap().unwrap();
    assert_eq!(stored.disabled, Some((T0 + 5, "key revoked".to_owned())));
    assert_eq!(
        store
            .get_endpoint("we_own")
            .await
            .unwrap()
            .unwrap()
            .disabled,
        None
    );
    let following = following_ids(&*store, "ops").await;
    assert_eq!(following, ["we_own"]);

    // The revoked key enables nothing (as a stale cache would let it try); another key
    // does, and answers for the endpoint from then on.
    let enabled = WebhookEndpoint {
        disabled: None,
        ..stored.clone()
    };
    assert!(
        !store
            .update_endpoint(&enabled, &stored.secret)
            .await
            .unwrap()
    );
    let taken_over = WebhookEndpoint {
        key_id: Some(other.id.clone()),
        ..enabled.clone()
    };
    assert!(
        store
            .update_endpoint(&taken_over, &stored.secret)
            .await
            .unwrap()
    );
    let following = following_ids(&*store, "ops").await;
    assert_eq!(following, ["we_all", "we_own"], "another key's now");
    let created_by_revoked = configured_by("we_late", true, &ops);
    assert!(matches!(
        store.insert_endpoint(&created_by_revoked, 10).await,
        Err(batchd::error::Error::Unauthenticated(_))
    ));
}
