//! Admission: which budget a request takes before it is handled, or why it is refused.
//!
//! - Health checks (`GET|HEAD /-/healthy`, `/-/ready`) take none: they are answered at every
//!   limit, on any connection, a reserve one included.
//! - A request on a reserve connection (accepted past `--max-connections` for health checks)
//!   first waits a moment for a real connection slot (asking stalled and idle connections to
//!   leave); without one it gets 503 and the connection closes.
//! - Every other request takes a slot of its client's share ([`crate::clients`]), then one of
//!   `--max-requests`. When those are all taken, stalled requests are shed (see [`crate::server`]) and the
//!   request waits up to [`PRESSURE_WAIT`] for a freed slot before it gets 503.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::state::{lock, ConnState, Holds, InFlight, Stream, StreamExec, Tracked};
use crate::app::{App, ConnInfo};
use crate::clients::{acquire_pressing, client_address, ClientHandle};
use crate::error::Error;
use crate::metrics::{OutcomeLabels, PoolLabels};
use crate::router::Route;

/// How long a request that finds every request slot taken waits for one (while stalled requests
/// are shed) before it gets 503.
pub const PRESSURE_WAIT: Duration = Duration::from_secs(1);
/// How long a request on a reserve connection waits for a real connection slot.
pub const RESERVE_WAIT: Duration = Duration::from_secs(2);

/// One connection's admission of its requests.
pub(super) struct Admission {
    pub(super) app: Arc<App>,
    pub(super) conn: ConnInfo,
    pub(super) state: Arc<ConnState>,
    /// `--max-requests`.
    pub(super) requests: Arc<Semaphore>,
    /// `--max-connections`, for a reserve connection's promotion.
    pub(super) connections: Arc<Semaphore>,
    /// Connection-limit pressure: idle and stalled connections leave.
    pub(super) conn_pressure: Arc<Notify>,
    /// Blob uploads in flight, server-wide.
    pub(super) uploads: Gauge,
    /// The connection's slot: `Some` reserve permit while it has no real one.
    pub(super) reserve: Mutex<Option<OwnedSemaphorePermit>>,
    /// The real slot a reserve connection was promoted to.
    pub(super) promoted: Mutex<Option<OwnedSemaphorePermit>>,
    /// Set when the connection should close after its current requests.
    pub(super) close: AtomicBool,
    /// Wakes the supervisor to close.
    pub(super) closing: Notify,
    /// The HTTP/2 stream executor, when the connection is HTTP/2.
    pub(super) exec: Option<StreamExec>,
}

impl Admission {
    /// hyper's service: the [`Stream`] is made before the future, so an HTTP/2 stream's task
    /// (handed to the executor right after this call) is tied to it.
    pub(super) fn call(
        self: &Arc<Self>,
        req: Request<Incoming>,
    ) -> impl std::future::Future<Output = Result<Response<Tracked>, Infallible>> + Send + 'static
    {
        let stream = Arc::new(Stream::default());
        if let Some(exec) = &self.exec {
            exec.expect(stream.clone());
        }
        let me = self.clone();
        async move { Ok(me.admit(req, stream).await) }
    }

    async fn admit(&self, mut req: Request<Incoming>, stream: Arc<Stream>) -> Response<Tracked> {
        let (app, conn) = (&self.app, self.conn);
        // In flight from now on: a connection waiting for a slot is not idle (and not shed as
        // such by the pressure its own wait signals).
        let mut guard = InFlight::enter(self.state.clone(), stream, Holds::default());
        // Routed once: the route (and a registry request's parsed path) goes on to the app.
        let route = app.route_of(&req);
        let health = matches!(route, Ok(Route::Healthy | Route::Ready));
        let reserve = lock(&self.reserve).is_some();
        if health {
            let mut resp = Box::pin(app.handle(req, conn, route)).await;
            if reserve {
                // One answer per reserve connection: the slot is for the next health check.
                self.reserve_outcome("health");
                self.close_after(&mut resp);
            }
            return resp.map(|inner| Tracked::new(inner, guard));
        }
        if reserve && !self.promote().await {
            self.reserve_outcome("refused");
            let mut resp = app.refuse(&req, &route, conn, "connections");
            self.close_after(&mut resp);
            return resp.map(Tracked::without);
        }
        let address = client_address(req.headers(), conn.peer.ip(), &app.config().trusted_proxies);
        let client = app.clients().get(address.ip());
        let Some(share) = client.try_request() else {
            self.share_refused("requests");
            return app
                .refuse(
                    &req,
                    &route,
                    conn,
                    "this client's share of requests in flight",
                )
                .map(Tracked::without);
        };
        let Some(request) = self.request_slot().await else {
            return app
                .refuse(&req, &route, conn, "requests in flight")
                .map(Tracked::without);
        };
        let upload = is_upload(req.method(), &route).then(|| self.uploads.clone());
        req.extensions_mut()
            .insert(ClientHandle { client, address });
        guard.hold(Holds {
            request: Some(request),
            share: Some(share),
            upload,
        });
        let mut resp = Box::pin(app.handle(req, conn, route)).await;
        if self.state.draining.load(Ordering::Acquire) {
            // Served during the drain: the connection ends with this answer.
            self.close_after(&mut resp);
        }
        resp.map(|inner| Tracked::new(inner, guard))
    }

    /// A slot of `--max-requests`: at once, or, when all are taken, after stalled requests were
    /// asked to leave, within [`PRESSURE_WAIT`].
    async fn request_slot(&self) -> Option<OwnedSemaphorePermit> {
        acquire_pressing(&self.requests, Some(self.app.pressure()), PRESSURE_WAIT).await
    }

    /// Trades the reserve slot for a real connection slot, asking idle and stalled connections
    /// to leave, within [`RESERVE_WAIT`].
    async fn promote(&self) -> bool {
        let pressure = Some(&*self.conn_pressure);
        let Some(permit) = acquire_pressing(&self.connections, pressure, RESERVE_WAIT).await else {
            return false;
        };
        *lock(&self.promoted) = Some(permit);
        lock(&self.reserve).take();
        self.reserve_outcome("promoted");
        true
    }

    /// Marks `resp` as the connection's last and asks the supervisor to close it.
    fn close_after<B>(&self, resp: &mut Response<B>) {
        if !self.conn.h2 {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        self.close.store(true, Ordering::Release);
        self.closing.notify_one();
    }

    fn share_refused(&self, pool: &'static str) {
        let m = self.app.metrics();
        m.client_share_refused
            .get_or_create(&PoolLabels { pool })
            .inc();
    }

    fn reserve_outcome(&self, outcome: &'static str) {
        let m = self.app.metrics();
        m.reserve_connections
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

/// A blob upload request (`POST`/`PATCH`/`PUT` under `/v2/<name>/blobs/uploads/`): it may
/// continue past the grace period, until `--upload-drain-secs`.
fn is_upload(method: &Method, route: &Result<Route, Error>) -> bool {
    matches!(*method, Method::POST | Method::PATCH | Method::PUT)
        && matches!(route, Ok(Route::Registry(api)) if api.is_upload())
}
