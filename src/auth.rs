//! Registry token auth on the proxy: the token realm (`/jwt/auth`) served on the public URL,
//! challenge rewriting, sealed sessions, and minting upstream tokens on a session's behalf.
//!
//! - Every `WWW-Authenticate: Bearer` challenge from the registry gets `realm=<public>/jwt/auth`,
//!   so clients ask regrelay for tokens on the registry's own host and keep `Authorization` (Go
//!   clients drop it on cross-host redirects: GitLab then sees an anonymous login, "access
//!   forbidden"). The upstream realm is learnt from those challenges, or configured.
//! - `GET /jwt/auth` goes to the upstream realm with the client's `Authorization` byte-for-byte
//!   and the query unchanged; 3xx answers are followed here, keeping `Authorization`, but only to
//!   allowed origins. GitLab's refusals pass through unchanged. `POST /jwt/auth` (OAuth2
//!   password / refresh_token grants, tried first by containerd) becomes GitLab's GET with Basic.
//! - A successful answer becomes a sealed [`Session`]; registry requests carrying one are sent
//!   upstream with a GitLab token for exactly its scopes, valid on arrival ([`TokenStore`]).
//!
//! Secrets never reach a log line, an error or `Debug`: only whether `Authorization` arrived, its
//! scheme and the Basic username are logged.

use std::net::IpAddr;
use std::sync::RwLock;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use zeroize::Zeroizing;

use crate::body::{self, ProxyBody};
use crate::challenge::{self, Challenge};
use crate::config::{AllowedHost, Config, Origin, MAX_SESSION_LIFETIME};
use crate::error::Error;
use crate::proxy;
use crate::session::{unix_now, KeyRing, Kind, OpenError, Session, TOKEN_PREFIX};
use crate::token::{TokenStore, UpstreamToken};
use crate::upstream::Upstream;

/// The token realm path regrelay serves.
pub const TOKEN_PATH: &str = "/jwt/auth";
/// Redirects followed for one token request.
pub const MAX_TOKEN_REDIRECTS: usize = 5;
/// Deadline for one token request to GitLab (all hops).
pub const TOKEN_REQUEST_TIMEOUT_SECS: u64 = 30;
/// Largest token answer or OAuth2 form accepted (they are a few KiB).
const MAX_SMALL_BODY_BYTES: usize = 256 * 1024;
/// Service named in challenges regrelay makes itself, until the registry told us its own.
const DEFAULT_SERVICE: &str = "container_registry";

/// Auth state shared by all requests.
pub struct Auth {
    realm: RwLock<Option<Uri>>,
    realm_configured: bool,
    service: RwLock<String>,
    allow: Vec<AllowedHost>,
    keys: std::sync::Arc<KeyRing>,
    session_lifetime: Duration,
    tokens: TokenStore,
}

/// A registry request's credentials, as regrelay sees them.
pub enum Credentials {
    /// No regrelay session: forwarded untouched (anonymous, or a token regrelay did not issue).
    Untouched,
    /// A valid regrelay session.
    Session(Session),
}

impl Auth {
    /// Builds the auth state from the validated config.
    pub fn new(cfg: &Config) -> Auth {
        Auth {
            realm: RwLock::new(cfg.token_realm.clone()),
            realm_configured: cfg.token_realm.is_some(),
            service: RwLock::new(DEFAULT_SERVICE.to_owned()),
            allow: cfg.auth_redirect_allow.clone(),
            keys: cfg.session_keys.clone(),
            session_lifetime: cfg.session_lifetime,
            tokens: TokenStore::new(cfg.token_cache_max_entries),
        }
    }

    /// The upstream token cache (and its counters).
    pub fn tokens(&self) -> &TokenStore {
        &self.tokens
    }

    fn public_realm(public: &Origin) -> String {
        format!("{public}{TOKEN_PATH}")
    }

    /// Learns the upstream realm and service from the registry's challenges and points their
    /// realm at regrelay. Returns the `error` of the last challenge, if any.
    pub fn rewrite_challenges(&self, headers: &mut HeaderMap, public: &Origin) -> Option<String> {
        let values: Vec<HeaderValue> = headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .cloned()
            .collect();
        if values.is_empty() {
            return None;
        }
        headers.remove(header::WWW_AUTHENTICATE);
        let mut error = None;
        for value in values {
            let parsed = value.to_str().ok().and_then(Challenge::parse);
            let Some(mut c) = parsed else {
                headers.append(header::WWW_AUTHENTICATE, value);
                continue;
            };
            self.learn(&c);
            error = c.error().map(str::to_owned);
            c.set("realm", &Self::public_realm(public));
            match HeaderValue::from_str(&c.to_string()) {
                Ok(v) => headers.append(header::WWW_AUTHENTICATE, v),
                Err(_) => headers.append(header::WWW_AUTHENTICATE, value),
            };
        }
        error
    }

    fn learn(&self, c: &Challenge) {
        if let Some(service) = c.get("service") {
            if *self.service.read().expect("lock") != service {
                *self.service.write().expect("lock") = service.to_owned();
            }
        }
        if self.realm_configured {
            return;
        }
        let Some(realm) = c.get("realm").and_then(|r| r.parse::<Uri>().ok()) else {
            return;
        };
        if Origin::of(&realm).is_none() {
            return;
        }
        let mut known = self.realm.write().expect("lock");
        if known.as_ref() != Some(&realm) {
            tracing::info!(realm = %realm, "upstream token realm");
            *known = Some(realm);
        }
    }

    /// The upstream realm: configured, learnt, or asked of the registry now.
    async fn realm(&self, upstream: &Upstream) -> Result<Uri, Error> {
        if let Some(r) = self.realm.read().expect("lock").clone() {
            return Ok(r);
        }
        let resp = upstream.probe_response().await?;
        let challenges = resp.headers().get_all(header::WWW_AUTHENTICATE);
        for c in challenges
            .iter()
            .filter_map(|v| v.to_str().ok().and_then(Challenge::parse))
        {
            self.learn(&c);
        }
        self.realm
            .read()
            .expect("lock")
            .clone()
            .ok_or(Error::RealmUnknown {
                upstream: upstream.origin().to_string(),
            })
    }

    /// A fresh challenge for a request regrelay refuses itself.
    pub fn challenge_for(&self, method: &Method, path: &str, public: &Origin) -> String {
        let mut c = Challenge { params: vec![] };
        c.set("realm", &Self::public_realm(public));
        c.set("service", &self.service.read().expect("lock"));
        if let Some(scope) = challenge::required_scope(method, path) {
            c.set("scope", &scope);
        }
        c.set("error", "invalid_token");
        c.to_string()
    }

    /// Classifies a registry request's `Authorization`: a regrelay session is opened (refused with
    /// a fresh challenge when tampered with, expired, or sealed with an unknown key).
    pub fn credentials(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        public: &Origin,
    ) -> Result<Credentials, Error> {
        let Some(token) = bearer_token(headers) else {
            return Ok(Credentials::Untouched);
        };
        if !token.starts_with(TOKEN_PREFIX) {
            return Ok(Credentials::Untouched);
        }
        let refuse = |reason: OpenError| Error::Unauthorized {
            reason: reason.to_string(),
            challenge: self.challenge_for(method, path, public),
        };
        let session = self
            .keys
            .open(token, &public.to_string(), unix_now())
            .map_err(refuse)?;
        if session.kind != Kind::Access {
            return Err(refuse(OpenError::Malformed));
        }
        Ok(Credentials::Session(session))
    }

    /// An upstream token for `session`, fresh now (cached, or minted once for all waiters).
    pub async fn upstream_token(
        &self,
        session: &Session,
        upstream: &Upstream,
        peer: IpAddr,
    ) -> Result<UpstreamToken, Error> {
        self.tokens
            .get(session.id, session.exp, || {
                self.mint(session, upstream, peer)
            })
            .await
    }

    /// Forgets a token the registry refused as `invalid_token`.
    pub async fn invalidate(&self, session: &Session, token: &UpstreamToken) {
        self.tokens.invalidate(session.id, token).await;
    }

    async fn mint(
        &self,
        session: &Session,
        upstream: &Upstream,
        peer: IpAddr,
    ) -> Result<UpstreamToken, Error> {
        let query = challenge::token_query(&session.service, &session.scopes);
        let authorization = session
            .authorization
            .as_deref()
            .map(sensitive_header)
            .transpose()?;
        let resp = self
            .fetch(
                upstream,
                &query,
                authorization.as_ref(),
                &HeaderMap::new(),
                peer,
            )
            .await?;
        let status = resp.status();
        if status != StatusCode::OK {
            let message = read_small(resp.into_body())
                .await
                .ok()
                .and_then(|b| registry_error_message(&b))
                .unwrap_or_else(|| status.to_string());
            tracing::warn!(status = status.as_u16(), message = %message, "token service refused a session's credentials");
            return Err(Error::MintFailed {
                status: status.as_u16(),
                message,
            });
        }
        let jwt = token_from_answer(resp.into_body()).await?;
        upstream_token(&jwt)
    }

    /// Sends a GET for the upstream realm with `query`, following allowed redirects.
    async fn fetch(
        &self,
        upstream: &Upstream,
        query: &str,
        authorization: Option<&HeaderValue>,
        client_headers: &HeaderMap,
        peer: IpAddr,
    ) -> Result<Response<Incoming>, Error> {
        let realm = self.realm(upstream).await?;
        let realm_origin = Origin::of(&realm).ok_or(Error::RealmUnknown {
            upstream: upstream.origin().to_string(),
        })?;
        let mut url = with_query(&realm, query)?;
        let xff = proxy::forwarded_for(client_headers, peer);
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(TOKEN_REQUEST_TIMEOUT_SECS);
        for _ in 0..=MAX_TOKEN_REDIRECTS {
            let mut req = Request::get(url.clone()).body(body::empty())?;
            let headers = req.headers_mut();
            if let Some(auth) = authorization {
                headers.insert(header::AUTHORIZATION, auth.clone());
            }
            headers.insert(&proxy::X_FORWARDED_FOR, proxy::header_value(&xff)?);
            if let Some(ua) = client_headers.get(header::USER_AGENT) {
                headers.insert(header::USER_AGENT, ua.clone());
            }
            let resp = tokio::time::timeout_at(deadline, upstream.send(req))
                .await
                .map_err(|elapsed| Error::UpstreamUnreachable {
                    upstream: realm_origin.to_string(),
                    source: Box::new(elapsed),
                })??;
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok());
            let next = match location {
                Some(loc) if resp.status().is_redirection() => resolve(&url, loc)?,
                _ => return Ok(resp),
            };
            let target = Origin::of(&next).ok_or(Error::AuthRedirectRefused {
                target: next.to_string(),
            })?;
            if !self.redirect_allowed(&realm_origin, &target) {
                return Err(Error::AuthRedirectRefused {
                    target: target.authority().to_string(),
                });
            }
            tracing::debug!(to = %target, "following token service redirect");
            url = next;
        }
        Err(Error::TooManyRedirects {
            limit: MAX_TOKEN_REDIRECTS,
        })
    }

    fn redirect_allowed(&self, realm: &Origin, to: &Origin) -> bool {
        let https_upgrade = to.scheme() == &http::uri::Scheme::HTTPS
            && to
                .authority()
                .host()
                .eq_ignore_ascii_case(realm.authority().host())
            && (to.effective_port() == 443 || to.effective_port() == realm.effective_port());
        to.same_as(realm) || https_upgrade || self.allow.iter().any(|a| a.matches(to))
    }

    /// Serves `GET|POST /jwt/auth`.
    pub async fn token_endpoint(
        &self,
        req: Request<Incoming>,
        upstream: &Upstream,
        public: &Origin,
        peer: IpAddr,
    ) -> Result<Response<ProxyBody>, Error> {
        if req.method() == Method::POST {
            return self.oauth(req, upstream, public, peer).await;
        }
        let query = req.uri().query().unwrap_or("").to_owned();
        let authorization = req.headers().get(header::AUTHORIZATION).cloned();
        log_token_request("GET", authorization.as_ref());
        let resp = self
            .fetch(
                upstream,
                &query,
                authorization.as_ref(),
                req.headers(),
                peer,
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Ok(pass_through(resp));
        }
        let jwt = token_from_answer(resp.into_body()).await?;
        let service = challenge::query_values(&query, "service")
            .into_iter()
            .next()
            .unwrap_or_default();
        let session = Session::new(
            Kind::Access,
            authorization.map(|a| a.as_bytes().to_vec()),
            service,
            challenge::scopes_from_query(&query),
            self.session_lifetime,
        );
        self.answer(session, &jwt, public, None).await
    }

    /// The OAuth2 form (RFC 6749 §4.3 / §6) as containerd sends it.
    async fn oauth(
        &self,
        req: Request<Incoming>,
        upstream: &Upstream,
        public: &Origin,
        peer: IpAddr,
    ) -> Result<Response<ProxyBody>, Error> {
        let headers = req.headers().clone();
        let form = read_small(req.into_body())
            .await
            .map_err(|_| Error::BadTokenRequest {
                reason: "unreadable or oversized form".into(),
            })?;
        let form = Zeroizing::new(String::from_utf8_lossy(&form).into_owned());
        let field = |k: &str| challenge::query_values(&form, k).into_iter().next();
        let scopes = challenge::scopes_from_query(&form);
        let service = field("service").unwrap_or_default();
        let grant = field("grant_type").unwrap_or_default();
        let (authorization, refresh_token) = match grant.as_str() {
            "password" => {
                let user = field("username").unwrap_or_default();
                let pass = Zeroizing::new(field("password").unwrap_or_default());
                let basic = Zeroizing::new(format!("{user}:{}", pass.as_str()));
                let value = Zeroizing::new(format!("Basic {}", STANDARD.encode(basic.as_bytes())));
                let refresh = Session::new(
                    Kind::Refresh,
                    Some(value.as_bytes().to_vec()),
                    service.clone(),
                    vec![],
                    MAX_SESSION_LIFETIME,
                );
                (
                    Some(value.as_bytes().to_vec()),
                    self.keys.seal(&refresh, &public.to_string()),
                )
            }
            "refresh_token" => {
                let presented = Zeroizing::new(field("refresh_token").unwrap_or_default());
                let refresh = self
                    .keys
                    .open(&presented, &public.to_string(), unix_now())
                    .ok()
                    .filter(|s| s.kind == Kind::Refresh)
                    .ok_or_else(|| Error::Unauthorized {
                        reason: "invalid refresh token".into(),
                        challenge: self.challenge_for(&Method::GET, "/v2/", public),
                    })?;
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
        let resp = self
            .fetch(upstream, &query, auth_header.as_ref(), &headers, peer)
            .await?;
        if resp.status() != StatusCode::OK {
            return Ok(pass_through(resp));
        }
        let jwt = token_from_answer(resp.into_body()).await?;
        let session = Session::new(
            Kind::Access,
            authorization,
            service,
            scopes,
            self.session_lifetime,
        );
        self.answer(session, &jwt, public, Some(refresh_token))
            .await
    }

    /// Seeds the cache with GitLab's token and answers with the sealed session.
    async fn answer(
        &self,
        session: Session,
        jwt: &str,
        public: &Origin,
        refresh_token: Option<String>,
    ) -> Result<Response<ProxyBody>, Error> {
        let upstream_token = upstream_token(jwt)?;
        self.tokens
            .seed(session.id, session.exp, upstream_token)
            .await;
        let sealed = Zeroizing::new(self.keys.seal(&session, &public.to_string()));
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
        Ok(resp)
    }
}

fn upstream_token(jwt: &str) -> Result<UpstreamToken, Error> {
    UpstreamToken::new(jwt).map_err(|_| Error::BadTokenAnswer {
        reason: "the token is not a valid header value",
    })
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn sensitive_header(bytes: &[u8]) -> Result<HeaderValue, Error> {
    let mut v = HeaderValue::from_bytes(bytes).map_err(|_| Error::BadTokenRequest {
        reason: "credentials are not a valid header value".into(),
    })?;
    v.set_sensitive(true);
    Ok(v)
}

/// Logs one token request: whether `Authorization` arrived, its scheme and Basic username.
fn log_token_request(method: &str, authorization: Option<&HeaderValue>) {
    let raw = authorization.map(HeaderValue::as_bytes).unwrap_or_default();
    let (scheme, rest) = match raw.iter().position(|b| *b == b' ') {
        Some(i) => (&raw[..i], &raw[i + 1..]),
        None => (raw, &[][..]),
    };
    let scheme = String::from_utf8_lossy(scheme);
    let username = if scheme.eq_ignore_ascii_case("basic") {
        let decoded = Zeroizing::new(STANDARD.decode(rest.trim_ascii()).unwrap_or_default());
        decoded
            .iter()
            .position(|b| *b == b':')
            .map(|i| String::from_utf8_lossy(&decoded[..i]).into_owned())
    } else {
        None
    };
    tracing::info!(
        target: "regrelay::auth",
        method,
        authorization = if authorization.is_some() { "present" } else { "absent" },
        scheme = %scheme,
        username = username.as_deref().unwrap_or("-"),
        "token request"
    );
}

/// GitLab's own answer (401, 403, 404…) goes back unchanged, streamed.
fn pass_through(resp: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    proxy::strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.map_err(Into::into).boxed_unsync())
}

async fn read_small<B>(body: B) -> Result<Bytes, Error>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<crate::error::BoxError>,
{
    Limited::new(body, MAX_SMALL_BODY_BYTES)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|_| Error::BadTokenAnswer {
            reason: "unreadable or oversized answer",
        })
}

/// The JWT in GitLab's `{"token":…}` (or an OAuth2 `access_token`).
async fn token_from_answer(body: Incoming) -> Result<String, Error> {
    let bytes = Zeroizing::new(read_small(body).await?.to_vec());
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| Error::BadTokenAnswer {
            reason: "the answer is not JSON",
        })?;
    v.get("token")
        .or_else(|| v.get("access_token"))
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .ok_or(Error::BadTokenAnswer {
            reason: "the answer has no token",
        })
}

/// The first `message` of a registry-format error body.
fn registry_error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(v["errors"][0]["message"].as_str()?.to_owned())
}

fn with_query(realm: &Uri, query: &str) -> Result<Uri, Error> {
    let path = realm.path();
    let pq = match (realm.query(), query.is_empty()) {
        (Some(q), false) => format!("{path}?{q}&{query}"),
        (Some(q), true) => format!("{path}?{q}"),
        (None, false) => format!("{path}?{query}"),
        (None, true) => path.to_owned(),
    };
    let origin = Origin::of(realm).ok_or(Error::BadTokenRequest {
        reason: "token realm is not http(s)".into(),
    })?;
    Ok(origin.join(&pq)?)
}

/// Resolves a `Location` against the URL that answered it.
fn resolve(base: &Uri, location: &str) -> Result<Uri, Error> {
    let loc: Uri = location.parse().map_err(|_| Error::AuthRedirectRefused {
        target: "an unparsable Location".into(),
    })?;
    if loc.scheme().is_some() {
        return Ok(loc);
    }
    let origin = Origin::of(base).ok_or(Error::AuthRedirectRefused {
        target: location.into(),
    })?;
    let pq = if location.starts_with('/') {
        location.to_owned()
    } else {
        let dir = base.path().rsplit_once('/').map_or("", |(d, _)| d);
        format!("{dir}/{location}")
    };
    Ok(origin.join(&pq)?)
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

    #[test]
    fn redirect_resolution_and_realm_query() {
        let base: Uri = "http://gl:8080/jwt/auth?service=s".parse().unwrap();
        let cases = [
            (
                "https://other:9/jwt/auth?x=1",
                "https://other:9/jwt/auth?x=1",
            ),
            ("/elsewhere?service=s", "http://gl:8080/elsewhere?service=s"),
            ("auth2", "http://gl:8080/jwt/auth2"),
        ];
        for (loc, want) in cases {
            assert_eq!(resolve(&base, loc).unwrap().to_string(), want, "{loc}");
        }
        let realm: Uri = "http://gl/jwt/auth".parse().unwrap();
        assert_eq!(
            with_query(&realm, "service=a&scope=b").unwrap().to_string(),
            "http://gl/jwt/auth?service=a&scope=b"
        );
    }

    #[test]
    fn bearer_tokens_are_found_case_insensitively() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer rr1.x.y"),
        );
        assert_eq!(bearer_token(&h), Some("rr1.x.y"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic YTpi"),
        );
        assert_eq!(bearer_token(&h), None);
    }
}
