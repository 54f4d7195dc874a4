//! The system clock stepped back while the coordinator was stopped
//! (RELIABILITY.md, "Attacks", round 2). The restart runs under Debian's
//! libfaketime, two hours behind: before, ACTIVE transactions kept their
//! deadlines two hours late, a listing by minimum age found none of them,
//! and a new transaction sorted before the old ones. Coordinator time now
//! starts from the latest time the store recorded and runs at the real
//! rate until the clock catches up.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tcc_proto::v1::{self, TransactionState as S};
use tcc_tests::Coordinator;

/// Debian's libfaketime, if installed; without it the test says so (and
/// fails where CI requires it, TCC_REQUIRE_FAKETIME=1).
fn faketime() -> Result<Option<PathBuf>> {
    let found = std::fs::read_dir("/usr/lib")?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists());
    if found.is_none() {
        if std::env::var("TCC_REQUIRE_FAKETIME").is_ok_and(|v| v == "1") {
            bail!("libfaketime is not installed (Debian package faketime); CI installs it");
        }
        tcc_tests::say_skipped("the clock-step test, because libfaketime is missing (apt-get install faketime)");
    }
    Ok(found)
}

#[tokio::test]
async fn a_clock_stepped_back_at_restart_keeps_deadlines_and_ages() -> Result<()> {
    let Some(lib) = faketime()? else { return Ok(()) };
    let mut c = Coordinator::start(&[]).await?;
    let begun = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(c.begin(&["svc"], 4_000).await?.transaction_id);
    }
    c.kill9().await?;

    // Two hours back, from the restart on (the monotonic clock is not).
    let lib = lib.to_string_lossy().into_owned();
    let env = [("LD_PRELOAD", lib.as_str()), ("FAKETIME", "-2h"), ("FAKETIME_DONT_FAKE_MONOTONIC", "1")];
    c.restart_with_env(&env).await?;
    assert!(
        c.logs().contains("the system clock is 7199 s behind")
            || c.logs().contains("the system clock is 7200 s behind"),
        "the step is not reported:\n{}",
        c.logs()
    );

    // Listed by age: all ten are at least 1 ms old (coordinator time goes
    // on from the latest record, so only the time the coordinator was down
    // is not counted), and a new transaction sorts after them.
    let mut admin = c.admin().await?;
    let list = |min_age_ms| v1::ListTransactionsRequest { min_age_ms, page_size: 100, ..Default::default() };
    let old = admin.list_transactions(list(1)).await?.into_inner().transactions;
    assert_eq!(old.len(), 10, "by minimum age");
    let new = c.begin(&["svc"], 600_000).await?.transaction_id;
    let all = admin.list_transactions(list(0)).await?.into_inner().transactions;
    assert_eq!(all.last().map(|t| t.transaction_id.clone()), Some(new), "oldest first");

    // The deadlines fire at their real due time (4 s after Begin), not two
    // hours late: each is CANCELLED within seconds.
    let mut tx = c.transactions().await?;
    for id in &ids {
        let mut watch =
            admin.watch(v1::WatchRequest { transaction_id: id.clone(), ..Default::default() }).await?.into_inner();
        let cancelled = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(t) = watch.message().await? {
                if t.state == S::Cancelled as i32 || t.state == S::Cancelling as i32 {
                    return Ok::<_, anyhow::Error>(());
                }
            }
            bail!("the watch ended")
        })
        .await
        .with_context(|| format!("{id} still ACTIVE {:?} after Begin", begun.elapsed()))?;
        cancelled?;
        let t = tx.get(v1::GetRequest { transaction_id: id.clone() }).await?.into_inner();
        assert_ne!(t.state, S::Active as i32);
    }
    let took = begun.elapsed();
    assert!(took < Duration::from_secs(20), "deadlines fired {took:?} after Begin");
    eprintln!("clock 2 h back at restart: 10 deadlines of 4 s fired within {took:?} of Begin");
    Ok(())
}
