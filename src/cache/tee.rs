//! [`Tee`]: an upstream body that goes to the client and into the cache at the same time.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::oneshot;

use super::fill::{WriteTask, WRITE_BATCH_BYTES};
use super::{CacheError, Writer};
use crate::error::BoxError;

pin_project! {
    /// Yields the upstream's frames unchanged and writes their data to a cache [`Writer`].
    ///
    /// - Frames go to the client as they come; their data is written in batches of
    ///   [`WRITE_BATCH_BYTES`], each in a blocking task. While a batch is written the tee keeps
    ///   reading up to one more batch, then waits: a slow disk slows the upstream down (memory
    ///   stays at two batches per fill), a fast one never does.
    /// - The last data frame is held back until the digest is verified: on a mismatch the
    ///   client's body ends with an error instead of that frame, so even a `Content-Length`
    ///   response is visibly cut short rather than complete and wrong. The rest of the commit
    ///   (fsync, rename, index) goes on in the background: the client never waits for the disk
    ///   to flush, and the entry lands even if the client has gone.
    /// - A cache failure (disk full, too large, i/o) never fails the client: the fill is
    ///   aborted (followers fetch for themselves) and the frames keep flowing.
    /// - An upstream error reaches the client and aborts the fill; so does dropping the body
    ///   before its end (a client that went away).
    pub struct Tee<B> {
        #[pin]
        inner: B,
        filling: Filling,
        verified: Option<oneshot::Receiver<Result<(), CacheError>>>,
        held: Option<Frame<Bytes>>,
        ended: bool,
    }
}

impl<B> Tee<B> {
    /// Tees `inner` (the upstream's response body for the writer's digest) into `writer`.
    pub fn new(inner: B, writer: Writer) -> Tee<B> {
        Tee {
            inner,
            filling: Filling {
                writer: Some(writer),
                write: None,
            },
            verified: None,
            held: None,
            ended: false,
        }
    }
}

/// The cache side of a tee: the writer, and the batch being written.
struct Filling {
    /// `None` once the fill is committed or given up.
    writer: Option<Writer>,
    write: Option<WriteTask>,
}

impl Filling {
    /// Drives the batches. `Ready` when the tee may go on: no batch in flight, or one in flight
    /// and room for another; `Pending` while it waits for the disk (and, once `ended`, until
    /// the last batch is written).
    fn poll_room(&mut self, ended: bool, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let Some(writer) = self.writer.as_mut() else {
                // Given up: a batch still being written is of no use.
                self.write = None;
                return Poll::Ready(());
            };
            let full = writer.pending_len() >= WRITE_BATCH_BYTES;
            if let Some(task) = self.write.as_mut() {
                match Pin::new(task).poll(cx) {
                    Poll::Ready(out) => {
                        self.write = None;
                        if let Err(e) = writer.finish_write(out) {
                            self.give_up(&e);
                        }
                    }
                    Poll::Pending if full || ended => return Poll::Pending,
                    Poll::Pending => return Poll::Ready(()),
                }
            } else if full {
                match writer.start_flush() {
                    Ok(task) => self.write = Some(task),
                    Err(e) => self.give_up(&e),
                }
            } else {
                return Poll::Ready(());
            }
        }
    }

    fn push(&mut self, data: &Bytes) {
        if let Some(w) = self.writer.as_mut() {
            if let Err(e) = w.push(data.clone()) {
                self.give_up(&e);
            }
        }
    }

    /// Stops filling; the client is still served.
    fn give_up(&mut self, e: &CacheError) {
        if let Some(w) = self.writer.take() {
            let digest = w.digest();
            tracing::warn!(%digest, error = %e, "cache: fill given up, still serving the client");
            w.abort();
        }
    }

    fn abort(&mut self) {
        if let Some(w) = self.writer.take() {
            w.abort();
        }
    }
}

impl<B> Body for Tee<B>
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
        loop {
            ready!(this.filling.poll_room(*this.ended, cx));
            if let Some(verified) = this.verified.as_mut() {
                let verified = ready!(Pin::new(verified).poll(cx));
                *this.verified = None;
                match verified {
                    Ok(Ok(())) => {}
                    Ok(Err(e @ CacheError::DigestMismatch { .. })) => {
                        *this.held = None;
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                    // Not checked, for a fault of the cache: the client gets what the upstream
                    // sent, as it would without a cache.
                    Ok(Err(e)) => tracing::warn!(error = %e, "cache: commit failed"),
                    Err(_) => tracing::warn!("cache: commit task lost"),
                }
            }
            if *this.ended {
                // The last batch is written (poll_room waited for it); the commit writes the
                // rest.
                if let Some(w) = this.filling.writer.take() {
                    *this.verified = Some(w.commit_detached());
                    continue;
                }
                return Poll::Ready(this.held.take().map(Ok));
            }
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                None => *this.ended = true,
                Some(Err(e)) => {
                    this.filling.abort();
                    *this.ended = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        this.filling.push(data);
                    }
                    if this.filling.writer.is_some() && this.inner.is_end_stream() {
                        *this.held = Some(frame);
                        *this.ended = true;
                        continue;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
            }
        }
    }

    /// `false` until the digest is verified: a server that trusted the upstream's end would
    /// stop polling before the check, and the fill would never be committed.
    fn is_end_stream(&self) -> bool {
        self.ended
            && self.filling.writer.is_none()
            && self.filling.write.is_none()
            && self.verified.is_none()
            && self.held.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.held.as_ref().and_then(Frame::data_ref);
        let held = held.map_or(0, |d| d.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}
