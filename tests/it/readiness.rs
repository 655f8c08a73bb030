//! `/-/ready` says what each dependency is doing (issue 23, finding 2), against the real registry
//! and the GitLab stand-in:
//!
//! - a `--registry` that is not a registry (a web server's 404 at `/v2/`) is not ready, and says
//!   why;
//! - GitLab's token service down: the replica stays ready by default (cached tokens, sessions
//!   and the cache still serve; a fleet-wide outage must not empty the Service) and says the
//!   token service is unreachable; with `--ready-requires-token-service` it is not ready; a
//!   request that needs a token is told the *token service* is unreachable, not the registry;
//! - the cache directory is reported, and `regrelay_dependency_up` follows each of them.

use crate::support;

use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use support::gitlab::with_developer_pat;
use support::upstream::{self, client};
use support::*;

const USER: &str = "ivan";
const PAT: &str = "glpat-R34d1n3ssT0k3nQwer";
const REPO: &str = "ready/app";

async fn ready(px: &Regrelay) -> (StatusCode, serde_json::Value) {
    let resp = client()
        .request(
            Request::get(format!("{}/-/ready", px.url()))
                .body(regrelay::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

/// Waits out the readiness answer's reuse (1 s).
async fn fresh() {
    tokio::time::sleep(Duration::from_millis(1100)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_url_that_is_no_registry_is_not_ready_and_says_why() {
    let web = upstream::serve(|_req: Request<hyper::body::Incoming>| async move {
        let mut resp = Response::new(regrelay::body::full("<html>not found</html>"));
        *resp.status_mut() = StatusCode::NOT_FOUND;
        resp
    })
    .await;
    let px = Regrelay::start(&["--registry", &web.url()]);
    let (status, body) = ready(&px).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["registry"]["status"], "not_a_registry", "{body}");
    let detail = body["registry"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("--registry") && detail.contains("404"),
        "{detail}"
    );
    assert!(
        !body.to_string().contains(&web.addr.to_string()),
        "an address: {body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_service_outage_is_reported_and_decides_readiness_only_when_asked() {
    let gl = with_developer_pat(USER, PAT, REPO, Duration::from_secs(2)).await;
    let reg = Registry::start(&gl.realm());
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().display().to_string();
    let lenient = Regrelay::start(&[
        "--registry",
        &reg.url(),
        "--cache-dir",
        &cache_dir,
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let strict = Regrelay::start(&["--registry", &reg.url(), "--ready-requires-token-service"]);
    let maddr = support::metrics::addr(&lenient);
    let (status, body) = ready(&lenient).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["registry"]["status"], "ok", "{body}");
    assert_eq!(body["token_services"]["default"]["status"], "ok", "{body}");
    assert_eq!(body["cache_dir"]["status"], "ok", "{body}");
    let bearer = format!(
        "Bearer {}",
        fetch_token(
            &format!("{}/jwt/auth", lenient.url()),
            USER,
            PAT,
            &format!("repository:{REPO}:pull")
        )
        .await
    );
    // GitLab goes away; the 2 s token runs out.
    gl.stop();
    std::fs::remove_dir_all(cache.path().join("tmp")).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = ready(&lenient).await;
    assert_eq!(status, StatusCode::OK, "still ready: {body}");
    assert_eq!(
        body["token_services"]["default"]["status"], "unreachable",
        "{body}"
    );
    assert_eq!(body["cache_dir"]["status"], "unusable", "{body}");
    let (status, body) = ready(&strict).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "not ready", "{body}");
    // A request that needs a new token is told what is down: the token service.
    let resp = client()
        .request(
            Request::get(format!("{}/v2/{REPO}/tags/list", lenient.url()))
                .header("authorization", &bearer)
                .body(regrelay::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let said =
        String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
    assert!(said.contains("token service"), "{said}");
    assert!(!said.contains("upstream registry"), "{said}");
    fresh().await;
    let (_, _, text) = support::metrics::scrape(maddr).await;
    let up = |dependency: &str| {
        let label = format!("dependency=\"{dependency}\"");
        support::metrics::value(&text, "regrelay_dependency_up", &[&label])
    };
    assert_eq!(
        (up("registry"), up("token_service"), up("cache_dir")),
        (1.0, 0.0, 0.0),
        "{text}"
    );
}
