//! SIGTERM: stop accepting, let in-flight uploads finish within the grace period, then exit 0;
//! past the grace period, exit anyway.

mod support;

use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use regrelay::body;
use support::upstream::{self, drain};
use support::Regrelay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn sink() -> upstream::Origin {
    upstream::serve(|req: Request<hyper::body::Incoming>| async move {
        let n = drain(req.into_body()).await.unwrap_or(0);
        let mut resp = Response::new(body::full(n.to_string()));
        *resp.status_mut() = StatusCode::ACCEPTED;
        resp
    })
    .await
}

#[tokio::test]
async fn sigterm_drains_an_in_flight_upload_then_exits() {
    let origin = sink().await;
    let mut px = Regrelay::start(&["--registry", &origin.url(), "--shutdown-grace-secs", "20"]);
    let mut s = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    s.write_all(
        b"PATCH /v2/g/p/blobs/uploads/u HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    px.terminate();
    assert!(
        px.output
            .wait_for("draining", Duration::from_secs(5))
            .is_some(),
        "{}",
        px.output.text()
    );
    // New connections are refused once the listener is gone.
    let refused = tokio::net::TcpStream::connect(px.addr).await;
    assert!(refused.is_err(), "still accepting after SIGTERM");
    s.write_all(b"cd").await.unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        answer.starts_with("HTTP/1.1 202") && answer.ends_with("4"),
        "{answer}"
    );
    let status = px
        .wait_exit(Duration::from_secs(10))
        .expect("regrelay did not exit after draining");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn grace_period_bounds_the_drain() {
    let origin = sink().await;
    let mut px = Regrelay::start(&["--registry", &origin.url(), "--shutdown-grace-secs", "1"]);
    let mut s = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    s.write_all(
        b"PATCH /v2/g/p/blobs/uploads/u HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    px.terminate();
    let status = px
        .wait_exit(Duration::from_secs(10))
        .expect("regrelay did not exit after its grace period");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
    assert!(
        px.output.text().contains("grace period over"),
        "{}",
        px.output.text()
    );
}
