//! The one error type of the request path, and the single place where an error becomes a status.
//!
//! Every variant says who is to blame ([`Blame`]); [`Error::status`] derives the HTTP status from
//! that, and [`Error::registry_code`] the code of the registry's JSON error format
//! (`{"errors":[{"code","message","detail"}]}`), so clients print something a user can act on.
//! Display strings are lowercase and never carry a secret: no header value is ever formatted here.

use http::StatusCode;

mod response;
mod tls;

pub use response::json_response;

pub(crate) use tls::Kind as TlsKind;
pub use tls::TlsRefused;

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

/// Why the token service gave no token for a session. Cloneable: one failed mint is handed to
/// every request that waited for it, and remembered for a backoff ([`crate::token`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum MintFailure {
    /// The token service refused the credentials (401, 403, 404…), with its own message.
    #[error("token service answered {status}: {message}")]
    Refused {
        /// Its status.
        status: u16,
        /// Its message (registry error format), or the status text.
        message: String,
    },
    /// The token service is rate limiting (429) or unavailable (503).
    #[error("token service answered {status}: {message}")]
    Busy {
        /// 429 or 503.
        status: u16,
        /// Its `Retry-After` in seconds, when it sent one.
        retry_after: Option<u64>,
        /// Its message, or the status text.
        message: String,
    },
    /// No answer within the token request deadline.
    #[error("token service did not answer within {secs} s")]
    Timeout {
        /// The deadline.
        secs: u64,
    },
    /// The token service bans regrelay's address (too many failed logins came from it).
    #[error("{}", BAN_MESSAGE)]
    Banned {
        /// Seconds until regrelay asks the token service again.
        retry_after: u64,
    },
    /// The token service could not be reached, or answered something unusable.
    #[error("{reason}")]
    Failed {
        /// What went wrong (no secret, no internal address).
        reason: String,
    },
}

impl MintFailure {
    /// The token service's status, when it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            MintFailure::Refused { status, .. } | MintFailure::Busy { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Seconds the token service asked us to wait.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            MintFailure::Busy { retry_after, .. } => *retry_after,
            MintFailure::Banned { retry_after } => Some(*retry_after),
            _ => None,
        }
    }
}

/// What a client (and the log) is told when GitLab bans regrelay's address.
pub const BAN_MESSAGE: &str = "GitLab refuses regrelay's address: too many failed \
    authentication attempts (failed logins) came from it (GitLab's failed-login ban, typically \
    1 hour), so every user behind regrelay is \
    refused until the ban ends. Fix: add regrelay's address to GitLab's trusted proxies \
    (gitlab_rails['trusted_proxies'] in gitlab.rb) so that GitLab counts failures per client \
    address from X-Forwarded-For, keep client addresses at the balancer in front of regrelay \
    (--trusted-proxies), and find the failing credential (a revoked deploy token in a CI \
    variable?)";

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
    /// The request names another origin than this proxy, or a non-canonical path.
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
    /// The client's request body failed (aborted, or a malformed chunk): the client's fault.
    #[error("the request body could not be read")]
    ClientBody {
        /// What failed.
        #[source]
        source: BoxError,
    },
    /// A mirror request names a registry no upstream serves (`ns`): 404 `NAME_UNKNOWN` with no
    /// challenge, so containerd tries its next host without sending credentials.
    #[error("no upstream serves {ns}")]
    NameUnknown {
        /// The registry host asked for.
        ns: String,
    },
    /// A request regrelay does not serve in this form (a push through a mirror form).
    #[error("{reason}")]
    Unsupported {
        /// What and why.
        reason: &'static str,
    },
    /// The credential may not do this, as far as regrelay can tell from what GitLab granted (403
    /// `DENIED`, with why and what to change).
    #[error("{reason}")]
    Denied {
        /// Why, naming the repository and the kind of credential (never a secret).
        reason: String,
    },
    /// A bound on concurrent work is reached; the client should retry shortly (503 +
    /// `Retry-After`).
    #[error("regrelay is at its limit of {what}; retry shortly")]
    Overloaded {
        /// Which bound.
        what: &'static str,
    },
    /// The upstream could not be reached (DNS, connect, TLS).
    #[error("{what} {upstream} is unreachable")]
    UpstreamUnreachable {
        /// What it is: `upstream registry` or `token service`.
        what: &'static str,
        /// The upstream origin.
        upstream: String,
        /// What failed.
        #[source]
        source: BoxError,
    },
    /// The upstream connection failed after the request was sent.
    #[error("{what} {upstream} failed")]
    UpstreamFailed {
        /// What it is: `upstream registry` or `token service`.
        what: &'static str,
        /// The upstream origin.
        upstream: String,
        /// What failed.
        #[source]
        source: BoxError,
    },
    /// Object storage, where the registry redirected a blob read, could not be reached or
    /// refused it (the pull-through cache follows those redirects itself; see
    /// [`crate::cache::redirect`]). Never names the presigned URL: only its origin, in the log.
    #[error("object storage {origin}, where the registry redirected a blob read, {problem}")]
    ObjectStorage {
        /// Its origin (`scheme://host[:port]`), never the URL's path or query.
        origin: String,
        /// What went wrong and what to check (names no address).
        problem: String,
        /// What failed, when a connection did.
        #[source]
        source: Option<BoxError>,
    },
    /// The registry answered against its own protocol.
    #[error("upstream registry answered unexpectedly: {reason}")]
    UpstreamProtocol {
        /// What was wrong.
        reason: &'static str,
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
    /// The token service gave no token for a session.
    #[error(transparent)]
    Mint(#[from] MintFailure),
    /// The token service redirected somewhere `Authorization` must not go.
    #[error(
        "token service redirected to {target}, which is not an allowed origin for credentials; \
         if it is your GitLab, allow it with --auth-redirect-allow {target}"
    )]
    AuthRedirectRefused {
        /// The refused target (`scheme://host[:port]`).
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
    /// No token realm is configured and the registry announced none (or announced regrelay).
    #[error("upstream registry {upstream} announced no usable token realm; set --token-realm")]
    RealmUnknown {
        /// The upstream origin.
        upstream: String,
    },
    /// A request body larger than regrelay reads for it (413).
    #[error("{what} larger than {limit} bytes is refused")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The bound.
        limit: usize,
    },
    /// The token service bans regrelay's address: asked again once a minute meanwhile.
    #[error("{}", BAN_MESSAGE)]
    Banned {
        /// Seconds until regrelay asks again.
        retry_after: u64,
    },
    /// Too many failed logins through regrelay for a credential it never saw succeed.
    #[error(
        "too many failed logins through regrelay in the last minute ({whose} budget; GitLab \
         bans an address after 10): this credential is refused without asking GitLab for \
         {retry_after} s, while credentials that worked before still pass; check it (a revoked \
         deploy token or an expired CI variable?)"
    )]
    LoginsThrottled {
        /// Seconds until a failure leaves the budget's window.
        retry_after: u64,
        /// Whose budget: this client's or all clients'.
        whose: &'static str,
    },
    /// A token request regrelay cannot serve (bad OAuth2 form).
    #[error("bad token request: {reason}")]
    BadTokenRequest {
        /// What is wrong.
        reason: String,
    },
    /// A split upload could not be continued.
    #[error("the upload could not be continued: {reason}")]
    UploadInterrupted {
        /// Why, and what the client should do.
        reason: &'static str,
    },
    /// This replica reached its upload drain deadline while the upload streamed: distribution's
    /// `BLOB_UPLOAD_INVALID` (404, restart the upload) with `Retry-After` (see [`crate::upload`]).
    #[error(
        "this regrelay replica is shutting down and ended the upload at its drain deadline \
         (--upload-drain-secs) after {sent} bytes; push the blob again: another replica takes it"
    )]
    UploadCut {
        /// Bytes of the client's body sent upstream before the cut.
        sent: u64,
    },
    /// A response or request could not be built; a bug.
    #[error("internal error")]
    Internal(#[from] http::Error),
}

/// Seconds a client is asked to wait after an [`Error::Overloaded`].
pub const OVERLOAD_RETRY_AFTER_SECS: u64 = 1;

impl Error {
    /// Who caused this error.
    pub fn blame(&self) -> Blame {
        match self {
            Error::NotFound { .. }
            | Error::NameUnknown { .. }
            | Error::Unsupported { .. }
            | Error::MethodNotAllowed { .. }
            | Error::Refused { .. }
            | Error::ClientIdle { .. }
            | Error::ClientBody { .. }
            | Error::Unauthorized { .. }
            | Error::Denied { .. }
            | Error::TooLarge { .. }
            | Error::LoginsThrottled { .. }
            | Error::BadTokenRequest { .. } => Blame::Client,
            Error::UpstreamUnreachable { .. }
            | Error::UpstreamFailed { .. }
            | Error::UpstreamProtocol { .. }
            | Error::ObjectStorage { .. }
            | Error::Mint(_)
            | Error::Banned { .. }
            | Error::AuthRedirectRefused { .. }
            | Error::TooManyRedirects { .. }
            | Error::BadTokenAnswer { .. }
            | Error::RealmUnknown { .. }
            | Error::UploadInterrupted { .. } => Blame::Upstream,
            Error::Overloaded { .. } | Error::UploadCut { .. } | Error::Internal(_) => {
                Blame::Internal
            }
        }
    }

    /// The HTTP status: the one place where blame becomes a status code. A token service that
    /// rate-limits or is unavailable stays 429/503 (never "unauthorized"), a token service that
    /// does not answer in time is 504, and a bound reached is 503.
    pub fn status(&self) -> StatusCode {
        match (self.blame(), self) {
            (Blame::Client, Error::NotFound { .. } | Error::NameUnknown { .. }) => {
                StatusCode::NOT_FOUND
            }
            (Blame::Client, Error::Unsupported { .. }) => StatusCode::METHOD_NOT_ALLOWED,
            (Blame::Client, Error::MethodNotAllowed { .. }) => StatusCode::METHOD_NOT_ALLOWED,
            (Blame::Client, Error::ClientIdle { .. }) => StatusCode::REQUEST_TIMEOUT,
            (Blame::Client, Error::Unauthorized { .. }) => StatusCode::UNAUTHORIZED,
            (Blame::Client, Error::Denied { .. }) => StatusCode::FORBIDDEN,
            (Blame::Client, Error::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            (Blame::Client, Error::LoginsThrottled { .. }) => StatusCode::TOO_MANY_REQUESTS,
            (Blame::Client, _) => StatusCode::BAD_REQUEST,
            (Blame::Upstream, Error::Mint(MintFailure::Busy { status, .. })) => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
            (Blame::Upstream, Error::Mint(MintFailure::Timeout { .. })) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            (Blame::Upstream, Error::Banned { .. } | Error::Mint(MintFailure::Banned { .. })) => {
                StatusCode::FORBIDDEN
            }
            (Blame::Upstream, _) => StatusCode::BAD_GATEWAY,
            (Blame::Internal, Error::Overloaded { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            (Blame::Internal, Error::UploadCut { .. }) => StatusCode::NOT_FOUND,
            (Blame::Internal, _) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// `Retry-After` seconds for the client, when the status asks it to come back.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Error::Mint(f @ MintFailure::Busy { .. }) => Some(f.retry_after().unwrap_or(1)),
            Error::Mint(MintFailure::Banned { retry_after })
            | Error::Banned { retry_after }
            | Error::LoginsThrottled { retry_after, .. } => Some(*retry_after),
            Error::Overloaded { .. } | Error::UploadCut { .. } => Some(OVERLOAD_RETRY_AFTER_SECS),
            _ => None,
        }
    }

    /// The error code in the registry's JSON error format (distribution's errcode names).
    pub fn registry_code(&self) -> &'static str {
        match (self.blame(), self) {
            (_, Error::Mint(MintFailure::Busy { status: 429, .. }))
            | (_, Error::LoginsThrottled { .. }) => "TOOMANYREQUESTS",
            (_, Error::Banned { .. } | Error::Mint(MintFailure::Banned { .. })) => "DENIED",
            (Blame::Upstream, _) | (_, Error::Overloaded { .. }) => "UNAVAILABLE",
            (_, Error::UploadCut { .. }) => "BLOB_UPLOAD_INVALID",
            (_, Error::NameUnknown { .. }) => "NAME_UNKNOWN",
            (_, Error::TooLarge { .. }) => "SIZE_INVALID",
            (
                _,
                Error::NotFound { .. } | Error::MethodNotAllowed { .. } | Error::Unsupported { .. },
            ) => "UNSUPPORTED",
            (_, Error::Refused { .. } | Error::Denied { .. }) => "DENIED",
            (_, Error::Unauthorized { .. }) => "UNAUTHORIZED",
            _ => "UNKNOWN",
        }
    }

    /// The full cause chain, for the one log line at the edge (may name internal addresses).
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

    /// The refused TLS handshake behind this error, when that is why the upstream (or its token
    /// service) was unreachable.
    pub fn tls_refused(&self) -> Option<&TlsRefused> {
        let mut cur = std::error::Error::source(self);
        while let Some(e) = cur {
            if let Some(refused) = e.downcast_ref::<TlsRefused>() {
                return Some(refused);
            }
            cur = e.source();
        }
        None
    }

    /// What the client is told: no internal upstream URL or address, no cause chain (the log
    /// has those); the token service's own messages pass, they are meant for the user.
    pub fn public_message(&self) -> String {
        match self {
            Error::UpstreamUnreachable { what, .. } => match self.tls_refused() {
                Some(refused) => format!("the {what} is unreachable: {}", refused.public()),
                None => format!("the {what} is unreachable"),
            },
            Error::UpstreamFailed { what, .. } => {
                format!("the {what} failed while answering; see regrelay's log")
            }
            Error::ObjectStorage { problem, .. } => {
                format!("object storage, where the registry redirected this blob, {problem}")
            }
            Error::AuthRedirectRefused { .. } => "the token service redirected to an origin \
                 that is not allowed to receive credentials; see regrelay's log for the origin \
                 and allow it with --auth-redirect-allow if it is your GitLab"
                .into(),
            Error::RealmUnknown { .. } => {
                "the upstream registry announced no usable token realm; set --token-realm".into()
            }
            Error::Mint(MintFailure::Failed { .. }) => {
                "the token service could not be reached or answered unusably; see regrelay's log"
                    .into()
            }
            other => other.to_string(),
        }
    }

    /// The body of the synthetic response: registry JSON error format.
    pub fn registry_body(&self) -> String {
        registry_error_json(self.registry_code(), &self.public_message())
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
            what: "upstream registry",
            upstream: "http://r:5000".into(),
            source: "connection refused".into(),
        };
        assert_eq!(up.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(up.blame(), Blame::Upstream);
        let nf = Error::NotFound { path: "/x".into() };
        assert_eq!(nf.status(), StatusCode::NOT_FOUND);
        let idle = Error::ClientIdle { secs: 5 };
        assert_eq!(idle.status(), StatusCode::REQUEST_TIMEOUT);
        let aborted = Error::ClientBody {
            source: "connection reset".into(),
        };
        assert_eq!(aborted.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn token_service_failures_keep_their_meaning() {
        let busy = |status, retry_after| {
            Error::Mint(MintFailure::Busy {
                status,
                retry_after,
                message: "slow down".into(),
            })
        };
        let cases = [
            (busy(429, Some(7)), 429, Some(7), "TOOMANYREQUESTS"),
            (busy(503, None), 503, Some(1), "UNAVAILABLE"),
            (
                Error::Mint(MintFailure::Timeout { secs: 30 }),
                504,
                None,
                "UNAVAILABLE",
            ),
            (
                Error::Mint(MintFailure::Failed {
                    reason: "connection refused".into(),
                }),
                502,
                None,
                "UNAVAILABLE",
            ),
            (
                Error::Overloaded {
                    what: "requests in flight",
                },
                503,
                Some(1),
                "UNAVAILABLE",
            ),
            // Restart the upload (a status containers/image reads and retries; see upload.rs).
            (
                Error::UploadCut { sent: 7 },
                404,
                Some(1),
                "BLOB_UPLOAD_INVALID",
            ),
        ];
        for (err, status, retry, code) in cases {
            assert_eq!(err.status().as_u16(), status, "{err}");
            assert_eq!(err.retry_after(), retry, "{err}");
            assert_eq!(err.registry_code(), code, "{err}");
        }
    }

    #[test]
    fn body_is_registry_json_with_cause() {
        let up = Error::UpstreamUnreachable {
            what: "upstream registry",
            upstream: "http://r:5000".into(),
            source: "connection refused".into(),
        };
        let v: serde_json::Value = serde_json::from_str(&up.registry_body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "UNAVAILABLE");
        let msg = v["errors"][0]["message"].as_str().unwrap();
        assert!(msg.contains("unreachable"), "{msg}");
        assert!(
            !msg.contains("r:5000"),
            "the body names no internal address: {msg}"
        );
        assert!(up.chain().contains("http://r:5000") && up.chain().contains("connection refused"));
    }

    #[test]
    fn a_refused_certificate_is_explained_in_the_log_and_named_without_address_to_the_client() {
        let refused = TlsRefused {
            origin: "https://r.internal:5000".into(),
            ca: None,
            reason: rustls::CertificateError::UnknownIssuer.into(),
        };
        // As the pool hands it over: the connector's error inside hyper-util's.
        let up = Error::UpstreamUnreachable {
            what: "upstream registry",
            upstream: "https://r.internal:5000".into(),
            source: Box::new(Wrapper(Box::new(refused))),
        };
        assert!(up.chain().contains("--upstream-ca"), "{}", up.chain());
        let v: serde_json::Value = serde_json::from_str(&up.registry_body()).unwrap();
        let msg = v["errors"][0]["message"].as_str().unwrap();
        assert!(
            msg.contains("does not trust the upstream's TLS certificate"),
            "{msg}"
        );
        assert!(!msg.contains("r.internal"), "{msg}");
    }

    /// An error whose source is the one it wraps.
    #[derive(Debug)]
    struct Wrapper(BoxError);

    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("client error (Connect)")
        }
    }

    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(self.0.as_ref())
        }
    }
}
