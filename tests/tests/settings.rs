//! The settings file against the real binary: `--config` is read, its
//! environment variable and a flag both override it, and a bad file stops
//! the start naming the file and the key (before anything is created).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use anyhow::Result;
use tcc_proto::v1;
use tcc_tests::Coordinator;

/// Whether the coordinator accepts a Begin with `n` participants.
async fn begins(c: &Coordinator, n: usize) -> Result<bool> {
    let participants = (0..n).map(|i| format!("s{i}")).collect();
    match c.transactions().await?.begin(v1::BeginRequest { participants, timeout_ms: 0 }).await {
        Ok(_) => Ok(true),
        Err(s) if s.code() == tonic::Code::InvalidArgument && s.message().contains("the limit is") => Ok(false),
        Err(s) => Err(s.into()),
    }
}

#[tokio::test]
async fn the_settings_file_is_read_and_the_environment_and_flags_override_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("tcc.toml");
    std::fs::write(&file, "# limits\nmax-participants = 2\nlog_format = \"json\"\n")?;
    let file = file.to_string_lossy().into_owned();

    let mut c = Coordinator::start(&["--config", &file]).await?;
    assert!(begins(&c, 2).await? && !begins(&c, 3).await?);
    // The file set the log format too, and the first line names the file.
    let first = c.logs().lines().next().unwrap_or_default().to_string();
    assert!(first.starts_with('{') && first.contains(&format!("settings file {file}")), "{first}");

    // The environment variable beats the file.
    c.terminate().await?;
    c.restart_with_env(&[("TCC_MAX_PARTICIPANTS", "3")]).await?;
    assert!(begins(&c, 3).await? && !begins(&c, 4).await?);
    c.terminate().await?;

    // A flag beats both.
    let c = Coordinator::start(&["--config", &file, "--max-participants", "1"]).await?;
    assert!(begins(&c, 1).await? && !begins(&c, 2).await?);
    Ok(())
}

#[tokio::test]
async fn a_bad_settings_file_stops_the_start_naming_file_and_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("tcc.toml");
    std::fs::write(&file, "max-participants = 2\nretention = 60\n")?;
    let data = dir.path().join("data");
    let (status, log) = Coordinator::start_failing(&data, &["--config", &file.to_string_lossy()]).await?;
    assert!(!status.success());
    assert!(log.contains("unknown setting \"retention\"") && log.contains("tcc.toml"), "{log}");
    assert_eq!(log.lines().count(), 1, "{log}");
    assert!(!data.exists(), "the data directory was created");

    std::fs::write(&file, "max-participants = -3\n")?;
    let (status, log) = Coordinator::start_failing(&data, &["--config", &file.to_string_lossy()]).await?;
    assert!(!status.success());
    assert!(log.contains("--max-participants") && log.contains("-3"), "{log}");
    Ok(())
}
