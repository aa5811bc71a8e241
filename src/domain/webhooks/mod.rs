//! The webhook domain, without I/O: the signing scheme ([`signature`]), the event
//! types and event JSON ([`events`]), where webhooks may go ([`destination`]),
//! endpoints and their settings ([`endpoint`]), signing secrets at rest ([`secrets`]),
//! deliveries and their retry schedule ([`delivery`]).

pub mod delivery;
pub mod destination;
pub mod endpoint;
pub mod events;
pub mod secrets;
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
