//! Pulls through the cache (`--cache-dir`; the storage is [`crate::cache`]). A hit is served
//! only to a client that the upstream itself let pull that repository: under a grant that a
//! `HEAD` or `GET` with the client's own token earned, which lasts no longer than that token,
//! and only for a digest the upstream served in that repository. Everything else asks the
//! upstream with the client's token; a cold `GET` streams to the client while it fills the cache,
//! once per digest (later askers, once authorized, read the growing file).
//!
//! A registry on object storage answers blob reads with a redirect to a presigned URL: to the
//! client's own token that is a yes, as a `200` is ([`Answer::Elsewhere`]). regrelay then reads
//! the object store itself ([`crate::cache::redirect`]) and answers the client as the registry
//! would have without the redirect, so the client never sees the URL, the blob is verified and
//! stored, and warm pulls never reach the object store.

use std::sync::Arc;

use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::exchange::{Exchange, Shape};
use super::{App, Lane};
use crate::api_path::ApiPath;
use crate::body::ProxyBody;
use crate::cache::pull::{self, PullCache, TagRef, Target};
use crate::cache::redirect::{self, Presigned};
use crate::cache::shared::{Claim, Shared, Stat};
use crate::cache::{Fill, Follower, Tee, Writer};
use crate::error::Error;
use crate::metrics::OutcomeLabels;
use crate::proxy::{self, Forward};
use crate::session::Session;
use crate::token::UpstreamToken;
use crate::upload::content_length;

/// What the upstream answered a read of an object, with the client's token.
enum Answer {
    /// The registry answered itself (a `200`, or a refusal).
    Here(Response<ProxyBody>),
    /// The registry sent the read to object storage: its yes. `registry` is its answer without
    /// the `Location`, `to` where that pointed.
    Elsewhere {
        registry: http::response::Parts,
        to: Presigned,
    },
}

/// What the cache does with a pull.
pub(super) enum CacheRequest {
    /// A blob or a manifest by digest: served from the cache under a grant.
    Object(Target),
    /// A manifest by tag: always asked upstream; remembered for `--cache-serve-stale`.
    Tag(TagRef),
}

/// One pull the cache takes part in: the cache, the upstream, who asks, and the request.
struct Pull<'a> {
    cache: &'a PullCache,
    lane: &'a Lane,
    /// The upstream path, parsed.
    api: &'a ApiPath,
    session: &'a Session,
    fwd: &'a Forward<'a>,
    /// Who asks, as the grants know them ([`pull::principal`]).
    principal: String,
    method: Method,
    shape: Shape,
}

impl Pull<'_> {
    fn upstream(&self) -> &str {
        &self.lane.config.name
    }

    fn head(&self) -> bool {
        self.method == Method::HEAD
    }

    fn granted(&self, target: &Target) -> bool {
        let (repo, digest) = (&target.repo, &target.digest);
        let now = Instant::now();
        (self.cache.grants).may_serve_in(&self.principal, self.upstream(), repo, digest, now)
    }

    /// The upstream said, with `token`, that `tag` names the manifest `digest`: remembered for
    /// the tag (`--cache-serve-stale`), and the grant it proves kept. Returns the manifest.
    fn tag_names(
        &self,
        tag: &TagRef,
        digest: crate::cache::Digest,
        token: &UpstreamToken,
    ) -> Target {
        let target = tag.manifest(digest);
        self.cache.remember_tag(self.upstream(), tag, &digest);
        self.grant(&target, token);
        target
    }

    /// What a `200` (or a redirect to object storage) with `token` proved: this principal may
    /// pull the repository (until the token expires), and the upstream serves this digest there.
    fn grant(&self, target: &Target, token: &UpstreamToken) {
        let now = Instant::now();
        let grants = &self.cache.grants;
        let until = now + token.remaining(now);
        grants.grant(&self.principal, self.upstream(), &target.repo, until);
        grants.seen(self.upstream(), &target.repo, &target.digest);
    }
}

impl App {
    /// The cache and what it does with `req`, when it takes part.
    pub(super) fn cache_target(
        &self,
        method: &Method,
        api: &ApiPath,
    ) -> Option<(&PullCache, CacheRequest)> {
        let cache = self.cache.as_ref()?;
        if let Some(target) = Target::of(method, api) {
            return Some((cache, CacheRequest::Object(target)));
        }
        Some((cache, CacheRequest::Tag(TagRef::of(method, api)?)))
    }

    /// Serves a pull the cache takes part in ([`App::cache_target`]).
    pub(super) async fn pull(
        &self,
        (cache, what): (&PullCache, CacheRequest),
        x: &Exchange<'_>,
        req: Request<Incoming>,
        session: &Session,
    ) -> Result<Response<ProxyBody>, Error> {
        let (lane, fwd) = (x.lane, &x.fwd);
        let p = Pull {
            cache,
            lane,
            api: &x.api,
            session,
            fwd,
            principal: pull::principal(session),
            method: req.method().clone(),
            shape: Shape::of(&req),
        };
        drop(req);
        match what {
            CacheRequest::Object(target) => self.pull_object(&p, &target).await,
            CacheRequest::Tag(tag) => self.pull_tag(&p, &tag).await,
        }
    }

    /// A manifest by tag: the upstream answers (and the manifest it names is cached by digest
    /// on the way). A `GET` of a tag whose last manifest is cached asks with a `HEAD` first
    /// ([`App::revalidate_tag`]). When the upstream cannot be reached and `--cache-serve-stale`
    /// is on, the manifest the tag last named is served to a client whose grant for the
    /// repository still holds, marked `Warning: 110`.
    async fn pull_tag(&self, p: &Pull<'_>, tag: &TagRef) -> Result<Response<ProxyBody>, Error> {
        let asked = match self.revalidate_tag(p, tag).await {
            Ok(Some(hit)) => return Ok(hit),
            Ok(None) => self.send(p, p.method.clone()).await,
            Err(err) => Err(err),
        };
        let err = match asked {
            Ok((resp, token)) => return Ok(self.tag_answered(p, tag, resp, &token).await),
            Err(err) => err,
        };
        if !p.cache.serve_stale || !unreachable(&err) {
            return Err(err);
        }
        let Some(target) = p.cache.tag(p.upstream(), tag).map(|d| tag.manifest(d)) else {
            return Err(err);
        };
        if !p.granted(&target) {
            return Err(err);
        }
        let Some(mut resp) = self.serve_hit(p, &target, "stale").await else {
            return Err(err);
        };
        tracing::warn!(repo = %tag.repo, tag = %tag.tag, error = %err.chain(), "upstream unreachable: manifest served stale from the cache");
        resp.headers_mut().insert(
            header::WARNING,
            header::HeaderValue::from_static("110 - \"Response is Stale\""),
        );
        Ok(resp)
    }

    /// A `GET` of a tag whose last manifest is in the cache: a `HEAD` with the client's token
    /// asks the upstream which manifest the tag names now (Docker Hub does not count a `HEAD`
    /// against its pull rate limit, and no manifest body crosses the network); when that one is
    /// cached, it is served from the cache (a hit). `None`: the `GET` goes upstream (the tag
    /// names a manifest not cached, the upstream refused, or nothing was cached for the tag).
    /// An error is the upstream's unreachability, for the stale path.
    async fn revalidate_tag(
        &self,
        p: &Pull<'_>,
        tag: &TagRef,
    ) -> Result<Option<Response<ProxyBody>>, Error> {
        let last = p.cache.tag(p.upstream(), tag);
        if p.head() || last.is_none_or(|d| p.cache.store.lookup(&d).is_none()) {
            return Ok(None);
        }
        let (resp, token) = self.send(p, Method::HEAD).await?;
        let Some(digest) = manifest_digest(&resp) else {
            return Ok(None);
        };
        let target = p.tag_names(tag, digest, &token);
        let hit = self.serve_hit(p, &target, "hit").await;
        if hit.is_some() {
            self.metrics.cache_manifest_gets_avoided.inc();
        }
        Ok(hit)
    }

    /// The upstream's answer to a tag, passed on: its manifest is remembered for the tag, its
    /// grant kept, and its body cached by digest as it streams to the client.
    async fn tag_answered(
        &self,
        p: &Pull<'_>,
        tag: &TagRef,
        resp: Response<ProxyBody>,
        token: &UpstreamToken,
    ) -> Response<ProxyBody> {
        let Some(digest) = manifest_digest(&resp) else {
            return resp;
        };
        p.tag_names(tag, digest, token);
        if let Some(t) = resp.headers().get(header::CONTENT_TYPE) {
            p.cache.set_media_type(&digest, t);
        }
        if !p.head() && p.cache.store.lookup(&digest).is_none() {
            if let Ok(Fill::Writer(mut writer)) = p.cache.store.fill(&digest, None).await {
                if let Some(shared) = &p.cache.shared {
                    let t = resp.headers().get(header::CONTENT_TYPE).cloned();
                    shared.upload_when_committed(&mut writer, t, None);
                }
                return resp.map(|b| pull::boxed(Tee::new(b, writer)));
            }
        }
        resp
    }

    /// Serves a `GET`/`HEAD` of a blob or manifest by digest (see the module docs).
    async fn pull_object(
        &self,
        p: &Pull<'_>,
        target: &Target,
    ) -> Result<Response<ProxyBody>, Error> {
        if p.granted(target) {
            if let Some(resp) = self.serve_hit(p, target, "hit").await {
                return Ok(resp);
            }
        }
        let ranged = p.shape.headers.contains_key(header::RANGE);
        let cached = p.cache.store.lookup(&target.digest).is_some();
        if p.head() || ranged || cached {
            // The upstream decides, with this client's own token; a HEAD costs no blob transfer.
            let check = match self.authorize(p, target).await? {
                Ok(check) => check,
                Err(refusal) if p.head() => return Ok(refusal),
                // The client gets the upstream's own refusal, with its error body.
                Err(_) => return Ok(self.fetch(p, target).await?.0),
            };
            if let Some(resp) = self.serve_hit(p, target, "hit").await {
                return Ok(resp);
            }
            if p.head() {
                self.count(p, "pass");
                return self.answer_head(p, target, check).await;
            }
            if ranged {
                let len = blob_len(target, &check);
                drop(check);
                if let Some(resp) = self.range_fill(p, target, len).await? {
                    return Ok(resp);
                }
                self.count(p, "pass");
                return Ok(self.fetch(p, target).await?.0);
            }
        }
        let fill = p.cache.store.fill(&target.digest, None).await;
        match fill {
            Ok(Fill::Writer(writer)) => self.fill_miss(p, target, writer).await,
            Ok(Fill::Follower(follower)) => self.follow_fill(p, target, follower).await,
            Ok(Fill::Hit(_)) => {
                // Stored since the lookup above: authorize as for any other hit.
                if self.authorize(p, target).await?.is_ok() {
                    if let Some(resp) = self.serve_hit(p, target, "hit").await {
                        return Ok(resp);
                    }
                }
                Ok(self.fetch(p, target).await?.0)
            }
            Ok(Fill::TooLarge) | Err(_) => {
                if let Err(err) = &fill {
                    tracing::warn!(error = %err, "cache fill could not start; proxying");
                }
                self.count(p, "pass");
                Ok(self.fetch(p, target).await?.0)
            }
        }
    }

    /// A cold `GET` this caller fills: from the shared bucket when it holds `target` (or gets it
    /// from the replica fetching it), else from the upstream, uploaded to the bucket once
    /// verified ([`crate::cache::shared`]).
    async fn fill_miss(
        &self,
        p: &Pull<'_>,
        target: &Target,
        mut writer: Writer,
    ) -> Result<Response<ProxyBody>, Error> {
        let mut lease = None;
        if let Some(shared) = &p.cache.shared {
            // The upstream's yes first: a client it refuses never reaches the bucket's leases.
            let check = match self.authorize(p, target).await? {
                Ok(check) => check,
                // The client gets the upstream's own refusal, with its error body.
                Err(_) => return Ok(self.fetch(p, target).await?.0),
            };
            match shared.claim(&target.digest).await {
                Claim::Stored(stat) => {
                    let read = self.serve_from_bucket(p, target, shared, &stat, check, writer);
                    match read.await {
                        Ok(resp) => return Ok(resp),
                        Err(back) => writer = back,
                    }
                }
                Claim::Lease(held) => lease = Some(held),
                Claim::Unclaimed => {}
            }
        }
        let (resp, token) = self.fetch(p, target).await?;
        if resp.status() != StatusCode::OK {
            // Dropping the writer abandons the fill (and the lease, if any).
            self.count(p, "denied");
            return Ok(resp);
        }
        p.grant(target, &token);
        let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
        if target.kind == pull::Kind::Manifest {
            if let Some(t) = &content_type {
                p.cache.set_media_type(&target.digest, t);
            }
        }
        if let Some(shared) = &p.cache.shared {
            let manifest = target.kind == pull::Kind::Manifest;
            shared.upload_when_committed(&mut writer, content_type.filter(|_| manifest), lease);
        }
        self.count(p, "miss");
        Ok(resp.map(|b| pull::boxed(Tee::new(b, writer))))
    }

    /// `target` is in the shared bucket (`stat`) and the upstream said yes to this client
    /// (`check`): it is read from there into `writer` (which verifies it again), or, with
    /// `--cache-redirect`, the client is sent there. `Err(writer)`: the bucket lost it since;
    /// fetch it from the upstream.
    async fn serve_from_bucket(
        &self,
        p: &Pull<'_>,
        target: &Target,
        shared: &Arc<Shared>,
        stat: &Stat,
        check: Answer,
        writer: Writer,
    ) -> Result<Response<ProxyBody>, Writer> {
        let registry = match check {
            Answer::Here(check) => check.into_parts().0.headers,
            Answer::Elsewhere { registry, .. } => registry.headers,
        };
        // A manifest is served with the media type it was stored with (else the registry's).
        let media_type = match target.kind {
            pull::Kind::Manifest => {
                let t = stat
                    .content_type
                    .as_ref()
                    .or(registry.get(header::CONTENT_TYPE));
                let Some(t) = t.cloned() else {
                    return Err(writer);
                };
                p.cache.set_media_type(&target.digest, &t);
                Some(t)
            }
            pull::Kind::Blob => None,
        };
        if let Some(resp) = self.bucket_redirect(p, target) {
            return Ok(resp);
        }
        let object = match shared.get(&target.digest).await {
            Ok(Some(object)) => object,
            Ok(None) => return Err(writer),
            Err(err) => {
                tracing::warn!(digest = %target.digest, error = %err, "shared cache: reading an object failed; fetching from the upstream");
                return Err(writer);
            }
        };
        self.count(p, "shared");
        shared.touch(&target.digest);
        let mut resp = redirect::client_response(&registry, object, &target.digest, p.fwd.idle);
        if let Some(t) = media_type {
            resp.headers_mut().insert(header::CONTENT_TYPE, t);
        }
        resp.headers_mut().insert(
            "x-regrelay-cache",
            header::HeaderValue::from_static("shared"),
        );
        Ok(resp.map(|b| pull::boxed(Tee::new(b, writer))))
    }

    /// With `--cache-redirect`, a granted `GET` of a blob in the shared bucket: a `307` to a
    /// presigned URL that lives seconds (never logged), so the bytes flow from the object
    /// store.
    fn bucket_redirect(&self, p: &Pull<'_>, target: &Target) -> Option<Response<ProxyBody>> {
        let shared = p.cache.shared.as_ref().filter(|s| s.redirects())?;
        if p.head() || target.kind != pull::Kind::Blob {
            return None;
        }
        let location = shared.presigned(&target.digest)?;
        self.count(p, "redirect");
        shared.touch(&target.digest);
        let resp = Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(header::LOCATION, location)
            .header("docker-content-digest", target.digest.to_string())
            .header("x-regrelay-cache", "redirect")
            .header(header::CONTENT_LENGTH, 0)
            .body(crate::body::empty())
            .expect("valid headers");
        Some(resp)
    }

    /// A cold `GET` while another caller fills `target`: once the upstream says yes to this
    /// client, the growing file; else what the upstream answers it.
    async fn follow_fill(
        &self,
        p: &Pull<'_>,
        target: &Target,
        follower: Follower,
    ) -> Result<Response<ProxyBody>, Error> {
        let Ok(check) = self.authorize(p, target).await? else {
            return Ok(self.fetch(p, target).await?.0);
        };
        let mut parts = match check {
            Answer::Here(check) => check.into_parts().0,
            // The object store's length is not known here: the body goes chunked.
            Answer::Elsewhere { mut registry, .. } => {
                let (none, digest) = (HeaderMap::new(), &target.digest);
                registry.status = StatusCode::OK;
                registry.headers = redirect::client_headers(&registry.headers, &none, digest);
                registry
            }
        };
        self.count(p, "follower");
        parts.headers.insert(
            "x-regrelay-cache",
            header::HeaderValue::from_static("follow"),
        );
        Ok(Response::from_parts(parts, pull::boxed(follower.body())))
    }

    /// A `Range` read of a blob not cached (lazy-pulling snapshotters read layers so), which
    /// the upstream has just authorized (`check`): it starts, or joins, the one full fill of the
    /// blob and is answered from the growing file as soon as its bytes are there, so many ranges
    /// of one cold blob make one upstream read. `None`: passed through instead (a manifest, a
    /// blob on object storage, a length or range the answer does not make clear). `len`: the
    /// blob's, as the upstream's yes said ([`blob_len`]).
    async fn range_fill(
        &self,
        p: &Pull<'_>,
        target: &Target,
        len: Option<u64>,
    ) -> Result<Option<Response<ProxyBody>>, Error> {
        let Some(len) = len else {
            tracing::debug!(digest = %target.digest, "cache: range passed through (no blob length in the upstream's answer)");
            return Ok(None);
        };
        let Some(Ok(range)) = pull::range(&p.shape.headers, len) else {
            tracing::debug!(digest = %target.digest, "cache: range passed through (not one satisfiable range)");
            return Ok(None);
        };
        let digest = &target.digest;
        let follower = match p.cache.store.fill(digest, Some(len)).await {
            Ok(Fill::Follower(follower)) => follower,
            Ok(Fill::Writer(writer)) => {
                self.fill_in_background(p, writer).await?;
                match p.cache.store.fill(digest, Some(len)).await {
                    Ok(Fill::Follower(follower)) => follower,
                    Ok(Fill::Hit(_)) => return Ok(self.serve_hit(p, target, "hit").await),
                    _ => return Ok(None),
                }
            }
            Ok(Fill::Hit(_)) => return Ok(self.serve_hit(p, target, "hit").await),
            Ok(Fill::TooLarge) | Err(_) => {
                tracing::debug!(digest = %target.digest, "cache: range passed through (no fill)");
                return Ok(None);
            }
        };
        self.count(p, "follower");
        Ok(Some(p.cache.range_response(follower, target, len, range)))
    }

    /// Fetches the whole blob of `p` into `writer` in a task of its own: the fill lives on
    /// whether or not the range that started it is still read. Its upstream request is the
    /// client's `GET` without the `Range`, with the client's token, and it holds one of that
    /// client's share of upstream connections until the blob is in (as the cache's other upstream
    /// requests do): a client cannot start more fills than its share. A refusal or failure drops
    /// the writer: the fill fails, and its readers' bodies end with an error.
    async fn fill_in_background(&self, p: &Pull<'_>, writer: Writer) -> Result<(), Error> {
        let token = (p.lane.access)
            .upstream_token(p.session, p.fwd, &Method::GET, p.api)
            .await?;
        let mut req = p.shape.request(Method::GET);
        req.headers_mut().remove(header::RANGE);
        req.headers_mut()
            .insert(header::AUTHORIZATION, token.header.clone());
        let upstream = p.lane.upstream.clone();
        let (public, forwarded_for) = (p.fwd.public.clone(), p.fwd.forwarded_for.clone());
        let (peer, trusted, idle) = (p.fwd.peer, p.fwd.trusted, p.fwd.idle);
        let shared = p.cache.shared.clone();
        tokio::spawn(async move {
            let mut writer = writer;
            let digest = writer.digest();
            // A shared bucket that holds it (or gets it from the replica fetching it) is read
            // instead; else this replica fetches it and uploads it once verified.
            if let Some(shared) = &shared {
                let mut lease = None;
                match shared.claim(&digest).await {
                    Claim::Stored(_) => match shared.get(&digest).await {
                        Ok(Some(object)) => {
                            return drain(Tee::new(object.into_body(), writer), &digest).await;
                        }
                        Ok(None) => {}
                        Err(err) => {
                            tracing::warn!(%digest, error = %err, "shared cache: reading an object failed; fetching from the upstream")
                        }
                    },
                    Claim::Lease(held) => lease = Some(held),
                    Claim::Unclaimed => {}
                }
                shared.upload_when_committed(&mut writer, None, lease);
            }
            let fwd = Forward {
                peer,
                trusted,
                forwarded_for,
                public: &public,
                idle,
                bytes_in: Default::default(),
                notes: Default::default(),
                client: None,
            };
            let resp = match proxy::forward(&upstream, req, &fwd).await {
                Ok(resp) if resp.status() == StatusCode::OK => resp,
                Ok(resp) => {
                    tracing::debug!(%digest, status = resp.status().as_u16(), "cache: range fill refused upstream");
                    return;
                }
                Err(err) => {
                    tracing::debug!(%digest, error = %err, "cache: range fill failed");
                    return;
                }
            };
            // The body is proxy::forward's: it fails when the upstream stalls past the body idle
            // timeout, and the tee then gives the fill up.
            drain(Tee::new(resp.into_body(), writer), &digest).await;
        });
        Ok(())
    }

    /// Asks the upstream (`HEAD`, with the client's own token) whether this client may pull
    /// `target`: on a yes (`200`, or a redirect to object storage) records the grant and gives
    /// the answer (`Ok`); else the refusal (`Err`).
    async fn authorize(
        &self,
        p: &Pull<'_>,
        target: &Target,
    ) -> Result<Result<Answer, Response<ProxyBody>>, Error> {
        let (check, token) = self.ask(p, Method::HEAD).await?;
        match check {
            Answer::Here(refusal) if refusal.status() != StatusCode::OK => {
                self.count(p, "denied");
                Ok(Err(refusal))
            }
            check => {
                p.grant(target, &token);
                Ok(Ok(check))
            }
        }
    }

    /// The answer to a `HEAD` the upstream said yes to and the cache cannot answer: the
    /// registry's own, or, when it redirected, one built from the object store's `HEAD`.
    async fn answer_head(
        &self,
        p: &Pull<'_>,
        target: &Target,
        check: Answer,
    ) -> Result<Response<ProxyBody>, Error> {
        match check {
            Answer::Here(resp) => Ok(resp),
            Answer::Elsewhere { registry, to } => {
                let object = redirect::follow(&p.lane.upstream, to, &Method::HEAD, None).await?;
                let (headers, digest) = (&registry.headers, &target.digest);
                Ok(redirect::client_response(
                    headers, object, digest, p.fwd.idle,
                ))
            }
        }
    }

    /// `GET` of `target` with the client's token (and its `Range`, if any): the registry's
    /// answer, or, when it redirects to object storage, the object store's, read by regrelay.
    /// Also returns the token it went with.
    async fn fetch(
        &self,
        p: &Pull<'_>,
        target: &Target,
    ) -> Result<(Response<ProxyBody>, UpstreamToken), Error> {
        let (answer, token) = self.ask(p, Method::GET).await?;
        let resp = match answer {
            Answer::Here(resp) => resp,
            Answer::Elsewhere { registry, to } => {
                tracing::debug!(digest = %target.digest, store = %to.origin(), "cache: reading from object storage");
                let range = p.shape.headers.get(header::RANGE);
                let object = redirect::follow(&p.lane.upstream, to, &Method::GET, range).await?;
                let (headers, digest) = (&registry.headers, &target.digest);
                redirect::client_response(headers, object, digest, p.fwd.idle)
            }
        };
        Ok((resp, token))
    }

    /// [`App::send`], with a redirect to object storage taken out of the answer.
    async fn ask(&self, p: &Pull<'_>, method: Method) -> Result<(Answer, UpstreamToken), Error> {
        let (resp, token) = self.send(p, method).await?;
        let (mut parts, body) = resp.into_parts();
        let (upstream, public) = (p.lane.upstream.origin(), p.fwd.public);
        let answer = match Presigned::take(parts.status, &mut parts.headers, upstream, public)? {
            // The body of a redirect is at most a line of HTML naming the URL: dropped.
            Some(to) => Answer::Elsewhere {
                registry: parts,
                to,
            },
            None => Answer::Here(Response::from_parts(parts, body)),
        };
        Ok((answer, token))
    }

    /// The cached answer, or `None` when it cannot be served from the cache after all.
    async fn serve_hit(
        &self,
        p: &Pull<'_>,
        target: &Target,
        outcome: &'static str,
    ) -> Option<Response<ProxyBody>> {
        if let Some(resp) = self.bucket_redirect(p, target) {
            return Some(resp);
        }
        let hit = p.cache.store.lookup(&target.digest)?;
        let head = p.head();
        match p
            .cache
            .hit_response(&hit, target, head, &p.shape.headers)
            .await
        {
            Ok(Some(resp)) => {
                self.count(p, outcome);
                if let Some(shared) = &p.cache.shared {
                    shared.touch(&target.digest);
                }
                if !head {
                    let sent = content_length(resp.headers()).unwrap_or(0);
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

    /// A bodiless request of the pull's session upstream, retried once with a new token when
    /// the registry calls the token invalid; also returns the token it went with.
    async fn send(
        &self,
        p: &Pull<'_>,
        method: Method,
    ) -> Result<(Response<ProxyBody>, UpstreamToken), Error> {
        let (lane, session, fwd) = (p.lane, p.session, p.fwd);
        let token = lane
            .access
            .upstream_token(session, fwd, &method, p.api)
            .await?;
        // A HEAD asks whether, and what: never for a range (a registry answers a HEAD with a
        // `Range` 206, which is no yes).
        let request = |method: Method| {
            let mut req = p.shape.request(method);
            if req.method() == Method::HEAD {
                req.headers_mut().remove(header::RANGE);
            }
            req
        };
        let req = request(method.clone());
        let retry = Some(|| request(method));
        lane.send_refreshing(session, fwd, req, p.api, token, retry)
            .await
    }

    fn count(&self, p: &Pull<'_>, outcome: &'static str) {
        p.fwd.notes.cache(outcome);
        self.metrics
            .cache_requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

/// Reads a fill's tee to its end (nobody reads the body: the fill is what it is for).
async fn drain<B>(tee: Tee<B>, digest: &crate::cache::Digest)
where
    Tee<B>: http_body::Body,
    <Tee<B> as http_body::Body>::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(tee);
    while let Some(frame) = body.frame().await {
        if let Err(err) = frame {
            tracing::warn!(%digest, error = %err, "cache: range fill cut");
            break;
        }
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

/// The digest of the manifest a `200` to a manifest request names (`Docker-Content-Digest`).
fn manifest_digest(resp: &Response<ProxyBody>) -> Option<crate::cache::Digest> {
    if resp.status() != StatusCode::OK {
        return None;
    }
    let v = resp.headers().get("docker-content-digest")?.to_str().ok()?;
    crate::cache::Digest::parse(v).ok()
}

/// The length of a blob, as the upstream's own answer to a read of it says (not for a redirect
/// to object storage: its length is the store's to say).
fn blob_len(target: &Target, answer: &Answer) -> Option<u64> {
    match answer {
        Answer::Here(resp) if target.kind == pull::Kind::Blob => content_length(resp.headers()),
        _ => None,
    }
}
