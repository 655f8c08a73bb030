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
//! - A token's grants (its `access` claim) are read once, when it arrives. A scope the token
//!   service left out (GitLab drops what a credential may not do, without an error) is refused
//!   by regrelay itself ([`crate::access`]), and remembered per session with the same backoff
//!   as a failed mint ([`TokenStore::refusal`]): a client hammering a repository it may not
//!   pull costs no mint and no registry request, and the session's token for what it may do is
//!   never thrown away for it. After the backoff one request re-mints to ask again.
//!
//! The cache is bounded in entries and in bytes (`--session-cache-max-bytes`, shared with the
//! opened-session cache of [`crate::access`]): expired sessions are swept out, and past a bound
//! arbitrary entries go (they are re-minted on next use).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use http::HeaderValue;
use tokio::time::Instant;

use crate::challenge::Scope;
use crate::error::MintFailure;
// A slot's fields are each written in one step: a poisoned lock is used as it is.
use crate::lock::lock;
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

/// What a token grants, read from its `access` claim when it arrived.
#[derive(Clone, Debug)]
pub enum Grants {
    /// Not a JWT with an `access` claim (an opaque token): only the registry knows.
    Unknown,
    /// `(type:name, actions)` pairs, as the claim lists them.
    Known(Arc<[(String, Vec<String>)]>),
}

impl Grants {
    fn of(claims: Option<&serde_json::Value>) -> Grants {
        let Some(access) = claims.and_then(|c| c.get("access")?.as_array()) else {
            return Grants::Unknown;
        };
        let entry = |a: &serde_json::Value| {
            let resource = format!("{}:{}", a["type"].as_str()?, a["name"].as_str()?);
            let actions = a["actions"].as_array()?;
            let actions = actions.iter().filter_map(|x| Some(x.as_str()?.to_owned()));
            Some((resource, actions.collect()))
        };
        Grants::Known(access.iter().filter_map(entry).collect())
    }

    /// The actions granted on `kind:name`.
    pub fn actions_on<'g>(&'g self, kind: &str, name: &str) -> Vec<&'g str> {
        let Grants::Known(list) = self else {
            return vec![];
        };
        list.iter()
            .filter(|(r, _)| {
                r.strip_prefix(kind)
                    .and_then(|r| r.strip_prefix(':'))
                    .is_some_and(|n| n == name)
            })
            .flat_map(|(_, a)| a.iter().map(String::as_str))
            .collect()
    }

    /// `Some(true)` when every action `need` needs is granted (`*` grants all), `Some(false)`
    /// when one is not, `None` when the grants are unknown.
    pub fn allow(&self, need: &Scope<'_>) -> Option<bool> {
        if matches!(self, Grants::Unknown) {
            return None;
        }
        let granted = self.actions_on(need.kind, need.name);
        Some(
            need.actions()
                .all(|a| granted.iter().any(|g| *g == a || *g == "*")),
        )
    }

    /// Heap bytes, roughly.
    fn bytes(&self) -> usize {
        match self {
            Grants::Unknown => 0,
            Grants::Known(list) => list
                .iter()
                .map(|(r, a)| 48 + r.len() + a.iter().map(|x| 24 + x.len()).sum::<usize>())
                .sum(),
        }
    }
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
    /// What it grants.
    pub grants: Grants,
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
        let claims = crate::challenge::jwt_claims(jwt);
        let claim = |name: &str| claims.as_ref().and_then(|c| c.get(name)?.as_u64());
        let lifetime = match (claim("iat"), claim("exp")) {
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
            grants: Grants::of(claims.as_ref()),
        })
    }

    /// Heap bytes it holds, roughly (its header and grants).
    fn bytes(&self) -> usize {
        self.header.len() + self.grants.bytes()
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
    /// Requests for a scope the token service refused their session, answered without a mint
    /// or a registry request.
    pub scope_refusals: AtomicU64,
    /// Bytes held by this token cache, roughly.
    pub token_bytes: AtomicU64,
    /// Bytes held by the opened-session cache beside it ([`crate::access`]), roughly.
    pub opened_bytes: AtomicU64,
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
    /// Scopes the token service refused this session, each until its backoff ends.
    refused: Vec<Refusal>,
    /// Bytes charged to the store for this entry.
    charged: u64,
    /// Taken out of the store: charges nothing any more.
    evicted: bool,
}

/// A scope the token service refused a session.
struct Refusal {
    scope: String,
    until: Instant,
    streak: u32,
}

/// Refused scopes remembered per session (a session asks for at most
/// [`crate::challenge::MAX_SCOPES`], each needed as pull, push or delete).
const MAX_REFUSALS: usize = 64;
/// Bytes of an entry beyond its token and refusals: the map slot, the `Arc`, both mutexes.
const ENTRY_OVERHEAD: u64 = 256;

impl State {
    /// Recomputes this entry's charge; the change goes to `bytes`.
    fn recharge(&mut self, bytes: &AtomicU64) {
        if self.evicted {
            return;
        }
        let refused: usize = self.refused.iter().map(|r| 64 + r.scope.len()).sum();
        let now = ENTRY_OVERHEAD
            + self.token.as_ref().map_or(0, UpstreamToken::bytes) as u64
            + refused as u64;
        if now >= self.charged {
            bytes.fetch_add(now - self.charged, Ordering::Relaxed);
        } else {
            bytes.fetch_sub(self.charged - now, Ordering::Relaxed);
        }
        self.charged = now;
    }
}

/// What the store remembers of a scope for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Nothing: not refused, or not asked.
    No,
    /// Refused, and its backoff runs: answer without asking.
    Remembered,
    /// Refused, and its backoff is over: ask again (re-mint).
    Expired,
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
        let state = lock(&self.state);
        if let Some(t) = state.token.as_ref().filter(|t| t.fresh_at(now)) {
            return Some(Ok(t.clone()));
        }
        match &state.failure {
            Some((f, until)) if now < *until => Some(Err(f.clone())),
            _ => None,
        }
    }

    fn record(&self, outcome: &Result<UpstreamToken, MintFailure>, counters: &Counters) {
        let mut state = lock(&self.state);
        match outcome {
            Ok(tok) => {
                counters.mints.fetch_add(1, Ordering::Relaxed);
                if state.token.is_some() {
                    counters.refreshes.fetch_add(1, Ordering::Relaxed);
                }
                state.token = Some(tok.clone());
                state.failure = None;
                state.streak = 0;
                state.recharge(&counters.token_bytes);
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

/// Session id → upstream token, bounded in entries and bytes.
pub struct TokenStore {
    entries: DashMap<u128, Entry>,
    max_entries: usize,
    max_bytes: u64,
    counters: Arc<Counters>,
}

impl TokenStore {
    /// An empty store holding at most `max_entries` sessions.
    pub fn new(max_entries: usize) -> TokenStore {
        TokenStore {
            entries: DashMap::new(),
            max_entries: max_entries.max(1),
            max_bytes: u64::MAX,
            counters: Arc::default(),
        }
    }

    /// The same store, holding at most `max_bytes` (roughly: tokens, grants, refusals and a
    /// fixed overhead per entry).
    pub fn with_max_bytes(mut self, max_bytes: u64) -> TokenStore {
        self.max_bytes = max_bytes.max(ENTRY_OVERHEAD);
        self
    }

    /// Bytes held now, roughly.
    pub fn bytes(&self) -> u64 {
        self.counters.token_bytes.load(Ordering::Relaxed)
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
        if self.entries.len() >= self.max_entries || self.bytes() >= self.max_bytes {
            self.evict();
        }
        self.entries
            .entry(session)
            .or_insert_with(|| {
                let slot = Arc::new(Slot::default());
                lock(&slot.state).recharge(&self.counters.token_bytes);
                Entry { slot, session_exp }
            })
            .slot
            .clone()
    }

    /// Drops expired sessions; if the store is still over a bound, drops entries until it is at
    /// 90 % of both.
    fn evict(&self) {
        let now = unix_now();
        self.entries.retain(|_, e| {
            let keep = e.session_exp > now;
            if !keep {
                self.uncharge(&e.slot);
            }
            keep
        });
        let target = self.max_entries - self.max_entries / 10 - 1;
        let byte_target = self.max_bytes - self.max_bytes / 10;
        if self.entries.len() <= target && self.bytes() <= byte_target {
            return;
        }
        let mut excess = Vec::new();
        let (mut len, mut bytes) = (self.entries.len(), self.bytes());
        for e in self.entries.iter() {
            if len <= target && bytes <= byte_target {
                break;
            }
            len -= 1;
            bytes = bytes.saturating_sub(lock(&e.slot.state).charged);
            excess.push(*e.key());
        }
        for k in excess {
            if let Some((_, e)) = self.entries.remove(&k) {
                self.uncharge(&e.slot);
            }
        }
    }

    /// An entry left the store: its bytes no longer count, and nothing it records later will.
    fn uncharge(&self, slot: &Slot) {
        let mut state = lock(&slot.state);
        state.evicted = true;
        let charged = std::mem::take(&mut state.charged);
        self.counters
            .token_bytes
            .fetch_sub(charged, Ordering::Relaxed);
    }

    /// Evicts when over a bound (after an entry grew).
    fn keep_bounded(&self) {
        if self.bytes() > self.max_bytes {
            self.evict();
        }
    }

    /// Puts a token just obtained for a new session (the one answering its token request).
    pub fn seed(&self, session: u128, session_exp: u64, token: UpstreamToken) {
        // Minted by the token endpoint for this new session: a first mint.
        self.counters.mints.fetch_add(1, Ordering::Relaxed);
        let slot = self.slot(session, session_exp);
        {
            let mut state = lock(&slot.state);
            state.token = Some(token);
            state.failure = None;
            state.recharge(&self.counters.token_bytes);
        }
        self.keep_bounded();
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
        self.keep_bounded();
        outcome
    }

    /// A token minted now for `session`, whatever is cached, once at a time per session: to ask
    /// the token service again about a scope it refused. When another request re-minted since
    /// `stale` was handed out, its token is used instead.
    pub async fn remint<F>(
        &self,
        session: u128,
        session_exp: u64,
        stale: &UpstreamToken,
        mint: F,
    ) -> Result<UpstreamToken, MintFailure>
    where
        F: Fn() -> MintFuture,
    {
        let slot = self.slot(session, session_exp);
        let _guard = slot.minting.lock().await;
        let newer = lock(&slot.state)
            .token
            .clone()
            .filter(|t| t.header != stale.header && t.fresh_at(Instant::now()));
        if let Some(token) = newer {
            return Ok(token);
        }
        let outcome = mint().await;
        slot.record(&outcome, &self.counters);
        self.keep_bounded();
        outcome
    }

    /// What is remembered of `scope` refused to `session`.
    pub fn refusal(&self, session: u128, scope: &str) -> Refused {
        let Some(slot) = self.entries.get(&session).map(|e| e.slot.clone()) else {
            return Refused::No;
        };
        let state = lock(&slot.state);
        match state.refused.iter().find(|r| r.scope == scope) {
            None => Refused::No,
            Some(r) if Instant::now() < r.until => {
                self.counters.scope_refusals.fetch_add(1, Ordering::Relaxed);
                Refused::Remembered
            }
            Some(_) => Refused::Expired,
        }
    }

    /// Remembers that the token service refused `scope` to `session`: for a backoff that
    /// doubles with each refusal in a row (1 s to 60 s, as failed mints). Returns the backoff.
    pub fn refuse(&self, session: u128, session_exp: u64, scope: &str) -> Duration {
        let slot = self.slot(session, session_exp);
        let backoff = {
            let mut state = lock(&slot.state);
            let streak = match state.refused.iter().position(|r| r.scope == scope) {
                Some(i) => state.refused.remove(i).streak + 1,
                None => 1,
            };
            if state.refused.len() >= MAX_REFUSALS {
                state.refused.remove(0);
            }
            let backoff = mint_backoff(streak, None);
            state.refused.push(Refusal {
                scope: scope.to_owned(),
                until: Instant::now() + backoff,
                streak,
            });
            state.recharge(&self.counters.token_bytes);
            backoff
        };
        self.counters.scope_refusals.fetch_add(1, Ordering::Relaxed);
        self.keep_bounded();
        backoff
    }

    /// The token service granted `scope` to `session` after all.
    pub fn grant(&self, session: u128, scope: &str) {
        if let Some(slot) = self.entries.get(&session).map(|e| e.slot.clone()) {
            let mut state = lock(&slot.state);
            state.refused.retain(|r| r.scope != scope);
            state.recharge(&self.counters.token_bytes);
        }
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
            let mut state = lock(&slot.state);
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
            let still_due = lock(&slot.state)
                .token
                .as_ref()
                .is_none_or(|t| t.due_at(Instant::now()));
            if still_due {
                let outcome = fut.await;
                slot.record(&outcome, &counters);
            }
            drop(guard);
            lock(&slot.state).refreshing = false;
        });
    }

    /// Forgets `stale` (the registry refused it), unless another request already replaced it.
    pub fn invalidate(&self, session: u128, stale: &UpstreamToken) {
        let Some(slot) = self.entries.get(&session).map(|e| e.slot.clone()) else {
            return;
        };
        let mut state = lock(&slot.state);
        if state
            .token
            .as_ref()
            .is_some_and(|t| t.header == stale.header)
        {
            state.token = None;
            state.recharge(&self.counters.token_bytes);
        }
    }
}

#[cfg(test)]
mod tests;
