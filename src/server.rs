//! The accept loop: connection limit, TLS handshake with a deadline, HTTP/1.1 and HTTP/2 (ALPN,
//! or h2c prior knowledge on plain TCP) through hyper-util's auto builder, header-read timeout,
//! and a graceful drain with a deadline on shutdown. The only module that accepts sockets.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::app::{App, ConnInfo};

/// Pause after a failed `accept` (e.g. EMFILE) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF_MS: u64 = 100;

/// Serves `listener` until `shutdown` resolves, then stops accepting and gives in-flight requests
/// the configured grace period before returning.
pub async fn run(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    let cfg = app.config();
    let timeouts = cfg.timeouts;
    let tls = cfg.server_tls.clone().map(TlsAcceptor::from);
    let limit = Arc::new(Semaphore::new(cfg.max_connections.get()));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = ConnInfo {
            peer,
            tls: tls.is_some(),
        };
        let (app, builder, tls, watcher) = (
            app.clone(),
            builder.clone(),
            tls.clone(),
            graceful.watcher(),
        );
        tokio::spawn(async move {
            serve_connection(
                stream,
                conn,
                app,
                builder,
                tls,
                watcher,
                timeouts.tls_handshake,
            )
            .await;
            drop(permit);
        });
    }
    drop(listener);
    let grace = timeouts.shutdown_grace;
    tracing::info!(
        in_flight = graceful.count(),
        grace_secs = grace.as_secs(),
        "draining"
    );
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("drained"),
        Err(_) => tracing::warn!("grace period over; closing remaining connections"),
    }
}

async fn serve_connection(
    stream: TcpStream,
    conn: ConnInfo,
    app: Arc<App>,
    builder: auto::Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
    watcher: Watcher,
    handshake_timeout: Duration,
) {
    let service = service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(app.handle(req, conn).await) }
    });
    let result = match tls {
        None => {
            let io = TokioIo::new(stream);
            watcher
                .watch(
                    builder
                        .serve_connection_with_upgrades(io, service)
                        .into_owned(),
                )
                .await
        }
        Some(acceptor) => {
            let stream =
                match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(err)) => {
                        tracing::debug!(peer = %conn.peer, error = %err, "tls handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %conn.peer, "tls handshake timed out");
                        return;
                    }
                };
            let io = TokioIo::new(stream);
            watcher
                .watch(
                    builder
                        .serve_connection_with_upgrades(io, service)
                        .into_owned(),
                )
                .await
        }
    };
    if let Err(err) = result {
        tracing::debug!(peer = %conn.peer, error = %err, "connection ended with error");
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!(signal = "SIGINT", "shutting down"),
        () = term => tracing::info!(signal = "SIGTERM", "shutting down"),
    }
}
