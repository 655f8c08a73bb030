//! A token service that fails, is slow, or is gone, as seen by clients of sealed sessions:
//! one request to GitLab for all the requests that wait on a session's mint (a failure included),
//! then none for the backoff (GitLab bans addresses that keep failing); every failure keeps its
//! meaning (429 stays 429, 503 stays 503, refused credentials are a 401 challenge with GitLab's
//! message, a deadline is 504, no answer is 502); and a token running out is re-minted in the
//! background, so no request waits for a slow GitLab. Real registry, the GitLab-behaving token
//! service with injected faults, regrelay as a process.

use crate::support;

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use regrelay::body;
use regrelay::challenge::Challenge;
use support::gitlab::{error_body, with_developer_pat, GitLab};
use support::upstream::client;
use support::*;

const USER: &str = "runner";
const PAT: &str = "glpat-Tq4mZx8RvLc2NwHs7KpD";
const REPO: &str = "ci/app";
const SCOPE: &str = "repository:ci/app:pull";
/// GitLab's token lifetime in these tests. regrelay's margin for it is 1 s: a cached token is
/// used while more than 1 s of it is left (4 s), and re-minted in the background once 2 s or less
/// are left.
const LIFETIME: Duration = Duration::from_secs(5);
/// When a token received at t is no longer used (fresh life 4 s), with slack for a loaded machine.
const STALE_AFTER: Duration = Duration::from_millis(4300);

async fn call(method: Method, url: &str, headers: &[(&str, &str)]) -> Answer {
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
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn retry_after(&self) -> Option<u64> {
        let v = self.headers.get("retry-after")?;
        Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or_else(|| panic!("Retry-After is not seconds: {v:?}")),
        )
    }

    /// The first error of a registry-format JSON body: (code, message).
    fn error(&self) -> (String, String) {
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not a JSON body ({e}): {self:?}"));
        let e = &v["errors"][0];
        match (e["code"].as_str(), e["message"].as_str()) {
            (Some(c), Some(m)) if !c.is_empty() => (c.to_owned(), m.to_owned()),
            _ => panic!("not a registry-format error body: {self:?}"),
        }
    }
}

fn basic() -> String {
    format!("Basic {}", STANDARD.encode(format!("{USER}:{PAT}")))
}

struct Stack {
    gl: GitLab,
    _reg: Registry,
    px: Regrelay,
}

impl Stack {
    /// GitLab (5 s tokens), the registry holding `ci/app:v1`, regrelay with `extra` flags.
    async fn start(extra: &[&str]) -> Stack {
        let gl = with_developer_pat(USER, PAT, REPO, LIFETIME).await;
        let reg = Registry::start(&gl.realm());
        let host = reg.addr.to_string();
        let pushed = tokio::task::spawn_blocking(move || {
            let image = OciImage::random(41, &[64 << 10]);
            skopeo_copy(
                &image.reference(),
                &format!("docker://{host}/{REPO}:v1"),
                &format!("{USER}:{PAT}"),
                &Transport::Http,
            )
        })
        .await
        .unwrap();
        assert!(
            pushed.status.success(),
            "seeding the registry: {}",
            text(&pushed)
        );
        let url = reg.url();
        let mut args = vec!["--registry", url.as_str()];
        args.extend_from_slice(extra);
        let px = Regrelay::start(&args);
        Stack { gl, _reg: reg, px }
    }

    fn realm_url(&self) -> String {
        format!(
            "{}/jwt/auth?service=container_registry&scope={SCOPE}",
            self.px.url()
        )
    }

    /// A new regrelay session (its GitLab token is cached, received now): `Bearer rr1.…`.
    async fn session(&self) -> String {
        let a = call(
            Method::GET,
            &self.realm_url(),
            &[("authorization", &basic())],
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{a:?}");
        let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        let token = v["token"].as_str().unwrap();
        assert!(token.starts_with("rr1."), "{token}");
        format!("Bearer {token}")
    }

    /// `GET /v2/ci/app/tags/list` through regrelay with `bearer`.
    async fn tags(&self, bearer: &str) -> Answer {
        let url = format!("{}/v2/{REPO}/tags/list", self.px.url());
        call(Method::GET, &url, &[("authorization", bearer)]).await
    }

    /// `n` concurrent `tags` requests.
    async fn burst(&self, bearer: &str, n: usize) -> Vec<Answer> {
        let url = format!("{}/v2/{REPO}/tags/list", self.px.url());
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (url, bearer) = (url.clone(), bearer.to_owned());
                tokio::spawn(
                    async move { call(Method::GET, &url, &[("authorization", &bearer)]).await },
                )
            })
            .collect();
        let mut out = vec![];
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    fn log(&self) -> String {
        self.px.output.text()
    }
}

/// Sleeps until `at`.
async fn until(at: Instant) {
    tokio::time::sleep(at.saturating_duration_since(Instant::now())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_token_service_is_asked_once_for_all_waiters_then_left_alone_for_its_backoff() {
    let s = Stack::start(&[]).await;
    let bearer = s.session().await;
    let got = Instant::now();
    // The session's cached token is past its fresh life: the next request must mint.
    until(got + STALE_AFTER).await;
    s.gl.fail_with(503, Some(7), "maintenance");

    let before = s.gl.attempts();
    let answers = s.burst(&bearer, 30).await;
    let first_burst_done = Instant::now();
    let attempts = s.gl.attempts() - before;
    assert_eq!(
        attempts,
        1,
        "30 waiting requests of one session share one token request, failure included\n{}",
        s.log()
    );
    for a in &answers {
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{a:?}");
        assert_eq!(a.retry_after(), Some(7), "GitLab's Retry-After: {a:?}");
        let (code, message) = a.error();
        assert_eq!(code, "UNAVAILABLE", "{a:?}");
        assert!(message.contains("maintenance"), "GitLab's message: {a:?}");
    }

    // Right away again: the failure is remembered for its backoff, GitLab is not asked.
    let before = s.gl.attempts();
    let answers = s.burst(&bearer, 30).await;
    assert_eq!(
        s.gl.attempts() - before,
        0,
        "no token request during the backoff\n{}",
        s.log()
    );
    for a in &answers {
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{a:?}");
        let wait = a.retry_after().expect("Retry-After");
        assert!((1..=7).contains(&wait), "{a:?}");
        assert_eq!(a.error().0, "UNAVAILABLE");
    }

    // GitLab is back; after the backoff (max(1 s, Retry-After 7 s)) one request mints once.
    s.gl.heal();
    until(first_burst_done + Duration::from_secs(8)).await;
    let before = s.gl.attempts();
    let a = s.tags(&bearer).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}\n{}", s.log());
    assert_eq!(
        s.gl.attempts() - before,
        1,
        "exactly one token request after the backoff"
    );
    let mut secrets = s.gl.issued();
    secrets.push(PAT.to_owned());
    assert_no_secrets(&s.log(), USER, &secrets);
}

#[tokio::test(flavor = "multi_thread")]
async fn busy_and_refusing_token_service_answers_keep_their_meaning() {
    let s = Stack::start(&[]).await;

    // At the realm: a client's own token request gets GitLab's status, Retry-After and
    // message. Rack::Attack's answer is text/plain ("Retry later" and a newline), which registry
    // clients do not print: it reaches them in the registry's error format, the message kept
    // (lib/gitlab/rack_attack.rb).
    s.gl.fail_with(429, Some(30), "Retry later");
    let a = call(Method::GET, &s.realm_url(), &[("authorization", &basic())]).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{a:?}");
    assert_eq!(a.retry_after(), Some(30), "{a:?}");
    assert_eq!(
        a.error(),
        ("TOOMANYREQUESTS".to_owned(), "Retry later".to_owned()),
        "{a:?}"
    );
    assert!(a.headers.contains_key("ratelimit-reset"), "{a:?}");
    s.gl.fail_with(503, None, "maintenance");
    let a = call(Method::GET, &s.realm_url(), &[("authorization", &basic())]).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{a:?}");
    assert_eq!(a.retry_after(), None, "GitLab sent no Retry-After: {a:?}");
    assert_eq!(a.body, error_body("UNAVAILABLE", "maintenance"));
    s.gl.heal();

    // Sessions whose tokens must be re-minted, one per case (a failure is remembered per
    // session).
    let (busy, down, revoked) = (s.session().await, s.session().await, s.session().await);
    until(Instant::now() + STALE_AFTER).await;

    // Rate limited: 429 with GitLab's Retry-After, never "unauthorized".
    s.gl.fail_with(429, Some(3), "Retry later");
    let a = s.tags(&busy).await;
    assert_eq!(
        a.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{a:?}\n{}",
        s.log()
    );
    assert_eq!(a.retry_after(), Some(3), "{a:?}");
    let (code, message) = a.error();
    assert_eq!(code, "TOOMANYREQUESTS", "{a:?}");
    assert!(message.contains("Retry later"), "{a:?}");
    assert!(!a.headers.contains_key("www-authenticate"), "{a:?}");

    // Unavailable without Retry-After: 503, and the client is still told when to come back.
    s.gl.fail_with(503, None, "maintenance");
    let a = s.tags(&down).await;
    assert_eq!(
        a.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{a:?}\n{}",
        s.log()
    );
    assert!(a.retry_after().is_some_and(|w| w >= 1), "{a:?}");
    let (code, message) = a.error();
    assert_eq!(code, "UNAVAILABLE", "{a:?}");
    assert!(message.contains("maintenance"), "{a:?}");
    assert!(!a.headers.contains_key("www-authenticate"), "{a:?}");

    // Credentials GitLab no longer accepts: 401 with a challenge to log in again at regrelay's
    // realm, and GitLab's message.
    s.gl.heal();
    s.gl.revoke(PAT);
    let a = s.tags(&revoked).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{a:?}\n{}", s.log());
    let challenge = a
        .headers
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .and_then(Challenge::parse)
        .unwrap_or_else(|| panic!("a Bearer challenge: {a:?}"));
    assert_eq!(
        challenge.get("realm"),
        Some(format!("{}/jwt/auth", s.px.url()).as_str()),
        "{a:?}"
    );
    let (code, message) = a.error();
    assert_eq!(code, "UNAUTHORIZED", "{a:?}");
    assert!(message.contains("HTTP Basic: Access denied"), "{a:?}");

    let mut secrets = s.gl.issued();
    secrets.push(PAT.to_owned());
    assert_no_secrets(&s.log(), USER, &secrets);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_token_service_is_a_gateway_timeout_and_an_absent_one_a_bad_gateway() {
    let s = Stack::start(&["--token-timeout-secs", "2"]).await;
    let (slow, gone) = (s.session().await, s.session().await);
    until(Instant::now() + STALE_AFTER).await;

    // Slower than --token-timeout-secs 2: 504 after about 2 s, not after GitLab's 5 s.
    s.gl.delay(Duration::from_secs(5));
    let started = Instant::now();
    let a = s.tags(&slow).await;
    let took = started.elapsed();
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT, "{a:?}\n{}", s.log());
    assert!(
        took < Duration::from_secs(4),
        "the token request deadline is 2 s, the answer took {took:?}"
    );
    a.error();

    // GitLab not listening at all: 502.
    s.gl.delay(Duration::ZERO);
    s.gl.stop();
    let gl_addr = s.gl.addr;
    let refused = tokio::task::spawn_blocking(move || {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if std::net::TcpStream::connect(gl_addr).is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    })
    .await
    .unwrap();
    assert!(
        refused,
        "the stopped token service still accepts connections"
    );
    let started = Instant::now();
    let a = s.tags(&gone).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{a:?}\n{}", s.log());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a refused connection is not a timeout: {:?}",
        started.elapsed()
    );
    a.error();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_running_out_is_re_minted_in_the_background_so_no_request_waits_for_gitlab() {
    let s = Stack::start(&[]).await;
    let bearer = s.session().await;
    // From now on every mint takes 1.5 s.
    s.gl.delay(Duration::from_millis(1500));
    let (attempts, mints) = (s.gl.attempts(), s.gl.mints());
    let start = Instant::now();
    let mut tick = start;
    let mut took = vec![];
    while tick < start + Duration::from_secs(15) {
        until(tick).await;
        let t = Instant::now();
        let a = s.tags(&bearer).await;
        took.push(t.elapsed());
        assert_eq!(
            a.status,
            StatusCode::OK,
            "request {} at {:?}: {a:?}\n{}",
            took.len(),
            t - start,
            s.log()
        );
        tick += Duration::from_millis(250);
    }
    let asked = s.gl.attempts() - attempts;
    // Let a mint still under way finish before counting tokens.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let minted = s.gl.mints() - mints;
    let slowest = took.iter().max().copied().unwrap();
    eprintln!(
        "{} requests in 15 s, slowest {slowest:?}; {asked} token requests, {minted} mints",
        took.len()
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a request waited for GitLab's 1.5 s mint ({slowest:?}): {took:?}\n{}",
        s.log()
    );
    assert!(
        asked >= 3 && minted >= 3,
        "the session's 5 s token was re-minted while in use: {asked} token requests, \
         {minted} mints in 15 s"
    );
}
