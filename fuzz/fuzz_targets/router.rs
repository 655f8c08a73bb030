//! Routing: `router::route(method, uri, version, publics)` for any request line. Input:
//! `METHOD TARGET [VERSION]` on the first line (no version: HTTP/1.1), and optionally the configured
//! public URL on the second (parsed with `Origin::parse`; invalid or absent: none). Inputs whose
//! method, target or version do not parse are skipped (hyper refuses them before routing).
//! A `Registry` route must never carry a `.`/`..` segment, even percent-encoded, CONNECT is never
//! routed, and an HTTP/1 absolute-form target is routed only when it names the public URL.
#![no_main]

use http::{Method, Uri, Version};
use libfuzzer_sys::fuzz_target;
use regrelay::config::Origin;
use regrelay::router::{route, Route};

/// `%XX` decoding of a path (no `+` rule: that is for queries).
fn decode_path(p: &str) -> Vec<u8> {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let (line, public) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let public = public
        .and_then(|p| std::str::from_utf8(p).ok())
        .and_then(|p| Origin::parse("public_url", p).ok());
    let public = public.as_ref();
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (Some(m), Some(target)) = (parts.next(), parts.next()) else {
        return;
    };
    let version = match parts.next() {
        None => Version::HTTP_11,
        Some(b"HTTP/0.9") => Version::HTTP_09,
        Some(b"HTTP/1.0") => Version::HTTP_10,
        Some(b"HTTP/1.1") => Version::HTTP_11,
        Some(b"HTTP/2" | b"HTTP/2.0") => Version::HTTP_2,
        Some(b"HTTP/3" | b"HTTP/3.0") => Version::HTTP_3,
        Some(_) => return,
    };
    let Ok(method) = Method::from_bytes(m) else {
        return;
    };
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };

    let publics: Vec<Origin> = public.into_iter().cloned().collect();
    let res = route(&method, &uri, version, &publics);
    if method == Method::CONNECT {
        assert!(res.is_err(), "CONNECT routed: {uri}");
    }
    let Ok(r) = res else { return };
    if version < Version::HTTP_2 && uri.authority().is_some() {
        let named = Origin::of(&uri);
        assert!(
            matches!((named, public), (Some(n), Some(p)) if n.same_as(p)),
            "absolute-form target routed though it does not name the public URL: {uri}"
        );
    }
    match r {
        Route::Registry(api) => {
            let path = uri.path();
            assert!(path == "/v2" || path.starts_with("/v2/"), "{path}");
            // The parsed path names a repository only as the path spells it, never empty.
            if let Some(repo) = api.repository() {
                assert!(path.starts_with(&format!("/v2/{repo}/")), "{path} -> {repo}");
                assert!(!repo.split('/').any(str::is_empty), "{path} -> {repo:?}");
            }
            let decoded = decode_path(path);
            for seg in decoded.split(|&b| b == b'/') {
                assert!(
                    seg != b"." && seg != b"..",
                    "dot segment reaches the registry: {method} {uri} (decoded {:?})",
                    String::from_utf8_lossy(&decoded)
                );
            }
        }
        Route::Token => assert!(matches!(method, Method::GET | Method::POST)),
        Route::Healthy | Route::Ready => assert!(matches!(method, Method::GET | Method::HEAD)),
    }
});
