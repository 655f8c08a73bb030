//! The token realm regrelay serves on the public URL: `GET|POST /jwt/auth`.
//!
//! - `GET /jwt/auth` goes to the upstream realm with the client's `Authorization` byte-for-byte
//!   and the query unchanged (redirects are followed by [`crate::mint::Minter::fetch`], only to
//!   allowed origins). GitLab's refusals, rate limits and outages keep their status,
//!   `Retry-After` and message; in the registry's error format they pass unchanged, in
//!   GitLab's other formats they are reworded into it ([`crate::mint::answer`]). Failed logins
//!   are minded ([`crate::logins`]): a credential refused a moment ago gets the same answer
//!   without asking GitLab again. A regrelay session token presented here is never forwarded.
//! - `POST /jwt/auth` (OAuth2 password / refresh_token grants, tried first by containerd) becomes
//!   GitLab's GET with Basic; refresh tokens live no longer than the configured session lifetime.
//! - A successful answer becomes a sealed [`Session`] whose GitLab token seeds the cache.
//!
//! What a token request may carry is bounded before anything is asked of the token service:
//! its query ([`MAX_TOKEN_QUERY_BYTES`]), its scopes ([`challenge::session_scopes`]: at most
//! 32 of at most 512 bytes, types the token service ignores dropped), its credentials
//! ([`MAX_CREDENTIAL_BYTES`]) and an OAuth2 form ([`MAX_FORM_BYTES`], else 413): a session is
//! sealed into every token and kept in memory, so its size is the client's to keep small.
//!
//! Refresh tokens, like sessions, are bound to their upstream and the canonical public name: one
//! issued for one upstream is refused for another, so the credentials it carries never reach
//! another upstream's token service.
//!
//! Secrets never reach a log line, an error or `Debug`: only whether `Authorization` arrived, its
//! scheme and the Basic username are logged.

use std::net::IpAddr;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use zeroize::Zeroizing;

use crate::access::{bearer_token, Access};
use crate::api_path::ApiPath;
use crate::body::{self, ProxyBody};
use crate::challenge;
use crate::clients::ClientHandle;
use crate::config::Origin;
use crate::error::Error;
use crate::mint::{sensitive_header, upstream_token, Answered, Caller};
use crate::session::{Kind, Session, TOKEN_PREFIX};

/// Longest token request query (`GET /jwt/auth?…`): 32 scopes of 512 bytes, percent-encoded, fit.
pub const MAX_TOKEN_QUERY_BYTES: usize = 32 * 1024;
/// Longest OAuth2 token form (`POST /jwt/auth`); a longer one is 413.
pub const MAX_FORM_BYTES: usize = 64 * 1024;
/// Longest credentials (`Authorization`, or an OAuth2 form's username and password) a session
/// keeps: GitLab's tokens, JWT job tokens included, are far shorter.
pub const MAX_CREDENTIAL_BYTES: usize = 8 * 1024;

/// The scopes a token request may carry, in a session ([`challenge::session_scopes`]).
fn bounded_scopes(asked: Vec<String>) -> Result<Vec<String>, Error> {
    challenge::session_scopes(asked).map_err(|e| Error::BadTokenRequest {
        reason: e.to_string(),
    })
}

/// Refuses credentials longer than [`MAX_CREDENTIAL_BYTES`].
fn bounded_credentials(len: usize) -> Result<(), Error> {
    if len > MAX_CREDENTIAL_BYTES {
        return Err(Error::BadTokenRequest {
            reason: format!(
                "credentials of {len} bytes; at most {MAX_CREDENTIAL_BYTES} are accepted (GitLab \
                 tokens are far shorter: check what the client sends)"
            ),
        });
    }
    Ok(())
}

/// The upstream a token request is for, as [`Lanes::pick`] decides it.
pub struct Picked<'a> {
    /// Its sessions, tokens and token service.
    pub access: &'a Access,
    /// Its name, as sealed into sessions (empty for the default upstream).
    pub upstream: String,
    /// The scopes in the upstream's own names (a mirror segment removed, a prefix added).
    pub scopes: Vec<String>,
    /// True when the request's scopes or upstream differ from what the client asked: the
    /// token service then gets a query built from `scopes` and the upstream's own service.
    pub translated: bool,
    /// True when regrelay holds pull credentials for this upstream and the caller may use
    /// them: an anonymous token request then gets an anonymous session from regrelay itself
    /// (its pulls use the injected credentials), without asking the token service (GitLab's
    /// Dependency Proxy refuses anonymous token requests).
    pub injectable: bool,
}

/// Picks the upstream of a token request from its scopes and `ns` (see [`crate::mirror`]).
pub trait Lanes {
    /// The upstream for `scopes` (client form) and the realm's `ns`, if any, asked by `client`
    /// (`None`: a client whose address is unknown).
    fn pick(
        &self,
        scopes: &[String],
        ns: Option<&str>,
        client: Option<IpAddr>,
    ) -> Result<Picked<'_>, Error>;
}

/// The `/jwt/auth` endpoint.
pub struct Auth {
    session_lifetime: Duration,
}

impl Auth {
    /// The endpoint; sessions live `session_lifetime`.
    pub fn new(session_lifetime: Duration) -> Auth {
        Auth { session_lifetime }
    }

    /// Serves `GET|POST /jwt/auth`.
    pub async fn token_endpoint(
        &self,
        req: Request<Incoming>,
        lanes: &impl Lanes,
        public: &Origin,
        forwarded_for: &str,
        client: Option<IpAddr>,
    ) -> Result<Response<ProxyBody>, Error> {
        if req.method() == Method::POST {
            return self.oauth(req, lanes, public, forwarded_for, client).await;
        }
        let client_query = req.uri().query().unwrap_or("").to_owned();
        if client_query.len() > MAX_TOKEN_QUERY_BYTES {
            return Err(Error::BadTokenRequest {
                reason: format!(
                    "a token request query of {} bytes; at most {MAX_TOKEN_QUERY_BYTES} are accepted",
                    client_query.len()
                ),
            });
        }
        let ns = crate::mirror::ns_param(Some(&client_query));
        let scopes = bounded_scopes(challenge::scopes_from_query(&client_query))?;
        let picked = lanes.pick(&scopes, ns.as_deref(), client)?;
        let access = picked.access;
        let client_service = challenge::query_values(&client_query, "service")
            .into_iter()
            .next()
            .unwrap_or_default();
        let (query, service) = if picked.translated {
            let service = access.minter().service().await.unwrap_or(client_service);
            (challenge::token_query(&service, &picked.scopes), service)
        } else {
            (client_query, client_service)
        };
        let mut authorization = req.headers().get(header::AUTHORIZATION).cloned();
        if bearer_token(req.headers()).is_some_and(|t| t.starts_with(TOKEN_PREFIX)) {
            // A regrelay session is not a GitLab credential: it never leaves regrelay.
            tracing::debug!("dropping a regrelay session token presented to /jwt/auth");
            authorization = None;
        }
        bounded_credentials(authorization.as_ref().map_or(0, HeaderValue::len))?;
        log_token_request("GET", authorization.as_ref());
        if authorization.is_none() && picked.injectable {
            let mut session = Session::new(
                Kind::Access,
                None,
                service,
                picked.scopes,
                self.session_lifetime,
            );
            session.upstream = picked.upstream;
            tracing::debug!(
                "anonymous session issued by regrelay (injected credentials serve its pulls)"
            );
            return Ok(sealed_answer(access, &session, public, None));
        }
        let handle = req.extensions().get::<ClientHandle>().cloned();
        let caller = Caller {
            forwarded_for,
            user_agent: req.headers().get(header::USER_AGENT),
            client: handle.as_ref(),
        };
        let asked = Asked {
            query,
            service,
            scopes: picked.scopes,
            upstream: picked.upstream,
        };
        let authorization = authorization.as_ref();
        self.mint_session(access, asked, authorization, &caller, public, None)
            .await
    }

    /// The OAuth2 form (RFC 6749 §4.3 / §6) as containerd sends it.
    async fn oauth(
        &self,
        req: Request<Incoming>,
        lanes: &impl Lanes,
        public: &Origin,
        forwarded_for: &str,
        client: Option<IpAddr>,
    ) -> Result<Response<ProxyBody>, Error> {
        let ns = crate::mirror::ns_param(req.uri().query());
        let user_agent = req.headers().get(header::USER_AGENT).cloned();
        let handle = req.extensions().get::<ClientHandle>().cloned();
        let form = read_form(req).await?;
        let form = Zeroizing::new(String::from_utf8_lossy(&form).into_owned());
        let field = |k: &str| challenge::query_values(&form, k).into_iter().next();
        let scopes = bounded_scopes(challenge::scopes_from_query(&form))?;
        let picked = lanes.pick(&scopes, ns.as_deref(), client)?;
        let access = picked.access;
        let scopes = picked.scopes;
        let mut service = field("service").unwrap_or_default();
        if picked.translated {
            service = access.minter().service().await.unwrap_or(service);
        }
        let grant = field("grant_type").unwrap_or_default();
        let (authorization, refresh_token) = match grant.as_str() {
            "password" => {
                let user = field("username").unwrap_or_default();
                let pass = Zeroizing::new(field("password").unwrap_or_default());
                let basic = Zeroizing::new(format!("{user}:{}", pass.as_str()));
                let value = Zeroizing::new(format!("Basic {}", STANDARD.encode(basic.as_bytes())));
                bounded_credentials(value.len())?;
                // The refresh token carries the credentials no longer than a session may live,
                // and only to this upstream (under the name it is sealed for).
                let mut refresh = Session::new(
                    Kind::Refresh,
                    Some(value.as_bytes().to_vec()),
                    service.clone(),
                    vec![],
                    self.session_lifetime,
                );
                refresh.upstream = picked.upstream.clone();
                (
                    Some(value.as_bytes().to_vec()),
                    access.seal(&refresh, public),
                )
            }
            "refresh_token" => {
                let presented = Zeroizing::new(field("refresh_token").unwrap_or_default());
                let refresh = access
                    .open(&presented, public)
                    .ok()
                    .filter(|s| s.kind == Kind::Refresh)
                    .ok_or_else(|| Error::Unauthorized {
                        reason: "invalid refresh token".into(),
                        challenge: access.challenge_for(&Method::GET, &ApiPath::BASE, public),
                    })?;
                if refresh.upstream != picked.upstream {
                    // Its credentials were given for another upstream: they never go elsewhere.
                    return Err(Error::Unauthorized {
                        reason: "this refresh token was issued for another upstream; log in to \
                                 this one with its own credentials"
                            .into(),
                        challenge: access.challenge_for(&Method::GET, &ApiPath::BASE, public),
                    });
                }
                (refresh.authorization.clone(), presented.to_string())
            }
            other => {
                return Err(Error::BadTokenRequest {
                    reason: format!("unsupported grant_type {other:?} (password or refresh_token)"),
                })
            }
        };
        let auth_header = authorization.as_deref().map(sensitive_header).transpose()?;
        log_token_request("POST", auth_header.as_ref());
        let query = challenge::token_query(&service, &scopes);
        let caller = Caller {
            forwarded_for,
            user_agent: user_agent.as_ref(),
            client: handle.as_ref(),
        };
        let asked = Asked {
            query,
            service,
            scopes,
            upstream: picked.upstream,
        };
        let refresh = Some(refresh_token);
        self.mint_session(
            access,
            asked,
            auth_header.as_ref(),
            &caller,
            public,
            refresh,
        )
        .await
    }
}

/// What a token request asks the token service for, read from either form.
struct Asked {
    /// The token service's query (`service`, `scope`s), in the upstream's names.
    query: String,
    /// The `service` sealed into the session.
    service: String,
    /// The scopes sealed into the session.
    scopes: Vec<String>,
    /// The upstream the session is bound to.
    upstream: String,
}

impl Auth {
    /// Asks the token service with `authorization`: its token seeds the cache and becomes a
    /// sealed session (with `refresh_token` in the OAuth2 form's answer); its refusal is answered
    /// as the token service's ([`Answered::Refused`]).
    async fn mint_session(
        &self,
        access: &Access,
        asked: Asked,
        authorization: Option<&HeaderValue>,
        caller: &Caller<'_>,
        public: &Origin,
        refresh_token: Option<String>,
    ) -> Result<Response<ProxyBody>, Error> {
        let jwt = match access
            .minter()
            .ask(&asked.query, authorization, caller)
            .await?
        {
            Answered::Token(jwt) => jwt,
            Answered::Refused(refused) => return Ok(refused.response()),
        };
        let mut session = Session::new(
            Kind::Access,
            authorization.map(|a| a.as_bytes().to_vec()),
            asked.service,
            asked.scopes,
            self.session_lifetime,
        );
        session.upstream = asked.upstream;
        answer(access, session, &jwt, public, refresh_token)
    }
}

/// An OAuth2 form, at most [`MAX_FORM_BYTES`]: a longer one (by `Content-Length` or as it
/// streams) is 413, a body that fails the client's.
async fn read_form(req: Request<Incoming>) -> Result<Bytes, Error> {
    let too_large = || Error::TooLarge {
        what: "an OAuth2 token form",
        limit: MAX_FORM_BYTES,
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_FORM_BYTES as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), MAX_FORM_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(source) => Err(Error::ClientBody { source }),
    }
}

/// Seeds the cache with GitLab's token and answers with the sealed session.
fn answer(
    access: &Access,
    session: Session,
    jwt: &str,
    public: &Origin,
    refresh_token: Option<String>,
) -> Result<Response<ProxyBody>, Error> {
    access.seed(&session, upstream_token(jwt)?);
    Ok(sealed_answer(access, &session, public, refresh_token))
}

/// The token answer for a sealed session.
fn sealed_answer(
    access: &Access,
    session: &Session,
    public: &Origin,
    refresh_token: Option<String>,
) -> Response<ProxyBody> {
    let sealed = Zeroizing::new(access.seal(session, public));
    let mut answer = serde_json::json!({
        "token": sealed.as_str(),
        "access_token": sealed.as_str(),
        "expires_in": session.exp - session.iat,
        "issued_at": rfc3339(session.iat),
    });
    if let Some(r) = refresh_token {
        answer["refresh_token"] = r.into();
    }
    let body = Zeroizing::new(answer.to_string());
    let mut resp = Response::new(body::full(Bytes::from(body.as_bytes().to_vec())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Logs one token request: whether `Authorization` arrived, its scheme and Basic username.
fn log_token_request(method: &str, authorization: Option<&HeaderValue>) {
    let raw = authorization.map(HeaderValue::as_bytes).unwrap_or_default();
    let scheme = match raw.iter().position(|b| *b == b' ') {
        Some(i) => &raw[..i],
        None => raw,
    };
    let scheme = String::from_utf8_lossy(scheme);
    let username = crate::challenge::basic_username(raw);
    tracing::info!(
        target: "regrelay::auth",
        method,
        authorization = if authorization.is_some() { "present" } else { "absent" },
        scheme = %scheme,
        username = username.as_deref().unwrap_or("-"),
        "token request"
    );
}

/// `YYYY-MM-DDTHH:MM:SSZ` for Unix seconds (civil-from-days, H. Hinnant).
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_table() {
        for (unix, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_795_000_000, "2026-11-18T11:06:40Z"),
        ] {
            assert_eq!(rfc3339(unix), want);
        }
    }
}
