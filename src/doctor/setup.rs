//! What the job gives doctor: its CI variables, the registry it targets, and the credentials
//! (a Docker config, a credential helper, or the variables) it would log in with.

use super::*;

/// The CI variables doctor reads (empty values count as unset).
#[derive(Debug, Default, Clone)]
pub(super) struct Env {
    pub(super) vars: Vec<(String, String)>,
}

impl Env {
    pub(super) fn from_process() -> Env {
        Env {
            vars: std::env::vars()
                .filter(|(k, _)| {
                    k.starts_with("CI_")
                        || matches!(k.as_str(), "DOCKER_AUTH_CONFIG" | "DOCKER_CONFIG" | "HOME")
                })
                .collect(),
        }
    }

    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    /// True when the variable exists, even empty.
    pub(super) fn defined(&self, name: &str) -> bool {
        self.vars.iter().any(|(k, _)| k == name)
    }
}

/// The registry as the user named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    /// `http` or `https` when the URL said so.
    pub(super) scheme: Option<&'static str>,
    /// `host[:port]`, lowercase.
    pub(super) authority: String,
    /// Loopback host: http is tried after https.
    pub(super) loopback: bool,
}

impl Target {
    pub(super) fn parse(raw: &str) -> Result<Target, String> {
        if raw.contains('@') {
            // Not echoed (nor in any message below): the part before `@` is a password.
            return Err(
                "holds credentials (USER:PASSWORD@HOST): doctor does not read them there, \
                 and they would be printed; give the host alone and the credentials in \
                 CI_REGISTRY_USER/CI_REGISTRY_PASSWORD"
                    .into(),
            );
        }
        let s = raw.trim();
        let lower = s.to_ascii_lowercase();
        let (scheme, rest) = if lower.starts_with("https://") {
            (Some("https"), &s[8..])
        } else if lower.starts_with("http://") {
            (Some("http"), &s[7..])
        } else if s.contains("://") {
            return Err(format!("{raw:?}: want host[:port] or an http(s) URL"));
        } else {
            (None, s)
        };
        let authority = rest.split('/').next().unwrap_or("").to_ascii_lowercase();
        let parsed: Authority = authority
            .parse()
            .map_err(|_| format!("{raw:?}: want host[:port] or an http(s) URL"))?;
        if parsed.host().is_empty() {
            return Err(format!("{raw:?}: no host"));
        }
        Ok(Target {
            scheme,
            loopback: is_loopback(parsed.host()),
            authority,
        })
    }
}

pub(super) fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `host[:port]` of a registry reference or `auths` key: scheme and path removed, lowercase.
pub(super) fn host_key(s: &str) -> String {
    let s = s.trim();
    let s = s
        .split_once("://")
        .map_or(s, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or("");
    s.to_ascii_lowercase()
}

/// `(host, port)` of an authority, with the scheme's default port.
pub(super) fn host_port(authority: &str, scheme: &str) -> (String, u16) {
    let default = if scheme == "https" { 443 } else { 80 };
    match authority.parse::<Authority>() {
        Ok(a) => (
            a.host().to_ascii_lowercase(),
            a.port_u16().unwrap_or(default),
        ),
        Err(_) => (authority.to_ascii_lowercase(), default),
    }
}

/// Credentials doctor found, and where.
#[derive(Clone)]
pub(super) struct Creds {
    pub(super) user: String,
    pub(super) secret: String,
    pub(super) source: String,
}

/// What kind of credential GitLab saw (its `auth_type`), or what it looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A CI job token (`build`).
    Job,
    /// A deploy token.
    Deploy,
    /// A personal, project or group access token.
    AccessToken,
    /// A password.
    Password,
    /// Not known.
    Unknown,
}

impl Kind {
    /// From the JWT's `auth_type` claim.
    pub(super) fn from_auth_type(t: &str) -> Option<Kind> {
        Some(match t {
            "build" => Kind::Job,
            "deploy_token" => Kind::Deploy,
            "personal_access_token" => Kind::AccessToken,
            "gitlab_or_ldap" => Kind::Password,
            _ => return None,
        })
    }

    /// From what the credentials look like.
    pub(super) fn guess(creds: &Creds) -> Kind {
        if creds.user == "gitlab-ci-token" || creds.secret.starts_with("glcbt-") {
            Kind::Job
        } else if creds.secret.starts_with("gldt-") || creds.user.starts_with("gitlab+deploy-token")
        {
            Kind::Deploy
        } else if creds.secret.starts_with("glpat-") {
            Kind::AccessToken
        } else {
            Kind::Unknown
        }
    }
}

/// One `auths` entry of a Docker config.
pub(super) enum AuthEntry {
    Creds {
        user: String,
        secret: String,
    },
    /// An `identitytoken` (OAuth refresh token): not usable with GitLab's Basic-only realm.
    IdentityToken,
}

/// Reads `auths.<host>` of a Docker config JSON (`auth` base64 `user:pass`, or `username` +
/// `password`).
pub(super) fn auths_entry(config: &serde_json::Value, authority: &str) -> Option<AuthEntry> {
    let auths = config.get("auths")?.as_object()?;
    let entry = auths
        .iter()
        .find(|(k, _)| host_key(k) == authority)
        .map(|(_, v)| v)?;
    if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) {
        let trimmed = auth.trim();
        let raw = STANDARD
            .decode(trimmed)
            .or_else(|_| STANDARD_NO_PAD.decode(trimmed.trim_end_matches('=')))
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (user, secret) = raw.split_once(':')?;
        return Some(AuthEntry::Creds {
            user: user.to_owned(),
            secret: secret.to_owned(),
        });
    }
    let user = entry.get("username").and_then(|u| u.as_str());
    let secret = entry.get("password").and_then(|p| p.as_str());
    if let (Some(user), Some(secret)) = (user, secret) {
        return Some(AuthEntry::Creds {
            user: user.to_owned(),
            secret: secret.to_owned(),
        });
    }
    entry
        .get("identitytoken")
        .is_some()
        .then_some(AuthEntry::IdentityToken)
}

/// The credential helper a Docker config names for `authority`, if any.
pub(super) fn helper_for(config: &serde_json::Value, authority: &str) -> Option<String> {
    if let Some(helpers) = config.get("credHelpers").and_then(|h| h.as_object()) {
        if let Some((_, name)) = helpers.iter().find(|(k, _)| host_key(k) == authority) {
            return name.as_str().map(|n| format!("docker-credential-{n}"));
        }
    }
    config
        .get("credsStore")
        .and_then(|s| s.as_str())
        .filter(|s| !s.is_empty())
        .map(|n| format!("docker-credential-{n}"))
}

/// Everything decided before the first request.
pub(super) struct Setup {
    pub(super) target: Target,
    /// Where the registry came from (`--registry` or `CI_REGISTRY`).
    pub(super) target_source: &'static str,
    pub(super) project: Option<String>,
    pub(super) tag: Option<String>,
    pub(super) creds: Option<Creds>,
    /// Notes about credential sources (helpers, missing `docker login`, empty variables).
    pub(super) cred_notes: Vec<(&'static str, String, String)>,
    /// Why no credentials were found, when none were.
    pub(super) no_creds_detail: String,
}

impl Setup {
    pub(super) fn new(args: &DoctorArgs, env: &Env) -> Result<Setup, String> {
        let (raw, target_source) = match (&args.registry, env.get("CI_REGISTRY")) {
            (Some(r), _) => (r.clone(), "--registry"),
            (None, Some(r)) => (r.to_owned(), "CI_REGISTRY"),
            (None, None) => {
                return Err(
                    "no registry to check: pass --registry HOST[:PORT] or set CI_REGISTRY".into(),
                )
            }
        };
        let target = Target::parse(&raw).map_err(|e| format!("registry {e}"))?;
        if let Some(ca) = &args.ca_file {
            if !ca.is_file() {
                return Err(format!("--ca-file {}: not a readable file", ca.display()));
            }
        }
        let project = args
            .project
            .clone()
            .or_else(|| env.get("CI_PROJECT_PATH").map(str::to_owned))
            .or_else(|| {
                env.get("CI_REGISTRY_IMAGE")
                    .and_then(|image| image.split_once('/').map(|(_, p)| p.to_owned()))
            })
            .map(|p| p.trim_matches('/').to_ascii_lowercase())
            .filter(|p| !p.is_empty());
        if let Some(p) = &project {
            if p.contains(':') || p.contains(char::is_whitespace) {
                return Err(format!("project {p:?}: want a path like group/project"));
            }
        }
        let tag = args
            .tag
            .clone()
            .or_else(|| env.get("CI_COMMIT_REF_SLUG").map(str::to_owned))
            .filter(|t| !t.is_empty());
        let mut setup = Setup {
            target,
            target_source,
            project,
            tag,
            creds: None,
            cred_notes: vec![],
            no_creds_detail: String::new(),
        };
        setup.find_credentials(env);
        Ok(setup)
    }

    /// Docker's own sources first (what `docker push` would send), then the CI variables.
    pub(super) fn find_credentials(&mut self, env: &Env) {
        let authority = self.target.authority.clone();
        let mut tried = vec![];
        let mut helper = None;
        if let Some(raw) = env.get("DOCKER_AUTH_CONFIG") {
            tried.push("DOCKER_AUTH_CONFIG".to_owned());
            match serde_json::from_str::<serde_json::Value>(raw) {
                Ok(config) => {
                    if let Some(found) = self.take_entry(&config, &authority, "DOCKER_AUTH_CONFIG")
                    {
                        self.creds = Some(found);
                        return;
                    }
                    helper = helper.or(helper_for(&config, &authority));
                }
                Err(_) => self.cred_notes.push((
                    "docker_auth_config_invalid",
                    "DOCKER_AUTH_CONFIG is not valid JSON, so no client can read it".into(),
                    "set it to {\"auths\":{\"HOST\":{\"auth\":\"<base64 of user:token>\"}}}".into(),
                )),
            }
        }
        let config_path = env
            .get("DOCKER_CONFIG")
            .map(|d| Path::new(d).join("config.json"))
            .or_else(|| {
                env.get("HOME")
                    .map(|h| Path::new(h).join(".docker/config.json"))
            });
        let mut logged_in = false;
        if let Some(path) = &config_path {
            if let Ok(raw) = std::fs::read_to_string(path) {
                let label = path.display().to_string();
                tried.push(label.clone());
                match serde_json::from_str::<serde_json::Value>(&raw) {
                    Ok(config) => {
                        if let Some(found) = self.take_entry(&config, &authority, &label) {
                            self.creds = Some(found);
                            return;
                        }
                        helper = helper.or(helper_for(&config, &authority));
                        logged_in = helper.is_some();
                    }
                    Err(_) => self.cred_notes.push((
                        "docker_config_invalid",
                        format!("{label} is not valid JSON"),
                        "remove it and run docker login again".into(),
                    )),
                }
            }
        }
        if let Some(helper) = &helper {
            self.cred_notes.push((
                "credential_helper",
                format!(
                    "the Docker config keeps credentials in the helper {helper}, which doctor \
                     cannot read (it checks only credentials in config files and CI variables)"
                ),
                format!(
                    "run `{helper} get <<< {authority}` to see what Docker will send, or check \
                     with the same credentials in CI_REGISTRY_USER/CI_REGISTRY_PASSWORD"
                ),
            ));
        }
        let pairs: [(&str, &str, &str); 2] = [
            (
                "CI_DEPENDENCY_PROXY_USER",
                "CI_DEPENDENCY_PROXY_PASSWORD",
                "CI_DEPENDENCY_PROXY_SERVER",
            ),
            ("CI_REGISTRY_USER", "CI_REGISTRY_PASSWORD", "CI_REGISTRY"),
        ];
        for (user_var, pass_var, host_var) in pairs {
            let for_host = env.get(host_var).map(host_key);
            let is_dp = user_var.starts_with("CI_DEPENDENCY");
            // The Dependency Proxy credentials serve its own host only; the registry ones any
            // host (a regrelay in front of CI_REGISTRY takes them too).
            if is_dp && for_host.as_deref() != Some(authority.as_str()) {
                continue;
            }
            tried.push(format!("{user_var}/{pass_var}"));
            match (env.get(user_var), env.get(pass_var)) {
                (Some(user), Some(secret)) => {
                    let mut source = format!("{user_var}/{pass_var}");
                    if !is_dp && for_host.as_deref().is_some_and(|h| h != authority) {
                        source.push_str(&format!(
                            " (issued for {}, used for {authority})",
                            for_host.unwrap_or_default()
                        ));
                    }
                    self.creds = Some(Creds {
                        user: user.to_owned(),
                        secret: secret.to_owned(),
                        source,
                    });
                    if !logged_in && !is_dp {
                        self.no_docker_login_note(config_path.as_deref(), user_var, pass_var);
                    }
                    return;
                }
                (None, None) => {}
                (user, _) => {
                    let empty = if user.is_none() { user_var } else { pass_var };
                    let how = if env.defined(empty) {
                        "is empty"
                    } else {
                        "is not set"
                    };
                    self.no_creds_detail = format!("{empty} {how}");
                }
            }
        }
        if let Some(token) = env.get("CI_JOB_TOKEN") {
            self.creds = Some(Creds {
                user: "gitlab-ci-token".into(),
                secret: token.to_owned(),
                source: "gitlab-ci-token/CI_JOB_TOKEN".into(),
            });
            self.no_docker_login_note(config_path.as_deref(), "gitlab-ci-token", "CI_JOB_TOKEN");
            return;
        }
        if self.no_creds_detail.is_empty() {
            self.no_creds_detail = format!("looked in: {}", tried.join(", "));
            if tried.is_empty() {
                self.no_creds_detail = "no DOCKER_AUTH_CONFIG, no Docker config.json, no \
                                        CI_REGISTRY_USER/CI_REGISTRY_PASSWORD, no CI_JOB_TOKEN"
                    .into();
            }
        }
    }

    pub(super) fn take_entry(
        &mut self,
        config: &serde_json::Value,
        authority: &str,
        label: &str,
    ) -> Option<Creds> {
        match auths_entry(config, authority)? {
            AuthEntry::Creds { user, secret } => Some(Creds {
                user,
                secret,
                source: format!("{label} (auths.{authority})"),
            }),
            AuthEntry::IdentityToken => {
                self.cred_notes.push((
                    "identity_token",
                    format!(
                        "{label} holds an OAuth identity token for {authority}; GitLab's token \
                         service takes only user and password (HTTP Basic)"
                    ),
                    "docker login with a username and a token instead".into(),
                ));
                None
            }
        }
    }

    pub(super) fn no_docker_login_note(&mut self, config: Option<&Path>, user: &str, pass: &str) {
        let path = config.map_or("~/.docker/config.json".into(), |p| p.display().to_string());
        self.cred_notes.push((
            "no_docker_login",
            format!(
                "no `docker login` for {} in {path}: doctor checks {user}/{pass}, but docker \
                 push goes anonymous unless the job logs in first",
                self.target.authority
            ),
            format!(
                "run `echo \"${pass}\" | docker login -u \"{}\" --password-stdin \"$CI_REGISTRY\"` \
                 before pushing (kaniko: write /kaniko/.docker/config.json)",
                if user.starts_with("CI_") {
                    format!("${user}")
                } else {
                    user.to_owned()
                }
            ),
        ));
    }
}
