//! A webhook endpoint's settings as clients send them (OpenAI's `name`, `url` and
//! `event_types`), checked: a name of 1 to 256 characters, a URL that
//! [`DestinationPolicy`] lets webhooks reach, and at least one of batchd's event types.

use url::Url;

use super::destination::DestinationPolicy;
use super::events::WebhookEventType;
use crate::domain::{FeedCursor, UnixSeconds};
use crate::error::{Error, Result};

/// Longest endpoint name, in characters (OpenAI's limit).
pub const MAX_ENDPOINT_NAME_CHARS: usize = 256;

/// An endpoint's settings as a create or update request carries them; on an update,
/// what is absent stays as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointInput {
    /// A human-readable name.
    pub name: Option<String>,
    /// Where deliveries go.
    pub url: Option<String>,
    /// What the endpoint subscribes to, by name.
    pub event_types: Option<Vec<String>>,
}

/// An endpoint's checked settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSettings {
    /// A human-readable name.
    pub name: String,
    /// Where deliveries go.
    pub url: Url,
    /// What the endpoint subscribes to: distinct, in [`WebhookEventType::ALL`] order.
    pub event_types: Vec<WebhookEventType>,
}

impl EndpointSettings {
    /// The names of the event types subscribed to, as clients write them.
    pub fn event_type_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.event_types.iter().map(|kind| kind.as_str())
    }

    /// The settings of a new endpoint: every field is required.
    pub fn create(input: EndpointInput, policy: &DestinationPolicy) -> Result<EndpointSettings> {
        let name = input
            .name
            .ok_or_else(|| Error::invalid("name", "is required"))?;
        let url = input
            .url
            .ok_or_else(|| Error::invalid("url", "is required"))?;
        let event_types = input
            .event_types
            .ok_or_else(|| Error::invalid("event_types", "is required"))?;
        Ok(EndpointSettings {
            name: check_name(name)?,
            url: policy.check_url("url", &url)?,
            event_types: check_event_types(&event_types)?,
        })
    }

    /// These settings with an update applied: each field given replaces the current
    /// one, checked as on create.
    pub fn update(
        self,
        input: EndpointInput,
        policy: &DestinationPolicy,
    ) -> Result<EndpointSettings> {
        Ok(EndpointSettings {
            name: input.name.map(check_name).transpose()?.unwrap_or(self.name),
            url: input
                .url
                .map(|url| policy.check_url("url", &url))
                .transpose()?
                .unwrap_or(self.url),
            event_types: input
                .event_types
                .map(|types| check_event_types(&types))
                .transpose()?
                .unwrap_or(self.event_types),
        })
    }
}

/// An endpoint as stored: its settings, whose batches it follows, its sealed signing
/// secrets and its health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEndpoint {
    /// `we_` and 24 hex digits.
    pub id: String,
    /// The owner of the key that created it.
    pub owner: String,
    /// It follows every owner's batches (created with an admin key), not only its
    /// owner's. Only admin keys see and change such an endpoint.
    pub all_owners: bool,
    /// The API key that last configured it (created it, or changed it since); none for
    /// an endpoint saved before keys were recorded. While that key is revoked, an
    /// all-owners endpoint is disabled and receives nothing.
    pub key_id: Option<String>,
    /// Name, URL and event types.
    pub settings: EndpointSettings,
    /// The current secret, sealed (see [`super::SecretSealer`]).
    pub secret: SealedSecret,
    /// The secret before the last rotation, still signing until `previous_secret_until`.
    pub previous_secret: Option<(SealedSecret, UnixSeconds)>,
    /// When it was created.
    pub created_at: UnixSeconds,
    /// When its settings or secret last changed.
    pub updated_at: UnixSeconds,
    /// The feed's head when it was created: it receives the changes after it.
    pub starts_after: FeedCursor,
    /// Since when every attempt failed; none while deliveries succeed.
    pub failing_since: Option<UnixSeconds>,
    /// When and why it stopped receiving deliveries; an update enables it again.
    pub disabled: Option<(UnixSeconds, String)>,
}

impl WebhookEndpoint {
    /// Whether it subscribes to `kind`.
    pub fn subscribes_to(&self, kind: WebhookEventType) -> bool {
        self.settings.event_types.contains(&kind)
    }

    /// Whether it follows the batches of `owner`.
    pub fn follows(&self, owner: &str) -> bool {
        self.all_owners || self.owner == owner
    }

    /// The secrets that sign a delivery at `now`: the current one, and the previous
    /// one while its overlap lasts.
    pub fn signing_secrets(&self, now: UnixSeconds) -> Vec<&SealedSecret> {
        let mut secrets = vec![&self.secret];
        if let Some((previous, until)) = &self.previous_secret
            && now < *until
        {
            secrets.push(previous);
        }
        secrets
    }
}

/// A signing secret as stored: sealed with the deployment's key, or marked plain.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedSecret(pub String);

impl std::fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealedSecret(..)")
    }
}

fn check_name(name: String) -> Result<String> {
    let chars = name.chars().count();
    if !(1..=MAX_ENDPOINT_NAME_CHARS).contains(&chars) {
        return Err(Error::invalid(
            "name",
            format!("has {chars} characters; use 1 to {MAX_ENDPOINT_NAME_CHARS}"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::invalid(
            "name",
            "must not contain control characters",
        ));
    }
    Ok(name)
}

fn check_event_types(names: &[String]) -> Result<Vec<WebhookEventType>> {
    if names.is_empty() {
        return Err(Error::invalid(
            "event_types",
            "is empty; subscribe to at least one event type",
        ));
    }
    let mut types = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let kind = WebhookEventType::from_name(name).ok_or_else(|| {
            Error::invalid(
                format!("event_types[{i}]"),
                format!(
                    "`{}` is not an event type of batchd; use {}",
                    name.chars().take(40).collect::<String>().escape_debug(),
                    WebhookEventType::ALL
                        .map(WebhookEventType::as_str)
                        .join(", ")
                ),
            )
        })?;
        types.push(kind);
    }
    types.sort_by_key(|kind| WebhookEventType::ALL.iter().position(|k| k == kind));
    types.dedup();
    Ok(types)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, url: &str, types: &[&str]) -> EndpointInput {
        EndpointInput {
            name: Some(name.to_owned()),
            url: Some(url.to_owned()),
            event_types: Some(types.iter().map(|t| (*t).to_owned()).collect()),
        }
    }

    fn field_of(result: Result<EndpointSettings>) -> String {
        match result.unwrap_err() {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn a_create_is_checked_field_by_field() {
        let policy = DestinationPolicy::default();
        let settings = EndpointSettings::create(
            input(
                "ops",
                "https://hooks.example.com/b",
                &["batch.failed", "batch.completed", "batch.failed"],
            ),
            &policy,
        )
        .unwrap();
        assert_eq!(
            settings.event_types,
            [
                WebhookEventType::BatchCompleted,
                WebhookEventType::BatchFailed
            ],
            "distinct, in a fixed order"
        );
        let long = "n".repeat(MAX_ENDPOINT_NAME_CHARS + 1);
        let cases = [
            (
                input("", "https://a.example/", &["batch.completed"]),
                "name",
            ),
            (
                input(&long, "https://a.example/", &["batch.completed"]),
                "name",
            ),
            (
                input("a\u{7}b", "https://a.example/", &["batch.completed"]),
                "name",
            ),
            (
                input("ops", "https://127.0.0.1/", &["batch.completed"]),
                "url",
            ),
            (
                input("ops", "http://a.example/", &["batch.completed"]),
                "url",
            ),
            (input("ops", "https://a.example/", &[]), "event_types"),
            (
                input(
                    "ops",
                    "https://a.example/",
                    &["batch.completed", "response.completed"],
                ),
                "event_types[1]",
            ),
        ];
        for (bad, field) in cases {
            assert_eq!(field_of(EndpointSettings::create(bad, &policy)), field);
        }
        let missing = EndpointInput {
            url: None,
            ..input("ops", "https://a.example/", &["batch.completed"])
        };
        assert_eq!(field_of(EndpointSettings::create(missing, &policy)), "url");
    }

    #[test]
    fn an_update_replaces_only_what_it_carries() {
        let policy = DestinationPolicy::default();
        let current = EndpointSettings::create(
            input("ops", "https://a.example/", &["batch.completed"]),
            &policy,
        )
        .unwrap();
        let renamed = current
            .clone()
            .update(
                EndpointInput {
                    name: Some("ops-2".into()),
                    ..Default::default()
                },
                &policy,
            )
            .unwrap();
        assert_eq!(renamed.name, "ops-2");
        assert_eq!(
            (renamed.url, renamed.event_types),
            (current.url.clone(), current.event_types.clone())
        );
        let refused = current.update(
            EndpointInput {
                url: Some("https://10.0.0.1/".into()),
                ..Default::default()
            },
            &policy,
        );
        assert_eq!(field_of(refused), "url");
    }
}
