//! A running connection, watched: closed gracefully when idle past its deadline (the header
//! read deadline before its first request), shed at the connection limit when idle or not
//! taking its responses, its stalled HTTP/2 streams reset past `--h2-stall-timeout-secs`, its
//! stalled requests shed when a shared pool is exhausted, and drained when the server stops.

use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::admit::Admission;
use super::state::ConnState;
use super::{
    Phase, CLOSE_GRACE, DRAIN_FIRST_REQUEST, SHED_IDLE_AFTER, SHED_STALLED_AFTER, SHED_STREAM_AFTER,
};
use crate::config::Timeouts;
use crate::metrics::{self, OutcomeLabels};

/// How often an HTTP/2 connection with streams in flight looks for stalled ones.
const STALL_SCAN: Duration = Duration::from_secs(1);

/// Resolves when `pressure` is signalled and `sheddable` says the connection may go.
pub(super) async fn shed(pressure: &Notify, sheddable: impl Fn() -> bool) {
    loop {
        pressure.notified().await;
        if sheddable() {
            return;
        }
    }
}

/// What a running connection is watched for.
pub(super) struct Watch<'a> {
    pub(super) metrics: &'a metrics::Metrics,
    pub(super) state: &'a ConnState,
    pub(super) admission: &'a Admission,
    pub(super) phases: watch::Receiver<Phase>,
    /// Connection-limit pressure.
    pub(super) pressure: &'a Notify,
    /// Request and upstream pools' pressure.
    pub(super) requests_pressure: &'a Notify,
    pub(super) t: Timeouts,
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
pub(super) async fn supervise<C: GracefulConnection<Error = hyper::Error>>(
    conn: C,
    watch: Watch<'_>,
) -> hyper::Result<()> {
    let (state, t) = (watch.state, watch.t);
    let mut phases = watch.phases.clone();
    let mut draining = false;
    tokio::pin!(conn);
    let mut closing: Option<Instant> = None;
    // Draining, a fresh HTTP/1.1 connection's first request may still come until then.
    let mut first_request_by: Option<Instant> = None;
    let h2 = watch.admission.conn.h2;
    let mut scan = Instant::now() + STALL_SCAN;
    loop {
        let wake = match (closing, first_request_by) {
            (Some(cut), _) => cut,
            (None, Some(by)) => by.min(state.idle_deadline(t.header_read, t.idle)),
            (None, None) => state.idle_deadline(t.header_read, t.idle),
        };
        tokio::select! {
            res = conn.as_mut() => return res,
            () = tokio::time::sleep_until(wake) => {
                if closing.is_some() {
                    tracing::debug!("connection did not close in time after going idle; cut");
                    return Ok(());
                }
                let no_first_request =
                    first_request_by.is_some_and(|by| by <= Instant::now()) && state.active() == 0;
                if state.is_idle_since(t.header_read, t.idle) || no_first_request {
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
            () = watch.admission.closing.notified(), if closing.is_none() => {
                if watch.admission.close.load(Ordering::Acquire) {
                    conn.as_mut().graceful_shutdown();
                    // Its request (and, draining, the drain's deadlines) decide when it ends.
                    closing = Some(match draining {
                        true => drain_deadline(),
                        false => Instant::now() + CLOSE_GRACE,
                    });
                    draining = true;
                }
            }
            changed = phases.changed() => {
                let phase = if changed.is_err() { Phase::GraceOver } else { *phases.borrow() };
                if phase != Phase::Serving && !draining {
                    // Draining: finish the requests in flight, take no new ones (keep-alive
                    // connections close after their current request). The drain deadlines are
                    // the server's. An HTTP/1.1 connection accepted a moment ago, whose first
                    // request may be on the way, is given DRAIN_FIRST_REQUEST to send it.
                    draining = true;
                    state.draining.store(true, Ordering::Release);
                    if h2 || state.has_served() {
                        conn.as_mut().graceful_shutdown();
                        closing = Some(drain_deadline());
                    } else {
                        first_request_by = Some(Instant::now() + DRAIN_FIRST_REQUEST.min(t.header_read));
                    }
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

/// A draining connection's own deadline: none (the drain's deadlines are the server's).
fn drain_deadline() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 3600)
}
