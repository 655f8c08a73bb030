use super::*;
use std::sync::atomic::AtomicUsize;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

fn token(lifetime: u64) -> UpstreamToken {
    let mut t = UpstreamToken::new("a.b.c").unwrap();
    t.lifetime = Duration::from_secs(lifetime);
    t
}

fn jwt(claims: &str) -> String {
    format!("e30.{}.sig", URL_SAFE_NO_PAD.encode(claims))
}

fn unavailable() -> MintFailure {
    MintFailure::Busy {
        status: 503,
        retry_after: None,
        message: "GitLab is down for maintenance".into(),
    }
}

#[test]
fn margin_is_a_fifth_clamped_and_backoff_doubles_to_a_cap() {
    let cases = [(1, 1), (5, 1), (10, 2), (300, 60), (900, 60), (0, 1)];
    for (lifetime, want) in cases {
        assert_eq!(
            refresh_margin(Duration::from_secs(lifetime)),
            Duration::from_secs(want),
            "{lifetime}"
        );
    }
    let cases = [
        (1, None, 1),
        (2, None, 2),
        (3, None, 4),
        (7, None, 60),
        (40, None, 60),
        (1, Some(7), 7),
        (3, Some(2), 4),
        (1, Some(100_000), 60),
    ];
    for (streak, retry_after, want) in cases {
        assert_eq!(
            mint_backoff(streak, retry_after),
            Duration::from_secs(want),
            "{streak} {retry_after:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn freshness_counts_from_receipt_not_from_the_local_clock() {
    // Issued by a token service whose clock is 10 minutes ahead: exp is far in the local future,
    // but the token lives 300 s from when it arrived.
    let now = unix_now();
    let skewed = jwt(&format!(r#"{{"iat":{},"exp":{}}}"#, now + 600, now + 900));
    let t = UpstreamToken::new(&skewed).unwrap();
    assert_eq!(t.lifetime, Duration::from_secs(300));
    let start = Instant::now();
    assert!(t.fresh_at(start) && !t.due_at(start));
    assert!(t.due_at(start + Duration::from_secs(181)));
    assert!(t.fresh_at(start + Duration::from_secs(239)));
    assert!(!t.fresh_at(start + Duration::from_secs(240)));
    // And 10 minutes behind: exp is already past locally, yet the token is good for 300 s.
    let behind = jwt(&format!(r#"{{"iat":{},"exp":{}}}"#, now - 600, now - 300));
    assert!(UpstreamToken::new(&behind)
        .unwrap()
        .fresh_at(Instant::now()));
    // An absurd lifetime is capped, and no deadline overflows (found by fuzzing:
    // fuzz/regressions/jwt-huge-lifetime).
    let huge = UpstreamToken::new(&jwt(r#"{"iat":0,"exp":18446744073709551615}"#)).unwrap();
    assert_eq!(huge.lifetime, MAX_TOKEN_LIFETIME);
    assert!(huge.fresh_at(Instant::now()) && !huge.due_at(Instant::now()));
    // No claims at all: the fallback lifetime.
    assert_eq!(
        token(FALLBACK_TOKEN_LIFETIME_SECS).lifetime,
        UpstreamToken::new("x").unwrap().lifetime
    );
}

async fn burst(
    store: &Arc<TokenStore>,
    calls: &Arc<AtomicUsize>,
    fail: bool,
) -> Vec<Result<UpstreamToken, MintFailure>> {
    let exp = unix_now() + 3600;
    let mut tasks = vec![];
    for _ in 0..50 {
        let (store, calls) = (store.clone(), calls.clone());
        tasks.push(tokio::spawn(async move {
            store
                .get(7, exp, move || {
                    let calls = calls.clone();
                    Box::pin(async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if fail {
                            Err(unavailable())
                        } else {
                            Ok(token(300))
                        }
                    })
                })
                .await
        }));
    }
    let mut out = vec![];
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_parallel_requests_share_one_mint() {
    let store = Arc::new(TokenStore::new(16));
    let calls = Arc::new(AtomicUsize::new(0));
    let got = burst(&store, &calls, false).await;
    assert!(got.iter().all(Result::is_ok));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(store.counters().mints.load(Ordering::SeqCst), 1);
    assert_eq!(store.counters().joins.load(Ordering::SeqCst), 49);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_mint_is_shared_and_remembered_for_a_backoff() {
    let store = Arc::new(TokenStore::new(16));
    let calls = Arc::new(AtomicUsize::new(0));
    let got = burst(&store, &calls, true).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one attempt for 50 waiters"
    );
    assert!(got
        .iter()
        .all(|r| matches!(r, Err(MintFailure::Busy { status: 503, .. }))));
    // Within the backoff: no attempt at all.
    let got = burst(&store, &calls, true).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(got.iter().all(Result::is_err));
    assert_eq!(store.counters().negative_hits.load(Ordering::SeqCst), 50);
    // After it: one attempt again, and a success clears the failure.
    tokio::time::sleep(MINT_BACKOFF_MIN + Duration::from_millis(100)).await;
    let got = burst(&store, &calls, false).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(got.iter().all(Result::is_ok));
}

#[tokio::test(start_paused = true)]
async fn a_due_token_is_refreshed_in_the_background_while_requests_use_it() {
    let store = TokenStore::new(16);
    let exp = unix_now() + 3600;
    store.seed(1, exp, token(10)); // margin 2 s: due after 6 s, stale after 8 s
    let calls = Arc::new(AtomicUsize::new(0));
    let mint = || {
        let calls = calls.clone();
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(token(10))
        }) as MintFuture
    };
    tokio::time::sleep(Duration::from_secs(7)).await;
    let before = Instant::now();
    let first = store.get(1, exp, mint).await.unwrap();
    assert_eq!(
        Instant::now(),
        before,
        "the request did not wait for the mint"
    );
    let second = store.get(1, exp, mint).await.unwrap();
    assert_eq!(first.header, second.header);
    tokio::task::yield_now().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one background mint");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let third = store.get(1, exp, mint).await.unwrap();
    assert!(third.received > first.received, "the new token is in use");
    assert_eq!(store.counters().background.load(Ordering::SeqCst), 1);
    assert_eq!(store.counters().refreshes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn invalidated_tokens_are_minted_again() {
    let store = TokenStore::new(16);
    let exp = unix_now() + 3600;
    let seeded = token(300);
    store.seed(1, exp, seeded.clone());
    store.invalidate(1, &seeded);
    let got = store
        .get(1, exp, || Box::pin(async { Ok(token(300)) }))
        .await
        .unwrap();
    assert!(got.received >= seeded.received);
    // The seed (minted at login) and the new mint.
    assert_eq!(store.counters().mints.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_cache_is_bounded_and_expired_sessions_go_first() {
    let store = TokenStore::new(100);
    let now = unix_now();
    for id in 0..50u128 {
        store.seed(id, now - 1, token(300));
    }
    for id in 50..100u128 {
        store.seed(id, now + 3600, token(300));
    }
    assert_eq!(store.len(), 100);
    store.seed(1000, now + 3600, token(300));
    assert_eq!(store.len(), 51, "expired sessions were swept");
    for id in 2000..2500u128 {
        store.seed(id, now + 3600, token(300));
    }
    assert!(store.len() <= 100, "{}", store.len());
}

/// A token whose `access` claim grants `actions` on `repository:name`.
fn granting(name: &str, actions: &[&str], pad: usize) -> UpstreamToken {
    let now = unix_now();
    let claims = serde_json::json!({
        "iat": now, "exp": now + 300,
        "access": [{"type": "repository", "name": name, "actions": actions}],
        "pad": "x".repeat(pad),
    });
    UpstreamToken::new(&jwt(&claims.to_string())).unwrap()
}

#[test]
fn grants_are_read_once_from_the_access_claim() {
    let need = |s| crate::challenge::Scope::parse(s).unwrap();
    let t = granting("g/p", &["pull"], 0);
    assert_eq!(t.grants.allow(&need("repository:g/p:pull")), Some(true));
    assert_eq!(
        t.grants.allow(&need("repository:g/p:pull,push")),
        Some(false)
    );
    assert_eq!(t.grants.allow(&need("repository:g/q:pull")), Some(false));
    let all = granting("g/p", &["*"], 0);
    assert_eq!(all.grants.allow(&need("repository:g/p:delete")), Some(true));
    // An opaque token: only the registry knows.
    assert_eq!(token(300).grants.allow(&need("repository:g/p:pull")), None);
    // An empty grant is known (GitLab leaves refused scopes out).
    let now = unix_now();
    let none = jwt(&format!(
        r#"{{"iat":{now},"exp":{},"access":[]}}"#,
        now + 300
    ));
    let none = UpstreamToken::new(&none).unwrap();
    assert_eq!(none.grants.allow(&need("repository:g/p:pull")), Some(false));
}

#[tokio::test(start_paused = true)]
async fn a_refused_scope_is_remembered_with_a_doubling_backoff_and_forgotten_when_granted() {
    let store = TokenStore::new(16);
    let exp = unix_now() + 3600;
    store.seed(1, exp, granting("g/a", &["pull"], 0));
    let b = "repository:g/b:pull";
    assert_eq!(store.refusal(1, b), Refused::No);
    assert_eq!(store.refuse(1, exp, b), Duration::from_secs(1));
    assert_eq!(store.refusal(1, b), Refused::Remembered);
    // The session's token for what it may do stays.
    let kept = store
        .get(1, exp, || {
            Box::pin(async { panic!("no mint while the token is fresh") })
        })
        .await
        .unwrap();
    assert!(
        kept.grants
            .allow(&crate::challenge::Scope::parse("repository:g/a:pull").unwrap())
            == Some(true)
    );
    tokio::time::advance(Duration::from_millis(1100)).await;
    assert_eq!(store.refusal(1, b), Refused::Expired);
    assert_eq!(store.refuse(1, exp, b), Duration::from_secs(2));
    tokio::time::advance(Duration::from_millis(1100)).await;
    assert_eq!(
        store.refusal(1, b),
        Refused::Remembered,
        "the second backoff is 2 s"
    );
    store.grant(1, b);
    assert_eq!(store.refusal(1, b), Refused::No);
    // Answered locally: one count per request answered without asking.
    assert_eq!(store.counters().scope_refusals.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_remint_uses_a_newer_token_or_mints_once() {
    let store = TokenStore::new(16);
    let exp = unix_now() + 3600;
    let old = granting("g/a", &["pull"], 0);
    store.seed(1, exp, old.clone());
    let calls = Arc::new(AtomicUsize::new(0));
    let mint = || {
        let calls = calls.clone();
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(granting("g/a", &["pull", "push"], 0))
        }) as MintFuture
    };
    let fresh = store.remint(1, exp, &old, mint).await.unwrap();
    assert_ne!(fresh.header, old.header);
    // A second asker holding the old token gets the one just minted, not another mint.
    let again = store.remint(1, exp, &old, mint).await.unwrap();
    assert_eq!(again.header, fresh.header);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_cache_is_bounded_in_bytes() {
    let max = 64 * 1024;
    let store = TokenStore::new(100_000).with_max_bytes(max);
    let exp = unix_now() + 3600;
    for id in 0..200u128 {
        // ~4 KiB tokens: 200 of them would be 800 KiB.
        store.seed(id, exp, granting("g/p", &["pull"], 3000));
        store.refuse(id, exp, "repository:g/q:pull");
        assert!(store.bytes() <= max, "{} > {max}", store.bytes());
    }
    assert!(store.len() >= 8 && store.len() < 20, "{}", store.len());
    // What is counted is what is held.
    let held: u64 = store
        .entries
        .iter()
        .map(|e| lock(&e.slot.state).charged)
        .sum();
    assert_eq!(held, store.bytes());
}
