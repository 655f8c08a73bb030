//! The admin listener (`--metrics-listen`): `GET /metrics` over HTTP/1.1 or h2c. It shares the
//! proxy listener's pause after a failed `accept` (out of file descriptors it waits rather than
//! spins) and its drain: it serves until the proxy's drain ends (scrapes go on through the
//! shutdown delay and the drain, when they matter most), then stops accepting, lets scrapes in
//! flight finish and closes idle connections. After a handover it stops at once: the new
//! process serves the same socket.
//!
//! Its connections are few and bounded ([`MAX_ADMIN_CONNECTIONS`], inside the open-file margin
//! [`crate::config::Limits::fds_needed`] keeps), so a scraper that opens many cannot take the
//! proxy's file descriptors. What the answer says is [`crate::metrics`]'.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::accept::AcceptBackoff;
use super::CLOSE_GRACE;
use crate::metrics::{self, Metrics};

/// Admin connections open at once; more wait in the kernel's backlog.
pub const MAX_ADMIN_CONNECTIONS: usize = 16;
/// Time a scraper has to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one admin connection (a scraper reconnects).
const MAX_CONNECTION_LIFE: Duration = Duration::from_secs(60);

/// Serves `listener` until `until` resolves, then drains: no new connection, scrapes in flight
/// finish (for at most the close grace), idle connections close. Returns once drained.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, until: impl Future<Output = ()>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let mut backoff = AcceptBackoff::new("metrics");
    tokio::pin!(until);
    loop {
        let accepted = tokio::select! {
            accepted = accept(&listener, &slots, &mut backoff) => accepted,
            () = &mut until => break,
        };
        let (stream, slot) = accepted;
        let metrics = metrics.clone();
        let service = service_fn(move |req: http::Request<Incoming>| {
            let answer = metrics::answer(&req, &metrics);
            async move { Ok::<_, Infallible>(answer) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(MAX_CONNECTION_LIFE, conn).await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(CLOSE_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("metrics connections did not close within the grace; cut");
    }
    tracing::info!("metrics listener closed");
}

/// A slot, then the next connection.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    backoff: &mut AcceptBackoff,
) -> (tokio::net::TcpStream, tokio::sync::OwnedSemaphorePermit) {
    let Ok(slot) = slots.clone().acquire_owned().await else {
        // The semaphore is never closed; were it, nothing more would be accepted.
        return std::future::pending().await;
    };
    let (stream, _) = backoff.accept(listener).await;
    (stream, slot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Reads from `s` until the text read contains `needle`; returns it.
    async fn read_until(s: &mut TcpStream, needle: &str) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains(needle) {
            let n = s.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed before {needle:?}: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// The drain's end is the admin listener's: it stops accepting, closes a scraper's idle
    /// keep-alive connection and returns (it used to serve until the process was gone).
    #[tokio::test]
    async fn serves_until_the_drain_ends_then_closes_and_returns() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (end_drain, drain_ended) = tokio::sync::oneshot::channel::<()>();
        let until = async {
            let _ = drain_ended.await;
        };
        let admin = tokio::spawn(serve(listener, Arc::new(Metrics::new()), until));
        let mut kept = TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
            .await
            .unwrap();
        let answer = read_until(&mut kept, "# EOF\n").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("regrelay_build_info"), "{answer}");

        end_drain.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), admin)
            .await
            .expect("the admin listener drains and returns")
            .unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "still accepting after the drain"
        );
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), kept.read(&mut buf))
            .await
            .expect("the idle keep-alive connection is closed")
            .unwrap_or(0);
        assert_eq!(n, 0, "{}", String::from_utf8_lossy(&buf[..n]));
    }
}
