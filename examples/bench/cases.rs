//! The cases: each one a function that runs its transfers or requests through the lanes it
//! builds from the fronts and returns a [`Case`] of measurements. Shared machinery: [`Lane`]
//! (a labelled endpoint and the process it crosses), [`Tally`] (figures over rounds), and
//! [`Bench::bulk`] (upload + download rounds, the lanes taking turns).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use http::{Method, Request, StatusCode};

use crate::client::{self, Endpoint, Proto};
use crate::report::{Case, Cpu, Goal, Measurement};
use crate::support::upstream::drain;
use crate::{delay, procs, support};
use crate::{http, https, Blob, Front, Settings, GIB, MIB, PAT, REPO, USER};

#[path = "shared.rs"]
mod shared;
pub use shared::shared;

/// What one case sends one way: a labelled endpoint and the process it crosses.
#[derive(Clone)]
struct Lane {
    /// The path's name in the report (`direct`, `regrelay`, a peer).
    path: String,
    /// Put before each metric name (e.g. `HTTP/2 `), so lanes of one path can differ.
    prefix: String,
    /// Where and how the client connects.
    ep: Endpoint,
    /// The front's process, for CPU and RSS (none for the direct path).
    pid: Option<u32>,
}

impl Lane {
    fn new(
        path: &str,
        prefix: &str,
        base: String,
        proto: Proto,
        auth: Option<String>,
        pid: Option<u32>,
    ) -> Lane {
        Lane {
            path: path.into(),
            prefix: prefix.into(),
            ep: Endpoint { base, proto, auth },
            pid,
        }
    }
}

/// Figures of one lane and one metric, gathered over rounds.
#[derive(Default)]
struct Tally {
    rates: Vec<f64>,
    cpu: f64,
    bytes: u64,
    errors: Vec<String>,
}

impl Tally {
    /// Adds one transfer (`bytes` in `secs`, or its error) and the front's CPU over it.
    fn add(&mut self, r: Result<(u64, f64), String>, cpu: f64) {
        match r {
            Ok((bytes, secs)) => {
                self.rates.push(bytes as f64 / 1e6 / secs);
                self.bytes += bytes;
                self.cpu += cpu;
            }
            Err(e) => {
                eprintln!("    failed: {e}");
                if !self.errors.contains(&e) {
                    self.errors.push(e);
                }
            }
        }
    }

    fn measurement(self, metric: &str, lane: &Lane) -> Measurement {
        self.figure(
            &format!("{}{metric}", lane.prefix),
            &lane.path,
            lane.pid.is_some(),
        )
    }

    /// The median rate as `metric` of `path`, with the CPU per GiB when `metered` (a front).
    fn figure(mut self, metric: &str, path: &str, metered: bool) -> Measurement {
        let value = median(&mut self.rates);
        let mut m = Measurement::new(metric, "MB/s", path, value);
        if metered && self.bytes > 0 {
            m.cpu = Some(Cpu::PerGib(self.cpu / (self.bytes as f64 / GIB)));
        }
        if !self.errors.is_empty() {
            m.note = self.errors.join("; ");
        }
        m
    }
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Some(v[v.len() / 2])
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Everything the cases share.
pub struct Bench {
    /// The knobs.
    pub s: Settings,
    /// Clock ticks per second of /proc's CPU times.
    pub ticks: f64,
    /// The run's scratch directory (tmpfs when there is one).
    pub work: PathBuf,
    /// Direct first, then regrelay and the peers that started.
    pub fronts: Vec<Front>,
    /// Every blob size the cases use.
    pub blobs: Vec<Blob>,
    /// A GitLab token for the registry (direct and peers).
    pub jwt: String,
    /// A regrelay session for the registry through regrelay.
    pub session: Option<String>,
    /// The token service's realm (GitLab's `/jwt/auth`).
    pub gitlab_realm: String,
}

impl Bench {
    fn blob(&self, mib: u64) -> &Blob {
        self.blobs
            .iter()
            .find(|b| b.len == mib * MIB)
            .expect("blob prepared")
    }

    /// Runs `fut` and returns its result with the CPU seconds `pid` used meanwhile.
    async fn metered<T>(
        &self,
        pid: Option<u32>,
        fut: impl Future<Output = Result<T, String>>,
    ) -> (Result<T, String>, f64) {
        let cpu = |pid: Option<u32>| pid.map_or(0.0, |p| procs::cpu_seconds(p, self.ticks));
        let before = cpu(pid);
        let r = fut.await;
        (r, cpu(pid) - before)
    }

    /// Upload then download of `blob` through every lane, `rounds` times, the lanes taking
    /// turns (the first lane of each round rotates, so none always runs first).
    async fn bulk(&self, lanes: &[Lane], blob: &Blob, rounds: usize) -> Vec<Measurement> {
        let mut up: Vec<Tally> = lanes.iter().map(|_| Tally::default()).collect();
        let mut down: Vec<Tally> = lanes.iter().map(|_| Tally::default()).collect();
        for round in 0..rounds {
            for k in 0..lanes.len() {
                let i = (k + round) % lanes.len();
                let lane = &lanes[i];
                let (r, cpu) = self
                    .metered(
                        lane.pid,
                        client::upload(&lane.ep, REPO, &blob.file, blob.len, &blob.digest),
                    )
                    .await;
                up[i].add(r.map(|secs| (blob.len, secs)), cpu);
                let (r, cpu) = self
                    .metered(
                        lane.pid,
                        client::download(&lane.ep, REPO, &blob.digest, blob.len),
                    )
                    .await;
                down[i].add(r.map(|reply| (blob.len, reply.secs)), cpu);
            }
            eprintln!("  round {}/{rounds} done", round + 1);
        }
        let mut out = vec![];
        for (metric, tallies) in [("upload", up), ("download", down)] {
            for (t, lane) in tallies.into_iter().zip(lanes) {
                out.push(t.measurement(metric, lane));
            }
        }
        out
    }

    fn front_names(&self) -> Vec<&str> {
        self.fronts.iter().map(|f| f.name.as_str()).collect()
    }
}

/// Resets the peak RSS of every lane's front.
fn reset_rss(lanes: &[Lane]) {
    for pid in lanes.iter().filter_map(|l| l.pid) {
        procs::reset_peak_rss(pid);
    }
}

/// Sets each measurement's peak RSS from its path's front.
fn set_rss(ms: &mut [Measurement], lanes: &[Lane]) {
    for m in ms {
        if let Some(pid) = lanes.iter().find(|l| l.path == m.path).and_then(|l| l.pid) {
            m.peak_rss_mib = Some(procs::peak_rss_mib(pid));
        }
    }
}

/// Orders `ms` by metric (first appearance), then path in `paths` order.
fn arrange(mut ms: Vec<Measurement>, metrics: &[String], paths: &[&str]) -> Vec<Measurement> {
    let key = |m: &Measurement| {
        (
            metrics
                .iter()
                .position(|x| *x == m.metric)
                .unwrap_or(usize::MAX),
            paths
                .iter()
                .position(|p| *p == m.path)
                .unwrap_or(usize::MAX),
        )
    };
    ms.sort_by_key(key);
    ms
}

/// Case 1 (`plain`): HTTP/1.1, plain, one big blob up and down, fast origin.
pub async fn plain(b: &Bench) -> Case {
    let blob = b.blob(b.s.blob_mib);
    let lanes: Vec<Lane> = b
        .fronts
        .iter()
        .map(|f| Lane::new(&f.name, "", http(f.fast.addr), Proto::H1, None, f.fast.pid))
        .collect();
    reset_rss(&lanes);
    let mut ms = b.bulk(&lanes, blob, b.s.rounds).await;
    set_rss(&mut ms, &lanes);
    Case {
        id: "plain",
        title: format!(
            "1. HTTP/1.1 plain, fast origin: {} MiB blob, median of {}",
            b.s.blob_mib, b.s.rounds
        ),
        about:
            "One blob pushed (POST, one PATCH with the whole body, PUT ?digest; PATCH + PUT timed) \
                and pulled (GET) through each path by curl, the paths taking turns each round. The \
                origin serves from memory and discards uploads, so the front is the only real cost."
                .into(),
        measurements: ms,
        baseline: None,
        skipped: None,
    }
}

/// Case 1b (`registry`): the same against the real registry on tmpfs, with token auth.
pub async fn registry(b: &Bench) -> Case {
    let title = format!(
        "1b. HTTP/1.1 plain, real registry (tmpfs, token auth): {} MiB blob, median of {}",
        b.s.blob_mib, b.s.rounds
    );
    let blob = b.blob(b.s.blob_mib);
    let mut lanes = vec![];
    for f in &b.fronts {
        let Some(hop) = f.registry else { continue };
        // Through regrelay a client holds a regrelay session; elsewhere GitLab's token.
        let token = if f.name == "regrelay" {
            match &b.session {
                Some(s) => s.clone(),
                None => continue,
            }
        } else {
            b.jwt.clone()
        };
        lanes.push(Lane::new(
            &f.name,
            "",
            http(hop.addr),
            Proto::H1,
            Some(format!("Bearer {token}")),
            hop.pid,
        ));
    }
    if lanes.is_empty() {
        return Case::skip("registry", title, "no registry");
    }
    reset_rss(&lanes);
    let mut ms = b.bulk(&lanes, blob, b.s.rounds).await;
    set_rss(&mut ms, &lanes);
    Case {
        id: "registry",
        title,
        about: "As case 1, against Debian's docker-registry (distribution 2.8) with storage on tmpfs: \
                the end-to-end figure, registry hashing and writing included. Through regrelay the \
                client uses a regrelay session (regrelay swaps it for the cached GitLab token on each \
                request); the other paths carry the GitLab token itself."
            .into(),
        measurements: ms,
        baseline: None,
        skipped: None,
    }
}

/// Lanes of the TLS cases: direct (plain HTTP/1.1) and each front over TLS, HTTP/1.1 and HTTP/2;
/// `via` maps a target address to the address the client dials (a delay line, or itself).
fn tls_lanes(b: &Bench, via: &dyn Fn(SocketAddr) -> SocketAddr) -> Vec<Lane> {
    let mut lanes = vec![];
    for f in &b.fronts {
        match f.fast_tls {
            None if f.name == "direct" => lanes.push(Lane::new(
                "direct",
                "",
                http(via(f.fast.addr)),
                Proto::H1,
                None,
                None,
            )),
            None => {}
            Some(hop) => {
                for proto in [Proto::H1, Proto::H2] {
                    let prefix = format!("{} ", proto.label());
                    lanes.push(Lane::new(
                        &f.name,
                        &prefix,
                        https(via(hop.addr)),
                        proto,
                        None,
                        hop.pid,
                    ));
                }
            }
        }
    }
    lanes
}

/// Copies the direct path's plain figures under each protocol's metric, with a note.
fn direct_under_each_proto(ms: Vec<Measurement>, note: &str) -> Vec<Measurement> {
    let mut out = vec![];
    for m in ms {
        if m.path == "direct" && !m.metric.starts_with("HTTP/") {
            for proto in [Proto::H1, Proto::H2] {
                let mut copy = m.clone();
                copy.metric = format!("{} {}", proto.label(), m.metric);
                copy.note = [note, &m.note]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ");
                out.push(copy);
            }
        } else {
            out.push(m);
        }
    }
    out
}

fn proto_metrics() -> Vec<String> {
    let mut v = vec![];
    for proto in [Proto::H1, Proto::H2] {
        for dir in ["upload", "download"] {
            v.push(format!("{} {dir}", proto.label()));
        }
    }
    v
}

/// Case 2 (`tls`): TLS 1.3 (AES-128-GCM), HTTP/1.1 and HTTP/2, one big blob, fast origin.
pub async fn tls(b: &Bench) -> Case {
    let lanes = tls_lanes(b, &|a| a);
    reset_rss(&lanes);
    let ms = b.bulk(&lanes, b.blob(b.s.tls_mib), b.s.rounds).await;
    let mut ms = direct_under_each_proto(ms, "direct has no TLS: plain HTTP/1.1 figure");
    set_rss(&mut ms, &lanes);
    Case {
        id: "tls",
        title: format!(
            "2. TLS (1.3, AES-128-GCM), HTTP/1.1 and HTTP/2, fast origin: {} MiB blob, median of {}",
            b.s.tls_mib, b.s.rounds
        ),
        about: "As case 1 over TLS: every front presents the same P-256 certificate for localhost, \
                curl pins TLS_AES_128_GCM_SHA256 and picks HTTP/1.1 or HTTP/2 by ALPN (checked on \
                every answer). The direct path has no TLS: its row is the plain HTTP/1.1 figure, \
                measured in the same rounds, so `× direct` includes the whole cost of TLS."
            .into(),
        measurements: arrange(ms, &proto_metrics(), &b.front_names()),
        baseline: None,
        skipped: None,
    }
}

/// Case 3 (`rtt`): case 2 through a user-space delay line of BENCH_RTT_MS round trip.
pub async fn rtt(b: &Bench) -> Case {
    let rtt = Duration::from_millis(b.s.rtt_ms);
    let window = (b.s.rtt_window_mib * MIB) as usize;
    let mut lines = vec![];
    for f in &b.fronts {
        for hop in [Some(f.fast), f.fast_tls].into_iter().flatten() {
            lines.push((
                hop.addr,
                delay::DelayLine::start(hop.addr, rtt, window).await,
            ));
        }
    }
    let via = |a: SocketAddr| {
        lines
            .iter()
            .find(|(t, _)| *t == a)
            .map(|(_, l)| l.addr)
            .unwrap()
    };
    let lanes = tls_lanes(b, &via);
    reset_rss(&lanes);
    let ms = b.bulk(&lanes, b.blob(b.s.rtt_mib), b.s.rtt_rounds).await;
    let mut ms = direct_under_each_proto(
        ms,
        "direct has no TLS: plain HTTP/1.1 over the same delay line",
    );
    set_rss(&mut ms, &lanes);
    Case {
        id: "rtt",
        title: format!(
            "3. TLS over a {} ms RTT, HTTP/1.1 and HTTP/2, fast origin: {} MiB blob, median of {}",
            b.s.rtt_ms, b.s.rtt_mib, b.s.rtt_rounds
        ),
        about: format!(
            "As case 2 with the client behind a user-space delay line (this kernel has no netem): a \
             TCP relay in the bench process that holds each chunk {} ms each way and counts at \
             most {} MiB per direction in flight until acknowledged, one RTT later (like a TCP \
             window: ≈ {:.0} MB/s at most per connection). It reproduces what the RTT does above \
             TCP (HTTP/2 flow-control windows, turns between requests), not TCP's own dynamics \
             (slow start, losses).",
            b.s.rtt_ms / 2,
            b.s.rtt_window_mib,
            window as f64 / 1e6 / rtt.as_secs_f64()
        ),
        measurements: arrange(ms, &proto_metrics(), &b.front_names()),
        baseline: None,
        skipped: None,
    }
}

/// Case 4 (`concurrent`): BENCH_CONC uploads at once, then as many downloads, fast origin.
pub async fn concurrent(b: &Bench) -> Case {
    let blob = b.blob(b.s.conc_mib);
    let n = b.s.conc;
    let lanes: Vec<Lane> = b
        .fronts
        .iter()
        .map(|f| Lane::new(&f.name, "", http(f.fast.addr), Proto::H1, None, f.fast.pid))
        .collect();
    reset_rss(&lanes);
    let mut up: Vec<Tally> = lanes.iter().map(|_| Tally::default()).collect();
    let mut down: Vec<Tally> = lanes.iter().map(|_| Tally::default()).collect();
    let total = blob.len * n as u64;
    for round in 0..b.s.conc_rounds {
        for k in 0..lanes.len() {
            let i = (k + round) % lanes.len();
            let lane = &lanes[i];
            let (r, cpu) = b
                .metered(
                    lane.pid,
                    client::upload_parallel(&lane.ep, REPO, &blob.file, blob.len, &blob.digest, n),
                )
                .await;
            up[i].add(r.map(|secs| (total, secs)), cpu);
            let (r, cpu) = b
                .metered(
                    lane.pid,
                    client::download_parallel(&lane.ep, REPO, &blob.digest, blob.len, n),
                )
                .await;
            down[i].add(r.map(|secs| (total, secs)), cpu);
        }
        eprintln!("  round {}/{} done", round + 1, b.s.conc_rounds);
    }
    let mut ms = vec![];
    for (metric, tallies) in [("upload (total)", up), ("download (total)", down)] {
        for (t, lane) in tallies.into_iter().zip(&lanes) {
            ms.push(t.measurement(metric, lane));
        }
    }
    set_rss(&mut ms, &lanes);
    Case {
        id: "concurrent",
        title: format!(
            "4. {n} concurrent {} MiB uploads, then downloads, HTTP/1.1 plain, fast origin: median of {}",
            b.s.conc_mib, b.s.conc_rounds
        ),
        about: format!(
            "One curl runs {n} transfers at once, each on its own connection: the POSTs first \
             (untimed), then all PATCHes, then all PUTs; then {n} GETs. Figures are total bytes \
             over wall time. Peak RSS shows what a front holds per concurrent transfer."
        ),
        measurements: ms,
        baseline: None,
        skipped: None,
    }
}

/// Case 5 (`small`): small requests at a fixed concurrency with wrk, fast origin.
pub async fn small(b: &Bench) -> Case {
    let title = format!(
        "5. Small requests, HTTP/1.1 plain, fast origin: wrk, {} connections, {} s each",
        b.s.wrk_conn, b.s.wrk_secs
    );
    if !procs::have("wrk") {
        return Case::skip(
            "small",
            title,
            "wrk is not installed (scripts/install-deps installs it)",
        );
    }
    let digest = &b.blob(b.s.blob_mib).digest;
    let kinds = [
        ("HEAD blob", "HEAD", format!("/v2/{REPO}/blobs/{digest}")),
        (
            "GET manifest",
            "GET",
            format!("/v2/{REPO}/manifests/latest"),
        ),
        ("GET /v2/", "GET", "/v2/".to_owned()),
    ];
    let mut lanes: Vec<Lane> = b
        .fronts
        .iter()
        .map(|f| Lane::new(&f.name, "", http(f.fast.addr), Proto::H1, None, f.fast.pid))
        .collect();
    // regrelay on one work-stealing runtime (`--workers 0`, its model before thread-per-core),
    // and the reference: hyper alone, on that model and thread-per-core (bench code).
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let origin = b.fronts[0].fast.addr;
    let mut extra = vec![(
        SHARED_RUNTIME,
        procs::regrelay(
            &support::regrelay_bin(),
            "regrelay-shared-runtime",
            &b.work,
            &http(origin),
            &["--workers", "0"],
        ),
    )];
    for (path, model) in [(BARE, "multi"), (BARE_PER_CORE, "per-core")] {
        extra.push((
            path,
            procs::bare_forwarder(&[], &b.work, origin, model, workers),
        ));
    }
    let mut bare = vec![];
    for (path, started) in extra {
        match started {
            Ok((p, addr)) => {
                lanes.push(Lane::new(
                    path,
                    "",
                    http(addr),
                    Proto::H1,
                    None,
                    Some(p.pid()),
                ));
                bare.push(p);
            }
            Err(e) => eprintln!("SKIP {path}: {e}"),
        }
    }
    reset_rss(&lanes);
    let mut ms = vec![];
    let mut metrics = vec![];
    for (round, (kind, method, path)) in kinds.iter().enumerate() {
        for suffix in ["", " p50", " p99"] {
            metrics.push(format!("{kind}{suffix}"));
        }
        for k in 0..lanes.len() {
            let lane = &lanes[(k + round) % lanes.len()];
            let url = format!("{}{path}", lane.ep.base);
            // wrk 4.1.0 cannot do HEAD (see client::hyper_load): HEAD goes by hyper.
            let url = url.as_str();
            let load = |secs| async move {
                if *method == "HEAD" {
                    return client::hyper_load(url, Method::HEAD, b.s.wrk_conn, secs).await;
                }
                client::wrk(client::WrkRun {
                    url,
                    method,
                    connections: b.s.wrk_conn,
                    threads: b.s.wrk_threads,
                    secs,
                    dir: &b.work,
                })
                .await
            };
            let _ = load(1).await; // warm-up: connections, caches
            let (r, cpu) = b.metered(lane.pid, load(b.s.wrk_secs)).await;
            let r = r.and_then(|load| {
                if load.errors.is_empty() {
                    Ok(load)
                } else {
                    Err(load.errors)
                }
            });
            let mut rps = Measurement::new(*kind, "req/s", &lane.path, None);
            if lane.path == "regrelay" {
                rps.goal = Some(Goal::AtLeast {
                    vs: BARE_PER_CORE,
                    ratio: 0.9,
                });
            }
            let mut p50 = Measurement::new(format!("{kind} p50"), "ms", &lane.path, None);
            let mut p99 = Measurement::new(format!("{kind} p99"), "ms", &lane.path, None);
            match r {
                Ok(load) => {
                    rps.value = Some(load.rps);
                    p50.value = Some(load.p50_ms);
                    p99.value = Some(load.p99_ms);
                    if lane.pid.is_some() && load.requests > 0 {
                        rps.cpu = Some(Cpu::PerRequestUs(cpu * 1e6 / load.requests as f64));
                    }
                }
                Err(e) => {
                    eprintln!("    failed: {e}");
                    for m in [&mut rps, &mut p50, &mut p99] {
                        m.note = e.clone();
                    }
                }
            }
            ms.extend([rps, p50, p99]);
        }
        eprintln!("  {kind} done");
    }
    set_rss(&mut ms, &lanes);
    procs::stop_all(bare);
    let mut paths = b.front_names();
    paths.extend([SHARED_RUNTIME, BARE, BARE_PER_CORE]);
    Case {
        id: "small",
        title,
        about: format!(
            "wrk ({} thread(s), {} keep-alive connections, {} s after a 1 s warm-up) per request kind \
             and path: requests/s, and latency p50/p99 from wrk's distribution. HEAD goes by the \
             bench's own hyper client with as many connections (wrk 4.1.0 waits for a body after a \
             HEAD answer with a Content-Length, as registries send). The origin answers from \
             memory, so this is the front's per-request cost; CPU is per request. regrelay runs \
             thread-per-core (`--workers`, one current-thread runtime per CPU), `{SHARED_RUNTIME}` \
             on one work-stealing runtime as before. `{BARE}` is the bench's bare hyper 1 \
             forwarder (examples/bare_forwarder.rs: no routing, headers, sessions, metrics or \
             log) on tokio's work-stealing runtime, `{BARE_PER_CORE}` the same thread-per-core \
             (one current-thread runtime and SO_REUSEPORT listener per core): what hyper itself \
             costs on regrelay's runtime model, the goal regrelay is held to (within 10 %).",
            b.s.wrk_threads, b.s.wrk_conn, b.s.wrk_secs
        ),
        measurements: arrange(ms, &metrics, &paths),
        baseline: None,
        skipped: None,
    }
}

/// Case 5's reference fronts: the bare hyper forwarder, on tokio's work-stealing runtime and
/// thread-per-core.
const BARE: &str = "bare hyper";
const BARE_PER_CORE: &str = "bare hyper per-core";
/// Case 5's regrelay on one work-stealing runtime (`--workers 0`).
const SHARED_RUNTIME: &str = "regrelay --workers 0";

/// Case 6's path of a client that brings its own GitLab token through regrelay.
const OWN_TOKEN: &str = "regrelay, own GitLab token";

/// Case 6's warm requests per path in a row, before the next path's turn.
const SESSION_BLOCK: usize = 50;

/// One path of case 6: its token, and its first and warm requests' latencies (ms) and CPU (s).
struct SessionPath {
    path: &'static str,
    pid: Option<u32>,
    blob_url: String,
    token: String,
    cold: Vec<f64>,
    cold_cpu: f64,
    warm: Vec<f64>,
    warm_cpu: f64,
}

/// Case 6 (`session`): a first request (token request with Basic credentials, then a registry
/// request) vs a warm one (the token again), directly, through regrelay with a session, and
/// through regrelay with the client's own GitLab token ([`OWN_TOKEN`]).
pub async fn session(b: &Bench) -> Case {
    let title = format!(
        "6. Session cost, real registry + token service: {} first requests, {} warm ones",
        b.s.sessions, b.s.warm
    );
    let Some(relay) = b
        .fronts
        .iter()
        .find(|f| f.name == "regrelay")
        .and_then(|f| f.registry)
    else {
        return Case::skip("session", title, "regrelay is not among the fronts");
    };
    let Some(direct) = b
        .fronts
        .iter()
        .find(|f| f.name == "direct")
        .and_then(|f| f.registry)
    else {
        return Case::skip("session", title, "no registry");
    };
    // The blob HEADed: small, pushed directly first.
    let seed = b.blob(1);
    let ep = Endpoint {
        base: http(direct.addr),
        proto: Proto::H1,
        auth: Some(format!("Bearer {}", b.jwt)),
    };
    if let Err(e) = client::upload(&ep, REPO, &seed.file, seed.len, &seed.digest).await {
        return Case::skip("session", title, format!("cannot seed the registry: {e}"));
    }
    let hyper = support::upstream::client();
    let scope = format!("repository:{REPO}:pull");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PAT}"));
    if let Some(pid) = relay.pid {
        procs::reset_peak_rss(pid);
    }
    // First requests, path after path; then the warm HEADs of all paths interleaved in blocks
    // (rotating which path goes first), so that the drift of a shared 2-core machine (the
    // registry's garbage collector, other processes) falls on every path alike.
    let mut paths = vec![];
    for (path, realm, registry, pid) in [
        ("direct", b.gitlab_realm.clone(), http(direct.addr), None),
        (
            "regrelay",
            format!("{}/jwt/auth", http(relay.addr)),
            http(relay.addr),
            relay.pid,
        ),
        // The client's own GitLab token through regrelay: passed through as it is, no session
        // to open and no token cache (the "cold proxy request" of the warm-session goal).
        (
            OWN_TOKEN,
            b.gitlab_realm.clone(),
            http(relay.addr),
            relay.pid,
        ),
    ] {
        let token_url = format!("{realm}?service=container_registry&scope={scope}");
        let blob_url = format!("{registry}/v2/{REPO}/blobs/{}", seed.digest);
        let (cold, cold_cpu) = b
            .metered(pid, async {
                let mut lat = vec![];
                let mut token = String::new();
                for _ in 0..b.s.sessions {
                    let t = Instant::now();
                    token = get_token(&hyper, &token_url, &basic).await?;
                    head(&hyper, &blob_url, &token).await?;
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok((lat, token))
            })
            .await;
        let (cold, token) = match cold {
            Ok(v) => v,
            Err(e) => return Case::skip("session", title, format!("{path}: {e}")),
        };
        for _ in 0..10 {
            let _ = head(&hyper, &blob_url, &token).await;
        }
        paths.push(SessionPath {
            path,
            pid,
            blob_url,
            token,
            cold,
            cold_cpu,
            warm: vec![],
            warm_cpu: 0.0,
        });
    }
    let (blocks, n_paths) = (b.s.warm.div_ceil(SESSION_BLOCK), paths.len());
    for block in 0..blocks {
        let n = SESSION_BLOCK.min(b.s.warm - block * SESSION_BLOCK);
        for k in 0..paths.len() {
            let p = &mut paths[(k + block) % n_paths];
            let (warm, cpu) = b
                .metered(p.pid, async {
                    let mut lat = vec![];
                    for _ in 0..n {
                        let t = Instant::now();
                        head(&hyper, &p.blob_url, &p.token).await?;
                        lat.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    Ok(lat)
                })
                .await;
            match warm {
                Ok(lat) => p.warm.extend(lat),
                Err(e) => return Case::skip("session", title, format!("{}: {e}", p.path)),
            }
            p.warm_cpu += cpu;
        }
    }
    let mut ms = vec![];
    for p in paths {
        for (name, mut lat, cpu) in [
            ("first request (token + HEAD)", p.cold, p.cold_cpu),
            ("warm HEAD", p.warm, p.warm_cpu),
        ] {
            lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let n = lat.len();
            for (q_name, q) in [("p50", 0.5), ("p99", 0.99)] {
                let mut m = Measurement::new(
                    format!("{name} {q_name}"),
                    "ms",
                    p.path,
                    Some(percentile(&lat, q)),
                );
                if (p.path, name, q_name) == ("regrelay", "warm HEAD", "p50") {
                    // At most 5 % slower than the same request without a session.
                    m.goal = Some(Goal::AtLeast {
                        vs: OWN_TOKEN,
                        ratio: 1.0 / 1.05,
                    });
                }
                if let (Some(pid), "p50") = (p.pid, q_name) {
                    m.cpu = Some(Cpu::PerRequestUs(cpu * 1e6 / n as f64));
                    m.peak_rss_mib = Some(procs::peak_rss_mib(pid));
                }
                ms.push(m);
            }
        }
    }
    let metrics: Vec<String> = [
        "first request (token + HEAD) p50",
        "first request (token + HEAD) p99",
        "warm HEAD p50",
        "warm HEAD p99",
    ]
    .map(String::from)
    .to_vec();
    Case {
        id: "session",
        title,
        about:
            "One request at a time (hyper client, keep-alive). First request: a token request with \
                Basic credentials (through regrelay: its /jwt/auth, which asks GitLab and seals a \
                session; directly: GitLab's realm) and a HEAD of a blob with the token just got. \
                Warm: the HEAD again with the same token (through regrelay: the session opened and \
                the cached GitLab token used), the paths taking turns in blocks of 50. \
                `regrelay, own GitLab token`: the token from GitLab's \
                realm, the HEAD through regrelay, which passes that token through (no session, no \
                token cache). Goal: a warm HEAD through a session at most 5 % slower (p50) than \
                that. CPU is regrelay's per first request / warm request."
                .into(),
        measurements: arrange(ms, &metrics, &["direct", "regrelay", OWN_TOKEN]),
        baseline: None,
        skipped: None,
    }
}

/// The paths of case 7 beside `direct` and `regrelay` (the one without a cache).
const HIT: &str = "regrelay+cache hit";
const MISS: &str = "regrelay+cache miss";
const LINK: &str = "regrelay, registry over a link";
const LINK_MISS: &str = "regrelay+cache miss, registry over a link";

/// Figures of one path of case 7 over its rounds.
#[derive(Default)]
struct Pulls {
    down: Tally,
    /// Times to first byte, ms.
    ttfb: Vec<f64>,
    /// Peak RSS, MiB (the largest over the path's processes).
    rss: f64,
}

impl Pulls {
    /// Adds one download of `len` bytes (or its error) and the front's CPU over it.
    fn add(&mut self, r: Result<client::Reply, String>, cpu: f64, len: u64) {
        if let Ok(reply) = &r {
            self.ttfb.push(reply.ttfb * 1e3);
        }
        self.down.add(r.map(|reply| (len, reply.secs)), cpu);
    }
}

/// Starts a regrelay with `--cache-dir cache` in front of `registry` and logs in through its
/// `/jwt/auth` (a session of its own: a new process has a new sealing key). The endpoint
/// carries the session.
async fn cache_relay(
    b: &Bench,
    name: &str,
    registry: SocketAddr,
    cache: &Path,
    max_bytes: u64,
) -> Result<(procs::Proc, Endpoint), String> {
    let args = [
        "--cache-dir".to_owned(),
        cache.display().to_string(),
        "--cache-max-bytes".to_owned(),
        max_bytes.to_string(),
    ];
    relay_with_session(b, name, registry, &args).await
}

/// A new regrelay (`args` beside `--registry`) and an endpoint with a session of its own.
async fn relay_with_session(
    b: &Bench,
    name: &str,
    registry: SocketAddr,
    args: &[String],
) -> Result<(procs::Proc, Endpoint), String> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (proc, addr) = procs::regrelay(
        &support::regrelay_bin(),
        name,
        &b.work,
        &http(registry),
        &args,
    )?;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PAT}"));
    let url = format!(
        "{}/jwt/auth?service=container_registry&scope=repository:{REPO}:pull",
        http(addr)
    );
    let token = get_token(&support::upstream::client(), &url, &basic).await?;
    let ep = Endpoint {
        base: http(addr),
        proto: Proto::H1,
        auth: Some(format!("Bearer {token}")),
    };
    Ok((proc, ep))
}

/// Waits until `blob` is committed in the cache directory `cache` (`blobs/sha256/<hex>`, renamed
/// there after the digest check and the fsync, which may follow the client's last byte).
async fn committed(cache: &Path, blob: &Blob) -> Result<(), String> {
    let hex = blob.digest.trim_start_matches("sha256:");
    let file = cache.join("blobs/sha256").join(hex);
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if std::fs::metadata(&file).is_ok_and(|m| m.len() == blob.len) {
            return Ok(());
        }
        if Instant::now() > end {
            return Err("the miss did not fill the cache within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// GET of `blob` through `ep`, checked to be answered from regrelay's cache (`hit`) or not;
/// on a miss with `fill`, until the blob is committed in that cache directory. With the CPU
/// seconds of `pid` meanwhile.
async fn pull(
    b: &Bench,
    ep: &Endpoint,
    pid: Option<u32>,
    blob: &Blob,
    hit: bool,
    fill: Option<&Path>,
) -> (Result<client::Reply, String>, f64) {
    b.metered(pid, async {
        let reply = client::download(ep, REPO, &blob.digest, blob.len).await?;
        if (reply.cache == "hit") != hit {
            return Err(format!(
                "GET blob: X-Regrelay-Cache {:?} (wanted {})",
                reply.cache,
                if hit { "hit" } else { "none: a miss" }
            ));
        }
        if let Some(dir) = fill {
            committed(dir, blob).await?;
        }
        Ok(reply)
    })
    .await
}

/// Pushes `blob` directly (`direct_ep`) and fills a new cache directory with it by one miss
/// through a regrelay in front of `registry`: the warm cache whose hits cases 7 and 7b measure,
/// and the `--cache-max-bytes` they run with (room for the blob twice over: nothing is evicted).
async fn warm_cache(
    b: &Bench,
    registry: SocketAddr,
    direct_ep: &Endpoint,
    blob: &Blob,
) -> Result<(tempfile::TempDir, u64), String> {
    client::upload(direct_ep, REPO, &blob.file, blob.len, &blob.digest)
        .await
        .map_err(|e| format!("cannot push the blob: {e}"))?;
    let max_bytes = (2 * blob.len).max(16 * MIB);
    let warm = fresh_cache_dir(b)?;
    let (_proc, ep) = cache_relay(b, "regrelay-cache-fill", registry, warm.path(), max_bytes)
        .await
        .map_err(|e| format!("cannot fill the cache: {e}"))?;
    (pull(b, &ep, None, blob, false, Some(warm.path())).await.0)
        .map_err(|e| format!("cannot fill the cache: {e}"))?;
    Ok((warm, max_bytes))
}

/// A directory for a cache under the bench's work directory.
fn fresh_cache_dir(b: &Bench) -> Result<tempfile::TempDir, String> {
    tempfile::tempdir_in(&b.work).map_err(|e| format!("{}: {e}", b.work.display()))
}

/// One cold miss into `into`: a new regrelay `name` on an empty cache in front of `registry`,
/// timed to the client's last byte, its CPU until the blob is committed.
async fn cold_miss(
    b: &Bench,
    name: &str,
    registry: SocketAddr,
    blob: &Blob,
    max_bytes: u64,
    into: &mut Pulls,
) {
    let dir = match fresh_cache_dir(b) {
        Ok(d) => d,
        Err(e) => return into.down.add(Err(e), 0.0),
    };
    match cache_relay(b, name, registry, dir.path(), max_bytes).await {
        Err(e) => into.down.add(Err(e), 0.0),
        Ok((proc, ep)) => {
            procs::reset_peak_rss(proc.pid());
            let pid = Some(proc.pid());
            let (r, cpu) = pull(b, &ep, pid, blob, false, Some(dir.path())).await;
            into.add(r, cpu, blob.len);
            into.rss = into.rss.max(procs::peak_rss_mib(proc.pid()));
        }
    }
}

/// Case 7's paths to the registry over a delay line of `rtt`: regrelay without a cache, and a
/// cold miss (a new regrelay on an empty cache each round), taking turns.
async fn cache_over_link(
    b: &Bench,
    registry: SocketAddr,
    blob: &Blob,
    max_bytes: u64,
    rtt: Duration,
) -> [Pulls; 2] {
    let mut t: [Pulls; 2] = Default::default();
    let window = (b.s.cache_link_window_mib * MIB) as usize;
    let line = delay::DelayLine::start(registry, rtt, window).await;
    let plain = relay_with_session(b, "regrelay-link", line.addr, &[]).await;
    for round in 0..b.s.rounds {
        for k in 0..t.len() {
            let i = (k + round) % t.len();
            if i == 0 {
                match &plain {
                    Err(e) => t[0].down.add(Err(e.clone()), 0.0),
                    Ok((proc, ep)) => {
                        let (r, cpu) = pull(b, ep, Some(proc.pid()), blob, false, None).await;
                        t[0].add(r, cpu, blob.len);
                        t[0].rss = t[0].rss.max(procs::peak_rss_mib(proc.pid()));
                    }
                }
                continue;
            }
            let name = format!("regrelay-link-miss-{round}");
            cold_miss(b, &name, line.addr, blob, max_bytes, &mut t[1]).await;
        }
        eprintln!("  over the link: round {}/{} done", round + 1, b.s.rounds);
    }
    t
}

/// Case 7 (`cache`): regrelay's pull-through cache against the real registry: warm hits and
/// cold misses beside the direct download and regrelay without a cache.
pub async fn cache(b: &Bench) -> Case {
    let title = format!(
        "7. Pull-through cache, real registry (tmpfs, token auth): {} MiB blob, median of {}",
        b.s.cache_mib, b.s.rounds
    );
    let Some(relay) = b
        .fronts
        .iter()
        .find(|f| f.name == "regrelay")
        .and_then(|f| f.registry)
    else {
        return Case::skip("cache", title, "regrelay is not among the fronts");
    };
    let Some(direct) = b
        .fronts
        .iter()
        .find(|f| f.name == "direct")
        .and_then(|f| f.registry)
    else {
        return Case::skip("cache", title, "no registry");
    };
    let Some(session) = &b.session else {
        return Case::skip("cache", title, "no regrelay session");
    };
    let blob = b.blob(b.s.cache_mib);
    let direct_ep = Endpoint {
        base: http(direct.addr),
        proto: Proto::H1,
        auth: Some(format!("Bearer {}", b.jwt)),
    };
    let relay_ep = Endpoint {
        base: http(relay.addr),
        proto: Proto::H1,
        auth: Some(format!("Bearer {session}")),
    };
    let (warm, max_bytes) = match warm_cache(b, direct.addr, &direct_ep, blob).await {
        Ok(warm) => warm,
        Err(e) => return Case::skip("cache", title, e),
    };
    if let Some(pid) = relay.pid {
        procs::reset_peak_rss(pid);
    }
    // direct, regrelay (no cache), hit, miss.
    let mut t: [Pulls; 4] = Default::default();
    let mut first_hit = vec![];
    for round in 0..b.s.rounds {
        for k in 0..t.len() {
            let i = (k + round) % t.len();
            match i {
                0 => {
                    let (r, _) = pull(b, &direct_ep, None, blob, false, None).await;
                    t[0].add(r, 0.0, blob.len);
                }
                1 => {
                    let (r, cpu) = pull(b, &relay_ep, relay.pid, blob, false, None).await;
                    t[1].add(r, cpu, blob.len);
                }
                // A new regrelay on the warm cache: its first GET holds no grant yet (regrelay
                // asks the registry with a HEAD, then serves the file); the second is the hit.
                2 => {
                    let name = format!("regrelay-cache-hit-{round}");
                    match cache_relay(b, &name, direct.addr, warm.path(), max_bytes).await {
                        Err(e) => t[2].down.add(Err(e), 0.0),
                        Ok((proc, ep)) => {
                            procs::reset_peak_rss(proc.pid());
                            match pull(b, &ep, None, blob, true, None).await.0 {
                                Ok(reply) => first_hit.push(reply.ttfb * 1e3),
                                Err(e) => t[2].down.add(Err(e), 0.0),
                            }
                            let (r, cpu) = pull(b, &ep, Some(proc.pid()), blob, true, None).await;
                            t[2].add(r, cpu, blob.len);
                            t[2].rss = t[2].rss.max(procs::peak_rss_mib(proc.pid()));
                        }
                    }
                }
                // A new regrelay on an empty cache: the cold miss, until the blob is committed.
                _ => {
                    let name = format!("regrelay-cache-miss-{round}");
                    cold_miss(b, &name, direct.addr, blob, max_bytes, &mut t[3]).await;
                }
            }
        }
        eprintln!("  round {}/{} done", round + 1, b.s.rounds);
    }
    if let Some(pid) = relay.pid {
        t[1].rss = procs::peak_rss_mib(pid);
    }
    let link = match b.s.cache_link_rtt_ms {
        0 => None,
        ms => {
            Some(cache_over_link(b, direct.addr, blob, max_bytes, Duration::from_millis(ms)).await)
        }
    };
    let mut ms = vec![];
    let paths = ["direct", "regrelay", HIT, MISS, LINK, LINK_MISS];
    let t = t.into_iter().chain(link.into_iter().flatten());
    for (path, mut p) in paths.into_iter().zip(t) {
        let metered = path != "direct";
        let rss = metered.then_some(p.rss);
        let mut down = p.down.figure("download", path, metered);
        let mut ttfb = Measurement::new("time to first byte", "ms", path, median(&mut p.ttfb));
        down.peak_rss_mib = rss;
        ttfb.peak_rss_mib = rss;
        match path {
            HIT => {
                down.goal = Some(Goal::AtLeast {
                    vs: "direct",
                    ratio: 1.0,
                })
            }
            MISS => {
                down.goal = Some(Goal::AtLeast {
                    vs: "regrelay",
                    ratio: 0.9,
                });
                ttfb.goal = Some(Goal::Below(1000.0));
            }
            LINK_MISS => {
                down.goal = Some(Goal::AtLeast {
                    vs: LINK,
                    ratio: 0.9,
                });
                ttfb.goal = Some(Goal::Below(1000.0));
            }
            _ => {}
        }
        ms.extend([down, ttfb]);
        if path == HIT {
            let mut first = Measurement::new(
                "time to first byte, first GET of a client",
                "ms",
                path,
                median(&mut first_hit),
            );
            first.peak_rss_mib = rss;
            ms.push(first);
        }
    }
    let metrics: Vec<String> = [
        "download",
        "time to first byte",
        "time to first byte, first GET of a client",
    ]
    .map(String::from)
    .to_vec();
    Case {
        id: "cache",
        title,
        about: format!(
            "regrelay with --cache-dir (on tmpfs, --cache-max-bytes {} MiB) in front of the real \
             registry, beside the direct download and regrelay without a cache; one blob pushed \
             directly first, then pulled (GET, curl) through each path, the paths taking turns \
             each round. Each regrelay with a cache is a new process with its own session (from \
             its /jwt/auth). Hit: a regrelay on a cache filled before the rounds; its first GET \
             holds no grant yet (regrelay asks the registry with a HEAD and this client's token, \
             then serves the file: the `first GET of a client` row), the second is the hit \
             measured. Miss: a regrelay on an empty cache dir, the blob streamed from the \
             registry while written to the cache; timed to the client's last byte, its CPU until \
             the blob is committed (digest checked, fsync, rename). Answers are checked to be \
             hits (X-Regrelay-Cache: hit) or not. Time to first byte: from the request's first \
             byte (curl's time_starttransfer - time_pretransfer). The time-to-first-byte goal is \
             stated for 1 GiB. `× regrelay`: relative to regrelay without a cache. The last two \
             paths reach the registry over a link ({} ms round trip, {} MiB in flight: at most \
             {:.0} MB/s, a registry across a network rather than on the same two cores): \
             regrelay without a cache and a cold miss, taking turns; the miss's goal is against \
             the first of them.",
            max_bytes / MIB,
            b.s.cache_link_rtt_ms,
            b.s.cache_link_window_mib,
            (b.s.cache_link_window_mib * MIB) as f64
                / 1e6
                / (b.s.cache_link_rtt_ms.max(1) as f64 / 1e3)
        ),
        measurements: arrange(ms, &metrics, &paths),
        baseline: Some("regrelay"),
        skipped: None,
    }
}

type HyperClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    regrelay::body::ProxyBody,
>;

async fn get_token(c: &HyperClient, url: &str, basic: &str) -> Result<String, String> {
    let req = Request::get(url)
        .header("authorization", format!("Basic {basic}"))
        .body(regrelay::body::empty())
        .unwrap();
    let resp = c
        .request(req)
        .await
        .map_err(|e| format!("token request: {e}"))?;
    let status = resp.status();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status != StatusCode::OK {
        return Err(format!("token request: status {status}"));
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    v["token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| "token answer without a token".into())
}

async fn head(c: &HyperClient, url: &str, token: &str) -> Result<(), String> {
    let req = Request::builder()
        .method(Method::HEAD)
        .uri(url)
        .header("authorization", format!("Bearer {token}"))
        .body(regrelay::body::empty())
        .unwrap();
    let resp = c.request(req).await.map_err(|e| format!("HEAD: {e}"))?;
    let status = resp.status();
    drain(resp.into_body()).await.map_err(|e| e.to_string())?;
    if status != StatusCode::OK {
        return Err(format!("HEAD: status {status}"));
    }
    Ok(())
}
