//! `batchd webhooks`: the key owner's webhook endpoints over gRPC `WebhookService`,
//! one line per endpoint or delivery; secrets are printed once, as the last line.

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::{BearerAuth, authorized_channel};
use crate::config::{ApiArgs, WebhooksCommand};
use crate::proto::batchd::v1::{self as pb, webhook_service_client::WebhookServiceClient};

type Client = WebhookServiceClient<InterceptedService<Channel, BearerAuth>>;

fn client(api: &ApiArgs) -> anyhow::Result<Client> {
    let (channel, auth) = authorized_channel(&api.server, &api.api_key)?;
    Ok(WebhookServiceClient::with_interceptor(channel, auth))
}

/// Runs `batchd webhooks ...`; prints to stdout.
pub async fn run(command: WebhooksCommand) -> anyhow::Result<()> {
    match command {
        WebhooksCommand::Create {
            api,
            name,
            url,
            event_types,
        } => {
            let endpoint = client(&api)?
                .create_webhook_endpoint(pb::CreateWebhookEndpointRequest {
                    name,
                    url,
                    event_types,
                })
                .await?
                .into_inner();
            println!("created webhook endpoint {}", endpoint_line(&endpoint));
            println!("its signing secret is shown only now:");
            println!("{}", endpoint.signing_secret.unwrap_or_default());
        }
        WebhooksCommand::List { api } => {
            let mut client = client(&api)?;
            let mut after = None;
            loop {
                let page = client
                    .list_webhook_endpoints(pb::ListWebhookEndpointsRequest {
                        after: after.take(),
                        limit: Some(100),
                    })
                    .await?
                    .into_inner();
                for endpoint in &page.data {
                    println!("{}", endpoint_line(endpoint));
                }
                match page.data.last() {
                    Some(last) if page.has_more => after = Some(last.id.clone()),
                    _ => break,
                }
            }
        }
        WebhooksCommand::Delete { api, endpoint_id } => {
            client(&api)?
                .delete_webhook_endpoint(pb::DeleteWebhookEndpointRequest {
                    webhook_endpoint_id: endpoint_id.clone(),
                })
                .await?;
            println!("deleted webhook endpoint {endpoint_id}");
        }
        WebhooksCommand::Rotate {
            api,
            endpoint_id,
            keep_old_secret,
        } => {
            let endpoint = client(&api)?
                .rotate_webhook_secret(pb::RotateWebhookSecretRequest {
                    webhook_endpoint_id: endpoint_id,
                    keep_old_secret_active_for_24_hours: keep_old_secret,
                })
                .await?
                .into_inner();
            let overlap = if keep_old_secret {
                "; the old one keeps signing for 24 hours"
            } else {
                ""
            };
            println!(
                "rotated the signing secret of {}{overlap}; the new one is shown only now:",
                endpoint.id
            );
            println!("{}", endpoint.signing_secret.unwrap_or_default());
        }
        WebhooksCommand::Test {
            api,
            endpoint_id,
            event_type,
        } => {
            let result = client(&api)?
                .test_webhook_endpoint(pb::TestWebhookEndpointRequest {
                    webhook_endpoint_id: endpoint_id,
                    event_type,
                })
                .await?
                .into_inner();
            println!(
                "sent a sample {} to {}: it answered {}",
                result.event_type, result.webhook_endpoint_id, result.status_code
            );
        }
        WebhooksCommand::Deliveries {
            api,
            endpoint_id,
            limit,
        } => {
            let deliveries = client(&api)?
                .list_webhook_deliveries(pb::ListWebhookDeliveriesRequest {
                    webhook_endpoint_id: endpoint_id,
                    limit: Some(limit),
                })
                .await?
                .into_inner();
            for delivery in &deliveries.data {
                println!("{}", delivery_line(delivery));
            }
        }
    }
    Ok(())
}

fn endpoint_line(endpoint: &pb::WebhookEndpoint) -> String {
    let state = match (&endpoint.disabled, &endpoint.disabled_reason) {
        (true, Some(reason)) => format!("disabled ({reason})"),
        (true, None) => "disabled".to_owned(),
        (false, _) if endpoint.failing_since.is_some() => "failing".to_owned(),
        (false, _) => "enabled".to_owned(),
    };
    format!(
        "{}  {}  {}  [{}]  {}",
        endpoint.id,
        endpoint.name,
        endpoint.url,
        endpoint.event_types.join(","),
        state
    )
}

fn delivery_line(delivery: &pb::WebhookDelivery) -> String {
    let last = match (delivery.last_status_code, &delivery.last_error) {
        (Some(code), _) if delivery.status == "delivered" => format!("answered {code}"),
        (Some(code), Some(error)) => format!("answered {code}: {error}"),
        (None, Some(error)) => error.clone(),
        (Some(code), None) => format!("answered {code}"),
        (None, None) => "not attempted yet".to_owned(),
    };
    format!(
        "{}  {}  {}  {}  {}  attempts {}  {}",
        delivery.id,
        delivery.event_id,
        delivery.event_type,
        delivery.batch_id,
        delivery.status,
        delivery.attempts,
        last
    )
}
