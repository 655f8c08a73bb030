//! The command line: `check-config` validates with the same path as `serve`, bad config exits 64
//! with a message naming the key, and flags win over env over the TOML file.

use crate::support;

use std::process::{Command, Output};

fn regrelay(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(support::regrelay_bin());
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("REGRELAY_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn invalid_config_exits_64_naming_the_key() {
    let cases: [(&[&str], &str); 6] = [
        (&["check-config"], "registry"),
        (&["check-config", "--registry", "ftp://r"], "registry"),
        (
            &[
                "check-config",
                "--registry",
                "http://r",
                "--listen",
                "nowhere",
            ],
            "listen",
        ),
        (
            &[
                "check-config",
                "--registry",
                "http://r",
                "--tls-cert",
                "/nonexistent.pem",
                "--tls-key",
                "/k",
            ],
            "tls_cert",
        ),
        (
            &[
                "check-config",
                "--registry",
                "http://r",
                "--public-url",
                "http://p/with/path",
            ],
            "public_url",
        ),
        (
            &[
                "check-config",
                "--registry",
                "http://r",
                "--max-connections",
                "many",
            ],
            "max-connections",
        ),
    ];
    for (args, key) in cases {
        let out = regrelay(args, &[]);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(key),
            "{args:?} should name {key}: {}",
            stderr(&out)
        );
    }
    // serve refuses the same way, before binding anything.
    let out = regrelay(&["serve", "--registry", "gopher://r"], &[]);
    assert_eq!(out.status.code(), Some(64));
}

/// Three independent mistakes, one run: each is named on a line of its own, and the exit is 64
/// (validation used to stop at the first, hiding the others until it was fixed).
#[test]
fn every_mistake_is_reported_in_one_run() {
    let out = regrelay(
        &[
            "check-config",
            "--registry",
            "ftp://r",
            "--listen",
            "nowhere",
            "--max-connections",
            "0",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(64));
    let err = stderr(&out);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("regrelay: "))
        .collect();
    assert_eq!(lines.len(), 3, "{err}");
    for key in ["`registry`", "`listen`", "`max_connections`"] {
        assert!(
            lines.iter().any(|l| l.contains(key)),
            "{key} missing:\n{err}"
        );
    }
}

#[test]
fn flags_beat_env_beat_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("regrelay.toml");
    std::fs::write(
        &file,
        "registry = \"http://from-file:1\"\nlisten = \"127.0.0.1:7001\"\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let out = regrelay(&["check-config", "--config", f], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("http://from-file:1"));
    let env = [("REGRELAY_REGISTRY", "http://from-env:2")];
    let out = regrelay(&["check-config", "--config", f], &env);
    assert!(String::from_utf8_lossy(&out.stdout).contains("http://from-env:2"));
    let out = regrelay(
        &[
            "check-config",
            "--config",
            f,
            "--registry",
            "http://from-flag:3",
        ],
        &env,
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout.contains("http://from-flag:3") && stdout.contains("127.0.0.1:7001"),
        "{stdout}"
    );
    std::fs::write(&file, "registry = \"http://r\"\nupstream_cert = \"x\"\n").unwrap();
    let out = regrelay(&["check-config", "--config", f], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("upstream_cert"), "{}", stderr(&out));
}

#[test]
fn absurd_numbers_a_self_realm_and_a_shared_key_file_are_refused_before_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("session.keys");
    std::fs::write(&keys, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    let keys = keys.display().to_string();
    let base = ["check-config", "--registry", "http://r:5000"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        // Used to pass check-config and then panic at start (timer overflow).
        (
            vec!["--header-read-timeout-secs", "18446744073709551615"],
            "header_read_timeout_secs",
        ),
        (
            vec!["--shutdown-grace-secs", "99999999999"],
            "shutdown_grace_secs",
        ),
        (vec!["--max-connections", "0"], "max_connections"),
        (vec!["--registry", "http://r:0"], "registry"),
        (
            vec![
                "--listen",
                "127.0.0.1:5999",
                "--token-realm",
                "http://127.0.0.1:5999/jwt/auth",
            ],
            "token_realm",
        ),
        (
            vec!["--auth-redirect-allow", "gitlab.example.com"],
            "auth_redirect_allow",
        ),
        (vec!["--session-key-file", &keys], "chmod 600"),
    ];
    for (extra, want) in cases {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let out = regrelay(&args, &[]);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
        assert!(
            !stderr(&out).contains("AAECAwQF"),
            "the key never reaches an error message"
        );
    }
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    let args: Vec<&str> = base
        .iter()
        .copied()
        .chain(["--session-key-file", &keys])
        .collect();
    let out = regrelay(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn the_open_file_limit_is_raised_and_bounds_that_cannot_fit_refuse_to_start() {
    let mut child = Command::new(support::regrelay_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--registry",
            "http://127.0.0.1:9",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr_pipe = child.stderr.take().unwrap();
    let line = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr_pipe)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("file descriptor limit"))
    });
    let found = line.join().unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    let found = found.expect("regrelay logs the open-file limit it runs with");
    let n: u64 = found
        .split("open_files=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    let hard = Command::new("sh")
        .args(["-c", "ulimit -Hn"])
        .output()
        .unwrap();
    let hard = String::from_utf8_lossy(&hard.stdout).trim().to_owned();
    if hard != "unlimited" {
        assert_eq!(
            n.to_string(),
            hard,
            "the soft limit was raised to the hard one"
        );
    }
    let out = regrelay(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--registry",
            "http://127.0.0.1:9",
            "--max-connections",
            "1000000",
            "--max-upstream-connections",
            "1000000",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("open-file limit"), "{}", stderr(&out));
}
