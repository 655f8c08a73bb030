//! Benchmark: regrelay beside the direct path and three peer fronts (nginx, HAProxy, Caddy,
//! Debian's, configured from `bench/peers/`), in one run. Run with `scripts/bench` (release
//! build); `bench/README.md` explains the cases, the knobs and the peers' settings. Not a test:
//! it writes `target/bench/bench.{md,json,svg}` and prints the table.
//!
//! Origins: a fast in-memory origin (`bench/origin.rs`: blobs are slices of one buffer, uploads
//! are swallowed) so a front's own cost is not hidden, and the real `docker-registry` with
//! storage on tmpfs and token auth (the GitLab-behaving token service) for the end-to-end
//! figure. Clients: curl for transfers (HTTP/1.1 or HTTP/2, TLS 1.3 with AES-128-GCM pinned),
//! wrk for small requests, hyper for the session case. Each front's CPU (utime+stime) and
//! peak RSS come from /proc.

#[path = "../tests/support/mod.rs"]
#[allow(missing_docs, unused)]
mod support;

#[path = "bench/cases.rs"]
mod cases;
#[path = "bench/client.rs"]
mod client;
#[path = "bench/delay.rs"]
mod delay;
#[path = "bench/hostile.rs"]
mod hostile;
#[path = "bench/instructions.rs"]
mod instructions;
#[path = "bench/origin.rs"]
mod origin;
#[path = "bench/procs.rs"]
mod procs;
#[path = "bench/report.rs"]
mod report;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use procs::{Peer, Proc};
use report::Case;
use support::gitlab::with_developer_pat;

const REPO: &str = "bench/blob";
const USER: &str = "bench";
const PAT: &str = "glpat-bench-0000000000";
const ALL_CASES: [&str; 11] = [
    "plain",
    "registry",
    "tls",
    "rtt",
    "concurrent",
    "small",
    "session",
    "cache",
    "shared",
    "hostile",
    "instructions",
];
const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;

/// The knobs (environment variables; see bench/README.md), with defaults that keep a whole
/// run within about ten minutes on a 2-core machine.
struct Settings {
    cases: Vec<String>,
    fronts: Vec<String>,
    blob_mib: u64,
    rounds: usize,
    tls_mib: u64,
    rtt_ms: u64,
    rtt_mib: u64,
    rtt_rounds: usize,
    rtt_window_mib: u64,
    conc: usize,
    conc_mib: u64,
    conc_rounds: usize,
    wrk_conn: usize,
    wrk_secs: u64,
    wrk_threads: usize,
    sessions: usize,
    warm: usize,
    cache_mib: u64,
    cache_link_rtt_ms: u64,
    cache_link_window_mib: u64,
    hostile_secs: u64,
    out: PathBuf,
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn env_list(key: &str, default: &[&str]) -> Vec<String> {
    match std::env::var(key) {
        Ok(v) if !v.trim().is_empty() => v
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
        _ => default.iter().map(|s| s.to_string()).collect(),
    }
}

impl Settings {
    fn from_env() -> Settings {
        let skip = env_list("BENCH_SKIP", &[]);
        let cases = env_list("BENCH_CASES", &ALL_CASES)
            .into_iter()
            .filter(|c| !skip.contains(c))
            .collect();
        let blob_mib = env_or("BENCH_BLOB_MIB", 512);
        // Where the report goes: target/bench, beside target/<profile>/examples/bench.
        let default_out = std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.parent()?.parent()?.join("bench")))
            .unwrap_or_else(|| PathBuf::from("target/bench"));
        Settings {
            cases,
            fronts: env_list("BENCH_FRONTS", &["regrelay", "nginx", "haproxy", "caddy"]),
            blob_mib,
            rounds: env_or("BENCH_ROUNDS", 3usize).max(1),
            tls_mib: env_or("BENCH_TLS_MIB", blob_mib),
            rtt_ms: env_or("BENCH_RTT_MS", 50),
            rtt_mib: env_or("BENCH_RTT_MIB", 64),
            rtt_rounds: env_or("BENCH_RTT_ROUNDS", 1usize).max(1),
            rtt_window_mib: env_or("BENCH_RTT_WINDOW_MIB", 4),
            conc: env_or("BENCH_CONC", 16usize).max(1),
            conc_mib: env_or("BENCH_CONC_MIB", 64),
            conc_rounds: env_or("BENCH_CONC_ROUNDS", 1usize).max(1),
            wrk_conn: env_or("BENCH_WRK_CONN", 32usize).max(1),
            wrk_secs: env_or("BENCH_WRK_SECS", 5u64).max(1),
            wrk_threads: env_or("BENCH_WRK_THREADS", 1usize).max(1),
            sessions: env_or("BENCH_SESSIONS", 50usize).max(1),
            warm: env_or("BENCH_WARM", 500usize).max(1),
            cache_mib: env_or("BENCH_CACHE_MIB", blob_mib).max(1),
            cache_link_rtt_ms: env_or("BENCH_CACHE_LINK_RTT_MS", 20),
            cache_link_window_mib: env_or("BENCH_CACHE_LINK_WINDOW_MIB", 4).max(1),
            hostile_secs: env_or("BENCH_HOSTILE_SECS", 60u64).max(5),
            out: std::env::var("BENCH_OUT")
                .map(PathBuf::from)
                .unwrap_or(default_out),
        }
    }

    fn runs(&self, case: &str) -> bool {
        self.cases.iter().any(|c| c == case)
    }

    fn describe(&self) -> String {
        format!(
            "cases {}; fronts {}; blob {} MiB × {} rounds; TLS {} MiB; RTT {} ms, {} MiB × {} rounds, \
             window {} MiB; concurrent {} × {} MiB × {} rounds; wrk {} connections, {} thread(s), {} s; \
             sessions {} cold, {} warm; cache {} MiB × {} rounds, link {} ms, window {} MiB; \
             hostile soak {} s",
            self.cases.join(","),
            self.fronts.join(","),
            self.blob_mib,
            self.rounds,
            self.tls_mib,
            self.rtt_ms,
            self.rtt_mib,
            self.rtt_rounds,
            self.rtt_window_mib,
            self.conc,
            self.conc_mib,
            self.conc_rounds,
            self.wrk_conn,
            self.wrk_threads,
            self.wrk_secs,
            self.sessions,
            self.warm,
            self.cache_mib,
            self.rounds,
            self.cache_link_rtt_ms,
            self.cache_link_window_mib,
            self.hostile_secs
        )
    }
}

/// A blob the clients send and fetch: a prefix of the shared data, also written to a file.
#[derive(Clone)]
struct Blob {
    len: u64,
    digest: String,
    file: PathBuf,
}

/// The bytes of every blob (a fixed pattern; nothing on the way compresses).
fn pattern(len: usize) -> Bytes {
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        let n = (len - data.len()).min(chunk.len());
        data.extend_from_slice(&chunk[..n]);
    }
    Bytes::from(data)
}

/// The digests of the prefixes of `data` of each length in `lens`, in one pass.
fn prefix_digests(data: &[u8], lens: &[u64]) -> Vec<(u64, String)> {
    let mut sorted: Vec<u64> = lens.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut h = Sha256::new();
    let mut done = 0usize;
    let mut out = vec![];
    for len in sorted {
        h.update(&data[done..len as usize]);
        done = len as usize;
        out.push((len, format!("sha256:{}", hex::encode(h.clone().finalize()))));
    }
    out
}

/// One way to reach one target: its address and the process to account (none when direct).
#[derive(Clone, Copy)]
struct Hop {
    addr: SocketAddr,
    pid: Option<u32>,
}

/// A path through one front (or none: `direct`) to each target.
struct Front {
    name: String,
    fast: Hop,
    fast_tls: Option<Hop>,
    registry: Option<Hop>,
}

fn http(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

fn https(addr: SocketAddr) -> String {
    format!("https://localhost:{}", addr.port())
}

/// The fronts of a run (direct first), their processes and notes on those that did not start.
struct Started {
    fronts: Vec<Front>,
    procs: Vec<Proc>,
    notes: Vec<String>,
}

/// Starts the fronts in `s.fronts` before the two origins.
fn start_fronts(
    s: &Settings,
    work: &Path,
    fast: SocketAddr,
    registry: Option<SocketAddr>,
) -> Result<Started, String> {
    let mut fronts = vec![Front {
        name: "direct".into(),
        fast: Hop {
            addr: fast,
            pid: None,
        },
        fast_tls: None,
        registry: registry.map(|addr| Hop { addr, pid: None }),
    }];
    let mut procs = vec![];
    let mut notes = vec![];
    for name in &s.fronts {
        if name == "regrelay" {
            let bin = support::regrelay_bin();
            let dir = work.join("regrelay");
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let cert = support::cert("server.pem");
            let key = support::cert("server.key");
            let (p, fast_addr) = procs::regrelay(&bin, "regrelay-fast", &dir, &http(fast), &[])?;
            let (pt, tls_addr) = procs::regrelay(
                &bin,
                "regrelay-fast-tls",
                &dir,
                &http(fast),
                &["--tls-cert", &cert, "--tls-key", &key],
            )?;
            let reg = match registry {
                Some(r) => Some(procs::regrelay(
                    &bin,
                    "regrelay-registry",
                    &dir,
                    &http(r),
                    &[],
                )?),
                None => None,
            };
            fronts.push(Front {
                name: "regrelay".into(),
                fast: Hop {
                    addr: fast_addr,
                    pid: Some(p.pid()),
                },
                fast_tls: Some(Hop {
                    addr: tls_addr,
                    pid: Some(pt.pid()),
                }),
                registry: reg.as_ref().map(|(p, a)| Hop {
                    addr: *a,
                    pid: Some(p.pid()),
                }),
            });
            procs.extend([p, pt]);
            procs.extend(reg.map(|(p, _)| p));
            continue;
        }
        let Some(peer) = Peer::ALL.into_iter().find(|p| p.name() == name) else {
            notes.push(format!(
                "{name}: unknown front (known: regrelay, nginx, haproxy, caddy)"
            ));
            continue;
        };
        if !procs::have(peer.program()) {
            notes.push(format!(
                "{name}: not installed (scripts/install-deps installs it)"
            ));
            continue;
        }
        // Without a registry the peers still need an address there: the fast origin serves.
        match peer.start(work, fast, registry.unwrap_or(fast)) {
            Ok((p, ports)) => {
                let pid = Some(p.pid());
                fronts.push(Front {
                    name: name.clone(),
                    fast: Hop {
                        addr: ports.fast,
                        pid,
                    },
                    fast_tls: Some(Hop {
                        addr: ports.fast_tls,
                        pid,
                    }),
                    registry: registry.map(|_| Hop {
                        addr: ports.registry,
                        pid,
                    }),
                });
                procs.push(p);
            }
            Err(e) => notes.push(format!("{name}: did not start: {e}")),
        }
    }
    Ok(Started {
        fronts,
        procs,
        notes,
    })
}

fn first_words(s: &str, n: usize) -> String {
    s.split_whitespace().take(n).collect::<Vec<_>>().join(" ")
}

fn git_describe() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let head = out(&["rev-parse", "--short", "HEAD"]);
    let dirty = !out(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    format!(
        "{head}{}",
        if dirty { " + uncommitted changes" } else { "" }
    )
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = procs::version("uname", &["-r"]);
    format!("{cpus} CPUs ({model}), Linux {kernel}")
}

/// Runs the selected cases and writes the report; the fronts stop when this returns (or is
/// dropped, on a signal).
async fn run(s: Settings) -> Result<(), String> {
    let started = Instant::now();
    if !procs::have("curl") {
        return Err("curl is missing: run scripts/install-deps".into());
    }
    eprintln!("settings: {}", s.describe());
    let shm = Path::new("/dev/shm");
    let work_dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .map_err(|e| e.to_string())?;
    let work = work_dir.path().to_owned();

    // The blobs: prefixes of one buffer, as files (curl uploads them) and served by the origin.
    let mut sizes = vec![s.blob_mib, s.tls_mib, s.rtt_mib, s.conc_mib, s.cache_mib, 1];
    sizes.sort_unstable();
    sizes.dedup();
    let max = *sizes.last().unwrap();
    eprintln!("preparing blobs of {sizes:?} MiB…");
    let data = pattern((max * MIB) as usize);
    let digests = prefix_digests(&data, &sizes.iter().map(|m| m * MIB).collect::<Vec<_>>());
    let mut blobs = vec![];
    for (len, digest) in &digests {
        let file = work.join(format!("blob-{}MiB", len / MIB));
        std::fs::write(&file, &data[..*len as usize]).map_err(|e| e.to_string())?;
        blobs.push(Blob {
            len: *len,
            digest: digest.clone(),
            file,
        });
    }
    // The manifest names the largest blob as its layer.
    let served: Vec<(String, u64)> = digests
        .iter()
        .rev()
        .map(|(len, d)| (d.clone(), *len))
        .collect();
    let content = origin::Content::new(data, &served);
    let fast = origin::Origin::start(content).await;

    // The real registry and its token service.
    // The project is the repository the cases use (GitLab finds a repository's project by its path).
    let gitlab = with_developer_pat(USER, PAT, REPO, Duration::from_secs(3600)).await;
    let needs_registry =
        s.runs("registry") || s.runs("session") || s.runs("cache") || s.runs("shared");
    let registry = (needs_registry && procs::have("docker-registry"))
        .then(|| support::Registry::start_in(&gitlab.realm(), shm.is_dir().then_some(shm)));

    let Started {
        fronts,
        procs,
        notes,
    } = start_fronts(&s, &work, fast.addr, registry.as_ref().map(|r| r.addr))?;
    for n in &notes {
        eprintln!("SKIP front {n}");
    }
    let scope = format!("repository:{REPO}:pull,push");
    let jwt = support::fetch_token(&gitlab.realm(), USER, PAT, &scope).await;
    let mut session = None;
    if let Some(hop) = fronts
        .iter()
        .find(|f| f.name == "regrelay")
        .and_then(|f| f.registry)
    {
        session = Some(
            support::fetch_token(&format!("{}/jwt/auth", http(hop.addr)), USER, PAT, &scope).await,
        );
    }
    let b = cases::Bench {
        ticks: procs::clock_ticks(),
        work,
        fronts,
        blobs,
        jwt,
        session,
        gitlab_realm: gitlab.realm(),
        s,
    };

    let mut cases = vec![];
    for id in ALL_CASES {
        if !b.s.runs(id) {
            continue;
        }
        eprintln!("case {id}…");
        let case = match id {
            "plain" => cases::plain(&b).await,
            "registry" if registry.is_none() => Case::skip(
                "registry",
                "1b. HTTP/1.1 plain, real registry",
                "docker-registry is not installed",
            ),
            "registry" => cases::registry(&b).await,
            "tls" => cases::tls(&b).await,
            "rtt" => cases::rtt(&b).await,
            "concurrent" => cases::concurrent(&b).await,
            "small" => cases::small(&b).await,
            "session" if registry.is_none() => Case::skip(
                "session",
                "6. Session cost",
                "docker-registry is not installed",
            ),
            "session" => cases::session(&b).await,
            "cache" if registry.is_none() => Case::skip(
                "cache",
                "7. Pull-through cache, real registry",
                "docker-registry is not installed",
            ),
            "cache" => cases::cache(&b).await,
            "shared" if registry.is_none() => Case::skip(
                "shared",
                "7b. Shared cache on object storage",
                "docker-registry is not installed",
            ),
            "shared" => cases::shared(&b).await,
            "hostile" if !procs::have("docker-registry") => Case::skip(
                "hostile",
                "8. Hostile soak",
                "docker-registry is not installed",
            ),
            "hostile" => hostile::hostile(b.s.hostile_secs).await,
            "instructions" => instructions::instructions(&b).await,
            _ => unreachable!(),
        };
        if let Some(why) = &case.skipped {
            eprintln!("SKIP {id}: {why}");
        }
        cases.push(case);
    }
    for unknown in
        b.s.cases
            .iter()
            .filter(|c| !ALL_CASES.contains(&c.as_str()))
    {
        eprintln!(
            "SKIP {unknown}: unknown case (known: {})",
            ALL_CASES.join(", ")
        );
    }
    procs::stop_all(procs);
    drop(registry);

    let elapsed = started.elapsed();
    let mut meta = vec![
        (
            "when".to_owned(),
            procs::version("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]),
        ),
        ("regrelay".to_owned(), git_describe()),
        ("machine".to_owned(), machine()),
        ("settings".to_owned(), b.s.describe()),
        (
            "peers".to_owned(),
            Peer::ALL
                .iter()
                .map(|p| format!("{}: {}", p.name(), p.version()))
                .collect::<Vec<_>>()
                .join("; "),
        ),
        (
            "clients".to_owned(),
            format!(
                "{}; {}",
                first_words(&procs::version("curl", &["--version"]), 2),
                first_words(&procs::version("wrk", &["--version"]), 2)
            ),
        ),
        (
            "wall time".to_owned(),
            format!("{:.0} s", elapsed.as_secs_f64()),
        ),
    ];
    if !notes.is_empty() {
        meta.push(("fronts not run".to_owned(), notes.join("; ")));
    }
    let md = report::markdown(&meta, &cases);
    std::fs::create_dir_all(&b.s.out).map_err(|e| format!("{}: {e}", b.s.out.display()))?;
    let write = |name: &str, text: &str| {
        let path = b.s.out.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok::<_, String>(path)
    };
    let md_path = write("bench.md", &md)?;
    let json = serde_json::to_string_pretty(&report::json(&meta, &cases)).unwrap();
    let json_path = write("bench.json", &json)?;
    let svg_path = write(
        "bench.svg",
        &report::svg(
            "regrelay benchmark: MB/s and req/s (bars scaled per group)",
            &cases,
        ),
    )?;
    println!("{md}");
    println!(
        "written: {}, {}, {} ({:.0} s)",
        md_path.display(),
        json_path.display(),
        svg_path.display(),
        elapsed.as_secs_f64()
    );
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn interrupted() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[tokio::main]
async fn main() {
    let settings = Settings::from_env();
    // On a signal the `run` future is dropped: its fronts and origins stop before we exit.
    let outcome = tokio::select! {
        r = run(settings) => r,
        _ = interrupted() => Err("interrupted".into()),
    };
    if let Err(e) = outcome {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}
