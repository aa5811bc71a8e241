//! Webhooks end to end: real endpoints over REST, a real receiver on a random port,
//! deliveries checked by their signatures and deduplicated by `webhook-id`, on both
//! stores. The official SDKs' `unwrap` is checked in tests/python and tests/node.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::post;
use batchd::app::ServeOptions;
use batchd::domain::Scope;
use batchd::domain::webhooks::{DestinationPolicy, RetrySchedule, SigningSecret};
use batchd::proto::batchd::v1 as pb;
use batchd::webhooks::sender::{Sender, SignedRequest};
use serde_json::{Value, json};

use crate::helpers::{
    Backend, ManualClock, Rest, TestApp, TestDb, create, eventually, metric_value, metrics_text,
    move_through, on_both_stores,
};
use crate::process::Server;

on_both_stores!(
    a_lifecycle_delivers_exactly_the_subscribed_events_signed,
    a_receiver_that_was_down_gets_every_event_with_one_id_and_410_disables_it,
    rotation_signs_with_both_secrets_until_the_overlap_ends,
    an_endpoint_never_receives_another_owners_batches,
    bad_endpoint_requests_are_refused_naming_the_problem,
    a_replica_killed_mid_delivery_loses_nothing,
    retry_after_is_honoured_redirects_are_not_followed_and_long_failure_disables,
);

/// Flags that let webhooks reach the test's receiver, with retries compressed.
pub(crate) fn reach_local_receivers(options: &mut ServeOptions) {
    options.webhooks.policy = DestinationPolicy {
        allow_http: true,
        allow_private_networks: true,
    };
    options.webhooks.poll = Duration::from_millis(100);
    options.webhooks.retries = RetrySchedule::parse(
        "test",
        "100ms,200ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms",
    )
    .unwrap();
    options.webhooks.attempt_timeout = Duration::from_secs(2);
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    path: String,
    webhook_id: String,
    timestamp: i64,
    signature: String,
    body: String,
    answered: u16,
}

impl Received {
    pub(crate) fn event(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }

    fn verifies_with(&self, secret: &str) -> bool {
        SigningSecret::parse("secret", secret).unwrap().verifies(
            &self.webhook_id,
            self.timestamp,
            self.body.as_bytes(),
            &self.signature,
        )
    }
}

/// How the receiver answers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Answer {
    Status(u16),
    /// 200, after this long.
    Slowly(Duration),
    /// 503 asking for this many seconds before the next attempt.
    RetryAfter(u64),
    /// 307 to the receiver's `/elsewhere`.
    Redirect,
}

#[derive(Debug)]
struct ReceiverState {
    received: Mutex<Vec<Received>>,
    answer: Mutex<Answer>,
}

/// A webhook receiver on a random local port.
pub(crate) struct Receiver {
    pub(crate) addr: SocketAddr,
    state: Arc<ReceiverState>,
}

impl Receiver {
    pub(crate) async fn start() -> Receiver {
        let state = Arc::new(ReceiverState {
            received: Mutex::default(),
            answer: Mutex::new(Answer::Status(200)),
        });
        let router = axum::Router::new()
            .route("/{*path}", post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        Receiver { addr, state }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }

    pub(crate) fn answer(&self, answer: Answer) {
        *self.state.answer.lock().unwrap() = answer;
    }

    pub(crate) fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// The events taken (2xx) at `path`, by `webhook-id`.
    pub(crate) fn delivered(&self, path: &str) -> BTreeMap<String, Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path == path && (200..300).contains(&r.answered))
            .map(|r| (r.webhook_id.clone(), r))
            .collect()
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    let answer = *state.answer.lock().unwrap();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let status = match answer {
        Answer::Status(status) => status,
        // 200 after a while, if the sender still waits; recorded as it arrives, with
        // no answer, since a sender that gives up first cuts this handler short.
        Answer::Slowly(_) => 0,
        Answer::RetryAfter(_) => 503,
        Answer::Redirect => 307,
    };
    state.received.lock().unwrap().push(Received {
        path: uri.path().trim_start_matches('/').to_owned(),
        webhook_id: header("webhook-id"),
        timestamp: header("webhook-timestamp").parse().unwrap_or(0),
        signature: header("webhook-signature"),
        body,
        answered: status,
    });
    match answer {
        Answer::Slowly(wait) => {
            tokio::time::sleep(wait).await;
            StatusCode::OK.into_response()
        }
        Answer::RetryAfter(seconds) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", seconds.to_string())],
        )
            .into_response(),
        Answer::Redirect => (
            StatusCode::TEMPORARY_REDIRECT,
            [("location", "/elsewhere".to_owned())],
        )
            .into_response(),
        Answer::Status(_) => StatusCode::from_u16(status).unwrap().into_response(),
    }
}

/// Creates an endpoint; returns its id and secret.
pub(crate) async fn create_endpoint(rest: &Rest, url: &str, types: &[&str]) -> (String, String) {
    let (status, body) = rest
        .post(
            "/v1/webhook_endpoints",
            json!({"name": "test", "url": url, "event_types": types}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    (
        body["id"].as_str().unwrap().to_owned(),
        body["signing_secret"].as_str().unwrap().to_owned(),
    )
}

/// (event type, batch id) of each delivered event.
fn kinds(delivered: &BTreeMap<String, Received>) -> BTreeSet<(String, String)> {
    delivered
        .values()
        .map(|r| {
            let event = r.event();
            (
                event["type"].as_str().unwrap().to_owned(),
                event["data"]["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn expected(pairs: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    pairs
        .iter()
        .map(|(kind, id)| ((*kind).to_owned(), (*id).to_owned()))
        .collect()
}

async fn a_lifecycle_delivers_exactly_the_subscribed_events_signed(backend: Backend) {
    let app = TestApp::spawn_with(backend, reach_local_receivers).await;
    let receiver = Receiver::start().await;
    let alice = app.key("alice", Scope::Batches).await;
    let rest = app.rest(Some(&alice));
    let every = [
        "batch.created",
        "batch.in_progress",
        "batch.finalizing",
        "batch.completed",
        "batch.cancelling",
        "batch.cancelled",
    ];
    let (_, all_secret) = create_endpoint(&rest, &receiver.url("all"), &every).await;
    let (_, openai_secret) =
        create_endpoint(&rest, &receiver.url("openai"), &["batch.completed"]).await;

    let mut client = app.client(&alice);
    let mut worker = app.worker(&app.admin_key);
    let finished = create(&mut client).await.id;
    use pb::BatchStatus as S;
    move_through(&mut worker, &finished, &[S::InProgress]).await;
    // A progress report keeps the status: no event.
    worker
        .update_batch(pb::UpdateBatchRequest {
            batch_id: finished.clone(),
            request_counts: Some(pb::RequestCounts {
                total: 10,
                completed: 5,
                failed: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    move_through(&mut worker, &finished, &[S::Finalizing, S::Completed]).await;
    let cancelled = create(&mut client).await.id;
    client
        .cancel_batch(pb::CancelBatchRequest {
            batch_id: cancelled.clone(),
        })
        .await
        .unwrap();
    move_through(&mut worker, &cancelled, &[S::Cancelled]).await;

    let want_all = expected(&[
        ("batch.created", &finished),
        ("batch.in_progress", &finished),
        ("batch.finalizing", &finished),
        ("batch.completed", &finished),
        ("batch.created", &cancelled),
        ("batch.cancelling", &cancelled),
        ("batch.cancelled", &cancelled),
    ]);
    eventually(Duration::from_secs(20), "every event delivered", || async {
        receiver.delivered("all").len() >= want_all.len()
            && !receiver.delivered("openai").is_empty()
    })
    .await;
    // Anything extra would have arrived by now too.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(kinds(&receiver.delivered("all")), want_all);
    assert_eq!(receiver.delivered("all").len(), want_all.len());
    assert_eq!(
        kinds(&receiver.delivered("openai")),
        expected(&[("batch.completed", &finished)])
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for (path, secret) in [("all", &all_secret), ("openai", &openai_secret)] {
        for (id, received) in receiver.delivered(path) {
            let event = received.event();
            assert_eq!(event["id"], id.as_str(), "webhook-id is the event id");
            assert_eq!(event["object"], "event");
            assert!(event["created_at"].is_i64());
            assert_eq!(
                event.as_object().unwrap().keys().collect::<Vec<_>>(),
                ["id", "object", "type", "created_at", "data"]
            );
            assert!(received.verifies_with(secret), "{received:?}");
            assert!((received.timestamp - now).abs() < 60);
        }
    }
    // The same event for both endpoints carries the same id.
    let completed_ids = |path: &str| -> BTreeSet<String> {
        receiver
            .delivered(path)
            .into_iter()
            .filter(|(_, r)| r.event()["type"] == "batch.completed")
            .map(|(id, _)| id)
            .collect()
    };
    assert_eq!(completed_ids("all"), completed_ids("openai"));
}

async fn a_receiver_that_was_down_gets_every_event_with_one_id_and_410_disables_it(
    backend: Backend,
) {
    let app = TestApp::spawn_with(backend, reach_local_receivers).await;
    let receiver = Receiver::start().await;
    receiver.answer(Answer::Status(503));
    let alice = app.key("alice", Scope::Batches).await;
    let rest = app.rest(Some(&alice));
    let (endpoint, _) = create_endpoint(&rest, &receiver.url("hook"), &["batch.created"]).await;
    let mut client = app.client(&alice);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(create(&mut client).await.id);
    }
    eventually(
        Duration::from_secs(20),
        "two failed attempts of each",
        || async {
            let received = receiver.received();
            let mut attempts: BTreeMap<String, usize> = BTreeMap::new();
            for r in &received {
                *attempts.entry(r.webhook_id.clone()).or_default() += 1;
            }
            attempts.len() == 3 && attempts.values().all(|n| *n >= 2)
        },
    )
    .await;
    let (_, state) = rest.get(&format!("/v1/webhook_endpoints/{endpoint}")).await;
    assert!(state["failing_since"].is_i64(), "{state}");
    receiver.answer(Answer::Status(200));
    eventually(Duration::from_secs(20), "every event taken", || async {
        receiver.delivered("hook").len() == 3
    })
    .await;
    let want: Vec<(&str, &str)> = ids
        .iter()
        .map(|id| ("batch.created", id.as_str()))
        .collect();
    assert_eq!(kinds(&receiver.delivered("hook")), expected(&want));
    // Every retry of an event carried its id and its body unchanged.
    for (id, taken) in receiver.delivered("hook") {
        for attempt in receiver.received().iter().filter(|r| r.webhook_id == id) {
            assert_eq!(attempt.body, taken.body);
        }
    }
    // The receiver has answered; batchd records each outcome just after it.
    let deliveries_log = format!("/v1/webhook_endpoints/{endpoint}/deliveries");
    eventually(
        Duration::from_secs(10),
        "every outcome recorded",
        || async {
            let (_, log) = rest.get(&deliveries_log).await;
            log["data"]
                .as_array()
                .is_some_and(|data| data.iter().all(|delivery| delivery["status"] != "pending"))
        },
    )
    .await;
    let (status, log) = rest.get(&deliveries_log).await;
    assert_eq!(status, 200, "{log}");
    let deliveries = log["data"].as_array().unwrap();
    assert_eq!(deliveries.len(), 3);
    for delivery in deliveries {
        assert_eq!(delivery["status"], "delivered", "{delivery}");
        assert!(delivery["attempts"].as_i64().unwrap() >= 3, "{delivery}");
        assert_eq!(delivery["last_attempt"]["status_code"], 200);
    }
    let (_, state) = rest.get(&format!("/v1/webhook_endpoints/{endpoint}")).await;
    assert!(
        state["failing_since"].is_null(),
        "a success ends the failing"
    );
    let metrics = metrics_text(&app).await;
    let counted = |outcome: &str| {
        metric_value(
            &metrics,
            &format!(
                "batchd_webhook_attempts_total{{event_type=\"batch.created\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(counted("delivered"), 3.0);
    assert!(
        counted("retrying") >= 6.0,
        "two failed attempts of each at least"
    );
    assert!(metrics.contains("batchd_webhook_queue_depth "), "{metrics}");

    // 410 Gone: the receiver does not want webhooks any more.
    receiver.answer(Answer::Status(410));
    let gone = create(&mut client).await.id;
    eventually(Duration::from_secs(20), "the endpoint disabled", || async {
        let (_, state) = rest.get(&format!("/v1/webhook_endpoints/{endpoint}")).await;
        state["status"] == "disabled"
    })
    .await;
    let (_, state) = rest.get(&format!("/v1/webhook_endpoints/{endpoint}")).await;
    assert!(
        state["disabled_reason"].as_str().unwrap().contains("410"),
        "{state}"
    );
    let attempts_of_gone = || {
        receiver
            .received()
            .iter()
            .filter(|r| r.event()["data"]["id"] == gone.as_str())
            .count()
    };
    assert_eq!(attempts_of_gone(), 1, "410 is not retried");
    receiver.answer(Answer::Status(200));
    let while_disabled = create(&mut client).await.id;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !receiver
            .received()
            .iter()
            .any(|r| r.event()["data"]["id"] == while_disabled.as_str()),
        "a disabled endpoint receives nothing"
    );
    // An update enables it again.
    let (status, state) = rest
        .post(
            &format!("/v1/webhook_endpoints/{endpoint}"),
            json!({"name": "back"}),
        )
        .await;
    assert_eq!(
        (status, &state["status"]),
        (200, &json!("enabled")),
        "{state}"
    );
    let after = create(&mut client).await.id;
    eventually(
        Duration::from_secs(20),
        "delivery after enabling",
        || async {
            kinds(&receiver.delivered("hook")).contains(&("batch.created".into(), after.clone()))
        },
    )
    .await;
}

async fn rotation_signs_with_both_secrets_until_the_overlap_ends(backend: Backend) {
    let clock = ManualClock::at(1_800_000_000);
    let app = TestApp::spawn_with(backend, |options| {
        reach_local_receivers(options);
        options.clock = clock.clone();
    })
    .await;
    let receiver = Receiver::start().await;
    let alice = app.key("alice", Scope::Batches).await;
    let rest = app.rest(Some(&alice));
    let (endpoint, first) = create_endpoint(&rest, &receiver.url("hook"), &["batch.created"]).await;
    let mut client = app.client(&alice);

    async fn next_delivery(receiver: &Receiver, client: &mut crate::helpers::Client) -> Received {
        let id = create(client).await.id;
        let mut found = None;
        eventually(Duration::from_secs(20), "the delivery", || {
            found = receiver
                .delivered("hook")
                .into_values()
                .find(|r| r.event()["data"]["id"] == id.as_str());
            std::future::ready(found.is_some())
        })
        .await;
        found.unwrap()
    }

    let before = next_delivery(&receiver, &mut client).await;
    assert!(before.verifies_with(&first));
    assert_eq!(before.signature.split(' ').count(), 1);

    let (status, rotated) = rest
        .post(
            &format!("/v1/webhook_endpoints/{endpoint}/rotate_secret"),
            json!({"keep_old_secret_active_for_24_hours": true}),
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    let second = rotated["signing_secret"].as_str().unwrap().to_owned();
    assert_ne!(second, first);
    assert_eq!(rotated["signing_secret_hint"], &second[second.len() - 4..]);
    let during = next_delivery(&receiver, &mut client).await;
    assert_eq!(
        during.signature.split(' ').count(),
        2,
        "{}",
        during.signature
    );
    assert!(
        during.verifies_with(&first),
        "the old secret still verifies"
    );
    assert!(during.verifies_with(&second), "the new secret verifies");

    clock.advance(24 * 3600 + 1);
    let after = next_delivery(&receiver, &mut client).await;
    assert!(after.verifies_with(&second));
    assert!(!after.verifies_with(&first), "the overlap is over");

    let (_, rotated) = rest
        .post(
            &format!("/v1/webhook_endpoints/{endpoint}/rotate_secret"),
            json!({}),
        )
        .await;
    let third = rotated["signing_secret"].as_str().unwrap().to_owned();
    let immediate = next_delivery(&receiver, &mut client).await;
    assert!(immediate.verifies_with(&third));
    assert!(
        !immediate.verifies_with(&second),
        "no overlap was asked for"
    );
    let (_, shown) = rest.get(&format!("/v1/webhook_endpoints/{endpoint}")).await;
    assert!(shown.get("signing_secret").is_none(), "{shown}");
}

async fn an_endpoint_never_receives_another_owners_batches(backend: Backend) {
    let app = TestApp::spawn_with(backend, reach_local_receivers).await;
    let receiver = Receiver::start().await;
    let alice = app.key("alice", Scope::Batches).await;
    let bob = app.key("bob", Scope::Batches).await;
    let types = ["batch.created"];
    let (alices, _) =
        create_endpoint(&app.rest(Some(&alice)), &receiver.url("alice"), &types).await;
    let (bobs, _) = create_endpoint(&app.rest(Some(&bob)), &receiver.url("bob"), &types).await;
    create_endpoint(
        &app.rest(Some(&app.admin_key)),
        &receiver.url("admin"),
        &types,
    )
    .await;
    let a1 = create(&mut app.client(&alice)).await.id;
    let a2 = create(&mut app.client(&alice)).await.id;
    let b1 = create(&mut app.client(&bob)).await.id;
    eventually(Duration::from_secs(20), "every delivery", || async {
        receiver.delivered("admin").len() == 3
            && receiver.delivered("alice").len() == 2
            && !receiver.delivered("bob").is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let created = |ids: &[&String]| -> BTreeSet<(String, String)> {
        ids.iter()
            .map(|id| ("batch.created".to_owned(), (*id).clone()))
            .collect()
    };
    assert_eq!(kinds(&receiver.delivered("alice")), created(&[&a1, &a2]));
    assert_eq!(kinds(&receiver.delivered("bob")), created(&[&b1]));
    assert_eq!(
        kinds(&receiver.delivered("admin")),
        created(&[&a1, &a2, &b1])
    );

    // Another owner's endpoint does not exist, whatever is asked of it.
    let bob_rest = app.rest(Some(&bob));
    for (method, path) in [
        (
            reqwest::Method::GET,
            format!("/v1/webhook_endpoints/{alices}"),
        ),
        (
            reqwest::Method::DELETE,
            format!("/v1/webhook_endpoints/{alices}"),
        ),
        (
            reqwest::Method::GET,
            format!("/v1/webhook_endpoints/{alices}/deliveries"),
        ),
    ] {
        let (status, body) = Rest::send(bob_rest.request(method, &path)).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    for path in [
        format!("/v1/webhook_endpoints/{alices}"),
        format!("/v1/webhook_endpoints/{alices}/rotate_secret"),
    ] {
        let (status, body) = bob_rest.post(&path, json!({})).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    let (_, listed) = bob_rest.get("/v1/webhook_endpoints").await;
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [bobs.as_str()]);
    // Workers execute batches; they do not manage endpoints.
    let worker = app.key("runner", Scope::Worker).await;
    let (status, body) = app.rest(Some(&worker)).get("/v1/webhook_endpoints").await;
    assert_eq!(status, 403, "{body}");
}

async fn bad_endpoint_requests_are_refused_naming_the_problem(backend: Backend) {
    // Destinations inside the deployment's networks (SSRF) are refused by the default
    // policy; only loopback forms are named here (every other range is a unit test of
    // the classifier), and nothing is saved.
    let guarded = TestApp::spawn(backend).await;
    let guarded_key = guarded.key("alice", Scope::Batches).await;
    let guarded_rest = guarded.rest(Some(&guarded_key));
    for url in [
        "https://127.0.0.1/hook",
        "https://127.8.9.10/hook",
        "https://[::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://localhost/hook",
        "http://127.0.0.1/hook",
        "https://user:pw@127.0.0.1/",
    ] {
        let body = json!({"name": "n", "url": url, "event_types": ["batch.completed"]});
        let (status, error) = guarded_rest.post("/v1/webhook_endpoints", body).await;
        assert_eq!(status, 400, "{url}: {error}");
        assert_eq!(error["error"]["param"], "url", "{url}: {error}");
    }
    drop(guarded);

    // Everything else on a deployment that may reach this machine, where the good
    // endpoint (a loopback port nothing listens on, never sent to) can be saved.
    let app = TestApp::spawn_with(backend, |options| {
        options.webhooks.max_endpoints_per_owner = 2;
        options.webhooks.policy = DestinationPolicy {
            allow_http: true,
            allow_private_networks: true,
        };
    })
    .await;
    let alice = app.key("alice", Scope::Batches).await;
    let rest = app.rest(Some(&alice));
    let good =
        json!({"name": "n", "url": "http://127.0.0.1:9/hook", "event_types": ["batch.completed"]});
    let with = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        body
    };
    let cases = [
        (with("url", json!("ftp://127.0.0.1/hook")), "url"),
        (with("url", json!("https://127.0.0.1/#fragment")), "url"),
        (with("url", json!("not a url")), "url"),
        (
            with(
                "url",
                json!(format!("https://127.0.0.1/{}", "x".repeat(2100))),
            ),
            "url",
        ),
        (with("name", json!("")), "name"),
        (with("name", json!("n".repeat(257))), "name"),
        (with("event_types", json!([])), "event_types"),
        (
            with(
                "event_types",
                json!(["batch.completed", "response.completed"]),
            ),
            "event_types[1]",
        ),
        (with("surprise", json!(1)), "surprise"),
    ];
    for (body, field) in cases {
        let (status, error) = rest.post("/v1/webhook_endpoints", body.clone()).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["param"], field, "{body}: {error}");
    }
    let (status, _) = Rest::send(
        app.rest(None)
            .request(reqwest::Method::POST, "/v1/webhook_endpoints")
            .json(&good),
    )
    .await;
    assert_eq!(status, 401);

    // The per-owner limit holds under concurrent creates too.
    let creates: Vec<_> = (0..12)
        .map(|_| {
            let (rest, good) = (rest.clone(), good.clone());
            tokio::spawn(async move { rest.post("/v1/webhook_endpoints", good).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for create in creates {
        let (status, body) = create.await.unwrap();
        if status == 409 {
            assert!(
                body["error"]["message"].as_str().unwrap().contains("most"),
                "{body}"
            );
        }
        statuses.push(status);
    }
    statuses.sort();
    assert_eq!(statuses, [[200; 2].as_slice(), &[409; 10]].concat());
    let (_, listed) = rest.get("/v1/webhook_endpoints").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 2);

    for (path, status_wanted) in [
        ("/v1/webhook_endpoints?limit=0", 400),
        ("/v1/webhook_endpoints?limit=101", 400),
        (
            "/v1/webhook_endpoints?after=we_000000000000000000000000",
            404,
        ),
        ("/v1/webhook_endpoints?after=batch_1", 400),
        ("/v1/webhook_endpoints?order=asc", 400),
        ("/v1/webhook_endpoints/not-an-id", 400),
        ("/v1/webhook_endpoints/we_000000000000000000000000", 404),
    ] {
        let (status, body) = rest.get(path).await;
        assert_eq!(status, status_wanted, "{path}: {body}");
    }
    let (_, listed) = rest.get("/v1/webhook_endpoints").await;
    let endpoint = listed["data"][0]["id"].as_str().unwrap().to_owned();
    let (status, body) = rest
        .post(
            &format!("/v1/webhook_endpoints/{endpoint}/test"),
            json!({"event_type": "batch.exploded"}),
        )
        .await;
    assert_eq!(
        (status, &body["error"]["param"]),
        (400, &json!("event_type")),
        "{body}"
    );
    let (status, body) = rest
        .post(
            &format!(
                "/v1/webhook_endpoints/{endpoint}/deliveries/wd_000000000000000000000000/retry"
            ),
            json!({}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = rest
        .post(
            &format!("/v1/webhook_endpoints/{endpoint}"),
            json!({"url": "ftp://127.0.0.1/"}),
        )
        .await;
    assert_eq!(
        (status, &body["error"]["param"]),
        (400, &json!("url")),
        "{body}"
    );
    let (status, types) = rest.get("/v1/webhook_event_types").await;
    assert_eq!(status, 200);
    assert_eq!(
        types["data"],
        json!([
            "batch.completed",
            "batch.failed",
            "batch.expired",
            "batch.cancelled",
            "batch.created",
            "batch.in_progress",
            "batch.finalizing",
            "batch.cancelling",
            "batch.stalled"
        ])
    );
}

/// A delivery whose host resolves to a private address when it is sent (DNS
/// rebinding) is refused when connecting, and an address literal before.
#[tokio::test]
async fn a_name_resolving_to_a_private_address_is_refused_at_delivery() {
    let receiver = Receiver::start().await;
    let sender = Sender::new(
        DestinationPolicy {
            allow_http: true,
            allow_private_networks: false,
        },
        Duration::from_secs(2),
    )
    .unwrap();
    for url in [
        format!("http://localhost:{}/hook", receiver.addr.port()),
        receiver.url("hook"),
    ] {
        let url = url::Url::parse(&url).unwrap();
        let outcome = sender
            .send(&SignedRequest {
                url: &url,
                webhook_id: "evt_1",
                timestamp: 1,
                signature: "v1,x",
                body: "{}",
            })
            .await;
        assert_eq!(outcome.status, None, "{url}: {outcome:?}");
        let error = outcome.error.unwrap();
        assert!(error.contains("public address"), "{url}: {error}");
        assert!(
            !error.contains("127.0.0.1"),
            "{url}: names no address: {error}"
        );
    }
    assert!(
        receiver.received().is_empty(),
        "nothing reached the receiver"
    );
}

async fn a_replica_killed_mid_delivery_loses_nothing(backend: Backend) {
    let db = TestDb::fresh(backend).await;
    let receiver = Receiver::start().await;
    // Attempts outlast their 1 s deadline, so some are in flight when the replica dies.
    receiver.answer(Answer::Slowly(Duration::from_secs(3)));
    let flags = [
        "--webhook-allow-http",
        "--webhook-allow-private-networks",
        "--webhook-timeout",
        "1s",
        "--webhook-poll",
        "100ms",
        "--webhook-retry-schedule",
        "200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms",
    ];
    let first = Server::start(&db.url, &flags).await;
    let key = first.first_key();
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("http://{}/v1/webhook_endpoints", first.http_addr))
        .bearer_auth(&key)
        .json(&json!({"name": "n", "url": receiver.url("hook"), "event_types": ["batch.created", "batch.in_progress"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(created["id"].is_string(), "{created}");
    let mut client = first.client(&key).await;
    let mut worker = first.worker(&key).await;
    let mut want = Vec::new();
    for _ in 0..10 {
        let id = create(&mut client).await.id;
        move_through(&mut worker, &id, &[pb::BatchStatus::InProgress]).await;
        want.push(("batch.created", id.clone()));
        want.push(("batch.in_progress", id));
    }
    eventually(Duration::from_secs(10), "attempts in flight", || async {
        !receiver.received().is_empty()
    })
    .await;
    first.signal("KILL");
    drop(first);
    receiver.answer(Answer::Status(200));
    let _second = Server::start(&db.url, &flags).await;
    let want: BTreeSet<(String, String)> = want
        .iter()
        .map(|(kind, id)| ((*kind).to_owned(), id.clone()))
        .collect();
    eventually(Duration::from_secs(40), "every event delivered", || async {
        kinds(&receiver.delivered("hook")) == want
    })
    .await;
    // Duplicates only as attempts of one event: every request's id is an event id
    // whose body is always the same.
    let delivered = receiver.delivered("hook");
    for request in receiver.received() {
        let taken = delivered
            .get(&request.webhook_id)
            .unwrap_or_else(|| panic!("an unknown webhook-id {request:?}"));
        assert_eq!(taken.body, request.body);
    }
}

/// `batchd webhooks ...` over gRPC, against a real server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_endpoints_and_lists_deliveries() {
    let db = TestDb::fresh(Backend::Sqlite).await;
    let receiver = Receiver::start().await;
    let server = Server::start(
        &db.url,
        &[
            "--webhook-allow-http",
            "--webhook-allow-private-networks",
            "--webhook-poll",
            "100ms",
        ],
    )
    .await;
    let key = server.first_key();
    let grpc = format!("http://{}", server.grpc_addr);
    let cli = |args: &[&str]| {
        let mut all = vec!["webhooks"];
        all.extend_from_slice(args);
        all.extend(["--server", &grpc, "--api-key", &key]);
        let all: Vec<String> = all.into_iter().map(str::to_owned).collect();
        let url = db.url.clone();
        async move {
            let args: Vec<&str> = all.iter().map(String::as_str).collect();
            crate::process::run(&args, &url).await
        }
    };
    let hook = receiver.url("cli");
    let (code, out, err) = cli(&[
        "create",
        "--name",
        "ops",
        "--url",
        &hook,
        "--event-types",
        "batch.created,batch.cancelling",
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let secret = out.lines().last().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{out}");
    let endpoint = out
        .split_whitespace()
        .find(|w| w.starts_with("we_"))
        .unwrap()
        .to_owned();

    let (code, out, _) = cli(&["list"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains(&endpoint)
            && out.contains("[batch.created,batch.cancelling]")
            && out.contains("enabled"),
        "{out}"
    );

    let (code, out, err) = cli(&["test", &endpoint]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("answered 200"), "{out}");
    let sample = receiver.delivered("cli").into_values().next().unwrap();
    assert!(sample.verifies_with(&secret));

    let batch = create(&mut server.client(&key).await).await.id;
    eventually(Duration::from_secs(20), "the delivery", || async {
        receiver.delivered("cli").len() == 2
    })
    .await;
    let (code, out, _) = cli(&["deliveries", &endpoint]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains(&batch) && out.contains("batch.created") && out.contains("delivered"),
        "{out}"
    );

    let (code, out, _) = cli(&["rotate", &endpoint, "--keep-old-secret"]).await;
    assert_eq!(code, 0);
    assert!(
        out.lines().last().unwrap().starts_with("whsec_") && out.contains("24 hours"),
        "{out}"
    );

    let (code, _, err) = cli(&["delete", "we_000000000000000000000000"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no webhook endpoint found"), "{err}");
    let (code, _, err) = cli(&[
        "create",
        "--name",
        "x",
        "--url",
        "ftp://a/",
        "--event-types",
        "batch.created",
    ])
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("url"), "{err}");
    let (code, out, _) = cli(&["delete", &endpoint]).await;
    assert_eq!(code, 0, "{out}");
    let (_, out, _) = cli(&["list"]).await;
    assert!(out.trim().is_empty(), "{out}");
}

async fn retry_after_is_honoured_redirects_are_not_followed_and_long_failure_disables(
    backend: Backend,
) {
    let app = TestApp::spawn_with(backend, |options| {
        reach_local_receivers(options);
        options.webhooks.disable_after = Duration::from_secs(2);
    })
    .await;
    let receiver = Receiver::start().await;
    let alice = app.key("alice", Scope::Batches).await;
    let rest = app.rest(Some(&alice));
    let (endpoint, _) = create_endpoint(&rest, &receiver.url("hook"), &["batch.created"]).await;
    let mut client = app.client(&alice);

    // Retry-After: 2 outweighs the schedule's 100 ms.
    receiver.answer(Answer::RetryAfter(2));
    create(&mut client).await;
    eventually(Duration::from_secs(20), "the first attempt", || async {
        !receiver.received().is_empty()
    })
    .await;
    receiver.answer(Answer::Status(200));
    let first = std::time::Instant::now();
    eventually(Duration::from_secs(20), "the retry", || async {
        receiver.delivered("hook").len() == 1
    })
    .await;
    assert!(
        first.elapsed() >= Duration::from_millis(1_500),
        "the retry came {:?} after the first attempt",
        first.elapsed()
    );

    // A redirect is an answer like any other, not followed.
    receiver.answer(Answer::Redirect);
    create(&mut client).await;
    eventually(
        Duration::from_secs(20),
        "two redirected attempts",
        || async {
            receiver
                .received()
                .iter()
                .filter(|r| r.answered == 307)
                .count()
                >= 2
        },
    )
    .await;
    assert!(
        receiver.received().iter().all(|r| r.path != "elsewhere"),
        "no redirect was followed"
    );
    let (_, log) = rest
        .get(&format!("/v1/webhook_endpoints/{endpoint}/deliveries"))
        .await;
    assert_eq!(log["data"][0]["last_attempt"]["status_code"], 307, "{log}");

    // Failing for longer than --webhook-disable-after (2 s here) disables it.
    // New events keep attempts coming after the first delivery's retries run out.
    receiver.answer(Answer::Status(500));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, state) = rest.get(&format!("/v1/webhook_endpoints/{endpoint}")).await;
        if state["status"] == "disabled" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not disabled: {state}"
        );
        create(&mut client).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (_, state) = rest.get(&format!("/v1/webhook_endpoints/{endpoint}")).await;
    assert!(
        state["disabled_reason"]
            .as_str()
            .unwrap()
            .contains("failed for more than 2s"),
        "{state}"
    );
}
