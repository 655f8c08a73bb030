//! Upstream HTTP/1.1 connections (hyper's `client::conn::http1`), pooled per connection worker
//! and driven by the request that holds them: no task per connection and no hand-off between
//! tasks. The request's own task writes it and reads the answer's head ([`Pool::request`]); the
//! response body ([`UpstreamBody`]) drives the connection while it is read, and at its end hands
//! the connection back to its pool. An idle connection is driven by no one: when it is taken
//! again it is driven once, which reads a close the upstream sent meanwhile, and only a
//! connection that then asks for a request is used.
//!
//! What hyper-util's pooled client did, this keeps:
//! - connections are kept per origin (scheme, host, port: an upload `Location` on object
//!   storage is not the registry), at most `max_idle` idle per origin, each for at most
//!   `keep_for`, the oldest dropped first; a reaper closes the expired ones in a quiet pool;
//! - a request that finds no idle connection dials one, and takes a connection another request
//!   hands back meanwhile if that comes first (a dial that waits for a connection permit may
//!   wait up to [`super::UPSTREAM_QUEUE_MILLIS`]);
//! - idle connections never starve a dial: when every connection permit is held and none of the
//!   idle connections, in any worker's pool, goes to the request's origin, the oldest idle one
//!   is closed for it (else the registry's idle connections would hold every permit while an
//!   upload part to object storage waited for one, and got 503), and again each time a
//!   connection is handed back while the dial waits;
//! - a request a reused connection never sent (the upstream closed it as the request went out)
//!   goes again on another connection; one written in part is not sent again;
//! - `Host` from the URI when the request has none, and the URI in origin form on the wire;
//! - a connection goes back to the pool only once it asks for the next request; one that is
//!   not there yet (the request body still going out) gets [`SETTLE`] to get there.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::MaybeHttpsStream;
use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::{Connector, Counted, Socket};
use crate::body::ProxyBody;
use crate::clients::Share;
use crate::config::Origin;
use crate::error::BoxError;
use crate::lock::lock;

/// How long a connection whose answer ended may take to ask for its next request before it
/// is closed instead of pooled.
pub const SETTLE: Duration = Duration::from_secs(5);

type Io = MaybeHttpsStream<Socket>;

/// One upstream connection: the handle requests go in by, and the connection itself, which
/// whoever holds this drives. Boxed wherever it goes: hyper's connection state is large, and it
/// changes hands several times a request.
pub(super) struct Conn {
    tx: http1::SendRequest<ProxyBody>,
    io: http1::Connection<Io, ProxyBody>,
    origin: Origin,
    /// The connection has ended: never driven again.
    ended: bool,
}

impl Conn {
    /// Drives the connection: writes what is queued, reads what arrived. Ready once it ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.ended {
            return Poll::Ready(());
        }
        let Poll::Ready(result) = Pin::new(&mut self.io).poll(cx) else {
            return Poll::Pending;
        };
        if let Err(e) = result {
            tracing::debug!(upstream = %self.origin, error = %e, "upstream connection ended");
        }
        self.ended = true;
        Poll::Ready(())
    }

    /// Drives it once with no one to wake: true when it is open and asks for a request.
    fn settle(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.drive(&mut cx).is_pending() && self.tx.is_ready()
    }
}

/// A connection waiting in the pool, and since when.
struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// One worker's upstream connections.
pub(super) struct Pool {
    connector: Connector,
    h1: http1::Builder,
    /// Idle connections, oldest first.
    idle: Mutex<Vec<Idle>>,
    /// Idle connections kept per origin, at most.
    max_idle: usize,
    /// How long an idle connection is kept.
    keep_for: Duration,
    /// Dials waiting, in every pool of the upstream, and their wake-up.
    handback: Arc<Handback>,
    /// A reaper task is closing expired idle connections.
    reaping: AtomicBool,
    /// Its sockets open (in use or idle).
    pub(super) open: Arc<AtomicUsize>,
    /// Its requests sent whose response has not ended.
    pub(super) busy: Arc<AtomicUsize>,
}

/// What the pools of one upstream share: the requests dialling (each would take a connection
/// handed back meanwhile, or close an idle one of another origin for its permit), and how a
/// connection handed back wakes them.
#[derive(Default)]
pub(super) struct Handback {
    waiting: AtomicUsize,
    returned: Notify,
}

/// Why a request got no response.
pub(super) enum Failure {
    /// No connection: the dial, the TLS handshake or the wait for a connection permit failed.
    Connect(BoxError),
    /// The connection failed the exchange (or the request body did).
    Exchange(hyper::Error),
}

impl Pool {
    pub(super) fn new(
        connector: Connector,
        open: Arc<AtomicUsize>,
        handback: Arc<Handback>,
        (max_idle, keep_for): (usize, Duration),
    ) -> Pool {
        Pool {
            connector,
            h1: http1::Builder::new(),
            idle: Mutex::new(Vec::new()),
            max_idle,
            keep_for,
            handback,
            reaping: AtomicBool::new(false),
            open,
            busy: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Its connections idle now, about (a response that just ended may be on its way back).
    pub(super) fn idle(&self) -> usize {
        let open = self.open.load(Ordering::Relaxed);
        open.saturating_sub(self.busy.load(Ordering::Relaxed))
    }

    /// Sends `req` (absolute URI, for `origin`) on a pooled or new connection; the response's
    /// head, and the connection its body comes on. `all`: every pool of the upstream, this one
    /// among them, whose idle connections a dial starved of permits may take or close.
    pub(super) async fn request(
        self: &Arc<Self>,
        mut req: Request<ProxyBody>,
        origin: &Origin,
        all: &[Arc<Pool>],
    ) -> Result<(Response<Incoming>, Box<Conn>), Failure> {
        let uri = std::mem::take(req.uri_mut());
        if !req.headers().contains_key(header::HOST) {
            if let Some(host) = host_of(&uri) {
                req.headers_mut().insert(header::HOST, host);
            }
        }
        *req.uri_mut() = Uri::from(
            uri.path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        loop {
            let (mut conn, reused) = match self.take(origin) {
                Some(conn) => (conn, true),
                // Boxed: dialling takes far more state than the rest of a request, which would
                // otherwise be copied with every request.
                None => Box::pin(self.checkout(origin, &uri, all)).await?,
            };
            let mut sending = std::pin::pin!(conn.tx.try_send_request(req));
            let sent = poll_fn(|cx| {
                // The connection first: it writes the request and reads the answer's head,
                // which the send's future then has at once.
                let _ = conn.drive(cx);
                sending.as_mut().poll(cx)
            })
            .await;
            match sent {
                Ok(resp) => return Ok((resp, conn)),
                Err(mut e) => match e.take_message() {
                    // Closed by the upstream as the request went out, none of it written.
                    Some(unsent) if reused => {
                        tracing::debug!(upstream = %origin, "a pooled connection had closed; the request goes on another");
                        req = unsent;
                    }
                    _ => return Err(Failure::Exchange(e.into_error())),
                },
            }
        }
    }

    /// With no idle connection to `origin`: a new one, dialled, unless a connection handed back
    /// meanwhile comes first (then that one, reused). While every connection permit is held,
    /// an idle connection to `origin` in another pool of `all` is taken, or else the oldest idle
    /// connection to another origin is closed, so that the dial gets its permit.
    async fn checkout(
        &self,
        origin: &Origin,
        uri: &Uri,
        all: &[Arc<Pool>],
    ) -> Result<(Box<Conn>, bool), Failure> {
        let dial = self.dial(uri.clone(), origin.clone());
        let mut dial = std::pin::pin!(dial);
        let handback = &self.handback;
        handback.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&handback.waiting);
        loop {
            let returned = handback.returned.notified();
            let mut returned = std::pin::pin!(returned);
            returned.as_mut().enable();
            if let Some(conn) = self.take(origin) {
                return Ok((conn, true));
            }
            if self.connector.tcp.permits.available_permits() == 0 {
                if let Some(conn) = all.iter().find_map(|pool| pool.take(origin)) {
                    return Ok((conn, true));
                }
                close_oldest_idle(all);
            }
            tokio::select! {
                biased;
                dialled = &mut dial => return dialled.map(|c| (c, false)).map_err(Failure::Connect),
                () = returned => {}
            }
        }
    }

    /// The newest idle connection to `origin` that is still open and asks for a request.
    fn take(&self, origin: &Origin) -> Option<Box<Conn>> {
        let now = Instant::now();
        loop {
            let mut idle = lock(&self.idle);
            let i = idle.iter().rposition(|e| e.conn.origin.same_as(origin))?;
            let Idle { mut conn, since } = idle.remove(i);
            drop(idle);
            if now.saturating_duration_since(since) < self.keep_for && conn.settle() {
                return Some(conn);
            }
            // Closed by the upstream while idle, or kept too long: it closes here.
        }
    }

    async fn dial(&self, uri: Uri, origin: Origin) -> Result<Box<Conn>, BoxError> {
        let mut connector = self.connector.clone();
        let io = tower_service::Service::call(&mut connector, uri).await?;
        let (tx, io) = self.h1.handshake(io).await?;
        Ok(Box::new(Conn {
            tx,
            io,
            origin,
            ended: false,
        }))
    }

    /// Takes back a connection whose answer ended: into the pool once it asks for the next
    /// request (at once, or within [`SETTLE`]), else it closes.
    fn checkin(self: &Arc<Self>, mut conn: Box<Conn>) {
        if conn.settle() {
            return self.put(conn);
        }
        if conn.ended || conn.tx.is_closed() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = self.clone();
        runtime.spawn(async move {
            let ready = poll_fn(|cx| {
                if conn.drive(cx).is_ready() {
                    return Poll::Ready(false);
                }
                conn.tx.poll_ready(cx).map(|r| r.is_ok())
            });
            if let Ok(true) = tokio::time::timeout(SETTLE, ready).await {
                pool.put(conn);
            }
        });
    }

    fn put(self: &Arc<Self>, conn: Box<Conn>) {
        let now = Instant::now();
        let mut idle = lock(&self.idle);
        let mut gone = self.expired(&mut idle, now);
        if idle.len() >= self.max_idle {
            let same = |e: &Idle| e.conn.origin.same_as(&conn.origin);
            if idle.iter().filter(|e| same(e)).count() >= self.max_idle {
                if let Some(oldest) = idle.iter().position(same) {
                    gone.push(idle.remove(oldest));
                }
            }
        }
        idle.push(Idle { conn, since: now });
        drop(idle);
        drop(gone);
        if self.handback.waiting.load(Ordering::Acquire) > 0 {
            self.handback.returned.notify_waiters();
        }
        self.reap_later();
    }

    /// Takes out of `idle` (oldest first) the connections kept `keep_for` by `now`, to be closed
    /// once the lock is let go.
    fn expired(&self, idle: &mut Vec<Idle>, now: Instant) -> Vec<Idle> {
        let n = idle
            .iter()
            .take_while(|e| now.saturating_duration_since(e.since) >= self.keep_for)
            .count();
        idle.drain(..n).collect()
    }

    /// Starts the reaper, unless it runs: every half `keep_for` it closes the idle connections
    /// kept longer, and it stops when none is left.
    fn reap_later(self: &Arc<Self>) {
        if self.reaping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.reaping.store(false, Ordering::Release);
            return;
        };
        let pool: Weak<Pool> = Arc::downgrade(self);
        let every = self.keep_for / 2;
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = pool.upgrade() else { return };
                let (gone, empty) = {
                    let mut idle = lock(&pool.idle);
                    (pool.expired(&mut idle, Instant::now()), idle.is_empty())
                };
                drop(gone);
                if empty {
                    pool.reaping.store(false, Ordering::Release);
                    // A connection put back since then started no reaper: go on for it.
                    if lock(&pool.idle).is_empty() || pool.reaping.swap(true, Ordering::AcqRel) {
                        return;
                    }
                }
            }
        });
    }
}

/// Closes the oldest idle connection of `pools` (its permit goes to a dial that waits for one).
fn close_oldest_idle(pools: &[Arc<Pool>]) {
    let oldest = pools
        .iter()
        .filter_map(|pool| Some((lock(&pool.idle).first()?.since, pool)))
        .min_by_key(|(since, _)| *since);
    if let Some((_, pool)) = oldest {
        let mut idle = lock(&pool.idle);
        let gone = (!idle.is_empty()).then(|| idle.remove(0));
        drop(idle);
        drop(gone);
    }
}

/// A count of requests dialling, held up while this lives.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `Host` for `uri` as hyper-util's client writes it: the host, and the port unless it is the
/// scheme's default.
fn host_of(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let default = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let value = match uri.port_u16() {
        Some(port) if port != default => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    HeaderValue::from_str(&value).ok()
}

pin_project_lite::pin_project! {
    /// An upstream response body. It drives its connection while it is read, hands the
    /// connection back to the pool at its end (a body hyper never polls, being empty, at its
    /// drop), and holds the request's slot until then.
    pub struct UpstreamBody {
        #[pin]
        inner: Incoming,
        conn: Option<(Box<Conn>, Arc<Pool>)>,
        permit: Option<OwnedSemaphorePermit>,
        share: Option<Share>,
        busy: Option<Counted>,
    }

    impl PinnedDrop for UpstreamBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if this.inner.is_end_stream() {
                if let Some((conn, pool)) = this.conn.take() {
                    pool.checkin(conn);
                }
            }
        }
    }
}

impl UpstreamBody {
    pub(super) fn new(
        inner: Incoming,
        conn: Box<Conn>,
        pool: Arc<Pool>,
        permit: OwnedSemaphorePermit,
        share: Option<Share>,
        busy: Counted,
    ) -> UpstreamBody {
        UpstreamBody {
            inner,
            conn: Some((conn, pool)),
            permit: Some(permit),
            share,
            busy: Some(busy),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let mut polled = this.inner.as_mut().poll_frame(cx);
        if polled.is_pending() {
            if let Some((conn, _)) = this.conn.as_mut() {
                // Read what the upstream sent, and offer it to the body at once.
                let _ = conn.drive(cx);
                polled = this.inner.as_mut().poll_frame(cx);
            }
        }
        match &polled {
            Poll::Ready(None) => {
                if let Some((conn, pool)) = this.conn.take() {
                    pool.checkin(conn);
                }
            }
            Poll::Ready(Some(Err(_))) => drop(this.conn.take()),
            _ => return polled,
        }
        // The answer is over: its slot is free now.
        this.permit.take();
        this.share.take();
        this.busy.take();
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
