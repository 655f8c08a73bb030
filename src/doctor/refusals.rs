//! What the token service's refusals mean: a `401` (GitLab does not say why), a `403` on the
//! login (a credential without any registry ability, or a front that removed `Authorization`),
//! GitLab's failed-login IP ban, Rack::Attack's `429`, and the rest (404s, outages).
//!
//! Doctor never sends a credential it made up: GitLab's IP ban counts every failed Basic login
//! against the address it comes from (10 in a minute ban it for an hour, typically), and that
//! address is this runner's, or regrelay's for everyone behind it. A `403` on the login is told
//! apart with real credentials only: a CI job token, which GitLab never answers `403` (it
//! accepts it or answers `401`) and whose logins the ban never counts; when there is none,
//! doctor says both possibilities.

use http::{header, StatusCode};

use super::gitlab_answers::{self, Throttle};
use super::{basic_header, host_port, quote, Answer, Class, Creds, Doctor, Kind};

/// The username of CI job token logins (`Gitlab::Auth::CI_JOB_USER`).
const CI_JOB_USER: &str = "gitlab-ci-token";

/// Whether GitLab sees the `Authorization` header that reaches the realm.
enum Sight {
    /// It does: the credentials themselves were refused.
    Seen,
    /// It does not: GitLab answers an anonymous login.
    Stripped(String),
    /// Doctor cannot tell.
    Unknown,
}

impl Doctor {
    /// 401 from the realm: GitLab does not say why; hints from what the credentials look like.
    pub(super) fn bad_credentials(&mut self, answer: &Answer, creds: &Creds) {
        let message = answer.message();
        let said = if message.is_empty() {
            "401".to_owned()
        } else {
            format!("401 \"{message}\"")
        };
        let mut hints = vec![];
        let job_token = self.env.get("CI_JOB_TOKEN");
        let is_job_token = job_token == Some(creds.secret.as_str());
        if (creds.secret.starts_with("gldt-") || creds.user.starts_with("gitlab+deploy-token"))
            && !creds.user.starts_with("gitlab+deploy-token")
        {
            hints.push(format!(
                "this looks like a deploy token (gldt- prefix) sent with username '{}': a deploy \
                 token works only with its own username (gitlab+deploy-token-N unless chosen \
                 otherwise, shown when it was created)",
                creds.user
            ));
        } else if creds.secret.starts_with("gldt-") {
            hints.push(
                "a deploy token: check that the username is the token's own and that the token \
                 is not expired or revoked (Settings → Repository → Deploy tokens)"
                    .into(),
            );
        }
        if is_job_token && creds.user != "gitlab-ci-token" {
            hints.push(format!(
                "the password is CI_JOB_TOKEN but the username is '{}': job tokens work only \
                 with the username gitlab-ci-token",
                creds.user
            ));
        } else if creds.user == "gitlab-ci-token" && job_token.is_some() && !is_job_token {
            hints.push(
                "username gitlab-ci-token takes this job's CI_JOB_TOKEN, and the password is not \
                 it (a job token dies when its job ends)"
                    .into(),
            );
        } else if creds.user == "gitlab-ci-token" || creds.secret.starts_with("glcbt-") {
            hints.push("a job token is valid only while its job runs".into());
        }
        if creds.secret.starts_with("glpat-") {
            hints.push(
                "a personal/project/group access token (glpat-): GitLab does not say whether it \
                 is wrong, revoked or expired: check its expiry date (Settings → Access tokens)"
                    .into(),
            );
        } else if Kind::guess(creds) == Kind::Unknown {
            hints.push(
                "if this is an account password: it is refused when 2FA is on (use an access \
                 token)"
                    .into(),
            );
        }
        let mut text = format!(
            "the token service refuses user {} from {}: {said}; GitLab answers the same for a \
             wrong, expired or revoked token and a wrong username, so doctor cannot tell which",
            creds.user, creds.source
        );
        for h in hints {
            text.push_str("; ");
            text.push_str(&h);
        }
        self.report.add(
            "bad_credentials",
            Class::Credentials,
            text,
            "log in with a valid token: CI_REGISTRY_USER/CI_REGISTRY_PASSWORD in a job, a \
             deploy token with its own username, or an access token with read_registry and \
             write_registry, or api (any username); renew it if it expired"
                .into(),
        );
    }

    /// The credentials are a CI job token: `gitlab-ci-token` with this job's `CI_JOB_TOKEN` or a
    /// `glcbt-` token (with a `glpat-` token that username is an access token login).
    fn is_job_token(&self, creds: &Creds) -> bool {
        creds.user == CI_JOB_USER
            && (self.env.get("CI_JOB_TOKEN") == Some(creds.secret.as_str())
                || creds.secret.starts_with("glcbt-"))
    }

    /// 403 on the login: GitLab answers it both to credentials it knows that have no registry
    /// ability and to a login without credentials (a front removed `Authorization`). Told apart
    /// with real credentials only (see the module docs).
    pub(super) async fn forbidden_login(
        &mut self,
        url: &str,
        service: &str,
        answer: &Answer,
        creds: &Creds,
    ) {
        let message = answer.message();
        let who = format!("user {} from {}", creds.user, creds.source);
        let sight = if self.is_job_token(creds) {
            Sight::Stripped(
                "GitLab never answers a CI job token 403 (it accepts it, or answers 401 once the \
                 job has ended): only a login without credentials gets this"
                    .into(),
            )
        } else {
            match self.sight_by_job_token(url, service).await {
                Some(sight) => sight,
                None => return,
            }
        };
        match sight {
            Sight::Stripped(evidence) => self.report.add(
                "authorization_stripped",
                Class::Network,
                format!(
                    "the token service answers 403 \"{message}\" to {who}: {evidence}, so the \
                     Authorization header does not reach GitLab (a proxy or front between here \
                     and {url} removes it) and every login arrives anonymous"
                ),
                "let Authorization through on /jwt/auth (nginx: no `proxy_set_header \
                 Authorization \"\"`, no auth_request there), or serve /jwt/auth on the \
                 registry host with regrelay"
                    .into(),
            ),
            Sight::Seen => {
                let (message_tail, fix) = missing_ability(service, Kind::guess(creds));
                self.report.add(
                    "missing_scope",
                    Class::Credentials,
                    format!(
                        "GitLab sees {who} (this job's CI_JOB_TOKEN gets through the same way) \
                         but answers the login 403 \"{message}\": {message_tail}"
                    ),
                    fix,
                );
            }
            Sight::Unknown => {
                let (message_tail, fix) = missing_ability(service, Kind::guess(creds));
                self.report.add(
                    "login_forbidden",
                    Class::Credentials,
                    format!(
                        "the token service answers 403 \"{message}\" to {who}; GitLab gives \
                         this answer in two cases doctor cannot tell apart here (it compares \
                         with the job's own CI_JOB_TOKEN, and there is none): {message_tail}; \
                         or a proxy or front between here and {url} removes the Authorization \
                         header, so GitLab sees an anonymous login"
                    ),
                    format!(
                        "{fix}; if the token's scopes are right, let Authorization through to \
                         /jwt/auth at every proxy between the runner and GitLab; run doctor in \
                         the CI job to tell which"
                    ),
                );
            }
        }
    }

    /// Asks the realm for a login with this job's own `CI_JOB_TOKEN` (a real credential, never
    /// counted by the IP ban): GitLab answers it 200 (or 401 after the job), and 403 only when
    /// it arrives without credentials. `None` when the run ended (the realm failed).
    async fn sight_by_job_token(&mut self, url: &str, service: &str) -> Option<Sight> {
        let Some(job) = self.env.get("CI_JOB_TOKEN").map(str::to_owned) else {
            return Some(Sight::Unknown);
        };
        let auth = basic_header(CI_JOB_USER, &job);
        let control = self
            .realm_call(url, service, None, CI_JOB_USER, Some(auth))
            .await?;
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&control.body) {
            if let Some(t) = v["token"].as_str() {
                self.report.redactor.add_issued(t);
            }
        }
        Some(match control.status {
            StatusCode::OK | StatusCode::UNAUTHORIZED => Sight::Seen,
            StatusCode::FORBIDDEN => Sight::Stripped(
                "the same to this job's CI_JOB_TOKEN, which GitLab never answers 403 (it accepts \
                 it, or answers 401 once the job has ended)"
                    .into(),
            ),
            _ => Sight::Unknown,
        })
    }

    /// Reports GitLab's failed-login IP ban or Rack::Attack's throttle, from any realm answer;
    /// true when it was one (nothing after it can be checked from this address).
    pub(super) fn limits_refusal(&mut self, url: &str, answer: &Answer) -> bool {
        if gitlab_answers::is_ip_ban(answer.status, &answer.headers, &answer.body) {
            self.banned(url, &answer.message());
            return true;
        }
        let throttle =
            gitlab_answers::throttle(answer.status, &answer.headers, &answer.body, answer.at);
        if let Some(t) = throttle {
            self.throttled(url, &t);
            return true;
        }
        false
    }

    /// True when `url` is on the registry's own host: a proxy there (regrelay, or a front)
    /// serves `/jwt/auth`, and GitLab sees that proxy's address, not this runner's.
    fn realm_behind_proxy(&self, url: &str) -> bool {
        let Some(registry) = &self.registry_origin else {
            return false;
        };
        let Ok(uri) = url.parse::<http::Uri>() else {
            return false;
        };
        let (scheme, authority) = (uri.scheme_str().unwrap_or("https"), uri.authority());
        authority.is_some_and(|a| host_port(a.as_str(), scheme) == *registry)
    }

    /// GitLab's failed-login IP ban (`Gitlab::Auth::IpRateLimiter`).
    fn banned(&mut self, url: &str, said: &str) {
        let whose = if self.realm_behind_proxy(url) {
            format!(
                "the address of the proxy that serves {url} (regrelay, or another proxy in front \
                 of GitLab): unless that address is in GitLab's trusted_proxies, GitLab counts \
                 the failed logins of everyone behind the proxy against it, so every user behind \
                 it is refused"
            )
        } else {
            "this runner's address (or that of the NAT or proxy it reaches GitLab through), so \
             every job and user behind it is refused"
                .into()
        };
        self.report.add(
            "ip_banned",
            Class::Network,
            format!(
                "GitLab banned {whose}: {url} answers 403 \"{said}\" because too many failed \
                 logins came from that address (GitLab's failed-login IP ban: typically 10 \
                 failures within 60 s ban the address for 1 h); every login from it is refused, \
                 whatever its credentials, until the ban ends (CI job token logins, as \
                 gitlab-ci-token, are exempt)"
            ),
            "find the credential that keeps failing and replace it (often a revoked or expired \
             deploy token or access token in a CI/CD variable, retried by many jobs); when a \
             proxy or load balancer sits between clients and GitLab, add its address to \
             gitlab_rails['trusted_proxies'] (gitlab.rb, then gitlab-ctl reconfigure) so GitLab \
             counts failures per forwarded client address, and keep client addresses at the \
             balancer (X-Forwarded-For or the PROXY protocol); then wait for the ban to end \
             (typically 1 h) or have an administrator lift it (GitLab docs: remove blocked IPs \
             from Rack Attack with Redis)"
                .into(),
        );
    }

    /// Rack::Attack's `429` (lib/gitlab/rack_attack.rb): too many requests, not failed logins.
    fn throttled(&mut self, url: &str, t: &Throttle) {
        let wait = t
            .retry_after_secs
            .map_or_else(|| "later".to_owned(), |s| format!("after {s} s"));
        let name = t
            .name
            .as_deref()
            .map(|n| format!(" ({})", quote(n)))
            .unwrap_or_default();
        let limit = t
            .limit
            .as_deref()
            .map(|l| format!(", {} requests a minute", quote(l)))
            .unwrap_or_default();
        let said = if t.text.is_empty() {
            String::new()
        } else {
            format!(" \"{}\"", quote(&t.text))
        };
        self.report.add(
            "rate_limited",
            Class::Network,
            format!(
                "GitLab rate-limited this address: {url} answers 429{said} from its request \
                 throttle{name}{limit}; retry {wait}"
            ),
            format!(
                "retry {wait} and lower the request rate from this address (many jobs behind \
                 one NAT or proxy share one limit: add the proxy to \
                 gitlab_rails['trusted_proxies'] so GitLab counts per client, or raise the \
                 limit in Admin → Settings → Network → User and IP rate limits)"
            ),
        );
    }

    /// Any other refusal from the realm: 404s, outages, fronts.
    pub(super) fn realm_refusal(&mut self, url: &str, service: &str, answer: &Answer) {
        let (code, message) = (answer.code(), answer.message());
        let status = answer.status;
        if status == StatusCode::NOT_FOUND
            && (code == "UNAVAILABLE" || message.contains("registry not enabled"))
        {
            self.report.add(
                "registry_disabled",
                Class::Credentials,
                format!(
                    "GitLab answers 404 \"{message}\": the container registry is not enabled on \
                     this GitLab instance"
                ),
                "an administrator must enable the container registry (gitlab.rb: \
                 registry['enable'] / registry_external_url)"
                    .into(),
            );
            return;
        }
        if status == StatusCode::NOT_FOUND {
            self.report.add(
                "realm_not_found",
                Class::Network,
                format!(
                    "{url} answers 404 to service={service}: not GitLab's /jwt/auth for this \
                     service (GitLab answers an empty 404 when service is not \
                     container_registry)"
                ),
                "check the registry's auth.token.realm and auth.token.service".into(),
            );
            return;
        }
        let retry = answer
            .header(&header::RETRY_AFTER)
            .map(|r| format!(", Retry-After {}", quote(r)))
            .unwrap_or_default();
        let fix = if status.is_server_error() {
            "GitLab (or a proxy in front of it) is failing: retry later, check GitLab's status"
        } else {
            "check the token service's configuration and logs"
        };
        self.report.add(
            "realm_error",
            Class::Network,
            format!("{url} answers {} \"{message}\"{retry}", status.as_u16()),
            fix.into(),
        );
    }
}

/// Why GitLab refuses a login it sees with 403, by service and credential kind: the end of a
/// sentence, and the fix. The registry takes any registry ability (`read_api` included: its
/// read-only abilities pull); the Dependency Proxy wants read and write.
fn missing_ability(service: &str, kind: Kind) -> (String, String) {
    let dp = service == "dependency_proxy";
    match (dp, kind) {
        (true, Kind::Deploy) => (
            "the Dependency Proxy takes only group deploy tokens with both read_registry and \
             write_registry (a project deploy token, or one lacking either scope, is refused)"
                .into(),
            "create a deploy token in the group (the group → Settings → Repository → Deploy \
             tokens) with read_registry and write_registry, and log in with its own username"
                .into(),
        ),
        (true, _) => (
            "the Dependency Proxy needs credentials that can both read and write the registry: \
             read_registry and write_registry, or api (read_registry or read_api alone is \
             refused here)"
                .into(),
            "use an access token with read_registry and write_registry (or api), or in a CI \
             job CI_DEPENDENCY_PROXY_USER/CI_DEPENDENCY_PROXY_PASSWORD"
                .into(),
        ),
        (false, Kind::Deploy) => (
            "the deploy token has no registry scope (neither read_registry nor write_registry)"
                .into(),
            "create a deploy token with read_registry (pull) and write_registry (push) in the \
             project, or in a group above it (a group deploy token applies to every project of \
             its group and subgroups): Settings → Repository → Deploy tokens"
                .into(),
        ),
        (false, _) => (
            "the token has no registry ability at all: none of read_registry, write_registry, \
             read_api or api (e.g. only read_user or read_repository)"
                .into(),
            "create an access token with read_registry and write_registry (or api) and log in \
             with it; read_registry or read_api alone pull but cannot push"
                .into(),
        ),
    }
}
