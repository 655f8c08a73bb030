//! The command line: `check-config` validates with the same path as `serve`, bad config exits 64
//! with a message naming the key, and flags win over env over the TOML file.

mod support;

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
