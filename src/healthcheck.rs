//! `regrelay healthcheck`: asks a running regrelay's health endpoint and exits 0 when it answers
//! 200. For container `HEALTHCHECK`s and exec probes in images without a shell or curl.

use std::path::Path;
use std::time::Duration;

use http::{Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

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
    let tls = crate::tls::client_config(ca_file).map_err(|e| CheckError::Usage(e.to_string()))?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let req = Request::get(uri)
        .header(http::header::USER_AGENT, "regrelay-healthcheck")
        .body(Empty::new())
        .map_err(|e| CheckError::Usage(e.to_string()))?;
    let status = match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => {
            return Err(CheckError::Unhealthy(format!(
                "{url}: no answer within {timeout:?}"
            )))
        }
        Ok(Err(e)) => return Err(CheckError::Unhealthy(format!("{url}: {e}"))),
        Ok(Ok(resp)) => resp.status(),
    };
    if status == StatusCode::OK {
        Ok(())
    } else {
        Err(CheckError::Unhealthy(format!("{url}: {status}")))
    }
}
