//! Following a registry's redirect to object storage, for the pull-through cache.
//!
//! Registries that keep blobs in S3, GCS or Azure answer a blob `GET` **and `HEAD`** with a
//! redirect (`307`; `302`, `303` and `308` mean the same here) to a presigned URL on the object
//! store: a bearer capability for a few minutes, signed for that one method. Given to the
//! client's own token, that answer is the registry's yes, as a `200` is. With `--cache-dir`
//! regrelay follows it itself, so that it can verify and store the blob and serve later pulls
//! without asking the object store again; without the cache the redirect goes to the client
//! untouched ([`crate::proxy`]).
//!
//! This room:
//! - recognizes such a redirect ([`Presigned::take`]): a `Location` on another origin than the
//!   registry's (and regrelay's public one), taken out of the registry's answer;
//! - follows it ([`follow`]) through at most [`MAX_HOPS`] redirects in all, absolute http(s) URLs
//!   (or paths on the same origin) only, with no header of the client but `Range`: never
//!   `Authorization`, a cookie, or anything else that carries credentials;
//! - builds the client's answer from the registry's headers and the object store's framing
//!   ([`client_response`]): never the store's other headers, never the URL.
//!
//! It does not decide who may pull (that is [`crate::app`]'s, with the client's own token), fill
//! the cache, or keep the URL: a [`Presigned`] has no `Display`, its `Debug` shows the origin
//! only, and it lives only as long as the request that follows it. Nothing here logs it.

use std::fmt;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;

use super::Digest;
use crate::body::{self, ProxyBody, Watched};
use crate::config::Origin;
use crate::error::Error;
use crate::upstream::{Upstream, UpstreamBody};

/// Redirects followed for one read, the registry's included: object stores redirect once more
/// at most in practice (S3 to a bucket's region), and a loop must end.
pub const MAX_HOPS: usize = 3;

/// `Docker-Distribution-Api-Version`.
static API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");
/// `Docker-Content-Digest`.
static CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

/// A presigned URL the registry redirected a read to. Never printed: its query is a credential.
pub struct Presigned {
    uri: Uri,
    origin: Origin,
}

impl fmt::Debug for Presigned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Presigned({}/…)", self.origin)
    }
}

impl Presigned {
    /// When `status` is a redirect whose `Location` is on another origin than `upstream` and
    /// `public`, takes the `Location` out of `headers` and returns it; a `Location` on those
    /// origins (or relative) stays where it is (`None`). A redirect elsewhere that cannot be
    /// followed (another scheme, credentials in the URL) is an error: handing it to the client
    /// would give away the URL.
    pub fn take(
        status: StatusCode,
        headers: &mut HeaderMap,
        upstream: &Origin,
        public: &Origin,
    ) -> Result<Option<Presigned>, Error> {
        if !matches!(status.as_u16(), 302 | 303 | 307 | 308) {
            return Ok(None);
        }
        let Some(uri) = headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Uri>().ok())
        else {
            return Ok(None);
        };
        if uri.authority().is_none() {
            return Ok(None);
        }
        if let Some(o) = Origin::of(&uri) {
            if o.same_as(upstream) || o.same_as(public) {
                return Ok(None);
            }
        }
        let presigned = Presigned::new(uri).ok_or(Error::UpstreamProtocol {
            reason: "the registry redirected a blob read to a URL that is not plain http(s) \
                     (or that carries credentials); regrelay does not follow it",
        })?;
        headers.remove(header::LOCATION);
        Ok(Some(presigned))
    }

    /// An absolute http(s) URL without userinfo.
    fn new(uri: Uri) -> Option<Presigned> {
        let origin = Origin::of(&uri)?;
        if uri.authority()?.as_str().contains('@') {
            return None;
        }
        Some(Presigned { uri, origin })
    }

    /// Where a redirect from this URL goes: an absolute http(s) URL, or a path on this origin.
    fn next(&self, headers: &HeaderMap) -> Option<Presigned> {
        let location = headers.get(header::LOCATION)?.to_str().ok()?;
        if location.starts_with('/') && !location.starts_with("//") {
            let uri = self.origin.join(location).ok()?;
            return Presigned::new(uri);
        }
        Presigned::new(location.parse().ok()?)
    }

    /// The object store's origin (no path, no query).
    pub fn origin(&self) -> &Origin {
        &self.origin
    }
}

/// Reads `to` with `method` (the registry's URL is signed for the method it was asked with) and
/// `range`, following the object store's own redirects. Its answer when it is 200, 206 or 416;
/// any other status is an error: the URL was refused (expired, signed for something else) or
/// the object is missing.
pub async fn follow(
    upstream: &Upstream,
    to: Presigned,
    method: &Method,
    range: Option<&HeaderValue>,
) -> Result<Response<UpstreamBody>, Error> {
    let mut at = to;
    // The registry's redirect was the first.
    let mut hops = 1;
    loop {
        let resp = read(upstream, &at, method, range).await?;
        let status = resp.status().as_u16();
        match status {
            200 | 206 | 416 => return Ok(resp),
            301 | 302 | 303 | 307 | 308 if hops < MAX_HOPS => {
                at = at.next(resp.headers()).ok_or_else(|| {
                    failed(
                        &at,
                        "redirected to a URL regrelay does not follow (only http(s) URLs \
                         without credentials); check the registry's storage configuration"
                            .into(),
                    )
                })?;
                hops += 1;
            }
            301 | 302 | 303 | 307 | 308 => {
                let problem = format!(
                    "redirected more than {MAX_HOPS} times; check the registry's storage \
                     configuration (region, endpoint)"
                );
                return Err(failed(&at, problem));
            }
            // The body goes unread, to no one: S3's `SignatureDoesNotMatch` echoes the
            // canonical request, query included.
            _ => {
                let problem = format!(
                    "answered {status}; the presigned URL was refused or the object is \
                     missing: check the registry's storage credentials, its clock, and the \
                     bucket's policy"
                );
                return Err(failed(&at, problem));
            }
        }
    }
}

/// One request to the object store: `method`, the URL, `Range` when given, and nothing else.
/// `Host` is the URL's (hyper sets it), as the signature expects.
async fn read(
    upstream: &Upstream,
    at: &Presigned,
    method: &Method,
    range: Option<&HeaderValue>,
) -> Result<Response<UpstreamBody>, Error> {
    let mut req = Request::new(body::empty());
    *req.method_mut() = method.clone();
    *req.uri_mut() = at.uri.clone();
    if let Some(range) = range {
        req.headers_mut().insert(header::RANGE, range.clone());
    }
    upstream.send(req).await.map_err(|e| match e {
        Error::UpstreamUnreachable { source, .. } => Error::ObjectStorage {
            origin: at.origin.to_string(),
            problem: "could not be reached; check that regrelay can reach it (network, DNS, \
                      proxy, TLS trust)"
                .into(),
            source: Some(source),
        },
        Error::UpstreamFailed { source, .. } => Error::ObjectStorage {
            origin: at.origin.to_string(),
            problem: "failed while answering; see regrelay's log".into(),
            source: Some(source),
        },
        other => other,
    })
}

fn failed(at: &Presigned, problem: String) -> Error {
    Error::ObjectStorage {
        origin: at.origin.to_string(),
        problem,
        source: None,
    }
}

/// The client's answer for `digest` from the object store's `object` answer ([`follow`]): its
/// status and body (watched for silence longer than `idle`), with [`client_headers`].
pub fn client_response(
    registry: &HeaderMap,
    object: Response<UpstreamBody>,
    digest: &Digest,
    idle: Duration,
) -> Response<ProxyBody> {
    let (parts, body) = object.into_parts();
    let mut resp = Response::new(Watched::new(body, idle, None).boxed_unsync());
    *resp.status_mut() = parts.status;
    *resp.headers_mut() = client_headers(registry, &parts.headers, digest);
    resp
}

/// The headers a client gets for `digest` read from object storage: the registry's own
/// (`Content-Type`, API version), the object store's framing (`Content-Length`,
/// `Content-Range`, `Accept-Ranges`, `Last-Modified`), and the digest. Nothing else of the
/// object store's (its `x-amz-*` and the like, cookies) and never a `Location`.
pub fn client_headers(registry: &HeaderMap, object: &HeaderMap, digest: &Digest) -> HeaderMap {
    let mut out = HeaderMap::new();
    let content_type = registry.get(header::CONTENT_TYPE).cloned();
    out.insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Some(v) = registry.get(&API_VERSION) {
        out.insert(API_VERSION.clone(), v.clone());
    }
    for name in [
        header::CONTENT_LENGTH,
        header::CONTENT_RANGE,
        header::ACCEPT_RANGES,
        header::LAST_MODIFIED,
    ] {
        if let Some(v) = object.get(&name) {
            out.insert(name, v.clone());
        }
    }
    let digest = digest.to_string();
    if let Ok(v) = HeaderValue::from_str(&digest) {
        out.insert(CONTENT_DIGEST.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        out.insert(header::ETAG, v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(s: &str) -> Origin {
        Origin::parse("registry", s).unwrap()
    }

    fn location(status: u16, loc: &str) -> (Result<Option<Presigned>, Error>, HeaderMap) {
        let mut h = HeaderMap::new();
        h.insert(header::LOCATION, HeaderValue::from_str(loc).unwrap());
        let up = origin("http://registry:5000");
        let public = origin("https://regrelay.example");
        let status = StatusCode::from_u16(status).unwrap();
        (Presigned::take(status, &mut h, &up, &public), h)
    }

    #[test]
    fn redirects_to_another_origin_are_taken_out_of_the_answer() {
        let s3 = "https://bucket.s3.amazonaws.com/docker/blob?X-Amz-Signature=abc";
        for status in [302, 303, 307, 308] {
            let (taken, left) = location(status, s3);
            let p = taken.unwrap().expect("an object-store redirect");
            assert_eq!(p.uri, s3);
            assert!(!left.contains_key(header::LOCATION), "{status}");
            let debug = format!("{p:?}");
            assert_eq!(debug, "Presigned(https://bucket.s3.amazonaws.com/…)");
        }
    }

    #[test]
    fn other_answers_keep_their_location() {
        for (status, loc) in [
            (301, "https://bucket.s3.amazonaws.com/b"),
            (201, "https://bucket.s3.amazonaws.com/b"),
            (307, "http://registry:5000/v2/x/blobs/uploads/u"),
            (307, "https://regrelay.example/v2/x/blobs/uploads/u"),
            (307, "https://REGRELAY.example:443/v2/"),
            (307, "/v2/x/blobs/sha256:abc"),
            (307, "not a url at all"),
        ] {
            let (taken, left) = location(status, loc);
            assert!(taken.unwrap().is_none(), "{status} {loc}");
            assert!(left.contains_key(header::LOCATION), "{status} {loc}");
        }
    }

    #[test]
    fn unusable_object_store_urls_are_refused_not_passed_on() {
        for loc in [
            "ftp://files.example/blob",
            "https://user:pw@bucket.example/b",
        ] {
            let (taken, _) = location(307, loc);
            let err = taken.unwrap_err();
            assert!(!err.to_string().contains("bucket.example"), "{err}");
            assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        }
    }

    #[test]
    fn later_hops_resolve_paths_on_the_same_origin_only() {
        let at = Presigned::new("http://store:9000/a/b?sig=1".parse().unwrap()).unwrap();
        let next = |loc: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::LOCATION, HeaderValue::from_str(loc).unwrap());
            at.next(&h).map(|p| p.uri.to_string())
        };
        assert_eq!(
            next("/c?sig=2").as_deref(),
            Some("http://store:9000/c?sig=2")
        );
        assert_eq!(
            next("https://eu.store/c?sig=3").as_deref(),
            Some("https://eu.store/c?sig=3")
        );
        assert_eq!(next("//evil.example/c"), None);
        assert_eq!(next("c?sig=2"), None);
        assert_eq!(next("file:///etc/passwd"), None);
        assert_eq!(next("http://u:p@store:9000/c"), None);
    }

    #[test]
    fn the_client_gets_the_registry_headers_the_framing_and_the_digest_only() {
        let digest = Digest::from_bytes([7; 32]);
        let mut registry = HeaderMap::new();
        registry.insert(
            API_VERSION.clone(),
            HeaderValue::from_static("registry/2.0"),
        );
        registry.insert(
            header::LOCATION,
            HeaderValue::from_static("https://b/x?sig=1"),
        );
        registry.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let mut object = HeaderMap::new();
        object.insert(header::CONTENT_LENGTH, HeaderValue::from_static("1234"));
        object.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        object.insert("x-amz-request-id", HeaderValue::from_static("r"));
        object.insert(header::SET_COOKIE, HeaderValue::from_static("a=b"));
        object.insert(header::LOCATION, HeaderValue::from_static("https://b/y"));
        let h = client_headers(&registry, &object, &digest);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "content-length",
                "content-type",
                "docker-content-digest",
                "docker-distribution-api-version",
                "etag"
            ]
        );
        assert_eq!(h[header::CONTENT_LENGTH], "1234");
        assert_eq!(h[header::CONTENT_TYPE], "application/octet-stream");
        assert_eq!(h[&CONTENT_DIGEST], digest.to_string().as_str());
    }
}
