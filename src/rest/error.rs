//! Errors in OpenAI's envelope, `{"error": {"message", "type", "param", "code"}}`, with
//! the HTTP statuses the OpenAI SDKs map to their exception classes.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::{IntoResponses, ToSchema};

use crate::error::Error;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The error object of OpenAI's envelope.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A human-readable explanation, naming the value at fault.
    pub message: String,
    /// `invalid_request_error` for client errors, `server_error` for server errors.
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: &'static str,
    /// The request field or parameter at fault, if one is.
    #[schema(required = true)]
    pub param: Option<String>,
    /// A machine-readable code, e.g. `invalid_value` or `invalid_api_key`.
    #[schema(required = true)]
    pub code: Option<&'static str>,
}

/// An error response of the REST shim.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    /// When to come back, on a 429 that knows: `Retry-After` (whole seconds, at least
    /// 1) and `retry-after-ms`, both read by OpenAI's SDKs.
    retry_after: Option<std::time::Duration>,
    /// `x-should-retry`, where the answer is known: OpenAI's SDKs obey it.
    should_retry: Option<bool>,
}

/// OpenAI's header for a retry delay in milliseconds, which its SDKs prefer to
/// `Retry-After`.
const RETRY_AFTER_MS: axum::http::HeaderName =
    axum::http::HeaderName::from_static("retry-after-ms");

/// OpenAI's header telling its SDKs whether to retry at all.
const SHOULD_RETRY: axum::http::HeaderName = axum::http::HeaderName::from_static("x-should-retry");

const CLIENT_ERROR: &str = "invalid_request_error";
const SERVER_ERROR: &str = "server_error";

impl ApiError {
    /// An error that the transport itself detects (bad JSON, wrong media type, ...).
    pub fn transport(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let kind = if status.is_server_error() {
            SERVER_ERROR
        } else {
            CLIENT_ERROR
        };
        ApiError {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    message: message.into(),
                    kind,
                    param: None,
                    code: Some(code),
                },
            },
            retry_after: None,
            should_retry: None,
        }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The envelope, for transports that send it inside a stream.
    pub fn into_body(self) -> ErrorBody {
        self.body
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> ApiError {
        error.log_detail();
        // Every variant picks its HTTP status (the ones the OpenAI SDKs map to their
        // exception classes) and OpenAI-style code; no catch-all arm, so a new variant
        // does not build until it has them.
        let (status, kind, code) = match &error {
            Error::InvalidArgument { .. } => {
                (StatusCode::BAD_REQUEST, CLIENT_ERROR, "invalid_value")
            }
            Error::Unauthenticated(_) => {
                (StatusCode::UNAUTHORIZED, CLIENT_ERROR, "invalid_api_key")
            }
            Error::PermissionDenied { .. } => (
                StatusCode::FORBIDDEN,
                CLIENT_ERROR,
                "insufficient_permissions",
            ),
            Error::BatchNotFound(_) | Error::ApiKeyNotFound(_) | Error::NotFound { .. } => {
                (StatusCode::NOT_FOUND, CLIENT_ERROR, "not_found")
            }
            Error::IllegalTransition { .. } | Error::FailedPrecondition(_) => {
                (StatusCode::CONFLICT, CLIENT_ERROR, "invalid_state")
            }
            Error::VersionMismatch { .. } | Error::Contended(_) => {
                (StatusCode::CONFLICT, CLIENT_ERROR, "conflict")
            }
            Error::IdempotencyKeyReused(_) => {
                (StatusCode::CONFLICT, CLIENT_ERROR, "idempotency_key_reused")
            }
            Error::FeedCompacted { .. } => (StatusCode::GONE, CLIENT_ERROR, "cursor_expired"),
            Error::TooManyWatches { .. } | Error::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                CLIENT_ERROR,
                "rate_limit_exceeded",
            ),
            Error::ActiveBatchLimit { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                CLIENT_ERROR,
                "active_batch_limit_reached",
            ),
            Error::Unavailable(_) | Error::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                SERVER_ERROR,
                "service_unavailable",
            ),
            Error::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                SERVER_ERROR,
                "internal_error",
            ),
        };
        let retry_after = match &error {
            Error::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        };
        // Retrying cannot help until one of the owner's batches ends: OpenAI's SDKs
        // honour this header and do not retry.
        let should_retry = match &error {
            Error::ActiveBatchLimit { .. } => Some(false),
            _ => None,
        };
        ApiError {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    message: error.to_string(),
                    kind,
                    param: error.field().map(str::to_owned),
                    code: Some(code),
                },
            },
            retry_after,
            should_retry,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        let headers = response.headers_mut();
        if let Some(wait) = self.retry_after {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            headers.insert(axum::http::header::RETRY_AFTER, seconds.into());
            // Rounded up: a retry at the stated time finds its token there.
            let millis = u64::try_from(wait.as_micros().div_ceil(1_000))
                .unwrap_or(u64::MAX)
                .max(1);
            headers.insert(RETRY_AFTER_MS, millis.into());
        }
        if let Some(retry) = self.should_retry {
            let value = if retry { "true" } else { "false" };
            headers.insert(SHOULD_RETRY, axum::http::HeaderValue::from_static(value));
        }
        response
    }
}

/// The error responses every batch route may give, for the OpenAPI document.
#[derive(IntoResponses)]
#[allow(dead_code)] // only its OpenAPI description is used
pub enum ErrorResponses {
    /// A parameter or field is invalid; `param` names it.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No API key, or an unknown or revoked one.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The API key's scope does not allow the operation.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// No such batch (or it belongs to someone else), or no such route.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The batch's status does not allow the operation.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// The body is larger than 1 MiB.
    #[response(status = 413)]
    PayloadTooLarge(ErrorBody),
    /// The body is not `application/json`.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// The change feed cursor is older than the retained log; list again.
    #[response(status = 410)]
    Gone(ErrorBody),
    /// A limit was reached: the API key's request rate (with `Retry-After`,
    /// `retry-after-ms` and `x-ratelimit-*`), the owner's active batches
    /// (`active_batch_limit_reached`), open watch streams per key, webhook requests in
    /// flight.
    #[response(status = 429)]
    TooManyRequests(ErrorBody),
    /// A bug; nothing internal is disclosed.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// The database is unavailable; retry later.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use tonic::Code;

    use super::ApiError;
    use crate::error::Error;

    /// The two transports' matches are written apart; this is the table they must
    /// agree on, one error of every variant.
    #[test]
    fn both_transports_give_each_error_the_status_of_the_same_meaning() {
        let cases = [
            (
                Error::invalid("limit", "0"),
                Code::InvalidArgument,
                StatusCode::BAD_REQUEST,
            ),
            (
                Error::Unauthenticated("no key"),
                Code::Unauthenticated,
                StatusCode::UNAUTHORIZED,
            ),
            (
                Error::PermissionDenied {
                    scope: "worker",
                    action: "create batches",
                },
                Code::PermissionDenied,
                StatusCode::FORBIDDEN,
            ),
            (
                Error::BatchNotFound("b".into()),
                Code::NotFound,
                StatusCode::NOT_FOUND,
            ),
            (
                Error::ApiKeyNotFound("k".into()),
                Code::NotFound,
                StatusCode::NOT_FOUND,
            ),
            (
                Error::NotFound {
                    what: "webhook endpoint",
                    id: "we_1".into(),
                },
                Code::NotFound,
                StatusCode::NOT_FOUND,
            ),
            (
                Error::IllegalTransition {
                    from: "completed",
                    to: "cancelling",
                },
                Code::FailedPrecondition,
                StatusCode::CONFLICT,
            ),
            (
                Error::FailedPrecondition("final".into()),
                Code::FailedPrecondition,
                StatusCode::CONFLICT,
            ),
            (
                Error::IdempotencyKeyReused("k".into()),
                Code::AlreadyExists,
                StatusCode::CONFLICT,
            ),
            (
                Error::VersionMismatch {
                    expected: 1,
                    actual: 2,
                },
                Code::Aborted,
                StatusCode::CONFLICT,
            ),
            (
                Error::Contended("b".into()),
                Code::Aborted,
                StatusCode::CONFLICT,
            ),
            (
                Error::FeedCompacted {
                    after: "0.1".into(),
                    oldest: "0.9".into(),
                },
                Code::FailedPrecondition,
                StatusCode::GONE,
            ),
            (
                Error::TooManyWatches { limit: 1 },
                Code::ResourceExhausted,
                StatusCode::TOO_MANY_REQUESTS,
            ),
            (
                Error::RateLimited {
                    reason: "busy".into(),
                    retry_after: std::time::Duration::from_secs(2),
                },
                Code::ResourceExhausted,
                StatusCode::TOO_MANY_REQUESTS,
            ),
            (
                Error::ActiveBatchLimit { limit: 5 },
                Code::ResourceExhausted,
                StatusCode::TOO_MANY_REQUESTS,
            ),
            (
                Error::ShuttingDown,
                Code::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                Error::Unavailable("down".into()),
                Code::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                Error::Internal("bug".into()),
                Code::Internal,
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (error, grpc, http) in cases {
            let name = format!("{error:?}");
            assert_eq!(tonic::Status::from(error.clone()).code(), grpc, "{name}");
            assert_eq!(ApiError::from(error).status(), http, "{name}");
        }
    }
}
