//! Trust in the upstreams' certificates (a registry and its token service): the system roots plus
//! the optional `--upstream-ca` (`ca` in an `[[upstream]]` table) file, checked by the one
//! verifier of every client (`tls/verifier.rs`: rustls' WebPKI verifier, and a self-signed
//! certificate that is itself in the file trusted even with the CA flag), and replaceable while
//! serving ([`UpstreamTrust::reload`], on SIGHUP).
//!
//! The upstream clients keep their pools across a reload: connections already open stay (they
//! were verified when they opened), and every handshake after it is verified against the new
//! roots. TLS sessions remembered under the old roots are forgotten at the same moment, so no
//! connection resumes past a CA that was just removed. This room does not explain a refused
//! certificate (that is [`crate::error::TlsRefused`]) and does not dial (that is
//! [`crate::upstream`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Resumption, Tls12ClientSessionValue,
    Tls13ClientSessionValue,
};
use rustls::crypto::ring::default_provider;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, NamedGroup, SignatureScheme};

use super::Verifier;
use crate::config::ConfigError;

/// TLS sessions remembered for resumption (rustls' default).
const MAX_SESSIONS: usize = 256;

/// The roots the upstream clients of one configured upstream verify against; one per upstream,
/// shared by its registry client and its token service client.
pub struct UpstreamTrust {
    ca: Option<PathBuf>,
    provider: Arc<CryptoProvider>,
    verifier: ArcSwap<Verifier>,
    sessions: ArcSwap<ClientSessionMemoryCache>,
}

impl std::fmt::Debug for UpstreamTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTrust")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl UpstreamTrust {
    /// Reads the system roots and `ca` (every certificate in it).
    pub fn load(ca: Option<&Path>) -> Result<Arc<UpstreamTrust>, ConfigError> {
        let provider = Arc::new(default_provider());
        let verifier = super::verifier(ca, &provider)?;
        Ok(Arc::new(UpstreamTrust {
            ca: ca.map(Path::to_owned),
            provider,
            verifier: ArcSwap::from_pointee(verifier),
            sessions: ArcSwap::from_pointee(ClientSessionMemoryCache::new(MAX_SESSIONS)),
        }))
    }

    /// Reads the system roots and the CA file again; on any error the roots in force stay and
    /// the error is returned.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let fresh = super::verifier(self.ca.as_deref(), &self.provider)?;
        self.verifier.store(Arc::new(fresh));
        self.sessions
            .store(Arc::new(ClientSessionMemoryCache::new(MAX_SESSIONS)));
        Ok(())
    }

    /// The extra CA file, when one is configured.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    /// A client config verifying with whatever roots are in force at each handshake.
    pub fn client_config(self: &Arc<Self>) -> ClientConfig {
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports TLS 1.2 and 1.3")
            // rustls calls a verifier of one's own "dangerous"; this one is tls/verifier.rs's
            // (rustls' WebPKI verifier and its one exception) behind a reference that SIGHUP
            // replaces.
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        cfg.resumption = Resumption::store(self.clone());
        cfg
    }

    /// The verifier in force: a lock-free load, so a reload never waits for a handshake and a
    /// handshake never waits for (or is poisoned by) anything.
    fn current(&self) -> Arc<Verifier> {
        self.verifier.load_full()
    }

    fn sessions(&self) -> Arc<ClientSessionMemoryCache> {
        self.sessions.load_full()
    }
}

impl ServerCertVerifier for UpstreamTrust {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.current().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// Resumption goes through the store of the roots in force: a reload starts an empty one.
impl ClientSessionStore for UpstreamTrust {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.sessions().set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.sessions().kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.sessions().set_tls12_session(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.sessions().tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.sessions().remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.sessions().insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.sessions().take_tls13_ticket(server_name)
    }
}

#[cfg(test)]
mod tests;
