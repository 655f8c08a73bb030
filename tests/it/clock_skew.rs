//! A regrelay whose clock is 10 minutes behind (libfaketime) still sends every upstream request a
//! GitLab token that is valid when it arrives: a token's life is its `exp - iat`, counted from
//! when regrelay received it, never `exp` against the local clock (which would make 5 s tokens
//! look good for 10 minutes). GitLab stand-in, registry and the test run on the real clock.

use crate::support;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use regrelay::body;
use support::gitlab::with_developer_pat;
use support::relay::Relay;
use support::upstream::{self, client};
use support::*;

const USER: &str = "builder";
const PAT: &str = "glpat-Wc5nRt9XqLm3ZpKs8HvB";
const SKEW: &str = "-10m";
const SKEW_SECS: i64 = -600;

/// `env LD_PRELOAD=… FAKETIME=-10m FAKETIME_DONT_FAKE_MONOTONIC=1`: the environment Debian's
/// `faketime` wrapper gives a program, applied with `env`, which execs regrelay (the wrapper
/// itself forks, so killing it would leave regrelay running). The monotonic clock stays real.
fn faketime_prefix(offset: &str) -> Vec<String> {
    let found = Command::new("sh")
        .args(["-c", "command -v faketime"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "required program `faketime` (Debian package faketime) is missing: run scripts/install-deps"
    );
    let out = Command::new("faketime")
        .args(["-m", "--exclude-monotonic", "-f", offset, "env"])
        .output()
        .expect("run faketime");
    assert!(out.status.success(), "faketime failed: {}", text(&out));
    let mut prefix = vec!["env".to_owned()];
    prefix.extend(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| {
                ["LD_PRELOAD=", "FAKETIME=", "FAKETIME_DONT_FAKE_MONOTONIC="]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .map(str::to_owned),
    );
    assert!(
        prefix.iter().any(|p| p.starts_with("LD_PRELOAD=")) && prefix.len() == 4,
        "faketime set no usable environment: {prefix:?}"
    );
    prefix
}

fn real_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Unix seconds of `YYYY-MM-DDTHH:MM:SSZ` (days-from-civil, H. Hinnant).
fn parse_rfc3339(s: &str) -> i64 {
    let n = |r: std::ops::Range<usize>| -> i64 { s[r].parse().unwrap() };
    assert!(s.len() == 20 && s.ends_with('Z'), "{s}");
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)
}

/// The `exp` claim of a JWT (decoded here, not by the code under test).
fn jwt_exp(jwt: &str) -> Option<u64> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes).ok()?["exp"].as_u64()
}

/// One request as it reached the registry: when (real clock), what, and its token's `exp`.
#[derive(Debug, Clone)]
struct Arrival {
    at: f64,
    method: String,
    path: String,
    exp: Option<u64>,
}

/// A pass-through HTTP hop in front of the registry that notes, for every request, when its
/// headers arrived and the `exp` of the GitLab token it carries. `Host` passes unchanged, so the
/// registry's `Location`s name this hop, as regrelay expects of its upstream.
async fn recorder(registry: std::net::SocketAddr) -> (upstream::Origin, Arc<Mutex<Vec<Arrival>>>) {
    let seen = Arc::new(Mutex::new(vec![]));
    let log = seen.clone();
    let origin = upstream::serve(move |req: Request<Incoming>| {
        let exp = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(jwt_exp);
        log.lock().unwrap().push(Arrival {
            at: real_now(),
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            exp,
        });
        async move {
            let (mut parts, incoming) = req.into_parts();
            let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            parts.uri = format!("http://{registry}{pq}").parse().unwrap();
            parts.headers.remove("connection");
            let req = Request::from_parts(parts, incoming.map_err(Into::into).boxed_unsync());
            match client().request(req).await {
                Ok(resp) => resp.map(|b| b.map_err(Into::into).boxed_unsync()),
                Err(e) => {
                    let mut r = Response::new(body::full(format!("recorder: {e}")));
                    *r.status_mut() = StatusCode::BAD_GATEWAY;
                    r
                }
            }
        }
    })
    .await;
    (origin, seen)
}

/// `issued_at` of a session regrelay issues now (its own clock), in Unix seconds.
async fn session_issued_at(px: &Regrelay) -> i64 {
    let basic = STANDARD.encode(format!("{USER}:{PAT}"));
    let req = Request::get(format!(
        "{}/jwt/auth?service=container_registry&scope=repository:ci/app:pull",
        px.url()
    ))
    .header("authorization", format!("Basic {basic}"))
    .body(body::empty())
    .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    parse_rfc3339(v["issued_at"].as_str().expect("issued_at"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_regrelay_ten_minutes_behind_sends_only_tokens_valid_on_arrival() {
    let prefix = faketime_prefix(SKEW);
    let gl = with_developer_pat(USER, PAT, "ci/app", Duration::from_secs(5)).await;
    let reg = Registry::start(&gl.realm());
    let (hop, arrivals) = recorder(reg.addr).await;
    let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
    let px = Regrelay::start_with_prefix(&prefix, &["--registry", &hop.url()]);

    // The skew is real: regrelay's own clock (the `issued_at` of its sessions) is 10 min behind.
    let issued = session_issued_at(&px).await;
    let skew = issued - real_now() as i64;
    assert!(
        (SKEW_SECS - 5..=SKEW_SECS + 5).contains(&skew),
        "libfaketime did not shift regrelay's clock: issued_at is {skew} s from the real clock"
    );

    // A push over a throttled link that outlives several 5 s tokens: 3 MiB at 180 KiB/s.
    let link = Relay::start(vec![px.addr], Some(180 << 10)).await;
    let image = OciImage::random(61, &[1536 << 10, 1536 << 10]);
    let (src, dest, creds) = (
        image.reference(),
        format!("docker://{}/ci/app:v1", link.addr),
        format!("{USER}:{PAT}"),
    );
    let mints = gl.mints();
    let push_started = real_now();
    let (out, took) = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let out = skopeo_copy(&src, &dest, &creds, &Transport::Http);
        (out, start.elapsed())
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "push through a skewed regrelay failed after {took:?}: {}\n{}",
        text(&out),
        px.output.text()
    );
    assert!(took >= Duration::from_secs(15), "the push took {took:?}");

    // Every request of the push reached the registry with a token not yet expired (real clock).
    // regrelay stops using a token 1 s before its end; 1 s more is slack for a loaded machine.
    let during: Vec<Arrival> = arrivals
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a.at >= push_started)
        .cloned()
        .collect();
    let with_token: Vec<&Arrival> = during.iter().filter(|a| a.exp.is_some()).collect();
    assert!(with_token.iter().any(|a| a.method == "PATCH"), "{during:?}");
    let late: Vec<String> = with_token
        .iter()
        .filter(|a| a.at > a.exp.unwrap() as f64 + 1.0)
        .map(|a| {
            format!(
                "{} {} arrived {:.1} s after its token's exp",
                a.method,
                a.path,
                a.at - a.exp.unwrap() as f64
            )
        })
        .collect();
    assert!(
        late.is_empty(),
        "expired tokens went upstream:\n{}\n{}",
        late.join("\n"),
        px.output.text()
    );
    eprintln!(
        "push took {took:?}; {} upstream requests with a token, {} mints",
        with_token.len(),
        gl.mints() - mints
    );

    // Pulled back through the skewed regrelay: the same blobs.
    let pulled = tempfile::tempdir().unwrap();
    let (src, dest, creds) = (
        format!("docker://{}/ci/app:v1", px.addr),
        format!("oci:{}:latest", pulled.path().display()),
        format!("{USER}:{PAT}"),
    );
    let pull =
        tokio::task::spawn_blocking(move || skopeo_copy(&src, &dest, &creds, &Transport::Http))
            .await
            .unwrap();
    assert!(pull.status.success(), "{}", text(&pull));
    assert_same_blobs(&image, pulled.path());
    let mut secrets = gl.issued();
    secrets.push(PAT.to_owned());
    assert_no_secrets(&px.output.text(), USER, &secrets);
}
