//! regrelay in front of an HTTPS registry and an HTTPS token service, both with certificates of a
//! private CA made for the test (`--upstream-ca`), reached by name (`localhost`: SNI and the
//! certificate's name are checked). A push with 3-second tokens re-mints over HTTPS mid-push; a
//! certificate regrelay must refuse (unknown CA, another name) is explained in its log and told
//! to the client without an address; a CA rotated on the upstreams is taken in by SIGHUP, and a
//! CA file that does not load leaves the roots in force; a port that never answers the
//! ClientHello is given up at the connect deadline; a self-signed registry certificate with the
//! CA flag (`openssl req -x509`) is trusted when `--upstream-ca` is that very certificate, and
//! only then, for its own name. Real `docker-registry` (`http.tls`), real
//! skopeo, the GitLab stand-in over rustls.

use crate::support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use support::gitlab::{gitlab, Credential, GitLab, Role, TokenScope};
use support::relay::Relay;
use support::tls::{Leaf, TestCa};
use support::*;

const USER: &str = "builder";
const PAT: &str = "glpat-Tq4mXw9ZtVc5LmHp2RsK";

/// The GitLab stand-in over HTTPS with `leaf`, issuing tokens that live `lifetime`.
async fn token_service(leaf: &Leaf, lifetime: Duration) -> GitLab {
    gitlab()
        .credential(Credential::Pat {
            user: USER.into(),
            token: PAT.into(),
            scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
        })
        .project("ci/app", false, &[(USER, Role::Developer)])
        .lifetime(lifetime)
        .tls(leaf.server_config())
        .start()
        .await
}

/// `GET url` without credentials: status and body.
async fn get(url: String) -> (u16, String) {
    let req = http::Request::get(url)
        .body(regrelay::body::empty())
        .unwrap();
    let resp = upstream::client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The `message` of a registry JSON error body.
fn registry_message(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    assert_eq!(v["errors"][0]["code"], "UNAVAILABLE", "{body}");
    v["errors"][0]["message"].as_str().unwrap().to_owned()
}

/// skopeo copy between `src` and `dest` (one of them `docker://` on regrelay, plain HTTP).
async fn copy(src: String, dest: String) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        skopeo_copy(&src, &dest, &format!("{USER}:{PAT}"), &Transport::Http)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_to_an_https_registry_re_mints_over_https_and_pulls_back_the_same_digests() {
    let ca = TestCa::new("regrelay test upstream CA");
    let gl = token_service(&ca.issue(&["localhost"]), Duration::from_secs(3)).await;
    let reg = Registry::start_tls(&gl.realm(), &ca.issue(&["localhost"]));
    let ca_file = ca.pem_path().display().to_string();
    let px = Regrelay::start(&["--registry", &reg.https_url(), "--upstream-ca", &ca_file]);
    // ~6 MiB at 512 KiB/s: about 12 s, four 3-second token lifetimes.
    let link = Relay::start(vec![px.addr], Some(512 << 10)).await;
    let image = OciImage::random(43, &[3 << 20, 2 << 20, 1 << 20]);
    let minted_before = gl.mints();
    let started = Instant::now();
    let push = copy(
        image.reference(),
        format!("docker://{}/ci/app:v1", link.addr),
    )
    .await;
    let took = started.elapsed();
    assert!(
        push.status.success(),
        "push failed after {took:?}: {}",
        text(&push)
    );
    let minted = gl.mints() - minted_before;
    let log = px.output.text();
    let asked = log.lines().filter(|l| l.contains("token request")).count();
    assert!(
        minted > 1 && minted > asked,
        "tokens re-minted over HTTPS mid-push: {minted} mints for {asked} client token requests in {took:?}"
    );
    let realm_line = log
        .lines()
        .find(|l| l.contains("upstream token realm"))
        .unwrap_or_else(|| panic!("no realm learnt:\n{log}"));
    assert!(realm_line.contains(&gl.realm()), "{realm_line}");
    let names = gl.tls_names();
    assert!(
        !names.is_empty() && names.iter().all(|n| n == "localhost"),
        "every handshake with the token service names it (SNI): {names:?}"
    );

    let pulled = tempfile::tempdir().unwrap();
    let pull = copy(
        format!("docker://{}/ci/app:v1", px.addr),
        format!("oci:{}:latest", pulled.path().display()),
    )
    .await;
    assert!(pull.status.success(), "{}", text(&pull));
    assert_same_blobs(&image, pulled.path());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pulled.path().join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], image.manifest_digest);
    let mut secrets = gl.issued();
    secrets.push(PAT.to_owned());
    assert_no_secrets(&px.output.settled(), USER, &secrets);
    eprintln!("push took {took:?}: {minted} mints for {asked} client token requests");
}

/// A registry request through `px` fails with 502; returns the client's message and regrelay's
/// log line for it.
async fn refused(px: &Regrelay, registry: SocketAddr) -> (String, String) {
    let (status, body) = get(format!("{}/v2/", px.url())).await;
    assert_eq!(status, 502, "{body}");
    let message = registry_message(&body);
    for internal in [
        registry.to_string(),
        format!("localhost:{}", registry.port()),
    ] {
        assert!(
            !message.contains(&internal),
            "an address reached the client: {message}"
        );
    }
    let line = px
        .output
        .wait_for("request failed", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no log line:\n{}", px.output.text()));
    (message, line)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_regrelay_refuses_is_explained_to_the_operator_and_named_to_the_client() {
    let (ca, stranger) = (
        TestCa::new("upstream CA"),
        TestCa::new("a CA nobody passed"),
    );

    // The CA is not given: "pass it with --upstream-ca", naming the origin.
    let reg = Registry::start_open_tls(&ca.issue(&["localhost"]));
    let px = Regrelay::start(&["--registry", &reg.https_url()]);
    let (message, line) = refused(&px, reg.addr).await;
    assert!(
        message.contains("does not trust the upstream's TLS certificate"),
        "{message}"
    );
    for needle in [
        &reg.https_url(),
        "UnknownIssuer",
        "--upstream-ca",
        "system roots only",
    ] {
        assert!(line.contains(needle), "{needle:?} missing from {line}");
    }

    // The CA is given, the certificate names another host than the one dialled.
    let other = Registry::start_open_tls(&ca.issue(&["registry.internal"]));
    let ca_file = ca.pem_path().display().to_string();
    let px = Regrelay::start(&["--registry", &other.https_url(), "--upstream-ca", &ca_file]);
    let (message, line) = refused(&px, other.addr).await;
    assert!(message.contains("not valid for the name"), "{message}");
    for needle in [
        &other.https_url(),
        "does not name the host",
        "registry.internal",
    ] {
        assert!(line.contains(needle), "{needle:?} missing from {line}");
    }

    // The registry is trusted, its token service is not: the token request says so.
    let gl = token_service(&stranger.issue(&["localhost"]), Duration::from_secs(300)).await;
    let reg = Registry::start_tls(&gl.realm(), &ca.issue(&["localhost"]));
    let px = Regrelay::start(&["--registry", &reg.https_url(), "--upstream-ca", &ca_file]);
    let basic = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PAT}"))
    };
    let req = http::Request::get(format!(
        "{}/jwt/auth?service=container_registry&scope=repository:ci/app:pull",
        px.url()
    ))
    .header("authorization", format!("Basic {basic}"))
    .body(regrelay::body::empty())
    .unwrap();
    let resp = upstream::client().request(req).await.unwrap();
    assert_eq!(resp.status(), 502);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let message = registry_message(&String::from_utf8_lossy(&body));
    assert!(
        message.contains("does not trust the upstream's TLS certificate"),
        "{message}"
    );
    assert!(!message.contains(&gl.addr.port().to_string()), "{message}");
    let line = px
        .output
        .wait_for("request failed", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no log line:\n{}", px.output.text()));
    let token_origin = format!("https://localhost:{}", gl.addr.port());
    for needle in [
        token_origin.as_str(),
        "UnknownIssuer",
        "--upstream-ca",
        &ca_file,
    ] {
        assert!(line.contains(needle), "{needle:?} missing from {line}");
    }
    assert_eq!(
        gl.attempts(),
        0,
        "no request reached the untrusted token service"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ca_rotated_on_the_upstream_is_trusted_after_sighup_without_a_restart() {
    let (ca1, ca2) = (TestCa::new("CA before"), TestCa::new("CA after"));
    let first = Registry::start_open_tls(&ca1.issue(&["localhost"]));
    // A stable address in front of the registry, so that a new one (new certificate) takes over.
    let link = Relay::start(vec![first.addr], None).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, ca1.pem()).unwrap();
    let upstream = format!("https://localhost:{}", link.addr.port());
    let px = Regrelay::process(&[
        "--registry",
        &upstream,
        "--upstream-ca",
        &ca_file.display().to_string(),
    ]);
    let v2 = format!("{}/v2/", px.url());
    assert_eq!(get(v2.clone()).await.0, 200);

    // The upstream now presents a certificate of CA2: refused until regrelay is told.
    let second = Registry::start_open_tls(&ca2.issue(&["localhost"]));
    link.set_backends(vec![second.addr]);
    drop(first);
    // A request may first meet the pooled connection to the registry just stopped; the next
    // ones dial and are refused at the handshake.
    let mut message = String::new();
    for _ in 0..5 {
        let (status, body) = get(v2.clone()).await;
        assert_eq!(
            status, 502,
            "the new certificate is not trusted yet: {body}"
        );
        message = registry_message(&body);
        if message.contains("TLS certificate") {
            break;
        }
    }
    assert!(
        message.contains("does not trust the upstream's TLS certificate"),
        "{message}"
    );
    let line = px
        .output
        .wait_for("UnknownIssuer", Duration::from_secs(5))
        .unwrap();
    assert!(
        line.contains(&upstream) && line.contains("--upstream-ca"),
        "{line}"
    );

    std::fs::write(&ca_file, ca2.pem()).unwrap();
    px.hangup();
    let reloaded = px
        .output
        .wait_for("reload: upstream CA re-read", Duration::from_secs(5));
    assert!(reloaded.is_some(), "{}", px.output.text());
    assert_eq!(get(v2.clone()).await.0, 200, "trusted after SIGHUP");

    // A CA file that does not load: refused, the roots in force stay (a new connection to a
    // new registry with a CA2 certificate is trusted).
    std::fs::write(&ca_file, "not a certificate\n").unwrap();
    px.hangup();
    let line = px
        .output
        .wait_for("new upstream CA refused", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{}", px.output.text()));
    assert!(line.contains(&ca_file.display().to_string()), "{line}");
    let third = Registry::start_open_tls(&ca2.issue(&["localhost"]));
    link.set_backends(vec![third.addr]);
    drop(second);
    let dialled = link.connections.load(std::sync::atomic::Ordering::SeqCst);
    let mut status = 0;
    for _ in 0..5 {
        status = get(v2.clone()).await.0;
        if status == 200 {
            break;
        }
    }
    assert_eq!(status, 200, "{}", px.output.text());
    assert!(link.connections.load(std::sync::atomic::Ordering::SeqCst) > dialled);
    assert_eq!(
        px.output
            .text()
            .matches("reload: upstream CA re-read")
            .count(),
        1,
        "the refused file was not taken"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_handshake_that_never_ends_is_cut_at_the_connect_deadline() {
    // Accepts TCP and never answers the ClientHello (a port black-holed behind a load balancer).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = vec![];
        while let Ok((s, _)) = listener.accept().await {
            open.push(s);
        }
    });
    let px = Regrelay::start(&[
        "--registry",
        &format!("https://localhost:{port}"),
        "--upstream-connect-timeout-secs",
        "1",
    ]);
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(15), get(format!("{}/v2/", px.url())))
        .await
        .expect("the request must not hang on a silent TLS port");
    let took = started.elapsed();
    held.abort();
    let (status, body) = answer;
    assert_eq!(status, 502, "{body}");
    assert!(registry_message(&body).contains("unreachable"), "{body}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "{took:?}"
    );
    let line = px
        .output
        .wait_for("request failed", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{}", px.output.text()));
    let origin = format!("https://localhost:{port}");
    for needle in [
        origin.as_str(),
        "no TLS handshake",
        "--upstream-connect-timeout-secs",
    ] {
        assert!(line.contains(needle), "{needle:?} missing from {line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_self_signed_upstream_certificate_with_the_ca_flag_is_trusted_as_its_own_upstream_ca() {
    // What `openssl req -x509 -subj /CN=localhost -addext subjectAltName=DNS:localhost` makes
    // (basicConstraints CA:TRUE): Docker and skopeo trust it as its own CA file.
    let own = Leaf::self_signed_ca(&["localhost"]);
    let reg = Registry::start_open_tls(&own);
    let own_file = own.cert.display().to_string();
    let px = Regrelay::start(&["--registry", &reg.https_url(), "--upstream-ca", &own_file]);
    let (status, body) = get(format!("{}/v2/", px.url())).await;
    assert_eq!(status, 200, "{body}\n{}", px.output.text());

    // Another self-signed CA certificate in the file trusts nothing else.
    let stranger = Leaf::self_signed_ca(&["localhost"]);
    let px = Regrelay::start(&[
        "--registry",
        &reg.https_url(),
        "--upstream-ca",
        &stranger.cert.display().to_string(),
    ]);
    let (_, line) = refused(&px, reg.addr).await;
    for needle in [&reg.https_url(), "CaUsedAsEndEntity", "--upstream-ca"] {
        assert!(line.contains(needle), "{needle:?} missing from {line}");
    }

    // The certificate itself, dialled by a name it does not list: refused.
    let by_ip = format!("https://127.0.0.1:{}", reg.addr.port());
    let px = Regrelay::start(&["--registry", &by_ip, "--upstream-ca", &own_file]);
    let (_, line) = refused(&px, reg.addr).await;
    assert!(line.contains("does not name the host"), "{line}");
}
