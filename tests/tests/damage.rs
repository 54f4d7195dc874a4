//! Damaged data directories: every kind of damage to the journal or to
//! sled's files stops the start with a message that names the file and
//! what the operator can do, never a panic and never a silent start with
//! acknowledged writes missing. `--salvage-journal` keeps what comes before
//! a damaged journal record.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tcc_tests::{Coordinator, command};
use tonic::Code;

/// The journal's frame header: length, checksum, group offset.
const HEADER: usize = 16;

/// A coordinator that acknowledged `n` transactions, each with an append,
/// then stopped: by kill -9 (the latest writes are only in the journal) or
/// by SIGTERM (a clean close: checkpointed, summary recorded).
async fn with_work(n: usize, clean: bool) -> Result<(Coordinator, Vec<String>)> {
    let mut c = Coordinator::start(&[]).await?;
    let mut ids = Vec::new();
    for i in 0..n {
        let t = c.begin(&["svc"], 3_600_000).await?;
        c.append(&t.partials[0].partial_id, vec![command("svc.Do", &format!("k{i}"), &[i as u8; 100])], "").await?;
        ids.push(t.transaction_id);
    }
    if clean {
        assert!(c.terminate().await?.success());
    } else {
        c.kill9().await?;
    }
    Ok((c, ids))
}

/// How many of `ids` the coordinator knows.
async fn known(c: &Coordinator, ids: &[String]) -> Result<usize> {
    let mut tx = c.transactions().await?;
    let mut found = 0;
    for id in ids {
        match tx.get(tcc_proto::v1::GetRequest { transaction_id: id.clone() }).await {
            Ok(_) => found += 1,
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(s.into()),
        }
    }
    Ok(found)
}

/// The journal files with frames in them, and where their frames start.
fn journal_frames(dir: &Path) -> Result<Vec<(PathBuf, Vec<usize>)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("tcc-wal-0")))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let name = path.file_name().and_then(|n| n.to_str()).context("name")?;
        let generation: u64 = name.trim_start_matches("tcc-wal-").parse()?;
        let bytes = std::fs::read(&path)?;
        let mut starts = Vec::new();
        let mut pos = 0;
        // Frames of this generation (a recycled file holds older ones after
        // them): `len | crc32(generation, group, payload) | group | payload`.
        while pos + HEADER <= bytes.len() {
            let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into()?) as usize;
            let Some(payload) = bytes.get(pos + HEADER..pos + HEADER + len) else { break };
            let mut crc = crc32fast::Hasher::new();
            crc.update(&generation.to_le_bytes());
            crc.update(&bytes[pos + 8..pos + HEADER]);
            crc.update(payload);
            if len == 0 || crc.finalize() != u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into()?) {
                break;
            }
            starts.push(pos);
            pos += HEADER + len;
        }
        if !starts.is_empty() {
            out.push((path, starts));
        }
    }
    Ok(out)
}

/// The journal file holding the most frames.
fn busiest_journal(dir: &Path) -> Result<(PathBuf, Vec<usize>)> {
    journal_frames(dir)?.into_iter().max_by_key(|(_, s)| s.len()).context("no journal file with frames")
}

/// Starts on a damaged directory; asserts it refuses, clearly and without
/// a panic, and returns its message.
async fn refused(c: &Coordinator, naming: &str) -> Result<String> {
    let (status, log) = Coordinator::start_failing(c.data_dir(), &[]).await?;
    assert!(!status.success(), "started on a damaged directory:\n{log}");
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(!log.contains("panicked"), "a panic:\n{log}");
    assert!(log.contains("is damaged"), "{log}");
    assert!(log.contains(naming), "the message does not name {naming}:\n{log}");
    assert!(
        log.contains("restore the data directory from a backup") || log.contains("Restore the data directory"),
        "{log}"
    );
    Ok(log)
}

fn flip(path: &Path, offset: usize, mask: u8) -> Result<()> {
    let mut bytes = std::fs::read(path)?;
    bytes[offset] ^= mask;
    std::fs::write(path, bytes)?;
    Ok(())
}

#[tokio::test]
async fn a_flipped_length_in_the_journal_stops_the_start_and_salvage_keeps_the_rest() -> Result<()> {
    let (mut c, ids) = with_work(300, false).await?;
    let (path, starts) = busiest_journal(c.data_dir())?;
    let at = starts[starts.len() / 2];
    flip(&path, at + 1, 0x01)?;
    let log = refused(&c, &path.display().to_string()).await?;
    assert!(log.contains(&format!("at byte {at}")) && log.contains("--salvage-journal"), "{log}");

    // Salvage: the writes before the damage are kept, the rest dropped and
    // the damaged file kept aside.
    c.restart_with_args(&["--salvage-journal"]).await?;
    let kept = known(&c, &ids).await?;
    assert!(kept > 0 && kept < ids.len(), "kept {kept} of {}", ids.len());
    assert!(c.logs().contains("salvaging the journal"), "{}", c.logs());
    let mut aside = path.clone().into_os_string();
    aside.push(".damaged");
    assert!(Path::new(&aside).exists());
    eprintln!("flipped length at byte {at}: refused; salvage kept {kept} of {} transactions", ids.len());
    Ok(())
}

#[tokio::test]
async fn a_zeroed_block_in_the_journal_stops_the_start() -> Result<()> {
    // Work until one journal file holds frames over more than three 4 KiB
    // blocks (files rotate every 2 s), so that a zeroed block in the middle
    // has acknowledged frames after it; then kill -9.
    let mut c = Coordinator::start(&[]).await?;
    let mut n = 0;
    loop {
        anyhow::ensure!(n < 20_000, "no journal file grew past 12 KiB");
        let t = c.begin(&["svc"], 3_600_000).await?;
        c.append(&t.partials[0].partial_id, vec![command("svc.Do", "k", &[n as u8; 100])], "").await?;
        n += 1;
        if n % 50 == 0 && journal_frames(c.data_dir())?.iter().any(|(_, s)| s.last().is_some_and(|l| *l > 3 * 4096)) {
            break;
        }
    }
    c.kill9().await?;
    let (path, starts) = busiest_journal(c.data_dir())?;
    let last = *starts.last().context("frames")?;
    let block = (last / 2) / 4096 * 4096;
    assert!(block + 4096 < last, "frames after the block");
    let mut bytes = std::fs::read(&path)?;
    bytes[block..block + 4096].fill(0);
    std::fs::write(&path, bytes)?;
    refused(&c, &path.display().to_string()).await?;
    Ok(())
}

#[tokio::test]
async fn a_truncated_journal_stops_the_start_wherever_it_is_cut() -> Result<()> {
    let (mut c, ids) = with_work(200, false).await?;
    let (path, starts) = busiest_journal(c.data_dir())?;
    let original = std::fs::read(&path)?;
    let end = *starts.last().unwrap() + HEADER + 8;
    for cut in [0, starts[starts.len() / 2], starts[starts.len() / 2] + 7, end, original.len() - 1] {
        std::fs::write(&path, &original[..cut])?;
        let log = refused(&c, &path.display().to_string()).await?;
        assert!(log.contains("it was truncated"), "cut at {cut}: {log}");
    }
    // Undamaged, it starts with every acknowledged transaction.
    std::fs::write(&path, &original)?;
    c.restart().await?;
    assert_eq!(known(&c, &ids).await?, ids.len());
    Ok(())
}

/// The newest journal file deleted after a crash under load, or replaced
/// by an older journal file: the start is refused (before, a deleted
/// newest file started cleanly with acknowledged writes lost), and
/// `--salvage-journal` starts with what is left.
#[tokio::test]
async fn a_deleted_or_replaced_newest_journal_file_stops_the_start() -> Result<()> {
    let (mut c, ids) = with_work(200, false).await?;
    let dir = c.data_dir().to_path_buf();
    let (older, _) = journal_frames(&dir)?.pop().context("no journal file with frames")?;
    let older_bytes = std::fs::read(&older)?;
    // More work in the next generation, then a crash.
    c.restart().await?;
    let mut more = Vec::new();
    for i in 0..50 {
        let t = c.begin(&["svc"], 3_600_000).await?;
        c.append(&t.partials[0].partial_id, vec![command("svc.Do", &format!("m{i}"), &[1; 100])], "").await?;
        more.push(t.transaction_id);
    }
    c.kill9().await?;
    let (newest, _) = journal_frames(&dir)?.pop().context("no journal file with frames")?;
    assert_ne!(newest, older, "a new generation");
    let original = std::fs::read(&newest)?;

    // Replaced by the older file's bytes.
    std::fs::write(&newest, &older_bytes)?;
    let log = refused(&c, &newest.display().to_string()).await?;
    assert!(log.contains("does not start with its own seal"), "{log}");

    // Deleted.
    std::fs::remove_file(&newest)?;
    let log = refused(&c, &newest.display().to_string()).await?;
    assert!(log.contains("are missing") && log.contains("--salvage-journal"), "{log}");

    // Put back, everything is there.
    std::fs::write(&newest, &original)?;
    c.restart().await?;
    assert_eq!(known(&c, &ids).await?, ids.len());
    assert_eq!(known(&c, &more).await?, more.len());
    c.kill9().await?;

    // Deleted again: salvage starts without the writes it held.
    let (newest, _) = journal_frames(&dir)?.pop().context("no journal file")?;
    std::fs::remove_file(&newest)?;
    c.restart_with_args(&["--salvage-journal"]).await?;
    assert!(c.logs().contains("salvaging the journal"), "{}", c.logs());
    c.begin(&["svc"], 60_000).await?;
    Ok(())
}

/// What a start on a damaged directory did.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Refused, with a clear message.
    Refused,
    /// Started with every acknowledged transaction (the damage hit
    /// nothing that mattered).
    Intact,
}

/// Starts on a damaged directory: it must refuse clearly, or start with
/// every transaction of `ids`. Never a panic, never a start with less.
async fn start_on_damage(c: &mut Coordinator, ids: &[String], naming: &str) -> Result<Outcome> {
    match c.restart().await {
        Err(e) => {
            let log = e.to_string();
            assert!(!log.contains("panicked"), "a panic:\n{log}");
            assert!(log.contains("is damaged") && log.contains(naming), "unclear refusal:\n{log}");
            assert!(log.to_lowercase().contains("restore the data directory from a backup"), "{log}");
            if let Some(line) = log.lines().find(|l| l.contains("is damaged")) {
                eprintln!("refused: {line}");
            }
            Ok(Outcome::Refused)
        }
        Ok(()) => {
            let found = known(c, ids).await?;
            assert_eq!(found, ids.len(), "started with acknowledged transactions missing:\n{}", c.logs());
            c.kill9().await?;
            Ok(Outcome::Intact)
        }
    }
}

/// Copies the files of `from` (one level, as a data directory is) to `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        std::fs::remove_dir_all(to)?;
    }
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        } else if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// sled's files after a clean shutdown: every damage is refused, or (when
/// it hit nothing the store needs) the start has every transaction. The
/// damage that lost data before (a `db` cut in half, bit flips that made
/// sled panic) is refused.
#[tokio::test]
async fn damage_to_sleds_files_after_a_clean_stop_is_refused() -> Result<()> {
    let (c, ids) = with_work(300, true).await?;
    sled_damage(c, ids).await
}

/// The same after kill -9, once sled holds a checkpoint and the journal
/// the writes after it.
#[tokio::test]
async fn damage_to_sleds_files_after_a_crash_is_refused() -> Result<()> {
    let mut c = Coordinator::start(&[]).await?;
    let mut ids = Vec::new();
    let checkpoint = c.data_dir().join("tcc-checkpoint");
    // Work until a checkpoint is recorded (every 2 s while writes come in),
    // then some more.
    let mut after = 0;
    while after < 50 {
        anyhow::ensure!(ids.len() < 100_000, "no checkpoint");
        let t = c.begin(&["svc"], 3_600_000).await?;
        c.append(&t.partials[0].partial_id, vec![command("svc.Do", "k", &[7; 100])], "").await?;
        ids.push(t.transaction_id);
        if checkpoint.exists() {
            after += 1;
        }
    }
    c.kill9().await?;
    sled_damage(c, ids).await
}

async fn sled_damage(mut c: Coordinator, ids: Vec<String>) -> Result<()> {
    let dir = c.data_dir().to_path_buf();
    let backup = dir.with_extension("backup");
    copy_dir(&dir, &backup)?;
    let db = dir.join("db");
    let conf = dir.join("conf");
    let db_len = std::fs::metadata(&db)?.len() as usize;
    let conf_len = std::fs::metadata(&conf)?.len() as usize;
    let mut outcomes = Vec::new();
    for cut in [db_len / 2, db_len / 4, db_len * 3 / 4, db_len - 1] {
        let f = std::fs::OpenOptions::new().write(true).open(&db)?;
        f.set_len(cut as u64)?;
        let outcome = start_on_damage(&mut c, &ids, "sled").await.with_context(|| format!("db cut at {cut}"))?;
        if cut == db_len / 2 {
            assert_eq!(outcome, Outcome::Refused, "db cut in half");
        }
        outcomes.push((format!("db cut at {cut} of {db_len}"), outcome));
        copy_dir(&backup, &dir)?;
    }
    for at in [db_len / 8, db_len / 3, db_len / 2, db_len * 7 / 8] {
        flip(&db, at, 0x10)?;
        let outcome = start_on_damage(&mut c, &ids, "sled").await.with_context(|| format!("db flip at {at}"))?;
        outcomes.push((format!("db bit flip at {at}"), outcome));
        copy_dir(&backup, &dir)?;
    }
    for at in [0, conf_len / 2, conf_len - 1] {
        flip(&conf, at, 0x04)?;
        let outcome = start_on_damage(&mut c, &ids, "sled").await.with_context(|| format!("conf flip at {at}"))?;
        outcomes.push((format!("conf bit flip at {at}"), outcome));
        copy_dir(&backup, &dir)?;
    }
    for missing in [&db, &conf] {
        std::fs::remove_file(missing)?;
        let outcome = start_on_damage(&mut c, &ids, &missing.display().to_string()).await?;
        assert_eq!(outcome, Outcome::Refused, "{} missing", missing.display());
        outcomes.push((format!("{} missing", missing.display()), outcome));
        copy_dir(&backup, &dir)?;
    }
    // Undamaged, it starts with every acknowledged transaction.
    c.restart().await?;
    assert_eq!(known(&c, &ids).await?, ids.len());
    eprintln!("sled damage outcomes: {outcomes:#?}");
    Ok(())
}

/// Control: a clean stop and a kill -9 restart with everything.
#[tokio::test]
async fn undamaged_directories_start_with_everything() -> Result<()> {
    for clean in [true, false] {
        let (mut c, ids) = with_work(100, clean).await?;
        c.restart().await?;
        assert_eq!(known(&c, &ids).await?, ids.len());
        tokio::time::timeout(Duration::from_secs(20), c.terminate()).await??;
        c.restart().await?;
        assert_eq!(known(&c, &ids).await?, ids.len());
    }
    Ok(())
}
