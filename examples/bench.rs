//! Benchmark: regrelay vs the direct path vs nginx, in one run, against one real registry with
//! storage on tmpfs. Run with `scripts/bench` (release build). Not a test: it prints numbers.
//!
//! - Blob push (POST, one streamed PATCH, PUT ?digest) and pull (GET) of BENCH_BLOB_MIB MiB
//!   (default 1024), the three paths alternating, BENCH_ROUNDS rounds (default 3): medians in MB/s.
//! - Small requests: BENCH_HEADS (default 10000) `HEAD` blob requests at 32 concurrency: p50/p99.
//! - regrelay's peak RSS (VmHWM), to show memory does not grow with blob size.
//!
//! nginx is set up as a streaming reverse proxy: `proxy_request_buffering off`,
//! `proxy_http_version 1.1`, upstream keep-alive, response buffering on with large buffers.

#[path = "../tests/support/mod.rs"]
#[allow(missing_docs, unused)]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use regrelay::body::{self, ProxyBody};
use sha2::{Digest, Sha256};
use support::gitlab::with_developer_pat;
use support::upstream::{client, drain, Generated};
use support::{fetch_token, nginx, Registry, Regrelay};

const REPO: &str = "bench/blob";
const CONCURRENCY: usize = 32;
/// Part bound of the splitting measurement (a CDN's 100 MB request cap).
const SPLIT_PART_BYTES: u64 = 100_000_000;

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn blob_digest(len: u64) -> String {
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let mut h = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        h.update(&chunk[..n]);
        left -= n as u64;
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

struct Target {
    name: &'static str,
    base: String,
}

struct Ctx {
    auth: String,
    len: u64,
    digest: String,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        ProxyBody,
    >,
}

impl Ctx {
    async fn send(
        &self,
        method: Method,
        url: &str,
        body: ProxyBody,
    ) -> http::Response<hyper::body::Incoming> {
        let req = Request::builder()
            .method(method)
            .uri(url)
            .header("authorization", &self.auth)
            .body(body)
            .unwrap();
        self.client.request(req).await.expect("request")
    }

    /// Pushes the blob; returns MB/s of the PATCH + PUT.
    async fn push(&self, t: &Target) -> f64 {
        let resp = self
            .send(
                Method::POST,
                &format!("{}/v2/{REPO}/blobs/uploads/", t.base),
                body::empty(),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::ACCEPTED, "{}: POST", t.name);
        let loc = resp.headers()["location"].to_str().unwrap().to_owned();
        let loc = absolute(&t.base, &loc);
        drop(resp);
        let start = Instant::now();
        let resp = self
            .send(Method::PATCH, &loc, Generated::new(self.len).boxed_unsync())
            .await;
        assert_eq!(resp.status(), StatusCode::ACCEPTED, "{}: PATCH", t.name);
        let loc = absolute(&t.base, resp.headers()["location"].to_str().unwrap());
        drain(resp.into_body()).await.unwrap();
        let sep = if loc.contains('?') { '&' } else { '?' };
        let resp = self
            .send(
                Method::PUT,
                &format!("{loc}{sep}digest={}", self.digest),
                body::empty(),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::CREATED, "{}: PUT", t.name);
        drain(resp.into_body()).await.unwrap();
        mbps(self.len, start.elapsed())
    }

    /// Pulls the blob; returns MB/s.
    async fn pull(&self, t: &Target) -> f64 {
        let start = Instant::now();
        let url = format!("{}/v2/{REPO}/blobs/{}", t.base, self.digest);
        let resp = self.send(Method::GET, &url, body::empty()).await;
        assert_eq!(resp.status(), StatusCode::OK, "{}: GET", t.name);
        let n = drain(resp.into_body()).await.unwrap();
        assert_eq!(n, self.len, "{}: short read", t.name);
        mbps(n, start.elapsed())
    }

    /// `count` HEAD requests at CONCURRENCY; returns sorted latencies and the wall time.
    async fn heads(self: &Arc<Self>, t: &Target, count: usize) -> (Vec<Duration>, Duration) {
        let url = Arc::new(format!("{}/v2/{REPO}/blobs/{}", t.base, self.digest));
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let start = Instant::now();
        let mut tasks = vec![];
        for _ in 0..CONCURRENCY {
            let (ctx, url, next) = (self.clone(), url.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = vec![];
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                    let s = Instant::now();
                    let resp = ctx.send(Method::HEAD, &url, body::empty()).await;
                    assert_eq!(resp.status(), StatusCode::OK);
                    drain(resp.into_body()).await.unwrap();
                    lat.push(s.elapsed());
                }
                lat
            }));
        }
        let mut all = vec![];
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let wall = start.elapsed();
        all.sort_unstable();
        (all, wall)
    }
}

fn absolute(base: &str, loc: &str) -> String {
    if loc.starts_with("http") {
        loc.to_owned()
    } else {
        format!("{base}{loc}")
    }
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn pct(v: &[Duration], p: f64) -> Duration {
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

#[tokio::main]
async fn main() {
    let len = env_or("BENCH_BLOB_MIB", 1024) << 20;
    let rounds = env_or("BENCH_ROUNDS", 3) as usize;
    let heads = env_or("BENCH_HEADS", 10_000) as usize;
    let pat = "glpat-bench-0000000000";
    let gl = with_developer_pat("bench", pat, "bench", Duration::from_secs(3600)).await;
    let shm = std::path::Path::new("/dev/shm");
    let reg = Registry::start_in(&gl.realm(), shm.is_dir().then_some(shm));
    let px = Regrelay::start(&["--registry", &reg.url()]);
    let ngx_addr = nginx::free_addr();
    let ngx = nginx::Nginx::start_with(
        ngx_addr,
        &format!(
            "  upstream registry {{ server {}; keepalive 64; }}",
            reg.addr
        ),
        "    client_max_body_size 0;\n    location / {\n      proxy_pass http://registry;\n\
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
         proxy_set_header Host $http_host;\n      proxy_request_buffering off;\n\
         proxy_buffering on;\n      proxy_buffer_size 1m;\n      proxy_buffers 64 1m;\n\
         proxy_busy_buffers_size 8m;\n      proxy_max_temp_file_size 0;\n    }",
    );
    // One GitLab token for all three paths (regrelay passes tokens it did not issue untouched).
    let scope = format!("repository:{REPO}:pull,push");
    let jwt = fetch_token(&gl.realm(), "bench", pat, &scope).await;
    println!("computing the digest of a {} MiB blob…", len >> 20);
    let ctx = Arc::new(Ctx {
        auth: format!("Bearer {jwt}"),
        len,
        digest: blob_digest(len),
        client: client(),
    });
    let targets = [
        Target {
            name: "direct",
            base: reg.url(),
        },
        Target {
            name: "regrelay",
            base: px.url(),
        },
        Target {
            name: "nginx",
            base: format!("http://{ngx_addr}"),
        },
    ];
    // Splitting: a regrelay session (its own token) through a regrelay with a 100 MB part bound,
    // so a 1 GiB upload goes as about 11 PATCHes with a token check each.
    let split = Regrelay::start(&[
        "--registry",
        &reg.url(),
        "--upload-chunk-max",
        &SPLIT_PART_BYTES.to_string(),
    ]);
    let session = fetch_token(&format!("{}/jwt/auth", split.url()), "bench", pat, &scope).await;
    let split_ctx = Ctx {
        auth: format!("Bearer {session}"),
        len,
        digest: ctx.digest.clone(),
        client: client(),
    };
    let split_target = Target {
        name: "regrelay, 100 MB parts",
        base: split.url(),
    };
    let mut split_push = vec![];
    let mut push = [vec![], vec![], vec![]];
    let mut pull = [vec![], vec![], vec![]];
    for round in 0..rounds {
        // Alternate the order each round so no path always runs on a warm or cold cache.
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            push[i].push(ctx.push(&targets[i]).await);
            pull[i].push(ctx.pull(&targets[i]).await);
        }
        split_push.push(split_ctx.push(&split_target).await);
        println!("round {}/{rounds} done", round + 1);
    }
    let mut lat = vec![];
    for t in &targets {
        let _ = ctx.heads(t, heads / 10).await; // warm-up
        lat.push(ctx.heads(t, heads).await);
    }
    let up: Vec<f64> = push.iter_mut().map(|v| median(v)).collect();
    let down: Vec<f64> = pull.iter_mut().map(|v| median(v)).collect();
    println!(
        "\nregrelay benchmark: {} MiB blob, {rounds} rounds (medians), registry storage on {}",
        len >> 20,
        if shm.is_dir() { "tmpfs" } else { "disk" }
    );
    println!(
        "{:<10} {:>12} {:>12} {:>10} {:>10} {:>10}",
        "path", "push MB/s", "pull MB/s", "HEAD p50", "HEAD p99", "HEAD/s"
    );
    for (i, t) in targets.iter().enumerate() {
        let (l, wall) = &lat[i];
        println!(
            "{:<10} {:>12.0} {:>12.0} {:>8.2}ms {:>8.2}ms {:>10.0}",
            t.name,
            up[i],
            down[i],
            pct(l, 0.5).as_secs_f64() * 1e3,
            pct(l, 0.99).as_secs_f64() * 1e3,
            l.len() as f64 / wall.as_secs_f64()
        );
    }
    let p50 = |i: usize| pct(&lat[i].0, 0.5).as_secs_f64();
    let p99 = |i: usize| pct(&lat[i].0, 0.99).as_secs_f64();
    println!("\nratios (> 1 is better for regrelay):");
    println!(
        "  push  regrelay/direct {:.2}   regrelay/nginx {:.2}",
        up[1] / up[0],
        up[1] / up[2]
    );
    println!(
        "  pull  regrelay/direct {:.2}   regrelay/nginx {:.2}",
        down[1] / down[0],
        down[1] / down[2]
    );
    println!(
        "  HEAD p50 nginx/regrelay {:.2}   p99 nginx/regrelay {:.2}",
        p50(2) / p50(1),
        p99(2) / p99(1)
    );
    let split_up = median(&mut split_push);
    let parts = split
        .output
        .text()
        .lines()
        .filter_map(|l| l.split("parts=").nth(1))
        .filter_map(|p| p.split_whitespace().next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(1);
    println!(
        "  split upload ({parts} PATCHes of <= 100 MB, a fresh token check each): push {split_up:.0} MB/s, \
         {:.2} of regrelay unsplit, {:+.2} s per 1 GiB",
        split_up / up[1],
        (1.0 / split_up - 1.0 / up[1]) * (1u64 << 30) as f64 / 1e6
    );
    println!(
        "regrelay peak RSS: {} MiB after moving {} GiB",
        px.peak_rss_kib() / 1024,
        (len * rounds as u64 * 2) >> 30
    );
    drop(ngx);
}
