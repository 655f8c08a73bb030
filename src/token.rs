//! The upstream token cache: one GitLab JWT per session, re-minted before it runs out, and a
//! token service that fails is asked once, not once per waiting request.
//!
//! GitLab's registry tokens live 5 minutes (15 on gitlab.com) and the registry checks a token
//! once, when a request's headers arrive. So every upstream request gets a token that is valid on
//! arrival:
//! - A token's life is counted from the moment it was *received*, for the lifetime its issuer
//!   gave it (`exp - iat`), so a skewed local clock neither keeps an expired token nor throws away
//!   a good one.
//! - A cached token is used while more than a margin of its life is left ([`refresh_margin`]: 20 %
//!   of the lifetime, clamped to [1 s, 60 s]). Once less than twice the margin is left, the first
//!   request that uses it starts a re-mint in the background ([`UpstreamToken::due_at`]): in
//!   steady state no request waits for a mint. A request waits only when no valid token exists.
//! - One mint at a time per session (its scopes are fixed): concurrent requests wait for it and
//!   share its outcome, a failure included. A failure is then remembered for a backoff (1 s,
//!   doubling to 60 s, or the token service's own `Retry-After`), during which requests get the
//!   same error without calling the token service: GitLab bans addresses that fail auth
//!   repeatedly, and regrelay must not be why a runner fleet is banned.
//!
//! The cache is bounded: expired sessions are swept out, and past the bound arbitrary entries go
//! (they are re-minted on next use).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use http::HeaderValue;
use tokio::time::Instant;

use crate::error::MintFailure;
use crate::session::unix_now;

/// Lifetime assumed for a token without readable `iat`/`exp` (what Docker assumes without
/// `expires_in`).
pub const FALLBACK_TOKEN_LIFETIME_SECS: u64 = 60;
const MIN_MARGIN: Duration = Duration::from_secs(1);
const MAX_MARGIN: Duration = Duration::from_secs(60);
/// Longest lifetime believed for an upstream token (GitLab's longest setting is far below it):
/// a token service that claims more is treated as if it said this, and no deadline overflows.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// First backoff after a failed mint; it doubles with each failure in a row.
pub const MINT_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest backoff after failed mints (also the cap on a honoured `Retry-After`).
pub const MINT_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How long before its expiry a token of `lifetime` is replaced: 20 %, clamped to [1 s, 60 s].
pub fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 5).clamp(MIN_MARGIN, MAX_MARGIN)
}

/// Backoff after `streak` failed mints in a row (1-based), or the token service's wish.
pub fn mint_backoff(streak: u32, retry_after: Option<u64>) -> Duration {
    let doubled = MINT_BACKOFF_MIN.saturating_mul(1 << streak.saturating_sub(1).min(16));
    let wanted = retry_after.map_or(Duration::ZERO, Duration::from_secs);
    doubled.max(wanted).min(MINT_BACKOFF_MAX)
}

/// An upstream (GitLab) token ready to send.
#[derive(Clone)]
pub struct UpstreamToken {
    /// `Bearer <jwt>`, marked sensitive.
    pub header: HeaderValue,
    /// Its lifetime as the issuer counts it.
    pub lifetime: Duration,
    /// When regrelay received it.
    pub received: Instant,
}

impl std::fmt::Debug for UpstreamToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamToken")
            .field("header", &"<redacted>")
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl UpstreamToken {
    /// Wraps a JWT received now. Its lifetime is `exp - iat` from its claims; without `iat`,
    /// `exp` against the local clock; without either, [`FALLBACK_TOKEN_LIFETIME_SECS`]; never
    /// more than [`MAX_TOKEN_LIFETIME`].
    pub fn new(jwt: &str) -> Result<UpstreamToken, http::header::InvalidHeaderValue> {
        let lifetime = match crate::challenge::jwt_times(jwt) {
            (Some(iat), Some(exp)) => exp.saturating_sub(iat),
            (None, Some(exp)) => exp.saturating_sub(unix_now()),
            _ => FALLBACK_TOKEN_LIFETIME_SECS,
        };
        let mut header = HeaderValue::from_str(&format!("Bearer {jwt}"))?;
        header.set_sensitive(true);
        Ok(UpstreamToken {
            header,
            lifetime: Duration::from_secs(lifetime).min(MAX_TOKEN_LIFETIME),
            received: Instant::now(),
        })
    }

    /// Life left at `now` (zero when expired).
    pub fn remaining(&self, now: Instant) -> Duration {
        (self.received + self.lifetime).saturating_duration_since(now)
    }

    /// Still usable at `now`: more than the margin of its lifetime is left.
    pub fn fresh_at(&self, now: Instant) -> bool {
        self.remaining(now) > refresh_margin(self.lifetime)
    }

    /// Due for a background re-mint at `now`: less than twice the margin is left.
    pub fn due_at(&self, now: Instant) -> bool {
        self.remaining(now) <= 2 * refresh_margin(self.lifetime)
    }
}

/// Counters of the token cache (read by metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Tokens minted (first mints and refreshes).
    pub mints: AtomicU64,
    /// Mints that replaced a token that was running out (background refreshes included).
    pub refreshes: AtomicU64,
    /// Background refreshes started.
    pub background: AtomicU64,
    /// Lookups answered with a cached fresh token.
    pub hits: AtomicU64,
    /// Lookups that found no fresh token (and so minted, or joined a mint).
    pub misses: AtomicU64,
    /// Requests that waited for another request's mint and used its outcome.
    pub joins: AtomicU64,
    /// Requests answered from a remembered failure without calling the token service.
    pub negative_hits: AtomicU64,
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

/// A mint that can run in a background task.
pub type MintFuture = Pin<Box<dyn Future<Output = Result<UpstreamToken, MintFailure>> + Send>>;

#[derive(Default)]
struct State {
    token: Option<UpstreamToken>,
    failure: Option<(MintFailure, Instant)>,
    streak: u32,
    refreshing: bool,
}

#[derive(Default)]
struct Slot {
    // A std mutex: held only to read or swap a few fields, never across an await.
    state: Mutex<State>,
    // One mint at a time per session; waiters queue here and then find its outcome.
    minting: tokio::sync::Mutex<()>,
}

impl Slot {
    /// The cached answer at `now`, if any: a fresh token, or a failure still in its backoff.
    fn answer(&self, now: Instant) -> Option<Result<UpstreamToken, MintFailure>> {
        let state = self.state.lock().expect("token slot lock");
        if let Some(t) = state.token.as_ref().filter(|t| t.fresh_at(now)) {
            return Some(Ok(t.clone()));
        }
        match &state.failure {
            Some((f, until)) if now < *until => Some(Err(f.clone())),
            _ => None,
        }
    }

    fn record(&self, outcome: &Result<UpstreamToken, MintFailure>, counters: &Counters) {
        let mut state = self.state.lock().expect("token slot lock");
        match outcome {
            Ok(tok) => {
                counters.mints.fetch_add(1, Ordering::Relaxed);
                if state.token.is_some() {
                    counters.refreshes.fetch_add(1, Ordering::Relaxed);
                }
                state.token = Some(tok.clone());
                state.failure = None;
                state.streak = 0;
            }
            Err(f) => {
                counters.failed(f.status().unwrap_or(0));
                state.streak += 1;
                let until = Instant::now() + mint_backoff(state.streak, f.retry_after());
                state.failure = Some((f.clone(), until));
            }
        }
    }
}

struct Entry {
    slot: Arc<Slot>,
    session_exp: u64,
}

/// Session id → upstream token, bounded.
pub struct TokenStore {
    entries: DashMap<u128, Entry>,
    max_entries: usize,
    counters: Arc<Counters>,
}

impl TokenStore {
    /// An empty store holding at most `max_entries` sessions.
    pub fn new(max_entries: usize) -> TokenStore {
        TokenStore {
            entries: DashMap::new(),
            max_entries: max_entries.max(1),
            counters: Arc::default(),
        }
    }

    /// The counters, shared (metrics read them at scrape time).
    pub fn shared_counters(&self) -> Arc<Counters> {
        self.counters.clone()
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

    fn slot(&self, session: u128, session_exp: u64) -> Arc<Slot> {
        if let Some(e) = self.entries.get(&session) {
            return e.slot.clone();
        }
        if self.entries.len() >= self.max_entries {
            self.evict();
        }
        self.entries
            .entry(session)
            .or_insert_with(|| Entry {
                slot: Arc::default(),
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
    pub fn seed(&self, session: u128, session_exp: u64, token: UpstreamToken) {
        // Minted by the token endpoint for this new session: a first mint.
        self.counters.mints.fetch_add(1, Ordering::Relaxed);
        let slot = self.slot(session, session_exp);
        let mut state = slot.state.lock().expect("token slot lock");
        state.token = Some(token);
        state.failure = None;
    }

    /// A token for `session` that is fresh now: the cached one (re-minted in the background
    /// when it is due), or one from `mint`, which runs at most once at a time per session; its
    /// outcome, failure included, is what every waiter gets.
    pub async fn get<F>(
        &self,
        session: u128,
        session_exp: u64,
        mint: F,
    ) -> Result<UpstreamToken, MintFailure>
    where
        F: Fn() -> MintFuture,
    {
        let slot = self.slot(session, session_exp);
        match slot.answer(Instant::now()) {
            Some(Ok(tok)) => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                self.refresh_ahead(&slot, &tok, &mint);
                return Ok(tok);
            }
            Some(Err(f)) => {
                self.counters.negative_hits.fetch_add(1, Ordering::Relaxed);
                return Err(f);
            }
            None => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
            }
        }
        let (_guard, waited) = match slot.minting.try_lock() {
            Ok(g) => (g, false),
            Err(_) => (slot.minting.lock().await, true),
        };
        if let Some(answer) = slot.answer(Instant::now()) {
            if waited {
                self.counters.joins.fetch_add(1, Ordering::Relaxed);
            }
            return answer;
        }
        let outcome = mint().await;
        slot.record(&outcome, &self.counters);
        outcome
    }

    /// Starts a background re-mint of a token that is due, unless one is running.
    fn refresh_ahead<F: Fn() -> MintFuture>(
        &self,
        slot: &Arc<Slot>,
        tok: &UpstreamToken,
        mint: &F,
    ) {
        if !tok.due_at(Instant::now()) {
            return;
        }
        {
            let mut state = slot.state.lock().expect("token slot lock");
            if state.refreshing {
                return;
            }
            state.refreshing = true;
        }
        self.counters.background.fetch_add(1, Ordering::Relaxed);
        let (slot, counters, fut) = (slot.clone(), self.counters.clone(), mint());
        tokio::spawn(async move {
            let guard = slot.minting.lock().await;
            // A foreground mint may have replaced the token while this task waited.
            let still_due = slot
                .state
                .lock()
                .expect("token slot lock")
                .token
                .as_ref()
                .map_or(true, |t| t.due_at(Instant::now()));
            if still_due {
                let outcome = fut.await;
                slot.record(&outcome, &counters);
            }
            drop(guard);
            slot.state.lock().expect("token slot lock").refreshing = false;
        });
    }

    /// Forgets `stale` (the registry refused it), unless another request already replaced it.
    pub fn invalidate(&self, session: u128, stale: &UpstreamToken) {
        let Some(slot) = self.entries.get(&session).map(|e| e.slot.clone()) else {
            return;
        };
        let mut state = slot.state.lock().expect("token slot lock");
        if state
            .token
            .as_ref()
            .is_some_and(|t| t.header == stale.header)
        {
            state.token = None;
        }
    }
}

#[cfg(test)]
mod tests;
