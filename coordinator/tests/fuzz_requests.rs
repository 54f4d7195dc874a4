//! Property tests of request decoding and validation: sequences of requests
//! with hostile fields (ids valid, unknown or malformed, names empty, huge
//! or odd, numbers at their extremes), and arbitrary bytes decoded as each
//! request message, all through the real API services over an engine. No
//! panic, and no answer outside the codes a bad request may get: INTERNAL
//! (the store failed), UNKNOWN and DATA_LOSS never come from input.
//!
//! `cargo test` runs a short run; `PROPTEST_CASES=20000 cargo test -p
//! tcc-coordinator --test fuzz_requests` a longer one.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use prost::Message;
use tcc_coordinator::api::{admin::AdminApi, registry::RegistryApi, topics::TopicsApi, transactions::TransactionsApi};
use tcc_coordinator::auth::Access;
use tcc_coordinator::clock::{OsEntropy, SystemClock};
use tcc_coordinator::config::Config;
use tcc_coordinator::delivery::registry::Registry;
use tcc_coordinator::engine::Engine;
use tcc_coordinator::store::Store;
use tcc_coordinator::store::memory::MemStore;
use tcc_proto::v1::{
    self, admin_server::Admin, registry_server::Registry as _, topics_server::Topics, transactions_server::Transactions,
};
use tonic::{Code, Request};

/// A string field: one of the ids handed out so far, or hostile text.
#[derive(Clone, Debug)]
enum Text {
    Known(usize),
    KnownPartial(usize),
    Any(String),
}

fn text() -> impl Strategy<Value = Text> {
    prop_oneof![
        any::<usize>().prop_map(Text::Known),
        any::<usize>().prop_map(Text::KnownPartial),
        "\\PC{0,40}".prop_map(Text::Any),
        "[a-z0-9._-]{1,10}".prop_map(Text::Any),
        Just(Text::Any(String::new())),
        Just(Text::Any("x".repeat(5000))),
        Just(Text::Any("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into())),
        Just(Text::Any("http://127.0.0.1:1".into())),
    ]
}

fn number() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0), Just(1), Just(u64::MAX), Just(i64::MAX as u64), 0u64..100_000, any::<u64>()]
}

#[derive(Clone, Debug)]
enum Op {
    Begin(Vec<Text>, u64),
    Enlist(Text, Text),
    Append(Text, Vec<(Text, Text, Vec<u8>)>, Text, Text),
    Read(Text, u64, u32),
    Confirm(Text, u64),
    Cancel(Text, Text, u64),
    Get(Text),
    List(Vec<i32>, u64, u32, Text),
    Retry(Text),
    Register(Text, Text, u64),
    Deregister(Text, Text),
    Endpoints(Text),
    /// Arbitrary bytes decoded as the request of method `n`.
    Bytes(u8, Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (proptest::collection::vec(text(), 0..4), number()).prop_map(|(p, t)| Op::Begin(p, t)),
        (text(), text()).prop_map(|(a, b)| Op::Enlist(a, b)),
        (
            text(),
            proptest::collection::vec((text(), text(), proptest::collection::vec(any::<u8>(), 0..64)), 0..4),
            text(),
            text()
        )
            .prop_map(|(p, c, k, s)| Op::Append(p, c, k, s)),
        (text(), number(), any::<u32>()).prop_map(|(p, f, l)| Op::Read(p, f, l)),
        (text(), number()).prop_map(|(t, w)| Op::Confirm(t, w)),
        (text(), text(), number()).prop_map(|(t, r, w)| Op::Cancel(t, r, w)),
        text().prop_map(Op::Get),
        (proptest::collection::vec(any::<i32>(), 0..3), number(), any::<u32>(), text())
            .prop_map(|(s, a, p, t)| Op::List(s, a, p, t)),
        text().prop_map(Op::Retry),
        (text(), text(), number()).prop_map(|(s, e, t)| Op::Register(s, e, t)),
        (text(), text()).prop_map(|(s, e)| Op::Deregister(s, e)),
        text().prop_map(Op::Endpoints),
        (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..200)).prop_map(|(n, b)| Op::Bytes(n, b)),
    ]
}

struct Services {
    transactions: TransactionsApi,
    topics: TopicsApi,
    admin: AdminApi,
    registry: RegistryApi,
    txns: Vec<String>,
    partials: Vec<String>,
}

impl Services {
    fn new() -> Self {
        let config = Config::default();
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let clock = Arc::new(SystemClock);
        let (engine, _decided) =
            Engine::new(store.clone(), clock.clone(), Arc::new(OsEntropy), config.limits.clone(), config.retention());
        let registry = Arc::new(Registry::new(&[], Duration::from_millis(100), None, store, clock.clone()).unwrap());
        let transport = Arc::new(tcc_coordinator::delivery::transport::GrpcTransport::new(registry.clone()));
        let delivery = tcc_coordinator::delivery::Delivery::new(
            engine.clone(),
            transport,
            Arc::new(OsEntropy),
            config.delivery.clone(),
            tokio_util::sync::CancellationToken::new(),
        );
        Services {
            transactions: TransactionsApi::new(engine.clone(), Arc::new(Access::open())),
            topics: TopicsApi::new(engine.clone(), Arc::new(Access::open())),
            admin: AdminApi::new(engine, delivery, Arc::new(Access::open())),
            registry: RegistryApi::new(registry, clock, Arc::new(Access::open())),
            txns: Vec::new(),
            partials: Vec::new(),
        }
    }

    fn text(&self, t: &Text) -> String {
        let pick =
            |ids: &Vec<String>, i: usize| if ids.is_empty() { String::new() } else { ids[i % ids.len()].clone() };
        match t {
            Text::Known(i) => pick(&self.txns, *i),
            Text::KnownPartial(i) => pick(&self.partials, *i),
            Text::Any(s) => s.clone(),
        }
    }

    /// Runs one request; the status code if it was refused.
    async fn run(&mut self, op: &Op) -> Option<Code> {
        let t = |x: &Text| self.text(x);
        let result: Result<(), tonic::Status> = match op {
            Op::Begin(p, timeout) => {
                let req = v1::BeginRequest { participants: p.iter().map(t).collect(), timeout_ms: *timeout };
                match self.transactions.begin(Request::new(req)).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        self.txns.push(r.transaction_id);
                        self.partials.extend(r.partials.into_iter().map(|p| p.partial_id));
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Op::Enlist(id, s) => {
                let req = v1::EnlistRequest { transaction_id: t(id), service: t(s) };
                self.transactions.enlist(Request::new(req)).await.map(|r| self.partials.push(r.into_inner().partial_id))
            }
            Op::Append(p, cmds, key, service) => {
                let commands = cmds
                    .iter()
                    .map(|(ty, k, payload)| v1::Command { r#type: t(ty), key: t(k), payload: payload.clone() })
                    .collect();
                let req =
                    v1::AppendRequest { partial_id: t(p), commands, idempotency_key: t(key), service: t(service) };
                self.topics.append(Request::new(req)).await.map(|_| ())
            }
            Op::Read(p, from, limit) => {
                let req = v1::ReadRequest { partial_id: t(p), from_sequence: *from, limit: *limit };
                self.topics.read(Request::new(req)).await.map(|_| ())
            }
            Op::Confirm(id, wait) => {
                // A short wait at most: nothing delivers here.
                let req = v1::ConfirmRequest { transaction_id: t(id), wait: *wait % 2 == 1, wait_timeout_ms: 1 };
                self.transactions.confirm(Request::new(req)).await.map(|_| ())
            }
            Op::Cancel(id, reason, wait) => {
                let req = v1::CancelRequest {
                    transaction_id: t(id),
                    reason: t(reason),
                    wait: *wait % 2 == 1,
                    wait_timeout_ms: 1,
                };
                self.transactions.cancel(Request::new(req)).await.map(|_| ())
            }
            Op::Get(id) => {
                self.transactions.get(Request::new(v1::GetRequest { transaction_id: t(id) })).await.map(|_| ())
            }
            Op::List(states, age, page, token) => {
                let req = v1::ListTransactionsRequest {
                    states: states.clone(),
                    min_age_ms: *age,
                    page_size: *page,
                    page_token: t(token),
                };
                self.admin.list_transactions(Request::new(req)).await.map(|_| ())
            }
            Op::Retry(id) => {
                self.admin.retry(Request::new(v1::RetryRequest { transaction_id: t(id) })).await.map(|_| ())
            }
            Op::Register(s, e, ttl) => {
                let req = v1::RegisterRequest { service: t(s), endpoint: t(e), ttl_ms: *ttl };
                self.registry.register(Request::new(req)).await.map(|_| ())
            }
            Op::Deregister(s, e) => {
                let req = v1::DeregisterRequest { service: t(s), endpoint: t(e) };
                self.registry.deregister(Request::new(req)).await.map(|_| ())
            }
            Op::Endpoints(s) => {
                self.registry.list_endpoints(Request::new(v1::ListEndpointsRequest { service: t(s) })).await.map(|_| ())
            }
            Op::Bytes(n, bytes) => self.decoded(*n, bytes).await,
        };
        result.err().map(|s| s.code())
    }

    /// Arbitrary bytes as a request: what does not decode is the codec's
    /// INVALID_ARGUMENT (tested end to end in tests/hostile.rs); what
    /// does goes through the service.
    async fn decoded(&mut self, n: u8, bytes: &[u8]) -> Result<(), tonic::Status> {
        let bad = |e: prost::DecodeError| tonic::Status::invalid_argument(e.to_string());
        match n % 11 {
            0 => self.transactions.begin(Request::new(v1::BeginRequest::decode(bytes).map_err(bad)?)).await.map(|_| ()),
            1 => {
                self.transactions.enlist(Request::new(v1::EnlistRequest::decode(bytes).map_err(bad)?)).await.map(|_| ())
            }
            2 => self.topics.append(Request::new(v1::AppendRequest::decode(bytes).map_err(bad)?)).await.map(|_| ()),
            3 => self.topics.read(Request::new(v1::ReadRequest::decode(bytes).map_err(bad)?)).await.map(|_| ()),
            4 => {
                let mut req = v1::ConfirmRequest::decode(bytes).map_err(bad)?;
                req.wait_timeout_ms = req.wait_timeout_ms.min(1);
                self.transactions.confirm(Request::new(req)).await.map(|_| ())
            }
            5 => {
                let mut req = v1::CancelRequest::decode(bytes).map_err(bad)?;
                req.wait_timeout_ms = req.wait_timeout_ms.min(1);
                self.transactions.cancel(Request::new(req)).await.map(|_| ())
            }
            6 => {
                let req = v1::ListTransactionsRequest::decode(bytes).map_err(bad)?;
                self.admin.list_transactions(Request::new(req)).await.map(|_| ())
            }
            7 => {
                let req = v1::DeliverNowRequest::decode(bytes).map_err(bad)?;
                self.admin.deliver_now(Request::new(req)).await.map(|_| ())
            }
            8 => self.admin.resolve(Request::new(v1::ResolveRequest::decode(bytes).map_err(bad)?)).await.map(|_| ()),
            9 => self.admin.watch(Request::new(v1::WatchRequest::decode(bytes).map_err(bad)?)).await.map(|_| ()),
            _ => {
                self.registry.register(Request::new(v1::RegisterRequest::decode(bytes).map_err(bad)?)).await.map(|_| ())
            }
        }
    }
}

/// The codes a request may be refused with; the others mean the
/// coordinator failed, which no input may cause.
const REFUSALS: &[Code] = &[
    Code::InvalidArgument,
    Code::NotFound,
    Code::FailedPrecondition,
    Code::AlreadyExists,
    Code::ResourceExhausted,
    Code::OutOfRange,
    Code::Aborted,
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn hostile_requests_are_refused_never_crash(ops in proptest::collection::vec(op(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut services = Services::new();
            for op in &ops {
                if let Some(code) = services.run(op).await {
                    prop_assert!(REFUSALS.contains(&code), "{op:?} answered {code:?}");
                }
            }
            Ok(())
        })?;
    }
}
