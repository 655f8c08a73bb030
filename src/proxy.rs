//! Forwarding one registry request to the upstream and its answer back, as streams.
//!
//! The request keeps its method, path, query, body and end-to-end headers; hop-by-hop headers go
//! (RFC 9110 §7.6.1), `Host` becomes the upstream's, and `X-Forwarded-For/-Proto/-Host` tell the
//! registry who asked and under which name, so the absolute `Location`s it builds point back at
//! regrelay. What a client claims in `X-Forwarded-*` and `Forwarded` is replaced, unless the peer
//! is a `--trusted-proxies` address (then the list is appended to). `Location`s that still name
//! the upstream origin are rewritten to the public origin; any other origin (object storage)
//! passes untouched and is never followed here. `Set-Cookie` from upstream never reaches clients:
//! registry clients have no use for it, and a cookie set for regrelay's name is a session-fixation
//! risk.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, Version};
use http_body_util::BodyExt;

use crate::body::{ProxyBody, Watched};
use crate::clients::X_FORWARDED_FOR;
use crate::config::Origin;
use crate::error::Error;
use crate::upstream::Upstream;

/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `Forwarded` (RFC 7239).
pub static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the de-facto ones proxies strip, and
/// `Transfer-Encoding` (hyper re-frames the body: chunked when no `Content-Length` is known).
/// Parsed once: removing by `&str` parsed every name on every request (~6k instructions).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including those the `Connection` header names. One pass over
/// the (few) headers present finds them; most requests carry none but `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut doomed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    doomed.extend(headers.keys().filter(|k| HOP_BY_HOP.contains(k)).cloned());
    for name in doomed {
        headers.remove(name);
    }
}

/// What the proxy knows about the request beyond its headers.
pub struct Forward<'a> {
    /// The client's address.
    pub peer: std::net::IpAddr,
    /// Whether the peer is a trusted proxy (its forwarding headers are kept).
    pub trusted: bool,
    /// The `X-Forwarded-For` the upstream and the token service get.
    pub forwarded_for: String,
    /// The origin the client used (public URL if configured, else Host + scheme).
    pub public: &'a Origin,
    /// Body idle timeout.
    pub idle: Duration,
    /// Receives the count of request body bytes.
    pub bytes_in: Arc<AtomicU64>,
    /// What the handling learns for the access line.
    pub notes: Arc<crate::telemetry::Notes>,
    /// The client, whose share of upstream connections the request's own take
    /// ([`crate::clients`]); `None` outside the server (no share).
    pub client: Option<crate::clients::ClientHandle>,
}

/// Forwards `req` to `upstream` and streams the answer back.
pub async fn forward<B>(
    upstream: &Upstream,
    req: Request<B>,
    fwd: &Forward<'_>,
) -> Result<Response<ProxyBody>, Error>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<crate::error::BoxError>,
{
    forward_to(upstream, upstream.origin(), req, fwd).await
}

/// Forwards `req` to `target`, an origin the upstream named (an upload `Location` on object
/// storage, say): when it is not the upstream itself, `Authorization` does not go with it.
pub async fn forward_to<B>(
    upstream: &Upstream,
    target: &Origin,
    req: Request<B>,
    fwd: &Forward<'_>,
) -> Result<Response<ProxyBody>, Error>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<crate::error::BoxError>,
{
    let (mut parts, body) = req.into_parts();
    prepare_request(&mut parts, target, fwd)?;
    if !target.same_as(upstream.origin()) {
        parts.headers.remove(header::AUTHORIZATION);
    }
    let body = Watched::client(body, fwd.idle, fwd.bytes_in.clone()).boxed_unsync();
    let resp = upstream.send(Request::from_parts(parts, body)).await?;
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::SET_COOKIE);
    rewrite_location(&mut parts.headers, upstream.origin(), fwd.public);
    let body = Watched::new(body, fwd.idle, None).boxed_unsync();
    Ok(Response::from_parts(parts, body))
}

fn prepare_request(parts: &mut Parts, upstream: &Origin, fwd: &Forward<'_>) -> Result<(), Error> {
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    // hyper answers `100 Continue` to the client when the body is first read, i.e. once the
    // upstream request is under way; the upstream leg needs no Expect of its own.
    headers.remove(header::EXPECT);
    headers.insert(&X_FORWARDED_FOR, header_value(&fwd.forwarded_for)?);
    if !fwd.trusted || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(
            &X_FORWARDED_PROTO,
            header_value(fwd.public.scheme().as_str())?,
        );
    }
    if !fwd.trusted || !headers.contains_key(&X_FORWARDED_HOST) {
        headers.insert(
            &X_FORWARDED_HOST,
            header_value(fwd.public.authority().as_str())?,
        );
    }
    if !fwd.trusted {
        headers.remove(&FORWARDED);
    }
    headers.insert(header::HOST, header_value(upstream.authority().as_str())?);
    let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    parts.uri = upstream.join(pq)?;
    // The upstream leg is HTTP/1.1 whatever the client spoke (h2 clients included).
    parts.version = Version::HTTP_11;
    Ok(())
}

/// `X-Forwarded-For` for a request from `peer`: just `peer`, or, from a trusted proxy, the
/// list it sent with `peer` appended. A client cannot choose the address GitLab and the
/// registry see (GitLab rate-limits and bans failed logins by it).
pub fn forwarded_for(headers: &HeaderMap, peer: std::net::IpAddr, trusted: bool) -> String {
    let mut xff = String::with_capacity(48);
    if trusted {
        let prior = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok());
        for (i, value) in prior.enumerate() {
            if i > 0 {
                xff.push_str(", ");
            }
            xff.push_str(value);
        }
        // The list, when it says anything (an empty header adds nothing), then `peer`.
        if !xff.is_empty() {
            xff.push_str(", ");
        }
    }
    crate::telemetry::push_ip(&mut xff, peer);
    xff
}

/// A header value from a string built here (addresses, origins).
pub fn header_value(s: &str) -> Result<HeaderValue, Error> {
    HeaderValue::from_str(s).map_err(|e| Error::Internal(e.into()))
}

/// Rewrites an absolute `Location` on the upstream origin to the public origin, keeping path and
/// query. Relative locations and other origins (object storage redirects) are left alone.
pub fn rewrite_location(headers: &mut HeaderMap, upstream: &Origin, public: &Origin) {
    let Some(loc) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) else {
        return;
    };
    let Ok(uri) = loc.parse::<http::Uri>() else {
        return;
    };
    let Some(origin) = Origin::of(&uri) else {
        return;
    };
    if !origin.same_as(upstream) {
        return;
    }
    let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
    if let Ok(new) = public.join(pq).map(|u| u.to_string()) {
        if let Ok(v) = HeaderValue::from_str(&new) {
            headers.insert(header::LOCATION, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(s: &str) -> Origin {
        Origin::parse("registry", s).unwrap()
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("docker-upload-uuid", HeaderValue::from_static("u"));
        h.insert("content-range", HeaderValue::from_static("0-9"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-range", "docker-upload-uuid"]);
    }

    #[test]
    fn forwarded_for_is_replaced_unless_the_peer_is_trusted() {
        let mut h = HeaderMap::new();
        let peer: std::net::IpAddr = "192.0.2.9".parse().unwrap();
        assert_eq!(forwarded_for(&h, peer, false), "192.0.2.9");
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        assert_eq!(forwarded_for(&h, peer, false), "192.0.2.9");
        assert_eq!(forwarded_for(&h, peer, true), "6.6.6.6, 192.0.2.9");
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        assert_eq!(
            forwarded_for(&h, peer, true),
            "6.6.6.6, 10.0.0.1, 192.0.2.9"
        );
        // A trusted front's empty header adds no empty entry.
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static(""));
        assert_eq!(forwarded_for(&h, peer, true), "192.0.2.9");
    }

    #[test]
    fn location_rewrite_table() {
        let up = origin("http://127.0.0.1:5001");
        let public = origin("https://registry.example.com");
        let cases = [
            (
                "http://127.0.0.1:5001/v2/g/p/blobs/uploads/u?_state=s",
                "https://registry.example.com/v2/g/p/blobs/uploads/u?_state=s",
            ),
            ("/v2/g/p/blobs/uploads/u", "/v2/g/p/blobs/uploads/u"),
            (
                "https://bucket.s3.amazonaws.com/blob?X-Amz-Signature=1",
                "https://bucket.s3.amazonaws.com/blob?X-Amz-Signature=1",
            ),
            ("http://127.0.0.1:5002/v2/", "http://127.0.0.1:5002/v2/"),
        ];
        for (from, to) in cases {
            let mut h = HeaderMap::new();
            h.insert(header::LOCATION, HeaderValue::from_str(from).unwrap());
            rewrite_location(&mut h, &up, &public);
            assert_eq!(h[header::LOCATION], to, "{from}");
        }
    }
}
