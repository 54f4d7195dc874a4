//! End-to-end tests of the coordinator binary: the gRPC surface, the
//! begin → append → confirm flow with real participant servers, deadlines,
//! recovery after kill -9, phase-2 retries and failures, admin, GC, bad input
//! and graceful shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use anyhow::Result;
use tcc_proto::v1::{self, TransactionState as S};
use tcc_tests::{Call, Coordinator, TestParticipant, command, eventually};
use tonic::Code;

/// Fast retries so failure paths finish in well under a second.
const FAST: &[&str] = &["--retry-initial-ms", "20", "--retry-max-ms", "200", "--call-timeout-ms", "2000"];

fn commits(calls: &[Call]) -> Vec<&Call> {
    calls.iter().filter(|c| c.kind == "commit").collect()
}

fn acked(calls: &[Call], kind: &str, partial: &str) -> usize {
    calls.iter().filter(|c| c.kind == kind && c.partial_id == partial && c.acked).count()
}

async fn confirm_wait(c: &Coordinator, id: &str) -> Result<v1::DecisionResponse> {
    let req = v1::ConfirmRequest { transaction_id: id.into(), wait: true, wait_timeout_ms: 20_000 };
    Ok(c.transactions().await?.confirm(req).await?.into_inner())
}

async fn get(c: &Coordinator, id: &str) -> Result<v1::Transaction, tonic::Status> {
    let mut client = c.transactions().await.map_err(|e| tonic::Status::unknown(e.to_string()))?;
    Ok(client.get(v1::GetRequest { transaction_id: id.into() }).await?.into_inner())
}

#[tokio::test]
async fn grpc_surface_lists_every_service_and_reports_health() -> Result<()> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let c = Coordinator::start(&[]).await?;
    let mut refl = ServerReflectionClient::new(c.channel().await?);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl.server_reflection_info(tokio_stream::iter(vec![req])).await?.into_inner();
    let resp = stream.message().await?.expect("one reflection response");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "tcc.v1.Transactions",
        "tcc.v1.Topics",
        "tcc.v1.Registry",
        "tcc.v1.Admin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(c.channel().await?);
    for service in ["", "tcc.v1.Transactions", "tcc.v1.Topics"] {
        let r = health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await?.into_inner();
        assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{service:?}");
    }
    Ok(())
}

#[tokio::test]
async fn begin_append_confirm_delivers_exactly_each_participants_commands_in_order() -> Result<()> {
    let c = Coordinator::start(FAST).await?;
    let (orders, customers) = (TestParticipant::start().await?, TestParticipant::start().await?);
    c.register("orders", &orders).await?;
    c.register("customers", &customers).await?;

    let t = c.begin(&["orders", "customers"], 10_000).await?;
    assert_eq!(t.partials.len(), 2);
    let (po, pc) = (&t.partials[0].partial_id, &t.partials[1].partial_id);
    assert_eq!((t.partials[0].service.as_str(), t.partials[1].service.as_str()), ("orders", "customers"));
    assert_ne!(po, pc);

    let a1 = c
        .append(po, vec![command("orders.Create", "o-1", b"one"), command("orders.AddLine", "o-1", b"two")], "")
        .await?;
    let a2 = c.append(po, vec![command("orders.AddLine", "o-1", b"three")], "").await?;
    let a3 = c.append(pc, vec![command("customers.Debit", "c-9", b"42")], "").await?;
    assert_eq!((a1.first_sequence, a1.last_sequence, a2.first_sequence, a3.first_sequence), (1, 2, 3, 1));

    let d = confirm_wait(&c, &t.transaction_id).await?;
    assert_eq!(d.state, S::Confirmed as i32);

    let oc = orders.calls();
    assert_eq!(oc.len(), 1, "exactly one call to orders: {oc:#?}");
    assert_eq!(oc[0].kind, "commit");
    assert_eq!(&oc[0].partial_id, po);
    assert_eq!(oc[0].transaction_id, t.transaction_id);
    let got: Vec<(u64, &str, &[u8])> =
        oc[0].commands.iter().map(|c| (c.sequence, c.r#type.as_str(), c.payload.as_slice())).collect();
    assert_eq!(
        got,
        vec![
            (1, "orders.Create", b"one".as_slice()),
            (2, "orders.AddLine", b"two".as_slice()),
            (3, "orders.AddLine", b"three".as_slice())
        ]
    );
    let cc = customers.calls();
    assert_eq!(cc.len(), 1, "exactly one call to customers: {cc:#?}");
    assert_eq!((cc[0].kind, cc[0].partial_id.as_str(), cc[0].commands.len()), ("commit", pc.as_str(), 1));
    assert_eq!(cc[0].commands[0].key, "c-9");

    let g = get(&c, &t.transaction_id).await?;
    assert_eq!(g.state, S::Confirmed as i32);
    assert!(g.finished_unix_ms >= g.decided_unix_ms && g.decided_unix_ms >= g.created_unix_ms);
    for p in &g.participants {
        assert_eq!(p.status, v1::ParticipantStatus::Acknowledged as i32);
        assert_eq!(p.attempts, 1);
    }
    assert_eq!(g.participants[0].command_count, 3);

    // Confirm again: same outcome, no new delivery.
    assert_eq!(confirm_wait(&c, &t.transaction_id).await?.state, S::Confirmed as i32);
    assert_eq!(orders.calls().len(), 1);
    Ok(())
}

#[tokio::test]
async fn cancel_rolls_back_every_participant_including_ones_that_never_tried() -> Result<()> {
    let c = Coordinator::start(FAST).await?;
    let (a, b) = (TestParticipant::start().await?, TestParticipant::start().await?);
    c.register("a", &a).await?;
    c.register("b", &b).await?;
    let t = c.begin(&["a", "b"], 10_000).await?;
    c.append(&t.partials[0].partial_id, vec![command("a.Reserve", "", b"x")], "").await?;
    let req = v1::CancelRequest {
        transaction_id: t.transaction_id.clone(),
        reason: "out of stock".into(),
        wait: true,
        wait_timeout_ms: 20_000,
    };
    let d = c.transactions().await?.cancel(req).await?.into_inner();
    assert_eq!(d.state, S::Cancelled as i32);
    assert_eq!(d.transaction.map(|t| t.reason), Some("out of stock".to_string()));
    let (ac, bc) = (a.calls(), b.calls());
    assert_eq!((ac.len(), ac[0].kind, ac[0].commands.len()), (1, "rollback", 1));
    assert_eq!((bc.len(), bc[0].kind, bc[0].commands.len()), (1, "rollback", 0), "empty compensation delivered too");
    // Confirm after cancel: FAILED_PRECONDITION naming the state.
    let err = c
        .transactions()
        .await?
        .confirm(v1::ConfirmRequest { transaction_id: t.transaction_id, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("CANCELLED") && err.message().contains("out of stock"), "{}", err.message());
    Ok(())
}

#[tokio::test]
async fn the_deadline_cancels_and_a_late_try_is_refused() -> Result<()> {
    let c = Coordinator::start(FAST).await?;
    let p = TestParticipant::start().await?;
    c.register("svc", &p).await?;
    let t = c.begin(&["svc"], 300).await?;
    let partial = t.partials[0].partial_id.clone();
    // The rollback arriving is the event that the deadline fired.
    p.wait_for("rollback after the deadline", |calls| acked(calls, "rollback", &partial) == 1).await?;
    let req = v1::CancelRequest { transaction_id: t.transaction_id.clone(), wait: true, ..Default::default() };
    let d = c.transactions().await?.cancel(req).await?.into_inner();
    let txn = d.transaction.expect("transaction");
    assert_eq!((d.state, txn.reason.as_str()), (S::Cancelled as i32, "deadline exceeded"));
    let late = c.append(&partial, vec![command("svc.Reserve", "", b"")], "").await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert!(late.message().contains("CANCELLED"), "{}", late.message());
    let read =
        c.topics().await?.read(v1::ReadRequest { partial_id: partial, ..Default::default() }).await?.into_inner();
    assert!(read.commands.is_empty(), "nothing stored for the late try");
    assert_eq!(commits(&p.calls()).len(), 0);
    Ok(())
}

#[tokio::test]
async fn after_kill_9_acknowledged_work_survives_and_delivery_resumes() -> Result<()> {
    let mut c = Coordinator::start(FAST).await?;
    // No endpoint for "svc" yet: the commit cannot be delivered before the crash.
    let t = c.begin(&["svc"], 60_000).await?;
    let partial = t.partials[0].partial_id.clone();
    c.append(&partial, vec![command("svc.A", "", b"1"), command("svc.B", "", b"2")], "k1").await?;
    let d = c
        .transactions()
        .await?
        .confirm(v1::ConfirmRequest { transaction_id: t.transaction_id.clone(), ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(d.state, S::Confirming as i32);
    // A second transaction stays ACTIVE across the crash with its deadline.
    let active = c.begin(&["svc"], 60_000).await?;

    c.kill9().await?;
    c.restart().await?;

    let a = get(&c, &active.transaction_id).await?;
    assert_eq!((a.state, a.deadline_unix_ms), (S::Active as i32, active.deadline_unix_ms), "deadline kept");
    assert_eq!(get(&c, &t.transaction_id).await?.state, S::Confirming as i32, "decision kept");
    // The retried append is recognised after the restart.
    let again = c.append(&partial, vec![command("svc.A", "", b"1"), command("svc.B", "", b"2")], "k1").await?;
    assert!(again.duplicate);

    let p = TestParticipant::start().await?;
    c.register("svc", &p).await?;
    let d = confirm_wait(&c, &t.transaction_id).await?;
    assert_eq!(d.state, S::Confirmed as i32, "{}", c.logs());
    let calls = p.calls();
    assert_eq!(commits(&calls).len(), 1, "delivered exactly once: {calls:#?}");
    let payloads: Vec<&[u8]> = calls[0].commands.iter().map(|c| c.payload.as_slice()).collect();
    assert_eq!(payloads, vec![b"1".as_slice(), b"2".as_slice()]);
    Ok(())
}

#[tokio::test]
async fn kill_9_while_delivering_to_a_down_participant_then_it_returns() -> Result<()> {
    let mut c = Coordinator::start(FAST).await?;
    let mut first = TestParticipant::start().await?;
    c.register("svc", &first).await?;
    first.stop().await; // registered, but down: calls fail at the transport
    let t = c.begin(&["svc"], 60_000).await?;
    c.append(&t.partials[0].partial_id, vec![command("svc.A", "", b"1")], "").await?;
    c.transactions()
        .await?
        .confirm(v1::ConfirmRequest { transaction_id: t.transaction_id.clone(), ..Default::default() })
        .await?;
    // Several failed attempts (FAST: 20 ms doubling, capped at 200 ms).
    let before = eventually("failed attempts recorded", Duration::from_secs(10), || async {
        let g = get(&c, &t.transaction_id).await?;
        let p = &g.participants[0];
        Ok((p.attempts >= 6 && !p.last_error.is_empty()).then_some(p.attempts))
    })
    .await?;
    c.kill9().await?;
    c.restart().await?;
    let g = get(&c, &t.transaction_id).await?;
    // Not persisted, the count would restart from 0: a fresh coordinator
    // cannot make 6 attempts (20+40+80+160+200 ms of backoff) before this read.
    assert!(
        g.participants[0].attempts >= before.min(6),
        "attempts persisted across the crash: {} < {before}",
        g.participants[0].attempts
    );
    let second = TestParticipant::start().await?;
    c.register("svc", &second).await?;
    assert_eq!(confirm_wait(&c, &t.transaction_id).await?.state, S::Confirmed as i32);
    assert_eq!(commits(&second.calls()).len(), 1);
    assert!(first.calls().is_empty());
    Ok(())
}

#[tokio::test]
async fn transient_failures_are_retried_and_a_refusal_needs_an_operator() -> Result<()> {
    let c = Coordinator::start(FAST).await?;
    let (flaky, stubborn) = (TestParticipant::start().await?, TestParticipant::start().await?);
    c.register("flaky", &flaky).await?;
    c.register("stubborn", &stubborn).await?;
    flaky.fail_transiently(2);
    stubborn.refuse(true);
    let t = c.begin(&["flaky", "stubborn"], 10_000).await?;
    let d = confirm_wait(&c, &t.transaction_id).await?;
    assert_eq!(d.state, S::FailedToConfirm as i32);
    let txn = d.transaction.expect("transaction");
    let (f, s) = (&txn.participants[0], &txn.participants[1]);
    assert_eq!((f.status, f.attempts), (v1::ParticipantStatus::Acknowledged as i32, 3));
    assert_eq!(s.status, v1::ParticipantStatus::Failed as i32);
    assert!(s.last_error.contains("refused"), "{}", s.last_error);

    let mut admin = c.admin().await?;
    let listed = admin
        .list_transactions(v1::ListTransactionsRequest {
            states: vec![S::FailedToConfirm as i32],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        listed.transactions.iter().map(|t| t.transaction_id.as_str()).collect::<Vec<_>>(),
        vec![t.transaction_id.as_str()]
    );
    // Still decided: cancel is refused.
    let err = c
        .transactions()
        .await?
        .cancel(v1::CancelRequest { transaction_id: t.transaction_id.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    stubborn.refuse(false);
    let r = admin.retry(v1::RetryRequest { transaction_id: t.transaction_id.clone() }).await?.into_inner();
    assert_eq!(r.state, S::Confirming as i32);
    assert_eq!(confirm_wait(&c, &t.transaction_id).await?.state, S::Confirmed as i32);
    assert_eq!(acked(&stubborn.calls(), "commit", &t.partials[1].partial_id), 1);
    assert_eq!(
        acked(&flaky.calls(), "commit", &t.partials[0].partial_id),
        1,
        "acknowledged participant not called again"
    );
    let err = admin.retry(v1::RetryRequest { transaction_id: t.transaction_id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("CONFIRMED"));
    Ok(())
}

#[tokio::test]
async fn an_exhausted_retry_budget_ends_in_failed_to_cancel() -> Result<()> {
    let mut args = FAST.to_vec();
    args.extend(["--retry-max-attempts", "3"]);
    let c = Coordinator::start(&args).await?;
    let t = c.begin(&["nobody"], 10_000).await?; // no endpoint ever
    let req = v1::CancelRequest {
        transaction_id: t.transaction_id.clone(),
        reason: "test".into(),
        wait: true,
        wait_timeout_ms: 20_000,
    };
    let d = c.transactions().await?.cancel(req).await?.into_inner();
    assert_eq!(d.state, S::FailedToCancel as i32);
    let p = &d.transaction.expect("transaction").participants[0];
    assert_eq!(p.attempts, 3);
    assert!(
        p.last_error.contains("gave up after 3 attempts") && p.last_error.contains("no endpoint"),
        "{}",
        p.last_error
    );
    assert!(c.logs().contains("retry budget exhausted"));
    Ok(())
}

#[tokio::test]
async fn a_participant_slower_than_the_call_deadline_is_retried() -> Result<()> {
    let c =
        Coordinator::start(&["--retry-initial-ms", "20", "--retry-max-ms", "100", "--call-timeout-ms", "200"]).await?;
    let p = TestParticipant::start().await?;
    c.register("slow", &p).await?;
    p.delay(Duration::from_millis(600));
    let t = c.begin(&["slow"], 10_000).await?;
    c.transactions()
        .await?
        .confirm(v1::ConfirmRequest { transaction_id: t.transaction_id.clone(), ..Default::default() })
        .await?;
    p.wait_for("two slow calls", |calls| calls.len() >= 2).await?;
    p.delay(Duration::ZERO);
    assert_eq!(confirm_wait(&c, &t.transaction_id).await?.state, S::Confirmed as i32);
    let g = get(&c, &t.transaction_id).await?;
    assert!(g.participants[0].attempts >= 2);
    Ok(())
}

#[tokio::test]
async fn idempotent_append_and_topic_read_back() -> Result<()> {
    let c = Coordinator::start(&[]).await?;
    let t = c.begin(&["svc"], 10_000).await?;
    let partial = t.partials[0].partial_id.clone();
    let batch: Vec<v1::Command> = (0..5).map(|i| command("svc.Cmd", &format!("k{i}"), &[i])).collect();
    let first = c.append(&partial, batch.clone(), "req-42").await?;
    let retry = c.append(&partial, batch.clone(), "req-42").await?;
    assert!(!first.duplicate && retry.duplicate);
    assert_eq!((retry.first_sequence, retry.last_sequence), (1, 5));
    let other = c.append(&partial, vec![command("svc.Cmd", "", b"z")], "").await?;
    assert_eq!(other.first_sequence, 6);
    let mut topics = c.topics().await?;
    let page1 =
        topics.read(v1::ReadRequest { partial_id: partial.clone(), from_sequence: 0, limit: 4 }).await?.into_inner();
    assert_eq!(page1.commands.iter().map(|c| c.sequence).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert_eq!((page1.next_sequence, page1.service.as_str()), (5, "svc"));
    assert_eq!(page1.transaction_id, t.transaction_id);
    let page2 =
        topics.read(v1::ReadRequest { partial_id: partial.clone(), from_sequence: 5, limit: 4 }).await?.into_inner();
    assert_eq!(page2.commands.iter().map(|c| c.sequence).collect::<Vec<_>>(), vec![5, 6]);
    assert_eq!(page2.next_sequence, 0, "end reached");
    assert_eq!(page2.commands[0].key, "k4");
    Ok(())
}

#[tokio::test]
async fn finished_transactions_are_garbage_collected() -> Result<()> {
    let mut args = FAST.to_vec();
    args.extend(["--retention-secs", "1"]);
    let c = Coordinator::start(&args).await?;
    let p = TestParticipant::start().await?;
    c.register("svc", &p).await?;
    let t = c.begin(&["svc"], 10_000).await?;
    let partial = t.partials[0].partial_id.clone();
    c.append(&partial, vec![command("svc.A", "", b"1")], "").await?;
    assert_eq!(confirm_wait(&c, &t.transaction_id).await?.state, S::Confirmed as i32);
    let kept = c.begin(&["svc"], 60_000).await?; // ACTIVE: never collected
    eventually("the finished transaction to be collected", Duration::from_secs(15), || async {
        match get(&c, &t.transaction_id).await {
            Err(s) if s.code() == Code::NotFound => Ok(Some(())),
            Ok(_) => Ok(None),
            Err(s) => Err(s.into()),
        }
    })
    .await?;
    let err = c.topics().await?.read(v1::ReadRequest { partial_id: partial, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(get(&c, &kept.transaction_id).await?.state, S::Active as i32);
    Ok(())
}

#[tokio::test]
async fn registration_lifecycle() -> Result<()> {
    let c = Coordinator::start(&["--participant", "inventory=http://127.0.0.1:9"]).await?;
    let mut reg = c.registry().await?;
    let r = reg
        .register(v1::RegisterRequest { service: "orders".into(), endpoint: "http://127.0.0.1:7001".into(), ttl_ms: 0 })
        .await?
        .into_inner();
    assert_eq!(r.ttl_ms, 30_000, "default lease");
    let list = reg.list_endpoints(v1::ListEndpointsRequest::default()).await?.into_inner().endpoints;
    let rows: Vec<(&str, &str, bool)> =
        list.iter().map(|e| (e.service.as_str(), e.endpoint.as_str(), e.from_config)).collect();
    assert_eq!(rows, vec![("inventory", "http://127.0.0.1:9", true), ("orders", "http://127.0.0.1:7001", false)]);
    assert!(list[1].expires_unix_ms > 0);
    let d = reg
        .deregister(v1::DeregisterRequest { service: "orders".into(), endpoint: "http://127.0.0.1:7001".into() })
        .await?
        .into_inner();
    assert!(d.removed);
    let only = reg.list_endpoints(v1::ListEndpointsRequest { service: "orders".into() }).await?.into_inner();
    assert!(only.endpoints.is_empty());
    for (service, endpoint, ttl) in [
        ("", "http://127.0.0.1:1", 0),
        ("a b", "http://127.0.0.1:1", 0),
        ("a", "127.0.0.1:1", 0),
        ("a", "http://127.0.0.1:1", 5),
    ] {
        let err = reg
            .register(v1::RegisterRequest { service: service.into(), endpoint: endpoint.into(), ttl_ms: ttl })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{service:?} {endpoint:?} {ttl}");
    }
    Ok(())
}

#[tokio::test]
async fn sigterm_shuts_down_gracefully_and_the_data_directory_reopens() -> Result<()> {
    let p = TestParticipant::start().await?;
    p.delay(Duration::from_millis(300));
    let mut c = Coordinator::start(FAST).await?;
    c.register("svc", &p).await?;
    let t = c.begin(&["svc"], 60_000).await?;
    // A Confirm that waits for a slow participant is in flight at SIGTERM:
    // it is answered, with the state reached so far, before the process
    // exits (hostile.rs tests the bound on shutdown).
    let mut tx = c.transactions().await?;
    let waiting = c.begin(&["svc"], 60_000).await?;
    let req =
        v1::ConfirmRequest { transaction_id: waiting.transaction_id.clone(), wait: true, wait_timeout_ms: 20_000 };
    let in_flight = tokio::spawn(async move { tx.confirm(req).await });
    p.wait_for("the commit to reach the participant", |calls| !calls.is_empty()).await?;
    let status = c.terminate().await?;
    let answered = in_flight.await?.map(|r| r.into_inner().state);
    assert_eq!(answered.map_err(|s| s.code()), Ok(S::Confirming as i32), "the in-flight request was answered");
    assert!(status.success(), "exit status {status:?}");
    assert!(c.logs().contains("coordinator stopped"));
    c.restart().await?;
    assert_eq!(get(&c, &t.transaction_id).await?.state, S::Active as i32);
    assert_eq!(confirm_wait(&c, &waiting.transaction_id).await?.state, S::Confirmed as i32);
    Ok(())
}

#[tokio::test]
async fn startup_fails_clearly_on_bad_configuration() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (status, log) = Coordinator::start_failing(dir.path(), &["--participant", "no-equals-sign"]).await?;
    assert!(!status.success());
    assert!(log.contains("SERVICE=URI"), "{log}");
    let (status, log) =
        Coordinator::start_failing(dir.path(), &["--retry-initial-ms", "500", "--retry-max-ms", "100"]).await?;
    assert!(!status.success());
    assert!(log.contains("invalid configuration") && log.contains("--retry-max-ms"), "{log}");
    // A second coordinator on the same data directory is refused, not corrupting it.
    let c = Coordinator::start(&[]).await?;
    let (status, log) = Coordinator::start_failing(c.data_dir(), &[]).await?;
    assert!(!status.success());
    assert!(log.contains("cannot open"), "{log}");
    Ok(())
}

/// Every RPC with malformed, empty, oversized, unknown or foreign input, or
/// in the wrong state: the exact status code, a message naming the problem,
/// and a server that is still healthy with its data intact afterwards.
#[tokio::test]
async fn bad_input_gets_the_right_status_and_harms_nothing() -> Result<()> {
    let c = Coordinator::start(&[]).await?;
    let good = c.begin(&["svc"], 60_000).await?;
    let gp = good.partials[0].partial_id.clone();
    c.append(&gp, vec![command("svc.Keep", "", b"safe")], "").await?;
    let confirmed = c.begin(&["other"], 60_000).await?;
    c.transactions()
        .await?
        .confirm(v1::ConfirmRequest { transaction_id: confirmed.transaction_id.clone(), ..Default::default() })
        .await?;

    let unknown = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".to_string();
    let long = "x".repeat(129);
    let mut tx = c.transactions().await?;
    let mut topics = c.topics().await?;
    let mut admin = c.admin().await?;
    let begin_req = |p: Vec<String>, t: u64| v1::BeginRequest { participants: p, timeout_ms: t };
    let cmds =
        |n: usize, size: usize| -> Vec<v1::Command> { (0..n).map(|_| command("t", "", &vec![7u8; size])).collect() };
    let app = |p: &str, cmds: Vec<v1::Command>, key: &str| v1::AppendRequest {
        partial_id: p.into(),
        commands: cmds,
        idempotency_key: key.into(),
        service: String::new(),
    };

    let mut cases: Vec<(&str, Result<(), tonic::Status>, Code, &str)> = Vec::new();
    macro_rules! case {
        ($name:expr, $call:expr, $code:expr, $msg:expr) => {
            cases.push(($name, $call.await.map(|_| ()), $code, $msg));
        };
    }
    case!("begin: no participants", tx.begin(begin_req(vec![], 0)), Code::InvalidArgument, "at least one");
    case!("begin: empty name", tx.begin(begin_req(vec!["".into()], 0)), Code::InvalidArgument, "must not be empty");
    case!("begin: name too long", tx.begin(begin_req(vec![long.clone()], 0)), Code::InvalidArgument, "limit is 128");
    case!("begin: bad characters", tx.begin(begin_req(vec!["a/b".into()], 0)), Code::InvalidArgument, "contains '/'");
    case!(
        "begin: duplicate",
        tx.begin(begin_req(vec!["a".into(), "a".into()], 0)),
        Code::InvalidArgument,
        "listed twice"
    );
    case!(
        "begin: too many",
        tx.begin(begin_req((0..33).map(|i| format!("s{i}")).collect(), 0)),
        Code::InvalidArgument,
        "limit is 32"
    );
    case!("begin: timeout too short", tx.begin(begin_req(vec!["a".into()], 1)), Code::InvalidArgument, "out of range");
    case!(
        "begin: timeout too long",
        tx.begin(begin_req(vec!["a".into()], 3_600_001)),
        Code::InvalidArgument,
        "out of range"
    );
    case!(
        "enlist: malformed id",
        tx.enlist(v1::EnlistRequest { transaction_id: "nope".into(), service: "b".into() }),
        Code::InvalidArgument,
        "not a valid id"
    );
    case!(
        "enlist: unknown id",
        tx.enlist(v1::EnlistRequest { transaction_id: unknown.clone(), service: "b".into() }),
        Code::NotFound,
        "not found"
    );
    case!(
        "enlist: bad service",
        tx.enlist(v1::EnlistRequest { transaction_id: good.transaction_id.clone(), service: "".into() }),
        Code::InvalidArgument,
        "service"
    );
    case!(
        "enlist: decided",
        tx.enlist(v1::EnlistRequest { transaction_id: confirmed.transaction_id.clone(), service: "b".into() }),
        Code::FailedPrecondition,
        "CONFIRMING"
    );
    case!(
        "confirm: empty id",
        tx.confirm(v1::ConfirmRequest::default()),
        Code::InvalidArgument,
        "transaction_id is required"
    );
    case!(
        "confirm: unknown id",
        tx.confirm(v1::ConfirmRequest { transaction_id: unknown.clone(), ..Default::default() }),
        Code::NotFound,
        "not found"
    );
    case!(
        "confirm: a partial id",
        tx.confirm(v1::ConfirmRequest { transaction_id: gp.clone(), ..Default::default() }),
        Code::NotFound,
        "not found"
    );
    case!(
        "cancel: garbage id",
        tx.cancel(v1::CancelRequest { transaction_id: "\u{0}\u{ffff}".into(), ..Default::default() }),
        Code::InvalidArgument,
        "not a valid id"
    );
    case!(
        "cancel: reason too long",
        tx.cancel(v1::CancelRequest {
            transaction_id: good.transaction_id.clone(),
            reason: "r".repeat(1025),
            ..Default::default()
        }),
        Code::InvalidArgument,
        "limit is 1024"
    );
    case!(
        "cancel: confirmed",
        tx.cancel(v1::CancelRequest { transaction_id: confirmed.transaction_id.clone(), ..Default::default() }),
        Code::FailedPrecondition,
        "CONFIRMING"
    );
    case!(
        "get: malformed",
        tx.get(v1::GetRequest { transaction_id: "1234".into() }),
        Code::InvalidArgument,
        "not a valid id"
    );
    case!("get: unknown", tx.get(v1::GetRequest { transaction_id: unknown.clone() }), Code::NotFound, "not found");
    case!("append: malformed partial", topics.append(app("zzz", cmds(1, 1), "")), Code::InvalidArgument, "partial_id");
    case!("append: unknown partial", topics.append(app(&unknown, cmds(1, 1), "")), Code::NotFound, "not found");
    case!(
        "append: a transaction id",
        topics.append(app(&good.transaction_id, cmds(1, 1), "")),
        Code::NotFound,
        "not found"
    );
    case!("append: no commands", topics.append(app(&gp, vec![], "")), Code::InvalidArgument, "at least one");
    case!(
        "append: too many commands",
        topics.append(app(&gp, cmds(1001, 0), "")),
        Code::InvalidArgument,
        "limit is 1000"
    );
    case!(
        "append: command too big",
        topics.append(app(&gp, cmds(1, (1 << 20) + 1), "")),
        Code::InvalidArgument,
        "bytes per command"
    );
    case!(
        "append: empty type",
        topics.append(app(&gp, vec![command("", "", b"")], "")),
        Code::InvalidArgument,
        "type must not be empty"
    );
    case!(
        "append: NUL in a type",
        topics.append(app(&gp, vec![command("t.\0Cmd", "", b"")], "")),
        Code::InvalidArgument,
        "commands[0].type contains a NUL character"
    );
    case!(
        "append: NUL in a key",
        topics.append(app(&gp, vec![command("t.Cmd", "k\0", b"")], "")),
        Code::InvalidArgument,
        "commands[0].key contains a NUL character"
    );
    case!(
        "append: NUL in the idempotency key",
        topics.append(app(&gp, cmds(1, 1), "k\0")),
        Code::InvalidArgument,
        "idempotency_key contains a NUL character"
    );
    case!(
        "append: key too long",
        topics.append(app(&gp, cmds(1, 1), &"k".repeat(129))),
        Code::InvalidArgument,
        "idempotency_key"
    );
    case!(
        "append: decided",
        topics.append(app(&confirmed.partials[0].partial_id, cmds(1, 1), "")),
        Code::FailedPrecondition,
        "CONFIRMING"
    );
    case!(
        "read: malformed",
        topics.read(v1::ReadRequest { partial_id: "".into(), ..Default::default() }),
        Code::InvalidArgument,
        "partial_id is required"
    );
    case!(
        "read: unknown",
        topics.read(v1::ReadRequest { partial_id: unknown.clone(), ..Default::default() }),
        Code::NotFound,
        "not found"
    );
    case!(
        "list: bad state",
        admin.list_transactions(v1::ListTransactionsRequest { states: vec![99], ..Default::default() }),
        Code::InvalidArgument,
        "not a TransactionState"
    );
    case!(
        "list: bad token",
        admin.list_transactions(v1::ListTransactionsRequest { page_token: "abc".into(), ..Default::default() }),
        Code::InvalidArgument,
        "page_token"
    );
    case!(
        "retry: active",
        admin.retry(v1::RetryRequest { transaction_id: good.transaction_id.clone() }),
        Code::FailedPrecondition,
        "ACTIVE"
    );
    case!(
        "retry: unknown",
        admin.retry(v1::RetryRequest { transaction_id: unknown.clone() }),
        Code::NotFound,
        "not found"
    );

    let mut failures = Vec::new();
    for (name, got, code, msg) in &cases {
        match got {
            Err(s) if s.code() == *code && s.message().contains(msg) => {}
            other => failures.push(format!("{name}: expected {code:?} containing {msg:?}, got {other:?}")),
        }
    }
    assert!(failures.is_empty(), "{} of {} cases wrong:\n{}", failures.len(), cases.len(), failures.join("\n"));

    // Cumulative limits: a topic's bytes, a transaction's participants.
    // The default topic limit is 3 MiB, accounted as type + key + payload +
    // 16 per command: two commands of just under 1 MiB fit, a third does not.
    for _ in 0..2 {
        c.append(&gp, cmds(1, (1 << 20) - 1), "").await?;
    }
    let err = c.append(&gp, cmds(1, (1 << 20) - 1), "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("limit is 3145728"), "{}", err.message());
    let names: Vec<String> = (0..32).map(|i| format!("s{i}")).collect();
    let wide = c.begin(&names.iter().map(|s| s.as_str()).collect::<Vec<_>>(), 0).await?;
    let err = tx
        .enlist(v1::EnlistRequest { transaction_id: wide.transaction_id, service: "one-more".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    // Still healthy, and the good transaction is intact.
    let mut health = tonic_health::pb::health_client::HealthClient::new(c.channel().await?);
    let h = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await?.into_inner();
    assert_eq!(h.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let g = get(&c, &good.transaction_id).await?;
    assert_eq!((g.state, g.participants[0].command_count), (S::Active as i32, 3));
    let first = topics.read(v1::ReadRequest { partial_id: gp, from_sequence: 1, limit: 1 }).await?.into_inner();
    assert_eq!(first.commands[0].payload, b"safe");
    Ok(())
}

/// Start-up mistakes a new user made, each answered with what to do
/// (before: "Address already in use", a layered sled error, "invalid
/// socket address syntax").
#[tokio::test]
async fn start_up_mistakes_say_what_to_do() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // The port taken, by the quickstart's coordinator say.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();
    let run = |args: Vec<String>| async move {
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(tcc_tests::binary("tcc-coordinator")).args(args).kill_on_drop(true).output(),
        )
        .await??;
        anyhow::Ok((out.status, String::from_utf8_lossy(&out.stderr).into_owned()))
    };
    let data = dir.path().join("data").to_string_lossy().into_owned();
    let (status, log) = run(vec!["--listen".into(), format!("127.0.0.1:{port}"), "--data-dir".into(), data]).await?;
    assert!(!status.success());
    assert!(log.contains("already in use") && log.contains("give --listen another port"), "{log}");
    // A data directory that is a file.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x")?;
    let file = file.to_string_lossy().into_owned();
    let (status, log) = run(vec!["--listen".into(), "127.0.0.1:0".into(), "--data-dir".into(), file]).await?;
    assert!(!status.success());
    assert!(log.contains("is a file, not a directory"), "{log}");
    // A host name: taken (before: "invalid socket address syntax").
    let c = Coordinator::start(&["--listen", "localhost:0"]).await?;
    assert!(c.addr().ip().is_loopback());
    c.begin(&["svc"], 60_000).await?;
    drop(taken);
    Ok(())
}
