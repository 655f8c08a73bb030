//! The secret sweep: a full push and pull (with tokens re-minted mid-push), OAuth2 grants, a
//! session presented to the realm, refused and failing requests, all with regrelay logging at
//! TRACE level (every crate), and not one password, PAT, upstream token, session token, refresh
//! token or session key appears in its output or in any answer body a client got.

use crate::support;

use std::io::Write;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::{Method, Request};
use http_body_util::BodyExt;
use regrelay::body;
use support::gitlab::with_developer_pat;
use support::upstream::client;
use support::*;

const USER: &str = "erin";
const PAT: &str = "glpat-Kx3vNq7RtWm2ZpLc9YbF";

/// One request a client makes: method, URL, headers, body.
type Visit<'a> = (Method, String, Vec<(&'a str, &'a str)>, Option<String>);

async fn call(method: Method, url: &str, headers: &[(&str, &str)], body: Option<String>) -> String {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = body.map_or_else(body::empty, body::full);
    let resp = client().request(req.body(body).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    format!(
        "{} {:?} {}",
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_secret_reaches_trace_logs_or_answers() {
    let gl = with_developer_pat(USER, PAT, "sec/app", Duration::from_secs(3)).await;
    let reg = Registry::start(&gl.realm());
    let key = STANDARD.encode([0x5au8; 32]);
    let mut keys = tempfile::NamedTempFile::new().unwrap();
    writeln!(keys, "{key}").unwrap();
    let keys_path = keys.path().display().to_string();
    // The pull-through cache and metrics are on, so their paths are swept too.
    let cache = tempfile::tempdir().unwrap();
    let px = Regrelay::start_with_prefix(
        &["env", "REGRELAY_LOG=trace"],
        &[
            "--registry",
            &reg.url(),
            "--session-key-file",
            &keys_path,
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let base = px.url();
    let host = px.addr.to_string();
    let mut answers = String::new();

    // A push that outlives its 3 s tokens, over a throttled link, and the pull back.
    let link = support::relay::Relay::start(vec![px.addr], Some(400 << 10)).await;
    let link_host = link.addr.to_string();
    tokio::task::spawn_blocking(move || {
        let image = OciImage::random(77, &[3 << 20]);
        let creds = format!("{USER}:{PAT}");
        let dest = format!("docker://{link_host}/sec/app:v1");
        let push = skopeo_copy(&image.reference(), &dest, &creds, &Transport::Http);
        assert!(push.status.success(), "{}", text(&push));
        let pulled = tempfile::tempdir().unwrap();
        let pulled_ref = format!("oci:{}:latest", pulled.path().display());
        let pull = skopeo_copy(&dest, &pulled_ref, &creds, &Transport::Http);
        assert!(pull.status.success(), "{}", text(&pull));
        assert_same_blobs(&image, pulled.path());
    })
    .await
    .unwrap();
    assert!(gl.mints() > 2, "tokens were re-minted mid-push");

    // Sessions and refresh tokens we hold, used in every way a client can.
    let realm = format!("{base}/jwt/auth");
    let session = fetch_token(&realm, USER, PAT, "repository:sec/app:pull,push").await;
    let bearer = format!("Bearer {session}");
    let form = format!(
        "grant_type=password&service=container_registry&scope=repository:sec/app:pull\
         &username={USER}&password={PAT}"
    );
    let oauth = call(
        Method::POST,
        &realm,
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(form),
    )
    .await;
    let refresh = oauth
        .split("\"refresh_token\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a refresh token")
        .to_owned();
    let refresh_form = format!(
        "grant_type=refresh_token&service=container_registry&scope=repository:sec/app:pull\
         &refresh_token={refresh}"
    );
    let basic = format!("Basic {}", STANDARD.encode(format!("{USER}:{PAT}")));
    let wrong = format!("Basic {}", STANDARD.encode(format!("{USER}:wrong-{PAT}")));
    let q = "service=container_registry&scope=repository:sec/app:pull";
    let tampered = format!("Bearer {session}x");
    let visits: Vec<Visit> = vec![
        (Method::POST, realm.clone(), vec![], Some(refresh_form)),
        (
            Method::GET,
            format!("{realm}?{q}"),
            vec![("authorization", &bearer)],
            None,
        ),
        (
            Method::GET,
            format!("{realm}?{q}"),
            vec![("authorization", &wrong)],
            None,
        ),
        (
            Method::GET,
            format!("{realm}?{q}"),
            vec![("authorization", &basic)],
            None,
        ),
        (
            Method::GET,
            format!("{base}/v2/sec/app/tags/list"),
            vec![("authorization", &bearer)],
            None,
        ),
        (
            Method::GET,
            format!("{base}/v2/sec/app/manifests/nope"),
            vec![("authorization", &bearer)],
            None,
        ),
        (
            Method::GET,
            format!("{base}/v2/other/app/tags/list"),
            vec![("authorization", &bearer)],
            None,
        ),
        (
            Method::GET,
            format!("{base}/v2/sec/app/tags/list"),
            vec![("authorization", &tampered)],
            None,
        ),
        (
            Method::GET,
            format!("{base}/v2/%2e%2e/x"),
            vec![("authorization", &basic)],
            None,
        ),
        (Method::GET, format!("{base}/-/ready"), vec![], None),
    ];
    for (method, url, headers, body) in visits {
        answers.push_str(&call(method, &url, &headers, body).await);
        answers.push('\n');
    }
    // Let a background re-mint happen while the session is in use.
    tokio::time::sleep(Duration::from_secs(3)).await;
    answers.push_str(
        &call(
            Method::GET,
            &format!("{base}/v2/sec/app/tags/list"),
            &[("authorization", &bearer)],
            None,
        )
        .await,
    );

    let out = px.output.settled();
    assert!(
        out.contains("TRACE"),
        "regrelay really logged at trace level"
    );
    let mut secrets = gl.issued();
    secrets.extend([
        PAT.to_owned(),
        format!("wrong-{PAT}"),
        key.clone(),
        refresh.clone(),
        session.clone(),
    ]);
    assert_no_secrets(&out, USER, &secrets);
    // Answers may carry the tokens they issue (that is their job) but nothing else secret.
    let issued_here = [&session, &refresh];
    let answers_without_issued = issued_here
        .iter()
        .fold(answers.clone(), |a, t| a.replace(t.as_str(), "<issued>"));
    let upstream_tokens = gl.issued();
    let mut must_not_appear = upstream_tokens.clone();
    must_not_appear.extend([PAT.to_owned(), key.clone()]);
    for s in &must_not_appear {
        assert!(
            !answers_without_issued.contains(s.as_str()),
            "an answer carried a secret"
        );
    }
    assert!(
        !answers.contains(&reg.addr.to_string()),
        "an answer named the registry's address: {answers}"
    );
    drop(host);
}
