//! Raw → typed: [`ConfigFile`] into [`Config`], every key checked and every problem kept
//! ([`Problems`]), so one run reports all of them, one line per key. A check that needs another
//! key's value (a realm on regrelay's own listener, injection ranges against trusted fronts)
//! runs only when that value is valid itself: each mistake is reported once, where it is.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use super::limits::{limits, timeouts};
use super::network::listen_addr;
use super::origin::parse_realm;
use super::problems::Problems;
use super::*;

/// The keys whose check can fail outright (numbers fall back to their default instead), each
/// `None` when its problem was kept.
struct Checked {
    listen: Option<SocketAddr>,
    registry: Option<Origin>,
    publics: Option<Vec<Origin>>,
    tls: Option<Option<TlsFiles>>,
    upstreams: Option<(Vec<UpstreamConfig>, usize)>,
    inject: Option<Vec<Cidr>>,
    trusted: Option<Vec<Cidr>>,
    metrics_listen: Option<Option<SocketAddr>>,
    upgrade_socket: Option<Option<PathBuf>>,
    cache: Option<Option<CacheConfig>>,
}

impl Checked {
    /// Checks every such key of `raw`, and those that depend on others valid themselves.
    fn of(raw: &ConfigFile, p: &mut Problems) -> Checked {
        let listen = p.take(listen_addr(
            "listen",
            raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN),
        ));
        let registry = p.take(registry(raw));
        let publics = p.list(&raw.public_url, |s| Origin::parse("public_url", s.trim()));
        let token_realm = p.take(raw.token_realm.as_deref().map(parse_realm).transpose());
        if let (Some(listen), Some(publics), Some(Some(realm))) = (listen, &publics, &token_realm) {
            if let Some(realm) = Origin::of(realm) {
                let publics: Vec<&Origin> = publics.iter().collect();
                p.take(refuse_self_realm(&realm, listen, &publics));
            }
        }
        let allow = p.list(&raw.auth_redirect_allow, AllowedOrigin::parse);
        let default = match (&registry, &publics, token_realm, allow) {
            (Some(registry), Some(publics), Some(realm), Some(allow)) => {
                Some(upstreams::default(raw, registry, publics, realm, allow))
            }
            _ => None,
        };
        let upstreams = upstreams::table(raw, default, p);
        let inject = match &raw.inject_credentials_for {
            Some(_) => p.list(&raw.inject_credentials_for, |s| {
                Cidr::parse("inject_credentials_for", s)
            }),
            None => Some(vec![
                Cidr::parse("inject_credentials_for", "127.0.0.0/8").expect("a valid CIDR"),
                Cidr::parse("inject_credentials_for", "::1/128").expect("a valid CIDR"),
            ]),
        };
        let trusted = p.list(&raw.trusted_proxies, |s| Cidr::parse("trusted_proxies", s));
        if let (Some((all, _)), Some(inject), Some(trusted)) = (&upstreams, &inject, &trusted) {
            if all.iter().any(|u| u.credentials_file.is_some())
                && raw.inject_through_trusted_proxies != Some(true)
            {
                p.take(refuse_injection_through_fronts(inject, trusted));
            }
        }
        Checked {
            listen,
            registry,
            publics,
            tls: p.take(tls_files(raw)),
            upstreams,
            inject,
            trusted,
            metrics_listen: p.take(metrics_listen(raw, listen)),
            upgrade_socket: p.take(upgrade_socket(raw)),
            cache: p.take(cache(raw)),
        }
    }
}

impl TryFrom<ConfigFile> for Config {
    type Error = ConfigError;

    fn try_from(raw: ConfigFile) -> Result<Config, ConfigError> {
        let mut problems = Problems::default();
        let p = &mut problems;
        let checked = Checked::of(&raw, p);
        let limits = limits(&raw, p);
        let timeouts = timeouts(&raw, p);
        let session_lifetime = p.secs(
            "session_lifetime_secs",
            raw.session_lifetime_secs,
            DEFAULT_SESSION_LIFETIME_SECS,
            (1, MAX_SESSION_LIFETIME.as_secs()),
        );
        let token_cache_max_entries = p.bounded(
            "token_cache_max_entries",
            raw.token_cache_max_entries,
            DEFAULT_TOKEN_CACHE_MAX_ENTRIES,
            (1, 100_000_000),
        );
        let failed_logins = (
            p.bounded(
                "failed_logins_per_minute",
                raw.failed_logins_per_minute,
                DEFAULT_FAILED_LOGINS_PER_MINUTE,
                (1, 100_000),
            ),
            p.bounded(
                "client_failed_logins_per_minute",
                raw.client_failed_logins_per_minute,
                DEFAULT_CLIENT_FAILED_LOGINS_PER_MINUTE,
                (1, 100_000),
            ),
        );
        let session_cache_max_bytes = p.bounded(
            "session_cache_max_bytes",
            raw.session_cache_max_bytes,
            DEFAULT_SESSION_CACHE_MAX_BYTES,
            (1 << 20, 1 << 40),
        );
        let workers = p.bounded("workers", raw.workers, default_workers(), (0, 1024));
        let upload_chunk_max = raw
            .upload_chunk_max
            .map(|n| p.bounded("upload_chunk_max", Some(n), n, (1, u64::MAX)));
        problems.finish()?;
        // A value is `None` only with its problem kept: past `finish` every one is `Some`.
        let Checked {
            listen: Some(listen),
            registry: Some(registry),
            publics: Some(mut publics),
            tls: Some(tls),
            upstreams: Some((upstreams, root_upstream)),
            inject: Some(inject_credentials_for),
            trusted: Some(trusted_proxies),
            metrics_listen: Some(metrics_listen),
            upgrade_socket: Some(upgrade_socket),
            cache: Some(cache),
        } = checked
        else {
            return Err(invalid(
                "config",
                "a key was refused without a reason; please report this with the configuration",
            ));
        };
        let public_url = (!publics.is_empty()).then(|| publics.remove(0));
        Ok(Config {
            listen,
            metrics_listen,
            upgrade_socket,
            registry,
            public_url,
            public_aliases: publics,
            tls,
            log_format: raw.log_format.unwrap_or_default(),
            workers,
            limits,
            timeouts,
            trusted_proxies,
            session_key_file: raw.session_key_file.clone(),
            session_lifetime,
            token_cache_max_entries,
            session_cache_max_bytes: usize::try_from(session_cache_max_bytes).unwrap_or(usize::MAX),
            failed_logins,
            ready_requires_token_service: raw.ready_requires_token_service.unwrap_or(false),
            upload_chunk_max,
            upload_split: raw.upload_split.unwrap_or_default(),
            cache,
            upstreams,
            root_upstream,
            inject_credentials_for,
        })
    }
}

/// `--registry`: required, a base URL.
fn registry(raw: &ConfigFile) -> Result<Origin, ConfigError> {
    let registry = raw.registry.as_deref().ok_or(ConfigError::Missing {
        key: "registry",
        flag: "registry",
        env: "REGRELAY_REGISTRY",
    })?;
    Origin::parse("registry", registry)
}

/// `--tls-cert` and `--tls-key`: both or neither.
fn tls_files(raw: &ConfigFile) -> Result<Option<TlsFiles>, ConfigError> {
    match (&raw.tls_cert, &raw.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(invalid(
            "tls_key",
            "required with tls_cert: give the certificate's private key too",
        )),
        (None, Some(_)) => Err(invalid(
            "tls_cert",
            "required with tls_key: give the key's certificate chain too",
        )),
    }
}

/// `--metrics-listen`: an address of its own.
fn metrics_listen(
    raw: &ConfigFile,
    listen: Option<SocketAddr>,
) -> Result<Option<SocketAddr>, ConfigError> {
    let Some(m) = raw.metrics_listen.as_deref() else {
        return Ok(None);
    };
    let addr = listen_addr("metrics_listen", m)?;
    if Some(addr) == listen && addr.port() != 0 {
        return Err(invalid(
            "metrics_listen",
            format!("{m:?} is the proxy's own --listen address; give metrics a port of their own"),
        ));
    }
    Ok(Some(addr))
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

/// `--cache-dir` / `--cache-max-bytes` / `--cache-serve-stale`: a setting without a directory
/// is a mistake worth naming (each of them).
fn cache(raw: &ConfigFile) -> Result<Option<CacheConfig>, ConfigError> {
    let shared = super::cache_store::shared(raw, |k| std::env::var(k).ok());
    let Some(dir) = raw.cache_dir.clone() else {
        let mut orphans = vec![];
        if let Err(e) = shared {
            orphans.push(e);
        }
        if raw.cache_max_bytes.is_some() {
            orphans.push(invalid("cache_max_bytes", "needs --cache-dir"));
        }
        if raw.cache_serve_stale == Some(true) {
            orphans.push(invalid("cache_serve_stale", "needs --cache-dir"));
        }
        if orphans.is_empty() {
            return Ok(None);
        }
        return Err(ConfigError::all(orphans));
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
        shared: shared?,
    }))
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
