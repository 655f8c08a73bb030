//! The tokens' claims (lib/json_web_token/*.rb, the service's `authorized_token`), and the real
//! registry accepting them.

use http::{Request, StatusCode};
use support::gitlab::{gitlab, Role, TokenScope};
use TokenScope::{ReadRegistry as Read, WriteRegistry as Write};

use super::jwt::{grant, service};
use super::{decode, pat, support, Answer};
use regrelay::body;
use support::upstream::client;

/// lib/json_web_token/token.rb and rsa_token.rb, and the service's `authorized_token`,
/// `user_info_token`, `access_metadata`, `tag_deny_access_patterns` (and EE's
/// `tag_immutable_patterns`): uuid `jti`, `nbf = iat - 5`, `exp` after the configured lifetime,
/// `aud` the service, `sub` the user, `auth_type`, `meta` with project path and ids, and a
/// nested RS256 `user` JWT whose `user_info` names the holder.
#[tokio::test]
async fn claims_follow_json_web_token() {
    let gl = service().await;
    let uuid = |s: &str| {
        let parts: Vec<usize> = s.split('-').map(str::len).collect();
        parts == [8, 4, 4, 4, 12]
            && s.as_bytes()[14] == b'4'
            && s.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
    };
    let mut jtis = vec![];
    // (credentials, user_info)
    let rows = [
        (
            Some(("dev", "pat-rw")),
            serde_json::json!({"token_type": "personal_access_token", "username": "dev", "user_id": gl.user_id("dev")}),
        ),
        (
            Some(("gitlab-ci-token", "job-a")),
            serde_json::json!({"token_type": "build", "username": "dev", "user_id": gl.user_id("dev")}),
        ),
        (
            Some(("gitlab+deploy-token-1", "dt-ro")),
            serde_json::json!({"token_type": "deploy_token", "username": "gitlab+deploy-token-1", "deploy_token_id": 1}),
        ),
        (None, serde_json::Value::Null),
    ];
    for (creds, user_info) in rows {
        let a = grant(&gl, creds, &["repository:pub/lic:pull"]).await;
        let body: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        let (header, c) = decode(body["token"].as_str().unwrap());
        assert_eq!(header["alg"], "RS256");
        assert_eq!(
            header["kid"].as_str().unwrap().len(),
            59,
            "libtrust kid: {header}"
        );
        assert!(uuid(c["jti"].as_str().unwrap()), "{c}");
        jtis.push(c["jti"].clone());
        let iat = c["iat"].as_u64().unwrap();
        assert_eq!(c["nbf"].as_u64().unwrap() + 5, iat);
        assert_eq!(c["exp"].as_u64().unwrap(), iat + 300);
        assert_eq!(
            (c["aud"].as_str(), c["iss"].as_str()),
            (Some("container_registry"), Some("gitlab-issuer"))
        );
        let (user_header, user) = decode(c["user"].as_str().unwrap());
        assert_eq!(user_header["alg"], "RS256");
        assert_eq!(user["user_info"], user_info, "{c}");
        assert!(uuid(user["jti"].as_str().unwrap()));
        assert_eq!(
            user["exp"].as_u64().unwrap(),
            user["iat"].as_u64().unwrap() + 60
        );
        assert_eq!(c["access"][0]["meta"]["project_path"], "pub/lic");
        assert!(c["access"][0]["meta"]["project_id"].is_u64(), "{c}");
        assert!(c["access"][0]["meta"]["root_namespace_id"].is_u64(), "{c}");
    }
    jtis.dedup();
    assert_eq!(jtis.len(), 4, "a fresh jti each time");
    // Protected tags (a user below the rule's role) and immutable tags (EE, opt-in): only on
    // entries granting push, delete or `*`; none for deploy tokens' deny patterns.
    let rows = [
        (
            "Developer push",
            ("dev", "pw-dev"),
            "pull,push",
            serde_json::json!({"push": ["^v[0-9]+"]}),
            true,
        ),
        (
            "Developer pull",
            ("dev", "pw-dev"),
            "pull",
            serde_json::json!({}),
            false,
        ),
        (
            "Maintainer",
            ("maint", "pw-maint"),
            "pull,push,delete",
            serde_json::json!({"push": [], "delete": []}),
            true,
        ),
        (
            "admin *",
            ("root", "pw-root"),
            "*",
            serde_json::json!({"push": [], "delete": []}),
            true,
        ),
        (
            "deploy token push",
            ("gitlab+deploy-token-2", "dt-rw"),
            "push",
            serde_json::Value::Null,
            true,
        ),
    ];
    for (what, creds, actions, deny, immutable) in rows {
        let c = grant(&gl, Some(creds), &[&format!("repository:g/p:{actions}")])
            .await
            .claims();
        let meta = &c["access"][0]["meta"];
        assert_eq!(meta["tag_deny_access_patterns"], deny, "{what}: {meta}");
        let want = if immutable {
            serde_json::json!(["^release-.*"])
        } else {
            serde_json::Value::Null
        };
        assert_eq!(meta["tag_immutable_patterns"], want, "{what}: {meta}");
    }
    let plain = gitlab()
        .credential(pat("dev", "pat-rw", &[Read, Write]))
        .project("g/p", false, &[("dev", Role::Developer)])
        .lifetime(std::time::Duration::from_secs(900))
        .start()
        .await;
    let c = grant(&plain, Some(("dev", "pat-rw")), &["repository:g/p:push"])
        .await
        .claims();
    let meta = c["access"][0]["meta"].as_object().unwrap();
    let keys: Vec<&String> = meta.keys().collect();
    assert_eq!(
        keys,
        ["project_id", "project_path", "root_namespace_id"],
        "no rules, no patterns"
    );
    assert_eq!(
        c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(),
        900,
        "the lifetime"
    );
}

/// The real registry (Debian's `docker-registry`, distribution 2.8) accepts the stand-in's
/// tokens, claims and all, and enforces their actions; an administrator's catalog token lists.
#[tokio::test]
async fn the_real_registry_accepts_its_tokens_and_enforces_actions() {
    let gl = service().await;
    let reg = support::Registry::start(&gl.realm());
    let token = |a: Answer| {
        let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        v["token"].as_str().unwrap().to_owned()
    };
    let push_token =
        token(grant(&gl, Some(("dev", "pat-rw")), &["repository:g/p:pull,push"]).await);
    let pull_token = token(
        grant(
            &gl,
            Some(("gitlab+deploy-token-1", "dt-ro")),
            &["repository:g/p:pull,push"],
        )
        .await,
    );
    let catalog_token = token(grant(&gl, Some(("root", "pw-root")), &["registry:catalog:*"]).await);
    let call = |method: &str, path: &str, t: &str| {
        Request::builder()
            .method(method)
            .uri(format!("{}{path}", reg.url()))
            .header("authorization", format!("Bearer {t}"))
            .body(body::empty())
            .unwrap()
    };
    let uploads = "/v2/g/p/blobs/uploads/";
    let resp = client()
        .request(call("POST", uploads, &push_token))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let denied = client()
        .request(call("POST", uploads, &pull_token))
        .await
        .unwrap();
    assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
    let challenge = denied.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(challenge.contains("insufficient_scope"), "{challenge}");
    let resp = client()
        .request(call("GET", "/v2/_catalog", &catalog_token))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = client()
        .request(call("GET", "/v2/_catalog", &push_token))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}
