//! `regrelay healthcheck`: asks a running regrelay's health endpoint and exits 0 when it answers
//! 200. For container `HEALTHCHECK`s and exec probes in images without a shell or curl.
//!
//! A failure names its cause and the fix, read from the error's sources (hyper-util's own words,
//! `client error (Connect)`, name none): nothing listening, a name that does not resolve, https
//! spoken to a plain-HTTP port or http to a TLS one, a certificate refused (and why), no answer
//! in time. Certificates are checked like every client of regrelay's checks them
//! ([`crate::tls::client_config`]).

use std::path::Path;
use std::time::Duration;

use http::{Request, StatusCode, Uri};
use http_body_util::Empty;

use crate::error::{TlsKind, TlsRefused};

/// Default URL: the liveness endpoint on the default listener.
pub const DEFAULT_URL: &str = "http://127.0.0.1:5000/-/healthy";

/// Why a health check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The URL or CA file is unusable.
    #[error("{0}")]
    Usage(String),
    /// No answer, or an answer other than 200.
    #[error("{0}")]
    Unhealthy(String),
}

/// `GET url` within `timeout`; `Ok(())` on 200. An https URL is checked against the system roots
/// plus `ca_file`.
pub async fn check(url: &str, ca_file: Option<&Path>, timeout: Duration) -> Result<(), CheckError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| CheckError::Usage(format!("--url {url:?}: {e}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(CheckError::Usage(format!(
            "--url {url:?}: want http(s)://HOST:PORT/PATH"
        )));
    }
    let client = crate::tls::one_shot_client::<Empty<bytes::Bytes>>(ca_file, timeout)
        .map_err(|e| CheckError::Usage(e.to_string()))?;
    let req = Request::get(uri)
        .header(http::header::USER_AGENT, "regrelay-healthcheck")
        .body(Empty::new())
        .map_err(|e| CheckError::Usage(e.to_string()))?;
    let uri = req.uri().clone();
    let status = match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => {
            return Err(CheckError::Unhealthy(format!(
                "{url}: no answer within {} s: a port that accepts connections but does not \
                 answer (is it regrelay's --listen port, or another program's?), or a regrelay \
                 too busy to answer; give it longer with --timeout-secs",
                timeout.as_secs()
            )))
        }
        Ok(Err(e)) => return Err(CheckError::Unhealthy(explain(&e, &uri, ca_file))),
        Ok(Ok(resp)) => resp.status(),
    };
    if status == StatusCode::OK {
        Ok(())
    } else {
        Err(CheckError::Unhealthy(format!("{url}: {status}")))
    }
}

/// Why `uri` got no answer, and what to change: the first cause found among `err`'s sources.
fn explain(err: &hyper_util::client::legacy::Error, uri: &Uri, ca_file: Option<&Path>) -> String {
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().unwrap_or_default();
    let address = uri.authority().map_or(host, |a| a.as_str());
    if let Some(reason) = TlsRefused::find(err) {
        let plain_url = format!("http://{address}{}", uri.path());
        return format!("{uri}: {}", tls_refused(&reason, host, &plain_url, ca_file));
    }
    let mut chain = vec![];
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return format!(
                    "{uri}: nothing listens at {address} (connection refused): is regrelay \
                     running, and is this the address and port of its --listen? pass that one \
                     with --url"
                );
            }
        }
        // hyper-util's resolver failure ("dns error", its source says why).
        if e.to_string() == "dns error" {
            let why = e.source().map(|s| format!(" ({s})")).unwrap_or_default();
            return format!(
                "{uri}: cannot resolve {host}{why}: check the host name in --url (127.0.0.1 \
                 reaches a regrelay in the same container or pod)"
            );
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if !https && (h.is_parse() || h.is_incomplete_message()) {
                let tls_url = format!("https://{address}{}", uri.path());
                return format!(
                    "{uri}: the answer is not HTTP ({h}): this port speaks TLS (regrelay with \
                     --tls-cert serves HTTPS only); use {tls_url} in --url, with --ca-file for a \
                     private CA"
                );
            }
        }
        let text = e.to_string();
        if !text.starts_with("client error (") && !chain.iter().any(|c: &String| c.contains(&text))
        {
            chain.push(text);
        }
        cur = e.source();
    }
    format!("{uri}: {}", chain.join(": "))
}

/// A refused TLS handshake in `regrelay healthcheck`'s words: rustls' reason and the flag to
/// change.
fn tls_refused(
    reason: &rustls::Error,
    host: &str,
    plain_url: &str,
    ca_file: Option<&Path>,
) -> String {
    let trusted = match ca_file {
        Some(ca) => format!("the system roots and {}", ca.display()),
        None => "the system roots only".to_owned(),
    };
    match TlsRefused::kind_of(reason) {
        TlsKind::Untrusted => format!(
            "the TLS certificate is not issued by a CA this check trusts ({reason}; trusted: \
             {trusted}): pass the CA that issued it, or a self-signed certificate itself, with \
             --ca-file PEM"
        ),
        TlsKind::CaAsServer => format!(
            "the TLS certificate is a CA certificate presented as the server's own ({reason}: \
             a self-signed certificate made with the CA flag, as `openssl req -x509` makes it), \
             and the CA file does not hold it (trusted: {trusted}): pass that very certificate \
             with --ca-file PEM"
        ),
        TlsKind::WrongName => format!(
            "the TLS certificate does not name {host} ({reason}): use in --url a name the \
             certificate lists (its subjectAltName)"
        ),
        TlsKind::Dates => format!(
            "the TLS certificate is outside its validity period ({reason}): renew regrelay's \
             --tls-cert, or check this host's clock"
        ),
        TlsKind::NotTls => format!(
            "no TLS on this port ({reason}): it speaks plain HTTP (regrelay without --tls-cert); \
             use {plain_url} in --url"
        ),
        TlsKind::Certificate | TlsKind::Handshake => {
            format!("the TLS handshake failed ({reason})")
        }
    }
}
