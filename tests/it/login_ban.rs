//! regrelay never gets itself banned by GitLab (issue 21), against the stand-in's failed-login IP
//! ban as GitLab's source has it (lib/gitlab/auth/ip_rate_limiter.rb: 10 failures in 60 s ban an
//! address for an hour; config/initializers/trusted_proxies.rb: `X-Forwarded-For` counts only
//! from `trusted_proxies`, and regrelay is not among them here, so GitLab sees regrelay's own
//! address for every client behind it):
//!
//! - 50 logins with one revoked token from one host and 20 different wrong passwords from
//!   another, within seconds: GitLab sees a handful of failures and bans nothing, while a user who
//!   logged in before pushes and pulls through regrelay without an error;
//! - when GitLab does ban regrelay's address (a lower threshold than regrelay's budget), the ban
//!   is recognised: the client is told it and the fix, an ERROR is logged and counted, and GitLab
//!   is not asked again for a minute.

use crate::support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::attack::{self, host};
use support::gitlab::{gitlab, Credential, GitLab, Role, TokenScope};
use support::*;

const USER: &str = "judy";
const PAT: &str = "glpat-Jud7L0g1nB4nT0k3nX";
const DEPLOY_USER: &str = "gitlab+deploy-token-31";
const REVOKED: &str = "gldt-R3v0k3dD3pl0yT0k3n";
const REPO: &str = "team/app";

async fn gitlab_banning(maxretry: u32) -> GitLab {
    gitlab()
        .credential(Credential::Pat {
            user: USER.into(),
            token: PAT.into(),
            scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
        })
        .credential(Credential::Deploy {
            username: DEPLOY_USER.into(),
            token: REVOKED.into(),
            scopes: vec![TokenScope::ReadRegistry],
            project: REPO.into(),
        })
        .project(REPO, false, &[(USER, Role::Developer)])
        .ip_ban(maxretry, Duration::from_secs(60), Duration::from_secs(3600))
        // Neither loopback exception: regrelay's address is banned like any other.
        .ip_whitelist(&[])
        .trusted_proxies(&[])
        .lifetime(Duration::from_secs(300))
        .start()
        .await
}

fn basic(user: &str, secret: &str) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"));
    format!("Basic {b}")
}

/// A token request from `from` with `user:secret`: its status and body.
async fn login(px: &Regrelay, from: u8, user: &str, secret: &str) -> (StatusCode, String) {
    let auth = basic(user, secret);
    let path = format!("/jwt/auth?service=container_registry&scope=repository:{REPO}:pull");
    attack::request_from(
        host(from),
        px.addr,
        "GET",
        &path,
        &[("authorization", &auth)],
        b"",
    )
    .await
    .expect("an answer")
}

async fn push_and_pull(px: &Regrelay, seed: u64, tag: &str) -> Result<(), String> {
    let image = OciImage::random(seed, &[256 << 10, 64 << 10]);
    let creds = format!("{USER}:{PAT}");
    let (src, dest) = (
        image.reference(),
        format!("docker://{}/{REPO}:{tag}", px.addr),
    );
    let (d, c) = (dest.clone(), creds.clone());
    let pushed = tokio::task::spawn_blocking(move || skopeo_copy(&src, &d, &c, &Transport::Http))
        .await
        .unwrap();
    if !pushed.status.success() {
        return Err(format!("push: {}", text(&pushed)));
    }
    let dir = tempfile::tempdir().unwrap();
    let back = format!("oci:{}:{tag}", dir.path().display());
    let pulled =
        tokio::task::spawn_blocking(move || skopeo_copy(&dest, &back, &creds, &Transport::Http))
            .await
            .unwrap();
    if !pulled.status.success() {
        return Err(format!("pull: {}", text(&pulled)));
    }
    assert_same_blobs(&image, dir.path());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_token_and_a_password_guesser_do_not_get_regrelay_banned() {
    let gl = gitlab_banning(10).await;
    gl.revoke(REVOKED);
    let reg = Registry::start(&gl.realm());
    let px = Regrelay::start(&["--registry", &reg.url(), "--metrics-listen", "127.0.0.1:0"]);
    let maddr = support::metrics::addr(&px);
    // The user logs in and pushes before anything goes wrong.
    push_and_pull(&px, 3101, "before").await.unwrap();
    // Then, within seconds: a CI fleet with a revoked deploy token (host 2), and someone trying
    // 20 passwords (host 3), while the user pushes and pulls again.
    let start = Instant::now();
    let fleet = async {
        let mut statuses = vec![];
        for _ in 0..50 {
            statuses.push(login(&px, 2, DEPLOY_USER, REVOKED).await.0);
        }
        statuses
    };
    let guesser = async {
        let mut statuses = vec![];
        for i in 0..20 {
            statuses.push(login(&px, 3, USER, &format!("guess-{i}")).await.0);
        }
        statuses
    };
    let (fleet, guesser, user) = tokio::join!(fleet, guesser, push_and_pull(&px, 3102, "during"));
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    user.expect("the user's push and pull during the attempts");
    assert!(
        fleet.iter().all(|s| *s == StatusCode::UNAUTHORIZED),
        "{fleet:?}"
    );
    assert!(
        guesser
            .iter()
            .all(|s| matches!(*s, StatusCode::UNAUTHORIZED | StatusCode::TOO_MANY_REQUESTS)),
        "{guesser:?}"
    );
    assert!(
        guesser.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{guesser:?}"
    );
    let failures = gl.ip_failures("127.0.0.1");
    assert!(
        failures < 10,
        "GitLab counted {failures} failed logins from regrelay"
    );
    assert!(gl.banned_ips().is_empty(), "banned: {:?}", gl.banned_ips());
    // Afterwards too.
    push_and_pull(&px, 3103, "after").await.unwrap();
    assert_eq!(login(&px, 4, USER, PAT).await.0, StatusCode::OK);
    let (_, _, metrics) = support::metrics::scrape(maddr).await;
    let local = |outcome: &str| {
        let label = format!("outcome=\"{outcome}\"");
        support::metrics::value(
            &metrics,
            "regrelay_logins_answered_locally_total",
            &[&label],
        )
    };
    assert!(local("replayed") >= 49.0, "{metrics}");
    assert!(local("throttled") >= 1.0, "{metrics}");
    assert_no_secrets(
        &px.output.settled(),
        DEPLOY_USER,
        &[REVOKED.to_owned(), PAT.to_owned()],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gitlabs_ban_is_recognised_explained_and_not_hammered() {
    // GitLab bans after 3 failures; regrelay's budgets allow more (a misconfiguration this test
    // makes on purpose).
    let gl = gitlab_banning(3).await;
    let reg = Registry::start(&gl.realm());
    let px = Regrelay::start(&[
        "--registry",
        &reg.url(),
        "--failed-logins-per-minute",
        "100",
        "--client-failed-logins-per-minute",
        "100",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let maddr = support::metrics::addr(&px);
    for i in 0..3 {
        assert_eq!(
            login(&px, 2, USER, &format!("wrong-{i}")).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(gl.banned_ips(), vec!["127.0.0.1".to_owned()]);
    // Now even the right password is refused by GitLab: the client is told why and what to do.
    let (status, body) = login(&px, 4, USER, PAT).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["errors"][0]["code"], "DENIED", "{body}");
    let message = v["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("too many failed authentication attempts")
            && message.contains("gitlab_rails['trusted_proxies']"),
        "{message}"
    );
    let line = px
        .output
        .wait_for("GitLab refuses regrelay's address", Duration::from_secs(5))
        .expect("an ERROR line");
    assert!(line.contains("ERROR"), "{line}");
    // For a minute GitLab is not asked again: the ban is answered as given.
    let asked = gl.attempts();
    for _ in 0..5 {
        let (status, body) = login(&px, 4, USER, PAT).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    }
    assert_eq!(gl.attempts(), asked, "GitLab asked during the ban");
    let (_, _, metrics) = support::metrics::scrape(maddr).await;
    let bans = support::metrics::value(&metrics, "regrelay_token_service_bans_total", &[]);
    assert!(bans >= 1.0, "{metrics}");
}
