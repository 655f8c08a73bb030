//! Several public names (`--public-url` more than once): each client is given the realm of the
//! name it used, sessions are sealed for the canonical (first) name so they open under every
//! alias, a push through the second name completes, and a request under a name that is not
//! configured is served, sent to the canonical name, and warned about once per host.

use crate::support;

use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use regrelay::body;
use support::gitlab::with_developer_pat;
use support::nginx::free_addr;
use support::upstream::{client, raw};
use support::*;

const USER: &str = "grace";
const PAT: &str = "glpat-Pq4xWn8RzLk2VbMt7YcD";

#[tokio::test(flavor = "multi_thread")]
async fn every_configured_name_works_and_unknown_ones_are_warned_about_once() {
    let gl = with_developer_pat(USER, PAT, "team/app", Duration::from_secs(300)).await;
    let reg = Registry::start(&gl.realm());
    let addr = free_addr();
    let (canonical, alias) = (
        format!("http://127.0.0.1:{}", addr.port()),
        format!("http://localhost:{}", addr.port()),
    );
    let listen = addr.to_string();
    let px = Regrelay::start(&[
        "--listen",
        &listen,
        "--registry",
        &reg.url(),
        "--public-url",
        &canonical,
        "--public-url",
        &alias,
    ]);
    // Each name gets its own realm.
    for base in [&canonical, &alias] {
        let resp = client()
            .request(
                Request::get(format!("{base}/v2/"))
                    .body(body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let challenge = resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            challenge.contains(&format!("realm=\"{base}/jwt/auth\"")),
            "{challenge}"
        );
    }
    // A session from the alias opens under the canonical name (sealed for the canonical name).
    let token = fetch_token(
        &format!("{alias}/jwt/auth"),
        USER,
        PAT,
        "repository:team/app:pull",
    )
    .await;
    let resp = client()
        .request(
            Request::get(format!("{canonical}/v2/team/app/tags/list"))
                .header("authorization", format!("Bearer {token}"))
                .body(body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    // 404: the repository has no tags yet, but the session was accepted (not 401).
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let _ = resp.into_body().collect().await;
    // A push through the second name completes.
    let image = OciImage::random(55, &[1 << 20]);
    let (src, dest) = (
        image.reference(),
        format!("docker://localhost:{}/team/app:v1", addr.port()),
    );
    let creds = format!("{USER}:{PAT}");
    let push =
        tokio::task::spawn_blocking(move || skopeo_copy(&src, &dest, &creds, &Transport::Http))
            .await
            .unwrap();
    assert!(
        push.status.success(),
        "{}\n{}",
        text(&push),
        px.output.text()
    );
    // An unconfigured name: served, sent to the canonical realm, warned about once.
    for _ in 0..3 {
        let req = format!(
            "GET /v2/ HTTP/1.1\r\nHost: internal-name.example:{}\r\nConnection: close\r\n\r\n",
            addr.port()
        );
        let out = raw(addr, req.as_bytes(), Duration::from_secs(5)).await;
        assert!(out.starts_with("HTTP/1.1 401"), "{out}");
        assert!(
            out.contains(&format!("realm=\"{canonical}/jwt/auth\"")),
            "{out}"
        );
    }
    let log = px.output.settled();
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("internal-name.example"))
        .count();
    assert_eq!(warnings, 1, "{log}");
    assert!(
        log.contains(&alias),
        "the warning names the configured names: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_between_replicas_explains_itself() {
    use std::io::Write;
    let gl = with_developer_pat(USER, PAT, "team/app", Duration::from_secs(300)).await;
    let reg = Registry::start(&gl.realm());
    let key_file = |byte: u8| {
        use base64::Engine;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "{}",
            base64::engine::general_purpose::STANDARD.encode([byte; 32])
        )
        .unwrap();
        f
    };
    let (k1, k2) = (key_file(1), key_file(2));
    let start = |public: &str, keys: &tempfile::NamedTempFile| {
        let keys = keys.path().display().to_string();
        Regrelay::start(&[
            "--registry",
            &reg.url(),
            "--public-url",
            public,
            "--session-key-file",
            &keys,
        ])
    };
    let a = start("http://registry-a.example", &k1);
    let other_name = start("http://registry-b.example", &k1);
    let other_key = start("http://registry-a.example", &k2);
    let token = fetch_token(
        &format!("{}/jwt/auth", a.url()),
        USER,
        PAT,
        "repository:team/app:pull",
    )
    .await;
    for (replica, want) in [
        (
            &other_name,
            "sealed by a replica with a different --public-url",
        ),
        (&other_key, "check the key ring on every replica"),
    ] {
        let resp = client()
            .request(
                Request::get(format!("{}/v2/team/app/tags/list", replica.url()))
                    .header("authorization", format!("Bearer {token}"))
                    .body(body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        assert!(body.contains(want), "{body}");
        assert!(
            replica.output.settled().contains(want),
            "{}",
            replica.output.text()
        );
    }
}
