//! A throwaway PostgreSQL server per test, from the binaries of Debian's
//! `postgresql` package (`/usr/lib/postgresql/<version>/bin`, or the
//! directory in `TCC_PG_BIN`).
//!
//! * A cluster is made once per machine and PostgreSQL version with
//!   `initdb` (a template under the temp directory); each server copies it
//!   into its own temp directory and listens on a free loopback port. As
//!   root (where `initdb` refuses to run) everything runs as the `postgres`
//!   user, through `setpriv`, which execs, so the child is the server
//!   itself and dies with the test.
//! * Durability is the server's default: `fsync` and `synchronous_commit`
//!   on.
//! * Where PostgreSQL is not installed, [`Postgres::start`] returns `None`
//!   and prints, loudly, that the test was skipped and how to install it
//!   (the tests crate's build script also warns at build time). With
//!   `TCC_REQUIRE_POSTGRES=1` (set by `.ci/run`), a missing or failing
//!   PostgreSQL fails the test instead.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

/// Where the server binaries are: `TCC_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin` that has `postgres` and `initdb`.
pub fn binaries() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TCC_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("postgres").is_file() && bin.join("initdb").is_file()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// Whether a missing PostgreSQL fails the tests (`TCC_REQUIRE_POSTGRES=1`).
pub fn required() -> bool {
    std::env::var("TCC_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

fn is_root() -> bool {
    std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// A command that runs `program` as the `postgres` user when we are root.
fn command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn chown_to_postgres(path: &Path) -> Result<()> {
    if is_root() {
        let status = std::process::Command::new("chown").args(["-R", "postgres:postgres"]).arg(path).status()?;
        if !status.success() {
            bail!("chown -R postgres {} failed", path.display());
        }
    }
    Ok(())
}

/// The cluster every server starts from (made once; see the module docs).
async fn template(bin: &Path) -> Result<PathBuf> {
    static MAKING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let version = bin.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()).unwrap_or("pg").to_string();
    let root = std::env::temp_dir().join(format!("tcc-pg-template-{version}"));
    let done = root.join("data").join("PG_VERSION");
    if done.is_file() {
        return Ok(root.join("data"));
    }
    // One process at a time makes it; others use what it made.
    let _making = MAKING.lock().await;
    if done.is_file() {
        return Ok(root.join("data"));
    }
    let staging = std::env::temp_dir().join(format!("tcc-pg-template-{version}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    chown_to_postgres(&staging)?;
    let out = command(&bin.join("initdb"))
        .arg("-D")
        .arg(staging.join("data"))
        .args(["-A", "trust", "-U", "tcc", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])
        .output()
        .await
        .context("running initdb")?;
    if !out.status.success() {
        bail!("initdb failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    // Another process may have won the race: then its template is used.
    if std::fs::rename(&staging, &root).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    if !done.is_file() {
        bail!("the PostgreSQL template cluster {} is incomplete; delete it", root.display());
    }
    Ok(root.join("data"))
}

/// A PostgreSQL server of one test, killed when dropped.
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Postgres {
    /// Starts a fresh server, or returns `None` (after saying so, loudly)
    /// where PostgreSQL is not installed and not required.
    pub async fn start() -> Result<Option<Self>> {
        let Some(bin) = binaries() else {
            if required() {
                bail!(
                    "TCC_REQUIRE_POSTGRES=1 but no PostgreSQL server binaries were found under /usr/lib/postgresql \
                     (install them with `apt-get install -y postgresql`, or set TCC_PG_BIN)"
                );
            }
            // Written to stderr directly, past the test harness's capture
            // (which would hide it for a passing test); once per process.
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "\n*** SKIPPED: the PostgreSQL tests of this binary, because PostgreSQL is not installed.\n\
                     *** Install it with `apt-get install -y postgresql` (or point TCC_PG_BIN at its bin directory)\n\
                     *** to run the cluster tests; CI (.ci/run) installs it and requires them.\n"
                );
            });
            return Ok(None);
        };
        let template = template(&bin).await?;
        let dir = tempfile::tempdir()?;
        let status = std::process::Command::new("cp").arg("-a").arg(&template).arg(dir.path().join("data")).status()?;
        if !status.success() {
            bail!("copying the PostgreSQL template failed");
        }
        chown_to_postgres(dir.path())?;
        let port = crate::free_port()?;
        let mut pg = Postgres { bin, dir, port, child: None };
        pg.launch().await?;
        Ok(Some(pg))
    }

    /// Starts the server process on this server's data and port, and waits
    /// (up to 30 s) until it accepts connections.
    async fn launch(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("postgres.log"))?;
        chown_to_postgres(&self.dir.path().join("postgres.log"))?;
        let child = command(&self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.path().display()))
            .args(["-c", "max_connections=400", "-c", "shared_buffers=64MB", "-c", "fsync=on"])
            .args(["-c", "synchronous_commit=on"])
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("starting postgres")?;
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await.is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!("postgres exited with {status}; its log:\n{}", self.logs());
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("postgres did not accept connections within 30 s; its log:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The URL coordinators connect with.
    pub fn url(&self) -> String {
        format!("postgres://tcc@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's log.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// A direct connection, for a test's own SQL.
    pub async fn client(&self) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Crashes the server: immediate shutdown (SIGQUIT), every connection
    /// cut, no checkpoint; the next start recovers from the WAL.
    pub async fn crash(&mut self) -> Result<()> {
        self.signal("-QUIT").await
    }

    async fn signal(&mut self, signal: &str) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill").args([signal, &pid.to_string()]).status();
            }
            tokio::time::timeout(Duration::from_secs(30), child.wait()).await.context("postgres did not stop")??;
        }
        Ok(())
    }

    /// Starts the server again after [`Postgres::crash`], on the same data
    /// and port.
    pub async fn start_again(&mut self) -> Result<()> {
        self.launch().await
    }

    /// The directory of `pgbench` and the other client tools.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}
