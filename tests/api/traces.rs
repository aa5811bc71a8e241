//! Traces: a caller's W3C trace context continues through batchd, and the spans are
//! exported over OTLP.

use std::collections::HashSet;
use std::time::Duration;

use batchd::proto::batchd::v1 as pb;

use crate::helpers::*;

/// The OTLP receiver of the trace test: collects every exported span.
mod otlp {
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes;
    use axum::extract::State;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;

    /// A received span: trace id (hex), name, service name.
    pub type Spans = Arc<Mutex<Vec<(String, String, String)>>>;

    pub async fn start() -> (String, Spans) {
        let spans = Spans::default();
        let router = axum::Router::new()
            .route("/v1/traces", axum::routing::post(receive))
            .with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        (url, spans)
    }

    async fn receive(State(spans): State<Spans>, body: Bytes) -> &'static str {
        let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
        let mut spans = spans.lock().unwrap();
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let trace: String = span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                    spans.push((trace, span.name, service.clone()));
                }
            }
        }
        ""
    }
}

/// A caller's W3C trace continues through batchd into its store calls, and the spans
/// are exported over OTLP/HTTP to the standard OTEL_* endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_continue_the_callers_trace_and_are_exported_over_otlp() {
    let (endpoint, spans) = otlp::start().await;
    let db = TestDb::fresh(Backend::Sqlite).await;
    let mut command = crate::process::serve_on_random_ports(&db.url, &[]);
    command
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_SERVICE_NAME", "batchd-under-test")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    let server = crate::process::Server::spawn(command).await;
    let key = server.first_key();
    let batch = create(&mut server.client(&key).await).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let mut request = tonic::Request::new(pb::GetBatchRequest {
        batch_id: batch.id.clone(),
    });
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    server.client(&key).await.get_batch(request).await.unwrap();

    let rest_trace = "0af7651916cd43dd8448eb211c80319c";
    let response = reqwest::Client::new()
        .get(format!(
            "http://{}/v1/batches/{}",
            server.http_addr, batch.id
        ))
        .bearer_auth(&key)
        .header(
            "traceparent",
            format!("00-{rest_trace}-b7ad6b7169203331-01"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let names_in = |trace: &str| -> HashSet<String> {
        spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _, _)| t == trace)
            .map(|(_, name, _)| name.clone())
            .collect()
    };
    eventually(Duration::from_secs(10), "the spans to be exported", || {
        let (grpc, rest) = (names_in(trace_id), names_in(rest_trace));
        async move {
            [
                "batchd.v1.BatchService/GetBatch",
                "authenticate",
                "get_batch",
                "point_reads.get",
            ]
            .iter()
            .all(|n| grpc.contains(*n))
                && ["GET /v1/batches/{batch_id}", "get_batch", "point_reads.get"]
                    .iter()
                    .all(|n| rest.contains(*n))
        }
    })
    .await;
    assert!(
        spans
            .lock()
            .unwrap()
            .iter()
            .all(|(_, _, service)| service.contains("batchd-under-test"))
    );
}
