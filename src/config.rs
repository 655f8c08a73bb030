//! Configuration: command-line flags, `REGRELAY_*` environment variables and a TOML file, merged
//! (flags win over env, env over the file) into a raw [`ConfigFile`], then validated into a typed
//! [`Config`] before any port is bound. Every error names the key it is about, and `main` exits 64
//! (EX_USAGE) on it. This module reads files (TOML, PEM) but opens no socket.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use http::uri::{Authority, Scheme};
use http::Uri;
use serde::Deserialize;

use crate::session::KeyRing;
use crate::tls;
use crate::token::DEFAULT_TOKEN_CACHE_MAX_ENTRIES;

/// Defaults, with their unit in the name.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:5000";
/// Connections served at once; further ones wait in the kernel's accept queue.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Time a client has to send its request headers.
pub const DEFAULT_HEADER_READ_TIMEOUT_SECS: u64 = 30;
/// Time a client has to finish the TLS handshake.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECS: u64 = 15;
/// Silence allowed inside a body stream, either way. There is no total-request timeout.
pub const DEFAULT_BODY_IDLE_TIMEOUT_SECS: u64 = 300;
/// Time allowed to open a TCP connection to the upstream.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT_SECS: u64 = 10;
/// Time in-flight requests get to finish after SIGTERM/SIGINT.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 30;
/// Lifetime of a sealed session (the `expires_in` clients get).
pub const DEFAULT_SESSION_LIFETIME_SECS: u64 = 3600;
/// Hard cap on a session's lifetime (and the lifetime of OAuth2 refresh tokens).
pub const MAX_SESSION_LIFETIME: Duration = Duration::from_secs(24 * 3600);

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

fn invalid(key: &'static str, reason: impl ToString) -> ConfigError {
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

/// Raw settings as the user wrote them. Used both as clap flags (with env fallbacks) and as the
/// TOML file schema; every field is optional here and checked in [`Config::try_from`].
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// TOML file with any of these keys (snake_case). Flags and env override it.
    #[arg(long, env = "REGRELAY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:5000].
    #[arg(long, env = "REGRELAY_LISTEN")]
    pub listen: Option<String>,
    /// Upstream registry base URL, http or https (e.g. https://registry.gitlab.example.com).
    #[arg(long, env = "REGRELAY_REGISTRY")]
    pub registry: Option<String>,
    /// URL clients use to reach regrelay; rewrites `Location`. Default: the request's Host and scheme.
    #[arg(long, env = "REGRELAY_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// PEM certificate chain: serve HTTPS (ALPN h2, http/1.1). Needs --tls-key.
    #[arg(long, env = "REGRELAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "REGRELAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Extra PEM CA bundle trusted for the upstream (system roots are always trusted).
    #[arg(long, env = "REGRELAY_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "REGRELAY_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Connections served at once [default: 4096].
    #[arg(long, env = "REGRELAY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds a client has to send request headers [default: 30].
    #[arg(long, env = "REGRELAY_HEADER_READ_TIMEOUT_SECS")]
    pub header_read_timeout_secs: Option<u64>,
    /// Seconds a client has to complete the TLS handshake [default: 15].
    #[arg(long, env = "REGRELAY_TLS_HANDSHAKE_TIMEOUT_SECS")]
    pub tls_handshake_timeout_secs: Option<u64>,
    /// Seconds a body stream may stay silent, either direction [default: 300]. No total timeout.
    #[arg(long, env = "REGRELAY_BODY_IDLE_TIMEOUT_SECS")]
    pub body_idle_timeout_secs: Option<u64>,
    /// Seconds allowed to connect to the upstream [default: 10].
    #[arg(long, env = "REGRELAY_UPSTREAM_CONNECT_TIMEOUT_SECS")]
    pub upstream_connect_timeout_secs: Option<u64>,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT [default: 30].
    #[arg(long, env = "REGRELAY_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Upstream token realm URL (GitLab's `https://gitlab.example.com/jwt/auth`). Default: the
    /// realm the registry announces in its challenges.
    #[arg(long, env = "REGRELAY_TOKEN_REALM")]
    pub token_realm: Option<String>,
    /// HOST[:PORT] the token service may redirect to with the client's credentials, besides the
    /// realm's own origin and its https upgrade. Repeatable; env: comma-separated.
    #[arg(
        long = "auth-redirect-allow",
        env = "REGRELAY_AUTH_REDIRECT_ALLOW",
        value_delimiter = ','
    )]
    pub auth_redirect_allow: Option<Vec<String>>,
    /// File of session keys, one base64 32-byte key per line: the first seals, all open.
    /// Without it: a random key per process (one replica only; sessions die on restart).
    #[arg(long, env = "REGRELAY_SESSION_KEY_FILE")]
    pub session_key_file: Option<PathBuf>,
    /// Seconds a session token is valid (`expires_in`) [default: 3600, at most 86400].
    #[arg(long, env = "REGRELAY_SESSION_LIFETIME_SECS")]
    pub session_lifetime_secs: Option<u64>,
    /// Sessions whose upstream token is cached at once [default: 100000].
    #[arg(long, env = "REGRELAY_TOKEN_CACHE_MAX_ENTRIES")]
    pub token_cache_max_entries: Option<usize>,
    /// Largest upstream upload request in bytes (e.g. a CDN's request-size cap); long uploads
    /// are also split by time, whatever this says [default: off].
    #[arg(long, env = "REGRELAY_UPLOAD_CHUNK_MAX")]
    pub upload_chunk_max: Option<u64>,
}

impl ConfigFile {
    /// Reads and parses a TOML file; unknown keys are refused with their name.
    pub fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
        let file_err = |reason: String| ConfigError::File {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        toml::from_str(&text).map_err(|e| file_err(e.to_string()))
    }

    /// `self` (flags and env) over `file`: each key takes the first value present.
    pub fn over(self, file: ConfigFile) -> ConfigFile {
        ConfigFile {
            config: self.config,
            listen: self.listen.or(file.listen),
            registry: self.registry.or(file.registry),
            public_url: self.public_url.or(file.public_url),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            upstream_ca: self.upstream_ca.or(file.upstream_ca),
            log_format: self.log_format.or(file.log_format),
            max_connections: self.max_connections.or(file.max_connections),
            header_read_timeout_secs: self
                .header_read_timeout_secs
                .or(file.header_read_timeout_secs),
            tls_handshake_timeout_secs: self
                .tls_handshake_timeout_secs
                .or(file.tls_handshake_timeout_secs),
            body_idle_timeout_secs: self.body_idle_timeout_secs.or(file.body_idle_timeout_secs),
            upstream_connect_timeout_secs: self
                .upstream_connect_timeout_secs
                .or(file.upstream_connect_timeout_secs),
            shutdown_grace_secs: self.shutdown_grace_secs.or(file.shutdown_grace_secs),
            token_realm: self.token_realm.or(file.token_realm),
            auth_redirect_allow: self.auth_redirect_allow.or(file.auth_redirect_allow),
            session_key_file: self.session_key_file.or(file.session_key_file),
            session_lifetime_secs: self.session_lifetime_secs.or(file.session_lifetime_secs),
            token_cache_max_entries: self
                .token_cache_max_entries
                .or(file.token_cache_max_entries),
            upload_chunk_max: self.upload_chunk_max.or(file.upload_chunk_max),
        }
    }
}

/// A scheme + authority (no path): the upstream registry, or the public URL of this proxy.
#[derive(Debug, Clone)]
pub struct Origin {
    scheme: Scheme,
    authority: Authority,
}

impl Origin {
    /// Parses a base URL; a path other than `/`, a query or userinfo are refused.
    pub fn parse(key: &'static str, s: &str) -> Result<Origin, ConfigError> {
        let uri: Uri = s.parse().map_err(|e| invalid(key, format!("{s:?}: {e}")))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            _ => return Err(invalid(key, format!("{s:?}: scheme must be http or https"))),
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| invalid(key, format!("{s:?}: no host")))?;
        if authority.as_str().contains('@') {
            return Err(invalid(key, "credentials in the URL are not allowed"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(invalid(
                key,
                format!("{s:?}: must be a base URL without path or query"),
            ));
        }
        Ok(Origin { scheme, authority })
    }

    /// Builds from a scheme and a `Host` value, when it is a valid authority.
    pub fn from_parts(scheme: Scheme, host: &str) -> Option<Origin> {
        let authority: Authority = host.parse().ok()?;
        if authority.as_str().contains('@') {
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
        Some(Origin {
            scheme,
            authority: uri.authority()?.clone(),
        })
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

/// A `HOST[:PORT]` the token service may redirect credentials to (`--auth-redirect-allow`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    host: String,
    port: Option<u16>,
}

impl AllowedHost {
    /// Parses `host`, `host:port` or `[v6]:port`.
    pub fn parse(s: &str) -> Result<AllowedHost, ConfigError> {
        let authority: Authority = s.trim().parse().map_err(|e| {
            invalid(
                "auth_redirect_allow",
                format!("{s:?}: {e} (want HOST[:PORT])"),
            )
        })?;
        if authority.as_str().contains('@') || authority.host().is_empty() {
            return Err(invalid(
                "auth_redirect_allow",
                format!("{s:?}: want HOST[:PORT]"),
            ));
        }
        Ok(AllowedHost {
            host: authority.host().to_ascii_lowercase(),
            port: authority.port_u16(),
        })
    }

    /// Same host, and the same port (the scheme's default when none was given).
    pub fn matches(&self, origin: &Origin) -> bool {
        let port = self.port.unwrap_or(if origin.scheme == Scheme::HTTPS {
            443
        } else {
            80
        });
        origin.authority.host().eq_ignore_ascii_case(&self.host) && origin.effective_port() == port
    }
}

/// Timeouts of the request path. There is deliberately no total-request timeout: a push may
/// stream for hours.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Client request headers.
    pub header_read: Duration,
    /// Client TLS handshake.
    pub tls_handshake: Duration,
    /// Silence within a body, either direction.
    pub body_idle: Duration,
    /// TCP connect to the upstream.
    pub upstream_connect: Duration,
    /// Drain after a shutdown signal.
    pub shutdown_grace: Duration,
}

/// Validated configuration.
#[derive(Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Upstream registry.
    pub registry: Origin,
    /// Public URL of regrelay, when configured.
    pub public_url: Option<Origin>,
    /// Server TLS, when serving HTTPS (loaded and checked already).
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
    /// Client TLS for the upstream (system roots + `upstream_ca`).
    pub upstream_tls: rustls::ClientConfig,
    /// Log format.
    pub log_format: LogFormat,
    /// Connections served at once.
    pub max_connections: NonZeroUsize,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Upstream token realm, when configured (else learnt from challenges).
    pub token_realm: Option<Uri>,
    /// Extra origins the token service may redirect credentials to.
    pub auth_redirect_allow: Vec<AllowedHost>,
    /// Session sealing keys.
    pub session_keys: Arc<KeyRing>,
    /// Session lifetime.
    pub session_lifetime: Duration,
    /// Bound of the upstream token cache.
    pub token_cache_max_entries: usize,
    /// Largest upstream upload request, when bounded.
    pub upload_chunk_max: Option<u64>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("registry", &self.registry.to_string())
            .field(
                "public_url",
                &self.public_url.as_ref().map(ToString::to_string),
            )
            .field("tls", &self.server_tls.is_some())
            .field("max_connections", &self.max_connections)
            .field("timeouts", &self.timeouts)
            .field("token_realm", &self.token_realm)
            .field("auth_redirect_allow", &self.auth_redirect_allow)
            .field("session_keys", &self.session_keys)
            .field("session_lifetime", &self.session_lifetime)
            .finish_non_exhaustive()
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
}

fn secs(key: &'static str, v: Option<u64>, default: u64) -> Result<Duration, ConfigError> {
    match v.unwrap_or(default) {
        0 => Err(invalid(key, "must be at least 1 second")),
        n => Ok(Duration::from_secs(n)),
    }
}

impl TryFrom<ConfigFile> for Config {
    type Error = ConfigError;

    fn try_from(raw: ConfigFile) -> Result<Config, ConfigError> {
        let listen_str = raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = listen_str
            .parse()
            .map_err(|e| invalid("listen", format!("{listen_str:?}: {e} (want IP:PORT)")))?;
        let registry = raw.registry.as_deref().ok_or(ConfigError::Missing {
            key: "registry",
            flag: "registry",
            env: "REGRELAY_REGISTRY",
        })?;
        let registry = Origin::parse("registry", registry)?;
        let public_url = raw
            .public_url
            .as_deref()
            .map(|s| Origin::parse("public_url", s))
            .transpose()?;
        let server_tls = match (&raw.tls_cert, &raw.tls_key) {
            (Some(cert), Some(key)) => Some(tls::server_config(cert, key)?),
            (None, None) => None,
            (Some(_), None) => return Err(invalid("tls_key", "required with tls_cert")),
            (None, Some(_)) => return Err(invalid("tls_cert", "required with tls_key")),
        };
        let upstream_tls = tls::client_config(raw.upstream_ca.as_deref())?;
        let max_connections =
            NonZeroUsize::new(raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS))
                .ok_or_else(|| invalid("max_connections", "must be at least 1"))?;
        let timeouts = Timeouts {
            header_read: secs(
                "header_read_timeout_secs",
                raw.header_read_timeout_secs,
                DEFAULT_HEADER_READ_TIMEOUT_SECS,
            )?,
            tls_handshake: secs(
                "tls_handshake_timeout_secs",
                raw.tls_handshake_timeout_secs,
                DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECS,
            )?,
            body_idle: secs(
                "body_idle_timeout_secs",
                raw.body_idle_timeout_secs,
                DEFAULT_BODY_IDLE_TIMEOUT_SECS,
            )?,
            upstream_connect: secs(
                "upstream_connect_timeout_secs",
                raw.upstream_connect_timeout_secs,
                DEFAULT_UPSTREAM_CONNECT_TIMEOUT_SECS,
            )?,
            shutdown_grace: secs(
                "shutdown_grace_secs",
                raw.shutdown_grace_secs,
                DEFAULT_SHUTDOWN_GRACE_SECS,
            )?,
        };
        let token_realm = raw
            .token_realm
            .as_deref()
            .map(|s| {
                let uri: Uri = s
                    .parse()
                    .map_err(|e| invalid("token_realm", format!("{s:?}: {e}")))?;
                match (Origin::of(&uri), uri.authority()) {
                    (Some(_), Some(a)) if !a.as_str().contains('@') => Ok(uri),
                    _ => Err(invalid(
                        "token_realm",
                        format!("{s:?}: want an absolute http(s) URL"),
                    )),
                }
            })
            .transpose()?;
        let auth_redirect_allow = raw
            .auth_redirect_allow
            .unwrap_or_default()
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| AllowedHost::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let session_keys = Arc::new(match &raw.session_key_file {
            Some(path) => KeyRing::load(path)?,
            None => KeyRing::ephemeral(),
        });
        let session_lifetime = secs(
            "session_lifetime_secs",
            raw.session_lifetime_secs,
            DEFAULT_SESSION_LIFETIME_SECS,
        )?;
        if session_lifetime > MAX_SESSION_LIFETIME {
            return Err(invalid(
                "session_lifetime_secs",
                format!("at most {} (24 h)", MAX_SESSION_LIFETIME.as_secs()),
            ));
        }
        let token_cache_max_entries = raw
            .token_cache_max_entries
            .unwrap_or(DEFAULT_TOKEN_CACHE_MAX_ENTRIES);
        if token_cache_max_entries == 0 {
            return Err(invalid("token_cache_max_entries", "must be at least 1"));
        }
        if raw.upload_chunk_max == Some(0) {
            return Err(invalid("upload_chunk_max", "must be at least 1 byte"));
        }
        Ok(Config {
            listen,
            registry,
            public_url,
            server_tls,
            upstream_tls,
            log_format: raw.log_format.unwrap_or_default(),
            max_connections,
            timeouts,
            token_realm,
            auth_redirect_allow,
            session_keys,
            session_lifetime,
            token_cache_max_entries,
            upload_chunk_max: raw.upload_chunk_max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(registry: &str) -> ConfigFile {
        ConfigFile {
            registry: Some(registry.into()),
            ..ConfigFile::default()
        }
    }

    fn err_of(raw: ConfigFile) -> String {
        Config::try_from(raw).unwrap_err().to_string()
    }

    #[test]
    fn defaults_apply() {
        let c = Config::try_from(raw("http://127.0.0.1:5001")).unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(
            c.timeouts.body_idle,
            Duration::from_secs(DEFAULT_BODY_IDLE_TIMEOUT_SECS)
        );
        assert!(c.server_tls.is_none() && c.public_url.is_none());
    }

    #[test]
    fn errors_name_the_key() {
        let cases: Vec<(ConfigFile, &str)> = vec![
            (ConfigFile::default(), "`registry`"),
            (raw("ftp://x"), "`registry`"),
            (raw("http://r/some/path"), "`registry`"),
            (raw("http://user:pw@r"), "`registry`"),
            (
                ConfigFile {
                    public_url: Some("nope".into()),
                    ..raw("http://r")
                },
                "`public_url`",
            ),
            (
                ConfigFile {
                    listen: Some("localhost".into()),
                    ..raw("http://r")
                },
                "`listen`",
            ),
            (
                ConfigFile {
                    tls_cert: Some("/x".into()),
                    ..raw("http://r")
                },
                "`tls_key`",
            ),
            (
                ConfigFile {
                    max_connections: Some(0),
                    ..raw("http://r")
                },
                "`max_connections`",
            ),
            (
                ConfigFile {
                    body_idle_timeout_secs: Some(0),
                    ..raw("http://r")
                },
                "`body_idle_timeout_secs`",
            ),
            (
                ConfigFile {
                    upstream_ca: Some("/nonexistent.pem".into()),
                    ..raw("http://r")
                },
                "`upstream_ca`",
            ),
            (
                ConfigFile {
                    token_realm: Some("/jwt/auth".into()),
                    ..raw("http://r")
                },
                "`token_realm`",
            ),
            (
                ConfigFile {
                    auth_redirect_allow: Some(vec!["user@host".into()]),
                    ..raw("http://r")
                },
                "`auth_redirect_allow`",
            ),
            (
                ConfigFile {
                    session_key_file: Some("/nonexistent.keys".into()),
                    ..raw("http://r")
                },
                "`session_key_file`",
            ),
            (
                ConfigFile {
                    session_lifetime_secs: Some(86_401),
                    ..raw("http://r")
                },
                "`session_lifetime_secs`",
            ),
        ];
        for (c, key) in cases {
            let msg = err_of(c);
            assert!(msg.contains(key), "{msg:?} should name {key}");
        }
    }

    #[test]
    fn flags_win_over_file_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "registry = \"http://file:1\"\nlisten = \"127.0.0.1:7\"\n",
        )
        .unwrap();
        let cli = ConfigFile {
            config: Some(path.clone()),
            registry: Some("http://flag:2".into()),
            ..ConfigFile::default()
        };
        let c = Config::load(cli).unwrap();
        assert_eq!(c.registry.to_string(), "http://flag:2");
        assert_eq!(c.listen.port(), 7);
        std::fs::write(&path, "registy = \"http://typo\"\n").unwrap();
        let msg = Config::load(ConfigFile {
            config: Some(path),
            ..ConfigFile::default()
        })
        .unwrap_err()
        .to_string();
        assert!(msg.contains("registy"), "{msg}");
    }

    #[test]
    fn origins_compare_by_effective_port() {
        let a = Origin::parse("registry", "https://Registry.example.com").unwrap();
        let b = Origin::of(&"https://registry.example.com:443/v2/x".parse().unwrap()).unwrap();
        let c = Origin::of(&"http://registry.example.com/v2/x".parse().unwrap()).unwrap();
        assert!(a.same_as(&b));
        assert!(!a.same_as(&c));
    }

    #[test]
    fn redirect_allow_entries_match_host_and_port() {
        let o = |s: &str| Origin::of(&s.parse().unwrap()).unwrap();
        let cases = [
            (
                "gitlab.example.com",
                "https://GitLab.example.com/jwt/auth",
                true,
            ),
            (
                "gitlab.example.com",
                "http://gitlab.example.com/jwt/auth",
                true,
            ),
            (
                "gitlab.example.com",
                "https://gitlab.example.com:8443/x",
                false,
            ),
            (
                "gitlab.example.com:8443",
                "https://gitlab.example.com:8443/x",
                true,
            ),
            ("127.0.0.1:9000", "http://127.0.0.1:9001/x", false),
            ("127.0.0.1:9000", "http://127.0.0.1:9000/x", true),
            ("other.example.com", "https://gitlab.example.com/x", false),
        ];
        for (entry, url, want) in cases {
            assert_eq!(
                AllowedHost::parse(entry).unwrap().matches(&o(url)),
                want,
                "{entry} {url}"
            );
        }
    }
}
