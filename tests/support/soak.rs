//! The hostile soak (issue 20), shared by `tests/it/hostile_soak.rs` and the bench's `hostile`
//! case: for a while, from other loopback addresses at once, every kind of hostile client —
//! zero-window HTTP/2 streams (health checks and `/v2/`), paced rapid resets, slowloris heads and
//! idle sockets, sessions of the largest shape allowed and token requests of 1,000 scopes,
//! hammering of a repository the session may not pull, oversized OAuth2 forms. Meanwhile a
//! legitimate client on 127.0.0.1 pushes and pulls an image with skopeo, sends manifest `HEAD`s
//! (timed on their own thread, apart from the attackers) and health checks. The report says what
//! failed, the `HEAD` latencies beside the unloaded ones, regrelay's peak memory and whether its
//! file descriptors came back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;

use super::attack::{self, host, Attack};
use super::gitlab::{gitlab, Credential, GitLab, Role, TokenScope};
use super::{Registry, Regrelay};

/// The legitimate user.
pub const USER: &str = "olivia";
/// Her token.
pub const PAT: &str = "glpat-0l1v1aS04kT3stT0k3n";
/// Her project (private).
pub const REPO: &str = "soak/app";
/// Public projects anyone may pull (the attackers' sessions name them).
const PUBLIC: usize = 32;

/// The stand-in (with `REPO` and `PUBLIC` public projects of long names) and the registry.
pub async fn world() -> (GitLab, Registry) {
    let mut gl = gitlab()
        .credential(Credential::Pat {
            user: USER.into(),
            token: PAT.into(),
            scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
        })
        .project(REPO, false, &[(USER, Role::Developer)])
        .lifetime(Duration::from_secs(300));
    for p in public_projects() {
        gl = gl.project(&p, true, &[]);
    }
    let gl = gl.start().await;
    let reg = Registry::start(&gl.realm());
    (gl, reg)
}

fn public_projects() -> Vec<String> {
    (0..PUBLIC)
        .map(|i| format!("pub/{i:02}-{}", "p".repeat(240)))
        .collect()
}

/// What the soak saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Seconds under attack.
    pub secs: f64,
    /// Legitimate requests (HEADs, token requests) and pushes/pulls done, and those that failed.
    pub legit: usize,
    /// What failed, with why.
    pub legit_failures: Vec<String>,
    /// Health checks done, and those that failed.
    pub health: usize,
    /// What failed.
    pub health_failures: Vec<String>,
    /// Pushes and pulls completed (each checked digest by digest).
    pub transfers: usize,
    /// Manifest `HEAD` latency before the attack, p50 and p99, ms.
    pub head_unloaded_ms: (f64, f64),
    /// The same under attack.
    pub head_loaded_ms: (f64, f64),
    /// regrelay's peak resident memory, KiB.
    pub peak_rss_kib: u64,
    /// Its open file descriptors before the attack, at its height, and once it was over.
    pub fds: (usize, usize, usize),
    /// Of the descriptors open once it was over, connections to the upstreams kept in the pool
    /// (they outlive the attack by design: idle pooled connections close on the pool's timer).
    pub pooled_after: usize,
    /// Its sockets once it was over (`ss`), to tell what stayed open.
    pub sockets_after: String,
    /// Each attack: name, requests/streams/sockets it made, and how many the server ended.
    pub attacks: Vec<(&'static str, usize, usize)>,
}

/// Open file descriptors of `pid`.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Connections process `pid` opened (to its upstreams), not accepted on `listen_port`.
pub fn upstream_connections(pid: u32, listen_port: u16) -> usize {
    let own = format!(":{listen_port}");
    sockets_of(pid)
        .lines()
        .filter(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.first() == Some(&"ESTAB")
                && cols.get(3).is_some_and(|local| !local.ends_with(&own))
        })
        .count()
}

/// The TCP sockets of process `pid`, as `ss -tanp` lists them.
pub fn sockets_of(pid: u32) -> String {
    let out = std::process::Command::new("ss").arg("-tanp").output();
    let needle = format!("pid={pid},");
    match out {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&needle))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("ss: {e}"),
    }
}

fn percentiles(mut ms: Vec<f64>) -> (f64, f64) {
    if ms.is_empty() {
        return (0.0, 0.0);
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    (at(0.50), at(0.99))
}

/// A session of regrelay's (`GET /jwt/auth` from 127.0.0.1).
async fn session(px: SocketAddr, scope: &str, basic: Option<&str>) -> Result<String, String> {
    let path = format!("/jwt/auth?service=container_registry&scope={scope}");
    let auth = basic.map(|b| format!("Basic {b}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let (status, body) = attack::request_from(host(1), px, "GET", &path, &headers, b"")
        .await
        .ok_or("token request: no answer")?;
    if status != StatusCode::OK {
        return Err(format!("token request: {status} {body}"));
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    Ok(format!(
        "Bearer {}",
        v["token"].as_str().unwrap_or_default()
    ))
}

fn basic(user: &str, secret: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"))
}

/// Times manifest `HEAD`s of `REPO:v1` on a thread of its own (a runtime the attackers do not
/// share) every `every` until `stop`; failures are named.
fn time_heads(
    px: SocketAddr,
    bearer: String,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<f64>, Vec<String>)> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let client = super::upstream::client();
            let (mut ms, mut failed) = (vec![], vec![]);
            let uri = format!("http://{px}/v2/{REPO}/manifests/v1");
            while !stop.load(Ordering::SeqCst) {
                let req = http::Request::head(&uri)
                    .header("authorization", &bearer)
                    .header("accept", "application/vnd.oci.image.manifest.v1+json")
                    .body(regrelay::body::empty())
                    .unwrap();
                let start = Instant::now();
                match client.request(req).await {
                    Ok(resp) if resp.status() == StatusCode::OK => {
                        ms.push(start.elapsed().as_secs_f64() * 1e3);
                    }
                    Ok(resp) => failed.push(format!("HEAD manifest: {}", resp.status())),
                    Err(e) => failed.push(format!("HEAD manifest: {e}")),
                }
                tokio::time::sleep(every).await;
            }
            (ms, failed)
        })
    })
}

/// Pushes a fresh image as `REPO:tag` and pulls it back through regrelay (skopeo).
async fn push_pull(px: SocketAddr, seed: u64, tag: &str) -> Result<(), String> {
    let image = super::OciImage::random(seed, &[1 << 20, 512 << 10, 64 << 10]);
    let creds = format!("{USER}:{PAT}");
    let (src, dest) = (image.reference(), format!("docker://{px}/{REPO}:{tag}"));
    let pushed = {
        let (s, d, c) = (src.clone(), dest.clone(), creds.clone());
        tokio::task::spawn_blocking(move || super::skopeo_copy(&s, &d, &c, &super::Transport::Http))
            .await
            .unwrap()
    };
    if !pushed.status.success() {
        return Err(format!("push: {}", super::text(&pushed)));
    }
    let dir = tempfile::tempdir().unwrap();
    let pulled_ref = format!("oci:{}:{tag}", dir.path().display());
    let pulled = tokio::task::spawn_blocking(move || {
        super::skopeo_copy(&dest, &pulled_ref, &creds, &super::Transport::Http)
    })
    .await
    .unwrap();
    if !pulled.status.success() {
        return Err(format!("pull: {}", super::text(&pulled)));
    }
    for (d, size) in &image.layers {
        let path = dir
            .path()
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"));
        let data = std::fs::read(&path).map_err(|e| format!("pulled {d}: {e}"))?;
        if data.len() != *size || super::digest(&data) != *d {
            return Err(format!("pulled {d} differs"));
        }
    }
    Ok(())
}

/// Every attack at once, each from its own address.
async fn attacks(px: SocketAddr) -> Vec<(&'static str, Attack)> {
    let projects = public_projects();
    let worst: Vec<String> = projects
        .iter()
        .map(|p| format!("repository:{p}:pull"))
        .collect();
    let thousand: Vec<String> = (0..1000)
        .map(|i| format!("repository:pub/{i}:pull"))
        .collect();
    let pull_public = format!("repository:{}:pull", projects[0]);
    let outsider = session(px, &pull_public, None)
        .await
        .expect("an anonymous session");
    vec![
        (
            "zero-window h2 /-/healthy (21 x 100)",
            attack::zero_window_streams(host(2), px, 21, 100, "/-/healthy", None).await,
        ),
        (
            "zero-window h2 /v2/ (3 x 100)",
            attack::zero_window_streams(host(3), px, 3, 100, "/v2/", None).await,
        ),
        (
            "rapid resets (100/s)",
            attack::rapid_resets(host(4), px, 100).await,
        ),
        (
            "slowloris (100 sockets)",
            attack::slowloris(host(5), px, 100, Duration::from_secs(1)).await,
        ),
        (
            "idle sockets (100)",
            attack::idle_sockets(host(6), px, 100).await,
        ),
        (
            "largest sessions (32 scopes, 20/s)",
            attack::token_requests(host(7), px, worst, 20).await,
        ),
        (
            "1000-scope token requests (20/s)",
            attack::token_requests(host(7), px, thousand, 20).await,
        ),
        (
            "out-of-scope hammering (100/s)",
            attack::hammer(
                host(8),
                px,
                &format!("/v2/{REPO}/manifests/v1"),
                &outsider,
                100,
            )
            .await,
        ),
        (
            "oversized OAuth2 forms (246 KB, 10/s)",
            attack::oversized_forms(host(9), px, 246 * 1024, 10).await,
        ),
    ]
}

/// Runs the soak against `px` for `duration`: a first push and pull, unloaded `HEAD`s, then
/// the attacks with the legitimate traffic, then the attacks stopped and the fds awaited.
pub async fn run(px: &Regrelay, duration: Duration) -> Report {
    let addr = px.addr;
    let mut report = Report::default();
    let fail = |r: &mut Report, e: String| r.legit_failures.push(e);
    if let Err(e) = push_pull(addr, 7001, "v1").await {
        fail(&mut report, e);
        return report;
    }
    report.transfers += 1;
    let bearer = session(
        addr,
        &format!("repository:{REPO}:pull"),
        Some(&basic(USER, PAT)),
    )
    .await
    .expect("a session");
    let stop = Arc::new(AtomicBool::new(false));
    let unloaded = time_heads(addr, bearer.clone(), Duration::from_millis(5), stop.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    let (ms, failed) = unloaded.join().unwrap();
    report.head_unloaded_ms = percentiles(ms);
    report.legit_failures.extend(failed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fds_before = open_fds(px.pid());

    let running = attacks(addr).await;
    let stop = Arc::new(AtomicBool::new(false));
    let loaded = time_heads(addr, bearer.clone(), Duration::from_millis(5), stop.clone());
    let health_failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let health = {
        let (stop, failures) = (stop.clone(), health_failures.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                for path in ["/-/healthy", "/-/ready"] {
                    let got = attack::request_from(host(1), addr, "GET", path, &[], b"").await;
                    n += 1;
                    if got.as_ref().map(|(s, _)| *s) != Some(StatusCode::OK) {
                        failures.lock().unwrap().push(format!("{path}: {got:?}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            n
        })
    };
    let start = Instant::now();
    let mut fds_peak = 0;
    let mut round = 0;
    while start.elapsed() < duration {
        round += 1;
        match push_pull(addr, 7001 + round, &format!("r{round}")).await {
            Ok(()) => report.transfers += 1,
            Err(e) => fail(&mut report, e),
        }
        match session(
            addr,
            &format!("repository:{REPO}:pull,push"),
            Some(&basic(USER, PAT)),
        )
        .await
        {
            Ok(_) => report.legit += 1,
            Err(e) => fail(&mut report, e),
        }
        fds_peak = fds_peak.max(open_fds(px.pid()));
        // A CI job's pace, not a benchmark's: the HEADs are what is timed.
        let next = Instant::now() + Duration::from_secs(8);
        while Instant::now() < next && start.elapsed() < duration {
            fds_peak = fds_peak.max(open_fds(px.pid()));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    report.secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let (ms, failed) = loaded.join().unwrap();
    report.legit += ms.len() + failed.len() + report.transfers;
    report.head_loaded_ms = percentiles(ms);
    report.legit_failures.extend(failed);
    report.health = health.await.unwrap();
    report.health_failures = std::mem::take(&mut *health_failures.lock().unwrap());
    report.peak_rss_kib = px.peak_rss_kib();
    for (name, a) in &running {
        report.attacks.push((name, a.sent(), a.ended()));
    }
    drop(running);
    // The attackers are gone: regrelay closes what they held.
    let settle = Instant::now();
    let unsettled =
        || open_fds(px.pid()) > fds_before + 4 + upstream_connections(px.pid(), px.addr.port());
    while unsettled() && settle.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.pooled_after = upstream_connections(px.pid(), px.addr.port());
    report.fds = (fds_before, fds_peak, open_fds(px.pid()));
    report.sockets_after = sockets_of(px.pid());
    report
}

impl Report {
    /// The report as lines for a test log or the bench.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![
            format!(
                "{:.0} s under attack: {} legitimate requests, {} failed; {} pushes+pulls; {} health checks, {} failed",
                self.secs,
                self.legit,
                self.legit_failures.len(),
                self.transfers,
                self.health,
                self.health_failures.len()
            ),
            format!(
                "manifest HEAD p50/p99: unloaded {:.2}/{:.2} ms, under attack {:.2}/{:.2} ms",
                self.head_unloaded_ms.0,
                self.head_unloaded_ms.1,
                self.head_loaded_ms.0,
                self.head_loaded_ms.1
            ),
            format!(
                "peak RSS {} MiB; fds {} before, {} at most, {} after ({} of them pooled upstream \
                 connections)",
                self.peak_rss_kib >> 10,
                self.fds.0,
                self.fds.1,
                self.fds.2,
                self.pooled_after
            ),
        ];
        for (name, sent, ended) in &self.attacks {
            out.push(format!("  {name}: {sent} made, {ended} ended by regrelay"));
        }
        out.extend(
            self.legit_failures
                .iter()
                .take(10)
                .map(|f| format!("  FAILED {f}")),
        );
        out.extend(
            self.health_failures
                .iter()
                .take(10)
                .map(|f| format!("  HEALTH {f}")),
        );
        out
    }
}
