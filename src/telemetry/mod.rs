//! What batchd tells operators: logs (text or JSON lines on stderr, filtered with
//! `RUST_LOG`), OpenTelemetry traces over OTLP when the standard `OTEL_*` variables ask
//! for them, W3C trace context taken from incoming requests, and Prometheus metrics.

pub mod grpc;
pub mod http;
pub mod metrics;

use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Keeps the trace exporter alive; flushes it when dropped.
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer_provider.take()
            && let Err(error) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            eprintln!("batchd: flushing traces failed: {error}");
        }
    }
}

/// Installs the global subscriber: logs on stderr (stdout carries command output, such
/// as new API keys) and, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or its traces variant) is
/// set, an OTLP trace exporter. Without it no OpenTelemetry layer is installed at all,
/// so nothing is exported and nothing slows down. Call once, at the start of `main`.
pub fn init(format: LogFormat) -> anyhow::Result<Telemetry> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(colors_on_stderr())
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed(),
    };
    let tracer_provider = otlp_requested().then(tracer_provider).transpose()?;
    let traces = tracer_provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("batchd"))
            // The exporter sees batchd's own spans down to `debug`, whatever RUST_LOG
            // says about log lines, so traces stay complete. Requests' spans and the
            // spans inside them (service, store) are `debug`: without an exporter and
            // with logs at `info` they are never created, which spares every request
            // their cost (the logs layer formatted a request span's fields whether or
            // not a line was written in it). A log line written during a request names
            // its batch itself; RUST_LOG=debug shows the request spans too.
            .with_filter(EnvFilter::new("batchd=debug,tower_http=info"))
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .context("a tracing subscriber is already installed")?;
    Ok(Telemetry { tracer_provider })
}

/// Colours in text logs only for a person at a terminal: escape codes in a file or a
/// log collector's pipe (Kubernetes, journald) are noise in every line, and writing
/// them cost each request's span about 2 % of batchd's instructions (callgrind).
/// `NO_COLOR` (set and not empty) turns them off at a terminal too.
fn colors_on_stderr() -> bool {
    use std::io::IsTerminal as _;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
    std::io::stderr().is_terminal() && !no_color
}

fn otlp_requested() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// An OTLP exporter configured from the standard variables (endpoint, protocol,
/// headers, timeout) with a resource from `OTEL_SERVICE_NAME` and
/// `OTEL_RESOURCE_ATTRIBUTES` (service name `batchd` when neither names one).
fn tracer_provider() -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .build()
        .context("cannot build the OTLP trace exporter from the OTEL_* variables")?;
    let named_by_env = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| a.contains("service.name="));
    let mut resource = Resource::builder();
    if !named_by_env {
        resource = resource.with_service_name("batchd");
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Continues the caller's trace: makes the W3C `traceparent` (and `tracestate`) of an
/// incoming request, if any, the parent of `span`.
pub fn continue_trace(span: &tracing::Span, headers: &::http::HeaderMap) {
    let parent =
        TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    // Fails only when no OpenTelemetry layer is installed, when there is no trace to
    // continue anyway.
    let _ = span.set_parent(parent);
}
