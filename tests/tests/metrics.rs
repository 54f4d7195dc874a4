//! `GET /metrics`: served over HTTP/1.1 on the gRPC port and on
//! `--http-listen`, with what happened (transactions begun, decided,
//! finished, phase-2 calls, retries, appends, the store, RPCs) and no ids
//! in labels; the Grafana dashboard and the alert rules in
//! `coordinator/ops/` use only metrics that are exported.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use tcc_coordinator::metrics::ALL;
use tcc_proto::v1::{self, TransactionState as S};
use tcc_tests::{Coordinator, TestParticipant, command, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /metrics` over HTTP/1.1: the status line and the body.
async fn scrape(addr: SocketAddr) -> Result<(String, String)> {
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    socket.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").await?;
    let mut answer = String::new();
    socket.read_to_string(&mut answer).await?;
    let (head, body) = answer.split_once("\r\n\r\n").context("no HTTP answer")?;
    Ok((head.lines().next().unwrap_or_default().to_string(), body.to_string()))
}

/// The value of the sample `name{labels}` (labels as exported, in order).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The metric names a PromQL expression uses (histogram series mapped to
/// their histogram).
fn used(expr: &str, into: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("tcc_") {
        let start = i + at;
        let end = start
            + expr[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(expr.len() - start);
        let name = &expr[start..end];
        let name = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        if start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            into.insert(name.to_string());
        }
        i = end;
    }
}

#[tokio::test]
async fn metrics_are_served_beside_grpc_and_say_what_happened() -> Result<()> {
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let http_arg = http.to_string();
    let c =
        Coordinator::start(&["--retry-initial-ms", "10", "--retry-max-ms", "20", "--http-listen", &http_arg]).await?;
    let p = TestParticipant::start().await?;
    c.register("svc", &p).await?;
    let mut tx = c.transactions().await?;
    // One confirmed after two failed commits, one cancelled, one left ACTIVE.
    p.fail_transiently(2);
    let t = c.begin(&["svc"], 60_000).await?;
    c.append(&t.partials[0].partial_id, vec![command("svc.Do", "k", &[7; 100])], "").await?;
    let req = v1::ConfirmRequest { transaction_id: t.transaction_id.clone(), wait: true, wait_timeout_ms: 20_000 };
    assert_eq!(tx.confirm(req).await?.into_inner().state, S::Confirmed as i32);
    let t2 = c.begin(&["svc"], 60_000).await?;
    let req = v1::CancelRequest {
        transaction_id: t2.transaction_id.clone(),
        wait: true,
        wait_timeout_ms: 20_000,
        ..Default::default()
    };
    assert_eq!(tx.cancel(req).await?.into_inner().state, S::Cancelled as i32);
    let active = c.begin(&["svc"], 60_000).await?;
    let _ = c.begin(&[], 60_000).await; // refused: INVALID_ARGUMENT

    for addr in [c.addr(), http] {
        let (status, body) = scrape(addr).await?;
        assert!(status.contains("200"), "{addr}: {status}");
        for (series, value) in [
            ("tcc_transactions_begun_total", 3.0),
            ("tcc_transactions_decided_total{decision=\"confirm\",by=\"client\"}", 1.0),
            ("tcc_transactions_decided_total{decision=\"cancel\",by=\"client\"}", 1.0),
            ("tcc_transactions_finished_total{outcome=\"confirmed\"}", 1.0),
            ("tcc_transactions_finished_total{outcome=\"cancelled\"}", 1.0),
            ("tcc_phase2_calls_total{service=\"svc\",decision=\"confirm\",result=\"transient\"}", 2.0),
            ("tcc_phase2_calls_total{service=\"svc\",decision=\"confirm\",result=\"ok\"}", 1.0),
            ("tcc_phase2_retries_total", 2.0),
            ("tcc_append_bytes_total", 100.0),
            ("tcc_transactions{state=\"active\"}", 1.0),
            ("tcc_store_failed", 0.0),
        ] {
            assert_eq!(sample(&body, series), Some(value), "{addr}: {series}\n{body}");
        }
        assert!(sample(&body, "tcc_oldest_unfinished_age_seconds").is_some(), "{body}");
        assert!(sample(&body, "tcc_store_group_size_count").is_some_and(|n| n >= 5.0), "{body}");
        assert!(body.contains("tcc_rpc_seconds_count{method=\"/tcc.v1.Transactions/Begin\",code=\"OK\"}"), "{body}");
        assert!(
            body.contains("tcc_rpc_seconds_count{method=\"/tcc.v1.Transactions/Begin\",code=\"INVALID_ARGUMENT\"}"),
            "{body}"
        );
        // No ids in labels.
        for id in [&t.transaction_id, &active.transaction_id, &t.partials[0].partial_id] {
            assert!(!body.contains(id.as_str()), "an id in the metrics: {id}");
        }
    }
    // The plaintext --http-listen serves metrics only: no console page,
    // and above all none of its actions.
    for path in ["/", "/api/transactions", &format!("/api/transactions/{}/cancel", active.transaction_id)] {
        let mut socket = tokio::net::TcpStream::connect(http).await?;
        let ask = format!(
            "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        socket.write_all(ask.as_bytes()).await?;
        let mut answer = String::new();
        socket.read_to_string(&mut answer).await?;
        assert!(answer.starts_with("HTTP/1.1 404"), "--http-listen answers {path}: {answer}");
    }
    let still = tx.get(v1::GetRequest { transaction_id: active.transaction_id.clone() }).await?.into_inner();
    assert_eq!(still.state, S::Active as i32, "cancelled through --http-listen");
    // An unknown path is not a label of its own.
    let mut grpc = tonic::client::Grpc::new(c.channel().await?);
    grpc.ready().await?;
    let codec = tonic_prost::ProstCodec::<v1::GetRequest, v1::GetRequest>::default();
    let _ = grpc.unary(tonic::Request::new(v1::GetRequest::default()), "/x.Y/Random123".parse()?, codec).await;
    let (_, body) = scrape(c.addr()).await?;
    assert!(!body.contains("Random123") && body.contains("method=\"other\""), "{body}");
    Ok(())
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_use_only_exported_metrics() -> Result<()> {
    let ops = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../coordinator/ops");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ops.join("grafana-dashboard.json"))?)?;
    let alerts: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(ops.join("alerts.yml"))?)?;
    let mut names = BTreeSet::new();
    let panels = dashboard["panels"].as_array().context("panels")?;
    assert!(panels.len() >= 6);
    for panel in panels {
        for target in panel["targets"].as_array().context("targets")? {
            used(target["expr"].as_str().context("expr")?, &mut names);
        }
    }
    let mut alert_names = Vec::new();
    for group in alerts["groups"].as_sequence().context("groups")? {
        for rule in group["rules"].as_sequence().context("rules")? {
            alert_names.push(rule["alert"].as_str().context("alert")?.to_string());
            used(rule["expr"].as_str().context("expr")?, &mut names);
        }
    }
    for alert in ["TccTransactionFailed", "TccUnfinishedTransactionTooOld", "TccStoreFailed"] {
        assert!(alert_names.iter().any(|a| a == alert), "{alert} missing from {alert_names:?}");
    }
    assert!(names.len() >= 10, "{names:?}");
    for name in &names {
        assert!(ALL.contains(&name.as_str()), "{name} is used but not exported (metrics::ALL: {ALL:?})");
    }
    Ok(())
}

#[tokio::test]
async fn transactions_by_state_are_counted_exactly_past_a_thousand() -> Result<()> {
    let c = tcc_tests::Coordinator::start_logged(&[], "warn").await?;
    const N: usize = 1_050;
    let client = c.transactions().await?;
    // In batches of 64 at a time.
    for batch in (0..N).collect::<Vec<_>>().chunks(64) {
        let begins = batch.iter().map(|_| {
            let mut client = client.clone();
            async move {
                let req = tcc_proto::v1::BeginRequest { participants: vec!["a".into()], timeout_ms: 600_000 };
                client.begin(req).await
            }
        });
        for r in futures::future::join_all(begins).await {
            r?;
        }
    }
    let (_, body) = scrape(c.addr()).await?;
    assert_eq!(sample(&body, "tcc_transactions{state=\"active\"}"), Some(N as f64), "{body}");
    assert_eq!(sample(&body, "tcc_transactions{state=\"confirming\"}"), Some(0.0));
    Ok(())
}
