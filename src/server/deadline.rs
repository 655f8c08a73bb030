//! A client socket with a deadline on its writes: a client that stops reading cannot pin a
//! response (and the upstream connection behind it) forever.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::state::ConnState;

/// A client connection's socket: plain TCP or TLS over TCP.
pub(super) trait Socket: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;
}

impl Socket for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Socket for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// A client socket whose writes fail once they cannot progress for `stall` (or when the
/// connection is cut at the connection limit): a client that stops reading cannot pin a response
/// (and its upstream connection) forever. The socket is then reset, so the kernel does not keep
/// the unread response queued for it either. The timer is armed only when a write is pending, so
/// the fast path costs nothing.
pub(super) struct Deadlined<I> {
    io: I,
    stall: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    state: Arc<ConnState>,
}

impl<I: Socket> Deadlined<I> {
    /// Wraps `io`; stalls are reported to `state`.
    pub(super) fn new(io: I, stall: Duration, state: Arc<ConnState>) -> Self {
        Deadlined {
            io,
            stall,
            timer: None,
            state,
        }
    }

    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        let cut = self.state.abort.load(Ordering::Acquire);
        if polled.is_ready() && !cut {
            if self.timer.take().is_some() {
                self.state.write_done();
            }
            return polled;
        }
        let stall = self.stall;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        let expired = timer.as_mut().poll(cx).is_ready();
        self.state.write_pending(cx.waker());
        if !(expired || cut) {
            return Poll::Pending;
        }
        // Reset rather than queue a FIN behind data the client will never read.
        let _ = socket2::SockRef::from(self.io.tcp()).set_linger(Some(Duration::ZERO));
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("client did not read for {} s", stall.as_secs()),
        )))
    }
}

impl<I: Socket> AsyncRead for Deadlined<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: Socket> AsyncWrite for Deadlined<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}
