//! Body types of the proxy path.
//!
//! [`ProxyBody`] is what flows both ways: the client's `Incoming` stream, the upstream's
//! `Incoming` stream, or a small synthetic body (error JSON, health). It is a boxed body so later
//! transformations (per-frame wrappers) compose without an enum per combination; the cost is one
//! virtual call per frame, invisible next to a socket write. [`Watched`] wraps a stream to count
//! bytes and to fail when the *source* stays silent longer than the idle timeout. Nothing here
//! ever collects a body.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::error::BoxError;

/// The body type of every request and response regrelay sends.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A small in-memory body (synthetic responses only).
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The source of a body stayed silent for longer than the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("body idle for more than {} s", .0.as_secs())]
pub struct IdleTimeout(pub Duration);

pin_project! {
    /// Counts data bytes into a shared counter and fails with [`IdleTimeout`] when the inner body
    /// returns `Pending` for longer than `idle`. The clock runs only while *we* wait on the source,
    /// so a slow reader on the other side (back-pressure) never trips it.
    pub struct Watched<B> {
        #[pin]
        inner: B,
        #[pin]
        deadline: Sleep,
        idle: Duration,
        waiting: bool,
        bytes: Option<Arc<AtomicU64>>,
        from_client: bool,
    }
}

/// An error of a client's request body (aborted upload, malformed chunk): marks the failure as
/// the client's, whatever layer reports it.
#[derive(Debug, thiserror::Error)]
#[error("client request body: {0}")]
pub struct ClientError(#[source] pub BoxError);

impl<B> Watched<B> {
    /// Wraps `inner`; `bytes`, when given, receives the running count of data bytes.
    pub fn new(inner: B, idle: Duration, bytes: Option<Arc<AtomicU64>>) -> Self {
        Watched {
            inner,
            deadline: tokio::time::sleep(idle),
            idle,
            waiting: false,
            bytes,
            from_client: false,
        }
    }

    /// Wraps a client's request body: its errors become [`ClientError`]s.
    pub fn client(inner: B, idle: Duration, bytes: Arc<AtomicU64>) -> Self {
        let mut w = Watched::new(inner, idle, Some(bytes));
        w.from_client = true;
        w
    }
}

impl<B> Body for Watched<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.waiting = false;
                if let (Some(data), Some(bytes)) = (frame.data_ref(), this.bytes.as_ref()) {
                    bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) if *this.from_client => {
                Poll::Ready(Some(Err(Box::new(ClientError(e.into())))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if !*this.waiting {
                    *this.waiting = true;
                    let at = Instant::now() + *this.idle;
                    this.deadline.as_mut().reset(at);
                }
                match this.deadline.poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(IdleTimeout(*this.idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// True when `err` or one of its sources is an [`IdleTimeout`].
pub fn is_idle_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<IdleTimeout>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// The client's own body error, when `err` or one of its sources is a [`ClientError`].
pub fn client_error(err: &(dyn std::error::Error + 'static)) -> Option<BoxError> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(ClientError(inner)) = e.downcast_ref::<ClientError>() {
            return Some(inner.to_string().into());
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// A body fed from a channel, so a test controls when frames arrive.
    struct ChannelBody(mpsc::Receiver<Bytes>);

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silent_source_times_out_and_bytes_are_counted() {
        let (tx, rx) = mpsc::channel(1);
        let bytes = Arc::new(AtomicU64::new(0));
        let mut body = std::pin::pin!(Watched::new(
            ChannelBody(rx),
            Duration::from_secs(5),
            Some(bytes.clone())
        ));
        tx.send(Bytes::from_static(b"abc")).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        assert_eq!(bytes.load(Ordering::Relaxed), 3);
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(is_idle_timeout(err.as_ref()), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn each_wait_gets_the_whole_idle_time_and_no_more() {
        let (tx, rx) = mpsc::channel(1);
        let mut body = std::pin::pin!(Watched::new(ChannelBody(rx), Duration::from_secs(5), None));
        let feeder = tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                tx.send(Bytes::from_static(b"x")).await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        // Ten waits of 3 s each: 30 s in all, far past the first timer's 5 s, none idle.
        for _ in 0..10 {
            assert!(body.frame().await.unwrap().is_ok());
        }
        let last = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(is_idle_timeout(err.as_ref()), "{err}");
        assert_eq!(last.elapsed(), Duration::from_secs(5));
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn back_pressure_does_not_count_as_idle() {
        let (tx, rx) = mpsc::channel(4);
        let bytes = Arc::new(AtomicU64::new(0));
        let mut body = std::pin::pin!(Watched::new(
            ChannelBody(rx),
            Duration::from_secs(5),
            Some(bytes)
        ));
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // The reader is slow (we do not poll for 60 s) while data is already waiting.
        tx.send(Bytes::from_static(b"b")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(body.frame().await.unwrap().is_ok());
        drop(tx);
        assert!(body.frame().await.is_none());
    }
}
