//! The containerd harness against real components only (no regrelay): a private containerd pulls
//! from the real registry with GitLab-style tokens, falls back from a mirror that answers 404 to
//! `server`, and pulls through an `override_path` mirror. The mirrors record what containerd sends
//! them (request URIs, `Authorization`), documenting the request forms regrelay's mirror mode must
//! route: `?ns=<registry host>` on every request to a host other than the image's registry, and
//! `/v2/<prefix>/<name>/…` with `override_path`.

use crate::support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use regrelay::body::{self, ProxyBody};
use support::containerd::{hosts_dir, Containerd};
use support::gitlab::with_developer_pat;
use support::upstream::{self, Origin};
use support::*;

const USER: &str = "alice";
const PAT: &str = "glpat-Hc4vRx9TqW2mLs7KbN3e";

/// One request a mirror saw.
#[derive(Clone, Debug)]
struct Hit {
    method: String,
    uri: String,
    authorization: Option<String>,
}

/// Requests a mirror saw, in order.
#[derive(Clone, Default)]
struct Hits(Arc<Mutex<Vec<Hit>>>);

impl Hits {
    fn record(&self, req: &Request<Incoming>) {
        self.0.lock().unwrap().push(Hit {
            method: req.method().to_string(),
            uri: req.uri().to_string(),
            authorization: req
                .headers()
                .get(header::AUTHORIZATION)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        });
    }

    fn all(&self) -> Vec<Hit> {
        self.0.lock().unwrap().clone()
    }

    /// Prints them for the test log (`--nocapture`) and returns them.
    fn report(&self, name: &str) -> Vec<Hit> {
        let hits = self.all();
        eprintln!("{name} saw {} requests:", hits.len());
        for h in &hits {
            let auth = match &h.authorization {
                Some(a) => a.split_whitespace().next().unwrap_or("?").to_owned() + " …",
                None => "none".into(),
            };
            eprintln!("  {} {}  (Authorization: {auth})", h.method, h.uri);
        }
        hits
    }
}

/// A mirror that answers 404 (registry-format `NAME_UNKNOWN`) to everything, challenging nothing.
async fn not_found_mirror(hits: Hits) -> Origin {
    upstream::serve(move |req: Request<Incoming>| {
        hits.record(&req);
        async move {
            Response::builder()
                .status(StatusCode::NOT_FOUND)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body::full(
                    r#"{"errors":[{"code":"NAME_UNKNOWN","message":"not on this mirror"}]}"#,
                ))
                .unwrap()
        }
    })
    .await
}

/// A mirror that forwards `PREFIX/rest` to `http://target/v2/rest` (query kept) and 404s anything
/// else: the path-stripping reverse proxy an `override_path` host needs.
async fn stripping_mirror(hits: Hits, prefix: &'static str, target: SocketAddr) -> Origin {
    let client = upstream::client();
    upstream::serve(move |req: Request<Incoming>| {
        hits.record(&req);
        let client = client.clone();
        async move {
            let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let Some(rest) = pq.strip_prefix(prefix) else {
                return Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(body::empty())
                    .unwrap();
            };
            let mut out = Request::builder()
                .method(req.method().clone())
                .uri(format!("http://{target}/v2{rest}"));
            for (name, value) in req.headers() {
                if name != header::HOST {
                    out = out.header(name, value);
                }
            }
            match client.request(out.body(body::empty()).unwrap()).await {
                Ok(resp) => resp.map(|b| -> ProxyBody { b.map_err(Into::into).boxed_unsync() }),
                Err(e) => Response::builder()
                    .status(StatusCode::BAD_GATEWAY)
                    .body(body::full(e.to_string()))
                    .unwrap(),
            }
        }
    })
    .await
}

/// Pushes a fresh two-layer image to `host/group/app:v1` with skopeo (plain HTTP).
fn push(host: &str, creds: &str, seed: u64) -> OciImage {
    let image = OciImage::random(seed, &[256 << 10, 1 << 20]);
    let dest = format!("docker://{host}/group/app:v1");
    let out = skopeo_copy(&image.reference(), &dest, creds, &Transport::Http);
    assert!(out.status.success(), "push failed: {}", text(&out));
    image
}

/// Asserts that the pull succeeded and that containerd holds the image `name` with all its blobs.
fn assert_pulled(ctrd: &Containerd, out: &std::process::Output, name: &str, image: &OciImage) {
    assert!(
        out.status.success(),
        "pull of {name} failed:\n{}\ncontainerd log:\n{}",
        text(out),
        ctrd.log()
    );
    let images = ctrd.images();
    assert!(
        images.iter().any(|i| i == name),
        "{name} not in ctr images ls: {images:?}"
    );
    let content = ctrd.content();
    for d in std::iter::once(&image.manifest_digest).chain(image.layers.iter().map(|(d, _)| d)) {
        assert!(content.contains(d), "{d} not in the content store");
    }
}

/// The requests the registry logged after the first `skip` ones, printed for the test log.
fn report_registry(reg: &Registry, name: &str, skip: usize) -> Vec<String> {
    std::thread::sleep(Duration::from_millis(100)); // let the log reader catch up
    let requests: Vec<String> = reg.requests().into_iter().skip(skip).collect();
    eprintln!("{name} saw {} requests:", requests.len());
    for r in &requests {
        eprintln!("  {r}");
    }
    requests
}

/// hosts.toml for `reg-x.test`: the mirror first, then `server`.
fn mirror_then_server(mirror: SocketAddr, server: &str) -> String {
    format!(
        "server = \"http://{server}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_private_image_with_user_from_token_registry() {
    let started = Instant::now();
    let gl = with_developer_pat(USER, PAT, "group/app", Duration::from_secs(300)).await;
    let reg = Registry::start(&gl.realm());
    let host = reg.addr.to_string();
    tokio::task::spawn_blocking(move || {
        let image = push(&host, &format!("{USER}:{PAT}"), 21);
        let pushed = reg.requests().len();
        let ctrd = Containerd::start();
        // containerd 1.6 ignores a hosts.toml without a `[host]` table (issue 10027): the stub
        // makes `server` (and its http scheme) count. No `--plain-http` is passed.
        let toml = format!("server = \"http://{host}\"\n[host]\n");
        let hosts = hosts_dir(&[(host.as_str(), toml.as_str())]);
        let name = format!("{host}/group/app:v1");

        let anonymous = ctrd.pull(&name, hosts.path(), None);
        assert!(
            !anonymous.status.success(),
            "private image pulled without credentials"
        );

        let out = ctrd.pull(&name, hosts.path(), Some(&format!("{USER}:{PAT}")));
        assert_pulled(&ctrd, &out, &name, &image);
        report_registry(&reg, "token registry (anonymous, then --user)", pushed);
    })
    .await
    .unwrap();
    assert!(
        gl.seen()
            .iter()
            .any(|s| s.username.as_deref() == Some(USER) && s.status == 200),
        "no token minted for {USER}"
    );
    eprintln!("took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn mirror_answering_404_falls_back_to_server_and_sees_ns() {
    let started = Instant::now();
    let reg = Registry::start_open();
    let hits = Hits::default();
    let mirror = not_found_mirror(hits.clone()).await;
    let mirror_addr = mirror.addr;
    let server = tokio::task::spawn_blocking(move || {
        let host = reg.addr.to_string();
        let image = push(&host, "anyone:anything", 22);
        let pushed = reg.requests().len();
        let ctrd = Containerd::start();
        let hosts = hosts_dir(&[("reg-x.test", &mirror_then_server(mirror_addr, &host))]);
        let out = ctrd.pull("reg-x.test/group/app:v1", hosts.path(), None);
        assert_pulled(&ctrd, &out, "reg-x.test/group/app:v1", &image);
        report_registry(&reg, "fallback server (open registry)", pushed)
    })
    .await
    .unwrap();
    let hits = hits.report("404 mirror");
    assert!(!hits.is_empty(), "the mirror was never asked");
    assert_eq!(
        (hits[0].method.as_str(), hits[0].uri.as_str()),
        ("HEAD", "/v2/group/app/manifests/v1?ns=reg-x.test"),
        "containerd resolves on the first host first"
    );
    for h in &hits {
        assert!(h.uri.starts_with("/v2/group/app/"), "{}", h.uri);
        assert!(h.uri.ends_with("?ns=reg-x.test"), "no ns on {}", h.uri);
        assert!(h.authorization.is_none(), "credentials reached the mirror");
    }
    // `ns` goes to every host whose name differs from the image's registry, `server` included.
    assert!(
        server.contains(&"HEAD /v2/group/app/manifests/v1?ns=reg-x.test 200".to_owned()),
        "{server:?}"
    );
    eprintln!("took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn mirror_answering_404_never_sees_credentials_when_server_challenges() {
    let started = Instant::now();
    let gl = with_developer_pat(USER, PAT, "group/app", Duration::from_secs(300)).await;
    let reg = Registry::start(&gl.realm());
    let hits = Hits::default();
    let mirror = not_found_mirror(hits.clone()).await;
    let mirror_addr = mirror.addr;
    tokio::task::spawn_blocking(move || {
        let host = reg.addr.to_string();
        let image = push(&host, &format!("{USER}:{PAT}"), 23);
        let pushed = reg.requests().len();
        let ctrd = Containerd::start();
        let hosts = hosts_dir(&[("reg-x.test", &mirror_then_server(mirror_addr, &host))]);
        let user = format!("{USER}:{PAT}");
        let out = ctrd.pull("reg-x.test/group/app:v1", hosts.path(), Some(&user));
        assert_pulled(&ctrd, &out, "reg-x.test/group/app:v1", &image);
        report_registry(&reg, "fallback server (token registry)", pushed);
    })
    .await
    .unwrap();
    let hits = hits.report("404 mirror (server challenges, ctr has --user)");
    assert!(!hits.is_empty(), "the mirror was never asked");
    for h in &hits {
        assert!(h.uri.ends_with("?ns=reg-x.test"), "no ns on {}", h.uri);
        assert!(
            h.authorization.is_none(),
            "credentials reached the mirror: {} {}",
            h.method,
            h.uri
        );
    }
    assert!(
        gl.seen()
            .iter()
            .any(|s| s.username.as_deref() == Some(USER) && s.status == 200),
        "ctr never used its credentials at the server's realm"
    );
    eprintln!("took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn override_path_mirror_gets_prefixed_path_and_ns() {
    let started = Instant::now();
    let reg = Registry::start_open();
    let hits = Hits::default();
    let mirror = stripping_mirror(hits.clone(), "/v2/reg-x.test", reg.addr).await;
    let mirror_addr = mirror.addr;
    let behind = tokio::task::spawn_blocking(move || {
        let image = push(&reg.addr.to_string(), "anyone:anything", 24);
        let pushed = reg.requests().len();
        let ctrd = Containerd::start();
        // No `server`: the default (https://reg-x.test) cannot resolve, so success means the
        // mirror served the pull.
        let toml = format!(
            "[host.\"http://{mirror_addr}/v2/reg-x.test\"]\n  capabilities = [\"pull\", \"resolve\"]\n  override_path = true\n"
        );
        let hosts = hosts_dir(&[("reg-x.test", toml.as_str())]);
        let out = ctrd.pull("reg-x.test/group/app:v1", hosts.path(), None);
        assert_pulled(&ctrd, &out, "reg-x.test/group/app:v1", &image);
        report_registry(&reg, "open registry behind the mirror", pushed)
    })
    .await
    .unwrap();
    let hits = hits.report("override_path mirror");
    assert!(!hits.is_empty(), "the mirror was never asked");
    assert_eq!(
        (hits[0].method.as_str(), hits[0].uri.as_str()),
        (
            "HEAD",
            "/v2/reg-x.test/group/app/manifests/v1?ns=reg-x.test"
        ),
    );
    for h in &hits {
        assert!(
            h.uri.starts_with("/v2/reg-x.test/group/app/") && h.uri.ends_with("?ns=reg-x.test"),
            "unexpected form {}",
            h.uri
        );
        assert!(h.authorization.is_none());
    }
    assert_eq!(
        behind.len(),
        hits.len(),
        "the mirror forwarded every request"
    );
    eprintln!("took {:?}", started.elapsed());
}
