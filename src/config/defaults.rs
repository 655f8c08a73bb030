//! Every default and hard cap of the configuration, with its unit in the name. The ranges each
//! key must fall in are where the key is checked (`validate.rs`, `limits.rs`).

use std::time::Duration;

/// Address regrelay listens on.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:5000";
/// Client connections served at once; further ones wait in the kernel's accept queue.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Requests in flight at once over all connections (HTTP/2 streams included); more get 503.
pub const DEFAULT_MAX_REQUESTS: usize = 2048;
/// Upstream connections open at once, per upstream (in use plus idle).
pub const DEFAULT_MAX_UPSTREAM_CONNECTIONS: usize = 256;
/// Concurrent streams one HTTP/2 client connection may open.
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// Largest request head (request line and headers) in bytes; larger ones get 431.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most request header fields; more get 431.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Time a client has to send its request headers (and its first byte).
pub const DEFAULT_HEADER_READ_TIMEOUT_SECS: u64 = 30;
/// Time a client has to finish the TLS handshake.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECS: u64 = 15;
/// Time a connection may stay open with no request in flight (HTTP/1.1 keep-alive, idle h2).
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 60;
/// Silence allowed inside a body stream, either way, and the time a write to a client that
/// stopped reading may stall. There is no total-request timeout.
pub const DEFAULT_BODY_IDLE_TIMEOUT_SECS: u64 = 300;
/// Time allowed to open a TCP connection to the upstream.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT_SECS: u64 = 10;
/// Deadline for one token request to the token service (all redirect hops).
pub const DEFAULT_TOKEN_TIMEOUT_SECS: u64 = 30;
/// Interval of HTTP/2 keep-alive pings to clients (a peer that does not answer within the same
/// time is closed).
pub const DEFAULT_H2_KEEPALIVE_SECS: u64 = 30;
/// Time in-flight requests without a body get to finish once regrelay stops accepting.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 30;
/// Time regrelay reports not-ready while still accepting and serving, after SIGTERM, so that
/// balancers and Kubernetes endpoints take it out before it stops accepting.
pub const DEFAULT_SHUTDOWN_DELAY_SECS: u64 = 5;
/// Time blob uploads in flight may continue once regrelay stops accepting.
pub const DEFAULT_UPLOAD_DRAIN_SECS: u64 = 900;
/// Lifetime of a sealed session (the `expires_in` clients get).
pub const DEFAULT_SESSION_LIFETIME_SECS: u64 = 3600;
/// Hard cap on a session's lifetime (and the lifetime of OAuth2 refresh tokens).
pub const MAX_SESSION_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Default bound on cached sessions.
pub const DEFAULT_TOKEN_CACHE_MAX_ENTRIES: usize = 100_000;
/// Largest config file read (a real one is a few KiB).
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;
/// The share of each pool all clients share (connections, requests in flight, upstream
/// connections) that one client may hold, in percent.
pub const DEFAULT_CLIENT_SHARE_PERCENT: u8 = 25;

/// `--workers`' default: one per CPU this process may use (its affinity and cgroup quota).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
/// Time an HTTP/2 stream may go without the client taking any of its response (a send window
/// held at zero) before the stream is reset.
pub const DEFAULT_H2_STALL_TIMEOUT_SECS: u64 = 30;
/// Memory for cached sessions and their upstream tokens, all upstreams together: 64 MiB, about
/// 25,000 typical sessions (a GitLab token is 1–2 KiB), and a small part of a 256 MiB container.
pub const DEFAULT_SESSION_CACHE_MAX_BYTES: u64 = 64 << 20;
/// Failed logins a minute through regrelay, all clients together, before credentials it never
/// saw succeed are refused (429) without asking: below GitLab's default ban (10 in a minute).
pub const DEFAULT_FAILED_LOGINS_PER_MINUTE: usize = 8;
/// The same, per client.
pub const DEFAULT_CLIENT_FAILED_LOGINS_PER_MINUTE: usize = 4;
/// Default `--cache-max-bytes`: 10 GiB.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 10 << 30;
