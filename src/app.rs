//! The request handler: routes a request, runs the matching handler, and turns any error into
//! the registry's JSON error format. Following the outer/inner split, [`App::handle`] logs and
//! builds synthetic responses; `App::handle_inner` returns `Result` and uses `?`.
//!
//! [`App::new`] builds everything the config only names (TLS configs, the session key ring, the
//! upstream clients) and fails with a [`ConfigError`] before any port is bound.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Notify;

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::Scheme;
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::{Body, Incoming};
use sha2::{Digest, Sha256};
use std::time::Duration;

use crate::access::{Access, Credentials, DEFAULT_SERVICE};
use crate::api_path::ApiPath;
use crate::auth::{Auth, Lanes, Picked};
use crate::body::{self, ProxyBody};
use crate::cache::pull::PullCache;
use crate::challenge::{self, Challenge};
use crate::clients::{ClientAddress, ClientHandle, Clients, Shares};
use crate::config::{Config, ConfigError, Origin, UpstreamConfig};
use crate::error::{Blame, Error};
use crate::injected::InjectedCredentials;
use crate::metrics::Metrics;
use crate::mint::Minter;
use crate::mirror::{self, Refusal, Routed};
use crate::proxy::{self, Forward, X_FORWARDED_HOST, X_FORWARDED_PROTO};
use crate::router::{self, Route};
use crate::session::{Keys, Kind, Session};
use crate::telemetry::{AccessLog, Logged};
use crate::tls;
use crate::token::UpstreamToken;
use crate::upload::{self, Uploader};
use crate::upstream::Upstream;

mod pull;
mod ready;

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
        let mut log = AccessLog::new(req, class(route), conn.peer.ip(), self.metrics.clone());
        let resp = error_response(&err);
        log.status = resp.status().as_u16();
        resp.map(|b| Logged::new(b, log))
    }

    /// Where `req` goes ([`router::route`]): decided once, before admission, and handed to
    /// [`App::handle`] with the request.
    pub fn route_of<B>(&self, req: &Request<B>) -> Result<Route, Error> {
        router::route(req.method(), req.uri(), req.version(), &self.publics)
    }

    /// Handles one request routed by [`App::route_of`]; never fails, and logs it once when its
    /// response body is done.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        route: Result<Route, Error>,
    ) -> Response<Logged<ProxyBody>> {
        let mut log = AccessLog::new(&req, class(&route), conn.peer.ip(), self.metrics.clone());
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
        mut req: Request<Incoming>,
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
            Route::Ready => Ok(self.ready().await),
            Route::Token => {
                let public = self.public_origin(&req, conn, trusted)?;
                let xff = proxy::forwarded_for(req.headers(), conn.peer.ip(), trusted);
                let resp = self
                    .auth
                    .token_endpoint(req, self, &public, &xff, client.known())
                    .await?;
                log.upstream_status = Some(resp.status().as_u16());
                Ok(resp)
            }
            Route::Registry(client_api) => {
                let public = self.public_origin(&req, conn, trusted)?;
                let (routed, api) = self.route(&req, &client_api)?;
                let lane = &self.lanes[routed.upstream];
                let fwd = Forward {
                    peer: conn.peer.ip(),
                    trusted,
                    forwarded_for: proxy::forwarded_for(req.headers(), conn.peer.ip(), trusted),
                    public: &public,
                    idle: self.config.timeouts.body_idle,
                    bytes_in: log.bytes_in.clone(),
                    notes: log.notes.clone(),
                    client: req.extensions().get::<ClientHandle>().cloned(),
                };
                fwd.notes.upstream(&lane.config.name);
                let creds = lane.access.credentials(
                    req.method(),
                    &client_api,
                    req.headers(),
                    &public,
                    &lane.session_name,
                )?;
                let anonymous = match &creds {
                    Credentials::Untouched => !req.headers().contains_key(header::AUTHORIZATION),
                    Credentials::Session(s) => s.authorization.is_none(),
                };
                retarget(&mut req, &routed.path)?;
                let injected = match anonymous {
                    true => self.injected_session(lane, &req, &api, client).await,
                    false => None,
                };
                let session = match (injected, creds) {
                    (Some(session), _) => {
                        tracing::debug!(upstream = %lane.config.name, "pull with injected credentials");
                        fwd.notes.principal("injected");
                        Some(session)
                    }
                    (None, Credentials::Session(session)) => {
                        fwd.notes
                            .principal(principal(session.authorization.as_deref()));
                        Some(session)
                    }
                    (None, Credentials::Untouched) => {
                        let auth = req.headers().get(header::AUTHORIZATION);
                        fwd.notes
                            .principal(principal(auth.map(HeaderValue::as_bytes)));
                        None
                    }
                };
                let method = req.method().clone();
                let mut resp = match session {
                    None => proxy::forward(&lane.upstream, req, &fwd).await?,
                    Some(session) => {
                        let resp = match self.cache_target(&method, &api) {
                            Some(cached) => {
                                self.pull(cached, lane, req, &api, &session, &fwd).await?
                            }
                            None => {
                                self.forward_with_session(lane, req, &api, &session, &fwd)
                                    .await?
                            }
                        };
                        explain_bodiless(resp, &method)
                    }
                };
                log.upstream_status = Some(resp.status().as_u16());
                lane.access
                    .rewrite_challenges(resp.headers_mut(), &public, &routed);
                if routed.translates() {
                    translate_location(resp.headers_mut(), &routed);
                }
                Ok(resp)
            }
        }
    }

    /// Which upstream a registry request is for ([`mirror::route`]), and its path there (the
    /// client's, unless the mirror names the repository differently upstream); pushes go to the
    /// default upstream only.
    fn route(&self, req: &Request<Incoming>, api: &ApiPath) -> Result<(Routed, ApiPath), Error> {
        let path = req.uri().path();
        let rest = path
            .strip_prefix("/v2/")
            .or_else(|| path.strip_prefix("/v2"))
            .unwrap_or("");
        let ns = mirror::ns_param(req.uri().query());
        let cfg = &self.config;
        let routed = mirror::route(rest, ns.as_deref(), &cfg.upstreams, cfg.root_upstream)
            .map_err(|refusal| match refusal {
                Refusal::Unknown(ns) => Error::NameUnknown { ns },
                Refusal::Conflict { .. } => Error::Refused {
                    reason: "the path and ?ns= name two different upstreams",
                },
            })?;
        if routed.upstream != 0 && !matches!(*req.method(), Method::GET | Method::HEAD) {
            return Err(Error::Unsupported {
                reason:
                    "this upstream is a pull-only mirror: push to the default (GitLab) upstream",
            });
        }
        let upstream = routed.upstream_api(api);
        Ok((routed, upstream))
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

    /// A session for regrelay's own pull credentials of `lane`, when the request may use them:
    /// a pull (GET/HEAD) of a repository, without credentials of its own, from an
    /// `--inject-credentials-for` address. Its id is derived from the upstream, the scope and
    /// the credential, so its GitLab token is cached across requests and a rotated credential
    /// starts afresh.
    async fn injected_session(
        &self,
        lane: &Lane,
        req: &Request<Incoming>,
        api: &ApiPath,
        client: ClientAddress,
    ) -> Option<Arc<Session>> {
        let injected = lane.injected.as_ref()?;
        if !self.may_inject(lane, client.known())
            || !matches!(*req.method(), Method::GET | Method::HEAD)
        {
            return None;
        }
        let scope = api.scope(req.method())?;
        let credential = injected.current();
        let service = lane
            .access
            .minter()
            .service()
            .await
            .unwrap_or_else(|| DEFAULT_SERVICE.to_owned());
        let mut session = Session::new(
            Kind::Access,
            Some(credential.authorization.to_vec()),
            service,
            vec![scope.clone()],
            Duration::from_secs(INJECTED_SESSION_SECS),
        );
        let digest = Sha256::digest(
            format!(
                "inject|{}|{scope}|{}",
                lane.config.name, credential.fingerprint
            )
            .as_bytes(),
        );
        session.id = u128::from_le_bytes(digest[..16].try_into().expect("16 bytes"));
        session.upstream = lane.session_name.clone();
        Some(Arc::new(session))
    }

    /// Forwards a request of a sealed session with a GitLab token valid on arrival. A registry
    /// `401` with `invalid_token` or `insufficient_scope` forgets that token (whatever the
    /// request), and a bodiless request is retried once with a new one. Long uploads go in parts
    /// ([`Uploader`]).
    async fn forward_with_session(
        &self,
        lane: &Lane,
        req: Request<Incoming>,
        api: &ApiPath,
        session: &Session,
        fwd: &Forward<'_>,
    ) -> Result<Response<ProxyBody>, Error> {
        let method = req.method().clone();
        let ends = req.body().is_end_stream();
        let cfg = &self.config;
        if upload::is_splittable(
            &method,
            api,
            req.headers(),
            ends,
            cfg.upload_split,
            cfg.upload_chunk_max,
        ) {
            let uploader = Uploader {
                upstream: &lane.upstream,
                access: &lane.access,
                fwd,
                chunk_max: cfg.upload_chunk_max,
                mode: cfg.upload_split,
                cut: self.upload_cut.subscribe(),
            };
            return uploader.forward(req, api, session).await;
        }
        // A scope the session lacks or GitLab refused it is answered here, a push not granted
        // with why ([`Access::upstream_token`]).
        let token = lane
            .access
            .upstream_token(session, fwd, &method, api)
            .await?;
        let retry = ends.then(|| bodiless_copy(&req));
        let (resp, _) = lane
            .send_refreshing(session, fwd, req, api, token, retry.map(|r| move || r))
            .await?;
        Ok(resp)
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

impl Lane {
    /// Sends `req` upstream with `token`. When the registry calls the token invalid, the token
    /// is forgotten and, when `retry` is given (it makes a bodiless copy of `req`, only then),
    /// the copy goes once more with a token minted again. Returns the response and the token
    /// it went with.
    async fn send_refreshing<B, R>(
        &self,
        session: &Session,
        fwd: &Forward<'_>,
        mut req: Request<B>,
        api: &ApiPath,
        token: UpstreamToken,
        retry: Option<R>,
    ) -> Result<(Response<ProxyBody>, UpstreamToken), Error>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<crate::error::BoxError>,
        R: FnOnce() -> Request<ProxyBody>,
    {
        req.headers_mut()
            .insert(header::AUTHORIZATION, token.header.clone());
        let resp = proxy::forward(&self.upstream, req, fwd).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok((resp, token));
        }
        let Some(error) = token_error(resp.headers()) else {
            return Ok((resp, token));
        };
        self.access.invalidate(session, &token);
        let Some(retry) = retry else {
            return Ok((resp, token));
        };
        drop(resp);
        let mut retry = retry();
        tracing::info!(path = %retry.uri().path(), error, "registry refused the session's token; minting again");
        let token = self
            .access
            .upstream_token(session, fwd, retry.method(), api)
            .await?;
        retry
            .headers_mut()
            .insert(header::AUTHORIZATION, token.header.clone());
        let resp = proxy::forward(&self.upstream, retry, fwd).await?;
        Ok((resp, token))
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

/// Points a request at its upstream path, keeping its query without `ns` (it was for regrelay).
fn retarget(req: &mut Request<Incoming>, path: &str) -> Result<(), Error> {
    let query: Vec<&str> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("ns="))
        .collect();
    let pq = if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", query.join("&"))
    };
    if pq != req.uri().path_and_query().map_or("", |p| p.as_str()) {
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = Some(pq.parse().map_err(|_| Error::Refused {
            reason: "unusable request target",
        })?);
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| Error::Refused {
            reason: "unusable request target",
        })?;
    }
    Ok(())
}

/// Puts a `Location` back in the client's names (`/v2/<prefix>/<name>` → `/v2/<segment>/<name>`).
fn translate_location(headers: &mut HeaderMap, routed: &Routed) {
    let Some(loc) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) else {
        return;
    };
    let Ok(uri) = loc.parse::<Uri>() else {
        return;
    };
    let Some(path) = routed.client_path(uri.path()) else {
        return;
    };
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let new = match Origin::of(&uri) {
        Some(origin) => format!("{origin}{path}{query}"),
        None => format!("{path}{query}"),
    };
    if let Ok(v) = HeaderValue::from_str(&new) {
        headers.insert(header::LOCATION, v);
    }
}

/// Who an `Authorization` value says asks, for the access line: the Basic username, `bearer`
/// (a token regrelay did not issue), `anonymous`. Never a secret.
fn principal(authorization: Option<&[u8]>) -> String {
    match authorization {
        None => "anonymous".into(),
        Some(a) => challenge::basic_username(a).unwrap_or_else(|| "bearer".into()),
    }
}

/// The first comma-separated value of a header.
fn first_value<'h>(headers: &'h HeaderMap, name: &header::HeaderName) -> Option<&'h str> {
    let v = headers.get(name)?.to_str().ok()?;
    v.split(',').next().map(str::trim).filter(|s| !s.is_empty())
}

/// A copy of a bodiless request (method, target, version, headers) for one retry.
fn bodiless_copy(req: &Request<Incoming>) -> Request<ProxyBody> {
    let mut copy = Request::new(body::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    if let Some(client) = req.extensions().get::<ClientHandle>() {
        copy.extensions_mut().insert(client.clone());
    }
    copy
}

/// `invalid_token` or `insufficient_scope`, when a registry challenge to a request that carried
/// a token says so. A `Bearer` challenge without `error=` is `invalid_token` too: the registry
/// names no error only when no token came, and GitLab's Dependency Proxy never names one when it
/// refuses a token (app/controllers/concerns/dependency_proxy/auth.rb).
fn token_error(headers: &HeaderMap) -> Option<&'static str> {
    headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok().and_then(Challenge::parse))
        .find_map(|c| match c.error() {
            Some("invalid_token") | None => Some("invalid_token"),
            Some("insufficient_scope") => Some("insufficient_scope"),
            _ => None,
        })
}

/// An upstream's bodiless `401`, `403` or `404` to a `GET` (GitLab's Dependency Proxy answers
/// non-members so) gets a body in the registry's error format that says what it may mean:
/// clients otherwise print only the status.
fn explain_bodiless(resp: Response<ProxyBody>, method: &Method) -> Response<ProxyBody> {
    let status = resp.status();
    let empty = resp.body().is_end_stream()
        || resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0");
    if *method == Method::HEAD || !empty || !matches!(status.as_u16(), 401 | 403 | 404) {
        return resp;
    }
    let (code, message) = match status.as_u16() {
        401 => (
            "UNAUTHORIZED",
            "the upstream refused this request's token without saying why: log in again",
        ),
        403 => (
            "DENIED",
            "the upstream refused this request without saying why: the credential may not \
             read it",
        ),
        _ => (
            "NAME_UNKNOWN",
            "the upstream answered 404 without saying why: the repository or its group does \
             not exist, or this credential may not read it (a GitLab Dependency Proxy hides a \
             group from non-members; its group deploy tokens need read_registry and \
             write_registry)",
        ),
    };
    let (mut parts, _) = resp.into_parts();
    let body = crate::error::registry_error_json(code, message);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    Response::from_parts(parts, body::full(body))
}

fn json(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// The synthetic answer for an error: its status, registry JSON error body, and the headers it
/// implies (`Allow`, `WWW-Authenticate`, `Retry-After`).
pub fn error_response(err: &Error) -> Response<ProxyBody> {
    let mut resp = json(err.status(), err.registry_body());
    match err {
        Error::MethodNotAllowed { .. } => {
            resp.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE"),
            );
        }
        Error::Unauthorized { challenge, .. } => {
            if let Ok(v) = HeaderValue::from_str(challenge) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
        }
        _ => {}
    }
    if let Some(secs) = err.retry_after() {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}
