//! Logging: `tracing` output as text or JSON (level from `REGRELAY_LOG`, default `info`), and the
//! access log — exactly one line per request, written when the response body has been sent (or
//! dropped), so it carries the real byte counts and duration of a streamed blob. The access log
//! records method, path (never the query: upload state and token-request parameters stay out),
//! status, upstream status, bytes both ways, duration and peer; no header is ever logged.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::Method;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::metrics::Metrics;

/// Installs the global subscriber (stderr). Called once by `main`; a second call is ignored.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("REGRELAY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The facts of one request, logged once on drop.
pub struct AccessLog {
    /// Request method.
    pub method: Method,
    /// Request path, without query.
    pub path: String,
    /// Client address.
    pub peer: IpAddr,
    /// When the request headers arrived.
    pub start: Instant,
    /// Status sent to the client.
    pub status: u16,
    /// Status the upstream answered, when it was asked.
    pub upstream_status: Option<u16>,
    /// Request body bytes read from the client.
    pub bytes_in: Arc<AtomicU64>,
    /// Response body bytes handed to the client.
    pub bytes_out: u64,
    /// Whether the response body reached its end.
    pub complete: bool,
    /// Where the request is counted.
    pub metrics: Arc<Metrics>,
}

impl AccessLog {
    /// The log of a request that starts now.
    pub fn new<B>(req: &http::Request<B>, peer: IpAddr, metrics: Arc<Metrics>) -> AccessLog {
        AccessLog {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            peer,
            start: Instant::now(),
            status: 0,
            upstream_status: None,
            bytes_in: Arc::new(AtomicU64::new(0)),
            bytes_out: 0,
            complete: false,
            metrics,
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.metrics.request(
            &self.path,
            &self.method,
            self.status,
            self.start.elapsed().as_secs_f64(),
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out,
        );
        // Health checks come every few seconds from every balancer: DEBUG, not INFO.
        if self.path.starts_with("/-/") {
            tracing::debug!(
                target: "regrelay::access",
                method = %self.method,
                path = %self.path,
                status = self.status,
                duration_ms = self.start.elapsed().as_millis() as u64,
                peer = %self.peer,
                "request"
            );
            return;
        }
        tracing::info!(
            target: "regrelay::access",
            method = %self.method,
            path = %self.path,
            status = self.status,
            upstream_status = self.upstream_status,
            bytes_in = self.bytes_in.load(Ordering::Relaxed),
            bytes_out = self.bytes_out,
            duration_ms = self.start.elapsed().as_millis() as u64,
            complete = self.complete,
            peer = %self.peer,
            "request"
        );
    }
}

pin_project! {
    /// A response body that counts what it hands out and logs the request when it is done.
    pub struct Logged<B> {
        #[pin]
        inner: B,
        log: AccessLog,
    }
}

impl<B: Body> Logged<B> {
    /// Attaches `log` to `inner`.
    pub fn new(inner: B, mut log: AccessLog) -> Self {
        // hyper never polls a body that is already at its end (HEAD, 204, empty bodies).
        log.complete = inner.is_end_stream();
        Logged { inner, log }
    }
}

impl<B: Body<Data = Bytes>> Body for Logged<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.log.bytes_out += data.len() as u64;
                }
                // hyper stops polling once the body reports its end (known length reached).
                this.log.complete = this.inner.is_end_stream();
            }
            Poll::Ready(None) => this.log.complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
