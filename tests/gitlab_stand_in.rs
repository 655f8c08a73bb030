//! The GitLab-behaving token service follows shared/reference/registry-auth.md, and the real
//! registry accepts its tokens: these rules are what every auth test relies on.

mod support;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use regrelay::body;
use support::gitlab::{gitlab, Credential, GitLab, Role, TokenScope};
use support::upstream::client;

async fn service() -> GitLab {
    gitlab()
        .credential(Credential::Pat {
            user: "dev".into(),
            token: "pat-dev".into(),
            scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
        })
        .credential(Credential::Pat {
            user: "dev".into(),
            token: "pat-api-only".into(),
            scopes: vec![TokenScope::ReadApi],
        })
        .credential(Credential::Deploy {
            username: "gitlab+deploy-token-1".into(),
            token: "dt-ro".into(),
            scopes: vec![TokenScope::ReadRegistry],
            project: "g/p".into(),
        })
        .credential(Credential::Job {
            token: "job-1".into(),
            project: "g/p".into(),
            user: "dev".into(),
        })
        .credential(Credential::Password {
            user: "mfa".into(),
            password: "pw".into(),
            two_factor: true,
        })
        .project("g/p", false, &[("dev", Role::Developer)])
        .project("g/other", false, &[("dev", Role::Reporter)])
        .start()
        .await
}

async fn get(
    gl: &GitLab,
    method: &str,
    query: &str,
    basic: Option<(&str, &str)>,
) -> (StatusCode, String) {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{}?{query}", gl.realm()));
    if let Some((u, p)) = basic {
        req = req.header(
            "authorization",
            format!("Basic {}", STANDARD.encode(format!("{u}:{p}"))),
        );
    }
    let resp = client()
        .request(req.body(body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn claims(body: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let obj = v.as_object().unwrap();
    assert_eq!(
        obj.keys().collect::<Vec<_>>(),
        ["token"],
        "GitLab answers exactly {{\"token\":…}}"
    );
    let payload = obj["token"].as_str().unwrap().split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn actions(c: &serde_json::Value) -> Vec<(String, Vec<String>)> {
    c["access"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let acts = a["actions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_owned())
                .collect();
            (a["name"].as_str().unwrap().to_owned(), acts)
        })
        .collect()
}

#[tokio::test]
async fn gitlab_rules() {
    let gl = service().await;
    let svc = "service=container_registry";
    // GET only; service must match.
    assert_eq!(
        get(&gl, "POST", svc, None).await,
        (StatusCode::NOT_FOUND, String::new())
    );
    assert_eq!(
        get(&gl, "GET", "service=other", Some(("dev", "pat-dev")))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    // Anonymous login (no scope) is forbidden: the "access forbidden" of a lost header.
    let (status, body) = get(&gl, "GET", svc, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("access forbidden"));
    // Bad credentials: 401 UNAUTHORIZED.
    let (status, body) = get(&gl, "GET", svc, Some(("dev", "wrong"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("HTTP Basic: Access denied"));
    // Password with 2FA: refused. Token without registry scope: forbidden.
    assert_eq!(
        get(&gl, "GET", svc, Some(("mfa", "pw"))).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(&gl, "GET", svc, Some(("dev", "pat-api-only"))).await.0,
        StatusCode::FORBIDDEN
    );
    // PAT, any username; repeated and space-separated scopes; silent dropping of actions.
    let q = format!("{svc}&scope=repository:g/p/img:pull,push&scope=repository%3Ag%2Fother%3Apull%2Cpush+repository:g/nope:pull");
    let (status, body) = get(&gl, "GET", &q, Some(("anything", "pat-dev"))).await;
    assert_eq!(status, StatusCode::OK);
    let c = claims(&body);
    assert_eq!(c["aud"], "container_registry");
    assert_eq!(c["sub"], "dev");
    assert_eq!(c["nbf"].as_u64().unwrap() + 5, c["iat"].as_u64().unwrap());
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 300);
    assert_eq!(
        actions(&c),
        [
            ("g/p/img".into(), vec!["pull".into(), "push".into()]),
            ("g/other".into(), vec!["pull".into()]),
            ("g/nope".into(), vec![]),
        ]
    );
    // Deploy token: username must match; read-only cannot push; no `sub`.
    assert_eq!(
        get(&gl, "GET", svc, Some(("someone", "dt-ro"))).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (_, body) = get(
        &gl,
        "GET",
        &format!("{svc}&scope=repository:g/p:pull,push"),
        Some(("gitlab+deploy-token-1", "dt-ro")),
    )
    .await;
    let c = claims(&body);
    assert!(c.get("sub").is_none());
    assert_eq!(actions(&c), [("g/p".into(), vec!["pull".into()])]);
    // CI job token: push to its own project only.
    let q = format!("{svc}&scope=repository:g/p:pull,push&scope=repository:g/other:pull,push");
    let (_, body) = get(&gl, "GET", &q, Some(("gitlab-ci-token", "job-1"))).await;
    assert_eq!(
        actions(&claims(&body)),
        [
            ("g/p".into(), vec!["pull".into(), "push".into()]),
            ("g/other".into(), vec!["pull".into()])
        ]
    );
    assert_eq!(
        get(&gl, "GET", svc, Some(("not-ci", "job-1"))).await.0,
        StatusCode::UNAUTHORIZED
    );
    let kid = {
        let (_, body) = get(&gl, "GET", svc, Some(("dev", "pat-dev"))).await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let header = v["token"]
            .as_str()
            .unwrap()
            .split('.')
            .next()
            .unwrap()
            .to_owned();
        let h: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
        assert_eq!(h["alg"], "RS256");
        h["kid"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        kid.len(),
        59,
        "libtrust kid: 12 groups of 4 base32 characters: {kid}"
    );
}

#[tokio::test]
async fn the_real_registry_accepts_its_tokens_and_enforces_actions() {
    let gl = service().await;
    let reg = support::Registry::start(&gl.realm());
    let token = |body: String| {
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (_, body) = get(
        &gl,
        "GET",
        "service=container_registry&scope=repository:g/p:pull,push",
        Some(("dev", "pat-dev")),
    )
    .await;
    let push_token = token(body);
    let (_, body) = get(
        &gl,
        "GET",
        "service=container_registry&scope=repository:g/p:pull,push",
        Some(("gitlab+deploy-token-1", "dt-ro")),
    )
    .await;
    let pull_token = token(body);
    let post = |t: &str| {
        Request::post(format!("{}/v2/g/p/blobs/uploads/", reg.url()))
            .header("authorization", format!("Bearer {t}"))
            .body(body::empty())
            .unwrap()
    };
    assert_eq!(
        client().request(post(&push_token)).await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    let denied = client().request(post(&pull_token)).await.unwrap();
    assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
    let challenge = denied.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(challenge.contains("insufficient_scope"), "{challenge}");
}
