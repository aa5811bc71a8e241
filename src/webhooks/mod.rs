//! Webhooks (issue 15, under construction): OpenAI's webhook events for batches,
//! signed as Standard Webhooks. Built so far, each tested on its own: the signing
//! scheme ([`signature`]), the event types and event JSON ([`events`]), the checks of
//! where a webhook may be sent ([`destination`]) and of an endpoint's settings
//! ([`endpoint`]). Not built yet, so nothing is sent: the endpoints API and its
//! storage, and the dispatcher that derives events from the change feed and delivers
//! them.

pub mod destination;
pub mod endpoint;
pub mod events;
pub mod signature;

pub use destination::{DestinationPolicy, is_public};
pub use endpoint::{EndpointInput, EndpointSettings};
pub use events::{WebhookEvent, WebhookEventType};
pub use signature::{SigningSecret, signature_header};
