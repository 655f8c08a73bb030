//! The accept loop and every connection's life: the connection limit, the TLS handshake, protocol
//! detection (ALPN, or the HTTP/2 preface on plain TCP), HTTP/1.1 or HTTP/2 with their bounds,
//! and a graceful drain with a deadline on shutdown. The only module that accepts sockets.
//! Which budget each request takes is [`admit`]'s; what a connection knows of its requests,
//! [`state`]'s.
//!
//! Every phase of a connection has a deadline, so a host cannot hold sockets by saying nothing:
//! - TLS handshake: `--tls-handshake-timeout-secs`;
//! - first byte and protocol detection, and each HTTP/1.1 request head:
//!   `--header-read-timeout-secs`;
//! - no request in flight (HTTP/1.1 keep-alive, an HTTP/2 connection without streams):
//!   `--idle-timeout-secs`, then the connection is closed gracefully;
//! - HTTP/2 peers that stop answering pings: `--h2-keepalive-secs`;
//! - an HTTP/2 stream whose response the client takes none of (its window held at zero):
//!   `--h2-stall-timeout-secs`, then that stream alone is reset;
//! - a client that stops reading a response: a write that cannot progress for
//!   `--body-idle-timeout-secs` fails the connection (`Deadlined`), which frees the upstream
//!   connection it pinned.
//!
//! No client holds what all share: each holds at most `--client-share-percent` of connections,
//! requests in flight and upstream connections ([`crate::clients`]). When a shared pool is still
//! exhausted, holders that make no progress go first:
//! - at `--max-connections`, connections with no request in flight (or no handshake or first
//!   request yet) for [`SHED_IDLE_AFTER`], and those not taking their responses for
//!   [`SHED_STALLED_AFTER`] (a write stuck) or [`SHED_STREAM_AFTER`] (every stream stalled), are
//!   asked to leave; up to
//!   [`RESERVE_CONNECTIONS`] more are accepted meanwhile, which answer health checks and wait a
//!   moment for a slot for anything else;
//! - at `--max-requests` or `--max-upstream-connections`, requests not taking their responses
//!   for [`SHED_STREAM_AFTER`] are reset (HTTP/2) or their connection cut (HTTP/1.1).
//!
//! Health checks take no budget at all. Bounds: `--max-connections` sockets,
//! `--h2-max-concurrent-streams` per HTTP/2 connection, `--max-requests` in flight over all
//! connections (past it, and past a client's share: 503 with `Retry-After`), request heads of
//! `--max-header-bytes` and `--max-headers` (past them: 431).

mod admit;
mod deadline;
mod state;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use prometheus_client::metrics::gauge::Gauge;

use crate::app::{App, ConnInfo};
use crate::config::{Limits, Timeouts, RESERVE_CONNECTIONS};
use crate::metrics::{self, OutcomeLabels, PoolLabels};
use admit::Admission;
use deadline::{Deadlined, Socket};
use state::{ConnState, StreamExec};

pub use admit::{PRESSURE_WAIT, RESERVE_WAIT};

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
/// When a shared pool is exhausted, holders not taking their responses this long are shed (a
/// connection whose write has not progressed, an HTTP/2 stream whose window stays at zero). A
/// slow but reading client frees buffer space within milliseconds.
pub const SHED_STALLED_AFTER: Duration = Duration::from_secs(1);
/// When a shared pool is exhausted, requests whose response the client has taken nothing of for
/// this long are shed (an HTTP/2 stream held at a zero window; an HTTP/1.1 response not asked
/// for more). Longer than a socket write's stall: a slow but reading client's kernel buffer can
/// hide its progress from user space for a second or more between wake-ups, and such a client
/// makes progress; a zero-window client never does.
pub const SHED_STREAM_AFTER: Duration = Duration::from_secs(5);
/// How often the accept loop, blocked at the limit, asks idle connections to leave.
const PRESSURE_INTERVAL: Duration = Duration::from_millis(100);
/// How often an HTTP/2 connection with streams in flight looks for stalled ones.
const STALL_SCAN: Duration = Duration::from_secs(1);

/// How connections are served; built once.
struct Protocols {
    h1: http1::Builder,
    limits: Limits,
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
        Protocols {
            h1,
            limits,
            tls: app.server_tls().map(TlsAcceptor::from),
            timeouts,
        }
    }

    /// The HTTP/2 server of one connection: its stream tasks run on `exec`, which ties each to
    /// its request so a stalled stream can be reset alone.
    fn h2(&self, exec: StreamExec) -> http2::Builder<StreamExec> {
        let (limits, timeouts) = (self.limits, self.timeouts);
        let mut h2 = http2::Builder::new(exec);
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
        h2
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

/// Why the server stops accepting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM or SIGINT: not ready first, for `--shutdown-delay-secs`, while still serving.
    Signal,
    /// The listening sockets were handed to a new process ([`crate::upgrade`]), which serves
    /// them already: stop accepting at once, no delay.
    HandedOver {
        /// The new process.
        to_pid: u32,
    },
}

/// Serves `listener` until `shutdown` resolves; then, in phases: after a signal, reports
/// not-ready while still accepting and serving for `--shutdown-delay-secs` (balancers take the
/// replica out; a handover skips this), stops accepting, lets requests finish (keep-alive
/// connections close after their current request), closes connections with no upload in flight
/// at `--shutdown-grace-secs`, and lets uploads run until `--upload-drain-secs`. `force` (a
/// second signal) ends the drain at once.
pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = Stop>,
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
        reserve: Arc::new(Semaphore::new(RESERVE_CONNECTIONS)),
        template: Shared {
            app: app.clone(),
            protocols,
            requests: Arc::new(Semaphore::new(limits.max_requests)),
            connections: connections.clone(),
            uploads: app.metrics().uploads_in_flight.clone(),
            phases,
            pressure: Arc::new(Notify::new()),
            accepted: Instant::now(),
        },
    };
    let uploads = acceptor.template.uploads.clone();
    let phase_gauge = app.metrics().shutdown_phase.clone();
    tokio::pin!(force);
    let stop = acceptor.accept_until(shutdown).await;
    app.set_draining();
    let forced = match stop {
        Stop::Signal => {
            phase_gauge.set(metrics::phase::DELAY);
            tracing::info!(
                delay_secs = t.shutdown_delay.as_secs(),
                "shutting down: not ready, still serving during the delay"
            );
            tokio::select! {
                () = acceptor.accept_until(tokio::time::sleep(t.shutdown_delay)) => false,
                () = &mut force => true,
            }
        }
        // The new process accepts on the same sockets already: nothing to wait for.
        Stop::HandedOver { to_pid } => {
            tracing::info!(
                to_pid,
                "handed over: no longer accepting, the new process serves"
            );
            false
        }
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
    /// Slots past `--max-connections`, used only while every real one is taken.
    reserve: Arc<Semaphore>,
    /// What each connection task gets (its `accepted` is stamped per connection).
    template: Shared,
}

/// A connection's slot.
enum Slot {
    /// One of `--max-connections`.
    Main(OwnedSemaphorePermit),
    /// One of [`RESERVE_CONNECTIONS`]: health checks, or a wait for a real slot.
    Reserve(OwnedSemaphorePermit),
}

impl Acceptor {
    /// Accepts until `until` resolves; returns its output.
    async fn accept_until<T>(&self, until: impl Future<Output = T>) -> T {
        tokio::pin!(until);
        loop {
            let slot = tokio::select! {
                biased;
                permit = slot(&self.connections, &self.template.pressure) => Slot::Main(permit),
                permit = reserve_slot(&self.reserve, &self.connections) => Slot::Reserve(permit),
                stop = &mut until => return stop,
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
                stop = &mut until => return stop,
            };
            let app = &self.template.app;
            let metrics = app.metrics().clone();
            metrics.connections_accepted.inc();
            // A trusted front carries every client behind it: only direct clients have a share
            // (and none at 100 %: the connection limit's own shedding decides alone).
            let cfg = app.config();
            let share = if cfg.is_trusted_proxy(peer.ip()) || cfg.limits.client_share_percent >= 100
            {
                None
            } else {
                match app.clients().connection(peer.ip()) {
                    Some(share) => Some(share),
                    None => {
                        metrics
                            .client_share_refused
                            .get_or_create(&PoolLabels {
                                pool: "connections",
                            })
                            .inc();
                        tracing::debug!(peer = %peer, "connection over its client's share of --max-connections; closed");
                        continue;
                    }
                }
            };
            let _ = stream.set_nodelay(true);
            let mut shared = self.template.clone();
            shared.accepted = Instant::now();
            metrics.connections_open.inc();
            tokio::spawn(async move {
                serve_connection(stream, peer, shared, slot).await;
                metrics.connections_open.dec();
                drop(share);
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
        if let Ok(Ok(permit)) = tokio::time::timeout(PRESSURE_INTERVAL, wait).await {
            return permit;
        }
    }
}

/// A reserve slot, only while every real slot is taken.
async fn reserve_slot(reserve: &Arc<Semaphore>, connections: &Semaphore) -> OwnedSemaphorePermit {
    loop {
        if connections.available_permits() == 0 {
            if let Ok(permit) = reserve.clone().try_acquire_owned() {
                return permit;
            }
        }
        tokio::time::sleep(PRESSURE_INTERVAL).await;
    }
}

/// Resolves when `pressure` is signalled and `sheddable` says the connection may go.
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
    connections: Arc<Semaphore>,
    /// Blob uploads in flight, server-wide (they may outlive the grace period); also the
    /// `regrelay_uploads_in_flight` gauge.
    uploads: Gauge,
    phases: watch::Receiver<Phase>,
    /// Connection-limit pressure.
    pressure: Arc<Notify>,
    accepted: Instant,
}

async fn serve_connection(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    shared: Shared,
    slot: Slot,
) {
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
            Some(h2) => drive(stream, h2, peer, shared, slot).await,
            None => tracing::debug!(peer = %peer, "no request in time; closed"),
        }
        return;
    };
    let handshake = tokio::time::timeout(t.tls_handshake, acceptor.accept(stream));
    let done = tokio::select! {
        done = handshake => done,
        () = &mut shed_early => {
            tracing::debug!(peer = %peer, "tls handshake unfinished at the connection limit; closed");
            return;
        }
    };
    match done {
        Ok(Ok(stream)) => {
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            drive(stream, h2, peer, shared, slot).await;
        }
        Ok(Err(err)) => tracing::debug!(peer = %peer, error = %err, "tls handshake failed"),
        Err(_) => tracing::debug!(peer = %peer, "tls handshake timed out"),
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
async fn drive<I>(io: I, h2: bool, peer: std::net::SocketAddr, shared: Shared, slot: Slot)
where
    I: Socket + Send + 'static,
{
    let Shared {
        app,
        protocols,
        requests,
        connections,
        uploads,
        phases,
        pressure,
        ..
    } = shared;
    let t = protocols.timeouts;
    let conn = ConnInfo {
        peer,
        tls: protocols.tls.is_some(),
        h2,
    };
    let metrics = app.metrics().clone();
    let state = Arc::new(ConnState::new());
    let io = TokioIo::new(Deadlined::new(io, t.body_idle, state.clone()));
    let exec = h2.then(StreamExec::default);
    let (main, reserve) = match slot {
        Slot::Main(p) => (Some(p), None),
        Slot::Reserve(p) => (None, Some(p)),
    };
    let admission = Arc::new(Admission {
        app: app.clone(),
        conn,
        state: state.clone(),
        requests,
        connections,
        conn_pressure: pressure.clone(),
        uploads,
        reserve: Mutex::new(reserve),
        promoted: Mutex::new(main),
        close: Default::default(),
        closing: Notify::new(),
        exec: exec.clone(),
    });
    let service = {
        let admission = admission.clone();
        service_fn(move |req: http::Request<Incoming>| admission.call(req))
    };
    let watch = Watch {
        metrics: &metrics,
        state: &state,
        admission: &admission,
        phases,
        pressure: &pressure,
        requests_pressure: app.pressure(),
        t,
    };
    let result = match exec {
        Some(exec) => supervise(protocols.h2(exec).serve_connection(io, service), watch).await,
        None => supervise(protocols.h1.serve_connection(io, service), watch).await,
    };
    if let Err(err) = result {
        tracing::debug!(peer = %conn.peer, error = %err, "connection ended with error");
    }
}

/// What a running connection is watched for.
struct Watch<'a> {
    metrics: &'a metrics::Metrics,
    state: &'a ConnState,
    admission: &'a Admission,
    phases: watch::Receiver<Phase>,
    /// Connection-limit pressure.
    pressure: &'a Notify,
    /// Request and upstream pools' pressure.
    requests_pressure: &'a Notify,
    t: Timeouts,
}

impl Watch<'_> {
    /// Resets (HTTP/2) the requests stalled for `at_least`; returns how many. For HTTP/1.1 the
    /// connection is cut instead (its one request is stalled); `None` then.
    fn shed_stalled(&self, at_least: Duration, reason: &'static str) -> Option<usize> {
        let stalled = self.state.stalled_streams(at_least);
        if stalled.is_empty() {
            return Some(0);
        }
        if !self.admission.conn.h2 {
            self.state.cut();
            self.count_reset(reason, 1);
            return None;
        }
        let reset = stalled.iter().filter(|s| s.reset()).count();
        self.count_reset(reason, reset);
        Some(reset)
    }

    fn count_reset(&self, reason: &'static str, n: usize) {
        if n > 0 {
            tracing::debug!(peer = %self.admission.conn.peer, reason, n, "stalled requests shed");
            self.metrics
                .requests_shed
                .get_or_create(&OutcomeLabels { outcome: reason })
                .inc_by(n as u64);
        }
    }
}

/// Runs a connection; closes it gracefully when no request was in flight for the idle timeout
/// (the header read timeout before its first request), when it is idle at the connection limit,
/// or when the server stops; resets HTTP/2 streams stalled past `--h2-stall-timeout-secs`, and
/// sheds stalled requests when a shared pool is exhausted.
async fn supervise<C: GracefulConnection<Error = hyper::Error>>(
    conn: C,
    watch: Watch<'_>,
) -> hyper::Result<()> {
    let (state, t) = (watch.state, watch.t);
    let mut phases = watch.phases.clone();
    let mut draining = false;
    tokio::pin!(conn);
    let mut closing: Option<Instant> = None;
    let h2 = watch.admission.conn.h2;
    let mut scan = Instant::now() + STALL_SCAN;
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
            // Every second on HTTP/2 (streams come and go without waking this loop).
            () = tokio::time::sleep_until(scan), if h2 => {
                scan = Instant::now() + STALL_SCAN;
                if state.active() > 0 {
                    let _ = watch.shed_stalled(t.h2_stall, "stall");
                }
            }
            () = shed(watch.requests_pressure, || state.any_stalled(SHED_STREAM_AFTER)) => {
                if watch.shed_stalled(SHED_STREAM_AFTER, "pressure").is_none() && closing.is_none() {
                    closing = Some(Instant::now() + CLOSE_GRACE);
                }
            }
            () = shed(watch.pressure, || state.sheddable(SHED_IDLE_AFTER, SHED_STALLED_AFTER, SHED_STREAM_AFTER)), if closing.is_none() => {
                let stalled = state.idle_since().is_none();
                let why = if stalled { "stalled" } else { "idle" };
                watch.metrics.connections_shed.get_or_create(&OutcomeLabels { outcome: why }).inc();
                if stalled {
                    tracing::debug!("connection not taking its responses cut at the connection limit");
                    state.cut();
                    closing = Some(Instant::now() + CLOSE_GRACE);
                    continue;
                }
                // Nothing is in flight: no goodbye is owed (a client that does not answer an
                // HTTP/2 GOAWAY's ping would otherwise keep the slot for the close grace).
                tracing::debug!("idle connection shed at the connection limit");
                return Ok(());
            }
            () = watch.admission.closing.notified(), if closing.is_none() && !draining => {
                if watch.admission.close.load(Ordering::Acquire) {
                    conn.as_mut().graceful_shutdown();
                    draining = true;
                    closing = Some(Instant::now() + CLOSE_GRACE);
                }
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

/// Raises the soft open-file limit to the hard one and checks that the configured bounds fit
/// in it (defaulted bounds are lowered to fit: see [`Limits::fit`]); returns the limit in force
/// and what was lowered.
pub fn raise_fd_limit(
    limits: &mut Limits,
    upstreams: usize,
) -> Result<(u64, Option<String>), String> {
    let got = rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| format!("cannot read or raise RLIMIT_NOFILE: {e}"))?;
    let fitted = limits.fit(got, upstreams);
    let needed = limits.fds_needed(upstreams);
    if needed > got {
        return Err(format!(
            "the open-file limit is {got}, but --max-connections {} and \
             --max-upstream-connections {} need {needed} (connections and 32 reserve ones for \
             health checks, upstream, token service and readiness sockets of every upstream, \
             plus 64); raise LimitNOFILE / ulimit -n or lower the bounds",
            limits.max_connections, limits.max_upstream_connections
        ));
    }
    Ok((got, fitted))
}

/// Signals closer together than this are one request to stop: `timeout` and a kill of the
/// process group deliver SIGTERM twice at once, and only a second signal sent on purpose should
/// end the drain.
pub const SIGNAL_BURST: Duration = Duration::from_secs(1);

/// SIGTERM and SIGINT, listened to from the first call for the life of the process (a signal
/// arriving between two waits is not lost).
pub struct ShutdownSignals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    /// Starts listening (a signal that cannot be caught is waited for never).
    pub fn listen() -> ShutdownSignals {
        use tokio::signal::unix::{signal, SignalKind};
        ShutdownSignals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// The next SIGTERM or SIGINT, by name.
    pub async fn next(&mut self) -> &'static str {
        async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            () = one(&mut self.term) => "SIGTERM",
            () = one(&mut self.int) => "SIGINT",
        }
    }
}
