//! The response an error becomes: the registry's JSON error format, its status, and the headers
//! it implies. Next to the error type so every error's answer is written in one place.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::Error;

/// A JSON response (`application/json; charset=utf-8`).
pub fn json_response(status: StatusCode, body: String) -> Response<String> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

impl Error {
    /// The synthetic answer for an error: its status, registry JSON error body, and the headers
    /// it implies (`Allow`, `WWW-Authenticate`, `Retry-After`).
    pub fn response(&self) -> Response<String> {
        let err = self;
        let mut resp = json_response(err.status(), err.registry_body());
        match err {
            Error::MethodNotAllowed { .. } => {
                resp.headers_mut().insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE"),
                );
            }
            Error::Unauthorized { challenge, .. } => {
                if let Ok(v) = HeaderValue::from_str(challenge) {
                    resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
            }
            _ => {}
        }
        if let Some(secs) = err.retry_after() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
