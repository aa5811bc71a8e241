//! The deliverer of one replica: claims due deliveries under a lease, sends each
//! signed, and records the outcome, all within the replica's [`DeliveryLimits`]: at
//! most `concurrency` attempts in flight, at most `concurrency_per_endpoint` to any
//! one endpoint (a slow receiver holds only its own share) and at most
//! `concurrency_per_owner` to one owner's endpoints (one tenant's many hanging
//! receivers hold only that tenant's share), each attempt within its timeout and its
//! lease. Claims take the owners in turn, so a tenant with a long backlog does not
//! push another's delivery back. A replica that dies mid-attempt leaves a lease that
//! runs out; another replica then takes the delivery over, with the same `webhook-id`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tracing::Instrument;

use super::dispatcher::event_type_label;
use super::limits::{DeliveryLimits, Place};
use super::sender::{SendOutcome, Sender};
use super::service::{WebhookOptions, WebhookService, send_signed};
use crate::clock::{Clock, wall_clock_ms};
use crate::domain::random_hex;
use crate::domain::webhooks::delivery::{
    AfterAttempt, AttemptRecord, AttemptReport, Delivery, EndpointHealth,
};
use crate::domain::webhooks::endpoint::WebhookEndpoint;
use crate::error::Result;
use crate::shutdown;
use crate::store::{DeliveryClaim, WebhookStore};

/// How long a woken deliverer waits for more attempts to finish before it claims.
const CLAIM_GATHER: Duration = Duration::from_millis(2);

/// Most deliveries claimed by one query.
const MAX_CLAIM: usize = 100;

/// The outcomes of an attempt, as the metrics label them.
pub const OUTCOMES: [&str; 3] = ["delivered", "retrying", "failed"];

/// How often the queue's depth and age are measured.
const QUEUE_GAUGE_PERIOD: Duration = Duration::from_secs(5);

/// Sends the deliveries this replica claims.
pub struct Deliverer {
    store: Arc<dyn WebhookStore>,
    sender: Sender,
    options: WebhookOptions,
    /// The service's clock: when a rotation's overlap ends, how long an endpoint has
    /// been failing. Leases and signatures use the wall clock.
    clock: Arc<dyn Clock>,
    /// This replica's name on the leases it takes.
    replica: String,
    /// Shared with the service's test deliveries.
    limits: Arc<DeliveryLimits>,
    wake: Arc<Notify>,
}

impl Deliverer {
    /// The deliverer of `webhooks` (its sender, options and limits) over `store`;
    /// `wake` is signalled when deliveries were queued.
    pub fn new(
        webhooks: &WebhookService,
        store: Arc<dyn WebhookStore>,
        clock: Arc<dyn Clock>,
        wake: Arc<Notify>,
    ) -> Arc<Deliverer> {
        Arc::new(Deliverer {
            sender: webhooks.sender().clone(),
            limits: webhooks.limits().clone(),
            options: webhooks.options().clone(),
            replica: format!("replica_{}", random_hex::<8>()),
            store,
            clock,
            wake,
        })
    }

    /// Claims and sends until the stop signal; attempts in flight then finish or
    /// are abandoned to their leases.
    pub async fn run(self: Arc<Self>, mut stopping: watch::Receiver<bool>) {
        let mut gauges = tokio::time::interval(QUEUE_GAUGE_PERIOD);
        loop {
            if let Err(error) = self.claim_and_send().await {
                tracing::warn!(%error, "claiming webhook deliveries failed");
            }
            tokio::select! {
                // Attempts finish close together under load: one claim for several.
                _ = self.wake.notified() => tokio::time::sleep(CLAIM_GATHER).await,
                _ = tokio::time::sleep(self.options.poll) => {}
                _ = gauges.tick() => self.measure_queue().await,
                _ = shutdown::requested(&mut stopping) => return,
            }
        }
    }

    /// Claims what this replica has room for and starts an attempt for each.
    async fn claim_and_send(self: &Arc<Self>) -> Result<()> {
        loop {
            let free = self.limits.free().min(MAX_CLAIM);
            if free == 0 {
                return Ok(());
            }
            let (full_endpoints, full_owners) = self.limits.full();
            let bounds = self.limits.bounds();
            let now = wall_clock_ms();
            let claimed = self
                .store
                .claim_deliveries(&DeliveryClaim {
                    replica: &self.replica,
                    now_ms: now,
                    lease_until_ms: now + self.lease().as_millis() as i64,
                    busy_endpoints: &full_endpoints,
                    busy_owners: &full_owners,
                    per_endpoint: bounds.per_endpoint as i64,
                    per_owner: bounds.per_owner as i64,
                    limit: free as i64,
                })
                .await?;
            let count = claimed.len();
            // Each endpoint is read once per claim, as it is now (its owner, its
            // secrets, whether it is still enabled), for all of its deliveries.
            let mut endpoints: HashMap<String, Option<Arc<WebhookEndpoint>>> = HashMap::new();
            for delivery in &claimed {
                let id = &delivery.queued.endpoint_id;
                if !endpoints.contains_key(id) {
                    let endpoint = self.store.get_endpoint(id).await?.map(Arc::new);
                    endpoints.insert(id.clone(), endpoint);
                }
            }
            let mut given_back = Vec::new();
            let mut started = Vec::new();
            for delivery in claimed {
                let Some(endpoint) = endpoints
                    .get(&delivery.queued.endpoint_id)
                    .cloned()
                    .flatten()
                else {
                    continue; // deleted, with its deliveries
                };
                if endpoint.disabled.is_some() {
                    given_back.push(delivery.queued.id);
                    continue;
                }
                match self.limits.take(&endpoint.id, &endpoint.owner) {
                    Ok(place) => started.push((delivery, endpoint, place)),
                    // Beyond a share (test deliveries took places meanwhile): back for
                    // another replica or later.
                    Err(_) => given_back.push(delivery.queued.id),
                }
            }
            self.store
                .release_deliveries(&self.replica, &given_back)
                .await?;
            for (delivery, endpoint, place) in started {
                let deliverer = self.clone();
                tokio::spawn(async move {
                    deliverer.attempt(delivery, endpoint, place).await;
                    deliverer.wake.notify_one();
                });
            }
            if count < free || !given_back.is_empty() {
                return Ok(());
            }
        }
    }

    /// A lease outlives the attempt's timeout with room for recording it.
    fn lease(&self) -> Duration {
        self.options.attempt_timeout * 2 + Duration::from_secs(5)
    }

    /// One attempt of `delivery` to `endpoint` in its place, recorded.
    async fn attempt(&self, delivery: Delivery, endpoint: Arc<WebhookEndpoint>, place: Place) {
        let span = tracing::info_span!(
            "webhook.attempt",
            webhook.endpoint_id = %delivery.queued.endpoint_id,
            webhook.event_id = %delivery.queued.event_id,
            webhook.event_type = %delivery.queued.event_type,
            webhook.attempt = delivery.attempts + 1,
            http.response.status_code = tracing::field::Empty,
        );
        async {
            let recorded = self.attempt_recorded(&delivery, &endpoint).await;
            drop(place);
            if let Err(error) = recorded {
                tracing::warn!(%error, delivery_id = %delivery.queued.id, "a webhook attempt could not be made or recorded; its lease will run out and it is tried again");
            }
        }
        .instrument(span)
        .await
    }

    async fn attempt_recorded(
        &self,
        delivery: &Delivery,
        endpoint: &WebhookEndpoint,
    ) -> Result<()> {
        let queued = &delivery.queued;
        let started_ms = wall_clock_ms();
        let now = self.clock.now();
        let outcome = send_signed(
            &self.sender,
            &self.options.sealer,
            endpoint,
            &queued.event_id,
            &queued.payload,
            now,
        )
        .await?;
        if let Some(status) = outcome.status {
            tracing::Span::current().record("http.response.status_code", status);
        }
        let record = self.judge(delivery, endpoint, &outcome, started_ms, now);
        let label = match record.after {
            AfterAttempt::Delivered => "delivered",
            AfterAttempt::RetryAt(_) => "retrying",
            AfterAttempt::GiveUp => "failed",
        };
        metrics::counter!(
            "batchd_webhook_attempts_total",
            "event_type" => event_type_label(&queued.event_type),
            "outcome" => label
        )
        .increment(1);
        metrics::histogram!("batchd_webhook_attempt_duration_seconds", "outcome" => label)
            .record(outcome.duration.as_secs_f64());
        if let EndpointHealth::Disable { reason, .. } = &record.endpoint {
            tracing::warn!(endpoint_id = %endpoint.id, %reason, "webhook endpoint disabled");
        }
        if !self
            .store
            .record_attempt(&self.replica, &endpoint.id, &queued.id, &record)
            .await?
        {
            tracing::info!(delivery_id = %queued.id, "a webhook attempt finished after its lease was taken over; the other replica's attempt counts");
        }
        Ok(())
    }

    /// What an attempt's outcome means for the delivery and its endpoint.
    fn judge(
        &self,
        delivery: &Delivery,
        endpoint: &WebhookEndpoint,
        outcome: &SendOutcome,
        started_ms: i64,
        now: i64,
    ) -> AttemptRecord {
        let report = AttemptReport {
            at_ms: started_ms,
            duration_ms: outcome.duration.as_millis() as i64,
            status_code: outcome.status.map(i32::from),
            error: outcome.error.clone(),
        };
        if outcome.delivered() {
            return AttemptRecord {
                report,
                after: AfterAttempt::Delivered,
                // Always: the endpoint read at claim time may not show a failure
                // recorded since by another attempt, which this success must clear.
                endpoint: EndpointHealth::Healthy,
            };
        }
        if outcome.status == Some(410) {
            return AttemptRecord {
                report,
                after: AfterAttempt::GiveUp,
                endpoint: EndpointHealth::Disable {
                    at: now,
                    reason: "the receiver answered 410 Gone".into(),
                },
            };
        }
        let attempts = delivery.attempts + 1;
        let after = match self
            .options
            .retries
            .wait_after(attempts, outcome.retry_after)
        {
            Some(wait) => AfterAttempt::RetryAt(started_ms + wait.as_millis() as i64),
            None => AfterAttempt::GiveUp,
        };
        let failing_since = endpoint.failing_since.unwrap_or(now);
        let disable_after = self.options.disable_after.as_secs() as i64;
        let endpoint = if now - failing_since > disable_after {
            EndpointHealth::Disable {
                at: now,
                reason: format!(
                    "every delivery failed for more than {}",
                    humantime::format_duration(self.options.disable_after)
                ),
            }
        } else if endpoint.failing_since.is_some() {
            EndpointHealth::Unchanged
        } else {
            EndpointHealth::Failing(now)
        };
        AttemptRecord {
            report,
            after,
            endpoint,
        }
    }

    async fn measure_queue(&self) {
        match self.store.delivery_queue().await {
            Ok(queue) => {
                metrics::gauge!("batchd_webhook_queue_depth").set(queue.pending as f64);
                let age = queue
                    .oldest_created_at
                    .map_or(0, |at| (wall_clock_ms() / 1_000 - at).max(0));
                metrics::gauge!("batchd_webhook_oldest_pending_age_seconds").set(age as f64);
            }
            Err(error) => tracing::debug!(%error, "measuring the webhook queue failed"),
        }
    }
}
