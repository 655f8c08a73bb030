//! Real clients push and pull through regrelay to the real registry with GitLab-style tokens,
//! over plain HTTP and over HTTPS (h2 via ALPN); pulled content is byte-identical.

use crate::support;

use std::time::Duration;

use support::gitlab::with_developer_pat;
use support::*;

const USER: &str = "alice";
const PAT: &str = "glpat-Zq8sVbN3xWcT2mRk4JpL";

async fn stack(extra: &[&str]) -> (support::gitlab::GitLab, Registry, Regrelay) {
    let gl = with_developer_pat(USER, PAT, "group/project", Duration::from_secs(300)).await;
    let reg = Registry::start(&gl.realm());
    let mut args = vec!["--registry".to_owned(), reg.url()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let px = Regrelay::start(&args);
    (gl, reg, px)
}

fn push_pull(host: &str, transport: &Transport) {
    let image = OciImage::random(7, &[2 << 20, 6 << 20]);
    let creds = format!("{USER}:{PAT}");
    let dest = format!("docker://{host}/group/project/app:v1");
    let push = skopeo_copy(&image.reference(), &dest, &creds, transport);
    assert!(push.status.success(), "push failed: {}", text(&push));
    let pulled = tempfile::tempdir().unwrap();
    let pulled_ref = format!("oci:{}:latest", pulled.path().display());
    let pull = skopeo_copy(&dest, &pulled_ref, &creds, transport);
    assert!(pull.status.success(), "pull failed: {}", text(&pull));
    assert_same_blobs(&image, pulled.path());
    let mut inspect = vec![
        "inspect".to_owned(),
        "--raw".into(),
        "--creds".into(),
        creds.clone(),
    ];
    inspect.extend(transport.flags(""));
    inspect.push(dest.clone());
    let inspect = skopeo(&inspect.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(inspect.status.success(), "{}", text(&inspect));
    assert_eq!(
        digest(&inspect.stdout),
        image.manifest_digest,
        "manifest changed on the way"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pushes_and_pulls_through_regrelay_over_http() {
    let (gl, _reg, px) = stack(&[]).await;
    let host = px.addr.to_string();
    tokio::task::spawn_blocking(move || push_pull(&host, &Transport::Http))
        .await
        .unwrap();
    let access = px.output.text();
    assert!(
        access.contains("method=PATCH") || access.contains("method=PUT"),
        "{access}"
    );
    assert!(
        access.contains("path=/v2/group/project/app/manifests/v1"),
        "{access}"
    );
    assert!(gl.mints() > 0);
    let mut secrets = gl.issued();
    secrets.push(PAT.to_owned());
    assert_no_secrets(&access, USER, &secrets);
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pushes_and_pulls_through_regrelay_over_https() {
    let (gl, _reg, px) = stack(&[
        "--tls-cert",
        &cert("server.pem"),
        "--tls-key",
        &cert("server.key"),
    ])
    .await;
    let certs = ca_cert_dir();
    let transport = Transport::Https(certs.path().to_owned());
    let host = format!("localhost:{}", px.addr.port());
    tokio::task::spawn_blocking(move || push_pull(&host, &transport))
        .await
        .unwrap();
    let out = px.output.text();
    assert!(out.contains("tls=true"), "{out}");
    let mut secrets = gl.issued();
    secrets.push(PAT.to_owned());
    assert_no_secrets(&out, USER, &secrets);
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_logs_in_pushes_and_pulls_through_regrelay() {
    if !docker_available() {
        support::skip(
            "docker_logs_in_pushes_and_pulls_through_regrelay",
            "no Docker daemon (`docker info` failed)",
        );
        return;
    }
    let (gl, _reg, px) = stack(&[]).await;
    let host = px.addr.to_string();
    tokio::task::spawn_blocking(move || {
        let cfg = tempfile::tempdir().unwrap();
        let c = cfg.path();
        let image = format!("{host}/group/project/docker-app:v1");
        docker_import_random(c, &image, 3 << 20, 42);
        let id = docker(
            c,
            &["image", "inspect", "--format", "{{.Id}}", &image],
            None,
        );
        let login = docker(
            c,
            &["login", &host, "-u", USER, "--password-stdin"],
            Some(PAT),
        );
        assert!(
            login.status.success(),
            "docker login failed: {}",
            text(&login)
        );
        let push = docker(c, &["push", &image], None);
        assert!(push.status.success(), "docker push failed: {}", text(&push));
        let rmi = docker(c, &["rmi", &image], None);
        assert!(rmi.status.success(), "{}", text(&rmi));
        let pull = docker(c, &["pull", &image], None);
        assert!(pull.status.success(), "docker pull failed: {}", text(&pull));
        let id2 = docker(
            c,
            &["image", "inspect", "--format", "{{.Id}}", &image],
            None,
        );
        assert_eq!(text(&id), text(&id2), "pulled image differs");
        let _ = docker(c, &["rmi", &image], None);
    })
    .await
    .unwrap();
    let out = px.output.text();
    assert!(
        out.lines()
            .any(|l| l
                .contains("method=PUT path=/v2/group/project/docker-app/manifests/v1 status=201")),
        "the push did not go through regrelay:\n{out}"
    );
    assert!(
        out.contains("method=HEAD path=/v2/group/project/docker-app/manifests/v1 status=200"),
        "{out}"
    );
    assert!(
        out.contains("method=GET path=/v2/group/project/docker-app/blobs/sha256:"),
        "{out}"
    );
    let mut secrets = gl.issued();
    secrets.push(PAT.to_owned());
    assert_no_secrets(&out, USER, &secrets);
}
