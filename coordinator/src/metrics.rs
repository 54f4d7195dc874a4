//! Prometheus metrics: every metric the coordinator exports, recorded
//! through the `metrics` facade (a no-op until [`install`] sets the
//! Prometheus recorder, as the server does) and rendered for `GET /metrics`.
//!
//! Invariant: no label carries an id. Labels are a decision, an outcome, a
//! state, a result class, a gRPC method of this server (anything else is
//! `other`), a status code, or a participant service name (bounded by the
//! registry's limit on services).

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::model::{Decision, TxnRecord, TxnState};

/// Transactions begun (counter).
pub const BEGUN: &str = "tcc_transactions_begun_total";
/// Decisions made, by `decision` (confirm, cancel) and `by` (client,
/// deadline) (counter).
pub const DECIDED: &str = "tcc_transactions_decided_total";
/// Transactions finished, by `outcome` (confirmed, cancelled,
/// failed_to_confirm, failed_to_cancel) (counter).
pub const FINISHED: &str = "tcc_transactions_finished_total";
/// From begin to decision, by `decision` (histogram, seconds).
pub const DECISION_SECONDS: &str = "tcc_decision_seconds";
/// From decision to finish, by `outcome` (histogram, seconds).
pub const FINISH_SECONDS: &str = "tcc_finish_seconds";
/// Phase-2 calls, by `service`, `decision` and `result` (ok, transient,
/// refused) (counter).
pub const PHASE2_CALLS: &str = "tcc_phase2_calls_total";
/// Phase-2 calls that were retries (counter).
pub const PHASE2_RETRIES: &str = "tcc_phase2_retries_total";
/// Bytes of commands appended (counter).
pub const APPEND_BYTES: &str = "tcc_append_bytes_total";
/// Unfinished and failed transactions by `state`, counted exactly at each
/// scrape (gauge).
pub const BY_STATE: &str = "tcc_transactions";
/// Age of the oldest unfinished transaction (gauge, seconds; 0 if none).
pub const OLDEST_UNFINISHED: &str = "tcc_oldest_unfinished_age_seconds";
/// 1 once the store has failed for good and takes no more requests
/// (gauge).
pub const STORE_FAILED: &str = "tcc_store_failed";
/// One durable write: a group commit of the embedded store (write and
/// sync), or one write statement of the PostgreSQL store, committed
/// (histogram, seconds).
pub const STORE_SYNC_SECONDS: &str = "tcc_store_sync_seconds";
/// Writes per durable write: per group commit of the embedded store, 1 on
/// PostgreSQL (histogram).
pub const STORE_GROUP_SIZE: &str = "tcc_store_group_size";
/// RPCs served, by `method` and `code` (histogram, seconds).
pub const RPC_SECONDS: &str = "tcc_rpc_seconds";
/// Requests refused by the policy, by `code` (unauthenticated,
/// permission_denied, quota) (counter).
pub const AUTH_REFUSALS: &str = "tcc_auth_refusals_total";

/// Connections (and requests) cut off by the server, by `reason`: limit,
/// peer_limit (refused at accept), handshake, idle (closed), body_timeout
/// (a request failed) (counter).
pub const CONNECTIONS_CUT: &str = "tcc_connections_cut_total";

/// Every metric name above, for tests and documentation.
pub const ALL: &[&str] = &[
    BEGUN,
    DECIDED,
    FINISHED,
    DECISION_SECONDS,
    FINISH_SECONDS,
    PHASE2_CALLS,
    PHASE2_RETRIES,
    APPEND_BYTES,
    BY_STATE,
    OLDEST_UNFINISHED,
    STORE_FAILED,
    STORE_SYNC_SECONDS,
    STORE_GROUP_SIZE,
    RPC_SECONDS,
    AUTH_REFUSALS,
    CONNECTIONS_CUT,
];

/// The gRPC methods this server answers; any other path is `other`.
const METHODS: &[&str] = &[
    "/tcc.v1.Transactions/Begin",
    "/tcc.v1.Transactions/Enlist",
    "/tcc.v1.Transactions/Confirm",
    "/tcc.v1.Transactions/Cancel",
    "/tcc.v1.Transactions/Get",
    "/tcc.v1.Topics/Append",
    "/tcc.v1.Topics/Read",
    "/tcc.v1.Registry/Register",
    "/tcc.v1.Registry/Deregister",
    "/tcc.v1.Registry/ListEndpoints",
    "/tcc.v1.Admin/ListTransactions",
    "/tcc.v1.Admin/Retry",
    "/tcc.v1.Admin/DeliverNow",
    "/tcc.v1.Admin/Resolve",
    "/tcc.v1.Admin/Watch",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/metrics",
];

/// Installs the Prometheus recorder (once per process) and returns the
/// handle that renders the metrics.
pub fn install() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds =
                [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
            let builder = PrometheusBuilder::new().set_buckets(&seconds).and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(STORE_GROUP_SIZE.into()),
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
                )
            });
            match builder.and_then(|b| b.install_recorder()) {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(cause = %e, "cannot install the metrics recorder; /metrics will be empty");
                    None
                }
            }
        })
        .clone()
}

/// A transaction was begun.
pub fn begun() {
    counter!(BEGUN).increment(1);
}

fn outcome(state: TxnState) -> &'static str {
    match state {
        TxnState::Confirmed => "confirmed",
        TxnState::Cancelled => "cancelled",
        TxnState::FailedToConfirm => "failed_to_confirm",
        TxnState::FailedToCancel => "failed_to_cancel",
        _ => "unfinished",
    }
}

fn decision_of(state: TxnState) -> &'static str {
    match state {
        TxnState::Confirming | TxnState::Confirmed | TxnState::FailedToConfirm => "confirm",
        _ => "cancel",
    }
}

/// A state change this coordinator made durable, from `old` to `next`.
pub fn transition(old: TxnState, next: &TxnRecord) {
    if old == next.state {
        return;
    }
    let seconds = |from: i64, to: i64| Duration::from_millis(to.saturating_sub(from).max(0) as u64).as_secs_f64();
    if old == TxnState::Active {
        let decision = decision_of(next.state);
        let by = if next.reason == crate::model::DEADLINE_REASON { "deadline" } else { "client" };
        counter!(DECIDED, "decision" => decision, "by" => by).increment(1);
        histogram!(DECISION_SECONDS, "decision" => decision).record(seconds(next.created_ms, next.decided_ms));
    }
    if !next.state.is_delivering() && next.state != TxnState::Active {
        let outcome = outcome(next.state);
        counter!(FINISHED, "outcome" => outcome).increment(1);
        histogram!(FINISH_SECONDS, "outcome" => outcome).record(seconds(next.decided_ms, next.finished_ms));
    }
}

/// Commands appended, `bytes` in all.
pub fn appended(bytes: u64) {
    counter!(APPEND_BYTES).increment(bytes);
}

/// A phase-2 call to `service` ended with `result` (ok, transient,
/// refused); `attempt` counts from 1.
pub fn phase2(service: &str, decision: Decision, result: &'static str, attempt: u32) {
    let decision = if decision == Decision::Confirm { "confirm" } else { "cancel" };
    counter!(PHASE2_CALLS, "service" => service.to_string(), "decision" => decision, "result" => result).increment(1);
    if attempt > 1 {
        counter!(PHASE2_RETRIES).increment(1);
    }
}

/// One group commit of the embedded store.
pub fn group_commit(writes: usize, elapsed: Duration) {
    histogram!(STORE_SYNC_SECONDS).record(elapsed.as_secs_f64());
    histogram!(STORE_GROUP_SIZE).record(writes as f64);
}

/// A request was refused by the policy; `code` is one of the labels of
/// [`AUTH_REFUSALS`].
pub fn auth_refused(code: &'static str) {
    counter!(AUTH_REFUSALS, "code" => code).increment(1);
}

/// A connection was closed (or refused) by the server; `reason` is one of
/// the labels of [`CONNECTIONS_CUT`].
pub fn connection_cut(reason: &'static str) {
    counter!(CONNECTIONS_CUT, "reason" => reason).increment(1);
}

/// The store failed (1) or serves (0).
pub fn store_failed(failed: bool) {
    gauge!(STORE_FAILED).set(if failed { 1.0 } else { 0.0 });
}

/// The gauges computed at each scrape.
pub fn set_states(counts: &[(TxnState, usize)], oldest_unfinished: Option<Duration>) {
    for (state, count) in counts {
        gauge!(BY_STATE, "state" => state_label(*state)).set(*count as f64);
    }
    gauge!(OLDEST_UNFINISHED).set(oldest_unfinished.map_or(0.0, |d| d.as_secs_f64()));
}

fn state_label(state: TxnState) -> &'static str {
    match state {
        TxnState::Active => "active",
        TxnState::Confirming => "confirming",
        TxnState::Cancelling => "cancelling",
        TxnState::Confirmed => "confirmed",
        TxnState::Cancelled => "cancelled",
        TxnState::FailedToConfirm => "failed_to_confirm",
        TxnState::FailedToCancel => "failed_to_cancel",
    }
}

/// The `method` label of a request to `path`: one of this server's
/// methods, or `other` (so no client can make up label values).
pub fn method_label(path: &str) -> &'static str {
    METHODS.iter().find(|m| **m == path).copied().unwrap_or("other")
}

/// An RPC served: `method` from [`method_label`], `code` its gRPC status
/// code as sent (`grpc-status`).
pub fn rpc(method: &'static str, code: &str, elapsed: Duration) {
    let code = code.parse::<i32>().map_or("unknown", |n| code_label(tonic::Code::from_i32(n)));
    histogram!(RPC_SECONDS, "method" => method, "code" => code).record(elapsed.as_secs_f64());
}

/// The label of a gRPC code: its canonical name.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
