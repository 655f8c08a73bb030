//! The clients: curl for big transfers (HTTP/1.1 or HTTP/2, plain or TLS with a pinned cipher,
//! one transfer or many in parallel) and wrk for small requests at a fixed concurrency.
//! Both run as child processes on a blocking thread.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Cipher suites every TLS front is measured with (rustls and OpenSSL would pick AES-256-GCM,
/// Go AES-128-GCM: pinning makes the comparison fair).
const TLS13_CIPHER: &str = "TLS_AES_128_GCM_SHA256";
const TLS12_CIPHER: &str = "ECDHE-ECDSA-AES128-GCM-SHA256";

/// HTTP version curl speaks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Proto {
    /// HTTP/1.1 (plain or TLS).
    H1,
    /// HTTP/2 (TLS with ALPN).
    H2,
}

impl Proto {
    /// `1.1` or `2`, as curl's `%{http_version}` says.
    pub fn version(self) -> &'static str {
        match self {
            Proto::H1 => "1.1",
            Proto::H2 => "2",
        }
    }

    /// Name in the report.
    pub fn label(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "HTTP/2",
        }
    }
}

/// A base URL and how to talk to it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `http://127.0.0.1:PORT` or `https://localhost:PORT`.
    pub base: String,
    /// HTTP version.
    pub proto: Proto,
    /// `Authorization` value, if any.
    pub auth: Option<String>,
}

/// What curl reports for one request.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub code: u16,
    /// Seconds from the first request byte to the last response byte (`time_total -
    /// time_pretransfer`: DNS, TCP and TLS handshakes excluded).
    pub secs: f64,
    /// Seconds from the first request byte to the first response byte (`time_starttransfer -
    /// time_pretransfer`).
    pub ttfb: f64,
    /// Body bytes received.
    pub down: u64,
    /// Body bytes sent.
    pub up: u64,
    /// HTTP version used.
    pub version: String,
    /// regrelay's `X-Regrelay-Cache` header (`hit` for an answer from its cache; may be empty).
    pub cache: String,
    /// `Location` of the answer (may be empty).
    pub location: String,
}

// `cache=` keeps the field there when the header is not.
const WRITE_OUT: &str = "%{http_code} %{time_total} %{time_pretransfer} %{time_starttransfer} %{size_download} %{size_upload} %{http_version} cache=%header{x-regrelay-cache} %header{location}\\n";

fn parse_reply(line: &str) -> Option<Reply> {
    let mut f = line.split_whitespace();
    let code = f.next()?.parse().ok()?;
    let total: f64 = f.next()?.parse().ok()?;
    let pre: f64 = f.next()?.parse().ok()?;
    let start: f64 = f.next()?.parse().ok()?;
    Some(Reply {
        code,
        secs: (total - pre).max(1e-6),
        ttfb: (start - pre).max(0.0),
        down: f.next()?.parse().ok()?,
        up: f.next()?.parse().ok()?,
        version: f.next()?.to_owned(),
        cache: f.next()?.strip_prefix("cache=")?.to_owned(),
        location: f.next().unwrap_or("").to_owned(),
    })
}

/// Common curl arguments for `ep`.
fn curl_base(ep: &Endpoint) -> Vec<String> {
    let mut a: Vec<String> = ["-sS", "--max-time", "300", "-H", "Expect:", "-w", WRITE_OUT]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(match ep.proto {
        Proto::H1 => "--http1.1".into(),
        Proto::H2 => "--http2".into(),
    });
    if ep.base.starts_with("https:") {
        for s in [
            // The certificate names localhost; the fronts listen on 127.0.0.1 only.
            "--connect-to",
            "localhost::127.0.0.1:",
            "--cacert",
            &crate::support::cert("ca.pem"),
            "--tls13-ciphers",
            TLS13_CIPHER,
            "--ciphers",
            TLS12_CIPHER,
        ] {
            a.push(s.to_string());
        }
    }
    if let Some(auth) = &ep.auth {
        a.push("-H".into());
        a.push(format!("Authorization: {auth}"));
    }
    a
}

/// Runs curl with `args` on a blocking thread; returns one reply per transfer and the wall time.
async fn curl(args: Vec<String>) -> Result<(Vec<Reply>, Duration), String> {
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let out = Command::new("curl")
            .args(&args)
            .output()
            .map_err(|e| format!("curl: {e}"))?;
        let wall = start.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let replies: Vec<Reply> = stdout.lines().filter_map(parse_reply).collect();
        if !out.status.success() || replies.is_empty() {
            return Err(format!(
                "curl failed ({}): {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                stdout.trim()
            ));
        }
        Ok((replies, wall))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// `location` as a URL on `base`: the path and query kept, the scheme and authority replaced
/// (a registry behind a TLS front may answer with `http://` URLs).
pub fn rebase(base: &str, location: &str) -> String {
    let path = match location.find("://") {
        Some(i) => location[i + 3..]
            .find('/')
            .map_or("/", |j| &location[i + 3 + j..]),
        None => location,
    };
    format!("{base}{path}")
}

fn expect(r: &Reply, code: u16, what: &str, proto: Proto) -> Result<(), String> {
    if r.code != code {
        return Err(format!("{what}: status {} (wanted {code})", r.code));
    }
    if r.version != proto.version() {
        return Err(format!(
            "{what}: spoke HTTP/{} (wanted HTTP/{})",
            r.version,
            proto.version()
        ));
    }
    Ok(())
}

/// Downloads `/v2/<repo>/blobs/<digest>` (`len` bytes); returns the reply.
pub async fn download(ep: &Endpoint, repo: &str, digest: &str, len: u64) -> Result<Reply, String> {
    let mut args = curl_base(ep);
    args.extend(["-o".into(), "/dev/null".into()]);
    args.push(format!("{}/v2/{repo}/blobs/{digest}", ep.base));
    let (r, _) = curl(args).await?;
    let r = r.into_iter().next().unwrap();
    expect(&r, 200, "GET blob", ep.proto)?;
    if r.down != len {
        return Err(format!("GET blob: {} bytes of {len}", r.down));
    }
    Ok(r)
}

/// Downloads `url` (`len` bytes, HTTP/1.1, no `Authorization`: a presigned URL); returns the
/// reply.
pub async fn download_url(url: &str, len: u64) -> Result<Reply, String> {
    let ep = Endpoint {
        base: String::new(),
        proto: Proto::H1,
        auth: None,
    };
    let mut args = curl_base(&ep);
    args.extend(["-o".into(), "/dev/null".into(), url.to_owned()]);
    let (r, _) = curl(args).await?;
    let r = r.into_iter().next().unwrap();
    expect(&r, 200, "GET object", ep.proto)?;
    if r.down != len {
        return Err(format!("GET object: {} bytes of {len}", r.down));
    }
    Ok(r)
}

/// Pushes `file` (`len` bytes, `digest`) as one blob: POST, one PATCH with the whole body, PUT
/// ?digest. Returns the seconds of the PATCH and PUT (handshakes excluded).
pub async fn upload(
    ep: &Endpoint,
    repo: &str,
    file: &Path,
    len: u64,
    digest: &str,
) -> Result<f64, String> {
    let locations = start_uploads(ep, repo, 1).await?;
    let (patch, _) = curl(patch_args(ep, file, &locations)).await?;
    let patch = &patch[0];
    expect(patch, 202, "PATCH", ep.proto)?;
    if patch.up != len {
        return Err(format!("PATCH: sent {} bytes of {len}", patch.up));
    }
    let (put, _) = curl(put_args(ep, digest, &[rebase(&ep.base, &patch.location)])).await?;
    expect(&put[0], 201, "PUT", ep.proto)?;
    Ok(patch.secs + put[0].secs)
}

/// `n` POSTs (in parallel); returns their upload URLs.
async fn start_uploads(ep: &Endpoint, repo: &str, n: usize) -> Result<Vec<String>, String> {
    let mut args = curl_base(ep);
    // Options other than -o/-T apply to every URL (and repeated -d pieces would be joined).
    args.extend(parallel(n));
    args.extend(["-X", "POST", "--data-binary", ""].map(String::from));
    for _ in 0..n {
        args.extend(["-o", "/dev/null"].map(String::from));
        args.push(format!("{}/v2/{repo}/blobs/uploads/", ep.base));
    }
    let (replies, _) = curl(args).await?;
    if replies.len() != n {
        return Err(format!("POST: {} answers of {n}", replies.len()));
    }
    replies
        .iter()
        .map(|r| {
            expect(r, 202, "POST", ep.proto)?;
            Ok(rebase(&ep.base, &r.location))
        })
        .collect()
}

/// curl's flags to run `n` transfers at once, each on its own connection (none for one).
fn parallel(n: usize) -> Vec<String> {
    if n < 2 {
        return vec![];
    }
    [
        "-Z",
        "--parallel-immediate",
        "--parallel-max",
        &n.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

fn patch_args(ep: &Endpoint, file: &Path, urls: &[String]) -> Vec<String> {
    let mut args = curl_base(ep);
    args.extend(parallel(urls.len()));
    args.extend(["-X", "PATCH"].map(String::from));
    args.extend(["-H", "Content-Type: application/octet-stream"].map(String::from));
    for url in urls {
        args.extend([
            "-o".into(),
            "/dev/null".into(),
            "-T".into(),
            file.display().to_string(),
        ]);
        args.push(url.clone());
    }
    args
}

fn put_args(ep: &Endpoint, digest: &str, urls: &[String]) -> Vec<String> {
    let mut args = curl_base(ep);
    args.extend(parallel(urls.len()));
    args.extend(["-X", "PUT", "--data-binary", ""].map(String::from));
    for url in urls {
        let sep = if url.contains('?') { '&' } else { '?' };
        args.extend(["-o", "/dev/null"].map(String::from));
        args.push(format!("{url}{sep}digest={digest}"));
    }
    args
}

/// `n` uploads of `file` at once (one curl, `n` connections): POSTs first (untimed), then the
/// PATCHes together, then the PUTs together. Returns the wall seconds of PATCHes + PUTs.
pub async fn upload_parallel(
    ep: &Endpoint,
    repo: &str,
    file: &Path,
    len: u64,
    digest: &str,
    n: usize,
) -> Result<f64, String> {
    let urls = start_uploads(ep, repo, n).await?;
    let (patches, patch_wall) = curl(patch_args(ep, file, &urls)).await?;
    if patches.len() != n {
        return Err(format!("PATCH: {} answers of {n}", patches.len()));
    }
    let mut next = vec![];
    for r in &patches {
        expect(r, 202, "PATCH", ep.proto)?;
        if r.up != len {
            return Err(format!("PATCH: sent {} bytes of {len}", r.up));
        }
        next.push(rebase(&ep.base, &r.location));
    }
    let (puts, put_wall) = curl(put_args(ep, digest, &next)).await?;
    for r in &puts {
        expect(r, 201, "PUT", ep.proto)?;
    }
    Ok((patch_wall + put_wall).as_secs_f64())
}

/// `n` downloads of one blob at once (one curl, `n` connections); returns the wall seconds.
pub async fn download_parallel(
    ep: &Endpoint,
    repo: &str,
    digest: &str,
    len: u64,
    n: usize,
) -> Result<f64, String> {
    let mut args = curl_base(ep);
    args.extend(parallel(n));
    for _ in 0..n {
        args.extend(["-o".into(), "/dev/null".into()]);
        args.push(format!("{}/v2/{repo}/blobs/{digest}", ep.base));
    }
    let (replies, wall) = curl(args).await?;
    if replies.len() != n {
        return Err(format!("GET: {} answers of {n}", replies.len()));
    }
    for r in &replies {
        expect(r, 200, "GET blob", ep.proto)?;
        if r.down != len {
            return Err(format!("GET blob: {} bytes of {len}", r.down));
        }
    }
    Ok(wall.as_secs_f64())
}

/// What wrk measured.
#[derive(Debug, Clone)]
pub struct Load {
    /// Latency percentiles in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Requests per second.
    pub rps: f64,
    /// Requests completed.
    pub requests: u64,
    /// Non-2xx answers and socket errors, as wrk printed them (empty when none).
    pub errors: String,
}

/// Settings of one wrk run.
pub struct WrkRun<'a> {
    /// Full URL.
    pub url: &'a str,
    /// `GET` or `HEAD`.
    pub method: &'a str,
    /// Connections.
    pub connections: usize,
    /// wrk threads.
    pub threads: usize,
    /// Duration.
    pub secs: u64,
    /// Where to write the Lua script that sets the method.
    pub dir: &'a Path,
}

/// Runs wrk and parses its latency distribution and rate.
pub async fn wrk(run: WrkRun<'_>) -> Result<Load, String> {
    let script: PathBuf = run
        .dir
        .join(format!("wrk-{}.lua", run.method.to_lowercase()));
    std::fs::write(&script, format!("wrk.method = \"{}\"\n", run.method))
        .map_err(|e| e.to_string())?;
    let args: Vec<String> = vec![
        format!("-t{}", run.threads),
        format!("-c{}", run.connections),
        format!("-d{}s", run.secs),
        "--latency".into(),
        "--timeout".into(),
        "10s".into(),
        "-s".into(),
        script.display().to_string(),
        run.url.into(),
    ];
    let out = tokio::task::spawn_blocking(move || Command::new("wrk").args(&args).output())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "wrk failed: {} {}",
            String::from_utf8_lossy(&out.stderr),
            text
        ));
    }
    let load = parse_wrk(&text).ok_or_else(|| format!("cannot read wrk's output:\n{text}"))?;
    if load.requests == 0 {
        return Err("wrk completed no request".into());
    }
    Ok(load)
}

/// The same measurement as [`wrk`] with the bench's own hyper client: `connections` tasks
/// sending `method` requests back to back for `secs` (keep-alive, one connection each).
/// For HEAD, which wrk 4.1.0 cannot measure: it waits for a body after a HEAD answer that
/// carries a `Content-Length` (as a registry's do) and completes no request.
pub async fn hyper_load(
    url: &str,
    method: http::Method,
    connections: usize,
    secs: u64,
) -> Result<Load, String> {
    let client = crate::support::upstream::client();
    let end = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = vec![];
    for _ in 0..connections {
        let (client, url, method) = (client.clone(), url.to_owned(), method.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = vec![];
            let mut errors = 0u64;
            while Instant::now() < end {
                let req = http::Request::builder()
                    .method(method.clone())
                    .uri(&url)
                    .body(regrelay::body::empty())
                    .unwrap();
                let t = Instant::now();
                match client.request(req).await {
                    Ok(resp) if resp.status().is_success() => {
                        let ok = crate::support::upstream::drain(resp.into_body())
                            .await
                            .is_ok();
                        if ok {
                            lat.push(t.elapsed().as_secs_f64() * 1e3);
                        } else {
                            errors += 1;
                        }
                    }
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = vec![];
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.map_err(|e| e.to_string())?;
        all.extend(lat);
        errors += e;
    }
    let wall = start.elapsed().as_secs_f64();
    if all.is_empty() {
        return Err("no request completed".into());
    }
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Ok(Load {
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        rps: all.len() as f64 / wall,
        requests: all.len() as u64,
        errors: if errors > 0 {
            format!("{errors} failed requests")
        } else {
            String::new()
        },
    })
}

fn parse_wrk(text: &str) -> Option<Load> {
    let pct = |p: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .and_then(|v| duration_ms(v.trim()))
    };
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())?;
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())?;
    let errors: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Non-2xx") || l.starts_with("Socket errors"))
        .collect();
    Some(Load {
        p50_ms: pct("50%")?,
        p99_ms: pct("99%")?,
        rps,
        requests,
        errors: errors.join("; "),
    })
}

/// `123.45us`, `1.20ms`, `2.00s`, `1.00m` as milliseconds.
fn duration_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1e3,
        "ms" => n,
        "s" => n * 1e3,
        "m" => n * 60e3,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk() {
        let text = "Running 5s test @ http://127.0.0.1:1/v2/\n  1 threads and 32 connections\n\
                    Latency Distribution\n     50%  312.00us\n     75%  400.00us\n     90%    1.20ms\n     99%    2.50ms\n\
                    100000 requests in 5.00s, 10.00MB read\nRequests/sec:  20000.12\n";
        let l = parse_wrk(text).unwrap();
        assert_eq!((l.p50_ms, l.p99_ms, l.requests), (0.312, 2.5, 100000));
        assert!((l.rps - 20000.12).abs() < 1e-9);
    }

    #[test]
    fn reads_replies() {
        let r = parse_reply("200 1.5 0.5 0.75 10 0 1.1 cache=hit").unwrap();
        assert_eq!((r.code, r.secs, r.ttfb, r.down), (200, 1.0, 0.25, 10));
        assert_eq!((r.cache.as_str(), r.location.as_str()), ("hit", ""));
        let r = parse_reply("202 1 0 0.5 0 0 1.1 cache= /v2/x?a=b").unwrap();
        assert_eq!((r.cache.as_str(), r.location.as_str()), ("", "/v2/x?a=b"));
    }

    #[test]
    fn rebases_locations() {
        assert_eq!(
            rebase("https://localhost:1", "http://127.0.0.1:2/v2/x?a=b"),
            "https://localhost:1/v2/x?a=b"
        );
        assert_eq!(rebase("http://h:1", "/v2/x"), "http://h:1/v2/x");
    }
}
