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

use crate::challenge::{self, Challenge};

mod client;
mod clock;
mod gitlab_answers;
mod grants;
mod login;
mod patterns;
mod project;
mod redact;
mod refusals;
mod registry;
mod report;
mod setup;
mod tags;

use client::*;
use redact::{quote, Redactor};
use report::*;
use setup::*;

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
// The run: what the probes share, and their order.

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
}

#[cfg(test)]
mod tests {
    use super::clock::parse_http_date;
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
