//! The request handler: routes a request, runs the matching handler, and turns any error into
//! the registry's JSON error format. Following the outer/inner split, [`App::handle`] logs and
//! builds synthetic responses; [`App::handle_inner`] returns `Result` and uses `?`.
//!
//! [`App::new`] builds everything the config only names (TLS configs, the session key ring, the
//! upstream clients) and fails with a [`ConfigError`] before any port is bound.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::Scheme;
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Incoming};

use crate::access::{Access, Credentials};
use crate::auth::Auth;
use crate::body::{self, ProxyBody};
use crate::challenge::Challenge;
use crate::config::{Config, ConfigError, Origin};
use crate::error::{Blame, Error};
use crate::mint::Minter;
use crate::proxy::{self, Forward, X_FORWARDED_HOST, X_FORWARDED_PROTO};
use crate::router::{self, Route};
use crate::session::{KeyRing, Session};
use crate::telemetry::{AccessLog, Logged};
use crate::tls;
use crate::upload::{self, Uploader};
use crate::upstream::Upstream;

/// The connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// Shared state of the server: one per process, behind an `Arc`.
pub struct App {
    config: Config,
    server_tls: Option<Arc<rustls::ServerConfig>>,
    upstream: Upstream,
    access: Access,
    auth: Auth,
}

impl App {
    /// Builds the state from a validated config: loads the TLS files and the session key ring.
    pub fn new(config: Config) -> Result<App, ConfigError> {
        let server_tls = config
            .tls
            .as_ref()
            .map(|t| tls::server_config(&t.cert, &t.key))
            .transpose()?;
        let upstream_tls = tls::client_config(config.upstream_ca.as_deref())?;
        let keys = Arc::new(match &config.session_key_file {
            Some(path) => KeyRing::load(path)?,
            None => KeyRing::ephemeral(),
        });
        let upstream = Upstream::new(&config, upstream_tls.clone(), config.registry.clone());
        let token_origin = config
            .token_realm
            .as_ref()
            .and_then(Origin::of)
            .unwrap_or_else(|| config.registry.clone());
        let token_client = Upstream::new(&config, upstream_tls, token_origin);
        let minter = Arc::new(Minter::new(&config, upstream.clone(), token_client));
        let access = Access::new(keys, minter.clone(), config.token_cache_max_entries);
        let auth = Auth::new(minter, config.session_lifetime);
        Ok(App {
            config,
            server_tls,
            upstream,
            access,
            auth,
        })
    }

    /// Session state (token cache counters, key ring).
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The server's TLS config, when serving HTTPS.
    pub fn server_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.server_tls.clone()
    }

    /// The quick answer when `--max-requests` are in flight: 503 with `Retry-After`, logged.
    pub fn overloaded(
        &self,
        req: &Request<Incoming>,
        conn: ConnInfo,
    ) -> Response<Logged<ProxyBody>> {
        let err = Error::Overloaded {
            what: "requests in flight",
        };
        tracing::warn!(path = %req.uri().path(), error = %err, "request refused");
        let mut log = AccessLog::new(req, conn.peer.ip());
        let resp = error_response(&err);
        log.status = resp.status().as_u16();
        resp.map(|b| Logged::new(b, log))
    }

    /// Handles one request; never fails, and logs it once when its response body is done.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Response<Logged<ProxyBody>> {
        let mut log = AccessLog::new(&req, conn.peer.ip());
        let resp = match self.handle_inner(req, conn, &mut log).await {
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
        conn: ConnInfo,
        log: &mut AccessLog,
    ) -> Result<Response<ProxyBody>, Error> {
        let public_url = self.config.public_url.as_ref();
        let route = router::route(req.method(), req.uri(), req.version(), public_url)?;
        let trusted = self.config.is_trusted_proxy(conn.peer.ip());
        match route {
            Route::Healthy => Ok(json(StatusCode::OK, r#"{"status":"ok"}"#.to_owned())),
            Route::Ready => Ok(self.ready().await),
            Route::Token => {
                let public = self.public_origin(&req, conn, trusted)?;
                let xff = proxy::forwarded_for(req.headers(), conn.peer.ip(), trusted);
                let resp = self
                    .auth
                    .token_endpoint(req, &self.access, &public, &xff)
                    .await?;
                log.upstream_status = Some(resp.status().as_u16());
                Ok(resp)
            }
            Route::Registry => {
                let public = self.public_origin(&req, conn, trusted)?;
                let fwd = Forward {
                    peer: conn.peer.ip(),
                    trusted,
                    forwarded_for: proxy::forwarded_for(req.headers(), conn.peer.ip(), trusted),
                    public: &public,
                    idle: self.config.timeouts.body_idle,
                    bytes_in: log.bytes_in.clone(),
                };
                let creds = self.access.credentials(
                    req.method(),
                    req.uri().path(),
                    req.headers(),
                    &public,
                )?;
                let mut resp = match creds {
                    Credentials::Untouched => proxy::forward(&self.upstream, req, &fwd).await?,
                    Credentials::Session(session) => {
                        self.forward_with_session(req, &session, &fwd).await?
                    }
                };
                log.upstream_status = Some(resp.status().as_u16());
                self.access.rewrite_challenges(resp.headers_mut(), &public);
                Ok(resp)
            }
        }
    }

    /// Forwards a request of a sealed session with a GitLab token valid on arrival. A registry
    /// `401` with `invalid_token` or `insufficient_scope` forgets that token (whatever the
    /// request), and a bodiless request is retried once with a new one. Long uploads go in parts
    /// ([`Uploader`]).
    async fn forward_with_session(
        &self,
        mut req: Request<Incoming>,
        session: &Session,
        fwd: &Forward<'_>,
    ) -> Result<Response<ProxyBody>, Error> {
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        let ends = req.body().is_end_stream();
        let cfg = &self.config;
        if upload::is_splittable(
            &method,
            &path,
            req.headers(),
            ends,
            cfg.upload_split,
            cfg.upload_chunk_max,
        ) {
            let uploader = Uploader {
                upstream: &self.upstream,
                access: &self.access,
                fwd,
                chunk_max: cfg.upload_chunk_max,
                mode: cfg.upload_split,
            };
            return uploader.forward(req, session).await;
        }
        let token = self
            .access
            .upstream_token(session, &fwd.forwarded_for, &method, &path, fwd.public)
            .await?;
        let retry = ends.then(|| bodiless_copy(&req));
        req.headers_mut()
            .insert(header::AUTHORIZATION, token.header.clone());
        let resp = proxy::forward(&self.upstream, req, fwd).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let Some(error) = token_error(resp.headers()) else {
            return Ok(resp);
        };
        self.access.invalidate(session, &token);
        let Some(mut retry) = retry else {
            return Ok(resp);
        };
        drop(resp);
        tracing::info!(path = %path, error, "registry refused the session's token; minting again");
        let token = self
            .access
            .upstream_token(session, &fwd.forwarded_for, &method, &path, fwd.public)
            .await?;
        retry
            .headers_mut()
            .insert(header::AUTHORIZATION, token.header.clone());
        proxy::forward(&self.upstream, retry, fwd).await
    }

    /// The origin clients use: the configured public URL; else, from a trusted proxy, its
    /// `X-Forwarded-Proto`/`-Host`; else the request's Host and scheme.
    fn public_origin(
        &self,
        req: &Request<Incoming>,
        conn: ConnInfo,
        trusted: bool,
    ) -> Result<Origin, Error> {
        if let Some(public) = &self.config.public_url {
            return Ok(public.clone());
        }
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
        host.and_then(|h| Origin::from_parts(scheme, &h))
            .ok_or(Error::Refused {
                reason: "missing or invalid Host header",
            })
    }

    /// `/-/ready`: 200 when the upstream answers HTTP at all, else 503 ("not ready" is not a
    /// gateway error of a proxied request, so it is not the 502 of [`Error::status`]). It names
    /// no upstream address.
    async fn ready(&self) -> Response<ProxyBody> {
        match self.upstream.probe().await {
            Ok(status) => {
                let body = serde_json::json!({
                    "status": "ready",
                    "upstream_status": status.as_u16(),
                });
                json(StatusCode::OK, body.to_string())
            }
            Err(err) => {
                tracing::warn!(error = %err.chain(), "not ready");
                json(StatusCode::SERVICE_UNAVAILABLE, err.registry_body())
            }
        }
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
    copy
}

/// `invalid_token` or `insufficient_scope`, when a registry challenge says so.
fn token_error(headers: &HeaderMap) -> Option<&'static str> {
    headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok().and_then(Challenge::parse))
        .find_map(|c| match c.error() {
            Some("invalid_token") => Some("invalid_token"),
            Some("insufficient_scope") => Some("insufficient_scope"),
            _ => None,
        })
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
