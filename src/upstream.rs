//! The only place that dials sockets: a pooled hyper-util client to the configured upstream
//! registry, over http or https (rustls). It never follows redirects, so a `Location` to object
//! storage goes back to the client untouched and regrelay's `Authorization` handling stays in
//! [`crate::proxy`]. Connect has a deadline; nothing else does (uploads may stream for hours).

use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::body::{self, ProxyBody};
use crate::config::{Config, Origin};
use crate::error::Error;

/// How long `/-/ready` waits for the upstream.
pub const READY_TIMEOUT_SECS: u64 = 5;

/// Pooled client bound to one upstream origin.
#[derive(Clone)]
pub struct Upstream {
    origin: Origin,
    body_idle: Duration,
    client: Client<HttpsConnector<HttpConnector>, ProxyBody>,
}

impl Upstream {
    /// Builds the client from the validated config.
    pub fn new(cfg: &Config) -> Upstream {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.timeouts.upstream_connect));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(cfg.upstream_tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Upstream {
            origin: cfg.registry.clone(),
            body_idle: cfg.timeouts.body_idle,
            client,
        }
    }

    /// The upstream origin.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// Sends a request whose URI is already absolute on the upstream origin.
    /// Errors name the origin the request went to (the registry, or the token service).
    pub async fn send(&self, req: Request<ProxyBody>) -> Result<Response<Incoming>, Error> {
        let target = Origin::of(req.uri()).unwrap_or_else(|| self.origin.clone());
        self.client.request(req).await.map_err(|e| {
            let upstream = target.to_string();
            if crate::body::is_idle_timeout(&e) {
                Error::ClientIdle {
                    secs: self.body_idle.as_secs(),
                }
            } else if e.is_connect() {
                Error::UpstreamUnreachable {
                    upstream,
                    source: Box::new(e),
                }
            } else {
                Error::UpstreamFailed {
                    upstream,
                    source: Box::new(e),
                }
            }
        })
    }

    /// Readiness: the upstream answers `GET /v2/` with any HTTP status (401 is the normal answer of
    /// a registry with token auth).
    pub async fn probe(&self) -> Result<http::StatusCode, Error> {
        self.probe_response().await.map(|r| r.status())
    }

    /// `GET /v2/` on the upstream, with the readiness deadline (its challenge names the realm).
    pub async fn probe_response(&self) -> Result<Response<Incoming>, Error> {
        let req = Request::get(self.origin.join("/v2/")?).body(body::empty())?;
        let timeout = Duration::from_secs(READY_TIMEOUT_SECS);
        match tokio::time::timeout(timeout, self.send(req)).await {
            Ok(res) => res,
            Err(elapsed) => Err(Error::UpstreamUnreachable {
                upstream: self.origin.to_string(),
                source: Box::new(elapsed),
            }),
        }
    }
}
