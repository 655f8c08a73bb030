//! SIGHUP (`systemctl reload`) re-reads the TLS certificate and key, the session key ring and the
//! injected credentials without dropping anything: a push over HTTPS (real registry, 5-second
//! tokens, a throttled link) completes across a certificate swap and a key-ring rotation, a new
//! TLS connection sees the new certificate at once, and bad new files are refused with a logged
//! error while the old ones stay in force.

use crate::support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::gitlab::with_developer_pat;
use support::relay::Relay;
use support::*;

const USER: &str = "builder";
const PAT: &str = "glpat-Hu7nWq8ZtVc5LmXp2HsT";

fn pem(name: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(cert(name)).unwrap()
}

/// The end-entity certificate a new TLS connection to `addr` is shown.
async fn presented(addr: SocketAddr) -> CertificateDer<'static> {
    let tls = tls_connect(addr).await;
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// A new TLS connection to `addr` as `localhost`, trusting the test CA.
async fn tls_connect(addr: SocketAddr) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pem("ca.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

fn write_private(path: &Path, content: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(content).unwrap();
}

fn key_line(seed: u8) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([seed; 32])
}

/// The key id of a session token `rr1.<kid>.…`.
fn kid(token: &str) -> String {
    token.split('.').nth(1).unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_swaps_certificate_and_keys_mid_push_without_dropping_it() {
    let gl = with_developer_pat(USER, PAT, "ci/app", Duration::from_secs(5)).await;
    let reg = Registry::start(&gl.realm());
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path, ring_path) = (
        dir.path().join("tls.pem"),
        dir.path().join("tls.key"),
        dir.path().join("session.keys"),
    );
    std::fs::copy(cert("server.pem"), &cert_path).unwrap();
    write_private(&key_path, &std::fs::read(cert("server.key")).unwrap());
    write_private(&ring_path, format!("{}\n", key_line(1)).as_bytes());
    let px = Regrelay::process(&[
        "--registry",
        &reg.url(),
        "--tls-cert",
        cert_path.to_str().unwrap(),
        "--tls-key",
        key_path.to_str().unwrap(),
        "--session-key-file",
        ring_path.to_str().unwrap(),
    ]);
    assert_eq!(presented(px.addr).await, pem("server.pem"));
    let before = session_token(px.addr).await;

    // ~8 MiB at 1 MiB/s over a TCP relay (TLS end to end): the reload lands mid-upload.
    let link = Relay::start(vec![px.addr], Some(1 << 20)).await;
    let image = OciImage::random(161, &[8 << 20]);
    let certs = ca_cert_dir();
    let started = Instant::now();
    let pushing = tokio::task::spawn_blocking({
        let (src, dest) = (
            image.reference(),
            format!("docker://localhost:{}/ci/app:v1", link.addr.port()),
        );
        let certs = certs.path().to_owned();
        move || {
            skopeo_copy(
                &src,
                &dest,
                &format!("{USER}:{PAT}"),
                &Transport::Https(certs),
            )
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;

    // New certificate and a rotated ring (new key first, the old one still opens).
    std::fs::copy(cert("server-next.pem"), &cert_path).unwrap();
    write_private(&key_path, &std::fs::read(cert("server-next.key")).unwrap());
    write_private(
        &ring_path,
        format!("{}\nopen-only {}\n", key_line(2), key_line(1)).as_bytes(),
    );
    px.hangup();
    for line in [
        "TLS certificate and key re-read",
        "session key ring re-read",
    ] {
        assert!(
            px.output.wait_for(line, Duration::from_secs(5)).is_some(),
            "{}",
            px.output.text()
        );
    }
    assert_eq!(
        presented(px.addr).await,
        pem("server-next.pem"),
        "a new connection sees the new certificate"
    );
    let after = session_token(px.addr).await;
    assert_ne!(
        kid(&before),
        kid(&after),
        "new sessions are sealed with the new key"
    );

    // Bad new files are refused; the pair and ring in force stay.
    write_private(
        &key_path,
        b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    );
    write_private(&ring_path, b"too short\n");
    px.hangup();
    for line in [
        "new TLS certificate or key refused; the previous pair stays",
        "new session key ring refused; the previous ring stays",
    ] {
        assert!(
            px.output.wait_for(line, Duration::from_secs(5)).is_some(),
            "{}",
            px.output.text()
        );
    }
    assert_eq!(presented(px.addr).await, pem("server-next.pem"));

    let out = pushing.await.unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "push failed: {}\n{}",
        text(&out),
        px.output.text()
    );
    assert!(
        took > Duration::from_secs(5),
        "the reloads must land mid-push: {took:?}"
    );
    // Pull it back through the new certificate: same blobs.
    let pulled = tempfile::tempdir().unwrap();
    let pull = tokio::task::spawn_blocking({
        let (src, dest) = (
            format!("docker://localhost:{}/ci/app:v1", px.addr.port()),
            format!("oci:{}:latest", pulled.path().display()),
        );
        let certs = certs.path().to_owned();
        move || {
            skopeo_copy(
                &src,
                &dest,
                &format!("{USER}:{PAT}"),
                &Transport::Https(certs),
            )
        }
    })
    .await
    .unwrap();
    assert!(pull.status.success(), "{}", text(&pull));
    assert_same_blobs(&image, pulled.path());

    // A session opened (and so remembered opened) under the old key stops at the reload that
    // drops that key; one sealed with the new key goes on.
    let tags = "/v2/ci/app/tags/list";
    assert_eq!(registry_get(px.addr, &before, tags).await.0, 200);
    write_private(&ring_path, format!("{}\n", key_line(2)).as_bytes());
    px.hangup();
    let deadline = Instant::now() + Duration::from_secs(5);
    while px.output.text().matches("session key ring re-read").count() < 2 {
        assert!(Instant::now() < deadline, "{}", px.output.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = registry_get(px.addr, &before, tags).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("a key this replica does not have"), "{body}");
    assert_eq!(registry_get(px.addr, &after, tags).await.0, 200);

    let mut secrets = gl.issued();
    secrets.push(PAT.to_owned());
    assert_no_secrets(&px.output.text(), USER, &secrets);
}

/// Status and body of a GET of `path` with a session token, over a new TLS connection.
async fn registry_get(addr: SocketAddr, token: &str, path: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let tls = tls_connect(addr).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", format!("localhost:{}", addr.port()))
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A session token from regrelay's realm over a new TLS connection (Basic credentials).
async fn session_token(addr: SocketAddr) -> String {
    use base64::Engine;
    use http_body_util::BodyExt;
    let tls = tls_connect(addr).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PAT}"));
    let req =
        http::Request::get("/jwt/auth?service=container_registry&scope=repository:ci/app:pull")
            .header("host", format!("localhost:{}", addr.port()))
            .header("authorization", format!("Basic {basic}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["token"].as_str().unwrap().to_owned()
}
