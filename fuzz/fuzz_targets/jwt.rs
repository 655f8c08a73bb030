//! JWT helpers: `challenge::jwt_exp` / `jwt_times` on raw input and on input wrapped as a JWT
//! payload, and `token::UpstreamToken::new` plus its lifetime and freshness math.
#![no_main]

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use regrelay::challenge::{jwt_exp, jwt_times};
use regrelay::token::{refresh_margin, UpstreamToken, MAX_TOKEN_LIFETIME};

fuzz_target!(|data: &[u8]| {
    // The payload as the token service would send it: header.payload.signature.
    let payload = URL_SAFE_NO_PAD.encode(data);
    let want = serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .and_then(|v| v.get("exp")?.as_u64());
    for jwt in [
        format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln"),
        format!("e30.{payload}="),
        format!("e30.{payload}=="),
    ] {
        assert_eq!(jwt_exp(&jwt), want, "{jwt:?}");
        token(&jwt);
    }

    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = jwt_exp(s);
    token(s);
});

fn token(jwt: &str) {
    let (iat, exp) = jwt_times(jwt);
    let Ok(t) = UpstreamToken::new(jwt) else {
        return;
    };
    assert!(
        t.header.is_sensitive(),
        "upstream token header not marked sensitive"
    );
    assert_eq!(t.header.as_bytes(), format!("Bearer {jwt}").as_bytes());
    if let (Some(iat), Some(exp)) = (iat, exp) {
        // The issuer's own count, whatever the local clock says.
        let claimed = Duration::from_secs(exp.saturating_sub(iat));
        assert_eq!(t.lifetime, claimed.min(MAX_TOKEN_LIFETIME));
    }
    let start = t.received;
    for later in [0, 1, t.lifetime.as_secs(), u32::MAX as u64] {
        let now = start + Duration::from_secs(later);
        let _ = t.remaining(now);
        // Fresh implies not past expiry, and due comes no later than stale.
        if t.fresh_at(now) {
            assert!(t.remaining(now) > Duration::ZERO);
        }
        if !t.fresh_at(now) {
            assert!(t.due_at(now));
        }
    }
    assert!(t.lifetime <= MAX_TOKEN_LIFETIME);
    let m = refresh_margin(t.lifetime);
    assert!((Duration::from_secs(1)..=Duration::from_secs(60)).contains(&m));
}
