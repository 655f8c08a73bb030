//! What a token service answers, read once: a token, or a refusal kept whole (it is small) so
//! that regrelay can tell what it says, remember it, and tell the client in a form it prints.
//!
//! GitLab answers in several formats, each read here for its message:
//! - the registry's `{"errors":[{"code","message"}]}` (`/jwt/auth` refusals): passed on unchanged;
//! - `{"message": "...", "status": "error", "http_status": 403}` (the Dependency Proxy's token
//!   service, `app/services/base_service_utility.rb`);
//! - `text/plain` (Rack::Attack's 429 "Retry later", the IP ban's 403);
//! - nothing (the Dependency Proxy's 401 and 404).
//!
//! Registry clients print only the registry format (skopeo shows a bare `403 (Forbidden)`
//! otherwise), so the others are reworded into it, GitLab's message kept ([`Refusal::response`]).

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use crate::body::{self, ProxyBody};
use crate::error::{registry_error_json, MintFailure};
use crate::logins::Answer;

/// Headers of a refusal a client reads: how to authenticate, when to come back.
const KEPT: [&str; 5] = [
    "content-type",
    "www-authenticate",
    "retry-after",
    "ratelimit-reset",
    "ratelimit-remaining",
];

/// A token service's answer other than a token.
pub type Refusal = Answer;

/// The refusal of `status`, `headers` and `body`, with only the headers a client reads.
pub fn refusal(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Refusal {
    let mut kept = HeaderMap::new();
    for name in KEPT {
        for v in headers.get_all(name) {
            kept.append(HeaderName::from_static(name), v.clone());
        }
    }
    Answer {
        status,
        headers: kept,
        body,
    }
}

/// The message of a refusal, whatever GitLab's format; `None` for an empty body.
pub fn message(body: &[u8]) -> Option<String> {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let found = v["errors"][0]["message"]
            .as_str()
            .or_else(|| v["message"].as_str())
            .or_else(|| v["error"].as_str());
        return found.map(str::to_owned);
    }
    let text = String::from_utf8_lossy(body);
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    // Not a page of HTML: a short plain message.
    (!line.starts_with('<')).then(|| line.chars().take(300).collect())
}

/// True when `body` is already in the registry's error format.
fn registry_format(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v["errors"][0]["code"].is_string())
}

/// The registry error code a client expects for `status`.
fn code_of(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 => "NAME_UNKNOWN",
        429 => "TOOMANYREQUESTS",
        500..=599 => "UNAVAILABLE",
        _ => "UNKNOWN",
    }
}

/// What a client is told when the token service gave no message.
fn default_message(status: StatusCode) -> String {
    match status.as_u16() {
        401 => "the token service refused these credentials".into(),
        403 => "the token service refused: access forbidden".into(),
        404 => "the token service answered 404 with no explanation: the registry or the group \
                does not exist, or these credentials may not read it (a GitLab Dependency \
                Proxy hides groups from non-members)"
            .into(),
        s => format!("the token service answered {s}"),
    }
}

impl Refusal {
    /// Its message, or one that says what its status means.
    pub fn said(&self) -> String {
        message(&self.body).unwrap_or_else(|| default_message(self.status))
    }

    /// `Retry-After` in seconds (or `RateLimit-Reset`, Rack::Attack's).
    pub fn retry_after(&self) -> Option<u64> {
        ["retry-after", "ratelimit-reset"].iter().find_map(|h| {
            self.headers
                .get(*h)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
    }

    /// What a session's mint makes of it.
    pub fn failure(&self) -> MintFailure {
        let message = self.said();
        match self.status.as_u16() {
            s @ (429 | 503) => MintFailure::Busy {
                status: s,
                retry_after: self.retry_after(),
                message,
            },
            s @ 400..=499 => MintFailure::Refused { status: s, message },
            s => MintFailure::Failed {
                reason: format!("token service answered {s}: {message}"),
            },
        }
    }

    /// The answer for a client of `/jwt/auth`: the registry format unchanged; any other format
    /// reworded into it with GitLab's message (and its status and headers) kept.
    pub fn response(&self) -> Response<ProxyBody> {
        let mut headers = self.headers.clone();
        let body = if registry_format(&self.body) {
            self.body.clone()
        } else {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
            Bytes::from(registry_error_json(code_of(self.status), &self.said()))
        };
        let mut resp = Response::new(body::full(body));
        *resp.status_mut() = self.status;
        *resp.headers_mut() = headers;
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitlab_formats_give_their_message() {
        let cases: [(&[u8], Option<&str>); 7] = [
            (
                br#"{"errors":[{"code":"DENIED","message":"access forbidden"}]}"#,
                Some("access forbidden"),
            ),
            (
                br#"{"message":"access forbidden","status":"error","http_status":403}"#,
                Some("access forbidden"),
            ),
            (b"Retry later\n", Some("Retry later")),
            (
                b"Too many failed authentication attempts from this IP",
                Some("Too many failed authentication attempts from this IP"),
            ),
            (b"", None),
            (b"\n  \n", None),
            (b"<html><body>500</body></html>", None),
        ];
        for (body, want) in cases {
            assert_eq!(
                message(body).as_deref(),
                want,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn refusals_reach_clients_in_the_registry_format() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("3"));
        h.insert("set-cookie", HeaderValue::from_static("s=1"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        let r = refusal(
            StatusCode::TOO_MANY_REQUESTS,
            &h,
            Bytes::from_static(b"Retry later\n"),
        );
        assert!(r.headers.get("set-cookie").is_none());
        assert_eq!(r.retry_after(), Some(3));
        assert!(matches!(
            r.failure(),
            MintFailure::Busy { status: 429, retry_after: Some(3), ref message } if message == "Retry later"
        ));
        let resp = r.response();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "3");
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        // Already the registry format: unchanged.
        let registry = Bytes::from_static(br#"{"errors":[{"code":"UNAUTHORIZED","message":"x"}]}"#);
        let r = refusal(
            StatusCode::UNAUTHORIZED,
            &HeaderMap::new(),
            registry.clone(),
        );
        assert!(matches!(
            r.failure(),
            MintFailure::Refused { status: 401, .. }
        ));
        // An empty 404 says what it may mean.
        let r = refusal(StatusCode::NOT_FOUND, &HeaderMap::new(), Bytes::new());
        assert!(r.said().contains("does not exist"));
    }
}
