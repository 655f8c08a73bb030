//! The accept loop and every connection's life: the connection limit, the TLS handshake, protocol
//! detection (ALPN, or the HTTP/2 preface on plain TCP), HTTP/1.1 or HTTP/2 with their bounds,
//! and a graceful drain with a deadline on shutdown. The only module that accepts sockets.
//!
//! Every phase of a connection has a deadline, so a host cannot hold sockets by saying nothing:
//! - TLS handshake: `--tls-handshake-timeout-secs`;
//! - first byte and protocol detection, and each HTTP/1.1 request head:
//!   `--header-read-timeout-secs`;
//! - no request in flight (HTTP/1.1 keep-alive, an HTTP/2 connection without streams):
//!   `--idle-timeout-secs`, then the connection is closed gracefully;
//! - HTTP/2 peers that stop answering pings: `--h2-keepalive-secs`;
//! - a client that stops reading a response: a write that cannot progress for
//!   `--body-idle-timeout-secs` fails the connection (`Deadlined`), which frees the upstream
//!   connection it pinned.
//!
//! At `--max-connections`, connections that hold a slot without using it are asked to leave: no
//! request in flight (or no handshake or first request yet) for [`SHED_IDLE_AFTER`], or a
//! response the client has not read for [`SHED_STALLED_AFTER`]. Idle, silent or non-reading
//! sockets from one host cannot lock everyone else out.
//!
//! Bounds: `--max-connections` sockets, `--h2-max-concurrent-streams` per HTTP/2 connection,
//! `--max-requests` in flight over all connections (past it: 503 with `Retry-After`, at once),
//! request heads of `--max-header-bytes` and `--max-headers` (past them: 431).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

use prometheus_client::metrics::gauge::Gauge;

use crate::app::{App, ConnInfo};
use crate::body::ProxyBody;
use crate::config::{Limits, Timeouts};
use crate::metrics;
use crate::telemetry::Logged;

/// Pause after a failed `accept` (e.g. EMFILE) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF_MS: u64 = 100;
/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How often a partial preface is looked at again while it trickles in.
const PREFACE_POLL_MS: u64 = 5;
/// Time a connection closed for idleness gets to say goodbye (HTTP/2 GOAWAY) before it is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// At the connection limit, connections idle (or silent) this long are shed to make room. A
/// client accepted from the backlog has its request (or TLS hello) waiting already.
pub const SHED_IDLE_AFTER: Duration = Duration::from_millis(500);
/// At the connection limit, connections whose response write has not progressed this long (the
/// client reads nothing) are cut to make room. A slow but reading client frees buffer space
/// within milliseconds.
pub const SHED_STALLED_AFTER: Duration = Duration::from_secs(1);
/// How often the accept loop, blocked at the limit, asks idle connections to leave.
const PRESSURE_INTERVAL: Duration = Duration::from_millis(100);

/// How connections are served; built once.
struct Protocols {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
    timeouts: Timeouts,
}

/// HTTP/2 flow-control window per stream that regrelay advertises to clients.
const H2_STREAM_WINDOW: u32 = 8 << 20;
/// HTTP/2 flow-control window per connection that regrelay advertises to clients.
const H2_CONNECTION_WINDOW: u32 = 16 << 20;

impl Protocols {
    fn new(app: &App) -> Protocols {
        let cfg = app.config();
        let (limits, timeouts): (Limits, Timeouts) = (cfg.limits, cfg.timeouts);
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(timeouts.header_read)
            .max_header_size(limits.max_header_bytes)
            .max_headers(limits.max_headers);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        // Flow-control windows for uploads over long round trips: hyper's 1 MiB default held an
        // h2 upload over 50 ms to 0.32x of HTTP/1.1's speed. Adaptive windows start at 64 KiB
        // and double per measured round trip up to 16 MiB, so a 64 MiB layer over 50 ms spent
        // most of its time ramping up (0.68x); fixed windows of what nginx and HAProxy are
        // tuned to (8 MiB per stream, 16 MiB per connection: adaptive's own ceiling) start
        // there (bench/README.md, "Levers"). A window is a promise, not a buffer: data waits in
        // it only while the upstream reads slower than the client sends.
        h2.timer(TokioTimer::new())
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(timeouts.h2_keepalive)
            .keep_alive_timeout(timeouts.h2_keepalive);
        Protocols {
            h1,
            h2,
            tls: app.server_tls().map(TlsAcceptor::from),
            timeouts,
        }
    }
}

/// Where the server is in its shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepting and serving (during the shutdown delay too: only readiness says otherwise).
    Serving,
    /// The listener is closed: connections finish their requests and close.
    Draining,
    /// The grace period is over: connections with no upload in flight are closed.
    GraceOver,
}

/// Serves `listener` until `shutdown` resolves; then, in phases: reports not-ready while still
/// accepting and serving for `--shutdown-delay-secs` (balancers take the replica out), stops
/// accepting, lets requests finish (keep-alive connections close after their current request),
/// closes connections with no upload in flight at `--shutdown-grace-secs`, and lets uploads run
/// until `--upload-drain-secs`. `force` (a second signal) ends the drain at once.
pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
    force: impl Future<Output = ()>,
) {
    let limits = app.config().limits;
    let t = app.config().timeouts;
    let protocols = Arc::new(Protocols::new(&app));
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let (phase, phases) = watch::channel(Phase::Serving);
    let acceptor = Acceptor {
        listener,
        connections: connections.clone(),
        template: Shared {
            app: app.clone(),
            protocols,
            requests: Arc::new(Semaphore::new(limits.max_requests)),
            uploads: app.metrics().uploads_in_flight.clone(),
            phases,
            pressure: Arc::new(Notify::new()),
            accepted: Instant::now(),
        },
    };
    let uploads = acceptor.template.uploads.clone();
    let phase_gauge = app.metrics().shutdown_phase.clone();
    tokio::pin!(force);
    acceptor.accept_until(shutdown).await;
    app.set_draining();
    phase_gauge.set(metrics::phase::DELAY);
    tracing::info!(
        delay_secs = t.shutdown_delay.as_secs(),
        "shutting down: not ready, still serving during the delay"
    );
    let forced = tokio::select! {
        () = acceptor.accept_until(tokio::time::sleep(t.shutdown_delay)) => false,
        () = &mut force => true,
    };
    drop(acceptor);
    let _ = phase.send(Phase::Draining);
    phase_gauge.set(metrics::phase::DRAINING);
    let open = limits.max_connections - connections.available_permits();
    tracing::info!(
        connections = open,
        grace_secs = t.shutdown_grace.as_secs(),
        upload_drain_secs = t.upload_drain.as_secs(),
        "draining"
    );
    if forced {
        tracing::warn!("second signal: closing every connection now");
        return;
    }
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let all_closed = connections.clone().acquire_many_owned(all);
    tokio::pin!(all_closed);
    let stop_accepting = Instant::now();
    let grace_at = stop_accepting + t.shutdown_grace;
    let upload_at = stop_accepting + t.upload_drain;
    // Waits until `$at`; returns from `run` when every connection closed or on a second signal.
    macro_rules! wait_until {
        ($at:expr) => {
            tokio::select! {
                _ = &mut all_closed => return tracing::info!("drained"),
                () = tokio::time::sleep_until($at) => {}
                () = &mut force => return tracing::warn!("second signal: closing every connection now"),
            }
        };
    }
    wait_until!(grace_at.min(upload_at));
    if grace_at <= upload_at {
        let _ = phase.send(Phase::GraceOver);
        phase_gauge.set(metrics::phase::GRACE_OVER);
        tracing::warn!(
            uploads = uploads.get(),
            "grace period over; closing connections without an upload in flight"
        );
        wait_until!(upload_at);
    }
    // Uploads sent in parts end their part and answer their clients (202 with what the registry
    // holds, or 503 + Retry-After), reading the rest of each body for a moment meanwhile.
    let told = app.cut_uploads();
    phase_gauge.set(metrics::phase::UPLOADS_CUT);
    tracing::warn!(
        uploads = uploads.get(),
        "upload drain over; cutting uploads and closing remaining connections"
    );
    let linger = if told > 0 {
        Instant::now() + crate::upload::CUT_LINGER
    } else {
        Instant::now()
    };
    // An upload drain shorter than the grace period leaves requests without a body their grace.
    wait_until!(linger.max(grace_at));
}

/// The listening half: accepts connections and starts their tasks.
struct Acceptor {
    listener: TcpListener,
    connections: Arc<Semaphore>,
    /// What each connection task gets (its `accepted` is stamped per connection).
    template: Shared,
}

impl Acceptor {
    /// Accepts until `until` resolves.
    async fn accept_until(&self, until: impl Future<Output = ()>) {
        tokio::pin!(until);
        loop {
            let permit = tokio::select! {
                permit = slot(&self.connections, &self.template.pressure) => permit,
                () = &mut until => return,
            };
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(err) => {
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
                        continue;
                    }
                },
                () = &mut until => return,
            };
            let _ = stream.set_nodelay(true);
            let conn = ConnInfo {
                peer,
                tls: self.template.protocols.tls.is_some(),
            };
            let mut shared = self.template.clone();
            shared.accepted = Instant::now();
            let metrics = shared.app.metrics().clone();
            metrics.connections_accepted.inc();
            metrics.connections_open.inc();
            tokio::spawn(async move {
                serve_connection(stream, conn, shared).await;
                metrics.connections_open.dec();
                drop(permit);
            });
        }
    }
}

/// A connection slot; at the limit, asks idle connections to leave until one is free.
async fn slot(connections: &Arc<Semaphore>, pressure: &Notify) -> OwnedSemaphorePermit {
    if let Ok(permit) = connections.clone().try_acquire_owned() {
        return permit;
    }
    loop {
        pressure.notify_waiters();
        let wait = connections.clone().acquire_owned();
        if let Ok(permit) = tokio::time::timeout(PRESSURE_INTERVAL, wait).await {
            return permit.expect("the semaphore is never closed");
        }
    }
}

/// Resolves when the server is at its connection limit and `sheddable` says the connection has
/// been idle or stalled for its allowance.
async fn shed(pressure: &Notify, sheddable: impl Fn() -> bool) {
    loop {
        pressure.notified().await;
        if sheddable() {
            return;
        }
    }
}

/// What every connection task shares.
#[derive(Clone)]
struct Shared {
    app: Arc<App>,
    protocols: Arc<Protocols>,
    requests: Arc<Semaphore>,
    /// Blob uploads in flight, server-wide (they may outlive the grace period); also the
    /// `regrelay_uploads_in_flight` gauge.
    uploads: Gauge,
    phases: watch::Receiver<Phase>,
    pressure: Arc<Notify>,
    accepted: Instant,
}

async fn serve_connection(stream: TcpStream, conn: ConnInfo, shared: Shared) {
    let t = shared.protocols.timeouts;
    let pressure = shared.pressure.clone();
    let accepted = shared.accepted;
    let shed_early = shed(&pressure, || accepted.elapsed() >= SHED_IDLE_AFTER);
    tokio::pin!(shed_early);
    let Some(acceptor) = shared.protocols.tls.clone() else {
        let detected = tokio::select! {
            h2 = detect_h2(&stream, t.header_read) => h2,
            () = &mut shed_early => None,
        };
        match detected {
            Some(h2) => drive(stream, h2, conn, shared).await,
            None => tracing::debug!(peer = %conn.peer, "no request in time; closed"),
        }
        return;
    };
    let handshake = tokio::time::timeout(t.tls_handshake, acceptor.accept(stream));
    let done = tokio::select! {
        done = handshake => done,
        () = &mut shed_early => {
            tracing::debug!(peer = %conn.peer, "tls handshake unfinished at the connection limit; closed");
            return;
        }
    };
    match done {
        Ok(Ok(stream)) => {
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            drive(stream, h2, conn, shared).await;
        }
        Ok(Err(err)) => tracing::debug!(peer = %conn.peer, error = %err, "tls handshake failed"),
        Err(_) => tracing::debug!(peer = %conn.peer, "tls handshake timed out"),
    }
}

/// On plain TCP: `Some(true)` when the client opens with the HTTP/2 preface (h2c prior
/// knowledge), `Some(false)` for anything else; `None` when it closes or says too little in time.
async fn detect_h2(stream: &TcpStream, deadline: Duration) -> Option<bool> {
    let look = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        loop {
            let n = stream.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if buf[..n] != H2_PREFACE[..n] {
                return Some(false);
            }
            if n == H2_PREFACE.len() {
                return Some(true);
            }
            // A prefix of the preface: wait for the rest (peek would return at once).
            tokio::time::sleep(Duration::from_millis(PREFACE_POLL_MS)).await;
        }
    };
    tokio::time::timeout(deadline, look).await.ok().flatten()
}

/// Serves HTTP/1.1 or HTTP/2 on `io` until the connection ends, is idle too long, or the server
/// stops.
async fn drive<I>(io: I, h2: bool, conn: ConnInfo, shared: Shared)
where
    I: Socket + Send + 'static,
{
    let Shared {
        app,
        protocols,
        requests,
        uploads,
        phases,
        pressure,
        ..
    } = shared;
    let t = protocols.timeouts;
    let metrics = app.metrics().clone();
    let state = Arc::new(ConnState::new());
    let io = TokioIo::new(Deadlined::new(io, t.body_idle, state.clone()));
    let tracker = state.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let (app, requests, tracker) = (app.clone(), requests.clone(), tracker.clone());
        let uploads = uploads.clone();
        async move {
            let Ok(permit) = requests.try_acquire_owned() else {
                return Ok::<_, Infallible>(app.overloaded(&req, conn).map(Tracked::without));
            };
            let upload = is_upload(&req);
            let guard = InFlight::enter(tracker, permit, upload.then_some(uploads));
            let resp = app.handle(req, conn).await;
            Ok(resp.map(|inner| Tracked {
                inner,
                _guard: Some(guard),
            }))
        }
    });
    let watch = Watch {
        metrics: &metrics,
        state: &state,
        phases,
        pressure: &pressure,
        t,
    };
    let result = if h2 {
        supervise(protocols.h2.serve_connection(io, service), watch).await
    } else {
        supervise(protocols.h1.serve_connection(io, service), watch).await
    };
    if let Err(err) = result {
        tracing::debug!(peer = %conn.peer, error = %err, "connection ended with error");
    }
}

/// What a running connection is watched for.
struct Watch<'a> {
    metrics: &'a metrics::Metrics,
    state: &'a ConnState,
    phases: watch::Receiver<Phase>,
    pressure: &'a Notify,
    t: Timeouts,
}

/// Runs a connection; closes it gracefully when no request was in flight for the idle timeout
/// (the header read timeout before its first request), when it is idle at the connection limit,
/// or when the server stops.
async fn supervise<C: GracefulConnection<Error = hyper::Error>>(
    conn: C,
    watch: Watch<'_>,
) -> hyper::Result<()> {
    let Watch {
        metrics,
        state,
        mut phases,
        pressure,
        t,
    } = watch;
    let mut draining = false;
    tokio::pin!(conn);
    let mut closing: Option<Instant> = None;
    loop {
        let wake = match closing {
            Some(cut) => cut,
            None => state.idle_deadline(t.header_read, t.idle),
        };
        tokio::select! {
            res = conn.as_mut() => return res,
            () = tokio::time::sleep_until(wake) => {
                if closing.is_some() {
                    tracing::debug!("connection did not close in time after going idle; cut");
                    return Ok(());
                }
                if state.is_idle_since(t.header_read, t.idle) {
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Instant::now() + CLOSE_GRACE);
                }
            }
            () = shed(pressure, || state.sheddable()), if closing.is_none() => {
                let why = if state.stalled_since().is_some() { "stalled" } else { "idle" };
                metrics.connections_shed.get_or_create(&metrics::OutcomeLabels { outcome: why }).inc();
                if state.stalled_since().is_some() {
                    tracing::debug!("connection not reading its response cut at the connection limit");
                    state.cut();
                    closing = Some(Instant::now() + CLOSE_GRACE);
                    continue;
                }
                // Nothing is in flight: no goodbye is owed (a client that does not answer an
                // HTTP/2 GOAWAY's ping would otherwise keep the slot for the close grace).
                tracing::debug!("idle connection shed at the connection limit");
                return Ok(());
            }
            changed = phases.changed() => {
                let phase = if changed.is_err() { Phase::GraceOver } else { *phases.borrow() };
                if phase != Phase::Serving && !draining {
                    // Draining: finish the requests in flight, take no new ones (keep-alive
                    // connections close after their current request). The drain deadlines are
                    // the server's.
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Instant::now() + Duration::from_secs(365 * 24 * 3600));
                }
                if phase == Phase::GraceOver && state.uploads.load(Ordering::Acquire) == 0 {
                    tracing::debug!("grace period over: connection without an upload closed");
                    return Ok(());
                }
                if changed.is_err() {
                    // The server is gone; its runtime ends this task.
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// Requests in flight on one connection, since when it has had none, and since when a write to
/// it has been stuck.
struct ConnState {
    active: AtomicUsize,
    /// Blob uploads among them.
    uploads: AtomicUsize,
    served: AtomicBool,
    since: Mutex<Instant>,
    /// Since when a write has been pending, and the task to wake to cut it.
    stalled: Mutex<Option<(Instant, Waker)>>,
    /// Set to cut a stalled connection at once (its socket is reset).
    abort: AtomicBool,
}

impl ConnState {
    fn new() -> ConnState {
        ConnState {
            active: AtomicUsize::new(0),
            uploads: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            since: Mutex::new(Instant::now()),
            stalled: Mutex::new(None),
            abort: AtomicBool::new(false),
        }
    }

    fn stalled_since(&self) -> Option<Instant> {
        self.stalled
            .lock()
            .expect("conn state lock")
            .as_ref()
            .map(|(t, _)| *t)
    }

    /// Cuts a stalled connection: its pending write fails and its socket is reset.
    fn cut(&self) {
        self.abort.store(true, Ordering::Release);
        if let Some((_, waker)) = self.stalled.lock().expect("conn state lock").as_ref() {
            waker.wake_by_ref();
        }
    }

    /// True when the connection may be shed at the connection limit.
    fn sheddable(&self) -> bool {
        let stalled = self
            .stalled_since()
            .is_some_and(|t| t.elapsed() >= SHED_STALLED_AFTER);
        let idle = self
            .idle_since()
            .is_some_and(|t| t.elapsed() >= SHED_IDLE_AFTER);
        stalled || idle
    }

    fn limit(&self, first: Duration, idle: Duration) -> Duration {
        if self.served.load(Ordering::Acquire) {
            idle
        } else {
            first
        }
    }

    /// When to look again: the end of the idle allowance, or (while busy) one allowance away.
    fn idle_deadline(&self, first: Duration, idle: Duration) -> Instant {
        let limit = self.limit(first, idle);
        if self.active.load(Ordering::Acquire) > 0 {
            return Instant::now() + limit;
        }
        *self.since.lock().expect("conn state lock") + limit
    }

    /// Since when no request has been in flight, if none is.
    fn idle_since(&self) -> Option<Instant> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(*self.since.lock().expect("conn state lock"))
    }

    fn is_idle_since(&self, first: Duration, idle: Duration) -> bool {
        self.active.load(Ordering::Acquire) == 0
            && self.since.lock().expect("conn state lock").elapsed() >= self.limit(first, idle)
    }
}

/// One request in flight: counted on its connection and in the server-wide bound until its
/// response body is done (or dropped).
struct InFlight {
    state: Arc<ConnState>,
    /// The server-wide upload count, when this request is a blob upload.
    upload: Option<Gauge>,
    _permit: OwnedSemaphorePermit,
}

impl InFlight {
    fn enter(
        state: Arc<ConnState>,
        permit: OwnedSemaphorePermit,
        upload: Option<Gauge>,
    ) -> InFlight {
        state.served.store(true, Ordering::Release);
        state.active.fetch_add(1, Ordering::AcqRel);
        if let Some(uploads) = &upload {
            uploads.inc();
            state.uploads.fetch_add(1, Ordering::AcqRel);
        }
        InFlight {
            state,
            upload,
            _permit: permit,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.state.since.lock().expect("conn state lock") = Instant::now();
        self.state.active.fetch_sub(1, Ordering::AcqRel);
        if let Some(uploads) = &self.upload {
            uploads.dec();
            self.state.uploads.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A blob upload request (`POST`/`PATCH`/`PUT` under `/v2/<name>/blobs/uploads/`): it may
/// continue past the grace period, until `--upload-drain-secs`.
fn is_upload(req: &Request<Incoming>) -> bool {
    matches!(*req.method(), Method::POST | Method::PATCH | Method::PUT)
        && req.uri().path().contains("/blobs/uploads/")
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted until it is done.
    struct Tracked {
        #[pin]
        inner: Logged<ProxyBody>,
        _guard: Option<InFlight>,
    }
}

impl Tracked {
    fn without(inner: Logged<ProxyBody>) -> Tracked {
        Tracked {
            inner,
            _guard: None,
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = crate::error::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client connection's socket: plain TCP or TLS over TCP.
trait Socket: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;
}

impl Socket for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Socket for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// A client socket whose writes fail once they cannot progress for `stall` (or when the
/// connection is cut at the connection limit): a client that stops reading cannot pin a response
/// (and its upstream connection) forever. The socket is then reset, so the kernel does not keep
/// the unread response queued for it either. The timer is armed only when a write is pending, so
/// the fast path costs nothing.
struct Deadlined<I> {
    io: I,
    stall: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    state: Arc<ConnState>,
}

impl<I: Socket> Deadlined<I> {
    /// Wraps `io`; stalls are reported to `state`.
    fn new(io: I, stall: Duration, state: Arc<ConnState>) -> Self {
        Deadlined {
            io,
            stall,
            timer: None,
            state,
        }
    }

    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        let cut = self.state.abort.load(Ordering::Acquire);
        if polled.is_ready() && !cut {
            if self.timer.take().is_some() {
                *self.state.stalled.lock().expect("conn state lock") = None;
            }
            return polled;
        }
        let stall = self.stall;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        let expired = timer.as_mut().poll(cx).is_ready();
        {
            let mut stalled = self.state.stalled.lock().expect("conn state lock");
            let since = stalled.as_ref().map_or_else(Instant::now, |(t, _)| *t);
            *stalled = Some((since, cx.waker().clone()));
        }
        if !(expired || cut) {
            return Poll::Pending;
        }
        // Reset rather than queue a FIN behind data the client will never read.
        let _ = socket2::SockRef::from(self.io.tcp()).set_linger(Some(Duration::ZERO));
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("client did not read for {} s", stall.as_secs()),
        )))
    }
}

impl<I: Socket> AsyncRead for Deadlined<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: Socket> AsyncWrite for Deadlined<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

/// Raises the soft open-file limit to the hard one and checks that the configured bounds fit
/// in it; returns the limit in force.
pub fn raise_fd_limit(limits: &Limits, upstreams: usize) -> Result<u64, String> {
    let got = rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| format!("cannot read or raise RLIMIT_NOFILE: {e}"))?;
    let needed = limits.fds_needed(upstreams);
    if needed > got {
        return Err(format!(
            "the open-file limit is {got}, but --max-connections {} and \
             --max-upstream-connections {} need {needed} (connections, upstream and token \
             service sockets of every upstream, plus 64); raise LimitNOFILE / ulimit -n or \
             lower the bounds",
            limits.max_connections, limits.max_upstream_connections
        ));
    }
    Ok(got)
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!(signal = "SIGINT", "shutting down"),
        () = term => tracing::info!(signal = "SIGTERM", "shutting down"),
    }
}
