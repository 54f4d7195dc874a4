//! The web console: an operator's view of the coordinator in a browser,
//! served at `/` on the coordinator's port, beside gRPC and `/metrics`, so
//! under the same TLS and the same rule that plaintext stays on loopback
//! (not on `--http-listen`, which is plaintext wherever it is bound and
//! serves only `/metrics`).
//!
//! Two parts:
//!
//! * the page (`assets/`: one HTML, one script, one style sheet), compiled
//!   into the binary with `include_str!`: nothing is fetched at build or run
//!   time, and the page loads nothing from anywhere else (its
//!   Content-Security-Policy says so);
//! * a JSON API under `/api/` over the same engine operations as
//!   `tcc.v1.Admin`: list and search transactions, one transaction with
//!   its topics' commands, the registered endpoints, a summary of the
//!   metrics, the operator actions (retry, cancel, deliver now, resolve),
//!   and live updates as Server-Sent Events (`/api/watch`).
//!
//! Invariants:
//!
//! * Every `/api/` route needs the admin role when a policy is enforced,
//!   with the same identities as gRPC ([`Access::http_caller`]: the client
//!   certificate, or `authorization: Bearer`); refusals are logged and
//!   counted as for gRPC. The page itself holds no data and is open.
//! * Actions are POSTs that must carry `Content-Type: application/json`:
//!   a cross-site form cannot send that without a CORS preflight, which is
//!   never answered, so another web page cannot act through an operator's
//!   browser. No CORS header is ever sent, and a request whose `Origin` is
//!   not the host it was sent to is refused.
//! * Open (no policy), the API answers only requests addressed to an IP
//!   address or `localhost` (the `Host` header): a web page whose own
//!   name an attacker points at 127.0.0.1 (DNS rebinding) is same-origin
//!   with itself, not with the console, and gets nothing.
//! * Every error is JSON `{"code", "message"}` with the gRPC code name
//!   from the one `Error`→`Status` mapping, and the matching HTTP status.
//! * Every operator action is logged at WARN with the identity, and kept
//!   in the transaction's history by the engine.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::admin::{watch_all, watch_one};
use crate::auth::{Access, Caller};
use crate::delivery::Delivery;
use crate::delivery::registry::Registry;
use crate::engine::Engine;
use crate::error::Error;
use crate::model::{PartialId, Phase2Status, TxnId, TxnRecord, TxnState};

const INDEX_HTML: &str = include_str!("assets/index.html");
const CONSOLE_JS: &str = include_str!("assets/console.js");
const CONSOLE_CSS: &str = include_str!("assets/console.css");

/// The page may load only its own script and style sheet, and talk only
/// to this origin; no page may frame it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The most commands of one topic a transaction's page shows.
pub const MAX_COMMANDS_SHOWN: usize = 100;
/// Payloads up to this size are shown as JSON or text when they are.
const MAX_PAYLOAD_SHOWN: usize = 64 * 1024;
/// The hex dump of a payload stops after this many bytes.
const MAX_HEX_BYTES: usize = 256;
/// A comment line on every live stream this often, so proxies and the
/// browser keep it open.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// What the console's routes work on.
pub struct Console {
    engine: Arc<Engine>,
    delivery: Arc<Delivery>,
    registry: Arc<Registry>,
    access: Arc<Access>,
    metrics: Option<PrometheusHandle>,
}

impl Console {
    /// A console over the coordinator's parts; `metrics` feeds the summary.
    pub fn new(
        engine: Arc<Engine>,
        delivery: Arc<Delivery>,
        registry: Arc<Registry>,
        access: Arc<Access>,
        metrics: Option<PrometheusHandle>,
    ) -> Arc<Self> {
        Arc::new(Console { engine, delivery, registry, access, metrics })
    }

    /// The caller of a console request, who must be an admin (when a
    /// policy is enforced), from this page (see the module docs).
    fn operator(&self, parts: &Parts, rpc: &'static str) -> Result<Caller, ApiError> {
        same_origin(parts, self.access.is_enforced()).map_err(|why| {
            tracing::warn!(rpc, host = ?parts.headers.get(header::HOST), origin = ?parts.headers.get(header::ORIGIN),
                "console request refused: {why}");
            ApiError::from(Error::PermissionDenied(format!("{rpc}: {why}")))
        })?;
        let caller = self.access.http_caller(parts, rpc)?;
        self.access.admin(&caller, rpc)?;
        Ok(caller)
    }
}

/// Refuses a request from another web page: an `Origin` that is not the
/// `Host` asked for, and, when `enforced` is false (anyone may act), a
/// `Host` that is neither an IP address nor `localhost` (DNS rebinding).
fn same_origin(parts: &Parts, enforced: bool) -> Result<(), String> {
    // HTTP/1.1 names the host in `Host`; HTTP/2 (what browsers speak over
    // TLS) in the `:authority` pseudo-header, which is the URI's.
    let asked = match parts.headers.get(header::HOST) {
        Some(h) => h.to_str().ok().and_then(|h| h.parse::<http::uri::Authority>().ok()),
        None => parts.uri.authority().cloned(),
    };
    let Some(asked) = asked else {
        return Err("the request names no host (or an unreadable one)".to_string());
    };
    if let Some(origin) = parts.headers.get(header::ORIGIN) {
        let text = origin.to_str().unwrap_or("");
        let from = text.parse::<http::Uri>().ok().and_then(|u| {
            let scheme = u.scheme_str()?.to_ascii_lowercase();
            let default = if scheme == "https" { 443 } else { 80 };
            let a = u.authority()?;
            Some((a.host().to_ascii_lowercase(), a.port_u16().unwrap_or(default), default))
        });
        let same = from.is_some_and(|(host, port, default)| {
            host.eq_ignore_ascii_case(asked.host()) && port == asked.port_u16().unwrap_or(default)
        });
        if !same {
            return Err(format!(
                "the request comes from the web page {text:?}, not from the console at {:?}; \
                 the console's API answers only its own page",
                asked.as_str()
            ));
        }
    }
    if !enforced {
        let name = asked.host().trim_start_matches('[').trim_end_matches(']');
        let local = name.parse::<std::net::IpAddr>().is_ok()
            || name.eq_ignore_ascii_case("localhost")
            || name.to_ascii_lowercase().ends_with(".localhost");
        if !local {
            return Err(format!(
                "with no policy (anyone may act) the console answers only requests for an IP address or localhost, \
                 and this one is for {:?} (a page may have pointed its own name at this port); \
                 use the address, or run with --policy",
                asked.as_str()
            ));
        }
    }
    Ok(())
}

/// Answers of the API are never cached: they are live state.
async fn no_store(mut response: Response) -> Response {
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The console's routes: the page at `/`, the API under `/api/`.
pub fn router(console: Arc<Console>) -> Router {
    let api = Router::new()
        .route("/api/summary", get(summary))
        .route("/api/transactions", get(list))
        .route("/api/search", get(search))
        .route("/api/transactions/{id}", get(detail))
        .route("/api/transactions/{id}/{action}", post(act))
        .route("/api/endpoints", get(endpoints))
        .route("/api/watch", get(watch))
        .layer(axum::middleware::map_response(no_store))
        .with_state(console);
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/console.js", get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }))
        .route("/console.css", get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }))
        .merge(api)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

// ---------------------------------------------------------------- errors

/// An error answer: the gRPC code's name, the HTTP status that goes with
/// it, and the message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn invalid(message: impl Into<String>) -> Self {
        Error::invalid(message.into()).into()
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code::*;
        let status = match s.code() {
            InvalidArgument | OutOfRange => StatusCode::BAD_REQUEST,
            Unauthenticated => StatusCode::UNAUTHORIZED,
            PermissionDenied => StatusCode::FORBIDDEN,
            NotFound => StatusCode::NOT_FOUND,
            FailedPrecondition | Aborted | AlreadyExists => StatusCode::CONFLICT,
            ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Unimplemented => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError { status, code: crate::metrics::code_label(s.code()), message: s.message().to_string() }
    }
}

/// Through the one `Error` → `Status` mapping (`api::status`).
impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        tonic::Status::from(e).into()
    }
}

impl From<crate::model::BadId> for ApiError {
    fn from(e: crate::model::BadId) -> Self {
        Error::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.code, "message": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}

type ApiResult<T> = Result<axum::Json<T>, ApiError>;

// ----------------------------------------------------------------- views

/// A transaction as the console shows it.
#[derive(Serialize)]
pub struct TxnView {
    transaction_id: String,
    state: String,
    version: u64,
    owner: String,
    created_ms: i64,
    deadline_ms: i64,
    decided_ms: i64,
    finished_ms: i64,
    reason: String,
    participants: Vec<ParticipantView>,
    history: Vec<HistoryView>,
}

#[derive(Serialize)]
struct ParticipantView {
    service: String,
    partial_id: String,
    status: &'static str,
    attempts: u32,
    last_error: String,
    next_attempt_ms: i64,
    command_count: u64,
    topic_bytes: u64,
}

#[derive(Serialize)]
struct HistoryView {
    at_ms: i64,
    state: String,
    cause: String,
}

/// The console's view of a record.
pub fn txn_view(t: &TxnRecord) -> TxnView {
    TxnView {
        transaction_id: t.id.to_string(),
        state: t.state.to_string(),
        version: t.version,
        owner: t.owner.clone(),
        created_ms: t.created_ms,
        deadline_ms: t.deadline_ms,
        decided_ms: t.decided_ms,
        finished_ms: t.finished_ms,
        reason: t.reason.clone(),
        participants: t
            .participants
            .iter()
            .map(|p| ParticipantView {
                service: p.service.clone(),
                partial_id: p.partial_id.to_string(),
                status: match p.status {
                    Phase2Status::Pending => "PENDING",
                    Phase2Status::Acknowledged => "ACKNOWLEDGED",
                    Phase2Status::Failed => "FAILED",
                },
                attempts: p.attempts,
                last_error: p.last_error.clone().unwrap_or_default(),
                next_attempt_ms: if p.status == Phase2Status::Pending { p.next_attempt_ms } else { 0 },
                command_count: p.command_count,
                topic_bytes: p.topic_bytes,
            })
            .collect(),
        history: t
            .history
            .iter()
            .map(|h| HistoryView { at_ms: h.at_ms, state: h.state.to_string(), cause: h.cause.clone() })
            .collect(),
    }
}

/// One transaction's page: the record and its topics' first commands.
#[derive(Serialize)]
struct DetailView {
    #[serde(flatten)]
    txn: TxnView,
    commands: BTreeMap<String, TopicView>,
}

#[derive(Serialize)]
struct TopicView {
    commands: Vec<CommandView>,
    truncated: bool,
}

#[derive(Serialize)]
struct CommandView {
    sequence: u64,
    r#type: String,
    key: String,
    size: usize,
    payload_json: Option<serde_json::Value>,
    payload_text: Option<String>,
    payload_hex: String,
}

/// A payload shown as JSON if it is JSON, else as text if it is printable
/// UTF-8; always as hex (the first [`MAX_HEX_BYTES`]).
fn command_view(c: crate::model::CommandRecord) -> CommandView {
    let small = c.payload.len() <= MAX_PAYLOAD_SHOWN;
    let payload_json = small.then(|| serde_json::from_slice::<serde_json::Value>(&c.payload).ok()).flatten();
    let payload_text = (small && payload_json.is_none())
        .then(|| std::str::from_utf8(&c.payload).ok())
        .flatten()
        .filter(|s| s.chars().all(|ch| !ch.is_control() || matches!(ch, '\n' | '\r' | '\t')))
        .map(str::to_string);
    let payload_hex = c.payload.iter().take(MAX_HEX_BYTES).map(|b| format!("{b:02x}")).collect();
    CommandView {
        sequence: c.sequence,
        r#type: c.kind,
        key: c.key,
        size: c.payload.len(),
        payload_json,
        payload_text,
        payload_hex,
    }
}

// ---------------------------------------------------------------- routes

/// The query string as a map; a malformed one is INVALID_ARGUMENT.
type Params = Result<Query<HashMap<String, String>>, QueryRejection>;

fn params(raw: Params, known: &[&str]) -> Result<HashMap<String, String>, ApiError> {
    let Query(map) = raw.map_err(|e| ApiError::invalid(format!("malformed query string: {}", e.body_text())))?;
    if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ApiError::invalid(format!("unknown query parameter {unknown:?}; known: {}", known.join(", "))));
    }
    Ok(map.into_iter().filter(|(_, v)| !v.is_empty()).collect())
}

fn parse_states(field: &str, list: Option<&String>) -> Result<Vec<TxnState>, ApiError> {
    let Some(list) = list else { return Ok(Vec::new()) };
    list.split(',')
        .map(|name| {
            TxnState::ALL.into_iter().find(|s| s.to_string() == name.trim()).ok_or_else(|| {
                ApiError::invalid(format!(
                    "{field}: {name:?} is not a state; states are {}",
                    TxnState::ALL.map(|s| s.to_string()).join(", ")
                ))
            })
        })
        .collect()
}

fn parse_number<T: std::str::FromStr>(field: &str, value: Option<&String>) -> Result<Option<T>, ApiError> {
    value
        .map(|v| v.parse::<T>().map_err(|_| ApiError::invalid(format!("{field}: {v:?} is not a non-negative integer"))))
        .transpose()
}

#[derive(Serialize)]
struct Summary {
    version: &'static str,
    now_ms: i64,
    access: &'static str,
    counts: BTreeMap<String, u64>,
    oldest_unfinished_age_ms: Option<i64>,
    metrics: Vec<MetricView>,
}

#[derive(Serialize)]
struct MetricView {
    name: &'static str,
    help: String,
    value: f64,
}

/// The counters and gauges the summary shows, each summed over its labels.
const SUMMARY_METRICS: &[&str] = &[
    crate::metrics::BEGUN,
    crate::metrics::DECIDED,
    crate::metrics::FINISHED,
    crate::metrics::PHASE2_CALLS,
    crate::metrics::PHASE2_RETRIES,
    crate::metrics::APPEND_BYTES,
    crate::metrics::AUTH_REFUSALS,
    crate::metrics::STORE_FAILED,
];

/// `GET /api/summary`: exact counts of unfinished transactions by state,
/// the oldest one's age, and a few metrics.
async fn summary(State(c): State<Arc<Console>>, parts: Parts) -> ApiResult<Summary> {
    c.operator(&parts, "Console.Summary")?;
    let now_ms = c.engine.now_ms();
    let mut counts: BTreeMap<String, u64> =
        TxnState::ALL.into_iter().filter(|s| !s.is_finished()).map(|s| (s.to_string(), 0)).collect();
    for (state, n) in c.engine.count_unfinished().await? {
        counts.insert(state.to_string(), n);
    }
    let oldest = c.engine.oldest_unfinished_created_ms().await?.map(|created| now_ms.saturating_sub(created).max(0));
    let metrics = c.metrics.as_ref().map(|h| sum_metrics(&h.render())).unwrap_or_default();
    Ok(axum::Json(Summary {
        version: env!("CARGO_PKG_VERSION"),
        now_ms,
        access: if c.access.is_enforced() { "policy" } else { "open" },
        counts,
        oldest_unfinished_age_ms: oldest,
        metrics,
    }))
}

/// The [`SUMMARY_METRICS`] out of Prometheus' text format, each summed
/// over its label sets (0 when not recorded yet).
fn sum_metrics(text: &str) -> Vec<MetricView> {
    SUMMARY_METRICS
        .iter()
        .map(|&name| {
            let mut help = String::new();
            let mut value = 0.0;
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("# HELP ") {
                    if let Some(h) = rest.strip_prefix(name).and_then(|r| r.strip_prefix(' ')) {
                        help = h.to_string();
                    }
                    continue;
                }
                let Some(rest) = line.strip_prefix(name) else { continue };
                // The name must end here: `name value` or `name{labels} value`.
                let sample = match rest.as_bytes().first() {
                    Some(b' ') => rest,
                    Some(b'{') => rest.rsplit_once('}').map_or("", |(_, v)| v),
                    _ => continue,
                };
                value += sample.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            }
            MetricView { name, help, value }
        })
        .collect()
}

#[derive(Serialize)]
struct ListView {
    transactions: Vec<TxnView>,
    next_page_token: String,
}

/// `GET /api/transactions?states=&min_age_ms=&service=&page_token=&page_size=`:
/// oldest first. The service filter applies within each page, so a page
/// may be short while `next_page_token` says there is more.
async fn list(State(c): State<Arc<Console>>, parts: Parts, raw: Params) -> ApiResult<ListView> {
    c.operator(&parts, "Console.ListTransactions")?;
    let p = params(raw, &["states", "min_age_ms", "service", "page_token", "page_size"])?;
    let states = parse_states("states", p.get("states"))?;
    let min_age_ms = parse_number::<u64>("min_age_ms", p.get("min_age_ms"))?.unwrap_or(0);
    let page_size = parse_number::<usize>("page_size", p.get("page_size"))?.unwrap_or(50);
    let after = p.get("page_token").map(|t| TxnId::parse("page_token", t)).transpose()?;
    let page = c.engine.list(&states, min_age_ms, page_size, after).await?;
    let service = p.get("service");
    Ok(axum::Json(ListView {
        transactions: page
            .transactions
            .iter()
            .filter(|t| service.is_none_or(|s| t.participants.iter().any(|p| &p.service == s)))
            .map(txn_view)
            .collect(),
        next_page_token: page.next.map(|id| id.to_string()).unwrap_or_default(),
    }))
}

#[derive(Serialize)]
struct Found {
    transaction_id: String,
}

/// `GET /api/search?q=`: the transaction a transaction id or a partial id
/// names.
async fn search(State(c): State<Arc<Console>>, parts: Parts, raw: Params) -> ApiResult<Found> {
    c.operator(&parts, "Console.Search")?;
    let p = params(raw, &["q"])?;
    let q = p.get("q").map(|q| q.trim()).unwrap_or_default();
    if q.is_empty() {
        return Err(ApiError::invalid("q: give a transaction id or a partial transaction id"));
    }
    let id = TxnId::parse("q", q)?;
    match c.engine.get(id).await {
        Ok(txn) => return Ok(axum::Json(Found { transaction_id: txn.id.to_string() })),
        Err(Error::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    match c.engine.read_topic(PartialId(id.0), 1, 1).await {
        Ok((txn, _, _)) => Ok(axum::Json(Found { transaction_id: txn.id.to_string() })),
        Err(Error::NotFound(_)) => {
            Err(Error::NotFound(format!("no transaction and no partial transaction has the id {q}")).into())
        }
        Err(e) => Err(e.into()),
    }
}

/// `GET /api/transactions/{id}`: the record, and the first
/// [`MAX_COMMANDS_SHOWN`] commands of each participant's topic.
async fn detail(State(c): State<Arc<Console>>, parts: Parts, Path(id): Path<String>) -> ApiResult<DetailView> {
    c.operator(&parts, "Console.GetTransaction")?;
    let id = TxnId::parse("transaction id", &id)?;
    let txn = c.engine.get(id).await?;
    let mut commands = BTreeMap::new();
    for p in &txn.participants {
        let (_, now, read) = c.engine.read_topic(p.partial_id, 1, MAX_COMMANDS_SHOWN).await?;
        let truncated = now.command_count > read.len() as u64;
        commands
            .insert(p.service.clone(), TopicView { commands: read.into_iter().map(command_view).collect(), truncated });
    }
    Ok(axum::Json(DetailView { txn: txn_view(&txn), commands }))
}

/// The body of an action.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    service: String,
}

/// `POST /api/transactions/{id}/{retry|cancel|deliver-now|resolve}`.
async fn act(
    State(c): State<Arc<Console>>,
    parts: Parts,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<TxnView> {
    let rpc = match action.as_str() {
        "retry" => "Console.Retry",
        "cancel" => "Console.Cancel",
        "deliver-now" => "Console.DeliverNow",
        "resolve" => "Console.Resolve",
        other => {
            return Err(Error::NotFound(format!(
                "no action {other:?}; the actions are retry, cancel, deliver-now and resolve"
            ))
            .into());
        }
    };
    let json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")));
    if !json {
        return Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "INVALID_ARGUMENT",
            message: "actions take a JSON body with `Content-Type: application/json`".to_string(),
        });
    }
    let caller = c.operator(&parts, rpc)?;
    let by = match &caller {
        Caller::Known { name, .. } => name.as_str(),
        Caller::Anyone => "",
    };
    let body: ActionBody = if body.iter().all(u8::is_ascii_whitespace) {
        ActionBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("the body is not a valid action: {e}")))?
    };
    let id = TxnId::parse("transaction id", &id)?;
    let txn = match action.as_str() {
        "retry" => c.engine.retry(id, by).await?,
        "cancel" => {
            // The history keeps who cancelled, with the reason given.
            let who = if by.is_empty() { String::new() } else { format!(" by {by}") };
            let reason = if body.reason.trim().is_empty() {
                format!("cancelled from the console{who}")
            } else if by.is_empty() {
                body.reason.clone()
            } else {
                format!("{} (cancelled from the console{who})", body.reason)
            };
            c.engine.cancel(id, reason).await?
        }
        "deliver-now" => {
            let txn = c.engine.deliver_now(id).await?;
            c.delivery.deliver_now(id);
            txn
        }
        _ => c.engine.resolve(id, &body.service, &body.reason, by).await?,
    };
    tracing::warn!(txn = %id, action = %action, service = %body.service, reason = %body.reason, state = %txn.state,
        identity = by, "operator action from the console");
    Ok(axum::Json(txn_view(&txn)))
}

#[derive(Serialize)]
struct EndpointsView {
    endpoints: Vec<EndpointView>,
}

#[derive(Serialize)]
struct EndpointView {
    service: String,
    endpoint: String,
    from_config: bool,
    expires_ms: Option<i64>,
    healthy: bool,
    consecutive_failures: u32,
}

/// `GET /api/endpoints`: every registered and configured participant
/// endpoint.
async fn endpoints(State(c): State<Arc<Console>>, parts: Parts) -> ApiResult<EndpointsView> {
    c.operator(&parts, "Console.ListEndpoints")?;
    let now = c.engine.now_ms();
    let endpoints = c
        .registry
        .list(None)
        .into_iter()
        .map(|e| EndpointView {
            service: e.service,
            endpoint: e.endpoint,
            from_config: e.from_config,
            expires_ms: e.expires_in.map(|d| now.saturating_add(d.as_millis() as i64)),
            healthy: e.healthy,
            consecutive_failures: e.consecutive_failures,
        })
        .collect();
    Ok(axum::Json(EndpointsView { endpoints }))
}

/// What a live stream sends: a transaction's new state, or, when the
/// watcher fell behind and changes were skipped, word to read the list
/// again.
enum Update {
    Txn(TxnView),
    Resync { missed: u64 },
}

/// `GET /api/watch[?transaction_id=|?states=]`: Server-Sent Events, one
/// `data:` line of a transaction's JSON per change (of that transaction:
/// first its current state, ending once it is finished; or of every
/// transaction, or of those whose new state is in `states`). A watcher of
/// every transaction that fell behind gets a `resync` event (it missed
/// changes: read the list again). An error after the stream began comes as
/// an `error` event, and ends it.
async fn watch(
    State(c): State<Arc<Console>>,
    parts: Parts,
    raw: Params,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    c.operator(&parts, "Console.Watch")?;
    let p = params(raw, &["transaction_id", "states"])?;
    // Subscribed before the current state is read: no change is lost in
    // between (one may come twice; versions weed it out).
    let changes = c.engine.watch();
    let (out, stream) = tokio::sync::mpsc::channel(64);
    let engine = c.engine.clone();
    match p.get("transaction_id") {
        Some(id) => {
            if p.contains_key("states") {
                return Err(ApiError::invalid("give either transaction_id or states, not both"));
            }
            let id = TxnId::parse("transaction_id", id)?;
            let current = c.engine.get(id).await?;
            tokio::spawn(watch_one(engine, id, current, changes, out, |t| Update::Txn(txn_view(t))));
        }
        None => {
            let states = parse_states("states", p.get("states"))?;
            tokio::spawn(watch_all(
                engine,
                states,
                changes,
                out,
                |t| Update::Txn(txn_view(t)),
                |missed| Some(Update::Resync { missed }),
            ));
        }
    }
    let events = ReceiverStream::new(stream).map(|item| {
        Ok(match item {
            Ok(Update::Txn(view)) => match serde_json::to_string(&view) {
                Ok(json) => SseEvent::default().data(json),
                Err(e) => SseEvent::default().event("error").data(format!("cannot encode: {e}")),
            },
            Ok(Update::Resync { missed }) => SseEvent::default().event("resync").data(missed.to_string()),
            Err(status) => {
                let e = ApiError::from(status);
                SseEvent::default().event("error").data(format!("{}: {}", e.code, e.message))
            }
        })
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_from_other_pages_and_other_names_are_refused() {
        let parts = |host: &str, origin: Option<&str>| {
            let mut b = http::Request::builder().uri("/api/summary").header(header::HOST, host);
            if let Some(o) = origin {
                b = b.header(header::ORIGIN, o);
            }
            b.body(()).map(|r| r.into_parts().0)
        };
        let cases = [
            ("127.0.0.1:50051", None, false, true),
            ("localhost", Some("http://localhost:80"), false, true),
            ("tcc.internal", Some("https://tcc.internal"), true, true),
            ("tcc.internal:443", Some("https://tcc.internal"), true, true),
            ("tcc.internal", Some("https://tcc.internal:50051"), true, false),
            ("127.0.0.1:50051", Some("http://127.0.0.1:50052"), false, false),
            ("127.0.0.1:50051", Some("http://127.0.0.1:50051"), false, true),
            ("localhost:50051", Some("http://localhost:50051"), false, true),
            ("[::1]:50051", None, false, true),
            ("app.localhost", None, false, true),
            ("10.1.2.3:50051", None, false, true),
            ("127.0.0.1:50051", Some("http://evil.example"), false, false),
            ("127.0.0.1:50051", Some("null"), false, false),
            ("evil.example:50051", None, false, false),
            ("evil.example:50051", Some("http://evil.example:50051"), false, false),
            ("localhost.evil.example", None, false, false),
            // Under a policy a name is fine (TLS certificates name hosts),
            // another page still is not.
            ("tcc.internal:50051", Some("https://tcc.internal:50051"), true, true),
            ("tcc.internal:50051", Some("https://evil.example"), true, false),
        ];
        for (host, origin, enforced, ok) in cases {
            let Ok(p) = parts(host, origin) else { panic!("bad test request {host}") };
            assert_eq!(same_origin(&p, enforced).is_ok(), ok, "{host} {origin:?} enforced={enforced}");
        }
        // HTTP/2: no Host header, the authority is the URI's (port kept).
        let h2 = |origin: &str| {
            http::Request::builder()
                .uri("https://tcc.internal:50051/api/transactions/x/retry")
                .header(header::ORIGIN, origin)
                .body(())
                .map(|r| r.into_parts().0)
        };
        let Ok(same) = h2("https://tcc.internal:50051") else { panic!("bad test request") };
        assert!(same_origin(&same, true).is_ok(), "an HTTP/2 request from the console's own page");
        let Ok(other) = h2("https://tcc.internal:50052") else { panic!("bad test request") };
        assert!(same_origin(&other, true).is_err(), "an HTTP/2 request from another port");
        let Ok(none) = http::Request::builder().uri("/api/summary").body(()).map(|r| r.into_parts().0) else {
            panic!("bad test request")
        };
        assert!(same_origin(&none, true).is_err(), "a request that names no host");
    }

    #[test]
    fn metrics_are_summed_over_their_labels_and_names_match_exactly() {
        let text = "# HELP tcc_transactions_begun_total Transactions begun.\n\
                    # TYPE tcc_transactions_begun_total counter\n\
                    tcc_transactions_begun_total 7\n\
                    tcc_transactions_begun_total_other 100\n\
                    tcc_phase2_calls_total{service=\"a\",decision=\"confirm\",result=\"ok\"} 3\n\
                    tcc_phase2_calls_total{service=\"b}\",decision=\"confirm\",result=\"ok\"} 4\n";
        let got = sum_metrics(text);
        let begun = got.iter().find(|m| m.name == crate::metrics::BEGUN).map(|m| (m.value, m.help.clone()));
        assert_eq!(begun, Some((7.0, "Transactions begun.".to_string())));
        let calls = got.iter().find(|m| m.name == crate::metrics::PHASE2_CALLS).map(|m| m.value);
        assert_eq!(calls, Some(7.0));
        let retries = got.iter().find(|m| m.name == crate::metrics::PHASE2_RETRIES).map(|m| m.value);
        assert_eq!(retries, Some(0.0));
    }

    #[test]
    fn payloads_are_shown_as_json_text_or_hex() {
        let cmd = |payload: &[u8]| crate::model::CommandRecord {
            sequence: 1,
            kind: "t".into(),
            key: String::new(),
            payload: payload.to_vec(),
        };
        let json = command_view(cmd(br#"{"sku":"apple","qty":2}"#));
        assert_eq!(json.payload_json, Some(serde_json::json!({"sku": "apple", "qty": 2})));
        assert_eq!(json.payload_text, None);
        let text = command_view(cmd(b"reserve 2 apples\n"));
        assert_eq!((text.payload_json.is_none(), text.payload_text.as_deref()), (true, Some("reserve 2 apples\n")));
        let binary = command_view(cmd(&[0x0a, 0x03, 0xff, 0x00]));
        assert_eq!((binary.payload_json, binary.payload_text, binary.payload_hex.as_str()), (None, None, "0a03ff00"));
        let control = command_view(cmd(b"a\x07b"));
        assert_eq!(control.payload_text, None);
        let big = command_view(cmd(&vec![b'x'; MAX_PAYLOAD_SHOWN + 1]));
        assert_eq!(
            (big.payload_text, big.payload_hex.len(), big.size),
            (None, 2 * MAX_HEX_BYTES, MAX_PAYLOAD_SHOWN + 1)
        );
    }
}
