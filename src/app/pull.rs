//! Pulls through the cache (`--cache-dir`; the storage is [`crate::cache`]). A hit is served
//! only to a client that the upstream itself let pull that repository: under a grant that a
//! `HEAD` or `GET` with the client's own token earned, which lasts no longer than that token,
//! and only for a digest the upstream served in that repository. Everything else asks the
//! upstream with the client's token; a cold `GET` streams to the client while it fills the cache,
//! once per digest (later askers, once authorized, read the growing file).

use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::{token_error, App, Lane};
use crate::body::{self, ProxyBody};
use crate::cache::pull::{self, PullCache, TagRef, Target};
use crate::cache::{Fill, Tee};
use crate::error::Error;
use crate::metrics::OutcomeLabels;
use crate::proxy::{self, Forward};
use crate::session::Session;
use crate::token::UpstreamToken;

/// A bodiless request's shape, to send it more than once.
struct Shape {
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Shape {
    fn of(req: &Request<Incoming>) -> Shape {
        Shape {
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        }
    }

    fn request(&self, method: Method, token: &UpstreamToken) -> Request<ProxyBody> {
        let mut req = Request::new(body::empty());
        *req.method_mut() = method;
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req.headers_mut()
            .insert(header::AUTHORIZATION, token.header.clone());
        req
    }
}

/// What the cache does with a pull.
pub(super) enum CacheRequest {
    /// A blob or a manifest by digest: served from the cache under a grant.
    Object(Target),
    /// A manifest by tag: always asked upstream; remembered for `--cache-serve-stale`.
    Tag(TagRef),
}

impl App {
    /// The cache and what it does with `req`, when it takes part.
    pub(super) fn cache_target(
        &self,
        req: &Request<Incoming>,
    ) -> Option<(&PullCache, CacheRequest)> {
        let cache = self.cache.as_ref()?;
        let (method, path) = (req.method(), req.uri().path());
        if let Some(target) = Target::of(method, path) {
            return Some((cache, CacheRequest::Object(target)));
        }
        Some((cache, CacheRequest::Tag(TagRef::of(method, path)?)))
    }

    /// A manifest by tag: the upstream answers (and the manifest it names is cached by digest
    /// on the way); when the upstream cannot be reached and `--cache-serve-stale` is on, the
    /// manifest the tag last named is served to a client whose grant for the repository still
    /// holds, marked `Warning: 110`.
    pub(super) async fn pull_tag(
        &self,
        cache: &PullCache,
        lane: &Lane,
        req: Request<Incoming>,
        session: &Session,
        fwd: &Forward<'_>,
        tag: &TagRef,
    ) -> Result<Response<ProxyBody>, Error> {
        let principal = pull::principal(session);
        let upstream = lane.config.name.as_str();
        let method = req.method().clone();
        let shape = Shape::of(&req);
        drop(req);
        let answered = self.send(lane, method.clone(), &shape, session, fwd).await;
        let err = match answered {
            Ok((resp, token)) => {
                let digest = resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| crate::cache::Digest::parse(v).ok());
                let Some(digest) = digest.filter(|_| resp.status() == StatusCode::OK) else {
                    return Ok(resp);
                };
                let target = Target {
                    repo: tag.repo.clone(),
                    kind: pull::Kind::Manifest,
                    digest,
                };
                cache.remember_tag(upstream, tag, &digest);
                grant(cache, &principal, upstream, &target, &token);
                if let Some(t) = resp.headers().get(header::CONTENT_TYPE) {
                    cache.set_media_type(&digest, t);
                }
                if method == Method::GET && cache.store.lookup(&digest).is_none() {
                    if let Ok(Fill::Writer(writer)) = cache.store.fill(&digest, None).await {
                        return Ok(resp.map(|b| pull::boxed(Tee::new(b, writer))));
                    }
                }
                return Ok(resp);
            }
            Err(err) => err,
        };
        if !cache.serve_stale || !unreachable(&err) {
            return Err(err);
        }
        let Some(digest) = cache.tag(upstream, tag) else {
            return Err(err);
        };
        let target = Target {
            repo: tag.repo.clone(),
            kind: pull::Kind::Manifest,
            digest,
        };
        let now = Instant::now();
        if !cache
            .grants
            .may_serve_in(&principal, upstream, &tag.repo, &digest, now)
        {
            return Err(err);
        }
        let head = method == Method::HEAD;
        let Some(mut resp) = self.serve_hit(cache, &target, head, &shape, "stale").await else {
            return Err(err);
        };
        tracing::warn!(repo = %tag.repo, tag = %tag.tag, error = %err.chain(), "upstream unreachable: manifest served stale from the cache");
        resp.headers_mut().insert(
            header::WARNING,
            header::HeaderValue::from_static("110 - \"Response is Stale\""),
        );
        Ok(resp)
    }

    /// Serves a `GET`/`HEAD` of a blob or manifest by digest (see the module docs).
    pub(super) async fn pull_through(
        &self,
        cache: &PullCache,
        lane: &Lane,
        req: Request<Incoming>,
        session: &Session,
        fwd: &Forward<'_>,
        target: &Target,
    ) -> Result<Response<ProxyBody>, Error> {
        let principal = pull::principal(session);
        let upstream = lane.config.name.as_str();
        let head = req.method() == Method::HEAD;
        let shape = Shape::of(&req);
        drop(req);
        let granted = cache.grants.may_serve_in(
            &principal,
            upstream,
            &target.repo,
            &target.digest,
            Instant::now(),
        );
        if granted {
            if let Some(resp) = self.serve_hit(cache, target, head, &shape, "hit").await {
                return Ok(resp);
            }
        }
        let ranged = shape.headers.contains_key(header::RANGE);
        let cached = cache.store.lookup(&target.digest).is_some();
        if head || ranged || cached {
            // The upstream decides, with this client's own token; a HEAD costs no blob transfer.
            let (check, token) = self.send(lane, Method::HEAD, &shape, session, fwd).await?;
            if check.status() != StatusCode::OK {
                self.count("denied");
                // The client gets the upstream's own refusal (a GET with its error body).
                return match head {
                    true => Ok(check),
                    false => Ok(self.send(lane, Method::GET, &shape, session, fwd).await?.0),
                };
            }
            grant(cache, &principal, upstream, target, &token);
            if let Some(resp) = self.serve_hit(cache, target, head, &shape, "hit").await {
                return Ok(resp);
            }
            if head {
                return Ok(check);
            }
            if ranged {
                self.count("pass");
                return Ok(self.send(lane, Method::GET, &shape, session, fwd).await?.0);
            }
        }
        let fill = cache.store.fill(&target.digest, None).await;
        match fill {
            Ok(Fill::Writer(writer)) => {
                let (resp, token) = self.send(lane, Method::GET, &shape, session, fwd).await?;
                if resp.status() != StatusCode::OK {
                    // Dropping the writer abandons the fill.
                    self.count("denied");
                    return Ok(resp);
                }
                grant(cache, &principal, upstream, target, &token);
                if target.kind == pull::Kind::Manifest {
                    if let Some(t) = resp.headers().get(header::CONTENT_TYPE) {
                        cache.set_media_type(&target.digest, t);
                    }
                }
                self.count("miss");
                Ok(resp.map(|b| pull::boxed(Tee::new(b, writer))))
            }
            Ok(Fill::Follower(follower)) => {
                let (check, token) = self.send(lane, Method::HEAD, &shape, session, fwd).await?;
                if check.status() != StatusCode::OK {
                    self.count("denied");
                    return Ok(self.send(lane, Method::GET, &shape, session, fwd).await?.0);
                }
                grant(cache, &principal, upstream, target, &token);
                self.count("follower");
                let (mut parts, _) = check.into_parts();
                parts.headers.insert(
                    "x-regrelay-cache",
                    header::HeaderValue::from_static("follow"),
                );
                Ok(Response::from_parts(parts, pull::boxed(follower.body())))
            }
            Ok(Fill::Hit(_)) => {
                // Stored since the lookup above: authorize as for any other hit.
                let (check, token) = self.send(lane, Method::HEAD, &shape, session, fwd).await?;
                if check.status() == StatusCode::OK {
                    grant(cache, &principal, upstream, target, &token);
                    if let Some(resp) = self.serve_hit(cache, target, false, &shape, "hit").await {
                        return Ok(resp);
                    }
                }
                Ok(self.send(lane, Method::GET, &shape, session, fwd).await?.0)
            }
            Ok(Fill::TooLarge) | Err(_) => {
                if let Err(err) = &fill {
                    tracing::warn!(error = %err, "cache fill could not start; proxying");
                }
                self.count("pass");
                Ok(self.send(lane, Method::GET, &shape, session, fwd).await?.0)
            }
        }
    }

    /// The cached answer, or `None` when it cannot be served from the cache after all.
    async fn serve_hit(
        &self,
        cache: &PullCache,
        target: &Target,
        head: bool,
        shape: &Shape,
        outcome: &'static str,
    ) -> Option<Response<ProxyBody>> {
        let hit = cache.store.lookup(&target.digest)?;
        match cache.hit_response(&hit, target, head, &shape.headers).await {
            Ok(Some(resp)) => {
                self.count(outcome);
                if !head {
                    let sent = resp
                        .headers()
                        .get(header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        .unwrap_or(0);
                    self.metrics.cache_served_bytes.inc_by(sent);
                }
                Some(resp)
            }
            Ok(None) => None,
            Err(err) => {
                tracing::warn!(digest = %target.digest, error = %err, "cached object unreadable; asking the upstream");
                None
            }
        }
    }

    /// A bodiless request of `session` upstream, retried once with a new token when the
    /// registry calls the token invalid; also returns the token it went with.
    async fn send(
        &self,
        lane: &Lane,
        method: Method,
        shape: &Shape,
        session: &Session,
        fwd: &Forward<'_>,
    ) -> Result<(Response<ProxyBody>, UpstreamToken), Error> {
        let path = shape.uri.path();
        let token = lane
            .access
            .upstream_token(session, &fwd.forwarded_for, &method, path, fwd.public)
            .await?;
        let resp =
            proxy::forward(&lane.upstream, shape.request(method.clone(), &token), fwd).await?;
        if resp.status() != StatusCode::UNAUTHORIZED || token_error(resp.headers()).is_none() {
            return Ok((resp, token));
        }
        lane.access.invalidate(session, &token);
        drop(resp);
        let token = lane
            .access
            .upstream_token(session, &fwd.forwarded_for, &method, path, fwd.public)
            .await?;
        let resp = proxy::forward(&lane.upstream, shape.request(method, &token), fwd).await?;
        Ok((resp, token))
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .cache_requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

/// The upstream (or its token service) could not be reached: what `--cache-serve-stale` covers.
fn unreachable(err: &Error) -> bool {
    use crate::error::MintFailure;
    matches!(
        err,
        Error::UpstreamUnreachable { .. }
            | Error::UpstreamFailed { .. }
            | Error::Mint(MintFailure::Failed { .. } | MintFailure::Timeout { .. })
    )
}

/// What a `200` with `token` proved: this principal may pull the repository (until the token
/// expires), and the upstream serves this digest there.
fn grant(
    cache: &PullCache,
    principal: &str,
    upstream: &str,
    target: &Target,
    token: &UpstreamToken,
) {
    let now = Instant::now();
    cache.grants.grant(
        principal,
        upstream,
        &target.repo,
        now + token.remaining(now),
    );
    cache.grants.seen(upstream, &target.repo, &target.digest);
}
