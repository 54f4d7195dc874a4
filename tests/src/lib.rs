//! Harness for end-to-end tests against the real binaries.
//!
//! * [`Coordinator`] spawns the `tcc-coordinator` binary on `127.0.0.1:0`
//!   with its own data directory, waits for its readiness line on stdout
//!   (no sleeping), writes its logs to a file shown on failure, and kills it
//!   when dropped. [`Coordinator::kill9`] and [`Coordinator::terminate`]
//!   stop it hard or gracefully; [`Coordinator::restart`] starts it again on
//!   the same data directory.
//! * [`TestParticipant`] is an in-process `tcc.v1.Participant` server whose
//!   behaviour a test scripts (fail transiently N times, refuse, be slow),
//!   and which records every call so a test can await and check them.
//!
//! The binaries are built by `cargo test --workspace` (cargo builds a
//! package's binaries for its integration tests) and found next to the test
//! executable, in `target/<profile>/`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tcc_proto::v1;
use tcc_proto::v1::participant_server::{Participant, ParticipantServer};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

pub mod disk;
pub mod participants;
pub mod pg;
pub mod shop;

pub use tcc_proto::v1::{
    admin_client::AdminClient, registry_client::RegistryClient, topics_client::TopicsClient,
    transactions_client::TransactionsClient,
};

/// Path of a workspace binary built for this test run.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    // A test runs from target/<profile>/deps/, a binary (tcc-bench) from
    // target/<profile>/: look next to the executable, then one level up.
    let here = exe.parent().expect("executable directory");
    let candidates = [here.join(name), here.parent().map(|p| p.join(name)).unwrap_or_default()];
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => p.clone(),
        None => panic!(
            "{name} not found next to {}: build the workspace first (`cargo test --workspace` or `cargo build --release --workspace`)",
            exe.display()
        ),
    }
}

/// Spawns `binary` with `args`, logs to `log`, and waits (up to 30 s) for
/// the readiness line `"<ready> listening on ADDR"` on its stdout.
async fn spawn_ready(
    prefix: &[String],
    binary: &str,
    args: &[String],
    env: &[(String, String)],
    log: &Path,
    ready: &str,
    filter: &str,
) -> Result<(Child, SocketAddr)> {
    let log_file = std::fs::File::create(log)?;
    let mut command = match prefix.split_first() {
        Some((wrapper, wrapper_args)) => {
            let mut c = Command::new(wrapper);
            c.args(wrapper_args).arg(crate::binary(binary));
            c
        }
        None => Command::new(crate::binary(binary)),
    };
    let mut child = command
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", filter)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {binary}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let prefix = format!("{ready} listening on ");
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = line.strip_prefix(&prefix) {
                return Ok::<_, anyhow::Error>(Some(addr.parse::<SocketAddr>()?));
            }
        }
        Ok(None)
    })
    .await;
    match waited {
        Ok(Ok(Some(addr))) => {
            // Keep draining stdout so the child never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Ok((child, addr))
        }
        other => {
            let logs = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{binary} did not become ready ({other:?}); its log:\n{logs}");
        }
    }
}

/// A running workspace binary that prints a readiness line: a demo service
/// (or the coordinator, through [`Coordinator`]).
pub struct Process {
    child: Option<Child>,
    addr: SocketAddr,
    binary: String,
    ready: String,
    args: Vec<String>,
    log: PathBuf,
    filter: String,
    tmp: Arc<tempfile::TempDir>,
    /// A command that runs the binary (e.g. `prlimit --nofile=N:N --`).
    prefix: Vec<String>,
}

/// The log filter of spawned processes: debug for our crates, so a failing
/// test shows what happened.
pub const DEBUG_LOGS: &str = "info,tcc_coordinator=debug,tcc_domain_sdk=debug";

impl Process {
    /// Starts `binary` with `args`, waiting for `"<ready> listening on"`.
    /// Logs go to a file in `tmp`, shown if the test fails.
    pub async fn start(binary: &str, ready: &str, args: Vec<String>, tmp: Arc<tempfile::TempDir>) -> Result<Self> {
        Self::start_logged(binary, ready, args, tmp, DEBUG_LOGS).await
    }

    /// [`start`](Self::start) with a `RUST_LOG` filter of your choice.
    pub async fn start_logged(
        binary: &str,
        ready: &str,
        args: Vec<String>,
        tmp: Arc<tempfile::TempDir>,
        filter: &str,
    ) -> Result<Self> {
        Self::start_prefixed(Vec::new(), binary, ready, args, tmp, filter).await
    }

    /// [`start_logged`](Self::start_logged) run through `prefix`, a
    /// command that runs the binary (e.g. `prlimit --nofile=N:N --`).
    pub async fn start_prefixed(
        prefix: Vec<String>,
        binary: &str,
        ready: &str,
        args: Vec<String>,
        tmp: Arc<tempfile::TempDir>,
        filter: &str,
    ) -> Result<Self> {
        static RUN: AtomicU64 = AtomicU64::new(0);
        let log = tmp.path().join(format!("{ready}-{}.log", RUN.fetch_add(1, Ordering::Relaxed)));
        let (child, addr) = spawn_ready(&prefix, binary, &args, &[], &log, ready, filter).await?;
        let (binary, ready, filter) = (binary.into(), ready.into(), filter.into());
        Ok(Process { child: Some(child), addr, binary, ready, args, log, filter, tmp, prefix })
    }

    /// Starts it again (after it stopped) with extra environment variables,
    /// e.g. `TCC_CRASH_AT`. Fails if it does not become ready.
    pub async fn restart_with_env(&mut self, env: &[(&str, &str)]) -> Result<()> {
        anyhow::ensure!(self.child.is_none(), "still running");
        static RUN: AtomicU64 = AtomicU64::new(1_000);
        let log = self.tmp.path().join(format!("{}-{}.log", self.ready, RUN.fetch_add(1, Ordering::Relaxed)));
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let (child, addr) =
            spawn_ready(&self.prefix, &self.binary, &self.args, &env, &log, &self.ready, &self.filter).await?;
        self.child = Some(child);
        self.addr = addr;
        self.log = log;
        Ok(())
    }

    /// Starts it again (after it stopped) with `extra` arguments for this
    /// start only (later restarts go without them).
    pub async fn restart_with_args(&mut self, extra: &[&str]) -> Result<()> {
        anyhow::ensure!(self.child.is_none(), "still running");
        static RUN: AtomicU64 = AtomicU64::new(2_000);
        let log = self.tmp.path().join(format!("{}-{}.log", self.ready, RUN.fetch_add(1, Ordering::Relaxed)));
        let mut args = self.args.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        let (child, addr) =
            spawn_ready(&self.prefix, &self.binary, &args, &[], &log, &self.ready, &self.filter).await?;
        self.child = Some(child);
        self.addr = addr;
        self.log = log;
        Ok(())
    }

    /// Waits (up to `limit`) for the process to exit by itself (e.g. at a
    /// crash point) and returns its status.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        Ok(tokio::time::timeout(limit, child.wait()).await.context("process did not exit")??)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Its log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A channel to it.
    pub async fn channel(&self) -> Result<Channel> {
        Ok(Channel::from_shared(self.url())?.connect().await?)
    }

    /// kill -9: no chance to flush or clean up.
    pub async fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM, then waits for the exit status.
    pub async fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        let pid = child.id().context("no pid")?;
        let status = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        Ok(tokio::time::timeout(Duration::from_secs(20), child.wait()).await??)
    }

    /// Starts it again with the same arguments (same data directory) after
    /// [`kill9`](Self::kill9) or [`terminate`](Self::terminate). The address
    /// may change unless the arguments fix it.
    pub async fn restart(&mut self) -> Result<()> {
        anyhow::ensure!(self.child.is_none(), "still running");
        let (binary, ready, filter) = (self.binary.clone(), self.ready.clone(), self.filter.clone());
        *self =
            Process::start_prefixed(self.prefix.clone(), &binary, &ready, self.args.clone(), self.tmp.clone(), &filter)
                .await?;
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        if std::thread::panicking() {
            eprintln!("--- {} log ({}) ---\n{}", self.ready, self.log.display(), self.logs());
        }
    }
}

/// A running `tcc-coordinator` process with its own data directory.
pub struct Coordinator {
    process: Process,
    data_dir: PathBuf,
}

impl Coordinator {
    /// Starts a coordinator with a fresh data directory and extra flags.
    pub async fn start(args: &[&str]) -> Result<Self> {
        Self::start_logged(args, DEBUG_LOGS).await
    }

    /// [`start`](Self::start) with a `RUST_LOG` filter of your choice.
    pub async fn start_logged(args: &[&str], filter: &str) -> Result<Self> {
        Self::start_full(Vec::new(), None, args, filter).await
    }

    /// [`start`](Self::start) with at most `nofile` open files (soft and
    /// hard limit, through `prlimit`).
    pub async fn start_with_open_files(nofile: u64, args: &[&str]) -> Result<Self> {
        let prefix = vec!["prlimit".to_string(), format!("--nofile={nofile}:{nofile}"), "--".to_string()];
        Self::start_full(prefix, None, args, DEBUG_LOGS).await
    }

    /// [`start`](Self::start) on the data directory `data_dir` (which may
    /// exist); logs go to a fresh temporary directory.
    pub async fn start_in(data_dir: &Path, args: &[&str]) -> Result<Self> {
        Self::start_full(Vec::new(), Some(data_dir.to_path_buf()), args, DEBUG_LOGS).await
    }

    async fn start_full(prefix: Vec<String>, data_dir: Option<PathBuf>, args: &[&str], filter: &str) -> Result<Self> {
        let tmp = Arc::new(tempfile::tempdir()?);
        let data_dir = data_dir.unwrap_or_else(|| tmp.path().join("data"));
        let mut all: Vec<String> = vec!["--data-dir".into(), data_dir.to_string_lossy().into_owned()];
        if !args.contains(&"--listen") {
            all.extend(["--listen".to_string(), "127.0.0.1:0".to_string()]);
        }
        all.extend(args.iter().map(|s| s.to_string()));
        let process = Process::start_prefixed(prefix, "tcc-coordinator", "tcc-coordinator", all, tmp, filter).await?;
        Ok(Coordinator { process, data_dir })
    }

    /// Starts a coordinator expected to fail; returns its exit status and
    /// log.
    pub async fn start_failing(data_dir: &Path, args: &[&str]) -> Result<(std::process::ExitStatus, String)> {
        Self::start_failing_with_env(data_dir, args, &[]).await
    }

    /// [`start_failing`](Self::start_failing) with environment variables.
    pub async fn start_failing_with_env(
        data_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<(std::process::ExitStatus, String)> {
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            Command::new(binary("tcc-coordinator"))
                .arg("--listen")
                .arg("127.0.0.1:0")
                .arg("--data-dir")
                .arg(data_dir)
                .args(args)
                .envs(env.iter().copied())
                .kill_on_drop(true)
                .output(),
        )
        .await??;
        Ok((out.status, String::from_utf8_lossy(&out.stderr).into_owned()))
    }

    /// The gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.process.addr()
    }

    /// Its process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        self.process.url()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The temporary directory holding data and logs (for sibling
    /// processes of the same test).
    pub fn tmp(&self) -> Arc<tempfile::TempDir> {
        self.process.tmp.clone()
    }

    /// Its log so far.
    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// A channel to it.
    pub async fn channel(&self) -> Result<Channel> {
        self.process.channel().await
    }

    /// A Transactions client.
    pub async fn transactions(&self) -> Result<TransactionsClient<Channel>> {
        Ok(TransactionsClient::new(self.channel().await?))
    }

    /// A Topics client.
    pub async fn topics(&self) -> Result<TopicsClient<Channel>> {
        Ok(TopicsClient::new(self.channel().await?))
    }

    /// An Admin client.
    pub async fn admin(&self) -> Result<AdminClient<Channel>> {
        Ok(AdminClient::new(self.channel().await?))
    }

    /// A Registry client.
    pub async fn registry(&self) -> Result<RegistryClient<Channel>> {
        Ok(RegistryClient::new(self.channel().await?))
    }

    /// Every transaction in `states` (all if empty), following the pages.
    pub async fn list_all(&self, states: &[v1::TransactionState]) -> Result<Vec<v1::Transaction>> {
        let mut admin = self.admin().await?;
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = v1::ListTransactionsRequest {
                states: states.iter().map(|s| *s as i32).collect(),
                page_size: 1000,
                page_token,
                ..Default::default()
            };
            let page = admin.list_transactions(req).await?.into_inner();
            out.extend(page.transactions);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            page_token = page.next_page_token;
        }
    }

    /// Begins a transaction for `services`.
    pub async fn begin(&self, services: &[&str], timeout_ms: u64) -> Result<v1::BeginResponse> {
        let req = v1::BeginRequest { participants: services.iter().map(|s| s.to_string()).collect(), timeout_ms };
        Ok(self.transactions().await?.begin(req).await?.into_inner())
    }

    /// Appends `cmds` to a partial topic with an idempotency key (may be
    /// empty); the gRPC status on refusal.
    pub async fn append(&self, partial: &str, cmds: Vec<v1::Command>, key: &str) -> Result<v1::AppendResponse, Status> {
        let mut topics = self.topics().await.map_err(|e| Status::unknown(e.to_string()))?;
        let req = v1::AppendRequest {
            partial_id: partial.into(),
            commands: cmds,
            idempotency_key: key.into(),
            service: String::new(),
        };
        Ok(topics.append(req).await?.into_inner())
    }

    /// Registers a participant's endpoint with a long lease.
    pub async fn register(&self, service: &str, p: &TestParticipant) -> Result<()> {
        self.registry()
            .await?
            .register(v1::RegisterRequest { service: service.into(), endpoint: p.url(), ttl_ms: 600_000 })
            .await?;
        Ok(())
    }

    /// kill -9: no chance to flush or clean up.
    pub async fn kill9(&mut self) -> Result<()> {
        self.process.kill9().await
    }

    /// SIGTERM, then waits for the exit status.
    pub async fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        self.process.terminate().await
    }

    /// Starts the coordinator again on the same data directory and flags.
    pub async fn restart(&mut self) -> Result<()> {
        self.process.restart().await
    }

    /// Starts it again with `extra` flags for this start only.
    pub async fn restart_with_args(&mut self, extra: &[&str]) -> Result<()> {
        self.process.restart_with_args(extra).await
    }

    /// Sends a signal (`"STOP"`, `"CONT"`, ...) to the running process.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.pid().context("not running")?;
        let status = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status()?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }

    /// Restarts it with extra environment variables (e.g. `TCC_CRASH_AT`).
    pub async fn restart_with_env(&mut self, env: &[(&str, &str)]) -> Result<()> {
        self.process.restart_with_env(env).await
    }

    /// Waits for it to exit by itself (a crash point) and returns the status.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        self.process.wait_exit(limit).await
    }

    /// Starts it on the same data directory expecting it to die before it
    /// is ready (e.g. a crash point during recovery); returns its stderr.
    pub async fn start_crashing(&self, env: &[(&str, &str)]) -> Result<String> {
        anyhow::ensure!(self.process.child.is_none(), "still running");
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            Command::new(binary("tcc-coordinator"))
                .args(&self.process.args)
                .envs(env.iter().copied())
                .kill_on_drop(true)
                .output(),
        )
        .await??;
        anyhow::ensure!(!out.status.success(), "expected a crash, got {:?}", out.status);
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// One call received by a [`TestParticipant`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// "commit" or "rollback".
    pub kind: &'static str,
    /// The partial id.
    pub partial_id: String,
    /// The transaction id.
    pub transaction_id: String,
    /// The commands carried.
    pub commands: Vec<v1::StoredCommand>,
    /// Whether this call was answered OK (false while in progress, and for
    /// failed or abandoned calls).
    pub acked: bool,
}

#[derive(Default)]
struct Behaviour {
    /// Answer UNAVAILABLE to this many calls first.
    fail_transiently: AtomicU32,
    /// Answer FAILED_PRECONDITION to every call while set.
    refuse: AtomicBool,
    /// Sleep this long (ms) before answering.
    delay_ms: AtomicU64,
}

struct Shared {
    behaviour: Behaviour,
    calls: Mutex<Vec<Call>>,
    changed: watch::Sender<usize>,
}

/// An in-process participant service on an ephemeral loopback port.
pub struct TestParticipant {
    shared: Arc<Shared>,
    addr: SocketAddr,
    scheme: &'static str,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

struct Service(Arc<Shared>);

impl Service {
    async fn handle(
        &self,
        kind: &'static str,
        req: v1::PhaseTwoRequest,
    ) -> Result<Response<v1::PhaseTwoResponse>, Status> {
        // The delay is read before the call is recorded: a test that sees
        // the call and then changes the delay does not change this call's.
        let delay = self.0.behaviour.delay_ms.load(Ordering::SeqCst);
        // Recorded on arrival, so a call the caller gave up on still shows.
        let index = {
            let mut calls = self.0.calls.lock().unwrap();
            calls.push(Call {
                kind,
                partial_id: req.partial_id,
                transaction_id: req.transaction_id,
                commands: req.commands,
                acked: false,
            });
            calls.len() - 1
        };
        self.0.changed.send_modify(|n| *n += 1);
        let b = &self.0.behaviour;
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let transient =
            b.fail_transiently.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if transient {
            return Err(Status::unavailable("test participant: transient failure"));
        }
        if b.refuse.load(Ordering::SeqCst) {
            return Err(Status::failed_precondition("test participant: refused"));
        }
        self.0.calls.lock().unwrap()[index].acked = true;
        self.0.changed.send_modify(|n| *n += 1);
        Ok(Response::new(v1::PhaseTwoResponse {}))
    }
}

#[tonic::async_trait]
impl Participant for Service {
    async fn commit(&self, r: Request<v1::PhaseTwoRequest>) -> Result<Response<v1::PhaseTwoResponse>, Status> {
        self.handle("commit", r.into_inner()).await
    }
    async fn rollback(&self, r: Request<v1::PhaseTwoRequest>) -> Result<Response<v1::PhaseTwoResponse>, Status> {
        self.handle("rollback", r.into_inner()).await
    }
}

impl TestParticipant {
    /// Starts serving on an ephemeral loopback port.
    pub async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    /// Starts serving over TLS with `tls` (its certificate names the
    /// service it answers as; see `tcc_domain_sdk::tls`).
    pub async fn start_tls(tls: tonic::transport::ServerTlsConfig) -> Result<Self> {
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<tonic::transport::ServerTlsConfig>) -> Result<Self> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls)?;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared { behaviour: Behaviour::default(), calls: Mutex::default(), changed });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let svc = ParticipantServer::new(Service(shared.clone()));
        let server = tokio::spawn(async move {
            let _ = builder
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        Ok(TestParticipant { shared, addr, scheme, stop: Some(stop), server: Some(server) })
    }

    /// Its endpoint URI.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Answer UNAVAILABLE to the next `n` calls.
    pub fn fail_transiently(&self, n: u32) {
        self.shared.behaviour.fail_transiently.store(n, Ordering::SeqCst);
    }

    /// Refuse (FAILED_PRECONDITION) every call while `on`.
    pub fn refuse(&self, on: bool) {
        self.shared.behaviour.refuse.store(on, Ordering::SeqCst);
    }

    /// Wait this long before answering.
    pub fn delay(&self, d: Duration) {
        self.shared.behaviour.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.calls.lock().unwrap().clone()
    }

    /// Waits (up to 30 s) until `cond` holds for the calls received.
    pub async fn wait_for(&self, what: &str, cond: impl Fn(&[Call]) -> bool) -> Result<Vec<Call>> {
        let mut rx = self.shared.changed.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                {
                    let calls = self.shared.calls.lock().unwrap();
                    if cond(&calls) {
                        return calls.clone();
                    }
                }
                if rx.changed().await.is_err() {
                    return Vec::new();
                }
            }
        })
        .await;
        match waited {
            Ok(calls) => Ok(calls),
            Err(_) => bail!("timed out waiting for {what}; calls so far: {:#?}", self.calls()),
        }
    }

    /// Stops serving (the port then refuses connections).
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.server.take() {
            let _ = h.await;
        }
    }
}

impl Drop for TestParticipant {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A participant that acknowledges everything at once and keeps nothing
/// (for load: benchmark and soak).
struct Noop;

#[tonic::async_trait]
impl Participant for Noop {
    async fn commit(&self, _: Request<v1::PhaseTwoRequest>) -> Result<Response<v1::PhaseTwoResponse>, Status> {
        Ok(Response::new(v1::PhaseTwoResponse {}))
    }
    async fn rollback(&self, _: Request<v1::PhaseTwoRequest>) -> Result<Response<v1::PhaseTwoResponse>, Status> {
        Ok(Response::new(v1::PhaseTwoResponse {}))
    }
}

/// Serves a no-op participant on an ephemeral loopback port for the rest of
/// the process; returns its endpoint URI.
pub async fn start_noop_participant() -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ParticipantServer::new(Noop).max_decoding_message_size(64 << 20))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    Ok(format!("http://{addr}"))
}

/// [`start_noop_participant`] serving over TLS with `tls`.
pub async fn start_noop_participant_tls(tls: tonic::transport::ServerTlsConfig) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)?
            .add_service(ParticipantServer::new(Noop).max_decoding_message_size(64 << 20))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    Ok(format!("https://{addr}"))
}

/// Polls `probe` every 20 ms until it returns `Some`, for at most `limit`.
/// For conditions the system exposes no event for (e.g. a record being
/// garbage-collected); bounded, never a fixed sleep.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How far apart the ports of [`free_port`] are.
pub const PORT_BLOCK: u64 = 8;

/// A loopback port that was free a moment ago (for processes that must be
/// restarted on the same address). It is taken below the kernel's
/// ephemeral range (`ip_local_port_range`), which the outgoing connections
/// of every test draw from: a port from that range, free when chosen, was
/// now and then taken by some client's connection before the process
/// meant for it (or restarted on it) could listen. Each process walks its
/// own sequence through the range, from an offset of its pid, so that
/// tests running at once rarely try the same port; it steps by
/// [`PORT_BLOCK`], so that a caller may use the few ports after the one
/// it got (`shop-demo` takes five in a row) without meeting the next
/// caller's.
pub fn free_port() -> Result<u16> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .unwrap_or(32_768);
    let (low, high) = (10_000u64, ephemeral_low.clamp(10_000 + PORT_BLOCK, 65_535));
    let blocks = (high - low) / PORT_BLOCK;
    let start = u64::from(std::process::id()).wrapping_mul(7_919) % blocks;
    for _ in 0..blocks.min(2_000) {
        let block = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % blocks;
        let port = (low + block * PORT_BLOCK) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A command for an Append request.
pub fn command(kind: &str, key: &str, payload: &[u8]) -> v1::Command {
    v1::Command { r#type: kind.into(), key: key.into(), payload: payload.to_vec() }
}

/// Says that a test was skipped, and why, on the process's stderr itself:
/// past the test harness's capture of `eprintln!`, which would hide it
/// behind an `ok`.
pub fn say_skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {why}\n");
}
