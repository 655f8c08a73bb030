//! Timeouts and limits that fit registry traffic: slow headers and silent bodies are cut off, the
//! connection limit holds, and there is no total-request timeout.

use crate::support;

use std::time::Duration;

use http::{Request, Response};
use regrelay::body;
use support::upstream::{self, raw};
use support::{LocalRegrelay, Regrelay};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

// Deadlines on the paused clock: regrelay, the origin and the client share this runtime, so the
// clock jumps to the next timer whenever all of them wait, and the timeouts take no wall time.

#[tokio::test(start_paused = true)]
async fn slow_headers_are_cut_off() {
    let origin = upstream::sink().await;
    let px = LocalRegrelay::start(&[
        "--registry",
        &origin.url(),
        "--header-read-timeout-secs",
        "3",
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
        took >= Duration::from_secs(3) && took < Duration::from_secs(4),
        "slow-header connection held for {took:?}, not the header-read timeout's 3 s"
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_upload_is_ended_but_a_slow_one_is_not() {
    let origin = upstream::sink().await;
    let px = LocalRegrelay::start(&["--registry", &origin.url(), "--body-idle-timeout-secs", "2"]);
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
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(3),
        "silent body held for {took:?}, not the body idle timeout's 2 s"
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    let logged = px.output.text();
    assert!(logged.contains("idle"), "{logged}");
}

/// regrelay in front of `origin` with room for one client connection, and its metrics address.
/// Every connection here comes from 127.0.0.1: the whole pool is that one client's share, so
/// these tests see the global limit itself.
fn one_connection(origin: &upstream::Origin) -> (Regrelay, std::net::SocketAddr) {
    let px = Regrelay::start(&[
        "--registry",
        &origin.url(),
        "--max-connections",
        "1",
        "--client-share-percent",
        "100",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let maddr = support::metrics::addr(&px);
    (px, maddr)
}

/// Connections shed at the limit for `outcome` (`idle` or `stalled`), from a metrics scrape.
fn shed(text: &str, outcome: &str) -> f64 {
    let label = format!("outcome=\"{outcome}\"");
    support::metrics::value(text, "regrelay_connections_shed_total", &[&label])
}

#[tokio::test]
async fn connection_limit_queues_behind_busy_connections_and_sheds_idle_ones() {
    let origin = upstream::sink().await;
    let (px, maddr) = one_connection(&origin);
    let get = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut buf = [0u8; 512];
    // The only slot is busy: an upload whose body is still coming.
    let mut first = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    first
        .write_all(b"PATCH /v2/g/p/blobs/uploads/u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // It waits (on a reserve slot, for at most RESERVE_WAIT) for the busy one's slot.
    let mut second = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    second.write_all(get).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(1000), second.read(&mut buf)).await;
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
    // Counted as what it was: one idle connection shed, none cut for stalling.
    let (_, _, text) = support::metrics::scrape(maddr).await;
    assert_eq!(
        (shed(&text, "idle"), shed(&text, "stalled")),
        (1.0, 0.0),
        "{text}"
    );
}

/// A client that stops reading its response holds a slot only until someone waits for one: at
/// the limit it is cut (reset) after `SHED_STALLED_AFTER`, and the newcomer is served.
#[tokio::test]
async fn a_connection_not_reading_its_response_is_cut_for_a_waiting_one() {
    let big = bytes::Bytes::from(vec![7u8; 64 << 20]);
    let origin = upstream::serve(move |_req: Request<hyper::body::Incoming>| {
        let big = big.clone();
        async move { Response::new(body::full(big)) }
    })
    .await;
    let (px, maddr) = one_connection(&origin);
    // 64 MiB asked for and never read: regrelay's writes stall once the socket buffers are full.
    let mut reader = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    reader
        .write_all(b"GET /v2/g/p/blobs/sha256:0 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut newcomer = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    newcomer
        .write_all(b"HEAD /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), newcomer.read(&mut buf))
        .await
        .expect("the stalled connection was cut for a waiting one")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // The stalled connection was reset: reading it ends short of 64 MiB.
    let mut got = 0usize;
    let mut chunk = vec![0u8; 1 << 20];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok() && got < 64 << 20, "read {got} bytes");
    let (_, _, text) = support::metrics::scrape(maddr).await;
    assert_eq!(shed(&text, "stalled"), 1.0, "{text}");
}

/// HTTP/2 uploads over long round trips need large flow-control windows from the start: regrelay
/// advertises 8 MiB per stream (SETTINGS_INITIAL_WINDOW_SIZE) and raises the connection window to
/// 16 MiB (WINDOW_UPDATE on stream 0), where hyper's defaults (or adaptive windows, which start
/// at 64 KiB) held a 64 MiB upload over 50 ms to 0.68x of HTTP/1.1's speed.
#[tokio::test]
async fn http2_advertises_large_flow_control_windows() {
    let origin = upstream::sink().await;
    let px = Regrelay::start(&["--registry", &origin.url()]);
    let mut s = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    // Prior-knowledge HTTP/2 (h2c): the preface and an empty SETTINGS frame.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let (mut stream_window, mut conn_increment) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stream_window.is_none() || conn_increment.is_none() {
        assert!(Instant::now() < deadline, "no SETTINGS/WINDOW_UPDATE seen");
        let mut head = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
            .await
            .expect("a frame within 5 s")
            .expect("the server's frames");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.unwrap();
        match kind {
            // SETTINGS (not the ACK): 6-byte entries, id 0x4 = INITIAL_WINDOW_SIZE.
            0x4 if flags & 0x1 == 0 => {
                for e in payload.chunks_exact(6) {
                    if u16::from_be_bytes([e[0], e[1]]) == 0x4 {
                        stream_window = Some(u32::from_be_bytes([e[2], e[3], e[4], e[5]]));
                    }
                }
                stream_window.get_or_insert(65_535);
            }
            // WINDOW_UPDATE on the connection.
            0x8 if stream == 0 => {
                let inc = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                conn_increment = Some(inc & 0x7fff_ffff);
            }
            _ => {}
        }
    }
    assert_eq!(stream_window, Some(8 << 20), "stream window");
    // The connection window starts at 65,535 and is raised by the update.
    assert_eq!(
        conn_increment.map(|i| u64::from(i) + 65_535),
        Some(16 << 20),
        "connection window"
    );
}
