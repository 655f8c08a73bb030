//! No single client can hold what all clients share (issue 20, finding 1), against the real
//! registry and the GitLab stand-in, with hostile clients on other loopback addresses:
//!
//! - an unauthenticated HTTP/2 client that holds its flow-control window at zero while it keeps
//!   hundreds of streams open (`/-/healthy` on 21 connections, `/v2/` on 3) locks no one out:
//!   health checks, readiness, `/jwt/auth` and registry requests of another client all answer,
//!   `regrelay healthcheck` passes, and the stalled streams are reset once they pass
//!   `--h2-stall-timeout-secs`, which frees what they held;
//! - at `--max-connections`, with every slot held by connections that make progress, a health
//!   check is still answered (a reserve connection), and other requests get a quick 503.

use crate::support;

use std::process::Command;
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use regrelay::body;
use support::attack::{self, host};
use support::gitlab::with_developer_pat;
use support::upstream::{self, client};
use support::*;
use tokio::io::AsyncWriteExt;

const USER: &str = "erin";
const PAT: &str = "glpat-Fa1rSh4r3sT0k3nXyZ9";
const REPO: &str = "fair/app";

/// Status of `GET url` (with `authorization`, if given) from 127.0.0.1.
async fn status(url: &str, authorization: Option<&str>) -> StatusCode {
    let mut req = Request::get(url);
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let resp = client()
        .request(req.body(body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    status
}

fn healthcheck(url: &str) -> bool {
    Command::new(regrelay_bin())
        .args(["healthcheck", "--url", url])
        .status()
        .unwrap()
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zero_window_http2_streams_of_one_client_lock_no_one_out() {
    let gl = with_developer_pat(USER, PAT, REPO, Duration::from_secs(300)).await;
    let reg = Registry::start(&gl.realm());
    let px = Regrelay::start(&[
        "--registry",
        &reg.url(),
        "--max-requests",
        "128",
        "--max-upstream-connections",
        "16",
        "--h2-stall-timeout-secs",
        "3",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let maddr = support::metrics::addr(&px);
    let base = px.url();
    // 21 connections x 100 streams of /-/healthy, and 3 x 100 of /v2/ (each of those would hold
    // an upstream connection too), their windows at zero: more than every pool holds.
    let health = attack::zero_window_streams(host(2), px.addr, 21, 100, "/-/healthy", None).await;
    let v2 = attack::zero_window_streams(host(3), px.addr, 3, 100, "/v2/", None).await;
    let start = Instant::now();
    while health.sent() < 2000 || v2.sent() < 300 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "attack not under way: {} + {} streams",
            health.sent(),
            v2.sent()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Another client meanwhile: every answer is the real one, none a 503.
    let realm = format!("{base}/jwt/auth");
    let mut answers = vec![];
    for _ in 0..10 {
        answers.push(("healthy", status(&format!("{base}/-/healthy"), None).await));
        answers.push(("ready", status(&format!("{base}/-/ready"), None).await));
        let token = fetch_token(&realm, USER, PAT, &format!("repository:{REPO}:pull")).await;
        let bearer = format!("Bearer {token}");
        answers.push(("v2", status(&format!("{base}/v2/"), None).await));
        let tags = format!("{base}/v2/{REPO}/tags/list");
        answers.push(("tags", status(&tags, Some(&bearer)).await));
    }
    for (what, got) in &answers {
        let want = match *what {
            "v2" => StatusCode::UNAUTHORIZED,
            "tags" => StatusCode::NOT_FOUND,
            _ => StatusCode::OK,
        };
        assert_eq!(*got, want, "{what} during the attack: {answers:?}");
    }
    let url = format!("{base}/-/healthy");
    assert!(
        tokio::task::spawn_blocking(move || healthcheck(&url))
            .await
            .unwrap(),
        "regrelay healthcheck failed during the attack"
    );
    // The attacker's own streams past its share were refused at once.
    let (_, _, text) = support::metrics::scrape(maddr).await;
    let refused = support::metrics::value(
        &text,
        "regrelay_client_share_refused_total",
        &["pool=\"requests\""],
    );
    assert!(refused > 0.0, "{text}");
    // Past --h2-stall-timeout-secs the stalled streams are reset, each alone (the attacker's
    // connections stay up and open new ones).
    let start = Instant::now();
    while v2.ended() < 32 || health.ended() < 100 {
        if start.elapsed() > Duration::from_secs(20) {
            let (_, _, text) = support::metrics::scrape(maddr).await;
            let shed: Vec<&str> = text.lines().filter(|l| l.contains("shed")).collect();
            panic!(
                "stalled streams not reset: {} /v2/ and {} health ended; {shed:?}",
                v2.ended(),
                health.ended()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, _, text) = support::metrics::scrape(maddr).await;
    let shed = support::metrics::value(
        &text,
        "regrelay_requests_shed_total",
        &["outcome=\"stall\""],
    );
    assert!(shed >= 32.0, "{shed} streams reset for stalling: {text}");
    drop((health, v2));
}

#[tokio::test(flavor = "multi_thread")]
async fn health_checks_are_answered_when_every_connection_slot_is_busy() {
    let origin = upstream::sink().await;
    let px = Regrelay::start(&[
        "--registry",
        &origin.url(),
        "--max-connections",
        "8",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let maddr = support::metrics::addr(&px);
    // Four other hosts hold two connections each (their share), each streaming an upload that
    // makes progress: nothing to shed.
    let mut uploads = vec![];
    for n in 2..6 {
        for _ in 0..2 {
            let mut s = attack::connect_from(host(n), px.addr).await.unwrap();
            s.write_all(
                b"PATCH /v2/g/p/blobs/uploads/u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n",
            )
            .await
            .unwrap();
            uploads.push(s);
        }
    }
    let feeding = tokio::spawn(async move {
        loop {
            for s in uploads.iter_mut() {
                let _ = s.write_all(b"1\r\na\r\n").await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    let healthy = attack::request_from(host(1), px.addr, "GET", "/-/healthy", &[], b"").await;
    assert_eq!(healthy.map(|(s, _)| s), Some(StatusCode::OK));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let ready = attack::request_from(host(1), px.addr, "GET", "/-/ready", &[], b"").await;
    assert_eq!(ready.map(|(s, _)| s), Some(StatusCode::OK));
    // Anything else waits a moment for a slot, then gets 503 and why.
    let start = Instant::now();
    let (got, body) = attack::request_from(host(1), px.addr, "GET", "/v2/", &[], b"")
        .await
        .expect("an answer");
    assert_eq!(got, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("connections"), "{body}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    feeding.abort();
    let (_, _, text) = support::metrics::scrape(maddr).await;
    for (outcome, at_least) in [("health", 2.0), ("refused", 1.0)] {
        let label = format!("outcome=\"{outcome}\"");
        let n = support::metrics::value(&text, "regrelay_reserve_connections_total", &[&label]);
        assert!(n >= at_least, "{outcome}: {n}\n{text}");
    }
}

/// When every request slot is held (here by one client: shares are off, as if many clients held
/// them), requests whose clients have taken nothing of their responses for 5 s are reset to make
/// room, and the request that found no slot is served within a second of asking.
#[tokio::test(flavor = "multi_thread")]
async fn stalled_streams_are_shed_for_a_request_that_finds_every_slot_taken() {
    let gl = with_developer_pat(USER, PAT, REPO, Duration::from_secs(300)).await;
    let reg = Registry::start(&gl.realm());
    let px = Regrelay::start(&[
        "--registry",
        &reg.url(),
        "--max-requests",
        "8",
        "--client-share-percent",
        "100",
        "--h2-stall-timeout-secs",
        "300",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let maddr = support::metrics::addr(&px);
    let held = attack::zero_window_streams(host(2), px.addr, 1, 8, "/v2/", None).await;
    let start = Instant::now();
    // Each holds its slot once answered (its body cannot be sent).
    while held.answered() < 8 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "streams not answered: {} of 8",
            held.answered()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Stalled for less than 5 s: nothing is shed yet, the newcomer gets its 503.
    let url = format!("{}/v2/", px.url());
    assert_eq!(status(&url, None).await, StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let asked = Instant::now();
    assert_eq!(status(&url, None).await, StatusCode::UNAUTHORIZED);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    let (_, _, text) = support::metrics::scrape(maddr).await;
    let shed = support::metrics::value(
        &text,
        "regrelay_requests_shed_total",
        &["outcome=\"pressure\""],
    );
    assert!(shed >= 1.0, "{text}");
    drop(held);
}
