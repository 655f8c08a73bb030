//! `WWW-Authenticate: Bearer …` parsing: whatever the registry sends, `Challenge::parse` must not
//! panic, and a parsed challenge must survive `to_string` → `parse` unchanged (regrelay rewrites
//! `realm` and re-emits the header, so a lossy round trip would corrupt `scope`/`error`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use regrelay::challenge::Challenge;

fuzz_target!(|header: &str| {
    let Some(c) = Challenge::parse(header) else {
        return;
    };
    let _ = c.error();
    for name in ["realm", "service", "scope", "error", ""] {
        let _ = c.get(name);
    }
    for (name, value) in &c.params {
        assert!(!name.is_empty(), "empty param name from {header:?}");
        assert_eq!(*name, name.to_ascii_lowercase(), "name not lowercased");
        // `get` finds the first param of that name.
        let first = c
            .params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str());
        assert_eq!(c.get(name), first);
        let _ = value;
    }

    let text = c.to_string();
    let again = Challenge::parse(&text)
        .unwrap_or_else(|| panic!("re-parse failed: {header:?} -> {text:?}"));
    assert_eq!(
        again.params, c.params,
        "round trip changed params: {header:?} -> {text:?}"
    );
    assert_eq!(again.to_string(), text, "to_string is not stable");
    assert_eq!(again.error(), c.error());

    // What regrelay does to every upstream challenge: point `realm` at itself.
    let mut rewritten = c.clone();
    rewritten.set("realm", "https://px.example.com:5000/jwt/auth");
    let text = rewritten.to_string();
    let back =
        Challenge::parse(&text).unwrap_or_else(|| panic!("rewritten re-parse failed: {text:?}"));
    assert_eq!(back, rewritten);
    assert_eq!(
        back.get("realm"),
        Some("https://px.example.com:5000/jwt/auth")
    );
    assert_eq!(back.get("scope"), c.get("scope"));
    assert_eq!(back.error(), c.error());
});
