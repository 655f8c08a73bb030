//! deploy/systemd/regrelay.service and regrelay.toml, checked three ways:
//! - `systemd-analyze verify` accepts the unit with its paths pointing at the real binary, and
//!   prints nothing about it (an unknown or misspelt setting is only a warning there, exit 0);
//!   `systemd-analyze security --offline` rates its sandbox (when that verb is available);
//! - the unit, parsed here by hand, has the settings regrelay's deployment relies on: secrets
//!   through `LoadCredential=` (DynamicUser cannot read root-only files), the sandbox,
//!   `LimitNOFILE` covering the shipped config's bounds, `TimeoutStopSec` longer than its shutdown
//!   delay plus upload drain, and the upgrade in place: `Type=notify` with `NotifyAccess=all`,
//!   `ExecReload` = `regrelay upgrade` with `ExecStart`'s arguments, the upgrade socket in the
//!   unit's `RuntimeDirectory=`;
//! - every `ExecStartPre`/`ExecStart`/`ExecReload` command line runs as `regrelay check-config`
//!   with the unit's arguments, `Environment=` and credentials as systemd would hand them over,
//!   and the shipped regrelay.toml (its /etc/regrelay files replaced by temp files), so a flag
//!   typo or a key regrelay does not know fails here;
//! - `ExecStart` then `ExecReload` run as systemd would run them, with a `NOTIFY_SOCKET` read
//!   here: the first process says `READY=1`, the reload exits 0 once the new process serves, the
//!   new process says `MAINPID=` itself and `READY=1` while the reload runs, the old one exits.
//!
//! Without systemd-analyze (Debian's `systemd`, installed by scripts/install-deps) the verify
//! part is skipped, except under CI (env `CI` set), where it fails.

use crate::support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use regrelay::config::{Config, ConfigFile};

const INSTALLED_BIN: &str = "/usr/local/bin/regrelay";
const CONFIG_DIR: &str = "/etc/regrelay/";
/// The unit's `RuntimeDirectory=regrelay`.
const RUNTIME_DIR: &str = "/run/regrelay/";

fn deploy(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/systemd")
        .join(name)
}

/// A unit file: `(section, key, value)` in file order (keys may repeat).
struct Unit(Vec<(String, String, String)>);

impl Unit {
    /// Parses the ini-style syntax systemd reads: `[Section]`, `Key=Value`, `#`/`;` comments,
    /// blank lines, and a trailing backslash continuing a line.
    fn parse(text: &str) -> Unit {
        let mut entries = vec![];
        let mut section = String::new();
        let mut pending = String::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if pending.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
                continue;
            }
            if let Some(cont) = line.strip_suffix('\\') {
                pending.push_str(cont);
                pending.push(' ');
                continue;
            }
            let line = format!("{pending}{line}");
            pending.clear();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("line {}: not Key=Value: {raw:?}", n + 1));
            assert!(!section.is_empty(), "line {}: outside a section", n + 1);
            entries.push((
                section.clone(),
                key.trim().to_owned(),
                value.trim().to_owned(),
            ));
        }
        assert!(pending.is_empty(), "the file ends in a continuation line");
        Unit(entries)
    }

    /// Every value of `key` in `section`.
    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The one value of `key` in [Service].
    fn service(&self, key: &str) -> &str {
        let values = self.all("Service", key);
        assert_eq!(
            values.len(),
            1,
            "[Service] {key}=: want one, found {values:?}"
        );
        values[0]
    }

    /// `Environment=` assignments, in order.
    fn environment(&self) -> Vec<(String, String)> {
        self.all("Service", "Environment")
            .iter()
            .flat_map(|v| v.split_whitespace())
            .map(|kv| {
                assert!(
                    !kv.contains('"'),
                    "quoted Environment= is not handled here: {kv}"
                );
                let (k, v) = kv.split_once('=').expect("Environment=KEY=VALUE");
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    /// `LoadCredential=ID:PATH` pairs.
    fn credentials(&self) -> Vec<(String, String)> {
        self.all("Service", "LoadCredential")
            .iter()
            .map(|v| {
                let (id, path) = v.split_once(':').expect("LoadCredential=ID:PATH");
                (id.to_owned(), path.to_owned())
            })
            .collect()
    }
}

fn yes(v: &str) -> bool {
    matches!(v, "yes" | "true" | "on" | "1")
}

/// A unit time span in seconds (`960`, `960s`, `16min`, `1h`).
fn seconds(v: &str) -> u64 {
    let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits.parse().unwrap_or_else(|_| panic!("time span {v:?}"));
    match &v[digits.len()..] {
        "" | "s" | "sec" => n,
        "m" | "min" => n * 60,
        "h" => n * 3600,
        unit => panic!("time span {v:?}: unit {unit:?} not handled here"),
    }
}

fn text(out: &Output) -> String {
    support::text(out)
}

/// Runs `systemd-analyze ARGS…`; None when it is not installed.
fn systemd_analyze(args: &[&str]) -> Option<Output> {
    match Command::new("systemd-analyze").args(args).output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("run systemd-analyze: {e}"),
    }
}

/// A copy of unit `name` whose commands run the binary under test.
fn unit_for_this_build(dir: &Path, name: &str) -> PathBuf {
    let unit = std::fs::read_to_string(deploy(name)).unwrap();
    let bin = support::regrelay_bin();
    let rewritten: String = unit
        .lines()
        .map(|l| {
            if l.starts_with("Exec") {
                l.replace(INSTALLED_BIN, &bin.display().to_string())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = dir.join(name);
    std::fs::write(&path, rewritten + "\n").unwrap();
    path
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    const NAME: &str = "systemd_analyze_verifies_the_unit";
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_this_build(dir.path(), "regrelay.service");
    let socket = unit_for_this_build(dir.path(), "regrelay.socket");
    let unit_arg = unit.display().to_string();
    let socket_arg = socket.display().to_string();
    let Some(out) = systemd_analyze(&["verify", &unit_arg, &socket_arg]) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing under CI: scripts/install-deps installs Debian's systemd"
        );
        support::skip(
            NAME,
            "systemd-analyze is missing (Debian package `systemd`)",
        );
        return;
    };
    let said = text(&out);
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    // Unknown keys and unparsable values are warnings ("…, ignoring") with exit code 0.
    let about_unit: Vec<&str> = said.lines().filter(|l| l.contains("regrelay")).collect();
    assert!(
        about_unit.is_empty(),
        "systemd-analyze verify complains about the unit:\n{}",
        about_unit.join("\n")
    );

    // The sandbox, as systemd rates it (0 = locked down, 10 = fully exposed).
    match systemd_analyze(&["security", "--offline=true", &unit_arg]) {
        Some(out) if out.status.success() => {
            let said = text(&out);
            let line = said
                .lines()
                .find(|l| l.contains("Overall exposure level"))
                .unwrap_or_else(|| panic!("no overall exposure in: {said}"));
            let level: f64 = line
                .split(": ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("exposure in {line:?}"));
            assert!(level <= 2.5, "the sandbox loosened: {line}\n{said}");
        }
        _ => support::skip(
            &format!("{NAME} (security rating)"),
            "this systemd-analyze has no `security --offline`",
        ),
    }
}

#[test]
fn the_unit_has_credentials_sandbox_limits_and_an_upgrade_reload() {
    let unit = Unit::parse(&std::fs::read_to_string(deploy("regrelay.service")).unwrap());
    let svc = |k: &str| unit.service(k).to_owned();

    // Commands: the installed binary, validating before serving, with the same arguments.
    let pre = svc("ExecStartPre");
    let start = svc("ExecStart");
    let reload = svc("ExecReload");
    assert!(
        pre.starts_with(&format!("{INSTALLED_BIN} check-config ")),
        "{pre}"
    );
    assert!(
        start.starts_with(&format!("{INSTALLED_BIN} serve ")),
        "{start}"
    );
    let args = start.split_once(" serve ").unwrap().1;
    assert_eq!(
        pre.split_once(" check-config ").unwrap().1,
        args,
        "ExecStartPre checks what ExecStart serves"
    );
    // systemctl reload = the upgrade in place: the binary installed now takes the sockets over
    // from the running one, with the very arguments it was started with.
    assert_eq!(
        reload,
        format!("{INSTALLED_BIN} upgrade {args}"),
        "ExecReload upgrades in place"
    );
    let words: Vec<&str> = args.split_whitespace().collect();
    let socket = words
        .iter()
        .position(|w| *w == "--upgrade-socket")
        .map(|i| words[i + 1])
        .expect("ExecStart has --upgrade-socket");
    assert!(
        socket.starts_with(RUNTIME_DIR),
        "{socket}: in the unit's RuntimeDirectory= (writable under ProtectSystem=strict)"
    );
    assert_eq!(
        format!("/run/{}/", svc("RuntimeDirectory")),
        RUNTIME_DIR,
        "RuntimeDirectory= holds the upgrade socket"
    );
    assert_eq!(svc("RuntimeDirectoryMode"), "0700");
    // systemd follows the new process: it says MAINPID= and READY=1 itself.
    assert_eq!(svc("Type"), "notify");
    assert_eq!(svc("NotifyAccess"), "all");

    // Secrets: a dynamic user reads systemd's private copies, never the root-only originals.
    assert!(yes(&svc("DynamicUser")));
    let creds = unit.credentials();
    let env = unit.environment();
    let env_of = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    for (var, id) in [
        ("REGRELAY_SESSION_KEY_FILE", "session.keys"),
        ("REGRELAY_TLS_KEY", "tls.key"),
    ] {
        assert_eq!(env_of(var), Some(format!("%d/{id}")), "{var}");
        assert!(
            creds.iter().any(|(c, _)| c == id),
            "{var} names credential {id}, which no LoadCredential= loads: {creds:?}"
        );
    }
    for (id, path) in &creds {
        assert!(path.starts_with(CONFIG_DIR), "{id}: {path}");
    }
    for (k, v) in &env {
        if let Some(id) = v.strip_prefix("%d/") {
            assert!(creds.iter().any(|(c, _)| c == id), "{k}={v}: not loaded");
        }
    }
    // The settings file too: /etc/regrelay stays root-only (0700), so the dynamic user reads
    // nothing there itself.
    for command in [&pre, &start, &reload] {
        for word in command.split_whitespace().skip(1) {
            assert!(!word.contains(CONFIG_DIR), "{command}: reads {word} itself");
            if let Some(id) = word.strip_prefix("%d/") {
                assert!(
                    creds.iter().any(|(c, _)| c == id),
                    "{command}: {id} not loaded"
                );
            }
        }
    }

    // Privileges: port 443 and nothing else.
    assert_eq!(svc("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(svc("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    assert!(
        unit.all("Service", "User").is_empty(),
        "DynamicUser, no fixed user"
    );

    // The sandbox: only what regrelay tolerates (network, reading its files, writing nothing).
    for key in [
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ] {
        assert!(yes(&svc(key)), "{key}=yes");
    }
    assert_eq!(svc("ProtectSystem"), "strict");
    let families: BTreeSet<&str> = unit
        .service("RestrictAddressFamilies")
        .split_whitespace()
        .collect();
    assert_eq!(
        families,
        BTreeSet::from(["AF_INET", "AF_INET6", "AF_UNIX"]),
        "TCP, and AF_UNIX for the resolver (nscd, systemd-resolved)"
    );
    assert_eq!(svc("SystemCallArchitectures"), "native");
    let filters = unit.all("Service", "SystemCallFilter");
    assert!(filters.contains(&"@system-service"), "{filters:?}");
    for writable in [
        "ReadWritePaths",
        "StateDirectory",
        "CacheDirectory",
        "LogsDirectory",
    ] {
        assert!(
            unit.all("Service", writable).is_empty(),
            "regrelay writes nothing: {writable}"
        );
    }

    // Limits and stop timeout, against what the shipped configuration needs.
    let files = ConfigFiles::new();
    let config = Config::load(ConfigFile {
        config: Some(files.toml.clone()),
        ..ConfigFile::default()
    })
    .expect("the shipped regrelay.toml loads");
    let nofile: u64 = svc("LimitNOFILE")
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("LimitNOFILE=N");
    let needed = config.limits.fds_needed(config.upstreams.len());
    assert!(nofile >= needed, "LimitNOFILE={nofile} < {needed} needed");
    let t = &config.timeouts;
    let drain = t.shutdown_delay + t.upload_drain.max(t.shutdown_grace);
    let stop = Duration::from_secs(seconds(&svc("TimeoutStopSec")));
    assert!(
        stop > drain,
        "TimeoutStopSec {stop:?} must exceed shutdown delay + upload drain {drain:?}"
    );
    assert!(matches!(svc("KillSignal").as_str(), "SIGTERM" | "TERM"));
    assert_eq!(unit.all("Install", "WantedBy"), vec!["multi-user.target"]);
}

/// The shipped regrelay.toml with its /etc/regrelay files replaced by temp files, and a
/// credentials directory as systemd builds it from the unit's `LoadCredential=`.
struct ConfigFiles {
    dir: tempfile::TempDir,
    toml: PathBuf,
}

impl ConfigFiles {
    fn new() -> ConfigFiles {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc-regrelay");
        std::fs::create_dir(&etc).unwrap();
        let private = |name: &str, content: &[u8]| {
            let path = etc.join(name);
            std::fs::write(&path, content).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        std::fs::copy(support::cert("server.pem"), etc.join("tls.pem")).unwrap();
        // What the commented `upstream_ca` example names.
        std::fs::copy(support::cert("ca.pem"), etc.join("upstream-ca.pem")).unwrap();
        private(
            "tls.key",
            &std::fs::read(support::cert("server.key")).unwrap(),
        );
        private(
            "session.keys",
            format!("{}\n", STANDARD.encode([0x42u8; 32])).as_bytes(),
        );
        let shipped = std::fs::read_to_string(deploy("regrelay.toml")).unwrap();
        let toml = etc.join("regrelay.toml");
        std::fs::write(&toml, relocate(&shipped, &etc)).unwrap();
        ConfigFiles { dir, toml }
    }

    fn etc(&self) -> PathBuf {
        self.dir.path().join("etc-regrelay")
    }

    /// What systemd makes of `RuntimeDirectory=regrelay` (mode 0700), here.
    fn run(&self) -> PathBuf {
        let run = self.dir.path().join("run-regrelay");
        if !run.exists() {
            std::fs::create_dir(&run).unwrap();
            std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        run
    }

    /// `s` with /etc/regrelay/ and /run/regrelay/ replaced by their stand-ins here.
    fn relocate(&self, s: &str) -> String {
        relocate(s, &self.etc()).replace(RUNTIME_DIR, &format!("{}/", self.run().display()))
    }

    /// `$CREDENTIALS_DIRECTORY` with the credentials in `ids` (copies, mode 0400 like systemd's).
    fn credentials(&self, unit: &Unit, ids: &[&str]) -> PathBuf {
        let creds = self
            .dir
            .path()
            .join(format!("credentials-{}", ids.join("-")));
        std::fs::create_dir(&creds).unwrap();
        for (id, path) in unit.credentials() {
            if ids.contains(&id.as_str()) {
                let dest = creds.join(&id);
                std::fs::copy(relocate(&path, &self.etc()), &dest).unwrap();
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o400)).unwrap();
            }
        }
        creds
    }
}

/// Replaces /etc/regrelay/ in paths by `etc`.
fn relocate(s: &str, etc: &Path) -> String {
    s.replace(CONFIG_DIR, &format!("{}/", etc.display()))
}

/// Runs a unit command line as `regrelay check-config`: the binary under test, the unit's own
/// arguments and environment with `%d` = `creds` (and /etc/regrelay/ relocated).
fn check_config_as_unit(command: &str, unit: &Unit, files: &ConfigFiles, creds: &Path) -> Output {
    let mut cmd = as_unit(command, Some("check-config"), unit, files, creds);
    cmd.output().expect("run regrelay check-config")
}

/// A unit command line as systemd would run it: the binary under test, the unit's own arguments
/// (config and runtime paths relocated), the unit's environment with `%d` = `creds`; with
/// `sub`, another subcommand than the line's.
fn as_unit(
    command: &str,
    sub: Option<&str>,
    unit: &Unit,
    files: &ConfigFiles,
    creds: &Path,
) -> Command {
    assert!(
        !command.contains(['"', '\'', '$']),
        "quoting and variables are not handled here: {command}"
    );
    let mut words = command.split_whitespace();
    assert_eq!(words.next(), Some(INSTALLED_BIN), "{command}");
    let own = words.next().expect("a subcommand");
    assert!(
        matches!(own, "serve" | "check-config" | "upgrade"),
        "{command}"
    );
    let mut cmd = Command::new(support::regrelay_bin());
    cmd.arg(sub.unwrap_or(own));
    let creds_dir = creds.display().to_string();
    cmd.args(words.map(|w| files.relocate(&w.replace("%d", &creds_dir))));
    for (k, _) in std::env::vars() {
        if k.starts_with("REGRELAY_") || k == "NOTIFY_SOCKET" {
            cmd.env_remove(k);
        }
    }
    for (k, v) in unit.environment() {
        assert!(
            !v.replace("%d", "").contains('%'),
            "specifier not handled here: {k}={v}"
        );
        cmd.env(k, v.replace("%d", &creds.display().to_string()));
    }
    cmd
}

#[test]
fn the_units_command_lines_pass_check_config_with_the_shipped_toml() {
    let unit = Unit::parse(&std::fs::read_to_string(deploy("regrelay.service")).unwrap());
    let files = ConfigFiles::new();
    let creds = files.credentials(
        &unit,
        &["regrelay.toml", "tls.pem", "tls.key", "session.keys"],
    );
    for key in ["ExecStartPre", "ExecStart", "ExecReload"] {
        let command = unit.service(key);
        let out = check_config_as_unit(command, &unit, &files, &creds);
        assert!(
            out.status.success(),
            "{key}={command} as check-config: {}",
            text(&out)
        );
        assert!(
            text(&out).contains("config ok: listen 0.0.0.0:443"),
            "{}",
            text(&out)
        );
    }

    // The credentials are what it reads: without the session key credential it refuses to
    // start, though the TOML's own session_key_file exists.
    let partial = files.credentials(&unit, &["regrelay.toml", "tls.pem", "tls.key"]);
    let out = check_config_as_unit(unit.service("ExecStartPre"), &unit, &files, &partial);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("session_key_file"), "{}", text(&out));
}

#[test]
fn the_unit_parser_reads_what_systemd_reads() {
    let unit =
        Unit::parse("# c\n[Service]\n; c\nA=1\nB=x \\\n  y\nA=2\n\n[Install]\nWantedBy=m.target\n");
    assert_eq!(unit.all("Service", "A"), vec!["1", "2"]);
    assert_eq!(unit.service("B"), "x  y");
    assert_eq!(unit.all("Install", "WantedBy"), vec!["m.target"]);
    assert_eq!(seconds("960"), 960);
    assert_eq!(seconds("16min"), 960);
}

/// A commented `key = value` line of the example TOML: the line without its `#`, when what
/// follows the `#` is one TOML key-value pair (prose comments do not parse as TOML).
fn commented_example(line: &str) -> Option<String> {
    let rest = line.trim_start().strip_prefix('#')?.trim_start();
    let table: toml::Table = toml::from_str(rest).ok()?;
    (table.len() == 1).then(|| rest.to_owned())
}

/// Every commented example of the shipped regrelay.toml is accepted by the real binary once
/// uncommented, one at a time (issue 23: `auth_redirect_allow = ["gitlab.example.com"]` was
/// refused for want of a scheme). check-config refuses unknown keys and bad values, so a typo'd
/// or stale example fails here.
#[test]
fn every_commented_example_of_the_toml_passes_check_config_uncommented() {
    let shipped = std::fs::read_to_string(deploy("regrelay.toml")).unwrap();
    let files = ConfigFiles::new();
    let lines: Vec<&str> = shipped.lines().collect();
    let mut tried = vec![];
    for (i, line) in lines.iter().enumerate() {
        let Some(example) = commented_example(line) else {
            continue;
        };
        let mut edited: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
        edited[i] = example.clone();
        let toml = files.etc().join(format!("example-{i}.toml"));
        std::fs::write(&toml, relocate(&(edited.join("\n") + "\n"), &files.etc())).unwrap();
        let mut cmd = Command::new(support::regrelay_bin());
        cmd.args(["check-config", "--config"]).arg(&toml);
        for (k, _) in std::env::vars() {
            if k.starts_with("REGRELAY_") {
                cmd.env_remove(k);
            }
        }
        let out = cmd.output().expect("run regrelay check-config");
        assert!(
            out.status.success(),
            "regrelay.toml line {}, uncommented: `{example}`: {}",
            i + 1,
            text(&out)
        );
        tried.push(example);
    }
    assert!(
        tried.iter().any(|e| e.starts_with("auth_redirect_allow")) && tried.len() >= 5,
        "the examples were not found: {tried:?}"
    );
}

/// systemd's end of `Type=notify`: the datagrams sent to `NOTIFY_SOCKET`.
struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        NotifySocket { socket, path }
    }

    /// The next message: it must say `READY=1`; returns its `MAINPID=`.
    fn ready(&self) -> u32 {
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).expect("a READY=1 message");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
        msg.lines()
            .find_map(|l| l.strip_prefix("MAINPID="))
            .unwrap_or_else(|| panic!("no MAINPID= in {msg:?}"))
            .parse()
            .unwrap()
    }
}

/// Runs `cmd` with its output captured (by reader threads: a process it starts may keep the
/// pipes open).
fn spawn_captured(cmd: &mut Command) -> (std::process::Child, support::Captured) {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = support::Captured::default();
    out.attach(child.stdout.take().unwrap());
    out.attach(child.stderr.take().unwrap());
    (child, out)
}

fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let end = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < end, "no exit within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True while `pid` runs (a zombie has exited).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(") ").next().unwrap_or("").starts_with('Z'))
        .unwrap_or(false)
}

fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status();
}

/// Ends a process this test started (directly or through `regrelay upgrade`) if it still runs
/// when the test ends, failed assertions included.
struct EndOnDrop(u32);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        if running(self.0) {
            kill(self.0, "KILL");
        }
    }
}

#[test]
fn systemctl_reload_upgrades_in_place_and_systemd_follows_the_new_process() {
    let unit = Unit::parse(&std::fs::read_to_string(deploy("regrelay.service")).unwrap());
    let files = ConfigFiles::new();
    let creds = files.credentials(
        &unit,
        &["regrelay.toml", "tls.pem", "tls.key", "session.keys"],
    );
    let notify = NotifySocket::bind(files.dir.path());
    // As systemd would: the unit's command lines and environment, plus NOTIFY_SOCKET. Port 443
    // of the shipped regrelay.toml becomes an ephemeral one (the environment overrides it).
    let as_systemd = |key: &str| {
        let mut cmd = as_unit(unit.service(key), None, &unit, &files, &creds);
        cmd.env("NOTIFY_SOCKET", &notify.path)
            .env("REGRELAY_LISTEN", "127.0.0.1:0");
        cmd
    };
    let (mut a, out_a) = spawn_captured(&mut as_systemd("ExecStart"));
    let _a = EndOnDrop(a.id());
    assert_eq!(notify.ready(), a.id(), "ExecStart's process is ready");
    let listening = out_a
        .wait_for("\"message\":\"listening\"", Duration::from_secs(5))
        .expect("a listening line");
    let line: serde_json::Value = serde_json::from_str(&listening).unwrap();
    let addr: std::net::SocketAddr = line["addr"].as_str().unwrap().parse().unwrap();
    let socket = files.run().join("upgrade.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", socket.display());

    // systemctl reload regrelay.
    let (mut reload, out_reload) = spawn_captured(&mut as_systemd("ExecReload"));
    let status = wait_exit(&mut reload, Duration::from_secs(30));
    let said = out_reload.settled();
    assert!(status.success(), "ExecReload: {status:?}\n{said}");
    // The new process said MAINPID= while the reload ran (systemd takes a new main pid then).
    let b = notify.ready();
    let _b = EndOnDrop(b);
    assert!(b != a.id() && running(b), "MAINPID={b}\n{said}");
    assert!(
        said.contains(&format!("pid {b} took over from pid {}", a.id())),
        "{said}"
    );
    assert!(
        said.contains(&format!("\"took_over_from\":{}", a.id())),
        "the new process's listening line: {said}"
    );
    let old = wait_exit(&mut a, Duration::from_secs(30));
    assert!(old.success(), "{old:?}\n{}", out_a.text());
    assert!(out_a.text().contains("handed over"), "{}", out_a.text());
    std::net::TcpStream::connect(addr).expect("the port stays open: the new process has it");

    // The new process stops like the old would: SIGTERM, then a second one ends the delay.
    kill(b, "TERM");
    assert!(out_reload
        .wait_for("shutting down", Duration::from_secs(5))
        .is_some());
    kill(b, "TERM");
    let end = std::time::Instant::now() + Duration::from_secs(15);
    while running(b) {
        assert!(std::time::Instant::now() < end, "pid {b} still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}
