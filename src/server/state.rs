//! What a connection knows about its requests: how many are in flight (and uploads among them),
//! since when it has had none, whether a write to it is stuck, and each request's own progress
//! ([`Stream`]), so that a stalled HTTP/2 stream can be reset on its own and stalled requests
//! can be shed under pressure.
//!
//! A request is *stalled* when its response is the client's to take and the client takes none of
//! it: the response body handed its last chunk to hyper and has not been asked for another for a
//! while. For HTTP/2 that is a stream whose flow-control window the client holds at zero; for
//! HTTP/1.1 a socket the client does not read. A body waiting on its own source (the upstream)
//! is not stalled: the upstream's silence is the body idle timeout's business.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::clients::Share;
use crate::telemetry::Logged;

/// Every lock of a connection's state recovers from poisoning ([`crate::lock`]).
pub(super) use crate::lock::lock;

/// Milliseconds since the process's first look at the clock: stall times fit in an atomic.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    // +1: 0 means "not the client's turn".
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// One request's progress, and the means to reset it alone (HTTP/2).
#[derive(Debug, Default)]
pub(super) struct Stream {
    /// When the client's turn to take the response began (the last chunk handed to hyper, or
    /// the response head), in [`now_ms`]; 0 while the handler runs or the body waits on its
    /// source.
    waiting_since: AtomicU64,
    /// The HTTP/2 stream's task ([`StreamExec`]); aborting it resets the stream (`CANCEL`) and
    /// drops its bodies, freeing the request slot and the upstream connection they hold.
    task: OnceLock<AbortHandle>,
}

impl Stream {
    /// The client's turn to take the response starts now.
    fn client_turn(&self) {
        self.waiting_since.store(now_ms(), Ordering::Release);
    }

    /// The body is waiting on its source: not the client's fault.
    fn source_turn(&self) {
        self.waiting_since.store(0, Ordering::Release);
    }

    /// True when the client has taken nothing of the response for `at_least`.
    pub(super) fn stalled_for(&self, at_least: Duration) -> bool {
        let since = self.waiting_since.load(Ordering::Acquire);
        since != 0
            && now_ms().saturating_sub(since) >= u64::try_from(at_least.as_millis()).unwrap_or(0)
    }

    /// Resets the HTTP/2 stream; false for HTTP/1.1 (nothing to reset short of the connection).
    pub(super) fn reset(&self) -> bool {
        match self.task.get() {
            Some(task) => {
                task.abort();
                true
            }
            None => false,
        }
    }
}

/// The executor of one HTTP/2 connection's stream tasks. hyper calls the service for a new
/// stream and hands its task to the executor right after, on the connection's own task, so the
/// [`Stream`] the service made last is the one whose task arrives next.
#[derive(Clone, Default)]
pub(super) struct StreamExec {
    next: Arc<Mutex<Option<Arc<Stream>>>>,
}

impl StreamExec {
    /// The stream whose task comes next.
    pub(super) fn expect(&self, stream: Arc<Stream>) {
        *lock(&self.next) = Some(stream);
    }
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let task = tokio::spawn(fut);
        if let Some(stream) = lock(&self.next).take() {
            let _ = stream.task.set(task.abort_handle());
        }
    }
}

/// Requests in flight on one connection, since when it has had none, and since when a write to
/// it has been stuck.
pub(super) struct ConnState {
    active: AtomicUsize,
    /// Blob uploads among them.
    pub(super) uploads: AtomicUsize,
    served: AtomicBool,
    since: Mutex<Instant>,
    /// Since when a write has been pending, and the task to wake to cut it.
    stalled: Mutex<Option<(Instant, Waker)>>,
    /// Set to cut a stalled connection at once (its socket is reset).
    pub(super) abort: AtomicBool,
    /// Set when the server drains: each response says `Connection: close`.
    pub(super) draining: AtomicBool,
    /// The requests in flight.
    streams: Mutex<Vec<Arc<Stream>>>,
}

impl ConnState {
    pub(super) fn new() -> ConnState {
        ConnState {
            active: AtomicUsize::new(0),
            uploads: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            since: Mutex::new(Instant::now()),
            stalled: Mutex::new(None),
            abort: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            streams: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn stalled_since(&self) -> Option<Instant> {
        lock(&self.stalled).as_ref().map(|(t, _)| *t)
    }

    /// A write is pending (since the first time it was seen pending); `waker` cuts it.
    pub(super) fn write_pending(&self, waker: &Waker) {
        let mut stalled = lock(&self.stalled);
        let since = stalled.as_ref().map_or_else(Instant::now, |(t, _)| *t);
        *stalled = Some((since, waker.clone()));
    }

    /// Writes progress again.
    pub(super) fn write_done(&self) {
        *lock(&self.stalled) = None;
    }

    /// Cuts a stalled connection: its pending write fails and its socket is reset.
    pub(super) fn cut(&self) {
        self.abort.store(true, Ordering::Release);
        if let Some((_, waker)) = lock(&self.stalled).as_ref() {
            waker.wake_by_ref();
        }
    }

    /// True when the connection may be shed at the connection limit: idle for `idle_after`, a
    /// write stuck for `stuck_after`, or every request in flight stalled for `stalled_after`.
    pub(super) fn sheddable(
        &self,
        idle_after: Duration,
        stuck_after: Duration,
        stalled_after: Duration,
    ) -> bool {
        let write_stuck = self
            .stalled_since()
            .is_some_and(|t| t.elapsed() >= stuck_after);
        let idle = self.idle_since().is_some_and(|t| t.elapsed() >= idle_after);
        write_stuck || idle || self.all_stalled(stalled_after)
    }

    /// True when requests are in flight and every one of them is stalled for `at_least`.
    pub(super) fn all_stalled(&self, at_least: Duration) -> bool {
        let streams = lock(&self.streams);
        !streams.is_empty() && streams.iter().all(|s| s.stalled_for(at_least))
    }

    /// True when a request in flight is stalled for `at_least`.
    pub(super) fn any_stalled(&self, at_least: Duration) -> bool {
        lock(&self.streams).iter().any(|s| s.stalled_for(at_least))
    }

    /// The requests in flight stalled for `at_least`.
    pub(super) fn stalled_streams(&self, at_least: Duration) -> Vec<Arc<Stream>> {
        lock(&self.streams)
            .iter()
            .filter(|s| s.stalled_for(at_least))
            .cloned()
            .collect()
    }

    /// Requests in flight.
    pub(super) fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    fn limit(&self, first: Duration, idle: Duration) -> Duration {
        if self.served.load(Ordering::Acquire) {
            idle
        } else {
            first
        }
    }

    /// When to look again: the end of the idle allowance, or (while busy) one allowance away.
    pub(super) fn idle_deadline(&self, first: Duration, idle: Duration) -> Instant {
        let limit = self.limit(first, idle);
        if self.active() > 0 {
            return Instant::now() + limit;
        }
        *lock(&self.since) + limit
    }

    /// Since when no request has been in flight, if none is.
    pub(super) fn idle_since(&self) -> Option<Instant> {
        if self.active() > 0 {
            return None;
        }
        Some(*lock(&self.since))
    }

    /// True once a request has started on this connection.
    pub(super) fn has_served(&self) -> bool {
        self.served.load(Ordering::Acquire)
    }

    pub(super) fn is_idle_since(&self, first: Duration, idle: Duration) -> bool {
        self.active() == 0 && lock(&self.since).elapsed() >= self.limit(first, idle)
    }
}

/// What a request holds while it is in flight.
#[derive(Default)]
pub(super) struct Holds {
    /// Its slot of `--max-requests` (none for health checks, which are outside every budget).
    pub(super) request: Option<OwnedSemaphorePermit>,
    /// Its slot in its client's share of requests.
    pub(super) share: Option<Share>,
    /// The server-wide upload count, when it is a blob upload.
    pub(super) upload: Option<Gauge>,
}

/// One request in flight: counted on its connection (and its slots held) until its response
/// body is done (or dropped).
pub(super) struct InFlight {
    state: Arc<ConnState>,
    stream: Arc<Stream>,
    holds: Holds,
}

impl InFlight {
    pub(super) fn enter(state: Arc<ConnState>, stream: Arc<Stream>, holds: Holds) -> InFlight {
        state.served.store(true, Ordering::Release);
        state.active.fetch_add(1, Ordering::AcqRel);
        lock(&state.streams).push(stream.clone());
        let mut entered = InFlight {
            state,
            stream,
            holds: Holds::default(),
        };
        entered.hold(holds);
        entered
    }

    /// Holds `holds` too (the slots admission took).
    pub(super) fn hold(&mut self, holds: Holds) {
        if let Some(uploads) = &holds.upload {
            uploads.inc();
            self.state.uploads.fetch_add(1, Ordering::AcqRel);
        }
        self.holds = holds;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // The slots go back first: a request waiting for one may go on at once.
        drop(self.holds.request.take());
        drop(self.holds.share.take());
        {
            let mut streams = lock(&self.state.streams);
            if let Some(i) = streams.iter().position(|s| Arc::ptr_eq(s, &self.stream)) {
                streams.swap_remove(i);
            }
        }
        *lock(&self.state.since) = Instant::now();
        self.state.active.fetch_sub(1, Ordering::AcqRel);
        if let Some(uploads) = &self.holds.upload {
            uploads.dec();
            self.state.uploads.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted until it is done, and tells its
    /// [`Stream`] whose turn it is: the client's once a chunk (or the head) is handed over, the
    /// source's while the body waits for data.
    pub(super) struct Tracked {
        #[pin]
        inner: Logged<ProxyBody>,
        guard: Option<InFlight>,
    }
}

impl Tracked {
    /// A response outside any request count.
    pub(super) fn without(inner: Logged<ProxyBody>) -> Tracked {
        Tracked { inner, guard: None }
    }

    /// The response of the request `guard` counts: from now on, its progress is the client's.
    pub(super) fn new(inner: Logged<ProxyBody>, guard: InFlight) -> Tracked {
        guard.stream.client_turn();
        Tracked {
            inner,
            guard: Some(guard),
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = crate::error::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Some(guard) = this.guard.as_ref() {
            match polled {
                Poll::Pending => guard.stream.source_turn(),
                Poll::Ready(_) => guard.stream.client_turn(),
            }
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
