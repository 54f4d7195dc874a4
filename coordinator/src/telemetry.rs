//! Distributed tracing: W3C trace context in, OpenTelemetry spans out over
//! OTLP/gRPC.
//!
//! Off unless `--otlp-endpoint` is given, and then nothing here runs: no
//! span is made and no header is read, so the untraced path pays one
//! relaxed atomic load per request. On:
//!
//! * every request served gets a server span ([`server_span`], from
//!   `net::Tracked`) whose parent is the caller's `traceparent` header,
//!   when it sends one;
//! * Begin stores its span's context with the transaction
//!   (`TxnRecord::trace`, [`current`]), so that phase-2 calls, made now
//!   or by another node or after a restart, join the trace that began it;
//! * each phase-2 call is a client span ([`phase2_span`]), a child of that
//!   stored context, and carries its own `traceparent` to the participant
//!   ([`inject`]).
//!
//! Spans are batched and exported by OpenTelemetry's SDK on a thread of
//! its own; a collector that is down costs dropped spans, never a blocked
//! request. [`Telemetry::shutdown`] flushes what is left, bounded by the
//! exporter's timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header (and stored form) of a trace context.
pub const TRACEPARENT: &str = "traceparent";

/// How long one export may take before it is abandoned.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (and so made at all).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The exporter pipeline; flush it with [`Telemetry::shutdown`] at exit.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Starts exporting spans of `service` to the OTLP/gRPC collector at
    /// `endpoint`; returns the pipeline and the layer to add to the
    /// subscriber, which takes the spans and events (INFO and up) of this
    /// project's crates only. Must run inside the tokio runtime (the
    /// exporter's channel lives on it); connects lazily, so a collector
    /// that is not up yet is not an error.
    pub fn start<S>(
        endpoint: &str,
        service: &'static str,
    ) -> Result<(Telemetry, impl tracing_subscriber::Layer<S>), String>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        use tracing_subscriber::Layer as _;
        use tracing_subscriber::filter::{LevelFilter, Targets};
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?;
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
        let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
        let ours = Targets::new()
            .with_target("tcc_coordinator", LevelFilter::INFO)
            .with_target("tcc_domain_sdk", LevelFilter::INFO)
            .with_target("tcc_demo_services", LevelFilter::INFO);
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer(service)).with_filter(ours);
        ENABLED.store(true, Ordering::Relaxed);
        Ok((Telemetry { provider }, layer))
    }

    /// Exports the spans still buffered and stops. Blocks (up to the
    /// export timeout): call it off the runtime's worker threads.
    pub fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(cause = %e, "could not export the last spans");
        }
    }
}

/// A server span for one request to `path`, the child of the caller's
/// trace context in `headers` (a root when it sent none).
pub fn server_span(path: &str, headers: &http::HeaderMap) -> tracing::Span {
    let span = tracing::info_span!("rpc", otel.name = %path.trim_start_matches('/'), otel.kind = "server", rpc.system = "grpc");
    if headers.contains_key(TRACEPARENT) {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        let _ = span.set_parent(parent);
    }
    span
}

/// The span of a phase-2 call (`verb` is "Commit" or "Rollback") to
/// `service`, the child of the transaction's stored trace context.
pub fn phase2_span(trace: &str, verb: &'static str, service: &str, txn: &str) -> tracing::Span {
    let span = tracing::info_span!(
        "phase2",
        otel.name = %format_args!("tcc.v1.Participant/{verb}"),
        otel.kind = "client",
        rpc.system = "grpc",
        tcc.service = %service,
        tcc.transaction_id = %txn,
    );
    if !trace.is_empty() {
        let carrier = HashMap::from([(TRACEPARENT.to_string(), trace.to_string())]);
        let _ = span.set_parent(TraceContextPropagator::new().extract(&carrier));
    }
    span
}

/// The current span's trace context as a `traceparent` value, or ""
/// when tracing is off or there is none.
pub fn current() -> String {
    if !enabled() {
        return String::new();
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&tracing::Span::current().context(), &mut carrier);
    carrier.remove(TRACEPARENT).unwrap_or_default()
}

/// Adds the current span's trace context to an outgoing request.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let traceparent = current();
    if let Ok(value) = traceparent.parse() {
        if !traceparent.is_empty() {
            metadata.insert(TRACEPARENT, value);
        }
    }
}

/// Reads W3C headers out of an HTTP request.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}
