//! Minting: asking the token service (GitLab's `/jwt/auth`) for tokens, on a client's behalf
//! (the `/jwt/auth` endpoint, [`crate::auth`]) or on a sealed session's (mid-push re-minting,
//! [`crate::access`]).
//!
//! - The upstream realm is pinned: the configured `--token-realm`, or the realm the configured
//!   registry announces when regrelay itself asks it (`GET /v2/` with no client header). It is
//!   never learnt from an answer to a proxied request, whose `Host`/`X-Forwarded-Host` a client
//!   chose; a realm that names regrelay itself is refused.
//! - Redirects are followed, keeping `Authorization`, only to the realm's own origin, its https
//!   upgrade, and `--auth-redirect-allow` origins (scheme included); an https realm never
//!   redirects credentials to http.
//! - Answers are mapped faithfully ([`MintFailure`]): 401/403/404 stay refusals with GitLab's
//!   own message (in any of its formats, [`answer`]), 429/503 stay "busy" with `Retry-After`, a
//!   deadline is a timeout.
//! - Logins are watched so that regrelay never gets its own address banned ([`Logins`]): a
//!   refused credential's answer is replayed for a while instead of asking again, failed logins
//!   are budgeted, and GitLab's ban is recognised and explained ([`Minter::ask`]).

pub mod answer;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};

use crate::body;
use crate::challenge::{self, Challenge};
use crate::config::{self, AllowedOrigin, Config, Origin, UpstreamConfig};
use crate::error::{Error, MintFailure};
use crate::logins::{Gate, Logins};
use crate::metrics::Metrics;
use crate::session::Session;
use crate::token::UpstreamToken;
use crate::upstream::{Upstream, UpstreamBody};

/// Redirects followed for one token request.
pub const MAX_TOKEN_REDIRECTS: usize = 5;
/// Largest token answer or OAuth2 form accepted (they are a few KiB).
pub const MAX_SMALL_BODY_BYTES: usize = 256 * 1024;

/// Who asks: what goes to the token service about the client.
pub struct Caller<'a> {
    /// `X-Forwarded-For` (the client's address as regrelay trusts it).
    pub forwarded_for: &'a str,
    /// The client's `User-Agent`, if any.
    pub user_agent: Option<&'a HeaderValue>,
    /// The client, whose share of upstream connections token requests take.
    pub client: Option<&'a crate::clients::ClientHandle>,
}

/// What the token service answered.
pub enum Answered {
    /// A token.
    Token(zeroize::Zeroizing<String>),
    /// Anything else, kept whole: a refusal, a rate limit, an outage.
    Refused(answer::Refusal),
}

/// Talks to the token service.
pub struct Minter {
    registry: Upstream,
    client: Upstream,
    logins: Logins,
    metrics: Arc<Metrics>,
    /// Learned once, read on every mint: lock-free, never poisoned.
    realm: ArcSwapOption<Uri>,
    service: ArcSwapOption<String>,
    allow: Vec<AllowedOrigin>,
    timeout: Duration,
    listen: SocketAddr,
    publics: Vec<Origin>,
}

impl Minter {
    /// For `upstream`, whose realm is configured or asked of `registry`; `client` carries token
    /// requests.
    pub fn new(
        cfg: &Config,
        upstream: &UpstreamConfig,
        registry: Upstream,
        client: Upstream,
        metrics: Arc<Metrics>,
    ) -> Minter {
        Minter {
            registry,
            client,
            logins: Logins::new(cfg.failed_logins.0, cfg.failed_logins.1),
            metrics,
            realm: ArcSwapOption::new(upstream.token_realm.clone().map(Arc::new)),
            service: ArcSwapOption::empty(),
            allow: upstream.auth_redirect_allow.clone(),
            timeout: cfg.timeouts.token_request,
            listen: cfg.listen,
            publics: cfg
                .public_url
                .iter()
                .chain(&cfg.public_aliases)
                .cloned()
                .collect(),
        }
    }

    /// The client that carries token requests (readiness probes its realm with it).
    pub fn token_client(&self) -> &Upstream {
        &self.client
    }

    /// The upstream realm: configured, or asked of the registry by regrelay itself, once.
    pub async fn realm(&self) -> Result<Uri, Error> {
        if let Some(r) = self.realm.load_full() {
            return Ok(Uri::clone(&r));
        }
        self.probe().await
    }

    /// The `service` the registry announces (asked once), if it names one.
    pub async fn service(&self) -> Option<String> {
        if let Some(s) = self.service.load_full() {
            return Some(String::clone(&s));
        }
        let _ = self.probe().await;
        self.service.load_full().map(|s| String::clone(&s))
    }

    /// Asks the registry's `GET /v2/` for its challenge: learns its service, and its realm when
    /// none is configured.
    async fn probe(&self) -> Result<Uri, Error> {
        let unknown = || Error::RealmUnknown {
            upstream: self.registry.origin().to_string(),
        };
        let resp = self.registry.probe_response().await?;
        let challenge = resp
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .find_map(|v| v.to_str().ok().and_then(Challenge::parse))
            .ok_or_else(unknown)?;
        if let Some(service) = challenge.get("service") {
            self.service.store(Some(Arc::new(service.to_owned())));
        }
        if let Some(r) = self.realm.load_full() {
            return Ok(Uri::clone(&r));
        }
        let announced = challenge.get("realm").and_then(|r| r.parse::<Uri>().ok());
        let realm = announced.ok_or_else(unknown)?;
        let origin = Origin::of(&realm).ok_or_else(unknown)?;
        if let Err(err) = config::refuse_self_realm(
            &origin,
            self.listen,
            &self.publics.iter().collect::<Vec<_>>(),
        ) {
            tracing::error!(error = %err, "the registry announces a realm on regrelay itself");
            return Err(unknown());
        }
        tracing::info!(realm = %realm, "upstream token realm (announced by the registry)");
        self.realm.store(Some(Arc::new(realm.clone())));
        Ok(realm)
    }

    /// Asks the token service for a token with `query` and `authorization`, minding failed
    /// logins ([`Logins`]): a credential it refused a moment ago gets its answer again without
    /// asking; past the failed-login budgets a credential never seen succeed is refused with
    /// 429; while the service bans regrelay's address, nothing is asked (once a minute it is).
    pub async fn ask(
        &self,
        query: &str,
        authorization: Option<&HeaderValue>,
        caller: &Caller<'_>,
    ) -> Result<Answered, Error> {
        if let Some(retry_after) = self.logins.ban_remaining() {
            self.count_login("banned");
            return Err(Error::Banned { retry_after });
        }
        let client = caller.client.map(|c| c.client.key());
        let login = authorization.and_then(|a| self.logins.login(a.as_bytes(), client));
        if let Some(l) = &login {
            match self.logins.gate(l) {
                Gate::Ask => {}
                Gate::Replay(refused) => {
                    self.count_login("replayed");
                    return Ok(Answered::Refused(refused));
                }
                Gate::Throttled { retry_after, whose } => {
                    self.count_login("throttled");
                    return Err(Error::LoginsThrottled { retry_after, whose });
                }
            }
        }
        let resp = self.fetch(query, authorization, caller).await?;
        let status = resp.status();
        if status == StatusCode::OK {
            self.logins.not_banned();
            let jwt = token_from_answer(resp.into_body()).await?;
            if let Some(l) = &login {
                self.logins.succeeded(l);
            }
            return Ok(Answered::Token(zeroize::Zeroizing::new(jwt)));
        }
        let headers = resp.headers().clone();
        let body = read_small(resp.into_body()).await.unwrap_or_default();
        if crate::logins::is_ban(status, &body) {
            self.logins.banned();
            self.metrics.token_service_bans.inc();
            tracing::error!(
                token_service = %self.client.origin(),
                "{}",
                Error::Banned { retry_after: 0 }.public_message()
            );
            return Err(Error::Banned {
                retry_after: crate::logins::BAN_RECHECK.as_secs(),
            });
        }
        self.logins.not_banned();
        let refused = answer::refusal(status, &headers, body);
        if let (StatusCode::UNAUTHORIZED, Some(l)) = (status, &login) {
            let hold = self.logins.refused(l, refused.clone());
            tracing::info!(
                hold_secs = hold.as_secs(),
                "the token service refused these credentials: the same ones are answered so, without asking it, for the hold"
            );
        }
        Ok(Answered::Refused(refused))
    }

    fn count_login(&self, outcome: &'static str) {
        self.metrics
            .logins_answered_locally
            .get_or_create(&crate::metrics::OutcomeLabels { outcome })
            .inc();
    }

    /// Sends a GET for the upstream realm with `query`, following allowed redirects, within the
    /// token request deadline.
    pub async fn fetch(
        &self,
        query: &str,
        authorization: Option<&HeaderValue>,
        caller: &Caller<'_>,
    ) -> Result<Response<UpstreamBody>, Error> {
        let realm = self.realm().await?;
        let realm_origin = Origin::of(&realm).ok_or(Error::RealmUnknown {
            upstream: self.registry.origin().to_string(),
        })?;
        let mut url = with_query(&realm, query)?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        for _ in 0..=MAX_TOKEN_REDIRECTS {
            let mut req = Request::get(url.clone()).body(body::empty())?;
            let headers = req.headers_mut();
            if let Some(auth) = authorization {
                headers.insert(header::AUTHORIZATION, auth.clone());
            }
            headers.insert(
                &crate::clients::X_FORWARDED_FOR,
                crate::proxy::header_value(caller.forwarded_for)?,
            );
            if let Some(ua) = caller.user_agent {
                headers.insert(header::USER_AGENT, ua.clone());
            }
            if let Some(client) = caller.client {
                req.extensions_mut().insert(client.clone());
            }
            let resp = tokio::time::timeout_at(deadline, self.client.send(req))
                .await
                .map_err(|_| {
                    Error::Mint(MintFailure::Timeout {
                        secs: self.timeout.as_secs(),
                    })
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
                target: "a non-http(s) Location".into(),
            })?;
            if !self.redirect_allowed(&realm_origin, &target) {
                return Err(Error::AuthRedirectRefused {
                    target: target.to_string(),
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
        let https = &http::uri::Scheme::HTTPS;
        if realm.scheme() == https && to.scheme() != https {
            return false;
        }
        let https_upgrade = to.scheme() == https
            && to
                .authority()
                .host()
                .eq_ignore_ascii_case(realm.authority().host())
            && (to.effective_port() == 443 || to.effective_port() == realm.effective_port());
        to.same_as(realm) || https_upgrade || self.allow.iter().any(|a| a.matches(to))
    }

    /// A fresh upstream token for `session`'s credentials and scopes.
    pub async fn mint(
        &self,
        session: &Session,
        caller: &Caller<'_>,
    ) -> Result<UpstreamToken, MintFailure> {
        let query = challenge::token_query(&session.service, &session.scopes);
        let authorization = session
            .authorization
            .as_deref()
            .map(sensitive_header)
            .transpose()
            .map_err(|e| failed(&e))?;
        let answered = self
            .ask(&query, authorization.as_ref(), caller)
            .await
            .map_err(|e| failed(&e))?;
        match answered {
            Answered::Token(jwt) => upstream_token(&jwt).map_err(|e| failed(&e)),
            Answered::Refused(refused) => {
                let failure = refused.failure();
                tracing::warn!(status = refused.status.as_u16(), error = %failure, "token service gave no token for a session");
                Err(failure)
            }
        }
    }
}

/// A [`MintFailure`] for an error on the way (logged in full here, once).
fn failed(err: &Error) -> MintFailure {
    match err {
        Error::Mint(f) => return f.clone(),
        Error::Banned { retry_after } => {
            return MintFailure::Banned {
                retry_after: *retry_after,
            }
        }
        Error::LoginsThrottled { retry_after, .. } => {
            return MintFailure::Busy {
                status: 429,
                retry_after: Some(*retry_after),
                message: err.to_string(),
            }
        }
        _ => {}
    }
    tracing::warn!(error = %err.chain(), "token request failed");
    MintFailure::Failed {
        reason: err.public_message(),
    }
}

/// Wraps a JWT the token service issued.
pub fn upstream_token(jwt: &str) -> Result<UpstreamToken, Error> {
    UpstreamToken::new(jwt).map_err(|_| Error::BadTokenAnswer {
        reason: "the token is not a valid header value",
    })
}

/// A header value for credentials, marked sensitive.
pub fn sensitive_header(bytes: &[u8]) -> Result<HeaderValue, Error> {
    let mut v = HeaderValue::from_bytes(bytes).map_err(|_| Error::BadTokenRequest {
        reason: "credentials are not a valid header value".into(),
    })?;
    v.set_sensitive(true);
    Ok(v)
}

/// Reads a small body (token answers, OAuth2 forms) with a size bound.
pub async fn read_small<B>(body: B) -> Result<Bytes, Error>
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
pub async fn token_from_answer(body: UpstreamBody) -> Result<String, Error> {
    let bytes = zeroize::Zeroizing::new(read_small(body).await?.to_vec());
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
    let refused = || Error::AuthRedirectRefused {
        target: "an unparsable Location".into(),
    };
    let loc: Uri = location.parse().map_err(|_| refused())?;
    if loc.scheme().is_some() {
        return Ok(loc);
    }
    let origin = Origin::of(base).ok_or_else(refused)?;
    let pq = if location.starts_with('/') {
        location.to_owned()
    } else {
        let dir = base.path().rsplit_once('/').map_or("", |(d, _)| d);
        format!("{dir}/{location}")
    };
    Ok(origin.join(&pq)?)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn redirects_keep_credentials_only_on_allowed_origins_never_down_to_http() {
        let cfg = Config::try_from(crate::config::ConfigFile {
            registry: Some("http://r:5000".into()),
            auth_redirect_allow: Some(vec![
                "https://sso.example.com".into(),
                "http://plain.example.com".into(),
            ]),
            ..Default::default()
        })
        .unwrap();
        let trust = crate::tls::UpstreamTrust::load(None).unwrap();
        let up = Upstream::new(&cfg, &trust, cfg.registry.clone());
        let m = Minter::new(
            &cfg,
            &cfg.upstreams[0],
            up.clone(),
            up,
            Arc::new(Metrics::new()),
        );
        let o = |s: &str| Origin::of(&s.parse().unwrap()).unwrap();
        let cases = [
            (
                "https://gl.example.com/jwt/auth",
                "https://gl.example.com/x",
                true,
            ),
            (
                "http://gl.example.com/jwt/auth",
                "https://gl.example.com/x",
                true,
            ),
            (
                "https://gl.example.com/jwt/auth",
                "http://gl.example.com/x",
                false,
            ),
            (
                "https://gl.example.com/jwt/auth",
                "https://sso.example.com/x",
                true,
            ),
            (
                "https://gl.example.com/jwt/auth",
                "http://sso.example.com/x",
                false,
            ),
            (
                "https://gl.example.com/jwt/auth",
                "http://plain.example.com/x",
                false,
            ),
            (
                "http://gl.example.com/jwt/auth",
                "http://plain.example.com/x",
                true,
            ),
            (
                "https://gl.example.com/jwt/auth",
                "https://evil.example.com/x",
                false,
            ),
        ];
        for (realm, to, want) in cases {
            assert_eq!(
                m.redirect_allowed(&o(realm), &o(to)),
                want,
                "{realm} -> {to}"
            );
        }
    }
}
