//! The watch streams as Server-Sent Events: `GET /v1/batches/{batch_id}/watch` (one
//! batch; each message carries `id: <version>`) and `GET /v1/batch_events` (the change
//! feed; each message but `initial` carries `id: <cursor>`). A browser `EventSource`
//! that reconnects sends `Last-Event-ID` and resumes exactly where it stopped.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use serde::Deserialize;
use tokio_stream::{Stream, StreamExt};
use utoipa::IntoParams;

use super::RestState;
use super::batches::TAG;
use super::dto::{BatchJson, FilterParams, ListParams, query_bool};
use super::error::{ApiError, ErrorResponses};
use super::extract::{Authenticated, QueryParams};
use crate::domain::WatchBatchesInput;
use crate::error::Error;
use crate::watch::{FeedEvent, FeedEventKind, WatchEvent};

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

/// The query of the change feed route beyond a list's filters ([`FilterParams`]), as
/// the OpenAPI document describes it; parsed by [`parse_watch_batches`].
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documentation only: the fields are read by `parse_watch_batches`
pub struct WatchBatchesParams {
    /// Resume after this cursor (the `id` of an event). `Last-Event-ID` takes
    /// precedence.
    pub after_cursor: Option<String>,
    /// `true`: first every matching batch (`initial`), then `synced`. Ignored when
    /// `Last-Event-ID` is sent: a reconnecting `EventSource` resumes instead.
    pub send_initial_state: Option<bool>,
}

/// Parses the query of the change feed route: the list's filters, `after_cursor` and
/// `send_initial_state`; the list's own paging parameters are refused by the service.
fn parse_watch_batches(query: &str) -> Result<WatchBatchesInput, Error> {
    let filter = ListParams::parse(query)?;
    let mut input = WatchBatchesInput {
        filter,
        ..Default::default()
    };
    let mut seen = std::collections::BTreeSet::new();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        let name = match name.as_ref() {
            "after_cursor" => "after_cursor",
            "send_initial_state" => "send_initial_state",
            _ => continue,
        };
        if !seen.insert(name) {
            return Err(Error::invalid(name, "is given twice"));
        }
        if name == "after_cursor" {
            input.after_cursor = Some(value.into_owned());
        } else {
            input.send_initial_state = query_bool(name, &value)?;
        }
    }
    Ok(input)
}

/// Streams the change feed as Server-Sent Events: every committed change of every
/// batch the key may see that matches the filters, in commit order. With
/// `send_initial_state=true`, `initial` events (every matching batch) come first, then
/// `synced`; then `change` per committed version (`left_filter` when it took the batch
/// out of the status set, `deleted` with its `batch_id` when it was deleted) and
/// `bookmark` while nothing matches. Every event but
/// `initial` has `id: <cursor>`; reconnect with `Last-Event-ID` (or `after_cursor`) to
/// resume on any replica. A cursor older than the retained log is 410: list again.
#[utoipa::path(
    get,
    path = "/v1/batch_events",
    tag = TAG,
    operation_id = "watchBatches",
    params(
        FilterParams,
        WatchBatchesParams,
        ("Last-Event-ID" = Option<String>, Header, description = "The cursor of the last event received; resumes after it"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: `id: <cursor>`, `event: initial|synced|change|left_filter|bookmark|deleted|error`, `data: {\"type\", \"cursor\", \"batch\"}` (`deleted`: `batch_id` instead of `batch`)", content_type = "text/event-stream", body = String),
        ErrorResponses
    ),
    security(("bearer" = []), ("portkey" = []))
)]
pub async fn watch_batches(
    State(state): State<RestState>,
    Authenticated(caller): Authenticated,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let mut input = parse_watch_batches(query.as_deref().unwrap_or_default())?;
    if let Some(value) = headers.get(LAST_EVENT_ID) {
        let cursor = value
            .to_str()
            .map_err(|_| Error::invalid("Last-Event-ID", "must be a change feed cursor"))?;
        input.after_cursor = Some(cursor.trim().to_owned());
        input.send_initial_state = false;
    }
    let events = state
        .service
        .watch_batches(&caller, input)
        .await
        .map_err(|e| e.renaming_field("after_cursor", cursor_field(&headers)))?;
    Ok(Sse::new(events.map(|item| {
        Ok(match item {
            Ok(event) => feed_sse_event(event),
            Err(error) => error_event(error),
        })
    })))
}

/// The name of the input the cursor came from, for errors.
fn cursor_field(headers: &HeaderMap) -> &'static str {
    if headers.contains_key(LAST_EVENT_ID) {
        "Last-Event-ID"
    } else {
        "after_cursor"
    }
}

fn feed_sse_event(event: FeedEvent) -> Event {
    let name = event.kind.as_str();
    let mut data = serde_json::json!({ "type": name });
    if let Some(cursor) = &event.cursor {
        data["cursor"] = cursor.as_str().into();
    }
    if let (FeedEventKind::Deleted, Some(batch)) = (event.kind, &event.batch) {
        // A deletion names the batch; its last version is not sent again.
        data["batch_id"] = batch.id.as_str().into();
    } else if let Some(batch) = event.batch {
        match serde_json::to_value(BatchJson::from(Arc::unwrap_or_clone(batch))) {
            Ok(json) => data["batch"] = json,
            Err(error) => {
                return error_event(Error::Internal(format!(
                    "cannot encode a change feed event: {error}"
                )));
            }
        }
    }
    let mut sse = Event::default().event(name);
    if let Some(cursor) = event.cursor {
        sse = sse.id(cursor);
    }
    match sse.json_data(data) {
        Ok(event) => event,
        Err(error) => error_event(Error::Internal(format!(
            "cannot encode a change feed event: {error}"
        ))),
    }
}
