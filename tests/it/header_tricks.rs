//! Header, realm and redirect tricks a client can try: teaching regrelay a token realm of its
//! choosing through `X-Forwarded-Host`, claiming an address in `X-Forwarded-For`, presenting a
//! regrelay session to GitLab, cookies from upstream, encoded dot segments, broken chunked bodies.

use crate::support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use regrelay::body;
use support::gitlab::with_developer_pat;
use support::upstream::{client, drain, raw, serve};
use support::{fetch_token, Regrelay};

const USER: &str = "dave";
const PAT: &str = "glpat-Tr5nWq8ZcVb2XyLm4KpD";

type Log = Arc<Mutex<Vec<HeaderMap>>>;

/// A registry-like origin that builds its challenge realm from the name it was reached under
/// (`X-Forwarded-Host`, else `Host`, as some registries do), records request headers, and sets
/// a cookie on every answer.
async fn reflecting_origin(real_realm: String) -> (support::upstream::Origin, Log) {
    let log: Log = Arc::default();
    let l = log.clone();
    let origin = serve(move |req: Request<hyper::body::Incoming>| {
        let (l, real_realm) = (l.clone(), real_realm.clone());
        async move {
            let (parts, incoming) = req.into_parts();
            let _ = drain(incoming).await;
            l.lock().unwrap().push(parts.headers.clone());
            let mut resp = Response::new(body::full("{}"));
            resp.headers_mut()
                .insert("set-cookie", "session=upstream; Path=/".parse().unwrap());
            if !parts.headers.contains_key("authorization") {
                let realm = match parts.headers.get("x-forwarded-host") {
                    Some(h) => format!("http://{}/jwt/auth", h.to_str().unwrap()),
                    None => real_realm,
                };
                let c = format!("Bearer realm=\"{realm}\",service=\"container_registry\"");
                resp.headers_mut()
                    .insert("www-authenticate", c.parse().unwrap());
                *resp.status_mut() = StatusCode::UNAUTHORIZED;
            }
            resp
        }
    })
    .await;
    (origin, log)
}

/// A listener that counts connections (an attacker's token "realm").
async fn attacker() -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    (addr, hits, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_cannot_choose_the_realm_credentials_go_to() {
    let gl = with_developer_pat(USER, PAT, "g/p", Duration::from_secs(300)).await;
    let (origin, _) = reflecting_origin(gl.realm()).await;
    let (evil, evil_hits, _task) = attacker().await;
    // No --public-url: regrelay tells the registry the Host it was reached under.
    let px = Regrelay::start(&["--registry", &origin.url()]);
    // The attacker reaches regrelay under its own name; the registry's challenge now names it.
    let req = format!("GET /v2/ HTTP/1.1\r\nHost: {evil}\r\nConnection: close\r\n\r\n");
    let out = raw(px.addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    // A real user logs in afterwards: the credentials must go to GitLab, not to the attacker.
    let token = fetch_token(
        &format!("{}/jwt/auth", px.url()),
        USER,
        PAT,
        "repository:g/p:pull",
    )
    .await;
    assert!(token.starts_with("rr1."), "{token}");
    assert_eq!(
        evil_hits.load(Ordering::SeqCst),
        0,
        "credentials went to the attacker"
    );
    assert!(gl
        .seen()
        .iter()
        .any(|s| s.username.as_deref() == Some(USER)));
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_headers_are_kept_only_from_trusted_proxies_and_cookies_never_pass() {
    let gl = with_developer_pat(USER, PAT, "g/p", Duration::from_secs(300)).await;
    let (origin, log) = reflecting_origin(gl.realm()).await;
    let send = |px: String| async move {
        let req = Request::get(format!("{px}/v2/g/p/tags/list"))
            .header("x-forwarded-for", "198.51.100.7")
            .header("x-forwarded-host", "registry.example.com")
            .header("x-forwarded-proto", "https")
            .header("forwarded", "for=198.51.100.7")
            .body(body::empty())
            .unwrap();
        client().request(req).await.unwrap()
    };
    // Untrusted peer: everything it claimed is replaced.
    let px = Regrelay::start(&["--registry", &origin.url()]);
    let resp = send(px.url()).await;
    assert!(
        resp.headers().get("set-cookie").is_none(),
        "an upstream cookie reached the client"
    );
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        challenge.contains(&format!("realm=\"http://{}/jwt/auth\"", px.addr)),
        "{challenge}"
    );
    let seen = log.lock().unwrap().last().unwrap().clone();
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-host"], px.addr.to_string().as_str());
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert!(seen.get("forwarded").is_none());
    // A trusted front (loopback here): its list is appended to, its name and scheme are the
    // public origin clients are sent to.
    let px = Regrelay::start(&[
        "--registry",
        &origin.url(),
        "--trusted-proxies",
        "127.0.0.0/8",
    ]);
    let resp = send(px.url()).await;
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        challenge.contains("realm=\"https://registry.example.com/jwt/auth\""),
        "{challenge}"
    );
    let seen = log.lock().unwrap().last().unwrap().clone();
    assert_eq!(seen["x-forwarded-for"], "198.51.100.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-host"], "registry.example.com");
    assert_eq!(seen["forwarded"], "for=198.51.100.7");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_regrelay_session_never_reaches_gitlab() {
    let gl = with_developer_pat(USER, PAT, "g/p", Duration::from_secs(300)).await;
    let reg = support::Registry::start(&gl.realm());
    let px = Regrelay::start(&["--registry", &reg.url()]);
    let realm = format!("{}/jwt/auth", px.url());
    let session = fetch_token(&realm, USER, PAT, "repository:g/p:pull").await;
    // Some clients present their current bearer token to the realm when they renew it.
    let req = Request::get(format!(
        "{realm}?service=container_registry&scope=repository:g/p:pull"
    ))
    .header("authorization", format!("Bearer {session}"))
    .body(body::empty())
    .unwrap();
    let resp = client().request(req).await.unwrap();
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    let last = gl.seen().pop().unwrap();
    assert!(
        last.authorization.is_none(),
        "GitLab received {:?} (status {status})",
        last.auth_scheme
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn non_canonical_paths_and_broken_bodies_are_the_clients_fault() {
    let gl = with_developer_pat(USER, PAT, "g/p", Duration::from_secs(300)).await;
    let (origin, log) = reflecting_origin(gl.realm()).await;
    let px = Regrelay::start(&["--registry", &origin.url()]);
    let before = log.lock().unwrap().len();
    for path in [
        "/v2/g/%2e%2e/%2e%2e/other/manifests/x",
        "/v2/g/%2E./x/manifests/x",
        "/v2/g/..%2fx/manifests/x",
        "/v2//x/manifests/x",
        "/v2/g/p%5c..%5cq/manifests/x",
    ] {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            px.addr
        );
        let out = raw(px.addr, req.as_bytes(), Duration::from_secs(5)).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{path}: {out}");
        assert!(out.contains("\"code\":\"DENIED\""), "{path}: {out}");
    }
    assert_eq!(
        log.lock().unwrap().len(),
        before,
        "a non-canonical path reached the upstream"
    );
    // A chunked body with a malformed chunk: 400, blamed on the client, not a 502.
    let req = format!(
        "PATCH /v2/g/p/blobs/uploads/u HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\r\n\
         4\r\nabcd\r\nzz\r\nnot hex\r\n0\r\n\r\n",
        px.addr
    );
    let out = raw(px.addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let log_text = px.output.settled();
    assert!(
        log_text.contains("blame=\"client\"") || log_text.contains("blame=client"),
        "{log_text}"
    );
}
