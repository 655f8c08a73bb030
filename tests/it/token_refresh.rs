//! Pushes that outlive GitLab's token lifetime: the client holds one regrelay session while
//! regrelay sends every upstream request with a GitLab token valid on arrival. Also: sessions
//! survive a restart (same key file) and work across replicas behind a round-robin balancer.
//! Real registry (5 s tokens, 60 s leeway), real skopeo, a throttled TCP link.

use crate::support;

use std::io::Write;
use std::time::{Duration, Instant};

use support::gitlab::{with_developer_pat, GitLab};
use support::relay::Relay;
use support::*;

const USER: &str = "builder";
const PAT: &str = "glpat-Rk3nWq8ZtVc5LmXp2HsD";

async fn token_service(lifetime: u64) -> GitLab {
    with_developer_pat(USER, PAT, "ci/app", Duration::from_secs(lifetime)).await
}

/// A session key file holding one random key.
fn key_file() -> tempfile::NamedTempFile {
    use base64::Engine;
    let mut key = [0u8; 32];
    Noise::new(std::process::id() as u64 ^ 0x5eed).fill(&mut key);
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        f,
        "{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
    .unwrap();
    f
}

/// skopeo pushes `image` to `host`, returning its output and how long it took.
async fn push(image: &OciImage, host: String) -> (std::process::Output, Duration) {
    let (src, creds) = (image.reference(), format!("{USER}:{PAT}"));
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let out = skopeo_copy(
            &src,
            &format!("docker://{host}/ci/app:v1"),
            &creds,
            &Transport::Http,
        );
        (out, start.elapsed())
    })
    .await
    .unwrap()
}

fn client_token_requests(output: &str) -> usize {
    output
        .lines()
        .filter(|l| l.contains("token request"))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_that_outlives_its_tokens_completes_on_one_session() {
    let gl = token_service(5).await;
    let reg = Registry::start(&gl.realm());
    let px = Regrelay::start(&["--registry", &reg.url()]);
    // ~20 MiB at 256 KiB/s: about 80 s, past the 5 s lifetime plus the registry's 60 s leeway.
    let link = Relay::start(vec![px.addr], Some(256 << 10)).await;
    let image = OciImage::random(21, &[7 << 20, 7 << 20, 6 << 20]);
    let (out, took) = push(&image, link.addr.to_string()).await;
    assert!(
        out.status.success(),
        "push failed after {took:?}: {}",
        text(&out)
    );
    assert!(
        took > Duration::from_secs(66),
        "the push must outlive token + leeway: {took:?}"
    );
    let log = px.output.text();
    let asked = client_token_requests(&log);
    assert!(asked >= 1, "{log}");
    assert!(
        gl.mints() > asked,
        "regrelay re-minted on the client's behalf: {} mints for {asked} client token requests",
        gl.mints()
    );
    // Pull it back through regrelay: same blobs.
    let pulled = tempfile::tempdir().unwrap();
    let (dest, creds, host) = (
        format!("oci:{}:latest", pulled.path().display()),
        format!("{USER}:{PAT}"),
        px.addr.to_string(),
    );
    let pull = tokio::task::spawn_blocking(move || {
        skopeo_copy(
            &format!("docker://{host}/ci/app:v1"),
            &dest,
            &creds,
            &Transport::Http,
        )
    })
    .await
    .unwrap();
    assert!(pull.status.success(), "{}", text(&pull));
    assert_same_blobs(&image, pulled.path());
    let mut secrets = gl.issued();
    secrets.push(PAT.to_owned());
    assert_no_secrets(&log, USER, &secrets);
    eprintln!(
        "push took {took:?}; {} mints for {asked} client token requests",
        gl.mints()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_with_the_same_key_file_in_the_middle_of_a_push_loses_nothing() {
    let gl = token_service(5).await;
    let reg = Registry::start(&gl.realm());
    let keys = key_file();
    let keys_path = keys.path().display().to_string();
    let args = [
        "--registry",
        &reg.url(),
        "--session-key-file",
        &keys_path,
        "--shutdown-grace-secs",
        "120",
    ];
    let mut first = Regrelay::process(&args);
    // ~12 MiB at 1 MiB/s: the restart lands while layers are uploading.
    let link = Relay::start(vec![first.addr], Some(1 << 20)).await;
    let image = OciImage::random(22, &[4 << 20, 4 << 20, 4 << 20]);
    let pushing = tokio::spawn({
        let host = link.addr.to_string();
        async move { push(&image, host).await }
    });
    // Uploads have started (POST answered 202; the PATCHes are logged when they end).
    assert!(
        first
            .output
            .wait_for("method=POST", Duration::from_secs(30))
            .is_some(),
        "the push did not start: {}",
        first.output.text()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = Regrelay::process(&args);
    link.set_backends(vec![second.addr]);
    first.terminate();
    let (out, took) = pushing.await.unwrap();
    assert!(
        out.status.success(),
        "push across the restart failed after {took:?}: {}",
        text(&out)
    );
    assert!(
        first.wait_exit(Duration::from_secs(30)).is_some(),
        "old process did not exit"
    );
    let after = second.output.text();
    assert!(
        after
            .lines()
            .any(|l| l.contains("path=/v2/ci/app/manifests/v1") && l.contains("status=201")),
        "the manifest went through the new process:\n{after}"
    );
    assert!(
        !after.contains("session token"),
        "a session was refused:\n{after}"
    );
    let mut secrets = gl.issued();
    secrets.push(PAT.to_owned());
    assert_no_secrets(&first.output.text(), USER, &secrets);
    assert_no_secrets(&after, USER, &secrets);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_behind_a_round_robin_balancer_serve_one_push() {
    let gl = token_service(300).await;
    let reg = Registry::start(&gl.realm());
    let keys = key_file();
    let keys_path = keys.path().display().to_string();
    let args = ["--registry", &reg.url(), "--session-key-file", &keys_path];
    let (a, b) = (Regrelay::start(&args), Regrelay::start(&args));
    let lb = Relay::start(vec![a.addr, b.addr], None).await;
    let image = OciImage::random(23, &[1 << 20, 1 << 20, 1 << 20, 1 << 20]);
    let (out, _) = push(&image, lb.addr.to_string()).await;
    assert!(
        out.status.success(),
        "push via two replicas failed: {}",
        text(&out)
    );
    let (la, lb_) = (a.output.text(), b.output.text());
    let served = |l: &str| l.lines().filter(|l| l.contains("regrelay::access")).count();
    assert!(
        served(&la) > 0 && served(&lb_) > 0,
        "both replicas served:\nA:\n{la}\nB:\n{lb_}"
    );
    assert!(
        !la.contains("session token") && !lb_.contains("session token"),
        "a session was refused"
    );
}
