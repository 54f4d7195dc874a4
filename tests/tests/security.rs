//! Security against the real binary, with certificates made in the test
//! (`tcc_demo_services::pki`): the TLS handshake refuses plaintext, an
//! unknown CA, an expired certificate and a missing one; every rule of the
//! policy both allows and denies; bearer tokens; the impostor of the
//! security review now gets nothing while the real participant gets its
//! commits; certificates, the CA and the policy change without a restart.
//! SECURITY.md lists these tests.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tcc_demo_services::pki::{Options, Pki};
use tcc_domain_sdk::tls::Tls;
use tcc_proto::v1::{
    self, admin_client::AdminClient, registry_client::RegistryClient, topics_client::TopicsClient,
    transactions_client::TransactionsClient,
};
use tcc_tests::{Coordinator, TestParticipant};
use tokio::io::AsyncBufReadExt;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

const POLICY: &str = r#"
admin = ["ops"]
max_endpoints_per_identity = 2

[composite]
shop = "own"
shop2 = "own"
backoffice = "all"
"#;

/// A coordinator on mutual TLS with a policy, and the CA of its identities.
struct Deployment {
    dir: tempfile::TempDir,
    pki: Pki,
    coordinator: Coordinator,
}

impl Deployment {
    /// Starts a coordinator with its certificate, the CA, `policy`, and
    /// `extra` flags. `prepare` runs after the CA exists, before the start.
    async fn start(policy: &str, extra: &[String]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let pki = Pki::new("test CA")?;
        Self::start_with(dir, pki, policy, extra).await
    }

    async fn start_with(dir: tempfile::TempDir, pki: Pki, policy: &str, extra: &[String]) -> Result<Self> {
        std::fs::write(dir.path().join("ca.pem"), pki.ca_pem())?;
        pki.write(dir.path(), "tcc-coordinator", &Options::default())?;
        std::fs::write(dir.path().join("policy.toml"), policy)?;
        let file = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
        let mut args = vec![
            "--tls-cert".to_string(),
            file("tcc-coordinator.pem"),
            "--tls-key".to_string(),
            file("tcc-coordinator.key"),
            "--tls-client-ca".to_string(),
            file("ca.pem"),
            "--policy".to_string(),
            file("policy.toml"),
        ];
        args.extend(extra.iter().cloned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let coordinator = Coordinator::start(&refs).await?;
        Ok(Deployment { dir, pki, coordinator })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn url(&self) -> String {
        format!("https://{}", self.coordinator.addr())
    }

    /// The TLS material of `identity` (issued on first use).
    fn tls(&self, identity: &str) -> Result<Tls> {
        let (cert, key) = (self.path(&format!("{identity}.pem")), self.path(&format!("{identity}.key")));
        if !cert.exists() {
            self.pki.write(self.dir.path(), identity, &Options::default())?;
        }
        Ok(Tls::from_files(&cert, &key, &self.path("ca.pem"))?)
    }

    /// A connection to the coordinator as `identity`.
    async fn channel(&self, identity: &str) -> Result<Channel> {
        Ok(self.tls(identity)?.endpoint(&self.url())?.connect().await?)
    }

    async fn transactions(&self, identity: &str) -> Result<TransactionsClient<Channel>> {
        Ok(TransactionsClient::new(self.channel(identity).await?))
    }
}

/// Asserts a refusal with `code` whose message holds every one of `needles`.
fn refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, needles: &[&str]) -> Status {
    match result {
        Ok(v) => panic!("expected {code:?}, got {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            for needle in needles {
                assert!(s.message().contains(needle), "{needle:?} not in {:?}", s.message());
            }
            s
        }
    }
}

/// Connecting and calling health through `endpoint`: the error, if any.
async fn health_through(endpoint: Endpoint) -> Option<String> {
    let channel = match endpoint.connect_timeout(Duration::from_secs(5)).connect().await {
        Ok(c) => c,
        Err(e) => return Some(format!("connect: {e:?}")),
    };
    let mut health = HealthClient::new(channel);
    match tokio::time::timeout(Duration::from_secs(10), health.check(HealthCheckRequest { service: String::new() }))
        .await
    {
        Ok(Ok(_)) => None,
        Ok(Err(s)) => Some(format!("{s:?}")),
        Err(_) => Some("no answer".to_string()),
    }
}

#[tokio::test]
async fn the_handshake_refuses_plaintext_unknown_ca_expired_and_missing_certificates() -> Result<()> {
    let d = Deployment::start(POLICY, &[]).await?;
    let url = d.url();
    let client = |cert: &str, key: &str| {
        ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(d.pki.ca_pem()))
            .identity(tonic::transport::Identity::from_pem(cert, key))
    };

    // Plaintext to the TLS port.
    let plain = Endpoint::from_shared(format!("http://{}", d.coordinator.addr()))?;
    assert!(health_through(plain).await.is_some(), "plaintext was served");
    // No client certificate.
    let anonymous = ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(d.pki.ca_pem()));
    assert!(health_through(Endpoint::from_shared(url.clone())?.tls_config(anonymous)?).await.is_some());
    // A certificate from another CA, naming a real composite.
    let rogue = Pki::new("rogue CA")?.issue("shop", &Options::default())?;
    let err = health_through(Endpoint::from_shared(url.clone())?.tls_config(client(&rogue.cert, &rogue.key))?).await;
    assert!(err.is_some(), "a certificate from an unknown CA was accepted");
    // An expired certificate from the right CA.
    let old = d.pki.issue("shop", &Options { expired: true, ..Options::default() })?;
    let err = health_through(Endpoint::from_shared(url.clone())?.tls_config(client(&old.cert, &old.key))?).await;
    assert!(err.is_some(), "an expired certificate was accepted");

    // The right certificate works, and the refusals left the server well.
    let ok = d.pki.issue("shop", &Options::default())?;
    assert_eq!(health_through(Endpoint::from_shared(url.clone())?.tls_config(client(&ok.cert, &ok.key))?).await, None);
    let logs = d.coordinator.logs();
    assert!(logs.matches("TLS handshake failed").count() >= 3, "{logs}");
    // The first of them at WARN, with its reason (before: DEBUG only).
    let warned = logs.lines().find(|l| l.contains("WARN") && l.contains("TLS handshake failed"));
    assert!(warned.is_some_and(|l| l.contains("cause=")), "no WARN with the reason:\n{logs}");
    assert!(logs.contains("UnknownIssuer") || logs.contains("unknown issuer"), "{logs}");
    assert!(logs.contains("Expired") || logs.contains("expired"), "{logs}");
    Ok(())
}

#[tokio::test]
async fn every_rule_is_both_allowed_and_denied() -> Result<()> {
    let d = Deployment::start(POLICY, &[]).await?;
    let begin = |id: &'static str| {
        let d = &d;
        async move {
            let req = v1::BeginRequest { participants: vec!["orders".into(), "customers".into()], timeout_ms: 0 };
            d.transactions(id).await.unwrap().begin(req).await.map(|r| r.into_inner())
        }
    };
    let get = |id: &'static str, txn: String| {
        let d = &d;
        async move { d.transactions(id).await.unwrap().get(v1::GetRequest { transaction_id: txn }).await }
    };

    // Begin: composites only.
    let t = begin("shop").await?;
    let (txn, p_orders) = (t.transaction_id.clone(), t.partials[0].partial_id.clone());
    refused(begin("orders").await, Code::PermissionDenied, &["\"orders\"", "not a composite"]);
    refused(begin("ops").await, Code::PermissionDenied, &["\"ops\""]);
    // A certificate naming its identity by Common Name only works too.
    let cn = d.pki.issue("shop", &Options { common_name_only: true, ..Options::default() })?;
    let cn = Tls::from_pem(&cn.cert, &cn.key, d.pki.ca_pem()).endpoint(&d.url())?.connect().await?;
    TransactionsClient::new(cn)
        .begin(v1::BeginRequest { participants: vec!["orders".into()], timeout_ms: 0 })
        .await
        .context("a Common Name identity")?;

    // Get: its composite, a composite with scope all, an admin.
    for id in ["shop", "backoffice", "ops"] {
        get(id, txn.clone()).await.with_context(|| format!("{id} reads"))?;
    }
    // Anyone else learns nothing of it, not even that it exists: the same
    // answer as for an id never begun.
    let never = uuid::Uuid::now_v7().to_string();
    let unknown = refused(get("shop2", never.clone()).await, Code::NotFound, &[]);
    let hidden = |id: &str| unknown.message().replace(&never, id);
    for stranger in ["shop2", "orders"] {
        let s = refused(get(stranger, txn.clone()).await, Code::NotFound, &[]);
        assert_eq!(s.message(), hidden(&txn), "{stranger}");
    }

    // Enlist (drive): its composite or one with scope all; not an admin.
    let enlist = |id: &'static str, service: &str| {
        let (d, txn, service) = (&d, txn.clone(), service.to_string());
        async move { d.transactions(id).await.unwrap().enlist(v1::EnlistRequest { transaction_id: txn, service }).await }
    };
    enlist("shop", "inventory").await?;
    enlist("backoffice", "inventory").await?;
    refused(enlist("shop2", "inventory").await, Code::NotFound, &[&hidden(&txn)]);
    refused(enlist("ops", "inventory").await, Code::PermissionDenied, &["only the composite that began"]);

    // Append and Read: the partial's own service (Read: an admin too).
    let append = |id: &'static str, partial: String| {
        let d = &d;
        async move {
            let cmd =
                v1::Command { r#type: "orders.Create".into(), key: "o1".into(), payload: b"{\"qty\":2}".to_vec() };
            let req = v1::AppendRequest { partial_id: partial, commands: vec![cmd], ..Default::default() };
            TopicsClient::new(d.channel(id).await.unwrap()).append(req).await
        }
    };
    append("orders", p_orders.clone()).await?;
    // Another service's partial is answered as one that does not exist.
    let no_partial = format!("partial transaction {p_orders} not found");
    refused(append("customers", p_orders.clone()).await, Code::NotFound, &[&no_partial]);
    refused(append("shop", p_orders.clone()).await, Code::NotFound, &[&no_partial]);
    let read = |id: &'static str| {
        let (d, partial) = (&d, p_orders.clone());
        async move {
            let req = v1::ReadRequest { partial_id: partial, ..Default::default() };
            TopicsClient::new(d.channel(id).await.unwrap()).read(req).await
        }
    };
    assert_eq!(read("orders").await?.into_inner().commands.len(), 1);
    assert_eq!(read("ops").await?.into_inner().commands.len(), 1);
    refused(read("customers").await, Code::NotFound, &[&no_partial]);

    // Confirm: its composite only; Cancel: its composite or an admin.
    let confirm = |id: &'static str, txn: String| {
        let d = &d;
        async move {
            d.transactions(id)
                .await
                .unwrap()
                .confirm(v1::ConfirmRequest { transaction_id: txn, ..Default::default() })
                .await
        }
    };
    let cancel = |id: &'static str, txn: String| {
        let d = &d;
        async move {
            d.transactions(id)
                .await
                .unwrap()
                .cancel(v1::CancelRequest { transaction_id: txn, ..Default::default() })
                .await
        }
    };
    refused(confirm("shop2", txn.clone()).await, Code::NotFound, &[&hidden(&txn)]);
    refused(confirm("ops", txn.clone()).await, Code::PermissionDenied, &["\"ops\""]);
    refused(cancel("orders", txn.clone()).await, Code::NotFound, &[&hidden(&txn)]);
    let t2 = begin("shop").await?;
    refused(cancel("shop2", t2.transaction_id.clone()).await, Code::NotFound, &[&hidden(&t2.transaction_id)]);
    assert_eq!(
        cancel("ops", t2.transaction_id.clone()).await?.into_inner().state,
        v1::TransactionState::Cancelling as i32
    );
    assert_eq!(confirm("shop", txn.clone()).await?.into_inner().state, v1::TransactionState::Confirming as i32);

    // Registry: a service registers its own name only, within its quota,
    // https only; deregisters its own (an admin any); listing is for admins.
    let registry = |id: &'static str| {
        let d = &d;
        async move { RegistryClient::new(d.channel(id).await.unwrap()) }
    };
    let reg = |service: &str, endpoint: &str| v1::RegisterRequest {
        service: service.into(),
        endpoint: endpoint.into(),
        ttl_ms: 60_000,
    };
    registry("orders").await.register(reg("orders", "https://127.0.0.1:1")).await?;
    registry("orders").await.register(reg("orders", "https://127.0.0.1:1")).await.context("renewal")?;
    refused(
        registry("orders").await.register(reg("customers", "https://127.0.0.1:9")).await,
        Code::PermissionDenied,
        &["\"orders\"", "service \"customers\""],
    );
    registry("orders").await.register(reg("orders", "https://127.0.0.1:2")).await?;
    refused(
        registry("orders").await.register(reg("orders", "https://127.0.0.1:3")).await,
        Code::ResourceExhausted,
        &["\"orders\"", "quota is 2"],
    );
    registry("customers").await.register(reg("customers", "https://127.0.0.1:4")).await.context("others keep room")?;
    refused(
        registry("customers").await.register(reg("customers", "http://127.0.0.1:5")).await,
        Code::InvalidArgument,
        &["https://"],
    );
    let dereg =
        |service: &str| v1::DeregisterRequest { service: service.into(), endpoint: "https://127.0.0.1:1".into() };
    refused(registry("customers").await.deregister(dereg("orders")).await, Code::PermissionDenied, &["\"customers\""]);
    assert!(registry("ops").await.deregister(dereg("orders")).await?.into_inner().removed);
    let listed = registry("ops").await.list_endpoints(v1::ListEndpointsRequest::default()).await?.into_inner();
    assert_eq!(listed.endpoints.len(), 2, "{listed:?}");
    refused(
        registry("orders").await.list_endpoints(v1::ListEndpointsRequest::default()).await,
        Code::PermissionDenied,
        &["\"orders\"", "admin"],
    );

    // Admin: admins only.
    let admin = |id: &'static str| {
        let d = &d;
        async move { AdminClient::new(d.channel(id).await.unwrap()) }
    };
    let all = admin("ops").await.list_transactions(v1::ListTransactionsRequest::default()).await?.into_inner();
    assert_eq!(all.transactions.len(), 3);
    refused(
        admin("shop").await.list_transactions(v1::ListTransactionsRequest::default()).await,
        Code::PermissionDenied,
        &["\"shop\"", "Admin.ListTransactions", "admin"],
    );
    refused(
        admin("orders").await.retry(v1::RetryRequest { transaction_id: txn.clone() }).await,
        Code::PermissionDenied,
        &["\"orders\""],
    );
    refused(
        admin("shop").await.deliver_now(v1::DeliverNowRequest { transaction_id: txn.clone() }).await,
        Code::PermissionDenied,
        &["\"shop\"", "Admin.DeliverNow"],
    );
    let resolve = v1::ResolveRequest { transaction_id: txn.clone(), service: "orders".into(), reason: "x".into() };
    refused(admin("orders").await.resolve(resolve).await, Code::PermissionDenied, &["Admin.Resolve"]);
    refused(
        admin("orders").await.watch(v1::WatchRequest::default()).await.map(|_| ()),
        Code::PermissionDenied,
        &["Admin.Watch"],
    );
    // Past the policy, the state decides.
    refused(
        admin("ops").await.retry(v1::RetryRequest { transaction_id: txn.clone() }).await,
        Code::FailedPrecondition,
        &[],
    );

    // Health stays open to every identity.
    let health = HealthClient::new(d.channel("orders").await?).check(HealthCheckRequest::default()).await?;
    assert_eq!(health.into_inner().status, ServingStatus::Serving as i32);

    // Every refusal is logged with the identity and the RPC.
    let logs = d.coordinator.logs();
    assert!(logs.contains("request refused"), "{logs}");
    assert!(logs.contains("identity=\"shop2\"") && logs.contains("rpc=\"Transactions.Get\""), "{logs}");
    assert!(logs.contains("code=\"quota\""), "{logs}");
    Ok(())
}

/// Adds `authorization: Bearer TOKEN` to every call.
fn bearer(
    channel: Channel,
    token: &str,
) -> TransactionsClient<tonic::service::interceptor::InterceptedService<Channel, impl tonic::service::Interceptor>> {
    let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    TransactionsClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", value.clone());
        Ok(r)
    })
}

#[tokio::test]
async fn bearer_tokens_identify_callers_behind_a_tls_proxy_and_the_policy_reloads() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (policy, tokens) = (dir.path().join("policy.toml"), dir.path().join("tokens"));
    std::fs::write(&policy, "admin = [\"ops\"]\n[composite]\nshop = \"own\"\n")?;
    std::fs::write(&tokens, "# identity token\nshop s3cret-shop-0123456789\norders s3cret-orders-0123456789\n")?;
    let c = Coordinator::start(&["--policy", &policy.to_string_lossy(), "--tokens", &tokens.to_string_lossy()]).await?;
    let begin = v1::BeginRequest { participants: vec!["orders".into()], timeout_ms: 0 };

    refused(
        TransactionsClient::new(c.channel().await?).begin(begin.clone()).await,
        Code::Unauthenticated,
        &["tcc.v1.Transactions/Begin", "Bearer"],
    );
    refused(
        bearer(c.channel().await?, "s3cret-shop-0123456780").begin(begin.clone()).await,
        Code::Unauthenticated,
        &["tokens file"],
    );
    bearer(c.channel().await?, "s3cret-shop-0123456789").begin(begin.clone()).await?;
    refused(
        bearer(c.channel().await?, "s3cret-orders-0123456789").begin(begin.clone()).await,
        Code::PermissionDenied,
        &["\"orders\""],
    );
    // Health needs no identity.
    HealthClient::new(c.channel().await?).check(HealthCheckRequest::default()).await?;

    // The policy is read again when it changes: orders becomes a composite.
    std::fs::write(&policy, "admin = [\"ops\"]\n[composite]\nshop = \"own\"\norders = \"own\"\n")?;
    let mut allowed = false;
    for _ in 0..100 {
        if bearer(c.channel().await?, "s3cret-orders-0123456789").begin(begin.clone()).await.is_ok() {
            allowed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(allowed, "the new policy was not applied; logs:\n{}", c.logs());
    assert!(c.logs().contains("policy reloaded"));
    Ok(())
}

#[tokio::test]
async fn the_impostor_of_the_review_gets_nothing_and_the_real_participant_gets_every_commit() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new("test CA")?;
    let server = |identity: &str| -> Result<tonic::transport::ServerTlsConfig> {
        let issued = pki.issue(identity, &Options::default())?;
        Ok(tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(issued.cert, issued.key))
            .client_ca_root(tonic::transport::Certificate::from_pem(pki.ca_pem())))
    };
    let real = TestParticipant::start_tls(server("orders")?).await?;
    // Mallory holds a certificate of the CA (it is a service of the
    // deployment) and has taken over an address configured for orders.
    let mallory = TestParticipant::start_tls(server("mallory")?).await?;
    let hijacked = format!("orders={}", mallory.url());
    let d = Deployment::start_with(dir, pki, POLICY, &["--participant".into(), hijacked]).await?;

    let mut registry = RegistryClient::new(d.channel("orders").await?);
    registry.register(v1::RegisterRequest { service: "orders".into(), endpoint: real.url(), ttl_ms: 60_000 }).await?;
    // The attack of the review: deregister the real instance, register
    // one's own under its name. Both refused now.
    let mut as_mallory = RegistryClient::new(d.channel("mallory").await?);
    refused(
        as_mallory.deregister(v1::DeregisterRequest { service: "orders".into(), endpoint: real.url() }).await,
        Code::PermissionDenied,
        &["\"mallory\""],
    );
    refused(
        as_mallory
            .register(v1::RegisterRequest { service: "orders".into(), endpoint: mallory.url(), ttl_ms: 60_000 })
            .await,
        Code::PermissionDenied,
        &["\"mallory\""],
    );
    refused(
        AdminClient::new(d.channel("mallory").await?).list_transactions(v1::ListTransactionsRequest::default()).await,
        Code::PermissionDenied,
        &[],
    );

    let mut tx = d.transactions("shop").await?;
    let mut topics = TopicsClient::new(d.channel("orders").await?);
    const N: usize = 12;
    for i in 0..N {
        let t = tx.begin(v1::BeginRequest { participants: vec!["orders".into()], timeout_ms: 0 }).await?.into_inner();
        let cmd = v1::Command {
            r#type: "orders.Create".into(),
            key: format!("o{i}"),
            payload: format!("{{\"n\":{i}}}").into_bytes(),
        };
        topics
            .append(v1::AppendRequest {
                partial_id: t.partials[0].partial_id.clone(),
                commands: vec![cmd],
                ..Default::default()
            })
            .await?;
        let done = tx
            .confirm(v1::ConfirmRequest { transaction_id: t.transaction_id, wait: true, wait_timeout_ms: 30_000 })
            .await?
            .into_inner();
        assert_eq!(done.state, v1::TransactionState::Confirmed as i32, "{done:?}");
    }
    let calls = real.calls();
    assert_eq!(calls.iter().filter(|c| c.kind == "commit" && c.acked).count(), N, "{calls:?}");
    assert!(calls.iter().all(|c| c.commands.len() == 1 && c.commands[0].payload.starts_with(b"{\"n\":")));
    assert!(mallory.calls().is_empty(), "the impostor received {:?}", mallory.calls());
    assert!(d.coordinator.logs().contains("belongs to another service"), "{}", d.coordinator.logs());
    Ok(())
}

/// Waits (up to 20 s) until `f` succeeds.
async fn eventually<F, Fut>(what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut last = None;
    for _ in 0..200 {
        match f().await {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what} did not happen within 20 s: {last:?}")
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[tokio::test]
async fn certificates_and_the_ca_rotate_without_a_restart() -> Result<()> {
    let d = Deployment::start(POLICY, &[]).await?;
    let pid = d.coordinator.pid();
    let begin = v1::BeginRequest { participants: vec!["orders".into()], timeout_ms: 0 };
    // A client of a new CA, trusting only the new CA.
    let ca2 = Pki::new("test CA 2")?;
    let shop2 = ca2.issue("shop", &Options::default())?;
    let new_client = Tls::from_pem(&shop2.cert, &shop2.key, ca2.ca_pem());
    let try_new = || {
        let (endpoint, begin) = (new_client.endpoint(&d.url()), begin.clone());
        async move {
            let channel = endpoint?.connect().await?;
            TransactionsClient::new(channel).begin(begin).await?;
            Ok(())
        }
    };
    assert!(try_new().await.is_err(), "a client of an unknown CA got in");

    // A broken file is not loaded: the old certificate keeps serving.
    write_atomically(&d.path("tcc-coordinator.pem"), "-----BEGIN CERTIFICATE-----\ngarbage\n")?;
    eventually("the failed reload is logged", || {
        let logs = d.coordinator.logs();
        async move { if logs.contains("cannot reload the TLS certificates") { Ok(()) } else { bail!("not yet") } }
    })
    .await?;
    d.transactions("shop").await?.begin(begin.clone()).await.context("still serving the old certificate")?;

    // The new CA signs the coordinator's certificate, and is trusted beside
    // the old one: the new client gets in, with no restart.
    let server = ca2.issue("tcc-coordinator", &Options::default())?;
    write_atomically(&d.path("tcc-coordinator.key"), &server.key)?;
    write_atomically(&d.path("tcc-coordinator.pem"), &server.cert)?;
    write_atomically(&d.path("ca.pem"), &format!("{}{}", d.pki.ca_pem(), ca2.ca_pem()))?;
    eventually("the new CA's client is served", try_new).await?;
    assert!(d.coordinator.logs().contains("TLS certificates reloaded"));
    assert_eq!(d.coordinator.pid(), pid, "the coordinator restarted");
    // A client that trusts only the old CA no longer accepts the server.
    let shop = d.tls("shop")?;
    drop(shop);
    let old_only =
        Tls::from_pem(std::fs::read(d.path("shop.pem"))?, std::fs::read(d.path("shop.key"))?, d.pki.ca_pem());
    assert!(old_only.endpoint(&d.url())?.connect().await.is_err(), "the old server certificate is still served");
    Ok(())
}

#[tokio::test]
async fn plaintext_beyond_loopback_is_refused_before_binding() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(tcc_tests::binary("tcc-coordinator"))
            .args(["--listen", "0.0.0.0:0", "--data-dir"])
            .arg(&data)
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(log.contains("not a loopback address") && log.contains("--insecure"), "{log}");
    assert!(!data.exists(), "the data directory was created");
    Ok(())
}

/// The review's accident: TLS on a non-loopback address, no policy. It
/// would have served open access to anyone who could connect (an
/// anonymous client registered as `orders` and got its commits); it exits
/// before binding or creating anything, naming `--policy` and the opt-in.
/// With `--allow-open-access` it starts, and says so loudly.
#[tokio::test]
async fn open_access_beyond_loopback_needs_a_policy_or_an_explicit_opt_in() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new("test CA")?;
    pki.write(dir.path(), "tcc-coordinator", &Options::default())?;
    let data = dir.path().join("data");
    let cert = dir.path().join("tcc-coordinator.pem");
    let key = dir.path().join("tcc-coordinator.key");
    let run = |extra: &[&str]| {
        let mut cmd = tokio::process::Command::new(tcc_tests::binary("tcc-coordinator"));
        cmd.args(["--listen", "0.0.0.0:0", "--data-dir"])
            .arg(&data)
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .args(extra)
            .kill_on_drop(true);
        cmd
    };
    let out = tokio::time::timeout(Duration::from_secs(30), run(&[]).output()).await??;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started open beyond loopback:\n{log}");
    assert!(log.contains("--policy") && log.contains("--allow-open-access"), "{log}");
    assert!(!data.exists(), "the data directory was created");

    // Deliberately open: it starts, with a warning that says what it means.
    let mut child = run(&["--allow-open-access"]).stderr(std::process::Stdio::piped()).spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let warned = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("OPEN ACCESS beyond loopback") && line.contains("WARN") {
                return Ok::<_, anyhow::Error>(true);
            }
        }
        Ok(false)
    })
    .await??;
    child.kill().await?;
    assert!(warned, "no warning about open access");
    Ok(())
}

/// The certificates SECURITY.md tells an operator to make with openssl
/// (`coordinator/ops/make-certs.sh`, run here as it is) work for the
/// coordinator, a composite and an admin, by IP and by name. A plain
/// `openssl x509 -req` certificate (X.509 v1, no extensions), which a new
/// user made when the documentation did not say what a certificate must
/// hold, stops the start with a message that says what to make instead.
#[tokio::test]
async fn openssl_certificates_made_as_documented_work_and_a_v1_one_is_refused_saying_why() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../coordinator/ops/make-certs.sh");
    let made = std::process::Command::new("sh")
        .arg(&script)
        .arg(dir.path())
        .args(["example.org", "tcc-coordinator", "shop", "ops"])
        .output()?;
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    std::fs::write(dir.path().join("policy.toml"), POLICY)?;
    let file = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let args = [
        "--tls-cert",
        &file("tcc-coordinator.pem"),
        "--tls-key",
        &file("tcc-coordinator.key"),
        "--tls-client-ca",
        &file("ca.pem"),
        "--policy",
        &file("policy.toml"),
    ];
    let c = Coordinator::start_logged(&args, "info").await?;
    let client = |id: &str| {
        let path = |name: String| dir.path().join(name);
        Tls::from_files(&path(format!("{id}.pem")), &path(format!("{id}.key")), &path("ca.pem".into()))
    };
    for url in [format!("https://{}", c.addr()), format!("https://localhost:{}", c.addr().port())] {
        let shop = client("shop")?.endpoint(&url)?.connect().await.with_context(|| format!("shop to {url}"))?;
        let t = TransactionsClient::new(shop)
            .begin(v1::BeginRequest { participants: vec!["orders".into()], timeout_ms: 0 })
            .await?
            .into_inner();
        let ops = client("ops")?.endpoint(&url)?.connect().await?;
        AdminClient::new(ops).list_transactions(v1::ListTransactionsRequest::default()).await?;
        assert!(!t.transaction_id.is_empty());
    }

    // A v1 certificate (no extensions) as the coordinator's own, from the
    // same CA, as a new user made it.
    let run = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("openssl").current_dir(dir.path()).args(args).output()?;
        anyhow::ensure!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    run(
        &[&["req", "-new"][..], &ec, &["-subj", "/CN=tcc-coordinator", "-keyout", "v1.key", "-out", "v1.csr"]].concat()
    )?;
    run(&["x509", "-req", "-in", "v1.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "v1.pem"])?;
    let v1_args = [
        "--tls-cert",
        &file("v1.pem"),
        "--tls-key",
        &file("v1.key"),
        "--tls-client-ca",
        &file("ca.pem"),
        "--policy",
        &file("policy.toml"),
    ];
    let (status, log) = Coordinator::start_failing(&dir.path().join("v1-data"), &v1_args).await?;
    assert!(!status.success(), "started with a v1 certificate:\n{log}");
    assert!(log.contains("X.509 v1") && log.contains("make-certs.sh"), "{log}");
    Ok(())
}

/// Under a policy, an anonymous request is refused before its body is
/// read: a Begin with no identity whose request stream never ends is
/// UNAUTHENTICATED at once, not held until the body timeout (60 s here).
#[tokio::test]
async fn under_a_policy_an_anonymous_request_is_refused_before_its_body_is_read() -> Result<()> {
    use futures::StreamExt;
    let dir = tempfile::tempdir()?;
    let (policy, tokens) = (dir.path().join("policy.toml"), dir.path().join("tokens"));
    std::fs::write(&policy, "[composite]\nshop = \"own\"\n")?;
    std::fs::write(&tokens, "shop s3cret-shop-0123456789\n")?;
    let (policy, tokens) = (policy.to_string_lossy().into_owned(), tokens.to_string_lossy().into_owned());
    let c = Coordinator::start(&["--policy", &policy, "--tokens", &tokens, "--body-timeout-ms", "60000"]).await?;
    let mut grpc = tonic::client::Grpc::new(c.channel().await?);
    grpc.ready().await?;
    let request = v1::BeginRequest { participants: vec!["orders".into()], timeout_ms: 0 };
    let never_ending = futures::stream::once(async move { request }).chain(futures::stream::pending());
    let codec = tonic_prost::ProstCodec::<v1::BeginRequest, v1::BeginResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/tcc.v1.Transactions/Begin");
    let started = std::time::Instant::now();
    let call = grpc.client_streaming(tonic::Request::new(never_ending), path, codec);
    let answer = tokio::time::timeout(Duration::from_secs(30), call).await.context("held, not refused")?;
    refused(answer, Code::Unauthenticated, &["tcc.v1.Transactions/Begin", "no identity"]);
    assert!(started.elapsed() < Duration::from_secs(10), "refused after {:?}", started.elapsed());
    assert!(c.logs().contains("request refused"), "logged as every refusal:\n{}", c.logs());
    Ok(())
}
