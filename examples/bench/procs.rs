//! The fronts as processes: regrelay, and the peers (nginx, HAProxy, Caddy) configured from the
//! templates in `bench/peers/`; each on free 127.0.0.1 ports, logs in a temp dir, stopped on drop
//! (so also when the bench fails or is interrupted). Plus what /proc says about them: CPU
//! seconds (utime+stime) and peak RSS (VmHWM) of a process and its descendants.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A started process (the root of its tree); SIGTERM, then SIGKILL after a grace, on drop.
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (does not wait).
    fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
    }

    /// Sends SIGTERM and waits up to `grace` for the exit (then kills).
    pub fn stop_within(mut self, grace: Duration) {
        self.terminate();
        self.reap(grace);
    }

    /// Waits up to `grace` for the exit, then kills.
    fn reap(&mut self, grace: Duration) {
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate();
        self.reap(Duration::from_secs(5));
    }
}

/// Stops all of `procs` at once: SIGTERM to every one first, then each is reaped as it drops.
pub fn stop_all(procs: Vec<Proc>) {
    for p in &procs {
        p.terminate();
    }
    drop(procs);
}

/// An address whose port was free a moment ago (the peers cannot bind port 0 and tell).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// True when `program` is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The first line `program ARGS` prints (stdout or stderr), for the report.
pub fn version(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|_| "missing".into())
}

/// Spawns `cmd` (output to `dir/<name>.log`) and waits until every one of `ports` accepts.
fn spawn_listening(
    name: &str,
    mut cmd: Command,
    dir: &Path,
    ports: &[SocketAddr],
) -> Result<Proc, String> {
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{name}: cannot start: {e}"))?;
    let mut proc = Proc { child };
    let end = Instant::now() + Duration::from_secs(20);
    for addr in ports {
        while std::net::TcpStream::connect(addr).is_err() {
            let exited = proc.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > end {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!(
                    "{name} did not listen on {addr} ({}):\n{}",
                    exited.map_or("timeout".into(), |s| s.to_string()),
                    tail(&log, 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(proc)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Starts `regrelay serve` on a free port in front of `registry`, with `extra` flags; output
/// goes to a log file (regrelay's default log level: one access line per request, like the
/// peers' access logs).
pub fn regrelay(
    bin: &Path,
    name: &str,
    dir: &Path,
    registry: &str,
    extra: &[&str],
) -> Result<(Proc, SocketAddr), String> {
    regrelay_under(&[], bin, name, dir, registry, extra)
}

/// Like [`regrelay`], run as `WRAPPER… regrelay serve …` (e.g. under valgrind).
pub fn regrelay_under(
    wrapper: &[String],
    bin: &Path,
    name: &str,
    dir: &Path,
    registry: &str,
    extra: &[&str],
) -> Result<(Proc, SocketAddr), String> {
    let addr = free_addr();
    let mut cmd = wrapped(wrapper, bin);
    cmd.args([
        "serve",
        "--listen",
        &addr.to_string(),
        "--registry",
        registry,
    ])
    .args(["--shutdown-delay-secs", "0", "--shutdown-grace-secs", "1"])
    .args(extra)
    .env_remove("REGRELAY_LOG");
    Ok((spawn_listening(name, cmd, dir, &[addr])?, addr))
}

/// `WRAPPER… PROGRAM` (or PROGRAM alone).
fn wrapped(wrapper: &[String], program: impl AsRef<std::ffi::OsStr>) -> Command {
    match wrapper.split_first() {
        Some((first, rest)) => {
            let mut cmd = Command::new(first);
            cmd.args(rest).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// The bench's bare hyper forwarder (`examples/bare_forwarder.rs`, built beside the bench) on a
/// free port in front of `origin`: `model` `multi` (a work-stealing runtime of `workers`
/// threads) or `per-core` (`workers` current-thread runtimes on `SO_REUSEPORT` listeners).
pub fn bare_forwarder(
    wrapper: &[String],
    dir: &Path,
    origin: SocketAddr,
    model: &str,
    workers: usize,
) -> Result<(Proc, SocketAddr), String> {
    let bin = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .with_file_name("bare_forwarder");
    if !bin.is_file() {
        return Err(format!(
            "{} is missing (scripts/bench builds it: cargo build --release --example bare_forwarder)",
            bin.display()
        ));
    }
    let addr = free_addr();
    let mut cmd = wrapped(wrapper, &bin);
    cmd.args([
        addr.to_string(),
        origin.to_string(),
        model.to_owned(),
        workers.to_string(),
    ]);
    let name = format!("bare-{model}-{workers}");
    Ok((spawn_listening(&name, cmd, dir, &[addr])?, addr))
}

/// Where a peer listens and what it forwards to.
pub struct PeerPorts {
    /// Plain HTTP/1.1 to the fast origin.
    pub fast: SocketAddr,
    /// TLS (HTTP/1.1 and HTTP/2) to the fast origin.
    pub fast_tls: SocketAddr,
    /// Plain HTTP/1.1 to the real registry.
    pub registry: SocketAddr,
}

/// The peers the bench knows how to run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Peer {
    /// nginx (Debian's nginx-light).
    Nginx,
    /// HAProxy.
    Haproxy,
    /// Caddy.
    Caddy,
}

impl Peer {
    /// All of them, in report order.
    pub const ALL: [Peer; 3] = [Peer::Nginx, Peer::Haproxy, Peer::Caddy];

    /// Name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Nginx => "nginx",
            Peer::Haproxy => "haproxy",
            Peer::Caddy => "caddy",
        }
    }

    /// The program on PATH.
    pub fn program(self) -> &'static str {
        self.name()
    }

    /// Its template in `bench/peers/`.
    fn template(self) -> &'static str {
        match self {
            Peer::Nginx => "nginx.conf",
            Peer::Haproxy => "haproxy.cfg",
            Peer::Caddy => "Caddyfile",
        }
    }

    /// Its version line.
    pub fn version(self) -> String {
        match self {
            Peer::Nginx => version("nginx", &["-v"]),
            Peer::Haproxy => version("haproxy", &["-v"]),
            Peer::Caddy => version("caddy", &["version"]),
        }
    }

    /// Fills the template and starts the peer in `dir` (its own subdirectory is made).
    pub fn start(
        self,
        root: &Path,
        fast_origin: SocketAddr,
        registry: SocketAddr,
    ) -> Result<(Proc, PeerPorts), String> {
        self.start_under(&[], false, root, fast_origin, registry)
    }

    /// Like [`Peer::start`], run as `WRAPPER… PROGRAM …`; `one_worker`: one process with one
    /// thread (nginx without its master process, HAProxy with `nbthread 1`), to count what a
    /// request costs it (valgrind).
    pub fn start_under(
        self,
        wrapper: &[String],
        one_worker: bool,
        root: &Path,
        fast_origin: SocketAddr,
        registry: SocketAddr,
    ) -> Result<(Proc, PeerPorts), String> {
        let dir = root.join(self.name());
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let ports = PeerPorts {
            fast: free_addr(),
            fast_tls: free_addr(),
            registry: free_addr(),
        };
        let cert = crate::support::cert("server.pem");
        let key = crate::support::cert("server.key");
        // HAProxy takes the certificate and its key in one PEM file.
        let cert_key = dir.join("server-with-key.pem");
        let pem = std::fs::read_to_string(&cert).map_err(|e| e.to_string())?
            + &std::fs::read_to_string(&key).map_err(|e| e.to_string())?;
        std::fs::write(&cert_key, pem).map_err(|e| e.to_string())?;
        let template_path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("bench/peers")
            .join(self.template());
        let template = std::fs::read_to_string(&template_path)
            .map_err(|e| format!("{}: {e}", template_path.display()))?;
        let user = if is_root() { "user root;" } else { "" };
        let config = fill(
            &template,
            &[
                ("DIR", dir.display().to_string()),
                ("NGINX_USER", user.into()),
                ("FAST_ORIGIN", fast_origin.to_string()),
                ("REGISTRY", registry.to_string()),
                ("FAST_PORT", ports.fast.port().to_string()),
                ("FAST_TLS_PORT", ports.fast_tls.port().to_string()),
                ("REGISTRY_PORT", ports.registry.port().to_string()),
                ("CERT", cert),
                ("KEY", key),
                ("CERT_KEY", cert_key.display().to_string()),
            ],
        )?;
        let config = match (one_worker, self) {
            (false, _) | (true, Peer::Caddy) => config,
            (true, Peer::Nginx) => config.replace(
                "worker_processes auto;",
                "worker_processes 1;\nmaster_process off;",
            ),
            (true, Peer::Haproxy) => config.replacen("global\n", "global\n    nbthread 1\n", 1),
        };
        let config_path = dir.join(self.template());
        std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let conf = config_path.display().to_string();
        let mut cmd = wrapped(wrapper, self.program());
        match self {
            Peer::Nginx => {
                cmd.args(["-p", &dir.display().to_string(), "-c", &conf]);
            }
            Peer::Haproxy => {
                cmd.args(["-db", "-f", &conf]);
            }
            Peer::Caddy => {
                cmd.args(["run", "--adapter", "caddyfile", "--config", &conf])
                    .env("HOME", &dir)
                    .env("XDG_DATA_HOME", dir.join("data"))
                    .env("XDG_CONFIG_HOME", dir.join("config"));
            }
        }
        let proc = spawn_listening(
            self.name(),
            cmd,
            &dir,
            &[ports.fast, ports.fast_tls, ports.registry],
        )?;
        Ok((proc, ports))
    }
}

/// Replaces every `@KEY@` in `template`; fails on a placeholder left unfilled.
pub fn fill(template: &str, values: &[(&str, String)]) -> Result<String, String> {
    let mut out = template.to_owned();
    for (key, value) in values {
        out = out.replace(&format!("@{key}@"), value);
    }
    // Any `@NAME@` left (NAME: uppercase letters and underscores) is a placeholder unfilled.
    let left: Vec<&str> = out
        .match_indices('@')
        .filter_map(|(i, _)| {
            let rest = &out[i + 1..];
            let name = &rest[..rest.find('@')?];
            let is_name =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_');
            is_name.then_some(name)
        })
        .collect();
    if left.is_empty() {
        Ok(out)
    } else {
        Err(format!("template placeholders left unfilled: {left:?}"))
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `pid` and all its descendants (nginx's master and workers).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = vec![];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(fields) = stat_fields(p) {
                if let Some(ppid) = fields.get(1).and_then(|f| f.parse().ok()) {
                    parents.push((p, ppid));
                }
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    out
}

/// Fields of /proc/PID/stat after the command name: index 0 is field 3 (state).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// Clock ticks per second of /proc's CPU times.
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system) used so far by `pid` and its descendants.
pub fn cpu_seconds(pid: u32, ticks_per_sec: f64) -> f64 {
    let ticks: u64 = tree(pid)
        .into_iter()
        .filter_map(stat_fields)
        // utime and stime are fields 14 and 15: indexes 11 and 12 here.
        .map(|f| f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0))
        .sum();
    ticks as f64 / ticks_per_sec
}

/// Resets the peak RSS (VmHWM) of `pid` and its descendants to their current RSS.
pub fn reset_peak_rss(pid: u32) {
    for p in tree(pid) {
        let _ = std::fs::write(format!("/proc/{p}/clear_refs"), "5");
    }
}

/// Peak RSS (VmHWM) of `pid` plus its descendants, in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let kib: u64 = tree(pid)
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum();
    kib as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_templates() {
        let values = [("PORT", "80".to_owned())];
        assert_eq!(fill("a @PORT@ b@x.y", &values).unwrap(), "a 80 b@x.y");
        assert!(fill("@PORT@ @HOST@", &values).unwrap_err().contains("HOST"));
    }
}
