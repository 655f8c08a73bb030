//! Accepting: the accept loop of the proxy listener (a connection slot first, then `accept`,
//! then the client's share; the connection's task is [`super::connection`]'s), the pause after
//! a failed `accept` that every listener shares (the admin listener too), and the open-file
//! limit the slots must fit in.
//!
//! A failed `accept` is either one connection's failure (the peer reset it while it waited in
//! the backlog: the next one is taken at once) or the process's (out of file descriptors,
//! EMFILE/ENFILE, or of kernel memory): then the listener stays readable and retrying at once
//! would spin a core, so the loop pauses, doubling from [`ACCEPT_BACKOFF_MIN`] to
//! [`ACCEPT_BACKOFF_MAX`] while failures last, with one log line per pause.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::connection::{serve_connection, Shared, Slot};
use super::workers::Workers;
use crate::config::Limits;
use crate::metrics::PoolLabels;

/// First pause after a failed `accept` of the process (e.g. EMFILE).
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between two `accept`s that fail: at most one log line a second while the
/// process is out of file descriptors.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often the accept loop, blocked at the limit, asks idle connections to leave.
const PRESSURE_INTERVAL: Duration = Duration::from_millis(100);

/// The pause between failed `accept`s of one listener.
#[derive(Debug)]
pub(super) struct AcceptBackoff {
    /// The listener, in log lines (`proxy`, `metrics`).
    listener: &'static str,
    /// The next pause.
    pause: Duration,
    /// Failures in a row.
    failures: u64,
}

impl AcceptBackoff {
    /// No failure yet.
    pub(super) fn new(listener: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            listener,
            pause: ACCEPT_BACKOFF_MIN,
            failures: 0,
        }
    }

    /// The next connection of `listener`; pauses after each failure of the process (see the
    /// module docs). Cancel-safe: dropped while pausing, nothing is lost.
    pub(super) async fn accept(&mut self, listener: &TcpListener) -> (TcpStream, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok(conn) => {
                    if self.failures > 0 {
                        tracing::info!(
                            listener = self.listener,
                            failures = self.failures,
                            "accepting again"
                        );
                    }
                    self.failures = 0;
                    self.pause = ACCEPT_BACKOFF_MIN;
                    tracing::debug!(listener = self.listener, peer = %conn.1, "accepted");
                    return conn;
                }
                Err(err) if one_connection(&err) => {
                    tracing::debug!(listener = self.listener, error = %err, "a connection failed before it was accepted");
                }
                Err(err) => {
                    self.failures += 1;
                    tracing::warn!(
                        listener = self.listener,
                        error = %err,
                        failures = self.failures,
                        pause_ms = self.pause.as_millis() as u64,
                        "accept failed; pausing before the next one (out of file descriptors: \
                         raise LimitNOFILE / ulimit -n, or lower --max-connections)"
                    );
                    tokio::time::sleep(self.pause).await;
                    self.pause = (self.pause * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    }
}

/// True when `err` is one connection's (its peer gave up while it waited in the backlog), not
/// the process's.
fn one_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// The listening half: accepts connections and starts their tasks.
pub(super) struct Acceptor {
    pub(super) listener: TcpListener,
    pub(super) backoff: AcceptBackoff,
    pub(super) connections: Arc<Semaphore>,
    /// Slots past `--max-connections`, used only while every real one is taken.
    pub(super) reserve: Arc<Semaphore>,
    /// What each connection task gets (its `accepted` is stamped per connection).
    pub(super) template: Shared,
    /// Where connections run.
    pub(super) workers: Arc<Workers>,
}

impl Acceptor {
    /// Accepts until `until` resolves; returns its output.
    pub(super) async fn accept_until<T>(&mut self, until: impl Future<Output = T>) -> T {
        tokio::pin!(until);
        loop {
            let slot = tokio::select! {
                biased;
                permit = slot(&self.connections, &self.template.pressure) => Slot::Main(permit),
                permit = reserve_slot(&self.reserve, &self.connections) => Slot::Reserve(permit),
                stop = &mut until => return stop,
            };
            let (stream, peer) = tokio::select! {
                accepted = self.backoff.accept(&self.listener) => accepted,
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
            self.workers.spawn(stream, move |stream| async move {
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
