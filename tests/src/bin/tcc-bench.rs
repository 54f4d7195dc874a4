//! `tcc-bench`: the load generator and benchmark harness.
//!
//! It spawns the real `tcc-coordinator` binary (found next to itself, with a
//! fresh data directory; durability on, as always) and `--participants`
//! in-process no-op participant servers, then runs composite transactions
//! from `--concurrency` workers:
//!
//! ```text
//! Begin(P services) -> P x Append(C commands of B bytes), in parallel
//!                   -> Confirm(wait = true)   (or Cancel(wait = true))
//! ```
//!
//! so each transaction is one Begin, P Appends, one Confirm and P
//! Commits/Rollbacks: `2 + 2P` RPCs. It reports transactions per second,
//! latency percentiles of whole transactions and of the confirm call,
//! errors, the coordinator's CPU seconds per transaction (from
//! `/proc/PID/stat`) and its peak memory (`VmHWM`), with a progress line
//! every second. In the same run it measures the floor: plain unary RPCs
//! (`grpc.health.v1.Health/Check`) against the same coordinator at the
//! same concurrency. Efficiency is then `tps x (2 + 2P) / floor RPC/s`.
//!
//! `--active N` measures holding N ACTIVE transactions instead: resident
//! memory with them open, then the time to recover after `kill -9`.
//!
//! `--postgres` runs cluster mode instead: a throwaway PostgreSQL server
//! (from `/usr/lib/postgresql/*/bin`, durable commits) and `--nodes`
//! coordinators on it, the workers spread over them. It reports the
//! database's commits per composite transaction (write transactions: the
//! change of `txid_current()`, which only writing transactions advance),
//! the transaction-record writes (`tcc_txn` rows inserted, updated and
//! deleted: several share a commit under group commit) and its WAL syncs,
//! and in the same run measures the database's own floor: `pgbench -N`
//! (simple update, one write per commit) at the same concurrency on the
//! same server. The ratios are then `tps x commits per transaction /
//! pgbench TPS` and `tps x record writes per transaction / pgbench TPS`.
//!
//! `--tls` runs everything over mutual TLS with a policy, as a secure
//! deployment does: certificates from a throwaway CA, the workers' Begin and
//! Confirm as the composite `bench`, each Append as its participant's
//! service `bench-N`, phase 2 to participants serving TLS with the
//! coordinator checking their identity. The floor is then measured over
//! TLS as well.
//!
//! `--participant-store sled|postgres` replaces the no-op participants with
//! the SDK's participant service (its exactly-once guard included) over a
//! participant that counts each command in its own store: a sled directory
//! each, or a database each on a throwaway PostgreSQL server. The
//! difference from `noop` is the participant side's cost.
//!
//! Every loop is bounded by `--duration-secs` or `--count`; only loopback
//! addresses are used.

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The same allocator as the coordinator: the load generator shares the
/// cores with it, so its own cost is kept low.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use tcc_proto::v1;
use tcc_tests::{Coordinator, RegistryClient, TopicsClient, TransactionsClient};
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// Command-line flags.
#[derive(Parser, Debug, Clone)]
#[command(about = "Benchmark the TCC coordinator with composite transactions")]
struct Args {
    /// A preset: headline (2 participants x 1 command x 100 B), five
    /// (5 participants), large (64 KiB payloads), cancel (90 % cancel),
    /// active (100k ACTIVE transactions, memory and recovery).
    #[arg(long)]
    scenario: Option<String>,
    /// Concurrent workers (transactions in flight).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Participants per transaction.
    #[arg(long, default_value_t = 2)]
    participants: usize,
    /// Commands per participant.
    #[arg(long, default_value_t = 1)]
    commands: usize,
    /// Payload bytes per command.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Fraction of transactions cancelled instead of confirmed.
    #[arg(long, default_value_t = 0.0)]
    cancel_ratio: f64,
    /// Measured run length, in seconds (after warm-up).
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Stop after this many transactions instead (0: use the duration).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Warm-up before measuring, in seconds.
    #[arg(long, default_value_t = 1)]
    warmup_secs: u64,
    /// Length of the raw-RPC floor measurement, in seconds (0: skip).
    #[arg(long, default_value_t = 3)]
    floor_secs: u64,
    /// Hold this many ACTIVE transactions, then kill -9 and time recovery.
    #[arg(long, default_value_t = 0)]
    active: u64,
    /// gRPC channels (HTTP/2 connections) the workers share.
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// Cluster mode: coordinators on a throwaway PostgreSQL server.
    #[arg(long)]
    postgres: bool,
    /// Cluster mode: how many coordinators.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Mutual TLS and a policy everywhere (see the module docs).
    #[arg(long)]
    tls: bool,
    /// Where the participants keep their data: `noop` (they acknowledge at
    /// once and keep nothing), `sled` or `postgres` (the SDK's participant
    /// service, exactly-once guard included, over a participant that
    /// counts each command in its own store: a temp sled directory, or a
    /// database of its own on a throwaway PostgreSQL server).
    #[arg(long, default_value = "noop")]
    participant_store: String,
    /// Extra flags for the coordinator (repeatable).
    #[arg(long = "coordinator-arg", allow_hyphen_values = true)]
    coordinator_args: Vec<String>,
}

impl Args {
    fn apply_scenario(&mut self) -> Result<()> {
        match self.scenario.as_deref() {
            None | Some("headline") => {}
            Some("five") => self.participants = 5,
            Some("large") => {
                self.payload = 64 * 1024;
                self.concurrency = self.concurrency.min(16);
            }
            Some("cancel") => self.cancel_ratio = 0.9,
            Some("active") => {
                if self.active == 0 {
                    self.active = 100_000;
                }
            }
            Some(other) => bail!("unknown scenario {other:?}; use headline, five, large, cancel or active"),
        }
        Ok(())
    }
}

/// CPU seconds (user + system) of a process, from /proc (USER_HZ = 100).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// A `VmHWM`/`VmRSS` style field of /proc/PID/status, in MiB.
fn memory_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The throwaway CA and the certificates of `--tls`.
struct Security {
    _dir: tempfile::TempDir,
    ca: String,
    issued: std::collections::HashMap<String, tcc_demo_services::pki::Issued>,
    /// The coordinator's flags.
    flags: Vec<String>,
}

static SECURITY: std::sync::OnceLock<Security> = std::sync::OnceLock::new();

impl Security {
    fn make(participants: usize) -> Result<Security> {
        use tcc_demo_services::pki::{Options, Pki};
        let dir = tempfile::tempdir()?;
        let pki = Pki::new("bench CA")?;
        let mut issued = std::collections::HashMap::new();
        let mut names = vec!["bench".to_string(), "tcc-coordinator".to_string()];
        names.extend((0..participants).map(|i| format!("bench-{i}")));
        for name in names {
            issued.insert(name.clone(), pki.issue(&name, &Options::default())?);
        }
        let file = |name: &str, text: &str| -> Result<String> {
            let path = dir.path().join(name);
            std::fs::write(&path, text)?;
            Ok(path.to_string_lossy().into_owned())
        };
        let flags = vec![
            "--tls-cert".into(),
            file("c.pem", &issued["tcc-coordinator"].cert)?,
            "--tls-key".into(),
            file("c.key", &issued["tcc-coordinator"].key)?,
            "--tls-client-ca".into(),
            file("ca.pem", &pki.ca_pem())?,
            "--policy".into(),
            file("policy.toml", "[composite]\nbench = \"own\"\n")?,
        ];
        Ok(Security { _dir: dir, ca: pki.ca_pem(), issued, flags })
    }

    fn tls(&self, identity: &str) -> Result<tcc_domain_sdk::tls::Tls> {
        let i = self.issued.get(identity).with_context(|| format!("no certificate for {identity}"))?;
        Ok(tcc_domain_sdk::tls::Tls::from_pem(&i.cert, &i.key, &self.ca))
    }
}

/// A connection to `node` as `identity` (over mutual TLS with `--tls`).
async fn connect(node: &Coordinator, identity: &str) -> Result<Channel> {
    match SECURITY.get() {
        Some(s) => Ok(s.tls(identity)?.endpoint(&format!("https://{}", node.addr()))?.connect().await?),
        None => node.channel().await,
    }
}

struct Clients {
    tx: Vec<TransactionsClient<Channel>>,
    /// Per channel, a client for each participant service (with `--tls`,
    /// on a channel of that service's identity).
    topics: Vec<Vec<TopicsClient<Channel>>>,
}

/// `n` channels to each of `nodes`, interleaved.
async fn clients(nodes: &[Coordinator], n: usize, participants: usize) -> Result<Clients> {
    let mut tx = Vec::new();
    let mut topics = Vec::new();
    for i in 0..n.max(1) * nodes.len() {
        let node = &nodes[i % nodes.len()];
        let ch = connect(node, "bench").await?;
        tx.push(TransactionsClient::new(ch.clone()));
        let mut per_service = Vec::new();
        for p in 0..participants {
            let ch = if SECURITY.get().is_some() { connect(node, &format!("bench-{p}")).await? } else { ch.clone() };
            per_service.push(TopicsClient::new(ch));
        }
        topics.push(per_service);
    }
    Ok(Clients { tx, topics })
}

#[derive(Default)]
struct Stats {
    whole: Option<Histogram<u64>>,
    confirm: Option<Histogram<u64>>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// One composite transaction; returns (whole, decision) latency in µs.
async fn one_transaction(
    tx: &mut TransactionsClient<Channel>,
    topics: &[TopicsClient<Channel>],
    args: &Args,
    services: &[String],
    payload: &[u8],
    cancel: bool,
) -> Result<(u64, u64)> {
    let start = Instant::now();
    let begun = tx.begin(v1::BeginRequest { participants: services.to_vec(), timeout_ms: 60_000 }).await?.into_inner();
    let appends = begun.partials.iter().enumerate().map(|(i, p)| {
        let mut topics = topics[i % topics.len()].clone();
        let commands = (0..args.commands)
            .map(|i| v1::Command { r#type: "bench.Cmd".into(), key: format!("k{i}"), payload: payload.to_vec() })
            .collect();
        let req = v1::AppendRequest {
            partial_id: p.partial_id.clone(),
            commands,
            idempotency_key: String::new(),
            service: p.service.clone(),
        };
        async move { topics.append(req).await }
    });
    for r in futures::future::join_all(appends).await {
        r?;
    }
    let decide = Instant::now();
    let state = if cancel {
        let req = v1::CancelRequest {
            transaction_id: begun.transaction_id,
            reason: "bench".into(),
            wait: true,
            wait_timeout_ms: 30_000,
        };
        tx.cancel(req).await?.into_inner().state
    } else {
        let req = v1::ConfirmRequest { transaction_id: begun.transaction_id, wait: true, wait_timeout_ms: 30_000 };
        tx.confirm(req).await?.into_inner().state
    };
    let want = if cancel { v1::TransactionState::Cancelled } else { v1::TransactionState::Confirmed };
    if state != want as i32 {
        bail!("transaction ended in state {state}, not {want:?}");
    }
    Ok((start.elapsed().as_micros() as u64, decide.elapsed().as_micros() as u64))
}

async fn run_load(
    nodes: &[Coordinator],
    args: &Args,
    services: &[String],
    measure_for: Duration,
) -> Result<(u64, u64, Stats, Duration)> {
    let clients = clients(nodes, args.channels, args.participants).await?;
    let payload = vec![0x5a_u8; args.payload];
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stats = Arc::new(Mutex::new(Stats { whole: Some(hist()), confirm: Some(hist()) }));
    let started = Instant::now();
    let deadline = started + measure_for;
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let mut tx = clients.tx[w % clients.tx.len()].clone();
        let topics = clients.topics[w % clients.topics.len()].clone();
        let (args, services, payload) = (args.clone(), services.to_vec(), payload.clone());
        let (done, errors, stats) = (done.clone(), errors.clone(), stats.clone());
        workers.push(tokio::spawn(async move {
            let mut whole = hist();
            let mut confirm = hist();
            let mut n: u64 = 0;
            loop {
                if Instant::now() >= deadline || (args.count > 0 && done.load(Ordering::Relaxed) >= args.count) {
                    break;
                }
                let cancel =
                    args.cancel_ratio > 0.0 && ((n as f64 * 0.618_034 + w as f64 * 0.414) % 1.0) < args.cancel_ratio;
                n += 1;
                match one_transaction(&mut tx, &topics, &args, &services, &payload, cancel).await {
                    Ok((w_us, c_us)) => {
                        let _ = whole.record(w_us.max(1));
                        let _ = confirm.record(c_us.max(1));
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("error: {e:#}");
                        }
                    }
                }
            }
            let mut guard = stats.lock().await;
            let s = &mut *guard;
            if let (Some(a), Some(b)) = (s.whole.as_mut(), s.confirm.as_mut()) {
                let _ = a.add(&whole);
                let _ = b.add(&confirm);
            }
        }));
    }
    // Progress, once a second, bounded by the run.
    let progress = {
        let (done, errors) = (done.clone(), errors.clone());
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = done.load(Ordering::Relaxed);
                eprintln!(
                    "  [{:>4.0}s] {:>7} tx/s, {} done, {} errors",
                    started.elapsed().as_secs_f64(),
                    now - last,
                    now,
                    errors.load(Ordering::Relaxed)
                );
                last = now;
            }
        })
    };
    for w in workers {
        w.await?;
    }
    progress.abort();
    let elapsed = started.elapsed();
    let stats = Arc::try_unwrap(stats).map_err(|_| anyhow::anyhow!("stats still shared"))?.into_inner();
    Ok((done.load(Ordering::Relaxed), errors.load(Ordering::Relaxed), stats, elapsed))
}

/// The latency floor of one transaction's critical path: the p50 of one
/// unary RPC (health Check, one at a time) and of one `fdatasync` after a
/// small in-place write to a file in the coordinator's data directory (what
/// the journal does), each measured `n` times.
async fn latency_floor(c: &Coordinator, n: usize) -> Result<(f64, f64)> {
    let mut health = tonic_health::pb::health_client::HealthClient::new(connect(c, "bench").await?);
    let mut rpc = hist();
    for _ in 0..n {
        let t = Instant::now();
        health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await?;
        let _ = rpc.record(t.elapsed().as_micros().max(1) as u64);
    }
    let path = c.data_dir().join("bench-fsync-probe");
    let sync = tokio::task::spawn_blocking(move || -> Result<Histogram<u64>> {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path)?;
        f.write_all(&vec![0u8; 4096 * n])?;
        f.sync_all()?;
        f.rewind()?;
        let mut h = hist();
        for _ in 0..n {
            let t = Instant::now();
            f.write_all(&[0x5a; 300])?;
            f.sync_data()?;
            let _ = h.record(t.elapsed().as_micros().max(1) as u64);
        }
        drop(f);
        std::fs::remove_file(&path)?;
        Ok(h)
    })
    .await??;
    Ok((ms(rpc.value_at_quantile(0.5)), ms(sync.value_at_quantile(0.5))))
}

/// Plain unary RPCs (health Check) at the same concurrency: the floor.
async fn floor(c: &Coordinator, args: &Args) -> Result<f64> {
    let mut chans = Vec::new();
    for _ in 0..args.channels.max(1) {
        chans.push(connect(c, "bench").await?);
    }
    let deadline = Instant::now() + Duration::from_secs(args.floor_secs);
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.concurrency {
        let mut health = tonic_health::pb::health_client::HealthClient::new(chans[w % chans.len()].clone());
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                if health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

async fn run_active(c: &mut Coordinator, args: &Args) -> Result<()> {
    let pid = c.pid().context("coordinator pid")?;
    let rss_before = memory_mib(pid, "VmRSS:").unwrap_or(0.0);
    let clients = clients(std::slice::from_ref(c), args.channels, 1).await?;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.concurrency {
        let mut tx = clients.tx[w % clients.tx.len()].clone();
        let (next, total) = (next.clone(), args.active);
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let req = v1::BeginRequest { participants: vec!["a".into(), "b".into()], timeout_ms: 3_600_000 };
                tx.begin(req).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let begun_in = started.elapsed();
    let rss = memory_mib(pid, "VmRSS:").unwrap_or(0.0);
    let hwm = memory_mib(pid, "VmHWM:").unwrap_or(0.0);
    println!("| ACTIVE transactions held | {} |", args.active);
    println!(
        "| begun in | {:.1} s ({:.0} begins/s) |",
        begun_in.as_secs_f64(),
        args.active as f64 / begun_in.as_secs_f64()
    );
    println!("| coordinator RSS before / with them open (peak) | {rss_before:.0} MiB / {rss:.0} MiB ({hwm:.0} MiB) |");
    c.kill9().await?;
    let restart = Instant::now();
    c.restart().await?;
    let recovery = restart.elapsed();
    let pid = c.pid().context("coordinator pid")?;
    println!("| kill -9, restart until serving (recovery) | {:.2} s |", recovery.as_secs_f64());
    println!("| RSS after recovery | {:.0} MiB |", memory_mib(pid, "VmRSS:").unwrap_or(0.0));
    let stopping = Instant::now();
    let status = c.terminate().await?;
    anyhow::ensure!(status.success(), "SIGTERM: {status}");
    println!("| SIGTERM until exited (checkpoint, summary recorded) | {:.2} s |", stopping.elapsed().as_secs_f64());
    let starting = Instant::now();
    c.restart().await?;
    println!(
        "| restart after a clean stop until serving (summary checked) | {:.2} s |",
        starting.elapsed().as_secs_f64()
    );
    let listed = c
        .admin()
        .await?
        .list_transactions(v1::ListTransactionsRequest {
            states: vec![v1::TransactionState::Active as i32],
            page_size: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    anyhow::ensure!(!listed.transactions.is_empty(), "no ACTIVE transaction after recovery");
    Ok(())
}

/// The database's counters: write transactions so far (`txid_current()`,
/// which itself is one), WAL syncs, every transaction (reads included),
/// and the transaction records written (`tcc_txn` rows inserted, updated
/// and deleted). The statistics are flushed within a second, so this is
/// read after a pause.
async fn db_counters(db: &tokio_postgres::Client) -> Result<(i64, i64, i64, i64)> {
    let row = db
        .query_one(
            "SELECT txid_current(), (SELECT wal_sync FROM pg_stat_wal), \
             (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()), \
             (SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint FROM pg_stat_user_tables \
              WHERE relname = 'tcc_txn')",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1), row.get(2), row.get(3)))
}

/// `pgbench -N` (simple update) on the same server at the same
/// concurrency: the database's floor. Returns its TPS.
async fn pgbench(pg: &tcc_tests::pg::Postgres, args: &Args) -> Result<f64> {
    let bin = pg.bin().join("pgbench");
    let port = pg.port().to_string();
    let common = ["-h", "127.0.0.1", "-p", port.as_str(), "-U", "tcc"];
    let init =
        tokio::process::Command::new(&bin).args(common).args(["-i", "-q", "-s", "10", "postgres"]).output().await?;
    anyhow::ensure!(init.status.success(), "pgbench -i failed: {}", String::from_utf8_lossy(&init.stderr));
    let clients = args.concurrency.clamp(1, 64).to_string();
    let secs = args.floor_secs.max(3).to_string();
    let run = tokio::process::Command::new(&bin)
        .args(common)
        .args(["-N", "-c", clients.as_str(), "-j", "2", "-T", secs.as_str(), "postgres"])
        .output()
        .await?;
    let out = String::from_utf8_lossy(&run.stdout);
    anyhow::ensure!(run.status.success(), "pgbench failed: {out}{}", String::from_utf8_lossy(&run.stderr));
    let tps = out
        .lines()
        .find_map(|l| l.strip_prefix("tps = ").and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()))
        .context("no tps line in pgbench's output")?;
    Ok(tps)
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    args.apply_scenario()?;
    let pg = if args.postgres {
        Some(
            tcc_tests::pg::Postgres::start()
                .await?
                .context("--postgres needs PostgreSQL: apt-get install -y postgresql")?,
        )
    } else {
        None
    };
    let mut coordinator_args: Vec<String> = Vec::new();
    if args.tls {
        anyhow::ensure!(args.active == 0 && !args.postgres, "--tls goes with the load scenarios on one coordinator");
        let security = Security::make(args.participants)?;
        coordinator_args.extend(security.flags.iter().cloned());
        let _ = SECURITY.set(security);
    }
    if !args.coordinator_args.iter().any(|a| a.starts_with("--retention-secs")) {
        coordinator_args.extend(["--retention-secs".into(), "5".into()]);
    }
    if let Some(pg) = &pg {
        coordinator_args.extend(["--database-url".into(), pg.url()]);
    }
    coordinator_args.extend(args.coordinator_args.iter().cloned());
    let coordinator_args: Vec<&str> = coordinator_args.iter().map(|s| s.as_str()).collect();
    let mut nodes = Vec::new();
    for _ in 0..if pg.is_some() { args.nodes.max(1) } else { 1 } {
        nodes.push(Coordinator::start_logged(&coordinator_args, "warn").await?);
    }
    let pids: Vec<u32> = nodes.iter().filter_map(|c| c.pid()).collect();
    eprintln!("coordinator pids {pids:?}; {:?}", args);

    if args.active > 0 {
        println!("| measure | value |\n|---|---|");
        return run_active(&mut nodes[0], &args).await;
    }

    let participant_db = match args.participant_store.as_str() {
        "noop" | "sled" => None,
        "postgres" => Some(
            tcc_tests::pg::Postgres::start()
                .await?
                .context("--participant-store postgres needs PostgreSQL: apt-get install -y postgresql")?,
        ),
        other => bail!("unknown --participant-store {other:?}; use noop, sled or postgres"),
    };
    let participant_dirs = tempfile::tempdir()?;
    let mut services = Vec::new();
    for i in 0..args.participants {
        let name = format!("bench-{i}");
        let url = match (SECURITY.get(), args.participant_store.as_str(), &participant_db) {
            (Some(s), "noop", _) => tcc_tests::start_noop_participant_tls(s.tls(&name)?.server()).await?,
            (Some(_), _, _) => bail!("--tls goes with --participant-store noop"),
            (None, "sled", _) => {
                let store = tcc_domain_sdk::store::sled::SledStore::open(
                    &participant_dirs.path().join(&name),
                    &[tcc_tests::participants::COUNTS],
                )?;
                tcc_tests::participants::serve_counter(store).await?
            }
            (None, _, Some(db)) => {
                let database = format!("bench_{i}");
                db.client().await?.batch_execute(&format!("CREATE DATABASE {database}")).await?;
                let url = format!("postgres://tcc@127.0.0.1:{}/{database}", db.port());
                tcc_tests::participants::serve_counter(tcc_tests::participants::open_counting_pg(&url).await?).await?
            }
            (None, _, None) => tcc_tests::start_noop_participant().await?,
        };
        let mut registry = RegistryClient::new(connect(&nodes[0], &name).await?);
        registry.register(v1::RegisterRequest { service: name.clone(), endpoint: url, ttl_ms: 600_000 }).await?;
        services.push(name);
    }
    // Registrations reach the other nodes within a refresh (1 s).
    for node in &nodes[1..] {
        let mut registry = RegistryClient::new(node.channel().await?);
        anyhow::ensure!(SECURITY.get().is_none(), "--tls is for one coordinator");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listed = registry.list_endpoints(v1::ListEndpointsRequest::default()).await?.into_inner();
            if services.iter().all(|s| listed.endpoints.iter().any(|e| &e.service == s)) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "registrations did not reach every coordinator in 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    if args.warmup_secs > 0 {
        let warm = Args { count: 0, ..args.clone() };
        run_load(&nodes, &warm, &services, Duration::from_secs(args.warmup_secs)).await?;
    }
    let db = match &pg {
        Some(pg) => Some(pg.client().await?),
        None => None,
    };
    let db0 = match &db {
        Some(db) => {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            Some(db_counters(db).await?)
        }
        None => None,
    };
    let cpu0: f64 = pids.iter().filter_map(|p| cpu_seconds(*p)).sum();
    let measure = if args.count > 0 { Duration::from_secs(3600) } else { Duration::from_secs(args.duration_secs) };
    let (done, errors, stats, elapsed) = run_load(&nodes, &args, &services, measure).await?;
    let cpu = pids.iter().filter_map(|p| cpu_seconds(*p)).sum::<f64>() - cpu0;
    let db1 = match &db {
        Some(db) => {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            Some(db_counters(db).await?)
        }
        None => None,
    };
    let peak = pids.iter().filter_map(|p| memory_mib(*p, "VmHWM:")).fold(0.0, f64::max);
    let c = &nodes[0];
    let floor_rps = if args.floor_secs > 0 { floor(c, &args).await? } else { 0.0 };
    let latency = if args.floor_secs > 0 && pg.is_none() { Some(latency_floor(c, 500).await?) } else { None };
    let pgbench_tps = match &pg {
        Some(pg) => Some(pgbench(pg, &args).await?),
        None => None,
    };

    let tps = done as f64 / elapsed.as_secs_f64();
    let rpcs = 2 + 2 * args.participants as u64;
    let whole = stats.whole.unwrap_or_else(hist);
    let confirm = stats.confirm.unwrap_or_else(hist);
    println!("| measure | value |\n|---|---|");
    println!(
        "| shape | {} participants x {} commands x {} B, concurrency {}, cancel {:.0} % |",
        args.participants,
        args.commands,
        args.payload,
        args.concurrency,
        args.cancel_ratio * 100.0
    );
    println!("| participants' store | {} |", args.participant_store);
    println!("| transactions | {done} in {:.1} s, {errors} errors |", elapsed.as_secs_f64());
    println!(
        "| throughput | {tps:.0} tx/s ({:.0} coordinator RPCs/s, {:.0} phase-2 calls/s) |",
        tps * rpcs as f64,
        tps * args.participants as f64
    );
    println!(
        "| whole transaction p50 / p99 / p99.9 | {:.2} / {:.2} / {:.2} ms |",
        ms(whole.value_at_quantile(0.5)),
        ms(whole.value_at_quantile(0.99)),
        ms(whole.value_at_quantile(0.999))
    );
    println!(
        "| confirm (wait) p50 / p99 / p99.9 | {:.2} / {:.2} / {:.2} ms |",
        ms(confirm.value_at_quantile(0.5)),
        ms(confirm.value_at_quantile(0.99)),
        ms(confirm.value_at_quantile(0.999))
    );
    if done > 0 {
        println!("| coordinator CPU per transaction | {:.1} µs ({cpu:.2} CPU-s total) |", cpu * 1e6 / done as f64);
    }
    println!("| coordinator peak RSS | {peak:.0} MiB |");
    if let (Some((x0, w0, a0, r0)), Some((x1, w1, a1, r1))) = (db0, db1) {
        let n = done.max(1) as f64;
        let commits = (x1 - x0 - 1) as f64 / n;
        let records = (r1 - r0) as f64 / n;
        println!("| coordinators / store | {} on PostgreSQL (durable commits) |", nodes.len());
        println!("| database commits (write transactions) per transaction | {commits:.2} |");
        println!("| record writes per transaction (tcc_txn rows inserted, updated, deleted) | {records:.2} |");
        println!("| database transactions (reads included) per transaction | {:.1} |", (a1 - a0) as f64 / n);
        println!("| database WAL syncs per transaction | {:.2} |", (w1 - w0) as f64 / n);
        if let Some(floor) = pgbench_tps {
            println!("| pgbench -N (simple update), same server, same concurrency | {floor:.0} TPS |");
            println!(
                "| ratio (tx/s x commits per transaction / pgbench TPS) | {:.0} % |",
                100.0 * tps * commits / floor
            );
            println!(
                "| ratio of writes (tx/s x record writes per transaction / pgbench TPS) | {:.0} % |",
                100.0 * tps * records / floor
            );
        }
    }
    if floor_rps > 0.0 {
        println!("| raw unary RPC floor (health Check) | {floor_rps:.0} RPC/s |");
        println!("| efficiency (tx/s x {rpcs} RPCs / floor) | {:.0} % |", 100.0 * tps * rpcs as f64 / floor_rps);
    }
    if let Some((rpc, sync)) = latency {
        // Begin, Append, Confirm and the Commits inside it are round trips
        // one after the other, each behind a durable write.
        println!(
            "| latency floor: one unary RPC / one fdatasync (p50, one at a time) | {rpc:.3} / {sync:.3} ms; critical path 4 x both = {:.2} ms |",
            4.0 * (rpc + sync)
        );
    }
    if errors > 0 {
        bail!("{errors} transactions failed");
    }
    Ok(())
}
