//! The token realm on the proxy: challenges point at regrelay, `/jwt/auth` reaches GitLab with the
//! client's `Authorization` byte-for-byte, sealed sessions work (and are refused when tampered
//! with or revoked), the OAuth2 form works, minting is single-flight, and nothing secret is
//! logged. Real registry, the GitLab-behaving token service, regrelay as a process.

use crate::support;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use regrelay::body;
use regrelay::challenge::Challenge;
use support::gitlab::{gitlab, with_developer_pat, Credential, GitLab, Role, TokenScope};
use support::upstream::client;
use support::*;

const USER: &str = "alice";
const PAT: &str = "glpat-Hv7qXcR2mLp9sTz4WbNe";

async fn call(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (StatusCode, HeaderMap, String) {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = body.map_or_else(body::empty, |b| body::full(b.to_owned()));
    let resp = client().request(req.body(body).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn basic(user: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{secret}")))
}

fn challenge(h: &HeaderMap) -> Challenge {
    Challenge::parse(h["www-authenticate"].to_str().unwrap()).unwrap()
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

async fn token_service(lifetime: u64) -> GitLab {
    with_developer_pat(USER, PAT, "group/project", Duration::from_secs(lifetime)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_realm_is_served_on_the_proxy_and_sessions_are_re_minted() {
    let gl = token_service(3).await;
    let reg = Registry::start(&gl.realm());
    let px = Regrelay::start(&["--registry", &reg.url()]);
    let base = px.url();

    // 1. Challenges name regrelay's realm; service and scope stay.
    let (status, h, _) = call(Method::GET, &format!("{base}/v2/"), &[], None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let c = challenge(&h);
    assert_eq!(c.get("realm"), Some(format!("{base}/jwt/auth").as_str()));
    assert_eq!(c.get("service"), Some("container_registry"));
    let (_, h, _) = call(
        Method::HEAD,
        &format!("{base}/v2/group/project/app/manifests/v1"),
        &[],
        None,
    )
    .await;
    assert_eq!(
        challenge(&h).get("scope"),
        Some("repository:group/project/app:pull")
    );

    // 2. GET /jwt/auth reaches GitLab with Authorization byte-for-byte and the query unchanged.
    let query = "account=alice&client_id=docker&offline_token=true&service=container_registry\
                 &scope=repository%3Agroup%2Fproject%2Fapp%3Apull%2Cpush&scope=repository:group/project/app:pull";
    let auth = basic(USER, PAT);
    let (status, h, body) = call(
        Method::GET,
        &format!("{base}/jwt/auth?{query}"),
        &[("authorization", &auth), ("x-forwarded-for", "203.0.113.9")],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(h["cache-control"], "no-store");
    let seen = gl.seen().pop().unwrap();
    assert_eq!(seen.authorization.as_deref(), Some(auth.as_bytes()));
    assert_eq!(seen.query, query);
    // A client cannot choose the address GitLab rate-limits and bans by: without
    // --trusted-proxies its X-Forwarded-For is replaced by the peer address.
    assert_eq!(seen.forwarded_for.as_deref(), Some("127.0.0.1"));
    let answer = json(&body);
    let session = answer["token"].as_str().unwrap().to_owned();
    assert!(session.starts_with("rr1."), "{session}");
    assert_eq!(answer["access_token"], answer["token"]);
    assert_eq!(answer["expires_in"], 3600);
    assert!(answer["issued_at"].as_str().unwrap().ends_with('Z'));
    let bearer = format!("Bearer {session}");

    // 3. The session works upstream, and keeps working long after GitLab's 3 s tokens (+ the
    //    registry's 60 s leeway would not matter here: a stale token is never sent).
    let upload = format!("{base}/v2/group/project/app/blobs/uploads/");
    let (status, _, body) = call(Method::POST, &upload, &[("authorization", &bearer)], None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let mints_before = gl.mints();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // 50 parallel requests of one session with a stale token: exactly one mint.
    let mut tasks = vec![];
    for _ in 0..50 {
        let (url, bearer) = (format!("{base}/v2/"), bearer.clone());
        tasks.push(tokio::spawn(async move {
            call(Method::GET, &url, &[("authorization", &bearer)], None)
                .await
                .0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(
        gl.mints(),
        mints_before + 1,
        "50 parallel requests share one mint"
    );
    let last = gl.seen().pop().unwrap();
    assert_eq!(
        last.authorization.as_deref(),
        Some(auth.as_bytes()),
        "minted with the sealed credentials"
    );
    assert!(
        last.query
            .contains("scope=repository%3Agroup%2Fproject%2Fapp%3Apull%2Cpush"),
        "minted for exactly the sealed scopes: {}",
        last.query
    );

    // 4. A tampered session gets 401 with a fresh challenge and a registry-format body.
    let mut tampered = session.clone().into_bytes();
    let i = tampered.len() - 5;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = format!("Bearer {}", String::from_utf8(tampered).unwrap());
    let (status, h, body) = call(
        Method::HEAD,
        &format!("{base}/v2/group/project/app/manifests/v1"),
        &[("authorization", &tampered)],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let c = challenge(&h);
    assert_eq!(c.get("realm"), Some(format!("{base}/jwt/auth").as_str()));
    assert_eq!(c.get("error"), Some("invalid_token"));
    assert_eq!(c.get("scope"), Some("repository:group/project/app:pull"));
    assert!(body.is_empty(), "HEAD has no body");
    let (status, _, body) = call(
        Method::GET,
        &format!("{base}/v2/"),
        &[("authorization", &tampered)],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json(&body)["errors"][0]["code"], "UNAUTHORIZED");

    // 5. GitLab's refusals pass through unchanged.
    let (status, _, body) = call(
        Method::GET,
        &format!("{base}/jwt/auth?service=container_registry"),
        &[("authorization", &basic(USER, "wrong"))],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("HTTP Basic: Access denied"), "{body}");
    let (status, _, body) = call(
        Method::GET,
        &format!("{base}/jwt/auth?service=container_registry"),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("access forbidden"), "{body}");

    // 6. A revoked credential stops working at the next mint.
    gl.revoke(PAT);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, h, body) = call(
        Method::GET,
        &format!("{base}/v2/"),
        &[("authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("HTTP Basic: Access denied"), "{body}");
    assert_eq!(challenge(&h).get("error"), Some("invalid_token"));

    let out = px.output.text();
    assert!(
        out.contains("token request method=\"GET\" authorization=\"present\" scheme=Basic username=\"alice\"")
            || out.contains("method=GET authorization=present scheme=Basic username=alice"),
        "{out}"
    );
    let mut secrets = gl.issued();
    secrets.push(PAT.to_owned());
    assert_no_secrets(&out, USER, &secrets);
}

#[tokio::test(flavor = "multi_thread")]
async fn oauth2_password_and_refresh_grants_for_containerd() {
    let gl = token_service(300).await;
    let reg = Registry::start(&gl.realm());
    let px = Regrelay::start(&["--registry", &reg.url()]);
    let url = format!("{}/jwt/auth", px.url());
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let pw = format!(
        "grant_type=password&username={USER}&password={PAT}&service=container_registry\
         &scope=repository%3Agroup%2Fproject%2Fapp%3Apull&client_id=containerd-client"
    );
    let (status, _, body) = call(Method::POST, &url, &form, Some(&pw)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let a = json(&body);
    let refresh = a["refresh_token"].as_str().unwrap().to_owned();
    assert!(a["access_token"].as_str().unwrap().starts_with("rr1."));
    let seen = gl.seen().pop().unwrap();
    assert_eq!(seen.method, "GET", "GitLab is asked with GET");
    assert_eq!(
        seen.authorization.as_deref(),
        Some(basic(USER, PAT).as_bytes())
    );

    // Renewal without credentials, for another scope.
    let rf = format!(
        "grant_type=refresh_token&refresh_token={refresh}&service=container_registry\
         &scope=repository%3Agroup%2Fproject%2Fapp%3Apull%2Cpush"
    );
    let (status, _, body) = call(Method::POST, &url, &form, Some(&rf)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let access = json(&body)["access_token"].as_str().unwrap().to_owned();
    let (status, _, body) = call(
        Method::POST,
        &format!("{}/v2/group/project/app/blobs/uploads/", px.url()),
        &[("authorization", &format!("Bearer {access}"))],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    // A refresh token is not an access token.
    let (status, _, _) = call(
        Method::GET,
        &format!("{}/v2/", px.url()),
        &[("authorization", &format!("Bearer {refresh}"))],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Bad input: a clear registry-format error.
    let (status, _, body) = call(
        Method::POST,
        &url,
        &form,
        Some("grant_type=client_credentials"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(json(&body)["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("grant_type"));
    // Wrong password: GitLab's answer.
    let bad = pw.replace(PAT, "nope");
    let (status, _, body) = call(Method::POST, &url, &form, Some(&bad)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("HTTP Basic: Access denied"));

    let mut secrets = gl.issued();
    secrets.push(PAT.to_owned());
    assert_no_secrets(&px.output.text(), USER, &secrets);
}

/// The seed's setup: a front serves the registry but answers `/jwt/auth` with 307 to GitLab on
/// another host:port. Go clients (skopeo, Docker) drop `Authorization` on that redirect.
struct RedirectingFront {
    gl: GitLab,
    _reg: Registry,
    front: nginx::Nginx,
}

async fn redirecting_front() -> RedirectingFront {
    let gl = token_service(300).await;
    let front_addr = nginx::free_addr();
    let reg = Registry::start(&format!("http://{front_addr}/jwt/auth"));
    let front = nginx::Nginx::start(
        front_addr,
        &format!(
            "    client_max_body_size 0;\n\
             location /jwt/auth {{ return 307 http://{gl}$request_uri; }}\n\
             location / {{ proxy_pass http://{reg}; proxy_set_header Host $http_host; \
             proxy_request_buffering off; proxy_http_version 1.1; }}",
            gl = gl.addr,
            reg = reg.addr
        ),
    );
    RedirectingFront {
        gl,
        _reg: reg,
        front,
    }
}

fn skopeo_push(host: &str, creds: &str) -> std::process::Output {
    let image = OciImage::random(11, &[1 << 20]);
    skopeo_copy(
        &image.reference(),
        &format!("docker://{host}/group/project/app:v1"),
        creds,
        &Transport::Http,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_front_that_redirects_the_token_endpoint_is_fixed_by_the_realm_on_the_proxy() {
    let f = redirecting_front().await;
    let creds = format!("{USER}:{PAT}");
    // Control: straight to the front, skopeo loses Authorization on the redirect and is denied.
    let host = f.front.addr.to_string();
    let c = creds.clone();
    let direct = tokio::task::spawn_blocking(move || skopeo_push(&host, &c))
        .await
        .unwrap();
    assert!(!direct.status.success(), "the control push should fail");
    assert!(
        f.gl.seen().iter().any(|s| s.authorization.is_none()),
        "GitLab saw an anonymous token request"
    );

    // Without an allow entry regrelay refuses to carry credentials there, and says how to fix it.
    let px = Regrelay::start(&["--registry", &format!("http://{}", f.front.addr)]);
    let (status, _, body) = call(
        Method::GET,
        &format!("{}/jwt/auth?service=container_registry", px.url()),
        &[("authorization", &basic(USER, PAT))],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let msg = json(&body)["errors"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(msg.contains("--auth-redirect-allow"), "{msg}");
    assert!(
        !msg.contains(&f.gl.addr.to_string()),
        "the client is not told internal addresses: {msg}"
    );
    // The log line is written as the request ends; its reader thread may still be catching up.
    let wanted = format!("--auth-redirect-allow http://{}", f.gl.addr);
    assert!(
        px.output
            .wait_for(&wanted, Duration::from_secs(5))
            .is_some(),
        "the log names the origin and the flag to allow it: {}",
        px.output.text()
    );
    drop(px);

    // With it, the push goes through regrelay.
    let px = Regrelay::start(&[
        "--registry",
        &format!("http://{}", f.front.addr),
        "--auth-redirect-allow",
        &format!("http://{}", f.gl.addr),
    ]);
    let host = px.addr.to_string();
    let c = creds.clone();
    let push = tokio::task::spawn_blocking(move || skopeo_push(&host, &c))
        .await
        .unwrap();
    assert!(
        push.status.success(),
        "push through regrelay failed: {}",
        text(&push)
    );
    let seen = f.gl.seen();
    assert!(
        seen.iter()
            .filter(|s| s.status == 200)
            .all(|s| s.username.as_deref() == Some(USER) || s.authorization.is_none()),
        "{seen:?}"
    );
    assert!(
        f.front.access_log().contains("\"GET /jwt/auth?"),
        "tokens went via the front"
    );
    let out = px.output.text();
    let mut secrets = f.gl.issued();
    secrets.push(PAT.to_owned());
    assert_no_secrets(&out, USER, &secrets);

    if !docker_available() {
        support::skip(
            "docker part of the redirect test",
            "no Docker daemon (`docker info` failed)",
        );
        return;
    }
    let (front, proxy) = (f.front.addr.to_string(), px.addr.to_string());
    tokio::task::spawn_blocking(move || {
        let cfg = tempfile::tempdir().unwrap();
        let login = |host: &str| {
            docker(
                cfg.path(),
                &["login", host, "-u", USER, "--password-stdin"],
                Some(PAT),
            )
        };
        let direct = login(&front);
        assert!(
            !direct.status.success(),
            "docker login via the redirecting front should fail"
        );
        assert!(
            text(&direct).contains("access forbidden"),
            "{}",
            text(&direct)
        );
        let via = login(&proxy);
        assert!(
            via.status.success(),
            "docker login via regrelay: {}",
            text(&via)
        );
        let image = format!("{proxy}/group/project/docker-redirect:v1");
        let tarball = tempfile::NamedTempFile::new().unwrap();
        let tar = std::process::Command::new("tar")
            .args([
                "-cf",
                &tarball.path().display().to_string(),
                "-C",
                "/etc",
                "hostname",
            ])
            .status()
            .unwrap();
        assert!(tar.success());
        let imported = docker(
            cfg.path(),
            &["import", &tarball.path().display().to_string(), &image],
            None,
        );
        assert!(imported.status.success(), "{}", text(&imported));
        let push = docker(cfg.path(), &["push", &image], None);
        let _ = docker(cfg.path(), &["rmi", &image], None);
        assert!(
            push.status.success(),
            "docker push via regrelay: {}",
            text(&push)
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn gitlab_permission_outcomes_match_and_refused_pushes_say_why() {
    let gl = gitlab()
        .credential(Credential::Job {
            token: "job-token-7f3k".into(),
            project: "group/project".into(),
            user: USER.into(),
        })
        .credential(Credential::Deploy {
            username: "gitlab+deploy-token-3".into(),
            token: "deploy-ro-9q2w".into(),
            scopes: vec![TokenScope::ReadRegistry],
            project: "group/project".into(),
        })
        .project("group/project", false, &[(USER, Role::Developer)])
        .project("group/other", false, &[(USER, Role::Developer)])
        // group/project's jobs may pull group/other (GitLab's job token allowlist is on by
        // default, with only the project itself on it): pushing is what they cannot do.
        .job_token_allowlist("group/other", &["group/project"])
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let px = Regrelay::start(&["--registry", &reg.url()]);
    let (direct, proxied) = (reg.addr.to_string(), px.addr.to_string());
    let outcomes = tokio::task::spawn_blocking(move || {
        let push = |host: &str, repo: &str, creds: &str| {
            let image = OciImage::random(3, &[256 << 10]);
            skopeo_copy(
                &image.reference(),
                &format!("docker://{host}/{repo}:v1"),
                creds,
                &Transport::Http,
            )
        };
        let job = "gitlab-ci-token:job-token-7f3k";
        let deploy = "gitlab+deploy-token-3:deploy-ro-9q2w";
        let mut out = vec![];
        for (repo, creds, ok) in [
            ("group/project/app", job, true),
            ("group/other/app", job, false),
            ("group/project/app2", deploy, false),
        ] {
            let d = push(&direct, repo, creds);
            let p = push(&proxied, repo, creds);
            out.push((repo, creds.split(':').next().unwrap(), ok, d, p));
        }
        out
    })
    .await
    .unwrap();
    for (repo, user, ok, direct, proxied) in outcomes {
        assert_eq!(
            direct.status.success(),
            ok,
            "direct {user} → {repo}: {}",
            text(&direct)
        );
        assert_eq!(
            proxied.status.success(),
            ok,
            "regrelay {user} → {repo}: {}",
            text(&proxied)
        );
        if !ok {
            // The registry says only "unauthorized: authentication required" (GitLab dropped
            // push without an error); regrelay says what was refused and why.
            let (d, p) = (text(&direct), text(&proxied));
            assert!(d.contains("authentication required"), "direct: {d}");
            assert!(
                p.contains("denied: push denied: GitLab granted")
                    && p.contains(&format!("no push on {repo}")),
                "regrelay: {p}"
            );
        }
    }
    assert_no_secrets(
        &px.output.text(),
        "gitlab-ci-token",
        &["job-token-7f3k".into()],
    );
    assert_no_secrets(
        &px.output.text(),
        "gitlab+deploy-token-3",
        &["deploy-ro-9q2w".into()],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bodiless_request_refused_as_invalid_token_is_re_minted_and_retried_once() {
    refused_once_then_retried(&[]).await;
}

/// The pull-through cache sends its own upstream requests: the same one retry applies to them.
#[tokio::test(flavor = "multi_thread")]
async fn a_cached_pull_refused_as_invalid_token_is_re_minted_and_retried_once() {
    let cache = tempfile::tempdir().unwrap();
    refused_once_then_retried(&["--cache-dir", cache.path().to_str().unwrap()]).await;
}

/// A manifest GET whose first token the registry calls invalid: one new mint, one retry, 200.
async fn refused_once_then_retried(args: &[&str]) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let gl = token_service(300).await;
    let realm = gl.realm();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    // A registry stand-in for this one behaviour: it refuses the first token it sees as invalid.
    let origin = support::upstream::serve(move |req: Request<hyper::body::Incoming>| {
        let with_token = req.headers().contains_key("authorization");
        // Counts token-bearing requests only (regrelay's own realm probe carries none).
        let n = if with_token {
            h.fetch_add(1, Ordering::SeqCst)
        } else {
            usize::MAX
        };
        let realm = realm.clone();
        async move {
            let mut resp = http::Response::new(body::full("{}"));
            if !with_token || n == 0 {
                *resp.status_mut() = StatusCode::UNAUTHORIZED;
                let error = if with_token {
                    ",error=\"invalid_token\""
                } else {
                    ""
                };
                let c = format!("Bearer realm=\"{realm}\",service=\"container_registry\"{error}");
                resp.headers_mut()
                    .insert("www-authenticate", c.parse().unwrap());
            }
            resp
        }
    })
    .await;
    let url = origin.url();
    let px = Regrelay::start(&[&["--registry", url.as_str()], args].concat());
    let (status, _, _) = call(Method::GET, &format!("{}/v2/", px.url()), &[], None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let q = "service=container_registry&scope=repository:group/project:pull";
    let (status, _, body) = call(
        Method::GET,
        &format!("{}/jwt/auth?{q}", px.url()),
        &[("authorization", &basic(USER, PAT))],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let bearer = format!("Bearer {}", json(&body)["token"].as_str().unwrap());
    let mints = gl.mints();
    let (status, _, _) = call(
        Method::GET,
        &format!("{}/v2/group/project/manifests/v1", px.url()),
        &[("authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "retried with a new token");
    assert_eq!(gl.mints(), mints + 1, "one new mint");
    assert_eq!(hits.load(Ordering::SeqCst), 2, "exactly one retry");
}

#[tokio::test(flavor = "multi_thread")]
async fn refresh_tokens_live_no_longer_than_the_session_lifetime() {
    let gl = token_service(300).await;
    let reg = Registry::start(&gl.realm());
    let px = Regrelay::start(&["--registry", &reg.url(), "--session-lifetime-secs", "2"]);
    let url = format!("{}/jwt/auth", px.url());
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let pw = format!(
        "grant_type=password&username={USER}&password={PAT}&service=container_registry\
         &scope=repository%3Agroup%2Fproject%2Fapp%3Apull"
    );
    let (status, _, body) = call(Method::POST, &url, &form, Some(&pw)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let refresh = json(&body)["refresh_token"].as_str().unwrap().to_owned();
    let rf = format!(
        "grant_type=refresh_token&refresh_token={refresh}&service=container_registry\
         &scope=repository%3Agroup%2Fproject%2Fapp%3Apull"
    );
    let (status, _, body) = call(Method::POST, &url, &form, Some(&rf)).await;
    assert_eq!(status, StatusCode::OK, "fresh refresh token: {body}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, h, _) = call(Method::POST, &url, &form, Some(&rf)).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the refresh token outlived the session lifetime"
    );
    assert!(h.contains_key("www-authenticate"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_token_is_forgotten_whatever_the_request_and_scope_errors_are_retried() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let gl = token_service(300).await;
    let realm = gl.realm();
    let refusals = Arc::new(AtomicUsize::new(0));
    let r = refusals.clone();
    // A registry stand-in: refuses the first upload PATCH (with its body) as invalid_token and
    // the first manifest GET as insufficient_scope; everything else with a token is fine.
    let origin = support::upstream::serve(move |req: Request<hyper::body::Incoming>| {
        let (realm, r) = (realm.clone(), r.clone());
        async move {
            let with_token = req.headers().contains_key("authorization");
            let path = req.uri().path().to_owned();
            let method = req.method().clone();
            let _ = support::upstream::drain(req.into_body()).await;
            let mut resp = http::Response::new(body::full("{}"));
            let error = if !with_token {
                Some("")
            } else if method == Method::PATCH && r.fetch_add(1, Ordering::SeqCst) == 0 {
                Some(",error=\"invalid_token\"")
            } else if path.ends_with("/manifests/v1") && r.fetch_add(1, Ordering::SeqCst) == 1 {
                Some(",error=\"insufficient_scope\"")
            } else {
                None
            };
            if let Some(error) = error {
                *resp.status_mut() = StatusCode::UNAUTHORIZED;
                let c = format!("Bearer realm=\"{realm}\",service=\"container_registry\"{error}");
                resp.headers_mut()
                    .insert("www-authenticate", c.parse().unwrap());
            } else if method == Method::PATCH {
                *resp.status_mut() = StatusCode::ACCEPTED;
            }
            resp
        }
    })
    .await;
    let px = Regrelay::start(&["--registry", &origin.url()]);
    let q = "service=container_registry&scope=repository:group/project:pull,push";
    let (status, _, body) = call(
        Method::GET,
        &format!("{}/jwt/auth?{q}", px.url()),
        &[("authorization", &basic(USER, PAT))],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let bearer = format!("Bearer {}", json(&body)["token"].as_str().unwrap());
    let mints = gl.mints();
    // An upload with a body, refused as invalid_token: the client gets the 401 (its body is
    // gone), and the token is forgotten, so the next request carries a new one.
    let (status, _, _) = call(
        Method::PATCH,
        &format!("{}/v2/group/project/blobs/uploads/u?_state=s", px.url()),
        &[("authorization", &bearer), ("content-range", "0-3")],
        Some("abcd"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = call(
        Method::GET,
        &format!("{}/v2/group/project/tags/list", px.url()),
        &[("authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        gl.mints(),
        mints + 1,
        "the refused token was forgotten and minted again"
    );
    // insufficient_scope on a bodiless request: forgotten and retried once with a new token.
    let (status, _, _) = call(
        Method::GET,
        &format!("{}/v2/group/project/manifests/v1", px.url()),
        &[("authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "retried after insufficient_scope");
    assert_eq!(gl.mints(), mints + 2);
}
