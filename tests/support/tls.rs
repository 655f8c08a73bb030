//! Private CAs made for one test (rcgen, in process): a CA, the leaves it issues for given names,
//! their PEM files (for `docker-registry`'s `http.tls` and regrelay's `--upstream-ca`) and a
//! rustls server config (for the in-process GitLab stand-in). Fresh keys every run; nothing here
//! is trusted outside the test that made it. The fixed test CA of `certs/` is for regrelay's own
//! listener; these are for upstreams that a test rotates or breaks.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A CA of the test's own.
pub struct TestCa {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A leaf certificate and its key, as PEM files.
pub struct Leaf {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PKCS#8 PEM).
    pub key: PathBuf,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl TestCa {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &pem).unwrap();
        TestCa {
            dir,
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// Its certificate as a PEM file.
    pub fn pem_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Its certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A server certificate for `names` (DNS names or IP addresses, its subjectAltName).
    pub fn issue(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        Leaf {
            cert: cert_path,
            key: key_path,
            der: cert.der().clone(),
            key_der: key.serialize_der(),
            _dir: dir,
        }
    }
}

impl Leaf {
    /// A self-signed certificate for `names` with the CA flag set, as `openssl req -x509
    /// -newkey rsa:2048 -subj /CN=NAME -addext subjectAltName=DNS:NAME` makes it (basicConstraints
    /// CA:TRUE): its own PEM file is the CA file that trusts it (Docker's certs.d, skopeo's
    /// --cert-dir, curl's --cacert all accept it so).
    pub fn self_signed_ca(names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        Leaf {
            cert: cert_path,
            key: key_path,
            der: cert.der().clone(),
            key_der: key.serialize_der(),
            _dir: dir,
        }
    }

    /// A rustls server config presenting this certificate (HTTP/1.1 and h2).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![self.der.clone()],
                PrivateKeyDer::try_from(self.key_der.clone()).unwrap(),
            )
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}
