//! The server certificate check of every client regrelay makes (its upstream registries and token
//! services, `regrelay healthcheck`, `regrelay doctor`): rustls' WebPKI verifier over the system
//! roots and the operator's CA file, with one exception, the one Go (Docker, skopeo, containerd)
//! and curl make too: a certificate that is itself in the operator's CA file is trusted as the
//! server's own even when it carries the CA flag.
//!
//! `openssl req -x509 -newkey … -subj /CN=host -addext subjectAltName=DNS:host`, the usual way to
//! make a self-signed server certificate, sets basicConstraints CA:TRUE. WebPKI refuses such a
//! certificate as a server's (`CaUsedAsEndEntity`) even when the very same certificate is a trust
//! anchor; Go's `x509.Verify` accepts a leaf that is in the root pool as a chain of one, and
//! OpenSSL accepts a self-signed leaf it trusts directly. So the same file works with Docker and
//! curl and was refused by regrelay.
//!
//! The exception is narrow: only when WebPKI's reason is `CaUsedAsEndEntity`, and only when the
//! presented end-entity certificate is byte for byte one of the certificates of the CA file the
//! operator configured (never a system root). Its validity period has been checked by then
//! (WebPKI checks the end entity's dates before its basic constraints: rustls-webpki's
//! `check_issuer_independent_properties`; a test pins it with an expired and a not-yet-valid
//! certificate); its name is checked here with rustls' own `verify_server_name`; the handshake
//! signature is checked as for any certificate, with the provider's algorithms, which proves the
//! server holds the certificate's key. Every other refusal stands exactly as WebPKI gives it.
//!
//! This room does not load the system roots or read the file (that is `tls.rs`'s `roots` and
//! `load_certs`), and does not swap itself on reload (that is [`super::UpstreamTrust`]).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_name, WebPkiServerVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::ConfigError;
use crate::error::TlsRefused;

/// rustls' WebPKI verifier, and the certificates of the operator's CA file that may also serve as
/// a server's own certificate.
#[derive(Debug)]
pub struct Verifier {
    /// `None` when there is no root at all (no system bundle, no CA file): every certificate is
    /// then refused as untrusted, and plain HTTP still works.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    /// Every certificate of the operator's CA file, as its bytes.
    listed: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
}

impl Verifier {
    /// Verifies against `roots` (the system roots and `listed`); `listed` are the certificates of
    /// the operator's CA file.
    pub fn new(
        roots: RootCertStore,
        listed: Vec<CertificateDer<'static>>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Verifier, ConfigError> {
        let webpki = if roots.is_empty() {
            None
        } else {
            let built =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| ConfigError::Invalid {
                        key: "upstream_ca",
                        reason: e.to_string(),
                    })?;
            Some(built)
        };
        Ok(Verifier {
            webpki,
            listed,
            provider,
        })
    }

    /// The exception (see the module docs): `end_entity` is in the operator's file, and WebPKI
    /// refused it only for its CA flag, after its dates.
    fn listed_self(
        &self,
        end_entity: &CertificateDer<'_>,
        server_name: &ServerName<'_>,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_name(&cert, server_name)?;
        Ok(ServerCertVerified::assertion())
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Err(CertificateError::UnknownIssuer.into());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(e)
                if TlsRefused::is_ca_as_server(&e)
                    && self
                        .listed
                        .iter()
                        .any(|c| c.as_ref() == end_entity.as_ref()) =>
            {
                self.listed_self(end_entity, server_name)
            }
            verdict => verdict,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests;
