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
//! Nothing is buffered: [`Segment`] passes the client's frames through and hands the stream back
//! when its part ends, so memory stays flat whatever the blob size.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Request, Uri};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::Sleep;

use crate::error::BoxError;

/// `PUT`s with a body up to this size are forwarded as they are (manifest-sized; they take no
/// time to send). Larger ones become `PATCH`es plus a bodiless `PUT`.
pub const PUT_SPLIT_THRESHOLD_BYTES: u64 = 1 << 20;
/// The shortest part regrelay sends, whatever the token's remaining life.
pub const MIN_PART: Duration = Duration::from_secs(1);

/// True for requests that may stream a blob for long: a `PATCH` without `Content-Range` (a
/// stream appended to the upload) and a `PUT` with more than [`PUT_SPLIT_THRESHOLD_BYTES`] (or an
/// unknown length) to an upload location. OCI chunked `PATCH`es (`Content-Range`) are already
/// short and are left alone.
pub fn is_splittable(method: &Method, path: &str, headers: &HeaderMap, body_ends: bool) -> bool {
    if body_ends || !path.contains("/blobs/uploads/") {
        return false;
    }
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match *method {
        Method::PATCH => !headers.contains_key(header::CONTENT_RANGE),
        Method::PUT => length.map_or(true, |n| n > PUT_SPLIT_THRESHOLD_BYTES),
        _ => false,
    }
}

/// The client's body between parts, with what has been read of it.
pub struct Source {
    body: Incoming,
    pending: Option<Bytes>,
    done: bool,
    /// Data bytes handed to upstream parts so far.
    pub sent: u64,
}

impl Source {
    /// Wraps the client's request body.
    pub fn new(body: Incoming) -> Source {
        Source {
            body,
            pending: None,
            done: false,
            sent: 0,
        }
    }

    /// True once the client's body has ended.
    pub fn is_done(&self) -> bool {
        self.done && self.pending.is_none()
    }
}

/// One upstream part of a client upload: the client's frames until `deadline` passes, `max`
/// bytes were sent, or the client's body ends; then the [`Source`] goes back through a oneshot
/// (also when the upstream request is dropped early, e.g. answered before its body was read).
pub struct Segment {
    source: Option<Source>,
    deadline: Pin<Box<Sleep>>,
    left: Option<u64>,
    back: Option<oneshot::Sender<Source>>,
}

impl Segment {
    /// A part that ends after `budget` or `max` bytes. The receiver yields the source afterwards.
    pub fn new(
        source: Source,
        budget: Duration,
        max: Option<u64>,
    ) -> (Segment, oneshot::Receiver<Source>) {
        let (tx, rx) = oneshot::channel();
        let seg = Segment {
            source: Some(source),
            deadline: Box::pin(tokio::time::sleep(budget)),
            left: max,
            back: Some(tx),
        };
        (seg, rx)
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
        if src.is_done() || this.left == Some(0) || this.deadline.as_mut().poll(cx).is_ready() {
            return this.finish();
        }
        let mut data = match src.pending.take() {
            Some(d) => d,
            None => match Pin::new(&mut src.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
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
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.source.as_ref().map_or(true, Source::is_done)
    }
}

/// The path and query of an upload `Location` (absolute or not), as the next part's target.
pub fn next_target(location: &str) -> Option<String> {
    let uri: Uri = location.parse().ok()?;
    uri.path_and_query().map(|pq| pq.as_str().to_owned())
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

/// Headers for a continued part: the client's, without framing and range headers (a part is
/// sent chunked; its length is not known in advance).
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

/// Bytes an upload holds, from the `Range: 0-<last>` of the registry's upload status (`0-0` is
/// ambiguous between 0 and 1 byte: both are returned).
pub fn stored_bytes(range: &str) -> Option<(u64, u64)> {
    let last: u64 = range.trim().strip_prefix("0-")?.parse().ok()?;
    Some(if last == 0 {
        (0, 1)
    } else {
        (last + 1, last + 1)
    })
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
        let cases = [
            (Method::PATCH, up, h(&[]), false, true),
            (
                Method::PATCH,
                up,
                h(&[("content-range", "0-99"), ("content-length", "100")]),
                false,
                false,
            ),
            (Method::PATCH, up, h(&[]), true, false),
            (
                Method::PUT,
                up,
                h(&[("content-length", "2097152")]),
                false,
                true,
            ),
            (
                Method::PUT,
                up,
                h(&[("content-length", "1024")]),
                false,
                false,
            ),
            (Method::PUT, up, h(&[]), false, true),
            (Method::PUT, "/v2/g/p/manifests/v1", h(&[]), false, false),
            (Method::POST, "/v2/g/p/blobs/uploads/", h(&[]), false, false),
        ];
        for (m, p, headers, ends, want) in cases {
            assert_eq!(
                is_splittable(&m, p, &headers, ends),
                want,
                "{m} {p} {headers:?}"
            );
        }
    }

    #[test]
    fn targets_and_digests() {
        assert_eq!(
            next_target("http://r:5000/v2/g/p/blobs/uploads/u?_state=abc").as_deref(),
            Some("/v2/g/p/blobs/uploads/u?_state=abc")
        );
        assert_eq!(
            next_target("/v2/g/p/blobs/uploads/u").as_deref(),
            Some("/v2/g/p/blobs/uploads/u")
        );
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

    #[test]
    fn stored_bytes_table() {
        for (range, want) in [
            ("0-0", Some((0, 1))),
            ("0-99", Some((100, 100))),
            (" 0-4095", Some((4096, 4096))),
            ("bytes=0-9", None),
            ("5-9", None),
            ("0-x", None),
        ] {
            assert_eq!(stored_bytes(range), want, "{range}");
        }
    }
}
