//! The fast origin: a minimal registry API served from memory, so that a front's per-request
//! and per-byte costs are not hidden behind a real registry's disk and hashing.
//!
//! - `GET|HEAD /v2/`: 200 `{}`.
//! - `GET|HEAD /v2/<name>/manifests/<ref>`: one small OCI manifest naming the big blob.
//! - `GET|HEAD /v2/<name>/blobs/<digest>`: a blob of a known size, sent as slices of one shared
//!   `Bytes` (no copy, no hashing); unknown digests get 404.
//! - `POST /v2/<name>/blobs/uploads/`: 202 with a `Location`; `PATCH` there drains the body (202);
//!   `PUT ?digest=` drains any body (201). Nothing is stored.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use regrelay::body::{self, ProxyBody};
use regrelay::error::BoxError;

use crate::support::upstream::drain;

/// Frames of a served blob.
const SLICE: usize = 256 * 1024;

/// What the origin serves.
pub struct Content {
    /// The bytes every blob is a prefix of.
    pub data: Bytes,
    /// Digest → length (a prefix of `data`).
    pub blobs: HashMap<String, u64>,
    /// The manifest body and its digest.
    pub manifest: (Bytes, String),
}

impl Content {
    /// Content with the given `(digest, length)` blobs (prefixes of `data`); the manifest names
    /// the first one as its layer.
    pub fn new(data: Bytes, blobs: &[(String, u64)]) -> Content {
        let (layer, layer_len) = &blobs[0];
        let config = r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}"#;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": crate::support::digest(config.as_bytes()),
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer,
                "size": layer_len,
            }],
        })
        .to_string();
        let digest = crate::support::digest(manifest.as_bytes());
        Content {
            data,
            blobs: blobs.iter().cloned().collect(),
            manifest: (Bytes::from(manifest), digest),
        }
    }
}

/// A running origin; aborted on drop.
pub struct Origin {
    /// Its address.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    /// Serves `content` on 127.0.0.1:0 (HTTP/1.1, keep-alive).
    pub async fn start(content: Content) -> Origin {
        let content = Arc::new(content);
        let uploads = Arc::new(AtomicU64::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (content, uploads) = (content.clone(), uploads.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (content, uploads) = (content.clone(), uploads.clone());
                        async move { Ok::<_, Infallible>(handle(req, &content, &uploads).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Origin { addr, task }
    }
}

async fn handle(
    req: Request<Incoming>,
    content: &Content,
    uploads: &AtomicU64,
) -> Response<ProxyBody> {
    let path = req.uri().path().to_owned();
    let head = req.method() == Method::HEAD;
    let Some(rest) = path.strip_prefix("/v2/") else {
        return status(StatusCode::NOT_FOUND);
    };
    if rest.is_empty() {
        return reply(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(b"{}"),
            head,
        );
    }
    if let Some((name, id)) = rest.split_once("/blobs/uploads/") {
        return upload(req, name, id, uploads).await;
    }
    if let Some((_, digest)) = rest.split_once("/blobs/") {
        let Some(&len) = content.blobs.get(digest) else {
            return status(StatusCode::NOT_FOUND);
        };
        let body = if head {
            body::empty()
        } else {
            Slices {
                data: content.data.slice(..len as usize),
                pos: 0,
            }
            .boxed_unsync()
        };
        return Response::builder()
            .header("content-type", "application/octet-stream")
            .header("content-length", len)
            .header("docker-content-digest", digest)
            .body(body)
            .unwrap();
    }
    if rest.contains("/manifests/") {
        let (body, digest) = &content.manifest;
        let mut resp = reply(
            StatusCode::OK,
            "application/vnd.oci.image.manifest.v1+json",
            body.clone(),
            head,
        );
        resp.headers_mut()
            .insert("docker-content-digest", digest.parse().unwrap());
        return resp;
    }
    status(StatusCode::NOT_FOUND)
}

/// The upload endpoints: POST starts, PATCH and PUT swallow their bodies.
async fn upload(
    req: Request<Incoming>,
    name: &str,
    id: &str,
    uploads: &AtomicU64,
) -> Response<ProxyBody> {
    let method = req.method().clone();
    let query = req.uri().query().unwrap_or("").to_owned();
    let received = match drain(req.into_body()).await {
        Ok(n) => n,
        Err(_) => return status(StatusCode::BAD_REQUEST),
    };
    let builder = Response::builder().header("content-length", 0);
    match method {
        Method::POST if id.is_empty() => {
            let id = uploads.fetch_add(1, Ordering::Relaxed);
            builder
                .status(StatusCode::ACCEPTED)
                .header("location", format!("/v2/{name}/blobs/uploads/{id}"))
                .header("docker-upload-uuid", id.to_string())
                .header("range", "0-0")
                .body(body::empty())
                .unwrap()
        }
        Method::PATCH if !id.is_empty() => builder
            .status(StatusCode::ACCEPTED)
            .header("location", format!("/v2/{name}/blobs/uploads/{id}"))
            .header("docker-upload-uuid", id)
            .header("range", format!("0-{}", received.saturating_sub(1)))
            .body(body::empty())
            .unwrap(),
        Method::PUT if !id.is_empty() => {
            let Some(digest) = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("digest="))
                .map(|d| d.replace("%3A", ":").replace("%3a", ":"))
            else {
                return status(StatusCode::BAD_REQUEST);
            };
            builder
                .status(StatusCode::CREATED)
                .header("location", format!("/v2/{name}/blobs/{digest}"))
                .header("docker-content-digest", digest)
                .body(body::empty())
                .unwrap()
        }
        _ => status(StatusCode::METHOD_NOT_ALLOWED),
    }
}

fn reply(code: StatusCode, content_type: &str, bytes: Bytes, head: bool) -> Response<ProxyBody> {
    let len = bytes.len();
    Response::builder()
        .status(code)
        .header("content-type", content_type)
        .header("content-length", len)
        .header("docker-distribution-api-version", "registry/2.0")
        .body(if head {
            body::empty()
        } else {
            body::full(bytes)
        })
        .unwrap()
}

fn status(code: StatusCode) -> Response<ProxyBody> {
    Response::builder()
        .status(code)
        .header("content-length", 0)
        .body(body::empty())
        .unwrap()
}

/// A blob body: `SLICE`-sized views of one shared buffer.
struct Slices {
    data: Bytes,
    pos: usize,
}

impl Body for Slices {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let start = self.pos;
        if start >= self.data.len() {
            return Poll::Ready(None);
        }
        let end = (start + SLICE).min(self.data.len());
        self.pos = end;
        Poll::Ready(Some(Ok(Frame::data(self.data.slice(start..end)))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact((self.data.len() - self.pos) as u64)
    }
}
