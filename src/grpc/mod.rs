//! The gRPC transport: tonic handlers that authenticate, convert, call the
//! [`BatchService`](crate::service::BatchService) and convert back. No business rule
//! lives here.

mod batch_api;
mod convert;
mod shared_encoding;
mod webhook_api;
mod worker_api;

use std::sync::Arc;

use tonic::Request;
use tonic::service::Routes;
use tonic_health::server::HealthReporter;

use crate::domain::Caller;
use crate::error::{Error, Result};
use crate::proto::batchd::v1::batch_service_server::BatchServiceServer;
use crate::proto::batchd::v1::batch_worker_service_server::BatchWorkerServiceServer;
use crate::proto::batchd::v1::webhook_service_server::WebhookServiceServer;
use crate::service::{BatchService, bearer_token};
use crate::webhooks::service::WebhookService;

pub use batch_api::BatchApi;
pub use webhook_api::WebhookApi;
pub use worker_api::WorkerApi;

/// The names health is reported under besides `""`: every service batchd serves.
pub const SERVICE_NAMES: [&str; 3] = [
    <BatchServiceServer<BatchApi> as tonic::server::NamedService>::NAME,
    <BatchWorkerServiceServer<WorkerApi> as tonic::server::NamedService>::NAME,
    <WebhookServiceServer<WebhookApi> as tonic::server::NamedService>::NAME,
];

/// The health service name that is SERVING as long as the process runs, whatever the
/// database does: what liveness probes check, so that a database outage makes replicas
/// unready but never gets them restarted.
pub const LIVENESS: &str = "liveness";

/// The descriptors of every service batchd serves (its own, health, reflection): the
/// metrics name exactly their RPCs.
pub const FILE_DESCRIPTOR_SETS: [&[u8]; 4] = [
    crate::proto::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

/// Every gRPC service of batchd: the three APIs, health and reflection.
pub fn routes(
    service: Arc<BatchService>,
    webhooks: Arc<WebhookService>,
) -> Result<(Routes, HealthReporter)> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // Reflection describes itself without being told. Both versions are served:
    // grpcurl and current tools speak v1; grpcio's Python client, Postman, grpcui and
    // older grpcurl builds speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_error = |e| Error::Internal(format!("reflection service: {e}"));
    let reflection_v1 = reflection().build_v1().map_err(reflection_error)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;
    let routes = Routes::new(BatchServiceServer::new(BatchApi::new(service.clone())))
        .add_service(BatchWorkerServiceServer::new(WorkerApi::new(
            service.clone(),
        )))
        .add_service(WebhookServiceServer::new(WebhookApi::new(
            service, webhooks,
        )))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok((routes, health_reporter))
}

/// Admits a request by the `authorization` metadata: its caller, if the key is valid
/// and within its request rate.
async fn caller<T>(service: &BatchService, request: &Request<T>) -> Result<Caller> {
    let token = match request.metadata().get("authorization") {
        None => None,
        Some(value) => Some(bearer_token(value.to_str().map_err(|_| {
            Error::Unauthenticated("malformed authorization: not ASCII")
        })?)?),
    };
    match service.admit(token).await {
        Ok(admitted) => Ok(admitted.caller),
        Err(refused) => {
            if refused.budget.is_some() {
                metrics::counter!("batchd_rate_limited_total", "transport" => "grpc").increment(1);
            }
            Err(refused.error)
        }
    }
}
