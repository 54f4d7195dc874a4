//! A short run of the benchmark harness (seconds): it must complete and
//! report no errors. It asserts nothing about speed; numbers come from
//! release builds, reported in BENCHMARKS.md.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

#[tokio::test]
async fn the_benchmark_harness_runs_clean() {
    smoke(&[]).await;
}

/// Mutual TLS and the policy, as `tcc-bench --tls` measures them.
#[tokio::test]
async fn the_benchmark_harness_runs_clean_over_mutual_tls() {
    smoke(&["--tls"]).await;
}

async fn smoke(extra: &[&str]) {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_tcc-bench"))
        .args(extra)
        .args([
            "--duration-secs",
            "2",
            "--warmup-secs",
            "0",
            "--floor-secs",
            "1",
            "--concurrency",
            "4",
            "--cancel-ratio",
            "0.5",
        ])
        .kill_on_drop(true)
        .output();
    let out =
        tokio::time::timeout(Duration::from_secs(120), run).await.expect("bench finished in time").expect("bench ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tcc-bench failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("| throughput |"), "{stdout}");
    assert!(stdout.contains(", 0 errors |"), "{stdout}");
    assert!(stdout.contains("| raw unary RPC floor"), "{stdout}");
}

#[tokio::test]
async fn the_active_scenario_recovers_after_kill_9() {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_tcc-bench"))
        .args(["--active", "300", "--concurrency", "8"])
        .kill_on_drop(true)
        .output();
    let out =
        tokio::time::timeout(Duration::from_secs(120), run).await.expect("bench finished in time").expect("bench ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tcc-bench failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("| ACTIVE transactions held | 300 |"), "{stdout}");
    assert!(stdout.contains("recovery"), "{stdout}");
}
