//! Failed logins: regrelay must never get its own address banned by GitLab.
//!
//! GitLab bans an address after too many failed logins (`Gitlab::Auth::IpRateLimiter`: typically
//! 10 in 60 s, for an hour), and it counts `X-Forwarded-For` only from its `trusted_proxies`:
//! for a regrelay GitLab does not trust, that address is regrelay's own, and every user behind it
//! is locked out with it by one CI fleet with a revoked deploy token. So, per token service:
//!
//! - a credential the token service refused (401) is not sent to it again for a while: the
//!   refusal is remembered by a keyed hash of the credential (HMAC-SHA256 under a key of this
//!   process; never the credential itself) and the service's answer is replayed, for 1 min,
//!   doubling with each refusal in a row up to 15 min;
//! - failed logins are budgeted per client (`--client-failed-logins-per-minute`) and for all
//!   clients together (`--failed-logins-per-minute`, by default below GitLab's threshold): past
//!   either, a credential regrelay has never seen succeed gets `429` with `Retry-After` from
//!   regrelay; credentials it has seen succeed (kept by keyed hash too) still pass. CI job
//!   tokens (`gitlab-ci-token`) are exempt, as GitLab exempts them; anonymous requests are no
//!   logins;
//! - GitLab's ban answer (`403`, "Too many failed authentication attempts") is recognised
//!   ([`is_ban`]): while it lasts regrelay asks again at most once a minute and answers every
//!   token request with the ban and its fix ([`crate::error::Error::Banned`]).
//!
//! Every table is bounded: remembered refusals and successes by count (oldest first go), budget
//! windows by their size.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use http::{HeaderMap, StatusCode};
use sha2::Sha256;
use tokio::time::Instant;

use crate::clients::ClientKey;
use crate::lock::lock;

/// The window failed logins are counted in.
pub const WINDOW: Duration = Duration::from_secs(60);
/// First time a refused credential is answered from memory; it doubles with each refusal in a row.
pub const REFUSAL_MIN: Duration = Duration::from_secs(60);
/// Longest time a refused credential is answered from memory.
pub const REFUSAL_MAX: Duration = Duration::from_secs(15 * 60);
/// How often regrelay asks the token service again while it bans regrelay's address.
pub const BAN_RECHECK: Duration = Duration::from_secs(60);
/// Refused credentials remembered (a few hundred bytes each).
const MAX_REFUSED: usize = 10_000;
/// Credentials remembered as having succeeded (32 bytes and an instant each).
const MAX_SUCCEEDED: usize = 100_000;
/// Largest refusal body remembered for replay.
const MAX_REPLAY_BODY: usize = 16 * 1024;

/// A keyed hash of a credential: finds it again, reveals nothing of it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CredentialKey([u8; 32]);

impl std::fmt::Debug for CredentialKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialKey(<keyed hash>)")
    }
}

/// One login: whose credential, from which client, and whether it counts.
#[derive(Debug, Clone, Copy)]
pub struct Login {
    key: CredentialKey,
    client: Option<ClientKey>,
    /// A CI job token: GitLab never bans for it, so it uses no budget.
    exempt: bool,
}

/// A token service's refusal, as regrelay replays it.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// `Content-Type`, `WWW-Authenticate`, `Retry-After` and `RateLimit-*`: what a client reads.
    pub headers: HeaderMap,
    /// Its body (bounded).
    pub body: Bytes,
}

/// What to do with a login.
#[derive(Debug)]
pub enum Gate {
    /// Ask the token service.
    Ask,
    /// The token service refused this credential a moment ago: its answer again.
    Replay(Answer),
    /// Failed logins are over budget and this credential never succeeded: `429` for this long.
    Throttled {
        /// Seconds until a failure leaves the window.
        retry_after: u64,
        /// Which budget: the client's or everyone's.
        whose: &'static str,
    },
}

struct Refusal {
    answer: Answer,
    until: Instant,
    streak: u32,
}

/// Failures in the last [`WINDOW`].
#[derive(Default)]
struct Window(VecDeque<Instant>);

impl Window {
    fn count(&mut self, now: Instant) -> usize {
        while self
            .0
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            self.0.pop_front();
        }
        self.0.len()
    }

    fn add(&mut self, now: Instant, cap: usize) {
        self.0.push_back(now);
        while self.0.len() > cap {
            self.0.pop_front();
        }
    }

    /// Seconds until the oldest failure leaves the window.
    fn retry_after(&self, now: Instant) -> u64 {
        self.0.front().map_or(1, |t| {
            (WINDOW.saturating_sub(now.duration_since(*t))).as_secs() + 1
        })
    }
}

/// The failed-login state of one token service.
pub struct Logins {
    key: [u8; 32],
    refused: DashMap<CredentialKey, Refusal>,
    succeeded: DashMap<CredentialKey, Instant>,
    all: Mutex<Window>,
    clients: DashMap<ClientKey, Window>,
    /// Failed logins per minute, all clients together and per client.
    budgets: (usize, usize),
    /// Until when the token service's ban is taken as given (then one request asks again).
    ban: Mutex<Option<Instant>>,
}

impl Logins {
    /// Budgets of `all` and `per_client` failed logins a minute.
    pub fn new(all: usize, per_client: usize) -> Logins {
        let mut key = [0u8; 32];
        chacha20poly1305::aead::rand_core::RngCore::fill_bytes(
            &mut chacha20poly1305::aead::OsRng,
            &mut key,
        );
        Logins {
            key,
            refused: DashMap::new(),
            succeeded: DashMap::new(),
            all: Mutex::new(Window::default()),
            clients: DashMap::new(),
            budgets: (all.max(1), per_client.max(1)),
            ban: Mutex::new(None),
        }
    }

    /// The login of `authorization` (a `Basic` header value) from `client`, when it is one:
    /// anonymous requests and `Bearer` headers (GitLab takes them as anonymous) are not.
    pub fn login(&self, authorization: &[u8], client: Option<ClientKey>) -> Option<Login> {
        let username = crate::challenge::basic_username(authorization)?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("any key length");
        mac.update(authorization);
        Some(Login {
            key: CredentialKey(mac.finalize().into_bytes().into()),
            client,
            exempt: username == "gitlab-ci-token",
        })
    }

    /// What to do with `login` now.
    pub fn gate(&self, login: &Login) -> Gate {
        let now = Instant::now();
        if let Some(r) = self.refused.get(&login.key) {
            if now < r.until {
                return Gate::Replay(r.answer.clone());
            }
        }
        if login.exempt || self.succeeded.contains_key(&login.key) {
            return Gate::Ask;
        }
        if let Some(client) = login.client {
            if let Some(mut w) = self.clients.get_mut(&client) {
                if w.count(now) >= self.budgets.1 {
                    return Gate::Throttled {
                        retry_after: w.retry_after(now),
                        whose: "this client's",
                    };
                }
            }
        }
        let mut all = lock(&self.all);
        if all.count(now) >= self.budgets.0 {
            return Gate::Throttled {
                retry_after: all.retry_after(now),
                whose: "all clients'",
            };
        }
        Gate::Ask
    }

    /// The token service answered `login` with a token.
    pub fn succeeded(&self, login: &Login) {
        self.refused.remove(&login.key);
        if self.succeeded.len() >= MAX_SUCCEEDED {
            evict_oldest(&self.succeeded, |t| *t);
        }
        self.succeeded.insert(login.key, Instant::now());
    }

    /// The token service refused `login` (401): its answer is replayed for a while, and the
    /// failure counts in the budgets (unless exempt). Returns how long it is replayed.
    pub fn refused(&self, login: &Login, mut answer: Answer) -> Duration {
        let now = Instant::now();
        self.succeeded.remove(&login.key);
        answer.body.truncate(MAX_REPLAY_BODY);
        let streak = self.refused.get(&login.key).map_or(0, |r| r.streak) + 1;
        let hold = REFUSAL_MIN
            .saturating_mul(1 << (streak - 1).min(8))
            .min(REFUSAL_MAX);
        if self.refused.len() >= MAX_REFUSED {
            evict_oldest(&self.refused, |r| r.until);
        }
        self.refused.insert(
            login.key,
            Refusal {
                answer,
                until: now + hold,
                streak,
            },
        );
        if !login.exempt {
            lock(&self.all).add(now, self.budgets.0);
            if let Some(client) = login.client {
                if self.clients.len() >= MAX_REFUSED {
                    self.clients.retain(|_, w| w.count(now) > 0);
                }
                self.clients
                    .entry(client)
                    .or_default()
                    .add(now, self.budgets.1);
            }
        }
        hold
    }

    /// The token service answered with its ban: taken as given for [`BAN_RECHECK`].
    pub fn banned(&self) {
        *lock(&self.ban) = Some(Instant::now() + BAN_RECHECK);
    }

    /// While a ban is taken as given: the seconds until regrelay asks again. Past that, one
    /// caller (this one) asks, and the others wait for another [`BAN_RECHECK`].
    pub fn ban_remaining(&self) -> Option<u64> {
        let mut ban = lock(&self.ban);
        let until = (*ban)?;
        let now = Instant::now();
        if now < until {
            return Some((until - now).as_secs() + 1);
        }
        *ban = Some(now + BAN_RECHECK);
        None
    }

    /// The token service answered something else than its ban: no ban.
    pub fn not_banned(&self) {
        *lock(&self.ban) = None;
    }
}

/// Removes the oldest tenth of `map` by `at`.
fn evict_oldest<V>(map: &DashMap<CredentialKey, V>, at: impl Fn(&V) -> Instant) {
    let mut all: Vec<(CredentialKey, Instant)> =
        map.iter().map(|e| (*e.key(), at(e.value()))).collect();
    all.sort_by_key(|(_, t)| *t);
    for (k, _) in all.iter().take(map.len() / 10 + 1) {
        map.remove(k);
    }
}

/// True when a token service's refusal is GitLab's failed-login ban of the caller's address:
/// `403`, `text/plain` "Too many failed authentication attempts from this IP"
/// (lib/gitlab/auth/ip_blocked.rb), or newer versions' JSON `DENIED` "Access denied: too many
/// failed authentication attempts".
pub fn is_ban(status: StatusCode, body: &[u8]) -> bool {
    status == StatusCode::FORBIDDEN
        && String::from_utf8_lossy(&body[..body.len().min(4096)])
            .to_ascii_lowercase()
            .contains("too many failed authentication attempts")
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn basic(user: &str, secret: &str) -> Vec<u8> {
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"));
        format!("Basic {b}").into_bytes()
    }

    fn refusal() -> Answer {
        Answer {
            status: StatusCode::UNAUTHORIZED,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}"),
        }
    }

    fn client(n: u8) -> Option<ClientKey> {
        Some(ClientKey::of(std::net::IpAddr::from([192, 0, 2, n])))
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_credential_is_replayed_with_a_doubling_hold() {
        let logins = Logins::new(8, 4);
        let l = logins.login(&basic("dev", "revoked"), client(1)).unwrap();
        assert!(matches!(logins.gate(&l), Gate::Ask));
        assert_eq!(logins.refused(&l, refusal()), REFUSAL_MIN);
        assert!(matches!(logins.gate(&l), Gate::Replay(a) if a.status == StatusCode::UNAUTHORIZED));
        tokio::time::advance(REFUSAL_MIN).await;
        assert!(matches!(logins.gate(&l), Gate::Ask));
        assert_eq!(logins.refused(&l, refusal()), 2 * REFUSAL_MIN);
        // Another credential, even of the same user, is asked.
        let other = logins.login(&basic("dev", "right"), client(1)).unwrap();
        assert!(matches!(logins.gate(&other), Gate::Ask));
        // Anonymous and Bearer are no logins.
        assert!(logins.login(b"Bearer abc", client(1)).is_none());
        // The key reveals nothing.
        assert_eq!(format!("{:?}", l.key), "CredentialKey(<keyed hash>)");
    }

    #[tokio::test(start_paused = true)]
    async fn failed_logins_are_budgeted_but_known_credentials_pass() {
        let logins = Logins::new(3, 2);
        let good = logins.login(&basic("dev", "good"), client(1)).unwrap();
        logins.succeeded(&good);
        for i in 0..2 {
            let l = logins
                .login(&basic("x", &format!("wrong{i}")), client(1))
                .unwrap();
            logins.refused(&l, refusal());
        }
        // Client 1 is at its budget: a new wrong credential is throttled, the known one passes.
        let next = logins.login(&basic("x", "wrong2"), client(1)).unwrap();
        assert!(matches!(
            logins.gate(&next),
            Gate::Throttled {
                whose: "this client's",
                ..
            }
        ));
        assert!(matches!(logins.gate(&good), Gate::Ask));
        // Another client still may, once: then everyone's budget is spent.
        let other = logins.login(&basic("y", "wrong"), client(2)).unwrap();
        assert!(matches!(logins.gate(&other), Gate::Ask));
        logins.refused(&other, refusal());
        let third = logins.login(&basic("z", "wrong"), client(3)).unwrap();
        assert!(matches!(
            logins.gate(&third),
            Gate::Throttled {
                whose: "all clients'",
                ..
            }
        ));
        // CI job tokens never count nor wait (GitLab exempts them from its ban).
        let job = logins
            .login(&basic("gitlab-ci-token", "job"), client(3))
            .unwrap();
        assert!(matches!(logins.gate(&job), Gate::Ask));
        // A minute later the window is empty.
        tokio::time::advance(WINDOW).await;
        assert!(matches!(logins.gate(&third), Gate::Ask));
    }

    #[tokio::test(start_paused = true)]
    async fn a_ban_is_taken_as_given_and_checked_again_once_a_minute() {
        let logins = Logins::new(8, 4);
        assert_eq!(logins.ban_remaining(), None);
        logins.banned();
        assert_eq!(logins.ban_remaining(), Some(BAN_RECHECK.as_secs() + 1));
        tokio::time::advance(BAN_RECHECK).await;
        assert_eq!(logins.ban_remaining(), None, "one caller asks again");
        assert!(logins.ban_remaining().is_some(), "the others wait");
        logins.not_banned();
        assert_eq!(logins.ban_remaining(), None);
        assert!(is_ban(
            StatusCode::FORBIDDEN,
            b"Too many failed authentication attempts from this IP"
        ));
        assert!(is_ban(
            StatusCode::FORBIDDEN,
            br#"{"errors":[{"code":"DENIED","message":"Access denied: too many failed authentication attempts"}]}"#
        ));
        assert!(!is_ban(StatusCode::FORBIDDEN, b"access forbidden"));
    }
}
