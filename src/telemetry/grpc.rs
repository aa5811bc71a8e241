//! Observation of the gRPC port, as a tower layer around every service: one span per
//! call (continuing the caller's W3C trace from the metadata), and request count and
//! latency per RPC and final status. The status of a call is its `grpc-status`: in the
//! response headers when the call failed at once, otherwise in the trailers at the end
//! of the body, which is where a streaming call ends too; the body is wrapped to read it.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use prost::Message as _;
use tower::{Layer, Service};
use tracing::field::Empty;
use tracing::{Instrument, Span};

use super::continue_trace;
use super::http::record_request;

/// The layer to add to the tonic server.
#[derive(Debug, Clone, Copy, Default)]
pub struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

/// See [`ObserveLayer`].
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
}

impl<S, B, ResBody> Service<http::Request<B>> for Observe<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body<Data = bytes::Bytes>,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // "batchd.v1.BatchService/GetBatch" when it is an RPC batchd serves; any other
        // path is a client's choice, and a label per path would let anyone grow the
        // metrics without bound, so all of them are one `unknown`.
        let rpc = known_rpc(request.uri().path());
        let (service, method) = rpc.split_once('/').unwrap_or((rpc, ""));
        // `debug`, like the spans inside it and tower-http's request spans: the trace
        // exporter sees it, logs at `info` do not create it (see `telemetry::init`).
        let span = tracing::debug_span!(
            "grpc_request",
            otel.name = %rpc,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = Empty,
        );
        continue_trace(&span, request.headers());
        let started = Instant::now();
        let call = self.inner.call(request).instrument(span.clone());
        Box::pin(async move {
            let response = call.await?;
            // Present when the call failed before any message ("trailers-only").
            let immediate = grpc_status(response.headers());
            Ok(response.map(|body| ObservedBody {
                body,
                call: Some(Finished {
                    rpc,
                    span,
                    started,
                    immediate,
                }),
            }))
        })
    }
}

/// The route label of calls to paths batchd does not serve.
pub const UNKNOWN_RPC: &str = "unknown";

/// Every RPC batchd serves, as `package.Service/Method`, read from the descriptors
/// of the services it registers (its own, health, reflection).
fn served_rpcs() -> &'static HashSet<String> {
    static RPCS: OnceLock<HashSet<String>> = OnceLock::new();
    RPCS.get_or_init(|| {
        crate::grpc::FILE_DESCRIPTOR_SETS
            .iter()
            .filter_map(|encoded| prost_types::FileDescriptorSet::decode(*encoded).ok())
            .flat_map(|set| set.file)
            .flat_map(|file| {
                let package = file.package.unwrap_or_default();
                file.service.into_iter().flat_map(move |service| {
                    let service_name = format!("{package}.{}", service.name.unwrap_or_default());
                    service.method.into_iter().map(move |method| {
                        format!("{service_name}/{}", method.name.unwrap_or_default())
                    })
                })
            })
            .collect()
    })
}

/// The route label of a request path: the RPC when batchd serves it, else
/// [`UNKNOWN_RPC`]. The label set is closed: it cannot grow with what clients send.
pub fn known_rpc(path: &str) -> &'static str {
    let rpc = path.strip_prefix('/').unwrap_or(path);
    served_rpcs()
        .get(rpc)
        .map_or(UNKNOWN_RPC, |known| known.as_str())
}

/// Every route label gRPC requests can have.
pub fn rpc_labels() -> impl Iterator<Item = &'static str> {
    served_rpcs()
        .iter()
        .map(String::as_str)
        .chain(std::iter::once(UNKNOWN_RPC))
}

/// What is recorded when a call ends.
struct Finished {
    rpc: &'static str,
    span: Span,
    started: Instant,
    immediate: Option<i32>,
}

impl Finished {
    fn record(self, status: i32) {
        self.span.record("rpc.grpc.status_code", status);
        record_request(
            "grpc",
            self.rpc,
            grpc_status_label(status),
            self.started.elapsed(),
        );
    }
}

/// The status label: one of gRPC's 17 codes (a status outside them is UNKNOWN, as
/// gRPC itself treats it), so this label set is closed too.
fn grpc_status_label(status: i32) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    usize::try_from(status)
        .ok()
        .and_then(|code| CODES.get(code))
        .copied()
        .unwrap_or(CODES[UNKNOWN as usize])
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// gRPC's CANCELLED: the client went away before the call ended.
const CANCELLED: i32 = 1;
/// gRPC's UNKNOWN: the body ended without a status.
const UNKNOWN: i32 = 2;

pin_project! {
    /// A response body that records the call when its final status passes by.
    pub struct ObservedBody<B> {
        #[pin]
        body: B,
        call: Option<Finished>,
    }

    impl<B> PinnedDrop for ObservedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // A trailers-only response may be dropped unpolled; its status was in the
            // headers. Otherwise the client went away mid-call.
            if let Some(call) = this.project().call.take() {
                let status = call.immediate.unwrap_or(CANCELLED);
                call.record(status);
            }
        }
    }
}

impl<B: Body<Data = bytes::Bytes>> Body for ObservedBody<B> {
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.body.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(status) = frame.trailers_ref().and_then(grpc_status)
                    && let Some(call) = this.call.take()
                {
                    call.record(status);
                }
            }
            None | Some(Err(_)) => {
                if let Some(call) = this.call.take() {
                    let status = call.immediate.unwrap_or(UNKNOWN);
                    call.record(status);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
