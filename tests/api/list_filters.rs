//! List filters (status set, creation time range, metadata pairs, job, order) page
//! exactly: through 2,500 batches of two tenants, every filter and combination returns
//! the matching batches once each, in order, whatever the page size, on both stores.

use std::collections::BTreeMap;

use batchd::domain::BatchStatus as Status;
use batchd::domain::{BatchUpdateInput, Caller, CreateBatchInput, Scope};
use batchd::proto::batchd::v1 as pb;

use crate::helpers::*;

const BATCHES: usize = 2_500;
const T0: i64 = 1_800_000_000;

/// What the test knows of a batch it made.
#[derive(Debug, Clone)]
struct Made {
    id: String,
    owner: &'static str,
    status: Status,
    created_at: i64,
    team: String,
    shard: String,
    job: String,
}

/// Makes the batches, in creation order: three per second (so `created_at` ties), two
/// owners, three teams, five shards, four jobs, four statuses.
async fn make_batches(app: &TestApp, clock: &ManualClock) -> Vec<Made> {
    let service = app.app.as_ref().unwrap().service().clone();
    let alice = Caller::of(&service_key(app, "alice").await.0);
    let bob = Caller::of(&service_key(app, "bob").await.0);
    let worker = Caller::of(&service_key(app, "executor").await.0);
    let mut made = Vec::with_capacity(BATCHES);
    for i in 0..BATCHES {
        if i % 3 == 0 {
            clock.advance(1);
        }
        let (owner, caller) = if i % 3 == 2 {
            ("bob", &bob)
        } else {
            ("alice", &alice)
        };
        let team = ["search", "ads", "maps"][i % 3 / 2 + (i / 7) % 2].to_owned();
        let shard = (i % 5).to_string();
        let job = format!("job-{}", i % 4);
        let batch = service
            .create_batch(
                caller,
                CreateBatchInput {
                    input_file_id: "file-1".into(),
                    endpoint: "/v1/chat/completions".into(),
                    completion_window: "24h".into(),
                    metadata: Some(BTreeMap::from([
                        ("team".to_owned(), team.clone()),
                        ("shard".to_owned(), shard.clone()),
                    ])),
                    job_id: Some(job.clone()),
                    ..Default::default()
                },
            )
            .await
            .expect("create");
        let status = match i % 4 {
            0 => Status::Validating,
            1 => Status::InProgress,
            2 => Status::Finalizing,
            _ => Status::Cancelling,
        };
        let path: &[Status] = match status {
            Status::Validating => &[],
            Status::InProgress => &[Status::InProgress],
            Status::Finalizing => &[Status::InProgress, Status::Finalizing],
            _ => &[Status::Cancelling],
        };
        for &to in path {
            service
                .update_batch(
                    &worker,
                    batch.id.as_str(),
                    BatchUpdateInput {
                        status: Some(to),
                        ..Default::default()
                    },
                )
                .await
                .expect("move");
        }
        made.push(Made {
            id: batch.id.to_string(),
            owner,
            status,
            created_at: batch.created_at,
            team,
            shard,
            job,
        });
    }
    made
}

async fn service_key(app: &TestApp, user: &str) -> (batchd::domain::ApiKey, String) {
    let scope = if user == "executor" {
        Scope::Worker
    } else {
        Scope::Batches
    };
    let (key, secret) = app
        .app
        .as_ref()
        .unwrap()
        .service()
        .create_api_key(user, scope)
        .await
        .expect("key");
    (key, secret.expose().to_owned())
}

/// Which made batches a filter should return.
type Matcher = Box<dyn Fn(&Made) -> bool>;

/// Every id a REST list with `query` returns, following `last_id` page by page.
async fn page_through(rest: &Rest, query: &str, limit: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let cursor = after
            .as_ref()
            .map(|a| format!("&after={a}"))
            .unwrap_or_default();
        let (status, page) = rest
            .get(&format!("/v1/batches?limit={limit}{query}{cursor}"))
            .await;
        assert_eq!(status, 200, "{query}: {page}");
        let data = page["data"].as_array().unwrap();
        ids.extend(data.iter().map(|b| b["id"].as_str().unwrap().to_owned()));
        if !page["has_more"].as_bool().unwrap() {
            assert!(data.len() <= limit);
            return ids;
        }
        assert_eq!(data.len(), limit, "a page before the last is full");
        after = page["last_id"].as_str().map(str::to_owned);
    }
}

async fn every_filter_pages_exactly(backend: Backend) {
    let clock = ManualClock::at(T0);
    let app_clock = clock.clone();
    let app = TestApp::spawn_with(backend, |o| o.clock = app_clock).await;
    let made = make_batches(&app, &clock).await;
    let alice = app.rest(Some(&service_key(&app, "alice").await.1));
    let admin = app.rest(Some(&app.admin_key));

    // Creation order is the order of the ids in an unfiltered list, oldest first.
    let oldest_first = page_through(&admin, "&order=asc", 100).await;
    assert_eq!(oldest_first.len(), BATCHES);
    let position: BTreeMap<&str, usize> = oldest_first
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let mut in_order = made.clone();
    in_order.sort_by_key(|m| position[m.id.as_str()]);

    let middle = T0 + (BATCHES as i64 / 3) / 2;
    let cases: Vec<(&str, String, Matcher)> = vec![
        ("no filter", String::new(), Box::new(|_| true)),
        (
            "one status",
            "&status=in_progress".into(),
            Box::new(|m| m.status == Status::InProgress),
        ),
        (
            "two statuses, commas",
            "&status=in_progress,finalizing".into(),
            Box::new(|m| matches!(m.status, Status::InProgress | Status::Finalizing)),
        ),
        (
            "two statuses, repeated",
            "&status=cancelling&status=validating".into(),
            Box::new(|m| matches!(m.status, Status::Cancelling | Status::Validating)),
        ),
        (
            "created range",
            format!("&created_after={}&created_before={}", T0 + 100, middle),
            Box::new(move |m| m.created_at >= T0 + 100 && m.created_at < middle),
        ),
        (
            "created after",
            format!("&created_after={middle}"),
            Box::new(move |m| m.created_at >= middle),
        ),
        (
            "one metadata pair",
            "&metadata[team]=ads".into(),
            Box::new(|m| m.team == "ads"),
        ),
        (
            "two metadata pairs",
            "&metadata[team]=search&metadata[shard]=3".into(),
            Box::new(|m| m.team == "search" && m.shard == "3"),
        ),
        (
            "job and status",
            "&job_id=job-1&status=in_progress".into(),
            Box::new(|m| m.job == "job-1" && m.status == Status::InProgress),
        ),
        (
            "everything",
            format!(
                "&status=finalizing,in_progress&created_after={}&metadata[shard]=2&job_id=job-2",
                T0 + 10
            ),
            Box::new(|m| {
                matches!(m.status, Status::Finalizing | Status::InProgress)
                    && m.created_at >= T0 + 10
                    && m.shard == "2"
                    && m.job == "job-2"
            }),
        ),
        (
            "nothing matches",
            "&metadata[team]=nobody".into(),
            Box::new(|_| false),
        ),
    ];
    for (name, query, matches) in &cases {
        for (who, rest, owner) in [("admin", &admin, None), ("alice", &alice, Some("alice"))] {
            let expected: Vec<String> = in_order
                .iter()
                .filter(|m| owner.is_none_or(|o| m.owner == o) && matches(m))
                .map(|m| m.id.clone())
                .collect();
            for (order, limit) in [("asc", 100), ("desc", 37)] {
                let mut got = page_through(rest, &format!("{query}&order={order}"), limit).await;
                if order == "desc" {
                    got.reverse();
                }
                assert_eq!(got.len(), expected.len(), "{name}, {who}, {order}");
                assert!(
                    got == expected,
                    "{name}, {who}, {order}: not the matching set in order"
                );
            }
        }
    }

    // The same filters over gRPC.
    let mut client = app.client(&app.admin_key);
    let listed = client
        .list_batches(pb::ListBatchesRequest {
            limit: Some(100),
            statuses: vec![
                pb::BatchStatus::InProgress.into(),
                pb::BatchStatus::Finalizing.into(),
            ],
            metadata: [("team".to_owned(), "maps".to_owned())].into(),
            created_after: Some(T0 + 10),
            order: Some("asc".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let expected: Vec<&str> = in_order
        .iter()
        .filter(|m| {
            matches!(m.status, Status::InProgress | Status::Finalizing)
                && m.team == "maps"
                && m.created_at >= T0 + 10
        })
        .take(100)
        .map(|m| m.id.as_str())
        .collect();
    let got: Vec<&str> = listed.data.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(got, expected);
}

async fn malformed_filters_are_refused_naming_the_parameter(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let rest = app.rest(Some(&app.admin_key));
    for (query, param) in [
        ("status=in_progress,nope", "status"),
        ("created_after=yesterday", "created_after"),
        ("created_before=-5", "created_before"),
        ("order=sideways", "order"),
        ("limit=5&limit=6", "limit"),
        (
            "metadata[a]=1&metadata[b]=2&metadata[c]=3&metadata[d]=4&metadata[e]=5",
            "metadata",
        ),
        ("metadata[]=1", "metadata"),
        ("metadata[k]=%00", "metadata.k"),
    ] {
        let (status, error) = rest.get(&format!("/v1/batches?{query}")).await;
        assert_eq!(status, 400, "{query}: {error}");
        assert_eq!(error["error"]["param"], param, "{query}: {error}");
    }
    let mut client = app.client(&app.admin_key);
    assert_status(
        client
            .list_batches(pb::ListBatchesRequest {
                order: Some("up".into()),
                ..Default::default()
            })
            .await,
        tonic::Code::InvalidArgument,
        "order",
    );
}

on_both_stores!(
    every_filter_pages_exactly,
    malformed_filters_are_refused_naming_the_parameter,
);
