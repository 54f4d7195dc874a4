//! Deterministic simulation: the real engine, delivery driver and sweeper
//! on the in-memory store, with a simulated clock, seeded randomness and
//! simulated participants (see `sim/mod.rs`), driven by random workloads
//! with faults:
//!
//! * clients that begin, append (with retried idempotency keys), enlist,
//!   confirm or cancel (sometimes racing each other, on different nodes),
//!   or let the deadline pass;
//! * one or two coordinator nodes on the store, crashed (kill -9) and
//!   recovered at random moments, mid-write included;
//! * participants down, slow, answering after their deadline, answering
//!   twice, or refusing;
//! * wall-clock steps, back and forward, by up to two hours.
//!
//! The checker looks at every write, call and acknowledgement; at the end
//! every participant is healed, FAILED transactions are retried by an
//! "operator", and then every decided transaction must be finished, with
//! every participant having applied exactly the decision, every
//! acknowledged append in its commit, nothing left in memory, and (after
//! the retention) nothing left in the store.
//!
//! `cargo test` runs 1,000 seeds; `TCC_SIM_SEEDS=N` runs N (from
//! `TCC_SIM_FIRST`, default 0); `TCC_SIM_SEED=S` runs one seed and prints
//! its trace. A failure prints the command that replays it. The same seed
//! always gives the same trace (a test below checks that).

mod sim;

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sim::{Mode, Node, World, lock};
use tcc_coordinator::engine::Engine;
use tcc_coordinator::engine::topics::Appender;
use tcc_coordinator::engine::validate::NewCommand;
use tcc_coordinator::error::Error;
use tcc_coordinator::model::{Decision, TxnState};
use tcc_coordinator::store::Store as _;

const SERVICES: [&str; 3] = ["a", "b", "c"];

/// The nodes of a run; `None` while a node is down.
type Nodes = Arc<Mutex<Vec<Option<Node>>>>;

/// Picks a live node's engine, waiting (bounded) while all are down.
async fn pick(nodes: &Nodes, rng: &mut StdRng) -> Option<(usize, Arc<Engine>)> {
    for _ in 0..200 {
        let live: Vec<(usize, Arc<Engine>)> = lock(nodes)
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.as_ref().filter(|n| n.is_alive()).map(|n| (i, n.engine.clone())))
            .collect();
        if !live.is_empty() {
            let k = rng.random_range(0..live.len());
            return live.into_iter().nth(k);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// An error the protocol allows a client to see; anything else breaks an
/// invariant (INTERNAL, DATA_LOSS).
fn expected(e: &Error) -> bool {
    !matches!(e, Error::Storage(_) | Error::Corrupt { .. })
}

/// One client: `n` transactions, each a random mix of operations.
async fn client(world: Arc<World>, nodes: Nodes, c: usize, n: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..n {
        let Some((node, engine)) = pick(&nodes, &mut rng).await else { return };
        let k = rng.random_range(1..=SERVICES.len());
        let services: Vec<String> = SERVICES[..k].iter().map(|s| s.to_string()).collect();
        let timeout = rng.random_range(50..=3_000u64);
        let txn = match engine.begin(services.clone(), timeout, String::new(), String::new()).await {
            Ok(t) => t,
            Err(e) => {
                world.log(format!("c{c} n{node} begin -> {}", world.describe(&e)));
                check(&world, &e);
                continue;
            }
        };
        world.log(format!("c{c} n{node} begin {} timeout={timeout} -> {}", services.join(","), world.summary(&txn)));
        let id = txn.id;
        let mut partials: Vec<_> = txn.participants.iter().map(|p| (p.service.clone(), p.partial_id)).collect();
        if rng.random_bool(0.2) {
            let Some((node, engine)) = pick(&nodes, &mut rng).await else { return };
            let tname = world.names().txn(id);
            match engine.enlist(id, "d".into()).await {
                Ok(p) => {
                    let name = world.names().partial(p.partial_id);
                    world.log(format!("c{c} n{node} enlist {tname} d -> {name}"));
                    partials.push(("d".into(), p.partial_id));
                }
                Err(e) => {
                    world.log(format!("c{c} n{node} enlist {tname} d -> {}", world.describe(&e)));
                    check(&world, &e);
                }
            }
        }
        for (j, (service, partial)) in partials.iter().enumerate() {
            if !rng.random_bool(0.8) {
                continue;
            }
            let count = rng.random_range(1..=3usize);
            let cmds: Vec<(String, Vec<u8>)> = (0..count)
                .map(|x| (format!("{service}.Cmd{x}"), vec![rng.random::<u8>(); rng.random_range(0..8)]))
                .collect();
            let key = if rng.random_bool(0.5) { format!("c{c}-{i}-{j}") } else { String::new() };
            let tries = if !key.is_empty() && rng.random_bool(0.3) { 2 } else { 1 };
            let mut first_receipt = None;
            for _ in 0..tries {
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..150))).await;
                let Some((node, engine)) = pick(&nodes, &mut rng).await else { return };
                let batch = cmds
                    .iter()
                    .map(|(k, p)| NewCommand { kind: k.clone(), key: String::new(), payload: p.clone() })
                    .collect();
                let pname = world.names().partial(*partial);
                match engine.append(*partial, Appender::Declared(service), batch, &key).await {
                    Ok((r, dup)) => {
                        world.log(format!(
                            "c{c} n{node} append {pname} x{count} key={key:?} -> #{}..#{}{}",
                            r.first_sequence,
                            r.last_sequence,
                            if dup { " (duplicate)" } else { "" }
                        ));
                        match first_receipt {
                            Some(first) if first != r => {
                                world.checker.report(format!("{pname}: a retried append got {r:?}, first {first:?}"))
                            }
                            _ => first_receipt = Some(r),
                        }
                        if !dup {
                            world.checker.on_append_ack(id, *partial, r, cmds.clone());
                        }
                    }
                    Err(e) => {
                        world.log(format!("c{c} n{node} append {pname} -> {}", world.describe(&e)));
                        check(&world, &e);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        let roll = rng.random_range(0..100);
        let race = rng.random_bool(0.4);
        let mut decisions = Vec::new();
        if roll < 60 {
            decisions.push(Decision::Confirm);
        } else if roll < 85 {
            decisions.push(Decision::Cancel);
        }
        if race {
            decisions.push(if rng.random_bool(0.5) { Decision::Confirm } else { Decision::Cancel });
        }
        let mut racers = Vec::new();
        for d in decisions {
            let Some((node, engine)) = pick(&nodes, &mut rng).await else { return };
            let world = world.clone();
            racers.push(tokio::spawn(async move {
                let r = match d {
                    Decision::Confirm => engine.confirm(id).await,
                    Decision::Cancel => engine.cancel(id, format!("c{c} cancels")).await,
                };
                let name = world.names().txn(id);
                match r {
                    Ok(t) => {
                        world.log(format!("c{c} n{node} {d:?} {name} -> {}", t.state));
                        if t.state.decision() != Some(d) {
                            world.checker.report(format!("{name}: {d:?} answered OK with state {}", t.state));
                        }
                        world.checker.on_decision_ack(id, d);
                    }
                    Err(e) => {
                        world.log(format!("c{c} n{node} {d:?} {name} -> {}", world.describe(&e)));
                        check(&world, &e);
                    }
                }
            }));
        }
        for r in racers {
            let _ = r.await;
        }
    }
}

fn check(world: &World, e: &Error) {
    if !expected(e) {
        world.checker.report(format!("unexpected error: {}", world.describe(e)));
    }
}

/// Faults at random moments until `stop` is set.
async fn faults(world: Arc<World>, nodes: Nodes, seed: u64, stop: Arc<std::sync::atomic::AtomicBool>) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..300))).await;
        // A node whose store failed stopped (fail-stop): restart it.
        let count = lock(&nodes).len();
        for i in 0..count {
            let dead = lock(&nodes)[i].as_ref().is_some_and(|n| !n.is_alive());
            let taken = if dead { lock(&nodes)[i].take() } else { None };
            if let Some(node) = taken {
                node.crash();
                match world.start_node().await {
                    Ok(n) => {
                        lock(&nodes)[i] = Some(n);
                        world.log(format!("fault: n{i} restarted after its store failed"));
                    }
                    Err(e) => world.checker.report(format!("recovery failed: {e}")),
                }
            }
        }
        match rng.random_range(0..100) {
            0..30 => {
                let i = rng.random_range(0..lock(&nodes).len());
                let Some(node) = lock(&nodes)[i].take() else { continue };
                node.crash();
                world.log(format!("fault: crash n{i}"));
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..500))).await;
                match world.start_node().await {
                    Ok(n) => {
                        lock(&nodes)[i] = Some(n);
                        world.log(format!("fault: n{i} recovered"));
                    }
                    Err(e) => world.checker.report(format!("recovery failed: {e}")),
                }
            }
            30..70 => {
                let service = SERVICES[rng.random_range(0..SERVICES.len())];
                let mode = match rng.random_range(0..12) {
                    0..3 => Mode::Down,
                    3..5 => Mode::Late,
                    5..7 => Mode::Twice,
                    7..9 => Mode::Slow,
                    9 => Mode::Refusing,
                    _ => Mode::Up,
                };
                world.net.set(service, mode);
                world.log(format!("fault: {service} {mode:?}"));
            }
            70..80 => {
                world.net.heal();
                world.log("fault: participants healed");
            }
            80..88 => {
                let hours = if rng.random_bool(0.5) { -2 } else { 2 };
                let ms = hours * 3_600_000 * rng.random_range(1..=100) / 100;
                world.clock.step(ms);
                world.log(format!("fault: wall clock stepped {ms} ms"));
            }
            _ => {
                let ms = rng.random_range(-3_000..=3_000);
                world.clock.step(ms);
                world.log(format!("fault: wall clock stepped {ms} ms"));
            }
        }
    }
}

/// Heals everything and lets the system settle: every decided transaction
/// must finish. An operator retries FAILED ones (participants refused
/// while the fault lasted).
async fn settle(world: &World, nodes: &Nodes) {
    world.net.heal();
    world.failing.store(false, std::sync::atomic::Ordering::SeqCst);
    let count = lock(nodes).len();
    for i in 0..count {
        let dead = lock(nodes)[i].take_if(|n| !n.is_alive());
        if let Some(node) = dead {
            node.crash();
        }
        if lock(nodes)[i].is_none() {
            match world.start_node().await {
                Ok(n) => lock(nodes)[i] = Some(n),
                Err(e) => world.checker.report(format!("recovery failed: {e}")),
            }
        }
    }
    // Far past every deadline, however the clock was stepped.
    let behind = (-world.clock.offset_ms()).max(0);
    world.clock.step(behind + 4 * 3_600_000);
    world.log("settle: healed; wall clock 4 h ahead");
    let engine = match lock(nodes).iter().flatten().next() {
        Some(n) => n.engine.clone(),
        None => return,
    };
    for round in 0..5 {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let failed = engine.list(&[TxnState::FailedToConfirm, TxnState::FailedToCancel], 0, 1000, None).await;
        if let Err(e) = &failed {
            world.log(format!("operator: cannot list: {}", world.describe(e)));
        }
        let failed = failed.map(|p| p.transactions).unwrap_or_default();
        let unfinished = world.store.unfinished(None, 1).await.map(|u| u.len()).unwrap_or(0);
        world.log(format!("settle: round {round}: {} failed, unfinished: {}", failed.len(), unfinished > 0));
        if failed.is_empty() && unfinished == 0 {
            break;
        }
        for t in failed {
            let name = world.names().txn(t.id);
            match engine.retry(t.id, "").await {
                Ok(t) => world.log(format!("operator: retry {name} (round {round}) -> {}", t.state)),
                Err(e) => world.log(format!("operator: retry {name} -> {}", world.describe(&e))),
            }
        }
    }
}

/// Final invariants: everything finished and delivered, nothing held in
/// memory, and after the retention nothing left in the store.
async fn check_end(world: &World, nodes: &Nodes) {
    let unfinished = world.store.unfinished(None, 100).await.unwrap_or_default();
    for id in unfinished {
        if let Ok(Some(t)) = world.store.get_txn(id).await {
            let s = world.summary(&t);
            world.checker.report(format!("not finished after healing: {s}"));
        }
    }
    world.checker.check_outcomes(&world.net);
    let held: Vec<(usize, Arc<Engine>, Arc<tcc_coordinator::delivery::Delivery>)> = lock(nodes)
        .iter()
        .enumerate()
        .filter_map(|(i, n)| n.as_ref().map(|n| (i, n.engine.clone(), n.delivery.clone())))
        .collect();
    for (i, engine, delivery) in held {
        if engine.cached() != 0 {
            world.checker.report(format!("n{i} still holds {} transactions in memory", engine.cached()));
        }
        for id in delivery.running() {
            let state = world.store.get_txn(id).await.ok().flatten().map(|t| world.summary(&t));
            world.checker.report(format!("n{i} still runs a delivery driver for {state:?}"));
        }
    }
    world.clock.step(2 * sim::RETENTION.as_millis() as i64);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let left = world.store.list(&Default::default()).await.map(|p| p.transactions.len()).unwrap_or(0);
    if left != 0 {
        world.checker.report(format!("{left} transactions left in the store after the retention"));
    }
}

/// Runs one seed; returns its trace and the invariant breaks.
fn run_seed(seed: u64) -> (String, Vec<String>) {
    let rt = sim::runtime();
    rt.block_on(async move {
        let world = World::new(seed);
        let mut rng = StdRng::seed_from_u64(seed);
        let node_count = if rng.random_bool(0.5) { 2 } else { 1 };
        world.failing.store(true, std::sync::atomic::Ordering::SeqCst);
        let nodes: Nodes = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..node_count {
            match world.start_node().await {
                Ok(n) => lock(&nodes).push(Some(n)),
                Err(e) => world.checker.report(format!("start failed: {e}")),
            }
        }
        world.log(format!("seed {seed}: {node_count} node(s)"));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let injector = tokio::spawn(faults(world.clone(), nodes.clone(), rng.random(), stop.clone()));
        let clients: Vec<_> = (0..rng.random_range(2..=4))
            .map(|c| {
                let n = rng.random_range(1..=3);
                tokio::spawn(client(world.clone(), nodes.clone(), c, n, rng.random()))
            })
            .collect();
        for c in clients {
            if let Err(e) = c.await {
                world.checker.report(format!("a client panicked: {e}"));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = injector.await;
        settle(&world, &nodes).await;
        check_end(&world, &nodes).await;
        for n in lock(&nodes).drain(..).flatten() {
            n.crash();
        }
        let violations = world.checker.violations().iter().map(|v| world.rename(v)).collect();
        (world.trace(), violations)
    })
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Prints past the test harness's capture (the summary line is for humans
/// reading a normal `cargo test` run).
fn say(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

fn replay(seed: u64) -> String {
    format!("TCC_SIM_SEED={seed} cargo test -p tcc-coordinator --test simulation -- --nocapture")
}

#[test]
fn simulated_seeds_keep_every_invariant() {
    if let Some(seed) = env_u64("TCC_SIM_SEED") {
        let (trace, violations) = run_seed(seed);
        say(&trace);
        assert!(violations.is_empty(), "seed {seed}: {violations:#?}");
        say(&format!("simulated 1 seeds (seed {seed})"));
        return;
    }
    let seeds = env_u64("TCC_SIM_SEEDS").unwrap_or(1_000);
    let first = env_u64("TCC_SIM_FIRST").unwrap_or(0);
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8) as u64;
    let failures: Vec<(u64, String, Vec<String>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut failed = Vec::new();
                    let mut seed = first + t;
                    while seed < first + seeds {
                        let (trace, violations) = run_seed(seed);
                        if !violations.is_empty() {
                            failed.push((seed, trace, violations));
                            break;
                        }
                        seed += threads;
                    }
                    failed
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
    });
    if let Some((seed, trace, violations)) = failures.iter().min_by_key(|f| f.0) {
        let tail: Vec<&str> = trace.lines().rev().take(80).collect::<Vec<_>>().into_iter().rev().collect();
        panic!(
            "seed {seed} broke an invariant:\n{violations:#?}\nlast trace lines:\n{}\nreplay: {}",
            tail.join("\n"),
            replay(*seed)
        );
    }
    say(&format!("simulated {seeds} seeds in {:.1} s", started.elapsed().as_secs_f64()));
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    for seed in [7, 1234, 99_999] {
        let (a, _) = run_seed(seed);
        let (b, _) = run_seed(seed);
        assert!(a.lines().count() > 10, "a trace with something in it:\n{a}");
        assert_eq!(a, b, "seed {seed} is not deterministic");
    }
    let (a, _) = run_seed(1);
    let (b, _) = run_seed(2);
    assert_ne!(a, b, "different seeds, different runs");
}

/// After a restart with the wall clock stepped back two hours, a pending
/// delivery whose next attempt was persisted in wall time is attempted
/// within the maximum backoff, not two hours later.
#[test]
fn a_pending_delivery_is_prompt_after_a_restart_with_the_clock_two_hours_back() {
    let rt = sim::runtime();
    let waited_ms = rt.block_on(async {
        let world = World::new(5);
        world.latency.store(false, std::sync::atomic::Ordering::SeqCst);
        world.net.set("b", Mode::Down);
        let node = world.start_node().await.unwrap_or_else(|e| panic!("start: {e}"));
        let t = node
            .engine
            .begin(vec!["a".into(), "b".into()], 0, String::new(), String::new())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        node.engine.confirm(t.id).await.unwrap_or_else(|e| panic!("{e}"));
        // Long enough for b's backoff to reach its maximum (2 s).
        tokio::time::sleep(Duration::from_secs(10)).await;
        let pending = world.store.get_txn(t.id).await.ok().flatten().unwrap_or_else(|| panic!("gone"));
        let b = &pending.participants[1];
        assert!(b.attempts >= 5 && b.next_attempt_ms > 0, "b kept failing: {b:?}");
        node.crash();
        world.clock.step(-2 * 3_600_000);
        world.net.set("b", Mode::Up);
        let restarted = world.clock.elapsed_ms();
        let node = world.start_node().await.unwrap_or_else(|e| panic!("restart: {e}"));
        // Bounded: three simulated hours at most.
        for _ in 0..10_800 {
            let state = world.store.get_txn(t.id).await.ok().flatten().map(|t| t.state);
            if state == Some(TxnState::Confirmed) {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        node.crash();
        world.clock.elapsed_ms() - restarted
    });
    let bound = sim::policy().retry_max_ms as i64 + 1_000;
    assert!(waited_ms <= bound, "delivered {waited_ms} ms after the restart; the bound is {bound} ms");
}
