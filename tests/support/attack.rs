//! Hostile clients, each from its own loopback address (127.0.0.2 and up stand in for other
//! hosts): HTTP/2 connections that hold their flow-control window at zero while their streams
//! wait, paced rapid resets, slowloris heads, idle sockets, and a client that speaks HTTP/1.1
//! from a chosen address. They run until dropped (their tasks are aborted) and count what they
//! did, so tests and the bench can print it.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// Connects to `to` from `local` (a loopback address other than 127.0.0.1: another host).
pub async fn connect_from(local: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(local, 0))?;
    sock.connect(to).await
}

/// `127.0.0.N`.
pub fn host(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

/// An attack that runs until dropped, and what it counted.
pub struct Attack {
    tasks: Vec<JoinHandle<()>>,
    /// Requests (or streams, or sockets) it sent or opened.
    pub sent: Arc<AtomicUsize>,
    /// Of those, how many the server ended (stream reset, socket closed, answered).
    pub ended: Arc<AtomicUsize>,
    /// Streams whose response headers arrived (the server took the request and holds it while
    /// its body cannot be sent).
    pub answered: Arc<AtomicUsize>,
}

impl Drop for Attack {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Attack {
    fn new() -> Attack {
        Attack {
            tasks: vec![],
            sent: Arc::default(),
            ended: Arc::default(),
            answered: Arc::default(),
        }
    }

    /// Streams or sockets opened so far.
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// Of those, ended by the server so far.
    pub fn ended(&self) -> usize {
        self.ended.load(Ordering::SeqCst)
    }

    /// Streams whose response headers arrived so far.
    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }
}

/// An HTTP/2 (h2c, prior knowledge) connection from `local` whose flow-control window is zero
/// (`SETTINGS_INITIAL_WINDOW_SIZE` 0, never updated): the server may send headers, never data.
/// Its PINGs are answered (the h2 crate does), so it never looks dead.
pub async fn zero_window_h2(
    local: IpAddr,
    to: SocketAddr,
) -> std::io::Result<(h2::client::SendRequest<Bytes>, AbortOnDrop)> {
    let tcp = connect_from(local, to).await?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(std::io::Error::other)?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((send, AbortOnDrop(driver)))
}

/// `connections` zero-window HTTP/2 connections from `local`, each keeping `streams` streams
/// of `GET path` open (their responses never read), and opening a new one for each the server
/// ends. `authorization` goes with each request when given.
pub async fn zero_window_streams(
    local: IpAddr,
    to: SocketAddr,
    connections: usize,
    streams: usize,
    path: &str,
    authorization: Option<String>,
) -> Attack {
    let mut attack = Attack::new();
    for _ in 0..connections {
        let (sent, ended) = (attack.sent.clone(), attack.ended.clone());
        let answered = attack.answered.clone();
        let (path, authorization) = (path.to_owned(), authorization.clone());
        attack.tasks.push(tokio::spawn(async move {
            loop {
                let Ok((send, driver)) = zero_window_h2(local, to).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                hold_streams(
                    send,
                    streams,
                    &path,
                    authorization.as_deref(),
                    [&sent, &answered, &ended],
                )
                .await;
                drop(driver);
            }
        }));
    }
    attack
}

/// A task aborted when this is dropped: an attack's connection driver, so that dropping the
/// attack (which aborts its tasks, and with them this) closes its connections.
pub struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps `n` streams of `GET path` open on `send` until the connection ends.
async fn hold_streams(
    send: h2::client::SendRequest<Bytes>,
    n: usize,
    path: &str,
    authorization: Option<&str>,
    [sent, answered, ended]: [&Arc<AtomicUsize>; 3],
) {
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut open = 0;
    loop {
        while open < n {
            let Ok(mut ready) = send.clone().ready().await else {
                return;
            };
            let mut req = Request::builder()
                .method(Method::GET)
                .uri(format!("http://regrelay{path}"));
            if let Some(a) = authorization {
                req = req.header("authorization", a);
            }
            let Ok((resp, _)) = ready.send_request(req.body(()).unwrap(), true) else {
                return;
            };
            sent.fetch_add(1, Ordering::SeqCst);
            open += 1;
            let (done, ended) = (done_tx.clone(), ended.clone());
            let answered = answered.clone();
            tokio::spawn(async move {
                // Headers arrive (they are not flow-controlled); the body never can. The server
                // ends the stream by resetting it.
                if let Ok(resp) = resp.await {
                    answered.fetch_add(1, Ordering::SeqCst);
                    let mut body = resp.into_body();
                    while let Some(Ok(_)) = body.data().await {}
                }
                ended.fetch_add(1, Ordering::SeqCst);
                let _ = done.send(());
            });
        }
        if done_rx.recv().await.is_none() {
            return;
        }
        open -= 1;
    }
}

/// HTTP/2 rapid resets from `local`, paced at `per_sec`: each stream is opened and at once
/// reset by the client (CVE-2023-44487's pattern, at a rate under the server's own limits).
pub async fn rapid_resets(local: IpAddr, to: SocketAddr, per_sec: u32) -> Attack {
    let mut attack = Attack::new();
    let (sent, ended) = (attack.sent.clone(), attack.ended.clone());
    let gap = Duration::from_secs(1) / per_sec.max(1);
    attack.tasks.push(tokio::spawn(async move {
        loop {
            let Ok((send, driver)) = zero_window_h2(local, to).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            loop {
                let Ok(mut ready) = send.clone().ready().await else {
                    break;
                };
                let req = Request::get("http://regrelay/v2/").body(()).unwrap();
                let Ok((_resp, mut stream)) = ready.send_request(req, false) else {
                    break;
                };
                stream.send_reset(h2::Reason::CANCEL);
                sent.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(gap).await;
            }
            ended.fetch_add(1, Ordering::SeqCst);
            drop(driver);
        }
    }));
    attack
}

/// `n` slowloris sockets from `local`: each sends a request head one byte every `every`, and
/// is opened again when the server closes it.
pub async fn slowloris(local: IpAddr, to: SocketAddr, n: usize, every: Duration) -> Attack {
    let mut attack = Attack::new();
    for _ in 0..n {
        let (sent, ended) = (attack.sent.clone(), attack.ended.clone());
        attack.tasks.push(tokio::spawn(async move {
            let head = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ".repeat(64);
            loop {
                let Ok(mut s) = connect_from(local, to).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                sent.fetch_add(1, Ordering::SeqCst);
                for b in head.iter() {
                    if s.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(every).await;
                }
                ended.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    attack
}

/// `n` sockets from `local` that connect and say nothing, opened again when closed.
pub async fn idle_sockets(local: IpAddr, to: SocketAddr, n: usize) -> Attack {
    let mut attack = Attack::new();
    for _ in 0..n {
        let (sent, ended) = (attack.sent.clone(), attack.ended.clone());
        attack.tasks.push(tokio::spawn(async move {
            loop {
                let Ok(mut s) = connect_from(local, to).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                sent.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                ended.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    attack
}

/// One HTTP/1.1 request from `local` on a fresh connection: its status and body (`None` when the
/// connection ended without an answer).
pub async fn request_from(
    local: IpAddr,
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(StatusCode, String)> {
    let mut s = connect_from(local, to).await.ok()?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.ok()?;
    // The server may answer (413) before the whole body is sent, and close.
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((StatusCode::from_u16(status).ok()?, body))
}

/// Runs `one` `per_sec` times a second (at most 64 at once), counting each sent, and each
/// answered (`one` returns whether it was) as ended.
fn paced<F, Fut>(per_sec: u32, one: F) -> Attack
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let mut attack = Attack::new();
    let (sent, ended) = (attack.sent.clone(), attack.ended.clone());
    let in_flight = Arc::new(tokio::sync::Semaphore::new(64));
    attack.tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / per_sec.max(1));
        loop {
            tick.tick().await;
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            sent.fetch_add(1, Ordering::SeqCst);
            let (fut, ended) = (one(), ended.clone());
            tokio::spawn(async move {
                if fut.await {
                    ended.fetch_add(1, Ordering::SeqCst);
                }
                drop(permit);
            });
        }
    }));
    attack
}

/// Anonymous token requests for `scopes` from `local`, `per_sec` a second.
pub async fn token_requests(
    local: IpAddr,
    to: SocketAddr,
    scopes: Vec<String>,
    per_sec: u32,
) -> Attack {
    let mut q = "service=container_registry".to_owned();
    for s in &scopes {
        q.push_str("&scope=");
        q.push_str(s);
    }
    let path = Arc::new(format!("/jwt/auth?{q}"));
    paced(per_sec, move || {
        let path = path.clone();
        async move {
            request_from(local, to, "GET", &path, &[], b"")
                .await
                .is_some()
        }
    })
}

/// `GET path` with `bearer` from `local`, `per_sec` a second.
pub async fn hammer(
    local: IpAddr,
    to: SocketAddr,
    path: &str,
    bearer: &str,
    per_sec: u32,
) -> Attack {
    let (path, bearer) = (Arc::new(path.to_owned()), Arc::new(bearer.to_owned()));
    paced(per_sec, move || {
        let (path, bearer) = (path.clone(), bearer.clone());
        async move {
            let headers = [("authorization", bearer.as_str())];
            request_from(local, to, "GET", &path, &headers, b"")
                .await
                .is_some()
        }
    })
}

/// OAuth2 token forms of `bytes` bytes from `local`, `per_sec` a second.
pub async fn oversized_forms(local: IpAddr, to: SocketAddr, bytes: usize, per_sec: u32) -> Attack {
    let mut form = b"grant_type=password&username=x&password=y&scope=".to_vec();
    form.resize(bytes, b'a');
    let form = Arc::new(form);
    paced(per_sec, move || {
        let form = form.clone();
        async move {
            let ctype = [("content-type", "application/x-www-form-urlencoded")];
            request_from(local, to, "POST", "/jwt/auth", &ctype, &form)
                .await
                .is_some()
        }
    })
}
