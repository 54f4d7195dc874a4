//! Soak: steady load with GC on (1 s retention) for a bounded time,
//! sampling the coordinator's disk use and resident memory each second.
//! Both must level off: the last third of the run may not grow beyond the
//! middle third (with a small slack), and finished transactions must be
//! collected.
//!
//! CI runs 15 s. A longer run by hand:
//! `TCC_SOAK_SECS=600 cargo test --workspace --test soak -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use tcc_proto::v1;
use tcc_tests::{Coordinator, command};

fn dir_bytes(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(p) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_and_memory_level_off_under_steady_load_with_gc() -> Result<()> {
    let secs: u64 = std::env::var("TCC_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let url = tcc_tests::start_noop_participant().await?;
    let a = format!("a={url}");
    let b = format!("b={url}");
    let c =
        Coordinator::start_logged(&["--retention-secs", "1", "--participant", &a, "--participant", &b], "warn").await?;
    let pid = c.pid().expect("pid");

    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (mut tx, mut topics, done) = (c.transactions().await?, c.topics().await?, done.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let t = tx
                    .begin(v1::BeginRequest { participants: vec!["a".into(), "b".into()], timeout_ms: 10_000 })
                    .await?
                    .into_inner();
                for p in &t.partials {
                    let req = v1::AppendRequest {
                        partial_id: p.partial_id.clone(),
                        commands: vec![command("soak.Cmd", "k", &[7u8; 1024])],
                        idempotency_key: String::new(),
                        service: String::new(),
                    };
                    topics.append(req).await?;
                }
                let req = v1::ConfirmRequest { transaction_id: t.transaction_id, wait: true, wait_timeout_ms: 10_000 };
                let state = tx.confirm(req).await?.into_inner().state;
                anyhow::ensure!(state == v1::TransactionState::Confirmed as i32, "state {state}");
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push((dir_bytes(c.data_dir()), rss_kib(pid), done.load(Ordering::Relaxed)));
    }
    for w in workers {
        w.await??;
    }
    let total = done.load(Ordering::Relaxed);
    let n = samples.len();
    let third = n / 3;
    let max_of = |range: &[(u64, u64, u64)], f: fn(&(u64, u64, u64)) -> u64| range.iter().map(f).max().unwrap_or(0);
    let (middle, last) = (&samples[third..2 * third], &samples[2 * third..]);
    let (disk_mid, disk_last) = (max_of(middle, |s| s.0), max_of(last, |s| s.0));
    let (rss_mid, rss_last) = (max_of(middle, |s| s.1), max_of(last, |s| s.1));
    let kept = c.list_all(&[]).await?.len();
    println!(
        "soak report: {secs} s, {total} transactions ({:.0}/s), {kept} still stored at the end; disk max middle/last third {:.1}/{:.1} MiB; RSS max middle/last third {:.1}/{:.1} MiB; samples (disk MiB, RSS MiB): {:?}",
        total as f64 / secs as f64,
        disk_mid as f64 / 1048576.0,
        disk_last as f64 / 1048576.0,
        rss_mid as f64 / 1024.0,
        rss_last as f64 / 1024.0,
        samples.iter().map(|s| (s.0 / 1048576, s.1 / 1024)).collect::<Vec<_>>()
    );
    assert!(total > 100, "the load ran");
    // With 1 s retention only about the last second's transactions remain.
    assert!((kept as u64) < total / 4, "finished transactions are collected: {kept} of {total} still stored");
    assert!(disk_last <= disk_mid + disk_mid / 2 + (4 << 20), "disk keeps growing: {disk_mid} -> {disk_last}");
    assert!(rss_last <= rss_mid + rss_mid / 2 + 8 * 1024, "memory keeps growing: {rss_mid} KiB -> {rss_last} KiB");
    Ok(())
}
