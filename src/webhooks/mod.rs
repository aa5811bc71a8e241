//! Webhooks: OpenAI's webhook events for batches, signed as Standard Webhooks, derived
//! from the change feed and delivered at least once.
//!
//! The use cases of endpoints ([`service`]); the [`dispatcher`], which turns committed
//! status changes into queued deliveries exactly once; the [`deliverer`], which leases
//! due deliveries and sends them with retries; one signed attempt under the
//! destination policy ([`sender`]); the bounds on requests in flight that deliveries
//! and test deliveries share ([`limits`]). Their types without I/O (events, endpoints,
//! deliveries, signatures, secrets, destinations) are the domain's:
//! [`crate::domain::webhooks`].

pub mod deliverer;
pub mod dispatcher;
pub mod limits;
pub mod sender;
pub mod service;
