//! The only place that dials sockets: pooled HTTP/1.1 connections to one configured origin (the
//! upstream registry, or the token service), over http or https (rustls), each driven by the
//! request that holds it ([`pool`]). It never follows redirects, so a `Location` to object
//! storage goes back to the client untouched and `Authorization` handling stays in
//! [`crate::proxy`].
//!
//! Connections are bounded per client (one per origin, plus object-storage targets of uploads):
//! every open socket, in use or idle in the pool, holds one of `--max-upstream-connections`
//! permits ([`Bounded`]) until it closes, and a request holds one request slot from the moment
//! it is sent until its response body ends. A request that finds no slot within
//! [`UPSTREAM_QUEUE_MILLIS`] is answered 503 with `Retry-After`, so thousands of HTTP/2 streams
//! cannot open thousands of upstream sockets.
//! Each client also holds at most its share of those slots ([`crate::clients`]; the request's
//! [`ClientHandle`] extension says whose it is); a request that finds every slot taken signals
//! pressure, so requests whose clients take none of their responses are shed first.
//! Connect and the TLS handshake have a deadline each; nothing else does here (uploads may stream
//! for hours; body silence is watched by [`crate::body::Watched`]).
//!
//! Each connection worker ([`crate::server::Workers`]) has a pool of its own ([`on_worker`]):
//! a request takes an upstream connection driven on its own thread, never one another worker's
//! runtime drives (nginx's and HAProxy's upstream keep-alive is per worker as well). The bound
//! above is over all pools together: they share the permits. An idle pooled connection holds its
//! permit, so when every permit is taken a request goes to the pool that holds idle
//! connections, on whichever worker, rather than wait for one of its own; and when none of them
//! goes to the request's origin, the oldest is closed for its permit ([`pool`]).
//!
//! TLS ([`Connector`]): certificates are verified against the upstream's [`UpstreamTrust`], which
//! SIGHUP replaces without touching the pool; a refused handshake comes back as a
//! [`crate::error::TlsRefused`] that names the origin, rustls' reason and the fix.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;

use crate::body::{self, ProxyBody};
use crate::clients::{acquire_pressing, ClientHandle};
use crate::config::{Config, Origin, READY_PROBE_CONNECTIONS};
use crate::error::{BoxError, Error, TlsRefused};
use crate::metrics::Metrics;
use crate::tls::UpstreamTrust;
use prometheus_client::metrics::histogram::Histogram;

mod pool;
#[cfg(test)]
mod tests;

use pool::{Failure, Handback, Pool};
pub use pool::{UpstreamBody, SETTLE};

/// How long `/-/ready` waits for the upstream.
pub const READY_TIMEOUT_SECS: u64 = 5;
/// How long a request may wait for an upstream connection slot before it gets 503.
pub const UPSTREAM_QUEUE_MILLIS: u64 = 2000;
/// Idle pooled connections kept per origin, at most.
pub const MAX_IDLE_PER_ORIGIN: usize = 32;
/// Seconds an idle pooled connection is kept.
pub const POOL_IDLE_SECS: u64 = 90;

thread_local! {
    /// The connection worker this thread is (1-based; 0: not a worker).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks this thread as connection worker `index` (0-based, below `--workers`): requests it
/// serves use that worker's pools. Threads not marked share one more pool.
pub fn on_worker(index: usize) {
    WORKER.with(|w| w.set(index + 1));
}

/// Pooled, bounded client bound to one origin.
#[derive(Clone)]
pub struct Upstream {
    origin: Origin,
    body_idle: Duration,
    /// One pool per connection worker, after one for every other thread.
    pools: Arc<[Arc<Pool>]>,
    /// The connection permits all pools share.
    permits: Arc<Semaphore>,
    trust: Arc<UpstreamTrust>,
    slots: Arc<Semaphore>,
    /// Where response times go, under this upstream's name.
    observed: Option<(Arc<Metrics>, Histogram)>,
    /// Signalled when every slot is taken: stalled requests are shed.
    pressure: Option<Arc<Notify>>,
    /// What it is, for errors: `upstream registry` or `token service`.
    what: &'static str,
}

/// A count held up for as long as this lives.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(count: &Arc<AtomicUsize>) -> Counted {
        count.fetch_add(1, Ordering::Relaxed);
        Counted(count.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP connector whose sockets each hold a permit until they close.
#[derive(Clone)]
pub struct Bounded {
    inner: HttpConnector,
    permits: Arc<Semaphore>,
    /// Its pool's count of open sockets.
    open: Arc<AtomicUsize>,
}

/// The upstream connector: TCP through [`Bounded`], then for `https` a TLS handshake (SNI and
/// name check on the URI's host) verified by the upstream's [`UpstreamTrust`]. The handshake has
/// a deadline of its own, the connect timeout again: a port that accepts and never answers the
/// ClientHello would otherwise hold the request forever. A refused handshake comes back as a
/// [`TlsRefused`] (origin, rustls' reason, fix) rather than as a rustls error three `io::Error`s
/// deep.
#[derive(Clone)]
pub struct Connector {
    tcp: Bounded,
    tls: TlsConnector,
    trust: Arc<UpstreamTrust>,
    handshake: Duration,
}

type Socket = Permitted<<HttpConnector as tower_service::Service<http::Uri>>::Response>;

impl tower_service::Service<http::Uri> for Connector {
    type Response = MaybeHttpsStream<Socket>;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.tcp.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            other => {
                let err = format!("unsupported scheme {other:?} (http or https)");
                return Box::pin(async move { Err(err.into()) });
            }
        };
        let origin = Origin::of(&uri);
        let host = uri.host().unwrap_or_default();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let name = ServerName::try_from(host.to_owned());
        let connecting = self.tcp.call(uri);
        let (tls, trust, handshake) = (self.tls.clone(), self.trust.clone(), self.handshake);
        Box::pin(async move {
            let tcp = connecting.await?;
            if !https {
                return Ok(MaybeHttpsStream::Http(tcp));
            }
            let origin = origin.map_or_else(|| "the upstream".into(), |o| o.to_string());
            let shaking = tls.connect(name?, TokioIo::new(tcp));
            match tokio::time::timeout(handshake, shaking).await {
                Ok(Ok(stream)) => Ok(MaybeHttpsStream::Https(TokioIo::new(stream))),
                Ok(Err(err)) => Err(match TlsRefused::find(&err) {
                    Some(reason) => Box::new(TlsRefused {
                        origin,
                        ca: trust.ca_file().map(Into::into),
                        reason,
                    }) as BoxError,
                    None => Box::new(err),
                }),
                Err(_) => Err(format!(
                    "no TLS handshake with {origin} within {} s: does it serve HTTPS on this \
                     port? (the deadline is --upstream-connect-timeout-secs)",
                    handshake.as_secs()
                )
                .into()),
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A socket holding its connection permit (and counted in its pool).
    pub struct Permitted<T> {
        #[pin]
        io: T,
        _permit: OwnedSemaphorePermit,
        _open: Counted,
    }
}

impl tower_service::Service<http::Uri> for Bounded {
    type Response = Permitted<<HttpConnector as tower_service::Service<http::Uri>>::Response>;
    type Error = crate::error::BoxError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (mut inner, permits) = (self.inner.clone(), self.permits.clone());
        let open = self.open.clone();
        Box::pin(async move {
            let wait = Duration::from_millis(UPSTREAM_QUEUE_MILLIS);
            let permit = tokio::time::timeout(wait, permits.acquire_owned())
                .await
                .map_err(|_| "every upstream connection is in use (--max-upstream-connections)")?
                .map_err(|_| "connector closed")?;
            let io = inner.call(uri).await?;
            Ok(Permitted {
                io,
                _permit: permit,
                _open: Counted::new(&open),
            })
        })
    }
}

impl<T: hyper::rt::Read> hyper::rt::Read for Permitted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write> hyper::rt::Write for Permitted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

impl Upstream {
    /// A client for `origin` trusting `trust`, with the config's timeouts and bounds.
    pub fn new(cfg: &Config, trust: &Arc<UpstreamTrust>, origin: Origin) -> Upstream {
        Upstream::bounded(cfg, trust, origin, cfg.limits.max_upstream_connections)
    }

    /// A client for readiness probes of `origin`: its own few connections
    /// ([`READY_PROBE_CONNECTIONS`]), so `/-/ready` answers while clients hold every slot of
    /// the upstream's pool.
    pub fn probe_client(cfg: &Config, trust: &Arc<UpstreamTrust>, origin: Origin) -> Upstream {
        let max = usize::try_from(READY_PROBE_CONNECTIONS).unwrap_or(1);
        Upstream::bounded(cfg, trust, origin, max)
    }

    fn bounded(cfg: &Config, trust: &Arc<UpstreamTrust>, origin: Origin, max: usize) -> Upstream {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.timeouts.upstream_connect));
        let permits = Arc::new(Semaphore::new(max));
        let tls = TlsConnector::from(Arc::new(trust.client_config()));
        let handback = Arc::new(Handback::default());
        let pools = (0..=cfg.workers)
            .map(|_| {
                let open = Arc::new(AtomicUsize::new(0));
                // No ALPN offered: the pool speaks HTTP/1.1 only.
                let connector = Connector {
                    tcp: Bounded {
                        inner: http.clone(),
                        permits: permits.clone(),
                        open: open.clone(),
                    },
                    tls: tls.clone(),
                    trust: trust.clone(),
                    handshake: cfg.timeouts.upstream_connect,
                };
                let keep = (
                    max.min(MAX_IDLE_PER_ORIGIN),
                    Duration::from_secs(POOL_IDLE_SECS),
                );
                Arc::new(Pool::new(connector, open, handback.clone(), keep))
            })
            .collect();
        Upstream {
            origin,
            body_idle: cfg.timeouts.body_idle,
            pools,
            permits,
            trust: trust.clone(),
            slots: Arc::new(Semaphore::new(max)),
            observed: None,
            pressure: None,
            what: "upstream registry",
        }
    }

    /// Names it `what` in errors (`token service`).
    pub fn serving(mut self, what: &'static str) -> Upstream {
        self.what = what;
        self
    }

    /// Signals `pressure` when every slot is taken.
    pub fn pressing(mut self, pressure: Arc<Notify>) -> Upstream {
        self.pressure = Some(pressure);
        self
    }

    /// Records response times in `metrics` under `name` (a configured upstream name).
    pub fn observed_by(mut self, metrics: Arc<Metrics>, name: &str) -> Upstream {
        let histogram = metrics.upstream_histogram(name);
        self.observed = Some((metrics, histogram));
        self
    }

    /// The upstream origin.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The roots its certificates are verified against (reloaded on SIGHUP).
    pub fn trust(&self) -> &Arc<UpstreamTrust> {
        &self.trust
    }

    /// Sends a request whose URI is already absolute. Errors name the origin the request went
    /// to (for the log; clients are told less, see [`Error::public_message`]). A failure of the
    /// client's own request body is the client's error (400/408), not the upstream's.
    pub async fn send(&self, req: Request<ProxyBody>) -> Result<Response<UpstreamBody>, Error> {
        let queue = Duration::from_millis(UPSTREAM_QUEUE_MILLIS);
        let share = match req.extensions().get::<ClientHandle>() {
            Some(handle) => match handle.client.upstream_slot(queue).await {
                Some(share) => Some(share),
                None => {
                    if let Some((metrics, _)) = &self.observed {
                        metrics
                            .client_share_refused
                            .get_or_create(&crate::metrics::PoolLabels { pool: "upstream" })
                            .inc();
                    }
                    return Err(Error::Overloaded {
                        what: "this client's share of upstream connections",
                    });
                }
            },
            None => None,
        };
        let Some(permit) = acquire_pressing(&self.slots, self.pressure.as_deref(), queue).await
        else {
            return Err(Error::Overloaded {
                what: "upstream connections",
            });
        };
        let target = Origin::of(req.uri()).unwrap_or_else(|| self.origin.clone());
        let started = std::time::Instant::now();
        let pool = self.pool();
        let busy = Counted::new(&pool.busy);
        // Boxed: hyper's send holds the request twice, and a request's future holds this one in
        // several places (the proxy, the session's retry, uploads); in place, the whole request
        // future grew by kilobytes, all copied when admission boxes it.
        let sent = Box::pin(pool.request(req, &target, &self.pools)).await;
        if let Some((_, histogram)) = &self.observed {
            histogram.observe(started.elapsed().as_secs_f64());
        }
        let (resp, conn) = sent.map_err(|failure| {
            let upstream = target.to_string();
            match failure {
                Failure::Connect(source) => Error::UpstreamUnreachable {
                    what: self.what,
                    upstream,
                    source,
                },
                Failure::Exchange(e) if body::is_idle_timeout(&e) => Error::ClientIdle {
                    secs: self.body_idle.as_secs(),
                },
                Failure::Exchange(e) => match body::client_error(&e) {
                    Some(source) => Error::ClientBody { source },
                    None => Error::UpstreamFailed {
                        what: self.what,
                        upstream,
                        source: Box::new(e),
                    },
                },
            }
        })?;
        let pool = pool.clone();
        Ok(resp.map(|inner| UpstreamBody::new(inner, conn, pool, permit, share, busy)))
    }

    /// The pool a request of this thread takes: its worker's, unless that has no idle
    /// connection while idle ones elsewhere hold every permit.
    fn pool(&self) -> &Arc<Pool> {
        let worker = WORKER.with(std::cell::Cell::get);
        let own = self.pools.get(worker).unwrap_or(&self.pools[0]);
        if self.permits.available_permits() > 0 || own.idle() > 0 {
            return own;
        }
        self.pools
            .iter()
            .max_by_key(|p| p.idle())
            .filter(|p| p.idle() > 0)
            .unwrap_or(own)
    }

    /// Readiness: the upstream answers `GET /v2/` with any HTTP status (401 is the normal answer of
    /// a registry with token auth).
    pub async fn probe(&self) -> Result<http::StatusCode, Error> {
        self.probe_response().await.map(|r| r.status())
    }

    /// `GET /v2/` on the upstream, sent by regrelay itself (no client header goes with it), with
    /// the readiness deadline. Its challenge is the only place an upstream realm is learnt from.
    pub async fn probe_response(&self) -> Result<Response<UpstreamBody>, Error> {
        let req = Request::get(self.origin.join("/v2/")?).body(body::empty())?;
        let timeout = Duration::from_secs(READY_TIMEOUT_SECS);
        match tokio::time::timeout(timeout, self.send(req)).await {
            Ok(res) => res,
            Err(elapsed) => Err(Error::UpstreamUnreachable {
                what: self.what,
                upstream: self.origin.to_string(),
                source: Box::new(elapsed),
            }),
        }
    }
}
