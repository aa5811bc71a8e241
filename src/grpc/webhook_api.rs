//! `batchd.v1.WebhookService`: OpenAI's webhook endpoint API over gRPC, the same use
//! cases as the REST paths.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::caller;
use crate::domain::webhooks::{Delivery, EndpointInput, WebhookEventType};
use crate::proto::batchd::v1 as pb;
use crate::service::BatchService;
use crate::webhooks::service::{EndpointView, WebhookService};

/// The tonic handler of `WebhookService`.
pub struct WebhookApi {
    /// Authenticates callers.
    batches: Arc<BatchService>,
    webhooks: Arc<WebhookService>,
}

impl WebhookApi {
    /// A handler over the services.
    pub fn new(batches: Arc<BatchService>, webhooks: Arc<WebhookService>) -> Self {
        WebhookApi { batches, webhooks }
    }
}

impl From<EndpointView> for pb::WebhookEndpoint {
    fn from(view: EndpointView) -> pb::WebhookEndpoint {
        let endpoint = view.endpoint;
        let event_types = endpoint
            .settings
            .event_type_names()
            .map(str::to_owned)
            .collect();
        pb::WebhookEndpoint {
            name: endpoint.settings.name,
            url: endpoint.settings.url.to_string(),
            event_types,
            created_at: endpoint.created_at,
            updated_at: endpoint.updated_at,
            signing_secret_hint: view.secret_hint,
            signing_secret: view.new_secret,
            disabled: endpoint.disabled.is_some(),
            disabled_reason: endpoint.disabled.map(|(_, reason)| reason),
            failing_since: endpoint.failing_since,
            id: endpoint.id,
        }
    }
}

fn delivery(delivery: Delivery) -> pb::WebhookDelivery {
    let pending = delivery.state == crate::domain::webhooks::DeliveryState::Pending;
    let last = delivery.last_attempt;
    pb::WebhookDelivery {
        status: delivery.state.as_str().to_owned(),
        attempts: delivery.attempts,
        next_attempt_at_ms: pending.then_some(delivery.next_attempt_at_ms),
        last_attempt_at_ms: last.as_ref().map(|a| a.at_ms),
        last_duration_ms: last.as_ref().map(|a| a.duration_ms),
        last_status_code: last.as_ref().and_then(|a| a.status_code),
        last_error: last.and_then(|a| a.error),
        finished_at_ms: delivery.finished_at_ms,
        id: delivery.queued.id,
        event_id: delivery.queued.event_id,
        event_type: delivery.queued.event_type,
        batch_id: delivery.queued.batch_id,
        created_at: delivery.queued.created_at,
    }
}

#[tonic::async_trait]
impl pb::webhook_service_server::WebhookService for WebhookApi {
    async fn create_webhook_endpoint(
        &self,
        request: Request<pb::CreateWebhookEndpointRequest>,
    ) -> Result<Response<pb::WebhookEndpoint>, Status> {
        let caller = caller(&self.batches, &request).await?;
        let create = request.into_inner();
        let input = EndpointInput {
            name: Some(create.name),
            url: Some(create.url),
            event_types: Some(create.event_types),
        };
        let created = self.webhooks.create_endpoint(&caller, input).await?;
        Ok(Response::new(created.into()))
    }

    async fn get_webhook_endpoint(
        &self,
        request: Request<pb::GetWebhookEndpointRequest>,
    ) -> Result<Response<pb::WebhookEndpoint>, Status> {
        let caller = caller(&self.batches, &request).await?;
        let id = request.into_inner().webhook_endpoint_id;
        let endpoint = self.webhooks.get_endpoint(&caller, &id).await?;
        Ok(Response::new(endpoint.into()))
    }

    async fn list_webhook_endpoints(
        &self,
        request: Request<pb::ListWebhookEndpointsRequest>,
    ) -> Result<Response<pb::ListWebhookEndpointsResponse>, Status> {
        let caller = caller(&self.batches, &request).await?;
        let list = request.into_inner();
        let page = self
            .webhooks
            .list_endpoints(&caller, list.after.as_deref(), list.limit)
            .await?;
        Ok(Response::new(pb::ListWebhookEndpointsResponse {
            data: page.endpoints.into_iter().map(Into::into).collect(),
            has_more: page.has_more,
        }))
    }

    async fn update_webhook_endpoint(
        &self,
        request: Request<pb::UpdateWebhookEndpointRequest>,
    ) -> Result<Response<pb::WebhookEndpoint>, Status> {
        let caller = caller(&self.batches, &request).await?;
        let update = request.into_inner();
        let input = EndpointInput {
            name: update.name,
            url: update.url,
            event_types: update.event_types.map(|types| types.names),
        };
        let endpoint = self
            .webhooks
            .update_endpoint(&caller, &update.webhook_endpoint_id, input)
            .await?;
        Ok(Response::new(endpoint.into()))
    }

    async fn delete_webhook_endpoint(
        &self,
        request: Request<pb::DeleteWebhookEndpointRequest>,
    ) -> Result<Response<pb::DeleteWebhookEndpointResponse>, Status> {
        let caller = caller(&self.batches, &request).await?;
        let id = request.into_inner().webhook_endpoint_id;
        let id = self.webhooks.delete_endpoint(&caller, &id).await?;
        Ok(Response::new(pb::DeleteWebhookEndpointResponse {
            id,
            deleted: true,
        }))
    }

    async fn rotate_webhook_secret(
        &self,
        request: Request<pb::RotateWebhookSecretRequest>,
    ) -> Result<Response<pb::WebhookEndpoint>, Status> {
        let caller = caller(&self.batches, &request).await?;
        let rotate = request.into_inner();
        let rotated = self
            .webhooks
            .rotate_secret(
                &caller,
                &rotate.webhook_endpoint_id,
                rotate.keep_old_secret_active_for_24_hours,
            )
            .await?;
        Ok(Response::new(rotated.into()))
    }

    async fn test_webhook_endpoint(
        &self,
        request: Request<pb::TestWebhookEndpointRequest>,
    ) -> Result<Response<pb::TestWebhookEndpointResponse>, Status> {
        let caller = caller(&self.batches, &request).await?;
        let test = request.into_inner();
        let result = self
            .webhooks
            .test_endpoint(&caller, &test.webhook_endpoint_id, &test.event_type)
            .await?;
        Ok(Response::new(pb::TestWebhookEndpointResponse {
            webhook_endpoint_id: test.webhook_endpoint_id,
            event_type: result.event_type.as_str().to_owned(),
            status_code: i32::from(result.status_code),
        }))
    }

    async fn list_webhook_event_types(
        &self,
        request: Request<pb::ListWebhookEventTypesRequest>,
    ) -> Result<Response<pb::ListWebhookEventTypesResponse>, Status> {
        caller(&self.batches, &request).await?;
        Ok(Response::new(pb::ListWebhookEventTypesResponse {
            event_types: WebhookEventType::ALL
                .iter()
                .map(|kind| kind.as_str().to_owned())
                .collect(),
        }))
    }

    async fn list_webhook_deliveries(
        &self,
        request: Request<pb::ListWebhookDeliveriesRequest>,
    ) -> Result<Response<pb::ListWebhookDeliveriesResponse>, Status> {
        let caller = caller(&self.batches, &request).await?;
        let list = request.into_inner();
        let deliveries = self
            .webhooks
            .list_deliveries(&caller, &list.webhook_endpoint_id, list.limit)
            .await?;
        Ok(Response::new(pb::ListWebhookDeliveriesResponse {
            data: deliveries.into_iter().map(delivery).collect(),
        }))
    }

    async fn retry_webhook_delivery(
        &self,
        request: Request<pb::RetryWebhookDeliveryRequest>,
    ) -> Result<Response<pb::RetryWebhookDeliveryResponse>, Status> {
        let caller = caller(&self.batches, &request).await?;
        let retry = request.into_inner();
        self.webhooks
            .retry_delivery(&caller, &retry.webhook_endpoint_id, &retry.delivery_id)
            .await?;
        Ok(Response::new(pb::RetryWebhookDeliveryResponse {
            delivery_id: retry.delivery_id,
        }))
    }
}
