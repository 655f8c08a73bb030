//! GitLab's Dependency Proxy behind regrelay, with real clients: the GitLab host itself is the
//! upstream for a group's `…/dependency_proxy/containers/…` paths (5 s DP tokens, re-minted by
//! regrelay while a pull crawls over a slow link), and a group's Dependency Proxy is regrelay's
//! Docker Hub mirror, pulled anonymously at the root as dockerd's `registry-mirrors` does, with
//! a deploy token regrelay injects. The DP is the GitLab stand-in's
//! ([`support::gitlab::GitLabBuilder::dependency_proxy`]), backed by a real `docker-registry`.

use crate::support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use regrelay::body;
use support::gitlab::{gitlab, CiJob, Credential, GitLab, Role, TokenScope, DP_SERVICE};
use support::upstream::client;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GROUP: &str = "my-group";
const USER: &str = "dora";
const PAT: &str = "glpat-Dp4nXw8RtK2mQz7VbLc9";
/// A user with a valid PAT (read and write registry, as the DP's token service requires) who
/// is not a member of the group.
const OUTSIDER: &str = "oscar";
const OUTSIDER_PAT: &str = "glpat-Os3kLm9PqW2xRt6YhNb4";
/// A group deploy token of my-group (`read_registry` and `write_registry`: GitLab's Dependency
/// Proxy takes no other).
const DEPLOY_USER: &str = "gitlab+deploy-token-42";
const DEPLOY_TOKEN: &str = "gldt-Dy7pQw3ZkXm8RnLt2VcB";
/// Docker Hub's own admin (pushes the images the backing registry serves).
const HUB_USER: &str = "hub-admin";
const HUB_PAT: &str = "glpat-Hb9sKq4WxNm2RtYc7LpZ";
/// DP token lifetime.
const LIFETIME: Duration = Duration::from_secs(5);
/// The slow link: bytes per second, server → client.
const RATE: u64 = 256 * 1024;
/// Three layers of ~1.5 MiB: ~18 s at [`RATE`], several token lifetimes.
const LAYERS: [usize; 3] = [1536 << 10, 1536 << 10, 1536 << 10];
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json";

/// A CI job of a project in the group, run by a Guest of the group: GitLab's DP accepts a job
/// token as its user, who must be a member of the group.
fn job() -> CiJob {
    CiJob::new("glcbt-Jb6vNq2XwLm9RtKc4PzH", "my-group/app", "erin")
}

/// Docker Hub (a real registry with its own token service, holding `library/alpine:3`) and the
/// GitLab stand-in whose group `my-group` has a Dependency Proxy in front of it.
struct World {
    gl: GitLab,
    _hub_gl: GitLab,
    hub: Registry,
    alpine: OciImage,
}

async fn world() -> World {
    let hub_gl = gitlab()
        .credential(Credential::Pat {
            user: HUB_USER.into(),
            token: HUB_PAT.into(),
            scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
        })
        .project("library/alpine", true, &[(HUB_USER, Role::Developer)])
        .start()
        .await;
    let hub = Registry::start(&hub_gl.realm());
    let gl = gitlab()
        .credential(Credential::Pat {
            user: USER.into(),
            token: PAT.into(),
            scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
        })
        .credential(Credential::Pat {
            user: OUTSIDER.into(),
            token: OUTSIDER_PAT.into(),
            scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
        })
        .credential(Credential::Deploy {
            username: DEPLOY_USER.into(),
            token: DEPLOY_TOKEN.into(),
            scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
            project: GROUP.into(),
        })
        .credential(job().credential())
        .dependency_proxy(
            GROUP,
            &[(USER, Role::Reporter), (&job().user, Role::Guest)],
            hub.addr,
        )
        .lifetime(LIFETIME)
        .start()
        .await;
    let alpine = OciImage::random(301, &LAYERS);
    let (src, dest) = (
        alpine.reference(),
        format!("docker://{}/library/alpine:3", hub.addr),
    );
    let out = tokio::task::spawn_blocking(move || {
        skopeo_copy(
            &src,
            &dest,
            &format!("{HUB_USER}:{HUB_PAT}"),
            &Transport::Http,
        )
    })
    .await
    .unwrap();
    assert!(out.status.success(), "seeding failed: {}", text(&out));
    World {
        gl,
        _hub_gl: hub_gl,
        hub,
        alpine,
    }
}

impl World {
    fn gl_url(&self) -> String {
        format!("http://{}", self.gl.addr)
    }
}

/// A TCP relay whose server → client bytes share one rate: a slow downlink, so pulls crawl
/// (tests/support/relay.rs paces only client → server bytes, which a pull barely has).
struct Downlink {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Downlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Downlink {
    async fn start(backend: SocketAddr, bytes_per_sec: u64) -> Downlink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let next_free = Arc::new(Mutex::new(tokio::time::Instant::now()));
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let next_free = next_free.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                        let _ = sw.shutdown().await;
                    });
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let until = {
                            let mut next = next_free.lock().unwrap();
                            let start = (*next).max(tokio::time::Instant::now());
                            *next =
                                start + Duration::from_secs_f64(n as f64 / bytes_per_sec as f64);
                            *next
                        };
                        tokio::time::sleep_until(until).await;
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = cw.shutdown().await;
                    up.abort();
                });
            }
        });
        Downlink { addr, task }
    }
}

async fn get(url: &str, headers: &[(&str, &str)]) -> (StatusCode, http::HeaderMap, Vec<u8>) {
    request(Method::GET, url, headers).await
}

async fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, Vec<u8>) {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client()
        .request(req.body(body::empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, bytes.to_vec())
}

fn basic(user: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{secret}")))
}

/// A DP token from the stand-in for these credentials.
async fn dp_token(gl: &GitLab, user: &str, secret: &str) -> String {
    let url = format!(
        "{}?service={DP_SERVICE}&scope=repository:{GROUP}/dependency_proxy/containers/library/alpine:pull",
        gl.realm()
    );
    let (status, _, body) = get(&url, &[("authorization", &basic(user, secret))]).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 1, "exactly {{\"token\":…}}");
    v["token"].as_str().unwrap().to_owned()
}

fn claims(jwt: &str) -> serde_json::Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn www_authenticate(h: &http::HeaderMap) -> String {
    h.get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// The stand-in's Dependency Proxy serves a group's content as GitLab's does (its auth rules are
/// checked row by row in gitlab_stand_in/dp.rs); the rest of this file relies on it.
#[tokio::test(flavor = "multi_thread")]
async fn stand_in_dependency_proxy_behaves_like_gitlab() {
    let w = world().await;
    let gl = &w.gl;
    let base = w.gl_url();
    let challenge = format!(
        "Bearer realm=\"{}\",service=\"dependency_proxy\"",
        gl.realm()
    );
    // /v2/ and content: challenged for the DP service (no scope), with an empty body.
    let manifest =
        format!("{base}/v2/{GROUP}/dependency_proxy/containers/library/alpine/manifests/3");
    for url in [format!("{base}/v2/"), manifest.clone()] {
        let (status, h, body) = get(&url, &[("accept", ACCEPT)]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{url}");
        assert_eq!(www_authenticate(&h), challenge, "{url}");
        assert!(body.is_empty(), "{url}");
    }
    // Anonymous token requests: the DP service's 403; bad credentials 401; a PAT 200.
    let token_url = format!("{}?service={DP_SERVICE}", gl.realm());
    let (status, _, body) = get(&token_url, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        String::from_utf8_lossy(&body),
        r#"{"message":"access forbidden","status":"error","http_status":403}"#
    );
    let (status, _, _) = get(&token_url, &[("authorization", &basic(USER, "wrong"))]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(gl.dp_mints(), 0);
    let token = dp_token(gl, USER, PAT).await;
    assert_eq!(gl.dp_mints(), 1);
    assert_eq!(gl.mints(), 0, "DP mints are counted apart");
    let c = claims(&token);
    assert_eq!(
        c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(),
        LIFETIME.as_secs()
    );
    let bearer = format!("Bearer {token}");
    let (status, _, _) = get(&format!("{base}/v2/"), &[("authorization", &bearer)]).await;
    assert_eq!(status, StatusCode::OK);
    // A member's token pulls the manifest (Content-Type and digest kept) and a blob.
    let (status, h, body) = get(&manifest, &[("authorization", &bearer), ("accept", ACCEPT)]).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(digest(&body), w.alpine.manifest_digest);
    assert_eq!(
        h["docker-content-digest"],
        w.alpine.manifest_digest.as_str()
    );
    assert_eq!(
        h["content-type"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let (layer, size) = &w.alpine.layers[0];
    let blob =
        format!("{base}/v2/{GROUP}/dependency_proxy/containers/library/alpine/blobs/{layer}");
    let (status, h, _) = request(Method::HEAD, &blob, &[("authorization", &bearer)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["content-length"], size.to_string().as_str());
    let (status, _, body) = get(&blob, &[("authorization", &bearer)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&digest(&body), layer);
    // An image the backing registry lacks: its 404 and JSON error.
    let missing = format!("{base}/v2/{GROUP}/dependency_proxy/containers/library/nope/manifests/1");
    let (status, _, body) = get(&missing, &[("authorization", &bearer), ("accept", ACCEPT)]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["errors"][0]["code"], "MANIFEST_UNKNOWN", "{v}");
    // CI job credentials and the group deploy token work; a non-member's valid token gets
    // GitLab's empty 404 (the group is hidden from it).
    for (user, secret) in [
        (job().dependency_proxy_user(), job().token.clone()),
        (DEPLOY_USER, DEPLOY_TOKEN.to_owned()),
    ] {
        let t = dp_token(gl, user, &secret).await;
        let (status, _, _) = get(
            &manifest,
            &[
                ("authorization", &format!("Bearer {t}")),
                ("accept", ACCEPT),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{user}");
    }
    let t = dp_token(gl, OUTSIDER, OUTSIDER_PAT).await;
    let (status, _, body) = get(
        &manifest,
        &[
            ("authorization", &format!("Bearer {t}")),
            ("accept", ACCEPT),
        ],
    )
    .await;
    assert_eq!((status, body.len()), (StatusCode::NOT_FOUND, 0));
    // The DP's tokens are not registry tokens: the backing registry refuses them.
    let (status, _, _) = get(
        &format!("{}/v2/library/alpine/manifests/3", w.hub.url()),
        &[("authorization", &bearer), ("accept", ACCEPT)],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let reqs = gl.dp_requests();
    assert!(reqs
        .iter()
        .any(|r| r.identity.as_deref() == Some("user:dora") && r.status == 200));
    assert!(reqs.iter().any(
        |r| r.identity.as_deref() == Some("deploy:gitlab+deploy-token-42") && r.status == 200
    ));
    assert!(reqs
        .iter()
        .any(|r| r.identity.as_deref() == Some("job:my-group/app:erin") && r.status == 200));
    // Every DP token request is in seen(), with its service.
    let seen = gl.seen();
    assert_eq!(
        seen.iter().filter(|s| s.status == 200).count(),
        gl.dp_mints()
    );
}

/// `skopeo copy docker://REFERENCE DEST` with `creds` (`user:secret`) or none at all; returns the
/// output and how long it took.
async fn skopeo_pull(
    reference: &str,
    creds: Option<&str>,
    dest: &str,
) -> (std::process::Output, Duration) {
    let mut args = vec!["copy".to_owned(), "--src-tls-verify=false".into()];
    match creds {
        Some(c) => args.extend(["--src-creds".into(), c.to_owned()]),
        None => args.push("--src-no-creds".into()),
    }
    args.extend([format!("docker://{reference}"), dest.to_owned()]);
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let out = skopeo(&args.iter().map(String::as_str).collect::<Vec<_>>());
        (out, start.elapsed())
    })
    .await
    .unwrap()
}

/// A `docker-archive:` destination in `dir`. skopeo writes such an archive one blob at a time
/// (an `oci:` layout takes layers in parallel, all requested at once), so each layer request
/// reaches regrelay after the previous layer crawled over the slow link: the pull spans several
/// token lifetimes request by request, as a Docker daemon with `max-concurrent-downloads` 1 does.
fn archive(dir: &tempfile::TempDir, name: &str) -> (std::path::PathBuf, String) {
    let path = dir.path().join(format!("{name}.tar"));
    let dest = format!("docker-archive:{}", path.display());
    (path, dest)
}

/// The image's config blob (digest, bytes), from its OCI layout.
fn config_of(image: &OciImage) -> (String, Vec<u8>) {
    let blob = |d: &str| {
        std::fs::read(
            image
                .dir
                .path()
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )
        .unwrap()
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(&image.manifest_digest)).unwrap();
    let d = manifest["config"]["digest"].as_str().unwrap().to_owned();
    let bytes = blob(&d);
    (d, bytes)
}

/// A docker-archive holds the image's config byte for byte and every layer (stored
/// uncompressed, named by its diff ID) with the content that was pushed. (skopeo itself checked
/// each compressed blob against its digest while pulling.)
fn assert_archive_matches(image: &OciImage, archive: &std::path::Path) {
    let mut files = std::collections::HashMap::new();
    let mut tar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = entry.path().unwrap().display().to_string();
        let mut data = vec![];
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        files.insert(name, data);
    }
    let (config_digest, config) = config_of(image);
    let hex = config_digest.trim_start_matches("sha256:");
    assert_eq!(
        files.get(&format!("{hex}.json")),
        Some(&config),
        "the pulled config differs"
    );
    let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(diff_ids.len(), image.layers.len());
    for d in diff_ids {
        let d = d.as_str().unwrap();
        let layer = files
            .get(&format!("{}.tar", d.trim_start_matches("sha256:")))
            .unwrap_or_else(|| panic!("the archive lacks layer {d}"));
        assert_eq!(&digest(layer), d, "a pulled layer differs");
    }
}

/// Lines of regrelay's output that contain `needle`.
fn count_lines(output: &str, needle: &str) -> usize {
    output.lines().filter(|l| l.contains(needle)).count()
}

/// (a) The GitLab host itself is the upstream; clients pull a group's Dependency Proxy paths
/// with a PAT and with a CI job's `CI_DEPENDENCY_PROXY_USER`/`_PASSWORD`, over a slow link, each
/// pull outliving several 5 s DP tokens: regrelay re-mints them at the realm and for the
/// `service` the DP's challenge named, the content arrives intact, anonymous clients get the
/// DP's 403 and non-members its 404, each said in the registry's error format.
#[tokio::test(flavor = "multi_thread")]
async fn group_dp_pulls_outlive_dp_tokens_with_pat_and_ci_job_credentials() {
    let w = world().await;
    let px = Regrelay::start(&["--registry", &w.gl_url()]);
    let link = Downlink::start(px.addr, RATE).await;
    let path = format!("{GROUP}/dependency_proxy/containers/library/alpine");
    let reference = format!("{}/{path}:3", link.addr);
    let dir = tempfile::tempdir().unwrap();
    let ci = job();
    let pulls = [
        ("PAT", format!("{USER}:{PAT}"), "user:dora".to_owned()),
        (
            "CI job",
            ci.dependency_proxy_creds(),
            format!("job:{}:{}", ci.project, ci.user),
        ),
    ];
    for (what, creds, identity) in &pulls {
        let before = w.gl.dp_requests().len();
        let (file, dest) = archive(&dir, what);
        let (out, took) = skopeo_pull(&reference, Some(creds), &dest).await;
        assert!(
            out.status.success(),
            "{what} pull failed: {}\n{}",
            text(&out),
            px.output.text()
        );
        assert_archive_matches(&w.alpine, &file);
        assert!(
            took >= 3 * LIFETIME,
            "{what}: the pull took {took:?}, not several token lifetimes"
        );
        // Every content request reached the DP with a token of this client's identity.
        let reqs = w.gl.dp_requests()[before..].to_vec();
        let served: Vec<_> = reqs.iter().filter(|r| r.path != "/v2/").collect();
        assert_eq!(served.len(), 1 + 1 + LAYERS.len(), "{what}: {reqs:#?}");
        for r in served {
            assert_eq!(r.status, 200, "{what}: {r:?}");
            assert_eq!(r.identity.as_deref(), Some(identity.as_str()), "{r:?}");
        }
    }
    let out = px.output.settled();
    // Each pull asked regrelay for one token; regrelay asked the DP for more, while the pulls
    // crawled (every layer request came after the previous token's life).
    let client_requests = count_lines(&out, "regrelay::auth: token request");
    assert_eq!(client_requests, pulls.len(), "{out}");
    assert!(
        w.gl.dp_mints() >= 2 * client_requests,
        "the DP minted {} tokens for {client_requests} client token requests: regrelay did not \
         re-mint\n{out}",
        w.gl.dp_mints()
    );
    // Every token request the DP saw named its service, the client's (forwarded) and
    // regrelay's own re-mints alike: skopeo sends `account=`, regrelay's own requests do not.
    let seen = w.gl.seen();
    assert_eq!(seen.len(), w.gl.dp_mints(), "{seen:#?}");
    let own: Vec<_> = seen
        .iter()
        .filter(|s| !s.query.contains("account="))
        .collect();
    assert!(own.len() >= pulls.len() * 2, "{seen:#?}");
    for s in &seen {
        let params = support::gitlab::parse_query(&s.query);
        assert!(
            params.contains(&("service".into(), DP_SERVICE.into())),
            "a DP token request without service=dependency_proxy: {s:?}"
        );
        assert!(
            params.contains(&("scope".into(), format!("repository:{path}:pull"))),
            "{s:?}"
        );
        assert_eq!(s.status, 200, "{s:?}");
    }
    // Anonymous: the DP refuses to mint (GitLab: 403 "access forbidden"), regrelay says so.
    let (out, _) = skopeo_pull(
        &format!("{}/{path}:3", px.addr),
        None,
        &archive(&dir, "anonymous").1,
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("403 (Forbidden)"),
        "anonymous pull: {}",
        text(&out)
    );
    let (status, _, body) = get(
        &format!(
            "{}/jwt/auth?service={DP_SERVICE}&scope=repository:{path}:pull",
            px.url()
        ),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // GitLab's DP token service words its 403 `{"message":…,"status":"error","http_status":403}`;
    // a registry client is told in the registry's error format, GitLab's message kept.
    let said: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    assert_eq!(
        said["errors"][0]["code"],
        "DENIED",
        "not the registry's error format: {}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        said["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("access forbidden")),
        "{said}"
    );
    // A valid PAT of a non-member: a token, then GitLab's empty 404 on the content (the DP hides
    // the group from non-members); the client is told more than a bare status.
    let (out, _) = skopeo_pull(
        &format!("{}/{path}:3", px.addr),
        Some(&format!("{OUTSIDER}:{OUTSIDER_PAT}")),
        &archive(&dir, "outsider").1,
    )
    .await;
    assert!(!out.status.success());
    assert!(
        w.gl.dp_requests()
            .iter()
            .any(|r| r.identity.as_deref() == Some("user:oscar") && r.status == 404),
        "the DP refused the non-member"
    );
    assert!(
        !text(&out).contains("StatusCode: 404"),
        "a bodiless 404, unexplained: {}",
        text(&out)
    );
    let out = px.output.settled();
    let mut secrets = w.gl.issued();
    secrets.extend([PAT.to_owned(), OUTSIDER_PAT.to_owned()]);
    assert_no_secrets(&out, USER, &secrets);
    assert_no_secrets(
        &out,
        ci.dependency_proxy_user(),
        std::slice::from_ref(&ci.token),
    );
}

/// A DP token GitLab stops accepting (its secret changed) is refused with the DP's 401, whose
/// challenge names no `error=` (app/controllers/concerns/dependency_proxy/auth.rb): regrelay
/// forgets it as it would an `invalid_token` and retries once with a new one, so the client sees
/// nothing of it.
#[tokio::test(flavor = "multi_thread")]
async fn a_dp_token_gitlab_stops_accepting_is_minted_again() {
    let w = world().await;
    let px = Regrelay::start(&["--registry", &w.gl_url()]);
    let path = format!("{GROUP}/dependency_proxy/containers/library/alpine");
    let (status, _, body) = get(
        &format!(
            "{}/jwt/auth?service={DP_SERVICE}&scope=repository:{path}:pull",
            px.url()
        ),
        &[("authorization", &basic(USER, PAT))],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let bearer = format!("Bearer {}", v["token"].as_str().unwrap());
    let manifest = format!("{}/v2/{path}/manifests/3", px.url());
    let headers = [("authorization", bearer.as_str()), ("accept", ACCEPT)];
    let (status, _, _) = get(&manifest, &headers).await;
    assert_eq!(status, StatusCode::OK);
    w.gl.rotate_dp_secret();
    let (mints, seen) = (w.gl.dp_mints(), w.gl.dp_requests().len());
    let (status, _, body) = get(&manifest, &headers).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(w.gl.dp_mints(), mints + 1, "one new DP token");
    let statuses: Vec<u16> = w.gl.dp_requests()[seen..]
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(
        statuses,
        [401, 200],
        "the stale token refused, the new one served"
    );
}

/// regrelay for (b): the GitLab host as the default upstream, and the group's Dependency Proxy
/// as the `docker.io` mirror at the root, with a deploy token for credential-less pulls.
fn mirror_relay(w: &World, creds: &tempfile::NamedTempFile) -> Regrelay {
    std::fs::write(creds.path(), format!("{DEPLOY_USER}:{DEPLOY_TOKEN}\n")).unwrap();
    std::fs::set_permissions(
        creds.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let upstream = format!(
        "docker.io=http://{}/v2/{GROUP}/dependency_proxy/containers",
        w.gl.addr
    );
    let injected = format!("docker.io={}", creds.path().display());
    Regrelay::start(&[
        "--registry",
        &w.gl_url(),
        "--upstream",
        &upstream,
        "--root-upstream",
        "docker.io",
        "--upstream-credentials",
        &injected,
    ])
}

/// What the DP and its token service saw came from the deploy token only, and regrelay's output
/// holds neither it nor any token.
fn assert_only_the_deploy_token(w: &World, px: &Regrelay) {
    let seen = w.gl.seen();
    assert!(!seen.is_empty());
    for s in &seen {
        assert_eq!(s.username.as_deref(), Some(DEPLOY_USER), "{s:?}");
        assert!(s.query.contains(&format!("service={DP_SERVICE}")), "{s:?}");
    }
    for r in w.gl.dp_requests() {
        match &r.identity {
            Some(id) => assert_eq!(id, &format!("deploy:{DEPLOY_USER}"), "{r:?}"),
            // regrelay's own `GET /v2/` (it learns the realm and service there).
            None => assert!(r.path == "/v2/" && r.authorization.is_none(), "{r:?}"),
        }
    }
    let mut secrets = w.gl.issued();
    secrets.push(DEPLOY_TOKEN.to_owned());
    assert_no_secrets(&px.output.settled(), DEPLOY_USER, &secrets);
}

/// (b) A group's Dependency Proxy as regrelay's Docker Hub mirror: a client with no credentials
/// at all asks the root for `library/alpine:3`'s manifest and each blob, as a mirror client does
/// before any challenge, over a slow link that takes several DP token lifetimes; regrelay pulls
/// via the group cache with its deploy token, re-minting DP tokens, and shows it to nobody.
#[tokio::test(flavor = "multi_thread")]
async fn dp_docker_hub_mirror_serves_credential_less_pulls_with_the_deploy_token() {
    let w = world().await;
    let creds = tempfile::NamedTempFile::new().unwrap();
    let px = mirror_relay(&w, &creds);
    let link = Downlink::start(px.addr, RATE).await;
    let base = format!("http://{}/v2/library/alpine", link.addr);
    let start = Instant::now();
    let (status, h, manifest) = get(&format!("{base}/manifests/3"), &[("accept", ACCEPT)]).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}\n{}",
        String::from_utf8_lossy(&manifest),
        px.output.text()
    );
    assert_eq!(digest(&manifest), w.alpine.manifest_digest);
    assert_eq!(
        h["docker-content-digest"],
        w.alpine.manifest_digest.as_str()
    );
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let mut blobs = vec![m["config"].clone()];
    blobs.extend(m["layers"].as_array().unwrap().iter().cloned());
    for b in &blobs {
        let d = b["digest"].as_str().unwrap();
        let (status, _, data) = get(&format!("{base}/blobs/{d}"), &[]).await;
        assert_eq!(status, StatusCode::OK, "{d}\n{}", px.output.text());
        assert_eq!(digest(&data), d);
        assert_eq!(data.len() as u64, b["size"].as_u64().unwrap());
    }
    let took = start.elapsed();
    assert!(took >= 3 * LIFETIME, "the pull took only {took:?}");
    let out = px.output.settled();
    assert_eq!(
        count_lines(&out, "pull with injected credentials"),
        1 + blobs.len(),
        "{out}"
    );
    assert_eq!(count_lines(&out, "regrelay::auth: token request"), 0);
    // Several DP tokens for one injected session: re-minted as the pull crawled.
    assert!(w.gl.dp_mints() >= 3, "DP mints: {}\n{out}", w.gl.dp_mints());
    let served: Vec<_> =
        w.gl.dp_requests()
            .into_iter()
            .filter(|r| r.path != "/v2/")
            .collect();
    assert_eq!(served.len(), 1 + blobs.len());
    for r in &served {
        assert!(
            r.path.starts_with(&format!(
                "/v2/{GROUP}/dependency_proxy/containers/library/alpine/"
            )),
            "{r:?}"
        );
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_only_the_deploy_token(&w, &px);
}

/// (b) The same mirror pulled by a real client with no credentials, the way dockerd's
/// `registry-mirrors` pulls (`/v2/` ping, 401, an anonymous token request at the realm the
/// challenge names, then `GET /v2/library/alpine/manifests/3` at the root): skopeo with
/// `--src-no-creds`, over the slow link.
#[tokio::test(flavor = "multi_thread")]
async fn anonymous_skopeo_pulls_docker_hub_through_the_group_dp_mirror() {
    let w = world().await;
    let creds = tempfile::NamedTempFile::new().unwrap();
    let px = mirror_relay(&w, &creds);
    let link = Downlink::start(px.addr, RATE).await;
    let dir = tempfile::tempdir().unwrap();
    let (file, dest) = archive(&dir, "anonymous");
    let (out, took) = skopeo_pull(&format!("{}/library/alpine:3", link.addr), None, &dest).await;
    if !out.status.success() {
        // What a client is told at the root, and what regrelay asked GitLab.
        let (status, h, _) = get(&format!("{}/v2/", px.url()), &[]).await;
        let asked: Vec<_> =
            w.gl.seen()
                .iter()
                .map(|s| {
                    format!(
                        "{} ?{} → {}",
                        s.username.as_deref().unwrap_or("(anonymous)"),
                        s.query,
                        s.status
                    )
                })
                .collect();
        panic!(
            "an anonymous mirror pull failed: {}\nGET /v2/ at regrelay: {status} {}\nGitLab's token \
             service saw: {asked:#?}\nregrelay:\n{}",
            text(&out),
            www_authenticate(&h),
            px.output.text()
        );
    }
    assert_archive_matches(&w.alpine, &file);
    assert!(took >= 3 * LIFETIME, "the pull took only {took:?}");
    assert!(w.gl.dp_mints() >= 3, "DP mints: {}", w.gl.dp_mints());
    assert_only_the_deploy_token(&w, &px);
}

/// (c) The real Docker daemon logs in with a CI job's Dependency Proxy credentials and pulls a
/// group DP image through regrelay (the GitLab host as upstream); the image is the one pushed.
#[tokio::test(flavor = "multi_thread")]
async fn docker_pulls_a_group_dp_image_with_ci_job_credentials() {
    const NAME: &str = "docker_pulls_a_group_dp_image_with_ci_job_credentials";
    if !docker_available() {
        support::skip(NAME, "no Docker daemon (`docker info` failed)");
        return;
    }
    let w = world().await;
    let px = Regrelay::start(&["--registry", &w.gl_url()]);
    let host = px.addr.to_string();
    let image = format!("{host}/{GROUP}/dependency_proxy/containers/library/alpine:3");
    let ci = job();
    let (config_digest, _) = config_of(&w.alpine);
    let outcome = tokio::task::spawn_blocking({
        let (image, ci) = (image.clone(), ci.clone());
        move || {
            let cfg = tempfile::tempdir().unwrap();
            let c = cfg.path();
            let login = docker(
                c,
                &[
                    "login",
                    &host,
                    "-u",
                    ci.dependency_proxy_user(),
                    "--password-stdin",
                ],
                Some(ci.dependency_proxy_password()),
            );
            let said = text(&login);
            if !login.status.success()
                && (said.contains("connection refused") || said.contains("dial tcp"))
            {
                return Err(format!("the Docker daemon cannot reach {host}: {said}"));
            }
            assert!(login.status.success(), "docker login failed: {said}");
            let pull = docker(c, &["pull", &image], None);
            let id = docker(
                c,
                &["image", "inspect", "--format", "{{.Id}}", &image],
                None,
            );
            let _ = docker(c, &["rmi", &image], None);
            assert!(pull.status.success(), "docker pull failed: {}", text(&pull));
            Ok(String::from_utf8_lossy(&id.stdout).trim().to_owned())
        }
    })
    .await
    .unwrap();
    let id = match outcome {
        Ok(id) => id,
        Err(why) => {
            support::skip(NAME, &why);
            return;
        }
    };
    assert_eq!(id, config_digest, "the pulled image is not the pushed one");
    let out = px.output.settled();
    let path = format!("/v2/{GROUP}/dependency_proxy/containers/library/alpine");
    assert!(
        out.lines()
            .any(|l| l.contains(&format!("path={path}/manifests/3 status=200"))),
        "the pull did not go through regrelay:\n{out}"
    );
    for (d, _) in &w.alpine.layers {
        assert!(
            out.contains(&format!("method=GET path={path}/blobs/{d} status=200")),
            "{d}:\n{out}"
        );
    }
    let identity = format!("job:{}:{}", ci.project, ci.user);
    assert!(w
        .gl
        .dp_requests()
        .iter()
        .filter(|r| r.status == 200 && r.path != "/v2/")
        .all(|r| r.identity.as_deref() == Some(identity.as_str())));
    let mut secrets = w.gl.issued();
    secrets.push(ci.token.clone());
    assert_no_secrets(&out, ci.dependency_proxy_user(), &secrets);
}
