//! `regrelay doctor` against the GitLab stand-in, Debian's real `docker-registry`, a real nginx
//! front and a real regrelay: each diagnosis from the troubleshooting guide (seeds/
//! gitlab-ci-401-troubleshooting.txt) in a CI job's environment, its exit code, its cause id in
//! `--json`, and no secret (password, token, Basic encoding, issued JWT) in either output mode.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use support::gitlab::{gitlab, CiJob, Credential, GitLab, Role, TokenScope};
use support::nginx::{free_addr, Nginx};
use support::*;

const USER: &str = "dana";
const PAT: &str = "glpat-Hq7ZtR2wXk9LmP4sVb6N";
const PROJECT: &str = "group/app";

/// One doctor run, in both output modes.
struct Run {
    code: i32,
    json: serde_json::Value,
    text: String,
    /// stdout and stderr of both runs.
    all: String,
}

impl Run {
    /// Cause ids of the errors (not notes).
    fn errors(&self) -> Vec<String> {
        self.causes("error")
    }

    fn notes(&self) -> Vec<String> {
        self.causes("note")
    }

    fn causes(&self, severity: &str) -> Vec<String> {
        self.json["findings"]
            .as_array()
            .expect("findings")
            .iter()
            .filter(|f| f["severity"] == severity)
            .map(|f| f["cause"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The finding with `cause`.
    fn finding(&self, cause: &str) -> &serde_json::Value {
        self.json["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["cause"] == cause)
            .unwrap_or_else(|| panic!("no {cause} finding: {}", self.text))
    }

    /// `message` + `fix` of the finding with `cause`.
    fn says(&self, cause: &str) -> String {
        let f = self.finding(cause);
        format!(
            "{} / {}",
            f["message"].as_str().unwrap(),
            f["fix"].as_str().unwrap()
        )
    }

    /// Exit code, status and the error causes, exactly.
    fn expect(&self, code: i32, status: &str, errors: &[&str]) {
        assert_eq!(self.code, code, "exit code\n{}\n{}", self.text, self.json);
        assert_eq!(self.json["status"], status, "{}", self.text);
        assert_eq!(self.errors(), errors, "{}", self.text);
        assert!(
            self.text.lines().last().unwrap().starts_with("summary: "),
            "{}",
            self.text
        );
        for cause in errors {
            assert!(
                self.text
                    .lines()
                    .any(|l| l.starts_with(&format!("FAIL  {cause}: ")) && l.contains("Fix: ")),
                "one text line per finding, with its fix: {}",
                self.text
            );
        }
    }

    /// No secret, Basic encoding (with any of `users`) or issued token in any output.
    fn assert_secret_free(&self, users: &[&str], secrets: &[String]) {
        for user in users {
            assert_no_secrets(&self.all, user, secrets);
        }
        assert!(!self.all.contains("eyJ"), "a JWT reached doctor's output");
    }
}

/// Runs `regrelay doctor [--json] ARGS` with only `env` (plus HOME = `home` and PATH).
fn doctor_in(home: &Path, env: &[(&str, &str)], args: &[&str]) -> Run {
    let run = |json: bool| {
        let mut cmd = Command::new(regrelay_bin());
        cmd.arg("doctor");
        if json {
            cmd.arg("--json");
        }
        cmd.args(args)
            .env_clear()
            .env("HOME", home)
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run regrelay doctor")
    };
    let (j, t) = (run(true), run(false));
    assert_eq!(j.status.code(), t.status.code(), "both modes agree");
    let stdout = String::from_utf8_lossy(&j.stdout).into_owned();
    let json = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    Run {
        code: j.status.code().expect("exit code"),
        json,
        text: String::from_utf8_lossy(&t.stdout).into_owned(),
        all: format!("{}{}", text(&j), text(&t)),
    }
}

/// [`doctor_in`] with an empty HOME (no Docker config), off the async runtime.
async fn doctor(env: &[(&str, &str)], args: &[&str]) -> Run {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let home = tempfile::tempdir().unwrap();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        doctor_in(home.path(), &env, &args)
    })
    .await
    .unwrap()
}

/// A PAT with both registry scopes.
fn pat(user: &str, token: &str) -> Credential {
    Credential::Pat {
        user: user.into(),
        token: token.into(),
        scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
    }
}

/// `CI_REGISTRY` (host:port, no scheme, as GitLab sets it), `CI_PROJECT_PATH`, and a login.
fn ci_env<'a>(registry: &'a str, user: &'a str, password: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![
        ("CI_REGISTRY", registry),
        ("CI_PROJECT_PATH", PROJECT),
        ("CI_REGISTRY_USER", user),
        ("CI_REGISTRY_PASSWORD", password),
    ]
}

/// Every secret of a run: `plain` ones and every token the stand-in issued.
fn secrets(gl: &GitLab, plain: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = plain.iter().map(|s| s.to_string()).collect();
    all.extend(gl.issued());
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn all_good_is_exit_0() {
    let gl = gitlab()
        .credential(pat(USER, PAT))
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let host = reg.addr.to_string();
    let run = doctor(&ci_env(&host, USER, PAT), &[]).await;
    run.expect(0, "ok", &[]);
    assert!(
        run.text
            .contains("summary: ok: pull and push on group/app work"),
        "{}",
        run.text
    );
    // GitLab's usual layout (realm on another host) and the missing `docker login` are notes.
    assert_eq!(run.notes(), ["no_docker_login", "realm_on_other_host"]);
    assert!(gl.mints() >= 2, "login and project token asked");
    run.assert_secret_free(&[USER], &secrets(&gl, &[PAT]));
}

#[tokio::test(flavor = "multi_thread")]
async fn no_credentials_is_exit_1_and_names_the_credential_helper() {
    let gl = gitlab()
        .credential(pat(USER, PAT))
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let host = reg.addr.to_string();
    // Nothing at all, but a Docker config whose credentials live in a helper.
    let helper_host = host.clone();
    let run = tokio::task::spawn_blocking(move || {
        let env = [
            ("CI_REGISTRY", helper_host.as_str()),
            ("CI_PROJECT_PATH", PROJECT),
        ];
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".docker")).unwrap();
        std::fs::write(
            home.path().join(".docker/config.json"),
            r#"{"auths":{},"credsStore":"desktop"}"#,
        )
        .unwrap();
        doctor_in(home.path(), &env, &[])
    })
    .await
    .unwrap();
    run.expect(1, "credentials", &["no_credentials"]);
    assert!(
        run.says("credential_helper")
            .contains("docker-credential-desktop"),
        "{}",
        run.text
    );
    assert_eq!(gl.mints(), 0, "nothing to log in with");
    // The seed's slip: a variable that is empty in this job.
    let env = [
        ("CI_REGISTRY", host.as_str()),
        ("CI_REGISTRY_USER", USER),
        ("CI_REGISTRY_PASSWORD", ""),
    ];
    let run = doctor(&env, &[]).await;
    run.expect(1, "credentials", &["no_credentials"]);
    assert!(
        run.says("no_credentials")
            .contains("CI_REGISTRY_PASSWORD is empty"),
        "{}",
        run.text
    );
}

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
async fn a_token_without_registry_scopes_is_missing_scope() {
    const API_ONLY: &str = "glpat-ApiOnly4Tn8QwZ2xRk6M";
    const READ_ONLY: &str = "glpat-ReadOnly7Vb3NcX9pLq2";
    let gl = gitlab()
        // read_user: no registry ability at all (read_api would pull: GitLab's read-only
        // abilities include reading images).
        .credential(Credential::Pat {
            user: USER.into(),
            token: API_ONLY.into(),
            scopes: vec![TokenScope::ReadUser],
        })
        .credential(Credential::Pat {
            user: USER.into(),
            token: READ_ONLY.into(),
            scopes: vec![TokenScope::ReadRegistry],
        })
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let host = reg.addr.to_string();
    // read_user only: GitLab answers the login 403 "access forbidden"; the made-up control
    // credentials get 401, so the header does reach GitLab: the scope is missing.
    let run = doctor(&ci_env(&host, USER, API_ONLY), &[]).await;
    run.expect(1, "credentials", &["missing_scope"]);
    let says = run.says("missing_scope");
    assert!(
        says.contains("read_registry") && says.contains("write_registry"),
        "{says}"
    );
    assert!(gl.seen().iter().any(|s| s.status == 403));
    // read_registry only: push is dropped silently.
    let run = doctor(&ci_env(&host, USER, READ_ONLY), &[]).await;
    run.expect(1, "credentials", &["missing_scope"]);
    assert!(
        run.says("missing_scope").contains("write_registry"),
        "{}",
        run.text
    );
    run.assert_secret_free(&[USER], &secrets(&gl, &[API_ONLY, READ_ONLY]));
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
async fn a_job_token_on_another_project_is_job_token_not_allowed() {
    let job = CiJob::new("glcbt-Jq4WmZ8rTx2NcV6bKs3P", "group/a", USER);
    let gl = gitlab()
        .credential(job.credential())
        .project("group/a", false, &[(USER, Role::Developer)])
        .project("group/b", false, &[(USER, Role::Developer)])
        .project("group/c", false, &[(USER, Role::Developer)])
        .job_token_allowlist("group/b", &[])
        .job_token_allowlist("group/c", &["group/a"])
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let host = reg.addr.to_string();
    let mut env = vec![
        ("CI_REGISTRY", host.as_str()),
        ("CI_PROJECT_PATH", "group/a"),
        ("CI_REGISTRY_USER", "gitlab-ci-token"),
        ("CI_REGISTRY_PASSWORD", job.token.as_str()),
        ("CI_JOB_TOKEN", job.token.as_str()),
    ];
    // Its own project: fine.
    doctor(&env, &[]).await.expect(0, "ok", &[]);
    // B does not list A: pull and push dropped.
    let run = doctor(&env, &["--project", "group/b"]).await;
    run.expect(1, "credentials", &["job_token_not_allowed"]);
    let says = run.says("job_token_not_allowed");
    assert!(says.contains("pull and push"), "{says}");
    assert!(
        says.contains("add group/a to group/b's CI/CD job token allowlist"),
        "{says}"
    );
    assert!(says.contains("Job token permissions"), "{says}");
    // C lists A: pull works, push never does.
    env.push(("CI_COMMIT_REF_SLUG", "main"));
    let run = doctor(&env, &["--project", "group/c"]).await;
    run.expect(1, "credentials", &["job_token_not_allowed"]);
    let says = run.says("job_token_not_allowed");
    assert!(
        says.contains("dropped push") && says.contains("pull is allowed"),
        "{says}"
    );
    assert!(
        !says.contains("allowlist ("),
        "no allowlist fix needed: {says}"
    );
    run.assert_secret_free(&[USER, "gitlab-ci-token"], &secrets(&gl, &[&job.token]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_deploy_token_is_deploy_token_read_only() {
    const DEPLOY: &str = "gldt-Rd9QmW2xZt5NvK8cLp3B";
    let gl = gitlab()
        .credential(Credential::Deploy {
            username: "gitlab+deploy-token-3".into(),
            token: DEPLOY.into(),
            scopes: vec![TokenScope::ReadRegistry],
            project: PROJECT.into(),
        })
        .project(PROJECT, false, &[])
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let host = reg.addr.to_string();
    let run = doctor(&ci_env(&host, "gitlab+deploy-token-3", DEPLOY), &[]).await;
    run.expect(1, "credentials", &["deploy_token_read_only"]);
    let says = run.says("deploy_token_read_only");
    assert!(
        says.contains("push denied: the deploy token has no write_registry"),
        "{says}"
    );
    run.assert_secret_free(&["gitlab+deploy-token-3"], &secrets(&gl, &[DEPLOY]));
}

/// A front (nginx) that serves the registry and handles `/jwt/auth` with `jwt_location`.
fn front(gl: &GitLab, jwt_location: &str) -> (Nginx, Registry) {
    let front_addr = free_addr();
    let reg = Registry::start(&format!("http://{front_addr}/jwt/auth"));
    let front = Nginx::start(
        front_addr,
        &format!(
            "    location /jwt/auth {{ {jwt_location} }}\n\
             location / {{ proxy_pass http://{reg}; proxy_set_header Host $http_host; }}",
            reg = reg.addr
        )
        .replace("GITLAB", &gl.addr.to_string()),
    );
    (front, reg)
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
    let gl = gitlab()
        .credential(pat(USER, PAT))
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .start()
        .await;
    let (front, _reg) = front(
        &gl,
        "proxy_pass http://GITLAB; proxy_set_header Authorization \"\";",
    );
    let host = front.addr.to_string();
    let run = doctor(&ci_env(&host, USER, PAT), &[]).await;
    run.expect(2, "network", &["authorization_stripped"]);
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
    run.assert_secret_free(&[USER], &secrets(&gl, &[PAT]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disabled_registry_is_registry_disabled() {
    const API_PAT: &str = "glpat-WithApi3Kx8VmQ2nRt7Lz";
    let gl = gitlab()
        .credential(Credential::Pat {
            user: USER.into(),
            token: API_PAT.into(),
            scopes: vec![
                TokenScope::ReadRegistry,
                TokenScope::WriteRegistry,
                TokenScope::ReadApi,
            ],
        })
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .project_registry_disabled(PROJECT)
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let host = reg.addr.to_string();
    let api = format!("http://{}/api/v4", gl.addr);
    // GitLab drops every action on a project whose registry is off; its API says why.
    let mut env = ci_env(&host, USER, API_PAT);
    env.push(("CI_API_V4_URL", api.as_str()));
    let run = doctor(&env, &[]).await;
    run.expect(1, "credentials", &["registry_disabled"]);
    assert!(
        run.says("registry_disabled")
            .contains("Settings → General → Visibility"),
        "{}",
        run.text
    );
    // Without the API doctor says what it cannot tell apart.
    let run = doctor(&ci_env(&host, USER, API_PAT), &[]).await;
    run.expect(1, "credentials", &["no_access"]);
    assert!(run
        .says("no_access")
        .contains("Container Registry is disabled"));
    // Instance-wide: GitLab's 404 "registry not enabled".
    let off = gitlab()
        .credential(pat(USER, PAT))
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .registry_disabled()
        .start()
        .await;
    let reg_off = Registry::start(&off.realm());
    let host_off = reg_off.addr.to_string();
    let run = doctor(&ci_env(&host_off, USER, PAT), &[]).await;
    run.expect(1, "credentials", &["registry_disabled"]);
    assert!(run
        .says("registry_disabled")
        .contains("registry not enabled"));
    run.assert_secret_free(&[USER], &secrets(&gl, &[API_PAT, PAT]));
    run.assert_secret_free(&[USER], &off.issued());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_protected_tag_pattern_is_protected_tag() {
    let gl = gitlab()
        .credential(pat(USER, PAT))
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .protected_tag(PROJECT, "^v[0-9]+\\..*", Role::Maintainer)
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let host = reg.addr.to_string();
    let run = doctor(&ci_env(&host, USER, PAT), &["--tag", "v1.2.3"]).await;
    run.expect(1, "credentials", &["protected_tag"]);
    let says = run.says("protected_tag");
    assert!(
        says.contains("v1.2.3") && says.contains("^v[0-9]+\\..*"),
        "{says}"
    );
    // Another tag (CI_COMMIT_REF_SLUG): a note only.
    let mut env = ci_env(&host, USER, PAT);
    env.push(("CI_COMMIT_REF_SLUG", "main"));
    let run = doctor(&env, &[]).await;
    run.expect(0, "ok", &[]);
    assert!(
        run.notes().contains(&"protected_tag".to_owned()),
        "{}",
        run.text
    );
    run.assert_secret_free(&[USER], &secrets(&gl, &[PAT]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_public_url_other_than_the_name_in_use_is_public_url_mismatch() {
    let gl = gitlab()
        .credential(pat(USER, PAT))
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let addr = free_addr();
    let listen = addr.to_string();
    let public = format!("http://localhost:{}", addr.port());
    let px = Regrelay::start(&[
        "--listen",
        &listen,
        "--registry",
        &reg.url(),
        "--public-url",
        &public,
    ]);
    // Clients (and doctor) use 127.0.0.1:PORT; regrelay only knows localhost:PORT.
    let host = px.addr.to_string();
    let run = doctor(&ci_env(&host, USER, PAT), &[]).await;
    run.expect(2, "network", &["public_url_mismatch"]);
    let says = run.says("public_url_mismatch");
    assert!(
        says.contains(&format!("localhost:{}", addr.port()))
            && says.contains(&format!("127.0.0.1:{}", addr.port())),
        "names both hosts: {says}"
    );
    assert!(says.contains("--public-url http://127.0.0.1:"), "{says}");
    // regrelay's sessions are opaque: doctor tried them on the registry instead.
    assert!(
        run.json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c.as_str().unwrap().contains("pull allowed, push allowed")),
        "{}",
        run.text
    );
    run.assert_secret_free(&[USER], &secrets(&gl, &[PAT]));
    // Through the configured name, nothing is wrong.
    let run = doctor(
        &ci_env(&format!("localhost:{}", addr.port()), USER, PAT),
        &[],
    )
    .await;
    run.expect(0, "ok", &[]);
    assert_no_secrets(&px.output.text(), USER, &secrets(&gl, &[PAT]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gitlab_clock_two_minutes_ahead_is_clock_skew() {
    let gl = gitlab()
        .credential(pat(USER, PAT))
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .clock_offset(120)
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let host = reg.addr.to_string();
    let run = doctor(&ci_env(&host, USER, PAT), &[]).await;
    run.expect(2, "network", &["clock_skew"]);
    let says = run.says("clock_skew");
    let measured: i64 = says
        .split("clock is ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("an offset: {says}"));
    assert!((118..=122).contains(&measured), "{says}");
    assert!(says.contains("ahead") && says.contains("fix NTP"), "{says}");
    assert!(
        says.contains("not valid yet"),
        "nbf in the runner's future: {says}"
    );
    run.assert_secret_free(&[USER], &secrets(&gl, &[PAT]));
}

#[tokio::test]
async fn a_closed_port_is_registry_unreachable_and_no_registry_is_usage() {
    let closed = free_addr().to_string();
    let run = doctor(&ci_env(&closed, USER, PAT), &[]).await;
    run.expect(2, "network", &["registry_unreachable"]);
    assert!(run.says("registry_unreachable").contains(&closed));
    run.assert_secret_free(&[USER], &[PAT.to_owned()]);
    // No registry known at all: usage.
    let run = doctor(&[("CI_REGISTRY_PASSWORD", PAT)], &[]).await;
    assert_eq!(run.code, 64, "{}", run.all);
    assert!(run.all.contains("CI_REGISTRY"), "{}", run.all);
    run.assert_secret_free(&[USER], &[PAT.to_owned()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn https_with_a_private_ca_is_tls_error_until_ca_file_names_it() {
    let gl = gitlab()
        .credential(pat(USER, PAT))
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let px = Regrelay::start(&[
        "--registry",
        &reg.url(),
        "--tls-cert",
        &cert("server.pem"),
        "--tls-key",
        &cert("server.key"),
    ]);
    let host = format!("localhost:{}", px.addr.port());
    let run = doctor(&ci_env(&host, USER, PAT), &[]).await;
    run.expect(2, "network", &["tls_error"]);
    assert!(run.says("tls_error").contains("--ca-file"), "{}", run.text);
    let ca = cert("ca.pem");
    let run = doctor(&ci_env(&host, USER, PAT), &["--ca-file", &ca]).await;
    run.expect(0, "ok", &[]);
    assert!(
        run.text.contains(&format!("registry https://{host}")),
        "{}",
        run.text
    );
    run.assert_secret_free(&[USER], &secrets(&gl, &[PAT]));
    // A CA file that is not there is a usage error.
    let run = doctor(
        &ci_env(&host, USER, PAT),
        &["--ca-file", "/nonexistent/ca.pem"],
    )
    .await;
    assert_eq!(run.code, 64, "{}", run.all);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dependency_proxy_is_checked_with_its_own_ci_credentials() {
    const JOB_TOKEN: &str = "glcbt-Dq5NvR8xWm2KtZ7cLp4J";
    let job = CiJob::new(JOB_TOKEN, "my-group/app", USER);
    // The backing registry is never asked: doctor only logs in.
    let gl = gitlab()
        .credential(job.credential())
        .dependency_proxy("my-group", &[], free_addr())
        .start()
        .await;
    let server = gl.addr.to_string();
    let prefix = gl.dp_image_prefix("my-group");
    let env = |password: &'static str| -> Vec<(&'static str, String)> {
        vec![
            ("CI_DEPENDENCY_PROXY_SERVER", server.clone()),
            (
                "CI_DEPENDENCY_PROXY_USER",
                job.dependency_proxy_user().into(),
            ),
            ("CI_DEPENDENCY_PROXY_PASSWORD", password.into()),
            ("CI_DEPENDENCY_PROXY_GROUP_IMAGE_PREFIX", prefix.clone()),
        ]
    };
    let ok = env(JOB_TOKEN);
    let ok: Vec<(&str, &str)> = ok.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let run = doctor(&ok, &["--registry", &server]).await;
    run.expect(0, "ok", &[]);
    assert!(
        run.text.contains("Dependency Proxy") && run.text.contains("CI_DEPENDENCY_PROXY_USER"),
        "{}",
        run.text
    );
    assert_eq!(gl.dp_mints(), 2, "one DP token per output mode");
    let bad = env("glcbt-NotThisJobsToken00");
    let bad: Vec<(&str, &str)> = bad.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let run = doctor(&bad, &["--registry", &server]).await;
    run.expect(1, "credentials", &["bad_credentials"]);
    run.assert_secret_free(
        &["gitlab-ci-token"],
        &secrets(&gl, &[JOB_TOKEN, "glcbt-NotThisJobsToken00"]),
    );
}
