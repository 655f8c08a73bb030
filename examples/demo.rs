//! The demo (`scripts/demo`): regrelay's main job on an embedded default.
//!
//! A real registry (Debian's docker-registry) trusts a GitLab-behaving token service whose tokens
//! live DEMO_TOKEN_SECS (default 5) seconds; regrelay sits in front. skopeo logs in once and
//! pushes a multi-layer image over a link throttled to DEMO_RATE_KIB KiB/s (default 320), so the
//! push outlives the token plus the registry's 60 s leeway; then pulls it back and compares
//! digests. Everything runs on 127.0.0.1 and stops at the end.

#[path = "../tests/support/mod.rs"]
#[allow(missing_docs, unused)]
mod support;

use std::time::{Duration, Instant};

use support::gitlab::with_developer_pat;
use support::relay::Relay;
use support::{assert_same_blobs, skopeo_copy, text, OciImage, Registry, Regrelay, Transport};

const USER: &str = "ci-builder";
const PAT: &str = "glpat-demo-Xq2v8RtKm4Ln";

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Announces one step of the demo: what it does now, and why.
fn step(n: u32, what: &str) {
    println!("\n[{n}/7] {what}");
}

#[tokio::main]
async fn main() {
    let token_secs = env_or("DEMO_TOKEN_SECS", 5);
    let rate = env_or("DEMO_RATE_KIB", 320) << 10;
    println!(
        "What this shows: a push that outlives GitLab's registry token. Plain, the registry \
         would refuse it\n(`unauthorized: authentication required`) once the token has expired; \
         through regrelay it completes.\nEverything runs on 127.0.0.1 and stops at the end."
    );
    step(
        1,
        "starting a GitLab-style token service (GitLab's /jwt/auth rules, test stand-in)",
    );
    let gl = with_developer_pat(USER, PAT, "demo/app", Duration::from_secs(token_secs)).await;
    println!(
        "      {}  RS256 tokens with a libtrust kid, each valid {token_secs} s; user {USER} may push demo/app",
        gl.realm()
    );
    step(
        2,
        "starting a real registry (Debian's docker-registry, CNCF distribution 2.8)",
    );
    let reg = Registry::start(&gl.realm());
    println!(
        "      {}  token auth: it trusts only the token service's tokens",
        reg.url()
    );
    step(3, "starting regrelay in front of the registry");
    let px = Regrelay::process(&["--registry", &reg.url()]);
    println!(
        "      {} -> {}  serves the token realm itself and re-mints GitLab tokens",
        px.url(),
        reg.url()
    );
    step(4, "starting a slow link to regrelay (a CI runner's uplink)");
    let link = Relay::start(vec![px.addr], Some(rate)).await;
    println!(
        "      {} -> regrelay  throttled to {} KiB/s",
        link.addr,
        rate >> 10
    );

    let image = OciImage::random(99, &[8 << 20, 8 << 20, 6 << 20]);
    let total: usize = image.layers.iter().map(|(_, s)| s).sum();
    let dest = format!("docker://{}/demo/app:v1", link.addr);
    let secs = total as u64 / rate + 2;
    // distribution accepts a token up to 60 s past its expiry: only a longer push proves the point.
    let outlives = if secs > token_secs + 60 {
        format!("longer than the {token_secs} s token plus the registry's 60 s leeway")
    } else {
        format!("NOT longer than the {token_secs} s token plus the registry's 60 s leeway at this DEMO_RATE_KIB")
    };
    step(
        5,
        &format!(
            "pushing {} layers ({:.1} MB) with skopeo as {USER} over the slow link: about {secs} s, \
             {outlives}",
            image.layers.len(),
            total as f64 / 1e6,
        ),
    );
    println!(
        "      skopeo logs in once; regrelay asks GitLab for a fresh token whenever one runs low"
    );
    let start = Instant::now();
    let (src, d, creds) = (image.reference(), dest.clone(), format!("{USER}:{PAT}"));
    let mut push =
        tokio::task::spawn_blocking(move || skopeo_copy(&src, &d, &creds, &Transport::Http));
    let out = loop {
        tokio::select! {
            out = &mut push => break out.unwrap(),
            () = tokio::time::sleep(Duration::from_secs(15)) => println!(
                "      … {:>3} s: GitLab has minted {} tokens so far", start.elapsed().as_secs(), gl.mints()
            ),
        }
    };
    let took = start.elapsed();
    if !out.status.success() {
        eprintln!(
            "push FAILED after {took:?}:\n{}\nregrelay log:\n{}",
            text(&out),
            px.output.text()
        );
        std::process::exit(1);
    }
    let log = px.output.text();
    let asked = log.lines().filter(|l| l.contains("token request")).count();
    println!("push OK in {:.0} s: {} GitLab tokens of {token_secs} s were minted for {asked} token request(s) from skopeo",
        took.as_secs_f64(), gl.mints());

    step(
        6,
        "pulling the image back through regrelay (no throttle) and comparing every digest",
    );
    let pulled = tempfile::tempdir().unwrap();
    let (src, d, creds) = (
        format!("docker://{}/demo/app:v1", px.addr),
        format!("oci:{}:latest", pulled.path().display()),
        format!("{USER}:{PAT}"),
    );
    let pull = tokio::task::spawn_blocking(move || skopeo_copy(&src, &d, &creds, &Transport::Http))
        .await
        .unwrap();
    if !pull.status.success() {
        eprintln!("pull FAILED:\n{}", text(&pull));
        std::process::exit(1);
    }
    assert_same_blobs(&image, pulled.path());
    println!("pull OK through regrelay: every layer digest matches what was pushed");

    step(
        7,
        "regrelay's log: a line per request and per token request (no query, header or secret)",
    );
    let shown = |l: &&str| l.contains("regrelay::access") || l.contains("regrelay::auth");
    for line in px.output.text().lines().filter(shown) {
        if let Some(i) = line.find("regrelay::") {
            println!("   {}", &line[i..]);
        }
    }
    let secrets_logged = log.contains(PAT)
        || log.contains("rr1.")
        || gl.issued().iter().any(|t| log.contains(t.as_str()));
    println!(
        "\nsecrets in regrelay's output: {}",
        if secrets_logged {
            "FOUND (bug)"
        } else {
            "none"
        }
    );
}
