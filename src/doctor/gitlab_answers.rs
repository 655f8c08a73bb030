//! Reading GitLab's answer formats: what a refusal from `/jwt/auth` (or a front of it) says, in
//! whichever of GitLab's shapes it comes:
//! - the registry's `{"errors":[{"code","message"}]}` (the token service's own refusals),
//! - `{"message","status","http_status"}` (the Dependency Proxy's, `BaseServiceUtility#error`),
//! - `text/plain` (Rails' `render plain:`: the failed-login IP ban; Rack::Attack's throttle),
//! - headers: Rack::Attack's `Retry-After` and `RateLimit-*` on a `429`.
//!
//! Pure functions over status, headers and body: no requests, no findings (the doctor decides
//! what an answer means for the user). regrelay's own token handling (src/auth.rs, src/mint.rs)
//! reads some of the same shapes; this copy serves doctor only.

use std::time::SystemTime;

use http::{header, HeaderMap, StatusCode};

/// The phrase of GitLab's failed-login IP ban, in both of its forms: `text/plain` "Too many
/// failed authentication attempts from this IP" (lib/gitlab/auth/ip_blocked.rb) and the
/// registry-format `DENIED` "Access denied: too many failed authentication attempts".
const BAN_PHRASE: &str = "too many failed authentication attempts";

/// Longest message quoted from a plain-text body (a front's HTML page would be noise).
const MAX_QUOTED_CHARS: usize = 200;

/// The message of a refusal: the first registry-format error's, else the Dependency Proxy's
/// `message`, else the first line of a `text/plain` body; empty when there is none.
pub(super) fn message(headers: &HeaderMap, body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let said = v["errors"][0]["message"]
            .as_str()
            .or_else(|| v["message"].as_str())
            .or_else(|| v["error"].as_str());
        return said.unwrap_or("").to_owned();
    }
    let plain = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/plain")
        });
    if !plain {
        return String::new();
    }
    let text = String::from_utf8_lossy(body);
    let line = text.lines().map(str::trim).find(|l| !l.is_empty());
    line.unwrap_or("").chars().take(MAX_QUOTED_CHARS).collect()
}

/// The registry-format error code (`DENIED`, `UNAUTHORIZED`, `UNAVAILABLE`…), if any.
pub(super) fn code(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// True when the answer is GitLab's failed-login IP ban (a `403` in either of its forms).
pub(super) fn is_ip_ban(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> bool {
    status == StatusCode::FORBIDDEN
        && message(headers, body)
            .to_ascii_lowercase()
            .contains(BAN_PHRASE)
}

/// Rack::Attack's throttle answer (lib/gitlab/rack_attack.rb): what its headers say.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Throttle {
    /// Seconds to wait (`Retry-After`, as seconds or as an HTTP date), else until
    /// `RateLimit-Reset`.
    pub(super) retry_after_secs: Option<u64>,
    /// `RateLimit-Name`: which throttle (e.g. `throttle_authenticated_web`).
    pub(super) name: Option<String>,
    /// `RateLimit-Limit`: requests allowed per minute (GitLab rounds its period's limit to one).
    pub(super) limit: Option<String>,
    /// The body's text (GitLab's `rate_limiting_response_text`, "Retry later" by default).
    pub(super) text: String,
}

/// The throttle a `429` describes; `None` for any other status.
pub(super) fn throttle(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    at: SystemTime,
) -> Option<Throttle> {
    if status != StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let now = unix(at);
    let retry_after = get("retry-after").and_then(|v| match v.parse::<u64>() {
        Ok(secs) => Some(secs),
        // RFC 9110 §10.2.3: delay-seconds or an HTTP-date.
        Err(_) => httpdate::parse_http_date(&v)
            .ok()
            .map(|t| unix(t).saturating_sub(now)),
    });
    let reset = get("ratelimit-reset")
        .and_then(|v| v.parse::<u64>().ok())
        .map(|reset| reset.saturating_sub(now));
    Some(Throttle {
        retry_after_secs: retry_after.or(reset),
        name: get("ratelimit-name"),
        limit: get("ratelimit-limit"),
        text: message(headers, body),
    })
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn messages_come_from_every_shape() {
        let none = HeaderMap::new();
        let registry = br#"{"errors":[{"code":"DENIED","message":"access forbidden"}]}"#;
        assert_eq!(message(&none, registry), "access forbidden");
        assert_eq!(code(registry), "DENIED");
        let dp = br#"{"message":"access forbidden","status":"error","http_status":403}"#;
        assert_eq!(message(&none, dp), "access forbidden");
        let plain = headers(&[("content-type", "text/plain; charset=utf-8")]);
        assert_eq!(message(&plain, b"\nRetry later\n"), "Retry later");
        // HTML (a login page, a balancer's error page) is not quoted.
        let html = headers(&[("content-type", "text/html")]);
        assert_eq!(message(&html, b"<html>Retry later</html>"), "");
    }

    #[test]
    fn the_ip_ban_is_recognised_in_both_forms() {
        let plain = headers(&[("content-type", "text/plain; charset=utf-8")]);
        let text = b"Too many failed authentication attempts from this IP";
        assert!(is_ip_ban(StatusCode::FORBIDDEN, &plain, text));
        let json = br#"{"errors":[{"code":"DENIED","message":"Access denied: too many failed authentication attempts"}]}"#;
        assert!(is_ip_ban(StatusCode::FORBIDDEN, &HeaderMap::new(), json));
        let forbidden = br#"{"errors":[{"code":"DENIED","message":"access forbidden"}]}"#;
        assert!(!is_ip_ban(
            StatusCode::FORBIDDEN,
            &HeaderMap::new(),
            forbidden
        ));
        assert!(!is_ip_ban(StatusCode::TOO_MANY_REQUESTS, &plain, text));
    }

    #[test]
    fn throttles_say_when_to_retry() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let h = headers(&[
            ("content-type", "text/plain"),
            ("retry-after", "42"),
            ("ratelimit-name", "throttle_authenticated_web"),
            ("ratelimit-limit", "60"),
            ("ratelimit-reset", "1000042"),
        ]);
        let t = throttle(StatusCode::TOO_MANY_REQUESTS, &h, b"Retry later\n", at).unwrap();
        assert_eq!(
            t,
            Throttle {
                retry_after_secs: Some(42),
                name: Some("throttle_authenticated_web".into()),
                limit: Some("60".into()),
                text: "Retry later".into(),
            }
        );
        let date = httpdate::fmt_http_date(at + Duration::from_secs(90));
        let h = headers(&[("retry-after", &date)]);
        let t = throttle(StatusCode::TOO_MANY_REQUESTS, &h, b"", at).unwrap();
        assert_eq!(t.retry_after_secs, Some(90));
        let h = headers(&[("ratelimit-reset", "1000030")]);
        let t = throttle(StatusCode::TOO_MANY_REQUESTS, &h, b"", at).unwrap();
        assert_eq!(t.retry_after_secs, Some(30));
        assert!(throttle(StatusCode::FORBIDDEN, &h, b"", at).is_none());
    }
}
