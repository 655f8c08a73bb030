//! The request handler: routes a request, runs the matching handler, and turns any error into
//! the registry's JSON error format. Following the outer/inner split, [`App::handle`] logs and
//! builds synthetic responses; [`App::handle_inner`] returns `Result` and uses `?`.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::uri::Scheme;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::{self, ProxyBody};
use crate::config::{Config, Origin};
use crate::error::Error;
use crate::proxy::{self, Forward};
use crate::router::{self, Route};
use crate::telemetry::{AccessLog, Logged};
use crate::upstream::Upstream;

/// The connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// Shared state of the server: one per process, behind an `Arc`.
pub struct App {
    config: Config,
    upstream: Upstream,
}

impl App {
    /// Builds the state from a validated config.
    pub fn new(config: Config) -> App {
        let upstream = Upstream::new(&config);
        App { config, upstream }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Handles one request; never fails, and logs it once when its response body is done.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Response<Logged<ProxyBody>> {
        let mut log = AccessLog {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            peer: conn.peer.ip(),
            start: Instant::now(),
            status: 0,
            upstream_status: None,
            bytes_in: Arc::new(AtomicU64::new(0)),
            bytes_out: 0,
            complete: false,
        };
        let resp = match self.handle_inner(req, conn, &mut log).await {
            Ok(resp) => resp,
            Err(err) => {
                tracing::warn!(path = %log.path, status = err.status().as_u16(), error = %err.chain(), "request failed");
                error_response(&err)
            }
        };
        log.status = resp.status().as_u16();
        resp.map(|b| Logged::new(b, log))
    }

    async fn handle_inner(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        log: &mut AccessLog,
    ) -> Result<Response<ProxyBody>, Error> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let public_url = self.config.public_url.as_ref();
        let route = router::route(req.method(), req.uri(), req.version(), public_url)?;
        match route {
            Route::Healthy => Ok(json(StatusCode::OK, r#"{"status":"ok"}"#.to_owned())),
            Route::Ready => Ok(self.ready().await),
            Route::Registry => {
                let public = self.public_origin(host.as_deref(), conn)?;
                let fwd = Forward {
                    peer: conn.peer.ip(),
                    public: &public,
                    idle: self.config.timeouts.body_idle,
                    bytes_in: log.bytes_in.clone(),
                };
                let resp = proxy::forward(&self.upstream, req, &fwd).await?;
                log.upstream_status = Some(resp.status().as_u16());
                Ok(resp)
            }
        }
    }

    /// The origin clients use: the configured public URL, else the request's Host and scheme.
    fn public_origin(&self, host: Option<&str>, conn: ConnInfo) -> Result<Origin, Error> {
        if let Some(public) = &self.config.public_url {
            return Ok(public.clone());
        }
        let scheme = if conn.tls {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        host.and_then(|h| Origin::from_parts(scheme, h))
            .ok_or(Error::Refused {
                reason: "missing or invalid Host header",
            })
    }

    /// `/-/ready`: 200 when the upstream answers HTTP at all, else 503 ("not ready" is not a
    /// gateway error of a proxied request, so it is not the 502 of [`Error::status`]).
    async fn ready(&self) -> Response<ProxyBody> {
        match self.upstream.probe().await {
            Ok(status) => {
                let body = serde_json::json!({
                    "status": "ready",
                    "upstream": self.upstream.origin().to_string(),
                    "upstream_status": status.as_u16(),
                });
                json(StatusCode::OK, body.to_string())
            }
            Err(err) => {
                tracing::warn!(error = %err.chain(), "not ready");
                json(StatusCode::SERVICE_UNAVAILABLE, err.registry_body())
            }
        }
    }
}

fn json(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// The synthetic answer for an error: its status, registry JSON error body.
pub fn error_response(err: &Error) -> Response<ProxyBody> {
    let mut resp = json(err.status(), err.registry_body());
    if let Error::MethodNotAllowed { .. } = err {
        resp.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE"),
        );
    }
    resp
}
