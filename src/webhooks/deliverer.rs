//! The deliverer of one replica: claims due deliveries under a lease, sends each
//! signed, and records the outcome, all within bounds: at most `concurrency` attempts
//! in flight, at most `concurrency_per_endpoint` to any one endpoint (a slow receiver
//! holds only its own share), each attempt within its timeout and its lease. A replica
//! that dies mid-attempt leaves a lease that runs out; another replica then takes the
//! delivery over, with the same `webhook-id`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tracing::Instrument;

use super::delivery::{AfterAttempt, AttemptRecord, AttemptReport, Delivery, EndpointHealth};
use super::dispatcher::event_type_label;
use super::endpoint::WebhookEndpoint;
use super::sender::{SendOutcome, Sender};
use super::service::{WebhookOptions, now_ms, send_signed};
use crate::clock::Clock;
use crate::domain::random_hex;
use crate::error::Result;
use crate::shutdown;
use crate::store::{DeliveryClaim, Store};

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
    store: Arc<dyn Store>,
    sender: Sender,
    options: WebhookOptions,
    /// The service's clock: when a rotation's overlap ends, how long an endpoint has
    /// been failing. Leases and signatures use the wall clock.
    clock: Arc<dyn Clock>,
    /// This replica's name on the leases it takes.
    replica: String,
    slots: Arc<Semaphore>,
    in_flight: Mutex<HashMap<String, usize>>,
    wake: Arc<Notify>,
}

impl Deliverer {
    /// A deliverer over `store`; `wake` is signalled when deliveries were queued.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        options: WebhookOptions,
        wake: Arc<Notify>,
    ) -> Result<Arc<Deliverer>> {
        Ok(Arc::new(Deliverer {
            sender: Sender::new(options.policy, options.attempt_timeout)?,
            slots: Arc::new(Semaphore::new(options.concurrency.max(1))),
            replica: format!("replica_{}", random_hex::<8>()),
            in_flight: Mutex::default(),
            store,
            clock,
            options,
            wake,
        }))
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
            let free = self.slots.available_permits().min(MAX_CLAIM);
            if free == 0 {
                return Ok(());
            }
            let busy = self.busy_endpoints();
            let now = now_ms();
            let claimed = self
                .store
                .claim_deliveries(&DeliveryClaim {
                    replica: &self.replica,
                    now_ms: now,
                    lease_until_ms: now + self.lease().as_millis() as i64,
                    busy_endpoints: &busy,
                    per_endpoint: self.options.concurrency_per_endpoint.max(1) as i64,
                    limit: free as i64,
                })
                .await?;
            let count = claimed.len();
            let mut extra = Vec::new();
            let mut kept = Vec::new();
            for delivery in claimed {
                match self.take_slot(&delivery.queued.endpoint_id) {
                    Some(slot) => kept.push((delivery, slot)),
                    None => extra.push(delivery.queued.id),
                }
            }
            // Claimed beyond an endpoint's share: back for another replica or later.
            self.store.release_deliveries(&self.replica, &extra).await?;
            // Each endpoint is read once per claim, as it is now (its secrets, whether
            // it is still enabled), for all of its deliveries in the claim.
            let mut endpoints: HashMap<String, Option<Arc<WebhookEndpoint>>> = HashMap::new();
            for (delivery, _) in &kept {
                let id = &delivery.queued.endpoint_id;
                if !endpoints.contains_key(id) {
                    let endpoint = self.store.get_endpoint(id).await?.map(Arc::new);
                    endpoints.insert(id.clone(), endpoint);
                }
            }
            for (delivery, slot) in kept {
                let endpoint = endpoints
                    .get(&delivery.queued.endpoint_id)
                    .cloned()
                    .flatten();
                let deliverer = self.clone();
                tokio::spawn(async move {
                    deliverer.attempt(delivery, endpoint).await;
                    drop(slot);
                    deliverer.wake.notify_one();
                });
            }
            if count < free || !extra.is_empty() {
                return Ok(());
            }
        }
    }

    /// A lease outlives the attempt's timeout with room for recording it.
    fn lease(&self) -> Duration {
        self.options.attempt_timeout * 2 + Duration::from_secs(5)
    }

    fn busy_endpoints(&self) -> Vec<String> {
        let limit = self.options.concurrency_per_endpoint.max(1);
        self.lock_in_flight()
            .iter()
            .filter(|(_, count)| **count >= limit)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A place for one attempt to `endpoint_id`, if it has one free.
    fn take_slot(self: &Arc<Self>, endpoint_id: &str) -> Option<Slot> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        let mut in_flight = self.lock_in_flight();
        let count = in_flight.entry(endpoint_id.to_owned()).or_default();
        if *count >= self.options.concurrency_per_endpoint.max(1) {
            return None;
        }
        *count += 1;
        Some(Slot {
            deliverer: self.clone(),
            endpoint_id: endpoint_id.to_owned(),
            _permit: permit,
        })
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// One attempt of `delivery` to `endpoint` (`None`: deleted), recorded.
    async fn attempt(&self, delivery: Delivery, endpoint: Option<Arc<WebhookEndpoint>>) {
        let span = tracing::info_span!(
            "webhook.attempt",
            webhook.endpoint_id = %delivery.queued.endpoint_id,
            webhook.event_id = %delivery.queued.event_id,
            webhook.event_type = %delivery.queued.event_type,
            webhook.attempt = delivery.attempts + 1,
            http.response.status_code = tracing::field::Empty,
        );
        async {
            if let Err(error) = self.attempt_recorded(&delivery, endpoint).await {
                tracing::warn!(%error, delivery_id = %delivery.queued.id, "a webhook attempt could not be made or recorded; its lease will run out and it is tried again");
            }
        }
        .instrument(span)
        .await
    }

    async fn attempt_recorded(
        &self,
        delivery: &Delivery,
        endpoint: Option<Arc<WebhookEndpoint>>,
    ) -> Result<()> {
        let queued = &delivery.queued;
        let Some(endpoint) = endpoint else {
            return Ok(()); // deleted, with its deliveries
        };
        if endpoint.disabled.is_some() {
            return self
                .store
                .release_deliveries(&self.replica, std::slice::from_ref(&queued.id))
                .await;
        }
        let started_ms = now_ms();
        let now = self.clock.now();
        let outcome = send_signed(
            &self.sender,
            &self.options.sealer,
            &endpoint,
            &queued.event_id,
            &queued.payload,
            now,
        )
        .await?;
        if let Some(status) = outcome.status {
            tracing::Span::current().record("http.response.status_code", status);
        }
        let record = self.judge(delivery, &endpoint, &outcome, started_ms, now);
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
                    .map_or(0, |at| (now_ms() / 1_000 - at).max(0));
                metrics::gauge!("batchd_webhook_oldest_pending_age_seconds").set(age as f64);
            }
            Err(error) => tracing::debug!(%error, "measuring the webhook queue failed"),
        }
    }
}

/// One attempt's place: a slot of the replica's and of its endpoint's share.
struct Slot {
    deliverer: Arc<Deliverer>,
    endpoint_id: String,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut in_flight = self.deliverer.lock_in_flight();
        if let Some(count) = in_flight.get_mut(&self.endpoint_id) {
            *count -= 1;
            if *count == 0 {
                in_flight.remove(&self.endpoint_id);
            }
        }
    }
}
