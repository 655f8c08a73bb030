//! A private containerd daemon (Debian's `containerd` 1.6 and its `ctr`) for tests that pull the
//! way nodes do: `hosts.toml` mirrors, `?ns=`, `override_path`, fallback to the next host.
//! Never the system service: its own `--root`, `--state`, socket and config in a temp dir, every
//! plugin a pull does not need disabled (no CRI, runtimes, tasks, cgroups monitor, differs, and no
//! snapshotter but `native`, which the metadata plugin needs one of).
//!
//! Pulls run `ctr content fetch`, not `ctr images pull`: both use the same resolver (hosts dir,
//! credentials) and fetcher and both record the image (`ctr images ls`), but `images pull` in 1.6
//! always unpacks into a snapshotter (no skip option), which needs overlayfs mounts (privileges)
//! or the native snapshotter plus a differ, and time; a fetch needs neither.
//!
//! containerd 1.6 ignores a `hosts.toml` without any `[host]` table ("failed to decode
//! hosts.toml: invalid `host` tree", containerd issue 10027, fixed in 1.7.x/2.x) and falls back
//! to its defaults (https to the registry name, or http for localhost). A `server`-only file
//! therefore needs a stub `[host]` line; [`Containerd::pull`] panics when ctr reports a hosts.toml
//! it could not decode, so that no test silently pulls around the hosts it configured.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{kill, require, Captured};

/// Plugins a pull needs: content store, metadata (bolt, which wants a snapshotter: `native`),
/// events, GC, leases, namespaces, images, introspection, version, healthcheck.
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.restart",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.runtime.v1.linux",
    "io.containerd.runtime.v2.task",
    "io.containerd.monitor.v1.cgroups",
    "io.containerd.service.v1.tasks-service",
    "io.containerd.grpc.v1.tasks",
    "io.containerd.service.v1.containers-service",
    "io.containerd.grpc.v1.containers",
    "io.containerd.service.v1.diff-service",
    "io.containerd.grpc.v1.diff",
    "io.containerd.differ.v1.walking",
];

/// The namespace every `ctr` call here uses.
pub const NAMESPACE: &str = "default";

/// A running private `containerd`; killed (and its directory removed) on drop.
pub struct Containerd {
    /// Its gRPC socket (`ctr --address`).
    pub socket: PathBuf,
    log: Captured,
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A temp dir short enough for unix sockets (108 bytes) even when TMPDIR is long.
fn short_tempdir() -> tempfile::TempDir {
    let base = std::env::temp_dir();
    let base = if base.as_os_str().len() > 60 {
        PathBuf::from("/tmp")
    } else {
        base
    };
    tempfile::Builder::new()
        .prefix("ctrd")
        .tempdir_in(base)
        .unwrap()
}

impl Containerd {
    /// Starts `containerd` with its own root, state, socket and config in a temp dir and waits
    /// (20 s at most) until `ctr version` answers; panics with its log otherwise.
    pub fn start() -> Containerd {
        require("containerd");
        require("ctr");
        let dir = short_tempdir();
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        let socket = dir.path().join("containerd.sock");
        let disabled = DISABLED_PLUGINS
            .iter()
            .map(|p| format!("  \"{p}\","))
            .collect::<Vec<_>>()
            .join("\n");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\n{disabled}\n]\n\n[grpc]\n  address = \"{socket}\"\n\n[ttrpc]\n  address = \"{socket}.ttrpc\"\n",
            root = root.display(),
            state = state.display(),
            socket = socket.display(),
        );
        let cfg_path = dir.path().join("config.toml");
        std::fs::write(&cfg_path, config).unwrap();
        let mut child = Command::new("containerd")
            .arg("--config")
            .arg(&cfg_path)
            .arg("--root")
            .arg(&root)
            .arg("--state")
            .arg(&state)
            .arg("--address")
            .arg(&socket)
            .args(["--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start containerd");
        let log = Captured::default();
        log.attach(child.stdout.take().unwrap());
        log.attach(child.stderr.take().unwrap());
        let mut ctrd = Containerd {
            socket,
            log,
            child,
            dir,
        };
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = ctrd.child.try_wait().unwrap() {
                panic!("containerd exited ({status}):\n{}", ctrd.log());
            }
            if ctrd.ctr(&["version"]).status.success() {
                break;
            }
            if Instant::now() > end {
                let log = ctrd.log();
                drop(ctrd);
                panic!("containerd did not answer `ctr version` within 20 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        ctrd
    }

    /// Runs `ctr --address SOCK --namespace default ARGS…` (never panics on failure). Proxy and
    /// `CONTAINERD_*` variables of the environment are removed.
    pub fn ctr(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("ctr");
        for var in [
            "CONTAINERD_ADDRESS",
            "CONTAINERD_NAMESPACE",
            "CONTAINERD_SNAPSHOTTER",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "NO_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "no_proxy",
        ] {
            cmd.env_remove(var);
        }
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    /// Pulls `image_ref` (content and image record, no unpack) with the registry hosts of
    /// `hosts_dir` and, when given, `user` = `USER:PASSWORD`:
    /// `ctr content fetch --hosts-dir DIR [--user USER:PASSWORD] REF`. No `--plain-http`: the
    /// scheme of every host comes from its `hosts.toml` URL. Returns ctr's output; panics only
    /// when ctr could not decode a `hosts.toml` (see the module documentation).
    pub fn pull(&self, image_ref: &str, hosts_dir: &Path, user: Option<&str>) -> Output {
        let dir = hosts_dir.display().to_string();
        let mut args = vec!["content", "fetch", "--hosts-dir", dir.as_str()];
        if let Some(user) = user {
            args.extend(["--user", user]);
        }
        args.push(image_ref);
        let out = self.ctr(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("failed to decode hosts.toml"),
            "ctr ignored a hosts.toml under {dir} (containerd 1.6 needs a `[host]` table even \
             when only `server` is set):\n{stderr}"
        );
        out
    }

    /// Image names in the daemon (`ctr images ls -q`).
    pub fn images(&self) -> Vec<String> {
        let out = self.ctr(&["images", "ls", "-q"]);
        assert!(out.status.success(), "{}", super::text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Digests in the content store (`ctr content ls -q`).
    pub fn content(&self) -> Vec<String> {
        let out = self.ctr(&["content", "ls", "-q"]);
        assert!(out.status.success(), "{}", super::text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Everything the daemon printed so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// The daemon's temp directory (root, state, socket, config).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A hosts directory for `ctr --hosts-dir`: `DIR/<registry host>/hosts.toml` for each
/// `(registry host, hosts.toml content)`, e.g. `("reg-b.test:5000", "server = …")`.
pub fn hosts_dir(entries: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (host, toml) in entries {
        let sub = dir.path().join(host);
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("hosts.toml"), toml).unwrap();
    }
    dir
}
