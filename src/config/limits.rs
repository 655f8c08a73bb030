//! Bounds on what clients may hold and the timeouts of every phase: their types, the range each
//! key must fall in, and how defaulted connection bounds are lowered to fit the open-file limit.

use std::time::Duration;

use super::problems::Problems;
use super::*;

/// One hour, in seconds.
const HOUR: u64 = 3600;
/// One day, in seconds.
const DAY: u64 = 24 * HOUR;

/// Timeouts of the request path. There is deliberately no total-request timeout: a push may
/// stream for hours.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Client's first byte and request headers.
    pub header_read: Duration,
    /// Client TLS handshake.
    pub tls_handshake: Duration,
    /// A connection with no request in flight.
    pub idle: Duration,
    /// Silence within a body, either direction; a stalled write to a client.
    pub body_idle: Duration,
    /// TCP connect to the upstream.
    pub upstream_connect: Duration,
    /// One token request to the token service.
    pub token_request: Duration,
    /// HTTP/2 keep-alive ping interval (and its answer's deadline).
    pub h2_keepalive: Duration,
    /// An HTTP/2 stream whose response the client takes none of.
    pub h2_stall: Duration,
    /// Requests without a body, once regrelay stops accepting.
    pub shutdown_grace: Duration,
    /// Not-ready but serving, after SIGTERM.
    pub shutdown_delay: Duration,
    /// Uploads in flight, once regrelay stops accepting.
    pub upload_drain: Duration,
}

/// Bounds on what clients may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Client connections at once.
    pub max_connections: usize,
    /// Requests in flight at once.
    pub max_requests: usize,
    /// Upstream connections at once, per upstream.
    pub max_upstream_connections: usize,
    /// Streams per HTTP/2 connection.
    pub h2_max_concurrent_streams: u32,
    /// Request head bytes.
    pub max_header_bytes: usize,
    /// Request header fields.
    pub max_headers: usize,
    /// The share of each pool one client may hold, in percent.
    pub client_share_percent: u8,
    /// Neither `max_connections` nor `max_upstream_connections` was set: both may be lowered to
    /// fit the open-file limit (set ones that do not fit refuse the start).
    pub connection_bounds_defaulted: bool,
}

impl Limits {
    /// One client's share of a pool of `pool` (at least 1).
    pub fn client_share(&self, pool: usize) -> usize {
        (pool * usize::from(self.client_share_percent))
            .div_ceil(100)
            .max(1)
    }

    /// File descriptors the process needs at most with `upstreams` upstreams: clients, each
    /// upstream's connections (plus its token service's, bounded alike), and a margin for
    /// listeners, files and logs.
    pub fn fds_needed(&self, upstreams: usize) -> u64 {
        let per_upstream = 2 * self.max_upstream_connections as u64 + READY_PROBE_CONNECTIONS;
        self.max_connections as u64
            + RESERVE_CONNECTIONS as u64
            + per_upstream * upstreams.max(1) as u64
            + FD_MARGIN
    }

    /// Lowers defaulted connection bounds to fit `open_files` (keeping the default 4:1 ratio of
    /// client to upstream connections); returns what it did, or `None` when they fit as they
    /// are. Bounds the operator set are left for [`Limits::fds_needed`]'s check to refuse.
    pub fn fit(&mut self, open_files: u64, upstreams: usize) -> Option<String> {
        if !self.connection_bounds_defaulted || self.fds_needed(upstreams) <= open_files {
            return None;
        }
        let n = upstreams.max(1) as u64;
        // c + RESERVE + n·(2·c/4 + PROBES) + MARGIN <= open_files
        let fixed = RESERVE_CONNECTIONS as u64 + n * READY_PROBE_CONNECTIONS + FD_MARGIN;
        let c = open_files.saturating_sub(fixed) * 2 / (2 + n);
        if c < MIN_FITTED_CONNECTIONS {
            return None;
        }
        let (was_c, was_u) = (self.max_connections, self.max_upstream_connections);
        self.max_connections = c as usize;
        self.max_upstream_connections = (c as usize / 4).max(1);
        while self.fds_needed(upstreams) > open_files {
            self.max_connections -= 1;
        }
        Some(format!(
            "the open-file limit is {open_files}: --max-connections lowered from {was_c} to {} \
             and --max-upstream-connections from {was_u} to {} to fit it (raise LimitNOFILE / \
             ulimit -n for more, or set both to silence this)",
            self.max_connections, self.max_upstream_connections
        ))
    }
}

/// File descriptors kept for listeners, the cache, key and log files.
const FD_MARGIN: u64 = 64;
/// Defaulted bounds are not lowered below this: fewer connections are no service.
const MIN_FITTED_CONNECTIONS: u64 = 64;

/// Connections accepted past `--max-connections` to answer health checks (and requests that
/// find a slot within a moment) while every slot is taken: health endpoints answer at every
/// limit.
pub const RESERVE_CONNECTIONS: usize = 32;
/// Connections each upstream's readiness probe may open (outside `--max-upstream-connections`,
/// so `/-/ready` answers while clients hold every upstream slot).
pub const READY_PROBE_CONNECTIONS: u64 = 2;

/// The bounds, each within its range (a problem kept for each that is not).
pub(super) fn limits(raw: &ConfigFile, p: &mut Problems) -> Limits {
    Limits {
        max_connections: p.bounded(
            "max_connections",
            raw.max_connections,
            DEFAULT_MAX_CONNECTIONS,
            (1, 1_000_000),
        ),
        max_requests: p.bounded(
            "max_requests",
            raw.max_requests,
            DEFAULT_MAX_REQUESTS,
            (1, 10_000_000),
        ),
        max_upstream_connections: p.bounded(
            "max_upstream_connections",
            raw.max_upstream_connections,
            DEFAULT_MAX_UPSTREAM_CONNECTIONS,
            (1, 1_000_000),
        ),
        h2_max_concurrent_streams: p.bounded(
            "h2_max_concurrent_streams",
            raw.h2_max_concurrent_streams,
            DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            (1, 10_000),
        ),
        // hyper's HTTP/1 read buffer has a floor of 8 KiB.
        max_header_bytes: p.bounded(
            "max_header_bytes",
            raw.max_header_bytes,
            DEFAULT_MAX_HEADER_BYTES,
            (8192, 1 << 20),
        ),
        max_headers: p.bounded(
            "max_headers",
            raw.max_headers,
            DEFAULT_MAX_HEADERS,
            (8, 1000),
        ),
        connection_bounds_defaulted: raw.max_connections.is_none()
            && raw.max_upstream_connections.is_none(),
        client_share_percent: p.bounded(
            "client_share_percent",
            raw.client_share_percent,
            DEFAULT_CLIENT_SHARE_PERCENT,
            (1, 100),
        ),
    }
}

/// The timeouts, each within its range.
pub(super) fn timeouts(raw: &ConfigFile, p: &mut Problems) -> Timeouts {
    Timeouts {
        header_read: p.secs(
            "header_read_timeout_secs",
            raw.header_read_timeout_secs,
            DEFAULT_HEADER_READ_TIMEOUT_SECS,
            (1, HOUR),
        ),
        tls_handshake: p.secs(
            "tls_handshake_timeout_secs",
            raw.tls_handshake_timeout_secs,
            DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECS,
            (1, 600),
        ),
        idle: p.secs(
            "idle_timeout_secs",
            raw.idle_timeout_secs,
            DEFAULT_IDLE_TIMEOUT_SECS,
            (1, DAY),
        ),
        body_idle: p.secs(
            "body_idle_timeout_secs",
            raw.body_idle_timeout_secs,
            DEFAULT_BODY_IDLE_TIMEOUT_SECS,
            (1, DAY),
        ),
        upstream_connect: p.secs(
            "upstream_connect_timeout_secs",
            raw.upstream_connect_timeout_secs,
            DEFAULT_UPSTREAM_CONNECT_TIMEOUT_SECS,
            (1, 600),
        ),
        token_request: p.secs(
            "token_timeout_secs",
            raw.token_timeout_secs,
            DEFAULT_TOKEN_TIMEOUT_SECS,
            (1, 600),
        ),
        h2_keepalive: p.secs(
            "h2_keepalive_secs",
            raw.h2_keepalive_secs,
            DEFAULT_H2_KEEPALIVE_SECS,
            (1, HOUR),
        ),
        h2_stall: p.secs(
            "h2_stall_timeout_secs",
            raw.h2_stall_timeout_secs,
            DEFAULT_H2_STALL_TIMEOUT_SECS,
            (1, DAY),
        ),
        shutdown_grace: p.secs(
            "shutdown_grace_secs",
            raw.shutdown_grace_secs,
            DEFAULT_SHUTDOWN_GRACE_SECS,
            (1, DAY),
        ),
        shutdown_delay: p.secs(
            "shutdown_delay_secs",
            raw.shutdown_delay_secs,
            DEFAULT_SHUTDOWN_DELAY_SECS,
            (0, HOUR),
        ),
        upload_drain: p.secs(
            "upload_drain_secs",
            raw.upload_drain_secs,
            DEFAULT_UPLOAD_DRAIN_SECS,
            (1, DAY),
        ),
    }
}
