//! The webhook use cases: endpoints (OpenAI's create, retrieve, update, list, delete,
//! rotate_secret and test) and their deliveries. Like the batch service, each checks
//! the caller, validates the input, applies the rules and is the transports' only way
//! to webhook storage.

use std::sync::Arc;
use std::time::Duration;

use super::limits::{DeliveryBounds, DeliveryLimits, Full};
use super::sender::{SendOutcome, Sender, SignedRequest, check_resolved};
use crate::clock::{Clock, wall_clock_ms};
use crate::domain::webhooks::delivery::{Delivery, RetrySchedule};
use crate::domain::webhooks::destination::DestinationPolicy;
use crate::domain::webhooks::endpoint::{EndpointInput, EndpointSettings, WebhookEndpoint};
use crate::domain::webhooks::events::{WebhookEvent, WebhookEventType};
use crate::domain::webhooks::secrets::SecretSealer;
use crate::domain::webhooks::signature::{SigningSecret, signature_header};
use crate::domain::{Action, Caller, random_hex};
use crate::error::{Error, Result};
use crate::store::Store;

/// How webhooks behave: the `--webhook-*` flags of `serve`.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// Where webhooks may go.
    pub policy: DestinationPolicy,

    /// Waits before each retry after a failed attempt, comma-separated (Standard
    /// Webhooks' schedule; each gets up to 10% jitter, and a longer `Retry-After`
    /// wins). An empty list means one attempt only.
    pub retries: RetrySchedule,

    /// Longest one delivery attempt may take.
    pub attempt_timeout: Duration,

    /// An endpoint whose every delivery failed for longer than this is disabled (an
    /// update enables it again).
    pub disable_after: Duration,

    /// Most delivery attempts in flight on one replica.
    pub concurrency: usize,

    /// Most delivery attempts in flight to one endpoint from one replica, so that one
    /// slow receiver cannot hold every slot.
    pub concurrency_per_endpoint: usize,

    /// Most delivery attempts in flight to the endpoints of one owner from one
    /// replica, so that one tenant's hanging receivers hold only its share and other
    /// tenants' deliveries go on. Test deliveries count too.
    pub concurrency_per_owner: usize,

    /// How often a replica looks for due deliveries besides being woken by its own
    /// dispatcher (retries, and deliveries other replicas queued), and its dispatcher
    /// reads the change feed besides being woken by commits.
    pub poll: Duration,

    /// 32 bytes in base64 (`openssl rand -base64 32`) that seal endpoints' signing
    /// secrets in the database; every replica needs the same. Without it secrets are
    /// stored as plain text.
    pub sealer: SecretSealer,

    /// Most endpoints one owner may have: its own, and apart from them the all-owners
    /// endpoints of admin keys with its user id.
    pub max_endpoints_per_owner: i64,

    /// How long finished deliveries stay listed.
    pub delivery_retention: Duration,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        const DAY: Duration = Duration::from_secs(24 * 3600);
        WebhookOptions {
            policy: DestinationPolicy::default(),
            retries: RetrySchedule::default(),
            attempt_timeout: Duration::from_secs(15),
            disable_after: 5 * DAY,
            concurrency: 64,
            concurrency_per_endpoint: 4,
            concurrency_per_owner: 16,
            poll: Duration::from_secs(1),
            sealer: SecretSealer::unkeyed(),
            max_endpoints_per_owner: 100,
            delivery_retention: 7 * DAY,
        }
    }
}

impl WebhookOptions {
    /// The bounds on requests in flight.
    pub fn bounds(&self) -> DeliveryBounds {
        DeliveryBounds {
            concurrency: self.concurrency,
            per_endpoint: self.concurrency_per_endpoint,
            per_owner: self.concurrency_per_owner,
        }
    }
}

/// An endpoint as the use cases show it: its settings and state, the hint of its
/// signing secret, and the secret itself only when it was just made (created or
/// rotated), since it is never shown again.
#[derive(Debug, Clone)]
pub struct EndpointView {
    /// The endpoint.
    pub endpoint: WebhookEndpoint,
    /// The last characters of its signing secret, to tell secrets apart.
    pub secret_hint: String,
    /// The signing secret, right after it was made; `None` otherwise.
    pub new_secret: Option<String>,
}

/// A page of endpoints.
#[derive(Debug, Clone)]
pub struct EndpointPage {
    /// The endpoints, newest first.
    pub endpoints: Vec<EndpointView>,
    /// Whether more follow.
    pub has_more: bool,
}

/// What a test delivery found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestDelivery {
    /// The event type sent.
    pub event_type: WebhookEventType,
    /// The receiver's status.
    pub status_code: u16,
}

/// Most endpoints a list page holds, and the default.
const MAX_LIST_LIMIT: i64 = 100;
const DEFAULT_LIST_LIMIT: i64 = 20;

/// How long the previous secret keeps signing after a rotation that asks for it.
const ROTATION_OVERLAP_SECONDS: i64 = 24 * 3600;

/// Longest id accepted in a path.
const MAX_ID_CHARS: usize = 64;

/// The webhook use cases.
pub struct WebhookService {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    options: WebhookOptions,
    sender: Sender,
    limits: Arc<DeliveryLimits>,
}

impl WebhookService {
    /// The use cases over `store`.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        options: WebhookOptions,
    ) -> Result<WebhookService> {
        let sender = Sender::new(options.policy, options.attempt_timeout)?;
        let limits = DeliveryLimits::new(options.bounds());
        Ok(WebhookService {
            store,
            clock,
            options,
            sender,
            limits,
        })
    }

    /// How webhooks behave.
    pub fn options(&self) -> &WebhookOptions {
        &self.options
    }

    /// The client every webhook request of this replica goes out through.
    pub fn sender(&self) -> &Sender {
        &self.sender
    }

    /// The places for requests in flight on this replica, which the deliverer shares.
    pub fn limits(&self) -> &Arc<DeliveryLimits> {
        &self.limits
    }

    /// The endpoint as the use cases show it, with the hint of its current secret.
    fn view(&self, endpoint: WebhookEndpoint) -> Result<EndpointView> {
        let secret = self.options.sealer.open(&endpoint.id, &endpoint.secret)?;
        Ok(EndpointView {
            secret_hint: secret.hint(),
            new_secret: None,
            endpoint,
        })
    }

    /// Every event type an endpoint may subscribe to.
    pub fn event_types(&self) -> &'static [WebhookEventType] {
        &WebhookEventType::ALL
    }

    /// Creates an endpoint owned by the caller (following every owner's batches for
    /// an admin key); its secret is returned now and never again.
    #[tracing::instrument(level = "debug", skip_all, fields(user_id = %caller.user_id))]
    pub async fn create_endpoint(
        &self,
        caller: &Caller,
        input: EndpointInput,
    ) -> Result<EndpointView> {
        caller.authorize(Action::ManageWebhooks)?;
        let settings = EndpointSettings::create(input, &self.options.policy)?;
        check_resolved(&self.options.policy, "url", &settings.url).await?;
        let id = format!("we_{}", random_hex::<12>());
        let secret = SigningSecret::generate();
        let now = self.clock.now();
        let starts_after = self.store.feed_bounds().await?.head;
        let endpoint = WebhookEndpoint {
            secret: self.options.sealer.seal(&id, &secret),
            id,
            owner: caller.user_id.clone(),
            all_owners: caller.owner_filter().is_none(),
            settings,
            previous_secret: None,
            created_at: now,
            updated_at: now,
            starts_after,
            failing_since: None,
            disabled: None,
            key_id: Some(caller.key_id.clone()),
        };
        let limit = self.options.max_endpoints_per_owner;
        if !self.store.insert_endpoint(&endpoint, limit).await? {
            return Err(Error::FailedPrecondition(format!(
                "owner `{}` already has {limit} webhook endpoints, the most it may have; delete one first",
                caller.user_id
            )));
        }
        Ok(EndpointView {
            secret_hint: secret.hint(),
            new_secret: Some(secret.expose()),
            endpoint,
        })
    }

    /// An endpoint the caller may see.
    pub async fn get_endpoint(&self, caller: &Caller, id: &str) -> Result<EndpointView> {
        caller.authorize(Action::ManageWebhooks)?;
        self.view(self.visible_endpoint(caller, id).await?)
    }

    /// A page of the caller's endpoints, newest first, after endpoint `after`.
    pub async fn list_endpoints(
        &self,
        caller: &Caller,
        after: Option<&str>,
        limit: Option<i64>,
    ) -> Result<EndpointPage> {
        caller.authorize(Action::ManageWebhooks)?;
        let limit = list_limit(limit)?;
        if let Some(after) = after {
            // An unknown cursor would silently yield an empty page.
            self.visible_endpoint(caller, after).await?;
        }
        let mut endpoints = self
            .store
            .list_endpoints(caller.owner_filter(), after, limit + 1)
            .await?;
        let has_more = endpoints.len() as i64 > limit;
        endpoints.truncate(limit as usize);
        Ok(EndpointPage {
            endpoints: endpoints
                .into_iter()
                .map(|endpoint| self.view(endpoint))
                .collect::<Result<_>>()?,
            has_more,
        })
    }

    /// Changes what the update carries; an endpoint that was disabled is enabled
    /// again (its failures start over).
    pub async fn update_endpoint(
        &self,
        caller: &Caller,
        id: &str,
        input: EndpointInput,
    ) -> Result<EndpointView> {
        caller.authorize(Action::ManageWebhooks)?;
        let current = self.visible_endpoint(caller, id).await?;
        let url_changed = input.url.is_some();
        let settings = current
            .settings
            .clone()
            .update(input, &self.options.policy)?;
        if url_changed {
            check_resolved(&self.options.policy, "url", &settings.url).await?;
        }
        let next = WebhookEndpoint {
            settings,
            updated_at: self.clock.now(),
            failing_since: None,
            disabled: None,
            key_id: Some(caller.key_id.clone()),
            ..current.clone()
        };
        self.replace(&current, &next).await?;
        self.view(next)
    }

    /// Deletes an endpoint and its deliveries.
    pub async fn delete_endpoint(&self, caller: &Caller, id: &str) -> Result<String> {
        caller.authorize(Action::ManageWebhooks)?;
        let endpoint = self.visible_endpoint(caller, id).await?;
        if !self.store.delete_endpoint(&endpoint.id).await? {
            return Err(not_found(id));
        }
        Ok(endpoint.id)
    }

    /// Gives the endpoint a new secret, returned now and never again; with
    /// `keep_old`, the old one keeps signing (beside the new) for 24 hours.
    pub async fn rotate_secret(
        &self,
        caller: &Caller,
        id: &str,
        keep_old: bool,
    ) -> Result<EndpointView> {
        caller.authorize(Action::ManageWebhooks)?;
        let current = self.visible_endpoint(caller, id).await?;
        let secret = SigningSecret::generate();
        let now = self.clock.now();
        let next = WebhookEndpoint {
            secret: self.options.sealer.seal(&current.id, &secret),
            previous_secret: keep_old
                .then(|| (current.secret.clone(), now + ROTATION_OVERLAP_SECONDS)),
            updated_at: now,
            key_id: Some(caller.key_id.clone()),
            ..current.clone()
        };
        self.replace(&current, &next).await?;
        Ok(EndpointView {
            secret_hint: secret.hint(),
            new_secret: Some(secret.expose()),
            endpoint: next,
        })
    }

    /// Sends one signed sample event of `event_type` to the endpoint now and reports
    /// the receiver's answer; anything but a 2xx is an error naming it.
    pub async fn test_endpoint(
        &self,
        caller: &Caller,
        id: &str,
        event_type: &str,
    ) -> Result<TestDelivery> {
        caller.authorize(Action::ManageWebhooks)?;
        let kind = WebhookEventType::from_name(event_type).ok_or_else(|| {
            Error::invalid(
                "event_type",
                format!(
                    "`{}` is not an event type of batchd",
                    event_type
                        .chars()
                        .take(40)
                        .collect::<String>()
                        .escape_debug()
                ),
            )
        })?;
        let endpoint = self.visible_endpoint(caller, id).await?;
        // Under the deliveries' own bounds: tests in parallel open no more
        // connections to an endpoint, or to an owner's endpoints, than deliveries may.
        let _place = self
            .limits
            .take(&endpoint.id, &endpoint.owner)
            .map_err(|full| self.busy(full))?;
        let now = self.clock.now();
        let event = WebhookEvent::sample(kind, now);
        let body = serde_json::to_string(&event)
            .map_err(|e| Error::Internal(format!("cannot encode a sample event: {e}")))?;
        let outcome = self.send_signed(&endpoint, &event.id, &body, now).await?;
        match outcome.status {
            Some(status) if outcome.delivered() => Ok(TestDelivery {
                event_type: kind,
                status_code: status,
            }),
            _ => Err(Error::FailedPrecondition(format!(
                "the test delivery to webhook endpoint {} failed: {}",
                endpoint.id,
                outcome.error.unwrap_or_else(|| "no answer".into())
            ))),
        }
    }

    /// The endpoint's latest deliveries, newest first.
    pub async fn list_deliveries(
        &self,
        caller: &Caller,
        id: &str,
        limit: Option<i64>,
    ) -> Result<Vec<Delivery>> {
        caller.authorize(Action::ManageWebhooks)?;
        let limit = list_limit(limit)?;
        let endpoint = self.visible_endpoint(caller, id).await?;
        self.store.list_deliveries(&endpoint.id, limit).await
    }

    /// Makes a delivery due now: again, if it had finished.
    pub async fn retry_delivery(&self, caller: &Caller, id: &str, delivery_id: &str) -> Result<()> {
        caller.authorize(Action::ManageWebhooks)?;
        let endpoint = self.visible_endpoint(caller, id).await?;
        check_id("delivery_id", delivery_id, "wd_")?;
        if self
            .store
            .retry_delivery(&endpoint.id, delivery_id, wall_clock_ms())
            .await?
        {
            Ok(())
        } else {
            Err(Error::NotFound {
                what: "webhook delivery",
                id: delivery_id.to_owned(),
            })
        }
    }

    /// Deletes deliveries that finished longer ago than the retention.
    pub async fn forget_finished_deliveries(&self) -> Result<u64> {
        let retention =
            i64::try_from(self.options.delivery_retention.as_millis()).unwrap_or(i64::MAX);
        let before = wall_clock_ms().saturating_sub(retention);
        let mut forgotten = 0;
        loop {
            let deleted = self.store.forget_deliveries(before, 1_000).await?;
            forgotten += deleted;
            if deleted < 1_000 {
                return Ok(forgotten);
            }
        }
    }

    /// Signs `body` with the endpoint's secrets and sends it once.
    pub(super) async fn send_signed(
        &self,
        endpoint: &WebhookEndpoint,
        webhook_id: &str,
        body: &str,
        now: i64,
    ) -> Result<SendOutcome> {
        send_signed(
            &self.sender,
            &self.options.sealer,
            endpoint,
            webhook_id,
            body,
            now,
        )
        .await
    }

    /// The refusal of a request beyond a bound; a place frees within one attempt's
    /// timeout at the latest.
    fn busy(&self, full: Full) -> Error {
        let what = match full {
            Full::Replica => "this replica has as many webhook requests in flight as it may",
            Full::Endpoint => "this endpoint has as many webhook requests in flight as it may",
            Full::Owner => {
                "this owner's endpoints have as many webhook requests in flight as they may"
            }
        };
        Error::RateLimited {
            reason: format!("{what}; retry later"),
            retry_after: self.options.attempt_timeout,
        }
    }

    /// The endpoint, if the caller may see it: an admin key sees every endpoint, any
    /// other key only its owner's own (never an all-owners endpoint, which follows
    /// other tenants' batches, even one whose owner has the caller's user id). Others
    /// are NOT_FOUND, exactly like an unknown id.
    async fn visible_endpoint(&self, caller: &Caller, id: &str) -> Result<WebhookEndpoint> {
        check_id("webhook_endpoint_id", id, "we_")?;
        let endpoint = self
            .store
            .get_endpoint(id)
            .await?
            .ok_or_else(|| not_found(id))?;
        match caller.owner_filter() {
            Some(owner) if owner != endpoint.owner || endpoint.all_owners => Err(not_found(id)),
            _ => Ok(endpoint),
        }
    }

    /// Writes `next` over `current`. Refused when another change got in between, or
    /// when the caller's key was revoked since its lookup was cached.
    async fn replace(&self, current: &WebhookEndpoint, next: &WebhookEndpoint) -> Result<()> {
        if self.store.update_endpoint(next, &current.secret).await? {
            return Ok(());
        }
        let revoked = match &next.key_id {
            Some(key_id) => !self
                .store
                .revoked_api_keys(std::slice::from_ref(key_id))
                .await?
                .is_empty(),
            None => false,
        };
        if revoked {
            Err(Error::Unauthenticated("the API key was revoked"))
        } else {
            Err(Error::Contended(current.id.clone()))
        }
    }
}

/// Signs `body` with the endpoint's secrets at `now` (both during a rotation's
/// overlap) and sends it once.
pub(super) async fn send_signed(
    sender: &Sender,
    sealer: &SecretSealer,
    endpoint: &WebhookEndpoint,
    webhook_id: &str,
    body: &str,
    now: i64,
) -> Result<SendOutcome> {
    let secrets = endpoint
        .signing_secrets(now)
        .into_iter()
        .map(|sealed| sealer.open(&endpoint.id, sealed))
        .collect::<Result<Vec<_>>>()?;
    let secrets: Vec<&SigningSecret> = secrets.iter().collect();
    // Receivers compare the timestamp with their own clock (the SDKs allow 5
    // minutes), so it is the wall clock's, whatever clock the service was given.
    let timestamp = wall_clock_ms() / 1_000;
    let signature = signature_header(&secrets, webhook_id, timestamp, body.as_bytes());
    Ok(sender
        .send(&SignedRequest {
            url: &endpoint.settings.url,
            webhook_id,
            timestamp,
            signature: &signature,
            body,
        })
        .await)
}

/// The page size asked for, 20 when none was.
fn list_limit(limit: Option<i64>) -> Result<i64> {
    let limit = limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if !(1..=MAX_LIST_LIMIT).contains(&limit) {
        return Err(Error::invalid(
            "limit",
            format!("{limit} is out of range; use 1 to {MAX_LIST_LIMIT}"),
        ));
    }
    Ok(limit)
}

fn not_found(id: &str) -> Error {
    Error::NotFound {
        what: "webhook endpoint",
        id: id.to_owned(),
    }
}

/// Refuses an id that cannot be one of ours before it reaches the database.
fn check_id(field: &str, id: &str, prefix: &str) -> Result<()> {
    let well_formed = id.len() <= MAX_ID_CHARS
        && id.starts_with(prefix)
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if well_formed {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "`{}` is not an id of the form {prefix}<hex digits>",
                id.chars().take(40).collect::<String>().escape_debug()
            ),
        ))
    }
}
