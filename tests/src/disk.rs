//! A small disk for the disk-full tests: a tmpfs of a fixed size mounted
//! on a temporary directory (unmounted on drop), with a ballast file whose
//! removal frees space again.
//!
//! Mounting needs root (or CAP_SYS_ADMIN). Where it is refused, the tests
//! that need it print a loud banner and skip, unless `TCC_REQUIRE_MOUNT=1`
//! (set by `.ci/run`), which makes a refused mount fail them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// A mounted tmpfs; see the module docs.
pub struct SmallDisk {
    dir: tempfile::TempDir,
    ballast: PathBuf,
}

impl SmallDisk {
    /// Mounts `bytes` of tmpfs and fills `ballast` bytes of it with a file
    /// that [`free`](Self::free) removes. `None` if mounting is not allowed
    /// here (and not required).
    pub fn mount(bytes: u64, ballast: u64) -> Result<Option<Self>> {
        let dir = tempfile::tempdir()?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .context("running mount")?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if std::env::var("TCC_REQUIRE_MOUNT").is_ok_and(|v| v == "1") {
                bail!("cannot mount a tmpfs for the disk-full tests ({why}); they need root");
            }
            // Written to stderr directly, past the test harness's capture.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPED: a disk-full test, because a tmpfs cannot be mounted here ({why}).\n\
                 *** Run the tests as root to include it (CI does, with TCC_REQUIRE_MOUNT=1).\n"
            );
            return Ok(None);
        }
        let disk = SmallDisk { ballast: dir.path().join("ballast"), dir };
        std::fs::write(&disk.ballast, vec![0xAA; ballast as usize])?;
        Ok(Some(disk))
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Removes the ballast file: frees its space.
    pub fn free(&self) -> Result<()> {
        std::fs::remove_file(&self.ballast)?;
        Ok(())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}
