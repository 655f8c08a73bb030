//! A TLS handshake with an upstream (a registry or its token service) that failed, explained:
//! the origin dialled, rustls' reason, and what to change (`--upstream-ca` for a CA regrelay does
//! not know, the name for a certificate issued to another one). [`crate::upstream`] returns it as
//! the connect error; the client is told only [`TlsRefused::public`], which names no address.

use std::fmt;
use std::path::PathBuf;

use rustls::CertificateError;

/// A refused TLS handshake with an upstream.
#[derive(Debug, Clone)]
pub struct TlsRefused {
    /// The origin dialled (`https://host:port`).
    pub origin: String,
    /// The extra CA file in force for it, when one is configured.
    pub ca: Option<PathBuf>,
    /// rustls' reason.
    pub reason: rustls::Error,
}

/// What went wrong, as far as what to change goes (also `regrelay healthcheck`'s words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Issued by a CA regrelay does not trust.
    Untrusted,
    /// A CA certificate presented as the server's own (a self-signed one made with the CA
    /// flag, as `openssl req -x509` does) that is not itself in the CA file.
    CaAsServer,
    /// Issued for other names than the one dialled.
    WrongName,
    /// Expired, or not valid yet.
    Dates,
    /// Any other certificate error.
    Certificate,
    /// The peer does not speak TLS here (a plain-HTTP port).
    NotTls,
    /// Anything else in the handshake.
    Handshake,
}

impl TlsRefused {
    /// The rustls error in `err` or its sources, when a TLS handshake failed. hyper-rustls wraps
    /// tokio-rustls' `io::Error` in another, and `source()` of an `io::Error` skips the error it
    /// holds, so both ways down are followed.
    pub fn find(err: &(dyn std::error::Error + 'static)) -> Option<rustls::Error> {
        let mut cur = Some(err);
        for _ in 0..8 {
            let e = cur?;
            if let Some(tls) = e.downcast_ref::<rustls::Error>() {
                return Some(tls.clone());
            }
            cur = match e.downcast_ref::<std::io::Error>() {
                Some(io) => io.get_ref().map(|inner| inner as _),
                None => e.source(),
            };
        }
        None
    }

    /// True when rustls' WebPKI verifier refused a certificate for its CA flag alone
    /// (`CaUsedAsEndEntity`, which rustls passes on as webpki's own error).
    pub fn is_ca_as_server(reason: &rustls::Error) -> bool {
        match reason {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => matches!(
                other.0.downcast_ref::<webpki::Error>(),
                Some(webpki::Error::CaUsedAsEndEntity)
            ),
            _ => false,
        }
    }

    fn kind(&self) -> Kind {
        Self::kind_of(&self.reason)
    }

    /// What kind of failure rustls' `reason` is.
    pub(crate) fn kind_of(reason: &rustls::Error) -> Kind {
        use CertificateError as C;
        if Self::is_ca_as_server(reason) {
            return Kind::CaAsServer;
        }
        match reason {
            rustls::Error::InvalidCertificate(c) => match c {
                C::UnknownIssuer | C::BadSignature => Kind::Untrusted,
                C::NotValidForName | C::NotValidForNameContext { .. } => Kind::WrongName,
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => Kind::Dates,
                _ => Kind::Certificate,
            },
            rustls::Error::InvalidMessage(_) => Kind::NotTls,
            _ => Kind::Handshake,
        }
    }

    /// What the client is told: the kind of failure and where to look, no address.
    pub fn public(&self) -> &'static str {
        match self.kind() {
            Kind::Untrusted => {
                "regrelay does not trust the upstream's TLS certificate (its CA is missing from \
                 --upstream-ca); see regrelay's log"
            }
            Kind::CaAsServer => {
                "regrelay does not trust the upstream's TLS certificate (a CA certificate \
                 presented as the server's own, not itself in --upstream-ca); see regrelay's log"
            }
            Kind::WrongName => {
                "the upstream's TLS certificate is not valid for the name regrelay reaches it \
                 by; see regrelay's log"
            }
            Kind::Dates => {
                "the upstream's TLS certificate is expired or not valid yet; see regrelay's log"
            }
            Kind::Certificate => {
                "regrelay refused the upstream's TLS certificate; see regrelay's log"
            }
            Kind::NotTls | Kind::Handshake => {
                "the TLS handshake with the upstream failed; see regrelay's log"
            }
        }
    }
}

impl fmt::Display for TlsRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (origin, reason) = (&self.origin, &self.reason);
        match self.kind() {
            Kind::Untrusted => {
                write!(
                    f,
                    "the TLS certificate of {origin} is not issued by a CA regrelay trusts \
                     ({reason}); pass the CA that issued it with --upstream-ca PEM (`ca` in an \
                     [[upstream]] table), then restart regrelay or send it SIGHUP"
                )?;
                match &self.ca {
                    Some(ca) => write!(f, " (trusted now: the system roots and {})", ca.display()),
                    None => f.write_str(" (trusted now: the system roots only)"),
                }
            }
            Kind::CaAsServer => write!(
                f,
                "the TLS certificate of {origin} is a CA certificate presented as the server's \
                 own ({reason}: a self-signed certificate made with the CA flag, as `openssl \
                 req -x509` makes it); it is trusted as the server's only when the --upstream-ca \
                 file (`ca` in an [[upstream]] table) holds that very certificate: put it there, \
                 then restart regrelay or send it SIGHUP{}",
                match &self.ca {
                    Some(ca) =>
                        format!(" (the file now: {}, which does not hold it)", ca.display()),
                    None => " (no CA file is configured)".to_owned(),
                }
            ),
            Kind::WrongName => write!(
                f,
                "the TLS certificate of {origin} does not name the host regrelay dials \
                 ({reason}); use a name the certificate lists in the upstream URL, or reissue \
                 the certificate with this host in its subjectAltName"
            ),
            Kind::Dates => write!(
                f,
                "the TLS certificate of {origin} is outside its validity period ({reason}); \
                 renew it, or check the clock of this host"
            ),
            Kind::Certificate => write!(f, "the TLS certificate of {origin} is refused ({reason})"),
            Kind::NotTls => write!(
                f,
                "TLS handshake with {origin} failed ({reason}); does it serve HTTPS on this \
                 port? a plain-HTTP registry takes an http:// URL"
            ),
            Kind::Handshake => write!(f, "TLS handshake with {origin} failed ({reason})"),
        }
    }
}

/// The reason is part of the message, so it is not repeated as a source.
impl std::error::Error for TlsRefused {}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;

    fn refused(reason: rustls::Error, ca: Option<&str>) -> TlsRefused {
        TlsRefused {
            origin: "https://registry.internal:5000".into(),
            ca: ca.map(PathBuf::from),
            reason,
        }
    }

    #[test]
    fn each_failure_names_the_origin_the_reason_and_the_fix() {
        let wrong_name = CertificateError::NotValidForNameContext {
            expected: ServerName::try_from("registry.internal").unwrap(),
            presented: vec!["DnsName(\"other.example\")".into()],
        };
        let cases = [
            (
                refused(CertificateError::UnknownIssuer.into(), None),
                vec!["UnknownIssuer", "--upstream-ca", "system roots only"],
            ),
            (
                refused(CertificateError::UnknownIssuer.into(), Some("/etc/ca.pem")),
                vec!["--upstream-ca", "system roots and /etc/ca.pem"],
            ),
            (
                refused(
                    CertificateError::Other(rustls::OtherError(std::sync::Arc::new(
                        webpki::Error::CaUsedAsEndEntity,
                    )))
                    .into(),
                    Some("/etc/ca.pem"),
                ),
                vec![
                    "CaUsedAsEndEntity",
                    "openssl req -x509",
                    "that very certificate",
                    "--upstream-ca",
                    "/etc/ca.pem",
                ],
            ),
            (
                refused(wrong_name.into(), Some("/etc/ca.pem")),
                vec!["does not name the host", "other.example", "subjectAltName"],
            ),
            (
                refused(CertificateError::Expired.into(), None),
                vec!["validity period", "clock"],
            ),
            (
                refused(
                    rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
                    None,
                ),
                vec!["serve HTTPS", "http://"],
            ),
        ];
        for (err, needles) in cases {
            let text = err.to_string();
            assert!(text.contains("https://registry.internal:5000"), "{text}");
            for n in needles {
                assert!(text.contains(n), "{n:?} missing from {text}");
            }
            let public = err.public();
            assert!(!public.contains("registry.internal"), "{public}");
            assert!(!public.contains("/etc/ca.pem"), "{public}");
        }
    }

    #[test]
    fn the_rustls_error_is_found_inside_nested_io_errors() {
        let tls = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let inner = std::io::Error::new(std::io::ErrorKind::InvalidData, tls.clone());
        let outer: Box<dyn std::error::Error + Send + Sync> =
            Box::new(std::io::Error::other(inner));
        assert_eq!(TlsRefused::find(outer.as_ref()), Some(tls));
        let plain: Box<dyn std::error::Error + Send + Sync> = "connection refused".into();
        assert_eq!(TlsRefused::find(plain.as_ref()), None);
    }
}
