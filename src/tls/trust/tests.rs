//! A reload replaces the roots for the next handshake and forgets resumable sessions; a CA file
//! that fails to load leaves the roots in force. Real TLS (rustls server on 127.0.0.1:0),
//! certificates made by rcgen.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CertificateError, HandshakeKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::UpstreamTrust;

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    Ca {
        pem,
        issuer: Issuer::new(params, key),
    }
}

/// Serves TLS as `localhost` with a leaf of `ca`, writing one byte on each connection (so the
/// client reads the session tickets sent before it).
async fn server(ca: &Ca) -> std::net::SocketAddr {
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca.issuer)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"x").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Connects as `localhost`: how the handshake went, or rustls' reason for refusing it.
async fn connect(
    connector: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
) -> Result<HandshakeKind, rustls::Error> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.map_err(|e| {
        e.get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .cloned()
            .unwrap_or_else(|| panic!("not a rustls error: {e}"))
    })?;
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte).await.unwrap();
    Ok(tls.get_ref().1.handshake_kind().unwrap())
}

fn untrusted(res: Result<HandshakeKind, rustls::Error>) -> bool {
    matches!(
        res,
        Err(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        ))
    )
}

#[tokio::test]
async fn a_reload_trusts_the_new_ca_at_once_and_resumes_nothing_from_the_old_one() {
    let (ca1, ca2) = (ca("ca one"), ca("ca two"));
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &ca1.pem).unwrap();
    let trust = UpstreamTrust::load(Some(file.path())).unwrap();
    // One config for every connection, as an upstream client has (rustls resumes a session
    // only under the config's own verifier and client-certificate resolver).
    let tls = tokio_rustls::TlsConnector::from(Arc::new(trust.client_config()));
    let (old, new) = (server(&ca1).await, server(&ca2).await);

    assert!(untrusted(connect(&tls, new).await));
    assert_eq!(connect(&tls, old).await, Ok(HandshakeKind::Full));
    assert_eq!(connect(&tls, old).await, Ok(HandshakeKind::Resumed));

    std::fs::write(file.path(), &ca2.pem).unwrap();
    trust.reload().unwrap();
    // Tickets of the old server are still in hand without the swap of the session store: the
    // connection would resume past the CA just removed.
    assert!(untrusted(connect(&tls, old).await));
    assert_eq!(connect(&tls, new).await, Ok(HandshakeKind::Full));
}

#[tokio::test]
async fn a_ca_file_that_fails_to_load_keeps_the_roots_in_force() {
    let ca1 = ca("ca one");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &ca1.pem).unwrap();
    let trust = UpstreamTrust::load(Some(file.path())).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(trust.client_config()));
    let addr = server(&ca1).await;
    for bad in ["", "not a certificate\n"] {
        std::fs::write(file.path(), bad).unwrap();
        let err = trust.reload().unwrap_err().to_string();
        assert!(err.contains(&file.path().display().to_string()), "{err}");
        assert!(connect(&tls, addr).await.is_ok(), "the old roots stay");
    }
    // A garbled certificate block: refused too.
    let der = CertificateDer::from(b"garbage".to_vec());
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der)
    );
    std::fs::write(file.path(), pem).unwrap();
    assert!(trust.reload().is_err());
    assert!(connect(&tls, addr).await.is_ok());
}
