//! Token-request queries and scopes: `scopes_from_query`, `query_values`, `percent_decode` /
//! `percent_encode`, `token_query` and `ApiPath::scope`. Input: `KEY\nQUERY` (no newline: the
//! whole input is the query and the key is `scope`).
#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;
use regrelay::api_path::ApiPath;
use regrelay::challenge::{
    percent_decode, percent_encode, query_values, scopes_from_query, token_query,
};

fuzz_target!(|input: &str| {
    let (key, query) = input.split_once('\n').unwrap_or(("scope", input));

    // Anything decodes; encode → decode is the identity on any string.
    let _ = percent_decode(input);
    let encoded = percent_encode(input);
    assert!(
        encoded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~%".contains(&b)),
        "percent_encode left a reserved byte: {encoded:?}"
    );
    assert_eq!(percent_decode(&encoded), input, "decode(encode(s)) != s");

    let _ = query_values(query, key);
    let _ = query_values(query, "service");
    let scopes = scopes_from_query(query);
    for s in &scopes {
        assert!(
            !s.is_empty() && !s.contains(' '),
            "bad scope {s:?} from {query:?}"
        );
    }

    // What regrelay sends upstream reads back as what it was built from.
    let service = percent_decode(key);
    let q = token_query(&service, &scopes);
    assert_eq!(query_values(&q, "service"), vec![service.clone()], "{q:?}");
    assert_eq!(scopes_from_query(&q), scopes, "{q:?}");

    for (method, actions) in [
        (Method::GET, "pull"),
        (Method::HEAD, "pull"),
        (Method::POST, "pull,push"),
        (Method::PUT, "pull,push"),
        (Method::PATCH, "pull,push"),
        (Method::DELETE, "delete"),
    ] {
        for path in [query, input] {
            if let Some(scope) = ApiPath::parse(path).and_then(|api| api.scope(&method)) {
                assert!(path.starts_with("/v2/"), "{method} {path:?} -> {scope:?}");
                let name = scope
                    .strip_prefix("repository:")
                    .and_then(|s| s.strip_suffix(actions))
                    .and_then(|s| s.strip_suffix(':'))
                    .unwrap_or_else(|| panic!("{method} {path:?} -> {scope:?}"));
                assert!(
                    !name.is_empty(),
                    "{method} {path:?} -> empty repository name"
                );
            }
        }
    }
});
