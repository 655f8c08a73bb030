//! The Dependency Proxy: its token service, challenge, and who may read a group's proxy. The
//! backing registry here is an open, empty `docker-registry`: a request the proxy lets through
//! comes back as that registry's `MANIFEST_UNKNOWN`; full pulls are in dependency_proxy.rs.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{Method, StatusCode};
use support::gitlab::{gitlab, CiJob, Credential, GitLab, Role, TokenScope, DP_SERVICE};
use support::Registry;
use TokenScope::{Api, ReadRegistry as Read, WriteRegistry as Write};

use super::{basic, call, deploy, now, part, pat, support, Answer, Creds};

const GROUP: &str = "my-group";

fn member_job() -> CiJob {
    CiJob::new("job-member", "my-group/app", "erin")
}

fn outsider_job() -> CiJob {
    CiJob::new("job-outsider", "my-group/app", "oscar")
}

/// A GitLab with the Dependency Proxies of `my-group` and `top/sub`, in front of `backing`.
async fn service(backing: &Registry) -> GitLab {
    gitlab()
        .credential(pat("dora", "pat-rw", &[Read, Write]))
        .credential(pat("dora", "pat-read", &[Read]))
        .credential(pat("dora", "pat-api", &[Api]))
        .credential(pat("gina", "pat-guest", &[Read, Write]))
        .credential(pat("oscar", "pat-outsider", &[Read, Write]))
        .credential(Credential::Password {
            user: "dora".into(),
            password: "pw-dora".into(),
            two_factor: false,
        })
        .credential(deploy(
            "gitlab+deploy-token-1",
            "dt-group",
            &[Read, Write],
            GROUP,
        ))
        .credential(deploy(
            "gitlab+deploy-token-2",
            "dt-group-ro",
            &[Read],
            GROUP,
        ))
        .credential(deploy(
            "gitlab+deploy-token-3",
            "dt-project",
            &[Read, Write],
            "my-group/app",
        ))
        .credential(deploy(
            "gitlab+deploy-token-4",
            "dt-top",
            &[Read, Write],
            "top",
        ))
        .credential(member_job().credential())
        .credential(outsider_job().credential())
        .project(
            "my-group/app",
            false,
            &[("erin", Role::Developer), ("oscar", Role::Developer)],
        )
        .dependency_proxy(
            GROUP,
            &[
                ("dora", Role::Reporter),
                ("gina", Role::Guest),
                ("erin", Role::Guest),
            ],
            backing.addr,
        )
        .dependency_proxy("top/sub", &[], backing.addr)
        .start()
        .await
}

/// A DP token request as `user:secret` (or anonymous).
async fn dp_token(gl: &GitLab, creds: Option<(&str, &str)>) -> Answer {
    let url = format!(
        "{}?service={DP_SERVICE}&scope=repository:{GROUP}/dependency_proxy/containers/library/alpine:pull",
        gl.realm()
    );
    let auth = creds.map(|(u, p)| basic(u, p));
    call(Method::GET, &url, auth.as_deref()).await
}

/// app/services/auth/dependency_proxy_authentication_service.rb, app/models/deploy_token.rb
/// (`valid_for_dependency_proxy?`), app/services/base_service_utility.rb (`error`) and
/// lib/json_web_token/hmac_token.rb: anonymous callers, credentials that cannot both read and
/// write the registry, and deploy tokens other than group tokens with both registry scopes get
/// `403 {"message":"access forbidden","status":"error","http_status":403}`; a refused login is
/// `JwtController`'s 401; the others an HS256 token naming the user id (and the raw access
/// token) or the raw deploy token.
#[tokio::test]
async fn dp_tokens_follow_dependency_proxy_authentication_service() {
    let backing = Registry::start_open();
    let gl = service(&backing).await;
    let forbidden = r#"{"message":"access forbidden","status":"error","http_status":403}"#;
    // (what, credentials, claim keys besides jti/iat/nbf/exp; None: 403)
    let rows: &[(&str, Creds, Option<&[&str]>)] = &[
        ("anonymous", None, None),
        ("read_registry PAT", Some(("dora", "pat-read")), None),
        (
            "read+write PAT",
            Some(("dora", "pat-rw")),
            Some(&["personal_access_token", "user_id"]),
        ),
        (
            "api PAT",
            Some(("dora", "pat-api")),
            Some(&["personal_access_token", "user_id"]),
        ),
        (
            "a non-member's PAT (checked on use)",
            Some(("oscar", "pat-outsider")),
            Some(&["personal_access_token", "user_id"]),
        ),
        ("password", Some(("dora", "pw-dora")), Some(&["user_id"])),
        (
            "CI job",
            Some(("gitlab-ci-token", "job-member")),
            Some(&["user_id"]),
        ),
        (
            "group deploy token, read+write",
            Some(("gitlab+deploy-token-1", "dt-group")),
            Some(&["deploy_token"]),
        ),
        (
            "group deploy token, read only",
            Some(("gitlab+deploy-token-2", "dt-group-ro")),
            None,
        ),
        (
            "project deploy token",
            Some(("gitlab+deploy-token-3", "dt-project")),
            None,
        ),
    ];
    for (what, creds, keys) in rows {
        let a = dp_token(&gl, *creds).await;
        let Some(keys) = keys else {
            assert_eq!(a.status, StatusCode::FORBIDDEN, "{what}: {a:?}");
            assert_eq!(a.body, forbidden, "{what}");
            assert_eq!(a.headers["content-type"], "application/json", "{what}");
            continue;
        };
        let t = a.token();
        assert_eq!(
            part(&t, 0),
            serde_json::json!({"typ": "JWT", "alg": "HS256"}),
            "{what}"
        );
        let c = part(&t, 1);
        let mut want: Vec<&str> = keys.to_vec();
        want.extend(["exp", "iat", "jti", "nbf"]);
        want.sort();
        let got: Vec<&str> = c.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(got, want, "{what}: no aud, iss or sub");
        let iat = c["iat"].as_u64().unwrap();
        assert_eq!(
            (c["nbf"].as_u64().unwrap(), c["exp"].as_u64().unwrap()),
            (iat - 5, iat + 300),
            "{what}"
        );
    }
    let job = part(
        &dp_token(&gl, Some(("gitlab-ci-token", "job-member")))
            .await
            .token(),
        1,
    );
    assert_eq!(
        job["user_id"].as_u64(),
        gl.user_id("erin"),
        "a job's token names its user"
    );
    let dt = part(
        &dp_token(&gl, Some(("gitlab+deploy-token-1", "dt-group")))
            .await
            .token(),
        1,
    );
    assert_eq!(dt["deploy_token"], "dt-group");
    let a = dp_token(&gl, Some(("dora", "wrong"))).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(
        a.body.starts_with(
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"HTTP Basic: Access denied."#
        ),
        "{a:?}"
    );
}

/// app/controllers/groups/dependency_proxy/application_controller.rb
/// (`authenticate_user_from_jwt_token!`, `request_bearer_token!`),
/// app/models/dependency_proxy/registry.rb (`authenticate_header`),
/// app/controllers/groups/dependency_proxy_auth_controller.rb and
/// lib/json_web_token/hmac_token.rb (`LEEWAY = 60`): without a valid token, `401` with an empty
/// `text/plain` body and a challenge naming the realm and service only (no `scope`, never
/// `error=`); with one, `/v2/` is an empty `200`.
#[tokio::test]
async fn the_dp_challenge_follows_dependency_proxy_auth() {
    let backing = Registry::start_open();
    let gl = service(&backing).await;
    let base = format!("http://{}", gl.addr);
    let manifest =
        format!("{base}/v2/{GROUP}/dependency_proxy/containers/library/alpine/manifests/3");
    let challenge = format!(
        "Bearer realm=\"{}\",service=\"dependency_proxy\"",
        gl.realm()
    );
    let good = dp_token(&gl, Some(("dora", "pat-rw"))).await.token();
    let c = part(&good, 1);
    let at = |exp_ago: u64| {
        let mut c = c.clone();
        let t = now() - exp_ago;
        c["exp"] = t.into();
        c["iat"] = (t - 300).into();
        c["nbf"] = (t - 305).into();
        gl.sign_dp(&c)
    };
    let registry_url = format!("{}?service=container_registry", gl.realm());
    let registry_token = call(Method::GET, &registry_url, Some(&basic("dora", "pat-rw")))
        .await
        .token();
    let mut forged: Vec<String> = good.split('.').map(str::to_owned).collect();
    let mut claims = c.clone();
    claims["user_id"] = gl.user_id("gina").into();
    forged[1] = URL_SAFE_NO_PAD.encode(claims.to_string());
    let forged = forged.join(".");
    // (what, Authorization, accepted)
    let rows: &[(&str, Option<String>, bool)] = &[
        ("no token", None, false),
        ("Basic credentials", Some(basic("dora", "pat-rw")), false),
        ("not a JWT", Some("Bearer nonsense".into()), false),
        (
            "a registry token",
            Some(format!("Bearer {registry_token}")),
            false,
        ),
        ("forged claims", Some(format!("Bearer {forged}")), false),
        (
            "expired 61 s ago",
            Some(format!("Bearer {}", at(61))),
            false,
        ),
        (
            "expired 30 s ago (leeway)",
            Some(format!("Bearer {}", at(30))),
            true,
        ),
        ("valid", Some(format!("Bearer {good}")), true),
    ];
    for (what, auth, accepted) in rows {
        for url in [format!("{base}/v2/"), manifest.clone()] {
            let a = call(Method::GET, &url, auth.as_deref()).await;
            if !accepted {
                assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{what} {url}: {a:?}");
                assert_eq!(a.headers["www-authenticate"], challenge.as_str(), "{what}");
                assert_eq!(
                    a.headers["content-type"], "text/plain; charset=utf-8",
                    "{what}"
                );
                assert_eq!(a.body, "", "{what}");
            } else if url.ends_with("/v2/") {
                assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, ""), "{what}");
                assert_eq!(
                    a.headers["content-type"], "text/plain; charset=utf-8",
                    "{what}"
                );
            } else {
                assert_eq!(a.status, StatusCode::NOT_FOUND, "{what}: {a:?}");
                assert!(
                    a.body.contains("MANIFEST_UNKNOWN"),
                    "{what}: reached the backing registry: {a:?}"
                );
            }
        }
    }
}

/// app/controllers/concerns/dependency_proxy/group_access.rb (`authorize_read_dependency_proxy!`
/// with `access_denied!`), the group policy's `read_dependency_proxy`, and
/// config/routes/group.rb (`GET` manifests and blobs only): a member (any role), a group deploy
/// token of the group or a group above it, and a CI job whose user is a member read the proxy;
/// anyone else, an unknown group, another method get an empty `404`.
#[tokio::test]
async fn who_reads_a_group_dp_follows_group_access() {
    let backing = Registry::start_open();
    let gl = service(&backing).await;
    let base = format!("http://{}", gl.addr);
    let manifest = |group: &str| {
        format!("{base}/v2/{group}/dependency_proxy/containers/library/alpine/manifests/3")
    };
    let bearer = |creds: (&'static str, &'static str)| {
        let gl = &gl;
        async move { format!("Bearer {}", dp_token(gl, Some(creds)).await.token()) }
    };
    let mut ghost = part(&dp_token(&gl, Some(("dora", "pw-dora"))).await.token(), 1);
    ghost["user_id"] = 999.into();
    let ghost = format!("Bearer {}", gl.sign_dp(&ghost));
    // (what, Authorization, method, group, reaches the backing registry)
    let rows: Vec<(&str, String, Method, &str, bool)> = vec![
        (
            "Reporter",
            bearer(("dora", "pat-rw")).await,
            Method::GET,
            GROUP,
            true,
        ),
        (
            "Guest",
            bearer(("gina", "pat-guest")).await,
            Method::GET,
            GROUP,
            true,
        ),
        (
            "HEAD",
            bearer(("dora", "pat-rw")).await,
            Method::HEAD,
            GROUP,
            true,
        ),
        (
            "non-member",
            bearer(("oscar", "pat-outsider")).await,
            Method::GET,
            GROUP,
            false,
        ),
        (
            "group deploy token",
            bearer(("gitlab+deploy-token-1", "dt-group")).await,
            Method::GET,
            GROUP,
            true,
        ),
        (
            "parent group's deploy token",
            bearer(("gitlab+deploy-token-4", "dt-top")).await,
            Method::GET,
            "top/sub",
            true,
        ),
        (
            "another group's deploy token",
            bearer(("gitlab+deploy-token-4", "dt-top")).await,
            Method::GET,
            GROUP,
            false,
        ),
        (
            "CI job, member user",
            bearer(("gitlab-ci-token", "job-member")).await,
            Method::GET,
            GROUP,
            true,
        ),
        (
            "CI job, non-member user",
            bearer(("gitlab-ci-token", "job-outsider")).await,
            Method::GET,
            GROUP,
            false,
        ),
        ("unknown user id", ghost, Method::GET, GROUP, false),
        (
            "unknown group",
            bearer(("dora", "pat-rw")).await,
            Method::GET,
            "nope",
            false,
        ),
        (
            "PUT",
            bearer(("dora", "pat-rw")).await,
            Method::PUT,
            GROUP,
            false,
        ),
        (
            "DELETE",
            bearer(("dora", "pat-rw")).await,
            Method::DELETE,
            GROUP,
            false,
        ),
    ];
    for (what, auth, method, group, reaches) in rows {
        let head = method == Method::HEAD;
        let a = call(method, &manifest(group), Some(&auth)).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{what}: {a:?}");
        if reaches {
            let from_backing = head || a.body.contains("MANIFEST_UNKNOWN");
            assert!(from_backing, "{what}: reached the backing registry: {a:?}");
            assert!(
                a.headers.contains_key("docker-distribution-api-version"),
                "{what}"
            );
        } else {
            assert_eq!(a.body, "", "{what}: GitLab's empty 404");
            assert!(
                !a.headers.contains_key("docker-distribution-api-version"),
                "{what}"
            );
        }
    }
    // A revoked deploy token's DP tokens stop working: its holder is looked up on each request.
    let dt = bearer(("gitlab+deploy-token-1", "dt-group")).await;
    gl.revoke("dt-group");
    let a = call(Method::GET, &manifest(GROUP), Some(&dt)).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{a:?}");
    // Who each request was for, as the stand-in recorded it.
    let identities: Vec<Option<String>> =
        gl.dp_requests().into_iter().map(|r| r.identity).collect();
    assert!(
        identities.contains(&Some("job:my-group/app:erin".into())),
        "{identities:?}"
    );
    assert!(
        identities.contains(&Some("deploy:gitlab+deploy-token-1".into())),
        "{identities:?}"
    );
}
