//! Connection hygiene: how the gRPC server accepts TCP connections and when
//! it lets them go, so that clients that connect and then say nothing cannot
//! use up the process's file descriptors (and with them the store's ability
//! to open its files).
//!
//! Invariants:
//! * At most [`ConnectionLimits::max`] connections are open at once. A
//!   connection beyond that is accepted and closed at once (the client sees
//!   a reset, not a hang in the kernel's backlog), with a warning at most
//!   every 10 s. The cap is also kept a margin below the process's
//!   descriptor limit ([`descriptor_budget`]), so the store, the phase-2
//!   clients and the database pool always have descriptors left.
//! * A connection that has not sent the 24-byte HTTP/2 preface within
//!   [`ConnectionLimits::handshake`] is closed. With TLS, the TLS handshake
//!   counts against the same deadline, and runs in its own task, so a slow
//!   client never holds up the accept loop.
//! * At most [`ConnectionLimits::per_peer`] of them come from one peer
//!   address, so that one peer (an attacker holding connections open)
//!   cannot take every slot; beyond that its new connections are closed at
//!   once, with a warning at most every 10 s.
//! * A connection with no request in flight for [`ConnectionLimits::idle`]
//!   is closed (a client reconnects on its next call). Requests in flight,
//!   such as a Confirm waiting for its outcome, keep it open however long.
//! * A request must send its whole body within [`ConnectionLimits::body`]
//!   of its headers ([`Deadline`]): a request whose body never comes (a
//!   POST that declares a length and sends nothing, a gRPC stream never
//!   ended) would otherwise count as in flight forever and hold its
//!   connection. Past the deadline it fails with DEADLINE_EXCEEDED (its
//!   answer goes out; HTTP/1 then closes the connection, whose request was
//!   not read to its end, and an HTTP/2 connection falls under the idle
//!   timeout once nothing is in flight). hyper bounds the time an HTTP/1
//!   request's headers take at 30 s.
//! * The bytes of requests held in memory at once are bounded
//!   ([`RequestBudget`], `--max-request-bytes`): a request reserves its
//!   whole size before its body is read (its Content-Length, or the length
//!   prefix of its gRPC message) and keeps it until it is answered. One
//!   that does not fit waits, and its client is held back by HTTP/2 flow
//!   control, within the body timeout; one larger than the budget is
//!   refused (RESOURCE_EXHAUSTED). Reserving all at once means two
//!   half-received requests never wait on each other.
//! * Under a policy, a gRPC request to the tcc services that carries no
//!   identity that holds up is refused (UNAUTHENTICATED, naming the method)
//!   before its body is read: an anonymous peer holds nothing for the body
//!   timeout, and its refusal is logged and counted as every refusal is.
//!   (The console's API checks its caller in its handlers, which answer
//!   401 before they read a body.)
//! * Every connection closed early is logged (rate-limited) and counted in
//!   `tcc_connections_cut_total` by reason.
//! * A failed `accept` (EMFILE, ENFILE, ENOBUFS...) never stops the server:
//!   it logs, waits [`ACCEPT_BACKOFF`] and accepts again; the connection
//!   waiting in the kernel's backlog is taken then.
//!
//! HTTP/2 keepalive pings (set on the server in [`crate::server`]) close
//! connections whose peer has vanished; the stream cap per connection is set
//! there too.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

use crate::auth::tls::{self, Tls};
use crate::auth::{Access, PeerCert};
use crate::lock;
use crate::throttle::Throttle;

/// How long the accept loop waits after a failed `accept`.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Descriptors kept free for everything but client connections: journal
/// and sled files, phase-2 connections to participants, the database pool.
pub const RESERVED_DESCRIPTORS: u64 = 128;

/// The length of the HTTP/2 client preface.
const PREFACE: usize = 24;

/// The limits on client connections; see the module docs.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Most connections open at once.
    pub max: usize,
    /// Time a new connection has to send the HTTP/2 preface.
    pub handshake: Duration,
    /// Time a connection may stay open with no request in flight.
    pub idle: Duration,
    /// Most connections open at once from one peer address.
    pub per_peer: usize,
    /// Time a request has, from its headers, to send its whole body.
    pub body: Duration,
}

/// Binds `addr` (given by `flag`), with an error that says what to do:
/// the port taken (by an earlier coordinator still running, say), an
/// address this machine does not have, a privileged port.
pub async fn bind(addr: std::net::SocketAddr, flag: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
        let what = match e.kind() {
            io::ErrorKind::AddrInUse => format!(
                "the address is already in use (by another process: an earlier tcc-coordinator or demo still running?); stop that process, or give {flag} another port"
            ),
            io::ErrorKind::AddrNotAvailable => format!(
                "this machine has no such address; give {flag} one of its addresses (127.0.0.1 for this machine only, 0.0.0.0 for all)"
            ),
            io::ErrorKind::PermissionDenied => {
                format!("permission denied (ports below 1024 need privileges); give {flag} a port above 1023")
            }
            _ => e.to_string(),
        };
        format!("cannot listen on {addr}: {what}")
    })
}

/// Raises the soft limit on open files to the hard limit (as Go's runtime
/// and most servers do) and returns how many client connections fit below
/// it with [`RESERVED_DESCRIPTORS`] spare: at least 16, at most `wanted`.
pub fn descriptor_budget(wanted: usize) -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let soft = match (limit.current, limit.maximum) {
        (Some(soft), Some(hard)) if hard > soft => {
            let raised = Rlimit { current: Some(hard), maximum: Some(hard) };
            if setrlimit(Resource::Nofile, raised).is_ok() { Some(hard) } else { Some(soft) }
        }
        (soft, None) => {
            let raised = Rlimit { current: None, maximum: None };
            if setrlimit(Resource::Nofile, raised).is_ok() { None } else { soft }
        }
        (soft, _) => soft,
    };
    match soft {
        None => wanted,
        Some(soft) => {
            let fit = usize::try_from(soft.saturating_sub(RESERVED_DESCRIPTORS)).unwrap_or(usize::MAX);
            wanted.min(fit.max(16))
        }
    }
}

/// Accepts connections from `listener` under `limits` (and, with `tls`,
/// completes their TLS handshakes), for `serve_with_incoming`. Never ends
/// and never yields an error; stops accepting once the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    tls: Option<Arc<Tls>>,
) -> impl Stream<Item = io::Result<Conn>> + Send {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<io::Result<Conn>>();
    tokio::spawn(async move {
        tokio::select! {
            _ = tx.closed() => {}
            _ = accept_loop(listener, limits, tls, tx.clone()) => {}
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|conn| (conn, rx)) })
}

async fn accept_loop(
    listener: TcpListener,
    limits: ConnectionLimits,
    tls: Option<Arc<Tls>>,
    tx: tokio::sync::mpsc::UnboundedSender<io::Result<Conn>>,
) {
    let slots = Arc::new(Semaphore::new(limits.max));
    let peers = Arc::new(std::sync::Mutex::new(HashMap::new()));
    // Warnings an attacker could repeat: at most one per 10 s each.
    let every = Duration::from_secs(10);
    let (full_warned, peer_warned, error_warned) = (Throttle::new(every), Throttle::new(every), Throttle::new(every));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    let what = format!(
                        "connection limit reached (--max-connections, {}); closing new connections until some close",
                        limits.max
                    );
                    turn_away(stream, peer, "limit", &full_warned, &what);
                    continue;
                };
                let Some(peer_slot) = PeerSlot::take(&peers, peer.ip(), limits.per_peer) else {
                    let what = format!(
                        "connection limit of one peer reached (--max-connections-per-peer, {}); closing its new connections until some close",
                        limits.per_peer
                    );
                    turn_away(stream, peer, "peer_limit", &peer_warned, &what);
                    continue;
                };
                let slot = (slot, peer_slot);
                if let Err(e) = stream.set_nodelay(true) {
                    warn!(%peer, cause = %e, "cannot set TCP_NODELAY");
                }
                let opened = Instant::now();
                let tcp = TcpConnectInfo { local_addr: stream.local_addr().ok(), remote_addr: stream.peer_addr().ok() };
                match &tls {
                    None => {
                        let _ = tx.send(Ok(Conn::new(Io::Plain(stream), tcp, PeerCert::None, slot, limits, opened)));
                    }
                    Some(tls) => {
                        let (acceptor, tx) = (tls.acceptor(), tx.clone());
                        tokio::spawn(async move {
                            let handshake = tokio::time::timeout_at(opened + limits.handshake, acceptor.accept(stream));
                            match handshake.await {
                                Ok(Ok(stream)) => {
                                    let cert = match tls::identity_of(stream.get_ref().1.peer_certificates()) {
                                        None => PeerCert::None,
                                        Some(Ok(name)) => PeerCert::Named(name.into()),
                                        Some(Err(why)) => PeerCert::Unnamed(why.into()),
                                    };
                                    let io = Io::Tls(Box::new(stream));
                                    let _ = tx.send(Ok(Conn::new(io, tcp, cert, slot, limits, opened)));
                                }
                                // Plaintext, an unknown CA, an expired
                                // certificate...: the client sees the alert.
                                Ok(Err(e)) => {
                                    if let Some(held_back) = HANDSHAKE_WARNED.allow() {
                                        warn!(%peer, cause = %e, held_back, "TLS handshake failed (a warning at most every 10 s, each one at DEBUG; held_back: the failures since the last warning)");
                                    } else {
                                        tracing::debug!(%peer, cause = %e, "TLS handshake failed");
                                    }
                                    crate::metrics::connection_cut("handshake");
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "no TLS handshake within the handshake timeout");
                                    crate::metrics::connection_cut("handshake");
                                }
                            }
                        });
                    }
                }
            }
            Err(e) => {
                if let Some(held_back) = error_warned.allow() {
                    warn!(cause = %e, held_back, "cannot accept a connection; retrying every {} ms", ACCEPT_BACKOFF.as_millis());
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Failed TLS handshakes: one WARN per 10 s (each one at DEBUG).
static HANDSHAKE_WARNED: Throttle = Throttle::new(Duration::from_secs(10));

/// Requests cut off for their body: one WARN per 10 s.
static BODY_WARNED: Throttle = Throttle::new(Duration::from_secs(10));

/// A connection's place under the per-peer cap; gives it back on drop.
struct PeerSlot {
    peers: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PeerSlot {
    /// A place for one more connection from `ip`, if it has fewer than
    /// `cap` open.
    fn take(peers: &Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, cap: usize) -> Option<PeerSlot> {
        let mut open = lock(peers);
        let count = open.entry(ip).or_insert(0);
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(PeerSlot { peers: peers.clone(), ip })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.peers);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Closes a connection the caps leave no room for: counted under `reason`,
/// and warned about (`what`) as `warned` allows.
fn turn_away(stream: TcpStream, peer: std::net::SocketAddr, reason: &'static str, warned: &Throttle, what: &str) {
    if let Some(held_back) = warned.allow() {
        warn!(%peer, held_back, "{what}");
    }
    crate::metrics::connection_cut(reason);
    drop(stream);
}

/// What a connection and the requests on it share: how many requests are
/// in flight, and since when none is.
#[derive(Debug)]
pub struct ConnState {
    in_flight: AtomicUsize,
    idle_since: std::sync::Mutex<Instant>,
    reader: AtomicWaker,
}

impl ConnState {
    /// Marks a request in flight until the guard drops.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }
}

/// A request in flight on a connection; see [`ConnState::request`].
#[derive(Debug)]
pub struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *lock(&self.0.idle_since) = Instant::now();
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The reader re-arms its idle deadline.
            self.0.reader.wake();
        }
    }
}

/// What a request learns about its connection (a request extension).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The peer and local addresses, as tonic reports them for TCP.
    pub tcp: TcpConnectInfo,
    /// The client certificate's identity, with TLS.
    pub cert: PeerCert,
    /// The connection's request counter.
    pub state: Arc<ConnState>,
}

/// An accepted connection: the stream, its slot under the cap, and its
/// handshake and idle deadlines (enforced when the server reads from it).
pub struct Conn {
    stream: Io,
    info: ConnInfo,
    limits: ConnectionLimits,
    opened: Instant,
    preface_left: usize,
    timer: Pin<Box<Sleep>>,
    _slot: (OwnedSemaphorePermit, PeerSlot),
}

impl Conn {
    fn new(
        stream: Io,
        tcp: TcpConnectInfo,
        cert: PeerCert,
        slot: (OwnedSemaphorePermit, PeerSlot),
        limits: ConnectionLimits,
        opened: Instant,
    ) -> Self {
        let state = Arc::new(ConnState {
            in_flight: AtomicUsize::new(0),
            idle_since: opened.into(),
            reader: AtomicWaker::new(),
        });
        let timer = Box::pin(tokio::time::sleep_until(opened + limits.handshake));
        Conn { stream, info: ConnInfo { tcp, cert, state }, limits, opened, preface_left: PREFACE, timer, _slot: slot }
    }

    /// With nothing to read: whether the connection is past a deadline
    /// (its metric label and why). Arms the timer, or the wake-up of the
    /// last request's end.
    fn overdue(&mut self, cx: &mut Context<'_>) -> Option<(&'static str, &'static str)> {
        let (deadline, why) = if self.preface_left > 0 {
            (self.opened + self.limits.handshake, ("handshake", "no HTTP/2 preface within the handshake timeout"))
        } else {
            let state = &self.info.state;
            state.reader.register(cx.waker());
            if state.in_flight.load(Ordering::Acquire) > 0 {
                return None;
            }
            (*lock(&state.idle_since) + self.limits.idle, ("idle", "idle: no request within the idle timeout"))
        };
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return None;
        }
        // A request may have started since the check above.
        (self.preface_left > 0 || self.info.state.in_flight.load(Ordering::Acquire) == 0).then_some(why)
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        if let Poll::Ready(result) = Pin::new(&mut this.stream).poll_read(cx, buf) {
            this.preface_left = this.preface_left.saturating_sub(buf.filled().len() - before);
            return Poll::Ready(result);
        }
        match this.overdue(cx) {
            Some((reason, why)) => {
                crate::metrics::connection_cut(reason);
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)))
            }
            None => Poll::Pending,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// A connection's byte stream: plain TCP, or TLS over it.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The bytes of requests held in memory at once (see the module docs).
#[derive(Clone, Debug)]
pub struct RequestBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl RequestBudget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Self {
        // `acquire_many` counts in u32.
        let total = total.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        RequestBudget { bytes: Arc::new(Semaphore::new(total)), total }
    }
}

/// A tower layer that counts each request against its connection's idle
/// clock (see [`ConnState`]) until its response body has ended, so a
/// stream (health `Watch`, reflection) keeps its connection as a waiting
/// unary call does; gives its body a [`Deadline`]; and reserves its size
/// in the [`RequestBudget`].
#[derive(Clone)]
pub struct TrackRequests {
    /// Time a request has, from its headers, to send its whole body.
    pub body: Duration,
    /// The bytes of requests held at once.
    pub budget: RequestBudget,
    /// Who may call: under a policy, a request with no identity is refused
    /// before its body is read.
    pub access: Arc<Access>,
}

impl<S> tower::Layer<S> for TrackRequests {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Tracked<S> {
        Tracked { inner, body: self.body, budget: self.budget.clone(), access: self.access.clone() }
    }
}

/// See [`TrackRequests`].
#[derive(Clone)]
pub struct Tracked<S> {
    inner: S,
    body: Duration,
    budget: RequestBudget,
    access: Arc<Access>,
}

/// Whether a request to `path` needs an identity under a policy, checked
/// before its body is read: the tcc services (not health, reflection,
/// `/metrics`, or the console, whose handlers check).
fn needs_identity(path: &str) -> bool {
    path.starts_with("/tcc.v1.")
}

impl<S, B, R> tower::Service<http::Request<B>> for Tracked<S>
where
    B: http_body::Body,
    S: tower::Service<http::Request<Deadline<B>>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Counted<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let info = request.extensions().get::<ConnInfo>().cloned();
        let guard = info.map(|info| {
            // For `Request::remote_addr`, and for `auth`.
            request.extensions_mut().insert(info.tcp.clone());
            request.extensions_mut().insert(info.cert.clone());
            info.state.request()
        });
        let method = crate::metrics::method_label(request.uri().path());
        let started = std::time::Instant::now();
        let deadline = Instant::from_std(started) + self.body;
        // Identity before the body (see the module docs); the handler
        // checks it again, with the rule of its call.
        let refusal = if self.access.is_enforced() && needs_identity(request.uri().path()) {
            let (parts, body) = request.into_parts();
            let refused = self.access.http_caller(&parts, method).err();
            request = http::Request::from_parts(parts, body);
            refused.map(|e| tonic::Status::unauthenticated(e.to_string()))
        } else {
            None
        };
        let size = request_size(&request);
        let held = Arc::new(std::sync::Mutex::new(None));
        let reserve = Reserve { budget: self.budget.clone(), size, held: held.clone(), waiting: None, first: None };
        let request = request.map(|body| Deadline {
            body,
            deadline,
            timer: None,
            expired: false,
            refusal,
            reserve: Some(reserve),
        });
        // Untraced, a disabled span: entering it is one branch.
        let span = match crate::telemetry::enabled() {
            true => crate::telemetry::server_span(request.uri().path(), request.headers()),
            false => tracing::Span::none(),
        };
        let response = tracing::Instrument::instrument(span.in_scope(|| self.inner.call(request)), span);
        Box::pin(async move {
            let response = response.await?;
            // An error answered at once carries its status in the headers.
            let code = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let plain_ok = response.status().is_success() && code.is_none();
            let rpc = Rpc { method, started, code, plain_ok };
            Ok(response.map(|body| Counted { body: Box::pin(body), _guard: guard, _held: held, rpc }))
        })
    }
}

/// What an RPC's latency is recorded with once its response ends.
struct Rpc {
    /// Its `method` label.
    method: &'static str,
    started: std::time::Instant,
    /// The `grpc-status`, from the headers or the trailers.
    code: Option<String>,
    /// A plain HTTP answer (`/metrics`) that succeeded.
    plain_ok: bool,
}

/// A response body that holds its request's [`InFlight`] until it ends
/// (or is dropped), and records the RPC's latency and status then.
pub struct Counted<B> {
    body: Pin<Box<B>>,
    _guard: Option<InFlight>,
    /// The request's bytes in the budget, kept until the answer is out.
    _held: Held,
    rpc: Rpc,
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        let rpc = &self.rpc;
        let code = rpc.code.as_deref().unwrap_or(if rpc.plain_ok { "0" } else { "unknown" });
        crate::metrics::rpc(rpc.method, code, rpc.started.elapsed());
    }
}

impl<B: http_body::Body> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = self.body.as_mut().poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(status) = frame.trailers_ref().and_then(|t| t.get("grpc-status")).and_then(|v| v.to_str().ok())
        {
            self.rpc.code = Some(status.to_string());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A request's reservation in the [`RequestBudget`], shared by its body and
/// its response (released when both are gone).
type Held = Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>;

/// How a request's size is known before its body is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Size {
    /// Its Content-Length.
    Declared(u64),
    /// gRPC: the length prefix of its first message (5 bytes + length).
    Grpc,
    /// Neither (a body-less or chunked plain HTTP request): not reserved.
    Unknown,
}

fn request_size<B>(request: &http::Request<B>) -> Size {
    let header = |name| request.headers().get(name).and_then(|v: &http::HeaderValue| v.to_str().ok());
    if let Some(len) = header(http::header::CONTENT_LENGTH).and_then(|v| v.parse().ok()) {
        return Size::Declared(len);
    }
    match header(http::header::CONTENT_TYPE) {
        Some(t) if t.starts_with("application/grpc") => Size::Grpc,
        _ => Size::Unknown,
    }
}

/// Reserving a request's size before its body is read.
struct Reserve<D> {
    budget: RequestBudget,
    size: Size,
    held: Held,
    /// The acquisition under way, when the budget is short.
    waiting: Option<Pin<Box<dyn std::future::Future<Output = Option<OwnedSemaphorePermit>> + Send>>>,
    /// The first frame of a gRPC request, read for its length prefix and
    /// handed on once the size is reserved.
    first: Option<http_body::Frame<D>>,
}

/// A request body that must end by a deadline (see the module docs): past
/// it, it fails with DEADLINE_EXCEEDED (tonic answers with that status; the
/// console with 400), logged and counted. The timer is armed only when
/// the body first waits (for data, or for room in the budget), so a
/// request that arrives whole and fits (nearly every one) costs no timer.
pub struct Deadline<B: http_body::Body> {
    body: B,
    deadline: Instant,
    timer: Option<Pin<Box<Sleep>>>,
    expired: bool,
    /// The caller has no identity that holds up: the body is not read.
    refusal: Option<tonic::Status>,
    /// Until the request's size is reserved.
    reserve: Option<Reserve<B::Data>>,
}

impl<B> Deadline<B>
where
    B: http_body::Body + Unpin,
    B::Error: Into<tower::BoxError>,
{
    /// Reserves the request's size: `Ready(Ok(()))` once reserved (or when
    /// there is nothing to reserve), `Ready(Err)` for a request larger than
    /// the budget, or an error of the body.
    fn poll_reserve(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), tower::BoxError>> {
        let Some(r) = self.reserve.as_mut() else { return Poll::Ready(Ok(())) };
        if r.waiting.is_none() {
            let bytes = match r.size {
                Size::Unknown => 0,
                Size::Declared(len) => len,
                Size::Grpc => {
                    if r.first.is_none() {
                        match Pin::new(&mut self.body).poll_frame(cx) {
                            Poll::Ready(Some(Ok(frame))) => r.first = Some(frame),
                            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                            Poll::Ready(None) => {}
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                    grpc_message_size(r.first.as_ref())
                }
            };
            if bytes == 0 {
                // Nothing to reserve (a frame read for its prefix, if any,
                // is handed on by the caller).
                return Poll::Ready(Ok(()));
            }
            if bytes > r.budget.total as u64 {
                let message = format!(
                    "the request is {bytes} bytes, more than the server holds of requests at once (--max-request-bytes, {} bytes)",
                    r.budget.total
                );
                return Poll::Ready(Err(Box::new(tonic::Status::resource_exhausted(message))));
            }
            let n = u32::try_from(bytes).unwrap_or(u32::MAX);
            match r.budget.bytes.clone().try_acquire_many_owned(n) {
                Ok(permit) => {
                    *lock(&r.held) = Some(permit);
                    return Poll::Ready(Ok(()));
                }
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    let semaphore = r.budget.bytes.clone();
                    r.waiting = Some(Box::pin(async move { semaphore.acquire_many_owned(n).await.ok() }));
                }
                Err(tokio::sync::TryAcquireError::Closed) => return Poll::Ready(Ok(())),
            }
        }
        let Some(waiting) = r.waiting.as_mut() else { return Poll::Ready(Ok(())) };
        match waiting.as_mut().poll(cx) {
            Poll::Ready(permit) => {
                *lock(&r.held) = permit;
                r.waiting = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The bytes a gRPC request's first message takes (prefix included), from
/// the first frame: what the frame holds if it is shorter than the prefix,
/// 0 without a data frame.
fn grpc_message_size<D: bytes::Buf>(first: Option<&http_body::Frame<D>>) -> u64 {
    let Some(data) = first.and_then(|f| f.data_ref()) else { return 0 };
    match data.chunk().get(..5) {
        Some(prefix) => 5 + u64::from(u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]])),
        None => data.remaining() as u64,
    }
}

impl<B> http_body::Body for Deadline<B>
where
    B: http_body::Body + Unpin,
    B::Data: Unpin,
    B::Error: Into<tower::BoxError>,
{
    type Data = B::Data;
    type Error = tower::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(None);
        }
        if let Some(refusal) = this.refusal.take() {
            this.expired = true;
            return Poll::Ready(Some(Err(Box::new(refusal))));
        }
        let polled = match this.poll_reserve(cx) {
            Poll::Ready(Err(e)) => {
                this.expired = true;
                return Poll::Ready(Some(Err(e)));
            }
            Poll::Ready(Ok(())) => {
                let first = this.reserve.take().and_then(|mut r| r.first.take());
                match first {
                    Some(frame) => return Poll::Ready(Some(Ok(frame))),
                    None => Pin::new(&mut this.body).poll_frame(cx),
                }
            }
            Poll::Pending => Poll::Pending,
        };
        match polled {
            Poll::Ready(Some(frame)) => return Poll::Ready(Some(frame.map_err(Into::into))),
            Poll::Ready(None) => {
                this.timer = None;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        let deadline = this.deadline;
        let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.expired = true;
        crate::metrics::connection_cut("body_timeout");
        if let Some(held_back) = BODY_WARNED.allow() {
            warn!(
                held_back,
                "a request's body did not arrive within the body timeout (--body-timeout-ms), or found no room in --max-request-bytes; failing it (logged at most every 10 s; held_back: the like since the last line)"
            );
        }
        let status = tonic::Status::deadline_exceeded(
            "the request's body did not arrive within the server's body timeout (--body-timeout-ms), or the server had no room for it (--max-request-bytes) in that time; send the whole request at once, and retry later",
        );
        Poll::Ready(Some(Err(Box::new(status))))
    }

    fn is_end_stream(&self) -> bool {
        self.expired || (self.reserve.as_ref().is_none_or(|r| r.first.is_none()) && self.body.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
