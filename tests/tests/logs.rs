//! What the coordinator's logs say, and how: one line per start-up error,
//! with a hint; a refused `RUST_LOG`; the version and settings at start;
//! JSON lines on request and no colour codes in a file; repeated delivery
//! failures of one transaction at WARN at most once a minute, with the
//! final outcome; refused requests at DEBUG with their code.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use anyhow::Result;
use tcc_proto::v1::{self, TransactionState as S};
use tcc_tests::{Coordinator, TestParticipant};

/// Runs the coordinator on a fresh data directory until it exits (it is
/// expected to fail at start); its exit code and stderr.
async fn run_failing(args: &[&str], env: &[(&str, &str)]) -> Result<(Option<i32>, String)> {
    let dir = tempfile::tempdir()?;
    let (status, log) = Coordinator::start_failing_with_env(&dir.path().join("data"), args, env).await?;
    Ok((status.code(), log))
}

#[tokio::test]
async fn start_up_errors_are_said_once_with_a_hint() -> Result<()> {
    let (code, log) = run_failing(&["--retry-initial-ms", "500", "--retry-max-ms", "100"], &[]).await?;
    assert_eq!(code, Some(1));
    assert_eq!(log.matches("--retry-max-ms (100) must be at least").count(), 1, "{log}");

    let (code, log) = run_failing(&[], &[("RUST_LOG", "info,tcc=verbose")]).await?;
    assert_eq!(code, Some(1));
    assert!(
        log.contains("RUST_LOG=\"info,tcc=verbose\" is not a valid log filter") && log.contains("e.g. RUST_LOG=info"),
        "{log}"
    );

    // A second coordinator on the same data directory: the cause, not
    // sled's raw lock error.
    let c = Coordinator::start(&[]).await?;
    let (status, log) = Coordinator::start_failing(c.data_dir(), &[]).await?;
    assert!(!status.success());
    assert!(log.contains("another coordinator is using it"), "{log}");
    assert!(!log.contains("WouldBlock"), "{log}");
    Ok(())
}

#[tokio::test]
async fn the_start_says_the_version_and_settings_in_text_or_json() -> Result<()> {
    let c = Coordinator::start(&["--retention-secs", "123"]).await?;
    let log = c.logs();
    let start = log.lines().find(|l| l.contains("tcc-coordinator starting")).expect("a start line");
    assert!(start.contains(env!("CARGO_PKG_VERSION")) && start.contains("retention 123 s"), "{start}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file:\n{log}");

    let c = Coordinator::start(&["--log-format", "json"]).await?;
    c.begin(&["svc"], 60_000).await?;
    let log = c.logs();
    let mut lines = 0;
    for line in log.lines() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(value.get("level").is_some() && value.get("fields").is_some(), "{line}");
        lines += 1;
    }
    assert!(lines >= 3, "{log}");
    assert!(log.contains("tcc-coordinator starting"), "{log}");
    Ok(())
}

#[tokio::test]
async fn repeated_delivery_failures_are_warned_once_a_minute_then_the_outcome() -> Result<()> {
    let p = TestParticipant::start().await?;
    let c = Coordinator::start(&["--retry-initial-ms", "10", "--retry-max-ms", "20"]).await?;
    c.register("svc", &p).await?;
    p.fail_transiently(30);
    let t = c.begin(&["svc"], 60_000).await?;
    let req = v1::ConfirmRequest { transaction_id: t.transaction_id.clone(), wait: true, wait_timeout_ms: 20_000 };
    let d = c.transactions().await?.confirm(req).await?.into_inner();
    assert_eq!(d.state, S::Confirmed as i32);
    let log = c.logs();
    let warnings = log.lines().filter(|l| l.contains("WARN") && l.contains("commit failed")).count();
    let quiet = log.lines().filter(|l| l.contains("DEBUG") && l.contains("commit failed; will retry")).count();
    assert_eq!(warnings, 1, "30 failures in under a minute: one warning\n{log}");
    assert!(quiet >= 29, "the others at DEBUG ({quiet})");
    assert!(log.contains("commit acknowledged after retries") && log.contains("attempts=31"), "{log}");

    // A refused request is logged at DEBUG with its code.
    let refused = c.begin(&[], 60_000).await;
    assert!(refused.is_err());
    assert!(c.logs().lines().any(|l| l.contains("request refused") && l.contains("InvalidArgument")), "{}", c.logs());
    Ok(())
}
