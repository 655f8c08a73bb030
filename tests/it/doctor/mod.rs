//! `regrelay doctor` against the GitLab stand-in, Debian's real `docker-registry`, a real nginx
//! front and a real regrelay: each diagnosis from the troubleshooting guide (seeds/
//! gitlab-ci-401-troubleshooting.txt) and from GitLab's own behaviour
//! (shared/reference/gitlab-behaviour.md) in a CI job's environment, its exit code, its cause id
//! in `--json`, and no secret (password, token, Basic encoding, issued JWT) in either output
//! mode. This file is the rig (running doctor, CI environments, fronts); the scenarios:
//! - `basics`: all good, no credentials, unreachable or untrusted registries, a self-signed
//!   CA-flagged certificate as its own CA file, clocks, a regrelay's public URL (reachable from
//!   the job or not), a disabled registry, the Dependency Proxy's own credentials, `--help`.
//! - `logins`: the login's refusals: wrong or expired tokens, a token without any registry
//!   ability (told apart from a front that strips `Authorization` without a made-up login),
//!   fronts that redirect or strip, GitLab's failed-login IP ban, Rack::Attack's 429, the
//!   Dependency Proxy's scopes, a password that is an ordinary word (the output is the same as
//!   with any other wrong password: nothing points at it).
//! - `grants`: what GitLab granted and why the rest was dropped: `read_api`, job tokens, project
//!   and group deploy tokens, EE maintenance mode, protected and immutable tags.

use crate::support;

mod basics;
mod grants;
mod logins;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use support::gitlab::{gitlab, CiJob, Credential, GitLab, GitLabBuilder, Role, TokenScope};
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
/// GitLab with USER a Developer of PROJECT (her read/write PAT), its registry, and the
/// registry's `host:port`.
async fn developer() -> (GitLab, Registry, String) {
    let gl = gitlab()
        .credential(pat(USER, PAT))
        .project(PROJECT, false, &[(USER, Role::Developer)])
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    let host = reg.addr.to_string();
    (gl, reg, host)
}

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

/// GitLab's failed-login IP ban, on, with nothing whitelisted: every failed Basic login from
/// 127.0.0.1 counts (GitLab's typical 10 in 60 s, banned for 1 h).
fn with_ip_ban(b: GitLabBuilder) -> GitLabBuilder {
    b.ip_ban(10, Duration::from_secs(60), Duration::from_secs(3600))
        .ip_whitelist(&[])
}

/// No login doctor sent was refused as a wrong password (GitLab's `401`), and the IP ban
/// counted nothing against the address doctor runs from.
fn assert_no_failed_login(gl: &GitLab) {
    let refused: Vec<_> = gl.seen().into_iter().filter(|s| s.status == 401).collect();
    assert!(refused.is_empty(), "logins GitLab refused: {refused:?}");
    assert_eq!(gl.ip_failures("127.0.0.1"), 0, "failed logins counted");
    assert!(gl.banned_ips().is_empty());
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

/// Failed Basic logins at `gl`'s `/jwt/auth` from 127.0.0.1 (a revoked deploy token in a CI
/// variable, retried by jobs) until GitLab bans the address: 10 within one of the ban's
/// epoch-aligned windows (more when the first ones fall at the end of a window).
async fn get_banned(gl: &GitLab) {
    let basic = STANDARD.encode("gitlab+deploy-token-9:gldt-RevokedLongAgo000000");
    let mut sent = 0;
    while gl.banned_ips().is_empty() {
        assert!(sent < 30, "not banned after {sent} failed logins");
        let req = http::Request::get(format!("{}?service=container_registry", gl.realm()))
            .header("authorization", format!("Basic {basic}"))
            .body(regrelay::body::empty())
            .unwrap();
        let resp = support::upstream::client().request(req).await.unwrap();
        assert_eq!(resp.status(), 401);
        sent += 1;
    }
}
