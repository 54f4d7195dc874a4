//! The disk fills up under the coordinator (a small tmpfs): clients get
//! UNAVAILABLE, health turns NOT_SERVING, SIGTERM still exits in time, a
//! start on the full disk fails cleanly and leaves nothing behind that
//! blocks a later start, and once space is freed every acknowledged write
//! is there.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tcc_proto::v1;
use tcc_tests::disk::SmallDisk;
use tcc_tests::{Coordinator, command};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

#[tokio::test]
async fn a_full_disk_fails_safe_and_a_freed_one_recovers_everything() -> Result<()> {
    let Some(disk) = SmallDisk::mount(6 << 20, 2 << 20)? else { return Ok(()) };
    let data = disk.path().join("data");
    let args = ["--shutdown-timeout-ms", "2000"];
    let mut c = Coordinator::start_in(&data, &args).await?;

    // Acknowledged work until the disk is full.
    let mut acknowledged = Vec::new();
    let refusal = loop {
        anyhow::ensure!(acknowledged.len() < 20_000, "the disk never filled");
        let t = match c.begin(&["svc"], 3_600_000).await {
            Ok(t) => t,
            Err(e) => break e.downcast::<tonic::Status>().context("not a status")?,
        };
        match c.append(&t.partials[0].partial_id, vec![command("svc.Do", "k", &[7; 4096])], "").await {
            Ok(_) => acknowledged.push(t.transaction_id),
            Err(status) => break status,
        }
    };
    assert_eq!(refusal.code(), Code::Unavailable, "{refusal:?}");
    assert!(refusal.message().contains("No space left on device"), "{refusal:?}");

    // The health service says so.
    let mut health = HealthClient::new(c.channel().await?);
    let status = health.check(HealthCheckRequest { service: String::new() }).await?.into_inner().status;
    assert_eq!(status, ServingStatus::NotServing as i32);

    // SIGTERM exits within the shutdown timeout, whatever the store does.
    let signalled = Instant::now();
    c.signal("TERM")?;
    let exit = c.wait_exit(Duration::from_secs(10)).await?;
    let took = signalled.elapsed();
    assert!(took < Duration::from_millis(2_800), "exit took {took:?}");

    // A start while the disk is still full: it fails cleanly, or serves
    // everything acknowledged; either way, no panic.
    let full_start = match c.restart().await {
        Err(e) => {
            let log = e.to_string();
            assert!(!log.contains("panicked"), "{log}");
            log.lines().find(|l| l.contains("ERROR")).unwrap_or("refused").to_string()
        }
        Ok(()) => {
            let mut tx = c.transactions().await?;
            for id in &acknowledged {
                tx.get(v1::GetRequest { transaction_id: id.clone() }).await?;
            }
            c.kill9().await?;
            "started and served every acknowledged transaction".to_string()
        }
    };

    // Space freed: every acknowledged write is there, and writes work.
    disk.free()?;
    c.restart().await?;
    let mut tx = c.transactions().await?;
    let mut topics = c.topics().await?;
    for id in &acknowledged {
        let t = tx.get(v1::GetRequest { transaction_id: id.clone() }).await?.into_inner();
        let read = v1::ReadRequest { partial_id: t.participants[0].partial_id.clone(), ..Default::default() };
        assert_eq!(topics.read(read).await?.into_inner().commands.len(), 1, "{id}");
    }
    c.begin(&["svc"], 60_000).await?;
    eprintln!(
        "disk full after {} acknowledged transactions; SIGTERM: {exit} after {} ms; start while full: {full_start}; all recovered after freeing space",
        acknowledged.len(),
        took.as_millis()
    );
    Ok(())
}
