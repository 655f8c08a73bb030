//! The request handler: routes a request, runs the matching handler, and turns any error into
//! the registry's JSON error format. Following the outer/inner split, [`App::handle`] logs and
//! builds synthetic responses; [`App::handle_inner`] returns `Result` and uses `?`.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::Scheme;
use http::{Method, Request, Response, StatusCode};
use hyper::body::{Body, Incoming};

use crate::auth::{Auth, Credentials};
use crate::body::{self, ProxyBody};
use crate::challenge::Challenge;
use crate::config::MAX_SESSION_LIFETIME;
use crate::config::{Config, Origin};
use crate::error::Error;
use crate::proxy::{self, Forward};
use crate::router::{self, Route};
use crate::session::{unix_now, Session};
use crate::telemetry::{AccessLog, Logged};
use crate::token::{refresh_margin, UpstreamToken};
use crate::upload;
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
    /// `insufficient_scope` goes back to the client (scopes are never escalated). Long uploads
    /// go in parts ([`App::forward_upload`]).
    async fn forward_with_session(
        &self,
        mut req: Request<Incoming>,
        session: &Session,
        fwd: &Forward<'_>,
    ) -> Result<Response<ProxyBody>, Error> {
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        let ends = req.body().is_end_stream();
        if upload::is_splittable(&method, &path, req.headers(), ends) {
            return self.forward_upload(req, session, fwd).await;
        }
        let token = self.session_token(session, &method, &path, fwd).await?;
        let retry = ends.then(|| bodiless_copy(&req));
        req.headers_mut()
            .insert(header::AUTHORIZATION, token.header.clone());
        let resp = proxy::forward(&self.upstream, req, fwd).await?;
        let Some(retry) = retry else {
            return Ok(resp);
        };
        if resp.status() != StatusCode::UNAUTHORIZED || !invalid_token(resp.headers()) {
            return Ok(resp);
        }
        drop(resp);
        tracing::info!(path = %path, "registry refused the session's token as invalid; minting again");
        self.auth.invalidate(session, &token).await;
        self.send_bodiless(retry, session, fwd).await
    }

    /// A GitLab token for `session`, fresh now. GitLab refusing the credentials (revoked, lost
    /// permission) is the client's 401 with a fresh challenge, so it logs in again.
    async fn session_token(
        &self,
        session: &Session,
        method: &Method,
        path: &str,
        fwd: &Forward<'_>,
    ) -> Result<UpstreamToken, Error> {
        let token = self
            .auth
            .upstream_token(session, &self.upstream, fwd.peer)
            .await;
        token.map_err(|err| match err {
            Error::MintFailed { status, message } if (400..500).contains(&status) => {
                Error::Unauthorized {
                    reason: format!(
                        "the token service refused this session's credentials: {message}"
                    ),
                    challenge: self.auth.challenge_for(method, path, fwd.public),
                }
            }
            other => other,
        })
    }

    /// Sends a bodiless request with a fresh token of `session`.
    async fn send_bodiless(
        &self,
        mut req: Request<ProxyBody>,
        session: &Session,
        fwd: &Forward<'_>,
    ) -> Result<Response<ProxyBody>, Error> {
        let path = req.uri().path().to_owned();
        let token = self
            .session_token(session, req.method(), &path, fwd)
            .await?;
        req.headers_mut()
            .insert(header::AUTHORIZATION, token.header.clone());
        proxy::forward(&self.upstream, req, fwd).await
    }

    /// A long upload in parts: each `PATCH` ends when its token's fresh life is used up (or after
    /// `--upload-chunk-max` bytes) and the next one continues the same upload session with a new
    /// token; a `PUT` with a body ends with a bodiless `PUT ?digest=`. A short upload is one
    /// request. The client gets the registry's last answer.
    async fn forward_upload(
        &self,
        req: Request<Incoming>,
        session: &Session,
        fwd: &Forward<'_>,
    ) -> Result<Response<ProxyBody>, Error> {
        let (parts, body) = req.into_parts();
        let digest = upload::digest_param(parts.uri.query()).map(str::to_owned);
        let first = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut target = upload::with_digest(first, None);
        let headers = upload::part_headers(&parts.headers);
        let hard_cap = session.iat + MAX_SESSION_LIFETIME.as_secs();
        let mut source = upload::Source::new(body);
        let (mut count, mut recoveries) = (0u32, 0u32);
        loop {
            let method = Method::PATCH;
            if unix_now() > hard_cap {
                return Err(Error::Unauthorized {
                    reason: "the upload outlived the session's hard cap".into(),
                    challenge: self
                        .auth
                        .challenge_for(&method, parts.uri.path(), fwd.public),
                });
            }
            let token = self
                .session_token(session, &method, parts.uri.path(), fwd)
                .await?;
            let lifetime = Duration::from_secs(token.exp.saturating_sub(token.minted));
            let budget = token
                .remaining(unix_now())
                .saturating_sub(refresh_margin(lifetime))
                .max(upload::MIN_PART);
            let (segment, back) =
                upload::Segment::new(source, budget, self.config.upload_chunk_max);
            let mut req = upload::part_request(method, &target, headers.clone(), segment)?;
            req.headers_mut()
                .insert(header::AUTHORIZATION, token.header.clone());
            let resp = proxy::forward(&self.upstream, req, fwd).await;
            source = back.await.map_err(|_| Error::UploadInterrupted)?;
            let resp = resp?;
            count += 1;
            if resp.status() != StatusCode::ACCEPTED {
                let status = resp.status().as_u16();
                tracing::warn!(path = %parts.uri.path(), part = count, status, "registry refused an upload part");
                if recoveries < MAX_UPLOAD_RECOVERIES && count > 1 {
                    recoveries += 1;
                    if let Some(next) = self
                        .recover_upload(&target, source.sent, session, fwd)
                        .await
                    {
                        tracing::info!(path = %parts.uri.path(), bytes = source.sent, "upload recovered from the registry's upload status");
                        target = next;
                        continue;
                    }
                }
                return Ok(resp);
            }
            let next = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(upload::next_target)
                .ok_or(Error::UploadInterrupted)?;
            if !source.is_done() {
                target = next;
                continue;
            }
            if count > 1 {
                tracing::info!(path = %parts.uri.path(), parts = count, bytes = source.sent, "upload sent in parts");
            }
            if parts.method != Method::PUT {
                return Ok(resp);
            }
            drop(resp);
            let mut put = Request::new(body::empty());
            *put.method_mut() = Method::PUT;
            *put.uri_mut() = upload::with_digest(&next, digest.as_deref())
                .parse()
                .map_err(|_| Error::UploadInterrupted)?;
            *put.headers_mut() = headers.clone();
            put.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
            return self.send_bodiless(put, session, fwd).await;
        }
    }

    /// After a refused part: asks the registry what the upload holds (`GET` on its location
    /// answers `Range: 0-<last>`). When it holds every byte sent so far, the upload continues
    /// from the `Location` of that answer; otherwise (bytes of the refused part are gone, and
    /// regrelay keeps no copy of them) there is nothing to recover.
    async fn recover_upload(
        &self,
        target: &str,
        sent: u64,
        session: &Session,
        fwd: &Forward<'_>,
    ) -> Option<String> {
        let mut status = Request::new(body::empty());
        *status.uri_mut() = target.parse().ok()?;
        let resp = self.send_bodiless(status, session, fwd).await.ok()?;
        if resp.status() != StatusCode::NO_CONTENT {
            return None;
        }
        let range = resp.headers().get(header::RANGE)?.to_str().ok()?;
        let (low, high) = upload::stored_bytes(range)?;
        if !(low..=high).contains(&sent) {
            tracing::warn!(
                sent,
                stored = high,
                "upload cannot be recovered: the registry holds fewer bytes than were sent"
            );
            return None;
        }
        let location = resp.headers().get(header::LOCATION)?.to_str().ok()?;
        upload::next_target(location)
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

/// Times a split upload asks the registry's upload status after a refused part.
const MAX_UPLOAD_RECOVERIES: u32 = 3;

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
