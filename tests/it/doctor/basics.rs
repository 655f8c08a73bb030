//! The basics: all good, no credentials, unreachable or untrusted registries, a self-signed
//! certificate with the CA flag given as its own CA file, clocks, a regrelay whose public URL is
//! not the name in use (reachable from the job or not), a disabled registry, the Dependency Proxy
//! with its own CI credentials, and what `--help` says (variables, exit codes).

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn all_good_is_exit_0() {
    let (gl, _reg, host) = developer().await;
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
    let (gl, _reg, host) = developer().await;
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
async fn a_public_url_other_than_the_name_in_use_is_public_url_mismatch() {
    let (gl, reg, _) = developer().await;
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
    let (gl, reg, _) = developer().await;
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

#[tokio::test(flavor = "multi_thread")]
async fn a_self_signed_certificate_with_the_ca_flag_is_trusted_as_its_own_ca_file() {
    let (gl, reg, _) = developer().await;
    // What `openssl req -x509 -subj /CN=localhost -addext subjectAltName=DNS:localhost` makes:
    // basicConstraints CA:TRUE, which Docker, skopeo and curl accept as its own CA file.
    let own = support::tls::Leaf::self_signed_ca(&["localhost"]);
    let (cert, key) = (
        own.cert.display().to_string(),
        own.key.display().to_string(),
    );
    let px = Regrelay::start(&[
        "--registry",
        &reg.url(),
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    let host = format!("localhost:{}", px.addr.port());
    let run = doctor(&ci_env(&host, USER, PAT), &["--ca-file", &cert]).await;
    run.expect(0, "ok", &[]);
    assert!(
        run.text.contains(&format!("registry https://{host}")),
        "{}",
        run.text
    );
    run.assert_secret_free(&[USER], &secrets(&gl, &[PAT]));
    // Another self-signed CA certificate in the file: refused as before.
    let stranger = support::tls::Leaf::self_signed_ca(&["localhost"]);
    let other = stranger.cert.display().to_string();
    let run = doctor(&ci_env(&host, USER, PAT), &["--ca-file", &other]).await;
    run.expect(2, "network", &["tls_error"]);
    // The certificate itself, reached by a name it does not list: refused.
    let by_ip = px.addr.to_string();
    let run = doctor(&ci_env(&by_ip, USER, PAT), &["--ca-file", &cert]).await;
    run.expect(2, "network", &["tls_error"]);
    assert!(
        run.says("tls_error").contains("not valid for name"),
        "{}",
        run.text
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_public_url_unreachable_from_here_is_public_url_mismatch_not_realm_unreachable() {
    let (gl, reg, _) = developer().await;
    let addr = free_addr();
    // The public name leads, from this job, where nothing listens (as a name that resolves
    // elsewhere, or not at all, does): 127.0.0.2, while regrelay listens on 127.0.0.1.
    let public = format!("127.0.0.2:{}", addr.port());
    let px = Regrelay::start(&[
        "--listen",
        &addr.to_string(),
        "--registry",
        &reg.url(),
        "--public-url",
        &format!("http://{public}"),
    ]);
    let host = px.addr.to_string();
    let run = doctor(&ci_env(&host, USER, PAT), &[]).await;
    run.expect(2, "network", &["public_url_mismatch"]);
    let says = run.says("public_url_mismatch");
    assert!(
        says.contains(&public) && says.contains(&host),
        "names both addresses: {says}"
    );
    assert!(says.contains("not reachable from here"), "{says}");
    assert!(
        says.contains(&format!("--public-url http://{host}")),
        "the fix names the address clients use: {says}"
    );
    assert!(
        !run.notes().iter().any(|n| n == "realm_on_other_host"),
        "{}",
        run.text
    );
    run.assert_secret_free(&[USER], &secrets(&gl, &[PAT]));
}

#[test]
fn help_lists_the_variables_doctor_reads_and_its_exit_codes() {
    let out = Command::new(regrelay_bin())
        .args(["doctor", "--help"])
        .output()
        .expect("run regrelay doctor --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "CI_REGISTRY",
        "CI_REGISTRY_USER",
        "CI_REGISTRY_PASSWORD",
        "CI_JOB_TOKEN",
        "CI_PROJECT_PATH",
        "CI_REGISTRY_IMAGE",
        "CI_COMMIT_REF_SLUG",
        "CI_API_V4_URL",
        "CI_DEPENDENCY_PROXY_SERVER",
        "CI_DEPENDENCY_PROXY_USER",
        "CI_DEPENDENCY_PROXY_PASSWORD",
        "DOCKER_AUTH_CONFIG",
        "DOCKER_CONFIG",
        "HOME",
    ] {
        assert!(
            help.lines()
                .any(|l| l.split_whitespace().next() == Some(var)),
            "{var} has a line of its own: {help}"
        );
    }
    for (code, what) in [
        ("0", "ok"),
        ("1", "credential"),
        ("2", "network"),
        ("64", "usage"),
    ] {
        assert!(
            help.lines().any(|l| {
                let mut words = l.split_whitespace();
                words.next() == Some(code) && l.contains(what)
            }),
            "exit code {code} ({what}): {help}"
        );
    }
}
