//! Upgrades in place on one host (`--upgrade-socket`): a second `regrelay serve` with the same
//! flags takes the listening sockets over from the running one, which drains and exits.
//!
//! - Mid-push (a skopeo push through a throttled link, its layer taking ~25 s), with `GET /v2/`
//!   on a fresh connection every 50 ms: no connection is refused or fails, the upload finishes on
//!   the old process (which exits after it), the new one serves everything accepted after the
//!   handover (the rest of the push, with the sessions the old one sealed, and the metrics
//!   port), and its `listening` line names the process it took over from. Over plain HTTP and
//!   over TLS.
//! - A successor whose configuration does not load, or names another address, leaves the old
//!   process serving (and upgradable), exits 64 and says why; so does `regrelay upgrade`.
//! - Socket activation: a regrelay started by systemd's socket passing (`LISTEN_FDS`) serves the
//!   connection that woke it, and hands that socket over too.
//!
//! The systemd unit's own command lines (`ExecStart=`, `ExecReload=` = `regrelay upgrade`,
//! `sd_notify`) are run in tests/it/systemd_unit.rs.

use crate::support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use support::gitlab::{with_developer_pat, GitLab};
use support::relay::Relay;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USER: &str = "builder";
const PAT: &str = "glpat-Up9nWq8ZtVc5LmXp2HsQ";
/// The client's uplink (bytes/s): the layer below takes ~25 s.
const RATE: u64 = 1 << 20;
const LAYER: usize = 24 << 20;
/// How far into the upload the new process starts.
const HANDOVER_AT: Duration = Duration::from_secs(5);
/// Time between two probes (`GET /v2/` on a new connection).
const PROBE_EVERY: Duration = Duration::from_millis(50);

/// A regrelay serving with `--upgrade-socket`, a registry behind it, and a throttled link in
/// front of it for the push.
struct Rig {
    gl: GitLab,
    _reg: Registry,
    _keys: tempfile::NamedTempFile,
    _dir: tempfile::TempDir,
    /// The flags of every regrelay here (the successor gets the same).
    args: Vec<String>,
    tls: bool,
    link: Relay,
    a: Regrelay,
}

impl Rig {
    async fn start(tls: bool) -> Rig {
        let gl = with_developer_pat(USER, PAT, "ci/app", Duration::from_secs(5)).await;
        let reg = Registry::start(&gl.realm());
        let keys = key_file();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("upgrade.sock");
        let mut args: Vec<String> = [
            "--registry",
            &reg.url(),
            "--session-key-file",
            &keys.path().display().to_string(),
            "--upgrade-socket",
            &socket.display().to_string(),
            "--metrics-listen",
            "127.0.0.1:0",
            "--shutdown-grace-secs",
            "5",
            "--upload-drain-secs",
            "120",
        ]
        .map(str::to_owned)
        .to_vec();
        if tls {
            args.extend(
                [
                    "--tls-cert",
                    &cert("server.pem"),
                    "--tls-key",
                    &cert("server.key"),
                ]
                .map(str::to_owned),
            );
        }
        let a = tokio::task::block_in_place(|| Regrelay::process(&strs(&args)));
        let link = Relay::start(vec![a.addr], Some(RATE)).await;
        Rig {
            gl,
            _reg: reg,
            _keys: keys,
            _dir: dir,
            args,
            tls,
            link,
            a,
        }
    }

    /// Where skopeo sends the image: the throttled link (as `localhost` over TLS: the test
    /// certificate's name).
    fn image(&self) -> String {
        let host = if self.tls {
            format!("localhost:{}", self.link.addr.port())
        } else {
            self.link.addr.to_string()
        };
        format!("docker://{host}/ci/app:v1")
    }

    fn transport(&self, certs: &Path) -> Transport {
        if self.tls {
            Transport::Https(certs.to_owned())
        } else {
            Transport::Http
        }
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn key_file() -> tempfile::NamedTempFile {
    use base64::Engine;
    use std::io::Write;
    let mut key = [0u8; 32];
    Noise::new(u64::from(std::process::id()) ^ 0x2424).fill(&mut key);
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let line = base64::engine::general_purpose::STANDARD.encode(key);
    writeln!(f, "{line}").unwrap();
    f
}

/// One probe: when it was sent, and what went wrong (None: regrelay answered 401).
struct Probe {
    sent: Instant,
    failure: Option<String>,
}

/// `GET /v2/` on a new connection to `addr` every [`PROBE_EVERY`] until `stop`.
fn probe(
    addr: SocketAddr,
    tls: bool,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Probe>> {
    tokio::spawn(async move {
        let tls = tls.then(tls_connector);
        let mut probes = vec![];
        while !stop.load(Ordering::SeqCst) {
            let sent = Instant::now();
            let answer = tokio::time::timeout(Duration::from_secs(5), get_v2(addr, tls.as_ref()));
            let failure = match answer.await {
                Ok(Ok(status)) if status.starts_with("HTTP/1.1 401") => None,
                Ok(Ok(status)) => Some(format!("answered {status:?}")),
                Ok(Err(e)) => Some(e),
                Err(_) => Some("no answer within 5 s".to_owned()),
            };
            probes.push(Probe { sent, failure });
            tokio::time::sleep_until((sent + PROBE_EVERY).into()).await;
        }
        probes
    })
}

fn tls_connector() -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(cert("ca.pem")).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// The status line regrelay answers `GET /v2/` with, on a new connection.
async fn get_v2(
    addr: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let req = b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    match tls {
        Some(tls) => {
            let name = ServerName::try_from("localhost").unwrap();
            let s = tls
                .connect(name, tcp)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            exchange(s, req).await
        }
        None => exchange(tcp, req).await,
    }
}

/// Sends `req`; reads until the end of the response head.
async fn exchange(
    mut s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    req: &[u8],
) -> Result<String, String> {
    s.write_all(req).await.map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) => return Err(format!("closed after {} bytes", head.len())),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    Ok(head.lines().next().unwrap_or_default().to_owned())
}

/// skopeo copy in the background.
fn skopeo_in_background(
    src: String,
    dest: String,
    transport: Transport,
) -> tokio::task::JoinHandle<Output> {
    tokio::task::spawn_blocking(move || {
        skopeo_copy(&src, &dest, &format!("{USER}:{PAT}"), &transport)
    })
}

/// Waits until `px` printed a line containing `needle`; the instant it was seen.
async fn seen(px: &Regrelay, needle: &str, within: Duration) -> Instant {
    let end = Instant::now() + within;
    while !px.output.text().contains(needle) {
        assert!(
            Instant::now() < end,
            "no {needle:?} within {within:?}:\n{}",
            px.output.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Instant::now()
}

/// Lines of `text` containing every one of `needles`.
fn lines_with<'a>(text: &'a str, needles: &[&str]) -> Vec<&'a str> {
    text.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}

async fn handover_mid_push(tls: bool) {
    let started = Instant::now();
    let mut rig = Rig::start(tls).await;
    let certs = ca_cert_dir();
    let image = OciImage::random(2424 + u64::from(tls), &[LAYER]);
    let stop = Arc::new(AtomicBool::new(false));
    let probes = probe(rig.a.addr, tls, stop.clone());
    let pushing = skopeo_in_background(image.reference(), rig.image(), rig.transport(certs.path()));
    let posted = "method=POST path=/v2/ci/app/blobs/uploads/ status=202";
    let upload_started = seen(&rig.a, posted, Duration::from_secs(90)).await;
    tokio::time::sleep_until((upload_started + HANDOVER_AT).into()).await;

    // The successor: the same flags, started while the layer streams into A.
    let b = tokio::task::block_in_place(|| Regrelay::process(&strs(&rig.args)));
    let handed_over = seen(&rig.a, "handed over", Duration::from_secs(10)).await;
    assert_eq!(b.addr, rig.a.addr, "B serves the same port");
    let out_b = b.output.text();
    let listening = lines_with(&out_b, &["listening addr="])[0];
    assert!(
        listening.contains(&format!("took_over_from={}", rig.a.pid())),
        "B's startup line names the handover: {listening}"
    );
    assert_eq!(
        support::metrics::addr(&b),
        support::metrics::addr(&rig.a),
        "the metrics port too"
    );

    let pushed = pushing.await.unwrap();
    assert!(
        pushed.status.success(),
        "push failed: {}\nA:\n{}\nB:\n{}",
        text(&pushed),
        rig.a.output.text(),
        b.output.text()
    );
    let push_took = started.elapsed();

    // A served the upload across the handover, then exited (0) once it was done.
    let status = tokio::task::block_in_place(|| rig.a.wait_exit(Duration::from_secs(60)))
        .unwrap_or_else(|| panic!("A did not exit after the upload:\n{}", rig.a.output.text()));
    let a_exited = Instant::now();
    assert!(status.success(), "{status:?}\n{}", rig.a.output.text());
    let out_a = rig.a.output.text();
    let handover_at = out_a.find("handed over").unwrap();
    let patch = out_a
        .match_indices("method=PATCH path=/v2/ci/app/blobs/uploads/")
        .map(|(i, _)| i)
        .find(|&i| i > handover_at);
    assert!(
        patch.is_some_and(|i| out_a[i..].lines().next().unwrap().contains("status=202")),
        "the layer's upload ends on A, after the handover:\n{out_a}"
    );
    assert!(
        !out_a[handover_at..].contains("method=PUT path=/v2/ci/app/manifests/"),
        "nothing new starts on A after the handover:\n{out_a}"
    );

    // More probes once A is gone, then the verdict: not one failed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let probes = probes.await.unwrap();
    let failed: Vec<String> = probes
        .iter()
        .filter_map(|p| {
            p.failure
                .as_ref()
                .map(|f| format!("{:?} in: {f}", p.sent - started))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} probes failed: {failed:#?}",
        failed.len(),
        probes.len()
    );
    let after = probes.iter().filter(|p| p.sent > handed_over).count();
    let before = probes.len() - after;
    assert!(
        before >= 20 && after >= 20,
        "{before} probes before the handover, {after} after"
    );
    assert!(probes.iter().any(|p| p.sent > a_exited));

    // B served everything accepted after the handover: every later probe, the rest of the push
    // with the sessions A sealed (no 401 on the repository), and the metrics once A is gone.
    let out_b = b.output.text();
    let b_probes = lines_with(&out_b, &["method=GET path=/v2/ ", "status=401"]).len();
    assert!(
        b_probes >= after,
        "B answered {b_probes} probes, {after} were sent after the handover"
    );
    assert!(
        !lines_with(
            &out_b,
            &["method=PUT path=/v2/ci/app/manifests/v1", "status=201"]
        )
        .is_empty(),
        "the manifest went to B:\n{out_b}"
    );
    let refused = lines_with(&out_b, &["path=/v2/ci/app", "status=401"]);
    assert!(
        refused.is_empty(),
        "B could not open A's sessions: {refused:#?}"
    );
    let (status, _, scrape) = support::metrics::scrape(support::metrics::addr(&b)).await;
    assert!(
        status.is_success() && scrape.contains("regrelay_"),
        "{status} {scrape}"
    );

    // The image is whole: pulled back through B.
    let pulled = tempfile::tempdir().unwrap();
    let (src, dest) = (
        rig.image(),
        format!("oci:{}:latest", pulled.path().display()),
    );
    let transport = rig.transport(certs.path());
    let pull = tokio::task::spawn_blocking(move || {
        skopeo_copy(&src, &dest, &format!("{USER}:{PAT}"), &transport)
    })
    .await
    .unwrap();
    assert!(pull.status.success(), "{}", text(&pull));
    assert_same_blobs(&image, pulled.path());

    let mut secrets = rig.gl.issued();
    secrets.push(PAT.to_owned());
    assert_no_secrets(&format!("{out_a}\n{out_b}"), USER, &secrets);
    rig.link.set_backends(vec![b.addr]);
    eprintln!(
        "handover mid-push (tls: {tls}): push {push_took:?}, {} probes ({before} before the \
         handover, {after} after), none failed",
        probes.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handover_mid_push_refuses_no_connection() {
    handover_mid_push(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handover_mid_push_over_tls_refuses_no_connection() {
    handover_mid_push(true).await;
}

/// Runs `regrelay ARGS…` expecting it to exit on its own within 20 s.
fn run_to_exit(args: &[&str]) -> Output {
    let mut child = Command::new(regrelay_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            panic!(
                "regrelay {args:?} did not exit: {}",
                text(&child.wait_with_output().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A free 127.0.0.1 port (free a moment ago).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_successor_with_a_bad_config_leaves_the_old_one_serving() {
    let origin = support::upstream::sink().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file();
    let socket = dir.path().join("upgrade.sock").display().to_string();
    let keys_path = keys.path().display().to_string();
    let origin_url = origin.url();
    let flags = [
        "--registry",
        &origin_url,
        "--upgrade-socket",
        &socket,
        "--session-key-file",
        &keys_path,
    ];
    let a = tokio::task::block_in_place(|| Regrelay::process(&flags));
    let mode = std::fs::metadata(&socket).unwrap();
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    assert!(mode.file_type().is_socket());
    assert_eq!(
        mode.permissions().mode() & 0o777,
        0o600,
        "only its user may upgrade it"
    );

    // `serve` with A's flags, `flag` set to `value` instead.
    let with = |flag: &str, value: &str| -> Vec<String> {
        let mut args = vec!["serve".to_owned(), "--listen".into(), "127.0.0.1:0".into()];
        args.extend(flags.iter().map(|s| s.to_string()));
        let at = args.iter().position(|a| a == flag).unwrap();
        args[at + 1] = value.to_owned();
        args
    };
    // A configuration that does not load: the socket is never touched.
    let bad_keys = with("--session-key-file", "/nonexistent/session.keys");
    let out = tokio::task::block_in_place(|| run_to_exit(&strs(&bad_keys)));
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("session_key_file"), "{}", text(&out));
    // Another address: declined once the offer is seen, with the reason on both sides.
    let elsewhere = format!("127.0.0.1:{}", free_port());
    let moved = with("--listen", &elsewhere);
    let out = tokio::task::block_in_place(|| run_to_exit(&strs(&moved)));
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("differs from the running regrelay's"),
        "{}",
        text(&out)
    );
    seen(&a, "declined to take over", Duration::from_secs(5)).await;
    // `regrelay upgrade` (systemd's reload) checks before it starts anything.
    let mut upgrade = bad_keys.clone();
    upgrade[0] = "upgrade".into();
    let out = tokio::task::block_in_place(|| run_to_exit(&strs(&upgrade)));
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("the running regrelay serves on"),
        "{}",
        text(&out)
    );

    // A serves on, and is still upgradable.
    let status = get_v2(a.addr, None).await.unwrap();
    assert!(status.starts_with("HTTP/1.1"), "{status}");
    assert!(
        !a.output.text().contains("handed over"),
        "{}",
        a.output.text()
    );
    let b = tokio::task::block_in_place(|| Regrelay::process(&flags));
    assert_eq!(b.addr, a.addr);
    seen(&a, "handed over", Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_socket_activated_regrelay_serves_its_first_connection_and_hands_the_socket_over() {
    require("systemd-socket-activate");
    let origin = support::upstream::sink().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("upgrade.sock").display().to_string();
    let origin_url = origin.url();
    let flags = ["--registry", &origin_url, "--upgrade-socket", &socket];
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen = addr.to_string();
    // systemd-socket-activate binds, and starts regrelay on the first connection (exec: same pid).
    let mut a =
        Regrelay::spawn_with_prefix(&["systemd-socket-activate", "--listen", &listen], &flags);
    let first = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        exchange(
            first,
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ),
    )
    .await
    .expect("the connection that woke regrelay is served")
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1"), "{answer}");
    tokio::task::block_in_place(|| a.wait_listening(Duration::from_secs(5)));
    assert_eq!(a.addr, addr, "it serves systemd's socket");
    assert!(
        a.output.text().contains("socket activation"),
        "{}",
        a.output.text()
    );
    let b = tokio::task::block_in_place(|| Regrelay::process(&flags));
    assert_eq!(b.addr, addr, "the new process got systemd's socket");
    seen(&a, "handed over", Duration::from_secs(5)).await;
    assert!(get_v2(addr, None).await.unwrap().starts_with("HTTP/1.1"));
}

/// Files in `dir`.
fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn both_processes_share_the_cache_directory_safely() {
    let gl = with_developer_pat(USER, PAT, "ci/app", Duration::from_secs(300)).await;
    let reg = Registry::start(&gl.realm());
    // A layer larger than the socket buffers: a client that stops reading holds its fill open.
    let image = OciImage::random(2425, &[32 << 20]);
    let (src, dest) = (
        image.reference(),
        format!("docker://{}/ci/app:v1", reg.addr),
    );
    let pushed = tokio::task::spawn_blocking(move || {
        skopeo_copy(&src, &dest, &format!("{USER}:{PAT}"), &Transport::Http)
    })
    .await
    .unwrap();
    assert!(pushed.status.success(), "{}", text(&pushed));
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file();
    let (reg_url, cache_dir) = (reg.url(), cache.path().display().to_string());
    let (socket, keys_path) = (
        dir.path().join("upgrade.sock").display().to_string(),
        keys.path().display().to_string(),
    );
    let flags = [
        "--registry",
        &reg_url,
        "--cache-dir",
        &cache_dir,
        "--upgrade-socket",
        &socket,
        "--session-key-file",
        &keys_path,
    ];
    let mut a = tokio::task::block_in_place(|| Regrelay::process(&flags));

    // A blob GET through A fills the cache; its client reads the head and stops.
    let (layer, len) = image.layers[0].clone();
    let realm = format!("{}/jwt/auth", a.url());
    let token = fetch_token(&realm, USER, PAT, "repository:ci/app:pull").await;
    let mut client = tokio::net::TcpStream::connect(a.addr).await.unwrap();
    let req = format!(
        "GET /v2/ci/app/blobs/{layer} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n",
        a.addr
    );
    client.write_all(req.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 512];
    let n = client.read(&mut head).await.unwrap();
    assert!(
        head[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head[..n])
    );
    let tmp = cache.path().join("tmp");
    let end = Instant::now() + Duration::from_secs(10);
    while files_in(&tmp).is_empty() {
        assert!(
            Instant::now() < end,
            "no fill under way in {}",
            tmp.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let filling = files_in(&tmp);

    // B takes over and opens the same directory: A's fill in progress is not B's to delete.
    let b = tokio::task::block_in_place(|| Regrelay::process(&flags));
    seen(&a, "handed over", Duration::from_secs(5)).await;
    assert_eq!(files_in(&tmp), filling, "{}", b.output.text());

    // The client reads on; A commits the verified blob under its digest, and exits.
    let mut got = n;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match client.read(&mut buf).await.unwrap() {
            0 => break,
            k => got += k,
        }
    }
    assert!(got > len, "{got} bytes of a {len}-byte blob");
    let hex = layer.trim_start_matches("sha256:");
    let blob = cache.path().join("blobs/sha256").join(hex);
    let status = tokio::task::block_in_place(|| a.wait_exit(Duration::from_secs(30)));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        a.output.text()
    );
    assert!(blob.exists(), "A's fill was lost:\n{}", a.output.text());
    assert_eq!(digest(&std::fs::read(&blob).unwrap()), layer);
    assert!(files_in(&tmp).is_empty(), "{:?}", files_in(&tmp));
    assert!(!a.output.text().contains("WARN"), "{}", a.output.text());
    drop(b);
}
