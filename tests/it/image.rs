//! The container image (deploy/Dockerfile), built and run for real by the local Docker daemon.
//!
//! No image can be pulled here (nor in CI), so `FROM rust:1-bookworm` cannot be built. The test
//! therefore runs deploy/image-rootfs.sh on the debug binary into a build context and derives a
//! Dockerfile from deploy/Dockerfile by replacing ONLY its `build` stage with
//! `FROM scratch AS build` + `COPY rootfs /rootfs`: the final stage, the one that ships (user,
//! exposed port, healthcheck, entrypoint, command), is built exactly as written there.
//!
//! The container runs with `--network host` (read-only root, no capabilities, no new
//! privileges) in front of a real registry and the GitLab stand-in on 127.0.0.1, with the
//! session key file bind-mounted read-only. Checked: the image's config and file tree (no shell,
//! /tmp 1777, nonroot in /etc/passwd), the shipped HEALTHCHECK turning the container healthy,
//! `regrelay healthcheck` by `docker exec`, a skopeo push and pull through it (same digests),
//! uid/gid 65532 without capabilities, and `docker stop` (SIGTERM) ending it with exit code 0.
//! It listens on 127.0.0.1:5000, the port the shipped HEALTHCHECK probes (`docker run
//! --health-cmd` is shell form, so no other probe fits an image without a shell); where that port
//! is taken, on an ephemeral port with `--no-healthcheck`, and the health status part is a SKIP.
//! A guard removes the container and the images however the test ends.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use support::gitlab::with_developer_pat;
use support::*;

const NAME: &str = "image_builds_runs_serves_and_stops_as_nonroot";
const USER: &str = "dana";
const PAT: &str = "glpat-Vt4mRw8XqLc2NzHp6KsJ";
/// The port the shipped HEALTHCHECK probes (`regrelay healthcheck`'s default URL).
const HEALTHCHECK_PORT: u16 = 5000;
/// Where the container finds the session key file.
const KEY_IN_CONTAINER: &str = "/run/secrets/regrelay-session.keys";
const NONROOT: u32 = 65532;

/// The Dockerfile the test builds: deploy/Dockerfile with only its `build` stage replaced by the
/// prebuilt root filesystem in the context's `rootfs/`. `label` marks the build stage's image
/// (the legacy builder keeps it as an untagged image) so that the guard can remove it.
fn derive_dockerfile(real: &str, label: &str) -> String {
    let lines: Vec<&str> = real.lines().collect();
    let froms: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        froms.len(),
        2,
        "deploy/Dockerfile: want two stages (`build`, then the final one): {froms:?}"
    );
    let build_from = lines[froms[0]].trim().to_ascii_lowercase();
    assert!(
        build_from.ends_with(" as build"),
        "deploy/Dockerfile: the first stage must be named `build`: {build_from:?}"
    );
    let build_stage = lines[froms[0]..froms[1]].join("\n");
    assert!(
        build_stage.contains("deploy/image-rootfs.sh") && build_stage.contains(" /rootfs"),
        "deploy/Dockerfile: the build stage must assemble /rootfs with deploy/image-rootfs.sh, \
         which is what this test replaces it by:\n{build_stage}"
    );
    let final_stage = lines[froms[1]..].join("\n");
    assert_eq!(
        lines[froms[1]].trim().to_ascii_lowercase(),
        "from scratch",
        "deploy/Dockerfile: the final stage must be FROM scratch"
    );
    assert!(
        final_stage.contains("COPY --from=build /rootfs /"),
        "{final_stage}"
    );
    format!(
        "{head}\n# tests/it/image.rs: the build stage, replaced by the prebuilt root filesystem.\n\
         FROM scratch AS build\nLABEL regrelay.image-test={label}\nCOPY rootfs /rootfs\n\n\
         {final_stage}\n",
        head = lines[..froms[0]].join("\n"),
    )
}

/// Runs docker with a private config; removes the container and images on drop.
struct Guard {
    config: tempfile::TempDir,
    tag: String,
    label: String,
    container: Option<String>,
}

impl Guard {
    fn docker(&self, args: &[&str]) -> Output {
        docker(self.config.path(), args, None)
    }

    /// `docker ARGS…`, which must succeed; its stdout, trimmed.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(out.status.success(), "docker {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn logs(&self) -> String {
        match &self.container {
            Some(c) => text(&self.docker(&["logs", c])),
            None => String::new(),
        }
    }

    /// `docker inspect` of the container, as JSON.
    fn state(&self) -> serde_json::Value {
        let c = self.container.as_deref().expect("a container");
        serde_json::from_str(&self.ok(&["inspect", "--format", "{{json .State}}", c])).unwrap()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = self.container.take() {
            if std::thread::panicking() {
                eprintln!("container log:\n{}", text(&self.docker(&["logs", &c])));
            }
            let _ = self.docker(&["rm", "--force", "--volumes", &c]);
        }
        let _ = self.docker(&["rmi", "--force", &self.tag]);
        let filter = format!("label=regrelay.image-test={}", self.label);
        let ids = self.docker(&["image", "ls", "--all", "--quiet", "--filter", &filter]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker(&["rmi", "--force", id]);
        }
    }
}

/// A port for the container: the HEALTHCHECK's when free, else an ephemeral one.
fn pick_port() -> u16 {
    if TcpListener::bind(("127.0.0.1", HEALTHCHECK_PORT)).is_ok() {
        return HEALTHCHECK_PORT;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn running_as_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("run id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// One entry of the image's file tree.
struct FileEntry {
    mode: u32,
    uid: u64,
    size: u64,
    content: Option<String>,
}

/// The final image's files (all layers, later ones win), from `docker save`.
fn image_files(guard: &Guard) -> std::collections::BTreeMap<String, FileEntry> {
    let mut child = Command::new("docker")
        .args(["save", &guard.tag])
        .env("DOCKER_CONFIG", guard.config.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker save");
    let mut files = std::collections::BTreeMap::new();
    let mut outer = tar::Archive::new(child.stdout.take().unwrap());
    for entry in outer.entries().unwrap() {
        let entry = entry.unwrap();
        let path = entry.path().unwrap().display().to_string();
        if !path.ends_with("layer.tar") {
            continue;
        }
        let mut layer = tar::Archive::new(entry);
        for file in layer.entries().unwrap() {
            let mut file = file.unwrap();
            let name = file.path().unwrap().display().to_string();
            let name = name
                .trim_start_matches("./")
                .trim_end_matches('/')
                .to_owned();
            let header = file.header();
            let (mode, uid, size) = (
                header.mode().unwrap(),
                header.uid().unwrap(),
                header.size().unwrap(),
            );
            let content = if name.starts_with("etc/") && size < 4096 {
                let mut s = String::new();
                file.read_to_string(&mut s).ok().map(|_| s)
            } else {
                None
            };
            files.insert(
                name,
                FileEntry {
                    mode,
                    uid,
                    size,
                    content,
                },
            );
        }
    }
    let status = child.wait_with_output().unwrap();
    assert!(status.status.success(), "docker save: {}", text(&status));
    files
}

/// Waits until the container's HEALTHCHECK reports `healthy`; fails if it stops or turns
/// unhealthy.
fn wait_healthy(guard: &Guard, timeout: Duration) {
    let end = Instant::now() + timeout;
    loop {
        let state = guard.state();
        assert_eq!(
            state["Status"],
            "running",
            "the container stopped: {state}\n{}",
            guard.logs()
        );
        match state["Health"]["Status"].as_str() {
            Some("healthy") => return,
            Some("unhealthy") => panic!("the container is unhealthy: {state}\n{}", guard.logs()),
            _ => {}
        }
        assert!(
            Instant::now() < end,
            "not healthy within {timeout:?}: {state}\n{}",
            guard.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The part of the test that talks to Docker (blocking).
fn build_run_and_check(registry: String) {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let unique = format!(
        "{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let mut guard = Guard {
        config: tempfile::tempdir().unwrap(),
        tag: format!("regrelay-image-test:{unique}"),
        label: unique.clone(),
        container: None,
    };

    // The build context: the root filesystem deploy/image-rootfs.sh makes of the debug binary.
    let ctx = tempfile::tempdir().unwrap();
    let script = manifest_dir.join("deploy/image-rootfs.sh");
    let rootfs = Command::new("sh")
        .arg(&script)
        .arg(regrelay_bin())
        .arg(ctx.path().join("rootfs"))
        .output()
        .expect("run deploy/image-rootfs.sh");
    assert!(
        rootfs.status.success(),
        "deploy/image-rootfs.sh: {}",
        text(&rootfs)
    );
    let real = std::fs::read_to_string(manifest_dir.join("deploy/Dockerfile")).unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        derive_dockerfile(&real, &guard.label),
    )
    .unwrap();
    let started = Instant::now();
    let ctx_path = ctx.path().display().to_string();
    guard.ok(&["build", "--tag", &guard.tag, &ctx_path]);
    eprintln!("docker build: {:.1} s", started.elapsed().as_secs_f64());
    drop(ctx);

    // The image's config: what `docker run IMAGE` does without flags.
    let config: serde_json::Value = serde_json::from_str(&guard.ok(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config}}",
        &guard.tag,
    ]))
    .unwrap();
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/regrelay"])
    );
    assert_eq!(config["Cmd"], serde_json::json!(["serve"]));
    assert_eq!(
        config["Healthcheck"]["Test"],
        serde_json::json!(["CMD", "/usr/local/bin/regrelay", "healthcheck"]),
        "exec form: the image has no shell"
    );
    assert!(config["ExposedPorts"].get("5000/tcp").is_some(), "{config}");
    let size = guard.ok(&["image", "inspect", "--format", "{{.Size}}", &guard.tag]);
    eprintln!("image size: {size} bytes (debug binary)");

    // Its file tree: distroless, owned by root, nonroot defined, /tmp sticky and open.
    let files = image_files(&guard);
    let names: Vec<&String> = files.keys().collect();
    for path in [
        "usr/local/bin/regrelay",
        "etc/ssl/certs/ca-certificates.crt",
        "etc/passwd",
        "etc/group",
        "etc/nsswitch.conf",
        "tmp",
    ] {
        assert!(files.contains_key(path), "{path} missing from {names:?}");
    }
    for shell in ["bin/sh", "bin/bash", "usr/bin/sh", "bin/busybox"] {
        assert!(!files.contains_key(shell), "{shell} in the image");
    }
    assert!(
        files.keys().any(|p| p.contains("ld-linux")),
        "no dynamic loader in {names:?}"
    );
    assert_eq!(files["tmp"].mode & 0o7777, 0o1777, "/tmp mode");
    assert_eq!(files["usr/local/bin/regrelay"].mode & 0o777, 0o755);
    assert!(files["etc/ssl/certs/ca-certificates.crt"].size > 1000);
    for (path, f) in &files {
        assert_eq!(f.uid, 0, "{path} is not owned by root");
    }
    let text_of = |p: &str| files[p].content.clone().unwrap_or_default();
    assert!(text_of("etc/passwd").contains("nonroot:x:65532:65532:"));
    assert!(text_of("etc/group").contains("nonroot:x:65532:"));
    assert!(text_of("etc/nsswitch.conf").contains("hosts: files dns"));

    // The session key file: 0600, owned by the container's user (chown needs root here).
    let keys_dir = tempfile::tempdir().unwrap();
    let keys = keys_dir.path().join("session.keys");
    let mut key_args: Vec<String> = vec![];
    let mut mount: Vec<String> = vec![];
    if running_as_root() {
        let mut f = std::fs::File::create(&keys).unwrap();
        writeln!(f, "{}", STANDARD.encode([0x3cu8; 32])).unwrap();
        drop(f);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&keys, Some(NONROOT), Some(NONROOT)).unwrap();
        mount = vec![
            "--mount".into(),
            format!(
                "type=bind,source={},target={KEY_IN_CONTAINER},readonly",
                keys.display()
            ),
        ];
        key_args = vec!["--session-key-file".into(), KEY_IN_CONTAINER.into()];
    } else {
        support::skip(
            &format!("{NAME} (session key file)"),
            "not root: cannot chown the key file to 65532, running without --session-key-file",
        );
    }

    // Run it: host network (the registry and the GitLab stand-in are on 127.0.0.1), hardened.
    let port = pick_port();
    let listen = format!("127.0.0.1:{port}");
    let name = format!("regrelay-image-test-{unique}");
    let mut run: Vec<String> = [
        "run",
        "--detach",
        "--name",
        &name,
        "--network",
        "host",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // The shipped HEALTHCHECK, only faster; off when its port is another program's.
    let health: &[&str] = if port == HEALTHCHECK_PORT {
        &[
            "--health-interval",
            "1s",
            "--health-timeout",
            "5s",
            "--health-retries",
            "3",
            "--health-start-period",
            "0s",
        ]
    } else {
        &["--no-healthcheck"]
    };
    run.extend(health.iter().map(|s| s.to_string()));
    run.extend(mount);
    run.extend([
        guard.tag.clone(),
        "serve".into(),
        "--listen".into(),
        listen.clone(),
        "--registry".into(),
        registry,
    ]);
    run.extend(key_args.clone());
    let run: Vec<&str> = run.iter().map(String::as_str).collect();
    let id = guard.ok(&run);
    guard.container = Some(id.clone());

    if port == HEALTHCHECK_PORT {
        let started = Instant::now();
        wait_healthy(&guard, Duration::from_secs(60));
        eprintln!("healthy after {:.1} s", started.elapsed().as_secs_f64());
    } else {
        support::skip(
            &format!("{NAME} (HEALTHCHECK status)"),
            &format!(
                "127.0.0.1:{HEALTHCHECK_PORT} is in use here, so the shipped HEALTHCHECK (which \
                 probes it) cannot pass: run with --no-healthcheck on {listen}, probed by \
                 docker exec only"
            ),
        );
    }
    // Readiness (upstream reachable) by exec: the image needs no shell or curl for probes.
    let ready_url = format!("http://{listen}/-/ready");
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let probe = guard.docker(&[
            "exec",
            &id,
            "/usr/local/bin/regrelay",
            "healthcheck",
            "--url",
            &ready_url,
        ]);
        if probe.status.success() {
            break;
        }
        assert!(
            Instant::now() < end,
            "{ready_url} not ready: {}\n{}",
            text(&probe),
            guard.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let refused = guard.docker(&[
        "exec",
        &id,
        "/usr/local/bin/regrelay",
        "healthcheck",
        "--url",
        "http://127.0.0.1:1/-/healthy",
    ]);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "healthcheck of a closed port: {}",
        text(&refused)
    );

    // A push through the container and the pull back: same blobs, same manifest digest.
    let image = OciImage::random(23, &[1 << 20, 3 << 20]);
    let creds = format!("{USER}:{PAT}");
    let dest = format!("docker://{listen}/group/project/app:v1");
    let push = skopeo_copy(&image.reference(), &dest, &creds, &Transport::Http);
    assert!(
        push.status.success(),
        "push: {}\n{}",
        text(&push),
        guard.logs()
    );
    let pulled = tempfile::tempdir().unwrap();
    let pulled_ref = format!("oci:{}:latest", pulled.path().display());
    let pull = skopeo_copy(&dest, &pulled_ref, &creds, &Transport::Http);
    assert!(
        pull.status.success(),
        "pull: {}\n{}",
        text(&pull),
        guard.logs()
    );
    assert_same_blobs(&image, pulled.path());
    let inspect = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--creds",
        &creds,
        &dest,
    ]);
    assert!(inspect.status.success(), "{}", text(&inspect));
    assert_eq!(digest(&inspect.stdout), image.manifest_digest);

    // Who it runs as: the image's user, no capabilities, no new privileges.
    let state = guard.state();
    let pid = state["Pid"].as_u64().expect("container pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> Vec<String> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"));
        line.split_whitespace().skip(1).map(str::to_owned).collect()
    };
    assert_eq!(field("Uid:"), vec!["65532"; 4], "{status}");
    assert_eq!(field("Gid:"), vec!["65532"; 4], "{status}");
    assert_eq!(field("CapEff:"), vec!["0000000000000000"], "{status}");
    assert_eq!(field("NoNewPrivs:"), vec!["1"], "{status}");
    let top = guard.ok(&["top", &id, "-o", "pid,uid,gid,comm"]);
    assert!(
        top.lines().skip(1).any(
            |l| l.split_whitespace().collect::<Vec<_>>()[1..] == ["65532", "65532", "regrelay"]
        ),
        "docker top: {top}"
    );
    let user = guard.ok(&["inspect", "--format", "{{.Config.User}}", &id]);
    assert_eq!(user, "65532:65532");

    let logs = guard.logs();
    assert!(logs.contains(&format!("listening addr={listen}")), "{logs}");
    if !key_args.is_empty() {
        assert!(
            !logs.contains("no --session-key-file"),
            "the mounted key file was not used:\n{logs}"
        );
    }

    // SIGTERM (docker stop): the phased shutdown ends with exit code 0 well before the timeout.
    let started = Instant::now();
    guard.ok(&["stop", "--time", "60", &id]);
    let stopped = started.elapsed();
    eprintln!("docker stop: {:.1} s", stopped.as_secs_f64());
    let state = guard.state();
    assert_eq!(state["ExitCode"], 0, "{state}\n{}", guard.logs());
    assert!(stopped < Duration::from_secs(55), "{stopped:?}: killed?");
    let logs = guard.logs();
    assert!(logs.contains("signal=\"SIGTERM\""), "{logs}");
    assert!(logs.contains("drained"), "{logs}");
    assert_no_secrets(&logs, USER, &[PAT.to_owned()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn image_builds_runs_serves_and_stops_as_nonroot() {
    if !docker_available() {
        support::skip(NAME, "no Docker daemon (`docker info` failed)");
        return;
    }
    let gl = with_developer_pat(USER, PAT, "group/project", Duration::from_secs(300)).await;
    let reg = Registry::start(&gl.realm());
    let registry = reg.url();
    tokio::task::spawn_blocking(move || build_run_and_check(registry))
        .await
        .unwrap();
    assert!(gl.mints() > 0, "tokens came from the GitLab stand-in");
    drop(reg);
}
