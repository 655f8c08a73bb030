//! Every credential-bearing artifact stays with the upstream and route it was given for (issue
//! 20, findings 3 and 4), against real registries and two GitLab stand-ins (the default upstream
//! and a mirrored `docker.io`, each with its own token service that counts what reaches it):
//!
//! - a refresh token, a session, and a session regrelay issued for its own injected identity are
//!   each refused by the other upstream and on the other routes, and no request reaches the
//!   other upstream's token service;
//! - behind `--trusted-proxies`, the forwarded client address decides who gets injected
//!   credentials: a request relayed for an outside client does not, the front's own does (once
//!   acknowledged: ranges that cover a front are refused at start otherwise), garbage does not.

use crate::support;

use std::time::Duration;

use http::StatusCode;
use support::attack::{self, host};
use support::gitlab::{gitlab, Credential, GitLab, Role, TokenScope};
use support::*;

const USER: &str = "grace";
const PAT: &str = "glpat-Gr4c3C0nf1n3dT0k3n";
const DEPLOY_USER: &str = "gitlab+deploy-token-20";
const DEPLOY_TOKEN: &str = "gldt-Zq8Lw3Nv6Tc1Rb9Xk4Hp";

struct World {
    gl: GitLab,
    reg: Registry,
    hub_gl: GitLab,
    hub: Registry,
    creds: tempfile::NamedTempFile,
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
            project: "team/a".into(),
        })
        .project("team/a", false, &[(USER, Role::Developer)])
        .lifetime(Duration::from_secs(300))
        .start()
        .await;
    let hub_gl = gitlab()
        .project("library/alpine", true, &[])
        .lifetime(Duration::from_secs(300))
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let hub = Registry::start(&hub_gl.realm());
    let creds = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(creds.path(), format!("{DEPLOY_USER}:{DEPLOY_TOKEN}\n")).unwrap();
    World {
        gl,
        reg,
        hub_gl,
        hub,
        creds,
    }
}

/// A request from 127.0.0.1 (`to` regrelay), its status and body.
async fn ask(
    px: &Regrelay,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, String) {
    attack::request_from(host(1), px.addr, method, path, headers, body.as_bytes())
        .await
        .expect("an answer")
}

fn field(body: &str, name: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{body}"));
    v[name]
        .as_str()
        .unwrap_or_else(|| panic!("no {name}: {body}"))
        .to_owned()
}

const FORM: [(&str, &str); 1] = [("content-type", "application/x-www-form-urlencoded")];

#[tokio::test(flavor = "multi_thread")]
async fn refresh_tokens_sessions_and_injected_identities_stay_with_their_upstream() {
    let w = world().await;
    let hub_upstream = format!("docker.io={}", w.hub.url());
    let injection = format!("docker.io={}", w.creds.path().display());
    let px = Regrelay::start(&[
        "--registry",
        &w.reg.url(),
        "--upstream",
        &hub_upstream,
        "--upstream-credentials",
        &injection,
    ]);
    // containerd's OAuth2 password grant, for the default upstream.
    let login = format!(
        "grant_type=password&username={USER}&password={PAT}&service=container_registry&scope=repository%3Ateam%2Fa%3Apull"
    );
    let (status, body) = ask(&px, "POST", "/jwt/auth", &FORM, &login).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (refresh, session) = (field(&body, "refresh_token"), field(&body, "token"));
    let hub_seen = w.hub_gl.attempts();
    // The refresh token at the other upstream: by ?ns=, and by a scope naming it.
    let alpine = "repository%3Alibrary%2Falpine%3Apull";
    let redeem = format!("grant_type=refresh_token&refresh_token={refresh}&service=container_registry&scope={alpine}");
    let (status, body) = ask(&px, "POST", "/jwt/auth?ns=docker.io", &FORM, &redeem).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("issued for another upstream"), "{body}");
    let by_scope = format!(
        "grant_type=refresh_token&refresh_token={refresh}&service=container_registry&scope=repository%3Adocker.io%2Flibrary%2Falpine%3Apull"
    );
    let (status, body) = ask(&px, "POST", "/jwt/auth", &FORM, &by_scope).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(
        w.hub_gl.attempts(),
        hub_seen,
        "the credentials reached the other upstream's token service"
    );
    // Where it was issued, it works.
    let home = format!("grant_type=refresh_token&refresh_token={refresh}&service=container_registry&scope=repository%3Ateam%2Fa%3Apull");
    let (status, body) = ask(&px, "POST", "/jwt/auth", &FORM, &home).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // On the other routes: the session is no refresh token, the refresh token no session, and
    // the session is no credential of the other upstream (nor reaches its registry).
    let as_refresh = format!("grant_type=refresh_token&refresh_token={session}&service=container_registry&scope=repository%3Ateam%2Fa%3Apull");
    let (status, _) = ask(&px, "POST", "/jwt/auth", &FORM, &as_refresh).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let refresh_bearer = format!("Bearer {refresh}");
    let (status, _) = ask(
        &px,
        "GET",
        "/v2/team/a/tags/list",
        &[("authorization", &refresh_bearer)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let bearer = format!("Bearer {session}");
    let hub_requests = w.hub.requests().len();
    let (status, body) = ask(
        &px,
        "GET",
        "/v2/docker.io/library/alpine/tags/list",
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("another upstream"), "{body}");
    assert_eq!(
        w.hub.requests().len(),
        hub_requests,
        "{:?}",
        w.hub.requests()
    );
    // regrelay's anonymous session for its injected docker.io identity, at the default
    // upstream: refused, and GitLab sees no request with it.
    let (status, body) = ask(
        &px,
        "GET",
        &format!("/jwt/auth?ns=docker.io&service=container_registry&scope={alpine}"),
        &[],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let injected = format!("Bearer {}", field(&body, "token"));
    let gl_seen = w.gl.attempts();
    let (status, body) = ask(
        &px,
        "GET",
        "/v2/team/a/tags/list",
        &[("authorization", &injected)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _) = ask(
        &px,
        "GET",
        "/jwt/auth?service=container_registry&scope=repository%3Ateam%2Fa%3Apull",
        &[("authorization", &injected)],
        "",
    )
    .await;
    // An anonymous token request (the session is dropped): GitLab grants an anonymous caller
    // nothing of a private project, and says so (jwt_controller.rb).
    assert_eq!(status, StatusCode::FORBIDDEN, "an anonymous token request");
    let seen = w.gl.seen();
    assert_eq!(w.gl.attempts(), gl_seen + 1);
    assert_eq!(
        seen.last().unwrap().auth_scheme,
        None,
        "the session reached GitLab"
    );
    assert_no_secrets(
        &px.output.settled(),
        DEPLOY_USER,
        &[DEPLOY_TOKEN.to_owned(), PAT.to_owned()],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn injection_follows_the_client_behind_a_trusted_front() {
    let w = world().await;
    let injection = format!("{}={}", w.reg.addr, w.creds.path().display());
    let registry = w.reg.url();
    let base = [
        "--registry",
        registry.as_str(),
        "--upstream-credentials",
        injection.as_str(),
        "--trusted-proxies",
        "127.0.0.1/32",
    ];
    // The default injection range (loopback) covers the front: refused at start, saying why.
    let out = std::process::Command::new(regrelay_bin())
        .arg("check-config")
        .args(base)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("--inject-through-trusted-proxies"),
        "{}",
        text(&out)
    );
    let px = Regrelay::start(&[&base[..], &["--inject-through-trusted-proxies"]].concat());
    // Injected: the registry's answer to the deploy token (404, no tags yet); not injected: its
    // challenge to an anonymous request (401).
    let tags = "/v2/team/a/tags/list";
    let cases: [(&[(&str, &str)], StatusCode); 5] = [
        (
            &[("x-forwarded-for", "203.0.113.9")],
            StatusCode::UNAUTHORIZED,
        ),
        (
            &[("x-forwarded-for", "127.0.0.5, 203.0.113.9")],
            StatusCode::UNAUTHORIZED,
        ),
        (
            &[("x-forwarded-for", "not-an-address")],
            StatusCode::UNAUTHORIZED,
        ),
        (&[("x-forwarded-for", "127.0.0.5")], StatusCode::NOT_FOUND),
        (&[], StatusCode::NOT_FOUND),
    ];
    for (headers, want) in cases {
        let (status, body) = ask(&px, "GET", tags, headers, "").await;
        assert_eq!(status, want, "{headers:?}: {body}");
    }
    // Token requests: an outside client behind the front is asked about by GitLab as anonymous
    // (which grants it nothing of a private project), not given a session of regrelay's own
    // credentials.
    let q = "/jwt/auth?service=container_registry&scope=repository%3Ateam%2Fa%3Apull";
    let before = w.gl.attempts();
    let (status, body) = ask(&px, "GET", q, &[("x-forwarded-for", "203.0.113.9")], "").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(w.gl.attempts(), before + 1, "GitLab was asked");
    assert_eq!(w.gl.seen().last().unwrap().auth_scheme, None);
    // The front's own token request gets regrelay's anonymous session (injected pulls).
    let (status, body) = ask(&px, "GET", q, &[], "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(w.gl.attempts(), before + 1, "GitLab was not asked");
}
