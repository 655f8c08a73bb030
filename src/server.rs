//! The server: the proxy listener's accept loop and every connection's life, the admin
//! (metrics) listener, and the drain in phases on shutdown ([`run`]). The only module that
//! accepts sockets. Rooms: `accept.rs` (the accept loop, connection slots, the pause after a
//! failed `accept` every listener shares, the open-file limit), `connection.rs` (TLS
//! handshake, protocol detection, HTTP/1.1 or HTTP/2 with their bounds), `supervise.rs` (a
//! running connection watched: idle, stalls, pressure, the drain), `admit.rs` (which budget
//! each request takes), `state.rs` (what a connection knows of its requests), `deadline.rs` (a
//! socket whose stuck writes fail), [`admin`] (the metrics listener, drained with the proxy),
//! `signals.rs` (SIGTERM, SIGINT), `workers.rs` (the threads connections run on, one
//! current-thread runtime each: `--workers`).
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
//!   [`crate::config::RESERVE_CONNECTIONS`] more are accepted meanwhile, which answer health checks and wait a
//!   moment for a slot for anything else;
//! - at `--max-requests` or `--max-upstream-connections`, requests not taking their responses
//!   for [`SHED_STREAM_AFTER`] are reset (HTTP/2) or their connection cut (HTTP/1.1).
//!
//! Health checks take no budget at all. Bounds: `--max-connections` sockets,
//! `--h2-max-concurrent-streams` per HTTP/2 connection, `--max-requests` in flight over all
//! connections (past it, and past a client's share: 503 with `Retry-After`), request heads of
//! `--max-header-bytes` and `--max-headers` (past them: 431).

mod accept;
pub mod admin;
mod admit;
mod connection;
mod deadline;
mod signals;
mod state;
mod supervise;
mod workers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;

use crate::app::App;
use crate::config::RESERVE_CONNECTIONS;
use crate::metrics;
use accept::{AcceptBackoff, Acceptor};
use connection::{Protocols, Shared};

pub use accept::{raise_fd_limit, ACCEPT_BACKOFF_MAX, ACCEPT_BACKOFF_MIN};
pub use admit::{PRESSURE_WAIT, RESERVE_WAIT};
pub use signals::{ShutdownSignals, SIGNAL_BURST};
pub use workers::{ThreadHook, Workers};

/// Time a connection closed for idleness gets to say goodbye (HTTP/2 GOAWAY) before it is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// When a drain starts, an HTTP/1.1 connection that has not sent its first request yet gets
/// this long (at most its header read deadline) to send it: it was accepted a moment ago and
/// its request is likely on the way, and a client cannot retry a request refused on a fresh
/// connection. The request is served with `Connection: close`.
const DRAIN_FIRST_REQUEST: Duration = Duration::from_secs(2);
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
/// second signal) ends the drain at once. Connections run on `workers`.
pub async fn run(
    listener: TcpListener,
    workers: Arc<Workers>,
    app: Arc<App>,
    shutdown: impl Future<Output = Stop>,
    force: impl Future<Output = ()>,
) {
    let limits = app.config().limits;
    let t = app.config().timeouts;
    app.metrics().watch_workers(workers.counts());
    let protocols = Arc::new(Protocols::new(&app));
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let (phase, phases) = watch::channel(Phase::Serving);
    let mut acceptor = Acceptor {
        listener,
        backoff: AcceptBackoff::new("proxy"),
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
        workers,
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
