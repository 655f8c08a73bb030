//! Sealed sessions: `KeyRing::open` on arbitrary tokens (as given and behind `rr1.`), on a real
//! sealed token mutated by the input (bit flips, truncation, insertion, deletion), and under an
//! input-chosen public URL. A token opens only when it is byte-identical to what was sealed, for
//! the same public URL. Also: any session built from the input survives seal → open.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use regrelay::session::{unix_now, KeyRing, Kind, Session, TOKEN_PREFIX};

const PUBLIC: &str = "http://px:5000";

struct Fixture {
    ring: KeyRing,
    unknown: KeyRing,
    token: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let ring = KeyRing::from_keys(&[[7u8; 32]]);
        let s = Session::new(
            Kind::Access,
            Some(b"Basic YWxpY2U6czNjcjN0".to_vec()),
            "container_registry".into(),
            vec!["repository:group/app:pull,push".into()],
            Duration::from_secs(24 * 3600),
        );
        let token = ring.seal(&s, PUBLIC);
        Fixture {
            ring,
            unknown: KeyRing::ephemeral(),
            token,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let now = unix_now();

    // 1. Arbitrary text as a token, with and without our prefix. Under the fixed key a token
    // may open (a seed can be a real one) but never past its expiry; under a key nobody knows,
    // nothing opens.
    if let Ok(s) = std::str::from_utf8(data) {
        for tok in [s.to_owned(), format!("{TOKEN_PREFIX}{s}")] {
            for at in [0, now, u64::MAX] {
                if let Ok(opened) = f.ring.open(&tok, PUBLIC, at) {
                    assert!(opened.exp > at, "expired session opened");
                }
            }
            assert!(
                f.unknown.open(&tok, PUBLIC, now).is_err(),
                "forged token opened: {tok:?}"
            );
        }
        // 2. The real token under an input-chosen public URL.
        match f.ring.open(&f.token, s, now) {
            Ok(_) => assert_eq!(s, PUBLIC, "token opened for another public URL {s:?}"),
            Err(e) => assert_ne!(s, PUBLIC, "sealed token refused: {e}"),
        }
    }

    // 3. The real token, edited as the input says: each op is 3 bytes (kind, position, value).
    let mut bytes = f.token.clone().into_bytes();
    for op in data.chunks_exact(3) {
        if bytes.is_empty() {
            break;
        }
        let pos = usize::from(op[1]) * bytes.len() / 256;
        match op[0] % 4 {
            0 => bytes[pos] ^= op[2] | 1,
            1 => bytes.truncate(pos),
            2 => bytes.insert(pos, op[2]),
            _ => {
                bytes.remove(pos);
            }
        }
    }
    if let Ok(tok) = String::from_utf8(bytes) {
        let res = f.ring.open(&tok, PUBLIC, now);
        if tok == f.token {
            assert!(res.is_ok(), "unmodified token refused: {:?}", res.err());
        } else {
            assert!(res.is_err(), "modified token opened: {tok:?}");
        }
    }

    // 4. A session made of the input seals and opens to itself.
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\n');
    let auth = parts.next().unwrap_or_default();
    let service = parts.next().unwrap_or_default().to_owned();
    let scopes: Vec<String> = parts.map(str::to_owned).collect();
    let authorization = (!auth.is_empty()).then(|| auth.as_bytes().to_vec());
    let kind = if data.first().is_some_and(|b| b & 1 == 1) {
        Kind::Refresh
    } else {
        Kind::Access
    };
    let s = Session::new(
        kind,
        authorization,
        service,
        scopes,
        Duration::from_secs(60),
    );
    let sealed = f.ring.seal(&s, PUBLIC);
    let opened = f
        .ring
        .open(&sealed, PUBLIC, now)
        .expect("a fresh seal opens");
    assert_eq!(opened.id, s.id);
    assert_eq!(opened.kind, s.kind);
    assert_eq!(opened.authorization, s.authorization);
    assert_eq!(opened.service, s.service);
    assert_eq!(opened.scopes, s.scopes);
    assert_eq!((opened.iat, opened.exp), (s.iat, s.exp));
    assert_eq!(
        f.ring.open(&sealed, PUBLIC, s.exp).err(),
        Some(regrelay::session::OpenError::Expired)
    );
});
