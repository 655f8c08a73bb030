//! The login's refusals, and GitLab's limits on clients: wrong or expired tokens, a token
//! without any registry ability (told apart from a front that strips `Authorization` with the
//! job's own CI_JOB_TOKEN, never a made-up login), fronts that redirect or strip, GitLab's
//! failed-login IP ban, Rack::Attack's 429, the Dependency Proxy's scopes; a password that is an
//! ordinary word, which leaves doctor's words (and GitLab's) as they are.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn wrong_token_or_deploy_token_username_is_bad_credentials() {
    const DEPLOY: &str = "gldt-Fz8kQw3RnV6yTm2LpX5c";
    let gl = gitlab()
        .credential(pat(USER, PAT))
        .credential(Credential::Deploy {
            username: "gitlab+deploy-token-7".into(),
            token: DEPLOY.into(),
            scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
            project: PROJECT.into(),
        })
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let host = reg.addr.to_string();
    // A wrong token.
    let run = doctor(&ci_env(&host, USER, "not-the-password"), &[]).await;
    run.expect(1, "credentials", &["bad_credentials"]);
    assert!(
        run.says("bad_credentials")
            .contains("HTTP Basic: Access denied"),
        "GitLab's own words: {}",
        run.text
    );
    // A deploy token sent with the user's name instead of its own (via DOCKER_AUTH_CONFIG).
    let auth_config = serde_json::json!({
        "auths": { &host: { "auth": STANDARD.encode(format!("{USER}:{DEPLOY}")) } }
    })
    .to_string();
    let env = [
        ("CI_REGISTRY", host.as_str()),
        ("CI_PROJECT_PATH", PROJECT),
        ("DOCKER_AUTH_CONFIG", auth_config.as_str()),
    ];
    let run = doctor(&env, &[]).await;
    run.expect(1, "credentials", &["bad_credentials"]);
    let says = run.says("bad_credentials");
    assert!(
        says.contains("deploy token") && says.contains("own username"),
        "{says}"
    );
    assert!(
        says.contains("DOCKER_AUTH_CONFIG"),
        "names the source: {says}"
    );
    // The same deploy token with its own username works.
    let auth_config = serde_json::json!({
        "auths": { format!("http://{host}"): {
            "username": "gitlab+deploy-token-7", "password": DEPLOY,
        } }
    })
    .to_string();
    let env = [
        ("CI_REGISTRY", host.as_str()),
        ("CI_PROJECT_PATH", PROJECT),
        ("DOCKER_AUTH_CONFIG", auth_config.as_str()),
    ];
    let run = doctor(&env, &[]).await;
    run.expect(0, "ok", &[]);
    run.assert_secret_free(
        &[USER, "gitlab+deploy-token-7"],
        &secrets(&gl, &[PAT, DEPLOY, "not-the-password"]),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_pat_is_bad_credentials_with_an_expiry_hint() {
    let gl = gitlab()
        .credential(pat(USER, PAT))
        .expires(PAT, SystemTime::now() - Duration::from_secs(86_400))
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let host = reg.addr.to_string();
    let run = doctor(&ci_env(&host, USER, PAT), &[]).await;
    run.expect(1, "credentials", &["bad_credentials"]);
    let says = run.says("bad_credentials");
    // GitLab's message says "incorrect, expired, or improperly scoped"; doctor adds the hint
    // for a glpat- token, and does not claim to know which it is.
    assert!(says.contains("expired"), "{says}");
    assert!(says.contains("expiry date"), "{says}");
    assert!(says.contains("cannot tell"), "{says}");
    assert_eq!(gl.mints(), 0);
    run.assert_secret_free(&[USER], &secrets(&gl, &[PAT]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_without_registry_scopes_is_missing_scope_without_a_made_up_login() {
    const NO_REGISTRY: &str = "glpat-ApiOnly4Tn8QwZ2xRk6M";
    let job = CiJob::new("glcbt-Mk3QwT8zVn5RxL2pJc7H", PROJECT, USER);
    // read_user: no registry ability at all (read_api would pull: GitLab's read-only abilities
    // include reading images).
    let gl = with_ip_ban(gitlab())
        .credential(Credential::Pat {
            user: USER.into(),
            token: NO_REGISTRY.into(),
            scopes: vec![TokenScope::ReadUser],
        })
        .credential(job.credential())
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let host = reg.addr.to_string();
    // In a job: GitLab answers the login 403 "access forbidden"; the job's own CI_JOB_TOKEN
    // (never answered 403, never counted by the ban) gets through: the scope is missing.
    let mut env = ci_env(&host, USER, NO_REGISTRY);
    env.push(("CI_JOB_TOKEN", job.token.as_str()));
    let run = doctor(&env, &[]).await;
    run.expect(1, "credentials", &["missing_scope"]);
    let says = run.says("missing_scope");
    assert!(
        says.contains("read_registry") && says.contains("write_registry"),
        "{says}"
    );
    assert!(says.contains("CI_JOB_TOKEN gets through"), "{says}");
    assert!(
        !says.contains("only read_api"),
        "read_api pulls, it is no example of a token without registry scope: {says}"
    );
    assert!(gl.seen().iter().any(|s| s.status == 403));
    // Outside a job (no CI_JOB_TOKEN): both causes, honestly.
    let run = doctor(&ci_env(&host, USER, NO_REGISTRY), &[]).await;
    run.expect(1, "credentials", &["login_forbidden"]);
    let says = run.says("login_forbidden");
    assert!(
        says.contains("no registry ability") && says.contains("removes the Authorization"),
        "{says}"
    );
    // Not one made-up credential reached GitLab, so the ban counted nothing from here.
    assert_no_failed_login(&gl);
    run.assert_secret_free(&[USER], &secrets(&gl, &[NO_REGISTRY, &job.token]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_front_that_redirects_the_token_endpoint_is_auth_redirect() {
    let gl = gitlab()
        .credential(pat(USER, PAT))
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .start()
        .await;
    let (front, _reg) = front(&gl, "return 307 http://GITLAB$request_uri;");
    let host = front.addr.to_string();
    let run = doctor(&ci_env(&host, USER, PAT), &[]).await;
    run.expect(2, "network", &["auth_redirect"]);
    let says = run.says("auth_redirect");
    assert!(
        says.contains(&format!("http://{}", front.addr))
            && says.contains(&format!("http://{}", gl.addr)),
        "names both hosts: {says}"
    );
    assert!(says.contains("drop Authorization"), "{says}");
    // The credentials themselves were checked at the redirect's target: nothing else is wrong.
    assert!(
        run.json["checks"].as_array().unwrap().iter().any(|c| c
            .as_str()
            .unwrap()
            .contains("pull and push on group/app granted")),
        "{}",
        run.text
    );
    run.assert_secret_free(&[USER], &secrets(&gl, &[PAT]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_front_that_strips_authorization_is_authorization_stripped() {
    let job = CiJob::new("glcbt-St7RpQ2wXn9KvL4mZc8B", PROJECT, USER);
    let gl = with_ip_ban(gitlab())
        .credential(pat(USER, PAT))
        .credential(job.credential())
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .start()
        .await;
    let (front, _reg) = front(
        &gl,
        "proxy_pass http://GITLAB; proxy_set_header Authorization \"\";",
    );
    let host = front.addr.to_string();
    // A PAT in a job: the job's own CI_JOB_TOKEN gets 403 through the front too.
    let mut env = ci_env(&host, USER, PAT);
    env.push(("CI_JOB_TOKEN", job.token.as_str()));
    let run = doctor(&env, &[]).await;
    run.expect(2, "network", &["authorization_stripped"]);
    let says = run.says("authorization_stripped");
    assert!(
        says.contains("CI_JOB_TOKEN") && says.contains("removes it"),
        "{says}"
    );
    // The job token as the login itself: GitLab never answers it 403.
    let mut env = ci_env(&host, "gitlab-ci-token", &job.token);
    env.push(("CI_JOB_TOKEN", job.token.as_str()));
    let run = doctor(&env, &[]).await;
    run.expect(2, "network", &["authorization_stripped"]);
    assert!(
        run.says("authorization_stripped")
            .contains("never answers a CI job token 403"),
        "{}",
        run.text
    );
    run.assert_secret_free(&["gitlab-ci-token"], &secrets(&gl, &[&job.token]));
    // No job token to compare with: both causes.
    let run = doctor(&ci_env(&host, USER, PAT), &[]).await;
    run.expect(1, "credentials", &["login_forbidden"]);
    assert!(
        gl.seen().iter().all(|s| s.auth_scheme.is_none()),
        "GitLab never saw the header"
    );
    // The same credentials work when the header gets through.
    let reg = Registry::start(&gl.realm());
    let direct = reg.addr.to_string();
    doctor(&ci_env(&direct, USER, PAT), &[])
        .await
        .expect(0, "ok", &[]);
    assert_no_failed_login(&gl);
    run.assert_secret_free(
        &[USER, "gitlab-ci-token"],
        &secrets(&gl, &[PAT, &job.token]),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gitlabs_failed_login_ip_ban_is_ip_banned() {
    let gl = with_ip_ban(gitlab())
        .credential(pat(USER, PAT))
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let host = reg.addr.to_string();
    get_banned(&gl).await;
    assert_eq!(gl.banned_ips(), ["127.0.0.1"]);
    // Good credentials, refused all the same: the address is banned.
    let run = doctor(&ci_env(&host, USER, PAT), &[]).await;
    run.expect(2, "network", &["ip_banned"]);
    let says = run.says("ip_banned");
    for words in [
        "Too many failed authentication attempts from this IP",
        "this runner's address",
        "every job and user behind it is refused",
        "1 h",
        "gitlab_rails['trusted_proxies']",
        "revoked or expired deploy token",
    ] {
        assert!(says.contains(words), "{words}: {says}");
    }
    // Through regrelay, which serves /jwt/auth on the registry's name: GitLab sees regrelay.
    let px = Regrelay::start(&["--registry", &reg.url()]);
    let run = doctor(&ci_env(&px.addr.to_string(), USER, PAT), &[]).await;
    run.expect(2, "network", &["ip_banned"]);
    let says = run.says("ip_banned");
    assert!(
        says.contains("the proxy that serves") && says.contains("regrelay"),
        "{says}"
    );
    assert_eq!(gl.mints(), 0);
    run.assert_secret_free(&[USER], &secrets(&gl, &[PAT]));
}

#[tokio::test(flavor = "multi_thread")]
async fn rack_attacks_throttle_is_rate_limited() {
    let (gl, _reg, host) = developer().await;
    gl.fail_with(429, Some(42), "Retry later");
    let run = doctor(&ci_env(&host, USER, PAT), &[]).await;
    run.expect(2, "network", &["rate_limited"]);
    let says = run.says("rate_limited");
    assert!(
        says.contains("429 \"Retry later\"")
            && says.contains("throttle_authenticated_web")
            && says.contains("retry after 42 s"),
        "{says}"
    );
    run.assert_secret_free(&[USER], &secrets(&gl, &[PAT]));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dependency_proxy_wants_read_and_write_registry() {
    const DEPLOY: &str = "gldt-DpReadOnly3Xw7KqN2vRt";
    const READ_ONLY_PAT: &str = "glpat-DpReadOnly8Mz4TcQ6wL";
    let job = CiJob::new("glcbt-Dp4KwQ9xTn2RvM7cLz5H", "my-group/app", USER);
    let gl = gitlab()
        .credential(job.credential())
        .credential(Credential::Deploy {
            username: "gitlab+deploy-token-5".into(),
            token: DEPLOY.into(),
            scopes: vec![TokenScope::ReadRegistry],
            project: "my-group".into(),
        })
        .credential(Credential::Pat {
            user: USER.into(),
            token: READ_ONLY_PAT.into(),
            scopes: vec![TokenScope::ReadRegistry],
        })
        .dependency_proxy("my-group", &[(USER, Role::Developer)], free_addr())
        .start()
        .await;
    let server = gl.addr.to_string();
    let checks = [
        (
            "gitlab+deploy-token-5",
            DEPLOY,
            "takes only group deploy tokens with both read_registry and write_registry",
        ),
        (
            USER,
            READ_ONLY_PAT,
            "can both read and write the registry: read_registry and write_registry, or api",
        ),
    ];
    for (user, secret, words) in checks {
        let env = [
            ("CI_REGISTRY_USER", user),
            ("CI_REGISTRY_PASSWORD", secret),
            ("CI_JOB_TOKEN", job.token.as_str()),
        ];
        let run = doctor(&env, &["--registry", &server]).await;
        run.expect(1, "credentials", &["missing_scope"]);
        let says = run.says("missing_scope");
        assert!(
            says.contains("Dependency Proxy") && says.contains(words),
            "{says}"
        );
        run.assert_secret_free(&[user], &secrets(&gl, &[secret, &job.token]));
    }
    assert_no_failed_login(&gl);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_password_that_is_an_ordinary_word_leaves_doctors_words_alone() {
    const OTHER: &str = "Zq8-not-her-token-Vd3";
    let (gl, _reg, host) = developer().await;
    let (reference, runs) = tokio::task::spawn_blocking(move || {
        // One HOME for every run: the Docker config path doctor names is the same.
        let home = tempfile::tempdir().unwrap();
        let run = |password: &str| doctor_in(home.path(), &ci_env(&host, USER, password), &[]);
        // A wrong password that could be no word of doctor's: what every other run reads like.
        let reference = run(OTHER);
        // `wrong` is a word of doctor's own message, `pass` is inside GitLab's ("password")
        // and doctor's (--password-stdin), `a` is everywhere.
        let runs: Vec<(&str, Run)> = ["wrong", "pass", "a"]
            .into_iter()
            .map(|p| (p, run(p)))
            .collect();
        (reference, runs)
    })
    .await
    .unwrap();
    reference.expect(1, "credentials", &["bad_credentials"]);
    for (password, run) in runs {
        run.expect(1, "credentials", &["bad_credentials"]);
        assert!(
            run.says("bad_credentials").contains(
                "GitLab answers the same for a wrong, expired or revoked token and a wrong \
                 username"
            ),
            "doctor's words are intact with password {password:?}: {}",
            run.text
        );
        assert!(
            !run.all.contains("[redacted]"),
            "nothing was printed that needed hiding, so nothing points at {password:?}: {}",
            run.all
        );
        // The output does not depend on the password at all, so it cannot tell it.
        assert_eq!(run.text, reference.text, "password {password:?}");
        assert_eq!(run.json, reference.json, "password {password:?}");
        let pair = format!("{USER}:{password}");
        assert!(!run.all.contains(&pair) && !run.all.contains(&STANDARD.encode(&pair)));
    }
    reference.assert_secret_free(&[USER], &secrets(&gl, &[OTHER]));
}
