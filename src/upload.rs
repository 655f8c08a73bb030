//! Long uploads through hops that buffer request bodies: one client upload, several upstream
//! requests, each one short enough to reach the registry with a valid token.
//!
//! The registry checks a token once, when a request's headers arrive. A hop that buffers the
//! body (nginx's default `proxy_request_buffering on`, an HTTP/1.0 upstream, many ingresses and
//! CDNs) sends those headers only after the whole body: a layer that streams for longer than the
//! token lives then arrives with an expired token, and Docker never retries a 401. So regrelay
//! ends an upstream `PATCH` when its token's fresh life (lifetime minus the refresh margin) is
//! used up, or after `--upload-chunk-max` bytes, and continues the *same* upload session (it lives
//! in the `Location` URL, not in the token) with a new `PATCH` and a freshly minted token. A `PUT`
//! with a body (containerd sends a blob that way) becomes `PATCH`es plus the final bodiless
//! `PUT ?digest=`. The client sees one request and the registry's last answer; the registry still
//! verifies the digest of the whole blob.
//!
//! How a body is cut ([`UploadSplit`], `--upload-split`): a stream of unknown length (Docker's
//! chunked `PATCH`) is cut by time, each part sent chunked. A body with a `Content-Length` keeps
//! a length on every request: it goes whole when it fits in the first part
//! ([`FIRST_PART_BYTES`], or `--upload-chunk-max`), else in parts of exact length, each sized
//! from the measured rate to fit in its token's fresh life (fronts that demand a length would
//! answer a chunked part 411). `always` cuts every streaming upload by time; `never` forwards
//! uploads as they come.
//!
//! Silence counts across parts: a client that sends nothing is cut off after the body idle
//! timeout, however many parts that spans. A part that fails is not retried and no upload state
//! is re-read (distribution cancels an upload whose `_state` no longer matches what it holds):
//! the client gets a clear error and restarts the blob; the registry verifies every blob's digest,
//! so nothing corrupt is ever stored. An upload `Location` on another origin (object storage) is
//! followed without `Authorization`.
//!
//! At the upload drain deadline of a stopping replica (`--upload-drain-secs`) the part in flight
//! ends where it is, and the client gets distribution's `BLOB_UPLOAD_INVALID` (404, "restart the
//! upload") with a message that says why, and `Retry-After`; regrelay reads (and drops) the rest
//! of its body for [`CUT_LINGER`] so that it reads that answer instead of a reset connection. Not
//! the OCI `202` + `Range` (resume from here): no client that streams a blob resumes one (skopeo
//! and Docker send their closing `PUT`, which the registry refuses with an error skopeo does not
//! retry), and not `503`, whose body skopeo does not read and whose error it does not retry.
//! With `BLOB_UPLOAD_INVALID` skopeo's `--retry-times` and Docker's own retry push the blob again,
//! through another replica.
//!
//! Nothing is buffered: [`Segment`] passes the client's frames through and hands the stream back
//! when its part ends, so memory stays flat whatever the blob size.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, Sleep};

use crate::access::Access;
use crate::api_path::ApiPath;
use crate::body::{self, IdleTimeout, ProxyBody};
use crate::config::{Origin, UploadSplit, MAX_SESSION_LIFETIME};
use crate::error::{BoxError, Error};
use crate::proxy::{self, Forward};
use crate::session::{unix_now, Session};
use crate::token::refresh_margin;
use crate::upstream::Upstream;

/// `PUT`s with a body up to this size are forwarded as they are (manifest-sized; they take no
/// time to send). Larger ones become `PATCH`es plus a bodiless `PUT`.
pub const PUT_SPLIT_THRESHOLD_BYTES: u64 = 1 << 20;
/// The shortest part regrelay sends by time, whatever the token's remaining life.
pub const MIN_PART: Duration = Duration::from_secs(1);
/// A body with a `Content-Length` up to this size goes upstream whole (with its length), and
/// larger ones start with a part of this size (a few seconds even on a slow uplink).
pub const FIRST_PART_BYTES: u64 = 8 << 20;
/// The smallest part of exact length after the first.
pub const MIN_PART_BYTES: u64 = 1 << 20;
/// How long the rest of a cut upload's body is read and dropped after the answer, so the client
/// reads the answer rather than a reset (its send buffer would otherwise hit a closed socket).
pub const CUT_LINGER: Duration = Duration::from_secs(2);

/// The `Content-Length` of a request, when it has one.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// True for requests that may stream a blob for long, and so go in parts: a `PATCH` without
/// `Content-Range` (a stream appended to the upload) and a `PUT` with more than
/// [`PUT_SPLIT_THRESHOLD_BYTES`] (or an unknown length) to an upload location; in `auto` mode a
/// body whose length fits in the first part stays whole. OCI chunked `PATCH`es (`Content-Range`)
/// are already short and are left alone.
pub fn is_splittable(
    method: &Method,
    api: &ApiPath,
    headers: &HeaderMap,
    body_ends: bool,
    mode: UploadSplit,
    chunk_max: Option<u64>,
) -> bool {
    if mode == UploadSplit::Never || body_ends || !api.is_upload() {
        return false;
    }
    let length = content_length(headers);
    let candidate = match *method {
        Method::PATCH => !headers.contains_key(header::CONTENT_RANGE),
        Method::PUT => length.is_none_or(|n| n > PUT_SPLIT_THRESHOLD_BYTES),
        _ => false,
    };
    let fits_whole =
        mode == UploadSplit::Auto && length.is_some_and(|n| n <= first_part(chunk_max));
    candidate && !fits_whole
}

fn first_part(chunk_max: Option<u64>) -> u64 {
    chunk_max.map_or(FIRST_PART_BYTES, |m| m.min(FIRST_PART_BYTES))
}

/// The length of the next exact-length part: the first is [`FIRST_PART_BYTES`]; later ones
/// carry what the measured rate moves in half the token's fresh life, at least
/// [`MIN_PART_BYTES`], at most `chunk_max` and what is left.
pub fn next_part_len(
    left: u64,
    rate: Option<f64>,
    budget: Duration,
    chunk_max: Option<u64>,
) -> u64 {
    let want = match rate {
        None => FIRST_PART_BYTES,
        Some(r) => ((r * budget.as_secs_f64() / 2.0) as u64).max(MIN_PART_BYTES),
    };
    want.min(chunk_max.unwrap_or(u64::MAX)).min(left).max(1)
}

/// How one part of an upload ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// After `budget`, or `max` bytes, whichever first (sent chunked).
    Time {
        /// Time the part may take.
        budget: Duration,
        /// Bytes it may carry.
        max: Option<u64>,
    },
    /// After exactly this many bytes (sent with that `Content-Length`).
    Exact(u64),
}

/// Forwards one client upload of a sealed session in parts, each with a fresh token.
pub struct Uploader<'a> {
    /// The registry.
    pub upstream: &'a Upstream,
    /// Sessions and their tokens.
    pub access: &'a Access,
    /// The request's forwarding facts.
    pub fwd: &'a Forward<'a>,
    /// `--upload-chunk-max`.
    pub chunk_max: Option<u64>,
    /// `--upload-split`.
    pub mode: UploadSplit,
    /// Becomes `true` at the upload drain deadline (see the module docs).
    pub cut: watch::Receiver<bool>,
}

impl Uploader<'_> {
    /// A long upload in parts: each `PATCH` ends when its cut says (see [`Cut`]) and the next one
    /// continues the same upload session with a fresh token; a `PUT` with a body ends with a
    /// bodiless `PUT ?digest=`. The client gets the registry's last answer.
    pub async fn forward(
        &self,
        req: Request<Incoming>,
        api: &ApiPath,
        session: &Session,
    ) -> Result<Response<ProxyBody>, Error> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().to_owned();
        let digest = digest_param(parts.uri.query()).map(str::to_owned);
        let first = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut target = (self.upstream.origin().clone(), with_digest(first, None));
        let exact = match self.mode {
            UploadSplit::Always => None,
            _ => content_length(&parts.headers),
        };
        let headers = part_headers(&parts.headers);
        let hard_cap = session.iat + MAX_SESSION_LIFETIME.as_secs();

        let mut source = Source::new(body, self.fwd.idle);
        let (mut count, mut rate) = (0u32, None::<f64>);
        let mut last_token: Option<HeaderValue> = None;
        let metrics = self.access.metrics();
        loop {
            if unix_now() > hard_cap {
                return Err(Error::Unauthorized {
                    reason: "the upload outlived the session's hard cap".into(),
                    challenge: self
                        .access
                        .challenge_for(&Method::PATCH, api, self.fwd.public),
                });
            }
            let token = self
                .access
                .upstream_token(session, self.fwd, &Method::PATCH, api)
                .await?;
            let budget = token
                .remaining(Instant::now())
                .saturating_sub(refresh_margin(token.lifetime))
                .max(MIN_PART);
            let cut = match exact {
                Some(total) => Cut::Exact(next_part_len(
                    total - source.sent,
                    rate,
                    budget,
                    self.chunk_max,
                )),
                None => Cut::Time {
                    budget,
                    max: self.chunk_max,
                },
            };
            let before = source.sent;
            let (mut segment, back) = Segment::new(source, cut);
            segment.stop_on(self.cut.clone());
            let mut req = part_request(Method::PATCH, &target.1, headers.clone(), segment)?;
            if let Cut::Exact(n) = cut {
                req.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
            req.headers_mut()
                .insert(header::AUTHORIZATION, token.header.clone());
            metrics.upload_parts.inc();
            let refreshed = last_token.as_ref().is_some_and(|t| *t != token.header);
            if refreshed {
                metrics.upload_token_refreshes.inc();
            }
            self.fwd.notes.part(refreshed);
            last_token = Some(token.header.clone());
            let started = Instant::now();
            let resp = proxy::forward_to(self.upstream, &target.0, req, self.fwd).await;
            source = back.await.map_err(|_| Error::UploadInterrupted {
                reason: "the client's stream was lost between parts",
            })?;
            if source.cut {
                return Err(cut_with_linger(source, self.access.metrics()));
            }
            let resp = resp.map_err(|e| part_failed(e, count))?;
            count += 1;
            let secs = started.elapsed().as_secs_f64().max(0.001);
            rate = Some((source.sent - before) as f64 / secs);
            if resp.status() != StatusCode::ACCEPTED {
                tracing::warn!(path = %path, part = count, status = resp.status().as_u16(), "registry refused an upload part");
                if resp.status() == StatusCode::UNAUTHORIZED {
                    self.access.invalidate(session, &token);
                }
                return Ok(resp);
            }
            let next = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| next_target(l, self.upstream.origin(), self.fwd.public))
                .ok_or(Error::UpstreamProtocol {
                    reason: "the registry accepted an upload part (202) without a Location",
                })?;
            if !source.is_done() {
                if *self.cut.borrow() {
                    // The cut came between parts.
                    return Err(cut_with_linger(source, self.access.metrics()));
                }
                target = next;
                continue;
            }
            if count > 1 {
                tracing::info!(path = %path, parts = count, bytes = source.sent, "upload sent in parts");
            }
            if parts.method != Method::PUT {
                return Ok(resp);
            }
            drop(resp);
            return self
                .finish(next, digest.as_deref(), &headers, session, api)
                .await;
        }
    }

    /// The bodiless `PUT ?digest=` that ends a `PUT` sent as parts.
    async fn finish(
        &self,
        (origin, pq): (Origin, String),
        digest: Option<&str>,
        headers: &HeaderMap,
        session: &Session,
        api: &ApiPath,
    ) -> Result<Response<ProxyBody>, Error> {
        let token = self
            .access
            .upstream_token(session, self.fwd, &Method::PUT, api)
            .await?;
        let mut put = part_request(
            Method::PUT,
            &with_digest(&pq, digest),
            headers.clone(),
            body::empty(),
        )?;
        put.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        put.headers_mut()
            .insert(header::AUTHORIZATION, token.header.clone());
        proxy::forward_to(self.upstream, &origin, put, self.fwd).await
    }
}

/// A part that failed on the way: the client must restart the blob (regrelay keeps no copy of
/// what it already sent, and the registry's upload state cannot be re-read safely).
fn part_failed(err: Error, parts_done: u32) -> Error {
    if parts_done == 0 || err.blame() != crate::error::Blame::Upstream {
        return err;
    }
    tracing::warn!(error = %err.chain(), part = parts_done + 1, "an upload part failed");
    Error::UploadInterrupted {
        reason: "the registry connection failed during a part; regrelay keeps no copy of the \
                 bytes already sent, so retry the push (the registry stored nothing corrupt)",
    }
}

/// The answer for an upload cut at the drain deadline; the rest of the body is read meanwhile.
fn cut_with_linger(source: Source, metrics: &crate::metrics::Metrics) -> Error {
    metrics.uploads_cut.inc();
    let sent = source.sent;
    tracing::warn!(
        sent,
        "upload drain over: upload cut; the client is told to restart it (another replica takes it)"
    );
    linger(source);
    Error::UploadCut { sent }
}

/// Reads and drops the rest of a cut upload's body for [`CUT_LINGER`], in the background.
fn linger(source: Source) {
    use http_body_util::BodyExt;
    let mut body = source.body;
    tokio::spawn(async move {
        let drain = async { while let Some(Ok(_)) = body.frame().await {} };
        let _ = tokio::time::timeout(CUT_LINGER, drain).await;
    });
}

/// The client's body between parts, with what has been read of it and when data last came.
pub struct Source {
    body: Incoming,
    pending: Option<Bytes>,
    done: bool,
    idle: Duration,
    last_data: Instant,
    /// Data bytes handed to upstream parts so far.
    pub sent: u64,
    /// The upload drain deadline ended the part in flight.
    pub cut: bool,
}

impl Source {
    /// Wraps the client's request body; silence longer than `idle`, across parts, fails it.
    pub fn new(body: Incoming, idle: Duration) -> Source {
        Source {
            body,
            pending: None,
            done: false,
            idle,
            last_data: Instant::now(),
            sent: 0,
            cut: false,
        }
    }

    /// True once the client's body has ended (or, with a known length, is fully read).
    pub fn is_done(&self) -> bool {
        self.pending.is_none() && (self.done || self.body.is_end_stream())
    }
}

/// One upstream part of a client upload: the client's frames until `deadline` passes, `max`
/// bytes were sent, or the client's body ends; then the [`Source`] goes back through a oneshot
/// (also when the upstream request is dropped early, e.g. answered before its body was read).
pub struct Segment {
    source: Option<Source>,
    deadline: Option<Pin<Box<Sleep>>>,
    /// Resolves when the upload drain deadline is reached.
    stop: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    idle: Pin<Box<Sleep>>,
    left: Option<u64>,
    back: Option<oneshot::Sender<Source>>,
}

impl Segment {
    /// A part that ends as `cut` says. The receiver yields the source afterwards.
    pub fn new(source: Source, cut: Cut) -> (Segment, oneshot::Receiver<Source>) {
        let (tx, rx) = oneshot::channel();
        let (deadline, left) = match cut {
            Cut::Time { budget, max } => (Some(Box::pin(tokio::time::sleep(budget))), max),
            Cut::Exact(n) => (None, Some(n)),
        };
        let idle = Box::pin(tokio::time::sleep_until(source.last_data + source.idle));
        let seg = Segment {
            source: Some(source),
            deadline,
            stop: None,
            idle,
            left,
            back: Some(tx),
        };
        (seg, rx)
    }

    /// Also ends (marking the source as cut) when `cut` becomes `true`: a part of unknown length
    /// ends cleanly there; a part of exact length cannot, and fails (the registry keeps none of
    /// it).
    pub fn stop_on(&mut self, mut cut: watch::Receiver<bool>) {
        self.stop = Some(Box::pin(async move {
            if cut.wait_for(|c| *c).await.is_err() {
                // The server is gone without a cut: nothing will stop this part.
                std::future::pending::<()>().await;
            }
        }));
    }

    fn finish(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let (Some(src), Some(tx)) = (self.source.take(), self.back.take()) {
            let _ = tx.send(src);
        }
        Poll::Ready(None)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

impl Body for Segment {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(src) = this.source.as_mut() else {
            return Poll::Ready(None);
        };
        let timed_out = this
            .deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready());
        if src.is_done() || this.left == Some(0) || timed_out {
            return this.finish();
        }
        if this
            .stop
            .as_mut()
            .is_some_and(|s| s.as_mut().poll(cx).is_ready())
        {
            src.cut = true;
            if this.left.is_some() {
                return Poll::Ready(Some(Err("cut at the upload drain deadline".into())));
            }
            return this.finish();
        }
        let mut data = match src.pending.take() {
            Some(d) => d,
            None => match Pin::new(&mut src.body).poll_frame(cx) {
                Poll::Pending => {
                    // Silence is counted from the last data, whichever part it fell in.
                    let at = src.last_data + src.idle;
                    if this.idle.deadline() != at {
                        this.idle.as_mut().reset(at);
                    }
                    if this.idle.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Err(Box::new(IdleTimeout(src.idle)))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    src.done = true;
                    return this.finish();
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(d) => d,
                    // Trailers: the registry uses none; keep reading.
                    Err(_) => {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                },
            },
        };
        if let Some(left) = this.left.as_mut() {
            if data.len() as u64 > *left {
                src.pending = Some(data.split_off(*left as usize));
            }
            *left -= data.len() as u64;
        }
        src.sent += data.len() as u64;
        src.last_data = Instant::now();
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.source.as_ref().is_none_or(Source::is_done)
    }
}

/// Where the next part goes, from an upload `Location`: relative, or on the public origin (the
/// registry's own, already rewritten), it is the upstream; any other origin (object storage) is
/// its own target.
pub fn next_target(location: &str, upstream: &Origin, public: &Origin) -> Option<(Origin, String)> {
    let uri: Uri = location.parse().ok()?;
    let pq = uri.path_and_query()?.as_str().to_owned();
    let origin = match Origin::of(&uri) {
        None => upstream.clone(),
        Some(o) if o.same_as(public) || o.same_as(upstream) => upstream.clone(),
        Some(o) => o,
    };
    Some((origin, pq))
}

/// `target` without its `digest=` parameter, plus `digest` when given.
pub fn with_digest(target: &str, digest: Option<&str>) -> String {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut params: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("digest="))
        .collect();
    let d;
    if let Some(digest) = digest {
        d = format!("digest={digest}");
        params.push(&d);
    }
    if params.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", params.join("&"))
    }
}

/// The `digest=` value of a query, still percent-encoded as the client sent it.
pub fn digest_param(query: Option<&str>) -> Option<&str> {
    query?.split('&').find_map(|p| p.strip_prefix("digest="))
}

/// Headers for a part: the client's, without framing, range and credential headers (each part
/// sets its own length, or goes chunked, and its own token).
pub fn part_headers(client: &HeaderMap) -> HeaderMap {
    let mut h = client.clone();
    h.remove(header::CONTENT_LENGTH);
    h.remove(header::CONTENT_RANGE);
    h.remove(header::AUTHORIZATION);
    h
}

/// A request for one part.
pub fn part_request<B>(
    method: Method,
    target: &str,
    headers: HeaderMap,
    body: B,
) -> Result<Request<B>, http::Error> {
    let mut req = Request::builder().method(method).uri(target).body(body)?;
    *req.headers_mut() = headers;
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splittable_table() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            m
        };
        let up = "/v2/g/p/blobs/uploads/abc";
        let (auto, always, never) = (UploadSplit::Auto, UploadSplit::Always, UploadSplit::Never);
        let big = "20971520";
        let cases = [
            (Method::PATCH, up, h(&[]), false, auto, None, true),
            (Method::PATCH, up, h(&[]), false, never, None, false),
            (
                Method::PATCH,
                up,
                h(&[("content-range", "0-99"), ("content-length", "100")]),
                false,
                auto,
                None,
                false,
            ),
            (Method::PATCH, up, h(&[]), true, auto, None, false),
            // A length that fits in the first part keeps it, and goes whole.
            (
                Method::PATCH,
                up,
                h(&[("content-length", "2097152")]),
                false,
                auto,
                None,
                false,
            ),
            (
                Method::PATCH,
                up,
                h(&[("content-length", "2097152")]),
                false,
                always,
                None,
                true,
            ),
            (
                Method::PATCH,
                up,
                h(&[("content-length", "2097152")]),
                false,
                auto,
                Some(1 << 20),
                true,
            ),
            (
                Method::PATCH,
                up,
                h(&[("content-length", big)]),
                false,
                auto,
                None,
                true,
            ),
            (
                Method::PUT,
                up,
                h(&[("content-length", big)]),
                false,
                auto,
                None,
                true,
            ),
            (
                Method::PUT,
                up,
                h(&[("content-length", "2097152")]),
                false,
                always,
                None,
                true,
            ),
            (
                Method::PUT,
                up,
                h(&[("content-length", "1024")]),
                false,
                always,
                None,
                false,
            ),
            (Method::PUT, up, h(&[]), false, auto, None, true),
            (
                Method::PUT,
                "/v2/g/p/manifests/v1",
                h(&[]),
                false,
                auto,
                None,
                false,
            ),
            (
                Method::POST,
                "/v2/g/p/blobs/uploads/",
                h(&[]),
                false,
                auto,
                None,
                false,
            ),
        ];
        for (m, p, headers, ends, mode, max, want) in cases {
            assert_eq!(
                is_splittable(&m, &ApiPath::parse(p).unwrap(), &headers, ends, mode, max),
                want,
                "{m} {p} {headers:?} {mode:?} {max:?}"
            );
        }
    }

    #[test]
    fn exact_parts_fit_the_rate_and_the_bounds() {
        let b = Duration::from_secs(240);
        let cases = [
            (100 << 20, None, b, None, FIRST_PART_BYTES),
            (100 << 20, None, b, Some(1 << 20), 1 << 20),
            (3, None, b, None, 3),
            // 288 KiB/s with 3 s of fresh life: below the floor, so 1 MiB.
            (
                100 << 20,
                Some(288.0 * 1024.0),
                Duration::from_secs(3),
                None,
                MIN_PART_BYTES,
            ),
            // 100 MB/s with 240 s: 12 GB wanted, capped by what is left.
            (1 << 30, Some(100e6), b, None, 1 << 30),
            (1 << 30, Some(100e6), b, Some(50 << 20), 50 << 20),
        ];
        for (left, rate, budget, max, want) in cases {
            assert_eq!(
                next_part_len(left, rate, budget, max),
                want,
                "{left} {rate:?} {max:?}"
            );
        }
    }

    #[test]
    fn targets_and_digests() {
        let up = Origin::parse("registry", "http://r:5000").unwrap();
        let public = Origin::parse("public_url", "https://px.example.com").unwrap();
        let store = Origin::parse("registry", "https://bucket.s3.example.com").unwrap();
        let cases = [
            (
                "https://px.example.com/v2/g/p/blobs/uploads/u?_state=abc",
                &up,
                "/v2/g/p/blobs/uploads/u?_state=abc",
            ),
            (
                "http://r:5000/v2/g/p/blobs/uploads/u?_state=abc",
                &up,
                "/v2/g/p/blobs/uploads/u?_state=abc",
            ),
            ("/v2/g/p/blobs/uploads/u", &up, "/v2/g/p/blobs/uploads/u"),
            (
                "https://bucket.s3.example.com/up/u?sig=1",
                &store,
                "/up/u?sig=1",
            ),
        ];
        for (loc, origin, pq) in cases {
            let (o, p) = next_target(loc, &up, &public).unwrap();
            assert!(o.same_as(origin) && p == pq, "{loc}: {o} {p}");
        }
        let t = "/v2/g/p/blobs/uploads/u?_state=s&digest=sha256%3Aab";
        assert_eq!(
            digest_param(Some("_state=s&digest=sha256%3Aab")),
            Some("sha256%3Aab")
        );
        assert_eq!(with_digest(t, None), "/v2/g/p/blobs/uploads/u?_state=s");
        assert_eq!(
            with_digest("/u?_state=t", Some("sha256:cd")),
            "/u?_state=t&digest=sha256:cd"
        );
        assert_eq!(with_digest("/u?digest=x", None), "/u");
    }
}
