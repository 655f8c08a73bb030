//! What one client can make regrelay keep, and ask of GitLab, is bounded (issue 20, findings 2,
//! 5 and 6), against the real registry and the GitLab stand-in:
//!
//! - a token request carries at most 32 scopes of 512 bytes (400 beyond, saying so), and scope
//!   types GitLab ignores never reach it in a session's later mints;
//! - sessions of the worst shape allowed, in their thousands, keep the session caches within
//!   `--session-cache-max-bytes` and regrelay's memory with them;
//! - a scope GitLab refused a session (or that the session never asked for) is answered without
//!   a mint and without a registry request, however often it is asked, and the session's token
//!   for what it may do stays in use;
//! - an OAuth2 token form too large is the client's 413, logged as the client's fault.

use crate::support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::attack::{self, host};
use support::gitlab::{gitlab, Credential, GitLab, Role, TokenScope};
use support::*;

const USER: &str = "mallory";
const PAT: &str = "glpat-M4ll0ryS3ss10nB0und";

/// The stand-in (tokens living `lifetime`) with `projects` (path, public) where USER is a
/// Reporter, plus `team/secret` she has no part in; and the registry.
async fn world(projects: &[(String, bool)], lifetime: Duration) -> (GitLab, Registry) {
    let mut gl = gitlab().credential(Credential::Pat {
        user: USER.into(),
        token: PAT.into(),
        scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
    });
    for (path, public) in projects {
        gl = gl.project(path, *public, &[(USER, Role::Reporter)]);
    }
    let gl = gl
        .project("team/secret", false, &[("someone-else", Role::Developer)])
        .lifetime(lifetime)
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    (gl, reg)
}

fn basic() -> String {
    use base64::Engine;
    let creds = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PAT}"));
    format!("Basic {creds}")
}

/// `GET /jwt/auth?service=container_registry&scope=…` with `authorization`, from 127.0.0.1.
async fn token_request(
    px: &Regrelay,
    scopes: &[String],
    authorization: Option<&str>,
) -> (StatusCode, String) {
    let mut q = "service=container_registry".to_owned();
    for s in scopes {
        q.push_str("&scope=");
        q.push_str(s);
    }
    let headers: Vec<(&str, &str)> = authorization
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    attack::request_from(
        host(1),
        px.addr,
        "GET",
        &format!("/jwt/auth?{q}"),
        &headers,
        b"",
    )
    .await
    .expect("an answer")
}

/// A session of regrelay's for `scopes`.
async fn session(px: &Regrelay, scopes: &[String], authorization: Option<&str>) -> String {
    let (status, body) = token_request(px, scopes, authorization).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    format!("Bearer {}", v["token"].as_str().expect("a token"))
}

/// `GET path` with `bearer`, from 127.0.0.1.
async fn get(px: &Regrelay, path: &str, bearer: &str) -> (StatusCode, String) {
    let headers = [("authorization", bearer)];
    attack::request_from(host(1), px.addr, "GET", path, &headers, b"")
        .await
        .expect("an answer")
}

#[tokio::test(flavor = "multi_thread")]
async fn scopes_are_bounded_and_ignored_types_never_reach_gitlab() {
    let projects = [("team/a".to_owned(), false)];
    let (gl, reg) = world(&projects, Duration::from_secs(2)).await;
    let px = Regrelay::start(&["--registry", &reg.url()]);
    let before = gl.attempts();
    let many: Vec<String> = (0..1000)
        .map(|i| format!("repository:team/r{i}:pull"))
        .collect();
    let (status, body) = token_request(&px, &many, Some(&basic())).await;
    let start: String = body.chars().take(300).collect();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{start}");
    assert!(
        body.contains("1000 scopes") && body.contains("at most 32"),
        "{body}"
    );
    let long = vec![format!("repository:team/{}:pull", "a".repeat(600))];
    let (status, body) = token_request(&px, &long, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("at most 512"), "{body}");
    assert_eq!(
        gl.attempts(),
        before,
        "refused token requests reached GitLab"
    );
    // Types GitLab does not read: the client's own request goes as sent, but the session keeps
    // none of them, so its later mints do not carry them.
    let mut scopes = vec!["repository:team/a:pull".to_owned()];
    scopes.extend((0..20).map(|i| format!("junk{i}:x:y")));
    let bearer = session(&px, &scopes, Some(&basic())).await;
    assert!(gl.seen().last().unwrap().query.contains("junk0"));
    // The 2 s token is re-minted for the session's next request once less than 1 s is left.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mints = gl.mints();
    let (status, body) = get(&px, "/v2/team/a/tags/list", &bearer).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(
        gl.mints(),
        mints + 1,
        "the session's token was minted again"
    );
    let remint = gl.seen().last().unwrap().query.clone();
    assert!(
        remint.contains("team%2Fa") || remint.contains("team/a"),
        "{remint}"
    );
    assert!(!remint.contains("junk"), "{remint}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_scope_costs_no_mint_and_no_registry_request() {
    let projects = [("team/a".to_owned(), false)];
    let (gl, reg) = world(&projects, Duration::from_secs(300)).await;
    let px = Regrelay::start(&["--registry", &reg.url()]);
    let a = "repository:team/a:pull".to_owned();
    let secret = "repository:team/secret:pull".to_owned();
    let to_secret = |reg: &Registry| {
        reg.requests()
            .iter()
            .filter(|r| r.contains("/v2/team/secret/"))
            .count()
    };
    // A session for team/a only, asked for team/secret 200 times.
    let only_a = session(&px, std::slice::from_ref(&a), Some(&basic())).await;
    let mints = gl.mints();
    for _ in 0..200 {
        let (status, body) = get(&px, "/v2/team/secret/manifests/latest", &only_a).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(
            body.contains("not issued for pull on team/secret"),
            "{body}"
        );
    }
    assert_eq!(
        gl.mints(),
        mints,
        "mints for a scope the session never asked for"
    );
    assert_eq!(to_secret(&reg), 0, "{:?}", reg.requests());
    // A session that asked for both; GitLab leaves team/secret out of its token. Hammered for
    // 3 s: GitLab is asked again only after each backoff (1 s, then 2 s).
    let both = session(&px, &[a.clone(), secret.clone()], Some(&basic())).await;
    let mints = gl.mints();
    let start = Instant::now();
    let mut asked = 0;
    while start.elapsed() < Duration::from_secs(3) {
        let (status, body) = get(&px, "/v2/team/secret/manifests/latest", &both).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(
            body.contains("granted this session no pull on team/secret"),
            "{body}"
        );
        asked += 1;
    }
    let reminted = gl.mints() - mints;
    assert!(asked > 50, "{asked} requests in 3 s");
    assert!(
        reminted <= 2,
        "{reminted} mints for {asked} refused requests"
    );
    assert_eq!(to_secret(&reg), 0, "{:?}", reg.requests());
    // Its token for team/a was never thrown away for it.
    let mints = gl.mints();
    let (status, body) = get(&px, "/v2/team/a/tags/list", &both).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(gl.mints(), mints, "the session's token was minted again");
    assert!(px
        .output
        .wait_for("refused the session this scope", Duration::from_secs(5))
        .is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn worst_shape_sessions_stay_within_the_cache_bound() {
    // 32 public projects with names near the longest the registry takes (255 bytes): each
    // anonymous session asks for all 32 and GitLab grants all 32 (echoed in its token).
    let projects: Vec<(String, bool)> = (0..32)
        .map(|i| (format!("big/{i:02}-{}", "n".repeat(240)), true))
        .collect();
    let scopes: Vec<String> = projects
        .iter()
        .map(|(p, _)| format!("repository:{p}:pull"))
        .collect();
    let (_gl, reg) = world(&projects, Duration::from_secs(300)).await;
    let bound: u64 = 4 << 20;
    let px = Regrelay::process(&[
        "--registry",
        &reg.url(),
        "--session-cache-max-bytes",
        &bound.to_string(),
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let maddr = support::metrics::addr(&px);
    let tags = format!("/v2/{}/tags/list", projects[0].0);
    let fill = |n: usize| {
        let (px_addr, scopes, tags) = (px.addr, scopes.clone(), tags.clone());
        async move {
            let mut q = "service=container_registry".to_owned();
            for s in &scopes {
                q.push_str("&scope=");
                q.push_str(s);
            }
            let path = format!("/jwt/auth?{q}");
            for _ in 0..n {
                let (status, body) = attack::request_from(host(1), px_addr, "GET", &path, &[], b"")
                    .await
                    .expect("an answer");
                assert_eq!(status, StatusCode::OK, "{body}");
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                let bearer = format!("Bearer {}", v["token"].as_str().unwrap());
                let headers = [("authorization", bearer.as_str())];
                let (status, body) =
                    attack::request_from(host(1), px_addr, "GET", &tags, &headers, b"")
                        .await
                        .expect("an answer");
                assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
            }
        }
    };
    fill(20).await;
    let before = px.peak_rss_kib();
    // 4 x 500 sessions, each holding ~30 KiB in the caches: ~60 MiB unbounded.
    let tasks: Vec<_> = (0..4).map(|_| tokio::spawn(fill(500))).collect();
    for t in tasks {
        t.await.unwrap();
    }
    let after = px.peak_rss_kib();
    let (_, _, text) = support::metrics::scrape(maddr).await;
    let held = support::metrics::value(&text, "regrelay_session_cache_bytes", &[]);
    eprintln!(
        "2020 worst-shape sessions: caches hold {held} bytes; peak RSS {before} -> {after} KiB"
    );
    assert!(
        held > 0.0 && held <= bound as f64,
        "{held} > {bound}\n{text}"
    );
    let grown = after.saturating_sub(before);
    assert!(
        grown < 24 * 1024,
        "peak RSS grew {grown} KiB with caches bounded at {} KiB",
        bound >> 10
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_oauth_form_is_the_clients_413() {
    let projects = [("team/a".to_owned(), false)];
    let (_gl, reg) = world(&projects, Duration::from_secs(300)).await;
    let px = Regrelay::start(&["--registry", &reg.url()]);
    let form = format!(
        "grant_type=password&username={USER}&password={PAT}&service=container_registry&scope={}",
        "repository%3Ateam%2Fa%3Apull+".repeat(246 * 1024 / 30)
    );
    let ctype = [("content-type", "application/x-www-form-urlencoded")];
    let (status, body) = attack::request_from(
        host(1),
        px.addr,
        "POST",
        "/jwt/auth",
        &ctype,
        form.as_bytes(),
    )
    .await
    .expect("an answer");
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        body.contains("OAuth2 token form larger than 65536 bytes"),
        "{body}"
    );
    // Logged as what it is: the client's fault, not a failure of regrelay's.
    let line = px
        .output
        .wait_for("OAuth2 token form larger", Duration::from_secs(5))
        .unwrap();
    assert!(line.contains("INFO") && line.contains("client"), "{line}");
    assert!(!line.contains(PAT), "{line}");
    // A form within the bound still works.
    let small = format!(
        "grant_type=password&username={USER}&password={PAT}&service=container_registry&scope=repository%3Ateam%2Fa%3Apull"
    );
    let (status, body) = attack::request_from(
        host(1),
        px.addr,
        "POST",
        "/jwt/auth",
        &ctype,
        small.as_bytes(),
    )
    .await
    .expect("an answer");
    assert_eq!(status, StatusCode::OK, "{body}");
}
