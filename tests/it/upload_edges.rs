//! The edges of split uploads (`src/upload.rs`): silence counted across parts, a registry answer
//! without `Location`, bodies with a `Content-Length` that keep an exact length on every part,
//! `--upload-split never|always`, a registry connection cut in the middle of a part (real
//! registry: a clear "retry the push" error and nothing corrupt stored), and an upload `Location`
//! on another origin (followed without `Authorization`).
//!
//! Most tests put a recording origin in the registry's place (it answers like distribution's
//! upload endpoints and records what each request carried); the cut test uses the real registry
//! behind a TCP relay that can drop its connections on demand.

use crate::support;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use regrelay::body::{self, ProxyBody};
use regrelay::error::BoxError;
use support::gitlab::{with_developer_pat, GitLab};
use support::upstream::{self, client, drain, Generated, Origin};
use support::*;
use tokio::sync::mpsc;

const USER: &str = "uploader";
const PAT: &str = "glpat-Ue4dGw9KpXr2TzQm7VbN";
const PROJECT: &str = "g/p";
/// Longest wait for any one answer: far past every behaviour tested, short of hanging forever.
const ANSWER_WAIT: Duration = Duration::from_secs(25);

/// What the recording origin saw of one request.
#[derive(Debug, Clone, Default)]
struct Seen {
    method: String,
    target: String,
    authorization: Option<String>,
    content_length: Option<u64>,
    chunked: bool,
    /// Body bytes read (`None` while reading, or when the body broke off).
    bytes: Option<u64>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn patches(log: &Log) -> Vec<Seen> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|s| s.method == "PATCH")
        .cloned()
        .collect()
}

/// A registry-like upload endpoint: `GET /v2/` → 200; `POST` → 202 with a `Location` on itself;
/// `PATCH` → reads the body, then 202 with the `Location` that `next(own host, patch index)`
/// gives (none when it gives `None`). Records every request, the `PATCH` at the moment its
/// headers arrive (so one whose body breaks off still counts).
async fn recording_origin<F>(next: F) -> (Origin, Log)
where
    F: Fn(&str, usize) -> Option<String> + Send + Sync + 'static,
{
    let log: Log = Arc::default();
    let (l, next) = (log.clone(), Arc::new(next));
    let origin = upstream::serve(move |req: Request<Incoming>| {
        let (l, next) = (l.clone(), next.clone());
        async move {
            let (parts, incoming) = req.into_parts();
            let h = &parts.headers;
            let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let own = text("host").unwrap_or_default();
            let (index, patch_index) = {
                let mut l = l.lock().unwrap();
                let earlier = l.iter().filter(|s| s.method == "PATCH").count();
                l.push(Seen {
                    method: parts.method.to_string(),
                    target: parts.uri.to_string(),
                    authorization: text("authorization"),
                    content_length: text("content-length").and_then(|v| v.parse().ok()),
                    chunked: text("transfer-encoding").is_some_and(|v| v.contains("chunked")),
                    bytes: None,
                });
                (l.len() - 1, earlier)
            };
            let Ok(n) = drain(incoming).await else {
                return Response::new(body::empty());
            };
            l.lock().unwrap()[index].bytes = Some(n);
            let mut resp = Response::new(body::empty());
            let location = match parts.method {
                Method::POST => Some(format!(
                    "http://{own}/v2/{PROJECT}/blobs/uploads/u1?_state=0"
                )),
                Method::PATCH => next(&own, patch_index),
                _ => None,
            };
            *resp.status_mut() = match parts.method {
                Method::POST | Method::PATCH => StatusCode::ACCEPTED,
                Method::GET if parts.uri.path() == "/v2/" => StatusCode::OK,
                _ => StatusCode::NOT_FOUND,
            };
            if let Some(loc) = location {
                resp.headers_mut().insert("location", loc.parse().unwrap());
            }
            resp
        }
    })
    .await;
    (origin, log)
}

/// The `Location` the recording origin gives after its `n`th `PATCH`: the same upload, on itself.
fn same_upload(own: &str, n: usize) -> Option<String> {
    Some(format!(
        "http://{own}/v2/{PROJECT}/blobs/uploads/u1?_state={}",
        n + 1
    ))
}

/// A GitLab stand-in whose tokens live `lifetime_secs`, for `USER` on `PROJECT`.
async fn token_service(lifetime_secs: u64) -> GitLab {
    with_developer_pat(USER, PAT, PROJECT, Duration::from_secs(lifetime_secs)).await
}

/// regrelay in front of the recording `origin`, minting at `gl` (the origin announces no realm).
fn regrelay_for(origin: &Origin, gl: &GitLab, extra: &[&str]) -> Regrelay {
    let mut args = vec![
        "--registry".to_owned(),
        origin.url(),
        "--token-realm".to_owned(),
        gl.realm(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Regrelay::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// `Bearer rr1.…`: a sealed session for pull and push on `PROJECT`, from regrelay's realm.
async fn session(px: &Regrelay) -> String {
    let realm = format!("{}/jwt/auth", px.url());
    let token = fetch_token(
        &realm,
        USER,
        PAT,
        &format!("repository:{PROJECT}:pull,push"),
    )
    .await;
    assert!(token.starts_with("rr1."), "not a regrelay session");
    format!("Bearer {token}")
}

/// Sends a request and waits (at most [`ANSWER_WAIT`]) for its answer, whole.
async fn call(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: ProxyBody,
) -> (StatusCode, HeaderMap, String) {
    let mut req = Request::builder().method(method.clone()).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let exchange = async {
        let resp = client().request(req.body(body).unwrap()).await?;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await?.to_bytes();
        Ok::<_, BoxError>((
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        ))
    };
    match tokio::time::timeout(ANSWER_WAIT, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => panic!("{method} {url}: no answer: {e:?}"),
        Err(_) => panic!("{method} {url}: no answer within {ANSWER_WAIT:?}"),
    }
}

/// The message of a registry-format error body (`{"errors":[{"code","message"}]}`).
fn registry_error(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    let first = &v["errors"][0];
    assert!(first["code"].is_string(), "no error code: {body}");
    first["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {body}"))
        .to_owned()
}

/// A chunked body fed from a channel: it ends only when the sender is dropped.
struct Fed(mpsc::UnboundedReceiver<Bytes>);

impl Body for Fed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A chunked body that sends `data` in `chunk`-byte frames, one per `every` (a modest, steady
/// uplink), so it lasts about `len / chunk * every`.
struct Paced {
    data: Bytes,
    chunk: usize,
    tick: tokio::time::Interval,
}

impl Paced {
    fn body(data: Bytes, chunk: usize, every: Duration) -> ProxyBody {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Paced { data, chunk, tick }.boxed_unsync()
    }
}

impl Body for Paced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.data.is_empty() {
            return Poll::Ready(None);
        }
        if self.tick.poll_tick(cx).is_pending() {
            return Poll::Pending;
        }
        let n = self.chunk.min(self.data.len());
        let frame = self.data.split_to(n);
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }
}

/// `len` deterministic pseudo-random bytes.
fn noise(len: usize, seed: u64) -> Bytes {
    let mut v = vec![0u8; len];
    Noise::new(seed).fill(&mut v);
    Bytes::from(v)
}

#[tokio::test(flavor = "multi_thread")]
async fn silence_counts_across_parts() {
    let gl = token_service(1).await;
    let (origin, log) = recording_origin(same_upload).await;
    let px = regrelay_for(&origin, &gl, &["--body-idle-timeout-secs", "3"]);
    let bearer = session(&px).await;
    // A few bytes, then silence on an open connection (the sender lives until the test ends).
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(Bytes::from_static(b"first bytes, then nothing"))
        .unwrap();
    let start = Instant::now();
    let (status, _, body) = call(
        Method::PATCH,
        &format!("{}/v2/{PROJECT}/blobs/uploads/u1?_state=0", px.url()),
        &[("authorization", &bearer)],
        Fed(rx).boxed_unsync(),
    )
    .await;
    let took = start.elapsed();
    let logged = px.output.settled();
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{body}\n{logged}");
    let message = registry_error(&body);
    assert!(message.contains("idle"), "{message}");
    // 3 s of silence, counted from the last byte whatever part it fell in (1 s parts).
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(7),
        "answered after {took:?}\n{logged}"
    );
    let seen = patches(&log);
    assert!(
        !seen.is_empty() && seen.len() <= 6,
        "an idle client kept the upload alive with {} PATCHes: {seen:?}",
        seen.len()
    );
    eprintln!("408 after {took:?}, {} PATCH(es) upstream", seen.len());
    drop(tx);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_202_without_location_is_a_clear_upstream_error() {
    let gl = token_service(1).await;
    let (origin, log) = recording_origin(|_, _| None).await;
    let px = regrelay_for(&origin, &gl, &[]);
    let bearer = session(&px).await;
    // About 5 s of data with 1 s tokens: a second part is needed after the first 202.
    let data = noise(80 * 16 * 1024, 2);
    let (status, _, body) = call(
        Method::PATCH,
        &format!("{}/v2/{PROJECT}/blobs/uploads/u1?_state=0", px.url()),
        &[("authorization", &bearer)],
        Paced::body(data, 16 * 1024, Duration::from_millis(62)),
    )
    .await;
    let logged = px.output.settled();
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}\n{logged}");
    let message = registry_error(&body);
    assert!(
        message.contains("Location"),
        "the message does not name the missing Location: {message}"
    );
    assert_eq!(patches(&log).len(), 1, "{:?}", patches(&log));
    // regrelay lives on.
    let (status, _, _) = call(
        Method::GET,
        &format!("{}/v2/", px.url()),
        &[],
        body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", px.output.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_that_fits_in_one_part_keeps_its_content_length() {
    let gl = token_service(300).await;
    let (origin, log) = recording_origin(same_upload).await;
    let url = |px: &Regrelay| format!("{}/v2/{PROJECT}/blobs/uploads/u1?_state=0", px.url());

    // 300000 bytes fit in the first part: one PATCH, with its length.
    let px = regrelay_for(&origin, &gl, &[]);
    let bearer = session(&px).await;
    let (status, _, body) = call(
        Method::PATCH,
        &url(&px),
        &[("authorization", &bearer), ("content-length", "300000")],
        Generated::new(300_000).boxed_unsync(),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let seen = patches(&log);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].content_length, Some(300_000), "{seen:?}");
    assert!(!seen[0].chunked, "sent chunked: {seen:?}");
    assert_eq!(seen[0].bytes, Some(300_000));
    drop(px);

    // 20 MiB with parts of at most 4 MiB: every part carries its exact length.
    log.lock().unwrap().clear();
    let px = regrelay_for(&origin, &gl, &["--upload-chunk-max", "4194304"]);
    let bearer = session(&px).await;
    let total: u64 = 20 << 20;
    let (status, _, body) = call(
        Method::PATCH,
        &url(&px),
        &[
            ("authorization", &bearer),
            ("content-length", &total.to_string()),
        ],
        Generated::new(total).boxed_unsync(),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}\n{}", px.output.text());
    let seen = patches(&log);
    assert!(seen.len() >= 5, "{} PATCHes: {seen:?}", seen.len());
    for s in &seen {
        assert!(
            !s.chunked && s.content_length.is_some(),
            "a part without its length: {s:?}"
        );
        assert!(
            s.content_length <= Some(4 << 20),
            "a part over 4 MiB: {s:?}"
        );
        assert_eq!(s.bytes, s.content_length, "{s:?}");
    }
    let declared: u64 = seen.iter().filter_map(|s| s.content_length).sum();
    assert_eq!(declared, total, "{seen:?}");
    let lengths: Vec<_> = seen.iter().filter_map(|s| s.content_length).collect();
    eprintln!("20 MiB with --upload-chunk-max 4194304 went as parts of {lengths:?} bytes");
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_split_never_and_always() {
    let gl = token_service(1).await;
    let (origin, log) = recording_origin(same_upload).await;
    let url = |px: &Regrelay| format!("{}/v2/{PROJECT}/blobs/uploads/u1?_state=0", px.url());

    // never: about 4 s of chunked data, several token lifetimes, in one request.
    let px = regrelay_for(&origin, &gl, &["--upload-split", "never"]);
    let bearer = session(&px).await;
    let len = 64 * 16 * 1024;
    let (status, _, body) = call(
        Method::PATCH,
        &url(&px),
        &[("authorization", &bearer)],
        Paced::body(noise(len, 4), 16 * 1024, Duration::from_millis(62)),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}\n{}", px.output.text());
    let seen = patches(&log);
    assert_eq!(seen.len(), 1, "split although never: {seen:?}");
    assert_eq!(seen[0].bytes, Some(len as u64));
    drop(px);

    // always: a body with a length that would fit in one part is cut by time, sent chunked.
    log.lock().unwrap().clear();
    let px = regrelay_for(&origin, &gl, &["--upload-split", "always"]);
    let bearer = session(&px).await;
    let (status, _, body) = call(
        Method::PATCH,
        &url(&px),
        &[("authorization", &bearer), ("content-length", "300000")],
        Generated::new(300_000).boxed_unsync(),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}\n{}", px.output.text());
    let seen = patches(&log);
    assert!(!seen.is_empty());
    for s in &seen {
        assert!(
            s.chunked && s.content_length.is_none(),
            "not chunked although always: {s:?}"
        );
    }
    let sent: u64 = seen.iter().filter_map(|s| s.bytes).sum();
    assert_eq!(sent, 300_000, "{seen:?}");
}

/// A TCP relay on 127.0.0.1:0 to one backend whose open connections can be cut at once (both
/// sides closed mid-stream); new connections go through as before.
struct CutRelay {
    addr: SocketAddr,
    open: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CutRelay {
    async fn start(backend: SocketAddr) -> CutRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let o = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let conn = tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                o.lock().unwrap().push(conn.abort_handle());
            }
        });
        CutRelay { addr, open, task }
    }

    /// Drops every open connection; returns how many were open.
    fn cut(&self) -> usize {
        let open: Vec<_> = self.open.lock().unwrap().drain(..).collect();
        let live = open.iter().filter(|c| !c.is_finished()).count();
        for c in open {
            c.abort();
        }
        live
    }
}

impl Drop for CutRelay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// PATCHes the registry accepted so far, from its access log.
fn accepted_patches(reg: &Registry) -> usize {
    reg.log
        .text()
        .lines()
        .filter(|l| l.contains("\"PATCH /v2/") && l.contains("\" 202 "))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_part_cut_mid_stream_fails_clearly_and_leaves_no_corrupt_blob() {
    let gl = token_service(1).await;
    let reg = Registry::start(&gl.realm());
    let relay = CutRelay::start(reg.addr).await;
    let px = Regrelay::start(&["--registry", &format!("http://{}", relay.addr)]);
    let bearer = session(&px).await;
    let auth = [("authorization", bearer.as_str())];
    let base = px.url();
    let uploads = format!("{base}/v2/{PROJECT}/blobs/uploads/");

    // 1.5 MiB at 256 KiB/s: about 6 s, so several 1 s parts.
    let data = noise(96 * 16 * 1024, 5);
    let blob = digest(&data);
    let (status, h, body) = call(Method::POST, &uploads, &auth, body::empty()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let location = h["location"].to_str().unwrap().to_owned();
    let patch = {
        let (location, bearer, data) = (location.clone(), bearer.clone(), data.clone());
        tokio::spawn(async move {
            call(
                Method::PATCH,
                &location,
                &[("authorization", &bearer)],
                Paced::body(data, 16 * 1024, Duration::from_millis(62)),
            )
            .await
        })
    };
    // Cut once the registry has accepted a part (1 s parts: one is in by ~1.5 s).
    let start = Instant::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    while accepted_patches(&reg) == 0 && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        accepted_patches(&reg) >= 1,
        "no part accepted before the cut:\n{}\n{}",
        reg.log.text(),
        px.output.text()
    );
    // Cut again every 250 ms until the client has its answer, so one cut falls inside a part
    // (parts follow each other closely, but a cut between two would only drop an idle one).
    let mut cut = 0;
    while !patch.is_finished() && start.elapsed() < Duration::from_secs(20) {
        cut += relay.cut();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(cut >= 1, "no registry connection was open to cut");
    let (status, _, body) = patch.await.unwrap();
    let logged = px.output.settled();
    assert!(status.is_server_error(), "{status}: {body}\n{logged}");
    let message = registry_error(&body);
    assert!(
        message.contains("retry the push"),
        "the client is not told to retry: {message}\n{logged}"
    );
    eprintln!(
        "cut {cut} connection(s) by {:?}, after {} accepted part(s): {status} {message}",
        start.elapsed(),
        accepted_patches(&reg)
    );
    // No re-read of the upload's status with a stale `_state` (distribution would cancel it).
    let status_reads: Vec<_> = reg
        .log
        .text()
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/uploads/"))
        .map(str::to_owned)
        .collect();
    assert!(status_reads.is_empty(), "{status_reads:#?}");

    // Nothing stored under the blob's digest.
    let (status, _, _) = call(
        Method::HEAD,
        &format!("{base}/v2/{PROJECT}/blobs/{blob}"),
        &auth,
        body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a blob exists after the cut");

    // A fresh upload of the same blob (through the same relay, which lets new connections in).
    let (status, h, body) = call(Method::POST, &uploads, &auth, body::empty()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let location = h["location"].to_str().unwrap().to_owned();
    let len = data.len().to_string();
    let (status, h, body) = call(
        Method::PATCH,
        &location,
        &[
            ("authorization", &bearer),
            ("content-length", &len),
            ("content-type", "application/octet-stream"),
        ],
        body::full(data.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let location = h["location"].to_str().unwrap().to_owned();
    let (status, h, body) = call(
        Method::PUT,
        &format!("{location}&digest={blob}"),
        &[("authorization", &bearer), ("content-length", "0")],
        body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}\n{}", px.output.text());
    assert_eq!(h["docker-content-digest"], blob.as_str());
    let (status, h, _) = call(
        Method::HEAD,
        &format!("{base}/v2/{PROJECT}/blobs/{blob}"),
        &auth,
        body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["content-length"], len.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_location_on_another_origin_is_followed_without_authorization() {
    let gl = token_service(1).await;
    // A (the registry) sends every part to B; B sends the next one back to A.
    let a_host: Arc<OnceLock<String>> = Arc::default();
    let b_host: Arc<OnceLock<String>> = Arc::default();
    let (to_b, to_a) = (b_host.clone(), a_host.clone());
    let (a, a_log) =
        recording_origin(move |_, n| Some(format!("http://{}/upload/next?sig={n}", to_b.get()?)))
            .await;
    let (b, b_log) = recording_origin(move |_, n| {
        Some(format!(
            "http://{}/v2/{PROJECT}/blobs/uploads/u1?_state=b{n}",
            to_a.get()?
        ))
    })
    .await;
    a_host.set(a.addr.to_string()).unwrap();
    b_host.set(b.addr.to_string()).unwrap();
    let px = regrelay_for(&a, &gl, &[]);
    let bearer = session(&px).await;
    // About 4 s of data with 1 s tokens: three parts or more, alternating A, B, A…
    let len = 64 * 16 * 1024;
    let (status, _, body) = call(
        Method::PATCH,
        &format!("{}/v2/{PROJECT}/blobs/uploads/u1?_state=0", px.url()),
        &[("authorization", &bearer)],
        Paced::body(noise(len, 6), 16 * 1024, Duration::from_millis(62)),
    )
    .await;
    let logged = px.output.settled();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}\n{logged}");
    let (at_a, at_b) = (patches(&a_log), patches(&b_log));
    assert!(
        !at_b.is_empty(),
        "no part went to the Location's origin; A saw {at_a:?}\n{logged}"
    );
    for s in &at_b {
        assert!(
            s.authorization.is_none(),
            "Authorization went to another origin: {s:?}"
        );
        assert!(s.target.starts_with("/upload/next?sig="), "{s:?}");
    }
    for s in &at_a {
        let auth = s.authorization.as_deref().unwrap_or_default();
        let jwt = auth.strip_prefix("Bearer ").unwrap_or_default();
        assert!(
            !jwt.starts_with("rr1.") && jwt.split('.').count() == 3,
            "the registry did not get a GitLab JWT: {s:?}"
        );
    }
    let sent: u64 = at_a.iter().chain(&at_b).filter_map(|s| s.bytes).sum();
    assert_eq!(sent, len as u64, "A: {at_a:?}\nB: {at_b:?}");
    eprintln!(
        "{} part(s) at the registry, {} at the other origin",
        at_a.len(),
        at_b.len()
    );
}
