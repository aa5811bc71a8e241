//! Issue 25's findings, one regression test each: webhook egress stays inside the
//! destination guard whatever proxy the environment names, endpoints belong to scopes
//! as well as owners, a revoked key's all-owners endpoints stop, one tenant's hanging
//! receivers do not hold up another's deliveries, test deliveries obey the delivery
//! bounds, refusals name rules and not addresses, and change feed cursors reveal
//! nothing of other tenants. Every address in here is loopback: receivers, proxies and
//! "internal services" are the test's own.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use batchd::domain::Scope;
use batchd::proto::batchd::v1 as pb;
use pb::webhook_service_client::WebhookServiceClient;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::Code;

use crate::change_feed::until_the_feed_holds_nothing_back;
use crate::helpers::{
    Backend, Bearer, TestApp, TestDb, assert_status, create, eventually, move_through,
    on_both_stores,
};
use crate::process::{Server, serve_on_random_ports};
use crate::webhooks::{Receiver, create_endpoint, reach_local_receivers};

on_both_stores!(
    an_environment_proxy_never_carries_a_webhook_past_the_guard,
    an_all_owners_endpoint_is_invisible_to_every_scope_but_admin,
    revoking_a_key_stops_its_all_owners_endpoints_and_only_those,
    hanging_receivers_of_one_owner_do_not_hold_up_another_owners_deliveries,
    test_deliveries_obey_the_delivery_bounds,
    refusals_name_the_rule_and_never_an_address,
    feed_cursors_are_opaque_and_bound_to_their_owner,
    a_tenants_catch_up_reads_its_own_changes_only,
);

/// A TCP server that accepts connections, counts them (and the most open at once),
/// and answers each request after `answer_after` (never, for `None`) with `reply`.
struct Listener {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    most_open: Arc<AtomicUsize>,
}

impl Listener {
    async fn start(answer_after: Option<Duration>, reply: &'static str) -> Listener {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let most_open = Arc::new(AtomicUsize::new(0));
        let (counted, open_now, most) = (accepted.clone(), open.clone(), most_open.clone());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let now = open_now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                let open_now = open_now.clone();
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 64 * 1024];
                    let _ = socket.read(&mut buffer).await;
                    match answer_after {
                        Some(wait) => {
                            tokio::time::sleep(wait).await;
                            let _ = socket.write_all(reply.as_bytes()).await;
                            let _ = socket.shutdown().await;
                        }
                        // Bounded all the same: the test ends long before.
                        None => tokio::time::sleep(Duration::from_secs(120)).await,
                    }
                    open_now.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Listener {
            addr,
            accepted,
            most_open,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Whether `receiver` took an event of batch `batch_id` at `path`.
fn delivered_batch(receiver: &Receiver, path: &str, batch_id: &str) -> bool {
    receiver
        .delivered(path)
        .values()
        .any(|r| r.event()["data"]["id"] == batch_id)
}

const INTERNAL_SECRET: &str = "INTERNAL-SERVICE-SECRET-7731";

/// An "internal service" answering 500 with a body a tenant must never read.
fn internal_reply() -> &'static str {
    "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ncontent-length: 28\r\nconnection: close\r\n\r\nINTERNAL-SERVICE-SECRET-7731"
}

const PROXY_REPLY: &str = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

async fn http_post(http: &reqwest::Client, url: String, key: &str, body: Value) -> (u16, Value) {
    let response = http
        .post(url)
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Finding 1: with `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY` set, a webhook still goes
/// straight to the address the guard checked, never to the proxy: a name saved while
/// private networks were allowed is refused once they are not, and when they are, the
/// request reaches the receiver directly. A receiver's body never reaches the tenant.
async fn an_environment_proxy_never_carries_a_webhook_past_the_guard(backend: Backend) {
    let db = TestDb::fresh(backend).await;
    let internal = Listener::start(Some(Duration::ZERO), internal_reply()).await;
    let proxy = Listener::start(Some(Duration::ZERO), PROXY_REPLY).await;
    let proxy_url = format!("http://{}", proxy.addr);
    let serve = |flags: &[&str]| {
        let mut command = serve_on_random_ports(&db.url, &[]);
        command.args(flags);
        for name in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        ] {
            command.env(name, &proxy_url);
        }
        command.env_remove("NO_PROXY").env_remove("no_proxy");
        Server::spawn(command)
    };
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    // Saved while private networks were allowed: `localhost` stands in for a name
    // that rebound to an internal address since.
    let open = serve(&["--webhook-allow-http", "--webhook-allow-private-networks"]).await;
    let key = open.first_key();
    let url = format!("http://localhost:{}/hook", internal.addr.port());
    let (status, created) = http_post(
        &http,
        format!("http://{}/v1/webhook_endpoints", open.http_addr),
        &key,
        json!({"name": "internal", "url": url, "event_types": ["batch.completed"]}),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    // Allowed here: it goes to the receiver itself, not to the proxy, and the
    // receiver's body is not relayed.
    let (status, body) = http_post(
        &http,
        format!("http://{}/v1/webhook_endpoints/{id}/test", open.http_addr),
        &key,
        json!({"event_type": "batch.completed"}),
    )
    .await;
    assert_eq!(status, 409, "the receiver answered 500: {body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("answered 500"), "{message}");
    assert!(!message.contains(INTERNAL_SECRET), "{message}");
    assert_eq!(internal.accepted(), 1, "straight to the receiver");
    assert_eq!(proxy.accepted(), 0, "never through the proxy");
    drop(open);

    // Restarted without private networks: refused, with the proxy still in the
    // environment, and neither the proxy nor the internal service hears of it.
    let guarded = serve(&["--webhook-allow-http"]).await;
    let (status, body) = http_post(
        &http,
        format!(
            "http://{}/v1/webhook_endpoints/{id}/test",
            guarded.http_addr
        ),
        &key,
        json!({"event_type": "batch.completed"}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("does not resolve to a public address"),
        "{message}"
    );
    assert!(
        !message.contains("127.0.0.1") && !message.contains("::1"),
        "{message}"
    );
    // The same over gRPC.
    let mut grpc = WebhookServiceClient::with_interceptor(
        tonic::transport::Channel::from_shared(format!("http://{}", guarded.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
        Bearer(Some(key.clone())),
    );
    let refused = grpc
        .test_webhook_endpoint(pb::TestWebhookEndpointRequest {
            webhook_endpoint_id: id.clone(),
            event_type: "batch.completed".into(),
        })
        .await;
    assert_status(
        refused,
        Code::FailedPrecondition,
        "does not resolve to a public address",
    );
    // And a real delivery's record says the same, naming no address.
    let mut client = guarded.client(&key).await;
    let mut worker = guarded.worker(&key).await;
    let batch = create(&mut client).await;
    move_through(
        &mut worker,
        &batch.id,
        &[
            pb::BatchStatus::InProgress,
            pb::BatchStatus::Finalizing,
            pb::BatchStatus::Completed,
        ],
    )
    .await;
    let deliveries_url = format!(
        "http://{}/v1/webhook_endpoints/{id}/deliveries",
        guarded.http_addr
    );
    let latest_delivery = || async {
        let page: Value = http
            .get(&deliveries_url)
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        page["data"][0].clone()
    };
    eventually(
        Duration::from_secs(15),
        "the delivery's first attempt",
        || async { latest_delivery().await["last_attempt"]["error"].is_string() },
    )
    .await;
    let record = latest_delivery().await;
    let error = record["last_attempt"]["error"].as_str().unwrap();
    assert!(
        error.contains("does not resolve to a public address"),
        "{record}"
    );
    assert!(
        !error.contains("127.0.0.1") && !error.contains("::1"),
        "{record}"
    );
    assert_eq!(
        internal.accepted(),
        1,
        "the internal service heard nothing more"
    );
    assert_eq!(proxy.accepted(), 0, "the proxy heard nothing");
}

fn webhooks_client(
    app: &TestApp,
    key: &str,
) -> WebhookServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
> {
    WebhookServiceClient::with_interceptor(app.channel(), Bearer(Some(key.to_owned())))
}

/// Finding 2: a `batches` key whose user id is the admin key's neither sees nor
/// changes the admin's all-owners endpoint, over REST and gRPC, nor uses up the
/// admin's endpoint limit.
async fn an_all_owners_endpoint_is_invisible_to_every_scope_but_admin(backend: Backend) {
    let app = TestApp::spawn_with(backend, |options| {
        reach_local_receivers(options);
        // One of each kind: the impostor's own endpoint does not use up the admin's.
        options.webhooks.max_endpoints_per_owner = 1;
    })
    .await;
    let receiver = Receiver::start().await;
    // The first admin key's user is `admin`: the same user id, another scope. Its own
    // endpoint comes first and does not use up the admin's limit.
    let impostor_key = app.key("admin", Scope::Batches).await;
    let impostor = app.rest(Some(&impostor_key));
    let (own, _) = create_endpoint(&impostor, &receiver.url("own"), &["batch.completed"]).await;
    let admin = app.rest(Some(&app.admin_key));
    let (everyones, _) = create_endpoint(&admin, &receiver.url("all"), &["batch.completed"]).await;

    let (status, page) = impostor.get("/v1/webhook_endpoints").await;
    assert_eq!(status, 200, "{page}");
    let listed: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [own.as_str()], "its own endpoint only");
    let path = format!("/v1/webhook_endpoints/{everyones}");
    for (method, suffix, body) in [
        (reqwest::Method::GET, "", None),
        (
            reqwest::Method::POST,
            "",
            Some(json!({"url": receiver.url("stolen")})),
        ),
        (reqwest::Method::POST, "/rotate_secret", Some(json!({}))),
        (
            reqwest::Method::POST,
            "/test",
            Some(json!({"event_type": "batch.completed"})),
        ),
        (reqwest::Method::GET, "/deliveries", None),
        (reqwest::Method::DELETE, "", None),
    ] {
        let mut request = impostor.request(method.clone(), &format!("{path}{suffix}"));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let (status, answer) = crate::helpers::Rest::send(request).await;
        assert_eq!(status, 404, "{method} {suffix}: {answer}");
    }
    let mut grpc = webhooks_client(&app, &impostor_key);
    let listed = grpc
        .list_webhook_endpoints(pb::ListWebhookEndpointsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .data
            .iter()
            .map(|e| e.id.as_str())
            .collect::<Vec<_>>(),
        [own.as_str()]
    );
    assert_status(
        grpc.get_webhook_endpoint(pb::GetWebhookEndpointRequest {
            webhook_endpoint_id: everyones.clone(),
        })
        .await,
        Code::NotFound,
        "no webhook endpoint",
    );
    assert_status(
        grpc.update_webhook_endpoint(pb::UpdateWebhookEndpointRequest {
            webhook_endpoint_id: everyones.clone(),
            url: Some(receiver.url("stolen")),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "no webhook endpoint",
    );
    // Untouched, and the admin still sees both.
    let (status, endpoint) = admin.get(&path).await;
    assert_eq!(status, 200);
    assert_eq!(endpoint["url"], receiver.url("all"));
    let (_, page) = admin.get("/v1/webhook_endpoints").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
}

/// Finding 3: revoking the key that configured an all-owners endpoint disables it
/// (`key revoked`) and nothing more reaches it; an owner's own endpoint goes on; the
/// revoked key, still remembered by the cache, cannot enable it again; another admin
/// key can.
async fn revoking_a_key_stops_its_all_owners_endpoints_and_only_those(backend: Backend) {
    let app = TestApp::spawn_with(backend, |options| {
        reach_local_receivers(options);
        // The revoked key stays valid in the cache for the whole test.
        options.caches.api_key_ttl = Duration::from_secs(600);
    })
    .await;
    let receiver = Receiver::start().await;
    let service = app.app.as_ref().unwrap().service().clone();
    let (ops, ops_secret) = service.create_api_key("ops", Scope::Admin).await.unwrap();
    let (alice, alice_secret) = service
        .create_api_key("alice", Scope::Batches)
        .await
        .unwrap();
    let ops_rest = app.rest(Some(ops_secret.expose()));
    let alice_rest = app.rest(Some(alice_secret.expose()));
    let (everyones, _) = create_endpoint(&ops_rest, &receiver.url("all"), &["batch.created"]).await;
    let (alices, _) =
        create_endpoint(&alice_rest, &receiver.url("alice"), &["batch.created"]).await;
    service.revoke_api_key(&ops.id).await.unwrap();
    service.revoke_api_key(&alice.id).await.unwrap();

    let admin = app.rest(Some(&app.admin_key));
    let (_, endpoint) = admin
        .get(&format!("/v1/webhook_endpoints/{everyones}"))
        .await;
    assert_eq!(endpoint["status"], "disabled", "{endpoint}");
    assert_eq!(endpoint["disabled_reason"], "key revoked", "{endpoint}");
    let (_, endpoint) = admin.get(&format!("/v1/webhook_endpoints/{alices}")).await;
    assert_eq!(
        endpoint["status"], "enabled",
        "an owner's endpoint is the owner's: {endpoint}"
    );

    // Still cached as valid, the revoked key cannot enable it again.
    let (status, body) = ops_rest
        .post(
            &format!("/v1/webhook_endpoints/{everyones}"),
            json!({"name": "back"}),
        )
        .await;
    assert_eq!(status, 401, "{body}");
    // The same over gRPC, where the endpoint shows why it stopped.
    assert_status(
        webhooks_client(&app, ops_secret.expose())
            .rotate_webhook_secret(pb::RotateWebhookSecretRequest {
                webhook_endpoint_id: everyones.clone(),
                ..Default::default()
            })
            .await,
        Code::Unauthenticated,
        "revoked",
    );
    let shown = webhooks_client(&app, &app.admin_key)
        .get_webhook_endpoint(pb::GetWebhookEndpointRequest {
            webhook_endpoint_id: everyones.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        shown.disabled_reason.as_deref(),
        Some("key revoked"),
        "{shown:?}"
    );

    // Alice's batches, from another key of hers.
    let mut client = app.client(&app.key("alice", Scope::Batches).await);
    let first = create(&mut client).await;
    eventually(
        Duration::from_secs(10),
        "alice's endpoint gets the event",
        || async { !receiver.delivered("alice").is_empty() },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        receiver.delivered("all").is_empty(),
        "nothing for the revoked key's endpoint"
    );

    // Another admin key takes it over.
    let (status, body) = admin
        .post(
            &format!("/v1/webhook_endpoints/{everyones}"),
            json!({"name": "taken over"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "enabled", "{body}");
    let second = create(&mut client).await;
    eventually(
        Duration::from_secs(10),
        "the endpoint delivers again",
        || async { delivered_batch(&receiver, "all", &second.id) },
    )
    .await;
    assert!(
        !delivered_batch(&receiver, "all", &first.id),
        "what happened while it was disabled is not sent"
    );
}

/// Finding 4: 20 endpoints of one owner whose receiver never answers, with 20 batches
/// each, hold up another owner's delivery by at most one claim, not by the hanging
/// attempts' timeouts.
async fn hanging_receivers_of_one_owner_do_not_hold_up_another_owners_deliveries(backend: Backend) {
    let app = TestApp::spawn_with(backend, |options| {
        reach_local_receivers(options);
        options.webhooks.attempt_timeout = Duration::from_secs(5);
    })
    .await;
    let hanging = Listener::start(None, "").await;
    let receiver = Receiver::start().await;
    let mallory_key = app.key("mallory", Scope::Batches).await;
    let mallory = app.rest(Some(&mallory_key));
    for _ in 0..20 {
        create_endpoint(
            &mallory,
            &format!("http://{}/hang", hanging.addr),
            &["batch.created"],
        )
        .await;
    }
    let alice_key = app.key("alice", Scope::Batches).await;
    create_endpoint(
        &app.rest(Some(&alice_key)),
        &receiver.url("alice"),
        &["batch.created"],
    )
    .await;
    let mut mallorys = app.client(&mallory_key);
    for _ in 0..20 {
        create(&mut mallorys).await;
    }
    eventually(
        Duration::from_secs(10),
        "the hanging receiver is busy",
        || async { hanging.accepted() >= 16 },
    )
    .await;
    let mut alices = app.client(&alice_key);
    for round in 0..2 {
        let started = Instant::now();
        let batch = create(&mut alices).await;
        eventually(Duration::from_secs(20), "alice's delivery", || async {
            delivered_batch(&receiver, "alice", &batch.id)
        })
        .await;
        let took = started.elapsed();
        assert!(
            took <= Duration::from_secs(3),
            "round {round}: alice's delivery took {took:?} behind mallory's hanging receivers"
        );
    }
}

/// Finding 5: test deliveries go through the per-endpoint and per-owner bounds: 30
/// at once open at most the endpoint's share of connections, and the rest are told
/// 429 with Retry-After (RESOURCE_EXHAUSTED over gRPC).
async fn test_deliveries_obey_the_delivery_bounds(backend: Backend) {
    let app = TestApp::spawn_with(backend, |options| {
        reach_local_receivers(options);
        options.webhooks.attempt_timeout = Duration::from_secs(5);
        options.webhooks.concurrency_per_endpoint = 4;
        options.webhooks.concurrency_per_owner = 6;
    })
    .await;
    let slow = Listener::start(
        Some(Duration::from_secs(3)),
        "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await;
    let key = app.key("alice", Scope::Batches).await;
    let rest = app.rest(Some(&key));
    let url = format!("http://{}/hook", slow.addr);
    let (first, _) = create_endpoint(&rest, &url, &["batch.completed"]).await;
    let (second, _) = create_endpoint(&rest, &url, &["batch.completed"]).await;
    let mut tests = tokio::task::JoinSet::new();
    for i in 0..30 {
        let endpoint = if i % 2 == 0 { &first } else { &second };
        let request = rest
            .request(
                reqwest::Method::POST,
                &format!("/v1/webhook_endpoints/{endpoint}/test"),
            )
            .json(&json!({"event_type": "batch.completed"}));
        tests.spawn(async move {
            let response = request.send().await.unwrap();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            (response.status().as_u16(), retry_after)
        });
    }
    let mut answers = Vec::new();
    while let Some(answer) = tests.join_next().await {
        answers.push(answer.unwrap());
    }
    let sent = answers.iter().filter(|(status, _)| *status == 200).count();
    let busy: Vec<_> = answers
        .iter()
        .filter(|(status, _)| *status == 429)
        .collect();
    assert_eq!(sent + busy.len(), 30, "{answers:?}");
    assert!((1..=6).contains(&sent), "{answers:?}");
    assert!(
        busy.iter().all(|(_, retry)| retry.as_deref() == Some("5")),
        "{answers:?}"
    );
    assert!(
        slow.most_open.load(Ordering::SeqCst) <= 6,
        "the owner's share of connections at most, saw {}",
        slow.most_open.load(Ordering::SeqCst)
    );
    // gRPC says the same while the endpoint is busy.
    let mut grpc = webhooks_client(&app, &key);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut grpc = grpc.clone();
        let id = first.clone();
        calls.spawn(async move {
            grpc.test_webhook_endpoint(pb::TestWebhookEndpointRequest {
                webhook_endpoint_id: id,
                event_type: "batch.completed".into(),
            })
            .await
        });
    }
    let mut exhausted = 0;
    while let Some(call) = calls.join_next().await {
        if let Err(status) = call.unwrap() {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert_eq!(status.metadata().get("retry-after").unwrap(), "5");
            exhausted += 1;
        }
    }
    assert!(
        exhausted >= 4,
        "{exhausted} of 8 refused beyond the endpoint's 4"
    );
    let _ = grpc
        .list_webhook_event_types(pb::ListWebhookEventTypesRequest::default())
        .await
        .unwrap();
}

/// Finding 6: a refused destination is named by the rule it breaks, never by the
/// address a name resolved to or the kind of network it is in.
async fn refusals_name_the_rule_and_never_an_address(backend: Backend) {
    let app = TestApp::spawn_with(backend, |options| {
        options.webhooks.policy.allow_http = true;
    })
    .await;
    let rest = app.rest(Some(&app.admin_key));
    for (url, hidden) in [
        ("https://localhost/hook", "127.0.0.1"),
        ("http://localhost:9/hook", "::1"),
        ("https://[::ffff:127.0.0.1]/hook", "127.0.0.1"),
        ("https://[2002:7f00:1::1]/hook", "2002"),
        ("https://[64:ff9b:1::7f00:1]/hook", "64:ff9b"),
    ] {
        let (status, body) = rest
            .post(
                "/v1/webhook_endpoints",
                json!({"name": "n", "url": url, "event_types": ["batch.completed"]}),
            )
            .await;
        assert_eq!(status, 400, "{url}: {body}");
        assert_eq!(body["error"]["param"], "url", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("public address"), "{url}: {message}");
        for leak in [hidden, "private", "loopback", "resolves to"] {
            assert!(!message.contains(leak), "{url}: {message} names `{leak}`");
        }
    }
    let mut grpc = webhooks_client(&app, &app.admin_key);
    let refused = grpc
        .create_webhook_endpoint(pb::CreateWebhookEndpointRequest {
            name: "n".into(),
            url: "https://localhost/hook".into(),
            event_types: vec!["batch.completed".into()],
        })
        .await;
    assert_status(
        refused,
        Code::InvalidArgument,
        "does not resolve to a public address",
    );
}

/// Finding 7: the feed's cursors are sealed (one length, new every time, nothing of the
/// feed's position in them), a cursor opens only for the owner it was sent to, and
/// neither an error nor a bookmark moves with another tenant's writes.
async fn feed_cursors_are_opaque_and_bound_to_their_owner(backend: Backend) {
    let app = TestApp::spawn_with(backend, |options| {
        options.watch.heartbeat = Duration::from_millis(100);
    })
    .await;
    let alice_key = app.key("alice", Scope::Batches).await;
    let bob_key = app.key("bob", Scope::Batches).await;
    let mut alice = app.client(&alice_key);
    let mut bob = app.client(&bob_key);
    create(&mut alice).await;
    // Her feed starts past that batch, so that the resume below hears only of the next.
    until_the_feed_holds_nothing_back(&app.db.url).await;
    let mut stream = alice
        .watch_batches(pb::WatchBatchesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut cursors = Vec::new();
    while cursors.len() < 6 {
        let message = stream.message().await.unwrap().unwrap();
        cursors.push(message.cursor);
        // Bob writes between alice's bookmarks.
        create(&mut bob).await;
    }
    let length = cursors[0].len();
    for cursor in &cursors {
        assert!(cursor.starts_with("fc_"), "{cursor}");
        assert_eq!(cursor.len(), length, "one length: {cursors:?}");
        assert!(!cursor.contains('.'), "{cursor}");
    }
    let distinct: std::collections::BTreeSet<_> = cursors.iter().collect();
    assert_eq!(distinct.len(), cursors.len(), "every cursor looks new");

    // Alice's cursor is no cursor of bob's, and names nothing when refused.
    let alices = cursors.last().unwrap().clone();
    let refused = bob
        .watch_batches(pb::WatchBatchesRequest {
            after_cursor: Some(alices.clone()),
            ..Default::default()
        })
        .await;
    assert_status(
        refused,
        Code::InvalidArgument,
        "not a change feed cursor of this API key",
    );
    let (status, body) = crate::helpers::Rest::send(
        app.rest(Some(&bob_key))
            .request(reqwest::Method::GET, "/v1/batch_events")
            .header("Last-Event-ID", &alices),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "Last-Event-ID");
    // Her own resumes, over SSE too.
    let response = app
        .rest(Some(&alice_key))
        .request(reqwest::Method::GET, "/v1/batch_events")
        .header("Last-Event-ID", &alices)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    drop(response);
    let mut resumed = alice
        .watch_batches(pb::WatchBatchesRequest {
            after_cursor: Some(alices),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mine = create(&mut alice).await;
    loop {
        let message = resumed.message().await.unwrap().unwrap();
        if let Some(batch) = message.batch {
            assert_eq!(batch.id, mine.id, "only alice's batches");
            break;
        }
    }
}

/// Finding 8: a tenant's catch-up from an old cursor reads its own changes from the
/// store, in order and complete, with none of another tenant's in between.
async fn a_tenants_catch_up_reads_its_own_changes_only(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let alice_key = app.key("alice", Scope::Batches).await;
    let bob_key = app.key("bob", Scope::Batches).await;
    let mut alice = app.client(&alice_key);
    let mut bob = app.client(&bob_key);
    let store = app.store().await;
    let start = store.feed_bounds().await.unwrap().head;
    let mut alices = Vec::new();
    for i in 0..30 {
        create(&mut bob).await;
        if i % 10 == 0 {
            alices.push(create(&mut alice).await.id);
        }
    }
    // On PostgreSQL the feed reads below the server's oldest running transaction,
    // which another test's may hold back for a moment: read until it has passed.
    let read_alices = || async {
        let mut read = Vec::new();
        let mut after = start;
        loop {
            let page = store.changes_after(after, Some("alice"), 2).await.unwrap();
            for change in &page.changes {
                assert_eq!(change.batch.user_id, "alice");
                read.push(change.batch.id.as_str().to_owned());
            }
            after = page.next;
            if page.changes.len() < 2 {
                return read;
            }
        }
    };
    eventually(
        Duration::from_secs(10),
        "every change of alice's readable",
        || async { read_alices().await.len() >= alices.len() },
    )
    .await;
    assert_eq!(
        read_alices().await,
        alices,
        "alice's changes, in order, each once"
    );
    eventually(
        Duration::from_secs(10),
        "every tenant's 33 changes",
        || async {
            store
                .changes_after(start, None, 1_000)
                .await
                .unwrap()
                .changes
                .len()
                == 33
        },
    )
    .await;
    // Through the feed: a resume as alice from before everything sends hers only.
    let bookmark = app
        .app
        .as_ref()
        .unwrap()
        .hub()
        .cursor_sealer()
        .seal(start, Some("alice"));
    let mut stream = alice
        .watch_batches(pb::WatchBatchesRequest {
            after_cursor: Some(bookmark),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < alices.len() {
        let message = stream.message().await.unwrap().unwrap();
        if let Some(batch) = message.batch {
            seen.push(batch.id);
        }
    }
    assert_eq!(seen, alices);
}
