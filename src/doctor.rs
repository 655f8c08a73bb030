//! `regrelay doctor`: reads the environment a CI job has, probes the registry and its token
//! service, and names the cause of a failing `docker login`/push in one line with the fix.
//!
//! The probes, in order (each stops the run when nothing after it could be meaningful):
//! 1. `GET /v2/` on the registry (https first; http only when the URL says so or the host is a
//!    loopback one): a 401 with a `Bearer` challenge names the realm and service.
//! 2. When the realm is on another host than the one addressed: `GET /v2/` there. A registry
//!    endpoint answering there is a proxy (regrelay) whose `--public-url` is not the name in use.
//!    So is a realm host that does not answer from here while the registry's own address serves
//!    the realm's path (an anonymous token request answered like a token service, not with a
//!    registry's 404): the run ends there, since the login cannot be checked at a name the job
//!    cannot reach, and the token service is not blamed (`realm_unreachable` is for a realm on
//!    another host that nothing on the registry's address serves).
//! 3. The realm without a scope (what `docker login` asks), never following a redirect. A 403
//!    (credentials without any registry ability vs. a front that strips `Authorization`) is told
//!    apart with real credentials only: GitLab never answers a CI job token 403, so the job's
//!    own `CI_JOB_TOKEN` settles it; without one doctor names both. Doctor never sends a
//!    credential it made up: GitLab's failed-login IP ban would count it against this runner
//!    (or regrelay) for everyone behind it. GitLab's ban itself and Rack::Attack's 429 are
//!    named as such wherever the realm answers them (doctor/refusals.rs).
//! 4. The realm with `scope=repository:<project>:pull,push`: the JWT's payload (not verified)
//!    says what GitLab granted; dropped actions are explained by the credential's kind (the
//!    token's `auth_type`, else the username and token prefix; doctor/grants.rs). A token doctor
//!    cannot read (a regrelay session) is tried on the registry itself: a pull and an upload
//!    that is cancelled. The tag a push will use is checked against protected and immutable tag
//!    rules (doctor/tags.rs).
//! 5. Clocks: `Date` headers and the JWT's `iat`/`nbf`/`exp` against the local clock.
//!
//! Secrets (the password or token, its Basic encoding, every token received) never reach the
//! output: doctor never formats one, text from servers is quoted where it enters a message and
//! searched for them, and the whole output passes a net for what cannot be doctor's own words
//! (doctor/redact.rs). Doctor's own words are never altered: a password that is an ordinary word
//! leaves them as they are, so nothing in them points at it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use http::uri::Authority;
use http::{header, HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::challenge::{self, Challenge};

mod gitlab_answers;
mod grants;
mod patterns;
mod redact;
mod refusals;
mod tags;

use redact::{quote, Redactor};

/// Exit code for a usage error (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;
/// Clock differences above this many seconds are reported.
const SKEW_LIMIT_SECS: i64 = 30;
/// Deadline of one request (connect, answer and body).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer body read.
const MAX_BODY: usize = 256 * 1024;
/// The `client_id` doctor sends to the token service.
const CLIENT_ID: &str = "regrelay-doctor";

/// What `regrelay doctor --help` says after the flags: the variables [`Env`] reads (a CI job's;
/// empty ones count as unset) and the exit codes ([`Status::exit_code`], [`EX_USAGE`]).
const HELP_AFTER: &str = "\
Environment (as a GitLab CI job has it; an empty variable counts as unset):
  CI_REGISTRY                   the registry to check, unless --registry is given
  CI_REGISTRY_USER              username to log in with (with CI_REGISTRY_PASSWORD)
  CI_REGISTRY_PASSWORD          its password or token; never printed
  CI_JOB_TOKEN                  the job's token: logs in as gitlab-ci-token when there is no
                                other login, and tells a stripped Authorization from a token
                                without registry scope; never printed
  CI_PROJECT_PATH               the project to check pull and push on, unless --project
  CI_REGISTRY_IMAGE             the project, from its path, when CI_PROJECT_PATH is not set
  CI_COMMIT_REF_SLUG            the tag a push will use, unless --tag
  CI_API_V4_URL                 GitLab's API, asked whether a project's registry is disabled
  CI_DEPENDENCY_PROXY_SERVER    the Dependency Proxy's host: its own credentials apply there
  CI_DEPENDENCY_PROXY_USER      username for the Dependency Proxy
  CI_DEPENDENCY_PROXY_PASSWORD  its password; never printed
  DOCKER_AUTH_CONFIG            Docker config JSON, read first (what the runner logs in with)
  DOCKER_CONFIG                 directory of Docker's config.json (default $HOME/.docker)
  HOME                          where ~/.docker/config.json is looked for

Exit codes:
  0   ok: no problem found
  1   a credential or permission problem
  2   a network or server problem (TLS, fronts, proxies, clocks, configuration)
  64  usage: no registry known, an unusable flag or variable";

/// `regrelay doctor` flags.
#[derive(Debug, clap::Args)]
#[command(after_help = HELP_AFTER)]
pub struct DoctorArgs {
    /// The registry (or regrelay) to check, `host[:port]` or a URL; default `$CI_REGISTRY`.
    #[arg(long)]
    pub registry: Option<String>,
    /// The project to check pull and push on; default `$CI_PROJECT_PATH` (else the path of
    /// `$CI_REGISTRY_IMAGE`).
    #[arg(long)]
    pub project: Option<String>,
    /// The tag a push will use, checked against protected tag rules; default
    /// `$CI_COMMIT_REF_SLUG`.
    #[arg(long)]
    pub tag: Option<String>,
    /// Extra CA certificate (PEM) for an https registry or token service with a private CA.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// One JSON object (`status`, `findings`) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs the checks; the exit code says ok (0) / credential or permission problem (1) / network
/// or server problem (2) / usage (64).
pub async fn run(args: DoctorArgs) -> ExitCode {
    let env = Env::from_process();
    let setup = match Setup::new(&args, &env) {
        Ok(s) => s,
        Err(msg) => {
            eprintln!("regrelay doctor: {msg}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let http = match Http::new(args.ca_file.as_deref()) {
        Ok(h) => h,
        Err(msg) => {
            eprintln!("regrelay doctor: {msg}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let mut doctor = Doctor {
        http,
        env,
        setup,
        report: Report::default(),
        registry_origin: None,
    };
    doctor.examine().await;
    doctor.report.render_all();
    let status = doctor.report.status();
    let text = if args.json {
        doctor.json()
    } else {
        doctor.text()
    };
    println!("{}", doctor.report.redactor.render(&text));
    ExitCode::from(status.exit_code())
}

// ---------------------------------------------------------------------------------------------
// Findings and the report.

/// What a finding means for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    /// Worth knowing; changes nothing.
    Note,
    /// Credentials, scopes, roles, project settings (exit 1).
    Credentials,
    /// Network, TLS, fronts, clocks, server configuration (exit 2).
    Network,
}

/// One cause with its fix.
#[derive(Debug, Clone)]
struct Finding {
    cause: &'static str,
    class: Class,
    message: String,
    fix: String,
}

/// The overall verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Credentials,
    Network,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Credentials => "credentials",
            Status::Network => "network",
        }
    }

    fn exit_code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Credentials => 1,
            Status::Network => 2,
        }
    }
}

#[derive(Default)]
struct Report {
    /// What was verified and worked, in order.
    checks: Vec<String>,
    findings: Vec<Finding>,
    redactor: Redactor,
}

impl Report {
    fn ok(&mut self, line: impl Into<String>) {
        self.checks.push(line.into());
    }

    fn add(&mut self, cause: &'static str, class: Class, message: String, fix: String) {
        self.findings.push(Finding {
            cause,
            class,
            message,
            fix,
        });
    }

    /// Renders every text (quoted server text searched for secrets, marks removed) before the
    /// output is assembled: JSON escaping would hide a secret holding `"` or `\\` from a pass
    /// over the rendered output.
    fn render_all(&mut self) {
        let r = &self.redactor;
        for c in &mut self.checks {
            *c = r.render(c);
        }
        for f in &mut self.findings {
            f.message = r.render(&f.message);
            f.fix = r.render(&f.fix);
        }
    }

    fn has(&self, cause: &str) -> bool {
        self.findings.iter().any(|f| f.cause == cause)
    }

    fn status(&self) -> Status {
        match self.findings.iter().map(|f| f.class).max() {
            Some(Class::Network) => Status::Network,
            Some(Class::Credentials) => Status::Credentials,
            _ => Status::Ok,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Environment, target, credentials.

/// The CI variables doctor reads (empty values count as unset).
#[derive(Debug, Default, Clone)]
struct Env {
    vars: Vec<(String, String)>,
}

impl Env {
    fn from_process() -> Env {
        Env {
            vars: std::env::vars()
                .filter(|(k, _)| {
                    k.starts_with("CI_")
                        || matches!(k.as_str(), "DOCKER_AUTH_CONFIG" | "DOCKER_CONFIG" | "HOME")
                })
                .collect(),
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    /// True when the variable exists, even empty.
    fn defined(&self, name: &str) -> bool {
        self.vars.iter().any(|(k, _)| k == name)
    }
}

/// The registry as the user named it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// `http` or `https` when the URL said so.
    scheme: Option<&'static str>,
    /// `host[:port]`, lowercase.
    authority: String,
    /// Loopback host: http is tried after https.
    loopback: bool,
}

impl Target {
    fn parse(raw: &str) -> Result<Target, String> {
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

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `host[:port]` of a registry reference or `auths` key: scheme and path removed, lowercase.
fn host_key(s: &str) -> String {
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
fn host_port(authority: &str, scheme: &str) -> (String, u16) {
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
struct Creds {
    user: String,
    secret: String,
    source: String,
}

/// What kind of credential GitLab saw (its `auth_type`), or what it looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
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
    fn from_auth_type(t: &str) -> Option<Kind> {
        Some(match t {
            "build" => Kind::Job,
            "deploy_token" => Kind::Deploy,
            "personal_access_token" => Kind::AccessToken,
            "gitlab_or_ldap" => Kind::Password,
            _ => return None,
        })
    }

    /// From what the credentials look like.
    fn guess(creds: &Creds) -> Kind {
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
enum AuthEntry {
    Creds {
        user: String,
        secret: String,
    },
    /// An `identitytoken` (OAuth refresh token): not usable with GitLab's Basic-only realm.
    IdentityToken,
}

/// Reads `auths.<host>` of a Docker config JSON (`auth` base64 `user:pass`, or `username` +
/// `password`).
fn auths_entry(config: &serde_json::Value, authority: &str) -> Option<AuthEntry> {
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
fn helper_for(config: &serde_json::Value, authority: &str) -> Option<String> {
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
struct Setup {
    target: Target,
    /// Where the registry came from (`--registry` or `CI_REGISTRY`).
    target_source: &'static str,
    project: Option<String>,
    tag: Option<String>,
    creds: Option<Creds>,
    /// Notes about credential sources (helpers, missing `docker login`, empty variables).
    cred_notes: Vec<(&'static str, String, String)>,
    /// Why no credentials were found, when none were.
    no_creds_detail: String,
}

impl Setup {
    fn new(args: &DoctorArgs, env: &Env) -> Result<Setup, String> {
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
    fn find_credentials(&mut self, env: &Env) {
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

    fn take_entry(
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

    fn no_docker_login_note(&mut self, config: Option<&Path>, user: &str, pass: &str) {
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

// ---------------------------------------------------------------------------------------------
// HTTP.

/// An answer, body read (capped).
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    /// Local time when it arrived.
    at: SystemTime,
}

impl Answer {
    fn header(&self, name: &header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// What a refusal says, in whichever of GitLab's formats it came: quoted (a server's words,
    /// searched for secrets when printed).
    fn message(&self) -> String {
        quote(&gitlab_answers::message(&self.headers, &self.body))
    }

    /// The registry-format error code, if any.
    fn code(&self) -> String {
        gitlab_answers::code(&self.body)
    }

    /// The Bearer challenge, if any.
    fn bearer(&self) -> Option<Challenge> {
        self.headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(Challenge::parse)
    }

    /// True when a `WWW-Authenticate: Basic` challenge came.
    fn basic(&self) -> bool {
        self.headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.trim_start().to_ascii_lowercase().starts_with("basic"))
    }
}

/// Why a request got no answer.
#[derive(Debug)]
enum NetError {
    Timeout,
    Tls(String),
    Connect(String),
    Other(String),
}

impl std::fmt::Display for NetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetError::Timeout => write!(f, "no answer within {}s", REQUEST_TIMEOUT.as_secs()),
            // The error chains quote what servers and libraries said.
            NetError::Tls(e) => write!(f, "TLS failed: {}", quote(e)),
            NetError::Connect(e) => write!(f, "cannot connect: {}", quote(e)),
            NetError::Other(e) => f.write_str(&quote(e)),
        }
    }
}

/// The text of an error and its sources, deduplicated; and whether rustls is among them.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> (String, bool) {
    let mut parts: Vec<String> = vec![];
    let mut tls = false;
    let mut cur = Some(err);
    while let Some(e) = cur {
        tls |= is_tls(e, 0);
        let text = e.to_string();
        // hyper-util's own line ("client error (Connect)") names no cause: its sources do.
        let bare = text.starts_with("client error (");
        if !bare && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = e.source();
    }
    (parts.join(": "), tls)
}

/// A rustls error, also inside (nested) `io::Error`s: hyper-rustls wraps tokio-rustls's
/// `io::Error`, and `source()` of an `io::Error` skips the error it holds.
fn is_tls(e: &(dyn std::error::Error + 'static), depth: usize) -> bool {
    if depth > 4 {
        return false;
    }
    if e.downcast_ref::<rustls::Error>().is_some() {
        return true;
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        return is_tls(inner, depth + 1);
    }
    false
}

struct Http {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Http {
    fn new(ca_file: Option<&Path>) -> Result<Http, String> {
        let tls = crate::tls::client_config(ca_file).map_err(|e| e.to_string())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Http {
            client: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(header::HeaderName, String)],
    ) -> Result<Answer, NetError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| NetError::Other(format!("bad URL {url:?}: {e}")))?;
        let mut req = Request::builder().method(method).uri(uri).header(
            header::USER_AGENT,
            concat!("regrelay-doctor/", env!("CARGO_PKG_VERSION")),
        );
        for (name, value) in headers {
            req = req.header(name, value);
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| NetError::Other(e.to_string()))?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                let (text, tls) = error_chain(&e);
                if tls {
                    NetError::Tls(text)
                } else if e.is_connect() {
                    NetError::Connect(text)
                } else {
                    NetError::Other(text)
                }
            })?;
            let at = SystemTime::now();
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
                at,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or(Err(NetError::Timeout))
    }
}

fn basic_header(user: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{secret}")))
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

// ---------------------------------------------------------------------------------------------
// The checks.

/// The registry's challenge, as found.
struct Realm {
    /// `scheme://authority` of the registry that answered.
    base: String,
    url: String,
    service: String,
}

/// What doctor reads from a token (the token itself only goes to the redactor).
struct Token {
    /// The JWT payload, unverified.
    claims: Option<serde_json::Value>,
    /// A regrelay session or another token doctor cannot read.
    opaque: bool,
}

struct Doctor {
    http: Http,
    env: Env,
    setup: Setup,
    report: Report,
    /// `(host, port)` of the registry that answered `/v2/`, once found.
    registry_origin: Option<(String, u16)>,
}

impl Doctor {
    async fn examine(&mut self) {
        if let Some(c) = &self.setup.creds {
            self.report.redactor.add_credential(&c.user, &c.secret);
        }
        // The job token may be sent too (to tell a 403's causes apart), in its own Basic form.
        if let Some(job) = self.env.get("CI_JOB_TOKEN") {
            self.report.redactor.add_credential("gitlab-ci-token", job);
        }
        for (cause, message, fix) in std::mem::take(&mut self.setup.cred_notes) {
            self.report.add(cause, Class::Note, message, fix);
        }
        let Some(realm) = self.probe_registry().await else {
            return;
        };
        if !self.check_realm_host(&realm).await {
            return;
        }
        let Some(creds) = self.setup.creds.clone() else {
            self.report.add(
                "no_credentials",
                Class::Credentials,
                format!(
                    "no credentials for {} ({}): docker login never happened or read an empty \
                     variable, so clients go anonymous and pushes are refused ('unauthorized: \
                     authentication required' / 'denied: access forbidden')",
                    self.setup.target.authority, self.setup.no_creds_detail
                ),
                "log in before pushing: echo \"$CI_REGISTRY_PASSWORD\" | docker login -u \
                 \"$CI_REGISTRY_USER\" --password-stdin \"$CI_REGISTRY\" (or set \
                 DOCKER_AUTH_CONFIG); check that the variables you use exist in this job"
                    .into(),
            );
            return;
        };
        let Some(realm_url) = self.login(&realm, &creds).await else {
            return;
        };
        if realm.service == "dependency_proxy" {
            self.report.ok(
                "Dependency Proxy: GitLab checks group access on each pull, not in the token; \
                 pull an image through it to check the group",
            );
            return;
        }
        let Some(project) = self.setup.project.clone() else {
            self.report.add(
                "no_project",
                Class::Note,
                "no project to check pull and push on: only the login was checked".into(),
                "set CI_PROJECT_PATH or pass --project GROUP/PROJECT".into(),
            );
            return;
        };
        self.check_project(&realm, &realm_url, &creds, &project)
            .await;
    }

    /// `GET /v2/`: the registry's challenge, or the finding that ends the run.
    async fn probe_registry(&mut self) -> Option<Realm> {
        let target = self.setup.target.clone();
        let schemes: Vec<&str> = match target.scheme {
            Some(s) => vec![s],
            None if target.loopback => vec!["https", "http"],
            None => vec!["https"],
        };
        let mut failures = vec![];
        let mut found = None;
        for scheme in &schemes {
            let url = format!("{scheme}://{}/v2/", target.authority);
            match self.http.send(Method::GET, &url, &[]).await {
                Ok(a) => {
                    found = Some((format!("{scheme}://{}", target.authority), a));
                    break;
                }
                Err(e) => failures.push((url, e)),
            }
        }
        let tls = failures.iter().find(|(_, e)| matches!(e, NetError::Tls(_)));
        // https failed in TLS and plain http got a 400 ("an HTTP request to an HTTPS server") or
        // nothing: an https registry whose certificate is not trusted here.
        let tls_only = tls.is_some()
            && found
                .as_ref()
                .map_or(true, |(_, a)| a.status == StatusCode::BAD_REQUEST);
        let found = found.filter(|_| !tls_only);
        let Some((base, answer)) = found else {
            let detail: Vec<String> = failures.iter().map(|(u, e)| format!("{u}: {e}")).collect();
            if let Some((url, e)) = tls {
                self.report.add(
                    "tls_error",
                    Class::Network,
                    format!("{url}: {e}"),
                    "give the registry's CA with --ca-file (and to the clients: \
                     /etc/docker/certs.d/HOST/ca.crt); if the registry speaks plain http, say \
                     http://HOST explicitly (clients then need it in insecure-registries)"
                        .into(),
                );
            } else {
                self.report.add(
                    "registry_unreachable",
                    Class::Network,
                    format!(
                        "the registry {} ({}) does not answer: {}",
                        target.authority,
                        self.setup.target_source,
                        detail.join("; ")
                    ),
                    "check the host and port (CI_REGISTRY), DNS, firewalls and HTTP proxies \
                     between the runner and the registry, and that the registry runs"
                        .into(),
                );
            }
            return None;
        };
        self.skew_from_date("registry", &answer);
        let scheme = base.split("://").next().unwrap_or("https");
        self.registry_origin = Some(host_port(&target.authority, scheme));
        let url = format!("{base}/v2/");
        if self.limits_refusal(&url, &answer) {
            return None;
        }
        match answer.status {
            StatusCode::OK => {
                self.report.add(
                    "no_auth",
                    Class::Note,
                    format!("{url} answers 200 without credentials: the registry asks for no auth"),
                    "nothing to do, unless it should ask (then its auth section is missing)".into(),
                );
                None
            }
            StatusCode::UNAUTHORIZED => {
                if let Some(c) = answer.bearer() {
                    let Some(realm) = c.get("realm").filter(|r| {
                        r.parse::<Uri>().is_ok_and(|u| {
                            matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
                        })
                    }) else {
                        self.report.add(
                            "bad_challenge",
                            Class::Network,
                            format!("{url} asks for a Bearer token without a usable realm URL"),
                            "set the registry's auth.token.realm to GitLab's https://GITLAB/jwt/auth"
                                .into(),
                        );
                        return None;
                    };
                    let service = c.get("service").unwrap_or("").to_owned();
                    self.report.ok(format!(
                        "registry {base}: /v2/ asks for a Bearer token from {realm} (service {service})"
                    ));
                    return Some(Realm {
                        base,
                        url: realm.to_owned(),
                        service,
                    });
                }
                if answer.basic() {
                    self.check_basic_registry(&base).await;
                    return None;
                }
                self.report.add(
                    "not_a_registry",
                    Class::Network,
                    format!("{url} answers 401 without a Bearer or Basic challenge"),
                    "a proxy in front of the registry may answer instead of it: check what \
                     listens on this address"
                        .into(),
                );
                None
            }
            status => {
                let api = answer
                    .headers
                    .contains_key("docker-distribution-api-version");
                let what = answer
                    .header(&header::CONTENT_TYPE)
                    .map_or_else(|| "no content type".into(), quote);
                self.report.add(
                    "not_a_registry",
                    Class::Network,
                    format!(
                        "{url} answers {status} ({what}{}): not the registry API's 401 or 200",
                        if api { ", a registry" } else { "" }
                    ),
                    format!(
                        "check that {} ({}) is the registry's address, not GitLab's web UI, a \
                         login page or a load balancer's error page; a 5xx is the registry or a \
                         proxy failing",
                        target.authority, self.setup.target_source
                    ),
                );
                None
            }
        }
    }

    /// A registry with Basic auth (not GitLab's): checks the credentials on `/v2/` directly.
    async fn check_basic_registry(&mut self, base: &str) {
        let url = format!("{base}/v2/");
        let Some(creds) = self.setup.creds.clone() else {
            self.report.add(
                "no_credentials",
                Class::Credentials,
                format!(
                    "{url} asks for Basic credentials and none were found ({})",
                    self.setup.no_creds_detail
                ),
                "docker login to the registry first".into(),
            );
            return;
        };
        let auth = basic_header(&creds.user, &creds.secret);
        match self
            .http
            .send(Method::GET, &url, &[(header::AUTHORIZATION, auth)])
            .await
        {
            Ok(a) if a.status == StatusCode::OK => self.report.ok(format!(
                "registry {base} uses Basic auth (not GitLab's token auth) and accepts user {}",
                creds.user
            )),
            Ok(a) => self.report.add(
                "bad_credentials",
                Class::Credentials,
                format!(
                    "{url} (Basic auth, not GitLab's token auth) refuses user {} from {}: {}",
                    creds.user, creds.source, a.status
                ),
                "use the credentials this registry's htpasswd knows".into(),
            ),
            Err(e) => self.report.add(
                "registry_unreachable",
                Class::Network,
                format!("{url}: {e}"),
                "check the network between the runner and the registry".into(),
            ),
        }
    }

    /// The realm on another host than the one addressed: GitLab's normal layout, or a proxy
    /// (regrelay) whose public name is not the one clients use. False when the run ends here
    /// (the realm cannot be reached from here, and the registry's address serves it itself).
    async fn check_realm_host(&mut self, realm: &Realm) -> bool {
        let realm_uri: Uri = realm.url.parse().expect("checked in probe_registry");
        let realm_scheme = realm_uri.scheme_str().unwrap_or("https");
        let realm_auth = realm_uri
            .authority()
            .map(|a| a.as_str().to_ascii_lowercase())
            .unwrap_or_default();
        let reg_scheme = realm.base.split("://").next().unwrap_or("https");
        let reg_auth = self.setup.target.authority.clone();
        if host_port(&realm_auth, realm_scheme) == host_port(&reg_auth, reg_scheme) {
            return true;
        }
        let origin = format!("{realm_scheme}://{realm_auth}");
        let named_fix = format!(
            "add the name clients use to regrelay: --public-url {reg_scheme}://{reg_auth} \
             (--public-url may be given once per name clients use: each client gets the realm \
             of the name it used), or make clients use {realm_auth}"
        );
        match self
            .http
            .send(Method::GET, &format!("{origin}/v2/"), &[])
            .await
        {
            Ok(a)
                if a.status == StatusCode::UNAUTHORIZED
                    && a.bearer()
                        .is_some_and(|c| c.get("service").unwrap_or("") == realm.service) =>
            {
                self.report.add(
                    "public_url_mismatch",
                    Class::Network,
                    format!(
                        "the registry at {reg_auth} sends clients to authenticate at \
                         {realm_auth} ({}), which is itself a registry endpoint: the proxy's \
                         public URL (regrelay --public-url) is not the name clients use; clients \
                         get tokens from {realm_auth} while they push to {reg_auth}, which shows \
                         as a bare 401 on the upload PUT",
                        realm.url
                    ),
                    named_fix,
                );
                true
            }
            Err(e) if !matches!(e, NetError::Tls(_)) && self.serves_realm_itself(realm).await => {
                self.report.add(
                    "public_url_mismatch",
                    Class::Network,
                    format!(
                        "the realm named in the challenge of {reg_auth}, {} (host {realm_auth}), \
                         is not reachable from here ({e}), and it differs from the registry \
                         address in use, {reg_auth}, which serves that token endpoint itself: \
                         it is a proxy (regrelay) whose --public-url names {realm_auth}, not the \
                         name this job reaches it by, so docker login here fails before any \
                         credential is checked (the token service is not at fault; doctor \
                         checked no login)",
                        realm.url
                    ),
                    format!(
                        "set regrelay's --public-url to the name clients use, --public-url \
                         {reg_scheme}://{reg_auth}, or add that name as a further --public-url \
                         (it may be given once per name clients use); or make {realm_auth} \
                         resolve and reach regrelay from the runners"
                    ),
                );
                false
            }
            _ => {
                self.report.add(
                    "realm_on_other_host",
                    Class::Note,
                    format!(
                        "clients will authenticate at {realm_auth} ({}), not at the registry \
                         host {reg_auth}: that is GitLab's usual layout, but that host must be \
                         reachable from every client and its certificate trusted",
                        realm.url
                    ),
                    format!(
                        "nothing, if {realm_auth} is reachable from the runners (doctor reached \
                         it from here if no other finding says otherwise)"
                    ),
                );
                true
            }
        }
    }

    /// True when the registry's own address answers the realm's path like a token service (a
    /// token, or a refusal of the anonymous login: not the 404 a registry gives for a path it
    /// does not serve): a proxy in front of the registry serves the realm there.
    async fn serves_realm_itself(&mut self, realm: &Realm) -> bool {
        let Ok(uri) = realm.url.parse::<Uri>() else {
            return false;
        };
        let url = format!("{}{}", realm.base, uri.path());
        // Anonymous, as `docker login` starts: no credential, nothing the IP ban counts.
        let Ok(answer) = self
            .token_request(&url, &realm.service, None, "", None)
            .await
        else {
            return false;
        };
        let v: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
        for field in ["token", "access_token", "refresh_token"] {
            if let Some(t) = v[field].as_str() {
                self.report.redactor.add_issued(t);
            }
        }
        match answer.status {
            StatusCode::OK => v["token"].is_string() || v["access_token"].is_string(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS => {
                true
            }
            _ => false,
        }
    }

    /// A token request to `realm_url` for `scope` (none: the login) with `auth`.
    async fn token_request(
        &self,
        realm_url: &str,
        service: &str,
        scope: Option<&str>,
        user: &str,
        auth: Option<String>,
    ) -> Result<Answer, NetError> {
        let mut query = format!(
            "service={}&client_id={CLIENT_ID}&account={}",
            challenge::percent_encode(service),
            challenge::percent_encode(user)
        );
        if let Some(s) = scope {
            query.push_str("&scope=");
            query.push_str(&challenge::percent_encode(s));
        }
        let sep = if realm_url.contains('?') { '&' } else { '?' };
        let headers: Vec<_> = auth
            .into_iter()
            .map(|a| (header::AUTHORIZATION, a))
            .collect();
        self.http
            .send(Method::GET, &format!("{realm_url}{sep}{query}"), &headers)
            .await
    }

    /// The login `docker login` does: the realm without a scope. Returns the realm URL to use
    /// from then on (the redirect target after an `auth_redirect`), or `None` when the run ends.
    async fn login(&mut self, realm: &Realm, creds: &Creds) -> Option<String> {
        let auth = basic_header(&creds.user, &creds.secret);
        let mut url = realm.url.clone();
        let mut answer = self
            .realm_call(&url, &realm.service, None, &creds.user, Some(auth.clone()))
            .await?;
        if answer.status.is_redirection() {
            let location = answer.header(&header::LOCATION).unwrap_or("").to_owned();
            let target = resolve(&url, &location);
            let shown = target
                .as_deref()
                .and_then(|t| t.parse::<Uri>().ok())
                .and_then(|u| Some(format!("{}://{}", u.scheme_str()?, u.authority()?)))
                .map_or_else(|| "an unusable Location".into(), |o| quote(&o));
            let realm_origin = url
                .parse::<Uri>()
                .ok()
                .and_then(|u| Some(format!("{}://{}", u.scheme_str()?, u.authority()?)))
                .unwrap_or_default();
            self.report.add(
                "auth_redirect",
                Class::Network,
                format!(
                    "a front redirects /jwt/auth: {realm_origin} answers {} with a redirect to \
                     {shown}; clients drop Authorization on a redirect to another host (Go's \
                     client, used by Docker, skopeo, containerd), so GitLab sees an anonymous \
                     login and answers 'access forbidden' (or a token without push: 'denied: \
                     requested access to the resource is denied')",
                    answer.status.as_u16()
                ),
                "serve /jwt/auth on the registry host itself: proxy it to GitLab keeping \
                 Authorization instead of redirecting, or put regrelay in front of the registry \
                 (it serves /jwt/auth on the registry's name and asks GitLab itself)"
                    .into(),
            );
            // The credentials themselves are still worth checking, at the redirect's target.
            // The realm is the target without the redirect's query (doctor sends its own).
            url = target?.split('?').next().unwrap_or_default().to_owned();
            answer = self
                .realm_call(&url, &realm.service, None, &creds.user, Some(auth))
                .await?;
            if answer.status.is_redirection() {
                return None;
            }
        }
        match answer.status {
            StatusCode::OK => {
                let token = self.read_token(&answer)?;
                self.skew_from_token(&answer, &token);
                if token.opaque {
                    self.report.ok(format!(
                        "login: {url} accepts user {} from {} (its token is a proxy session, \
                         e.g. regrelay's, that doctor cannot read)",
                        creds.user, creds.source
                    ));
                } else {
                    self.report.ok(format!(
                        "login: {url} accepts user {} from {}",
                        creds.user, creds.source
                    ));
                }
                Some(url)
            }
            StatusCode::UNAUTHORIZED => {
                self.bad_credentials(&answer, creds);
                None
            }
            StatusCode::FORBIDDEN => {
                self.forbidden_login(&url, &realm.service, &answer, creds)
                    .await;
                None
            }
            _ => {
                self.realm_refusal(&url, &realm.service, &answer);
                None
            }
        }
    }

    /// One realm request; a network failure (`realm_unreachable`), GitLab's failed-login IP ban
    /// or a rate limit is reported and ends the run.
    async fn realm_call(
        &mut self,
        url: &str,
        service: &str,
        scope: Option<&str>,
        user: &str,
        auth: Option<String>,
    ) -> Option<Answer> {
        match self.token_request(url, service, scope, user, auth).await {
            Ok(a) if self.limits_refusal(url, &a) => None,
            Ok(a) => Some(a),
            Err(e) => {
                let (cause, fix) = match e {
                    NetError::Tls(_) => (
                        "tls_error",
                        "give the token service's CA with --ca-file (clients need it too)",
                    ),
                    _ => (
                        "realm_unreachable",
                        "the realm in the registry's challenge must be reachable from the \
                         runner: check DNS, firewalls and HTTP proxies (NO_PROXY), or the \
                         registry's auth.token.realm",
                    ),
                };
                self.report.add(
                    cause,
                    Class::Network,
                    format!("the token service {url} does not answer: {e}"),
                    fix.into(),
                );
                None
            }
        }
    }

    /// Reads `{"token": …}`; a missing token is reported.
    fn read_token(&mut self, answer: &Answer) -> Option<Token> {
        let v: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
        let Some(raw) = v["token"].as_str().or_else(|| v["access_token"].as_str()) else {
            self.report.add(
                "realm_error",
                Class::Network,
                "the token service answered 200 without a token: it is not GitLab's /jwt/auth"
                    .into(),
                "check the registry's auth.token.realm".into(),
            );
            return None;
        };
        self.report.redactor.add_issued(raw);
        if let Some(r) = v["refresh_token"].as_str() {
            self.report.redactor.add_issued(r);
        }
        let claims = Some(raw)
            .filter(|raw| raw.split('.').count() == 3)
            .and_then(challenge::jwt_claims)
            .filter(|c| c.is_object());
        Some(Token {
            opaque: claims.is_none(),
            claims,
        })
    }

    /// The token for `repository:<project>:pull,push`, and what GitLab dropped.
    async fn check_project(&mut self, realm: &Realm, url: &str, creds: &Creds, project: &str) {
        let scope = format!("repository:{project}:pull,push");
        let auth = basic_header(&creds.user, &creds.secret);
        let Some(answer) = self
            .realm_call(url, &realm.service, Some(&scope), &creds.user, Some(auth))
            .await
        else {
            return;
        };
        match answer.status {
            StatusCode::OK => {}
            StatusCode::FORBIDDEN => {
                let message = answer.message();
                if message.contains("protected repository path") {
                    self.report.add(
                        "protected_path",
                        Class::Credentials,
                        format!(
                            "GitLab refuses a push token for {project}: 403 \"{message}\" (a \
                             protected container repository rule; this role is below its \
                             minimum)"
                        ),
                        "push as a role the rule allows (Settings → Packages and registries → \
                         Protected container repositories), or push to another path"
                            .into(),
                    );
                } else {
                    self.realm_refusal(url, &realm.service, &answer);
                }
                return;
            }
            StatusCode::UNAUTHORIZED => {
                self.bad_credentials(&answer, creds);
                return;
            }
            _ => {
                self.realm_refusal(url, &realm.service, &answer);
                return;
            }
        }
        let Some(token) = self.read_token(&answer) else {
            return;
        };
        self.skew_from_token(&answer, &token);
        let raw = serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v["token"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let (pull, push, entry) = match &token.claims {
            Some(claims) => {
                let entry = claims["access"].as_array().and_then(|a| {
                    a.iter()
                        .find(|e| e["type"] == "repository" && e["name"] == project)
                        .cloned()
                });
                let has = |action: &str| {
                    entry.as_ref().is_some_and(|e| {
                        e["actions"]
                            .as_array()
                            .is_some_and(|acts| acts.iter().any(|a| a == action || a == "*"))
                    })
                };
                (has("pull"), has("push"), entry)
            }
            None => match self.try_on_registry(realm, &raw, project).await {
                Some((pull, push)) => (pull, push, None),
                None => return,
            },
        };
        let kind = token
            .claims
            .as_ref()
            .and_then(|c| c["auth_type"].as_str())
            .and_then(Kind::from_auth_type)
            .unwrap_or_else(|| Kind::guess(creds));
        if pull && push {
            self.report.ok(format!(
                "pull and push on {project} granted to user {}",
                creds.user
            ));
            if let Some(entry) = &entry {
                self.check_protected_tags(project, entry);
                self.check_immutable_tags(realm, &raw, project, entry).await;
            }
            return;
        }
        if pull {
            self.report
                .ok(format!("pull on {project} granted to user {}", creds.user));
        }
        self.explain_drop(kind, creds, project, pull, push).await;
    }

    /// A token doctor cannot read (a regrelay session): a pull and a cancelled upload on the
    /// registry say what it allows. `None` when the registry gave no usable answer.
    async fn try_on_registry(
        &mut self,
        realm: &Realm,
        token: &str,
        project: &str,
    ) -> Option<(bool, bool)> {
        let bearer = (header::AUTHORIZATION, format!("Bearer {token}"));
        let base = &realm.base;
        let pull = self
            .http
            .send(
                Method::GET,
                &format!("{base}/v2/{project}/tags/list"),
                std::slice::from_ref(&bearer),
            )
            .await;
        let push = self
            .http
            .send(
                Method::POST,
                &format!("{base}/v2/{project}/blobs/uploads/"),
                std::slice::from_ref(&bearer),
            )
            .await;
        let (pull, push) = match (pull, push) {
            (Ok(pull), Ok(push)) => (pull, push),
            (Err(e), _) | (_, Err(e)) => {
                self.report.add(
                    "registry_unreachable",
                    Class::Network,
                    format!("{base} stopped answering while doctor tried the token: {e}"),
                    "check the registry and the network".into(),
                );
                return None;
            }
        };
        if push.status == StatusCode::ACCEPTED {
            if let Some(location) = push
                .header(&header::LOCATION)
                .and_then(|l| resolve(base, l))
            {
                // Cancel the upload doctor started.
                let _ = self
                    .http
                    .send(Method::DELETE, &location, std::slice::from_ref(&bearer))
                    .await;
            }
        }
        let allowed = |a: &Answer, ok: &[StatusCode]| -> Option<bool> {
            if ok.contains(&a.status) {
                Some(true)
            } else if matches!(a.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                Some(false)
            } else {
                None
            }
        };
        let pull_ok = allowed(&pull, &[StatusCode::OK, StatusCode::NOT_FOUND]);
        let push_ok = allowed(&push, &[StatusCode::ACCEPTED, StatusCode::CREATED]);
        match (pull_ok, push_ok) {
            (Some(pull), Some(push)) => {
                self.report.ok(format!(
                    "the token service's token is opaque (a proxy session): tried on the \
                     registry instead: pull {}, push {}",
                    if pull { "allowed" } else { "denied" },
                    if push { "allowed" } else { "denied" }
                ));
                Some((pull, push))
            }
            _ => {
                self.report.add(
                    "grants_unknown",
                    Class::Note,
                    format!(
                        "the token is opaque (a proxy session) and the registry answered {} to \
                         a pull and {} to an upload: doctor cannot tell what is granted",
                        pull.status.as_u16(),
                        push.status.as_u16()
                    ),
                    "push an image to check".into(),
                );
                None
            }
        }
    }

    /// A `Date` header more than [`SKEW_LIMIT_SECS`] off the local clock.
    fn skew_from_date(&mut self, who: &str, answer: &Answer) {
        let Some(date) = answer.header(&header::DATE).and_then(parse_http_date) else {
            return;
        };
        let offset = date - unix(answer.at);
        if offset.abs() > SKEW_LIMIT_SECS {
            self.clock_skew(format!(
                "the {who}'s clock is {} (its Date header)",
                describe_offset(offset)
            ));
        }
    }

    /// GitLab's `Date` and the token's `iat`/`nbf`/`exp` against the local clock.
    fn skew_from_token(&mut self, answer: &Answer, token: &Token) {
        if self.report.has("clock_skew") {
            return;
        }
        let local = unix(answer.at);
        let date = answer.header(&header::DATE).and_then(parse_http_date);
        let claim = |name: &str| token.claims.as_ref().and_then(|c| c.get(name)?.as_i64());
        let (iat, nbf, exp) = (claim("iat"), claim("nbf"), claim("exp"));
        let mut facts = vec![];
        if let Some(iat) = iat {
            let off = iat - local;
            if off.abs() > SKEW_LIMIT_SECS {
                facts.push(format!(
                    "GitLab's clock is {} (the token's iat)",
                    describe_offset(off)
                ));
            }
        } else if let Some(date) = date {
            let off = date - local;
            if off.abs() > SKEW_LIMIT_SECS {
                facts.push(format!(
                    "the token service's clock is {} (its Date header)",
                    describe_offset(off)
                ));
            }
        }
        if let Some(exp) = exp.filter(|e| *e <= local) {
            facts.push(format!(
                "the token was already expired on arrival (exp {} s ago by this runner's clock)",
                local - exp
            ));
        }
        if let Some(nbf) = nbf.filter(|n| *n > local) {
            facts.push(format!(
                "the token is not valid yet by this runner's clock (nbf {} s ahead)",
                nbf - local
            ));
        }
        if !facts.is_empty() {
            self.clock_skew(facts.join("; "));
        }
    }

    fn clock_skew(&mut self, what: String) {
        if let Some(f) = self
            .report
            .findings
            .iter_mut()
            .find(|f| f.cause == "clock_skew")
        {
            f.message = format!("{what}; {}", f.message);
            return;
        }
        self.report.add(
            "clock_skew",
            Class::Network,
            format!(
                "{what}: registries allow 60 s of leeway on a token's nbf and exp, and clients \
                 that time tokens by the local clock renew them too late or too early, so logins \
                 and pushes fail with 401s that look like credential problems"
            ),
            "fix NTP on the runner or GitLab host, whichever is wrong (timedatectl status; \
             chrony or systemd-timesyncd)"
                .into(),
        );
    }

    // -----------------------------------------------------------------------------------------
    // Output.

    fn summary(&self) -> String {
        let status = self.report.status();
        let errors: Vec<&str> = self
            .report
            .findings
            .iter()
            .filter(|f| f.class != Class::Note)
            .map(|f| f.cause)
            .collect();
        match status {
            Status::Ok => match &self.setup.project {
                Some(p)
                    if self
                        .report
                        .checks
                        .iter()
                        .any(|c| c.contains("pull and push on")) =>
                {
                    format!("ok: pull and push on {p} work with these credentials")
                }
                _ => "ok: no problem found".into(),
            },
            Status::Credentials => format!(
                "credential or permission problem (exit 1): {}",
                errors.join(", ")
            ),
            Status::Network => format!("network or server problem (exit 2): {}", errors.join(", ")),
        }
    }

    fn header_line(&self) -> String {
        let creds = match &self.setup.creds {
            Some(c) => format!("user {} from {}", c.user, c.source),
            None => "none found".into(),
        };
        format!(
            "regrelay doctor: registry {} (from {}), project {}, credentials: {creds}",
            self.setup.target.authority,
            self.setup.target_source,
            self.setup.project.as_deref().unwrap_or("(none)"),
        )
    }

    fn text(&self) -> String {
        let mut out = vec![self.header_line()];
        for c in &self.report.checks {
            out.push(format!("ok    {c}"));
        }
        let mut findings: Vec<&Finding> = self.report.findings.iter().collect();
        findings.sort_by_key(|f| std::cmp::Reverse(f.class));
        for f in findings {
            let label = if f.class == Class::Note {
                "note"
            } else {
                "FAIL"
            };
            out.push(format!(
                "{label}  {}: {}. Fix: {}.",
                f.cause,
                f.message.trim_end_matches('.'),
                f.fix.trim_end_matches('.')
            ));
        }
        out.push(format!("summary: {}", self.summary()));
        out.join("\n")
    }

    fn json(&self) -> String {
        let status = self.report.status();
        let findings: Vec<serde_json::Value> = self
            .report
            .findings
            .iter()
            .map(|f| {
                serde_json::json!({
                    "cause": f.cause,
                    "severity": if f.class == Class::Note { "note" } else { "error" },
                    "class": match f.class {
                        Class::Note => "note",
                        Class::Credentials => "credentials",
                        Class::Network => "network",
                    },
                    "message": f.message,
                    "fix": f.fix,
                })
            })
            .collect();
        serde_json::json!({
            "status": status.name(),
            "exit_code": status.exit_code(),
            "registry": self.setup.target.authority,
            "project": self.setup.project,
            "credentials": self.setup.creds.as_ref().map(|c| serde_json::json!({
                "source": c.source, "user": c.user,
            })),
            "checks": self.report.checks,
            "findings": findings,
            "summary": self.summary(),
        })
        .to_string()
    }
}

/// `location` resolved against `base` (absolute, or a path on `base`'s origin).
fn resolve(base: &str, location: &str) -> Option<String> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return Some(location.to_owned());
    }
    let uri: Uri = base.parse().ok()?;
    let origin = format!("{}://{}", uri.scheme_str()?, uri.authority()?);
    location
        .starts_with('/')
        .then(|| format!("{origin}{location}"))
}

fn describe_offset(off: i64) -> String {
    if off > 0 {
        format!("{off} s ahead of this runner's")
    } else {
        format!("{} s behind this runner's", -off)
    }
}

/// An HTTP date (`Date`) in Unix seconds.
fn parse_http_date(s: &str) -> Option<i64> {
    httpdate::parse_http_date(s).ok().map(unix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_parse() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2000 00:00:00 GMT"),
            Some(951_782_400)
        );
        assert_eq!(parse_http_date("not a date"), None);
    }

    #[test]
    fn targets_parse() {
        let t = Target::parse("Registry.Example.com:5050").unwrap();
        assert_eq!(
            (t.scheme, t.authority.as_str(), t.loopback),
            (None, "registry.example.com:5050", false)
        );
        let t = Target::parse("http://127.0.0.1:5000/v2/").unwrap();
        assert_eq!(
            (t.scheme, t.authority.as_str(), t.loopback),
            (Some("http"), "127.0.0.1:5000", true)
        );
        assert!(Target::parse("localhost").unwrap().loopback);
        assert!(Target::parse("[::1]:5000").unwrap().loopback);
        assert!(Target::parse("ftp://x").is_err());
        assert!(Target::parse("user:pw@host").is_err());
        assert!(Target::parse("").is_err());
    }

    #[test]
    fn docker_config_entries() {
        let config: serde_json::Value = serde_json::json!({
            "auths": {
                "https://registry.example.com/v1/": {"auth": STANDARD.encode("u:p:with:colons")},
                "other:5000": {"username": "a", "password": "b"},
                "oauth.example": {"identitytoken": "x"},
            },
            "credHelpers": {"helped.example": "ecr-login"},
            "credsStore": "desktop",
        });
        let Some(AuthEntry::Creds { user, secret }) = auths_entry(&config, "registry.example.com")
        else {
            panic!("auth entry")
        };
        assert_eq!((user.as_str(), secret.as_str()), ("u", "p:with:colons"));
        let Some(AuthEntry::Creds { user, .. }) = auths_entry(&config, "other:5000") else {
            panic!("username entry")
        };
        assert_eq!(user, "a");
        assert!(matches!(
            auths_entry(&config, "oauth.example"),
            Some(AuthEntry::IdentityToken)
        ));
        assert!(auths_entry(&config, "missing").is_none());
        assert_eq!(
            helper_for(&config, "helped.example").as_deref(),
            Some("docker-credential-ecr-login")
        );
        assert_eq!(
            helper_for(&config, "x").as_deref(),
            Some("docker-credential-desktop")
        );
    }
}
