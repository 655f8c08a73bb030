//! A programmable HTTP origin on 127.0.0.1:0, for assertions on exactly what regrelay sends
//! upstream (headers, framing, timing). Registry behaviour itself is always tested against the
//! real `docker-registry`; this is a probe, not a registry stand-in.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use regrelay::body::ProxyBody;
use regrelay::error::BoxError;

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
    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Serves `handler` for every request (HTTP/1.1).
pub async fn serve<F, Fut>(handler: F) -> Origin
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let handler = Arc::new(handler);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Origin { addr, task }
}

/// A pooled HTTP/1.1 client for tests.
pub fn client() -> Client<HttpConnector, ProxyBody> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A body of `len` bytes produced on the fly in 64 KiB frames (no allocation per GiB).
pub struct Generated {
    remaining: u64,
    chunk: Bytes,
}

impl Generated {
    /// `len` bytes of a fixed pattern.
    pub fn new(len: u64) -> Generated {
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        Generated {
            remaining: len,
            chunk: Bytes::from(chunk),
        }
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// Reads a body to its end, counting bytes, without keeping them.
pub async fn drain<B>(mut body: B) -> Result<u64, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    use http_body_util::BodyExt;
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            n += d.len() as u64;
        }
    }
    Ok(n)
}

/// Sends raw bytes on a fresh TCP connection and returns what came back until close or timeout.
pub async fn raw(addr: SocketAddr, request: &[u8], wait: std::time::Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An upload sink: reads every request body to its end and answers `202` with the number of
/// bytes read (or `broken` when the body failed), with the registry API's version header (so
/// regrelay's readiness takes it for a registry).
pub async fn sink() -> Origin {
    serve(|req: Request<Incoming>| async move {
        let text = match drain(req.into_body()).await {
            Ok(n) => n.to_string(),
            Err(_) => "broken".to_owned(),
        };
        let mut resp = Response::new(regrelay::body::full(text));
        *resp.status_mut() = http::StatusCode::ACCEPTED;
        resp.headers_mut().insert(
            "docker-distribution-api-version",
            http::HeaderValue::from_static("registry/2.0"),
        );
        resp
    })
    .await
}

/// A raw TCP origin on 127.0.0.1:0 that counts the connections it accepts and hands each to
/// `serve`, in a task of its own (aborted with the test's runtime).
pub async fn counting<F, Fut>(serve: F) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream));
        }
    });
    (addr, accepted)
}
