//! GitLab's limits on clients, each as its source has it:
//! - whose IP a request is: Rack's `Request#ip` with GitLab's `trusted_proxies`
//!   (config/initializers/trusted_proxies.rb): `X-Forwarded-For` counts only when the TCP peer is
//!   trusted;
//! - the failed-login IP ban: `Gitlab::Auth::IpRateLimiter` over `Rack::Attack::Allow2Ban`
//!   (lib/gitlab/auth/ip_rate_limiter.rb, lib/gitlab/auth.rb `find_for_git_client` and
//!   `rate_limit!`), answered as `Gitlab::Auth::IpBlocked` (lib/gitlab/auth/ip_blocked.rb,
//!   app/controllers/application_controller.rb `rescue_from`);
//! - Devise's lockable account lockout (config/initializers/devise.rb: 10 attempts, unlocked
//!   after 10 minutes), counted by the web sign-in only;
//! - Rack::Attack's throttled answer (lib/gitlab/rack_attack.rb, lib/gitlab/throttle.rb).
//!
//! The state lives in [`State`]; the rules that use it (who is checked when) are in `jwt`.

use std::collections::HashMap;
use std::net::IpAddr;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use super::{error_body, http_date, json, plain, Credential, Fault, State};

/// The body of a banned IP's `403` (`Gitlab::Auth::IpBlocked#message`).
pub const BANNED_MESSAGE: &str = "Too many failed authentication attempts from this IP";

/// Devise `maximum_attempts` (`max_login_attempts`, default 10).
const MAX_LOGIN_ATTEMPTS: u32 = 10;
/// Devise `unlock_in` (`failed_login_attempts_unlock_period_in_minutes`, default 10 minutes).
const UNLOCK_IN_SECS: u64 = 600;

/// Rack's `request.ip` with GitLab's trusted proxies: the peer, unless it is a trusted proxy;
/// then the last `X-Forwarded-For` address that is not trusted, else the first one, else the
/// peer.
pub(super) fn client_ip(st: &State, peer: IpAddr, headers: &HeaderMap) -> String {
    let trusted = |ip: &str| {
        ip.parse::<IpAddr>()
            .is_ok_and(|ip| st.rules.trusted_proxies.iter().any(|n| n.contains(&ip)))
    };
    if !trusted(&peer.to_string()) {
        return peer.to_string();
    }
    let joined: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let forwarded: Vec<String> = joined
        .join(",")
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(strip_port)
        .collect();
    forwarded
        .iter()
        .rev()
        .find(|ip| !trusted(ip))
        .or(forwarded.first())
        .cloned()
        .unwrap_or_else(|| peer.to_string())
}

/// The host of an `X-Forwarded-For` entry (Rack's `split_authority`): `[v6]:port` → `v6`,
/// `v4:port` → `v4`.
fn strip_port(entry: &str) -> String {
    if let Some(rest) = entry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest).to_owned();
    }
    match entry.split_once(':') {
        Some((host, port)) if !port.contains(':') => host.to_owned(),
        _ => entry.to_owned(),
    }
}

/// Allow2Ban's counters: failures per (IP, `findtime` window), bans until a time, and every
/// failure ever counted per IP (for [`super::GitLab::ip_failures`]).
#[derive(Default)]
pub(super) struct Bans {
    counts: HashMap<(String, u64), u32>,
    until: HashMap<String, u64>,
    total: HashMap<String, u32>,
}

/// `IpRateLimiter#skip_rate_limit?`: the ban is off, or the IP is on `ip_whitelist` (IPv4
/// entries also match their IPv4-mapped IPv6 form).
fn skipped(st: &State, ip: &str) -> bool {
    let Some(_) = st.rules.ip_ban else {
        return true;
    };
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return false;
    };
    let v4 = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
        IpAddr::V4(_) => None,
    };
    st.rules
        .ip_whitelist
        .iter()
        .any(|n| n.contains(&ip) || v4.is_some_and(|v4| n.contains(&v4)))
}

/// `IpRateLimiter#banned?`.
pub(super) fn banned(st: &State, ip: &str) -> bool {
    !skipped(st, ip)
        && st
            .bans
            .lock()
            .unwrap()
            .until
            .get(ip)
            .is_some_and(|until| st.now() < *until)
}

/// `Gitlab::Auth.rate_limit!`: a success resets the IP's count (`Allow2Ban.reset`), a failure
/// counts in the current window and bans the IP once the count reaches `maxretry`.
pub(super) fn register(st: &State, ip: &str, success: bool) {
    let Some(cfg) = st.rules.ip_ban else { return };
    if skipped(st, ip) {
        return;
    }
    let now = st.now();
    let window = now / cfg.findtime;
    let mut bans = st.bans.lock().unwrap();
    if success {
        bans.counts.remove(&(ip.to_owned(), window));
        bans.until.remove(ip);
        return;
    }
    *bans.total.entry(ip.to_owned()).or_default() += 1;
    let count = bans.counts.entry((ip.to_owned(), window)).or_default();
    *count += 1;
    if *count >= cfg.maxretry {
        bans.until.insert(ip.to_owned(), now + cfg.bantime);
    }
}

pub(super) fn banned_ips(st: &State) -> Vec<String> {
    let now = st.now();
    let mut ips: Vec<String> = st
        .bans
        .lock()
        .unwrap()
        .until
        .iter()
        .filter(|(_, until)| now < **until)
        .map(|(ip, _)| ip.clone())
        .collect();
    ips.sort();
    ips
}

pub(super) fn ip_failures(st: &State, ip: &str) -> u32 {
    st.bans.lock().unwrap().total.get(ip).copied().unwrap_or(0)
}

/// A banned IP's answer: `render plain: e.message, status: :forbidden`, no `Retry-After`.
pub(super) fn banned_response() -> Response<Full<Bytes>> {
    plain(StatusCode::FORBIDDEN, BANNED_MESSAGE)
}

/// Devise lockable's state per user: `failed_attempts` and `locked_at`.
#[derive(Default)]
pub(super) struct Lockout {
    failed: HashMap<String, u32>,
    locked_at: HashMap<String, u64>,
}

/// `access_locked?`: locked, and `unlock_in` has not passed yet.
pub(super) fn locked(st: &State, user: &str) -> bool {
    let now = st.now();
    st.lockout
        .lock()
        .unwrap()
        .locked_at
        .get(user)
        .is_some_and(|at| now < at + UNLOCK_IN_SECS)
}

pub(super) fn failed_attempts(st: &State, user: &str) -> u32 {
    st.lockout
        .lock()
        .unwrap()
        .failed
        .get(user)
        .copied()
        .unwrap_or(0)
}

/// A web sign-in, as Devise's `valid_for_authentication?` counts it: an expired lock is lifted
/// first; a wrong password (or any attempt while locked) adds a failed attempt and locks the
/// account at the 10th; a success resets the count.
pub(super) fn web_sign_in(st: &State, user: &str, password: &str) -> bool {
    let right = st.credentials.lock().unwrap().iter().any(|c| {
        matches!(c, Credential::Password { user: u, password: p, .. } if u == user && p == password)
    });
    let now = st.now();
    let mut l = st.lockout.lock().unwrap();
    if l.locked_at
        .get(user)
        .is_some_and(|at| now >= at + UNLOCK_IN_SECS)
    {
        l.locked_at.remove(user);
        l.failed.remove(user);
    }
    let is_locked = l.locked_at.contains_key(user);
    if right && !is_locked && !st.rules.blocked.iter().any(|b| b == user) {
        l.failed.remove(user);
        return true;
    }
    let failed = l.failed.entry(user.to_owned()).or_default();
    *failed += 1;
    if *failed >= MAX_LOGIN_ATTEMPTS && !is_locked {
        l.locked_at.insert(user.to_owned(), now);
    }
    false
}

/// An injected fault's answer. 429 is Rack::Attack's `throttled_responder`: `text/plain`, the
/// response text and a newline, `Retry-After` and the `RateLimit-*` headers of a throttle with
/// GitLab's default web limits (3600 requests an hour); `authenticated` picks the throttle's
/// name. Any other status: a front's error in the registry format.
pub(super) fn fault_response(
    st: &State,
    fault: &Fault,
    authenticated: bool,
) -> Response<Full<Bytes>> {
    const LIMIT: u64 = 3600;
    const PERIOD: u64 = 3600;
    let now = st.now();
    if fault.status == StatusCode::TOO_MANY_REQUESTS {
        let retry_after = fault.retry_after.unwrap_or(PERIOD - now % PERIOD);
        let reset = now + retry_after;
        let name = if authenticated {
            "throttle_authenticated_web"
        } else {
            "throttle_unauthenticated_web"
        };
        let mut r = plain(fault.status, &format!("{}\n", fault.message));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let rounded_limit = (LIMIT * 60).div_ceil(PERIOD);
        for (k, v) in [
            ("ratelimit-name", name.to_owned()),
            ("ratelimit-limit", rounded_limit.to_string()),
            ("ratelimit-observed", (LIMIT + 1).to_string()),
            ("ratelimit-remaining", "0".to_owned()),
            ("ratelimit-reset", reset.to_string()),
            ("ratelimit-resettime", http_date(reset)),
            ("retry-after", retry_after.to_string()),
        ] {
            r.headers_mut()
                .insert(k, HeaderValue::from_str(&v).expect("a header value"));
        }
        return r;
    }
    let code = match fault.status.as_u16() {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 => "NOT_FOUND",
        503 => "UNAVAILABLE",
        _ => "UNKNOWN",
    };
    let mut r = json(fault.status, error_body(code, &fault.message));
    if let Some(secs) = fault.retry_after {
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_str(&secs.to_string()).expect("a number"),
        );
    }
    r
}
