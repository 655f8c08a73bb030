//! What GitLab's grant says when it dropped actions the job needs: the token for
//! `repository:<project>:pull,push` names what was granted, and GitLab never says why the rest
//! was left out. The causes, by the credential's kind (`auth_type`): a job token's allowlist or
//! project, a deploy token's scopes or holder (a project, or a group: then every project of the
//! group and its subgroups), an access token's scopes or its user's role, a disabled Container
//! Registry, and GitLab EE's maintenance mode, which drops every action but `pull` without a
//! word. Only the causes the answer leaves open are named; GitLab's API (`CI_API_V4_URL`) is
//! asked when it can settle one.

use http::{header, Method, StatusCode};

use super::{challenge, quote, Class, Creds, Doctor, Kind};

/// Where an administrator sees (and ends) GitLab EE's maintenance mode.
const MAINTENANCE: &str = "maintenance mode (GitLab EE; it silently drops every action but pull \
                           from a grant: Admin → Settings → General → Maintenance mode)";

impl Doctor {
    /// Explains actions GitLab dropped, by the credential's kind.
    pub(super) async fn explain_drop(
        &mut self,
        kind: Kind,
        creds: &Creds,
        project: &str,
        pull: bool,
        push: bool,
    ) {
        match kind {
            Kind::Job => self.job_token_drop(creds, project, pull, push),
            Kind::Deploy => self.deploy_token_drop(creds, project, pull, push),
            _ if !pull && !push => self.no_access(creds, project).await,
            _ => self.user_drop(creds, project, pull),
        }
    }

    fn job_token_drop(&mut self, creds: &Creds, project: &str, pull: bool, push: bool) {
        let who = format!("user {} from {}", creds.user, creds.source);
        let dropped = dropped(pull, push);
        let own = self
            .env
            .get("CI_PROJECT_PATH")
            .map(|p| p.to_ascii_lowercase());
        match own {
            Some(own) if own != project => {
                let mut fixes = vec![];
                if !pull {
                    fixes.push(format!(
                        "to pull, add {own} to {project}'s CI/CD job token allowlist \
                         ({project}: Settings → CI/CD → Job token permissions) and give the \
                         job's user access to {project}"
                    ));
                }
                if !push {
                    fixes.push(format!(
                        "to push, use a deploy token (of {project} or a group above it) or a \
                         project access token of {project} with write_registry (masked CI \
                         variables), since a job token never pushes to another project"
                    ));
                }
                self.report.add(
                    "job_token_not_allowed",
                    Class::Credentials,
                    format!(
                        "GitLab dropped {dropped} on {project} for the CI job token of {own}: a \
                         job token pushes only to its own project, and pulls from another \
                         project only when that project's job token allowlist names {own}{}",
                        if pull { " (pull is allowed here)" } else { "" }
                    ),
                    fixes.join("; "),
                );
            }
            // GitLab grants a job push on its own project whatever its user's role: only
            // maintenance mode leaves pull alone and drops push there.
            Some(_) if pull && !push => self.report.add(
                "maintenance_mode",
                Class::Network,
                format!(
                    "GitLab granted pull and dropped push on {project} for this job's own CI \
                     job token ({who}): GitLab always lets a job push to its own project, \
                     except in {MAINTENANCE}; GitLab is in maintenance mode"
                ),
                "wait for the maintenance to end, or have an administrator turn maintenance \
                 mode off (Admin → Settings → General → Maintenance mode); nothing in the job \
                 needs to change"
                    .into(),
            ),
            own => self.report.add(
                "job_token_not_allowed",
                Class::Credentials,
                format!(
                    "GitLab dropped {dropped} on {project} for a CI job token ({who}) {}: the \
                     job's user may have lost access, or {project}'s container registry is \
                     disabled",
                    if own.is_some() {
                        "of this very project"
                    } else {
                        "(CI_PROJECT_PATH unknown, so doctor cannot tell whose)"
                    }
                ),
                format!(
                    "check that the user running the job is a Developer of {project} and that \
                     its Container registry is enabled (Settings → General → Visibility)"
                ),
            ),
        }
    }

    fn deploy_token_drop(&mut self, creds: &Creds, project: &str, pull: bool, push: bool) {
        let who = format!("user {} from {}", creds.user, creds.source);
        let reach = "a project deploy token reaches its own project only, a group deploy token \
                     every project of its group and subgroups";
        match (pull, push) {
            (true, _) => self.report.add(
                "deploy_token_read_only",
                Class::Credentials,
                format!(
                    "push denied: the deploy token has no write_registry (GitLab granted pull \
                     on {project} and dropped push, {who}), unless GitLab is in {MAINTENANCE}"
                ),
                format!(
                    "create a deploy token with read_registry and write_registry (its scopes \
                     cannot be changed later) in {project}, or in a group above it ({reach}): \
                     Settings → Repository → Deploy tokens; store it as masked CI variables and \
                     log in with its own username"
                ),
            ),
            (false, true) => self.report.add(
                "missing_scope",
                Class::Credentials,
                format!(
                    "GitLab granted push and dropped pull on {project} for the deploy token \
                     ({who}): it has write_registry but no read_registry, and a push reads too \
                     (existing layers, the manifest)"
                ),
                "create a deploy token with read_registry and write_registry".into(),
            ),
            (false, false) => self.report.add(
                "deploy_token_wrong_project",
                Class::Credentials,
                format!(
                    "GitLab dropped pull and push on {project} for the deploy token ({who}): \
                     {reach}, and this one belongs to neither {project} nor a group above it \
                     (or {project}'s Container Registry is disabled)"
                ),
                format!(
                    "use a deploy token of {project}, or of a group above it, with read_registry \
                     and write_registry"
                ),
            ),
        }
    }

    /// An access token or password (or an unknown kind) that got one of pull and push.
    fn user_drop(&mut self, creds: &Creds, project: &str, pull: bool) {
        let who = format!("user {} from {}", creds.user, creds.source);
        if pull {
            self.report.add(
                "missing_scope",
                Class::Credentials,
                format!(
                    "GitLab granted pull and dropped push on {project} ({who}): the token can \
                     read the registry (read_registry, or read_api: GitLab's read-only \
                     abilities include pulling images) but pushing needs write_registry or api; \
                     or the user's role in {project} is below Developer; or GitLab is in \
                     {MAINTENANCE}; GitLab does not say which"
                ),
                format!(
                    "use a token with write_registry (or api): Settings → Access tokens; check \
                     that the user is at least Developer in {project}; if both are right, ask \
                     an administrator whether maintenance mode is on"
                ),
            );
        } else {
            self.report.add(
                "missing_scope",
                Class::Credentials,
                format!(
                    "GitLab granted push and dropped pull on {project} ({who}): the token lacks \
                     read_registry (or read_api), or the user's role in {project} is below \
                     Reporter; GitLab does not say which"
                ),
                format!(
                    "use a token with read_registry and write_registry (Settings → Access \
                     tokens) and check that the user is at least Reporter in {project}"
                ),
            );
        }
    }

    /// Neither pull nor push for a user's token: ask GitLab's API, when it can be reached with
    /// the same token, whether the project's registry is disabled.
    async fn no_access(&mut self, creds: &Creds, project: &str) {
        let who = format!("user {} from {}", creds.user, creds.source);
        let api = self
            .env
            .get("CI_API_V4_URL")
            .map(|u| u.trim_end_matches('/').to_owned());
        let mut api_said = String::new();
        if let Some(api) = api {
            let url = format!("{api}/projects/{}", challenge::percent_encode(project));
            match self
                .http
                .send(
                    Method::GET,
                    &url,
                    &[(
                        header::HeaderName::from_static("private-token"),
                        creds.secret.clone(),
                    )],
                )
                .await
            {
                Ok(a) if a.status == StatusCode::OK => {
                    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap_or_default();
                    let disabled = v["container_registry_access_level"] == "disabled"
                        || v["container_registry_enabled"] == false;
                    if disabled {
                        self.report.add(
                            "registry_disabled",
                            Class::Credentials,
                            format!(
                                "the Container Registry of {project} is disabled (the API says \
                                 container_registry_access_level \"{}\"): GitLab grants no pull \
                                 or push on it to anyone ({who})",
                                quote(
                                    v["container_registry_access_level"]
                                        .as_str()
                                        .unwrap_or("disabled")
                                )
                            ),
                            format!(
                                "enable it: {project} → Settings → General → Visibility, project \
                                 features, permissions → Container registry"
                            ),
                        );
                        return;
                    }
                    api_said = format!(
                        "; the API shows {project} to this user with its registry enabled, so \
                         the user's role is too low (Guest) or the token lacks read_registry"
                    );
                }
                Ok(a) if a.status == StatusCode::NOT_FOUND => {
                    api_said = format!(
                        "; the API does not show {project} to this user: it does not exist or \
                         the user is not a member"
                    );
                }
                Ok(a) => {
                    api_said = format!(
                        "; the API could not tell ({} with this token)",
                        a.status.as_u16()
                    );
                }
                Err(e) => api_said = format!("; the API could not tell ({e})"),
            }
        }
        self.report.add(
            "no_access",
            Class::Credentials,
            format!(
                "GitLab dropped pull and push on {project} ({who}): the user is not a member \
                 of {project} (or it does not exist), the token lacks read_registry (or \
                 read_api), or {project}'s Container Registry is disabled{api_said}"
            ),
            format!(
                "check the project path (CI_PROJECT_PATH/--project), add the user to {project} \
                 (Reporter to pull, Developer to push), and check Settings → General → \
                 Visibility → Container registry"
            ),
        );
    }
}

/// What GitLab left out, in words.
fn dropped(pull: bool, push: bool) -> &'static str {
    match (pull, push) {
        (false, false) => "pull and push",
        (true, false) => "push",
        _ => "pull",
    }
}
