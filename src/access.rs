//! Session handling on registry requests: which credentials a request carries, the GitLab token
//! that goes upstream in their place, and the challenges clients see.
//!
//! - A `Bearer rr1.…` token is a regrelay session: it is opened (refused with a fresh challenge
//!   when tampered with, expired, or sealed with an unknown key) and never forwarded; the
//!   upstream request carries a GitLab token for exactly its scopes ([`TokenStore`], minted by
//!   [`Minter`]). Anything else passes untouched.
//! - What a session's token may do is known before it is sent: a request for a repository the
//!   session never asked for, or one the token service refused it ([`crate::token::Grants`]), is
//!   answered here (`401 insufficient_scope`, or `403 DENIED` with the reason for a push) with no
//!   mint and no registry request; a refusal is remembered with a backoff, after which one
//!   request asks the token service again.
//! - Every `WWW-Authenticate: Bearer` challenge from the registry gets `realm=<public>/jwt/auth`,
//!   so clients ask regrelay for tokens on the registry's own host and keep `Authorization`.
//!   The `service` is learnt from those challenges; the realm never is (see [`crate::mint`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use arc_swap::ArcSwap;

use dashmap::DashMap;
use http::header::{self, HeaderMap, HeaderValue};
use http::Method;

use crate::api_path::ApiPath;
use crate::challenge::{self, Challenge, Scope};
use crate::config::Origin;
use crate::error::{Error, MintFailure};
use crate::metrics::Metrics;
use crate::mint::{Caller, Minter};
use crate::mirror::Routed;
use crate::proxy::Forward;
use crate::router::TOKEN_PATH;
use crate::session::{unix_now, KeyRing, Keys, Kind, OpenError, Session, TOKEN_PREFIX};
use crate::token::{Counters, MintFuture, Refused, TokenStore, UpstreamToken};

/// Service named in challenges regrelay makes itself, until the registry told us its own.
pub const DEFAULT_SERVICE: &str = "container_registry";

/// A registry request's credentials, as regrelay sees them.
pub enum Credentials {
    /// No regrelay session: forwarded untouched (anonymous, or a token regrelay did not issue).
    Untouched,
    /// A valid regrelay session.
    Session(Arc<Session>),
}

/// A session opened earlier, under the ring (its generation: the ring itself, old keys
/// included, is not kept alive) and for the name it was opened with.
struct Opened {
    ring: u64,
    name: String,
    session: Arc<Session>,
}

/// Sessions opened recently, by the SHA-256 of their sealed token (the token itself is not
/// kept): a client sends the same token on every request of a pull or push, and a warm request
/// then skips base64, the AEAD and the JSON of opening it again. An entry serves only while
/// its session is unexpired, for the same public name, under the same key ring (a reload that
/// drops a key ends its sessions here as on a fresh open). At most `max` entries and `max_bytes`
/// bytes (roughly): when full, expired ones go, and if that is not enough, arbitrary ones down to
/// 90 %.
struct OpenedCache {
    map: DashMap<[u8; 32], Opened>,
    max: usize,
    max_bytes: u64,
    /// Bytes held (shared with the metrics).
    counters: Arc<Counters>,
}

/// Bytes of an opened entry beyond its session's heap: the map slot, the `Arc`, the name.
const OPENED_OVERHEAD: u64 = 160;

impl Opened {
    fn bytes(&self) -> u64 {
        OPENED_OVERHEAD + (self.name.len() + self.session.heap_bytes()) as u64
    }
}

impl OpenedCache {
    fn key(token: &str) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(token.as_bytes()).into()
    }

    fn bytes(&self) -> u64 {
        self.counters.opened_bytes.load(Ordering::Relaxed)
    }

    fn get(&self, key: &[u8; 32], ring: u64, name: &str, now: u64) -> Option<Arc<Session>> {
        let hit = self.map.get(key)?;
        (hit.ring == ring && hit.name == name && hit.session.exp > now).then(|| hit.session.clone())
    }

    fn insert(&self, key: [u8; 32], opened: Opened, now: u64) {
        let size = opened.bytes();
        if self.map.len() >= self.max || self.bytes() + size > self.max_bytes {
            self.evict(now, size);
        }
        self.counters
            .opened_bytes
            .fetch_add(size, Ordering::Relaxed);
        if let Some(old) = self.map.insert(key, opened) {
            self.counters
                .opened_bytes
                .fetch_sub(old.bytes(), Ordering::Relaxed);
        }
    }

    /// Makes room for an entry of `size`: expired entries go, then arbitrary ones until the
    /// cache is at 90 % of its bounds.
    fn evict(&self, now: u64, size: u64) {
        let gone = |o: &Opened| {
            self.counters
                .opened_bytes
                .fetch_sub(o.bytes(), Ordering::Relaxed);
        };
        self.map.retain(|_, o| {
            let keep = o.session.exp > now;
            if !keep {
                gone(o);
            }
            keep
        });
        let target = self.max - self.max / 10;
        let byte_target = (self.max_bytes - self.max_bytes / 10).saturating_sub(size);
        let (mut len, mut bytes) = (self.map.len(), self.bytes());
        let mut excess = Vec::new();
        for e in self.map.iter() {
            if len < target && bytes <= byte_target {
                break;
            }
            len -= 1;
            bytes = bytes.saturating_sub(e.bytes());
            excess.push(*e.key());
        }
        for k in excess {
            if let Some((_, o)) = self.map.remove(&k) {
                gone(&o);
            }
        }
    }
}

/// Sessions and their upstream tokens.
pub struct Access {
    keys: Arc<Keys>,
    /// For a non-default upstream, its name: realms given to clients carry `?ns=<name>`, so
    /// their token requests come back to this upstream.
    realm_ns: Option<String>,
    /// The canonical public URL, when configured: sessions are sealed for it whatever name a
    /// client used, so they open through every alias and on every replica with the same one.
    canonical: Option<String>,
    /// The `service` the registry names, read on every challenge: lock-free, never poisoned.
    service: ArcSwap<String>,
    tokens: TokenStore,
    opened: OpenedCache,
    minter: Arc<Minter>,
    metrics: Arc<Metrics>,
}

impl Access {
    /// Builds the session state; `realm_ns` names a non-default upstream. Its token cache and
    /// opened-session cache hold at most `cache_max_entries` each, and `cache_max_bytes`
    /// together (half each).
    pub fn new(
        keys: Arc<Keys>,
        minter: Arc<Minter>,
        (cache_max_entries, cache_max_bytes): (usize, u64),
        realm_ns: Option<String>,
        canonical: Option<String>,
        metrics: Arc<Metrics>,
    ) -> Access {
        let tokens = TokenStore::new(cache_max_entries).with_max_bytes(cache_max_bytes / 2);
        let counters = tokens.shared_counters();
        Access {
            keys,
            realm_ns,
            canonical,
            service: ArcSwap::from_pointee(DEFAULT_SERVICE.to_owned()),
            tokens,
            opened: OpenedCache {
                map: DashMap::new(),
                max: cache_max_entries.max(1),
                max_bytes: (cache_max_bytes / 2).max(1),
                counters,
            },
            minter,
            metrics,
        }
    }

    /// Where this upstream's sessions and uploads are counted.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The token service.
    pub fn minter(&self) -> &Minter {
        &self.minter
    }

    /// The token service, shared (for a task of its own).
    pub fn shared_minter(&self) -> Arc<Minter> {
        self.minter.clone()
    }

    /// The key ring.
    pub fn keys(&self) -> Arc<KeyRing> {
        self.keys.current()
    }

    /// The name sessions are sealed for: the canonical public URL, else the one in use.
    fn seal_name(&self, public: &Origin) -> String {
        self.canonical.clone().unwrap_or_else(|| public.to_string())
    }

    /// Seals `session` for this deployment's public name.
    pub fn seal(&self, session: &Session, public: &Origin) -> String {
        self.metrics.sessions_issued.inc();
        self.keys.current().seal(session, &self.seal_name(public))
    }

    /// Opens a sealed token of this deployment's public name.
    pub fn open(&self, token: &str, public: &Origin) -> Result<Session, OpenError> {
        let opened = self
            .keys
            .current()
            .open(token, &self.seal_name(public), unix_now());
        self.count_open(opened)
    }

    /// Opens a sealed token of this deployment's public name, or finds it opened already.
    fn open_cached(&self, token: &str, public: &Origin) -> Result<Arc<Session>, OpenError> {
        let (ring, name, now) = (self.keys.current(), self.seal_name(public), unix_now());
        let key = OpenedCache::key(token);
        if let Some(session) = self.opened.get(&key, ring.generation(), &name, now) {
            self.metrics.session_open("ok");
            return Ok(session);
        }
        let session = Arc::new(self.count_open(ring.open(token, &name, now))?);
        let opened = Opened {
            ring: ring.generation(),
            name,
            session: session.clone(),
        };
        self.opened.insert(key, opened, now);
        Ok(session)
    }

    /// Counts the outcome of opening a session.
    fn count_open(&self, opened: Result<Session, OpenError>) -> Result<Session, OpenError> {
        self.metrics.session_open(match &opened {
            Ok(_) => "ok",
            Err(OpenError::Malformed) => "malformed",
            Err(OpenError::UnknownKey) => "unknown_key",
            Err(OpenError::OtherPublicUrl) => "other_public_url",
            Err(OpenError::Tampered) => "tampered",
            Err(OpenError::Expired) => "expired",
        });
        opened
    }

    /// The upstream token cache (and its counters).
    pub fn tokens(&self) -> &TokenStore {
        &self.tokens
    }

    /// The realm clients are sent to: regrelay's own `/jwt/auth` (with `?ns=` for a
    /// non-default upstream).
    pub fn public_realm(&self, public: &Origin) -> String {
        match &self.realm_ns {
            Some(ns) => format!("{public}{TOKEN_PATH}?ns={}", challenge::percent_encode(ns)),
            None => format!("{public}{TOKEN_PATH}"),
        }
    }

    /// Points the registry's challenges at regrelay (their scopes in the client's names, when
    /// `routed` translates them) and learns the service. Returns the `error` of the last
    /// challenge, if any.
    pub fn rewrite_challenges(
        &self,
        headers: &mut HeaderMap,
        public: &Origin,
        routed: &Routed,
    ) -> Option<String> {
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
            if let Some(service) = c.get("service") {
                if **self.service.load() != service {
                    self.service.store(Arc::new(service.to_owned()));
                }
            }
            error = c.error().map(str::to_owned);
            c.set("realm", &self.public_realm(public));
            if routed.translates() {
                if let Some(scope) = c.get("scope").map(|s| {
                    s.split(' ')
                        .map(|one| routed.client_scope(one))
                        .collect::<Vec<_>>()
                        .join(" ")
                }) {
                    c.set("scope", &scope);
                }
            }
            match HeaderValue::from_str(&c.to_string()) {
                Ok(v) => headers.append(header::WWW_AUTHENTICATE, v),
                Err(_) => headers.append(header::WWW_AUTHENTICATE, value),
            };
        }
        error
    }

    /// A fresh challenge for a request regrelay refuses itself: its token is not valid
    /// (`invalid_token`: log in again).
    pub fn challenge_for(&self, method: &Method, api: &ApiPath, public: &Origin) -> String {
        self.challenge_with(method, api, public, "invalid_token")
    }

    /// A fresh challenge with `error` (`invalid_token`, `insufficient_scope`).
    fn challenge_with(
        &self,
        method: &Method,
        api: &ApiPath,
        public: &Origin,
        error: &str,
    ) -> String {
        let mut c = Challenge { params: vec![] };
        c.set("realm", &self.public_realm(public));
        c.set("service", &self.service.load());
        if let Some(scope) = api.scope(method) {
            c.set("scope", &scope);
        }
        c.set("error", error);
        c.to_string()
    }

    /// Classifies a registry request's `Authorization`; a session must be bound to `upstream`
    /// (the name sealed into sessions: empty for the default upstream).
    pub fn credentials(
        &self,
        method: &Method,
        api: &ApiPath,
        headers: &HeaderMap,
        public: &Origin,
        upstream: &str,
    ) -> Result<Credentials, Error> {
        let Some(token) = bearer_token(headers) else {
            return Ok(Credentials::Untouched);
        };
        if !token.starts_with(TOKEN_PREFIX) {
            return Ok(Credentials::Untouched);
        }
        let refuse = |reason: OpenError| Error::Unauthorized {
            reason: reason.to_string(),
            challenge: self.challenge_for(method, api, public),
        };
        let session = self.open_cached(token, public).map_err(refuse)?;
        if session.kind != Kind::Access {
            return Err(refuse(OpenError::Malformed));
        }
        if session.upstream != upstream {
            return Err(Error::Unauthorized {
                reason: "this session was issued for another upstream".into(),
                challenge: self.challenge_for(method, api, public),
            });
        }
        Ok(Credentials::Session(session))
    }

    /// A GitLab token for `session` to send `method api` with, fresh now (cached, or minted
    /// once for all waiters). GitLab refusing the credentials (revoked, lost permission) is the
    /// client's 401 with a fresh challenge and GitLab's message, so it logs in again; a busy or
    /// unreachable token service stays what it is (429/503/502/504).
    ///
    /// What the request needs is checked first: a repository the session never asked for is
    /// the client's `401 insufficient_scope` (it asks for a token with that scope, as the
    /// registry would make it), and one the token service refused this session is answered the
    /// same (a push: `403 DENIED` with why) without a mint or a registry request, while the
    /// refusal is remembered ([`TokenStore::refuse`]); after its backoff, one request re-mints
    /// to ask again.
    pub async fn upstream_token(
        &self,
        session: &Session,
        fwd: &Forward<'_>,
        method: &Method,
        api: &ApiPath,
    ) -> Result<UpstreamToken, Error> {
        let needed = api.scope(method);
        let need = needed.as_deref().and_then(Scope::parse);
        if let Some(need) = &need {
            if !challenge::covered(&session.scopes, need) {
                self.tokens
                    .counters()
                    .scope_refusals
                    .fetch_add(1, Ordering::Relaxed);
                return Err(self.not_granted(session, need, method, api, fwd.public, false));
            }
        }
        let mint = self.mint_for(session, fwd);
        let token = match self.tokens.get(session.id, session.exp, &mint).await {
            Ok(token) => token,
            Err(failure) => return Err(self.mint_error(failure, method, api, fwd.public)),
        };
        let (Some(need), Some(key)) = (need, needed.as_deref()) else {
            return Ok(token);
        };
        if token.grants.allow(&need) != Some(false) {
            return Ok(token);
        }
        // The token service left this scope out of the session's token.
        match self.tokens.refusal(session.id, key) {
            Refused::Remembered => {
                return Err(self.not_granted(session, &need, method, api, fwd.public, true));
            }
            Refused::Expired => {
                let fresh = self
                    .tokens
                    .remint(session.id, session.exp, &token, &mint)
                    .await
                    .map_err(|failure| self.mint_error(failure, method, api, fwd.public))?;
                if fresh.grants.allow(&need) != Some(false) {
                    self.tokens.grant(session.id, key);
                    return Ok(fresh);
                }
            }
            Refused::No => {}
        }
        let backoff = self.tokens.refuse(session.id, session.exp, key);
        tracing::info!(
            scope = key,
            backoff_secs = backoff.as_secs(),
            "the token service refused the session this scope; answering it without asking again for the backoff"
        );
        Err(self.not_granted(session, &need, method, api, fwd.public, true))
    }

    /// The mint of `session`'s token, for the token cache (it may run in a background task).
    fn mint_for(&self, session: &Session, fwd: &Forward<'_>) -> impl Fn() -> MintFuture {
        let (minter, xff) = (self.minter.clone(), fwd.forwarded_for.clone());
        let (session, client) = (session.clone(), fwd.client.clone());
        move || -> MintFuture {
            let (minter, session, xff) = (minter.clone(), session.clone(), xff.clone());
            let client = client.clone();
            Box::pin(async move {
                let caller = Caller {
                    forwarded_for: &xff,
                    user_agent: None,
                    client: client.as_ref(),
                };
                minter.mint(&session, &caller).await
            })
        }
    }

    fn mint_error(
        &self,
        failure: MintFailure,
        method: &Method,
        api: &ApiPath,
        public: &Origin,
    ) -> Error {
        match failure {
            MintFailure::Refused { message, .. } => Error::Unauthorized {
                reason: format!("the token service refused this session's credentials: {message}"),
                challenge: self.challenge_for(method, api, public),
            },
            other => Error::Mint(other),
        }
    }

    /// The answer for a request whose token cannot do what it needs: a push is `403 DENIED`
    /// with why (Docker reports a bare `401` as "unauthorized"); anything else the registry's
    /// `401 insufficient_scope`, so the client asks for a token with the scope. `refused`: the
    /// token service left the scope out (else the session never asked for it).
    fn not_granted(
        &self,
        session: &Session,
        need: &Scope<'_>,
        method: &Method,
        api: &ApiPath,
        public: &Origin,
        refused: bool,
    ) -> Error {
        let push = need.actions().any(|a| a == "push");
        if refused && push {
            return Error::Denied {
                reason: push_denied_reason(session, need.name),
            };
        }
        let reason = if refused {
            format!(
                "the token service granted this session no {} on {}: the credential may not \
                 (or the repository does not exist)",
                need.actions, need.name
            )
        } else {
            format!(
                "this session's token was not issued for {} on {}; ask /jwt/auth for a token \
                 with that scope",
                need.actions, need.name
            )
        };
        Error::Unauthorized {
            reason,
            challenge: self.challenge_with(method, api, public, "insufficient_scope"),
        }
    }

    /// Caches the token a session was opened with.
    pub fn seed(&self, session: &Session, token: UpstreamToken) {
        self.tokens.seed(session.id, session.exp, token);
    }

    /// Forgets a token the registry refused (`invalid_token` or `insufficient_scope`).
    pub fn invalidate(&self, session: &Session, token: &UpstreamToken) {
        self.tokens.invalidate(session.id, token);
    }
}

/// Why GitLab granted no push on `name` to `session`'s credential (never a secret): GitLab drops
/// what a credential may not do without an error, so the kind of credential tells the likely
/// cause; EE's maintenance mode drops every push, whoever asks
/// (ee/app/services/ee/auth/container_registry_authentication_service.rb).
fn push_denied_reason(session: &Session, name: &str) -> String {
    let user = session
        .authorization
        .as_deref()
        .and_then(crate::challenge::basic_username);
    const MAINTENANCE: &str = "; or GitLab is in maintenance mode (Admin > Settings > General > \
                               Maintenance mode), which refuses every push";
    let cause = match user.as_deref() {
        None => {
            return format!(
                "push denied: anonymous sessions cannot push to {name}; `docker login` first"
            )
        }
        Some("gitlab-ci-token") => format!(
            "push denied: GitLab granted this CI job token no push on {name}: a job token \
             pushes only to its own project's registry"
        ),
        Some(u) if u.starts_with("gitlab+deploy-token") => format!(
            "push denied: GitLab granted deploy token {u} no push on {name}: a deploy token \
             needs the write_registry scope (read_registry ones are read-only), and reaches only \
             its project (a project deploy token) or the projects of its group (a group deploy \
             token)"
        ),
        Some(u) => format!(
            "push denied: GitLab granted {u} no push on {name}: the credential needs the \
             write_registry (or api) scope and its user the Developer role or higher there \
             (deploy tokens without write_registry are read-only; job tokens push only to \
             their own project)"
        ),
    };
    format!("{cause}{MAINTENANCE}")
}

/// The token of a `Bearer` `Authorization`, if any.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn opened(ring: &KeyRing, name: &str, exp: u64) -> Opened {
        let mut session = Session::new(
            Kind::Access,
            Some(b"Basic YTpi".to_vec()),
            "container_registry".into(),
            vec!["repository:g/p:pull".into()],
            std::time::Duration::from_secs(60),
        );
        session.exp = exp;
        Opened {
            ring: ring.generation(),
            name: name.into(),
            session: Arc::new(session),
        }
    }

    fn two_entries() -> OpenedCache {
        OpenedCache {
            map: DashMap::new(),
            max: 2,
            max_bytes: u64::MAX,
            counters: Arc::default(),
        }
    }

    #[test]
    fn an_opened_session_serves_only_unexpired_for_its_ring_and_name() {
        let cache = two_entries();
        let ring = KeyRing::from_keys(&[[1; 32]]);
        let r = ring.generation();
        let (a, b) = (OpenedCache::key("rr1.k.a"), OpenedCache::key("rr1.k.b"));
        cache.insert(a, opened(&ring, "https://r", 100), 10);
        let hit = cache.get(&a, r, "https://r", 10).expect("a hit");
        assert!(Arc::ptr_eq(
            &hit,
            &cache.get(&a, r, "https://r", 99).unwrap()
        ));
        // Another token, name, ring (a reload, even of the same keys) or the expiry: a miss.
        assert!(cache.get(&b, r, "https://r", 10).is_none());
        assert!(cache.get(&a, r, "https://other", 10).is_none());
        let reloaded = KeyRing::from_keys(&[[1; 32]]);
        assert_ne!(reloaded.generation(), r);
        assert!(cache
            .get(&a, reloaded.generation(), "https://r", 10)
            .is_none());
        assert!(cache.get(&a, r, "https://r", 100).is_none());
    }

    #[test]
    fn the_opened_cache_stays_within_its_bound() {
        let cache = two_entries();
        let ring = KeyRing::from_keys(&[[1; 32]]);
        let r = ring.generation();
        let key = |n: u32| OpenedCache::key(&format!("rr1.k.{n}"));
        cache.insert(key(1), opened(&ring, "n", 20), 10);
        cache.insert(key(2), opened(&ring, "n", 100), 10);
        // Full: the expired one goes, the live one stays.
        cache.insert(key(3), opened(&ring, "n", 100), 50);
        assert_eq!(cache.map.len(), 2);
        assert!(cache.get(&key(2), r, "n", 50).is_some());
        // Full of live ones: arbitrary ones go to make room.
        cache.insert(key(4), opened(&ring, "n", 100), 50);
        assert_eq!(cache.map.len(), 2);
        assert!(cache.get(&key(4), r, "n", 50).is_some());
        // The key is a digest: no token is kept.
        assert_ne!(&key(1)[..7], b"rr1.k.1");
    }

    #[test]
    fn the_opened_cache_stays_within_its_bytes() {
        let one = opened(&KeyRing::from_keys(&[[1; 32]]), "n", 100).bytes();
        let cache = OpenedCache {
            map: DashMap::new(),
            max: 1000,
            max_bytes: 10 * one,
            counters: Arc::default(),
        };
        let ring = KeyRing::from_keys(&[[1; 32]]);
        for n in 0..100u32 {
            cache.insert(
                OpenedCache::key(&format!("rr1.k.{n}")),
                opened(&ring, "n", 100),
                50,
            );
            assert!(
                cache.bytes() <= 10 * one,
                "{} > {}",
                cache.bytes(),
                10 * one
            );
        }
        // What is counted is what is held.
        let held: u64 = cache.map.iter().map(|e| e.bytes()).sum();
        assert_eq!(held, cache.bytes());
        assert!(cache.map.len() >= 8);
    }
}
