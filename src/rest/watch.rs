//! `GET /v1/batches/{batch_id}/watch`: the watch stream as Server-Sent Events. Each
//! message carries `id: <version>`, so a browser `EventSource` that reconnects sends
//! `Last-Event-ID` and resumes exactly where it stopped.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use serde::Deserialize;
use tokio_stream::{Stream, StreamExt};
use utoipa::IntoParams;

use super::RestState;
use super::batches::TAG;
use super::dto::BatchJson;
use super::error::{ApiError, ErrorResponses};
use super::extract::{Authenticated, QueryParams};
use crate::error::Error;
use crate::watch::WatchEvent;

/// The standard header an `EventSource` resumes with.
const LAST_EVENT_ID: &str = "last-event-id";

/// The query of the watch route.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WatchParams {
    /// The last version the client has: the stream starts after it. `Last-Event-ID`,
    /// when sent, takes precedence (it is what a reconnecting `EventSource` sends).
    #[param(minimum = 0)]
    pub after_version: Option<i64>,
}

/// Streams every committed version of a batch as Server-Sent Events: `snapshot`
/// (current state) first, or the versions after `Last-Event-ID`/`after_version`; then
/// one `change` per version; `heartbeat` while nothing changes. The stream ends after
/// the terminal status; an `error` event (OpenAI's error envelope) ends it early.
#[utoipa::path(
    get,
    path = "/v1/batches/{batch_id}/watch",
    tag = TAG,
    operation_id = "watchBatch",
    params(
        ("batch_id" = String, Path, description = "The id of the batch"),
        WatchParams,
        ("Last-Event-ID" = Option<i64>, Header, description = "The last version received; resumes after it"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: `id: <version>`, `event: snapshot|change|heartbeat|error`, `data: <batch JSON>`", content_type = "text/event-stream", body = String),
        ErrorResponses
    ),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn watch_batch(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    Path(batch_id): Path<String>,
    QueryParams(params): QueryParams<WatchParams>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let after_version = match headers.get(LAST_EVENT_ID) {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<i64>().ok())
                .ok_or_else(|| {
                    Error::invalid("Last-Event-ID", "must be a version number (an integer)")
                })?,
        ),
        None => params.after_version,
    };
    let events = state
        .service
        .watch_batch(&caller, &batch_id, after_version)
        .await?;
    Ok(Sse::new(events.map(|item| {
        Ok(match item {
            Ok(event) => sse_event(event),
            Err(error) => error_event(error),
        })
    })))
}

fn sse_event(event: WatchEvent) -> Event {
    let name = event.kind.as_str();
    let version = event.batch.version;
    let json = BatchJson::from(Arc::unwrap_or_clone(event.batch));
    match Event::default()
        .event(name)
        .id(version.to_string())
        .json_data(json)
    {
        Ok(event) => event,
        Err(error) => error_event(Error::Internal(format!(
            "cannot encode a watch event: {error}"
        ))),
    }
}

fn error_event(error: Error) -> Event {
    let body = ApiError::from(error).into_body();
    Event::default()
        .event("error")
        .json_data(body)
        .unwrap_or_else(|_| Event::default().event("error"))
}
