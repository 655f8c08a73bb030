//! Timeouts and limits that fit registry traffic: slow headers and silent bodies are cut off, the
//! connection limit holds, and there is no total-request timeout.

mod support;

use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use regrelay::body;
use support::upstream::{self, drain, raw};
use support::Regrelay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn sink() -> upstream::Origin {
    upstream::serve(|req: Request<hyper::body::Incoming>| async move {
        let ok = drain(req.into_body()).await.is_ok();
        let mut resp = Response::new(body::full(if ok { "ok" } else { "broken" }));
        *resp.status_mut() = StatusCode::ACCEPTED;
        resp
    })
    .await
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let origin = sink().await;
    let px = Regrelay::start(&[
        "--registry",
        &origin.url(),
        "--header-read-timeout-secs",
        "1",
    ]);
    let start = Instant::now();
    let answer = raw(
        px.addr,
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(10),
    )
    .await;
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "slow-header connection held for {took:?}"
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_silent_upload_is_ended_but_a_slow_one_is_not() {
    let origin = sink().await;
    let px = Regrelay::start(&["--registry", &origin.url(), "--body-idle-timeout-secs", "2"]);
    // Slow but steady: 6 chunks, one per second, for longer than the idle timeout in total.
    let mut s = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    s.write_all(b"PATCH /v2/g/p/blobs/uploads/u HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        s.write_all(b"x").await.unwrap();
    }
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 202"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Silent: 2 of 100 bytes, then nothing.
    let start = Instant::now();
    let answer = raw(
        px.addr,
        b"PATCH /v2/g/p/blobs/uploads/u HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab",
        Duration::from_secs(15),
    )
    .await;
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "silent body held for {:?}",
        start.elapsed()
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert!(
        px.output.wait_for("idle", Duration::from_secs(5)).is_some(),
        "{}",
        px.output.text()
    );
}

#[tokio::test]
async fn connection_limit_queues_behind_busy_connections_and_sheds_idle_ones() {
    let origin = sink().await;
    let px = Regrelay::start(&["--registry", &origin.url(), "--max-connections", "1"]);
    let get = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut buf = [0u8; 512];
    // The only slot is busy: an upload whose body is still coming.
    let mut first = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    first
        .write_all(b"PATCH /v2/g/p/blobs/uploads/u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    second.write_all(get).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(1500), second.read(&mut buf)).await;
    assert!(
        waited.is_err(),
        "second connection served while a busy one held the only slot"
    );
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 202"));
    // Now the second connection is idle (keep-alive): at the limit it is shed for a newcomer.
    let mut third = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    third.write_all(get).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(3), third.read(&mut buf))
        .await
        .expect("an idle connection was shed for a waiting one")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 202"));
    let eof = tokio::time::timeout(Duration::from_secs(1), second.read(&mut buf)).await;
    assert!(
        matches!(eof, Ok(Ok(0)) | Ok(Err(_))),
        "the idle connection was closed"
    );
}
