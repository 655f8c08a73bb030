//! Every message names the cause and the fix (issue 23): what an operator sees when something is
//! wrong in regrelay's environment or configuration, one test per finding.

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

fn said(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `REGRELAY_LOG=bogus` (a bare word is a filter for a target of that name) used to hide every
/// line, the fatal ones too: with the port in use `serve` exited 1 saying nothing.
#[test]
fn a_log_filter_that_hides_everything_falls_back_to_info_and_says_so() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for bad in ["bogus", "verbose"] {
        let out = regrelay(
            &[
                "serve",
                "--listen",
                &addr,
                "--registry",
                "http://127.0.0.1:1",
            ],
            &[("REGRELAY_LOG", bad)],
        );
        let text = said(&out);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(text.contains(&format!("REGRELAY_LOG=\"{bad}\"")), "{text}");
        assert!(text.contains("logging at info"), "{text}");
        assert!(text.contains("bind") && text.contains(&addr), "{text}");
    }
}

/// Access lines say who asked (never a secret), which upstream served it, what the cache did (a
/// hit names no upstream status: the registry saw nothing) and, for uploads, how many parts went
/// up and how many tokens were refreshed mid-upload.
#[tokio::test(flavor = "multi_thread")]
async fn access_lines_say_who_which_upstream_and_what_the_cache_did() {
    use support::*;
    const USER: &str = "mia";
    const PAT: &str = "glpat-M14Acc3ssL1n3sT0k3n";
    let gl = support::gitlab::with_developer_pat(
        USER,
        PAT,
        "lines/app",
        std::time::Duration::from_secs(300),
    )
    .await;
    let reg = Registry::start(&gl.realm());
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().display().to_string();
    let px = Regrelay::start(&[
        "--registry",
        &reg.url(),
        "--cache-dir",
        &cache_dir,
        "--upload-split",
        "always",
    ]);
    let image = OciImage::random(4401, &[300 << 10]);
    let (src, dest) = (
        image.reference(),
        format!("docker://{}/lines/app:v1", px.addr),
    );
    let creds = format!("{USER}:{PAT}");
    let out = tokio::task::spawn_blocking({
        let (d, c) = (dest.clone(), creds.clone());
        move || skopeo_copy(&src, &d, &c, &Transport::Http)
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    for round in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let back = format!("oci:{}:v1", dir.path().display());
        let (d, c) = (dest.clone(), creds.clone());
        let out = tokio::task::spawn_blocking(move || skopeo_copy(&d, &back, &c, &Transport::Http))
            .await
            .unwrap();
        assert!(out.status.success(), "round {round}: {}", text(&out));
    }
    let log = px.output.settled();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("regrelay::access"))
        .collect();
    let layer = &image.layers[0].0;
    let hit = lines
        .iter()
        .find(|l| {
            l.contains(&format!("/blobs/{layer}"))
                && l.contains("method=GET")
                && l.contains("cache=hit")
        })
        .unwrap_or_else(|| panic!("no cache hit line:\n{}", lines.join("\n")));
    assert!(hit.contains(&format!("user={USER}")), "{hit}");
    assert!(hit.contains(&format!("upstream={}", reg.addr)), "{hit}");
    assert!(
        !hit.contains("upstream_status="),
        "a hit names no upstream status: {hit}"
    );
    let upload = lines
        .iter()
        .find(|l| l.contains("method=PATCH") && l.contains("/blobs/uploads/"))
        .unwrap_or_else(|| panic!("no upload line:\n{}", lines.join("\n")));
    assert!(
        upload.contains("parts=") && !upload.contains("parts=0"),
        "{upload}"
    );
    assert!(upload.contains("refreshes=0"), "{upload}");
    assert_no_secrets(&log, USER, &[PAT.to_owned()]);
}

/// A TLS pair that cannot work, and a directory where a key file belongs, are refused before
/// anything binds, saying what is wrong and what to pass instead (they said `KeyMismatch`, and
/// told a directory to `chmod 600`).
#[test]
fn tls_pairs_and_key_paths_that_cannot_work_are_explained() {
    let ca = support::tls::TestCa::new("messages");
    let (one, other) = (ca.issue(&["localhost"]), ca.issue(&["localhost"]));
    let (cert, key) = (
        one.cert.display().to_string(),
        other.key.display().to_string(),
    );
    let out = regrelay(
        &[
            "check-config",
            "--registry",
            "http://r",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        &[],
    );
    let text = said(&out);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(
        text.contains("does not belong to the certificate")
            && text.contains("the key the certificate was issued for"),
        "{text}"
    );
    assert!(!text.contains("KeyMismatch"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().display().to_string();
    for (flag, extra) in [
        ("--tls-key", vec!["--tls-cert", cert.as_str()]),
        ("--session-key-file", vec![]),
    ] {
        let mut args = vec!["check-config", "--registry", "http://r", flag, &dir_path];
        args.extend(extra);
        let out = regrelay(&args, &[]);
        let text = said(&out);
        assert_eq!(out.status.code(), Some(64), "{flag}: {text}");
        assert!(text.contains("is a directory"), "{flag}: {text}");
        assert!(!text.contains("chmod"), "{flag}: {text}");
    }
}

/// `[upstream]` (one table) where the file wants `[[upstream]]` (a list of tables) said only
/// `invalid type: map, expected a sequence`.
#[test]
fn an_upstream_written_as_a_single_table_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("regrelay.toml");
    std::fs::write(
        &file,
        "registry = \"http://r\"\n[upstream]\nname = \"hub\"\nurl = \"https://registry-1.docker.io\"\n",
    )
    .unwrap();
    let out = regrelay(
        &["check-config", "--config", &file.display().to_string()],
        &[],
    );
    let text = said(&out);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(
        text.contains("[[upstream]] table (double brackets)"),
        "{text}"
    );
}

/// `--registry https://…` pointed at a plain-HTTP registry said `received corrupt message of
/// type InvalidContentType`: the log now says the port may speak no TLS and that a plain-HTTP
/// registry takes an http:// URL.
#[tokio::test(flavor = "multi_thread")]
async fn https_to_a_plain_http_registry_says_so() {
    use support::*;
    let reg = Registry::start_open();
    let px = Regrelay::start(&["--registry", &format!("https://{}", reg.addr)]);
    let resp = support::upstream::client()
        .request(
            http::Request::get(format!("{}/v2/", px.url()))
                .body(regrelay::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    // The client is told what failed and where the operator reads why (no internal address).
    assert!(
        body.contains("TLS handshake with the upstream failed") && body.contains("regrelay's log"),
        "{body}"
    );
    assert!(!body.contains("InvalidContentType"), "{body}");
    let log = px.output.wait_for(
        "plain-HTTP registry takes an http:// URL",
        std::time::Duration::from_secs(10),
    );
    assert!(log.is_some(), "{}", px.output.text());
}

/// `serve --help` did not say `--registry` is required nor mention `REGRELAY_LOG`, and showed
/// `--cache-serve-stale [<CACHE_SERVE_STALE>]`; its value names are the README's (readme-check
/// compares them with the README's tables).
#[test]
fn serve_help_says_what_is_required_and_what_no_flag_sets() {
    for sub in ["serve", "check-config"] {
        let out = regrelay(&[sub, "--help"], &[]);
        let text = said(&out);
        assert!(out.status.success(), "{text}");
        for needle in [
            "Required: --registry",
            "REGRELAY_LOG",
            "--cache-serve-stale [<true|false>]",
            "--max-connections <N>",
            "--upstream <NAME=URL>",
            "Exit codes: 0",
            "64 invalid",
        ] {
            assert!(
                text.contains(needle),
                "{sub} --help lacks {needle:?}:\n{text}"
            );
        }
        assert!(!text.contains("<CACHE_SERVE_STALE>"), "{text}");
    }
}

/// check-config said "config ok" for bounds `serve` then refused for the open-file limit, and
/// the default bounds failed at start under `ulimit -n 1024` (issue 23, finding 4). Now
/// check-config runs the same check, and defaulted bounds are lowered to fit, with a warning.
#[test]
fn check_config_checks_the_open_file_limit_and_the_defaults_fit_1024() {
    support::require("prlimit"); // util-linux: essential in Debian
    let bin = support::regrelay_bin().display().to_string();
    let limited = |args: &[&str]| {
        let mut all = vec!["prlimit", "--nofile=1024:1024", bin.as_str()];
        all.extend(args);
        let mut cmd = Command::new(all[0]);
        cmd.args(&all[1..]);
        for (k, _) in std::env::vars() {
            if k.starts_with("REGRELAY_") {
                cmd.env_remove(k);
            }
        }
        cmd.output().unwrap()
    };
    let out = limited(&[
        "check-config",
        "--registry",
        "http://r",
        "--max-connections",
        "100000",
    ]);
    let text = said(&out);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(
        text.contains("the open-file limit is 1024") && text.contains("lower the bounds"),
        "{text}"
    );

    let out = limited(&["check-config", "--registry", "http://r"]);
    let text = said(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("--max-connections lowered from 1024"),
        "{text}"
    );

    // And serve starts with them, under the same limit.
    let registry = support::Registry::start_open();
    let mut child = Command::new("prlimit")
        .args([
            "--nofile=1024:1024",
            &bin,
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--registry", &registry.url()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = support::Captured::default();
    out.attach(child.stdout.take().unwrap());
    out.attach(child.stderr.take().unwrap());
    let listening = out.wait_for("listening", std::time::Duration::from_secs(10));
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening.is_some(), "{}", out.text());
    assert!(
        out.text().contains("--max-connections lowered"),
        "{}",
        out.text()
    );
}

/// A world-readable TLS key was accepted silently while a 0644 session key was refused: both
/// check-config and serve now warn, naming the file and the fix.
#[test]
fn a_world_readable_tls_key_is_warned_of() {
    use std::os::unix::fs::PermissionsExt;
    let ca = support::tls::TestCa::new("messages");
    let leaf = ca.issue(&["localhost"]);
    std::fs::set_permissions(&leaf.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (cert, key) = (
        leaf.cert.display().to_string(),
        leaf.key.display().to_string(),
    );
    let out = regrelay(
        &[
            "check-config",
            "--registry",
            "http://r",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        &[],
    );
    let text = said(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("readable by every user")
            && text.contains("chmod 600")
            && text.contains(&key),
        "{text}"
    );
    let px = support::Regrelay::start(&[
        "--registry",
        "http://127.0.0.1:9",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    assert!(
        px.output.text().contains("readable by every user"),
        "{}",
        px.output.text()
    );
}

/// `REGRELAY_MAX_CONNECTIONS=abc` was blamed on `--max-connections`, a flag nobody typed; flags
/// before the subcommand (`regrelay --registry …`) got no hint.
#[test]
fn bad_environment_values_and_missing_subcommands_are_named() {
    let out = regrelay(
        &["serve", "--registry", "http://r"],
        &[("REGRELAY_MAX_CONNECTIONS", "abc")],
    );
    let text = said(&out);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(
        text.contains("environment variable REGRELAY_MAX_CONNECTIONS") && text.contains("\"abc\""),
        "{text}"
    );
    let out = regrelay(&["--registry", "http://r"], &[]);
    let text = said(&out);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(
        text.contains("regrelay serve --registry http://r"),
        "{text}"
    );
}

/// One startup line says what runs here: version, public names, upstreams, cache, key ring.
#[test]
fn the_listening_line_says_what_runs_here() {
    let cache = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("session.keys");
    std::fs::write(&key_file, "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n").unwrap();
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let px = support::Regrelay::start(&[
        "--registry",
        "http://127.0.0.1:9",
        "--public-url",
        "https://registry.example.com",
        "--upstream",
        "hub=https://registry-1.docker.io",
        "--cache-dir",
        &cache.path().display().to_string(),
        "--session-key-file",
        &key_file.display().to_string(),
    ]);
    let log = px.output.text();
    let line = log
        .lines()
        .find(|l| l.contains("listening"))
        .unwrap_or_else(|| panic!("{log}"));
    for needle in [
        format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
        "public_urls=https://registry.example.com".into(),
        "default=http://127.0.0.1:9".into(),
        "hub=https://registry-1.docker.io".into(),
        format!("cache={}", cache.path().display()),
        "1 key(s), sealing with".into(),
    ] {
        assert!(line.contains(&needle), "{needle}: {line}");
    }
    assert!(!line.contains("BwcHBwcH"), "{line}");
}
