//! One signed HTTP attempt to an endpoint, and only to where [`DestinationPolicy`]
//! allows: the client resolves names itself and connects only to addresses it checked
//! (so a name that changed to a private address since the endpoint was saved, DNS
//! rebinding, is refused at connect time), follows no redirect and gives each attempt
//! a deadline.
//!
//! It never goes through a proxy, whatever `HTTPS_PROXY`, `HTTP_PROXY` or `ALL_PROXY`
//! say: a proxy resolves the endpoint's name itself, after the check, so the guard
//! would see only the proxy. A deployment whose egress must pass a proxy sends
//! webhooks through a transparent one (network policy), not through these variables.
//!
//! What it records of a failure is a fixed description (the receiver's status, no
//! answer in time, no connection, a refused destination): never the receiver's body or
//! the addresses a name resolved to, which would turn any mistake of the guard into a
//! way to read internal services. The detail goes to the log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use url::Url;

use crate::domain::webhooks::destination::{DestinationPolicy, NOT_RESOLVING_TO_PUBLIC};
use crate::error::{Error, Result};

/// Longest a name resolution for an endpoint check may take.
const RESOLVE_DEADLINE: Duration = Duration::from_secs(5);

/// What one attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOutcome {
    /// The receiver's HTTP status, if it answered.
    pub status: Option<u16>,
    /// How long the receiver asked to wait (`Retry-After` in seconds).
    pub retry_after: Option<Duration>,
    /// Why it failed, if it did, in words that reveal nothing of the network.
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
            // Proxies from the environment would resolve names past the guard.
            .no_proxy()
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
        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                tracing::info!(url = %request.url, error = %full_chain(&error), "a webhook attempt failed");
                return outcome(None, None, Some(describe(&error).to_owned()));
            }
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
        // The body is not read: the status is the receiver's whole answer.
        let error = format!("the receiver answered {status}");
        outcome(Some(status), retry_after, Some(error))
    }
}

/// Resolves `url`'s host (if it is a name) and refuses it unless every address it
/// resolves to is one the policy allows: the check of an endpoint URL when it is saved.
/// A name that does not resolve, resolves too slowly or reaches inside the deployment
/// gets one answer, [`NOT_RESOLVING_TO_PUBLIC`], so refusals map no internal DNS.
pub async fn check_resolved(policy: &DestinationPolicy, field: &str, url: &Url) -> Result<()> {
    let Some(url::Host::Domain(name)) = url.host() else {
        return Ok(());
    };
    let port = url.port_or_known_default().unwrap_or(443);
    let refused = |why: &dyn std::fmt::Display| {
        tracing::info!(host = name, %why, "a webhook endpoint's host was refused");
        Error::invalid(field, format!("host `{name}` {NOT_RESOLVING_TO_PUBLIC}"))
    };
    let resolved =
        match tokio::time::timeout(RESOLVE_DEADLINE, tokio::net::lookup_host((name, port))).await {
            Err(_) => return Err(refused(&"no answer in time")),
            Ok(Err(error)) => return Err(refused(&error)),
            Ok(Ok(resolved)) => resolved.collect::<Vec<_>>(),
        };
    if resolved.is_empty() {
        return Err(refused(&"no address"));
    }
    for address in &resolved {
        if policy.check_address(field, address.ip()).is_err() {
            return Err(refused(&format!("resolves to {}", address.ip())));
        }
    }
    Ok(())
}

/// What the delivery record says of a transport error: a fixed description, never
/// the error's text, which can carry resolved addresses or an internal host's words.
fn describe(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "no answer within the attempt's deadline"
    } else if chain_has::<RefusedDestination>(error) {
        "the endpoint's host does not resolve to a public address; webhooks go to public addresses only"
    } else if error.is_connect() {
        "could not connect to the receiver"
    } else {
        "the request to the receiver failed"
    }
}

/// Whether an error of type `E` is among `error`'s causes.
fn chain_has<E: std::error::Error + 'static>(error: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<E>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// The transport error with its causes, for the log.
fn full_chain(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The resolver's refusal of a name that resolves to no address the policy allows.
#[derive(Debug)]
struct RefusedDestination;

impl std::fmt::Display for RefusedDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(NOT_RESOLVING_TO_PUBLIC)
    }
}

impl std::error::Error for RefusedDestination {}

/// The client's resolver: the system's, keeping only the addresses the policy allows.
struct CheckedResolver {
    policy: DestinationPolicy,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            // A name that does not resolve is refused like one that resolves inside:
            // the record must not tell the two apart.
            let resolved: Vec<SocketAddr> =
                match tokio::net::lookup_host((host.as_str(), 0)).await {
                    Ok(resolved) => resolved.collect(),
                    Err(error) => {
                        tracing::info!(host, %error, "a webhook delivery's host does not resolve");
                        return Err(Box::new(RefusedDestination)
                            as Box<dyn std::error::Error + Send + Sync>);
                    }
                };
            let allowed: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|address| policy.check_address("url", address.ip()).is_ok())
                .collect();
            if allowed.is_empty() {
                tracing::info!(host, resolved = ?resolved, "a webhook delivery's host resolves to no public address");
                let refused: Box<dyn std::error::Error + Send + Sync> =
                    Box::new(RefusedDestination);
                return Err(refused);
            }
            let addresses: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addresses)
        })
    }
}
