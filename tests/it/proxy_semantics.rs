//! What regrelay does to requests and responses on the way through: header hygiene, forwarding
//! headers, framing, `Expect: 100-continue`, `Location` rewriting, redirects not followed, refusals
//! that keep it from being an open proxy, and errors in the registry's JSON format.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use regrelay::body::{self, ProxyBody};
use support::upstream::{self, client, drain, raw, Origin};
use support::Regrelay;

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    uri: String,
    headers: HeaderMap,
    body_len: u64,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// An origin that records each request and answers according to the path.
async fn recording_origin() -> (Origin, Log) {
    let log: Log = Arc::default();
    let l = log.clone();
    let origin = upstream::serve(move |req: Request<hyper::body::Incoming>| {
        let l = l.clone();
        async move {
            let (parts, incoming) = req.into_parts();
            let body_len = drain(incoming).await.unwrap_or(0);
            let own = parts
                .headers
                .get("host")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            l.lock().unwrap().push(Seen {
                method: parts.method.to_string(),
                uri: parts.uri.to_string(),
                headers: parts.headers.clone(),
                body_len,
            });
            let mut resp = Response::new(body::full(format!("{body_len}")));
            let mut status = StatusCode::OK;
            let h = resp.headers_mut();
            match parts.uri.path() {
                "/v2/loc/upstream" => {
                    status = StatusCode::ACCEPTED;
                    let loc = format!("http://{own}/v2/g/p/blobs/uploads/u1?_state=abc");
                    h.insert("location", loc.parse().unwrap());
                }
                "/v2/loc/storage" => {
                    status = StatusCode::TEMPORARY_REDIRECT;
                    h.insert(
                        "location",
                        "https://bucket.storage.invalid/blob?X-Amz-Signature=1"
                            .parse()
                            .unwrap(),
                    );
                }
                _ => {
                    h.insert("connection", "x-resp-hop".parse().unwrap());
                    h.insert("x-resp-hop", "1".parse().unwrap());
                    h.insert("docker-content-digest", "sha256:abc".parse().unwrap());
                    h.insert(
                        "docker-distribution-api-version",
                        "registry/2.0".parse().unwrap(),
                    );
                    h.insert("docker-upload-uuid", "u1".parse().unwrap());
                    h.insert("range", "0-99".parse().unwrap());
                }
            }
            *resp.status_mut() = status;
            resp
        }
    })
    .await;
    (origin, log)
}

async fn send(req: Request<ProxyBody>) -> (Response<()>, String) {
    let resp = client()
        .request(req)
        .await
        .expect("request through regrelay");
    let (parts, b) = resp.into_parts();
    let bytes = b.collect().await.unwrap().to_bytes();
    (
        Response::from_parts(parts, ()),
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

#[tokio::test]
async fn end_to_end_headers_pass_hop_by_hop_headers_do_not() {
    let (origin, log) = recording_origin().await;
    let px = Regrelay::start(&["--registry", &origin.url()]);
    let req = Request::patch(format!("{}/v2/g/p/blobs/uploads/u1?_state=s", px.url()))
        .header("connection", "x-hop")
        .header("x-hop", "1")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("te", "trailers")
        .header("authorization", "Bearer client-token")
        .header("x-forwarded-for", "10.1.2.3")
        .header("x-forwarded-host", "attacker.example:6666")
        .header("x-forwarded-proto", "https")
        .header("forwarded", "for=10.1.2.3;host=attacker.example")
        .header("content-range", "0-9")
        .header("docker-upload-uuid", "u1")
        .header("range", "bytes=0-9")
        .body(body::full("0123456789"))
        .unwrap();
    let (resp, _) = send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers();
    assert!(
        h.get("x-resp-hop").is_none(),
        "response hop-by-hop header leaked"
    );
    for name in [
        "docker-content-digest",
        "docker-distribution-api-version",
        "docker-upload-uuid",
        "range",
    ] {
        assert!(h.get(name).is_some(), "response lost {name}");
    }
    let seen = log.lock().unwrap()[0].clone();
    let up = &seen.headers;
    assert_eq!(seen.method, "PATCH");
    assert_eq!(seen.uri, "/v2/g/p/blobs/uploads/u1?_state=s");
    for gone in ["x-hop", "proxy-authorization", "te", "connection"] {
        assert!(up.get(gone).is_none(), "{gone} reached the upstream");
    }
    assert_eq!(up["authorization"], "Bearer client-token");
    // What the client claimed is replaced: it is not a --trusted-proxies address.
    assert_eq!(up["x-forwarded-for"], "127.0.0.1");
    assert!(
        up.get("forwarded").is_none(),
        "a client's Forwarded reached the upstream"
    );
    assert_eq!(up["x-forwarded-proto"], "http");
    assert_eq!(up["x-forwarded-host"], px.addr.to_string().as_str());
    assert_eq!(up["host"], origin.addr.to_string().as_str());
    assert_eq!(up["content-range"], "0-9");
    assert_eq!(up["docker-upload-uuid"], "u1");
    assert_eq!(up["range"], "bytes=0-9");
    assert_eq!(seen.body_len, 10);
}

#[tokio::test]
async fn content_length_and_chunked_framing_are_preserved() {
    let (origin, log) = recording_origin().await;
    let px = Regrelay::start(&["--registry", &origin.url()]);
    let sized = Request::put(format!("{}/v2/g/p/blobs/uploads/u1?digest=x", px.url()))
        .header("content-length", "1000")
        .body(body::full(vec![7u8; 1000]))
        .unwrap();
    assert_eq!(send(sized).await.0.status(), StatusCode::OK);
    // A stream of unknown length: hyper sends it chunked, as Docker does for a layer PATCH.
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, regrelay::error::BoxError>>(4);
    let stream = http_body_util::StreamBody::new(ReceiverStream(rx));
    let chunked = Request::patch(format!("{}/v2/g/p/blobs/uploads/u1", px.url()))
        .body(stream.boxed_unsync())
        .unwrap();
    let sender = tokio::spawn(async move {
        for _ in 0..3 {
            tx.send(Ok(http_body::Frame::data(Bytes::from(vec![1u8; 4096]))))
                .await
                .unwrap();
        }
    });
    assert_eq!(send(chunked).await.0.status(), StatusCode::OK);
    sender.await.unwrap();
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen[0].headers["content-length"], "1000");
    assert!(seen[0].headers.get("transfer-encoding").is_none());
    assert_eq!(seen[1].headers["transfer-encoding"], "chunked");
    assert!(seen[1].headers.get("content-length").is_none());
    assert_eq!((seen[0].body_len, seen[1].body_len), (1000, 3 * 4096));
}

struct ReceiverStream<T>(tokio::sync::mpsc::Receiver<T>);

impl<T> futures_core::Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

#[tokio::test]
async fn expect_100_continue_gets_continue_then_the_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (origin, log) = recording_origin().await;
    let px = Regrelay::start(&["--registry", &origin.url()]);
    let mut s = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    s.write_all(b"PUT /v2/g/p/blobs/uploads/u1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("no 100 Continue")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100 Continue"));
    s.write_all(b"hello").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert_eq!(log.lock().unwrap()[0].body_len, 5);
}

#[tokio::test]
async fn upstream_locations_are_rewritten_storage_redirects_pass_and_are_not_followed() {
    let (origin, log) = recording_origin().await;
    let px = Regrelay::start(&[
        "--registry",
        &origin.url(),
        "--public-url",
        "https://registry.example.test",
    ]);
    let get = |path: &str| {
        Request::post(format!("{}{path}", px.url()))
            .body(body::empty())
            .unwrap()
    };
    let (resp, _) = send(get("/v2/loc/upstream")).await;
    assert_eq!(
        resp.headers()["location"],
        "https://registry.example.test/v2/g/p/blobs/uploads/u1?_state=abc"
    );
    let (resp, _) = send(get("/v2/loc/storage")).await;
    assert_eq!(resp.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(
        resp.headers()["location"],
        "https://bucket.storage.invalid/blob?X-Amz-Signature=1"
    );
    assert_eq!(log.lock().unwrap().len(), 2, "regrelay followed a redirect");
    let seen = log.lock().unwrap()[0].clone();
    assert_eq!(seen.headers["x-forwarded-host"], "registry.example.test");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");

    // Without --public-url, the client's own Host and scheme are the public origin.
    let px2 = Regrelay::start(&["--registry", &origin.url()]);
    let (resp, _) = send(
        Request::post(format!("{}/v2/loc/upstream", px2.url()))
            .body(body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        resp.headers()["location"],
        format!("{}/v2/g/p/blobs/uploads/u1?_state=abc", px2.url()).as_str()
    );
}

#[tokio::test]
async fn never_an_open_proxy() {
    let (origin, log) = recording_origin().await;
    let px = Regrelay::start(&["--registry", &origin.url()]);
    let wait = Duration::from_secs(3);
    let cases: [(&[u8], &str); 5] = [
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", "HTTP/1.1 405"),
        (b"GET http://example.com/v2/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n", "HTTP/1.1 400"),
        (b"GET /admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "HTTP/1.1 404"),
        (b"GET /v2/../admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "HTTP/1.1 400"),
        (b"TRACE /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "HTTP/1.1 405"),
    ];
    for (req, want) in cases {
        let answer = raw(px.addr, req, wait).await;
        assert!(
            answer.starts_with(want),
            "{} -> {answer}",
            String::from_utf8_lossy(req)
        );
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let json: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {answer}"));
        assert!(json["errors"][0]["code"].is_string(), "{answer}");
    }
    assert!(
        log.lock().unwrap().is_empty(),
        "a refused request reached the upstream"
    );
}

#[tokio::test]
async fn unreachable_upstream_is_a_502_naming_it_only_in_the_log_and_not_ready() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let upstream = format!("http://127.0.0.1:{port}");
    let px = Regrelay::start(&["--registry", &upstream]);
    let (resp, body) = send(
        Request::get(format!("{}/v2/", px.url()))
            .body(body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["errors"][0]["code"], "UNAVAILABLE");
    let msg = json["errors"][0]["message"].as_str().unwrap();
    assert!(msg.contains("unreachable"), "{msg}");
    assert!(
        !msg.contains(&port.to_string()),
        "no internal address in the body: {msg}"
    );
    // Logged before the answer, read from stderr by another thread: wait, not race.
    assert!(
        px.output
            .wait_for(&upstream, Duration::from_secs(5))
            .is_some(),
        "the log names it"
    );
    let (resp, _) = send(
        Request::get(format!("{}/-/ready", px.url()))
            .body(body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (resp, body) = send(
        Request::get(format!("{}/-/healthy", px.url()))
            .body(body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (resp.status(), body.as_str()),
        (StatusCode::OK, r#"{"status":"ok"}"#)
    );
}

#[tokio::test]
async fn ready_when_upstream_answers_and_h2c_prior_knowledge_works() {
    let (origin, log) = recording_origin().await;
    let px = Regrelay::start(&["--registry", &origin.url()]);
    let (resp, body) = send(
        Request::get(format!("{}/-/ready", px.url()))
            .body(body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK, "{body}");
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<ProxyBody>();
    let resp = h2
        .request(
            Request::get(format!("{}/v2/g/p/tags/list", px.url()))
                .body(body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let seen = log.lock().unwrap().last().unwrap().clone();
    assert_eq!(seen.uri, "/v2/g/p/tags/list");
    assert_eq!(seen.headers["host"], origin.addr.to_string().as_str());
}
