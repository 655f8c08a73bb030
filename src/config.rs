//! Configuration: command-line flags, `REGRELAY_*` environment variables and a TOML file, merged
//! (flags win over env, env over the file) into a raw [`ConfigFile`], then validated into a typed
//! [`Config`] before any port is bound. Validation reports every problem at once, one line per
//! key, each naming the key and what to write instead, and `main` exits 64 (EX_USAGE) on them.
//! `Config` is plain data: paths stay paths here; the TLS configs and the session key ring are
//! built from it by [`crate::app::App::new`] (still before any bind), so this module depends on
//! nothing else of regrelay. Every number is range-checked.
//!
//! Rooms: `file.rs` (the flags and the TOML schema, [`ConfigFile`], reading and merging),
//! `validate.rs` (raw → [`Config`], every problem collected), `limits.rs` (bounds and timeouts,
//! their ranges, the open-file fit), `origin.rs` (base URLs, redirect origins, realms),
//! `network.rs` (listen addresses, CIDRs), `upstreams.rs` (the upstream table of the mirror
//! endpoint), `secret.rs` (reading files that hold secrets: permissions, size bounds),
//! `defaults.rs` (every default), `cli.rs` (what clap's own errors leave out).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

mod cache_store;
pub mod cli;
mod defaults;
mod file;
mod limits;
mod network;
mod origin;
mod problems;
mod secret;
mod upstreams;
mod validate;

pub use cache_store::{
    DEFAULT_CACHE_S3_LEASE_SECS, DEFAULT_CACHE_S3_WAIT_SECS, DEFAULT_CACHE_STORE_MAX_BYTES,
};
pub use defaults::*;
pub use file::{ConfigFile, LogFormat, UploadSplit, UpstreamTable};
pub use limits::{Limits, Timeouts, READY_PROBE_CONNECTIONS, RESERVE_CONNECTIONS};
pub use network::{canonical_ip, Cidr};
pub use origin::{AllowedOrigin, Origin};
pub use secret::{private_enough, read_bounded, read_private};
pub use upstreams::UpstreamConfig;
pub use validate::refuse_self_realm;

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
    /// The config file cannot be read or parsed (unknown keys are refused). Reported alone:
    /// nothing else can be checked without the file.
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong (names the key for unknown or mistyped keys).
        reason: String,
    },
    /// More than one problem, each on a line of its own (never nested, never empty): one run
    /// reports every mistake, not the first of them.
    #[error("{}", lines(.0))]
    Several(Vec<ConfigError>),
}

impl ConfigError {
    /// `errors` as one error: the only one as it is, more as [`ConfigError::Several`].
    pub fn all(mut errors: Vec<ConfigError>) -> ConfigError {
        match errors.len() {
            1 => errors.remove(0),
            _ => ConfigError::Several(errors),
        }
    }

    /// Each problem, one per key (a single error is its own only problem).
    pub fn each(&self) -> std::slice::Iter<'_, ConfigError> {
        match self {
            ConfigError::Several(all) => all.iter(),
            one => std::slice::from_ref(one).iter(),
        }
    }
}

fn lines(errors: &[ConfigError]) -> String {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

/// A [`ConfigError::Invalid`] for `key`.
pub fn invalid(key: &'static str, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.to_string(),
    }
}

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
    /// The bucket replicas share (`--cache-store`), when set.
    pub shared: Option<SharedConfig>,
}

/// `--cache-store` and its settings: where the shared bucket is and how to sign for it.
#[derive(Clone)]
pub struct SharedConfig {
    /// The bucket's name.
    pub bucket: String,
    /// Where regrelay's objects go in it: empty, or ending in `/`.
    pub prefix: String,
    /// The object store's URL (`http(s)://HOST[:PORT]`), asked path-style.
    pub endpoint: String,
    /// The region requests are signed for.
    pub region: String,
    /// The access key id.
    pub key_id: String,
    /// The secret access key: never printed.
    pub secret: String,
    /// A session token (temporary credentials): never printed.
    pub session_token: Option<String>,
    /// How long a claim on a fill holds without renewal.
    pub lease: Duration,
    /// How long a replica waits for another's fill before fetching itself.
    pub wait: Duration,
    /// The bucket's size bound (`--cache-store-max-bytes`).
    pub max_bytes: u64,
    /// `--cache-redirect`.
    pub redirect: bool,
}

impl fmt::Debug for SharedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedConfig")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("key_id", &self.key_id)
            .field("secret", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("lease", &self.lease)
            .field("wait", &self.wait)
            .field("max_bytes", &self.max_bytes)
            .field("redirect", &self.redirect)
            .finish()
    }
}

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
    /// Threads serving connections, each on a runtime of its own (0: one work-stealing runtime).
    pub workers: usize,
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

impl Config {
    /// Merges flags/env with the optional config file and validates the result (every problem
    /// at once; a file that cannot be read or parsed alone).
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

#[cfg(test)]
mod tests;
