//! The request handler: routes a request, runs the matching handler, and turns any error into
//! the registry's JSON error format. Following the outer/inner split, [`App::handle`] logs and
//! builds synthetic responses; `App::handle_inner` returns `Result` and uses `?`.
//!
//! [`App::new`] builds everything the config only names (TLS configs, the session key ring, the
//! upstream clients) and fails with a [`ConfigError`] before any port is bound.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Notify;

use http::header::{self, HeaderMap};
use http::uri::Scheme;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::access::Access;
use crate::auth::{Auth, Lanes, Picked};
use crate::body::{self, ProxyBody};
use crate::cache::pull::PullCache;
use crate::cache::shared::Shared;
use crate::clients::{ClientHandle, Clients, Shares};
use crate::config::{Config, ConfigError, Origin, UpstreamConfig};
use crate::error::{Blame, Error};
use crate::injected::InjectedCredentials;
use crate::metrics::Metrics;
use crate::mint::Minter;
use crate::mirror::{self, Refusal};
use crate::proxy::{self, X_FORWARDED_HOST, X_FORWARDED_PROTO};
use crate::router::{self, Route};
use crate::session::Keys;
use crate::telemetry::{AccessLog, Logged};
use crate::tls;
use crate::upstream::Upstream;

mod exchange;
mod pull;
mod ready;

use exchange::ClientFacts;

use ready::Readiness;

/// The connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// Whether the connection is HTTP/2.
    pub h2: bool,
}

/// One upstream and everything regrelay keeps for it.
pub struct Lane {
    /// Its configuration.
    pub config: UpstreamConfig,
    /// The name sealed into its sessions: empty for the default upstream.
    session_name: String,
    upstream: Upstream,
    access: Access,
    injected: Option<InjectedCredentials>,
}

/// Shared state of the server: one per process, behind an `Arc`.
pub struct App {
    config: Config,
    server_tls: Option<Arc<rustls::ServerConfig>>,
    /// The certificate it presents (reloadable).
    server_cert: Option<Arc<tls::ServerCert>>,
    /// The session key ring (reloadable).
    keys: Arc<Keys>,
    lanes: Vec<Lane>,
    auth: Auth,
    /// Set when shutdown starts: readiness answers 503 from then on.
    draining: std::sync::atomic::AtomicBool,
    /// Set at the upload drain deadline: split uploads end their part and answer the client.
    upload_cut: tokio::sync::watch::Sender<bool>,
    /// The configured public names, canonical first.
    publics: Vec<Origin>,
    /// `Host`s seen that match no configured public name (each warned about once).
    unknown_hosts: dashmap::DashSet<String>,
    metrics: Arc<Metrics>,
    /// The pull-through cache, when on.
    cache: Option<PullCache>,
    /// What each client holds of the shared pools.
    clients: Clients,
    /// Signalled when request slots or upstream connections are exhausted: requests whose
    /// clients take none of their responses are shed ([`crate::server`]).
    pressure: Arc<Notify>,
    /// Readiness: its own small client, and its last answer (probed at most once a second).
    ready: Readiness,
}

/// Distinct unknown `Host`s remembered for the once-per-host warning.
const MAX_UNKNOWN_HOSTS: usize = 1024;

/// Sessions sealed for regrelay's injected credentials live this long (they never leave it).
const INJECTED_SESSION_SECS: u64 = 3600;

impl App {
    /// Builds the state from a validated config: loads the TLS files and the session key ring.
    pub fn new(config: Config) -> Result<App, ConfigError> {
        let server_cert = config
            .tls
            .as_ref()
            .map(|t| tls::ServerCert::load(&t.cert, &t.key).map(Arc::new))
            .transpose()?;
        let server_tls = server_cert.clone().map(tls::server_config).transpose()?;
        let keys = Arc::new(Keys::new(config.session_key_file.as_deref())?);
        let metrics = Arc::new(Metrics::new());
        let pressure = Arc::new(Notify::new());
        let mut lanes = Vec::with_capacity(config.upstreams.len());
        // The session-cache budget is shared evenly by the upstreams.
        let cache_bytes = (config.session_cache_max_bytes / config.upstreams.len().max(1)) as u64;
        for (i, u) in config.upstreams.iter().enumerate() {
            let trust = tls::UpstreamTrust::load(u.ca.as_deref())?;
            let upstream = Upstream::new(&config, &trust, u.origin.clone())
                .observed_by(metrics.clone(), &u.name)
                .pressing(pressure.clone());
            let token_origin = u
                .token_realm
                .as_ref()
                .and_then(Origin::of)
                .unwrap_or_else(|| u.origin.clone());
            let client = Upstream::new(&config, &trust, token_origin)
                .observed_by(metrics.clone(), &u.name)
                .pressing(pressure.clone())
                .serving("token service");
            let minter = Arc::new(Minter::new(
                &config,
                u,
                upstream.clone(),
                client,
                metrics.clone(),
            ));
            let session_name = if i == 0 {
                String::new()
            } else {
                u.name.clone()
            };
            let realm_ns = (i != 0).then(|| u.name.clone());
            let access = Access::new(
                keys.clone(),
                minter,
                (config.token_cache_max_entries, cache_bytes),
                realm_ns,
                config.public_url.as_ref().map(ToString::to_string),
                metrics.clone(),
            );
            let injected = u
                .credentials_file
                .as_deref()
                .map(InjectedCredentials::load)
                .transpose()?;
            lanes.push(Lane {
                config: u.clone(),
                session_name,
                upstream,
                access,
                injected,
            });
        }
        metrics.watch_tokens(
            lanes
                .iter()
                .map(|l| (l.config.name.clone(), l.access.tokens().shared_counters()))
                .collect(),
        );
        let cache = config
            .cache
            .as_ref()
            .map(|c| {
                PullCache::open(&c.dir, c.max_bytes, c.serve_stale).map_err(|e| {
                    ConfigError::Invalid {
                        key: "cache_dir",
                        reason: format!("{}: {e}", c.dir.display()),
                    }
                })
            })
            .transpose()?;
        let cache = match (cache, config.cache.as_ref().and_then(|c| c.shared.as_ref())) {
            (Some(mut cache), Some(shared)) => {
                let invalid = |key, reason: String| ConfigError::Invalid { key, reason };
                let origin = Origin::parse("cache_s3_endpoint", &shared.endpoint)?;
                // Its own connections: the bucket never takes the registry's.
                let client = Upstream::new(&config, lanes[0].upstream.trust(), origin)
                    .serving("shared cache object store");
                let bucket = Shared::new(shared, client).map_err(|e| invalid("cache_store", e))?;
                let bucket = Arc::new(bucket);
                let counted = bucket.clone();
                let read = move || counted.stats().by_operation();
                metrics.watch_shared(crate::metrics::SharedCounters(Box::new(read)));
                cache.shared = Some(bucket);
                Some(cache)
            }
            (cache, _) => cache,
        };
        let publics = config
            .public_url
            .iter()
            .chain(&config.public_aliases)
            .cloned()
            .collect();
        // The probe trusts what the default upstream trusts (a CA reload included).
        let default = &lanes[0].upstream;
        let ready = Readiness {
            probe: Upstream::probe_client(&config, default.trust(), default.origin().clone()),
            last: tokio::sync::Mutex::new(None),
        };
        Ok(App {
            auth: Auth::new(config.session_lifetime),
            clients: Clients::new(Shares::of(&config.limits)),
            pressure,
            ready,
            config,
            server_tls,
            server_cert,
            keys,
            lanes,
            draining: std::sync::atomic::AtomicBool::new(false),
            upload_cut: tokio::sync::watch::Sender::new(false),
            publics,
            unknown_hosts: dashmap::DashSet::new(),
            metrics,
            cache,
        })
    }

    /// Shutdown started: `/-/ready` answers 503 from now on (liveness stays 200), so balancers
    /// and Kubernetes take this replica out while it still serves.
    pub fn set_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// The upload drain is over: every upload sent in parts ends its current part and answers
    /// its client (see [`Uploader`]). Returns how many uploads were told.
    pub fn cut_uploads(&self) -> usize {
        self.upload_cut.send_replace(true);
        self.upload_cut.receiver_count()
    }

    /// SIGHUP (`systemctl reload`): reads the TLS certificate and key, the session key ring,
    /// the injected credential files and each upstream's CA roots (system roots and
    /// `--upstream-ca`/`ca`) again. A file that fails to load is refused with a logged error and
    /// the one in force stays; requests and uploads in flight are not touched (open TLS
    /// connections keep their certificate, and pooled upstream connections their verified
    /// peer). Returns how many files were refused.
    pub fn reload(&self) -> usize {
        let mut refused = 0;
        if let Some(cert) = &self.server_cert {
            match cert.reload() {
                Ok(()) => tracing::info!("reload: TLS certificate and key re-read"),
                Err(err) => {
                    refused += 1;
                    tracing::error!(error = %err, "reload: new TLS certificate or key refused; the previous pair stays");
                }
            }
        }
        match self.keys.reload() {
            Ok(true) => tracing::info!(
                keys = ?self.keys.current(),
                "reload: session key ring re-read"
            ),
            Ok(false) => {}
            Err(err) => {
                refused += 1;
                tracing::error!(error = %err, "reload: new session key ring refused; the previous ring stays");
            }
        }
        for lane in &self.lanes {
            let trust = lane.upstream.trust();
            match (trust.reload(), trust.ca_file()) {
                (Ok(()), Some(ca)) => {
                    tracing::info!(upstream = %lane.config.name, file = %ca.display(), "reload: upstream CA re-read; new connections to the upstream and its token service are verified with it")
                }
                (Ok(()), None) => {}
                (Err(err), _) => {
                    refused += 1;
                    tracing::error!(upstream = %lane.config.name, error = %err, "reload: new upstream CA refused; the previous roots stay");
                }
            }
            if let Some(injected) = &lane.injected {
                match injected.reload() {
                    Ok(()) => {
                        tracing::info!(upstream = %lane.config.name, "reload: upstream credentials re-read")
                    }
                    Err(reason) => {
                        refused += 1;
                        tracing::error!(upstream = %lane.config.name, file = %injected.path().display(), error = %reason, "reload: new upstream credentials refused; the previous ones stay");
                    }
                }
            }
        }
        self.metrics
            .reloads
            .get_or_create(&crate::metrics::OutcomeLabels {
                outcome: if refused == 0 { "ok" } else { "refused" },
            })
            .inc();
        refused
    }

    /// Every metric.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The default upstream's session state (token cache counters, key ring).
    pub fn access(&self) -> &Access {
        &self.lanes[0].access
    }

    /// Every upstream.
    pub fn lanes(&self) -> &[Lane] {
        &self.lanes
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The server's TLS config, when serving HTTPS.
    pub fn server_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.server_tls.clone()
    }

    /// What the operator should hear about the configuration once logging is up (files
    /// readable by others, and the like): the configuration works, but not as safely as it could.
    pub fn startup_warnings(&self) -> Vec<String> {
        let mut out = vec![];
        if let Some(t) = &self.config.tls {
            out.extend(tls::key_file_warning(&t.key));
        }
        out
    }

    /// What each client holds of the shared pools.
    pub fn clients(&self) -> &Clients {
        &self.clients
    }

    /// Signalled when request slots or upstream connections are exhausted.
    pub fn pressure(&self) -> &Notify {
        &self.pressure
    }

    /// The quick answer when a bound (`what`) is reached: 503 with `Retry-After`, logged.
    pub fn refuse(
        &self,
        req: &Request<Incoming>,
        route: &Result<Route, Error>,
        conn: ConnInfo,
        what: &'static str,
    ) -> Response<Logged<ProxyBody>> {
        let err = Error::Overloaded { what };
        tracing::warn!(path = %req.uri().path(), peer = %conn.peer.ip(), error = %err, "request refused");
        self.metrics.requests_overloaded.inc();
        let mut log = self.access_log(req, class(route), conn);
        let resp = error_response(&err);
        log.status = resp.status().as_u16();
        resp.map(|b| Logged::new(b, log))
    }

    /// Where `req` goes ([`router::route`]): decided once, before admission, and handed to
    /// [`App::handle`] with the request.
    pub fn route_of<B>(&self, req: &Request<B>) -> Result<Route, Error> {
        router::route(req.method(), req.uri(), req.version(), &self.publics)
    }

    /// The access line of a request that starts now.
    fn access_log<B>(&self, req: &Request<B>, route: &'static str, conn: ConnInfo) -> AccessLog {
        let json = self.config.log_format == crate::config::LogFormat::Json;
        AccessLog::new(req, route, conn.peer.ip(), self.metrics.clone(), json)
    }

    /// Handles one request routed by [`App::route_of`]; never fails, and logs it once when its
    /// response body is done.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        route: Result<Route, Error>,
    ) -> Response<Logged<ProxyBody>> {
        let mut log = self.access_log(&req, class(&route), conn);
        let resp = match self.handle_inner(req, route, conn, &mut log).await {
            Ok(resp) => resp,
            Err(err) => {
                let status = err.status().as_u16();
                if err.blame() == Blame::Client {
                    tracing::info!(path = %log.path, status, blame = "client", error = %err.chain(), "request refused");
                } else {
                    tracing::warn!(path = %log.path, status, error = %err.chain(), "request failed");
                }
                error_response(&err)
            }
        };
        log.status = resp.status().as_u16();
        resp.map(|b| Logged::new(b, log))
    }

    async fn handle_inner(
        &self,
        req: Request<Incoming>,
        route: Result<Route, Error>,
        conn: ConnInfo,
        log: &mut AccessLog,
    ) -> Result<Response<ProxyBody>, Error> {
        let route = route?;
        let trusted = self.config.is_trusted_proxy(conn.peer.ip());
        // Who asks decides injected credentials: behind a trusted front, the client it names.
        let client = match req.extensions().get::<ClientHandle>() {
            Some(handle) => handle.address,
            None => crate::clients::client_address(
                req.headers(),
                conn.peer.ip(),
                &self.config.trusted_proxies,
            ),
        };
        match route {
            Route::Healthy => Ok(json(StatusCode::OK, r#"{"status":"ok"}"#.to_owned())),
            Route::Ready => Ok(Box::pin(self.ready()).await),
            Route::Token => {
                let public = self.public_origin(&req, conn, trusted)?;
                let xff = proxy::forwarded_for(req.headers(), conn.peer.ip(), trusted);
                let endpoint = self
                    .auth
                    .token_endpoint(req, self, &public, &xff, client.known());
                let resp = Box::pin(endpoint).await?;
                log.upstream_status = Some(resp.status().as_u16());
                Ok(resp)
            }
            Route::Registry(api) => {
                let client = ClientFacts {
                    conn,
                    trusted,
                    address: client,
                };
                self.registry(req, api, client, log).await
            }
        }
    }

    /// True when regrelay holds pull credentials for `lane` and `client` may use them
    /// (`--inject-credentials-for`): a client whose address is unknown (a trusted front
    /// forwarded garbage) may not.
    fn may_inject(&self, lane: &Lane, client: Option<std::net::IpAddr>) -> bool {
        let Some(ip) = client else {
            return false;
        };
        lane.injected.is_some()
            && self
                .config
                .inject_credentials_for
                .iter()
                .any(|c| c.contains(ip))
    }

    /// The origin clients use: the configured public URL; else, from a trusted proxy, its
    /// `X-Forwarded-Proto`/`-Host`; else the request's Host and scheme.
    fn public_origin(
        &self,
        req: &Request<Incoming>,
        conn: ConnInfo,
        trusted: bool,
    ) -> Result<Origin, Error> {
        let headers = req.headers();
        let first = |name| first_value(headers, name);
        let scheme = match (trusted, first(&X_FORWARDED_PROTO)) {
            (true, Some("https")) => Scheme::HTTPS,
            (true, Some("http")) => Scheme::HTTP,
            _ if conn.tls => Scheme::HTTPS,
            _ => Scheme::HTTP,
        };
        let host = trusted
            .then(|| first(&X_FORWARDED_HOST))
            .flatten()
            .or_else(|| first(&header::HOST))
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let asked = host.and_then(|h| Origin::from_parts(scheme, &h));
        let Some(canonical) = self.publics.first() else {
            return asked.ok_or(Error::Refused {
                reason: "missing or invalid Host header",
            });
        };
        // The configured name the client used, so it authenticates with the host it is
        // already talking to; else the canonical name, and a warning (once per host).
        if let Some(asked) = &asked {
            if let Some(p) = self.publics.iter().find(|p| p.same_as(asked)) {
                return Ok(p.clone());
            }
            self.metrics.unknown_host_requests.inc();
            let key = asked.to_string();
            if self.unknown_hosts.len() < MAX_UNKNOWN_HOSTS && self.unknown_hosts.insert(key) {
                let configured: Vec<String> =
                    self.publics.iter().map(ToString::to_string).collect();
                tracing::warn!(
                    host = %asked,
                    configured = %configured.join(","),
                    "a client reached regrelay under a name that is not a configured --public-url; \
                     it is sent to the canonical name (add this name to --public-url if clients use it)"
                );
            }
        }
        Ok(canonical.clone())
    }
}

impl Lanes for App {
    fn pick(
        &self,
        scopes: &[String],
        ns: Option<&str>,
        client: Option<std::net::IpAddr>,
    ) -> Result<Picked<'_>, Error> {
        let cfg = &self.config;
        let fallback = match ns {
            Some(ns) => mirror::find(&cfg.upstreams, ns)
                .ok_or_else(|| Error::NameUnknown { ns: ns.to_owned() })?,
            None => cfg.root_upstream,
        };
        let mut lane = None;
        let mut upstream_scopes = Vec::with_capacity(scopes.len());
        for scope in scopes {
            let (i, up) =
                mirror::route_scope(scope, ns, &cfg.upstreams, fallback).map_err(|r| match r {
                    Refusal::Unknown(ns) => Error::NameUnknown { ns },
                    Refusal::Conflict { .. } => Error::BadTokenRequest {
                        reason: "a scope and ?ns= name two different upstreams".into(),
                    },
                })?;
            if lane.is_some_and(|l| l != i) {
                return Err(Error::BadTokenRequest {
                    reason: "the scopes name repositories of two different upstreams".into(),
                });
            }
            lane = Some(i);
            upstream_scopes.push(up);
        }
        let i = lane.unwrap_or(fallback);
        let lane = &self.lanes[i];
        Ok(Picked {
            access: &lane.access,
            injectable: self.may_inject(lane, client),
            upstream: lane.session_name.clone(),
            translated: i != 0 || upstream_scopes.as_slice() != scopes,
            scopes: upstream_scopes,
        })
    }
}

/// The metrics label of a route; `other` for a refused one.
fn class(route: &Result<Route, Error>) -> &'static str {
    route.as_ref().map_or("other", Route::class)
}

/// The first comma-separated value of a header.
fn first_value<'h>(headers: &'h HeaderMap, name: &header::HeaderName) -> Option<&'h str> {
    let v = headers.get(name)?.to_str().ok()?;
    v.split(',').next().map(str::trim).filter(|s| !s.is_empty())
}

/// A JSON response (`application/json; charset=utf-8`) with a streaming body.
fn json(status: StatusCode, body: String) -> Response<ProxyBody> {
    crate::error::json_response(status, body).map(body::full)
}

/// The synthetic answer for an error ([`Error::response`]) with a streaming body.
pub fn error_response(err: &Error) -> Response<ProxyBody> {
    err.response().map(body::full)
}
