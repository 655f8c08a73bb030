//! What GitLab granted for `repository:<project>:pull,push` and why the rest was dropped:
//! `read_api` and `read_registry` tokens, job tokens on other projects, project and group deploy
//! tokens, EE maintenance mode, protected and immutable tags.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_read_api_token_pulls_and_needs_write_registry_to_push() {
    const READ_API: &str = "glpat-ReadApi5Hq8WzN3vKx7T";
    const READ_ONLY: &str = "glpat-ReadOnly7Vb3NcX9pLq2";
    let gl = gitlab()
        .credential(Credential::Pat {
            user: USER.into(),
            token: READ_API.into(),
            scopes: vec![TokenScope::ReadApi],
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
    for token in [READ_API, READ_ONLY] {
        let run = doctor(&ci_env(&host, USER, token), &[]).await;
        run.expect(1, "credentials", &["missing_scope"]);
        assert!(
            run.json["checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c.as_str().unwrap().contains("pull on group/app granted")),
            "{}",
            run.text
        );
        let says = run.says("missing_scope");
        assert!(
            says.contains("read_api") && says.contains("pushing needs write_registry or api"),
            "{says}"
        );
        assert!(!says.contains("no registry"), "{says}");
        run.assert_secret_free(&[USER], &secrets(&gl, &[READ_API, READ_ONLY]));
    }
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

#[tokio::test(flavor = "multi_thread")]
async fn group_deploy_tokens_reach_every_project_of_their_group() {
    const READ_ONLY: &str = "gldt-GroupRead4Kq8ZxW2nVt6";
    const READ_WRITE: &str = "gldt-GroupRw9Tm3QxB7cLp5Z";
    const OTHER: &str = "gldt-OtherGrp2Wv6NkR8yHs4D";
    let deploy = |n: u32, token: &str, scopes: Vec<TokenScope>, holder: &str| Credential::Deploy {
        username: format!("gitlab+deploy-token-{n}"),
        token: token.into(),
        scopes,
        project: holder.into(),
    };
    let both = || vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry];
    let gl = gitlab()
        .credential(deploy(
            1,
            READ_ONLY,
            vec![TokenScope::ReadRegistry],
            "group",
        ))
        .credential(deploy(2, READ_WRITE, both(), "group"))
        .credential(deploy(3, OTHER, both(), "other"))
        .project(PROJECT, false, &[])
        .project("group/sub/lib", false, &[])
        .project("other/tool", false, &[])
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let host = reg.addr.to_string();
    // A group deploy token pulls and pushes in every project of its group and subgroups.
    for project in [PROJECT, "group/sub/lib"] {
        doctor(
            &ci_env(&host, "gitlab+deploy-token-2", READ_WRITE),
            &["--project", project],
        )
        .await
        .expect(0, "ok", &[]);
    }
    // Without write_registry: the fix names the group as a place for the new token.
    let run = doctor(&ci_env(&host, "gitlab+deploy-token-1", READ_ONLY), &[]).await;
    run.expect(1, "credentials", &["deploy_token_read_only"]);
    let says = run.says("deploy_token_read_only");
    assert!(
        says.contains("or in a group above it")
            && says.contains("a group deploy token every project of its group and subgroups"),
        "{says}"
    );
    // Another group's token: neither this project's nor a group's above it.
    let run = doctor(&ci_env(&host, "gitlab+deploy-token-3", OTHER), &[]).await;
    run.expect(1, "credentials", &["deploy_token_wrong_project"]);
    let says = run.says("deploy_token_wrong_project");
    assert!(
        says.contains("a group deploy token every project of its group")
            && says.contains("neither group/app nor a group above it"),
        "{says}"
    );
    run.assert_secret_free(
        &["gitlab+deploy-token-1", "gitlab+deploy-token-3"],
        &secrets(&gl, &[READ_ONLY, READ_WRITE, OTHER]),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gitlab_in_maintenance_mode_is_named_among_the_causes() {
    let job = CiJob::new("glcbt-Mt5NwQ8xRk3ZvL7cTp2J", PROJECT, USER);
    let gl = gitlab()
        .credential(pat(USER, PAT))
        .credential(job.credential())
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .maintenance_mode()
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let host = reg.addr.to_string();
    // A Developer's token with write_registry: push dropped, and GitLab does not say why.
    let run = doctor(&ci_env(&host, USER, PAT), &[]).await;
    run.expect(1, "credentials", &["missing_scope"]);
    let says = run.says("missing_scope");
    assert!(
        says.contains("maintenance mode")
            && says.contains("Admin → Settings → General → Maintenance mode"),
        "{says}"
    );
    // The job's own token always pushes to its project, except in maintenance mode.
    let mut env = ci_env(&host, "gitlab-ci-token", &job.token);
    env.push(("CI_JOB_TOKEN", job.token.as_str()));
    let run = doctor(&env, &[]).await;
    run.expect(2, "network", &["maintenance_mode"]);
    assert!(
        run.says("maintenance_mode")
            .contains("GitLab is in maintenance mode"),
        "{}",
        run.text
    );
    // Maintenance over: nothing is wrong.
    gl.set_maintenance_mode(false);
    doctor(&env, &[]).await.expect(0, "ok", &[]);
    run.assert_secret_free(
        &[USER, "gitlab-ci-token"],
        &secrets(&gl, &[PAT, &job.token]),
    );
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
async fn an_existing_immutable_tag_is_immutable_tag() {
    let gl = gitlab()
        .credential(pat(USER, PAT))
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .immutable_tag(PROJECT, "^v\\d+\\.\\d+\\.\\d+$")
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let host = reg.addr.to_string();
    // Not there yet: the first push works, later ones will not.
    let run = doctor(&ci_env(&host, USER, PAT), &["--tag", "v1.2.3"]).await;
    run.expect(0, "ok", &[]);
    assert!(
        run.says("immutable_tag").contains("its first push works"),
        "{}",
        run.text
    );
    // Pushed once (a real push, skopeo): now it can never be pushed again.
    let image = OciImage::random(21, &[2048]);
    let dest = format!("docker://{host}/{PROJECT}:v1.2.3");
    let creds = format!("{USER}:{PAT}");
    let pushed = tokio::task::spawn_blocking(move || {
        skopeo_copy(&image.reference(), &dest, &creds, &Transport::Http)
    })
    .await
    .unwrap();
    assert!(pushed.status.success(), "{}", text(&pushed));
    let run = doctor(&ci_env(&host, USER, PAT), &["--tag", "v1.2.3"]).await;
    run.expect(1, "credentials", &["immutable_tag"]);
    let says = run.says("immutable_tag");
    assert!(
        says.contains("the push of tag v1.2.3 will be refused")
            && says.contains("already exists")
            && says.contains("cannot be overwritten or deleted")
            && says.contains("push a tag that is new each time"),
        "{says}"
    );
    // A tag outside the pattern: a note.
    let run = doctor(&ci_env(&host, USER, PAT), &["--tag", "main"]).await;
    run.expect(0, "ok", &[]);
    assert!(run
        .says("immutable_tag")
        .contains("main is not one of them"));
    run.assert_secret_free(&[USER], &secrets(&gl, &[PAT]));
}
