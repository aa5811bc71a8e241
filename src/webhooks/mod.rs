//! Webhooks: OpenAI's webhook events for batches, signed as Standard Webhooks, derived
//! from the change feed and delivered at least once.
//!
//! The use cases of endpoints ([`service`]); the [`dispatcher`], which turns committed
//! status changes into queued deliveries exactly once; the [`deliverer`], which leases
//! due deliveries and sends them with retries; one signed attempt under the
//! destination policy ([`sender`]); the bounds on requests in flight that deliveries
//! and test deliveries share ([`limits`]). Beneath them, without I/O: the signing scheme
//! ([`signature`]), the event types and event JSON ([`events`]), where webhooks may go
//! ([`destination`]), endpoints and their settings ([`endpoint`]), signing secrets at
//! rest ([`secrets`]), deliveries and their retry schedule ([`delivery`]).

pub mod deliverer;
pub mod delivery;
pub mod destination;
pub mod dispatcher;
pub mod endpoint;
pub mod events;
pub mod limits;
pub mod secrets;
pub mod sender;
pub mod service;
pub mod signature;

pub use delivery::{
    AfterAttempt, AttemptRecord, AttemptReport, Delivery, DeliveryState, EndpointHealth,
    NewDelivery, RetrySchedule,
};
pub use destination::{DestinationPolicy, is_public};
pub use endpoint::{EndpointInput, EndpointSettings, SealedSecret, WebhookEndpoint};
pub use events::{WebhookEvent, WebhookEventType};
pub use secrets::SecretSealer;
pub use signature::{SigningSecret, signature_header};
