//! One signed HTTP attempt to an endpoint, and only to where [`DestinationPolicy`]
//! allows: the client resolves names itself and connects only to addresses it checked
//! (so a name that changed to a private address since the endpoint was saved, DNS
//! rebinding, is refused at connect time), follows no redirect, gives each attempt a
//! deadline and reads at most a few bytes of what the receiver answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use url::Url;

use super::destination::DestinationPolicy;
use crate::error::{Error, Result};

/// Bytes of a receiver's answer kept, for the delivery's error.
const ANSWER_BYTES_KEPT: usize = 256;

/// Longest a name resolution for an endpoint check may take.
const RESOLVE_DEADLINE: Duration = Duration::from_secs(5);

/// What one attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOutcome {
    /// The receiver's HTTP status, if it answered.
    pub status: Option<u16>,
    /// How long the receiver asked to wait (`Retry-After` in seconds).
    pub retry_after: Option<Duration>,
    /// Why it failed, if it did: the transport's error, or the start of the answer.
    pub error: Option<String>,
    /// How long the attempt took.
    pub duration: Duration,
}

impl SendOutcome {
    /// Whether the receiver took it (2xx).
    pub fn delivered(&self) -> bool {
        self.status
            .is_some_and(|status| (200..300).contains(&status))
    }
}

/// A signed request, ready to send.
#[derive(Debug, Clone)]
pub struct SignedRequest<'a> {
    /// The endpoint's URL.
    pub url: &'a Url,
    /// The event id (`webhook-id`).
    pub webhook_id: &'a str,
    /// Unix seconds (`webhook-timestamp`).
    pub timestamp: i64,
    /// The `webhook-signature` header.
    pub signature: &'a str,
    /// The JSON body.
    pub body: &'a str,
}

/// Sends webhook requests under a destination policy.
#[derive(Clone)]
pub struct Sender {
    client: reqwest::Client,
    policy: DestinationPolicy,
}

impl Sender {
    /// A sender that gives each attempt `timeout`.
    pub fn new(policy: DestinationPolicy, timeout: Duration) -> Result<Sender> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .dns_resolver(Arc::new(CheckedResolver { policy }))
            .user_agent(concat!("batchd-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Internal(format!("cannot build the webhook HTTP client: {e}")))?;
        Ok(Sender { client, policy })
    }

    /// The policy it sends under.
    pub fn policy(&self) -> &DestinationPolicy {
        &self.policy
    }

    /// Makes one attempt. Never fails: what went wrong is in the outcome.
    pub async fn send(&self, request: &SignedRequest<'_>) -> SendOutcome {
        let started = Instant::now();
        let outcome = |status, retry_after, error| SendOutcome {
            status,
            retry_after,
            error,
            duration: started.elapsed(),
        };
        // A URL whose host is an address is not resolved, so it is checked here.
        if let Err(refused) = self.policy.check_url("url", request.url.as_str()) {
            return outcome(None, None, Some(refused.to_string()));
        }
        let sent = self
            .client
            .post(request.url.clone())
            .header("content-type", "application/json")
            .header("webhook-id", request.webhook_id)
            .header("webhook-timestamp", request.timestamp.to_string())
            .header("webhook-signature", request.signature)
            .body(request.body.to_owned())
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(error) => return outcome(None, None, Some(describe(&error))),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|value| value.to_str().ok())
            .and_then(|text| text.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        if (200..300).contains(&status) {
            return outcome(Some(status), retry_after, None);
        }
        let mut kept = Vec::new();
        while kept.len() < ANSWER_BYTES_KEPT {
            match response.chunk().await {
                Ok(Some(chunk)) => kept.extend_from_slice(&chunk),
                _ => break,
            }
        }
        kept.truncate(ANSWER_BYTES_KEPT);
        let answer = String::from_utf8_lossy(&kept);
        let error = format!("the receiver answered {status}: {}", answer.trim());
        outcome(Some(status), retry_after, Some(error))
    }
}

/// Resolves `url`'s host (if it is a name) and refuses it unless every address it
/// resolves to is one the policy allows: the check of an endpoint URL when it is saved.
pub async fn check_resolved(policy: &DestinationPolicy, field: &str, url: &Url) -> Result<()> {
    let Some(url::Host::Domain(name)) = url.host() else {
        return Ok(());
    };
    let port = url.port_or_known_default().unwrap_or(443);
    let resolved = tokio::time::timeout(RESOLVE_DEADLINE, tokio::net::lookup_host((name, port)))
        .await
        .map_err(|_| Error::invalid(field, format!("host `{name}` did not resolve in time")))?
        .map_err(|_| Error::invalid(field, format!("host `{name}` does not resolve")))?;
    let mut any = false;
    for address in resolved {
        any = true;
        policy.check_address(field, address.ip())?;
    }
    if !any {
        return Err(Error::invalid(
            field,
            format!("host `{name}` has no address"),
        ));
    }
    Ok(())
}

/// The transport error, with its causes, for the delivery's record.
fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "no answer within the attempt's deadline".to_owned()
    } else {
        error.to_string()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The client's resolver: the system's, keeping only the addresses the policy allows.
struct CheckedResolver {
    policy: DestinationPolicy,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|address| policy.check_address("url", address.ip()).is_ok())
                .collect();
            if allowed.is_empty() {
                let refused: Box<dyn std::error::Error + Send + Sync> = format!(
                    "`{host}` resolves only to addresses webhooks may not reach ({})",
                    resolved
                        .iter()
                        .map(|address| address.ip().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
                .into();
                return Err(refused);
            }
            let addresses: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addresses)
        })
    }
}
