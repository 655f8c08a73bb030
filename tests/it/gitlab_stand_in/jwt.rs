//! `/jwt/auth`: config/routes.rb, app/controllers/jwt_controller.rb, lib/gitlab/auth.rb,
//! app/services/auth/container_registry_authentication_service.rb (and EE's), lib/container_registry/path.rb.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::{Method, StatusCode};
use support::gitlab::{gitlab, GitLab, Role, TokenScope, BASIC_DENIED};
use TokenScope::{Api, ReadApi, ReadRegistry as Read, ReadUser, WriteRegistry as Write};

use super::{basic, call, deploy, job, pairs, password, pat, support, Answer, Creds};

/// A username and secret.
type Login<'a> = (&'a str, &'a str);
/// Granted (name, actions) pairs.
type Granted<'a> = &'a [(&'a str, &'a [&'a str])];

pub(super) const SVC: &str = "service=container_registry";

/// One GitLab for every table: users, tokens and projects of every kind.
pub(super) async fn service() -> GitLab {
    gitlab()
        .credential(pat("dev", "pat-rw", &[Read, Write]))
        .credential(pat("dev", "pat-read", &[Read]))
        .credential(pat("dev", "pat-write", &[Write]))
        .credential(pat("dev", "pat-read-api", &[ReadApi]))
        .credential(pat("dev", "pat-read-user", &[ReadUser]))
        .credential(pat("dev", "pat-api", &[Api]))
        .credential(pat("dev", "pat-expired", &[Read, Write]))
        .credential(pat("dev", "pat-revoked", &[Read, Write]))
        .credential(pat("maint", "pat-maint-rw", &[Read, Write]))
        .credential(pat("maint", "pat-maint-api", &[Api]))
        .credential(pat("blocked", "pat-blocked", &[Api]))
        .credential(password("dev", "pw-dev", false))
        .credential(password("maint", "pw-maint", false))
        .credential(password("root", "pw-root", false))
        .credential(password("mfa", "pw-mfa", true))
        .credential(password("blocked", "pw-blocked", false))
        .credential(deploy("gitlab+deploy-token-1", "dt-ro", &[Read], "g/p"))
        .credential(deploy(
            "gitlab+deploy-token-2",
            "dt-rw",
            &[Read, Write],
            "g/p",
        ))
        .credential(deploy(
            "gitlab+deploy-token-3",
            "dt-group",
            &[Read, Write],
            "g",
        ))
        .credential(job("job-a", "g/a", "dev"))
        .project(
            "g/p",
            false,
            &[("dev", Role::Developer), ("maint", Role::Maintainer)],
        )
        .project("g/other", false, &[("dev", Role::Reporter)])
        .project("g/sub/q", false, &[("dev", Role::Developer)])
        .project("pub/lic", true, &[])
        .project("elsewhere/x", false, &[("dev", Role::Developer)])
        .project("g/a", false, &[("dev", Role::Developer)])
        .project("g/b", false, &[("dev", Role::Developer)])
        .project("g/c", false, &[("dev", Role::Developer)])
        .project("g/d", false, &[("dev", Role::Developer)])
        .project("g/e", false, &[("dev", Role::Developer)])
        .project("g/f", false, &[])
        .job_token_allowlist("g/c", &["g/a"])
        .job_token_allowlist("g/d", &["g"])
        .job_token_allowlist("g/f", &["g/a"])
        .job_token_scope_disabled("g/e")
        .admin("root")
        .blocked("blocked")
        .expires("pat-expired", std::time::SystemTime::now())
        .protected_tag("g/p", "^v[0-9]+", Role::Maintainer)
        .immutable_tag("g/p", "^release-.*")
        .start()
        .await
}

/// `method /jwt/auth?query` with an `Authorization` header, if any.
pub(super) async fn ask(
    gl: &GitLab,
    method: &str,
    query: &str,
    authorization: Option<&str>,
) -> Answer {
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    call(method, &format!("{}?{query}", gl.realm()), authorization).await
}

/// A GET for `scopes` (each a `scope=` parameter) as `user:secret` (or anonymous).
pub(super) async fn grant(gl: &GitLab, creds: Creds<'_>, scopes: &[&str]) -> Answer {
    let mut q = SVC.to_owned();
    for s in scopes {
        q.push_str(&format!("&scope={s}"));
    }
    let auth = creds.map(|(u, p)| basic(u, p));
    ask(gl, "GET", &q, auth.as_deref()).await
}

/// `{"errors":[{"code":"DENIED","message":"access forbidden"}],"http_status":403}`: the
/// service's error as `JwtController` renders its result hash.
fn forbidden() -> String {
    r#"{"errors":[{"code":"DENIED","message":"access forbidden"}],"http_status":403}"#.into()
}

/// config/routes.rb (`get 'jwt/auth'`) and app/controllers/jwt_controller.rb (`auth`,
/// `auth_params`, `scopes_param`): GET only, `service` picks the service (the last one counts),
/// `scope` repeats and splits on whitespace, other parameters are ignored, a scope without
/// actions is an exception.
#[tokio::test]
async fn routes_and_query_follow_jwt_controller() {
    let gl = service().await;
    let rw = basic("dev", "pat-rw");
    let p = "repository:g/p:pull";
    let o = "repository:g/other:pull";
    // (what, method, query, status, granted names when 200)
    let rows: &[(&str, &str, String, u16, &[&str])] = &[
        (
            "POST is not routed",
            "POST",
            format!("{SVC}&scope={p}"),
            404,
            &[],
        ),
        (
            "PUT is not routed",
            "PUT",
            format!("{SVC}&scope={p}"),
            404,
            &[],
        ),
        ("no service", "GET", format!("scope={p}"), 404, &[]),
        (
            "an unknown service",
            "GET",
            format!("service=other&scope={p}"),
            404,
            &[],
        ),
        (
            "the last service counts",
            "GET",
            format!("service=other&{SVC}&scope={p}"),
            200,
            &["g/p"],
        ),
        (
            "repeated scopes",
            "GET",
            format!("{SVC}&scope={p}&scope={o}"),
            200,
            &["g/p", "g/other"],
        ),
        (
            "space-separated scopes",
            "GET",
            format!("{SVC}&scope={p}%20{o}"),
            200,
            &["g/p", "g/other"],
        ),
        (
            "'+' is a space",
            "GET",
            format!("{SVC}&scope={p}+{o}"),
            200,
            &["g/p", "g/other"],
        ),
        (
            "a blank last scope: no scopes",
            "GET",
            format!("{SVC}&scope={p}&scope=+"),
            200,
            &[],
        ),
        (
            "offline_token, client_id, account ignored",
            "GET",
            format!("{SVC}&scope={p}&offline_token=true&client_id=docker&account=who"),
            200,
            &["g/p"],
        ),
        (
            "a scope without actions raises",
            "GET",
            format!("{SVC}&scope=repository:g/p"),
            500,
            &[],
        ),
    ];
    for (what, method, query, status, names) in rows {
        let a = ask(&gl, method, query, Some(&rw)).await;
        assert_eq!(a.status.as_u16(), *status, "{what}: {a:?}");
        if *status == 200 {
            let got: Vec<String> = a.access().into_iter().map(|(n, _)| n).collect();
            assert_eq!(got, *names, "{what}");
        } else if *status == 404 {
            assert_eq!(a.body, "", "{what}: an empty 404");
        } else {
            assert_eq!(a.content_type(), Some("text/html; charset=utf-8"), "{what}");
        }
    }
    // Authentication comes before the service: bad credentials are a 401 even for an unknown one.
    let a = ask(&gl, "GET", "service=other", Some(&basic("dev", "wrong"))).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{a:?}");
}

/// app/controllers/jwt_controller.rb (`authenticate_with_http_basic`, `render_access_denied`)
/// and lib/gitlab/auth.rb (`find_for_git_client` and its checks): Basic only, and one 401 for
/// every refused login (wrong password, 2FA password, blocked user, expired or revoked token,
/// a deploy token's or job token's wrong username).
#[tokio::test]
async fn credentials_follow_gitlab_auth() {
    let gl = service().await;
    gl.revoke("pat-revoked");
    let denied = format!(
        "{BASIC_DENIED} See http://{}/help/user/profile/account/two_factor_authentication_troubleshooting.md#error-http-basic-access-denied-if-a-password-was-provided-for-git-authentication-",
        gl.addr
    );
    let refused = [
        ("wrong password", basic("dev", "wrong")),
        ("2FA user's password", basic("mfa", "pw-mfa")),
        ("blocked user's password", basic("blocked", "pw-blocked")),
        ("blocked user's PAT", basic("blocked", "pat-blocked")),
        ("expired PAT", basic("dev", "pat-expired")),
        ("revoked PAT", basic("dev", "pat-revoked")),
        ("deploy token, wrong username", basic("someone", "dt-ro")),
        ("job token, not gitlab-ci-token", basic("dev", "job-a")),
        ("empty password", basic("dev", "")),
    ];
    for (what, auth) in &refused {
        let a = ask(
            &gl,
            "GET",
            &format!("{SVC}&scope=repository:g/p:pull"),
            Some(auth),
        )
        .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{what}: {a:?}");
        assert_eq!(a.content_type(), Some("application/json"), "{what}");
        let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        let want = serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": denied}]});
        assert_eq!(v, want, "{what}");
    }
    // Not Basic, or no `login:password` in it: anonymous (a public pull works, a private one
    // is refused as for anyone without credentials).
    let anonymous = [
        ("Bearer", "Bearer pat-rw".to_owned()),
        (
            "Basic without a colon",
            format!("Basic {}", STANDARD.encode("pat-rw")),
        ),
        ("Basic that is not base64", "Basic !!!".to_owned()),
    ];
    for (what, auth) in &anonymous {
        let q = format!("{SVC}&scope=repository:pub/lic:pull");
        let c = ask(&gl, "GET", &q, Some(auth)).await.claims();
        assert_eq!(c["auth_type"], "none", "{what}");
        assert!(c.get("sub").is_none(), "{what}");
        let q = format!("{SVC}&scope=repository:g/p:pull");
        assert_eq!(
            ask(&gl, "GET", &q, Some(auth)).await.body,
            forbidden(),
            "{what}"
        );
    }
    // Accepted: who the token names and how (a PAT works with any username).
    let accepted = [
        (
            basic("anything", "pat-rw"),
            Some("dev"),
            "personal_access_token",
        ),
        (basic("dev", "pw-dev"), Some("dev"), "gitlab_or_ldap"),
        (
            basic("gitlab+deploy-token-1", "dt-ro"),
            None,
            "deploy_token",
        ),
        (basic("gitlab-ci-token", "job-a"), Some("dev"), "build"),
    ];
    for (auth, sub, auth_type) in &accepted {
        let c = ask(&gl, "GET", SVC, Some(auth)).await.claims();
        assert_eq!(c["sub"].as_str(), *sub, "{auth_type}");
        assert_eq!(c["auth_type"], *auth_type);
    }
}

/// app/services/auth/container_registry_authentication_service.rb (`execute`, `scopes`,
/// `process_scope`, `process_registry_access`, `process_repository_access`) and
/// lib/container_registry/path.rb: anonymous callers pull public projects and get 403 when
/// nothing is granted; refused scopes are left out of `access` (not an empty action list);
/// `registry:catalog:*` is for administrators; names are downcased and must be valid paths at
/// most two levels below a project.
#[tokio::test]
async fn grants_follow_container_registry_authentication_service() {
    let gl = service().await;
    let dev = Some(("dev", "pat-rw"));
    let root = Some(("root", "pw-root"));
    // (what, credentials, scopes, granted) — None: 403 access forbidden.
    let rows: &[(&str, Creds, &[&str], Option<Granted>)] = &[
        ("anonymous, no scope", None, &[], None),
        (
            "anonymous, public pull",
            None,
            &["repository:pub/lic:pull,push"],
            Some(&[("pub/lic", &["pull"])]),
        ),
        (
            "anonymous, private pull",
            None,
            &["repository:g/p:pull"],
            None,
        ),
        (
            "anonymous, public push only",
            None,
            &["repository:pub/lic:push"],
            None,
        ),
        ("user, no scope", dev, &[], Some(&[])),
        (
            "user, only refused scopes",
            dev,
            &["repository:g/f:pull", "repository:nope/x:pull"],
            Some(&[]),
        ),
        (
            "refused entries are left out",
            dev,
            &[
                "repository:g/p/img:pull,push",
                "repository:g/f:pull",
                "repository:g/other:pull,push",
            ],
            Some(&[("g/p/img", &["pull", "push"]), ("g/other", &["pull"])]),
        ),
        (
            "names are downcased",
            dev,
            &["repository:G/P/Img:pull"],
            Some(&[("g/p/img", &["pull"])]),
        ),
        (
            "two levels below the project",
            dev,
            &["repository:g/p/a/b:pull"],
            Some(&[("g/p/a/b", &["pull"])]),
        ),
        (
            "three levels below: no project",
            dev,
            &["repository:g/p/a/b/c:pull"],
            Some(&[]),
        ),
        (
            "a one-component name is invalid",
            dev,
            &["repository:alpine:pull"],
            Some(&[]),
        ),
        (
            "an invalid name",
            dev,
            &["repository:g/p/-x:pull"],
            Some(&[]),
        ),
        (
            "an unknown action",
            dev,
            &["repository:g/p:pull,frob"],
            Some(&[("g/p", &["pull"])]),
        ),
        (
            "an unknown resource type",
            dev,
            &["repository(plugin):g/p:pull"],
            Some(&[]),
        ),
        (
            "registry:catalog:* for a user",
            dev,
            &["registry:catalog:*"],
            Some(&[]),
        ),
        (
            "registry:catalog:* for an admin",
            root,
            &["registry:catalog:*"],
            Some(&[("catalog", &["*"])]),
        ),
        (
            "registry:catalog:pull for an admin",
            root,
            &["registry:catalog:pull"],
            Some(&[]),
        ),
        (
            "an admin anywhere",
            root,
            &["repository:g/f:pull,push,delete,*"],
            Some(&[("g/f", &["pull", "push", "delete", "*"])]),
        ),
    ];
    for (what, creds, scopes, want) in rows {
        let a = grant(&gl, *creds, scopes).await;
        match want {
            None => {
                assert_eq!(a.status, StatusCode::FORBIDDEN, "{what}: {a:?}");
                assert_eq!(a.body, forbidden(), "{what}");
            }
            Some(want) => assert_eq!(a.access(), pairs(want), "{what}"),
        }
    }
}

/// container_registry_authentication_service.rb (`can_access?`, `user_can_admin?`,
/// `build_can_delete?`) and lib/gitlab/auth.rb (`abilities_for_scopes`,
/// `full_authentication_abilities`): `delete` is for the job's own project or `user_can_admin?`
/// (an `api` token or a password, and Maintainer), `*` for `user_can_admin?` only; `read_api`
/// pulls, `read_user` has no registry ability at all.
#[tokio::test]
async fn actions_follow_abilities() {
    let gl = service().await;
    let all = "repository:g/p:pull,push,delete,*";
    let rows: &[(&str, Login, Option<&[&str]>)] = &[
        (
            "Maintainer, password",
            ("maint", "pw-maint"),
            Some(&["pull", "push", "delete", "*"]),
        ),
        (
            "Maintainer, api PAT",
            ("maint", "pat-maint-api"),
            Some(&["pull", "push", "delete", "*"]),
        ),
        (
            "Maintainer, read+write PAT",
            ("maint", "pat-maint-rw"),
            Some(&["pull", "push"]),
        ),
        (
            "Developer, password",
            ("dev", "pw-dev"),
            Some(&["pull", "push"]),
        ),
        (
            "Developer, api PAT",
            ("dev", "pat-api"),
            Some(&["pull", "push"]),
        ),
        ("read_registry PAT", ("dev", "pat-read"), Some(&["pull"])),
        ("write_registry PAT", ("dev", "pat-write"), Some(&["push"])),
        ("read_api PAT", ("dev", "pat-read-api"), Some(&["pull"])),
        (
            "deploy token, read+write",
            ("gitlab+deploy-token-2", "dt-rw"),
            Some(&["pull", "push"]),
        ),
        (
            "deploy token, read",
            ("gitlab+deploy-token-1", "dt-ro"),
            Some(&["pull"]),
        ),
        (
            "read_user PAT: no registry ability",
            ("dev", "pat-read-user"),
            None,
        ),
    ];
    for (what, creds, want) in rows {
        let a = grant(&gl, Some(*creds), &[all]).await;
        match want {
            None => assert_eq!(
                (a.status, a.body),
                (StatusCode::FORBIDDEN, forbidden()),
                "{what}"
            ),
            Some(w) => assert_eq!(a.access(), pairs(&[("g/p", w)]), "{what}"),
        }
    }
    // A job token: pull, push and delete in its own project, never `*`.
    let a = grant(
        &gl,
        Some(("gitlab-ci-token", "job-a")),
        &["repository:g/a:pull,push,delete,*"],
    )
    .await;
    assert_eq!(a.access(), pairs(&[("g/a", &["pull", "push", "delete"])]));
}

/// lib/gitlab/auth.rb (`deploy_token_check`), app/models/deploy_token.rb (`has_access_to?`) and
/// the service's `deploy_token_can_pull?`/`user_can_pull?`: a project deploy token reaches its
/// project, a group deploy token every project of its group and subgroups; any read-capable
/// credential pulls public projects.
#[tokio::test]
async fn deploy_tokens_reach_their_project_or_group() {
    let gl = service().await;
    let scopes = [
        "repository:g/p:pull,push",
        "repository:g/other:pull,push",
        "repository:g/sub/q:pull,push",
        "repository:elsewhere/x:pull,push",
        "repository:pub/lic:pull,push",
    ];
    let rows: &[(&str, Login, Granted)] = &[
        (
            "project token",
            ("gitlab+deploy-token-2", "dt-rw"),
            &[("g/p", &["pull", "push"]), ("pub/lic", &["pull"])],
        ),
        (
            "group token",
            ("gitlab+deploy-token-3", "dt-group"),
            &[
                ("g/p", &["pull", "push"]),
                ("g/other", &["pull", "push"]),
                ("g/sub/q", &["pull", "push"]),
                ("pub/lic", &["pull"]),
            ],
        ),
    ];
    for (what, creds, want) in rows {
        assert_eq!(
            grant(&gl, Some(*creds), &scopes).await.access(),
            pairs(want),
            "{what}"
        );
    }
}

/// The service's `build_can_pull?`/`build_can_push?` with the CI/CD job token allowlist (on by
/// default: only the project itself is listed): a job of g/a pulls from another project only
/// when that project lists g/a or a group above it (or has the allowlist off) and the job's
/// user may read it; it pushes only to its own project.
#[tokio::test]
async fn job_tokens_follow_the_allowlist() {
    let gl = service().await;
    let rows: &[(&str, &str, &[&str])] = &[
        ("own project", "g/a", &["pull", "push", "delete"]),
        ("not listed (the default)", "g/b", &[]),
        ("listed", "g/c", &["pull"]),
        ("its group listed", "g/d", &["pull"]),
        ("allowlist off", "g/e", &["pull"]),
        ("listed, but its user may not read", "g/f", &[]),
        (
            "a public project (registry open to everyone)",
            "pub/lic",
            &["pull"],
        ),
    ];
    for (what, project, want) in rows {
        let scope = format!("repository:{project}:pull,push,delete");
        let a = grant(&gl, Some(("gitlab-ci-token", "job-a")), &[&scope]).await;
        let want = if want.is_empty() {
            vec![]
        } else {
            pairs(&[(project, want)])
        };
        assert_eq!(a.access(), want, "{what}");
    }
}

/// ee/app/services/ee/auth/container_registry_authentication_service.rb (`can_access?`): in
/// maintenance mode (opt-in) every action but `pull` is dropped, silently.
#[tokio::test]
async fn maintenance_mode_drops_all_but_pull() {
    let scope = ["repository:g/p:pull,push,delete"];
    let gl = service().await;
    let rows = [
        ("off (the default)", false, &["pull", "push", "delete"][..]),
        ("on", true, &["pull"][..]),
        ("off again", false, &["pull", "push", "delete"][..]),
    ];
    for (what, on, want) in rows {
        gl.set_maintenance_mode(on);
        let a = grant(&gl, Some(("maint", "pw-maint")), &scope).await;
        assert_eq!(a.access(), pairs(&[("g/p", want)]), "{what}");
    }
    let gl = gitlab()
        .credential(pat("dev", "pat-rw", &[Read, Write]))
        .project("g/p", false, &[("dev", Role::Developer)])
        .maintenance_mode()
        .start()
        .await;
    let a = grant(&gl, Some(("dev", "pat-rw")), &["repository:g/p:pull,push"]).await;
    assert_eq!(
        a.access(),
        pairs(&[("g/p", &["pull"])]),
        "the builder's switch"
    );
}
