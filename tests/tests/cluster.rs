//! Cluster mode: several real coordinators on one real PostgreSQL server.
//! Any node answers any call; decisions raced across nodes have one winner;
//! a node killed mid-delivery is taken over within its lease; a node paused
//! past its lease is fenced; the database restarting is survived without a
//! restart of any coordinator. Registrations survive a restart (sled too).
//!
//! The PostgreSQL tests skip, loudly, where PostgreSQL is not installed (see
//! `tcc_tests::pg`); CI requires them.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tcc_proto::v1::{self, TransactionState as S};
use tcc_tests::pg::Postgres;
use tcc_tests::{Call, Coordinator, TestParticipant, command, eventually};
use tonic::Code;

/// Lease of the tests' coordinators: short, so takeovers are quick.
const LEASE_MS: u64 = 2_000;

async fn node(pg: &Postgres, extra: &[&str]) -> Result<Coordinator> {
    let url = pg.url();
    let lease = LEASE_MS.to_string();
    let mut args = vec!["--database-url", url.as_str()];
    if !extra.contains(&"--lease-ms") {
        args.extend(["--lease-ms", lease.as_str()]);
    }
    args.extend(["--retry-initial-ms", "20", "--retry-max-ms", "200", "--call-timeout-ms", "2000"]);
    args.extend_from_slice(extra);
    Coordinator::start(&args).await
}

async fn nodes(pg: &Postgres, n: usize) -> Result<Vec<Coordinator>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(node(pg, &[]).await?);
    }
    Ok(out)
}

/// A fresh PostgreSQL server, `k` nodes on it, and a participant
/// registered as "svc" through the first node and known to all of them;
/// `None` where PostgreSQL is not installed.
async fn cluster_with_svc(k: usize) -> Result<Option<(Postgres, Vec<Coordinator>, TestParticipant)>> {
    let Some(pg) = Postgres::start().await? else { return Ok(None) };
    let n = nodes(&pg, k).await?;
    let p = TestParticipant::start().await?;
    n[0].register("svc", &p).await?;
    for c in &n {
        sees_endpoint(c, "svc", &p.url()).await?;
    }
    Ok(Some((pg, n, p)))
}

async fn get(c: &Coordinator, id: &str) -> Result<v1::Transaction> {
    Ok(c.transactions().await?.get(v1::GetRequest { transaction_id: id.into() }).await?.into_inner())
}

async fn confirm(c: &Coordinator, id: &str, wait: bool) -> Result<v1::DecisionResponse, tonic::Status> {
    let mut client = c.transactions().await.map_err(|e| tonic::Status::unknown(e.to_string()))?;
    let req = v1::ConfirmRequest { transaction_id: id.into(), wait, wait_timeout_ms: 20_000 };
    Ok(client.confirm(req).await?.into_inner())
}

async fn cancel(c: &Coordinator, id: &str) -> Result<v1::DecisionResponse, tonic::Status> {
    let mut client = c.transactions().await.map_err(|e| tonic::Status::unknown(e.to_string()))?;
    let req = v1::CancelRequest { transaction_id: id.into(), reason: "racing cancel".into(), ..Default::default() };
    Ok(client.cancel(req).await?.into_inner())
}

fn acked(calls: &[Call], kind: &str, partial: &str) -> usize {
    calls.iter().filter(|c| c.kind == kind && c.partial_id == partial && c.acked).count()
}

/// Waits until `c` lists `endpoint` for `service` (registrations reach the
/// other nodes within a refresh period).
async fn sees_endpoint(c: &Coordinator, service: &str, endpoint: &str) -> Result<()> {
    eventually("the registration to reach every node", Duration::from_secs(10), || async {
        let mut r = c.registry().await?;
        let list = r.list_endpoints(v1::ListEndpointsRequest { service: service.into() }).await?.into_inner();
        Ok(list.endpoints.iter().any(|e| e.endpoint == endpoint).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_node_answers_any_call() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let n = nodes(&pg, 3).await?;
    let (orders, bank) = (TestParticipant::start().await?, TestParticipant::start().await?);
    // Registered through node 0 only.
    n[0].register("orders", &orders).await?;
    n[0].register("bank", &bank).await?;
    for c in &n {
        sees_endpoint(c, "orders", &orders.url()).await?;
        sees_endpoint(c, "bank", &bank.url()).await?;
    }

    let t = n[0].begin(&["orders", "bank"], 30_000).await?;
    let (po, pb) = (&t.partials[0].partial_id, &t.partials[1].partial_id);
    n[1].append(po, vec![command("orders.Create", "o-1", b"one")], "k1").await?;
    n[2].append(po, vec![command("orders.AddLine", "o-1", b"two")], "k2").await?;
    // A retried append through another node is recognised by its key.
    let again = n[0].append(po, vec![command("orders.AddLine", "o-1", b"two")], "k2").await?;
    ensure!((again.first_sequence, again.last_sequence) == (2, 2), "idempotent across nodes: {again:?}");
    n[1].append(pb, vec![command("bank.Debit", "c-1", b"42")], "").await?;
    for c in &n {
        let g = get(c, &t.transaction_id).await?;
        ensure!(g.state == S::Active as i32, "every node sees ACTIVE");
        ensure!(g.participants[0].command_count == 2 && g.participants[1].command_count == 1, "and the counts");
    }

    let d = confirm(&n[2], &t.transaction_id, true).await?;
    ensure!(d.state == S::Confirmed as i32, "confirm with wait on a third node: {d:?}");
    let oc = orders.calls();
    ensure!(acked(&oc, "commit", po) == 1, "orders committed once: {oc:#?}");
    let payloads: Vec<&[u8]> = oc[0].commands.iter().map(|c| c.payload.as_slice()).collect();
    ensure!(payloads == vec![b"one".as_slice(), b"two".as_slice()], "in order, the retried append once");
    ensure!(acked(&bank.calls(), "commit", pb) == 1, "bank committed once");
    for c in &n {
        ensure!(get(c, &t.transaction_id).await?.state == S::Confirmed as i32, "every node sees CONFIRMED");
    }
    // A cancel through another node now reports the decision that stands.
    let late = cancel(&n[1], &t.transaction_id).await;
    ensure!(late.as_ref().is_err_and(|s| s.code() == Code::FailedPrecondition), "late cancel: {late:?}");
    Ok(())
}

/// Confirm and cancel raced through different nodes: one decision wins,
/// every node reports it, and the participants get only that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decisions_raced_across_nodes_have_one_winner() -> Result<()> {
    let Some((_pg, n, p)) = cluster_with_svc(3).await? else { return Ok(()) };
    let mut confirmed = Vec::new();
    let mut cancelled = Vec::new();
    for round in 0..20 {
        let t = n[round % 3].begin(&["svc"], 30_000).await?;
        let partial = t.partials[0].partial_id.clone();
        n[(round + 1) % 3].append(&partial, vec![command("svc.Do", "k", b"x")], "").await?;
        let id = t.transaction_id.clone();
        let (a, b, c) = tokio::join!(confirm(&n[0], &id, false), cancel(&n[1], &id), confirm(&n[2], &id, false));
        let outcomes: Vec<i32> = [a, b, c].into_iter().filter_map(|r| r.ok().map(|d| d.state)).collect();
        ensure!(!outcomes.is_empty(), "round {round}: some call succeeded");
        let decided = get(&n[round % 3], &id).await?.state;
        let won = |s: i32| matches!(S::try_from(s), Ok(S::Confirming | S::Confirmed));
        ensure!(outcomes.iter().all(|s| won(*s) == won(decided)), "round {round}: every success reports the winner");
        if won(decided) { confirmed.push(partial) } else { cancelled.push(partial) }
    }
    // Every transaction finishes with its own decision, delivered once.
    for c in &n {
        eventually("every transaction to finish", Duration::from_secs(20), || async {
            let all = c.list_all(&[]).await?;
            Ok(all.iter().all(|t| t.state == S::Confirmed as i32 || t.state == S::Cancelled as i32).then_some(()))
        })
        .await?;
    }
    let calls = p.calls();
    for partial in &confirmed {
        ensure!(acked(&calls, "commit", partial) >= 1, "confirmed {partial} committed");
        ensure!(calls.iter().all(|c| !(c.partial_id == *partial && c.kind == "rollback")), "and never rolled back");
    }
    for partial in &cancelled {
        ensure!(calls.iter().all(|c| !(c.partial_id == *partial && c.kind == "commit")), "cancelled: no commit");
    }
    ensure!(confirmed.len() + cancelled.len() == 20, "20 decisions");
    Ok(())
}

/// The node delivering a decision is killed in the middle of a phase-2
/// call; another node takes over once its lease lapses, and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_mid_delivery_is_taken_over_within_its_lease() -> Result<()> {
    let Some((_pg, mut n, p)) = cluster_with_svc(2).await? else { return Ok(()) };
    let t = n[0].begin(&["svc"], 30_000).await?;
    let partial = t.partials[0].partial_id.clone();
    n[0].append(&partial, vec![command("svc.Do", "k", b"x")], "").await?;

    p.delay(Duration::from_secs(60)); // node 0's call hangs
    confirm(&n[0], &t.transaction_id, false).await?;
    p.wait_for("node 0's commit call", |c| c.iter().any(|c| c.kind == "commit")).await?;
    p.delay(Duration::ZERO);
    n[0].kill9().await?;
    let killed = Instant::now();

    let calls = p.wait_for("node 1's commit", |c| acked(c, "commit", &partial) == 1).await?;
    let takeover = killed.elapsed();
    ensure!(calls.iter().filter(|c| c.kind == "commit").count() == 2, "the hung call and node 1's: {calls:#?}");
    eventually("CONFIRMED", Duration::from_secs(10), || async {
        Ok((get(&n[1], &t.transaction_id).await?.state == S::Confirmed as i32).then_some(()))
    })
    .await?;
    // The lease, plus at most one sweeper pass (1 s), plus a call.
    let bound = Duration::from_millis(LEASE_MS) + Duration::from_secs(2);
    ensure!(takeover <= bound, "takeover took {takeover:?}; bound {bound:?}");
    eprintln!("takeover after kill -9: {} ms (lease {LEASE_MS} ms)", takeover.as_millis());
    ensure!(n[1].logs().contains("took over"), "node 1 says it took over");
    // The second node to start found the schema made: without the
    // server's NOTICE about it in its log (before: at INFO).
    ensure!(!n[1].logs().contains("already exists"), "a NOTICE in the log:\n{}", n[1].logs());
    ensure!(!n[1].logs().contains("node=Some("), "the node id shown as an Option:\n{}", n[1].logs());
    Ok(())
}

/// A node paused (SIGSTOP) past its lease while delivering: another node
/// finishes; the paused one, resumed, is fenced (its late write refused,
/// the record untouched), and then serves again under a new node id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_paused_past_its_lease_is_fenced() -> Result<()> {
    let Some((pg, n, p)) = cluster_with_svc(2).await? else { return Ok(()) };
    let t = n[0].begin(&["svc"], 30_000).await?;
    let partial = t.partials[0].partial_id.clone();
    n[0].append(&partial, vec![command("svc.Do", "k", b"x")], "").await?;

    p.delay(Duration::from_secs(8)); // node 0's call hangs past the lease
    confirm(&n[0], &t.transaction_id, false).await?;
    p.wait_for("node 0's commit call", |c| c.iter().any(|c| c.kind == "commit")).await?;
    n[0].signal("STOP")?;
    p.delay(Duration::ZERO);
    p.wait_for("node 1's commit", |c| acked(c, "commit", &partial) == 1).await?;
    eventually("CONFIRMED by node 1", Duration::from_secs(10), || async {
        Ok((get(&n[1], &t.transaction_id).await?.state == S::Confirmed as i32).then_some(()))
    })
    .await?;
    let db = pg.client().await?;
    let id: uuid::Uuid = t.transaction_id.parse()?;
    let before = db.query_one("SELECT version, owner FROM tcc_txn WHERE id = $1", &[&id]).await?;
    let (v0, owner0): (i64, uuid::Uuid) = (before.get(0), before.get(1));

    // Resume: node 0's hung call answers (the participant's 8 s delay), it
    // tries to record it, and is refused.
    n[0].signal("CONT")?;
    eventually("node 0 to notice its lease lapsed", Duration::from_secs(20), || async {
        Ok(n[0].logs().contains("lease lapsed").then_some(()))
    })
    .await?;
    eventually("node 0's late write to be refused", Duration::from_secs(20), || async {
        let logs = n[0].logs();
        Ok((logs.contains("cannot record phase-2 progress") || logs.contains("write conflict")).then_some(()))
    })
    .await?;
    let after = db.query_one("SELECT version, owner FROM tcc_txn WHERE id = $1", &[&id]).await?;
    ensure!((after.get::<_, i64>(0), after.get::<_, uuid::Uuid>(1)) == (v0, owner0), "the record is untouched");
    ensure!(get(&n[0], &t.transaction_id).await?.state == S::Confirmed as i32, "node 0 reports what node 1 did");
    ensure!(acked(&p.calls(), "rollback", &partial) == 0, "nothing rolled back");
    // Node 0 carries on under a new id.
    let t2 = n[0].begin(&["svc"], 30_000).await?;
    ensure!(confirm(&n[0], &t2.transaction_id, true).await?.state == S::Confirmed as i32, "node 0 works again");
    Ok(())
}

/// The database crashes and comes back under load: calls made while it is
/// down fail UNAVAILABLE naming the database, the coordinators carry on by
/// themselves, and every acknowledged decision is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_database_restarting_under_load_loses_nothing() -> Result<()> {
    let Some((mut pg, n, p)) = cluster_with_svc(2).await? else { return Ok(()) };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut clients = Vec::new();
    for i in 0..4 {
        let c = &n[i % 2];
        let (addr, mut stop) = (c.url(), stop_rx.clone());
        clients.push(tokio::spawn(async move {
            let channel = tonic::transport::Channel::from_shared(addr)?.connect_lazy();
            let mut tx = v1::transactions_client::TransactionsClient::new(channel.clone());
            let mut topics = v1::topics_client::TopicsClient::new(channel);
            let (mut confirmed, mut unavailable) = (Vec::new(), Vec::new());
            for _ in 0..2_000 {
                if *stop.borrow_and_update() {
                    break;
                }
                let begin = v1::BeginRequest { participants: vec!["svc".into()], timeout_ms: 30_000 };
                let t = match tx.begin(begin).await {
                    Ok(t) => t.into_inner(),
                    Err(s) => {
                        unavailable.push(s);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let append = v1::AppendRequest {
                    partial_id: t.partials[0].partial_id.clone(),
                    commands: vec![command("svc.Do", "k", b"x")],
                    idempotency_key: "once".into(),
                    service: String::new(),
                };
                if let Err(s) = topics.append(append).await {
                    unavailable.push(s);
                    continue;
                }
                let req = v1::ConfirmRequest { transaction_id: t.transaction_id.clone(), ..Default::default() };
                match tx.confirm(req).await {
                    Ok(_) => confirmed.push(t.partials[0].partial_id.clone()),
                    Err(s) => unavailable.push(s),
                }
            }
            Ok::<_, anyhow::Error>((confirmed, unavailable))
        }));
    }
    p.wait_for("some load", |c| c.len() >= 50).await?;
    pg.crash().await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // the outage itself
    pg.start_again().await?;
    let before = p.calls().len();
    p.wait_for("load after the restart", |c| c.len() >= before + 50).await?;
    stop_tx.send(true)?;
    let (mut confirmed, mut errors) = (Vec::new(), Vec::new());
    for c in clients {
        let (ok, err) = c.await??;
        confirmed.extend(ok);
        errors.extend(err);
    }
    ensure!(!errors.is_empty(), "the outage was seen by the clients");
    for s in &errors {
        ensure!(s.code() == Code::Unavailable && s.message().contains("database"), "outage error: {s:?}");
    }
    // Every acknowledged confirm is delivered, exactly its commands.
    for partial in &confirmed {
        p.wait_for("every acknowledged confirm delivered", |c| acked(c, "commit", partial) >= 1)
            .await
            .with_context(|| format!("partial {partial}"))?;
    }
    for c in &n {
        eventually("nothing left unfinished", Duration::from_secs(30), || async {
            let open = c.list_all(&[S::Confirming, S::Cancelling, S::FailedToConfirm, S::FailedToCancel]).await?;
            Ok(open.is_empty().then_some(()))
        })
        .await?;
    }
    eprintln!("database restart under load: {} confirmed, {} calls refused UNAVAILABLE", confirmed.len(), errors.len());
    Ok(())
}

/// Registrations are stored: after a restart (kill -9) the coordinator
/// still knows the participant and delivers to it without a new Register.
#[tokio::test]
async fn registrations_survive_a_restart_on_the_embedded_store() -> Result<()> {
    let mut c = Coordinator::start(&["--retry-initial-ms", "20", "--retry-max-ms", "200"]).await?;
    let p = TestParticipant::start().await?;
    c.register("svc", &p).await?;
    c.kill9().await?;
    c.restart().await?;
    let list = c.registry().await?.list_endpoints(v1::ListEndpointsRequest::default()).await?.into_inner();
    ensure!(list.endpoints.iter().any(|e| e.service == "svc" && e.endpoint == p.url()), "still registered: {list:?}");
    let t = c.begin(&["svc"], 10_000).await?;
    ensure!(confirm(&c, &t.transaction_id, true).await?.state == S::Confirmed as i32, "delivered");
    Ok(())
}

/// Registrations are stored in the database: every node of a restarted
/// cluster still knows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registrations_survive_a_cluster_restart() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let mut c = node(&pg, &[]).await?;
    let p = TestParticipant::start().await?;
    c.register("svc", &p).await?;
    c.terminate().await?;
    let other = node(&pg, &[]).await?;
    sees_endpoint(&other, "svc", &p.url()).await?;
    let t = other.begin(&["svc"], 10_000).await?;
    let r = confirm(&other, &t.transaction_id, true).await?;
    ensure!(r.state == S::Confirmed as i32, "delivered {r:?}\n{}", other.logs());
    Ok(())
}

/// Finished transactions are garbage-collected from the database after the
/// retention, with their topics, receipts and partial index entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_transactions_are_collected_from_the_database() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    let c = node(&pg, &["--retention-secs", "1"]).await?;
    let p = TestParticipant::start().await?;
    c.register("svc", &p).await?;
    let t = c.begin(&["svc"], 10_000).await?;
    c.append(&t.partials[0].partial_id, vec![command("svc.Do", "k", b"x")], "key").await?;
    ensure!(confirm(&c, &t.transaction_id, true).await?.state == S::Confirmed as i32, "confirmed");
    eventually("the transaction to be collected", Duration::from_secs(10), || async {
        match get(&c, &t.transaction_id).await {
            Err(e) => Ok(e.downcast_ref::<tonic::Status>().is_some_and(|s| s.code() == Code::NotFound).then_some(())),
            Ok(_) => Ok(None),
        }
    })
    .await?;
    let db = pg.client().await?;
    for table in ["tcc_txn", "tcc_partial", "tcc_command", "tcc_receipt"] {
        let n: i64 = db.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await?.get(0);
        ensure!(n == 0, "{table} still has {n} rows");
    }
    Ok(())
}

/// A coordinator stopped gracefully (SIGTERM) gives its lease up: another
/// takes over its deliveries at once, long before the lease would lapse.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_stop_hands_the_work_over_at_once() -> Result<()> {
    let Some(pg) = Postgres::start().await? else { return Ok(()) };
    // A lease far longer than the bound checked below.
    let mut a = node(&pg, &["--lease-ms", "60000"]).await?;
    let b = node(&pg, &["--lease-ms", "60000"]).await?;
    let p = TestParticipant::start().await?;
    a.register("svc", &p).await?;
    sees_endpoint(&b, "svc", &p.url()).await?;
    let t = a.begin(&["svc"], 30_000).await?;
    let partial = t.partials[0].partial_id.clone();
    p.fail_transiently(u32::MAX); // a keeps retrying: the delivery stays a's
    confirm(&a, &t.transaction_id, false).await?;
    p.wait_for("a's first commit", |c| c.iter().any(|c| c.kind == "commit")).await?;
    a.terminate().await?;
    ensure!(a.logs().contains("lease released"), "a says it released its lease");
    let stopped = Instant::now();
    p.fail_transiently(0);
    p.wait_for("b's commit", |c| acked(c, "commit", &partial) == 1).await?;
    let took = stopped.elapsed();
    ensure!(took < Duration::from_secs(5), "taken over after {took:?}; the lease is 60 s");
    eprintln!("takeover after SIGTERM: {} ms (lease 60 s)", took.as_millis());
    Ok(())
}

/// A coordinator that cannot use its database does not start, and says
/// which database and why (no PostgreSQL needed: nothing listens there).
#[tokio::test]
async fn an_unreachable_or_malformed_database_url_stops_the_start_with_a_clear_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let port = tcc_tests::free_port()?;
    let url = format!("postgres://tcc:secret@127.0.0.1:{port}/tcc");
    let (status, stderr) = Coordinator::start_failing(dir.path(), &["--database-url", &url]).await?;
    ensure!(!status.success(), "started without its database");
    ensure!(stderr.contains(&format!("cannot use the database postgres://tcc:***@127.0.0.1:{port}/tcc")), "{stderr}");
    ensure!(stderr.contains("unavailable"), "says why: {stderr}");
    ensure!(!stderr.contains("secret"), "the password is not shown: {stderr}");
    let (status, stderr) = Coordinator::start_failing(dir.path(), &["--database-url", "postgres://tcc@:x:y/"]).await?;
    ensure!(!status.success() && stderr.contains("not a valid PostgreSQL URL"), "{stderr}");
    let (status, stderr) = Coordinator::start_failing(dir.path(), &["--database-url", "mysql://x"]).await?;
    ensure!(!status.success() && stderr.contains("--database-url"), "{stderr}");
    Ok(())
}

/// A takeover of many transactions at once is logged in a line or two,
/// not one per transaction (before: 65 lines in 8 s): the line says how
/// many like it were held back since the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_of_many_transactions_is_logged_in_a_few_lines() -> Result<()> {
    let Some((_pg, mut n, p)) = cluster_with_svc(2).await? else { return Ok(()) };
    p.delay(Duration::from_secs(60)); // node 0's calls hang: its deliveries stay its own
    let mut ids = Vec::new();
    for _ in 0..40 {
        let t = n[0].begin(&["svc"], 30_000).await?;
        confirm(&n[0], &t.transaction_id, false).await?;
        ids.push(t.transaction_id);
    }
    p.wait_for("node 0's first commit call", |c| c.iter().any(|c| c.kind == "commit")).await?;
    p.delay(Duration::ZERO);
    n[0].kill9().await?;
    eventually("all 40 CONFIRMED through node 1", Duration::from_secs(30), || async {
        for id in &ids {
            if get(&n[1], id).await?.state != S::Confirmed as i32 {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await?;
    let logs = n[1].logs();
    let lines = logs.lines().filter(|l| l.contains("took over a transaction")).count();
    ensure!((1..=3).contains(&lines), "{lines} takeover lines for 40 transactions:\n{logs}");
    Ok(())
}
