//! Limits on clients: whose IP a request is, the failed-login IP ban, account lockout,
//! Rack::Attack's 429.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::{Request, StatusCode};
use regrelay::body;
use support::gitlab::{
    gitlab, CiJob, Credential, GitLab, GitLabBuilder, Role, TokenScope, BANNED_MESSAGE,
};

use super::{send, support, Answer, Creds};

const PAT: &str = "glpat-Lm4kQw8RtZ2xNv6Bc9Pd";
const PW: &str = "correct horse";

/// A GitLab with one user (password and PAT), a CI job, a public and a private project.
fn base() -> GitLabBuilder {
    gitlab()
        .credential(Credential::Pat {
            user: "dev".into(),
            token: PAT.into(),
            scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
        })
        .credential(Credential::Password {
            user: "dev".into(),
            password: PW.into(),
            two_factor: false,
        })
        .credential(Credential::Password {
            user: "other".into(),
            password: PW.into(),
            two_factor: false,
        })
        .credential(Credential::Password {
            user: "mfa".into(),
            password: PW.into(),
            two_factor: true,
        })
        .credential(job().credential())
        .project(
            "g/p",
            false,
            &[("dev", Role::Developer), ("other", Role::Developer)],
        )
        .project("pub/lic", true, &[])
}

fn job() -> CiJob {
    CiJob::new("glcbt-Jx2mQ9vTz4Wk7Rn3Lp8s", "g/p", "dev")
}

/// `GET /jwt/auth?service=container_registry&scope=repository:g/p:pull` as `creds` (or none),
/// with `X-Forwarded-For: xff` when given.
async fn login(gl: &GitLab, creds: Option<(&str, &str)>, xff: Option<&str>) -> Answer {
    let q = "service=container_registry&scope=repository:g/p:pull";
    let mut req = Request::get(format!("{}?{q}", gl.realm()));
    if let Some((u, p)) = creds {
        let b = STANDARD.encode(format!("{u}:{p}"));
        req = req.header("authorization", format!("Basic {b}"));
    }
    if let Some(xff) = xff {
        req = req.header("x-forwarded-for", xff);
    }
    send(req.body(body::empty()).unwrap()).await
}

/// A clock offset that puts the stand-in 1 s past the start of a `findtime` window, so a burst
/// of failures falls in one window (Rack::Attack's counters are epoch-aligned).
fn window_start(findtime: u64) -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    (findtime - now % findtime) as i64 + 1
}

/// config/initializers/trusted_proxies.rb with Rack's `Request#ip`: `X-Forwarded-For` counts
/// only when the TCP peer is a trusted proxy (GitLab's default: 127.0.0.1 and ::1); then the
/// last untrusted address is the client (ports stripped), all trusted: the first.
#[tokio::test]
async fn the_client_ip_is_computed_behind_trusted_proxies() {
    let default = base().start().await;
    let none = base().trusted_proxies(&[]).start().await;
    let other_net = base().trusted_proxies(&["10.0.0.0/8"]).start().await;
    let rows: &[(&str, &GitLab, Option<&str>, &str)] = &[
        ("default, no header", &default, None, "127.0.0.1"),
        (
            "default, one client",
            &default,
            Some("203.0.113.7"),
            "203.0.113.7",
        ),
        (
            "default, a chain",
            &default,
            Some("198.51.100.1, 203.0.113.7"),
            "203.0.113.7",
        ),
        (
            "default, trusted hops skipped",
            &default,
            Some("203.0.113.7, 127.0.0.1"),
            "203.0.113.7",
        ),
        (
            "default, all trusted",
            &default,
            Some("127.0.0.1, ::1"),
            "127.0.0.1",
        ),
        (
            "default, with a port",
            &default,
            Some("203.0.113.7:4711"),
            "203.0.113.7",
        ),
        (
            "default, IPv6 with a port",
            &default,
            Some("[2001:db8::7]:4711"),
            "2001:db8::7",
        ),
        ("nothing trusted", &none, Some("203.0.113.7"), "127.0.0.1"),
        (
            "another network trusted",
            &other_net,
            Some("203.0.113.7"),
            "127.0.0.1",
        ),
    ];
    for (what, gl, xff, want) in rows {
        login(gl, Some(("dev", PAT)), *xff).await;
        let seen = gl.seen().pop().unwrap();
        assert_eq!(seen.client_ip, *want, "{what}");
        assert_eq!(seen.peer.to_string(), "127.0.0.1", "{what}");
    }
}

/// lib/gitlab/auth/ip_rate_limiter.rb, lib/gitlab/auth.rb (`find_for_git_client`,
/// `rate_limit!`), lib/gitlab/auth/ip_blocked.rb and app/controllers/application_controller.rb
/// (`rescue_from Gitlab::Auth::IpBlocked`), config/initializers/1_settings.rb: opt-in; N failed
/// Basic logins from one client IP in a window ban it; a banned IP's Basic logins get `403`
/// `text/plain` "Too many failed authentication attempts from this IP" without `Retry-After`,
/// right credentials included; `gitlab-ci-token` logins are exempt; a success resets the count;
/// 2FA passwords are not counted; whitelisted IPs (default 127.0.0.1) are never banned.
#[tokio::test]
async fn failed_logins_ban_the_client_ip_when_enabled() {
    let (a, b) = ("203.0.113.7", "198.51.100.2");
    let wrong = Some(("dev", "wrong"));
    // Off by default: any number of failures, no ban.
    let off = base().start().await;
    for _ in 0..15 {
        assert_eq!(
            login(&off, wrong, Some(a)).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    assert!(off.banned_ips().is_empty());
    assert_eq!(
        login(&off, Some(("dev", PW)), Some(a)).await.status,
        StatusCode::OK
    );

    let findtime = 3600;
    let gl = base()
        .ip_ban(10, Duration::from_secs(findtime), Duration::from_secs(3600))
        .ip_whitelist(&[])
        .clock_offset(window_start(findtime))
        .start()
        .await;
    // 9 failures, a success (the count resets), 9 more and 2FA passwords: no ban.
    for _ in 0..9 {
        assert_eq!(
            login(&gl, wrong, Some(a)).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        login(&gl, Some(("dev", PAT)), Some(a)).await.status,
        StatusCode::OK
    );
    for _ in 0..9 {
        assert_eq!(
            login(&gl, wrong, Some(a)).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    for _ in 0..3 {
        assert_eq!(
            login(&gl, Some(("mfa", PW)), Some(a)).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    assert!(gl.banned_ips().is_empty());
    assert_eq!(gl.ip_failures(a), 18);
    // The 10th failure in the window is still a 401, and bans the IP.
    assert_eq!(
        login(&gl, wrong, Some(a)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(gl.banned_ips(), [a]);
    // (what, credentials, client, status)
    let ci = job();
    let rows: &[(&str, Creds, &str, u16)] = &[
        ("wrong password, banned IP", wrong, a, 403),
        ("right PAT, banned IP", Some(("dev", PAT)), a, 403),
        ("another user, banned IP", Some(("other", PW)), a, 403),
        (
            "gitlab-ci-token, banned IP",
            Some((ci.dependency_proxy_user(), &ci.token)),
            a,
            200,
        ),
        ("no credentials, banned IP", None, a, 403),
        ("right PAT, another IP", Some(("dev", PAT)), b, 200),
    ];
    for (what, creds, ip, status) in rows {
        let r = login(&gl, *creds, Some(ip)).await;
        if creds.is_none() {
            // Only Basic logins go through `find_for_git_client`: an anonymous request is not
            // checked, and (here, for a private project) refused as any anonymous one is.
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{what}: {r:?}");
            assert!(r.body.contains("access forbidden"), "{what}: {r:?}");
            continue;
        }
        assert_eq!(r.status.as_u16(), *status, "{what}: {r:?}");
        if *status == 403 {
            assert_eq!(r.body, BANNED_MESSAGE, "{what}");
            assert_eq!(
                r.headers["content-type"], "text/plain; charset=utf-8",
                "{what}"
            );
            assert!(!r.headers.contains_key("retry-after"), "{what}");
        }
    }
    assert_eq!(gl.ip_failures(a), 19, "banned attempts are not counted");

    // GitLab's default whitelist (127.0.0.1): the proxy's own address is never banned.
    let gl = base()
        .ip_ban(10, Duration::from_secs(findtime), Duration::from_secs(3600))
        .clock_offset(window_start(findtime))
        .start()
        .await;
    for _ in 0..12 {
        assert_eq!(
            login(&gl, wrong, None).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    assert!(gl.banned_ips().is_empty());
    assert_eq!(gl.ip_failures("127.0.0.1"), 0);
}

/// config/initializers/trusted_proxies.rb with the ban: a proxy GitLab does not trust is the
/// client for every user behind it, so one user's failures ban them all.
#[tokio::test]
async fn an_untrusted_proxy_is_banned_for_everyone_behind_it() {
    let findtime = 3600;
    let gl = base()
        .ip_ban(10, Duration::from_secs(findtime), Duration::from_secs(3600))
        .ip_whitelist(&[])
        .trusted_proxies(&[])
        .clock_offset(window_start(findtime))
        .start()
        .await;
    for _ in 0..10 {
        let r = login(&gl, Some(("dev", "wrong")), Some("203.0.113.7")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(gl.banned_ips(), ["127.0.0.1"]);
    let r = login(&gl, Some(("other", PW)), Some("198.51.100.2")).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::FORBIDDEN, BANNED_MESSAGE)
    );
}

/// `Allow2Ban`'s `bantime` (rack-attack, used by ip_rate_limiter.rb): the ban ends by itself.
#[tokio::test]
async fn a_ban_ends_after_its_bantime() {
    let findtime = 3600;
    let gl = base()
        .ip_ban(3, Duration::from_secs(findtime), Duration::from_secs(2))
        .ip_whitelist(&[])
        .clock_offset(window_start(findtime))
        .start()
        .await;
    for _ in 0..3 {
        login(&gl, Some(("dev", "wrong")), Some("203.0.113.7")).await;
    }
    assert_eq!(
        login(&gl, Some(("dev", PAT)), Some("203.0.113.7"))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    // Await the end of the ban (1 to 2 s: its clock is whole seconds): poll, with a deadline.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = login(&gl, Some(("dev", PAT)), Some("203.0.113.7")).await;
        if r.status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "still banned: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gl.banned_ips().is_empty());
}

/// Devise lockable (config/initializers/devise.rb) and lib/gitlab/auth.rb
/// (`find_with_user_password` without `increment_failed_attempts` for Git clients, and
/// `can_log_in_with_non_expired_password?`): 10 wrong web sign-ins lock the account, whatever
/// the IP; a locked user's password and access tokens get the usual 401 at `/jwt/auth`; wrong
/// passwords at `/jwt/auth` are not counted.
#[tokio::test]
async fn ten_wrong_passwords_lock_the_account() {
    let gl = base().start().await;
    for _ in 0..20 {
        assert_eq!(
            login(&gl, Some(("dev", "wrong")), None).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        (gl.failed_attempts("dev"), gl.locked("dev")),
        (0, false),
        "Git logins are not counted"
    );
    // (what, sign-ins: wrong ones then maybe the right one, locked after)
    let rows: &[(&str, &str, u32, bool, bool)] = &[
        ("9 wrong", "dev", 9, false, false),
        ("then the right one resets", "dev", 0, true, false),
        ("10 wrong lock", "dev", 10, false, true),
        ("the right one while locked", "dev", 0, true, true),
    ];
    for (what, user, wrong, then_right, locked) in rows {
        for _ in 0..*wrong {
            assert!(!gl.web_sign_in(user, "wrong"), "{what}");
        }
        if *then_right {
            assert_eq!(gl.web_sign_in(user, PW), !*locked, "{what}");
        }
        assert_eq!(gl.locked(user), *locked, "{what}");
    }
    for creds in [("dev", PW), ("dev", PAT), ("anyone", PAT)] {
        let r = login(&gl, Some(creds), None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{creds:?}: {r:?}");
        assert!(r.body.contains("HTTP Basic: Access denied"), "{r:?}");
    }
    assert_eq!(
        login(&gl, Some(("other", PW)), None).await.status,
        StatusCode::OK,
        "another user"
    );
}

/// lib/gitlab/rack_attack.rb (`throttled_responder`, `RequestThrottleData`) and
/// lib/gitlab/throttle.rb (`rate_limiting_response_text`): a throttled request gets `429`,
/// `text/plain`, the response text and a newline, `Retry-After` and the `RateLimit-*` headers,
/// before any routing.
#[tokio::test]
async fn a_throttled_request_gets_rack_attacks_answer() {
    let gl = base().start().await;
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let rows: &[(&str, Option<u64>, &str, Creds)] = &[
        (
            "with Retry-After",
            Some(30),
            "Retry later",
            Some(("dev", PAT)),
        ),
        ("the window's end", None, "Retry later", None),
        ("a custom text", Some(5), "Slow down, please", None),
    ];
    for (what, retry_after, text, creds) in rows {
        gl.fail_with(429, *retry_after, text);
        let r = login(&gl, *creds, None).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{what}");
        assert_eq!(r.headers["content-type"], "text/plain", "{what}");
        assert_eq!(r.body, format!("{text}\n"), "{what}");
        let h = |k: &str| r.headers[k].to_str().unwrap().to_owned();
        let wait: u64 = h("retry-after").parse().unwrap();
        match retry_after {
            Some(s) => assert_eq!(wait, *s, "{what}"),
            None => assert!((1..=3600).contains(&wait), "{what}: {wait}"),
        }
        let name = if creds.is_some() {
            "throttle_authenticated_web"
        } else {
            "throttle_unauthenticated_web"
        };
        assert_eq!(h("ratelimit-name"), name, "{what}");
        assert_eq!(h("ratelimit-limit"), "60", "{what}");
        assert_eq!(h("ratelimit-remaining"), "0", "{what}");
        assert!(
            h("ratelimit-observed").parse::<u64>().unwrap() > 60,
            "{what}"
        );
        let reset: u64 = h("ratelimit-reset").parse().unwrap();
        assert!(reset.abs_diff(now() + wait) <= 2, "{what}: {reset}");
        let reset_time = httpdate::parse_http_date(&h("ratelimit-resettime")).unwrap();
        assert_eq!(
            reset_time,
            UNIX_EPOCH + Duration::from_secs(reset),
            "{what}"
        );
        // Before routing: a POST (no route) is throttled too.
        let post = Request::post(gl.realm()).body(body::empty()).unwrap();
        assert_eq!(
            send(post).await.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{what}"
        );
    }
    gl.heal();
    assert_eq!(
        login(&gl, Some(("dev", PAT)), None).await.status,
        StatusCode::OK
    );
}
