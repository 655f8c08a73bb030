//! The raw settings as the user wrote them: [`ConfigFile`] is both the clap flags (each with
//! its `REGRELAY_*` variable) and the TOML file's schema, every field optional. Here the file is
//! read (bounded, unknown keys refused by name) and merged under the flags; nothing is checked
//! beyond the TOML types (that is `validate.rs`).

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

use super::secret::read_bounded;
use super::{ConfigError, MAX_CONFIG_FILE_BYTES};

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
/// TOML file schema; every field is optional here and checked by [`super::Config`]'s `TryFrom`.
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
    /// Threads that serve connections, each with an event loop of its own (thread-per-core, as
    /// nginx's and HAProxy's); 0 serves them on one work-stealing runtime instead [default: the
    /// CPUs this process may use].
    #[arg(long, env = "REGRELAY_WORKERS", value_name = "N")]
    pub workers: Option<usize>,
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
    /// A cache shared by replicas on S3-compatible object storage, `s3://BUCKET[/PREFIX]`:
    /// each blob is fetched from the upstream once for all of them; `--cache-dir` stays the
    /// local tier in front of it (off by default).
    #[arg(long, env = "REGRELAY_CACHE_STORE", value_name = "s3://BUCKET/PREFIX")]
    pub cache_store: Option<String>,
    /// Largest total of the shared bucket's objects in bytes; least recently used (by any
    /// replica) evicted [default: 100 GiB].
    #[arg(long, env = "REGRELAY_CACHE_STORE_MAX_BYTES", value_name = "N")]
    pub cache_store_max_bytes: Option<u64>,
    /// The object store's URL, asked path-style (`https://HOST[:PORT]`) [default: AWS S3 in
    /// `--cache-s3-region`].
    #[arg(long, env = "REGRELAY_CACHE_S3_ENDPOINT", value_name = "URL")]
    pub cache_s3_endpoint: Option<String>,
    /// The bucket's region, for request signing [default: AWS_REGION, else us-east-1].
    #[arg(long, env = "REGRELAY_CACHE_S3_REGION", value_name = "REGION")]
    pub cache_s3_region: Option<String>,
    /// A file (mode 0600) holding the bucket's credentials as `~/.aws/credentials` does
    /// (`aws_access_key_id`, `aws_secret_access_key`, optionally `aws_session_token`)
    /// [default: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN].
    #[arg(long, env = "REGRELAY_CACHE_S3_CREDENTIALS_FILE", value_name = "FILE")]
    pub cache_s3_credentials_file: Option<PathBuf>,
    /// Seconds a replica's claim on a shared fill holds without being renewed: how long a
    /// replica that died mid-fill keeps the others waiting [default: 15].
    #[arg(long, env = "REGRELAY_CACHE_S3_LEASE_SECS", value_name = "N")]
    pub cache_s3_lease_secs: Option<u64>,
    /// Seconds a replica waits for another replica's fill of a blob before it fetches the blob
    /// itself: a pull gets no byte while it waits, and Kubernetes' CRI gives up on a pull
    /// without progress for 5 minutes [default: 60].
    #[arg(long, env = "REGRELAY_CACHE_S3_WAIT_SECS", value_name = "N")]
    pub cache_s3_wait_secs: Option<u64>,
    /// Answer a granted blob `GET` whose blob is in the shared bucket with a redirect to a
    /// presigned URL valid for seconds, so the bytes flow from the object store, not regrelay.
    #[arg(long, env = "REGRELAY_CACHE_REDIRECT", num_args = 0..=1, default_missing_value = "true", value_name = "true|false")]
    pub cache_redirect: Option<bool>,
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
            workers,
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
            cache_store,
            cache_store_max_bytes,
            cache_s3_endpoint,
            cache_s3_region,
            cache_s3_credentials_file,
            cache_s3_lease_secs,
            cache_s3_wait_secs,
            cache_redirect,
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
