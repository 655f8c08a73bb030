//! A registry request's exchange with its upstream: one context ([`Exchange`]) and one function
//! per phase, as pingora's `ProxyHttp` phases, run in order by [`App::registry`]:
//!
//! 1. [`App::route`]: which upstream (the mirror's forms) and the request's path there;
//! 2. [`App::authenticate`]: the request's credentials: a regrelay session, regrelay's own pull
//!    credentials (`--inject-credentials-for`), or the client's `Authorization` untouched;
//! 3. [`App::deliver`]: through the cache, as a split upload, or forwarded with a fresh token;
//! 4. [`Exchange::answer`]: the upstream's challenges and `Location` in the client's names.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};
use sha2::{Digest, Sha256};

use super::{App, ConnInfo, Lane, INJECTED_SESSION_SECS};
use crate::access::{Credentials, DEFAULT_SERVICE};
use crate::api_path::ApiPath;
use crate::body::{self, ProxyBody};
use crate::challenge::{self, Challenge};
use crate::clients::{ClientAddress, ClientHandle};
use crate::config::Origin;
use crate::error::Error;
use crate::mirror::{self, Refusal, Routed};
use crate::proxy::{self, Forward};
use crate::session::{Kind, Session};
use crate::telemetry::AccessLog;
use crate::token::UpstreamToken;
use crate::upload::{self, Uploader};

/// Who sent a request, as its connection and a trusted front say.
#[derive(Debug, Clone, Copy)]
pub(super) struct ClientFacts {
    /// The connection it arrived on.
    pub conn: ConnInfo,
    /// Whether the socket peer is a `--trusted-proxies` front.
    pub trusted: bool,
    /// The client: the socket peer, or behind a trusted front the one it names.
    pub address: ClientAddress,
}

/// One registry request on its way upstream: what every phase after routing reads.
pub(super) struct Exchange<'a> {
    /// The upstream it goes to.
    pub(super) lane: &'a Lane,
    /// How the mirror routed it (to put answers back in the client's names).
    pub(super) routed: Routed,
    /// The client's path, parsed once by the router.
    pub(super) client_api: ApiPath,
    /// The same path as the upstream names it.
    pub(super) api: ApiPath,
    /// The forwarding facts (client, public origin, body accounting, notes).
    pub(super) fwd: Forward<'a>,
}

impl App {
    /// Serves a registry request (`/v2/…`), phase by phase (see the module docs).
    pub(super) async fn registry(
        &self,
        mut req: Request<Incoming>,
        client_api: ApiPath,
        client: ClientFacts,
        log: &mut AccessLog,
    ) -> Result<Response<ProxyBody>, Error> {
        let ClientFacts { conn, trusted, .. } = client;
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
        let x = Exchange {
            lane,
            routed,
            client_api,
            api,
            fwd,
        };
        let session = self.authenticate(&x, &mut req, client.address).await?;
        let mut resp = self.deliver(&x, req, session).await?;
        log.upstream_status = Some(resp.status().as_u16());
        x.answer(&mut resp);
        Ok(resp)
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

    /// The request's credentials, and it pointed at its upstream path: a regrelay session
    /// (opened and bound to this upstream), regrelay's own pull credentials for an anonymous
    /// pull from an `--inject-credentials-for` client, or `None` (the client's `Authorization`,
    /// if any, goes upstream untouched). The access line learns who asks.
    async fn authenticate(
        &self,
        x: &Exchange<'_>,
        req: &mut Request<Incoming>,
        client: ClientAddress,
    ) -> Result<Option<Arc<Session>>, Error> {
        let (lane, notes) = (x.lane, &x.fwd.notes);
        let creds = lane.access.credentials(
            req.method(),
            &x.client_api,
            req.headers(),
            x.fwd.public,
            &lane.session_name,
        )?;
        let anonymous = match &creds {
            Credentials::Untouched => !req.headers().contains_key(header::AUTHORIZATION),
            Credentials::Session(s) => s.authorization.is_none(),
        };
        retarget(req, &x.routed.path)?;
        let injected = match anonymous {
            true => Box::pin(self.injected_session(lane, req.method(), &x.api, client)).await,
            false => None,
        };
        Ok(match (injected, creds) {
            (Some(session), _) => {
                tracing::debug!(upstream = %lane.config.name, "pull with injected credentials");
                notes.principal("injected");
                Some(session)
            }
            (None, Credentials::Session(session)) => {
                notes.principal(principal(session.authorization.as_deref()));
                Some(session)
            }
            (None, Credentials::Untouched) => {
                let auth = req.headers().get(header::AUTHORIZATION);
                notes.principal(principal(auth.map(HeaderValue::as_bytes)));
                None
            }
        })
    }

    /// Sends the request upstream: as it came without a session; with one, through the cache
    /// when it takes part, else with a token valid on arrival (long uploads in parts).
    async fn deliver(
        &self,
        x: &Exchange<'_>,
        req: Request<Incoming>,
        session: Option<Arc<Session>>,
    ) -> Result<Response<ProxyBody>, Error> {
        let Some(session) = session else {
            return proxy::forward(&x.lane.upstream, req, &x.fwd).await;
        };
        let method = req.method().clone();
        let resp = match self.cache_target(&method, &x.api) {
            Some(cached) => Box::pin(self.pull(cached, x, req, &session)).await?,
            None => Box::pin(self.forward_with_session(x, req, &session)).await?,
        };
        Ok(explain_bodiless(resp, &method))
    }

    /// A session for regrelay's own pull credentials of `lane`, when the request may use them:
    /// a pull (GET/HEAD) of a repository, without credentials of its own, from an
    /// `--inject-credentials-for` address. Its id is derived from the upstream, the scope and
    /// the credential, so its GitLab token is cached across requests and a rotated credential
    /// starts afresh.
    async fn injected_session(
        &self,
        lane: &Lane,
        method: &Method,
        api: &ApiPath,
        client: ClientAddress,
    ) -> Option<Arc<Session>> {
        let injected = lane.injected.as_ref()?;
        if !self.may_inject(lane, client.known()) || !matches!(*method, Method::GET | Method::HEAD)
        {
            return None;
        }
        let scope = api.scope(method)?;
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
        x: &Exchange<'_>,
        req: Request<Incoming>,
        session: &Session,
    ) -> Result<Response<ProxyBody>, Error> {
        let (lane, api, fwd) = (x.lane, &x.api, &x.fwd);
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
            return Box::pin(uploader.forward(req, api, session)).await;
        }
        // A scope the session lacks or GitLab refused it is answered here, a push not granted
        // with why ([`Access::upstream_token`]).
        let token = lane
            .access
            .upstream_token(session, fwd, &method, api)
            .await?;
        let retry = ends.then(|| Shape::of(&req).request(method.clone()));
        let (resp, _) = lane
            .send_refreshing(session, fwd, req, api, token, retry.map(|r| move || r))
            .await?;
        Ok(resp)
    }
}

impl Exchange<'_> {
    /// The upstream's answer in the client's names: its challenges point at regrelay's realm
    /// (scopes as the client names the repository), and its `Location` at the client's path.
    fn answer(&self, resp: &mut Response<ProxyBody>) {
        let (public, routed) = (self.fwd.public, &self.routed);
        (self.lane.access).rewrite_challenges(resp.headers_mut(), public, routed);
        if routed.translates() {
            translate_location(resp.headers_mut(), routed);
        }
    }
}

/// A bodiless request's shape, to send it more than once: the one builder of bodiless copies
/// (a retry with a new token, the cache's `HEAD` and `GET`).
pub(super) struct Shape {
    pub(super) uri: Uri,
    version: Version,
    pub(super) headers: HeaderMap,
    /// The client whose share of upstream connections its requests take.
    client: Option<ClientHandle>,
}

impl Shape {
    pub(super) fn of(req: &Request<Incoming>) -> Shape {
        Shape {
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            client: req.extensions().get::<ClientHandle>().cloned(),
        }
    }

    /// The bodiless request; its token is set where it is sent ([`Lane::send_refreshing`]).
    pub(super) fn request(&self, method: Method) -> Request<ProxyBody> {
        let mut req = Request::new(body::empty());
        *req.method_mut() = method;
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        if let Some(client) = &self.client {
            req.extensions_mut().insert(client.clone());
        }
        req
    }
}

impl Lane {
    /// Sends `req` upstream with `token`. When the registry calls the token invalid, the token
    /// is forgotten and, when `retry` is given (it makes a bodiless copy of `req`, only then),
    /// the copy goes once more with a token minted again. Returns the response and the token
    /// it went with.
    pub(super) async fn send_refreshing<B, R>(
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
