//! Tracing across processes, against an OTLP collector in the test: one
//! shop order is one connected trace across the coordinator and the four
//! shop services; a phase-2 call made after a restart still joins the
//! trace of the Begin that started its transaction.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tcc_proto::v1;
use tcc_tests::shop::Shop;
use tcc_tests::{Coordinator, TestParticipant};
use tokio::sync::watch;

/// A span as the collector received it.
#[derive(Clone, Debug)]
struct Seen {
    service: String,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
}

/// An OTLP/gRPC trace collector on a loopback port: keeps every span and
/// counts arrivals.
#[derive(Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Seen>>>,
    arrived: Arc<watch::Sender<usize>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut seen = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                seen.push(Seen {
                    service: service.clone(),
                    name: span.name,
                    trace: span.trace_id,
                    id: span.span_id,
                    parent: span.parent_span_id,
                });
            }
        }
        let total = {
            let mut spans = self.spans.lock().unwrap();
            spans.extend(seen);
            spans.len()
        };
        self.arrived.send_replace(total);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    /// Serves on a free loopback port; returns the collector and its URL.
    async fn start() -> Result<(Collector, String)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (arrived, _) = watch::channel(0);
        let collector = Collector { spans: Arc::default(), arrived: Arc::new(arrived) };
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
        });
        Ok((collector, url))
    }

    fn spans(&self) -> Vec<Seen> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits (on arrivals, at most `limit`) until `done` holds for the
    /// spans received; returns them.
    async fn until(&self, what: &str, limit: Duration, done: impl Fn(&[Seen]) -> bool) -> Result<Vec<Seen>> {
        let mut arrived = self.arrived.subscribe();
        let waited = tokio::time::timeout(limit, async {
            loop {
                let spans = self.spans();
                if done(&spans) {
                    return spans;
                }
                if arrived.changed().await.is_err() {
                    return spans;
                }
            }
        })
        .await;
        match waited {
            Ok(spans) if done(&spans) => Ok(spans),
            _ => bail!("{what}: not seen within {limit:?}; spans so far:\n{}", describe(&self.spans())),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn describe(spans: &[Seen]) -> String {
    spans
        .iter()
        .map(|s| {
            format!("  {} {} trace={} id={} parent={}", s.service, s.name, hex(&s.trace), hex(&s.id), hex(&s.parent))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const SERVICES: [&str; 5] = ["tcc-coordinator", "shop", "customers", "inventory", "orders"];

#[tokio::test]
async fn one_shop_order_is_one_connected_trace_across_the_five_processes() -> Result<()> {
    let (collector, url) = Collector::start().await?;
    let mut shop = Shop::start_traced(&url).await?;
    shop.seed(&[("alice", 100)], &[("book", 10, 15)]).await?;
    let placed = shop.place("alice", &[("book", 2)]).await?;
    assert_eq!(placed.state, "TRANSACTION_STATE_CONFIRMED", "{placed:?}");

    // The order's trace: the one rooted at the shop's PlaceOrder.
    let root_of =
        |spans: &[Seen]| spans.iter().find(|s| s.service == "shop" && s.name == "shop.v1.Shop/PlaceOrder").cloned();
    let complete = |spans: &[Seen]| {
        let Some(root) = root_of(spans) else { return false };
        let trace: Vec<&Seen> = spans.iter().filter(|s| s.trace == root.trace).collect();
        let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
        // Every process, and the three commits both sent and received.
        let sent =
            trace.iter().filter(|s| s.service == "tcc-coordinator" && s.name == "tcc.v1.Participant/Commit").count();
        let received =
            trace.iter().filter(|s| s.service != "tcc-coordinator" && s.name == "tcc.v1.Participant/Commit").count();
        SERVICES.iter().all(|s| services.contains(s)) && sent >= 3 && received >= 3
    };
    let spans = collector.until("the order's whole trace", Duration::from_secs(60), complete).await?;
    let root = root_of(&spans).context("no root")?;
    let trace: Vec<&Seen> = spans.iter().filter(|s| s.trace == root.trace).collect();

    // Connected: one root (the order), and every other span's parent is a
    // span of the same trace.
    let ids: HashMap<&[u8], &Seen> = trace.iter().map(|s| (s.id.as_slice(), *s)).collect();
    let roots: Vec<&&Seen> = trace.iter().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(roots.len(), 1, "more than one root:\n{}", describe(&spans));
    for s in &trace {
        if !s.parent.is_empty() {
            assert!(
                ids.contains_key(s.parent.as_slice()),
                "{} {} has a parent outside the trace:\n{}",
                s.service,
                s.name,
                describe(&spans)
            );
        }
    }
    // The path of a commit: the shop's order → Begin at the coordinator →
    // the coordinator's phase-2 call → the participant's Commit.
    let begin = trace.iter().find(|s| s.name == "tcc.v1.Transactions/Begin").context("no Begin span")?;
    assert_eq!(begin.parent, root.id, "Begin is not a child of the order");
    for participant in ["customers", "inventory", "orders"] {
        let served = trace
            .iter()
            .find(|s| s.service == participant && s.name == "tcc.v1.Participant/Commit")
            .with_context(|| format!("{participant} served no Commit in the trace"))?;
        let call = ids.get(served.parent.as_slice()).context("commit parent")?;
        assert_eq!((call.service.as_str(), call.name.as_str()), ("tcc-coordinator", "tcc.v1.Participant/Commit"));
        assert_eq!(call.parent, begin.id, "the phase-2 call does not descend from Begin");
        // And its try: the shop → the participant → Topics.Append at the coordinator.
        let tried = trace.iter().any(|s| s.service == participant && s.parent == root.id);
        assert!(tried, "{participant}'s try is not a child of the order:\n{}", describe(&spans));
    }
    let appends = trace.iter().filter(|s| s.service == "tcc-coordinator" && s.name == "tcc.v1.Topics/Append").count();
    assert!(appends >= 3, "{appends} appends in the trace");
    shop.check_conservation().await?;
    Ok(())
}

#[tokio::test]
async fn a_phase_two_call_after_a_restart_joins_the_trace_of_its_begin() -> Result<()> {
    let (collector, url) = Collector::start().await?;
    let mut c =
        Coordinator::start(&["--retry-initial-ms", "20", "--retry-max-ms", "200", "--otlp-endpoint", &url]).await?;
    // The caller's trace.
    let (trace_id, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut begin = tonic::Request::new(v1::BeginRequest { participants: vec!["late".into()], timeout_ms: 60_000 });
    begin.metadata_mut().insert("traceparent", format!("00-{trace_id}-{caller_span}-01").parse()?);
    let t = c.transactions().await?.begin(begin).await?.into_inner();
    // Decided while no endpoint of "late" is known: no call is made before
    // the crash.
    let confirm = v1::ConfirmRequest { transaction_id: t.transaction_id.clone(), wait: false, wait_timeout_ms: 0 };
    c.transactions().await?.confirm(confirm).await?;
    // A clean stop exports the spans made so far (Begin's among them); the
    // trace context the call will use is the one stored with the record.
    c.terminate().await?;
    c.restart().await?;
    let p = TestParticipant::start().await?;
    c.register("late", &p).await?;
    p.wait_for("the commit after the restart", |calls| calls.iter().any(|c| c.acked)).await?;

    let is_call = |s: &Seen| s.service == "tcc-coordinator" && s.name == "tcc.v1.Participant/Commit";
    let is_begin = |s: &Seen| s.service == "tcc-coordinator" && s.name == "tcc.v1.Transactions/Begin";
    let spans = collector
        .until("the Begin and phase-2 spans", Duration::from_secs(30), |spans| {
            spans.iter().any(is_call) && spans.iter().any(is_begin)
        })
        .await?;
    let begin_span = spans.iter().find(|s| is_begin(s)).context("no Begin span")?;
    assert_eq!(hex(&begin_span.trace), trace_id, "Begin left the caller's trace:\n{}", describe(&spans));
    assert_eq!(hex(&begin_span.parent), caller_span, "Begin is not a child of the caller's span");
    let call = spans.iter().find(|s| is_call(s)).context("no call span")?;
    assert_eq!(hex(&call.trace), trace_id, "the call after the restart left the caller's trace:\n{}", describe(&spans));
    assert_eq!(
        call.parent,
        begin_span.id,
        "the call after the restart is not a child of its Begin:\n{}",
        describe(&spans)
    );
    Ok(())
}
