//! gRPC health, reflection and the HTTP probes.

use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::helpers::*;

const SERVICES: [&str; 4] = [
    "",
    "batchd.v1.BatchService",
    "batchd.v1.BatchWorkerService",
    "batchd.v1.WebhookService",
];

async fn health_is_serving_for_every_service_while_the_database_answers(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let health = HealthClient::new(app.channel());
    for service in SERVICES {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        eventually(Duration::from_secs(5), "SERVING", || {
            let mut health = health.clone();
            let request = request.clone();
            async move {
                health
                    .check(request)
                    .await
                    .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
            }
        })
        .await;
    }

    for probe in ["healthz", "readyz"] {
        let response = reqwest::get(format!("http://{}/{probe}", app.http_addr)).await;
        assert_eq!(response.unwrap().status(), 200, "/{probe}");
    }
}

async fn reflection_lists_the_services_so_grpcurl_needs_no_proto(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut reflection = ServerReflectionClient::new(app.channel());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "batchd.v1.BatchService",
        "batchd.v1.BatchWorkerService",
        "batchd.v1.WebhookService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not in {names:?}"
        );
    }
    // The descriptor of the contract resolves, imports included.
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "batchd.v1.BatchService".into(),
        )),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().expect("one response");
    assert!(
        matches!(response.message_response, Some(MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
        "{response:?}"
    );
}

/// `batchd health`, what the chart's `helm test` pod runs, checks a server's health.
async fn the_health_command_reports_serving_and_fails_otherwise(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let server = format!("http://{}", app.grpc_addr());
    for service in ["", "liveness", "batchd.v1.BatchService"] {
        let (code, stdout, stderr) = crate::process::run(
            &["health", "--server", &server, "--service", service],
            "unused://",
        )
        .await;
        assert_eq!(code, 0, "{service:?}: {stdout}{stderr}");
        assert!(stdout.contains("SERVING"), "{stdout}");
    }
    let (code, _, stderr) = crate::process::run(
        &["health", "--server", &server, "--service", "nope"],
        "unused://",
    )
    .await;
    assert_eq!(code, 1);
    assert!(stderr.contains("health check"), "{stderr}");
    let (code, _, stderr) = crate::process::run(
        &[
            "health",
            "--server",
            "http://127.0.0.1:1",
            "--timeout",
            "1s",
        ],
        "unused://",
    )
    .await;
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot reach"), "{stderr}");
}

/// Older tools (grpcio's Python client, Postman, grpcui, older grpcurl builds) speak
/// only `grpc.reflection.v1alpha`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1alpha_is_served_too() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let app = TestApp::spawn(Backend::Sqlite).await;
    let mut reflection = ServerReflectionClient::new(app.channel());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let response = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1alpha is served")
        .into_inner()
        .message()
        .await
        .unwrap()
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "batchd.v1.BatchService"),
        "{names:?}"
    );
}

on_both_stores!(
    the_health_command_reports_serving_and_fails_otherwise,
    health_is_serving_for_every_service_while_the_database_answers,
    reflection_lists_the_services_so_grpcurl_needs_no_proto,
);

/// PostgreSQL only: a database that goes away turns health to NOT_SERVING, which the
/// health `Watch` stream reports, and `/readyz` to 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_health_goes_not_serving_when_the_database_disappears() {
    let app = TestApp::spawn_with(Backend::Postgres, |o| {
        o.health_check_interval = Duration::from_millis(200);
        o.store.acquire_timeout = Duration::from_millis(500);
    })
    .await;
    let mut health = HealthClient::new(app.channel());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "batchd.v1.BatchService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    app.db.drop_postgres_database().await;

    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("health changes within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    // Liveness stays SERVING: an outage must make replicas unready, not restart them.
    let liveness = health
        .check(HealthCheckRequest {
            service: "liveness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(liveness.status, ServingStatus::Serving as i32);
    let readyz = reqwest::get(format!("http://{}/readyz", app.http_addr))
        .await
        .unwrap();
    assert_eq!(readyz.status(), 503);
    // Requests fail fast with UNAVAILABLE rather than hanging or leaking detail.
    let mut client = app.client(&app.admin_key);
    let status = client.create_batch(new_batch()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(!status.message().contains("batchd_test"), "{status:?}");
}
