//! Rolling restarts behind a real balancer (Debian's HAProxy, HTTP mode, health checks on
//! `/-/ready`): two replicas sharing a session key ring, a GitLab stand-in with 5-second tokens,
//! a push throttled so that its layer takes most of a minute.
//!
//! - Each replica is restarted in turn mid-push (SIGTERM, then a new process on the same port once
//!   the old one stopped accepting): the push completes with the right digest and no
//!   client-visible error, with skopeo and with the Docker daemon.
//! - A balancer without redispatch sees no failed request during the shutdown delay (and does
//!   without the delay: the control).
//! - An upload still running at the drain deadline is answered (202 with the upload's `Range`),
//!   never reset: skopeo's `--retry-times` and Docker's own retry complete the push on the other
//!   replica.
//! - A SIGKILLed carrier: the client's push fails, the registry holds no blob for the digest, and
//!   the retry through the other replica succeeds.

use crate::support;

use std::net::SocketAddr;
use std::process::Output;
use std::time::{Duration, Instant};

use support::gitlab::{with_developer_pat, GitLab};
use support::haproxy::{Haproxy, Refused, Server};
use support::relay::Relay;
use support::*;

const USER: &str = "builder";
const PAT: &str = "glpat-Rl9nWq8ZtVc5LmXp2HsQ";
/// The client's uplink (bytes/s): a 40 MiB layer takes about 40 s.
const RATE: u64 = 1 << 20;

/// Two replicas behind HAProxy, reached by the client through a throttled link whose address is
/// the replicas' `--public-url`.
struct Rig {
    gl: GitLab,
    reg: Registry,
    reg_url: String,
    keys: tempfile::NamedTempFile,
    addrs: [SocketAddr; 2],
    public: SocketAddr,
    replicas: [Option<Regrelay>; 2],
    /// Stopped replicas, still draining or exited.
    retired: Vec<Regrelay>,
    lb: Haproxy,
    _link: Relay,
}

impl Rig {
    /// `extra[i]` are replica `i`'s own flags; `backup` makes replica 1 HAProxy's backup server
    /// (so replica 0 carries every request while it is up).
    async fn start(extra: [&[&str]; 2], backup: bool, refused: Refused) -> Rig {
        let gl = with_developer_pat(USER, PAT, "ci/app", Duration::from_secs(5)).await;
        let reg = Registry::start(&gl.realm());
        let keys = key_file();
        // Held together until all are chosen, so that no two are the same port.
        let [a, b, lb_addr] = free_addrs();
        let link = Relay::start(vec![lb_addr], Some(RATE)).await;
        let addrs = [a, b];
        let lb = Haproxy::start(
            lb_addr,
            &[
                Server {
                    addr: addrs[0],
                    backup: false,
                },
                Server {
                    addr: addrs[1],
                    backup,
                },
            ],
            refused,
        );
        let mut rig = Rig {
            gl,
            reg_url: reg.url(),
            reg,
            keys,
            addrs,
            public: link.addr,
            replicas: [None, None],
            retired: vec![],
            lb,
            _link: link,
        };
        for (i, extra) in extra.iter().enumerate() {
            rig.replicas[i] = Some(rig.replica(i, extra));
        }
        // HAProxy holds a server back until it passed its checks (`rise 2`): until then every
        // request would go to the backup.
        for r in rig.replicas.iter().flatten() {
            wait_checked(r).await;
        }
        rig
    }

    fn replica(&self, i: usize, extra: &[&str]) -> Regrelay {
        let (listen, public) = (self.addrs[i].to_string(), format!("http://{}", self.public));
        let keys = self.keys.path().display().to_string();
        let mut args = vec![
            "--listen",
            &listen,
            "--registry",
            &self.reg_url,
            "--session-key-file",
            &keys,
            "--public-url",
            &public,
        ];
        args.extend_from_slice(extra);
        Regrelay::process(&args)
    }

    /// SIGTERM to replica `i`; once it stopped accepting, and `gap` later, a new replica on the
    /// same port.
    fn restart(&mut self, i: usize, extra: &[&str], gap: Duration) {
        tokio::task::block_in_place(|| self.restart_blocking(i, extra, gap));
    }

    fn restart_blocking(&mut self, i: usize, extra: &[&str], gap: Duration) {
        let old = self.replicas[i].take().expect("replica running");
        old.terminate();
        assert!(
            old.output
                .wait_for("draining", Duration::from_secs(30))
                .is_some(),
            "{}",
            old.output.text()
        );
        std::thread::sleep(gap);
        self.replicas[i] = Some(self.replica(i, extra));
        self.retired.push(old);
    }

    /// Every stopped replica exits 0 (uploads drained).
    fn assert_retired_exit_cleanly(&mut self, within: Duration) {
        for old in &mut self.retired {
            let status = old.wait_exit(within).unwrap_or_else(|| {
                panic!("a stopped replica did not exit:\n{}", old.output.text())
            });
            assert!(status.success(), "{status:?}\n{}", old.output.text());
        }
    }

    /// Everything every replica printed.
    fn logs(&self) -> String {
        self.replicas
            .iter()
            .flatten()
            .chain(&self.retired)
            .map(|r| r.output.text())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Pulls `ci/app:v1` back through the link and compares it with `image`.
    async fn assert_pulls_back(&self, image: &OciImage) {
        let pulled = tempfile::tempdir().unwrap();
        let (src, dest) = (
            format!("docker://{}/ci/app:v1", self.public),
            format!("oci:{}:latest", pulled.path().display()),
        );
        let pull =
            blocking(move || skopeo_copy(&src, &dest, &format!("{USER}:{PAT}"), &Transport::Http))
                .await;
        assert!(pull.status.success(), "{}", text(&pull));
        assert_same_blobs(image, pulled.path());
    }

    fn assert_no_secrets(&self) {
        let mut secrets = self.gl.issued();
        secrets.push(PAT.to_owned());
        assert_no_secrets(&self.logs(), USER, &secrets);
    }
}

/// Waits until HAProxy's health checks have found `replica` ready three times.
async fn wait_checked(replica: &Regrelay) {
    let end = Instant::now() + Duration::from_secs(30);
    while replica
        .output
        .text()
        .matches("path=/-/ready status=200")
        .count()
        < 3
    {
        assert!(Instant::now() < end, "HAProxy never checked the replica");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three 127.0.0.1 addresses whose ports were free a moment ago, all different.
fn free_addrs() -> [SocketAddr; 3] {
    let held: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    [0, 1, 2].map(|i| held[i].local_addr().unwrap())
}

fn key_file() -> tempfile::NamedTempFile {
    use base64::Engine;
    use std::io::Write;
    let mut key = [0u8; 32];
    Noise::new(u64::from(std::process::id()) ^ 0x0011_aa55).fill(&mut key);
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        f,
        "{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
    .unwrap();
    f
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// skopeo pushes the OCI layout `reference` to `ci/app:v1` at `host`, in the background;
/// `retries` is its `--retry-times`.
fn push(reference: String, host: SocketAddr, retries: u32) -> tokio::task::JoinHandle<Output> {
    tokio::task::spawn_blocking(move || {
        let (dest, creds, retries) = (
            format!("docker://{host}/ci/app:v1"),
            format!("{USER}:{PAT}"),
            retries.to_string(),
        );
        skopeo(&[
            "copy",
            "--retry-times",
            &retries,
            "--dest-tls-verify=false",
            "--dest-creds",
            &creds,
            &reference,
            &dest,
        ])
    })
}

/// Waits until the blob upload has started (a replica answered its `POST` with 202; the
/// `PATCH` streams next) and returns when it did: timings count from there, not from the
/// client's start, which a loaded machine delays by seconds.
async fn upload_started(rig: &Rig) -> Instant {
    let posted = "method=POST path=/v2/ci/app/blobs/uploads/ status=202";
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let seen = rig
            .replicas
            .iter()
            .flatten()
            .chain(&rig.retired)
            .any(|r| r.output.text().contains(posted));
        if seen {
            return Instant::now();
        }
        assert!(
            Instant::now() < end,
            "the upload never started\n{}",
            rig.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sleeps until `secs` after `t0`.
async fn into_the_upload(t0: Instant, secs: u64) {
    tokio::time::sleep_until((t0 + Duration::from_secs(secs)).into()).await;
}

fn assert_no_client_error(out: &Output) {
    // Digests and layer ids are hex: "0845023…" is not a 502.
    let hex = |w: &str| {
        let w = w.trim_start_matches("sha256:").trim_end_matches(':');
        w.len() >= 12 && w.chars().all(|c| c.is_ascii_hexdigit())
    };
    let all: String = text(out)
        .to_lowercase()
        .split_whitespace()
        // Nor is the port in "127.0.0.1:45031".
        .filter(|w| !hex(w) && !w.contains("127.0.0.1:"))
        .collect::<Vec<_>>()
        .join(" ");
    for bad in [
        "retrying",
        "reset by peer",
        "broken pipe",
        "eof",
        "502",
        "503",
    ] {
        assert!(!all.contains(bad), "client saw {bad:?}: {}", text(out));
    }
}

/// Longer than HAProxy takes to mark a replica down (3 checks 500 ms apart).
const ROLLING: &[&str] = &["--shutdown-delay-secs", "3"];

#[tokio::test(flavor = "multi_thread")]
async fn each_replica_restarted_in_turn_mid_push_skopeo_completes() {
    let mut rig = Rig::start([ROLLING, ROLLING], false, Refused::Redispatch).await;
    let image = OciImage::random(141, &[40 << 20]);
    let started = Instant::now();
    let pushing = push(image.reference(), rig.public, 0);
    let t0 = upload_started(&rig).await;
    into_the_upload(t0, 4).await;
    rig.restart(0, ROLLING, Duration::ZERO);
    into_the_upload(t0, 14).await;
    rig.restart(1, ROLLING, Duration::ZERO);
    let out = pushing.await.unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "push failed: {}\n{}",
        text(&out),
        rig.logs()
    );
    assert!(
        took > Duration::from_secs(25),
        "the restarts must land mid-push: {took:?}"
    );
    assert_no_client_error(&out);
    rig.assert_retired_exit_cleanly(Duration::from_secs(90));
    rig.assert_pulls_back(&image).await;
    rig.assert_no_secrets();
    eprintln!("skopeo push across two rolling restarts took {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_replica_restarted_in_turn_mid_push_docker_completes() {
    if !docker_available() {
        return skip(
            "each_replica_restarted_in_turn_mid_push_docker_completes",
            "no Docker daemon (`docker info` fails)",
        );
    }
    let mut rig = Rig::start([ROLLING, ROLLING], false, Refused::Redispatch).await;
    let config = tempfile::tempdir().unwrap();
    let image = format!("{}/ci/app:v1", rig.public);
    let c = config.path().to_owned();
    let img = image.clone();
    let login = blocking(move || {
        docker_import_random(&c, &img, 40 << 20, 142);
        docker(
            &c,
            &[
                "login",
                &img[..img.find('/').unwrap()],
                "-u",
                USER,
                "--password-stdin",
            ],
            Some(PAT),
        )
    })
    .await;
    assert!(login.status.success(), "{}", text(&login));
    let started = Instant::now();
    let pushing = tokio::spawn({
        let (c, img) = (config.path().to_owned(), image.clone());
        async move { blocking(move || docker(&c, &["push", &img], None)).await }
    });
    let t0 = upload_started(&rig).await;
    into_the_upload(t0, 4).await;
    rig.restart(0, ROLLING, Duration::ZERO);
    into_the_upload(t0, 14).await;
    rig.restart(1, ROLLING, Duration::ZERO);
    let out = pushing.await.unwrap();
    let took = started.elapsed();
    let c = config.path().to_owned();
    let img = image.clone();
    let _ = blocking(move || docker(&c, &["rmi", &img], None)).await;
    assert!(
        out.status.success(),
        "docker push failed: {}\n{}",
        text(&out),
        rig.logs()
    );
    assert!(
        took > Duration::from_secs(25),
        "the restarts must land mid-push: {took:?}"
    );
    assert_no_client_error(&out);
    rig.assert_retired_exit_cleanly(Duration::from_secs(90));
    // The manifest Docker pushed is there, through the link and a fresh replica.
    let (host, creds) = (rig.public, format!("{USER}:{PAT}"));
    let inspect = blocking(move || {
        skopeo(&[
            "inspect",
            "--tls-verify=false",
            "--creds",
            &creds,
            &format!("docker://{host}/ci/app:v1"),
        ])
    })
    .await;
    assert!(inspect.status.success(), "{}", text(&inspect));
    rig.assert_no_secrets();
    eprintln!("docker push across two rolling restarts took {took:?}");
}

/// Requests `GET /v2/` on new connections through the balancer for `window`; returns how many
/// got no answer from regrelay (regrelay answers 401 with its challenge; HAProxy's own answer
/// for a refused connection is 503).
async fn failures_during(lb: SocketAddr, window: Duration) -> (usize, usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let end = Instant::now() + window;
    let (mut sent, mut failed) = (0, 0);
    while Instant::now() < end {
        sent += 1;
        let answer = async {
            let mut s = tokio::net::TcpStream::connect(lb).await.ok()?;
            s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.ok()?;
            Some(String::from_utf8_lossy(&buf).into_owned())
        };
        let ok = tokio::time::timeout(Duration::from_secs(5), answer)
            .await
            .ok()
            .flatten()
            .is_some_and(|a| a.starts_with("HTTP/1.1 401"));
        if !ok {
            failed += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (sent, failed)
}

#[tokio::test(flavor = "multi_thread")]
async fn without_redispatch_the_shutdown_delay_keeps_clients_free_of_errors() {
    // Replica 1 starts without a delay: the control, which shows the balancer's errors.
    let no_delay: &[&str] = &["--shutdown-delay-secs", "0"];
    let mut rig = Rig::start([ROLLING, no_delay], false, Refused::Fail).await;
    let (_, failed) = failures_during(rig.lb.addr, Duration::from_millis(500)).await;
    assert_eq!(failed, 0, "both replicas up");
    // Control: no delay, the listener closes at once; HAProxy still sends requests there until
    // its next health check.
    // A replacement that takes a moment to come up, as a new pod or a restarted unit does.
    let gap = Duration::from_millis(800);
    let probe = tokio::spawn(failures_during(rig.lb.addr, Duration::from_millis(1500)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    rig.restart(1, ROLLING, gap);
    let (sent_control, failed_control) = probe.await.unwrap();
    // The new replica 1 is up and checked (two good checks 500 ms apart).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // With the delay: not ready first, still serving, then closed.
    let probe = tokio::spawn(failures_during(rig.lb.addr, Duration::from_millis(4500)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    rig.restart(0, ROLLING, gap);
    let (sent, failed) = probe.await.unwrap();
    eprintln!(
        "without redispatch: {failed_control}/{sent_control} failed with no shutdown delay, \
         {failed}/{sent} with a 3 s delay"
    );
    assert_eq!(
        failed,
        0,
        "{failed}/{sent} requests failed during a restart with the delay\n{}",
        rig.lb.output.text()
    );
    assert!(
        failed_control > 0,
        "the control (no delay) should show the balancer's errors: {failed_control}/{sent_control}"
    );
    rig.assert_retired_exit_cleanly(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_cut_at_the_drain_deadline_is_answered_and_retried_elsewhere() {
    // Replica 0 carries everything while it is up; its upload drain is 6 s.
    let short_drain: &[&str] = &["--shutdown-delay-secs", "3", "--upload-drain-secs", "6"];
    let mut rig = Rig::start([short_drain, ROLLING], true, Refused::Redispatch).await;
    let image = OciImage::random(143, &[30 << 20]);
    let started = Instant::now();
    let pushing = push(image.reference(), rig.public, 3);
    let t0 = upload_started(&rig).await;
    into_the_upload(t0, 3).await;
    let carrier = rig.replicas[0].take().unwrap();
    carrier.terminate();
    rig.retired.push(carrier);
    let out = pushing.await.unwrap();
    let took = started.elapsed();
    let logs = rig.logs();
    assert!(out.status.success(), "push failed: {}\n{logs}", text(&out));
    let said = text(&out);
    eprintln!("skopeo after the cut ({took:?}):\n{said}");
    assert!(
        logs.contains("upload cut"),
        "the carrier cut the upload at its deadline:\n{logs}"
    );
    let lower = said.to_lowercase();
    // skopeo's warning quotes regrelay's answer: BLOB_UPLOAD_INVALID, with why.
    assert!(lower.contains("retrying"), "{said}");
    assert!(
        lower.contains("blob upload invalid: this regrelay replica is shutting down"),
        "{said}"
    );
    for bad in ["reset by peer", "broken pipe", "unexpected eof"] {
        assert!(
            !lower.contains(bad),
            "the client saw {bad:?}, not an answer: {said}"
        );
    }
    rig.assert_retired_exit_cleanly(Duration::from_secs(20));
    rig.assert_pulls_back(&image).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_cut_at_the_drain_deadline_docker_pushes_the_layer_again_elsewhere() {
    if !docker_available() {
        return skip(
            "an_upload_cut_at_the_drain_deadline_docker_pushes_the_layer_again_elsewhere",
            "no Docker daemon (`docker info` fails)",
        );
    }
    let short_drain: &[&str] = &["--shutdown-delay-secs", "3", "--upload-drain-secs", "6"];
    let mut rig = Rig::start([short_drain, ROLLING], true, Refused::Redispatch).await;
    let config = tempfile::tempdir().unwrap();
    let image = format!("{}/ci/app:v1", rig.public);
    let (c, img) = (config.path().to_owned(), image.clone());
    let login = blocking(move || {
        docker_import_random(&c, &img, 30 << 20, 145);
        let host = &img[..img.find('/').unwrap()];
        docker(
            &c,
            &["login", host, "-u", USER, "--password-stdin"],
            Some(PAT),
        )
    })
    .await;
    assert!(login.status.success(), "{}", text(&login));
    let started = Instant::now();
    let pushing = tokio::spawn({
        let (c, img) = (config.path().to_owned(), image.clone());
        async move { blocking(move || docker(&c, &["push", &img], None)).await }
    });
    let t0 = upload_started(&rig).await;
    into_the_upload(t0, 3).await;
    let carrier = rig.replicas[0].take().unwrap();
    carrier.terminate();
    rig.retired.push(carrier);
    let out = pushing.await.unwrap();
    let (c, img) = (config.path().to_owned(), image.clone());
    let _ = blocking(move || docker(&c, &["rmi", &img], None)).await;
    let logs = rig.logs();
    assert!(
        out.status.success(),
        "docker push failed: {}\n{logs}",
        text(&out)
    );
    assert!(logs.contains("upload cut"), "{logs}");
    eprintln!(
        "docker after the cut ({:?}):\n{}",
        started.elapsed(),
        text(&out)
    );
    rig.assert_retired_exit_cleanly(Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_carrier_leaves_no_blob_and_the_retry_succeeds() {
    let mut rig = Rig::start([ROLLING, ROLLING], true, Refused::Redispatch).await;
    let image = OciImage::random(144, &[20 << 20]);
    let pushing = push(image.reference(), rig.public, 0);
    let t0 = upload_started(&rig).await;
    into_the_upload(t0, 3).await;
    let carrier = rig.replicas[0].take().unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &carrier.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = pushing.await.unwrap();
    let said = text(&out);
    eprintln!("skopeo when its carrier was SIGKILLed:\n{said}");
    assert!(
        carrier
            .output
            .text()
            .contains("method=POST path=/v2/ci/app/blobs/uploads/ status=202"),
        "the killed replica carried the upload:\n{}",
        carrier.output.text()
    );
    assert!(
        !out.status.success(),
        "the push cannot survive a SIGKILL: {said}\n{}",
        carrier.output.text()
    );
    // The registry holds nothing under the layer's digest.
    let layer = &image.layers[0].0;
    let token = fetch_token(&rig.gl.realm(), USER, PAT, "repository:ci/app:pull").await;
    let head = upstream::client()
        .request(
            http::Request::head(format!("{}/v2/ci/app/blobs/{layer}", rig.reg.url()))
                .header("authorization", format!("Bearer {token}"))
                .body(regrelay::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        head.status(),
        http::StatusCode::NOT_FOUND,
        "a partial blob is stored"
    );
    // The retry goes to the other replica and completes.
    let again = push(image.reference(), rig.public, 0).await.unwrap();
    assert!(
        again.status.success(),
        "retry failed: {}\n{}",
        text(&again),
        rig.logs()
    );
    rig.assert_pulls_back(&image).await;
    rig.retired.push(carrier);
    rig.assert_no_secrets();
}
