//! Uploads that outlive their token through a hop that buffers request bodies (GitLab's
//! "unauthorized: authentication required when pushing large images"). A real nginx buffers
//! (its default `proxy_request_buffering on`; and the HTTP/1.0-upstream variant), tokens live
//! 5 s, and a layer takes longer than 5 s + the registry's 60 s leeway over a throttled link.
//! Straight through nginx the push fails; with regrelay before nginx every upstream part carries
//! a fresh token and the push succeeds with the client's digest.

use crate::support;

use std::time::{Duration, Instant};

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use regrelay::body;
use support::gitlab::{with_developer_pat, GitLab};
use support::nginx::{free_addr, Nginx};
use support::relay::Relay;
use support::upstream::{client, Generated};
use support::*;

const USER: &str = "pusher";
const PAT: &str = "glpat-Bf6yNc2QsWk8ZrTm5XvJ";
/// 20 MiB at 288 KiB/s: about 71 s, past 5 s + 60 s.
const LAYER: usize = 20 << 20;
const RATE: u64 = 288 << 10;

struct Stack {
    gl: GitLab,
    reg: Registry,
    front: Nginx,
}

/// The registry behind nginx; `http10` makes nginx speak HTTP/1.0 upstream (which buffers
/// chunked bodies even with request buffering off).
async fn buffering_front(http10: bool) -> Stack {
    let gl = with_developer_pat(USER, PAT, "big/app", Duration::from_secs(5)).await;
    let reg = Registry::start(&gl.realm());
    let mode = if http10 {
        "proxy_http_version 1.0; proxy_request_buffering off;"
    } else {
        "proxy_http_version 1.1; # proxy_request_buffering on (nginx's default)"
    };
    let front = Nginx::start(
        free_addr(),
        &format!(
            "    client_max_body_size 0;\n    location / {{\n      proxy_pass http://{};\n\
             proxy_set_header Host $http_host;\n      {mode}\n    }}",
            reg.addr
        ),
    );
    Stack { gl, reg, front }
}

fn patches(front: &Nginx) -> usize {
    front
        .access_log()
        .lines()
        .filter(|l| l.contains("\"PATCH /v2/"))
        .count()
}

async fn skopeo_push(image: &OciImage, host: String) -> (std::process::Output, Duration) {
    let (src, creds) = (image.reference(), format!("{USER}:{PAT}"));
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let dest = format!("docker://{host}/big/app:v1");
        (
            skopeo_copy(&src, &dest, &creds, &Transport::Http),
            start.elapsed(),
        )
    })
    .await
    .unwrap()
}

async fn push_through_regrelay(http10: bool) {
    let s = buffering_front(http10).await;
    let px = Regrelay::start(&["--registry", &format!("http://{}", s.front.addr)]);
    let link = Relay::start(vec![px.addr], Some(RATE)).await;
    let image = OciImage::random(41, &[LAYER]);
    let (out, took) = skopeo_push(&image, link.addr.to_string()).await;
    assert!(
        out.status.success(),
        "push failed after {took:?}: {}\n{}",
        text(&out),
        px.output.text()
    );
    assert!(took > Duration::from_secs(66), "{took:?}");
    let parts = patches(&s.front);
    assert!(parts > 1, "the layer went in {parts} PATCH(es)");
    let pulled = tempfile::tempdir().unwrap();
    let (src, dest, creds) = (
        format!("docker://{}/big/app:v1", px.addr),
        format!("oci:{}:latest", pulled.path().display()),
        format!("{USER}:{PAT}"),
    );
    let pull =
        tokio::task::spawn_blocking(move || skopeo_copy(&src, &dest, &creds, &Transport::Http))
            .await
            .unwrap();
    assert!(pull.status.success(), "{}", text(&pull));
    assert_same_blobs(&image, pulled.path());
    let mut secrets = s.gl.issued();
    secrets.push(PAT.into());
    assert_no_secrets(&px.output.text(), USER, &secrets);
    eprintln!(
        "http10={http10}: {:.1} MB layer pushed in {took:?} as {parts} PATCH requests at the registry",
        LAYER as f64 / 1e6
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn control_a_direct_push_through_a_buffering_front_fails() {
    let s = buffering_front(false).await;
    let link = Relay::start(vec![s.front.addr], Some(RATE)).await;
    let image = OciImage::random(40, &[LAYER]);
    let (out, took) = skopeo_push(&image, link.addr.to_string()).await;
    assert!(
        !out.status.success(),
        "expected the direct push to fail ({took:?})"
    );
    // The registry refuses the buffered PATCH's expired token as soon as its headers arrive; the
    // client sees a 401, or nginx's 502 when the registry closes while nginx still sends the body.
    let (t, reg_log) = (text(&out), s.reg.log.text());
    assert!(
        t.contains("401") || t.contains("unauthorized") || t.contains("502"),
        "{t}"
    );
    assert!(
        reg_log.contains("not to be used after") || reg_log.contains("invalid token"),
        "the registry did not refuse an expired token:\n{reg_log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pushes_through_regrelay_before_a_buffering_front() {
    push_through_regrelay(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pushes_through_regrelay_before_an_http10_front() {
    push_through_regrelay(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_containerd_style_single_put_becomes_parts_with_the_clients_digest() {
    let s = buffering_front(false).await;
    let px = Regrelay::start(&["--registry", &format!("http://{}", s.front.addr)]);
    let link = Relay::start(vec![px.addr], Some(RATE)).await;
    let base = format!("http://{}", link.addr);
    let session = fetch_token(
        &format!("{base}/jwt/auth"),
        USER,
        PAT,
        "repository:big/app:pull,push",
    )
    .await;
    let bearer = format!("Bearer {session}");
    let send = |m: Method, url: String, b: regrelay::body::ProxyBody| {
        let req = Request::builder()
            .method(m)
            .uri(url)
            .header("authorization", &bearer)
            .body(b)
            .unwrap();
        client().request(req)
    };
    let resp = send(
        Method::POST,
        format!("{base}/v2/big/app/blobs/uploads/"),
        body::empty(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let loc = resp.headers()["location"].to_str().unwrap().to_owned();
    let len = LAYER as u64;
    let digest = {
        use sha2::{Digest, Sha256};
        let mut g = Generated::new(len);
        let mut h = Sha256::new();
        while let Some(f) = g.frame().await {
            h.update(f.unwrap().into_data().unwrap());
        }
        format!("sha256:{}", hex::encode(h.finalize()))
    };
    let start = Instant::now();
    let put = Request::builder()
        .method(Method::PUT)
        .uri(format!("{loc}&digest={digest}"))
        .header("authorization", &bearer)
        .header("content-length", len.to_string())
        .header("content-type", "application/octet-stream")
        .body(Generated::new(len).boxed_unsync())
        .unwrap();
    let resp = client().request(put).await.unwrap();
    let took = start.elapsed();
    assert_eq!(
        resp.status(),
        StatusCode::CREATED,
        "after {took:?}: {}",
        px.output.text()
    );
    assert_eq!(resp.headers()["docker-content-digest"], digest.as_str());
    assert!(resp.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with(&base));
    assert!(took > Duration::from_secs(66), "{took:?}");
    assert!(patches(&s.front) > 1, "{}", s.front.access_log());
    let head = send(
        Method::HEAD,
        format!("{base}/v2/big/app/blobs/{digest}"),
        body::empty(),
    )
    .await
    .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["content-length"], len.to_string().as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_chunk_max_bounds_every_part_and_short_uploads_stay_whole() {
    let s = buffering_front(false).await;
    let px = Regrelay::start(&[
        "--registry",
        &format!("http://{}", s.front.addr),
        "--upload-chunk-max",
        "1048576",
    ]);
    let image = OciImage::random(42, &[5 << 20]);
    let (out, _) = skopeo_push(&image, px.addr.to_string()).await;
    assert!(out.status.success(), "{}", text(&out));
    let parts = patches(&s.front);
    assert!(
        parts >= 6,
        "5 MiB with a 1 MiB bound (plus the config blob) went in {parts} PATCHes"
    );
    // Without a bound, a short upload is one PATCH.
    let px = Regrelay::start(&["--registry", &format!("http://{}", s.front.addr)]);
    let before = patches(&s.front);
    let image = OciImage::random(43, &[2 << 20]);
    let (out, _) = skopeo_push(&image, px.addr.to_string()).await;
    assert!(out.status.success(), "{}", text(&out));
    // Two blobs (the layer and the image config): one PATCH each.
    assert_eq!(
        patches(&s.front) - before,
        2,
        "a short upload is forwarded as one request"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_pushes_through_regrelay_before_a_buffering_front() {
    if !docker_available() {
        support::skip(
            "docker_pushes_through_regrelay_before_a_buffering_front",
            "no Docker daemon (`docker info` failed)",
        );
        return;
    }
    let s = buffering_front(false).await;
    let px = Regrelay::start(&["--registry", &format!("http://{}", s.front.addr)]);
    let link = Relay::start(vec![px.addr], Some(RATE)).await;
    let host = link.addr.to_string();
    let took = tokio::task::spawn_blocking(move || {
        let cfg = tempfile::tempdir().unwrap();
        let c = cfg.path();
        let image = format!("{host}/big/app:docker");
        docker_import_random(c, &image, LAYER, 44);
        let login = docker(
            c,
            &["login", &host, "-u", USER, "--password-stdin"],
            Some(PAT),
        );
        assert!(login.status.success(), "{}", text(&login));
        let start = Instant::now();
        let push = docker(c, &["push", &image], None);
        let took = start.elapsed();
        let _ = docker(c, &["rmi", &image], None);
        assert!(
            push.status.success(),
            "docker push failed after {took:?}: {}",
            text(&push)
        );
        took
    })
    .await
    .unwrap();
    assert!(took > Duration::from_secs(66), "{took:?}");
    assert!(patches(&s.front) > 1);
}
