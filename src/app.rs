//! The request handler: routes a request, runs the matching handler, and turns any error into
//! the registry's JSON error format. Following the outer/inner split, [`App::handle`] logs and
//! builds synthetic responses; [`App::handle_inner`] returns `Result` and uses `?`.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::uri::Scheme;
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Incoming};

use crate::auth::{Auth, Credentials};
use crate::body::{self, ProxyBody};
use crate::challenge::Challenge;
use crate::config::{Config, Origin};
use crate::error::Error;
use crate::proxy::{self, Forward};
use crate::router::{self, Route};
use crate::session::Session;
use crate::telemetry::{AccessLog, Logged};
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
    upstream: Upstream,
    auth: Auth,
}

impl App {
    /// Builds the state from a validated config.
    pub fn new(config: Config) -> App {
        let upstream = Upstream::new(&config);
        let auth = Auth::new(&config);
        App {
            config,
            upstream,
            auth,
        }
    }

    /// Auth state (token cache counters).
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Handles one request; never fails, and logs it once when its response body is done.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Response<Logged<ProxyBody>> {
        let mut log = AccessLog {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            peer: conn.peer.ip(),
            start: Instant::now(),
            status: 0,
            upstream_status: None,
            bytes_in: Arc::new(AtomicU64::new(0)),
            bytes_out: 0,
            complete: false,
        };
        let resp = match self.handle_inner(req, conn, &mut log).await {
            Ok(resp) => resp,
            Err(err) => {
                tracing::warn!(path = %log.path, status = err.status().as_u16(), error = %err.chain(), "request failed");
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
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let public_url = self.config.public_url.as_ref();
        let route = router::route(req.method(), req.uri(), req.version(), public_url)?;
        match route {
            Route::Healthy => Ok(json(StatusCode::OK, r#"{"status":"ok"}"#.to_owned())),
            Route::Ready => Ok(self.ready().await),
            Route::Token => {
                let public = self.public_origin(host.as_deref(), conn)?;
                let resp = self
                    .auth
                    .token_endpoint(req, &self.upstream, &public, conn.peer.ip())
                    .await?;
                log.upstream_status = Some(resp.status().as_u16());
                Ok(resp)
            }
            Route::Registry => {
                let public = self.public_origin(host.as_deref(), conn)?;
                let fwd = Forward {
                    peer: conn.peer.ip(),
                    public: &public,
                    idle: self.config.timeouts.body_idle,
                    bytes_in: log.bytes_in.clone(),
                };
                let creds = self.auth.credentials(
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
                self.auth.rewrite_challenges(resp.headers_mut(), &public);
                Ok(resp)
            }
        }
    }

    /// Forwards a request of a sealed session with a GitLab token valid on arrival. A bodiless
    /// request the registry answers 401 `invalid_token` is retried once with a new token;
    /// `insufficient_scope` goes back to the client (scopes are never escalated).
    async fn forward_with_session(
        &self,
        mut req: Request<Incoming>,
        session: &Session,
        fwd: &Forward<'_>,
    ) -> Result<Response<ProxyBody>, Error> {
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        let refused = |err: Error| match err {
            Error::MintFailed { status, message } if (400..500).contains(&status) => {
                Error::Unauthorized {
                    reason: format!(
                        "the token service refused this session's credentials: {message}"
                    ),
                    challenge: self.auth.challenge_for(&method, &path, fwd.public),
                }
            }
            other => other,
        };
        let token = self
            .auth
            .upstream_token(session, &self.upstream, fwd.peer)
            .await
            .map_err(refused)?;
        let retry = req.body().is_end_stream().then(|| bodiless_copy(&req));
        req.headers_mut()
            .insert(header::AUTHORIZATION, token.header.clone());
        let resp = proxy::forward(&self.upstream, req, fwd).await?;
        let Some(mut retry) = retry else {
            return Ok(resp);
        };
        if resp.status() != StatusCode::UNAUTHORIZED || !invalid_token(resp.headers()) {
            return Ok(resp);
        }
        drop(resp);
        tracing::info!(path = %path, "registry refused the session's token as invalid; minting again");
        self.auth.invalidate(session, &token).await;
        let token = self
            .auth
            .upstream_token(session, &self.upstream, fwd.peer)
            .await
            .map_err(refused)?;
        retry
            .headers_mut()
            .insert(header::AUTHORIZATION, token.header.clone());
        proxy::forward(&self.upstream, retry, fwd).await
    }

    /// The origin clients use: the configured public URL, else the request's Host and scheme.
    fn public_origin(&self, host: Option<&str>, conn: ConnInfo) -> Result<Origin, Error> {
        if let Some(public) = &self.config.public_url {
            return Ok(public.clone());
        }
        let scheme = if conn.tls {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        host.and_then(|h| Origin::from_parts(scheme, h))
            .ok_or(Error::Refused {
                reason: "missing or invalid Host header",
            })
    }

    /// `/-/ready`: 200 when the upstream answers HTTP at all, else 503 ("not ready" is not a
    /// gateway error of a proxied request, so it is not the 502 of [`Error::status`]).
    async fn ready(&self) -> Response<ProxyBody> {
        match self.upstream.probe().await {
            Ok(status) => {
                let body = serde_json::json!({
                    "status": "ready",
                    "upstream": self.upstream.origin().to_string(),
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

/// A copy of a bodiless request (method, target, version, headers) for one retry.
fn bodiless_copy(req: &Request<Incoming>) -> Request<ProxyBody> {
    let mut copy = Request::new(body::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// True when a registry challenge says `error="invalid_token"`.
fn invalid_token(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok().and_then(Challenge::parse))
        .any(|c| c.error() == Some("invalid_token"))
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

/// The synthetic answer for an error: its status, registry JSON error body.
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
    resp
}
