//! A push GitLab does not grant is explained to the client. GitLab drops actions a credential may
//! not have without an error, so the registry would answer a bare `401 insufficient_scope` (Docker:
//! "unauthorized: authentication required"). regrelay sees that the token it was given carries no
//! push and answers `403 DENIED` with why: a read-only deploy token, a CI job token of another
//! project, a user without the Developer role. Real registry, real skopeo.

use crate::support;

use std::time::Duration;

use support::gitlab::{gitlab, Credential, Role, TokenScope};
use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn pushes_gitlab_does_not_grant_are_denied_with_the_reason() {
    let gl = gitlab()
        .credential(Credential::Deploy {
            username: "gitlab+deploy-token-7".into(),
            token: "gldt-ReadOnlyToken12345".into(),
            scopes: vec![TokenScope::ReadRegistry],
            project: "group/app".into(),
        })
        .credential(Credential::Job {
            token: "glcbt-OtherProjectJob123".into(),
            project: "group/other".into(),
            user: "dev".into(),
        })
        .credential(Credential::Pat {
            user: "reporter".into(),
            token: "glpat-ReporterOnlyTok123".into(),
            scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
        })
        .project(
            "group/app",
            false,
            &[("dev", Role::Developer), ("reporter", Role::Reporter)],
        )
        .project("group/other", false, &[("dev", Role::Developer)])
        // The other project's jobs may pull group/app (GitLab's job token allowlist is on by
        // default, with only the project itself on it): pushing is what they cannot do.
        .job_token_allowlist("group/app", &["group/other"])
        .lifetime(Duration::from_secs(300))
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let px = Regrelay::start(&["--registry", &reg.url()]);
    let cases = [
        (
            "gitlab+deploy-token-7:gldt-ReadOnlyToken12345",
            "push denied: GitLab granted deploy token gitlab+deploy-token-7 no push on group/app",
        ),
        (
            "gitlab-ci-token:glcbt-OtherProjectJob123",
            "push denied: GitLab granted this CI job token no push on group/app",
        ),
        (
            "reporter:glpat-ReporterOnlyTok123",
            "push denied: GitLab granted reporter no push on group/app",
        ),
    ];
    for (creds, want) in cases {
        let said = tokio::task::spawn_blocking({
            let creds = creds.to_owned();
            let px_addr = px.addr;
            move || {
                let image = OciImage::random(171, &[64 << 10]);
                let out = skopeo_copy(
                    &image.reference(),
                    &format!("docker://{px_addr}/group/app:v1"),
                    &creds,
                    &Transport::Http,
                );
                assert!(!out.status.success(), "the push must fail: {}", text(&out));
                text(&out)
            }
        })
        .await
        .unwrap();
        assert!(said.contains(want), "{creds}: {said}");
        if creds.starts_with("gitlab+deploy-token") {
            // Group deploy tokens reach every project of their group (GitLab's docs).
            assert!(said.contains("the projects of its group"), "{said}");
        }
    }
    // Nothing reached the registry's upload endpoint for any of them.
    let log = px.output.text();
    assert!(
        !log.contains("method=POST path=/v2/group/app/blobs/uploads/ status=202"),
        "{log}"
    );
    assert!(log.contains("status=403"), "{log}");
}

/// GitLab's EE maintenance mode drops every push from the grant, whoever asks: a Developer with
/// a read/write token is refused too, and told that maintenance mode may be why.
#[tokio::test(flavor = "multi_thread")]
async fn pushes_refused_by_maintenance_mode_and_group_deploy_tokens_are_explained() {
    let gl = gitlab()
        .credential(Credential::Pat {
            user: "dev".into(),
            token: "glpat-DeveloperTok12345".into(),
            scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
        })
        .project("group/app", false, &[("dev", Role::Developer)])
        .maintenance_mode()
        .lifetime(Duration::from_secs(300))
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let px = Regrelay::start(&["--registry", &reg.url()]);
    let said = tokio::task::spawn_blocking(move || {
        let image = OciImage::random(172, &[64 << 10]);
        let out = skopeo_copy(
            &image.reference(),
            &format!("docker://{}/group/app:v1", px.addr),
            "dev:glpat-DeveloperTok12345",
            &Transport::Http,
        );
        assert!(!out.status.success(), "the push must fail: {}", text(&out));
        text(&out)
    })
    .await
    .unwrap();
    assert!(said.contains("maintenance mode"), "{said}");
    assert!(!said.contains("its own project's registry"), "{said}");
}
