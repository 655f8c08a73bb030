//! `regrelay healthcheck` against a real regrelay (plain and HTTPS): each way the check can fail
//! here is named with its cause and fix instead of hyper's `client error (Connect)` (nothing
//! listening, a name that does not resolve, https to a plain-HTTP port and http to a TLS one,
//! an untrusted certificate, a certificate for another name, no answer), and a self-signed
//! certificate with the CA flag (`openssl req -x509`) is trusted when `--ca-file` is that very
//! certificate, as curl and Docker trust it; another one is still refused.

use crate::support;

use std::process::Command;

use support::nginx::free_addr;
use support::tls::Leaf;
use support::*;

/// Runs `regrelay healthcheck ARGS`: exit code and stderr.
fn healthcheck(args: &[&str]) -> (i32, String) {
    let out = Command::new(regrelay_bin())
        .arg("healthcheck")
        .args(args)
        .env_remove("REGRELAY_HEALTHCHECK_URL")
        .output()
        .expect("run regrelay healthcheck");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().expect("exit code"), stderr)
}

/// A regrelay serving HTTPS with `cert`/`key` (its upstream is never asked: `/-/healthy` is
/// liveness).
fn tls_regrelay(cert: &str, key: &str) -> Regrelay {
    let nowhere = format!("http://{}", free_addr());
    Regrelay::start(&["--registry", &nowhere, "--tls-cert", cert, "--tls-key", key])
}

/// Asserts exit 1 and that stderr names each of `words`.
fn unhealthy(args: &[&str], words: &[&str]) {
    let (code, stderr) = healthcheck(args);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        !stderr.contains("client error ("),
        "hyper's bare words instead of a cause: {stderr}"
    );
    for w in words {
        assert!(stderr.contains(w), "{w:?} missing from: {stderr}");
    }
}

#[test]
fn a_self_signed_certificate_with_the_ca_flag_is_trusted_as_its_own_ca_file() {
    let own = Leaf::self_signed_ca(&["localhost"]);
    let (cert, key) = (
        own.cert.display().to_string(),
        own.key.display().to_string(),
    );
    let px = tls_regrelay(&cert, &key);
    let url = format!("https://localhost:{}/-/healthy", px.addr.port());
    let (code, stderr) = healthcheck(&["--url", &url, "--ca-file", &cert]);
    assert_eq!(code, 0, "{stderr}");
    // Another self-signed CA certificate is no reason to trust this one.
    let stranger = Leaf::self_signed_ca(&["localhost"]);
    let other = stranger.cert.display().to_string();
    unhealthy(
        &["--url", &url, "--ca-file", &other],
        &["CaUsedAsEndEntity", "--ca-file"],
    );
    // The certificate itself does not make another name right.
    let by_ip = format!("https://127.0.0.1:{}/-/healthy", px.addr.port());
    unhealthy(
        &["--url", &by_ip, "--ca-file", &cert],
        &[
            "not valid for name",
            "127.0.0.1",
            "a name the certificate lists",
        ],
    );
}

#[test]
fn nothing_listening_and_an_unknown_name_are_named_with_the_fix() {
    let closed = free_addr();
    unhealthy(
        &["--url", &format!("http://{closed}/-/healthy")],
        &[
            "connection refused",
            &closed.to_string(),
            "is regrelay running",
            "--listen",
        ],
    );
    // RFC 6761: .invalid never resolves.
    unhealthy(
        &["--url", "http://regrelay.invalid:5000/-/healthy"],
        &["regrelay.invalid", "resolve", "--url"],
    );
}

#[test]
fn the_wrong_scheme_for_the_port_is_named_with_the_fix() {
    let nowhere = format!("http://{}", free_addr());
    let plain = Regrelay::start(&["--registry", &nowhere]);
    unhealthy(
        &["--url", &format!("https://{}/-/healthy", plain.addr)],
        &["plain HTTP", &format!("http://{}/-/healthy", plain.addr)],
    );
    let tls = tls_regrelay(&cert("server.pem"), &cert("server.key"));
    let port = tls.addr.port();
    unhealthy(
        &["--url", &format!("http://localhost:{port}/-/healthy")],
        &["TLS", &format!("https://localhost:{port}/-/healthy")],
    );
}

#[test]
fn an_untrusted_certificate_and_no_answer_are_named_with_the_fix() {
    let tls = tls_regrelay(&cert("server.pem"), &cert("server.key"));
    let url = format!("https://localhost:{}/-/healthy", tls.addr.port());
    unhealthy(&["--url", &url], &["UnknownIssuer", "--ca-file"]);
    let (code, stderr) = healthcheck(&["--url", &url, "--ca-file", &cert("ca.pem")]);
    assert_eq!(code, 0, "{stderr}");
    // A port that accepts connections (the kernel completes them) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    unhealthy(
        &[
            "--url",
            &format!("http://{addr}/-/healthy"),
            "--timeout-secs",
            "1",
        ],
        &["no answer within 1 s", "--timeout-secs"],
    );
    drop(silent);
}
