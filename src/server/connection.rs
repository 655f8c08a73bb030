//! One connection's life from its accept to its close: the TLS handshake (with its deadline),
//! protocol detection (ALPN, or the HTTP/2 preface on plain TCP), the HTTP/1.1 or HTTP/2
//! server with its bounds, and the admission of each request ([`super::admit`]) over the
//! connection's state ([`super::state`]); [`super::supervise`] watches it while it runs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::admit::Admission;
use super::deadline::{Deadlined, Socket};
use super::state::{ConnState, StreamExec};
use super::supervise::{shed, supervise, Watch};
use super::{Phase, SHED_IDLE_AFTER};
use crate::app::{App, ConnInfo};
use crate::config::{Limits, Timeouts};

/// A connection's slot.
pub(super) enum Slot {
    /// One of `--max-connections`.
    Main(OwnedSemaphorePermit),
    /// One of [`crate::config::RESERVE_CONNECTIONS`]: health checks, or a wait for a real slot.
    Reserve(OwnedSemaphorePermit),
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How often a partial preface is looked at again while it trickles in.
const PREFACE_POLL_MS: u64 = 5;

/// How connections are served; built once.
pub(super) struct Protocols {
    pub(super) h1: http1::Builder,
    pub(super) limits: Limits,
    pub(super) tls: Option<TlsAcceptor>,
    pub(super) timeouts: Timeouts,
}

/// HTTP/2 flow-control window per stream that regrelay advertises to clients.
const H2_STREAM_WINDOW: u32 = 8 << 20;
/// HTTP/2 flow-control window per connection that regrelay advertises to clients.
const H2_CONNECTION_WINDOW: u32 = 16 << 20;

impl Protocols {
    pub(super) fn new(app: &App) -> Protocols {
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
    pub(super) fn h2(&self, exec: StreamExec) -> http2::Builder<StreamExec> {
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

/// What every connection task shares.
#[derive(Clone)]
pub(super) struct Shared {
    pub(super) app: Arc<App>,
    pub(super) protocols: Arc<Protocols>,
    pub(super) requests: Arc<Semaphore>,
    pub(super) connections: Arc<Semaphore>,
    /// Blob uploads in flight, server-wide (they may outlive the grace period); also the
    /// `regrelay_uploads_in_flight` gauge.
    pub(super) uploads: Gauge,
    pub(super) phases: watch::Receiver<Phase>,
    /// Connection-limit pressure.
    pub(super) pressure: Arc<Notify>,
    pub(super) accepted: Instant,
}

/// Serves one accepted connection: the TLS handshake (or, on plain TCP, protocol detection),
/// then HTTP/1.1 or HTTP/2 until it ends; at the connection limit, one that has not said
/// anything yet is shed.
pub(super) async fn serve_connection(
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
