//! W3C trace context (`traceparent`) across a composite transaction, with
//! `tracing` and OpenTelemetry (tracing-opentelemetry).
//!
//! * Outgoing: every call the SDK makes to the coordinator, and every call
//!   made through a client with [`crate::propagation::PropagateInterceptor`]
//!   (or [`TraceInterceptor`]), carries the current span's trace context.
//! * Incoming: [`TraceLayer`] on a tonic server gives every request a
//!   server span whose parent is the caller's trace context, so the
//!   service's own spans, its calls onward, and the coordinator's phase-2
//!   calls into it (which carry the context of the Begin that started the
//!   transaction) all join one trace.
//!
//! Without an OpenTelemetry layer in the application's subscriber, spans
//! carry no trace context and nothing is sent. The spans made here have the
//! target `tcc_domain_sdk::telemetry`: filter it out of log output (e.g.
//! `tcc_domain_sdk::telemetry=off` in the fmt layer's filter) to keep them
//! out of log lines. Exporting (OTLP or other) is the application's
//! choice; the demo services show one way.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::MetadataMap;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header of a trace context.
pub const TRACEPARENT: &str = "traceparent";

/// A channel whose calls carry the current trace context.
pub type Traced = InterceptedService<Channel, TraceInterceptor>;

/// Adds the current span's trace context to `metadata` (nothing when
/// the current span has none).
pub fn inject(metadata: &mut MetadataMap) {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&tracing::Span::current().context(), &mut carrier);
    if let Some(value) = carrier.remove(TRACEPARENT).and_then(|v| v.parse().ok()) {
        metadata.insert(TRACEPARENT, value);
    }
}

/// Client interceptor: adds the current span's trace context.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceInterceptor;

impl tonic::service::Interceptor for TraceInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        inject(request.metadata_mut());
        Ok(request)
    }
}

/// Tower layer for a tonic server: a server span per request, child of the
/// caller's trace context (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceLayer;

impl<S> tower::Layer<S> for TraceLayer {
    type Service = TraceService<S>;

    fn layer(&self, inner: S) -> TraceService<S> {
        TraceService(inner)
    }
}

/// The service [`TraceLayer`] makes.
#[derive(Clone, Debug)]
pub struct TraceService<S>(S);

impl<S, B> tower::Service<http::Request<B>> for TraceService<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let span = server_span(request.uri().path(), request.headers());
        let response = span.in_scope(|| self.0.call(request));
        Box::pin(response.instrument(span))
    }
}

/// A server span for a request to `path`, child of the trace context in
/// `headers` (a root when there is none).
pub fn server_span(path: &str, headers: &http::HeaderMap) -> tracing::Span {
    let span = tracing::info_span!("rpc", otel.name = %path.trim_start_matches('/'), otel.kind = "server", rpc.system = "grpc");
    if headers.contains_key(TRACEPARENT) {
        let _ = span.set_parent(TraceContextPropagator::new().extract(&Headers(headers)));
    }
    span
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}
