//! Hostile connections against a real listener: sockets that say nothing, half an HTTP/2
//! preface, a finished TLS handshake and then silence, an HTTP/2 connection with no stream, a
//! client that stops reading its response. With ten times `--max-connections` of each kind open,
//! real clients still get `/v2/` and a blob, every hostile socket is closed after its deadline
//! (counted in /proc/PID/fd), HTTP/2 streams cannot open more upstream sockets than
//! `--max-upstream-connections`, and oversized heads get 431.

use crate::support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use regrelay::body;
use support::gitlab::with_developer_pat;
use support::upstream::client;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const USER: &str = "carol";
const PAT: &str = "glpat-Qz8rWn3TkLm6VxPb2YsH";
const REPO: &str = "sec/app";
const MAX_CONNECTIONS: usize = 4;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame (RFC 9113 §6.5).
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Waits until regrelay holds at most `limit` fds; returns how long that took.
async fn fds_settle(pid: u32, limit: usize, within: Duration) -> Duration {
    let start = Instant::now();
    while open_fds(pid) > limit {
        assert!(
            start.elapsed() < within,
            "regrelay still holds {} fds (want <= {limit}) after {within:?}",
            open_fds(pid)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

/// A session token of regrelay's for `REPO`, pull and push.
async fn session(px: &str) -> String {
    let scope = format!("repository:{REPO}:pull,push");
    format!(
        "Bearer {}",
        fetch_token(&format!("{px}/jwt/auth"), USER, PAT, &scope).await
    )
}

/// Uploads `data` as a blob through regrelay; returns its digest.
async fn put_blob(px: &str, bearer: &str, data: Bytes) -> String {
    let digest = digest(&data);
    let post = Request::post(format!("{px}/v2/{REPO}/blobs/uploads/"))
        .header("authorization", bearer)
        .body(body::empty())
        .unwrap();
    let resp = client().request(post).await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let loc = resp.headers()["location"].to_str().unwrap().to_owned();
    let put = Request::put(format!("{loc}&digest={digest}"))
        .header("authorization", bearer)
        .header("content-length", data.len().to_string())
        .body(body::full(data))
        .unwrap();
    let resp = client().request(put).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    digest
}

/// A real client's visit: `GET /v2/` answers (401 with a challenge), and a blob comes back whole.
async fn real_client(px: &str, bearer: &str, blob: &str, want: &Bytes) {
    let resp = client()
        .request(
            Request::get(format!("{px}/v2/"))
                .body(body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let get = Request::get(format!("{px}/v2/{REPO}/blobs/{blob}"))
        .header("authorization", bearer)
        .body(body::empty())
        .unwrap();
    let resp = client().request(get).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(got == *want, "the blob came back whole");
}

async fn connect(addr: SocketAddr, first: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    if !first.is_empty() {
        s.write_all(first).await.unwrap();
    }
    s
}

/// A client that asks for a large blob and never reads: a tiny receive window.
async fn slow_reader(addr: SocketAddr, bearer: &str, blob: &str) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    let req = format!(
        "GET /v2/{REPO}/blobs/{blob} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {bearer}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

/// True when the peer has closed `s` (EOF or reset), reading whatever was pending. A slow
/// reader served last may get its whole blob once read, and then the idle timeout (3 s) closes
/// its connection.
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => total += n,
            Err(_) => {
                eprintln!("still open after reading {total} bytes");
                return false;
            }
        }
    }
}

fn tls_config() -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(cert("ca.pem")).unwrap();
    for c in rustls_pemfile_certs(&pem) {
        roots.add(c).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .map(Result::unwrap)
        .collect()
}

async fn tls_connect(addr: SocketAddr, alpn: &[u8]) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut cfg = tls_config();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_sockets_are_closed_and_real_clients_get_through() {
    let gl = with_developer_pat(USER, PAT, REPO, Duration::from_secs(300)).await;
    let reg = Registry::start(&gl.realm());
    let max = MAX_CONNECTIONS.to_string();
    let deadlines = [
        "--header-read-timeout-secs",
        "3",
        "--idle-timeout-secs",
        "3",
        "--body-idle-timeout-secs",
        "3",
        "--h2-keepalive-secs",
        "2",
        "--tls-handshake-timeout-secs",
        "3",
    ];
    let registry = reg.url();
    // Hostile sockets and the real client share 127.0.0.1 here: the whole pool is one client's
    // share, so this sees the connection limit's own shedding (tests/it/fair_shares.rs covers
    // hostile clients on other addresses).
    let mut args = vec![
        "--registry",
        &registry,
        "--max-connections",
        &max,
        "--client-share-percent",
        "100",
    ];
    args.extend(deadlines);
    let px = Regrelay::process(&args);
    let base = px.url();
    let bearer = session(&base).await;
    let small = Bytes::from(vec![42u8; 300_000]);
    let small_digest = put_blob(&base, &bearer, small.clone()).await;
    let mut big = vec![0u8; 32 << 20];
    Noise::new(9).fill(&mut big);
    let big_digest = put_blob(&base, &bearer, Bytes::from(big)).await;
    tokio::time::sleep(Duration::from_secs(4)).await; // the set-up connections go idle and close
    let baseline = open_fds(px.pid());
    let n = 10 * MAX_CONNECTIONS;

    // Plain listener: silent, half a preface, h2 with no stream, slow readers.
    let mut hostile = vec![];
    for _ in 0..n {
        hostile.push(("silent", connect(px.addr, b"").await));
        hostile.push(("half preface", connect(px.addr, &H2_PREFACE[..16]).await));
        let h2 = connect(px.addr, &[H2_PREFACE, H2_SETTINGS].concat()).await;
        hostile.push(("h2 without streams", h2));
    }
    for _ in 0..n {
        hostile.push((
            "slow reader",
            slow_reader(px.addr, &bearer, &big_digest).await,
        ));
    }
    let start = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(90),
        real_client(&base, &bearer, &small_digest, &small),
    )
    .await
    .expect("a real client got through while hostile sockets were open");
    eprintln!(
        "real client served after {:?} with {} hostile sockets open",
        start.elapsed(),
        hostile.len()
    );
    let settled = fds_settle(px.pid(), baseline + 4, Duration::from_secs(90)).await;
    eprintln!(
        "regrelay back to {} fds after {settled:?}",
        open_fds(px.pid())
    );
    for (kind, s) in hostile.iter_mut() {
        assert!(closed_by_peer(s).await, "a {kind} socket was left open");
    }
    drop(hostile);

    // TLS listener: silent (handshake deadline), TLS then silent, TLS h2 with no stream.
    let tls = Regrelay::process(
        &[
            args.clone(),
            vec![
                "--tls-cert",
                &cert("server.pem"),
                "--tls-key",
                &cert("server.key"),
            ],
        ]
        .concat(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = open_fds(tls.pid());
    let mut plain_silent = vec![];
    let mut tls_hostile = vec![];
    for _ in 0..n {
        plain_silent.push(connect(tls.addr, b"").await);
    }
    for i in 0..n {
        let mut s = tls_connect(tls.addr, if i % 2 == 0 { b"http/1.1" } else { b"h2" }).await;
        if i % 2 == 1 {
            s.write_all(&[H2_PREFACE, H2_SETTINGS].concat())
                .await
                .unwrap();
        }
        tls_hostile.push(s);
    }
    let tls_base = format!("https://localhost:{}", tls.addr.port());
    let https = {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config())
            .https_only()
            .enable_http1()
            .build();
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build::<_, body::ProxyBody>(connector)
    };
    let start = Instant::now();
    let visit = async {
        // A session of this (TLS) instance, then the blob.
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PAT}"));
        let q = format!("service=container_registry&scope=repository:{REPO}:pull");
        let req = Request::get(format!("{tls_base}/jwt/auth?{q}"))
            .header("authorization", format!("Basic {basic}"))
            .body(body::empty())
            .unwrap();
        let resp = https.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let answer = resp.into_body().collect().await.unwrap().to_bytes();
        let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
        let bearer = format!("Bearer {}", answer["token"].as_str().unwrap());
        let req = Request::get(format!("{tls_base}/v2/{REPO}/blobs/{small_digest}"))
            .header("authorization", &bearer)
            .body(body::empty())
            .unwrap();
        let resp = https.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), small);
    };
    tokio::time::timeout(Duration::from_secs(60), visit)
        .await
        .expect("a TLS client got through");
    eprintln!("TLS client served after {:?}", start.elapsed());
    drop(https);
    fds_settle(tls.pid(), baseline + 4, Duration::from_secs(60)).await;
    for s in plain_silent.iter_mut() {
        assert!(closed_by_peer(s).await, "a silent socket was left open");
    }
    let mut buf = [0u8; 1024];
    for s in tls_hostile.iter_mut() {
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(_)) => continue,
                Err(_) => break false,
            }
        };
        assert!(closed, "a TLS socket was left open");
    }
}

/// Established connections from regrelay to `port` (its upstream sockets), from /proc/net/tcp.
fn upstream_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let remote_port = cols[2].rsplit(':').next().unwrap();
            u16::from_str_radix(remote_port, 16) == Ok(port) && cols[3] == "01"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_streams_share_a_bounded_pool_of_upstream_connections() {
    let gl = with_developer_pat(USER, PAT, REPO, Duration::from_secs(300)).await;
    let reg = Registry::start(&gl.realm());
    let px = Regrelay::start(&["--registry", &reg.url(), "--max-upstream-connections", "4"]);
    let base = px.url();
    let bearer = session(&base).await;
    let mut blob = vec![0u8; 1 << 20];
    Noise::new(3).fill(&mut blob);
    let blob = Bytes::from(blob);
    let digest = put_blob(&base, &bearer, blob.clone()).await;
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done, port) = (peak.clone(), done.clone(), reg.addr.port());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(upstream_sockets(port), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // One HTTP/2 connection (prior knowledge), 64 streams at once.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build::<_, body::ProxyBody>(hyper_util::client::legacy::connect::HttpConnector::new());
    let mut tasks = vec![];
    for _ in 0..64 {
        let (h2, url, bearer) = (
            h2.clone(),
            format!("{base}/v2/{REPO}/blobs/{digest}"),
            bearer.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let req = Request::builder()
                .method(Method::GET)
                .uri(url)
                .header("authorization", bearer)
                .body(body::empty())
                .unwrap();
            let resp = h2.request(req).await.unwrap();
            let status = resp.status();
            let retry = resp.headers().get("retry-after").cloned();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (status, retry, bytes)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (status, retry, bytes) = t.await.unwrap();
        match status {
            StatusCode::OK => {
                assert!(bytes == blob);
                ok += 1;
            }
            StatusCode::SERVICE_UNAVAILABLE => assert!(retry.is_some(), "503 without Retry-After"),
            other => panic!("unexpected {other}"),
        }
    }
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::SeqCst);
    eprintln!("64 h2 streams: {ok} served, peak upstream sockets {peak}");
    assert!(peak <= 4, "{peak} upstream sockets for a bound of 4");
    assert!(ok >= 32, "most streams were served, not refused: {ok}");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_heads_get_431_and_the_request_bound_answers_503() {
    let gl = with_developer_pat(USER, PAT, REPO, Duration::from_secs(300)).await;
    let reg = Registry::start(&gl.realm());
    let px = Regrelay::start(&["--registry", &reg.url(), "--max-requests", "2"]);
    let huge = "x".repeat(100_000);
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    for head in [format!("X-Big: {huge}\r\n"), many] {
        let req = format!("GET /v2/ HTTP/1.1\r\nHost: {}\r\n{head}\r\n", px.addr);
        let out = support::upstream::raw(px.addr, req.as_bytes(), Duration::from_secs(5)).await;
        assert!(
            out.starts_with("HTTP/1.1 431"),
            "{}",
            &out[..out.len().min(200)]
        );
    }
    // Over HTTP/2 too.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build::<_, body::ProxyBody>(hyper_util::client::legacy::connect::HttpConnector::new());
    let req = Request::get(format!("{}/v2/", px.url()))
        .header("x-big", &huge)
        .body(body::empty())
        .unwrap();
    let status = match h2.request(req).await {
        Ok(resp) => resp.status(),
        Err(e) => panic!("h2 request failed instead of 431: {e}"),
    };
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

    // Two requests in flight (slow readers of a big blob) fill --max-requests 2: the third is
    // answered 503 with Retry-After at once.
    let bearer = session(&px.url()).await;
    let mut big = vec![0u8; 32 << 20];
    Noise::new(5).fill(&mut big);
    let digest = put_blob(&px.url(), &bearer, Bytes::from(big)).await;
    let _a = slow_reader(px.addr, &bearer, &digest).await;
    let _b = slow_reader(px.addr, &bearer, &digest).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    let resp = client()
        .request(
            Request::get(format!("{}/v2/", px.url()))
                .body(body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("UNAVAILABLE"));
}
