//! The deterministic simulation world, shared by the randomized simulation
//! (`tests/simulation.rs`) and the scenario scripts (`tests/scripts.rs`).
//!
//! Everything runs on one thread, in a tokio runtime whose time is paused
//! (it jumps ahead whenever every task waits), so a run depends on nothing
//! but its seed:
//!
//! * [`SimClock`]: the engine's clock is tokio's paused time plus an offset
//!   the world can step (a wall clock jumping back or forward);
//! * ids and jitter come from a [`SeededEntropy`];
//! * [`SimStore`]: the real in-memory store behind a wrapper that adds a
//!   seeded latency to writes (so operations interleave), refuses every
//!   write of a node that crashed (a dead process writes nothing), and
//!   hands every successful write to the [`Checker`];
//! * [`SimNet`]: simulated participant services behind the phase-2
//!   [`Transport`]: up, down, slow, refusing, answering after the call's
//!   deadline, or answering twice; each records what it applied.
//!
//! A node is the real engine, delivery driver and sweeper on that store. A
//! crash drops it (its tasks are aborted, its in-flight writes refused);
//! recovery starts a new one on the same store.
//!
//! The [`Checker`] holds the invariants of ARCHITECTURE.md and records
//! every break it sees, with the trace line it happened at.

// Each test crate that includes this module uses part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tcc_coordinator::clock::{Clock, SeededEntropy};
use tcc_coordinator::config::{DeliveryPolicy, Limits};
use tcc_coordinator::delivery::Delivery;
use tcc_coordinator::delivery::transport::{CallError, Phase2Call, Transport};
use tcc_coordinator::engine::{Engine, sweeper};
use tcc_coordinator::error::{Error, Result};
use tcc_coordinator::model::{
    AppendReceipt, CommandRecord, Decision, PartialId, Registration, TxnId, TxnRecord, TxnState,
};
use tcc_coordinator::store::memory::MemStore;
use tcc_coordinator::store::{AppendBatch, ListPage, ListQuery, Store};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The simulated wall clock starts here (unix ms).
pub const EPOCH_MS: i64 = 1_800_000_000_000;

/// Locks a mutex of the simulation (a panic elsewhere already failed the run).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tokio's paused time plus a steppable offset.
pub struct SimClock {
    start: tokio::time::Instant,
    offset: AtomicI64,
}

impl SimClock {
    /// A clock at [`EPOCH_MS`] now.
    pub fn new() -> Self {
        SimClock { start: tokio::time::Instant::now(), offset: AtomicI64::new(0) }
    }
    /// Steps the wall clock (negative: back), as NTP or a restored VM would.
    pub fn step(&self, ms: i64) {
        self.offset.fetch_add(ms, Ordering::SeqCst);
    }
    /// How far the steps moved the wall clock, in ms (negative: back).
    pub fn offset_ms(&self) -> i64 {
        self.offset.load(Ordering::SeqCst)
    }
    /// Milliseconds of simulated time since the start (unaffected by steps).
    pub fn elapsed_ms(&self) -> i64 {
        self.start.elapsed().as_millis() as i64
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> i64 {
        EPOCH_MS + self.elapsed_ms() + self.offset.load(Ordering::SeqCst)
    }
}

/// Names ids by order of appearance (T1, T2, ... and P1, P2, ...), so a
/// trace reads well and does not depend on id bytes.
#[derive(Default)]
pub struct Names {
    txns: HashMap<TxnId, String>,
    partials: HashMap<PartialId, String>,
}

impl Names {
    /// The name of a transaction id.
    pub fn txn(&mut self, id: TxnId) -> String {
        let n = self.txns.len() + 1;
        self.txns.entry(id).or_insert_with(|| format!("T{n}")).clone()
    }
    /// The name of a partial id.
    pub fn partial(&mut self, id: PartialId) -> String {
        let n = self.partials.len() + 1;
        self.partials.entry(id).or_insert_with(|| format!("P{n}")).clone()
    }
}

/// An acknowledged append: partial, first sequence, (type, payload) of
/// each command.
type Acked = (PartialId, u64, Vec<(String, Vec<u8>)>);

/// What the checker knows of one transaction.
#[derive(Default, Clone)]
struct Known {
    /// The decision, once a write took it.
    decision: Option<Decision>,
    /// Command counts per participant when the decision was written.
    frozen: Vec<u64>,
    /// Acknowledged appends: (partial, first sequence, commands).
    acked: Vec<Acked>,
    /// The decision a client was told (Confirm/Cancel answered OK).
    told: Option<Decision>,
    /// Participants (partial, service), as last written.
    participants: Vec<(PartialId, String)>,
}

/// The invariants, checked at every write, phase-2 call and acknowledgement.
#[derive(Default)]
pub struct Checker {
    state: Mutex<CheckerState>,
}

#[derive(Default)]
struct CheckerState {
    txns: BTreeMap<TxnId, Known>,
    violations: Vec<String>,
}

impl Checker {
    fn violation(&self, s: &mut CheckerState, what: String) {
        s.violations.push(what);
    }

    /// A write landed: `prev` (what the store held) became `next`.
    pub fn on_write(&self, prev: Option<&TxnRecord>, next: &TxnRecord, append: bool) {
        let mut s = lock(&self.state);
        let known = s.txns.entry(next.id).or_default().clone();
        let mut breaks = Vec::new();
        if let Some(prev) = prev {
            match (prev.state.decision(), next.state.decision()) {
                (Some(a), Some(b)) if a != b => {
                    breaks.push(format!("decision of {} changed from {a:?} to {b:?}", next.id))
                }
                (Some(a), None) => breaks.push(format!("decision {a:?} of {} was undone", next.id)),
                _ => {}
            }
            if prev.state.decision().is_some() {
                let counts: Vec<u64> = next.participants.iter().map(|p| p.command_count).collect();
                if append || next.participants.len() != prev.participants.len() || counts != known.frozen {
                    breaks.push(format!("{} took an append or enlist after its decision", next.id));
                }
            }
            if prev.state == TxnState::Active
                && next.state.decision() == Some(Decision::Confirm)
                && next.decided_ms >= next.deadline_ms
            {
                breaks.push(format!("{} was confirmed at or after its deadline", next.id));
            }
        }
        let k = s.txns.entry(next.id).or_default();
        if k.decision.is_none() && next.state.decision().is_some() {
            k.decision = next.state.decision();
            k.frozen = next.participants.iter().map(|p| p.command_count).collect();
        }
        k.participants = next.participants.iter().map(|p| (p.partial_id, p.service.clone())).collect();
        for b in breaks {
            self.violation(&mut s, b);
        }
    }

    /// A client was told an append is stored.
    pub fn on_append_ack(&self, txn: TxnId, partial: PartialId, receipt: AppendReceipt, cmds: Vec<(String, Vec<u8>)>) {
        let mut s = lock(&self.state);
        s.txns.entry(txn).or_default().acked.push((partial, receipt.first_sequence, cmds));
    }

    /// A client was told the decision.
    pub fn on_decision_ack(&self, txn: TxnId, decision: Decision) {
        let mut s = lock(&self.state);
        let k = s.txns.entry(txn).or_default();
        if let Some(told) = k.told
            && told != decision
        {
            let what = format!("clients of {txn} were told both {told:?} and {decision:?}");
            self.violation(&mut s, what);
            return;
        }
        k.told = Some(decision);
    }

    /// Records a break found elsewhere (participants, final checks).
    pub fn report(&self, what: String) {
        let mut s = lock(&self.state);
        self.violation(&mut s, what);
    }

    /// Every break so far.
    pub fn violations(&self) -> Vec<String> {
        lock(&self.state).violations.clone()
    }

    /// Final check against what the participants applied: every decided
    /// transaction's participants all received its decision; every
    /// acknowledged append was in its partial's commit, in order; and the
    /// decision clients were told is the one taken.
    pub fn check_outcomes(&self, net: &SimNet) {
        let txns = lock(&self.state).txns.clone();
        let applied = lock(&net.state).applied.clone();
        for (id, k) in txns {
            let Some(decision) = k.decision else { continue };
            if let Some(told) = k.told
                && told != decision
            {
                self.report(format!("{id}: clients were told {told:?} but {decision:?} was taken"));
            }
            for (partial, service) in &k.participants {
                match applied.get(partial) {
                    None => self.report(format!("{id}: {service} never received {decision:?} for {partial}")),
                    Some((d, _)) if *d != decision => self
                        .report(format!("{id}: {service} applied {d:?} for {partial}, the decision was {decision:?}")),
                    Some((_, commands)) => {
                        if decision == Decision::Confirm {
                            let seqs: Vec<u64> = commands.iter().map(|c| c.sequence).collect();
                            if seqs != (1..=commands.len() as u64).collect::<Vec<_>>() {
                                self.report(format!("{id}: commit of {partial} is not in order: {seqs:?}"));
                            }
                        }
                    }
                }
            }
            if decision == Decision::Confirm {
                for (partial, first, cmds) in &k.acked {
                    let Some((_, commands)) = applied.get(partial) else { continue };
                    for (i, (kind, payload)) in cmds.iter().enumerate() {
                        let seq = first + i as u64;
                        let found = commands.iter().find(|c| c.sequence == seq);
                        if found.is_none_or(|c| &c.kind != kind || &c.payload != payload) {
                            self.report(format!(
                                "{id}: acknowledged command #{seq} of {partial} missing from its commit"
                            ));
                        }
                    }
                }
            }
        }
    }
}

/// How a simulated participant service behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Applies and answers at once.
    Up,
    /// Unreachable (UNAVAILABLE).
    Down,
    /// Applies and answers, but takes most of the call's deadline.
    Slow,
    /// Applies, but answers after the call's deadline.
    Late,
    /// Applies, and its answer is delivered twice (the second call is a
    /// redelivery the participant must recognise).
    Twice,
    /// Refuses every call permanently.
    Refusing,
}

/// The simulated participant services.
pub struct SimNet {
    state: Mutex<NetState>,
    checker: Arc<Checker>,
}

struct NetState {
    modes: HashMap<String, Mode>,
    /// One line per call received, with raw ids (the world renames them).
    log: Vec<String>,
    /// Per partial: the outcome applied first, with its commands.
    applied: HashMap<PartialId, (Decision, Vec<CommandRecord>)>,
    rng: StdRng,
}

impl SimNet {
    /// Every service up.
    pub fn new(seed: u64, checker: Arc<Checker>) -> Self {
        let state = NetState {
            modes: HashMap::new(),
            log: Vec::new(),
            applied: HashMap::new(),
            rng: StdRng::seed_from_u64(seed),
        };
        SimNet { state: Mutex::new(state), checker }
    }
    /// Sets a service's behaviour.
    pub fn set(&self, service: &str, mode: Mode) {
        lock(&self.state).modes.insert(service.to_string(), mode);
    }
    /// Every service up again.
    pub fn heal(&self) {
        lock(&self.state).modes.clear();
    }
    /// Takes the call log lines written since the last take.
    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut lock(&self.state).log)
    }
    /// What a partial applied: the outcome and its commands' types.
    pub fn applied_types(&self, partial: PartialId) -> Option<(Decision, Vec<String>)> {
        lock(&self.state).applied.get(&partial).map(|(d, c)| (*d, c.iter().map(|c| c.kind.clone()).collect()))
    }

    /// The participant's side of a call: apply once, check it is the only
    /// outcome this partial ever gets.
    fn apply(&self, call: &Phase2Call) {
        let mut s = lock(&self.state);
        match s.applied.get(&call.partial) {
            None => {
                s.applied.insert(call.partial, (call.decision, call.commands.clone()));
            }
            Some((d, _)) if *d != call.decision => {
                let what = format!("{} of {} got both {d:?} and {:?}", call.partial, call.txn, call.decision);
                drop(s);
                self.checker.report(what);
            }
            Some(_) => {} // a redelivery: recognised, not applied again
        }
    }
}

#[async_trait::async_trait]
impl Transport for SimNet {
    async fn call(&self, call: Phase2Call, timeout: Duration) -> std::result::Result<(), CallError> {
        let (mode, latency) = {
            let mut s = lock(&self.state);
            let mode = s.modes.get(&call.service).copied().unwrap_or(Mode::Up);
            let verb = if call.decision == Decision::Confirm { "commit" } else { "rollback" };
            let answer = match mode {
                Mode::Up => "ok",
                Mode::Down => "UNAVAILABLE",
                Mode::Slow => "ok, slowly",
                Mode::Late => "applied, answer too late",
                Mode::Twice => "ok, delivered twice",
                Mode::Refusing => "refused (FAILED_PRECONDITION)",
            };
            let n = call.commands.len();
            let line = format!("{}: {verb} {} ({n} commands) -> {answer}", call.service, call.partial);
            s.log.push(line);
            (mode, s.rng.random_range(0..=5u64))
        };
        tokio::time::sleep(Duration::from_millis(latency)).await;
        match mode {
            Mode::Up => {
                self.apply(&call);
                Ok(())
            }
            Mode::Twice => {
                self.apply(&call);
                self.apply(&call);
                Ok(())
            }
            Mode::Down => Err(CallError::Transient(format!("{}: Unavailable: connection refused", call.service))),
            Mode::Slow => {
                tokio::time::sleep(timeout * 3 / 4).await;
                self.apply(&call);
                Ok(())
            }
            Mode::Late => {
                self.apply(&call);
                tokio::time::sleep(timeout).await;
                Err(CallError::Transient(format!("{}: no answer within {} ms", call.service, timeout.as_millis())))
            }
            Mode::Refusing => Err(CallError::Permanent(format!("{}: FailedPrecondition: refused", call.service))),
        }
    }
}

/// The store a node writes through: the shared in-memory store plus
/// latency, crash fencing and the checker.
pub struct SimStore {
    inner: Arc<MemStore>,
    alive: Arc<AtomicBool>,
    /// Whether writes may fail (the disk failing under a node).
    failing: Arc<AtomicBool>,
    /// Whether writes take time.
    latency: Arc<AtomicBool>,
    rng: Arc<Mutex<StdRng>>,
    checker: Arc<Checker>,
}

impl SimStore {
    /// A write's latency, then: refused if the node is dead; and with a
    /// small probability the write fails, which makes the node fail-stop
    /// as the real store does (it refuses everything until restarted).
    async fn before_write(&self) -> Result<()> {
        let (ms, fail) = {
            let mut rng = lock(&self.rng);
            (rng.random_range(0..=3u64), rng.random_bool(0.01))
        };
        if ms > 0 && self.latency.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if !self.alive.load(Ordering::SeqCst) {
            return Err(Error::Unavailable("the node crashed".into()));
        }
        if fail && self.failing.load(Ordering::SeqCst) {
            self.alive.store(false, Ordering::SeqCst);
            return Err(Error::Unavailable("the store failed to write; restart the node".into()));
        }
        Ok(())
    }

    /// Writes through `inner` and shows the change to the checker. Nothing
    /// yields between the read of the previous record and the write (the
    /// in-memory store never waits, and the runtime has one thread), so the
    /// pair is what the store saw.
    async fn checked(
        &self,
        next: &TxnRecord,
        append: bool,
        write: impl std::future::Future<Output = Result<()>>,
    ) -> Result<()> {
        self.before_write().await?;
        let prev = self.inner.get_txn(next.id).await?;
        write.await?;
        self.checker.on_write(prev.as_ref(), next, append);
        Ok(())
    }
}

#[async_trait::async_trait]
impl Store for SimStore {
    async fn create_txn(&self, txn: &TxnRecord) -> Result<()> {
        self.checked(txn, false, self.inner.create_txn(txn)).await
    }
    async fn update_txn(&self, txn: &TxnRecord, enlisted: Option<PartialId>) -> Result<()> {
        self.checked(txn, false, self.inner.update_txn(txn, enlisted)).await
    }
    async fn append(&self, txn: &TxnRecord, batch: AppendBatch<'_>) -> Result<()> {
        self.checked(txn, true, self.inner.append(txn, batch)).await
    }
    async fn delete_txn(&self, txn: &TxnRecord) -> Result<()> {
        self.before_write().await?;
        self.inner.delete_txn(txn).await
    }
    async fn get_txn(&self, id: TxnId) -> Result<Option<TxnRecord>> {
        self.inner.get_txn(id).await
    }
    async fn find_partial(&self, partial: PartialId) -> Result<Option<TxnId>> {
        self.inner.find_partial(partial).await
    }
    async fn find_receipt(&self, partial: PartialId, key: &str) -> Result<Option<AppendReceipt>> {
        self.inner.find_receipt(partial, key).await
    }
    async fn read_topic(&self, partial: PartialId, from: u64, limit: usize) -> Result<Vec<CommandRecord>> {
        self.inner.read_topic(partial, from, limit).await
    }
    async fn unfinished(&self, after: Option<TxnId>, limit: usize) -> Result<Vec<TxnId>> {
        self.inner.unfinished(after, limit).await
    }
    async fn due_deadlines(&self, now_ms: i64, limit: usize) -> Result<(Vec<TxnId>, Option<i64>)> {
        self.inner.due_deadlines(now_ms, limit).await
    }
    async fn due_deliveries(&self, until_ms: i64, limit: usize) -> Result<Vec<TxnId>> {
        self.inner.due_deliveries(until_ms, limit).await
    }
    async fn list(&self, query: &ListQuery) -> Result<ListPage> {
        self.inner.list(query).await
    }
    async fn count_unfinished(&self) -> Result<Vec<(TxnState, u64)>> {
        self.inner.count_unfinished().await
    }
    async fn collectable(&self, until: i64, limit: usize) -> Result<(Vec<TxnRecord>, Option<i64>)> {
        self.inner.collectable(until, limit).await
    }
    async fn put_endpoint(&self, r: &Registration) -> Result<()> {
        self.inner.put_endpoint(r).await
    }
    async fn remove_endpoint(&self, service: &str, endpoint: &str) -> Result<bool> {
        self.inner.remove_endpoint(service, endpoint).await
    }
    async fn endpoints(&self) -> Result<Vec<Registration>> {
        self.inner.endpoints().await
    }
    async fn remove_expired_endpoints(&self, until_ms: i64) -> Result<usize> {
        self.inner.remove_expired_endpoints(until_ms).await
    }
}

/// One coordinator: the real engine, delivery driver and sweeper.
pub struct Node {
    /// The engine clients call.
    pub engine: Arc<Engine>,
    /// The phase-2 driver.
    pub delivery: Arc<Delivery>,
    /// What recovery found at start.
    pub recovered: tcc_coordinator::engine::Recovered,
    alive: Arc<AtomicBool>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// False once the node crashed or its store failed (fail-stop).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Drops the node as kill -9 would: nothing it still has in flight
    /// reaches the store.
    pub fn crash(self) {
        self.alive.store(false, Ordering::SeqCst);
        self.shutdown.cancel();
        for t in self.tasks {
            t.abort();
        }
    }
}

/// The limits every simulated node runs with.
pub fn limits() -> Limits {
    Limits {
        max_participants: 4,
        max_commands_per_append: 8,
        max_command_bytes: 64,
        max_topic_bytes: 4096,
        default_timeout_ms: 1_000,
        min_timeout_ms: 50,
        max_timeout_ms: 60_000,
    }
}

/// The delivery policy of every simulated node.
pub fn policy() -> DeliveryPolicy {
    DeliveryPolicy { call_timeout_ms: 200, retry_initial_ms: 20, retry_max_ms: 2_000, retry_max_attempts: 0 }
}

/// Retention of finished transactions in the simulation.
pub const RETENTION: Duration = Duration::from_secs(3_600);

/// Everything a simulation run shares: store, clock, entropy, network,
/// checker and trace.
pub struct World {
    /// The simulated wall clock.
    pub clock: Arc<SimClock>,
    /// The durable store (survives crashes).
    pub store: Arc<MemStore>,
    /// The participant services.
    pub net: Arc<SimNet>,
    /// The invariants.
    pub checker: Arc<Checker>,
    /// Whether store writes may fail (off while settling and in scripts).
    pub failing: Arc<AtomicBool>,
    /// Whether store writes take a random 0-3 ms (off in scripts, so that
    /// time moves only on `tick`).
    pub latency: Arc<AtomicBool>,
    entropy: Arc<SeededEntropy>,
    store_rng: Arc<Mutex<StdRng>>,
    names: Mutex<Names>,
    trace: Mutex<String>,
}

impl World {
    /// A world for `seed`. Call inside a paused tokio runtime.
    pub fn new(seed: u64) -> Arc<Self> {
        let checker = Arc::new(Checker::default());
        Arc::new(World {
            clock: Arc::new(SimClock::new()),
            store: Arc::new(MemStore::new()),
            net: Arc::new(SimNet::new(seed ^ 0x006e_6574, checker.clone())),
            checker,
            failing: Arc::new(AtomicBool::new(false)),
            latency: Arc::new(AtomicBool::new(true)),
            entropy: Arc::new(SeededEntropy::new(seed)),
            store_rng: Arc::new(Mutex::new(StdRng::seed_from_u64(seed ^ 0x7374_6f72))),
            names: Mutex::new(Names::default()),
            trace: Mutex::new(String::new()),
        })
    }

    /// Starts a node on the shared store, recovering what it holds.
    pub async fn start_node(&self) -> Result<Node> {
        let alive = Arc::new(AtomicBool::new(true));
        let store = Arc::new(SimStore {
            inner: self.store.clone(),
            alive: alive.clone(),
            failing: self.failing.clone(),
            latency: self.latency.clone(),
            rng: self.store_rng.clone(),
            checker: self.checker.clone(),
        });
        let (engine, decided) = Engine::new(store, self.clock.clone(), self.entropy.clone(), limits(), RETENTION);
        let shutdown = CancellationToken::new();
        let delivery =
            Delivery::new(engine.clone(), self.net.clone(), self.entropy.clone(), policy(), shutdown.clone());
        let recovered = engine.recover().await?;
        let tasks = vec![
            tokio::spawn(delivery.clone().run(decided)),
            tokio::spawn(sweeper::run(engine.clone(), shutdown.clone())),
        ];
        Ok(Node { engine, delivery, recovered, alive, shutdown, tasks })
    }

    /// Appends a line to the trace, stamped with simulated time.
    pub fn log(&self, line: impl AsRef<str>) {
        let t = self.clock.elapsed_ms();
        static LIVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *LIVE.get_or_init(|| std::env::var_os("TCC_SIM_LIVE").is_some()) {
            eprintln!("{t:>8} {}", line.as_ref());
        }
        let mut trace = lock(&self.trace);
        let _ = writeln!(trace, "{t:>8} {}", line.as_ref());
    }

    /// The trace so far.
    pub fn trace(&self) -> String {
        lock(&self.trace).clone()
    }

    /// Short names for ids.
    pub fn names(&self) -> MutexGuard<'_, Names> {
        lock(&self.names)
    }

    /// Describes an error in a stable way (its gRPC-like kind and message,
    /// with ids replaced by names).
    pub fn describe(&self, e: &Error) -> String {
        let kind = match e {
            Error::InvalidArgument(_) => "INVALID_ARGUMENT",
            Error::NotFound(_) => "NOT_FOUND",
            Error::IllegalTransition { .. } => "FAILED_PRECONDITION",
            Error::LimitExceeded(_) => "RESOURCE_EXHAUSTED",
            Error::Conflict { .. } => "ABORTED",
            Error::Unavailable(_) | Error::Fenced(_) => "UNAVAILABLE",
            Error::Corrupt { .. } => "DATA_LOSS",
            Error::Unauthenticated(_) => "UNAUTHENTICATED",
            Error::PermissionDenied(_) => "PERMISSION_DENIED",
            Error::Storage(_) => "INTERNAL",
        };
        format!("{kind}: {}", self.rename(&e.to_string()))
    }

    /// Replaces every id the world has named in `text` by its name.
    pub fn rename(&self, text: &str) -> String {
        let names = self.names();
        let mut out = text.to_string();
        for (id, n) in &names.txns {
            out = out.replace(&id.to_string(), n);
        }
        for (id, n) in &names.partials {
            out = out.replace(&id.to_string(), n);
        }
        out
    }

    /// A one-line summary of a record: state, participants and their
    /// phase-2 status.
    pub fn summary(&self, t: &TxnRecord) -> String {
        let mut names = self.names();
        let name = names.txn(t.id);
        let parts: Vec<String> = t
            .participants
            .iter()
            .map(|p| {
                let status = format!("{:?}", p.status).to_lowercase();
                format!("{}={}:{}:{}cmd", p.service, names.partial(p.partial_id), status, p.command_count)
            })
            .collect();
        let reason = if t.reason.is_empty() { String::new() } else { format!(" ({})", t.reason) };
        format!("{name} {}{reason} [{}]", t.state, parts.join(" "))
    }
}

/// A current-thread runtime with paused time: the simulation's scheduler.
pub fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build() {
        Ok(rt) => rt,
        Err(e) => panic!("cannot build the simulation runtime: {e}"),
    }
}
