//! The upstream token cache: one GitLab JWT per session, re-minted before it runs out.
//!
//! GitLab's registry tokens live 5 minutes (15 on gitlab.com) and the registry checks a token
//! once, when a request's headers arrive. So every upstream request gets a token that is valid on
//! arrival: a cached token is reused while more than a margin of its life is left
//! ([`refresh_margin`]: 20 % of the lifetime, clamped to [1 s, 60 s]), and minted again from the
//! sealed credentials otherwise. Concurrent requests of one session share one mint (a per-session
//! async mutex: the waiters find the fresh token). The cache is bounded: expired sessions are
//! swept out, and past the bound arbitrary entries go (they are re-minted on next use).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use http::HeaderValue;

use crate::error::Error;
use crate::session::unix_now;

/// Default bound on cached sessions.
pub const DEFAULT_TOKEN_CACHE_MAX_ENTRIES: usize = 100_000;
/// Lifetime assumed for a token without a readable `exp` (what Docker assumes without
/// `expires_in`).
pub const FALLBACK_TOKEN_LIFETIME_SECS: u64 = 60;
const MIN_MARGIN: Duration = Duration::from_secs(1);
const MAX_MARGIN: Duration = Duration::from_secs(60);

/// How long before its expiry a token of `lifetime` is replaced: 20 %, clamped to [1 s, 60 s].
pub fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 5).clamp(MIN_MARGIN, MAX_MARGIN)
}

/// An upstream (GitLab) token ready to send.
#[derive(Clone)]
pub struct UpstreamToken {
    /// `Bearer <jwt>`, marked sensitive.
    pub header: HeaderValue,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Unix seconds when it was minted.
    pub minted: u64,
}

impl std::fmt::Debug for UpstreamToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamToken")
            .field("header", &"<redacted>")
            .field("exp", &self.exp)
            .finish()
    }
}

impl UpstreamToken {
    /// Wraps a JWT; `exp` comes from its payload, or [`FALLBACK_TOKEN_LIFETIME_SECS`] from now.
    pub fn new(jwt: &str) -> Result<UpstreamToken, http::header::InvalidHeaderValue> {
        let minted = unix_now();
        let exp = crate::challenge::jwt_exp(jwt).unwrap_or(minted + FALLBACK_TOKEN_LIFETIME_SECS);
        let mut header = HeaderValue::from_str(&format!("Bearer {jwt}"))?;
        header.set_sensitive(true);
        Ok(UpstreamToken {
            header,
            exp,
            minted,
        })
    }

    /// Seconds of life left at `now` (0 when expired).
    pub fn remaining(&self, now: u64) -> Duration {
        Duration::from_secs(self.exp.saturating_sub(now))
    }

    /// Still usable at `now`: more than the margin of its lifetime is left.
    pub fn fresh_at(&self, now: u64) -> bool {
        let lifetime = Duration::from_secs(self.exp.saturating_sub(self.minted));
        self.remaining(now) > refresh_margin(lifetime)
    }
}

/// Counters of the token cache (read by metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Tokens minted (first mints and refreshes).
    pub mints: AtomicU64,
    /// Mints that replaced a token that was running out.
    pub refreshes: AtomicU64,
    /// Requests that waited for another request's mint and used its token.
    pub joins: AtomicU64,
    /// Failed mints by upstream status (0 = no answer).
    pub mint_failures: DashMap<u16, AtomicU64>,
}

impl Counters {
    fn failed(&self, status: u16) {
        self.mint_failures
            .entry(status)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<UpstreamToken>>>;

struct Entry {
    slot: Slot,
    session_exp: u64,
}

/// Session id → upstream token, bounded.
pub struct TokenStore {
    entries: DashMap<u128, Entry>,
    max_entries: usize,
    counters: Counters,
}

impl TokenStore {
    /// An empty store holding at most `max_entries` sessions.
    pub fn new(max_entries: usize) -> TokenStore {
        TokenStore {
            entries: DashMap::new(),
            max_entries: max_entries.max(1),
            counters: Counters::default(),
        }
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Sessions cached now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn slot(&self, session: u128, session_exp: u64) -> Slot {
        if let Some(e) = self.entries.get(&session) {
            return e.slot.clone();
        }
        if self.entries.len() >= self.max_entries {
            self.evict();
        }
        self.entries
            .entry(session)
            .or_insert_with(|| Entry {
                slot: Slot::default(),
                session_exp,
            })
            .slot
            .clone()
    }

    /// Drops expired sessions; if the store is still full, drops entries until it is at 90 %.
    fn evict(&self) {
        let now = unix_now();
        self.entries.retain(|_, e| e.session_exp > now);
        let target = self.max_entries - self.max_entries / 10 - 1;
        if self.entries.len() > target {
            let excess: Vec<u128> = self
                .entries
                .iter()
                .take(self.entries.len() - target)
                .map(|e| *e.key())
                .collect();
            for k in excess {
                self.entries.remove(&k);
            }
        }
    }

    /// Puts a token just obtained for a new session (the one answering its token request).
    pub async fn seed(&self, session: u128, session_exp: u64, token: UpstreamToken) {
        *self.slot(session, session_exp).lock().await = Some(token);
    }

    /// A token for `session` that is fresh now: the cached one, or one from `mint`, which runs at
    /// most once at a time per session (waiters use its result).
    pub async fn get<F, Fut>(
        &self,
        session: u128,
        session_exp: u64,
        mint: F,
    ) -> Result<UpstreamToken, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<UpstreamToken, Error>>,
    {
        let slot = self.slot(session, session_exp);
        let (mut guard, waited) = match slot.try_lock() {
            Ok(g) => (g, false),
            Err(_) => (slot.lock().await, true),
        };
        if let Some(tok) = guard.as_ref().filter(|t| t.fresh_at(unix_now())) {
            if waited {
                self.counters.joins.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(tok.clone());
        }
        let refresh = guard.is_some();
        match mint().await {
            Ok(tok) => {
                self.counters.mints.fetch_add(1, Ordering::Relaxed);
                if refresh {
                    self.counters.refreshes.fetch_add(1, Ordering::Relaxed);
                }
                *guard = Some(tok.clone());
                Ok(tok)
            }
            Err(err) => {
                self.counters.failed(err.upstream_status().unwrap_or(0));
                Err(err)
            }
        }
    }

    /// Forgets `stale` (the registry refused it), unless another request already replaced it.
    pub async fn invalidate(&self, session: u128, stale: &UpstreamToken) {
        let slot = match self.entries.get(&session) {
            Some(e) => e.slot.clone(),
            None => return,
        };
        let mut guard = slot.lock().await;
        if guard.as_ref().is_some_and(|t| t.header == stale.header) {
            *guard = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn token(minted: u64, exp: u64) -> UpstreamToken {
        let mut t = UpstreamToken::new("a.b.c").unwrap();
        t.minted = minted;
        t.exp = exp;
        t
    }

    #[test]
    fn margin_is_a_fifth_clamped() {
        let cases = [(1, 1), (5, 1), (10, 2), (300, 60), (900, 60), (0, 1)];
        for (lifetime, want) in cases {
            assert_eq!(
                refresh_margin(Duration::from_secs(lifetime)),
                Duration::from_secs(want),
                "{lifetime}"
            );
        }
        // A 5 s token minted at 100 is fresh until 1 s before its expiry; a 300 s one until 60 s.
        let cases = [
            (100, 105, 103, true),
            (100, 105, 104, false),
            (0, 300, 239, true),
            (0, 300, 240, false),
        ];
        for (minted, exp, now, fresh) in cases {
            assert_eq!(
                token(minted, exp).fresh_at(now),
                fresh,
                "{minted} {exp} {now}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn fifty_parallel_requests_share_one_mint() {
        let store = Arc::new(TokenStore::new(16));
        let calls = Arc::new(AtomicUsize::new(0));
        let exp = unix_now() + 3600;
        let mut tasks = vec![];
        for _ in 0..50 {
            let (store, calls) = (store.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                store
                    .get(7, exp, || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok(token(unix_now(), unix_now() + 300))
                    })
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(store.counters().mints.load(Ordering::SeqCst), 1);
        assert_eq!(store.counters().joins.load(Ordering::SeqCst), 49);
    }

    #[tokio::test]
    async fn stale_tokens_are_refreshed_invalidated_and_failures_counted() {
        let store = TokenStore::new(16);
        let exp = unix_now() + 3600;
        let now = unix_now();
        store.seed(1, exp, token(now - 10, now + 1)).await;
        let got = store
            .get(1, exp, || async { Ok(token(now, now + 300)) })
            .await
            .unwrap();
        assert_eq!(got.exp, now + 300);
        assert_eq!(store.counters().refreshes.load(Ordering::SeqCst), 1);
        store.invalidate(1, &got).await;
        let err = store
            .get(1, exp, || async {
                Err(Error::MintFailed {
                    status: 401,
                    message: "HTTP Basic: Access denied".into(),
                })
            })
            .await
            .unwrap_err();
        assert_eq!(err.upstream_status(), Some(401));
        assert_eq!(
            store
                .counters()
                .mint_failures
                .get(&401)
                .unwrap()
                .load(Ordering::SeqCst),
            1
        );
    }

    #[tokio::test]
    async fn the_cache_is_bounded_and_expired_sessions_go_first() {
        let store = TokenStore::new(100);
        let now = unix_now();
        for id in 0..50u128 {
            store.seed(id, now - 1, token(now, now + 300)).await;
        }
        for id in 50..100u128 {
            store.seed(id, now + 3600, token(now, now + 300)).await;
        }
        assert_eq!(store.len(), 100);
        store.seed(1000, now + 3600, token(now, now + 300)).await;
        assert_eq!(store.len(), 51, "expired sessions were swept");
        for id in 2000..2500u128 {
            store.seed(id, now + 3600, token(now, now + 300)).await;
        }
        assert!(store.len() <= 100, "{}", store.len());
    }
}
