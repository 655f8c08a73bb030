//! The one exception to WebPKI (a certificate of the operator's CA file presented as the
//! server's own, CA flag and all) and what stays refused around it: another CA-flagged
//! certificate, another name, dates outside the validity period. The accepted case is a real
//! handshake (its signature is checked too); the refusals call the verifier directly. rcgen
//! certificates, made like `openssl req -x509 -addext subjectAltName=DNS:NAME` makes them.

use std::sync::Arc;

use rcgen::{date_time_ymd, BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::CertificateError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Verifier;
use crate::error::TlsRefused;

/// A self-signed certificate for `name` with the CA flag; `dates` overrides rcgen's validity
/// period (from now for years).
fn self_signed(
    name: &str,
    dates: Option<(i32, i32)>,
) -> (CertificateDer<'static>, String, KeyPair) {
    let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    if let Some((from, to)) = dates {
        params.not_before = date_time_ymd(from, 1, 1);
        params.not_after = date_time_ymd(to, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.der().clone(), cert.pem(), key)
}

/// A CA file holding `pems`.
fn ca_file(pems: &[&str]) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), pems.concat()).unwrap();
    file
}

/// The verifier of the system roots and `file`, as every client builds it.
fn verifier(file: &tempfile::NamedTempFile) -> Verifier {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    super::super::verifier(Some(file.path()), &provider).unwrap()
}

fn check(v: &Verifier, cert: &CertificateDer<'_>, name: &str) -> Result<(), rustls::Error> {
    let name = ServerName::try_from(name.to_owned()).unwrap();
    v.verify_server_cert(cert, &[], &name, &[], UnixTime::now())
        .map(|_| ())
}

#[tokio::test]
async fn a_self_signed_certificate_with_the_ca_flag_serves_when_the_file_holds_it() {
    let (cert, pem, key) = self_signed("localhost", None);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert],
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        tls.write_all(b"x").await.unwrap();
        tls.shutdown().await.unwrap();
    });
    let file = ca_file(&[&pem]);
    let client = crate::tls::client_config(Some(file.path())).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte).await.unwrap();
    assert_eq!(&byte, b"x");
    served.await.unwrap();
}

#[test]
fn everything_else_is_refused_as_before() {
    let (own, own_pem, _) = self_signed("localhost", None);
    let (stranger, stranger_pem, _) = self_signed("localhost", None);
    let (expired, expired_pem, _) = self_signed("localhost", Some((2000, 2001)));
    let (early, early_pem, _) = self_signed("localhost", Some((2999, 3000)));
    let v = verifier(&ca_file(&[&own_pem, &expired_pem, &early_pem]));
    assert_eq!(check(&v, &own, "localhost"), Ok(()));

    // A CA-flagged certificate that is not in the file, though one like it is.
    let refused = check(&v, &stranger, "localhost").unwrap_err();
    assert!(TlsRefused::is_ca_as_server(&refused), "{refused:?}");
    // In another file only: the same.
    let other = verifier(&ca_file(&[&stranger_pem]));
    let refused = check(&other, &own, "localhost").unwrap_err();
    assert!(TlsRefused::is_ca_as_server(&refused), "{refused:?}");

    // In the file, for another name.
    assert!(
        matches!(
            check(&v, &own, "registry.example.com"),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForNameContext { .. }
            ))
        ),
        "{:?}",
        check(&v, &own, "registry.example.com")
    );
    // In the file, outside its validity period: WebPKI checks the dates before the CA flag, so
    // the exception never sees these.
    assert!(
        matches!(
            check(&v, &expired, "localhost"),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ExpiredContext { .. }
            ))
        ),
        "{:?}",
        check(&v, &expired, "localhost")
    );
    assert!(
        matches!(
            check(&v, &early, "localhost"),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidYetContext { .. }
            ))
        ),
        "{:?}",
        check(&v, &early, "localhost")
    );
}
