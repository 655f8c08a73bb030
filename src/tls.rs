//! rustls configuration: the server side (regrelay's HTTPS listener, ALPN h2 + http/1.1) and the
//! client side (to the upstream: system roots plus an optional extra CA bundle). Every client
//! checks certificates with one verifier (`tls/verifier.rs`: rustls' WebPKI, and a self-signed
//! certificate that is itself in the CA file trusted even with the CA flag, as Go and curl trust
//! it). The upstream clients' trust is reloadable ([`UpstreamTrust`], in `tls/trust.rs`);
//! [`client_config`] is the fixed one of the one-shot clients (`regrelay healthcheck`,
//! `regrelay doctor`). Uses the ring
//! provider explicitly, so no process-wide default provider has to be installed. Errors are
//! [`ConfigError`]s naming the key, because these run while the configuration is validated.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use rustls::crypto::ring::default_provider;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::ConfigError;

mod trust;
mod verifier;

pub use trust::UpstreamTrust;
use verifier::Verifier;

fn invalid(key: &'static str, path: &Path, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: format!("{}: {reason}", path.display()),
    }
}

fn load_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| invalid(key, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, path, e))?;
    if certs.is_empty() {
        return Err(invalid(key, path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// The server's certificate and key, replaceable while serving ([`ServerCert::reload`], on
/// SIGHUP): handshakes after a reload present the new pair; connections already open keep theirs.
#[derive(Debug)]
pub struct ServerCert {
    cert: PathBuf,
    key: PathBuf,
    /// Read on every handshake: lock-free, and no panic anywhere can poison it.
    current: ArcSwap<CertifiedKey>,
}

impl ServerCert {
    /// Loads the PEM chain and key (they must match).
    pub fn load(cert: &Path, key: &Path) -> Result<ServerCert, ConfigError> {
        Ok(ServerCert {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: ArcSwap::from_pointee(certified_key(cert, key)?),
        })
    }

    /// Reads the files again; on any error the pair in force stays and the error is returned.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let fresh = certified_key(&self.cert, &self.key)?;
        self.current.store(Arc::new(fresh));
        Ok(())
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // Every handshake passes here: a lock-free load, so a reload never makes a handshake
        // wait and no panic elsewhere can make every later handshake fail.
        Some(self.current.load_full())
    }
}

fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, ConfigError> {
    for (name, path) in [("tls_cert", cert), ("tls_key", key)] {
        if path.is_dir() {
            return Err(invalid(
                name,
                path,
                "is a directory: give the path of the PEM file itself",
            ));
        }
    }
    let chain = load_certs("tls_cert", cert)?;
    // The key's own parse error says nothing secret (it never echoes key bytes).
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| invalid("tls_key", key, e))?;
    CertifiedKey::from_der(chain, private, &default_provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => invalid(
            "tls_key",
            key,
            format!(
                "this private key does not belong to the certificate in {} (their public keys \
                 differ): give --tls-key the key the certificate was issued for",
                cert.display()
            ),
        ),
        e => invalid("tls_key", key, e),
    })
}

/// A warning when the TLS key file can be read by other users (it is used as it is: many setups
/// ship it so, and refusing it would stop them at the next start; the session key ring and
/// credential files, new with regrelay, are refused instead).
pub fn key_file_warning(key: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(key).ok()?;
    let mode = meta.mode();
    (mode & 0o004 != 0).then(|| {
        format!(
            "the TLS private key {} is readable by every user (mode {:04o}): `chmod 600` it (or \
             0640 with a group of the service)",
            key.display(),
            mode & 0o7777
        )
    })
}

/// Server config presenting `cert`'s current pair; advertises h2 and http/1.1.
pub fn server_config(cert: Arc<ServerCert>) -> Result<Arc<ServerConfig>, ConfigError> {
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("tls_cert", &cert.cert, e))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A one-shot HTTPS (or plain HTTP) client for regrelay's own commands (`doctor`,
/// `healthcheck`): [`client_config`]'s trust, HTTP/1.1, TCP connects bounded by
/// `connect_timeout`. (The proxy's upstream clients add a bounded pool and reloadable trust:
/// `upstream.rs`, on the same verifier.)
pub fn one_shot_client<B>(
    extra_ca: Option<&Path>,
    connect_timeout: std::time::Duration,
) -> Result<OneShotClient<B>, ConfigError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let tls = client_config(extra_ca)?;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https),
    )
}

/// What [`one_shot_client`] builds.
pub type OneShotClient<B> = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    B,
>;

/// Client config for a one-shot client: system roots, plus every certificate in `extra_ca`.
pub fn client_config(extra_ca: Option<&Path>) -> Result<ClientConfig, ConfigError> {
    let provider = Arc::new(default_provider());
    let verifier = Arc::new(verifier(extra_ca, &provider)?);
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Invalid {
            key: "upstream_ca",
            reason: e.to_string(),
        })?
        // rustls calls a verifier of one's own "dangerous"; this one is rustls' WebPKI verifier
        // with the single exception tls/verifier.rs documents.
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(cfg)
}

/// The verifier over the system roots plus every certificate in `extra_ca` (which may also be
/// a server's own certificate: tls/verifier.rs).
fn verifier(
    extra_ca: Option<&Path>,
    provider: &Arc<CryptoProvider>,
) -> Result<Verifier, ConfigError> {
    let mut roots = RootCertStore::empty();
    // Unreadable system certificates are skipped: an explicit CA file still works.
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let mut listed = vec![];
    if let Some(path) = extra_ca {
        listed = load_certs("upstream_ca", path)?;
        for cert in &listed {
            roots
                .add(cert.clone())
                .map_err(|e| invalid("upstream_ca", path, e))?;
        }
    }
    Verifier::new(roots, listed, provider.clone())
}
