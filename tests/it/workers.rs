//! Thread-per-core (`--workers`): connections spread over the worker threads, each worker keeps
//! upstream connections of its own, and the bound on upstream connections still holds over all
//! of them: a worker whose pool is empty while another's idle connections hold every permit
//! borrows one of those instead of waiting for a permit that never frees.

use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Response;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use regrelay::body;
use support::{metrics, Regrelay};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An origin answering every request `200 {}` that counts the connections it accepts.
async fn counting_origin() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    support::upstream::counting(|stream| async move {
        let svc = service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(Response::new(body::full("{}")))
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    })
    .await
}

/// `GET /v2/` on the keep-alive connection `conn`; the status line.
async fn get_v2(conn: &mut TcpStream) -> String {
    conn.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The answer is small: read until its body (`{}`, or an error's JSON) has arrived.
    while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"}") {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    text.lines().next().unwrap().to_owned()
}

/// regrelay with two workers (and its metrics listener) and `max_upstream` upstream connections in front of a counting
/// origin; a first client's `GET /v2/`, then (the first still connected) a second client's, each
/// answered 200. The least loaded worker takes each connection: the two are on different workers.
async fn two_clients(max_upstream: &str) -> (Regrelay, [TcpStream; 2], Arc<AtomicUsize>) {
    two_clients_on(max_upstream, "2").await
}

/// [`two_clients`] with `--workers WORKERS` (with 0 the two share one runtime).
async fn two_clients_on(
    max_upstream: &str,
    workers: &str,
) -> (Regrelay, [TcpStream; 2], Arc<AtomicUsize>) {
    let (origin, accepted) = counting_origin().await;
    let registry = format!("http://{origin}");
    let px = Regrelay::start(&[
        "--registry",
        &registry,
        "--workers",
        workers,
        "--max-upstream-connections",
        max_upstream,
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let mut first = TcpStream::connect(px.addr).await.unwrap();
    assert_eq!(get_v2(&mut first).await, "HTTP/1.1 200 OK");
    let mut second = TcpStream::connect(px.addr).await.unwrap();
    assert_eq!(get_v2(&mut second).await, "HTTP/1.1 200 OK");
    (px, [first, second], accepted)
}

#[tokio::test(flavor = "multi_thread")]
async fn each_worker_has_its_own_upstream_connections() {
    let (px, [mut first, mut second], accepted) = two_clients("2").await;
    // One upstream connection per worker: one shared pool would have reused the first.
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // The operator sees one connection on each worker.
    let (_, _, text) = metrics::scrape(metrics::addr(&px)).await;
    for worker in ["worker=\"0\"", "worker=\"1\""] {
        let open = metrics::value(&text, "regrelay_worker_connections", &[worker]);
        assert_eq!(open, 1.0, "{worker}\n{text}");
    }
    // Each reuses its own from then on.
    for _ in 0..5 {
        assert_eq!(get_v2(&mut first).await, "HTTP/1.1 200 OK");
        assert_eq!(get_v2(&mut second).await, "HTTP/1.1 200 OK");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_borrows_an_idle_connection_when_another_worker_holds_every_permit() {
    // After the first answer the only upstream connection is idle in the first worker's pool.
    // The second client's worker has none and no permit is free: waiting for one fails after
    // the upstream queue's 2 s (502: an idle connection keeps its permit for 90 s), so the
    // second answer (200, checked by `two_clients`) came over the first worker's connection.
    let (_px, _clients, accepted) = two_clients("1").await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_workers_every_connection_shares_one_runtime_and_one_pool() {
    let (px, [mut first, mut second], accepted) = two_clients_on("2", "0").await;
    // One pool: the second client's request took the first one's idle upstream connection.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(get_v2(&mut first).await, "HTTP/1.1 200 OK");
    assert_eq!(get_v2(&mut second).await, "HTTP/1.1 200 OK");
    let (_, _, text) = metrics::scrape(metrics::addr(&px)).await;
    assert!(
        !text.contains("regrelay_worker_connections{"),
        "no worker threads, no per-worker samples\n{text}"
    );
}
