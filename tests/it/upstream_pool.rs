//! regrelay's own upstream connections (`src/upstream/pool.rs`): each is driven by the request
//! that holds it, and goes back to its worker's pool when the answer ends. These pin what the
//! pool must keep doing, against origins that answer as real servers may:
//! - an answer with no body (`HEAD`, `204`), which hyper never reads, still hands its
//!   connection back (a connection per `HEAD` would be a dial per manifest check of a pull);
//! - a connection the upstream closed while it sat idle costs no request: it is found closed
//!   when taken, or the request it never sent goes on another (the test fails only without
//!   both);
//! - a request whose answer stalls holds only its own connection: another request on the same
//!   worker is served meanwhile.

use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::Regrelay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// How an origin behaves after each answer.
#[derive(Clone, Copy, PartialEq)]
enum After {
    /// Keeps the connection for the next request.
    KeepAlive,
    /// Closes it, without saying so in the answer (as a server whose keep-alive timeout has
    /// just run out does).
    Close,
}

/// A raw HTTP/1.1 origin that counts the connections it accepts. `HEAD` is answered `200` with
/// `Content-Length: 2` and no body; `GET …/manifests/empty` `204`; `GET …/manifests/stall` with
/// the head and one byte of its two, the other once `release` is notified; any other `GET`
/// `200 {}`.
async fn origin(after: After, release: Arc<Notify>) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    support::upstream::counting(move |stream| serve(stream, after, release.clone())).await
}

async fn serve(mut stream: TcpStream, after: After, release: Arc<Notify>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let line = head.lines().next().unwrap_or_default();
        let answered = if line.starts_with("HEAD ") {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
                .await
        } else if line.starts_with("GET /v2/g/app/manifests/empty ") {
            stream.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await
        } else if line.starts_with("GET /v2/g/app/manifests/stall ") {
            let head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{";
            let sent = stream.write_all(head).await;
            release.notified().await;
            sent.and(stream.write_all(b"}").await)
        } else {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                .await
        };
        if answered.is_err() || after == After::Close {
            return;
        }
    }
}

/// One request on the keep-alive connection `conn`: its status line, after the whole answer
/// (`body` bytes after the head) has arrived.
async fn ask(conn: &mut TcpStream, request: &str, body: usize) -> String {
    conn.write_all(format!("{request} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            if got.len() >= end + 4 + body {
                break;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    text.lines().next().unwrap().to_owned()
}

fn start(origin: std::net::SocketAddr, workers: &str) -> Regrelay {
    Regrelay::start(&[
        "--registry",
        &format!("http://{origin}"),
        "--workers",
        workers,
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_without_a_body_hand_their_connection_back() {
    let (addr, accepted) = origin(After::KeepAlive, Arc::default()).await;
    let px = start(addr, "1");
    let mut client = TcpStream::connect(px.addr).await.unwrap();
    for _ in 0..5 {
        let status = ask(&mut client, "HEAD /v2/g/app/manifests/latest", 0).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(
            ask(&mut client, "GET /v2/g/app/manifests/empty", 0).await,
            "HTTP/1.1 204 No Content"
        );
        assert_eq!(ask(&mut client, "GET /v2/", 2).await, "HTTP/1.1 200 OK");
    }
    // Fifteen answers, one after another, over the one upstream connection.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_the_upstream_closed_while_idle_is_not_used() {
    let (addr, accepted) = origin(After::Close, Arc::default()).await;
    let px = start(addr, "1");
    let mut client = TcpStream::connect(px.addr).await.unwrap();
    for i in 1..=5 {
        // Each went on a new connection: the pooled one had been closed, and no request was
        // lost to it (a 502 here).
        assert_eq!(
            ask(&mut client, "GET /v2/", 2).await,
            "HTTP/1.1 200 OK",
            "#{i}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), i);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_answer_holds_only_its_own_connection() {
    let release = Arc::new(Notify::new());
    let (addr, accepted) = origin(After::KeepAlive, release.clone()).await;
    // One worker: both clients' requests are driven by the same thread.
    let px = start(addr, "1");
    let mut stalled = TcpStream::connect(px.addr).await.unwrap();
    stalled
        .write_all(b"GET /v2/g/app/manifests/stall HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // The stalled answer's head and first byte are through.
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"{") {
        let n = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut buf))
            .await
            .expect("the head within 10 s")
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let mut other = TcpStream::connect(px.addr).await.unwrap();
    for _ in 0..3 {
        assert_eq!(ask(&mut other, "GET /v2/", 2).await, "HTTP/1.1 200 OK");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // The stalled answer ends, and its connection is reused after it.
    release.notify_one();
    let n = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut buf))
        .await
        .expect("the rest within 10 s")
        .unwrap();
    assert_eq!(&buf[..n], b"}");
    for _ in 0..3 {
        assert_eq!(ask(&mut stalled, "GET /v2/", 2).await, "HTTP/1.1 200 OK");
        assert_eq!(ask(&mut other, "GET /v2/", 2).await, "HTTP/1.1 200 OK");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}
