//! Scenario scripts: the protocol's main cases as small text files in
//! `tests/scripts/`, each command followed by what the coordinator answered
//! (goldenscript format, as in toydb). They run on the simulation world
//! (`sim/mod.rs`): the real engine, delivery and sweeper, a simulated
//! clock that only moves on `tick`, and simulated participants.
//!
//! Commands:
//!
//! | command | does |
//! |---|---|
//! | `begin a b [timeout=MS]` | Begin; names the transaction T1, T2, ... and partials P1, P2, ... |
//! | `append T1 a TYPE... [key=K]` | Append commands of those types to T1's partial of service a |
//! | `enlist T1 c` | Enlist service c |
//! | `confirm T1`, `cancel T1 [reason=R]` | The decisions |
//! | `get T1` | The record: state, participants (partial:status:commands), attempts and last errors |
//! | `tick MS` | Lets MS of time pass; prints the phase-2 calls made meanwhile |
//! | `participant b up\|down\|slow\|late\|twice\|refusing` | How service b answers phase-2 calls |
//! | `applied T1` | What each participant applied (commit with its commands, rollback, nothing) |
//! | `crash`, `recover` | kill -9 the coordinator; start a new one on the same store |
//! | `clock MS` | Steps the wall clock by MS (negative: back) |
//! | `retry T1` | Admin retry of a FAILED transaction |
//! | `list [state=S]` | Admin listing |
//!
//! Regenerate the expected output after a deliberate change with
//! `UPDATE_GOLDENFILES=1 cargo test -p tcc-coordinator --test scripts`, and
//! read the diff.

mod sim;

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use goldenscript::{Command, Runner};
use sim::{Mode, Node, World};
use tcc_coordinator::engine::topics::Appender;
use tcc_coordinator::engine::validate::NewCommand;
use tcc_coordinator::model::{Decision, TxnId, TxnRecord, TxnState};

type Res = Result<String, Box<dyn StdError>>;

struct ScriptRunner {
    rt: tokio::runtime::Runtime,
    world: Arc<World>,
    node: Option<Node>,
    txns: HashMap<String, TxnId>,
}

impl ScriptRunner {
    fn new() -> Self {
        let rt = sim::runtime();
        let (world, node) = rt.block_on(async {
            let world = World::new(42);
            world.latency.store(false, std::sync::atomic::Ordering::SeqCst);
            let node = world.start_node().await;
            (world, node)
        });
        let node = match node {
            Ok(n) => Some(n),
            Err(e) => panic!("cannot start the coordinator: {e}"),
        };
        ScriptRunner { rt, world, node, txns: HashMap::new() }
    }

    fn txn(&self, name: &str) -> Result<TxnId, Box<dyn StdError>> {
        self.txns.get(name).copied().ok_or_else(|| format!("unknown transaction {name}").into())
    }

    fn node(&self) -> Result<&Node, Box<dyn StdError>> {
        self.node.as_ref().ok_or_else(|| "the coordinator is down (recover first)".into())
    }

    fn describe(&self, t: &TxnRecord) -> String {
        let mut out = self.world.summary(t);
        for p in &t.participants {
            if p.attempts > 0 || p.last_error.is_some() {
                let err = p.last_error.as_deref().map(|e| format!(" last_error=\"{}\"", self.world.rename(e)));
                let _ = write!(out, "\n  {}: attempts={}{}", p.service, p.attempts, err.unwrap_or_default());
            }
        }
        out
    }

    /// The phase-2 calls made since the last command.
    fn calls(&self) -> String {
        let mut out = String::new();
        for line in self.world.net.take_log() {
            let _ = writeln!(out, "{}", self.world.rename(&line));
        }
        out
    }

    fn result(&self, r: tcc_coordinator::error::Result<TxnRecord>) -> Res {
        match r {
            Ok(t) => Ok(self.describe(&t)),
            Err(e) => Err(self.world.describe(&e).into()),
        }
    }
}

impl Runner for ScriptRunner {
    fn run(&mut self, command: &Command) -> Res {
        let mut args = command.consume_args();
        let out = match command.name.as_str() {
            "begin" => {
                let timeout: u64 = args.lookup_parse("timeout")?.unwrap_or(0);
                let services: Vec<String> = args.rest_pos().iter().map(|a| a.value.clone()).collect();
                args.reject_rest()?;
                let engine = self.node()?.engine.clone();
                let t = self
                    .rt
                    .block_on(engine.begin(services, timeout, String::new(), String::new()))
                    .map_err(|e| self.world.describe(&e))?;
                let name = self.world.names().txn(t.id);
                self.txns.insert(name, t.id);
                self.describe(&t)
            }
            "append" => {
                let id = self.txn(&args.next_pos().ok_or("append needs a transaction")?.value)?;
                let service = args.next_pos().ok_or("append needs a service")?.value.clone();
                let key = args.lookup("key").map(|a| a.value.clone()).unwrap_or_default();
                let commands: Vec<NewCommand> = args
                    .rest_pos()
                    .iter()
                    .map(|a| NewCommand { kind: a.value.clone(), key: String::new(), payload: a.value.clone().into() })
                    .collect();
                args.reject_rest()?;
                let engine = self.node()?.engine.clone();
                let t = self.rt.block_on(engine.get(id)).map_err(|e| self.world.describe(&e))?;
                let partial =
                    t.participants.iter().find(|p| p.service == service).ok_or("no such participant")?.partial_id;
                let (r, dup) = self
                    .rt
                    .block_on(engine.append(partial, Appender::Declared(&service), commands, &key))
                    .map_err(|e| self.world.describe(&e))?;
                let name = self.world.names().partial(partial);
                let dup = if dup { " (duplicate)" } else { "" };
                format!("{name} #{}..#{}{dup}", r.first_sequence, r.last_sequence)
            }
            "enlist" => {
                let id = self.txn(&args.next_pos().ok_or("enlist needs a transaction")?.value)?;
                let service = args.next_pos().ok_or("enlist needs a service")?.value.clone();
                args.reject_rest()?;
                let engine = self.node()?.engine.clone();
                let p = self.rt.block_on(engine.enlist(id, service)).map_err(|e| self.world.describe(&e))?;
                format!("{}={}", p.service, self.world.names().partial(p.partial_id))
            }
            "confirm" | "cancel" | "retry" | "get" => {
                let id = self.txn(&args.next_pos().ok_or("which transaction?")?.value)?;
                let reason = args.lookup("reason").map(|a| a.value.clone()).unwrap_or_default();
                args.reject_rest()?;
                let engine = self.node()?.engine.clone();
                let r = self.rt.block_on(async {
                    match command.name.as_str() {
                        "confirm" => engine.confirm(id).await,
                        "cancel" => engine.cancel(id, reason).await,
                        "retry" => engine.retry(id, "").await,
                        _ => engine.get(id).await,
                    }
                });
                self.result(r)?
            }
            "tick" => {
                let ms: u64 = args.next_pos().ok_or("tick needs milliseconds")?.parse()?;
                args.reject_rest()?;
                self.rt.block_on(async { tokio::time::sleep(Duration::from_millis(ms)).await });
                self.calls()
            }
            "participant" => {
                let service = args.next_pos().ok_or("which service?")?.value.clone();
                let mode = match args.next_pos().ok_or("which mode?")?.value.as_str() {
                    "up" => Mode::Up,
                    "down" => Mode::Down,
                    "slow" => Mode::Slow,
                    "late" => Mode::Late,
                    "twice" => Mode::Twice,
                    "refusing" => Mode::Refusing,
                    other => return Err(format!("unknown mode {other}").into()),
                };
                args.reject_rest()?;
                self.world.net.set(&service, mode);
                String::new()
            }
            "applied" => {
                let id = self.txn(&args.next_pos().ok_or("which transaction?")?.value)?;
                args.reject_rest()?;
                let t = self.rt.block_on(self.world_store_get(id))?;
                let mut out = String::new();
                for p in &t.participants {
                    let name = self.world.names().partial(p.partial_id);
                    let what = match self.world.net.applied_types(p.partial_id) {
                        Some((Decision::Confirm, types)) => format!("commit [{}]", types.join(", ")),
                        Some((Decision::Cancel, _)) => "rollback".to_string(),
                        None => "nothing".to_string(),
                    };
                    let _ = writeln!(out, "{}={name}: {what}", p.service);
                }
                out
            }
            "crash" => {
                args.reject_rest()?;
                let node = self.node.take().ok_or("already down")?;
                node.crash();
                String::new()
            }
            "recover" => {
                args.reject_rest()?;
                if self.node.is_some() {
                    return Err("the coordinator is running (crash first)".into());
                }
                let world = self.world.clone();
                let node = self.rt.block_on(world.start_node()).map_err(|e| self.world.describe(&e))?;
                let r = node.recovered;
                self.node = Some(node);
                format!("recovered: {} active, {} delivering, {} failed", r.active, r.delivering, r.failed)
            }
            "clock" => {
                let ms: i64 = args.next_pos().ok_or("clock needs milliseconds")?.parse()?;
                args.reject_rest()?;
                self.world.clock.step(ms);
                String::new()
            }
            "list" => {
                let state = args.lookup("state").map(|a| a.value.clone());
                args.reject_rest()?;
                let states: Vec<TxnState> = match state {
                    None => vec![],
                    Some(s) => vec![
                        TxnState::ALL.into_iter().find(|x| x.to_string() == s).ok_or(format!("unknown state {s}"))?,
                    ],
                };
                let engine = self.node()?.engine.clone();
                let page = self.rt.block_on(engine.list(&states, 0, 100, None)).map_err(|e| self.world.describe(&e))?;
                let lines: Vec<String> = page.transactions.iter().map(|t| self.world.summary(t)).collect();
                if lines.is_empty() { "(none)".to_string() } else { lines.join("\n") }
            }
            other => return Err(format!("unknown command {other}").into()),
        };
        Ok(out)
    }
}

impl ScriptRunner {
    async fn world_store_get(&self, id: TxnId) -> Result<TxnRecord, Box<dyn StdError>> {
        use tcc_coordinator::store::Store as _;
        Ok(self.world.store.get_txn(id).await?.ok_or("garbage-collected")?)
    }
}

fn run(name: &str) {
    let mut runner = ScriptRunner::new();
    if let Err(e) = goldenscript::run(&mut runner, format!("tests/scripts/{name}")) {
        panic!("script {name}: {e}");
    }
    if let Some(node) = runner.node.take() {
        node.crash();
    }
    let violations = runner.world.checker.violations();
    assert!(violations.is_empty(), "script {name} broke an invariant: {violations:#?}");
}

#[test]
fn confirm() {
    run("confirm");
}

#[test]
fn cancel_and_deadline() {
    run("cancel_and_deadline");
}

#[test]
fn participant_outage() {
    run("participant_outage");
}

#[test]
fn crash_and_clock_step() {
    run("crash_and_clock_step");
}

#[test]
fn retries_and_races() {
    run("retries_and_races");
}
