//! Request extractors that report failures in OpenAI's error envelope: the caller
//! behind the API key (within its request rate, whose budget goes on the answer), a
//! JSON body and a query string, each naming the field at fault.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use serde::de::DeserializeOwned;

use super::RestState;
use super::error::ApiError;
use crate::domain::Caller;
use crate::error::Error;
use crate::request_rates::RequestBudget;
use crate::service::bearer_token;

/// The header Portkey-style clients send their key in, as an alternative to
/// `Authorization: Bearer`.
pub const PORTKEY_API_KEY: &str = "x-portkey-api-key";

/// The authenticated caller of a request, admitted within its key's request rate.
pub struct Authenticated(pub Caller);

impl FromRequestParts<RestState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &RestState) -> Result<Self, ApiError> {
        let token = api_key(&parts.headers)?;
        let (outcome, budget) = match state.service.admit(token).await {
            Ok(admitted) => (Ok(Authenticated(admitted.caller)), admitted.budget),
            Err(refused) => {
                if refused.budget.is_some() {
                    metrics::counter!("batchd_rate_limited_total", "transport" => "http")
                        .increment(1);
                }
                (Err(refused.error.into()), refused.budget)
            }
        };
        if let (Some(budget), Some(slot)) = (budget, parts.extensions.get::<BudgetSlot>()) {
            let _ = slot.0.set(budget);
        }
        outcome
    }
}

/// Where [`Authenticated`] leaves the key's request budget for
/// [`request_budget_headers`] to put on the answer, whatever the handler answers.
#[derive(Clone, Default)]
pub struct BudgetSlot(Arc<OnceLock<RequestBudget>>);

/// Puts OpenAI's `x-ratelimit-{limit,remaining,reset}-requests` on every answer to a
/// request whose key has a request rate, a 429 of that rate included.
pub async fn request_budget_headers(mut request: Request, next: Next) -> Response {
    let slot = BudgetSlot::default();
    request.extensions_mut().insert(slot.clone());
    let mut response = next.run(request).await;
    if let Some(budget) = slot.0.get() {
        let headers = response.headers_mut();
        headers.insert(LIMIT_REQUESTS, budget.limit.into());
        headers.insert(REMAINING_REQUESTS, budget.remaining.into());
        if let Ok(reset) = HeaderValue::from_str(&reset_text(budget.reset)) {
            headers.insert(RESET_REQUESTS, reset);
        }
    }
    response
}

const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");

/// A reset time as OpenAI writes it: `250ms`, `1.5s`, `6m0s`.
fn reset_text(reset: Duration) -> String {
    let millis = reset.as_millis();
    match millis {
        0..1_000 => format!("{millis}ms"),
        1_000..60_000 => {
            let seconds = format!("{:.3}", reset.as_secs_f64());
            format!("{}s", seconds.trim_end_matches('0').trim_end_matches('.'))
        }
        _ => format!("{}m{}s", millis / 60_000, (millis % 60_000) / 1_000),
    }
}

/// The API key of a request: `Authorization: Bearer <key>`, else `x-portkey-api-key`.
fn api_key(headers: &HeaderMap) -> Result<Option<&str>, Error> {
    fn text(value: &axum::http::HeaderValue) -> Result<&str, Error> {
        value
            .to_str()
            .map_err(|_| Error::Unauthenticated("malformed API key header: not ASCII"))
    }
    if let Some(value) = headers.get(AUTHORIZATION) {
        return Ok(Some(bearer_token(text(value)?)?));
    }
    headers.get(PORTKEY_API_KEY).map(text).transpose()
}

/// A JSON request body. Checks the media type, refuses bodies over the router's
/// limit before parsing, and names the field of a type error (`param`).
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(request.headers()) {
            return Err(ApiError::transport(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the request body must be JSON, sent with `Content-Type: application/json`",
            ));
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::transport(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "request_too_large",
                        format!("the request body exceeds {} bytes", super::MAX_BODY_BYTES),
                    )
                } else {
                    ApiError::transport(
                        StatusCode::BAD_REQUEST,
                        "invalid_body",
                        format!("the request body could not be read: {rejection}"),
                    )
                }
            })?;
        let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
            if error.inner().is_data() {
                field_error(error.path().to_string(), error.inner().to_string())
            } else {
                not_json(error.inner())
            }
        })?;
        // Trailing content after the JSON value ("{} x") is malformed too.
        deserializer.end().map_err(|error| not_json(&error))?;
        Ok(JsonBody(value))
    }
}

fn not_json(error: &serde_json::Error) -> ApiError {
    ApiError::transport(
        StatusCode::BAD_REQUEST,
        "invalid_json",
        format!("the request body is not valid JSON: {error}"),
    )
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A 400 for the field at `path` (`.` is the whole value, when a field is missing).
fn field_error(path: String, reason: String) -> ApiError {
    if path == "." {
        Error::invalid("body", reason).into()
    } else {
        Error::invalid(path, reason).into()
    }
}

/// Query parameters, naming the parameter at fault in a 400.
pub struct QueryParams<T>(pub T);

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(QueryParams)
            .map_err(|error| field_error(error.path().to_string(), error.inner().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::reset_text;
    use std::time::Duration;

    #[test]
    fn reset_times_are_written_as_openai_writes_them() {
        assert_eq!(reset_text(Duration::from_millis(250)), "250ms");
        assert_eq!(reset_text(Duration::from_millis(1_500)), "1.5s");
        assert_eq!(reset_text(Duration::from_secs(2)), "2s");
        assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
    }
}
