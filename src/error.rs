//! The one error type of the request path, and the single place where an error becomes a status.
//!
//! Every variant says who is to blame ([`Blame`]); [`Error::status`] derives the HTTP status from
//! that, and [`Error::registry_code`] the code of the registry's JSON error format
//! (`{"errors":[{"code","message","detail"}]}`), so clients print something a user can act on.
//! Display strings are lowercase and never carry a secret: no header value is ever formatted here.

use http::StatusCode;

/// Boxed error used for body and client errors that cross crate boundaries.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Who caused a failure; decides the status class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The client sent something we refuse (4xx).
    Client,
    /// The upstream registry failed or could not be reached (502/504).
    Upstream,
    /// A bug or resource problem in regrelay itself (500).
    Internal,
}

/// Errors on the request path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Path outside the registry API, the token realm and the health endpoints.
    #[error("{path} is not served here: regrelay proxies the registry API under /v2/ only")]
    NotFound {
        /// The refused path (no query).
        path: String,
    },
    /// A method the route does not allow (CONNECT, TRACE, ...).
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed {
        /// The refused method.
        method: http::Method,
        /// The path it was sent to.
        path: String,
    },
    /// The request names another origin than this proxy (absolute-form target, dot segments).
    #[error("refused request target: {reason}")]
    Refused {
        /// Why the target was refused.
        reason: &'static str,
    },
    /// The client stopped sending its body for longer than the idle timeout.
    #[error("client body idle for more than {secs} s")]
    ClientIdle {
        /// The configured idle timeout.
        secs: u64,
    },
    /// The upstream could not be reached (DNS, connect, TLS).
    #[error("upstream registry {upstream} is unreachable")]
    UpstreamUnreachable {
        /// The upstream origin.
        upstream: String,
        /// What failed.
        #[source]
        source: BoxError,
    },
    /// The upstream connection failed after the request was sent.
    #[error("upstream registry {upstream} failed")]
    UpstreamFailed {
        /// The upstream origin.
        upstream: String,
        /// What failed.
        #[source]
        source: BoxError,
    },
    /// regrelay refused the request's credentials itself (a sealed session that is tampered
    /// with, expired, or sealed with an unknown key; or credentials GitLab no longer accepts).
    /// Answered 401 with `challenge` in `WWW-Authenticate`, so the client asks for a new token.
    #[error("authentication required: {reason}")]
    Unauthorized {
        /// Why (never a secret).
        reason: String,
        /// A fresh `Bearer` challenge pointing at regrelay's realm.
        challenge: String,
    },
    /// GitLab refused to mint a token for a session (revoked credential, lost permission…).
    #[error("token service answered {status}: {message}")]
    MintFailed {
        /// GitLab's status.
        status: u16,
        /// GitLab's error message (registry error format), or the status text.
        message: String,
    },
    /// The token service redirected somewhere `Authorization` must not go.
    #[error(
        "token service redirected to {target}, which is not an allowed origin for credentials; \
         if it is your GitLab, allow it with --auth-redirect-allow {target}"
    )]
    AuthRedirectRefused {
        /// The refused target (`host[:port]`).
        target: String,
    },
    /// The token service kept redirecting.
    #[error("token service redirected more than {limit} times")]
    TooManyRedirects {
        /// Hops followed.
        limit: usize,
    },
    /// The token service answered 200 without a usable token.
    #[error("token service answer unusable: {reason}")]
    BadTokenAnswer {
        /// What was wrong (never the content).
        reason: &'static str,
    },
    /// No token realm is configured and the registry announced none.
    #[error("upstream registry {upstream} announced no token realm; set --token-realm")]
    RealmUnknown {
        /// The upstream origin.
        upstream: String,
    },
    /// A token request regrelay cannot serve (bad OAuth2 form).
    #[error("bad token request: {reason}")]
    BadTokenRequest {
        /// What is wrong.
        reason: String,
    },
    /// A split upload could not be continued (the registry gave no upload location, or the
    /// client's stream was lost between parts).
    #[error("the upload could not be continued")]
    UploadInterrupted,
    /// A response or request could not be built; a bug.
    #[error("internal error")]
    Internal(#[from] http::Error),
}

impl Error {
    /// Who caused this error.
    pub fn blame(&self) -> Blame {
        match self {
            Error::NotFound { .. }
            | Error::MethodNotAllowed { .. }
            | Error::Refused { .. }
            | Error::ClientIdle { .. }
            | Error::Unauthorized { .. }
            | Error::BadTokenRequest { .. } => Blame::Client,
            Error::UpstreamUnreachable { .. }
            | Error::UpstreamFailed { .. }
            | Error::MintFailed { .. }
            | Error::AuthRedirectRefused { .. }
            | Error::TooManyRedirects { .. }
            | Error::BadTokenAnswer { .. }
            | Error::RealmUnknown { .. }
            | Error::UploadInterrupted => Blame::Upstream,
            Error::Internal(_) => Blame::Internal,
        }
    }

    /// The HTTP status: the one place where blame becomes a status code.
    pub fn status(&self) -> StatusCode {
        match (self.blame(), self) {
            (Blame::Client, Error::NotFound { .. }) => StatusCode::NOT_FOUND,
            (Blame::Client, Error::MethodNotAllowed { .. }) => StatusCode::METHOD_NOT_ALLOWED,
            (Blame::Client, Error::ClientIdle { .. }) => StatusCode::REQUEST_TIMEOUT,
            (Blame::Client, Error::Unauthorized { .. }) => StatusCode::UNAUTHORIZED,
            (Blame::Client, _) => StatusCode::BAD_REQUEST,
            (Blame::Upstream, _) => StatusCode::BAD_GATEWAY,
            (Blame::Internal, _) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The error code in the registry's JSON error format (distribution's errcode names).
    /// Every upstream failure is `UNAVAILABLE`, decided by [`Error::blame`] like the status.
    pub fn registry_code(&self) -> &'static str {
        match (self.blame(), self) {
            (Blame::Upstream, _) => "UNAVAILABLE",
            (_, Error::NotFound { .. } | Error::MethodNotAllowed { .. }) => "UNSUPPORTED",
            (_, Error::Refused { .. }) => "DENIED",
            (_, Error::Unauthorized { .. }) => "UNAUTHORIZED",
            _ => "UNKNOWN",
        }
    }

    /// The token service's status, for a failed mint.
    pub fn upstream_status(&self) -> Option<u16> {
        match self {
            Error::MintFailed { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The full cause chain, for the one log line at the edge.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cur = std::error::Error::source(self);
        while let Some(e) = cur {
            out.push_str(": ");
            out.push_str(&e.to_string());
            cur = e.source();
        }
        out
    }

    /// The body of the synthetic response: registry JSON error format. The message includes the
    /// cause chain so "connection refused" reaches the user; causes never hold secrets.
    pub fn registry_body(&self) -> String {
        registry_error_json(self.registry_code(), &self.chain())
    }
}

/// A body in the registry's JSON error format with one error.
pub fn registry_error_json(code: &str, message: &str) -> String {
    serde_json::json!({ "errors": [{ "code": code, "message": message }] }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blame_decides_status_class() {
        let up = Error::UpstreamUnreachable {
            upstream: "http://r:5000".into(),
            source: "connection refused".into(),
        };
        assert_eq!(up.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(up.blame(), Blame::Upstream);
        let nf = Error::NotFound { path: "/x".into() };
        assert_eq!(nf.status(), StatusCode::NOT_FOUND);
        let idle = Error::ClientIdle { secs: 5 };
        assert_eq!(idle.status(), StatusCode::REQUEST_TIMEOUT);
    }

    #[test]
    fn body_is_registry_json_with_cause() {
        let up = Error::UpstreamUnreachable {
            upstream: "http://r:5000".into(),
            source: "connection refused".into(),
        };
        let v: serde_json::Value = serde_json::from_str(&up.registry_body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "UNAVAILABLE");
        let msg = v["errors"][0]["message"].as_str().unwrap();
        assert!(
            msg.contains("http://r:5000") && msg.contains("connection refused"),
            "{msg}"
        );
    }
}
