//! Prometheus metrics on `--metrics-listen`: a real push (real registry, 5-second GitLab tokens,
//! a throttled link so the upload spans several tokens) shows up in the counters; no label or
//! value carries a credential; the drain state is visible during shutdown; and every expression of
//! the shipped Grafana dashboard names a metric the binary exports.

use crate::support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::gitlab::with_developer_pat;
use support::metrics::{addr as metrics_addr, scrape, value};
use support::relay::Relay;
use support::*;

const USER: &str = "builder";
const PAT: &str = "glpat-Mt4nWq8ZtVc5LmXp2HsR";

/// Sample names the exposition can carry, from its `# TYPE` lines.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_count", "_sum"],
            "info" => &["_info"],
            _ => &[""],
        };
        for s in suffixes {
            names.insert(format!("{name}{s}"));
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_shows_in_the_metrics_without_any_secret() {
    let gl = with_developer_pat(USER, PAT, "ci/app", Duration::from_secs(5)).await;
    let reg = Registry::start(&gl.realm());
    // The link's address is the public URL; 1 MiB/s makes an 8 MiB layer span two tokens.
    let link = Relay::start(vec![nginx::free_addr()], Some(1 << 20)).await;
    let public = format!("http://{}", link.addr);
    let px = Regrelay::process(&[
        "--registry",
        &reg.url(),
        "--public-url",
        &public,
        "--metrics-listen",
        "127.0.0.1:0",
        "--shutdown-delay-secs",
        "3",
    ]);
    link.set_backends(vec![px.addr]);
    let maddr = metrics_addr(&px);

    let (status, ctype, before) = scrape(maddr).await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert_eq!(value(&before, "regrelay_shutdown_phase", &[]), 0.0);

    let image = OciImage::random(151, &[8 << 20]);
    let (src, dest) = (
        image.reference(),
        format!("docker://{}/ci/app:v1", link.addr),
    );
    let out = tokio::task::spawn_blocking(move || {
        skopeo_copy(&src, &dest, &format!("{USER}:{PAT}"), &Transport::Http)
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // A request under a name that is not the public URL is counted (and served).
    let other = upstream::client()
        .request(
            http::Request::get(format!("{}/v2/", px.url()))
                .header("host", "elsewhere.example:5000")
                .body(regrelay::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(other.status(), 401);

    let (_, _, text) = scrape(maddr).await;
    let layer = image.layers[0].1 as f64;
    let checks: &[(&str, &[&str], f64)] = &[
        (
            "regrelay_requests_total",
            &["route=\"upload\"", "method=\"PATCH\"", "status=\"202\""],
            1.0,
        ),
        (
            "regrelay_requests_total",
            &["route=\"manifest\"", "method=\"PUT\"", "status=\"201\""],
            1.0,
        ),
        (
            "regrelay_requests_total",
            &["route=\"token\"", "status=\"200\""],
            1.0,
        ),
        ("regrelay_client_received_bytes_total", &[], layer),
        ("regrelay_upload_parts_total", &[], 2.0),
        ("regrelay_upload_token_refreshes_total", &[], 1.0),
        ("regrelay_sessions_issued_total", &[], 1.0),
        ("regrelay_session_opens_total", &["outcome=\"ok\""], 5.0),
        ("regrelay_token_mints_total", &["outcome=\"first\""], 1.0),
        (
            "regrelay_token_cache_lookups_total",
            &["result=\"hit\""],
            1.0,
        ),
        ("regrelay_upstream_request_duration_seconds_count", &[], 5.0),
        ("regrelay_request_duration_seconds_count", &[], 5.0),
        ("regrelay_connections_accepted_total", &[], 1.0),
        ("regrelay_unknown_host_requests_total", &[], 1.0),
        ("regrelay_build_info", &[], 1.0),
    ];
    for (name, with, at_least) in checks {
        let v = value(&text, name, with);
        assert!(
            v >= *at_least,
            "{name}{with:?} = {v}, want >= {at_least}\n{text}"
        );
    }
    // Nothing from a credential, no repository name, no host a client sent.
    let mut secrets = gl.issued();
    secrets.push(PAT.to_owned());
    assert_no_secrets(&text, USER, &secrets);
    for leak in ["ci/app", "elsewhere", "builder"] {
        assert!(!text.contains(leak), "{leak} in the metrics:\n{text}");
    }

    // Shutdown: the phase is visible while the replica is not ready but still serving.
    px.terminate();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, _, during) = scrape(maddr).await;
    assert_eq!(
        value(&during, "regrelay_shutdown_phase", &[]),
        1.0,
        "{during}"
    );
    // Anything but /metrics is a 404.
    let other = upstream::client()
        .request(
            http::Request::get(format!("http://{maddr}/v2/"))
                .body(regrelay::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
}

#[tokio::test]
async fn every_dashboard_expression_names_an_exported_metric() {
    let reg_origin = upstream::serve(|_req: http::Request<hyper::body::Incoming>| async move {
        http::Response::new(regrelay::body::empty())
    })
    .await;
    let px = Regrelay::start(&[
        "--registry",
        &reg_origin.url(),
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    // One request, so that the per-request families have a child and show up.
    let answered = upstream::client()
        .request(
            http::Request::get(format!("{}/v2/", px.url()))
                .body(regrelay::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
    let (_, _, text) = scrape(metrics_addr(&px)).await;
    let exported = exported_names(&text);
    let path = format!(
        "{}/deploy/grafana/regrelay.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut exprs = vec![];
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let names: Vec<&str> = expr
            .match_indices("regrelay_")
            .map(|(i, _)| {
                let rest = &expr[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        assert!(
            !names.is_empty(),
            "an expression without a regrelay metric: {expr}"
        );
        for name in names {
            assert!(
                exported.contains(name),
                "the dashboard uses {name}, which the binary does not export\n{exported:?}"
            );
            used.insert(name.to_owned());
        }
    }
    // The dashboard covers what operators ask for.
    for needed in [
        "regrelay_client_received_bytes_total",
        "regrelay_token_mints_total",
        "regrelay_token_cache_lookups_total",
        "regrelay_upload_token_refreshes_total",
        "regrelay_requests_total",
    ] {
        assert!(used.contains(needed), "the dashboard lacks {needed}");
    }
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_exprs(i, out)),
        _ => {}
    }
}
