//! The drop-in mirror endpoint: several upstreams behind one regrelay, every client form routed
//! (registries.conf prefix mirrors with skopeo, containerd's `?ns=`, a root upstream), an
//! upstream's repository prefix hidden from clients, sessions bound to one upstream, unknown
//! namespaces answered 404 without a challenge, pushes through mirror forms refused, and
//! injected pull credentials for clients that have none: only pulls, only from allowed
//! addresses, never shown to anyone.

use crate::support;

use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use regrelay::body;
use support::gitlab::{gitlab, Credential, GitLab, Role, TokenScope};
use support::upstream::client;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USER: &str = "frank";
const PAT: &str = "glpat-Mw4cRt8YnQx2LbVz6KpJ";
/// The mirrored registries' own user (pushes the images they serve).
const HUB_USER: &str = "hub-admin";
const HUB_PAT: &str = "glpat-Hb7dKq2WxNm5RtYc3LpZ";
const DEPLOY_USER: &str = "gitlab+deploy-token-7";
const DEPLOY_TOKEN: &str = "gldt-Rk9vXw2QmLp5TbNc8YzH";

/// The default upstream (a GitLab registry with a private project), and two mirrored
/// registries: `ghcr.io` (plain) and `docker.io` (behind a repository prefix, like a GitLab
/// group's dependency proxy), each holding one public image.
struct World {
    gl: GitLab,
    hub_gl: GitLab,
    gitlab_reg: Registry,
    ghcr: Registry,
    hub: Registry,
    private: OciImage,
    alpine: OciImage,
    busybox: OciImage,
}

async fn world() -> World {
    let gl = gitlab()
        .credential(Credential::Pat {
            user: USER.into(),
            token: PAT.into(),
            scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
        })
        .credential(Credential::Deploy {
            username: DEPLOY_USER.into(),
            token: DEPLOY_TOKEN.into(),
            scopes: vec![TokenScope::ReadRegistry],
            project: "group/app".into(),
        })
        .project("group/app", false, &[(USER, Role::Developer)])
        .lifetime(Duration::from_secs(300))
        .start()
        .await;
    let hub_gl = gitlab()
        .credential(Credential::Pat {
            user: HUB_USER.into(),
            token: HUB_PAT.into(),
            scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
        })
        .project("library/alpine", true, &[(HUB_USER, Role::Developer)])
        .project(
            "mirror-group/containers/library/busybox",
            true,
            &[(HUB_USER, Role::Developer)],
        )
        .lifetime(Duration::from_secs(300))
        .start()
        .await;
    let gitlab_reg = Registry::start(&gl.realm());
    let ghcr = Registry::start(&hub_gl.realm());
    let hub = Registry::start(&hub_gl.realm());
    let private = OciImage::random(101, &[1 << 20]);
    let alpine = OciImage::random(102, &[1 << 20]);
    let busybox = OciImage::random(103, &[1 << 20]);
    let pushes = [
        (
            &private,
            format!("{}/group/app:v1", gitlab_reg.addr),
            USER,
            PAT,
        ),
        (
            &alpine,
            format!("{}/library/alpine:3", ghcr.addr),
            HUB_USER,
            HUB_PAT,
        ),
        (
            &busybox,
            format!("{}/mirror-group/containers/library/busybox:1", hub.addr),
            HUB_USER,
            HUB_PAT,
        ),
    ];
    for (image, dest, user, pat) in pushes {
        let (src, dest, creds) = (
            image.reference(),
            format!("docker://{dest}"),
            format!("{user}:{pat}"),
        );
        let out =
            tokio::task::spawn_blocking(move || skopeo_copy(&src, &dest, &creds, &Transport::Http))
                .await
                .unwrap();
        assert!(out.status.success(), "seeding failed: {}", text(&out));
    }
    World {
        gl,
        hub_gl,
        gitlab_reg,
        ghcr,
        hub,
        private,
        alpine,
        busybox,
    }
}

impl World {
    fn relay(&self, extra: &[&str]) -> Regrelay {
        let ghcr = format!("ghcr.io=http://{}", self.ghcr.addr);
        let hub = format!(
            "docker.io=http://{}/v2/mirror-group/containers",
            self.hub.addr
        );
        let mut args = vec![
            "--registry".to_owned(),
            self.gitlab_reg.url(),
            "--upstream".to_owned(),
            ghcr,
            "--upstream".to_owned(),
            hub,
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Regrelay::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

/// A deploy/ snippet with `RELAY` replaced.
fn snippet(path: &str, relay: SocketAddr) -> String {
    let text = std::fs::read_to_string(format!("{}/deploy/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("deploy/{path}: {e}"));
    text.replace("RELAY", &relay.to_string())
}

async fn get(url: &str, headers: &[(&str, &str)]) -> (StatusCode, http::HeaderMap, String) {
    let mut req = Request::builder().method(Method::GET).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client()
        .request(req.body(body::empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// A session from regrelay's realm, as a client that got `realm="<base>/jwt/auth?<ns>"` asks.
async fn session_token(base: &str, ns: &str, user: &str, secret: &str, scope: &str) -> String {
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"));
    let url = format!("{base}/jwt/auth?{ns}service=container_registry&scope={scope}");
    let (status, _, body) = get(&url, &[("authorization", &format!("Basic {basic}"))]).await;
    assert_eq!(status, StatusCode::OK, "{url}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["token"].as_str().unwrap().to_owned()
}

/// An HTTP/1.1 request sent from `local` (another loopback address), returning the status.
async fn status_from(local: &str, to: SocketAddr, method: &str, path: &str) -> u16 {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(to).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let head = String::from_utf8_lossy(&out);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no answer: {head}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pulls_through_registries_conf_prefix_mirrors() {
    let w = world().await;
    let px = w.relay(&[]);
    let conf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(conf.path(), snippet("mirror/registries.conf", px.addr)).unwrap();
    let conf_path = conf.path().display().to_string();
    for (image, reference) in [
        (&w.alpine, "ghcr.io/library/alpine:3"),
        (&w.busybox, "docker.io/library/busybox:1"),
    ] {
        let pulled = tempfile::tempdir().unwrap();
        let (conf_path, src) = (conf_path.clone(), format!("docker://{reference}"));
        let dest = format!("oci:{}:latest", pulled.path().display());
        let out = tokio::task::spawn_blocking(move || {
            skopeo(&["--registries-conf", &conf_path, "copy", &src, &dest])
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{reference}: {}\n{}",
            text(&out),
            px.output.text()
        );
        assert_same_blobs(image, pulled.path());
    }
    let log = px.output.settled();
    assert!(
        log.contains("path=/v2/ghcr.io/library/alpine/manifests/3"),
        "{log}"
    );
    assert!(
        log.contains("path=/v2/docker.io/library/busybox/manifests/1"),
        "{log}"
    );
    // The prefix registry saw the prefixed name; clients never did.
    let hub_log = w.hub.log.text();
    assert!(
        hub_log.contains("/v2/mirror-group/containers/library/busybox/manifests/1"),
        "{hub_log}"
    );
    // Tokens were minted by the mirrored registries' token service, for their own names.
    assert!(w.hub_gl.seen().iter().any(|s| s
        .query
        .contains("mirror-group%2Fcontainers%2Flibrary%2Fbusybox")));
}

#[tokio::test(flavor = "multi_thread")]
async fn ns_and_root_routing_unknown_namespaces_and_pushes() {
    let w = world().await;
    let px = w.relay(&["--root-upstream", "docker.io"]);
    let base = px.url();
    // containerd's hosts.toml form: ?ns=ghcr.io. Anonymous first: a challenge for regrelay's
    // realm with the upstream in it.
    let (status, h, _) = get(
        &format!("{base}/v2/library/alpine/manifests/3?ns=ghcr.io"),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let challenge = h["www-authenticate"].to_str().unwrap().to_owned();
    assert!(
        challenge.contains(&format!("realm=\"{base}/jwt/auth?ns=ghcr.io\"")),
        "{challenge}"
    );
    let token = session_token(
        &base,
        "ns=ghcr.io&",
        HUB_USER,
        HUB_PAT,
        "repository:library/alpine:pull",
    )
    .await;
    let bearer = format!("Bearer {token}");
    let accept = (
        "accept",
        "application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json",
    );
    let (status, h, _) = get(
        &format!("{base}/v2/library/alpine/manifests/3?ns=ghcr.io"),
        &[("authorization", &bearer), accept],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        h["docker-content-digest"],
        w.alpine.manifest_digest.as_str()
    );
    // The same session on another upstream: refused.
    let (status, _, body) = get(
        &format!("{base}/v2/group/app/manifests/v1?ns={}", w.gitlab_reg.addr),
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("another upstream"), "{body}");
    // dockerd's registry-mirrors form (the daemon.json snippet's mirror URL): the root path goes
    // to the root upstream (docker.io here), with its repository prefix added.
    let daemon: serde_json::Value =
        serde_json::from_str(&snippet("mirror/daemon.json", px.addr)).unwrap();
    let mirror = daemon["registry-mirrors"][0]
        .as_str()
        .unwrap()
        .trim_end_matches('/');
    assert_eq!(mirror, base);
    let (status, _, _) = get(
        &format!("{mirror}/v2/library/busybox/manifests/1"),
        &[accept],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let token = session_token(
        &base,
        "",
        HUB_USER,
        HUB_PAT,
        "repository:library/busybox:pull",
    )
    .await;
    let (status, h, _) = get(
        &format!("{base}/v2/library/busybox/manifests/1"),
        &[("authorization", &format!("Bearer {token}")), accept],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        h["docker-content-digest"],
        w.busybox.manifest_digest.as_str()
    );
    // An ns no upstream serves: 404 NAME_UNKNOWN and no challenge, so containerd moves on to
    // its next host without sending credentials.
    let (status, h, body) = get(&format!("{base}/v2/library/x/manifests/1?ns=quay.io"), &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(h.get("www-authenticate").is_none());
    assert!(body.contains("NAME_UNKNOWN"), "{body}");
    // A push through a mirror form: refused clearly.
    let post = Request::post(format!("{base}/v2/ghcr.io/library/alpine/blobs/uploads/"))
        .body(body::empty())
        .unwrap();
    let resp = client().request(post).await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&b).contains("UNSUPPORTED"));
    // Pushes to the default upstream (by its ns) still work.
    let ns = format!("ns={}&", w.gitlab_reg.addr);
    let token = session_token(&base, &ns, USER, PAT, "repository:group/app:pull,push").await;
    let post = Request::post(format!(
        "{base}/v2/group/app/blobs/uploads/?ns={}",
        w.gitlab_reg.addr
    ))
    .header("authorization", format!("Bearer {token}"))
    .body(body::empty())
    .unwrap();
    assert_eq!(
        client().request(post).await.unwrap().status(),
        StatusCode::ACCEPTED
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn injected_credentials_serve_anonymous_pulls_from_allowed_addresses_only() {
    let w = world().await;
    let creds = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(creds.path(), format!("{DEPLOY_USER}:{DEPLOY_TOKEN}\n")).unwrap();
    let injection = format!("{}={}", w.gitlab_reg.addr, creds.path().display());
    let px = w.relay(&[
        "--upstream-credentials",
        &injection,
        "--inject-credentials-for",
        "127.0.0.1/32",
    ]);
    let path = "/v2/group/app/manifests/v1";
    // A node pulling a private GitLab image with no credentials, from an allowed address.
    let (status, h, _) = get(
        &format!("{}{path}", px.url()),
        &[("accept", "application/vnd.oci.image.manifest.v1+json")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        h["docker-content-digest"],
        w.private.manifest_digest.as_str()
    );
    let blob = &w.private.layers[0].0;
    let (status, _, _) = get(&format!("{}/v2/group/app/blobs/{blob}", px.url()), &[]).await;
    assert_eq!(status, StatusCode::OK);
    // The same request from an address that is not allowed: challenged.
    assert_eq!(status_from("127.0.0.2", px.addr, "GET", path).await, 401);
    // Pushes never use them.
    assert_eq!(
        status_from("127.0.0.1", px.addr, "POST", "/v2/group/app/blobs/uploads/").await,
        401
    );
    // GitLab saw the deploy token (regrelay's identity), and nobody else ever did.
    assert!(w
        .gl
        .seen()
        .iter()
        .any(|s| s.username.as_deref() == Some(DEPLOY_USER) && s.status == 200));
    let mut secrets = w.gl.issued();
    secrets.push(DEPLOY_TOKEN.to_owned());
    assert_no_secrets(&px.output.settled(), DEPLOY_USER, &secrets);
    // The file is re-read when it changes: a wrong token takes effect (GitLab refuses it) and
    // the right one again after it, without a restart.
    for (token, want) in [
        ("gldt-wrong", StatusCode::UNAUTHORIZED),
        (DEPLOY_TOKEN, StatusCode::OK),
    ] {
        std::fs::write(creds.path(), format!("{DEPLOY_USER}:{token}\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (status, _, _) = get(&format!("{}/v2/group/app/tags/list", px.url()), &[]).await;
        assert_eq!(status, want, "after writing {token}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_by_ns_and_override_path_and_falls_back_on_unknown_ns() {
    use support::containerd::{hosts_dir, Containerd};
    let w = world().await;
    let px = w.relay(&[]);
    // A third registry, open, that only containerd's fallback `server` reaches.
    let quay = Registry::start_open();
    let other = OciImage::random(104, &[512 << 10]);
    let (src, dest) = (
        other.reference(),
        format!("docker://{}/org/tool:2", quay.addr),
    );
    let seeded = tokio::task::spawn_blocking(move || {
        skopeo(&["copy", "--dest-tls-verify=false", &src, &dest])
    })
    .await
    .unwrap();
    assert!(seeded.status.success(), "{}", text(&seeded));
    let quay_hosts = format!(
        "server = \"http://{}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        quay.addr, px.addr
    );
    let dir = hosts_dir(&[
        (
            "ghcr.io",
            &snippet("mirror/containerd/ghcr.io/hosts.toml", px.addr),
        ),
        (
            "docker.io",
            &snippet("mirror/containerd/docker.io/hosts.toml", px.addr),
        ),
        ("quay.io", &quay_hosts),
    ]);
    let ctr = tokio::task::spawn_blocking(Containerd::start)
        .await
        .unwrap();
    let hosts = dir.path().to_owned();
    let ctr = tokio::task::spawn_blocking(move || {
        for (reference, user) in [
            ("ghcr.io/library/alpine:3", None),
            (
                "docker.io/library/busybox:1",
                Some(format!("{HUB_USER}:{HUB_PAT}")),
            ),
            ("quay.io/org/tool:2", None),
        ] {
            let out = ctr.pull(reference, &hosts, user.as_deref());
            assert!(
                out.status.success(),
                "{reference}: {}\n{}",
                text(&out),
                ctr.log()
            );
        }
        ctr
    })
    .await
    .unwrap();
    let content = ctr.content();
    for image in [&w.alpine, &w.busybox, &other] {
        for (digest, _) in &image.layers {
            assert!(
                content.contains(digest),
                "{digest} missing from {content:?}"
            );
        }
    }
    let log = px.output.settled();
    // ns form and override_path form both came through regrelay.
    assert!(log.contains("path=/v2/library/alpine/manifests/3"), "{log}");
    assert!(
        log.contains("path=/v2/docker.io/library/busybox/manifests/1"),
        "{log}"
    );
    // The unknown namespace was a 404 with no challenge, and no token was ever asked for it.
    let quay_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("/v2/org/tool/"))
        .collect();
    assert!(
        !quay_lines.is_empty(),
        "containerd asked regrelay first: {log}"
    );
    assert!(
        quay_lines.iter().all(|l| l.contains("status=404")),
        "{quay_lines:?}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("token request") && l.contains("quay")),
        "a credential was asked for an unknown namespace"
    );
    assert!(
        quay.log.text().contains("/v2/org/tool/manifests/2"),
        "the fallback served it"
    );
}
