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
    // A start needs 16 MiB free beyond its journal: 24 MiB to fill, and
    // 40 MiB of ballast to free.
    let Some(disk) = SmallDisk::mount(64 << 20, 40 << 20)? else { return Ok(()) };
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
        match c.append(&t.partials[0].partial_id, vec![command("svc.Do", "k", &[7; 16_384])], "").await {
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

/// The coordinator crashes (kill -9) on a full 32 MiB disk. Every start
/// while the disk is still full ends within seconds with a non-zero exit
/// that says how much free space a start needs and where, and leaves
/// nothing that a later start takes for damage; once space is freed, the
/// next start has every acknowledged write.
#[tokio::test]
async fn a_start_on_a_full_disk_ends_in_seconds_and_says_what_it_needs() -> Result<()> {
    let Some(disk) = SmallDisk::mount(64 << 20, 40 << 20)? else { return Ok(()) };
    let data = disk.path().join("data");
    let mut c = Coordinator::start_in(&data, &[]).await?;
    let mut acknowledged = Vec::new();
    loop {
        anyhow::ensure!(acknowledged.len() < 50_000, "the disk never filled");
        let t = match c.begin(&["svc"], 3_600_000).await {
            Ok(t) => t,
            Err(_) => break,
        };
        match c.append(&t.partials[0].partial_id, vec![command("svc.Do", "k", &[7; 16_384])], "").await {
            Ok(_) => acknowledged.push(t.transaction_id),
            Err(_) => break,
        }
    }
    c.kill9().await?;
    // Whatever is left is not enough for a start.
    std::fs::write(disk.path().join("rest"), vec![0; 1 << 20]).ok();

    for attempt in 0..2 {
        let started = Instant::now();
        let (status, log) = Coordinator::start_failing(&data, &[]).await?;
        let took = started.elapsed();
        assert!(!status.success(), "attempt {attempt}: started on a full disk:\n{log}");
        assert!(took < Duration::from_secs(10), "attempt {attempt}: took {took:?}:\n{log}");
        assert!(!log.contains("panicked"), "{log}");
        assert!(!log.contains("is damaged"), "attempt {attempt}: a full disk taken for damage:\n{log}");
        assert!(log.contains("MiB") && log.contains(&data.display().to_string()), "attempt {attempt}:\n{log}");
        eprintln!("attempt {attempt}: {took:?}: {}", log.lines().find(|l| l.contains("ERROR")).unwrap_or(""));
    }

    disk.free()?;
    std::fs::remove_file(disk.path().join("rest")).ok();
    c.restart().await?;
    let mut tx = c.transactions().await?;
    for id in &acknowledged {
        tx.get(v1::GetRequest { transaction_id: id.clone() }).await?;
    }
    c.begin(&["svc"], 60_000).await?;
    eprintln!("{} acknowledged transactions, all there after freeing space", acknowledged.len());
    Ok(())
}
