//! Configuration: command-line flags, `REGRELAY_*` environment variables and a TOML file, merged
//! (flags win over env, env over the file) into a raw [`ConfigFile`], then validated into a typed
//! [`Config`] before any port is bound. Every error names the key it is about, and `main` exits 64
//! (EX_USAGE) on it. `Config` is plain data: paths stay paths here; the TLS configs and the
//! session key ring are built from it by [`crate::app::App::new`] (still before any bind), so this
//! module depends on nothing else of regrelay. Every number is range-checked.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use http::uri::{Authority, Scheme};
use http::Uri;
use serde::Deserialize;

/// Defaults, with their unit in the name.
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

/// A configuration problem; its message names the key (`--flag` / `REGRELAY_*` / TOML key).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required key has no value from any source.
    #[error(
        "missing required key `{key}` (flag --{flag}, env {env}, or `{key}` in the config file)"
    )]
    Missing {
        /// TOML key.
        key: &'static str,
        /// Flag name.
        flag: &'static str,
        /// Environment variable.
        env: &'static str,
    },
    /// A key has a value that cannot be used.
    #[error("invalid `{key}`: {reason}")]
    Invalid {
        /// TOML key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The config file cannot be read or parsed (unknown keys are refused).
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong (names the key for unknown or mistyped keys).
        reason: String,
    },
}

/// A [`ConfigError::Invalid`] for `key`.
pub fn invalid(key: &'static str, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.to_string(),
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable `key=value` lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// When a blob upload is sent upstream in several requests (`--upload-split`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum UploadSplit {
    /// Split only what needs it: a stream of unknown length by time (each part ends before its
    /// token's fresh life does); a body with a `Content-Length` is sent whole when it fits in
    /// one part, else in parts that each carry their own exact `Content-Length`.
    #[default]
    Auto,
    /// Always split streaming uploads by time (chunked parts), whatever their length.
    Always,
    /// Never split: every upload goes upstream as the client sent it.
    Never,
}

/// What `serve --help` and `check-config --help` say after the flags: what no flag sets.
const SERVE_AFTER_HELP: &str = "\
Required: --registry (or REGRELAY_REGISTRY, or `registry` in --config).
Precedence: flags, then REGRELAY_* environment variables, then the --config file.
Logging: REGRELAY_LOG sets the level or a tracing filter (default `info`; e.g. `debug`,
`info,regrelay::access=warn`); one that does not parse, or a bare word that is no level
(`verbose`), falls back to `info` with a warning.
Exit codes: 0 stopped cleanly, 1 failed while running (e.g. cannot bind), 64 invalid
configuration (the message names the key and the fix).
Signals: SIGTERM/SIGINT drain (a second one ends the drain), SIGHUP reloads certificates,
keys and credential files.";

/// Raw settings as the user wrote them. Used both as clap flags (with env fallbacks) and as the
/// TOML file schema; every field is optional here and checked in [`Config::try_from`].
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(deny_unknown_fields)]
#[command(after_help = SERVE_AFTER_HELP)]
pub struct ConfigFile {
    /// TOML file with any of these keys (snake_case). Flags and env override it.
    #[arg(long, env = "REGRELAY_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:5000]: IP:PORT, :PORT (every interface) or
    /// localhost:PORT. Port 0 binds an ephemeral port (logged).
    #[arg(long, env = "REGRELAY_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Required (here, in REGRELAY_REGISTRY or as `registry` in --config): the upstream
    /// registry's base URL, http or https (e.g. `https://registry.gitlab.example.com`).
    #[arg(long, env = "REGRELAY_REGISTRY", value_name = "URL")]
    pub registry: Option<String>,
    /// Serve Prometheus metrics on `http://ADDR/metrics` (a separate listener; off by default).
    #[arg(long, env = "REGRELAY_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Unix socket for upgrades in place: a running regrelay listens on it (mode 0600), and a
    /// second `regrelay serve` given the same path takes its listening sockets over, after which
    /// the first one drains and exits (off by default).
    #[arg(long, env = "REGRELAY_UPGRADE_SOCKET", value_name = "PATH")]
    pub upgrade_socket: Option<PathBuf>,
    /// URL clients use to reach regrelay; rewrites `Location`, names the realm, binds sessions.
    /// Repeatable (env: comma-separated; TOML: a string or a list): the first is the canonical
    /// name sessions are sealed for, the others aliases; each client gets the realm of the name
    /// it used. Default: the request's Host and scheme.
    #[arg(
        long,
        env = "REGRELAY_PUBLIC_URL",
        value_delimiter = ',',
        value_name = "URL"
    )]
    #[serde(default, deserialize_with = "one_or_many")]
    pub public_url: Option<Vec<String>>,
    /// PEM certificate chain: serve HTTPS (ALPN h2, http/1.1). Needs --tls-key.
    #[arg(long, env = "REGRELAY_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "REGRELAY_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Extra PEM CA bundle trusted for the upstream (system roots are always trusted).
    #[arg(long, env = "REGRELAY_UPSTREAM_CA", value_name = "PEM")]
    pub upstream_ca: Option<PathBuf>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "REGRELAY_LOG_FORMAT", value_name = "text|json")]
    pub log_format: Option<LogFormat>,
    /// Client connections served at once [default: 1024].
    #[arg(long, env = "REGRELAY_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Requests in flight at once, HTTP/2 streams included; more get 503 [default: 2048].
    #[arg(long, env = "REGRELAY_MAX_REQUESTS", value_name = "N")]
    pub max_requests: Option<usize>,
    /// Connections to the upstream open at once (in use and idle) [default: 256].
    #[arg(long, env = "REGRELAY_MAX_UPSTREAM_CONNECTIONS", value_name = "N")]
    pub max_upstream_connections: Option<usize>,
    /// Concurrent streams per HTTP/2 client connection [default: 100].
    #[arg(long, env = "REGRELAY_H2_MAX_CONCURRENT_STREAMS", value_name = "N")]
    pub h2_max_concurrent_streams: Option<u32>,
    /// Largest request head in bytes; larger ones get 431 [default: 65536].
    #[arg(long, env = "REGRELAY_MAX_HEADER_BYTES", value_name = "N")]
    pub max_header_bytes: Option<usize>,
    /// Most request header fields; more get 431 [default: 100].
    #[arg(long, env = "REGRELAY_MAX_HEADERS", value_name = "N")]
    pub max_headers: Option<usize>,
    /// Seconds a client has to send its first byte and its request headers [default: 30].
    #[arg(long, env = "REGRELAY_HEADER_READ_TIMEOUT_SECS", value_name = "N")]
    pub header_read_timeout_secs: Option<u64>,
    /// Seconds a client has to complete the TLS handshake [default: 15].
    #[arg(long, env = "REGRELAY_TLS_HANDSHAKE_TIMEOUT_SECS", value_name = "N")]
    pub tls_handshake_timeout_secs: Option<u64>,
    /// Seconds a connection may stay open with no request in flight [default: 60].
    #[arg(long, env = "REGRELAY_IDLE_TIMEOUT_SECS", value_name = "N")]
    pub idle_timeout_secs: Option<u64>,
    /// Seconds a body stream may stay silent, either direction, and a write to a client that
    /// stopped reading may stall [default: 300]. No total timeout.
    #[arg(long, env = "REGRELAY_BODY_IDLE_TIMEOUT_SECS", value_name = "N")]
    pub body_idle_timeout_secs: Option<u64>,
    /// Seconds allowed to connect to the upstream [default: 10].
    #[arg(long, env = "REGRELAY_UPSTREAM_CONNECT_TIMEOUT_SECS", value_name = "N")]
    pub upstream_connect_timeout_secs: Option<u64>,
    /// Seconds one token request to the token service may take, redirects included [default: 30].
    #[arg(long, env = "REGRELAY_TOKEN_TIMEOUT_SECS", value_name = "N")]
    pub token_timeout_secs: Option<u64>,
    /// Seconds between HTTP/2 keep-alive pings; an unanswered ping closes the connection
    /// [default: 30].
    #[arg(long, env = "REGRELAY_H2_KEEPALIVE_SECS", value_name = "N")]
    pub h2_keepalive_secs: Option<u64>,
    /// Seconds requests without a body get to finish once regrelay stops accepting [default: 30].
    #[arg(long, env = "REGRELAY_SHUTDOWN_GRACE_SECS", value_name = "N")]
    pub shutdown_grace_secs: Option<u64>,
    /// Seconds regrelay reports not-ready but still accepts and serves after SIGTERM
    /// [default: 5].
    #[arg(long, env = "REGRELAY_SHUTDOWN_DELAY_SECS", value_name = "N")]
    pub shutdown_delay_secs: Option<u64>,
    /// Seconds blob uploads in flight may continue once regrelay stops accepting [default: 900].
    #[arg(long, env = "REGRELAY_UPLOAD_DRAIN_SECS", value_name = "N")]
    pub upload_drain_secs: Option<u64>,
    /// Upstream token realm URL (GitLab's `https://gitlab.example.com/jwt/auth`). Default: the
    /// realm the registry announces when regrelay itself asks it (never a proxied answer).
    #[arg(long, env = "REGRELAY_TOKEN_REALM", value_name = "URL")]
    pub token_realm: Option<String>,
    /// `SCHEME://HOST[:PORT]`: the token service may redirect to with the client's credentials,
    /// besides the realm's own origin and its https upgrade. Repeatable; env: comma-separated.
    #[arg(
        long = "auth-redirect-allow",
        env = "REGRELAY_AUTH_REDIRECT_ALLOW",
        value_delimiter = ',',
        value_name = "SCHEME://HOST[:PORT]"
    )]
    pub auth_redirect_allow: Option<Vec<String>>,
    /// CIDRs of proxies in front of regrelay whose X-Forwarded-*/Forwarded headers are kept
    /// (appended to); from anyone else they are replaced. Repeatable; env: comma-separated.
    #[arg(
        long = "trusted-proxies",
        env = "REGRELAY_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub trusted_proxies: Option<Vec<String>>,
    /// File of session keys, one base64 32-byte key per line: the first seals, all open; a line
    /// `open-only KEY` opens but never seals (rollout of a new key). Mode 0600 or stricter.
    /// Without it: a random key per process (one replica only; sessions die on restart).
    #[arg(long, env = "REGRELAY_SESSION_KEY_FILE", value_name = "FILE")]
    pub session_key_file: Option<PathBuf>,
    /// Seconds a session token is valid (`expires_in`) [default: 3600, at most 86400].
    #[arg(long, env = "REGRELAY_SESSION_LIFETIME_SECS", value_name = "N")]
    pub session_lifetime_secs: Option<u64>,
    /// Sessions whose upstream token is cached at once [default: 100000].
    #[arg(long, env = "REGRELAY_TOKEN_CACHE_MAX_ENTRIES", value_name = "N")]
    pub token_cache_max_entries: Option<usize>,
    /// Bytes of memory for cached sessions and their upstream tokens, all upstreams together;
    /// past it the oldest-looking entries go (they are opened and minted again on next use)
    /// [default: 67108864, 64 MiB].
    #[arg(long, env = "REGRELAY_SESSION_CACHE_MAX_BYTES", value_name = "N")]
    pub session_cache_max_bytes: Option<u64>,
    /// The largest share, in percent, of each pool all clients share (connections, requests in
    /// flight, upstream connections) that one client may hold [default: 25]. A client is an
    /// address (an IPv6 /64); behind --trusted-proxies, the address they forward (the fronts'
    /// own connections are not counted per client). 100 turns the shares off.
    #[arg(long, env = "REGRELAY_CLIENT_SHARE_PERCENT", value_name = "N")]
    pub client_share_percent: Option<u8>,
    /// Make the replica not ready (`/-/ready` 503) while an upstream's token service does not
    /// answer. Off by default: during a GitLab outage cached tokens, sessions and the cache still
    /// serve, and a fleet-wide outage would empty every replica's Service.
    #[arg(long, env = "REGRELAY_READY_REQUIRES_TOKEN_SERVICE", num_args = 0..=1, default_missing_value = "true", value_name = "true|false")]
    pub ready_requires_token_service: Option<bool>,
    /// Failed logins a minute the token service may see through regrelay, all clients together,
    /// before credentials regrelay never saw succeed get 429 without asking; keep it below
    /// GitLab's ban threshold (10 failures in 60 s bans an address for an hour) [default: 8].
    #[arg(long, env = "REGRELAY_FAILED_LOGINS_PER_MINUTE", value_name = "N")]
    pub failed_logins_per_minute: Option<usize>,
    /// The same, for one client [default: 4].
    #[arg(
        long,
        env = "REGRELAY_CLIENT_FAILED_LOGINS_PER_MINUTE",
        value_name = "N"
    )]
    pub client_failed_logins_per_minute: Option<usize>,
    /// Seconds an HTTP/2 stream may go without the client taking any of its response (its
    /// flow-control window held at zero) before the stream is reset [default: 30].
    #[arg(long, env = "REGRELAY_H2_STALL_TIMEOUT_SECS", value_name = "N")]
    pub h2_stall_timeout_secs: Option<u64>,
    /// Largest upstream upload request in bytes (e.g. a CDN's request-size cap); long uploads
    /// are also split by time, whatever this says [default: off].
    #[arg(long, env = "REGRELAY_UPLOAD_CHUNK_MAX", value_name = "BYTES")]
    pub upload_chunk_max: Option<u64>,
    /// Upload splitting: auto, always or never [default: auto].
    #[arg(long, env = "REGRELAY_UPLOAD_SPLIT", value_name = "auto|always|never")]
    pub upload_split: Option<UploadSplit>,
    /// Pull-through cache directory: blobs and manifests by digest, each hit served only to a
    /// client the upstream has authorized for that repository (off by default).
    #[arg(long, env = "REGRELAY_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Largest size of the cache in bytes, least recently used evicted [default: 10 GiB].
    #[arg(long, env = "REGRELAY_CACHE_MAX_BYTES", value_name = "N")]
    pub cache_max_bytes: Option<u64>,
    /// When the upstream is unreachable, answer a manifest by tag from the cache (to a client
    /// whose grant for the repository is still valid) instead of failing.
    #[arg(long, env = "REGRELAY_CACHE_SERVE_STALE", num_args = 0..=1, default_missing_value = "true", value_name = "true|false")]
    pub cache_serve_stale: Option<bool>,
    /// More upstreams for the mirror endpoint: NAME=URL, NAME being the registry host clients
    /// use (`docker.io`, `ghcr.io`) or a short alias; the URL may end in `/v2/<prefix>` (a
    /// repository prefix, e.g. a GitLab group's dependency proxy). Repeatable; env:
    /// comma-separated. TOML: `[[upstream]]` tables.
    #[arg(
        long = "upstream",
        env = "REGRELAY_UPSTREAM",
        value_delimiter = ',',
        value_name = "NAME=URL"
    )]
    #[serde(skip)]
    pub upstream: Option<Vec<String>>,
    /// `[[upstream]]` tables of the TOML file (name, url, token_realm, credentials_file, ca).
    #[arg(skip)]
    #[serde(rename = "upstream")]
    pub upstream_tables: Option<Vec<UpstreamTable>>,
    /// NAME=FILE: pull credentials (`username:token`, mode 0600) regrelay uses for that
    /// upstream when a client sends none. Repeatable; env: comma-separated.
    #[arg(
        long = "upstream-credentials",
        env = "REGRELAY_UPSTREAM_CREDENTIALS",
        value_delimiter = ',',
        value_name = "NAME=FILE"
    )]
    pub upstream_credentials: Option<Vec<String>>,
    /// CIDRs of clients that get injected credentials [default: 127.0.0.0/8,::1/128].
    /// Repeatable; env: comma-separated.
    #[arg(
        long = "inject-credentials-for",
        env = "REGRELAY_INJECT_CREDENTIALS_FOR",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub inject_credentials_for: Option<Vec<String>>,
    /// Accept --inject-credentials-for ranges that cover a --trusted-proxies front: a request
    /// that front relays without X-Forwarded-For then counts as the front's own and gets the
    /// injected credentials. Refused at start without this.
    #[arg(long, env = "REGRELAY_INJECT_THROUGH_TRUSTED_PROXIES", num_args = 0..=1, default_missing_value = "true", value_name = "true|false")]
    pub inject_through_trusted_proxies: Option<bool>,
    /// The upstream that serves requests naming none (dockerd's Docker Hub `registry-mirrors`
    /// form) [default: the --registry upstream].
    #[arg(long, env = "REGRELAY_ROOT_UPSTREAM", value_name = "NAME")]
    pub root_upstream: Option<String>,
}

/// An `[[upstream]]` table of the TOML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTable {
    /// The registry host clients use, or an alias.
    pub name: String,
    /// Base URL, optionally ending in `/v2/<repository prefix>`.
    pub url: String,
    /// Its token realm, when it should not be asked of the registry.
    pub token_realm: Option<String>,
    /// Pull credentials file (`username:token`).
    pub credentials_file: Option<PathBuf>,
    /// Extra CA bundle for this upstream.
    pub ca: Option<PathBuf>,
    /// `SCHEME://HOST[:PORT]`s its token service may redirect credentials to.
    pub auth_redirect_allow: Option<Vec<String>>,
}

/// A TOML value that is a string or a list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Option::<OneOrMany>::deserialize(d)?.map(|v| match v {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    }))
}

/// Picks each field from `$a` when set, else from `$b`.
macro_rules! over {
    ($a:ident, $b:ident, $($f:ident),* $(,)?) => {
        ConfigFile { config: $a.config, $($f: $a.$f.or($b.$f)),* }
    };
}

impl ConfigFile {
    /// Reads and parses a TOML file (at most [`MAX_CONFIG_FILE_BYTES`]); unknown keys are
    /// refused with their name.
    pub fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
        let file_err = |reason: String| ConfigError::File {
            path: path.to_owned(),
            reason,
        };
        let text = read_bounded(path, MAX_CONFIG_FILE_BYTES).map_err(file_err)?;
        toml::from_str(&text).map_err(|e| file_err(toml_hint(e.to_string())))
    }

    /// `self` (flags and env) over `file`: each key takes the first value present.
    pub fn over(self, file: ConfigFile) -> ConfigFile {
        over!(
            self,
            file,
            listen,
            registry,
            metrics_listen,
            upgrade_socket,
            public_url,
            tls_cert,
            tls_key,
            upstream_ca,
            log_format,
            max_connections,
            max_requests,
            max_upstream_connections,
            h2_max_concurrent_streams,
            max_header_bytes,
            max_headers,
            header_read_timeout_secs,
            tls_handshake_timeout_secs,
            idle_timeout_secs,
            body_idle_timeout_secs,
            upstream_connect_timeout_secs,
            token_timeout_secs,
            h2_keepalive_secs,
            shutdown_grace_secs,
            shutdown_delay_secs,
            upload_drain_secs,
            token_realm,
            auth_redirect_allow,
            trusted_proxies,
            session_key_file,
            session_lifetime_secs,
            token_cache_max_entries,
            session_cache_max_bytes,
            client_share_percent,
            h2_stall_timeout_secs,
            failed_logins_per_minute,
            client_failed_logins_per_minute,
            ready_requires_token_service,
            upload_chunk_max,
            upload_split,
            cache_dir,
            cache_max_bytes,
            cache_serve_stale,
            upstream,
            upstream_tables,
            upstream_credentials,
            inject_credentials_for,
            inject_through_trusted_proxies,
            root_upstream,
        )
    }
}

/// A TOML error with the fix for the mistakes it words least clearly.
fn toml_hint(message: String) -> String {
    if message.contains("[upstream]") && message.contains("expected a sequence") {
        return format!(
            "{message}\n`upstream` is a list of tables: write each upstream as an [[upstream]] \
             table (double brackets), one per registry"
        );
    }
    message
}

/// Reads a UTF-8 file of at most `max` bytes (a bigger one is refused, not truncated).
pub fn read_bounded(path: &Path, max: u64) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    file.take(max + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > max {
        return Err(format!("larger than {max} bytes"));
    }
    Ok(text)
}

/// Reads a secret file (session keys, credentials) with a size bound: refused when others may
/// read or write it, or its group may write it; group read is allowed only when the file's group
/// is one of this process's own groups (a Kubernetes Secret volume with `fsGroup` is mode 0440,
/// group = the pod's fsGroup), so no other user can read it.
pub fn read_private(path: &Path, max: u64) -> Result<String, String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
        if meta.is_dir() {
            return Err("is a directory: give the path of the file itself".into());
        }
        let mode = meta.mode();
        if !private_enough(mode, meta.gid(), &own_groups()) {
            return Err(format!(
                "mode {:04o} lets others (or a group this process is not in) read or change it; \
                 `chmod 600` it (Kubernetes: defaultMode: 0400; with fsGroup, 0440 is fine)",
                mode & 0o7777
            ));
        }
    }
    read_bounded(path, max)
}

/// True when a file with `mode` and group `gid` can be read by nobody but its owner and the
/// groups in `ours`.
pub fn private_enough(mode: u32, gid: u32, ours: &[u32]) -> bool {
    let group_reads_only = mode & 0o070 == 0o040;
    mode & 0o007 == 0 && (mode & 0o070 == 0 || (group_reads_only && ours.contains(&gid)))
}

/// This process's group ids (real, effective, supplementary), from `/proc/self/status`; empty
/// where that cannot be read.
fn own_groups() -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return vec![];
    };
    status
        .lines()
        .filter(|l| l.starts_with("Gid:") || l.starts_with("Groups:"))
        .flat_map(|l| l.split_whitespace().skip(1))
        .filter_map(|g| g.parse().ok())
        .collect()
}

/// A scheme + authority (no path): the upstream registry, or the public URL of this proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: Scheme,
    authority: Authority,
}

impl Origin {
    /// Parses a base URL; a path other than `/`, a query, userinfo or port 0 are refused.
    pub fn parse(key: &'static str, s: &str) -> Result<Origin, ConfigError> {
        let uri: Uri = s.parse().map_err(|e| invalid(key, format!("{s:?}: {e}")))?;
        let origin = Origin::of(&uri)
            .ok_or_else(|| invalid(key, format!("{s:?}: want an http(s) URL with a host")))?;
        if origin.authority.as_str().contains('@') {
            return Err(invalid(key, "credentials in the URL are not allowed"));
        }
        if origin.authority.port_u16() == Some(0) {
            return Err(invalid(key, format!("{s:?}: port must be 1-65535")));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(invalid(
                key,
                format!("{s:?}: must be a base URL without path or query"),
            ));
        }
        Ok(origin)
    }

    /// Builds from a scheme and a `Host` value, when it is a valid authority.
    pub fn from_parts(scheme: Scheme, host: &str) -> Option<Origin> {
        let authority: Authority = host.parse().ok()?;
        if authority.as_str().contains('@') || authority.host().is_empty() {
            return None;
        }
        Some(Origin { scheme, authority })
    }

    /// The origin of an absolute URI, if it is http(s).
    pub fn of(uri: &Uri) -> Option<Origin> {
        let scheme = uri.scheme()?.clone();
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return None;
        }
        let authority = uri.authority()?.clone();
        if authority.host().is_empty() {
            return None;
        }
        Some(Origin { scheme, authority })
    }

    /// The scheme.
    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// The `host[:port]` as configured.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The port, or the scheme's default.
    pub fn effective_port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.scheme == Scheme::HTTPS {
                443
            } else {
                80
            })
    }

    /// Same scheme, host (case-insensitive) and effective port.
    pub fn same_as(&self, other: &Origin) -> bool {
        self.scheme == other.scheme
            && self
                .authority
                .host()
                .eq_ignore_ascii_case(other.authority.host())
            && self.effective_port() == other.effective_port()
    }

    /// An absolute URI on this origin.
    pub fn join(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// A `SCHEME://HOST[:PORT]` the token service may redirect credentials to
/// (`--auth-redirect-allow`): scheme, host and port must all match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedOrigin(Origin);

impl AllowedOrigin {
    /// Parses `https://host[:port]` (or `http://…`, for a plain-HTTP test GitLab).
    pub fn parse(s: &str) -> Result<AllowedOrigin, ConfigError> {
        let s = s.trim();
        if !s.contains("://") {
            return Err(invalid(
                "auth_redirect_allow",
                format!("{s:?}: want SCHEME://HOST[:PORT], e.g. https://{s}"),
            ));
        }
        Origin::parse("auth_redirect_allow", s).map(AllowedOrigin)
    }

    /// Same scheme, host and effective port.
    pub fn matches(&self, origin: &Origin) -> bool {
        self.0.same_as(origin)
    }
}

/// A network (`--trusted-proxies`, `--inject-credentials-for`): `ADDR/PREFIX` or a single
/// address, parsed and matched by `ipnet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(ipnet::IpNet);

impl Cidr {
    /// Parses `10.0.0.0/8`, `::1/128` or `192.0.2.7` for the config key `key`.
    pub fn parse(key: &'static str, s: &str) -> Result<Cidr, ConfigError> {
        let s = s.trim();
        let net = match s.parse::<ipnet::IpNet>() {
            Ok(net) => net,
            Err(_) if !s.contains('/') => s
                .parse::<IpAddr>()
                .map(ipnet::IpNet::from)
                .map_err(|_| invalid(key, format!("{s:?}: not an IP address")))?,
            Err(_) => {
                return Err(invalid(
                    key,
                    format!("{s:?}: want ADDR/PREFIX (prefix 0-32 for IPv4, 0-128 for IPv6)"),
                ))
            }
        };
        Ok(Cidr(net.trunc()))
    }

    /// True when `ip` is inside the network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&canonical_ip(ip))
    }

    /// True when the two networks share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.0.contains(&other.0.network()) || other.0.contains(&self.0.network())
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// `ip`, with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack socket reports
/// for IPv4 peers) as the IPv4 address it is.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

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

/// Server TLS files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Pull-through cache settings.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Its directory.
    pub dir: PathBuf,
    /// Its size bound in bytes.
    pub max_bytes: u64,
    /// Answer manifests by tag from the cache while the upstream is unreachable.
    pub serve_stale: bool,
}

/// Default `--cache-max-bytes`: 10 GiB.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 10 << 30;

/// Validated configuration: plain data.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Metrics listen address, when metrics are on.
    pub metrics_listen: Option<SocketAddr>,
    /// The upgrade socket, when upgrades in place are on.
    pub upgrade_socket: Option<PathBuf>,
    /// Upstream registry.
    pub registry: Origin,
    /// Public URL of regrelay, when configured: the canonical name (sessions are sealed for it).
    pub public_url: Option<Origin>,
    /// More names clients reach regrelay under (`--public-url` given more than once).
    pub public_aliases: Vec<Origin>,
    /// Server TLS files, when serving HTTPS.
    pub tls: Option<TlsFiles>,
    /// Log format.
    pub log_format: LogFormat,
    /// Bounds.
    pub limits: Limits,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Proxies whose forwarding headers are kept.
    pub trusted_proxies: Vec<Cidr>,
    /// Session key file (None: a random key per process).
    pub session_key_file: Option<PathBuf>,
    /// Session lifetime.
    pub session_lifetime: Duration,
    /// Bound of the upstream token cache.
    pub token_cache_max_entries: usize,
    /// Bytes of cached sessions and upstream tokens, all upstreams together.
    pub session_cache_max_bytes: usize,
    /// Failed logins a minute per token service: all clients together, and per client.
    pub failed_logins: (usize, usize),
    /// A token service that does not answer makes the replica not ready.
    pub ready_requires_token_service: bool,
    /// Largest upstream upload request, when bounded.
    pub upload_chunk_max: Option<u64>,
    /// Upload splitting mode.
    pub upload_split: UploadSplit,
    /// The pull-through cache, when on.
    pub cache: Option<CacheConfig>,
    /// Every upstream; the first is the `--registry` one (the default).
    pub upstreams: Vec<UpstreamConfig>,
    /// Index of the upstream serving requests that name none.
    pub root_upstream: usize,
    /// Clients that get injected pull credentials.
    pub inject_credentials_for: Vec<Cidr>,
}

/// One upstream registry of the mirror endpoint.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Its name (lowercase): the registry host clients use, or an alias.
    pub name: String,
    /// More names that route to it (the default upstream also answers to the public URL's host).
    pub aliases: Vec<String>,
    /// Its origin.
    pub origin: Origin,
    /// Repository prefix prepended to names on the way up (no leading or trailing `/`).
    pub prefix: String,
    /// Its token realm, when configured.
    pub token_realm: Option<Uri>,
    /// Pull credentials file, when regrelay holds one for it.
    pub credentials_file: Option<PathBuf>,
    /// Extra CA bundle for it.
    pub ca: Option<PathBuf>,
    /// Origins its token service may redirect credentials to (`--auth-redirect-allow` for the
    /// default upstream, `auth_redirect_allow` in an `[[upstream]]` table).
    pub auth_redirect_allow: Vec<AllowedOrigin>,
}

impl UpstreamConfig {
    /// True when `name` (lowercase) is this upstream's name or an alias.
    pub fn answers_to(&self, name: &str) -> bool {
        self.name == name || self.aliases.iter().any(|a| a == name)
    }
}

impl Config {
    /// Merges flags/env with the optional config file and validates the result.
    pub fn load(cli: ConfigFile) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => ConfigFile::read(path)?,
            None => ConfigFile::default(),
        };
        Config::try_from(cli.over(file))
    }

    /// True when `ip` is a configured trusted proxy.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(ip))
    }
}

/// A duration in seconds within `[min, max]`.
fn secs(
    key: &'static str,
    v: Option<u64>,
    default: u64,
    (min, max): (u64, u64),
) -> Result<Duration, ConfigError> {
    bounded(key, v, default, (min, max)).map(Duration::from_secs)
}

/// A number within `[min, max]`.
fn bounded<T>(
    key: &'static str,
    v: Option<T>,
    default: T,
    (min, max): (T, T),
) -> Result<T, ConfigError>
where
    T: PartialOrd + Copy + std::fmt::Display,
{
    let v = v.unwrap_or(default);
    if v < min || v > max {
        return Err(invalid(key, format!("{v} is out of range {min}..={max}")));
    }
    Ok(v)
}

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

fn limits(raw: &ConfigFile) -> Result<Limits, ConfigError> {
    Ok(Limits {
        max_connections: bounded(
            "max_connections",
            raw.max_connections,
            DEFAULT_MAX_CONNECTIONS,
            (1, 1_000_000),
        )?,
        max_requests: bounded(
            "max_requests",
            raw.max_requests,
            DEFAULT_MAX_REQUESTS,
            (1, 10_000_000),
        )?,
        max_upstream_connections: bounded(
            "max_upstream_connections",
            raw.max_upstream_connections,
            DEFAULT_MAX_UPSTREAM_CONNECTIONS,
            (1, 1_000_000),
        )?,
        h2_max_concurrent_streams: bounded(
            "h2_max_concurrent_streams",
            raw.h2_max_concurrent_streams,
            DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            (1, 10_000),
        )?,
        // hyper's HTTP/1 read buffer has a floor of 8 KiB.
        max_header_bytes: bounded(
            "max_header_bytes",
            raw.max_header_bytes,
            DEFAULT_MAX_HEADER_BYTES,
            (8192, 1 << 20),
        )?,
        max_headers: bounded(
            "max_headers",
            raw.max_headers,
            DEFAULT_MAX_HEADERS,
            (8, 1000),
        )?,
        connection_bounds_defaulted: raw.max_connections.is_none()
            && raw.max_upstream_connections.is_none(),
        client_share_percent: bounded(
            "client_share_percent",
            raw.client_share_percent,
            DEFAULT_CLIENT_SHARE_PERCENT,
            (1, 100),
        )?,
    })
}

fn timeouts(raw: &ConfigFile) -> Result<Timeouts, ConfigError> {
    Ok(Timeouts {
        header_read: secs(
            "header_read_timeout_secs",
            raw.header_read_timeout_secs,
            DEFAULT_HEADER_READ_TIMEOUT_SECS,
            (1, HOUR),
        )?,
        tls_handshake: secs(
            "tls_handshake_timeout_secs",
            raw.tls_handshake_timeout_secs,
            DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECS,
            (1, 600),
        )?,
        idle: secs(
            "idle_timeout_secs",
            raw.idle_timeout_secs,
            DEFAULT_IDLE_TIMEOUT_SECS,
            (1, DAY),
        )?,
        body_idle: secs(
            "body_idle_timeout_secs",
            raw.body_idle_timeout_secs,
            DEFAULT_BODY_IDLE_TIMEOUT_SECS,
            (1, DAY),
        )?,
        upstream_connect: secs(
            "upstream_connect_timeout_secs",
            raw.upstream_connect_timeout_secs,
            DEFAULT_UPSTREAM_CONNECT_TIMEOUT_SECS,
            (1, 600),
        )?,
        token_request: secs(
            "token_timeout_secs",
            raw.token_timeout_secs,
            DEFAULT_TOKEN_TIMEOUT_SECS,
            (1, 600),
        )?,
        h2_keepalive: secs(
            "h2_keepalive_secs",
            raw.h2_keepalive_secs,
            DEFAULT_H2_KEEPALIVE_SECS,
            (1, HOUR),
        )?,
        h2_stall: secs(
            "h2_stall_timeout_secs",
            raw.h2_stall_timeout_secs,
            DEFAULT_H2_STALL_TIMEOUT_SECS,
            (1, DAY),
        )?,
        shutdown_grace: secs(
            "shutdown_grace_secs",
            raw.shutdown_grace_secs,
            DEFAULT_SHUTDOWN_GRACE_SECS,
            (1, DAY),
        )?,
        shutdown_delay: secs(
            "shutdown_delay_secs",
            raw.shutdown_delay_secs,
            DEFAULT_SHUTDOWN_DELAY_SECS,
            (0, HOUR),
        )?,
        upload_drain: secs(
            "upload_drain_secs",
            raw.upload_drain_secs,
            DEFAULT_UPLOAD_DRAIN_SECS,
            (1, DAY),
        )?,
    })
}

fn list<T>(
    raw: &Option<Vec<String>>,
    parse: impl Fn(&str) -> Result<T, ConfigError>,
) -> Result<Vec<T>, ConfigError> {
    raw.iter()
        .flatten()
        .filter(|s| !s.trim().is_empty())
        .map(|s| parse(s))
        .collect()
}

impl TryFrom<ConfigFile> for Config {
    type Error = ConfigError;

    fn try_from(raw: ConfigFile) -> Result<Config, ConfigError> {
        let listen_str = raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = listen_addr("listen", listen_str)?;
        let registry = raw.registry.as_deref().ok_or(ConfigError::Missing {
            key: "registry",
            flag: "registry",
            env: "REGRELAY_REGISTRY",
        })?;
        let registry = Origin::parse("registry", registry)?;
        let mut publics = list(&raw.public_url, |s| Origin::parse("public_url", s.trim()))?;
        let public_url = (!publics.is_empty()).then(|| publics.remove(0));
        let public_aliases = publics;
        let tls = match (&raw.tls_cert, &raw.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None) => None,
            (Some(_), None) => return Err(invalid("tls_key", "required with tls_cert")),
            (None, Some(_)) => return Err(invalid("tls_cert", "required with tls_key")),
        };
        let token_realm = raw.token_realm.as_deref().map(parse_realm).transpose()?;
        let session_lifetime = secs(
            "session_lifetime_secs",
            raw.session_lifetime_secs,
            DEFAULT_SESSION_LIFETIME_SECS,
            (1, MAX_SESSION_LIFETIME.as_secs()),
        )?;
        let token_cache_max_entries = bounded(
            "token_cache_max_entries",
            raw.token_cache_max_entries,
            DEFAULT_TOKEN_CACHE_MAX_ENTRIES,
            (1, 100_000_000),
        )?;
        let publics: Vec<&Origin> = public_url.iter().chain(&public_aliases).collect();
        if let Some(realm) = token_realm.as_ref().and_then(Origin::of) {
            refuse_self_realm(&realm, listen, &publics)?;
        }
        let (upstreams, root_upstream) = upstreams(&raw, &registry, &publics, &token_realm)?;
        let inject_credentials_for = match &raw.inject_credentials_for {
            Some(_) => list(&raw.inject_credentials_for, |s| {
                Cidr::parse("inject_credentials_for", s)
            })?,
            None => vec![
                Cidr::parse("inject_credentials_for", "127.0.0.0/8").expect("a valid CIDR"),
                Cidr::parse("inject_credentials_for", "::1/128").expect("a valid CIDR"),
            ],
        };
        let trusted_proxies = list(&raw.trusted_proxies, |s| Cidr::parse("trusted_proxies", s))?;
        if upstreams.iter().any(|u| u.credentials_file.is_some())
            && raw.inject_through_trusted_proxies != Some(true)
        {
            refuse_injection_through_fronts(&inject_credentials_for, &trusted_proxies)?;
        }
        let failed_logins = (
            bounded(
                "failed_logins_per_minute",
                raw.failed_logins_per_minute,
                DEFAULT_FAILED_LOGINS_PER_MINUTE,
                (1, 100_000),
            )?,
            bounded(
                "client_failed_logins_per_minute",
                raw.client_failed_logins_per_minute,
                DEFAULT_CLIENT_FAILED_LOGINS_PER_MINUTE,
                (1, 100_000),
            )?,
        );
        let session_cache_max_bytes = bounded(
            "session_cache_max_bytes",
            raw.session_cache_max_bytes,
            DEFAULT_SESSION_CACHE_MAX_BYTES,
            (1 << 20, 1 << 40),
        )?;
        let upload_chunk_max = raw
            .upload_chunk_max
            .map(|n| bounded("upload_chunk_max", Some(n), n, (1, u64::MAX)))
            .transpose()?;
        let metrics_listen = raw
            .metrics_listen
            .as_deref()
            .map(|m| {
                let addr = listen_addr("metrics_listen", m)?;
                if addr == listen && addr.port() != 0 {
                    return Err(invalid(
                        "metrics_listen",
                        format!("{m:?} is the proxy's own --listen address"),
                    ));
                }
                Ok(addr)
            })
            .transpose()?;
        Ok(Config {
            listen,
            metrics_listen,
            upgrade_socket: upgrade_socket(&raw)?,
            registry,
            public_url,
            public_aliases,
            tls,
            log_format: raw.log_format.unwrap_or_default(),
            limits: limits(&raw)?,
            timeouts: timeouts(&raw)?,
            trusted_proxies,
            session_key_file: raw.session_key_file.clone(),
            session_lifetime,
            token_cache_max_entries,
            session_cache_max_bytes: usize::try_from(session_cache_max_bytes).unwrap_or(usize::MAX),
            failed_logins,
            ready_requires_token_service: raw.ready_requires_token_service.unwrap_or(false),
            upload_chunk_max,
            upload_split: raw.upload_split.unwrap_or_default(),
            cache: cache(&raw)?,
            upstreams,
            root_upstream,
            inject_credentials_for,
        })
    }
}

/// Injected credentials go to clients in `--inject-credentials-for`; behind a trusted front the
/// client is the address the front forwards, and a request the front relays without one counts
/// as the front's own. Ranges that cover a front would hand the credentials to every client of a
/// front that forgets `X-Forwarded-For`: refused unless acknowledged.
fn refuse_injection_through_fronts(inject: &[Cidr], trusted: &[Cidr]) -> Result<(), ConfigError> {
    for front in trusted {
        if let Some(range) = inject.iter().find(|i| i.overlaps(front)) {
            return Err(invalid(
                "inject_credentials_for",
                format!(
                    "{range} covers the trusted front {front} (--trusted-proxies): a request that \
                     front relays without X-Forwarded-For would get the injected pull \
                     credentials. Narrow --inject-credentials-for or --trusted-proxies, or, if the \
                     front always sends X-Forwarded-For (or its own requests should get them), \
                     set --inject-through-trusted-proxies"
                ),
            ));
        }
    }
    Ok(())
}

/// A listen address as people write it: `IP:PORT` (`[::]:5000`), `:PORT` or a bare `PORT` (every
/// IPv4 interface, as `0.0.0.0:PORT`), `localhost:PORT` (`127.0.0.1:PORT`). Other host names are
/// refused: which of a name's addresses to bind is the operator's choice, not regrelay's guess.
fn listen_addr(key: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => (host, port),
        None => ("", text),
    };
    let want = "want IP:PORT (0.0.0.0:5000 every interface, 127.0.0.1:5000 this host only, \
                [::]:5000 IPv6), :PORT or localhost:PORT";
    let port: u16 = port.parse().map_err(|_| {
        invalid(
            key,
            format!("{text:?}: {port:?} is not a port number; {want}"),
        )
    })?;
    let ip: std::net::IpAddr = match host {
        "" | "*" => std::net::Ipv4Addr::UNSPECIFIED.into(),
        h if h.eq_ignore_ascii_case("localhost") => std::net::Ipv4Addr::LOCALHOST.into(),
        h => {
            return Err(invalid(
                key,
                format!("{text:?}: {h:?} is a host name, and a listener binds an address; {want}"),
            ))
        }
    };
    Ok(SocketAddr::new(ip, port))
}

/// Longest path a Unix socket address holds (`sun_path` is 108 bytes, one for the NUL).
const MAX_UNIX_SOCKET_PATH: usize = 107;

/// `--upgrade-socket`: a path `bind(2)` can take (checked here, not at the handover).
fn upgrade_socket(raw: &ConfigFile) -> Result<Option<PathBuf>, ConfigError> {
    let Some(path) = raw.upgrade_socket.clone() else {
        return Ok(None);
    };
    let len = path.as_os_str().len();
    if len == 0 || len > MAX_UNIX_SOCKET_PATH {
        return Err(invalid(
            "upgrade_socket",
            format!(
                "{}: a Unix socket path has 1 to {MAX_UNIX_SOCKET_PATH} bytes, this one {len}; \
                 pick a shorter path (e.g. /run/regrelay/upgrade.sock)",
                path.display()
            ),
        ));
    }
    if path.file_name().is_none() {
        return Err(invalid(
            "upgrade_socket",
            format!("{}: names a directory, not a socket file", path.display()),
        ));
    }
    Ok(Some(path))
}

/// `--cache-dir` / `--cache-max-bytes`: a size without a directory is a mistake worth naming.
fn cache(raw: &ConfigFile) -> Result<Option<CacheConfig>, ConfigError> {
    let Some(dir) = raw.cache_dir.clone() else {
        if raw.cache_max_bytes.is_some() {
            return Err(invalid("cache_max_bytes", "needs --cache-dir"));
        }
        if raw.cache_serve_stale == Some(true) {
            return Err(invalid("cache_serve_stale", "needs --cache-dir"));
        }
        return Ok(None);
    };
    let max_bytes = raw.cache_max_bytes.unwrap_or(DEFAULT_CACHE_MAX_BYTES);
    if max_bytes < 1 << 20 {
        return Err(invalid(
            "cache_max_bytes",
            format!("{max_bytes} is below 1 MiB (1048576)"),
        ));
    }
    Ok(Some(CacheConfig {
        dir,
        max_bytes,
        serve_stale: raw.cache_serve_stale.unwrap_or(false),
    }))
}

/// An upstream name: a registry host[:port] or an alias, lowercase, no `/`.
fn upstream_name(s: &str) -> Result<String, ConfigError> {
    let name = s.trim().to_ascii_lowercase();
    let ok = !name.is_empty()
        && name != "v2"
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    if !ok {
        return Err(invalid(
            "upstream",
            format!("{s:?}: a name is a registry host[:port] or an alias ([a-z0-9.-_:])"),
        ));
    }
    Ok(name)
}

/// Splits `https://host/v2/<prefix>` into the origin and the repository prefix.
fn upstream_url(key: &'static str, s: &str) -> Result<(Origin, String), ConfigError> {
    let uri: Uri = s.parse().map_err(|e| invalid(key, format!("{s:?}: {e}")))?;
    let path = uri.path().trim_end_matches('/');
    let prefix = match path {
        "" | "/v2" => String::new(),
        p => p.strip_prefix("/v2/").map(str::to_owned).ok_or_else(|| {
            invalid(
                key,
                format!("{s:?}: a path must be /v2/<repository prefix>"),
            )
        })?,
    };
    let canonical = prefix.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
    });
    if (!prefix.is_empty() && !canonical) || uri.query().is_some() {
        return Err(invalid(
            key,
            format!("{s:?}: not a canonical repository prefix"),
        ));
    }
    let base = format!(
        "{}://{}",
        uri.scheme_str().unwrap_or(""),
        uri.authority().map(|a| a.as_str()).unwrap_or("")
    );
    Ok((Origin::parse(key, &base)?, prefix))
}

/// The upstream table: the default (`--registry`) first, then `--upstream` flags and
/// `[[upstream]]` tables; names unique; credentials attached; the root picked.
fn upstreams(
    raw: &ConfigFile,
    registry: &Origin,
    public: &[&Origin],
    token_realm: &Option<Uri>,
) -> Result<(Vec<UpstreamConfig>, usize), ConfigError> {
    let mut all = vec![UpstreamConfig {
        name: registry.authority().as_str().to_ascii_lowercase(),
        aliases: public
            .iter()
            .map(|p| p.authority().as_str().to_ascii_lowercase())
            .collect(),
        origin: registry.clone(),
        prefix: String::new(),
        token_realm: token_realm.clone(),
        credentials_file: None,
        ca: raw.upstream_ca.clone(),
        auth_redirect_allow: list(&raw.auth_redirect_allow, AllowedOrigin::parse)?,
    }];
    for spec in raw
        .upstream
        .iter()
        .flatten()
        .filter(|s| !s.trim().is_empty())
    {
        let (name, url) = spec
            .split_once('=')
            .ok_or_else(|| invalid("upstream", format!("{spec:?}: want NAME=URL")))?;
        let (origin, prefix) = upstream_url("upstream", url.trim())?;
        all.push(UpstreamConfig {
            name: upstream_name(name)?,
            aliases: vec![],
            origin,
            prefix,
            token_realm: None,
            credentials_file: None,
            ca: None,
            auth_redirect_allow: vec![],
        });
    }
    for t in raw.upstream_tables.iter().flatten() {
        let (origin, prefix) = upstream_url("upstream", &t.url)?;
        all.push(UpstreamConfig {
            name: upstream_name(&t.name)?,
            aliases: vec![],
            origin,
            prefix,
            token_realm: t.token_realm.as_deref().map(parse_realm).transpose()?,
            credentials_file: t.credentials_file.clone(),
            ca: t.ca.clone(),
            auth_redirect_allow: list(&t.auth_redirect_allow, AllowedOrigin::parse)?,
        });
    }
    let find = |all: &[UpstreamConfig], name: &str| all.iter().position(|u| u.answers_to(name));
    for (i, u) in all.iter().enumerate() {
        if let Some(j) = find(&all[..i], &u.name) {
            return Err(invalid(
                "upstream",
                format!(
                    "{:?} names two upstreams ({} and {})",
                    u.name, all[j].origin, u.origin
                ),
            ));
        }
    }
    for spec in raw
        .upstream_credentials
        .iter()
        .flatten()
        .filter(|s| !s.trim().is_empty())
    {
        let (name, file) = spec
            .split_once('=')
            .ok_or_else(|| invalid("upstream_credentials", format!("{spec:?}: want NAME=FILE")))?;
        let i = find(&all, &name.trim().to_ascii_lowercase()).ok_or_else(|| {
            invalid(
                "upstream_credentials",
                format!("{name:?} names no upstream"),
            )
        })?;
        all[i].credentials_file = Some(PathBuf::from(file.trim()));
    }
    let root = match &raw.root_upstream {
        Some(name) => find(&all, &name.trim().to_ascii_lowercase())
            .ok_or_else(|| invalid("root_upstream", format!("{name:?} names no upstream")))?,
        None => 0,
    };
    Ok((all, root))
}

fn parse_realm(s: &str) -> Result<Uri, ConfigError> {
    let uri: Uri = s
        .parse()
        .map_err(|e| invalid("token_realm", format!("{s:?}: {e}")))?;
    match (Origin::of(&uri), uri.authority()) {
        (Some(o), Some(a)) if !a.as_str().contains('@') && o.authority.port_u16() != Some(0) => {
            Ok(uri)
        }
        _ => Err(invalid(
            "token_realm",
            format!("{s:?}: want an absolute http(s) URL"),
        )),
    }
}

/// A realm on regrelay's own listener (or one of its public URLs) would make every mint call
/// regrelay itself, forever.
pub fn refuse_self_realm(
    realm: &Origin,
    listen: SocketAddr,
    publics: &[&Origin],
) -> Result<(), ConfigError> {
    let on_public = publics.iter().any(|p| p.same_as(realm));
    let host = realm
        .authority()
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let on_listener = realm.effective_port() == listen.port()
        && host
            .parse::<IpAddr>()
            .map(|ip| ip == listen.ip() || (listen.ip().is_unspecified() && ip.is_loopback()))
            .unwrap_or(host.eq_ignore_ascii_case("localhost"));
    if on_public || on_listener {
        return Err(invalid(
            "token_realm",
            format!("{realm} is regrelay itself; point it at GitLab's /jwt/auth"),
        ));
    }
    Ok(())
}

pub mod cli;
#[cfg(test)]
mod tests;
