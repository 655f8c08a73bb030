//! Test rig: real processes and servers on 127.0.0.1 ephemeral ports, ended on drop.
//! - [`Registry`]: Debian's `docker-registry` (distribution 2.8) with token auth and temp storage,
//!   over HTTP or HTTPS ([`tls`]: private CAs made for the test);
//!   [`Registry::start_redirecting`] puts its blobs behind an [`object_store::ObjectStore`].
//! - [`gitlab`]: the GitLab-behaving token service (in-process).
//! - [`Regrelay`]: the real `regrelay` binary, output captured for assertions and secret greps.
//! - [`OciImage`], [`skopeo`], [`docker`]: real clients and images they can push.
#![allow(dead_code)]

pub mod attack;
pub mod containerd;
pub mod garage;
pub mod gitlab;
pub mod haproxy;
pub mod metrics;
pub mod nginx;
pub mod object_store;
pub mod relay;
pub mod soak;
pub mod tls;
pub mod upstream;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Output lines of a child process (collected by reader threads) or of an embedded regrelay
/// (written by its log subscriber); a waiter wakes on each new line.
#[derive(Clone, Default)]
pub struct Captured(Arc<(Mutex<String>, Condvar)>);

impl Captured {
    /// Collects the lines of `stream` (on a reader thread).
    pub fn attach(&self, stream: impl Read + Send + 'static) {
        let mut to = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                to.append(&line, "\n");
            }
        });
    }

    fn append(&mut self, text: &str, end: &str) {
        let (buf, grew) = &*self.0;
        let mut b = buf.lock().unwrap();
        b.push_str(text);
        b.push_str(end);
        grew.notify_all();
    }

    /// Everything so far.
    pub fn text(&self) -> String {
        self.0 .0.lock().unwrap().clone()
    }

    /// Everything, once the process has printed nothing new for a moment (a line can follow the
    /// response it belongs to: the access line is written when the body has been sent).
    pub fn settled(&self) -> String {
        let end = Instant::now() + Duration::from_secs(3);
        let (buf, grew) = &*self.0;
        let mut b = buf.lock().unwrap();
        loop {
            let seen = b.len();
            let (next, quiet) = grew.wait_timeout(b, Duration::from_millis(150)).unwrap();
            b = next;
            if quiet.timed_out() && b.len() == seen || Instant::now() > end {
                return b.clone();
            }
        }
    }

    /// Waits until a line contains `needle`; returns that line.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Option<String> {
        let end = Instant::now() + timeout;
        let (buf, grew) = &*self.0;
        let mut b = buf.lock().unwrap();
        loop {
            if let Some(l) = b.lines().find(|l| l.contains(needle)) {
                return Some(l.to_owned());
            }
            let left = end.checked_duration_since(Instant::now())?;
            b = grew.wait_timeout(b, left).unwrap().0;
        }
    }
}

/// An embedded regrelay's log lines ([`regrelay::embedded::Proxy::start`]) go here too.
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.append(&String::from_utf8_lossy(bytes), "");
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a test that needs a process gets told.
const IN_PROCESS: &str = "regrelay runs in this process: start it with Regrelay::process";

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Reports a test (or part of one) that could not run here: prints `SKIP name: why` and, when
/// `REGRELAY_SKIP_LOG` names a file (scripts/test sets it), appends the line there so the
/// summary counts it (test output is captured, so a printed line alone would go unseen).
pub fn skip(name: &str, why: &str) {
    let line = format!("SKIP {name}: {why}");
    eprintln!("{line}");
    if let Ok(path) = std::env::var("REGRELAY_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Fails the test clearly when a required program is missing.
pub fn require(program: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "required program `{program}` is missing: run .ci/run (it installs the Debian packages)"
    );
}

/// A running `docker-registry serve` with token auth.
pub struct Registry {
    /// Its address.
    pub addr: SocketAddr,
    /// Its log.
    pub log: Captured,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

impl Registry {
    /// Starts the registry trusting the test token-signing certificate, with `realm` in its
    /// challenge. Storage lives in a temp dir under `storage_root` (e.g. /dev/shm) or TMPDIR.
    pub fn start(realm: &str) -> Registry {
        Registry::start_in(realm, None)
    }

    /// Like [`Registry::start`] with storage under `storage_root`.
    pub fn start_in(realm: &str, storage_root: Option<&Path>) -> Registry {
        let dir = match storage_root {
            Some(root) => tempfile::tempdir_in(root).unwrap(),
            None => tempfile::tempdir().unwrap(),
        };
        Registry::launch(dir, &token_auth(realm))
    }

    /// Like [`Registry::start`], with blob reads on object storage, as S3-, GCS- and
    /// Azure-backed registries serve them: blob `GET` and `HEAD` answer `307` to the
    /// [`object_store::ObjectStore`] (nginx serving this registry's storage root), through
    /// distribution's own `redirect` storage middleware.
    pub fn start_redirecting(realm: &str) -> (Registry, object_store::ObjectStore) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        std::fs::create_dir_all(&root).unwrap();
        let store = object_store::ObjectStore::start(&root);
        let config = format!(
            "{auth}middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: {base}\n",
            auth = token_auth(realm),
            base = store.url(),
        );
        (Registry::launch(dir, &config), store)
    }

    /// Like [`Registry::start`], serving HTTPS only, with `leaf` (`http.tls`); reach it by
    /// [`Registry::https_url`].
    pub fn start_tls(realm: &str, leaf: &tls::Leaf) -> Registry {
        Registry::launch_with(tempfile::tempdir().unwrap(), Some(leaf), &token_auth(realm))
    }

    /// Like [`Registry::start_open`], serving HTTPS only, with `leaf`.
    pub fn start_open_tls(leaf: &tls::Leaf) -> Registry {
        Registry::launch_with(tempfile::tempdir().unwrap(), Some(leaf), "")
    }

    /// Starts `docker-registry` as the CNCF pull-through cache (proxy mode) of `remote`, holding
    /// one credential for it and asking none of its own clients.
    pub fn start_proxy(remote: &str, username: &str, password: &str) -> Registry {
        let proxy = format!(
            "proxy:\n  remoteurl: {remote}\n  username: {username}\n  password: {password}\n"
        );
        Registry::launch(tempfile::tempdir().unwrap(), &proxy)
    }

    /// Starts `docker-registry` without any auth section: anyone may pull and push.
    pub fn start_open() -> Registry {
        Registry::launch(tempfile::tempdir().unwrap(), "")
    }

    /// Writes a config (storage in `dir`, an ephemeral port, then `auth`: any further top-level
    /// sections) and starts the registry.
    fn launch(dir: tempfile::TempDir, auth: &str) -> Registry {
        Registry::launch_with(dir, None, auth)
    }

    /// Like [`Registry::launch`], over TLS with `tls` when given.
    fn launch_with(dir: tempfile::TempDir, tls: Option<&tls::Leaf>, auth: &str) -> Registry {
        require("docker-registry");
        let tls = tls.map_or(String::new(), |leaf| {
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                leaf.cert.display(),
                leaf.key.display()
            )
        });
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  formatter: text\nstorage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:0\n{tls}{auth}",
            root = dir.path().join("data").display(),
        );
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, config).unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start docker-registry");
        let log = Captured::default();
        log.attach(child.stdout.take().unwrap());
        log.attach(child.stderr.take().unwrap());
        let Some(line) = log.wait_for("listening on ", Duration::from_secs(20)) else {
            kill(&mut child);
            panic!("docker-registry did not start:\n{}", log.text());
        };
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            // "listening on 127.0.0.1:PORT" (plain) or "listening on 127.0.0.1:PORT, tls"
            .map(|s| s.trim_end_matches(['"', ',']))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("registry address in {line:?}"));
        Registry {
            addr,
            log,
            child,
            _dir: dir,
        }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `METHOD URI STATUS` of every request the registry logged (its access log), in order.
    pub fn requests(&self) -> Vec<String> {
        self.log
            .text()
            .lines()
            .filter_map(|l| {
                let (_, rest) = l.split_once("] \"")?;
                let (request, rest) = rest.split_once('"')?;
                let status = rest.split_whitespace().next()?;
                let request = request.strip_suffix(" HTTP/1.1").unwrap_or(request);
                Some(format!("{request} {status}"))
            })
            .collect()
    }

    /// `https://localhost:PORT`: by name, so that TLS checks the certificate's name.
    pub fn https_url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

/// The registry's `auth.token` section: tokens of the GitLab stand-in, challenges naming `realm`.
fn token_auth(realm: &str) -> String {
    format!(
        "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {bundle}\n",
        service = gitlab::SERVICE,
        issuer = gitlab::ISSUER,
        bundle = gitlab::signing_cert_path(),
    )
}

/// A running regrelay: in this process ([`Regrelay::start`]), or the binary
/// ([`Regrelay::process`], for what only a process has: a pid, signals, an exit status, its
/// memory and descriptors).
pub struct Regrelay {
    /// Its address.
    pub addr: SocketAddr,
    /// Everything it printed (stdout and stderr), or logged.
    pub output: Captured,
    run: Run,
}

enum Run {
    Process(Child),
    /// Dropped (stopped, joined, a panic on its threads raised again) with the `Regrelay`.
    InProcess(#[allow(dead_code)] regrelay::embedded::Proxy),
}

impl Drop for Regrelay {
    fn drop(&mut self) {
        if let Run::Process(child) = &mut self.run {
            kill(child);
        }
    }
}

/// regrelay serving on the test's own current-thread runtime ([`regrelay::embedded::LocalProxy`]): under
/// `#[tokio::test(start_paused = true)]` its deadlines run on the paused clock, so a test of a
/// timeout takes no wall time. Everything it talks to must run on that runtime too (the paused
/// clock jumps ahead whenever the runtime waits): an in-process origin, not a registry process.
/// Read its output with [`Captured::text`] (a blocking wait would stop the runtime it runs on).
pub struct LocalRegrelay {
    /// Its address.
    pub addr: SocketAddr,
    /// Everything it logged.
    pub output: Captured,
    _proxy: regrelay::embedded::LocalProxy,
}

impl LocalRegrelay {
    /// `regrelay serve --listen 127.0.0.1:0 ARGS…` on this runtime.
    pub fn start(args: &[&str]) -> LocalRegrelay {
        let output = Captured::default();
        let proxy = regrelay::embedded::Proxy::start_local(serve_flags(args), LOG, output.clone())
            .unwrap_or_else(|e| panic!("regrelay did not start: {e:#}\n{}", output.text()));
        LocalRegrelay {
            addr: proxy.addr(),
            output,
            _proxy: proxy,
        }
    }
}

/// Path of the regrelay binary under test.
pub fn regrelay_bin() -> PathBuf {
    if let Some(bin) = option_env!("CARGO_BIN_EXE_regrelay") {
        return bin.into();
    }
    // Examples (demo, bench) live in target/<profile>/examples/; the binary one level up.
    let exe = std::env::current_exe().expect("own path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/examples/<name>")
        .join("regrelay")
}

/// Path of a file in `certs/`.
pub fn cert(name: &str) -> String {
    format!("{}/certs/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The log filter regrelay runs with in tests.
const LOG: &str = "regrelay=debug,info";

/// `--listen 127.0.0.1:0` unless ARGS listen elsewhere.
fn serve_flags<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut flags = Vec::with_capacity(args.len() + 2);
    if !args.contains(&"--listen") {
        flags.extend(["--listen", "127.0.0.1:0"]);
    }
    flags.extend(args);
    flags
}

impl Regrelay {
    /// Serves `regrelay serve --listen 127.0.0.1:0 ARGS…` (or ARGS' own `--listen`) in this
    /// process ([`regrelay::embedded::Proxy`]); returns once it listens.
    pub fn start(args: &[&str]) -> Regrelay {
        let output = Captured::default();
        let proxy = regrelay::embedded::Proxy::start(serve_flags(args), LOG, output.clone())
            .unwrap_or_else(|e| panic!("regrelay did not start: {e:#}\n{}", output.text()));
        let px = Regrelay {
            addr: proxy.addr(),
            output,
            run: Run::InProcess(proxy),
        };
        // It listens already; its listening line (which tests read) follows at once.
        if px
            .output
            .wait_for("listening addr=", Duration::from_secs(20))
            .is_none()
        {
            panic!("regrelay wrote no listening line:\n{}", px.output.text());
        }
        px
    }

    /// Starts the binary, `regrelay serve --listen 127.0.0.1:0 ARGS…`, and waits for its
    /// listening line.
    pub fn process(args: &[&str]) -> Regrelay {
        Regrelay::start_with_prefix(&[], args)
    }

    /// Like [`Regrelay::process`], run as `PREFIX… regrelay serve …` (e.g. `env VAR=… ` to
    /// preload a library). The prefix must `exec` regrelay rather than fork it, so that the child
    /// process is regrelay itself (its pid, signals, kill on drop).
    pub fn start_with_prefix(prefix: &[&str], args: &[&str]) -> Regrelay {
        let mut px = Regrelay::spawn_with_prefix(prefix, args);
        px.wait_listening(Duration::from_secs(20));
        px
    }

    /// Like [`Regrelay::start_with_prefix`], without waiting for its listening line (its `addr`
    /// is 0.0.0.0:0 until [`Regrelay::wait_listening`]): for a prefix that starts regrelay only
    /// later (`systemd-socket-activate`, on the first connection).
    pub fn spawn_with_prefix(prefix: &[&str], args: &[&str]) -> Regrelay {
        let bin = regrelay_bin();
        let mut cmd = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let mut child = cmd
            .arg("serve")
            .args(serve_flags(args))
            .env("REGRELAY_LOG", LOG)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start regrelay");
        let output = Captured::default();
        output.attach(child.stdout.take().unwrap());
        output.attach(child.stderr.take().unwrap());
        Regrelay {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            output,
            run: Run::Process(child),
        }
    }

    /// Waits for the listening line and takes the address from it.
    pub fn wait_listening(&mut self, timeout: Duration) {
        let Some(line) = self.output.wait_for("listening addr=", timeout) else {
            if let Run::Process(child) = &mut self.run {
                kill(child);
            }
            panic!("regrelay did not start:\n{}", self.output.text());
        };
        let addr = line
            .split("addr=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        self.addr = addr.parse().expect("regrelay address");
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Process id (of [`Regrelay::process`]).
    pub fn pid(&self) -> u32 {
        match &self.run {
            Run::Process(child) => child.id(),
            Run::InProcess(_) => panic!("{IN_PROCESS}"),
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends SIGHUP (a reload).
    pub fn hangup(&self) {
        self.signal("HUP");
    }

    /// Sends `SIG<name>`.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            let Run::Process(child) = &mut self.run else {
                panic!("{IN_PROCESS}");
            };
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Peak resident set size (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }
}

/// A field of /proc/PID/status in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Deterministic pseudo-random bytes (xorshift), fast enough to generate GiBs in tests.
pub struct Noise(u64);

impl Noise {
    /// Seeded generator.
    pub fn new(seed: u64) -> Noise {
        Noise(seed | 1)
    }
    /// Fills `buf`.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// `sha256:<hex>`.
pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// An OCI image layout on disk, with random gzip layers, that skopeo can push.
pub struct OciImage {
    /// The layout directory.
    pub dir: tempfile::TempDir,
    /// Layer digests and sizes.
    pub layers: Vec<(String, usize)>,
    /// Manifest digest.
    pub manifest_digest: String,
}

impl OciImage {
    /// Builds an image whose layers each hold one file of `size` random bytes.
    pub fn random(seed: u64, layer_sizes: &[usize]) -> OciImage {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let write_blob = |data: &[u8]| -> String {
            let d = digest(data);
            std::fs::write(blobs.join(d.trim_start_matches("sha256:")), data).unwrap();
            d
        };
        let mut layers = vec![];
        let mut diff_ids = vec![];
        for (i, size) in layer_sizes.iter().enumerate() {
            let mut content = vec![0u8; *size];
            Noise::new(seed * 1000 + i as u64).fill(&mut content);
            let mut tar = tar::Builder::new(Vec::new());
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, format!("layer{i}.bin"), content.as_slice())
                .unwrap();
            let tar = tar.into_inner().unwrap();
            diff_ids.push(digest(&tar));
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&tar).unwrap();
            let gz = gz.finish().unwrap();
            layers.push((write_blob(&gz), gz.len()));
        }
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {}, "rootfs": {"type": "layers", "diff_ids": diff_ids},
        })
        .to_string();
        let config_digest = write_blob(config.as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": layers.iter().map(|(d, s)| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s,
            })).collect::<Vec<_>>(),
        })
        .to_string();
        let manifest_digest = write_blob(manifest.as_bytes());
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest, "size": manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }],
        });
        std::fs::write(dir.path().join("index.json"), index.to_string()).unwrap();
        std::fs::write(
            dir.path().join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        OciImage {
            dir,
            layers,
            manifest_digest,
        }
    }

    /// `oci:DIR:latest`.
    pub fn reference(&self) -> String {
        format!("oci:{}:latest", self.dir.path().display())
    }
}

/// Runs skopeo with a private HOME and returns its output (never panics on failure).
pub fn skopeo(args: &[&str]) -> Output {
    require("skopeo");
    let home = tempfile::tempdir().unwrap();
    let out = Command::new("skopeo")
        .args(["--command-timeout", "15m"])
        .args(args)
        .env("HOME", home.path())
        .stdin(Stdio::null())
        .output()
        .expect("run skopeo");
    out
}

/// Output as text, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// How skopeo reaches the registry endpoint.
pub enum Transport {
    /// Plain HTTP.
    Http,
    /// HTTPS trusting the CA in this directory (`ca.crt`).
    Https(PathBuf),
}

impl Transport {
    /// skopeo flags with `prefix` = "dest-", "src-" or "" (inspect).
    pub fn flags(&self, prefix: &str) -> Vec<String> {
        match self {
            Transport::Http => vec![format!("--{prefix}tls-verify=false")],
            Transport::Https(dir) => vec![format!("--{prefix}cert-dir"), dir.display().to_string()],
        }
    }
}

/// skopeo copy from `src` to `dest` with one set of credentials on the registry side(s).
pub fn skopeo_copy(src: &str, dest: &str, creds: &str, transport: &Transport) -> Output {
    let mut args: Vec<String> = vec!["copy".into()];
    if src.starts_with("docker://") {
        args.extend(["--src-creds".into(), creds.into()]);
        args.extend(transport.flags("src-"));
    }
    if dest.starts_with("docker://") {
        args.extend(["--dest-creds".into(), creds.into()]);
        args.extend(transport.flags("dest-"));
    }
    args.extend([src.into(), dest.into()]);
    skopeo(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// A directory holding `ca.crt` = the test CA, for skopeo's `--*-cert-dir`.
pub fn ca_cert_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(cert("ca.pem"), dir.path().join("ca.crt")).unwrap();
    dir
}

/// Compares the blobs of a pulled OCI layout against the pushed image.
pub fn assert_same_blobs(pushed: &OciImage, pulled: &Path) {
    for (d, size) in &pushed.layers {
        let path: PathBuf = pulled
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"));
        let data = std::fs::read(&path).unwrap_or_else(|_| panic!("pulled layout lacks {d}"));
        assert_eq!(data.len(), *size);
        assert_eq!(&digest(&data), d, "pulled blob differs");
    }
}

/// Fails when any secret (or its Basic-auth encoding with `user`) appears in `output`, or any
/// regrelay session token (`rr1.…`) does.
pub fn assert_no_secrets(output: &str, user: &str, secrets: &[String]) {
    use base64::Engine;
    assert!(
        !output.contains("rr1."),
        "a regrelay session token reached regrelay's output"
    );
    for secret in secrets {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"));
        for needle in [secret.as_str(), basic.as_str()] {
            assert!(
                !output.contains(needle),
                "a secret reached regrelay's output"
            );
        }
        // Tokens: also their signature part alone, in case a log truncated the header.
        if let Some(sig) = secret.rsplit('.').next().filter(|s| s.len() > 20) {
            assert!(
                !output.contains(sig),
                "a token signature reached regrelay's output"
            );
        }
    }
}

/// True when a Docker daemon answers; tests that need it print why they skip otherwise.
pub fn docker_available() -> bool {
    Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// `docker import`s a one-file root filesystem of `size` random bytes as `image` (nothing is
/// pulled from anywhere).
pub fn docker_import_random(config: &Path, image: &str, size: usize, seed: u64) {
    let rootfs = tempfile::tempdir().unwrap();
    let mut noise = vec![0u8; size];
    Noise::new(seed).fill(&mut noise);
    std::fs::write(rootfs.path().join("payload.bin"), &noise).unwrap();
    let tarball = rootfs.path().join("rootfs.tar");
    let tar = Command::new("tar")
        .arg("-C")
        .arg(rootfs.path())
        .arg("-cf")
        .arg(&tarball)
        .arg("payload.bin")
        .status()
        .unwrap();
    assert!(tar.success());
    let imported = docker(
        config,
        &["import", &tarball.display().to_string(), image],
        None,
    );
    assert!(imported.status.success(), "{}", text(&imported));
}

/// Asks `realm` (GitLab's or regrelay's `/jwt/auth`) for a token for `scope` with Basic
/// credentials; returns the `token` of the answer.
pub async fn fetch_token(realm: &str, user: &str, secret: &str, scope: &str) -> String {
    use base64::Engine;
    use http_body_util::BodyExt;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"));
    let req = http::Request::get(format!("{realm}?service=container_registry&scope={scope}"))
        .header("authorization", format!("Basic {basic}"))
        .body(regrelay::body::empty())
        .unwrap();
    let resp = upstream::client().request(req).await.unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v["token"].as_str().expect("a token").to_owned()
}

/// Runs docker with a private DOCKER_CONFIG and optional stdin.
pub fn docker(config: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("docker")
        .args(args)
        .env("DOCKER_CONFIG", config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run docker");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}
