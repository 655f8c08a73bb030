//! The GitLab stand-in (tests/support/gitlab.rs) answers as GitLab's source does: one table test
//! per row, or group of rows of one GitLab file, of shared/reference/gitlab-behaviour.md, each
//! naming the file it mirrors and checking the stand-in's answers directly (status, content
//! type, body, headers, token claims). Every auth test relies on these rules.
//! - `jwt`: `/jwt/auth` routes, query, credentials, grants, abilities, deploy and job tokens,
//!   maintenance mode.
//! - `claims`: the tokens' claims, and the real registry (Debian's `docker-registry`) accepting
//!   them.
//! - `limits`: whose IP a request is, the failed-login IP ban, account lockout, Rack::Attack's
//!   429.
//! - `dp`: the Dependency Proxy's token service, challenge, and who may read it.

use crate::support;

mod claims;
mod dp;
mod jwt;
mod limits;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use regrelay::body::{self, ProxyBody};
use support::gitlab::{Credential, TokenScope};
use support::upstream::client;

/// Basic credentials (`user`, `secret`), or none.
type Creds<'a> = Option<(&'a str, &'a str)>;

/// What the stand-in answered.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn content_type(&self) -> Option<&str> {
        self.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
    }

    /// The token of a `200` whose body is exactly `{"token":…}`.
    fn token(&self) -> String {
        assert_eq!(self.status, StatusCode::OK, "{self:?}");
        let v: serde_json::Value = serde_json::from_str(&self.body).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.keys().collect::<Vec<_>>(), ["token"], "{self:?}");
        obj["token"].as_str().unwrap().to_owned()
    }

    /// The token's claims.
    fn claims(&self) -> serde_json::Value {
        part(&self.token(), 1)
    }

    /// The token's granted (name, actions) pairs.
    fn access(&self) -> Vec<(String, Vec<String>)> {
        access(&self.claims())
    }
}

async fn send(req: Request<ProxyBody>) -> Answer {
    let resp = client().request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// `method url` with an `Authorization` header, if any.
async fn call(method: Method, url: &str, authorization: Option<&str>) -> Answer {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    send(req.body(body::empty()).unwrap()).await
}

fn basic(user: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{secret}")))
}

/// Part `i` of a JWT (0: header, 1: claims).
fn part(jwt: &str, i: usize) -> serde_json::Value {
    let b = URL_SAFE_NO_PAD
        .decode(jwt.split('.').nth(i).unwrap())
        .unwrap();
    serde_json::from_slice(&b).unwrap()
}

/// A JWT's header and claims.
fn decode(jwt: &str) -> (serde_json::Value, serde_json::Value) {
    (part(jwt, 0), part(jwt, 1))
}

fn access(claims: &serde_json::Value) -> Vec<(String, Vec<String>)> {
    claims["access"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let acts = a["actions"].as_array().unwrap();
            let acts = acts.iter().map(|x| x.as_str().unwrap().to_owned());
            (a["name"].as_str().unwrap().to_owned(), acts.collect())
        })
        .collect()
}

fn pairs(list: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    list.iter()
        .map(|(n, a)| (n.to_string(), a.iter().map(|s| s.to_string()).collect()))
        .collect()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn pat(user: &str, token: &str, scopes: &[TokenScope]) -> Credential {
    Credential::Pat {
        user: user.into(),
        token: token.into(),
        scopes: scopes.to_vec(),
    }
}

fn password(user: &str, password: &str, two_factor: bool) -> Credential {
    Credential::Password {
        user: user.into(),
        password: password.into(),
        two_factor,
    }
}

fn deploy(username: &str, token: &str, scopes: &[TokenScope], holder: &str) -> Credential {
    Credential::Deploy {
        username: username.into(),
        token: token.into(),
        scopes: scopes.to_vec(),
        project: holder.into(),
    }
}

fn job(token: &str, project: &str, user: &str) -> Credential {
    Credential::Job {
        token: token.into(),
        project: project.into(),
        user: user.into(),
    }
}
